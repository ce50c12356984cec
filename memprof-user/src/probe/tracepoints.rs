//! The tracepoint programs: library loads and the process life cycle (always), the kmem
//! and percpu ones with `--kernel` (`kernel`).

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    programs::{TracePoint, trace_point::TracePointLinkId},
};

/// Tracepoint links with the name of their program.
pub(super) type Tracepoints = Vec<(&'static str, TracePointLinkId)>;

/// Library loads and the process life cycle; returns the links of `fork_child`, which the
/// end of a trace detaches first (see `Detaching::detach`), and the others by program.
pub(super) fn attach_tracepoints(ebpf: &mut Ebpf) -> Result<(Vec<TracePointLinkId>, Tracepoints)> {
    let mut fork_child = Vec::new();
    let mut others = Vec::new();
    for (program, category, name) in [
        ("sys_enter_mmap", "syscalls", "sys_enter_mmap"),
        ("sys_exit_mmap", "syscalls", "sys_exit_mmap"),
        ("task_newtask", "task", "task_newtask"),
        ("sched_process_exec", "sched", "sched_process_exec"),
        ("sched_process_exit", "sched", "sched_process_exit"),
        ("fork_child", "syscalls", "sys_exit_fork"),
        ("fork_child", "syscalls", "sys_exit_vfork"),
        ("fork_child", "syscalls", "sys_exit_clone"),
        ("fork_child", "syscalls", "sys_exit_clone3"),
    ] {
        let link = attach_one(ebpf, program, category, name)?;
        if program == "fork_child" {
            fork_child.push(link);
        } else {
            others.push((program, link));
        }
    }
    Ok((fork_child, others))
}

/// Loads `program` (once) and attaches it to tracepoint `category:name`.
pub(super) fn attach_one(
    ebpf: &mut Ebpf,
    program: &'static str,
    category: &str,
    name: &str,
) -> Result<TracePointLinkId> {
    let tp: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("the eBPF object has no program {program}"))?
        .try_into()?;
    if tp.fd().is_err() {
        tp.load()
            .with_context(|| format!("the kernel rejected program {program}"))?;
    }
    tp.attach(category, name)
        .with_context(|| format!("failed to attach to tracepoint {category}:{name}"))
}
