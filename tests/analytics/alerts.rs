//! Alerts: `--alert-threshold` and `--growth-threshold`, as NDJSON records and as stderr lines.

use serde_json::Value;

use super::{
    float,
    growth::{ALERT_THRESHOLD, growth_run},
    plateau::plateau_run,
    summary,
};
use crate::common::Checks;

/// `--alert-threshold 100K`: the heap crosses 102400 B within the first second and never falls
/// back (it only grows), so exactly one `threshold` alert; `--growth-threshold 0.001` (MB/h):
/// the heap grows ~0.5 GB/h, so exactly one `growth` alert. Both come between start and report.
#[test]
fn alerts_threshold_and_growth() {
    let (run, _) = growth_run();
    let report = run.report();
    let alerts = run.records("alert");
    let ctx = || {
        format!(
            "alerts: {}\n{}",
            serde_json::to_string_pretty(&alerts).unwrap(),
            summary(&report)
        )
    };
    let mut c = Checks::new("alerts");
    let of = |kind: &str| -> Vec<&Value> { alerts.iter().filter(|a| a["kind"] == kind).collect() };
    let threshold = of("threshold");
    let growth = of("growth");
    c.eq("threshold alerts (once per crossing)", threshold.len(), 1);
    c.eq("growth alerts (once per crossing)", growth.len(), 1);
    c.eq(
        "alerts of other kinds",
        alerts.len() - threshold.len() - growth.len(),
        0,
    );
    let duration = float(&report, "duration_s");
    for a in &alerts {
        c.eq("alert pid", a["pid"].as_u64(), report["pid"].as_u64());
        let t = a["elapsed_s"].as_f64().unwrap_or(-1.0);
        c.check(
            t > 0.0 && t <= duration,
            format!("alert elapsed_s {t} within the trace (0, {duration}]"),
        );
        c.check(
            a["message"].as_str().is_some_and(|m| !m.is_empty()),
            "alert without a message",
        );
    }
    if let Some(a) = threshold.first() {
        c.eq(
            "threshold limit",
            a["limit"].as_f64(),
            Some(ALERT_THRESHOLD as f64),
        );
        c.check(
            a["value"]
                .as_f64()
                .is_some_and(|v| v > ALERT_THRESHOLD as f64),
            format!("threshold value {} should exceed 102400", a["value"]),
        );
        c.check(
            a["message"].as_str().is_some_and(|m| m.contains("102400")),
            "threshold message should quote the limit",
        );
    }
    if let Some(a) = growth.first() {
        c.eq("growth limit", a["limit"].as_f64(), Some(0.001));
        c.check(
            a["value"].as_f64().is_some_and(|v| v > 0.001),
            format!("growth value {} MB/h should exceed 0.001", a["value"]),
        );
    }
    c.check(
        !run.stderr.contains("memprof: alert:"),
        "in --json mode alerts are NDJSON, not stderr lines",
    );
    c.finish(ctx);
}

/// Text mode: the plateau run's `--alert-threshold 100K` alert is one `memprof: alert: ...`
/// line on stderr (the cache holds 300 KiB from ~1 s on and never drops below 100 KiB).
#[test]
fn alerts_text_mode_go_to_stderr() {
    let p = plateau_run();
    let alerts: Vec<&str> = p
        .run
        .stderr
        .lines()
        .filter(|l| l.starts_with("memprof: alert: "))
        .collect();
    assert!(
        alerts.len() == 1 && alerts[0].contains("102400"),
        "expected exactly one `memprof: alert: ... 102400` line on stderr, got {alerts:?}\n{}",
        p.run.context()
    );
    assert!(
        !p.run.stdout.contains("alert"),
        "alerts must not go to stdout in text mode\n{}",
        p.run.context()
    );
}
