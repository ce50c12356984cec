//! Pid mode: alloc_sites attached while it waits, and the ways a pid trace ends.

use std::{
    os::unix::process::ExitStatusExt,
    thread,
    time::{Duration, Instant},
};

use super::{
    Build,
    facts::{ALLOC_SITES, ALLOC_SITES_MMAP_OUTSTANDING, ALLOC_SITES_WINDOW},
    fixtures, pid_alloc_run,
    report::{check_alloc_sites, check_site, check_totals, summary},
};
use crate::common::{Checks, DEADLINE, attach, leaks, num, send_signal, start_target};

fn pid_alloc_sites_exact(build: Build) {
    let (run, target) = pid_alloc_run(build);
    run.assert_success();
    assert_eq!(
        target.code(),
        Some(3),
        "fixture exit status\n{}",
        target.context()
    );
    let report = run.report();
    let mut c = Checks::new(format!("pid mode, alloc_sites {build:?} --wait"));
    check_alloc_sites(&mut c, &report);
    check_totals(&mut c, &report, &ALLOC_SITES_WINDOW);
    let m = &report["mmap"];
    c.eq(
        "mmap.outstanding_bytes",
        num(m, "outstanding_bytes"),
        ALLOC_SITES_MMAP_OUTSTANDING,
    );
    c.eq("mmap.outstanding_maps", num(m, "outstanding_maps"), 2);
    // mmap 16+8+4 pages, munmap 4+8 pages, mremap 4 -> 6 pages (counted as a resize, or as an
    // unmap of 4 pages plus a map of 6).
    let (mapped, unmapped) = (num(m, "bytes_mapped"), num(m, "bytes_unmapped"));
    c.check(
        (mapped, unmapped) == (122_880, 49_152) || (mapped, unmapped) == (139_264, 65_536),
        format!("mmap bytes_mapped/bytes_unmapped {mapped}/{unmapped}: expected 122880/49152 or 139264/65536"),
    );
    c.check(
        (3..=4).contains(&num(m, "maps")),
        format!("mmap.maps {} not 3 or 4", m["maps"]),
    );
    c.check(
        (2..=3).contains(&num(m, "unmaps")),
        format!("mmap.unmaps {} not 2 or 3", m["unmaps"]),
    );
    c.eq("exited", report["exited"].as_bool(), Some(true));
    c.check(
        report["exit_code"].is_null() || report["exit_code"] == 3,
        format!("exit_code {} should be 3 (or null)", report["exit_code"]),
    );
    let start = run.start();
    c.eq(
        "start.pid",
        start["pid"].as_u64(),
        Some(u64::from(target.pid)),
    );
    let tracing = format!("memprof: tracing pid {} ", target.pid);
    c.check(
        run.stderr
            .lines()
            .any(|l| l.starts_with(&tracing) || l == tracing.trim_end()),
        format!("stderr should have a line starting {tracing:?}"),
    );
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
}

#[test]
fn pid_fp_alloc_sites_exact() {
    pid_alloc_sites_exact(Build::Fp);
}

#[test]
fn pid_nofp_alloc_sites_exact() {
    pid_alloc_sites_exact(Build::NoFp);
}

/// SIGINT (Ctrl-C) or SIGTERM to memprof while the target lives: final report, exit 0, and the
/// target keeps running normally (it then finishes when told to).
fn pid_stop_by_signal(sig: i32, name: &str) {
    let f = fixtures();
    let mut target = start_target(
        "alloc_sites --wait --hold",
        &f.alloc_fp,
        &["--wait", "--hold"],
    );
    let mp = attach(&target, &[]);
    target.signal(libc::SIGUSR1);
    target.expect_stdout_line("done");
    thread::sleep(Duration::from_millis(500));
    send_signal(mp.pid(), sig);
    let run = mp.finish(DEADLINE);
    run.assert_success();
    let report = run.report();
    let mut c = Checks::new(format!("pid mode stopped by {name}"));
    c.check(
        target.alive(),
        format!(
            "the target died when memprof got {name}: {:?}",
            target.status
        ),
    );
    c.eq("exited", report["exited"].as_bool(), Some(false));
    c.check(
        report["exit_code"].is_null(),
        format!("exit_code {} should be null", report["exit_code"]),
    );
    for fact in ALLOC_SITES {
        check_site(&mut c, &report, fact);
    }
    check_totals(&mut c, &report, &ALLOC_SITES_WINDOW);
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
    target.signal(libc::SIGUSR2);
    let done = target.finish(DEADLINE);
    assert_eq!(
        done.code(),
        Some(0),
        "target should finish normally after memprof detached\n{}",
        done.context()
    );
}

#[test]
fn pid_sigint_reports_and_leaves_target_running() {
    pid_stop_by_signal(libc::SIGINT, "SIGINT");
}

#[test]
fn pid_sigterm_reports_and_leaves_target_running() {
    pid_stop_by_signal(libc::SIGTERM, "SIGTERM");
}

/// --duration ends a pid trace (bare number = seconds, and the ms form) with an empty report
/// while the target sits idle.
#[test]
fn pid_duration_ends_trace() {
    let f = fixtures();
    for (arg, secs) in [("1", 1.0), ("500ms", 0.5)] {
        let mut target = start_target("alloc_sites --wait", &f.alloc_fp, &["--wait"]);
        let began = Instant::now();
        let mp = attach(&target, &["--duration", arg]);
        let run = mp.finish(DEADLINE);
        let wall = began.elapsed().as_secs_f64();
        run.assert_success();
        let report = run.report();
        let mut c = Checks::new(format!("--duration {arg}"));
        c.check(
            wall >= secs,
            format!("memprof ended after {wall:.2} s, before --duration {arg}"),
        );
        c.check(
            wall < secs + 20.0,
            format!("memprof took {wall:.2} s for --duration {arg}"),
        );
        let d = report["duration_s"].as_f64().unwrap_or(-1.0);
        c.check(
            d >= secs * 0.9 && d < secs + 20.0,
            format!("duration_s {d} for --duration {arg}"),
        );
        c.eq("exited", report["exited"].as_bool(), Some(false));
        c.eq(
            "totals.allocs (target idle)",
            num(&report["totals"], "allocs"),
            0,
        );
        c.check(leaks(&report).is_empty(), "leaks while the target was idle");
        c.check(target.alive(), "target died");
        c.finish(|| format!("{}\n{}", summary(&report), run.context()));
    }
}

/// The traced pid dying (SIGKILL) ends the trace: exit 0, report with exited true.
#[test]
fn pid_target_killed_ends_trace_with_report() {
    let f = fixtures();
    let target = start_target("alloc_sites --wait", &f.alloc_fp, &["--wait"]);
    let mp = attach(&target, &[]);
    target.signal(libc::SIGKILL);
    let t = target.finish(DEADLINE);
    assert_eq!(t.status.signal(), Some(libc::SIGKILL), "{}", t.context());
    let run = mp.finish(DEADLINE);
    run.assert_success();
    let report = run.report();
    assert_eq!(
        report["exited"],
        true,
        "target exited during the trace\n{}",
        summary(&report)
    );
    assert!(
        report["exit_code"].is_null() || report["exit_code"] == 137,
        "exit_code of a SIGKILLed target: {} (null or 137)\n{}",
        report["exit_code"],
        summary(&report)
    );
}
