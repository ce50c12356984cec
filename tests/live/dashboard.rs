//! `--ui`: the dashboard's page, state and events, rendered live by Chromium, and the status line.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{
    SAFETY_NET, STEADY_BYTES, TempDir,
    chromium::Chromium,
    finish_trace,
    http::{free_port, http_get, poll},
    steady, trace_steady,
};
use crate::common::{MEMPROF, require_root, tool};

/// What the test reads from the page at each poll.
const PAGE_PROBE: &str = r#"JSON.stringify({
  updates: Number(document.getElementById('updates').textContent),
  heapLine: document.getElementById('heap-line').getAttribute('points'),
  rssLine: document.getElementById('rss-line').getAttribute('points'),
  dataPoints: Number(document.getElementById('chart').getAttribute('data-points')),
  heap: document.getElementById('heap').textContent,
  status: document.getElementById('status').textContent,
  pid: document.getElementById('pid').textContent,
  rows: Array.from(document.querySelectorAll('#sites tbody tr')).map(
    (tr) => Array.from(tr.cells).map((c) => c.textContent)),
  origin: location.origin,
  resources: performance.getEntriesByType('resource').map((e) => e.name)
})"#;

#[test]
fn dashboard_serves_page_state_and_events() {
    require_root();
    let port = free_port();
    let (mut mp, pid) = trace_steady(&["--ui", &port.to_string()], &["50", "grow"]);
    // A bare port binds loopback.
    mp.expect_stderr_start(
        &format!("memprof: live dashboard at http://127.0.0.1:{port}/"),
        Duration::from_secs(5),
        String::new,
    );

    let page = http_get(port, "/").unwrap();
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("Content-Type"),
        Some("text/html; charset=utf-8")
    );
    for external in ["http:", "https:", "//cdn", "src=\"//"] {
        assert!(!page.body.contains(external), "page refers to {external}");
    }
    assert!(page.body.contains("new EventSource('events')"));

    let state = poll(Duration::from_secs(20), || {
        let r = http_get(port, "/api/state").ok()?;
        let v: Value = serde_json::from_str(&r.body).ok()?;
        (v["updates"].as_u64()? >= 1).then_some((r, v))
    });
    let (r, v) = state.unwrap_or_else(|| panic!("no update in /api/state\n{}", mp.output_tail()));
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(v["pid"], pid);
    assert_eq!(v["finished"], false);
    assert!(
        v["heap_outstanding_bytes"].as_u64().unwrap() >= STEADY_BYTES,
        "{v}"
    );
    assert!(!v["timeline"].as_array().unwrap().is_empty(), "{v}");

    // Two consecutive SSE messages, raw.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    let mut ids = Vec::new();
    let mut line = String::new();
    while ids.len() < 2 {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading /events: {e} after {head}"));
        assert!(n > 0, "/events closed early: {head}");
        if !head.ends_with("\r\n\r\n") {
            head.push_str(&line);
            continue;
        }
        if let Some(data) = line.strip_prefix("data: ") {
            let msg: Value = serde_json::from_str(data.trim_end()).unwrap();
            assert_eq!(msg["pid"], pid);
            ids.push(msg["updates"].as_u64().unwrap());
        }
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    assert!(ids[1] > ids[0], "updates must increase: {ids:?}");
    drop(reader);

    finish_trace(mp);
}

#[test]
fn dashboard_updates_live_in_chromium() {
    require_root();
    let port = free_port();
    let (mp, pid) = trace_steady(&["--ui", &format!("127.0.0.1:{port}")], &["50", "grow"]);
    let url = format!("http://127.0.0.1:{port}/");

    let mut chromium = Chromium::open(&url);
    let targets = chromium.call("Target.getTargets", json!({}), None);
    let target = targets["targetInfos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "page")
        .unwrap_or_else(|| panic!("no page target: {targets}"))["targetId"]
        .clone();
    let session = chromium.call(
        "Target.attachToTarget",
        json!({"targetId": target, "flatten": true}),
        None,
    )["sessionId"]
        .as_str()
        .unwrap()
        .to_string();

    // Poll the page until it has received several updates and redrawn the chart with
    // different data at least twice.
    let mut seen_lines: Vec<String> = Vec::new();
    let mut last = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let r = chromium.call(
            "Runtime.evaluate",
            json!({"expression": PAGE_PROBE, "returnByValue": true}),
            Some(&session),
        );
        if let Some(text) = r["result"]["value"].as_str() {
            last = serde_json::from_str(text).unwrap();
            let line = last["heapLine"].as_str().unwrap_or("").to_string();
            if !line.is_empty() && !seen_lines.contains(&line) {
                seen_lines.push(line);
            }
            if last["updates"].as_u64().unwrap_or(0) >= 3 && seen_lines.len() >= 3 {
                break;
            }
        }
        thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "chromium saw {} updates, {} distinct heap charts; last state: {}",
        last["updates"],
        seen_lines.len(),
        last
    );
    assert!(
        last["updates"].as_u64().unwrap_or(0) >= 3 && seen_lines.len() >= 3,
        "the page did not update live: {} distinct charts, last {last}\n{}\n{}",
        seen_lines.len(),
        chromium.proc.output_tail(),
        mp.output_tail()
    );
    assert_eq!(last["pid"], pid.to_string());
    assert_eq!(last["status"], "live");
    // One chart point per timeline sample, for both heap and RSS.
    let points = last["dataPoints"].as_u64().unwrap();
    let heap_points = last["heapLine"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .count() as u64;
    let rss_points = last["rssLine"].as_str().unwrap().split_whitespace().count() as u64;
    assert!(points >= 3 && heap_points == points, "{last}");
    assert!(rss_points >= 2, "{last}");
    // The growing site leads the table; the held buffers are listed too.
    let rows = last["rows"].as_array().unwrap();
    assert_eq!(rows[0][0], "grow_slowly", "{last}");
    assert_eq!(rows[0][1], "malloc", "{last}");
    let sites: Vec<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert!(
        sites.contains(&"hold_table") && sites.contains(&"hold_names"),
        "{last}"
    );
    // Nothing but the page's own origin was fetched.
    let origin = last["origin"].as_str().unwrap();
    for r in last["resources"].as_array().unwrap() {
        assert!(
            r.as_str().unwrap().starts_with(origin),
            "external fetch: {r}"
        );
    }

    chromium.close();
    finish_trace(mp);
}

/// On a terminal, a trace shows a status line (elapsed time, events per second, outstanding
/// bytes, lost events) on stderr, and never on stdout: `script` gives memprof a pseudo-terminal
/// for stderr while stdout goes to a file.
#[test]
fn status_line_on_a_terminal_goes_to_stderr_only() {
    require_root();
    let dir = TempDir::new("status");
    let stdout_file = dir.0.join("stdout.txt");
    let shell = format!(
        "{MEMPROF} trace --duration {SAFETY_NET} -- {} 2 grow > {}",
        steady().display(),
        stdout_file.display()
    );
    let out = Command::new(tool("SCRIPT", "script"))
        .args(["-qec", &shell, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run script(1) from util-linux: {e}"));
    let terminal = String::from_utf8_lossy(&out.stdout);
    let stdout = fs::read_to_string(&stdout_file).unwrap();
    assert!(
        out.status.success(),
        "memprof under script failed: {:?}\n{terminal}",
        out.status
    );
    let status_lines = terminal.matches("events/s").count();
    assert!(
        status_lines >= 2,
        "expected at least 2 status lines on the terminal (one per 500 ms sample in a 2 s \
         trace), got {status_lines}:\n{terminal}"
    );
    for field in ["memprof: ", " s  ", "outstanding ", "lost "] {
        assert!(
            terminal.contains(field),
            "status line lacks {field:?}:\n{terminal}"
        );
    }
    assert!(
        !stdout.contains("events/s"),
        "the status line leaked to stdout:\n{stdout}"
    );
    assert!(
        stdout.contains("memprof report: pid"),
        "stdout should hold the text report:\n{stdout}"
    );
}
