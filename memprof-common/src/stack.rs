//! User stacks as the kernel stores them.

/// Maximum number of frames the kernel records per user stack (the kernel's
/// `PERF_MAX_STACK_DEPTH`).
pub const MAX_STACK_DEPTH: usize = 127;

/// Stack key recorded when the kernel could not capture the stack (see [`Counter::StackLost`]).
pub const NO_STACK: u64 = 0;

/// A user stack as the kernel stores it in the `STACKS` map: return addresses, innermost first,
/// zero-filled after the last frame. Stacks are keyed by a 64-bit hash of their frames, so a key
/// names one stack for the whole trace (unlike `bpf_get_stackid` ids, which collide per bucket).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackTrace {
    pub ips: [u64; MAX_STACK_DEPTH],
    /// How a table walk ended (`unwind_end`; not part of the key).
    pub end: u64,
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
