//! Building reports from the table, the analytics state and the stacks: the snapshot and final
//! report records, the per-process entries of a multi-process trace, and the [`Profile`] the
//! output writers take.

use std::collections::HashMap;

use super::{
    Forgotten, Hotspot, Leak, ProcessReport, Profile, Report, Sampling, Site, TimePoint, Totals,
    UnwindStats, names::group_name,
};
use crate::{
    analysis::{
        categories::{self, GroupRef, Rule},
        growth::{self, Verdict},
        memory,
        recommend::{self, Recommendation, SiteFacts},
        tracking::{GroupKey, Tracker},
    },
    probe::{KernelLosses, ProbeStat},
    stacks::{Frame, Sites},
    sys::procmem::ProcMem,
    table::{LiveAlloc, Table, Tables, sample_count},
};

/// Hotspots listed: at most this many, each with at least `HOTSPOT_MIN_ALLOCS` allocations of
/// which at least 90% were freed.
const HOTSPOTS: usize = 5;
const HOTSPOT_MIN_ALLOCS: u64 = 1000;

/// Everything a report is made from.
pub struct Inputs<'a> {
    pub pid: u32,
    pub table: &'a Tables,
    /// The call sites every stack key seen was mapped to (see `stacks::sites`).
    pub sites: &'a Sites,
    pub kernel: KernelLosses,
    /// `--probe-stats` (empty without).
    pub probe_stats: Vec<ProbeStat>,
    pub decode_errors: u64,
    /// CLOCK_MONOTONIC now, in ns (the clock of the kernel's timestamps).
    pub now_ns: u64,
    pub elapsed_s: f64,
    pub min_age_ns: u64,
    pub top: Option<usize>,
    pub tracker: &'a Tracker,
    /// `--unwind dwarf` counts (None with frame pointers).
    pub unwind: Option<UnwindStats>,
    /// Exited processes no longer reported, and idle call-site groups forgotten, to keep
    /// memory bounded on long multi-process traces.
    pub forgotten: Forgotten,
    /// `--limit` in bytes.
    pub limit: Option<u64>,
    /// `--category` rules.
    pub rules: &'a [Rule],
    /// The process's memory now (None once it exited).
    pub mem: Option<ProcMem>,
}

#[derive(Default)]
struct Group {
    bytes: u64,
    allocs: u64,
    oldest_ns: u64,
}

/// Builds a snapshot record; [`finish`] turns one into the final report.
pub fn snapshot(inputs: &Inputs<'_>) -> Report {
    let ranked = ranked_groups(
        inputs,
        inputs.table.heap_blocks().map(|(_, b)| b),
        inputs.table.map_regions().map(|(_, b)| *b),
    );
    let leak_groups = ranked.len();

    // Categories cover every group, before `--top`.
    let framed: Vec<(u64, u64, Vec<Frame>)> = ranked
        .iter()
        .map(|((site, _, _), g)| (g.bytes, g.allocs, inputs.sites.frames(*site)))
        .collect();
    let refs: Vec<GroupRef<'_>> = framed
        .iter()
        .map(|(bytes, allocs, frames)| GroupRef {
            bytes: *bytes,
            allocs: *allocs,
            frames: frames
                .iter()
                .map(|f| (f.function.as_deref(), f.module.as_deref()))
                .collect(),
        })
        .collect();
    let categories = categories::categorize(&refs, inputs.rules);

    let leaks = leaks_of(inputs, ranked, inputs.top);
    let (unknown_frames, stack_frames) = inputs.tracker.groups.keys().fold((0, 0), |acc, key| {
        let (unnamed, all) = inputs.sites.unnamed(key.0);
        (acc.0 + unnamed as u64, acc.1 + all as u64)
    });

    let leak_detected = inputs.tracker.groups.keys().any(|k| {
        inputs
            .tracker
            .growth(k)
            .is_some_and(|g| g.verdict == Verdict::Leak)
    });
    let recommendations = recommendations(inputs);
    let churn_hotspots = churn_hotspots(inputs);
    let heap_totals = &inputs.table.heap_totals;
    let projected_limit_hours = inputs.limit.map(|limit| {
        // RSS is what a memory limit meets; without it, the traced heap.
        let (current, slope) = match (inputs.mem, inputs.tracker.rss_slope()) {
            (Some(mem), Some(slope)) => (mem.rss_bytes as f64, slope),
            _ => (
                heap_totals.outstanding_bytes as f64,
                inputs.tracker.heap_slope().unwrap_or(0.0),
            ),
        };
        growth::projection_hours(current, slope, limit as f64).map(round3)
    });

    Report {
        record: "snapshot",
        pid: inputs.pid,
        elapsed_s: inputs.elapsed_s,
        duration_s: None,
        exited: None,
        exit_code: None,
        sampling: match inputs.table.sample_mean() {
            0 => None,
            mean_bytes => Some(Sampling {
                mean_bytes,
                estimated: true,
            }),
        },
        totals: Totals::new(
            &inputs.table.heap_totals,
            &inputs.kernel,
            inputs.decode_errors,
        ),
        mmap: inputs.table.mmap_totals,
        kernel: inputs.kernel,
        probe_stats: inputs.probe_stats.clone(),
        min_age_s: ns_to_s(inputs.min_age_ns),
        leak_groups,
        unknown_frames,
        stack_frames,
        leak_detected,
        growth_rate_mb_per_hour: inputs
            .tracker
            .heap_slope()
            .map(|s| round3(s * 3600.0 / 1e6)),
        projected_limit_hours,
        rss_bytes: inputs.mem.map(|m| m.rss_bytes),
        pss_bytes: inputs.mem.and_then(|m| m.pss_bytes),
        vm_size_bytes: inputs.mem.map(|m| m.vm_size_bytes),
        untraced_bytes: inputs.mem.map(|m| {
            memory::untraced_bytes(
                m.rss_bytes,
                heap_totals.outstanding_bytes,
                inputs.table.mmap_totals.outstanding_bytes,
            )
        }),
        phases: inputs.tracker.phases(inputs.now_ns),
        categories,
        recommendations,
        churn_hotspots,
        leaks,
        processes: None,
        unwind: inputs.unwind.clone(),
        forgotten: inputs.forgotten,
    }
}

/// Builds the [`Profile`] the output writers take, for `report`.
pub fn profile(inputs: &Inputs<'_>, report: &Report, command: &[String]) -> Profile {
    let tracker = inputs.tracker;
    let timeline: Vec<TimePoint> = tracker
        .heap
        .points()
        .iter()
        .map(|&(t_s, heap)| TimePoint {
            t_s,
            heap_bytes: heap as u64,
            rss_bytes: tracker
                .rss
                .points()
                .iter()
                .find(|(t, _)| (*t - t_s).abs() < 1e-9)
                .map(|(_, v)| *v as u64),
        })
        .collect();
    let peak_t_s = timeline
        .iter()
        .max_by_key(|p| p.heap_bytes)
        .map_or(0.0, |p| p.t_s);
    let start_ns = inputs
        .now_ns
        .saturating_sub((inputs.elapsed_s * 1e9) as u64);
    let mut groups: Vec<_> = tracker.groups.iter().collect();
    groups.sort_by(|(ka, a), (kb, b)| {
        (b.stats.outstanding_bytes, b.stats.bytes_allocated)
            .cmp(&(a.stats.outstanding_bytes, a.stats.bytes_allocated))
            .then_with(|| ka.1.name().cmp(kb.1.name()))
            .then_with(|| inputs.sites.order(ka.0, kb.0))
            .then(ka.2.cmp(&kb.2))
    });
    let sites: Vec<Site> = groups
        .into_iter()
        .map(|(key @ (site, func, mmap), g)| {
            let s = &g.stats;
            let growth = tracker.growth(key);
            let bytes_at_peak = g
                .series
                .points()
                .iter()
                .take_while(|(t, _)| *t <= peak_t_s + 1e-9)
                .last()
                .map_or(0, |(_, v)| *v as u64);
            Site {
                stack: inputs.sites.frames(*site),
                allocator: func.name(),
                kind: if *mmap { "mmap" } else { "heap" },
                alloc_objects: s.allocs,
                alloc_bytes: s.bytes_allocated,
                inuse_objects: s.outstanding_allocs,
                inuse_bytes: s.outstanding_bytes,
                max_inuse_bytes: s.max_outstanding_bytes,
                max_inuse_objects: s.max_outstanding_allocs,
                frees: s.frees,
                freed_lifetime_ns: s.freed_lifetime_ns,
                bytes_at_peak,
                verdict: growth.map_or(Verdict::Unknown, |g| g.verdict),
                growth_bytes_per_s: growth.map_or(0.0, |g| round3(g.growth_bytes_per_s)),
                first_alloc_ns: s.first_ns.saturating_sub(start_ns),
                last_alloc_ns: s.last_ns.saturating_sub(start_ns),
            }
        })
        .collect();
    Profile {
        pid: inputs.pid,
        command: command.to_vec(),
        duration_s: report.duration_s.unwrap_or(report.elapsed_s),
        peak_t_s,
        sites,
        timeline,
        report: report.clone(),
    }
}

fn churn_hotspots(inputs: &Inputs<'_>) -> Vec<Hotspot> {
    let mut busy: Vec<(&GroupKey, u64)> = inputs
        .tracker
        .groups
        .iter()
        .filter(|(_, g)| {
            g.stats.allocs >= HOTSPOT_MIN_ALLOCS && g.stats.frees * 10 >= g.stats.allocs * 9
        })
        .map(|(k, g)| (k, g.stats.allocs))
        .collect();
    busy.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then_with(|| inputs.sites.order(a.0.0, b.0.0))
            .then_with(|| a.0.1.name().cmp(b.0.1.name()))
    });
    busy.truncate(HOTSPOTS);
    busy.into_iter()
        .map(|(key, _)| {
            // The whole stack: where the churn comes from is often several frames up.
            let stack = inputs.sites.frames(key.0);
            Hotspot {
                site: group_name(&stack, key.1),
                allocator: key.1.name(),
                behaviour: inputs.tracker.groups[key].stats.summary(inputs.now_ns),
                stack,
            }
        })
        .collect()
}

/// Recommendations over every group whose numbers could call for one.
fn recommendations(inputs: &Inputs<'_>) -> Vec<Recommendation> {
    let candidates: Vec<(&GroupKey, growth::Growth, String)> = inputs
        .tracker
        .groups
        .iter()
        .filter_map(|(key, g)| {
            let growth = inputs.tracker.growth(key)?;
            let notable = matches!(growth.verdict, Verdict::Leak | Verdict::Growing)
                || g.stats.allocs >= 10_000
                || g.stats.max_realloc_chain >= 8;
            notable.then(|| {
                let frames = inputs.sites.frames(key.0);
                (key, growth, group_name(&frames, key.1))
            })
        })
        .collect();
    let facts: Vec<SiteFacts<'_>> = candidates
        .iter()
        .map(|(key, growth, site)| SiteFacts {
            site,
            stats: &inputs.tracker.groups[*key].stats,
            growth,
            now_ns: inputs.now_ns,
        })
        .collect();
    recommend::recommend(&facts)
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Outstanding blocks (`heap`) and mappings (`maps`) at least `min_age` old, grouped by call
/// site and allocator, largest first (ties in an order that is the same in every run).
fn ranked_groups(
    inputs: &Inputs<'_>,
    heap: impl Iterator<Item = LiveAlloc>,
    maps: impl Iterator<Item = LiveAlloc>,
) -> Vec<(GroupKey, Group)> {
    let mut groups: HashMap<GroupKey, Group> = HashMap::new();
    let mut add = |block: &LiveAlloc, mmap: bool| {
        let age = inputs.now_ns.saturating_sub(block.ts_ns);
        if age < inputs.min_age_ns {
            return;
        }
        let g = groups
            .entry((inputs.sites.site_of(block.stack), block.func, mmap))
            .or_insert(Group {
                oldest_ns: u64::MAX,
                ..Group::default()
            });
        // Mappings are never sampled: they stand for themselves.
        let count = if mmap {
            1
        } else {
            sample_count(block, inputs.table.sample_mean())
        };
        g.bytes += block.size * u64::from(count);
        g.allocs += u64::from(count);
        g.oldest_ns = g.oldest_ns.min(block.ts_ns);
    };
    heap.for_each(|b| add(&b, false));
    maps.for_each(|b| add(&b, true));
    let mut ranked: Vec<_> = groups.into_iter().collect();
    ranked.sort_by(|(ka, a), (kb, b)| {
        (b.bytes, b.allocs)
            .cmp(&(a.bytes, a.allocs))
            .then_with(|| inputs.sites.order(ka.0, kb.0))
            .then((ka.1 as u32).cmp(&(kb.1 as u32)))
            .then(ka.2.cmp(&kb.2))
    });
    ranked
}

/// The first `top` groups as `leaks` entries.
fn leaks_of(
    inputs: &Inputs<'_>,
    mut ranked: Vec<(GroupKey, Group)>,
    top: Option<usize>,
) -> Vec<Leak> {
    ranked.truncate(top.unwrap_or(usize::MAX));
    ranked
        .into_iter()
        .map(|(key @ (site, func, mmap), g)| {
            let stack = inputs.sites.frames(site);
            let growth = inputs.tracker.growth(&key);
            Leak {
                bytes: g.bytes,
                allocs: g.allocs,
                oldest_age_s: ns_to_s(inputs.now_ns.saturating_sub(g.oldest_ns)),
                allocator: func.name(),
                kind: if mmap { "mmap" } else { "heap" },
                verdict: growth.map_or(Verdict::Unknown, |g| g.verdict),
                confidence: growth.map_or(0.0, |g| g.confidence),
                growth_bytes_per_s: growth.map_or(0.0, |g| round3(g.growth_bytes_per_s)),
                r2: growth.map_or(0.0, |g| round3(g.r2)),
                growing_for_s: growth.map_or(0.0, |g| round3(g.growing_for_s)),
                behaviour: inputs
                    .tracker
                    .groups
                    .get(&key)
                    .map(|s| s.stats.summary(inputs.now_ns)),
                stack,
            }
        })
        .collect()
}
/// What the session knows of a process besides its table.
pub struct ProcessInfo<'a> {
    pub pid: u32,
    pub parent: Option<u32>,
    pub comm: &'a str,
    pub cmdline: &'a [String],
    pub exited: bool,
    pub execs: u32,
    pub mem: Option<ProcMem>,
    pub growth_bytes_per_s: Option<f64>,
}

/// The `processes` entry of one process.
pub fn process_report(
    inputs: &Inputs<'_>,
    info: &ProcessInfo<'_>,
    table: Option<&Table>,
) -> ProcessReport {
    let empty = Table::default();
    let table = table.unwrap_or(&empty);
    let ranked = ranked_groups(
        inputs,
        table.heap_blocks().map(|(_, b)| b),
        table.map_regions().map(|(_, b)| *b),
    );
    let leak_groups = ranked.len();
    let leak_detected = ranked.iter().any(|(key, _)| {
        inputs
            .tracker
            .growth(key)
            .is_some_and(|g| g.verdict == Verdict::Leak)
    });
    let leaks = leaks_of(inputs, ranked, inputs.top);
    ProcessReport {
        pid: info.pid,
        parent: info.parent,
        comm: info.comm.to_string(),
        cmdline: info.cmdline.to_vec(),
        exited: info.exited,
        execs: info.execs,
        totals: Totals::new(&table.heap_totals, &inputs.kernel, inputs.decode_errors),
        mmap: table.mmap_totals,
        growth_rate_mb_per_hour: info.growth_bytes_per_s.map(|s| round3(s * 3600.0 / 1e6)),
        rss_bytes: info.mem.map(|m| m.rss_bytes),
        leak_detected,
        leak_groups,
        leaks,
    }
}

/// Turns a snapshot into the final report.
pub fn finish(mut report: Report, exited: bool, exit_code: Option<i32>) -> Report {
    report.record = "report";
    report.duration_s = Some(report.elapsed_s);
    report.exited = Some(exited);
    report.exit_code = Some(exit_code);
    report
}

fn ns_to_s(ns: u64) -> f64 {
    (ns as f64 / 1e9 * 1000.0).round() / 1000.0
}

#[cfg(test)]
pub(crate) mod tests {
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
            },
            probe_stats: Vec::new(),
            decode_errors: 0,
            now_ns: 10_000_000_000,
            elapsed_s: 1.5,
            min_age_ns,
            top: None,
            tracker,
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
        assert_eq!(r.totals.lost_events, 3);
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
}
