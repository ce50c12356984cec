//! `cargo xtask bench`: what tracing costs, measured side by side in one run.
//!
//! Each workload in `bench/` waits for SIGUSR1 after printing `ready`, so a tracer attaches by
//! pid first, and reports its own elapsed time (process start and exit excluded). Modes:
//! untraced; memprof's probes with programs that return at once (`--probe-floor`, the floor of
//! the probe set); memprof full; both again with every probe at the function's first byte
//! (`--no-placement`); memprof sampled (`--sample-bytes 512K`, see `SAMPLE_BYTES`); bpftrace
//! with a memleak-like script when installed. Each runs `--reps`
//! times; medians and ratios go to `target/bench/results.md` and `results.json`. The agent's
//! CPU time and peak RSS come from `wait4` on memprof (the workload is not its child in pid
//! mode, so they are the agent's alone). The agent's memory per outstanding allocation is given
//! twice: from its peak RSS, and from its steady RSS (`VmRSS`, once settled) while `hold` keeps
//! its blocks. The kernel programs' own time per run (`--probe-stats`) is measured on the churn
//! loop in each mode, and on `deep` (the same loop under 60 frames) for the frame walk.
//!
//! `--micro` runs only the agent's microbenchmark (`memprof-bench`, criterion): synthetic records
//! replayed through decode → table → tracker → report, in events per second; the full bench runs
//! it too, after the workloads.

use std::{
    ffi::OsString,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::util::{Workspace, find_program};

/// How a workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Untraced,
    Floor,
    FloorAtEntry,
    Full,
    Sampled,
    Dwarf,
    FullAtEntry,
    Bpftrace,
}

/// The sampling interval of the sampled mode.
const SAMPLE_BYTES: &str = "512K";

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Untraced => "untraced",
            Self::Floor => "floor (probes, empty programs)",
            Self::FloorAtEntry => "floor, free probed at +0",
            Self::Full => "memprof",
            Self::Sampled => "memprof --sample-bytes 512K",
            Self::Dwarf => "memprof --unwind dwarf",
            Self::FullAtEntry => "memprof, free probed at +0",
            Self::Bpftrace => "bpftrace memleak-like",
        }
    }

    fn memprof_flags(self) -> Option<&'static [&'static str]> {
        match self {
            Self::Floor => Some(&["--probe-floor"]),
            Self::FloorAtEntry => Some(&["--probe-floor", "--no-placement"]),
            Self::Full => Some(&[]),
            Self::Sampled => Some(&["--sample-bytes", SAMPLE_BYTES]),
            Self::Dwarf => Some(&["--unwind", "dwarf"]),
            Self::FullAtEntry => Some(&["--no-placement"]),
            Self::Untraced | Self::Bpftrace => None,
        }
    }
}

/// One measured run.
#[derive(Clone, Debug, Default)]
struct Run {
    elapsed_ns: f64,
    ops: f64,
    events: u64,
    lost: u64,
    agent_cpu_s: f64,
    agent_max_rss_kib: u64,
    /// A holding workload: the agent's settled RSS while the workload held its blocks.
    agent_steady_rss_kib: u64,
    /// From the workload's exit to the tracer's exit (drain, symbolize, report).
    report_s: f64,
    /// With `--probe-stats`: (program, ns per run).
    probe_ns: Vec<(String, f64)>,
}

struct Workload {
    name: &'static str,
    command: Vec<OsString>,
}

/// Runs the agent microbenchmark and returns its median throughput per benchmark, in events/s.
pub fn micro(ws: &Workspace) -> Result<Vec<(String, f64)>> {
    let mut cmd = ws.cargo();
    cmd.args(["bench", "-p", "memprof-bench", "--bench", "agent"])
        .stdout(Stdio::piped());
    eprintln!("+ {}", crate::util::display(&cmd));
    let out = cmd.spawn().context("failed to start cargo bench")?;
    let output = out.wait_with_output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    print!("{text}");
    if !output.status.success() {
        bail!("`cargo bench -p memprof-bench` failed ({})", output.status);
    }
    let results = parse_criterion(&text);
    if results.is_empty() {
        bail!("no throughput in the output of `cargo bench -p memprof-bench`");
    }
    Ok(results)
}

/// `(name, median elements/s)` from criterion's `name time: [..]` / `thrpt: [lo mid hi]` lines.
fn parse_criterion(text: &str) -> Vec<(String, f64)> {
    let mut name = String::new();
    let mut last_plain = "";
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some((head, _)) = line.split_once("time:") {
            // A long name is printed on a line of its own, before an indented `time:`.
            name = match head.trim() {
                "" => last_plain.trim().to_string(),
                head => head.to_string(),
            };
        } else if !line.starts_with(char::is_whitespace) && !line.trim().is_empty() {
            last_plain = line;
        } else if let Some((_, rest)) = line.split_once("thrpt:") {
            let words: Vec<&str> = rest
                .trim()
                .trim_matches(|c| c == '[' || c == ']')
                .split_whitespace()
                .collect();
            // [lo unit mid unit hi unit]
            if let (Some(v), Some(unit)) = (words.get(2), words.get(3)) {
                let scale = match *unit {
                    "elem/s" => 1.0,
                    "Kelem/s" => 1e3,
                    "Melem/s" => 1e6,
                    "Gelem/s" => 1e9,
                    _ => continue,
                };
                if let Ok(v) = v.parse::<f64>() {
                    out.push((name.clone(), v * scale));
                }
            }
        }
    }
    out
}

fn micro_markdown(results: &[(String, f64)]) -> String {
    let mut md = String::from(
        "\nAgent microbenchmark (memprof-bench: synthetic records through decode → table → \
         tracker → report):\n\n| benchmark | events/s |\n| --- | --- |\n",
    );
    for (name, v) in results {
        let _ = writeln!(md, "| {name} | {:.2}M |", v / 1e6);
    }
    md
}

pub fn bench(ws: &Workspace, args: &[OsString]) -> Result<()> {
    let mut reps = 5;
    let mut quick = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--reps") => {
                reps = it
                    .next()
                    .and_then(|v| v.to_str()?.parse().ok())
                    .context("--reps takes a number")?;
            }
            Some("--quick") => quick = true,
            Some("--micro") => {
                let results = micro(ws)?;
                let md = micro_markdown(&results);
                let out_dir = ws.target_dir().join("bench");
                fs::create_dir_all(&out_dir)?;
                fs::write(out_dir.join("micro.md"), &md)?;
                println!("{md}");
                return Ok(());
            }
            _ => bail!("`cargo xtask bench` takes [--reps N] [--quick] [--micro], got {arg:?}"),
        }
    }
    let out_dir = ws.target_dir().join("bench");
    fs::create_dir_all(&out_dir)?;
    let memprof = ws.target_dir().join("release/memprof");
    let build = |name: &str| -> Result<PathBuf> {
        let exe = out_dir.join(name);
        let src = ws.root.join("bench").join(format!("{name}.c"));
        crate::util::run(
            ws.command("cc")
                .args(["-O2", "-g", "-fno-omit-frame-pointer", "-o"])
                .arg(&exe)
                .arg(&src),
        )?;
        Ok(exe)
    };
    let churn = build("churn")?;
    let hold = build("hold")?;
    let stacks = build("stacks")?;
    let deep = build("deep")?;
    let python = find_program("python3").context("python3 not found")?;
    let scale = |full: &str, small: &str| -> OsString { if quick { small } else { full }.into() };
    let workloads = [
        Workload {
            name: "churn: malloc(64)/free pairs",
            command: vec![churn.into(), scale("200000", "20000")],
        },
        Workload {
            name: "python: build/dump/parse JSON",
            command: vec![
                python.clone().into(),
                ws.root.join("bench/json_work.py").into(),
                scale("60", "4"),
            ],
        },
    ];
    let bpftrace = find_program("bpftrace");
    let mut modes = vec![
        Mode::Untraced,
        Mode::Floor,
        Mode::FloorAtEntry,
        Mode::Full,
        Mode::Sampled,
        Mode::Dwarf,
        Mode::FullAtEntry,
    ];
    if bpftrace.is_some() {
        modes.push(Mode::Bpftrace);
    }

    let mut md = String::new();
    let mut json_rows = Vec::new();
    let _ = writeln!(
        md,
        "| workload | mode | median per op | × untraced | × floor | events/s | lost | agent CPU s | agent peak RSS |"
    );
    let _ = writeln!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for w in &workloads {
        let mut medians: Vec<(Mode, f64)> = Vec::new();
        for &mode in &modes {
            let mut runs = Vec::new();
            for _ in 0..reps {
                runs.push(run_once(
                    &memprof,
                    bpftrace.as_deref(),
                    mode,
                    &w.command,
                    false,
                    false,
                )?);
            }
            let per_op = median(runs.iter().map(|r| r.elapsed_ns / r.ops.max(1.0)).collect());
            medians.push((mode, per_op));
            let untraced = medians[0].1;
            let floor = medians
                .iter()
                .find(|(m, _)| *m == Mode::Floor)
                .map(|(_, v)| *v);
            let r = &runs[runs.len() / 2];
            let events_per_s = median(
                runs.iter()
                    .map(|r| r.events as f64 / (r.elapsed_ns / 1e9).max(1e-9))
                    .collect(),
            );
            // A sampled report's counts are estimates, not events: no events/s for it.
            let traced = mode.memprof_flags().is_some();
            let events_shown = traced && mode != Mode::Sampled;
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.1} | {} | {} | {} | {} | {} |",
                w.name,
                mode.name(),
                human_ns(per_op),
                per_op / untraced,
                floor.map_or("".into(), |f| format!("{:.2}", per_op / f)),
                if events_shown {
                    format!("{events_per_s:.0}")
                } else {
                    String::new()
                },
                if traced {
                    r.lost.to_string()
                } else {
                    String::new()
                },
                if traced {
                    format!("{:.2}", r.agent_cpu_s)
                } else {
                    String::new()
                },
                if traced {
                    format!("{:.1} MiB", r.agent_max_rss_kib as f64 / 1024.0)
                } else {
                    String::new()
                },
            );
            json_rows.push(format!(
                "{{\"workload\":{:?},\"mode\":{:?},\"median_ns_per_op\":{per_op:.1},\"x_untraced\":{:.2},\"events_per_s\":{events_per_s:.0},\"lost\":{},\"agent_cpu_s\":{:.3},\"agent_max_rss_kib\":{}}}",
                w.name,
                mode.name(),
                per_op / untraced,
                r.lost,
                r.agent_cpu_s,
                r.agent_max_rss_kib
            ));
            eprintln!("bench: {} / {}: {}", w.name, mode.name(), human_ns(per_op));
        }
    }

    // Agent memory per outstanding allocation: 1M held blocks against none.
    let held = if quick { 100_000 } else { 1_000_000 };
    let with = run_once(
        &memprof,
        None,
        Mode::Full,
        &[hold.clone().into(), held.to_string().into()],
        true,
        false,
    )?;
    let without = run_once(
        &memprof,
        None,
        Mode::Full,
        &[hold.into(), "0".into()],
        true,
        false,
    )?;
    let per_alloc =
        |with: u64, without: u64| (with.saturating_sub(without) * 1024) as f64 / held as f64;
    let peak_per_alloc = per_alloc(with.agent_max_rss_kib, without.agent_max_rss_kib);
    let steady_per_alloc = per_alloc(with.agent_steady_rss_kib, without.agent_steady_rss_kib);
    // Report latency with many distinct stacks.
    let distinct = if quick { 100 } else { 1000 };
    let many = run_once(
        &memprof,
        None,
        Mode::Full,
        &[stacks.into(), distinct.to_string().into()],
        false,
        false,
    )?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let _ = writeln!(
        md,
        "\nAgent memory per outstanding allocation ({held} blocks held against none):  \n\
         - peak RSS: {peak_per_alloc:.0} B ({:.1} MiB against {:.1} MiB)  \n\
         - steady RSS while held: {steady_per_alloc:.0} B ({:.1} MiB against {:.1} MiB)\n\n\
         Report with {distinct} distinct stacks: {:.2} s from the workload's exit to memprof's.",
        mib(with.agent_max_rss_kib),
        mib(without.agent_max_rss_kib),
        mib(with.agent_steady_rss_kib),
        mib(without.agent_steady_rss_kib),
        many.report_s
    );
    json_rows.push(format!(
        "{{\"agent_bytes_per_outstanding_alloc\":{peak_per_alloc:.1},\"agent_steady_bytes_per_outstanding_alloc\":{steady_per_alloc:.1},\"held\":{held},\"agent_peak_rss_kib\":{},\"agent_peak_rss_kib_none_held\":{},\"agent_steady_rss_kib\":{},\"agent_steady_rss_kib_none_held\":{},\"report_s_distinct_stacks\":{:.3},\"distinct_stacks\":{distinct}}}",
        with.agent_max_rss_kib,
        without.agent_max_rss_kib,
        with.agent_steady_rss_kib,
        without.agent_steady_rss_kib,
        many.report_s
    ));
    // What memprof's kernel programs themselves cost per call, from the kernel's BPF run-time
    // statistics (a separate run: the statistics add two clock reads to every program run).
    let churn = &workloads[0];
    let stat_modes = [Mode::Floor, Mode::Full, Mode::Sampled, Mode::Dwarf];
    let programs = ["malloc_entry", "free_entry", "alloc_return"];
    let _ = writeln!(
        md,
        "\nKernel programs' own time per run on {} (`--probe-stats`, one run each; the \
         statistics add about 30 ns per run):\n\n| mode | {} |\n| --- |{}",
        churn.name,
        programs.join(" | "),
        " --- |".repeat(programs.len())
    );
    for mode in stat_modes {
        let r = run_once(&memprof, None, mode, &churn.command, false, true)?;
        let ns = |p: &str| r.probe_ns.iter().find(|(n, _)| n == p).map(|(_, v)| *v);
        let _ = writeln!(
            md,
            "| {} | {} |",
            mode.name(),
            programs
                .iter()
                .map(|p| ns(p).map_or("".into(), |v| format!("{v:.0} ns")))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        for p in programs {
            if let Some(v) = ns(p) {
                json_rows.push(format!(
                    "{{\"workload\":{:?},\"mode\":{:?},\"program\":{p:?},\"ns_per_run\":{v:.1}}}",
                    churn.name,
                    mode.name()
                ));
            }
        }
    }
    // The frame walk's windows on a deep stack: one full run with statistics.
    let deep_cmd: Vec<OsString> = vec![deep.into(), scale("200000", "20000")];
    let r = run_once(&memprof, None, Mode::Full, &deep_cmd, false, true)?;
    if let Some((_, v)) = r.probe_ns.iter().find(|(n, _)| n == "alloc_return") {
        let _ = writeln!(
            md,
            "\nalloc_return with the same pairs at the bottom of 60 frames of about 160 bytes \
             (`bench/deep.c`, memprof, `--probe-stats`): {v:.0} ns"
        );
        json_rows.push(format!(
            "{{\"workload\":\"deep: malloc(64)/free pairs under 60 frames\",\"mode\":{:?},\"program\":\"alloc_return\",\"ns_per_run\":{v:.1}}}",
            Mode::Full.name()
        ));
    }
    let micro_results = micro(ws)?;
    md.push_str(&micro_markdown(&micro_results));
    for (name, v) in &micro_results {
        json_rows.push(format!("{{\"micro\":{name:?},\"events_per_s\":{v:.0}}}"));
    }
    fs::write(out_dir.join("results.md"), &md)?;
    fs::write(
        out_dir.join("results.json"),
        format!("[\n{}\n]\n", json_rows.join(",\n")),
    )?;
    println!("{md}");
    eprintln!(
        "bench: results in {} and results.json",
        out_dir.join("results.md").display()
    );
    Ok(())
}

/// Starts `command --wait`, attaches the tracer of `mode`, lets the workload go, and collects
/// the numbers. A workload that `holds` prints `holding` after its result and waits for a
/// second SIGUSR1: the tracer's RSS is read once it settles, then the workload is let go.
fn run_once(
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
            run.probe_ns = probe_stats_of(report);
        }
    }
    Ok(run)
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

fn wait_for_line(child: &mut Child, needle: &str, stderr: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let pipe: Box<dyn std::io::Read + Send> = if stderr {
        Box::new(child.stderr.take().context("no stderr")?)
    } else {
        Box::new(child.stdout.take().context("no stdout")?)
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = needle.to_string();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(pipe).lines();
        let mut sent = false;
        for line in lines.by_ref().map_while(Result::ok) {
            if !sent && line.contains(&needle) {
                let _ = tx.send(());
                sent = true;
            }
        }
    });
    rx.recv_timeout(deadline - Instant::now())
        .context("the tracer did not start in time")
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

/// `probe_stats` of a JSON report: (program, ns_per_run) pairs.
fn probe_stats_of(report: &str) -> Vec<(String, f64)> {
    let Some(start) = report.find("\"probe_stats\":[") else {
        return Vec::new();
    };
    let list = &report[start..];
    let list = &list[..list.find(']').unwrap_or(list.len())];
    list.split('{')
        .skip(1)
        .filter_map(|entry| {
            let name = entry.split("\"program\":\"").nth(1)?.split('"').next()?;
            let ns = entry
                .split("\"ns_per_run\":")
                .nth(1)?
                .split(|c: char| c != '.' && !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), ns))
        })
        .collect()
}

fn json_u64(text: &str, key: &str) -> u64 {
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

fn wait4(pid: u32) -> Result<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value to be overwritten.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid pointers.
    let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    if r != pid as i32 {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    Ok((status, usage))
}

fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn human_ns(ns: f64) -> String {
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
        let report = r#"{"type":"report","kernel":{"ring_full":0},"probe_stats":[{"program":"alloc_return","runs":12,"ns_per_run":437.5},{"program":"free_entry","runs":9,"ns_per_run":201.0}],"min_age_s":0.0}"#;
        assert_eq!(
            probe_stats_of(report),
            vec![
                ("alloc_return".to_string(), 437.5),
                ("free_entry".to_string(), 201.0)
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
    fn parses_criterion_throughput() {
        let out = "agent/ingest            time:   [28.346 ms 29.355 ms 30.554 ms]\n\
                   \x20                       thrpt:  [6.5459 Melem/s 6.8130 Melem/s 7.0557 Melem/s]\n\
                   agent/decode\n\
                   \x20                       time:   [2.2 ms 2.4 ms 2.5 ms]\n\
                   \x20                       thrpt:  [77.8 Kelem/s 83.0 Kelem/s 88.5 Kelem/s]\n";
        let got = parse_criterion(out);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, "agent/ingest");
        assert!((got[0].1 - 6.813e6).abs() < 1.0);
        assert_eq!(got[1].0, "agent/decode");
        assert!((got[1].1 - 83.0e3).abs() < 1e-6);
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
