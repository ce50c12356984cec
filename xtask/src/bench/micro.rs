//! The agent's microbenchmark (`memprof-bench`, criterion): synthetic records replayed through
//! decode → table → tracker → report, in events per second.

use std::{fmt::Write as _, process::Stdio};

use anyhow::{Context as _, Result, bail};

use crate::util::Workspace;

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

pub(super) fn micro_markdown(results: &[(String, f64)]) -> String {
    let mut md = String::from(
        "\nAgent microbenchmark (memprof-bench: synthetic records through decode → table → \
         tracker → report):\n\n| benchmark | events/s |\n| --- | --- |\n",
    );
    let (scans, agent): (Vec<_>, Vec<_>) = results
        .iter()
        .partition(|(name, _)| name.starts_with("residency/"));
    for (name, v) in agent {
        let _ = writeln!(md, "| {name} | {:.2}M |", v / 1e6);
    }
    if !scans.is_empty() {
        md.push_str(
            "\nResidency scan (RSS explained: smaps, pagemap, explanation), in 4 KiB pages:\n\n\
             | benchmark | pages/s | ms per GiB |\n| --- | --- | --- |\n",
        );
        for (name, v) in scans {
            let _ = writeln!(
                md,
                "| {name} | {:.2}M | {:.1} |",
                v / 1e6,
                262_144.0 / v * 1e3
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
