//! One measured run of a workload in one mode, and what reading its results takes.

use std::{
    ffi::OsString,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{Mode, ProbeStat, Run, TRAPPED_NS};
use crate::util::{tv, wait4};

/// Starts `command --wait`, attaches the tracer of `mode`, lets the workload go, and collects
/// the numbers. A workload that `holds` prints `holding` after its result and waits for a
/// second SIGUSR1: the tracer's RSS is read once it settles, then the workload is let go.
pub(super) fn run_once(
    memprof: &Path,
    bpftrace: Option<&Path>,
    mode: Mode,
    command: &[OsString],
    holds: bool,
    probe_stats: bool,
) -> Result<Run> {
    let mut workload = Command::new(&command[0])
        .args(&command[1..])
        .arg("--wait")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {:?}", command[0]))?;
    let mut out = BufReader::new(workload.stdout.take().context("no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("workload did not print ready: {line:?}");
    }
    let pid = workload.id();
    let mut tracer: Option<Child> = match (mode, mode.memprof_flags()) {
        (_, Some(flags)) => {
            let mut child = Command::new(memprof)
                .args(["trace", "--json", "--pid", &pid.to_string()])
                .args(flags)
                .args(probe_stats.then_some("--probe-stats"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("failed to start memprof")?;
            wait_for_line(&mut child, "memprof: tracing pid", true)?;
            Some(child)
        }
        (Mode::Bpftrace, None) => {
            let script = bpftrace_script(pid);
            let mut child = Command::new(bpftrace.context("bpftrace not installed")?)
                .args(["-e", &script])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("failed to start bpftrace")?;
            wait_for_line(&mut child, "memprof-bench: attached", false)?;
            Some(child)
        }
        _ => None,
    };
    // SAFETY: signalling a child we started.
    unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
    line.clear();
    out.read_line(&mut line)?;
    let mut steady_kib = 0;
    if holds {
        let mut holding = String::new();
        out.read_line(&mut holding)?;
        if holding.trim() != "holding" {
            bail!("workload did not print holding: {holding:?}");
        }
        if let Some(child) = &tracer {
            steady_kib = settled_rss_kib(child.id())?;
        }
        // SAFETY: signalling a child we started.
        unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
    }
    let mut rest = String::new();
    let _ = out.read_to_string(&mut rest);
    workload.wait()?;
    let exited = Instant::now();
    let (elapsed_ns, ops) = parse_result(&line)?;
    let mut run = Run {
        elapsed_ns,
        ops,
        ..Run::default()
    };
    if let Some(mut child) = tracer.take() {
        if mode == Mode::Bpftrace {
            // bpftrace does not always end on SIGINT/SIGTERM while its maps are busy, and
            // its output is not needed: the kernel detaches its probes when it dies.
            // SAFETY: signalling a child we started.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        }
        let mut stdout = String::new();
        if let Some(mut s) = child.stdout.take() {
            s.read_to_string(&mut stdout)?;
        }
        let (status, usage) = wait4(child.id())?;
        run.report_s = exited.elapsed().as_secs_f64();
        if mode != Mode::Bpftrace && status != 0 {
            bail!("memprof exited with status {status:#x}");
        }
        run.agent_cpu_s = tv(usage.ru_utime) + tv(usage.ru_stime);
        run.agent_max_rss_kib = usage.ru_maxrss as u64;
        run.agent_steady_rss_kib = steady_kib;
        if let Some(report) = stdout
            .lines()
            .rev()
            .find(|l| l.contains("\"type\":\"report\""))
        {
            run.events = json_u64(report, "\"allocs\":") + json_u64(report, "\"frees\":");
            run.lost = json_u64(report, "\"lost_events\":");
            run.probe_stats = probe_stats_of(report);
        }
    }
    Ok(run)
}

/// Whether another tracer's breakpoints are in libc now: a short untraced run of `churn` (the
/// malloc/free loop) takes over `TRAPPED_NS` per pair.
pub(super) fn libc_probed_elsewhere(churn: &Path) -> Result<bool> {
    let command = [churn.into(), "20000".into()];
    // The tracer's path is not used untraced.
    let r = run_once(Path::new(""), None, Mode::Untraced, &command, false, false)?;
    Ok(r.elapsed_ns / r.ops.max(1.0) > TRAPPED_NS)
}

/// `VmRSS` of process `pid` in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// The RSS of `pid` once it has settled: read every 100 ms until a second of readings stays
/// within 64 KiB (the agent has taken in every event), at most 60 s.
fn settled_rss_kib(pid: u32) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut window: Vec<u64> = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let rss = rss_kib(pid)?;
        window.push(rss);
        if window.len() > 10 {
            window.remove(0);
            let (lo, hi) = (window.iter().min(), window.iter().max());
            if let (Some(lo), Some(hi)) = (lo, hi)
                && hi - lo <= 64
            {
                return Ok(rss);
            }
        }
        if Instant::now() > deadline {
            bail!("the agent's RSS did not settle in 60 s (last {rss} KiB)");
        }
    }
}

/// A memleak-like bpftrace script: sizes at malloc entry, outstanding blocks by address with
/// their stack at the return, deleted at free.
fn bpftrace_script(pid: u32) -> String {
    let libc = "/lib/x86_64-linux-gnu/libc.so.6";
    // BEGIN runs once every probe is attached: its line is the signal to start.
    format!(
        "BEGIN {{ printf(\"memprof-bench: attached\\n\"); }}\n\
         uprobe:{libc}:malloc /pid == {pid}/ {{ @size[tid] = arg0; }}\n\
         uretprobe:{libc}:malloc /pid == {pid} && @size[tid]/ {{ @live[retval] = @size[tid]; @stack[retval] = ustack; delete(@size[tid]); }}\n\
         uprobe:{libc}:free /pid == {pid}/ {{ delete(@live[arg0]); delete(@stack[arg0]); }}\n\
         END {{ clear(@live); clear(@stack); clear(@size); }}"
    )
}

/// Waits for a line holding `needle` on the child's stderr (else stdout), which is then read
/// to its end on a thread of its own; fails with what the child printed if it ends first.
pub(super) fn wait_for_line(child: &mut Child, needle: &str, stderr: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let pipe: Box<dyn std::io::Read + Send> = if stderr {
        Box::new(child.stderr.take().context("no stderr")?)
    } else {
        Box::new(child.stdout.take().context("no stdout")?)
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            // Once the line is found nobody listens: the rest is only drained.
            let _ = tx.send(line);
        }
    });
    let mut seen = String::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains(needle) => return Ok(()),
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                bail!("the tracer did not start in time; it printed:\n{seen}")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the tracer ended before it started tracing; it printed:\n{seen}")
            }
        }
    }
}

fn parse_result(line: &str) -> Result<(f64, f64)> {
    let field = |key: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    match (field("elapsed_ns="), field("ops=")) {
        (Some(e), Some(o)) => Ok((e, o)),
        _ => bail!("unexpected workload output {line:?}"),
    }
}

/// `probe_stats` of a JSON report, one per program.
fn probe_stats_of(report: &str) -> Vec<ProbeStat> {
    let Some(start) = report.find("\"probe_stats\":[") else {
        return Vec::new();
    };
    let list = &report[start..];
    let list = &list[..list.find(']').unwrap_or(list.len())];
    let number = |entry: &str, key: &str| -> Option<f64> {
        entry
            .split(key)
            .nth(1)?
            .split(|c: char| c != '.' && !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    list.split('{')
        .skip(1)
        .filter_map(|entry| {
            let name = entry.split("\"program\":\"").nth(1)?.split('"').next()?;
            Some(ProbeStat {
                program: name.to_string(),
                runs: number(entry, "\"runs\":")? as u64,
                ns_per_run: number(entry, "\"ns_per_run\":")?,
                instructions: number(entry, "\"instructions\":").unwrap_or(0.0) as u64,
            })
        })
        .collect()
}

pub(super) fn json_u64(text: &str, key: &str) -> u64 {
    text.find(key)
        .map(|i| &text[i + key.len()..])
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub(super) fn human_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_probe_stats_from_report_json() {
        let report = r#"{"type":"report","kernel":{"ring_full":0},"probe_stats":[{"program":"alloc_return","runs":12,"ns_per_run":437.5,"instructions":6058,"verified_instructions":40088},{"program":"free_entry","runs":9,"ns_per_run":201.0}],"min_age_s":0.0}"#;
        assert_eq!(
            probe_stats_of(report),
            vec![
                ProbeStat {
                    program: "alloc_return".to_string(),
                    runs: 12,
                    ns_per_run: 437.5,
                    instructions: 6058
                },
                ProbeStat {
                    program: "free_entry".to_string(),
                    runs: 9,
                    ns_per_run: 201.0,
                    instructions: 0
                }
            ]
        );
        assert!(probe_stats_of(r#"{"kernel":{}}"#).is_empty());
    }

    #[test]
    fn parses_workload_output() {
        assert_eq!(
            parse_result("elapsed_ns=2500 ops=10\n").unwrap(),
            (2500.0, 10.0)
        );
        assert!(parse_result("nothing").is_err());
    }

    #[test]
    fn reads_numbers_from_report_json() {
        let report = r#"{"type":"report","totals":{"allocs":12,"frees":7,"lost_events":0}}"#;
        assert_eq!(json_u64(report, "\"allocs\":"), 12);
        assert_eq!(json_u64(report, "\"frees\":"), 7);
        assert_eq!(json_u64(report, "\"missing\":"), 0);
    }

    #[test]
    fn reads_own_rss() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn medians_and_units() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(human_ns(1500.0), "1.50 µs");
        assert_eq!(human_ns(12.0), "12.0 ns");
    }
}
