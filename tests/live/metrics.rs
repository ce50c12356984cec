//! `--metrics`: the exposition, scraped by Prometheus, and the shipped rules checked by promtool.

use std::{
    net::TcpListener,
    path::Path,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::json;

use super::{
    HOLD_NAMES, HOLD_TABLE, REPO, STEADY_BYTES, finish_trace,
    http::{free_port, http_get, poll},
    prometheus::Prometheus,
    steady, trace_steady,
};
use crate::common::{Proc, memprof_trace, require_root, tool};

#[test]
fn prometheus_scrapes_exact_outstanding_bytes() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (mut mp, pid) = trace_steady(&["--metrics", &addr], &["50"]);
    let ready_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    mp.expect_stderr_start(
        &format!("memprof: Prometheus metrics at http://{addr}/metrics"),
        Duration::from_secs(5),
        String::new,
    );

    // The exposition itself.
    let own = format!("memprof_heap_outstanding_bytes{{pid=\"{pid}\"}} {STEADY_BYTES}");
    let scrape = poll(Duration::from_secs(20), || {
        http_get(port, "/metrics")
            .ok()
            .filter(|r| r.body.lines().any(|l| l == own))
    })
    .unwrap_or_else(|| {
        let last = http_get(port, "/metrics").map(|r| r.body);
        panic!(
            "no `{own}` in /metrics within 20 s: {last:?}\n{}",
            mp.output_tail()
        )
    });
    assert_eq!(
        scrape.header("Content-Type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(scrape.body.ends_with("# EOF\n"), "{}", scrape.body);

    let prom = Prometheus::start(port);
    let selector = format!("memprof_heap_outstanding_bytes{{pid=\"{pid}\"}}");
    // Wait for samples scraped at least a second after the fixture was ready (memprof publishes
    // every 500 ms), then they must all be exactly what the fixture holds.
    let samples = poll(Duration::from_secs(45), || {
        let result = prom.query(&format!("{selector}[1m]"));
        let values = result.first()?["values"].as_array()?.clone();
        let after: Vec<(f64, String)> = values
            .iter()
            .map(|v| (v[0].as_f64().unwrap(), v[1].as_str().unwrap().to_string()))
            .filter(|(t, _)| *t >= ready_at + 1.0)
            .collect();
        (after.len() >= 2).then_some(after)
    })
    .unwrap_or_else(|| {
        panic!(
            "prometheus has no two samples of {selector} within 45 s\ntargets: {}\n{}\n{}",
            prom.api("/api/v1/targets"),
            prom.proc.output_tail(),
            mp.output_tail()
        )
    });
    for (t, v) in &samples {
        assert_eq!(v, &STEADY_BYTES.to_string(), "sample at {t}: {samples:?}");
    }

    // The instant query, as a user would type it.
    let result = prom.query("memprof_heap_outstanding_bytes");
    eprintln!("query memprof_heap_outstanding_bytes -> {}", json!(result));
    assert_eq!(result.len(), 1, "{result:?}");
    let metric = &result[0]["metric"];
    assert_eq!(metric["pid"], pid.to_string());
    assert_eq!(metric["job"], "memprof");
    assert_eq!(metric["instance"], addr);
    assert_eq!(result[0]["value"][1], STEADY_BYTES.to_string());

    // The rest of the exposition, through Prometheus.
    let one = |name: &str| prom.value(&format!("{name}{{pid=\"{pid}\"}}"));
    assert_eq!(one("memprof_up"), "1");
    assert_eq!(one("memprof_heap_outstanding_allocations"), "2");
    assert_eq!(
        one("memprof_heap_allocated_bytes_total"),
        STEADY_BYTES.to_string()
    );
    assert_eq!(one("memprof_heap_freed_bytes_total"), "0");
    assert_eq!(one("memprof_allocations_total"), "2");
    assert_eq!(one("memprof_frees_total"), "0");
    assert_eq!(one("memprof_leak_detected"), "0");
    assert_eq!(one("memprof_lost_events_total"), "0");
    assert_eq!(one("memprof_unmatched_frees_total"), "0");
    assert_eq!(one("memprof_mmap_outstanding_bytes"), "0");
    assert!(one("memprof_rss_bytes").parse::<u64>().unwrap() > STEADY_BYTES);
    let site = |name: &str| {
        prom.value(&format!(
            "memprof_site_outstanding_bytes{{pid=\"{pid}\",site=\"{name}\"}}"
        ))
    };
    assert_eq!(site("hold_table"), HOLD_TABLE.to_string());
    assert_eq!(site("hold_names"), HOLD_NAMES.to_string());
    let names = prom.query("memprof_site_outstanding_bytes{site=\"hold_names\"}");
    assert_eq!(names[0]["metric"]["allocator"], "calloc");
    assert_eq!(
        prom.query("count(memprof_site_growth_bytes_per_second)")[0]["value"][1],
        "2"
    );

    // The scrape is healthy and the shipped rules are loaded, with nothing firing.
    let targets = prom.api("/api/v1/targets");
    let target = &targets["activeTargets"][0];
    assert_eq!(target["health"], "up", "{targets}");
    assert_eq!(target["lastError"], "", "{targets}");
    let rules = prom.api("/api/v1/rules");
    let loaded: Vec<&str> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        loaded,
        [
            "MemprofLeakDetected",
            "MemprofHeapGrowthHigh",
            "MemprofRssNearLimit",
            "MemprofEventsLost"
        ],
        "{rules}"
    );
    let alerts = prom.api("/api/v1/alerts");
    assert_eq!(alerts["alerts"], json!([]), "{alerts}");

    let mut prom = prom;
    prom.proc.stop(libc::SIGTERM, Duration::from_secs(10));
    let output = finish_trace(mp);
    assert!(output.contains("hold_table"), "{output}");
}

/// `--limit` is exported as memprof_rss_limit_bytes for the RssNearLimit rule.
#[test]
fn metrics_export_the_limit() {
    require_root();
    let port = free_port();
    let (mut mp, pid) = trace_steady(
        &["--metrics", &format!(":{port}"), "--limit", "1.5GiB"],
        &["50"],
    );
    // A bare `:PORT` binds loopback.
    mp.expect_stderr_start(
        &format!("memprof: Prometheus metrics at http://127.0.0.1:{port}/metrics"),
        Duration::from_secs(5),
        String::new,
    );
    let want = format!("memprof_rss_limit_bytes{{pid=\"{pid}\"}} {}", 3u64 << 29);
    let found = poll(Duration::from_secs(20), || {
        http_get(port, "/metrics")
            .ok()
            .filter(|r| r.body.lines().any(|l| l == want))
    });
    assert!(
        found.is_some(),
        "no `{want}` in /metrics\n{}",
        mp.output_tail()
    );
    finish_trace(mp);
}

#[test]
fn metrics_address_in_use_is_a_clear_error() {
    require_root();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut mp = Proc::spawn(
        "memprof trace --metrics (taken)",
        &mut memprof_trace(&[
            "--metrics",
            &addr,
            "--duration",
            "5s",
            "--",
            steady().to_str().unwrap(),
            "5",
        ]),
    );
    let status = mp.wait(Duration::from_secs(30));
    let output = mp.output_tail();
    assert!(
        status.is_some_and(|s| !s.success() && s.code().is_some()),
        "memprof should fail (status {status:?})\n{output}"
    );
    assert!(
        output.contains(&format!("--metrics {addr}: cannot listen on {addr}"))
            && output.contains("Address already in use"),
        "{output}"
    );
    assert!(!output.contains("panicked"), "{output}");
}

#[test]
fn promtool_checks_and_tests_rules() {
    let dir = Path::new(REPO).join("deploy/prometheus");
    let promtool = tool("PROMTOOL", "promtool");
    for args in [
        ["check", "rules", "memprof-rules.yml"],
        ["test", "rules", "memprof-rules.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {promtool}: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("promtool {}:\n{text}", args.join(" "));
        assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
        assert!(text.contains("SUCCESS"), "{text}");
    }
}

/// deploy/prometheus/prometheus.yml, its token file put at a temporary path, checked by
/// promtool with the rules it loads.
#[test]
fn promtool_checks_the_shipped_config() {
    let dir = super::TempDir::new("prometheus-config");
    let deploy = Path::new(REPO).join("deploy/prometheus");
    let token = dir.0.join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let config = std::fs::read_to_string(deploy.join("prometheus.yml")).unwrap();
    assert!(
        config.contains("credentials_file: /etc/memprof/token"),
        "{config}"
    );
    let config = config.replace("/etc/memprof/token", token.to_str().unwrap());
    std::fs::write(dir.0.join("prometheus.yml"), config).unwrap();
    std::fs::copy(
        deploy.join("memprof-rules.yml"),
        dir.0.join("memprof-rules.yml"),
    )
    .unwrap();
    let out = Command::new(tool("PROMTOOL", "promtool"))
        .args(["check", "config", "prometheus.yml"])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check config failed:\n{text}"
    );
    assert!(text.contains("SUCCESS: 1 rule files found"), "{text}");
}
