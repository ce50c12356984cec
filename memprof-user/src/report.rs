//! Reports: the totals and the outstanding allocations grouped by call stack, as NDJSON records
//! (`"type":"snapshot"` / `"type":"report"`) or as text for a person.

use std::{collections::HashMap, fmt::Write as _};

use memprof_common::{AllocFn, NO_STACK};
use serde::Serialize;

use crate::{
    stacks::StackStore,
    symbolize::{Frame, Symbolizer},
    table::{HeapTotals, LiveAlloc, MmapTotals, Table},
};

/// Losses the kernel programs counted (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelLosses {
    /// Records dropped because the ring buffer was full.
    pub ring_full: u64,
    /// Allocator calls not traced because the per-thread state map was full.
    pub inflight_full: u64,
    /// Allocations recorded without a stack (stack map full or colliding).
    pub stack_lost: u64,
    /// Allocator returns whose entry was not seen (calls already running at attach).
    pub orphan_returns: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub allocs: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
    pub bytes_freed: u64,
    pub outstanding_allocs: u64,
    pub outstanding_bytes: u64,
    pub peak_outstanding_bytes: u64,
    /// Events that never reached the table: ring full, state map full, undecodable records.
    pub lost_events: u64,
    pub unmatched_frees: u64,
    pub lost_stacks: u64,
    pub reused_addresses: u64,
}

impl Totals {
    fn new(h: &HeapTotals, k: &KernelLosses, decode_errors: u64) -> Self {
        Self {
            allocs: h.allocs,
            frees: h.frees,
            bytes_allocated: h.bytes_allocated,
            bytes_freed: h.bytes_freed,
            outstanding_allocs: h.outstanding_allocs,
            outstanding_bytes: h.outstanding_bytes,
            peak_outstanding_bytes: h.peak_outstanding_bytes,
            lost_events: k.ring_full + k.inflight_full + decode_errors,
            unmatched_frees: h.unmatched_frees,
            lost_stacks: k.stack_lost,
            reused_addresses: h.reused_addresses,
        }
    }
}

/// Outstanding allocations sharing one call stack and allocator.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Leak {
    pub bytes: u64,
    pub allocs: u64,
    pub oldest_age_s: f64,
    pub allocator: &'static str,
    /// `heap` (malloc family) or `mmap` (anonymous mapping outside the allocator).
    pub kind: &'static str,
    /// Innermost first; the allocator's own frames are not included.
    pub stack: Vec<Frame>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    #[serde(rename = "type")]
    pub record: &'static str,
    pub pid: u32,
    pub elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exited: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<Option<i32>>,
    pub totals: Totals,
    pub mmap: MmapTotals,
    pub kernel: KernelLosses,
    pub min_age_s: f64,
    /// Number of call-stack groups passing `min_age_s`, before `--top` is applied.
    pub leak_groups: usize,
    /// Frames in `leaks` whose function could not be named.
    pub unknown_frames: u64,
    pub leaks: Vec<Leak>,
}

/// Everything a report is made from.
pub struct Inputs<'a> {
    pub pid: u32,
    pub table: &'a Table,
    pub stacks: &'a StackStore,
    pub kernel: KernelLosses,
    pub decode_errors: u64,
    /// CLOCK_MONOTONIC now, in ns (the clock of the kernel's timestamps).
    pub now_ns: u64,
    pub elapsed_s: f64,
    pub min_age_ns: u64,
    pub top: Option<usize>,
}

#[derive(Default)]
struct Group {
    bytes: u64,
    allocs: u64,
    oldest_ns: u64,
}

/// Builds a snapshot record; [`finish`] turns one into the final report.
pub fn snapshot(inputs: &Inputs<'_>, symbolizer: &mut Symbolizer) -> Report {
    let mut groups: HashMap<(u64, AllocFn, bool), Group> = HashMap::new();
    let mut add = |block: &LiveAlloc, mmap: bool| {
        let age = inputs.now_ns.saturating_sub(block.ts_ns);
        if age < inputs.min_age_ns {
            return;
        }
        let g = groups
            .entry((block.stack, block.func, mmap))
            .or_insert(Group {
                oldest_ns: u64::MAX,
                ..Group::default()
            });
        g.bytes += block.size;
        g.allocs += 1;
        g.oldest_ns = g.oldest_ns.min(block.ts_ns);
    };
    inputs.table.heap_blocks().for_each(|(_, b)| add(b, false));
    inputs.table.map_regions().for_each(|(_, b)| add(b, true));

    let mut ranked: Vec<_> = groups.into_iter().collect();
    ranked.sort_by(|(ka, a), (kb, b)| {
        (b.bytes, b.allocs)
            .cmp(&(a.bytes, a.allocs))
            .then(ka.0.cmp(&kb.0))
            .then((ka.1 as u32).cmp(&(kb.1 as u32)))
    });
    let leak_groups = ranked.len();
    ranked.truncate(inputs.top.unwrap_or(usize::MAX));

    let mut unknown_frames = 0;
    let leaks = ranked
        .into_iter()
        .map(|((stack, func, mmap), g)| {
            let stack = match inputs.stacks.get(stack).filter(|_| stack != NO_STACK) {
                Some(frames) => symbolizer.frames(inputs.stacks, frames),
                None => Vec::new(),
            };
            unknown_frames += stack.iter().filter(|f| f.function.is_none()).count() as u64;
            Leak {
                bytes: g.bytes,
                allocs: g.allocs,
                oldest_age_s: ns_to_s(inputs.now_ns.saturating_sub(g.oldest_ns)),
                allocator: func.name(),
                kind: if mmap { "mmap" } else { "heap" },
                stack,
            }
        })
        .collect();

    Report {
        record: "snapshot",
        pid: inputs.pid,
        elapsed_s: inputs.elapsed_s,
        duration_s: None,
        exited: None,
        exit_code: None,
        totals: Totals::new(
            &inputs.table.heap_totals,
            &inputs.kernel,
            inputs.decode_errors,
        ),
        mmap: inputs.table.mmap_totals,
        kernel: inputs.kernel,
        min_age_s: ns_to_s(inputs.min_age_ns),
        leak_groups,
        unknown_frames,
        leaks,
    }
}

/// Turns a snapshot into the final report.
pub fn finish(mut report: Report, exited: bool, exit_code: Option<i32>) -> Report {
    report.record = "report";
    report.duration_s = Some(report.elapsed_s);
    report.exited = Some(exited);
    report.exit_code = Some(exit_code);
    report
}

fn ns_to_s(ns: u64) -> f64 {
    (ns as f64 / 1e9 * 1000.0).round() / 1000.0
}

/// Human-readable byte count.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The text a person reads at the end of a trace (or at each `--interval`).
pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    let t = &r.totals;
    let what = if r.record == "report" {
        "report"
    } else {
        "snapshot"
    };
    let _ = write!(out, "memprof {what}: pid {}, {:.2} s", r.pid, r.elapsed_s);
    match (r.exited, r.exit_code) {
        (Some(true), Some(Some(code))) => {
            let _ = write!(out, ", exited with status {code}");
        }
        (Some(true), _) => out.push_str(", exited"),
        _ => {}
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "  allocations  {} ({})    frees {} ({})    unmatched frees {}",
        t.allocs,
        human_bytes(t.bytes_allocated),
        t.frees,
        human_bytes(t.bytes_freed),
        t.unmatched_frees
    );
    let _ = writeln!(
        out,
        "  outstanding  {} in {} allocations    peak during trace {}",
        human_bytes(t.outstanding_bytes),
        t.outstanding_allocs,
        human_bytes(t.peak_outstanding_bytes)
    );
    let _ = writeln!(
        out,
        "  mmap         {} outstanding in {} mappings ({} mapped, {} unmapped)",
        human_bytes(r.mmap.outstanding_bytes),
        r.mmap.outstanding_maps,
        human_bytes(r.mmap.bytes_mapped),
        human_bytes(r.mmap.bytes_unmapped)
    );
    let _ = writeln!(
        out,
        "  lost events  {}    lost stacks {}    unknown frames {}",
        t.lost_events, t.lost_stacks, r.unknown_frames
    );
    if r.leaks.is_empty() {
        let _ = writeln!(
            out,
            "\nNo outstanding allocations at least {} s old.",
            r.min_age_s
        );
        return out;
    }
    let _ = writeln!(
        out,
        "\nTop {} of {} call sites by outstanding bytes (age >= {} s):",
        r.leaks.len(),
        r.leak_groups,
        r.min_age_s
    );
    for (i, leak) in r.leaks.iter().enumerate() {
        let _ = writeln!(
            out,
            "#{:<3} {} in {} allocations via {} ({}), oldest {:.2} s",
            i + 1,
            human_bytes(leak.bytes),
            leak.allocs,
            leak.allocator,
            leak.kind,
            leak.oldest_age_s
        );
        if leak.stack.is_empty() {
            let _ = writeln!(out, "       (stack not captured)");
        }
        for f in &leak.stack {
            let name = f.function.as_deref().unwrap_or("??");
            let module = f
                .module
                .as_deref()
                .map(|m| m.rsplit('/').next().unwrap_or(m))
                .unwrap_or("?");
            let _ = match (&f.file, f.line) {
                (Some(file), Some(line)) => {
                    let file = file.rsplit('/').next().unwrap_or(file);
                    writeln!(out, "       {name} ({file}:{line}) [{module}]")
                }
                _ => writeln!(out, "       {name} [{module}] {}", f.addr),
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Alloc, Event};

    fn alloc(addr: u64, size: u64, stack: u64, ts_ns: u64) -> Event {
        Event::Alloc(Alloc {
            tid: 1,
            func: AllocFn::Malloc,
            mmap: false,
            addr,
            size,
            stack,
            ts_ns,
        })
    }

    fn inputs<'a>(table: &'a Table, stacks: &'a StackStore, min_age_ns: u64) -> Inputs<'a> {
        Inputs {
            pid: 42,
            table,
            stacks,
            kernel: KernelLosses {
                ring_full: 2,
                inflight_full: 1,
                stack_lost: 4,
                orphan_returns: 0,
            },
            decode_errors: 0,
            now_ns: 10_000_000_000,
            elapsed_s: 1.5,
            min_age_ns,
            top: None,
        }
    }

    #[test]
    fn groups_by_stack_sorted_by_bytes_with_age_filter() {
        let mut table = Table::new();
        table.apply(&alloc(0x10, 100, 1, 1_000_000_000));
        table.apply(&alloc(0x20, 100, 1, 9_000_000_000));
        table.apply(&alloc(0x30, 500, 2, 2_000_000_000));
        table.apply(&alloc(0x40, 7, NO_STACK, 2_000_000_000));
        let stacks = StackStore::new();
        let mut sym = Symbolizer::new();
        let r = snapshot(&inputs(&table, &stacks, 0), &mut sym);
        let got: Vec<_> = r
            .leaks
            .iter()
            .map(|l| (l.bytes, l.allocs, l.oldest_age_s))
            .collect();
        assert_eq!(got, vec![(500, 1, 8.0), (200, 2, 9.0), (7, 1, 8.0)]);
        assert_eq!(r.totals.lost_events, 3);
        assert_eq!(r.totals.lost_stacks, 4);
        // Only allocations at least 5 s old: the young block of stack 1 drops out.
        let r = snapshot(&inputs(&table, &stacks, 5_000_000_000), &mut sym);
        let got: Vec<_> = r.leaks.iter().map(|l| (l.bytes, l.allocs)).collect();
        assert_eq!(got, vec![(500, 1), (100, 1), (7, 1)]);
        assert_eq!(r.leak_groups, 3);
    }

    #[test]
    fn json_has_contract_fields() {
        let mut table = Table::new();
        table.apply(&alloc(0x10, 64, NO_STACK, 1));
        let stacks = StackStore::new();
        let mut sym = Symbolizer::new();
        let r = finish(
            snapshot(&inputs(&table, &stacks, 0), &mut sym),
            true,
            Some(3),
        );
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["type"], "report");
        for key in [
            "allocs",
            "frees",
            "bytes_allocated",
            "bytes_freed",
            "outstanding_allocs",
            "outstanding_bytes",
            "peak_outstanding_bytes",
            "lost_events",
            "unmatched_frees",
        ] {
            assert!(v["totals"][key].is_u64(), "totals.{key} missing in {v}");
        }
        assert_eq!(v["exit_code"], 3);
        assert_eq!(v["exited"], true);
        let leak = &v["leaks"][0];
        assert_eq!(leak["bytes"], 64);
        assert_eq!(leak["allocs"], 1);
        assert_eq!(leak["allocator"], "malloc");
        assert!(leak["oldest_age_s"].is_f64());
        assert!(leak["stack"].is_array());
    }

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(1000), "1000 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(8 << 20), "8.0 MiB");
    }

    #[test]
    fn text_mentions_losses_and_sites() {
        let mut table = Table::new();
        table.apply(&alloc(0x10, 64, NO_STACK, 1));
        let stacks = StackStore::new();
        let mut sym = Symbolizer::new();
        let text = render_text(&snapshot(&inputs(&table, &stacks, 0), &mut sym));
        assert!(text.contains("lost events  3"), "{text}");
        assert!(text.contains("64 B in 1 allocations via malloc"), "{text}");
    }
}
