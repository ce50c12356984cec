//! The ring buffer's records: the header every record starts with, the kinds and the bodies.

/// Version of the ring-buffer record layout. Bump on any change to the types below.
pub const EVENT_VERSION: u16 = 8;

/// What a ring-buffer record describes. Stable values: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum EventKind {
    /// A successful allocation: [`AllocEvent`].
    Alloc = 1,
    /// A release of a block: [`FreeEvent`].
    Free = 2,
    /// A `realloc` whose block was announced as freed at entry failed, so the block lives on:
    /// [`FreeEvent`] carrying the old address.
    ReallocFailed = 3,
    /// An anonymous mapping was created outside any allocator call: [`AllocEvent`].
    Mmap = 4,
    /// A range was unmapped outside any allocator call: [`UnmapEvent`].
    Munmap = 5,
    /// A mapping was moved or resized outside any allocator call: [`RemapEvent`].
    Mremap = 6,
    /// An executable file mapping appeared (a library was loaded); the agent refreshes its view of
    /// the address space: header only.
    ExecMap = 7,
    /// A thread entered a function named by `--phase`: [`PhaseEvent`].
    PhaseEnter = 8,
    /// A thread returned from a function named by `--phase`: [`PhaseEvent`].
    PhaseLeave = 9,
    /// A traced process forked a new process, which is traced from its first instruction:
    /// [`ForkEvent`] (the header names the parent).
    Fork = 10,
    /// A traced process replaced its image (`execve`): [`ExecEvent`]. Its old blocks are gone.
    Exec = 11,
    /// The last thread of a traced process exited: header only.
    Exit = 12,
    /// An allocation or anonymous mapping with the registers and a copy of the user stack at
    /// the return, for the agent to unwind from CFI (`--unwind dwarf`): [`UnwindEvent`],
    /// followed by `stack_len` bytes of stack.
    AllocStack = 13,
    /// With byte sampling: a `realloc` whose old block was sampled (and announced as freed at
    /// entry) succeeded, but its new block was not sampled. The agent settles the provisional
    /// free without a new block: [`FreeEvent`] carrying the old address.
    ReallocSettled = 14,
    /// A traced process's new child, before its first instruction: it stopped itself and
    /// waits for the agent to attach its probes and continue it ([`EventHeader`] only; `tgid`
    /// is the child).
    ChildPaused = 15,
    /// A release of a block, with the Python frames of the thread that released it (only
    /// while Python phases are traced, `PY_FREES`): [`PyFreeEvent`].
    PyFree = 16,
}

impl EventKind {
    /// Decodes a wire value; `None` for values this build does not know.
    pub const fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Alloc,
            2 => Self::Free,
            3 => Self::ReallocFailed,
            4 => Self::Mmap,
            5 => Self::Munmap,
            6 => Self::Mremap,
            7 => Self::ExecMap,
            8 => Self::PhaseEnter,
            9 => Self::PhaseLeave,
            10 => Self::Fork,
            11 => Self::Exec,
            12 => Self::Exit,
            13 => Self::AllocStack,
            14 => Self::ReallocSettled,
            15 => Self::ChildPaused,
            16 => Self::PyFree,
            _ => return None,
        })
    }
}

/// The allocator entry point behind an event. Stable values: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum AllocFn {
    Malloc = 1,
    Calloc = 2,
    Realloc = 3,
    Reallocarray = 4,
    Free = 5,
    PosixMemalign = 6,
    AlignedAlloc = 7,
    Memalign = 8,
    Valloc = 9,
    Pvalloc = 10,
    Mmap = 11,
    Munmap = 12,
    Mremap = 13,
    /// `--kernel`: `kmalloc` and `kfree` (the `kmem:kmalloc` and `kmem:kfree` tracepoints).
    Kmalloc = 14,
    /// `--kernel`: objects of a slab cache (`kmem:kmem_cache_alloc`, `kmem:kmem_cache_free`).
    KmemCache = 15,
    /// `--kernel`: pages from the page allocator (`kmem:mm_page_alloc`, `kmem:mm_page_free`),
    /// except those that become the process's own (movable pages: anonymous memory, page cache).
    Page = 16,
    /// `--kernel`: per-CPU areas (`percpu:percpu_alloc_percpu`, `percpu:free_percpu`).
    Percpu = 17,
}

impl AllocFn {
    /// Every entry point, in wire order.
    pub const ALL: [Self; 17] = [
        Self::Malloc,
        Self::Calloc,
        Self::Realloc,
        Self::Reallocarray,
        Self::Free,
        Self::PosixMemalign,
        Self::AlignedAlloc,
        Self::Memalign,
        Self::Valloc,
        Self::Pvalloc,
        Self::Mmap,
        Self::Munmap,
        Self::Mremap,
        Self::Kmalloc,
        Self::KmemCache,
        Self::Page,
        Self::Percpu,
    ];

    /// Decodes a wire value; `None` for values this build does not know.
    pub const fn from_u32(v: u32) -> Option<Self> {
        if v == 0 || v as usize > Self::ALL.len() {
            return None;
        }
        Some(Self::ALL[v as usize - 1])
    }

    /// The C name of the function.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Malloc => "malloc",
            Self::Calloc => "calloc",
            Self::Realloc => "realloc",
            Self::Reallocarray => "reallocarray",
            Self::Free => "free",
            Self::PosixMemalign => "posix_memalign",
            Self::AlignedAlloc => "aligned_alloc",
            Self::Memalign => "memalign",
            Self::Valloc => "valloc",
            Self::Pvalloc => "pvalloc",
            Self::Mmap => "mmap",
            Self::Munmap => "munmap",
            Self::Mremap => "mremap",
            Self::Kmalloc => "kmalloc",
            Self::KmemCache => "kmem_cache",
            Self::Page => "page",
            Self::Percpu => "percpu",
        }
    }

    /// Whether the kernel allocated it on the process's behalf (`--kernel`): its address is
    /// not in the process's address space.
    pub const fn is_kernel(self) -> bool {
        matches!(
            self,
            Self::Kmalloc | Self::KmemCache | Self::Page | Self::Percpu
        )
    }
}

/// `EventHeader::func` of an `ExecMap`, `Exec` or `ChildPaused` record: the process stopped
/// itself (SIGSTOP) and waits for the agent to continue it (SIGCONT).
pub const PAUSED: u32 = 1 << 31;

/// First bytes of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// [`EVENT_VERSION`] of the producer.
    pub version: u16,
    /// An [`EventKind`] value.
    pub kind: u16,
    /// Process id (thread group id).
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    /// An [`AllocFn`] value: the entry point that produced the record (0 for phase records).
    pub func: u32,
    /// `bpf_ktime_get_ns()` when the record was produced (CLOCK_MONOTONIC).
    pub ts_ns: u64,
}

/// A block came into existence (`EventKind::Alloc`, `EventKind::Mmap`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocEvent {
    pub header: EventHeader,
    /// Start address of the block.
    pub addr: u64,
    /// Requested size in bytes (calloc: nmemb * size).
    pub size: u64,
    /// Key in the `STACKS` map, or [`NO_STACK`].
    pub stack: u64,
    /// Key in the `PY_STACKS` map: the Python frames of the allocating thread, or
    /// [`NO_STACK`] (not a Python thread the agent registered, or no frame running).
    pub py_stack: u64,
}

/// A block was released (`EventKind::Free`, `EventKind::ReallocFailed`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreeEvent {
    pub header: EventHeader,
    pub addr: u64,
}

/// A block was released by a thread whose Python frames are recorded (`EventKind::PyFree`):
/// the Python phases it was released in are the agent's to tell.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyFreeEvent {
    pub header: EventHeader,
    pub addr: u64,
    /// As [`AllocEvent::py_stack`]: the Python frames of the releasing thread, or
    /// [`NO_STACK`] (none running, or not a Python thread the agent registered).
    pub py_stack: u64,
}

/// A range was unmapped (`EventKind::Munmap`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnmapEvent {
    pub header: EventHeader,
    pub addr: u64,
    pub len: u64,
}

/// A mapping moved or changed size (`EventKind::Mremap`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemapEvent {
    pub header: EventHeader,
    pub old_addr: u64,
    pub old_len: u64,
    pub new_addr: u64,
    pub new_len: u64,
}

/// A thread entered or left a phase function (`EventKind::PhaseEnter`, `EventKind::PhaseLeave`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseEvent {
    pub header: EventHeader,
    /// Index of the phase in the agent's `--phase` list (the probe's attach cookie).
    pub phase: u32,
    pub _pad: u32,
}

/// A traced process forked (`EventKind::Fork`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkEvent {
    pub header: EventHeader,
    /// Process id of the new process.
    pub child: u32,
    pub _pad: u32,
}

/// Bytes of a new image's command line an [`ExecEvent`] carries at most.
pub const EXEC_ARGS: usize = 256;

/// A traced process replaced its image (`EventKind::Exec`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// The new process name (the kernel's `comm`, NUL-padded): the process may be gone before
    /// the agent can read it.
    pub comm: [u8; 16],
    /// Bytes of `args` filled (0: the kernel could not read them).
    pub args_len: u32,
    /// How many arguments the command line has (`args` may hold fewer, or more than them).
    pub argc: u32,
    /// The start of the command line the new image got (its arguments, each ending in a NUL,
    /// as `/proc/PID/cmdline` has them), read from its stack at the exec: the process may be
    /// gone, or have exec'd again, before the agent reads `/proc`.
    pub args: [u8; EXEC_ARGS],
}

/// Largest copy of the user stack an [`UnwindEvent`] carries.
pub const MAX_STACK_COPY: u32 = 16384;

/// Default copy of the user stack for `--unwind dwarf`.
pub const DEFAULT_STACK_COPY: u32 = 8192;

/// An allocation with what unwinding it needs (`EventKind::AllocStack`). The record is
/// `size_of::<UnwindEvent>() + stack_len` bytes long: the copy of the stack from `sp` up follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindEvent {
    pub header: EventHeader,
    pub addr: u64,
    pub size: u64,
    /// Instruction pointer, stack pointer and frame pointer at the allocator's return (the
    /// caller's state).
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Bytes of stack copied from `sp` (0 when the copy failed).
    pub stack_len: u32,
    /// Nonzero for an anonymous mapping (`EventKind::Mmap`), zero for a heap block.
    pub mmap: u32,
    /// As [`AllocEvent::py_stack`].
    pub py_stack: u64,
}
