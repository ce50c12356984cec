//! Building reports from the table, the analytics state and the stacks: the snapshot and final
//! report records, the per-process entries of a multi-process trace, and the [`Profile`] the
//! output writers take.

use std::collections::HashMap;

use memprof_common::NO_STACK;

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
    stacks::{Frame, StackStore, Symbolizer},
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
    pub stacks: &'a StackStore,
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
pub fn snapshot(inputs: &Inputs<'_>, symbolizer: &mut Symbolizer) -> Report {
    let ranked = ranked_groups(
        inputs,
        inputs.table.heap_blocks().map(|(_, b)| b),
        inputs.table.map_regions().map(|(_, b)| *b),
    );
    let leak_groups = ranked.len();

    // Categories cover every group, before `--top`.
    let framed: Vec<(u64, u64, Vec<Frame>)> = ranked
        .iter()
        .map(|((stack, _, _), g)| (g.bytes, g.allocs, frames_of(inputs, symbolizer, *stack)))
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

    let (leaks, unknown_frames) = leaks_of(inputs, symbolizer, ranked, inputs.top);

    let leak_detected = inputs.tracker.groups.keys().any(|k| {
        inputs
            .tracker
            .growth(k)
            .is_some_and(|g| g.verdict == Verdict::Leak)
    });
    let recommendations = recommendations(inputs, symbolizer);
    let churn_hotspots = churn_hotspots(inputs, symbolizer);
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
pub fn profile(
    inputs: &Inputs<'_>,
    symbolizer: &mut Symbolizer,
    report: &Report,
    command: &[String],
) -> Profile {
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
    let mut sites: Vec<Site> = tracker
        .groups
        .iter()
        .map(|(key @ (stack, func, mmap), g)| {
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
                stack: frames_of(inputs, symbolizer, *stack),
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
    sites.sort_by(|a, b| {
        (b.inuse_bytes, b.alloc_bytes)
            .cmp(&(a.inuse_bytes, a.alloc_bytes))
            .then_with(|| a.allocator.cmp(b.allocator))
    });
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

fn churn_hotspots(inputs: &Inputs<'_>, symbolizer: &mut Symbolizer) -> Vec<Hotspot> {
    let mut busy: Vec<(&GroupKey, u64)> = inputs
        .tracker
        .groups
        .iter()
        .filter(|(_, g)| {
            g.stats.allocs >= HOTSPOT_MIN_ALLOCS && g.stats.frees * 10 >= g.stats.allocs * 9
        })
        .map(|(k, g)| (k, g.stats.allocs))
        .collect();
    busy.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.0.cmp(&b.0.0)));
    busy.truncate(HOTSPOTS);
    busy.into_iter()
        .map(|(key, _)| {
            // The whole stack: where the churn comes from is often several frames up.
            let stack = frames_of(inputs, symbolizer, key.0);
            Hotspot {
                site: group_name(&stack, key.1),
                allocator: key.1.name(),
                behaviour: inputs.tracker.groups[key].stats.summary(inputs.now_ns),
                stack,
            }
        })
        .collect()
}

fn frames_of(inputs: &Inputs<'_>, symbolizer: &mut Symbolizer, stack: u64) -> Vec<Frame> {
    match inputs.stacks.get(stack).filter(|_| stack != NO_STACK) {
        Some(frames) => symbolizer.frames(inputs.stacks, frames),
        None => Vec::new(),
    }
}

/// Recommendations over every group whose numbers could call for one.
fn recommendations(inputs: &Inputs<'_>, symbolizer: &mut Symbolizer) -> Vec<Recommendation> {
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
                let frames = frames_of(inputs, symbolizer, key.0);
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

/// Outstanding blocks (`heap`) and mappings (`maps`) at least `min_age` old, grouped by stack
/// and allocator, largest first.
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
            .entry((block.stack, block.func, mmap))
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
            .then(ka.0.cmp(&kb.0))
            .then((ka.1 as u32).cmp(&(kb.1 as u32)))
    });
    ranked
}

/// The first `top` groups as `leaks` entries, and the number of their frames without a name.
fn leaks_of(
    inputs: &Inputs<'_>,
    symbolizer: &mut Symbolizer,
    mut ranked: Vec<(GroupKey, Group)>,
    top: Option<usize>,
) -> (Vec<Leak>, u64) {
    ranked.truncate(top.unwrap_or(usize::MAX));
    let mut unknown_frames = 0;
    let leaks = ranked
        .into_iter()
        .map(|(key @ (stack, func, mmap), g)| {
            let stack = frames_of(inputs, symbolizer, stack);
            unknown_frames += stack.iter().filter(|f| f.function.is_none()).count() as u64;
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
        .collect();
    (leaks, unknown_frames)
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
    symbolizer: &mut Symbolizer,
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
    let (leaks, _) = leaks_of(inputs, symbolizer, ranked, inputs.top);
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
    use memprof_common::AllocFn;

    use super::*;
    use crate::ingest::event::{Alloc, Event};

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
        stacks: &'a StackStore,
        tracker: &'a Tracker,
        min_age_ns: u64,
    ) -> Inputs<'a> {
        Inputs {
            pid: 42,
            table,
            stacks,
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

    #[test]
    fn groups_by_stack_sorted_by_bytes_with_age_filter() {
        let mut table = Tables::default();
        table.apply(&alloc(0x10, 100, 1, 1_000_000_000));
        table.apply(&alloc(0x20, 100, 1, 9_000_000_000));
        table.apply(&alloc(0x30, 500, 2, 2_000_000_000));
        table.apply(&alloc(0x40, 7, NO_STACK, 2_000_000_000));
        let stacks = StackStore::new();
        let tracker = Tracker::new(&[], 0);
        let mut sym = Symbolizer::new();
        let r = snapshot(&inputs(&table, &stacks, &tracker, 0), &mut sym);
        let got: Vec<_> = r
            .leaks
            .iter()
            .map(|l| (l.bytes, l.allocs, l.oldest_age_s))
            .collect();
        assert_eq!(got, vec![(500, 1, 8.0), (200, 2, 9.0), (7, 1, 8.0)]);
        assert_eq!(r.totals.lost_events, 3);
        assert_eq!(r.totals.lost_stacks, 4);
        // Only allocations at least 5 s old: the young block of stack 1 drops out.
        let r = snapshot(&inputs(&table, &stacks, &tracker, 5_000_000_000), &mut sym);
        let got: Vec<_> = r.leaks.iter().map(|l| (l.bytes, l.allocs)).collect();
        assert_eq!(got, vec![(500, 1), (100, 1), (7, 1)]);
        assert_eq!(r.leak_groups, 3);
    }

    #[test]
    fn json_has_contract_fields() {
        let mut table = Tables::default();
        table.apply(&alloc(0x10, 64, NO_STACK, 1));
        let stacks = StackStore::new();
        let tracker = Tracker::new(&[], 0);
        let mut sym = Symbolizer::new();
        let r = finish(
            snapshot(&inputs(&table, &stacks, &tracker, 0), &mut sym),
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
}
