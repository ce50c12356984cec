//! Build-over-build trends (`memprof trend R1 R2 ... RN`): each call site's outstanding bytes
//! in a series of saved reports, one per run, fitted with a least-squares line over the run
//! index. The slope is bytes per run; r² says how well a straight line explains the series.
//!
//! Sites are matched across reports as `memprof diff` matches them (`analysis::diff`): by
//! allocator, kind and frame names. A site missing from a report had nothing outstanding in
//! that run (a complete report lists every site with outstanding bytes): it counts as 0 bytes
//! there and is shown as absent, never dropped. A report saved with `--top` or `--min-age`
//! lists only some sites: such runs are named in `incomplete_runs` (and warned about).
//!
//! Verdicts, with `rise` = slope × (runs − 1) (the fitted change over the series) and `mean`
//! the site's mean outstanding bytes:
//! - `growing`: slope > 0, r² ≥ [`R2_LINEAR`] and rise > [`FLAT_FRACTION`] of mean;
//! - `shrinking`: the same, falling;
//! - `stable`: rise within [`FLAT_FRACTION`] of mean and the runs within [`NOISE_FRACTION`] of
//!   mean of the line (a constant series is stable);
//! - `noisy`: anything else (the bytes move, but not along a line).

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::Value;

use super::diff::Parsed;

/// Least r² for a line to explain a series (growing or shrinking).
pub const R2_LINEAR: f64 = 0.8;
/// A rise within this fraction of the mean is flat.
pub const FLAT_FRACTION: f64 = 0.05;
/// Root mean square distance from the line, as a fraction of the mean, above which a series
/// without a clear line is noisy.
pub const NOISE_FRACTION: f64 = 0.1;
/// Fewest reports a trend is computed over.
pub const MIN_RUNS: usize = 3;

/// A least-squares line through `(run index, bytes)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Fit {
    /// Bytes per run.
    pub slope: f64,
    /// Fitted bytes at the first run.
    pub intercept: f64,
    /// Coefficient of determination; 1 for a constant series (the line explains it exactly).
    pub r2: f64,
    /// Root mean square distance of the runs from the line, in bytes.
    pub rms_residual: f64,
}

/// Fits a line through `ys` at x = 0, 1, ..., n − 1 (at least 2 values).
pub fn fit(ys: &[f64]) -> Fit {
    let n = ys.len() as f64;
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = ys.iter().sum::<f64>() / n;
    let (mut sxx, mut sxy, mut syy) = (0.0, 0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        let dx = i as f64 - mean_x;
        let dy = y - mean_y;
        sxx += dx * dx;
        sxy += dx * dy;
        syy += dy * dy;
    }
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let intercept = mean_y - slope * mean_x;
    let ss_res: f64 = ys
        .iter()
        .enumerate()
        .map(|(i, y)| {
            let e = y - (intercept + slope * i as f64);
            e * e
        })
        .sum();
    let r2 = if syy > 0.0 {
        (1.0 - ss_res / syy).clamp(0.0, 1.0)
    } else {
        1.0
    };
    Fit {
        slope,
        intercept,
        r2,
        rms_residual: (ss_res / n).sqrt(),
    }
}

/// The verdict of a series (see the module's documentation).
pub fn verdict(ys: &[f64], f: &Fit) -> &'static str {
    let mean = ys.iter().sum::<f64>() / ys.len() as f64;
    let rise = f.slope * (ys.len() as f64 - 1.0);
    let flat = rise.abs() <= FLAT_FRACTION * mean;
    if !flat && f.r2 >= R2_LINEAR {
        if rise > 0.0 { "growing" } else { "shrinking" }
    } else if flat && f.rms_residual <= NOISE_FRACTION * mean {
        "stable"
    } else {
        "noisy"
    }
}

/// One call site over the runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SiteTrend {
    /// Frame labels, innermost first (as `memprof diff` writes them).
    pub stack: Vec<String>,
    pub allocator: String,
    pub kind: String,
    /// Outstanding bytes per run; `None` where the site is not in that report (0 bytes).
    pub bytes: Vec<Option<u64>>,
    /// Outstanding blocks per run, like `bytes`.
    pub allocs: Vec<Option<u64>>,
    pub slope_bytes_per_run: f64,
    pub r2: f64,
    /// `growing`, `shrinking`, `stable` or `noisy`.
    pub verdict: &'static str,
    /// Runs the site is in, out of all.
    pub present_runs: usize,
}

/// The trend of a series of reports (`"type":"trend"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trend {
    #[serde(rename = "type")]
    pub record: &'static str,
    /// The reports, in run order, as given.
    pub runs: Vec<String>,
    /// `totals.outstanding_bytes` per run.
    pub outstanding_bytes: Vec<u64>,
    pub total_slope_bytes_per_run: f64,
    pub total_r2: f64,
    pub total_verdict: &'static str,
    /// Growing sites first (steepest first), then the others by slope, then by stack.
    pub sites: Vec<SiteTrend>,
    /// Runs whose report does not list every call site (saved with `--top` or `--min-age`):
    /// a site missing from one of them is counted as 0 bytes there though it may hold some.
    pub incomplete_runs: Vec<IncompleteRun>,
}

/// A report listing only some of its call sites.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IncompleteRun {
    pub run: String,
    /// Sites listed, of `leak_groups`.
    pub listed: usize,
    pub leak_groups: u64,
    pub min_age_s: f64,
}

impl IncompleteRun {
    /// What the report leaves out, for a warning.
    pub fn describe(&self) -> String {
        let mut why = Vec::new();
        if (self.listed as u64) < self.leak_groups {
            why.push(format!(
                "lists {} of its {} call sites (saved with --top)",
                self.listed, self.leak_groups
            ));
        }
        if self.min_age_s > 0.0 {
            why.push(format!(
                "lists only sites older than {} s (--min-age)",
                self.min_age_s
            ));
        }
        format!(
            "{} {}: a site missing from it counts as 0 bytes there; save reports with --json \
             and no --top or --min-age for a complete trend",
            self.run,
            why.join(" and ")
        )
    }
}

/// The run, if its report leaves call sites out (see [`Trend::incomplete_runs`]).
fn incomplete(name: &str, v: &Value) -> Option<IncompleteRun> {
    let listed = v.get("leaks").and_then(Value::as_array).map_or(0, Vec::len);
    let leak_groups = v.get("leak_groups").and_then(Value::as_u64).unwrap_or(0);
    let min_age_s = v.get("min_age_s").and_then(Value::as_f64).unwrap_or(0.0);
    ((listed as u64) < leak_groups || min_age_s > 0.0).then(|| IncompleteRun {
        run: name.to_string(),
        listed,
        leak_groups,
        min_age_s,
    })
}

/// The trend over `reports` (name, parsed JSON), in run order.
pub fn trend(reports: &[(String, Value)]) -> Result<Trend> {
    if reports.len() < MIN_RUNS {
        bail!(
            "a trend needs at least {MIN_RUNS} reports ({} given)",
            reports.len()
        );
    }
    let parsed = reports
        .iter()
        .map(|(name, v)| Parsed::new(v).with_context(|| name.clone()))
        .collect::<Result<Vec<_>>>()?;
    let mut keys: Vec<_> = parsed.iter().flat_map(|p| p.sites.keys()).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut sites: Vec<SiteTrend> = keys
        .into_iter()
        .map(|key| {
            let per_run: Vec<Option<(u64, u64)>> =
                parsed.iter().map(|p| p.sites.get(key).copied()).collect();
            let ys: Vec<f64> = per_run
                .iter()
                .map(|r| r.map_or(0.0, |(b, _)| b as f64))
                .collect();
            let f = fit(&ys);
            SiteTrend {
                stack: key.stack.clone(),
                allocator: key.allocator.clone(),
                kind: key.kind.clone(),
                bytes: per_run.iter().map(|r| r.map(|(b, _)| b)).collect(),
                allocs: per_run.iter().map(|r| r.map(|(_, a)| a)).collect(),
                slope_bytes_per_run: f.slope,
                r2: f.r2,
                verdict: verdict(&ys, &f),
                present_runs: per_run.iter().filter(|r| r.is_some()).count(),
            }
        })
        .collect();
    // Keys are sorted by stack above; the stable sort keeps that as the tie-break.
    sites.sort_by(|a, b| {
        (b.verdict == "growing")
            .cmp(&(a.verdict == "growing"))
            .then(b.slope_bytes_per_run.total_cmp(&a.slope_bytes_per_run))
    });
    let totals: Vec<u64> = parsed.iter().map(|p| p.outstanding_bytes).collect();
    let ys: Vec<f64> = totals.iter().map(|&b| b as f64).collect();
    let f = fit(&ys);
    Ok(Trend {
        record: "trend",
        runs: reports.iter().map(|(n, _)| n.clone()).collect(),
        outstanding_bytes: totals,
        total_slope_bytes_per_run: f.slope,
        total_r2: f.r2,
        total_verdict: verdict(&ys, &f),
        sites,
        incomplete_runs: reports
            .iter()
            .filter_map(|(name, v)| incomplete(name, v))
            .collect(),
    })
}

/// The CI gate: the growing sites whose slope is above `bytes_per_run`.
pub fn growing_beyond(t: &Trend, bytes_per_run: f64) -> Vec<&SiteTrend> {
    t.sites
        .iter()
        .filter(|s| s.verdict == "growing" && s.slope_bytes_per_run > bytes_per_run)
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn report(sites: &[(&str, u64)]) -> Value {
        let leaks: Vec<Value> = sites
            .iter()
            .map(|(f, b)| {
                json!({"allocator": "libc", "kind": "heap", "bytes": b, "allocs": b / 100,
                       "stack": [{"function": f}, {"function": "main"}]})
            })
            .collect();
        let total: u64 = sites.iter().map(|(_, b)| b).sum();
        json!({"type": "report", "totals": {"outstanding_bytes": total},
               "mmap": {"outstanding_bytes": 0}, "leaks": leaks})
    }

    #[test]
    fn fits_lines_exactly() {
        let f = fit(&[100.0, 400.0, 700.0, 1000.0]);
        assert_eq!((f.slope, f.intercept, f.r2), (300.0, 100.0, 1.0));
        assert_eq!(f.rms_residual, 0.0);
        let flat = fit(&[5.0, 5.0, 5.0]);
        assert_eq!((flat.slope, flat.r2), (0.0, 1.0));
        // 0, 10, 0, 10: slope 2, r² = 0.2 exactly (ss_res 80, ss_tot 100).
        let zigzag = fit(&[0.0, 10.0, 0.0, 10.0]);
        assert!((zigzag.slope - 2.0).abs() < 1e-12, "{zigzag:?}");
        assert!((zigzag.r2 - 0.2).abs() < 1e-12, "{zigzag:?}");
    }

    #[test]
    fn verdicts() {
        let v = |ys: &[f64]| verdict(ys, &fit(ys));
        assert_eq!(v(&[0.0, 1000.0, 2000.0, 3000.0]), "growing");
        assert_eq!(v(&[3000.0, 2000.0, 1000.0, 0.0]), "shrinking");
        assert_eq!(v(&[500.0, 500.0, 500.0]), "stable");
        assert_eq!(v(&[0.0, 0.0, 0.0]), "stable");
        assert_eq!(v(&[1000.0, 1010.0, 995.0, 1005.0]), "stable");
        assert_eq!(v(&[0.0, 1000.0, 0.0, 1000.0, 0.0]), "noisy");
        assert_eq!(v(&[0.0, 0.0, 9000.0, 0.0, 0.0]), "noisy");
    }

    #[test]
    fn sites_over_runs_with_appearing_and_vanishing_ones() {
        let runs: Vec<(String, Value)> = (0..5u64)
            .map(|i| {
                let mut sites = vec![("grows", 1000 + 3000 * i), ("same", 500)];
                if i < 2 {
                    sites.push(("gone", 800));
                }
                if i == 3 {
                    sites.push(("once", 9000));
                }
                (format!("r{i}.json"), report(&sites))
            })
            .collect();
        let t = trend(&runs).unwrap();
        let got: Vec<(&str, &str, f64, usize)> = t
            .sites
            .iter()
            .map(|s| {
                (
                    s.stack[0].as_str(),
                    s.verdict,
                    s.slope_bytes_per_run,
                    s.present_runs,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("grows", "growing", 3000.0, 5),
                ("once", "noisy", 900.0, 1),
                ("same", "stable", 0.0, 5),
                ("gone", "noisy", -240.0, 2),
            ]
        );
        let gone = &t.sites[3];
        assert_eq!(gone.bytes, [Some(800), Some(800), None, None, None]);
        assert_eq!(gone.allocs, [Some(8), Some(8), None, None, None]);
        assert_eq!(t.outstanding_bytes, [2300, 5300, 7500, 19500, 13500]);
        assert_eq!(
            growing_beyond(&t, 2999.0)
                .iter()
                .map(|s| s.stack[0].as_str())
                .collect::<Vec<_>>(),
            ["grows"]
        );
        assert!(
            growing_beyond(&t, 3000.0).is_empty(),
            "a slope of exactly 3000 passes"
        );
    }

    #[test]
    fn too_few_or_bad_reports_are_errors() {
        let two = vec![
            ("a".to_string(), report(&[])),
            ("b".to_string(), report(&[])),
        ];
        assert_eq!(
            trend(&two).unwrap_err().to_string(),
            "a trend needs at least 3 reports (2 given)"
        );
        let mut bad = two.clone();
        bad.push(("c.json".to_string(), json!({"type": "diff"})));
        assert_eq!(
            format!("{:#}", trend(&bad).unwrap_err()),
            "c.json: not a memprof report or snapshot (\"type\" is \"diff\")"
        );
    }
}
