//! `cargo xtask bench --kernel`: what `memprof trace --kernel` costs a process whose work is
//! in the kernel. bench/pipes.c runs pipe rounds (pipe(), 64 KiB written and read back, both
//! ends closed), untraced and under `memprof --kernel`, `--reps` times each, rep-major; the
//! medians go to `target/bench/kernel.md` and `kernel.json`, with what the residency scans
//! of RSS explained cost (bench/resident.c, see `residency`).

use std::{ffi::OsString, fmt::Write as _, fs, path::Path};

use anyhow::{Result, bail};

use super::{
    Mode,
    run::{human_ns, median, run_once},
};

/// Pipe rounds per run.
const ROUNDS: &str = "20000";

/// Measures bench/pipes.c (built at `pipes`) untraced and under `memprof` (`--kernel`), and
/// the residency scans on bench/resident.c (built at `resident`).
pub(super) fn kernel(
    memprof: &Path,
    pipes: &Path,
    resident: &Path,
    reps: usize,
    out_dir: &Path,
) -> Result<()> {
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
    let scans = residency(memprof, resident, reps)?;
    let _ = writeln!(
        md,
        "\nResidency scans (RSS explained): bench/resident.c holds {RESIDENT_MIB} MiB in 64 MiB \
         blocks, half of each written, held 3 s and scanned with each snapshot (`--interval 1s \
         --probe-stats`; median of {reps} runs): \
         {:.0} scans, {:.2} ms per scan, {:.2} ms per GiB of allocator regions read.",
        scans.scans, scans.ms_per_scan, scans.ms_per_gib
    );
    let json = format!(
        "{}, \"residency_scans\":{:.0},\"residency_ms_per_scan\":{:.3},\
         \"residency_ms_per_gib\":{:.3}}}\n",
        json.trim_end().trim_end_matches('}'),
        scans.scans,
        scans.ms_per_scan,
        scans.ms_per_gib
    );
    fs::write(out_dir.join("kernel.md"), &md)?;
    fs::write(out_dir.join("kernel.json"), json)?;
    println!("{md}");
    Ok(())
}

/// MiB bench/resident.c holds.
const RESIDENT_MIB: &str = "1024";

/// Medians of the residency scans of one traced bench/resident.c run.
struct Scans {
    scans: f64,
    ms_per_scan: f64,
    ms_per_gib: f64,
}

/// Runs bench/resident.c (built at `resident`) under `memprof --probe-stats` `reps` times and
/// reads its residency line: `memprof: N residency scans read B bytes of allocator regions in
/// T ms (S ms per scan, G ms per GiB)`.
fn residency(memprof: &Path, resident: &Path, reps: usize) -> Result<Scans> {
    let mut runs = Vec::new();
    for rep in 0..reps {
        let out = std::process::Command::new(memprof)
            .args(["trace", "--probe-stats", "--interval", "1s", "--"])
            .arg(resident)
            .arg(RESIDENT_MIB)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let Some(scan) = stderr.lines().find_map(parse_scans) else {
            bail!("no residency line from memprof on bench/resident.c:\n{stderr}");
        };
        eprintln!(
            "bench --kernel: rep {} residency: {:.0} scans, {:.2} ms per scan, {:.2} ms per GiB",
            rep + 1,
            scan.0,
            scan.1,
            scan.2
        );
        runs.push(scan);
    }
    Ok(Scans {
        scans: median(runs.iter().map(|r| r.0).collect()),
        ms_per_scan: median(runs.iter().map(|r| r.1).collect()),
        ms_per_gib: median(runs.iter().map(|r| r.2).collect()),
    })
}

/// (scans, ms per scan, ms per GiB) of memprof's residency line.
fn parse_scans(line: &str) -> Option<(f64, f64, f64)> {
    let rest = line.strip_prefix("memprof: ")?;
    let (scans, rest) = rest.split_once(" residency scans read ")?;
    let (_, rest) = rest.split_once(" ms (")?;
    let (per_scan, rest) = rest.split_once(" ms per scan, ")?;
    let per_gib = rest.strip_suffix(" ms per GiB)")?;
    Some((
        scans.parse().ok()?,
        per_scan.parse().ok()?,
        per_gib.parse().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_residency_line() {
        assert_eq!(
            parse_scans(
                "memprof: 7 residency scans read 7516192768 bytes of allocator regions in 21.0 \
                 ms (3.0 ms per scan, 2.9 ms per GiB)"
            ),
            Some((7.0, 3.0, 2.9))
        );
        assert_eq!(
            parse_scans("memprof: detached 1 probe links in 3.0 ms"),
            None
        );
    }
}
