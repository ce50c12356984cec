//! `cargo xtask soak`: memprof's own memory over a long trace of a churning process.
//!
//! The target is `tests/fixtures/procs.c` in `churn` mode: rate-limited malloc(64)/free pairs,
//! a ring of 10 000 live blocks replaced continuously, and one 48-byte leak a second in
//! `soak_leak`. memprof attaches by pid before the churn starts and traces until the target
//! exits. Every 30 s (5 s for runs under 10 minutes) the soak samples VmRSS and CPU time of
//! memprof and of the target from /proc. The verdict is memprof's RSS growth from the first
//! sample after the warm-up (2 minutes, or half the run for runs under 4 minutes) to the last
//! one: with a bounded live set, the agent's memory must level off. Results go to
//! `target/bench/soak.md` and `soak.json`; memprof's NDJSON to `soak-report.ndjson`.
//!
//! `--all` soaks memprof as a node agent instead (see [`crate::soak_all`]).

use std::{
    ffi::OsString,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::util::{Workspace, run, tv, wait4};

/// malloc(64)/free pairs a second in the target. Measured on the 2-core VM over an hour: 12.5% of
/// a core for the traced target and 1.3% for memprof.
const DEFAULT_RATE: u64 = 20_000;
const DEFAULT_MINUTES: f64 = 60.0;
/// Bytes `soak_leak` leaks each second.
const LEAK_BYTES_PER_S: u64 = 48;

/// One reading of both processes.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    t_s: f64,
    agent_rss: u64,
    target_rss: u64,
    /// CPU used since the previous sample, as a fraction of one core.
    agent_cpu: f64,
    target_cpu: f64,
}

/// What the final report says.
#[derive(Debug, Default)]
struct Totals {
    allocs: u64,
    frees: u64,
    lost_events: u64,
    ring_full: u64,
    unmatched_frees: u64,
    outstanding_bytes: u64,
    leak_site_bytes: u64,
    leak_site_verdict: String,
    duration_s: f64,
}

/// Starts `cmd` (a `procs` mode) with pipes for stdin and stdout, and waits for its `ready`.
pub(crate) fn start_ready(cmd: &mut Command) -> Result<(Child, BufReader<ChildStdout>)> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {}", crate::util::display(cmd)))?;
    let mut out = BufReader::new(child.stdout.take().context("no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!(
            "{} did not print ready: {line:?}",
            crate::util::display(cmd)
        );
    }
    Ok((child, out))
}

/// Starts memprof as `cmd`, its stdout to `report` and its stderr to `log`, and waits (60 s at
/// most) until it traces.
pub(crate) fn start_memprof(cmd: &mut Command, report: &Path, log: &Path) -> Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(report)?)
        .stderr(fs::File::create(log)?);
    eprintln!("+ {}", crate::util::display(cmd));
    let mut agent = cmd.spawn().context("failed to start memprof")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.contains("memprof: tracing") {
            return Ok(agent);
        }
        if let Some(status) = agent.try_wait()? {
            bail!("memprof exited before tracing ({status}):\n{text}");
        }
        if Instant::now() > deadline {
            bail!("memprof did not start tracing within 60 s:\n{text}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The positive number after `flag`.
pub(crate) fn positive(value: Option<&OsString>, flag: &str, what: &str) -> Result<f64> {
    value
        .and_then(|v| v.to_str()?.parse().ok())
        .filter(|v: &f64| *v > 0.0)
        .with_context(|| format!("{flag} takes {what}"))
}

/// Compiles `tests/fixtures/procs.c` into `out_dir/procs`.
pub(crate) fn build_procs(ws: &Workspace, out_dir: &Path) -> Result<std::path::PathBuf> {
    fs::create_dir_all(out_dir)
        .with_context(|| format!("failed to create {}", out_dir.display()))?;
    let procs = out_dir.join("procs");
    run(ws
        .command("cc")
        .args(["-O2", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&procs)
        .arg(ws.root.join("tests/fixtures/procs.c")))?;
    Ok(procs)
}

pub fn soak(ws: &Workspace, args: &[OsString]) -> Result<()> {
    if args.iter().any(|a| a == "--all") {
        return crate::soak_all::soak_all(ws, args);
    }
    let mut minutes = DEFAULT_MINUTES;
    let mut rate = DEFAULT_RATE;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--minutes") => minutes = positive(it.next(), "--minutes", "a positive number")?,
            Some("--rate") => {
                rate = it
                    .next()
                    .and_then(|v| v.to_str()?.parse().ok())
                    .context("--rate takes a number of allocations a second")?;
            }
            _ => bail!(
                "`cargo xtask soak` takes [--minutes N] [--rate ALLOCS_PER_S], or --all \
                 [--minutes N] [--spawn-rate PROCS_PER_S] [--everything], got {arg:?}"
            ),
        }
    }
    let seconds = (minutes * 60.0).round().max(1.0) as u64;
    let step = if seconds < 600 { 5 } else { 30 };
    let warmup = if seconds < 240 { seconds / 2 } else { 120 };

    let out_dir = ws.target_dir().join("bench");
    let procs = build_procs(ws, &out_dir)?;
    let memprof = ws.target_dir().join("release/memprof");

    let (mut target, mut target_out) =
        start_ready(Command::new(&procs).args(["churn", &rate.to_string(), &seconds.to_string()]))?;
    let mut line = String::new();
    let target_pid = target.id();

    let report_path = out_dir.join("soak-report.ndjson");
    let log_path = out_dir.join("soak-memprof.log");
    let mut cmd = Command::new(&memprof);
    cmd.args(["trace", "--json", "--pid", &target_pid.to_string()]);
    let agent = start_memprof(&mut cmd, &report_path, &log_path)?;
    let agent_pid = agent.id();

    // The churn starts now; samples are timed from here.
    let mut stdin = target.stdin.take().context("no stdin")?;
    writeln!(stdin, "go").context("failed to start the churn")?;
    let t0 = Instant::now();
    eprintln!(
        "soak: tracing pid {target_pid} churning {rate}/s for {seconds} s; memprof pid \
         {agent_pid}; a sample every {step} s"
    );
    let ticks = clock_ticks();
    let mut prev_cpu = (cpu_ticks(agent_pid), cpu_ticks(target_pid), 0.0);
    let mut samples = Vec::new();
    // Every `step` s, and once more a second before the target's end.
    let mut due: Vec<u64> = (0..)
        .map(|k| k * step)
        .take_while(|&d| d < seconds)
        .collect();
    if seconds > 1 && due.last() != Some(&(seconds - 1)) {
        due.push(seconds - 1);
    }
    for at in due {
        let wait = Duration::from_secs(at).saturating_sub(t0.elapsed());
        thread::sleep(wait);
        let t_s = t0.elapsed().as_secs_f64();
        let (Some(agent_rss), Some(target_rss)) = (vm_rss(agent_pid), vm_rss(target_pid)) else {
            eprintln!("soak: a process is gone at {t_s:.0} s; sampling stops");
            break;
        };
        let cpu = (cpu_ticks(agent_pid), cpu_ticks(target_pid), t_s);
        let dt = (cpu.2 - prev_cpu.2).max(1e-3);
        // The first sample has no interval before it.
        let frac = |now: u64, before: u64| match at {
            0 => 0.0,
            _ => now.saturating_sub(before) as f64 / ticks / dt,
        };
        let sample = Sample {
            t_s,
            agent_rss,
            target_rss,
            agent_cpu: frac(cpu.0, prev_cpu.0),
            target_cpu: frac(cpu.1, prev_cpu.1),
        };
        prev_cpu = cpu;
        eprintln!(
            "soak: {:>6.0} s  memprof {:>8.1} MiB {:>5.1}% CPU  target {:>7.1} MiB {:>5.1}% CPU",
            t_s,
            mib(agent_rss),
            sample.agent_cpu * 100.0,
            mib(target_rss),
            sample.target_cpu * 100.0
        );
        samples.push(sample);
    }

    line.clear();
    target_out.read_line(&mut line)?;
    let leaked: u64 = line
        .trim()
        .strip_prefix("done leaked=")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("procs churn did not finish as expected: {line:?}"))?;
    drop(stdin);
    let target_status = target.wait()?;
    if !target_status.success() {
        bail!("procs churn failed ({target_status})");
    }
    let (status, usage) = wait4(agent_pid)?;
    drop(agent);
    if status != 0 {
        bail!(
            "memprof exited with status {status:#x}; its stderr is in {}",
            log_path.display()
        );
    }
    let totals = read_report(&report_path)?;
    let agent_cpu_s = tv(usage.ru_utime) + tv(usage.ru_stime);
    let agent_peak = usage.ru_maxrss as u64 * 1024;

    let Some(last) = samples.last().copied() else {
        bail!("no sample taken");
    };
    let warm = samples
        .iter()
        .find(|s| s.t_s >= warmup as f64)
        .copied()
        .unwrap_or(last);
    let growth = last.agent_rss as i64 - warm.agent_rss as i64;
    let growth_pct = growth as f64 * 100.0 / warm.agent_rss.max(1) as f64;
    let events = totals.allocs + totals.frees;
    let steady = |pick: fn(&Sample) -> f64| -> f64 {
        let v: Vec<f64> = samples.iter().skip(1).map(pick).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let (agent_cpu_mean, target_cpu_mean) = (steady(|s| s.agent_cpu), steady(|s| s.target_cpu));

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# memprof soak: {seconds} s, `procs churn {rate} {seconds}`\n\n\
         | t (s) | memprof RSS | target RSS | memprof CPU | target CPU |\n\
         | --- | --- | --- | --- | --- |"
    );
    for s in &samples {
        let _ = writeln!(
            md,
            "| {:.0} | {:.1} MiB | {:.1} MiB | {:.1}% | {:.1}% |",
            s.t_s,
            mib(s.agent_rss),
            mib(s.target_rss),
            s.agent_cpu * 100.0,
            s.target_cpu * 100.0
        );
    }
    let _ = writeln!(
        md,
        "\nmemprof RSS: {:.1} MiB at the start, {:.1} MiB after warm-up ({:.0} s), {:.1} MiB at \
         the end ({:.0} s); peak {:.1} MiB including the report.  \n\
         Verdict: growth after warm-up {growth:+} bytes ({growth_pct:+.2}%).  \n\
         Events processed: {events} ({} allocs, {} frees; {:.0}/s over {:.0} s); lost events: {} \
         (ring full: {}); unmatched frees: {} (blocks allocated before attach).  \n\
         CPU (mean of the intervals): memprof {:.1}%, target {:.1}% of a core; memprof total \
         {agent_cpu_s:.1} s.  \n\
         Leak site `soak_leak`: {} bytes reported ({}), {leaked} bytes leaked by the target.",
        mib(samples[0].agent_rss),
        mib(warm.agent_rss),
        warm.t_s,
        mib(last.agent_rss),
        last.t_s,
        mib(agent_peak),
        totals.allocs,
        totals.frees,
        events as f64 / totals.duration_s.max(1e-3),
        totals.duration_s,
        totals.lost_events,
        totals.ring_full,
        totals.unmatched_frees,
        agent_cpu_mean * 100.0,
        target_cpu_mean * 100.0,
        totals.leak_site_bytes,
        totals.leak_site_verdict,
    );

    let curve: Vec<String> = samples
        .iter()
        .map(|s| {
            format!(
                "{{\"t_s\":{:.1},\"memprof_rss_bytes\":{},\"target_rss_bytes\":{},\"memprof_cpu\":{:.4},\"target_cpu\":{:.4}}}",
                s.t_s, s.agent_rss, s.target_rss, s.agent_cpu, s.target_cpu
            )
        })
        .collect();
    let json = format!(
        "{{\"seconds\":{seconds},\"rate\":{rate},\"sample_every_s\":{step},\"warmup_s\":{warmup},\
         \"memprof_rss_start_bytes\":{},\"memprof_rss_warm_bytes\":{},\"memprof_rss_end_bytes\":{},\
         \"memprof_peak_rss_bytes\":{agent_peak},\"growth_bytes\":{growth},\"growth_pct\":{growth_pct:.3},\
         \"events\":{events},\"allocs\":{},\"frees\":{},\"lost_events\":{},\"ring_full\":{},\
         \"unmatched_frees\":{},\"outstanding_bytes\":{},\"memprof_cpu_s\":{agent_cpu_s:.2},\
         \"memprof_cpu_mean\":{agent_cpu_mean:.4},\"target_cpu_mean\":{target_cpu_mean:.4},\
         \"leak_site_bytes\":{},\"leak_site_verdict\":{:?},\"target_leaked_bytes\":{leaked},\
         \"curve\":[\n{}\n]}}\n",
        samples[0].agent_rss,
        warm.agent_rss,
        last.agent_rss,
        totals.allocs,
        totals.frees,
        totals.lost_events,
        totals.ring_full,
        totals.unmatched_frees,
        totals.outstanding_bytes,
        totals.leak_site_bytes,
        totals.leak_site_verdict,
        curve.join(",\n")
    );
    fs::write(out_dir.join("soak.md"), &md)?;
    fs::write(out_dir.join("soak.json"), json)?;
    println!("{md}");
    eprintln!(
        "soak: results in {} and soak.json; memprof's report in {}",
        out_dir.join("soak.md").display(),
        report_path.display()
    );
    if leaked != LEAK_BYTES_PER_S * seconds {
        eprintln!(
            "soak: warning: the target leaked {leaked} bytes, not {}",
            LEAK_BYTES_PER_S * seconds
        );
    }
    Ok(())
}

/// The numbers the soak needs from memprof's final report, read with jq.
fn read_report(path: &Path) -> Result<Totals> {
    let filter = r#"select(.type=="report") | [.totals.allocs, .totals.frees,
        .totals.lost_events, (.kernel.ring_full // 0), .totals.unmatched_frees,
        .totals.outstanding_bytes,
        ([.leaks[] | select(.stack[0].function == "soak_leak") | .bytes] | add // 0),
        ([.leaks[] | select(.stack[0].function == "soak_leak") | .verdict][0] // "absent"),
        .duration_s] | @tsv"#;
    let out = Command::new("jq")
        .args(["-r", filter])
        .arg(path)
        .output()
        .context("failed to run jq")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.trim().split('\t').collect();
    if !out.status.success() || fields.len() != 9 {
        bail!(
            "no report in {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let n = |i: usize| fields[i].parse::<u64>().unwrap_or(0);
    Ok(Totals {
        allocs: n(0),
        frees: n(1),
        lost_events: n(2),
        ring_full: n(3),
        unmatched_frees: n(4),
        outstanding_bytes: n(5),
        leak_site_bytes: n(6),
        leak_site_verdict: fields[7].to_owned(),
        duration_s: fields[8].parse().unwrap_or(0.0),
    })
}

/// VmRSS of `pid` in bytes; `None` once the process is gone.
pub(crate) fn vm_rss(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kib(&status, "VmRSS:").map(|kib| kib * 1024)
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// utime + stime of `pid` in clock ticks (0 once it is gone).
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    stat_cpu_ticks(&stat).unwrap_or(0)
}

/// Fields 14 and 15 of /proc/PID/stat, counted after the `)` that ends the command name.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

pub(crate) fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_fields() {
        let status = "Name:\tmemprof\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(1024));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        // A command name with spaces and a parenthesis must not shift the fields.
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194304 100 0 0 0 17 5 0 0 20 0 1 0 1 1 1";
        assert_eq!(stat_cpu_ticks(stat), Some(22));
    }
}
