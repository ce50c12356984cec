//! Process life cycle: forks, execs and exits of traced processes (`mode::SET` grows and
//! shrinks its set here).

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf,
        bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use aya_log_ebpf::{debug, info, warn};
use memprof_common::{Counter, EXEC_ARGS, EventKind, ExecEvent, ForkEvent, mode};

use crate::{
    COMM, FOLLOW, PAUSE_CHILDREN,
    calls::forget_thread,
    emit::{count, emit_pausing, emit_pausing_in_place, emit_with, header},
    filter::{add_tgid, floor, mode, remove_tgid, traced},
    stack::copy_stack,
    tables::{bump_epoch, pause_for_code},
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
    if mode() == mode::SET && !add_tgid(child) {
        count(Counter::TgidsFull);
        warn!(
            &ctx,
            "process {} not followed: the set of traced processes is full", child
        );
        return 0;
    }
    debug!(&ctx, "process {} forked {}", (id >> 32) as u32, child);
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
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    if floor() {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if !traced(tgid) {
        if mode() != mode::SET || !comm_matches() {
            return 0;
        }
        if !add_tgid(tgid) {
            count(Counter::TgidsFull);
            warn!(
                &ctx,
                "process {} not traced: the set of traced processes is full", tgid
            );
            return 0;
        }
        info!(&ctx, "process {} joins the trace by its name", tgid);
    }
    bump_epoch(tgid);
    emit_pausing_in_place::<ExecEvent>(
        |e| {
            // SAFETY: the record's place in the ring, written field by field.
            unsafe {
                (*e).header = header(EventKind::Exec, 0, id);
                (*e).comm = bpf_get_current_comm().unwrap_or([0; 16]);
                let (len, argc) = exec_args(&raw mut (*e).args);
                (*e).args_len = len;
                (*e).argc = argc;
            }
        },
        pause_for_code(),
    );
    0
}

/// Copies the start of the new image's command line into `dst`: the bytes copied (0: none) and
/// the number of arguments.
///
/// At this tracepoint the exec is done: the thread's saved user registers (`bpf_task_pt_regs`)
/// hold the new stack pointer, where the ABI's initial stack lies: argc, argv[], a null, envp[].
/// The argument strings lie one after the other from argv[0] up to the first environment
/// string (without an environment, the copy runs on into the strings after them). They lie on
/// the new stack, so `copy_stack` reads them.
#[inline(always)]
fn exec_args(dst: *mut [u8; EXEC_ARGS]) -> (u32, u32) {
    // SAFETY: helpers without preconditions beyond their arguments, which the verifier checks;
    // user and kernel memory is read through them.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
        let Ok(sp) = bpf_probe_read_kernel(&raw const (*regs).rsp) else {
            return (0, 0);
        };
        let word = |addr: u64| bpf_probe_read_user(addr as *const u64).ok();
        let Some(argc) = word(sp) else {
            return (0, 0);
        };
        if argc == 0 || argc > 1 << 20 {
            return (0, 0);
        }
        let Some(argv0) = word(sp + 8) else {
            return (0, argc as u32);
        };
        let want = match word(sp + 8 * (argc + 2)) {
            Some(env) if env > argv0 => (env - argv0).min(EXEC_ARGS as u64),
            _ => EXEC_ARGS as u64,
        } as u32;
        if want == 0 || want > EXEC_ARGS as u32 {
            return (0, argc as u32);
        }
        if !copy_stack(dst.cast(), want, argv0) {
            return (0, argc as u32);
        }
        (want, argc as u32)
    }
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

/// The child side of a traced process's fork (or clone of a process, or vfork), at the
/// system call's exit, before the child's first instruction. With probes of each process's
/// own (`PAUSE_CHILDREN`), the child has none yet: it stops itself (SIGSTOP) and the agent,
/// told by the record, attaches its probes and continues it (SIGCONT), so none of its
/// allocations is missed.
#[tracepoint]
pub fn fork_child(ctx: TracePointContext) -> u32 {
    // SAFETY: a read of a global the loader patches.
    if floor() || unsafe { core::ptr::read_volatile(&PAUSE_CHILDREN) } == 0 {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    // A new thread is no new process; the parent's side returns the child's pid.
    if id as u32 != tgid || !traced(tgid) {
        return 0;
    }
    // struct syscall_trace_exit: common header (8 bytes), int nr, long ret at 16.
    // SAFETY: an offset inside the tracepoint record, checked by the helper.
    if unsafe { ctx.read_at::<i64>(16) }.unwrap_or(-1) != 0 {
        return 0;
    }
    debug!(&ctx, "process {} waits for its probes", tgid);
    emit_pausing(header(EventKind::ChildPaused, 0, id), true);
    0
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
        remove_tgid(tgid);
    }
    emit_with(header(EventKind::Exit, 0, id), true);
    0
}
