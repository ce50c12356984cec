//! `--metrics ADDR`: Prometheus metrics of the live trace at `GET /metrics`, and beside them
//! the pprof profiles `GET /debug/pprof/heap` and `GET /debug/pprof/allocs` (see
//! [`super::pprof`]).
//!
//! The exposition is OpenMetrics text (`application/openmetrics-text; version=1.0.0`), written
//! by prometheus-client from the newest [`LiveState`] profile at each scrape; Prometheus 2.x
//! asks for it first. Before the first sample tick only `memprof_up 0` is served.
//!
//! `ADDR` is `HOST:PORT` (`127.0.0.1:9464`, `[::1]:9464`, `localhost:9464`); a bare port
//! (`9464` or `:9464`) binds the loopback address 127.0.0.1. memprof binds exactly the address
//! given and never a wildcard unless it is typed (`0.0.0.0:9464`).
//!
//! Every series has a `pid` label. Totals are exported as counters (`_total`), current values as
//! gauges; the per-site series cover the 10 sites holding the most outstanding bytes (sites
//! sharing a name and allocator are summed), so cardinality stays bounded:
//!
//! | metric | type | from |
//! | --- | --- | --- |
//! | `memprof_up` | gauge | 1 once the trace has published state |
//! | `memprof_heap_outstanding_bytes` | gauge | `totals.outstanding_bytes` |
//! | `memprof_heap_outstanding_allocations` | gauge | `totals.outstanding_allocs` |
//! | `memprof_heap_peak_outstanding_bytes` | gauge | `totals.peak_outstanding_bytes` |
//! | `memprof_heap_allocated_bytes_total` | counter | `totals.bytes_allocated` |
//! | `memprof_heap_freed_bytes_total` | counter | `totals.bytes_freed` |
//! | `memprof_allocations_total` | counter | `totals.allocs` |
//! | `memprof_frees_total` | counter | `totals.frees` |
//! | `memprof_mmap_outstanding_bytes` | gauge | `mmap.outstanding_bytes` |
//! | `memprof_rss_bytes` | gauge | `rss_bytes` (absent once the process exited) |
//! | `memprof_heap_growth_bytes_per_second` | gauge | `growth_rate_mb_per_hour` in B/s |
//! | `memprof_lost_events_total` | counter | `totals.lost_events` |
//! | `memprof_lost_stacks_total` | counter | `totals.lost_stacks` |
//! | `memprof_unmatched_frees_total` | counter | `totals.unmatched_frees` |
//! | `memprof_inherited_frees_total` | counter | `totals.inherited_frees` |
//! | `memprof_forgotten_processes_total` | counter | `forgotten.processes` |
//! | `memprof_forgotten_unscraped_processes_total` | counter | `forgotten.unscraped_processes` |
//! | `memprof_forgotten_groups_total` | counter | `forgotten.groups` |
//! | `memprof_profile_sites_over_cap_total` | counter | `forgotten.profile_sites_over_cap` |
//! | `memprof_leak_detected` | gauge | `leak_detected` (0 or 1) |
//! | `memprof_rss_limit_bytes` | gauge | `--limit` (only with `--limit`) |
//! | `memprof_rss_limit_projected_seconds` | gauge | `projected_limit_hours` in s (only while RSS grows towards `--limit`) |
//! | `memprof_site_outstanding_bytes{site,allocator,kind,verdict}` | gauge | top sites' `inuse_bytes` |
//! | `memprof_site_growth_bytes_per_second{site,allocator,kind,verdict}` | gauge | top sites' `growth_bytes_per_s` |
//! | `memprof_site_resident_bytes{site,allocator,kind,verdict}` | gauge | top sites' `resident_bytes` (when RSS is explained) |
//! | `memprof_agent_kept{what}` | gauge | `kept`: the sizes of memprof's own tables (processes, blocks, stacks, sites, groups...) and its own RSS (`what="own_rss_bytes"`), with live endpoints |
//! | `memprof_rss_explained_bytes{part}` | gauge | `rss_explained`: `part` is `live`, `retained`, `other` (they add up to RSS) or `untouched` (allocated, not resident) |

use std::{net::SocketAddr, sync::Arc};

use hyper::{
    Response, StatusCode,
    header::{CACHE_CONTROL, CONTENT_TYPE as CONTENT_TYPE_HEADER},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
    registry::{Registry, Unit},
};

use super::{
    Live, LiveState,
    http::{Ask, Body, Guard, bind, spawn, status, with_header},
    pprof::{Kind, Profiles},
};
use crate::report::{Profile, Site, Verdict, names::site_label};

/// Per-site series: at most this many sites.
pub const TOP_SITES: usize = 10;

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Starts the metrics endpoint on `runtime`; returns once `addr` is bound.
pub fn serve(
    runtime: &tokio::runtime::Handle,
    addr: &str,
    live: Live,
    limit: Option<u64>,
    guard: Guard,
) -> anyhow::Result<()> {
    let bound = start(runtime, addr, live, limit, guard)?;
    eprintln!("memprof: Prometheus metrics at http://{bound}/metrics");
    Ok(())
}

/// [`serve`] without the message: returns the bound address.
pub fn start(
    runtime: &tokio::runtime::Handle,
    addr: &str,
    live: Live,
    limit: Option<u64>,
    guard: Guard,
) -> anyhow::Result<SocketAddr> {
    let (listener, bound) = bind("--metrics", addr)?;
    let profiles = Profiles::new(live.clone());
    let registry = Arc::new(registry(live, limit));
    spawn(
        runtime,
        listener,
        bound,
        guard,
        Arc::new(move |ask| match ask.path {
            "/debug/pprof/heap" => profiles.respond(&ask, Kind::Heap),
            "/debug/pprof/allocs" => profiles.respond(&ask, Kind::Allocs),
            _ => respond(&ask, &registry).into(),
        }),
    )?;
    Ok(bound)
}

fn respond(ask: &Ask<'_>, registry: &Registry) -> Response<Body> {
    match ask.path {
        "/metrics" => {
            let mut body = String::new();
            if let Err(e) = prometheus_client::encoding::text::encode(&mut body, registry) {
                return status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("encoding failed: {e}\n"),
                );
            }
            let r = with_header(
                Response::new(Body::text(body)),
                CONTENT_TYPE_HEADER,
                CONTENT_TYPE,
            );
            with_header(r, CACHE_CONTROL, "no-store")
        }
        "/" => with_header(
            Response::new(Body::text(
                "<!doctype html><title>memprof</title><a href=\"metrics\">metrics</a> \
                 <a href=\"debug/pprof/heap\">heap</a> <a href=\"debug/pprof/allocs\">allocs</a>\n",
            )),
            CONTENT_TYPE_HEADER,
            "text/html; charset=utf-8",
        ),
        _ => status(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// A registry whose one collector reads `live` at each scrape.
pub fn registry(live: Live, limit: Option<u64>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(LiveCollector { live, limit }));
    registry
}

/// The exposition for `state` (what a scrape returns), for tests and one-off use.
pub fn encode(state: LiveState, limit: Option<u64>) -> String {
    let live: Live = std::sync::Arc::new(std::sync::Mutex::new(state));
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, &registry(live, limit))
        .expect("writing to a String cannot fail");
    body
}

#[derive(Debug)]
struct LiveCollector {
    live: Live,
    limit: Option<u64>,
}

impl Collector for LiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Take the profile (an Arc) and let the trace go on while encoding.
        let profile = {
            let state = self.live.lock().unwrap_or_else(|e| e.into_inner());
            state.profile.clone()
        };
        let Some(profile) = profile else {
            return gauge(
                &mut encoder,
                "memprof_up",
                "Whether memprof has published trace state (1) or not yet (0)",
                None,
                &Labels::new(),
                0u64,
            );
        };
        encode_profile(&mut encoder, &profile, self.limit)
    }
}

type Labels = Vec<(&'static str, String)>;

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    labels: &Labels,
    value: impl EncodeGaugeValue,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
    if labels.is_empty() {
        return metric.encode_gauge(&value);
    }
    metric.encode_family(labels)?.encode_gauge(&value)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    labels: &Labels,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    let mut metric = encoder.encode_descriptor(name, help, unit.as_ref(), c.metric_type())?;
    c.encode(metric.encode_family(labels)?)
}

fn encode_profile(
    encoder: &mut DescriptorEncoder,
    profile: &Profile,
    limit: Option<u64>,
) -> Result<(), std::fmt::Error> {
    let r = &profile.report;
    let t = &r.totals;
    let pid: Labels = vec![("pid", profile.pid.to_string())];
    let bytes = || Some(Unit::Bytes);

    gauge(
        encoder,
        "memprof_up",
        "Whether memprof has published trace state (1) or not yet (0)",
        None,
        &pid,
        1u64,
    )?;
    gauge(
        encoder,
        "memprof_heap_outstanding",
        "Heap bytes allocated during the trace and not freed",
        bytes(),
        &pid,
        t.heap.outstanding_bytes,
    )?;
    gauge(
        encoder,
        "memprof_heap_outstanding_allocations",
        "Heap blocks allocated during the trace and not freed",
        None,
        &pid,
        t.heap.outstanding_allocs,
    )?;
    gauge(
        encoder,
        "memprof_heap_peak_outstanding",
        "Highest outstanding heap bytes during the trace",
        bytes(),
        &pid,
        t.heap.peak_outstanding_bytes,
    )?;
    counter(
        encoder,
        "memprof_heap_allocated",
        "Bytes allocated by malloc-family calls during the trace",
        bytes(),
        &pid,
        t.heap.bytes_allocated,
    )?;
    counter(
        encoder,
        "memprof_heap_freed",
        "Bytes freed (of blocks allocated during the trace)",
        bytes(),
        &pid,
        t.heap.bytes_freed,
    )?;
    counter(
        encoder,
        "memprof_allocations",
        "Malloc-family allocations seen",
        None,
        &pid,
        t.heap.allocs,
    )?;
    counter(
        encoder,
        "memprof_frees",
        "Frees of blocks allocated during the trace",
        None,
        &pid,
        t.heap.frees,
    )?;
    gauge(
        encoder,
        "memprof_mmap_outstanding",
        "Anonymous mmap bytes mapped outside malloc-family calls and not unmapped",
        bytes(),
        &pid,
        r.mmap.outstanding_bytes,
    )?;
    if let Some(rss) = r.rss_bytes {
        gauge(
            encoder,
            "memprof_rss",
            "Resident set size of the traced process",
            bytes(),
            &pid,
            rss,
        )?;
    }
    if let Some(mb_per_hour) = r.growth_rate_mb_per_hour.filter(|v| v.is_finite()) {
        gauge(
            encoder,
            "memprof_heap_growth",
            "Growth of the outstanding heap over the trace (least squares)",
            Some(Unit::Other("bytes_per_second".into())),
            &pid,
            mb_per_hour * 1e6 / 3600.0,
        )?;
    }
    counter(
        encoder,
        "memprof_lost_events",
        "Events dropped before memprof could count them (ring buffer full, and the like)",
        None,
        &pid,
        t.lost_events,
    )?;
    counter(
        encoder,
        "memprof_lost_stacks",
        "Allocations recorded without a call stack",
        None,
        &pid,
        t.lost_stacks,
    )?;
    counter(
        encoder,
        "memprof_unmatched_frees",
        "Frees of blocks memprof did not see allocated (allocated before attach)",
        None,
        &pid,
        t.heap.unmatched_frees,
    )?;
    counter(
        encoder,
        "memprof_inherited_frees",
        "Frees, in a forked process, of blocks its parent held when it forked",
        None,
        &pid,
        t.heap.inherited_frees,
    )?;
    let f = &r.forgotten;
    for (name, help, value) in [
        (
            "memprof_forgotten_processes",
            "Exited processes no longer reported, to keep memory bounded",
            f.processes,
        ),
        (
            "memprof_forgotten_unscraped_processes",
            "Exited processes forgotten before a profile scrape saw them (over 4096 unseen)",
            f.unscraped_processes,
        ),
        (
            "memprof_forgotten_groups",
            "Idle call-site groups with nothing outstanding forgotten, to keep memory bounded",
            f.groups,
        ),
        (
            "memprof_profile_sites_over_cap",
            "Allocations at call sites beyond the 4096 kept per process for the profiles",
            f.profile_sites_over_cap,
        ),
    ] {
        counter(encoder, name, help, None, &pid, value)?;
    }
    gauge(
        encoder,
        "memprof_leak_detected",
        "1 when a call site's verdict is leak (steady growth), else 0",
        None,
        &pid,
        u64::from(r.leak_detected),
    )?;
    if let Some(limit) = limit {
        gauge(
            encoder,
            "memprof_rss_limit",
            "The memory limit given with --limit",
            bytes(),
            &pid,
            limit,
        )?;
    }
    if let Some(Some(hours)) = r.projected_limit_hours
        && hours.is_finite()
    {
        gauge(
            encoder,
            "memprof_rss_limit_projected",
            "Time until RSS reaches --limit at its current growth",
            Some(Unit::Seconds),
            &pid,
            hours * 3600.0,
        )?;
    }

    // Each field of `kept` by its JSON name.
    if let Some(serde_json::Value::Object(kept)) =
        r.kept.map(serde_json::to_value).and_then(Result::ok)
    {
        let mut metric = encoder.encode_descriptor(
            "memprof_agent_kept",
            "What memprof itself keeps now, by table (entries; own_rss_bytes: its resident bytes)",
            None,
            MetricType::Gauge,
        )?;
        for (what, value) in kept.iter().filter_map(|(k, v)| Some((k, v.as_u64()?))) {
            let labels: Labels = vec![("pid", profile.pid.to_string()), ("what", what.clone())];
            metric.encode_family(&labels)?.encode_gauge(&value)?;
        }
    }

    if let Some(e) = &r.rss_explained {
        let mut metric = encoder.encode_descriptor(
            "memprof_rss_explained",
            "RSS split into live allocations, memory the allocator retains and other memory \
             (these three add up to RSS), and allocated bytes never made resident",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?;
        for (part, value) in [
            ("live", e.live_resident_bytes),
            ("retained", e.allocator_retained_bytes),
            ("other", e.other_resident_bytes),
            ("untouched", e.untouched_live_bytes),
        ] {
            let labels: Labels = vec![("pid", profile.pid.to_string()), ("part", part.to_string())];
            metric.encode_family(&labels)?.encode_gauge(&value)?;
        }
    }

    let top = top_sites(&profile.sites, TOP_SITES);
    let site_labels = |s: &SiteSum| -> Labels {
        vec![
            ("pid", profile.pid.to_string()),
            ("site", s.site.clone()),
            ("allocator", s.allocator.to_string()),
            ("kind", s.kind.to_string()),
            ("verdict", s.verdict.as_str().to_string()),
        ]
    };
    {
        let mut metric = encoder.encode_descriptor(
            "memprof_site_outstanding",
            "Outstanding bytes of the call sites holding the most (top 10)",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?;
        for s in &top {
            metric
                .encode_family(&site_labels(s))?
                .encode_gauge(&s.inuse_bytes)?;
        }
    }
    {
        let unit = Unit::Other("bytes_per_second".into());
        let mut metric = encoder.encode_descriptor(
            "memprof_site_growth",
            "Growth of the top call sites' outstanding bytes (least squares)",
            Some(&unit),
            MetricType::Gauge,
        )?;
        for s in &top {
            metric
                .encode_family(&site_labels(s))?
                .encode_gauge(&s.growth_bytes_per_s)?;
        }
    }
    if top.iter().any(|s| s.resident_bytes.is_some()) {
        let mut metric = encoder.encode_descriptor(
            "memprof_site_resident",
            "Of the top call sites' outstanding bytes, those in resident pages",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?;
        for s in &top {
            if let Some(resident) = s.resident_bytes {
                metric
                    .encode_family(&site_labels(s))?
                    .encode_gauge(&resident)?;
            }
        }
    }
    Ok(())
}

/// Sites merged by name and allocator (so label sets are unique).
#[derive(Clone, Debug, PartialEq)]
pub struct SiteSum {
    pub site: String,
    pub allocator: &'static str,
    pub kind: &'static str,
    /// The most alarming verdict among the merged sites.
    pub verdict: Verdict,
    pub inuse_bytes: u64,
    pub inuse_objects: u64,
    pub growth_bytes_per_s: f64,
    /// Of `inuse_bytes`, those in resident pages (None when RSS was not explained).
    pub resident_bytes: Option<u64>,
}

/// The `n` sites (merged by [`site_label`], allocator and kind) holding the most outstanding
/// bytes; sites holding nothing are left out.
pub fn top_sites(sites: &[Site], n: usize) -> Vec<SiteSum> {
    let mut merged: Vec<SiteSum> = Vec::new();
    for site in sites.iter().filter(|s| s.inuse_bytes > 0) {
        let name = site_label(site);
        match merged
            .iter_mut()
            .find(|m| m.site == name && m.allocator == site.allocator && m.kind == site.kind)
        {
            Some(m) => {
                m.inuse_bytes += site.inuse_bytes;
                m.inuse_objects += site.inuse_objects;
                m.growth_bytes_per_s += site.growth_bytes_per_s;
                m.resident_bytes = match (m.resident_bytes, site.resident_bytes) {
                    (Some(a), Some(b)) => Some(a + b),
                    (a, b) => a.or(b),
                };
                if severity(site.verdict) > severity(m.verdict) {
                    m.verdict = site.verdict;
                }
            }
            None => merged.push(SiteSum {
                site: name,
                allocator: site.allocator,
                kind: site.kind,
                verdict: site.verdict,
                inuse_bytes: site.inuse_bytes,
                inuse_objects: site.inuse_objects,
                growth_bytes_per_s: site.growth_bytes_per_s,
                resident_bytes: site.resident_bytes,
            }),
        }
    }
    merged.sort_by(|a, b| {
        b.inuse_bytes
            .cmp(&a.inuse_bytes)
            .then_with(|| a.site.cmp(&b.site))
            .then_with(|| a.allocator.cmp(b.allocator))
    });
    merged.truncate(n);
    merged
}

/// How alarming a verdict is, for merging.
pub fn severity(v: Verdict) -> u8 {
    match v {
        Verdict::Leak => 4,
        Verdict::Growing => 3,
        Verdict::Unknown => 2,
        Verdict::Stable => 1,
        Verdict::Churn => 0,
    }
}

#[cfg(test)]
pub(super) mod tests;
