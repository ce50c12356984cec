//! End-to-end tests of unwinding code built without frame pointers with the real `memprof`
//! binary and real eBPF: the default `--unwind tables` (the kernel walks with tables built from
//! CFI) and `--unwind dwarf` (stack copies unwound by memprof) give whole, exact stacks, one
//! group per call site; `--unwind fp` does not.
//!
//! Fixtures: tests/fixtures/deep.c (a leak four calls deep, `-fomit-frame-pointer`) and
//! deepnew.cpp + deepnew_main.c (C++ `operator new` in a shared library without frame pointers);
//! tall.c (frame-pointer stacks 41 and 7 frames tall, for the kernel's windowed frame walk);
//! threads.c (four threads without frame pointers: each thread's stack top is learnt apart);
//! deepopen.c (loads libdeepnew.so with dlopen mid-run: code the tables learn of late).
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
    deepopen: PathBuf,
    libdeepnew: PathBuf,
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
        let deepopen = dir.join("deepopen");
        compile_with("cc", &deepopen, &src("deepopen.c"), &[NO_FP, "-ldl"]);
        Fixtures {
            deep,
            deepnew,
            tall,
            threads,
            deepopen,
            libdeepnew: dir.join("libdeepnew.so"),
        }
    })
}

/// Function names of a group's frames, innermost first (`?` for a frame without one).
fn names(group: &Value) -> Vec<String> {
    frame_names(group).into_iter().map(String::from).collect()
}

/// Runs `memprof trace --json [opts] -- program` to the end: the run and its final report.
fn trace_spawned(opts: &[&str], program: &Path) -> (Finished, Value) {
    trace_spawned_args(opts, program, &[])
}

/// `trace_spawned` with arguments for the program.
fn trace_spawned_args(opts: &[&str], program: &Path, program_args: &[&str]) -> (Finished, Value) {
    let mut args = vec!["--json", "--duration", "60s"];
    args.extend(opts);
    args.extend(["--", program.to_str().unwrap()]);
    args.extend(program_args);
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
        r["unwind"]["allocations"].as_u64().unwrap_or(0) >= 12017,
        format!("every allocation unwound: {}", r["unwind"]),
    );
}

/// With tables, the kernel's walks of every allocation reached the entry: all bytes end there
/// (walked in the kernel, or copied and unwound by memprof where the tables were behind).
fn check_whole(c: &mut Checks, r: &Value) {
    let u = &r["unwind"];
    c.eq("unwind mode", u["mode"].as_str(), Some("tables"));
    let ends = u["tables"]["ends"].as_object().cloned().unwrap_or_default();
    let stopped: Vec<&String> = ends.keys().filter(|k| !k.starts_with("entry")).collect();
    c.check(stopped.is_empty(), format!("walks that stopped early: {u}"));
    c.eq(
        "entry share",
        u["tables"]["entry_share"].as_f64(),
        Some(1.0),
    );
}

#[test]
fn tables_unwind_a_deep_chain_without_frame_pointers_by_default() {
    let f = fixtures();
    let (run, r) = trace_spawned(&[], &f.deep);
    let mut c = Checks::new("default mode (tables), spawned");
    check_deep(&mut c, &r);
    check_whole(&mut c, &r);
    // Five distinct stacks (two chains, the churn loop, held's chain, stdio's buffer): each is
    // walked at least once, and at most once per CPU that ran it; every other walk is reused.
    // outer_b's first walk starts from the same return address and stack pointer as outer_a's
    // (equal frames), so the chains' exact counts above say the reuse checks the stack's words.
    // held_leaf saves a different rbp in each of its 2000 calls, which no row computes from:
    // its walks are reused too (a check of every word read would refuse all 2000).
    let allocs = num(&r["unwind"], "allocations");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let reused = num(&r["unwind"]["tables"], "cached_walks");
    c.check(
        reused <= allocs - 5 && reused >= allocs - 5 * cpus,
        format!("walks reused: {reused} of {allocs} (5 stacks, {cpus} CPUs)"),
    );
    c.finish(|| run.context());
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
    deep_by_pid("dwarf");
}

#[test]
fn tables_unwind_when_attached_by_pid() {
    deep_by_pid("tables");
}

/// deep.c traced by pid with `--unwind MODE`: both chains whole.
fn deep_by_pid(mode: &str) {
    let f = fixtures();
    let mut target = Driven::start("deep --wait", Command::new(&f.deep).arg("--wait"));
    let mp = attach(&target.proc, &["--unwind", mode, "--duration", "60s"]);
    target.go("done");
    mp.signal(libc::SIGINT);
    let run = mp.finish(DEADLINE);
    drop(target);
    let r = final_report(&run);
    let mut c = Checks::new(format!("--unwind {mode}, by pid"));
    check_deep(&mut c, &r);
    if mode == "tables" {
        check_whole(&mut c, &r);
    }
    c.finish(|| run.context());
}

#[test]
fn dwarf_unwinds_operator_new_in_a_library_without_frame_pointers() {
    let f = fixtures();
    let (run, r) = trace_spawned(&["--unwind", "dwarf"], &f.deepnew);
    let mut c = Checks::new("operator new without frame pointers, dwarf");
    check_deepnew(&mut c, &r);
    c.finish(|| run.context());
}

#[test]
fn tables_unwind_operator_new_in_a_library_without_frame_pointers() {
    let f = fixtures();
    let (run, r) = trace_spawned(&[], &f.deepnew);
    let mut c = Checks::new("operator new without frame pointers, tables");
    check_deepnew(&mut c, &r);
    check_whole(&mut c, &r);
    c.finish(|| run.context());
}

/// A library loaded with dlopen mid-run, by a command memprof started: it stops at the load
/// until its table is in, and the allocations right after have whole stacks.
#[test]
fn tables_unwind_a_library_loaded_mid_run() {
    let f = fixtures();
    let (run, r) = trace_spawned_args(&[], &f.deepopen, &[f.libdeepnew.to_str().unwrap()]);
    let mut c = Checks::new("dlopen mid-run, spawned");
    check_deepnew(&mut c, &r);
    check_whole(&mut c, &r);
    c.finish(|| run.context());
}

/// The same, attached by pid: memprof does not stop a process it did not start, so the walks
/// that meet the new library before its table is in go out as stack copies; either way every
/// stack is whole. deepopen lives on until the trace ends: memprof unwinds a copy with the
/// process's mappings, which a process that exits at once takes with it (such stacks end early,
/// and the report counts them).
#[test]
fn tables_unwind_a_library_loaded_mid_run_by_pid() {
    let f = fixtures();
    let mut target = Driven::start(
        "deepopen --wait",
        Command::new(&f.deepopen).arg(&f.libdeepnew).arg("--wait"),
    );
    let mp = attach(&target.proc, &["--duration", "60s"]);
    target.go("done");
    mp.signal(libc::SIGINT);
    let run = mp.finish(DEADLINE);
    drop(target);
    let r = final_report(&run);
    let mut c = Checks::new("dlopen mid-run, by pid");
    check_deepnew(&mut c, &r);
    check_whole(&mut c, &r);
    c.finish(|| run.context());
}

/// deepnew's one leak: 7 x 48 bytes three calls into the library, then main. Innermost comes
/// `cxx_leaf`, or `operator new` when the C++ library came with `dlopen` (memprof then probes
/// only the C library's `malloc`, which `operator new` calls).
fn check_deepnew(c: &mut Checks, r: &Value) {
    let leaf: Vec<&Value> = r["leaks"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter(|g| names(g).iter().any(|n| n == "cxx_leaf"))
        .collect();
    c.eq("groups through cxx_leaf", leaf.len(), 1);
    if let Some(g) = leaf.first() {
        c.eq(
            "bytes, allocs",
            (num(g, "bytes"), num(g, "allocs")),
            (7 * 48, 7),
        );
        let n = names(g);
        let at = n.iter().position(|f| f == "cxx_leaf").unwrap_or(0);
        c.check(
            n[..at].iter().all(|f| f.starts_with("operator new")),
            format!("only operator new inside cxx_leaf: {n:?}"),
        );
        c.eq(
            "four frames from cxx_leaf",
            n.iter().skip(at).take(4).cloned().collect::<Vec<_>>(),
            ["cxx_leaf", "cxx_mid(int)", "cxx_entry", "main"]
                .map(String::from)
                .to_vec(),
        );
    }
}

#[test]
fn frame_pointer_mode_loses_the_chain() {
    // The same fixture with --unwind fp: the kernel's frame-pointer walk stops or goes wrong
    // after the leaf, which is why the other modes exist. Guards against a test fixture that
    // accidentally kept frame pointers.
    let f = fixtures();
    let (run, r) = trace_spawned(&["--unwind", "fp"], &f.deep);
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
    let (run, r) = trace_spawned(&["--unwind", "fp"], &f.tall);
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
    threads("dwarf");
}

/// With tables, each thread's walk ends at its start in `clone3`, the outermost frame.
#[test]
fn tables_unwind_each_thread_to_its_start() {
    threads("tables");
}

fn threads(mode: &str) {
    let f = fixtures();
    // Four threads allocating flat out on two cores: the stack copies of `--unwind dwarf`
    // come faster than the agent unwinds them, so that mode gets a ring that holds the whole
    // burst in its first half, past which copies are dropped (what this test checks is each
    // thread's stack, not the agent's speed): the largest ring. With 256 MiB, 2 runs in 32
    // lost 206 and 3932 stacks.
    let mut opts = vec!["--unwind", mode];
    if mode == "dwarf" {
        opts.extend(["--ring-bytes", "1073741824"]);
    }
    let (run, r) = trace_spawned(&opts, &f.threads);
    let mut c = Checks::new(format!("--unwind {mode}, threads"));
    if mode == "tables" {
        check_whole(&mut c, &r);
    }
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
