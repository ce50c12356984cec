//! A process under its own root: a container's mount namespace.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use super::{DEADLINE, interrupt, patched_bytes, procs};
use crate::common::{Checks, Driven, final_report, frame_fn, site_total, stack, start_trace};

/// A root directory holding the fixture and the libraries it needs, at the paths the loader
/// looks for them: copies, so the "container" has its own libc (another inode to probe).
fn container_root() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("memprof-container");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(root.join("old")).unwrap();
    fs::copy(procs(), root.join("app")).unwrap();
    let ldd = Command::new("ldd").arg(procs()).output().expect("ldd");
    let text = String::from_utf8_lossy(&ldd.stdout);
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|s| s.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(path) = path {
            let dest = root.join(path.trim_start_matches('/'));
            fs::create_dir_all(dest.parent().unwrap()).unwrap();
            fs::copy(fs::canonicalize(path).unwrap(), &dest).unwrap();
        }
    }
    root
}

#[test]
fn process_in_its_own_mount_namespace_is_traced_and_named() {
    let root = container_root();
    // A private mount namespace whose root is `root` (pivot_root, as container runtimes do):
    // the process's map paths name files in its own root (/app), which memprof cannot open
    // by those names.
    let script = format!(
        "set -e; mount --make-rprivate /; mount --bind {r} {r}; cd {r}; pivot_root . old; \
         exec /app leak 4 2500",
        r = root.display()
    );
    let mut leaker = Driven::start(
        "procs leak (own root)",
        Command::new("unshare").args(["--mount", "sh", "-c", &script]),
    );
    // unshare and sh exec in place: the pid is the fixture's.
    let pid = leaker.proc.pid();
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.lines().any(|l| l.ends_with(" /app")),
        "the fixture sees itself as /app:\n{maps}"
    );
    let pid_s = pid.to_string();
    let mp = start_trace(
        &["--json", "--pid", &pid_s, "--duration", "60s"],
        String::new,
    );
    // Its own libc (the copy) carries the probes: read through its root.
    let patched = patched_bytes(pid, "/libc.so.6");
    leaker.go("leaked");
    let done = leaker.finish(DEADLINE);
    let f = mp.finish(DEADLINE);
    let r = final_report(&f);
    let mut c = Checks::new("process in its own mount namespace");
    c.eq("fixture exit code", done.code(), Some(0));
    c.check(
        patched > 0,
        format!("the container's own libc is probed ({patched} bytes patched)"),
    );
    c.eq("leak_here", site_total(&r, "leak_here"), (10000, 4));
    let frames: Vec<(Option<&str>, &str)> = r["leaks"]
        .as_array()
        .and_then(|g| {
            g.iter()
                .find(|g| stack(g).first().and_then(frame_fn) == Some("leak_here"))
        })
        .map(|g| {
            stack(g)
                .iter()
                .map(|f| (frame_fn(f), f["module"].as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    c.eq(
        "innermost frames",
        frames.iter().take(2).map(|(f, _)| *f).collect::<Vec<_>>(),
        vec![Some("leak_here"), Some("main")],
    );
    let module = frames.first().map_or("", |(_, m)| *m);
    c.eq(
        "module of leak_here, through the process's root",
        module.to_string(),
        format!("/proc/{pid}/root/app"),
    );
    c.finish(|| f.context());
}

/// `sh -c` text that runs `cmd` in a private mount namespace whose root is `root` (pivot_root,
/// as container runtimes do).
fn in_root(root: &Path, cmd: &str) -> String {
    format!(
        "set -e; mount --make-rprivate /; mount --bind {r} {r}; cd {r}; pivot_root . old; \
         exec {cmd}",
        r = root.display()
    )
}

/// `--all --comm app` over short-lived processes that each run under their own root (a mount
/// namespace of their own) and are gone before memprof could read it: each is named through
/// the files an earlier one of the same image mapped, under one name per file, and memprof
/// keeps one descriptor per file, not one per process.
#[test]
fn short_lived_container_processes_share_their_files() {
    const RUNS: usize = 30;
    let root = container_root();
    // A container process running when memprof starts: its own libc (the copy) is probed
    // from the start, for the processes of the same image after it.
    let mut anchor = Driven::start(
        "procs leak (own root)",
        Command::new("unshare").args(["--mount", "sh", "-c", &in_root(&root, "/app leak 1 100")]),
    );
    let anchor_pid = anchor.proc.pid();
    let mp = start_trace(
        &["--json", "--all", "--comm", "app", "--unwind", "fp"],
        String::new,
    );
    let fds = || fs::read_dir(format!("/proc/{}/fd", mp.pid())).map_or(0, |d| d.count());
    anchor.go("leaked");
    let anchor_done = anchor.finish(DEADLINE);
    let before = fds();
    for _ in 0..RUNS {
        let out = Command::new("unshare")
            .args(["--mount", "sh", "-c", &in_root(&root, "/app spin 0")])
            .output()
            .expect("unshare");
        assert!(out.status.success(), "{out:?}");
    }
    // Every run's records taken, its stacks read.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let after = fds();
    let (f, r) = interrupt(mp);
    let mut c = Checks::new("short-lived processes under their own roots");
    c.eq("anchor exit code", anchor_done.code(), Some(0));
    // By the name their exec gave them (a process the agent reaches after its exit has no
    // command line left to read).
    let spins: Vec<&serde_json::Value> = r["processes"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter(|p| p["comm"] == "app" && p["pid"].as_u64() != Some(u64::from(anchor_pid)))
                .collect()
        })
        .unwrap_or_default();
    c.eq("spin processes reported", spins.len(), RUNS);
    let whole = spins
        .iter()
        .filter(|p| site_total(p, "spin_leak") == (32000, 1000))
        .count();
    c.eq(
        "spin processes with spin_leak 32000 B in 1000 blocks",
        whole,
        RUNS,
    );
    // One name for the fixture's file in every process: the first process's, which opens
    // through memprof's descriptor of the file once that process is gone.
    let mut modules: Vec<String> = spins
        .iter()
        .flat_map(|p| p["leaks"].as_array().cloned().unwrap_or_default())
        .filter_map(|g| {
            let f = stack(&g).first()?.clone();
            (frame_fn(&f) == Some("spin_leak"))
                .then(|| f["module"].as_str().unwrap_or("").to_string())
        })
        .collect();
    modules.sort();
    modules.dedup();
    c.eq(
        "module of spin_leak",
        modules,
        vec![format!("/proc/{anchor_pid}/root/app")],
    );
    c.check(
        after <= before + 8,
        format!("memprof's descriptors: {before} before the {RUNS} runs, {after} after"),
    );
    c.finish(|| f.context());
}
