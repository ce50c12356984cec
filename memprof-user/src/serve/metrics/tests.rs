use std::sync::Arc;

use super::*;
use crate::report::{Frame, HeapTotals, MmapTotals, Report, TimePoint, sample};

pub fn frame(function: Option<&str>) -> Frame {
    Frame {
        function: function.map(str::to_owned),
        module: Some("/usr/bin/app".into()),
        file: None,
        line: None,
        offset: Some(0x1234),
        build_id: None,
        inlined: false,
        kind: "native",
    }
}

pub fn site(function: &str, allocator: &'static str, bytes: u64, verdict: Verdict) -> Site {
    Site {
        stack: vec![frame(Some(function)), frame(Some("main"))],
        allocator,
        kind: "heap",
        alloc_objects: 3,
        alloc_bytes: bytes * 2,
        inuse_objects: 2,
        inuse_bytes: bytes,
        resident_bytes: Some(bytes / 2),
        max_inuse_bytes: bytes,
        max_inuse_objects: 2,
        frees: 1,
        freed_lifetime_ns: 10,
        bytes_at_peak: bytes,
        objects_at_peak: 2,
        verdict,
        verdict_reason: None,
        growth_bytes_per_s: bytes as f64 / 100.0,
        first_alloc_ns: 0,
        last_alloc_ns: 5,
    }
}

pub fn profile(sites: Vec<Site>) -> Profile {
    let heap = HeapTotals {
        allocs: 10,
        frees: 4,
        bytes_allocated: 5000,
        bytes_freed: 1000,
        outstanding_allocs: 6,
        outstanding_bytes: 4000,
        peak_outstanding_bytes: 4500,
        unmatched_frees: 2,
        inherited_frees: 1,
        reused_addresses: 0,
    };
    let report = Report {
        elapsed_s: 3.0,
        mmap: MmapTotals {
            outstanding_bytes: 8192,
            ..MmapTotals::default()
        },
        leak_groups: sites.len(),
        leak_detected: true,
        growth_rate_mb_per_hour: Some(3.6),
        projected_limit_hours: Some(Some(2.0)),
        rss_bytes: Some(1 << 20),
        rss_explained: Some(sample::rss_explained(0)),
        kept: Some(crate::report::Kept {
            processes: 3,
            blocks: 6,
            own_rss_bytes: 1 << 22,
            ..Default::default()
        }),
        ..sample::report("snapshot", 42, heap, 7, 1)
    };
    Profile {
        pid: 42,
        command: vec!["app".into()],
        duration_s: 3.0,
        peak_t_s: 1.0,
        sites,
        timeline: vec![
            TimePoint {
                t_s: 0.5,
                heap_bytes: 1000,
                rss_bytes: Some(4096),
            },
            TimePoint {
                t_s: 1.0,
                heap_bytes: 4000,
                rss_bytes: None,
            },
        ],
        rss_timeline: Vec::new(),
        report,
    }
}

fn sample<'a>(body: &'a str, series: &str) -> Option<&'a str> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
}

#[test]
fn before_the_first_update_only_up_0() {
    let body = encode(LiveState::default(), None);
    assert_eq!(
        body,
        "# HELP memprof_up Whether memprof has published trace state (1) or not yet (0)\n\
         # TYPE memprof_up gauge\nmemprof_up 0\n# EOF\n"
    );
}

#[test]
fn profile_metrics() {
    let sites = vec![
        site("big", "malloc", 3000, Verdict::Stable),
        site("small", "calloc", 700, Verdict::Growing),
        site("small", "calloc", 300, Verdict::Leak),
        site("gone", "malloc", 0, Verdict::Churn),
    ];
    let state = LiveState {
        profile: Some(Arc::new(profile(sites))),
        updates: 3,
        finished: false,
        profiles: None,
    };
    let body = encode(state, Some(1 << 30));
    let p = "{pid=\"42\"}";
    let expect = [
        ("memprof_up", "1"),
        ("memprof_heap_outstanding_bytes", "4000"),
        ("memprof_heap_outstanding_allocations", "6"),
        ("memprof_heap_peak_outstanding_bytes", "4500"),
        ("memprof_heap_allocated_bytes_total", "5000"),
        ("memprof_heap_freed_bytes_total", "1000"),
        ("memprof_allocations_total", "10"),
        ("memprof_frees_total", "4"),
        ("memprof_mmap_outstanding_bytes", "8192"),
        ("memprof_rss_bytes", "1048576"),
        ("memprof_heap_growth_bytes_per_second", "1000.0"),
        ("memprof_lost_events_total", "7"),
        ("memprof_lost_stacks_total", "1"),
        ("memprof_unmatched_frees_total", "2"),
        ("memprof_inherited_frees_total", "1"),
        ("memprof_leak_detected", "1"),
        ("memprof_rss_limit_bytes", "1073741824"),
        ("memprof_rss_limit_projected_seconds", "7200.0"),
    ];
    for (name, value) in expect {
        let series = format!("{name}{p}");
        assert_eq!(sample(&body, &series), Some(value), "{series} in\n{body}");
    }
    // One series per label value of a family.
    let family = |name: &str, label: &str, values: &[(&str, &str)]| {
        for (key, value) in values {
            let series = format!("{name}{{pid=\"42\",{label}=\"{key}\"}}");
            assert_eq!(sample(&body, &series), Some(*value), "{series} in\n{body}");
        }
    };
    // What memprof keeps: every table, zero or not.
    family(
        "memprof_agent_kept",
        "what",
        &[
            ("processes", "3"),
            ("blocks", "6"),
            ("stacks", "0"),
            ("own_rss_bytes", "4194304"),
        ],
    );
    assert!(body.contains("# TYPE memprof_heap_allocated_bytes counter\n"));
    assert!(body.contains("# UNIT memprof_heap_outstanding_bytes bytes\n"));
    assert!(body.ends_with("# EOF\n"));
    // Merged by name: the worst verdict, summed bytes; empty sites left out.
    let small = "{pid=\"42\",site=\"small\",allocator=\"calloc\",kind=\"heap\",verdict=\"leak\"}";
    assert_eq!(
        sample(&body, &format!("memprof_site_outstanding_bytes{small}")),
        Some("1000")
    );
    assert_eq!(
        sample(
            &body,
            &format!("memprof_site_growth_bytes_per_second{small}")
        ),
        Some("10.0")
    );
    assert!(body.contains("site=\"big\""));
    assert!(!body.contains("site=\"gone\""));
    // RSS explained, and the sites' resident bytes (half of each: 500 of small's 1000).
    family(
        "memprof_rss_explained_bytes",
        "part",
        &[
            ("live", "300000"),
            ("retained", "200000"),
            ("other", "500000"),
            ("untouched", "50000"),
        ],
    );
    assert_eq!(
        sample(&body, &format!("memprof_site_resident_bytes{small}")),
        Some("500")
    );
}

#[test]
fn site_cardinality_is_bounded() {
    let sites: Vec<Site> = (0..50)
        .map(|i| site(&format!("f{i}"), "malloc", 100 + i, Verdict::Stable))
        .collect();
    let top = top_sites(&sites, TOP_SITES);
    assert_eq!(top.len(), 10);
    assert_eq!(top[0].site, "f49");
    let body = encode(
        LiveState {
            profile: Some(Arc::new(profile(sites))),
            updates: 1,
            finished: false,
            profiles: None,
        },
        None,
    );
    assert_eq!(
        body.lines()
            .filter(|l| l.starts_with("memprof_site_outstanding_bytes{"))
            .count(),
        10
    );
    assert!(!body.contains("memprof_rss_limit_bytes"));
}

#[test]
fn site_names() {
    let mut s = site("f", "malloc", 1, Verdict::Stable);
    s.stack = vec![frame(None), frame(Some("caller"))];
    assert_eq!(site_label(&s), "caller");
    s.stack = vec![frame(None)];
    assert_eq!(site_label(&s), "app+0x1234");
    s.stack.clear();
    assert_eq!(site_label(&s), "(no stack)");
    s.stack = vec![frame(Some(&"x".repeat(300)))];
    assert_eq!(site_label(&s).len(), 203);
}
