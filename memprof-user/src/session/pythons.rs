//! CPython processes: finding the interpreter, registering its threads with the kernel program,
//! and turning the Python frames the kernel recorded into a stack with the native frames.

use memprof_common::NO_STACK;

use super::Session;
use crate::{
    stacks::{
        mixed::{python_groups, python_key, python_places, python_position},
        python::{self, PyFrame, PythonError, PythonStatus, Resolver},
    },
    sys::clock::monotonic_ns,
};

/// What memprof knows of a CPython process.
#[derive(Default)]
pub(super) struct PyState {
    pub(super) resolver: Option<Resolver>,
    /// Detection attempts so far (the interpreter may not be mapped or initialized yet).
    tries: u32,
    /// The interpreter was found but cannot be read: detection stops.
    given_up: bool,
    last_scan_ns: u64,
    /// The ticket of the scanner's job in progress for this process.
    pending: Option<u64>,
    /// A look was asked for within the rescan interval of the last one: due at the next drain
    /// tick (a thread that allocates once and then waits is registered before it runs on).
    deferred: bool,
    /// Threads registered with the kernel program: tid -> thread state.
    pub(super) tids: std::collections::HashMap<u32, u64>,
    /// Whether its Python frames are read, and if not why (the report's `python`); `None`
    /// while it is not known to run CPython.
    pub(super) status: Option<PythonStatus>,
}

impl Session {
    /// Whether process `pid`'s Python frames are read, and if not why (`None` while it is not
    /// known to run CPython).
    pub(super) fn python_status(&self, pid: u32) -> Option<PythonStatus> {
        self.pythons.get(&pid).and_then(|s| s.status.clone())
    }

    /// The looks for new Python threads put off by `scan_python`'s rate limit.
    pub(super) fn scan_deferred_pythons(&mut self) {
        let due: Vec<u32> = self
            .pythons
            .iter()
            .filter(|(_, s)| s.deferred)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in due {
            self.scan_python(pid);
        }
    }

    /// The stack key of an allocation: the native stack `native`, or, when the thread ran
    /// Python (`py` names its frames in the kernel's map), a stack with those Python frames
    /// in their places: each call of the eval loop's frames just outside that call's native
    /// frame (see `mixed::python_places`). A Python thread not registered yet
    /// makes memprof look for the process's threads again.
    pub(super) fn with_python(&mut self, tgid: u32, native: u64, py: u64) -> u64 {
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
        // One group per call of the eval loop. Frames that have not started are left out, as
        // CPython's tracebacks leave them out. A code object memprof cannot read any more (its
        // process exited) stays as an unnamed Python frame, counted in `unknown_frames`.
        let per_call =
            resolver.process.offsets.frame_model != python::FRAME_MODEL_INTERPRETER_FRAME;
        let mut groups: Vec<Vec<PyFrame>> = Vec::new();
        for group in python_groups(&pairs, per_call) {
            let mut frames = Vec::with_capacity(group.len());
            for (code, instr) in group {
                if resolver.incomplete_frame(code, instr) {
                    continue;
                }
                frames.push(resolver.resolve(code, instr).unwrap_or_else(|_| PyFrame {
                    function: String::new(),
                    file: String::new(),
                    line: None,
                }));
            }
            groups.push(frames);
        }
        let natives = self
            .stacks
            .get(native)
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        // Without the eval loop's address (or no frame in it), all Python frames go above the
        // first frame in the interpreter's object.
        let fallback = python_position(&natives, self.stacks.modules(), &resolver.process.object);
        let places = python_places(
            &natives,
            &resolver.process.eval_loop,
            groups.len(),
            fallback,
        );
        self.stacks.insert_mixed(key, &natives, &groups, &places);
        key
    }

    /// Finds CPython in process `tgid` (once per image) and registers its threads with the
    /// kernel program, at most every 20 ms per process. The reading is done by the scanner
    /// thread (see [`Scanner`]): this only asks, and [`Session::python_done`] applies what it
    /// found, so a hostile process can slow its own scans but never the trace.
    pub(super) fn scan_python(&mut self, tgid: u32) {
        const RESCAN_NS: u64 = 20_000_000;
        // Until the interpreter is found (it may not be mapped or initialized yet, and a slow
        // start under load takes seconds), detection is retried every RESCAN_NS for the first
        // DETECT_FAST_TRIES, then every DETECT_SLOW_NS for as long as the process may run Python.
        const DETECT_FAST_TRIES: u32 = 20;
        const DETECT_SLOW_NS: u64 = 250_000_000;
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
        let interval = if state.resolver.is_none() && state.tries >= DETECT_FAST_TRIES {
            DETECT_SLOW_NS
        } else {
            RESCAN_NS
        };
        if state.pending.is_some() {
            return;
        }
        if now.saturating_sub(state.last_scan_ns) < interval {
            state.deferred = true;
            return;
        }
        state.deferred = false;
        if state.resolver.is_none()
            && (state.given_up
                || state
                    .status
                    .as_ref()
                    .is_some_and(|s| s.status == "unsupported"))
        {
            return;
        }
        let job = match &state.resolver {
            None => Job::Detect,
            Some(resolver) => Job::Threads(Box::new(resolver.process.clone())),
        };
        let scanner = self.py_scanner.get_or_insert_with(Scanner::start);
        if let Some(ticket) = scanner.ask(tgid, job) {
            state.last_scan_ns = now;
            state.pending = Some(ticket);
            if state.resolver.is_none() {
                state.tries = state.tries.saturating_add(1);
            }
        }
    }

    /// Applies what the scanner found (in the event loop, cheaply): the interpreter's layout
    /// given to the kernel program, threads registered and unregistered. A finding for a
    /// process that exec'd or went away since it was asked for is dropped.
    pub(super) fn python_done(&mut self, done: Done) {
        let Some(state) = self.pythons.get_mut(&done.pid) else {
            return;
        };
        if state.pending != Some(done.ticket) {
            return;
        }
        state.pending = None;
        match done.found {
            Found::Nothing => {}
            Found::Refused(status) => state.status = Some(status),
            Found::Interpreter(process) => {
                let status = |reason: &str| PythonStatus {
                    version: Some(process.version.to_string()),
                    status: "unreadable",
                    reason: reason.to_string(),
                };
                let o = process.offsets;
                let mut walk = memprof_common::PyWalk {
                    runtime: process.runtime,
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
                    frame_is_entry: o.frame_is_entry,
                    code_firstlineno: o.code_firstlineno,
                };
                let Some(span) = walk.span_of_frame_fields() else {
                    state.status = Some(status(&format!(
                        "the frame fields it publishes lie beyond the {} bytes the kernel \
                         program reads per frame",
                        memprof_common::PY_FRAME_COPY
                    )));
                    state.given_up = true;
                    return;
                };
                walk.frame_span = span;
                if let Err(e) = self.tracer.set_python(done.pid, walk) {
                    state.status = Some(status(&format!(
                        "the kernel program's table of CPython processes refused it: {e:#}"
                    )));
                    return;
                }
                state.status = Some(PythonStatus::ok(&process));
                state.resolver = Some(Resolver::with_process(*process));
                // Its threads at once, not in 20 ms.
                state.last_scan_ns = 0;
                self.scan_python(done.pid);
            }
            Found::Threads { tids, whole } => {
                let mut live = std::collections::HashSet::new();
                for (tid, tstate) in tids {
                    live.insert(tid);
                    if state.tids.get(&tid) != Some(&tstate) {
                        let _ = self.tracer.set_python_thread(tid, tstate);
                        state.tids.insert(tid, tstate);
                    }
                }
                // A walk cut short by its budget proves no thread gone.
                if !whole {
                    return;
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
        }
    }

    /// Waits up to `wait` for the scanner's findings on `pid` and applies them: before the
    /// trace is announced, so a running interpreter's threads are registered first.
    pub(super) fn python_settle(&mut self, pid: u32, wait: std::time::Duration) {
        let deadline = std::time::Instant::now() + wait;
        while self.pythons.get(&pid).is_some_and(|s| s.pending.is_some())
            && std::time::Instant::now() < deadline
        {
            match self.py_scanner.as_mut().map(|s| s.done.try_recv()) {
                Some(Ok(done)) => self.python_done(done),
                Some(Err(tokio::sync::mpsc::error::TryRecvError::Empty)) => {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                _ => return,
            }
        }
    }
}

/// What the scanner is asked to do for a process.
pub(super) enum Job {
    /// Find the interpreter: the object defining `_PyRuntime`, its version and layout.
    Detect,
    /// List the threads of the interpreter found before.
    Threads(Box<python::PyProcess>),
}

/// What the scanner found.
pub(super) enum Found {
    Nothing,
    /// CPython, but not one memprof reads (why, for the report).
    Refused(PythonStatus),
    Interpreter(Box<python::PyProcess>),
    /// Thread ids and states; `whole` when the walk ended rather than ran out of time.
    Threads {
        tids: Vec<(u32, u64)>,
        whole: bool,
    },
}

/// A finding, for the request `ticket` about process `pid`.
pub(super) struct Done {
    pub(super) pid: u32,
    ticket: u64,
    found: Found,
}

/// The thread that reads CPython processes for the session: detection (ELF files, bounded)
/// and thread scans (the target's memory, with loop detection and a time budget per job), so
/// no read of target-controlled data runs in the event loop.
pub(super) struct Scanner {
    jobs: std::sync::mpsc::SyncSender<(u32, u64, Job)>,
    pub(super) done: tokio::sync::mpsc::UnboundedReceiver<Done>,
    next_ticket: u64,
}

impl Scanner {
    /// Jobs waiting at most; more are not asked for (the process is asked again later).
    const QUEUE: usize = 64;
    /// Time one job may take.
    const BUDGET: std::time::Duration = std::time::Duration::from_millis(200);

    fn start() -> Self {
        let (jobs, queue) = std::sync::mpsc::sync_channel::<(u32, u64, Job)>(Self::QUEUE);
        let (tx, done) = tokio::sync::mpsc::unbounded_channel();
        let spawned = std::thread::Builder::new()
            .name("memprof-python".into())
            .spawn(move || {
                for (pid, ticket, job) in queue {
                    let found = Self::work(pid, job);
                    if tx.send(Done { pid, ticket, found }).is_err() {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            eprintln!("memprof: warning: no Python frames: cannot start a thread: {e}");
        }
        Self {
            jobs,
            done,
            next_ticket: 1,
        }
    }

    /// Queues `job` for `pid`; its ticket, or None when the queue is full.
    fn ask(&mut self, pid: u32, job: Job) -> Option<u64> {
        let ticket = self.next_ticket;
        self.jobs.try_send((pid, ticket, job)).ok()?;
        self.next_ticket += 1;
        Some(ticket)
    }

    fn work(pid: u32, job: Job) -> Found {
        let deadline = std::time::Instant::now() + Self::BUDGET;
        match job {
            Job::Detect => match python::detect(pid) {
                Ok(process) => Found::Interpreter(Box::new(process)),
                // Not CPython (yet: a command memprof started may not have mapped its
                // interpreter); anything else is said in the report.
                Err(PythonError::NotPython { .. }) => Found::Nothing,
                Err(err) => PythonStatus::of_error(&err).map_or(Found::Nothing, Found::Refused),
            },
            Job::Threads(process) => match Resolver::with_process(*process).thread_ids(deadline) {
                Ok((tids, whole)) => Found::Threads { tids, whole },
                Err(_) => Found::Nothing,
            },
        }
    }
}
