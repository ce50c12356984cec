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
//! Supported: CPython 3.8 to 3.13 on x86_64 Linux, default (GIL) builds. Offsets are per CPython
//! minor version (they are struct layouts, stable within a minor release); 3.13 publishes its
//! own in `_Py_DebugOffsets` at the start of `_PyRuntime`, which is read when present.
//! Addresses are never hard-coded: `_PyRuntime` and `PyCode_Type` come from the ELF symbols of
//! the object that defines them, relocated by that object's load bias in the process.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

use crate::sys::maps::AddressSpace;

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

/// `_PyInterpreterFrame.owner` of a shim frame that belongs to the C stack (3.12 and later):
/// no Python code, skipped.
pub const FRAME_OWNED_BY_CSTACK: u8 = 3;
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
const MAX_STRING_BYTES: u64 = 64 * 1024;
const MAX_TABLE_BYTES: u64 = 4 * 1024 * 1024;

/// Errors of detection and of reading the target.
#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error("process {pid} does not run CPython: no mapped object defines _PyRuntime")]
    NotPython { pid: u32 },
    #[error("CPython {version} in process {pid} is not supported (3.8 to 3.13 are)")]
    Unsupported { pid: u32, version: PyVersion },
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

/// A CPython version, `3.11.7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PyVersion {
    pub major: u8,
    pub minor: u8,
    pub micro: u8,
}

impl PyVersion {
    /// From `PY_VERSION_HEX` (`Py_Version`, `_Py_DebugOffsets.version`): 0x030b07f0 is 3.11.7.
    pub fn from_hex(hex: u64) -> Self {
        Self {
            major: (hex >> 24) as u8,
            minor: (hex >> 16) as u8,
            micro: (hex >> 8) as u8,
        }
    }

    /// The version in a file name: `libpython3.11.so.1.0`, `python3.10`, `libpython3.8d.so`.
    /// The micro version is unknown (0).
    pub fn from_file_name(name: &str) -> Option<Self> {
        let at = name.find("python")? + "python".len();
        let rest = &name[at..];
        let (major, rest) = rest.split_once('.')?;
        let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
        Some(Self {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
            micro: 0,
        })
    }
}

impl std::fmt::Display for PyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// Everything a walker (this module, or a BPF program later) needs to go from `_PyRuntime` to
/// the frames of a thread and to decode them: byte offsets of fields, [`NONE`] for a field the
/// version lacks.
///
/// Shaped for the kernel side: `#[repr(C)]`, `u32` fields only, no padding, no pointers, so it
/// can move to memprof-common as is and be written into a BPF array map per traced process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyOffsets {
    /// `PY_VERSION_HEX` with the micro version zeroed (`0x030b0000`): the layout's version.
    pub version_hex: u32,
    /// [`FRAME_MODEL_FRAME_OBJECT`] or [`FRAME_MODEL_INTERPRETER_FRAME`].
    pub frame_model: u32,
    /// [`INSTR_LASTI_BYTES`], [`INSTR_LASTI_UNITS`] or [`INSTR_POINTER`].
    pub instr_kind: u32,

    /// `_PyRuntime.interpreters.head`: the newest interpreter (the main one without
    /// subinterpreters).
    pub runtime_interpreters_head: u32,
    /// `_PyRuntime.gilstate.tstate_current` (3.8 to 3.11): the thread state holding the GIL,
    /// 0 while no thread holds it. [`NONE`] from 3.12, where it became the thread-local
    /// `_Py_tss_tstate`.
    pub runtime_tstate_current: u32,
    /// `_PyRuntime.gilstate.autoTSSkey` (3.8 to 3.11) or `_PyRuntime.autoTSSkey` (3.12+): a
    /// `Py_tss_t { int _is_initialized; pthread_key_t _key; }` whose pthread key maps every
    /// thread that runs Python to its thread state, held or not the GIL.
    pub runtime_tss_key: u32,

    /// `PyInterpreterState.next`.
    pub interp_next: u32,
    /// `PyInterpreterState.tstate_head` (3.8 to 3.11) or `.threads.head` (3.12+).
    pub interp_threads_head: u32,

    /// `PyThreadState.next`.
    pub tstate_next: u32,
    /// `PyThreadState.frame` (3.8 to 3.10), `.cframe` (3.11, 3.12) or `.current_frame` (3.13).
    pub tstate_frame: u32,
    /// `_PyCFrame.current_frame` when `tstate_frame` points at a `_PyCFrame` (3.11, 3.12), else
    /// [`NONE`].
    pub cframe_current_frame: u32,
    /// `PyThreadState.thread_id`: the `pthread_t`, which is the thread's `fs` base on x86_64.
    pub tstate_thread_id: u32,
    /// `PyThreadState.native_thread_id` (3.11+): the kernel thread id.
    pub tstate_native_thread_id: u32,

    /// `f_back` or `previous`.
    pub frame_previous: u32,
    /// `f_code`, or `f_executable` (3.13).
    pub frame_code: u32,
    /// `f_lasti`, `prev_instr` or `instr_ptr`; see `instr_kind`.
    pub frame_instr: u32,
    /// `_PyInterpreterFrame.owner` (a byte), [`NONE`] before 3.11.
    pub frame_owner: u32,

    /// `PyObject.ob_type`.
    pub object_type: u32,
    /// `co_name`.
    pub code_name: u32,
    /// `co_filename`.
    pub code_filename: u32,
    /// `co_qualname` (3.11+).
    pub code_qualname: u32,
    /// `co_firstlineno` (an int).
    pub code_firstlineno: u32,
    /// `co_lnotab` (3.8, 3.9), `co_linetable` (3.10: line table; 3.11+: location table).
    pub code_linetable: u32,
    /// `co_code_adaptive` (3.11+): the bytecode, inline in the code object.
    pub code_code_adaptive: u32,
    /// `_co_firsttraceable` (3.11+, an int): frames before it are incomplete.
    pub code_firsttraceable: u32,

    /// `PyASCIIObject.state` (the kind, compact and ascii bits).
    pub unicode_state: u32,
    /// `sizeof(PyASCIIObject)`: the data of a compact ASCII string.
    pub unicode_ascii_data: u32,
    /// `sizeof(PyCompactUnicodeObject)`: the data of another compact string.
    pub unicode_compact_data: u32,
    /// `PyVarObject.ob_size` of a bytes object.
    pub bytes_size: u32,
    /// `PyBytesObject.ob_sval`.
    pub bytes_data: u32,
}

impl PyOffsets {
    /// The layout of CPython `major.minor`, measured with gdb on the debug information of
    /// CPython 3.8.18, 3.9.18, 3.10.13, 3.11.7 (and Debian's 3.11.2), 3.12.1 and 3.13.0 on
    /// x86_64; they match py-spy's bindings and the OpenTelemetry profiler's tables.
    pub fn for_version(major: u8, minor: u8) -> Option<Self> {
        // Fields shared by all supported versions.
        let base = Self {
            version_hex: (u32::from(major) << 24) | (u32::from(minor) << 16),
            frame_model: FRAME_MODEL_FRAME_OBJECT,
            instr_kind: INSTR_LASTI_BYTES,
            runtime_interpreters_head: 32,
            runtime_tstate_current: NONE,
            runtime_tss_key: NONE,
            interp_next: 0,
            interp_threads_head: 8,
            tstate_next: 8,
            tstate_frame: 24,
            cframe_current_frame: NONE,
            tstate_thread_id: 176,
            tstate_native_thread_id: NONE,
            frame_previous: 24,
            frame_code: 32,
            frame_instr: 104,
            frame_owner: NONE,
            object_type: 8,
            code_name: 112,
            code_filename: 104,
            code_qualname: NONE,
            code_firstlineno: 40,
            code_linetable: 120,
            code_code_adaptive: NONE,
            code_firsttraceable: NONE,
            unicode_state: 32,
            unicode_ascii_data: 48,
            unicode_compact_data: 72,
            bytes_size: 16,
            bytes_data: 32,
        };
        let offsets = match (major, minor) {
            (3, 8) => Self {
                runtime_tstate_current: 1368,
                runtime_tss_key: 1392,
                ..base
            },
            (3, 9) => Self {
                runtime_tstate_current: 568,
                runtime_tss_key: 584,
                ..base
            },
            (3, 10) => Self {
                instr_kind: INSTR_LASTI_UNITS,
                runtime_tstate_current: 568,
                runtime_tss_key: 584,
                frame_instr: 96,
                ..base
            },
            (3, 11) => Self {
                frame_model: FRAME_MODEL_INTERPRETER_FRAME,
                instr_kind: INSTR_POINTER,
                runtime_interpreters_head: 40,
                runtime_tstate_current: 576,
                runtime_tss_key: 592,
                interp_threads_head: 16,
                tstate_frame: 56,
                cframe_current_frame: 8,
                tstate_thread_id: 152,
                tstate_native_thread_id: 160,
                frame_previous: 48,
                frame_code: 32,
                frame_instr: 56,
                frame_owner: 69,
                code_name: 120,
                code_filename: 112,
                code_qualname: 128,
                code_firstlineno: 72,
                code_linetable: 136,
                code_code_adaptive: 184,
                code_firsttraceable: 168,
                ..base
            },
            (3, 12) => Self {
                frame_model: FRAME_MODEL_INTERPRETER_FRAME,
                instr_kind: INSTR_POINTER,
                runtime_interpreters_head: 40,
                runtime_tss_key: 1544,
                interp_threads_head: 72,
                tstate_frame: 56,
                cframe_current_frame: 0,
                tstate_thread_id: 136,
                tstate_native_thread_id: 144,
                frame_previous: 8,
                frame_code: 0,
                frame_instr: 56,
                frame_owner: 70,
                code_name: 120,
                code_filename: 112,
                code_qualname: 128,
                code_firstlineno: 68,
                code_linetable: 136,
                code_code_adaptive: 192,
                code_firsttraceable: 176,
                unicode_ascii_data: 40,
                unicode_compact_data: 56,
                ..base
            },
            (3, 13) => Self {
                frame_model: FRAME_MODEL_INTERPRETER_FRAME,
                instr_kind: INSTR_POINTER,
                runtime_interpreters_head: 632,
                runtime_tss_key: 2160,
                interp_next: 7264,
                interp_threads_head: 7344,
                tstate_frame: 72,
                tstate_thread_id: 152,
                tstate_native_thread_id: 160,
                frame_previous: 8,
                frame_code: 0,
                frame_instr: 56,
                frame_owner: 70,
                code_name: 120,
                code_filename: 112,
                code_qualname: 128,
                code_firstlineno: 68,
                code_linetable: 136,
                code_code_adaptive: 200,
                code_firsttraceable: 184,
                unicode_ascii_data: 40,
                unicode_compact_data: 56,
                ..base
            },
            _ => return None,
        };
        Some(offsets)
    }

    /// Overrides the fields `_Py_DebugOffsets` publishes (3.13's layout of it); the others
    /// (`_co_firsttraceable`, `autoTSSkey`, the compact string size) stay as in the table.
    fn with_debug_offsets(self, d: &DebugOffsets) -> Self {
        let o = |v: u64| u32::try_from(v).unwrap_or(NONE);
        Self {
            runtime_interpreters_head: o(d.runtime_interpreters_head),
            interp_next: o(d.interp_next),
            interp_threads_head: o(d.interp_threads_head),
            tstate_next: o(d.tstate_next),
            tstate_frame: o(d.tstate_current_frame),
            cframe_current_frame: NONE,
            tstate_thread_id: o(d.tstate_thread_id),
            tstate_native_thread_id: o(d.tstate_native_thread_id),
            frame_previous: o(d.frame_previous),
            frame_code: o(d.frame_executable),
            frame_instr: o(d.frame_instr_ptr),
            frame_owner: o(d.frame_owner),
            object_type: o(d.object_type),
            code_name: o(d.code_name),
            code_filename: o(d.code_filename),
            code_qualname: o(d.code_qualname),
            code_firstlineno: o(d.code_firstlineno),
            code_linetable: o(d.code_linetable),
            code_code_adaptive: o(d.code_code_adaptive),
            unicode_state: o(d.unicode_state),
            unicode_ascii_data: o(d.unicode_ascii_size),
            bytes_size: o(d.bytes_size),
            bytes_data: o(d.bytes_data),
            ..self
        }
    }
}

/// The fields of CPython 3.13's `_Py_DebugOffsets` (Include/internal/pycore_runtime.h) this
/// module uses. It starts `_PyRuntime`: `char cookie[8] = "xdebugpy"; uint64_t version;
/// uint64_t free_threaded;` then groups of `uint64_t` offsets, each group starting with the
/// struct's size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugOffsets {
    pub version: u64,
    pub free_threaded: u64,
    pub runtime_interpreters_head: u64,
    pub interp_next: u64,
    pub interp_threads_head: u64,
    pub tstate_next: u64,
    pub tstate_current_frame: u64,
    pub tstate_thread_id: u64,
    pub tstate_native_thread_id: u64,
    pub frame_previous: u64,
    pub frame_executable: u64,
    pub frame_instr_ptr: u64,
    pub frame_owner: u64,
    pub code_filename: u64,
    pub code_name: u64,
    pub code_qualname: u64,
    pub code_linetable: u64,
    pub code_firstlineno: u64,
    pub code_code_adaptive: u64,
    pub object_type: u64,
    pub bytes_size: u64,
    pub bytes_data: u64,
    pub unicode_state: u64,
    pub unicode_ascii_size: u64,
}

/// Bytes of 3.13's `_Py_DebugOffsets`.
pub const DEBUG_OFFSETS_SIZE: usize = 584;
const DEBUG_COOKIE: &[u8; 8] = b"xdebugpy";

impl DebugOffsets {
    /// Parses the start of `_PyRuntime`; `None` without the `xdebugpy` cookie (before 3.13) or
    /// for a version whose layout of the struct is not 3.13's (3.14 added fields in the middle).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < DEBUG_OFFSETS_SIZE || &bytes[..8] != DEBUG_COOKIE {
            return None;
        }
        let at = |off: usize| u64::from_le_bytes(bytes[off..off + 8].try_into().expect("8 bytes"));
        let version = at(8);
        if (version >> 16) != 0x030d {
            return None;
        }
        Some(Self {
            version,
            free_threaded: at(16),
            runtime_interpreters_head: at(40),
            interp_next: at(64),
            interp_threads_head: at(72),
            tstate_next: at(168),
            tstate_current_frame: at(184),
            tstate_thread_id: at(192),
            tstate_native_thread_id: at(200),
            frame_previous: at(232),
            frame_executable: at(240),
            frame_instr_ptr: at(248),
            frame_owner: at(264),
            code_filename: at(280),
            code_name: at(288),
            code_qualname: at(296),
            code_linetable: at(304),
            code_firstlineno: at(312),
            code_code_adaptive: at(344),
            object_type: at(360),
            bytes_size: at(520),
            bytes_data: at(528),
            unicode_state: at(544),
            unicode_ascii_size: at(560),
        })
    }
}

/// A CPython interpreter found in a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyProcess {
    pub pid: u32,
    pub version: PyVersion,
    /// The object defining `_PyRuntime`, as `/proc/PID/maps` names it (inside the process's
    /// mount namespace): the executable or `libpython3.X.so`.
    pub object: String,
    /// Load bias of that object: runtime address = symbol value + bias.
    pub bias: u64,
    /// Runtime address of `_PyRuntime`.
    pub runtime: u64,
    /// Runtime address of `PyCode_Type`, to check that an address holds a code object.
    pub code_type: Option<u64>,
    /// Whether `offsets` came from the process's `_Py_DebugOffsets` (3.13+).
    pub from_debug_offsets: bool,
    pub offsets: PyOffsets,
}

/// Symbols of the object defining `_PyRuntime`, as link-time values.
struct RuntimeSymbols {
    runtime: u64,
    code_type: Option<u64>,
    py_version: Option<u64>,
}

/// Finds CPython in process `pid`: the mapped object (the executable or a `libpython`) that
/// defines `_PyRuntime`, its load bias, and the version and layout.
pub fn detect(pid: u32) -> Result<PyProcess> {
    let space = AddressSpace::read(pid).map_err(|source| PythonError::Io {
        pid,
        what: format!("/proc/{pid}/maps"),
        source,
    })?;
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let mut seen: Vec<&str> = Vec::new();
    // libpython before the executable: an executable linked against it does not define
    // _PyRuntime, and one that embeds the interpreter (`python3.11` on Debian, uwsgi built
    // statically) is found next.
    let mut candidates: Vec<&str> = Vec::new();
    for m in space.mappings() {
        if seen.contains(&m.path.as_str()) {
            continue;
        }
        seen.push(&m.path);
        let base = file_name(&m.path);
        if base.starts_with("libpython") {
            candidates.insert(0, &m.path);
        } else if base.contains("python") || exe.as_deref() == Some(m.path.as_str()) {
            candidates.push(&m.path);
        }
    }
    for path in candidates {
        let host = host_path(pid, path);
        let Ok(data) = fs::read(&host) else { continue };
        let file = object::File::parse(&*data).map_err(|e| PythonError::Elf {
            path: host.display().to_string(),
            reason: e.to_string(),
        })?;
        let Some(symbols) = runtime_symbols(&file) else {
            continue;
        };
        let bias = load_bias(&file, &space, path).ok_or_else(|| PythonError::Elf {
            path: host.display().to_string(),
            reason: "no mapping of a loadable segment".into(),
        })?;
        return finish_detect(pid, path, bias, &symbols);
    }
    Err(PythonError::NotPython { pid })
}

fn finish_detect(pid: u32, path: &str, bias: u64, symbols: &RuntimeSymbols) -> Result<PyProcess> {
    let mem = Mem::new(pid);
    let runtime = symbols.runtime.wrapping_add(bias);
    let mut head = [0u8; DEBUG_OFFSETS_SIZE];
    let debug = mem
        .read(runtime, &mut head)
        .ok()
        .and_then(|()| DebugOffsets::parse(&head));
    let version = if let Some(d) = &debug {
        PyVersion::from_hex(d.version)
    } else if let Some(sym) = symbols.py_version {
        PyVersion::from_hex(u64::from(mem.u32(sym.wrapping_add(bias))?))
    } else {
        PyVersion::from_file_name(file_name(path)).ok_or_else(|| PythonError::UnknownVersion {
            path: path.to_string(),
        })?
    };
    let unsupported = PythonError::Unsupported { pid, version };
    if version.major != 3 || debug.is_some_and(|d| d.free_threaded != 0) {
        return Err(unsupported);
    }
    let table = PyOffsets::for_version(version.major, version.minor).ok_or(unsupported)?;
    let offsets = match &debug {
        Some(d) => table.with_debug_offsets(d),
        None => table,
    };
    Ok(PyProcess {
        pid,
        version,
        object: path.to_string(),
        bias,
        runtime,
        code_type: symbols.code_type.map(|a| a.wrapping_add(bias)),
        from_debug_offsets: debug.is_some(),
        offsets,
    })
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The file behind a path of the process's mount namespace.
fn host_path(pid: u32, path: &str) -> PathBuf {
    Path::new(&format!("/proc/{pid}/root")).join(path.trim_start_matches('/'))
}

fn runtime_symbols(file: &object::File<'_>) -> Option<RuntimeSymbols> {
    let mut found = RuntimeSymbols {
        runtime: 0,
        code_type: None,
        py_version: None,
    };
    // The symbol table when present (unstripped), else the dynamic one: CPython exports these.
    for sym in file.symbols().chain(file.dynamic_symbols()) {
        if sym.is_undefined() {
            continue;
        }
        match sym.name() {
            Ok("_PyRuntime") if found.runtime == 0 => found.runtime = sym.address(),
            Ok("PyCode_Type") if found.code_type.is_none() => found.code_type = Some(sym.address()),
            Ok("Py_Version") if found.py_version.is_none() => {
                found.py_version = Some(sym.address())
            }
            _ => {}
        }
    }
    (found.runtime != 0).then_some(found)
}

/// Load bias of the object at `path` in the process: the start of one of its mappings minus the
/// link-time address of the file offset mapped there.
fn load_bias(file: &object::File<'_>, space: &AddressSpace, path: &str) -> Option<u64> {
    space
        .mappings()
        .iter()
        .filter(|m| m.path == path)
        .find_map(|m| {
            file.segments().find_map(|seg| {
                let (offset, size) = seg.file_range();
                (size > 0 && offset <= m.offset && m.offset < offset + size).then(|| {
                    let vaddr = seg.address() + (m.offset - offset);
                    m.start.wrapping_sub(vaddr)
                })
            })
        })
}

/// Reads another process's memory: `process_vm_readv`, or `/proc/PID/mem` where that is
/// refused.
pub struct Mem {
    pid: u32,
}

impl Mem {
    pub fn new(pid: u32) -> Self {
        Self { pid }
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` describes `buf`, which is writable for its length; the remote iovec
        // is only read by the kernel, in the other process.
        let n =
            unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n == buf.len() as isize {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        let result = match err.raw_os_error() {
            Some(libc::EPERM | libc::ENOSYS) => fs::File::open(format!("/proc/{}/mem", self.pid))
                .and_then(|f| f.read_exact_at(buf, addr)),
            _ if n >= 0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read")),
            _ => Err(err),
        };
        result.map_err(|source| PythonError::Io {
            pid: self.pid,
            what: format!("{} bytes at {addr:#x}", buf.len()),
            source,
        })
    }

    pub fn u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn u32(&self, addr: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn u8(&self, addr: u64) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read(addr, &mut b)?;
        Ok(b[0])
    }

    pub fn bytes(&self, addr: u64, len: u64) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len as usize];
        self.read(addr, &mut v)?;
        Ok(v)
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
    mem: Mem,
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
        let o = &self.process.offsets;
        let mut states = Vec::new();
        let mut interp = self
            .mem
            .u64(self.process.runtime + u64::from(o.runtime_interpreters_head))?;
        for _ in 0..MAX_INTERPRETERS {
            if interp == 0 {
                break;
            }
            let mut tstate = self.mem.u64(interp + u64::from(o.interp_threads_head))?;
            while tstate != 0 && states.len() < MAX_THREADS {
                states.push(tstate);
                tstate = self.mem.u64(tstate + u64::from(o.tstate_next))?;
            }
            interp = self.mem.u64(interp + u64::from(o.interp_next))?;
        }
        Ok(states)
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
            Some(a) => Some(self.mem.u64(a)? as u32),
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
        while frame != 0 && pairs.len() < MAX_FRAMES {
            let code = self.mem.u64(frame + u64::from(o.frame_code))?;
            let instr = match o.instr_kind {
                INSTR_POINTER => self.mem.u64(frame + u64::from(o.frame_instr))?,
                _ => u64::from(self.mem.u32(frame + u64::from(o.frame_instr))?),
            };
            let owner = match self.field(frame, o.frame_owner) {
                Some(a) => Some(self.mem.u8(a)?),
                None => None,
            };
            let shim = owner == Some(FRAME_OWNED_BY_CSTACK);
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
        let len = self.mem.u64(addr + 16)?;
        let state = self.mem.u32(addr + u64::from(o.unicode_state))?;
        let kind = u64::from((state >> 2) & 7);
        let compact = (state >> 5) & 1 == 1;
        let ascii = (state >> 6) & 1 == 1;
        if !compact || !matches!(kind, 1 | 2 | 4) || len * kind > MAX_STRING_BYTES {
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
        let raw = self.mem.bytes(data, len * kind)?;
        Ok(match kind {
            1 => raw.iter().map(|&b| char::from(b)).collect(),
            2 => raw
                .chunks_exact(2)
                .map(|c| {
                    char::from_u32(u32::from(u16::from_le_bytes([c[0], c[1]])))
                        .unwrap_or('\u{fffd}')
                })
                .collect(),
            _ => raw
                .chunks_exact(4)
                .map(|c| {
                    char::from_u32(u32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .unwrap_or('\u{fffd}')
                })
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

/// The line of byte offset `lasti` in a 3.8/3.9 `co_lnotab`: (bytecode delta, signed line
/// delta) byte pairs from `firstlineno` (`PyCode_Addr2Line`).
pub fn lnotab_line(lnotab: &[u8], firstlineno: i32, lasti: i64) -> i32 {
    let mut line = firstlineno;
    let mut addr = 0i64;
    for pair in lnotab.chunks_exact(2) {
        addr += i64::from(pair[0]);
        if addr > lasti {
            break;
        }
        line += i32::from(pair[1] as i8);
    }
    line
}

/// The line of byte offset `offset` in a 3.10 `co_linetable`: (unsigned bytecode delta, signed
/// line delta) byte pairs, a line delta of -128 meaning "no line" (Objects/lnotab_notes.txt).
pub fn linetable310_line(table: &[u8], firstlineno: i32, offset: i64) -> Option<i32> {
    let mut line = firstlineno;
    let mut start = 0i64;
    for pair in table.chunks_exact(2) {
        let end = start + i64::from(pair[0]);
        let delta = pair[1] as i8;
        if delta != -128 {
            line += i32::from(delta);
        }
        if start <= offset && offset < end {
            return (delta != -128).then_some(line);
        }
        start = end;
    }
    None
}

/// The line of byte offset `offset` in a 3.11+ location table (Objects/locations.md): entries
/// of a header byte `1CCCCLLL` (code, length - 1 in code units) and code-dependent varints.
pub fn locations_line(table: &[u8], firstlineno: i32, offset: i64) -> Option<i32> {
    let mut line = firstlineno;
    let mut start = 0i64;
    let mut i = 0usize;
    while i < table.len() {
        let head = table[i];
        i += 1;
        if head & 0x80 == 0 {
            return None;
        }
        let code = (head >> 3) & 15;
        let end = start + 2 * (i64::from(head & 7) + 1);
        let mut line_of_entry = Some(());
        match code {
            15 => line_of_entry = None,
            14 => {
                line += svarint(table, &mut i)?;
                varint(table, &mut i)?;
                varint(table, &mut i)?;
                varint(table, &mut i)?;
            }
            13 => line += svarint(table, &mut i)?,
            10..=12 => {
                line += i32::from(code) - 10;
                i += 2;
            }
            _ => i += 1,
        }
        if start <= offset && offset < end {
            return line_of_entry.map(|()| line);
        }
        start = end;
    }
    None
}

fn varint(table: &[u8], i: &mut usize) -> Option<u32> {
    let mut b = *table.get(*i)?;
    *i += 1;
    let mut value = u32::from(b & 63);
    let mut shift = 6;
    while b & 64 != 0 {
        b = *table.get(*i)?;
        *i += 1;
        value |= u32::from(b & 63).checked_shl(shift)?;
        shift += 6;
    }
    Some(value)
}

fn svarint(table: &[u8], i: &mut usize) -> Option<i32> {
    let v = varint(table, i)?;
    Some(if v & 1 == 1 {
        -((v >> 1) as i32)
    } else {
        (v >> 1) as i32
    })
}

/// What the kernel side needs per traced CPython process, for a BPF array map: where
/// `_PyRuntime` is, how to get the calling thread's `PyThreadState`, and the layout.
///
/// In BPF, at an allocation: `fs = task->thread.fsbase` (the `pthread_t`);
/// `tstate = *(fs + pthread_specific + 16 * tss_key + 8)`; then the frame chain from
/// `tstate + offsets.tstate_frame` (through `cframe_current_frame` when set), recording
/// `(*(frame + frame_code), *(frame + frame_instr))` per frame and following `frame_previous`,
/// skipping frames whose `owner` byte is [`FRAME_OWNED_BY_CSTACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyKernelConfig {
    /// Runtime address of `_PyRuntime`.
    pub runtime: u64,
    /// The pthread key of `autoTSSkey`, [`NONE`] when not initialized or past glibc's first
    /// block of 32 keys.
    pub tss_key: u32,
    /// `offsetof(struct pthread, specific_1stblock)`: [`GLIBC_PTHREAD_SPECIFIC_1STBLOCK`].
    pub pthread_specific: u32,
    pub offsets: PyOffsets,
}

impl Resolver {
    /// The [`PyKernelConfig`] of this process (reads the `autoTSSkey` key from it).
    pub fn kernel_config(&self) -> Result<PyKernelConfig> {
        let o = &self.process.offsets;
        let tss = self.process.runtime + u64::from(o.runtime_tss_key);
        let initialized = self.mem.u32(tss)?;
        let key = self.mem.u32(tss + 4)?;
        Ok(PyKernelConfig {
            runtime: self.process.runtime,
            tss_key: if initialized != 0 && key < 32 {
                key
            } else {
                NONE
            },
            pthread_specific: GLIBC_PTHREAD_SPECIFIC_1STBLOCK as u32,
            offsets: *o,
        })
    }
}

/// For the kernel side: the thread state of the thread `pthread` (its `fs` base) as BPF would
/// read it through `autoTSSkey` and glibc's thread-specific data, or `None` when the key is not
/// initialized or larger than glibc's first block (32 keys).
pub fn tss_tstate(resolver: &Resolver, pthread: u64) -> Result<Option<u64>> {
    let config = resolver.kernel_config()?;
    if config.tss_key == NONE {
        return Ok(None);
    }
    let slot = pthread + u64::from(config.pthread_specific) + 16 * u64::from(config.tss_key) + 8;
    Ok(Some(resolver.mem.u64(slot)?))
}

/// For the kernel side: `_PyRuntime.gilstate.tstate_current` (3.8 to 3.11), the thread state
/// holding the GIL (0 when none does); `None` from 3.12.
pub fn gil_tstate(resolver: &Resolver) -> Result<Option<u64>> {
    let o = &resolver.process.offsets;
    match o.runtime_tstate_current {
        NONE => Ok(None),
        off => Ok(Some(
            resolver
                .mem
                .u64(resolver.process.runtime + u64::from(off))?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader},
        process::{Child, ChildStdout, Command, Stdio},
        time::{Duration, Instant},
    };

    use super::*;

    /// A python3 child running a script from a temporary directory, killed on drop.
    struct PyChild {
        child: Child,
        dir: PathBuf,
        script: String,
        _stdout: BufReader<ChildStdout>,
    }

    impl PyChild {
        /// Starts `python` on `source` (saved as `<dir>/app.py`) and waits for its `ready` line.
        fn start(python: &str, source: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "memprof-python-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).expect("create temp dir");
            let script = dir.join("app.py");
            fs::write(&script, source).expect("write script");
            let mut child = Command::new(python)
                .arg(&script)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("failed to start {python}: {e}"));
            let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read child stdout");
            assert_eq!(line, "ready\n", "{python} did not get ready");
            Self {
                child,
                dir,
                script: script.display().to_string(),
                _stdout: stdout,
            }
        }

        fn pid(&self) -> u32 {
            self.child.id()
        }
    }

    impl Drop for PyChild {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    /// Polls the process's threads until `done` accepts them (the child prints `ready` just
    /// before it blocks, so its innermost frame may still be on the print line for a moment),
    /// then returns them; panics with the last ones after 5 s.
    fn threads_when(pid: u32, done: impl Fn(&[PyThread]) -> bool) -> Vec<PyThread> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut resolver = Resolver::new(pid).expect("detect CPython");
        loop {
            let threads = resolver.threads().expect("walk threads");
            if done(&threads) || Instant::now() > deadline {
                return threads;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn frames(thread: &PyThread) -> Vec<(&str, Option<u32>)> {
        thread
            .frames
            .iter()
            .map(|f| (f.function.as_str(), f.line))
            .collect()
    }

    const NESTED: &str = "\
import sys
import time

def f3():
    print(\"ready\", flush=True)
    time.sleep(600)

def f2():
    f3()

def f1():
    x = 1
    f2()

f1()
";

    /// Python interpreters installed here: `python3` from PATH, Debian's, pyenv's.
    fn pythons() -> Vec<String> {
        let mut found = vec!["python3".to_string()];
        for p in ["/usr/bin/python3.11"] {
            if Path::new(p).exists() {
                found.push(p.to_string());
            }
        }
        if let Ok(dir) = fs::read_dir("/root/.pyenv/versions") {
            let mut versions: Vec<String> = dir
                .flatten()
                .map(|e| e.path().join("bin/python3").display().to_string())
                .filter(|p| Path::new(p).exists())
                .collect();
            versions.sort();
            found.extend(versions);
        }
        found
    }

    fn check_nested(python: &str) -> PyVersion {
        let child = PyChild::start(python, NESTED);
        let want = vec![
            ("f3", Some(6)),
            ("f2", Some(9)),
            ("f1", Some(13)),
            ("<module>", Some(15)),
        ];
        let threads = threads_when(child.pid(), |t| t.len() == 1 && frames(&t[0]) == want);
        let version = Resolver::new(child.pid()).expect("detect").process.version;
        assert_eq!(
            threads.len(),
            1,
            "{python} ({version}): one thread: {threads:#?}"
        );
        let main = &threads[0];
        assert_eq!(frames(main), want, "{python} ({version}): {main:#?}");
        assert!(
            main.frames.iter().all(|f| f.file == child.script),
            "{python} ({version}): every frame is in {}: {main:#?}",
            child.script
        );
        assert_eq!(
            main.tid,
            Some(child.pid()),
            "{python} ({version}): the main thread's tid is the pid"
        );
        version
    }

    #[test]
    fn python_main_thread_stack_is_exact() {
        let version = check_nested("python3");
        assert_eq!(version.major, 3);
    }

    #[test]
    fn python_every_installed_version() {
        let mut seen = Vec::new();
        for python in pythons() {
            let Ok(out) = Command::new(&python)
                .arg("-c")
                .arg("import sys; print(sys.version_info[1])")
                .output()
            else {
                continue;
            };
            let minor: u8 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0);
            if !(8..=13).contains(&minor) {
                continue;
            }
            let version = check_nested(&python);
            assert_eq!(version.minor, minor, "{python}");
            eprintln!("verified {python}: CPython {version}");
            seen.push(version);
        }
        assert!(!seen.is_empty(), "no CPython 3.8 to 3.13 found");
    }

    const THREADED: &str = "\
import sys
import threading
import time

class Worker:
    def inner(self, ev):
        ev.set()
        time.sleep(600)

    def run(self, ev):
        self.inner(ev)

def main():
    ev = threading.Event()
    t = threading.Thread(target=Worker().run, args=(ev,), daemon=True)
    t.start()
    ev.wait()
    print(\"ready\", flush=True)
    sys.stdin.readline()

main()
";

    /// The frames of the worker thread of [`THREADED`], innermost first, as far as app.py goes.
    fn worker_frames(version: PyVersion) -> Vec<(&'static str, Option<u32>)> {
        if version.minor >= 11 {
            vec![("Worker.inner", Some(8)), ("Worker.run", Some(11))]
        } else {
            vec![("inner", Some(8)), ("run", Some(11))]
        }
    }

    fn check_threads(python: &str) -> PyVersion {
        let child = PyChild::start(python, THREADED);
        let pid = child.pid();
        let version = detect(pid).expect("detect").version;
        let want_worker = worker_frames(version);
        let want_main = vec![("main", Some(19)), ("<module>", Some(21))];
        let split = |threads: &[PyThread]| {
            let main = threads.iter().find(|t| t.tid == Some(pid)).cloned();
            let worker = threads.iter().find(|t| t.tid != Some(pid)).cloned();
            (main, worker)
        };
        let threads = threads_when(pid, |t| {
            let (Some(main), Some(worker)) = split(t) else {
                return false;
            };
            frames(&main) == want_main && frames(&worker).starts_with(&want_worker)
        });
        assert_eq!(
            threads.len(),
            2,
            "{python} ({version}): two threads: {threads:#?}"
        );
        let (main, worker) = split(&threads);
        let (main, worker) = (main.expect("main thread"), worker.expect("worker thread"));
        assert_eq!(
            frames(&main),
            want_main,
            "{python} ({version}): main: {main:#?}"
        );
        let got = frames(&worker);
        assert_eq!(
            got[..2],
            want_worker[..],
            "{python} ({version}): worker: {worker:#?}"
        );
        // Below the script: threading.Thread.run, _bootstrap_inner, _bootstrap.
        let below: Vec<&str> = worker.frames[2..]
            .iter()
            .map(|f| f.function.as_str())
            .collect();
        let want_below: Vec<String> = ["run", "_bootstrap_inner", "_bootstrap"]
            .iter()
            .map(|f| {
                if version.minor >= 11 {
                    format!("Thread.{f}")
                } else {
                    f.to_string()
                }
            })
            .collect();
        assert_eq!(
            below, want_below,
            "{python} ({version}): worker: {worker:#?}"
        );
        assert!(
            worker.frames[2..]
                .iter()
                .all(|f| f.file.ends_with("/threading.py")),
            "{python} ({version}): {worker:#?}"
        );
        let tid = worker.tid.expect("worker tid");
        assert_ne!(tid, pid);
        assert!(
            Path::new(&format!("/proc/{pid}/task/{tid}")).exists(),
            "{python} ({version}): worker tid {tid} is a task of {pid}"
        );
        version
    }

    #[test]
    fn python_other_thread_stack_is_exact() {
        check_threads("python3");
    }

    #[test]
    fn python_threads_on_every_installed_version() {
        let mut seen = 0;
        for python in pythons() {
            if minor_of(&python).is_some_and(|m| (8..=13).contains(&m)) {
                let version = check_threads(&python);
                eprintln!("threads verified on {python}: CPython {version}");
                seen += 1;
            }
        }
        assert!(seen > 0, "no CPython 3.8 to 3.13 found");
    }

    fn minor_of(python: &str) -> Option<u8> {
        let out = Command::new(python)
            .arg("-c")
            .arg("import sys; print(sys.version_info[1])")
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// The `fs` base of a thread of a child, read with ptrace (seize, interrupt, getregs,
    /// detach): what BPF reads as `task->thread.fsbase`.
    fn fs_base(tid: u32) -> u64 {
        let tid = tid as libc::pid_t;
        // SAFETY: plain ptrace calls on a child thread; `regs` is a valid out parameter.
        unsafe {
            assert_eq!(
                libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0),
                0,
                "seize {tid}"
            );
            assert_eq!(
                libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0),
                0,
                "interrupt {tid}"
            );
            let mut status = 0;
            assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
            let mut regs: libc::user_regs_struct = std::mem::zeroed();
            let got = libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut _);
            libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0);
            assert_eq!(got, 0, "getregs {tid}");
            regs.fs_base
        }
    }

    /// The facts the kernel side relies on, on every installed version: a thread state's
    /// `thread_id` is the thread's `fs` base; `autoTSSkey` through glibc's thread-specific data
    /// gives each thread its own thread state, GIL or not; `gilstate.tstate_current` (3.8 to
    /// 3.11) is 0 while every thread sleeps.
    #[test]
    fn python_kernel_side_facts() {
        for python in pythons() {
            if !minor_of(&python).is_some_and(|m| (8..=13).contains(&m)) {
                continue;
            }
            let child = PyChild::start(&python, THREADED);
            let pid = child.pid();
            let resolver = Resolver::new(pid).expect("detect");
            let version = resolver.process.version;
            let threads = threads_when(pid, |t| {
                t.len() == 2
                    && t.iter()
                        .all(|t| t.frames.first().is_some_and(|f| f.line.is_some()))
            });
            for thread in &threads {
                let tid = thread.tid.expect("tid");
                assert_eq!(
                    fs_base(tid),
                    thread.pthread,
                    "{python} ({version}): thread {tid}: fs base is PyThreadState.thread_id"
                );
                assert_eq!(
                    tss_tstate(&resolver, thread.pthread).expect("read tss slot"),
                    Some(thread.tstate),
                    "{python} ({version}): thread {tid}: autoTSSkey slot"
                );
                let glibc_tid = resolver
                    .mem
                    .u32(thread.pthread + GLIBC_PTHREAD_TID)
                    .expect("read");
                assert_eq!(glibc_tid, tid, "{python} ({version}): struct pthread tid");
            }
            let gil = gil_tstate(&resolver).expect("read tstate_current");
            if version.minor <= 11 {
                assert_eq!(
                    gil,
                    Some(0),
                    "{python} ({version}): both threads wait without the GIL"
                );
            } else {
                assert_eq!(gil, None, "{python} ({version})");
            }
            eprintln!("kernel facts verified on {python}: CPython {version}");
        }
    }

    /// `gilstate.tstate_current` names the thread running Python code (3.8 to 3.11).
    #[test]
    fn python_gil_holder_is_the_running_thread() {
        const SPIN: &str = "print(\"ready\", flush=True)\nwhile True:\n    pass\n";
        for python in pythons() {
            if !minor_of(&python).is_some_and(|m| (8..=11).contains(&m)) {
                continue;
            }
            let child = PyChild::start(&python, SPIN);
            let resolver = Resolver::new(child.pid()).expect("detect");
            let states = resolver.thread_states().expect("thread states");
            assert_eq!(states.len(), 1);
            // The print released the GIL around its write(2): wait until it is taken back.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut gil = gil_tstate(&resolver).expect("read tstate_current");
            while gil == Some(0) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
                gil = gil_tstate(&resolver).expect("read tstate_current");
            }
            assert_eq!(
                gil,
                Some(states[0]),
                "{python}: the spinning main thread holds the GIL"
            );
        }
    }

    #[test]
    fn python_debug_offsets_match_the_table() {
        let Some(python) = pythons().into_iter().find(|p| minor_of(p) == Some(13)) else {
            eprintln!("no CPython 3.13 installed: skipped");
            return;
        };
        let child = PyChild::start(&python, NESTED);
        let process = detect(child.pid()).expect("detect");
        assert!(process.from_debug_offsets, "{process:?}");
        assert_eq!(Some(process.offsets), PyOffsets::for_version(3, 13));
    }

    #[test]
    fn python_detects_object_and_bias() {
        for python in pythons() {
            let Some(minor) = minor_of(&python).filter(|m| (8..=13).contains(m)) else {
                continue;
            };
            let child = PyChild::start(&python, NESTED);
            let p = detect(child.pid()).expect("detect");
            let base = file_name(&p.object);
            assert!(
                base.starts_with(&format!("libpython3.{minor}"))
                    || base == format!("python3.{minor}"),
                "{python}: {p:?}"
            );
            let data = fs::read(&p.object).expect("read object");
            let file = object::File::parse(&*data).expect("parse");
            let symbols = runtime_symbols(&file).expect("_PyRuntime");
            assert_eq!(p.runtime, symbols.runtime + p.bias, "{python}: {p:?}");
            if p.object == "/usr/bin/python3.11" {
                assert_eq!(p.bias, 0, "Debian's python3.11 is not PIE: {p:?}");
            }
            let hex = Command::new(&python)
                .arg("-c")
                .arg("import sys; print(sys.hexversion)")
                .output()
                .expect("run python");
            let hex: u64 = String::from_utf8_lossy(&hex.stdout)
                .trim()
                .parse()
                .expect("hexversion");
            let want = PyVersion::from_hex(hex);
            if minor >= 11 {
                assert_eq!(p.version, want, "{python}: Py_Version or _Py_DebugOffsets");
            } else {
                assert_eq!(
                    (p.version.major, p.version.minor),
                    (want.major, want.minor),
                    "{python}"
                );
            }
        }
    }

    #[test]
    fn python_resolve_a_recorded_pair() {
        let child = PyChild::start("python3", NESTED);
        let pid = child.pid();
        threads_when(pid, |t| {
            t.len() == 1 && t[0].frames.len() == 4 && t[0].frames[0].line == Some(6)
        });
        let resolver = Resolver::new(pid).expect("detect");
        let tstate = resolver.thread_states().expect("states")[0];
        let pairs = resolver.frame_pairs(tstate).expect("pairs");
        assert_eq!(pairs.len(), 4);
        let (code, instr) = pairs[1];
        let frame = resolve(pid, code, instr).expect("resolve f2's frame");
        assert_eq!(
            frame,
            PyFrame {
                function: "f2".into(),
                file: child.script.clone(),
                line: Some(9)
            }
        );
        let err = resolve(pid, tstate, 0).expect_err("a thread state is not a code object");
        assert!(err.to_string().contains("not a code object"), "{err}");
    }

    #[test]
    fn python_not_python() {
        let err = detect(std::process::id()).expect_err("the test binary is not CPython");
        assert!(matches!(err, PythonError::NotPython { .. }), "{err}");
    }

    #[test]
    fn versions_from_names_and_hex() {
        let v = |major, minor, micro| PyVersion {
            major,
            minor,
            micro,
        };
        assert_eq!(
            PyVersion::from_file_name("libpython3.11.so.1.0"),
            Some(v(3, 11, 0))
        );
        assert_eq!(PyVersion::from_file_name("python3.8"), Some(v(3, 8, 0)));
        assert_eq!(
            PyVersion::from_file_name("libpython3.7m.so.1.0"),
            Some(v(3, 7, 0))
        );
        assert_eq!(PyVersion::from_file_name("python3"), None);
        assert_eq!(PyVersion::from_hex(0x030b07f0), v(3, 11, 7));
        assert_eq!(PyVersion::from_hex(0x030d00f0), v(3, 13, 0));
    }

    #[test]
    fn layouts_cover_3_8_to_3_13() {
        for minor in 8..=13 {
            let o = PyOffsets::for_version(3, minor).expect("supported");
            assert_eq!(o.version_hex, 0x0300_0000 | (u32::from(minor) << 16));
            assert_eq!(o.frame_model == FRAME_MODEL_INTERPRETER_FRAME, minor >= 11);
            assert_eq!(o.code_qualname != NONE, minor >= 11);
            assert_eq!(o.runtime_tstate_current != NONE, minor <= 11);
        }
        assert_eq!(PyOffsets::for_version(3, 7), None);
        assert_eq!(PyOffsets::for_version(3, 14), None);
        assert_eq!(
            std::mem::size_of::<PyOffsets>(),
            30 * 4,
            "u32 fields, no padding"
        );
    }

    #[test]
    fn debug_offsets_need_the_cookie_and_3_13() {
        let mut bytes = vec![0u8; DEBUG_OFFSETS_SIZE];
        assert_eq!(DebugOffsets::parse(&bytes), None, "no cookie");
        bytes[..8].copy_from_slice(b"xdebugpy");
        bytes[8..16].copy_from_slice(&0x030e00f0u64.to_le_bytes());
        assert_eq!(DebugOffsets::parse(&bytes), None, "3.14's struct is longer");
        bytes[8..16].copy_from_slice(&0x030d00f0u64.to_le_bytes());
        bytes[40..48].copy_from_slice(&632u64.to_le_bytes());
        let d = DebugOffsets::parse(&bytes).expect("3.13");
        assert_eq!((d.version, d.runtime_interpreters_head), (0x030d00f0, 632));
        assert_eq!(DebugOffsets::parse(&bytes[..100]), None, "too short");
    }

    #[test]
    fn lnotab_lines() {
        // firstlineno 10; bytes 0..6 line 11, 6..14 line 12, 14.. line 14, then 300 bytes
        // later back one line (255 + 45, delta -1).
        let table = [0, 1, 6, 1, 8, 2, 255, 0, 45, 0xff];
        assert_eq!(lnotab_line(&table, 10, 0), 11);
        assert_eq!(lnotab_line(&table, 10, 5), 11);
        assert_eq!(lnotab_line(&table, 10, 6), 12);
        assert_eq!(lnotab_line(&table, 10, 13), 12);
        assert_eq!(lnotab_line(&table, 10, 14), 14);
        assert_eq!(lnotab_line(&table, 10, 313), 14);
        assert_eq!(lnotab_line(&table, 10, 314), 13);
        assert_eq!(lnotab_line(&[], 7, 4), 7);
    }

    #[test]
    fn linetable_310_lines() {
        // firstlineno 20; [0,4) line 21, [4,10) no line, [10,12) line 23 (a zero-length
        // entry adds 2 first), beyond: none.
        let table = [4, 1, 6, 0x80, 0, 1, 2, 1];
        assert_eq!(linetable310_line(&table, 20, 0), Some(21));
        assert_eq!(linetable310_line(&table, 20, 3), Some(21));
        assert_eq!(linetable310_line(&table, 20, 4), None);
        assert_eq!(linetable310_line(&table, 20, 10), Some(23));
        assert_eq!(linetable310_line(&table, 20, 12), None);
    }

    #[test]
    fn location_table_lines() {
        let table = [
            0xe8, 0x04, // no column (13), 1 unit, line +2
            0x81, 0x05, // short form (0), 2 units
            0xf8, // no location (15), 1 unit
            0xd8, 0x03, 0x09, // one line (11): +1, 1 unit
            0xf0, 0x07, 0x00, 0x41, 0x01, 0x00, // long (14): line -3, col 65 (two bytes)
        ];
        let line = |offset| locations_line(&table, 10, offset);
        assert_eq!(line(0), Some(12));
        assert_eq!(line(2), Some(12));
        assert_eq!(line(5), Some(12));
        assert_eq!(line(6), None, "no location");
        assert_eq!(line(8), Some(13));
        assert_eq!(line(10), Some(10));
        assert_eq!(line(12), None, "past the table");
        assert_eq!(line(-2), None, "before the code");
    }

    const GENERATOR: &str = "\
import time

def gen():
    print(\"ready\", flush=True)
    time.sleep(600)
    yield 1

def consume():
    for x in gen():
        pass

consume()
";

    const COROUTINE: &str = "\
import asyncio
import time

async def leaf():
    print(\"ready\", flush=True)
    time.sleep(600)

async def mid():
    await leaf()

asyncio.run(mid())
";

    /// Generator and coroutine frames are in the chain (owned by their generator from 3.11).
    #[test]
    fn python_generator_and_coroutine_frames() {
        for python in pythons() {
            if !minor_of(&python).is_some_and(|m| (8..=13).contains(&m)) {
                continue;
            }
            let want = vec![
                ("gen", Some(5)),
                ("consume", Some(9)),
                ("<module>", Some(12)),
            ];
            let child = PyChild::start(&python, GENERATOR);
            let threads = threads_when(child.pid(), |t| t.len() == 1 && frames(&t[0]) == want);
            assert_eq!(frames(&threads[0]), want, "{python}: {threads:#?}");

            let child = PyChild::start(&python, COROUTINE);
            let threads = threads_when(child.pid(), |t| {
                t.len() == 1 && t[0].frames.first().is_some_and(|f| f.line == Some(6))
            });
            let got = frames(&threads[0]);
            assert_eq!(
                got[..2],
                [("leaf", Some(6)), ("mid", Some(9))],
                "{python}: {got:?}"
            );
            assert_eq!(
                got.last(),
                Some(&("<module>", Some(11))),
                "{python}: {got:?}"
            );
            assert!(
                threads[0].frames[2..got.len() - 1]
                    .iter()
                    .all(|f| f.file.contains("/asyncio/")),
                "{python}: asyncio's frames between mid and <module>: {got:?}"
            );
        }
    }

    #[test]
    fn python_kernel_config() {
        let child = PyChild::start("python3", NESTED);
        let resolver = Resolver::new(child.pid()).expect("detect");
        let config = resolver.kernel_config().expect("kernel config");
        assert_eq!(config.runtime, resolver.process.runtime);
        assert_eq!(config.offsets, resolver.process.offsets);
        assert!(config.tss_key < 32, "{config:?}");
        assert_eq!(std::mem::size_of::<PyKernelConfig>(), 8 + 4 + 4 + 30 * 4);
    }
}
