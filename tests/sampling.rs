//! End-to-end tests of byte sampling (`memprof trace --sample-bytes`) on real eBPF, with the
//! fixture tests/fixtures/sampling.c (its header lists what each site allocates).
//!
//! Statistical bounds. With mean interval `T`, a block of `s` bytes is sampled with probability
//! `p = 1 - exp(-s/T)`, independently of every other block (the sample points are a Poisson
//! process over the allocated bytes, whose counts in disjoint intervals are independent), and a
//! sampled block stands for `1/p` blocks. The estimate of a site's `N` blocks is therefore a sum
//! of `N` independent terms `1/p` (probability `p`) or 0: unbiased, with variance
//! `N (1 - p) / p` (blocks squared) and relative standard error `sqrt((1 - p) / (N p))`.
//! For `T` = 64 KiB and `s` = 1 KiB, `p` = 0.015504, so:
//!
//! | site | N | expected samples | relative std error | 5 std errors |
//! | --- | --- | --- | --- | --- |
//! | churn_a (100 MiB) | 102 400 | 1588 | 2.49% | 12.4% |
//! | keep_b (10 MiB) | 10 240 | 159 | 7.87% | 39.4% |
//! | both | 112 640 | 1746 | 2.37% | 11.9% |
//!
//! The tests assert each estimate within 5 standard errors (a false failure once in ~1.7
//! million runs per bound). The other error sources are far smaller: the kernel's exponential
//! draw samples a block with probability within 1e-4 (relative) of `p` (see
//! `memprof_common::exp_interval`), and the agent rounds each sampled block's `1/p` to a
//! neighbouring integer at random (unbiased, standard deviation at most 1/2 per sample).
//!
//! Blocks of 4 MiB against `T` = 64 KiB are missed with probability `exp(-64)`: counted exactly.
//!
//! Needs root (eBPF) and `cc`: `sudo -E cargo test --release -p memprof-user --test sampling --
//! --test-threads=1` (a few seconds).

use std::{collections::HashMap, fs, path::PathBuf, sync::OnceLock};

use serde_json::Value;

mod common;
use common::{
    Checks, DEADLINE, FP, Finished, SAFETY_NET, compile_c, num, require_root, run_trace,
    site_total, spawn_trace, work_dir,
};

/// The sampling interval of the tests.
const T: u64 = 64 << 10;
const SMALL: u64 = 1024;
const A_BLOCKS: u64 = 102_400;
const B_BLOCKS: u64 = 10_240;
const BIG: u64 = 4 << 20;
const N_BIG: u64 = 8;

fn fixture() -> &'static PathBuf {
    static FIXTURE: OnceLock<PathBuf> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        compile_c(
            &work_dir("memprof-sampling"),
            "sampling",
            "sampling.c",
            &[FP],
        )
    })
}

/// A finished trace of `sampling SCENARIO`: the run, its report record and its CSV rows by site.
struct Trace {
    run: Finished,
    report: Value,
    sites: HashMap<String, HashMap<String, String>>,
}

fn trace(opts: &[&str], scenario: &str) -> Trace {
    require_root();
    let csv = work_dir("memprof-sampling").join(format!("{scenario}-{}.csv", opts.join("_")));
    let _ = fs::remove_file(&csv);
    let mut args = vec!["--csv", csv.to_str().unwrap()];
    args.extend(opts);
    let run = spawn_trace(&args, &[fixture().to_str().unwrap(), scenario]);
    assert_eq!(run.code(), Some(0), "{}", run.context());
    let report = run
        .ndjson()
        .into_iter()
        .rfind(|r| r["type"] == "report")
        .unwrap_or_else(|| panic!("no report record\n{}", run.context()));
    let text = fs::read_to_string(&csv)
        .unwrap_or_else(|e| panic!("read {}: {e}\n{}", csv.display(), run.context()));
    Trace {
        sites: csv_sites(&text),
        run,
        report,
    }
}

/// CSV rows keyed by their `site` column (the fixture's sites have no commas or quotes).
fn csv_sites(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    lines
        .map(|line| {
            let row: HashMap<String, String> = header
                .iter()
                .zip(line.split(','))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            (row["site"].clone(), row)
        })
        .collect()
}

impl Trace {
    /// Column `col` of the CSV row of `site` as a number (0 when the site has no row).
    fn site(&self, site: &str, col: &str) -> u64 {
        self.sites
            .get(site)
            .map_or(0, |row| row[col].parse().expect("a number"))
    }

    /// Outstanding (bytes, allocs) of the leak groups whose innermost frame is `function`.
    fn leak(&self, function: &str) -> (u64, u64) {
        site_total(&self.report, function)
    }

    fn context(&self) -> String {
        self.run.context()
    }
}

/// Relative standard error of the estimated count of `n` blocks of `size` bytes.
fn rel_std_error(n: u64, size: u64) -> f64 {
    let p = -(-(size as f64) / T as f64).exp_m1();
    ((1.0 - p) / (n as f64 * p)).sqrt()
}

/// Checks that `got` is within 5 standard errors of `want` (relative error `rel` each).
fn within(c: &mut Checks, what: &str, got: u64, want: u64, rel: f64) {
    let err = (got as f64 - want as f64) / want as f64;
    c.check(
        err.abs() <= 5.0 * rel,
        format!(
            "{what}: estimate {got}, true {want}: error {:+.2}% exceeds 5 std errors ({:.2}%)",
            err * 100.0,
            5.0 * rel * 100.0
        ),
    );
    eprintln!(
        "{what}: estimate {got}, true {want}, error {:+.2}% ({:+.2} std errors)",
        err * 100.0,
        err / rel
    );
}

#[test]
fn sampled_estimates_are_within_their_statistical_bounds() {
    let t = trace(&["--sample-bytes", "64K"], "volume");
    let mut c = Checks::new("sampled estimates (volume, --sample-bytes 64K)");
    c.eq(
        "sampling",
        t.report["sampling"].clone(),
        serde_json::json!({"mean_bytes": T, "estimated": true}),
    );
    let (rel_a, rel_b) = (
        rel_std_error(A_BLOCKS, SMALL),
        rel_std_error(B_BLOCKS, SMALL),
    );
    let rel_ab = rel_std_error(A_BLOCKS + B_BLOCKS, SMALL);
    within(
        &mut c,
        "churn_a allocated bytes",
        t.site("churn_a", "alloc_bytes"),
        A_BLOCKS * SMALL,
        rel_a,
    );
    within(
        &mut c,
        "churn_a allocations",
        t.site("churn_a", "alloc_objects"),
        A_BLOCKS,
        rel_a,
    );
    within(
        &mut c,
        "keep_b allocated bytes",
        t.site("keep_b", "alloc_bytes"),
        B_BLOCKS * SMALL,
        rel_b,
    );
    let (b_bytes, b_allocs) = t.leak("keep_b");
    within(
        &mut c,
        "keep_b outstanding bytes",
        b_bytes,
        B_BLOCKS * SMALL,
        rel_b,
    );
    within(
        &mut c,
        "keep_b outstanding allocations",
        b_allocs,
        B_BLOCKS,
        rel_b,
    );
    c.eq("keep_b bytes per allocation", b_bytes, b_allocs * SMALL);
    // The two sites together, as the totals see them (the C runtime's own few allocations
    // are far below the bound).
    let sum = t.site("churn_a", "alloc_bytes") + t.site("keep_b", "alloc_bytes");
    within(
        &mut c,
        "both sites' allocated bytes",
        sum,
        (A_BLOCKS + B_BLOCKS) * SMALL,
        rel_ab,
    );
    let totals = &t.report["totals"];
    within(
        &mut c,
        "totals.bytes_allocated",
        num(totals, "bytes_allocated"),
        (A_BLOCKS + B_BLOCKS) * SMALL,
        rel_ab,
    );
    // The ratio of the sites, 10: relative error of a ratio of independent estimates.
    let ratio = t.site("churn_a", "alloc_bytes") as f64 / t.site("keep_b", "alloc_bytes") as f64;
    let rel_ratio = (rel_a * rel_a + rel_b * rel_b).sqrt();
    c.check(
        ((ratio - 10.0) / 10.0).abs() <= 5.0 * rel_ratio,
        format!(
            "site ratio {ratio:.3}, true 10, bound ±{:.1}%",
            500.0 * rel_ratio
        ),
    );
    // Every sampled block of churn_a was freed, and its free matched: nothing outstanding.
    c.eq("churn_a outstanding", t.leak("churn_a"), (0, 0));
    c.eq(
        "churn_a in-use bytes (CSV)",
        t.site("churn_a", "inuse_bytes"),
        0,
    );
    c.eq(
        "churn_a frees (CSV) = its sampled allocations' weight",
        t.site("churn_a", "frees"),
        t.site("churn_a", "alloc_objects"),
    );
    c.eq("unmatched frees", num(totals, "unmatched_frees"), 0);
    c.eq("lost events", num(totals, "lost_events"), 0);
    c.eq("sampled_full", num(&t.report["kernel"], "sampled_full"), 0);
    c.finish(|| t.context());
}

#[test]
fn blocks_far_above_the_interval_are_exact_and_reallocs_settle() {
    let t = trace(&["--sample-bytes", "64K"], "large");
    let mut c = Checks::new("large blocks (--sample-bytes 64K)");
    c.eq(
        "big_keep outstanding",
        t.leak("big_keep"),
        (N_BIG * BIG, N_BIG),
    );
    c.eq(
        "grow_realloc outstanding",
        t.leak("grow_realloc"),
        (N_BIG * BIG, N_BIG),
    );
    for site in ["big_free", "shrink_origin"] {
        c.eq(&format!("{site} outstanding"), t.leak(site), (0, 0));
        c.eq(
            &format!("{site} allocations (CSV)"),
            t.site(site, "alloc_objects"),
            N_BIG,
        );
        c.eq(
            &format!("{site} bytes (CSV)"),
            t.site(site, "alloc_bytes"),
            N_BIG * BIG,
        );
        // shrink_origin's blocks are freed by realloc(p, 16) whose result is (almost surely)
        // not sampled: the kernel settles the provisional free without a new block.
        c.eq(&format!("{site} frees (CSV)"), t.site(site, "frees"), N_BIG);
        c.eq(
            &format!("{site} in use (CSV)"),
            t.site(site, "inuse_bytes"),
            0,
        );
    }
    c.eq(
        "unmatched frees",
        num(&t.report["totals"], "unmatched_frees"),
        0,
    );
    c.eq("lost events", num(&t.report["totals"], "lost_events"), 0);
    c.finish(|| t.context());
}

#[test]
fn without_sampling_the_same_fixture_is_exact() {
    let t = trace(&[], "volume");
    let mut c = Checks::new("volume without sampling");
    c.check(
        t.report.get("sampling").is_none(),
        "an unsampled report has no `sampling`",
    );
    c.eq(
        "churn_a allocations",
        t.site("churn_a", "alloc_objects"),
        A_BLOCKS,
    );
    c.eq(
        "churn_a bytes",
        t.site("churn_a", "alloc_bytes"),
        A_BLOCKS * SMALL,
    );
    c.eq("churn_a frees", t.site("churn_a", "frees"), A_BLOCKS);
    c.eq(
        "keep_b outstanding",
        t.leak("keep_b"),
        (B_BLOCKS * SMALL, B_BLOCKS),
    );
    c.eq("lost events", num(&t.report["totals"], "lost_events"), 0);
    c.finish(|| t.context());
}

#[test]
fn text_and_html_reports_say_they_are_sampled() {
    require_root();
    let html = work_dir("memprof-sampling").join("large.html");
    let _ = fs::remove_file(&html);
    let run = run_trace(
        &[
            "--sample-bytes",
            "64K",
            "--duration",
            SAFETY_NET,
            "--html",
            html.to_str().unwrap(),
            "--",
            fixture().to_str().unwrap(),
            "large",
        ],
        DEADLINE,
    );
    assert_eq!(run.code(), Some(0), "{}", run.context());
    assert!(
        run.stdout
            .contains("sampled      one allocation per 64.0 KiB on average"),
        "the text report must say its numbers are estimates\n{}",
        run.context()
    );
    let page = fs::read_to_string(&html)
        .unwrap_or_else(|e| panic!("read {}: {e}\n{}", html.display(), run.context()));
    assert!(
        page.contains("counts and bytes are estimates"),
        "the HTML report must say its numbers are estimates"
    );
}
