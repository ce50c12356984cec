//! End-to-end tests of Python frames on native allocations, with the real `memprof` binary,
//! real eBPF and the machine's CPython: allocations made through ctypes (libffi) and through a
//! C extension module built here carry the Python functions and lines that made them, with
//! exact bytes, when memprof spawns the interpreter and when it attaches to it by pid, with
//! frame-pointer and with CFI unwinding.
//!
//! Fixtures: tests/fixtures/pynative.py and pyleak.c. Needs root, `cc`, and a python3 with its
//! headers (`MEMPROF_TEST_PYTHON` picks another interpreter):
//! `cargo test --release -p memprof-user --test python -- --test-threads=1`.

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use common::{
    Checks, Driven, FIXTURE_SRC, attach, compile_with, final_report, frame_fn, leaks, num, python,
    python_query, require_root, run_trace, stack, work_dir,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(90);

struct Fixture {
    python: PathBuf,
    script: PathBuf,
    /// Directory holding the built `pyleak` extension module.
    ext_dir: PathBuf,
    /// Lines of the allocating calls in the script, and of `descend`'s call to itself.
    ctypes_line: u64,
    extension_line: u64,
    deep_line: u64,
    descend_line: u64,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    require_root();
    FIXTURE.get_or_init(|| {
        let python = python();
        let include = python_query(
            &python,
            "import sysconfig; print(sysconfig.get_paths()['include'])",
        );
        let suffix = python_query(
            &python,
            "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))",
        );
        // Are the interpreter's headers (in `include`) installed? Without them this fails.
        let ext_dir = work_dir("memprof-python");
        compile_with(
            "cc",
            &ext_dir.join(format!("pyleak{suffix}")),
            &Path::new(FIXTURE_SRC).join("pyleak.c"),
            &["-shared", "-fPIC", "-I", &include],
        );
        let script = Path::new(FIXTURE_SRC).join("pynative.py");
        let text = fs::read_to_string(&script).unwrap();
        let line_of = |marker: &str| -> u64 {
            text.lines()
                .position(|l| l.contains(marker))
                .unwrap_or_else(|| panic!("no {marker}")) as u64
                + 1
        };
        Fixture {
            ctypes_line: line_of("# LEAK_CTYPES_LINE"),
            extension_line: line_of("# LEAK_EXTENSION_LINE"),
            deep_line: line_of("# LEAK_DEEP_LINE"),
            descend_line: line_of("# DESCEND_CALL_LINE"),
            python,
            script,
            ext_dir,
        }
    })
}

/// A frame as (kind, function, line).
type Shown = (String, String, u64);

/// The groups holding a Python frame `function` (summed: bytes, allocs) and the first such
/// group's frames.
fn python_site(r: &Value, function: &str) -> ((u64, u64), Vec<Shown>) {
    let mut total = (0, 0);
    let mut first = None;
    for g in leaks(r) {
        let frames: Vec<Shown> = stack(g)
            .iter()
            .map(|f| {
                (
                    f["kind"].as_str().unwrap_or("").to_string(),
                    frame_fn(f).unwrap_or("?").to_string(),
                    f["line"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        if frames
            .iter()
            .any(|(k, f, _)| k == "python" && f == function)
        {
            total = (total.0 + num(g, "bytes"), total.1 + num(g, "allocs"));
            first.get_or_insert(frames);
        }
    }
    (total, first.unwrap_or_default())
}

/// The Python frames of a group, innermost first, as (function, line).
fn python_frames(frames: &[Shown]) -> Vec<(String, u64)> {
    frames
        .iter()
        .filter(|(k, _, _)| k == "python")
        .map(|(_, f, l)| (f.clone(), *l))
        .collect()
}

/// `whole`: the native part of the stacks is whole (tables or dwarf, not frame pointers), so
/// the Python frames' place among native ones is checked too.
fn check(c: &mut Checks, r: &Value, fx: &Fixture, whole: bool) {
    for (function, line, bytes, allocs) in [
        ("leak_via_ctypes", fx.ctypes_line, 3333, 3),
        ("leak_via_extension", fx.extension_line, 8888, 4),
    ] {
        let (total, frames) = python_site(r, function);
        c.eq(
            &format!("{function}: bytes, allocs"),
            total,
            (bytes, allocs),
        );
        let py = python_frames(&frames);
        c.eq(
            &format!("{function}: innermost Python frames"),
            py.iter()
                .take(2)
                .map(|(f, l)| (f.as_str(), *l))
                .collect::<Vec<_>>(),
            vec![(function, line), ("main", py.get(1).map_or(0, |p| p.1))],
        );
        c.check(
            py.last().is_some_and(|(f, _)| f == "<module>"),
            format!("{function}: the outermost Python frame is <module>: {py:?}"),
        );
        if whole {
            // The native code the Python function called, then the eval loop's frame that ran
            // it, then the Python frames.
            let first_py = frames
                .iter()
                .position(|(k, _, _)| k == "python")
                .unwrap_or(0);
            let eval = frames
                .iter()
                .position(|(_, f, _)| f == "_PyEval_EvalFrameDefault");
            c.check(
                first_py > 0 && eval == Some(first_py - 1),
                format!("{function}: native, then the eval loop, then Python: {frames:?}"),
            );
        }
    }
    // 20 frames of `descend`: more than one read of the interpreter's data stack (3.11+).
    let (total, frames) = python_site(r, "descend");
    c.eq("descend: bytes, allocs", total, (2468, 2));
    let mut want = vec![("descend".to_string(), fx.deep_line)];
    want.extend(std::iter::repeat_n(
        ("descend".to_string(), fx.descend_line),
        19,
    ));
    want.push((
        "main".to_string(),
        python_frames(&frames).get(20).map_or(0, |p| p.1),
    ));
    want.push((
        "<module>".to_string(),
        python_frames(&frames).get(21).map_or(0, |p| p.1),
    ));
    c.eq("descend: Python frames", python_frames(&frames), want);
    let (_, ext) = python_site(r, "leak_via_extension");
    c.check(
        ext.first()
            .is_some_and(|(k, f, _)| k == "native" && f == "native_block"),
        format!("the extension's allocation starts at its C function: {ext:?}"),
    );
}

fn spawned(unwind: &str) {
    let fx = fixture();
    let run = run_trace(
        &[
            "--json",
            "--unwind",
            unwind,
            "--duration",
            "60s",
            "--",
            fx.python.to_str().unwrap(),
            fx.script.to_str().unwrap(),
            fx.ext_dir.to_str().unwrap(),
        ],
        DEADLINE,
    );
    let r = final_report(&run);
    let mut c = Checks::new(format!("Python frames, spawned, --unwind {unwind}"));
    check(&mut c, &r, fx, unwind != "fp");
    c.finish(|| run.context());
}

#[test]
fn python_frames_on_native_allocations_spawned() {
    spawned("fp");
}

#[test]
fn python_frames_on_native_allocations_spawned_tables() {
    spawned("tables");
}

#[test]
fn python_frames_on_native_allocations_spawned_dwarf() {
    spawned("dwarf");
}

#[test]
fn python_frames_on_native_allocations_by_pid() {
    let fx = fixture();
    let mut target = Driven::start(
        "python pynative.py --wait",
        Command::new(&fx.python)
            .arg(&fx.script)
            .arg(&fx.ext_dir)
            .arg("--wait"),
    );
    let mp = attach(&target.proc, &["--duration", "60s"]);
    target.go("done");
    let run = mp.finish(DEADLINE);
    let r = final_report(&run);
    let mut c = Checks::new("Python frames, by pid");
    check(&mut c, &r, fx, true);
    c.finish(|| run.context());
}
