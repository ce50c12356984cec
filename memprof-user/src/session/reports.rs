//! What the trace tells while it runs and at its end: snapshots and the report, the profile the
//! outputs and live endpoints take, alerts, and the status line.

use std::io::{self, Write as _};

use serde::Serialize;

use memprof_common::unwind_end;

use super::{Session, residency};

/// Processes whose RSS one snapshot explains in a multi-process trace (those holding the
/// most traced bytes); the others' entries have no `rss_explained` that time.
const RSS_SCANS_MAX: usize = 32;

/// Time one snapshot spends explaining other processes' RSS after the main one's; the
/// processes left go without `rss_explained` that time.
const RSS_SCANS_BUDGET: std::time::Duration = std::time::Duration::from_millis(500);

/// Points of the RSS-explained timeline kept; past it, every other one is dropped.
const RSS_TIMELINE_MAX: usize = 2048;
use crate::{
    output::{json, text},
    report::{self, Inputs, ProcessInfo, Profile, Report, names::human_bytes},
    sys::{clock::monotonic_ns, procmem::ProcMem},
};

/// An `"type":"alert"` record.
#[derive(Clone, Debug, Serialize)]
pub struct Alert {
    #[serde(rename = "type")]
    pub record: &'static str,
    /// `threshold` (outstanding bytes over `--alert-threshold`) or `growth` (heap growth over
    /// `--growth-threshold`).
    pub kind: &'static str,
    pub pid: u32,
    pub elapsed_s: f64,
    pub value: f64,
    pub limit: f64,
    pub message: String,
}

impl Session {
    pub(super) fn inputs(&self, now: u64) -> Inputs<'_> {
        Inputs {
            pid: self.pid,
            table: &self.table,
            sites: &self.sites,
            kernel: report::KernelLosses {
                mapping_records_lost: self.watch.as_ref().map_or(0, |w| w.lost),
                ..self.tracer.losses()
            },
            probe_stats: self.tracer.probe_stats(),
            decode_errors: self.decode_errors,
            unread_at_end: self.unread_at_end,
            now_ns: now,
            elapsed_s: (now - self.start_ns) as f64 / 1e9,
            min_age_ns: self.settings.min_age.as_nanos() as u64,
            tracker: &self.tracker,
            unwind: self.unwind_report(),
            forgotten: report::Forgotten {
                processes: self.evicted_processes,
                unscraped_processes: self.evicted_unscraped,
                groups: self.pruned_groups,
                profile_sites_over_cap: self
                    .process_sites
                    .as_ref()
                    .map_or(0, |p| p.over_cap_allocs()),
            },
            limit: self.settings.limit,
            rules: &self.rules,
            mem: ProcMem::read(self.pid)
                .ok()
                .or(self.procs.get(&self.pid).and_then(|p| p.last_mem)),
            residency: &self.residency,
            rss_timeline: &self.rss_timeline,
            top: self
                .settings
                .top
                .or(if self.settings.json { None } else { Some(10) }),
        }
    }

    pub fn snapshot(&mut self) -> Report {
        self.settle();
        self.scan_residency();
        let inputs = self.inputs(monotonic_ns());
        let mut report = report::snapshot(&inputs);
        report.python = self.python_status(self.pid);
        if self.settings.live.is_some() {
            report.kept = Some(self.kept());
        }
        if self.settings.per_process {
            let mut processes: Vec<_> = self
                .procs
                .iter()
                .filter(|(pid, _)| **pid == self.pid || self.table.process(**pid).is_some())
                .map(|(pid, p)| {
                    let info = ProcessInfo {
                        pid: *pid,
                        parent: p.parent,
                        comm: &p.comm,
                        cmdline: &p.cmdline,
                        exited: p.exited,
                        execs: p.execs,
                        mem: if p.exited {
                            None
                        } else {
                            ProcMem::read(*pid).ok().or(p.last_mem)
                        },
                        growth: p.growth(),
                    };
                    let mut r = report::process_report(&inputs, &info, self.table.process(*pid));
                    r.python = self.python_status(*pid);
                    r
                })
                .collect();
            let outstanding = |p: &report::ProcessReport| {
                p.totals.heap.outstanding_bytes + p.mmap.outstanding_bytes
            };
            if self.settings.rank_by_growth {
                processes.sort_by(|a, b| {
                    let (ga, gb) = (
                        a.growth_rate_mb_per_hour.unwrap_or(f64::MIN),
                        b.growth_rate_mb_per_hour.unwrap_or(f64::MIN),
                    );
                    gb.total_cmp(&ga).then(a.pid.cmp(&b.pid))
                });
            } else {
                processes
                    .sort_by(|a, b| outstanding(b).cmp(&outstanding(a)).then(a.pid.cmp(&b.pid)));
            }
            report.processes = Some(processes);
        }
        report
    }

    /// What the agent keeps now (see [`report::Kept`]).
    fn kept(&self) -> report::Kept {
        let n = |v: usize| v as u64;
        let (frames, site_keys) = self.sites.sizes();
        let (profile_processes, profile_groups) =
            self.process_sites.as_ref().map_or((0, 0), |p| p.sizes());
        let (queued_inputs, naming) = self.pending.sizes();
        let (foreign_files, foreign_files_over_cap) = crate::sys::maps::foreign_files();
        report::Kept {
            processes: n(self.procs.len()),
            exited_processes: n(self.procs.values().filter(|p| p.exited).count()),
            tables: n(self.table.pids().count()),
            blocks: self.table.heap_totals.outstanding_allocs
                + self.table.mmap_totals.outstanding_maps,
            stacks: n(self.stacks.len()),
            stack_keys: n(self.stack_users.len()),
            sites: n(self.sites.len()),
            frames: n(frames),
            site_keys: n(site_keys),
            modules: n(self.stacks.modules().len()),
            groups: n(self.tracker.groups.len()),
            peak_slots: n(self.tracker.peak_slots()),
            profile_processes: n(profile_processes),
            profile_groups: n(profile_groups),
            unwinders: n(self.unwinders.len()),
            unwind_objects: n(self.unwind_objects.len()),
            queued_inputs: n(queued_inputs),
            naming: n(naming),
            pythons: n(self.pythons.len()),
            foreign_files,
            foreign_files_over_cap,
            own_rss_bytes: ProcMem::read(std::process::id()).map_or(0, |m| m.rss_bytes),
        }
    }

    /// Explains the RSS of the main process and, with `per_process`, of every live traced
    /// process (not with byte sampling: the table then holds only the sampled blocks).
    fn scan_residency(&mut self) {
        self.residency.clear();
        if self.table.sample_mean() != 0 {
            return;
        }
        // Per process: those holding the most traced bytes, up to RSS_SCANS_MAX.
        let mut pids: Vec<u32> = if self.settings.per_process {
            let mut held: Vec<(u64, u32)> = self
                .procs
                .iter()
                .filter(|(_, p)| !p.exited)
                .filter_map(|(pid, _)| {
                    let t = self.table.process(*pid)?;
                    Some((
                        t.heap_totals.outstanding_bytes + t.mmap_totals.outstanding_bytes,
                        *pid,
                    ))
                })
                .collect();
            held.sort_unstable_by(|a, b| b.cmp(a));
            held.truncate(RSS_SCANS_MAX);
            held.into_iter().map(|(_, pid)| pid).collect()
        } else {
            Vec::new()
        };
        pids.retain(|&pid| pid != self.pid);
        if self.pid != 0 {
            pids.insert(0, self.pid);
        }
        let empty = crate::table::Table::default();
        let started = std::time::Instant::now();
        for (i, pid) in pids.into_iter().enumerate() {
            // The main process always; the others while the scans stay within their budget.
            if i > 0 && started.elapsed() > RSS_SCANS_BUDGET {
                break;
            }
            let Ok(mem) = ProcMem::read(pid) else {
                continue;
            };
            let table = self.table.process(pid).unwrap_or(&empty);
            if let Ok(r) = residency::scan(pid, table, &self.sites, mem.rss_bytes) {
                self.residency_cost.0 += 1;
                self.residency_cost.1 += r.scan_ns;
                self.residency_cost.2 += r.scanned_bytes;
                self.residency.insert(pid, r);
            }
        }
        if let Some(r) = self.residency.get(&self.pid) {
            if self.rss_timeline.len() >= RSS_TIMELINE_MAX {
                // Keep every other point: the chart keeps its span at half the resolution.
                let mut keep = false;
                self.rss_timeline.retain(|_| {
                    keep = !keep;
                    keep
                });
            }
            self.rss_timeline.push(report::RssPoint {
                t_s: (monotonic_ns() - self.start_ns) as f64 / 1e9,
                rss: r.explained,
            });
        }
    }

    /// `--probe-stats`: what the residency scans cost, one line (none without a scan).
    pub fn residency_cost(&self) -> Option<String> {
        let (scans, ns, bytes) = self.residency_cost;
        (scans > 0).then(|| {
            let gib = bytes as f64 / f64::from(1u32 << 30);
            format!(
                "memprof: {scans} residency scans read {bytes} bytes of allocator regions in \
                 {:.1} ms ({:.1} ms per scan, {:.1} ms per GiB)",
                ns as f64 / 1e6,
                ns as f64 / 1e6 / scans as f64,
                if gib > 0.0 {
                    ns as f64 / 1e6 / gib
                } else {
                    0.0
                }
            )
        })
    }

    /// The profile the output writers take, for `report`.
    pub fn profile(&mut self, report: &Report) -> Profile {
        self.settle();
        let inputs = self.inputs(monotonic_ns());
        report::profile(&inputs, report, &self.settings.command)
    }

    /// Refreshes the live endpoints' state.
    pub fn publish_live(&mut self, finished: bool) {
        let Some(live) = self.settings.live.clone() else {
            return;
        };
        let snapshot = self.snapshot();
        let profile = std::sync::Arc::new(self.profile(&snapshot));
        if let Ok(mut state) = live.lock() {
            state.profile = Some(profile);
            state.updates += 1;
            state.finished = finished;
        }
    }

    /// Writes a snapshot or report to stdout in the chosen format.
    pub fn emit(&self, report: &Report) -> io::Result<()> {
        if self.settings.json {
            json::write_line(report)
        } else {
            let mut out = io::stdout().lock();
            writeln!(out, "{}", text::render(report))?;
            out.flush()
        }
    }

    /// Elapsed time, event rate, outstanding bytes and losses on one stderr line.
    pub(super) fn status_line(&mut self) {
        if !self.settings.status_line {
            return;
        }
        let now = monotonic_ns();
        let (events_then, then) = self.events_at_status;
        let rate = (self.events - events_then) as f64 / ((now - then).max(1) as f64 / 1e9);
        self.events_at_status = (self.events, now);
        let losses = self.tracer.losses();
        eprint!(
            "\r\x1b[2Kmemprof: {:.0} s  {:.0} events/s  outstanding {}  lost {}",
            (now - self.start_ns) as f64 / 1e9,
            rate,
            human_bytes(self.table.heap_totals.outstanding_bytes),
            losses.ring_full + losses.inflight_full + self.decode_errors
        );
    }

    /// Raises `--alert-threshold` and `--growth-threshold` alerts, once per crossing.
    pub(super) fn check_alerts(&mut self) -> io::Result<()> {
        let elapsed_s = (monotonic_ns() - self.start_ns) as f64 / 1e9;
        let mut alerts = Vec::new();
        if let Some(limit) = self.settings.alert_bytes {
            let value = self.table.heap_totals.outstanding_bytes;
            let over = value > limit;
            if over && !self.over_bytes {
                alerts.push(Alert {
                    record: "alert",
                    kind: "threshold",
                    pid: self.pid,
                    elapsed_s,
                    value: value as f64,
                    limit: limit as f64,
                    message: format!(
                        "outstanding heap bytes {value} exceed --alert-threshold {limit}"
                    ),
                });
            }
            self.over_bytes = over;
        }
        if let Some(limit) = self.settings.alert_growth_mb_per_hour
            && let Ok(slope) = crate::analysis::growth::heap_rate(self.tracker.heap.points())
        {
            let value = slope * 3600.0 / 1e6;
            let over = value > limit;
            if over && !self.over_growth {
                alerts.push(Alert {
                    record: "alert",
                    kind: "growth",
                    pid: self.pid,
                    elapsed_s,
                    value,
                    limit,
                    message: format!(
                        "heap grows {value:.3} MB/h, over --growth-threshold {limit} MB/h"
                    ),
                });
            }
            self.over_growth = over;
        }
        for alert in alerts {
            if self.settings.json {
                json::write_line(&alert)?;
            } else {
                eprintln!("memprof: alert: {}", alert.message);
            }
        }
        Ok(())
    }

    /// The report's `unwind`: with `--unwind dwarf` the agent's counts, with `--unwind tables`
    /// what the kernel's walks reached.
    fn unwind_report(&self) -> Option<report::UnwindStats> {
        if self.settings.dwarf {
            return Some(report::UnwindStats {
                mode: "dwarf",
                ..self.unwind_stats.clone()
            });
        }
        let tables = self.tracer.tables.as_ref()?;
        let mut walks = self.table_walks.clone();
        walks.entry_share = if walks.bytes == 0 {
            0.0
        } else {
            (walks.entry_bytes as f64 / walks.bytes as f64 * 1e4).round() / 1e4
        };
        walks.files = tables.counts.modules;
        walks.rows = tables.counts.rows;
        walks.files_without_table = tables.counts.refused;
        walks.processes_without_maps = tables.counts.procs_refused;
        walks.cached_walks = self.tracer.walks_cached();
        Some(report::UnwindStats {
            mode: "tables",
            allocations: self.table_allocations,
            stacks: self.stack_ends.len() as u64 + self.stacks_forgotten.0,
            truncated_stacks: self
                .stack_ends
                .values()
                .filter(|e| !reached_entry(u64::from(**e)))
                .count() as u64
                + self.stacks_forgotten.1,
            tables: Some(walks),
        })
    }
}

/// Whether a table walk that ended so reached the program's or thread's entry.
pub(super) fn reached_entry(end: u64) -> bool {
    end == unwind_end::STOP || end == unwind_end::RA_ZERO || end == unwind_end::AGENT
}
