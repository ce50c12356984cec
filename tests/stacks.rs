//! End-to-end tests of stacks on the distribution's own programs, built without frame pointers,
//! in the default mode (`--unwind tables`): Debian's sqlite3 and python3 (installed by `cargo
//! xtask setup`), with the real `memprof` binary and real eBPF.
//!
//! - sqlite3 building a 100,000-row table with an index: the bytes whose stack reaches the
//!   program's entry, the walk's end of every stack, and no lost event.
//! - sqlite3 on a workload that allocates the same in every run, against valgrind's DHAT: the
//!   same number of allocations, bytes and peak, to the byte.
//! - python3 running tests/fixtures/pyorder.py: Python frames in their place among native ones
//!   (zlib, the `_json` accelerator, the `sqlite3` module, a ctypes call), whole stacks.
//!
//! Needs root: `cargo test --release -p memprof-user --test stacks -- --test-threads=1`.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{
    Checks, FIXTURE_SRC, Finished, Proc, final_report, frame_fn, memprof_trace, num, require_root,
    stack,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(120);

const SQLITE3: &str = "/usr/bin/sqlite3";
const PYTHON3: &str = "/usr/bin/python3";

/// The SQL of the sqlite3 workload: 100,000 rows of random text, then an index on it.
const SQL: &str = "create table t(a integer primary key, b text, c text);
with recursive r(i) as (select 1 union all select i + 1 from r where i < 100000)
  insert into t select i, hex(randomblob(20)), 'row' || i from r;
create index ti on t(b);
select count(*) from t;";

/// Runs `memprof trace --json -- ARGS` in the default mode: to the end, or with `until`, until
/// the command prints that line and then stopped with SIGINT (the report then holds what the
/// command had outstanding, before its own clean-up at exit).
fn trace(args: &[&str], until: Option<&str>) -> (Finished, Value) {
    require_root();
    for program in [SQLITE3, PYTHON3] {
        assert!(
            Path::new(program).exists(),
            "{program} is missing: `cargo xtask setup` installs it"
        );
    }
    let mut all = vec!["--json", "--duration", "100s", "--"];
    all.extend(args);
    let mp = Proc::spawn(
        format!("memprof trace {}", all.join(" ")),
        &mut memprof_trace(&all),
    );
    if let Some(line) = until {
        // With --json the command's output goes to memprof's stderr.
        let deadline = Instant::now() + DEADLINE;
        assert!(
            mp.err.wait_line(deadline, |l| l == line).is_some(),
            "the command did not print {line:?}\n{}",
            mp.output_so_far()
        );
        mp.signal(libc::SIGINT);
    }
    let run = mp.finish(DEADLINE);
    let report = final_report(&run);
    (run, report)
}

/// Every group of the report (leaks and churn sites).
fn groups(r: &Value) -> Vec<&Value> {
    ["leaks", "churn_hotspots"]
        .iter()
        .filter_map(|k| r[k].as_array())
        .flatten()
        .collect()
}

fn names(g: &Value) -> Vec<&str> {
    stack(g)
        .iter()
        .map(|f| frame_fn(f).unwrap_or("?"))
        .collect()
}

fn is_python(f: &Value) -> bool {
    f["kind"] == "python"
}

/// Index of the first frame named `name` (exactly, or as the C library's start routine
/// under any of its names).
fn position(g: &Value, name: &str) -> Option<usize> {
    names(g).iter().position(|n| *n == name)
}

/// Whether the stack's outermost native frames are the C library's start of `main`.
fn reaches_libc_start(g: &Value) -> bool {
    names(g).iter().any(|n| {
        matches!(
            *n,
            "__libc_start_main" | "__libc_start_main_impl" | "__libc_start_call_main"
        )
    })
}

/// Checks the default mode's walk report: tables, the share of bytes reaching the entry, and
/// nothing lost.
fn check_walks(c: &mut Checks, r: &Value, min_share: f64) {
    let u = &r["unwind"];
    c.eq("unwind mode", u["mode"].as_str(), Some("tables"));
    let share = u["tables"]["entry_share"].as_f64().unwrap_or(0.0);
    c.check(
        share >= min_share,
        format!("share of bytes reaching the entry {share} < {min_share}: {u}"),
    );
    c.eq("lost events", num(&r["totals"], "lost_events"), 0);
    c.eq("ring full", num(&r["kernel"], "ring_full"), 0);
    c.eq("stacks lost", num(&r["kernel"], "stack_lost"), 0);
}

/// A sqlite3 workload whose allocations are the same in every run (no random keys).
const SQL_FIXED: &str = "create table t(a integer primary key, b text, c real);
with recursive n(i) as (select 1 union all select i + 1 from n where i < 20000)
  insert into t select i, hex((i * 2654435761) % 4294967291), i * 1.5 from n;
create index tb on t(b);
select count(*), sum(c) from t where b like 'A%';";

/// `N bytes in M blocks` after `label` in valgrind's DHAT summary on stderr.
fn dhat_summary(stderr: &str, label: &str) -> Option<(u64, u64)> {
    let line = stderr
        .lines()
        .find_map(|l| l.split_once(label).map(|(_, r)| r))?;
    let digits = |s: &str| s.trim().replace(',', "").parse::<u64>().ok();
    let (bytes, rest) = line.split_once(" bytes in ")?;
    let blocks = rest.strip_suffix(" blocks")?;
    Some((digits(bytes)?, digits(blocks)?))
}

/// Debian's sqlite3 (no frame pointers) in the default mode, against valgrind's DHAT on the
/// same workload: the same allocations, bytes and peak, to the byte.
#[test]
fn sqlite3_totals_and_peak_equal_valgrind_dhat() {
    require_root();
    let vg = std::process::Command::new("valgrind")
        .args([
            "--tool=dhat",
            "--dhat-out-file=/dev/null",
            SQLITE3,
            ":memory:",
            SQL_FIXED,
        ])
        .output()
        .expect("valgrind is missing: `cargo xtask setup` installs it");
    let vg_err = String::from_utf8_lossy(&vg.stderr);
    assert!(
        vg.status.success(),
        "valgrind --tool=dhat sqlite3 failed:\n{vg_err}"
    );
    let total = dhat_summary(&vg_err, "Total:");
    let gmax = dhat_summary(&vg_err, "At t-gmax:");
    let (run, r) = trace(&[SQLITE3, ":memory:", SQL_FIXED], None);
    let t = &r["totals"];
    let mut c = Checks::new("Debian sqlite3 against valgrind's DHAT");
    c.eq("lost events", num(t, "lost_events"), 0);
    c.eq(
        "(bytes, allocations) = DHAT's Total",
        Some((num(t, "bytes_allocated"), num(t, "allocs"))),
        total,
    );
    c.eq(
        "peak outstanding bytes = DHAT's t-gmax",
        Some(num(t, "peak_outstanding_bytes")),
        gmax.map(|g| g.0),
    );
    c.finish(|| format!("valgrind:\n{vg_err}\n{}", run.context()));
}

/// Debian's sqlite3 with walks reused (the default) and with every stack walked afresh: the same
/// call sites, each with the same stack, bytes, counts, frees and peak, to the byte; and most
/// walks were reused.
#[test]
fn sqlite3_reused_walks_give_the_stacks_of_fresh_walks() {
    require_root();
    let dir = common::work_dir("memprof-stacks-reuse");
    let run = |opts: &[&str], name: &str| {
        let csv = dir.join(name);
        let mut all = vec![
            "--json",
            "--duration",
            "100s",
            "--csv",
            csv.to_str().unwrap(),
        ];
        all.extend(opts);
        all.extend(["--", SQLITE3, ":memory:", SQL_FIXED]);
        let mp = Proc::spawn(
            format!("memprof trace {}", all.join(" ")),
            &mut memprof_trace(&all),
        );
        let run = mp.finish(DEADLINE);
        let report = final_report(&run);
        let text = std::fs::read_to_string(&csv).unwrap_or_default();
        // Every column but the verdict, growth rate and resident bytes (timing and pages).
        let mut rows: Vec<String> = text
            .lines()
            .map(|l| {
                let cols: Vec<&str> = l.split(',').collect();
                let keep: Vec<&str> = cols
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !matches!(i, 10 | 11 | 13))
                    .map(|(_, c)| *c)
                    .collect();
                keep.join(",")
            })
            .collect();
        rows.sort();
        (run, report, rows)
    };
    let (run_a, a, rows_a) = run(&[], "reused.csv");
    let (run_b, b, rows_b) = run(&["--no-walk-reuse"], "fresh.csv");
    let mut c = Checks::new("sqlite3: reused walks against fresh ones");
    let reused = |r: &Value| num(&r["unwind"]["tables"], "cached_walks");
    let allocs = num(&a["unwind"], "allocations");
    c.check(
        reused(&a) * 2 > allocs,
        format!("most walks reused: {} of {allocs}", reused(&a)),
    );
    c.eq("walks reused with --no-walk-reuse", reused(&b), 0);
    c.check(rows_a.len() > 100, format!("call sites: {}", rows_a.len()));
    c.eq("call sites, stacks, bytes and counts", &rows_a, &rows_b);
    c.eq(
        "lost events",
        (
            num(&a["totals"], "lost_events"),
            num(&b["totals"], "lost_events"),
        ),
        (0, 0),
    );
    c.finish(|| format!("{}\n{}", run_a.context(), run_b.context()));
}

#[test]
fn sqlite3_stacks_reach_the_entry_without_frame_pointers() {
    let (run, r) = trace(&[SQLITE3, ":memory:", SQL], None);
    let mut c = Checks::new("Debian sqlite3, default mode");
    check_walks(&mut c, &r, 0.95);
    // The tables' walk reached the entry for (nearly) everything: what did not says why.
    let ends = r["unwind"]["tables"]["ends"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let entry = ends.get("entry").and_then(Value::as_u64).unwrap_or(0);
    let bytes = num(&r["unwind"]["tables"], "bytes");
    c.eq(
        "bytes by end add up",
        ends.values().filter_map(Value::as_u64).sum::<u64>(),
        bytes,
    );
    c.check(
        entry * 100 >= bytes * 95,
        format!("entry {entry} of {bytes}"),
    );
    c.check(
        num(&r["totals"], "allocs") >= 100_000,
        format!("allocations: {}", r["totals"]),
    );
    // Allocations made while sqlite3 runs its statements: sqlite3's API between the library's
    // allocator and the shell, down to the C library's start.
    let through_api: Vec<&Value> = groups(&r)
        .into_iter()
        .filter(|g| position(g, "sqlite3_step").is_some() || position(g, "sqlite3_exec").is_some())
        .collect();
    c.check(
        !through_api.is_empty(),
        "a group through sqlite3_step or sqlite3_exec",
    );
    for g in &through_api {
        c.check(
            reaches_libc_start(g),
            format!("whole stack through the API: {:?}", names(g)),
        );
    }
    c.finish(|| run.context());
}

#[test]
fn python_frames_sit_where_the_interpreter_ran_them() {
    let script = format!("{FIXTURE_SRC}/pyorder.py");
    let (run, r) = trace(&[PYTHON3, &script], Some("done"));
    let mut c = Checks::new("Debian python3, Python frames among native ones");
    check_walks(&mut c, &r, 0.95);
    let all = groups(&r);
    // Each run of Python frames sits just outside a frame of the eval loop (the C call that
    // ran them), and the native frames inside it (what the Python code called) come first.
    let mut mixed = 0;
    for g in &all {
        let frames = stack(g);
        let n = names(g);
        for (i, f) in frames.iter().enumerate() {
            if is_python(f) && i > 0 && !is_python(&frames[i - 1]) {
                mixed += 1;
                c.eq(
                    &format!("frame inside the Python frames at {i} of {n:?}"),
                    n[i - 1],
                    "_PyEval_EvalFrameDefault",
                );
            }
        }
        c.check(
            !frames.first().is_some_and(is_python),
            format!("a native allocation's stack starts with a native frame: {n:?}"),
        );
    }
    c.check(mixed > 0, "groups with Python frames");
    // Each workload: the native code that allocated, then the eval loop, then the Python
    // function that called it, then the outer Python frames, then the interpreter's native
    // frames down to the C library's start.
    for (function, native) in [
        ("compressors", "deflateInit2_"),
        ("database", "sqlite3_step"),
        ("native_buffer", "ffi_call"),
    ] {
        let found: Vec<&&Value> = all
            .iter()
            .filter(|g| position(g, native).is_some() && position(g, function).is_some())
            .collect();
        c.check(
            !found.is_empty(),
            format!("a group through {native} and {function}"),
        );
        for g in found {
            let n = names(g);
            let (at_native, at_py) = (position(g, native).unwrap(), position(g, function).unwrap());
            let first_py = stack(g).iter().position(is_python).unwrap_or(n.len());
            c.check(
                at_native < first_py && first_py == at_py,
                format!("{native} inside {function}, the innermost Python frame: {n:?}"),
            );
            c.eq(
                &format!("{function}'s caller in {n:?}"),
                n.get(at_py + 1).copied(),
                Some("main"),
            );
            c.check(
                reaches_libc_start(g),
                format!("{function}: whole stack: {n:?}"),
            );
        }
    }
    // json.dumps runs the C accelerator from JSONEncoder.iterencode: frames of `_json` inside.
    let json: Vec<&&Value> = all
        .iter()
        .filter(|g| {
            stack(g).iter().any(|f| {
                f["module"]
                    .as_str()
                    .is_some_and(|m| m.rsplit('/').next().unwrap_or("").starts_with("_json"))
            }) && names(g).iter().any(|n| n.ends_with("iterencode"))
        })
        .collect();
    c.check(!json.is_empty(), "a group through _json and iterencode");
    for g in json {
        let frames = stack(g);
        let first_py = frames.iter().position(is_python).unwrap_or(frames.len());
        let at_json = frames.iter().position(|f| {
            f["module"]
                .as_str()
                .is_some_and(|m| m.rsplit('/').next().unwrap_or("").starts_with("_json"))
        });
        c.check(
            at_json.is_some_and(|j| j < first_py) && names(g)[first_py].ends_with("iterencode"),
            format!("_json inside iterencode: {:?}", names(g)),
        );
    }
    // ctypes: ten buffers of 100,000 bytes, one group.
    let buffers: Vec<&&Value> = all
        .iter()
        .filter(|g| position(g, "native_buffer").is_some() && num(g, "bytes") == 1_000_000)
        .collect();
    c.eq("groups of the ctypes buffers", buffers.len(), 1);
    if let Some(g) = buffers.first() {
        c.eq("ctypes buffers", num(g, "allocs"), 10);
    }
    c.finish(|| run.context());
}
