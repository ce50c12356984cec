//! Choosing the processes of `--all`: every one (also those started later or exiting
//! early), `--comm`, `--cgroup`, and the bound on exited processes kept.

use std::{fs, path::PathBuf, process::Command, thread, time::Duration};

use serde_json::Value;

use super::{DEADLINE, interrupt, leaker, process, procs, reported};
use crate::common::{Checks, Driven, Proc, num, site_total, start_trace};

/// `memprof trace --all --json OPTS`, once it traces.
fn trace_all(opts: &[&str]) -> Proc {
    let mut args = vec!["--all", "--json"];
    args.extend(opts);
    start_trace(&args, String::new)
}

#[test]
fn all_mode_reports_each_process_exactly() {
    let mut a = leaker(7, 1000);
    let mut b = leaker(13, 500);
    let mp = trace_all(&["--duration", "60s"]);
    a.go("leaked");
    b.go("leaked");
    // Started after memprof attached: covered all the same.
    let mut late = leaker(3, 4096);
    late.go("leaked");
    let (a_pid, b_pid, late_pid) = (a.proc.pid(), b.proc.pid(), late.proc.pid());
    // One exits before the trace ends: reported as exited, its leak still named. It started
    // before memprof, so no mapping record of the kernel names its code: the agent reads its
    // view while it lives, which on a busy machine takes some of these 300 ms.
    thread::sleep(Duration::from_millis(300));
    let a_done = a.finish(DEADLINE);
    // Give the agent time to drain the exit.
    thread::sleep(Duration::from_millis(300));
    let (f, r) = interrupt(mp);
    let mut c = Checks::new("--all with three leakers");
    c.eq("memprof exit code", f.code(), Some(0));
    c.eq("procs leak a exit code", a_done.code(), Some(0));
    c.eq("report pid", r["pid"].as_u64(), Some(0));
    for (pid, name, bytes, blocks, exited) in [
        (a_pid, "a", 7000, 7, true),
        (b_pid, "b", 6500, 13, false),
        (late_pid, "late", 12288, 3, false),
    ] {
        let Some(p) = reported(&mut c, &r, pid, &format!("leaker {name}")) else {
            continue;
        };
        c.eq(
            &format!("{name}: leak_here"),
            site_total(p, "leak_here"),
            (bytes, blocks),
        );
        c.eq(&format!("{name}: comm"), p["comm"].as_str(), Some("procs"));
        c.eq(
            &format!("{name}: exited"),
            p["exited"].as_bool(),
            Some(exited),
        );
        c.eq(
            &format!("{name}: cmdline[1]"),
            p["cmdline"][1].as_str(),
            Some("leak"),
        );
    }
    c.check(
        process(&r, f.pid).is_none(),
        "memprof's own process is not traced",
    );
    // Ranked by outstanding bytes.
    let ranked: Vec<u64> = r["processes"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    num(&p["totals"], "outstanding_bytes") + num(&p["mmap"], "outstanding_bytes")
                })
                .collect()
        })
        .unwrap_or_default();
    c.check(
        ranked.windows(2).all(|w| w[0] >= w[1]),
        format!("processes ranked by outstanding bytes: {ranked:?}"),
    );
    drop(b.finish(DEADLINE));
    drop(late.finish(DEADLINE));
    c.finish(|| f.context());
}

#[test]
fn comm_narrows_all_mode_to_one_name() {
    let mut a = leaker(5, 300);
    let mp = trace_all(&["--comm", "procs", "--duration", "60s"]);
    a.go("leaked");
    // `sleep` allocates too, but is not named procs.
    let other = Command::new("sleep").arg("0.1").status().unwrap();
    assert!(other.success());
    let (f, r) = interrupt(mp);
    let mut c = Checks::new("--all --comm procs");
    let names: Vec<&str> = r["processes"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["comm"].as_str()).collect())
        .unwrap_or_default();
    c.check(
        !names.is_empty() && names.iter().all(|n| *n == "procs"),
        format!("only processes named procs: {names:?}"),
    );
    if let Some(p) = reported(&mut c, &r, a.proc.pid(), "the leaker") {
        c.eq("leak_here", site_total(p, "leak_here"), (1500, 5));
    }
    drop(a.finish(DEADLINE));
    c.finish(|| f.context());
}

#[test]
fn comm_with_no_process_running_yet_traces_those_that_start() {
    // The fixture under a name no other process has: none runs when memprof starts.
    let bin = procs().with_file_name("latecomer");
    fs::copy(procs(), &bin).unwrap();
    let mp = trace_all(&["--comm", "latecomer", "--duration", "60s"]);
    let mut a = Driven::start(
        "latecomer leak",
        Command::new(&bin).args(["leak", "7", "200"]),
    );
    a.go("leaked");
    let done = a.finish(DEADLINE);
    let (f, r) = interrupt(mp);
    let mut c = Checks::new("--all --comm latecomer, started before it");
    c.check(
        f.stderr
            .lines()
            .any(|l| l.starts_with("memprof: no running process matches yet; probing ")),
        "memprof says it waits for matching processes",
    );
    c.eq("leaker exit code", done.code(), Some(0));
    if let Some(p) = reported(&mut c, &r, done.pid, "the latecomer") {
        c.eq("leak_here", site_total(p, "leak_here"), (1400, 7));
    }
    c.finish(|| f.context());
}

/// A burst of short-lived processes under `--all --comm`: each one's command line is the one it
/// was started with, though most are gone before memprof could read their `/proc` (the kernel
/// copies the command line at the exec).
#[test]
fn short_lived_processes_keep_their_command_lines() {
    let bin = procs().with_file_name("burst");
    fs::copy(procs(), &bin).unwrap();
    let mp = trace_all(&["--comm", "burst", "--duration", "60s"]);
    let children: Vec<(String, std::process::Child)> = (0..60)
        .map(|i| {
            let tag = format!("tag{i}");
            let child = Command::new(&bin)
                .args(["spin", "0", &tag])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            (tag, child)
        })
        .collect();
    let mut started = Vec::new();
    for (tag, mut child) in children {
        let status = child.wait().unwrap();
        started.push((tag, child.id(), status.code()));
    }
    // Give the agent time to drain the burst.
    thread::sleep(Duration::from_millis(500));
    let (f, r) = interrupt(mp);
    let mut c = Checks::new("--all --comm burst, 60 short-lived processes");
    let path = bin.to_str().unwrap();
    for (tag, pid, code) in started {
        c.eq(&format!("{tag}: exit code"), code, Some(0));
        if let Some(p) = reported(&mut c, &r, pid, &tag) {
            c.eq(
                &format!("{tag}: cmdline"),
                p["cmdline"].clone(),
                serde_json::json!([path, "spin", "0", tag]),
            );
            c.eq(
                &format!("{tag}: spin_leak"),
                site_total(p, "spin_leak"),
                (32000, 1000),
            );
        }
    }
    c.finish(|| f.context());
}

#[test]
fn cgroup_narrows_all_mode_to_one_cgroup() {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let root = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("cgroup v2 is mounted");
    let cg = root.join(format!("memprof-test-{}", std::process::id()));
    let _ = fs::create_dir(&cg);
    let mut inside = leaker(6, 700);
    fs::write(cg.join("cgroup.procs"), inside.proc.pid().to_string()).unwrap();
    let mut outside = leaker(2, 900);
    let mp = trace_all(&["--cgroup", cg.to_str().unwrap(), "--duration", "60s"]);
    inside.go("leaked");
    outside.go("leaked");
    let (f, r) = interrupt(mp);
    let mut c = Checks::new("--all --cgroup");
    if let Some(p) = reported(&mut c, &r, inside.proc.pid(), "the process in the cgroup") {
        c.eq("inside: leak_here", site_total(p, "leak_here"), (4200, 6));
    }
    c.check(
        process(&r, outside.proc.pid()).is_none(),
        "the process outside the cgroup is not traced",
    );
    drop(inside.finish(DEADLINE));
    drop(outside.finish(DEADLINE));
    let _ = fs::remove_dir(&cg);
    c.finish(|| f.context());
}

#[test]
fn exited_processes_beyond_the_limit_are_forgotten() {
    // 300 short-lived processes under --all --comm: the 256 most recent exited ones stay in
    // the report, the 44 before them are forgotten (and counted), so memory stays bounded.
    // --comm needs a matching process running when memprof starts. The fixture keeps frame
    // pointers: with `--unwind fp` each of the 600,000 events is small and needs no tables
    // for the new process first, so what is checked is the limit on processes, not how fast
    // the agent installs 300 processes' tables on a busy machine.
    let mut anchor = leaker(1, 10);
    let mp = trace_all(&["--comm", "procs", "--duration", "120s", "--unwind", "fp"]);
    anchor.go("leaked");
    for _ in 0..300 {
        let status = Command::new(procs())
            .args(["spin", "0"])
            .output()
            .unwrap()
            .status;
        assert!(status.success());
    }
    thread::sleep(Duration::from_millis(500));
    let (f, r) = interrupt(mp);
    let mut c = Checks::new("300 exited processes");
    c.eq("events lost", r["totals"]["lost_events"].as_u64(), Some(0));
    let exited: Vec<&Value> = r["processes"]
        .as_array()
        .map(|ps| ps.iter().filter(|p| p["exited"] == true).collect())
        .unwrap_or_default();
    c.eq("exited processes listed", exited.len(), 256);
    c.eq(
        "processes forgotten",
        r["forgotten"]["processes"].as_u64(),
        Some(44),
    );
    c.check(
        process(&r, anchor.proc.pid()).is_some_and(|p| p["exited"] == false),
        "the running process is listed, not exited",
    );
    // Each listed exited process leaked 1000 x 32 B at spin_leak.
    c.check(
        exited
            .iter()
            .all(|p| site_total(p, "spin_leak") == (32000, 1000)),
        "each listed exited process: spin_leak 32000 B in 1000 blocks",
    );
    drop(anchor.finish(DEADLINE));
    c.finish(|| f.context());
}
