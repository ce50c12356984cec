//! Process life cycle: forks, execs and exits of traced processes (`mode::SET` grows and
//! shrinks its set here).

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::tracepoint,
    programs::TracePointContext,
};
use memprof_common::{Counter, EventKind, ExecEvent, ForkEvent, mode};

use crate::{
    COMM, FOLLOW,
    calls::forget_thread,
    emit::{count, emit_with, header},
    filter::{TGIDS, floor, mode, traced},
};

const CLONE_THREAD: u64 = 0x10000;

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
    forget_thread(id);
    if group_dead == 0 {
        return 0;
    }
    if mode() == mode::SET {
        let _ = TGIDS.remove(&tgid);
    }
    emit_with(header(EventKind::Exit, 0, id), true);
    0
}
