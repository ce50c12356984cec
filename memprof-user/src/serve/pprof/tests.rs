use std::sync::Arc;

use super::*;
use crate::{output::pprof::decode, report::Frame};

fn frame(name: &str, offset: u64) -> Frame {
    Frame {
        function: Some(name.into()),
        module: Some("/opt/app".into()),
        offset: Some(offset),
        build_id: Some("abcd".into()),
        kind: "native",
        ..Frame::unknown()
    }
}

fn sample(key: u64, name: &str, values: [i64; 4]) -> ProcessSample {
    ProcessSample {
        key,
        stack: Arc::new([frame(name, 0x1000 + key), frame("main", 0x2000)]),
        allocator: "malloc",
        kind: "heap",
        values,
    }
}

fn process(pid: u32, samples: Vec<ProcessSample>) -> ProcessSamples {
    ProcessSamples {
        pid,
        comm: format!("p{pid}"),
        cgroup: Some("/system.slice/x.service".into()),
        samples,
    }
}

#[test]
fn queries() {
    assert_eq!(
        parse_query("pid=42&comm=my+app%2F1&seconds=30&gc=1&token=x"),
        Ok(Query {
            selection: Selection {
                pid: Some(42),
                comm: Some("my app/1".into()),
            },
            seconds: Some(30),
        })
    );
    assert_eq!(parse_query("").unwrap().seconds, None);
    assert_eq!(parse_query("seconds=0").unwrap().seconds, None);
    assert_eq!(parse_query("seconds=300").unwrap().seconds, Some(300));
    for bad in [
        "seconds=301",
        "seconds=-1",
        "seconds=x",
        "pid=0",
        "pid=abc",
        "comm=%zz",
        "debug=1",
    ] {
        assert!(parse_query(bad).is_err(), "{bad}");
    }
    assert!(
        parse_query("seconds=301")
            .unwrap_err()
            .contains("at most 300")
    );
}

#[test]
fn deltas_subtract_sample_by_sample() {
    let first = LiveSamples {
        processes: vec![
            process(
                1,
                vec![
                    sample(1, "a", [2, 200, 2, 200]),
                    sample(2, "b", [1, 10, 1, 10]),
                ],
            ),
            process(2, vec![sample(1, "a", [5, 50, 5, 50])]),
        ],
        sample_mean: 0,
        elapsed_s: 1.0,
    };
    let second = LiveSamples {
        processes: vec![process(
            1,
            vec![
                sample(1, "a", [5, 500, 3, 300]),
                sample(2, "b", [1, 10, 1, 10]),
                sample(3, "c", [1, 7, 1, 7]),
            ],
        )],
        sample_mean: 0,
        elapsed_s: 6.0,
    };
    let d = delta(&first, second);
    let got: Vec<(u32, u64, [i64; 4])> = d
        .processes
        .iter()
        .flat_map(|p| p.samples.iter().map(move |s| (p.pid, s.key, s.values)))
        .collect();
    assert_eq!(
        got,
        [
            (1, 1, [3, 300, 1, 100]),
            // b did nothing: left out.
            (1, 3, [1, 7, 1, 7]),
            // Process 2 is gone: what it had comes out negated.
            (2, 1, [-5, -50, -5, -50]),
        ]
    );
    assert_eq!(d.processes[1].comm, "p2");
}

#[test]
fn profiles_carry_types_labels_and_mappings() {
    let samples = LiveSamples {
        processes: vec![
            process(7, vec![sample(1, "hold_table", [1, 100000, 1, 100000])]),
            ProcessSamples {
                cgroup: None,
                ..process(8, vec![sample(1, "hold_table", [3, 30, 0, 0])])
            },
        ],
        sample_mean: 0,
        elapsed_s: 2.0,
    };
    for (kind, default) in [(Kind::Heap, "inuse_space"), (Kind::Allocs, "alloc_space")] {
        let gz = encode(&samples, kind, Duration::from_secs(2)).unwrap();
        let p = decode(&gz);
        let s = |i: i64| p.string_table[i as usize].as_str();
        let types: Vec<(&str, &str)> = p
            .sample_type
            .iter()
            .map(|t| (s(t.r#type), s(t.unit)))
            .collect();
        assert_eq!(types, SAMPLE_TYPES);
        assert_eq!(s(p.default_sample_type), default);
        assert_eq!(p.duration_nanos, 2_000_000_000);
        assert_eq!(p.sample.len(), 2);
        assert_eq!(p.sample[0].value, [1, 100000, 1, 100000]);
        let labels = |i: usize| -> Vec<(&str, &str)> {
            p.sample[i]
                .label
                .iter()
                .map(|l| (s(l.key), s(l.str)))
                .collect()
        };
        assert_eq!(
            labels(0),
            [
                ("pid", "7"),
                ("comm", "p7"),
                ("allocator", "malloc"),
                ("kind", "heap"),
                ("cgroup", "/system.slice/x.service")
            ]
        );
        assert_eq!(labels(1).len(), 4, "no cgroup known: no label");
        // The two processes' identical frames share locations and the one mapping.
        assert_eq!(p.sample[0].location_id, p.sample[1].location_id);
        assert_eq!(p.mapping.len(), 1);
        let m = &p.mapping[0];
        assert_eq!((s(m.filename), s(m.build_id)), ("/opt/app", "abcd"));
        let loc = p
            .location
            .iter()
            .find(|l| l.id == p.sample[0].location_id[0])
            .unwrap();
        assert_eq!(loc.address - m.memory_start + m.file_offset, 0x1001);
    }
}
