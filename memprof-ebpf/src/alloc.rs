//! The allocator programs: one entry program for every probed function (`free`, `munmap` and
//! the libc mapping calls included), told apart by the attach cookie, and the one return
//! program every allocating function shares, which records the block with its stack. Each
//! comes twice, for classic uprobes and for multi-uprobe links (the section decides which
//! attach the loader uses); the agent loads one pair.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_attach_cookie, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use aya_log_ebpf::trace;
use memprof_common::{
    AllocEvent, AllocFn, EventKind, FreeEvent, PyFreeEvent, RemapEvent, UnmapEvent, cookie,
    session, unwind,
};

use crate::{
    PY_FREES, UNWIND,
    calls::{
        Inflight, OLD_SAMPLED_FLAG, SAMPLED_FLAG, Session, call_state, enter, enter_session,
        in_allocator_text, in_flight, leave, remember_sampled, sample_mean, take_sampled,
    },
    dwarf::emit_alloc_stack,
    emit::{emit, emit_with, header},
    filter::{floor, traced_thread},
    python::py_stack,
    stack::stack_key,
    tables::STACK_STALE,
};

/// `mmap`'s flag for a mapping backed by no file, and its return value on failure.
pub(crate) const MAP_ANONYMOUS: u64 = 0x20;
const MAP_FAILED: u64 = u64::MAX;

/// ABI argument `n` of the probed call: from its register, or from the register placement
/// found it copied to (the cookie says, see `memprof_common::cookie`).
#[inline(always)]
pub(crate) fn arg(ctx: &ProbeContext, cookie: u64, n: usize) -> u64 {
    let loc = cookie::arg_reg(cookie, n) as usize;
    if loc == 0 {
        return ctx.arg::<u64>(n).unwrap_or(0);
    }
    // Each register is loaded at its own constant offset (volatile, so the loads are not
    // merged into one at a computed offset of the context, which the verifier refuses), then
    // picked by value.
    // SAFETY: the program's own register context.
    let regs = unsafe { &*ctx.regs };
    let r = |v: &u64| unsafe { core::ptr::read_volatile(v) };
    let values = [
        r(&regs.rdi),
        r(&regs.rsi),
        r(&regs.rdx),
        r(&regs.rcx),
        r(&regs.r8),
        r(&regs.r9),
        r(&regs.rax),
        r(&regs.r10),
        r(&regs.r11),
    ];
    match values.get(loc - 1) {
        Some(v) => *v,
        None => 0,
    }
}

#[inline(always)]
fn emit_alloc(ctx: &RetProbeContext, kind: EventKind, func: u32, id: u64, addr: u64, size: u64) {
    if kind as u16 == EventKind::Alloc as u16 && !remember_sampled(id, addr) {
        if func == AllocFn::Realloc as u32 || func == AllocFn::Reallocarray as u32 {
            // The provisional free of a sampled old block is settled without a new block.
            emit_free(EventKind::ReallocSettled, func, id, 0);
        }
        return;
    }
    // SAFETY: a read of a global the loader patches.
    if unsafe { core::ptr::read_volatile(&UNWIND) } == unwind::DWARF {
        emit_alloc_stack(
            ctx,
            u64::from(kind == EventKind::Mmap) << 32 | u64::from(func),
            id,
            addr,
            size,
        );
        return;
    }
    let (stack, new_stack) = stack_key(ctx, id);
    if stack == STACK_STALE {
        emit_alloc_stack(
            ctx,
            u64::from(kind == EventKind::Mmap) << 32 | u64::from(func),
            id,
            addr,
            size,
        );
        return;
    }
    let (py_stack, new_py) = py_stack(id);
    emit_with(
        AllocEvent {
            header: header(kind, func, id),
            addr,
            size,
            stack,
            py_stack,
        },
        new_stack || new_py,
    );
}

#[inline(always)]
fn emit_free(kind: EventKind, func: u32, id: u64, addr: u64) {
    // With Python phases, a free carries the freeing thread's Python frames: whether it
    // happened inside a phase is the agent's to tell.
    // SAFETY: a read of a global the loader patches.
    if kind as u16 == EventKind::Free as u16 && unsafe { core::ptr::read_volatile(&PY_FREES) } != 0
    {
        let (py_stack, new_py) = py_stack(id);
        emit_with(
            PyFreeEvent {
                header: header(EventKind::PyFree, func, id),
                addr,
                py_stack,
            },
            new_py,
        );
        return;
    }
    emit(FreeEvent {
        header: header(kind, func, id),
        addr,
    });
}

// ---- one entry program for every probed function; the attach cookie says which ----

/// The entry of a probed function: the attach cookie is its `AllocFn` (what its arguments
/// mean), so one program, and one link per object, serves every entry point.
#[inline(always)]
fn entry(ctx: &ProbeContext) {
    if floor() {
        return;
    }
    // SAFETY: the helper reads the cookie of the link that ran this program.
    let c = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let func = cookie::func(c);
    let argn = |n: usize| arg(ctx, c, n);
    // Match on raw values: `AllocFn::from_u32` has a bounds check whose panic path the verifier
    // rejects.
    const MALLOC: u32 = AllocFn::Malloc as u32;
    const VALLOC: u32 = AllocFn::Valloc as u32;
    const PVALLOC: u32 = AllocFn::Pvalloc as u32;
    const CALLOC: u32 = AllocFn::Calloc as u32;
    const MEMALIGN: u32 = AllocFn::Memalign as u32;
    const ALIGNED_ALLOC: u32 = AllocFn::AlignedAlloc as u32;
    const POSIX_MEMALIGN: u32 = AllocFn::PosixMemalign as u32;
    const REALLOC: u32 = AllocFn::Realloc as u32;
    const REALLOCARRAY: u32 = AllocFn::Reallocarray as u32;
    const FREE: u32 = AllocFn::Free as u32;
    const MMAP: u32 = AllocFn::Mmap as u32;
    const MUNMAP: u32 = AllocFn::Munmap as u32;
    const MREMAP: u32 = AllocFn::Mremap as u32;
    let (func, size, a, b) = match func {
        MALLOC => (AllocFn::Malloc, argn(0), 0, 0),
        VALLOC => (AllocFn::Valloc, argn(0), 0, 0),
        PVALLOC => (AllocFn::Pvalloc, argn(0), 0, 0),
        CALLOC => (AllocFn::Calloc, argn(0).wrapping_mul(argn(1)), 0, 0),
        MEMALIGN => (AllocFn::Memalign, argn(1), 0, 0),
        ALIGNED_ALLOC => (AllocFn::AlignedAlloc, argn(1), 0, 0),
        POSIX_MEMALIGN => (AllocFn::PosixMemalign, argn(2), argn(0), 0),
        MMAP => (AllocFn::Mmap, argn(1), argn(3), 0),
        MREMAP => (AllocFn::Mremap, argn(2), argn(0), argn(1)),
        REALLOC => return realloc_common(AllocFn::Realloc, argn(0), argn(1)),
        REALLOCARRAY => return reallocarray(argn(0), argn(1), argn(2)),
        FREE => return free(argn(0)),
        MUNMAP => return munmap(argn(0), argn(1)),
        _ => return,
    };
    let _ = enter(func, size, a, b);
}

// ---- uprobe sessions: entry and return in one program, the return skipped when unneeded ----

const FREE_FN: u32 = AllocFn::Free as u32;
const MUNMAP_FN: u32 = AllocFn::Munmap as u32;

/// `bpf_session_is_return()`, through a placeholder the agent rewrites (`memprof_common::
/// session`).
#[inline(always)]
fn session_is_return() -> bool {
    // SAFETY: a placeholder helper id; the agent turns the call into one of the kfunc, which
    // takes no argument and returns a C bool (only its low byte is defined).
    let f: unsafe extern "C" fn() -> u64 =
        unsafe { core::mem::transmute(session::IS_RETURN as usize) };
    unsafe { f() & 0xff != 0 }
}

/// Every probed function in one uprobe session link per object and process: the entry half
/// records the call (as `entry` does) and returns `RUN_RETURN` only when the return half has
/// something to record; nested calls, frees and, with sampling, unsampled calls skip it, which
/// saves the return's trap. Loaded by the agent itself (aya has no session attach): the section
/// name only makes aya's parser accept the object, and aya never loads it.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe.multi/alloc_session")]
pub fn alloc_session(ctx: *mut core::ffi::c_void) -> i32 {
    if session_is_return() {
        exit(&RetProbeContext::new(ctx));
        return session::RUN_RETURN;
    }
    session_entry(&ProbeContext::new(ctx))
}

#[inline(always)]
fn session_entry(ctx: &ProbeContext) -> i32 {
    // SAFETY: the helper reads the cookie of the link that ran this program.
    let c = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    if floor() {
        // The floor of a session: both halves of the functions that return something.
        return if matches!(cookie::func(c), FREE_FN | MUNMAP_FN) {
            session::SKIP_RETURN
        } else {
            session::RUN_RETURN
        };
    }
    let argn = |n: usize| arg(ctx, c, n);
    const MALLOC: u32 = AllocFn::Malloc as u32;
    const VALLOC: u32 = AllocFn::Valloc as u32;
    const PVALLOC: u32 = AllocFn::Pvalloc as u32;
    const CALLOC: u32 = AllocFn::Calloc as u32;
    const MEMALIGN: u32 = AllocFn::Memalign as u32;
    const ALIGNED_ALLOC: u32 = AllocFn::AlignedAlloc as u32;
    const POSIX_MEMALIGN: u32 = AllocFn::PosixMemalign as u32;
    const REALLOC: u32 = AllocFn::Realloc as u32;
    const REALLOCARRAY: u32 = AllocFn::Reallocarray as u32;
    const FREE: u32 = AllocFn::Free as u32;
    const MMAP: u32 = AllocFn::Mmap as u32;
    const MUNMAP: u32 = AllocFn::Munmap as u32;
    const MREMAP: u32 = AllocFn::Mremap as u32;
    // The arguments of the call to keep, picked per function; one `enter_session` for all
    // of them keeps its code (and the verifier's work) single.
    let (func, size, a, b) = match cookie::func(c) {
        MALLOC => (AllocFn::Malloc, argn(0), 0, 0),
        VALLOC => (AllocFn::Valloc, argn(0), 0, 0),
        PVALLOC => (AllocFn::Pvalloc, argn(0), 0, 0),
        CALLOC => (AllocFn::Calloc, argn(0).wrapping_mul(argn(1)), 0, 0),
        MEMALIGN => (AllocFn::Memalign, argn(1), 0, 0),
        ALIGNED_ALLOC => (AllocFn::AlignedAlloc, argn(1), 0, 0),
        POSIX_MEMALIGN => (AllocFn::PosixMemalign, argn(2), argn(0), 0),
        REALLOC => return realloc_session(AllocFn::Realloc, argn(0), argn(1)),
        REALLOCARRAY => {
            return realloc_session(
                AllocFn::Reallocarray,
                argn(0),
                reallocarray_size(argn(1), argn(2)),
            );
        }
        FREE => {
            free(argn(0));
            return session::SKIP_RETURN;
        }
        MUNMAP => {
            munmap(argn(0), argn(1));
            return session::SKIP_RETURN;
        }
        MMAP => {
            if allocators_own_mapping(ctx, argn(3)) {
                return session::SKIP_RETURN;
            }
            (AllocFn::Mmap, argn(1), argn(3), 0)
        }
        MREMAP => (AllocFn::Mremap, argn(2), argn(0), argn(1)),
        _ => return session::SKIP_RETURN,
    };
    let decided = enter_session(func, size, a, b, |_| 0);
    match decided {
        Session::Record(_) => session::RUN_RETURN,
        Session::Skip => session::SKIP_RETURN,
    }
}

/// A realloc in a session: recorded when its new block is sampled, or its old block was
/// (whose free is announced now, provisionally, as `realloc_common` does).
#[inline(always)]
fn realloc_session(func: AllocFn, old: u64, size: u64) -> i32 {
    let mut announce = false;
    let decided = enter_session(func, size, old, 0, |id| {
        if old == 0 {
            return 0;
        }
        if sample_mean() == 0 {
            announce = true;
            return 0;
        }
        if take_sampled(id, old) {
            announce = true;
            return OLD_SAMPLED_FLAG;
        }
        0
    });
    match decided {
        Session::Record(id) => {
            if announce {
                let tag = if size == 0 { AllocFn::Free } else { func };
                emit_free(EventKind::Free, tag as u32, id, old);
            }
            session::RUN_RETURN
        }
        Session::Skip => session::SKIP_RETURN,
    }
}

/// With sampling, whether an anonymous mapping is one an allocator makes for itself (an arena,
/// an extent) inside a call that keeps no state: its caller lies in an allocator object's code
/// (`ALLOC_TEXT`). Thread stacks (`MAP_STACK`) are the process's own.
#[inline(always)]
fn allocators_own_mapping(ctx: &ProbeContext, flags: u64) -> bool {
    const MAP_STACK: u64 = 0x20000;
    if sample_mean() == 0 || flags & MAP_ANONYMOUS == 0 || flags & MAP_STACK != 0 {
        return false;
    }
    let Some(id) = traced_thread() else {
        return false;
    };
    if in_flight(id) {
        return false;
    }
    // SAFETY: the program's own register context; the probe sits where the stack pointer is
    // still the entry's (placement), so the return address is at its top.
    let sp = unsafe { (*ctx.regs).rsp };
    // SAFETY: a user read through the helper, which checks the access.
    let Ok(caller) = (unsafe { bpf_probe_read_user(sp as *const u64) }) else {
        return false;
    };
    in_allocator_text((id >> 32) as u32, caller)
}

/// Entry probes attached one per function (classic uprobes, the fallback).
#[uprobe]
pub fn alloc_entry(ctx: ProbeContext) -> u32 {
    entry(&ctx);
    0
}

/// Entry probes attached as one multi-uprobe link per object and process.
#[uprobe(multi)]
pub fn alloc_entry_multi(ctx: ProbeContext) -> u32 {
    entry(&ctx);
    0
}

#[inline(always)]
fn reallocarray(old: u64, nmemb: u64, size: u64) {
    realloc_common(AllocFn::Reallocarray, old, reallocarray_size(nmemb, size));
}

/// reallocarray's size. On overflow the call fails without touching the block; size 0 would
/// mean "free". No `checked_mul` (nor a division check, which LLVM folds back into one): both
/// lower to a 128-bit multiply the BPF backend lacks. A factor of 2^32 or more with a nonzero
/// other factor cannot be satisfied by any allocator, so it is reported as the largest size.
#[inline(always)]
fn reallocarray_size(nmemb: u64, size: u64) -> u64 {
    if nmemb == 0 || size == 0 {
        0
    } else if nmemb >> 32 != 0 || size >> 32 != 0 {
        u64::MAX
    } else {
        nmemb * size
    }
}

/// realloc(p, n) = free(p) + alloc(n). The free is announced at entry, before the allocator can
/// hand the block to another thread. With n > 0 it is provisional (tagged with the realloc): the
/// agent settles it at the return, or restores the block on `ReallocFailed`. realloc(p, 0)
/// frees p whatever it returns, so that free is final (tagged `free`).
#[inline(always)]
fn realloc_common(func: AllocFn, old: u64, size: u64) {
    if let Some(id) = enter(func, size, old, 0)
        && old != 0
        && old_block_reported(id, old)
    {
        let tag = if size == 0 { AllocFn::Free } else { func };
        emit_free(EventKind::Free, tag as u32, id, old);
    }
}

/// With sampling, a realloc's old block is announced only if it was sampled; the call's state
/// remembers that for the return.
#[inline(always)]
fn old_block_reported(id: u64, old: u64) -> bool {
    if sample_mean() == 0 {
        return true;
    }
    if !take_sampled(id, old) {
        return false;
    }
    if let Some(state) = call_state(id) {
        // SAFETY: the state belongs to this thread; only this thread touches it.
        unsafe { (*state).flags |= OLD_SAMPLED_FLAG };
    }
    true
}

/// The return of an unsampled call: nothing to record, except the fate of a realloc's sampled
/// old block, whose free was announced at entry.
#[inline(always)]
fn unsampled_return(id: u64, state: &Inflight, ret: u64) {
    if state.flags & OLD_SAMPLED_FLAG == 0 || state.size == 0 {
        return;
    }
    if ret != 0 {
        emit_free(EventKind::ReallocSettled, state.func, id, state.arg);
    } else if remember_sampled(id, state.arg) {
        emit_free(EventKind::ReallocFailed, state.func, id, state.arg);
    }
}

/// A failed realloc's old block lives on: with sampling, only a sampled one was announced, and
/// it is remembered again.
#[inline(always)]
fn restore_old(id: u64, state: &Inflight) -> bool {
    if sample_mean() == 0 {
        return true;
    }
    state.flags & OLD_SAMPLED_FLAG != 0 && remember_sampled(id, state.arg)
}

/// `free` has no return probe: the block is released at entry, unless the call is made by an
/// allocator in flight on this thread (which owns the accounting).
#[inline(always)]
fn free(addr: u64) {
    if addr == 0 {
        return;
    }
    if let Some(id) = traced_thread()
        && !in_flight(id)
        && take_sampled(id, addr)
    {
        emit_free(EventKind::Free, AllocFn::Free as u32, id, addr);
    }
}

/// `munmap` outside an allocator call: the range leaves the process's mappings.
#[inline(always)]
fn munmap(addr: u64, len: u64) {
    if let Some(id) = traced_thread()
        && !in_flight(id)
    {
        emit(UnmapEvent {
            header: header(EventKind::Munmap, AllocFn::Munmap as u32, id),
            addr,
            len,
        });
    }
}

// ---- the one return probe shared by every allocator ----

/// Return probes attached one per function (classic uretprobes, the fallback).
#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    exit(&ctx);
    0
}

/// Return probes attached as one multi-uprobe link per object and process.
#[uretprobe(multi)]
pub fn alloc_return_multi(ctx: RetProbeContext) -> u32 {
    exit(&ctx);
    0
}

/// The return of an allocating function: records its block.
#[inline(always)]
fn exit(ctx: &RetProbeContext) {
    let Some((id, state)) = leave() else {
        return;
    };
    trace!(
        ctx,
        "tid {}: {} of {} bytes returns {:x}",
        id as u32,
        state.func,
        state.size,
        ctx.ret::<u64>()
    );
    let ret: u64 = ctx.ret();
    if state.flags & SAMPLED_FLAG == 0 {
        unsampled_return(id, &state, ret);
        return;
    }
    // Match on the raw value: `AllocFn::from_u32` has a bounds check whose panic path the
    // verifier rejects.
    const REALLOC: u32 = AllocFn::Realloc as u32;
    const REALLOCARRAY: u32 = AllocFn::Reallocarray as u32;
    const POSIX_MEMALIGN: u32 = AllocFn::PosixMemalign as u32;
    const MMAP: u32 = AllocFn::Mmap as u32;
    const MREMAP: u32 = AllocFn::Mremap as u32;
    let func = state.func;
    // What the call made, if anything: one `emit_alloc` for every function, so its stack
    // walk is in the program (and before the verifier) once.
    let (kind, addr) = match func {
        REALLOC | REALLOCARRAY => {
            if ret == 0 {
                if state.arg != 0 && state.size != 0 && restore_old(id, &state) {
                    emit_free(EventKind::ReallocFailed, func, id, state.arg);
                }
                return;
            }
            (EventKind::Alloc, ret)
        }
        POSIX_MEMALIGN => {
            // Returns 0 on success and stores the block through the out pointer.
            if ret as u32 != 0 {
                return;
            }
            // SAFETY: reads user memory through the helper, which checks the access.
            match unsafe { bpf_probe_read_user(state.arg as *const u64) } {
                Ok(addr) => (EventKind::Alloc, addr),
                Err(_) => return,
            }
        }
        MMAP => {
            if ret == MAP_FAILED || state.arg & MAP_ANONYMOUS == 0 {
                return;
            }
            (EventKind::Mmap, ret)
        }
        MREMAP => {
            if ret != MAP_FAILED {
                emit(RemapEvent {
                    header: header(EventKind::Mremap, func, id),
                    old_addr: state.arg,
                    old_len: state.arg2,
                    new_addr: ret,
                    new_len: state.size,
                });
            }
            return;
        }
        _ => {
            if ret == 0 {
                return;
            }
            (EventKind::Alloc, ret)
        }
    };
    emit_alloc(ctx, kind, func, id, addr, state.size);
}
