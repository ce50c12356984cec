//! End-to-end tests of memprof's leak analytics (this crate and the fixtures it names are owned
//! by the tests/ directory): growth verdicts and rates, behaviour, recommendations,
//! `--fail-on-leak`, alerts, process memory and `--limit` projection, categories, function phases
//! and time marks (`memprof mark`), saved reports and `memprof diff`. They run the real `memprof`
//! binary as root against C fixtures compiled at test time (`cc -O2 -g -fno-omit-frame-pointer`)
//! and assert on its NDJSON output.
//!
//! Fixtures (each documents its workload at the top):
//! - `tests/fixtures/growth.c`: a loop paced at 100 iterations/s for 8.25 s: `steady_leak` leaks
//!   1000 B per iteration, `cache_put` fills a 300-slot cache of 1024 B entries (full after 3 s,
//!   then replaced round-robin), `churn_buffers` keeps a ring of 4 x 512 B. It prints its own
//!   true leak rate, measured with CLOCK_MONOTONIC. `--plateau` leaves the leak out.
//! - `tests/fixtures/phases.c`: exact allocations inside `load_phase` and `render_phase` and
//!   outside them, released by SIGUSR1 (`--wait`) or in two steps (`--marks`).
//! - `tests/fixtures/diff_sites.c`: leaks a number of blocks per site given on the command line.
//!
//! Needs root (eBPF) and a memprof built with its kernel programs (not `AYA_BUILD_SKIP=1`):
//! `sudo -E cargo test --release -p memprof-user --test analytics -- --test-threads=1` (about
//! 50 s serially: three 8.25-second growth runs dominate; the pid-mode one and the plateau one are
//! shared by several tests through `OnceLock`). A test panics (never skips) when not run as
//! root. Environment: `CC` (default `cc`), `jq` on PATH for the README recipes. Reports are saved
//! under `target/tmp/memprof-analytics-reports/PID/`, so concurrent test processes do not clash.
//!
//! README jq recipes for the analytics fields, tested verbatim (run with `sh -c`, the NDJSON of
//! `memprof trace --json ...` or a report saved with `--output` on stdin) by
//! `recipes::jq_recipes_on_real_reports`:
//!
//! ```text
//! # Verdict per call site: innermost function, verdict, growth rate, outstanding bytes
//! jq -r 'select(.type=="report") | .leaks[] | "\(.stack[0].function // "?") \(.verdict) \(.growth_bytes_per_s) B/s \(.bytes) B"'
//! # Phases table (--phase functions and memprof mark phases)
//! jq -r 'select(.type=="report") | .phases[] | "\(.name) \(.kind) allocs=\(.allocs) frees=\(.frees) net=\(.net_bytes) peak_net=\(.peak_net_bytes) peak_outstanding=\(.peak_outstanding_bytes)"'
//! # Leak gate for CI: exit status 1 when any call site's verdict is leak, 0 otherwise
//! jq -e 'select(.type=="report") | .leak_detected | not' > /dev/null
//! ```

#[path = "../common/mod.rs"]
mod common;

mod alerts;
mod categories;
mod diff;
mod growth;
mod memory;
mod phases;
mod plateau;
mod recipes;

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use common::{
    DEADLINE, FP, Finished, MEMPROF, Proc, compile_c, frame_fn, leaks, require_root, show,
    site_groups, stack, truncate, work_dir,
};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

struct Fixtures {
    growth: PathBuf,
    phases: PathBuf,
    diff_sites: PathBuf,
}

/// Compiles every fixture once per test process (and checks root first).
fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    require_root();
    FIXTURES.get_or_init(|| {
        let dir = work_dir("memprof-analytics-fixtures");
        let build = |name: &str| compile_c(&dir, name, &format!("{name}.c"), &[FP]);
        Fixtures {
            growth: build("growth"),
            phases: build("phases"),
            diff_sites: build("diff_sites"),
        }
    })
}

/// This test process's directory for saved reports: `memprof-analytics-reports/PID`, so that
/// two test processes never share a file. Directories of test processes that no longer run are
/// removed when it is first made.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("memprof-analytics-reports");
        if let Ok(entries) = fs::read_dir(&root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.parse::<u32>().is_ok() && !Path::new("/proc").join(&name).exists() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = root.join(std::process::id().to_string());
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        dir
    })
}

// ---------------------------------------------------------------------------------------------
// Running memprof and reading reports
// ---------------------------------------------------------------------------------------------

impl Finished {
    /// The final `report` record, after checking the stream's shape: `start` first, `report`
    /// last, only snapshots and alerts in between.
    fn report(&self) -> Value {
        self.report_among(&["snapshot", "alert"])
    }
}

/// `memprof ARGS`, to the end.
fn run_memprof(args: &[OsString]) -> Finished {
    let what = format!("memprof {}", show(args));
    let mut cmd = Command::new(MEMPROF);
    cmd.args(args);
    Proc::spawn(what, &mut cmd).finish(DEADLINE)
}

fn float(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or_else(|| {
        panic!(
            "expected a number {key:?} in {}",
            truncate(&v.to_string(), 2000)
        )
    })
}

fn array<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v[key].as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// The one leak group of `function`; panics with the report if there is not exactly one.
fn one_group<'a>(report: &'a Value, function: &str) -> &'a Value {
    let groups = site_groups(report, function);
    assert_eq!(
        groups.len(),
        1,
        "expected exactly one leak group with stack[0].function = {function}\n{}",
        summary(report)
    );
    groups[0]
}

/// A compact, bounded rendering of a report's analytics for assertion messages.
fn summary(report: &Value) -> String {
    let mut s = format!(
        "totals: {}\nexited: {} exit_code: {} duration_s: {} leak_detected: {} \
         growth_rate_mb_per_hour: {} projected_limit_hours: {}\nrss_bytes: {} pss_bytes: {} \
         vm_size_bytes: {} untraced_bytes: {}\nphases: {}\ncategories: {}\nrecommendations: {}\n",
        report["totals"],
        report["exited"],
        report["exit_code"],
        report["duration_s"],
        report["leak_detected"],
        report["growth_rate_mb_per_hour"],
        report["projected_limit_hours"],
        report["rss_bytes"],
        report["pss_bytes"],
        report["vm_size_bytes"],
        report["untraced_bytes"],
        report["phases"],
        report["categories"],
        truncate(&report["recommendations"].to_string(), 3000),
    );
    let all = leaks(report);
    s += &format!("leaks: {} groups; first 20:\n", all.len());
    for g in all.iter().take(20) {
        let frames: Vec<&str> = stack(g)
            .iter()
            .take(4)
            .map(|f| frame_fn(f).unwrap_or("?"))
            .collect();
        s += &format!(
            "  {} bytes {} allocs {} {} verdict {} conf {} slope {} r2 {} growing_for {}: {}\n    \
             behaviour {}\n",
            g["bytes"],
            g["allocs"],
            g["allocator"],
            g["kind"],
            g["verdict"],
            g["confidence"],
            g["growth_bytes_per_s"],
            g["r2"],
            g["growing_for_s"],
            frames.join(" <- "),
            g["behaviour"],
        );
    }
    s
}
