//! Process memory (RSS, PSS, untraced bytes) in snapshots and the report, and the `--limit`
//! projection.

use serde_json::Value;

use super::{
    growth::{LIMIT_1T, growth_run},
    summary,
};
use crate::common::{Checks, num};

/// Every `--interval 1s` snapshot and the report carry the process's memory: rss > 0, pss > 0,
/// vm_size >= rss, untraced = rss - (heap + mmap outstanding), saturating at 0.
///
/// growth.c exits at ~8.25 s, away from every snapshot (1 s) and sample (0.5 s) tick: when the
/// fixture ran exactly 8 s, the 8 s snapshot sometimes raced its exit and carried rss_bytes with
/// pss_bytes null (/proc/PID/status read, smaps_rollup already gone).
#[test]
fn process_memory_in_snapshots_and_report() {
    let (run, _) = growth_run();
    let report = run.report();
    let snaps = run.records("snapshot");
    let mut c = Checks::new("process memory");
    c.check(
        snaps.len() >= 5,
        format!(
            "an 8.25 s run with --interval 1s should have >= 5 snapshots, got {}",
            snaps.len()
        ),
    );
    let mut all: Vec<(String, &Value)> = snaps
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("snapshot {i} (elapsed_s {})", s["elapsed_s"]), s))
        .collect();
    all.push(("report".to_string(), &report));
    for (what, r) in all {
        let rss = r["rss_bytes"].as_u64();
        let pss = r["pss_bytes"].as_u64();
        let vm = r["vm_size_bytes"].as_u64();
        let untraced = r["untraced_bytes"].as_u64();
        c.check(
            rss.is_some_and(|v| v > 0),
            format!("{what}: rss_bytes {:?}", r["rss_bytes"]),
        );
        c.check(
            pss.is_some_and(|v| v > 0),
            format!("{what}: pss_bytes {:?}", r["pss_bytes"]),
        );
        c.check(
            matches!((vm, rss), (Some(vm), Some(rss)) if vm >= rss),
            format!("{what}: vm_size_bytes {vm:?} should be >= rss_bytes {rss:?}"),
        );
        if let Some(rss) = rss {
            let traced =
                num(&r["totals"], "outstanding_bytes") + num(&r["mmap"], "outstanding_bytes");
            c.eq(
                &format!("{what}: untraced_bytes = rss - traced ({rss} - {traced})"),
                untraced,
                Some(rss.saturating_sub(traced)),
            );
        }
    }
    c.finish(|| summary(&report));
}

/// `--limit 1T` (2^40 B): RSS grows with the memset leak (100 kB/s) and, for the first 3 s, the
/// cache (another 100 kB/s), so the report projects (limit - rss) / RSS slope / 3600 hours with an
/// RSS slope between half the leak rate and 4x it: about 2200 h here. The heap's growth rate
/// (`growth_rate_mb_per_hour`) is at least the leak's (the cache adds to it) and at most twice it.
#[test]
fn limit_projection_and_growth_rate() {
    let (run, facts) = growth_run();
    let report = run.report();
    let mut c = Checks::new("--limit projection");
    let hours = report["projected_limit_hours"].as_f64();
    let rss = report["rss_bytes"].as_u64().unwrap_or(0) as f64;
    let at_rate = |rate: f64| (LIMIT_1T - rss) / rate / 3600.0;
    let (min_hours, max_hours) = (
        at_rate(4.0 * facts.true_rate),
        at_rate(0.5 * facts.true_rate),
    );
    c.check(
        hours.is_some_and(|h| h.is_finite() && h >= min_hours && h <= max_hours),
        format!(
            "projected_limit_hours {:?} should be in [{min_hours}, {max_hours}]: RSS ({rss} B) \
             growing at 0.5x to 4x the leak rate {} B/s toward 2^40 B",
            report["projected_limit_hours"], facts.true_rate
        ),
    );
    let rate = report["growth_rate_mb_per_hour"].as_f64().unwrap_or(0.0);
    let leak_mb_h = facts.true_rate * 3600.0 / 1e6;
    c.check(
        rate >= 0.9 * leak_mb_h && rate <= 2.2 * leak_mb_h,
        format!(
            "growth_rate_mb_per_hour {rate} should be between 0.9x and 2.2x the leak's \
             {leak_mb_h} MB/h (heap = leak + a cache filling at the same pace for 3 s)"
        ),
    );
    for s in run.records("snapshot") {
        c.check(
            s.get("projected_limit_hours").is_some(),
            format!(
                "snapshot at {} lacks projected_limit_hours with --limit",
                s["elapsed_s"]
            ),
        );
    }
    c.finish(|| summary(&report));
}
