//! Comparison of two saved reports (`memprof diff A B`): how total outstanding memory and each
//! call site's outstanding bytes changed between two traces, like `tracemalloc`'s `compare_to`
//! but for all native memory.
//!
//! This module owns matching call sites across reports and the CI growth gate; loading a saved
//! report is `report::saved`'s, the text is `output::text`'s. It works on `serde_json::Value`s, so reports written by other memprof
//! versions load as long as they carry the fields used here.
//!
//! A call site's identity is the allocator, the kind and, per frame, its name as every output
//! writes it (`report::names::frame_name`): the function, or for a frame nothing named the
//! module's file name and the frame's offset in it (`libz.so.1+0x2f10`, the same in every
//! run). Reports of memprof versions that wrote absolute addresses (`addr`, which change with
//! every run) instead of `offset` give such frames the module's file name followed by `?`. An
//! address in no module is `?`. Groups of one report sharing an identity are merged.

use std::{cmp::Reverse, collections::HashMap};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Serialize;
use serde_json::Value;

/// One call site's change between two reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SiteDelta {
    /// `new` (only after), `gone` (only before), `grew`, `shrank` or `same` (by bytes).
    pub status: &'static str,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub delta_bytes: i64,
    pub allocs_before: u64,
    pub allocs_after: u64,
    pub delta_allocs: i64,
    pub allocator: String,
    pub kind: String,
    /// Frame labels, innermost first: the function name, or `module?` when it is unknown.
    pub stack: Vec<String>,
}

/// The change between two reports (`"type":"diff"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diff {
    #[serde(rename = "type")]
    pub record: &'static str,
    /// `totals.outstanding_bytes` (malloc family) of the first report.
    pub outstanding_bytes_before: u64,
    /// `totals.outstanding_bytes` (malloc family) of the second report.
    pub outstanding_bytes_after: u64,
    pub delta_bytes: i64,
    /// `delta_bytes` in percent of `outstanding_bytes_before`; `None` when that is 0.
    pub growth_pct: Option<f64>,
    /// Change of `mmap.outstanding_bytes` (anonymous mappings outside malloc).
    pub mmap_delta_bytes: i64,
    /// Sorted by `delta_bytes`, largest growth first, then by stack, allocator and kind.
    pub sites: Vec<SiteDelta>,
}

/// Compares two reports (or snapshots): `before` is the baseline, `after` the new run.
pub fn diff(before: &Value, after: &Value) -> Result<Diff> {
    let b = Parsed::new(before).context("first report")?;
    let a = Parsed::new(after).context("second report")?;

    let mut keys: Vec<&SiteKey> = b.sites.keys().chain(a.sites.keys()).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut sites: Vec<SiteDelta> = keys
        .into_iter()
        .map(|key| {
            let before = b.sites.get(key);
            let after = a.sites.get(key);
            let (bytes_before, allocs_before) = before.copied().unwrap_or_default();
            let (bytes_after, allocs_after) = after.copied().unwrap_or_default();
            let delta_bytes = delta(bytes_before, bytes_after);
            let status = match (before, after) {
                (None, _) => "new",
                (_, None) => "gone",
                _ if delta_bytes > 0 => "grew",
                _ if delta_bytes < 0 => "shrank",
                _ => "same",
            };
            SiteDelta {
                status,
                bytes_before,
                bytes_after,
                delta_bytes,
                allocs_before,
                allocs_after,
                delta_allocs: delta(allocs_before, allocs_after),
                allocator: key.allocator.clone(),
                kind: key.kind.clone(),
                stack: key.stack.clone(),
            }
        })
        .collect();
    // Keys were sorted by (stack, allocator, kind) above; the stable sort keeps that as the
    // tie-break.
    sites.sort_by_key(|s| Reverse(s.delta_bytes));

    let delta_bytes = delta(b.outstanding_bytes, a.outstanding_bytes);
    Ok(Diff {
        record: "diff",
        outstanding_bytes_before: b.outstanding_bytes,
        outstanding_bytes_after: a.outstanding_bytes,
        delta_bytes,
        growth_pct: (b.outstanding_bytes != 0)
            .then(|| delta_bytes as f64 * 100.0 / b.outstanding_bytes as f64),
        mmap_delta_bytes: delta(b.mmap_outstanding_bytes, a.mmap_outstanding_bytes),
        sites,
    })
}

/// CI gate: true when total outstanding bytes grew by more than `pct` percent (before 0 and
/// after > 0 counts as growth beyond any pct).
///
/// Computed from the byte counts, not from the rounded-off `growth_pct`: growth of exactly
/// `pct` percent passes.
pub fn grows_beyond(d: &Diff, pct: f64) -> bool {
    if d.outstanding_bytes_before == 0 {
        return d.outstanding_bytes_after > 0;
    }
    d.delta_bytes as f64 * 100.0 > pct * d.outstanding_bytes_before as f64
}

/// `after - before`, clamped to the range of `i64`.
fn delta(before: u64, after: u64) -> i64 {
    let d = i128::from(after) - i128::from(before);
    i64::try_from(d).unwrap_or(if d > 0 { i64::MAX } else { i64::MIN })
}

/// A call site's identity across reports.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct SiteKey {
    stack: Vec<String>,
    allocator: String,
    kind: String,
}

/// The parts of a report a diff uses.
struct Parsed {
    outstanding_bytes: u64,
    mmap_outstanding_bytes: u64,
    /// (bytes, allocs) per site, groups sharing an identity summed.
    sites: HashMap<SiteKey, (u64, u64)>,
}

impl Parsed {
    fn new(v: &Value) -> Result<Self> {
        match v.get("type").and_then(Value::as_str) {
            Some("report" | "snapshot") => {}
            other => bail!(
                "not a memprof report or snapshot (\"type\" is {})",
                other.map_or("missing".to_string(), |t| format!("{t:?}"))
            ),
        }
        let mut sites: HashMap<SiteKey, (u64, u64)> = HashMap::new();
        let leaks = v
            .get("leaks")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("no \"leaks\" array"))?;
        for (i, leak) in leaks.iter().enumerate() {
            let (key, bytes, allocs) = site(leak).with_context(|| format!("leaks[{i}]"))?;
            let entry = sites.entry(key).or_default();
            entry.0 = entry.0.saturating_add(bytes);
            entry.1 = entry.1.saturating_add(allocs);
        }
        Ok(Self {
            outstanding_bytes: u64_at(v, "/totals/outstanding_bytes")?,
            mmap_outstanding_bytes: u64_at(v, "/mmap/outstanding_bytes")?,
            sites,
        })
    }
}

fn site(leak: &Value) -> Result<(SiteKey, u64, u64)> {
    let str_at = |key: &str| {
        leak.get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no string \"{key}\""))
    };
    let stack = leak
        .get("stack")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("no \"stack\" array"))?
        .iter()
        .map(frame_label)
        .collect();
    let key = SiteKey {
        stack,
        allocator: str_at("allocator")?,
        kind: str_at("kind")?,
    };
    Ok((key, u64_at(leak, "/bytes")?, u64_at(leak, "/allocs")?))
}

/// `function`; else the module's file name and the frame's `offset` (`module+0x...`), or `?`
/// without one (older reports); else `?`.
fn frame_label(frame: &Value) -> String {
    if let Some(function) = frame.get("function").and_then(Value::as_str) {
        return function.to_string();
    }
    let offset = frame.get("offset").and_then(Value::as_str);
    match frame.get("module").and_then(Value::as_str) {
        Some(module) => {
            let module = module.rsplit('/').next().unwrap_or(module);
            match offset {
                Some(offset) => format!("{module}+{offset}"),
                None => format!("{module}?"),
            }
        }
        None => "?".to_string(),
    }
}

fn u64_at(v: &Value, pointer: &str) -> Result<u64> {
    v.pointer(pointer).and_then(Value::as_u64).ok_or_else(|| {
        anyhow!(
            "no unsigned integer at {}",
            pointer.trim_start_matches('/').replace('/', ".")
        )
    })
}

#[cfg(test)]
pub(crate) mod tests;
