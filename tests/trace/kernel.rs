//! `--kernel`: the kernel's allocations on a traced process's behalf, on pipes.c, whose pipe
//! and socket buffers are known exactly: each pipe written full holds 16 pages (64 KiB), each
//! 32 KiB message written into a UNIX stream socket one order-3 page of data. The report is
//! taken (SIGINT) while the fixture still holds them.

use std::{path::PathBuf, process::Command, sync::OnceLock, time::Duration};

use serde_json::Value;

use super::report::summary;
use crate::common::{
    Checks, DEADLINE, FP, Finished, MEMPROF, Proc, clean_error, compile_c, frame_fn, leaks, num,
    send_signal, stack, start_target, start_trace, trace_while_held, work_dir,
};

/// pipes.c: 8 pipes of 64 KiB, half of them closed.
const PIPE_BYTES: u64 = 64 * 1024;
const PIPES_HELD: u64 = 4;
const PAGE: u64 = 4096;
/// pipes.c socket: 4 messages of 32 KiB, unread.
const MESSAGES: u64 = 4;
const MESSAGE_BYTES: u64 = 32 * 1024;

fn fixture() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| compile_c(&work_dir("memprof-kernel"), "pipes", "pipes.c", &[FP]))
}

/// pipes.c in `mode`, traced with `--kernel` and `opts` from before its workload until after
/// it, the report taken while it holds what it made.
fn held_run(mode: &str, opts: &[&str]) -> Finished {
    let target = start_target(&format!("pipes {mode}"), fixture(), &[mode]);
    let mut args = vec!["--kernel"];
    args.extend(opts);
    trace_while_held(target, &args)
}

/// The leak groups of `allocator` whose stack has the kernel frames `kernel` and then the user
/// frames `user` (each in that order, outermost last; other frames may come between).
fn kernel_groups<'a>(
    report: &'a Value,
    allocator: &str,
    kernel: &[&str],
    user: &[&str],
) -> Vec<&'a Value> {
    leaks(report)
        .iter()
        .filter(|g| g["allocator"] == allocator && stack_has(g, kernel, user))
        .collect()
}

fn stack_has(group: &Value, kernel: &[&str], user: &[&str]) -> bool {
    let frames = stack(group);
    let mut want = kernel
        .iter()
        .map(|f| (*f, "kernel"))
        .chain(user.iter().map(|f| (*f, "native")))
        .peekable();
    for f in frames {
        if let Some((name, kind)) = want.peek()
            && frame_fn(f) == Some(*name)
            && f["kind"] == *kind
        {
            want.next();
        }
    }
    want.peek().is_none()
}

/// (bytes, blocks) of some groups.
fn total(groups: &[&Value]) -> (u64, u64) {
    groups.iter().fold((0, 0), |(b, n), g| {
        (b + num(g, "bytes"), n + num(g, "allocs"))
    })
}

/// Every frame of a kernel group's stack is a kernel frame until the first user frame, and
/// no kernel frame follows a user one.
fn check_kernel_frames_first(c: &mut Checks, what: &str, group: &Value) {
    let kinds: Vec<&str> = stack(group)
        .iter()
        .map(|f| f["kind"].as_str().unwrap_or("?"))
        .collect();
    let user_at = kinds.iter().position(|k| *k != "kernel");
    c.check(
        user_at.is_some_and(|i| i > 0 && kinds[i..].iter().all(|k| *k != "kernel")),
        format!("{what}: kernel frames innermost, then user frames: {kinds:?}"),
    );
}

/// The pipe pages of the 4 pipes left open: 262144 bytes in 64 `page` blocks under
/// anon_pipe_write -> fill_pipe -> main, named `fill_pipe (kernel)`, in the report, folded
/// stacks and CSV; nothing lost, no free without its allocation.
#[test]
fn kernel_pipe_pages_exact() {
    let dir = work_dir("memprof-kernel");
    let folded = dir.join("pipes.folded");
    let csv = dir.join("pipes.csv");
    let run = held_run(
        "pipes",
        &[
            "--folded",
            folded.to_str().unwrap(),
            "--csv",
            csv.to_str().unwrap(),
        ],
    );
    let report = run.report();
    let mut c = Checks::new("--kernel, pipes.c pipes");
    let want = PIPES_HELD * PIPE_BYTES;
    let pipes = kernel_groups(
        &report,
        "page",
        &["anon_pipe_write"],
        &["fill_pipe", "main"],
    );
    c.eq(
        "page bytes and blocks under anon_pipe_write -> fill_pipe -> main",
        total(&pipes),
        (want, want / PAGE),
    );
    if let Some(g) = pipes.first() {
        check_kernel_frames_first(&mut c, "pipe pages", g);
    }
    let k = &report["kernel"];
    c.eq("kernel.kmem_full", num(k, "kmem_full"), 0);
    c.eq(
        "totals.lost_events",
        num(&report["totals"], "lost_events"),
        0,
    );
    c.eq(
        "totals.unmatched_frees",
        num(&report["totals"], "unmatched_frees"),
        0,
    );
    // The pipes themselves (pipe_inode_info, its buffer array) are kmalloc'd under pipe().
    c.check(
        !kernel_groups(&report, "kmalloc", &["alloc_pipe_info"], &["main"]).is_empty(),
        "a kmalloc group under alloc_pipe_info -> main",
    );

    let folded_text = std::fs::read_to_string(&folded).unwrap_or_default();
    let folded_line = folded_text
        .lines()
        .find(|l| l.contains(";fill_pipe;") && l.contains(";anon_pipe_write;"));
    c.check(
        folded_line.is_some_and(|l| l.ends_with(&format!(" {want}"))),
        format!("folded: the fill_pipe;...;anon_pipe_write stack holds {want}: {folded_line:?}"),
    );
    let csv_text = std::fs::read_to_string(&csv).unwrap_or_default();
    let header: Vec<&str> = csv_text.lines().next().unwrap_or("").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let row = csv_text.lines().find_map(|l| {
        let cells: Vec<&str> = l.split(',').collect();
        (cells.first() == Some(&"fill_pipe (kernel)")
            && col("allocator").and_then(|i| cells.get(i)) == Some(&"page"))
        .then_some(cells)
    });
    let cell = |name: &str| {
        row.as_ref()
            .and_then(|r| col(name).and_then(|i| r.get(i)))
            .and_then(|v| v.parse::<u64>().ok())
    };
    c.eq(
        "csv fill_pipe (kernel) page inuse_bytes",
        cell("inuse_bytes"),
        Some(want),
    );
    c.eq(
        "csv fill_pipe (kernel) page inuse_objects",
        cell("inuse_objects"),
        Some(want / PAGE),
    );
    c.finish(|| format!("{}\n{csv_text}\n{}", summary(&report), run.context()));
}

/// Four unread 32 KiB messages in a UNIX stream socket: their data, four order-3 pages
/// (131072 bytes), under unix_stream_sendmsg -> send_message -> main, and their skb heads
/// (kmalloc) and skbs (kmem_cache) under the same path.
#[test]
fn kernel_socket_buffers_exact() {
    let run = held_run("socket", &[]);
    let report = run.report();
    let mut c = Checks::new("--kernel, pipes.c socket");
    let path = (&["unix_stream_sendmsg"][..], &["send_message", "main"][..]);
    c.eq(
        "page bytes and blocks under unix_stream_sendmsg -> send_message -> main",
        total(&kernel_groups(&report, "page", path.0, path.1)),
        (MESSAGES * MESSAGE_BYTES, MESSAGES),
    );
    for allocator in ["kmalloc", "kmem_cache"] {
        let (_, blocks) = total(&kernel_groups(&report, allocator, path.0, path.1));
        c.check(
            blocks >= MESSAGES,
            format!(
                "{allocator}: {blocks} blocks under send_message, one skb part per message at least"
            ),
        );
    }
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
}

/// Spawn mode follows the command's children: two children each holding 4 pipes give 2 x
/// 262144 bytes of pipe pages in 128 blocks, each child's own in its `processes` entry.
#[test]
fn kernel_spawn_children() {
    let bin = fixture().to_str().unwrap().to_owned();
    let mut mp = start_trace(
        &[
            "--json",
            "--kernel",
            "--duration",
            "40s",
            "--",
            &bin,
            "children",
        ],
        String::new,
    );
    mp.expect_stderr_start("done", Duration::from_secs(30), String::new);
    mp.signal(libc::SIGINT);
    let run = mp.finish(DEADLINE);
    let report = run.report();
    let procs = report["processes"].as_array().cloned().unwrap_or_default();
    // The children outlive memprof: they hold their pipes until told to stop.
    for p in &procs {
        if let Some(pid) = p["pid"].as_u64() {
            send_signal(pid as u32, libc::SIGTERM);
        }
    }
    let mut c = Checks::new("--kernel, spawn, pipes.c children");
    let want = PIPES_HELD * PIPE_BYTES;
    let path = (&["anon_pipe_write"][..], &["fill_pipe", "main"][..]);
    c.eq(
        "page bytes and blocks under anon_pipe_write -> fill_pipe -> main",
        total(&kernel_groups(&report, "page", path.0, path.1)),
        (2 * want, 2 * want / PAGE),
    );
    let children: Vec<&Value> = procs.iter().filter(|p| !p["parent"].is_null()).collect();
    c.eq("children in processes", children.len(), 2);
    for p in children {
        c.eq(
            &format!("child {} pipe pages", p["pid"]),
            total(&kernel_groups(p, "page", path.0, path.1)),
            (want, want / PAGE),
        );
    }
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
}

/// Without tracefs (unmounted in a mount namespace of its own) `--kernel` fails with one line
/// that says what it needs, and a non-zero status.
#[test]
fn kernel_without_tracefs_is_a_clean_error() {
    crate::common::require_root();
    let script = format!(
        "for m in /sys/kernel/debug/tracing /sys/kernel/tracing /sys/kernel/debug; do \
         umount $m 2>/dev/null; done; exec {MEMPROF} trace --kernel -- /bin/true"
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let run = Proc::spawn("memprof trace --kernel without tracefs", &mut cmd).finish(DEADLINE);
    let (mut c, line) = clean_error(&run, "--kernel without tracefs".to_string());
    c.check(
        line.contains("--kernel needs tracefs"),
        format!("the error should say --kernel needs tracefs: {line:?}"),
    );
    c.finish(|| run.context());
}
