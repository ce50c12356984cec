//! Python frames of CPython threads the agent registered (`PY_PROCS`, `PY_THREADS`): the walk
//! from the thread state, one frame per call of the global function `py_frame`, stored
//! content-addressed in `PY_STACKS`. The layouts per CPython version are the agent's
//! (`PyWalk`).

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::bpf_probe_read_user,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use memprof_common::{
    Counter, DEFAULT_STACK_ENTRIES, MAX_PY_FRAMES, NO_STACK, PY_ENTRY, PY_FRAME_COPY,
    PY_FRAME_OWNED_BY_CSTACK, PY_NONE, PyStack, PyWalk,
};

use crate::{emit::count, stack::copy_stack};

/// CPython processes: how to walk their frames (written by the agent).
#[map]
static PY_PROCS: HashMap<u32, PyWalk> = HashMap::with_max_entries(1024, 0);

/// Slot 0 nonzero once the agent registered a process in `PY_PROCS`: until then no allocation
/// looks there.
#[map]
static PY_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Threads running Python: thread id -> address of its `PyThreadState` (written by the agent).
#[map]
static PY_THREADS: HashMap<u32, u64> = HashMap::with_max_entries(16 * 1024, 0);

/// Python frames of allocations, keyed by a hash of their (code, instruction) pairs.
#[map]
static PY_STACKS: HashMap<u64, PyStack> =
    HashMap::with_max_entries(DEFAULT_STACK_ENTRIES, BPF_F_NO_PREALLOC);

/// Per-CPU scratch space for a `PyStack`.
#[map]
static PY_SCRATCH: PerCpuArray<PyStack> = PerCpuArray::with_max_entries(1, 0);

/// Most bytes of Python frames one read copies (a power of two, at least `PY_FRAME_COPY`).
const PY_WINDOW: u32 = 1024;

/// `PY_WINDOW` with room for the widest field past it.
const PY_FRAME_BUF: usize = PY_WINDOW as usize + 8;

/// Copied Python frames: `len` bytes from address `base` (kept here rather than in the walk's
/// registers, whose every value the verifier would otherwise follow apart).
#[repr(C)]
struct PyCopy {
    base: u64,
    len: u64,
    /// The walk under way: its offsets, and the hash of its frames so far.
    walk: PyWalk,
    hash: u64,
    bytes: [u8; PY_FRAME_BUF],
}

/// Per-CPU copy of the Python frames being walked.
#[map]
static PY_FRAME: PerCpuArray<PyCopy> = PerCpuArray::with_max_entries(1, 0);

/// Reads a `T` from user memory, or `None` if it faults.
#[inline(always)]
fn user<T>(addr: u64) -> Option<T> {
    // SAFETY: the helper checks the access.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// Marks a new key in `py_stack_key`'s result.
const PY_NEW: u64 = 1 << 63;

/// The Python frames of the calling thread, if the agent registered it as a CPython thread:
/// their key in `PY_STACKS` (`NO_STACK` for none), with `PY_NEW` set when the key is new.
/// A global function: the verifier checks it once, not at each of its callers.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn py_stack_key(id: u64) -> u64 {
    let Some(walk) = PY_PROCS.get_ptr(&((id >> 32) as u32)) else {
        return NO_STACK;
    };
    // SAFETY: a map value, read-only here.
    let walk = unsafe { *walk };
    let tstate = match PY_THREADS.get_ptr(&(id as u32)) {
        // SAFETY: as above.
        Some(t) => unsafe { *t },
        None => find_tstate(&walk, id as u32),
    };
    if tstate == 0 {
        return NO_STACK;
    }
    let Some(buf) = PY_SCRATCH.get_ptr_mut(0) else {
        return NO_STACK;
    };
    let Some(copy) = PY_FRAME.get_ptr_mut(0) else {
        return NO_STACK;
    };
    // SAFETY: the per-CPU buffers are this CPU's alone (written through their pointers:
    // `py_frame` writes them too).
    unsafe {
        (*copy).walk = walk;
        (*copy).len = 0;
        (*copy).hash = 0x9e37_79b9_7f4a_7c15;
    }
    let mut frame = user::<u64>(tstate + u64::from(walk.tstate_frame)).unwrap_or(0);
    if walk.cframe_current_frame != PY_NONE && frame != 0 {
        frame = user::<u64>(frame + u64::from(walk.cframe_current_frame)).unwrap_or(0);
    }
    let mut n: u32 = 0;
    for i in 0..MAX_PY_FRAMES {
        if frame == 0 {
            break;
        }
        frame = py_frame(frame, i as u64);
        if frame == PY_READ_FAILED {
            break;
        }
        n += 1;
    }
    // SAFETY: as above.
    let hash = unsafe { (*copy).hash };
    if n == 0 {
        return NO_STACK;
    }
    // SAFETY: as above.
    let out = unsafe {
        (*buf).len = n;
        &*buf
    };
    let key = (hash | 1) & !PY_NEW;
    if PY_STACKS.get_ptr(&key).is_some() {
        return key;
    }
    match PY_STACKS.insert(&key, out, BPF_NOEXIST as u64) {
        Ok(()) => key | PY_NEW,
        Err(-17) => key,
        Err(_) => {
            count(Counter::StackLost);
            NO_STACK
        }
    }
}

/// `py_frame`'s result when the frame could not be read.
const PY_READ_FAILED: u64 = u64::MAX;

/// Records Python frame `frame` as the `i`th of the walk under way (in `PY_SCRATCH`, its code
/// and instruction folded into `PyCopy::hash`) and returns its caller's frame (0: none), or
/// `PY_READ_FAILED`. The walk's offsets are in `PyCopy::walk`. A global function: the walk's
/// loop is verified as 32 calls, not 32 copies of this.
///
/// 3.8-3.10 frames are objects of their own: one read each. 3.11+ frames mostly lie in the
/// thread's data stack, each caller's just below its callee's: a frame that is not in the last
/// copy is read with what lies below it (`copy_py_frames`).
#[unsafe(no_mangle)]
#[inline(never)]
pub fn py_frame(frame: u64, i: u64) -> u64 {
    let (Some(copy), Some(out)) = (PY_FRAME.get_ptr_mut(0), PY_SCRATCH.get_ptr_mut(0)) else {
        return PY_READ_FAILED;
    };
    // SAFETY: the per-CPU buffers are this CPU's alone (the walk's fields are read where used,
    // not copied).
    let walk = unsafe { &(*copy).walk };
    let span = u64::from(walk.frame_span.min(PY_FRAME_COPY));
    let at = if walk.frames_in_data_stack == 0 {
        // SAFETY: as above.
        if !copy_stack(unsafe { (*copy).bytes.as_mut_ptr() }, span as u32, frame) {
            return PY_READ_FAILED;
        }
        0
    } else {
        // The frame's offset in the copy, if the copy holds it whole.
        // SAFETY: as above.
        let (base, len) = unsafe { ((*copy).base, (*copy).len) };
        let mut at = frame.wrapping_sub(base);
        if len < span || at > len - span {
            let Some(offset) = copy_py_frames(copy, frame, span) else {
                return PY_READ_FAILED;
            };
            at = offset;
        }
        at as u32
    };
    // SAFETY: as above.
    let bytes = unsafe { &(*copy).bytes };
    let code = frame_field::<u64>(bytes, at + walk.frame_code);
    let instr = if walk.instr_is_pointer != 0 {
        frame_field::<u64>(bytes, at + walk.frame_instr)
    } else {
        u64::from(frame_field::<u32>(bytes, at + walk.frame_instr))
    };
    // Shim frames of the C stack are recorded as code 0 and dropped by the agent.
    let shim = walk.frame_owner != PY_NONE
        && frame_field::<u8>(bytes, at + walk.frame_owner) == PY_FRAME_OWNED_BY_CSTACK;
    let code = if shim { 0 } else { code };
    // 3.11 marks the outermost frame of each call of the eval loop instead.
    let entry =
        walk.frame_is_entry != PY_NONE && frame_field::<u8>(bytes, at + walk.frame_is_entry) != 0;
    let instr = if entry { instr | PY_ENTRY } else { instr };
    // SAFETY: as above.
    unsafe {
        if let Some(slot) = (*out).frames.get_mut(i as usize) {
            *slot = [code, instr];
        }
        let mut hash = (*copy).hash;
        hash = (hash.rotate_left(5) ^ code).wrapping_mul(0x517c_c1b7_2722_0a95);
        hash = (hash.rotate_left(5) ^ instr).wrapping_mul(0x517c_c1b7_2722_0a95);
        (*copy).hash = hash;
    }
    frame_field::<u64>(bytes, at + walk.frame_previous)
}

/// Copies Python frame `frame` (`span` bytes, at most `PY_FRAME_COPY`), a frame in a 3.11+
/// data stack, into `copy`; returns the frame's offset in the copy, `None` if the read failed.
/// A read costs about as much as copying a kilobyte, and callers' frames lie below their
/// callee's in the data stack: the copy also takes what lies below, up to `PY_WINDOW` bytes in
/// all and back to the start of the frame's page at most (that page is mapped: the frame is
/// in it).
#[inline(always)]
fn copy_py_frames(copy: *mut PyCopy, frame: u64, span: u64) -> Option<u64> {
    let start = (frame + span)
        .saturating_sub(u64::from(PY_WINDOW))
        .max(frame & !4095);
    let want = frame
        .saturating_add(span)
        .saturating_sub(start)
        .min(u64::from(PY_WINDOW));
    // SAFETY: the per-CPU buffer is this CPU's alone; `want` fits in `bytes`.
    unsafe {
        if !copy_stack((*copy).bytes.as_mut_ptr(), want as u32, start) {
            (*copy).len = 0;
            return None;
        }
        (*copy).base = start;
        (*copy).len = want;
    }
    Some(frame - start)
}

/// The thread state of thread `tid` in the main interpreter's thread list (3.11+, whose
/// thread states carry the kernel thread id), registered in `PY_THREADS` once found; 0 if none.
/// A thread that started Python after the agent last looked is found here at its first
/// allocation.
#[inline(always)]
fn find_tstate(walk: &PyWalk, tid: u32) -> u64 {
    const MAX_THREADS: usize = 16;
    if walk.tstate_native_thread_id == PY_NONE || walk.runtime == 0 {
        return 0;
    }
    let interp = user::<u64>(walk.runtime + u64::from(walk.runtime_interpreters_head)).unwrap_or(0);
    if interp == 0 {
        return 0;
    }
    let mut tstate = user::<u64>(interp + u64::from(walk.interp_threads_head)).unwrap_or(0);
    for _ in 0..MAX_THREADS {
        if tstate == 0 {
            return 0;
        }
        let native = user::<u64>(tstate + u64::from(walk.tstate_native_thread_id)).unwrap_or(0);
        if native == u64::from(tid) {
            let _ = PY_THREADS.insert(&tid, &tstate, 0);
            return tstate;
        }
        tstate = user::<u64>(tstate + u64::from(walk.tstate_next)).unwrap_or(0);
    }
    0
}

/// A field of the copied Python frames at byte `off` (a frame's offset in the copy plus a
/// field's, below `PY_FRAME_COPY` as the agent checks: within the copied bytes).
#[inline(always)]
fn frame_field<T: Copy>(copy: &[u8; PY_FRAME_BUF], off: u32) -> T {
    // A mask rather than a comparison: the compiler hoists the address out of the loop, and
    // the verifier must see it bounded wherever it is computed.
    let off = off as usize & (PY_WINDOW as usize - 1);
    // SAFETY: `off + size_of::<T>()` is at most `PY_WINDOW + 7`, within the buffer.
    unsafe { core::ptr::read_unaligned(copy.as_ptr().add(off).cast::<T>()) }
}

/// `py_stack_key` split into the key and whether it is new.
#[inline(always)]
pub(crate) fn py_stack(id: u64) -> (u64, bool) {
    if PY_ACTIVE.get(0).is_none_or(|active| *active == 0) {
        return (NO_STACK, false);
    }
    let r = py_stack_key(id);
    (r & !PY_NEW, r & PY_NEW != 0)
}
