//! `cargo xtask bench --kernel`: what `memprof trace --kernel` costs a process whose work is
//! in the kernel. bench/pipes.c runs pipe rounds (pipe(), 64 KiB written and read back, both
//! ends closed), untraced and under `memprof --kernel`, `--reps` times each, rep-major; the
//! medians go to `target/bench/kernel.md` and `kernel.json`.

use std::{ffi::OsString, fmt::Write as _, fs, path::Path};

use anyhow::{Result, bail};

use super::{
    Mode,
    run::{human_ns, median, run_once},
};

/// Pipe rounds per run.
const ROUNDS: &str = "20000";

/// Measures bench/pipes.c (built at `pipes`) untraced and under `memprof` (`--kernel`).
pub(super) fn kernel(memprof: &Path, pipes: &Path, reps: usize, out_dir: &Path) -> Result<()> {
    let command: Vec<OsString> = vec![pipes.into(), ROUNDS.into()];
    let modes = [Mode::Untraced, Mode::Kernel];
    let mut runs = vec![Vec::new(); modes.len()];
    for rep in 0..reps {
        for (i, mode) in modes.iter().enumerate() {
            let r = run_once(memprof, None, *mode, &command, false, false)?;
            eprintln!(
                "bench --kernel: rep {} {}: {} per round, {} records, {} lost",
                rep + 1,
                mode.name(),
                human_ns(r.elapsed_ns / r.ops.max(1.0)),
                r.events,
                r.lost
            );
            runs[i].push(r);
        }
    }
    let per_round = |i: usize| {
        median(
            runs[i]
                .iter()
                .map(|r| r.elapsed_ns / r.ops.max(1.0))
                .collect(),
        )
    };
    let (untraced, traced) = (per_round(0), per_round(1));
    let records_per_s = median(
        runs[1]
            .iter()
            .map(|r| r.events as f64 / (r.elapsed_ns / 1e9).max(1e-9))
            .collect(),
    );
    let records_per_round = median(
        runs[1]
            .iter()
            .map(|r| r.events as f64 / r.ops.max(1.0))
            .collect(),
    );
    let lost: u64 = runs[1].iter().map(|r| r.lost).sum();
    let agent_cpu = median(runs[1].iter().map(|r| r.agent_cpu_s).collect());
    if runs[1].iter().all(|r| r.events == 0) {
        bail!("memprof --kernel recorded nothing on bench/pipes.c");
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# memprof --kernel on pipe rounds\n\nbench/pipes.c, {ROUNDS} rounds (pipe, 64 KiB \
         written and read back, close), median of {reps} runs.\n\n| | per round | records per \
         round | records/s | lost records | agent CPU |\n| --- | --- | --- | --- | --- | --- |"
    );
    let _ = writeln!(md, "| untraced | {} | | | | |", human_ns(untraced));
    let _ = writeln!(
        md,
        "| memprof --kernel | {} ({:.1}x) | {records_per_round:.1} | {records_per_s:.0} | {lost} | {agent_cpu:.2} s |",
        human_ns(traced),
        traced / untraced.max(1.0)
    );
    let json = format!(
        "{{\"workload\":\"pipe rounds\",\"rounds\":{ROUNDS},\"reps\":{reps},\
         \"untraced_ns_per_round\":{untraced:.0},\"kernel_ns_per_round\":{traced:.0},\
         \"records_per_round\":{records_per_round:.1},\"records_per_s\":{records_per_s:.0},\
         \"lost\":{lost},\"agent_cpu_s\":{agent_cpu:.3}}}\n"
    );
    fs::write(out_dir.join("kernel.md"), &md)?;
    fs::write(out_dir.join("kernel.json"), json)?;
    println!("{md}");
    Ok(())
}
