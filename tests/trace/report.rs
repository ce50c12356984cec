//! Reading reports: the stream's and the report's shape, sums over leak groups, and the checks
//! of sites and totals against the expected facts.

use serde_json::Value;

use super::facts::{ALLOC_SITES, ALLOC_SITES_FREED, MREMAP_BYTES, SiteFact, TotalsFact};
use crate::common::{Checks, Finished, frame_fn, leaks, num, stack, truncate};

impl Finished {
    /// The final `report` record, after checking the stream's shape (`start` first, `report`
    /// last, snapshots in between) and the report's.
    pub(crate) fn report(&self) -> Value {
        let report = self.report_among(&["snapshot"]);
        check_report_shape(&report, &self.context());
        report
    }
}

/// The sum of the leak groups selected by `pred`.
#[derive(Debug, Default)]
pub(crate) struct Sum {
    pub(crate) bytes: u64,
    pub(crate) allocs: u64,
    pub(crate) groups: Vec<Value>,
}

pub(crate) fn sum_groups(report: &Value, pred: impl Fn(&Value) -> bool) -> Sum {
    let mut s = Sum::default();
    for g in leaks(report).iter().filter(|g| pred(g)) {
        s.bytes += num(g, "bytes");
        s.allocs += num(g, "allocs");
        s.groups.push(g.clone());
    }
    s
}

/// The leak groups whose innermost frame (the allocator's caller) is `function`.
pub(crate) fn site_sum(report: &Value, function: &str) -> Sum {
    sum_groups(report, |g| {
        stack(g).first().and_then(frame_fn) == Some(function)
    })
}

/// A compact, bounded rendering of a report for assertion messages.
pub(crate) fn summary(report: &Value) -> String {
    let mut s = format!("totals: {}\nmmap: {}\n", report["totals"], report["mmap"]);
    s += &format!(
        "exited: {} exit_code: {} duration_s: {}\n",
        report["exited"], report["exit_code"], report["duration_s"]
    );
    let all = leaks(report);
    s += &format!("leaks: {} groups; first 25 (5 frames each):\n", all.len());
    for g in all.iter().take(25) {
        let frames: Vec<String> = stack(g)
            .iter()
            .take(5)
            .map(|f| {
                format!(
                    "{}@{}",
                    frame_fn(f).unwrap_or("?"),
                    f["module"]
                        .as_str()
                        .map(|m| m.rsplit('/').next().unwrap_or(m))
                        .unwrap_or("?")
                )
            })
            .collect();
        s += &format!(
            "  {} bytes {} allocs {} {} age {}: {}\n",
            g["bytes"],
            g["allocs"],
            g["allocator"],
            g["kind"],
            g["oldest_age_s"],
            frames.join(" <- ")
        );
    }
    s
}

pub(crate) fn groups_json(groups: &[Value]) -> String {
    truncate(&serde_json::to_string_pretty(groups).unwrap(), 6000)
}

/// Checks the report's field types and the leaks' order; panics with `context`.
pub(crate) fn check_report_shape(r: &Value, context: &str) {
    let mut c = Checks::new("report shape");
    for key in [
        "allocs",
        "frees",
        "bytes_allocated",
        "bytes_freed",
        "outstanding_allocs",
        "outstanding_bytes",
        "peak_outstanding_bytes",
        "lost_events",
        "unmatched_frees",
        "lost_stacks",
    ] {
        c.check(
            r["totals"][key].is_u64(),
            format!("totals.{key} is not an integer: {}", r["totals"][key]),
        );
    }
    for key in [
        "maps",
        "unmaps",
        "bytes_mapped",
        "bytes_unmapped",
        "outstanding_maps",
        "outstanding_bytes",
    ] {
        c.check(
            r["mmap"][key].is_u64(),
            format!("mmap.{key} is not an integer: {}", r["mmap"][key]),
        );
    }
    c.check(
        r["exited"].is_boolean(),
        format!("exited is not a bool: {}", r["exited"]),
    );
    c.check(
        r["exit_code"].is_i64() || r["exit_code"].is_null(),
        format!("exit_code is not an int or null: {}", r["exit_code"]),
    );
    c.check(
        r["duration_s"].is_number(),
        format!("duration_s is not a number: {}", r["duration_s"]),
    );
    c.check(r["leaks"].is_array(), "leaks is not an array".to_string());
    let mut prev = u64::MAX;
    for (i, g) in leaks(r).iter().enumerate() {
        let bytes = g["bytes"].as_u64().unwrap_or(0);
        c.check(
            bytes <= prev,
            format!("leaks not sorted by bytes descending at index {i}"),
        );
        prev = bytes;
        c.check(
            g["allocs"].as_u64().is_some_and(|a| a >= 1),
            format!("leak {i}: bad allocs {}", g["allocs"]),
        );
        c.check(
            g["oldest_age_s"].is_number(),
            format!("leak {i}: bad oldest_age_s {}", g["oldest_age_s"]),
        );
        c.check(
            g["allocator"].is_string(),
            format!("leak {i}: bad allocator {}", g["allocator"]),
        );
        c.check(
            matches!(g["kind"].as_str(), Some("heap" | "mmap")),
            format!("leak {i}: kind {} is not heap or mmap", g["kind"]),
        );
        c.check(
            g["stack"].is_array(),
            format!("leak {i}: stack is not an array"),
        );
        for (j, f) in stack(g).iter().enumerate() {
            let ok = (f["function"].is_string() || f["function"].is_null())
                // The contract says string; an address in no mapping (a garbage frame past the
                // end of a frame-pointer chain) has no module, so null is accepted there.
                && (f["module"].is_string() || f["module"].is_null())
                && (f["file"].is_string() || f["file"].is_null())
                && (f["line"].is_u64() || f["line"].is_null())
                // The offset in the module's file (hex), for frames in a module only; a
                // kernel frame (`--kernel`) is its name alone, its address when unnamed.
                && match f["module"].as_str() {
                    Some("[kernel]") if f["function"].is_string() => f["offset"].is_null(),
                    Some(_) => f["offset"].as_str().is_some_and(|o| {
                        o.strip_prefix("0x")
                            .is_some_and(|h| u64::from_str_radix(h, 16).is_ok())
                    }),
                    None => f["offset"].is_null(),
                }
                && (f["build_id"].is_string() || f["build_id"].is_null())
                && f["inlined"].is_boolean()
                && match f["kind"].as_str() {
                    Some("kernel") => f["module"] == "[kernel]",
                    kind => matches!(kind, Some("native" | "python" | "unknown")),
                }
                && f.get("addr").is_none();
            c.check(ok, format!("leak {i} frame {j} has a bad shape: {f}"));
        }
    }
    c.finish(|| format!("{}\n{context}", summary(r)));
}

/// Per-site exact bytes/allocs, allocator and kind.
pub(crate) fn check_site(c: &mut Checks, report: &Value, fact: &SiteFact) {
    let s = site_sum(report, fact.function);
    let groups = || groups_json(&s.groups);
    if s.bytes != fact.bytes || s.allocs != fact.allocs {
        c.check(
            false,
            format!(
                "site {}: {} bytes in {} allocs over {} group(s), expected {} bytes in {} allocs; \
                 groups: {}",
                fact.function,
                s.bytes,
                s.allocs,
                s.groups.len(),
                fact.bytes,
                fact.allocs,
                groups()
            ),
        );
    }
    for g in &s.groups {
        let allocator = g["allocator"].as_str().unwrap_or("?");
        c.check(
            fact.allocators.contains(&allocator),
            format!(
                "site {}: allocator {allocator:?}, expected one of {:?}",
                fact.function, fact.allocators
            ),
        );
        c.check(
            g["kind"].as_str() == Some(fact.kind),
            format!(
                "site {}: kind {}, expected {:?}",
                fact.function, g["kind"], fact.kind
            ),
        );
    }
}

pub(crate) fn check_no_site(c: &mut Checks, report: &Value, function: &str) {
    let s = site_sum(report, function);
    c.check(
        s.groups.is_empty(),
        format!(
            "{function} frees (or fails) everything it allocates but has {} leak group(s) at \
             stack[0] ({} bytes): {}",
            s.groups.len(),
            s.bytes,
            groups_json(&s.groups)
        ),
    );
}

pub(crate) fn check_totals(c: &mut Checks, report: &Value, t: &TotalsFact) {
    let totals = &report["totals"];
    c.eq("totals.allocs", num(totals, "allocs"), t.allocs);
    c.eq("totals.frees", num(totals, "frees"), t.frees);
    c.eq(
        "totals.bytes_allocated",
        num(totals, "bytes_allocated"),
        t.bytes_allocated,
    );
    c.eq(
        "totals.bytes_freed",
        num(totals, "bytes_freed"),
        t.bytes_freed,
    );
    c.eq(
        "totals.outstanding_allocs",
        num(totals, "outstanding_allocs"),
        t.outstanding_allocs,
    );
    c.eq(
        "totals.outstanding_bytes",
        num(totals, "outstanding_bytes"),
        t.outstanding_bytes,
    );
    if t.unmatched_frees != u64::MAX {
        c.eq(
            "totals.unmatched_frees",
            num(totals, "unmatched_frees"),
            t.unmatched_frees,
        );
    }
    c.eq("totals.lost_events", num(totals, "lost_events"), 0);
    let peak = num(totals, "peak_outstanding_bytes");
    c.check(
        peak >= num(totals, "outstanding_bytes") && peak <= num(totals, "bytes_allocated"),
        format!(
            "totals.peak_outstanding_bytes {peak} should be >= outstanding_bytes and <= \
             bytes_allocated"
        ),
    );
}

/// Everything alloc_sites' heap sites must show, whatever the build and mode.
pub(crate) fn check_alloc_sites(c: &mut Checks, report: &Value) {
    for fact in ALLOC_SITES {
        check_site(c, report, fact);
    }
    for f in ALLOC_SITES_FREED {
        check_no_site(c, report, f);
    }
    // The big mallocs are mmap-backed inside glibc: heap, once, and nothing under mmap.
    let big_mmap = sum_groups(report, |g| {
        g["kind"] == "mmap" && stack(g).iter().any(|f| frame_fn(f) == Some("leak_big"))
    });
    c.check(
        big_mmap.groups.is_empty(),
        format!(
            "leak_big's 4 MiB mallocs must not appear as mmap leaks: {}",
            groups_json(&big_mmap.groups)
        ),
    );
    // mremap'ed region: kept under a stack through leak_mremap.
    let remap = sum_groups(report, |g| {
        g["kind"] == "mmap" && stack(g).iter().any(|f| frame_fn(f) == Some("leak_mremap"))
    });
    c.eq(
        "mmap leak bytes through leak_mremap (mmap 4 pages, mremap to 6)",
        remap.bytes,
        MREMAP_BYTES,
    );
    // mmap-kind groups add up to mmap.outstanding_bytes.
    let all_mmap = sum_groups(report, |g| g["kind"] == "mmap");
    c.eq(
        "sum of kind=mmap leak bytes vs mmap.outstanding_bytes",
        all_mmap.bytes,
        num(&report["mmap"], "outstanding_bytes"),
    );
}
