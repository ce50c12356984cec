//! Tests of the tables: exact counts through allocations, frees, reallocs, maps, execs and
//! sampling.

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
    let mut t = Table::default();
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
    let mut t = Table::default();
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
    let mut t = Table::default();
    t.apply(&alloc(AllocFn::Malloc, 0x10, 100));
    t.apply(&free(AllocFn::Realloc, 0x10));
    assert_eq!(
        t.heap_totals.outstanding_bytes, 100,
        "outstanding until the realloc returns"
    );
    assert_eq!(t.heap_blocks().count(), 1, "and listed");
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
    let mut t = Table::default();
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
    let mut t = Table::default();
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
    let mut t = Table::default();
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
    let mut t = Table::default();
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
    let mut t = Tables::default();
    let mut seen = Vec::new();
    let mut on = |c: Change| seen.push(c);
    t.apply_from(1, &alloc(AllocFn::Malloc, 0x10, 100), &mut on);
    // The same address in another process is another block.
    t.apply_from(2, &alloc(AllocFn::Malloc, 0x10, 30), &mut on);
    t.apply_from(2, &alloc(AllocFn::Mmap, 0x10000, 0x1000), &mut on);
    // A kernel block (`--kernel`: a pipe's page) outlives the image.
    t.apply_from(
        2,
        &alloc(AllocFn::Page, 0xfffd_0000_0001_0000, 4096),
        &mut on,
    );
    let h = t.heap_totals;
    assert_eq!(
        (h.allocs, h.outstanding_allocs, h.outstanding_bytes),
        (3, 3, 4226)
    );
    assert_eq!(h.peak_outstanding_bytes, 4226);
    assert_eq!(t.process(2).unwrap().heap_totals.outstanding_bytes, 4126);
    t.apply_from(1, &free(AllocFn::Free, 0x10), &mut on);
    t.release_process(2, 99, &mut on);
    let h = t.heap_totals;
    assert_eq!(
        (h.frees, h.bytes_freed, h.outstanding_bytes),
        (2, 130, 4096)
    );
    assert_eq!(h.peak_outstanding_bytes, 4226);
    let kept: Vec<u64> = t.heap_blocks().map(|(addr, _)| addr).collect();
    assert_eq!(kept, [0xfffd_0000_0001_0000]);
    // Forgetting the process releases it too.
    t.forget_process(2, 100, &mut on);
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
    assert_eq!(frees, 4);
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
    let mut t = Table::default();
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
    let mut t = Table::default();
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

/// While a realloc runs, its old block is still the caller's: another thread's allocation in
/// between counts on top of it, every change of the totals comes as one [`Change`], and the
/// running sum of the changes meets `peak_outstanding_bytes` exactly.
#[test]
fn realloc_in_flight_stays_outstanding_and_changes_sum_to_the_totals() {
    let mut t = Table::default();
    let mut seen = Vec::new();
    let mut on = |c: Change| seen.push(c);
    let other = |addr, size| {
        Event::Alloc(Alloc {
            tid: 2,
            func: AllocFn::Malloc,
            mmap: false,
            addr,
            size,
            stack: 6,
            ts_ns: 15,
        })
    };
    t.apply_with(&alloc(AllocFn::Malloc, 0x10, 100), &mut on);
    t.apply_with(&free(AllocFn::Realloc, 0x10), &mut on);
    t.apply_with(&other(0x80, 50), &mut on);
    assert_eq!(t.heap_totals.peak_outstanding_bytes, 150);
    t.apply_with(&alloc(AllocFn::Realloc, 0x20, 300), &mut on);
    // A realloc whose return is lost: the next one on the thread ends it.
    t.apply_with(&free(AllocFn::Realloc, 0x20), &mut on);
    t.apply_with(&free(AllocFn::Realloc, 0x80), &mut on);
    t.apply_with(&alloc(AllocFn::Realloc, 0x90, 10), &mut on);
    let h = t.heap_totals;
    assert_eq!((h.outstanding_allocs, h.outstanding_bytes), (1, 10));
    assert_eq!(h.peak_outstanding_bytes, 350);
    assert_eq!((h.frees, h.bytes_freed), (3, 450));
    let (mut now, mut peak) = (0i64, 0i64);
    for c in &seen {
        match c {
            Change::Alloc { block, .. } => now += block.size as i64,
            Change::Free { bytes, .. } => now -= *bytes as i64,
        }
        peak = peak.max(now);
    }
    assert_eq!((now, peak), (10, 350));
}

#[test]
fn release_ends_a_realloc_in_flight() {
    let mut t = Table::default();
    let mut seen = Vec::new();
    t.apply(&alloc(AllocFn::Malloc, 0x10, 100));
    t.apply(&free(AllocFn::Realloc, 0x10));
    t.release_all(50, false, &mut |c| seen.push(c));
    let h = t.heap_totals;
    assert_eq!((h.outstanding_bytes, h.frees, h.bytes_freed), (0, 1, 100));
    assert!(matches!(seen[..], [Change::Free { bytes: 100, .. }]));
    assert_eq!(t.heap_blocks().count(), 0);
}

#[test]
fn frees_of_blocks_held_at_the_fork_are_inherited_not_unmatched() {
    let at = |ts_ns: u64, e: Event| match e {
        Event::Alloc(a) => Event::Alloc(Alloc { ts_ns, ..a }),
        Event::Free {
            tid, func, addr, ..
        } => Event::Free {
            tid,
            func,
            addr,
            ts_ns,
        },
        e => e,
    };
    let mut t = Tables::default();
    let apply = |t: &mut Tables, pid: u32, e: Event| t.apply_from(pid, &e, &mut |_| {});
    // The parent (100) holds 0x10 and 0x20 when it forks 200 at 50; 0x30 comes after.
    apply(&mut t, 100, at(10, alloc(AllocFn::Malloc, 0x10, 64)));
    apply(&mut t, 100, at(20, alloc(AllocFn::Malloc, 0x20, 32)));
    t.fork(200, 100, 50);
    apply(&mut t, 100, at(60, alloc(AllocFn::Malloc, 0x30, 16)));
    // The child frees 0x10 (inherited), 0x30 (the parent's, but after the fork) and 0x40.
    apply(&mut t, 200, at(70, free(AllocFn::Free, 0x10)));
    apply(&mut t, 200, at(71, free(AllocFn::Free, 0x30)));
    apply(&mut t, 200, at(72, free(AllocFn::Free, 0x40)));
    // The grandchild (300, forked by 200 at 80) frees 0x20, which 100 held before 200's fork,
    // and a realloc of the inherited 0x10 address (the child freed it: unmatched).
    t.fork(300, 200, 80);
    apply(&mut t, 300, at(90, free(AllocFn::Free, 0x20)));
    apply(&mut t, 300, at(91, free(AllocFn::Realloc, 0x10)));
    apply(&mut t, 300, at(92, alloc(AllocFn::Realloc, 0x50, 8)));
    let child = t.process(200).unwrap().heap_totals;
    assert_eq!(
        (child.frees, child.unmatched_frees, child.inherited_frees),
        (0, 2, 1)
    );
    let grandchild = t.process(300).unwrap().heap_totals;
    assert_eq!(
        (
            grandchild.frees,
            grandchild.unmatched_frees,
            grandchild.inherited_frees,
            grandchild.allocs
        ),
        (0, 1, 1, 1)
    );
    // The parent's own blocks are untouched; the totals add up.
    let parent = t.process(100).unwrap().heap_totals;
    assert_eq!(
        (parent.outstanding_allocs, parent.outstanding_bytes),
        (3, 112)
    );
    assert_eq!(
        (t.heap_totals.unmatched_frees, t.heap_totals.inherited_frees),
        (3, 2)
    );
    // After an exec the child's frees are its own image's: nothing is inherited any more.
    t.release_process(300, 100, &mut |_| {});
    apply(&mut t, 300, at(110, free(AllocFn::Free, 0x20)));
    let grandchild = t.process(300).unwrap().heap_totals;
    assert_eq!(
        (grandchild.unmatched_frees, grandchild.inherited_frees),
        (2, 1)
    );
}
