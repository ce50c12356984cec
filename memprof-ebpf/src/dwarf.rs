//! `unwind::DWARF`: an allocation goes out with the caller's registers and a copy of its stack
//! (`AllocStack` records), for the agent to unwind.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_RING_SIZE},
    macros::map,
    maps::PerCpuArray,
    programs::RetProbeContext,
};
use memprof_common::{Counter, EventKind, MAX_STACK_COPY, UnwindEvent};

use crate::{
    STACK_COPY,
    calls::thread_hints,
    emit::{EVENTS, count, header, wakeup},
    python::py_stack,
    stack::{copy_stack, end_at_top, learn_top},
};

/// An `AllocStack` record being built (too big for the BPF stack).
#[repr(C)]
struct StackCopy {
    event: UnwindEvent,
    stack: [u8; MAX_STACK_COPY as usize],
}

/// Per-CPU scratch space for an `AllocStack` record.
#[map]
static COPY_SCRATCH: PerCpuArray<StackCopy> = PerCpuArray::with_max_entries(1, 0);

/// Fewest bytes of stack an `unwind::DWARF` record carries.
const MIN_STACK_COPY: u64 = 512;

/// Copies up to `want` bytes of the calling thread's stack from `sp` into `dst` (which holds
/// `MAX_STACK_COPY`); the length copied, 0 if not even `MIN_STACK_COPY` could be.
///
/// A copy running past the top of the stack faults (and a fault costs about a microsecond), so
/// each thread's stack top is learnt and kept in its `ThreadHints`: copies end at a page boundary
/// one page lower after each fault, and the first that works ends at the top (a mapping ends
/// at a page boundary, and none lies between it and the failed end), unless a page below it
/// was not present; hence `stack::STACK_TOP_USES`.
#[inline(always)]
fn copy_stack_to_top(dst: *mut u8, want: u32, sp: u64, id: u64) -> u32 {
    let hints = thread_hints(id);
    let mut end = end_at_top(
        hints,
        sp,
        sp.saturating_add(u64::from(want.min(MAX_STACK_COPY as u32))) & !7,
    );
    let mut faulted = false;
    for _ in 0..(MAX_STACK_COPY / 4096 + 1) {
        let len = end.saturating_sub(sp);
        if len < MIN_STACK_COPY {
            return 0;
        }
        let len = len.min(MAX_STACK_COPY as u64) as u32;
        if copy_stack(dst, len, sp) {
            if faulted {
                learn_top(hints, end);
            }
            return len;
        }
        faulted = true;
        end = (end - 1) & !4095;
    }
    0
}

/// Whether the ring holds more than half its size of records not yet read.
#[inline(always)]
fn ring_crowded() -> bool {
    EVENTS.query(BPF_RB_AVAIL_DATA as u64) > EVENTS.query(BPF_RB_RING_SIZE as u64) / 2
}

/// An allocation with the caller's registers and a copy of its stack, for the agent to unwind
/// (`unwind::DWARF`). The copy is as large as `STACK_COPY` allows and the stack's mapping
/// holds: a copy running past the top of the stack faults, so smaller ones are tried.
/// Not inlined (one copy for every allocator's return keeps the verifier's work small); at
/// most five arguments, so the mapping flag and `func` share one (`mmap << 32 | func`).
#[inline(never)]
pub(crate) fn emit_alloc_stack(
    ctx: &RetProbeContext,
    mmap_func: u64,
    id: u64,
    addr: u64,
    size: u64,
) {
    let func = mmap_func as u32;
    let mmap = (mmap_func >> 32) as u32;
    let Some(buf) = COPY_SCRATCH.get_ptr_mut(0) else {
        count(Counter::StackLost);
        return;
    };
    // SAFETY: the context points at the probed thread's saved registers.
    let (ip, sp, bp) = unsafe {
        let regs = &*ctx.regs;
        (regs.rip, regs.rsp, regs.rbp)
    };
    // SAFETY: a read of a global the loader patches.
    let want = unsafe { core::ptr::read_volatile(&STACK_COPY) };
    // SAFETY: per-CPU buffer, no other user on this CPU while the program runs.
    let dst = unsafe { (*buf).stack.as_mut_ptr() };
    // A ring more than half full means the agent is behind: the allocation still goes out
    // (its bytes count), without the copy that would make it up to 16 KiB and crowd out the
    // records after it.
    let len = if ring_crowded() {
        0
    } else {
        copy_stack_to_top(dst, want, sp, id)
    };
    if len == 0 {
        count(Counter::StackLost);
    }
    // SAFETY: as above.
    unsafe {
        (*buf).event = UnwindEvent {
            header: header(EventKind::AllocStack, func, id),
            addr,
            size,
            ip,
            sp,
            bp,
            stack_len: len,
            mmap,
            py_stack: 0,
        };
    }
    let (py_stack, new_py) = py_stack(id);
    // SAFETY: as above.
    unsafe { (*buf).event.py_stack = py_stack };
    let total = size_of::<UnwindEvent>() + len as usize;
    if total > size_of::<StackCopy>() {
        return;
    }
    // SAFETY: `total` bytes of the per-CPU buffer, checked above.
    let bytes = unsafe { core::slice::from_raw_parts(buf.cast::<u8>(), total) };
    if EVENTS
        .output::<[u8]>(bytes, wakeup(new_py, total as u64))
        .is_err()
    {
        count(Counter::RingFull);
    }
}
