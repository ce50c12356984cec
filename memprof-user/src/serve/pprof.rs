//! `GET /debug/pprof/heap` and `GET /debug/pprof/allocs` on the `--metrics` listener: each
//! traced process's allocations as a gzipped pprof profile, the endpoints Go programs serve, so
//! that `go tool pprof`, Parca and Grafana Alloy (Pyroscope) scrape memprof as they scrape a Go
//! program.
//!
//! Both serve the same samples: one per call site of each process (sites merged by allocator and
//! kind), with the sample types of Go's heap profile, `alloc_objects/count`,
//! `alloc_space/bytes`, `inuse_objects/count` and `inuse_space/bytes`; `heap` defaults to
//! `inuse_space`, `allocs` to `alloc_space`. Every sample carries the labels `pid`, `comm`,
//! `allocator` and `kind`, and `cgroup` when the trace covers several processes. Mappings carry
//! the modules' paths, build ids and file offsets (see [`crate::output::pprof`]).
//!
//! Query parameters: `pid=PID` and `comm=NAME` select processes; `seconds=N` (1 to 300) answers
//! with the difference between two snapshots N seconds apart, as Go's delta profiles: what was
//! allocated in those seconds, and how what is held changed. At most
//! [`MAX_PROFILE_REQUESTS`] profiles are made at once; more are answered 503.
//!
//! The profile is taken by the trace itself (the request goes to the session's event loop, which
//! answers between two drains of the ring buffer), so it is exact up to the moment it was asked
//! for; it is encoded and compressed on a blocking thread.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use hyper::{
    Response, StatusCode,
    header::{CONTENT_DISPOSITION, CONTENT_TYPE},
};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};

use super::{
    Live,
    http::{Ask, Body, Reply, status, with_header},
};
use crate::{
    output::pprof::{Header, Row, build_rows, gzip},
    report::processes::{LiveSamples, ProcessSample, ProcessSamples},
};

/// Profiles made at once; more are answered 503.
pub const MAX_PROFILE_REQUESTS: usize = 4;
/// The longest `seconds=` of a delta profile.
pub const MAX_DELTA_SECONDS: u64 = 300;
/// The sample types, in value order (Go's heap profile).
pub const SAMPLE_TYPES: [(&str, &str); 4] = [
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
];

/// Which processes a profile covers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

/// A profile asked of the trace: it answers with the selected processes' samples.
pub struct ProfileRequest {
    pub selection: Selection,
    pub answer: oneshot::Sender<LiveSamples>,
}

/// Where profile requests go (the session's event loop).
pub type Requests = mpsc::Sender<ProfileRequest>;

/// The two endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Heap,
    Allocs,
}

/// A profile request as the query asked it.
#[derive(Debug, PartialEq, Eq)]
pub struct Query {
    pub selection: Selection,
    pub seconds: Option<u64>,
}

/// Decodes `%XX` and `+` in a query value.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Parses the query string; the error is the 400 answer's text.
pub fn parse_query(query: &str) -> Result<Query, String> {
    let mut q = Query {
        selection: Selection::default(),
        seconds: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
        let value = decode(raw).ok_or_else(|| format!("{key}: not a valid query value"))?;
        match key {
            "pid" => {
                q.selection.pid = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("pid={value}: not a process id"))?,
                );
            }
            "comm" => q.selection.comm = Some(value),
            "seconds" => {
                let n: u64 = value
                    .parse()
                    .map_err(|_| format!("seconds={value}: not a number of seconds"))?;
                if n > MAX_DELTA_SECONDS {
                    return Err(format!("seconds={n}: at most {MAX_DELTA_SECONDS} seconds"));
                }
                // As Go: 0 asks for the profile itself.
                q.seconds = (n > 0).then_some(n);
            }
            "debug" if value != "0" => {
                return Err("debug: only the protobuf profile (debug=0) is served".into());
            }
            // `gc` (Go collects garbage first), `token` (checked before), and the rest.
            _ => {}
        }
    }
    Ok(q)
}

/// The profile endpoints' shared state.
#[derive(Clone)]
pub struct Profiles {
    live: Live,
    in_flight: Arc<AtomicUsize>,
}

/// One profile in the making; counted until dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Profiles {
    pub fn new(live: Live) -> Self {
        Self {
            live,
            in_flight: Arc::default(),
        }
    }

    fn acquire(&self) -> Option<InFlight> {
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_PROFILE_REQUESTS).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(self.in_flight.clone()))
    }

    /// Answers `GET /debug/pprof/{heap,allocs}`.
    pub fn respond(&self, ask: &Ask<'_>, kind: Kind) -> Reply {
        let query = match parse_query(ask.query) {
            Ok(q) => q,
            Err(e) => return status(StatusCode::BAD_REQUEST, &format!("{e}\n")).into(),
        };
        let Some(in_flight) = self.acquire() else {
            return status(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("{MAX_PROFILE_REQUESTS} profiles are being made; try again later\n"),
            )
            .into();
        };
        let requests = {
            let state = self.live.lock().unwrap_or_else(|e| e.into_inner());
            state.profiles.clone()
        };
        let Some(requests) = requests else {
            return unavailable().into();
        };
        let busy = ask.busy();
        Reply::Later(Box::pin(async move {
            let _held = (busy, in_flight);
            let started = SystemTime::now();
            let Some(first) = take(&requests, &query.selection).await else {
                return unavailable();
            };
            let (samples, duration) = match query.seconds {
                None => {
                    let d = Duration::from_secs_f64(first.elapsed_s.max(0.0));
                    (first, d)
                }
                Some(n) => {
                    tokio::time::sleep(Duration::from_secs(n)).await;
                    let Some(second) = take(&requests, &query.selection).await else {
                        return unavailable();
                    };
                    let d = started.elapsed().unwrap_or(Duration::from_secs(n));
                    (delta(&first, second), d)
                }
            };
            let encoded =
                tokio::task::spawn_blocking(move || encode(&samples, kind, duration)).await;
            match encoded {
                Ok(Ok(gz)) => {
                    let r = with_header(
                        Response::new(Body::Full(Some(gz.into()))),
                        CONTENT_TYPE,
                        "application/octet-stream",
                    );
                    with_header(
                        r,
                        CONTENT_DISPOSITION,
                        match kind {
                            Kind::Heap => "attachment; filename=\"heap\"",
                            Kind::Allocs => "attachment; filename=\"allocs\"",
                        },
                    )
                }
                _ => status(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
            }
        }))
    }
}

fn unavailable() -> Response<Body> {
    status(
        StatusCode::SERVICE_UNAVAILABLE,
        "no trace to take a profile of (not started yet, or ended)\n",
    )
}

/// Asks the trace for the selected processes' samples.
async fn take(requests: &Requests, selection: &Selection) -> Option<LiveSamples> {
    let (answer, rx) = oneshot::channel();
    requests
        .send(ProfileRequest {
            selection: selection.clone(),
            answer,
        })
        .await
        .ok()?;
    rx.await.ok()
}

/// `second` minus `first`, sample by sample (a sample only in `first` comes out negated);
/// samples whose values all cancel out are left out.
pub fn delta(first: &LiveSamples, mut second: LiveSamples) -> LiveSamples {
    let mut before: HashMap<(u32, u64), &ProcessSample> = first
        .processes
        .iter()
        .flat_map(|p| p.samples.iter().map(move |s| ((p.pid, s.key), s)))
        .collect();
    for p in &mut second.processes {
        for s in &mut p.samples {
            if let Some(b) = before.remove(&(p.pid, s.key)) {
                for (v, old) in s.values.iter_mut().zip(b.values) {
                    *v -= old;
                }
            }
        }
    }
    // Processes gone since `first`, and their samples.
    let mut index: HashMap<u32, usize> = second
        .processes
        .iter()
        .enumerate()
        .map(|(i, p)| (p.pid, i))
        .collect();
    for p in &first.processes {
        for s in &p.samples {
            if !before.contains_key(&(p.pid, s.key)) {
                continue;
            }
            let i = *index.entry(p.pid).or_insert_with(|| {
                second.processes.push(ProcessSamples {
                    samples: Vec::new(),
                    ..p.clone()
                });
                second.processes.len() - 1
            });
            let mut gone = s.clone();
            gone.values = gone.values.map(|v| -v);
            second.processes[i].samples.push(gone);
        }
    }
    for p in &mut second.processes {
        p.samples.retain(|s| s.values.iter().any(|v| *v != 0));
    }
    second
}

/// The gzipped profile of `samples`, covering `duration`.
pub fn encode(samples: &LiveSamples, kind: Kind, duration: Duration) -> anyhow::Result<Vec<u8>> {
    let pids: Vec<String> = samples
        .processes
        .iter()
        .map(|p| p.pid.to_string())
        .collect();
    let mut rows = Vec::new();
    for (p, pid) in samples.processes.iter().zip(&pids) {
        for s in &p.samples {
            let mut labels = vec![
                ("pid", pid.as_str()),
                ("comm", p.comm.as_str()),
                ("allocator", s.allocator),
                ("kind", s.kind),
            ];
            if let Some(cgroup) = &p.cgroup {
                labels.push(("cgroup", cgroup.as_str()));
            }
            rows.push(Row {
                stack: &s.stack,
                values: s.values.to_vec(),
                labels,
            });
        }
    }
    let mut comment = vec![format!(
        "memprof: {} processes, {:.3} s",
        samples.processes.len(),
        duration.as_secs_f64()
    )];
    if samples.sample_mean > 0 {
        comment.push(format!(
            "sampled: one allocation per {} bytes on average; values are estimates",
            samples.sample_mean
        ));
    }
    let program = match samples.processes.as_slice() {
        [one] => Some(one.comm.as_str()),
        _ => None,
    };
    let pb = build_rows(
        &rows,
        &Header {
            sample_types: &SAMPLE_TYPES,
            default_sample_type: match kind {
                Kind::Heap => "inuse_space",
                Kind::Allocs => "alloc_space",
            },
            comment,
            program,
            start: SystemTime::now()
                .checked_sub(duration)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            duration_ns: i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX),
        },
    );
    gzip(&pb.encode_to_vec())
}

#[cfg(test)]
mod tests;
