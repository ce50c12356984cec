//! Loading the kernel programs and attaching them to the allocators of one process.
//!
//! Every allocator object (see `allocators`) gets the same plan: each entry point it defines is
//! resolved to a file offset, so functions that are aliases of one another (glibc's `memalign`
//! and `aligned_alloc`, tcmalloc's `free` and `operator delete`) are probed once, never twice.
//! A free-like function that only hands its block on to another probed free-like function
//! (jemalloc's `operator delete` jumping to `free`) is not probed: `free` has no nesting guard,
//! so both would report the same block. Return probes go in before entry probes: an entry seen
//! without its return would leave the thread marked as inside an allocator.

use std::{
    collections::{HashMap, HashSet},
    fs,
    num::NonZeroU32,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    maps::{Array, HashMap as AyaHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind};
use memprof_common::{
    COUNTER_SLOTS, Counter, MAX_SAMPLE_MEAN, PyStack, PyWalk, StackTrace, mode, unwind,
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, ObjectSymbolTable as _};

use super::{
    allocators::Allocator,
    counters::{KernelLosses, ProbeStat},
    placement,
};
use crate::sys::elf::file_id;

/// The kernel object built by build.rs (empty when the build skipped it).
static EBPF_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memprof"));

/// One allocator entry point and the programs that watch it.
struct ProbeSpec {
    symbol: &'static str,
    entry: &'static str,
    /// Whether `alloc_return` watches the return.
    returns: bool,
    /// A call with a NULL first argument does nothing memprof records, so the entry probe may
    /// sit after a leading NULL check (see `placement`).
    null_is_noop: bool,
    /// jemalloc builds may prefix the name (`je_malloc`, `_rjem_malloc`; see `allocators`).
    prefixed: bool,
    /// Releases the block in its first argument (`free_entry`).
    frees: bool,
    /// One of the classic malloc family, listed in `missing` when no object defines it.
    core: bool,
}

/// An allocating function: its size argument is read by `entry`, its result by `alloc_return`.
const fn alloc(symbol: &'static str, entry: &'static str) -> ProbeSpec {
    ProbeSpec {
        symbol,
        entry,
        returns: true,
        null_is_noop: false,
        prefixed: false,
        frees: false,
        core: false,
    }
}

/// A function that releases the block in its first argument.
const fn release(symbol: &'static str) -> ProbeSpec {
    ProbeSpec {
        returns: false,
        null_is_noop: true,
        frees: true,
        ..alloc(symbol, "free_entry")
    }
}

const fn prefixed(s: ProbeSpec) -> ProbeSpec {
    ProbeSpec {
        prefixed: true,
        ..s
    }
}

const fn core(s: ProbeSpec) -> ProbeSpec {
    ProbeSpec { core: true, ..s }
}

/// In order of preference when two symbols share an address. `malloc` and `free` must be
/// defined by some allocator object; everything else is optional.
const PLAN: &[ProbeSpec] = &[
    core(prefixed(alloc("malloc", "malloc_entry"))),
    core(prefixed(release("free"))),
    core(prefixed(alloc("calloc", "calloc_entry"))),
    core(prefixed(alloc("realloc", "realloc_entry"))),
    core(prefixed(alloc("reallocarray", "reallocarray_entry"))),
    core(prefixed(alloc("posix_memalign", "posix_memalign_entry"))),
    core(prefixed(alloc("memalign", "memalign_entry"))),
    core(prefixed(alloc("aligned_alloc", "aligned_alloc_entry"))),
    core(prefixed(alloc("valloc", "valloc_entry"))),
    core(prefixed(alloc("pvalloc", "pvalloc_entry"))),
    core(alloc("mmap", "mmap_entry")),
    core(ProbeSpec {
        returns: false,
        ..alloc("munmap", "munmap_entry")
    }),
    core(alloc("mremap", "mremap_entry")),
    // jemalloc's own API (xallocx resizes in place and is not probed) and C23 sized frees.
    prefixed(alloc("mallocx", "malloc_entry")),
    prefixed(alloc("rallocx", "realloc_entry")),
    prefixed(release("sdallocx")),
    prefixed(release("dallocx")),
    prefixed(release("free_sized")),
    prefixed(release("free_aligned_sized")),
    // C++ operator new and delete (x86-64 mangling), for allocators that implement them
    // (jemalloc, tcmalloc, mimalloc) and C++ runtimes (libstdc++'s call malloc and free).
    alloc("_Znwm", "malloc_entry"),
    alloc("_Znam", "malloc_entry"),
    alloc("_ZnwmRKSt9nothrow_t", "malloc_entry"),
    alloc("_ZnamRKSt9nothrow_t", "malloc_entry"),
    alloc("_ZnwmSt11align_val_t", "malloc_entry"),
    alloc("_ZnamSt11align_val_t", "malloc_entry"),
    alloc("_ZnwmSt11align_val_tRKSt9nothrow_t", "malloc_entry"),
    alloc("_ZnamSt11align_val_tRKSt9nothrow_t", "malloc_entry"),
    release("_ZdlPv"),
    release("_ZdaPv"),
    release("_ZdlPvm"),
    release("_ZdaPvm"),
    release("_ZdlPvRKSt9nothrow_t"),
    release("_ZdaPvRKSt9nothrow_t"),
    release("_ZdlPvSt11align_val_t"),
    release("_ZdaPvSt11align_val_t"),
    release("_ZdlPvmSt11align_val_t"),
    release("_ZdaPvmSt11align_val_t"),
    release("_ZdlPvSt11align_val_tRKSt9nothrow_t"),
    release("_ZdaPvSt11align_val_tRKSt9nothrow_t"),
    // mimalloc's own API where it is not an alias of the standard names (size first; the
    // `mi_heap_*` functions, which take the heap first, are not probed).
    alloc("mi_zalloc", "malloc_entry"),
    alloc("mi_malloc_aligned", "malloc_entry"),
    alloc("mi_zalloc_aligned", "malloc_entry"),
    alloc("mi_mallocn", "calloc_entry"),
    alloc("mi_calloc_aligned", "calloc_entry"),
    alloc("mi_realloc_aligned", "realloc_entry"),
    alloc("mi_rezalloc", "realloc_entry"),
    alloc("mi_reallocn", "reallocarray_entry"),
    alloc("mi_recalloc", "reallocarray_entry"),
    alloc("mi_new_n", "calloc_entry"),
    alloc("mi_new_nothrow", "malloc_entry"),
    alloc("mi_new_aligned_nothrow", "malloc_entry"),
    alloc("mi_new_realloc", "realloc_entry"),
    alloc("mi_new_reallocn", "reallocarray_entry"),
    release("mi_free_size"),
    release("mi_free_aligned"),
    release("mi_free_size_aligned"),
    release("mi_cfree"),
];

/// What was probed in one allocator object.
#[derive(Debug, Default)]
pub struct ObjectReport {
    /// The object's path as the process sees it.
    pub path: String,
    /// `allocators::Kind::name`.
    pub kind: &'static str,
    /// The allocator is linked into the executable.
    pub executable: bool,
    /// Functions probed (symbol names, with the build's prefix).
    pub probes: Vec<String>,
    /// Functions that share an address with a probed one: (alias, probed name).
    pub aliases: Vec<(String, String)>,
    /// Free-like functions left unprobed because they pass the block to a probed one:
    /// (function, callee).
    pub forwards: Vec<(String, String)>,
    /// Entry probes placed past the function's first instruction: (function, offset).
    pub placed: Vec<(String, u64)>,
    /// The plan's functions (unprefixed names) the object defines, probed or not.
    pub defined: Vec<&'static str>,
}

/// What was attached where.
#[derive(Debug, Default)]
pub struct AttachReport {
    /// Functions probed, over every object, each name once.
    pub probes: Vec<String>,
    /// Optional malloc-family functions no allocator object defines.
    pub missing: Vec<String>,
    /// Functions that share an address with a probed one, over every object: (alias, probed).
    pub aliases: Vec<(String, String)>,
    /// The main allocator's entry probes placed past the function's first instruction.
    pub placed: Vec<(String, u64)>,
    /// Per allocator object, the main one first.
    pub objects: Vec<ObjectReport>,
}

/// The loaded programs and the maps the agent reads.
pub struct Tracer {
    /// Owns the programs and their links; dropping it detaches everything (memprof's normal
    /// exit leaves that to a background child, see `cli::detach_in_background`).
    ebpf: Ebpf,
    pub events: RingBuf<MapData>,
    stacks: AyaHashMap<MapData, u64, StackTrace>,
    counters: PerCpuArray<MapData, u64>,
    py_procs: AyaHashMap<MapData, u32, PyWalk>,
    py_active: Array<MapData, u32>,
    py_threads: AyaHashMap<MapData, u32, u64>,
    py_stacks: AyaHashMap<MapData, u64, PyStack>,
    pub attach: AttachReport,
    /// Mean sampling interval in bytes the programs were loaded with (0: not sampled).
    pub sample_bytes: u64,
    /// Where probes go (one process, or every process mapping the object).
    scope: UProbeScope,
    placement: bool,
    /// (device, inode) of every object probed.
    probed: HashSet<(u64, u64)>,
    /// Keeps the kernel's run-time statistics of BPF programs on (`--probe-stats`).
    stats: Option<OwnedFd>,
}

/// Which processes the programs report on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    /// One process; its probes are installed in it alone (the cheapest for the rest of the
    /// machine).
    One(u32),
    /// These processes, plus their forks with `follow`, plus processes that exec into the name
    /// `comm`. Probes go in every process mapping a probed object and the programs filter.
    Set {
        pids: Vec<u32>,
        follow: bool,
        comm: Option<String>,
    },
    /// Every process but memprof, or those of one cgroup (v2 id).
    All { cgroup: Option<u64> },
}

impl Targets {
    fn scope(&self) -> UProbeScope {
        match self {
            Self::One(pid) => {
                NonZeroU32::new(*pid).map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess)
            }
            _ => UProbeScope::AllProcesses,
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
    /// Attach programs that return at once (measures the probes' own cost).
    pub floor: bool,
    /// Probe every function at its first byte (no `placement`).
    pub no_placement: bool,
    /// Per-thread call slots in the kernel (a power of two; threads beyond share a hash).
    pub call_slots: u32,
    /// Turn on the kernel's run-time statistics of the programs (`Tracer::probe_stats`).
    pub probe_stats: bool,
    /// Byte sampling: mean interval in bytes between sampled allocations (0: record all).
    pub sample_bytes: u64,
    /// Copy registers and this many bytes of stack per allocation for the agent to unwind from
    /// CFI (`--unwind dwarf`); None: the kernel walks frame pointers.
    pub stack_copy: Option<u32>,
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
        let mut ebpf = EbpfLoader::new()
            .override_global("MODE", &mode, true)
            .override_global("TARGET_TGID", &target, true)
            .override_global("FOLLOW", &u32::from(follow), true)
            .override_global("COMM", &comm, true)
            .override_global("CGROUP_ID", &cgroup, true)
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
            .override_global("FLOOR", &u32::from(opts.floor), true)
            .override_global(
                "UNWIND",
                &if opts.stack_copy.is_some() {
                    unwind::DWARF
                } else {
                    unwind::FRAME_POINTERS
                },
                true,
            )
            // Phase functions' return probes replace return addresses on the stack: the
            // kernel's walker puts them back.
            .override_global("KERNEL_STACKS", &u32::from(!opts.phases.is_empty()), true)
            .override_global("STACK_COPY", &opts.stack_copy.unwrap_or(0), true)
            .override_global("SAMPLE_BYTES", &sample_bytes, true)
            .override_global("CALL_SLOT_MASK", &(opts.call_slots - 1), true)
            .map_max_entries("EVENTS", opts.ring_bytes)
            .map_max_entries("CALLS", opts.call_slots)
            .map_max_entries("THREAD_HINTS", opts.call_slots)
            .load(EBPF_OBJECT)
            .context("failed to load the eBPF programs")?;
        if let Targets::Set { pids, .. } = &opts.targets {
            let mut tgids: AyaHashMap<_, u32, u32> = AyaHashMap::try_from(
                ebpf.map_mut("TGIDS")
                    .ok_or_else(|| anyhow!("the eBPF object has no map TGIDS"))?,
            )?;
            for pid in pids {
                tgids
                    .insert(pid, 1, 0)
                    .context("failed to add a process to trace")?;
            }
        }
        let scope = opts.targets.scope();
        load_programs(&mut ebpf)?;
        let attach = attach_objects(&mut ebpf, opts.allocators, scope, !opts.no_placement, true)?;
        attach_tracepoints(&mut ebpf)?;
        attach_phases(&mut ebpf, opts, scope)?;
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
        let counters = PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?)?;
        let py_procs = AyaHashMap::try_from(take(&mut ebpf, "PY_PROCS")?)?;
        let py_active = Array::try_from(take(&mut ebpf, "PY_ACTIVE")?)?;
        let py_threads = AyaHashMap::try_from(take(&mut ebpf, "PY_THREADS")?)?;
        let py_stacks = AyaHashMap::try_from(take(&mut ebpf, "PY_STACKS")?)?;
        Ok(Self {
            ebpf,
            events,
            stacks,
            counters,
            py_procs,
            py_active,
            py_threads,
            py_stacks,
            attach,
            scope,
            placement: !opts.no_placement,
            probed,
            stats,
            sample_bytes,
        })
    }

    /// Probes the allocator objects among `allocators` not probed yet (a process that started
    /// or exec'd during the trace with an allocator of its own); returns their names.
    pub fn add_allocators(&mut self, allocators: &[Allocator]) -> Result<Vec<String>> {
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
        let report = attach_objects(&mut self.ebpf, &new, self.scope, self.placement, false)?;
        let names: Vec<String> = report.objects.iter().map(|o| o.path.clone()).collect();
        self.attach.objects.extend(report.objects);
        Ok(names)
    }

    /// Whether the file with (device, inode) `id` carries memprof's probes.
    pub fn is_probed(&self, id: (u64, u64)) -> bool {
        self.probed.contains(&id)
    }

    /// The frames of stack `key`, innermost first; empty if the map does not hold it.
    pub fn stack(&self, key: u64) -> Vec<u64> {
        match self.stacks.get(&key, 0) {
            Ok(trace) => trace.frames().to_vec(),
            Err(_) => Vec::new(),
        }
    }

    /// Lets the kernel program walk the Python frames of CPython process `tgid`.
    pub fn set_python(&mut self, tgid: u32, walk: PyWalk) -> Result<()> {
        self.py_procs
            .insert(tgid, walk, 0)
            .context("failed to register a Python process")?;
        self.py_active
            .set(0, 1, 0)
            .context("failed to enable Python stacks")
    }

    /// Registers thread `tid` as running Python with thread state `tstate`.
    pub fn set_python_thread(&mut self, tid: u32, tstate: u64) -> Result<()> {
        self.py_threads
            .insert(tid, tstate, 0)
            .context("failed to register a Python thread")
    }

    /// Forgets a Python thread (it exited, or its process exec'd).
    pub fn remove_python_thread(&mut self, tid: u32) {
        let _ = self.py_threads.remove(&tid);
    }

    /// The (code object, instruction) pairs of Python stack `key`, innermost first.
    pub fn py_stack(&self, key: u64) -> Vec<(u64, u64)> {
        match self.py_stacks.get(&key, 0) {
            Ok(s) => s
                .frames
                .iter()
                .take((s.len as usize).min(s.frames.len()))
                .map(|[code, instr]| (*code, *instr))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Each program's runs and time in them so far, with `--probe-stats` (else empty).
    pub fn probe_stats(&self) -> Vec<ProbeStat> {
        if self.stats.is_none() {
            return Vec::new();
        }
        let mut stats: Vec<ProbeStat> = self
            .ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some(ProbeStat::new(
                    name,
                    info.run_count(),
                    info.run_time().as_nanos() as u64,
                ))
            })
            .filter(|s| s.runs > 0)
            .collect();
        stats.sort_by(|a, b| a.program.cmp(&b.program));
        stats
    }

    /// Turns the kernel's BPF run-time statistics back off (they stay on while any holder of
    /// the descriptor lives, such as a forked child).
    pub fn stop_probe_stats(&mut self) {
        self.stats = None;
    }

    /// The kernel's loss counters, summed over CPUs.
    pub fn losses(&self) -> KernelLosses {
        let read = |c: Counter| -> u64 {
            self.counters
                .get(&(c as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        debug_assert_eq!(COUNTER_SLOTS, 7);
        KernelLosses {
            ring_full: read(Counter::RingFull),
            inflight_full: read(Counter::InflightFull),
            stack_lost: read(Counter::StackLost),
            orphan_returns: read(Counter::OrphanReturn),
            processes_missed: read(Counter::TgidsFull),
            mapping_records_lost: 0,
            sampled_full: read(Counter::SampledFull),
        }
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut UProbe> {
    let program: &mut UProbe = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
        .try_into()
        .with_context(|| format!("program {name} is not a uprobe"))?;
    Ok(program)
}

/// One function to probe in one object.
struct Chosen {
    object: usize,
    spec: &'static ProbeSpec,
    name: String,
    sym: FunctionSym,
    skip: u64,
}

/// Loads every allocator program once (objects probed later reuse them).
fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    let mut names: Vec<&str> = Vec::new();
    for s in PLAN {
        if !names.contains(&s.entry) {
            names.push(s.entry);
        }
    }
    names.push("alloc_return");
    for name in names {
        uprobe(ebpf, name)?
            .load()
            .with_context(|| format!("the kernel rejected program {name}"))?;
    }
    Ok(())
}

/// Plans and attaches the probes of `allocators`. With `required`, some object must define
/// malloc and free (the first attach of a trace).
fn attach_objects(
    ebpf: &mut Ebpf,
    allocators: &[Allocator],
    scope: UProbeScope,
    placement: bool,
    required: bool,
) -> Result<AttachReport> {
    let mut report = AttachReport::default();
    let mut chosen: Vec<Chosen> = Vec::new();
    for (index, a) in allocators.iter().enumerate() {
        let data = fs::read(&a.path).with_context(|| format!("failed to read {}", a.shown))?;
        let (object, picked) = plan_object(a, &data, placement)
            .with_context(|| format!("{} is not an ELF file", a.shown))?;
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

    // Returns first, then entries (see the module docs).
    let path_of = |c: &Chosen| -> &Path { &allocators[c.object].path };
    let shown_of = |c: &Chosen| -> &str { &allocators[c.object].shown };
    for c in chosen.iter().filter(|c| c.spec.returns) {
        uprobe(ebpf, "alloc_return")?
            .attach(c.sym.file_offset, path_of(c), scope)
            .with_context(|| {
                format!(
                    "failed to attach uretprobe to {} in {}",
                    c.name,
                    shown_of(c)
                )
            })?;
    }
    for c in &chosen {
        uprobe(ebpf, c.spec.entry)?
            .attach(c.sym.file_offset + c.skip, path_of(c), scope)
            .with_context(|| format!("failed to attach uprobe to {} in {}", c.name, shown_of(c)))?;
    }
    Ok(report)
}

/// Library loads and the process life cycle.
fn attach_tracepoints(ebpf: &mut Ebpf) -> Result<()> {
    for (program, category, name) in [
        ("sys_enter_mmap", "syscalls", "sys_enter_mmap"),
        ("sys_exit_mmap", "syscalls", "sys_exit_mmap"),
        ("task_newtask", "task", "task_newtask"),
        ("sched_process_exec", "sched", "sched_process_exec"),
        ("sched_process_exit", "sched", "sched_process_exit"),
    ] {
        let tp: &mut TracePoint = ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("the eBPF object has no program {program}"))?
            .try_into()?;
        tp.load()
            .with_context(|| format!("the kernel rejected program {program}"))?;
        tp.attach(category, name)
            .with_context(|| format!("failed to attach to tracepoint {category}:{name}"))?;
    }
    Ok(())
}

/// The functions of `PLAN` that allocator `a` (file contents `data`) defines, deduplicated by
/// address, without the free-like ones that forward to another probed free-like function.
fn plan_object(a: &Allocator, data: &[u8], placement: bool) -> Result<(ObjectReport, Vec<Chosen>)> {
    let obj = object::File::parse(data)?;
    let name_of = |s: &ProbeSpec| -> String {
        if s.prefixed {
            format!("{}{}", a.prefix, s.symbol)
        } else {
            s.symbol.to_string()
        }
    };
    let names: Vec<String> = PLAN.iter().map(name_of).collect();
    let offsets = find_functions(&obj, names.iter().map(String::as_str), true);

    let mut report = ObjectReport {
        path: a.shown.clone(),
        kind: a.kind.name(),
        executable: a.executable,
        ..ObjectReport::default()
    };
    let mut chosen: Vec<Chosen> = Vec::new();
    let mut seen: HashMap<u64, String> = HashMap::new();
    for (s, name) in PLAN.iter().zip(&names) {
        let Some(sym) = offsets.get(name) else {
            continue;
        };
        report.defined.push(s.symbol);
        match seen.get(&sym.file_offset) {
            Some(first) => report.aliases.push((name.clone(), first.clone())),
            None => {
                seen.insert(sym.file_offset, name.clone());
                chosen.push(Chosen {
                    object: 0,
                    spec: s,
                    name: name.clone(),
                    sym: *sym,
                    skip: 0,
                });
            }
        }
    }

    // Free-like functions that pass their block on to another probed free-like function.
    let free_vaddrs: HashMap<u64, String> = chosen
        .iter()
        .filter(|c| c.spec.frees)
        .map(|c| (c.sym.vaddr, c.name.clone()))
        .collect();
    // Names a PLT stub may bind to a free-like function: the plan's, and every other name of
    // this object's probed ones (mimalloc's `mi_free` is its `free`).
    let mut free_names: HashMap<String, String> = PLAN
        .iter()
        .filter(|s| s.frees)
        .flat_map(|s| {
            if s.prefixed {
                crate::probe::allocators::PREFIXES
                    .iter()
                    .map(|p| format!("{p}{}", s.symbol))
                    .collect::<Vec<_>>()
            } else {
                vec![s.symbol.to_string()]
            }
        })
        .map(|n| (n.clone(), n))
        .collect();
    for sym in obj.dynamic_symbols().chain(obj.symbols()) {
        if sym.is_undefined() || sym.kind() != object::SymbolKind::Text {
            continue;
        }
        if let (Some(probed), Ok(name)) = (free_vaddrs.get(&sym.address()), sym.name()) {
            let base = name.split('@').next().unwrap_or(name);
            free_names.insert(base.to_string(), probed.clone());
        }
    }
    let mut plt: Option<PltNames> = None;
    let mut forwards: Vec<(String, String)> = Vec::new();
    for c in chosen.iter().filter(|c| c.spec.frees) {
        let plt = plt.get_or_insert_with(|| PltNames::new(&obj, data));
        if let Some(callee) = forwards_to(&c.sym, data, &free_vaddrs, &free_names, plt)
            && callee != c.name
        {
            forwards.push((c.name.clone(), callee));
        }
    }
    chosen.retain(|c| !forwards.iter().any(|(f, _)| *f == c.name));
    report.forwards = forwards;

    for c in &mut chosen {
        if c.spec.null_is_noop && placement {
            c.skip = placement::skip_null_check(c.sym.code(data), c.sym.vaddr);
        }
        if c.skip > 0 {
            report.placed.push((c.name.clone(), c.skip));
        }
        report.probes.push(c.name.clone());
    }
    Ok((report, chosen))
}

/// The function a free-like function `f` branches to (call or jump, taken or not) among the
/// object's probed free-like functions (`free_vaddrs`) or, through a PLT stub, among the names
/// of free-like functions (`free_names`: name -> the probed function it stands for).
fn forwards_to(
    f: &FunctionSym,
    data: &[u8],
    free_vaddrs: &HashMap<u64, String>,
    free_names: &HashMap<String, String>,
    plt: &PltNames,
) -> Option<String> {
    let mut decoder = Decoder::with_ip(64, f.code(data), f.vaddr, DecoderOptions::NONE);
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            break;
        }
        let branches = matches!(
            insn.flow_control(),
            FlowControl::Call | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
        ) && matches!(
            insn.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        );
        if !branches {
            continue;
        }
        let target = insn.near_branch_target();
        if target == f.vaddr {
            continue;
        }
        if let Some(name) = free_vaddrs.get(&target) {
            return Some(name.clone());
        }
        if let Some(callee) = plt.name_at(target).and_then(|n| free_names.get(n)) {
            return Some(callee.clone());
        }
    }
    None
}

/// The symbols behind an object's PLT stubs.
struct PltNames {
    /// (start, end, file offset) of the `.plt*` sections.
    sections: Vec<(u64, u64, u64)>,
    data: Vec<u8>,
    /// GOT slot address -> the dynamic symbol the loader binds to it.
    slots: HashMap<u64, String>,
}

impl PltNames {
    fn new(obj: &object::File<'_>, data: &[u8]) -> Self {
        let sections = obj
            .sections()
            .filter(|s| s.name().is_ok_and(|n| n.starts_with(".plt")))
            .filter_map(|s| {
                let (off, _) = s.file_range()?;
                Some((s.address(), s.address() + s.size(), off))
            })
            .collect();
        let mut slots = HashMap::new();
        if let (Some(relocs), Some(dynsyms)) =
            (obj.dynamic_relocations(), obj.dynamic_symbol_table())
        {
            for (offset, reloc) in relocs {
                if let object::RelocationTarget::Symbol(index) = reloc.target()
                    && let Ok(sym) = dynsyms.symbol_by_index(index)
                    && let Ok(name) = sym.name()
                {
                    slots.insert(offset, name.to_string());
                }
            }
        }
        Self {
            sections,
            data: data.to_vec(),
            slots,
        }
    }

    /// The symbol a PLT stub at `addr` jumps to, read from its indirect jump's GOT slot.
    fn name_at(&self, addr: u64) -> Option<&str> {
        let (start, end, off) = self
            .sections
            .iter()
            .find(|(start, end, _)| (*start..*end).contains(&addr))?;
        let from = (off + (addr - start)) as usize;
        let to = (off + (end - start)) as usize;
        let code = self.data.get(from..to.min(self.data.len()))?;
        let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
        for _ in 0..3 {
            if !decoder.can_decode() {
                break;
            }
            let insn = decoder.decode();
            if insn.mnemonic() == Mnemonic::Jmp && insn.is_ip_rel_memory_operand() {
                return self
                    .slots
                    .get(&insn.ip_rel_memory_address())
                    .map(String::as_str);
            }
        }
        None
    }
}

/// Probes entry and return of each `--phase` function; the attach cookie is the phase index.
fn attach_phases(ebpf: &mut Ebpf, opts: &Options<'_>, scope: UProbeScope) -> Result<()> {
    if opts.phases.is_empty() {
        return Ok(());
    }
    uprobe(ebpf, "phase_entry")?.load()?;
    uprobe(ebpf, "phase_return")?.load()?;
    for (index, (name, function)) in opts.phases.iter().enumerate() {
        let found = opts.phase_objects.iter().find_map(|object| {
            let data = fs::read(object).ok()?;
            let found = resolve_symbols(&data, [function.as_str()]).ok()?;
            found.get(function).map(|sym| (object, sym.file_offset))
        });
        let Some((object, offset)) = found else {
            bail!(
                "phase {name}: function {function} not found in {}",
                opts.phase_objects
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        for program in ["phase_return", "phase_entry"] {
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(offset),
                cookie: Some(index as u64),
            };
            uprobe(ebpf, program)?
                .attach(point, object, scope)
                .with_context(|| {
                    format!(
                        "phase {name}: failed to attach to {function} in {}",
                        object.display()
                    )
                })?;
        }
    }
    Ok(())
}

/// A function symbol of an ELF file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionSym {
    /// Where the function starts in the file (what uprobes attach to).
    pub file_offset: u64,
    /// Its virtual address in the ELF image.
    pub vaddr: u64,
    /// Its size in bytes (0 when the symbol does not say).
    pub size: u64,
}

impl FunctionSym {
    /// The function's bytes within the file's `data` (empty if out of range).
    pub fn code<'d>(&self, data: &'d [u8]) -> &'d [u8] {
        let start = self.file_offset as usize;
        let end = start.saturating_add(self.size as usize).min(data.len());
        data.get(start..end).unwrap_or(&[])
    }
}

/// The named function symbols defined in the ELF file `data`.
pub fn resolve_symbols<'n>(
    data: &[u8],
    names: impl IntoIterator<Item = &'n str>,
) -> Result<HashMap<String, FunctionSym>> {
    let obj = object::File::parse(data)?;
    Ok(find_functions(&obj, names, false))
}

/// The named function symbols `obj` defines (only global and weak ones with `globals_only`).
fn find_functions<'n>(
    obj: &object::File<'_>,
    names: impl IntoIterator<Item = &'n str>,
    globals_only: bool,
) -> HashMap<String, FunctionSym> {
    let wanted: HashSet<&str> = names.into_iter().collect();
    let mut found = HashMap::new();
    for sym in obj.dynamic_symbols().chain(obj.symbols()) {
        if sym.is_undefined()
            || sym.kind() != object::SymbolKind::Text
            || (globals_only && sym.is_local())
        {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        // Versioned names (`malloc@@GLIBC_2.2.5`) in .symtab.
        let base = name.split('@').next().unwrap_or(name);
        if !wanted.contains(base) || found.contains_key(base) {
            continue;
        }
        let Some(index) = sym.section_index() else {
            continue;
        };
        let Ok(section) = obj.section_by_index(index) else {
            continue;
        };
        let Some((file_offset, _)) = section.file_range() else {
            continue;
        };
        found.insert(
            base.to_string(),
            FunctionSym {
                file_offset: sym.address() - section.address() + file_offset,
                vaddr: sym.address(),
                size: sym.size(),
            },
        );
    }
    found
}
