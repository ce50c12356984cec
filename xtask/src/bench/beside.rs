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
    Mode, TRAPPED_NS,
    proc::{Guarded, comm, descendants},
    run::{human_ns, median, run_once, wait_for_line},
};

/// The command memprof traces: a shell whose `sleep` is a child of its own (`; true` keeps the
/// shell from exec'ing it). Ended by the bench once the churn loop is done.
const TRACED: &str = "sleep 600; true";

/// Pairs of churn runs (one alone, one beside memprof) per rep: a run is short and the machine
/// may be busy, so the two runs of a pair go back to back, in alternating order.
const PAIRS_PER_REP: usize = 5;

/// Measures `churn` (`ops` pairs) alone and beside memprof, in `reps` × `PAIRS_PER_REP` pairs
/// of runs; the ratio is the median of the pairs' ratios, so that the machine's other load,
/// which changes from second to second, weighs on both runs of a pair alike. The fastest runs
/// are compared too: other load only ever slows a run, breakpoints slow every one.
pub(super) fn beside(
    memprof: &Path,
    churn: &Path,
    ops: u64,
    reps: usize,
    md: &mut String,
    json: &mut Vec<String>,
) -> Result<()> {
    let command: Vec<OsString> = vec![churn.into(), ops.to_string().into()];
    let churn_once = || -> Result<f64> {
        let r = run_once(memprof, None, Mode::Untraced, &command, false, false)?;
        Ok(r.elapsed_ns / r.ops.max(1.0))
    };
    let (mut alone, mut beside, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 0..reps * PAIRS_PER_REP {
        let alone_first = pair % 2 == 0;
        if alone_first {
            alone.push(churn_once()?);
        }
        beside.push(beside_memprof(memprof, churn_once)?);
        if !alone_first {
            alone.push(churn_once()?);
        }
        ratios.push(beside[pair] / alone[pair].max(1e-9));
    }
    let runs = ratios.len();
    // Breakpoints in a loop that ran alone are another tracer's (in one beside memprof they
    // may be memprof's: the ratio shows that).
    let trapped = alone.iter().any(|&ns| ns > TRAPPED_NS);
    let fastest = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let best_ratio = fastest(&beside) / fastest(&alone).max(1e-9);
    let (alone, beside, ratio) = (median(alone), median(beside), median(ratios));
    let _ = writeln!(
        md,
        "\nAn unrelated process beside memprof: churn ({ops} pairs, untraced) took {} per pair \
         alone and {} while `memprof trace -- sh -c '{TRACED}'` traced the shell and its child \
         (medians of {runs} runs each); median ratio of {runs} back-to-back pairs: {ratio:.3}× \
         (goal: within 5%); fastest run beside ÷ fastest alone: {best_ratio:.3}×.{}",
        human_ns(alone),
        human_ns(beside),
        if trapped {
            format!(
                " Warning: some runs alone took over {TRAPPED_NS:.0} ns per pair: \
                 another tracer's probes were in every process using libc meanwhile (another \
                 memprof --all, bpftrace, ...); these numbers say nothing about memprof."
            )
        } else {
            String::new()
        }
    );
    json.push(format!(
        "{{\"beside\":\"churn\",\"traced\":\"sh -c '{TRACED}'\",\"ops\":{ops},\"pairs\":{runs},\"alone_ns_per_op\":{alone:.2},\"beside_ns_per_op\":{beside:.2},\"beside_x_alone\":{ratio:.3},\"fastest_beside_x_fastest_alone\":{best_ratio:.3},\"foreign_probes_seen\":{trapped}}}"
    ));
    eprintln!("bench: churn beside memprof: {ratio:.3}× alone");
    if trapped {
        eprintln!(
            "bench: warning: the churn loop alone hit breakpoints: another tracer was \
             probing libc system-wide"
        );
    }
    Ok(())
}

/// Runs `churn` once while memprof traces `sh -c TRACED`, once the shell's child is traced.
fn beside_memprof(memprof: &Path, churn: impl Fn() -> Result<f64>) -> Result<f64> {
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
    let per_op = churn()?;
    // The traced command ends; memprof reports and exits.
    for pid in descendants(tracer.id()) {
        // SAFETY: signalling the processes memprof spawned for the bench.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    tracer.wait_for(Duration::from_secs(60))?;
    Ok(per_op)
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
