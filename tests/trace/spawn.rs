//! Spawn mode: alloc_sites traced from its first instruction, and the options that shape a trace.

use std::path::Path;

use serde_json::Value;

use super::{
    Build, alloc_cmd,
    facts::{
        ALLOC_SITES, ALLOC_SITES_MMAP_OUTSTANDING, ALLOC_SITES_SPAWN, LOADER_ANON_MAPS,
        MALLOC_FAMILY,
    },
    fixtures,
    report::{check_alloc_sites, check_site, check_totals, site_sum, summary},
    spawn_alloc_run,
};
use crate::common::{
    Checks, DEADLINE, SAFETY_NET, frame_fn, frame_names, leaks, num, run_trace, spawn_trace, stack,
};

fn spawn_alloc_sites_exact(build: Build) {
    let run = spawn_alloc_run(build);
    run.assert_success();
    let report = run.report();
    let mut c = Checks::new(format!("spawn mode, alloc_sites {build:?}"));
    check_alloc_sites(&mut c, &report);
    check_totals(&mut c, &report, &ALLOC_SITES_SPAWN);
    let mmap_out = num(&report["mmap"], "outstanding_bytes");
    c.check(
        (ALLOC_SITES_MMAP_OUTSTANDING..=ALLOC_SITES_MMAP_OUTSTANDING + LOADER_ANON_MAPS).contains(&mmap_out),
        format!(
            "mmap.outstanding_bytes {mmap_out}: expected {ALLOC_SITES_MMAP_OUTSTANDING} (leak_mmap + \
             leak_mremap), plus at most the loader's {LOADER_ANON_MAPS}; the 8 MiB of leak_big \
             must not be in it"
        ),
    );
    c.eq("exited", report["exited"].as_bool(), Some(true));
    c.eq("exit_code", report["exit_code"].as_i64(), Some(0));
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
}

#[test]
fn spawn_fp_alloc_sites_exact() {
    spawn_alloc_sites_exact(Build::Fp);
}

#[test]
fn spawn_nofp_alloc_sites_exact() {
    spawn_alloc_sites_exact(Build::NoFp);
}

/// With frame pointers the whole call chain is known: site, then main, and the site's module
/// is the fixture binary.
#[test]
fn spawn_fp_stacks_have_main_below_site() {
    let run = spawn_alloc_run(Build::Fp);
    run.assert_success();
    let report = run.report();
    let fixture = fixtures().alloc_fp.canonicalize().unwrap();
    let mut c = Checks::new("spawn mode, alloc_sites Fp, stacks");
    for fact in ALLOC_SITES {
        let s = site_sum(&report, fact.function);
        c.check(
            !s.groups.is_empty(),
            format!("no leak group with stack[0] = {}", fact.function),
        );
        for g in &s.groups {
            let st = stack(g);
            let names = frame_names(g);
            c.check(
                names.iter().skip(1).any(|n| *n == "main"),
                format!(
                    "site {}: `main` should be below the site on the stack, got {names:?}",
                    fact.function
                ),
            );
            let module = st[0]["module"].as_str().unwrap_or("");
            c.check(
                Path::new(module).canonicalize().is_ok_and(|m| m == fixture),
                format!(
                    "site {}: stack[0].module {module:?} should be {}",
                    fact.function,
                    fixture.display()
                ),
            );
            if let Some(file) = st[0]["file"].as_str() {
                c.check(
                    file.ends_with("alloc_sites.c")
                        && st[0]["line"].as_u64().is_some_and(|l| l > 0),
                    format!(
                        "site {}: stack[0] file/line {file:?}:{} should be alloc_sites.c:N",
                        fact.function, st[0]["line"]
                    ),
                );
            }
        }
    }
    c.finish(|| summary(&report));
}

/// In --json spawn mode stdout carries only NDJSON: the fixture's stdout marker goes to
/// memprof's stderr. The start record names the probes.
#[test]
fn spawn_json_stdout_carries_only_ndjson() {
    let run = spawn_alloc_run(Build::Fp);
    run.assert_success();
    run.report(); // every stdout line is a JSON record, start..report
    let marker = "alloc_sites: stdout marker";
    assert!(
        !run.stdout.contains(marker),
        "the command's stdout leaked into memprof's stdout\n{}",
        run.context()
    );
    assert!(
        run.stderr.contains(marker),
        "the command's stdout should appear on memprof's stderr\n{}",
        run.context()
    );
    let start = run.start();
    let mut c = Checks::new("start record");
    c.check(
        start["pid"].as_u64().is_some_and(|p| p > 0),
        format!("start.pid {}", start["pid"]),
    );
    let names = |key: &str| -> Vec<String> {
        start[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let probes = names("probes");
    let missing = names("missing");
    c.check(
        start["probes"].is_array() && start["missing"].is_array(),
        "start.probes/missing are not arrays",
    );
    for f in MALLOC_FAMILY
        .iter()
        .filter(|f| !matches!(**f, "aligned_alloc" | "memalign"))
    {
        c.check(
            probes.iter().any(|p| p == f),
            format!("start.probes {probes:?} lacks {f}"),
        );
        c.check(
            !missing.iter().any(|p| p == f),
            format!("start.missing {missing:?} lists {f}, which glibc 2.36 has"),
        );
    }
    // glibc 2.36: aligned_alloc and memalign are one address; at least one must be probed.
    c.check(
        probes
            .iter()
            .any(|p| p == "aligned_alloc" || p == "memalign"),
        format!("start.probes {probes:?} has neither aligned_alloc nor memalign"),
    );
    c.finish(|| format!("start record: {start}"));
}

/// The report keeps the whole spawn-mode workload's outstanding bytes (`why`: what must not
/// change them).
fn assert_spawn_outstanding(report: &Value, why: &str) {
    assert_eq!(
        num(&report["totals"], "outstanding_bytes"),
        ALLOC_SITES_SPAWN.outstanding_bytes,
        "{why}\n{}",
        summary(report)
    );
}

/// `alloc_sites ARGS` in spawn mode, ending as `code` says (no panic): the report of an exited
/// command with the whole workload's outstanding bytes.
fn spawn_alloc_exit(args: &[&str], code: i32, why: &str) -> Value {
    let run = spawn_trace(&[], &alloc_cmd(Build::Fp, args));
    run.assert_code(code, why);
    let report = run.report();
    assert_eq!(report["exited"], true, "{}", summary(&report));
    assert_spawn_outstanding(&report, "the command's end");
    report
}

#[test]
fn spawn_exit_code_passes_through() {
    let report = spawn_alloc_exit(&["--exit", "7"], 7, "the command's status 7");
    assert_eq!(
        report["exit_code"],
        7,
        "report.exit_code\n{}",
        summary(&report)
    );
}

#[test]
fn spawn_killed_by_signal_exits_128_plus_signal() {
    spawn_alloc_exit(
        &["--raise", "15"],
        128 + 15,
        "command killed by SIGTERM: 143",
    );
}

/// --interval emits snapshots between start and report while the command runs; the
/// snapshots taken during the fixture's final sleep show the final outstanding bytes.
#[test]
fn spawn_interval_emits_snapshots() {
    let run = spawn_trace(
        &["--interval", "100ms"],
        &alloc_cmd(Build::Fp, &["--sleep-ms", "1200"]),
    );
    run.assert_success();
    let report = run.report();
    let records = run.ndjson();
    let snaps: Vec<&Value> = records.iter().filter(|r| r["type"] == "snapshot").collect();
    let mut c = Checks::new("--interval 100ms snapshots");
    c.check(!snaps.is_empty(), "no snapshot record before the report");
    let mut prev = -1.0;
    for (i, s) in snaps.iter().enumerate() {
        let t = s["elapsed_s"].as_f64();
        c.check(
            t.is_some_and(|t| t >= prev),
            format!("snapshot {i}: elapsed_s {} not increasing", s["elapsed_s"]),
        );
        prev = t.unwrap_or(prev);
        c.check(
            s["totals"]["outstanding_bytes"].is_u64(),
            format!("snapshot {i}: no totals.outstanding_bytes"),
        );
        c.check(
            s["leaks"].is_array(),
            format!("snapshot {i}: leaks is not an array"),
        );
    }
    c.check(
        snaps
            .iter()
            .any(|s| s["totals"]["outstanding_bytes"] == ALLOC_SITES_SPAWN.outstanding_bytes),
        format!(
            "no snapshot shows the final {} outstanding bytes although the fixture sleeps 1.2 s \
             after its workload; snapshot outstanding_bytes: {:?}",
            ALLOC_SITES_SPAWN.outstanding_bytes,
            snaps
                .iter()
                .map(|s| s["totals"]["outstanding_bytes"].clone())
                .collect::<Vec<_>>()
        ),
    );
    let mut r = Checks::new("report after snapshots");
    check_totals(&mut r, &report, &ALLOC_SITES_SPAWN);
    c.failures.extend(r.failures);
    c.finish(|| format!("{} snapshots\n{}", snaps.len(), summary(&report)));
}

/// --min-age hides younger leaks from `leaks` but not from the totals.
#[test]
fn spawn_min_age_filters_leaks() {
    let young = spawn_trace(&["--min-age", "1h"], &alloc_cmd(Build::Fp, &[]));
    young.assert_success();
    let report = young.report();
    assert!(
        leaks(&report).is_empty(),
        "--min-age 1h: no leak is that old\n{}",
        summary(&report)
    );
    assert_spawn_outstanding(&report, "--min-age must not change totals");

    // Every leak is at least 1 s old at exit: all pass a 300ms filter.
    let old = spawn_trace(
        &["--min-age", "300ms"],
        &alloc_cmd(Build::Fp, &["--sleep-ms", "1000"]),
    );
    old.assert_success();
    let report = old.report();
    let mut c = Checks::new("--min-age 300ms after a 1 s sleep");
    for fact in ALLOC_SITES {
        check_site(&mut c, &report, fact);
    }
    for (i, g) in leaks(&report).iter().enumerate() {
        let age = g["oldest_age_s"].as_f64().unwrap_or(-1.0);
        c.check(
            age >= 0.3,
            format!("leak {i}: oldest_age_s {age} < min-age 0.3"),
        );
    }
    c.finish(|| summary(&report));
}

#[test]
fn spawn_top_limits_leak_groups() {
    let run = spawn_trace(&["--top", "3"], &alloc_cmd(Build::Fp, &[]));
    run.assert_success();
    let report = run.report();
    // The same run without --top: its 3 largest groups, by bytes and innermost function. (One
    // site can be several groups: gcc unrolls leak_big's 2-iteration loop into 2 call sites.)
    let full = spawn_alloc_run(Build::Fp).report();
    let key = |g: &Value| {
        (
            num(g, "bytes"),
            stack(g).first().and_then(frame_fn).map(String::from),
        )
    };
    let got: Vec<_> = leaks(&report).iter().map(key).collect();
    let want: Vec<_> = leaks(&full).iter().take(3).map(key).collect();
    assert_eq!(
        got,
        want,
        "--top 3 should keep the 3 largest leak groups of the full report\n--top 3:\n{}\nfull:\n{}",
        summary(&report),
        summary(&full)
    );
    assert_spawn_outstanding(&report, "--top must not change totals");
}

/// Without --json, the text report names the biggest site.
#[test]
fn spawn_text_report_names_top_site() {
    let alloc_fp = fixtures().alloc_fp.to_str().unwrap();
    let run = run_trace(&["--duration", SAFETY_NET, "--", alloc_fp], DEADLINE);
    run.assert_success();
    assert!(
        run.stdout.contains("leak_big") || run.stderr.contains("leak_big"),
        "the text report should name leak_big, the largest leak\n{}",
        run.context()
    );
}
