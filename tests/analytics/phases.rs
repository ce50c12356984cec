//! Phases: function phases (`--phase`, pid and spawn mode) and time marks (`memprof mark`),
//! every number exact.

use std::{
    path::Path,
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{array, fixtures, float, run_memprof, summary};
use crate::common::{
    Checks, DEADLINE, Finished, Proc, STARTUP, attach, clean_error, frame_names, leaks, os,
    pid_trace, require_root, spawn_trace, start_target,
};

/// Where `memprof mark` finds the trace of PID: `MARK_DIR/PID.sock`.
const MARK_DIR: &str = "/run/memprof";

/// One phase as the report must show it.
#[derive(Clone, Copy, Debug)]
struct PhaseFact {
    name: &'static str,
    kind: &'static str,
    allocs: u64,
    frees: u64,
    bytes_allocated: u64,
    bytes_freed: u64,
    net_bytes: i64,
    peak_net_bytes: i64,
    peak_outstanding_bytes: u64,
    entries: u64,
}

/// phases.c, heap outstanding over time (0 when the window starts: nothing is allocated after
/// `ready` but this):
///   step 1: keep 7000 -> 7000; load_phase: +100000 x 3 -> 307000, -100000 x 2 -> 107000
///   step 2: render_phase: +50000 -> 157000, -50000 -> 107000, twice; big +500000 -> 607000.
///
/// `--phase load=load_phase`: only load_phase's own 3 mallocs and 2 frees; the running net
/// peaks at 300000 after the third malloc, when the process holds 7000 + 300000.
const LOAD_FN: PhaseFact = PhaseFact {
    name: "load",
    kind: "function",
    allocs: 3,
    frees: 2,
    bytes_allocated: 300_000,
    bytes_freed: 200_000,
    net_bytes: 100_000,
    peak_net_bytes: 300_000,
    peak_outstanding_bytes: 307_000,
    entries: 1,
};
/// `--phase render=render_phase`: 2 calls, each malloc(50000) + free; the running net peaks at
/// 50000; the process holds at most 107000 + 50000 while it runs (the later 500000 malloc is
/// outside it, so the phase's peak is not the global peak 607000).
const RENDER_FN: PhaseFact = PhaseFact {
    name: "render",
    kind: "function",
    allocs: 2,
    frees: 2,
    bytes_allocated: 100_000,
    bytes_freed: 100_000,
    net_bytes: 0,
    peak_net_bytes: 50_000,
    peak_outstanding_bytes: 157_000,
    entries: 2,
};
/// `memprof mark load` before step 1: everything step 1 does (7000 + load_phase), from 0
/// outstanding.
const LOAD_MARK: PhaseFact = PhaseFact {
    name: "load",
    kind: "mark",
    allocs: 4,
    frees: 2,
    bytes_allocated: 307_000,
    bytes_freed: 200_000,
    net_bytes: 107_000,
    peak_net_bytes: 307_000,
    peak_outstanding_bytes: 307_000,
    entries: 1,
};
/// `memprof mark render` before step 2: both render calls and the 500000 malloc; running net
/// 50000, 0, 50000, 0, 500000; outstanding from 107000 up to 607000.
const RENDER_MARK: PhaseFact = PhaseFact {
    name: "render",
    kind: "mark",
    allocs: 3,
    frees: 2,
    bytes_allocated: 600_000,
    bytes_freed: 100_000,
    net_bytes: 500_000,
    peak_net_bytes: 500_000,
    peak_outstanding_bytes: 607_000,
    entries: 1,
};
/// phases.c totals over the window: 7 mallocs (907000 B), 4 frees (300000 B); 7000 + 100000 +
/// 500000 outstanding in 3 blocks, which is also the peak.
const PHASES_TOTALS: [(&str, u64); 7] = [
    ("allocs", 7),
    ("frees", 4),
    ("bytes_allocated", 907_000),
    ("bytes_freed", 300_000),
    ("outstanding_allocs", 3),
    ("outstanding_bytes", 607_000),
    ("peak_outstanding_bytes", 607_000),
];

fn check_phase(c: &mut Checks, phase: &Value, fact: &PhaseFact) {
    let n = fact.name;
    c.eq(&format!("phase {n}: name"), phase["name"].as_str(), Some(n));
    c.eq(
        &format!("phase {n}: kind"),
        phase["kind"].as_str(),
        Some(fact.kind),
    );
    for (key, want) in [
        ("allocs", fact.allocs),
        ("frees", fact.frees),
        ("bytes_allocated", fact.bytes_allocated),
        ("bytes_freed", fact.bytes_freed),
        ("peak_outstanding_bytes", fact.peak_outstanding_bytes),
        ("entries", fact.entries),
    ] {
        c.eq(
            &format!("phase {n}: {key}"),
            phase[key].as_u64(),
            Some(want),
        );
    }
    for (key, want) in [
        ("net_bytes", fact.net_bytes),
        ("peak_net_bytes", fact.peak_net_bytes),
    ] {
        c.eq(
            &format!("phase {n}: {key}"),
            phase[key].as_i64(),
            Some(want),
        );
    }
}

fn check_phases_totals(c: &mut Checks, report: &Value) {
    for (key, want) in PHASES_TOTALS {
        c.eq(
            &format!("totals.{key}"),
            report["totals"][key].as_u64(),
            Some(want),
        );
    }
    c.eq(
        "totals.lost_events",
        report["totals"]["lost_events"].as_u64(),
        Some(0),
    );
}

/// The report's phases: exactly the two `facts`, in order, every number exact; and the
/// window's totals. Returns the phases when there are two.
fn check_phases<'a>(c: &mut Checks, report: &'a Value, facts: [&PhaseFact; 2]) -> &'a [Value] {
    let phases = array(report, "phases");
    c.eq("number of phases", phases.len(), 2);
    check_phases_totals(c, report);
    if phases.len() != 2 {
        return &[];
    }
    for (phase, fact) in phases.iter().zip(facts) {
        check_phase(c, phase, fact);
    }
    phases
}

/// phases --wait in pid mode with both function phases.
pub(crate) fn phases_pid_run() -> &'static Finished {
    static RUN: OnceLock<Finished> = OnceLock::new();
    RUN.get_or_init(|| {
        let (run, target) = pid_trace(
            "phases --wait",
            &fixtures().phases,
            &["--wait"],
            &[
                "--phase",
                "load=load_phase",
                "--phase",
                "render=render_phase",
            ],
        );
        assert_eq!(
            target.code(),
            Some(0),
            "phases fixture\n{}",
            target.context()
        );
        run
    })
}

/// Waits until the trace `mp` of `pid` listens for marks (its socket exists).
///
/// Needed because memprof prints `memprof: tracing pid` before it binds the socket: a
/// `memprof mark` sent right after that line fails with "no memprof trace listens" in about 1
/// try of 10 (memprof issue, see the test report).
fn wait_mark_socket(mp: &mut Proc, target: &Proc) {
    let socket = Path::new(MARK_DIR).join(format!("{}.sock", target.pid()));
    let deadline = Instant::now() + STARTUP;
    while !socket.exists() {
        if !mp.alive() || Instant::now() >= deadline {
            let alive = mp.alive();
            mp.kill_group();
            panic!(
                "the trace did not create its mark socket {} within {STARTUP:?} (still \
                 running: {alive})\n{}\n{}",
                socket.display(),
                mp.output_so_far(),
                target.output_so_far()
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// `memprof mark NAME --pid PID`, to the end.
fn mark(name: &str, pid: u32) -> Finished {
    run_memprof(&os(&["mark", name, "--pid", &pid.to_string()]))
}

/// Pid mode, `--phase load=load_phase --phase render=render_phase`: every number of both
/// phases is exact (see LOAD_FN and RENDER_FN), and so are the window's totals.
#[test]
fn phases_function_phases_pid_exact() {
    let run = phases_pid_run();
    run.assert_code(0, "pid mode ends when the target exits");
    let report = run.report();
    let mut c = Checks::new("pid mode function phases");
    for p in check_phases(&mut c, &report, [&LOAD_FN, &RENDER_FN]) {
        c.check(
            p.get("start_s").is_none() && p.get("end_s").is_none(),
            format!("function phases carry no start_s/end_s: {p}"),
        );
    }
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
}

/// Spawn mode: the same phases, from the command's first instruction (nothing else in the
/// fixture allocates).
#[test]
fn phases_function_phases_spawn_exact() {
    let run = spawn_trace(
        &[
            "--phase",
            "load=load_phase",
            "--phase",
            "render=render_phase",
        ],
        &[&fixtures().phases],
    );
    run.assert_code(0, "the fixture exits 0");
    let report = run.report();
    let mut c = Checks::new("spawn mode function phases");
    check_phases(&mut c, &report, [&LOAD_FN, &RENDER_FN]);
    // The block load_phase keeps: the return probe on load_phase replaced its return address
    // on the stack while it ran, and the stack still names its caller.
    let kept: Vec<Vec<&str>> = leaks(&report)
        .iter()
        .map(frame_names)
        .filter(|names| names.first() == Some(&"load_phase"))
        .collect();
    c.eq(
        "stacks at load_phase: the two innermost frames",
        kept.iter()
            .map(|n| n.iter().take(2).map(|f| f.to_string()).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        vec![vec!["load_phase".to_string(), "main".to_string()]],
    );
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
}

/// Time marks: `memprof mark load` before step 1 and `memprof mark render` before step 2 (each
/// acknowledged, exit 0, before the fixture is released); both mark phases are exact.
#[test]
fn phases_marks_exact() {
    let fx = fixtures();
    let mut target = start_target("phases --marks", &fx.phases, &["--marks"]);
    let mut mp = attach(&target, &[]);
    wait_mark_socket(&mut mp, &target);
    let pid = target.pid();

    for (phase, step) in [("load", "step1"), ("render", "step2")] {
        mark(phase, pid).assert_code(0, "the trace acknowledged the mark");
        target.signal(libc::SIGUSR1);
        target.expect_stdout_line(step);
    }
    let t = target.finish(DEADLINE);
    assert_eq!(t.code(), Some(0), "phases --marks\n{}", t.context());
    let run = mp.finish(DEADLINE);
    run.assert_code(0, "pid mode ends when the target exits");

    let report = run.report();
    let mut c = Checks::new("mark phases");
    let phases = check_phases(&mut c, &report, [&LOAD_MARK, &RENDER_MARK]);
    if !phases.is_empty() {
        let t = |i: usize, k: &str| phases[i][k].as_f64();
        let (s0, e0, s1, e1) = (
            t(0, "start_s"),
            t(0, "end_s"),
            t(1, "start_s"),
            t(1, "end_s"),
        );
        c.check(
            matches!((s0, e0), (Some(s), Some(e)) if s >= 0.0 && s < e),
            format!("load: start_s {s0:?} < end_s {e0:?}"),
        );
        c.check(
            matches!((s1, e1), (Some(s), Some(e)) if s < e),
            format!("render: start_s {s1:?} < end_s {e1:?}"),
        );
        c.eq(
            "load.end_s == render.start_s (a mark ends the previous one)",
            e0,
            s1,
        );
        c.check(
            e1.is_some_and(|e| e <= float(&report, "duration_s") + 1e-6),
            format!("render.end_s {e1:?} <= duration_s {}", report["duration_s"]),
        );
    }
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
}

/// `memprof mark` for a pid nobody traces: non-zero exit and one `memprof: ` line.
#[test]
fn mark_without_trace_fails_cleanly() {
    require_root();
    // This test process is alive and never traced.
    let run = mark("x", std::process::id());
    let (mut c, _) = clean_error(&run, "memprof mark without a trace".to_string());
    c.eq("stdout", run.stdout.as_str(), "");
    c.finish(|| run.context());
}
