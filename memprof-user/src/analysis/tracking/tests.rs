use super::*;
use crate::table::LiveAlloc;

/// The site of the blocks `alloc` and `free` make.
const SITE: SiteId = SiteId::new(7);

fn block(size: u64, stack: u64) -> LiveAlloc {
    LiveAlloc {
        size,
        ts_ns: 1_000,
        stack,
        func: AllocFn::Malloc,
        chain: 0,
    }
}

fn alloc(size: u64, tid: u32) -> Change {
    Change::Alloc {
        block: block(size, 7),
        tid,
        mmap: false,
        count: 1,
    }
}

fn free(size: u64, tid: u32) -> Change {
    Change::Free {
        block: block(size, 7),
        bytes: size,
        whole: true,
        tid,
        ts_ns: 2_000,
        mmap: false,
        count: 1,
    }
}

#[test]
fn function_phase_counts_only_its_threads_and_its_peak() {
    let mut t = Tracker::new(&["render".to_string()], 0);
    let mut outstanding = 0;
    let mut apply = |t: &mut Tracker, c: Change, delta: i64| {
        outstanding = (outstanding as i64 + delta) as u64;
        t.on_change(&c, SITE, outstanding);
    };
    apply(&mut t, alloc(500, 2), 500); // outside the phase
    t.on_phase(1, 0, true, 500);
    apply(&mut t, alloc(100, 1), 100);
    apply(&mut t, alloc(200, 1), 200);
    apply(&mut t, free(100, 1), -100);
    t.on_phase(1, 0, false, 700);
    apply(&mut t, alloc(5000, 1), 5000); // after the phase
    let p = &t.phases(0)[0];
    assert_eq!(
        (p.allocs, p.frees, p.bytes_allocated, p.bytes_freed),
        (2, 1, 300, 100)
    );
    assert_eq!((p.net_bytes, p.peak_net_bytes), (200, 300));
    assert_eq!(p.peak_outstanding_bytes, 800, "peak while active, not 5700");
    assert_eq!(p.entries, 1);
    assert_eq!((p.outstanding_bytes, p.outstanding_allocs), (200, 1));
}

#[test]
fn phase_outstanding_follows_its_blocks_and_python_phases_come_last() {
    let mut t = Tracker::new(&["load".to_string()], 0);
    t.add_python_phases(&["render".to_string()]);
    let other = SiteId::new(8);
    t.on_phase(1, 1, true, 0);
    t.on_change(&alloc(300, 1), SITE, 300);
    t.on_phase(1, 1, false, 300);
    // Freed outside the phase, by another thread: no longer outstanding in it, but not
    // one of its frees either.
    t.on_change(&free(300, 2), SITE, 0);
    t.on_phase(1, 1, true, 0);
    t.on_change(&alloc(40, 1), SITE, 40);
    t.on_change(&alloc(2, 1), other, 42);
    t.on_phase(1, 1, false, 42);
    t.on_change(&alloc(7, 1), SITE, 49); // after the phase
    let phases = t.phases(0);
    assert_eq!(
        phases
            .iter()
            .map(|p| (p.name.as_str(), p.kind))
            .collect::<Vec<_>>(),
        [("load", "function"), ("render", "python")]
    );
    let r = &phases[1];
    assert_eq!(
        (r.allocs, r.frees, r.bytes_allocated, r.net_bytes, r.entries),
        (3, 0, 342, 342, 2)
    );
    assert_eq!((r.outstanding_bytes, r.outstanding_allocs), (42, 2));
    assert_eq!(
        phases[0],
        PhaseReport {
            name: "load".to_string(),
            kind: "function",
            ..PhaseReport::default()
        }
    );
}

/// The trace's peak and each phase's, with what each site held then: a temporary buffer
/// freed before the end makes the global peak; a later mark peaks on the cache.
#[test]
fn peaks_of_the_trace_and_of_phases() {
    let cache = SiteId::new(1);
    let temp = SiteId::new(2);
    let at = |size: u64, ts_ns: u64| LiveAlloc {
        size,
        ts_ns,
        stack: 0,
        func: AllocFn::Malloc,
        chain: 0,
    };
    let alloc = |block| Change::Alloc {
        block,
        tid: 1,
        mmap: false,
        count: 1,
    };
    let mut t = Tracker::new(&["build".to_string()], 0).with_peaks(0, true);
    let mut held = 0;
    let mut change = |t: &mut Tracker, c: Change, site| {
        held = match c {
            Change::Alloc { block, .. } => held + block.size,
            Change::Free { bytes, .. } => held - bytes,
        };
        t.on_change_in(7, &c, site, held);
    };
    t.on_phase(1, 0, true, 0);
    for i in 0..10 {
        change(&mut t, alloc(at(1000, 10 + i)), cache);
    }
    let buf = at(1 << 20, 30);
    change(&mut t, alloc(buf), temp);
    change(
        &mut t,
        Change::Free {
            block: buf,
            bytes: 1 << 20,
            whole: true,
            tid: 1,
            ts_ns: 40,
            mmap: false,
            count: 1,
        },
        temp,
    );
    t.on_phase(1, 0, false, 10_000);
    t.mark("serve", 50, 10_000);
    for i in 0..300 {
        change(&mut t, alloc(at(1000, 60 + i)), cache);
    }
    t.sample(1_000, 310_000, None);
    let sites = |s: &Snapshot<GroupKey>| {
        let mut v: Vec<(SiteId, u64, u64)> = s
            .sites
            .iter()
            .map(|(k, h)| (k.0, h.bytes, h.blocks))
            .collect();
        v.sort_unstable();
        v
    };
    let peak = t.peak();
    assert_eq!(
        (peak.total.bytes, peak.total.blocks, peak.at_ns),
        (1_058_576, 11, 30)
    );
    assert_eq!(sites(&peak), [(cache, 10_000, 10), (temp, 1_048_576, 1)]);
    assert_eq!(sites(&t.process_peak(7).unwrap()), sites(&peak));
    let phases = t.phase_peaks();
    assert_eq!(phases.len(), 2);
    let build = phases[0].as_ref().unwrap();
    assert_eq!(sites(build), sites(&peak), "build held the global peak");
    let serve = phases[1].as_ref().unwrap();
    assert_eq!(serve.total.bytes, 310_000);
    assert_eq!(sites(serve), [(cache, 310_000, 310)]);
    assert_eq!(
        t.peak_slots(),
        4,
        "two sites, in the trace's peak and process 7's"
    );
}

#[test]
fn marks_split_time_and_close_at_end() {
    let mut t = Tracker::new(&[], 0);
    // Blocks as the kernel stamps them, allocated at 1.5 s and 2.5 s.
    let at = |c: Change, ts_ns| match c {
        Change::Alloc {
            mut block,
            tid,
            mmap,
            count,
        } => {
            block.ts_ns = ts_ns;
            Change::Alloc {
                block,
                tid,
                mmap,
                count,
            }
        }
        Change::Free {
            mut block,
            bytes,
            whole,
            tid,
            ts_ns: freed_ns,
            mmap,
            count,
        } => {
            block.ts_ns = ts_ns;
            Change::Free {
                block,
                bytes,
                whole,
                tid,
                ts_ns: freed_ns,
                mmap,
                count,
            }
        }
    };
    t.mark("load", 1_000_000_000, 0);
    t.on_change(&at(alloc(64, 9), 1_500_000_000), SITE, 64);
    t.mark("render", 2_000_000_000, 64);
    t.on_change(&at(alloc(32, 3), 2_500_000_000), SITE, 96);
    t.on_change(&at(free(64, 3), 1_500_000_000), SITE, 32);
    let phases = t.phases(5_000_000_000);
    let got: Vec<_> = phases
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.bytes_allocated,
                p.net_bytes,
                p.start_s,
                p.end_s,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("load", 64, 64, Some(1.0), Some(2.0)),
            ("render", 32, -32, Some(2.0), Some(5.0)),
        ]
    );
    assert_eq!(phases[1].peak_outstanding_bytes, 96);
    // The 64 B block of `load`, freed in `render`: still `load`'s, and freed.
    assert_eq!(
        phases
            .iter()
            .map(|p| (p.outstanding_bytes, p.outstanding_allocs))
            .collect::<Vec<_>>(),
        [(0, 0), (32, 1)]
    );
}

#[test]
fn prune_forgets_idle_empty_groups_oldest_first() {
    let mut t = Tracker::new(&[], 0);
    for stack in 1..=4u64 {
        let block = LiveAlloc {
            size: 10,
            ts_ns: stack * 1_000,
            stack,
            func: AllocFn::Malloc,
            chain: 0,
        };
        t.on_change(
            &Change::Alloc {
                block,
                count: 1,
                tid: 1,
                mmap: false,
            },
            SiteId::new(stack as u32),
            10,
        );
        // Groups 1..=3 end empty; group 4 keeps its block.
        if stack != 4 {
            t.on_change(
                &Change::Free {
                    block,
                    count: 1,
                    bytes: 10,
                    whole: true,
                    tid: 1,
                    ts_ns: stack * 1_000 + 1,
                    mmap: false,
                },
                SiteId::new(stack as u32),
                0,
            );
        }
    }
    assert_eq!(t.prune(4, 10_000, 0), 0, "within the limit");
    assert_eq!(t.prune(2, 10_000, 0), 2);
    let mut left: Vec<SiteId> = t.groups.keys().map(|k| k.0).collect();
    left.sort_unstable();
    assert_eq!(
        left,
        [SiteId::new(3), SiteId::new(4)],
        "the oldest idle empty groups go; the one holding a block stays"
    );
    assert_eq!(t.prune(0, 10_000, 1_000_000), 0, "not idle long enough");
}

#[test]
fn samples_feed_group_series() {
    let mut t = Tracker::new(&[], 0);
    for i in 0..10u64 {
        t.on_change(&alloc(1000, 1), SITE, 1000 * (i + 1));
        t.sample(i * 1_000_000_000, 1000 * (i + 1), Some(4096 * (i + 1)));
    }
    let key = (SITE, AllocFn::Malloc, false);
    assert_eq!(t.groups[&key].series.points().len(), 10);
    let slope = t.heap_slope().unwrap();
    assert!((slope - 1000.0).abs() < 1e-6, "{slope}");
    assert!((t.rss_slope().unwrap() - 4096.0).abs() < 1e-6);
    assert!(t.growth(&key).is_some());
}
