//! What the agent sets at load time: map sizes, the process-selection and unwinding modes, and
//! the loss counters the programs keep.

/// Default size of the `EVENTS` ring buffer in bytes (a power of two, as the kernel requires).
pub const DEFAULT_RING_BYTES: u32 = 16 << 20;

/// Default number of distinct user stacks the `STACKS` map holds.
pub const DEFAULT_STACK_ENTRIES: u32 = 64 * 1024;
/// Size of each CPU's cache of keys known to be in the stack map (a power of two); the agent
/// empties it when it removes stacks from the map.
pub const SEEN_STACKS: usize = 64;

/// Default number of threads that can be inside an allocator call at once, beyond those in
/// per-thread slots (`DEFAULT_CALL_SLOTS`).
pub const DEFAULT_INFLIGHT_ENTRIES: u32 = 16 * 1024;

/// Default number of per-thread call slots (a power of two): thread `tid` uses slot
/// `tid % slots`, and a thread whose slot another thread's call holds uses the hash.
pub const DEFAULT_CALL_SLOTS: u32 = 16 * 1024;

/// Counters the kernel programs keep in the per-CPU `COUNTERS` array. Stable indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Counter {
    /// Events dropped because the ring buffer was full.
    RingFull = 0,
    /// Allocations whose stack could not be captured or stored (map full, fault), or whose
    /// stack copy was left out because the ring was more than half full.
    StackLost = 1,
    /// Allocator calls not traced because the in-flight map was full.
    InflightFull = 2,
    /// Allocator returns with no matching entry state (probe attached mid-call).
    OrphanReturn = 3,
    /// New processes not followed because the `TGIDS` map was full.
    TgidsFull = 4,
    /// Table walks served from a CPU's cache of whole walks (not a loss: how often one read
    /// of the stack, checked against the words an earlier walk read, stood for a walk).
    WalkCached = 5,
    /// With byte sampling: sampled allocations dropped because the `SAMPLED` map of sampled
    /// live blocks was full (their frees could not have been matched).
    SampledFull = 6,
    /// `--kernel`: kernel allocations not recorded because the `KMEM_LIVE` map of the traced
    /// processes' kernel blocks was full (their frees could not have been matched).
    KmemFull = 7,
}

/// Number of [`Counter`] slots.
pub const COUNTER_SLOTS: u32 = 8;

/// How the kernel programs take user stacks (the `UNWIND` global).
pub mod unwind {
    /// `bpf_get_stack`: frame pointers, walked in the kernel.
    pub const FRAME_POINTERS: u32 = 0;
    /// Registers and a copy of the stack, unwound by the agent from the objects' CFI.
    pub const DWARF: u32 = 1;
    /// Unwind tables from the objects' CFI, walked in the kernel (`tables`).
    pub const TABLES: u32 = 2;
}

/// How the kernel programs choose the processes they report on (the `MODE` global).
pub mod mode {
    /// Only the process `TARGET_TGID`.
    pub const ONE: u32 = 0;
    /// The processes in the `TGIDS` map (the agent seeds it; forks of members join it when
    /// `FOLLOW` is set, and so do processes that exec into the name `COMM` when it is set).
    pub const SET: u32 = 1;
    /// Every process except `TARGET_TGID` (memprof itself), restricted to the cgroup
    /// `CGROUP_ID` when it is nonzero.
    pub const ALL: u32 = 2;
}

/// Size of the `TGIDS` map: processes followed at once in [`mode::SET`].
pub const DEFAULT_TGID_ENTRIES: u32 = 16 * 1024;

/// Registers an entry program can read an argument from when placement moved its probe past
/// a copy of the argument (see [`cookie`]).
pub const ARG_REGS: [&str; 9] = ["rdi", "rsi", "rdx", "rcx", "r8", "r9", "rax", "r10", "r11"];

/// The attach cookie of the allocator entry programs: which function a probe sits in and where
/// its arguments are. Bits 0–7: the `AllocFn`; bits 8 + 4k to 11 + 4k: where ABI argument k
/// (0 to 5) is read: 0 from its own register, n from `ARG_REGS[n - 1]`.
pub mod cookie {
    use crate::AllocFn;

    /// The cookie of a probe in a function of kind `func` whose arguments are at `arg_regs`.
    pub const fn encode(func: AllocFn, arg_regs: [u8; 6]) -> u64 {
        let mut c = func as u64;
        let mut k = 0;
        while k < 6 {
            c |= ((arg_regs[k] & 0xf) as u64) << (8 + 4 * k);
            k += 1;
        }
        c
    }

    /// The `AllocFn` value of cookie `c`.
    #[inline(always)]
    pub const fn func(c: u64) -> u32 {
        (c & 0xff) as u32
    }

    /// Where ABI argument `k` is read: 0 for its own register, else `ARG_REGS` index + 1.
    #[inline(always)]
    pub const fn arg_reg(c: u64, k: usize) -> u32 {
        ((c >> (8 + 4 * k)) & 0xf) as u32
    }
}

/// Uprobe sessions (kernel 6.10+): the entry program's return value decides whether the return
/// half runs. The session kfuncs cannot be called by name from the kernel programs' language:
/// the programs call these helper ids, which no kernel has, and the agent rewrites each such
/// call into a call of the kfunc before it loads the program.
pub mod session {
    /// `bool bpf_session_is_return(void)`.
    pub const IS_RETURN: u32 = 0x7fff_0001;
    /// `__u64 *bpf_session_cookie(void)`.
    pub const COOKIE: u32 = 0x7fff_0002;
    /// The kfuncs' names, by placeholder.
    pub const KFUNCS: [(u32, &str); 2] = [
        (IS_RETURN, "bpf_session_is_return"),
        (COOKIE, "bpf_session_cookie"),
    ];
    /// Entry return value: run the return half.
    pub const RUN_RETURN: i32 = 0;
    /// Entry return value: skip the return half.
    pub const SKIP_RETURN: i32 = 1;
}

/// Most executable ranges of allocator objects kept per process (`ALLOC_TEXT`).
pub const MAX_TEXT_RANGES: usize = 8;

/// The executable ranges of the allocator objects a process maps (`ALLOC_TEXT`, set by the
/// agent): with sampled sessions, an anonymous mapping an allocator makes for itself outside a
/// recorded call is told apart by its caller lying in one of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TextRanges {
    pub len: u32,
    pub _pad: u32,
    /// `[start, end)` of each range.
    pub ranges: [[u64; 2]; MAX_TEXT_RANGES],
}
