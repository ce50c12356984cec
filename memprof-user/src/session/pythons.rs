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
    /// A look was asked for within `RESCAN_NS` of the last one: due at the next drain tick
    /// (a thread that allocates once and then waits is registered before it runs on).
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

    /// Finds CPython in process `tgid` (once per image) and registers its threads with the
    /// kernel program, at most every 20 ms per process.
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
        let interval = if state.resolver.is_none() {
            if state.tries < DETECT_FAST_TRIES {
                RESCAN_NS
            } else {
                DETECT_SLOW_NS
            }
        } else {
            RESCAN_NS
        };
        if now.saturating_sub(state.last_scan_ns) < interval {
            state.deferred = true;
            return;
        }
        state.last_scan_ns = now;
        state.deferred = false;
        if state.resolver.is_none() {
            if state.given_up
                || state
                    .status
                    .as_ref()
                    .is_some_and(|s| s.status == "unsupported")
            {
                return;
            }
            state.tries = state.tries.saturating_add(1);
            let resolver = match Resolver::new(tgid) {
                Ok(resolver) => resolver,
                Err(err) => {
                    // Not CPython (yet: a command memprof started may not have mapped its
                    // interpreter); anything else is said in the report.
                    if !matches!(err, PythonError::NotPython { .. }) {
                        state.status = PythonStatus::of_error(&err);
                    }
                    return;
                }
            };
            let status = |reason: &str| PythonStatus {
                version: Some(resolver.process.version.to_string()),
                status: "unreadable",
                reason: reason.to_string(),
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
                frame_is_entry: o.frame_is_entry,
                code_firstlineno: o.code_firstlineno,
            };
            let Some(span) = walk.span_of_frame_fields() else {
                state.status = Some(status(&format!(
                    "the frame fields it publishes lie beyond the {} bytes the kernel program \
                     reads per frame",
                    memprof_common::PY_FRAME_COPY
                )));
                state.given_up = true;
                return;
            };
            walk.frame_span = span;
            if let Err(e) = self.tracer.set_python(tgid, walk) {
                state.status = Some(status(&format!(
                    "the kernel program's table of CPython processes refused it: {e:#}"
                )));
                return;
            }
            state.status = Some(PythonStatus::ok(&resolver.process));
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
}
