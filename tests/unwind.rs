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
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use common::{
    Checks, FIXTURE_SRC, Finished, Proc, STARTUP, final_report, frame_fn, frame_names, leaks,
    memprof_trace, num, require_root, spawn_with_stdin, stack,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(90);

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
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("memprof-unwind");
        fs::create_dir_all(&dir).unwrap();
        let src = Path::new(FIXTURE_SRC);
        let build = |compiler: &str, args: &[&str]| {
            let mut cmd = Command::new(compiler);
            cmd.current_dir(&dir).args(["-O2", "-g"]);
            if !args.contains(&"-fno-omit-frame-pointer") {
                cmd.arg("-fomit-frame-pointer");
            }
            cmd.args(args);
            let res = cmd
                .output()
                .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
            assert!(
                res.status.success(),
                "{cmd:?} failed:\n{}",
                String::from_utf8_lossy(&res.stderr)
            );
        };
        let deep = dir.join("deep");
        build(
            "cc",
            &[
                "-o",
                deep.to_str().unwrap(),
                src.join("deep.c").to_str().unwrap(),
            ],
        );
        build(
            "c++",
            &[
                "-fPIC",
                "-shared",
                "-o",
                dir.join("libdeepnew.so").to_str().unwrap(),
                src.join("deepnew.cpp").to_str().unwrap(),
            ],
        );
        let deepnew = dir.join("deepnew");
        let rpath = format!("-Wl,-rpath,{}", dir.display());
        build(
            "cc",
            &[
                "-o",
                deepnew.to_str().unwrap(),
                src.join("deepnew_main.c").to_str().unwrap(),
                "-L",
                dir.to_str().unwrap(),
                "-ldeepnew",
                &rpath,
            ],
        );
        let tall = dir.join("tall");
        build(
            "cc",
            &[
                "-fno-omit-frame-pointer",
                "-o",
                tall.to_str().unwrap(),
                src.join("tall.c").to_str().unwrap(),
            ],
        );
        let threads = dir.join("threads");
        build(
            "cc",
            &[
                "-pthread",
                "-o",
                threads.to_str().unwrap(),
                src.join("threads.c").to_str().unwrap(),
            ],
        );
        let deepopen = dir.join("deepopen");
        build(
            "cc",
            &[
                "-o",
                deepopen.to_str().unwrap(),
                src.join("deepopen.c").to_str().unwrap(),
                "-ldl",
            ],
        );
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

/// Groups whose innermost frame is `function`.
fn groups<'a>(r: &'a Value, function: &str) -> Vec<&'a Value> {
    r["leaks"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter(|g| stack(g).first().and_then(frame_fn) == Some(function))
        .collect()
}

/// Runs `memprof trace --json [opts] -- program` to the end: the run and its final report.
fn trace_spawned(opts: &[&str], program: &Path) -> (Finished, Value) {
    let program = program.to_str().unwrap();
    let mut args = vec!["--json", "--duration", "60s"];
    args.extend(opts);
    args.extend(["--", program]);
    let run = Proc::spawn(
        format!("memprof trace {}", args.join(" ")),
        &mut memprof_trace(&args),
    )
    .finish(DEADLINE);
    let report = final_report(&run);
    (run, report)
}

/// The two chains of deep.c: each exactly one group, with every frame named down to main.
fn check_deep(c: &mut Checks, r: &Value) {
    let leaf = groups(r, "leaf_alloc");
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
    c.eq("no churn group", groups(r, "churn").len(), 0);
    c.eq("lost events", num(&r["totals"], "lost_events"), 0);
    c.check(
        r["unwind"]["allocations"].as_u64().unwrap_or(0) >= 10017,
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
    let (mut target, mut stdin) =
        spawn_with_stdin("deep --wait", Command::new(&f.deep).arg("--wait"));
    target.expect_stdout_line("ready");
    let pid = target.pid().to_string();
    let mp = Proc::spawn(
        format!("memprof trace --unwind {mode} --pid"),
        &mut memprof_trace(&[
            "--json",
            "--unwind",
            mode,
            "--pid",
            &pid,
            "--duration",
            "60s",
        ]),
    );
    let deadline = Instant::now() + STARTUP;
    assert!(
        mp.err
            .wait_line(deadline, |l| l.starts_with("memprof: tracing "))
            .is_some(),
        "memprof did not start\n{}",
        mp.output_so_far()
    );
    stdin.write_all(b"go\n").unwrap();
    stdin.flush().unwrap();
    let deadline = Instant::now() + STARTUP;
    assert!(
        target
            .out
            .wait_line(deadline, |l| l.starts_with("done"))
            .is_some()
    );
    mp.signal(libc::SIGINT);
    let run = mp.finish(DEADLINE);
    drop(stdin);
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
    let lib = f.libdeepnew.to_str().unwrap();
    let program = f.deepopen.to_str().unwrap();
    let args = ["--json", "--duration", "60s", "--", program, lib];
    let run = Proc::spawn(
        format!("memprof trace {}", args.join(" ")),
        &mut memprof_trace(&args),
    )
    .finish(DEADLINE);
    let r = final_report(&run);
    let mut c = Checks::new("dlopen mid-run, spawned");
    check_deepnew(&mut c, &r);
    check_whole(&mut c, &r);
    c.finish(|| run.context());
}

/// The same, attached by pid: memprof does not stop a process it did not start, so the walks
/// that meet the new library before its table is in go out as stack copies; either way every
/// stack is whole.
#[test]
fn tables_unwind_a_library_loaded_mid_run_by_pid() {
    let f = fixtures();
    let (mut target, mut stdin) = spawn_with_stdin(
        "deepopen --wait",
        Command::new(&f.deepopen).arg(&f.libdeepnew).arg("--wait"),
    );
    target.expect_stdout_line("ready");
    let pid = target.pid().to_string();
    let mp = Proc::spawn(
        "memprof trace --pid",
        &mut memprof_trace(&["--json", "--pid", &pid, "--duration", "60s"]),
    );
    let deadline = Instant::now() + STARTUP;
    assert!(
        mp.err
            .wait_line(deadline, |l| l.starts_with("memprof: tracing "))
            .is_some(),
        "memprof did not start\n{}",
        mp.output_so_far()
    );
    stdin.write_all(b"go\n").unwrap();
    stdin.flush().unwrap();
    let deadline = Instant::now() + STARTUP;
    assert!(
        target
            .out
            .wait_line(deadline, |l| l.starts_with("done"))
            .is_some()
    );
    drop(stdin);
    let run = mp.finish(DEADLINE);
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
    let leaf: Vec<&Value> = leaks(r)
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
    let intact = groups(&r, "leaf_alloc").iter().any(|g| {
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
    let leaf = groups(&r, "tall_leaf");
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
    let (run, r) = trace_spawned(&["--unwind", mode], &f.threads);
    let mut c = Checks::new(format!("--unwind {mode}, threads"));
    if mode == "tables" {
        check_whole(&mut c, &r);
    }
    let leak = groups(&r, "thread_leak");
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
