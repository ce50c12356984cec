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
/// are compared too: other load only ever slows a run, breakpoints slow every one. Pairs with
/// another tracer's breakpoints in the run alone are left out (see `summarize`).
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
    let mut pairs = Vec::new();
    let mut cpu_shares = Vec::new();
    for pair in 0..reps * PAIRS_PER_REP {
        let alone_first = pair % 2 == 0;
        let mut alone = if alone_first { churn_once()? } else { 0.0 };
        let (beside, cpu_share) = beside_memprof(memprof, churn_once)?;
        if !alone_first {
            alone = churn_once()?;
        }
        pairs.push((alone, beside));
        cpu_shares.push(cpu_share);
    }
    let cpu_share = median(cpu_shares);
    let summary = summarize(&pairs);
    let traced = format!("`memprof trace -- sh -c '{TRACED}'`");
    let dropped = match summary.dropped {
        0 => String::new(),
        n => format!(
            " Left out: {n} of {} pairs, whose run alone took over {TRAPPED_NS:.0} ns per pair \
             (another tracer's probes were in every process using libc then: another memprof \
             --all, bpftrace, ...).",
            pairs.len()
        ),
    };
    match &summary.kept {
        Some(kept) => {
            let _ = writeln!(
                md,
                "\nAn unrelated process beside memprof: churn ({ops} pairs, untraced) took {} per \
                 pair alone and {} while {traced} traced the shell and its child (medians of {} \
                 back-to-back pairs of runs); median ratio of the pairs: {:.3}× (goal: within \
                 5%); fastest run beside ÷ fastest alone: {:.3}×; memprof's CPU time during a \
                 run beside it: {:.1}% of the run's.{dropped}",
                human_ns(kept.alone),
                human_ns(kept.beside),
                kept.pairs,
                kept.ratio,
                kept.fastest_ratio,
                cpu_share * 100.0
            );
            json.push(format!(
                "{{\"beside\":\"churn\",\"traced\":\"sh -c '{TRACED}'\",\"ops\":{ops},\"pairs\":{},\"pairs_left_out\":{},\"alone_ns_per_op\":{:.2},\"beside_ns_per_op\":{:.2},\"beside_x_alone\":{:.3},\"fastest_beside_x_fastest_alone\":{:.3},\"memprof_cpu_share\":{cpu_share:.4}}}",
                kept.pairs,
                summary.dropped,
                kept.alone,
                kept.beside,
                kept.ratio,
                kept.fastest_ratio
            ));
            eprintln!("bench: churn beside memprof: {:.3}× alone", kept.ratio);
        }
        None => {
            let _ = writeln!(
                md,
                "\nAn unrelated process beside memprof ({traced}): no result.{dropped}"
            );
            json.push(format!(
                "{{\"beside\":\"churn\",\"traced\":\"sh -c '{TRACED}'\",\"ops\":{ops},\"pairs\":0,\"pairs_left_out\":{}}}",
                summary.dropped
            ));
        }
    }
    if summary.dropped > 0 {
        eprintln!(
            "bench: warning: the churn loop alone hit breakpoints in {} runs: another tracer was \
             probing libc system-wide",
            summary.dropped
        );
    }
    Ok(())
}

/// What the pairs of runs say.
#[derive(Debug, PartialEq)]
struct Summary {
    /// Pairs left out: their run alone had another tracer's breakpoints in it.
    dropped: usize,
    kept: Option<Kept>,
}

#[derive(Debug, PartialEq)]
struct Kept {
    pairs: usize,
    /// Median ns per pair alone, and beside memprof.
    alone: f64,
    beside: f64,
    /// Median of the pairs' ratios.
    ratio: f64,
    /// Fastest run beside ÷ fastest run alone.
    fastest_ratio: f64,
}

/// Summarizes (alone, beside) times per pair. A pair whose run alone was slower than
/// `TRAPPED_NS` is left out: breakpoints in a loop that ran alone are another tracer's (in one
/// beside memprof they may be memprof's, which the ratio is there to show).
fn summarize(pairs: &[(f64, f64)]) -> Summary {
    let kept: Vec<(f64, f64)> = pairs
        .iter()
        .copied()
        .filter(|&(alone, _)| alone <= TRAPPED_NS)
        .collect();
    let dropped = pairs.len() - kept.len();
    if kept.is_empty() {
        return Summary {
            dropped,
            kept: None,
        };
    }
    let fastest = |v: &mut dyn Iterator<Item = f64>| v.fold(f64::INFINITY, f64::min);
    let alone = || kept.iter().map(|&(a, _)| a);
    let beside = || kept.iter().map(|&(_, b)| b);
    Summary {
        dropped,
        kept: Some(Kept {
            pairs: kept.len(),
            alone: median(alone().collect()),
            beside: median(beside().collect()),
            ratio: median(kept.iter().map(|&(a, b)| b / a.max(1e-9)).collect()),
            fastest_ratio: fastest(&mut beside()) / fastest(&mut alone()).max(1e-9),
        }),
    }
}

/// Runs `churn` once while memprof traces `sh -c TRACED`, once the shell's child is traced and
/// memprof has settled; returns its time per pair and memprof's CPU time meanwhile, as a share
/// of the run's.
fn beside_memprof(memprof: &Path, churn: impl Fn() -> Result<f64>) -> Result<(f64, f64)> {
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
    settle(tracer.id());
    let (cpu, wall) = (cpu_ns(tracer.id()), Instant::now());
    let per_op = churn()?;
    let cpu_share = cpu_ns(tracer.id()).saturating_sub(cpu) as f64
        / (wall.elapsed().as_nanos() as f64).max(1.0);
    // The traced command ends; memprof reports and exits.
    for pid in descendants(tracer.id()) {
        // SAFETY: signalling the processes memprof spawned for the bench.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    tracer.wait_for(Duration::from_secs(60))?;
    Ok((per_op, cpu_share))
}

/// Waits until memprof is done starting (its own start, following the shell's child): less
/// than 5 ms of CPU in 100 ms, at most 5 s.
fn settle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = cpu_ns(pid);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = cpu_ns(pid);
        if now.saturating_sub(last) < 5_000_000 {
            return;
        }
        last = now;
    }
}

/// CPU time of process `pid` so far (all its threads), in ns.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| schedstat_cpu_ns(&stat))
        .sum()
}

/// The time on CPU in a `/proc/PID/task/TID/schedstat` line (`on_cpu_ns wait_ns slices`).
fn schedstat_cpu_ns(stat: &str) -> Option<u64> {
    stat.split_whitespace().next()?.parse().ok()
}

/// Waits until the shell's `sleep` child runs (memprof stops a new child until its probes
/// are in, then lets it go), at most 30 s.
fn wait_for_traced_sleep(memprof: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let running = descendants(memprof).into_iter().any(|pid| {
            comm(pid).as_deref() == Some("sleep")
                && state(pid).is_some_and(|s| !matches!(s, 'T' | 't'))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarizes_pairs() {
        let s = summarize(&[(10.0, 11.0), (12.0, 12.0), (9.0, 10.8), (3000.0, 20.0)]);
        assert_eq!(s.dropped, 1);
        let kept = s.kept.unwrap();
        assert_eq!(kept.pairs, 3);
        assert_eq!((kept.alone, kept.beside), (10.0, 11.0));
        assert_eq!(kept.ratio, 1.1);
        assert_eq!(kept.fastest_ratio, 10.8 / 9.0);
        // Breakpoints beside memprof are what the bench is there to see: kept.
        let s = summarize(&[(10.0, 2500.0)]);
        assert_eq!((s.dropped, s.kept.unwrap().ratio), (0, 250.0));
        assert_eq!(
            summarize(&[(3000.0, 10.0)]),
            Summary {
                dropped: 1,
                kept: None
            }
        );
    }

    #[test]
    fn reads_cpu_time() {
        assert_eq!(
            schedstat_cpu_ns("160427135 2350872 231\n"),
            Some(160_427_135)
        );
        assert_eq!(schedstat_cpu_ns(""), None);
        assert!(cpu_ns(std::process::id()) > 0);
        assert_eq!(cpu_ns(u32::MAX), 0);
    }
}
