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

mod common;

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use common::{
    DEADLINE, FIXTURE_SRC, FP, Finished, check_compiled, compiler, final_report, pid_trace,
    require_root, run_trace, spawn_trace, start_target, work_dir,
};
use serde_json::Value;

const JEMALLOC_A: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.a";

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
        let dir = work_dir("memprof-allocator-fixtures");
        let src = Path::new(FIXTURE_SRC);
        // Compiled in parallel.
        let jobs: Vec<_> = BUILDS
            .iter()
            .map(|(name, cc, source, flags)| {
                let mut cmd = compiler(cc, &dir.join(name), &src.join(source), &[FP]);
                cmd.args(*flags)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped());
                let what = format!("{cmd:?}");
                let child = cmd
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
                (what, child)
            })
            .collect();
        for (what, child) in jobs {
            check_compiled(&what, child.wait_with_output());
        }
        dir
    });
    dir.join(name)
}

/// `memprof trace --json -- program`, to the end.
fn spawn_run(program: &Path) -> Finished {
    spawn_trace(&[], &[program])
}

/// Pid mode: start `program --wait`, attach once it is ready, release it with SIGUSR1; the
/// fixture must exit 0.
fn pid_run(program: &Path) -> Finished {
    let (run, target) = pid_trace(&program.display().to_string(), program, &["--wait"], &[]);
    assert_eq!(
        target.code(),
        Some(0),
        "fixture failed\n{}",
        target.context()
    );
    run
}

/// The innermost frame's function without a C++ `()` suffix.
fn site_of(group: &Value) -> Option<String> {
    let f = group["stack"].get(0)?["function"].as_str()?;
    Some(f.strip_suffix("()").unwrap_or(f).to_string())
}

fn check(run: &Finished, sites: &[(&str, u64, u64)], spawn: bool) -> Value {
    let report = final_report(run);
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
fn allocators(run: &Finished) -> Vec<(String, String, bool)> {
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

fn main_allocator(run: &Finished) -> (String, String, bool) {
    allocators(run)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no allocators\n{}", run.context()))
}

fn probes_of(run: &Finished, index: usize) -> Vec<String> {
    run.start()["allocators"][index]["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Spawn mode of fixture `name`: exactly `sites`, and `main` (file name, kind, static) first
/// among the start record's allocators.
fn spawn_case(name: &str, sites: &[(&str, u64, u64)], main: (&str, &str, bool)) -> Finished {
    let run = spawn_run(&fixture(name));
    check(&run, sites, true);
    assert_eq!(
        main_allocator(&run),
        (main.0.to_string(), main.1.to_string(), main.2),
        "{}",
        run.context()
    );
    run
}

/// Pid mode of fixture `name`: exactly `sites`.
fn pid_case(name: &str, sites: &[(&str, u64, u64)]) -> Finished {
    let run = pid_run(&fixture(name));
    check(&run, sites, false);
    run
}

#[test]
fn glibc_spawn_and_pid() {
    let run = spawn_case("glibc", C_SITES, ("libc.so.6", "glibc", false));
    assert_eq!(allocators(&run).len(), 1, "{}", run.context());
    let run = pid_case("glibc", C_SITES);
    assert_eq!(main_allocator(&run).1, "glibc");
}

#[test]
fn glibc_static_spawn_and_pid() {
    spawn_case("glibc_static", C_SITES, ("glibc_static", "glibc", true));
    pid_case("glibc_static", C_SITES);
}

#[test]
fn stripped_static_binary_is_a_clear_error() {
    let exe = fixture("glibc_static_stripped");
    let expected = format!(
        "memprof: {} is a static binary without symbols; memprof needs its symbol table to \
         find malloc",
        exe.display()
    );
    let run = spawn_run(&exe);
    assert_eq!(run.code(), Some(1), "{}", run.context());
    assert_eq!(run.stderr.trim(), expected, "{}", run.context());
    assert!(run.stdout.is_empty(), "{}", run.context());

    let target = start_target("glibc_static_stripped --wait", &exe, &["--wait"]);
    let pid = target.pid().to_string();
    let out = run_trace(&["--json", "--pid", &pid], DEADLINE);
    drop(target);
    assert_eq!(out.code(), Some(1), "{}", out.context());
    assert_eq!(out.stderr.trim(), expected, "{}", out.context());
}

#[test]
fn jemalloc_spawn_and_pid() {
    let run = spawn_case("jemalloc", C_SITES, ("libjemalloc.so.2", "jemalloc", false));
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
    let run = pid_case("jemalloc", C_SITES);
    assert_eq!(main_allocator(&run).1, "jemalloc");
}

#[test]
fn jemalloc_linked_into_executable() {
    spawn_case(
        "jemalloc_linked_in",
        C_SITES,
        ("jemalloc_linked_in", "jemalloc", true),
    );
    pid_case("jemalloc_linked_in", C_SITES);
}

#[test]
fn tcmalloc_spawn() {
    spawn_case(
        "tcmalloc",
        C_SITES,
        ("libtcmalloc_minimal.so.4", "tcmalloc", false),
    );
}

#[test]
fn mimalloc_spawn() {
    spawn_case("mimalloc", C_SITES, ("libmimalloc.so.2", "mimalloc", false));
}

#[test]
fn musl_static_spawn_and_pid() {
    spawn_case("musl_static", C_SITES, ("musl_static", "musl", true));
    pid_case("musl_static", C_SITES);
}

#[test]
fn musl_dynamic_spawn_and_pid() {
    spawn_case(
        "musl_dynamic",
        C_SITES,
        ("ld-musl-x86_64.so.1", "musl", false),
    );
    pid_case("musl_dynamic", C_SITES);
}

#[test]
fn cxx_tcmalloc_new_delete() {
    let run = spawn_run(&fixture("cxx_tcmalloc"));
    check(&run, CXX_SITES, true);
    let probes = probes_of(&run, 0);
    assert!(probes.iter().any(|p| p == "_Znwm"), "{probes:?}");
    pid_case("cxx_tcmalloc", CXX_SITES);
}

#[test]
fn cxx_jemalloc_delete_forwarding_to_free_counts_once() {
    let run = spawn_run(&fixture("cxx_jemalloc"));
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
    check(&spawn_run(&fixture("cxx_mimalloc")), CXX_SITES, true);
}

/// libstdc++'s operator new calls malloc and has no frame pointer: it is probed itself, so the
/// stack starts at the site (a walk from malloc would skip the site's frame).
#[test]
fn cxx_glibc_new_delete() {
    let run = spawn_run(&fixture("cxx_glibc"));
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
