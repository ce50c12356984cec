//! Faults and load: SIGKILL of memprof (no probe left in the target), ring-buffer overload
//! (counted, never silent) and a short soak of the agent's memory.

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use super::{DEADLINE, leaker, patched_bytes, procs};
use crate::common::{
    Checks, Finished, Proc, final_report, memprof_trace, num, run_trace, site_total, start_trace,
};

#[test]
fn sigkill_of_memprof_leaves_no_probe_behind() {
    let mut leaker = leaker(2, 100);
    let pid = leaker.proc.pid();
    let libc = "/libc.so.6";
    // Probes of earlier traces may still be on their way out (the kernel removes them one by
    // one): start from a clean libc.
    let clean = Instant::now() + Duration::from_secs(60);
    while patched_bytes(pid, libc) != 0 {
        assert!(
            Instant::now() < clean,
            "libc still patched 60 s after earlier traces"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let pid_s = pid.to_string();
    let mp = start_trace(
        &["--json", "--pid", &pid_s, "--duration", "60s"],
        String::new,
    );
    let during = patched_bytes(pid, libc);
    mp.signal(libc::SIGKILL);
    let killed = mp.finish(DEADLINE);
    let after = patched_bytes(pid, libc);
    // The target goes on and finishes normally.
    leaker.go("leaked");
    let done = leaker.finish(DEADLINE);
    let mut c = Checks::new("SIGKILL of memprof");
    c.check(
        during > 0,
        format!("probes patch libc while tracing ({during} bytes)"),
    );
    c.eq("patched bytes after memprof was killed", after, 0);
    c.eq(
        "memprof killed by SIGKILL",
        {
            use std::os::unix::process::ExitStatusExt as _;
            killed.status.signal()
        },
        Some(libc::SIGKILL),
    );
    c.eq("target exit code", done.code(), Some(0));
    c.finish(|| format!("{}\n{}", killed.context(), done.context()));
}

/// `memprof trace [--json] --ring-bytes 4096 -- procs spin SECONDS`: one page of ring for
/// about 200k events per second, to the end.
fn spin_on_one_page(json: bool, seconds: &str) -> Finished {
    let bin = procs().to_str().unwrap();
    let mut args = if json { vec!["--json"] } else { vec![] };
    args.extend([
        "--ring-bytes",
        "4096",
        "--duration",
        "60s",
        "--",
        bin,
        "spin",
        seconds,
    ]);
    run_trace(&args, DEADLINE)
}

#[test]
fn ring_overload_is_counted_and_reported() {
    // Most events are dropped, and counted.
    let f = spin_on_one_page(true, "1");
    let r = final_report(&f);
    let mut c = Checks::new("ring overload");
    let lost = num(&r["totals"], "lost_events");
    let ring_full = num(&r["kernel"], "ring_full");
    c.check(
        ring_full > 1000,
        format!("ring_full counts drops: {ring_full}"),
    );
    c.eq(
        "lost_events = ring_full + inflight_full (+ decode errors 0)",
        lost,
        ring_full + num(&r["kernel"], "inflight_full"),
    );
    // The text report says so too.
    let text = spin_on_one_page(false, "0.5");
    let line = text
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("lost events"))
        .unwrap_or("");
    let shown: u64 = line
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    c.check(shown > 0, format!("text report shows the loss: {line:?}"));
    c.finish(|| format!("{}\n{}", f.context(), text.context()));
}

/// VmRSS of `pid` in bytes.
fn rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[test]
fn agent_memory_stays_bounded_while_a_process_churns() {
    // A shortened soak (the hour-long one is `cargo xtask soak`): 40 s of churn, millions of
    // events, a bounded live set. memprof's RSS after warm-up must stay flat.
    let bin = procs().to_str().unwrap();
    let mut mp = Proc::spawn(
        "memprof trace -- procs spin 40",
        &mut memprof_trace(&["--json", "--duration", "90s", "--", bin, "spin", "40"]),
    );
    let started = Instant::now();
    let mut curve = Vec::new();
    while mp.alive() && started.elapsed() < Duration::from_secs(80) {
        curve.push((started.elapsed().as_secs(), rss(mp.pid())));
        thread::sleep(Duration::from_secs(2));
    }
    let f = mp.finish(DEADLINE);
    let r = final_report(&f);
    let mut c = Checks::new("agent memory while the target churns");
    c.eq("spin_leak", site_total(&r, "spin_leak"), (32000, 1000));
    c.eq("lost events", num(&r["totals"], "lost_events"), 0);
    let allocs = num(&r["totals"], "allocs");
    c.check(
        allocs > 1_000_000,
        format!("millions of events: {allocs} allocations"),
    );
    // RSS from 10 s on (warm-up done) to the end.
    let settled: Vec<u64> = curve
        .iter()
        .filter(|(t, v)| *t >= 10 && *v > 0)
        .map(|(_, v)| *v)
        .collect();
    let (lo, hi) = (
        settled.iter().copied().min().unwrap_or(0),
        settled.iter().copied().max().unwrap_or(0),
    );
    c.check(
        settled.len() >= 5 && hi - lo <= 8 << 20,
        format!("RSS within 8 MiB after warm-up: {curve:?}"),
    );
    eprintln!("memprof RSS (s, bytes): {curve:?}");
    c.finish(|| f.context());
}
