//! Records out: the header every record starts with, ring reserve/write/submit, the wakeups of
//! the agent (`WAKEUP_BYTES`), and the per-CPU loss counters.

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_ktime_get_ns, bpf_send_signal},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use memprof_common::{
    COUNTER_SLOTS, Counter, DEFAULT_RING_BYTES, EVENT_VERSION, EventHeader, EventKind, PAUSED,
};

use crate::WAKEUP_BYTES;

#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Bytes this CPU wrote to `EVENTS` since its last record that woke the agent. Counted here
/// rather than asked of the ring (`bpf_ringbuf_query`), which costs a helper call per record.
#[map]
static UNWOKEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[inline(always)]
pub(crate) fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub(crate) fn header(kind: EventKind, func: u32, id: u64) -> EventHeader {
    EventHeader {
        version: EVENT_VERSION,
        kind: kind as u16,
        tgid: (id >> 32) as u32,
        tid: id as u32,
        func,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// Writes a record that starts with its `EventHeader`, and with `pause` stops the current
/// process (SIGSTOP) for the agent to continue (SIGCONT) once it has acted on the record; the
/// header's `func` then says `PAUSED`. The stop comes only once the record has its place in the
/// ring, so the agent always learns of a stop it must end.
#[inline(always)]
pub(crate) fn emit_pausing<T: 'static>(event: T, pause: bool) {
    // SAFETY: the record's place in the ring, sized for a `T`.
    emit_pausing_in_place(|record: *mut T| unsafe { record.write(event) }, pause);
}

/// `emit_pausing` for a record written in its place in the ring by `fill` (one too large for
/// the BPF stack).
#[inline(always)]
pub(crate) fn emit_pausing_in_place<T: 'static>(fill: impl FnOnce(*mut T), pause: bool) {
    const SIGSTOP: u32 = 19;
    let Some(mut slot) = EVENTS.reserve::<T>(0) else {
        count(Counter::RingFull);
        return;
    };
    let record = slot.as_mut_ptr();
    fill(record);
    // SAFETY: signals the current task.
    if pause && unsafe { bpf_send_signal(SIGSTOP) } == 0 {
        // SAFETY: every record is #[repr(C)] and starts with its header, which `fill` wrote.
        unsafe { (*record.cast::<EventHeader>()).func |= PAUSED };
    }
    slot.submit(wakeup(true, size_of::<T>() as u64));
}

/// Writes a record; `urgent` ones (a stack seen for the first time, a library load) wake the
/// agent at once so it can read the process's address space while it still exists.
#[inline(always)]
pub(crate) fn emit_with<T: 'static>(event: T, urgent: bool) {
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
pub(crate) fn wakeup(urgent: bool, bytes: u64) -> u64 {
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
pub(crate) fn emit<T: 'static>(event: T) {
    emit_with(event, false);
}
