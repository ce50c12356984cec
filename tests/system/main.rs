//! End-to-end tests of multi-process tracing and faults, with the real `memprof` binary and real
//! eBPF: forks and execs followed from a spawned command, `--all` with concurrent leaking
//! processes (one started after memprof attached, one exiting mid-trace), `--comm`, a process
//! under its own root (a container's mount namespace), SIGKILL of memprof (no probe left in the
//! target), ring-buffer overload (counted, never silent) and a short soak of the agent's memory.
//!
//! Fixture: tests/fixtures/procs.c. Needs root, `cc` and util-linux's `unshare`:
//! `cargo test --release -p memprof-user --test system -- --test-threads=1`.

#[path = "../common/mod.rs"]
mod common;

mod children;
mod container;
mod faults;
mod selection;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use common::{Checks, Driven, FP, Finished, Proc, compile_c, final_report, require_root, work_dir};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(90);

/// The procs fixture, compiled once.
fn procs() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    require_root();
    BIN.get_or_init(|| compile_c(&work_dir("memprof-system"), "procs", "procs.c", &[FP]))
}

/// A `procs leak COUNT SIZE` process, ready and waiting for its go: `go("leaked")` makes it
/// leak and waits until it has; `finish` lets it exit.
fn leaker(count: u64, size: u64) -> Driven {
    Driven::start(
        "procs leak",
        Command::new(procs()).args(["leak", &count.to_string(), &size.to_string()]),
    )
}

/// SIGINT to a trace that runs until stopped: its run and final report.
fn interrupt(mp: Proc) -> (Finished, Value) {
    mp.signal(libc::SIGINT);
    let f = mp.finish(DEADLINE);
    let r = final_report(&f);
    (f, r)
}

/// The `processes` entry of `pid`.
fn process(report: &Value, pid: u32) -> Option<&Value> {
    report["processes"]
        .as_array()?
        .iter()
        .find(|p| p["pid"].as_u64() == Some(u64::from(pid)))
}

/// The `processes` entry of `pid`, or a failed check that `who` is not reported.
fn reported<'a>(c: &mut Checks, report: &'a Value, pid: u32, who: &str) -> Option<&'a Value> {
    let entry = process(report, pid);
    c.check(
        entry.is_some(),
        format!("no processes entry for {who} (pid {pid})"),
    );
    entry
}

/// "pid ROLE N" lines the tree fixture prints (on memprof's stderr in --json spawn mode).
fn role_pid(text: &str, role: &str) -> u32 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("pid {role} ")))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `pid {role}` line in:\n{text}"))
}

/// Bytes of the executable mappings of `path` in process `pid` that differ from the file: a
/// uprobe is an int3 written into the process's copy of the page.
fn patched_bytes(pid: u32, path_suffix: &str) -> usize {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut differing = 0;
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || !fields[1].contains('x') || !fields[5].ends_with(path_suffix) {
            continue;
        }
        let (start, end) = fields[0].split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let offset = u64::from_str_radix(fields[2], 16).unwrap() as usize;
        let file = fs::read(format!("/proc/{pid}/root{}", fields[5])).unwrap();
        let mut live = vec![0u8; (end - start) as usize];
        use std::os::unix::fs::FileExt as _;
        mem.read_exact_at(&mut live, start).unwrap();
        let end_in_file = (offset + live.len()).min(file.len());
        differing += live[..end_in_file - offset]
            .iter()
            .zip(&file[offset..end_in_file])
            .filter(|(a, b)| a != b)
            .count();
    }
    differing
}
