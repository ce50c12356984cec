//! Agent throughput: synthetic ring-buffer records replayed through decode → table → tracker
//! → report aggregation (`memprof_bench::replay`), reported by criterion in records (events)
//! per second. `cargo xtask bench --micro` runs it; the target is at least 1M events/s.

use std::{hint::black_box, time::Duration};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use memprof_bench::{Agent, replay, synthetic_records};

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
    group.finish();
}

criterion_group!(benches, agent);
criterion_main!(benches);
