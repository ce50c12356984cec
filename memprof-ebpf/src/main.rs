//! Kernel programs: uprobes on the target's allocator entry points and uretprobes on their
//! returns, which turn calls into ring-buffer records (see `memprof_common`).
//!
//! Per-thread entry state lives in `INFLIGHT`, keyed by `pid_tgid`. The outermost allocator call
//! on a thread owns the bytes: a call made while another one is in flight on the same thread
//! (glibc's `posix_memalign` calling `malloc`, `malloc` calling `mmap`, `reallocarray` calling
//! `realloc`) only bumps a depth counter, so nothing is counted twice. Return probes must be
//! attached before entry probes (the agent does so) or an entry without its return would leave
//! the thread marked as in flight.
//!
//! Byte sampling (`SAMPLE_BYTES` nonzero, `memprof trace --sample-bytes`): the outermost call
//! decides at entry whether its block is sampled (see [`sample_flags`]); unsampled blocks cost no
//! stack walk and no record, and their frees none either, because only the addresses of sampled
//! live blocks (`SAMPLED`) produce free records. aya 0.14 cannot create uprobe session
//! programs (kernel 6.10+), which could skip the return probe of an unsampled call: the return
//! probe still runs and returns early.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_F_USER_STACK, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP,
        BPF_RB_NO_WAKEUP,
    },
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_get_stack,
        bpf_ktime_get_ns, bpf_probe_read_user,
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use memprof_common::{
    AllocEvent, AllocFn, COUNTER_SLOTS, Counter, DEFAULT_INFLIGHT_ENTRIES, DEFAULT_RING_BYTES,
    DEFAULT_SAMPLED_ENTRIES, DEFAULT_STACK_ENTRIES, EVENT_VERSION, EventHeader, EventKind,
    FreeEvent, MAX_STACK_DEPTH, NO_STACK, PhaseEvent, RemapEvent, StackTrace, UnmapEvent,
    exp_interval,
};

/// Process the programs report on; set by the agent at load time.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

/// Unread bytes in `EVENTS` above which a record wakes the agent; below it the agent drains on
/// its own timer. One wakeup per record costs the traced thread a context switch on a busy
/// machine; set by the agent (0 wakes on every record).
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 0;

/// Nonzero: every program returns at once (`memprof trace --probe-floor`), to measure what the
/// probes cost by themselves.
#[unsafe(no_mangle)]
static FLOOR: u32 = 0;

/// Mean sampling interval in bytes (`--sample-bytes`); 0 records every allocation. Set by the
/// agent, at most `MAX_SAMPLE_MEAN`.
#[unsafe(no_mangle)]
static SAMPLE_BYTES: u64 = 0;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Stacks keyed by a hash of their frames: content-addressed, so a key never changes meaning.
#[map]
static STACKS: HashMap<u64, StackTrace> =
    HashMap::with_max_entries(DEFAULT_STACK_ENTRIES, BPF_F_NO_PREALLOC);

/// Per-CPU scratch space for capturing a stack (too big for the BPF stack).
#[map]
static STACK_SCRATCH: PerCpuArray<StackTrace> = PerCpuArray::with_max_entries(1, 0);

#[map]
static INFLIGHT: HashMap<u64, Inflight> = HashMap::with_max_entries(DEFAULT_INFLIGHT_ENTRIES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// With sampling: per thread (`pid_tgid`), the bytes left until the next sample point. An
/// evicted entry is redrawn, which the exponential distribution's lack of memory allows.
#[map]
static SAMPLE_LEFT: LruHashMap<u64, u64> =
    LruHashMap::with_max_entries(DEFAULT_INFLIGHT_ENTRIES, 0);

/// With sampling: the sampled blocks still live. A free, or the old block of a realloc, is
/// reported only when its address is here, so frees stay exact for what was sampled.
#[map]
static SAMPLED: HashMap<SampledKey, u32> =
    HashMap::with_max_entries(DEFAULT_SAMPLED_ENTRIES, BPF_F_NO_PREALLOC);

#[derive(Clone, Copy)]
#[repr(C)]
struct SampledKey {
    addr: u64,
    tgid: u64,
}

/// Threads inside an `mmap` syscall that maps a file executable (set at entry, taken at exit).
#[map]
static EXEC_MAPS: HashMap<u64, u32> = HashMap::with_max_entries(1024, 0);

/// Arguments of an allocator call in flight on one thread.
#[derive(Clone, Copy)]
#[repr(C)]
struct Inflight {
    /// `AllocFn` of the outermost call.
    func: u32,
    /// Number of nested allocator calls currently inside the outermost one.
    depth: u32,
    /// Requested size (mmap/mremap: length; mremap: new length).
    size: u64,
    /// realloc: the old block; posix_memalign: the out pointer; mmap: flags; mremap: old address.
    arg: u64,
    /// mremap: old length.
    arg2: u64,
    /// `SAMPLED` (always, without sampling), `OLD_SAMPLED`.
    flags: u32,
    _pad: u32,
}

/// `Inflight::flags`: the call's block is recorded.
const SAMPLED_FLAG: u32 = 1;
/// `Inflight::flags`: a realloc's old block was sampled and its free announced at entry.
const OLD_SAMPLED_FLAG: u32 = 2;

const MAP_ANONYMOUS: u64 = 0x20;
const PROT_EXEC: u64 = 0x4;
const MAP_FAILED: u64 = u64::MAX;

#[inline(always)]
fn target() -> u32 {
    // SAFETY: a read of a global the loader patches; volatile so it is not folded to 0.
    unsafe { core::ptr::read_volatile(&TARGET_TGID) }
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn header(kind: EventKind, func: u32, id: u64) -> EventHeader {
    EventHeader {
        version: EVENT_VERSION,
        kind: kind as u16,
        tgid: (id >> 32) as u32,
        tid: id as u32,
        func,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// Writes a record; `urgent` ones (a stack seen for the first time, a library load) wake the
/// agent at once so it can read the process's address space while it still exists.
#[inline(always)]
fn emit_with<T: 'static>(event: T, urgent: bool) {
    match EVENTS.reserve::<T>(0) {
        Some(mut slot) => {
            slot.write(event);
            // SAFETY: a read of a global the loader patches.
            let threshold = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
            let flags = if urgent || EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= threshold {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            slot.submit(flags as u64);
        }
        None => count(Counter::RingFull),
    }
}

#[inline(always)]
fn emit<T: 'static>(event: T) {
    emit_with(event, false);
}

/// The calling thread's `pid_tgid` if it belongs to the target process.
#[inline(always)]
fn traced_thread() -> Option<u64> {
    // SAFETY: a read of a global the loader patches.
    if unsafe { core::ptr::read_volatile(&FLOOR) } != 0 {
        return None;
    }
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32 == target()).then_some(id)
}

/// Records the arguments of an allocator call, or bumps the depth of the call already in flight.
#[inline(always)]
fn enter(func: AllocFn, size: u64, arg: u64, arg2: u64) -> Option<u64> {
    let id = traced_thread()?;
    if let Some(state) = INFLIGHT.get_ptr_mut(id) {
        // SAFETY: the entry belongs to this thread; only this thread touches it.
        unsafe { (*state).depth += 1 };
        return None;
    }
    let state = Inflight {
        func: func as u32,
        depth: 0,
        size,
        arg,
        arg2,
        flags: sample_flags(id, func, size),
        _pad: 0,
    };
    if INFLIGHT.insert(id, state, BPF_NOEXIST as u64).is_err() {
        count(Counter::InflightFull);
        return None;
    }
    Some(id)
}

/// Ends the calling thread's allocator call; returns its state when it was the outermost one.
#[inline(always)]
fn leave() -> Option<(u64, Inflight)> {
    let id = traced_thread()?;
    let Some(state) = INFLIGHT.get_ptr_mut(id) else {
        count(Counter::OrphanReturn);
        return None;
    };
    // SAFETY: the entry belongs to this thread; only this thread touches it.
    let state = unsafe {
        if (*state).depth > 0 {
            (*state).depth -= 1;
            return None;
        }
        *state
    };
    let _ = INFLIGHT.remove(id);
    Some((id, state))
}

#[inline(always)]
fn sample_mean() -> u64 {
    // SAFETY: a read of a global the loader patches.
    unsafe { core::ptr::read_volatile(&SAMPLE_BYTES) }
}

/// Whether the outermost allocator call of `size` bytes on thread `id` is sampled.
///
/// Poisson sampling over the thread's allocated bytes, as tcmalloc and jemalloc do: the thread
/// keeps the distance to its next sample point, drawn from an exponential distribution with
/// mean `SAMPLE_BYTES` (`exp_interval`). A call is sampled when the point falls inside its
/// bytes, with probability `1 - exp(-size / mean)`; the next point is drawn afresh from the end
/// of the block (the distribution has no memory, so this is the same process). calloc's size is
/// `nmemb * size`; anonymous mappings outside malloc are always recorded.
#[inline(always)]
fn sample_flags(id: u64, func: AllocFn, size: u64) -> u32 {
    let mean = sample_mean();
    if mean == 0 || matches!(func, AllocFn::Mmap | AllocFn::Mremap) {
        return SAMPLED_FLAG;
    }
    let left = match SAMPLE_LEFT.get_ptr_mut(id) {
        Some(left) => left,
        None => {
            // SAFETY: a helper call without arguments.
            let _ = SAMPLE_LEFT.insert(id, exp_interval(unsafe { bpf_get_prandom_u32() }, mean), 0);
            let Some(left) = SAMPLE_LEFT.get_ptr_mut(id) else {
                return 0;
            };
            left
        }
    };
    // SAFETY: the entry belongs to this thread; only this thread touches it.
    unsafe {
        if size > *left {
            *left = exp_interval(bpf_get_prandom_u32(), mean);
            SAMPLED_FLAG
        } else {
            *left -= size;
            0
        }
    }
}

#[inline(always)]
fn sampled_key(id: u64, addr: u64) -> SampledKey {
    SampledKey {
        addr,
        tgid: id >> 32,
    }
}

/// Remembers a sampled block about to be reported; false (counted) when `SAMPLED` is full, and
/// the block must not be reported since its free could not be matched.
#[inline(always)]
fn remember_sampled(id: u64, addr: u64) -> bool {
    if sample_mean() == 0 {
        return true;
    }
    if SAMPLED.insert(sampled_key(id, addr), 1, 0).is_ok() {
        return true;
    }
    count(Counter::SampledFull);
    false
}

/// Whether a free of `addr` is reported: always without sampling, else when the block was
/// sampled (it is then forgotten).
#[inline(always)]
fn take_sampled(id: u64, addr: u64) -> bool {
    sample_mean() == 0 || SAMPLED.remove(sampled_key(id, addr)).is_ok()
}

/// Whether the calling thread is inside a traced allocator call.
#[inline(always)]
fn in_flight(id: u64) -> bool {
    INFLIGHT.get_ptr(id).is_some()
}

/// Captures the user stack and returns its key in `STACKS` (or `NO_STACK`), and whether the
/// stack is new.
///
/// At a return probe the instruction pointer is the return address in the allocator's caller,
/// so the stack starts at the caller and holds no allocator frame.
#[inline(always)]
fn stack_key(ctx: &RetProbeContext) -> (u64, bool) {
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        count(Counter::StackLost);
        return (NO_STACK, false);
    };
    // SAFETY: the helper writes at most `size` bytes into the per-CPU buffer and zero-fills the
    // rest.
    let len = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            buf.cast(),
            size_of::<StackTrace>() as u32,
            BPF_F_USER_STACK as u64,
        )
    };
    if len <= 0 {
        count(Counter::StackLost);
        return (NO_STACK, false);
    }
    let frames = len as usize / 8;
    // SAFETY: per-CPU buffer, no other user on this CPU while the program runs.
    let ips = unsafe { &(*buf).ips };
    let mut hash: u64 = frames as u64;
    for (i, ip) in ips.iter().enumerate().take(MAX_STACK_DEPTH) {
        if i >= frames {
            break;
        }
        hash = (hash.rotate_left(5) ^ *ip).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    // Zero is `NO_STACK`.
    let key = hash | 1;
    if STACKS.get_ptr(key).is_some() {
        return (key, false);
    }
    // SAFETY: as above.
    let trace = unsafe { &*buf };
    match STACKS.insert(key, trace, BPF_NOEXIST as u64) {
        Ok(()) => (key, true),
        // Another CPU inserted the same stack meanwhile.
        Err(-17) => (key, false),
        Err(_) => {
            count(Counter::StackLost);
            (NO_STACK, false)
        }
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
    let (stack, new_stack) = stack_key(ctx);
    emit_with(
        AllocEvent {
            header: header(kind, func, id),
            addr,
            size,
            stack,
        },
        new_stack,
    );
}

#[inline(always)]
fn emit_free(kind: EventKind, func: u32, id: u64, addr: u64) {
    emit(FreeEvent {
        header: header(kind, func, id),
        addr,
    });
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

// ---- entry probes: one line each over `enter` ----

#[uprobe]
pub fn malloc_entry(ctx: ProbeContext) -> u32 {
    enter(AllocFn::Malloc, arg(&ctx, 0), 0, 0);
    0
}

#[uprobe]
pub fn valloc_entry(ctx: ProbeContext) -> u32 {
    enter(AllocFn::Valloc, arg(&ctx, 0), 0, 0);
    0
}

#[uprobe]
pub fn pvalloc_entry(ctx: ProbeContext) -> u32 {
    enter(AllocFn::Pvalloc, arg(&ctx, 0), 0, 0);
    0
}

#[uprobe]
pub fn calloc_entry(ctx: ProbeContext) -> u32 {
    enter(
        AllocFn::Calloc,
        arg(&ctx, 0).wrapping_mul(arg(&ctx, 1)),
        0,
        0,
    );
    0
}

#[uprobe]
pub fn memalign_entry(ctx: ProbeContext) -> u32 {
    enter(AllocFn::Memalign, arg(&ctx, 1), 0, 0);
    0
}

#[uprobe]
pub fn aligned_alloc_entry(ctx: ProbeContext) -> u32 {
    enter(AllocFn::AlignedAlloc, arg(&ctx, 1), 0, 0);
    0
}

#[uprobe]
pub fn posix_memalign_entry(ctx: ProbeContext) -> u32 {
    enter(AllocFn::PosixMemalign, arg(&ctx, 2), arg(&ctx, 0), 0);
    0
}

#[uprobe]
pub fn realloc_entry(ctx: ProbeContext) -> u32 {
    realloc_common(AllocFn::Realloc, arg(&ctx, 0), arg(&ctx, 1));
    0
}

#[uprobe]
pub fn reallocarray_entry(ctx: ProbeContext) -> u32 {
    let (nmemb, size) = (arg(&ctx, 1), arg(&ctx, 2));
    // On overflow the call fails without touching the block; size 0 would mean "free".
    // No `checked_mul` (nor a division check, which LLVM folds back into one): both lower to a
    // 128-bit multiply the BPF backend lacks. A factor of 2^32 or more with a nonzero other
    // factor cannot be satisfied by any allocator, so it is reported as the largest size.
    let total = if nmemb == 0 || size == 0 {
        0
    } else if nmemb >> 32 != 0 || size >> 32 != 0 {
        u64::MAX
    } else {
        nmemb * size
    };
    realloc_common(AllocFn::Reallocarray, arg(&ctx, 0), total);
    0
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
    if let Some(state) = INFLIGHT.get_ptr_mut(id) {
        // SAFETY: the entry belongs to this thread; only this thread touches it.
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

#[uprobe]
pub fn mmap_entry(ctx: ProbeContext) -> u32 {
    enter(AllocFn::Mmap, arg(&ctx, 1), arg(&ctx, 3), 0);
    0
}

#[uprobe]
pub fn mremap_entry(ctx: ProbeContext) -> u32 {
    enter(AllocFn::Mremap, arg(&ctx, 2), arg(&ctx, 0), arg(&ctx, 1));
    0
}

/// `free` has no return probe: the block is released at entry, unless the call is made by an
/// allocator in flight on this thread (which owns the accounting).
#[uprobe]
pub fn free_entry(ctx: ProbeContext) -> u32 {
    let addr = arg(&ctx, 0);
    if addr == 0 {
        return 0;
    }
    if let Some(id) = traced_thread()
        && !in_flight(id)
        && take_sampled(id, addr)
    {
        emit_free(EventKind::Free, AllocFn::Free as u32, id, addr);
    }
    0
}

#[uprobe]
pub fn munmap_entry(ctx: ProbeContext) -> u32 {
    if let Some(id) = traced_thread()
        && !in_flight(id)
    {
        emit(UnmapEvent {
            header: header(EventKind::Munmap, AllocFn::Munmap as u32, id),
            addr: arg(&ctx, 0),
            len: arg(&ctx, 1),
        });
    }
    0
}

// ---- the one return probe shared by every allocator ----

#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    let Some((id, state)) = leave() else {
        return 0;
    };
    let ret: u64 = ctx.ret();
    if state.flags & SAMPLED_FLAG == 0 {
        unsampled_return(id, &state, ret);
        return 0;
    }
    // Match on the raw value: `AllocFn::from_u32` has a bounds check whose panic path the
    // verifier rejects.
    const REALLOC: u32 = AllocFn::Realloc as u32;
    const REALLOCARRAY: u32 = AllocFn::Reallocarray as u32;
    const POSIX_MEMALIGN: u32 = AllocFn::PosixMemalign as u32;
    const MMAP: u32 = AllocFn::Mmap as u32;
    const MREMAP: u32 = AllocFn::Mremap as u32;
    let func = state.func;
    match func {
        REALLOC | REALLOCARRAY => {
            if ret != 0 {
                emit_alloc(&ctx, EventKind::Alloc, func, id, ret, state.size);
            } else if state.arg != 0 && state.size != 0 && restore_old(id, &state) {
                emit_free(EventKind::ReallocFailed, func, id, state.arg);
            }
        }
        POSIX_MEMALIGN => {
            // Returns 0 on success and stores the block through the out pointer.
            if ret as u32 == 0 {
                // SAFETY: reads user memory through the helper, which checks the access.
                if let Ok(addr) = unsafe { bpf_probe_read_user(state.arg as *const u64) } {
                    emit_alloc(&ctx, EventKind::Alloc, func, id, addr, state.size);
                }
            }
        }
        MMAP => {
            if ret != MAP_FAILED && state.arg & MAP_ANONYMOUS != 0 {
                emit_alloc(&ctx, EventKind::Mmap, func, id, ret, state.size);
            }
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
        }
        _ => {
            if ret != 0 {
                emit_alloc(&ctx, EventKind::Alloc, func, id, ret, state.size);
            }
        }
    }
    0
}

// ---- phases: functions named by `--phase`; the attach cookie is the phase's index ----

#[uprobe]
pub fn phase_entry(ctx: ProbeContext) -> u32 {
    phase_event(ctx.as_ptr(), EventKind::PhaseEnter);
    0
}

#[uretprobe]
pub fn phase_return(ctx: RetProbeContext) -> u32 {
    phase_event(ctx.as_ptr(), EventKind::PhaseLeave);
    0
}

#[inline(always)]
fn phase_event(ctx: *mut core::ffi::c_void, kind: EventKind) {
    let Some(id) = traced_thread() else {
        return;
    };
    // SAFETY: the helper reads the cookie of the link that ran this program.
    let phase = unsafe { bpf_get_attach_cookie(ctx) } as u32;
    emit(PhaseEvent {
        header: header(kind, 0, id),
        phase,
        _pad: 0,
    });
}

/// A file mapped executable (a library being loaded) tells the agent to re-read the target's
/// address space at once: a short-lived process may be gone before its first stack is
/// processed, and its mappings with it. The loader maps libraries with its own `mmap`, which no
/// libc probe sees, hence the syscall tracepoints; the record goes out at the syscall's exit,
/// when the mapping exists.
#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    let Some(id) = traced_thread() else {
        return 0;
    };
    // struct syscall_trace_enter: common header (8 bytes), int nr, unsigned long args[6] at 16.
    // SAFETY: offsets inside the tracepoint record, checked by the helper.
    let (prot, flags) = unsafe {
        (
            ctx.read_at::<u64>(16 + 2 * 8).unwrap_or(0),
            ctx.read_at::<u64>(16 + 3 * 8).unwrap_or(0),
        )
    };
    if prot & PROT_EXEC != 0 && flags & MAP_ANONYMOUS == 0 {
        let _ = EXEC_MAPS.insert(id, 1, 0);
    }
    0
}

#[tracepoint]
pub fn sys_exit_mmap(_ctx: TracePointContext) -> u32 {
    let Some(id) = traced_thread() else {
        return 0;
    };
    if EXEC_MAPS.remove(id).is_ok() {
        emit_with(header(EventKind::ExecMap, AllocFn::Mmap as u32, id), true);
    }
    0
}

#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
