//! One trace from attach to final report: the ingest loop (ring buffer → decode → table →
//! analytics), stack capture while the process lives, sampling for growth, alerts, time marks,
//! periodic snapshots, and the end conditions (process exit, `--duration`, SIGINT/SIGTERM).

use std::{
    io::{self, Write as _},
    os::fd::{AsRawFd as _, RawFd},
    time::Duration,
};

use anyhow::{Context as _, Result};
use memprof_common::NO_STACK;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Interest, unix::AsyncFd},
    net::UnixListener,
    signal::unix::{SignalKind, signal},
};

use crate::{
    analysis::categories::Rule,
    event::{Event, decode},
    load::Tracer,
    maps::AddressSpace,
    marks,
    output::{Live, Profile},
    procmem::ProcMem,
    report::{self, Inputs, Report},
    stacks::StackStore,
    symbolize::Symbolizer,
    table::{Change, Table},
    tracking::Tracker,
};

/// How often the ring buffer is drained when no record asked for a wakeup. The kernel side wakes
/// the agent only for urgent records or a ring a sixteenth full, sparing the traced threads a
/// context switch per allocation.
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// How the user asked the trace to run.
#[derive(Clone, Debug)]
pub struct Settings {
    pub json: bool,
    pub duration: Option<Duration>,
    pub interval: Option<Duration>,
    pub min_age: Duration,
    pub top: Option<usize>,
    /// How often each group's outstanding bytes are sampled for growth analysis.
    pub sample_every: Duration,
    /// `--limit`: the memory limit the projection aims at.
    pub limit: Option<u64>,
    /// `--alert-threshold`: outstanding heap bytes that raise an alert.
    pub alert_bytes: Option<u64>,
    /// `--growth-threshold`: heap growth in MB/h that raises an alert.
    pub alert_growth_mb_per_hour: Option<f64>,
    /// Names of the `--phase` function phases, in cookie order.
    pub phases: Vec<String>,
    /// Directory of the `memprof mark` socket; None disables marks.
    pub mark_dir: Option<std::path::PathBuf>,
    /// The traced command line (for outputs that name it).
    pub command: Vec<String>,
    /// Shared state for live endpoints (`--metrics`, `--ui`), refreshed at each sample.
    pub live: Option<Live>,
    /// Show a status line on stderr (a terminal, not JSON on a pipe).
    pub status_line: bool,
}

/// An `"type":"alert"` record.
#[derive(Clone, Debug, Serialize)]
pub struct Alert {
    #[serde(rename = "type")]
    pub record: &'static str,
    /// `threshold` (outstanding bytes over `--alert-threshold`) or `growth` (heap growth over
    /// `--growth-threshold`).
    pub kind: &'static str,
    pub pid: u32,
    pub elapsed_s: f64,
    pub value: f64,
    pub limit: f64,
    pub message: String,
}

/// Why the trace ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The process exited; `status` is its wait status when memprof is its parent.
    Exited {
        status: Option<i32>,
    },
    Duration,
    Signal,
}

pub struct Session {
    pid: u32,
    tracer: Tracer,
    table: Table,
    stacks: StackStore,
    space: AddressSpace,
    /// Set when a library was mapped since `space` was read.
    space_stale: bool,
    /// When `space` was last read (CLOCK_MONOTONIC ns).
    space_read_ns: u64,
    symbolizer: Symbolizer,
    decode_errors: u64,
    start_ns: u64,
    settings: Settings,
    /// Whether memprof spawned the process (and so reaps it).
    parent: bool,
    pidfd: PidFd,
    tracker: Tracker,
    changes: Vec<Change>,
    rules: Vec<Rule>,
    /// Alerts currently raised (re-armed when the value falls back).
    over_bytes: bool,
    over_growth: bool,
    /// The process's memory at the last sample (kept for the report after it exits).
    last_mem: Option<ProcMem>,
    /// Where `memprof mark` reaches this trace (None when marks are unavailable).
    marks: Option<marks::Listener>,
    /// Records decoded so far, and at the last status line.
    events: u64,
    events_at_status: (u64, u64),
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Session {
    pub fn new(
        pid: u32,
        tracer: Tracer,
        settings: Settings,
        rules: Vec<Rule>,
        parent: bool,
        pidfd: PidFd,
    ) -> Self {
        let start_ns = monotonic_ns();
        let sample_bytes = tracer.sample_bytes;
        Self {
            tracker: Tracker::new(&settings.phases, start_ns),
            changes: Vec::new(),
            rules,
            over_bytes: false,
            over_growth: false,
            last_mem: None,
            // Marks are optional: a trace goes on without them. Bound here, before the trace
            // announces itself, so `memprof mark` works as soon as it has.
            marks: settings.mark_dir.as_ref().and_then(|dir| {
                marks::Listener::bind(dir, pid)
                    .map_err(|e| eprintln!("memprof: warning: `memprof mark` unavailable: {e:#}"))
                    .ok()
            }),
            events: 0,
            events_at_status: (0, start_ns),
            pidfd,
            pid,
            tracer,
            table: Table::with_sampling(sample_bytes),
            stacks: StackStore::new(),
            // A running process is read now (it may exit before its first stack is seen); a
            // spawned command has not executed yet, so it is read at its first library load.
            space: if parent {
                AddressSpace::default()
            } else {
                AddressSpace::read(pid).unwrap_or_default()
            },
            space_stale: parent,
            space_read_ns: 0,
            symbolizer: Symbolizer::new(),
            decode_errors: 0,
            start_ns,
            settings,
            parent,
        }
    }

    /// Runs until the process exits, the duration elapses or a signal arrives.
    pub async fn run(&mut self) -> Result<End> {
        let ring_fd: RawFd = self.tracer.events.as_raw_fd();
        // SAFETY: the ring buffer's fd outlives this AsyncFd, which is dropped at the end of
        // this function.
        let ring = unsafe { AsyncFd::register_with_interest(ring_fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("failed to poll the ring buffer")?;
        // SAFETY: as above, the pidfd outlives the registration.
        let exited = unsafe { AsyncFd::register_with_interest(self.pidfd.0, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("failed to poll the process")?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let deadline = self
            .settings
            .duration
            .map(|d| tokio::time::Instant::now() + d);
        let every = |i: Duration| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + i, i);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        };
        let mut ticker = self.settings.interval.map(every);
        let mut sampler = Some(every(self.settings.sample_every));
        let mut drainer = Some(every(DRAIN_EVERY));
        let mark_socket = match &self.marks {
            Some(listener) => Some(
                UnixListener::from_std(listener.socket.try_clone()?)
                    .context("failed to poll the mark socket")?,
            ),
            None => None,
        };
        // No sample now: a spawned command has not executed yet (its RSS would be memprof's).

        let end = loop {
            tokio::select! {
                guard = ring.readable() => {
                    let mut guard = guard?;
                    self.drain();
                    guard.clear_ready();
                }
                _ = exited.readable() => {
                    break End::Exited { status: self.reap() };
                }
                _ = sigint.recv() => break End::Signal,
                _ = sigterm.recv() => break End::Signal,
                _ = sleep_until(deadline) => break End::Duration,
                _ = tick(&mut ticker) => {
                    self.drain();
                    let snap = self.snapshot();
                    self.emit(&snap)?;
                }
                _ = tick(&mut drainer) => self.drain(),
                _ = tick(&mut sampler) => {
                    self.drain();
                    self.sample();
                    self.check_alerts()?;
                    self.publish_live(false);
                    self.status_line();
                }
                conn = accept(&mark_socket) => {
                    if let Ok(stream) = conn {
                        self.serve_mark(stream).await;
                    }
                }
            }
        };
        if self.settings.status_line {
            // Clear the status line before the report.
            eprint!("\r\x1b[2K");
        }
        // Every event of the process was submitted before it went away: take them all.
        self.drain();
        drop(ring);
        drop(exited);
        Ok(end)
    }

    /// The wait status of our exited child, or `None` when memprof is not its parent.
    fn reap(&self) -> Option<i32> {
        if !self.parent {
            return None;
        }
        let mut status = 0;
        // SAFETY: reaping our own child.
        let r = unsafe { libc::waitpid(self.pid as i32, &mut status, 0) };
        (r == self.pid as i32).then_some(status)
    }

    /// Takes every record waiting in the ring buffer.
    pub fn drain(&mut self) {
        loop {
            let decoded = match self.tracer.events.next() {
                Some(item) => decode(&item),
                None => break,
            };
            self.events += 1;
            match decoded {
                Ok(event) => self.observe(&event),
                Err(_) => self.decode_errors += 1,
            }
        }
    }

    fn observe(&mut self, event: &Event) {
        match *event {
            Event::Alloc(a) if a.stack != NO_STACK && !self.stacks.contains(a.stack) => {
                self.learn_stack(a.stack);
            }
            Event::ExecMap => {
                // Read now, while the process surely lives; keep the old view if it is gone.
                self.space_stale = true;
                if let Ok(space) = AddressSpace::read(self.pid) {
                    self.space = space;
                    self.space_stale = false;
                    self.space_read_ns = monotonic_ns();
                }
            }
            Event::Phase {
                tid, phase, enter, ..
            } => {
                let outstanding = self.table.heap_totals.outstanding_bytes;
                self.tracker.on_phase(tid, phase, enter, outstanding);
            }
            _ => {}
        }
        let changes = &mut self.changes;
        self.table.apply_with(event, &mut |c| changes.push(c));
        let outstanding = self.table.heap_totals.outstanding_bytes;
        for change in self.changes.drain(..) {
            self.tracker.on_change(&change, outstanding);
        }
    }

    /// Samples outstanding bytes per group and the process's RSS.
    fn sample(&mut self) {
        let mem = ProcMem::read(self.pid).ok();
        if mem.is_some() {
            self.last_mem = mem;
        }
        let rss = mem.map(|m| m.rss_bytes);
        self.tracker.sample(
            monotonic_ns(),
            self.table.heap_totals.outstanding_bytes,
            rss,
        );
    }

    /// Stops listening for marks and removes the socket file.
    pub fn close_marks(&mut self) {
        self.marks = None;
    }

    /// Refreshes the live endpoints' state.
    pub fn publish_live(&mut self, finished: bool) {
        let Some(live) = self.settings.live.clone() else {
            return;
        };
        let snapshot = self.snapshot();
        let profile = std::sync::Arc::new(self.profile(&snapshot));
        if let Ok(mut state) = live.lock() {
            state.profile = Some(profile);
            state.updates += 1;
            state.finished = finished;
        }
    }

    /// Elapsed time, event rate, outstanding bytes and losses on one stderr line.
    fn status_line(&mut self) {
        if !self.settings.status_line {
            return;
        }
        let now = monotonic_ns();
        let (events_then, then) = self.events_at_status;
        let rate = (self.events - events_then) as f64 / ((now - then).max(1) as f64 / 1e9);
        self.events_at_status = (self.events, now);
        let losses = self.tracer.losses();
        eprint!(
            "\r\x1b[2Kmemprof: {:.0} s  {:.0} events/s  outstanding {}  lost {}",
            (now - self.start_ns) as f64 / 1e9,
            rate,
            report::human_bytes(self.table.heap_totals.outstanding_bytes),
            losses.ring_full + losses.inflight_full + self.decode_errors
        );
    }

    /// The profile the output writers take, for `report`.
    pub fn profile(&mut self, report: &Report) -> Profile {
        // The symbolizer (a cache) is taken out while the inputs borrow the rest.
        let mut symbolizer = std::mem::take(&mut self.symbolizer);
        let inputs = self.inputs(monotonic_ns());
        let profile = report::profile(&inputs, &mut symbolizer, report, &self.settings.command);
        self.symbolizer = symbolizer;
        profile
    }

    /// Raises `--alert-threshold` and `--growth-threshold` alerts, once per crossing.
    fn check_alerts(&mut self) -> io::Result<()> {
        let elapsed_s = (monotonic_ns() - self.start_ns) as f64 / 1e9;
        let mut alerts = Vec::new();
        if let Some(limit) = self.settings.alert_bytes {
            let value = self.table.heap_totals.outstanding_bytes;
            let over = value > limit;
            if over && !self.over_bytes {
                alerts.push(Alert {
                    record: "alert",
                    kind: "threshold",
                    pid: self.pid,
                    elapsed_s,
                    value: value as f64,
                    limit: limit as f64,
                    message: format!(
                        "outstanding heap bytes {value} exceed --alert-threshold {limit}"
                    ),
                });
            }
            self.over_bytes = over;
        }
        if let Some(limit) = self.settings.alert_growth_mb_per_hour
            && self.tracker.heap.points().len() >= 5
            && let Some(slope) = self.tracker.heap_slope()
        {
            let value = slope * 3600.0 / 1e6;
            let over = value > limit;
            if over && !self.over_growth {
                alerts.push(Alert {
                    record: "alert",
                    kind: "growth",
                    pid: self.pid,
                    elapsed_s,
                    value,
                    limit,
                    message: format!(
                        "heap grows {value:.3} MB/h, over --growth-threshold {limit} MB/h"
                    ),
                });
            }
            self.over_growth = over;
        }
        for alert in alerts {
            if self.settings.json {
                write_json_line(&alert)?;
            } else {
                eprintln!("memprof: alert: {}", alert.message);
            }
        }
        Ok(())
    }

    /// Answers one `memprof mark` connection.
    async fn serve_mark(&mut self, stream: tokio::net::UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read);
        let read = reader.read_line(&mut line);
        let answer = match tokio::time::timeout(Duration::from_secs(2), read).await {
            Ok(Ok(_)) => match marks::parse_request(&line) {
                Some(name) => {
                    // Everything the process did before the mark belongs to the old phase.
                    self.drain();
                    let outstanding = self.table.heap_totals.outstanding_bytes;
                    self.tracker.mark(name, monotonic_ns(), outstanding);
                    "ok\n"
                }
                None => "error: expected `mark NAME`\n",
            },
            _ => return,
        };
        let _ = write.write_all(answer.as_bytes()).await;
    }

    /// Reads a new stack from the kernel and normalizes it while the process is alive.
    ///
    /// The address-space view is re-read when a library was mapped since the last read, or when
    /// a frame falls outside every known mapping. The latter is rate-limited: without frame
    /// pointers deeper frames are often garbage that no re-read would place.
    fn learn_stack(&mut self, key: u64) {
        const REREAD_NS: u64 = 50_000_000;
        let ips = self.tracer.stack(key);
        let now = monotonic_ns();
        let reread = self.space_stale
            || (!StackStore::covered(&self.space, &ips)
                && now.saturating_sub(self.space_read_ns) > REREAD_NS);
        if reread && let Ok(space) = AddressSpace::read(self.pid) {
            self.space = space;
            self.space_stale = false;
            self.space_read_ns = now;
        }
        self.stacks.insert(key, &ips, &self.space);
    }

    fn inputs(&self, now: u64) -> Inputs<'_> {
        Inputs {
            pid: self.pid,
            table: &self.table,
            stacks: &self.stacks,
            kernel: self.tracer.losses(),
            decode_errors: self.decode_errors,
            now_ns: now,
            elapsed_s: (now - self.start_ns) as f64 / 1e9,
            min_age_ns: self.settings.min_age.as_nanos() as u64,
            tracker: &self.tracker,
            limit: self.settings.limit,
            rules: &self.rules,
            mem: ProcMem::read(self.pid).ok().or(self.last_mem),
            top: self
                .settings
                .top
                .or(if self.settings.json { None } else { Some(10) }),
        }
    }

    pub fn snapshot(&mut self) -> Report {
        let mut symbolizer = std::mem::take(&mut self.symbolizer);
        let inputs = self.inputs(monotonic_ns());
        let report = report::snapshot(&inputs, &mut symbolizer);
        self.symbolizer = symbolizer;
        report
    }

    /// Writes a snapshot or report to stdout in the chosen format.
    pub fn emit(&self, report: &Report) -> io::Result<()> {
        if self.settings.json {
            write_json_line(report)
        } else {
            let mut out = io::stdout().lock();
            writeln!(out, "{}", report::render_text(report))?;
            out.flush()
        }
    }
}

/// Writes one NDJSON line to stdout.
pub fn write_json_line<T: Serialize>(value: &T) -> io::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    out.write_all(b"\n")?;
    out.flush()
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn accept(socket: &Option<UnixListener>) -> io::Result<tokio::net::UnixStream> {
    match socket {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// A pidfd: readable once the process has exited. Opened before tracing starts, so a process
/// that exits at any later time is still seen to exit.
pub struct PidFd(RawFd);

impl PidFd {
    pub fn open(pid: u32) -> Result<Self> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                anyhow::bail!("no such process: pid {pid}");
            }
            return Err(err).context("pidfd_open failed");
        }
        Ok(Self(fd as RawFd))
    }
}

impl Drop for PidFd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}
