//! Per-thread state of allocator calls, from entry to return, and the sampling decision.
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

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
    sync::atomic::{Ordering, compiler_fence},
};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::{Array, HashMap},
};
use memprof_common::{
    AllocFn, Counter, DEFAULT_CALL_SLOTS, DEFAULT_INFLIGHT_ENTRIES, DEFAULT_SAMPLED_ENTRIES,
    DEFAULT_TGID_ENTRIES, MAX_TEXT_RANGES, TextRanges, exp_interval,
};

use crate::{CALL_SLOT_MASK, SAMPLE_BYTES, emit::count, filter::traced_thread};

#[map]
static INFLIGHT: HashMap<u64, Inflight> = HashMap::with_max_entries(DEFAULT_INFLIGHT_ENTRIES, 0);

/// Allocator calls in flight, one slot per thread id modulo the slot count.
#[map]
static CALLS: Array<CallSlot> = Array::with_max_entries(DEFAULT_CALL_SLOTS, 0);

/// Number of calls in `INFLIGHT` (slot 0): while it is 0, no lookup there is needed.
#[map]
static SPILLED: Array<u64> = Array::with_max_entries(1, 0);

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

/// Arguments of an allocator call in flight on one thread.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Inflight {
    /// `AllocFn` of the outermost call.
    pub(crate) func: u32,
    /// Number of nested allocator calls currently inside the outermost one.
    depth: u32,
    /// Requested size (mmap/mremap: length; mremap: new length).
    pub(crate) size: u64,
    /// realloc: the old block; posix_memalign: the out pointer; mmap: flags; mremap: old address.
    pub(crate) arg: u64,
    /// mremap: old length.
    pub(crate) arg2: u64,
    /// `SAMPLED` (always, without sampling), `OLD_SAMPLED`.
    pub(crate) flags: u32,
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
pub(crate) struct ThreadHints {
    owner: u64,
    /// With sampling: the bytes left until the next sample point. Redrawn when a thread takes
    /// the slot over, which the exponential distribution's lack of memory allows (the distance
    /// left of any draw is again exponential with the same mean).
    sample_left: u64,
    /// `unwind::DWARF`: the top of the thread's stack once a copy found it (0: not known).
    pub(crate) stack_top: u64,
    /// Copies capped at `stack_top` since it was learnt.
    pub(crate) top_uses: u64,
}

/// `Inflight::flags`: the call's block is recorded.
pub(crate) const SAMPLED_FLAG: u32 = 1;
/// `Inflight::flags`: a realloc's old block was sampled and its free announced at entry.
pub(crate) const OLD_SAMPLED_FLAG: u32 = 2;

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
pub(crate) fn thread_hints(id: u64) -> Option<*mut ThreadHints> {
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
    INFLIGHT.get_ptr_mut(&id)
}

/// The state of thread `id`'s allocator call in flight, if any.
#[inline(always)]
pub(crate) fn call_state(id: u64) -> Option<*mut Inflight> {
    call_state_in(call_slot(id), id)
}

/// Records the arguments of an allocator call, or bumps the depth of the call already in flight.
#[inline(always)]
pub(crate) fn enter(func: AllocFn, size: u64, arg: u64, arg2: u64) -> Option<u64> {
    let id = traced_thread()?;
    let slot = call_slot(id);
    if let Some(state) = call_state_in(slot, id) {
        // SAFETY: the state belongs to this thread; only this thread touches it.
        unsafe { (*state).depth += 1 };
        return None;
    }
    let flags = sample_flags(id, func, size);
    claim(slot, id, call(func, size, arg, arg2, flags)).then_some(id)
}

/// What a session's entry decides about its return half.
pub(crate) enum Session {
    /// Not traced, nested in a traced call, or (with sampling) not sampled: no state is kept
    /// and the return half is skipped.
    Skip,
    /// The outermost traced call, whose return half records it.
    Record(u64),
}

/// `enter` for uprobe sessions (see `alloc::alloc_session`): a nested call keeps no depth (its
/// return half is skipped), and with sampling an unsampled call keeps no state either, unless
/// `keep` says its return matters anyway (a realloc whose old block was sampled).
#[inline(always)]
pub(crate) fn enter_session(
    func: AllocFn,
    size: u64,
    arg: u64,
    arg2: u64,
    keep: impl FnOnce(u64) -> u32,
) -> Session {
    let Some(id) = traced_thread() else {
        return Session::Skip;
    };
    let slot = call_slot(id);
    if call_state_in(slot, id).is_some() {
        return Session::Skip;
    }
    let flags = sample_flags(id, func, size) | keep(id);
    if flags == 0 {
        return Session::Skip;
    }
    if claim(slot, id, call(func, size, arg, arg2, flags)) {
        Session::Record(id)
    } else {
        Session::Skip
    }
}

/// The state of a new outermost call.
#[inline(always)]
fn call(func: AllocFn, size: u64, arg: u64, arg2: u64, flags: u32) -> Inflight {
    Inflight {
        func: func as u32,
        depth: 0,
        size,
        arg,
        arg2,
        flags,
        _pad: 0,
    }
}

/// Stores `state` as thread `id`'s call in flight: in its `CALLS` slot when free, else spilled
/// in `INFLIGHT` (counted when that is full).
#[inline(always)]
fn claim(slot: Option<*mut CallSlot>, id: u64, state: Inflight) -> bool {
    if let Some(slot) = slot {
        // SAFETY: a map value; the compare-and-exchange makes this thread its only writer
        // until it sets `owner` back to 0.
        unsafe {
            // The old value tells whether the slot was free: branching on the returned bool
            // emits IR that bpf-linker rejects ("Invalid record").
            let old =
                atomic_cxchg::<u64, { AtomicOrdering::Acquire }, { AtomicOrdering::Relaxed }>(
                    &raw mut (*slot).owner,
                    0,
                    id,
                )
                .0;
            if old == 0 {
                (*slot).state = state;
                return true;
            }
        }
    }
    if INFLIGHT.insert(&id, &state, BPF_NOEXIST as u64).is_err() {
        count(Counter::InflightFull);
        return false;
    }
    if let Some(n) = spilled() {
        add(n, 1);
    }
    true
}

/// Ends the calling thread's allocator call; returns its state when it was the outermost one.
#[inline(always)]
pub(crate) fn leave() -> Option<(u64, Inflight)> {
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

/// Thread `id` is exiting: what it left here goes.
#[inline(always)]
pub(crate) fn forget_thread(id: u64) {
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
        && INFLIGHT.remove(&id).is_ok()
    {
        add(n, u64::MAX);
    }
}

#[inline(always)]
pub(crate) fn sample_mean() -> u64 {
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
pub(crate) fn remember_sampled(id: u64, addr: u64) -> bool {
    if sample_mean() == 0 {
        return true;
    }
    if SAMPLED.insert(&sampled_key(id, addr), &1, 0).is_ok() {
        return true;
    }
    count(Counter::SampledFull);
    false
}

/// Whether a free of `addr` is reported: always without sampling, else when the block was
/// sampled (it is then forgotten).
#[inline(always)]
pub(crate) fn take_sampled(id: u64, addr: u64) -> bool {
    if sample_mean() == 0 {
        return true;
    }
    // A lookup first: most freed blocks were not sampled, and a lookup takes no bucket lock.
    let key = sampled_key(id, addr);
    SAMPLED.get_ptr(&key).is_some() && SAMPLED.remove(&key).is_ok()
}

/// The executable ranges of the allocator objects each process maps (see
/// `alloc::allocators_own_mapping`), set by the agent.
#[map]
static ALLOC_TEXT: HashMap<u32, TextRanges> = HashMap::with_max_entries(DEFAULT_TGID_ENTRIES, 0);

/// Whether `addr` lies in the code of an allocator object process `tgid` maps.
#[inline(always)]
pub(crate) fn in_allocator_text(tgid: u32, addr: u64) -> bool {
    let Some(text) = ALLOC_TEXT.get_ptr(&tgid) else {
        return false;
    };
    // SAFETY: a map value, read only.
    let text = unsafe { &*text };
    let mut i = 0;
    while i < MAX_TEXT_RANGES {
        if i as u32 >= text.len {
            break;
        }
        let [start, end] = text.ranges[i];
        if start <= addr && addr < end {
            return true;
        }
        i += 1;
    }
    false
}

/// Whether the calling thread is inside a traced allocator call.
#[inline(always)]
pub(crate) fn in_flight(id: u64) -> bool {
    call_state(id).is_some()
}
