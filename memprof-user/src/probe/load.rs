//! Loading the kernel programs and attaching them, as `plan` says, to the allocator objects of
//! the traced processes, plus the tracepoints and `--phase` functions. Return probes go in
//! before entry probes: an entry seen without its return would leave the thread marked as
//! inside an allocator.

use std::{
    collections::HashSet,
    fs,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    maps::{Array, HashMap as AyaHashMap, MapData, PerCpuArray, RingBuf},
    programs::trace_point::TracePointLinkId,
};
use aya_log::EbpfLogger;
use memprof_common::{
    DEFAULT_IDX_BLOCKS, DEFAULT_ROW_BLOCKS, KmemFields, MAX_MODULES, MAX_SAMPLE_MEAN, PyStack,
    PyWalk, SEEN_STACKS, StackTrace, TextRanges, mode, unwind,
};

use super::{
    allocators::Allocator,
    kernel,
    kernel_log::KernelLog,
    links::{Family, LinkKind, Links, ProbeSet},
    plan::{AttachReport, Chosen, PLAN, plan_object, resolve_symbols},
    tables::KernelTables,
    tracepoints::{Tracepoints, attach_tracepoints},
};
use crate::sys::{elf::file_id, objfile::ObjectFile};

/// The kernel object built by build.rs (empty when the build skipped it).
static EBPF_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memprof"));

/// The loaded programs and the maps the agent reads.
pub struct Tracer {
    /// Owns the programs and the tracepoint links.
    pub(super) ebpf: Ebpf,
    /// The uprobe links, by process; dropping them detaches the probes.
    pub(super) links: Links,
    /// Every probe set attached so far: a process that joins the trace gets them all.
    pub(super) sets: Vec<ProbeSet>,
    /// Links are scoped to each traced process (`--pid`, a command and its children), not
    /// system-wide (`--all`).
    pub(super) per_process: bool,
    pub events: RingBuf<MapData>,
    pub(super) stacks: AyaHashMap<MapData, u64, StackTrace>,
    /// Each CPU's cache of keys known to be in `stacks`.
    pub(super) stacks_seen: PerCpuArray<MapData, [u64; SEEN_STACKS]>,
    pub(super) counters: PerCpuArray<MapData, u64>,
    pub(super) py_procs: AyaHashMap<MapData, u32, PyWalk>,
    pub(super) py_active: Array<MapData, u32>,
    pub(super) py_threads: AyaHashMap<MapData, u32, u64>,
    pub(super) py_stacks: AyaHashMap<MapData, u64, PyStack>,
    pub(super) alloc_text: AyaHashMap<MapData, u32, TextRanges>,
    /// The unwind tables in the kernel, with `--unwind tables`.
    pub tables: Option<KernelTables>,
    pub attach: AttachReport,
    /// Mean sampling interval in bytes the programs were loaded with (0: not sampled).
    pub sample_bytes: u64,
    pub(super) placement: bool,
    /// (device, inode) of every object probed.
    pub(super) probed: HashSet<(u64, u64)>,
    /// The links of `fork_child`, which pauses new children until their probes are in.
    pub(super) fork_child: Vec<TracePointLinkId>,
    /// The other tracepoint links (library loads, the process life cycle), by program.
    pub(super) tracepoints: Tracepoints,
    /// The kernel programs' log records, with `--kernel-log`.
    pub(super) logs: Option<EbpfLogger<KernelLog>>,
    /// Keeps the kernel's run-time statistics of BPF programs on (`--probe-stats`).
    pub(super) stats: Option<OwnedFd>,
}

/// Which processes the programs report on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    /// One process; its probes are installed in it alone, so the rest of the machine runs at
    /// untraced speed.
    One(u32),
    /// These processes, plus their forks with `follow`, plus processes that exec into the name
    /// `comm`. Without `comm`, each process gets probes of its own as it joins (the session
    /// calls [`Tracer::follow`]); with `comm`, probes go in every process mapping a probed
    /// object and the programs filter.
    Set {
        pids: Vec<u32>,
        follow: bool,
        comm: Option<String>,
    },
    /// Every process but memprof, or those of one cgroup (v2 id).
    All { cgroup: Option<u64> },
}

impl Targets {
    /// The processes whose probes are their own from the start; None when probes are
    /// system-wide.
    fn own_probes(&self) -> Option<Vec<u32>> {
        match self {
            Self::One(pid) => Some(vec![*pid]),
            Self::Set {
                pids, comm: None, ..
            } => Some(pids.clone()),
            _ => None,
        }
    }
}

pub struct Options<'a> {
    pub targets: Targets,
    /// The allocator objects to probe, the main one first (see `allocators`).
    pub allocators: &'a [Allocator],
    pub ring_bytes: u32,
    /// `--phase NAME=FUNCTION` pairs, in order (the index is the phase id).
    pub phases: &'a [(String, String)],
    /// Files to look for phase functions in, in order of preference.
    pub phase_objects: &'a [PathBuf],
    /// Frees record the freeing thread's Python frames (phases named by Python function).
    pub python_frees: bool,
    /// Attach programs that return at once (measures the probes' own cost).
    pub floor: bool,
    /// Probe every function at its first byte (no `placement`).
    pub no_placement: bool,
    /// Per-thread call slots in the kernel (a power of two; threads beyond share a hash).
    pub call_slots: u32,
    /// Walk every stack afresh (no reuse of the kernel's kept walks).
    pub no_walk_reuse: bool,
    /// Turn on the kernel's run-time statistics of the programs (`Tracer::probe_stats`).
    pub probe_stats: bool,
    /// Byte sampling: mean interval in bytes between sampled allocations (0: record all).
    pub sample_bytes: u64,
    /// Copy registers and this many bytes of stack per allocation for the agent to unwind from
    /// CFI (`--unwind dwarf`); None: the kernel walks the stack.
    pub stack_copy: Option<u32>,
    /// The kernel walks stacks with unwind tables (`--unwind tables`), else frame pointers.
    pub tables: bool,
    /// With tables: bytes of stack copied for the agent to unwind when a walk meets code mapped
    /// after the process's mappings were last written.
    pub fallback_copy: u32,
    /// With tables: processes memprof started (and their children) stop when they exec or map
    /// code until their tables and mappings are in the kernel (`PAUSE_FOR_CODE`).
    pub pause_for_code: bool,
    /// How probes are attached (None: the best the kernel has).
    pub links: Option<LinkKind>,
    /// The kernel programs' log level (`kernel_log::LEVELS`; 0: off).
    pub kernel_log: u8,
    /// `--kernel`: the kernel's allocations on the traced processes' behalf (`kernel`).
    pub kernel: bool,
}

/// The kernel's `COMM` value for a process name: its first 15 bytes, NUL-padded.
fn comm_bytes(name: &str) -> [u8; 16] {
    let mut comm = [0u8; 16];
    for (slot, b) in comm.iter_mut().zip(name.bytes().take(15)) {
        *slot = b;
    }
    comm
}

impl Tracer {
    /// Loads the programs for `opts.targets` and attaches them.
    pub fn attach(opts: &Options<'_>) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!("this memprof was built without its eBPF programs (AYA_BUILD_SKIP); rebuild it");
        }
        // Records wake the agent once a CPU wrote its share of a sixteenth of the ring; below
        // that it drains on its own timer (see `session::DRAIN_EVERY`).
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as u64;
        let wakeup_bytes = (u64::from(opts.ring_bytes / 16) / cpus).max(256);
        let (mode, target, follow, comm, cgroup) = match &opts.targets {
            Targets::One(pid) => (mode::ONE, *pid, false, None, 0),
            Targets::Set { follow, comm, .. } => (mode::SET, 0, *follow, comm.clone(), 0),
            Targets::All { cgroup } => (
                mode::ALL,
                std::process::id(),
                false,
                None,
                cgroup.unwrap_or(0),
            ),
        };
        let comm = comm_bytes(comm.as_deref().unwrap_or(""));
        let sample_bytes = opts.sample_bytes.min(MAX_SAMPLE_MEAN);
        let kmem = if opts.kernel {
            kernel::fields()?
        } else {
            KmemFields::default()
        };
        let mut ebpf = EbpfLoader::new()
            .override_global("KMEM", &kmem, true)
            .override_global("MODE", &mode, true)
            .override_global("TARGET_TGID", &target, true)
            .override_global("FOLLOW", &u32::from(follow), true)
            .override_global(
                "PAUSE_CHILDREN",
                &u32::from(follow && opts.targets.own_probes().is_some()),
                true,
            )
            .override_global("PAUSE_FOR_CODE", &u32::from(opts.pause_for_code), true)
            .override_global("COMM", &comm, true)
            .override_global("CGROUP_ID", &cgroup, true)
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
            .override_global("FLOOR", &u32::from(opts.floor), true)
            .override_global("NO_WALK_REUSE", &u32::from(opts.no_walk_reuse), true)
            .override_global(
                "UNWIND",
                &if opts.stack_copy.is_some() {
                    unwind::DWARF
                } else if opts.tables {
                    unwind::TABLES
                } else {
                    unwind::FRAME_POINTERS
                },
                true,
            )
            // Phase functions' return probes replace return addresses on the stack: the
            // kernel's walker puts them back.
            .override_global("KERNEL_STACKS", &u32::from(!opts.phases.is_empty()), true)
            .override_global(
                "STACK_COPY",
                &opts
                    .stack_copy
                    .unwrap_or(if opts.tables { opts.fallback_copy } else { 0 }),
                true,
            )
            .override_global("SAMPLE_BYTES", &sample_bytes, true)
            .override_global("PY_FREES", &u32::from(opts.python_frees), true)
            .override_global("CALL_SLOT_MASK", &(opts.call_slots - 1), true)
            .override_global(aya_log::LEVEL, &opts.kernel_log, true)
            .map_max_entries("EVENTS", opts.ring_bytes)
            .map_max_entries("CALLS", opts.call_slots)
            .map_max_entries("THREAD_HINTS", opts.call_slots)
            // The tables take room only when they are used.
            .map_max_entries(
                "UNWIND_ROWS",
                if opts.tables { DEFAULT_ROW_BLOCKS } else { 1 },
            )
            .map_max_entries(
                "UNWIND_IDX",
                if opts.tables { DEFAULT_IDX_BLOCKS } else { 1 },
            )
            .map_max_entries("MODULES", if opts.tables { MAX_MODULES } else { 1 })
            .load(EBPF_OBJECT)
            .context("failed to load the eBPF programs")?;
        if let Targets::Set { pids, .. } = &opts.targets {
            let mut tgids: AyaHashMap<_, u32, u32> = AyaHashMap::try_from(
                ebpf.map_mut("TGIDS")
                    .ok_or_else(|| anyhow!("the eBPF object has no map TGIDS"))?,
            )?;
            for pid in pids {
                tgids
                    .insert(pid, &1, 0)
                    .context("failed to add a process to trace")?;
            }
        }
        // Before the logger takes its map: the session program's relocation needs it.
        let mut links = Links::new(&mut ebpf, EBPF_OBJECT, opts.links)?;
        let logs = if opts.kernel_log > 0 {
            Some(
                EbpfLogger::init_with_logger(&mut ebpf, KernelLog)
                    .context("failed to read the kernel programs' logs")?,
            )
        } else {
            None
        };
        let placement = !opts.no_placement;
        let (attach, mut sets) = plan_objects(opts.allocators, placement, true)?;
        let phase_sets = plan_phases(opts)?;
        if !phase_sets.is_empty() {
            links.load(&mut ebpf, Family::Phase)?;
        }
        sets.extend(phase_sets);
        let own = opts.targets.own_probes();
        for pid in own.clone().unwrap_or(vec![0]) {
            for set in &sets {
                links.attach(&mut ebpf, set, pid)?;
            }
        }
        let (fork_child, mut tracepoints) = attach_tracepoints(&mut ebpf)?;
        if opts.kernel {
            kernel::attach(&mut ebpf, &mut tracepoints)?;
        }
        let mut probed = HashSet::new();
        for a in opts.allocators {
            if let Some(id) = file_id(&a.path) {
                probed.insert(id);
            }
        }
        let stats = opts
            .probe_stats
            .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime))
            .transpose()
            .context("failed to turn on the kernel's BPF run-time statistics")?;
        let events = RingBuf::try_from(take(&mut ebpf, "EVENTS")?)?;
        let stacks = AyaHashMap::try_from(take(&mut ebpf, "STACKS")?)?;
        let stacks_seen = PerCpuArray::try_from(take(&mut ebpf, "STACKS_SEEN")?)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?)?;
        let py_procs = AyaHashMap::try_from(take(&mut ebpf, "PY_PROCS")?)?;
        let py_active = Array::try_from(take(&mut ebpf, "PY_ACTIVE")?)?;
        let py_threads = AyaHashMap::try_from(take(&mut ebpf, "PY_THREADS")?)?;
        let py_stacks = AyaHashMap::try_from(take(&mut ebpf, "PY_STACKS")?)?;
        let alloc_text = AyaHashMap::try_from(take(&mut ebpf, "ALLOC_TEXT")?)?;
        let tables = if opts.tables && opts.stack_copy.is_none() {
            Some(KernelTables::new(
                &mut ebpf,
                DEFAULT_ROW_BLOCKS,
                DEFAULT_IDX_BLOCKS,
            )?)
        } else {
            None
        };
        Ok(Self {
            ebpf,
            events,
            stacks,
            stacks_seen,
            counters,
            py_procs,
            py_active,
            py_threads,
            py_stacks,
            alloc_text,
            tables,
            fork_child,
            tracepoints,
            logs,
            attach,
            links,
            sets,
            per_process: own.is_some(),
            placement,
            probed,
            stats,
            sample_bytes,
        })
    }

    /// Probes the allocator objects among `allocators` not probed yet (a process that started
    /// or exec'd during the trace with an allocator of its own), for process `pid` (and the
    /// processes that join later) or system-wide; returns their names.
    pub fn add_allocators(&mut self, allocators: &[Allocator], pid: u32) -> Result<Vec<String>> {
        let mut new = Vec::new();
        for a in allocators {
            match file_id(&a.path) {
                Some(id) if self.probed.insert(id) => new.push(a.clone()),
                _ => {}
            }
        }
        if new.is_empty() {
            return Ok(Vec::new());
        }
        let (report, sets) = plan_objects(&new, self.placement, false)?;
        let scope = if self.per_process { pid } else { 0 };
        for set in &sets {
            self.links.attach(&mut self.ebpf, set, scope)?;
        }
        self.sets.extend(sets);
        let names: Vec<String> = report.objects.iter().map(|o| o.path.clone()).collect();
        self.attach.objects.extend(report.objects);
        Ok(names)
    }

    /// Process `pid` joined the trace (a traced process forked it): with per-process probes, it
    /// gets its own. It waits for them, stopped (`ChildPaused`): the session continues it.
    pub fn follow(&mut self, pid: u32) -> Result<()> {
        if !self.per_process || self.links.covers(pid) {
            return Ok(());
        }
        for set in &self.sets {
            self.links.attach(&mut self.ebpf, set, pid)?;
        }
        Ok(())
    }

    /// Process `pid` left the trace (it exited): its probes go, on a thread of their own.
    pub fn release(&mut self, pid: u32) {
        if self.per_process {
            self.links.release(pid);
        }
        let _ = self.alloc_text.remove(&pid);
        if let Some(tables) = &mut self.tables {
            tables.forget_process(pid);
        }
    }

    /// How probes are attached.
    pub fn link_kind(&self) -> LinkKind {
        self.links.kind
    }

    /// Number of probe links held.
    pub fn link_count(&self) -> usize {
        self.links.len()
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
}

/// Plans the probes of `allocators`: what is probed where, and one probe set per object. With
/// `required`, some object must define malloc and free (the first attach of a trace).
fn plan_objects(
    allocators: &[Allocator],
    placement: bool,
    required: bool,
) -> Result<(AttachReport, Vec<ProbeSet>)> {
    let mut report = AttachReport::default();
    let mut chosen: Vec<Chosen> = Vec::new();
    for (index, a) in allocators.iter().enumerate() {
        let data =
            ObjectFile::open(&a.path).with_context(|| format!("failed to read {}", a.shown))?;
        let (object, picked) = plan_object(a, &data, placement)
            .with_context(|| format!("cannot plan the probes of {}", a.shown))?;
        chosen.extend(picked.into_iter().map(|mut c| {
            c.object = index;
            c
        }));
        report.objects.push(object);
    }
    let defined = |name: &str| report.objects.iter().any(|o| o.defined.contains(&name));
    for required_fn in ["malloc", "free"] {
        if required && !defined(required_fn) {
            bail!(
                "no allocator object defines {required_fn} ({}); memprof needs both malloc and free",
                allocators
                    .iter()
                    .map(|a| a.shown.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    for s in PLAN.iter().filter(|s| s.core && !defined(s.symbol)) {
        report.missing.push(s.symbol.to_string());
    }
    for o in &report.objects {
        for p in &o.probes {
            if !report.probes.contains(p) {
                report.probes.push(p.clone());
            }
        }
        for a in &o.aliases {
            if !report.aliases.contains(a) {
                report.aliases.push(a.clone());
            }
        }
    }
    if let Some(main) = report.objects.first() {
        report.placed = main.placed.clone();
    }

    let sets = allocators
        .iter()
        .enumerate()
        .map(|(index, a)| {
            let of_object = || chosen.iter().filter(move |c| c.object == index);
            ProbeSet {
                path: a.path.clone(),
                shown: a.shown.clone(),
                family: Family::Alloc,
                entries: of_object().map(Chosen::entry_point).collect(),
                returns: of_object()
                    .filter(|c| c.spec.returns)
                    .map(|c| (c.sym.file_offset, 0))
                    .collect(),
            }
        })
        .filter(|set| !set.entries.is_empty())
        .collect();
    Ok((report, sets))
}

/// A `--phase` function that none of the objects looked in defines.
#[derive(Debug, thiserror::Error)]
#[error(
    "phase {name}: function {function} not found in {object}{}",
    match others {
        0 => String::new(),
        1 => " or the 1 other object it maps".to_string(),
        n => format!(" or the {n} other objects it maps"),
    }
)]
pub struct PhaseNotFound {
    pub name: String,
    pub function: String,
    /// The program: the first object looked in.
    pub object: String,
    /// How many other objects were looked in.
    pub others: usize,
}

/// A path as its process sees it: `/proc/PID/exe` is where the link leads, `/proc/PID/root/X`
/// is `X`.
fn shown_object(path: &Path) -> String {
    let text = path.display().to_string();
    if let Some(rest) = text.strip_prefix("/proc/")
        && let Some((_, inside)) = rest.split_once('/')
    {
        if inside == "exe"
            && let Ok(target) = fs::read_link(path)
        {
            return target.display().to_string();
        }
        if let Some(file) = inside.strip_prefix("root") {
            return file.to_string();
        }
    }
    text
}

/// The probe sets of the `--phase` functions: entry and return of each, the cookie is the
/// phase's index.
fn plan_phases(opts: &Options<'_>) -> Result<Vec<ProbeSet>> {
    let mut sets: Vec<ProbeSet> = Vec::new();
    for (index, (name, function)) in opts.phases.iter().enumerate() {
        let found = opts.phase_objects.iter().find_map(|object| {
            let data = ObjectFile::open(object).ok()?;
            let found = resolve_symbols(&data, object, [function.as_str()]).ok()?;
            found.get(function).map(|sym| (object, sym.file_offset))
        });
        let Some((object, offset)) = found else {
            return Err(PhaseNotFound {
                name: name.clone(),
                function: function.clone(),
                object: opts
                    .phase_objects
                    .first()
                    .map(|p| shown_object(p))
                    .unwrap_or_default(),
                others: opts.phase_objects.len().saturating_sub(1),
            }
            .into());
        };
        let point = (offset, index as u64);
        match sets.iter_mut().find(|s| &s.path == object) {
            Some(set) => {
                set.entries.push(point);
                set.returns.push(point);
            }
            None => sets.push(ProbeSet {
                path: object.clone(),
                shown: object.display().to_string(),
                family: Family::Phase,
                entries: vec![point],
                returns: vec![point],
            }),
        }
    }
    Ok(sets)
}
