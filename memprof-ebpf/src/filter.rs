//! Which processes and threads the programs report on: `MODE` picks one process, a set
//! (`TGIDS`, which `lifecycle` grows and shrinks) or all of them (optionally one cgroup's).

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid},
    macros::map,
    maps::HashMap,
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

/// Whether process `tgid` (the current one) is traced.
#[inline(always)]
pub(crate) fn traced(tgid: u32) -> bool {
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

/// The calling thread's `pid_tgid` if it belongs to the target process.
#[inline(always)]
pub(crate) fn traced_thread() -> Option<u64> {
    if floor() {
        return None;
    }
    let id = bpf_get_current_pid_tgid();
    traced((id >> 32) as u32).then_some(id)
}
