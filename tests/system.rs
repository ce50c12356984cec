//! End-to-end tests of multi-process tracing and faults, with the real `memprof` binary and real
//! eBPF: forks and execs followed from a spawned command, `--all` with concurrent leaking
//! processes (one started after memprof attached, one exiting mid-trace), `--comm`, a process
//! under its own root (a container's mount namespace), SIGKILL of memprof (no probe left in the
//! target), ring-buffer overload (counted, never silent) and a short soak of the agent's memory.
//!
//! Fixture: tests/fixtures/procs.c. Needs root, `cc` and util-linux's `unshare`:
//! `cargo test --release -p memprof-user --test system -- --test-threads=1`.

mod common;

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{ChildStdin, Command},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use common::{
    Checks, FIXTURE_SRC, Finished, Proc, STARTUP, final_report, frame_fn, memprof_trace, num,
    require_root, spawn_with_stdin, stack,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(90);

/// The procs fixture, compiled once.
fn procs() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    require_root();
    BIN.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("memprof-system");
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("procs");
        let res = Command::new("cc")
            .args(["-O2", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(&out)
            .arg(Path::new(FIXTURE_SRC).join("procs.c"))
            .output()
            .expect("cannot run cc");
        assert!(
            res.status.success(),
            "compiling procs.c failed:\n{}",
            String::from_utf8_lossy(&res.stderr)
        );
        out
    })
}

/// A `procs leak COUNT SIZE` process, ready and waiting for its go.
struct Leaker {
    proc: Proc,
    stdin: Option<ChildStdin>,
}

impl Leaker {
    fn start(count: u64, size: u64) -> Leaker {
        Self::start_with(Command::new(procs()).args([
            "leak",
            &count.to_string(),
            &size.to_string(),
        ]))
    }

    fn start_with(cmd: &mut Command) -> Leaker {
        let (mut proc, stdin) = spawn_with_stdin("procs leak", cmd);
        proc.expect_stdout_line("ready");
        Leaker {
            proc,
            stdin: Some(stdin),
        }
    }

    /// Makes it leak and waits until it has.
    fn leak(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
        self.proc.expect_stdout_line("leaked");
    }

    /// Lets it exit.
    fn finish(mut self) -> Finished {
        drop(self.stdin.take());
        self.proc.finish(DEADLINE)
    }
}

/// Starts memprof and waits for its `memprof: tracing` line.
fn start_memprof(args: &[&str]) -> Proc {
    let mut mp = Proc::spawn(
        format!("memprof trace {}", args.join(" ")),
        &mut memprof_trace(args),
    );
    let deadline = Instant::now() + STARTUP;
    if mp
        .err
        .wait_line(deadline, |l| l.starts_with("memprof: tracing "))
        .is_none()
    {
        let out = mp.output_so_far();
        mp.kill_group();
        panic!("memprof did not start tracing within {STARTUP:?}\n{out}");
    }
    mp
}

/// The `processes` entry of `pid`.
fn process(report: &Value, pid: u32) -> Option<&Value> {
    report["processes"]
        .as_array()?
        .iter()
        .find(|p| p["pid"].as_u64() == Some(u64::from(pid)))
}

/// (bytes, blocks) outstanding in groups whose innermost frame is `function`.
fn site(entry: &Value, function: &str) -> (u64, u64) {
    entry["leaks"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter(|g| stack(g).first().and_then(frame_fn) == Some(function))
        .fold((0, 0), |(b, n), g| {
            (b + num(g, "bytes"), n + num(g, "allocs"))
        })
}

/// "pid ROLE N" lines the tree fixture prints (on memprof's stderr in --json spawn mode).
fn role_pid(text: &str, role: &str) -> u32 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("pid {role} ")))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `pid {role}` line in:\n{text}"))
}

#[test]
fn follows_forks_and_execs_of_a_spawned_command() {
    let bin = procs().to_str().unwrap();
    let f = Proc::spawn(
        "memprof trace -- procs tree",
        &mut memprof_trace(&["--json", "--duration", "60s", "--", bin, "tree"]),
    )
    .finish(DEADLINE);
    let r = final_report(&f);
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
        let Some(p) = process(&r, pid) else {
            c.check(
                false,
                format!("no processes entry for the {role} (pid {pid})"),
            );
            continue;
        };
        c.eq(
            &format!("{role}: {function}"),
            site(p, function),
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
        // A process's leaks are its own: no other role's site shows up in it.
        for other in ["leak_parent", "leak_child", "leak_exec"] {
            if other != function {
                c.eq(&format!("{role}: {other}"), site(p, other), (0, 0));
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
            site(&top, function).0,
            bytes,
        );
    }
    c.finish(|| f.context());
}

#[test]
fn no_follow_children_traces_the_command_alone() {
    let bin = procs().to_str().unwrap();
    let f = Proc::spawn(
        "memprof trace --no-follow-children -- procs tree",
        &mut memprof_trace(&[
            "--json",
            "--duration",
            "60s",
            "--no-follow-children",
            "--",
            bin,
            "tree",
        ]),
    )
    .finish(DEADLINE);
    let r = final_report(&f);
    let mut c = Checks::new("procs tree, not followed");
    c.eq("exit code", f.code(), Some(0));
    c.check(
        r.get("processes").is_none(),
        "no processes array for one process",
    );
    c.eq("leak_parent", site(&r, "leak_parent"), (1000, 10));
    c.eq("leak_child", site(&r, "leak_child"), (0, 0));
    c.eq("leak_exec", site(&r, "leak_exec"), (0, 0));
    c.finish(|| f.context());
}

#[test]
fn all_mode_reports_each_process_exactly() {
    let mut a = Leaker::start(7, 1000);
    let mut b = Leaker::start(13, 500);
    let mp = start_memprof(&["--all", "--json", "--duration", "60s"]);
    a.leak();
    b.leak();
    // Started after memprof attached: covered all the same.
    let mut late = Leaker::start(3, 4096);
    late.leak();
    let (a_pid, b_pid, late_pid) = (a.proc.pid(), b.proc.pid(), late.proc.pid());
    // One exits before the trace ends: reported as exited, its leak still named.
    let a_done = a.finish();
    // Give the agent time to drain the exit.
    thread::sleep(Duration::from_millis(300));
    mp.signal(libc::SIGINT);
    let f = mp.finish(DEADLINE);
    let r = final_report(&f);
    let mut c = Checks::new("--all with three leakers");
    c.eq("memprof exit code", f.code(), Some(0));
    c.eq("procs leak a exit code", a_done.code(), Some(0));
    c.eq("report pid", r["pid"].as_u64(), Some(0));
    for (pid, name, bytes, blocks, exited) in [
        (a_pid, "a", 7000, 7, true),
        (b_pid, "b", 6500, 13, false),
        (late_pid, "late", 12288, 3, false),
    ] {
        let Some(p) = process(&r, pid) else {
            c.check(
                false,
                format!("no processes entry for leaker {name} (pid {pid})"),
            );
            continue;
        };
        c.eq(
            &format!("{name}: leak_here"),
            site(p, "leak_here"),
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
    drop(b.finish());
    drop(late.finish());
    c.finish(|| f.context());
}

#[test]
fn comm_narrows_all_mode_to_one_name() {
    let mut a = Leaker::start(5, 300);
    let mp = start_memprof(&["--all", "--comm", "procs", "--json", "--duration", "60s"]);
    a.leak();
    // `sleep` allocates too, but is not named procs.
    let other = Command::new("sleep").arg("0.1").status().unwrap();
    assert!(other.success());
    mp.signal(libc::SIGINT);
    let f = mp.finish(DEADLINE);
    let r = final_report(&f);
    let mut c = Checks::new("--all --comm procs");
    let names: Vec<&str> = r["processes"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["comm"].as_str()).collect())
        .unwrap_or_default();
    c.check(
        !names.is_empty() && names.iter().all(|n| *n == "procs"),
        format!("only processes named procs: {names:?}"),
    );
    match process(&r, a.proc.pid()) {
        Some(p) => c.eq("leak_here", site(p, "leak_here"), (1500, 5)),
        None => c.check(false, "the leaker is reported"),
    }
    drop(a.finish());
    c.finish(|| f.context());
}

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
    let mut leaker =
        Leaker::start_with(Command::new("unshare").args(["--mount", "sh", "-c", &script]));
    // unshare and sh exec in place: the pid is the fixture's.
    let pid = leaker.proc.pid();
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.lines().any(|l| l.ends_with(" /app")),
        "the fixture sees itself as /app:\n{maps}"
    );
    let pid_s = pid.to_string();
    let mp = start_memprof(&["--json", "--pid", &pid_s, "--duration", "60s"]);
    // Its own libc (the copy) carries the probes: read through its root.
    let patched = patched_bytes(pid, "/libc.so.6");
    leaker.leak();
    let done = leaker.finish();
    let f = mp.finish(DEADLINE);
    let r = final_report(&f);
    let mut c = Checks::new("process in its own mount namespace");
    c.eq("fixture exit code", done.code(), Some(0));
    c.check(
        patched > 0,
        format!("the container's own libc is probed ({patched} bytes patched)"),
    );
    c.eq("leak_here", site(&r, "leak_here"), (10000, 4));
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

/// Bytes of the executable mappings of `path` in process `pid` that differ from the file: a
/// uprobe is an int3 written into the process's copy of the page.
fn patched_bytes(pid: u32, path_suffix: &str) -> usize {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut differing = 0;
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || !fields[1].contains('x') || !fields[5].ends_with(path_suffix) {
            continue;
        }
        let (start, end) = fields[0].split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let offset = u64::from_str_radix(fields[2], 16).unwrap() as usize;
        let file = fs::read(format!("/proc/{pid}/root{}", fields[5])).unwrap();
        let mut live = vec![0u8; (end - start) as usize];
        use std::os::unix::fs::FileExt as _;
        mem.read_exact_at(&mut live, start).unwrap();
        let end_in_file = (offset + live.len()).min(file.len());
        differing += live[..end_in_file - offset]
            .iter()
            .zip(&file[offset..end_in_file])
            .filter(|(a, b)| a != b)
            .count();
    }
    differing
}

#[test]
fn sigkill_of_memprof_leaves_no_probe_behind() {
    let mut leaker = Leaker::start(2, 100);
    let pid = leaker.proc.pid();
    let libc = "/libc.so.6";
    // Probes of earlier traces may still be on their way out (the kernel removes them one by
    // one): start from a clean libc.
    let clean = Instant::now() + Duration::from_secs(60);
    while patched_bytes(pid, libc) != 0 {
        assert!(
            Instant::now() < clean,
            "libc still patched 60 s after earlier traces"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let pid_s = pid.to_string();
    let mp = start_memprof(&["--json", "--pid", &pid_s, "--duration", "60s"]);
    let during = patched_bytes(pid, libc);
    mp.signal(libc::SIGKILL);
    let killed = mp.finish(DEADLINE);
    let after = patched_bytes(pid, libc);
    // The target goes on and finishes normally.
    leaker.leak();
    let done = leaker.finish();
    let mut c = Checks::new("SIGKILL of memprof");
    c.check(
        during > 0,
        format!("probes patch libc while tracing ({during} bytes)"),
    );
    c.eq("patched bytes after memprof was killed", after, 0);
    c.eq(
        "memprof killed by SIGKILL",
        {
            use std::os::unix::process::ExitStatusExt as _;
            killed.status.signal()
        },
        Some(libc::SIGKILL),
    );
    c.eq("target exit code", done.code(), Some(0));
    c.finish(|| format!("{}\n{}", killed.context(), done.context()));
}

#[test]
fn ring_overload_is_counted_and_reported() {
    let bin = procs().to_str().unwrap();
    // One page of ring for about 200k events per second: most are dropped, and counted.
    let f = Proc::spawn(
        "memprof trace --ring-bytes 4096 -- procs spin 1",
        &mut memprof_trace(&[
            "--json",
            "--ring-bytes",
            "4096",
            "--duration",
            "60s",
            "--",
            bin,
            "spin",
            "1",
        ]),
    )
    .finish(DEADLINE);
    let r = final_report(&f);
    let mut c = Checks::new("ring overload");
    let lost = num(&r["totals"], "lost_events");
    let ring_full = num(&r["kernel"], "ring_full");
    c.check(
        ring_full > 1000,
        format!("ring_full counts drops: {ring_full}"),
    );
    c.eq(
        "lost_events = ring_full + inflight_full (+ decode errors 0)",
        lost,
        ring_full + num(&r["kernel"], "inflight_full"),
    );
    // The text report says so too.
    let text = Proc::spawn(
        "memprof trace (text) --ring-bytes 4096 -- procs spin 1",
        &mut memprof_trace(&[
            "--ring-bytes",
            "4096",
            "--duration",
            "60s",
            "--",
            bin,
            "spin",
            "0.5",
        ]),
    )
    .finish(DEADLINE);
    let line = text
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("lost events"))
        .unwrap_or("");
    let shown: u64 = line
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    c.check(shown > 0, format!("text report shows the loss: {line:?}"));
    c.finish(|| format!("{}\n{}", f.context(), text.context()));
}

/// VmRSS of `pid` in bytes.
fn rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[test]
fn agent_memory_stays_bounded_while_a_process_churns() {
    // A shortened soak (the hour-long one is `cargo xtask soak`): 40 s of churn, millions of
    // events, a bounded live set. memprof's RSS after warm-up must stay flat.
    let bin = procs().to_str().unwrap();
    let mut mp = Proc::spawn(
        "memprof trace -- procs spin 40",
        &mut memprof_trace(&["--json", "--duration", "90s", "--", bin, "spin", "40"]),
    );
    let started = Instant::now();
    let mut curve = Vec::new();
    while mp.alive() && started.elapsed() < Duration::from_secs(80) {
        curve.push((started.elapsed().as_secs(), rss(mp.pid())));
        thread::sleep(Duration::from_secs(2));
    }
    let f = mp.finish(DEADLINE);
    let r = final_report(&f);
    let mut c = Checks::new("agent memory while the target churns");
    c.eq("spin_leak", site(&r, "spin_leak"), (32000, 1000));
    c.eq("lost events", num(&r["totals"], "lost_events"), 0);
    let allocs = num(&r["totals"], "allocs");
    c.check(
        allocs > 1_000_000,
        format!("millions of events: {allocs} allocations"),
    );
    // RSS from 10 s on (warm-up done) to the end.
    let settled: Vec<u64> = curve
        .iter()
        .filter(|(t, v)| *t >= 10 && *v > 0)
        .map(|(_, v)| *v)
        .collect();
    let (lo, hi) = (
        settled.iter().copied().min().unwrap_or(0),
        settled.iter().copied().max().unwrap_or(0),
    );
    c.check(
        settled.len() >= 5 && hi - lo <= 8 << 20,
        format!("RSS within 8 MiB after warm-up: {curve:?}"),
    );
    eprintln!("memprof RSS (s, bytes): {curve:?}");
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
    let mut inside = Leaker::start(6, 700);
    fs::write(cg.join("cgroup.procs"), inside.proc.pid().to_string()).unwrap();
    let mut outside = Leaker::start(2, 900);
    let mp = start_memprof(&[
        "--all",
        "--cgroup",
        cg.to_str().unwrap(),
        "--json",
        "--duration",
        "60s",
    ]);
    inside.leak();
    outside.leak();
    mp.signal(libc::SIGINT);
    let f = mp.finish(DEADLINE);
    let r = final_report(&f);
    let mut c = Checks::new("--all --cgroup");
    match process(&r, inside.proc.pid()) {
        Some(p) => c.eq("inside: leak_here", site(p, "leak_here"), (4200, 6)),
        None => c.check(false, "the process in the cgroup is reported"),
    }
    c.check(
        process(&r, outside.proc.pid()).is_none(),
        "the process outside the cgroup is not traced",
    );
    drop(inside.finish());
    drop(outside.finish());
    let _ = fs::remove_dir(&cg);
    c.finish(|| f.context());
}

#[test]
fn exited_processes_beyond_the_limit_are_forgotten() {
    // 300 short-lived processes under --all --comm: the 256 most recent exited ones stay in
    // the report, the 44 before them are forgotten (and counted), so memory stays bounded.
    // --comm needs a matching process running when memprof starts.
    let mut anchor = Leaker::start(1, 10);
    let mp = start_memprof(&["--all", "--comm", "procs", "--json", "--duration", "120s"]);
    anchor.leak();
    for _ in 0..300 {
        let status = Command::new(procs())
            .args(["spin", "0"])
            .output()
            .unwrap()
            .status;
        assert!(status.success());
    }
    thread::sleep(Duration::from_millis(500));
    mp.signal(libc::SIGINT);
    let f = mp.finish(DEADLINE);
    let r = final_report(&f);
    let mut c = Checks::new("300 exited processes");
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
        exited.iter().all(|p| site(p, "spin_leak") == (32000, 1000)),
        "each listed exited process: spin_leak 32000 B in 1000 blocks",
    );
    drop(anchor.finish());
    c.finish(|| f.context());
}
