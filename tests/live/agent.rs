//! memprof as a node agent (`trace --all --metrics ADDR`): `go tool pprof` pulling each
//! process's profile over HTTP, the bearer token on every endpoint, the cap on call sites per
//! process, and exited processes kept until a profile scrape has seen them.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use super::{
    HOLD_NAMES, HOLD_TABLE, STEADY_BYTES, TempDir, finish_trace,
    http::{free_port, http_get_with, poll},
    pprof_raw::{RawProfile, RawSample, go_pprof},
    prometheus::Prometheus,
    steady,
};
use crate::common::{
    Driven, FP, Proc, compile_c, require_root, start_target, start_trace, work_dir,
};

/// A whole trace's safety net: long enough for the slowest test here.
const AGENT_NET: &str = "120s";

fn fixture(name: &'static str) -> &'static Path {
    static SITES: OnceLock<PathBuf> = OnceLock::new();
    static PROCS: OnceLock<PathBuf> = OnceLock::new();
    let cell = if name == "sites" { &SITES } else { &PROCS };
    cell.get_or_init(|| {
        compile_c(
            &work_dir("memprof-fixtures"),
            name,
            &format!("{name}.c"),
            &[FP],
        )
    })
}

/// `memprof trace --all --metrics 127.0.0.1:PORT OPTS`, started.
fn agent(opts: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec!["--all", "--metrics", addr.as_str()];
    args.extend(opts);
    if !opts.contains(&"--duration") {
        args.extend(["--duration", AGENT_NET]);
    }
    (start_trace(&args, String::new), port)
}

/// The GNU build id of `binary`, from readelf.
fn build_id(binary: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(binary)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_string))
        .unwrap_or_else(|| panic!("no build id in {}", binary.display()))
}

/// The flat value pprof's `-top` shows for `function` (`100000B`).
fn flat<'a>(top: &'a str, function: &str) -> Option<&'a str> {
    top.lines().find_map(|l| {
        let t: Vec<&str> = l.split_whitespace().collect();
        (t.last() == Some(&function)).then(|| t[0])
    })
}

/// The value of `memprof_NAME_total{pid="0"}` in /metrics.
fn counter(port: u16, headers: &str, name: &str) -> Option<u64> {
    let want = format!("memprof_{name}_total{{pid=\"0\"}} ");
    let r = http_get_with(port, "/metrics", headers).ok()?;
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(want.as_str())?.parse().ok())
}

#[test]
fn go_tool_pprof_pulls_exact_bytes_from_a_token_protected_agent() {
    require_root();
    let dir = TempDir::new("agent-token");
    let token = "agent-t0ken-31415";
    let token_file = dir.0.join("token");
    fs::write(&token_file, format!("{token}\n")).unwrap();
    let (mp, port) = agent(&["--http-token", token_file.to_str().unwrap()]);
    let target = start_target("steady", steady(), &["60"]);
    let pid = target.pid();

    // Without the token (or with a wrong one) every endpoint answers 401.
    let bearer = format!("Authorization: Bearer {token}\r\n");
    let heap = format!("/debug/pprof/heap?pid={pid}");
    for path in ["/metrics", heap.as_str(), "/debug/pprof/allocs", "/"] {
        for headers in ["", "Authorization: Bearer wrong\r\n"] {
            let r = http_get_with(port, path, headers).unwrap();
            assert_eq!(r.status, 401, "{path} {headers:?}: {}", r.body);
            assert_eq!(r.header("WWW-Authenticate"), Some("Bearer"));
        }
        let r = http_get_with(port, path, &bearer).unwrap();
        assert_eq!(r.status, 200, "{path} with the token: {}", r.body);
    }
    let r = http_get_with(port, &heap, &bearer).unwrap();
    assert_eq!(r.header("Content-Type"), Some("application/octet-stream"));

    // go tool pprof, the token in the URL.
    let url = |kind: &str, query: &str| {
        format!("http://127.0.0.1:{port}/debug/pprof/{kind}?{query}&token={token}")
    };
    let pid_q = format!("pid={pid}");
    let top = poll(Duration::from_secs(20), || {
        go_pprof(
            &["-sample_index=inuse_space", "-unit=B", "-top"],
            &url("heap", &pid_q),
        )
        .ok()
        .filter(|t| flat(t, "hold_names").is_some())
    })
    .unwrap_or_else(|| {
        panic!(
            "go tool pprof never saw hold_names: {:?}\n{}",
            go_pprof(&["-top"], &url("heap", &pid_q)),
            mp.output_tail()
        )
    });
    assert_eq!(
        flat(&top, "hold_table"),
        Some(format!("{HOLD_TABLE}B").as_str()),
        "{top}"
    );
    assert_eq!(
        flat(&top, "hold_names"),
        Some(format!("{HOLD_NAMES}B").as_str()),
        "{top}"
    );
    assert!(
        top.contains(&format!("Total samples = {STEADY_BYTES}B")),
        "{top}"
    );
    // allocs: the same samples, alloc_space by default.
    let allocs = go_pprof(&["-unit=B", "-top"], &url("allocs", &pid_q)).unwrap();
    assert!(allocs.contains("Type: alloc_space"), "{allocs}");
    assert_eq!(flat(&allocs, "hold_table"), Some("100000B"), "{allocs}");

    // The raw profile: values, labels and the executable's mapping with its build id.
    let raw = RawProfile::parse(&go_pprof(&["-raw"], &url("heap", &pid_q)).unwrap());
    assert_eq!(raw.pids(), [pid].into());
    let site = |f: &str| -> &RawSample {
        raw.of(pid)
            .find(|s| s.function == f)
            .unwrap_or_else(|| panic!("no {f} sample: {raw:?}"))
    };
    assert_eq!(site("hold_table").values, [1, 100000, 1, 100000]);
    assert_eq!(site("hold_names").values, [1, 23456, 1, 23456]);
    let labels = &site("hold_names").labels;
    assert_eq!(labels["comm"], "steady_fp");
    assert_eq!(labels["allocator"], "calloc");
    assert_eq!(labels["kind"], "heap");
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert_eq!(
        Some(labels["cgroup"].as_str()),
        cgroup.lines().find_map(|l| l.strip_prefix("0::"))
    );
    let exe = steady().to_str().unwrap().to_string();
    assert!(
        raw.mappings.contains(&(exe.clone(), build_id(steady()))),
        "{:?}",
        raw.mappings
    );

    // ?comm= selects by name.
    let by_name = RawProfile::parse(&go_pprof(&["-raw"], &url("heap", "comm=steady_fp")).unwrap());
    assert_eq!(by_name.pids(), [pid].into());

    // A delta over one second of a process that allocates nothing: no sample left.
    let started = Instant::now();
    let delta = go_pprof(&["-raw"], &url("heap", &format!("{pid_q}&seconds=1"))).unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(RawProfile::parse(&delta).of(pid).count(), 0, "{delta}");
    let r = http_get_with(port, "/debug/pprof/heap?seconds=301", &bearer).unwrap();
    assert_eq!(r.status, 400, "{}", r.body);

    // Four profiles at once are made; a fifth is refused.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let bearer = bearer.clone();
            thread::spawn(move || http_get_with(port, "/debug/pprof/heap?seconds=3", &bearer))
        })
        .collect();
    thread::sleep(Duration::from_millis(1000));
    let fifth = http_get_with(port, "/debug/pprof/heap", &bearer).unwrap();
    assert_eq!(fifth.status, 503, "{}", fifth.body);
    for t in slow {
        assert_eq!(t.join().unwrap().unwrap().status, 200);
    }
    assert_eq!(
        http_get_with(port, "/debug/pprof/heap", &bearer)
            .unwrap()
            .status,
        200
    );

    drop(target);
    finish_trace(mp);
}

#[test]
fn sites_over_the_cap_are_summed_and_counted() {
    require_root();
    // Started before memprof and waiting: every allocation memprof sees is one of its 8192.
    let mut sites = Driven::start("sites", Command::new(fixture("sites")).arg("8192"));
    let pid = sites.proc.pid();
    // Frame pointers: each of the 8192 stacks whole, however fast they come.
    let (mp, port) = agent(&["--comm", "sites", "--unwind", "fp"]);
    sites.go("allocated");
    let url = format!("http://127.0.0.1:{port}/debug/pprof/heap?pid={pid}");
    // Every allocation taken: 4097 samples, and the last of the 8192 in the summed one (a
    // scrape may come while the agent still takes them from the ring).
    let raw = poll(Duration::from_secs(30), || {
        let raw = RawProfile::parse(&go_pprof(&["-raw"], &url).ok()?);
        let complete = raw.of(pid).count() == 4097
            && raw
                .of(pid)
                .any(|s| s.function == "[sites" && s.values.first() == Some(&4096));
        complete.then_some(raw)
    })
    .unwrap_or_else(|| {
        panic!(
            "no complete profile of pid {pid} (4097 samples, 4096 summed): {:?}\n{}",
            go_pprof(&["-raw"], &url).map(|r| {
                let raw = RawProfile::parse(&r);
                (raw.of(pid).count(), raw.pids(), raw.samples.len())
            }),
            mp.output_tail()
        )
    });
    // The first 4096 sites each hold their one block; the 4096 others are summed.
    let grabs: Vec<&RawSample> = raw.of(pid).filter(|s| s.function == "grab").collect();
    assert_eq!(grabs.len(), 4096);
    let odd: Vec<&&RawSample> = grabs
        .iter()
        .filter(|s| s.values != [1, 24, 1, 24])
        .collect();
    assert!(odd.is_empty(), "{odd:?}");
    let over: Vec<&RawSample> = raw
        .of(pid)
        // `[sites over cap]`: pprof lists the name in words.
        .filter(|s| s.function == "[sites")
        .collect();
    assert_eq!(over.len(), 1, "{raw:?}");
    assert_eq!(over[0].values, [4096, 4096 * 24, 4096, 4096 * 24]);
    assert_eq!(over[0].labels["allocator"], "any");
    // /metrics is refreshed every 500 ms.
    let counted = poll(Duration::from_secs(5), || {
        counter(port, "", "profile_sites_over_cap").filter(|n| *n == 4096)
    });
    assert_eq!(
        counted,
        Some(4096),
        "memprof_profile_sites_over_cap_total is {:?}",
        counter(port, "", "profile_sites_over_cap")
    );
    drop(sites.finish(Duration::from_secs(10)));
    finish_trace(mp);
}

#[test]
fn exited_processes_stay_until_a_scrape_saw_them() {
    require_root();
    // --comm needs a matching process running when memprof starts: a leaker waiting.
    let procs = fixture("procs");
    let mut anchor = Driven::start("procs leak", Command::new(procs).args(["leak", "1", "10"]));
    let (mp, port) = agent(&["--comm", "procs", "--unwind", "fp"]);
    anchor.go("leaked");
    let spin = |n: usize| {
        for _ in 0..n {
            let status = Command::new(procs).args(["spin", "0"]).status().unwrap();
            assert!(status.success());
        }
        thread::sleep(Duration::from_millis(500));
    };
    // 300 exited processes, more than the 256 kept without live endpoints: no scrape has seen
    // them, so every one is still there.
    spin(300);
    let url = format!("http://127.0.0.1:{port}/debug/pprof/heap?comm=procs");
    let first = RawProfile::parse(&go_pprof(&["-raw"], &url).unwrap());
    assert_eq!(first.pids().len(), 301, "300 exited and the anchor");
    let leaks = |raw: &RawProfile| -> usize {
        raw.samples
            .iter()
            .filter(|s| s.function == "spin_leak" && s.values == [1000, 32000, 1000, 32000])
            .count()
    };
    assert_eq!(leaks(&first), 300, "each: spin_leak 1000 x 32 B held");
    // Seen by that scrape, all but the 256 most recent are forgotten.
    let forgotten = |want: u64| {
        poll(Duration::from_secs(5), || {
            (counter(port, "", "forgotten_processes") == Some(want)).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "memprof_forgotten_processes_total is {:?}, not {want}",
                counter(port, "", "forgotten_processes")
            )
        })
    };
    forgotten(44);
    // 10 more: kept until the next scrape, which sees 266 exited; then 10 more go.
    spin(10);
    let second = RawProfile::parse(&go_pprof(&["-raw"], &url).unwrap());
    assert_eq!(second.pids().len(), 267);
    assert_eq!(leaks(&second), 266);
    assert!(second.pids().contains(&anchor.proc.pid()));
    forgotten(54);
    assert_eq!(counter(port, "", "forgotten_unscraped_processes"), Some(0));
    drop(anchor.finish(Duration::from_secs(10)));
    finish_trace(mp);
}

#[test]
fn prometheus_scrapes_a_token_protected_agent() {
    require_root();
    let dir = TempDir::new("agent-prometheus");
    let token_file = dir.0.join("token");
    fs::write(&token_file, "prom-t0ken\n").unwrap();
    let (mp, port) = agent(&["--http-token", token_file.to_str().unwrap()]);
    let target = start_target("steady", steady(), &["60"]);
    // One Prometheus with the token, one without.
    let with = Prometheus::start_with(port, Some(&token_file));
    let without = Prometheus::start(port);
    let health = |p: &Prometheus, want: &str| {
        poll(Duration::from_secs(30), || {
            let targets = p.api("/api/v1/targets");
            let t = targets["activeTargets"][0].clone();
            (t["health"] == want).then_some(t)
        })
        .unwrap_or_else(|| panic!("no {want} target: {}", p.api("/api/v1/targets")))
    };
    let up = health(&with, "up");
    assert_eq!(up["lastError"], "", "{up}");
    let down = health(&without, "down");
    assert!(
        down["lastError"].as_str().unwrap().contains("401"),
        "{down}"
    );
    // The agent's series: pid 0 stands for every traced process.
    let allocations = poll(Duration::from_secs(30), || {
        let r = with.query("memprof_allocations_total{pid=\"0\"}");
        let v: u64 = r.first()?["value"][1].as_str()?.parse().ok()?;
        (v >= 2).then_some(v)
    });
    assert!(allocations.is_some(), "{}", mp.output_tail());
    assert_eq!(with.value("memprof_up{pid=\"0\"}"), "1");
    assert_eq!(
        with.value("memprof_forgotten_unscraped_processes_total{pid=\"0\"}"),
        "0"
    );
    assert!(without.query("memprof_up").is_empty());
    drop(target);
    let (mut with, mut without) = (with, without);
    with.proc.stop(libc::SIGTERM, Duration::from_secs(10));
    without.proc.stop(libc::SIGTERM, Duration::from_secs(10));
    finish_trace(mp);
}
