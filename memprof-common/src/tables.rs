//! Unwind tables the kernel walks stacks with (`unwind::TABLES`), built by the agent from each
//! ELF file's `.eh_frame`: per file a sorted run of rows, each the rule in effect from its
//! address to the next row's (the caller's frame address, CFA, from the stack or frame pointer,
//! where the caller's frame pointer was saved), a page index that keeps a search within one
//! page's rows, and per process the sorted list of its executable mappings.
//!
//! The rows hold what return addresses need and nothing else: x86-64 code compiled by GCC or
//! Clang has, at every call site, CFA = rsp + N or rbp + N, the return address at CFA - 8 and
//! the caller's rbp either untouched or saved at CFA - 8k. A row that says the return address
//! is undefined (`_start`, the child side of `clone`/`clone3`) is the outermost frame.

/// Bytes of module text per page of the index (`1 << UNWIND_PAGE_SHIFT`).
pub const UNWIND_PAGE_SHIFT: u32 = 10;
/// Steps of the search within a page: a page holds at most `1 << UNWIND_SEARCH_STEPS` rows
/// (the builder refuses a file with more).
pub const UNWIND_SEARCH_STEPS: usize = 9;
/// Rows per element of the rows array.
pub const ROWS_PER_BLOCK: usize = 64;
/// Page index entries per element of the index array.
pub const IDX_PER_BLOCK: usize = 128;
/// Executable mappings kept per process, sorted by address.
pub const MAX_EXEC_MAPS: usize = 256;
/// Steps of the search among a process's mappings (`1 << MAPS_SEARCH_STEPS` = `MAX_EXEC_MAPS`).
pub const MAPS_SEARCH_STEPS: usize = 8;
/// Modules (ELF files with a table) at most.
pub const MAX_MODULES: u32 = 4096;
/// Default sizes of the rows and index arrays, in elements: 524 288 rows (4 MiB), 131 072 pages
/// (128 MiB of text).
pub const DEFAULT_ROW_BLOCKS: u32 = 8192;
pub const DEFAULT_IDX_BLOCKS: u32 = 1024;

/// Kinds of rows.
pub mod row_kind {
    /// No rule the walk can follow (no CFI, a rule on another register or an expression).
    pub const INVALID: u8 = 0;
    /// CFA = rsp + 8 × `cfa_off8`.
    pub const CFA_RSP: u8 = 1;
    /// CFA = rbp + 8 × `cfa_off8`.
    pub const CFA_RBP: u8 = 2;
    /// The return address is undefined: the outermost frame.
    pub const STOP: u8 = 3;
    /// A file without CFI: frame pointers (CFA = rbp + 16, rbp saved at CFA - 16).
    pub const FP: u8 = 5;
    pub const KIND_MASK: u8 = 0x0f;
    /// The caller's rbp is in a place the table does not describe: it is lost past this frame.
    pub const RBP_LOST: u8 = 0x10;
}

/// One row: the rule in effect from `pc` (an offset from the module's `base`) up to the next
/// row's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    pub pc: u32,
    /// CFA offset from the base register, in 8-byte units.
    pub cfa_off8: u16,
    /// When nonzero: the caller's rbp is saved at CFA + 8 × `rbp_off8`.
    pub rbp_off8: i8,
    /// `row_kind`, with `RBP_LOST` possibly set.
    pub kind: u8,
}

/// An element of the rows array.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RowBlock {
    pub rows: [UnwindRow; ROWS_PER_BLOCK],
}

/// An element of the page index: for each page, the absolute index of the row in effect at the
/// page's start (or the module's first row).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IdxBlock {
    pub first: [u32; IDX_PER_BLOCK],
}

/// `ModuleInfo::flags`: the rows and index are written.
pub const MODULE_READY: u32 = 1;

/// Where one file's rows and page index are.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModuleInfo {
    /// ELF virtual address of the module's first page.
    pub base: u64,
    pub rows_first: u32,
    pub rows_len: u32,
    pub idx_first: u32,
    pub idx_len: u32,
    pub flags: u32,
    pub _pad: u32,
}

/// `ExecMap::flags`: the file's table is not there (not built yet, or no room): a frame in it
/// ends the walk.
pub const MAP_NO_TABLE: u32 = 1;

/// One executable file mapping of a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecMap {
    pub start: u64,
    pub end: u64,
    /// Runtime address minus ELF virtual address.
    pub bias: u64,
    pub module: u32,
    pub flags: u32,
}

/// A process's executable mappings, sorted by `start`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcMaps {
    pub len: u32,
    /// Changes with every rewrite (the kernel's cache of rows by return address is tagged with
    /// it).
    pub generation: u32,
    /// The process's `EXEC_EPOCH` when the agent read the mappings: a walk of a process whose
    /// epoch moved on since may meet code the list does not hold yet.
    pub epoch: u64,
    pub maps: [ExecMap; MAX_EXEC_MAPS],
}

/// Why a table walk stopped; kept with the stack (`StackTrace::end`).
pub mod unwind_end {
    /// Not walked with tables (frame pointers, the kernel's walker).
    pub const NONE: u64 = 0;
    /// A row said the return address is undefined: the program's or thread's entry.
    pub const STOP: u64 = 1;
    /// A zero return address (an entry without CFI).
    pub const RA_ZERO: u64 = 2;
    /// `MAX_STACK_DEPTH` frames.
    pub const TRUNCATED: u64 = 3;
    /// An address in no executable mapping memprof knows of for the process.
    pub const NO_MAPPING: u64 = 4;
    /// The file's table is not there.
    pub const NO_TABLE: u64 = 5;
    /// No rule for the address.
    pub const NO_CFI: u64 = 6;
    /// A frame address below the previous one, or too far above.
    pub const BAD_CFA: u64 = 7;
    /// Reading the stack failed.
    pub const READ: u64 = 8;
    /// A frame's rule needs an rbp an earlier frame lost.
    pub const RBP_LOST: u64 = 9;
    /// The process's mappings were not known yet: frame pointers instead.
    pub const NO_PROC: u64 = 10;
    /// Code mapped after the agent last wrote the process's mappings: the kernel sent a stack
    /// copy instead and the agent unwound it, to the outermost frame.
    pub const AGENT: u64 = 11;
    /// As `AGENT`, but the agent's unwind stopped early.
    pub const AGENT_STOPPED: u64 = 12;
    /// Names, by value.
    pub const NAMES: [&str; 13] = [
        "none",
        "entry",
        "zero return address",
        "truncated",
        "no mapping",
        "no table",
        "no rule",
        "bad frame address",
        "read failed",
        "frame pointer lost",
        "mappings unknown",
        "entry (copy unwound by the agent)",
        "copy unwound by the agent, stopped early",
    ];
}
