//! End-to-end tests of Python frames on native allocations, with the real `memprof` binary,
//! real eBPF and the machine's CPython: allocations made through ctypes (libffi) and through a
//! C extension module built here carry the Python functions and lines that made them, with
//! exact bytes, when memprof spawns the interpreter and when it attaches to it by pid, with
//! frame-pointer and with CFI unwinding. The same ctypes allocations are checked on pyenv's
//! CPython 3.8 to 3.13 and on Debian forky's 3.14 and 3.15 inside a root of their own
//! (chroot; mount and pid namespaces; a venv), and an interpreter memprof does not read
//! (3.7) must say so in the report's `python` status. Phases named by Python function
//! (`--phase NAME=py:QUALNAME`): every number exact, spawned and by pid in a thread.
//!
//! Fixtures: tests/fixtures/pynative.py, pyleak.c and pyphases.py. Needs root, `cc`, a python3
//! with its headers (`MEMPROF_TEST_PYTHON` picks another interpreter), pyenv's 3.7 to 3.13 under
//! /root/.pyenv/versions, and mmdebstrap (`cargo xtask setup`) for the forky root, which the
//! first test that needs it builds under /var/cache/memprof-test/forky (`MEMPROF_FORKY_ROOT`):
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

// --- CPython 3.14 and 3.15 in a container root ------------------------------------------------

/// Where the Debian forky root with CPython 3.14 and 3.15 is kept between runs
/// (`MEMPROF_FORKY_ROOT` picks another).
const FORKY_ROOT: &str = "/var/cache/memprof-test/forky";
/// The interpreters the root is built with.
const FORKY_PYTHONS: &[&str] = &["python3.14", "python3.15"];

/// A Debian forky root holding `python3.14` and `python3.15` (their executables embed
/// libpython, as python-build-standalone's do), built with mmdebstrap on first use (about 2
/// minutes, 320 MB; `cargo xtask setup` installs mmdebstrap) and reused after. It is built
/// beside its final place and renamed there, so an interrupted build is never taken for one.
/// The fixture script is copied into it at /opt/memprof-test.
fn forky_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    require_root();
    ROOT.get_or_init(|| {
        let root = PathBuf::from(
            std::env::var("MEMPROF_FORKY_ROOT").unwrap_or_else(|_| FORKY_ROOT.to_string()),
        );
        let complete = |r: &Path| {
            FORKY_PYTHONS
                .iter()
                .all(|p| r.join("usr/bin").join(p).is_file())
        };
        if !complete(&root) {
            let partial = root.with_extension("partial");
            let _ = fs::remove_dir_all(&partial);
            fs::create_dir_all(root.parent().unwrap()).unwrap();
            let out = Command::new("mmdebstrap")
                .args([
                    "--variant=apt",
                    "--aptopt=Acquire::Check-Valid-Until \"false\"",
                    &format!("--include={}", FORKY_PYTHONS.join(",")),
                    "forky",
                ])
                .arg(&partial)
                .arg("http://deb.debian.org/debian")
                .output()
                .expect("mmdebstrap (cargo xtask setup installs it)");
            assert!(
                out.status.success() && complete(&partial),
                "mmdebstrap failed to build the forky root: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = fs::remove_dir_all(&root);
            fs::rename(&partial, &root).unwrap();
        }
        let dir = root.join("opt/memprof-test");
        fs::create_dir_all(&dir).unwrap();
        fs::copy(
            Path::new(FIXTURE_SRC).join("pynative.py"),
            dir.join("pynative.py"),
        )
        .unwrap();
        // A venv with its own copy of the interpreter (`--copies`, as on file systems without
        // symbolic links), at a path and under a name of its own.
        if !dir.join("venv315/bin/python").is_file() {
            let out = Command::new("chroot")
                .arg(&root)
                .args([
                    "python3.15",
                    "-m",
                    "venv",
                    "--without-pip",
                    "--copies",
                    "/opt/memprof-test/venv315",
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "venv: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        root
    })
}

/// The ctypes allocations of pynative.py run by `python` (`python3.14`) inside the forky root,
/// without its extension module: exact bytes, the Python frames in order with their lines, the
/// native frames of the call innermost, the frame outside the Python ones, and the report's
/// `python` status.
fn check_forky(c: &mut Checks, r: &Value, python: &str) {
    check_ctypes(c, r, python, true);
}

/// What [`check_forky`] checks, for `python` (`python3.11`); `forky`: Debian forky's build
/// (3.14+: layout from `_Py_DebugOffsets`, PyEval_EvalCode just outside the Python frames).
fn check_ctypes(c: &mut Checks, r: &Value, python: &str, forky: bool) {
    let text = fs::read_to_string(Path::new(FIXTURE_SRC).join("pynative.py")).unwrap();
    let line_of =
        |marker: &str| -> u64 { text.lines().position(|l| l.contains(marker)).unwrap() as u64 + 1 };
    let (ctypes_line, deep_line, descend_line) = (
        line_of("# LEAK_CTYPES_LINE"),
        line_of("# LEAK_DEEP_LINE"),
        line_of("# DESCEND_CALL_LINE"),
    );
    // The line that is exactly `text` (trimmed) of the script.
    let exact =
        |want: &str| -> u64 { text.lines().position(|l| l.trim() == want).unwrap() as u64 + 1 };
    let status = &r["python"];
    let minor = python.trim_start_matches("python");
    let from_debug_offsets = minor
        .split_once('.')
        .and_then(|(_, m)| m.parse::<u32>().ok())
        .is_some_and(|m| m >= 13);
    c.check(
        status["status"] == "ok"
            // 3.8 to 3.10 tell no micro version but in their file names: `3.9`.
            && status["version"]
                .as_str()
                .is_some_and(|v| v == minor || v.starts_with(&format!("{minor}.")))
            && status["reason"]
                == if from_debug_offsets {
                    "layout from the interpreter's _Py_DebugOffsets"
                } else {
                    "layout from memprof's table of the version"
                },
        format!("{python} status: {status}"),
    );
    for (function, line, call, bytes, allocs) in [
        (
            "leak_via_ctypes",
            ctypes_line,
            "leak_via_ctypes(3)",
            3333,
            3,
        ),
        ("descend", deep_line, "descend(20)", 2468, 2),
    ] {
        let (total, frames) = python_site(r, function);
        c.eq(
            &format!("{python} {function}: bytes, allocs"),
            total,
            (bytes, allocs),
        );
        let mut want = vec![(function.to_string(), line)];
        if function == "descend" {
            want.extend(std::iter::repeat_n(
                ("descend".to_string(), descend_line),
                19,
            ));
        }
        want.push(("main".to_string(), exact(call)));
        want.push(("<module>".to_string(), exact("main()")));
        c.eq(
            &format!("{python} {function}: Python frames"),
            python_frames(&frames),
            want,
        );
        // Native innermost: libffi's call of malloc, then Python.
        let first_py = frames.iter().position(|(k, _, _)| k == "python");
        let ffi = frames.iter().position(|(_, f, _)| f == "ffi_call");
        c.check(
            frames.first().is_some_and(|(k, _, _)| k == "native")
                && ffi.is_some_and(|at| first_py.is_some_and(|p| at < p)),
            format!(
                "{python} {function}: native frames (ffi_call) inside the Python ones: {frames:?}"
            ),
        );
        // All of them ran in one call of the eval loop, which PyEval_EvalCode made: the Python
        // frames sit just outside the eval loop's native frame (in the part GCC split off,
        // which the stripped executable's symbols do not name) and inside PyEval_EvalCode.
        let last_py = frames.iter().rposition(|(k, _, _)| k == "python");
        if !forky {
            continue;
        }
        c.eq(
            &format!("{python} {function}: the native frame outside the Python ones"),
            last_py
                .and_then(|p| frames.get(p + 1))
                .map(|(_, f, _)| f.as_str()),
            Some("PyEval_EvalCode"),
        );
    }
}

fn forky_spawned(python: &str) {
    forky_spawned_as(python, python);
}

/// pynative.py run by `program` inside the forky root, checked as CPython `python`.
fn forky_spawned_as(program: &str, python: &str) {
    let root = forky_root();
    let run = run_trace(
        &[
            "--json",
            "--duration",
            "60s",
            "--",
            "chroot",
            root.to_str().unwrap(),
            program,
            "/opt/memprof-test/pynative.py",
            "-",
        ],
        DEADLINE,
    );
    let r = final_report(&run);
    let mut c = Checks::new(format!("{program} in a forky root, spawned"));
    check_forky(&mut c, &r, python);
    c.finish(|| run.context());
}

#[test]
fn python_314_in_a_container_root_spawned() {
    forky_spawned("python3.14");
}

#[test]
fn python_315_in_a_container_root_spawned() {
    forky_spawned("python3.15");
}

#[test]
fn python_315_venv_in_a_container_root_spawned() {
    forky_spawned_as("/opt/memprof-test/venv315/bin/python", "python3.15");
}

/// A container of its own: new mount and pid namespaces with the forky root as their root, so
/// the interpreter numbers its threads from 1 and names its files from that root.
#[test]
fn python_314_in_container_namespaces() {
    let root = forky_root();
    let run = run_trace(
        &[
            "--json",
            "--duration",
            "60s",
            "--",
            "unshare",
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc=/proc",
            &format!("--root={}", root.display()),
            "python3.14",
            "/opt/memprof-test/pynative.py",
            "-",
        ],
        DEADLINE,
    );
    let r = final_report(&run);
    let mut c = Checks::new("python3.14 in mount and pid namespaces");
    let processes = r["processes"].as_array().cloned().unwrap_or_default();
    let python: Vec<&Value> = processes
        .iter()
        .filter(|p| p["comm"] == "python3.14")
        .collect();
    c.eq("python3.14 processes", python.len(), 1);
    if let Some(p) = python.first() {
        check_forky(&mut c, p, "python3.14");
    }
    c.finish(|| run.context());
}

#[test]
fn python_314_in_a_container_root_by_pid() {
    let root = forky_root();
    let mut target = Driven::start(
        "python3.14 pynative.py --wait in a forky root",
        Command::new("chroot").arg(root).args([
            "python3.14",
            "/opt/memprof-test/pynative.py",
            "-",
            "--wait",
        ]),
    );
    let mp = attach(&target.proc, &["--duration", "60s"]);
    target.go("done");
    let run = mp.finish(DEADLINE);
    let r = final_report(&run);
    let mut c = Checks::new("python3.14 in a forky root, by pid");
    check_forky(&mut c, &r, "python3.14");
    c.finish(|| run.context());
}

/// An interpreter memprof does not read (pyenv's 3.7) gets a status line that says why, and
/// its native allocations keep their native frames.
#[test]
fn python_unsupported_interpreter_says_why() {
    require_root();
    let python = "/root/.pyenv/versions/3.7.16/bin/python3.7";
    let python = std::env::var("MEMPROF_TEST_PYTHON37").unwrap_or_else(|_| python.to_string());
    assert!(Path::new(&python).is_file(), "no CPython 3.7 at {python}");
    let run = run_trace(
        &[
            "--json",
            "--duration",
            "60s",
            "--",
            &python,
            "-c",
            "import ctypes, time\n\
             libc = ctypes.CDLL('libc.so.6')\n\
             libc.malloc.restype = ctypes.c_void_p\n\
             time.sleep(0.3)\n\
             kept = [libc.malloc(43210) for _ in range(3)]\n\
             time.sleep(0.5)\n",
        ],
        DEADLINE,
    );
    let r = final_report(&run);
    let mut c = Checks::new("CPython 3.7: unsupported, said");
    c.eq(
        "python status",
        r["python"]["status"].as_str(),
        Some("unsupported"),
    );
    c.eq(
        "python version",
        r["python"]["version"].as_str(),
        Some("3.7"),
    );
    c.eq(
        "python reason",
        r["python"]["reason"].as_str(),
        Some("memprof reads CPython 3.8 and later"),
    );
    let groups: Vec<&Value> = leaks(&r)
        .iter()
        .filter(|g| stack(g).iter().any(|f| frame_fn(f) == Some("ffi_call")))
        .filter(|g| num(g, "bytes").is_multiple_of(43210))
        .collect();
    c.eq(
        "the ctypes allocations: bytes",
        groups.iter().map(|g| num(g, "bytes")).sum::<u64>(),
        3 * 43210,
    );
    c.check(
        groups.iter().all(|g| {
            stack(g)
                .iter()
                .all(|f| f["kind"] == "native" || f["kind"] == "unknown")
        }),
        "native frames only",
    );
    c.finish(|| run.context());
}

/// pyenv's CPython 3.8 to 3.13 (`/root/.pyenv/versions/3.X.*`), each attached to by pid while it
/// waits: the same exact facts as on 3.14 and 3.15.
#[test]
fn python_38_to_313_by_pid() {
    require_root();
    let script = Path::new(FIXTURE_SRC).join("pynative.py");
    let versions: Vec<PathBuf> = fs::read_dir("/root/.pyenv/versions")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    for minor in 8..=13 {
        let python = format!("python3.{minor}");
        let Some(exe) = versions
            .iter()
            .filter(|v| {
                v.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("3.{minor}.")))
            })
            .map(|v| v.join("bin").join(&python))
            .find(|exe| exe.is_file())
        else {
            panic!("no pyenv CPython 3.{minor} under /root/.pyenv/versions");
        };
        let mut target = Driven::start(
            &format!("{python} pynative.py - --wait"),
            Command::new(&exe).arg(&script).args(["-", "--wait"]),
        );
        let mp = attach(&target.proc, &["--duration", "60s"]);
        target.go("done");
        let run = mp.finish(DEADLINE);
        let r = final_report(&run);
        let mut c = Checks::new(format!("{python} (pyenv), by pid"));
        check_ctypes(&mut c, &r, &python, false);
        c.finish(|| run.context());
    }
}
