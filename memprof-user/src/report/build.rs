//! Building reports from the table, the analytics state and the stacks: the snapshot and final
//! report records, the per-process entries of a multi-process trace, and the [`Profile`] the
//! output writers take.

use std::collections::HashMap;

use self::advice::{churn_hotspots, recommendations, untouched_advice};
use super::{
    Forgotten, Leak, Peak, PeakSite, Phase, ProcessReport, Profile, Report, RssPoint, Sampling,
    Site, TimePoint, Totals, UnwindStats,
};
use crate::{
    analysis::{
        categories::{self, GroupRef, Rule},
        estimate::{Bounds, Spread},
        growth::{self, Verdict},
        memory,
        peak::Snapshot,
        rss::{self, Residency},
        tracking::{GroupKey, Tracker},
    },
    probe::{KernelLosses, ProbeStat},
    stacks::{Frame, Sites},
    sys::procmem::ProcMem,
    table::{LiveAlloc, Table, Tables, sample_count, sample_variance},
};

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
    /// Records the end of the trace let go unread.
    pub unread_at_end: u64,
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
    /// The last residency scan of each process (RSS explained).
    pub residency: &'a HashMap<u32, Residency>,
    /// The main process's RSS explained over time.
    pub rss_timeline: &'a [RssPoint],
}

#[derive(Default)]
struct Group {
    bytes: u64,
    allocs: u64,
    oldest_ns: u64,
    /// Sampled traces: the variance of `bytes` and `allocs`.
    spread: Spread,
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

    let residency = inputs.residency.get(&inputs.pid);
    let untouched = untouched_advice(inputs, &ranked, residency);
    let leaks = leaks_of(inputs, ranked, inputs.top, residency);
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
    let mut recommendations = recommendations(inputs);
    if let Some(r) = residency.and_then(|r| rss::retained_advice(&r.explained)) {
        recommendations.push(r);
    }
    recommendations.extend(untouched);
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

    let growth_rate = mb_per_hour(growth::heap_rate(inputs.tracker.heap.points()));
    Report {
        record: "snapshot",
        pid: inputs.pid,
        elapsed_s: inputs.elapsed_s,
        duration_s: None,
        exited: None,
        exit_code: None,
        sampling: match inputs.table.sample_mean() {
            0 => None,
            mean_bytes => {
                let heap = &inputs.table.heap_totals;
                let allocated = inputs.tracker.allocated_spread;
                let outstanding =
                    inputs
                        .table
                        .heap_blocks()
                        .fold(Spread::default(), |mut s, (_, b)| {
                            s.add(&block_spread(&b, mean_bytes));
                            s
                        });
                Some(Sampling {
                    mean_bytes,
                    estimated: true,
                    bytes_allocated_interval: Bounds::around(heap.bytes_allocated, allocated.bytes)
                        .with_unseen(heap.bytes_allocated, mean_bytes)
                        .0,
                    allocs_interval: Bounds::around(heap.allocs, allocated.blocks).0,
                    outstanding_bytes_interval: Bounds::around(
                        heap.outstanding_bytes,
                        outstanding.bytes,
                    )
                    .with_unseen(heap.outstanding_bytes, mean_bytes)
                    .0,
                    outstanding_allocs_interval: Bounds::around(
                        heap.outstanding_allocs,
                        outstanding.blocks,
                    )
                    .0,
                })
            }
        },
        totals: Totals::new(
            &inputs.table.heap_totals,
            &inputs.kernel,
            inputs.decode_errors,
            inputs.unread_at_end,
        ),
        mmap: inputs.table.mmap_totals,
        kernel: inputs.kernel,
        probe_stats: inputs.probe_stats.clone(),
        min_age_s: ns_to_s(inputs.min_age_ns),
        leak_groups,
        unknown_frames,
        stack_frames,
        leak_detected,
        growth_rate_mb_per_hour: growth_rate.as_ref().ok().copied(),
        growth_rate_note: growth_rate.err(),
        peak: peak_of(inputs, inputs.tracker.peak()),
        projected_limit_hours,
        rss_bytes: inputs.mem.map(|m| m.rss_bytes),
        pss_bytes: inputs.mem.and_then(|m| m.pss_bytes),
        vm_size_bytes: inputs.mem.map(|m| m.vm_size_bytes),
        untraced_bytes: inputs.mem.map(|m| {
            // Kernel blocks (`--kernel`) are not in the process's RSS.
            let kernel: u64 = inputs
                .table
                .heap_blocks()
                .filter(|(_, b)| b.func.is_kernel())
                .map(|(_, b)| b.size)
                .sum();
            memory::untraced_bytes(
                m.rss_bytes,
                heap_totals.outstanding_bytes.saturating_sub(kernel),
                inputs.table.mmap_totals.outstanding_bytes,
            )
        }),
        rss_explained: residency.map(|r| r.explained),
        phases: inputs
            .tracker
            .phases(inputs.now_ns)
            .into_iter()
            .zip(inputs.tracker.phase_peaks())
            .map(|(phase, peak)| Phase {
                phase,
                peak_sites: peak.map_or_else(Vec::new, |snap| peak_of(inputs, snap).sites),
            })
            .collect(),
        categories,
        recommendations,
        churn_hotspots,
        leaks,
        processes: None,
        unwind: inputs.unwind.clone(),
        forgotten: inputs.forgotten,
        kept: None,
        python: None,
    }
}

/// The variance one sampled heap block adds to estimated bytes and counts.
fn block_spread(block: &LiveAlloc, mean: u64) -> Spread {
    let v = sample_variance(block, mean);
    let s = block.size as f64;
    Spread {
        bytes: v * s * s,
        blocks: v,
    }
}

/// Why a group's verdict is `unknown`: its own reason, or that it was never sampled.
fn verdict_reason(growth: Option<&growth::Growth>) -> Option<&'static str> {
    match growth {
        Some(g) => g.reason,
        None => Some(growth::UNKNOWN_FEW_SAMPLES),
    }
}

/// A growth rate in MB/h (rounded to 0.001), or why none is given.
fn mb_per_hour(rate: Result<f64, String>) -> Result<f64, String> {
    rate.map(|s| round3(s * 3600.0 / 1e6))
}

/// A peak as reported: the sites largest first, `--top` of them.
fn peak_of(inputs: &Inputs<'_>, mut snap: Snapshot<GroupKey>) -> Peak {
    snap.sites.sort_by(|(ka, a), (kb, b)| {
        (b.bytes, b.blocks)
            .cmp(&(a.bytes, a.blocks))
            .then_with(|| inputs.sites.order(ka.0, kb.0))
            .then((ka.1 as u32).cmp(&(kb.1 as u32)))
    });
    let (other_sites, rest) = snap.keep_largest(inputs.top.unwrap_or(usize::MAX));
    let start_ns = inputs
        .now_ns
        .saturating_sub((inputs.elapsed_s * 1e9) as u64);
    Peak {
        bytes: snap.total.bytes,
        allocs: snap.total.blocks,
        at_s: if snap.at_ns == 0 {
            0.0
        } else {
            (snap.at_ns.saturating_sub(start_ns) as f64 / 1e3).round() / 1e6
        },
        bytes_interval: snap.bounds.map(|b| {
            b.0.with_unseen(snap.total.bytes, inputs.table.sample_mean())
                .0
        }),
        allocs_interval: snap.bounds.map(|b| b.1.0),
        sites: snap
            .sites
            .into_iter()
            .map(|((site, func, _), held)| PeakSite {
                bytes: held.bytes,
                allocs: held.blocks,
                allocator: func.name(),
                stack: inputs.sites.frames(site),
            })
            .collect(),
        other_sites: other_sites as u64,
        other_bytes: rest.bytes,
        other_allocs: rest.blocks,
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
    let start_ns = inputs
        .now_ns
        .saturating_sub((inputs.elapsed_s * 1e9) as u64);
    let peak = tracker.peak();
    let peak_t_s = if peak.at_ns == 0 {
        0.0
    } else {
        peak.at_ns.saturating_sub(start_ns) as f64 / 1e9
    };
    let at_peak: HashMap<GroupKey, (u64, u64)> = peak
        .sites
        .iter()
        .map(|(k, v)| (*k, (v.bytes, v.blocks)))
        .collect();
    let residency = inputs.residency.get(&inputs.pid);
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
            let (bytes_at_peak, objects_at_peak) = at_peak.get(key).copied().unwrap_or_default();
            Site {
                stack: inputs.sites.frames(*site),
                allocator: func.name(),
                kind: if *mmap { "mmap" } else { "heap" },
                alloc_objects: s.allocs,
                alloc_bytes: s.bytes_allocated,
                inuse_objects: s.outstanding_allocs,
                inuse_bytes: s.outstanding_bytes,
                resident_bytes: residency.map(|r| r.groups.get(key).copied().unwrap_or(0)),
                max_inuse_bytes: s.max_outstanding_bytes,
                max_inuse_objects: s.max_outstanding_allocs,
                frees: s.frees,
                freed_lifetime_ns: s.freed_lifetime_ns,
                bytes_at_peak,
                objects_at_peak,
                verdict: growth.map_or(Verdict::Unknown, |g| g.verdict),
                verdict_reason: verdict_reason(growth.as_ref()),
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
        rss_timeline: inputs.rss_timeline.to_vec(),
        report: report.clone(),
    }
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
            g.spread
                .add(&block_spread(block, inputs.table.sample_mean()));
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
    residency: Option<&Residency>,
) -> Vec<Leak> {
    ranked.truncate(top.unwrap_or(usize::MAX));
    ranked
        .into_iter()
        .map(|(key @ (site, func, mmap), g)| {
            let stack = inputs.sites.frames(site);
            let growth = inputs.tracker.growth(&key);
            let sampled = inputs.table.sample_mean() > 0 && !mmap;
            Leak {
                bytes: g.bytes,
                allocs: g.allocs,
                bytes_interval: sampled.then(|| {
                    Bounds::around(g.bytes, g.spread.bytes)
                        .with_unseen(g.bytes, inputs.table.sample_mean())
                        .0
                }),
                allocs_interval: sampled.then(|| Bounds::around(g.allocs, g.spread.blocks).0),
                oldest_age_s: ns_to_s(inputs.now_ns.saturating_sub(g.oldest_ns)),
                allocator: func.name(),
                kind: if mmap { "mmap" } else { "heap" },
                verdict: growth.map_or(Verdict::Unknown, |g| g.verdict),
                verdict_reason: verdict_reason(growth.as_ref()),
                confidence: growth.map_or(0.0, |g| g.confidence),
                resident_bytes: residency.map(|r| r.groups.get(&key).copied().unwrap_or(0)),
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
    /// Its heap's growth over its life in the trace (bytes/s), or why none is given.
    pub growth: Result<f64, String>,
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
    let residency = inputs.residency.get(&info.pid);
    let leaks = leaks_of(inputs, ranked, inputs.top, residency);
    ProcessReport {
        pid: info.pid,
        parent: info.parent,
        comm: info.comm.to_string(),
        cmdline: info.cmdline.to_vec(),
        exited: info.exited,
        execs: info.execs,
        totals: Totals::new(
            &table.heap_totals,
            &inputs.kernel,
            inputs.decode_errors,
            inputs.unread_at_end,
        ),
        mmap: table.mmap_totals,
        growth_rate_mb_per_hour: mb_per_hour(info.growth.clone()).ok(),
        growth_rate_note: info.growth.clone().err(),
        peak: inputs
            .tracker
            .process_peak(info.pid)
            .map(|snap| peak_of(inputs, snap)),
        rss_bytes: info.mem.map(|m| m.rss_bytes),
        rss_explained: residency.map(|r| r.explained),
        leak_detected,
        leak_groups,
        leaks,
        python: None,
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

mod advice;
#[cfg(test)]
pub(crate) mod tests;
