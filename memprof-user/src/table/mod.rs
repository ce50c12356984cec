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

use std::collections::BTreeMap;

use foldhash::HashMap;

use memprof_common::AllocFn;
use serde::Serialize;

use crate::ingest::event::{Alloc, Event};

mod heap;

use heap::HeapBlocks;

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
    let p = sample_probability(block.size, mean);
    let w = if p > 0.0 { 1.0 / p } else { 1.0 };
    let mut h = block.ts_ns ^ block.stack.rotate_left(29) ^ block.size.rotate_left(47);
    // splitmix64's finalizer
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let coin = (h >> 11) as f64 / (1u64 << 53) as f64;
    (w + coin).floor().clamp(1.0, f64::from(u32::MAX)) as u32
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

/// A `realloc` in progress: the block it took over (if the table knew it).
#[derive(Clone, Copy, Debug)]
struct Pending {
    addr: u64,
    block: Option<LiveAlloc>,
}

#[derive(Debug, Default)]
pub struct Table {
    heap: HeapBlocks,
    /// Mappings keyed by start address; `size` is the length.
    maps: BTreeMap<u64, LiveAlloc>,
    reallocs: HashMap<u32, Pending>,
    pub heap_totals: HeapTotals,
    pub mmap_totals: MmapTotals,
    /// Mean sampling interval in bytes (0: every block is reported).
    sample_mean: u64,
}

impl Table {
    pub fn new() -> Self {
        Self::default()
    }

    /// A table for a trace sampled with mean interval `mean` bytes (0: not sampled).
    pub fn with_sampling(mean: u64) -> Self {
        Self {
            sample_mean: mean,
            ..Self::default()
        }
    }

    /// The mean sampling interval in bytes, 0 without sampling.
    pub fn sample_mean(&self) -> u64 {
        self.sample_mean
    }

    /// The number of allocations heap block `block` stands for (1 without sampling).
    pub fn count(&self, block: &LiveAlloc) -> u32 {
        sample_count(block, self.sample_mean)
    }

    /// The bytes heap block `block` stands for (`block.size` without sampling).
    pub fn bytes(&self, block: &LiveAlloc) -> u64 {
        block.size.saturating_mul(u64::from(self.count(block)))
    }

    /// Applies one event.
    pub fn apply(&mut self, event: &Event) {
        self.apply_with(event, &mut |_| {});
    }

    /// Applies one event and reports each change of what is outstanding to `on`.
    pub fn apply_with(&mut self, event: &Event, on: &mut impl FnMut(Change)) {
        match *event {
            Event::Alloc(a) if a.mmap => {
                self.map(a.addr, a.size, live(&a, 0), a.ts_ns, a.tid, on);
                on(Change::Alloc {
                    block: live(&a, 0),
                    tid: a.tid,
                    mmap: true,
                    count: 1,
                });
            }
            Event::Alloc(a) => self.alloc(&a, on),
            Event::Free {
                tid,
                func,
                addr,
                ts_ns,
            } => match func {
                AllocFn::Realloc | AllocFn::Reallocarray => {
                    let block = self.remove_heap(addr);
                    self.reallocs.insert(tid, Pending { addr, block });
                }
                _ => match self.remove_heap(addr) {
                    Some(block) => {
                        let count = self.count_free(&block);
                        on(freed(block, count, tid, ts_ns));
                    }
                    None => self.heap_totals.unmatched_frees += 1,
                },
            },
            Event::ReallocFailed { tid } => {
                if let Some(Pending {
                    addr,
                    block: Some(block),
                }) = self.reallocs.remove(&tid)
                {
                    self.insert_heap(addr, block, tid, block.ts_ns, on);
                }
            }
            Event::ReallocSettled { tid, ts_ns } => {
                self.settle_realloc(tid, ts_ns, on);
            }
            Event::Munmap { addr, len } => {
                // Unmaps carry no timestamp of their own: use the clock at processing time.
                let now = crate::sys::clock::monotonic_ns();
                let removed = self.cut(addr, len, now, 0, on);
                if removed > 0 {
                    self.mmap_totals.unmaps += 1;
                    self.mmap_totals.bytes_unmapped += removed;
                }
            }
            Event::Mremap {
                old_addr,
                old_len,
                new_addr,
                new_len,
            } => self.remap(old_addr, old_len, new_addr, new_len, on),
            Event::ExecMap
            | Event::Phase { .. }
            | Event::Fork { .. }
            | Event::Exec { .. }
            | Event::Exit => {}
        }
    }

    /// The process's image went away (`execve`): every block and mapping is released at `ts_ns`.
    pub fn release_all(&mut self, ts_ns: u64, on: &mut impl FnMut(Change)) {
        self.reallocs.clear();
        let heap = std::mem::take(&mut self.heap);
        for (_, block) in heap.iter() {
            let count = self.sub_outstanding(&block);
            self.count_free(&block);
            on(freed(block, count, 0, ts_ns));
        }
        let removed = self.cut(0, u64::MAX, ts_ns, 0, on);
        if removed > 0 {
            self.mmap_totals.unmaps += 1;
            self.mmap_totals.bytes_unmapped += removed;
        }
    }

    fn alloc(&mut self, a: &Alloc, on: &mut impl FnMut(Change)) {
        let mut chain = 0;
        if matches!(a.func, AllocFn::Realloc | AllocFn::Reallocarray) {
            // The block the realloc took over is now really gone.
            if let Some(old) = self.settle_realloc(a.tid, a.ts_ns, on) {
                chain = old.chain + 1;
            }
        }
        let block = live(a, chain);
        let count = self.count(&block);
        let t = &mut self.heap_totals;
        t.allocs += u64::from(count);
        t.bytes_allocated += a.size * u64::from(count);
        self.insert_heap(a.addr, block, a.tid, a.ts_ns, on);
        on(Change::Alloc {
            block,
            tid: a.tid,
            mmap: false,
            count,
        });
    }

    /// Ends the realloc in progress on `tid`: the block it took over is gone. Returns that block.
    fn settle_realloc(
        &mut self,
        tid: u32,
        ts_ns: u64,
        on: &mut impl FnMut(Change),
    ) -> Option<LiveAlloc> {
        match self.reallocs.remove(&tid) {
            Some(Pending {
                block: Some(old), ..
            }) => {
                let count = self.count_free(&old);
                on(freed(old, count, tid, ts_ns));
                Some(old)
            }
            Some(Pending { block: None, .. }) => {
                self.heap_totals.unmatched_frees += 1;
                None
            }
            None => None,
        }
    }

    fn insert_heap(
        &mut self,
        addr: u64,
        block: LiveAlloc,
        tid: u32,
        ts_ns: u64,
        on: &mut impl FnMut(Change),
    ) {
        if let Some(old) = self.heap.insert(addr, block) {
            // The free of `old` was never seen (lost, or made by an unprobed path).
            self.heap_totals.reused_addresses += 1;
            let count = self.sub_outstanding(&old);
            on(freed(old, count, tid, ts_ns));
        }
        let count = self.count(&block);
        let t = &mut self.heap_totals;
        t.outstanding_allocs += u64::from(count);
        t.outstanding_bytes += block.size * u64::from(count);
        t.peak_outstanding_bytes = t.peak_outstanding_bytes.max(t.outstanding_bytes);
    }

    fn remove_heap(&mut self, addr: u64) -> Option<LiveAlloc> {
        let block = self.heap.remove(addr)?;
        self.sub_outstanding(&block);
        Some(block)
    }

    /// Takes `block` out of the outstanding totals; returns its count.
    fn sub_outstanding(&mut self, block: &LiveAlloc) -> u32 {
        let count = self.count(block);
        let t = &mut self.heap_totals;
        t.outstanding_allocs -= u64::from(count);
        t.outstanding_bytes -= block.size * u64::from(count);
        count
    }

    /// Counts the free of `block`; returns its count.
    fn count_free(&mut self, block: &LiveAlloc) -> u32 {
        let count = self.count(block);
        self.heap_totals.frees += u64::from(count);
        self.heap_totals.bytes_freed += block.size * u64::from(count);
        count
    }

    fn map(
        &mut self,
        addr: u64,
        len: u64,
        region: LiveAlloc,
        ts_ns: u64,
        tid: u32,
        on: &mut impl FnMut(Change),
    ) {
        // A fixed mapping replaces whatever it overlaps.
        self.cut(addr, len, ts_ns, tid, on);
        let t = &mut self.mmap_totals;
        t.maps += 1;
        t.bytes_mapped += len;
        t.outstanding_maps += 1;
        t.outstanding_bytes += len;
        self.maps.insert(addr, region);
    }

    fn remap(
        &mut self,
        old_addr: u64,
        old_len: u64,
        new_addr: u64,
        new_len: u64,
        on: &mut impl FnMut(Change),
    ) {
        // The moved range keeps its origin (stack, time) when it was ours.
        let now = crate::sys::clock::monotonic_ns();
        let origin = self.region_at(old_addr);
        let removed = self.cut(old_addr, old_len, now, 0, on);
        if let Some(origin) = origin.filter(|_| removed > 0) {
            let t = &mut self.mmap_totals;
            t.outstanding_bytes += new_len;
            t.outstanding_maps += 1;
            if new_len > removed {
                t.bytes_mapped += new_len - removed;
            } else {
                t.bytes_unmapped += removed - new_len;
            }
            self.cut(new_addr, new_len, now, 0, on);
            let moved = LiveAlloc {
                size: new_len,
                ..origin
            };
            self.maps.insert(new_addr, moved);
            on(Change::Alloc {
                block: moved,
                tid: 0,
                mmap: true,
                count: 1,
            });
        }
    }

    fn region_at(&self, addr: u64) -> Option<LiveAlloc> {
        let (&start, region) = self.maps.range(..=addr).next_back()?;
        (addr < start + region.size).then_some(*region)
    }

    /// Removes `[addr, addr + len)` from the tracked mappings, splitting those that straddle its
    /// ends. Returns the number of tracked bytes removed.
    fn cut(
        &mut self,
        addr: u64,
        len: u64,
        ts_ns: u64,
        tid: u32,
        on: &mut impl FnMut(Change),
    ) -> u64 {
        let end = addr.saturating_add(len);
        let overlapping: Vec<(u64, LiveAlloc)> = self
            .maps
            .range(..end)
            .rev()
            .take_while(|(start, r)| *start + r.size > addr)
            .map(|(s, r)| (*s, *r))
            .collect();
        let mut removed = 0;
        for (start, region) in overlapping {
            self.maps.remove(&start);
            let region_end = start + region.size;
            let t = &mut self.mmap_totals;
            t.outstanding_maps -= 1;
            t.outstanding_bytes -= region.size;
            let piece = region_end.min(end) - start.max(addr);
            removed += piece;
            on(Change::Free {
                block: region,
                bytes: piece,
                whole: piece == region.size,
                tid,
                ts_ns,
                mmap: true,
                count: 1,
            });
            for (piece_start, piece_end) in [(start, addr), (end, region_end)] {
                if piece_start < piece_end {
                    let size = piece_end - piece_start;
                    self.maps.insert(piece_start, LiveAlloc { size, ..region });
                    let t = &mut self.mmap_totals;
                    t.outstanding_maps += 1;
                    t.outstanding_bytes += size;
                }
            }
        }
        removed
    }

    /// Outstanding heap blocks, as (address, block), in no particular order.
    pub fn heap_blocks(&self) -> impl Iterator<Item = (u64, LiveAlloc)> + '_ {
        self.heap.iter()
    }

    /// Outstanding mappings, as (start address, region).
    pub fn map_regions(&self) -> impl Iterator<Item = (u64, &LiveAlloc)> {
        self.maps.iter().map(|(a, b)| (*a, b))
    }
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
    pub fn new() -> Self {
        Self::default()
    }

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

    /// How many allocations `block` stands for (see [`Table::count`]).
    pub fn count(&self, block: &LiveAlloc) -> u32 {
        sample_count(block, self.sample_mean)
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
        let after = (table.heap_totals, table.mmap_totals);
        self.account(before, after);
    }

    /// Process `tgid` replaced its image: its blocks are released (see [`Table::release_all`]).
    pub fn release_process(&mut self, tgid: u32, ts_ns: u64, on: &mut impl FnMut(Change)) {
        let Some(table) = self.procs.get_mut(&tgid) else {
            return;
        };
        let before = (table.heap_totals, table.mmap_totals);
        table.release_all(ts_ns, on);
        let after = (table.heap_totals, table.mmap_totals);
        self.account(before, after);
    }

    fn account(&mut self, before: (HeapTotals, MmapTotals), after: (HeapTotals, MmapTotals)) {
        let delta = |total: &mut u64, old: u64, new: u64| {
            *total = total.wrapping_add(new.wrapping_sub(old));
        };
        let (h0, m0) = before;
        let (h1, m1) = after;
        let h = &mut self.heap_totals;
        delta(&mut h.allocs, h0.allocs, h1.allocs);
        delta(&mut h.frees, h0.frees, h1.frees);
        delta(
            &mut h.bytes_allocated,
            h0.bytes_allocated,
            h1.bytes_allocated,
        );
        delta(&mut h.bytes_freed, h0.bytes_freed, h1.bytes_freed);
        delta(
            &mut h.outstanding_allocs,
            h0.outstanding_allocs,
            h1.outstanding_allocs,
        );
        delta(
            &mut h.outstanding_bytes,
            h0.outstanding_bytes,
            h1.outstanding_bytes,
        );
        delta(
            &mut h.unmatched_frees,
            h0.unmatched_frees,
            h1.unmatched_frees,
        );
        delta(
            &mut h.reused_addresses,
            h0.reused_addresses,
            h1.reused_addresses,
        );
        h.peak_outstanding_bytes = h.peak_outstanding_bytes.max(h.outstanding_bytes);
        let m = &mut self.mmap_totals;
        delta(&mut m.maps, m0.maps, m1.maps);
        delta(&mut m.unmaps, m0.unmaps, m1.unmaps);
        delta(&mut m.bytes_mapped, m0.bytes_mapped, m1.bytes_mapped);
        delta(&mut m.bytes_unmapped, m0.bytes_unmapped, m1.bytes_unmapped);
        delta(
            &mut m.outstanding_maps,
            m0.outstanding_maps,
            m1.outstanding_maps,
        );
        delta(
            &mut m.outstanding_bytes,
            m0.outstanding_bytes,
            m1.outstanding_bytes,
        );
    }

    /// Forgets process `tgid` (an exited process memprof stops reporting): its blocks count as
    /// freed, as the system freed them at its exit.
    pub fn forget_process(&mut self, tgid: u32, ts_ns: u64, on: &mut impl FnMut(Change)) {
        self.release_process(tgid, ts_ns, on);
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
mod tests {
    use super::*;

    fn alloc(func: AllocFn, addr: u64, size: u64) -> Event {
        Event::Alloc(Alloc {
            tid: 1,
            func,
            mmap: func == AllocFn::Mmap,
            addr,
            size,
            stack: 5,
            ts_ns: 10,
        })
    }

    fn free(func: AllocFn, addr: u64) -> Event {
        Event::Free {
            tid: 1,
            func,
            addr,
            ts_ns: 20,
        }
    }

    #[test]
    fn malloc_free_and_unmatched() {
        let mut t = Table::new();
        t.apply(&alloc(AllocFn::Malloc, 0x10, 100));
        t.apply(&alloc(AllocFn::Calloc, 0x20, 50));
        t.apply(&free(AllocFn::Free, 0x10));
        t.apply(&free(AllocFn::Free, 0x999));
        let h = t.heap_totals;
        assert_eq!(
            (h.allocs, h.frees, h.bytes_allocated, h.bytes_freed),
            (2, 1, 150, 100)
        );
        assert_eq!((h.outstanding_allocs, h.outstanding_bytes), (1, 50));
        assert_eq!(h.peak_outstanding_bytes, 150);
        assert_eq!(h.unmatched_frees, 1);
    }

    #[test]
    fn realloc_moves_block_to_new_caller() {
        let mut t = Table::new();
        t.apply(&alloc(AllocFn::Malloc, 0x10, 100));
        t.apply(&free(AllocFn::Realloc, 0x10));
        t.apply(&alloc(AllocFn::Realloc, 0x40, 3000));
        let h = t.heap_totals;
        assert_eq!((h.allocs, h.frees, h.bytes_freed), (2, 1, 100));
        assert_eq!((h.outstanding_allocs, h.outstanding_bytes), (1, 3000));
        let blocks: Vec<_> = t.heap_blocks().map(|(a, b)| (a, b.func)).collect();
        assert_eq!(blocks, vec![(0x40, AllocFn::Realloc)]);
    }

    #[test]
    fn failed_realloc_restores_block() {
        let mut t = Table::new();
        t.apply(&alloc(AllocFn::Malloc, 0x10, 100));
        t.apply(&free(AllocFn::Realloc, 0x10));
        assert_eq!(t.heap_totals.outstanding_bytes, 0);
        t.apply(&Event::ReallocFailed { tid: 1 });
        let h = t.heap_totals;
        assert_eq!(
            (h.frees, h.outstanding_allocs, h.outstanding_bytes),
            (0, 1, 100)
        );
        assert_eq!(
            t.heap_blocks().next().map(|(_, b)| b.func),
            Some(AllocFn::Malloc)
        );
    }

    #[test]
    fn realloc_of_unknown_block_is_one_unmatched_free() {
        let mut t = Table::new();
        t.apply(&free(AllocFn::Realloc, 0x10));
        t.apply(&alloc(AllocFn::Realloc, 0x10, 64));
        let h = t.heap_totals;
        assert_eq!(
            (h.unmatched_frees, h.frees, h.outstanding_bytes),
            (1, 0, 64)
        );
    }

    #[test]
    fn reused_address_replaces_block() {
        let mut t = Table::new();
        t.apply(&alloc(AllocFn::Malloc, 0x10, 100));
        t.apply(&alloc(AllocFn::Malloc, 0x10, 30));
        let h = t.heap_totals;
        assert_eq!(
            (
                h.reused_addresses,
                h.outstanding_allocs,
                h.outstanding_bytes
            ),
            (1, 1, 30)
        );
    }

    #[test]
    fn munmap_splits_and_trims_mappings() {
        let mut t = Table::new();
        t.apply(&alloc(AllocFn::Mmap, 0x10000, 0x10000));
        // Punch a hole in the middle: two pieces remain.
        t.apply(&Event::Munmap {
            addr: 0x14000,
            len: 0x4000,
        });
        let m = t.mmap_totals;
        assert_eq!((m.outstanding_maps, m.outstanding_bytes), (2, 0xc000));
        assert_eq!((m.unmaps, m.bytes_unmapped), (1, 0x4000));
        // Unmap across the tail of the first piece and the head of the second.
        t.apply(&Event::Munmap {
            addr: 0x13000,
            len: 0x6000,
        });
        let regions: Vec<_> = t.map_regions().map(|(a, r)| (a, r.size)).collect();
        assert_eq!(regions, vec![(0x10000, 0x3000), (0x19000, 0x7000)]);
        assert_eq!(t.mmap_totals.outstanding_bytes, 0xa000);
        // Unmapping something never tracked changes nothing.
        t.apply(&Event::Munmap {
            addr: 0x1,
            len: 0x1000,
        });
        assert_eq!(t.mmap_totals.unmaps, 2);
    }

    #[test]
    fn changes_report_frees_reallocs_and_chains() {
        let mut t = Table::new();
        let mut seen = Vec::new();
        let mut on = |c: Change| seen.push(c);
        t.apply_with(&alloc(AllocFn::Malloc, 0x10, 100), &mut on);
        t.apply_with(&free(AllocFn::Realloc, 0x10), &mut on);
        t.apply_with(&alloc(AllocFn::Realloc, 0x20, 200), &mut on);
        t.apply_with(&free(AllocFn::Realloc, 0x20), &mut on);
        t.apply_with(&alloc(AllocFn::Realloc, 0x30, 300), &mut on);
        t.apply_with(&free(AllocFn::Free, 0x30), &mut on);
        let summary: Vec<(&str, u64, u32)> = seen
            .iter()
            .map(|c| match c {
                Change::Alloc { block, .. } => ("alloc", block.size, block.chain),
                Change::Free { block, bytes, .. } => ("free", *bytes, block.chain),
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("alloc", 100, 0),
                ("free", 100, 0),
                ("alloc", 200, 1),
                ("free", 200, 1),
                ("alloc", 300, 2),
                ("free", 300, 2),
            ]
        );
    }

    #[test]
    fn tables_sum_processes_and_release_at_exec() {
        let mut t = Tables::new();
        let mut seen = Vec::new();
        let mut on = |c: Change| seen.push(c);
        t.apply_from(1, &alloc(AllocFn::Malloc, 0x10, 100), &mut on);
        // The same address in another process is another block.
        t.apply_from(2, &alloc(AllocFn::Malloc, 0x10, 30), &mut on);
        t.apply_from(2, &alloc(AllocFn::Mmap, 0x10000, 0x1000), &mut on);
        let h = t.heap_totals;
        assert_eq!(
            (h.allocs, h.outstanding_allocs, h.outstanding_bytes),
            (2, 2, 130)
        );
        assert_eq!(h.peak_outstanding_bytes, 130);
        assert_eq!(t.process(2).unwrap().heap_totals.outstanding_bytes, 30);
        t.apply_from(1, &free(AllocFn::Free, 0x10), &mut on);
        t.release_process(2, 99, &mut on);
        let h = t.heap_totals;
        assert_eq!((h.frees, h.bytes_freed, h.outstanding_bytes), (2, 130, 0));
        assert_eq!(h.peak_outstanding_bytes, 130);
        assert_eq!(
            (
                t.mmap_totals.outstanding_bytes,
                t.mmap_totals.bytes_unmapped
            ),
            (0, 0x1000)
        );
        assert_eq!(t.heap_blocks().count() + t.map_regions().count(), 0);
        let frees = seen
            .iter()
            .filter(|c| matches!(c, Change::Free { .. }))
            .count();
        assert_eq!(frees, 3);
    }

    #[test]
    fn sampled_blocks_stand_for_their_weight() {
        // 1 KiB blocks sampled with mean 64 KiB: each stands for 1 / (1 - exp(-1/64)) = 64.50
        // allocations, rounded at random to 64 or 65 (standard deviation at most 1/2 each).
        let mut t = Table::with_sampling(64 << 10);
        let sampled = |i: u64| {
            Event::Alloc(Alloc {
                tid: 1,
                func: AllocFn::Malloc,
                mmap: false,
                addr: 0x1000 + i * 0x1000,
                size: 1024,
                stack: 5,
                ts_ns: 1_000_000 + i * 7_919,
            })
        };
        let mut seen = Vec::new();
        for i in 0..1000 {
            t.apply_with(&sampled(i), &mut |c| seen.push(c));
        }
        let w = 1.0 / sample_probability(1024, 64 << 10);
        let h = t.heap_totals;
        // 5 standard deviations of the rounding: 5 * sqrt(1000 / 4).
        assert!(
            (h.allocs as f64 - 1000.0 * w).abs() < 80.0,
            "{} vs {}",
            h.allocs,
            1000.0 * w
        );
        assert_eq!(h.bytes_allocated, h.allocs * 1024);
        assert_eq!(h.outstanding_allocs, h.allocs);
        let counted: u64 = seen
            .iter()
            .map(|c| match c {
                Change::Alloc { count, .. } => u64::from(*count),
                Change::Free { .. } => 0,
            })
            .sum();
        assert_eq!(counted, h.allocs, "changes carry the counts the totals sum");
        for i in 0..1000 {
            t.apply(&free(AllocFn::Free, 0x1000 + i * 0x1000));
        }
        let h = t.heap_totals;
        assert_eq!((h.outstanding_allocs, h.outstanding_bytes), (0, 0));
        assert_eq!((h.frees, h.bytes_freed), (h.allocs, h.bytes_allocated));
        // A block far above the mean is sampled almost surely and stands for itself.
        t.apply(&alloc(AllocFn::Malloc, 0x10, 4 << 20));
        assert_eq!(t.heap_totals.outstanding_allocs, 1);
        assert_eq!(t.heap_totals.outstanding_bytes, 4 << 20);
    }

    #[test]
    fn settled_realloc_frees_the_old_block_without_a_new_one() {
        let mut t = Table::new();
        let mut seen = Vec::new();
        t.apply(&alloc(AllocFn::Malloc, 0x10, 100));
        t.apply(&free(AllocFn::Realloc, 0x10));
        t.apply_with(&Event::ReallocSettled { tid: 1, ts_ns: 30 }, &mut |c| {
            seen.push(c)
        });
        let h = t.heap_totals;
        assert_eq!((h.frees, h.bytes_freed, h.outstanding_bytes), (1, 100, 0));
        assert!(matches!(seen[..], [Change::Free { bytes: 100, .. }]));
        // A later realloc on the thread finds nothing pending.
        t.apply(&alloc(AllocFn::Realloc, 0x20, 64));
        assert_eq!(t.heap_totals.unmatched_frees, 0);
    }

    #[test]
    fn mremap_moves_and_resizes() {
        let mut t = Table::new();
        t.apply(&alloc(AllocFn::Mmap, 0x10000, 0x2000));
        t.apply(&Event::Mremap {
            old_addr: 0x10000,
            old_len: 0x2000,
            new_addr: 0x50000,
            new_len: 0x5000,
        });
        let regions: Vec<_> = t.map_regions().map(|(a, r)| (a, r.size, r.stack)).collect();
        assert_eq!(regions, vec![(0x50000, 0x5000, 5)]);
        let m = t.mmap_totals;
        assert_eq!(
            (m.maps, m.bytes_mapped, m.outstanding_bytes),
            (1, 0x5000, 0x5000)
        );
    }
}
