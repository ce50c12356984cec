//! Outputs for the tools people already run: each format is one module that turns a
//! [`Profile`] into bytes (pprof, folded stacks and flamegraphs, DHAT, CSV, HTML), plus the
//! live endpoints (Prometheus metrics, dashboard) that serve a [`LiveState`] while tracing.
//!
//! A `Profile` is built once at the end of a trace (and for the live endpoints at each sample
//! tick) from the table, the analytics and the symbolizer; writers never see aya or the kernel.

pub mod csv;
pub mod dashboard;
pub mod dhat;
pub mod folded;
pub mod html;
pub mod metrics;
pub mod pprof;

use serde::Serialize;

use crate::{analysis::growth::Verdict, report::Report, symbolize::Frame};

/// One call-stack group: every allocation made at one stack through one allocator.
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
    /// Highest outstanding bytes and blocks the site reached.
    pub max_inuse_bytes: u64,
    pub max_inuse_objects: u64,
    /// Frees of the site's blocks, and the summed lifetimes of those freed blocks.
    pub frees: u64,
    pub freed_lifetime_ns: u128,
    /// Outstanding bytes of the site at the sample where the process's heap peaked.
    pub bytes_at_peak: u64,
    pub verdict: Verdict,
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

/// Everything an output is made from.
#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    pub pid: u32,
    /// The traced command (spawn mode) or the process's command line.
    pub command: Vec<String>,
    pub duration_s: f64,
    /// Seconds since the start when the process's heap peaked (among samples).
    pub peak_t_s: f64,
    /// Every site, including those with nothing outstanding, sorted by `inuse_bytes` then
    /// `alloc_bytes`, both descending.
    pub sites: Vec<Site>,
    pub timeline: Vec<TimePoint>,
    /// The report (snapshot or final) the profile goes with.
    pub report: Report,
}

/// What the live endpoints serve, replaced at each sample tick while tracing.
#[derive(Debug, Default)]
pub struct LiveState {
    /// The newest profile (its `report` is a snapshot).
    pub profile: Option<std::sync::Arc<Profile>>,
    /// Number of updates so far.
    pub updates: u64,
    /// Whether the trace has ended (the last profile is final).
    pub finished: bool,
}

/// Shared between the trace and the endpoint threads.
pub type Live = std::sync::Arc<std::sync::Mutex<LiveState>>;

/// Files to write at the end of a trace (`--pprof`, `--folded`, ...).
#[derive(Clone, Debug, Default)]
pub struct OutputFiles {
    pub pprof: Option<std::path::PathBuf>,
    pub folded: Option<std::path::PathBuf>,
    pub flamegraph: Option<std::path::PathBuf>,
    pub dhat: Option<std::path::PathBuf>,
    pub csv: Option<std::path::PathBuf>,
    pub html: Option<std::path::PathBuf>,
}

impl OutputFiles {
    pub fn any(&self) -> bool {
        [
            &self.pprof,
            &self.folded,
            &self.flamegraph,
            &self.dhat,
            &self.csv,
            &self.html,
        ]
        .iter()
        .any(|f| f.is_some())
    }
}

/// Writes every requested file from `profile`: `--pprof` ([`pprof`]), `--folded` (`FILE` and
/// `FILE.alloc`, [`folded`]), `--flamegraph` (`FILE` and its `.alloc.svg` sibling), `--dhat`
/// ([`dhat`]), `--csv` ([`csv`]) and `--html` ([`html`]). Every file is attempted; the error
/// names each one that failed (`failed to write FILE: ...`).
pub fn write_files(profile: &Profile, files: &OutputFiles) -> anyhow::Result<()> {
    use folded::Metric;
    use std::path::Path;

    fn write(path: &Path, bytes: anyhow::Result<Vec<u8>>) -> Result<(), String> {
        bytes
            .and_then(|b| std::fs::write(path, b).map_err(anyhow::Error::from))
            .map_err(|e| format!("failed to write {}: {e:#}", path.display()))
    }
    let mut outcomes = Vec::new();
    if let Some(path) = &files.pprof {
        outcomes.push(write(path, pprof::render(profile)));
    }
    if let Some(path) = &files.folded {
        let text = |m| Ok(folded::render(profile, m).into_bytes());
        let alloc = folded::alloc_folded_path(path);
        outcomes.push(write(path, text(Metric::InUse)));
        outcomes.push(write(&alloc, text(Metric::Allocated)));
    }
    if let Some(path) = &files.flamegraph {
        let svg = |m| folded::flamegraph_svg(profile, m, true).map(String::into_bytes);
        outcomes.push(write(path, svg(Metric::InUse)));
        outcomes.push(write(&folded::alloc_svg_path(path), svg(Metric::Allocated)));
    }
    if let Some(path) = &files.dhat {
        outcomes.push(write(path, dhat::render(profile)));
    }
    if let Some(path) = &files.csv {
        outcomes.push(write(path, Ok(csv::render(profile).into_bytes())));
    }
    if let Some(path) = &files.html {
        outcomes.push(write(path, html::render(profile).map(String::into_bytes)));
    }
    let errors: Vec<String> = outcomes.into_iter().filter_map(Result::err).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", errors.join("; "))
    }
}

/// Serves Prometheus metrics from `live` at `addr` (`--metrics`) on a background thread.
/// `limit` is `--limit` in bytes, exported as `memprof_rss_limit_bytes`.
pub fn serve_metrics(addr: &str, live: Live, limit: Option<u64>) -> anyhow::Result<()> {
    metrics::serve(addr, live, limit)
}

/// Serves the live dashboard from `live` at `addr` (`--ui`) on a background thread.
pub fn serve_ui(addr: &str, live: Live) -> anyhow::Result<()> {
    dashboard::serve(addr, live)
}
