//! Plateau: a cache that fills and stays is stable, and passes `--fail-on-leak`; the report
//! saved with `--output` in text mode.

use std::{fs, sync::OnceLock};

use serde_json::Value;

use super::{
    array, fixtures,
    growth::{CACHE_SIZE, CACHE_SLOTS, GrowthFacts, growth_facts},
    one_group, scratch, summary,
};
use crate::common::{
    Checks, DEADLINE, Finished, SAFETY_NET, leaks, num, run_trace, site_groups, truncate,
};

/// growth --plateau (no leak; exit 0) in text mode, the report saved with --output, with an
/// alert threshold (text-mode alerts go to stderr) and --fail-on-leak.
pub(crate) struct PlateauRun {
    pub(crate) run: Finished,
    pub(crate) facts: GrowthFacts,
    pub(crate) report: Value,
    pub(crate) saved: String,
}

pub(crate) fn plateau_run() -> &'static PlateauRun {
    static RUN: OnceLock<PlateauRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let out = scratch().join("plateau.json");
        let _ = fs::remove_file(&out);
        let out_s = out.to_str().unwrap();
        // Text mode: no --json.
        let run = run_trace(
            &[
                "--duration",
                SAFETY_NET,
                "--output",
                out_s,
                "--alert-threshold",
                "100K",
                "--fail-on-leak",
                "--",
                fixtures().growth.to_str().unwrap(),
                "--plateau",
            ],
            DEADLINE,
        );
        let facts = growth_facts(&run);
        let saved = fs::read_to_string(&out)
            .unwrap_or_else(|e| panic!("--output {out_s} was not written: {e}\n{}", run.context()));
        let report: Value = serde_json::from_str(saved.trim_end()).unwrap_or_else(|e| {
            panic!(
                "--output {out_s} is not one JSON object ({e}): {}",
                truncate(&saved, 4000)
            )
        });
        PlateauRun {
            run,
            facts,
            report,
            saved,
        }
    })
}

/// growth --plateau: the cache fills for 3 s then holds 300 x 1024 B for 5 s: `stable`, no
/// leak, and `--fail-on-leak` leaves the command's status 0. The report comes from --output.
#[test]
fn plateau_cache_is_stable_and_passes_fail_on_leak() {
    let p = plateau_run();
    p.run.assert_code(
        0,
        "no leak under --fail-on-leak: the command's own status 0",
    );
    let report = &p.report;
    let mut c = Checks::new("plateau fixture");
    c.eq("report type", report["type"].as_str(), Some("report"));
    c.eq("report.exit_code", report["exit_code"].as_i64(), Some(0));
    c.eq(
        "leak_detected",
        report["leak_detected"].as_bool(),
        Some(false),
    );
    c.eq("steady_leak calls (--plateau)", p.facts.leaks, 0);
    let cache = one_group(report, "cache_put");
    c.eq(
        "cache_put verdict",
        cache["verdict"].as_str(),
        Some("stable"),
    );
    c.eq(
        "cache_put bytes",
        num(cache, "bytes"),
        CACHE_SLOTS * CACHE_SIZE,
    );
    c.eq(
        "cache_put growing_for_s (not growing)",
        cache["growing_for_s"].as_f64(),
        Some(0.0),
    );
    c.check(
        site_groups(report, "steady_leak").is_empty(),
        "steady_leak is not called with --plateau",
    );
    let bad: Vec<&Value> = leaks(report)
        .iter()
        .filter(|g| g["verdict"] == "leak" || g["verdict"] == "growing")
        .collect();
    c.check(
        bad.is_empty(),
        format!("no group may be leak or growing; got {} such", bad.len()),
    );
    c.check(
        !array(report, "recommendations")
            .iter()
            .any(|r| r["kind"] == "leak" || r["kind"] == "growing"),
        "no leak/growing recommendation without growth",
    );
    c.check(
        !p.run.stderr.contains("leak detected"),
        "stderr must not say leak detected",
    );
    c.finish(|| format!("{}\n{}", summary(report), p.run.context()));
}

/// `--output FILE` writes the final report as exactly one JSON line, also in text mode; the text
/// report on stdout shows the cache's verdict.
#[test]
fn plateau_output_file_is_one_json_line_and_text_shows_verdict() {
    let p = plateau_run();
    let mut c = Checks::new("--output in text mode");
    c.eq("lines in the --output file", p.saved.lines().count(), 1);
    c.check(
        p.saved.ends_with('\n'),
        "the --output file should end with a newline",
    );
    c.check(
        p.run.stdout.starts_with("memprof report: pid "),
        "text mode: stdout should be the text report",
    );
    c.check(
        !p.run
            .stdout
            .lines()
            .any(|l| l.trim_start().starts_with('{')),
        "text mode: no JSON on stdout",
    );
    c.check(
        !p.run.stdout.contains("LEAK DETECTED"),
        "text report must not say LEAK DETECTED",
    );
    // "#1  300.0 KiB in 300 allocations via malloc (heap), oldest ..., stable (...)" then frames.
    let lines: Vec<&str> = p.run.stdout.lines().collect();
    let cache_line = lines
        .iter()
        .position(|l| l.trim_start().starts_with("cache_put"))
        .and_then(|i| lines[..i].iter().rev().find(|l| l.starts_with('#')));
    c.check(
        cache_line.is_some_and(|l| l.contains("300 allocations") && l.contains(", stable (")),
        format!(
            "the text entry of cache_put should say 300 allocations and stable: {cache_line:?}"
        ),
    );
    c.finish(|| p.run.context());
}
