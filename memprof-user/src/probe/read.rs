//! Reading and writing the kernel programs' maps while tracing: stacks, Python registrations,
//! loss counters and run-time statistics.

use anyhow::{Context as _, Result};
use memprof_common::{COUNTER_SLOTS, Counter, PyWalk};

use super::{
    Tracer,
    counters::{KernelLosses, ProbeStat},
};

impl Tracer {
    /// Whether the file with (device, inode) `id` carries memprof's probes.
    pub fn is_probed(&self, id: (u64, u64)) -> bool {
        self.probed.contains(&id)
    }

    /// The frames of stack `key`, innermost first; empty if the map does not hold it.
    pub fn stack(&self, key: u64) -> Vec<u64> {
        match self.stacks.get(&key, 0) {
            Ok(trace) => trace.frames().to_vec(),
            Err(_) => Vec::new(),
        }
    }

    /// Lets the kernel program walk the Python frames of CPython process `tgid`.
    pub fn set_python(&mut self, tgid: u32, walk: PyWalk) -> Result<()> {
        self.py_procs
            .insert(&tgid, &walk, 0)
            .context("failed to register a Python process")?;
        self.py_active
            .set(0, &1, 0)
            .context("failed to enable Python stacks")
    }

    /// Registers thread `tid` as running Python with thread state `tstate`.
    pub fn set_python_thread(&mut self, tid: u32, tstate: u64) -> Result<()> {
        self.py_threads
            .insert(&tid, &tstate, 0)
            .context("failed to register a Python thread")
    }

    /// Forgets a Python thread (it exited, or its process exec'd).
    pub fn remove_python_thread(&mut self, tid: u32) {
        let _ = self.py_threads.remove(&tid);
    }

    /// The (code object, instruction) pairs of Python stack `key`, innermost first.
    pub fn py_stack(&self, key: u64) -> Vec<(u64, u64)> {
        match self.py_stacks.get(&key, 0) {
            Ok(s) => s
                .frames
                .iter()
                .take((s.len as usize).min(s.frames.len()))
                .map(|[code, instr]| (*code, *instr))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Each program's runs and time in them so far, with `--probe-stats` (else empty).
    pub fn probe_stats(&self) -> Vec<ProbeStat> {
        if self.stats.is_none() {
            return Vec::new();
        }
        let mut stats: Vec<ProbeStat> = self
            .ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some(ProbeStat::new(
                    name,
                    info.run_count(),
                    info.run_time().as_nanos() as u64,
                ))
            })
            .filter(|s| s.runs > 0)
            .collect();
        stats.sort_by(|a, b| a.program.cmp(&b.program));
        stats
    }

    /// The kernel's loss counters, summed over CPUs.
    pub fn losses(&self) -> KernelLosses {
        let read = |c: Counter| -> u64 {
            self.counters
                .get(&(c as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        debug_assert_eq!(COUNTER_SLOTS, 7);
        KernelLosses {
            ring_full: read(Counter::RingFull),
            inflight_full: read(Counter::InflightFull),
            stack_lost: read(Counter::StackLost),
            orphan_returns: read(Counter::OrphanReturn),
            processes_missed: read(Counter::TgidsFull),
            mapping_records_lost: 0,
            sampled_full: read(Counter::SampledFull),
        }
    }
}
