//! End-to-end tests of `memprof trace` (this crate and tests/fixtures/ are owned by the tests/
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
//! README jq recipes, tested verbatim by `recipes::jq_recipes_on_real_report` (NDJSON from
//! `--json`):
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

#[path = "../common/mod.rs"]
mod common;

mod ctypes;
mod errors;
mod facts;
mod kernel;
mod pid;
mod recipes;
mod report;
mod spawn;
mod threads;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use common::{
    FIXTURE_SRC, FP, Finished, compile_c, os, pid_trace, python, require_root, spawn_trace,
    work_dir,
};

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

/// Compiles every fixture once per test process (and checks root first).
fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    require_root();
    FIXTURES.get_or_init(|| {
        let dir = work_dir("memprof-fixtures");
        let build = |name: &str, source: &str, flags: &[&str]| compile_c(&dir, name, source, flags);
        let nofp = "-fomit-frame-pointer";
        Fixtures {
            alloc_fp: build("alloc_sites_fp", "alloc_sites.c", &[FP]),
            alloc_nofp: build("alloc_sites_nofp", "alloc_sites.c", &[nofp]),
            // Stripped: memprof traces static binaries through their symbol table, so the
            // error cases need one without.
            alloc_static: build(
                "alloc_sites_static",
                "alloc_sites.c",
                &[FP, "-static", "-s"],
            ),
            threads_fp: build("threads_fp", "threads.c", &[FP, "-pthread"]),
            threads_nofp: build("threads_nofp", "threads.c", &[nofp, "-pthread"]),
            python: python(),
            py_script: Path::new(FIXTURE_SRC).join("ctypes_native.py"),
        }
    })
}

fn alloc_cmd(build: Build, args: &[&str]) -> Vec<OsString> {
    let mut v = vec![fixtures().alloc(build).as_os_str().to_owned()];
    v.extend(os(args));
    v
}

fn spawn_alloc_run(build: Build) -> &'static Finished {
    static WITH_FP: OnceLock<Finished> = OnceLock::new();
    static WITHOUT_FP: OnceLock<Finished> = OnceLock::new();
    let cell = if build == Build::Fp {
        &WITH_FP
    } else {
        &WITHOUT_FP
    };
    cell.get_or_init(|| spawn_trace(&[], &alloc_cmd(build, &[])))
}

fn pid_alloc_run(build: Build) -> &'static (Finished, Finished) {
    static WITH_FP: OnceLock<(Finished, Finished)> = OnceLock::new();
    static WITHOUT_FP: OnceLock<(Finished, Finished)> = OnceLock::new();
    let cell = if build == Build::Fp {
        &WITH_FP
    } else {
        &WITHOUT_FP
    };
    cell.get_or_init(|| {
        pid_trace(
            "alloc_sites --wait --exit 3",
            fixtures().alloc(build),
            &["--wait", "--exit", "3"],
            &[],
        )
    })
}
