//! `unwind::TABLES`: stacks walked in the kernel with unwind tables the agent builds from each
//! file's CFI (see `memprof_common::tables`), so code without frame pointers gets whole stacks
//! with no stack copy leaving the kernel.
//!
//! Each frame: the row for the return address (from a per-CPU cache by return address, else
//! the process's mapping holding it and a search of the file's rows within one page), the
//! caller's frame address (CFA) from rsp or rbp, then the return address at CFA - 8 and, where
//! the row says, the caller's rbp, read from the windows of stack `stack::copy_window` copies.
//! The walk ends at a row saying the return address is undefined (the program's or thread's
//! entry) or at the first thing it cannot follow, and the stack keeps why (`unwind_end`).
//!
//! A call site allocating in a loop is walked once per CPU (`reuse`): each word of stack a walk
//! reads is noted, a saved rbp as needed only once a later row computes from it.
//!
//! The agent writes a process's mappings after the kernel tells it of new code, so a walk can
//! run ahead of them: each exec and each executable file mapping moves the process's
//! `EXEC_EPOCH` on, and a walk that meets an unknown address (or a process without mappings)
//! while the list is older than the epoch is dropped for a stack copy the agent unwinds
//! itself (`STACK_STALE`, `dwarf::emit_alloc_stack`). Start-up and `dlopen` keep whole stacks.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use memprof_common::{
    Counter, DEFAULT_IDX_BLOCKS, DEFAULT_ROW_BLOCKS, IDX_PER_BLOCK, IdxBlock, MAP_NO_TABLE,
    MAPS_SEARCH_STEPS, MAX_EXEC_MAPS, MAX_MODULES, MAX_STACK_DEPTH, MODULE_READY, ModuleInfo,
    NO_STACK, ProcMaps, ROWS_PER_BLOCK, RowBlock, UNWIND_PAGE_SHIFT, UNWIND_SEARCH_STEPS, row_kind,
    unwind, unwind_end,
};

use crate::{
    PAUSE_FOR_CODE, UNWIND,
    emit::count,
    reuse::{keep_walk, need, note, note_first_bp, note_unneeded, reused_walk, start_notes},
    stack::{
        MAX_STACK_SPAN, STACK_NEW, STACK_SCRATCH, STACK_WINDOW, WINDOW_BYTES, copy_window,
        store_stack,
    },
};

#[map]
static UNWIND_ROWS: Array<RowBlock> = Array::with_max_entries(DEFAULT_ROW_BLOCKS, 0);

#[map]
static UNWIND_IDX: Array<IdxBlock> = Array::with_max_entries(DEFAULT_IDX_BLOCKS, 0);

#[map]
static MODULES: Array<ModuleInfo> = Array::with_max_entries(MAX_MODULES, 0);

/// Each process's executable mappings. A hash without preallocation: an update swaps in a new
/// element, so a walk sees the old list or the new one, never half of each.
#[map]
static PROC_MAPS: HashMap<u32, ProcMaps> = HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

/// How many times the agent changed `PROC_MAPS` (slot 0; it counts after each change): a walk
/// `reuse` kept from before a change is walked again.
#[map]
static MAPS_CHANGES: Array<u64> = Array::with_max_entries(1, 0);

/// When each process last exec'd or mapped a file executable (see the module's notes).
#[map]
static EXEC_EPOCH: HashMap<u32, u64> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// `table_stack_key`'s answer when the process's mappings in `PROC_MAPS` are behind its code:
/// no stack was stored, the allocation goes out with a stack copy.
pub(crate) const STACK_STALE: u64 = 1 << 62;

/// Whether a process that execs or maps code stops until the agent has its tables and
/// mappings in (`PAUSE_FOR_CODE`: a command memprof started, and its children).
#[inline(always)]
pub(crate) fn pause_for_code() -> bool {
    // SAFETY: reads of globals the loader patches.
    unsafe {
        core::ptr::read_volatile(&UNWIND) == unwind::TABLES
            && core::ptr::read_volatile(&PAUSE_FOR_CODE) != 0
    }
}

/// Moves process `tgid`'s `EXEC_EPOCH` on: it execs or maps code (`unwind::TABLES` only).
#[inline(always)]
pub(crate) fn bump_epoch(tgid: u32) {
    // SAFETY: a read of a global the loader patches.
    if unsafe { core::ptr::read_volatile(&UNWIND) } != unwind::TABLES {
        return;
    }
    // The time, not a count: two threads' updates never leave the value the agent read
    // (an add would need atomics the target lacks).
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = EXEC_EPOCH.insert(&tgid, &now, 0);
}

/// Slots of each CPU's cache of rows by return address (a power of two).
const RA_SLOTS: usize = 512;

#[derive(Clone, Copy)]
#[repr(C)]
struct RaEntry {
    pc: u64,
    /// tgid << 32 | the process's mapping generation.
    tag: u64,
    /// The row, as `find_row` returns it.
    row: u64,
}

/// Per CPU, rows by return address: a call site allocating in a loop costs a probe here per
/// frame instead of a mapping search and a row search.
#[map]
static RA_CACHE: PerCpuArray<[RaEntry; RA_SLOTS]> = PerCpuArray::with_max_entries(1, 0);

/// A walk's state between frames (per CPU): the frame's registers and the window of stack.
#[derive(Clone, Copy)]
#[repr(C)]
struct Walk {
    pc: u64,
    sp: u64,
    bp: u64,
    /// The first frame's stack pointer.
    sp0: u64,
    /// The window copied in `STACK_WINDOW`: its start and length (0: none yet).
    win_base: u64,
    win_len: u64,
    /// tgid << 32 | mapping generation.
    tag: u64,
    /// Where rbp's value came from: `BP_FIRST` (the first frame's register), `BP_LOST` (no
    /// row restored it after a frame that changed it), else the index of the note of the stack
    /// word it was restored from (for `reuse::need`).
    bp_src: u64,
}

#[map]
static WALK: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

/// `Walk::bp_src`: rbp is still the first frame's register.
const BP_FIRST: u64 = u64::MAX;
/// `Walk::bp_src`: rbp's value is lost.
const BP_LOST: u64 = u64::MAX - 1;

/// `find_row`'s error bit; the low bits are an `unwind_end` value.
const ROW_ERROR: u64 = 1 << 63;

/// Walks thread `id`'s stack with the tables from the given registers and stores it (see
/// `stack::store_stack`). A global function: the verifier checks it once.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn table_stack_key(ip: u64, sp: u64, bp: u64, id: u64) -> u64 {
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        count(Counter::StackLost);
        return NO_STACK;
    };
    let tgid = id >> 32;
    // The count of mapping updates first: a walk cached under it was made with mappings no
    // newer than those it names.
    // SAFETY: an aligned u64 in a map value; volatile, so it is read before the mappings.
    let maps_changes = MAPS_CHANGES
        .get_ptr(0)
        .map_or(0, |p| unsafe { core::ptr::read_volatile(p) });
    let cache_tag = tgid << 32 | (maps_changes & 0xffff_ffff);
    let reused = reused_walk(ip, sp, bp, cache_tag);
    if reused != 0 {
        return reused;
    }
    // SAFETY: map values, read only.
    let Some((generation, known)) = PROC_MAPS
        .get_ptr(&(tgid as u32))
        .map(|p| unsafe { ((*p).generation, (*p).epoch) })
    else {
        return STACK_STALE;
    };
    let Some(walk) = WALK.get_ptr_mut(0) else {
        count(Counter::StackLost);
        return NO_STACK;
    };
    let tag = tgid << 32 | u64::from(generation);
    // SAFETY: per-CPU values, no other user on this CPU while the program runs.
    unsafe {
        let w = &mut *walk;
        w.pc = ip;
        w.sp = sp;
        w.bp = bp;
        w.sp0 = sp;
        w.win_base = 0;
        w.win_len = 0;
        w.tag = tag;
        w.bp_src = BP_FIRST;
        start_notes(cache_tag, ip, sp, bp, false);
        let ips = &mut (*buf).ips;
        let mut end = unwind_end::TRUNCATED;
        let mut frames = 0;
        for slot in ips.iter_mut() {
            let pc = (*walk).pc;
            *slot = pc;
            frames += 1;
            let step = table_step(id);
            if step != 0 {
                end = step;
                break;
            }
        }
        // The epoch is asked only here: read after the walk, it is at least as new as one
        // read before it, so a stale list is never missed.
        if end == unwind_end::NO_MAPPING
            && known != EXEC_EPOCH.get_ptr(&(tgid as u32)).map_or(0, |p| *p)
        {
            return STACK_STALE;
        }
        if end == unwind_end::RA_ZERO || frames >= MAX_STACK_DEPTH {
            // The zero is no frame; a full buffer has no room for the terminator.
        } else if let Some(next) = ips.get_mut(frames) {
            *next = 0;
        }
        (*buf).end = end;
        let key = store_stack(frames as u64);
        // Walks that end where the rows say (not at a read, a mapping or a table still to
        // come) are kept.
        if key != NO_STACK
            && (end == unwind_end::STOP
                || end == unwind_end::RA_ZERO
                || end == unwind_end::TRUNCATED)
        {
            let _ = keep_walk(key & !STACK_NEW);
        }
        key
    }
}

/// Moves the walk (`WALK`) from its frame to the caller's: 0, or why it cannot (`unwind_end`).
/// A global function: verified once, not at each of the walk's iterations.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn table_step(id: u64) -> u64 {
    let Some(walk) = WALK.get_ptr_mut(0) else {
        return unwind_end::READ;
    };
    // SAFETY: per-CPU value, no other user on this CPU while the program runs.
    let w = unsafe { &mut *walk };
    if w.pc == 0 {
        return unwind_end::RA_ZERO;
    }
    let row = row_for(w.pc, w.tag);
    if row & ROW_ERROR != 0 {
        return row & !ROW_ERROR;
    }
    let cfa_off = ((row >> 32) & 0xffff) * 8;
    let rbp_off8 = ((row >> 48) & 0xff) as u8 as i8;
    let kind = ((row >> 56) & 0xff) as u8;
    let uses_bp = matches!(kind & row_kind::KIND_MASK, row_kind::CFA_RBP | row_kind::FP);
    if uses_bp && w.bp_src == BP_FIRST {
        note_first_bp();
    } else if uses_bp {
        // (`need` ignores `BP_LOST`, which ends the walk below.)
        need(w.bp_src);
    }
    let cfa = match kind & row_kind::KIND_MASK {
        row_kind::STOP => return unwind_end::STOP,
        row_kind::CFA_RSP => w.sp.wrapping_add(cfa_off),
        row_kind::CFA_RBP | row_kind::FP if w.bp_src == BP_LOST => return unwind_end::RBP_LOST,
        row_kind::CFA_RBP => w.bp.wrapping_add(cfa_off),
        row_kind::FP => w.bp.wrapping_add(16),
        _ => return unwind_end::NO_CFI,
    };
    if cfa <= w.sp || cfa.wrapping_sub(w.sp0) > MAX_STACK_SPAN || cfa & 7 != 0 {
        return unwind_end::BAD_CFA;
    }
    // Where the caller's rbp was saved, if the row says.
    let saved_bp = if kind & row_kind::KIND_MASK == row_kind::FP {
        Some(cfa - 16)
    } else if rbp_off8 < 0 {
        Some(cfa.wrapping_sub((-i64::from(rbp_off8) as u64) * 8))
    } else {
        None
    };
    let lo = match saved_bp {
        Some(b) if b < cfa - 8 => b,
        _ => cfa - 8,
    };
    if lo < w.win_base || cfa > w.win_base + w.win_len {
        let len = copy_window(lo, id, u64::from(w.win_len != 0));
        if len < 16 || len > WINDOW_BYTES as u64 || cfa > lo + len {
            return unwind_end::READ;
        }
        w.win_base = lo;
        w.win_len = len;
    }
    let Some(window) = STACK_WINDOW.get_ptr(0) else {
        return unwind_end::READ;
    };
    // The masks keep the verifier's view of the indices small; the comparisons above keep them
    // in the copied part.
    let word = |addr: u64| {
        let i = ((addr - w.win_base) / 8) as usize & (WINDOW_BYTES / 8 - 1);
        // SAFETY: per-CPU value; `i` is within the window.
        unsafe { (*window)[i] }
    };
    // Each word read is noted for `reuse`, in the order of their addresses: the saved rbp
    // lies below the return address, and both above the words of the frames before.
    let ra = word(cfa - 8);
    match saved_bp {
        Some(b) => {
            let v = word(b);
            // A saved rbp decides the walk only if a later row computes from it.
            w.bp_src = note_unneeded(b, v);
            w.bp = v;
        }
        None if kind & row_kind::RBP_LOST != 0 => w.bp_src = BP_LOST,
        None => {}
    }
    note(cfa - 8, ra);
    w.sp = cfa;
    w.pc = ra;
    if ra == 0 {
        return unwind_end::RA_ZERO;
    }
    0
}

/// The row for return address `pc` of the process and mapping generation `tag`, packed as
/// `find_row` returns it, or `ROW_ERROR` with an `unwind_end` value.
#[inline(always)]
fn row_for(pc: u64, tag: u64) -> u64 {
    let slot = ((pc ^ (pc >> 9)) as usize) & (RA_SLOTS - 1);
    let cache = RA_CACHE.get_ptr_mut(0);
    if let Some(cache) = cache {
        // SAFETY: this CPU's value.
        let e = unsafe { &(*cache)[slot] };
        if e.pc == pc && e.tag == tag {
            return e.row;
        }
    }
    let row = proc_row(tag >> 32, pc);
    if row & ROW_ERROR == 0
        && let Some(cache) = cache
    {
        // SAFETY: this CPU's value.
        unsafe {
            (*cache)[slot] = RaEntry { pc, tag, row };
        }
    }
    row
}

/// Per-CPU bounds of `proc_row`'s search (low, high).
#[map]
static SEARCH: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// The row for return address `pc` in process `tgid`'s mappings (`PROC_MAPS`), as `row_for`
/// returns it. A global function: the search among the mappings, whose every path the verifier
/// follows, is verified once here rather than again for each path of `table_step` after it.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn proc_row(tgid: u64, pc: u64) -> u64 {
    let Some(procs) = PROC_MAPS.get_ptr(&(tgid as u32)) else {
        return ROW_ERROR | unwind_end::NO_PROC;
    };
    // SAFETY: a map value, read only.
    let procs = unsafe { &*procs };
    // The instruction before the return address: the call, in the caller's code.
    let q = pc - 1;
    // The last mapping starting at or below `q`. The bounds live in map memory between
    // steps: loaded from there they are values the verifier does not follow one by one, so
    // the paths through the search meet again instead of multiplying at each step.
    let len = (procs.len as usize).min(MAX_EXEC_MAPS);
    let Some(bounds) = SEARCH.get_ptr_mut(0) else {
        return ROW_ERROR | unwind_end::READ;
    };
    // SAFETY: this CPU's value, no other user while the program runs.
    let bounds = unsafe { &mut *bounds };
    bounds[0] = 0;
    bounds[1] = len as u64;
    let mut step = 0;
    while step < MAPS_SEARCH_STEPS + 1 {
        let (lo, hi) = (
            // SAFETY: reads of this CPU's value, volatile so they stay loads from memory.
            unsafe { core::ptr::read_volatile(&bounds[0]) },
            unsafe { core::ptr::read_volatile(&bounds[1]) },
        );
        if hi <= lo + 1 {
            break;
        }
        let mid = (lo + hi) / 2;
        if procs.maps[mid as usize & (MAX_EXEC_MAPS - 1)].start <= q {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(&mut bounds[0], mid) };
        } else {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(&mut bounds[1], mid) };
        }
        step += 1;
    }
    // SAFETY: as above.
    let lo = unsafe { core::ptr::read_volatile(&bounds[0]) } as usize;
    if len == 0 {
        return ROW_ERROR | unwind_end::NO_MAPPING;
    }
    let m = &procs.maps[lo & (MAX_EXEC_MAPS - 1)];
    if q < m.start || q >= m.end {
        return ROW_ERROR | unwind_end::NO_MAPPING;
    }
    if m.flags & MAP_NO_TABLE != 0 {
        return ROW_ERROR | unwind_end::NO_TABLE;
    }
    find_row(u64::from(m.module), q.wrapping_sub(m.bias))
}

/// The row of module `module` in effect at its ELF virtual address `vaddr`, packed: `pc` in
/// bits 0–31, `cfa_off8` 32–47, `rbp_off8` 48–55, `kind` 56–63; or `ROW_ERROR` with an
/// `unwind_end` value. The search covers the rows of `vaddr`'s page and the one in effect at the
/// page's start. A global function.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn find_row(module: u64, vaddr: u64) -> u64 {
    let Some(m) = MODULES.get(module as u32) else {
        return ROW_ERROR | unwind_end::NO_TABLE;
    };
    if m.flags & MODULE_READY == 0 {
        return ROW_ERROR | unwind_end::NO_TABLE;
    }
    if vaddr < m.base {
        return ROW_ERROR | unwind_end::NO_CFI;
    }
    let off = vaddr - m.base;
    let page = off >> UNWIND_PAGE_SHIFT;
    if page >= u64::from(m.idx_len) {
        return ROW_ERROR | unwind_end::NO_CFI;
    }
    let Some(lo0) = idx(u64::from(m.idx_first) + page) else {
        return ROW_ERROR | unwind_end::NO_TABLE;
    };
    let end = u64::from(m.rows_first) + u64::from(m.rows_len);
    let hi0 = if page + 1 < u64::from(m.idx_len) {
        match idx(u64::from(m.idx_first) + page + 1) {
            Some(i) => (i + 1).min(end),
            None => return ROW_ERROR | unwind_end::NO_TABLE,
        }
    } else {
        end
    };
    let (mut lo, mut hi) = (lo0, hi0);
    if hi <= lo {
        return ROW_ERROR | unwind_end::NO_CFI;
    }
    let mut step = 0;
    while step < UNWIND_SEARCH_STEPS + 1 {
        if hi - lo <= 1 {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        let Some(r) = row(mid) else {
            return ROW_ERROR | unwind_end::NO_TABLE;
        };
        if u64::from(r.0) <= off {
            lo = mid;
        } else {
            hi = mid;
        }
        step += 1;
    }
    let Some(r) = row(lo) else {
        return ROW_ERROR | unwind_end::NO_TABLE;
    };
    if u64::from(r.0) > off {
        return ROW_ERROR | unwind_end::NO_CFI;
    }
    r.1
}

/// Page index entry `i`.
#[inline(always)]
fn idx(i: u64) -> Option<u64> {
    let block = UNWIND_IDX.get((i / IDX_PER_BLOCK as u64) as u32)?;
    Some(u64::from(block.first[(i as usize) & (IDX_PER_BLOCK - 1)]))
}

/// Row `i`: its `pc`, and the row packed as `find_row` returns it.
#[inline(always)]
fn row(i: u64) -> Option<(u32, u64)> {
    let block = UNWIND_ROWS.get((i / ROWS_PER_BLOCK as u64) as u32)?;
    let r = block.rows[(i as usize) & (ROWS_PER_BLOCK - 1)];
    Some((
        r.pc,
        u64::from(r.pc)
            | u64::from(r.cfa_off8) << 32
            | u64::from(r.rbp_off8 as u8) << 48
            | u64::from(r.kind) << 56,
    ))
}
