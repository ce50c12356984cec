//! End-to-end tests of `--unwind dwarf` with the real `memprof` binary and real eBPF: code built
//! without frame pointers gets whole, exact stacks, one group per call site.
//!
//! Fixtures: tests/fixtures/deep.c (a leak four calls deep, `-fomit-frame-pointer`) and
//! deepnew.cpp + deepnew_main.c (C++ `operator new` in a shared library without frame pointers);
//! tall.c (frame-pointer stacks 41 and 7 frames tall, for the kernel's windowed frame walk);
//! threads.c (four threads without frame pointers: each thread's stack top is learnt apart).
//! Needs root, `cc` and `c++`:
//! `cargo test --release -p memprof-user --test unwind -- --test-threads=1`.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use common::{
    Checks, Driven, FIXTURE_SRC, FP, Finished, attach, compile_with, final_report, frame_names,
    num, require_root, run_trace, site_groups, stack, work_dir,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(90);
/// Built without frame pointers unless told otherwise.
const NO_FP: &str = "-fomit-frame-pointer";

struct Fixtures {
    deep: PathBuf,
    deepnew: PathBuf,
    tall: PathBuf,
    threads: PathBuf,
}

fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    require_root();
    FIXTURES.get_or_init(|| {
        let dir = work_dir("memprof-unwind");
        let src = |name: &str| PathBuf::from(FIXTURE_SRC).join(name);
        let deep = dir.join("deep");
        compile_with("cc", &deep, &src("deep.c"), &[NO_FP]);
        compile_with(
            "c++",
            &dir.join("libdeepnew.so"),
            &src("deepnew.cpp"),
            &[NO_FP, "-fPIC", "-shared"],
        );
        let deepnew = dir.join("deepnew");
        let rpath = format!("-Wl,-rpath,{}", dir.display());
        compile_with(
            "cc",
            &deepnew,
            &src("deepnew_main.c"),
            &[NO_FP, "-L", dir.to_str().unwrap(), "-ldeepnew", &rpath],
        );
        let tall = dir.join("tall");
        compile_with("cc", &tall, &src("tall.c"), &[FP]);
        let threads = dir.join("threads");
        compile_with("cc", &threads, &src("threads.c"), &[NO_FP, "-pthread"]);
        Fixtures {
            deep,
            deepnew,
            tall,
            threads,
        }
    })
}

/// Function names of a group's frames, innermost first (`?` for a frame without one).
fn names(group: &Value) -> Vec<String> {
    frame_names(group).into_iter().map(String::from).collect()
}

/// Runs `memprof trace --json [opts] -- program` to the end: the run and its final report.
fn trace_spawned(opts: &[&str], program: &Path) -> (Finished, Value) {
    let mut args = vec!["--json", "--duration", "60s"];
    args.extend(opts);
    args.extend(["--", program.to_str().unwrap()]);
    let run = run_trace(&args, DEADLINE);
    let report = final_report(&run);
    (run, report)
}

/// The two chains of deep.c: each exactly one group, with every frame named down to main.
fn check_deep(c: &mut Checks, r: &Value) {
    let leaf = site_groups(r, "leaf_alloc");
    c.eq("groups at leaf_alloc (one per call chain)", leaf.len(), 2);
    for (outer, bytes, allocs) in [("outer_a", 1200, 12), ("outer_b", 1500, 5)] {
        let chain: Vec<&&Value> = leaf
            .iter()
            .filter(|g| names(g).get(3).map(String::as_str) == Some(outer))
            .collect();
        c.eq(&format!("groups through {outer}"), chain.len(), 1);
        let Some(g) = chain.first() else { continue };
        c.eq(
            &format!("{outer}: bytes, allocs"),
            (num(g, "bytes"), num(g, "allocs")),
            (bytes, allocs),
        );
        let n = names(g);
        c.eq(
            &format!("{outer}: innermost five frames"),
            n.iter().take(5).cloned().collect::<Vec<_>>(),
            ["leaf_alloc", "inner", "middle", outer, "main"]
                .map(String::from)
                .to_vec(),
        );
        let kinds: Vec<&str> = stack(g).iter().filter_map(|f| f["kind"].as_str()).collect();
        c.check(
            kinds.iter().all(|k| *k == "native"),
            format!("{outer}: every frame native, none unknown: {kinds:?} {n:?}"),
        );
    }
    c.eq("no churn group", site_groups(r, "churn").len(), 0);
    c.eq("lost events", num(&r["totals"], "lost_events"), 0);
    c.check(
        r["unwind"]["allocations"].as_u64().unwrap_or(0) >= 10017,
        format!("every allocation unwound: {}", r["unwind"]),
    );
}

#[test]
fn dwarf_unwinds_a_deep_chain_without_frame_pointers() {
    let f = fixtures();
    let (run, r) = trace_spawned(&["--unwind", "dwarf"], &f.deep);
    let mut c = Checks::new("--unwind dwarf, spawned");
    check_deep(&mut c, &r);
    c.finish(|| run.context());
}

#[test]
fn dwarf_unwinds_when_attached_by_pid() {
    let f = fixtures();
    let mut target = Driven::start("deep --wait", Command::new(&f.deep).arg("--wait"));
    let mp = attach(&target.proc, &["--unwind", "dwarf", "--duration", "60s"]);
    target.go("done");
    mp.signal(libc::SIGINT);
    let run = mp.finish(DEADLINE);
    drop(target);
    let r = final_report(&run);
    let mut c = Checks::new("--unwind dwarf, by pid");
    check_deep(&mut c, &r);
    c.finish(|| run.context());
}

#[test]
fn dwarf_unwinds_operator_new_in_a_library_without_frame_pointers() {
    let f = fixtures();
    let (run, r) = trace_spawned(&["--unwind", "dwarf"], &f.deepnew);
    let mut c = Checks::new("operator new without frame pointers");
    let leaf = site_groups(&r, "cxx_leaf");
    c.eq("groups at cxx_leaf", leaf.len(), 1);
    if let Some(g) = leaf.first() {
        c.eq(
            "bytes, allocs",
            (num(g, "bytes"), num(g, "allocs")),
            (7 * 48, 7),
        );
        c.eq(
            "innermost four frames",
            names(g).into_iter().take(4).collect::<Vec<_>>(),
            ["cxx_leaf", "cxx_mid(int)", "cxx_entry", "main"]
                .map(String::from)
                .to_vec(),
        );
    }
    c.finish(|| run.context());
}

#[test]
fn frame_pointer_mode_loses_the_chain_dwarf_restores() {
    // The same fixture without --unwind dwarf: the kernel's frame-pointer walk stops or goes
    // wrong after the leaf, which is why dwarf exists. Guards against a test fixture that
    // accidentally kept frame pointers.
    let f = fixtures();
    let (run, r) = trace_spawned(&[], &f.deep);
    let intact = site_groups(&r, "leaf_alloc").iter().any(|g| {
        names(g).iter().take(5).map(String::as_str).eq([
            "leaf_alloc",
            "inner",
            "middle",
            "outer_a",
            "main",
        ])
    });
    assert!(
        !intact,
        "frame pointers walked the chain: the fixture has frame pointers\n{}",
        run.context()
    );
}

/// Frame pointers: the kernel walks tall stacks whole, frames small (40 x `climb`, several per
/// copied window of stack) and large (6 x `bulky`, each larger than a window).
#[test]
fn frame_pointer_walk_follows_tall_stacks() {
    let f = fixtures();
    let (run, r) = trace_spawned(&[], &f.tall);
    let mut c = Checks::new("frame pointers, tall stacks");
    let leaf = site_groups(&r, "tall_leaf");
    c.eq("groups at tall_leaf", leaf.len(), 2);
    for (middle, depth, bytes, allocs) in [("climb", 40, 861, 7), ("bulky", 6, 12000, 3)] {
        let chain: Vec<&&Value> = leaf
            .iter()
            .filter(|g| names(g).get(1).map(String::as_str) == Some(middle))
            .collect();
        c.eq(&format!("groups through {middle}"), chain.len(), 1);
        let Some(g) = chain.first() else { continue };
        c.eq(
            &format!("{middle}: bytes, allocs"),
            (num(g, "bytes"), num(g, "allocs")),
            (bytes, allocs),
        );
        let mut want = vec!["tall_leaf".to_string()];
        want.extend(std::iter::repeat_n(middle.to_string(), depth));
        want.push("main".to_string());
        let n = names(g);
        c.eq(
            &format!("{middle}: innermost {} frames", depth + 2),
            n.iter().take(depth + 2).cloned().collect::<Vec<_>>(),
            want,
        );
    }
    c.eq("lost events", num(&r["totals"], "lost_events"), 0);
    c.finish(|| run.context());
}

/// `--unwind dwarf` with four threads built without frame pointers: the copies of each thread's
/// stack end at that stack's top (learnt per thread), and the leak is unwound through `worker`
/// with no frame cut short.
#[test]
fn dwarf_unwinds_each_thread_on_its_own_stack() {
    let f = fixtures();
    let (run, r) = trace_spawned(&["--unwind", "dwarf"], &f.threads);
    let mut c = Checks::new("--unwind dwarf, threads");
    let leak = site_groups(&r, "thread_leak");
    c.eq("groups at thread_leak", leak.len(), 1);
    if let Some(g) = leak.first() {
        c.eq(
            "thread_leak: bytes, allocs",
            (num(g, "bytes"), num(g, "allocs")),
            (4 * 250 * 48, 4 * 250),
        );
        c.eq(
            "thread_leak: second frame",
            names(g).get(1).cloned(),
            Some("worker".to_string()),
        );
        let kinds: Vec<&str> = stack(g).iter().filter_map(|f| f["kind"].as_str()).collect();
        c.check(
            kinds.iter().all(|k| *k == "native"),
            format!("every frame native: {kinds:?} {:?}", names(g)),
        );
    }
    c.eq("lost events", num(&r["totals"], "lost_events"), 0);
    c.eq("stacks lost", num(&r["kernel"], "stack_lost"), 0);
    c.finish(|| run.context());
}
