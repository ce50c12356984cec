//! RSS explained for one process: its live blocks and mappings from the table, its mappings
//! and their residency from `/proc`, put together by `analysis::rss`.

use std::{collections::HashMap, io};

use crate::{
    analysis::{
        rss::{self, Live, MAX_SCAN_BYTES, Residency},
        tracking::GroupKey,
    },
    stacks::Sites,
    sys::residency,
    table::Table,
};

/// Scans process `pid`, whose table is `table` and whose RSS is `rss_bytes`. Fails when its
/// smaps or pagemap cannot be read (it exited, or smaps is over its bound).
pub fn scan(pid: u32, table: &Table, sites: &Sites, rss_bytes: u64) -> io::Result<Residency> {
    let started = std::time::Instant::now();
    let mut keys: Vec<GroupKey> = Vec::new();
    let mut index: HashMap<GroupKey, usize> = HashMap::new();
    let mut live: Vec<Live> = Vec::with_capacity(
        table.heap_totals.outstanding_allocs as usize + table.mmap_totals.outstanding_maps as usize,
    );
    let mut add = |addr: u64, size: u64, key: GroupKey| {
        let group = *index.entry(key).or_insert_with(|| {
            keys.push(key);
            keys.len() - 1
        });
        live.push(Live {
            start: addr,
            end: addr.saturating_add(size),
            group,
        });
    };
    // Kernel blocks (`--kernel`) are not in the process's address space.
    for (addr, block) in table.heap_blocks().filter(|(_, b)| !b.func.is_kernel()) {
        add(
            addr,
            block.size,
            (sites.site_of(block.stack), block.func, false),
        );
    }
    for (addr, region) in table.map_regions() {
        add(
            addr,
            region.size,
            (sites.site_of(region.stack), region.func, true),
        );
    }
    live.sort_unstable_by_key(|l| l.start);

    let regions = residency::read_smaps(pid)?;
    let allocator = rss::allocator_regions(&regions, &live);
    let scanned = rss::within_budget(&regions, &allocator, MAX_SCAN_BYTES);
    let pagemap = residency::open_pagemap(pid)?;
    let page = residency::page_size();
    let mut runs = Vec::new();
    let mut scanned_bytes = 0;
    for &i in &scanned {
        let r = &regions[i];
        residency::resident_runs(&pagemap, r.start, r.end, page, &mut runs)?;
        scanned_bytes += r.end - r.start;
    }
    let (explained, per_group) = rss::explain(
        rss_bytes,
        &regions,
        &allocator,
        &scanned,
        &runs,
        &live,
        keys.len(),
    );
    Ok(Residency {
        explained,
        groups: keys.into_iter().zip(per_group).collect(),
        scan_ns: started.elapsed().as_nanos() as u64,
        scanned_bytes,
    })
}
