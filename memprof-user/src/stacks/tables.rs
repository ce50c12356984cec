//! Unwind tables for the kernel's walk (`--unwind tables`, the default), built from an ELF
//! file's `.eh_frame` with gimli: per file, the rows the kernel searches (see
//! `memprof_common::tables`) and the page index that bounds each search.
//!
//! Only what return addresses need is kept: CFA = rsp + N or rbp + N, the return address at
//! CFA - 8, the caller's rbp untouched or saved at CFA - 8k, and "the return address is
//! undefined" (the program's `_start`, the child side of `clone`/`clone3`), the outermost frame.
//! Any other rule (PLT stubs, hand-written assembly with DWARF expressions, signal frames) is
//! a row the walk stops at. A file without `.eh_frame` gets one row: frame pointers.

use anyhow::{Result, bail};
use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, LittleEndian, RegisterRule, UnwindContext,
    UnwindSection as _, X86_64,
};
use std::collections::HashMap;

use memprof_common::{UNWIND_PAGE_SHIFT, UNWIND_SEARCH_STEPS, UnwindRow, row_kind};
use object::{Object as _, ObjectSection as _};

use crate::{
    probe::tables::KernelTables,
    sys::objfile::{MAX_OBJECT_BYTES, ObjectFile},
};

/// A file's table: rows with `pc` relative to `base`, and for each page of `1 <<
/// UNWIND_PAGE_SHIFT` bytes from `base`, the index of the row in effect at its start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub base: u64,
    pub rows: Vec<UnwindRow>,
    pub index: Vec<u32>,
    /// The file has no CFI: its one row says frame pointers.
    pub frame_pointers: bool,
}

/// Most bytes of entry-point code without CFI taken as the process's first frame.
const MAX_ENTRY_CODE: u64 = 4096;

/// The largest `.eh_frame` read (the largest real ones are tens of MiB).
const MAX_EH_FRAME: u64 = 256 << 20;

/// Most rows a table may have (the kernel's row offsets are 32-bit, and a file this large is
/// not plausible).
const MAX_ROWS: usize = 4 << 20;

impl Table {
    /// The table of the ELF file `data`.
    pub fn build(data: &[u8]) -> Result<Self> {
        Self::parse(&object::File::parse(data)?)
    }

    /// The table of a parsed ELF file (read through any `ReadRef`: only the headers and
    /// `.eh_frame` are read).
    pub fn parse<'d, R: object::ReadRef<'d>>(file: &object::File<'d, R>) -> Result<Self> {
        let Some(eh) = file.section_by_name(".eh_frame") else {
            return frame_pointer_table(file);
        };
        if eh.size() > MAX_EH_FRAME {
            bail!(".eh_frame of {} bytes", eh.size());
        }
        let section = |name: &str| file.section_by_name(name).map_or(0, |s| s.address());
        let bases = BaseAddresses::default()
            .set_eh_frame(eh.address())
            .set_text(section(".text"))
            .set_got(section(".got"));
        let eh_frame = EhFrame::new(eh.data()?, LittleEndian);
        let mut ctx = Box::new(UnwindContext::new());
        // (ELF virtual address, row), an invalid row marking each FDE's end.
        let mut raw: Vec<(u64, UnwindRow)> = Vec::new();
        // Address ranges the FDEs cover, for the entry point's row below.
        let mut covered: Vec<(u64, u64)> = Vec::new();
        let mut entries = eh_frame.entries(&bases);
        while let Some(entry) = entries.next()? {
            let CieOrFde::Fde(partial) = entry else {
                continue;
            };
            let Ok(fde) = partial.parse(EhFrame::cie_from_offset) else {
                continue;
            };
            // Zero-address FDEs are left behind by linkers for discarded code.
            if fde.initial_address() == 0 {
                continue;
            }
            let signal = fde.is_signal_trampoline();
            let mut rows = fde.rows(&eh_frame, &bases, &mut ctx)?;
            while let Some(r) = rows.next_row()? {
                raw.push((r.start_address(), convert(r, signal)));
            }
            raw.push((fde.end_address(), UnwindRow::default()));
            covered.push((fde.initial_address(), fde.end_address()));
            if raw.len() > MAX_ROWS {
                bail!("more than {MAX_ROWS} unwind rows");
            }
        }
        if raw.is_empty() {
            return frame_pointer_table(file);
        }
        // The file's entry point without CFI (the dynamic loader's `_start` and
        // `_dl_start_user`, which run the libraries' initializers): the process's first frame,
        // with no caller, up to the next FDE.
        let entry = file.entry();
        if entry != 0 && !covered.iter().any(|&(lo, hi)| lo <= entry && entry < hi) {
            let next = covered
                .iter()
                .map(|&(lo, _)| lo)
                .filter(|&lo| lo > entry)
                .min()
                .unwrap_or(u64::MAX)
                .min(entry + MAX_ENTRY_CODE);
            let stop = UnwindRow {
                kind: row_kind::STOP,
                ..UnwindRow::default()
            };
            raw.push((entry, stop));
            raw.push((next, UnwindRow::default()));
        }
        // Stable: at one address an FDE's own row comes after the previous FDE's end marker,
        // and replaces it.
        raw.sort_by_key(|(pc, _)| *pc);
        let mut rows: Vec<(u64, UnwindRow)> = Vec::with_capacity(raw.len());
        for (pc, r) in raw {
            match rows.last_mut() {
                Some(last) if last.0 == pc => {
                    if last.1.kind == row_kind::INVALID {
                        last.1 = r;
                    }
                }
                Some(last) if same_rule(&last.1, &r) => {}
                _ => rows.push((pc, r)),
            }
        }
        Self::from_rows(rows, false)
    }

    /// The table of `rows` (ELF virtual address, rule), sorted, with the page index.
    fn from_rows(rows: Vec<(u64, UnwindRow)>, frame_pointers: bool) -> Result<Self> {
        let page = 1u64 << UNWIND_PAGE_SHIFT;
        let base = rows.first().map_or(0, |r| r.0) & !(page - 1);
        let last = rows.last().map_or(base, |r| r.0);
        let pages = ((last - base) >> UNWIND_PAGE_SHIFT) as usize + 1;
        let mut index = Vec::with_capacity(pages);
        let mut i = 0usize;
        for p in 0..pages as u64 {
            let start = base + (p << UNWIND_PAGE_SHIFT);
            while i + 1 < rows.len() && rows[i + 1].0 <= start {
                i += 1;
            }
            index.push(i as u32);
        }
        // The kernel searches one page's rows in at most UNWIND_SEARCH_STEPS halvings.
        for p in 0..pages {
            let lo = index[p] as usize;
            let hi = index.get(p + 1).map_or(rows.len(), |&n| n as usize + 1);
            if hi - lo > 1 << UNWIND_SEARCH_STEPS {
                bail!("{} unwind rows in one page", hi - lo);
            }
        }
        let rows = rows
            .into_iter()
            .map(|(pc, mut r)| {
                r.pc = (pc - base) as u32;
                r
            })
            .collect();
        Ok(Self {
            base,
            rows,
            index,
            frame_pointers,
        })
    }

    /// The row in effect at ELF virtual address `vaddr`, as the kernel finds it.
    pub fn row(&self, vaddr: u64) -> Option<UnwindRow> {
        let off = vaddr.checked_sub(self.base)?;
        let page = (off >> UNWIND_PAGE_SHIFT) as usize;
        let lo = *self.index.get(page)? as usize;
        let hi = self
            .index
            .get(page + 1)
            .map_or(self.rows.len(), |&n| n as usize + 1);
        let rows = self.rows.get(lo..hi)?;
        let n = rows.partition_point(|r| u64::from(r.pc) <= off);
        n.checked_sub(1).map(|i| rows[i])
    }
}

/// One frame-pointer row over the file's first executable segment.
fn frame_pointer_table<'d, R: object::ReadRef<'d>>(file: &object::File<'d, R>) -> Result<Table> {
    let Some(text) = file
        .sections()
        .filter(|s| s.kind() == object::SectionKind::Text)
        .map(|s| s.address())
        .min()
    else {
        bail!("no code");
    };
    let row = UnwindRow {
        pc: 0,
        cfa_off8: 2,
        rbp_off8: -2,
        kind: row_kind::FP,
    };
    Table::from_rows(vec![(text, row)], true)
}

/// Whether two rows apply the same rule.
fn same_rule(a: &UnwindRow, b: &UnwindRow) -> bool {
    (a.cfa_off8, a.rbp_off8, a.kind) == (b.cfa_off8, b.rbp_off8, b.kind)
}

/// A gimli row in the kernel's terms.
fn convert<T: gimli::ReaderOffset, S: gimli::UnwindContextStorage<T>>(
    r: &gimli::UnwindTableRow<T, S>,
    signal: bool,
) -> UnwindRow {
    let invalid = UnwindRow::default();
    if signal {
        return invalid;
    }
    match r.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => {
            return UnwindRow {
                kind: row_kind::STOP,
                ..invalid
            };
        }
        None | Some(RegisterRule::Offset(-8)) => {}
        _ => return invalid,
    }
    let (kind, offset) = match *r.cfa() {
        CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RSP => {
            (row_kind::CFA_RSP, offset)
        }
        CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RBP => {
            (row_kind::CFA_RBP, offset)
        }
        _ => return invalid,
    };
    if offset < 8 || offset % 8 != 0 || offset / 8 > i64::from(u16::MAX) {
        return invalid;
    }
    let (rbp_off8, lost) = match r.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue) => (0, false),
        Some(RegisterRule::Offset(o)) if o < 0 && o % 8 == 0 && o >= -8 * 128 => {
            ((o / 8) as i8, false)
        }
        _ => (0, true),
    };
    UnwindRow {
        pc: 0,
        cfa_off8: (offset / 8) as u16,
        rbp_off8,
        kind: kind | if lost { row_kind::RBP_LOST } else { 0 },
    }
}

/// Tables built and uploaded, by file (device, inode): the module id and the file's segments
/// (file offset, size, virtual address) to compute each mapping's load bias.
#[derive(Default)]
pub struct TableFiles {
    files: HashMap<(u64, u64), Option<FileTable>>,
}

#[derive(Clone, Debug)]
struct FileTable {
    module: Option<u32>,
    segments: Vec<(u64, u64, u64)>,
}

impl TableFiles {
    /// The module of the file `id`, building its table from the file `open()` gives the first
    /// time; and the load bias of its mapping starting at `start` with file offset `offset`.
    /// None when the file cannot be read or parsed.
    pub fn mapping(
        &mut self,
        tables: &mut KernelTables,
        id: (u64, u64),
        start: u64,
        offset: u64,
        open: impl FnOnce() -> Option<std::fs::File>,
    ) -> Option<(Option<u32>, u64)> {
        let entry = self.files.entry(id).or_insert_with(|| {
            // Bounded reads of the headers and `.eh_frame` only (the file is the traced
            // program's).
            let data = ObjectFile::from_file(open()?, String::new(), MAX_OBJECT_BYTES).ok()?;
            let file = object::File::parse(&data).ok()?;
            let segments = segments(&file);
            let module = match Table::parse(&file) {
                Ok(table) => tables.upload(table.base, &table.rows, &table.index),
                Err(_) => {
                    tables.counts.refuse();
                    None
                }
            };
            Some(FileTable { module, segments })
        });
        let file = entry.as_ref()?;
        let bias = file.segments.iter().find_map(|&(off, size, vaddr)| {
            (off <= offset && offset < off + size.max(1))
                .then(|| start.wrapping_sub(vaddr + (offset - off)))
        })?;
        Some((file.module, bias))
    }
}

/// The loadable segments of an ELF file: (file offset, file size, virtual address).
fn segments<'d, R: object::ReadRef<'d>>(file: &object::File<'d, R>) -> Vec<(u64, u64, u64)> {
    use object::ObjectSegment as _;
    file.segments()
        .map(|s| {
            let (off, size) = s.file_range();
            (off, size, s.address())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: u8, cfa_off8: u16, rbp_off8: i8) -> UnwindRow {
        UnwindRow {
            pc: 0,
            cfa_off8,
            rbp_off8,
            kind,
        }
    }

    #[test]
    fn pages_bound_the_search() {
        let rows = vec![
            (0x1010, row(row_kind::CFA_RSP, 1, 0)),
            (0x1014, row(row_kind::CFA_RSP, 2, 0)),
            (0x1800, row(row_kind::CFA_RBP, 2, -2)),
            (0x2400, row(row_kind::INVALID, 0, 0)),
        ];
        let t = Table::from_rows(rows, false).unwrap();
        assert_eq!(t.base, 0x1000);
        // 1 KiB pages from 0x1000 to 0x2400.
        assert_eq!(t.index, [0, 1, 2, 2, 2, 3]);
        assert_eq!(t.row(0x1000), None, "before the first row");
        assert_eq!(t.row(0x1012).map(|r| r.cfa_off8), Some(1));
        assert_eq!(t.row(0x1500).map(|r| r.cfa_off8), Some(2));
        assert_eq!(t.row(0x1c00).map(|r| r.kind), Some(row_kind::CFA_RBP));
        assert_eq!(t.row(0x2500).map(|r| r.kind), Some(row_kind::INVALID));
        assert_eq!(t.rows[2].pc, 0x800);
    }

    /// This test binary's own table: its entry (`_start`) has a row saying the return address
    /// is undefined, and the function running this test a row with a CFA.
    #[test]
    fn own_executable_has_an_entry_row() {
        let data = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let t = Table::build(&data).unwrap();
        assert!(!t.frame_pointers);
        assert!(t.rows.len() > 1000, "{} rows", t.rows.len());
        let file = object::File::parse(&*data).unwrap();
        let entry = file.entry();
        assert_eq!(
            t.row(entry).map(|r| r.kind & row_kind::KIND_MASK),
            Some(row_kind::STOP)
        );
        let here = own_executable_has_an_entry_row as fn() as usize as u64;
        let text_bias = {
            let maps = crate::sys::maps::AddressSpace::read(std::process::id()).unwrap();
            let exe = std::env::current_exe().unwrap();
            let m = maps
                .mappings()
                .iter()
                .find(|m| m.exec && std::path::Path::new(&m.path) == exe)
                .unwrap()
                .clone();
            segments(&object::File::parse(&data[..]).unwrap())
                .into_iter()
                .find_map(|(off, size, vaddr)| {
                    (off <= m.offset && m.offset < off + size)
                        .then(|| m.start - (vaddr + m.offset - off))
                })
                .unwrap()
        };
        let kind = t
            .row(here - text_bias + 1)
            .map(|r| r.kind & row_kind::KIND_MASK);
        assert!(
            matches!(kind, Some(row_kind::CFA_RSP | row_kind::CFA_RBP)),
            "{kind:?}"
        );
    }

    /// The dynamic loader's entry (`_start`, then `_dl_start_user`, which calls the libraries'
    /// initializers) is the outermost frame, with or without CFI of its own.
    #[test]
    fn the_loaders_entry_ends_the_walk() {
        use object::Object as _;
        let data = std::fs::read("/lib64/ld-linux-x86-64.so.2").unwrap();
        let entry = object::File::parse(&data[..]).unwrap().entry();
        let t = Table::build(&data).unwrap();
        for at in [entry, entry + 0x30] {
            let kind = t.row(at).map(|r| r.kind & row_kind::KIND_MASK);
            assert_eq!(kind, Some(row_kind::STOP), "at {at:#x}");
        }
    }
}
