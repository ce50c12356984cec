//! Agent throughput: synthetic ring-buffer records replayed through decode → table → tracker
//! → report aggregation (`memprof_bench::replay`), reported by criterion in records (events)
//! per second. `cargo xtask bench --micro` runs it; the target is at least 1M events/s. Also
//! the residency scan behind RSS explained, in pages per second.

use std::{hint::black_box, time::Duration};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use memprof::analysis::peak::{Held, PeakSet, Step};
use memprof_bench::{Agent, replay, synthetic_records};

/// `n` heap changes at `sites` call sites with about `live` blocks outstanding (sizes 16 B to
/// 4 KiB), as the peak takes them: one step per allocation or free.
fn peak_steps(n: usize, sites: u32, live: usize) -> Vec<(u32, Step)> {
    let mut state = 0x5eed_u64;
    let mut next = |m: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % m
    };
    let mut blocks: Vec<(u32, u64)> = Vec::with_capacity(live * 2);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let grow = blocks.len() < live || next(100) < 50;
        let (site, size, increase) = if grow || blocks.is_empty() {
            let b = (next(u64::from(sites)) as u32, 16 << next(9));
            blocks.push(b);
            (b.0, b.1, true)
        } else {
            let j = next(blocks.len() as u64) as usize;
            let b = blocks.swap_remove(j);
            (b.0, b.1, false)
        };
        out.push((
            site,
            Step {
                held: Held {
                    bytes: size,
                    blocks: 1,
                    ..Held::default()
                },
                increase,
                ts_ns: 1_000 * i as u64,
                ..Step::default()
            },
        ));
    }
    out
}

/// Records per replay: 200 000 events, 256 call sites, about 10 000 blocks outstanding.
const EVENTS: usize = 200_000;
const SITES: u32 = 256;
const LIVE: usize = 10_000;
/// A tracker sample every 50 000 records: at 1M events/s that is 20 samples a second, 10 times
/// the default `--sample-every`.
const SAMPLE_EVERY: usize = 50_000;

fn agent(c: &mut Criterion) {
    let records = synthetic_records(EVENTS, SITES, LIVE);
    let mut group = c.benchmark_group("agent");
    group
        .throughput(Throughput::Elements(records.len() as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(7));
    group.bench_function("decode", |b| {
        b.iter(|| {
            for record in records.iter() {
                black_box(memprof::ingest::event::decode(black_box(record)).unwrap());
            }
        })
    });
    group.bench_function("ingest", |b| {
        b.iter(|| {
            let mut agent = Agent::new(0);
            for record in records.iter() {
                agent.ingest(black_box(record)).unwrap();
            }
            black_box(agent.table.heap_totals)
        })
    });
    group.bench_function("ingest_and_report", |b| {
        b.iter(|| black_box(replay(&records, SAMPLE_EVERY, 0)))
    });
    // The cost of keeping who held the peak: each heap change through a `PeakSet` (what the
    // tracker does per change, once for the trace and once more per process with `--all`).
    let steps = peak_steps(EVENTS, SITES, LIVE);
    group.bench_function("peak_keep", |b| {
        b.iter(|| {
            let mut set = PeakSet::new(false);
            for (site, step) in steps.iter() {
                set.change(*site, black_box(step));
            }
            black_box(set.snapshot().total)
        })
    });
    group.finish();
    eprintln!(
        "peak: {} B per site slot (key and slot, before the hash map's overhead)",
        std::mem::size_of::<(
            (memprof::stacks::SiteId, memprof_common::AllocFn, bool),
            memprof::analysis::peak::Slot
        )>()
    );
}

/// The residency scan behind RSS explained: this process's smaps, the pagemap of a 1 GiB
/// anonymous mapping with every fourth page resident (65 536 runs, the runs' worst case is
/// every other page), and the explanation with 100 000 live blocks of 4 KiB in it. Throughput
/// in pages (4 KiB): 262 144 pages a GiB.
fn residency(c: &mut Criterion) {
    use memprof::{
        analysis::rss::{self, Live},
        sys::residency,
    };
    const GIB: usize = 1 << 30;
    let page = residency::page_size();
    // SAFETY: a fresh private anonymous mapping, used only here and never unmapped (the
    // process ends with the benchmark).
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            GIB,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let start = base as u64;
    // SAFETY: inside the mapping.
    unsafe {
        libc::madvise(base, GIB, libc::MADV_NOHUGEPAGE);
        for k in (0..GIB as u64 / page).step_by(4) {
            *((start + k * page) as *mut u8) = 1;
        }
    }
    let live: Vec<Live> = (0..100_000u64)
        .map(|i| Live {
            start: start + i * 2 * page,
            end: start + i * 2 * page + 4096,
            group: (i % 256) as usize,
        })
        .collect();
    let pid = std::process::id();
    let mut group = c.benchmark_group("residency");
    group
        .throughput(Throughput::Elements(GIB as u64 / page))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    group.bench_function("scan_1GiB", |b| {
        b.iter(|| {
            let regions = residency::read_smaps(pid).unwrap();
            let allocator = rss::allocator_regions(&regions, &live);
            let pagemap = residency::open_pagemap(pid).unwrap();
            let mut runs = Vec::new();
            for &i in &allocator {
                let r = &regions[i];
                residency::resident_runs(&pagemap, r.start, r.end, page, &mut runs).unwrap();
            }
            black_box(rss::explain(
                0, &regions, &allocator, &allocator, &runs, &live, 256,
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, agent, residency);
criterion_main!(benches);
