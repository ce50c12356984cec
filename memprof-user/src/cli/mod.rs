//! The command line: `memprof trace --pid PID`, `memprof trace -- CMD ARGS`, `memprof diff A B`,
//! `memprof trend R1 R2 ... RN`, `memprof mark NAME`.

mod args;
mod phases;
mod start;
mod trace;

use std::{io::Write as _, path::Path};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use self::args::{DiffArgs, MarkArgs, TraceArgs, TrendArgs};
pub use self::args::{parse_bytes, parse_duration};
use crate::{
    analysis::{diff, trend},
    ingest::marks,
    output::{self, json, text},
    report::saved,
};

/// Exit status of a CI gate that fails (`--fail-on-leak`, `diff --fail-if-grows`), kept apart
/// from 1 (memprof itself failed).
pub const GATE_FAILED: i32 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "memprof",
    version,
    about = "Trace the memory allocations of a running process or a command with eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Trace allocations until the process exits, --duration elapses, or Ctrl-C.
    Trace(Box<TraceArgs>),
    /// Compare two reports saved with `trace --output`: what grew and where.
    Diff(DiffArgs),
    /// Each call site's outstanding bytes over reports saved run after run: slope per run,
    /// r² and a verdict (growing, shrinking, stable, noisy).
    Trend(TrendArgs),
    /// Start a time phase NAME in a running trace (from another shell or a script).
    Mark(MarkArgs),
}

/// Runs the command line; returns the process exit code.
pub fn run() -> Result<i32> {
    let cli = Cli::parse();
    match cli.command {
        Command::Trace(args) => trace::trace(*args),
        Command::Diff(args) => diff_reports(&args),
        Command::Trend(args) => trend_reports(&args),
        Command::Mark(args) => {
            marks::send(Path::new(marks::SOCKET_DIR), args.pid, &args.name)?;
            Ok(0)
        }
    }
}

fn diff_reports(args: &DiffArgs) -> Result<i32> {
    let before = saved::load_report(&args.before)?;
    let after = saved::load_report(&args.after)?;
    let d = diff::diff(&before, &after)?;
    if args.json {
        json::write_line(&d)?;
    } else {
        let mut out = std::io::stdout().lock();
        write!(out, "{}", text::render_diff(&d, args.top))?;
        out.flush()?;
    }
    match args.fail_if_grows {
        Some(pct) if diff::grows_beyond(&d, pct) => {
            eprintln!(
                "memprof: outstanding heap bytes grew by more than {pct}% ({} -> {})",
                d.outstanding_bytes_before, d.outstanding_bytes_after
            );
            Ok(GATE_FAILED)
        }
        _ => Ok(0),
    }
}

fn trend_reports(args: &TrendArgs) -> Result<i32> {
    let reports = args
        .reports
        .iter()
        .map(|p| Ok((p.display().to_string(), saved::load_report(p)?)))
        .collect::<Result<Vec<_>>>()?;
    let t = trend::trend(&reports)?;
    for run in &t.incomplete_runs {
        eprintln!("memprof: warning: {}", run.describe());
    }
    if let Some(path) = &args.html {
        std::fs::write(path, output::trend::render_html(&t))
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    if args.json {
        json::write_line(&t)?;
    } else {
        let mut out = std::io::stdout().lock();
        write!(out, "{}", output::trend::render(&t, args.top))?;
        out.flush()?;
    }
    let Some(limit) = args.fail_on_growth else {
        return Ok(0);
    };
    let growing = trend::growing_beyond(&t, limit as f64);
    let Some(first) = growing.first() else {
        return Ok(0);
    };
    eprintln!(
        "memprof: {} site(s) grow by more than {limit} B per run; steepest {:.1} B/run at {}",
        growing.len(),
        first.slope_bytes_per_run,
        first.stack.first().map_or("?", String::as_str)
    );
    Ok(GATE_FAILED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        Cli::try_parse_from([
            "memprof",
            "trace",
            "--pid",
            "1",
            "--json",
            "--duration",
            "3s",
        ])
        .unwrap();
        let cli = Cli::try_parse_from(["memprof", "trace", "--", "ls", "-l"]).unwrap();
        let Command::Trace(args) = cli.command else {
            panic!("not a trace command");
        };
        assert_eq!(args.command, vec!["ls", "-l"]);
        Cli::try_parse_from([
            "memprof",
            "diff",
            "a.json",
            "b.json",
            "--fail-if-grows",
            "5",
        ])
        .unwrap();
        Cli::try_parse_from(["memprof", "mark", "render", "--pid", "7"]).unwrap();
        let cli = Cli::try_parse_from([
            "memprof",
            "trend",
            "a.json",
            "b.json",
            "c.json",
            "--fail-on-growth",
            "4KiB",
        ])
        .unwrap();
        let Command::Trend(args) = cli.command else {
            panic!("not a trend command");
        };
        assert_eq!((args.reports.len(), args.fail_on_growth), (3, Some(4096)));
        assert!(Cli::try_parse_from(["memprof", "trend"]).is_err());
    }
}
