//! One trace from attach to final report: the loop that wires the layers together (ring buffer
//! → decode → stacks → table → analytics → report → outputs), and its end conditions (process
//! exit, `--duration`, SIGINT/SIGTERM).
//!
//! - [`observe`]: records taken from the ring and applied, process life cycles, sampling.
//! - [`mappings`]: each process's view of its address space; stacks placed and unwound.
//! - [`naming`]: the tracker's inputs, in order, once their stacks are named.
//! - [`pythons`]: CPython processes, their threads, and mixed Python/native stacks.
//! - [`pyphases`]: phases named by Python function, told from the frames of each call.
//! - [`reports`]: snapshots, the report, the profile, alerts, the status line.
//! - [`procs`]: what the session knows of each traced process.
//! - [`profiles`]: the live profiles' samples, and exited processes kept until a scrape saw them.
//! - [`residency`]: RSS explained, from the table and `/proc/PID/{smaps,pagemap}`.

mod mappings;
mod naming;
mod observe;
mod procs;
mod profiles;
mod pyphases;
mod pythons;
mod reports;
mod residency;

use std::{
    io,
    os::fd::{AsRawFd as _, RawFd},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::UnixListener,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

pub use self::reports::Alert;
use self::{
    procs::Proc,
    pyphases::PyPhases,
    pythons::{PyState, Scanner},
};
use crate::{
    analysis::{categories::Rule, pyphases::PyPattern, tracking::Tracker},
    ingest::{marks, mmaps::MmapWatcher},
    probe::Tracer,
    report::{self},
    serve::Live,
    stacks::{
        Sites, StackStore,
        namer::Namer,
        tables::TableFiles,
        unwind::{ObjectCache, ProcessUnwinder},
    },
    sys::{clock::monotonic_ns, maps::Mapping, target::PidFd},
    table::{Change, Tables},
};

/// Exited processes kept in the report of a multi-process trace; older ones are forgotten.
const EXITED_KEPT: usize = 256;

/// With live endpoints, exited processes a profile scrape has not seen yet are kept up to this
/// many (see `profiles`); beyond, the oldest are forgotten unseen, and counted.
const EXITED_UNSCRAPED_KEPT: usize = 4096;

/// Call-site groups kept with their history; beyond that, groups with nothing outstanding and
/// no allocation for `GROUP_IDLE_NS` are forgotten, oldest first.
const GROUPS_KEPT: usize = 20_000;
const GROUP_IDLE_NS: u64 = 60_000_000_000;

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
    /// `--phase NAME=py:QUALNAME`: the phases named by Python function, after the native ones.
    pub py_phases: Vec<(String, PyPattern)>,
    /// Directory of the `memprof mark` socket; None disables marks.
    pub mark_dir: Option<std::path::PathBuf>,
    /// The traced command line (for outputs that name it).
    pub command: Vec<String>,
    /// Shared state for live endpoints (`--metrics`, `--ui`), refreshed at each sample.
    pub live: Option<Live>,
    /// Show a status line on stderr (a terminal, not JSON on a pipe).
    pub status_line: bool,
    /// Report each process (`processes`): the trace covers more than one.
    pub per_process: bool,
    /// `--rank growth`: order `processes` by growth instead of outstanding bytes.
    pub rank_by_growth: bool,
    /// `--unwind dwarf`: allocations carry stack copies the agent unwinds.
    pub dwarf: bool,
    /// `--debug-dir`: where to look for debug files before the system's directories.
    pub debug_dirs: Vec<std::path::PathBuf>,
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
    /// The process the trace is about (0 with `--all`).
    pid: u32,
    tracer: Tracer,
    table: Tables,
    stacks: StackStore,
    /// Every process seen, by pid.
    procs: foldhash::HashMap<u32, Proc>,
    /// `--unwind dwarf`: per-process unwinders, the objects they read, and counts.
    unwinders: foldhash::HashMap<u32, ProcessUnwinder>,
    unwind_objects: ObjectCache,
    unwind_stats: report::UnwindStats,
    /// How the kernel's table walk of each stack ended (`unwind_end`, when not 0), and what
    /// the walks of the allocations reached.
    stack_ends: foldhash::HashMap<u64, u8>,
    table_walks: report::TableWalks,
    table_allocations: u64,
    /// Tables built, by file, and the signature of the mapping list last written per process
    /// (`--unwind tables`).
    table_files: TableFiles,
    tables_written: foldhash::HashMap<u32, u64>,
    /// Each process's `EXEC_EPOCH` when its mappings were last given to the kernel.
    tables_epoch: foldhash::HashMap<u32, u64>,
    /// The kernel's records of executable mappings (None when perf events are unavailable).
    watch: Option<MmapWatcher>,
    /// Mapping records of processes not seen yet (a child whose fork is still in the ring).
    pending_maps: foldhash::HashMap<u32, Vec<Mapping>>,
    /// CPython processes: their frame readers and registered threads.
    pythons: foldhash::HashMap<u32, PyState>,
    /// Phases named by Python function, and the threads inside them.
    py_phases: Option<PyPhases>,
    /// The thread that reads CPython processes (started at the first that may be one).
    py_scanner: Option<Scanner>,
    /// (device, inode) of mapped files found to hold no allocator.
    plain_objects: std::collections::HashSet<(u64, u64)>,
    /// Exited processes still reported, oldest first (see `EXITED_KEPT`).
    exited: std::collections::VecDeque<u32>,
    /// Exited processes no longer reported, and call-site groups forgotten, to bound memory.
    evicted_processes: u64,
    /// Of those, forgotten before a profile scrape saw them after their exit.
    evicted_unscraped: u64,
    pruned_groups: u64,
    /// How many processes still reported allocated with each raw stack key: a key no process
    /// uses any more is forgotten (with address-space randomisation every process has keys of
    /// its own), and counted in `stacks_forgotten` (all, and those whose walk stopped early).
    stack_users: foldhash::HashMap<u64, u32>,
    stacks_forgotten: (u64, u64),
    /// Each process's allocations by call site, for the live profiles (with live endpoints).
    process_sites: Option<crate::analysis::process_sites::ProcessSites>,
    /// Names stacks on its own thread.
    namer: Namer,
    /// The call site of every stack key the analysis saw.
    sites: Sites,
    /// Tracker inputs waiting for names.
    pending: naming::Pending,
    decode_errors: u64,
    /// Records the end of the trace let go unread (see `end`).
    unread_at_end: u64,
    start_ns: u64,
    settings: Settings,
    /// Whether memprof spawned the process (and so reaps it).
    parent: bool,
    /// The spawned command's exec was seen.
    command_started: bool,
    /// Readable once `pid` exits (None with `--all`).
    pidfd: Option<PidFd>,
    tracker: Tracker,
    changes: Vec<Change>,
    rules: Vec<Rule>,
    /// Alerts currently raised (re-armed when the value falls back).
    over_bytes: bool,
    over_growth: bool,
    /// Where `memprof mark` reaches this trace (None when marks are unavailable).
    marks: Option<marks::Listener>,
    /// Records decoded so far, and at the last status line.
    events: u64,
    events_at_status: (u64, u64),
    /// The last residency scan of each process (RSS explained), and the main process's
    /// explanations over time.
    residency: std::collections::HashMap<u32, crate::analysis::rss::Residency>,
    /// Residency scans done: how many, their time in ns and the allocator-region bytes read
    /// (`--probe-stats`).
    residency_cost: (u64, u64, u64),
    rss_timeline: Vec<report::RssPoint>,
}

impl Session {
    pub fn new(
        pid: u32,
        tracer: Tracer,
        settings: Settings,
        rules: Vec<Rule>,
        parent: bool,
        pidfd: Option<PidFd>,
    ) -> Self {
        let start_ns = monotonic_ns();
        let sample_bytes = tracer.sample_bytes;
        let mut tracker = Tracker::new(&settings.phases, start_ns);
        let py_names: Vec<String> = settings.py_phases.iter().map(|(n, _)| n.clone()).collect();
        tracker.add_python_phases(&py_names);
        Self {
            py_phases: PyPhases::new(&settings.py_phases, settings.phases.len()),
            tracker: tracker.with_peaks(sample_bytes, settings.per_process),
            changes: Vec::new(),
            rules,
            over_bytes: false,
            over_growth: false,
            command_started: false,
            // Marks are optional: a trace goes on without them. Bound here, before the trace
            // announces itself, so `memprof mark` works as soon as it has.
            marks: settings.mark_dir.as_ref().and_then(|dir| {
                marks::Listener::bind(dir, pid)
                    .map_err(|e| eprintln!("memprof: warning: `memprof mark` unavailable: {e:#}"))
                    .ok()
            }),
            events: 0,
            events_at_status: (0, start_ns),
            residency: Default::default(),
            residency_cost: (0, 0, 0),
            rss_timeline: Vec::new(),
            pidfd,
            pid,
            tracer,
            table: Tables::with_sampling(sample_bytes),
            stacks: StackStore::new(),
            // A running process is read now (it may exit before its first stack is seen); a
            // spawned command has not executed yet, so it is read at its first library load.
            procs: if pid == 0 {
                Default::default()
            } else {
                let mut p = Proc::discover(pid);
                if parent {
                    p.space = Default::default();
                    p.space_stale = true;
                }
                [(pid, p)].into_iter().collect()
            },
            namer: Namer::new(settings.debug_dirs.clone()),
            sites: Sites::new(),
            pending: Default::default(),
            unwinders: Default::default(),
            unwind_objects: ObjectCache::default(),
            unwind_stats: report::UnwindStats::default(),
            stack_ends: Default::default(),
            table_walks: Default::default(),
            table_allocations: 0,
            table_files: TableFiles::default(),
            tables_written: Default::default(),
            tables_epoch: Default::default(),
            watch: None,
            pending_maps: Default::default(),
            pythons: Default::default(),
            py_scanner: None,
            plain_objects: Default::default(),
            exited: Default::default(),
            evicted_processes: 0,
            evicted_unscraped: 0,
            pruned_groups: 0,
            process_sites: settings.live.as_ref().map(|_| Default::default()),
            stack_users: Default::default(),
            stacks_forgotten: (0, 0),
            decode_errors: 0,
            unread_at_end: 0,
            start_ns,
            settings,
            parent,
        }
    }

    /// Runs until the process exits, the duration elapses or a signal arrives.
    /// What must be in place before the trace is announced (and the target goes on): the
    /// traced process's files kept open, a running interpreter's threads registered.
    pub fn prepare(&mut self) {
        self.pin_initial();
        self.allocator_text(self.pid);
        self.update_tables(self.pid);
        if !self.parent && self.pid != 0 {
            self.scan_python(self.pid);
            // Detection, then the threads: each job has its own budget.
            for _ in 0..2 {
                self.python_settle(self.pid, Duration::from_secs(2));
            }
        }
    }

    pub async fn run(&mut self) -> Result<End> {
        let ring_fd: RawFd = self.tracer.events.as_raw_fd();
        // SAFETY: the ring buffer's fd outlives this AsyncFd, which is dropped at the end of
        // this function.
        let ring = unsafe { AsyncFd::register_with_interest(ring_fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("failed to poll the ring buffer")?;
        let exited = match &self.pidfd {
            // SAFETY: as above, the pidfd outlives the registration.
            Some(pidfd) => Some(
                unsafe { AsyncFd::register_with_interest(pidfd.as_raw_fd(), Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)
                    .context("failed to poll the process")?,
            ),
            None => None,
        };
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
        // The mark socket is served on the runtime's worker; only well-formed requests come
        // here, through a bounded channel.
        let (mark_tx, mut mark_rx) = mpsc::channel(marks::MAX_PENDING);
        // Profile requests of the live endpoints, answered between drains.
        let (profile_tx, mut profile_rx) =
            mpsc::channel(2 * crate::serve::pprof::MAX_PROFILE_REQUESTS);
        let _unused_requests = match &self.settings.live {
            Some(live) => {
                live.lock().unwrap_or_else(|e| e.into_inner()).profiles = Some(profile_tx);
                None
            }
            None => Some(profile_tx),
        };
        let mark_server = match &self.marks {
            Some(listener) => Some(tokio::spawn(marks::serve(
                UnixListener::from_std(listener.socket.try_clone()?)
                    .context("failed to poll the mark socket")?,
                mark_tx,
            ))),
            None => None,
        };
        let logs = match self.tracer.log_fd() {
            // SAFETY: the logger's descriptor outlives this registration (both end with the
            // session).
            Some(fd) => Some(
                unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)
                    .context("failed to poll the kernel logs")?,
            ),
            None => None,
        };
        // No sample now: a spawned command has not executed yet (its RSS would be memprof's).
        // Records left in the ring when a drain ran out of its time: the next turn takes more,
        // after a look at the signals, the deadline and the requests.
        let mut backlog = false;

        // Biased: the signals and the deadline are looked at first in every turn, and a turn
        // with records left yields to the runtime before it drains again, so its timers and
        // signal streams are polled with a fresh cooperative budget. Records pouring in faster
        // than they are taken (the rest is dropped by the kernel and counted as lost) cannot
        // keep the trace from ending.
        let end = loop {
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                break End::Duration;
            }
            tokio::select! {
                biased;
                _ = sigint.recv() => break End::Signal,
                _ = sigterm.recv() => break End::Signal,
                _ = sleep_until(deadline) => break End::Duration,
                _ = exit_of(&exited) => {
                    break End::Exited { status: self.reap() };
                }
                _ = tick(&mut ticker) => {
                    backlog = self.drain_some();
                    let snap = self.snapshot();
                    self.emit(&snap)?;
                }
                _ = tick(&mut sampler) => {
                    backlog = self.drain_some();
                    self.sample();
                    self.check_alerts()?;
                    self.publish_live(false);
                    self.status_line();
                }
                Some(request) = mark_rx.recv() => self.take_mark(request),
                Some(request) = profile_rx.recv() => self.answer_profile(request),
                Some(done) = python_done(&mut self.py_scanner) => self.python_done(done),
                guard = readable(&logs) => {
                    if let Ok(mut guard) = guard {
                        self.tracer.flush_logs();
                        guard.clear_ready();
                    }
                }
                guard = ring.readable() => {
                    let mut guard = guard?;
                    backlog = self.drain_some();
                    guard.clear_ready();
                }
                _ = tick(&mut drainer) => {
                    backlog = self.drain_some();
                    self.scan_deferred_pythons();
                }
                _ = tokio::task::yield_now(), if backlog => backlog = self.drain_some(),
            }
        };
        if let Some(server) = mark_server {
            server.abort();
        }
        if let Some(live) = &self.settings.live {
            live.lock().unwrap_or_else(|e| e.into_inner()).profiles = None;
        }
        if self.settings.status_line {
            // Clear the status line before the report.
            eprint!("\r\x1b[2K");
        }
        // What is still in the ring is taken after the probes are detached (see `detach`):
        // draining it now, while records may pour in, might never end.
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

    /// Takes one `memprof mark` request: everything the process did before it belongs to
    /// the old phase.
    fn take_mark(&mut self, request: marks::Request) {
        let answer = if self.tracker.marks() >= marks::MAX_MARKS {
            format!(
                "error: this trace took {} marks already\n",
                marks::MAX_MARKS
            )
        } else {
            // What the ring holds now, within a second even while records pour in.
            self.drain_for(Duration::from_secs(1));
            let outstanding = self.table.heap_totals.outstanding_bytes;
            self.track(naming::Input::Mark {
                name: request.name.clone(),
                ts_ns: monotonic_ns(),
                outstanding,
            });
            "ok\n".to_string()
        };
        let _ = request.answer.send(answer);
    }
}

/// The next finding of the Python scanner (never, without one).
async fn python_done(scanner: &mut Option<Scanner>) -> Option<pythons::Done> {
    match scanner {
        Some(s) => s.done.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn readable(
    fd: &Option<AsyncFd<RawFd>>,
) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, RawFd>> {
    match fd {
        Some(fd) => fd.readable().await,
        None => std::future::pending().await,
    }
}

async fn exit_of(fd: &Option<AsyncFd<RawFd>>) {
    match fd {
        Some(fd) => {
            let _ = fd.readable().await;
        }
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
