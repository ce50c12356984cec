use memprof_common::{AllocFn, NO_STACK};

use super::*;
use crate::{
    ingest::event::{Alloc, Event},
    stacks::sites::tests::native,
};

pub(crate) fn alloc(addr: u64, size: u64, stack: u64, ts_ns: u64) -> Event {
    Event::Alloc(Alloc {
        tid: 1,
        func: AllocFn::Malloc,
        mmap: false,
        addr,
        size,
        stack,
        ts_ns,
    })
}

/// No residency scan (a shared empty map: `Inputs` borrows it).
pub(crate) fn empty_residency() -> &'static HashMap<u32, Residency> {
    static EMPTY: std::sync::OnceLock<HashMap<u32, Residency>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(HashMap::new)
}

pub(crate) fn inputs<'a>(
    table: &'a Tables,
    sites: &'a Sites,
    tracker: &'a Tracker,
    min_age_ns: u64,
) -> Inputs<'a> {
    Inputs {
        pid: 42,
        table,
        sites,
        kernel: KernelLosses {
            ring_full: 2,
            inflight_full: 1,
            stack_lost: 4,
            orphan_returns: 0,
            processes_missed: 0,
            mapping_records_lost: 0,
            sampled_full: 0,
            kmem_full: 0,
        },
        probe_stats: Vec::new(),
        decode_errors: 0,
        unread_at_end: 5,
        now_ns: 10_000_000_000,
        elapsed_s: 1.5,
        min_age_ns,
        top: None,
        tracker,
        residency: empty_residency(),
        rss_timeline: &[],
        unwind: None,
        forgotten: Forgotten::default(),
        limit: None,
        rules: &[],
        mem: None,
    }
}

/// Sites for stack keys 1 (`f` in `/opt/app`) and 2 (`g`).
fn two_sites() -> Sites {
    let mut sites = Sites::new();
    sites.intern(1, &[native(Some("f"), Some(10), 0x1010)]);
    sites.intern(2, &[native(Some("g"), Some(20), 0x1020)]);
    sites
}

#[test]
fn groups_by_site_sorted_by_bytes_with_age_filter() {
    let mut table = Tables::default();
    table.apply(&alloc(0x10, 100, 1, 1_000_000_000));
    table.apply(&alloc(0x20, 100, 1, 9_000_000_000));
    table.apply(&alloc(0x30, 500, 2, 2_000_000_000));
    table.apply(&alloc(0x40, 7, NO_STACK, 2_000_000_000));
    let sites = two_sites();
    let tracker = Tracker::new(&[], 0);
    let r = snapshot(&inputs(&table, &sites, &tracker, 0));
    let got: Vec<_> = r
        .leaks
        .iter()
        .map(|l| (l.bytes, l.allocs, l.oldest_age_s))
        .collect();
    assert_eq!(got, vec![(500, 1, 8.0), (200, 2, 9.0), (7, 1, 8.0)]);
    // Ring full 2, state map full 1, left unread at the end 5.
    assert_eq!(r.totals.lost_events, 8);
    assert_eq!(r.totals.unread_at_end, 5);
    assert_eq!(r.totals.lost_stacks, 4);
    // Only allocations at least 5 s old: the young block of stack 1 drops out.
    let r = snapshot(&inputs(&table, &sites, &tracker, 5_000_000_000));
    let got: Vec<_> = r.leaks.iter().map(|l| (l.bytes, l.allocs)).collect();
    assert_eq!(got, vec![(500, 1), (100, 1), (7, 1)]);
    assert_eq!(r.leak_groups, 3);
}

#[test]
fn json_has_contract_fields() {
    let mut table = Tables::default();
    table.apply(&alloc(0x10, 64, NO_STACK, 1));
    let sites = Sites::new();
    let tracker = Tracker::new(&[], 0);
    let r = finish(
        snapshot(&inputs(&table, &sites, &tracker, 0)),
        true,
        Some(3),
    );
    let v: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(v["type"], "report");
    for key in [
        "allocs",
        "frees",
        "bytes_allocated",
        "bytes_freed",
        "outstanding_allocs",
        "outstanding_bytes",
        "peak_outstanding_bytes",
        "lost_events",
        "unmatched_frees",
    ] {
        assert!(v["totals"][key].is_u64(), "totals.{key} missing in {v}");
    }
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["exited"], true);
    let leak = &v["leaks"][0];
    assert_eq!(leak["bytes"], 64);
    assert_eq!(leak["allocs"], 1);
    assert_eq!(leak["allocator"], "malloc");
    assert!(leak["oldest_age_s"].is_f64());
    assert!(leak["stack"].is_array());
}

/// Two stack keys of one site (two return addresses on one line) and a third of another
/// site: the tracker and every report count the first two as one group, exactly.
#[test]
fn stack_keys_of_one_site_are_one_group() {
    let mut sites = two_sites();
    // Stack 3: `f` at the same line from another return address.
    let f = sites.intern(3, &[native(Some("f"), Some(10), 0x1008)]);
    assert_eq!(f, sites.site_of(1));
    let mut table = Tables::default();
    let mut tracker = Tracker::new(&[], 0);
    let events = [
        alloc(0x10, 100, 1, 1_000_000_000),
        alloc(0x20, 300, 3, 2_000_000_000),
        alloc(0x30, 50, 2, 3_000_000_000),
        alloc(0x40, 40, 3, 3_500_000_000),
        Event::Free {
            tid: 1,
            func: AllocFn::Free,
            addr: 0x10,
            ts_ns: 4_000_000_000,
        },
    ];
    for (i, e) in events.iter().enumerate() {
        let mut changes = Vec::new();
        table.apply_from(0, e, &mut |c| changes.push(c));
        let outstanding = table.heap_totals.outstanding_bytes;
        for c in changes {
            tracker.on_change(&c, sites.site_of(c.block().stack), outstanding);
        }
        tracker.sample(i as u64 * 1_000_000_000, outstanding, None);
    }
    let inputs = inputs(&table, &sites, &tracker, 0);
    let r = snapshot(&inputs);
    let leaks: Vec<_> = r
        .leaks
        .iter()
        .map(|l| (l.stack[0].function.as_deref(), l.bytes, l.allocs))
        .collect();
    assert_eq!(leaks, [(Some("f"), 340, 2), (Some("g"), 50, 1)]);
    assert_eq!(r.leak_groups, 2);
    assert_eq!(
        r.leaks[0].stack[0].offset,
        Some(0x1008),
        "the lowest offset"
    );
    let b = r.leaks[0].behaviour.as_ref().unwrap();
    assert_eq!((b.allocs_total, b.frees_total), (3, 1));
    assert_eq!((r.unknown_frames, r.stack_frames), (0, 2));
    let p = profile(&inputs, &r, &[]);
    let got: Vec<_> = p
        .sites
        .iter()
        .map(|s| {
            (
                s.stack[0].function.as_deref(),
                s.alloc_bytes,
                s.alloc_objects,
                s.frees,
                s.inuse_bytes,
                s.max_inuse_bytes,
            )
        })
        .collect();
    // f held 100 + 300, then 100 + 300 + 40, then 340 after the free: its peak is the
    // sum of blocks from both stack keys.
    assert_eq!(
        got,
        [
            (Some("f"), 440, 3, 1, 340, 440),
            (Some("g"), 50, 1, 0, 50, 50)
        ]
    );
    let key = (f, AllocFn::Malloc, false);
    let points: Vec<f64> = tracker.groups[&key]
        .series
        .points()
        .iter()
        .map(|p| p.1)
        .collect();
    assert_eq!(points, [100.0, 400.0, 400.0, 440.0, 340.0]);
}
