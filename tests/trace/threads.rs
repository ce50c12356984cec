//! threads.c: four workers leaking and churning at once, spawned and attached.

use serde_json::Value;

use super::{
    Build,
    facts::{THREAD_LEAK, THREADS_WINDOW},
    fixtures,
    report::{check_no_site, check_site, check_totals, site_sum, summary},
};
use crate::common::{Checks, frame_names, num, pid_trace, spawn_trace};

fn check_threads_sites(c: &mut Checks, report: &Value, build: Build) {
    check_site(c, report, &THREAD_LEAK);
    check_no_site(c, report, "thread_churn");
    c.eq(
        "totals.lost_events",
        num(&report["totals"], "lost_events"),
        0,
    );
    if build == Build::Fp {
        for g in site_sum(report, "thread_leak").groups {
            let names = frame_names(&g);
            c.check(
                names.contains(&"worker"),
                format!("thread_leak stack should have `worker` below it: {names:?}"),
            );
        }
    }
}

#[test]
fn threads_spawn_sites_exact() {
    for build in [Build::Fp, Build::NoFp] {
        let run = spawn_trace(&[], &[fixtures().threads(build).as_os_str().to_owned()]);
        run.assert_success();
        let report = run.report();
        let mut c = Checks::new(format!("spawn mode, threads {build:?}"));
        check_threads_sites(&mut c, &report, build);
        let t = &report["totals"];
        c.check(
            num(t, "allocs") >= THREADS_WINDOW.allocs,
            format!("totals.allocs {} < 101000", t["allocs"]),
        );
        c.check(
            num(t, "frees") >= THREADS_WINDOW.frees,
            format!("totals.frees {} < 100000", t["frees"]),
        );
        c.finish(|| format!("{}\n{}", summary(&report), run.context()));
    }
}

#[test]
fn threads_pid_exact() {
    threads_pid_exact_with(&[]);
}

/// With a single per-thread call slot in the kernel, calls of concurrent threads go to the
/// shared hash instead: the accounting is the same.
#[test]
fn threads_pid_exact_one_call_slot() {
    threads_pid_exact_with(&["--call-slots", "1"]);
}

/// `--probe-stats`: every allocator call of the window ran its programs (each program's run
/// count covers the calls), the time per run is measured, and the accounting is unchanged.
#[test]
fn threads_pid_probe_stats_count_every_call() {
    let report = threads_pid_exact_with(&["--probe-stats"]);
    let stats = report["probe_stats"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut c = Checks::new("pid mode, threads Fp --wait --probe-stats");
    // One program for every entry and return (a session), or one for entries and one for
    // returns: each allocation runs them twice, each free once.
    let allocators: Vec<&Value> = stats
        .iter()
        .filter(|s| {
            s["program"]
                .as_str()
                .is_some_and(|p| p.starts_with("alloc_"))
        })
        .collect();
    let calls = 2 * THREADS_WINDOW.allocs + THREADS_WINDOW.frees;
    let runs: u64 = allocators.iter().map(|s| num(s, "runs")).sum();
    c.check(
        runs >= calls,
        format!("allocator programs run at least {calls} times: {allocators:?}"),
    );
    c.check(
        !allocators.is_empty()
            && allocators
                .iter()
                .all(|s| s["ns_per_run"].as_f64().unwrap_or(0.0) > 0.0),
        format!("time per run measured: {allocators:?}"),
    );
    c.check(
        allocators
            .iter()
            .all(|s| num(s, "instructions") > 0 && num(s, "verified_instructions") > 0),
        format!("size as loaded and the verifier's work given: {allocators:?}"),
    );
    c.finish(|| summary(&report));
}

/// `--kernel-log`: off, the default, the verifier removes the logging code when it loads the
/// programs; with `trace` the allocator programs hold it (and log each call), and the
/// accounting is the same.
#[test]
fn threads_pid_kernel_log_off_leaves_no_logging_code() {
    let size = |report: &Value| -> u64 {
        report["probe_stats"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .filter(|s| {
                s["program"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("alloc_"))
            })
            .map(|s| num(s, "instructions"))
            .sum()
    };
    let off = size(&threads_pid_exact_with(&["--probe-stats"]));
    let on = size(&threads_pid_exact_with(&[
        "--probe-stats",
        "--kernel-log",
        "trace",
    ]));
    let mut c = Checks::new("pid mode, threads Fp --wait --kernel-log off and trace");
    c.check(
        off > 0 && on > off,
        format!("allocator programs: {off} instructions with logs off, {on} with trace"),
    );
    c.finish(String::new);
}

fn threads_pid_exact_with(opts: &[&str]) -> Value {
    let f = fixtures();
    let (run, target) = pid_trace("threads --wait", &f.threads_fp, &["--wait"], opts);
    run.assert_success();
    assert_eq!(target.code(), Some(0), "{}", target.context());
    let report = run.report();
    let mut c = Checks::new(format!("pid mode, threads Fp --wait {opts:?}"));
    check_threads_sites(&mut c, &report, Build::Fp);
    let kernel = &report["kernel"];
    c.eq("kernel.orphan_returns", num(kernel, "orphan_returns"), 0);
    c.eq("kernel.inflight_full", num(kernel, "inflight_full"), 0);
    check_totals(&mut c, &report, &THREADS_WINDOW);
    c.eq(
        "mmap.maps (stacks and arenas exist before the window)",
        num(&report["mmap"], "maps"),
        0,
    );
    c.eq(
        "mmap.outstanding_bytes",
        num(&report["mmap"], "outstanding_bytes"),
        0,
    );
    c.eq("exited", report["exited"].as_bool(), Some(true));
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
    report
}
