//! What the kernel programs counted besides events: records and calls they could not trace
//! ([`KernelLosses`]) and, with `--probe-stats`, each program's runs and time ([`ProbeStat`]).

use serde::Serialize;

/// Losses the kernel programs counted (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelLosses {
    /// Records dropped because the ring buffer was full.
    pub ring_full: u64,
    /// Allocator calls not traced because the per-thread state map was full.
    pub inflight_full: u64,
    /// Allocations recorded without a stack (stack map full or colliding, or a stack copy
    /// left out because the ring was more than half full).
    pub stack_lost: u64,
    /// Allocator returns whose entry was not seen (calls already running at attach).
    pub orphan_returns: u64,
    /// New processes not followed because the kernel's process set was full.
    pub processes_missed: u64,
    /// Records of executable mappings the kernel dropped (frames in those may go unnamed).
    pub mapping_records_lost: u64,
    /// With `--sample-bytes`: sampled allocations dropped because the kernel's map of sampled
    /// live blocks was full.
    pub sampled_full: u64,
    /// With `--kernel`: kernel allocations not recorded because the kernel's map of the
    /// traced processes' kernel blocks was full.
    pub kmem_full: u64,
}

/// One kernel program's runs and its mean time per run (`--probe-stats`): the work of memprof's
/// programs, without the trap that enters them. With its size as loaded (the instructions left
/// once the verifier removed the code the loader's settings make dead: `--kernel-log off`
/// removes the logging) and the instructions the verifier processed to accept it (the load
/// time's largest part).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProbeStat {
    pub program: String,
    pub runs: u64,
    pub ns_per_run: f64,
    pub instructions: u64,
    pub verified_instructions: u64,
}

impl ProbeStat {
    /// From the kernel's statistics and program information (`xlated_prog_len` bytes,
    /// `verified_insns`).
    pub fn new(
        program: &str,
        runs: u64,
        run_time_ns: u64,
        xlated_bytes: u64,
        verified: u64,
    ) -> Self {
        Self {
            program: program.to_string(),
            runs,
            instructions: xlated_bytes / 8,
            verified_instructions: verified,
            ns_per_run: if runs == 0 {
                0.0
            } else {
                (run_time_ns as f64 / runs as f64 * 10.0).round() / 10.0
            },
        }
    }
}
