//! Wire types shared by the kernel programs and the agent.
//!
//! Every record in the `EVENTS` ring buffer starts with an [`EventHeader`]. The header carries
//! [`EVENT_VERSION`] and a [`EventKind`] value; the agent checks both and the record length before
//! reading the body, so a kernel object and an agent from different builds fail loudly instead of
//! misreading bytes. All types are `#[repr(C)]` with fixed-width fields and explicit padding: no
//! `usize`, no pointers, no Rust enums cross the boundary.
#![no_std]

/// Version of the ring-buffer record layout. Bump on any change to the types below.
pub const EVENT_VERSION: u16 = 3;

/// Maximum number of frames the kernel records per user stack (the kernel's
/// `PERF_MAX_STACK_DEPTH`).
pub const MAX_STACK_DEPTH: usize = 127;

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

/// Stack key recorded when the kernel could not capture the stack (see [`Counter::StackLost`]).
pub const NO_STACK: u64 = 0;

/// A user stack as the kernel stores it in the `STACKS` map: return addresses, innermost first,
/// zero-filled after the last frame. Stacks are keyed by a 64-bit hash of their frames, so a key
/// names one stack for the whole trace (unlike `bpf_get_stackid` ids, which collide per bucket).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackTrace {
    pub ips: [u64; MAX_STACK_DEPTH],
}

impl StackTrace {
    /// The recorded frames.
    pub fn frames(&self) -> &[u64] {
        let n = self
            .ips
            .iter()
            .position(|ip| *ip == 0)
            .unwrap_or(MAX_STACK_DEPTH);
        &self.ips[..n]
    }
}

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
}

impl AllocFn {
    /// Every entry point, in wire order.
    pub const ALL: [Self; 13] = [
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
        }
    }
}

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

/// Default number of sampled live blocks the kernel remembers with `--sample-bytes`.
pub const DEFAULT_SAMPLED_ENTRIES: u32 = 256 * 1024;

/// Largest mean sampling interval the kernel accepts (the countdown arithmetic stays within
/// 64 bits up to here).
pub const MAX_SAMPLE_MEAN: u64 = 1 << 40;

/// A draw from the exponential distribution with mean `mean` bytes, from 32 uniform random bits:
/// the distance to the next sample point of a Poisson process over the allocated bytes (as
/// tcmalloc and jemalloc sample). Integer-only, no loops and no 128-bit arithmetic, so the BPF
/// verifier and backend accept it.
///
/// The result is `floor(-ln(x) * mean)` for `x = (rand + 1) / 2^32` in `(0, 1]`, computed two
/// ways. What decides whether a block of `s` bytes is sampled is `P(draw < s)`, so small draws
/// (`x` near 1, where `-ln(x)` is small) need a small *relative* error:
///
/// - `u = 1 - x < 1/8`: the series `-ln(1 - u) = u + u^2/2 + u^3/3 + u^4/4 + u^5/5` in 32-bit
///   fixed point; the terms left out are below `u^5/6`, a relative error under 5e-6.
/// - otherwise (`-ln(x) > 0.133`): `(32 - log2(rand + 1)) * ln 2`, with `log2` the position of
///   the top bit plus `log2(1 + f)` of the 16-bit mantissa `f` by a quintic fitted by least
///   squares (error under 2.9e-5 in log2 units, so a relative error under 2e-4 here).
///
/// Checked by `exp_interval_samples_with_the_right_probability`: for `s` from `mean/1024` to
/// `4 * mean`, `P(draw < s)` is `1 - exp(-s/mean)` within 1e-4 relative (2e-4 asserted), and
/// the mean draw is `mean` within 1e-5. The largest draw is about 22.2 × `mean` (`rand = 0`);
/// the smallest is 0. `mean` is capped at [`MAX_SAMPLE_MEAN`].
#[inline(always)]
pub fn exp_interval(rand: u32, mean: u64) -> u64 {
    let mean = if mean > MAX_SAMPLE_MEAN {
        MAX_SAMPLE_MEAN
    } else {
        mean
    };
    // u = 1 - x in Q32.
    let k = (u32::MAX - rand) as u64;
    if k < 1 << 29 {
        let u2 = (k * k) >> 32;
        let u3 = (u2 * k) >> 32;
        let u4 = (u3 * k) >> 32;
        let u5 = (u4 * k) >> 32;
        return mul_q32(k + u2 / 2 + u3 / 3 + u4 / 4 + u5 / 5, mean);
    }
    let v = rand as u64 + 1; // 1..=2^32
    // Position of the top bit, by binary search (no ctlz on BPF).
    let mut p: u64 = 0;
    let mut t = v;
    if t >> 16 != 0 {
        t >>= 16;
        p += 16;
    }
    if t >> 8 != 0 {
        t >>= 8;
        p += 8;
    }
    if t >> 4 != 0 {
        t >>= 4;
        p += 4;
    }
    if t >> 2 != 0 {
        t >>= 2;
        p += 2;
    }
    if t >> 1 != 0 {
        p += 1;
    }
    if v >> 32 != 0 {
        p = 32;
    }
    // Mantissa in [2^32, 2^33): its 16 bits below the top one are `f` in Q16.
    let norm = v << (32 - p);
    let f = ((norm >> 16) & 0xffff) as i64;
    // log2(1 + f) in Q16, Horner.
    let mut y: i64 = 3007;
    y = ((y * f) >> 16) - 12741;
    y = ((y * f) >> 16) + 27224;
    y = ((y * f) >> 16) - 46444;
    y = ((y * f) >> 16) + 94491;
    y = (y * f) >> 16;
    let y = if y < 0 {
        0
    } else if y > 0xffff {
        0xffff
    } else {
        y as u64
    };
    // -log2(x) in Q16 times ln 2 in Q32, back to Q32: -ln(x) in Q32 (below 23 * 2^32).
    let neg_log2 = ((32 - p) << 16).saturating_sub(y);
    mul_q32((neg_log2 * LN2_Q32) >> 16, mean)
}

/// ln 2 in 32-bit fixed point.
const LN2_Q32: u64 = 2_977_044_472;

/// `(a * b) >> 32` for `a < 2^40`, `b <= 2^40`, without 128-bit arithmetic (within 1).
#[inline(always)]
fn mul_q32(a: u64, b: u64) -> u64 {
    ((a >> 16) * b + (((a & 0xffff) * b) >> 16)) >> 16
}

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

/// Largest copy of the user stack an [`UnwindEvent`] carries.
pub const MAX_STACK_COPY: u32 = 16384;

/// Default copy of the user stack for `--unwind dwarf`.
pub const DEFAULT_STACK_COPY: u32 = 8192;

/// How the kernel programs take user stacks (the `UNWIND` global).
pub mod unwind {
    /// `bpf_get_stack`: frame pointers, walked in the kernel.
    pub const FRAME_POINTERS: u32 = 0;
    /// Registers and a copy of the stack, unwound by the agent from the objects' CFI.
    pub const DWARF: u32 = 1;
}

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

/// Most Python frames recorded per allocation (innermost first).
pub const MAX_PY_FRAMES: usize = 32;

/// How the kernel program walks the Python frames of one CPython process (the `PY_PROCS` map,
/// keyed by process id): byte offsets of the fields it follows, for that interpreter's version.
/// From a thread state: `tstate_frame` (then `cframe_current_frame` unless it is
/// [`PY_NONE`]) gives the innermost frame; per frame it records the code object
/// (`frame_code`) and the instruction field (`frame_instr`, 8 bytes when `instr_is_pointer`,
/// else 4), skips frames whose `frame_owner` byte is [`PY_FRAME_OWNED_BY_CSTACK`], and
/// follows `frame_previous`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyWalk {
    /// Runtime address of `_PyRuntime`: with the next four offsets, how the program finds the
    /// thread state of a thread the agent has not registered yet (the main interpreter's
    /// threads whose `native_thread_id` is the thread's id; 3.11+, [`PY_NONE`] before).
    pub runtime: u64,
    pub runtime_interpreters_head: u32,
    pub interp_threads_head: u32,
    pub tstate_next: u32,
    pub tstate_native_thread_id: u32,
    pub tstate_frame: u32,
    pub cframe_current_frame: u32,
    pub frame_previous: u32,
    pub frame_code: u32,
    pub frame_instr: u32,
    pub instr_is_pointer: u32,
    pub frame_owner: u32,
    /// Bytes from a frame's start to the end of its furthest field above: the walk copies
    /// them in one read (at most [`PY_FRAME_COPY`]).
    pub frame_span: u32,
    /// Nonzero when frames are `_PyInterpreterFrame`s (3.11+), most of which lie in the
    /// thread's data stack, each caller's just below its callee's: one read then copies
    /// several.
    pub frames_in_data_stack: u32,
    pub _pad: u32,
}

/// Most bytes of one Python frame the kernel walk copies (a power of two).
pub const PY_FRAME_COPY: u32 = 128;

impl PyWalk {
    /// `frame_span` for the frame fields set in `self`, or `None` if they lie beyond
    /// [`PY_FRAME_COPY`].
    pub fn span_of_frame_fields(&self) -> Option<u32> {
        let instr = if self.instr_is_pointer != 0 { 8 } else { 4 };
        let mut span = (self.frame_previous.checked_add(8)?)
            .max(self.frame_code.checked_add(8)?)
            .max(self.frame_instr.checked_add(instr)?);
        if self.frame_owner != PY_NONE {
            span = span.max(self.frame_owner.checked_add(1)?);
        }
        (span <= PY_FRAME_COPY).then_some(span)
    }
}

/// An absent field in [`PyWalk`].
pub const PY_NONE: u32 = u32::MAX;

/// `_PyInterpreterFrame.owner` of a shim frame of the C stack (3.12+).
pub const PY_FRAME_OWNED_BY_CSTACK: u8 = 3;

/// The Python frames of one allocation as the `PY_STACKS` map stores them: (code object
/// address, instruction field) pairs, innermost first, keyed by a hash of the pairs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyStack {
    pub len: u32,
    pub _pad: u32,
    pub frames: [[u64; 2]; MAX_PY_FRAMES],
}

/// A traced process replaced its image (`EventKind::Exec`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// The new process name (the kernel's `comm`, NUL-padded): the process may be gone before
    /// the agent can read it.
    pub comm: [u8; 16],
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

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are repr(C), made of integers, with explicit padding.
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::AllocEvent {}
    unsafe impl aya::Pod for super::FreeEvent {}
    unsafe impl aya::Pod for super::UnmapEvent {}
    unsafe impl aya::Pod for super::RemapEvent {}
    unsafe impl aya::Pod for super::StackTrace {}
    unsafe impl aya::Pod for super::PhaseEvent {}
    unsafe impl aya::Pod for super::ForkEvent {}
    unsafe impl aya::Pod for super::ExecEvent {}
    unsafe impl aya::Pod for super::UnwindEvent {}
    unsafe impl aya::Pod for super::PyWalk {}
    unsafe impl aya::Pod for super::PyStack {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_are_stable() {
        assert_eq!(size_of::<EventHeader>(), 24);
        assert_eq!(size_of::<AllocEvent>(), 56);
        assert_eq!(size_of::<FreeEvent>(), 32);
        assert_eq!(size_of::<UnmapEvent>(), 40);
        assert_eq!(size_of::<RemapEvent>(), 56);
        assert_eq!(size_of::<PhaseEvent>(), 32);
        assert_eq!(size_of::<ForkEvent>(), 32);
        assert_eq!(size_of::<ExecEvent>(), 40);
        assert_eq!(size_of::<UnwindEvent>(), 80);
        assert_eq!(size_of::<PyWalk>(), 64);
    }

    #[test]
    fn enums_round_trip() {
        for f in AllocFn::ALL {
            assert_eq!(AllocFn::from_u32(f as u32), Some(f));
        }
        assert_eq!(AllocFn::from_u32(0), None);
        assert_eq!(AllocFn::from_u32(14), None);
        for k in 1..=14 {
            assert_eq!(EventKind::from_u16(k).map(|k| k as u16), Some(k));
        }
        assert_eq!(EventKind::from_u16(15), None);
        assert_eq!(EventKind::from_u16(14), Some(EventKind::ReallocSettled));
    }

    #[test]
    fn exp_interval_samples_with_the_right_probability() {
        let mean = 1u64 << 16;
        // The mean, over a stratified sample of the whole input range.
        let n = 1u64 << 20;
        let sum: f64 = (0..n)
            .map(|i| exp_interval((i << 12 | 0x800) as u32, mean) as f64)
            .sum();
        let avg = sum / n as f64 / mean as f64;
        assert!((avg - 1.0).abs() < 2e-5, "mean {avg}");
        // P(draw < s) = 1 - exp(-s/mean): only inputs near the top can draw less than s, so
        // those are enumerated (every 61st input from just below the threshold).
        for s in [mean / 1024, mean / 64, mean / 8, mean / 5, mean, 4 * mean] {
            let want = 1.0 - libm_exp(-(s as f64) / mean as f64);
            let lo = (libm_exp(-(s as f64) / mean as f64 * 1.05) * 4294967296.0) as u64;
            let step = 61;
            let hits = (lo..1 << 32)
                .step_by(step)
                .filter(|&r| exp_interval(r as u32, mean) < s)
                .count();
            let got = hits as f64 * step as f64 / 4294967296.0;
            assert!(
                (got / want - 1.0).abs() < 2e-4,
                "s = {s}: P {got}, want {want}"
            );
        }
        assert_eq!(exp_interval(u32::MAX, mean), 0, "x = 1: -ln x = 0");
        let top = exp_interval(0, mean) as f64 / mean as f64;
        assert!((top - 32.0 * core::f64::consts::LN_2).abs() < 1e-3, "{top}");
        // The largest mean does not overflow.
        let big = exp_interval(0, MAX_SAMPLE_MEAN) as f64 / MAX_SAMPLE_MEAN as f64;
        assert!((big - 32.0 * core::f64::consts::LN_2).abs() < 1e-3, "{big}");
    }

    #[test]
    fn python_frame_span_covers_the_furthest_field() {
        let mut walk = PyWalk {
            runtime: 0,
            runtime_interpreters_head: 0,
            interp_threads_head: 0,
            tstate_next: 0,
            tstate_native_thread_id: 0,
            tstate_frame: 0,
            cframe_current_frame: PY_NONE,
            // PyFrameObject of CPython 3.8: f_back, f_code, int f_lasti.
            frame_previous: 24,
            frame_code: 32,
            frame_instr: 104,
            instr_is_pointer: 0,
            frame_owner: PY_NONE,
            frame_span: 0,
            frames_in_data_stack: 0,
            _pad: 0,
        };
        assert_eq!(walk.span_of_frame_fields(), Some(108));
        // _PyInterpreterFrame of 3.12: f_code 0, previous 8, prev_instr 56, char owner 70.
        walk.frame_code = 0;
        walk.frame_previous = 8;
        walk.frame_instr = 56;
        walk.instr_is_pointer = 1;
        walk.frame_owner = 70;
        assert_eq!(walk.span_of_frame_fields(), Some(71));
        walk.frame_owner = PY_NONE;
        assert_eq!(walk.span_of_frame_fields(), Some(64));
        walk.frame_previous = PY_FRAME_COPY - 4;
        assert_eq!(walk.span_of_frame_fields(), None);
        // A field the reader could not place.
        walk.frame_previous = PY_NONE;
        assert_eq!(walk.span_of_frame_fields(), None);
    }

    /// exp for the no_std test (Taylor series after range reduction; ~1e-15 here).
    fn libm_exp(x: f64) -> f64 {
        let n = (x / core::f64::consts::LN_2) as i32;
        let r = x - n as f64 * core::f64::consts::LN_2;
        let (mut term, mut sum) = (1.0, 1.0);
        for k in 1..30 {
            term *= r / k as f64;
            sum += term;
        }
        let scale = if n < 0 { 0.5 } else { 2.0 };
        (0..n.unsigned_abs()).fold(sum, |acc, _| acc * scale)
    }
}
