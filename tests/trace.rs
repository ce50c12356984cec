//! End-to-end tests of `memprof trace` (this file and tests/fixtures/ are owned by the tests/
//! directory). They run the real `memprof` binary as root against fixture programs compiled at
//! test time (`cc`, with and without frame pointers) and assert exact allocation facts on its
//! NDJSON output. The expected numbers are the fixtures' documented workloads; they were
//! cross-checked outside memprof with ltrace (call counts per size), strace (mmap/munmap/mremap)
//! and a bpftrace script that applies the same accounting at the uprobe level (outermost
//! malloc-family call per thread, matched and unmatched frees).
//!
//! Needs root (eBPF) and a memprof built with its kernel programs (not `AYA_BUILD_SKIP=1`):
//! `sudo -E cargo test -p memprof-user --test trace -- --test-threads=1` (about 1m50s serially
//! in the dev profile, 1m25s with `--release`; the tests are independent and may also run in
//! parallel). A test panics (never skips) when not run as root.
//! Environment: `CC` (default `cc`), `MEMPROF_TEST_PYTHON` (default: the interpreter that
//! `python3` on PATH resolves to, so that a pyenv shim script is not traced instead), `jq` on
//! PATH for the README recipes.
//!
//! README jq recipes, tested verbatim by `jq_recipes_on_real_report` (NDJSON from `--json`):
//!
//! ```text
//! # Top 3 leak sites: bytes summed over every call stack of the same allocating function
//! jq -r 'select(.type=="report") | .leaks | group_by(.stack[0].function) | map({site: (.[0].stack[0].function // "?"), bytes: (map(.bytes) | add)}) | sort_by(-.bytes) | .[:3][] | "\(.site) \(.bytes)"'
//! # Total outstanding heap bytes
//! jq 'select(.type=="report") | .totals.outstanding_bytes'
//! # Lost events (non-zero: the counts are incomplete)
//! jq 'select(.type=="report") | .totals.lost_events'
//! # Outstanding anonymous mmap bytes made outside malloc
//! jq 'select(.type=="report") | .mmap.outstanding_bytes'
//! # Outstanding heap bytes over time, from --interval snapshots
//! jq -r 'select(.type=="snapshot") | "\(.elapsed_s) \(.totals.outstanding_bytes)"'
//! ```

use std::{
    ffi::{OsStr, OsString},
    fs,
    io::Write,
    os::unix::{fs::PermissionsExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

mod common;
use common::{
    Checks, Finished, Proc, STARTUP, frame_fn, frame_names, leaks, num, os, send_signal, stack,
    start_target, truncate,
};

const MEMPROF: &str = env!("CARGO_BIN_EXE_memprof");
const FIXTURE_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
/// Harness deadline for any one process; every trace also gets memprof's own `--duration`
/// safety net, which is shorter, so a stuck trace still ends with memprof's report.
const DEADLINE: Duration = Duration::from_secs(60);
const SAFETY_NET: &str = "40s";

// ---------------------------------------------------------------------------------------------
// Expected facts
// ---------------------------------------------------------------------------------------------

/// One allocation site of a fixture: the leak groups whose `stack[0].function` is `function`,
/// summed, must have exactly these bytes and allocs, and every group must have one of
/// `allocators` and this `kind`.
struct SiteFact {
    function: &'static str,
    bytes: u64,
    allocs: u64,
    allocators: &'static [&'static str],
    kind: &'static str,
}

const fn site(
    function: &'static str,
    bytes: u64,
    allocs: u64,
    allocators: &'static [&'static str],
    kind: &'static str,
) -> SiteFact {
    SiteFact {
        function,
        bytes,
        allocs,
        allocators,
        kind,
    }
}

/// alloc_sites.c: what is outstanding at exit. In glibc 2.36 `aligned_alloc` and `memalign` are
/// one function (same address), so either name is accepted for both sites. The contract does
/// not name the allocator of realloc(NULL, n) or of reallocarray, so the outer call's name or
/// the inner one glibc makes are both accepted there; bytes and counts are exact everywhere.
const ALLOC_SITES: &[SiteFact] = &[
    site("leak_malloc", 10 * 1000, 10, &["malloc"], "heap"),
    site("leak_calloc", 5 * 3 * 1001, 5, &["calloc"], "heap"),
    site("leak_realloc", 4 * 2500, 4, &["realloc"], "heap"),
    site(
        "leak_realloc_null",
        3 * 777,
        3,
        &["realloc", "malloc"],
        "heap",
    ),
    site(
        "leak_reallocarray",
        3 * 7 * 1003,
        3,
        &["reallocarray", "realloc"],
        "heap",
    ),
    site(
        "leak_posix_memalign",
        6 * 4099,
        6,
        &["posix_memalign"],
        "heap",
    ),
    site(
        "leak_aligned_alloc",
        4 * 5120,
        4,
        &["aligned_alloc", "memalign"],
        "heap",
    ),
    site(
        "leak_memalign",
        3 * 6007,
        3,
        &["memalign", "aligned_alloc"],
        "heap",
    ),
    site("leak_valloc", 2 * 7001, 2, &["valloc"], "heap"),
    site("leak_pvalloc", 2 * 8192, 2, &["pvalloc"], "heap"),
    site("leak_big", 2 * 4 * 1024 * 1024, 2, &["malloc"], "heap"),
    site("leak_mmap", 12 * 4096, 1, &["mmap"], "mmap"),
];

/// alloc_sites.c functions that allocate but free everything (or fail), so they must not be
/// `stack[0]` of any leak group.
const ALLOC_SITES_FREED: &[&str] = &[
    "realloc_origin",
    "realloc_zero",
    "alloc_then_free",
    "free_them",
    "churn",
    "pre_alloc",
    "free_pre",
    "fail_alloc",
    "warm_up",
];

/// leak_mremap: mmap(4 pages) then mremap to 6 pages; 24576 bytes stay mapped.
const MREMAP_BYTES: u64 = 6 * 4096;

/// Exact malloc-family totals of an alloc_sites run.
#[derive(Debug, Clone, Copy)]
struct TotalsFact {
    allocs: u64,
    frees: u64,
    bytes_allocated: u64,
    bytes_freed: u64,
    outstanding_allocs: u64,
    outstanding_bytes: u64,
    unmatched_frees: u64,
}

/// alloc_sites --wait, window after SIGUSR1. Allocations: alloc_then_free 20x1500,
/// churn 100000x72, realloc_zero 2222, leak_malloc 10x1000, leak_calloc 5x3003,
/// realloc_origin 4x500, leak_realloc 4x2500, leak_realloc_null 3x777, leak_reallocarray
/// 3x64 + 3x7021, leak_posix_memalign 6x4099, leak_aligned_alloc 4x5120, leak_memalign 3x6007,
/// leak_valloc 2x7001, leak_pvalloc 2x8192, leak_big 2x4194304 = 100072 allocs, 15774912 bytes.
/// Matched frees: 20 + 100000 + 4 (realloc) + 1 (realloc(p, 0)) + 3 (reallocarray) = 100028,
/// 30000 + 7200000 + 2000 + 2222 + 192 = 7234414 bytes. free_pre frees the 5 blocks of
/// pre_alloc, made before the window: 5 unmatched frees. free(NULL) and the failed malloc,
/// calloc and posix_memalign count nowhere.
const ALLOC_SITES_WINDOW: TotalsFact = TotalsFact {
    allocs: 100_072,
    frees: 100_028,
    bytes_allocated: 15_774_912,
    bytes_freed: 7_234_414,
    outstanding_allocs: 44,
    outstanding_bytes: 8_540_498,
    unmatched_frees: 5,
};

/// alloc_sites spawned: the window plus pre_alloc's 5x1234 (then matched by free_pre). Nothing
/// else in the process's life calls the malloc family (checked with a uprobe counter from exec).
const ALLOC_SITES_SPAWN: TotalsFact = TotalsFact {
    allocs: 100_077,
    frees: 100_033,
    bytes_allocated: 15_781_082,
    bytes_freed: 7_240_584,
    outstanding_allocs: 44,
    outstanding_bytes: 8_540_498,
    unmatched_frees: 0,
};

/// Direct anonymous mmap outstanding at alloc_sites' exit: 12 pages of leak_mmap + 6 of
/// leak_mremap. The two 4 MiB mallocs' mmaps are made inside malloc and count nowhere here.
const ALLOC_SITES_MMAP_OUTSTANDING: u64 = 12 * 4096 + 6 * 4096;
/// In spawn mode the dynamic loader's own anonymous maps before main (8192 + 53072 + 12288
/// bytes on Debian 12: its scratch page, libc's .bss, the TLS block) may be included too.
const LOADER_ANON_MAPS: u64 = 8192 + 53072 + 12288;

/// threads.c: 4 workers x 250 x malloc(48) leaked in thread_leak.
const THREAD_LEAK: SiteFact = site("thread_leak", 4 * 250 * 48, 4 * 250, &["malloc"], "heap");
/// threads --wait, window after SIGUSR1: 4 x (250 + 25000) mallocs; 4 x 25000 matched frees.
/// (glibc's tcache shutdown at each thread's exit frees 3 addresses that are not live
/// allocations: 12 unmatched frees on glibc 2.36, not asserted.)
const THREADS_WINDOW: TotalsFact = TotalsFact {
    allocs: 101_000,
    frees: 100_000,
    bytes_allocated: 4 * (250 * 48 + 25_000 * 40),
    bytes_freed: 4 * 25_000 * 40,
    outstanding_allocs: 1000,
    outstanding_bytes: 48_000,
    unmatched_frees: u64::MAX, // not asserted
};

/// ctypes_native.py: 7 x malloc(123457) through ctypes, 2 freed.
const PY_SIZE: u64 = 123_457;
const PY_OUTSTANDING: u64 = 5;

const MALLOC_FAMILY: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "free",
];

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Build {
    /// -O2 -g -fno-omit-frame-pointer
    Fp,
    /// -O2 -g -fomit-frame-pointer
    NoFp,
}

struct Fixtures {
    alloc_fp: PathBuf,
    alloc_nofp: PathBuf,
    alloc_static: PathBuf,
    threads_fp: PathBuf,
    threads_nofp: PathBuf,
    python: PathBuf,
    py_script: PathBuf,
}

impl Fixtures {
    fn alloc(&self, build: Build) -> &Path {
        match build {
            Build::Fp => &self.alloc_fp,
            Build::NoFp => &self.alloc_nofp,
        }
    }
    fn threads(&self, build: Build) -> &Path {
        match build {
            Build::Fp => &self.threads_fp,
            Build::NoFp => &self.threads_nofp,
        }
    }
}

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "integration tests need root: they load eBPF programs and attach uprobes (euid is \
         {euid}); run `sudo -E cargo test -p memprof-user --test trace`"
    );
}

/// Compiles every fixture once per test process (and checks root first).
fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    require_root();
    FIXTURES.get_or_init(|| {
        let src = Path::new(FIXTURE_SRC);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("memprof-fixtures");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let build = |name: &str, source: &str, flags: &[&str]| -> PathBuf {
            let out = dir.join(name);
            let mut cmd = Command::new(&cc);
            cmd.args(["-O2", "-g", "-Wall", "-o"])
                .arg(&out)
                .arg(src.join(source))
                .args(flags);
            let res = cmd
                .output()
                .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
            assert!(
                res.status.success(),
                "compiling fixture {name} failed ({cmd:?}):\n{}",
                String::from_utf8_lossy(&res.stderr)
            );
            out
        };
        let fp = "-fno-omit-frame-pointer";
        let nofp = "-fomit-frame-pointer";
        Fixtures {
            alloc_fp: build("alloc_sites_fp", "alloc_sites.c", &[fp]),
            alloc_nofp: build("alloc_sites_nofp", "alloc_sites.c", &[nofp]),
            // Stripped: memprof traces static binaries through their symbol table, so the
            // error cases need one without.
            alloc_static: build(
                "alloc_sites_static",
                "alloc_sites.c",
                &[fp, "-static", "-s"],
            ),
            threads_fp: build("threads_fp", "threads.c", &[fp, "-pthread"]),
            threads_nofp: build("threads_nofp", "threads.c", &[nofp, "-pthread"]),
            python: python(),
            py_script: src.join("ctypes_native.py"),
        }
    })
}

/// The real Python interpreter (not a pyenv shim script) with ctypes.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MEMPROF_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let out = Command::new("python3")
        .args(["-c", "import sys, ctypes; print(sys.executable)"])
        .output()
        .unwrap_or_else(|e| panic!("python3 is needed for the ctypes fixture: {e}"));
    assert!(
        out.status.success(),
        "python3 with ctypes is needed for the ctypes fixture: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exe = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        exe.is_file(),
        "python3 reported sys.executable {exe:?}, which is not a file"
    );
    exe
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

impl Finished {
    /// The final `report` record, after checking the stream's shape: `start` first, `report`
    /// last, snapshots in between.
    fn report(&self) -> Value {
        let records = self.ndjson();
        let types: Vec<&str> = records
            .iter()
            .map(|r| r["type"].as_str().unwrap())
            .collect();
        assert!(
            types.len() >= 2 && types[0] == "start" && types[types.len() - 1] == "report",
            "expected NDJSON start, snapshot*, report; got types {types:?}\n{}",
            self.context()
        );
        assert!(
            types[1..types.len() - 1].iter().all(|t| *t == "snapshot"),
            "only snapshot records may come between start and report; got {types:?}"
        );
        let report = records.last().unwrap().clone();
        check_report_shape(&report, &self.context());
        report
    }

    fn start(&self) -> Value {
        self.ndjson()
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no NDJSON output\n{}", self.context()))
    }

    fn assert_success(&self) {
        assert!(
            !self.stderr.contains("panicked"),
            "memprof panicked\n{}",
            self.context()
        );
        assert_eq!(
            self.code(),
            Some(0),
            "memprof should exit 0\n{}",
            self.context()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Running memprof
// ---------------------------------------------------------------------------------------------

fn memprof(args: &[&OsStr]) -> Command {
    let mut cmd = Command::new(MEMPROF);
    cmd.arg("trace").args(args);
    cmd
}

/// `memprof trace --json --duration SAFETY_NET OPTS -- COMMAND...`, to the end.
fn spawn_trace(opts: &[&str], command: &[OsString]) -> Finished {
    let mut args: Vec<OsString> = os(&["--json", "--duration", SAFETY_NET]);
    args.extend(os(opts));
    args.push("--".into());
    args.extend(command.iter().cloned());
    let refs: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    let what = format!(
        "memprof trace {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    Proc::spawn(what, &mut memprof(&refs)).finish(DEADLINE)
}

fn alloc_cmd(build: Build, args: &[&str]) -> Vec<OsString> {
    let mut v = vec![fixtures().alloc(build).as_os_str().to_owned()];
    v.extend(os(args));
    v
}

/// `memprof trace --json --pid PID OPTS` (with the safety net unless OPTS has --duration),
/// returned once memprof says `memprof: tracing pid`.
fn attach(target: &mut Proc, opts: &[&str]) -> Proc {
    let pid = target.pid().to_string();
    let mut args = vec!["--json", "--pid", pid.as_str()];
    if !opts.contains(&"--duration") {
        args.extend(["--duration", SAFETY_NET]);
    }
    args.extend(opts);
    let os_args = os(&args);
    let refs: Vec<&OsStr> = os_args.iter().map(OsString::as_os_str).collect();
    let mut mp = Proc::spawn(
        format!("memprof trace {}", args.join(" ")),
        &mut memprof(&refs),
    );
    let deadline = Instant::now() + STARTUP;
    if mp
        .err
        .wait_line(deadline, |l| l.starts_with("memprof: tracing pid "))
        .is_none()
    {
        let alive = mp.alive();
        mp.kill_group();
        panic!(
            "memprof did not print `memprof: tracing pid ...` on stderr within {STARTUP:?} \
             (still running: {alive}, status {:?})\n{}\n{}",
            mp.status,
            mp.output_so_far(),
            target.output_so_far()
        );
    }
    mp
}

/// Pid mode to the end: start `program args` (which must support --wait), attach, release it
/// with SIGUSR1 and wait for memprof to end after the target exits.
fn pid_trace(what: &str, program: &Path, args: &[&str]) -> (Finished, Finished) {
    pid_trace_with(what, program, args, &[])
}

/// `pid_trace` with memprof options.
fn pid_trace_with(
    what: &str,
    program: &Path,
    args: &[&str],
    opts: &[&str],
) -> (Finished, Finished) {
    let mut target = start_target(what, program, args);
    let mp = attach(&mut target, opts);
    target.signal(libc::SIGUSR1);
    let target_done = target.finish(DEADLINE);
    let mp_done = mp.finish(DEADLINE);
    (mp_done, target_done)
}

// ---------------------------------------------------------------------------------------------
// Reading reports
// ---------------------------------------------------------------------------------------------

/// The sum of the leak groups selected by `pred`.
#[derive(Debug, Default)]
struct Sum {
    bytes: u64,
    allocs: u64,
    groups: Vec<Value>,
}

fn sum_groups(report: &Value, pred: impl Fn(&Value) -> bool) -> Sum {
    let mut s = Sum::default();
    for g in leaks(report).iter().filter(|g| pred(g)) {
        s.bytes += num(g, "bytes");
        s.allocs += num(g, "allocs");
        s.groups.push(g.clone());
    }
    s
}

/// The leak groups whose innermost frame (the allocator's caller) is `function`.
fn site_sum(report: &Value, function: &str) -> Sum {
    sum_groups(report, |g| {
        stack(g).first().and_then(frame_fn) == Some(function)
    })
}

/// A compact, bounded rendering of a report for assertion messages.
fn summary(report: &Value) -> String {
    let mut s = format!("totals: {}\nmmap: {}\n", report["totals"], report["mmap"]);
    s += &format!(
        "exited: {} exit_code: {} duration_s: {}\n",
        report["exited"], report["exit_code"], report["duration_s"]
    );
    let all = leaks(report);
    s += &format!("leaks: {} groups; first 25 (5 frames each):\n", all.len());
    for g in all.iter().take(25) {
        let frames: Vec<String> = stack(g)
            .iter()
            .take(5)
            .map(|f| {
                format!(
                    "{}@{}",
                    frame_fn(f).unwrap_or("?"),
                    f["module"]
                        .as_str()
                        .map(|m| m.rsplit('/').next().unwrap_or(m))
                        .unwrap_or("?")
                )
            })
            .collect();
        s += &format!(
            "  {} bytes {} allocs {} {} age {}: {}\n",
            g["bytes"],
            g["allocs"],
            g["allocator"],
            g["kind"],
            g["oldest_age_s"],
            frames.join(" <- ")
        );
    }
    s
}

fn groups_json(groups: &[Value]) -> String {
    truncate(&serde_json::to_string_pretty(groups).unwrap(), 6000)
}

/// Checks the report's field types and the leaks' order; panics with `context`.
fn check_report_shape(r: &Value, context: &str) {
    let mut c = Checks::new("report shape");
    for key in [
        "allocs",
        "frees",
        "bytes_allocated",
        "bytes_freed",
        "outstanding_allocs",
        "outstanding_bytes",
        "peak_outstanding_bytes",
        "lost_events",
        "unmatched_frees",
        "lost_stacks",
    ] {
        c.check(
            r["totals"][key].is_u64(),
            format!("totals.{key} is not an integer: {}", r["totals"][key]),
        );
    }
    for key in [
        "maps",
        "unmaps",
        "bytes_mapped",
        "bytes_unmapped",
        "outstanding_maps",
        "outstanding_bytes",
    ] {
        c.check(
            r["mmap"][key].is_u64(),
            format!("mmap.{key} is not an integer: {}", r["mmap"][key]),
        );
    }
    c.check(
        r["exited"].is_boolean(),
        format!("exited is not a bool: {}", r["exited"]),
    );
    c.check(
        r["exit_code"].is_i64() || r["exit_code"].is_null(),
        format!("exit_code is not an int or null: {}", r["exit_code"]),
    );
    c.check(
        r["duration_s"].is_number(),
        format!("duration_s is not a number: {}", r["duration_s"]),
    );
    c.check(r["leaks"].is_array(), "leaks is not an array".to_string());
    let mut prev = u64::MAX;
    for (i, g) in leaks(r).iter().enumerate() {
        let bytes = g["bytes"].as_u64().unwrap_or(0);
        c.check(
            bytes <= prev,
            format!("leaks not sorted by bytes descending at index {i}"),
        );
        prev = bytes;
        c.check(
            g["allocs"].as_u64().is_some_and(|a| a >= 1),
            format!("leak {i}: bad allocs {}", g["allocs"]),
        );
        c.check(
            g["oldest_age_s"].is_number(),
            format!("leak {i}: bad oldest_age_s {}", g["oldest_age_s"]),
        );
        c.check(
            g["allocator"].is_string(),
            format!("leak {i}: bad allocator {}", g["allocator"]),
        );
        c.check(
            matches!(g["kind"].as_str(), Some("heap" | "mmap")),
            format!("leak {i}: kind {} is not heap or mmap", g["kind"]),
        );
        c.check(
            g["stack"].is_array(),
            format!("leak {i}: stack is not an array"),
        );
        for (j, f) in stack(g).iter().enumerate() {
            let ok = (f["function"].is_string() || f["function"].is_null())
                // The contract says string; an address in no mapping (a garbage frame past the
                // end of a frame-pointer chain) has no module, so null is accepted there.
                && (f["module"].is_string() || f["module"].is_null())
                && (f["file"].is_string() || f["file"].is_null())
                && (f["line"].is_u64() || f["line"].is_null())
                // The offset in the module's file (hex), for frames in a module only.
                && match f["module"].as_str() {
                    Some(_) => f["offset"].as_str().is_some_and(|o| {
                        o.strip_prefix("0x")
                            .is_some_and(|h| u64::from_str_radix(h, 16).is_ok())
                    }),
                    None => f["offset"].is_null(),
                }
                && (f["build_id"].is_string() || f["build_id"].is_null())
                && f["inlined"].is_boolean()
                && matches!(f["kind"].as_str(), Some("native" | "python" | "unknown"))
                && f.get("addr").is_none();
            c.check(ok, format!("leak {i} frame {j} has a bad shape: {f}"));
        }
    }
    c.finish(|| format!("{}\n{context}", summary(r)));
}

/// Per-site exact bytes/allocs, allocator and kind.
fn check_site(c: &mut Checks, report: &Value, fact: &SiteFact) {
    let s = site_sum(report, fact.function);
    let groups = || groups_json(&s.groups);
    if s.bytes != fact.bytes || s.allocs != fact.allocs {
        c.check(
            false,
            format!(
                "site {}: {} bytes in {} allocs over {} group(s), expected {} bytes in {} allocs; \
                 groups: {}",
                fact.function,
                s.bytes,
                s.allocs,
                s.groups.len(),
                fact.bytes,
                fact.allocs,
                groups()
            ),
        );
    }
    for g in &s.groups {
        let allocator = g["allocator"].as_str().unwrap_or("?");
        c.check(
            fact.allocators.contains(&allocator),
            format!(
                "site {}: allocator {allocator:?}, expected one of {:?}",
                fact.function, fact.allocators
            ),
        );
        c.check(
            g["kind"].as_str() == Some(fact.kind),
            format!(
                "site {}: kind {}, expected {:?}",
                fact.function, g["kind"], fact.kind
            ),
        );
    }
}

fn check_no_site(c: &mut Checks, report: &Value, function: &str) {
    let s = site_sum(report, function);
    c.check(
        s.groups.is_empty(),
        format!(
            "{function} frees (or fails) everything it allocates but has {} leak group(s) at \
             stack[0] ({} bytes): {}",
            s.groups.len(),
            s.bytes,
            groups_json(&s.groups)
        ),
    );
}

fn check_totals(c: &mut Checks, report: &Value, t: &TotalsFact) {
    let totals = &report["totals"];
    c.eq("totals.allocs", num(totals, "allocs"), t.allocs);
    c.eq("totals.frees", num(totals, "frees"), t.frees);
    c.eq(
        "totals.bytes_allocated",
        num(totals, "bytes_allocated"),
        t.bytes_allocated,
    );
    c.eq(
        "totals.bytes_freed",
        num(totals, "bytes_freed"),
        t.bytes_freed,
    );
    c.eq(
        "totals.outstanding_allocs",
        num(totals, "outstanding_allocs"),
        t.outstanding_allocs,
    );
    c.eq(
        "totals.outstanding_bytes",
        num(totals, "outstanding_bytes"),
        t.outstanding_bytes,
    );
    if t.unmatched_frees != u64::MAX {
        c.eq(
            "totals.unmatched_frees",
            num(totals, "unmatched_frees"),
            t.unmatched_frees,
        );
    }
    c.eq("totals.lost_events", num(totals, "lost_events"), 0);
    let peak = num(totals, "peak_outstanding_bytes");
    c.check(
        peak >= num(totals, "outstanding_bytes") && peak <= num(totals, "bytes_allocated"),
        format!(
            "totals.peak_outstanding_bytes {peak} should be >= outstanding_bytes and <= \
             bytes_allocated"
        ),
    );
}

/// Everything alloc_sites' heap sites must show, whatever the build and mode.
fn check_alloc_sites(c: &mut Checks, report: &Value) {
    for fact in ALLOC_SITES {
        check_site(c, report, fact);
    }
    for f in ALLOC_SITES_FREED {
        check_no_site(c, report, f);
    }
    // The big mallocs are mmap-backed inside glibc: heap, once, and nothing under mmap.
    let big_mmap = sum_groups(report, |g| {
        g["kind"] == "mmap" && stack(g).iter().any(|f| frame_fn(f) == Some("leak_big"))
    });
    c.check(
        big_mmap.groups.is_empty(),
        format!(
            "leak_big's 4 MiB mallocs must not appear as mmap leaks: {}",
            groups_json(&big_mmap.groups)
        ),
    );
    // mremap'ed region: kept under a stack through leak_mremap.
    let remap = sum_groups(report, |g| {
        g["kind"] == "mmap" && stack(g).iter().any(|f| frame_fn(f) == Some("leak_mremap"))
    });
    c.eq(
        "mmap leak bytes through leak_mremap (mmap 4 pages, mremap to 6)",
        remap.bytes,
        MREMAP_BYTES,
    );
    // mmap-kind groups add up to mmap.outstanding_bytes.
    let all_mmap = sum_groups(report, |g| g["kind"] == "mmap");
    c.eq(
        "sum of kind=mmap leak bytes vs mmap.outstanding_bytes",
        all_mmap.bytes,
        num(&report["mmap"], "outstanding_bytes"),
    );
}

// ---------------------------------------------------------------------------------------------
// Cached runs shared by several tests
// ---------------------------------------------------------------------------------------------

fn spawn_alloc_run(build: Build) -> &'static Finished {
    static FP: OnceLock<Finished> = OnceLock::new();
    static NOFP: OnceLock<Finished> = OnceLock::new();
    let cell = if build == Build::Fp { &FP } else { &NOFP };
    cell.get_or_init(|| spawn_trace(&[], &alloc_cmd(build, &[])))
}

fn pid_alloc_run(build: Build) -> &'static (Finished, Finished) {
    static FP: OnceLock<(Finished, Finished)> = OnceLock::new();
    static NOFP: OnceLock<(Finished, Finished)> = OnceLock::new();
    let cell = if build == Build::Fp { &FP } else { &NOFP };
    cell.get_or_init(|| {
        pid_trace(
            "alloc_sites --wait --exit 3",
            fixtures().alloc(build),
            &["--wait", "--exit", "3"],
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Spawn mode: alloc_sites
// ---------------------------------------------------------------------------------------------

fn spawn_alloc_sites_exact(build: Build) {
    let run = spawn_alloc_run(build);
    run.assert_success();
    let report = run.report();
    let mut c = Checks::new(format!("spawn mode, alloc_sites {build:?}"));
    check_alloc_sites(&mut c, &report);
    check_totals(&mut c, &report, &ALLOC_SITES_SPAWN);
    let mmap_out = num(&report["mmap"], "outstanding_bytes");
    c.check(
        (ALLOC_SITES_MMAP_OUTSTANDING..=ALLOC_SITES_MMAP_OUTSTANDING + LOADER_ANON_MAPS).contains(&mmap_out),
        format!(
            "mmap.outstanding_bytes {mmap_out}: expected {ALLOC_SITES_MMAP_OUTSTANDING} (leak_mmap + \
             leak_mremap), plus at most the loader's {LOADER_ANON_MAPS}; the 8 MiB of leak_big \
             must not be in it"
        ),
    );
    c.eq("exited", report["exited"].as_bool(), Some(true));
    c.eq("exit_code", report["exit_code"].as_i64(), Some(0));
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
}

#[test]
fn spawn_fp_alloc_sites_exact() {
    spawn_alloc_sites_exact(Build::Fp);
}

#[test]
fn spawn_nofp_alloc_sites_exact() {
    spawn_alloc_sites_exact(Build::NoFp);
}

/// With frame pointers the whole call chain is known: site, then main, and the site's module
/// is the fixture binary.
#[test]
fn spawn_fp_stacks_have_main_below_site() {
    let run = spawn_alloc_run(Build::Fp);
    run.assert_success();
    let report = run.report();
    let fixture = fixtures().alloc_fp.canonicalize().unwrap();
    let mut c = Checks::new("spawn mode, alloc_sites Fp, stacks");
    for fact in ALLOC_SITES {
        let s = site_sum(&report, fact.function);
        c.check(
            !s.groups.is_empty(),
            format!("no leak group with stack[0] = {}", fact.function),
        );
        for g in &s.groups {
            let st = stack(g);
            let names = frame_names(g);
            c.check(
                names.iter().skip(1).any(|n| *n == "main"),
                format!(
                    "site {}: `main` should be below the site on the stack, got {names:?}",
                    fact.function
                ),
            );
            let module = st[0]["module"].as_str().unwrap_or("");
            c.check(
                Path::new(module).canonicalize().is_ok_and(|m| m == fixture),
                format!(
                    "site {}: stack[0].module {module:?} should be {}",
                    fact.function,
                    fixture.display()
                ),
            );
            if let Some(file) = st[0]["file"].as_str() {
                c.check(
                    file.ends_with("alloc_sites.c")
                        && st[0]["line"].as_u64().is_some_and(|l| l > 0),
                    format!(
                        "site {}: stack[0] file/line {file:?}:{} should be alloc_sites.c:N",
                        fact.function, st[0]["line"]
                    ),
                );
            }
        }
    }
    c.finish(|| summary(&report));
}

/// In --json spawn mode stdout carries only NDJSON: the fixture's stdout marker goes to
/// memprof's stderr. The start record names the probes.
#[test]
fn spawn_json_stdout_carries_only_ndjson() {
    let run = spawn_alloc_run(Build::Fp);
    run.assert_success();
    run.report(); // every stdout line is a JSON record, start..report
    let marker = "alloc_sites: stdout marker";
    assert!(
        !run.stdout.contains(marker),
        "the command's stdout leaked into memprof's stdout\n{}",
        run.context()
    );
    assert!(
        run.stderr.contains(marker),
        "the command's stdout should appear on memprof's stderr\n{}",
        run.context()
    );
    let start = run.start();
    let mut c = Checks::new("start record");
    c.check(
        start["pid"].as_u64().is_some_and(|p| p > 0),
        format!("start.pid {}", start["pid"]),
    );
    let names = |key: &str| -> Vec<String> {
        start[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let probes = names("probes");
    let missing = names("missing");
    c.check(
        start["probes"].is_array() && start["missing"].is_array(),
        "start.probes/missing are not arrays",
    );
    for f in MALLOC_FAMILY
        .iter()
        .filter(|f| !matches!(**f, "aligned_alloc" | "memalign"))
    {
        c.check(
            probes.iter().any(|p| p == f),
            format!("start.probes {probes:?} lacks {f}"),
        );
        c.check(
            !missing.iter().any(|p| p == f),
            format!("start.missing {missing:?} lists {f}, which glibc 2.36 has"),
        );
    }
    // glibc 2.36: aligned_alloc and memalign are one address; at least one must be probed.
    c.check(
        probes
            .iter()
            .any(|p| p == "aligned_alloc" || p == "memalign"),
        format!("start.probes {probes:?} has neither aligned_alloc nor memalign"),
    );
    c.finish(|| format!("start record: {start}"));
}

#[test]
fn spawn_exit_code_passes_through() {
    let run = spawn_trace(&[], &alloc_cmd(Build::Fp, &["--exit", "7"]));
    assert!(!run.stderr.contains("panicked"), "{}", run.context());
    assert_eq!(
        run.code(),
        Some(7),
        "memprof should exit with the command's status 7\n{}",
        run.context()
    );
    let report = run.report();
    assert_eq!(report["exited"], true, "{}", summary(&report));
    assert_eq!(
        report["exit_code"],
        7,
        "report.exit_code\n{}",
        summary(&report)
    );
    assert_eq!(
        num(&report["totals"], "outstanding_bytes"),
        ALLOC_SITES_SPAWN.outstanding_bytes,
        "{}",
        summary(&report)
    );
}

#[test]
fn spawn_killed_by_signal_exits_128_plus_signal() {
    let run = spawn_trace(&[], &alloc_cmd(Build::Fp, &["--raise", "15"]));
    assert!(!run.stderr.contains("panicked"), "{}", run.context());
    assert_eq!(
        run.code(),
        Some(128 + 15),
        "command killed by SIGTERM: memprof should exit 143\n{}",
        run.context()
    );
    let report = run.report();
    assert_eq!(report["exited"], true, "{}", summary(&report));
    assert_eq!(
        num(&report["totals"], "outstanding_bytes"),
        ALLOC_SITES_SPAWN.outstanding_bytes,
        "{}",
        summary(&report)
    );
}

/// --interval emits snapshots between start and report while the command runs; the
/// snapshots taken during the fixture's final sleep show the final outstanding bytes.
#[test]
fn spawn_interval_emits_snapshots() {
    let run = spawn_trace(
        &["--interval", "100ms"],
        &alloc_cmd(Build::Fp, &["--sleep-ms", "1200"]),
    );
    run.assert_success();
    let report = run.report();
    let records = run.ndjson();
    let snaps: Vec<&Value> = records.iter().filter(|r| r["type"] == "snapshot").collect();
    let mut c = Checks::new("--interval 100ms snapshots");
    c.check(!snaps.is_empty(), "no snapshot record before the report");
    let mut prev = -1.0;
    for (i, s) in snaps.iter().enumerate() {
        let t = s["elapsed_s"].as_f64();
        c.check(
            t.is_some_and(|t| t >= prev),
            format!("snapshot {i}: elapsed_s {} not increasing", s["elapsed_s"]),
        );
        prev = t.unwrap_or(prev);
        c.check(
            s["totals"]["outstanding_bytes"].is_u64(),
            format!("snapshot {i}: no totals.outstanding_bytes"),
        );
        c.check(
            s["leaks"].is_array(),
            format!("snapshot {i}: leaks is not an array"),
        );
    }
    c.check(
        snaps
            .iter()
            .any(|s| s["totals"]["outstanding_bytes"] == ALLOC_SITES_SPAWN.outstanding_bytes),
        format!(
            "no snapshot shows the final {} outstanding bytes although the fixture sleeps 1.2 s \
             after its workload; snapshot outstanding_bytes: {:?}",
            ALLOC_SITES_SPAWN.outstanding_bytes,
            snaps
                .iter()
                .map(|s| s["totals"]["outstanding_bytes"].clone())
                .collect::<Vec<_>>()
        ),
    );
    let mut r = Checks::new("report after snapshots");
    check_totals(&mut r, &report, &ALLOC_SITES_SPAWN);
    c.failures.extend(r.failures);
    c.finish(|| format!("{} snapshots\n{}", snaps.len(), summary(&report)));
}

/// --min-age hides younger leaks from `leaks` but not from the totals.
#[test]
fn spawn_min_age_filters_leaks() {
    let young = spawn_trace(&["--min-age", "1h"], &alloc_cmd(Build::Fp, &[]));
    young.assert_success();
    let report = young.report();
    assert!(
        leaks(&report).is_empty(),
        "--min-age 1h: no leak is that old\n{}",
        summary(&report)
    );
    assert_eq!(
        num(&report["totals"], "outstanding_bytes"),
        ALLOC_SITES_SPAWN.outstanding_bytes,
        "--min-age must not change totals\n{}",
        summary(&report)
    );

    // Every leak is at least 1 s old at exit: all pass a 300ms filter.
    let old = spawn_trace(
        &["--min-age", "300ms"],
        &alloc_cmd(Build::Fp, &["--sleep-ms", "1000"]),
    );
    old.assert_success();
    let report = old.report();
    let mut c = Checks::new("--min-age 300ms after a 1 s sleep");
    for fact in ALLOC_SITES {
        check_site(&mut c, &report, fact);
    }
    for (i, g) in leaks(&report).iter().enumerate() {
        let age = g["oldest_age_s"].as_f64().unwrap_or(-1.0);
        c.check(
            age >= 0.3,
            format!("leak {i}: oldest_age_s {age} < min-age 0.3"),
        );
    }
    c.finish(|| summary(&report));
}

#[test]
fn spawn_top_limits_leak_groups() {
    let run = spawn_trace(&["--top", "3"], &alloc_cmd(Build::Fp, &[]));
    run.assert_success();
    let report = run.report();
    // The same run without --top: its 3 largest groups, by bytes and innermost function. (One
    // site can be several groups: gcc unrolls leak_big's 2-iteration loop into 2 call sites.)
    let full = spawn_alloc_run(Build::Fp).report();
    let key = |g: &Value| {
        (
            num(g, "bytes"),
            stack(g).first().and_then(frame_fn).map(String::from),
        )
    };
    let got: Vec<_> = leaks(&report).iter().map(key).collect();
    let want: Vec<_> = leaks(&full).iter().take(3).map(key).collect();
    assert_eq!(
        got,
        want,
        "--top 3 should keep the 3 largest leak groups of the full report\n--top 3:\n{}\nfull:\n{}",
        summary(&report),
        summary(&full)
    );
    assert_eq!(
        num(&report["totals"], "outstanding_bytes"),
        ALLOC_SITES_SPAWN.outstanding_bytes,
        "--top must not change totals\n{}",
        summary(&report)
    );
}

/// Without --json, the text report names the biggest site.
#[test]
fn spawn_text_report_names_top_site() {
    let what = "memprof trace (text) -- alloc_sites_fp";
    let args = os(&["--duration", SAFETY_NET, "--"]);
    let mut refs: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    refs.push(fixtures().alloc_fp.as_os_str());
    let run = Proc::spawn(what, &mut memprof(&refs)).finish(DEADLINE);
    run.assert_success();
    assert!(
        run.stdout.contains("leak_big") || run.stderr.contains("leak_big"),
        "the text report should name leak_big, the largest leak\n{}",
        run.context()
    );
}

// ---------------------------------------------------------------------------------------------
// Pid mode: alloc_sites
// ---------------------------------------------------------------------------------------------

fn pid_alloc_sites_exact(build: Build) {
    let (run, target) = pid_alloc_run(build);
    run.assert_success();
    assert_eq!(
        target.code(),
        Some(3),
        "fixture exit status\n{}",
        target.context()
    );
    let report = run.report();
    let mut c = Checks::new(format!("pid mode, alloc_sites {build:?} --wait"));
    check_alloc_sites(&mut c, &report);
    check_totals(&mut c, &report, &ALLOC_SITES_WINDOW);
    let m = &report["mmap"];
    c.eq(
        "mmap.outstanding_bytes",
        num(m, "outstanding_bytes"),
        ALLOC_SITES_MMAP_OUTSTANDING,
    );
    c.eq("mmap.outstanding_maps", num(m, "outstanding_maps"), 2);
    // mmap 16+8+4 pages, munmap 4+8 pages, mremap 4 -> 6 pages (counted as a resize, or as an
    // unmap of 4 pages plus a map of 6).
    let (mapped, unmapped) = (num(m, "bytes_mapped"), num(m, "bytes_unmapped"));
    c.check(
        (mapped, unmapped) == (122_880, 49_152) || (mapped, unmapped) == (139_264, 65_536),
        format!("mmap bytes_mapped/bytes_unmapped {mapped}/{unmapped}: expected 122880/49152 or 139264/65536"),
    );
    c.check(
        (3..=4).contains(&num(m, "maps")),
        format!("mmap.maps {} not 3 or 4", m["maps"]),
    );
    c.check(
        (2..=3).contains(&num(m, "unmaps")),
        format!("mmap.unmaps {} not 2 or 3", m["unmaps"]),
    );
    c.eq("exited", report["exited"].as_bool(), Some(true));
    c.check(
        report["exit_code"].is_null() || report["exit_code"] == 3,
        format!("exit_code {} should be 3 (or null)", report["exit_code"]),
    );
    let start = run.start();
    c.eq(
        "start.pid",
        start["pid"].as_u64(),
        Some(u64::from(target.pid)),
    );
    let tracing = format!("memprof: tracing pid {} ", target.pid);
    c.check(
        run.stderr
            .lines()
            .any(|l| l.starts_with(&tracing) || l == tracing.trim_end()),
        format!("stderr should have a line starting {tracing:?}"),
    );
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
}

#[test]
fn pid_fp_alloc_sites_exact() {
    pid_alloc_sites_exact(Build::Fp);
}

#[test]
fn pid_nofp_alloc_sites_exact() {
    pid_alloc_sites_exact(Build::NoFp);
}

/// SIGINT (Ctrl-C) or SIGTERM to memprof while the target lives: final report, exit 0, and the
/// target keeps running normally (it then finishes when told to).
fn pid_stop_by_signal(sig: i32, name: &str) {
    let f = fixtures();
    let mut target = start_target(
        "alloc_sites --wait --hold",
        &f.alloc_fp,
        &["--wait", "--hold"],
    );
    let mp = attach(&mut target, &[]);
    target.signal(libc::SIGUSR1);
    target.expect_stdout_line("done");
    thread::sleep(Duration::from_millis(500));
    send_signal(mp.pid(), sig);
    let run = mp.finish(DEADLINE);
    run.assert_success();
    let report = run.report();
    let mut c = Checks::new(format!("pid mode stopped by {name}"));
    c.check(
        target.alive(),
        format!(
            "the target died when memprof got {name}: {:?}",
            target.status
        ),
    );
    c.eq("exited", report["exited"].as_bool(), Some(false));
    c.check(
        report["exit_code"].is_null(),
        format!("exit_code {} should be null", report["exit_code"]),
    );
    for fact in ALLOC_SITES {
        check_site(&mut c, &report, fact);
    }
    check_totals(&mut c, &report, &ALLOC_SITES_WINDOW);
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
    target.signal(libc::SIGUSR2);
    let done = target.finish(DEADLINE);
    assert_eq!(
        done.code(),
        Some(0),
        "target should finish normally after memprof detached\n{}",
        done.context()
    );
}

#[test]
fn pid_sigint_reports_and_leaves_target_running() {
    pid_stop_by_signal(libc::SIGINT, "SIGINT");
}

#[test]
fn pid_sigterm_reports_and_leaves_target_running() {
    pid_stop_by_signal(libc::SIGTERM, "SIGTERM");
}

/// --duration ends a pid trace (bare number = seconds, and the ms form) with an empty report
/// while the target sits idle.
#[test]
fn pid_duration_ends_trace() {
    let f = fixtures();
    for (arg, secs) in [("1", 1.0), ("500ms", 0.5)] {
        let mut target = start_target("alloc_sites --wait", &f.alloc_fp, &["--wait"]);
        let began = Instant::now();
        let mp = attach(&mut target, &["--duration", arg]);
        let run = mp.finish(DEADLINE);
        let wall = began.elapsed().as_secs_f64();
        run.assert_success();
        let report = run.report();
        let mut c = Checks::new(format!("--duration {arg}"));
        c.check(
            wall >= secs,
            format!("memprof ended after {wall:.2} s, before --duration {arg}"),
        );
        c.check(
            wall < secs + 20.0,
            format!("memprof took {wall:.2} s for --duration {arg}"),
        );
        let d = report["duration_s"].as_f64().unwrap_or(-1.0);
        c.check(
            d >= secs * 0.9 && d < secs + 20.0,
            format!("duration_s {d} for --duration {arg}"),
        );
        c.eq("exited", report["exited"].as_bool(), Some(false));
        c.eq(
            "totals.allocs (target idle)",
            num(&report["totals"], "allocs"),
            0,
        );
        c.check(leaks(&report).is_empty(), "leaks while the target was idle");
        c.check(target.alive(), "target died");
        c.finish(|| format!("{}\n{}", summary(&report), run.context()));
    }
}

/// The traced pid dying (SIGKILL) ends the trace: exit 0, report with exited true.
#[test]
fn pid_target_killed_ends_trace_with_report() {
    let f = fixtures();
    let mut target = start_target("alloc_sites --wait", &f.alloc_fp, &["--wait"]);
    let mp = attach(&mut target, &[]);
    target.signal(libc::SIGKILL);
    let t = target.finish(DEADLINE);
    assert_eq!(t.status.signal(), Some(libc::SIGKILL), "{}", t.context());
    let run = mp.finish(DEADLINE);
    run.assert_success();
    let report = run.report();
    assert_eq!(
        report["exited"],
        true,
        "target exited during the trace\n{}",
        summary(&report)
    );
    assert!(
        report["exit_code"].is_null() || report["exit_code"] == 137,
        "exit_code of a SIGKILLed target: {} (null or 137)\n{}",
        report["exit_code"],
        summary(&report)
    );
}

// ---------------------------------------------------------------------------------------------
// Threads
// ---------------------------------------------------------------------------------------------

fn check_threads_sites(c: &mut Checks, report: &Value, build: Build) {
    check_site(c, report, &THREAD_LEAK);
    check_no_site(c, report, "thread_churn");
    c.eq(
        "totals.lost_events",
        num(&report["totals"], "lost_events"),
        0,
    );
    if build == Build::Fp {
        for g in site_sum(report, "thread_leak").groups {
            let names = frame_names(&g);
            c.check(
                names.contains(&"worker"),
                format!("thread_leak stack should have `worker` below it: {names:?}"),
            );
        }
    }
}

#[test]
fn threads_spawn_sites_exact() {
    for build in [Build::Fp, Build::NoFp] {
        let run = spawn_trace(&[], &[fixtures().threads(build).as_os_str().to_owned()]);
        run.assert_success();
        let report = run.report();
        let mut c = Checks::new(format!("spawn mode, threads {build:?}"));
        check_threads_sites(&mut c, &report, build);
        let t = &report["totals"];
        c.check(
            num(t, "allocs") >= THREADS_WINDOW.allocs,
            format!("totals.allocs {} < 101000", t["allocs"]),
        );
        c.check(
            num(t, "frees") >= THREADS_WINDOW.frees,
            format!("totals.frees {} < 100000", t["frees"]),
        );
        c.finish(|| format!("{}\n{}", summary(&report), run.context()));
    }
}

#[test]
fn threads_pid_exact() {
    threads_pid_exact_with(&[]);
}

/// With a single per-thread call slot in the kernel, calls of concurrent threads go to the
/// shared hash instead: the accounting is the same.
#[test]
fn threads_pid_exact_one_call_slot() {
    threads_pid_exact_with(&["--call-slots", "1"]);
}

/// `--probe-stats`: every allocator call of the window ran its programs (each program's run
/// count covers the calls), the time per run is measured, and the accounting is unchanged.
#[test]
fn threads_pid_probe_stats_count_every_call() {
    let report = threads_pid_exact_with(&["--probe-stats"]);
    let stats = report["probe_stats"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut c = Checks::new("pid mode, threads Fp --wait --probe-stats");
    // One program for every entry and return (a session), or one for entries and one for
    // returns: each allocation runs them twice, each free once.
    let allocators: Vec<&Value> = stats
        .iter()
        .filter(|s| {
            s["program"]
                .as_str()
                .is_some_and(|p| p.starts_with("alloc_"))
        })
        .collect();
    let calls = 2 * THREADS_WINDOW.allocs + THREADS_WINDOW.frees;
    let runs: u64 = allocators.iter().map(|s| num(s, "runs")).sum();
    c.check(
        runs >= calls,
        format!("allocator programs run at least {calls} times: {allocators:?}"),
    );
    c.check(
        !allocators.is_empty()
            && allocators
                .iter()
                .all(|s| s["ns_per_run"].as_f64().unwrap_or(0.0) > 0.0),
        format!("time per run measured: {allocators:?}"),
    );
    c.finish(|| summary(&report));
}

fn threads_pid_exact_with(opts: &[&str]) -> Value {
    let f = fixtures();
    let (run, target) = pid_trace_with("threads --wait", &f.threads_fp, &["--wait"], opts);
    run.assert_success();
    assert_eq!(target.code(), Some(0), "{}", target.context());
    let report = run.report();
    let mut c = Checks::new(format!("pid mode, threads Fp --wait {opts:?}"));
    check_threads_sites(&mut c, &report, Build::Fp);
    let kernel = &report["kernel"];
    c.eq("kernel.orphan_returns", num(kernel, "orphan_returns"), 0);
    c.eq("kernel.inflight_full", num(kernel, "inflight_full"), 0);
    check_totals(&mut c, &report, &THREADS_WINDOW);
    c.eq(
        "mmap.maps (stacks and arenas exist before the window)",
        num(&report["mmap"], "maps"),
        0,
    );
    c.eq(
        "mmap.outstanding_bytes",
        num(&report["mmap"], "outstanding_bytes"),
        0,
    );
    c.eq("exited", report["exited"].as_bool(), Some(true));
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
    report
}

// ---------------------------------------------------------------------------------------------
// Python ctypes
// ---------------------------------------------------------------------------------------------

/// The ctypes mallocs: libc's malloc called by libffi. On Debian 12 libffi.so.8 is stripped and
/// the return address lies in the hidden assembly `ffi_call_unix64`, which has no symbol, so
/// the frame is recognised by its module (libffi) or, where symbols exist, by `ffi_call`.
fn is_ffi_frame(f: &Value) -> bool {
    frame_fn(f).is_some_and(|n| n.contains("ffi_call"))
        || f["module"]
            .as_str()
            .is_some_and(|m| m.rsplit('/').next().unwrap_or(m).starts_with("libffi"))
}

fn check_python(report: &Value, stderr_with_diff: &str, what: &str, context: &str) {
    let mut c = Checks::new(what.to_string());
    let s = sum_groups(report, |g| {
        g["kind"] == "heap" && stack(g).iter().any(is_ffi_frame)
    });
    c.eq(
        "bytes of ctypes malloc groups (libffi frame on the stack)",
        s.bytes,
        PY_OUTSTANDING * PY_SIZE,
    );
    c.eq("allocs of ctypes malloc groups", s.allocs, PY_OUTSTANDING);
    for g in &s.groups {
        c.eq(
            "ctypes group allocator",
            g["allocator"].as_str(),
            Some("malloc"),
        );
    }
    c.eq(
        "totals.lost_events",
        num(&report["totals"], "lost_events"),
        0,
    );
    let diff = stderr_with_diff
        .lines()
        .find_map(|l| l.trim().strip_prefix("tracemalloc_diff="))
        .and_then(|d| d.trim().parse::<i64>().ok());
    c.check(
        diff.is_some_and(|d| d < PY_SIZE as i64),
        format!("tracemalloc's difference {diff:?} should be printed and be < {PY_SIZE} (it cannot see ctypes mallocs)"),
    );
    c.finish(|| {
        format!(
            "ctypes groups: {}\n{}\n{context}",
            groups_json(&s.groups),
            summary(report)
        )
    });
}

#[test]
fn python_ctypes_spawn() {
    let f = fixtures();
    let cmd = vec![
        f.python.as_os_str().to_owned(),
        f.py_script.as_os_str().to_owned(),
    ];
    let run = spawn_trace(&[], &cmd);
    run.assert_success();
    let report = run.report();
    check_python(
        &report,
        &run.stderr,
        "spawn mode, ctypes_native.py",
        &run.context(),
    );
}

#[test]
fn python_ctypes_pid() {
    let f = fixtures();
    let script = f.py_script.to_str().unwrap();
    let (run, target) = pid_trace("ctypes_native.py --wait", &f.python, &[script, "--wait"]);
    run.assert_success();
    assert_eq!(target.code(), Some(0), "{}", target.context());
    let report = run.report();
    assert_eq!(report["exited"], true, "{}", summary(&report));
    check_python(
        &report,
        &target.stderr,
        "pid mode, ctypes_native.py --wait",
        &run.context(),
    );
}

// ---------------------------------------------------------------------------------------------
// Bad inputs
// ---------------------------------------------------------------------------------------------

/// Non-zero exit, no panic, and exactly one stderr line: `memprof: ...` containing one of
/// `needles` (case-insensitive).
fn assert_clean_error(run: &Finished, needles: &[&str]) {
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let mut c = Checks::new(format!("error case: {}", run.what));
    c.check(
        run.code().is_some_and(|c| c != 0),
        format!("exit status should be non-zero, got {:?}", run.status),
    );
    c.check(!run.stderr.contains("panicked"), "memprof panicked");
    c.check(
        lines.len() == 1,
        format!("stderr should be exactly one line, got {}", lines.len()),
    );
    let first = lines.first().copied().unwrap_or("");
    c.check(
        first.starts_with("memprof: "),
        format!("error line should start with `memprof: `: {first:?}"),
    );
    let lower = first.to_lowercase();
    c.check(
        needles.iter().any(|n| lower.contains(&n.to_lowercase())),
        format!("error line should mention one of {needles:?}: {first:?}"),
    );
    c.finish(|| run.context());
}

fn run_memprof(what: &str, wrapper: &[&OsStr], args: &[&OsStr]) -> Finished {
    let mut cmd = if let Some((program, rest)) = wrapper.split_first() {
        let mut cmd = Command::new(program);
        cmd.args(rest).arg(MEMPROF).arg("trace").args(args);
        cmd
    } else {
        memprof(args)
    };
    Proc::spawn(what, &mut cmd).finish(DEADLINE)
}

fn strs(v: &[&'static str]) -> Vec<&'static OsStr> {
    v.iter().map(|s| OsStr::new(*s)).collect()
}

#[test]
fn error_nonexistent_pid() {
    require_root();
    // A pid that just existed and has been reaped.
    let mut child = Command::new("true").spawn().expect("run true");
    let pid = child.id();
    child.wait().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} was reused already"
    );
    let pid = pid.to_string();
    let args = [OsStr::new("--json"), OsStr::new("--pid"), OsStr::new(&pid)];
    let run = run_memprof("memprof trace --pid <reaped pid>", &[], &args);
    assert_clean_error(&run, &["no such process"]);
}

#[test]
fn error_command_not_found() {
    require_root();
    for cmd in [
        "memprof-test-no-such-command",
        "/nonexistent/memprof-test-no-such-command",
    ] {
        let run = run_memprof(
            &format!("memprof trace -- {cmd}"),
            &[],
            &strs(&["--json", "--", cmd]),
        );
        assert_clean_error(&run, &["command not found"]);
    }
}

#[test]
fn error_static_binary_spawn() {
    let f = fixtures();
    let args = [
        OsStr::new("--json"),
        OsStr::new("--"),
        f.alloc_static.as_os_str(),
    ];
    let run = run_memprof("memprof trace -- alloc_sites_static", &[], &args);
    assert_clean_error(&run, &["static"]);
}

#[test]
fn error_static_binary_pid() {
    let f = fixtures();
    let target = start_target("alloc_sites_static --wait", &f.alloc_static, &["--wait"]);
    let pid = target.pid().to_string();
    let args = [OsStr::new("--json"), OsStr::new("--pid"), OsStr::new(&pid)];
    let run = run_memprof("memprof trace --pid <static pid>", &[], &args);
    assert_clean_error(&run, &["static", "libc"]);
    drop(target);
}

/// A world-executable copy of memprof (the build tree may not be reachable for an
/// unprivileged user), removed when dropped.
struct PublicCopy(PathBuf);

impl PublicCopy {
    fn new() -> PublicCopy {
        let dir = std::env::temp_dir().join(format!("memprof-trace-tests-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let copy = dir.join("memprof");
        fs::copy(MEMPROF, &copy).unwrap();
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
        PublicCopy(dir)
    }
}

impl Drop for PublicCopy {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn error_not_root() {
    require_root();
    let copy = PublicCopy::new();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(copy.0.join("memprof"))
        .args(["trace", "--json", "--", "/bin/true"])
        .current_dir("/");
    let run = Proc::spawn("setpriv (nobody) memprof trace -- /bin/true", &mut cmd).finish(DEADLINE);
    assert_clean_error(&run, &["root", "CAP_"]);
}

/// Root without CAP_BPF and CAP_SYS_ADMIN (either one lets the kernel load BPF programs) cannot
/// trace; memprof must say which capability is missing.
#[test]
fn error_missing_cap_bpf() {
    require_root();
    let wrapper = strs(&["setpriv", "--bounding-set=-bpf,-sys_admin"]);
    let run = run_memprof(
        "memprof trace -- /bin/true without CAP_BPF/CAP_SYS_ADMIN",
        &wrapper,
        &strs(&["--json", "--", "/bin/true"]),
    );
    assert_clean_error(&run, &["CAP_BPF"]);
}

// ---------------------------------------------------------------------------------------------
// README jq recipes
// ---------------------------------------------------------------------------------------------

const JQ_TOP3: &str = r#"select(.type=="report") | .leaks | group_by(.stack[0].function) | map({site: (.[0].stack[0].function // "?"), bytes: (map(.bytes) | add)}) | sort_by(-.bytes) | .[:3][] | "\(.site) \(.bytes)""#;
const JQ_OUTSTANDING: &str = r#"select(.type=="report") | .totals.outstanding_bytes"#;
const JQ_LOST: &str = r#"select(.type=="report") | .totals.lost_events"#;
const JQ_MMAP: &str = r#"select(.type=="report") | .mmap.outstanding_bytes"#;
const JQ_SNAPSHOTS: &str =
    r#"select(.type=="snapshot") | "\(.elapsed_s) \(.totals.outstanding_bytes)""#;

fn jq(filter: &str, raw: bool, input: &str) -> String {
    let mut cmd = Command::new("jq");
    if raw {
        cmd.arg("-r");
    }
    cmd.arg(filter)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("jq is needed for the README recipe test: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    let writer = thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "jq {filter:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn jq_recipes_on_real_report() {
    let (run, _) = pid_alloc_run(Build::Fp);
    run.assert_success();
    let report = run.report();
    let ctx = || summary(&report);
    assert_eq!(
        jq(JQ_TOP3, true, &run.stdout),
        "leak_big 8388608\nleak_mmap 49152\nleak_posix_memalign 24594\n",
        "top-3 recipe\n{}",
        ctx()
    );
    assert_eq!(
        jq(JQ_OUTSTANDING, false, &run.stdout),
        "8540498\n",
        "outstanding recipe\n{}",
        ctx()
    );
    assert_eq!(
        jq(JQ_LOST, false, &run.stdout),
        "0\n",
        "lost-events recipe\n{}",
        ctx()
    );
    assert_eq!(
        jq(JQ_MMAP, false, &run.stdout),
        "73728\n",
        "mmap recipe\n{}",
        ctx()
    );

    let snaps = spawn_trace(
        &["--interval", "200ms"],
        &alloc_cmd(Build::Fp, &["--sleep-ms", "600"]),
    );
    snaps.assert_success();
    let out = jq(JQ_SNAPSHOTS, true, &snaps.stdout);
    assert!(
        !out.is_empty(),
        "snapshot recipe printed nothing\n{}",
        snaps.context()
    );
    for line in out.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        assert!(
            parts.len() == 2 && parts[0].parse::<f64>().is_ok() && parts[1].parse::<u64>().is_ok(),
            "snapshot recipe line {line:?} is not `elapsed_s outstanding_bytes`"
        );
    }
}
