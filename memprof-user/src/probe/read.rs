//! Reading and writing the kernel programs' maps while tracing: stacks, Python registrations,
//! loss counters and run-time statistics.

use anyhow::{Context as _, Result};

use crate::sys::maps::AddressSpace;
use aya::maps::PerCpuValues;
use memprof_common::{Counter, MAX_TEXT_RANGES, PyWalk, SEEN_STACKS, TextRanges};

use super::{
    LinkKind, Tracer,
    counters::{KernelLosses, ProbeStat},
};

impl Tracer {
    /// Whether the file with (device, inode) `id` carries memprof's probes.
    pub fn is_probed(&self, id: (u64, u64)) -> bool {
        self.probed.contains(&id)
    }

    /// The frames of stack `key`, innermost first, and how a table walk of it ended
    /// (`unwind_end`); no frames if the map does not hold it.
    pub fn stack(&self, key: u64) -> (Vec<u64>, u64) {
        match self.stacks.get(&key, 0) {
            Ok(trace) => (trace.frames().to_vec(), trace.end),
            Err(_) => (Vec::new(), 0),
        }
    }

    /// Removes stacks `keys` from the kernel's map (no process memprof still reports has
    /// them: with address-space randomisation every process has stacks of its own, and an
    /// agent watching short-lived processes would fill the map), then empties each CPU's cache
    /// of keys known to be there. Returns how many were removed.
    pub fn forget_stacks(&mut self, keys: &[u64]) -> usize {
        let removed = keys
            .iter()
            .filter(|key| self.stacks.remove(key).is_ok())
            .count();
        if removed > 0
            && let Ok(cpus) = aya::util::nr_cpus()
            && let Ok(empty) =
                PerCpuValues::try_from(vec![[0u64; SEEN_STACKS]; cpus.get() as usize])
        {
            let _ = self.stacks_seen.set(0, empty, 0);
        }
        removed
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
                    info.size_translated().map_or(0, u64::from),
                    info.verified_instruction_count().map_or(0, u64::from),
                ))
            })
            .chain(self.links.session_stats())
            .filter(|s| s.runs > 0)
            .collect();
        stats.sort_by(|a, b| a.program.cmp(&b.program));
        stats
    }

    /// Kernel counter `c`, summed over CPUs.
    fn counter(&self, c: Counter) -> u64 {
        self.counters
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// Table walks the kernel served from its cache of whole walks.
    pub fn walks_cached(&self) -> u64 {
        self.counter(Counter::WalkCached)
    }

    /// The kernel's loss counters, summed over CPUs.
    pub fn losses(&self) -> KernelLosses {
        let read = |c: Counter| self.counter(c);
        KernelLosses {
            ring_full: read(Counter::RingFull),
            inflight_full: read(Counter::InflightFull),
            stack_lost: read(Counter::StackLost),
            orphan_returns: read(Counter::OrphanReturn),
            processes_missed: read(Counter::TgidsFull),
            mapping_records_lost: 0,
            sampled_full: read(Counter::SampledFull),
            kmem_full: read(Counter::KmemFull),
        }
    }

    /// Whether the kernel needs each process's allocator code ranges (`set_allocator_text`):
    /// with sampled sessions, where unsampled calls keep no state.
    pub fn wants_allocator_text(&self) -> bool {
        self.sample_bytes != 0 && self.links.kind == LinkKind::Session
    }

    /// Tells the kernel where the allocator objects of process `tgid` lie, from its address
    /// space `space` (every mapping of a probed file; the first `MAX_TEXT_RANGES` after
    /// merging neighbours).
    pub fn set_allocator_text(&mut self, tgid: u32, space: &AddressSpace) {
        let mut text = TextRanges::default();
        for m in space.mappings() {
            if !m.file_id().is_some_and(|id| self.probed.contains(&id)) {
                continue;
            }
            let n = text.len as usize;
            if n > 0 && text.ranges[n - 1][1] == m.start {
                text.ranges[n - 1][1] = m.end;
            } else if n < MAX_TEXT_RANGES {
                text.ranges[n] = [m.start, m.end];
                text.len += 1;
            }
        }
        if text.len > 0 {
            let _ = self.alloc_text.insert(&tgid, &text, 0);
        }
    }

    /// The descriptor to poll for kernel log records, with `--kernel-log`.
    pub fn log_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.logs.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Writes the kernel log records waiting, if any.
    pub fn flush_logs(&mut self) {
        if let Some(logs) = &mut self.logs {
            logs.flush();
        }
    }
}
