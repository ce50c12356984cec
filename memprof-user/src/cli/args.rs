//! The command line's arguments (clap) and the parsers of their values: durations, sizes,
//! `NAME=VALUE` specs.

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use clap::Args;
use memprof_common::MAX_SAMPLE_MEAN;

use crate::analysis::categories;

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The earlier report.
    pub before: PathBuf,
    /// The later report.
    pub after: PathBuf,
    /// Write the comparison as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 3 when outstanding heap bytes grew by more than PCT percent.
    #[arg(long, value_name = "PCT")]
    pub fail_if_grows: Option<f64>,
    /// Show only the N sites that changed most (text).
    #[arg(long, default_value_t = 20)]
    pub top: usize,
}

#[derive(Debug, Args)]
pub struct TrendArgs {
    /// Reports saved with `trace --output`, one per run, oldest first (at least 3).
    #[arg(required = true, num_args = 1..)]
    pub reports: Vec<PathBuf>,
    /// Write the trend as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also write an HTML page with a chart of bytes per run to FILE.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Exit with status 3 when a site's verdict is growing and it grows by more than
    /// BYTES_PER_RUN per run (e.g. 4096, 64KiB).
    #[arg(long, value_name = "BYTES_PER_RUN", value_parser = parse_bytes)]
    pub fail_on_growth: Option<u64>,
    /// Show only the first N sites (text; growing first, steepest first).
    #[arg(long, default_value_t = 20)]
    pub top: usize,
}

#[derive(Debug, Args)]
pub struct MarkArgs {
    /// Name of the phase that starts now.
    pub name: String,
    /// The traced process (needed when several traces run).
    #[arg(long, short)]
    pub pid: Option<u32>,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  sudo memprof trace --pid 4242\n  \
    sudo memprof trace -- python3 app.py --flag\n  \
    sudo memprof trace --pid 4242 --duration 30s --interval 5s --json | jq .")]
pub struct TraceArgs {
    /// Attach to this running process.
    #[arg(long, short)]
    pub pid: Option<u32>,
    /// Trace every process on the machine (except memprof), including those that start later;
    /// the report ranks them (`processes`).
    #[arg(long, conflicts_with = "pid")]
    pub all: bool,
    /// With --all: only processes named NAME (as `ps -o comm` shows it), including those that
    /// exec into that name later, and their children.
    #[arg(long, value_name = "NAME", requires = "all")]
    pub comm: Option<String>,
    /// With --all: only processes in this cgroup (v2; a path under the cgroup2 mount, usually
    /// /sys/fs/cgroup, or relative to it, e.g. system.slice/nginx.service).
    #[arg(long, value_name = "PATH", requires = "all", conflicts_with = "comm")]
    pub cgroup: Option<PathBuf>,
    /// Trace the processes the traced process forks, and theirs (default with a COMMAND).
    #[arg(long, overrides_with = "no_follow_children")]
    pub follow_children: bool,
    /// Trace only the process itself, not its children (the default with --pid).
    #[arg(long)]
    pub no_follow_children: bool,
    /// Order of `processes` in a multi-process report: outstanding (bytes) or growth.
    #[arg(long, default_value = "outstanding", value_parser = ["outstanding", "growth"])]
    pub rank: String,
    /// Write NDJSON records to stdout instead of text. In spawn mode the command's stdout goes to
    /// memprof's stderr, so stdout carries only JSON.
    #[arg(long)]
    pub json: bool,
    /// Stop after this long (e.g. 30s, 500ms, 2m; a bare number means seconds).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Emit a snapshot this often.
    #[arg(long, value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Only list outstanding allocations at least this old.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub min_age: Duration,
    /// Show only the N largest call sites (default: 10 in text, all in JSON).
    #[arg(long)]
    pub top: Option<usize>,
    /// Write a gzipped pprof profile (alloc/inuse objects and space) to FILE.
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<PathBuf>,
    /// Write folded stacks (in-use and allocated bytes) to FILE, for flamegraph tools.
    #[arg(long, value_name = "FILE")]
    pub folded: Option<PathBuf>,
    /// Write a flamegraph SVG of in-use bytes to FILE.
    #[arg(long, value_name = "FILE")]
    pub flamegraph: Option<PathBuf>,
    /// Write a DHAT JSON file (open it in valgrind's dh_view.html) to FILE.
    #[arg(long, value_name = "FILE")]
    pub dhat: Option<PathBuf>,
    /// Write the per-call-site table as CSV to FILE.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Write a self-contained HTML report to FILE.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Serve Prometheus metrics at ADDR (e.g. 127.0.0.1:9464) while tracing.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Serve a live dashboard at ADDR (e.g. 127.0.0.1:8080) while tracing.
    #[arg(long, value_name = "ADDR")]
    pub ui: Option<String>,
    /// Save the final report (one JSON object) to FILE, for `memprof diff`.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Memory limit to project growth against (e.g. 2G, 512M, 1.5GiB); the report gives the
    /// hours until RSS reaches it.
    #[arg(long, value_parser = parse_bytes)]
    pub limit: Option<u64>,
    /// Emit an alert when outstanding heap bytes exceed this (e.g. 100M).
    #[arg(long, value_parser = parse_bytes, value_name = "BYTES")]
    pub alert_threshold: Option<u64>,
    /// Emit an alert when the heap grows faster than this many MB per hour.
    #[arg(long, value_name = "MB_PER_HOUR")]
    pub growth_threshold: Option<f64>,
    /// Exit with status 3 when a call site's verdict is `leak`.
    #[arg(long)]
    pub fail_on_leak: bool,
    /// A phase active while a thread is inside FUNCTION (repeatable): NAME=FUNCTION.
    #[arg(long, value_name = "NAME=FUNCTION")]
    pub phase: Vec<String>,
    /// Group outstanding bytes by a rule on function or module names (repeatable):
    /// NAME=REGEX. Groups matching no rule fall into their module.
    #[arg(long, value_name = "NAME=REGEX")]
    pub category: Vec<String>,
    /// How often each call site's outstanding bytes are sampled for growth analysis.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub sample_every: Duration,
    /// Attach the probes with programs that return at once: measures the cost of the probes
    /// themselves (the report counts nothing). For benchmarks.
    #[arg(long)]
    pub probe_floor: bool,
    /// Probe every function at its first byte instead of after a decoded NULL check. For
    /// benchmarks.
    #[arg(long)]
    pub no_placement: bool,
    /// Measure memprof's kernel programs: turns on the kernel's BPF run-time statistics while
    /// tracing (they cost each program two clock reads) and reports each program's runs and
    /// mean time per run (`probe_stats`). For benchmarks.
    #[arg(long)]
    pub probe_stats: bool,
    /// Print the kernel programs' diagnostics at this level and above on stderr: off, error,
    /// warn, info, debug or trace (every traced allocation: slow). Off costs nothing.
    #[arg(long, value_name = "LEVEL", default_value = "off", value_parser = crate::probe::kernel_log::LEVELS)]
    pub kernel_log: String,
    /// Per-thread slots for allocator calls in flight in the kernel (a power of two); threads
    /// whose slot is taken use a slower hash. For tests of that path.
    #[arg(long, hide = true, default_value_t = memprof_common::DEFAULT_CALL_SLOTS, value_parser = parse_call_slots)]
    pub call_slots: u32,
    /// How probes are attached: `session` (uprobe sessions, 6.10+), `multi` (multi-uprobe
    /// links, 6.9+) or `classic` (one uprobe per function). Default: the first the kernel has.
    /// For tests and benchmarks.
    #[arg(long, hide = true, value_parser = ["session", "multi", "classic"])]
    pub links: Option<String>,
    /// How stacks are unwound: `tables` walks them in the kernel with unwind tables built from
    /// each file's CFI (.eh_frame), whole stacks for code with or without frame pointers; `fp`
    /// walks frame pointers (cheapest; deeper frames of code built without them are wrong);
    /// `dwarf` copies registers and --stack-bytes of stack per allocation and unwinds them in
    /// memprof from the CFI.
    #[arg(long, default_value = "tables", value_parser = ["tables", "fp", "dwarf"])]
    pub unwind: String,
    /// Also look for separate debug files under DIR (by build id in DIR/.build-id/, or by
    /// `.gnu_debuglink` name), before /usr/lib/debug of the process's root and memprof's own.
    /// Repeatable.
    #[arg(long, value_name = "DIR")]
    pub debug_dir: Vec<PathBuf>,
    /// With --unwind dwarf: bytes of stack copied per allocation (512 to 16384); deeper frames
    /// than the copy holds end in an `unknown` frame. With --unwind tables, the size of the
    /// copies sent instead while a process's new code is not in the tables yet.
    #[arg(long, default_value_t = memprof_common::DEFAULT_STACK_COPY, value_parser = parse_stack_bytes)]
    pub stack_bytes: u32,
    /// Sample allocations by bytes: on average one allocation per SIZE allocated bytes is
    /// recorded (e.g. 512K), and counts and bytes become unbiased estimates. Cheaper for
    /// allocation-heavy processes. Default: record every allocation.
    #[arg(long, value_parser = parse_sample_bytes, value_name = "SIZE")]
    pub sample_bytes: Option<u64>,
    /// Size of the kernel ring buffer in bytes (a power of two, multiple of the page size).
    /// [default: 16 MiB; 64 MiB with --unwind dwarf, whose records carry stack copies]
    #[arg(long, value_parser = parse_ring_bytes)]
    pub ring_bytes: Option<u32>,
    /// The command to spawn and trace from its first allocation.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

pub fn parse_call_slots(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n.is_power_of_two() && n <= 1 << 20 => Ok(n),
        _ => Err(format!("expected a power of two up to 1048576, got {s:?}")),
    }
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

/// Parses `512M`, `2G`, `1.5GiB`, `4096` (bytes; K/M/G/T are powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("invalid size {s:?} (try 512M, 2G, 4096)")),
    };
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok((v * scale as f64) as u64),
        _ => Err(format!("invalid size {s:?} (try 512M, 2G, 4096)")),
    }
}

pub fn split_spec(spec: &str, what: &str) -> Result<(String, String)> {
    categories::parse_rule_spec(spec).map_err(|e| anyhow::anyhow!("invalid {what} {spec:?}: {e}"))
}

pub fn parse_stack_bytes(s: &str) -> Result<u32, String> {
    let n = parse_bytes(s)?;
    if !(512..=u64::from(memprof_common::MAX_STACK_COPY)).contains(&n) {
        return Err(format!(
            "must be between 512 and {} bytes",
            memprof_common::MAX_STACK_COPY
        ));
    }
    Ok(n as u32)
}

pub fn parse_sample_bytes(s: &str) -> Result<u64, String> {
    let v = parse_bytes(s)?;
    if v == 0 || v > MAX_SAMPLE_MEAN {
        return Err(format!(
            "sampling interval {s:?} must be between 1 byte and {} GiB",
            MAX_SAMPLE_MEAN >> 30
        ));
    }
    Ok(v)
}

pub fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|_| format!("invalid size {s:?}"))?;
    if v < 4096 || !v.is_power_of_two() {
        return Err(format!("{v} is not a power of two of at least 4096"));
    }
    Ok(v)
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
    fn byte_sizes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("10kb"), Ok(10 << 10));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5X").is_err());
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_bytes("65536"), Ok(65536));
        assert!(parse_ring_bytes("65535").is_err());
        assert!(parse_ring_bytes("1024").is_err());
    }

    #[test]
    fn call_slot_counts() {
        assert_eq!(parse_call_slots("1"), Ok(1));
        assert_eq!(parse_call_slots("16384"), Ok(16384));
        assert_eq!(parse_call_slots("1048576"), Ok(1 << 20));
        for bad in ["0", "3", "2097152", "-1", "x"] {
            assert!(parse_call_slots(bad).is_err(), "{bad}");
        }
    }
}
