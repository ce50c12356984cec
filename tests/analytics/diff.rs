//! `memprof diff` of two saved reports: totals and every site exact, the gate, the text.

use std::{ffi::OsString, fs, path::PathBuf, sync::OnceLock};

use serde_json::Value;

use super::{array, fixtures, run_memprof, scratch, summary};
use crate::common::{Checks, Finished, num, site_groups, spawn_trace, stack};

/// diff_sites.c block sizes per site.
const DIFF_SIZES: [(&str, u64); 5] = [
    ("site_a", 1000),
    ("site_b", 2000),
    ("site_c", 3000),
    ("site_d", 4000),
    ("site_same", 500),
];
/// The two diff runs: `diff_sites A B C D` (site_same always leaks 5 blocks).
const DIFF_BEFORE: [u64; 4] = [10, 20, 0, 4];
const DIFF_AFTER: [u64; 4] = [50, 5, 7, 0];

/// The two diff_sites runs saved with --output: (before path, after path, before run, after
/// run).
///
/// diff_sites holds its blocks for 300 ms before it exits. Without that pause, in about 1 run of
/// 3 (under load) memprof first processed the stacks after the process had exited, could not
/// read its address space, and reported every frame without function or module (memprof bug,
/// see the test report); the diff then sees one `?` site instead of the real ones.
fn diff_runs() -> &'static (PathBuf, PathBuf, Finished, Finished) {
    static RUNS: OnceLock<(PathBuf, PathBuf, Finished, Finished)> = OnceLock::new();
    RUNS.get_or_init(|| {
        let run = |file: &str, counts: [u64; 4]| -> (PathBuf, Finished) {
            let path = scratch().join(file);
            let _ = fs::remove_file(&path);
            let mut cmd = vec![fixtures().diff_sites.as_os_str().to_owned()];
            cmd.extend(counts.iter().map(|n| OsString::from(n.to_string())));
            let done = spawn_trace(&["--output", path.to_str().unwrap()], &cmd);
            done.assert_code(0, "diff_sites exits 0 and no leak is a verdict leak");
            (path, done)
        };
        let (a, ra) = run("a.json", DIFF_BEFORE);
        let (b, rb) = run("b.json", DIFF_AFTER);
        (a, b, ra, rb)
    })
}

/// `memprof diff a.json b.json OPTS` of the two diff_sites runs, to the end.
fn diff(opts: &[&str]) -> Finished {
    let (a, b, _, _) = diff_runs();
    let mut args = vec![OsString::from("diff"), a.into(), b.into()];
    args.extend(opts.iter().map(OsString::from));
    run_memprof(&args)
}

/// The expected site rows of the diff: (function, status, before bytes, after bytes, before
/// allocs, after allocs), derived from DIFF_BEFORE/DIFF_AFTER and DIFF_SIZES, in the diff's
/// order (delta_bytes descending).
fn expected_diff_sites() -> Vec<(&'static str, &'static str, u64, u64, u64, u64)> {
    let mut rows: Vec<_> = DIFF_SIZES
        .iter()
        .enumerate()
        .map(|(i, &(name, size))| {
            let (nb, na) = if i < 4 {
                (DIFF_BEFORE[i], DIFF_AFTER[i])
            } else {
                (5, 5)
            };
            let status = match (nb, na) {
                (0, _) => "new",
                (_, 0) => "gone",
                (b, a) if a > b => "grew",
                (b, a) if a < b => "shrank",
                _ => "same",
            };
            (name, status, nb * size, na * size, nb, na)
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.3 as i64 - r.2 as i64));
    rows
}

/// `memprof diff a.json b.json --json`: totals and every site exact. Before: site_a 10 x 1000,
/// site_b 20 x 2000, site_d 4 x 4000, site_same 5 x 500 = 68500 B. After: site_a 50 x 1000,
/// site_b 5 x 2000, site_c 7 x 3000, site_same 5 x 500 = 83500 B. So site_a grew +40000,
/// site_c is new +21000, site_same is the same, site_d is gone -16000, site_b shrank -30000;
/// total +15000 (+21.9%). The two runs' addresses differ (ASLR); sites still match by name.
#[test]
fn diff_reports_exact() {
    let (a, b, ra, rb) = diff_runs();
    let before: Value = serde_json::from_str(&fs::read_to_string(a).unwrap()).unwrap();
    let after: Value = serde_json::from_str(&fs::read_to_string(b).unwrap()).unwrap();
    let run = diff(&["--json"]);
    run.assert_code(0, "no --fail-if-grows");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "diff --json prints one line\n{}",
        run.context()
    );
    let d: Value = serde_json::from_str(lines[0]).unwrap();
    let ctx = || {
        format!(
            "diff: {}\nbefore:\n{}\nafter:\n{}\n{}\n{}",
            serde_json::to_string_pretty(&d).unwrap(),
            summary(&before),
            summary(&after),
            ra.context(),
            rb.context()
        )
    };
    let mut c = Checks::new("memprof diff --json");
    let total = |counts: [u64; 4]| -> u64 {
        (0..4).map(|i| counts[i] * DIFF_SIZES[i].1).sum::<u64>() + 5 * 500
    };
    let (tb, ta) = (total(DIFF_BEFORE), total(DIFF_AFTER));
    c.eq("computed totals (68500, 83500)", (tb, ta), (68_500, 83_500));
    for (what, r) in [("before", &before), ("after", &after)] {
        c.eq(
            &format!("{what}: unknown_frames (every frame of diff_sites is named)"),
            r["unknown_frames"].as_u64(),
            Some(0),
        );
    }
    c.eq("type", d["type"].as_str(), Some("diff"));
    c.eq(
        "outstanding_bytes_before",
        d["outstanding_bytes_before"].as_u64(),
        Some(tb),
    );
    c.eq(
        "outstanding_bytes_after",
        d["outstanding_bytes_after"].as_u64(),
        Some(ta),
    );
    c.eq(
        "delta_bytes",
        d["delta_bytes"].as_i64(),
        Some(ta as i64 - tb as i64),
    );
    let pct = d["growth_pct"].as_f64().unwrap_or(f64::NAN);
    let want_pct = (ta as f64 - tb as f64) * 100.0 / tb as f64;
    c.check(
        (pct - want_pct).abs() < 1e-9,
        format!("growth_pct {pct}, expected {want_pct}"),
    );
    c.eq("mmap_delta_bytes", d["mmap_delta_bytes"].as_i64(), Some(0));

    let sites = array(&d, "sites");
    let got: Vec<_> = sites
        .iter()
        .map(|s| {
            (
                s["stack"][0].as_str().unwrap_or("?").to_string(),
                s["status"].as_str().unwrap_or("?").to_string(),
                s["bytes_before"].as_u64().unwrap_or(u64::MAX),
                s["bytes_after"].as_u64().unwrap_or(u64::MAX),
                s["allocs_before"].as_u64().unwrap_or(u64::MAX),
                s["allocs_after"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    let want: Vec<_> = expected_diff_sites()
        .into_iter()
        .map(|(f, st, bb, ba, ab, aa)| (f.to_string(), st.to_string(), bb, ba, ab, aa))
        .collect();
    c.eq(
        "sites (stack[0], status, bytes before/after, allocs before/after), by delta desc",
        got,
        want,
    );
    for s in sites {
        let name = s["stack"][0].as_str().unwrap_or("?");
        let (bb, ba) = (num(s, "bytes_before") as i64, num(s, "bytes_after") as i64);
        let (ab, aa) = (
            num(s, "allocs_before") as i64,
            num(s, "allocs_after") as i64,
        );
        c.eq(
            &format!("{name}: delta_bytes"),
            s["delta_bytes"].as_i64(),
            Some(ba - bb),
        );
        c.eq(
            &format!("{name}: delta_allocs"),
            s["delta_allocs"].as_i64(),
            Some(aa - ab),
        );
        c.eq(
            &format!("{name}: allocator"),
            s["allocator"].as_str(),
            Some("malloc"),
        );
        c.eq(&format!("{name}: kind"), s["kind"].as_str(), Some("heap"));
        let labels: Vec<&str> = array(s, "stack").iter().filter_map(Value::as_str).collect();
        c.check(
            labels.len() >= 2 && labels[1] == "main" && !labels.iter().any(|l| l.starts_with("0x")),
            format!(
                "{name}: stack labels should be names (site, main, ...), never addresses: \
                 {labels:?}"
            ),
        );
    }
    // Frames carry no load address: the site_a frame is at the same offset of the same file
    // (with the same build id) in both runs, whatever ASLR did.
    let place = |r: &Value| -> Option<(String, String, String)> {
        let f = site_groups(r, "site_a")
            .first()
            .and_then(|g| stack(g).first())?;
        Some((
            f["module"].as_str()?.to_string(),
            f["offset"].as_str()?.to_string(),
            f["build_id"].as_str()?.to_string(),
        ))
    };
    c.check(
        place(&before).is_some() && place(&before) == place(&after),
        format!(
            "site_a's frame (module, offset, build id) should be the same in both runs: {:?} vs \
             {:?}",
            place(&before),
            place(&after)
        ),
    );
    c.check(
        ![&before, &after]
            .iter()
            .any(|r| r.to_string().contains("\"addr\"")),
        "no absolute addresses in the reports",
    );
    c.finish(ctx);
}

/// `--fail-if-grows`: +21.9% is more than 1% (exit 3, one `memprof: ` line on stderr) and less
/// than 10000% (exit 0).
#[test]
fn diff_fail_if_grows_gate() {
    let gate = |pct: &str| diff(&["--json", "--fail-if-grows", pct]);
    let strict = gate("1");
    strict.assert_code(3, "outstanding heap grew 21.9% > 1%");
    assert!(
        strict
            .stderr
            .lines()
            .any(|l| l.starts_with("memprof: ") && l.contains("68500") && l.contains("83500")),
        "the gate should say why, with both totals\n{}",
        strict.context()
    );
    let lax = gate("10000");
    lax.assert_code(0, "21.9% is under 10000%");
    assert!(
        lax.stdout.lines().count() == 1 && lax.stdout.contains("\"type\":\"diff\""),
        "the diff is printed whatever the gate says\n{}",
        lax.context()
    );
}

/// Text diff: the summary counts and the grown site's row.
#[test]
fn diff_text_names_grown_site() {
    let run = diff(&[]);
    run.assert_code(0, "no gate");
    let mut c = Checks::new("memprof diff (text)");
    c.check(
        run.stdout
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("memprof diff: ")),
        "first line should be the `memprof diff:` summary",
    );
    c.check(
        run.stdout
            .contains("1 new, 1 gone, 1 grew, 1 shrank, 1 same"),
        "call-site counts should be 1 new, 1 gone, 1 grew, 1 shrank, 1 same",
    );
    for (site, status) in [
        ("site_a", "grew"),
        ("site_c", "new"),
        ("site_d", "gone"),
        ("site_b", "shrank"),
    ] {
        c.check(
            run.stdout.lines().any(|l| {
                l.contains(&format!(" {status} ")) && l.contains(&format!("{site} <- main"))
            }),
            format!("a row should show {site} as {status}"),
        );
    }
    c.check(
        !run.stdout.lines().any(|l| l.contains("site_same <-")),
        "site_same did not change: no row",
    );
    c.finish(|| run.context());
}
