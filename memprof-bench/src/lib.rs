//! The agent's hot path outside the kernel, for microbenchmarks: synthetic ring-buffer records
//! ([`synthetic_records`]) replayed through the decoder, the live-allocation table, the analytics
//! tracker and the report aggregation ([`Agent`]), as `memprof::session::Session` does with the
//! records it reads from the kernel (minus the kernel's maps and the symbolizer's file reads).

use memprof::{
    analysis::tracking::Tracker,
    ingest::event::{DecodeError, Event, decode, encode},
    report::{self, Inputs, KernelLosses, Report},
    stacks::{Frame, Sites},
    table::{Change, Tables},
};
use memprof_common::{
    AllocEvent, AllocFn, EVENT_VERSION, EventHeader, EventKind, FreeEvent, NO_STACK,
};

/// Records as the ring buffer hands them over: one byte slice each, concatenated.
pub struct Records {
    pub bytes: Vec<u8>,
    /// `(start, len)` of each record in `bytes`.
    pub spans: Vec<(usize, usize)>,
}

impl Records {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.spans.iter().map(|&(s, n)| &self.bytes[s..s + n])
    }
}

/// A small deterministic generator (64-bit LCG, high bits).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    fn below(&mut self, n: u32) -> u32 {
        self.next() % n
    }
}

/// `n` records of a churning process: `stacks` call sites, about `live` blocks outstanding,
/// malloc (with some calloc), free, and realloc (announced free + allocation), sizes 16 B to
/// 4 KiB, timestamps 1 µs apart.
pub fn synthetic_records(n: usize, stacks: u32, live: usize) -> Records {
    let mut rng = Rng(0x5eed);
    let mut out = Records {
        bytes: Vec::with_capacity(n * 48),
        spans: Vec::with_capacity(n),
    };
    let mut blocks: Vec<u64> = Vec::with_capacity(live * 2);
    let mut next_addr: u64 = 0x5555_0000_0000;
    let mut ts: u64 = 1_000_000_000;
    let tid = 4242;
    let header = |kind: EventKind, func: AllocFn, ts_ns: u64| EventHeader {
        version: EVENT_VERSION,
        kind: kind as u16,
        tgid: tid,
        tid,
        func: func as u32,
        ts_ns,
    };
    let push = |out: &mut Records, bytes: Vec<u8>| {
        out.spans.push((out.bytes.len(), bytes.len()));
        out.bytes.extend_from_slice(&bytes);
    };
    while out.len() < n {
        ts += 1_000;
        let roll = rng.below(100);
        let grow = blocks.len() < live || roll < 50;
        if !blocks.is_empty() && roll >= 95 {
            // realloc: the old block is announced at entry, the new one at the return.
            let i = rng.below(blocks.len() as u32) as usize;
            let old = blocks.swap_remove(i);
            push(
                &mut out,
                encode(&FreeEvent {
                    header: header(EventKind::Free, AllocFn::Realloc, ts),
                    addr: old,
                }),
            );
            next_addr += 4096;
            blocks.push(next_addr);
            push(
                &mut out,
                encode(&AllocEvent {
                    header: header(EventKind::Alloc, AllocFn::Realloc, ts),
                    addr: next_addr,
                    size: 16 << rng.below(9),
                    stack: u64::from(rng.below(stacks)) * 2 + 1,
                    py_stack: NO_STACK,
                }),
            );
        } else if grow || blocks.is_empty() {
            next_addr += 4096;
            blocks.push(next_addr);
            let func = if roll.is_multiple_of(10) {
                AllocFn::Calloc
            } else {
                AllocFn::Malloc
            };
            let stack = match rng.below(1000) {
                0 => NO_STACK,
                _ => u64::from(rng.below(stacks)) * 2 + 1,
            };
            push(
                &mut out,
                encode(&AllocEvent {
                    header: header(EventKind::Alloc, func, ts),
                    addr: next_addr,
                    size: 16 << rng.below(9),
                    stack,
                    py_stack: NO_STACK,
                }),
            );
        } else {
            let i = rng.below(blocks.len() as u32) as usize;
            let addr = blocks.swap_remove(i);
            push(
                &mut out,
                encode(&FreeEvent {
                    header: header(EventKind::Free, AllocFn::Free, ts),
                    addr,
                }),
            );
        }
    }
    out.spans.truncate(n);
    out
}

/// The agent's state for one traced process, fed record by record.
pub struct Agent {
    pub table: Tables,
    pub tracker: Tracker,
    changes: Vec<Change>,
    sites: Sites,
    last_ts: u64,
}

impl Agent {
    pub fn new(sample_bytes: u64) -> Self {
        Self {
            table: Tables::with_sampling(sample_bytes),
            tracker: Tracker::new(&[], 0),
            changes: Vec::new(),
            sites: Sites::new(),
            last_ts: 0,
        }
    }

    /// Decodes one record and applies it, as `Session::observe` does.
    pub fn ingest(&mut self, record: &[u8]) -> Result<(), DecodeError> {
        let event = decode(record)?;
        if let Event::Alloc(a) = event {
            self.last_ts = a.ts_ns;
        }
        let changes = &mut self.changes;
        self.table.apply_from(0, &event, &mut |c| changes.push(c));
        let outstanding = self.table.heap_totals.outstanding_bytes;
        for change in self.changes.drain(..) {
            let stack = change.block().stack;
            let site = match self.sites.get(stack) {
                Some(site) => site,
                // Stacks are not symbolized here: each stack key is a site of one unnamed
                // frame at its own offset, as the naming thread would hand it over.
                None => self.sites.intern(stack, &[unnamed_frame(stack)]),
            };
            self.tracker.on_change(&change, site, outstanding);
        }
        Ok(())
    }

    /// The periodic sample of every group's outstanding bytes (every `--sample-every`).
    pub fn sample(&mut self) {
        self.tracker
            .sample(self.last_ts, self.table.heap_totals.outstanding_bytes, None);
    }

    /// A snapshot report of everything so far (stacks are named `site_N`: no symbolization).
    pub fn report(&mut self) -> Report {
        let no_residency = std::collections::HashMap::new();
        let inputs = Inputs {
            pid: 4242,
            table: &self.table,
            unwind: None,
            forgotten: Default::default(),
            sites: &self.sites,
            kernel: KernelLosses::default(),
            probe_stats: Vec::new(),
            decode_errors: 0,
            unread_at_end: 0,
            now_ns: self.last_ts,
            elapsed_s: self.last_ts as f64 / 1e9,
            min_age_ns: 0,
            top: None,
            tracker: &self.tracker,
            limit: None,
            rules: &[],
            mem: None,
            residency: &no_residency,
            rss_timeline: &[],
        };
        report::snapshot(&inputs)
    }
}

/// The one frame of synthetic stack `stack`: an unnamed native frame in a module of its own.
fn unnamed_frame(stack: u64) -> Frame {
    Frame {
        module: Some("synthetic".to_string()),
        offset: Some(stack),
        kind: "native",
        ..Frame::unknown()
    }
}

/// Replays `records` through a fresh agent, sampling every `sample_every` records, and builds
/// the report: the whole pipeline the microbenchmark times.
pub fn replay(records: &Records, sample_every: usize, sample_bytes: u64) -> Report {
    let mut agent = Agent::new(sample_bytes);
    for (i, record) in records.iter().enumerate() {
        agent.ingest(record).expect("synthetic records decode");
        if (i + 1) % sample_every == 0 {
            agent.sample();
        }
    }
    agent.report()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_accounts_for_every_record() {
        let records = synthetic_records(20_000, 64, 2_000);
        assert_eq!(records.len(), 20_000);
        let report = replay(&records, 5_000, 0);
        let t = report.totals.heap;
        assert!(t.allocs > 10_000 && t.frees > 5_000, "{t:?}");
        assert_eq!(t.unmatched_frees, 0);
        assert_eq!(t.reused_addresses, 0);
        assert_eq!(t.outstanding_allocs, t.allocs - t.frees);
        assert!(report.leak_groups > 60, "{}", report.leak_groups);
    }
}
