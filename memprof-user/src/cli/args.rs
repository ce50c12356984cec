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
    #[arg(long, value_name = "PCT", value_parser = parse_percent)]
    pub fail_if_grows: Option<f64>,
    /// Show only the N sites that changed most (text).
    #[arg(long, default_value_t = 20, value_parser = parse_top)]
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
    #[arg(long, short, value_parser = parse_pid)]
    pub pid: Option<u32>,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  sudo memprof trace --pid 4242\n  \
    sudo memprof trace -- python3 app.py --flag\n  \
    sudo memprof trace --pid 4242 --duration 30s --interval 5s --json | jq .")]
pub struct TraceArgs {
    /// Attach to this running process.
    #[arg(long, short, value_parser = parse_pid)]
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
    /// Stop after this long (e.g. 30s, 500ms, 2m; a bare number means seconds). With a
    /// COMMAND, the command is then ended too (SIGTERM, SIGKILL 2 s later) unless
    /// --keep-running is given.
    #[arg(long, value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,
    /// With a COMMAND: leave it running when the trace ends before it exits (--duration,
    /// Ctrl-C, SIGTERM), instead of ending it with SIGTERM and, 2 s later, SIGKILL.
    #[arg(long)]
    pub keep_running: bool,
    /// Emit a snapshot this often (at least 10ms).
    #[arg(long, value_parser = parse_period)]
    pub interval: Option<Duration>,
    /// Only list outstanding allocations at least this old.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub min_age: Duration,
    /// Show only the N largest call sites (default: 10 in text, all in JSON).
    #[arg(long, value_parser = parse_top)]
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
    /// Require the token in FILE on every --metrics and --ui request (`Authorization: Bearer
    /// TOKEN`, or `?token=TOKEN` in the dashboard's URL).
    #[arg(long, value_name = "FILE")]
    pub http_token: Option<PathBuf>,
    /// Permissions of the files written (--output, --html, --csv, ...), in octal: they hold the
    /// command line and names from the traced processes, so only their owner reads them by
    /// default.
    #[arg(long, value_name = "MODE", default_value = "600", value_parser = parse_file_mode)]
    pub file_mode: u32,
    /// Save the final report (one JSON object) to FILE, for `memprof diff`.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Memory limit to project growth against (e.g. 2G, 512M, 1.5GiB); the report gives the
    /// hours until RSS reaches it.
    #[arg(long, value_parser = parse_limit)]
    pub limit: Option<u64>,
    /// Emit an alert when outstanding heap bytes exceed this (e.g. 100M).
    #[arg(long, value_parser = parse_bytes, value_name = "BYTES")]
    pub alert_threshold: Option<u64>,
    /// Emit an alert when the heap grows faster than this many MB per hour.
    #[arg(long, value_name = "MB_PER_HOUR", value_parser = parse_rate)]
    pub growth_threshold: Option<f64>,
    /// Also trace the kernel's allocations on the traced processes' behalf (kmalloc, slab
    /// caches, pages, per-CPU areas: pipe and socket buffers, file tables...), each under the
    /// kernel stack joined to the user stack that caused it. Pages that become the process's
    /// own (anonymous memory, page cache) are its RSS and are left out.
    #[arg(long)]
    pub kernel: bool,
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
    /// How often each call site's outstanding bytes are sampled for growth analysis (at
    /// least 10ms).
    #[arg(long, value_parser = parse_period, default_value = "500ms")]
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
    /// Walk every stack afresh: no walk is reused from the kernel's per-CPU cache of walks.
    /// For tests that compare the two.
    #[arg(long, hide = true)]
    pub no_walk_reuse: bool,
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
    /// [default: 16 MiB; 64 MiB with --unwind dwarf, whose records carry stack copies, and with
    /// --all, where each process that starts sends its first allocations with stack copies]
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

/// The longest duration taken (`--duration`, `--min-age`, ...): 366 days.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// The shortest period of `--interval` and `--sample-every`.
pub const MIN_PERIOD: Duration = Duration::from_millis(10);
/// The largest `--top`.
pub const MAX_TOP: usize = 1_000_000;
/// The largest pid Linux hands out (`PID_MAX_LIMIT`).
pub const MAX_PID: u32 = 1 << 22;

/// Parses `500ms`, `30s`, `2m`, `1h` or a bare number of seconds, from 0 to 366 days.
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
    let invalid = || format!("invalid duration {s:?} (try 30s, 500ms, 2m)");
    let v = num.trim().parse::<f64>().map_err(|_| invalid())?;
    if !v.is_finite() || v < 0.0 {
        return Err(invalid());
    }
    match Duration::try_from_secs_f64(v * scale) {
        Ok(d) if d <= MAX_DURATION => Ok(d),
        _ => Err(format!("duration {s:?} is longer than 366 days")),
    }
}

/// A duration above zero (`--duration`).
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("duration {s:?} must be above zero"));
    }
    Ok(d)
}

/// A period of at least 10 ms (`--interval`, `--sample-every`).
pub fn parse_period(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_PERIOD {
        return Err(format!("period {s:?} is shorter than 10ms"));
    }
    Ok(d)
}

/// `--top N`: 0 to 1 000 000.
pub fn parse_top(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n <= MAX_TOP => Ok(n),
        _ => Err(format!("expected a number from 0 to {MAX_TOP}, got {s:?}")),
    }
}

/// A process id: 1 to 4194304.
pub fn parse_pid(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_PID).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a process id from 1 to {MAX_PID}, got {s:?}"
        )),
    }
}

/// A finite, non-negative rate (`--growth-threshold`).
pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("expected a number of at least 0, got {s:?}")),
    }
}

/// A finite percentage, possibly negative (`--fail-if-grows -10`: must shrink by 10%).
pub fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= -100.0 => Ok(v),
        _ => Err(format!("expected a percentage of at least -100, got {s:?}")),
    }
}

/// A memory limit above zero (`--limit`).
pub fn parse_limit(s: &str) -> Result<u64, String> {
    match parse_bytes(s)? {
        0 => Err(format!("limit {s:?} must be above zero")),
        v => Ok(v),
    }
}

/// File permissions in octal (`600`, `0644`): read and write bits only for the owner, group
/// and others.
pub fn parse_file_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim(), 8) {
        Ok(m) if m & !0o666 == 0 && m & 0o600 == 0o600 => Ok(m),
        _ => Err(format!(
            "expected an octal mode such as 600 or 644 (read and write bits, readable and \
             writable by the owner), got {s:?}"
        )),
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
        // 2^64 itself does not fit.
        Ok(v) if v.is_finite() && v >= 0.0 && v * (scale as f64) < 18_446_744_073_709_551_616.0 => {
            Ok((v * scale as f64) as u64)
        }
        Ok(v) if v.is_finite() && v >= 0.0 => Err(format!("size {s:?} is too large")),
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

/// The largest ring: 1 GiB.
pub const MAX_RING_BYTES: u32 = 1 << 30;

pub fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|_| format!("invalid size {s:?}"))?;
    if v < 4096 || !v.is_power_of_two() || v > MAX_RING_BYTES {
        return Err(format!(
            "{v} is not a power of two from 4096 to {MAX_RING_BYTES}"
        ));
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
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn numbers_out_of_range_are_refused_not_panics() {
        for (parse, bad, why) in [
            (
                parse_positive_duration as fn(&str) -> Result<Duration, String>,
                "99999999999999999h",
                "366 days",
            ),
            (parse_positive_duration, "1e300s", "366 days"),
            (parse_positive_duration, "inf", "invalid duration"),
            (parse_positive_duration, "NaN", "invalid duration"),
            (parse_positive_duration, "0s", "above zero"),
            (parse_period, "0s", "shorter than 10ms"),
            (parse_period, "1ms", "shorter than 10ms"),
            (parse_duration, "367d", "invalid duration"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(parse_period("10ms"), Ok(MIN_PERIOD));
        assert_eq!(
            parse_positive_duration("366h"),
            Ok(Duration::from_secs(366 * 3600))
        );
        assert!(
            parse_bytes("99999999999T")
                .unwrap_err()
                .contains("too large")
        );
        assert!(parse_bytes("16777216T").unwrap_err().contains("too large"));
        assert_eq!(parse_bytes("16777215T"), Ok(16_777_215 << 40));
        assert!(parse_limit("0").is_err());
        assert!(parse_top("1000001").is_err() && parse_top("-1").is_err());
        assert_eq!(parse_top("0"), Ok(0));
        assert!(parse_pid("0").is_err() && parse_pid("4194305").is_err());
        assert_eq!(parse_pid("1"), Ok(1));
        assert!(parse_rate("-1").is_err() && parse_rate("inf").is_err());
        assert!(parse_percent("NaN").is_err() && parse_percent("-101").is_err());
        assert_eq!(parse_file_mode("600"), Ok(0o600));
        assert_eq!(parse_file_mode("0644"), Ok(0o644));
        for bad in ["777", "4600", "400", "abc", "1000000000000"] {
            assert!(parse_file_mode(bad).is_err(), "{bad}");
        }
        assert!(parse_ring_bytes("2147483648").is_err());
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
