//! The text a person reads: the report (at the end of a trace or at each `--interval`) and the
//! comparison of two saved reports (`memprof diff`).

use std::{cmp::Reverse, fmt::Write as _};

use crate::{
    analysis::diff::{Diff, SiteDelta},
    report::{
        Frame, Peak, ProcessReport, Report,
        names::{change_bytes, human_bytes, signed_bytes},
    },
    sys::printable::escape_lines,
};

/// The per-process table of a multi-process report: the first 20 processes as ranked.
fn render_processes(out: &mut String, processes: &[ProcessReport]) {
    const SHOWN: usize = 20;
    let exited = processes.iter().filter(|p| p.exited).count();
    let _ = writeln!(
        out,
        "\n{} processes traced ({exited} exited):\n  {:>8}  {:<16} {:>12} {:>10} {:>12}  TOP SITE",
        processes.len(),
        "PID",
        "COMMAND",
        "OUTSTANDING",
        "ALLOCS",
        "GROWTH MB/h",
    );
    for p in processes.iter().take(SHOWN) {
        let top = p
            .leaks
            .first()
            .map(|l| {
                let name = l
                    .stack
                    .iter()
                    .find_map(|f| f.function.as_deref())
                    .unwrap_or("??");
                format!("{name} ({})", human_bytes(l.bytes))
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:>8}  {:<16} {:>12} {:>10} {:>12}  {}{}",
            p.pid,
            p.comm,
            human_bytes(p.totals.heap.outstanding_bytes + p.mmap.outstanding_bytes),
            p.totals.heap.allocs,
            p.growth_rate_mb_per_hour
                .map_or("-".to_string(), |g| format!("{g:+.3}")),
            top,
            if p.exited { "  [exited]" } else { "" }
        );
    }
    for p in processes.iter().take(SHOWN) {
        if let (None, Some(note)) = (p.growth_rate_mb_per_hour, &p.growth_rate_note) {
            let _ = writeln!(out, "  pid {}: no growth rate ({note})", p.pid);
        }
    }
    if processes.len() > SHOWN {
        let _ = writeln!(
            out,
            "  ... and {} more (--json lists all)",
            processes.len() - SHOWN
        );
    }
}

/// The "at the peak" section: the heap's highest and the sites holding it then.
fn render_peak(out: &mut String, peak: &Peak, whose: &str) {
    if peak.bytes == 0 {
        return;
    }
    let interval = match peak.bytes_interval {
        Some([lo, hi]) => format!(" (95% interval {} .. {})", human_bytes(lo), human_bytes(hi)),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "\nAt the peak{whose}: {} B ({}){interval} in {} allocations, {:.3} s into the trace:",
        peak.bytes,
        human_bytes(peak.bytes),
        peak.allocs,
        peak.at_s
    );
    for site in &peak.sites {
        let _ = writeln!(
            out,
            "  {:>12} B in {:>6} allocations via {:<14} {}",
            site.bytes,
            site.allocs,
            site.allocator,
            stack_line(&site.stack)
        );
    }
    if peak.other_sites > 0 {
        let _ = writeln!(
            out,
            "  {:>12} B in {:>6} allocations at {} more sites",
            peak.other_bytes, peak.other_allocs, peak.other_sites
        );
    }
}

/// A stack on one line: up to 4 function names, innermost first.
fn stack_line(stack: &[Frame]) -> String {
    if stack.is_empty() {
        return "(stack not captured)".to_string();
    }
    let names: Vec<&str> = stack
        .iter()
        .take(4)
        .map(|f| f.function.as_deref().unwrap_or("??"))
        .collect();
    let more = if stack.len() > 4 { " < ..." } else { "" };
    format!("{}{more}", names.join(" < "))
}

/// The text a person reads at the end of a trace (or at each `--interval`). Names from the
/// traced processes cannot act on a terminal: control characters and escape sequences are
/// written as escapes, and overlong lines are cut (see `sys::printable`).
pub fn render(r: &Report) -> String {
    printable(render_raw(r))
}

fn printable(text: String) -> String {
    match escape_lines(&text) {
        std::borrow::Cow::Borrowed(_) => text,
        std::borrow::Cow::Owned(clean) => clean,
    }
}

fn render_raw(r: &Report) -> String {
    let mut out = String::new();
    let t = &r.totals.heap;
    let losses = &r.totals;
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
    if let Some(s) = r.sampling {
        let _ = writeln!(
            out,
            "  sampled      one allocation per {} on average: counts and bytes are estimates",
            human_bytes(s.mean_bytes)
        );
        let range = |[lo, hi]: [u64; 2]| format!("{} .. {}", human_bytes(lo), human_bytes(hi));
        let _ = writeln!(
            out,
            "  95% ranges   allocated {}    outstanding {}",
            range(s.bytes_allocated_interval),
            range(s.outstanding_bytes_interval)
        );
    }
    let inherited = match t.inherited_frees {
        0 => String::new(),
        n => format!("    frees of blocks inherited at a fork {n}"),
    };
    let _ = writeln!(
        out,
        "  allocations  {} ({})    frees {} ({})    unmatched frees {}{inherited}",
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
    let unread = match losses.unread_at_end {
        0 => String::new(),
        n => format!(" ({n} left unread at the end)"),
    };
    let _ = writeln!(
        out,
        "  lost events  {}{unread}    lost stacks {}    unknown frames {}",
        losses.lost_events, losses.lost_stacks, r.unknown_frames
    );
    if let Some(u) = &r.unwind {
        unwind_line(&mut out, u);
    }
    if let Some(py) = &r.python {
        let version = py.version.as_deref().unwrap_or("(version unknown)");
        let _ = if py.is_ok() {
            writeln!(out, "  python       CPython {version}: Python frames read")
        } else {
            writeln!(
                out,
                "  python       CPython {version}: no Python frames ({}): {}",
                py.status, py.reason
            )
        };
    }
    if !r.probe_stats.is_empty() {
        let programs: Vec<String> = r
            .probe_stats
            .iter()
            .map(|p| format!("{} {:.0} ns x {}", p.program, p.ns_per_run, p.runs))
            .collect();
        let _ = writeln!(out, "  programs     {}", programs.join(", "));
        let code: Vec<String> = r
            .probe_stats
            .iter()
            .filter(|p| p.instructions > 0)
            .map(|p| {
                format!(
                    "{} {} instructions ({} verified)",
                    p.program, p.instructions, p.verified_instructions
                )
            })
            .collect();
        if !code.is_empty() {
            let _ = writeln!(out, "  loaded       {}", code.join(", "));
        }
    }
    if let Some(rss) = r.rss_bytes {
        let _ = write!(out, "  process      RSS {}", human_bytes(rss));
        if let Some(pss) = r.pss_bytes {
            let _ = write!(out, ", PSS {}", human_bytes(pss));
        }
        if let Some(untraced) = r.untraced_bytes {
            let _ = write!(out, ", {} not traced", human_bytes(untraced));
        }
        out.push('\n');
    }
    if r.growth_rate_mb_per_hour.is_none()
        && let Some(note) = &r.growth_rate_note
    {
        let _ = writeln!(out, "  growth       heap: no rate ({note})");
    }
    if let Some(e) = &r.rss_explained {
        rss_line(&mut out, e);
    }
    if let Some(rate) = r.growth_rate_mb_per_hour {
        let _ = write!(out, "  growth       heap {rate:+.3} MB/h");
        if let Some(hours) = r.projected_limit_hours {
            match hours {
                Some(h) => {
                    let _ = write!(out, ", reaches --limit in ~{h:.1} h");
                }
                None => out.push_str(", not growing toward --limit"),
            }
        }
        let _ = writeln!(
            out,
            "{}",
            if r.leak_detected {
                "    LEAK DETECTED"
            } else {
                ""
            }
        );
    }
    for p in &r.phases {
        let _ = writeln!(
            out,
            "  phase {:<10} ({}) {} allocs {} frees, net {}, peak net {}, peak outstanding {}",
            p.name,
            p.kind,
            p.allocs,
            p.frees,
            signed_bytes(p.net_bytes),
            signed_bytes(p.peak_net_bytes),
            human_bytes(p.peak_outstanding_bytes)
        );
        if !p.peak_sites.is_empty() {
            let sites: Vec<String> = p
                .peak_sites
                .iter()
                .take(3)
                .map(|s| {
                    let name = s
                        .stack
                        .first()
                        .and_then(|f| f.function.as_deref())
                        .unwrap_or("??");
                    format!("{name} {} B in {}", s.bytes, s.allocs)
                })
                .collect();
            let more = p.peak_sites.len().saturating_sub(3);
            let more = if more > 0 {
                format!(", {more} more")
            } else {
                String::new()
            };
            let _ = writeln!(out, "        at its peak: {}{more}", sites.join(", "));
        }
    }
    if !r.categories.is_empty() {
        let list: Vec<String> = r
            .categories
            .iter()
            .take(6)
            .map(|c| format!("{} {}", c.name, human_bytes(c.bytes)))
            .collect();
        let _ = writeln!(out, "  by category  {}", list.join(", "));
    }
    for h in &r.churn_hotspots {
        let b = &h.behaviour;
        let _ = writeln!(
            out,
            "  churn        {} [{}]: {} allocations via {} ({}/s), {} freed, p90 lifetime {}",
            h.site,
            match h.verdict_reason {
                Some(reason) => format!("{}: {reason}", h.verdict.as_str()),
                None => h.verdict.as_str().to_string(),
            },
            b.allocs_total,
            h.allocator,
            b.alloc_rate_per_s
                .map_or("?".to_string(), |r| format!("{r:.0}")),
            b.frees_total,
            b.lifetime_p90_s
                .map_or("?".to_string(), |s| format!("<= {:.3} ms", s * 1000.0))
        );
    }
    for rec in &r.recommendations {
        if rec.message.starts_with(&rec.site) {
            let _ = writeln!(out, "  advice       [{}] {}", rec.kind, rec.message);
        } else {
            let _ = writeln!(
                out,
                "  advice       [{}] {}: {}",
                rec.kind, rec.site, rec.message
            );
        }
    }
    render_peak(&mut out, &r.peak, "");
    if let Some(processes) = &r.processes {
        render_processes(&mut out, processes);
    }
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
        let verdict = match leak.verdict_reason {
            Some(reason) => format!("{}: {reason}", leak.verdict.as_str()),
            None => format!(
                "{} ({:+.0} B/s, r2 {:.2})",
                leak.verdict.as_str(),
                leak.growth_bytes_per_s,
                leak.r2
            ),
        };
        let _ = write!(
            out,
            "#{:<3} {} in {} allocations via {} ({}), oldest {:.2} s, {verdict}",
            i + 1,
            human_bytes(leak.bytes),
            leak.allocs,
            leak.allocator,
            leak.kind,
            leak.oldest_age_s,
        );
        if let Some(resident) = leak.resident_bytes {
            let _ = write!(out, ", {} resident", human_bytes(resident));
        }
        out.push('\n');
        if leak.stack.is_empty() {
            let _ = writeln!(out, "       (stack not captured)");
        }
        for f in &leak.stack {
            let name = f.function.as_deref().unwrap_or("??");
            let module = match (f.kind, f.module.as_deref()) {
                ("python", _) => "python",
                ("kernel", _) => "kernel",
                (_, Some(m)) => m.rsplit('/').next().unwrap_or(m),
                (_, None) => "?",
            };
            let _ = match (&f.file, f.line) {
                (Some(file), Some(line)) => {
                    let file = file.rsplit('/').next().unwrap_or(file);
                    writeln!(out, "       {name} ({file}:{line}) [{module}]")
                }
                _ => match f.offset {
                    Some(offset) => writeln!(out, "       {name} [{module}+{offset:#x}]"),
                    None => writeln!(out, "       {name} [{module}]"),
                },
            };
        }
    }
    out
}

/// The text a person reads: the total change, then the `top` sites that changed most (by
/// absolute bytes), listed growth first. Escaped as [`render`] is.
pub fn render_diff(d: &Diff, top: usize) -> String {
    printable(render_diff_raw(d, top))
}

fn render_diff_raw(d: &Diff, top: usize) -> String {
    let mut out = String::new();
    let pct = match d.growth_pct {
        Some(p) => format!("{p:+.1}%"),
        None if d.outstanding_bytes_after > 0 => "from nothing".to_string(),
        None => "unchanged".to_string(),
    };
    let _ = writeln!(
        out,
        "memprof diff: outstanding heap {} -> {} ({}, {pct})    mmap {}",
        human_bytes(d.outstanding_bytes_before),
        human_bytes(d.outstanding_bytes_after),
        change_bytes(d.delta_bytes),
        change_bytes(d.mmap_delta_bytes),
    );
    let count = |status: &str| d.sites.iter().filter(|s| s.status == status).count();
    let _ = writeln!(
        out,
        "  call sites   {} new, {} gone, {} grew, {} shrank, {} same",
        count("new"),
        count("gone"),
        count("grew"),
        count("shrank"),
        count("same"),
    );

    let mut changed: Vec<(usize, &SiteDelta)> = d
        .sites
        .iter()
        .enumerate()
        .filter(|(_, s)| s.delta_bytes != 0 || s.delta_allocs != 0)
        .collect();
    if changed.is_empty() {
        out.push_str("\nNo call site changed.\n");
        return out;
    }
    let total_changed = changed.len();
    // The largest changes either way, shown in the diff's own order (growth first).
    changed.sort_by_key(|&(i, s)| (Reverse(s.delta_bytes.unsigned_abs()), i));
    changed.truncate(top);
    changed.sort_by_key(|&(i, _)| i);

    let _ = writeln!(
        out,
        "\nTop {} of {} changed call sites by bytes:",
        changed.len(),
        total_changed
    );
    let _ = writeln!(
        out,
        "{:>12} {:>11} {:>11} {:>8}  {:<7} {:<16} stack (innermost first)",
        "change", "before", "after", "allocs", "status", "allocator"
    );
    for (_, s) in changed {
        let _ = writeln!(
            out,
            "{:>12} {:>11} {:>11} {:>+8}  {:<7} {:<16} {}",
            change_bytes(s.delta_bytes),
            human_bytes(s.bytes_before),
            human_bytes(s.bytes_after),
            s.delta_allocs,
            s.status,
            format!("{} ({})", s.allocator, s.kind),
            stack_text(&s.stack),
        );
    }
    out
}

/// Frames shown per site in the text; the JSON has them all.
const TEXT_FRAMES: usize = 4;

fn stack_text(stack: &[String]) -> String {
    if stack.is_empty() {
        return "(stack not captured)".to_string();
    }
    let mut text = stack[..stack.len().min(TEXT_FRAMES)].join(" <- ");
    if stack.len() > TEXT_FRAMES {
        text.push_str(" <- ...");
    }
    text
}

/// One line on how far stack walks got: with tables, the share of bytes whose stack reached
/// the thread's entry and the main reasons the others stopped.
/// RSS explained on one line: the three parts that add up to it, then what is allocated but
/// not resident.
fn rss_line(out: &mut String, e: &crate::report::RssExplained) {
    let _ = write!(
        out,
        "  RSS explained  live {}, retained by the allocator {}, other {} (of {}); allocated, \
         never touched {}",
        human_bytes(e.live_resident_bytes),
        human_bytes(e.allocator_retained_bytes),
        human_bytes(e.other_resident_bytes),
        human_bytes(e.rss_bytes),
        human_bytes(e.untouched_live_bytes),
    );
    if e.unscanned_bytes > 0 {
        let _ = write!(
            out,
            "; {} of allocator mappings not scanned",
            human_bytes(e.unscanned_bytes)
        );
    }
    out.push('\n');
}

fn unwind_line(out: &mut String, u: &crate::report::UnwindStats) {
    let _ = write!(
        out,
        "  stacks       --unwind {}: {} stacks, {} stopped early",
        u.mode, u.stacks, u.truncated_stacks
    );
    if let Some(t) = &u.tables {
        let _ = write!(
            out,
            "; {:.1}% of {} reached the entry",
            t.entry_share * 100.0,
            human_bytes(t.bytes)
        );
        let mut ends: Vec<(&str, u64)> = t
            .ends
            .iter()
            .filter(|(k, _)| **k != "entry")
            .map(|(k, v)| (*k, *v))
            .collect();
        ends.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let parts: Vec<String> = ends
            .iter()
            .take(3)
            .map(|(k, v)| format!("{} {}", k, human_bytes(*v)))
            .collect();
        if !parts.is_empty() {
            let _ = write!(out, " (others: {})", parts.join(", "));
        }
        if t.files_without_table > 0 {
            let _ = write!(out, "; {} files without a table", t.files_without_table);
        }
        if t.cached_walks > 0 {
            let _ = write!(
                out,
                "; {} of {} walks reused",
                t.cached_walks, u.allocations
            );
        }
    }
    out.push('\n');
}

#[cfg(test)]
mod tests;
