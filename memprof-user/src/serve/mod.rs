//! Endpoints served while tracing: Prometheus metrics ([`metrics`]), beside them the pprof
//! profiles of each process ([`pprof`]), and the live dashboard ([`dashboard`]). Metrics and the
//! dashboard read a [`LiveState`] that the session replaces at each sample tick; profiles are
//! asked of the session itself.

pub mod dashboard;
pub mod http;
pub mod metrics;
pub mod pprof;

use crate::report::Profile;

/// What the live endpoints serve, replaced at each sample tick while tracing.
#[derive(Debug, Default)]
pub struct LiveState {
    /// The newest profile (its `report` is a snapshot).
    pub profile: Option<std::sync::Arc<Profile>>,
    /// Number of updates so far.
    pub updates: u64,
    /// Whether the trace has ended (the last profile is final).
    pub finished: bool,
    /// Where profile requests go while the trace runs (None before and after).
    pub profiles: Option<pprof::Requests>,
}

/// Shared between the trace and the endpoint threads.
pub type Live = std::sync::Arc<std::sync::Mutex<LiveState>>;

/// Serves Prometheus metrics from `live` at `addr` (`--metrics`) on `runtime`. `limit` is
/// `--limit` in bytes, exported as `memprof_rss_limit_bytes`.
pub fn serve_metrics(
    runtime: &tokio::runtime::Handle,
    addr: &str,
    live: Live,
    limit: Option<u64>,
    guard: http::Guard,
) -> anyhow::Result<()> {
    metrics::serve(runtime, addr, live, limit, guard)
}

/// Serves the live dashboard from `live` at `addr` (`--ui`) on `runtime`.
pub fn serve_ui(
    runtime: &tokio::runtime::Handle,
    addr: &str,
    live: Live,
    guard: http::Guard,
) -> anyhow::Result<()> {
    dashboard::serve(runtime, addr, live, guard)
}
