//! Tests of the diff, and reports written as JSON for them.

use serde_json::json;

use super::*;

/// A frame as memprof writes it: `offset` in the module's file (the same in every run).
pub(crate) fn frame(function: Option<&str>, module: Option<&str>, offset: &str) -> Value {
    json!({
        "function": function, "module": module, "file": null, "line": null,
        "offset": module.map(|_| offset), "build_id": null, "inlined": false,
        "kind": if module.is_some() { "native" } else { "unknown" },
    })
}

/// A frame as memprof wrote it before offsets: the absolute address (changing with ASLR).
pub(crate) fn old_frame(function: Option<&str>, module: Option<&str>, addr: &str) -> Value {
    json!({"function": function, "module": module, "file": null, "line": null, "addr": addr})
}

pub(crate) fn leak(
    bytes: u64,
    allocs: u64,
    allocator: &str,
    kind: &str,
    stack: Vec<Value>,
) -> Value {
    json!({
        "bytes": bytes, "allocs": allocs, "oldest_age_s": 1.5,
        "allocator": allocator, "kind": kind, "stack": stack,
    })
}

pub(crate) fn report(record: &str, outstanding: u64, mmap: u64, leaks: Vec<Value>) -> Value {
    json!({
        "type": record, "pid": 42, "elapsed_s": 3.0,
        "totals": {
            "allocs": 10, "frees": 5, "bytes_allocated": outstanding + 100,
            "bytes_freed": 100, "outstanding_allocs": 5, "outstanding_bytes": outstanding,
            "peak_outstanding_bytes": outstanding, "lost_events": 0, "unmatched_frees": 0,
            "lost_stacks": 0, "reused_addresses": 0,
        },
        "mmap": {
            "maps": 1, "unmaps": 0, "bytes_mapped": mmap, "bytes_unmapped": 0,
            "outstanding_maps": 1, "outstanding_bytes": mmap,
        },
        "leaks": leaks,
    })
}

const APP: &str = "/usr/local/bin/server";
const LIBZ: &str = "/usr/lib/x86_64-linux-gnu/libz.so.1";

/// Before: cache (steady), parse_header (grows), log (shrinks), startup (gone).
pub(crate) fn before() -> Value {
    report(
        "report",
        10_000,
        1 << 20,
        vec![
            leak(
                4_000,
                40,
                "malloc",
                "heap",
                vec![
                    frame(Some("cache_put"), Some(APP), "0x1000"),
                    frame(Some("main"), Some(APP), "0x2000"),
                ],
            ),
            leak(
                3_000,
                30,
                "realloc",
                "heap",
                vec![frame(Some("log_append"), Some(APP), "0x3000")],
            ),
            leak(
                2_000,
                10,
                "malloc",
                "heap",
                vec![
                    frame(Some("parse_header"), Some(APP), "0x4000"),
                    frame(None, Some(APP), "0x5000"),
                ],
            ),
            leak(
                1_000,
                1,
                "calloc",
                "heap",
                vec![frame(Some("startup"), Some(APP), "0x6000")],
            ),
        ],
    )
}

/// After: a new site in libz with an unnamed frame.
pub(crate) fn after() -> Value {
    report(
        "report",
        12_500,
        (1 << 20) + 4096,
        vec![
            leak(
                5_000,
                25,
                "malloc",
                "heap",
                vec![
                    frame(Some("parse_header"), Some(APP), "0x4000"),
                    frame(None, Some(APP), "0x5000"),
                ],
            ),
            leak(
                4_000,
                40,
                "malloc",
                "heap",
                vec![
                    frame(Some("cache_put"), Some(APP), "0x1000"),
                    frame(Some("main"), Some(APP), "0x2000"),
                ],
            ),
            leak(
                2_500,
                2,
                "malloc",
                "heap",
                vec![
                    frame(None, Some(LIBZ), "0x1000"),
                    frame(None, None, "0x2000"),
                ],
            ),
            leak(
                1_000,
                12,
                "realloc",
                "heap",
                vec![frame(Some("log_append"), Some(APP), "0x3000")],
            ),
        ],
    )
}

pub(crate) fn strs(labels: &[&str]) -> Vec<String> {
    labels.iter().map(|s| s.to_string()).collect()
}

#[test]
fn diff_matches_sites_across_addresses() {
    let d = diff(&before(), &after()).expect("both are reports");
    assert_eq!(d.record, "diff");
    assert_eq!(
        (
            d.outstanding_bytes_before,
            d.outstanding_bytes_after,
            d.delta_bytes
        ),
        (10_000, 12_500, 2_500)
    );
    assert_eq!(d.growth_pct, Some(25.0), "2500 of 10000");
    assert_eq!(d.mmap_delta_bytes, 4096);
    let got: Vec<_> = d
        .sites
        .iter()
        .map(|s| (s.status, s.delta_bytes, s.delta_allocs, s.stack[0].as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("grew", 3_000, 15, "parse_header"),
            ("new", 2_500, 2, "libz.so.1+0x1000"),
            ("same", 0, 0, "cache_put"),
            ("gone", -1_000, -1, "startup"),
            ("shrank", -2_000, -18, "log_append"),
        ],
        "sorted by delta_bytes descending"
    );
    assert_eq!(
        d.sites[0],
        SiteDelta {
            status: "grew",
            bytes_before: 2_000,
            bytes_after: 5_000,
            delta_bytes: 3_000,
            allocs_before: 10,
            allocs_after: 25,
            delta_allocs: 15,
            allocator: "malloc".into(),
            kind: "heap".into(),
            stack: strs(&["parse_header", "server+0x5000"]),
        }
    );
    assert_eq!(d.sites[1].stack, strs(&["libz.so.1+0x1000", "?"]));
    assert_eq!(
        (d.sites[1].bytes_before, d.sites[1].bytes_after),
        (0, 2_500)
    );
    assert_eq!(
        (d.sites[3].bytes_before, d.sites[3].bytes_after),
        (1_000, 0)
    );
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["type"], "diff");
    assert_eq!(json["sites"][0]["stack"][1], "server+0x5000");
}

#[test]
fn allocator_and_kind_are_part_of_identity() {
    let stack = || vec![frame(Some("f"), Some(APP), "0x1")];
    let a = report(
        "report",
        300,
        0,
        vec![
            leak(100, 1, "malloc", "heap", stack()),
            leak(200, 1, "mmap", "mmap", stack()),
        ],
    );
    let b = report(
        "report",
        300,
        0,
        vec![
            leak(100, 1, "calloc", "heap", stack()),
            leak(200, 1, "mmap", "mmap", stack()),
        ],
    );
    let d = diff(&a, &b).unwrap();
    let got: Vec<_> = d
        .sites
        .iter()
        .map(|s| (s.status, s.allocator.as_str(), s.delta_bytes))
        .collect();
    assert_eq!(
        got,
        vec![
            ("new", "calloc", 100),
            ("same", "mmap", 0),
            ("gone", "malloc", -100)
        ]
    );
}

#[test]
fn groups_sharing_an_identity_are_merged() {
    // Two groups whose named frames read the same (e.g. two call sites inside one function)
    // become one site; so do unnamed frames at one offset of modules with one file name. Another
    // offset is another site.
    let before = report(
        "report",
        700,
        0,
        vec![
            leak(
                300,
                3,
                "malloc",
                "heap",
                vec![frame(Some("alloc_node"), Some(APP), "0x10")],
            ),
            leak(
                400,
                1,
                "malloc",
                "heap",
                vec![frame(Some("alloc_node"), Some(APP), "0x20")],
            ),
        ],
    );
    let after = report(
        "report",
        1_050,
        0,
        vec![
            leak(
                600,
                2,
                "malloc",
                "heap",
                vec![frame(None, Some(LIBZ), "0x7f01")],
            ),
            leak(
                400,
                2,
                "malloc",
                "heap",
                vec![frame(None, Some("/opt/other/libz.so.1"), "0x7f01")],
            ),
            leak(
                50,
                1,
                "malloc",
                "heap",
                vec![frame(None, Some(LIBZ), "0x7f99")],
            ),
        ],
    );
    let d = diff(&before, &after).unwrap();
    let got: Vec<_> = d
        .sites
        .iter()
        .map(|s| {
            (
                s.status,
                s.stack.join(","),
                s.bytes_before,
                s.bytes_after,
                s.allocs_before,
                s.allocs_after,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("new", "libz.so.1+0x7f01".to_string(), 0, 1_000, 0, 4),
            ("new", "libz.so.1+0x7f99".to_string(), 0, 50, 0, 1),
            ("gone", "alloc_node".to_string(), 700, 0, 4, 0),
        ],
        "300+400 bytes merged before, 600+400 after (same module file name and offset)"
    );
}

#[test]
fn older_reports_name_unnamed_frames_by_module() {
    // Without `offset`, an absolute address (different in every run) is no identity.
    let leak_at = |addr| {
        leak(
            100,
            1,
            "malloc",
            "heap",
            vec![
                old_frame(None, Some(LIBZ), addr),
                old_frame(None, None, addr),
            ],
        )
    };
    let d = diff(
        &report("report", 100, 0, vec![leak_at("0x7f0000001000")]),
        &report("report", 100, 0, vec![leak_at("0x7f5500001000")]),
    )
    .unwrap();
    assert_eq!(d.sites.len(), 1);
    assert_eq!(d.sites[0].status, "same");
    assert_eq!(d.sites[0].stack, strs(&["libz.so.1?", "?"]));
}

#[test]
fn growth_pct_arithmetic() {
    let pct = |b, a| {
        diff(
            &report("report", b, 0, vec![]),
            &report("report", a, 0, vec![]),
        )
    };
    assert_eq!(pct(1_000, 1_500).unwrap().growth_pct, Some(50.0));
    assert_eq!(pct(1_000, 250).unwrap().growth_pct, Some(-75.0));
    assert_eq!(pct(1_000, 1_000).unwrap().growth_pct, Some(0.0));
    assert_eq!(pct(3, 4).unwrap().growth_pct, Some(100.0 / 3.0));
    let from_zero = pct(0, 500).unwrap();
    assert_eq!(from_zero.growth_pct, None, "before == 0");
    assert_eq!(from_zero.delta_bytes, 500);
    assert_eq!(pct(0, 0).unwrap().growth_pct, None);
    let json = serde_json::to_value(from_zero).unwrap();
    assert!(json["growth_pct"].is_null(), "{json}");
}

#[test]
fn delta_clamps_to_i64() {
    assert_eq!(delta(0, u64::MAX), i64::MAX);
    assert_eq!(delta(u64::MAX, 0), i64::MIN);
    assert_eq!(delta(7, 5), -2);
}

#[test]
fn grows_beyond_threshold() {
    let d = |b, a| {
        diff(
            &report("report", b, 0, vec![]),
            &report("report", a, 0, vec![]),
        )
        .unwrap()
    };
    assert!(
        !grows_beyond(&d(1_000, 1_100), 10.0),
        "exactly +10% is not beyond 10%"
    );
    assert!(!grows_beyond(&d(1_000, 1_099), 10.0), "+9.9% is below 10%");
    assert!(grows_beyond(&d(1_000, 1_101), 10.0), "+10.1% is beyond 10%");
    assert!(
        !grows_beyond(&d(1_000, 900), 10.0),
        "shrinking never fails the gate"
    );
    assert!(
        grows_beyond(&d(1_000, 1_001), 0.0),
        "any growth is beyond 0%"
    );
    assert!(
        !grows_beyond(&d(1_000, 1_000), 0.0),
        "no growth is not beyond 0%"
    );
    assert!(
        grows_beyond(&d(0, 1), 1e9),
        "from 0 to 1 byte is beyond any pct"
    );
    assert!(!grows_beyond(&d(0, 0), 0.0), "0 to 0 is no growth");
}

#[test]
fn diff_rejects_non_reports() {
    let err = diff(&json!({"type": "start", "pid": 1}), &before()).unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "first report: not a memprof report or snapshot (\"type\" is \"start\")"
    );
    let mut broken = after();
    broken["leaks"][2]
        .as_object_mut()
        .unwrap()
        .remove("allocator");
    let err = diff(&before(), &broken).unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "second report: leaks[2]: no string \"allocator\""
    );
    let mut no_mmap = after();
    no_mmap.as_object_mut().unwrap().remove("mmap");
    let err = diff(&before(), &no_mmap).unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "second report: no unsigned integer at mmap.outstanding_bytes"
    );
}

#[test]
fn diff_of_snapshots() {
    let d = diff(
        &report("snapshot", 10, 0, vec![]),
        &report("report", 30, 0, vec![]),
    )
    .unwrap();
    assert_eq!(d.delta_bytes, 20);
}
