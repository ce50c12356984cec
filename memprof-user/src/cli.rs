//! Command line: `memprof trace --pid PID` and `memprof trace -- CMD ARGS`.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use memprof_common::DEFAULT_RING_BYTES;
use serde::Serialize;

use crate::{
    load::{Options, Tracer},
    report,
    session::{End, PidFd, Session, Settings, write_json_line},
    target,
};

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
    Trace(TraceArgs),
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  sudo memprof trace --pid 4242\n  \
    sudo memprof trace -- python3 app.py --flag\n  \
    sudo memprof trace --pid 4242 --duration 30s --interval 5s --json | jq .")]
struct TraceArgs {
    /// Attach to this running process.
    #[arg(long, short)]
    pid: Option<u32>,
    /// Write NDJSON records to stdout instead of text. In spawn mode the command's stdout goes to
    /// memprof's stderr, so stdout carries only JSON.
    #[arg(long)]
    json: bool,
    /// Stop after this long (e.g. 30s, 500ms, 2m; a bare number means seconds).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Emit a snapshot this often.
    #[arg(long, value_parser = parse_duration)]
    interval: Option<Duration>,
    /// Only list outstanding allocations at least this old.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    min_age: Duration,
    /// Show only the N largest call sites (default: 10 in text, all in JSON).
    #[arg(long)]
    top: Option<usize>,
    /// Size of the kernel ring buffer in bytes (a power of two, multiple of the page size).
    #[arg(long, default_value_t = DEFAULT_RING_BYTES, value_parser = parse_ring_bytes)]
    ring_bytes: u32,
    /// The command to spawn and trace from its first allocation.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Parses `500ms`, `30s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(Duration::from_secs_f64(v * scale)),
        _ => Err(format!("invalid duration {s:?} (try 30s, 500ms, 2m)")),
    }
}

fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|_| format!("invalid size {s:?}"))?;
    if v < 4096 || !v.is_power_of_two() {
        return Err(format!("{v} is not a power of two of at least 4096"));
    }
    Ok(v)
}

/// The start record of the NDJSON stream.
#[derive(Serialize)]
struct Start<'a> {
    #[serde(rename = "type")]
    record: &'static str,
    pid: u32,
    command: Option<&'a [String]>,
    library: String,
    probes: &'a [String],
    missing: &'a [String],
    aliases: Vec<[&'a str; 2]>,
}

/// Runs the command line; returns the process exit code.
pub fn run() -> Result<i32> {
    let cli = Cli::parse();
    match cli.command {
        Command::Trace(args) => trace(args),
    }
}

fn trace(args: TraceArgs) -> Result<i32> {
    if args.pid.is_some() != args.command.is_empty() {
        bail!("give either --pid PID or -- COMMAND [ARGS...]");
    }
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    target::check_capabilities(target::effective_capabilities()?, euid)?;
    target::check_kernel(std::path::Path::new("/sys"))?;

    let (pid, library, spawned) = match args.pid {
        Some(pid) => {
            if pid == std::process::id() {
                bail!("memprof cannot trace itself");
            }
            (pid, target::library_of_pid(pid)?, None)
        }
        None => {
            let path = target::resolve_command(&args.command[0])?;
            let library = target::library_for_command(&path)?;
            // Fork before any thread exists (the runtime is built afterwards).
            let child = target::spawn_stopped(&path, &args.command, args.json)?;
            (child.pid, library, Some(child))
        }
    };
    let result = trace_pid(&args, pid, library, spawned.as_ref());
    if result.is_err()
        && let Some(child) = &spawned
    {
        child.abort();
    }
    result
}

fn trace_pid(
    args: &TraceArgs,
    pid: u32,
    library: PathBuf,
    spawned: Option<&target::Spawned>,
) -> Result<i32> {
    let pidfd = PidFd::open(pid)?;
    let tracer = Tracer::attach(&Options {
        pid,
        library: &library,
        ring_bytes: args.ring_bytes,
    })
    .with_context(|| format!("failed to trace pid {pid}"))?;

    let probes = &tracer.attach.probes;
    eprintln!(
        "memprof: tracing pid {pid} ({} probes on {}; Ctrl-C to stop)",
        probes.len(),
        library.display()
    );
    if args.json {
        write_json_line(&Start {
            record: "start",
            pid,
            command: spawned.map(|_| args.command.as_slice()),
            library: library.display().to_string(),
            probes,
            missing: &tracer.attach.missing,
            aliases: tracer
                .attach
                .aliases
                .iter()
                .map(|(a, b)| [a.as_str(), b.as_str()])
                .collect(),
        })?;
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let settings = Settings {
        json: args.json,
        duration: args.duration,
        interval: args.interval,
        min_age: args.min_age,
        top: args.top,
    };
    let mut session = Session::new(pid, tracer, settings, spawned.is_some(), pidfd);
    let end = runtime.block_on(async {
        if let Some(child) = spawned {
            child.resume();
        }
        session.run().await
    })?;

    let (exited, code) = match end {
        End::Exited { status } => (true, status.map(exit_code)),
        End::Duration | End::Signal => (false, None),
    };
    let report = report::finish(session.snapshot(), exited, code);
    session.emit(&report)?;
    Ok(if spawned.is_some() {
        code.unwrap_or(0)
    } else {
        0
    })
}

/// Shell-style exit code of a wait status: the exit status, or 128 + the killing signal.
fn exit_code(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_bytes("65536"), Ok(65536));
        assert!(parse_ring_bytes("65535").is_err());
        assert!(parse_ring_bytes("1024").is_err());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(7 << 8), 7);
        assert_eq!(exit_code(9), 137);
    }

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
        let Command::Trace(args) = cli.command;
        assert_eq!(args.command, vec!["ls", "-l"]);
    }
}
