//! The `mmap` syscall tracepoints that report executable file mappings (libc's `mmap`,
//! `mremap` and `munmap` calls are `alloc`'s).

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use memprof_common::{AllocFn, EventKind};

use crate::{
    alloc::MAP_ANONYMOUS,
    emit::{emit_pausing, header},
    filter::traced_thread,
    tables::{bump_epoch, pause_for_code},
};

const PROT_EXEC: u64 = 0x4;

/// Threads inside an `mmap` syscall that maps a file executable (set at entry, taken at exit).
#[map]
static EXEC_MAPS: HashMap<u64, u32> = HashMap::with_max_entries(1024, 0);

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
        let _ = EXEC_MAPS.insert(&id, &1, 0);
    }
    0
}

#[tracepoint]
pub fn sys_exit_mmap(_ctx: TracePointContext) -> u32 {
    let Some(id) = traced_thread() else {
        return 0;
    };
    if EXEC_MAPS.remove(&id).is_ok() {
        bump_epoch((id >> 32) as u32);
        emit_pausing(
            header(EventKind::ExecMap, AllocFn::Mmap as u32, id),
            pause_for_code(),
        );
    }
    0
}
