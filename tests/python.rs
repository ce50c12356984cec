//! End-to-end tests of Python frames on native allocations, with the real `memprof` binary,
//! real eBPF and the machine's CPython: allocations made through ctypes (libffi) and through a
//! C extension module built here carry the Python functions and lines that made them, with
//! exact bytes, when memprof spawns the interpreter and when it attaches to it by pid, with
//! frame-pointer and with CFI unwinding; and phases named by Python function
//! (`--phase NAME=py:QUALNAME`), every number exact, spawned and by pid in a thread.
//!
//! Fixtures: tests/fixtures/pynative.py, pyleak.c and pyphases.py. Needs root, `cc`, and a python3 with its
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

// ---------------------------------------------------------------------------------------------
// Phases named by Python function (`--phase NAME=py:QUALNAME`), on tests/fixtures/pyphases.py
// ---------------------------------------------------------------------------------------------

/// One phase as the report must show it: (name, allocs, frees, bytes_allocated, bytes_freed,
/// net_bytes, peak_net_bytes, outstanding_bytes, outstanding_allocs), from the fixture's hand
/// count (see its docstring). phase_load's blocks are bytearrays the interpreter frees at exit:
/// none outstanding at the end.
type PyPhaseFact = (&'static str, u64, u64, u64, u64, i64, i64, u64, u64);
const PY_PHASES: [PyPhaseFact; 4] = [
    ("build", 7, 3, 471_004, 220_002, 251_002, 321_003, 51_000, 2),
    ("load", 3, 1, 300_003, 100_001, 200_002, 300_003, 0, 0),
    ("render", 2, 1, 100_000, 50_000, 50_000, 100_000, 50_000, 1),
    ("compress", 2, 1, 71_001, 70_001, 1_000, 71_001, 1_000, 1),
];

/// The `--phase` options: a bare name, a method by its class, a function by its module.
const PY_PHASE_ARGS: [&str; 8] = [
    "--phase",
    "build=py:phase_build",
    "--phase",
    "load=py:phase_load",
    "--phase",
    "render=py:Renderer.phase_render",
    "--phase",
    "compress=py:pyphases.phase_compress",
];

fn pyphases_script() -> PathBuf {
    Path::new(FIXTURE_SRC).join("pyphases.py")
}

fn check_py_phases(c: &mut Checks, r: &Value) {
    let phases = r["phases"].as_array().cloned().unwrap_or_default();
    c.eq(
        "phases: names and kinds, in --phase order",
        phases
            .iter()
            .map(|p| (p["name"].as_str(), p["kind"].as_str()))
            .collect::<Vec<_>>(),
        PY_PHASES
            .iter()
            .map(|f| (Some(f.0), Some("python")))
            .collect::<Vec<_>>(),
    );
    for (p, f) in phases.iter().zip(PY_PHASES) {
        let got = (
            p["name"].as_str().unwrap_or("?"),
            p["allocs"].as_u64().unwrap_or(u64::MAX),
            p["frees"].as_u64().unwrap_or(u64::MAX),
            p["bytes_allocated"].as_u64().unwrap_or(u64::MAX),
            p["bytes_freed"].as_u64().unwrap_or(u64::MAX),
            p["net_bytes"].as_i64().unwrap_or(i64::MIN),
            p["peak_net_bytes"].as_i64().unwrap_or(i64::MIN),
            p["outstanding_bytes"].as_u64().unwrap_or(u64::MAX),
            p["outstanding_allocs"].as_u64().unwrap_or(u64::MAX),
        );
        c.eq(&format!("phase {}", f.0), got, f);
        c.eq(
            &format!("phase {}: entries", f.0),
            p["entries"].as_u64(),
            Some(1),
        );
    }
    // The outer phase was active whenever an inner one was: its peak of the process's
    // outstanding bytes is the highest.
    let peak = |i: usize| {
        phases
            .get(i)
            .and_then(|p| p["peak_outstanding_bytes"].as_u64())
    };
    c.check(
        (1..4).all(|i| peak(i) <= peak(0)) && peak(0) >= Some(321_003),
        format!(
            "peak_outstanding_bytes: build's is the highest and at least its own peak net: {:?}",
            (0..4).map(peak).collect::<Vec<_>>()
        ),
    );
}

/// Spawned: each phase's allocs, frees, bytes, net, running peak and outstanding bytes exactly
/// as the fixture's hand count (native allocations through ctypes and inside libc's strdup
/// included); the outer phase counts its inner ones' calls.
#[test]
fn python_phases_spawned_exact() {
    let fx = fixture();
    let script = pyphases_script();
    let mut args: Vec<&str> = vec!["--json", "--duration", "60s"];
    args.extend(PY_PHASE_ARGS);
    args.extend(["--", fx.python.to_str().unwrap(), script.to_str().unwrap()]);
    let run = run_trace(&args, DEADLINE);
    let r = final_report(&run);
    let mut c = Checks::new("Python phases, spawned");
    check_py_phases(&mut c, &r);
    c.finish(|| run.context());
}

/// Attached by pid, the build running in a second thread: the same numbers.
#[test]
fn python_phases_by_pid_in_a_thread_exact() {
    let fx = fixture();
    let mut target = Driven::start(
        "python pyphases.py --wait --thread",
        Command::new(&fx.python)
            .arg(pyphases_script())
            .args(["--wait", "--thread"]),
    );
    let mut opts = vec!["--duration", "60s"];
    opts.extend(PY_PHASE_ARGS);
    let mp = attach(&target.proc, &opts);
    target.go("done");
    let run = mp.finish(DEADLINE);
    let r = final_report(&run);
    let mut c = Checks::new("Python phases, by pid, in a thread");
    check_py_phases(&mut c, &r);
    c.finish(|| run.context());
}

/// Bad names: a Python name that is no qualified name, and a Python function given as a
/// native one to a wrapper script that runs the interpreter (the message names the
/// interpreter, not the wrapper, and says how to write it): one `memprof: ` line, exit 1.
#[test]
fn python_phase_bad_names_fail_cleanly() {
    let fx = fixture();
    let script = pyphases_script();
    let dir = work_dir("memprof-pyphase-wrapper");
    let wrapper = dir.join("python3");
    fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec {} \"$@\"\n", fx.python.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let real = fs::canonicalize(&fx.python).unwrap();
    for (spec, program, says) in [
        (
            "render=py:9render",
            &fx.python,
            "invalid --phase \"render=py:9render\": \"9render\" is not a Python qualified name"
                .to_string(),
        ),
        (
            "render=phase_render",
            &wrapper,
            format!(
                "phase render: function phase_render not found in {}",
                real.display()
            ),
        ),
    ] {
        let run = run_trace(
            &[
                "--phase",
                spec,
                "--",
                program.to_str().unwrap(),
                script.to_str().unwrap(),
            ],
            DEADLINE,
        );
        let lines: Vec<&str> = run.stderr.lines().filter(|l| !l.is_empty()).collect();
        let mut c = Checks::new(format!("--phase {spec}"));
        c.eq("exit status", run.code(), Some(1));
        c.check(
            lines.len() == 1 && lines[0].starts_with("memprof: ") && lines[0].contains(&says),
            format!("one memprof: line saying {says:?}: {lines:?}"),
        );
        if spec == "render=phase_render" {
            c.check(
                lines.first().is_some_and(|l| {
                    l.ends_with("is a Python interpreter; for a Python function write --phase render=py:phase_render")
                        && !l.contains(wrapper.to_str().unwrap())
                }),
                format!("names the interpreter, not the wrapper, and says what to write: {lines:?}"),
            );
        }
        c.finish(|| run.context());
    }
}

/// Ten builds of tests/fixtures/pybuilds.py saved with `--output`, then `memprof trend`: the
/// Python site `cache_pages` grows by 4000 B per run (within 1%), r² 1, and is the only
/// growing site; `load_config` holds 3000 B in every run; `--fail-on-growth 3900` fails (exit
/// 3) and 4100 passes.
#[test]
fn python_builds_trend_finds_the_leaking_function() {
    let fx = fixture();
    let script = Path::new(FIXTURE_SRC).join("pybuilds.py");
    let dir = work_dir("memprof-pybuilds");
    let reports: Vec<PathBuf> = (0..10)
        .map(|i| {
            let path = dir.join(format!("build-{i}.json"));
            let _ = fs::remove_file(&path);
            let run = run_trace(
                &[
                    "--json",
                    "--duration",
                    "60s",
                    "--output",
                    path.to_str().unwrap(),
                    "--",
                    fx.python.to_str().unwrap(),
                    script.to_str().unwrap(),
                    &i.to_string(),
                ],
                DEADLINE,
            );
            assert_eq!(run.code(), Some(0), "build {i}\n{}", run.context());
            path
        })
        .collect();
    let trend = |opts: &[&str]| {
        let mut cmd = Command::new(common::MEMPROF);
        cmd.arg("trend").args(&reports).args(opts);
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = trend(&["--json"]);
    let mut c = Checks::new("trend of ten Python builds");
    c.eq("exit status", code, Some(0));
    c.eq("stderr (complete reports: no warning)", stderr.as_str(), "");
    let t: Value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    let sites = t["sites"].as_array().cloned().unwrap_or_default();
    // A site holding a Python frame of `function`, summed over the sites that do.
    let python_site = |function: &str| -> Vec<&Value> {
        sites
            .iter()
            .filter(|s| {
                s["stack"]
                    .as_array()
                    .is_some_and(|st| st.iter().any(|f| f.as_str() == Some(function)))
            })
            .collect()
    };
    let cache = python_site("cache_pages");
    c.eq("sites under cache_pages", cache.len(), 1);
    if let Some(s) = cache.first() {
        let bytes: Vec<Option<u64>> = s["bytes"]
            .as_array()
            .map(|b| b.iter().map(Value::as_u64).collect())
            .unwrap_or_default();
        c.eq(
            "cache_pages: bytes per run",
            bytes,
            (0..10u64).map(|i| Some(4000 * (i + 1))).collect::<Vec<_>>(),
        );
        let slope = s["slope_bytes_per_run"].as_f64().unwrap_or(f64::NAN);
        c.check(
            (slope - 4000.0).abs() <= 40.0,
            format!("cache_pages slope {slope} is 4000 B/run within 1%"),
        );
        c.eq(
            "cache_pages verdict",
            s["verdict"].as_str(),
            Some("growing"),
        );
    }
    let config = python_site("load_config");
    c.eq("sites under load_config", config.len(), 1);
    if let Some(s) = config.first() {
        c.eq(
            "load_config: bytes per run",
            s["bytes"].as_array().cloned().unwrap_or_default(),
            vec![Value::from(3000u64); 10],
        );
        c.eq("load_config verdict", s["verdict"].as_str(), Some("stable"));
    }
    let growing: Vec<&Value> = sites.iter().filter(|s| s["verdict"] == "growing").collect();
    c.eq("growing sites", growing.len(), 1);
    c.check(
        growing.first().is_some_and(|g| {
            g["stack"]
                .as_array()
                .is_some_and(|st| st.iter().any(|f| f.as_str() == Some("cache_pages")))
        }),
        "the growing site is cache_pages'".to_string(),
    );
    let (strict, _, strict_err) = trend(&["--fail-on-growth", "3900"]);
    c.eq("--fail-on-growth 3900: exit status", strict, Some(3));
    c.check(
        strict_err.lines().filter(|l| !l.is_empty()).count() == 1
            && strict_err.starts_with("memprof: 1 site(s) grow by more than 3900 B per run"),
        format!("the gate says why in one line: {strict_err:?}"),
    );
    let (lax, _, _) = trend(&["--fail-on-growth", "4100"]);
    c.eq("--fail-on-growth 4100: exit status", lax, Some(0));
    c.finish(|| format!("{stdout}\n{stderr}"));
}
