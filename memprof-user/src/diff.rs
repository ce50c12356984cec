//! Comparison of two saved reports (`memprof diff A B`): how total outstanding memory and each
//! call site's outstanding bytes changed between two traces, like `tracemalloc`'s `compare_to`
//! but for all native memory.
//!
//! This module owns loading a saved report (a `report` record, a whole NDJSON stream, or a
//! `snapshot` record), matching call sites across reports, the CI growth gate and the text
//! rendering of a diff. It works on `serde_json::Value`s, so reports written by other memprof
//! versions load as long as they carry the fields used here.
//!
//! Addresses differ between runs (ASLR), so a call site's identity never uses `addr`: it is the
//! allocator, the kind and, per frame, the function name or, when that is null, the module's
//! file name followed by `?`. Groups of one report sharing an identity are merged.

use std::{cmp::Reverse, collections::HashMap, fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Serialize;
use serde_json::Value;

use crate::report::human_bytes;

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

/// Loads a saved report: a file holding one `report` JSON object, a whole NDJSON stream (its
/// last `report` line is taken, or without one its last `snapshot` line), or one `snapshot`.
///
/// Errors name the file: `FILE: not JSON: ...`, `FILE: no memprof report found ...`.
pub fn load_report(path: &Path) -> Result<Value> {
    let name = path.display();
    let bytes = fs::read(path).with_context(|| format!("{name}: cannot read"))?;
    let mut last_report = None;
    let mut last_snapshot = None;
    // A stream of JSON values: one object, NDJSON, or pretty-printed objects one after another.
    for value in serde_json::Deserializer::from_slice(&bytes).into_iter::<Value>() {
        let value = value.map_err(|e| anyhow!("{name}: not JSON: {e}"))?;
        match value.get("type").and_then(Value::as_str) {
            Some("report") => last_report = Some(value),
            Some("snapshot") => last_snapshot = Some(value),
            _ => {}
        }
    }
    last_report.or(last_snapshot).ok_or_else(|| {
        anyhow!(
            "{name}: no memprof report found (expected a JSON object with \"type\":\"report\" \
             or \"snapshot\", as `memprof trace --json` writes)"
        )
    })
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

/// The text a person reads: the total change, then the `top` sites that changed most (by
/// absolute bytes), listed growth first.
pub fn render_text(d: &Diff, top: usize) -> String {
    let mut out = String::new();
    let pct = match d.growth_pct {
        Some(p) => format!("{p:+.1}%"),
        None if d.outstanding_bytes_after > 0 => "from nothing".to_string(),
        None => "unchanged".to_string(),
    };
    let _ = writeln!(
        out,
        "memprof diff: outstanding heap {} -> {} ({}, {pct})    mmap {}",
        human_bytes(d.outstanding_bytes_before),
        human_bytes(d.outstanding_bytes_after),
        signed_bytes(d.delta_bytes),
        signed_bytes(d.mmap_delta_bytes),
    );
    let count = |status: &str| d.sites.iter().filter(|s| s.status == status).count();
    let _ = writeln!(
        out,
        "  call sites   {} new, {} gone, {} grew, {} shrank, {} same",
        count("new"),
        count("gone"),
        count("grew"),
        count("shrank"),
        count("same"),
    );

    let mut changed: Vec<(usize, &SiteDelta)> = d
        .sites
        .iter()
        .enumerate()
        .filter(|(_, s)| s.delta_bytes != 0 || s.delta_allocs != 0)
        .collect();
    if changed.is_empty() {
        out.push_str("\nNo call site changed.\n");
        return out;
    }
    let total_changed = changed.len();
    // The largest changes either way, shown in the diff's own order (growth first).
    changed.sort_by_key(|&(i, s)| (Reverse(s.delta_bytes.unsigned_abs()), i));
    changed.truncate(top);
    changed.sort_by_key(|&(i, _)| i);

    let _ = writeln!(
        out,
        "\nTop {} of {} changed call sites by bytes:",
        changed.len(),
        total_changed
    );
    let _ = writeln!(
        out,
        "{:>12} {:>11} {:>11} {:>8}  {:<7} {:<16} stack (innermost first)",
        "change", "before", "after", "allocs", "status", "allocator"
    );
    for (_, s) in changed {
        let _ = writeln!(
            out,
            "{:>12} {:>11} {:>11} {:>+8}  {:<7} {:<16} {}",
            signed_bytes(s.delta_bytes),
            human_bytes(s.bytes_before),
            human_bytes(s.bytes_after),
            s.delta_allocs,
            s.status,
            format!("{} ({})", s.allocator, s.kind),
            stack_text(&s.stack),
        );
    }
    out
}

/// Frames shown per site in the text; the JSON has them all.
const TEXT_FRAMES: usize = 4;

fn stack_text(stack: &[String]) -> String {
    if stack.is_empty() {
        return "(stack not captured)".to_string();
    }
    let mut text = stack[..stack.len().min(TEXT_FRAMES)].join(" <- ");
    if stack.len() > TEXT_FRAMES {
        text.push_str(" <- ...");
    }
    text
}

fn signed_bytes(b: i64) -> String {
    let sign = match b {
        0 => "",
        1.. => "+",
        _ => "-",
    };
    format!("{sign}{}", human_bytes(b.unsigned_abs()))
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

/// `function`, or the module's file name and `?` when the function is unknown, or `?`.
fn frame_label(frame: &Value) -> String {
    if let Some(function) = frame.get("function").and_then(Value::as_str) {
        return function.to_string();
    }
    match frame.get("module").and_then(Value::as_str) {
        Some(module) => format!("{}?", module.rsplit('/').next().unwrap_or(module)),
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
mod tests {
    use super::*;
    use serde_json::json;

    fn frame(function: Option<&str>, module: Option<&str>, addr: &str) -> Value {
        json!({"function": function, "module": module, "file": null, "line": null, "addr": addr})
    }

    fn leak(bytes: u64, allocs: u64, allocator: &str, kind: &str, stack: Vec<Value>) -> Value {
        json!({
            "bytes": bytes, "allocs": allocs, "oldest_age_s": 1.5,
            "allocator": allocator, "kind": kind, "stack": stack,
        })
    }

    fn report(record: &str, outstanding: u64, mmap: u64, leaks: Vec<Value>) -> Value {
        json!({
            "type": record, "pid": 42, "elapsed_s": 3.0,
            "totals": {
                "allocs": 10, "frees": 5, "bytes_allocated": outstanding + 100,
                "bytes_freed": 100, "outstanding_allocs": 5, "outstanding_bytes": outstanding,
                "peak_outstanding_bytes": outstanding, "lost_events": 0, "unmatched_frees": 0,
                "lost_stacks": 0, "reused_addresses": 0,
            },
            "mmap": {
                "maps": 1, "unmaps": 0, "bytes_mapped": mmap, "bytes_unmapped": 0,
                "outstanding_maps": 1, "outstanding_bytes": mmap,
            },
            "leaks": leaks,
        })
    }

    const APP: &str = "/usr/local/bin/server";
    const LIBZ: &str = "/usr/lib/x86_64-linux-gnu/libz.so.1";

    /// Before: cache (steady), parse_header (grows), log (shrinks), startup (gone).
    fn before() -> Value {
        report(
            "report",
            10_000,
            1 << 20,
            vec![
                leak(
                    4_000,
                    40,
                    "malloc",
                    "heap",
                    vec![
                        frame(Some("cache_put"), Some(APP), "0x55d1c0a01000"),
                        frame(Some("main"), Some(APP), "0x55d1c0a02000"),
                    ],
                ),
                leak(
                    3_000,
                    30,
                    "realloc",
                    "heap",
                    vec![frame(Some("log_append"), Some(APP), "0x55d1c0a03000")],
                ),
                leak(
                    2_000,
                    10,
                    "malloc",
                    "heap",
                    vec![
                        frame(Some("parse_header"), Some(APP), "0x55d1c0a04000"),
                        frame(None, Some(APP), "0x55d1c0a05000"),
                    ],
                ),
                leak(
                    1_000,
                    1,
                    "calloc",
                    "heap",
                    vec![frame(Some("startup"), Some(APP), "0x55d1c0a06000")],
                ),
            ],
        )
    }

    /// After: other addresses (ASLR); a new site in libz with an unnamed frame.
    fn after() -> Value {
        report(
            "report",
            12_500,
            (1 << 20) + 4096,
            vec![
                leak(
                    5_000,
                    25,
                    "malloc",
                    "heap",
                    vec![
                        frame(Some("parse_header"), Some(APP), "0x5600aa004000"),
                        frame(None, Some(APP), "0x5600aa005000"),
                    ],
                ),
                leak(
                    4_000,
                    40,
                    "malloc",
                    "heap",
                    vec![
                        frame(Some("cache_put"), Some(APP), "0x5600aa001000"),
                        frame(Some("main"), Some(APP), "0x5600aa002000"),
                    ],
                ),
                leak(
                    2_500,
                    2,
                    "malloc",
                    "heap",
                    vec![
                        frame(None, Some(LIBZ), "0x7f1200001000"),
                        frame(None, None, "0x7f1200002000"),
                    ],
                ),
                leak(
                    1_000,
                    12,
                    "realloc",
                    "heap",
                    vec![frame(Some("log_append"), Some(APP), "0x5600aa003000")],
                ),
            ],
        )
    }

    fn strs(labels: &[&str]) -> Vec<String> {
        labels.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn diff_matches_sites_across_addresses() {
        let d = diff(&before(), &after()).expect("both are reports");
        assert_eq!(d.record, "diff");
        assert_eq!(
            (
                d.outstanding_bytes_before,
                d.outstanding_bytes_after,
                d.delta_bytes
            ),
            (10_000, 12_500, 2_500)
        );
        assert_eq!(d.growth_pct, Some(25.0), "2500 of 10000");
        assert_eq!(d.mmap_delta_bytes, 4096);
        let got: Vec<_> = d
            .sites
            .iter()
            .map(|s| (s.status, s.delta_bytes, s.delta_allocs, s.stack[0].as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("grew", 3_000, 15, "parse_header"),
                ("new", 2_500, 2, "libz.so.1?"),
                ("same", 0, 0, "cache_put"),
                ("gone", -1_000, -1, "startup"),
                ("shrank", -2_000, -18, "log_append"),
            ],
            "sorted by delta_bytes descending"
        );
        assert_eq!(
            d.sites[0],
            SiteDelta {
                status: "grew",
                bytes_before: 2_000,
                bytes_after: 5_000,
                delta_bytes: 3_000,
                allocs_before: 10,
                allocs_after: 25,
                delta_allocs: 15,
                allocator: "malloc".into(),
                kind: "heap".into(),
                stack: strs(&["parse_header", "server?"]),
            }
        );
        assert_eq!(d.sites[1].stack, strs(&["libz.so.1?", "?"]));
        assert_eq!(
            (d.sites[1].bytes_before, d.sites[1].bytes_after),
            (0, 2_500)
        );
        assert_eq!(
            (d.sites[3].bytes_before, d.sites[3].bytes_after),
            (1_000, 0)
        );
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["type"], "diff");
        assert_eq!(json["sites"][0]["stack"][1], "server?");
    }

    #[test]
    fn allocator_and_kind_are_part_of_identity() {
        let stack = || vec![frame(Some("f"), Some(APP), "0x1")];
        let a = report(
            "report",
            300,
            0,
            vec![
                leak(100, 1, "malloc", "heap", stack()),
                leak(200, 1, "mmap", "mmap", stack()),
            ],
        );
        let b = report(
            "report",
            300,
            0,
            vec![
                leak(100, 1, "calloc", "heap", stack()),
                leak(200, 1, "mmap", "mmap", stack()),
            ],
        );
        let d = diff(&a, &b).unwrap();
        let got: Vec<_> = d
            .sites
            .iter()
            .map(|s| (s.status, s.allocator.as_str(), s.delta_bytes))
            .collect();
        assert_eq!(
            got,
            vec![
                ("new", "calloc", 100),
                ("same", "mmap", 0),
                ("gone", "malloc", -100)
            ]
        );
    }

    #[test]
    fn groups_sharing_an_identity_are_merged() {
        // Two groups differing only in addresses and file/line info (e.g. two call sites inside
        // one function) become one site; so do unnamed frames of the same module.
        let before = report(
            "report",
            700,
            0,
            vec![
                leak(
                    300,
                    3,
                    "malloc",
                    "heap",
                    vec![frame(Some("alloc_node"), Some(APP), "0x10")],
                ),
                leak(
                    400,
                    1,
                    "malloc",
                    "heap",
                    vec![frame(Some("alloc_node"), Some(APP), "0x20")],
                ),
            ],
        );
        let after = report(
            "report",
            1_000,
            0,
            vec![
                leak(
                    600,
                    2,
                    "malloc",
                    "heap",
                    vec![frame(None, Some(LIBZ), "0x7f01")],
                ),
                leak(
                    400,
                    2,
                    "malloc",
                    "heap",
                    vec![frame(None, Some("/opt/other/libz.so.1"), "0x7f99")],
                ),
            ],
        );
        let d = diff(&before, &after).unwrap();
        let got: Vec<_> = d
            .sites
            .iter()
            .map(|s| {
                (
                    s.status,
                    s.stack.join(","),
                    s.bytes_before,
                    s.bytes_after,
                    s.allocs_before,
                    s.allocs_after,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("new", "libz.so.1?".to_string(), 0, 1_000, 0, 4),
                ("gone", "alloc_node".to_string(), 700, 0, 4, 0),
            ],
            "300+400 bytes merged before, 600+400 after (same module basename)"
        );
    }

    #[test]
    fn growth_pct_arithmetic() {
        let pct = |b, a| {
            diff(
                &report("report", b, 0, vec![]),
                &report("report", a, 0, vec![]),
            )
        };
        assert_eq!(pct(1_000, 1_500).unwrap().growth_pct, Some(50.0));
        assert_eq!(pct(1_000, 250).unwrap().growth_pct, Some(-75.0));
        assert_eq!(pct(1_000, 1_000).unwrap().growth_pct, Some(0.0));
        assert_eq!(pct(3, 4).unwrap().growth_pct, Some(100.0 / 3.0));
        let from_zero = pct(0, 500).unwrap();
        assert_eq!(from_zero.growth_pct, None, "before == 0");
        assert_eq!(from_zero.delta_bytes, 500);
        assert_eq!(pct(0, 0).unwrap().growth_pct, None);
        let json = serde_json::to_value(from_zero).unwrap();
        assert!(json["growth_pct"].is_null(), "{json}");
    }

    #[test]
    fn delta_clamps_to_i64() {
        assert_eq!(delta(0, u64::MAX), i64::MAX);
        assert_eq!(delta(u64::MAX, 0), i64::MIN);
        assert_eq!(delta(7, 5), -2);
    }

    #[test]
    fn grows_beyond_threshold() {
        let d = |b, a| {
            diff(
                &report("report", b, 0, vec![]),
                &report("report", a, 0, vec![]),
            )
            .unwrap()
        };
        assert!(
            !grows_beyond(&d(1_000, 1_100), 10.0),
            "exactly +10% is not beyond 10%"
        );
        assert!(!grows_beyond(&d(1_000, 1_099), 10.0), "+9.9% is below 10%");
        assert!(grows_beyond(&d(1_000, 1_101), 10.0), "+10.1% is beyond 10%");
        assert!(
            !grows_beyond(&d(1_000, 900), 10.0),
            "shrinking never fails the gate"
        );
        assert!(
            grows_beyond(&d(1_000, 1_001), 0.0),
            "any growth is beyond 0%"
        );
        assert!(
            !grows_beyond(&d(1_000, 1_000), 0.0),
            "no growth is not beyond 0%"
        );
        assert!(
            grows_beyond(&d(0, 1), 1e9),
            "from 0 to 1 byte is beyond any pct"
        );
        assert!(!grows_beyond(&d(0, 0), 0.0), "0 to 0 is no growth");
    }

    #[test]
    fn diff_rejects_non_reports() {
        let err = diff(&json!({"type": "start", "pid": 1}), &before()).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "first report: not a memprof report or snapshot (\"type\" is \"start\")"
        );
        let mut broken = after();
        broken["leaks"][2]
            .as_object_mut()
            .unwrap()
            .remove("allocator");
        let err = diff(&before(), &broken).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "second report: leaks[2]: no string \"allocator\""
        );
        let mut no_mmap = after();
        no_mmap.as_object_mut().unwrap().remove("mmap");
        let err = diff(&before(), &no_mmap).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "second report: no unsigned integer at mmap.outstanding_bytes"
        );
    }

    #[test]
    fn diff_of_snapshots() {
        let d = diff(
            &report("snapshot", 10, 0, vec![]),
            &report("report", 30, 0, vec![]),
        )
        .unwrap();
        assert_eq!(d.delta_bytes, 20);
    }

    /// A file in the temp directory, removed on drop.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> Self {
            let path = std::env::temp_dir()
                .join(format!("memprof-diff-test-{}-{name}", std::process::id()));
            fs::write(&path, contents).expect("temp dir is writable");
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }

    #[test]
    fn load_report_takes_last_report_of_ndjson() {
        let start = json!({"type": "start", "pid": 42, "probes": ["malloc"], "missing": []});
        let snap = report("snapshot", 111, 0, vec![]);
        let rep = report("report", 222, 0, vec![]);
        let text = format!("{start}\n{snap}\n{rep}\n{snap}\n");
        let f = TempFile::new("ndjson", text.as_bytes());
        let v = load_report(&f.0).expect("stream has a report");
        assert_eq!(v["type"], "report");
        assert_eq!(v["totals"]["outstanding_bytes"], 222);
    }

    #[test]
    fn load_report_accepts_single_report_or_snapshot() {
        let f = TempFile::new(
            "single",
            serde_json::to_string_pretty(&report("report", 5, 0, vec![]))
                .unwrap()
                .as_bytes(),
        );
        assert_eq!(
            load_report(&f.0).unwrap()["totals"]["outstanding_bytes"],
            5,
            "a pretty-printed report"
        );
        let snaps = format!(
            "{}\n{}\n",
            report("snapshot", 6, 0, vec![]),
            report("snapshot", 7, 0, vec![])
        );
        let f = TempFile::new("snapshots", snaps.as_bytes());
        assert_eq!(
            load_report(&f.0).unwrap()["totals"]["outstanding_bytes"],
            7,
            "without a report, the last snapshot"
        );
    }

    #[test]
    fn load_report_errors_name_the_file() {
        let f = TempFile::new("not-json", b"memprof report: pid 42, 3.00 s\n");
        let err = format!("{:#}", load_report(&f.0).unwrap_err());
        let name = f.0.display().to_string();
        assert!(
            err.starts_with(&format!("{name}: not JSON: ")),
            "text report instead of JSON: {err}"
        );

        let f = TempFile::new("no-report", b"{\"type\":\"start\",\"pid\":42}\n[1,2]\n");
        let err = format!("{:#}", load_report(&f.0).unwrap_err());
        assert!(
            err.starts_with(&format!(
                "{name}: no memprof report found",
                name = f.0.display()
            )),
            "{err}"
        );

        let f = TempFile::new("empty", b"");
        let err = format!("{:#}", load_report(&f.0).unwrap_err());
        assert!(err.contains("no memprof report found"), "{err}");

        let missing = std::env::temp_dir().join("memprof-diff-test-does-not-exist");
        let err = format!("{:#}", load_report(&missing).unwrap_err());
        assert!(
            err.starts_with(&format!("{}: cannot read: ", missing.display())),
            "{err}"
        );
    }

    #[test]
    fn text_lists_changes_by_size() {
        let d = diff(&before(), &after()).unwrap();
        let text = render_text(&d, 3);
        let expected = "\
memprof diff: outstanding heap 9.8 KiB -> 12.2 KiB (+2.4 KiB, +25.0%)    mmap +4.0 KiB
  call sites   1 new, 1 gone, 1 grew, 1 shrank, 1 same

Top 3 of 4 changed call sites by bytes:
      change      before       after   allocs  status  allocator        stack (innermost first)
    +2.9 KiB     2.0 KiB     4.9 KiB      +15  grew    malloc (heap)    parse_header <- server?
    +2.4 KiB         0 B     2.4 KiB       +2  new     malloc (heap)    libz.so.1? <- ?
    -2.0 KiB     2.9 KiB      1000 B      -18  shrank  realloc (heap)   log_append
";
        assert_eq!(text, expected, "got:\n{text}");
    }

    #[test]
    fn text_without_changes() {
        let r = report("report", 0, 0, vec![]);
        let text = render_text(&diff(&r, &r).unwrap(), 10);
        assert!(text.contains("0 B -> 0 B (0 B, unchanged)"), "{text}");
        assert!(text.ends_with("No call site changed.\n"), "{text}");
        let long = report(
            "report",
            8,
            0,
            vec![leak(
                8,
                1,
                "malloc",
                "heap",
                (0..6)
                    .map(|i| frame(Some(&format!("f{i}")), None, "0x1"))
                    .collect(),
            )],
        );
        let text = render_text(&diff(&r, &long).unwrap(), 10);
        assert!(text.contains("0 B -> 8 B (+8 B, from nothing)"), "{text}");
        assert!(text.contains("f0 <- f1 <- f2 <- f3 <- ...\n"), "{text}");
    }
}
