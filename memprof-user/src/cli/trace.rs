//! `memprof trace`: checks the options, finds the processes and their allocators, attaches,
//! runs the session and writes the outputs.

use std::{
    fs,
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use memprof_common::DEFAULT_RING_BYTES;

use super::{
    GATE_FAILED,
    args::{TraceArgs, split_spec},
    phases::{exit_code, is_python_program, phase_specs},
    start::{Start, StartAllocator, StartPlacement, offsets, pairs},
};
use crate::{
    analysis::{categories::Rule, pyphases::PyPattern},
    ingest::{marks, mmaps::MmapWatcher},
    output::{self, OutputFiles, json},
    probe::{
        LinkKind, Options, PhaseNotFound, Targets, Tracer,
        allocators::{self, Allocator},
        kernel_log, loader,
    },
    report,
    serve::{
        self, Live,
        http::{Guard, read_token},
    },
    session::{End, Session, Settings},
    stacks::python,
    sys::{
        elf,
        maps::AddressSpace,
        printable::escape,
        process, shims,
        target::{self, PidFd},
    },
};

/// How long a command that outlived the trace has to exit after SIGTERM, before SIGKILL.
const COMMAND_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Default ring size with `--unwind dwarf` (room for about 8000 records with 8 KiB copies) and
/// with `--all`: a process that starts allocates before memprof has its code in the kernel's
/// tables, and those first allocations go out with stack copies (300 short-lived processes
/// in a row: 2858 of 588 294 allocations without a stack with a 16 MiB ring, 0 with 64 MiB).
const COPIES_RING_BYTES: u32 = 64 << 20;

/// How long the end of a trace takes the records left in the ring at most: the rest are let
/// go, counted (see `Session::end`).
const END_DRAIN: std::time::Duration = std::time::Duration::from_millis(750);

pub fn trace(args: TraceArgs) -> Result<i32> {
    let modes = usize::from(args.pid.is_some())
        + usize::from(args.all)
        + usize::from(!args.command.is_empty());
    if modes != 1 {
        bail!("give one of --pid PID, --all, or -- COMMAND [ARGS...]");
    }
    // Check every option before touching the target.
    let (phases, py_phases) = phase_specs(&args.phase)?;
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
    if args.keep_running && args.command.is_empty() {
        bail!("--keep-running applies to a COMMAND memprof starts (-- COMMAND ARGS...)");
    }
    let guard = Guard {
        token: args.http_token.as_deref().map(read_token).transpose()?,
    };
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    target::check_capabilities(target::effective_capabilities()?, euid)?;
    target::check_kernel(std::path::Path::new("/sys"))?;

    if args.all {
        return trace_all(&args, &phases, &py_phases, rules, guard);
    }
    let (pid, allocators, objects, spawned) = match args.pid {
        Some(pid) => {
            if pid == std::process::id() {
                bail!("memprof cannot trace itself");
            }
            process::check_traceable(pid)?;
            if let Some((name, pattern)) = py_phases.first()
                && !args.follow_children
                && let Err(e) = python::detect(pid)
            {
                let exe = fs::read_link(format!("/proc/{pid}/exe"))
                    .map_or_else(|_| "?".to_string(), |p| p.display().to_string());
                bail!("--phase {name}=py:{}: {e} ({exe})", pattern.name);
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
            // Phase functions: in the program the command ends up running (through shims
            // and wrappers), then in its libraries.
            let objects = if phases.is_empty() {
                Vec::new()
            } else {
                let real = shims::real_program(&path);
                let mut objects = vec![real.clone()];
                if let Ok(libraries) = loader::objects_of_command(&real) {
                    objects.extend(libraries.into_iter().map(|c| c.path));
                }
                objects.dedup();
                objects
            };
            // Fork before any thread exists (the runtime is built afterwards).
            let child = target::spawn_stopped(&path, &args.command, args.json)?;
            (child.pid, allocators, objects, Some(child))
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
            py_phases: &py_phases,
            objects: &objects,
            guard,
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
fn trace_all(
    args: &TraceArgs,
    phases: &[(String, String)],
    py_phases: &[(String, PyPattern)],
    rules: Vec<Rule>,
    guard: Guard,
) -> Result<i32> {
    let cgroup = args.cgroup.as_deref().map(cgroup_id).transpose()?;
    let own = std::process::id();
    let mut pids = Vec::new();
    let mut allocators: Vec<Allocator> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for pid in process::all_pids() {
        if pid == own || process::is_kernel_thread(pid) {
            continue;
        }
        if let Some(name) = &args.comm
            && process::comm(pid).as_deref()
                != Some(name.chars().take(15).collect::<String>().as_str())
        {
            continue;
        }
        if let Some((_, path)) = &cgroup
            && process::cgroup_of(pid).as_deref() != Some(path.as_str())
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
            if let Some(id) = elf::file_id(&a.path)
                && seen.insert(id)
            {
                allocators.push(a);
            }
        }
    }
    // No process matches yet (an agent started before its workload): the system's C library,
    // memprof's own, is probed for the processes that start later; other allocators are found
    // as they come.
    if allocators.is_empty()
        && (args.comm.is_some() || cgroup.is_some())
        && let Ok(found) = allocators::of_pid(own)
    {
        allocators.extend(
            found
                .into_iter()
                .filter(|a| matches!(a.kind, allocators::Kind::Glibc | allocators::Kind::Musl)),
        );
        if let Some(a) = allocators.first() {
            eprintln!(
                "memprof: no running process matches yet; probing {} for those that start",
                escape(&a.path.to_string_lossy())
            );
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
            py_phases,
            objects: &[],
            guard,
        },
        rules,
        None,
    )
}

/// The v2 id of cgroup `path` (its directory's inode) and its path as /proc/PID/cgroup shows it.
fn cgroup_id(path: &Path) -> Result<(u64, String)> {
    use std::os::unix::fs::MetadataExt as _;
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let root = process::cgroup2_root(&mounts)
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
    py_phases: &'a [(String, PyPattern)],
    objects: &'a [PathBuf],
    /// How `--metrics` and `--ui` are guarded.
    guard: Guard,
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
        py_phases,
        objects,
        guard,
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
    let attach_start = std::time::Instant::now();
    let attached = Tracer::attach(&Options {
        targets,
        allocators,
        ring_bytes: args
            .ring_bytes
            .unwrap_or(if args.unwind == "dwarf" || args.all {
                COPIES_RING_BYTES
            } else {
                DEFAULT_RING_BYTES
            }),
        phases,
        phase_objects: objects,
        python_frees: !py_phases.is_empty(),
        floor: args.probe_floor,
        no_placement: args.no_placement,
        call_slots: args.call_slots,
        no_walk_reuse: args.no_walk_reuse,
        kernel_log: kernel_log::level(&args.kernel_log).unwrap_or(0),
        kernel: args.kernel,
        links: args.links.as_deref().map(|l| match l {
            "session" => LinkKind::Session,
            "classic" => LinkKind::Classic,
            _ => LinkKind::Multi,
        }),
        probe_stats: args.probe_stats,
        stack_copy: (args.unwind == "dwarf").then_some(args.stack_bytes),
        fallback_copy: args.stack_bytes,
        pause_for_code: args.unwind == "tables" && spawned.is_some(),
        tables: args.unwind == "tables",
        sample_bytes: args.sample_bytes.unwrap_or(0),
    });
    let tracer = match attached {
        Ok(tracer) => tracer,
        Err(e) => match e.downcast_ref::<PhaseNotFound>() {
            // The function may be Python code run by the interpreter traced.
            Some(missing) if is_python_program(&missing.object) => bail!(
                "failed to trace {what}: {missing}: {} is a Python interpreter; for a Python \
                 function write --phase {}=py:{}",
                missing.object,
                missing.name,
                missing.function
            ),
            _ => return Err(e.context(format!("failed to trace {what}"))),
        },
    };
    if args.probe_stats {
        eprintln!(
            "memprof: attached {} probe links ({}) in {:.1} ms",
            tracer.link_count(),
            tracer.link_kind().name(),
            attach_start.elapsed().as_secs_f64() * 1e3
        );
    }

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
                placements: o
                    .placements
                    .iter()
                    .map(|(function, offset, why)| StartPlacement {
                        function,
                        offset: *offset,
                        why,
                    })
                    .collect(),
            })
            .collect(),
        links: tracer.link_kind().name(),
    };
    let start = serde_json::to_string(&start)?;

    // The session runs on this thread (block_on); the endpoints and the mark socket on the
    // runtime's one worker thread, so neither waits for the other.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(2)
        .thread_name("memprof-rt")
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let live = (args.metrics.is_some() || args.ui.is_some()).then(Live::default);
    if let (Some(addr), Some(live)) = (&args.metrics, &live) {
        serve::serve_metrics(
            runtime.handle(),
            addr,
            live.clone(),
            args.limit,
            guard.clone(),
        )?;
    }
    if let (Some(addr), Some(live)) = (&args.ui, &live) {
        serve::serve_ui(runtime.handle(), addr, live.clone(), guard)?;
    }
    let files = OutputFiles {
        pprof: args.pprof.clone(),
        folded: args.folded.clone(),
        flamegraph: args.flamegraph.clone(),
        dhat: args.dhat.clone(),
        csv: args.csv.clone(),
        html: args.html.clone(),
    };

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
        py_phases: py_phases.to_vec(),
        mark_dir: Some(PathBuf::from(marks::SOCKET_DIR)),
        command: match spawned {
            Some(_) => args.command.clone(),
            None => process::command_line(pid),
        },
        live: live.clone(),
        status_line: !args.json && std::io::stderr().is_terminal(),
        per_process,
        rank_by_growth: args.rank == "growth",
        dwarf: args.unwind == "dwarf",
        debug_dirs: args.debug_dir.clone(),
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

    // The probes go, so a process that lives on runs untraced while the report is made; what
    // they sent before is taken meanwhile.
    let (links, took) = session.end(END_DRAIN);
    if args.probe_stats {
        eprintln!(
            "memprof: detached {links} probe links in {:.1} ms",
            took.as_secs_f64() * 1e3
        );
    }
    let (exited, code) = match end {
        End::Exited { status } => (true, status.map(exit_code)),
        End::Duration | End::Signal => (false, None),
    };
    let report = report::finish(session.snapshot(), exited, code);
    if args.probe_stats
        && let Some(cost) = session.residency_cost()
    {
        eprintln!("{cost}");
    }
    if report.totals.unread_at_end > 0 {
        eprintln!(
            "memprof: warning: {} records were still in the ring after {} ms at the end of the \
             trace; they were dropped and are counted in lost events",
            report.totals.unread_at_end,
            END_DRAIN.as_millis()
        );
    }
    for warning in session.python_phase_warnings() {
        eprintln!("memprof: warning: {warning}");
    }
    if let Some(path) = &args.output {
        json::save_report(path, &report, args.file_mode)?;
    }
    session.publish_live(true);
    let profile = files.any().then(|| session.profile(&report));
    session.emit(&report)?;
    // After the report, so a file that cannot be written does not cost the user the report.
    let written = match &profile {
        Some(profile) => output::write_files(profile, &files, args.file_mode),
        None => Ok(()),
    };
    drop(session);
    // A command memprof started and that outlived the trace ends with it, unless asked not to.
    if let Some(child) = spawned
        && !exited
    {
        if args.keep_running {
            eprintln!(
                "memprof: the command (pid {}) goes on running untraced (--keep-running)",
                child.pid
            );
        } else {
            child.terminate(COMMAND_GRACE);
        }
    }
    written?;
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
