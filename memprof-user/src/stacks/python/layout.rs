//! CPython versions and the layout (struct offsets) of each: tables for 3.8 to 3.13, and the
//! `_Py_DebugOffsets` that 3.13 publishes at the start of `_PyRuntime`.

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

    /// Overrides the fields `_Py_DebugOffsets` publishes (3.13's layout of it); the others
    /// (`_co_firsttraceable`, `autoTSSkey`, the compact string size) stay as in the table.
    pub(super) fn with_debug_offsets(self, d: &DebugOffsets) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;

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
            31 * 4,
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
}
