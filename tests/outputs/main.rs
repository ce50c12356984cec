//! End-to-end tests of the file outputs (`--pprof`, `--folded`, `--flamegraph`, `--dhat`,
//! `--csv`, `--html`), each checked by the tool that consumes it:
//!
//! | output | consumer |
//! | --- | --- |
//! | pprof | `go tool pprof -top`/`-raw` (Debian's Go) |
//! | folded, flamegraph | the line format itself; the SVGs parsed by Python's XML parser |
//! | DHAT | valgrind's own `--tool=dhat` file for the same program, compared field by field |
//! | CSV | an RFC 4180 reader |
//! | HTML | headless Chromium (screenshot and `--dump-dom`) |
//!
//! The fixture tests/fixtures/outputs.c is compiled at test time and traced once, in spawn mode
//! with all six flags; its header lists the exact numbers asserted here (leak_widgets leaks
//! 7 x 3000 B). The fixture is also run once under valgrind's DHAT.
//!
//! Needs root (eBPF), `cc`, `go`, `valgrind`, `chromium`, `python3` and `readelf`:
//! `sudo -E cargo test --release -p memprof-user --test outputs -- --test-threads=1` (about
//! 15 s). A test panics (never skips) when something is missing. Environment: `CC` (default
//! `cc`), `MEMPROF_TEST_CHROMIUM` (default `chromium`).

#[path = "../common/mod.rs"]
mod common;

mod csv;
mod dhat;
mod flame;
mod html;
mod pprof;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

use common::{
    DEADLINE, FP, SAFETY_NET, compile_c, final_report, require_root, run_trace, spawn_trace,
};
use serde_json::Value;

/// Passed to the fixture (which ignores it), to check escaping of the command everywhere.
const TAG: &str = "<i>x&y</i>";

/// The fixture's sites (see tests/fixtures/outputs.c).
const LEAK_FN: &str = "leak_widgets";
const LEAK_BYTES: u64 = 7 * 3000;
const LEAK_BLOCKS: u64 = 7;
const TABLES_BYTES: u64 = 2 * 5 * 700;
const CHURN_BYTES: u64 = 7 * 30 * 128;
const CHURN_BLOCKS: u64 = 7 * 30;
const SCRATCH_BYTES: u64 = 4 * 5000;
const TOTAL_ALLOCS: u64 = 223;
const TOTAL_BYTES: u64 = 74_880;
const TOTAL_FREES: u64 = 214;
const INUSE_BYTES: u64 = 28_000;
/// The fixture's functions and what each allocates: (function, bytes, blocks, in-use bytes,
/// in-use blocks).
const SITES: [(&str, u64, u64, u64, u64); 4] = [
    (LEAK_FN, LEAK_BYTES, LEAK_BLOCKS, LEAK_BYTES, LEAK_BLOCKS),
    ("leak_tables", TABLES_BYTES, 2, TABLES_BYTES, 2),
    ("churn_buffers", CHURN_BYTES, CHURN_BLOCKS, 0, 0),
    ("scratch_hold", SCRATCH_BYTES, 4, 0, 0),
];

fn work_dir() -> PathBuf {
    common::work_dir("memprof-outputs")
}

/// The compiled fixture (once per test process).
fn fixture() -> &'static Path {
    static FIXTURE: OnceLock<PathBuf> = OnceLock::new();
    FIXTURE.get_or_init(|| compile_c(&work_dir(), "outputs", "outputs.c", &[FP]))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn context(what: &str, out: &Output) -> String {
    format!(
        "{what} exited with {:?}\n--- stderr ---\n{}\n--- stdout ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

/// The one trace of the fixture with every file output.
struct Trace {
    dir: PathBuf,
    pid: u64,
    /// The final NDJSON report.
    report: Value,
}

impl Trace {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> String {
        let path = self.file(name);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    /// The report's verdict for the leak group whose innermost function is `function`.
    fn verdict(&self, function: &str) -> String {
        self.report["leaks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["stack"][0]["function"] == function)
            .and_then(|g| g["verdict"].as_str())
            .unwrap_or_else(|| panic!("no leak group for {function} in {}", self.report))
            .to_owned()
    }
}

fn trace() -> &'static Trace {
    static TRACE: OnceLock<Trace> = OnceLock::new();
    require_root();
    TRACE.get_or_init(|| {
        let dir = work_dir().join("trace");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let file = |name: &str| dir.join(name).to_str().unwrap().to_owned();
        let run = spawn_trace(
            &[
                "--sample-every",
                "100ms",
                "--phase",
                "scratch=scratch_hold",
                "--pprof",
                &file("profile.pb.gz"),
                "--folded",
                &file("stacks.folded"),
                "--flamegraph",
                &file("flame.svg"),
                "--dhat",
                &file("dhat.json"),
                "--csv",
                &file("sites.csv"),
                "--html",
                &file("report.html"),
            ],
            &[fixture().to_str().unwrap(), TAG],
        );
        let report = final_report(&run);
        let ctx = run.context();
        let pid = report["pid"].as_u64().unwrap();
        // The trace saw exactly the fixture's workload, so the files can be held to it.
        let totals = &report["totals"];
        for (key, want) in [
            ("allocs", TOTAL_ALLOCS),
            ("bytes_allocated", TOTAL_BYTES),
            ("frees", TOTAL_FREES),
            ("outstanding_bytes", INUSE_BYTES),
            ("lost_events", 0),
        ] {
            assert_eq!(totals[key], want, "totals.{key}\n{ctx}");
        }
        Trace { dir, pid, report }
    })
}

#[test]
fn unwritable_file_is_a_clear_error_and_others_are_written() {
    require_root();
    let dir = work_dir().join("errors");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("missing-dir").join("sites.csv");
    let good = dir.join("sites.folded");
    let run = run_trace(
        &[
            "--duration",
            SAFETY_NET,
            "--csv",
            bad.to_str().unwrap(),
            "--folded",
            good.to_str().unwrap(),
            "--",
            fixture().to_str().unwrap(),
        ],
        DEADLINE,
    );
    let ctx = run.context();
    assert!(!run.status.success(), "{ctx}");
    assert!(
        run.stderr
            .contains(&format!("failed to write {}", bad.display())),
        "{ctx}"
    );
    assert!(!run.stderr.contains("panicked"), "{ctx}");
    let folded = fs::read_to_string(&good).unwrap_or_default();
    assert!(folded.contains(";leak_widgets 21000"), "{folded}\n{ctx}");
}
