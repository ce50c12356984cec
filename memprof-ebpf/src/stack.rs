//! User stacks at an allocator's return: the kernel's walk or memprof's own frame-pointer walk
//! over copied windows of stack, stored content-addressed in `STACKS`; reads of user stack, and
//! each thread's learnt stack top, which keeps those reads from running past it.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_NO_PREALLOC, BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{bpf_get_stack, generated::bpf_probe_read_user as bpf_probe_read_user_raw},
    macros::map,
    maps::{HashMap, PerCpuArray},
    programs::RetProbeContext,
};
use memprof_common::{
    Counter, DEFAULT_STACK_ENTRIES, MAX_STACK_DEPTH, NO_STACK, SEEN_STACKS, StackTrace, unwind,
    unwind_end,
};

use crate::{
    KERNEL_STACKS, UNWIND,
    calls::{ThreadHints, thread_hints},
    emit::count,
    reuse::{keep_walk, note, reused_walk, start_notes},
    tables::table_stack_key,
};

/// Stacks keyed by a hash of their frames: content-addressed, so a key never changes meaning.
#[map]
static STACKS: HashMap<u64, StackTrace> =
    HashMap::with_max_entries(DEFAULT_STACK_ENTRIES, BPF_F_NO_PREALLOC);

/// Per-CPU scratch space for capturing a stack (too big for the BPF stack).
#[map]
pub(crate) static STACK_SCRATCH: PerCpuArray<StackTrace> = PerCpuArray::with_max_entries(1, 0);

/// Bytes of stack `walk_frames` copies first; a walk that needs more copies `WINDOW_BYTES` at a
/// time (a stack that did not fit in the first window is a deep one).
const FIRST_WINDOW: u64 = 512;

/// Bytes of stack `walk_frames` copies at most at a time (a power of two).
pub(crate) const WINDOW_BYTES: usize = 2048;

/// Per-CPU window of user stack for `walk_frames`.
/// One word more than the window, so a frame's second word is always in bounds.
#[map]
pub(crate) static STACK_WINDOW: PerCpuArray<[u64; WINDOW_BYTES / 8 + 1]> =
    PerCpuArray::with_max_entries(1, 0);

/// Per CPU, keys known to be in `STACKS`, direct-mapped by the key's low bits: a call site
/// allocating in a loop skips the hash lookup. The agent empties it when it removes stacks
/// of processes it forgot.
#[map]
static STACKS_SEEN: PerCpuArray<[u64; SEEN_STACKS]> = PerCpuArray::with_max_entries(1, 0);

/// How far above the stack pointer a frame may lie: a frame pointer beyond it is not followed.
pub(crate) const MAX_STACK_SPAN: u64 = 64 << 20;

/// Marks a new key in `store_stack`'s and `fp_stack_key`'s results.
pub(crate) const STACK_NEW: u64 = 1 << 63;

/// A learnt stack top is a hint: a page of the stack that is not present (swapped out, or
/// marked for NUMA balancing) also fails a copy, and the top learnt then is too low. Every this
/// many copies the whole length is tried again.
const STACK_TOP_USES: u64 = 1024;

/// Captures the user stack and returns its key in `STACKS` (or `NO_STACK`), and whether the
/// stack is new.
///
/// At a return probe the instruction pointer is the return address in the allocator's caller,
/// so the stack starts at the caller and holds no allocator frame.
#[inline(always)]
pub(crate) fn stack_key(ctx: &RetProbeContext, id: u64) -> (u64, bool) {
    // SAFETY: a read of a global the loader patches.
    let r = if unsafe { core::ptr::read_volatile(&KERNEL_STACKS) } != 0 {
        match STACK_SCRATCH.get_ptr_mut(0) {
            Some(buf) => {
                let frames = kernel_stack(ctx, buf);
                // SAFETY: per-CPU buffer, no other user on this CPU while the program runs.
                unsafe { (*buf).end = unwind_end::NONE };
                store_stack(frames as u64)
            }
            None => {
                count(Counter::StackLost);
                NO_STACK
            }
        }
    } else {
        // SAFETY: the context points at the probed thread's saved registers.
        let (ip, fp, sp) = unsafe {
            let regs = &*ctx.regs;
            (regs.rip, regs.rbp, regs.rsp)
        };
        // SAFETY: a read of a global the loader patches.
        if unsafe { core::ptr::read_volatile(&UNWIND) } == unwind::TABLES {
            table_stack_key(ip, sp, fp, id)
        } else {
            fp_stack_key(ip, fp, sp, id)
        }
    };
    (r & !STACK_NEW, r & STACK_NEW != 0)
}

/// Walks thread `id`'s frame-pointer chain from the given registers and stores the stack: its
/// key, with `STACK_NEW` when new (see `store_stack`). A global function: the verifier checks
/// it once, not at each allocator's return.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn fp_stack_key(ip: u64, fp: u64, sp: u64, id: u64) -> u64 {
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        count(Counter::StackLost);
        return NO_STACK;
    };
    // A chain depends on nothing but the process, its registers and the words it reads.
    let tag = id >> 32 << 32;
    let reused = reused_walk(ip, sp, fp, tag);
    if reused != 0 {
        return reused;
    }
    start_notes(tag, ip, sp, fp, true);
    let (frames, whole) = walk_frames(ip, fp, sp, id, buf);
    // SAFETY: per-CPU buffer, no other user on this CPU while the program runs.
    unsafe { (*buf).end = unwind_end::NONE };
    let key = store_stack(frames as u64);
    if whole && key != NO_STACK {
        let _ = keep_walk(key & !STACK_NEW);
    }
    key
}

/// Stores the first `frames` frames of `STACK_SCRATCH` in `STACKS`: their key (`NO_STACK` if
/// none), with `STACK_NEW` when the stack was not there. A global function, as above.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn store_stack(frames: u64) -> u64 {
    let frames = frames as usize;
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        count(Counter::StackLost);
        return NO_STACK;
    };
    if frames == 0 {
        count(Counter::StackLost);
        return NO_STACK;
    }
    // SAFETY: per-CPU buffer, no other user on this CPU while the program runs.
    let ips = unsafe { &(*buf).ips };
    let mut hash: u64 = frames as u64;
    for (i, ip) in ips.iter().enumerate().take(MAX_STACK_DEPTH) {
        if i >= frames {
            break;
        }
        hash = (hash.rotate_left(5) ^ *ip).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    // Zero is `NO_STACK`; the top bit is `STACK_NEW`.
    let key = (hash | 1) & !STACK_NEW;
    let seen = seen_slot(key);
    if let Some(seen) = &seen
        && **seen == key
    {
        return key;
    }
    let known = if STACKS.get_ptr(&key).is_some() {
        key
    } else {
        // SAFETY: as above.
        let trace = unsafe { &*buf };
        match STACKS.insert(&key, trace, BPF_NOEXIST as u64) {
            Ok(()) => key | STACK_NEW,
            // Another CPU inserted the same stack meanwhile.
            Err(-17) => key,
            Err(_) => {
                count(Counter::StackLost);
                return NO_STACK;
            }
        }
    };
    if let Some(seen) = seen {
        *seen = key;
    }
    known
}

/// This CPU's `STACKS_SEEN` slot for `key`.
#[inline(always)]
fn seen_slot(key: u64) -> Option<&'static mut u64> {
    STACKS_SEEN
        .get_ptr_mut(0)
        // SAFETY: this CPU's value; no other user while the program runs.
        // (The key's low bit is always set.)
        .and_then(|seen| unsafe { (*seen).get_mut((key >> 1) as usize % SEEN_STACKS) })
}

/// Whether `key` is one this CPU knows to be in `STACKS`: the agent empties that knowledge
/// when it removes stacks, so a key remembered elsewhere is checked here before reuse.
#[inline(always)]
pub(crate) fn known_stack(key: u64) -> bool {
    seen_slot(key).is_some_and(|seen| *seen == key)
}

/// The kernel's user stack walk into `buf`; the number of frames.
#[inline(always)]
fn kernel_stack(ctx: &RetProbeContext, buf: *mut StackTrace) -> usize {
    // SAFETY: the helper writes at most `size` bytes into the per-CPU buffer and zero-fills the
    // rest.
    let len = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            buf.cast(),
            (MAX_STACK_DEPTH * 8) as u32,
            BPF_F_USER_STACK as u64,
        )
    };
    if len <= 0 { 0 } else { len as usize / 8 }
}

/// Follows the frame-pointer chain from the probed thread's registers (`ip`, `fp`, `sp`) into
/// `buf` (the frames, then a zero when there is room); the number of frames, and whether the
/// chain ended by itself (not at a read that failed). Each word read is noted for `reuse`.
///
/// A link is followed only when it points into the stack above the previous frame (8-aligned,
/// at most `MAX_STACK_SPAN` above the stack pointer): the chain's end (a zero, or a register
/// a function without frame pointers used for something else) stops the walk without a read,
/// where the kernel's walker reads it and takes a fault.
#[inline(always)]
pub(crate) fn walk_frames(
    mut ip: u64,
    mut fp: u64,
    sp: u64,
    id: u64,
    buf: *mut StackTrace,
) -> (usize, bool) {
    let Some(window) = STACK_WINDOW.get_ptr_mut(0) else {
        return (0, false);
    };
    let high = sp.saturating_add(MAX_STACK_SPAN);
    let mut low = sp;
    // The copied window of stack: its start, and the last offset in it where a frame's two
    // words fit. Nothing copied yet: an offset no frame has.
    let mut base = 0;
    let mut last = 0;
    let mut copied = false;
    // SAFETY: per-CPU buffer, no other user on this CPU while the program runs. The window is
    // read through its pointer: `copy_window` writes it.
    let ips = unsafe { &mut (*buf).ips };
    let mut frames = 0;
    let mut whole = true;
    for slot in ips.iter_mut() {
        if ip == 0 {
            break;
        }
        *slot = ip;
        frames += 1;
        if fp < low || fp > high || fp & 7 != 0 {
            break;
        }
        let mut off = fp.wrapping_sub(base);
        if !copied || off > last {
            // One copy serves the next frames too: a helper call costs about as much as
            // copying a kilobyte.
            let len = copy_window(fp, id, u64::from(copied));
            if !(16..=WINDOW_BYTES as u64).contains(&len) {
                whole = false;
                break;
            }
            last = len - 16;
            base = fp;
            off = 0;
            copied = true;
        }
        // The mask keeps the verifier's view of the index small (the comparisons above keep
        // it in the copied part).
        let i = (off / 8) as usize & (WINDOW_BYTES / 8 - 1);
        // SAFETY: as above; `i + 1` is within the window's one extra word.
        let at = base + off;
        (ip, fp) = unsafe { ((*window)[i + 1], (*window)[i]) };
        note(at, fp);
        note(at + 8, ip);
        low = at + 16;
    }
    if let Some(end) = ips.get_mut(frames) {
        *end = 0;
    }
    (frames, whole)
}

/// Copies a window of thread `id`'s stack from `fp` into `STACK_WINDOW`: `FIRST_WINDOW` bytes for
/// a walk's first window (`more` 0), else `WINDOW_BYTES`. Returns the length copied, 0 if not
/// even a frame's two words could be.
///
/// A window running past the top of the stack faults (about a microsecond), so the thread's
/// stack top is learnt as in `dwarf::copy_stack_to_top` and windows end there: after a fault the
/// copy ends at the page boundary below, and when that works the boundary is the top
/// (re-checked every `STACK_TOP_USES` windows it shortened, as a page below the top may just not
/// have been present). Failing that, the frame's two words alone. A first window that fits is
/// copied without looking the hints up (one that does not, because an allocating frame lies
/// within `FIRST_WINDOW` of the top, costs its fault every time, as it did before hints). A global
/// function: the walk's verification does not follow the branches here.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn copy_window(fp: u64, id: u64, more: u64) -> u64 {
    let Some(window) = STACK_WINDOW.get_ptr_mut(0) else {
        return 0;
    };
    let dst: *mut u8 = window.cast();
    if more == 0 && copy_stack(dst, FIRST_WINDOW as u32, fp) {
        return FIRST_WINDOW;
    }
    let want = if more == 0 {
        FIRST_WINDOW
    } else {
        WINDOW_BYTES as u64
    };
    let hints = thread_hints(id);
    let end = end_at_top(hints, fp, fp.saturating_add(want));
    let len = end.saturating_sub(fp).min(WINDOW_BYTES as u64);
    if len >= 16 && copy_stack(dst, len as u32, fp) {
        return len;
    }
    let below = (end.saturating_sub(1) & !4095)
        .saturating_sub(fp)
        .min(WINDOW_BYTES as u64);
    if below >= 16 && below < len && copy_stack(dst, below as u32, fp) {
        learn_top(hints, fp + below);
        return below;
    }
    if copy_stack(dst, 16, fp) { 16 } else { 0 }
}

/// Copies `size` bytes of user stack from `sp` into `dst`; whether it worked.
#[inline(always)]
pub(crate) fn copy_stack(dst: *mut u8, size: u32, sp: u64) -> bool {
    // SAFETY: the helper checks the user access and writes at most `size` bytes, which the
    // caller guarantees fit in `dst`.
    unsafe { bpf_probe_read_user_raw(dst.cast(), size, sp as *const core::ffi::c_void) == 0 }
}

/// `end`, the end of a read of stack from `start`, capped at the thread's learnt stack top when
/// that lies in between. A top used `STACK_TOP_USES` times is forgotten instead: the whole
/// length is tried again, and the top learnt afresh if it faults.
#[inline(always)]
pub(crate) fn end_at_top(hints: Option<*mut ThreadHints>, start: u64, end: u64) -> u64 {
    if let Some(h) = hints {
        // SAFETY: this thread's hints (another thread sharing the slot at worst costs a fault).
        unsafe {
            if (*h).stack_top > start && (*h).stack_top < end {
                if (*h).top_uses < STACK_TOP_USES {
                    (*h).top_uses += 1;
                    return (*h).stack_top;
                }
                (*h).stack_top = 0;
            }
        }
    }
    end
}

/// Records `top` as the thread's stack top: a read ending there worked after a longer one
/// faulted.
#[inline(always)]
pub(crate) fn learn_top(hints: Option<*mut ThreadHints>, top: u64) {
    if let Some(h) = hints {
        // SAFETY: as in `end_at_top`.
        unsafe {
            (*h).stack_top = top;
            (*h).top_uses = 0;
        }
    }
}
