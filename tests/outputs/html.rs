//! HTML: rendered by headless Chromium (a screenshot and `--dump-dom`).

use std::{
    ffi::OsString,
    fs,
    path::Path,
    process::Output,
    sync::atomic::{AtomicUsize, Ordering},
};

use super::{LEAK_FN, context, run, trace, work_dir};
use crate::common::headless_chromium;

fn chromium(args: &[OsString]) -> Output {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run_no = RUNS.fetch_add(1, Ordering::Relaxed);
    let profile = work_dir().join(format!("chromium-profile-{run_no}"));
    let _ = fs::remove_dir_all(&profile);
    let out = run(headless_chromium("MEMPROF_TEST_CHROMIUM", &profile).args(args));
    assert!(out.status.success(), "{}", context("chromium", &out));
    out
}

fn file_url(path: &Path) -> OsString {
    let mut url = OsString::from("file://");
    url.push(path);
    url
}

#[test]
fn html_renders_in_chromium() {
    let t = trace();
    let page = file_url(&t.file("report.html"));
    let png = t.file("report.png");
    let _ = fs::remove_file(&png);
    let mut shot = OsString::from("--screenshot=");
    shot.push(&png);
    chromium(&[shot, "--window-size=1280,2000".into(), page.clone()]);
    let size = fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    // A blank 1280x2000 PNG is a few KB; the rendered page is far larger.
    assert!(size > 20_000, "screenshot is {size} bytes");

    let dom = String::from_utf8(chromium(&["--dump-dom".into(), page]).stdout).unwrap();
    assert!(
        dom.contains("<code>leak_widgets</code>"),
        "site name in the table"
    );
    assert!(dom.contains(">21,000 B<"), "exact bytes of the leak site");
    assert!(dom.contains("<svg id=\"memory-chart\""), "chart");
    assert!(dom.contains("<polyline class=\"heap\""), "heap line");
    assert!(
        dom.contains("<title>leak_widgets (21,000 bytes"),
        "flamegraph inline"
    );
    assert!(
        dom.contains("<details><summary>3 frames</summary>"),
        "expandable stacks"
    );
    assert!(dom.contains(&format!("memprof report: pid {}", t.pid)));
    assert!(dom.contains("28,000 B"), "outstanding bytes in the header");
    // The command's markup stays text: no <i> element was created from it.
    assert!(
        dom.contains("&lt;i&gt;x&amp;y&lt;/i&gt;"),
        "escaped command"
    );
    assert!(!dom.contains("<i>x"), "command injected markup");
    assert!(dom.contains("<td>scratch</td>"), "phases table");
    if t.verdict(LEAK_FN) == "leak" {
        assert!(dom.contains("<h2>Recommendations</h2>"), "recommendations");
    }
}

#[test]
fn html_is_self_contained() {
    let t = trace();
    let html = t.read("report.html");
    for needle in ["<script", "src=", "href=", "@import", "<link", "<iframe"] {
        assert!(!html.contains(needle), "page contains {needle}");
    }
    assert!(
        html.match_indices("url(")
            .all(|(i, _)| html[i..].starts_with("url(#"))
    );
}
