//! Kernel programs: uprobes on the target's allocator entry points and uretprobes on their
//! returns, which turn calls into ring-buffer records (see `memprof_common`).
//!
//! This file holds the globals the agent sets at load time and the module list. The agent finds
//! globals, maps and programs by name: their names are an interface. The programs and maps, by
//! family:
//! - `alloc`: the allocator entry probes, `free`, and the one return probe they share.
//! - `mmap`: libc's `mmap`/`mremap`/`munmap` and the `mmap` syscall tracepoints.
//! - `phases`: the entry and return probes of `--phase` functions.
//! - `lifecycle`: fork, exec and exit tracepoints.
//! - `kmem`: `--kernel`, the kmem and percpu tracepoints.
//!
//! and the helpers they share:
//! - `filter`: which processes and threads are traced.
//! - `calls`: per-thread call state (entry to return) and the sampling decision.
//! - `emit`: record headers, ring reserve/submit, wakeups, counters.
//! - `stack`: user stacks: the frame-pointer walk, its stack windows, `STACKS`.
//! - `tables`: stacks walked with the agent's unwind tables (`unwind::TABLES`).
//! - `dwarf`: stack copies for the agent to unwind (`unwind::DWARF`).
//! - `python`: Python frames of CPython threads.
#![no_std]
#![no_main]
// The BPF target declares no compare-and-exchange for `core::sync::atomic`; the kernel has one.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod alloc;
mod calls;
mod dwarf;
mod emit;
mod filter;
mod kmem;
mod lifecycle;
mod mmap;
mod phases;
mod python;
mod reuse;
mod stack;
mod tables;

use memprof_common::{DEFAULT_CALL_SLOTS, KmemFields, mode, unwind};

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

/// Nonzero: every stack is walked afresh, none reused (`reuse`; `memprof trace
/// --no-walk-reuse`, for tests).
#[unsafe(no_mangle)]
static NO_WALK_REUSE: u32 = 0;

/// Nonzero: each traced process has probes of its own, so a new child stops itself until the
/// agent attached its probes (`lifecycle::fork_child`).
#[unsafe(no_mangle)]
static PAUSE_CHILDREN: u32 = 0;

/// With tables: a process that execs or maps code stops (SIGSTOP) until the agent has put the
/// code's table and the process's mappings in and continues it (`tables::pause_for_code`).
#[unsafe(no_mangle)]
static PAUSE_FOR_CODE: u32 = 0;

/// Nonzero: frees record the Python frames of the freeing thread (`PyFreeEvent`), for phases
/// named by Python function (`--phase NAME=py:QUALNAME`); set by the agent.
#[unsafe(no_mangle)]
static PY_FREES: u32 = 0;

/// Mean sampling interval in bytes (`--sample-bytes`); 0 records every allocation. Set by the
/// agent, at most `MAX_SAMPLE_MEAN`.
#[unsafe(no_mangle)]
static SAMPLE_BYTES: u64 = 0;

/// `--kernel`: where the kmem and percpu tracepoints keep their fields (`kmem`); set by the
/// agent, which reads them from tracefs. Until then (`ready` 0) those programs do nothing.
#[unsafe(no_mangle)]
static KMEM: KmemFields = KmemFields {
    kmalloc_ptr: 0,
    kmalloc_bytes: 0,
    kfree_ptr: 0,
    cache_alloc_ptr: 0,
    cache_alloc_bytes: 0,
    cache_free_ptr: 0,
    page_alloc_pfn: 0,
    page_alloc_order: 0,
    page_alloc_migratetype: 0,
    page_free_pfn: 0,
    page_free_order: 0,
    percpu_alloc_ptr: 0,
    percpu_alloc_bytes: 0,
    percpu_free_ptr: 0,
    ready: 0,
    _pad: 0,
};

#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
