//! Which processes and threads the programs report on: `MODE` picks one process, a set
//! (`TGIDS`, which `lifecycle` grows and shrinks) or all of them (optionally one cgroup's).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid},
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use memprof_common::{DEFAULT_TGID_ENTRIES, mode};

use crate::{CGROUP_ID, FLOOR, MODE, TARGET_TGID};

#[inline(always)]
fn target() -> u32 {
    // SAFETY: a read of a global the loader patches; volatile so it is not folded to 0.
    unsafe { core::ptr::read_volatile(&TARGET_TGID) }
}

#[inline(always)]
pub(crate) fn mode() -> u32 {
    // SAFETY: a read of a global the loader patches.
    unsafe { core::ptr::read_volatile(&MODE) }
}

#[inline(always)]
pub(crate) fn floor() -> bool {
    // SAFETY: a read of a global the loader patches.
    unsafe { core::ptr::read_volatile(&FLOOR) != 0 }
}

/// `mode::SET`: the traced processes.
#[map]
pub(crate) static TGIDS: HashMap<u32, u32> = HashMap::with_max_entries(DEFAULT_TGID_ENTRIES, 0);

/// How many times the kernel programs changed `TGIDS` (slot 0; the agent fills it only before
/// the probes are attached): a per-CPU answer taken at an older count is asked again.
#[map]
static TGIDS_CHANGES: Array<u64> = Array::with_max_entries(1, 0);

/// Slots of each CPU's cache of `TGIDS` answers (a power of two).
const TRACED_SLOTS: usize = 64;

/// Per CPU, `TGIDS` answers by process, each one word (so a program preempted while writing
/// one leaves no half answer): the tgid in the high half, the low 31 bits of `TGIDS_CHANGES`
/// when it was asked, then whether it is traced. The allocator's every call asks, and a hash
/// lookup costs several times an array's.
#[map]
static TRACED_CACHE: PerCpuArray<[u64; TRACED_SLOTS]> = PerCpuArray::with_max_entries(1, 0);

/// Adds process `tgid` to `TGIDS`; whether it is there.
#[inline(always)]
pub(crate) fn add_tgid(tgid: u32) -> bool {
    let added = TGIDS.insert(&tgid, &1, 0).is_ok();
    changed_tgids();
    added
}

/// Removes process `tgid` from `TGIDS`.
#[inline(always)]
pub(crate) fn remove_tgid(tgid: u32) {
    let _ = TGIDS.remove(&tgid);
    changed_tgids();
}

/// Counts a change of `TGIDS`, after making it: an answer cached before the count moved is
/// taken again.
#[inline(always)]
fn changed_tgids() {
    if let Some(p) = TGIDS_CHANGES.get_ptr_mut(0) {
        // SAFETY: an aligned u64 in a map value, updated atomically.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, 1) };
    }
}

/// Whether `tgid` is in `TGIDS`: from this CPU's cache when no change came since it was asked.
#[inline(always)]
fn in_tgids(tgid: u32) -> bool {
    let (Some(changes), Some(cache)) = (TGIDS_CHANGES.get_ptr(0), TRACED_CACHE.get_ptr_mut(0))
    else {
        return TGIDS.get_ptr(&tgid).is_some();
    };
    // SAFETY: an aligned u64 in a map value (other CPUs add to it atomically); volatile, so it
    // is read before the lookup below.
    let changes = unsafe { core::ptr::read_volatile(changes) };
    let tag = u64::from(tgid) << 32 | (changes & 0x7fff_ffff) << 1;
    // SAFETY: this CPU's value.
    let entry = unsafe { &mut (*cache)[tgid as usize & (TRACED_SLOTS - 1)] };
    if *entry & !1 == tag {
        return *entry & 1 != 0;
    }
    let traced = TGIDS.get_ptr(&tgid).is_some();
    *entry = tag | u64::from(traced);
    traced
}

/// Whether process `tgid` (the current one) is traced.
#[inline(always)]
pub(crate) fn traced(tgid: u32) -> bool {
    match mode() {
        mode::ONE => tgid == target(),
        mode::SET => in_tgids(tgid),
        _ => {
            // SAFETY: a read of a global the loader patches.
            let cgroup = unsafe { core::ptr::read_volatile(&CGROUP_ID) };
            // SAFETY: helper without arguments.
            tgid != target() && (cgroup == 0 || unsafe { bpf_get_current_cgroup_id() } == cgroup)
        }
    }
}

/// The calling thread's `pid_tgid` if it belongs to the target process.
#[inline(always)]
pub(crate) fn traced_thread() -> Option<u64> {
    if floor() {
        return None;
    }
    let id = bpf_get_current_pid_tgid();
    traced((id >> 32) as u32).then_some(id)
}
