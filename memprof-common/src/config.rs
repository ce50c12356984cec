//! What the agent sets at load time: map sizes, the process-selection and unwinding modes, and
//! the loss counters the programs keep.

/// Default size of the `EVENTS` ring buffer in bytes (a power of two, as the kernel requires).
pub const DEFAULT_RING_BYTES: u32 = 16 << 20;

/// Default number of distinct user stacks the `STACKS` map holds.
pub const DEFAULT_STACK_ENTRIES: u32 = 64 * 1024;

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
    /// Allocations whose stack could not be captured or stored (map full, fault).
    StackLost = 1,
    /// Allocator calls not traced because the in-flight map was full.
    InflightFull = 2,
    /// Allocator returns with no matching entry state (probe attached mid-call).
    OrphanReturn = 3,
    /// New processes not followed because the `TGIDS` map was full.
    TgidsFull = 4,
    // 5 is reserved.
    /// With byte sampling: sampled allocations dropped because the `SAMPLED` map of sampled
    /// live blocks was full (their frees could not have been matched).
    SampledFull = 6,
}

/// Number of [`Counter`] slots.
pub const COUNTER_SLOTS: u32 = 7;

/// How the kernel programs take user stacks (the `UNWIND` global).
pub mod unwind {
    /// `bpf_get_stack`: frame pointers, walked in the kernel.
    pub const FRAME_POINTERS: u32 = 0;
    /// Registers and a copy of the stack, unwound by the agent from the objects' CFI.
    pub const DWARF: u32 = 1;
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
