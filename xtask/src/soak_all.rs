//! `cargo xtask soak --all`: memprof as a node agent (`trace --all --metrics`) while thousands of
//! short-lived processes come and go, scraped like a profile store would.
//!
//! The agent traces `--all --comm procs` (so that the machine's other work does not enter the
//! figures; `--everything` drops `--comm`): a `procs leak` anchor runs through the soak, and
//! `procs spin 0` processes are started one after another at RATE a second, each leaking
//! 1000 x 32 B in `spin_leak` and exiting. Every 15 s a scraper pulls `/debug/pprof/heap` (all
//! processes) and `/metrics`, as Parca and Prometheus would; every 30 s (5 s for runs under 10
//! minutes) the soak samples the agent's VmRSS and CPU. The verdict is the agent's RSS growth
//! over the last third of the run: with every part capped, it must level off. Results go to
//! `target/bench/soak-all.md` and `soak-all.json`.

use std::{
    ffi::OsString,
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    soak::{
        build_procs, clock_ticks, cpu_ticks, mib, positive, start_memprof, start_ready, vm_rss,
    },
    util::{Workspace, tv, wait4},
};

const DEFAULT_MINUTES: f64 = 60.0;
/// Short-lived processes started a second.
const DEFAULT_SPAWN_RATE: f64 = 10.0;
/// How often the scraper pulls the profile and the metrics.
const SCRAPE_EVERY: Duration = Duration::from_secs(15);
const PORT: u16 = 19464;

#[derive(Clone, Debug)]
struct Sample {
    t_s: f64,
    rss: u64,
    cpu: f64,
    /// The agent's `memprof_agent_kept` gauges: the sizes of its own tables.
    kept: Vec<(String, u64)>,
}

/// One HTTP/1.0 GET on 127.0.0.1: the status and the body's length and text.
fn get(path: &str) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", PORT))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no header end")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    Ok((status, raw[end + 4..].to_vec()))
}

/// Every `memprof_agent_kept{pid="0",what="WHAT"} VALUE` of a metrics exposition.
fn kept(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("memprof_agent_kept{pid=\"0\",what=\"")?;
            let (what, value) = rest.split_once("\"} ")?;
            Some((what.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// `name{pid="0"} VALUE` in a metrics exposition.
fn metric(text: &str, name: &str) -> u64 {
    let prefix = format!("{name}{{pid=\"0\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str())?.parse().ok())
        .unwrap_or(0)
}

pub fn soak_all(ws: &Workspace, args: &[OsString]) -> Result<()> {
    let mut minutes = DEFAULT_MINUTES;
    let mut spawn_rate = DEFAULT_SPAWN_RATE;
    let mut everything = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--all") => {}
            Some("--everything") => everything = true,
            Some("--minutes") => minutes = positive(it.next(), "--minutes", "a positive number")?,
            Some("--spawn-rate") => {
                spawn_rate = positive(it.next(), "--spawn-rate", "a number of processes a second")?;
            }
            _ => bail!(
                "`cargo xtask soak --all` takes [--minutes N] [--spawn-rate PROCS_PER_S] \
                 [--everything], got {arg:?}"
            ),
        }
    }
    let seconds = (minutes * 60.0).round().max(1.0) as u64;
    let step = if seconds < 600 { 5 } else { 30 };

    let out_dir = ws.target_dir().join("bench");
    let procs = build_procs(ws, &out_dir)?;
    let memprof = ws.target_dir().join("release/memprof");

    // The anchor: a `procs` running when memprof starts, for --comm.
    let (mut anchor, _anchor_out) = start_ready(Command::new(&procs).args(["leak", "1", "10"]))?;

    let report_path = out_dir.join("soak-all-report.txt");
    let log_path = out_dir.join("soak-all-memprof.log");
    let mut cmd = Command::new(&memprof);
    cmd.args(["trace", "--all", "--metrics", &format!("127.0.0.1:{PORT}")]);
    if !everything {
        cmd.args(["--comm", "procs"]);
    }
    let agent = start_memprof(&mut cmd, &report_path, &log_path)?;
    let agent_pid = agent.id();

    let stop = Arc::new(AtomicBool::new(false));
    let spawned = Arc::new(AtomicU64::new(0));
    let spawner = {
        let (stop, spawned, procs) = (stop.clone(), spawned.clone(), procs.clone());
        thread::spawn(move || {
            let every = Duration::from_secs_f64(1.0 / spawn_rate);
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let ok = Command::new(&procs)
                    .args(["spin", "0"])
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    spawned.fetch_add(1, Ordering::Relaxed);
                }
                next += every;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        })
    };
    // The scraper: (profile bytes, seconds taken) of each profile scrape.
    let scraper = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut scrapes: Vec<(usize, f64)> = Vec::new();
            let mut failures = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match get("/debug/pprof/heap") {
                    Ok((200, body)) => scrapes.push((body.len(), t.elapsed().as_secs_f64())),
                    _ => failures += 1,
                }
                if !matches!(get("/metrics"), Ok((200, _))) {
                    failures += 1;
                }
                let wait = SCRAPE_EVERY.saturating_sub(t.elapsed());
                let until = Instant::now() + wait;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(200));
                }
            }
            (scrapes, failures)
        })
    };

    let t0 = Instant::now();
    eprintln!(
        "soak --all: memprof pid {agent_pid}, {spawn_rate} processes a second for {seconds} s, \
         scraped every {} s; a sample every {step} s",
        SCRAPE_EVERY.as_secs()
    );
    let ticks = clock_ticks();
    let mut prev = (cpu_ticks(agent_pid), 0.0);
    let mut samples = Vec::new();
    let due: Vec<u64> = (0..=seconds / step).map(|k| k * step).collect();
    for at in due {
        thread::sleep(Duration::from_secs(at).saturating_sub(t0.elapsed()));
        let t_s = t0.elapsed().as_secs_f64();
        let Some(rss) = vm_rss(agent_pid) else {
            bail!("memprof is gone at {t_s:.0} s; see {}", log_path.display());
        };
        let cpu_now = (cpu_ticks(agent_pid), t_s);
        let cpu = match at {
            0 => 0.0,
            _ => cpu_now.0.saturating_sub(prev.0) as f64 / ticks / (t_s - prev.1).max(1e-3),
        };
        prev = cpu_now;
        let kept = get("/metrics")
            .map(|(_, b)| kept(&String::from_utf8_lossy(&b)))
            .unwrap_or_default();
        let shown: Vec<String> = kept
            .iter()
            .filter(|(w, v)| *v != 0 && w != "own_rss_bytes")
            .map(|(w, v)| format!("{w}={v}"))
            .collect();
        eprintln!(
            "soak --all: {t_s:>6.0} s  memprof {:>8.1} MiB {:>5.1}% CPU  {} processes run  \
             kept: {}",
            mib(rss),
            cpu * 100.0,
            spawned.load(Ordering::Relaxed),
            shown.join(" ")
        );
        samples.push(Sample {
            t_s,
            rss,
            cpu,
            kept,
        });
    }
    stop.store(true, Ordering::Relaxed);
    spawner.join().ok();
    let (scrapes, failures) = scraper.join().unwrap_or_default();
    let metrics = get("/metrics")
        .map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    // SAFETY: a signal to the agent we started.
    unsafe { libc::kill(agent_pid as i32, libc::SIGINT) };
    let (status, usage) = wait4(agent_pid)?;
    drop(agent);
    drop(anchor.stdin.take());
    anchor.wait()?;
    if status != 0 {
        bail!(
            "memprof exited with status {status:#x}; see {}",
            log_path.display()
        );
    }

    let first = &samples[0];
    let last = samples.last().context("no sample")?;
    let third = samples
        .iter()
        .find(|s| s.t_s >= last.t_s * 2.0 / 3.0)
        .unwrap_or(last);
    let growth = last.rss as i64 - third.rss as i64;
    let cpu_mean =
        samples.iter().skip(1).map(|s| s.cpu).sum::<f64>() / (samples.len() - 1).max(1) as f64;
    let agent_cpu_s = tv(usage.ru_utime) + tv(usage.ru_stime);
    let peak = usage.ru_maxrss as u64 * 1024;
    let profile_kib = scrapes.iter().map(|s| s.0).max().unwrap_or(0) as f64 / 1024.0;
    let scrape_s = scrapes.iter().map(|s| s.1).fold(0.0, f64::max);
    let [
        forgotten,
        unscraped,
        over_cap,
        allocations,
        lost,
        lost_stacks,
    ] = [
        "forgotten_processes",
        "forgotten_unscraped_processes",
        "profile_sites_over_cap",
        "allocations",
        "lost_events",
        "lost_stacks",
    ]
    .map(|name| metric(&metrics, &format!("memprof_{name}_total")));
    let profiles = scrapes.len();
    let spawned = spawned.load(Ordering::Relaxed);

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# memprof soak --all: {seconds} s, {spawned} short-lived processes\n\n\
         | t (s) | memprof RSS | memprof CPU |\n| --- | --- | --- |"
    );
    for s in &samples {
        let _ = writeln!(
            md,
            "| {:.0} | {:.1} MiB | {:.1}% |",
            s.t_s,
            mib(s.rss),
            s.cpu * 100.0
        );
    }
    let _ = writeln!(
        md,
        "\nmemprof RSS: {:.1} MiB at the start, {:.1} MiB at {:.0} s (two thirds), {:.1} MiB at \
         the end ({:.0} s); peak {:.1} MiB including the report.  \n\
         Verdict: growth over the last third {growth:+} bytes ({:+.2}%).  \n\
         Processes: {spawned} run and exited; forgotten {forgotten} (unseen by a scrape: \
         {unscraped}); call-site allocations over the per-process cap: {over_cap}.  \n\
         Events: {allocations} allocations, {lost} lost events, {lost_stacks} without a stack \
         (the kernel's stack map full, or the ring crowded).  \n\
         Scrapes: {profiles} profiles (largest {profile_kib:.0} KiB gzipped, slowest {scrape_s:.2} s), \
         {failures} failed requests.  \n\
         CPU: memprof {:.1}% of a core on average, {agent_cpu_s:.1} s in all.",
        mib(first.rss),
        mib(third.rss),
        third.t_s,
        mib(last.rss),
        last.t_s,
        mib(peak),
        growth as f64 * 100.0 / third.rss.max(1) as f64,
        cpu_mean * 100.0,
    );
    // What the agent kept, at the second sample (the first may come before its first
    // publication), two thirds in and at the end.
    let _ = writeln!(
        md,
        "\n| kept by memprof | {:.0} s | {:.0} s | {:.0} s |\n| --- | --- | --- | --- |",
        samples.get(1).unwrap_or(first).t_s,
        third.t_s,
        last.t_s
    );
    for (i, (what, _)) in last.kept.iter().enumerate() {
        let at = |s: &Sample| s.kept.get(i).map_or(0, |k| k.1);
        let _ = writeln!(
            md,
            "| {what} | {} | {} | {} |",
            at(samples.get(1).unwrap_or(first)),
            at(third),
            at(last)
        );
    }
    let curve: Vec<String> = samples
        .iter()
        .map(|s| {
            let kept: Vec<String> = s.kept.iter().map(|(w, v)| format!("\"{w}\":{v}")).collect();
            format!(
                "{{\"t_s\":{:.1},\"memprof_rss_bytes\":{},\"memprof_cpu\":{:.4},\"kept\":{{{}}}}}",
                s.t_s,
                s.rss,
                s.cpu,
                kept.join(",")
            )
        })
        .collect();
    let json = format!(
        "{{\"seconds\":{seconds},\"spawn_rate\":{spawn_rate},\"processes\":{spawned},\
         \"memprof_rss_start_bytes\":{},\"memprof_rss_two_thirds_bytes\":{},\
         \"memprof_rss_end_bytes\":{},\"memprof_peak_rss_bytes\":{peak},\
         \"growth_last_third_bytes\":{growth},\"forgotten_processes\":{forgotten},\
         \"forgotten_unscraped_processes\":{unscraped},\"profile_sites_over_cap\":{over_cap},\
         \"allocations\":{allocations},\"lost_events\":{lost},\"lost_stacks\":{lost_stacks},\"profile_scrapes\":{profiles},\
         \"failed_requests\":{failures},\
         \"memprof_cpu_s\":{agent_cpu_s:.2},\"curve\":[\n{}\n]}}\n",
        first.rss,
        third.rss,
        last.rss,
        curve.join(",\n")
    );
    fs::write(out_dir.join("soak-all.md"), &md)?;
    fs::write(out_dir.join("soak-all.json"), json)?;
    println!("{md}");
    eprintln!(
        "soak --all: results in {} and soak-all.json; memprof's report in {}",
        out_dir.join("soak-all.md").display(),
        report_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counters() {
        let text = "memprof_up{pid=\"0\"} 1\nmemprof_forgotten_processes_total{pid=\"0\"} 44\n";
        assert_eq!(metric(text, "memprof_forgotten_processes_total"), 44);
        assert_eq!(metric(text, "memprof_lost_events_total"), 0);
        let text = "memprof_agent_kept{pid=\"0\",what=\"procs\"} 12\n\
                    memprof_agent_kept{pid=\"0\",what=\"blocks\"} 3000\nmemprof_up{pid=\"0\"} 1\n";
        assert_eq!(
            kept(text),
            [("procs".to_string(), 12), ("blocks".to_string(), 3000)]
        );
    }
}
