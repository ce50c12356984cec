//! What to probe in each allocator object: the plan of entry points and the programs that watch
//! them ([`PLAN`]), resolved per object to file offsets.
//!
//! Every allocator object (see `allocators`) gets the same plan: each entry point it defines is
//! resolved to a file offset, so functions that are aliases of one another (glibc's `memalign`
//! and `aligned_alloc`, tcmalloc's `free` and `operator delete`) are probed once, never twice.
//! A free-like function that only hands its block on to another probed free-like function
//! (jemalloc's `operator delete` jumping to `free`) is not probed: `free` has no nesting guard,
//! so both would report the same block. Where a function starts with a NULL check, the entry
//! probe goes past it (see `placement`).

use std::collections::{HashMap, HashSet};

use anyhow::Result;
use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind};
use memprof_common::{AllocFn, cookie};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, ObjectSymbolTable as _};

use super::{
    allocators::Allocator,
    placement::{self, Placement},
};
use crate::sys::{elf, objfile::ObjectFile};

/// The most of a function's bytes read to decode it (placement reads its first instructions,
/// a free-like function is followed to where it hands the block on).
pub const MAX_CODE: u64 = 64 << 10;

/// One allocator entry point and how the programs watch it.
pub(super) struct ProbeSpec {
    pub(super) symbol: &'static str,
    /// What the entry program reads of the call (its attach cookie).
    pub(super) entry: AllocFn,
    /// Whether `alloc_return` watches the return.
    pub(super) returns: bool,
    /// jemalloc builds may prefix the name (`je_malloc`, `_rjem_malloc`; see `allocators`).
    pub(super) prefixed: bool,
    /// Releases the block in its first argument (`free_entry`).
    pub(super) frees: bool,
    /// One of the classic malloc family, listed in `missing` when no object defines it.
    pub(super) core: bool,
}

/// An allocating function: its size argument is read by `entry`, its result by `alloc_return`.
const fn alloc(symbol: &'static str, entry: AllocFn) -> ProbeSpec {
    ProbeSpec {
        symbol,
        entry,
        returns: true,
        prefixed: false,
        frees: false,
        core: false,
    }
}

/// A function that releases the block in its first argument.
const fn release(symbol: &'static str) -> ProbeSpec {
    ProbeSpec {
        returns: false,
        frees: true,
        ..alloc(symbol, AllocFn::Free)
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
pub(super) const PLAN: &[ProbeSpec] = &[
    core(prefixed(alloc("malloc", AllocFn::Malloc))),
    core(prefixed(release("free"))),
    core(prefixed(alloc("calloc", AllocFn::Calloc))),
    core(prefixed(alloc("realloc", AllocFn::Realloc))),
    core(prefixed(alloc("reallocarray", AllocFn::Reallocarray))),
    core(prefixed(alloc("posix_memalign", AllocFn::PosixMemalign))),
    core(prefixed(alloc("memalign", AllocFn::Memalign))),
    core(prefixed(alloc("aligned_alloc", AllocFn::AlignedAlloc))),
    core(prefixed(alloc("valloc", AllocFn::Valloc))),
    core(prefixed(alloc("pvalloc", AllocFn::Pvalloc))),
    core(alloc("mmap", AllocFn::Mmap)),
    core(ProbeSpec {
        returns: false,
        ..alloc("munmap", AllocFn::Munmap)
    }),
    core(alloc("mremap", AllocFn::Mremap)),
    // jemalloc's own API (xallocx resizes in place and is not probed) and C23 sized frees.
    prefixed(alloc("mallocx", AllocFn::Malloc)),
    prefixed(alloc("rallocx", AllocFn::Realloc)),
    prefixed(release("sdallocx")),
    prefixed(release("dallocx")),
    prefixed(release("free_sized")),
    prefixed(release("free_aligned_sized")),
    // C++ operator new and delete (x86-64 mangling), for allocators that implement them
    // (jemalloc, tcmalloc, mimalloc) and C++ runtimes (libstdc++'s call malloc and free).
    alloc("_Znwm", AllocFn::Malloc),
    alloc("_Znam", AllocFn::Malloc),
    alloc("_ZnwmRKSt9nothrow_t", AllocFn::Malloc),
    alloc("_ZnamRKSt9nothrow_t", AllocFn::Malloc),
    alloc("_ZnwmSt11align_val_t", AllocFn::Malloc),
    alloc("_ZnamSt11align_val_t", AllocFn::Malloc),
    alloc("_ZnwmSt11align_val_tRKSt9nothrow_t", AllocFn::Malloc),
    alloc("_ZnamSt11align_val_tRKSt9nothrow_t", AllocFn::Malloc),
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
    alloc("mi_zalloc", AllocFn::Malloc),
    alloc("mi_malloc_aligned", AllocFn::Malloc),
    alloc("mi_zalloc_aligned", AllocFn::Malloc),
    alloc("mi_mallocn", AllocFn::Calloc),
    alloc("mi_calloc_aligned", AllocFn::Calloc),
    alloc("mi_realloc_aligned", AllocFn::Realloc),
    alloc("mi_rezalloc", AllocFn::Realloc),
    alloc("mi_reallocn", AllocFn::Reallocarray),
    alloc("mi_recalloc", AllocFn::Reallocarray),
    alloc("mi_new_n", AllocFn::Calloc),
    alloc("mi_new_nothrow", AllocFn::Malloc),
    alloc("mi_new_aligned_nothrow", AllocFn::Malloc),
    alloc("mi_new_realloc", AllocFn::Realloc),
    alloc("mi_new_reallocn", AllocFn::Reallocarray),
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
    /// Where each entry probe sits and why: (function, offset, reason).
    pub placements: Vec<(String, u64, String)>,
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

/// One function to probe in one object.
pub(super) struct Chosen {
    pub(super) object: usize,
    pub(super) spec: &'static ProbeSpec,
    pub(super) name: String,
    pub(super) sym: FunctionSym,
    /// Where the entry probe sits in the function, and where it reads the arguments.
    pub(super) placement: Placement,
}

impl Chosen {
    /// The entry probe's (file offset, attach cookie).
    pub(super) fn entry_point(&self) -> (u64, u64) {
        (
            self.sym.file_offset + self.placement.offset,
            cookie::encode(self.spec.entry, self.placement.arg_regs),
        )
    }
}

/// The functions of `PLAN` that allocator `a` (file contents `data`) defines, deduplicated by
/// address, without the free-like ones that forward to another probed free-like function.
pub(super) fn plan_object(
    a: &Allocator,
    data: &ObjectFile,
    placement: bool,
) -> Result<(ObjectReport, Vec<Chosen>)> {
    let obj = elf::parse(data, &a.path)?;
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
                    placement: Placement::default(),
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
        if placement {
            c.placement = placement::place(c.sym.code(data), c.sym.vaddr, c.spec.entry);
        }
        if c.placement.offset > 0 {
            report.placed.push((c.name.clone(), c.placement.offset));
        }
        report
            .placements
            .push((c.name.clone(), c.placement.offset, c.placement.why.clone()));
        report.probes.push(c.name.clone());
    }
    Ok((report, chosen))
}

/// The function a free-like function `f` branches to (call or jump, taken or not) among the
/// object's probed free-like functions (`free_vaddrs`) or, through a PLT stub, among the names
/// of free-like functions (`free_names`: name -> the probed function it stands for).
fn forwards_to(
    f: &FunctionSym,
    data: &ObjectFile,
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
struct PltNames<'f> {
    /// (start, end, file offset) of the `.plt*` sections.
    sections: Vec<(u64, u64, u64)>,
    data: &'f ObjectFile,
    /// GOT slot address -> the dynamic symbol the loader binds to it.
    slots: HashMap<u64, String>,
}

impl<'f> PltNames<'f> {
    fn new(obj: &object::File<'f, &'f ObjectFile>, data: &'f ObjectFile) -> Self {
        let sections = obj
            .sections()
            .filter(|s| s.name().is_ok_and(|n| n.starts_with(".plt")))
            .filter_map(|s| {
                let (off, _) = s.file_range()?;
                Some((s.address(), s.address().checked_add(s.size())?, off))
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
            data,
            slots,
        }
    }

    /// The symbol a PLT stub at `addr` jumps to, read from its indirect jump's GOT slot.
    fn name_at(&self, addr: u64) -> Option<&str> {
        let (start, end, off) = self
            .sections
            .iter()
            .find(|(start, end, _)| (*start..*end).contains(&addr))?;
        // A stub is 16 bytes; three instructions fit in 32.
        let from = off.checked_add(addr - start)?;
        let len = (end - addr)
            .min(32)
            .min(self.data.len().saturating_sub(from));
        let code = self.data.bytes(from, len)?;
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
    /// The function's bytes within the file `data` (empty if out of range), at most
    /// [`MAX_CODE`] of them.
    pub fn code<'d>(&self, data: &'d ObjectFile) -> &'d [u8] {
        let len = self
            .size
            .min(MAX_CODE)
            .min(data.len().saturating_sub(self.file_offset));
        data.bytes(self.file_offset, len).unwrap_or(&[])
    }
}

/// The named function symbols defined in the ELF file `data` (opened from `path`).
pub fn resolve_symbols<'n>(
    data: &ObjectFile,
    path: &std::path::Path,
    names: impl IntoIterator<Item = &'n str>,
) -> Result<HashMap<String, FunctionSym>> {
    let obj = elf::parse(data, path)?;
    Ok(find_functions(&obj, names, false))
}

/// The named function symbols `obj` defines (only global and weak ones with `globals_only`).
fn find_functions<'a, 'n, R: object::ReadRef<'a>>(
    obj: &object::File<'a, R>,
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
                // A hostile symbol may lie outside its section: the offset wraps, and the
                // function's bytes are then simply not found.
                file_offset: sym
                    .address()
                    .wrapping_sub(section.address())
                    .wrapping_add(file_offset),
                vaddr: sym.address(),
                size: sym.size(),
            },
        );
    }
    found
}
