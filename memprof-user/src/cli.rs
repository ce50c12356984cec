//! Command line: `memprof trace --pid PID`, `memprof trace -- CMD ARGS`, `memprof diff A B`,
//! `memprof mark NAME`.

use std::{
    fs,
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use memprof_common::{DEFAULT_RING_BYTES, MAX_SAMPLE_MEAN};
use serde::Serialize;

use crate::{
    allocators::{self, Allocator},
    analysis::categories::{self, Rule},
    diff,
    load::{Options, Targets, Tracer},
    maps::AddressSpace,
    marks,
    mmaps::MmapWatcher,
    output::{self, Live, OutputFiles},
    report,
    session::{End, PidFd, Session, Settings, write_json_line},
    target,
};

/// Default ring size with `--unwind dwarf`: room for about 8000 records with 8 KiB copies.
const DWARF_RING_BYTES: u32 = 64 << 20;

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
    /// Start a time phase NAME in a running trace (from another shell or a script).
    Mark(MarkArgs),
}

#[derive(Debug, Args)]
struct DiffArgs {
    /// The earlier report.
    before: PathBuf,
    /// The later report.
    after: PathBuf,
    /// Write the comparison as one JSON object.
    #[arg(long)]
    json: bool,
    /// Exit with status 3 when outstanding heap bytes grew by more than PCT percent.
    #[arg(long, value_name = "PCT")]
    fail_if_grows: Option<f64>,
    /// Show only the N sites that changed most (text).
    #[arg(long, default_value_t = 20)]
    top: usize,
}

#[derive(Debug, Args)]
struct MarkArgs {
    /// Name of the phase that starts now.
    name: String,
    /// The traced process (needed when several traces run).
    #[arg(long, short)]
    pid: Option<u32>,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  sudo memprof trace --pid 4242\n  \
    sudo memprof trace -- python3 app.py --flag\n  \
    sudo memprof trace --pid 4242 --duration 30s --interval 5s --json | jq .")]
struct TraceArgs {
    /// Attach to this running process.
    #[arg(long, short)]
    pid: Option<u32>,
    /// Trace every process on the machine (except memprof), including those that start later;
    /// the report ranks them (`processes`).
    #[arg(long, conflicts_with = "pid")]
    all: bool,
    /// With --all: only processes named NAME (as `ps -o comm` shows it), including those that
    /// exec into that name later, and their children.
    #[arg(long, value_name = "NAME", requires = "all")]
    comm: Option<String>,
    /// With --all: only processes in this cgroup (v2; a path under the cgroup2 mount, usually
    /// /sys/fs/cgroup, or relative to it, e.g. system.slice/nginx.service).
    #[arg(long, value_name = "PATH", requires = "all", conflicts_with = "comm")]
    cgroup: Option<PathBuf>,
    /// Trace the processes the traced process forks, and theirs (default with a COMMAND).
    #[arg(long, overrides_with = "no_follow_children")]
    follow_children: bool,
    /// Trace only the process itself, not its children (the default with --pid).
    #[arg(long)]
    no_follow_children: bool,
    /// Order of `processes` in a multi-process report: outstanding (bytes) or growth.
    #[arg(long, default_value = "outstanding", value_parser = ["outstanding", "growth"])]
    rank: String,
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
    /// Write a gzipped pprof profile (alloc/inuse objects and space) to FILE.
    #[arg(long, value_name = "FILE")]
    pprof: Option<PathBuf>,
    /// Write folded stacks (in-use and allocated bytes) to FILE, for flamegraph tools.
    #[arg(long, value_name = "FILE")]
    folded: Option<PathBuf>,
    /// Write a flamegraph SVG of in-use bytes to FILE.
    #[arg(long, value_name = "FILE")]
    flamegraph: Option<PathBuf>,
    /// Write a DHAT JSON file (open it in valgrind's dh_view.html) to FILE.
    #[arg(long, value_name = "FILE")]
    dhat: Option<PathBuf>,
    /// Write the per-call-site table as CSV to FILE.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Write a self-contained HTML report to FILE.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Serve Prometheus metrics at ADDR (e.g. 127.0.0.1:9464) while tracing.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Serve a live dashboard at ADDR (e.g. 127.0.0.1:8080) while tracing.
    #[arg(long, value_name = "ADDR")]
    ui: Option<String>,
    /// Save the final report (one JSON object) to FILE, for `memprof diff`.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Memory limit to project growth against (e.g. 2G, 512M, 1.5GiB); the report gives the
    /// hours until RSS reaches it.
    #[arg(long, value_parser = parse_bytes)]
    limit: Option<u64>,
    /// Emit an alert when outstanding heap bytes exceed this (e.g. 100M).
    #[arg(long, value_parser = parse_bytes, value_name = "BYTES")]
    alert_threshold: Option<u64>,
    /// Emit an alert when the heap grows faster than this many MB per hour.
    #[arg(long, value_name = "MB_PER_HOUR")]
    growth_threshold: Option<f64>,
    /// Exit with status 3 when a call site's verdict is `leak`.
    #[arg(long)]
    fail_on_leak: bool,
    /// A phase active while a thread is inside FUNCTION (repeatable): NAME=FUNCTION.
    #[arg(long, value_name = "NAME=FUNCTION")]
    phase: Vec<String>,
    /// Group outstanding bytes by a rule on function or module names (repeatable):
    /// NAME=REGEX. Groups matching no rule fall into their module.
    #[arg(long, value_name = "NAME=REGEX")]
    category: Vec<String>,
    /// How often each call site's outstanding bytes are sampled for growth analysis.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    sample_every: Duration,
    /// Attach the probes with programs that return at once: measures the cost of the probes
    /// themselves (the report counts nothing). For benchmarks.
    #[arg(long)]
    probe_floor: bool,
    /// Probe every function at its first byte instead of after a decoded NULL check. For
    /// benchmarks.
    #[arg(long)]
    no_placement: bool,
    /// Measure memprof's kernel programs: turns on the kernel's BPF run-time statistics while
    /// tracing (they cost each program two clock reads) and reports each program's runs and
    /// mean time per run (`probe_stats`). For benchmarks.
    #[arg(long)]
    probe_stats: bool,
    /// Per-thread slots for allocator calls in flight in the kernel (a power of two); threads
    /// whose slot is taken use a slower hash. For tests of that path.
    #[arg(long, hide = true, default_value_t = memprof_common::DEFAULT_CALL_SLOTS, value_parser = parse_call_slots)]
    call_slots: u32,
    /// How stacks are unwound: `fp` walks frame pointers in the kernel (cheapest; deeper frames
    /// of code built without them are wrong); `dwarf` copies registers and --stack-bytes of
    /// stack per allocation and unwinds them from the objects' CFI (.eh_frame), so code without
    /// frame pointers gets whole stacks.
    #[arg(long, default_value = "fp", value_parser = ["fp", "dwarf"])]
    unwind: String,
    /// With --unwind dwarf: bytes of stack copied per allocation (512 to 16384); deeper frames
    /// than the copy holds end in an `unknown` frame.
    #[arg(long, default_value_t = memprof_common::DEFAULT_STACK_COPY, value_parser = parse_stack_bytes)]
    stack_bytes: u32,
    /// Sample allocations by bytes: on average one allocation per SIZE allocated bytes is
    /// recorded (e.g. 512K), and counts and bytes become unbiased estimates. Cheaper for
    /// allocation-heavy processes. Default: record every allocation.
    #[arg(long, value_parser = parse_sample_bytes, value_name = "SIZE")]
    sample_bytes: Option<u64>,
    /// Size of the kernel ring buffer in bytes (a power of two, multiple of the page size).
    /// [default: 16 MiB; 64 MiB with --unwind dwarf, whose records carry stack copies]
    #[arg(long, value_parser = parse_ring_bytes)]
    ring_bytes: Option<u32>,
    /// The command to spawn and trace from its first allocation.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn parse_call_slots(s: &str) -> Result<u32, String> {
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

fn split_spec(spec: &str, what: &str) -> Result<(String, String)> {
    categories::parse_rule_spec(spec).map_err(|e| anyhow::anyhow!("invalid {what} {spec:?}: {e}"))
}

fn parse_stack_bytes(s: &str) -> Result<u32, String> {
    let n = parse_bytes(s)?;
    if !(512..=u64::from(memprof_common::MAX_STACK_COPY)).contains(&n) {
        return Err(format!(
            "must be between 512 and {} bytes",
            memprof_common::MAX_STACK_COPY
        ));
    }
    Ok(n as u32)
}

fn parse_sample_bytes(s: &str) -> Result<u64, String> {
    let v = parse_bytes(s)?;
    if v == 0 || v > MAX_SAMPLE_MEAN {
        return Err(format!(
            "sampling interval {s:?} must be between 1 byte and {} GiB",
            MAX_SAMPLE_MEAN >> 30
        ));
    }
    Ok(v)
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
    /// The main allocator object.
    library: String,
    /// Functions probed in any object.
    probes: &'a [String],
    missing: &'a [String],
    aliases: Vec<[&'a str; 2]>,
    /// The main allocator's entry probes placed past a function's first instruction.
    placed: std::collections::BTreeMap<&'a str, u64>,
    /// Every allocator object probed, the main one first.
    allocators: Vec<StartAllocator<'a>>,
}

/// One allocator object of the start record.
#[derive(Serialize)]
struct StartAllocator<'a> {
    path: &'a str,
    kind: &'static str,
    /// The allocator is linked into the executable.
    #[serde(rename = "static")]
    in_executable: bool,
    probes: &'a [String],
    aliases: Vec<[&'a str; 2]>,
    /// Free-like functions not probed because they hand the block to a probed one.
    forwards: Vec<[&'a str; 2]>,
    placed: std::collections::BTreeMap<&'a str, u64>,
}

fn pairs(v: &[(String, String)]) -> Vec<[&str; 2]> {
    v.iter().map(|(a, b)| [a.as_str(), b.as_str()]).collect()
}

fn offsets(v: &[(String, u64)]) -> std::collections::BTreeMap<&str, u64> {
    v.iter().map(|(f, off)| (f.as_str(), *off)).collect()
}

/// Runs the command line; returns the process exit code.
pub fn run() -> Result<i32> {
    let cli = Cli::parse();
    match cli.command {
        Command::Trace(args) => trace(*args),
        Command::Diff(args) => diff_reports(&args),
        Command::Mark(args) => {
            marks::send(Path::new(marks::SOCKET_DIR), args.pid, &args.name)?;
            Ok(0)
        }
    }
}

fn diff_reports(args: &DiffArgs) -> Result<i32> {
    let before = diff::load_report(&args.before)?;
    let after = diff::load_report(&args.after)?;
    let d = diff::diff(&before, &after)?;
    if args.json {
        write_json_line(&d)?;
    } else {
        let mut out = std::io::stdout().lock();
        write!(out, "{}", diff::render_text(&d, args.top))?;
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

fn trace(args: TraceArgs) -> Result<i32> {
    let modes = usize::from(args.pid.is_some())
        + usize::from(args.all)
        + usize::from(!args.command.is_empty());
    if modes != 1 {
        bail!("give one of --pid PID, --all, or -- COMMAND [ARGS...]");
    }
    // Check every option before touching the target.
    let phases = args
        .phase
        .iter()
        .map(|spec| split_spec(spec, "--phase"))
        .collect::<Result<Vec<_>>>()?;
    let rules = args
        .category
        .iter()
        .map(|spec| {
            let (name, pattern) = split_spec(spec, "--category")?;
            let re = regex_lite::Regex::new(&pattern)
                .with_context(|| format!("invalid --category regex {pattern:?}"))?;
            Ok(Rule {
                name,
                matcher: Box::new(move |s: &str| re.is_match(s)),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    target::check_capabilities(target::effective_capabilities()?, euid)?;
    target::check_kernel(std::path::Path::new("/sys"))?;

    if args.all {
        return trace_all(&args, &phases, rules);
    }
    let (pid, allocators, objects, spawned) = match args.pid {
        Some(pid) => {
            if pid == std::process::id() {
                bail!("memprof cannot trace itself");
            }
            let allocators = allocators::of_pid(pid)?;
            // Phase functions: the executable first, then every mapped file.
            let mut objects = vec![PathBuf::from(format!("/proc/{pid}/exe"))];
            if let Ok(space) = AddressSpace::read(pid) {
                for m in space.mappings() {
                    let p = PathBuf::from(format!("/proc/{pid}/root{}", m.path));
                    if !objects.contains(&p) {
                        objects.push(p);
                    }
                }
            }
            (pid, allocators, objects, None)
        }
        None => {
            let path = target::resolve_command(&args.command[0])?;
            let allocators = allocators::for_command(&path)?;
            // Fork before any thread exists (the runtime is built afterwards).
            let child = target::spawn_stopped(&path, &args.command, args.json)?;
            (child.pid, allocators, vec![path], Some(child))
        }
    };
    let follow = if spawned.is_some() {
        !args.no_follow_children
    } else {
        args.follow_children
    };
    let targets = if follow {
        Targets::Set {
            pids: vec![pid],
            follow: true,
            comm: None,
        }
    } else {
        Targets::One(pid)
    };
    let result = trace_pid(
        &args,
        Target {
            pid,
            targets,
            allocators: &allocators,
            phases: &phases,
            objects: &objects,
        },
        rules,
        spawned.as_ref(),
    );
    if result.is_err()
        && let Some(child) = &spawned
    {
        child.abort();
    }
    result
}

/// `memprof trace --all`: every process (or those of `--comm`/`--cgroup`), probing each
/// allocator object the running processes use once.
fn trace_all(args: &TraceArgs, phases: &[(String, String)], rules: Vec<Rule>) -> Result<i32> {
    let cgroup = args.cgroup.as_deref().map(cgroup_id).transpose()?;
    let own = std::process::id();
    let mut pids = Vec::new();
    let mut allocators: Vec<Allocator> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for pid in target::all_pids() {
        if pid == own || target::is_kernel_thread(pid) {
            continue;
        }
        if let Some(name) = &args.comm
            && target::comm(pid).as_deref()
                != Some(name.chars().take(15).collect::<String>().as_str())
        {
            continue;
        }
        if let Some((_, path)) = &cgroup
            && target::cgroup_of(pid).as_deref() != Some(path.as_str())
        {
            continue;
        }
        pids.push(pid);
        // A process whose allocator cannot be told (it exited, it has none) is skipped.
        let Ok(found) = allocators::of_pid(pid) else {
            continue;
        };
        for a in found {
            let a = allocators::stable_path(pid, a);
            if let Some(id) = target::file_id(&a.path)
                && seen.insert(id)
            {
                allocators.push(a);
            }
        }
    }
    // Put a C library first: the report's `library` names the main one.
    if let Some(i) = allocators
        .iter()
        .position(|a| matches!(a.kind, allocators::Kind::Glibc))
    {
        allocators.swap(0, i);
    }
    if allocators.is_empty() {
        bail!("no running process with a known allocator to probe");
    }
    let targets = match &args.comm {
        Some(name) => Targets::Set {
            pids,
            follow: true,
            comm: Some(name.clone()),
        },
        None => Targets::All {
            cgroup: cgroup.map(|(id, _)| id),
        },
    };
    trace_pid(
        args,
        Target {
            pid: 0,
            targets,
            allocators: &allocators,
            phases,
            objects: &[],
        },
        rules,
        None,
    )
}

/// The v2 id of cgroup `path` (its directory's inode) and its path as /proc/PID/cgroup shows it.
fn cgroup_id(path: &Path) -> Result<(u64, String)> {
    use std::os::unix::fs::MetadataExt as _;
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let root = target::cgroup2_root(&mounts)
        .ok_or_else(|| anyhow::anyhow!("--cgroup needs cgroup v2, which is not mounted"))?;
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    let meta =
        fs::metadata(&full).with_context(|| format!("no such cgroup: {}", full.display()))?;
    let rel = full.strip_prefix(&root).map_err(|_| {
        anyhow::anyhow!(
            "--cgroup {} is not under the cgroup v2 mount {}",
            full.display(),
            root.display()
        )
    })?;
    Ok((meta.ino(), format!("/{}", rel.display())))
}

/// What `trace_pid` attaches to.
struct Target<'a> {
    /// The process the trace is about (0 with --all).
    pid: u32,
    targets: Targets,
    /// The main allocator first.
    allocators: &'a [Allocator],
    phases: &'a [(String, String)],
    objects: &'a [PathBuf],
}

fn trace_pid(
    args: &TraceArgs,
    target: Target<'_>,
    rules: Vec<Rule>,
    spawned: Option<&target::Spawned>,
) -> Result<i32> {
    let Target {
        pid,
        targets,
        allocators,
        phases,
        objects,
    } = target;
    let pidfd = if pid == 0 {
        None
    } else {
        Some(PidFd::open(pid)?)
    };
    let per_process = !matches!(targets, Targets::One(_));
    let what = if pid == 0 {
        "all processes".to_string()
    } else {
        format!("pid {pid}")
    };
    let tracer = Tracer::attach(&Options {
        targets,
        allocators,
        ring_bytes: args.ring_bytes.unwrap_or(if args.unwind == "dwarf" {
            DWARF_RING_BYTES
        } else {
            DEFAULT_RING_BYTES
        }),
        phases,
        phase_objects: objects,
        floor: args.probe_floor,
        no_placement: args.no_placement,
        call_slots: args.call_slots,
        probe_stats: args.probe_stats,
        stack_copy: (args.unwind == "dwarf").then_some(args.stack_bytes),
        sample_bytes: args.sample_bytes.unwrap_or(0),
    })
    .with_context(|| format!("failed to trace {what}"))?;

    let attach = &tracer.attach;
    let library = allocators.first().map_or("", |a| a.shown.as_str());
    let others = match allocators.len() {
        1 => String::new(),
        2 => " and 1 other allocator".to_string(),
        n => format!(" and {} other allocators", n - 1),
    };
    // Announced once the session exists (and with it the mark socket).
    let ready = format!(
        "memprof: tracing {what} ({} probes on {library}{others}; Ctrl-C to stop)",
        attach.objects.iter().map(|o| o.probes.len()).sum::<usize>(),
    );
    let start = Start {
        record: "start",
        pid,
        command: spawned.map(|_| args.command.as_slice()),
        library: library.to_string(),
        probes: &attach.probes,
        missing: &attach.missing,
        aliases: pairs(&attach.aliases),
        placed: offsets(&attach.placed),
        allocators: attach
            .objects
            .iter()
            .map(|o| StartAllocator {
                path: &o.path,
                kind: o.kind,
                in_executable: o.executable,
                probes: &o.probes,
                aliases: pairs(&o.aliases),
                forwards: pairs(&o.forwards),
                placed: offsets(&o.placed),
            })
            .collect(),
    };
    let start = serde_json::to_string(&start)?;

    let live = (args.metrics.is_some() || args.ui.is_some()).then(Live::default);
    if let (Some(addr), Some(live)) = (&args.metrics, &live) {
        output::serve_metrics(addr, live.clone(), args.limit)?;
    }
    if let (Some(addr), Some(live)) = (&args.ui, &live) {
        output::serve_ui(addr, live.clone())?;
    }
    let files = OutputFiles {
        pprof: args.pprof.clone(),
        folded: args.folded.clone(),
        flamegraph: args.flamegraph.clone(),
        dhat: args.dhat.clone(),
        csv: args.csv.clone(),
        html: args.html.clone(),
    };

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
        sample_every: args.sample_every,
        limit: args.limit,
        alert_bytes: args.alert_threshold,
        alert_growth_mb_per_hour: args.growth_threshold,
        phases: phases.iter().map(|(name, _)| name.clone()).collect(),
        mark_dir: Some(PathBuf::from(marks::SOCKET_DIR)),
        command: match spawned {
            Some(_) => args.command.clone(),
            None => target::command_line(pid),
        },
        live: live.clone(),
        status_line: !args.json && std::io::stderr().is_terminal(),
        per_process,
        rank_by_growth: args.rank == "growth",
        dwarf: args.unwind == "dwarf",
    };
    let mut session = Session::new(pid, tracer, settings, rules, spawned.is_some(), pidfd);
    // Mapping records make frames of short-lived processes nameable; without perf events the
    // trace still works from /proc.
    match MmapWatcher::system() {
        Ok(watch) => session.watch_mappings(watch),
        Err(e) => eprintln!(
            "memprof: warning: {e:#}; frames of processes that exit quickly may go unnamed"
        ),
    }
    session.prepare();
    eprintln!("{ready}");
    if args.json {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{start}")?;
        out.flush()?;
    }
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
    if let Some(path) = &args.output {
        save_report(path, &report)?;
    }
    session.publish_live(true);
    let profile = files.any().then(|| session.profile(&report));
    session.emit(&report)?;
    // After the report, so a file that cannot be written does not cost the user the report.
    if let Some(profile) = &profile {
        output::write_files(profile, &files)?;
    }
    detach_in_background(session);
    if args.fail_on_leak && report.leak_detected {
        eprintln!("memprof: leak detected (--fail-on-leak)");
        return Ok(GATE_FAILED);
    }
    Ok(if spawned.is_some() {
        code.unwrap_or(0)
    } else {
        0
    })
}

fn save_report(path: &Path, report: &report::Report) -> Result<()> {
    let mut bytes = serde_json::to_vec(report)?;
    bytes.push(b'\n');
    fs::write(path, bytes).with_context(|| format!("failed to write {}", path.display()))
}

/// Lets memprof exit without waiting for the kernel to remove its uprobes.
///
/// Removing a uprobe waits for RCU grace periods and the kernel serializes removals (about
/// 0.1 s each here: 2.5 s for one libc's probes). A forked child keeps the probes' file
/// descriptors, closes its copies of stdin, stdout and stderr (a reader of memprof's output sees
/// the end at once), waits for memprof to exit (end of file on a pipe only memprof writes) and
/// exits in turn: the last holder of the descriptors is the one that waits for the kernel, and
/// nobody waits for it. The probes only ever fire for the traced process.
///
/// The session is forgotten, not dropped: dropping detaches each link explicitly (a disable
/// ioctl that waits like a removal), while closing a descriptor the child still holds is free.
fn detach_in_background(mut session: Session) {
    // The mark socket's file goes now: a forgotten session never drops it. The statistics
    // descriptor too, or the child would keep them on.
    session.close_marks();
    session.stop_probe_stats();
    let mut pipe = [0; 2];
    // SAFETY: plain syscalls; the child makes only async-signal-safe calls.
    unsafe {
        if libc::pipe(pipe.as_mut_ptr()) != 0 {
            // No background detach: dropping the session detaches in the foreground.
            return;
        }
        match libc::fork() {
            0 => {
                libc::close(pipe[1]);
                libc::close(0);
                libc::close(1);
                libc::close(2);
                // Sockets (`--metrics`, `--ui`, marks) must not outlive memprof: a port would
                // stay bound. fstat is async-signal-safe; the probes' descriptors are not
                // sockets.
                for fd in 3..4096 {
                    let mut st: libc::stat = std::mem::zeroed();
                    if fd != pipe[0]
                        && libc::fstat(fd, &mut st) == 0
                        && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
                    {
                        libc::close(fd);
                    }
                }
                let mut byte = 0u8;
                while libc::read(pipe[0], (&raw mut byte).cast(), 1) < 0 {}
                libc::_exit(0);
            }
            -1 => {
                libc::close(pipe[0]);
                libc::close(pipe[1]);
                return;
            }
            _ => {
                // The write end stays open until memprof exits.
                libc::close(pipe[0]);
            }
        }
    }
    std::mem::forget(session);
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
    }
}
