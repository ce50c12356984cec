//! Walks reused: a walk of user stack (with unwind tables or frame pointers) is a function of
//! its first frame's registers and of the words of stack it reads. Each CPU keeps its recent
//! walks with those words; a walk from the same return address and stack pointer (and rbp,
//! where it was used) whose words still hold the same values has the same stack, so one read of
//! the stack and a comparison stand for a walk when a call site allocates in a loop.
//!
//! A walk notes what it reads as it goes (`start_notes`, `note`), and is kept (`keep_walk`)
//! only when it ended where its rows or its chain say: never at a read that failed, whose
//! outcome depends on more than those words. A saved rbp a table walk reads is noted as
//! unneeded (`note_unneeded`) until a later row computes an address from it (`need`): in code
//! without frame pointers rbp is an ordinary register, whose saved value (a pointer to this
//! request's data) differs from call to call and would refuse every reuse of the walk.

use core::sync::atomic::{Ordering, compiler_fence};

use aya_ebpf::{macros::map, maps::PerCpuArray};
use memprof_common::Counter;

use crate::{
    NO_WALK_REUSE,
    emit::count,
    stack::{STACK_WINDOW, WINDOW_BYTES, copy_stack, known_stack},
};

/// Words of stack a kept walk may have read. A walk that read more is not kept, even if fewer
/// decided it: on Debian's sqlite3 (100 000 rows and an index) keeping those walks too, up to
/// 64 words, took slots from walks reused more often (303 178 of 509 584 walks reused against
/// 503 127).
const CHECKS: usize = 32;

/// Slots of each CPU's walks (a power of two; a per-CPU value holds at most 32 KiB).
const SLOTS: usize = 64;

/// Reads of stack a kept walk's check may take: each covers the words within `WINDOW_BYTES` of
/// its first one (a deep stack's outer frames lie kilobytes above its inner ones).
const READS: usize = 4;

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
    /// Bit i: word i did not decide the walk (a saved rbp no row used).
    unneeded: u64,
    offs: [u32; CHECKS],
    vals: [u64; CHECKS],
}

/// A kept walk: its notes, the reads that check them, and its stack's key in `STACKS` (0: an
/// empty slot).
#[derive(Clone, Copy)]
#[repr(C)]
struct Kept {
    key: u64,
    /// Each read: its start (offset from `notes.sp`), its length, and the index of the first
    /// word after the ones it covers (the words are in the order of their addresses).
    starts: [u32; READS],
    lens: [u32; READS],
    ends: [u32; READS],
    reads: u64,
    /// The words the walk depended on (`unneeded` 0).
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
            (*n).unneeded = 0;
        }
    }
}

/// Notes that the walk read `value` at `addr`, and used it.
#[inline(always)]
pub(crate) fn note(addr: u64, value: u64) {
    need(note_unneeded(addr, value));
}

/// Notes that the walk read `value` at `addr`, which decides nothing until `need` says so;
/// returns the word's index for `need`.
#[inline(always)]
pub(crate) fn note_unneeded(addr: u64, value: u64) -> u64 {
    let Some(n) = NOTES.get_ptr_mut(0) else {
        return CHECKS as u64;
    };
    // SAFETY: as in `start_notes`.
    unsafe {
        let i = (*n).checks;
        let off = addr.wrapping_sub((*n).sp);
        if off >= 1 << 31 {
            // Below the first stack pointer (or absurdly far): not a walk to keep.
            (*n).checks = CHECKS as u64 + 1;
            return CHECKS as u64;
        }
        if i < CHECKS as u64 {
            (*n).offs[i as usize & (CHECKS - 1)] = off as u32;
            (*n).vals[i as usize & (CHECKS - 1)] = value;
            (*n).unneeded |= 1 << i;
        }
        (*n).checks = i + 1;
        i
    }
}

/// The walk used word `i` (an index `note_unneeded` returned).
#[inline(always)]
pub(crate) fn need(i: u64) {
    if i >= CHECKS as u64 {
        return;
    }
    if let Some(n) = NOTES.get_ptr_mut(0) {
        // SAFETY: as in `start_notes`.
        unsafe { (*n).unneeded &= !(1u64 << (i & (CHECKS as u64 - 1))) };
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
    // SAFETY: a read of a global the loader patches.
    if unsafe { core::ptr::read_volatile(&NO_WALK_REUSE) } != 0 {
        return 0;
    }
    let Some(walks) = WALKS.get_ptr(0) else {
        return 0;
    };
    let at = slot(pc, sp);
    // SAFETY: this CPU's value, read only.
    let k = unsafe { &(*walks)[at] };
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
    // The reads must cover every word noted: checked before any of them is made.
    let reads = (k.reads as usize).min(READS);
    let checks = (n.checks as usize).min(CHECKS);
    if reads == 0 || k.ends[(reads - 1) & (READS - 1)] as usize != checks {
        return 0;
    }
    for r in 0..READS {
        if r >= reads {
            break;
        }
        if check_read(at as u64, r as u64, sp) == 0 {
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

/// Whether the words read `r` of the walk kept in slot `at` covers still hold the values the
/// walk read, for the thread whose stack pointer is `sp` (1) or not (0). A global function:
/// verified once, not for each read of each path through `reused_walk`.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn check_read(at: u64, r: u64, sp: u64) -> u64 {
    let (Some(walks), Some(window)) = (WALKS.get_ptr(0), STACK_WINDOW.get_ptr_mut(0)) else {
        return 0;
    };
    // SAFETY: this CPU's value, read only.
    let k = unsafe { &(*walks)[at as usize & (SLOTS - 1)] };
    let r = r as usize & (READS - 1);
    let (start, len) = (k.starts[r], k.lens[r]);
    if len < 8
        || len > WINDOW_BYTES as u32
        || !copy_stack(window.cast(), len, sp + u64::from(start))
    {
        return 0;
    }
    let first = if r == 0 {
        0
    } else {
        k.ends[(r - 1) & (READS - 1)] as usize
    };
    let end = k.ends[r] as usize;
    for (i, (off, value)) in k.notes.offs.iter().zip(k.notes.vals.iter()).enumerate() {
        if i >= end {
            break;
        }
        if i < first {
            continue;
        }
        let w = off.wrapping_sub(start) as usize / 8 & (WINDOW_BYTES / 8 - 1);
        // SAFETY: this CPU's window; `w` is within the read (`keep_walk` made it so).
        if unsafe { (*window)[w] } != *value {
            return 0;
        }
    }
    1
}

/// Keeps this CPU's walk just done, whose stack's key is `key`: the words it depended on and
/// the reads that cover them. A global function, as above.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn keep_walk(key: u64) -> u64 {
    let (Some(notes), Some(walks)) = (NOTES.get_ptr(0), WALKS.get_ptr_mut(0)) else {
        return 0;
    };
    // SAFETY: this CPU's values; no other user while the program runs.
    unsafe {
        let at = slot((*notes).pc, (*notes).sp);
        let k = &mut (*walks)[at];
        // The key goes out while the rest changes, and back last: a program that preempts
        // this one on this CPU finds the slot empty, never half of two walks.
        core::ptr::write_volatile(&mut k.key, 0);
        compiler_fence(Ordering::SeqCst);
        let kept = keep_words(at as u64);
        if kept == 0 || plan_reads(at as u64, kept) == 0 {
            return 0;
        }
        compiler_fence(Ordering::SeqCst);
        core::ptr::write_volatile(&mut k.key, key);
    }
    1
}

/// Copies this CPU's walk into slot `at`: its registers and the words it depended on. Their
/// count, or 0 if the walk read none or more than `CHECKS`. A global function (verified apart
/// from `plan_reads`: one loop each). The count under way lives in the slot, not in a
/// register: the verifier then meets one state per word instead of one per word and count.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn keep_words(at: u64) -> u64 {
    let (Some(notes), Some(walks)) = (NOTES.get_ptr(0), WALKS.get_ptr_mut(0)) else {
        return 0;
    };
    // SAFETY: this CPU's values; no other user while the program runs.
    unsafe {
        let n = &*notes;
        let k = &mut (*walks)[at as usize & (SLOTS - 1)];
        let checks = n.checks as usize;
        if checks == 0 || checks > CHECKS {
            return 0;
        }
        k.notes.tag = n.tag;
        k.notes.pc = n.pc;
        k.notes.sp = n.sp;
        k.notes.bp = n.bp;
        k.notes.used_bp = n.used_bp;
        k.notes.unneeded = 0;
        core::ptr::write_volatile(&mut k.notes.checks, 0);
        for (i, (off, value)) in n.offs.iter().zip(n.vals.iter()).enumerate() {
            if i >= checks {
                break;
            }
            if n.unneeded >> i & 1 != 0 {
                continue;
            }
            let kept = core::ptr::read_volatile(&k.notes.checks) as usize;
            if kept >= CHECKS {
                return 0;
            }
            k.notes.offs[kept & (CHECKS - 1)] = *off;
            k.notes.vals[kept & (CHECKS - 1)] = *value;
            core::ptr::write_volatile(&mut k.notes.checks, kept as u64 + 1);
        }
        core::ptr::read_volatile(&k.notes.checks)
    }
}

/// Plans the reads that check the `kept` words of slot `at`: each from a word not covered yet
/// to the last word within `WINDOW_BYTES` of it (the words come in the order of their
/// addresses). Their count, or 0 if more than `READS`. A global function, as above; the plan
/// under way lives in the slot, read back at each word, so that the verifier meets one state
/// per word (kept in registers, the reads' bounds made it follow each plan apart: three
/// quarters of all the programs' verification).
#[unsafe(no_mangle)]
#[inline(never)]
pub fn plan_reads(at: u64, kept: u64) -> u64 {
    let Some(walks) = WALKS.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's value; no other user while the program runs. Volatile accesses keep
    // each value in the slot.
    unsafe {
        let k: *mut Kept = &raw mut (*walks)[at as usize & (SLOTS - 1)];
        core::ptr::write_volatile(&raw mut (*k).reads, 0);
        let mut last = 0u32;
        for (i, off) in (*k).notes.offs.iter().enumerate() {
            if i as u64 >= kept {
                break;
            }
            let off = *off;
            let reads = core::ptr::read_volatile(&raw const (*k).reads) as usize;
            let r = reads.wrapping_sub(1) & (READS - 1);
            let start = core::ptr::read_volatile(&raw const (*k).starts[r]);
            if reads > 0 && off >= start && off + 8 - start <= WINDOW_BYTES as u32 {
                let len = core::ptr::read_volatile(&raw const (*k).lens[r]);
                core::ptr::write_volatile(&raw mut (*k).lens[r], len.max(off + 8 - start));
                core::ptr::write_volatile(&raw mut (*k).ends[r], i as u32 + 1);
            } else {
                if reads >= READS || (reads > 0 && off < last) {
                    return 0;
                }
                let r = reads & (READS - 1);
                core::ptr::write_volatile(&raw mut (*k).starts[r], off);
                core::ptr::write_volatile(&raw mut (*k).lens[r], 8);
                core::ptr::write_volatile(&raw mut (*k).ends[r], i as u32 + 1);
                core::ptr::write_volatile(&raw mut (*k).reads, reads as u64 + 1);
            }
            last = off;
        }
        core::ptr::read_volatile(&raw const (*k).reads)
    }
}
