//! The live-allocation table of each traced process, their running totals, and totals over
//! every traced process ([`Tables`]).
//!
//! Heap blocks (the malloc family) are keyed by address. Anonymous mappings made outside any
//! allocator call are kept as address ranges, because `munmap` and `mremap` may cut or move any
//! part of one. The two never mix: a mapping made inside `malloc` is that malloc's block.
//!
//! With byte sampling (`--sample-bytes`) the kernel reports only sampled heap blocks. This is
//! where they are scaled: each sampled block stands for [`Table::count`] allocations (`1 / p`
//! with `p = 1 - exp(-size / mean)`, rounded to an integer) and `size * count` bytes, and every
//! [`Change`] carries that `count`. Everything downstream (totals, per-site behaviour, phases,
//! reports and every output) sums counts and bytes weighted so, which makes it an unbiased
//! estimate; without sampling `count` is 1 and nothing changes. The count is derived from the
//! block rather than stored in it, so a block costs the table no more memory with sampling.

use foldhash::HashMap;

use memprof_common::AllocFn;
use serde::Serialize;

use crate::ingest::event::{Alloc, Event};

mod heap;
mod process;

pub use self::process::Table;

/// One outstanding block or mapping. The table stores heap blocks more compactly (see
/// [`heap`]) and gives them back as this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveAlloc {
    pub size: u64,
    /// When it was allocated (CLOCK_MONOTONIC ns).
    pub ts_ns: u64,
    /// Key of the allocation's stack (`NO_STACK` when not captured).
    pub stack: u64,
    pub func: AllocFn,
    /// How many reallocs in a row produced this block (0: a fresh allocation).
    pub chain: u32,
}

/// Probability that a block of `size` bytes is sampled with mean interval `mean`:
/// `1 - exp(-size / mean)` (1 without sampling).
pub fn sample_probability(size: u64, mean: u64) -> f64 {
    if mean == 0 {
        return 1.0;
    }
    -(-(size as f64) / mean as f64).exp_m1()
}

/// The number of allocations a sampled heap block stands for with mean interval `mean` (1
/// without sampling): `w = 1 / p` rounded down or up at random, up with probability `w -
/// floor(w)`, so its expectation is exactly `w` (the extra variance, at most 1/4, is nothing
/// next to the sampling's `w^2 p (1 - p)`). The coin is a hash of the block's time stamp and
/// stack, so the allocation and the free of a block agree without storing the count.
pub fn sample_count(block: &LiveAlloc, mean: u64) -> u32 {
    if mean == 0 {
        return 1;
    }
    let w = sample_weight(block.size, mean);
    let coin = (block_hash(block) >> 11) as f64 / (1u64 << 53) as f64;
    (w + coin).floor().clamp(1.0, f64::from(u32::MAX)) as u32
}

/// `1 / p` for a block of `size` bytes (1 when `p` is 0 or without sampling).
fn sample_weight(size: u64, mean: u64) -> f64 {
    let p = sample_probability(size, mean);
    if p > 0.0 { 1.0 / p } else { 1.0 }
}

/// A hash of what identifies a block (time stamp, stack, size): the same at its allocation
/// and its free.
fn block_hash(block: &LiveAlloc) -> u64 {
    let mut h = block.ts_ns ^ block.stack.rotate_left(29) ^ block.size.rotate_left(47);
    // splitmix64's finalizer
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// What one sampled heap block adds to the variance of an estimated count (multiply by
/// `size²` for bytes): `(1 - p) / p² + r (1 - r)`, with `r` the fractional part of `1 / p`.
///
/// An estimate sums `count` (bytes: `size × count`) over the sampled blocks, each block of the
/// population sampled independently with probability `p` (the sample points are a Poisson
/// process over the allocated bytes) and counted `floor(1/p)` or `ceil(1/p)` times at random.
/// Such a sum's variance is `Σ_all ((1 - p) / p + p r (1 - r))`, estimated without bias by
/// `Σ_sampled ((1 - p) / p² + r (1 - r))`: this term per sampled block (0 without sampling).
pub fn sample_variance(block: &LiveAlloc, mean: u64) -> f64 {
    if mean == 0 {
        return 0.0;
    }
    let p = sample_probability(block.size, mean);
    if p <= 0.0 {
        return 0.0;
    }
    let w = 1.0 / p;
    let r = w.fract();
    (1.0 - p) * w * w + r * (1.0 - r)
}

/// The weights a sampled heap block has in two independent samples at half the rate, 0 in
/// the one it is not part of.
///
/// The kernel's sample points are a Poisson process of rate `1 / mean` over the allocated
/// bytes; split at random into two processes of rate `1 / (2 mean)`, they are independent. A
/// block of `size` bytes is in either with probability `q = 1 - exp(-size / (2 mean))`, in both
/// with `q²`, and sampled at all with `p = 2q - q²`. So a block the kernel sampled is put in
/// both halves with probability `q² / p` and in one of them with `q (1 - q) / p` each, by a coin
/// drawn from the block itself (the same at its allocation and its free), and weighs `1 / q` in
/// each half it is in: each half's sums are then unbiased estimates of their own, independent of
/// the other half's (see `analysis::peak`). A block far larger than `mean` is in both.
pub fn sample_split(block: &LiveAlloc, mean: u64) -> [f64; 2] {
    if mean == 0 {
        return [1.0, 1.0];
    }
    let q = sample_probability(block.size, mean.saturating_mul(2));
    let p = q * (2.0 - q);
    if q <= 0.0 || p <= 0.0 {
        return [0.0, 0.0];
    }
    let w = 1.0 / q;
    // Bits 0..53 of the hash: the count's coin uses bits 11..64, but the finalizer spreads
    // every input bit over all of them; the rotation keeps the two coins apart.
    let coin = (block_hash(block).rotate_left(32) >> 11) as f64 / (1u64 << 53) as f64;
    let both = q * q / p;
    let one = (1.0 - both) / 2.0;
    if coin < both {
        [w, w]
    } else if coin < both + one {
        [w, 0.0]
    } else {
        [0.0, w]
    }
}

/// A change to what is outstanding, reported to the analysis layer by [`Table::apply_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// `block` became outstanding (its group is `block.stack`, `block.func`, `mmap`); it stands
    /// for `count` allocations (1 without sampling).
    Alloc {
        block: LiveAlloc,
        tid: u32,
        mmap: bool,
        count: u32,
    },
    /// `bytes` of `block` stopped being outstanding at `ts_ns`; `whole` when nothing of it
    /// remains (a mapping can lose a part). With sampling `block` stands for `count` blocks and
    /// `bytes` is `block.size * count`.
    Free {
        block: LiveAlloc,
        bytes: u64,
        whole: bool,
        tid: u32,
        ts_ns: u64,
        mmap: bool,
        count: u32,
    },
}

impl Change {
    /// The block that became or stopped being outstanding.
    pub fn block(&self) -> &LiveAlloc {
        match self {
            Change::Alloc { block, .. } | Change::Free { block, .. } => block,
        }
    }
}

/// For `skip_serializing_if`: counts that are left out of the JSON when 0.
pub(crate) fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Counts for the malloc family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeapTotals {
    pub allocs: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
    pub bytes_freed: u64,
    pub outstanding_allocs: u64,
    pub outstanding_bytes: u64,
    /// Highest `outstanding_bytes` seen during the trace.
    pub peak_outstanding_bytes: u64,
    /// Frees of blocks not allocated during the trace (allocated before attach).
    pub unmatched_frees: u64,
    /// Frees, in a forked process, of blocks its parent held when it forked (not counted in
    /// `frees` nor in `unmatched_frees`).
    #[serde(skip_serializing_if = "is_zero")]
    pub inherited_frees: u64,
    /// Allocations returned at an address the table still held: the block's free was never seen.
    pub reused_addresses: u64,
}

/// Counts for anonymous mappings made outside allocator calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MmapTotals {
    pub maps: u64,
    pub unmaps: u64,
    pub bytes_mapped: u64,
    pub bytes_unmapped: u64,
    pub outstanding_maps: u64,
    pub outstanding_bytes: u64,
}

/// The tables of every traced process, and totals over all of them.
///
/// With one traced process the totals are that process's. `peak_outstanding_bytes` here is the
/// peak of the sum over processes, not a sum of peaks.
#[derive(Debug, Default)]
pub struct Tables {
    procs: HashMap<u32, Table>,
    sample_mean: u64,
    pub heap_totals: HeapTotals,
    pub mmap_totals: MmapTotals,
}

impl Tables {
    /// Tables whose blocks were sampled with mean interval `mean` bytes (see
    /// [`Table::with_sampling`]); 0: every allocation recorded.
    pub fn with_sampling(mean: u64) -> Self {
        Self {
            sample_mean: mean,
            ..Self::default()
        }
    }

    /// The mean sampling interval (0: not sampled).
    pub fn sample_mean(&self) -> u64 {
        self.sample_mean
    }

    /// Applies one event of process 0 (tests and replays of one process).
    pub fn apply(&mut self, event: &Event) {
        self.apply_from(0, event, &mut |_| {});
    }

    /// Applies one event of process `tgid` and reports each change of what is outstanding.
    pub fn apply_from(&mut self, tgid: u32, event: &Event, on: &mut impl FnMut(Change)) {
        let mean = self.sample_mean;
        let table = self
            .procs
            .entry(tgid)
            .or_insert_with(|| Table::with_sampling(mean));
        let before = (table.heap_totals, table.mmap_totals);
        table.apply_with(event, on);
        let unmatched = table.last_unmatched.take();
        let mut after = (table.heap_totals, table.mmap_totals);
        if after.0.unmatched_frees != before.0.unmatched_frees
            && let (Some(addr), Some((parent, at))) = (unmatched, table.forked_from)
            && self.inherited(parent, at, addr)
            && let Some(table) = self.procs.get_mut(&tgid)
        {
            let ts_ns = match *event {
                Event::Alloc(a) => a.ts_ns,
                Event::Free { ts_ns, .. } => ts_ns,
                _ => 0,
            };
            table.inherited_freed.insert(addr, ts_ns);
            table.heap_totals.unmatched_frees -= 1;
            table.heap_totals.inherited_frees += 1;
            after = (table.heap_totals, table.mmap_totals);
        }
        self.account(before, after);
    }

    /// Process `child` was forked by `parent` at `ts_ns`: until it execs, its frees of blocks
    /// `parent` (or the process that forked it, before) held then are frees of inherited
    /// blocks.
    pub fn fork(&mut self, child: u32, parent: u32, ts_ns: u64) {
        let mean = self.sample_mean;
        self.procs
            .entry(child)
            .or_insert_with(|| Table::with_sampling(mean))
            .forked_from = Some((parent, ts_ns));
    }

    /// Whether a block at `addr` was held by process `pid` at `ts_ns`, or by the processes that
    /// forked it, before they did.
    fn inherited(&self, mut pid: u32, mut ts_ns: u64, addr: u64) -> bool {
        /// Ancestors looked at, at most.
        const DEPTH: usize = 64;
        for _ in 0..DEPTH {
            let Some(table) = self.procs.get(&pid) else {
                return false;
            };
            if table.allocated_at(addr).is_some_and(|at| at <= ts_ns) {
                return true;
            }
            // A block it inherited and freed before the fork is gone.
            if table
                .inherited_freed
                .get(&addr)
                .is_some_and(|at| *at <= ts_ns)
            {
                return false;
            }
            let Some((parent, at)) = table.forked_from else {
                return false;
            };
            (pid, ts_ns) = (parent, at.min(ts_ns));
        }
        false
    }

    /// Process `tgid` replaced its image: its blocks are released, but the kernel's (see
    /// [`Table::release_all`]).
    pub fn release_process(&mut self, tgid: u32, ts_ns: u64, on: &mut impl FnMut(Change)) {
        self.release(tgid, ts_ns, true, on);
        if let Some(table) = self.procs.get_mut(&tgid) {
            table.forked_from = None;
            table.inherited_freed = Default::default();
        }
    }

    fn release(&mut self, tgid: u32, ts_ns: u64, keep_kernel: bool, on: &mut impl FnMut(Change)) {
        let Some(table) = self.procs.get_mut(&tgid) else {
            return;
        };
        let before = (table.heap_totals, table.mmap_totals);
        table.release_all(ts_ns, keep_kernel, on);
        let after = (table.heap_totals, table.mmap_totals);
        self.account(before, after);
    }

    fn account(&mut self, before: (HeapTotals, MmapTotals), after: (HeapTotals, MmapTotals)) {
        /// Adds each field's change from `$old` to `$new` to the field of `$total`.
        macro_rules! add_changes {
            ($total:expr, $old:expr, $new:expr; $($field:ident),+) => {
                $($total.$field = $total.$field.wrapping_add($new.$field.wrapping_sub($old.$field));)+
            };
        }
        let (h0, m0) = before;
        let (h1, m1) = after;
        let h = &mut self.heap_totals;
        add_changes!(h, h0, h1; allocs, frees, bytes_allocated, bytes_freed, outstanding_allocs,
            outstanding_bytes, unmatched_frees, inherited_frees, reused_addresses);
        h.peak_outstanding_bytes = h.peak_outstanding_bytes.max(h.outstanding_bytes);
        let m = &mut self.mmap_totals;
        add_changes!(m, m0, m1; maps, unmaps, bytes_mapped, bytes_unmapped, outstanding_maps,
            outstanding_bytes);
    }

    /// Forgets process `tgid` (an exited process memprof stops reporting): its blocks count as
    /// freed, as the system freed them at its exit.
    pub fn forget_process(&mut self, tgid: u32, ts_ns: u64, on: &mut impl FnMut(Change)) {
        self.release(tgid, ts_ns, false, on);
        self.procs.remove(&tgid);
    }

    /// The table of process `tgid`.
    pub fn process(&self, tgid: u32) -> Option<&Table> {
        self.procs.get(&tgid)
    }

    /// The processes with a table, in no particular order.
    pub fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.procs.keys().copied()
    }

    /// Outstanding heap blocks of every process, as (address, block).
    pub fn heap_blocks(&self) -> impl Iterator<Item = (u64, LiveAlloc)> + '_ {
        self.procs.values().flat_map(Table::heap_blocks)
    }

    /// Outstanding mappings of every process, as (start address, region).
    pub fn map_regions(&self) -> impl Iterator<Item = (u64, &LiveAlloc)> {
        self.procs.values().flat_map(Table::map_regions)
    }
}

fn live(a: &Alloc, chain: u32) -> LiveAlloc {
    LiveAlloc {
        size: a.size,
        ts_ns: a.ts_ns,
        stack: a.stack,
        func: a.func,
        chain,
    }
}

fn freed(block: LiveAlloc, count: u32, tid: u32, ts_ns: u64) -> Change {
    Change::Free {
        block,
        count,
        bytes: block.size * u64::from(count),
        whole: true,
        tid,
        ts_ns,
        mmap: false,
    }
}

#[cfg(test)]
mod tests;
