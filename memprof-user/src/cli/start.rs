//! The start record of `memprof trace --json`: what is probed, where and why.

use serde::Serialize;

/// The start record of the NDJSON stream.
#[derive(Serialize)]
pub(super) struct Start<'a> {
    #[serde(rename = "type")]
    pub(super) record: &'static str,
    pub(super) pid: u32,
    pub(super) command: Option<&'a [String]>,
    /// The main allocator object.
    pub(super) library: String,
    /// Functions probed in any object.
    pub(super) probes: &'a [String],
    pub(super) missing: &'a [String],
    pub(super) aliases: Vec<[&'a str; 2]>,
    /// The main allocator's entry probes placed past a function's first instruction.
    pub(super) placed: std::collections::BTreeMap<&'a str, u64>,
    /// Every allocator object probed, the main one first.
    pub(super) allocators: Vec<StartAllocator<'a>>,
    /// How probes are attached: `multi` (multi-uprobe links) or `classic`.
    pub(super) links: &'static str,
}

/// One allocator object of the start record.
#[derive(Serialize)]
pub(super) struct StartAllocator<'a> {
    pub(super) path: &'a str,
    pub(super) kind: &'static str,
    /// The allocator is linked into the executable.
    #[serde(rename = "static")]
    pub(super) in_executable: bool,
    pub(super) probes: &'a [String],
    pub(super) aliases: Vec<[&'a str; 2]>,
    /// Free-like functions not probed because they hand the block to a probed one.
    pub(super) forwards: Vec<[&'a str; 2]>,
    pub(super) placed: std::collections::BTreeMap<&'a str, u64>,
    /// Where each entry probe sits and why.
    pub(super) placements: Vec<StartPlacement<'a>>,
}

/// One entry probe's place in its function.
#[derive(Serialize)]
pub(super) struct StartPlacement<'a> {
    pub(super) function: &'a str,
    pub(super) offset: u64,
    pub(super) why: &'a str,
}

pub(super) fn pairs(v: &[(String, String)]) -> Vec<[&str; 2]> {
    v.iter().map(|(a, b)| [a.as_str(), b.as_str()]).collect()
}

pub(super) fn offsets(v: &[(String, u64)]) -> std::collections::BTreeMap<&str, u64> {
    v.iter().map(|(f, off)| (f.as_str(), *off)).collect()
}
