//! Reports: the totals and the outstanding allocations grouped by call stack, as NDJSON records
//! (`"type":"snapshot"` / `"type":"report"`) or as text for a person.

use std::{collections::HashMap, fmt::Write as _};

use memprof_common::{AllocFn, NO_STACK};
use serde::Serialize;

use crate::{
    analysis::{
        behaviour::BehaviourSummary,
        categories::{self, Category, GroupRef, Rule},
        growth::{self, Verdict},
        recommend::{self, Recommendation, SiteFacts},
    },
    output::{Profile, Site, TimePoint},
    procmem::{self, ProcMem},
    stacks::StackStore,
    symbolize::{Frame, Symbolizer},
    table::{HeapTotals, LiveAlloc, MmapTotals, Table, Tables},
    tracking::{GroupKey, PhaseReport, Tracker},
};

/// Losses the kernel programs counted (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelLosses {
    /// Records dropped because the ring buffer was full.
    pub ring_full: u64,
    /// Allocator calls not traced because the per-thread state map was full.
    pub inflight_full: u64,
    /// Allocations recorded without a stack (stack map full or colliding).
    pub stack_lost: u64,
    /// Allocator returns whose entry was not seen (calls already running at attach).
    pub orphan_returns: u64,
    /// New processes not followed because the kernel's process set was full.
    pub processes_missed: u64,
    /// Records of executable mappings the kernel dropped (frames in those may go unnamed).
    pub mapping_records_lost: u64,
    /// With `--sample-bytes`: sampled allocations dropped because the kernel's map of sampled
    /// live blocks was full.
    pub sampled_full: u64,
}

/// One kernel program's runs and its mean time per run (`--probe-stats`): the work of memprof's
/// programs, without the trap that enters them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProbeStat {
    pub program: String,
    pub runs: u64,
    pub ns_per_run: f64,
}

impl ProbeStat {
    pub fn new(program: &str, runs: u64, run_time_ns: u64) -> Self {
        Self {
            program: program.to_string(),
            runs,
            ns_per_run: if runs == 0 {
                0.0
            } else {
                (run_time_ns as f64 / runs as f64 * 10.0).round() / 10.0
            },
        }
    }
}

/// What a long trace stopped keeping (see `Inputs::forgotten`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Forgotten {
    /// Exited processes beyond the most recent 256, whose blocks count as freed.
    pub processes: u64,
    /// Call-site groups with nothing outstanding and idle for a minute, beyond 20 000.
    pub groups: u64,
}

impl Forgotten {
    fn is_none(&self) -> bool {
        self.processes == 0 && self.groups == 0
    }
}

/// How stacks were unwound with `--unwind dwarf`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UnwindStats {
    /// Allocations whose stack copy was unwound.
    pub allocations: u64,
    /// Distinct stacks they produced.
    pub stacks: u64,
    /// Distinct stacks whose unwind stopped before the outermost frame (the copy ended, or no
    /// rule applied); they end in a frame of kind `unknown`.
    pub truncated_stacks: u64,
}

/// The report's `totals`: the table's heap counts and what was lost on the way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    #[serde(flatten)]
    pub heap: HeapTotals,
    /// Events that never reached the table: ring full, state map full, undecodable records.
    pub lost_events: u64,
    /// Allocations recorded without a stack.
    pub lost_stacks: u64,
}

impl Totals {
    fn new(heap: &HeapTotals, k: &KernelLosses, decode_errors: u64) -> Self {
        Self {
            heap: *heap,
            lost_events: k.ring_full + k.inflight_full + k.sampled_full + decode_errors,
            lost_stacks: k.stack_lost,
        }
    }
}

/// Outstanding allocations sharing one call stack and allocator.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Leak {
    pub bytes: u64,
    pub allocs: u64,
    pub oldest_age_s: f64,
    pub allocator: &'static str,
    /// `heap` (malloc family) or `mmap` (anonymous mapping outside the allocator).
    pub kind: &'static str,
    /// Growth of the group's outstanding bytes over the trace (least squares), and the verdict
    /// drawn from it: `leak`, `growing`, `stable`, `churn` or `unknown` (too few samples).
    pub verdict: Verdict,
    pub confidence: f64,
    pub growth_bytes_per_s: f64,
    pub r2: f64,
    pub growing_for_s: f64,
    /// How the group allocates: rates, lifetimes, sizes, realloc chains.
    pub behaviour: Option<BehaviourSummary>,
    /// Innermost first; the allocator's own frames are not included.
    pub stack: Vec<Frame>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    #[serde(rename = "type")]
    pub record: &'static str,
    pub pid: u32,
    pub elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exited: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<Option<i32>>,
    /// Present when the trace was sampled (`--sample-bytes`): every byte and allocation count
    /// in the report (totals, sites, phases, behaviour) is then an estimate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling: Option<Sampling>,
    pub totals: Totals,
    pub mmap: MmapTotals,
    pub kernel: KernelLosses,
    /// With `--probe-stats`: each kernel program's runs and mean time per run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub probe_stats: Vec<ProbeStat>,
    pub min_age_s: f64,
    /// Number of call-stack groups passing `min_age_s`, before `--top` is applied.
    pub leak_groups: usize,
    /// Frames in `leaks` whose function could not be named.
    pub unknown_frames: u64,
    /// Whether any call-stack group has the verdict `leak`.
    pub leak_detected: bool,
    /// Growth of the process's outstanding heap bytes over the trace (1 MB = 10^6 bytes).
    pub growth_rate_mb_per_hour: Option<f64>,
    /// Hours until the process's RSS reaches `--limit` at its current growth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projected_limit_hours: Option<Option<f64>>,
    /// Resident and proportional set size of the process (absent once it exited).
    pub rss_bytes: Option<u64>,
    pub pss_bytes: Option<u64>,
    pub vm_size_bytes: Option<u64>,
    /// RSS not accounted for by traced heap and mmap bytes (fragmentation, untraced
    /// allocators, stacks, code).
    pub untraced_bytes: Option<u64>,
    pub phases: Vec<PhaseReport>,
    pub categories: Vec<Category>,
    pub recommendations: Vec<Recommendation>,
    /// Call sites allocating the most short-lived memory (freed again), including sites with
    /// nothing outstanding: candidates for pooling or reuse.
    pub churn_hotspots: Vec<Hotspot>,
    pub leaks: Vec<Leak>,
    /// Every traced process, largest (or fastest-growing, `--rank growth`) first: present when
    /// the trace covers more than one process (`--all`, followed children).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<Vec<ProcessReport>>,
    /// With `--unwind dwarf`: how many stacks were unwound and how many stopped early.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unwind: Option<UnwindStats>,
    /// Present when a long trace forgot exited processes or idle call sites.
    #[serde(skip_serializing_if = "Forgotten::is_none")]
    pub forgotten: Forgotten,
}

/// How a sampled trace was sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Sampling {
    /// Mean sampling interval in bytes: each allocation of `s` bytes was recorded with
    /// probability `1 - exp(-s / mean_bytes)` and stands for `1 / p` allocations and `s / p`
    /// bytes.
    pub mean_bytes: u64,
    /// Always true: counts and bytes are unbiased estimates, not exact.
    pub estimated: bool,
}

/// A call site that allocates and frees a lot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hotspot {
    pub site: String,
    pub allocator: &'static str,
    pub behaviour: BehaviourSummary,
    /// Innermost frames (up to 5).
    pub stack: Vec<Frame>,
}

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
            procmem::untraced_bytes(
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
        unwind: inputs.unwind,
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
            let mut stack = frames_of(inputs, symbolizer, key.0);
            stack.truncate(5);
            Hotspot {
                site: site_name(&stack, key.1),
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

/// A short name for a group's call site: its innermost named function, else module+address.
fn site_name(frames: &[Frame], func: AllocFn) -> String {
    frames
        .iter()
        .find_map(|f| f.function.clone())
        .or_else(|| {
            frames.first().map(|f| {
                let module = f.module.as_deref().unwrap_or("?");
                format!("{}@{}", module.rsplit('/').next().unwrap_or(module), f.addr)
            })
        })
        .unwrap_or_else(|| format!("(no stack, {})", func.name()))
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
                (key, growth, site_name(&frames, key.1))
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
        let count = if mmap { 1 } else { inputs.table.count(block) };
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

/// One traced process in a multi-process trace (`--all`, followed children).
#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    pub pid: u32,
    /// The traced process that forked it, when it was followed from its fork.
    pub parent: Option<u32>,
    pub comm: String,
    pub cmdline: Vec<String>,
    pub exited: bool,
    /// How many times it replaced its image during the trace (its blocks from before an exec
    /// count as freed at the exec).
    pub execs: u32,
    /// This process's counts. `lost_events` and `lost_stacks` are trace-wide: the kernel does
    /// not know whose record it dropped.
    pub totals: Totals,
    pub mmap: MmapTotals,
    /// Least-squares growth of its outstanding heap bytes over the trace.
    pub growth_rate_mb_per_hour: Option<f64>,
    pub rss_bytes: Option<u64>,
    /// Whether one of its call-stack groups has the verdict `leak`.
    pub leak_detected: bool,
    pub leak_groups: usize,
    pub leaks: Vec<Leak>,
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
    let empty = Table::new();
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

fn signed_bytes(b: i64) -> String {
    let sign = if b < 0 { "-" } else { "" };
    format!("{sign}{}", human_bytes(b.unsigned_abs()))
}

/// Human-readable byte count.
pub fn human_bytes(b: u64) -> String {
    recommend::fmt_bytes(b as f64)
}

/// The per-process table of a multi-process report: the first 20 processes as ranked.
fn render_processes(out: &mut String, processes: &[ProcessReport]) {
    const SHOWN: usize = 20;
    let exited = processes.iter().filter(|p| p.exited).count();
    let _ = writeln!(
        out,
        "\n{} processes traced ({exited} exited):\n  {:>8}  {:<16} {:>12} {:>10} {:>12}  TOP SITE",
        processes.len(),
        "PID",
        "COMMAND",
        "OUTSTANDING",
        "ALLOCS",
        "GROWTH MB/h",
    );
    for p in processes.iter().take(SHOWN) {
        let top = p
            .leaks
            .first()
            .map(|l| {
                let name = l
                    .stack
                    .iter()
                    .find_map(|f| f.function.as_deref())
                    .unwrap_or("??");
                format!("{name} ({})", human_bytes(l.bytes))
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:>8}  {:<16} {:>12} {:>10} {:>12}  {}{}",
            p.pid,
            p.comm,
            human_bytes(p.totals.heap.outstanding_bytes + p.mmap.outstanding_bytes),
            p.totals.heap.allocs,
            p.growth_rate_mb_per_hour
                .map_or("-".to_string(), |g| format!("{g:+.3}")),
            top,
            if p.exited { "  [exited]" } else { "" }
        );
    }
    if processes.len() > SHOWN {
        let _ = writeln!(
            out,
            "  ... and {} more (--json lists all)",
            processes.len() - SHOWN
        );
    }
}

/// The text a person reads at the end of a trace (or at each `--interval`).
pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    let t = &r.totals.heap;
    let losses = &r.totals;
    let what = if r.record == "report" {
        "report"
    } else {
        "snapshot"
    };
    let _ = write!(out, "memprof {what}: pid {}, {:.2} s", r.pid, r.elapsed_s);
    match (r.exited, r.exit_code) {
        (Some(true), Some(Some(code))) => {
            let _ = write!(out, ", exited with status {code}");
        }
        (Some(true), _) => out.push_str(", exited"),
        _ => {}
    }
    out.push('\n');
    if let Some(s) = r.sampling {
        let _ = writeln!(
            out,
            "  sampled      one allocation per {} on average: counts and bytes are estimates",
            human_bytes(s.mean_bytes)
        );
    }
    let _ = writeln!(
        out,
        "  allocations  {} ({})    frees {} ({})    unmatched frees {}",
        t.allocs,
        human_bytes(t.bytes_allocated),
        t.frees,
        human_bytes(t.bytes_freed),
        t.unmatched_frees
    );
    let _ = writeln!(
        out,
        "  outstanding  {} in {} allocations    peak during trace {}",
        human_bytes(t.outstanding_bytes),
        t.outstanding_allocs,
        human_bytes(t.peak_outstanding_bytes)
    );
    let _ = writeln!(
        out,
        "  mmap         {} outstanding in {} mappings ({} mapped, {} unmapped)",
        human_bytes(r.mmap.outstanding_bytes),
        r.mmap.outstanding_maps,
        human_bytes(r.mmap.bytes_mapped),
        human_bytes(r.mmap.bytes_unmapped)
    );
    let _ = writeln!(
        out,
        "  lost events  {}    lost stacks {}    unknown frames {}",
        losses.lost_events, losses.lost_stacks, r.unknown_frames
    );
    if !r.probe_stats.is_empty() {
        let programs: Vec<String> = r
            .probe_stats
            .iter()
            .map(|p| format!("{} {:.0} ns x {}", p.program, p.ns_per_run, p.runs))
            .collect();
        let _ = writeln!(out, "  programs     {}", programs.join(", "));
    }
    if let Some(rss) = r.rss_bytes {
        let _ = write!(out, "  process      RSS {}", human_bytes(rss));
        if let Some(pss) = r.pss_bytes {
            let _ = write!(out, ", PSS {}", human_bytes(pss));
        }
        if let Some(untraced) = r.untraced_bytes {
            let _ = write!(out, ", {} not traced", human_bytes(untraced));
        }
        out.push('\n');
    }
    if let Some(rate) = r.growth_rate_mb_per_hour {
        let _ = write!(out, "  growth       heap {rate:+.3} MB/h");
        if let Some(hours) = r.projected_limit_hours {
            match hours {
                Some(h) => {
                    let _ = write!(out, ", reaches --limit in ~{h:.1} h");
                }
                None => out.push_str(", not growing toward --limit"),
            }
        }
        let _ = writeln!(
            out,
            "{}",
            if r.leak_detected {
                "    LEAK DETECTED"
            } else {
                ""
            }
        );
    }
    for p in &r.phases {
        let _ = writeln!(
            out,
            "  phase {:<10} ({}) {} allocs {} frees, net {}, peak net {}, peak outstanding {}",
            p.name,
            p.kind,
            p.allocs,
            p.frees,
            signed_bytes(p.net_bytes),
            signed_bytes(p.peak_net_bytes),
            human_bytes(p.peak_outstanding_bytes)
        );
    }
    if !r.categories.is_empty() {
        let list: Vec<String> = r
            .categories
            .iter()
            .take(6)
            .map(|c| format!("{} {}", c.name, human_bytes(c.bytes)))
            .collect();
        let _ = writeln!(out, "  by category  {}", list.join(", "));
    }
    for h in &r.churn_hotspots {
        let b = &h.behaviour;
        let _ = writeln!(
            out,
            "  churn        {}: {} allocations via {} ({}/s), {} freed, p90 lifetime {}",
            h.site,
            b.allocs_total,
            h.allocator,
            b.alloc_rate_per_s
                .map_or("?".to_string(), |r| format!("{r:.0}")),
            b.frees_total,
            b.lifetime_p90_s
                .map_or("?".to_string(), |s| format!("<= {:.3} ms", s * 1000.0))
        );
    }
    for rec in &r.recommendations {
        if rec.message.starts_with(&rec.site) {
            let _ = writeln!(out, "  advice       [{}] {}", rec.kind, rec.message);
        } else {
            let _ = writeln!(
                out,
                "  advice       [{}] {}: {}",
                rec.kind, rec.site, rec.message
            );
        }
    }
    if let Some(processes) = &r.processes {
        render_processes(&mut out, processes);
    }
    if r.leaks.is_empty() {
        let _ = writeln!(
            out,
            "\nNo outstanding allocations at least {} s old.",
            r.min_age_s
        );
        return out;
    }
    let _ = writeln!(
        out,
        "\nTop {} of {} call sites by outstanding bytes (age >= {} s):",
        r.leaks.len(),
        r.leak_groups,
        r.min_age_s
    );
    for (i, leak) in r.leaks.iter().enumerate() {
        let _ = writeln!(
            out,
            "#{:<3} {} in {} allocations via {} ({}), oldest {:.2} s, {} ({:+.0} B/s, r2 {:.2})",
            i + 1,
            human_bytes(leak.bytes),
            leak.allocs,
            leak.allocator,
            leak.kind,
            leak.oldest_age_s,
            serde_json::to_value(leak.verdict)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            leak.growth_bytes_per_s,
            leak.r2
        );
        if leak.stack.is_empty() {
            let _ = writeln!(out, "       (stack not captured)");
        }
        for f in &leak.stack {
            let name = f.function.as_deref().unwrap_or("??");
            let module = match (f.kind, f.module.as_deref()) {
                ("python", _) => "python",
                (_, Some(m)) => m.rsplit('/').next().unwrap_or(m),
                (_, None) => "?",
            };
            let _ = match (&f.file, f.line) {
                (Some(file), Some(line)) => {
                    let file = file.rsplit('/').next().unwrap_or(file);
                    writeln!(out, "       {name} ({file}:{line}) [{module}]")
                }
                _ => writeln!(out, "       {name} [{module}] {}", f.addr),
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Alloc, Event};

    fn alloc(addr: u64, size: u64, stack: u64, ts_ns: u64) -> Event {
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

    fn inputs<'a>(
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
        let mut table = Tables::new();
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
        let mut table = Tables::new();
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

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(1000), "1000 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(8 << 20), "8.0 MiB");
    }

    #[test]
    fn text_mentions_losses_and_sites() {
        let mut table = Tables::new();
        table.apply(&alloc(0x10, 64, NO_STACK, 1));
        let stacks = StackStore::new();
        let tracker = Tracker::new(&[], 0);
        let mut sym = Symbolizer::new();
        let text = render_text(&snapshot(&inputs(&table, &stacks, &tracker, 0), &mut sym));
        assert!(text.contains("lost events  3"), "{text}");
        assert!(text.contains("64 B in 1 allocations via malloc"), "{text}");
        assert!(!text.contains("programs"), "{text}");
        let mut probed = inputs(&table, &stacks, &tracker, 0);
        probed.probe_stats = vec![
            ProbeStat::new("alloc_return", 4, 1802),
            ProbeStat::new("free_entry", 2, 401),
        ];
        let text = render_text(&snapshot(&probed, &mut sym));
        assert!(
            text.contains("  programs     alloc_return 450 ns x 4, free_entry 200 ns x 2\n"),
            "{text}"
        );
    }
}
