//! The report model: what a trace found, as plain data that serializes to the NDJSON records
//! (`"type":"snapshot"` / `"type":"report"`), and the [`Profile`] every output format is made
//! from. [`build`] fills them from the table and the analytics state; [`names`] is the one place
//! that names frames and sites and formats byte counts. Outputs depend on this layer only.

mod build;
pub mod names;
pub mod processes;
pub mod saved;

use serde::Serialize;

use crate::table::is_zero;

pub use self::build::{Inputs, ProcessInfo, finish, process_report, profile, snapshot};
pub use crate::{
    analysis::{
        behaviour::BehaviourSummary, categories::Category, growth::Verdict,
        recommend::Recommendation, rss::RssExplained, tracking::PhaseReport,
    },
    probe::{KernelLosses, ProbeStat},
    stacks::{Frame, python::PythonStatus},
    table::{HeapTotals, MmapTotals},
};

/// What a long trace stopped keeping (see `Inputs::forgotten`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Forgotten {
    /// Exited processes beyond the most recent 256, whose blocks count as freed (with live
    /// endpoints: once a profile scrape saw them, or beyond 4096 unseen).
    pub processes: u64,
    /// Of those, processes forgotten before a profile scrape saw them after their exit (live
    /// endpoints only).
    #[serde(skip_serializing_if = "is_zero")]
    pub unscraped_processes: u64,
    /// Call-site groups with nothing outstanding and idle for a minute, beyond 20 000.
    pub groups: u64,
    /// Allocations at call sites beyond the 4096 kept per process for the live profiles
    /// (served summed as `[sites over cap]`).
    #[serde(skip_serializing_if = "is_zero")]
    pub profile_sites_over_cap: u64,
}

impl Forgotten {
    fn is_none(&self) -> bool {
        *self == Self::default()
    }
}

/// What the agent keeps now, entry by entry: the sizes of its own tables, so that an
/// operator sees what its memory holds (`memprof_agent_kept` with live endpoints).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Kept {
    /// Processes known (live, and exited ones still reported).
    pub processes: u64,
    /// Of those, exited ones still reported.
    pub exited_processes: u64,
    /// Processes with an allocation table, and the outstanding blocks in them.
    pub tables: u64,
    pub blocks: u64,
    /// Raw stacks kept, and the raw stack keys the processes still reported use.
    pub stacks: u64,
    pub stack_keys: u64,
    /// Distinct call sites and frames named so far, and raw stacks mapped to a site.
    pub sites: u64,
    pub frames: u64,
    pub site_keys: u64,
    /// Modules (mapped files) the stacks refer to.
    pub modules: u64,
    /// Call-site groups tracked, and the slots of their peaks.
    pub groups: u64,
    pub peak_slots: u64,
    /// Processes with call sites kept for the live profiles, and their groups.
    pub profile_processes: u64,
    pub profile_groups: u64,
    /// `--unwind dwarf`: processes with an unwinder, and objects read for them.
    pub unwinders: u64,
    pub unwind_objects: u64,
    /// Tracker inputs waiting for names, and stacks sent for naming.
    pub queued_inputs: u64,
    pub naming: u64,
    /// CPython processes followed.
    pub pythons: u64,
    /// Files of processes under another root (containers) kept open, one per file however
    /// many processes map it; and those left out over the cap of 4096.
    pub foreign_files: u64,
    pub foreign_files_over_cap: u64,
    /// memprof's own resident memory (bytes).
    pub own_rss_bytes: u64,
}

/// How stacks were unwound with `--unwind dwarf` or `--unwind tables`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct UnwindStats {
    /// `tables` or `dwarf`.
    pub mode: &'static str,
    /// Allocations whose stack was unwound.
    pub allocations: u64,
    /// Distinct stacks they produced.
    pub stacks: u64,
    /// Distinct stacks whose unwind stopped before the outermost frame (the copy ended, or no
    /// rule applied); with `dwarf` they end in a frame of kind `unknown`.
    pub truncated_stacks: u64,
    /// `tables`: how far the kernel's walks got, in allocated bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tables: Option<TableWalks>,
}

/// What the kernel's table walks reached (`--unwind tables`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TableWalks {
    /// Bytes allocated (as recorded: sampled ones with `--sample-bytes`).
    pub bytes: u64,
    /// Of those, bytes whose stack reached the program's or the thread's entry.
    pub entry_bytes: u64,
    /// `entry_bytes` / `bytes`.
    pub entry_share: f64,
    /// Bytes by how their stack's walk ended (`entry`, `no mapping`, `no rule`, `mappings
    /// unknown` for a process whose mappings memprof had not told the kernel yet, ...).
    pub ends: std::collections::BTreeMap<&'static str, u64>,
    /// Files with a table in the kernel, their rows, and files that got none.
    pub files: u64,
    pub rows: u64,
    pub files_without_table: u64,
    /// Processes whose mapping list found no room in the kernel (their allocations went out
    /// with stack copies).
    pub processes_without_maps: u64,
    /// Walks the kernel took from its per-CPU cache of whole walks: the same first frame and
    /// stack pointer, and the same values in every word of stack the walk had read.
    pub cached_walks: u64,
}

/// The report's `totals`: the table's heap counts and what was lost on the way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    #[serde(flatten)]
    pub heap: HeapTotals,
    /// Events that never reached the table: ring full, state map full, undecodable records,
    /// records left unread at the end.
    pub lost_events: u64,
    /// Of `lost_events`: records still in the ring when the trace's end had spent its time on
    /// it (a process that allocated flat out until the end), let go unread.
    pub unread_at_end: u64,
    /// Allocations recorded without a stack.
    pub lost_stacks: u64,
}

impl Totals {
    fn new(heap: &HeapTotals, k: &KernelLosses, decode_errors: u64, unread_at_end: u64) -> Self {
        Self {
            heap: *heap,
            lost_events: k.ring_full
                + k.inflight_full
                + k.sampled_full
                + k.kmem_full
                + decode_errors
                + unread_at_end,
            unread_at_end,
            lost_stacks: k.stack_lost,
        }
    }
}

/// The heap at its highest (the malloc family's outstanding bytes; anonymous mappings apart):
/// when, and what each call site held then, exact (kept while tracing, not sampled).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Peak {
    pub bytes: u64,
    pub allocs: u64,
    /// Seconds since the trace started (µs resolution); the first moment of a tie.
    pub at_s: f64,
    /// Sampled traces: 95% confidence intervals of `bytes` and `allocs` (the exact peak lies
    /// in them with probability at least 95%: see `analysis::peak`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_interval: Option<[u64; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocs_interval: Option<[u64; 2]>,
    /// The call sites holding something at the peak, largest first (`--top` of them).
    pub sites: Vec<PeakSite>,
    /// Sites at the peak beyond `--top`, and what they held together.
    #[serde(skip_serializing_if = "is_zero")]
    pub other_sites: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub other_bytes: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub other_allocs: u64,
}

/// One phase's accounting, and the sites holding something at the phase's own peak (the
/// heap's highest while it was active), largest first (`--top` of them).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Phase {
    #[serde(flatten)]
    pub phase: PhaseReport,
    pub peak_sites: Vec<PeakSite>,
}

impl From<PhaseReport> for Phase {
    fn from(phase: PhaseReport) -> Self {
        Self {
            phase,
            peak_sites: Vec::new(),
        }
    }
}

impl std::ops::Deref for Phase {
    type Target = PhaseReport;
    fn deref(&self) -> &PhaseReport {
        &self.phase
    }
}

/// What one call site (and allocator) held at a peak.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeakSite {
    pub bytes: u64,
    pub allocs: u64,
    pub allocator: &'static str,
    /// Innermost first; the allocator's own frames are not included.
    pub stack: Vec<Frame>,
}

/// Outstanding allocations sharing one call site (symbolized stack) and allocator.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Leak {
    pub bytes: u64,
    pub allocs: u64,
    /// Sampled traces: 95% confidence intervals of `bytes` and `allocs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_interval: Option<[u64; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocs_interval: Option<[u64; 2]>,
    pub oldest_age_s: f64,
    pub allocator: &'static str,
    /// `heap` (malloc family) or `mmap` (anonymous mapping outside the allocator).
    pub kind: &'static str,
    /// Growth of the group's outstanding bytes over the trace (least squares), and the verdict
    /// drawn from it: `leak`, `growing`, `stable`, `churn` or `unknown` (too few samples).
    pub verdict: Verdict,
    /// Why the verdict is `unknown` (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict_reason: Option<&'static str>,
    pub confidence: f64,
    /// Of `bytes`, those in resident pages (absent when RSS could not be explained).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resident_bytes: Option<u64>,
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
    /// Frames that could not be unwound or named (no function: `module+0xOFFSET`, `[unknown]`,
    /// an unreadable Python frame), over the stacks of every call site of the trace (each
    /// group of `--csv` and pprof, not only `leaks`), out of `stack_frames` frames.
    pub unknown_frames: u64,
    pub stack_frames: u64,
    /// Whether any call-stack group has the verdict `leak`.
    pub leak_detected: bool,
    /// Growth of the process's outstanding heap bytes over the trace (1 MB = 10^6 bytes),
    /// null when the samples do not support one (`growth_rate_note` says why).
    pub growth_rate_mb_per_hour: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub growth_rate_note: Option<String>,
    /// The heap at its peak and who held it.
    pub peak: Peak,
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
    /// RSS split into live allocations, memory the allocator retains, and the rest (see
    /// `analysis::rss`); absent once the process exited, with byte sampling, or when its
    /// `/proc` files could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_explained: Option<RssExplained>,
    pub phases: Vec<Phase>,
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
    /// With live endpoints: what the agent keeps now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<Kept>,
    /// Present when the process runs CPython: whether its Python frames are read, and if not
    /// why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonStatus>,
}

/// How a sampled trace was sampled, and how far its estimates may be from the exact values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Sampling {
    /// Mean sampling interval in bytes: each allocation of `s` bytes was recorded with
    /// probability `1 - exp(-s / mean_bytes)` and stands for `1 / p` allocations and `s / p`
    /// bytes.
    pub mean_bytes: u64,
    /// Always true: counts and bytes are unbiased estimates, not exact.
    pub estimated: bool,
    /// 95% confidence intervals `[low, high]` of the heap totals' estimates
    /// (`totals.bytes_allocated`, `totals.allocs`, `totals.outstanding_bytes`,
    /// `totals.outstanding_allocs`); the peak's are in `peak`, each site's in its `leaks` entry.
    pub bytes_allocated_interval: [u64; 2],
    pub allocs_interval: [u64; 2],
    pub outstanding_bytes_interval: [u64; 2],
    pub outstanding_allocs_interval: [u64; 2],
}

/// A call site that allocates and frees a lot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hotspot {
    pub site: String,
    pub allocator: &'static str,
    /// The site's verdict, as everywhere else (a hotspot is listed for its churn whatever its
    /// verdict), and why it is `unknown` when it is.
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict_reason: Option<&'static str>,
    pub behaviour: BehaviourSummary,
    /// Innermost frames (up to 5).
    pub stack: Vec<Frame>,
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
    /// Least-squares growth of its outstanding heap bytes over its life in the trace, null
    /// when the samples do not support one (`growth_rate_note` says why).
    pub growth_rate_mb_per_hour: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub growth_rate_note: Option<String>,
    /// This process's heap at its peak and who held it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak: Option<Peak>,
    pub rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_explained: Option<RssExplained>,
    /// Whether one of its call-stack groups has the verdict `leak`.
    pub leak_detected: bool,
    pub leak_groups: usize,
    pub leaks: Vec<Leak>,
    /// Present when it runs CPython (see [`Report::python`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonStatus>,
}

/// One call-site group: every allocation made at one symbolized stack through one allocator.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Site {
    /// Innermost first, allocator frames excluded.
    pub stack: Vec<Frame>,
    pub allocator: &'static str,
    /// `heap` or `mmap`.
    pub kind: &'static str,
    /// Allocations made during the trace, and their bytes.
    pub alloc_objects: u64,
    pub alloc_bytes: u64,
    /// Still outstanding at the end (or now, for live state).
    pub inuse_objects: u64,
    pub inuse_bytes: u64,
    /// Of `inuse_bytes`, those in resident pages (None when RSS could not be explained).
    pub resident_bytes: Option<u64>,
    /// Highest outstanding bytes and blocks the site reached.
    pub max_inuse_bytes: u64,
    pub max_inuse_objects: u64,
    /// Frees of the site's blocks, and the summed lifetimes of those freed blocks.
    pub frees: u64,
    pub freed_lifetime_ns: u128,
    /// What the site held when the heap peaked (exact: see [`Peak`]).
    pub bytes_at_peak: u64,
    pub objects_at_peak: u64,
    pub verdict: Verdict,
    /// Why the verdict is `unknown` (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict_reason: Option<&'static str>,
    pub growth_bytes_per_s: f64,
    /// When the site first and last allocated (ns since the trace started).
    pub first_alloc_ns: u64,
    pub last_alloc_ns: u64,
}

/// One sample of the process.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TimePoint {
    /// Seconds since the trace started.
    pub t_s: f64,
    pub heap_bytes: u64,
    pub rss_bytes: Option<u64>,
}

/// RSS explained at one snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RssPoint {
    /// Seconds since the trace started.
    pub t_s: f64,
    #[serde(flatten)]
    pub rss: RssExplained,
}

/// Everything an output is made from.
#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    pub pid: u32,
    /// The traced command (spawn mode) or the process's command line.
    pub command: Vec<String>,
    pub duration_s: f64,
    /// Seconds since the start when the heap peaked (exact, see [`Peak`]).
    pub peak_t_s: f64,
    /// Every site, including those with nothing outstanding, sorted by `inuse_bytes` then
    /// `alloc_bytes`, both descending.
    pub sites: Vec<Site>,
    pub timeline: Vec<TimePoint>,
    /// RSS explained at each snapshot of the main process.
    pub rss_timeline: Vec<RssPoint>,
    /// The report (snapshot or final) the profile goes with.
    pub report: Report,
}

#[cfg(test)]
pub(crate) use build::tests as fixtures;

#[cfg(test)]
pub(crate) mod sample;
