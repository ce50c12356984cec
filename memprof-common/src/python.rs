//! Python frames: how the kernel program walks a CPython process's frames, and what it stores.

/// Most Python frames recorded per allocation (innermost first).
pub const MAX_PY_FRAMES: usize = 32;

/// How the kernel program walks the Python frames of one CPython process (the `PY_PROCS` map,
/// keyed by process id): byte offsets of the fields it follows, for that interpreter's version.
/// From a thread state: `tstate_frame` (then `cframe_current_frame` unless it is
/// [`PY_NONE`]) gives the innermost frame; per frame it records the code object
/// (`frame_code`) and the instruction field (`frame_instr`, 8 bytes when `instr_is_pointer`,
/// else 4), skips frames whose `frame_owner` byte is [`PY_FRAME_OWNED_BY_CSTACK`], and
/// follows `frame_previous`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyWalk {
    /// Runtime address of `_PyRuntime`: with the next four offsets, how the program finds the
    /// thread state of a thread the agent has not registered yet (the main interpreter's
    /// threads whose `native_thread_id` is the thread's id; 3.11+, [`PY_NONE`] before).
    pub runtime: u64,
    pub runtime_interpreters_head: u32,
    pub interp_threads_head: u32,
    pub tstate_next: u32,
    pub tstate_native_thread_id: u32,
    pub tstate_frame: u32,
    pub cframe_current_frame: u32,
    pub frame_previous: u32,
    pub frame_code: u32,
    pub frame_instr: u32,
    pub instr_is_pointer: u32,
    pub frame_owner: u32,
    /// Bytes from a frame's start to the end of its furthest field above: the walk copies
    /// them in one read (at most [`PY_FRAME_COPY`]).
    pub frame_span: u32,
    /// Nonzero when frames are `_PyInterpreterFrame`s (3.11+), most of which lie in the
    /// thread's data stack, each caller's just below its callee's: one read then copies
    /// several.
    pub frames_in_data_stack: u32,
    /// `_PyInterpreterFrame.is_entry` (a byte; 3.11 only, [`PY_NONE`] otherwise): a frame with
    /// it set is the outermost of its `_PyEval_EvalFrameDefault` call, and is recorded with
    /// [`PY_ENTRY`] in its instruction field.
    pub frame_is_entry: u32,
}

/// Set in a recorded instruction field: the frame is the outermost its call of the eval loop
/// runs (3.11's `is_entry`). Instruction fields never use the top bit.
pub const PY_ENTRY: u64 = 1 << 63;

/// Most bytes of one Python frame the kernel walk copies (a power of two).
pub const PY_FRAME_COPY: u32 = 128;

impl PyWalk {
    /// `frame_span` for the frame fields set in `self`, or `None` if they lie beyond
    /// [`PY_FRAME_COPY`].
    pub fn span_of_frame_fields(&self) -> Option<u32> {
        let instr = if self.instr_is_pointer != 0 { 8 } else { 4 };
        let mut span = (self.frame_previous.checked_add(8)?)
            .max(self.frame_code.checked_add(8)?)
            .max(self.frame_instr.checked_add(instr)?);
        if self.frame_owner != PY_NONE {
            span = span.max(self.frame_owner.checked_add(1)?);
        }
        if self.frame_is_entry != PY_NONE {
            span = span.max(self.frame_is_entry.checked_add(1)?);
        }
        (span <= PY_FRAME_COPY).then_some(span)
    }
}

/// An absent field in [`PyWalk`].
pub const PY_NONE: u32 = u32::MAX;

/// `_PyInterpreterFrame.owner` of a shim frame of the C stack (3.12+).
pub const PY_FRAME_OWNED_BY_CSTACK: u8 = 3;

/// The Python frames of one allocation as the `PY_STACKS` map stores them: (code object
/// address, instruction field) pairs, innermost first, keyed by a hash of the pairs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyStack {
    pub len: u32,
    pub _pad: u32,
    pub frames: [[u64; 2]; MAX_PY_FRAMES],
}
