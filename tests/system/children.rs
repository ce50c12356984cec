//! Following the forks and execs of a spawned command, and not following them.

use serde_json::Value;

use super::{DEADLINE, process, procs, reported, role_pid};
use crate::common::{Checks, Finished, final_report, num, run_trace, site_total};

/// `memprof trace --json OPTS -- procs tree` to the end: the run and its final report.
fn trace_tree(opts: &[&str]) -> (Finished, Value) {
    let mut args = vec!["--json", "--duration", "60s"];
    args.extend(opts);
    args.extend(["--", procs().to_str().unwrap(), "tree"]);
    let f = run_trace(&args, DEADLINE);
    let r = final_report(&f);
    (f, r)
}

/// A forked worker that retitles itself (its command line and its name, as servers' workers
/// do) is reported under the title it gave itself, read while it ran, not its parent's.
#[test]
fn a_forked_worker_is_reported_under_its_own_title() {
    let args = [
        "--json",
        "--duration",
        "60s",
        "--",
        procs().to_str().unwrap(),
        "retitle",
    ];
    let f = run_trace(&args, DEADLINE);
    let r = final_report(&f);
    let worker = role_pid(&f.stderr, "worker");
    let mut c = Checks::new("procs retitle");
    c.eq("exit code", f.code(), Some(0));
    if let Some(p) = reported(&mut c, &r, worker, "the worker") {
        c.eq(
            "worker: cmdline",
            p["cmdline"].clone(),
            serde_json::json!(["procs: worker"]),
        );
        c.eq("worker: comm", p["comm"].as_str(), Some("procs-worker"));
        c.eq("worker: execs", p["execs"].as_u64(), Some(0));
        c.eq(
            "worker: leak_child",
            site_total(p, "leak_child"),
            (2000, 20),
        );
    }
    if let Some(p) = process(&r, parent_of(&r, worker)) {
        c.eq(
            "parent: cmdline",
            p["cmdline"].clone(),
            serde_json::json!([procs().to_str().unwrap(), "retitle"]),
        );
    }
    c.finish(|| f.context());
}

/// The parent of `pid` in `report`'s processes (0 if not found).
fn parent_of(report: &Value, pid: u32) -> u32 {
    process(report, pid)
        .and_then(|p| p["parent"].as_u64())
        .map_or(0, |p| p as u32)
}

#[test]
fn follows_forks_and_execs_of_a_spawned_command() {
    let (f, r) = trace_tree(&[]);
    let parent = role_pid(&f.stderr, "parent");
    let child = role_pid(&f.stderr, "child");
    let exec = role_pid(&f.stderr, "exec");
    let mut c = Checks::new("procs tree, followed");
    c.eq("exit code", f.code(), Some(0));
    c.eq("report pid", r["pid"].as_u64(), Some(u64::from(parent)));
    c.eq("lost events", num(&r["totals"], "lost_events"), 0);
    c.eq(
        "processes",
        r["processes"].as_array().map(Vec::len),
        Some(3),
    );
    for (pid, role, function, bytes, blocks, execs, ppid) in [
        (parent, "parent", "leak_parent", 1000, 10, 0, None),
        (child, "child", "leak_child", 2000, 20, 0, Some(parent)),
        (exec, "exec", "leak_exec", 3000, 30, 1, Some(parent)),
    ] {
        let Some(p) = reported(&mut c, &r, pid, &format!("the {role}")) else {
            continue;
        };
        c.eq(
            &format!("{role}: {function}"),
            site_total(p, function),
            (bytes, blocks),
        );
        c.eq(
            &format!("{role}: exited"),
            p["exited"].as_bool(),
            Some(true),
        );
        c.eq(&format!("{role}: execs"), p["execs"].as_u64(), Some(execs));
        c.eq(
            &format!("{role}: parent"),
            p["parent"].as_u64(),
            ppid.map(u64::from),
        );
        // The child frees 4 of the parent's blocks, copies it inherited at the fork: neither
        // its own frees nor unmatched ones; the parent's blocks stay its own.
        let inherited = if role == "child" { 4 } else { 0 };
        c.eq(
            &format!("{role}: inherited, unmatched frees"),
            (
                // Absent when 0.
                p["totals"]["inherited_frees"].as_u64().unwrap_or(0),
                num(&p["totals"], "unmatched_frees"),
            ),
            (inherited, 0),
        );
        // A process's leaks are its own: no other role's site shows up in it.
        for other in ["leak_parent", "leak_child", "leak_exec"] {
            if other != function {
                c.eq(&format!("{role}: {other}"), site_total(p, other), (0, 0));
            }
        }
    }
    if let Some(p) = process(&r, exec) {
        c.eq("exec: comm", p["comm"].as_str(), Some("exe"));
        c.eq(
            "exec: cmdline",
            p["cmdline"].clone(),
            serde_json::json!(["/proc/self/exe", "exec"]),
        );
    }
    // The whole tree's sites are in the top-level leaks too.
    let top = r.clone();
    for (function, bytes) in [
        ("leak_parent", 1000),
        ("leak_child", 2000),
        ("leak_exec", 3000),
    ] {
        c.eq(
            &format!("top-level {function}"),
            site_total(&top, function).0,
            bytes,
        );
    }
    c.finish(|| f.context());
}

#[test]
fn no_follow_children_traces_the_command_alone() {
    let (f, r) = trace_tree(&["--no-follow-children"]);
    let mut c = Checks::new("procs tree, not followed");
    c.eq("exit code", f.code(), Some(0));
    c.check(
        r.get("processes").is_none(),
        "no processes array for one process",
    );
    c.eq("leak_parent", site_total(&r, "leak_parent"), (1000, 10));
    c.eq("leak_child", site_total(&r, "leak_child"), (0, 0));
    c.eq("leak_exec", site_total(&r, "leak_exec"), (0, 0));
    c.finish(|| f.context());
}
