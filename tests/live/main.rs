//! End-to-end tests of the live endpoints (`memprof trace --metrics ADDR`, `--ui ADDR`) with
//! the tools people use them with: a real Prometheus scraping memprof, promtool checking the
//! shipped alerting rules, headless Chromium rendering the dashboard, and `go tool pprof`
//! pulling profiles from memprof as a node agent (`trace --all --metrics`).
//!
//! Needs root (eBPF), a memprof built with its kernel programs, `cc`, and the Debian packages
//! `prometheus` (prometheus and promtool), `chromium` and `golang-go` (go tool pprof):
//! `sudo -E cargo test --release -p memprof-user --test live -- --test-threads=1`.
//! Everything listens on 127.0.0.1 only; every wait is bounded (60 s at most per process).
//! Environment: `CC` (default `cc`), `PROMETHEUS` (default `prometheus`), `PROMTOOL` (default
//! `promtool`), `CHROMIUM` (default `chromium`), `GO` (default `go`).
//!
//! Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: commands
//! on fd 3, replies on fd 4, NUL-terminated JSON), which needs no WebSocket client and no npm
//! package.

#[path = "../common/mod.rs"]
mod common;

mod agent;
mod chromium;
mod dashboard;
mod http;
mod metrics;
mod pprof_raw;
mod prometheus;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{FP, Proc, STARTUP, compile_c, start_trace, work_dir};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// memprof's own safety net: every trace here ends by itself.
const SAFETY_NET: &str = "55s";
/// What steady.c keeps outstanding: hold_table 100000 + hold_names 16 x 1466.
const STEADY_BYTES: u64 = 123_456;
const HOLD_TABLE: u64 = 100_000;
const HOLD_NAMES: u64 = 23_456;

/// steady.c, compiled once per test process.
fn steady() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        compile_c(
            &work_dir("memprof-fixtures"),
            "steady_fp",
            "steady.c",
            &[FP],
        )
    })
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("live-{what}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `memprof trace OPTS --duration SAFETY_NET -- steady ARGS`, once the fixture is ready.
fn trace_steady(opts: &[&str], fixture_args: &[&str]) -> (Proc, u32) {
    let mut args = opts.to_vec();
    args.extend(["--duration", SAFETY_NET, "--", steady().to_str().unwrap()]);
    args.extend(fixture_args);
    let mut mp = start_trace(&args, String::new);
    let line = mp.expect_stderr_start("memprof: tracing pid ", STARTUP, String::new);
    let pid = line["memprof: tracing pid ".len()..]
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    // Text mode: the fixture's stdout is memprof's.
    mp.expect_stdout_line("ready");
    (mp, pid)
}

/// SIGINT to memprof, which must then write its report and exit 0.
fn finish_trace(mut mp: Proc) -> String {
    mp.signal(libc::SIGINT);
    let status = mp.wait(Duration::from_secs(20));
    let output = mp.output_tail();
    assert!(!output.contains("panicked"), "memprof panicked\n{output}");
    assert!(
        status.is_some_and(|s| s.success()),
        "memprof should exit 0 after SIGINT (status {status:?})\n{output}"
    );
    output
}
