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
    allocators,
    analysis::categories::Rule,
    event::{self, Event, decode_record},
    load::Tracer,
    maps::Mapping,
    marks,
    mmaps::MmapWatcher,
    output::{Live, Profile},
    procmem::ProcMem,
    procs::Proc,
    python::{self, PyFrame, Resolver},
    report::{self, Inputs, ProcessInfo, Report},
    stacks::StackStore,
    symbolize::Symbolizer,
    table::{Change, Tables},
    tracking::Tracker,
    unwind::{self as unwinding, ObjectCache, ProcessUnwinder},
};

/// Exited processes kept in the report of a multi-process trace; older ones are forgotten.
const EXITED_KEPT: usize = 256;

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
    /// The kernel's records of executable mappings (None when perf events are unavailable).
    watch: Option<MmapWatcher>,
    /// Mapping records of processes not seen yet (a child whose fork is still in the ring).
    pending_maps: foldhash::HashMap<u32, Vec<Mapping>>,
    /// CPython processes: their frame readers and registered threads.
    pythons: foldhash::HashMap<u32, PyState>,
    /// (device, inode) of mapped files found to hold no allocator.
    plain_objects: std::collections::HashSet<(u64, u64)>,
    /// Exited processes still reported, oldest first (see `EXITED_KEPT`).
    exited: std::collections::VecDeque<u32>,
    /// Exited processes no longer reported, and call-site groups forgotten, to bound memory.
    evicted_processes: u64,
    pruned_groups: u64,
    symbolizer: Symbolizer,
    decode_errors: u64,
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
        pidfd: Option<PidFd>,
    ) -> Self {
        let start_ns = monotonic_ns();
        let sample_bytes = tracer.sample_bytes;
        Self {
            tracker: Tracker::new(&settings.phases, start_ns),
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
            symbolizer: Symbolizer::new(),
            unwinders: Default::default(),
            unwind_objects: ObjectCache::default(),
            unwind_stats: report::UnwindStats::default(),
            watch: None,
            pending_maps: Default::default(),
            pythons: Default::default(),
            plain_objects: Default::default(),
            exited: Default::default(),
            evicted_processes: 0,
            pruned_groups: 0,
            decode_errors: 0,
            start_ns,
            settings,
            parent,
        }
    }

    /// Keeps the files of the traced process open when they live under another root.
    fn pin_initial(&mut self) {
        if let Some(p) = self.procs.get(&self.pid) {
            pin_files(&mut self.symbolizer, p);
        }
    }

    /// Runs until the process exits, the duration elapses or a signal arrives.
    /// What must be in place before the trace is announced (and the target goes on): the
    /// traced process's files kept open, a running interpreter's threads registered.
    pub fn prepare(&mut self) {
        self.pin_initial();
        if !self.parent && self.pid != 0 {
            self.scan_python(self.pid);
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
                unsafe { AsyncFd::register_with_interest(pidfd.0, Interest::READABLE) }
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
                _ = exit_of(&exited) => {
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

    /// Lets the session place frames with the kernel's mapping records (see `mmaps`).
    pub fn watch_mappings(&mut self, watch: MmapWatcher) {
        self.watch = Some(watch);
    }

    /// Applies the kernel's mapping records: before the events that follow them, so code a
    /// process mapped is known even if it is gone before /proc can be read.
    fn drain_mappings(&mut self) {
        drain_mappings(
            self.watch.as_mut(),
            &mut self.procs,
            &mut self.pending_maps,
            &mut self.symbolizer,
        );
    }

    /// Registers process `tgid`, with the mapping records that arrived before it.
    fn add_proc(&mut self, tgid: u32, p: Proc) {
        let p = self.procs.entry(tgid).or_insert(p);
        if let Some(maps) = self.pending_maps.remove(&tgid) {
            for m in maps {
                apply_mapping(&mut self.symbolizer, p, tgid, m);
            }
        }
    }

    /// Takes every record waiting in the ring buffer.
    pub fn drain(&mut self) {
        self.drain_mappings();
        loop {
            let Some(item) = self.tracer.events.next() else {
                break;
            };
            self.events += 1;
            let record = match decode_record(&item) {
                Ok(r) => r,
                Err(_) => {
                    self.decode_errors += 1;
                    continue;
                }
            };
            let (tgid, mut event, py_stack) = (record.tgid, record.event, record.py_stack);
            if let (Some(copy), Event::Alloc(a)) = (record.copy, &mut event) {
                a.stack = unwind_copy(
                    &mut Unwinding {
                        watch: self.watch.as_mut(),
                        procs: &mut self.procs,
                        pending: &mut self.pending_maps,
                        unwinders: &mut self.unwinders,
                        objects: &mut self.unwind_objects,
                        stacks: &mut self.stacks,
                        stats: &mut self.unwind_stats,
                        symbolizer: &mut self.symbolizer,
                    },
                    tgid,
                    copy,
                );
            }
            drop(item);
            if let Event::Alloc(a) = &mut event {
                a.stack = self.with_python(tgid, a.stack, py_stack);
            }
            self.observe(tgid, &event);
        }
    }

    fn observe(&mut self, tgid: u32, event: &Event) {
        if !self.procs.contains_key(&tgid) {
            let p = Proc::discover(tgid);
            pin_files(&mut self.symbolizer, &p);
            self.add_proc(tgid, p);
        }
        match *event {
            Event::Alloc(a) if a.stack != NO_STACK && !self.stacks.contains(a.stack) => {
                self.learn_stack(tgid, a.stack);
            }
            Event::ExecMap => {
                // Read now, while the process surely lives; keep the old view if it is gone.
                if let Some(p) = self.procs.get_mut(&tgid) {
                    p.space_stale = true;
                    if p.reread(tgid, monotonic_ns()) {
                        pin_files(&mut self.symbolizer, p);
                    }
                }
                self.detect_allocators(tgid);
                // An interpreter loads its modules as it starts: register its threads early.
                self.scan_python(tgid);
            }
            Event::Phase {
                tid, phase, enter, ..
            } => {
                let outstanding = self.table.heap_totals.outstanding_bytes;
                self.tracker.on_phase(tid, phase, enter, outstanding);
            }
            Event::Fork { child } => {
                let p = Proc::forked(tgid, &self.procs[&tgid]);
                self.procs.remove(&child);
                self.add_proc(child, p);
            }
            Event::Exec { comm } => {
                let changes = &mut self.changes;
                self.table
                    .release_process(tgid, monotonic_ns(), &mut |c| changes.push(c));
                // A spawned command's own exec starts it: not a re-exec.
                let first = self.parent && tgid == self.pid && !self.command_started;
                self.command_started |= first;
                if let Some(state) = self.pythons.remove(&tgid) {
                    for tid in state.tids.keys() {
                        self.tracer.remove_python_thread(*tid);
                    }
                }
                if let Some(p) = self.procs.get_mut(&tgid) {
                    p.exec(tgid, &comm);
                    if first {
                        p.execs = 0;
                    }
                }
                self.detect_allocators(tgid);
            }
            Event::Exit => {
                if let Some(p) = self.procs.get_mut(&tgid)
                    && !p.exited
                {
                    p.exited = true;
                    if tgid != self.pid {
                        self.exited.push_back(tgid);
                    }
                }
                self.evict_exited(monotonic_ns());
            }
            _ => {}
        }
        let changes = &mut self.changes;
        self.table.apply_from(tgid, event, &mut |c| changes.push(c));
        let outstanding = self.table.heap_totals.outstanding_bytes;
        for change in self.changes.drain(..) {
            self.tracker.on_change(&change, outstanding);
        }
    }

    /// Keeps memory bounded on a long trace of many processes: the oldest exited processes
    /// beyond `EXITED_KEPT` stop being reported (their blocks count as freed, as the system
    /// freed them), and what memprof kept for them goes.
    fn evict_exited(&mut self, now: u64) {
        while self.exited.len() > EXITED_KEPT {
            let Some(pid) = self.exited.pop_front() else {
                break;
            };
            let changes = &mut self.changes;
            self.table
                .forget_process(pid, now, &mut |c| changes.push(c));
            self.procs.remove(&pid);
            self.unwinders.remove(&pid);
            self.pending_maps.remove(&pid);
            if let Some(state) = self.pythons.remove(&pid) {
                for tid in state.tids.keys() {
                    self.tracer.remove_python_thread(*tid);
                }
            }
            self.evicted_processes += 1;
        }
    }

    /// After an exec, probes the allocators of the new image that no probe covers yet (a
    /// static binary, another libc, jemalloc...). Its libraries are mapped one by one after the
    /// exec, so this runs at each load until an allocator is found.
    fn detect_allocators(&mut self, tgid: u32) {
        let Some(p) = self.procs.get_mut(&tgid) else {
            return;
        };
        if p.detect_budget == 0 {
            return;
        }
        p.detect_budget -= 1;
        // An exec'd image usually maps only objects already looked at (the C library everyone
        // uses): parse the ELF files again only when a new one appeared.
        let ids: Vec<(u64, u64)> = p
            .space
            .mappings()
            .iter()
            .filter_map(Mapping::file_id)
            .collect();
        if !ids.is_empty()
            && ids
                .iter()
                .all(|id| self.tracer.is_probed(*id) || self.plain_objects.contains(id))
        {
            return;
        }
        let Ok(found) = allocators::of_pid(tgid) else {
            return;
        };
        // A dynamic program's allocators arrive with its libraries, the C library among the
        // last: look again at each load until it is there.
        if found
            .iter()
            .any(|a| matches!(a.kind, allocators::Kind::Glibc | allocators::Kind::Musl))
        {
            p.detect_budget = 0;
        }
        match self.tracer.add_allocators(&found) {
            Ok(added) if !added.is_empty() => eprintln!(
                "memprof: pid {tgid} ({}): now also probing {}",
                p.comm,
                added.join(", ")
            ),
            Ok(_) => {}
            Err(e) => eprintln!("memprof: warning: pid {tgid}: {e:#}"),
        }
        for id in ids {
            if !self.tracer.is_probed(id) {
                self.plain_objects.insert(id);
            }
        }
    }

    /// Samples outstanding bytes per group and per process, and the processes' RSS.
    fn sample(&mut self) {
        // New Python threads since the last look.
        let pythons: Vec<u32> = self.pythons.keys().copied().collect();
        for pid in pythons {
            self.scan_python(pid);
        }
        let now = monotonic_ns();
        let t = (now - self.start_ns) as f64 / 1e9;
        let mut rss = None;
        for (pid, p) in &mut self.procs {
            if p.exited {
                continue;
            }
            let table = self.table.process(*pid);
            if *pid != self.pid && table.is_none() {
                continue;
            }
            if let Ok(mem) = ProcMem::read(*pid) {
                p.last_mem = Some(mem);
                if *pid == self.pid {
                    rss = Some(mem.rss_bytes);
                }
            }
            let outstanding = table.map_or(0, |t| t.heap_totals.outstanding_bytes);
            p.series.push(t, outstanding as f64);
        }
        self.tracker
            .sample(now, self.table.heap_totals.outstanding_bytes, rss);
        self.pruned_groups += self.tracker.prune(GROUPS_KEPT, now, GROUP_IDLE_NS) as u64;
    }

    /// Stops listening for marks and removes the socket file.
    pub fn close_marks(&mut self) {
        self.marks = None;
    }

    /// Turns the kernel's BPF statistics (`--probe-stats`) back off.
    pub fn stop_probe_stats(&mut self) {
        self.tracer.stop_probe_stats();
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

    /// The stack key of an allocation: the native stack `native`, or, when the thread ran
    /// Python (`py` names its frames in the kernel's map), a stack with those Python frames
    /// placed where the interpreter's own frames begin. A Python thread not registered yet
    /// makes memprof look for the process's threads again.
    fn with_python(&mut self, tgid: u32, native: u64, py: u64) -> u64 {
        if py == memprof_common::NO_STACK {
            self.scan_python(tgid);
            return native;
        }
        let key = python_key(native, py);
        if self.stacks.contains(key) {
            return key;
        }
        if native != NO_STACK && !self.stacks.contains(native) {
            self.learn_stack(tgid, native);
        }
        let pairs = self.tracer.py_stack(py);
        let Some(state) = self.pythons.get_mut(&tgid) else {
            return native;
        };
        let Some(resolver) = &mut state.resolver else {
            return native;
        };
        let mut frames: Vec<PyFrame> = Vec::new();
        for (code, instr) in pairs {
            // Shim frames (code 0) and frames that have not started are left out, as CPython's
            // tracebacks leave them out. A code object memprof cannot read any more (its
            // process exited) stays as an unnamed Python frame, counted in `unknown_frames`.
            if code == 0 || resolver.incomplete_frame(code, instr) {
                continue;
            }
            frames.push(resolver.resolve(code, instr).unwrap_or_else(|_| PyFrame {
                function: String::new(),
                file: String::new(),
                line: None,
            }));
        }
        let natives = self
            .stacks
            .get(native)
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        // Python frames go above the first frame of the interpreter's object (the eval loop).
        let object = resolver.process.object.clone();
        let at = natives
            .iter()
            .position(|f| {
                f.module
                    .and_then(|m| self.stacks.modules().get(m as usize))
                    .is_some_and(|path| path.ends_with(&object))
            })
            .unwrap_or(natives.len());
        self.stacks.insert_mixed(key, &natives, &frames, at);
        key
    }

    /// Finds CPython in process `tgid` (once per image) and registers its threads with the
    /// kernel program, at most every 20 ms per process.
    fn scan_python(&mut self, tgid: u32) {
        const RESCAN_NS: u64 = 20_000_000;
        const DETECT_TRIES: u32 = 20;
        // Called for every allocation: a process that cannot be CPython is told apart once
        // per change of its name or address space.
        let Some(p) = self.procs.get_mut(&tgid) else {
            return;
        };
        if !p.may_run_python() {
            return;
        }
        let now = monotonic_ns();
        let state = self.pythons.entry(tgid).or_default();
        if now.saturating_sub(state.last_scan_ns) < RESCAN_NS {
            return;
        }
        state.last_scan_ns = now;
        if state.resolver.is_none() {
            if state.tries >= DETECT_TRIES {
                return;
            }
            state.tries += 1;
            let Ok(resolver) = Resolver::new(tgid) else {
                return;
            };
            let o = resolver.process.offsets;
            let mut walk = memprof_common::PyWalk {
                runtime: resolver.process.runtime,
                runtime_interpreters_head: o.runtime_interpreters_head,
                interp_threads_head: o.interp_threads_head,
                tstate_next: o.tstate_next,
                tstate_native_thread_id: o.tstate_native_thread_id,
                tstate_frame: o.tstate_frame,
                cframe_current_frame: o.cframe_current_frame,
                frame_previous: o.frame_previous,
                frame_code: o.frame_code,
                frame_instr: o.frame_instr,
                instr_is_pointer: u32::from(o.instr_kind == python::INSTR_POINTER),
                frame_owner: o.frame_owner,
                frame_span: 0,
                frames_in_data_stack: u32::from(
                    o.frame_model == python::FRAME_MODEL_INTERPRETER_FRAME,
                ),
                _pad: 0,
            };
            let Some(span) = walk.span_of_frame_fields() else {
                return;
            };
            walk.frame_span = span;
            if self.tracer.set_python(tgid, walk).is_err() {
                return;
            }
            state.resolver = Some(resolver);
        }
        let Some(resolver) = &mut state.resolver else {
            return;
        };
        let Ok(tstates) = resolver.thread_states() else {
            return;
        };
        let mut live = std::collections::HashSet::new();
        for tstate in tstates {
            if let Ok(thread) = resolver.thread(tstate)
                && let Some(tid) = thread.tid
            {
                live.insert(tid);
                if state.tids.get(&tid) != Some(&tstate) {
                    let _ = self.tracer.set_python_thread(tid, tstate);
                    state.tids.insert(tid, tstate);
                }
            }
        }
        let gone: Vec<u32> = state
            .tids
            .keys()
            .filter(|t| !live.contains(t))
            .copied()
            .collect();
        for tid in gone {
            state.tids.remove(&tid);
            self.tracer.remove_python_thread(tid);
        }
    }

    /// Reads a new stack from the kernel and normalizes it while the process is alive.
    ///
    /// The address-space view is re-read when a library was mapped since the last read, or when
    /// a frame falls outside every known mapping. The latter is rate-limited: without frame
    /// pointers deeper frames are often garbage that no re-read would place.
    fn learn_stack(&mut self, tgid: u32, key: u64) {
        const REREAD_NS: u64 = 50_000_000;
        let ips = self.tracer.stack(key);
        let now = monotonic_ns();
        // Code mapped after the records were last taken (the ring is read while the process
        // runs on): take them again first.
        if self
            .procs
            .get(&tgid)
            .is_some_and(|p| !StackStore::covered(&p.space, &ips))
        {
            self.drain_mappings();
        }
        let Some(p) = self.procs.get_mut(&tgid) else {
            return;
        };
        let reread = p.space_stale
            || (!StackStore::covered(&p.space, &ips)
                && now.saturating_sub(p.space_read_ns) > REREAD_NS);
        if reread && p.reread(tgid, now) {
            pin_files(&mut self.symbolizer, p);
        }
        self.stacks.insert(key, &ips, &p.space);
        // Files under another root are reachable only while the process lives: name the
        // frames now.
        if p.root.is_some()
            && let Some(frames) = self.stacks.get(key)
        {
            self.symbolizer.frames(&self.stacks, frames);
        }
    }

    fn inputs(&self, now: u64) -> Inputs<'_> {
        Inputs {
            pid: self.pid,
            table: &self.table,
            stacks: &self.stacks,
            kernel: report::KernelLosses {
                mapping_records_lost: self.watch.as_ref().map_or(0, |w| w.lost),
                ..self.tracer.losses()
            },
            probe_stats: self.tracer.probe_stats(),
            decode_errors: self.decode_errors,
            now_ns: now,
            elapsed_s: (now - self.start_ns) as f64 / 1e9,
            min_age_ns: self.settings.min_age.as_nanos() as u64,
            tracker: &self.tracker,
            unwind: self.settings.dwarf.then_some(self.unwind_stats),
            forgotten: report::Forgotten {
                processes: self.evicted_processes,
                groups: self.pruned_groups,
            },
            limit: self.settings.limit,
            rules: &self.rules,
            mem: ProcMem::read(self.pid)
                .ok()
                .or(self.procs.get(&self.pid).and_then(|p| p.last_mem)),
            top: self
                .settings
                .top
                .or(if self.settings.json { None } else { Some(10) }),
        }
    }

    pub fn snapshot(&mut self) -> Report {
        let mut symbolizer = std::mem::take(&mut self.symbolizer);
        let inputs = self.inputs(monotonic_ns());
        let mut report = report::snapshot(&inputs, &mut symbolizer);
        if self.settings.per_process {
            let mut processes: Vec<_> = self
                .procs
                .iter()
                .filter(|(pid, _)| **pid == self.pid || self.table.process(**pid).is_some())
                .map(|(pid, p)| {
                    let info = ProcessInfo {
                        pid: *pid,
                        parent: p.parent,
                        comm: &p.comm,
                        cmdline: &p.cmdline,
                        exited: p.exited,
                        execs: p.execs,
                        mem: if p.exited {
                            None
                        } else {
                            ProcMem::read(*pid).ok().or(p.last_mem)
                        },
                        growth_bytes_per_s: p.growth_bytes_per_s(),
                    };
                    report::process_report(
                        &inputs,
                        &mut symbolizer,
                        &info,
                        self.table.process(*pid),
                    )
                })
                .collect();
            let outstanding = |p: &report::ProcessReport| {
                p.totals.heap.outstanding_bytes + p.mmap.outstanding_bytes
            };
            if self.settings.rank_by_growth {
                processes.sort_by(|a, b| {
                    let (ga, gb) = (
                        a.growth_rate_mb_per_hour.unwrap_or(f64::MIN),
                        b.growth_rate_mb_per_hour.unwrap_or(f64::MIN),
                    );
                    gb.total_cmp(&ga).then(a.pid.cmp(&b.pid))
                });
            } else {
                processes
                    .sort_by(|a, b| outstanding(b).cmp(&outstanding(a)).then(a.pid.cmp(&b.pid)));
            }
            report.processes = Some(processes);
        }
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

/// What unwinding a stack copy touches (fields of `Session`, borrowed apart from the ring
/// buffer the copy lives in).
struct Unwinding<'a> {
    watch: Option<&'a mut MmapWatcher>,
    procs: &'a mut foldhash::HashMap<u32, Proc>,
    pending: &'a mut foldhash::HashMap<u32, Vec<Mapping>>,
    unwinders: &'a mut foldhash::HashMap<u32, ProcessUnwinder>,
    objects: &'a mut ObjectCache,
    stacks: &'a mut StackStore,
    stats: &'a mut report::UnwindStats,
    symbolizer: &'a mut Symbolizer,
}

/// Unwinds one `--unwind dwarf` stack copy of process `tgid` and returns its stack key, storing
/// the stack the first time it is seen.
fn unwind_copy(u: &mut Unwinding<'_>, tgid: u32, copy: event::StackCopy<'_>) -> u64 {
    const REREAD_NS: u64 = 50_000_000;
    let now = monotonic_ns();
    if u.procs
        .get(&tgid)
        .is_some_and(|p| p.space.find(copy.ip).is_none())
    {
        drain_mappings(u.watch.as_deref_mut(), u.procs, u.pending, u.symbolizer);
    }
    let p = u.procs.entry(tgid).or_insert_with(|| Proc::discover(tgid));
    if let Some(maps) = u.pending.remove(&tgid) {
        for m in maps {
            apply_mapping(u.symbolizer, p, tgid, m);
        }
    }
    // The caller's code must be in the view of the address space, or its CFI is not found.
    let stale = p.space_stale
        || (p.space.find(copy.ip).is_none() && now.saturating_sub(p.space_read_ns) > REREAD_NS);
    if stale && p.reread(tgid, now) {
        pin_files(u.symbolizer, p);
    }
    let unwinder = u.unwinders.entry(tgid).or_default();
    unwinder.update(&p.space, p.space_gen, u.objects);
    let out = unwinder.unwind(copy.ip, copy.sp, copy.bp, copy.stack);
    u.stats.allocations += 1;
    let key = unwinding::stack_key(&out.frames);
    if !u.stacks.contains(key) {
        u.stacks.insert(key, &out.frames, &p.space);
        u.stats.stacks += 1;
        if out.truncated {
            u.stats.truncated_stacks += 1;
        }
        if p.root.is_some()
            && let Some(frames) = u.stacks.get(key)
        {
            u.symbolizer.frames(u.stacks, frames);
        }
    }
    key
}

/// Applies the kernel's mapping records written since the last call (see `Session::watch`).
fn drain_mappings(
    watch: Option<&mut MmapWatcher>,
    procs: &mut foldhash::HashMap<u32, Proc>,
    pending: &mut foldhash::HashMap<u32, Vec<Mapping>>,
    symbolizer: &mut Symbolizer,
) {
    const PENDING_MAX: usize = 16384;
    let Some(watch) = watch else {
        return;
    };
    watch.drain(|r| match procs.get_mut(&r.pid) {
        Some(p) => apply_mapping(symbolizer, p, r.pid, r.mapping),
        None => {
            if pending.values().map(Vec::len).sum::<usize>() >= PENDING_MAX {
                pending.clear();
            }
            pending.entry(r.pid).or_default().push(r.mapping);
        }
    });
}

/// What memprof knows of a CPython process.
#[derive(Default)]
struct PyState {
    resolver: Option<Resolver>,
    /// Detection attempts so far (the interpreter may not be mapped or initialized yet).
    tries: u32,
    last_scan_ns: u64,
    /// Threads registered with the kernel program: tid -> thread state.
    tids: std::collections::HashMap<u32, u64>,
}

/// The key of a stack with Python frames: native key and Python key combined, with bit 62 set.
fn python_key(native: u64, py: u64) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (native, py).hash(&mut h);
    (h.finish() | (1 << 62)) & !(1 << 63)
}

/// Adds a mapping the kernel reported to process `pid`'s view.
fn apply_mapping(symbolizer: &mut Symbolizer, p: &mut Proc, pid: u32, mut m: Mapping) {
    if p.root.is_some() {
        m.path = crate::maps::file_of(pid, &m.path, &m.dev, m.inode);
        symbolizer.pin(&m.path);
    }
    p.space.insert(m);
    p.space_gen += 1;
}

/// Keeps the mapped files of a process under another root open: their paths go away with it.
fn pin_files(symbolizer: &mut Symbolizer, p: &Proc) {
    if p.root.is_some() {
        for m in p.space.mappings() {
            symbolizer.pin(&m.path);
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
