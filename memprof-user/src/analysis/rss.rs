//! RSS explained: which part of a process's resident memory holds live allocations, which part
//! the allocator keeps after frees, and which part is code, stacks, files and memory no traced
//! allocator handed out; and, per call-site group, how many of its outstanding bytes are
//! resident.
//!
//! Pure: the session reads the mappings (`/proc/PID/smaps`), the residency of the allocator's
//! mappings (`/proc/PID/pagemap`) and RSS (`VmRSS`), and passes them in.
//!
//! - An **allocator region** is the brk heap (`[heap]`: glibc's main arena, and any allocator
//!   growing it) or a mapping in which a live block or traced mapping starts (glibc's thread
//!   arenas and mmapped chunks, jemalloc/tcmalloc/mimalloc extents and spans, shared anonymous
//!   mappings). A mapping of an allocator that holds no live block at all is not recognised as
//!   one: its resident pages count as `other`.
//! - `live_resident_bytes`: bytes of live blocks and traced mappings that lie in resident pages
//!   (each byte once, however many blocks cover it).
//! - `allocator_retained_bytes`: the rest of the allocator regions' resident pages: freed chunks
//!   the allocator keeps, free space around live blocks in their pages, chunk headers.
//! - `untouched_live_bytes`: live bytes in pages that are not resident (allocated, never
//!   written, or swapped out).
//! - `other_resident_bytes`: the resident bytes (`Rss` of smaps) of every other mapping, and of
//!   allocator regions whose residency was not read ([`MAX_SCAN_BYTES`]).
//!
//! `live + retained + other` is the sum of the mappings' resident pages, which the kernel's
//! `VmRSS` counts too; the two differ only by the kernel's counter lag and by mappings changed
//! between the reads.

use serde::Serialize;
use serde_json::json;

use super::{recommend::Recommendation, tracking::GroupKey};
pub use crate::sys::residency::Region;

/// Largest total size of allocator regions whose residency one scan reads (16 GiB: 32 MiB of
/// pagemap entries with 4 KiB pages). Regions past it are left out and counted in
/// `unscanned_bytes`.
pub const MAX_SCAN_BYTES: u64 = 16 << 30;

/// One scan of a process: its RSS explained and each group's resident bytes.
#[derive(Clone, Debug, Default)]
pub struct Residency {
    pub explained: RssExplained,
    /// Each group's outstanding bytes that lie in resident pages.
    pub groups: std::collections::HashMap<GroupKey, u64>,
    /// How long the scan took, in ns, and the allocator-region bytes whose residency it read.
    pub scan_ns: u64,
    pub scanned_bytes: u64,
}

/// One live block or traced mapping, `[start, end)`, and the index of its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Live {
    pub start: u64,
    pub end: u64,
    pub group: usize,
}

/// The report's `rss_explained`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RssExplained {
    /// `VmRSS`.
    pub rss_bytes: u64,
    pub live_resident_bytes: u64,
    pub allocator_retained_bytes: u64,
    pub untouched_live_bytes: u64,
    pub other_resident_bytes: u64,
    /// Allocator regions (mappings) found, and their size (virtual).
    pub allocator_regions: u64,
    pub allocator_region_bytes: u64,
    /// Bytes of allocator regions whose residency was not read (over [`MAX_SCAN_BYTES`]); their
    /// resident pages are in `other_resident_bytes`, their live bytes in neither `live` nor
    /// `untouched`.
    pub unscanned_bytes: u64,
}

impl RssExplained {
    /// `live + retained + other`: what the mappings hold, to compare with `rss_bytes`.
    pub fn parts_bytes(&self) -> u64 {
        self.live_resident_bytes + self.allocator_retained_bytes + self.other_resident_bytes
    }
}

/// The regions (indices into `regions`, sorted by start) that are the allocator's: `[heap]`
/// and every region in which an element of `live` starts (anonymous ones; shared anonymous
/// mappings show as `/dev/zero (deleted)`; an allocator may carve blocks out of a memfd).
/// `live` is sorted by start.
pub fn allocator_regions(regions: &[Region], live: &[Live]) -> Vec<usize> {
    regions
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.brk_heap || {
                let i = live.partition_point(|l| l.start < r.start);
                live.get(i).is_some_and(|l| l.start < r.end)
            }
        })
        .map(|(i, _)| i)
        .collect()
}

/// Which of `allocator` (indices into `regions`) to scan: in order, while their total size stays
/// within `budget` bytes. The others are left out.
pub fn within_budget(regions: &[Region], allocator: &[usize], budget: u64) -> Vec<usize> {
    let mut left = budget;
    allocator
        .iter()
        .copied()
        .filter(|&i| {
            let size = regions[i].end - regions[i].start;
            let fits = size <= left;
            if fits {
                left -= size;
            }
            fits
        })
        .collect()
}

/// Explains `rss_bytes`. `regions`: every mapping, sorted by start; `allocator`: the allocator
/// regions; `scanned`: those of them whose residency is in `resident` (sorted, disjoint
/// `[start, end)` runs of resident pages, all inside scanned regions); `live` sorted by start;
/// `groups`: how many groups the elements of `live` name.
///
/// Returns the explanation and, per group, its bytes in resident pages.
pub fn explain(
    rss_bytes: u64,
    regions: &[Region],
    allocator: &[usize],
    scanned: &[usize],
    resident: &[(u64, u64)],
    live: &[Live],
    groups: usize,
) -> (RssExplained, Vec<u64>) {
    let mut out = RssExplained {
        rss_bytes,
        allocator_regions: allocator.len() as u64,
        ..RssExplained::default()
    };
    let mut is_scanned = vec![false; regions.len()];
    for &i in scanned {
        is_scanned[i] = true;
    }
    let mut is_allocator = vec![false; regions.len()];
    for &i in allocator {
        is_allocator[i] = true;
        let size = regions[i].end - regions[i].start;
        out.allocator_region_bytes += size;
        if !is_scanned[i] {
            out.unscanned_bytes += size;
        }
    }
    out.other_resident_bytes = regions
        .iter()
        .zip(&is_scanned)
        .filter(|(_, scanned)| !**scanned)
        .map(|(r, _)| r.rss_bytes)
        .sum();
    let allocator_resident: u64 = resident.iter().map(|(s, e)| e - s).sum();

    // Per group: each block's bytes in resident pages.
    let mut per_group = vec![0u64; groups];
    for l in live {
        per_group[l.group] += overlap(resident, l.start, l.end);
    }

    // The union of live ranges (each byte once), inside scanned regions.
    let scanned_ranges: Vec<(u64, u64)> = scanned
        .iter()
        .map(|&i| (regions[i].start, regions[i].end))
        .collect();
    let mut union_start = 0;
    let mut union_end = 0;
    let flush = |s: u64, e: u64, out: &mut RssExplained| {
        if s < e {
            let in_scanned = overlap(&scanned_ranges, s, e);
            let res = overlap(resident, s, e);
            out.live_resident_bytes += res;
            out.untouched_live_bytes += in_scanned - res;
        }
    };
    for l in live {
        if l.start > union_end {
            flush(union_start, union_end, &mut out);
            union_start = l.start;
            union_end = l.end;
        } else {
            union_end = union_end.max(l.end);
        }
    }
    flush(union_start, union_end, &mut out);
    out.allocator_retained_bytes = allocator_resident.saturating_sub(out.live_resident_bytes);
    // Live bytes outside every scanned region (in an unscanned or non-allocator mapping, or
    // not mapped any more) are neither resident-known nor untouched.
    (out, per_group)
}

/// Bytes of `[start, end)` inside `ranges` (sorted, disjoint).
fn overlap(ranges: &[(u64, u64)], start: u64, end: u64) -> u64 {
    let mut i = ranges.partition_point(|r| r.1 <= start);
    let mut sum = 0;
    while let Some(&(s, e)) = ranges.get(i) {
        if s >= end {
            break;
        }
        sum += e.min(end) - s.max(start);
        i += 1;
    }
    sum
}

/// `retained`: advise when the allocator keeps at least this share of RSS ...
pub const RETAINED_MIN_SHARE: f64 = 0.25;
/// ... and at least this many bytes.
pub const RETAINED_MIN_BYTES: u64 = 8 << 20;
/// `untouched`: advise for a group whose untouched bytes are at least this share of its
/// outstanding bytes ...
pub const UNTOUCHED_MIN_SHARE: f64 = 0.5;
/// ... and at least this many bytes.
pub const UNTOUCHED_MIN_BYTES: u64 = 4 << 20;

/// `retained`: the allocator keeps much freed memory resident.
pub fn retained_advice(e: &RssExplained) -> Option<Recommendation> {
    let share = e.allocator_retained_bytes as f64 / e.rss_bytes.max(1) as f64;
    if share < RETAINED_MIN_SHARE || e.allocator_retained_bytes < RETAINED_MIN_BYTES {
        return None;
    }
    Some(Recommendation {
        kind: "retained",
        site: "process".to_string(),
        message: format!(
            "the allocator keeps {} B resident that no live allocation uses ({:.0}% of RSS {} B, \
             against {} B live): freed chunks pinned by live neighbours or kept for reuse. With \
             glibc, call malloc_trim(0) after large frees, lower M_TRIM_THRESHOLD/M_MMAP_THRESHOLD, \
             or limit arenas (MALLOC_ARENA_MAX=2); with jemalloc, lower dirty_decay_ms and \
             muzzy_decay_ms (MALLOC_CONF) or purge; or move to an allocator that returns freed \
             pages sooner",
            e.allocator_retained_bytes,
            share * 100.0,
            e.rss_bytes,
            e.live_resident_bytes
        ),
        evidence: json!({
            "allocator_retained_bytes": e.allocator_retained_bytes,
            "rss_bytes": e.rss_bytes,
            "live_resident_bytes": e.live_resident_bytes,
            "retained_share": (share * 1000.0).round() / 1000.0,
        }),
    })
}

/// `untouched`: a group holds many bytes it never made resident.
pub fn untouched_advice(site: &str, bytes: u64, resident_bytes: u64) -> Option<Recommendation> {
    let untouched = bytes.saturating_sub(resident_bytes);
    let share = untouched as f64 / bytes.max(1) as f64;
    if share < UNTOUCHED_MIN_SHARE || untouched < UNTOUCHED_MIN_BYTES {
        return None;
    }
    Some(Recommendation {
        kind: "untouched",
        site: site.to_string(),
        message: format!(
            "{site} holds {bytes} B of which {untouched} B ({:.0}%) were never made resident: \
             reserved, never touched. They cost address space, not RAM; allocate what is used, \
             or keep the reservation if it is meant to grow",
            share * 100.0
        ),
        evidence: json!({
            "bytes": bytes,
            "resident_bytes": resident_bytes,
            "untouched_bytes": untouched,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    fn region(start: u64, pages: u64, rss_pages: u64, brk_heap: bool, anonymous: bool) -> Region {
        Region {
            start,
            end: start + pages * P,
            rss_bytes: rss_pages * P,
            brk_heap,
            anonymous,
        }
    }

    #[test]
    fn allocator_regions_are_brk_heap_and_anonymous_with_live_starts() {
        let regions = vec![
            region(0x10000, 4, 2, false, false), // a file
            region(0x20000, 16, 8, true, true),  // [heap], nothing live
            region(0x40000, 16, 8, false, true), // anon, a block starts here
            region(0x60000, 16, 8, false, true), // anon, only covered by a block from before
            region(0x80000, 4, 4, false, false), // a file (memfd) where a block starts
            region(0x90000, 4, 4, false, true),  // anon, nothing live
        ];
        let live = vec![
            Live {
                start: 0x40010,
                end: 0x62000,
                group: 0,
            },
            Live {
                start: 0x80000,
                end: 0x80010,
                group: 0,
            },
        ];
        assert_eq!(allocator_regions(&regions, &live), vec![1, 2, 4]);
        assert_eq!(
            within_budget(&regions, &[1, 2], 16 * P),
            vec![1],
            "the second does not fit"
        );
        assert_eq!(within_budget(&regions, &[1, 2], 32 * P), vec![1, 2]);
    }

    /// A 64 MiB buffer with 16 MiB written, a heap with a freed hole pinned by a live neighbour,
    /// and a file mapping: every part exactly.
    #[test]
    fn explains_rss_exactly() {
        let mib = 1 << 20;
        let heap = 0x100_0000;
        let buf = 0x1000_0000;
        let regions = vec![
            region(0x40_0000, 64, 40, false, false), // code: 40 pages resident
            region(heap, 64, 64, true, true),        // [heap]: all 64 pages resident
            region(buf - P, 64 * mib / P + 1, 0, false, true), // the buffer's mapping
        ];
        let live = vec![
            // group 0: the first 16 pages of the heap
            Live {
                start: heap,
                end: heap + 16 * P,
                group: 0,
            },
            // group 1: a block of 100 B alone in the heap's last page
            Live {
                start: heap + 63 * P,
                end: heap + 63 * P + 100,
                group: 1,
            },
            // group 2: the 64 MiB buffer, first 16 MiB written
            Live {
                start: buf,
                end: buf + 64 * mib,
                group: 2,
            },
        ];
        let allocator = allocator_regions(&regions, &live);
        assert_eq!(allocator, vec![1, 2]);
        let resident = vec![
            (heap, heap + 64 * P),
            (buf - P, buf + 16 * mib), // header page and the written part
        ];
        let (e, groups) = explain(
            (40 + 64 + 1) * P + 16 * mib,
            &regions,
            &allocator,
            &allocator,
            &resident,
            &live,
            3,
        );
        assert_eq!(groups, vec![16 * P, 100, 16 * mib]);
        assert_eq!(e.live_resident_bytes, 16 * P + 100 + 16 * mib);
        assert_eq!(
            e.allocator_retained_bytes,
            (64 * P - 16 * P - 100) + P,
            "the heap's free pages and slack, and the buffer's header page"
        );
        assert_eq!(e.untouched_live_bytes, 48 * mib);
        assert_eq!(e.other_resident_bytes, 40 * P, "the code");
        assert_eq!(e.parts_bytes(), e.rss_bytes);
        assert_eq!(e.unscanned_bytes, 0);
        assert_eq!(e.allocator_regions, 2);
    }

    #[test]
    fn overlapping_live_ranges_count_once() {
        let regions = vec![region(0x10000, 8, 8, false, true)];
        let live = vec![
            Live {
                start: 0x10000,
                end: 0x14000,
                group: 0,
            },
            Live {
                start: 0x12000,
                end: 0x18000,
                group: 1,
            },
        ];
        let resident = vec![(0x10000, 0x16000)];
        let (e, groups) = explain(8 * P, &regions, &[0], &[0], &resident, &live, 2);
        assert_eq!(groups, vec![4 * P, 4 * P]);
        assert_eq!(e.live_resident_bytes, 6 * P);
        assert_eq!(e.untouched_live_bytes, 2 * P);
        assert_eq!(e.allocator_retained_bytes, 0);
        assert_eq!(e.other_resident_bytes, 0);
    }

    #[test]
    fn advice_only_past_the_bars() {
        let mib = 1 << 20;
        let mut e = RssExplained {
            rss_bytes: 100 * mib,
            live_resident_bytes: 30 * mib,
            allocator_retained_bytes: 40 * mib,
            other_resident_bytes: 30 * mib,
            ..RssExplained::default()
        };
        let r = retained_advice(&e).expect("40% of RSS retained");
        assert_eq!(r.kind, "retained");
        assert_eq!(r.evidence["allocator_retained_bytes"], 40 * mib);
        assert_eq!(r.evidence["retained_share"], 0.4);
        assert!(r.message.contains("malloc_trim"), "{}", r.message);
        e.allocator_retained_bytes = 20 * mib;
        assert_eq!(retained_advice(&e), None, "20% is under the bar");
        e.rss_bytes = 10 * mib;
        e.allocator_retained_bytes = 7 * mib;
        assert_eq!(retained_advice(&e), None, "70% but under 8 MiB");

        let u = untouched_advice("reserve_big", 64 * mib, 16 * mib).expect("48 MiB untouched");
        assert_eq!(u.evidence["untouched_bytes"], 48 * mib);
        assert!(u.message.contains("75%"), "{}", u.message);
        assert_eq!(untouched_advice("half", 64 * mib, 33 * mib), None);
        assert!(
            untouched_advice("small", 6 * mib, 0).is_some(),
            "6 MiB, all untouched"
        );
        assert_eq!(untouched_advice("tiny", 3 * mib, 0), None, "under 4 MiB");
    }

    #[test]
    fn unscanned_regions_count_as_other() {
        let regions = vec![
            region(0x10000, 8, 8, true, true),
            region(0x40000, 8, 5, false, true),
        ];
        let live = vec![Live {
            start: 0x40000,
            end: 0x48000,
            group: 0,
        }];
        let allocator = allocator_regions(&regions, &live);
        let scanned = within_budget(&regions, &allocator, 8 * P);
        assert_eq!(scanned, vec![0]);
        let resident = vec![(0x10000, 0x18000)];
        let (e, groups) = explain(13 * P, &regions, &allocator, &scanned, &resident, &live, 1);
        assert_eq!(groups, vec![0]);
        assert_eq!(e.unscanned_bytes, 8 * P);
        assert_eq!(e.other_resident_bytes, 5 * P);
        assert_eq!(e.allocator_retained_bytes, 8 * P);
        assert_eq!(e.untouched_live_bytes, 0, "unknown, not untouched");
        assert_eq!(e.parts_bytes(), 13 * P);
    }
}
