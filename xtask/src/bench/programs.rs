//! What memprof's kernel programs themselves cost: each program's time per run on the churn
//! loop in every mode (the kernel's BPF run-time statistics, `--probe-stats`), their size as
//! loaded with kernel logs off and on, and the stack walk at the bottom of a deep stack.

use std::{ffi::OsString, fmt::Write as _, path::Path};

use anyhow::Result;

use super::{Mode, Run, Workload, run::run_once};

/// Appends the programs' tables and lines to `md` and their rows to `json_rows`: `churn` in
/// every mode, `deep_cmd` (bench/deep.c) with tables and frame pointers.
pub(super) fn programs(
    memprof: &Path,
    churn: &Workload,
    deep_cmd: &[OsString],
    md: &mut String,
    json_rows: &mut Vec<String>,
) -> Result<()> {
    // What memprof's kernel programs themselves cost per call, from the kernel's BPF run-time
    // statistics (a separate run: the statistics add two clock reads to every program run).
    let stat_modes = [
        Mode::Floor,
        Mode::FloorClassic,
        Mode::Full,
        Mode::FullFp,
        Mode::FullMulti,
        Mode::Sampled,
        Mode::Dwarf,
    ];
    let mut stat_runs = Vec::new();
    for mode in stat_modes {
        stat_runs.push(run_once(memprof, None, mode, &churn.command, false, true)?);
    }
    // The programs differ by kind of link: a column for each one seen.
    let mut programs: Vec<&str> = stat_runs
        .iter()
        .flat_map(|r| r.alloc_programs().map(|s| s.program.as_str()))
        .collect();
    programs.sort_unstable();
    programs.dedup();
    let _ = writeln!(
        md,
        "\nKernel programs' own time per run on {} (`--probe-stats`, one run each; the \
         statistics add about 30 ns per run), with runs per pair, and their total per pair (a \
         session program runs at entry and, unless the entry skips it, at return):\n\n\
         | mode | {} | per pair |\n| --- |{} --- |",
        churn.name,
        programs.join(" | "),
        " --- |".repeat(programs.len())
    );
    for (mode, r) in stat_modes.iter().zip(&stat_runs) {
        let stat = |p: &str| r.alloc_programs().find(|s| s.program == p);
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} ns |",
            mode.name(),
            programs
                .iter()
                .map(|p| stat(p).map_or("".into(), |s| format!(
                    "{:.0} ns × {:.2}",
                    s.ns_per_run,
                    s.runs as f64 / r.ops.max(1.0)
                )))
                .collect::<Vec<_>>()
                .join(" | "),
            r.alloc_ns_per_op()
        );
        for s in r.alloc_programs() {
            json_rows.push(format!(
                "{{\"workload\":{:?},\"mode\":{:?},\"program\":{:?},\"runs\":{},\"ns_per_run\":{:.1}}}",
                churn.name,
                mode.name(),
                s.program,
                s.runs,
                s.ns_per_run
            ));
        }
        json_rows.push(format!(
            "{{\"workload\":{:?},\"mode\":{:?},\"kernel_ns_per_op\":{:.1}}}",
            churn.name,
            mode.name(),
            r.alloc_ns_per_op()
        ));
    }
    // aya-log: with logs off (every row above) the verifier drops the logging code; the
    // programs' size as loaded, off and with every level on (a short run: `trace` logs each
    // allocation).
    let short: Vec<OsString> = vec![churn.command[0].clone(), "100".into()];
    let off = run_once(memprof, None, Mode::Full, &short, false, true)?;
    let on = run_once(memprof, None, Mode::FullLogTrace, &short, false, true)?;
    let all = |r: &Run| r.probe_stats.iter().map(|s| s.instructions).sum::<u64>();
    let alloc = |r: &Run| r.alloc_programs().map(|s| s.instructions).sum::<u64>();
    let _ = writeln!(
        md,
        "\nKernel logs (aya-log): with `--kernel-log off`, the default and every row above, the \
         verifier removes the logging code at load, so it costs nothing: the programs that ran \
         hold {} instructions as loaded ({} in the allocator program), against {} ({}) with \
         `--kernel-log trace`.",
        all(&off),
        alloc(&off),
        all(&on),
        alloc(&on)
    );
    json_rows.push(format!(
        "{{\"kernel_log\":\"off\",\"instructions\":{},\"alloc_instructions\":{}}}",
        all(&off),
        alloc(&off)
    ));
    json_rows.push(format!(
        "{{\"kernel_log\":\"trace\",\"instructions\":{},\"alloc_instructions\":{}}}",
        all(&on),
        alloc(&on)
    ));
    // The stack walk on a deep stack, with tables and with frame pointers: one full run with
    // statistics each.
    for mode in [Mode::Full, Mode::FullFp] {
        let r = run_once(memprof, None, mode, deep_cmd, false, true)?;
        if r.alloc_programs().next().is_none() {
            continue;
        }
        let per_pair = r.alloc_ns_per_op();
        let programs = r
            .alloc_programs()
            .map(|s| {
                format!(
                    "{} {:.0} ns × {:.2}",
                    s.program,
                    s.ns_per_run,
                    s.runs as f64 / r.ops.max(1.0)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            md,
            "\nThe same pairs at the bottom of 60 frames of about 160 bytes (`bench/deep.c`, \
             {}, `--probe-stats`): {per_pair:.0} ns per pair in the kernel ({programs})",
            mode.name()
        );
        for s in r.alloc_programs() {
            json_rows.push(format!(
                "{{\"workload\":\"deep: malloc(64)/free pairs under 60 frames\",\"mode\":{:?},\"program\":{:?},\"runs\":{},\"ns_per_run\":{:.1}}}",
                mode.name(),
                s.program,
                s.runs,
                s.ns_per_run
            ));
        }
        json_rows.push(format!(
            "{{\"workload\":\"deep: malloc(64)/free pairs under 60 frames\",\"mode\":{:?},\"kernel_ns_per_op\":{per_pair:.1}}}",
            mode.name()
        ));
    }
    Ok(())
}
