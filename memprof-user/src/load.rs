//! Loading the kernel programs and attaching them to one process's allocator.
//!
//! The attach plan resolves each allocator symbol to a file offset itself, so functions that are
//! aliases of one another (glibc's `memalign` and `aligned_alloc`) are probed once, never twice.
//! Return probes go in before entry probes: an entry seen without its return would leave the
//! thread marked as inside an allocator.

use std::{
    collections::HashMap,
    fs,
    num::NonZeroU32,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    maps::{HashMap as AyaHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};
use memprof_common::{COUNTER_SLOTS, Counter, StackTrace};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use crate::{placement, report::KernelLosses};

/// The kernel object built by build.rs (empty when the build skipped it).
static EBPF_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memprof"));

/// One allocator entry point and the programs that watch it.
struct ProbeSpec {
    symbol: &'static str,
    entry: &'static str,
    /// Whether `alloc_return` watches the return.
    returns: bool,
    required: bool,
    /// A call with a NULL first argument does nothing memprof records, so the entry probe may
    /// sit after a leading NULL check (see `placement`).
    null_is_noop: bool,
}

const fn spec(
    symbol: &'static str,
    entry: &'static str,
    returns: bool,
    required: bool,
) -> ProbeSpec {
    ProbeSpec {
        symbol,
        entry,
        returns,
        required,
        null_is_noop: false,
    }
}

/// In order of preference when two symbols share an address.
const PLAN: &[ProbeSpec] = &[
    spec("malloc", "malloc_entry", true, true),
    ProbeSpec {
        null_is_noop: true,
        ..spec("free", "free_entry", false, true)
    },
    spec("calloc", "calloc_entry", true, true),
    spec("realloc", "realloc_entry", true, true),
    spec("reallocarray", "reallocarray_entry", true, false),
    spec("posix_memalign", "posix_memalign_entry", true, false),
    spec("memalign", "memalign_entry", true, false),
    spec("aligned_alloc", "aligned_alloc_entry", true, false),
    spec("valloc", "valloc_entry", true, false),
    spec("pvalloc", "pvalloc_entry", true, false),
    spec("mmap", "mmap_entry", true, false),
    spec("munmap", "munmap_entry", false, false),
    spec("mremap", "mremap_entry", true, false),
];

/// What was attached where.
#[derive(Debug, Default)]
pub struct AttachReport {
    /// Functions probed.
    pub probes: Vec<String>,
    /// Optional functions the library does not define.
    pub missing: Vec<String>,
    /// Functions that share an address with a probed one: (alias, probed name).
    pub aliases: Vec<(String, String)>,
    /// Entry probes placed past the function's first instruction: (function, offset).
    pub placed: Vec<(String, u64)>,
}

/// The loaded programs and the maps the agent reads.
pub struct Tracer {
    /// Owns the programs and their links; dropping it detaches everything.
    _ebpf: Ebpf,
    pub events: RingBuf<MapData>,
    stacks: AyaHashMap<MapData, u64, StackTrace>,
    counters: PerCpuArray<MapData, u64>,
    pub attach: AttachReport,
}

pub struct Options<'a> {
    pub pid: u32,
    /// The libc (or other allocator library) file the process maps.
    pub library: &'a Path,
    pub ring_bytes: u32,
    /// `--phase NAME=FUNCTION` pairs, in order (the index is the phase id).
    pub phases: &'a [(String, String)],
    /// Files to look for phase functions in, in order of preference.
    pub phase_objects: &'a [PathBuf],
    /// Attach programs that return at once (measures the probes' own cost).
    pub floor: bool,
    /// Probe every function at its first byte (no `placement`).
    pub no_placement: bool,
}

impl Tracer {
    /// Loads the programs for `opts.pid` and attaches them.
    pub fn attach(opts: &Options<'_>) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!("this memprof was built without its eBPF programs (AYA_BUILD_SKIP); rebuild it");
        }
        // Records wake the agent once a sixteenth of the ring is unread; below that it drains
        // on its timer (see `session::DRAIN_EVERY`).
        let wakeup_bytes = u64::from(opts.ring_bytes / 16);
        let mut ebpf = EbpfLoader::new()
            .override_global("TARGET_TGID", &opts.pid, true)
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
            .override_global("FLOOR", &u32::from(opts.floor), true)
            .map_max_entries("EVENTS", opts.ring_bytes)
            .load(EBPF_OBJECT)
            .context("failed to load the eBPF programs")?;
        let attach = attach_all(&mut ebpf, opts)?;
        attach_phases(&mut ebpf, opts)?;
        let events = RingBuf::try_from(take(&mut ebpf, "EVENTS")?)?;
        let stacks = AyaHashMap::try_from(take(&mut ebpf, "STACKS")?)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?)?;
        Ok(Self {
            _ebpf: ebpf,
            events,
            stacks,
            counters,
            attach,
        })
    }

    /// The frames of stack `key`, innermost first; empty if the map does not hold it.
    pub fn stack(&self, key: u64) -> Vec<u64> {
        match self.stacks.get(&key, 0) {
            Ok(trace) => trace.frames().to_vec(),
            Err(_) => Vec::new(),
        }
    }

    /// The kernel's loss counters, summed over CPUs.
    pub fn losses(&self) -> KernelLosses {
        let read = |c: Counter| -> u64 {
            self.counters
                .get(&(c as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        debug_assert_eq!(COUNTER_SLOTS, 4);
        KernelLosses {
            ring_full: read(Counter::RingFull),
            inflight_full: read(Counter::InflightFull),
            stack_lost: read(Counter::StackLost),
            orphan_returns: read(Counter::OrphanReturn),
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

fn attach_all(ebpf: &mut Ebpf, opts: &Options<'_>) -> Result<AttachReport> {
    let lib = opts.library;
    let lib_name = lib.file_name().map_or(lib.display().to_string(), |n| {
        n.to_string_lossy().into_owned()
    });
    let data = fs::read(lib).with_context(|| format!("failed to read {}", lib.display()))?;
    let offsets = resolve_symbols(&data, PLAN.iter().map(|s| s.symbol))
        .with_context(|| format!("{} is not an ELF file", lib.display()))?;
    let pid = NonZeroU32::new(opts.pid).ok_or_else(|| anyhow!("pid 0 cannot be traced"))?;
    let scope = UProbeScope::OneProcess(pid);

    let mut report = AttachReport::default();
    let mut chosen: Vec<(&ProbeSpec, FunctionSym)> = Vec::new();
    let mut seen: HashMap<u64, &'static str> = HashMap::new();
    for s in PLAN {
        match offsets.get(s.symbol) {
            None if s.required => bail!(
                "{lib_name} ({}) does not define {}; is it the process's allocator?",
                lib.display(),
                s.symbol
            ),
            None => report.missing.push(s.symbol.to_string()),
            Some(sym) => match seen.get(&sym.file_offset) {
                Some(first) => report
                    .aliases
                    .push((s.symbol.to_string(), first.to_string())),
                None => {
                    seen.insert(sym.file_offset, s.symbol);
                    chosen.push((s, *sym));
                }
            },
        }
    }

    // Load every program we use once.
    let mut names: Vec<&str> = chosen.iter().map(|(s, _)| s.entry).collect();
    names.push("alloc_return");
    for name in names {
        uprobe(ebpf, name)?
            .load()
            .with_context(|| format!("the kernel rejected program {name}"))?;
    }

    // Returns first, then entries (see the module docs).
    for (s, sym) in chosen.iter().filter(|(s, _)| s.returns) {
        uprobe(ebpf, "alloc_return")?
            .attach(sym.file_offset, lib, scope)
            .with_context(|| format!("failed to attach uretprobe to {} in {lib_name}", s.symbol))?;
    }
    for (s, sym) in &chosen {
        let skip = if s.null_is_noop && !opts.no_placement {
            placement::skip_null_check(sym.code(&data), sym.vaddr)
        } else {
            0
        };
        if skip > 0 {
            report.placed.push((s.symbol.to_string(), skip));
        }
        uprobe(ebpf, s.entry)?
            .attach(sym.file_offset + skip, lib, scope)
            .with_context(|| format!("failed to attach uprobe to {} in {lib_name}", s.symbol))?;
        report.probes.push(s.symbol.to_string());
    }

    let tp: &mut TracePoint = ebpf
        .program_mut("sys_enter_mmap")
        .ok_or_else(|| anyhow!("the eBPF object has no program sys_enter_mmap"))?
        .try_into()?;
    tp.load()?;
    tp.attach("syscalls", "sys_enter_mmap")
        .context("failed to attach to tracepoint syscalls:sys_enter_mmap")?;
    Ok(report)
}

/// Probes entry and return of each `--phase` function; the attach cookie is the phase index.
fn attach_phases(ebpf: &mut Ebpf, opts: &Options<'_>) -> Result<()> {
    if opts.phases.is_empty() {
        return Ok(());
    }
    let pid = NonZeroU32::new(opts.pid).ok_or_else(|| anyhow!("pid 0 cannot be traced"))?;
    let scope = UProbeScope::OneProcess(pid);
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
    let wanted: Vec<&str> = names.into_iter().collect();
    let mut found = HashMap::new();
    for sym in obj.dynamic_symbols().chain(obj.symbols()) {
        if sym.is_undefined() || sym.kind() != object::SymbolKind::Text {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        // Versioned names (`malloc@@GLIBC_2.2.5`) in .symtab.
        let base = name.split('@').next().unwrap_or(name);
        if !wanted.contains(&base) || found.contains_key(base) {
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
    Ok(found)
}
