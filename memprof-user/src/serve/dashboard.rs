//! `--ui ADDR`: a live dashboard of the trace in the browser.
//!
//! - `GET /`: one self-contained HTML page (inline CSS and JavaScript, no external URL): a chart
//!   of outstanding heap and RSS over time (the profile's `timeline`, drawn as inline SVG), the
//!   totals, and the top growing call sites (verdict, outstanding bytes, growth per second).
//! - `GET /events`: Server-Sent Events (`text/event-stream`), one `data: {json}` message per
//!   live update (every `--sample-every`), the JSON being what `/api/state` returns; when the
//!   trace ends the final state is followed by an `end` event (the page then closes the
//!   connection; other clients see it close when memprof exits).
//! - `GET /api/state`: the newest state as JSON: `updates`, `finished` and, once the trace has
//!   published, `pid`, `command`, `elapsed_s`, the totals, `timeline` and `sites` (the top
//!   growing sites, with their innermost frames).
//!
//! `ADDR` follows `--metrics`: `HOST:PORT`, or a bare port bound on 127.0.0.1.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::{
    Method, Response, StatusCode,
    body::Bytes,
    header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderName},
};
use serde::Serialize;
use tokio::sync::mpsc;

use super::{
    Live, LiveState,
    http::{Ask, Body, Guard, bind, spawn, status, with_header},
    metrics::severity,
};
use crate::report::{
    Profile, Site, TimePoint, Verdict,
    names::{frame_name, site_label},
};

/// Rows of the sites table.
pub const TOP_GROWING: usize = 15;
/// Frames listed per site.
const FRAMES: usize = 8;
/// Concurrent `/events` streams.
const MAX_STREAMS: usize = 32;
/// How often a stream looks for a new update.
const POLL: Duration = Duration::from_millis(100);
/// A comment is sent after this long without an update, to notice closed connections.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Starts the dashboard on `runtime`; returns once `addr` is bound.
pub fn serve(
    runtime: &tokio::runtime::Handle,
    addr: &str,
    live: Live,
    guard: Guard,
) -> anyhow::Result<()> {
    let bound = start(runtime, addr, live, guard)?;
    eprintln!("memprof: live dashboard at http://{bound}/");
    Ok(())
}

/// [`serve`] without the message: returns the bound address.
pub fn start(
    runtime: &tokio::runtime::Handle,
    addr: &str,
    live: Live,
    guard: Guard,
) -> anyhow::Result<SocketAddr> {
    let (listener, bound) = bind("--ui", addr)?;
    let shared = Arc::new(Shared {
        live,
        cache: Mutex::new(None),
        streams: Arc::new(AtomicUsize::new(0)),
    });
    spawn(
        runtime,
        listener,
        bound,
        guard,
        Arc::new(move |ask| route(&ask, &shared).into()),
    )?;
    Ok(bound)
}

struct Shared {
    live: Live,
    /// The JSON of the newest state, keyed by (updates, finished).
    cache: Mutex<Option<Current>>,
    streams: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct Current {
    updates: u64,
    finished: bool,
    json: Arc<String>,
}

impl Shared {
    /// The newest state and its JSON (serialized once per update, outside the live lock).
    fn current(&self) -> Current {
        let (updates, finished, profile) = {
            let s = self.live.lock().unwrap_or_else(|e| e.into_inner());
            (s.updates, s.finished, s.profile.clone())
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.as_ref()
            && c.updates == updates
            && c.finished == finished
        {
            return c.clone();
        }
        let json = serde_json::to_string(&view(updates, finished, profile.as_deref()))
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        let current = Current {
            updates,
            finished,
            json: Arc::new(json),
        };
        *cache = Some(current.clone());
        current
    }
}

fn route(ask: &Ask<'_>, shared: &Arc<Shared>) -> Response<Body> {
    match ask.path {
        "/" | "/index.html" => {
            let r = with_header(
                Response::new(Body::text(PAGE)),
                CONTENT_TYPE,
                "text/html; charset=utf-8",
            );
            let r = with_header(r, CACHE_CONTROL, "no-store");
            with_header(
                r,
                CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; \
                 style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'",
            )
        }
        "/api/state" => {
            let current = shared.current();
            let r = with_header(
                Response::new(Body::text(current.json.as_str())),
                CONTENT_TYPE,
                "application/json",
            );
            with_header(r, CACHE_CONTROL, "no-store")
        }
        "/events" => {
            if shared.streams.fetch_add(1, Ordering::SeqCst) >= MAX_STREAMS {
                shared.streams.fetch_sub(1, Ordering::SeqCst);
                return status(StatusCode::SERVICE_UNAVAILABLE, "too many event streams\n");
            }
            let head = ask.method == Method::HEAD;
            let body = if head {
                shared.streams.fetch_sub(1, Ordering::SeqCst);
                Body::empty()
            } else {
                let (tx, rx) = mpsc::channel(4);
                tokio::spawn(stream(tx, shared.clone()));
                Body::Stream(rx, ask.busy())
            };
            let r = with_header(Response::new(body), CONTENT_TYPE, "text/event-stream");
            let r = with_header(r, CACHE_CONTROL, "no-store");
            with_header(r, HeaderName::from_static("x-accel-buffering"), "no")
        }
        // Browsers ask for it; there is none.
        "/favicon.ico" => status(StatusCode::NO_CONTENT, ""),
        _ => status(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Feeds one `/events` client until the trace ends or the client goes away (its body, and with
/// it the receiver, is dropped).
async fn stream(tx: mpsc::Sender<Bytes>, shared: Arc<Shared>) {
    let _counted = StreamCount(shared.streams.clone());
    if tx
        .send(Bytes::from_static(b"retry: 2000\n\n"))
        .await
        .is_err()
    {
        return;
    }
    let mut sent = None;
    let mut last_write = Instant::now();
    loop {
        let current = shared.current();
        if current.updates > 0 && sent != Some(current.updates) {
            let msg = format!(
                "id: {}\ndata: {}\n\n",
                current.updates,
                current.json.as_str()
            );
            if tx.send(Bytes::from(msg)).await.is_err() {
                return;
            }
            sent = Some(current.updates);
            last_write = Instant::now();
        }
        if current.finished {
            let _ = tx
                .send(Bytes::from_static(b"event: end\ndata: {}\n\n"))
                .await;
            return;
        }
        if last_write.elapsed() >= KEEPALIVE {
            if tx
                .send(Bytes::from_static(b": keepalive\n\n"))
                .await
                .is_err()
            {
                return;
            }
            last_write = Instant::now();
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One `/events` stream counted against [`MAX_STREAMS`] while it lives.
struct StreamCount(Arc<AtomicUsize>);

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What `/api/state` and each event carry.
#[derive(Serialize)]
pub struct View<'a> {
    pub updates: u64,
    pub finished: bool,
    #[serde(flatten)]
    pub trace: Option<TraceView<'a>>,
}

#[derive(Serialize)]
pub struct TraceView<'a> {
    pub pid: u32,
    pub command: &'a [String],
    pub elapsed_s: f64,
    pub heap_outstanding_bytes: u64,
    pub heap_outstanding_allocations: u64,
    pub heap_peak_outstanding_bytes: u64,
    pub allocations: u64,
    pub frees: u64,
    pub mmap_outstanding_bytes: u64,
    pub rss_bytes: Option<u64>,
    /// RSS split into live, retained by the allocator and other (absent when not explained).
    pub rss_explained: Option<crate::report::RssExplained>,
    pub growth_rate_mb_per_hour: Option<f64>,
    pub projected_limit_hours: Option<f64>,
    pub leak_detected: bool,
    pub lost_events: u64,
    pub unmatched_frees: u64,
    pub timeline: &'a [TimePoint],
    /// Sites with outstanding bytes or growth.
    pub site_count: usize,
    pub sites: Vec<SiteView>,
}

#[derive(Serialize)]
pub struct SiteView {
    pub site: String,
    pub allocator: &'static str,
    pub kind: &'static str,
    pub verdict: Verdict,
    pub bytes: u64,
    /// Of `bytes`, those in resident pages (absent when RSS was not explained).
    pub resident_bytes: Option<u64>,
    pub allocs: u64,
    pub growth_bytes_per_s: f64,
    /// Innermost first: function names, or `module@addr`.
    pub stack: Vec<String>,
}

/// The view of one state.
pub fn view(updates: u64, finished: bool, profile: Option<&Profile>) -> View<'_> {
    View {
        updates,
        finished,
        trace: profile.map(trace_view),
    }
}

/// The view of a [`LiveState`].
pub fn state_json(state: &LiveState) -> String {
    serde_json::to_string(&view(
        state.updates,
        state.finished,
        state.profile.as_deref(),
    ))
    .expect("the view serializes")
}

fn trace_view(p: &Profile) -> TraceView<'_> {
    let r = &p.report;
    let (sites, site_count) = top_growing(&p.sites, TOP_GROWING);
    TraceView {
        pid: p.pid,
        command: &p.command,
        elapsed_s: r.elapsed_s,
        heap_outstanding_bytes: r.totals.heap.outstanding_bytes,
        heap_outstanding_allocations: r.totals.heap.outstanding_allocs,
        heap_peak_outstanding_bytes: r.totals.heap.peak_outstanding_bytes,
        allocations: r.totals.heap.allocs,
        frees: r.totals.heap.frees,
        mmap_outstanding_bytes: r.mmap.outstanding_bytes,
        rss_bytes: r.rss_bytes,
        rss_explained: r.rss_explained,
        growth_rate_mb_per_hour: r.growth_rate_mb_per_hour,
        projected_limit_hours: r.projected_limit_hours.flatten(),
        leak_detected: r.leak_detected,
        lost_events: r.totals.lost_events,
        unmatched_frees: r.totals.heap.unmatched_frees,
        timeline: &p.timeline,
        site_count,
        sites,
    }
}

/// The `n` sites growing fastest (then holding the most), among those holding or gaining
/// memory; and how many there are.
fn top_growing(sites: &[Site], n: usize) -> (Vec<SiteView>, usize) {
    let mut live: Vec<&Site> = sites
        .iter()
        .filter(|s| s.inuse_bytes > 0 || s.growth_bytes_per_s > 0.0)
        .collect();
    let count = live.len();
    live.sort_by(|a, b| {
        b.growth_bytes_per_s
            .total_cmp(&a.growth_bytes_per_s)
            .then(severity(b.verdict).cmp(&severity(a.verdict)))
            .then(b.inuse_bytes.cmp(&a.inuse_bytes))
    });
    live.truncate(n);
    let rows = live
        .into_iter()
        .map(|s| SiteView {
            site: site_label(s),
            allocator: s.allocator,
            kind: s.kind,
            verdict: s.verdict,
            bytes: s.inuse_bytes,
            resident_bytes: s.resident_bytes,
            allocs: s.inuse_objects,
            growth_bytes_per_s: s.growth_bytes_per_s,
            stack: s.stack.iter().take(FRAMES).map(frame_name).collect(),
        })
        .collect();
    (rows, count)
}

/// The page: inline CSS and JavaScript, an inline SVG chart, nothing fetched but `events`.
const PAGE: &str = include_str!("dashboard.html");

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader, Read as _, Write as _},
        net::TcpStream,
        time::Duration,
    };

    use super::*;
    use crate::serve::{
        http::test_runtime,
        metrics::tests::{profile, site},
    };

    #[test]
    fn page_is_self_contained() {
        assert!(!PAGE.contains("http:") && !PAGE.contains("https:") && !PAGE.contains("//cdn"));
        for id in [
            "id=\"updates\"",
            "id=\"chart\"",
            "id=\"heap-line\"",
            "id=\"rss-line\"",
            "id=\"sites\"",
            "new EventSource(",
        ] {
            assert!(PAGE.contains(id), "{id}");
        }
    }

    #[test]
    fn view_json() {
        let p = profile(vec![
            site("steady", "malloc", 5000, Verdict::Stable),
            site("leaky", "malloc", 100, Verdict::Leak),
            site("done", "malloc", 0, Verdict::Churn),
        ]);
        let mut sites = p.sites.clone();
        sites[0].growth_bytes_per_s = 0.0;
        sites[1].growth_bytes_per_s = 12.5;
        sites[2].growth_bytes_per_s = 0.0;
        let p = Profile { sites, ..p };
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&view(4, false, Some(&p))).unwrap())
                .unwrap();
        assert_eq!(v["updates"], 4);
        assert_eq!(v["pid"], 42);
        assert_eq!(v["heap_outstanding_bytes"], 4000);
        assert_eq!(v["rss_bytes"], 1 << 20);
        assert_eq!(v["rss_explained"]["allocator_retained_bytes"], 200_000);
        assert_eq!(v["rss_explained"]["live_resident_bytes"], 300_000);
        assert_eq!(v["timeline"].as_array().unwrap().len(), 2);
        assert_eq!(v["timeline"][1]["rss_bytes"], serde_json::Value::Null);
        assert_eq!(v["site_count"], 2);
        assert_eq!(v["sites"][0]["site"], "leaky");
        assert_eq!(v["sites"][0]["resident_bytes"], 50, "half of its 100 B");
        assert_eq!(v["sites"][0]["verdict"], "leak");
        assert_eq!(v["sites"][0]["growth_bytes_per_s"], 12.5);
        assert_eq!(v["sites"][0]["stack"][1], "main");
        assert_eq!(v["sites"][1]["site"], "steady");
        let empty = state_json(&LiveState::default());
        assert_eq!(empty, r#"{"updates":0,"finished":false}"#);
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_page_state_and_events() {
        let rt = test_runtime();
        let live: Live = Arc::default();
        let addr = start(rt.handle(), "127.0.0.1:0", live.clone(), Guard::default()).unwrap();
        assert!(addr.ip().is_loopback() && addr.port() != 0);
        assert!(get(addr, "/").contains("new EventSource("));
        assert!(get(addr, "/api/state").ends_with(r#"{"updates":0,"finished":false}"#));
        assert!(get(addr, "/nope").starts_with("HTTP/1.0 404"));

        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /events HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(s);
        let mut data = Vec::new();
        let publish = |n: u64, finished: bool| {
            let mut st = live.lock().unwrap();
            st.profile = Some(Arc::new(profile(vec![site(
                "f",
                "malloc",
                n * 100,
                Verdict::Growing,
            )])));
            st.updates = n;
            st.finished = finished;
        };
        publish(1, false);
        let mut line = String::new();
        let mut head = String::new();
        let mut ended = false;
        while !ended {
            line.clear();
            if reader.read_line(&mut line).unwrap() == 0 {
                break;
            }
            if head.is_empty() || !head.ends_with("\r\n\r\n") {
                head.push_str(&line);
                continue;
            }
            if let Some(d) = line.strip_prefix("data: ") {
                let v: serde_json::Value = serde_json::from_str(d.trim_end()).unwrap();
                if v.get("updates").is_some() {
                    data.push(v["updates"].as_u64().unwrap());
                    match data.len() {
                        1 => publish(2, false),
                        2 => publish(3, true),
                        _ => {}
                    }
                }
            }
            ended = line.starts_with("event: end");
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("content-type: text/event-stream"), "{head}");
        assert!(ended, "no end event");
        assert_eq!(data, [1, 2, 3]);
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "data: {}\n");
    }

    #[test]
    fn bind_errors_are_clear() {
        let rt = test_runtime();
        let live: Live = Arc::default();
        let g = Guard::default;
        let addr = start(rt.handle(), "127.0.0.1:0", live.clone(), g()).unwrap();
        let err = start(rt.handle(), &addr.to_string(), live.clone(), g()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("--ui") && msg.contains("cannot listen"),
            "{msg}"
        );
        let err = format!(
            "{:#}",
            start(rt.handle(), "nonsense", live, g()).unwrap_err()
        );
        assert!(err.contains("--ui nonsense"), "{err}");
    }
}
