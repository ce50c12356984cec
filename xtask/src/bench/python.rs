//! The kernel's time per allocation with Python frames, by CPython version.

use std::{
    ffi::OsString,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use super::{Mode, run::run_once};

/// The Debian forky root with CPython 3.14 and 3.15 that the Python tests build
/// (`MEMPROF_FORKY_ROOT` picks another).
const FORKY_ROOT: &str = "/var/cache/memprof-test/forky";

/// The kernel's time per allocation with Python frames, by CPython version: the JSON workload
/// under memprof (`--probe-stats`, one run each) with the machine's python3 (3.11 here) and
/// with 3.14 and 3.15 in the forky root, when it has been built.
pub(super) fn python_versions(
    memprof: &Path,
    python3: &Path,
    script: &Path,
    rounds: &OsString,
    md: &mut String,
    json_rows: &mut Vec<String>,
) -> Result<()> {
    let root = PathBuf::from(
        std::env::var("MEMPROF_FORKY_ROOT").unwrap_or_else(|_| FORKY_ROOT.to_string()),
    );
    let mut commands: Vec<(String, Vec<OsString>)> = vec![(
        "python3".to_string(),
        vec![python3.into(), script.into(), rounds.clone()],
    )];
    let mut missing = Vec::new();
    for python in ["python3.14", "python3.15"] {
        if !root.join("usr/bin").join(python).is_file() {
            missing.push(python);
            continue;
        }
        let dir = root.join("opt/memprof-test");
        fs::create_dir_all(&dir)?;
        fs::copy(script, dir.join("json_work.py"))?;
        commands.push((
            python.to_string(),
            vec![
                "chroot".into(),
                root.clone().into(),
                python.into(),
                "/opt/memprof-test/json_work.py".into(),
                rounds.clone(),
            ],
        ));
    }
    let _ = writeln!(
        md,
        "\nKernel time per allocation with Python frames (the JSON workload, memprof, \
         `--probe-stats`, one run each):\n\n| interpreter | allocation program | runs | ns per run |\n| --- | --- | --- | --- |"
    );
    for (name, command) in &commands {
        let version = crate::util::output_of(
            Command::new(&command[0])
                .args(&command[1..command.len() - 2])
                .arg("--version"),
        )
        .unwrap_or_default();
        let r = run_once(memprof, None, Mode::Full, command, false, true)?;
        for s in r.alloc_programs() {
            eprintln!(
                "bench: python frames on {}: {} {:.0} ns x {}",
                version.trim(),
                s.program,
                s.ns_per_run,
                s.runs
            );
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} |",
                version.trim(),
                s.program,
                s.runs,
                s.ns_per_run
            );
            json_rows.push(format!(
                "{{\"workload\":\"python: build/dump/parse JSON\",\"interpreter\":{:?},\"program\":{:?},\"runs\":{},\"ns_per_run\":{:.1}}}",
                version.trim(),
                s.program,
                s.runs,
                s.ns_per_run
            ));
        }
        eprintln!("bench: python frames on {name}: done");
    }
    if !missing.is_empty() {
        let _ = writeln!(
            md,
            "\n{} not measured: no forky root at {} (the Python tests build it).",
            missing.join(" and "),
            root.display()
        );
    }
    Ok(())
}
