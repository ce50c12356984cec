//! Python ctypes: mallocs made by a Python program through libffi, which tracemalloc cannot see.

use serde_json::Value;

use super::{
    facts::{PY_OUTSTANDING, PY_SIZE},
    fixtures,
    report::{groups_json, sum_groups, summary},
};
use crate::common::{Checks, frame_fn, num, pid_trace, spawn_trace, stack};

/// The ctypes mallocs: libc's malloc called by libffi. On Debian 12 libffi.so.8 is stripped and
/// the return address lies in the hidden assembly `ffi_call_unix64`, which has no symbol, so
/// the frame is recognised by its module (libffi) or, where symbols exist, by `ffi_call`.
fn is_ffi_frame(f: &Value) -> bool {
    frame_fn(f).is_some_and(|n| n.contains("ffi_call"))
        || f["module"]
            .as_str()
            .is_some_and(|m| m.rsplit('/').next().unwrap_or(m).starts_with("libffi"))
}

fn check_python(report: &Value, stderr_with_diff: &str, what: &str, context: &str) {
    let mut c = Checks::new(what.to_string());
    let s = sum_groups(report, |g| {
        g["kind"] == "heap" && stack(g).iter().any(is_ffi_frame)
    });
    c.eq(
        "bytes of ctypes malloc groups (libffi frame on the stack)",
        s.bytes,
        PY_OUTSTANDING * PY_SIZE,
    );
    c.eq("allocs of ctypes malloc groups", s.allocs, PY_OUTSTANDING);
    for g in &s.groups {
        c.eq(
            "ctypes group allocator",
            g["allocator"].as_str(),
            Some("malloc"),
        );
    }
    c.eq(
        "totals.lost_events",
        num(&report["totals"], "lost_events"),
        0,
    );
    let diff = stderr_with_diff
        .lines()
        .find_map(|l| l.trim().strip_prefix("tracemalloc_diff="))
        .and_then(|d| d.trim().parse::<i64>().ok());
    c.check(
        diff.is_some_and(|d| d < PY_SIZE as i64),
        format!("tracemalloc's difference {diff:?} should be printed and be < {PY_SIZE} (it cannot see ctypes mallocs)"),
    );
    c.finish(|| {
        format!(
            "ctypes groups: {}\n{}\n{context}",
            groups_json(&s.groups),
            summary(report)
        )
    });
}

#[test]
fn python_ctypes_spawn() {
    let f = fixtures();
    let cmd = vec![
        f.python.as_os_str().to_owned(),
        f.py_script.as_os_str().to_owned(),
    ];
    let run = spawn_trace(&[], &cmd);
    run.assert_success();
    let report = run.report();
    check_python(
        &report,
        &run.stderr,
        "spawn mode, ctypes_native.py",
        &run.context(),
    );
}

#[test]
fn python_ctypes_pid() {
    let f = fixtures();
    let script = f.py_script.to_str().unwrap();
    let (run, target) = pid_trace(
        "ctypes_native.py --wait",
        &f.python,
        &[script, "--wait"],
        &[],
    );
    run.assert_success();
    assert_eq!(target.code(), Some(0), "{}", target.context());
    let report = run.report();
    assert_eq!(report["exited"], true, "{}", summary(&report));
    check_python(
        &report,
        &target.stderr,
        "pid mode, ctypes_native.py --wait",
        &run.context(),
    );
}
