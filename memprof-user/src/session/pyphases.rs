//! Phases named by Python function (`--phase NAME=py:QUALNAME`). Every allocation of a Python
//! thread comes with the thread's Python frames, and so does every free while such phases are
//! traced (the kernel's `PY_FREES`): the phases whose function is among those frames are the
//! ones the thread is in at that call. When that set changes between two calls of a thread,
//! the tracker is given the phases left and entered, in order, before the call's own change,
//! so Python phases are counted exactly as native ones (`analysis::tracking`).
//!
//! A thread is seen entering or leaving at its allocator calls: a call with no allocation or
//! free in it is not seen, and consecutive calls with no allocator call between them read as
//! one stretch (`entries`). What is allocated and freed is attributed exactly.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    io::Read as _,
    os::unix::fs::OpenOptionsExt as _,
};

use memprof_common::{NO_STACK, PY_ENTRY};

use super::{Session, naming::Input};
use crate::{
    analysis::pyphases::{PyPattern, qualname_from_source},
    ingest::event::Event,
};

/// Largest source file read for a qualified name (3.8 to 3.10).
const MAX_SOURCE_BYTES: u64 = 4 << 20;
/// Entries of the caches below before they are emptied.
const CACHE_MAX: usize = 100_000;

/// The Python phases of a trace and what is known of each thread.
pub(super) struct PyPhases {
    /// `(name, function)`, in tracker order from `first`.
    phases: Vec<(String, PyPattern)>,
    /// Tracker index of the first Python phase (native ones come before).
    first: u32,
    /// The phases of each Python stack: (process, key) -> bit per phase.
    stacks: HashMap<(u32, u64), u64>,
    /// The phases each thread is in: tid -> (process, bits).
    threads: HashMap<u32, (u32, u64)>,
    /// Phases some thread was in.
    seen: u64,
    /// Python frames of allocator calls that could not be read (the process had exited or
    /// the code object was gone): whether those calls were inside a phase is not known.
    unreadable: u64,
    /// Qualified names read from source files: (file, line, name) -> qualified name.
    qualnames: HashMap<(String, u32, String), Option<String>>,
    /// The interpreters of the Python processes whose frames were read: (pid, executable,
    /// version).
    interpreters: BTreeSet<(u32, String, String)>,
}

impl PyPhases {
    /// `phases` follow the `natives` native function phases; None without Python phases.
    pub(super) fn new(phases: &[(String, PyPattern)], natives: usize) -> Option<Self> {
        (!phases.is_empty()).then(|| Self {
            phases: phases.to_vec(),
            first: natives as u32,
            stacks: HashMap::new(),
            threads: HashMap::new(),
            seen: 0,
            unreadable: 0,
            qualnames: HashMap::new(),
            interpreters: BTreeSet::new(),
        })
    }

    /// A warning for each phase no thread was seen in, naming the interpreters traced.
    pub(super) fn warnings(&self) -> Vec<String> {
        let traced: Vec<String> = self
            .interpreters
            .iter()
            .map(|(pid, exe, version)| format!("{exe} (CPython {version}, pid {pid})"))
            .collect();
        let mut warnings: Vec<String> = self
            .phases
            .iter()
            .enumerate()
            .filter(|(i, _)| self.seen & (1 << i) == 0)
            .map(|(_, (name, pattern))| {
                let spec = format!("phase {name} (py:{})", pattern.name);
                if traced.is_empty() {
                    format!("{spec}: no CPython process ran Python code in this trace")
                } else {
                    format!(
                        "{spec}: no Python function {} ran in {}",
                        pattern.name,
                        traced.join(", ")
                    )
                }
            })
            .collect();
        if self.unreadable > 0 {
            warnings.push(format!(
                "{} Python frames of allocator calls (counted once per distinct stack) could not be read (the process exited or \
                 freed the code first): the Python phases may miss those calls",
                self.unreadable
            ));
        }
        warnings
    }
}

impl Session {
    /// Before `event` of process `tgid` is applied: the Python phases its thread left or
    /// entered since its last allocator call, told from the Python frames `py` (a key in
    /// `PY_STACKS`) recorded with it. An exec or the process's exit leaves every phase of its
    /// threads.
    pub(super) fn python_phase_turns(&mut self, tgid: u32, event: &Event, py: u64) {
        let Some(pp) = &self.py_phases else {
            return;
        };
        let tid = match *event {
            Event::Alloc(a) => a.tid,
            Event::Free { tid, .. } => tid,
            Event::Exec { .. } | Event::Exit => {
                let tids: Vec<u32> = pp
                    .threads
                    .iter()
                    .filter(|(_, (pid, _))| *pid == tgid)
                    .map(|(tid, _)| *tid)
                    .collect();
                for tid in tids {
                    self.python_phase_turn(tgid, tid, 0);
                }
                return;
            }
            _ => return,
        };
        let bits = if py == NO_STACK {
            0
        } else {
            // Frames that cannot be read yet tell nothing: the thread stays where it was.
            match self.python_phase_bits(tgid, py) {
                Some(bits) => bits,
                None => return,
            }
        };
        self.python_phase_turn(tgid, tid, bits);
    }

    /// Thread `tid` of `tgid` is now in the Python phases `bits`.
    fn python_phase_turn(&mut self, tgid: u32, tid: u32, bits: u64) {
        let Some(pp) = &mut self.py_phases else {
            return;
        };
        let was = pp.threads.get(&tid).map_or(0, |(_, bits)| *bits);
        if was == bits {
            return;
        }
        if bits == 0 {
            pp.threads.remove(&tid);
        } else {
            pp.threads.insert(tid, (tgid, bits));
        }
        pp.seen |= bits;
        let first = pp.first;
        let outstanding = self.table.heap_totals.outstanding_bytes;
        // Left first, then entered.
        for (turned, enter) in [(was & !bits, false), (bits & !was, true)] {
            for i in 0..64 {
                if turned & (1 << i) != 0 {
                    self.track(Input::Phase {
                        tid,
                        phase: first + i,
                        enter,
                        outstanding,
                    });
                }
            }
        }
    }

    /// The Python phases of Python stack `py` of process `tgid`: a bit per phase whose
    /// function is one of its frames. None while the frames cannot be named.
    fn python_phase_bits(&mut self, tgid: u32, py: u64) -> Option<u64> {
        let pp = self.py_phases.as_mut()?;
        if let Some(bits) = pp.stacks.get(&(tgid, py)) {
            return Some(*bits);
        }
        let resolver = self.pythons.get_mut(&tgid)?.resolver.as_mut()?;
        let version = resolver.process.version;
        if pp.interpreters.iter().all(|(pid, ..)| *pid != tgid) {
            let exe = fs::read_link(format!("/proc/{tgid}/exe")).map_or_else(
                |_| resolver.process.object.clone(),
                |p| p.display().to_string(),
            );
            pp.interpreters.insert((
                tgid,
                exe,
                format!("{}.{}.{}", version.major, version.minor, version.micro),
            ));
        }
        // Before 3.11 a code object keeps only the function's own name.
        let from_source = version.minor < 11 && pp.phases.iter().any(|(_, p)| p.dotted());
        let mut bits = 0u64;
        for (code, instr) in self.tracer.py_stack(py) {
            let instr = instr & !PY_ENTRY;
            // Shims of the C stack, and frames not started: not the function's code running.
            if code == 0 || resolver.incomplete_frame(code, instr) {
                continue;
            }
            let Ok(frame) = resolver.resolve(code, instr) else {
                // Typically the process exited before its frames were read: counted, and
                // reported with the phases.
                pp.unreadable += 1;
                continue;
            };
            // The source is read only for a function some dotted name ends with.
            let wanted = from_source
                && pp
                    .phases
                    .iter()
                    .any(|(_, p)| p.dotted() && p.function() == frame.function);
            let qualname = match (wanted, frame.line) {
                (true, Some(line)) => {
                    let key = (frame.file.clone(), line, frame.function.clone());
                    if pp.qualnames.len() >= CACHE_MAX {
                        pp.qualnames.clear();
                    }
                    pp.qualnames
                        .entry(key)
                        .or_insert_with(|| {
                            let source = read_source(tgid, &frame.file)?;
                            qualname_from_source(&source, line, &frame.function)
                        })
                        .clone()
                        .unwrap_or_else(|| frame.function.clone())
                }
                _ => frame.function.clone(),
            };
            for (i, (_, pattern)) in pp.phases.iter().enumerate() {
                if pattern.matches(&qualname, &frame.file) {
                    bits |= 1 << i;
                }
            }
        }
        if pp.stacks.len() >= CACHE_MAX {
            pp.stacks.clear();
        }
        pp.stacks.insert((tgid, py), bits);
        Some(bits)
    }

    /// Threads that exited inside a Python phase leave it (a thread is otherwise seen leaving
    /// at its next allocator call).
    pub(super) fn python_phase_threads_gone(&mut self) {
        let Some(pp) = &self.py_phases else {
            return;
        };
        let gone: Vec<(u32, u32)> = pp
            .threads
            .iter()
            .filter(|(tid, (pid, _))| {
                !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
            })
            .map(|(tid, (pid, _))| (*pid, *tid))
            .collect();
        for (pid, tid) in gone {
            self.python_phase_turn(pid, tid, 0);
        }
    }

    /// Warnings for the Python phases no thread was seen in.
    pub fn python_phase_warnings(&self) -> Vec<String> {
        self.py_phases
            .as_ref()
            .map_or_else(Vec::new, PyPhases::warnings)
    }
}

/// The text of source file `file` of process `tgid` (its path as the process sees it: under
/// its root, or its working directory for a relative one), if it is a regular file of at most
/// `MAX_SOURCE_BYTES`.
fn read_source(tgid: u32, file: &str) -> Option<String> {
    let path = if file.starts_with('/') {
        format!("/proc/{tgid}/root{file}")
    } else {
        format!("/proc/{tgid}/cwd/{file}")
    };
    let f = fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    f.take(MAX_SOURCE_BYTES).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}
