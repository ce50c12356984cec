//! Walks reused: a walk of user stack (with unwind tables or frame pointers) is a function of
//! its first frame's registers and of the words of stack it reads. Each CPU keeps its recent
//! walks with those words; a walk from the same return address and stack pointer (and rbp,
//! where it was used) whose words still hold the same values has the same stack, so one read of
//! the stack and a comparison stand for a walk when a call site allocates in a loop.
//!
//! A walk notes what it reads as it goes (`start_notes`, `note`), and is kept (`keep_walk`)
//! only when it ended where its rows or its chain say: never at a read that failed, whose
//! outcome depends on more than those words.

use core::sync::atomic::{Ordering, compiler_fence};

use aya_ebpf::{macros::map, maps::PerCpuArray};
use memprof_common::Counter;

use crate::{
    emit::count,
    stack::{STACK_WINDOW, WINDOW_BYTES, copy_stack, known_stack},
};

/// Words of stack a kept walk may have read.
const CHECKS: usize = 32;

/// Slots of each CPU's walks (a power of two; a per-CPU value holds at most 32 KiB).
const SLOTS: usize = 64;

/// A walk's first registers and the words of stack it read: its offsets from the first stack
/// pointer, and their values.
#[derive(Clone, Copy)]
#[repr(C)]
struct Notes {
    /// What else the walk depended on: the process, and for table walks the count of mapping
    /// updates before it began.
    tag: u64,
    pc: u64,
    sp: u64,
    /// The first frame's rbp, compared only when the walk used it.
    bp: u64,
    used_bp: u64,
    /// Words read (past `CHECKS`, the walk is not kept).
    checks: u64,
    offs: [u32; CHECKS],
    vals: [u64; CHECKS],
}

/// A kept walk: its notes, and its stack's key in `STACKS` (0: an empty slot).
#[derive(Clone, Copy)]
#[repr(C)]
struct Kept {
    key: u64,
    /// Bytes from `notes.sp` that hold every word read.
    span: u64,
    notes: Notes,
}

/// The walk under way on each CPU.
#[map]
static NOTES: PerCpuArray<Notes> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's kept walks, by first return address and stack pointer.
#[map]
static WALKS: PerCpuArray<[Kept; SLOTS]> = PerCpuArray::with_max_entries(1, 0);

/// `WALKS`' slot for a walk from `pc` and `sp`.
#[inline(always)]
fn slot(pc: u64, sp: u64) -> usize {
    let h = (pc ^ sp.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 57) as usize & (SLOTS - 1)
}

/// Starts this CPU's notes for a walk from these registers; `used_bp` when the walk uses the
/// first frame's rbp whatever it meets (a frame-pointer chain).
#[inline(always)]
pub(crate) fn start_notes(tag: u64, pc: u64, sp: u64, bp: u64, used_bp: bool) {
    if let Some(n) = NOTES.get_ptr_mut(0) {
        // SAFETY: this CPU's value; no other user while the program runs.
        unsafe {
            (*n).tag = tag;
            (*n).pc = pc;
            (*n).sp = sp;
            (*n).bp = bp;
            (*n).used_bp = u64::from(used_bp);
            (*n).checks = 0;
        }
    }
}

/// Notes that the walk read `value` at `addr`.
#[inline(always)]
pub(crate) fn note(addr: u64, value: u64) {
    if let Some(n) = NOTES.get_ptr_mut(0) {
        // SAFETY: as in `start_notes`.
        unsafe {
            let i = (*n).checks;
            if i < CHECKS as u64 {
                (*n).offs[i as usize & (CHECKS - 1)] = addr.wrapping_sub((*n).sp) as u32;
                (*n).vals[i as usize & (CHECKS - 1)] = value;
            }
            (*n).checks = i + 1;
        }
    }
}

/// Notes that the walk used the first frame's rbp.
#[inline(always)]
pub(crate) fn note_first_bp() {
    if let Some(n) = NOTES.get_ptr_mut(0) {
        // SAFETY: as in `start_notes`.
        unsafe { (*n).used_bp = 1 };
    }
}

/// The key of a walk from these registers kept by this CPU whose words of stack still hold the
/// values it read (0 if none), counted. A global function: the verifier checks it once.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn reused_walk(pc: u64, sp: u64, bp: u64, tag: u64) -> u64 {
    let Some(walks) = WALKS.get_ptr(0) else {
        return 0;
    };
    // SAFETY: this CPU's value, read only.
    let k = unsafe { &(*walks)[slot(pc, sp)] };
    // Read once here and again at the end: a program that preempted this one and rewrote the
    // slot meanwhile changed it (see `keep_walk`).
    // SAFETY: an aligned u64 of this CPU's value.
    let key = unsafe { core::ptr::read_volatile(&k.key) };
    let n = &k.notes;
    if key == 0
        || n.tag != tag
        || n.pc != pc
        || n.sp != sp
        || (n.used_bp != 0 && n.bp != bp)
        || !known_stack(key)
    {
        return 0;
    }
    let Some(window) = STACK_WINDOW.get_ptr_mut(0) else {
        return 0;
    };
    let span = k.span;
    if span < 8 || span > WINDOW_BYTES as u64 || !copy_stack(window.cast(), span as u32, sp) {
        return 0;
    }
    let checks = n.checks as usize;
    for (i, (off, value)) in n.offs.iter().zip(n.vals.iter()).enumerate() {
        if i >= checks {
            break;
        }
        let off = *off as usize / 8 & (WINDOW_BYTES / 8 - 1);
        // SAFETY: this CPU's window; `off` is within it (the walk kept it under `span`).
        if unsafe { (*window)[off] } != *value {
            return 0;
        }
    }
    // SAFETY: as above.
    if unsafe { core::ptr::read_volatile(&k.key) } != key {
        return 0;
    }
    count(Counter::WalkCached);
    key
}

/// Keeps this CPU's walk just done, whose stack's key is `key`.
#[inline(always)]
pub(crate) fn keep_walk(key: u64) {
    let (Some(notes), Some(walks)) = (NOTES.get_ptr(0), WALKS.get_ptr_mut(0)) else {
        return;
    };
    // SAFETY: this CPU's values; no other user while the program runs.
    unsafe {
        let n = &*notes;
        let checks = n.checks as usize;
        if checks > CHECKS {
            return;
        }
        let mut span = 0;
        for (i, off) in n.offs.iter().enumerate() {
            if i >= checks {
                break;
            }
            span = span.max(u64::from(*off) + 8);
        }
        if span > WINDOW_BYTES as u64 {
            return;
        }
        // The key goes last, and out while the rest changes: a program that preempts this one
        // on this CPU finds the slot empty, never half of two walks.
        let k = &mut (*walks)[slot(n.pc, n.sp)];
        core::ptr::write_volatile(&mut k.key, 0);
        compiler_fence(Ordering::SeqCst);
        k.span = span;
        k.notes = *n;
        compiler_fence(Ordering::SeqCst);
        core::ptr::write_volatile(&mut k.key, key);
    }
}
