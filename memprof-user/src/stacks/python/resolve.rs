//! Reading a CPython process: its thread states, each thread's frame chain, and the code
//! objects the frames run, decoded into function, file and line (cached by address).

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    time::Instant,
};

use memprof_common::{PY_LINE_TAG_MASK, py_line_tag};

use super::{
    FRAME_OWNED_BY_CSTACK, FRAME_OWNED_BY_GENERATOR, GLIBC_PTHREAD_TID, INSTR_LASTI_BYTES,
    INSTR_LASTI_UNITS, INSTR_POINTER, MAX_FRAMES, MAX_INTERPRETERS, MAX_STRING_BYTES,
    MAX_TABLE_BYTES, MAX_THREADS, Mem, NONE, PyFrame, PyProcess, PyThread, PythonError, Result,
    STACKREF_TAG_BITS, detect, linetable310_line, lnotab_line, locations_line,
};

/// What is cached of a code object.
#[derive(Clone, Debug)]
struct CodeInfo {
    function: String,
    file: String,
    firstlineno: i32,
    table: Vec<u8>,
    /// Runtime address of the bytecode (3.11+): `code + co_code_adaptive`.
    code_start: u64,
    /// See `Resolver::identity`.
    identity: [u64; 3],
}

/// Reads the frames of one CPython process, caching decoded code objects by address.
///
/// A code object's address is stable while it lives; once freed, the address may hold another
/// code object, so the cache of a long-lived process should be dropped when its code changes
/// (module reloads) — resolution checks the type, not the identity.
pub struct Resolver {
    pub process: PyProcess,
    pub(super) mem: Mem,
    codes: HashMap<u64, CodeInfo>,
}

impl Resolver {
    /// Detects CPython in `pid`.
    pub fn new(pid: u32) -> Result<Self> {
        Ok(Self::with_process(detect(pid)?))
    }

    pub fn with_process(process: PyProcess) -> Self {
        Self {
            mem: Mem::new(process.pid),
            process,
            codes: HashMap::new(),
        }
    }

    fn invalid(&self, what: impl Into<String>, addr: u64) -> PythonError {
        PythonError::Invalid {
            pid: self.process.pid,
            what: what.into(),
            addr,
        }
    }

    fn field(&self, base: u64, offset: u32) -> Option<u64> {
        (offset != NONE).then(|| base.wrapping_add(u64::from(offset)))
    }

    /// Thread states of every interpreter, newest first within each.
    pub fn thread_states(&self) -> Result<Vec<u64>> {
        Ok(self.thread_states_until(None)?.0)
    }

    /// [`Resolver::thread_states`] that stops at `deadline`; also says whether the walk was
    /// whole. Lists that loop back (a corrupt or hostile process) end where they repeat.
    pub fn thread_states_until(&self, deadline: Option<Instant>) -> Result<(Vec<u64>, bool)> {
        let o = &self.process.offsets;
        let mut states = Vec::new();
        let mut seen: HashSet<u64> = HashSet::new();
        let mut interps: HashSet<u64> = HashSet::new();
        let late = || deadline.is_some_and(|d| Instant::now() >= d);
        let mut interp = self.mem.u64(
            self.process
                .runtime
                .wrapping_add(u64::from(o.runtime_interpreters_head)),
        )?;
        for _ in 0..MAX_INTERPRETERS {
            if interp == 0 || !interps.insert(interp) {
                break;
            }
            let mut tstate = self
                .mem
                .u64(interp.wrapping_add(u64::from(o.interp_threads_head)))?;
            while tstate != 0 && states.len() < MAX_THREADS && seen.insert(tstate) {
                if late() {
                    return Ok((states, false));
                }
                states.push(tstate);
                tstate = self
                    .mem
                    .u64(tstate.wrapping_add(u64::from(o.tstate_next)))?;
            }
            interp = self
                .mem
                .u64(interp.wrapping_add(u64::from(o.interp_next)))?;
        }
        Ok((states, true))
    }

    /// The kernel thread id of each thread state of the process, without reading any frame:
    /// what registering the threads needs. Stops at `deadline` (the list is then not whole:
    /// the flag is false).
    pub fn thread_ids(&self, deadline: Instant) -> Result<(Vec<(u32, u64)>, bool)> {
        let (states, mut whole) = self.thread_states_until(Some(deadline))?;
        let mut out = Vec::new();
        for tstate in states {
            if Instant::now() >= deadline {
                whole = false;
                break;
            }
            if let Ok(Some(tid)) = self.tid(tstate) {
                out.push((tid, tstate));
            }
        }
        Ok((out, whole))
    }

    /// The kernel tid of the thread state at `tstate` (CPython records the id its own pid
    /// namespace gives: mapped to the kernel's).
    fn tid(&self, tstate: u64) -> Result<Option<u32>> {
        let o = self.process.offsets;
        Ok(match self.field(tstate, o.tstate_native_thread_id) {
            Some(a) => host_tid(self.process.pid, self.mem.u64(a)? as u32),
            None => {
                let pthread = self
                    .mem
                    .u64(tstate.wrapping_add(u64::from(o.tstate_thread_id)))?;
                self.glibc_tid(pthread)
            }
        })
    }

    /// Every Python thread of the process with its frames, innermost first.
    pub fn threads(&mut self) -> Result<Vec<PyThread>> {
        self.thread_states()?
            .into_iter()
            .map(|tstate| self.thread(tstate))
            .collect()
    }

    /// The thread state at `tstate` and its frames.
    pub fn thread(&mut self, tstate: u64) -> Result<PyThread> {
        let o = self.process.offsets;
        let pthread = self.mem.u64(tstate + u64::from(o.tstate_thread_id))?;
        let tid = match self.field(tstate, o.tstate_native_thread_id) {
            Some(a) => host_tid(self.process.pid, self.mem.u64(a)? as u32),
            None => self.glibc_tid(pthread),
        };
        let mut frames = Vec::new();
        for (code, instr) in self.frame_pairs(tstate)? {
            frames.push(self.resolve(code, instr)?);
        }
        Ok(PyThread {
            tstate,
            pthread,
            tid,
            frames,
        })
    }

    /// The kernel tid of a `pthread_t` in glibc's `struct pthread`, if it names a task of the
    /// process.
    fn glibc_tid(&self, pthread: u64) -> Option<u32> {
        let tid = self.mem.u32(pthread.checked_add(GLIBC_PTHREAD_TID)?).ok()?;
        let tid = host_tid(self.process.pid, tid)?;
        let task = format!("/proc/{}/task/{tid}", self.process.pid);
        (tid != 0 && Path::new(&task).exists()).then_some(tid)
    }

    /// The (code object address, instruction field) pair of each frame of a thread, innermost
    /// first: exactly what the kernel side will record. Shim frames of the C stack (3.12+) and
    /// frames not started yet (3.11+) are left out, as CPython's tracebacks leave them out.
    pub fn frame_pairs(&self, tstate: u64) -> Result<Vec<(u64, u64)>> {
        let o = self.process.offsets;
        let mut frame = self.mem.u64(tstate + u64::from(o.tstate_frame))?;
        if let Some(cframe) = (o.cframe_current_frame != NONE).then_some(frame) {
            frame = if cframe == 0 {
                0
            } else {
                self.mem.u64(cframe + u64::from(o.cframe_current_frame))?
            };
        }
        let mut pairs = Vec::new();
        let mut seen: HashSet<u64> = HashSet::new();
        let mut steps = 0;
        // A chain that loops back ends where it repeats; a long one after MAX_FRAMES frames.
        while frame != 0 && pairs.len() < MAX_FRAMES && steps < 4 * MAX_FRAMES && seen.insert(frame)
        {
            steps += 1;
            let code = self.mem.u64(frame + u64::from(o.frame_code))? & !STACKREF_TAG_BITS;
            let instr = match o.instr_kind {
                INSTR_POINTER => self.mem.u64(frame + u64::from(o.frame_instr))?,
                _ => u64::from(self.mem.u32(frame + u64::from(o.frame_instr))?),
            };
            let owner = match self.field(frame, o.frame_owner) {
                Some(a) => Some(self.mem.u8(a)?),
                None => None,
            };
            let shim = owner.is_some_and(|owner| owner >= FRAME_OWNED_BY_CSTACK);
            if !shim && self.is_code(code)? && !self.incomplete(code, instr, owner)? {
                pairs.push((code, instr));
            }
            frame = self.mem.u64(frame + u64::from(o.frame_previous))?;
        }
        Ok(pairs)
    }

    fn is_code(&self, addr: u64) -> Result<bool> {
        if addr == 0 {
            return Ok(false);
        }
        match self.process.code_type {
            Some(t) => Ok(self
                .mem
                .u64(addr + u64::from(self.process.offsets.object_type))?
                == t),
            None => Ok(true),
        }
    }

    /// Whether a pair the kernel recorded is a frame CPython's tracebacks leave out (one that
    /// has not run its first instruction), or not a code object at all.
    pub fn incomplete_frame(&self, code: u64, instr: u64) -> bool {
        let instr = instr & !PY_LINE_TAG_MASK;
        if self.codes.contains_key(&code) {
            return false;
        }
        // Unreadable (the process is gone): kept, to be shown as an unnamed frame.
        match self.is_code(code) {
            Ok(false) => true,
            Ok(true) => self.incomplete(code, instr, None).unwrap_or(false),
            Err(_) => false,
        }
    }

    /// `_PyFrame_IsIncomplete`: a frame (not a generator's) whose instruction is before
    /// `_co_firsttraceable` has not run its first instruction yet.
    fn incomplete(&self, code: u64, instr: u64, owner: Option<u8>) -> Result<bool> {
        let o = &self.process.offsets;
        if o.instr_kind != INSTR_POINTER || owner == Some(FRAME_OWNED_BY_GENERATOR) {
            return Ok(false);
        }
        let start = code + u64::from(o.code_code_adaptive);
        let first = self.mem.u32(code + u64::from(o.code_firsttraceable))? as i32;
        Ok((instr as i64) < start as i64 + 2 * i64::from(first))
    }

    /// The function, file and line of a frame, from its code object's address and instruction
    /// field (as [`Resolver::frame_pairs`] gives them and the kernel side will record them).
    pub fn resolve(&mut self, code: u64, instr: u64) -> Result<PyFrame> {
        // A freed code object's address can hold another one later: while the process can be
        // read, a cached entry must still match the object's name and line table pointers.
        if let Some(cached) = self.codes.get(&code)
            && let Ok(identity) = self.identity(code)
            && identity != cached.identity
        {
            self.codes.remove(&code);
        }
        if !self.codes.contains_key(&code) {
            if !self.is_code(code)? {
                return Err(self.invalid("not a code object", code));
            }
            let info = self.read_code(code)?;
            self.codes.insert(code, info);
        }
        let info = &self.codes[&code];
        // The kernel tags the field with the first line of the code it ran: another line
        // means the code object was freed since and another took its address.
        let tag = instr & PY_LINE_TAG_MASK;
        if tag != 0 && tag != py_line_tag(info.firstlineno) {
            return Err(self.invalid("code object replaced since the call", code));
        }
        let instr = instr & !PY_LINE_TAG_MASK;
        let o = &self.process.offsets;
        let line = match o.instr_kind {
            INSTR_LASTI_BYTES => Some(lnotab_line(
                &info.table,
                info.firstlineno,
                instr as i32 as i64,
            )),
            INSTR_LASTI_UNITS => {
                linetable310_line(&info.table, info.firstlineno, 2 * i64::from(instr as i32))
            }
            _ => locations_line(
                &info.table,
                info.firstlineno,
                instr as i64 - info.code_start as i64,
            ),
        };
        Ok(PyFrame {
            function: info.function.clone(),
            file: info.file.clone(),
            line: line.and_then(|l| u32::try_from(l).ok()),
        })
    }

    /// Number of code objects cached.
    pub fn cached_codes(&self) -> usize {
        self.codes.len()
    }

    /// What tells two code objects at one address apart: their name, file and line table
    /// object pointers.
    fn identity(&self, code: u64) -> Result<[u64; 3]> {
        let o = &self.process.offsets;
        Ok([
            self.mem.u64(code + u64::from(o.code_name))?,
            self.mem.u64(code + u64::from(o.code_filename))?,
            self.mem.u64(code + u64::from(o.code_linetable))?,
        ])
    }

    fn read_code(&self, code: u64) -> Result<CodeInfo> {
        let identity = self.identity(code)?;
        let o = &self.process.offsets;
        let name_field = if o.code_qualname != NONE {
            o.code_qualname
        } else {
            o.code_name
        };
        let function = self.string(self.mem.u64(code + u64::from(name_field))?)?;
        let file = self.string(self.mem.u64(code + u64::from(o.code_filename))?)?;
        let firstlineno = self.mem.u32(code + u64::from(o.code_firstlineno))? as i32;
        let table = self.bytes_object(self.mem.u64(code + u64::from(o.code_linetable))?)?;
        let code_start = match o.code_code_adaptive {
            NONE => 0,
            off => code + u64::from(off),
        };
        Ok(CodeInfo {
            function,
            file,
            firstlineno,
            table,
            code_start,
            identity,
        })
    }

    /// A compact `str` object's text.
    fn string(&self, addr: u64) -> Result<String> {
        let o = &self.process.offsets;
        if addr == 0 {
            return Err(self.invalid("NULL string", addr));
        }
        let len = self.mem.u64(addr + u64::from(o.unicode_length))?;
        let state = self.mem.u32(addr + u64::from(o.unicode_state))?;
        let kind = u64::from((state >> 2) & 7);
        let compact = (state >> 5) & 1 == 1;
        let ascii = (state >> 6) & 1 == 1;
        // `len * kind` computed without wrapping: a huge length is refused, never shrunk.
        let size = len.saturating_mul(kind);
        if !compact || !matches!(kind, 1 | 2 | 4) || size > MAX_STRING_BYTES {
            return Err(self.invalid(
                format!("unsupported str (state {state:#x}, length {len})"),
                addr,
            ));
        }
        let data = addr
            + u64::from(if ascii {
                o.unicode_ascii_data
            } else {
                o.unicode_compact_data
            });
        let raw = self.mem.bytes(data, size)?;
        Ok(match kind {
            1 => raw.iter().map(|&b| char::from(b)).collect(),
            2 => raw
                .as_chunks::<2>()
                .0
                .iter()
                .map(|c| char::from_u32(u32::from(u16::from_le_bytes(*c))).unwrap_or('\u{fffd}'))
                .collect(),
            _ => raw
                .as_chunks::<4>()
                .0
                .iter()
                .map(|c| char::from_u32(u32::from_le_bytes(*c)).unwrap_or('\u{fffd}'))
                .collect(),
        })
    }

    /// A `bytes` object's contents.
    fn bytes_object(&self, addr: u64) -> Result<Vec<u8>> {
        let o = &self.process.offsets;
        if addr == 0 {
            return Err(self.invalid("NULL bytes object", addr));
        }
        let len = self.mem.u64(addr + u64::from(o.bytes_size))?;
        if len > MAX_TABLE_BYTES {
            return Err(self.invalid(format!("bytes object of {len} bytes"), addr));
        }
        self.mem.bytes(addr + u64::from(o.bytes_data), len)
    }
}

/// Every Python thread of process `pid` and its frames, innermost first.
pub fn threads(pid: u32) -> Result<Vec<PyThread>> {
    Resolver::new(pid)?.threads()
}

/// The frame of a (code object address, instruction field) pair recorded in process `pid`.
/// Detects the interpreter on each call: keep a [`Resolver`] to resolve many.
pub fn resolve(pid: u32, code: u64, instr: u64) -> Result<PyFrame> {
    Resolver::new(pid)?.resolve(code, instr)
}

/// The kernel's id (memprof's, and the kernel program's) of the thread that process `pid`
/// numbers `tid` in its own pid namespace: `tid` itself when the process shares memprof's pid
/// namespace; inside a container's, the task of the process whose `NSpid` ends with `tid`.
/// `None` when no task of it has that id.
pub(super) fn host_tid(pid: u32, tid: u32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let ns = |p: String| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let theirs = ns(format!("/proc/{pid}/ns/pid"));
    if theirs.is_none() || theirs == ns("/proc/self/ns/pid".into()) {
        return Some(tid);
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.take(MAX_THREADS).flatten().find_map(|task| {
        let status = std::fs::read_to_string(task.path().join("status")).ok()?;
        ns_tid(&status, tid)
    })
}

/// The first id (the kernel's) of the `NSpid` line of a task's `status` text when its last one
/// (the task's own namespace's) is `tid`.
fn ns_tid(status: &str, tid: u32) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    let ids: Vec<u32> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    (ids.last() == Some(&tid)).then(|| ids.first().copied())?
}

#[cfg(test)]
mod ns_tests {
    use super::*;

    #[test]
    fn ns_tids() {
        let status = "Name:\tpython3.14\nTgid:\t30779\nNSpid:\t30781\t3\nNSpgid:\t1\n";
        assert_eq!(ns_tid(status, 3), Some(30781));
        assert_eq!(ns_tid(status, 1), None);
        assert_eq!(ns_tid("NSpid:\t42\n", 42), Some(42));
        assert_eq!(ns_tid("Name:\tx\n", 42), None);
        // A process of memprof's own namespace: ids as they are.
        assert_eq!(host_tid(std::process::id(), 12345), Some(12345));
    }
}
