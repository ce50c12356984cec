//! `cargo xtask bench`: what tracing costs, measured side by side in one run.
//!
//! Workloads: the churn loop built with frame pointers and again without (as distributions
//! build), and a Python JSON workload. Each workload in `bench/` waits for SIGUSR1 after printing `ready`, so a tracer attaches by
//! pid first, and reports its own elapsed time (process start and exit excluded). Modes:
//! untraced; memprof's probes with programs that return at once (`--probe-floor`, the floor of
//! the probe set, on the default links and on classic uprobes); memprof full (default links,
//! with the default unwind tables and with `--unwind fp`, and multi-uprobe links); the floor and full mode again with every probe at the function's
//! first byte (`--no-placement`); memprof sampled (`--sample-bytes 512K`, see `SAMPLE_BYTES`);
//! bpftrace with a memleak-like script when installed. The `--reps` runs go rep-major (each
//! rep runs every mode in turn, so drift falls on every mode alike); medians and ratios go to
//! `target/bench/results.md` and `results.json`. The agent's
//! CPU time and peak RSS come from `wait4` on memprof (the workload is not its child in pid
//! mode, so they are the agent's alone). The agent's memory per outstanding allocation is given
//! twice: from its peak RSS, and from its steady RSS (`VmRSS`, once settled) while `hold` keeps
//! its blocks. The kernel programs' own time per run (`--probe-stats`) is measured on the churn
//! loop in each mode, and on `deep` (the same loop under 60 frames) for the frame walk.
//!
//! Then: the time to attach and detach the full probe set for each kind of link (`attach`);
//! an untraced churn loop's speed beside memprof tracing a spawned command with children
//! (`beside`); and a real workload, Debian's redis-server under redis-benchmark, untraced,
//! under memprof and under heaptrack (`redis`).
//!
//! `--kernel` runs only the cost of `memprof trace --kernel` on pipe rounds (`kernel`).
//!
//! `--micro` runs only the agent's microbenchmark (`memprof-bench`, criterion): synthetic records
//! replayed through decode → table → tracker → report, in events per second; the full bench runs
//! it too, after the workloads.

mod attach;
mod beside;
mod kernel;
mod micro;
mod proc;
mod programs;
mod python;
mod redis;
mod run;

use std::{ffi::OsString, fmt::Write as _, fs, path::PathBuf};

use anyhow::{Context as _, Result, bail};

pub use self::micro::micro;
use self::{
    micro::micro_markdown,
    run::{human_ns, median, run_once},
};
use crate::util::{Workspace, find_program};

/// How a workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Untraced,
    Floor,
    FloorClassic,
    FloorAtEntry,
    Full,
    FullFp,
    FullMulti,
    Sampled,
    Dwarf,
    FullAtEntry,
    /// `--kernel-log trace` (only for the programs' size: it logs every allocation).
    FullLogTrace,
    Bpftrace,
    /// `--kernel` (bench/pipes.c only: `kernel`).
    Kernel,
}

/// Slower than this per malloc/free pair, an untraced churn loop has breakpoints in it: another
/// tracer's probes on libc (a system-wide trace by another process, say). Untraced, a pair
/// takes about 10 ns here; one uprobe trap alone takes several hundred.
const TRAPPED_NS: f64 = 200.0;

/// The sampling interval of the sampled mode.
const SAMPLE_BYTES: &str = "512K";

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Untraced => "untraced",
            Self::Floor => "floor (probes, empty programs)",
            Self::FloorClassic => "floor, classic uprobes",
            Self::FloorAtEntry => "floor, free probed at +0",
            Self::Full => "memprof",
            Self::FullFp => "memprof --unwind fp",
            Self::FullMulti => "memprof --links multi",
            Self::Sampled => "memprof --sample-bytes 512K",
            Self::Dwarf => "memprof --unwind dwarf",
            Self::FullAtEntry => "memprof, free probed at +0",
            Self::FullLogTrace => "memprof --kernel-log trace",
            Self::Bpftrace => "bpftrace memleak-like",
            Self::Kernel => "memprof --kernel",
        }
    }

    fn memprof_flags(self) -> Option<&'static [&'static str]> {
        match self {
            Self::Floor => Some(&["--probe-floor"]),
            Self::FloorClassic => Some(&["--probe-floor", "--links", "classic"]),
            Self::FloorAtEntry => Some(&["--probe-floor", "--no-placement"]),
            Self::Full => Some(&[]),
            Self::FullFp => Some(&["--unwind", "fp"]),
            Self::FullMulti => Some(&["--links", "multi"]),
            Self::Sampled => Some(&["--sample-bytes", SAMPLE_BYTES]),
            Self::Dwarf => Some(&["--unwind", "dwarf"]),
            Self::FullAtEntry => Some(&["--no-placement"]),
            Self::FullLogTrace => Some(&["--kernel-log", "trace"]),
            Self::Kernel => Some(&["--kernel"]),
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
    /// With `--probe-stats`: each program's runs and mean time.
    probe_stats: Vec<ProbeStat>,
}

/// One kernel program's runs, mean time per run and size as loaded (`--probe-stats`).
#[derive(Clone, Debug, PartialEq)]
struct ProbeStat {
    program: String,
    runs: u64,
    ns_per_run: f64,
    instructions: u64,
}

impl Run {
    /// The allocator programs (`alloc_*`; not the process-tracking tracepoints).
    fn alloc_programs(&self) -> impl Iterator<Item = &ProbeStat> {
        self.probe_stats
            .iter()
            .filter(|s| s.program.starts_with("alloc_"))
    }

    /// Kernel time in the allocator programs per workload operation.
    fn alloc_ns_per_op(&self) -> f64 {
        self.alloc_programs()
            .map(|s| s.ns_per_run * s.runs as f64)
            .sum::<f64>()
            / self.ops.max(1.0)
    }
}

struct Workload {
    name: &'static str,
    command: Vec<OsString>,
}

pub fn bench(ws: &Workspace, args: &[OsString]) -> Result<()> {
    let mut reps = 5;
    let mut quick = false;
    let mut kernel_only = false;
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
            Some("--kernel") => kernel_only = true,
            Some("--micro") => {
                let results = micro(ws)?;
                let md = micro_markdown(&results);
                let out_dir = ws.target_dir().join("bench");
                fs::create_dir_all(&out_dir)?;
                fs::write(out_dir.join("micro.md"), &md)?;
                println!("{md}");
                return Ok(());
            }
            _ => bail!(
                "`cargo xtask bench` takes [--reps N] [--quick] [--micro] [--kernel], got {arg:?}"
            ),
        }
    }
    let out_dir = ws.target_dir().join("bench");
    fs::create_dir_all(&out_dir)?;
    let memprof = ws.target_dir().join("release/memprof");
    // Built with frame pointers, as `--unwind fp` needs, unless `no_fp` (as distributions
    // build: the default mode's unwind tables then do the work).
    let build_as = |name: &str, exe_name: &str, no_fp: bool| -> Result<PathBuf> {
        let exe = out_dir.join(exe_name);
        let src = ws.root.join("bench").join(format!("{name}.c"));
        crate::util::run(
            ws.command("cc")
                .args(["-O2", "-g"])
                .arg(if no_fp {
                    "-fomit-frame-pointer"
                } else {
                    "-fno-omit-frame-pointer"
                })
                .arg("-o")
                .arg(&exe)
                .arg(&src),
        )?;
        Ok(exe)
    };
    let build = |name: &str| build_as(name, name, false);
    if kernel_only {
        return kernel::kernel(
            &memprof,
            &build("pipes")?,
            &build("resident")?,
            reps,
            &out_dir,
        );
    }
    let churn_exe = build("churn")?;
    let churn_no_fp = build_as("churn", "churn_nofp", true)?;
    let hold = build("hold")?;
    let stacks = build("stacks")?;
    let deep = build("deep")?;
    let python = find_program("python3").context("python3 not found")?;
    let scale = |full: &str, small: &str| -> OsString { if quick { small } else { full }.into() };
    let workloads = [
        Workload {
            name: "churn: malloc(64)/free pairs",
            command: vec![churn_exe.clone().into(), scale("200000", "20000")],
        },
        Workload {
            name: "churn, no frame pointers",
            command: vec![churn_no_fp.into(), scale("200000", "20000")],
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
        Mode::FloorClassic,
        Mode::FloorAtEntry,
        Mode::Full,
        Mode::FullFp,
        Mode::FullMulti,
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
    // Lines after the table, on the churn loop (the first workload).
    let mut ratio_lines = Vec::new();
    for (index, w) in workloads.iter().enumerate() {
        // Rep-major: each rep runs every mode in turn, so drift over the bench (other work on
        // the machine, thermal state) falls on every mode alike.
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); modes.len()];
        for rep in 0..reps {
            for (&mode, runs) in modes.iter().zip(&mut runs) {
                let run = run_once(
                    &memprof,
                    bpftrace.as_deref(),
                    mode,
                    &w.command,
                    false,
                    false,
                )?;
                eprintln!(
                    "bench: {} / {} (rep {}): {}",
                    w.name,
                    mode.name(),
                    rep + 1,
                    human_ns(run.elapsed_ns / run.ops.max(1.0))
                );
                runs.push(run);
            }
        }
        let per_op: Vec<f64> = runs
            .iter()
            .map(|runs| median(runs.iter().map(|r| r.elapsed_ns / r.ops.max(1.0)).collect()))
            .collect();
        let of = |mode: Mode| modes.iter().position(|&m| m == mode).map(|i| per_op[i]);
        let untraced = per_op[0];
        // Against the floor of the default links.
        let floor = of(Mode::Floor);
        for ((&mode, runs), &per_op) in modes.iter().zip(&runs).zip(&per_op) {
            // Nothing to say of an untraced run against the floor.
            let x_floor = floor.filter(|_| mode != Mode::Untraced).map(|f| per_op / f);
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
                x_floor.map_or("".into(), |x| format!("{x:.2}")),
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
                "{{\"workload\":{:?},\"mode\":{:?},\"median_ns_per_op\":{per_op:.1},\"x_untraced\":{:.2},\"x_floor\":{},\"events_per_s\":{events_per_s:.0},\"lost\":{},\"agent_cpu_s\":{:.3},\"agent_max_rss_kib\":{}}}",
                w.name,
                mode.name(),
                per_op / untraced,
                x_floor.map_or("null".into(), |x| format!("{x:.3}")),
                r.lost,
                r.agent_cpu_s,
                r.agent_max_rss_kib
            ));
        }
        if index <= 1 && untraced > TRAPPED_NS {
            ratio_lines.push(format!(
                "Warning: {} took {} per pair untraced: another tracer's probes were in every \
                 process using libc meanwhile (another memprof --all, bpftrace, ...).",
                w.name,
                human_ns(untraced)
            ));
        }
        // The churn loops' verdicts: the default mode (unwind tables), frame pointers and
        // sampled against the default links' floor.
        if index <= 1
            && let (Some(floor), Some(full), Some(fp), Some(sampled)) =
                (floor, of(Mode::Full), of(Mode::FullFp), of(Mode::Sampled))
        {
            let (full, fp, sampled) = (full / floor, fp / floor, sampled / floor);
            ratio_lines.push(format!(
                "{}: memprof ÷ floor = {full:.2} (goal ≤ 1.15 with frame pointers, ≤ 1.35 \
                 without); --unwind fp ÷ floor = {fp:.2}; memprof --sample-bytes \
                 {SAMPLE_BYTES} ÷ floor = {sampled:.2} (goal ≤ 0.80); medians of {reps}, \
                 interleaved.",
                w.name
            ));
            json_rows.push(format!(
                "{{\"workload\":{:?},\"full_x_floor\":{full:.3},\"fp_x_floor\":{fp:.3},\"sampled_x_floor\":{sampled:.3},\"reps\":{reps}}}",
                w.name
            ));
        }
    }
    for line in ratio_lines {
        let _ = writeln!(md, "\n{line}");
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
    programs::programs(
        &memprof,
        &workloads[0],
        &[deep.into(), scale("200000", "20000")],
        &mut md,
        &mut json_rows,
    )?;
    python::python_versions(
        &memprof,
        &python,
        &ws.root.join("bench/json_work.py"),
        &scale("60", "4"),
        &mut md,
        &mut json_rows,
    )?;
    attach::attach_detach(&memprof, reps, &mut md, &mut json_rows)?;
    let beside_ops = if quick { 2_000_000 } else { 10_000_000 };
    beside::beside(
        &memprof,
        &churn_exe,
        beside_ops,
        reps,
        &mut md,
        &mut json_rows,
    )?;
    redis::redis(&memprof, &churn_exe, reps, quick, &mut md, &mut json_rows)?;
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
