//! The live-allocation table of one process: heap blocks by address, anonymous mappings as
//! ranges, and the process's running totals.

use std::collections::BTreeMap;

use foldhash::HashMap;

use memprof_common::AllocFn;

use super::{
    Change, HeapTotals, LiveAlloc, MmapTotals, freed, heap::HeapBlocks, live, sample_count,
};
use crate::ingest::event::{Alloc, Event};

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
    /// The process that forked this one and when, until this one execs: a free of a block the
    /// parent held at the fork is a free of an inherited block, not an unmatched one.
    pub(super) forked_from: Option<(u32, u64)>,
    /// The address of the last free that matched no block (see `Tables::apply_from`).
    pub(super) last_unmatched: Option<u64>,
    /// Inherited blocks this process freed, and when: gone for the processes it forks later.
    pub(super) inherited_freed: HashMap<u64, u64>,
}

impl Table {
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
                    // The block stays outstanding until the realloc returns: its bytes are the
                    // caller's until then, and every change of the totals is reported as one.
                    // A realloc whose return was never seen (its record lost) ends here.
                    self.settle_realloc(tid, ts_ns, on);
                    let block = self.heap.remove(addr);
                    self.reallocs.insert(tid, Pending { addr, block });
                }
                _ => match self.remove_heap(addr) {
                    Some(block) => {
                        let count = self.count_free(&block);
                        on(freed(block, count, tid, ts_ns));
                    }
                    None => self.unmatched(addr),
                },
            },
            Event::ReallocFailed { tid } => {
                if let Some(Pending {
                    addr,
                    block: Some(block),
                }) = self.reallocs.remove(&tid)
                {
                    // Still outstanding: back where it was, the totals unchanged.
                    if let Some(old) = self.heap.insert(addr, block) {
                        self.heap_totals.reused_addresses += 1;
                        let count = self.sub_outstanding(&old);
                        on(freed(old, count, tid, block.ts_ns));
                    }
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
            | Event::ChildPaused
            | Event::Phase { .. }
            | Event::Fork { .. }
            | Event::Exec { .. }
            | Event::Exit => {}
        }
    }

    /// The process's image went away (`execve`): every block and mapping is released at `ts_ns`,
    /// but with `keep_kernel` the kernel's blocks (`--kernel`), which outlive the image (its
    /// open files and pipes stay).
    pub fn release_all(&mut self, ts_ns: u64, keep_kernel: bool, on: &mut impl FnMut(Change)) {
        let tids: Vec<u32> = self.reallocs.keys().copied().collect();
        for tid in tids {
            self.settle_realloc(tid, ts_ns, on);
        }
        let heap = std::mem::take(&mut self.heap);
        for (addr, block) in heap.iter() {
            if keep_kernel && block.func.is_kernel() {
                self.heap.insert(addr, block);
                continue;
            }
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
                self.sub_outstanding(&old);
                let count = self.count_free(&old);
                on(freed(old, count, tid, ts_ns));
                Some(old)
            }
            Some(Pending { addr, block: None }) => {
                self.unmatched(addr);
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

    /// A free of `addr`, which the table does not hold.
    fn unmatched(&mut self, addr: u64) {
        self.heap_totals.unmatched_frees += 1;
        self.last_unmatched = Some(addr);
    }

    /// When the block at `addr` was allocated, if the table holds one there.
    pub(super) fn allocated_at(&self, addr: u64) -> Option<u64> {
        self.heap.allocated_at(addr)
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

    /// Outstanding heap blocks, as (address, block), in no particular order: those a realloc in
    /// progress took over included (they are outstanding until it returns).
    pub fn heap_blocks(&self) -> impl Iterator<Item = (u64, LiveAlloc)> + '_ {
        self.heap.iter().chain(
            self.reallocs
                .values()
                .filter_map(|p| Some((p.addr, p.block?))),
        )
    }

    /// Outstanding mappings, as (start address, region).
    pub fn map_regions(&self) -> impl Iterator<Item = (u64, &LiveAlloc)> {
        self.maps.iter().map(|(a, b)| (*a, b))
    }
}
