//! Running the memprof binary under test: spawn mode to the end, attaching to a waiting
//! fixture, and waiting for a trace's probes to go.

use std::{
    ffi::{OsStr, OsString},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use super::{Checks, Finished, Proc, STARTUP, start_target};

/// The memprof binary under test.
pub(crate) const MEMPROF: &str = env!("CARGO_BIN_EXE_memprof");
/// Harness deadline for any one process; every trace also gets memprof's own `--duration`
/// safety net, which is shorter, so a stuck trace still ends with memprof's report.
pub(crate) const DEADLINE: Duration = Duration::from_secs(60);
pub(crate) const SAFETY_NET: &str = "40s";

pub(crate) fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// The arguments joined by spaces, for messages.
pub(crate) fn show(args: &[impl AsRef<OsStr>]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `memprof trace ARGS`.
pub(crate) fn memprof_trace(args: &[impl AsRef<OsStr>]) -> Command {
    let mut cmd = Command::new(MEMPROF);
    cmd.arg("trace").args(args);
    cmd
}

/// `memprof trace ARGS`, to the end (killed at `deadline`).
pub(crate) fn run_trace(args: &[impl AsRef<OsStr>], deadline: Duration) -> Finished {
    let what = format!("memprof trace {}", show(args));
    Proc::spawn(what, &mut memprof_trace(args)).finish(deadline)
}

/// `memprof trace --json --duration SAFETY_NET OPTS -- COMMAND...`, to the end.
pub(crate) fn spawn_trace(opts: &[&str], command: &[impl AsRef<OsStr>]) -> Finished {
    let mut args = os(&["--json", "--duration", SAFETY_NET]);
    args.extend(os(opts));
    args.push("--".into());
    args.extend(command.iter().map(|a| a.as_ref().to_owned()));
    run_trace(&args, DEADLINE)
}

/// Starts `memprof trace ARGS` and returns it once it prints `memprof: tracing ...` on stderr;
/// panics with its output and `more` if that does not come within STARTUP.
pub(crate) fn start_trace(args: &[impl AsRef<OsStr>], more: impl FnOnce() -> String) -> Proc {
    let what = format!("memprof trace {}", show(args));
    let mut mp = Proc::spawn(what, &mut memprof_trace(args));
    mp.expect_stderr_start("memprof: tracing ", STARTUP, more);
    mp
}

/// `memprof trace --json --pid PID OPTS` (with the safety net unless OPTS has --duration),
/// returned once memprof says `memprof: tracing pid`.
pub(crate) fn attach(target: &Proc, opts: &[&str]) -> Proc {
    let pid = target.pid().to_string();
    let mut args = vec!["--json", "--pid", pid.as_str()];
    if !opts.contains(&"--duration") {
        args.extend(["--duration", SAFETY_NET]);
    }
    args.extend(opts);
    start_trace(&args, || target.output_so_far())
}

/// Pid mode around a workload: attaches to `target` (which prints `ready`, waits for
/// SIGUSR1, then prints `done` and holds what it made) with `opts`, lets it go, and takes the
/// report (SIGINT) while it holds; then stops it.
pub(crate) fn trace_while_held(mut target: Proc, opts: &[&str]) -> Finished {
    let mp = attach(&target, opts);
    target.signal(libc::SIGUSR1);
    target.expect_stdout_line("done");
    mp.signal(libc::SIGINT);
    let run = mp.finish(DEADLINE);
    target.stop(libc::SIGTERM, Duration::from_secs(5));
    run
}

/// Pid mode to the end: start `program args` (which must support --wait), attach with memprof
/// options `opts`, release it with SIGUSR1 and wait for memprof to end after the target exits.
/// Returns (memprof, target).
pub(crate) fn pid_trace(
    what: &str,
    program: &Path,
    args: &[&str],
    opts: &[&str],
) -> (Finished, Finished) {
    let target = start_target(what, program, args);
    let mp = attach(&target, opts);
    target.signal(libc::SIGUSR1);
    let target_done = target.finish(DEADLINE);
    let mp_done = mp.finish(DEADLINE);
    (mp_done, target_done)
}

/// Waits until no memprof process is left (up to 60 s). After a trace, a background memprof
/// process removes the probes, one at a time; probes that follow children or cover every
/// process are in every process mapping the C library until then, which a program that does
/// not run its code natively (valgrind) sees as breakpoints.
pub(crate) fn wait_for_probe_removal() {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let busy = std::fs::read_dir("/proc")
            .map(|dir| {
                dir.filter_map(Result::ok).any(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim_end() == "memprof")
                })
            })
            .unwrap_or(false);
        if !busy || Instant::now() >= deadline {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The checks of a run that must fail cleanly: a non-zero exit, no panic, and exactly one
/// stderr line, starting `memprof: `. Returns them (to add to and finish) with that line.
pub(crate) fn clean_error(run: &Finished, what: String) -> (Checks, String) {
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let mut c = Checks::new(what);
    c.check(
        run.code().is_some_and(|c| c != 0),
        format!("exit status should be non-zero, got {:?}", run.status),
    );
    c.check(!run.stderr.contains("panicked"), "memprof panicked");
    c.check(
        lines.len() == 1,
        format!("stderr should be exactly one line, got {}", lines.len()),
    );
    let first = lines.first().copied().unwrap_or("").to_string();
    c.check(
        first.starts_with("memprof: "),
        format!("error line should start with `memprof: `: {first:?}"),
    );
    (c, first)
}
