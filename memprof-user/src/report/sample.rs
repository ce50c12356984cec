//! A profile shaped like the outputs.c fixture, for the unit tests of every writer.

use super::{
    Frame, HeapTotals, KernelLosses, MmapTotals, Profile, Report, RssExplained, RssPoint, Site,
    TimePoint, Totals, Verdict,
};

/// The executable of the sample profile, and its build id (libc's is not known).
pub(crate) const APP: &str = "/opt/app";
pub(crate) const APP_BUILD_ID: &str = "0123456789abcdef0123456789abcdef01234567";

pub(crate) fn frame(
    function: Option<&str>,
    module: Option<&str>,
    line: Option<u32>,
    offset: u64,
) -> Frame {
    Frame {
        function: function.map(str::to_owned),
        module: module.map(str::to_owned),
        file: line.map(|_| "/src/outputs.c".to_owned()),
        line,
        offset: module.map(|_| offset),
        build_id: (module == Some(APP)).then(|| APP_BUILD_ID.to_owned()),
        inlined: false,
        kind: if module.is_some() {
            "native"
        } else {
            "unknown"
        },
    }
}

pub(crate) fn site(stack: Vec<Frame>, allocator: &'static str, kind: &'static str) -> Site {
    Site {
        stack,
        allocator,
        kind,
        alloc_objects: 0,
        alloc_bytes: 0,
        inuse_objects: 0,
        inuse_bytes: 0,
        resident_bytes: None,
        max_inuse_bytes: 0,
        max_inuse_objects: 0,
        frees: 0,
        freed_lifetime_ns: 0,
        bytes_at_peak: 0,
        objects_at_peak: 0,
        verdict: Verdict::Unknown,
        verdict_reason: None,
        growth_bytes_per_s: 0.0,
        first_alloc_ns: 0,
        last_alloc_ns: 0,
    }
}

/// A profile shaped like the outputs.c fixture, shared by the writers' unit tests:
/// `leak_widgets` (7 x 3000 B, all in use), an mmap site whose function name needs escaping
/// everywhere, a site without a stack (1 x 64 B) and `churn_buffers` (210 x 128 B, all freed).
pub(crate) fn sample_profile() -> Profile {
    const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    let main = |line, addr| frame(Some("main"), Some(APP), Some(line), addr);
    let leak = Site {
        alloc_objects: 7,
        alloc_bytes: 21000,
        inuse_objects: 7,
        inuse_bytes: 21000,
        max_inuse_bytes: 21000,
        max_inuse_objects: 7,
        bytes_at_peak: 18000,
        objects_at_peak: 6,
        verdict: Verdict::Leak,
        growth_bytes_per_s: 1500.25,
        first_alloc_ns: 100_000_000,
        last_alloc_ns: 1_900_000_000,
        ..site(
            vec![
                frame(Some("leak_widgets"), Some(APP), Some(47), 0x1296),
                main(87, 0x10e7),
                frame(None, Some(LIBC), None, 0x2_7234),
            ],
            "malloc",
            "heap",
        )
    };
    let odd = Site {
        alloc_objects: 1,
        alloc_bytes: 4096,
        inuse_objects: 1,
        inuse_bytes: 4096,
        max_inuse_bytes: 4096,
        max_inuse_objects: 1,
        verdict: Verdict::Stable,
        first_alloc_ns: 500_000_000,
        last_alloc_ns: 500_000_000,
        ..site(
            vec![
                frame(Some("map<int, \"q\">::grow;now"), Some(APP), None, 0x2000),
                main(95, 0x1100),
            ],
            "mmap",
            "mmap",
        )
    };
    let nostack = Site {
        alloc_objects: 1,
        alloc_bytes: 64,
        inuse_objects: 1,
        inuse_bytes: 64,
        max_inuse_bytes: 64,
        max_inuse_objects: 1,
        bytes_at_peak: 64,
        objects_at_peak: 1,
        first_alloc_ns: 10_000_000,
        last_alloc_ns: 10_000_000,
        ..site(vec![], "calloc", "heap")
    };
    let churn = Site {
        alloc_objects: 210,
        alloc_bytes: 26880,
        max_inuse_bytes: 128,
        max_inuse_objects: 1,
        frees: 210,
        freed_lifetime_ns: 2_100_000,
        verdict: Verdict::Churn,
        first_alloc_ns: 100_000_000,
        last_alloc_ns: 1_900_000_000,
        ..site(
            vec![
                frame(Some("churn_buffers"), Some(APP), Some(60), 0x1309),
                main(90, 0x113b),
            ],
            "malloc",
            "heap",
        )
    };
    let heap = HeapTotals {
        allocs: 219,
        frees: 210,
        bytes_allocated: 47944,
        bytes_freed: 26880,
        outstanding_allocs: 8,
        outstanding_bytes: 21064,
        peak_outstanding_bytes: 21192,
        ..HeapTotals::default()
    };
    let report = Report {
        elapsed_s: 2.0,
        duration_s: Some(2.0),
        exited: Some(true),
        exit_code: Some(Some(0)),
        leak_groups: 3,
        unknown_frames: 1,
        stack_frames: 7,
        leak_detected: true,
        growth_rate_mb_per_hour: Some(5.4),
        ..report("report", 4242, heap, 3, 1)
    };
    Profile {
        pid: 4242,
        command: vec!["./outputs".into(), "<b>&co".into()],
        duration_s: 2.0,
        peak_t_s: 1.5,
        sites: vec![leak, odd, nostack, churn],
        timeline: (0..5)
            .map(|i| TimePoint {
                t_s: i as f64 * 0.5,
                heap_bytes: 3000 * i,
                rss_bytes: Some(1_000_000 + 4096 * i),
            })
            .collect(),
        rss_timeline: (0..3)
            .map(|i| RssPoint {
                t_s: 0.5 + i as f64 * 0.5,
                rss: rss_explained(i),
            })
            .collect(),
        report,
    }
}

/// RSS explained at step `i`: 1 MB + 4096 i resident, split exactly.
pub(crate) fn rss_explained(i: u64) -> RssExplained {
    RssExplained {
        rss_bytes: 1_000_000 + 4096 * i,
        live_resident_bytes: 300_000 + 4096 * i,
        allocator_retained_bytes: 200_000,
        untouched_live_bytes: 50_000,
        other_resident_bytes: 500_000,
        allocator_regions: 2,
        allocator_region_bytes: 2_000_000,
        unscanned_bytes: 0,
    }
}

/// A report holding `heap` with `lost_events` and `lost_stacks`, every other field zero or
/// empty.
pub(crate) fn report(
    record: &'static str,
    pid: u32,
    heap: HeapTotals,
    lost_events: u64,
    lost_stacks: u64,
) -> Report {
    Report {
        record,
        pid,
        elapsed_s: 0.0,
        duration_s: None,
        exited: None,
        exit_code: None,
        sampling: None,
        totals: Totals {
            heap,
            lost_events,
            unread_at_end: 0,
            lost_stacks,
        },
        mmap: MmapTotals::default(),
        kernel: KernelLosses::default(),
        probe_stats: Vec::new(),
        min_age_s: 0.0,
        leak_groups: 0,
        unknown_frames: 0,
        stack_frames: 0,
        leak_detected: false,
        growth_rate_mb_per_hour: None,
        growth_rate_note: None,
        peak: Default::default(),
        projected_limit_hours: None,
        rss_bytes: None,
        pss_bytes: None,
        vm_size_bytes: None,
        untraced_bytes: None,
        rss_explained: None,
        phases: vec![],
        categories: vec![],
        recommendations: vec![],
        churn_hotspots: vec![],
        leaks: vec![],
        processes: None,
        unwind: None,
        forgotten: Default::default(),
        kept: None,
        python: None,
    }
}
