//! CPython frames of a running process, read from outside it: detection of the interpreter and
//! its version, the per-version layouts (struct offsets) of the runtime, thread states, frames
//! and code objects, the walk from `_PyRuntime` to each thread's frame chain, and the decoding of
//! code objects and line tables.
//!
//! This is the agent side of "Python frames on native allocations" (issue 6). The kernel side
//! will record, per Python frame, the code object's address and the frame's instruction field
//! (see [`PyOffsets`] for the offsets it needs and `docs/design/python-frames.md` for the
//! design); [`Resolver::resolve`] turns such a pair into a function, file and line.
//!
//! - [`layout`]: versions and the struct offsets of each ([`PyOffsets`], `_Py_DebugOffsets`).
//! - [`detect`]: finding the interpreter in a process.
//! - [`mem`]: reading the process's memory.
//! - [`resolve`]: thread states, frame chains, code objects.
//! - [`lines`]: line tables of each version.
//! - [`kernel`]: what the kernel program needs to walk frames itself.
//!
//! Supported: CPython 3.8 and later on x86_64 Linux, default (GIL) builds. Offsets are per
//! CPython minor version (they are struct layouts, stable within a minor release): tables for
//! 3.8 to 3.12; from 3.13 on, the interpreter's own `_Py_DebugOffsets` at the start of
//! `_PyRuntime`, read with the field order of its version's layout of that struct (3.13, 3.14,
//! 3.15 known; a newer version is read with the newest and checked). An interpreter memprof
//! cannot read (free-threaded, older than 3.8, offsets that do not check out) is reported, with
//! the reason, as a [`PythonStatus`].
//! Addresses are never hard-coded: `_PyRuntime` and `PyCode_Type` come from the ELF symbols of
//! the object that defines them, relocated by that object's load bias in the process.

mod detect;
mod kernel;
mod layout;
mod lines;
mod mem;
mod resolve;
#[cfg(test)]
mod tests;

use std::io;

pub use self::{
    detect::{PyProcess, detect},
    kernel::{PyKernelConfig, gil_tstate, tss_tstate},
    layout::{
        DEBUG_LAYOUTS, DEBUG_OFFSETS_SIZE, DebugOffsets, DebugOffsetsError, PyOffsets, PyVersion,
    },
    lines::{linetable310_line, lnotab_line, locations_line},
    mem::Mem,
    resolve::{Resolver, resolve, threads},
};

/// Sentinel of [`PyOffsets`] for a field the version does not have.
pub const NONE: u32 = u32::MAX;

/// Frame chain model, [`PyOffsets::frame_model`]: `PyFrameObject`s linked by `f_back`, the
/// thread state pointing at the innermost (3.8 to 3.10).
pub const FRAME_MODEL_FRAME_OBJECT: u32 = 1;
/// Frame chain model, [`PyOffsets::frame_model`]: `_PyInterpreterFrame`s linked by `previous`
/// (3.11 and later).
pub const FRAME_MODEL_INTERPRETER_FRAME: u32 = 2;

/// What a frame's instruction field holds, [`PyOffsets::instr_kind`]: `int f_lasti`, the byte
/// offset of the last instruction in `co_code` (3.8, 3.9).
pub const INSTR_LASTI_BYTES: u32 = 1;
/// `int f_lasti`, the index of the last instruction in 2-byte code units (3.10).
pub const INSTR_LASTI_UNITS: u32 = 2;
/// A pointer into the code object's inline `co_code_adaptive`: `prev_instr` (3.11, 3.12, the
/// instruction being executed) or `instr_ptr` (3.13, the same during a call).
pub const INSTR_POINTER: u32 = 3;

/// `_PyInterpreterFrame.owner` of the shim frame each call of the eval loop pushes (3.12 and
/// later: `FRAME_OWNED_BY_CSTACK` in 3.12 and 3.13, `FRAME_OWNED_BY_INTERPRETER` from 3.14,
/// both 3): no Python code, skipped. Owners from 3 up are never Python frames
/// (`_PyFrame_IsIncomplete`).
pub const FRAME_OWNED_BY_CSTACK: u8 = 3;

/// Low bits of `_PyInterpreterFrame.f_executable` that tag the reference (3.14+, a
/// `_PyStackRef`), cleared to get the code object's address: the kernel's constant.
pub const STACKREF_TAG_BITS: u64 = memprof_common::PY_STACKREF_TAG_BITS;
/// `owner` of a generator's or coroutine's frame, which is never "incomplete".
pub const FRAME_OWNED_BY_GENERATOR: u8 = 1;

/// glibc x86_64 (2.36, measured here): `offsetof(struct pthread, specific_1stblock)`.
/// `pthread_getspecific(key)` for `key < 32` reads `pthread_self() + this + 16 * key + 8`
/// (`struct pthread_key_data { uintptr_t seq; void *data; }`). `pthread_self()` is the thread
/// pointer, the `fs` base, so BPF can read a thread's Python thread state through
/// `_PyRuntime`'s `autoTSSkey` with this; see [`PyOffsets::runtime_tss_key`].
pub const GLIBC_PTHREAD_SPECIFIC_1STBLOCK: u64 = 0x310;
/// glibc x86_64 (2.36, measured here): `offsetof(struct pthread, tid)`, used to name the
/// threads of 3.8 to 3.10, whose thread states keep only the `pthread_t`.
pub const GLIBC_PTHREAD_TID: u64 = 0x2d0;

/// Upper bounds of a walk: a corrupted or changing chain must end.
const MAX_THREADS: usize = 4096;
const MAX_FRAMES: usize = 1024;
const MAX_INTERPRETERS: usize = 64;
const MAX_STRING_BYTES: u64 = 16 * 1024;
const MAX_TABLE_BYTES: u64 = 4 * 1024 * 1024;

/// Errors of detection and of reading the target.
#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error("process {pid} does not run CPython: no mapped object defines _PyRuntime")]
    NotPython { pid: u32 },
    #[error("CPython {version} in process {pid} cannot be read: {reason}")]
    Unsupported {
        pid: u32,
        version: PyVersion,
        reason: String,
    },
    #[error(
        "cannot tell the CPython version of {path}: no Py_Version symbol and no version in its name"
    )]
    UnknownVersion { path: String },
    #[error("failed to read {what} of process {pid}: {source}")]
    Io {
        pid: u32,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to parse {path}: {reason}")]
    Elf { path: String, reason: String },
    #[error("process {pid}: {what} at {addr:#x}")]
    Invalid { pid: u32, what: String, addr: u64 },
}

type Result<T, E = PythonError> = std::result::Result<T, E>;

/// Whether memprof reads a process's Python frames, and if not why: the report's `python`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PythonStatus {
    /// `3.14.8`; null when it could not be told.
    pub version: Option<String>,
    /// `ok` (Python frames are read), `unsupported` (a version or build memprof cannot read)
    /// or `unreadable` (the interpreter's files or memory could not be read or made no sense).
    pub status: &'static str,
    /// Why not `ok`; for `ok`, where the layout came from.
    pub reason: String,
}

impl PythonStatus {
    /// The status of a process memprof reads, from `process`'s detection.
    pub fn ok(process: &PyProcess) -> Self {
        Self {
            version: Some(process.version.to_string()),
            status: "ok",
            reason: if process.from_debug_offsets {
                "layout from the interpreter's _Py_DebugOffsets".into()
            } else {
                "layout from memprof's table of the version".into()
            },
        }
    }

    /// The status of a failed detection, `None` when the process does not run CPython.
    pub fn of_error(err: &PythonError) -> Option<Self> {
        let (version, status, reason) = match err {
            PythonError::NotPython { .. } => return None,
            PythonError::Unsupported {
                version, reason, ..
            } => (Some(version.to_string()), "unsupported", reason.clone()),
            PythonError::UnknownVersion { .. } => (None, "unsupported", err.to_string()),
            PythonError::Io { .. } | PythonError::Elf { .. } | PythonError::Invalid { .. } => {
                (None, "unreadable", err.to_string())
            }
        };
        Some(Self {
            version,
            status,
            reason,
        })
    }

    pub fn is_ok(&self) -> bool {
        self.status == "ok"
    }
}

/// One Python frame, as a traceback shows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PyFrame {
    /// The qualified name (`Class.method`) where the version keeps it (3.11+), else the name.
    pub function: String,
    pub file: String,
    /// `None` where the line table has no line for the instruction.
    pub line: Option<u32>,
}

/// A Python thread and its frames, innermost first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyThread {
    /// Address of the `PyThreadState`.
    pub tstate: u64,
    /// `PyThreadState.thread_id`: the `pthread_t` (the thread's `fs` base).
    pub pthread: u64,
    /// The kernel thread id: `native_thread_id` (3.11+), or read from glibc's `struct pthread`
    /// (3.8 to 3.10) and checked against `/proc/PID/task`.
    pub tid: Option<u32>,
    pub frames: Vec<PyFrame>,
}
