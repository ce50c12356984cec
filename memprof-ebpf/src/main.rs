//! Kernel programs: uprobes on the target's allocator entry points and uretprobes on their
//! returns, which turn calls into ring-buffer records (see `memprof_common`).
//!
//! Per-thread entry state lives in a slot of `CALLS` chosen by thread id (claimed with a
//! compare-and-exchange; a thread whose slot another thread's call holds uses the `INFLIGHT`
//! hash, keyed by `pid_tgid`): an array slot costs a fraction of a hash insert and delete on
//! every call. The outermost allocator call
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
// The BPF target declares no compare-and-exchange for `core::sync::atomic`; the kernel has one.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
    sync::atomic::{Ordering, compiler_fence},
};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_F_USER_STACK, BPF_NOEXIST, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
    },
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_get_stack, bpf_ktime_get_ns,
        bpf_probe_read_user, generated::bpf_probe_read_user as bpf_probe_read_user_raw,
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use memprof_common::{
    AllocEvent, AllocFn, COUNTER_SLOTS, Counter, DEFAULT_CALL_SLOTS, DEFAULT_INFLIGHT_ENTRIES,
    DEFAULT_RING_BYTES, DEFAULT_SAMPLED_ENTRIES, DEFAULT_STACK_ENTRIES, DEFAULT_TGID_ENTRIES,
    EVENT_VERSION, EventHeader, EventKind, ExecEvent, ForkEvent, FreeEvent, MAX_PY_FRAMES,
    MAX_STACK_COPY, MAX_STACK_DEPTH, NO_STACK, PY_FRAME_COPY, PY_FRAME_OWNED_BY_CSTACK, PY_NONE,
    PhaseEvent, PyStack, PyWalk, RemapEvent, StackTrace, UnmapEvent, UnwindEvent, exp_interval,
    mode, unwind,
};

/// How processes are chosen (`memprof_common::mode`); set by the agent at load time.
#[unsafe(no_mangle)]
static MODE: u32 = mode::ONE;

/// `mode::ONE`: the process the programs report on. `mode::ALL`: memprof's own process, which
/// they ignore.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

/// `mode::SET`: nonzero makes a traced process's forks traced too.
#[unsafe(no_mangle)]
static FOLLOW: u32 = 0;

/// `mode::SET`: when nonzero, a process that execs into this name (the kernel's 15-byte `comm`,
/// NUL-padded) joins the set.
#[unsafe(no_mangle)]
static COMM: [u8; 16] = [0; 16];

/// How user stacks are taken (`memprof_common::unwind`).
#[unsafe(no_mangle)]
static UNWIND: u32 = unwind::FRAME_POINTERS;

/// Nonzero: user stacks are taken by the kernel's walker (`bpf_get_stack`), which puts back the
/// return addresses that pending return probes replaced (`--phase` functions probe their
/// returns). Otherwise memprof's own frame-pointer walk, which stops before reading outside
/// the stack instead of faulting on the chain's last link (about half a microsecond per
/// allocation here).
#[unsafe(no_mangle)]
static KERNEL_STACKS: u32 = 0;

/// `CALLS`'s size minus one (the size is a power of two); set by the agent.
#[unsafe(no_mangle)]
static CALL_SLOT_MASK: u32 = DEFAULT_CALL_SLOTS - 1;

/// `unwind::DWARF`: bytes of user stack copied per allocation (at most `MAX_STACK_COPY`).
#[unsafe(no_mangle)]
static STACK_COPY: u32 = 0;

/// `mode::ALL`: nonzero restricts tracing to the processes of this cgroup (v2 id).
#[unsafe(no_mangle)]
static CGROUP_ID: u64 = 0;

/// Bytes a CPU writes to `EVENTS` between two wakeups of the agent (`UNWOKEN`); in between the
/// agent drains on its own timer. One wakeup per record costs the traced thread a context
/// switch on a busy machine; set by the agent (0 wakes on every record).
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

/// Bytes of stack `walk_frames` copies first; a walk that needs more copies `WINDOW_BYTES` at a
/// time (a stack that did not fit in the first window is a deep one).
const FIRST_WINDOW: u64 = 512;

/// Bytes of stack `walk_frames` copies at most at a time (a power of two).
const WINDOW_BYTES: usize = 2048;

/// Per-CPU window of user stack for `walk_frames`.
/// One word more than the window, so a frame's second word is always in bounds.
#[map]
static STACK_WINDOW: PerCpuArray<[u64; WINDOW_BYTES / 8 + 1]> = PerCpuArray::with_max_entries(1, 0);

/// Size of each CPU's cache of keys known to be in `STACKS` (a power of two).
const SEEN_STACKS: usize = 64;

/// Per CPU, keys known to be in `STACKS` (which only grows), direct-mapped by the key's low
/// bits: a call site allocating in a loop skips the hash lookup.
#[map]
static STACKS_SEEN: PerCpuArray<[u64; SEEN_STACKS]> = PerCpuArray::with_max_entries(1, 0);

/// An `AllocStack` record being built (too big for the BPF stack).
#[repr(C)]
struct StackCopy {
    event: UnwindEvent,
    stack: [u8; MAX_STACK_COPY as usize],
}

/// Per-CPU scratch space for an `AllocStack` record.
#[map]
static COPY_SCRATCH: PerCpuArray<StackCopy> = PerCpuArray::with_max_entries(1, 0);

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

#[map]
static INFLIGHT: HashMap<u64, Inflight> = HashMap::with_max_entries(DEFAULT_INFLIGHT_ENTRIES, 0);

/// Allocator calls in flight, one slot per thread id modulo the slot count.
#[map]
static CALLS: Array<CallSlot> = Array::with_max_entries(DEFAULT_CALL_SLOTS, 0);

/// Number of calls in `INFLIGHT` (slot 0): while it is 0, no lookup there is needed.
#[map]
static SPILLED: Array<u64> = Array::with_max_entries(1, 0);

/// `mode::SET`: the traced processes.
#[map]
static TGIDS: HashMap<u32, u32> = HashMap::with_max_entries(DEFAULT_TGID_ENTRIES, 0);

/// Bytes this CPU wrote to `EVENTS` since its last record that woke the agent. Counted here
/// rather than asked of the ring (`bpf_ringbuf_query`), which costs a helper call per record.
#[map]
static UNWOKEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// What a thread's calls learn for the next ones (`ThreadHints`), in a slot chosen as in
/// `CALLS`. A thread that finds another thread's hints there starts afresh: they are hints.
#[map]
static THREAD_HINTS: Array<ThreadHints> = Array::with_max_entries(DEFAULT_CALL_SLOTS, 0);

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

/// A `CALLS` slot: the call in flight of thread `owner` (a `pid_tgid`; 0 when free).
#[repr(C)]
struct CallSlot {
    owner: u64,
    state: Inflight,
}

/// A `THREAD_HINTS` slot: what thread `owner` (a `pid_tgid`; 0: nobody) learnt.
#[repr(C)]
struct ThreadHints {
    owner: u64,
    /// With sampling: the bytes left until the next sample point. Redrawn when a thread takes
    /// the slot over, which the exponential distribution's lack of memory allows (the distance
    /// left of any draw is again exponential with the same mean).
    sample_left: u64,
    /// `unwind::DWARF`: the top of the thread's stack once a copy found it (0: not known).
    stack_top: u64,
    /// Copies capped at `stack_top` since it was learnt.
    top_uses: u64,
}

/// A learnt stack top is a hint: a page of the stack that is not present (swapped out, or
/// marked for NUMA balancing) also fails a copy, and the top learnt then is too low. Every this
/// many copies the whole length is tried again.
const STACK_TOP_USES: u64 = 1024;

/// Fewest bytes of stack an `unwind::DWARF` record carries.
const MIN_STACK_COPY: u64 = 512;

/// `Inflight::flags`: the call's block is recorded.
const SAMPLED_FLAG: u32 = 1;
/// `Inflight::flags`: a realloc's old block was sampled and its free announced at entry.
const OLD_SAMPLED_FLAG: u32 = 2;

const MAP_ANONYMOUS: u64 = 0x20;
const CLONE_THREAD: u64 = 0x10000;
const PROT_EXEC: u64 = 0x4;
const MAP_FAILED: u64 = u64::MAX;

#[inline(always)]
fn target() -> u32 {
    // SAFETY: a read of a global the loader patches; volatile so it is not folded to 0.
    unsafe { core::ptr::read_volatile(&TARGET_TGID) }
}

#[inline(always)]
fn mode() -> u32 {
    // SAFETY: a read of a global the loader patches.
    unsafe { core::ptr::read_volatile(&MODE) }
}

#[inline(always)]
fn floor() -> bool {
    // SAFETY: a read of a global the loader patches.
    unsafe { core::ptr::read_volatile(&FLOOR) != 0 }
}

/// Whether process `tgid` (the current one) is traced.
#[inline(always)]
fn traced(tgid: u32) -> bool {
    match mode() {
        mode::ONE => tgid == target(),
        mode::SET => TGIDS.get_ptr(&tgid).is_some(),
        _ => {
            // SAFETY: a read of a global the loader patches.
            let cgroup = unsafe { core::ptr::read_volatile(&CGROUP_ID) };
            // SAFETY: helper without arguments.
            tgid != target() && (cgroup == 0 || unsafe { bpf_get_current_cgroup_id() } == cgroup)
        }
    }
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
            slot.submit(wakeup(urgent, size_of::<T>() as u64));
        }
        None => count(Counter::RingFull),
    }
}

/// Ring flags for a record of `bytes`: wake the agent for urgent records or once this CPU wrote
/// `WAKEUP_BYTES` since its last wakeup.
#[inline(always)]
fn wakeup(urgent: bool, bytes: u64) -> u64 {
    // SAFETY: a read of a global the loader patches.
    let threshold = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
    let Some(unwoken) = UNWOKEN.get_ptr_mut(0) else {
        return BPF_RB_FORCE_WAKEUP as u64;
    };
    // SAFETY: this CPU's value; no other user while the program runs.
    unsafe {
        let written = *unwoken + bytes;
        if urgent || written >= threshold {
            *unwoken = 0;
            BPF_RB_FORCE_WAKEUP as u64
        } else {
            *unwoken = written;
            BPF_RB_NO_WAKEUP as u64
        }
    }
}

#[inline(always)]
fn emit<T: 'static>(event: T) {
    emit_with(event, false);
}

/// The calling thread's `pid_tgid` if it belongs to the target process.
#[inline(always)]
fn traced_thread() -> Option<u64> {
    if floor() {
        return None;
    }
    let id = bpf_get_current_pid_tgid();
    traced((id >> 32) as u32).then_some(id)
}

/// Thread `id`'s index in the per-thread arrays (`CALLS`, `THREAD_HINTS`).
#[inline(always)]
fn slot_index(id: u64) -> u32 {
    // SAFETY: a read of a global the loader patches.
    id as u32 & unsafe { core::ptr::read_volatile(&CALL_SLOT_MASK) }
}

/// The calling thread's `CALLS` slot.
#[inline(always)]
fn call_slot(id: u64) -> Option<*mut CallSlot> {
    CALLS.get_ptr_mut(slot_index(id))
}

/// Thread `id`'s hints, taken over (and reset) if another thread held the slot.
#[inline(always)]
fn thread_hints(id: u64) -> Option<*mut ThreadHints> {
    let hints = THREAD_HINTS.get_ptr_mut(slot_index(id))?;
    // SAFETY: a map value; another thread sharing the slot at worst makes this one start afresh.
    unsafe {
        if (*hints).owner != id {
            let mean = sample_mean();
            *hints = ThreadHints {
                owner: id,
                sample_left: if mean == 0 {
                    0
                } else {
                    exp_interval(bpf_get_prandom_u32(), mean)
                },
                stack_top: 0,
                top_uses: 0,
            };
        }
    }
    Some(hints)
}

/// `SPILLED`'s counter.
#[inline(always)]
fn spilled() -> Option<*mut u64> {
    SPILLED.get_ptr_mut(0)
}

/// Reads a u64 in a map value that other CPUs update atomically (an aligned 8-byte load is
/// atomic; the BPF CPU version the programs are built for has no load-acquire).
#[inline(always)]
fn load(p: *mut u64) -> u64 {
    // SAFETY: an aligned u64 in a map value.
    unsafe { core::ptr::read_volatile(p) }
}

/// Adds `n` (wrapping: a negative step as its two's complement) to a shared u64.
#[inline(always)]
fn add(p: *mut u64, n: u64) {
    // SAFETY: an aligned u64 in a map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n) };
}

/// Whether thread `id` holds `slot` (its `CALLS` slot).
#[inline(always)]
fn holds(slot: *mut CallSlot, id: u64) -> bool {
    // SAFETY: a map value; `owner` equal to `id` means this thread holds the slot.
    unsafe { (*slot).owner == id }
}

/// The state of thread `id`'s allocator call in flight, if any: in `slot` (the thread's
/// `CALLS` slot) when it holds it, else spilled in `INFLIGHT`.
#[inline(always)]
fn call_state_in(slot: Option<*mut CallSlot>, id: u64) -> Option<*mut Inflight> {
    if let Some(slot) = slot
        && holds(slot, id)
    {
        // SAFETY: the slot is this thread's.
        return Some(unsafe { &raw mut (*slot).state });
    }
    if load(spilled()?) == 0 {
        return None;
    }
    INFLIGHT.get_ptr_mut(id)
}

/// The state of thread `id`'s allocator call in flight, if any.
#[inline(always)]
fn call_state(id: u64) -> Option<*mut Inflight> {
    call_state_in(call_slot(id), id)
}

/// Records the arguments of an allocator call, or bumps the depth of the call already in flight.
#[inline(always)]
fn enter(func: AllocFn, size: u64, arg: u64, arg2: u64) -> Option<u64> {
    let id = traced_thread()?;
    let slot = call_slot(id);
    if let Some(state) = call_state_in(slot, id) {
        // SAFETY: the state belongs to this thread; only this thread touches it.
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
    if let Some(slot) = slot {
        // SAFETY: a map value; the compare-and-exchange makes this thread its only writer
        // until it sets `owner` back to 0.
        unsafe {
            let claimed = atomic_cxchg::<
                u64,
                { AtomicOrdering::Acquire },
                { AtomicOrdering::Relaxed },
            >(&raw mut (*slot).owner, 0, id)
            .1;
            if claimed {
                (*slot).state = state;
                return Some(id);
            }
        }
    }
    if INFLIGHT.insert(id, state, BPF_NOEXIST as u64).is_err() {
        count(Counter::InflightFull);
        return None;
    }
    if let Some(n) = spilled() {
        add(n, 1);
    }
    Some(id)
}

/// Ends the calling thread's allocator call; returns its state when it was the outermost one.
#[inline(always)]
fn leave() -> Option<(u64, Inflight)> {
    let id = traced_thread()?;
    let slot = call_slot(id);
    let Some(state) = call_state_in(slot, id) else {
        count(Counter::OrphanReturn);
        return None;
    };
    // SAFETY: the state belongs to this thread; only this thread touches it.
    let state = unsafe {
        if (*state).depth > 0 {
            (*state).depth -= 1;
            return None;
        }
        *state
    };
    end_call_in(slot, id);
    Some((id, state))
}

/// Frees thread `id`'s call state (its slot, or its `INFLIGHT` entry).
#[inline(always)]
fn end_call(id: u64) {
    end_call_in(call_slot(id), id);
}

/// `end_call` with the thread's `CALLS` slot at hand.
#[inline(always)]
fn end_call_in(slot: Option<*mut CallSlot>, id: u64) {
    if let Some(slot) = slot
        && holds(slot, id)
    {
        // The state was read before: the fence keeps the compiler from moving those reads
        // after the release, and x86 does not reorder a store before loads.
        compiler_fence(Ordering::Release);
        // SAFETY: the slot is this thread's until this store.
        unsafe { core::ptr::write_volatile(&raw mut (*slot).owner, 0) };
        return;
    }
    if let Some(n) = spilled()
        && load(n) != 0
        && INFLIGHT.remove(id).is_ok()
    {
        add(n, u64::MAX);
    }
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
    let Some(hints) = thread_hints(id) else {
        return 0;
    };
    // SAFETY: this thread's hints (another thread sharing the slot at worst redraws).
    unsafe {
        if size > (*hints).sample_left {
            (*hints).sample_left = exp_interval(bpf_get_prandom_u32(), mean);
            SAMPLED_FLAG
        } else {
            (*hints).sample_left -= size;
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
    if sample_mean() == 0 {
        return true;
    }
    // A lookup first: most freed blocks were not sampled, and a lookup takes no bucket lock.
    let key = sampled_key(id, addr);
    SAMPLED.get_ptr(&key).is_some() && SAMPLED.remove(&key).is_ok()
}

/// Whether the calling thread is inside a traced allocator call.
#[inline(always)]
fn in_flight(id: u64) -> bool {
    call_state(id).is_some()
}

/// How far above the stack pointer a frame may lie: a frame pointer beyond it is not followed.
const MAX_STACK_SPAN: u64 = 64 << 20;

/// Marks a new key in `store_stack`'s and `fp_stack_key`'s results.
const STACK_NEW: u64 = 1 << 63;

/// Captures the user stack and returns its key in `STACKS` (or `NO_STACK`), and whether the
/// stack is new.
///
/// At a return probe the instruction pointer is the return address in the allocator's caller,
/// so the stack starts at the caller and holds no allocator frame.
#[inline(always)]
fn stack_key(ctx: &RetProbeContext, id: u64) -> (u64, bool) {
    // SAFETY: a read of a global the loader patches.
    let r = if unsafe { core::ptr::read_volatile(&KERNEL_STACKS) } != 0 {
        match STACK_SCRATCH.get_ptr_mut(0) {
            Some(buf) => store_stack(kernel_stack(ctx, buf) as u64),
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
        fp_stack_key(ip, fp, sp, id)
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
    store_stack(walk_frames(ip, fp, sp, id, buf) as u64)
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
    let seen = STACKS_SEEN
        .get_ptr_mut(0)
        // SAFETY: this CPU's value; no other user while the program runs.
        // (The key's low bit is always set.)
        .and_then(|seen| unsafe { (*seen).get_mut((key >> 1) as usize % SEEN_STACKS) });
    if let Some(seen) = &seen
        && **seen == key
    {
        return key;
    }
    let known = if STACKS.get_ptr(key).is_some() {
        key
    } else {
        // SAFETY: as above.
        let trace = unsafe { &*buf };
        match STACKS.insert(key, trace, BPF_NOEXIST as u64) {
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

/// The kernel's user stack walk into `buf`; the number of frames.
#[inline(always)]
fn kernel_stack(ctx: &RetProbeContext, buf: *mut StackTrace) -> usize {
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
    if len <= 0 { 0 } else { len as usize / 8 }
}

/// Follows the frame-pointer chain from the probed thread's registers (`ip`, `fp`, `sp`) into
/// `buf` (the frames, then a zero when there is room); the number of frames.
///
/// A link is followed only when it points into the stack above the previous frame (8-aligned,
/// at most `MAX_STACK_SPAN` above the stack pointer): the chain's end (a zero, or a register
/// a function without frame pointers used for something else) stops the walk without a read,
/// where the kernel's walker reads it and takes a fault.
#[inline(always)]
fn walk_frames(mut ip: u64, mut fp: u64, sp: u64, id: u64, buf: *mut StackTrace) -> usize {
    let Some(window) = STACK_WINDOW.get_ptr_mut(0) else {
        return 0;
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
        (ip, fp) = unsafe { ((*window)[i + 1], (*window)[i]) };
        low = base + off + 16;
    }
    if let Some(end) = ips.get_mut(frames) {
        *end = 0;
    }
    frames
}

/// Copies a window of thread `id`'s stack from `fp` into `STACK_WINDOW`: `FIRST_WINDOW` bytes for
/// a walk's first window (`more` 0), else `WINDOW_BYTES`. Returns the length copied, 0 if not
/// even a frame's two words could be.
///
/// A window running past the top of the stack faults (about a microsecond), so the thread's
/// stack top is learnt as in `copy_stack_to_top` and windows end there: after a fault the copy
/// ends at the page boundary below, and when that works the boundary is the top (re-checked
/// every `STACK_TOP_USES` windows it shortened, as a page below the top may just not have been
/// present). Failing that, the frame's two words alone. A first window that fits is copied
/// without looking the hints up (one that does not, because an allocating frame lies within
/// `FIRST_WINDOW` of the top, costs its fault every time, as it did before hints). A global
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
fn py_stack(id: u64) -> (u64, bool) {
    if PY_ACTIVE.get(0).is_none_or(|active| *active == 0) {
        return (NO_STACK, false);
    }
    let r = py_stack_key(id);
    (r & !PY_NEW, r & PY_NEW != 0)
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

/// Copies `size` bytes of user stack from `sp` into `dst`; whether it worked.
#[inline(always)]
fn copy_stack(dst: *mut u8, size: u32, sp: u64) -> bool {
    // SAFETY: the helper checks the user access and writes at most `size` bytes, which the
    // caller guarantees fit in `dst`.
    unsafe { bpf_probe_read_user_raw(dst.cast(), size, sp as *const core::ffi::c_void) == 0 }
}

/// `end`, the end of a read of stack from `start`, capped at the thread's learnt stack top when
/// that lies in between. A top used `STACK_TOP_USES` times is forgotten instead: the whole
/// length is tried again, and the top learnt afresh if it faults.
#[inline(always)]
fn end_at_top(hints: Option<*mut ThreadHints>, start: u64, end: u64) -> u64 {
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
fn learn_top(hints: Option<*mut ThreadHints>, top: u64) {
    if let Some(h) = hints {
        // SAFETY: as in `end_at_top`.
        unsafe {
            (*h).stack_top = top;
            (*h).top_uses = 0;
        }
    }
}

/// Copies up to `want` bytes of the calling thread's stack from `sp` into `dst` (which holds
/// `MAX_STACK_COPY`); the length copied, 0 if not even `MIN_STACK_COPY` could be.
///
/// A copy running past the top of the stack faults (and a fault costs about a microsecond), so
/// each thread's stack top is learnt and kept in its `ThreadHints`: copies end at a page boundary
/// one page lower after each fault, and the first that works ends at the top (a mapping ends
/// at a page boundary, and none lies between it and the failed end), unless a page below it
/// was not present; hence `STACK_TOP_USES`.
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

/// An allocation with the caller's registers and a copy of its stack, for the agent to unwind
/// (`unwind::DWARF`). The copy is as large as `STACK_COPY` allows and the stack's mapping
/// holds: a copy running past the top of the stack faults, so smaller ones are tried.
/// Not inlined (one copy for every allocator's return keeps the verifier's work small); at
/// most five arguments, so the mapping flag and `func` share one (`mmap << 32 | func`).
#[inline(never)]
fn emit_alloc_stack(ctx: &RetProbeContext, mmap_func: u64, id: u64, addr: u64, size: u64) {
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
    let len = copy_stack_to_top(dst, want, sp, id);
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

// ---- process life cycle ----

/// A traced process creating a process (not a thread): in `mode::SET` with `FOLLOW` the child
/// joins the set before it first runs, so none of its allocations is missed.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    // SAFETY: a read of a global the loader patches.
    if floor() || unsafe { core::ptr::read_volatile(&FOLLOW) } == 0 {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    if !traced((id >> 32) as u32) {
        return 0;
    }
    // task_newtask: common header (8 bytes), pid_t pid at 8, char comm[16] at 12,
    // u64 clone_flags at 32.
    // SAFETY: offsets inside the tracepoint record, checked by the helper.
    let (child, flags) = unsafe {
        (
            ctx.read_at::<u32>(8).unwrap_or(0),
            ctx.read_at::<u64>(32).unwrap_or(CLONE_THREAD),
        )
    };
    if flags & CLONE_THREAD != 0 || child == 0 {
        return 0;
    }
    if mode() == mode::SET && TGIDS.insert(&child, &1, 0).is_err() {
        count(Counter::TgidsFull);
        return 0;
    }
    emit_with(
        ForkEvent {
            header: header(EventKind::Fork, 0, id),
            child,
            _pad: 0,
        },
        true,
    );
    0
}

/// A process replacing its image. In `mode::SET` with `COMM` set, a process that execs into
/// that name joins the set.
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    if floor() {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if !traced(tgid) {
        if mode() != mode::SET || !comm_matches() {
            return 0;
        }
        if TGIDS.insert(&tgid, &1, 0).is_err() {
            count(Counter::TgidsFull);
            return 0;
        }
    }
    emit_with(
        ExecEvent {
            header: header(EventKind::Exec, 0, id),
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
        },
        true,
    );
    0
}

/// Whether `COMM` is set and is the current process's name.
#[inline(always)]
fn comm_matches() -> bool {
    // SAFETY: a read of a global the loader patches.
    let want = unsafe { core::ptr::read_volatile(&COMM) };
    if want[0] == 0 {
        return false;
    }
    match bpf_get_current_comm() {
        Ok(comm) => comm == want,
        Err(_) => false,
    }
}

/// The last thread of a process exiting.
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    if floor() {
        return 0;
    }
    // sched_process_exit: comm[16] at 8, pid_t pid at 24, int prio at 28, bool group_dead at 32.
    // SAFETY: offset inside the tracepoint record, checked by the helper.
    let group_dead = unsafe { ctx.read_at::<u8>(32).unwrap_or(0) };
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if !traced(tgid) {
        return 0;
    }
    // A thread that dies inside an allocator call (killed, or exiting from a signal handler)
    // leaves its state behind.
    end_call(id);
    // Its hints go too: the thread id may be reused with another stack.
    if let Some(hints) = THREAD_HINTS.get_ptr_mut(slot_index(id)) {
        // SAFETY: a map value.
        unsafe {
            if (*hints).owner == id {
                (*hints).owner = 0;
            }
        }
    }
    if group_dead == 0 {
        return 0;
    }
    if mode() == mode::SET {
        let _ = TGIDS.remove(&tgid);
    }
    emit_with(header(EventKind::Exit, 0, id), true);
    0
}

#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
