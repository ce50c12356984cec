//! `memprof trend` over reports saved run after run: every site's bytes per run exact, the
//! leaking site's slope and verdict, sites that appear or vanish, the CI gate on a growing and
//! on a clean series, the HTML page, and bad input.

use std::{ffi::OsString, fs, path::PathBuf, sync::OnceLock};

use serde_json::Value;

use super::{array, fixtures, run_memprof, scratch};
use crate::common::{Checks, Finished, clean_error, spawn_trace};

/// Runs in the growing series.
const RUNS: usize = 10;

/// `diff_sites A B C D` for run `i` of the growing series: site_a leaks 3 more 1000-byte
/// blocks every run (3000 B per run), site_b always 20 blocks of 2000 B, site_c 7 blocks of
/// 3000 B in run 6 only (appears once), site_d 4 blocks of 4000 B in runs 0 to 2 only
/// (vanishes); site_same always 5 blocks of 500 B.
fn counts(i: usize) -> [u64; 4] {
    let i = i as u64;
    [
        3 * i + 2,
        20,
        if i == 6 { 7 } else { 0 },
        if i < 3 { 4 } else { 0 },
    ]
}

/// Bytes per run of each site as the series above leaks them (None: no block, so not in the
/// report).
fn expected_bytes(site: &str) -> Vec<Option<u64>> {
    (0..RUNS)
        .map(|i| {
            let c = counts(i);
            let b = match site {
                "site_a" => c[0] * 1000,
                "site_b" => c[1] * 2000,
                "site_c" => c[2] * 3000,
                "site_d" => c[3] * 4000,
                "site_same" => 2500,
                _ => unreachable!(),
            };
            (b > 0).then_some(b)
        })
        .collect()
}

/// Saves one traced run of diff_sites with `counts` as `file`.
fn save_run(file: &str, counts: [u64; 4]) -> PathBuf {
    let path = scratch().join(file);
    let _ = fs::remove_file(&path);
    let mut cmd = vec![fixtures().diff_sites.as_os_str().to_owned()];
    cmd.extend(counts.iter().map(|n| OsString::from(n.to_string())));
    let done = spawn_trace(&["--output", path.to_str().unwrap()], &cmd);
    done.assert_code(0, "diff_sites exits 0");
    path
}

/// The growing series, saved once per test process.
fn growing_series() -> &'static [PathBuf] {
    static RUNS_SAVED: OnceLock<Vec<PathBuf>> = OnceLock::new();
    RUNS_SAVED.get_or_init(|| {
        (0..RUNS)
            .map(|i| save_run(&format!("trend-{i}.json"), counts(i)))
            .collect()
    })
}

/// A clean series: the same counts three times.
fn clean_series() -> &'static [PathBuf] {
    static RUNS_SAVED: OnceLock<Vec<PathBuf>> = OnceLock::new();
    RUNS_SAVED.get_or_init(|| {
        (0..3)
            .map(|i| save_run(&format!("trend-clean-{i}.json"), [10, 20, 0, 4]))
            .collect()
    })
}

/// `memprof trend REPORTS... OPTS`, to the end.
fn trend(reports: &[PathBuf], opts: &[&str]) -> Finished {
    let mut args = vec![OsString::from("trend")];
    args.extend(reports.iter().map(|p| p.as_os_str().to_owned()));
    args.extend(opts.iter().map(OsString::from));
    run_memprof(&args)
}

fn trend_json(run: &Finished) -> Value {
    serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("trend --json is one JSON object: {e}\n{}", run.context()))
}

/// The site whose innermost frame is `function` (exactly one).
fn site<'a>(c: &mut Checks, t: &'a Value, function: &str) -> Option<&'a Value> {
    let found: Vec<&Value> = array(t, "sites")
        .iter()
        .filter(|s| s["stack"][0].as_str() == Some(function))
        .collect();
    c.eq(&format!("sites at {function}"), found.len(), 1);
    found.first().copied()
}

/// Ten runs: site_a's bytes are 2000, 5000, ... 29000 and its slope 3000 B per run (within
/// 1%), r² 1, verdict growing, the only growing site and listed first; every other site's
/// bytes per run exact, site_c (one run) and site_d (three runs) shown with their absent runs;
/// the totals per run exact.
#[test]
fn trend_finds_the_leaking_site_over_ten_runs() {
    let run = trend(growing_series(), &["--json"]);
    run.assert_code(0, "no gate asked");
    let t = trend_json(&run);
    let mut c = Checks::new("trend over 10 runs");
    c.eq("type", t["type"].as_str(), Some("trend"));
    c.eq("runs", array(&t, "runs").len(), RUNS);
    let want_totals: Vec<u64> = (0..RUNS)
        .map(|i| {
            ["site_a", "site_b", "site_c", "site_d", "site_same"]
                .iter()
                .map(|s| expected_bytes(s)[i].unwrap_or(0))
                .sum()
        })
        .collect();
    let totals: Vec<u64> = array(&t, "outstanding_bytes")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    c.eq("totals per run", totals, want_totals);
    for name in ["site_a", "site_b", "site_c", "site_d", "site_same"] {
        let Some(s) = site(&mut c, &t, name) else {
            continue;
        };
        let bytes: Vec<Option<u64>> = array(s, "bytes").iter().map(Value::as_u64).collect();
        c.eq(
            &format!("{name}: bytes per run"),
            bytes,
            expected_bytes(name),
        );
    }
    if let Some(a) = site(&mut c, &t, "site_a") {
        let slope = a["slope_bytes_per_run"].as_f64().unwrap_or(f64::NAN);
        c.check(
            (slope - 3000.0).abs() <= 30.0,
            format!("site_a slope {slope} is 3000 B/run within 1%"),
        );
        c.eq("site_a verdict", a["verdict"].as_str(), Some("growing"));
        c.eq("site_a r2", a["r2"].as_f64(), Some(1.0));
    }
    let growing: Vec<&str> = array(&t, "sites")
        .iter()
        .filter(|s| s["verdict"] == "growing")
        .filter_map(|s| s["stack"][0].as_str())
        .collect();
    c.eq("growing sites", growing, vec!["site_a"]);
    c.eq(
        "first site",
        array(&t, "sites")
            .first()
            .and_then(|s| s["stack"][0].as_str()),
        Some("site_a"),
    );
    for (name, verdict) in [
        ("site_b", "stable"),
        ("site_same", "stable"),
        ("site_c", "noisy"),
        ("site_d", "noisy"),
    ] {
        if let Some(s) = site(&mut c, &t, name) {
            c.eq(
                &format!("{name} verdict"),
                s["verdict"].as_str(),
                Some(verdict),
            );
        }
    }
    c.finish(|| run.context());
}

/// `--fail-on-growth`: exit 3 with one `memprof: ` line naming site_a when the limit is under
/// 3000 B per run; 0 at 3000 (not more than the limit) and on a clean series.
#[test]
fn trend_fail_on_growth_gate() {
    let strict = trend(growing_series(), &["--fail-on-growth", "2900"]);
    strict.assert_code(3, "site_a grows by 3000 B per run > 2900");
    assert!(
        strict
            .stderr
            .lines()
            .any(|l| l.starts_with("memprof: 1 site(s) grow") && l.contains("site_a")),
        "the gate names the site\n{}",
        strict.context()
    );
    trend(growing_series(), &["--fail-on-growth", "3100"])
        .assert_code(0, "3000 B per run is under 3100");
    let clean = trend(clean_series(), &["--fail-on-growth", "1"]);
    clean.assert_code(0, "a clean series passes the strictest gate");
    assert!(
        clean.stdout.contains("3 runs") && !clean.stdout.contains("growing "),
        "text: no growing site\n{}",
        clean.context()
    );
}

/// The text names site_a as growing with its slope, and `--html` writes a page with the chart
/// and every run's bytes of site_a.
#[test]
fn trend_text_and_html() {
    let html = scratch().join("trend.html");
    let _ = fs::remove_file(&html);
    let run = trend(
        growing_series(),
        &["--html", html.to_str().unwrap(), "--top", "3"],
    );
    run.assert_code(0, "no gate asked");
    let mut c = Checks::new("trend text and html");
    let first_site = run.stdout.lines().nth(4).unwrap_or_default();
    c.check(
        first_site.starts_with("growing ")
            && first_site.contains("+3000.0 B")
            && first_site.contains("site_a")
            && first_site.ends_with(" 2000 5000 8000 11000 14000 17000 20000 23000 26000 29000"),
        format!("first site line: {first_site}"),
    );
    c.check(
        run.stdout.contains("... 2 more sites (--top)"),
        "5 sites, 3 shown".to_string(),
    );
    let page = fs::read_to_string(&html).unwrap_or_default();
    c.check(
        page.contains("<svg id=\"trend-chart\"") && page.matches("<polyline").count() == 6,
        "the chart draws the total and the 5 sites".to_string(),
    );
    c.check(
        page.contains("<td>2000</td><td>5000</td>") && page.contains("<td>29000</td></tr>"),
        "site_a's row".to_string(),
    );
    c.finish(|| run.context());
}

/// Too few reports, or a file that is not a report: one `memprof: ` line, non-zero exit.
#[test]
fn trend_bad_input_fails_cleanly() {
    let series = growing_series();
    let two = trend(&series[..2], &[]);
    let (mut c, _) = clean_error(&two, "trend of two reports".to_string());
    c.check(
        two.stderr
            .contains("a trend needs at least 3 reports (2 given)"),
        "says why".to_string(),
    );
    c.finish(|| two.context());
    let junk = scratch().join("junk.json");
    fs::write(&junk, "{\"type\":\"diff\"}\n").unwrap();
    let mut bad = series[..2].to_vec();
    bad.push(junk);
    let run = trend(&bad, &[]);
    let (c, _) = clean_error(&run, "trend with a file that is no report".to_string());
    c.finish(|| run.context());
}
