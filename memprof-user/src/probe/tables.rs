//! The unwind tables in the kernel's maps (`--unwind tables`): each file's rows and page
//! index, uploaded once and shared by every process mapping the file, and each process's list
//! of executable mappings, rewritten when its mappings change.
//!
//! Space is handed out in whole array elements, each file from an element boundary, and never
//! reused (a file's rows stay valid for the whole trace); a file that does not fit gets no
//! table, and frames in it end their walk (`unwind_end::NO_TABLE`, counted).

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap as AyaHashMap, MapData},
};
use memprof_common::{
    ExecMap, IDX_PER_BLOCK, IdxBlock, MAX_EXEC_MAPS, MAX_MODULES, MODULE_READY, ModuleInfo,
    ProcMaps, ROWS_PER_BLOCK, RowBlock, UnwindRow,
};

/// What the tables hold, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableCounts {
    /// Files with a table in the kernel.
    pub modules: u64,
    pub rows: u64,
    /// Files that got none: no room left, or no table could be built.
    pub refused: u64,
    /// Processes whose mappings found no room in the kernel (their allocations go out with
    /// stack copies).
    pub procs_refused: u64,
}

impl TableCounts {
    /// A file whose table could not be built.
    pub fn refuse(&mut self) {
        self.refused += 1;
    }
}

pub struct KernelTables {
    rows: Array<MapData, RowBlock>,
    idx: Array<MapData, IdxBlock>,
    modules: Array<MapData, ModuleInfo>,
    procs: AyaHashMap<MapData, u32, ProcMaps>,
    epochs: AyaHashMap<MapData, u32, u64>,
    changes_map: Array<MapData, u64>,
    changes: u64,
    row_blocks: u32,
    idx_blocks: u32,
    next_row_block: u32,
    next_idx_block: u32,
    next_module: u32,
    generation: u32,
    pub counts: TableCounts,
}

impl KernelTables {
    /// Takes the tables' maps out of `ebpf` (sized at load: `row_blocks` and `idx_blocks`
    /// elements).
    pub fn new(ebpf: &mut Ebpf, row_blocks: u32, idx_blocks: u32) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("the eBPF object has no map {name}"))
        };
        Ok(Self {
            rows: Array::try_from(take("UNWIND_ROWS")?)?,
            idx: Array::try_from(take("UNWIND_IDX")?)?,
            modules: Array::try_from(take("MODULES")?)?,
            procs: AyaHashMap::try_from(take("PROC_MAPS")?)?,
            epochs: AyaHashMap::try_from(take("EXEC_EPOCH")?)?,
            changes_map: Array::try_from(take("MAPS_CHANGES")?)?,
            changes: 0,
            row_blocks,
            idx_blocks,
            next_row_block: 0,
            next_idx_block: 0,
            next_module: 0,
            generation: 0,
            counts: TableCounts::default(),
        })
    }

    /// Uploads a file's table (its `base`, `rows` relative to it, and page `index` of row
    /// numbers); its module id, or None when there is no room left.
    pub fn upload(&mut self, base: u64, rows: &[UnwindRow], index: &[u32]) -> Option<u32> {
        let row_need = rows.len().div_ceil(ROWS_PER_BLOCK) as u32;
        let idx_need = index.len().div_ceil(IDX_PER_BLOCK) as u32;
        if self.next_module >= MAX_MODULES
            || self.next_row_block + row_need > self.row_blocks
            || self.next_idx_block + idx_need > self.idx_blocks
        {
            self.counts.refused += 1;
            return None;
        }
        let (row0, idx0) = (self.next_row_block, self.next_idx_block);
        let rows_first = row0 * ROWS_PER_BLOCK as u32;
        for (k, chunk) in rows.chunks(ROWS_PER_BLOCK).enumerate() {
            let mut block = RowBlock {
                rows: [UnwindRow::default(); ROWS_PER_BLOCK],
            };
            block.rows[..chunk.len()].copy_from_slice(chunk);
            if self.rows.set(row0 + k as u32, &block, 0).is_err() {
                self.counts.refused += 1;
                return None;
            }
        }
        for (k, chunk) in index.chunks(IDX_PER_BLOCK).enumerate() {
            let mut block = IdxBlock {
                first: [0; IDX_PER_BLOCK],
            };
            for (slot, i) in block.first.iter_mut().zip(chunk) {
                *slot = rows_first + i;
            }
            if self.idx.set(idx0 + k as u32, &block, 0).is_err() {
                self.counts.refused += 1;
                return None;
            }
        }
        let id = self.next_module;
        let info = ModuleInfo {
            base,
            rows_first,
            rows_len: rows.len() as u32,
            idx_first: idx0 * IDX_PER_BLOCK as u32,
            idx_len: index.len() as u32,
            // Written last: the kernel uses the rows only once the module says they are there.
            flags: MODULE_READY,
            _pad: 0,
        };
        if self.modules.set(id, &info, 0).is_err() {
            self.counts.refused += 1;
            return None;
        }
        self.next_module += 1;
        self.next_row_block += row_need;
        self.next_idx_block += idx_need;
        self.counts.modules += 1;
        self.counts.rows += rows.len() as u64;
        Some(id)
    }

    /// Process `tgid`'s epoch: when it last exec'd or mapped code (0: not since the trace
    /// began). Read it before the mappings, and hand it to `set_process` with them.
    pub fn epoch(&self, tgid: u32) -> u64 {
        self.epochs.get(&tgid, 0).unwrap_or(0)
    }

    /// Sets process `tgid`'s executable mappings, as read after its epoch was `epoch` (sorted
    /// here; beyond `MAX_EXEC_MAPS`, the rest are left out and frames in them end the walk).
    pub fn set_process(&mut self, tgid: u32, maps: &[ExecMap], epoch: u64) {
        let mut sorted: Vec<ExecMap> = maps.to_vec();
        sorted.sort_by_key(|m| m.start);
        sorted.truncate(MAX_EXEC_MAPS);
        self.generation = self.generation.wrapping_add(1);
        let mut value = ProcMaps {
            len: sorted.len() as u32,
            generation: self.generation,
            epoch,
            maps: [ExecMap::default(); MAX_EXEC_MAPS],
        };
        value.maps[..sorted.len()].copy_from_slice(&sorted);
        if self.procs.insert(&tgid, &value, 0).is_err() {
            self.counts.procs_refused += 1;
        }
        self.count_change();
    }

    /// Forgets process `tgid` (it exited).
    pub fn forget_process(&mut self, tgid: u32) {
        let _ = self.procs.remove(&tgid);
        let _ = self.epochs.remove(&tgid);
        self.count_change();
    }

    /// Tells the kernel's cache of whole walks that `PROC_MAPS` changed (after the change:
    /// a walk cached under the old count is done again).
    fn count_change(&mut self) {
        self.changes = self.changes.wrapping_add(1);
        let _ = self.changes_map.set(0, &self.changes, 0);
    }
}
