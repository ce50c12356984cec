//! `--kernel`: the kernel's own allocations on the traced processes' behalf, from the kmem and
//! percpu tracepoints: `kmalloc`/`kfree`, slab cache objects, pages and per-CPU areas.
//!
//! An allocation counts when the current process is traced; its stack is the kernel's stack
//! (innermost) followed by the user stack of the task, both in one `STACKS` entry. Its address
//! goes into `KMEM_LIVE` with the owning process, so a free from any context (an RCU callback,
//! a kworker, another process) is matched by address and reported for the owner; frees of
//! addresses not in the map (allocated before attach, or not on a traced process's behalf) are
//! ignored. Field offsets come from the agent (`KMEM`), read from tracefs.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_current_pid_tgid, bpf_get_stack},
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use memprof_common::{
    AllocEvent, AllocFn, Counter, DEFAULT_KMEM_ENTRIES, EventKind, FreeEvent, KmemFields,
    MAX_STACK_DEPTH, MIGRATE_MOVABLE, NO_STACK, PAGE_TAG, PERCPU_TAG, unwind_end,
};

use crate::{
    KMEM,
    emit::{count, emit, emit_with, header},
    filter::traced_thread,
    stack::{STACK_NEW, STACK_SCRATCH, store_stack},
};

/// The traced processes' live kernel blocks: (tagged) address to owning process.
#[map]
static KMEM_LIVE: HashMap<u64, u32> = HashMap::with_max_entries(DEFAULT_KMEM_ENTRIES, 0);

/// Kernel frames kept at most; the user frames take the rest of the stack.
const KERNEL_FRAMES: usize = 63;

/// User frames kept at most (`KERNEL_FRAMES + USER_FRAMES == MAX_STACK_DEPTH`).
const USER_FRAMES: usize = MAX_STACK_DEPTH - KERNEL_FRAMES;

#[inline(always)]
fn fields() -> KmemFields {
    // SAFETY: a read of a global the loader patches.
    unsafe { core::ptr::read_volatile(&KMEM) }
}

/// Reads the field at `off` of the tracepoint's record (0 when the read fails).
#[inline(always)]
fn field<T: Default>(ctx: &TracePointContext, off: u32) -> T {
    // SAFETY: the helper checks the read against the record.
    unsafe { ctx.read_at::<T>(off as usize).unwrap_or_default() }
}

/// The kernel stack then the task's user stack, stored in `STACKS`: its key (or `NO_STACK`),
/// with `STACK_NEW` when new.
#[inline(always)]
fn kernel_stack_key(ctx: &TracePointContext) -> u64 {
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        count(Counter::StackLost);
        return NO_STACK;
    };
    // SAFETY: the helper writes at most the given size into the per-CPU buffer.
    let klen = unsafe { bpf_get_stack(ctx.as_ptr(), buf.cast(), (KERNEL_FRAMES * 8) as u32, 0) };
    let kernel = if klen <= 0 {
        0
    } else {
        (klen as usize / 8) & 63
    };
    // SAFETY: `kernel` is at most 63, so the user part (`USER_FRAMES` words from there) ends
    // within the buffer's `MAX_STACK_DEPTH` frames.
    let ulen = unsafe {
        let at = (*buf).ips.as_mut_ptr().add(kernel);
        bpf_get_stack(
            ctx.as_ptr(),
            at.cast(),
            (USER_FRAMES * 8) as u32,
            BPF_F_USER_STACK as u64,
        )
    };
    let user = if ulen <= 0 {
        0
    } else {
        (ulen as usize / 8) & 127
    };
    let frames = (kernel + user).min(MAX_STACK_DEPTH);
    // SAFETY: per-CPU buffer, no other user on this CPU while the program runs.
    unsafe {
        if let Some(end) = (*buf).ips.get_mut(frames) {
            *end = 0;
        }
        (*buf).end = unwind_end::NONE;
    }
    store_stack(frames as u64)
}

/// A kernel block of `size` bytes at (tagged) `addr` for the current process, if traced.
#[inline(always)]
fn allocated(ctx: &TracePointContext, func: AllocFn, addr: u64, size: u64) {
    if addr == 0 {
        return;
    }
    let Some(id) = traced_thread() else {
        return;
    };
    if KMEM_LIVE.insert(&addr, &((id >> 32) as u32), 0).is_err() {
        count(Counter::KmemFull);
        return;
    }
    let stack = kernel_stack_key(ctx);
    // A new stack wakes the agent, to read the process's address space while it exists.
    emit_with(
        AllocEvent {
            header: header(EventKind::Alloc, func as u32, id),
            addr,
            size,
            stack: stack & !STACK_NEW,
            py_stack: NO_STACK,
        },
        stack & STACK_NEW != 0,
    );
}

/// A kernel block at (tagged) `addr` freed, by whatever context: reported for its owner when
/// it was one of the traced processes' blocks.
#[inline(always)]
fn freed(func: AllocFn, addr: u64) {
    // SAFETY: the map's value is read once, then the entry removed.
    let Some(owner) = (unsafe { KMEM_LIVE.get(&addr) }).copied() else {
        return;
    };
    if KMEM_LIVE.remove(&addr).is_err() {
        // Another CPU took it first.
        return;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    emit(FreeEvent {
        header: header(
            EventKind::Free,
            func as u32,
            (owner as u64) << 32 | tid as u64,
        ),
        addr,
    });
}

#[inline(always)]
fn ready(f: &KmemFields) -> bool {
    f.ready != 0
}

/// An allocation whose record has its pointer at `ptr` and its size at `bytes`.
#[inline(always)]
fn allocated_at(ctx: &TracePointContext, func: AllocFn, ptr: u32, bytes: u32) {
    let (ptr, bytes): (u64, u64) = (field(ctx, ptr), field(ctx, bytes));
    allocated(ctx, func, ptr, bytes);
}

#[tracepoint]
pub fn kmem_kmalloc(ctx: TracePointContext) -> u32 {
    let f = fields();
    if ready(&f) {
        allocated_at(&ctx, AllocFn::Kmalloc, f.kmalloc_ptr, f.kmalloc_bytes);
    }
    0
}

#[tracepoint]
pub fn kmem_kfree(ctx: TracePointContext) -> u32 {
    let f = fields();
    if ready(&f) {
        freed(AllocFn::Kmalloc, field(&ctx, f.kfree_ptr));
    }
    0
}

#[tracepoint]
pub fn kmem_cache_alloc(ctx: TracePointContext) -> u32 {
    let f = fields();
    if ready(&f) {
        allocated_at(
            &ctx,
            AllocFn::KmemCache,
            f.cache_alloc_ptr,
            f.cache_alloc_bytes,
        );
    }
    0
}

#[tracepoint]
pub fn kmem_cache_free(ctx: TracePointContext) -> u32 {
    let f = fields();
    if ready(&f) {
        freed(AllocFn::KmemCache, field(&ctx, f.cache_free_ptr));
    }
    0
}

/// A page's made-up address (see `PAGE_TAG`).
#[inline(always)]
fn page_addr(pfn: u64) -> u64 {
    PAGE_TAG | (pfn << 12) & !PAGE_TAG
}

/// Pages of the movable type become the process's own (its RSS) and are left out.
#[tracepoint]
pub fn kmem_page_alloc(ctx: TracePointContext) -> u32 {
    let f = fields();
    if ready(&f) {
        let migratetype: i32 = field(&ctx, f.page_alloc_migratetype);
        if migratetype == MIGRATE_MOVABLE {
            return 0;
        }
        let pfn: u64 = field(&ctx, f.page_alloc_pfn);
        let order: u32 = field(&ctx, f.page_alloc_order);
        // A pfn of -1 is a failed allocation.
        if pfn != u64::MAX && order < 32 {
            allocated(&ctx, AllocFn::Page, page_addr(pfn), 4096u64 << order);
        }
    }
    0
}

#[tracepoint]
pub fn kmem_page_free(ctx: TracePointContext) -> u32 {
    let f = fields();
    if ready(&f) {
        let pfn: u64 = field(&ctx, f.page_free_pfn);
        freed(AllocFn::Page, page_addr(pfn));
    }
    0
}

#[tracepoint]
pub fn percpu_alloc(ctx: TracePointContext) -> u32 {
    let f = fields();
    if ready(&f) {
        let ptr: u64 = field(&ctx, f.percpu_alloc_ptr);
        let bytes: u64 = field(&ctx, f.percpu_alloc_bytes);
        if ptr != 0 {
            allocated(&ctx, AllocFn::Percpu, PERCPU_TAG | ptr & !PERCPU_TAG, bytes);
        }
    }
    0
}

#[tracepoint]
pub fn percpu_free(ctx: TracePointContext) -> u32 {
    let f = fields();
    if ready(&f) {
        let ptr: u64 = field(&ctx, f.percpu_free_ptr);
        if ptr != 0 {
            freed(AllocFn::Percpu, PERCPU_TAG | ptr & !PERCPU_TAG);
        }
    }
    0
}
