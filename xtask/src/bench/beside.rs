//! Harmless to other processes: an untraced churn loop alone, and again while memprof traces a
//! spawned command whose child it follows. Its probes belong in the traced processes only, so
//! the churn loop should run at the same speed.

use std::{
    ffi::OsString,
    fmt::Write as _,
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::{
    Mode,
    proc::{Guarded, comm, descendants},
    run::{human_ns, median, run_once, wait_for_line},
};

/// The command memprof traces: a shell whose `sleep` is a child of its own (`; true` keeps the
/// shell from exec'ing it). Ended by the bench once the churn loop is done.
const TRACED: &str = "sleep 600; true";

/// Churn runs in a row in each state of a rep: a run is short, the machine may be busy.
const RUNS_PER_REP: usize = 3;

/// Measures `churn` (`ops` pairs) alone and beside memprof, `reps` times each, interleaved
/// (each rep: runs alone, then memprof starts and the same runs go beside it).
pub(super) fn beside(
    memprof: &Path,
    churn: &Path,
    ops: u64,
    reps: usize,
    md: &mut String,
    json: &mut Vec<String>,
) -> Result<()> {
    let command: Vec<OsString> = vec![churn.into(), ops.to_string().into()];
    let per_op = |r: super::Run| r.elapsed_ns / r.ops.max(1.0);
    let (mut alone, mut beside) = (Vec::new(), Vec::new());
    let churn_once = || run_once(memprof, None, Mode::Untraced, &command, false, false);
    for _ in 0..reps {
        for _ in 0..RUNS_PER_REP {
            alone.push(per_op(churn_once()?));
        }
        let mut tracer = Guarded::spawn(
            Command::new(memprof)
                .args(["trace", "--", "sh", "-c", TRACED])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
            "memprof",
        )?;
        wait_for_line(&mut tracer.child, "memprof: tracing", true)?;
        wait_for_traced_sleep(tracer.id())?;
        for _ in 0..RUNS_PER_REP {
            beside.push(per_op(churn_once()?));
        }
        // The traced command ends; memprof reports and exits.
        for pid in descendants(tracer.id()) {
            // SAFETY: signalling the processes memprof spawned for the bench.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        tracer.wait_for(Duration::from_secs(60))?;
    }
    let (alone, beside) = (median(alone), median(beside));
    let ratio = beside / alone.max(1e-9);
    let _ = writeln!(
        md,
        "\nAn unrelated process beside memprof: churn ({ops} pairs, untraced) took {} per pair \
         alone and {} while `memprof trace -- sh -c '{TRACED}'` traced the shell and its child \
         (median of {} runs, {RUNS_PER_REP} per rep): {ratio:.3}× (goal: within 5%).",
        human_ns(alone),
        human_ns(beside),
        reps * RUNS_PER_REP
    );
    json.push(format!(
        "{{\"beside\":\"churn\",\"traced\":\"sh -c '{TRACED}'\",\"ops\":{ops},\"alone_ns_per_op\":{alone:.2},\"beside_ns_per_op\":{beside:.2},\"beside_x_alone\":{ratio:.3}}}"
    ));
    eprintln!("bench: churn beside memprof: {ratio:.3}× alone");
    Ok(())
}

/// Waits until the shell's `sleep` child runs (memprof stops a new child until its probes
/// are in, then lets it go), at most 30 s.
fn wait_for_traced_sleep(memprof: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let running = descendants(memprof).into_iter().any(|pid| {
            comm(pid).as_deref() == Some("sleep") && state(pid).is_some_and(|s| !matches!(s, 'T' | 't'))
        });
        if running {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("the traced shell's sleep did not start running within 30 s")
}

/// The state letter in `/proc/PID/stat` (`R`, `S`, `T` for stopped, ...).
fn state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}
