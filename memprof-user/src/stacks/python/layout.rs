//! CPython versions and the layout (struct offsets) of each: tables for 3.8 to 3.13, and the
//! `_Py_DebugOffsets` that 3.13 and later publish at the start of `_PyRuntime`, read with the
//! field order of each known layout of that struct (3.13, 3.14, 3.15; a newer version with
//! the newest, checked).

use super::{
    FRAME_MODEL_FRAME_OBJECT, FRAME_MODEL_INTERPRETER_FRAME, INSTR_LASTI_BYTES, INSTR_LASTI_UNITS,
    INSTR_POINTER, NONE,
};

/// A CPython version, `3.11.7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PyVersion {
    pub major: u8,
    pub minor: u8,
    pub micro: u8,
}

impl PyVersion {
    /// `micro` of a version told from a file name: shown as `3.10`.
    pub const MICRO_UNKNOWN: u8 = u8::MAX;

    /// From `PY_VERSION_HEX` (`Py_Version`, `_Py_DebugOffsets.version`): 0x030b07f0 is 3.11.7.
    pub fn from_hex(hex: u64) -> Self {
        Self {
            major: (hex >> 24) as u8,
            minor: (hex >> 16) as u8,
            micro: (hex >> 8) as u8,
        }
    }

    /// The version in a file name: `libpython3.11.so.1.0`, `python3.10`, `libpython3.8d.so`.
    /// The micro version is unknown ([`PyVersion::MICRO_UNKNOWN`]).
    pub fn from_file_name(name: &str) -> Option<Self> {
        let at = name.find("python")? + "python".len();
        let rest = &name[at..];
        let (major, rest) = rest.split_once('.')?;
        let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
        Some(Self {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
            micro: Self::MICRO_UNKNOWN,
        })
    }
}

impl std::fmt::Display for PyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if self.micro != Self::MICRO_UNKNOWN {
            write!(f, ".{}", self.micro)?;
        }
        Ok(())
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
    /// `_PyInterpreterFrame.is_entry` (a bool), 3.11 only ([`NONE`] otherwise: 3.12+ mark
    /// each call of the eval loop with a shim frame, and before 3.11 each frame is one call).
    pub frame_is_entry: u32,

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
    /// `PyASCIIObject.length`, in code points.
    pub unicode_length: u32,
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
            frame_is_entry: NONE,
            object_type: 8,
            code_name: 112,
            code_filename: 104,
            code_qualname: NONE,
            code_firstlineno: 40,
            code_linetable: 120,
            code_code_adaptive: NONE,
            code_firsttraceable: NONE,
            unicode_state: 32,
            unicode_length: 16,
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
                frame_is_entry: 68,
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

    /// The layout of a process whose `_Py_DebugOffsets` were read (3.13+): every field the
    /// struct publishes from it; what it does not publish from `table` (the hand-measured
    /// layout of the version, where there is one: `autoTSSkey`) or from rules that have held
    /// since 3.11 (`_co_firsttraceable` is the `int` 16 bytes before `co_code_adaptive`, followed
    /// by `void *co_extra`; a compact non-ASCII string's data follows the ASCII header and
    /// `Py_ssize_t utf8_length; char *utf8;`). A version with no table (3.14 on) costs no code
    /// where its `_Py_DebugOffsets` layout is one memprof knows.
    pub(super) fn from_debug_offsets(d: &DebugOffsets, table: Option<Self>) -> Self {
        let o = |v: u64| u32::try_from(v).unwrap_or(NONE);
        let adaptive = o(d.code_code_adaptive);
        let derived = Self {
            version_hex: (d.version as u32) & 0xffff_0000,
            frame_model: FRAME_MODEL_INTERPRETER_FRAME,
            instr_kind: INSTR_POINTER,
            runtime_interpreters_head: NONE,
            runtime_tstate_current: NONE,
            runtime_tss_key: NONE,
            interp_next: NONE,
            interp_threads_head: NONE,
            tstate_next: NONE,
            tstate_frame: NONE,
            cframe_current_frame: NONE,
            tstate_thread_id: NONE,
            tstate_native_thread_id: NONE,
            frame_previous: NONE,
            frame_code: NONE,
            frame_instr: NONE,
            frame_owner: NONE,
            frame_is_entry: NONE,
            object_type: NONE,
            code_name: NONE,
            code_filename: NONE,
            code_qualname: NONE,
            code_firstlineno: NONE,
            code_linetable: NONE,
            code_code_adaptive: NONE,
            code_firsttraceable: adaptive.checked_sub(16).unwrap_or(NONE),
            unicode_state: NONE,
            unicode_length: NONE,
            unicode_ascii_data: NONE,
            unicode_compact_data: match d.unicode_compact_size {
                Some(size) => o(size),
                None => o(d.unicode_ascii_size).saturating_add(16),
            },
            bytes_size: NONE,
            bytes_data: NONE,
        };
        let base = table.unwrap_or(derived);
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
            frame_is_entry: NONE,
            object_type: o(d.object_type),
            code_name: o(d.code_name),
            code_filename: o(d.code_filename),
            code_qualname: o(d.code_qualname),
            code_firstlineno: o(d.code_firstlineno),
            code_linetable: o(d.code_linetable),
            code_code_adaptive: adaptive,
            unicode_state: o(d.unicode_state),
            unicode_length: o(d.unicode_length),
            unicode_ascii_data: o(d.unicode_ascii_size),
            bytes_size: o(d.bytes_size),
            bytes_data: o(d.bytes_data),
            ..base
        }
    }
}

/// The fields of CPython's `_Py_DebugOffsets` (3.13+: Include/internal/pycore_runtime.h,
/// pycore_debug_offsets.h from 3.14) this module uses. The struct starts `_PyRuntime`:
/// `char cookie[8] = "xdebugpy"; uint64_t version; uint64_t free_threaded;` then sections of
/// `uint64_t` offsets, most starting with their struct's size. Each minor version may add
/// fields anywhere, so where each field lies is read from [`DEBUG_LAYOUTS`], the field names
/// of each known layout in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugOffsets {
    pub version: u64,
    pub free_threaded: u64,
    /// The version whose layout of the struct was used (`0x030f0000` for 3.15's).
    pub layout: u32,
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
    pub unicode_length: u64,
    pub unicode_ascii_size: u64,
    /// `sizeof(PyCompactUnicodeObject)`, published from 3.15.
    pub unicode_compact_size: Option<u64>,
}

/// Bytes of `_PyRuntime` read for its `_Py_DebugOffsets` (the largest known layout, 3.15's, is
/// 968; a smaller one reads what follows it, which the parse ignores).
pub const DEBUG_OFFSETS_SIZE: usize = 1024;
const DEBUG_COOKIE: &[u8; 8] = b"xdebugpy";

mod debug_layouts;

pub use debug_layouts::DEBUG_LAYOUTS;

/// Why the `_Py_DebugOffsets` at the start of `_PyRuntime` cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DebugOffsetsError {
    #[error("no _Py_DebugOffsets (no xdebugpy cookie at the start of _PyRuntime)")]
    NoCookie,
    #[error("_Py_DebugOffsets names CPython {0}, which has none")]
    TooOld(PyVersion),
    #[error(
        "its _Py_DebugOffsets do not read as the layout of 3.{layout} (the newest memprof knows): \
         {why}"
    )]
    Layout { layout: u8, why: String },
}

impl DebugOffsets {
    /// Parses the start of `_PyRuntime` (at least [`DEBUG_OFFSETS_SIZE`] bytes) with the layout
    /// of its version (the newest known for a newer version), and checks that the offsets it
    /// gives fit the sizes of their structs: a layout that does not match reads sizes and
    /// offsets from the wrong places.
    pub fn parse(bytes: &[u8]) -> Result<Self, DebugOffsetsError> {
        if bytes.len() < 24 || &bytes[..8] != DEBUG_COOKIE {
            return Err(DebugOffsetsError::NoCookie);
        }
        let at = |off: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                bytes.get(off..off + 8)?.try_into().ok()?,
            ))
        };
        let version = at(8).unwrap_or(0);
        let v = PyVersion::from_hex(version);
        let Some(&(layout, sections)) = DEBUG_LAYOUTS
            .iter()
            .rev()
            .find(|(minor, _)| v.major > 3 || (v.major == 3 && v.minor >= *minor))
        else {
            return Err(DebugOffsetsError::TooOld(v));
        };
        let bad = |why: String| DebugOffsetsError::Layout { layout, why };
        let field = |section: &str, name: &str| -> Option<u64> {
            let mut off = 24;
            for (s, fields) in sections {
                for f in *fields {
                    if *s == section && *f == name {
                        return at(off);
                    }
                    off += 8;
                }
            }
            None
        };
        let get = |section: &str, name: &str| {
            field(section, name)
                .ok_or_else(|| bad(format!("no {section}.{name} in the bytes read")))
        };
        // Every offset used must lie inside its struct, whose size the section publishes, and
        // the sizes must be those of real structs.
        let checked = |section: &str, names: &[&str], max_size: u64| {
            let size = get(section, "size")?;
            if size == 0 || size > max_size {
                return Err(bad(format!("{section}.size is {size}")));
            }
            names
                .iter()
                .map(|name| {
                    let off = get(section, name)?;
                    if off >= size {
                        return Err(bad(format!(
                            "{section}.{name} is {off}, past the struct's {size} bytes"
                        )));
                    }
                    Ok(off)
                })
                .collect::<Result<Vec<u64>, _>>()
        };
        let runtime = checked("runtime_state", &["interpreters_head"], 1 << 20)?;
        let interp = checked("interpreter_state", &["next", "threads_head"], 1 << 20)?;
        let tstate = checked(
            "thread_state",
            &["next", "current_frame", "thread_id", "native_thread_id"],
            1 << 16,
        )?;
        let frame = checked(
            "interpreter_frame",
            &["previous", "executable", "instr_ptr", "owner"],
            1 << 10,
        )?;
        let code = checked(
            "code_object",
            &[
                "filename",
                "name",
                "qualname",
                "linetable",
                "firstlineno",
                "co_code_adaptive",
            ],
            1 << 12,
        )?;
        let object = checked("pyobject", &["ob_type"], 64)?;
        let bytes_obj = checked("bytes_object", &["ob_size", "ob_sval"], 256)?;
        let unicode = checked("unicode_object", &["state", "length"], 256)?;
        let ascii = get("unicode_object", "asciiobject_size")?;
        if !(unicode[0] < ascii && ascii <= 128) {
            return Err(bad(format!(
                "unicode_object.asciiobject_size is {ascii} (state at {})",
                unicode[0]
            )));
        }
        let compact = field("unicode_object", "compactunicodeobject_size");
        if let Some(size) = compact
            && !(ascii < size && size <= 256)
        {
            return Err(bad(format!(
                "unicode_object.compactunicodeobject_size is {size}"
            )));
        }
        Ok(Self {
            version,
            free_threaded: at(16).unwrap_or(0),
            layout: 0x0300_0000 | (u32::from(layout) << 16),
            runtime_interpreters_head: runtime[0],
            interp_next: interp[0],
            interp_threads_head: interp[1],
            tstate_next: tstate[0],
            tstate_current_frame: tstate[1],
            tstate_thread_id: tstate[2],
            tstate_native_thread_id: tstate[3],
            frame_previous: frame[0],
            frame_executable: frame[1],
            frame_instr_ptr: frame[2],
            frame_owner: frame[3],
            code_filename: code[0],
            code_name: code[1],
            code_qualname: code[2],
            code_linetable: code[3],
            code_firstlineno: code[4],
            code_code_adaptive: code[5],
            object_type: object[0],
            bytes_size: bytes_obj[0],
            bytes_data: bytes_obj[1],
            unicode_state: unicode[0],
            unicode_length: unicode[1],
            unicode_ascii_size: ascii,
            unicode_compact_size: compact,
        })
    }
}

#[cfg(test)]
mod tests;
