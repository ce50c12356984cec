//! End-to-end tests of allocator detection: one workload (tests/fixtures/allocators.c, and
//! allocators_cxx.cpp for `operator new`/`delete`) built against glibc, static glibc, musl
//! (static and dynamic), jemalloc (shared and linked statically), tcmalloc and mimalloc, traced
//! by the real `memprof` binary in spawn and pid mode. Each run must report exactly the
//! fixture's documented leaks, nothing at the churn site, no lost events and (spawn mode) no
//! unmatched frees: a free seen twice, as when `operator delete` forwards to a probed `free`,
//! shows up there.
//!
//! Needs root, `cc`, `c++`, `musl-gcc` and the Debian packages libjemalloc-dev,
//! libgoogle-perftools-dev (libtcmalloc_minimal), libmimalloc-dev and musl-tools:
//! `cargo test --release -p memprof-user --test allocators -- --test-threads=1`. A test panics
//! (never skips) when something is missing.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{OnceLock, mpsc},
    thread,
    time::Duration,
};

use serde_json::Value;

const MEMPROF: &str = env!("CARGO_BIN_EXE_memprof");
const FIXTURE_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
const JEMALLOC_A: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.a";
const TIMEOUT: Duration = Duration::from_secs(60);

/// allocators.c: (function, outstanding bytes, blocks) at exit.
const C_SITES: &[(&str, u64, u64)] = &[
    ("leak_site", 9 * 1234, 9),
    ("calloc_site", 3 * 7 * 111, 3),
    ("realloc_site", 2 * 3000, 2),
];
/// allocators_cxx.cpp: new char[1234] x 9, new Node (48 B) x 5.
const CXX_SITES: &[(&str, u64, u64)] = &[("leak_site", 9 * 1234, 9), ("object_site", 5 * 48, 5)];
/// Sites that free everything they allocate.
const CHURN: &str = "churn_site";

fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "these tests load eBPF programs and need root");
}

/// A fixture build: (file name, compiler, source, flags).
const BUILDS: &[(&str, &str, &str, &[&str])] = &[
    ("glibc", "cc", "allocators.c", &[]),
    ("glibc_static", "cc", "allocators.c", &["-static"]),
    (
        "glibc_static_stripped",
        "cc",
        "allocators.c",
        &["-static", "-s"],
    ),
    ("jemalloc", "cc", "allocators.c", &["-ljemalloc"]),
    (
        "jemalloc_linked_in",
        "cc",
        "allocators.c",
        &[JEMALLOC_A, "-lpthread", "-lm", "-ldl"],
    ),
    ("tcmalloc", "cc", "allocators.c", &["-ltcmalloc_minimal"]),
    ("mimalloc", "cc", "allocators.c", &["-lmimalloc"]),
    ("musl_static", "musl-gcc", "allocators.c", &["-static"]),
    ("musl_dynamic", "musl-gcc", "allocators.c", &[]),
    ("cxx_glibc", "c++", "allocators_cxx.cpp", &[]),
    (
        "cxx_tcmalloc",
        "c++",
        "allocators_cxx.cpp",
        &["-ltcmalloc_minimal"],
    ),
    ("cxx_jemalloc", "c++", "allocators_cxx.cpp", &["-ljemalloc"]),
    ("cxx_mimalloc", "c++", "allocators_cxx.cpp", &["-lmimalloc"]),
];

/// Compiles every fixture once per test process.
fn fixture(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    require_root();
    let dir = DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("memprof-allocator-fixtures");
        fs::create_dir_all(&dir).unwrap();
        let src = Path::new(FIXTURE_SRC);
        // Compiled in parallel.
        let jobs: Vec<_> = BUILDS
            .iter()
            .map(|(name, cc, source, flags)| {
                let out = dir.join(name);
                let mut cmd = Command::new(cc);
                cmd.args(["-O2", "-g", "-Wall", "-fno-omit-frame-pointer", "-o"])
                    .arg(&out)
                    .arg(src.join(source))
                    .args(*flags)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                let what = format!("{cmd:?}");
                let child = cmd
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
                (what, child)
            })
            .collect();
        for (what, child) in jobs {
            let res = child
                .wait_with_output()
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                res.status.success(),
                "compiling a fixture failed ({what}):\n{}",
                String::from_utf8_lossy(&res.stderr)
            );
        }
        dir
    });
    dir.join(name)
}

struct Run {
    what: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn context(&self) -> String {
        format!(
            "{} exited {:?}\n--- stderr ---\n{}\n--- stdout ---\n{}",
            self.what,
            self.code,
            self.stderr,
            &self.stdout[..self.stdout.len().min(20_000)]
        )
    }

    fn records(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{}", self.context()))
            })
            .collect()
    }

    fn start(&self) -> Value {
        let r = self.records();
        assert_eq!(
            r.first().map(|v| &v["type"]),
            Some(&Value::from("start")),
            "{}",
            self.context()
        );
        r[0].clone()
    }

    fn report(&self) -> Value {
        assert_eq!(self.code, Some(0), "memprof failed\n{}", self.context());
        let r = self.records();
        let last = r
            .last()
            .unwrap_or_else(|| panic!("no records\n{}", self.context()));
        assert_eq!(last["type"], "report", "{}", self.context());
        last.clone()
    }
}

/// Waits for `child` with a deadline, killing it when it passes.
fn finish(mut child: Child, what: String) -> Run {
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out = thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err = thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(TIMEOUT) {
        Ok(s) => s.unwrap(),
        Err(_) => {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{what} did not finish within {TIMEOUT:?}");
        }
    };
    Run {
        what,
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn spawn_trace(program: &Path) -> Run {
    let child = Command::new(MEMPROF)
        .args(["trace", "--json", "--duration", "40s", "--"])
        .arg(program)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start memprof");
    finish(child, format!("memprof trace -- {}", program.display()))
}

/// Pid mode: start `program --wait`, attach once it is ready, release it with SIGUSR1.
fn pid_trace(program: &Path) -> Run {
    let mut target = Command::new(program)
        .arg("--wait")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fixture");
    let mut line = String::new();
    BufReader::new(target.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "ready",
        "{} did not get ready",
        program.display()
    );
    let pid = target.id();
    let mut mp = Command::new(MEMPROF)
        .args([
            "trace",
            "--json",
            "--duration",
            "40s",
            "--pid",
            &pid.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start memprof");
    // Wait for `memprof: tracing pid`, then release the target; keep the rest of stderr.
    let mut err = BufReader::new(mp.stderr.take().unwrap());
    let mut head = String::new();
    loop {
        let mut l = String::new();
        if err.read_line(&mut l).unwrap_or(0) == 0 {
            break;
        }
        head.push_str(&l);
        if l.starts_with("memprof: tracing pid ") {
            break;
        }
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
    let rest = thread::spawn(move || std::io::read_to_string(err).unwrap_or_default());
    let status = target.wait().unwrap();
    assert!(status.success(), "fixture failed: {status:?}\n{head}");
    // Give memprof's stderr back to `finish` through a pipe-less path.
    let mut run = finish_without_stderr(mp, format!("memprof trace --pid ({})", program.display()));
    run.stderr = head + &rest.join().unwrap();
    run
}

fn finish_without_stderr(mut child: Child, what: String) -> Run {
    let stdout = child.stdout.take().unwrap();
    let out = thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(TIMEOUT) {
        Ok(s) => s.unwrap(),
        Err(_) => {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{what} did not finish within {TIMEOUT:?}");
        }
    };
    Run {
        what,
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: String::new(),
    }
}

/// The innermost frame's function without a C++ `()` suffix.
fn site_of(group: &Value) -> Option<String> {
    let f = group["stack"].get(0)?["function"].as_str()?;
    Some(f.strip_suffix("()").unwrap_or(f).to_string())
}

fn check(run: &Run, sites: &[(&str, u64, u64)], spawn: bool) -> Value {
    let report = run.report();
    let ctx = || run.context();
    let leaks = report["leaks"].as_array().expect("leaks");
    for (site, bytes, allocs) in sites {
        let groups: Vec<&Value> = leaks
            .iter()
            .filter(|g| site_of(g).as_deref() == Some(*site))
            .collect();
        let sum = |k: &str| groups.iter().map(|g| g[k].as_u64().unwrap()).sum::<u64>();
        assert_eq!(
            (sum("bytes"), sum("allocs")),
            (*bytes, *allocs),
            "{site}: outstanding bytes and blocks\n{}",
            ctx()
        );
    }
    assert!(
        !leaks.iter().any(|g| site_of(g).as_deref() == Some(CHURN)),
        "{CHURN} frees everything it allocates\n{}",
        ctx()
    );
    let totals = &report["totals"];
    assert_eq!(totals["lost_events"], 0, "lost events\n{}", ctx());
    if spawn {
        assert_eq!(
            totals["unmatched_frees"],
            0,
            "every free in spawn mode matches an allocation (a free seen twice would not)\n{}",
            ctx()
        );
    }
    report
}

/// The start record's allocator objects as (file name, kind, static).
fn allocators(run: &Run) -> Vec<(String, String, bool)> {
    run.start()["allocators"]
        .as_array()
        .unwrap_or_else(|| panic!("start.allocators\n{}", run.context()))
        .iter()
        .map(|a| {
            let path = a["path"].as_str().unwrap();
            let file = Path::new(path)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (
                file,
                a["kind"].as_str().unwrap().to_string(),
                a["static"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn main_allocator(run: &Run) -> (String, String, bool) {
    allocators(run)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no allocators\n{}", run.context()))
}

fn probes_of(run: &Run, index: usize) -> Vec<String> {
    run.start()["allocators"][index]["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn glibc_spawn_and_pid() {
    let exe = fixture("glibc");
    let run = spawn_trace(&exe);
    check(&run, C_SITES, true);
    assert_eq!(
        main_allocator(&run),
        ("libc.so.6".into(), "glibc".into(), false)
    );
    assert_eq!(allocators(&run).len(), 1, "{}", run.context());
    let run = pid_trace(&exe);
    check(&run, C_SITES, false);
    assert_eq!(main_allocator(&run).1, "glibc");
}

#[test]
fn glibc_static_spawn_and_pid() {
    let exe = fixture("glibc_static");
    let run = spawn_trace(&exe);
    check(&run, C_SITES, true);
    assert_eq!(
        main_allocator(&run),
        ("glibc_static".into(), "glibc".into(), true)
    );
    let run = pid_trace(&exe);
    check(&run, C_SITES, false);
}

#[test]
fn stripped_static_binary_is_a_clear_error() {
    let exe = fixture("glibc_static_stripped");
    let expected = format!(
        "memprof: {} is a static binary without symbols; memprof needs its symbol table to \
         find malloc",
        exe.display()
    );
    let run = spawn_trace(&exe);
    assert_eq!(run.code, Some(1), "{}", run.context());
    assert_eq!(run.stderr.trim(), expected, "{}", run.context());
    assert!(run.stdout.is_empty(), "{}", run.context());

    let mut target = Command::new(&exe)
        .arg("--wait")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(target.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let out = Command::new(MEMPROF)
        .args(["trace", "--json", "--pid", &target.id().to_string()])
        .output()
        .unwrap();
    let _ = target.kill();
    let _ = target.wait();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), expected);
}

#[test]
fn jemalloc_spawn_and_pid() {
    let exe = fixture("jemalloc");
    let run = spawn_trace(&exe);
    check(&run, C_SITES, true);
    assert_eq!(
        main_allocator(&run),
        ("libjemalloc.so.2".into(), "jemalloc".into(), false)
    );
    assert!(
        allocators(&run).iter().any(|a| a.1 == "glibc"),
        "libc is probed too\n{}",
        run.context()
    );
    let probes = probes_of(&run, 0);
    for f in [
        "malloc", "free", "calloc", "realloc", "mallocx", "rallocx", "sdallocx", "dallocx",
    ] {
        assert!(
            probes.iter().any(|p| p == f),
            "jemalloc probes {probes:?} lack {f}"
        );
    }
    let run = pid_trace(&exe);
    check(&run, C_SITES, false);
    assert_eq!(main_allocator(&run).1, "jemalloc");
}

#[test]
fn jemalloc_linked_into_executable() {
    let exe = fixture("jemalloc_linked_in");
    let run = spawn_trace(&exe);
    check(&run, C_SITES, true);
    assert_eq!(
        main_allocator(&run),
        ("jemalloc_linked_in".into(), "jemalloc".into(), true)
    );
    let run = pid_trace(&exe);
    check(&run, C_SITES, false);
}

#[test]
fn tcmalloc_spawn() {
    let run = spawn_trace(&fixture("tcmalloc"));
    check(&run, C_SITES, true);
    assert_eq!(
        main_allocator(&run),
        ("libtcmalloc_minimal.so.4".into(), "tcmalloc".into(), false)
    );
}

#[test]
fn mimalloc_spawn() {
    let run = spawn_trace(&fixture("mimalloc"));
    check(&run, C_SITES, true);
    assert_eq!(
        main_allocator(&run),
        ("libmimalloc.so.2".into(), "mimalloc".into(), false)
    );
}

#[test]
fn musl_static_spawn_and_pid() {
    let exe = fixture("musl_static");
    let run = spawn_trace(&exe);
    check(&run, C_SITES, true);
    assert_eq!(
        main_allocator(&run),
        ("musl_static".into(), "musl".into(), true)
    );
    let run = pid_trace(&exe);
    check(&run, C_SITES, false);
}

#[test]
fn musl_dynamic_spawn_and_pid() {
    let exe = fixture("musl_dynamic");
    let run = spawn_trace(&exe);
    check(&run, C_SITES, true);
    assert_eq!(
        main_allocator(&run),
        ("ld-musl-x86_64.so.1".into(), "musl".into(), false)
    );
    let run = pid_trace(&exe);
    check(&run, C_SITES, false);
}

#[test]
fn cxx_tcmalloc_new_delete() {
    let exe = fixture("cxx_tcmalloc");
    let run = spawn_trace(&exe);
    check(&run, CXX_SITES, true);
    let probes = probes_of(&run, 0);
    assert!(probes.iter().any(|p| p == "_Znwm"), "{probes:?}");
    let run = pid_trace(&exe);
    check(&run, CXX_SITES, false);
}

#[test]
fn cxx_jemalloc_delete_forwarding_to_free_counts_once() {
    let run = spawn_trace(&fixture("cxx_jemalloc"));
    check(&run, CXX_SITES, true);
    let start = run.start();
    let forwards = &start["allocators"][0]["forwards"];
    assert!(
        forwards
            .as_array()
            .is_some_and(|f| f.iter().any(|p| p[0] == "_ZdlPv" && p[1] == "free")),
        "jemalloc's operator delete jumps to free and is not probed itself: {forwards}"
    );
    // `delete` of a Node is the sized `_ZdlPvm`, which jemalloc implements itself.
    assert!(probes_of(&run, 0).iter().any(|p| p == "_ZdlPvm"));
}

#[test]
fn cxx_mimalloc_new_delete() {
    check(&spawn_trace(&fixture("cxx_mimalloc")), CXX_SITES, true);
}

/// libstdc++'s operator new calls malloc and has no frame pointer: it is probed itself, so the
/// stack starts at the site (a walk from malloc would skip the site's frame).
#[test]
fn cxx_glibc_new_delete() {
    let run = spawn_trace(&fixture("cxx_glibc"));
    check(&run, CXX_SITES, true);
    assert!(
        allocators(&run)
            .iter()
            .any(|a| a.0 == "libstdc++.so.6" && a.1 == "c++"),
        "{}",
        run.context()
    );
    assert_eq!(main_allocator(&run).1, "glibc");
}
