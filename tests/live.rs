//! End-to-end tests of the live endpoints (`memprof trace --metrics ADDR`, `--ui ADDR`) with
//! the tools people use them with: a real Prometheus scraping memprof, promtool checking the
//! shipped alerting rules, and headless Chromium rendering the dashboard.
//!
//! Needs root (eBPF), a memprof built with its kernel programs, `cc`, and the Debian packages
//! `prometheus` (prometheus and promtool) and `chromium`:
//! `sudo -E cargo test --release -p memprof-user --test live -- --test-threads=1`.
//! Everything listens on 127.0.0.1 only; every wait is bounded (60 s at most per process).
//! Environment: `CC` (default `cc`), `PROMETHEUS` (default `prometheus`), `PROMTOOL` (default
//! `promtool`), `CHROMIUM` (default `chromium`).
//!
//! Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: commands
//! on fd 3, replies on fd 4, NUL-terminated JSON), which needs no WebSocket client and no npm
//! package.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

const MEMPROF: &str = env!("CARGO_BIN_EXE_memprof");
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// memprof's own safety net: every trace here ends by itself.
const SAFETY_NET: &str = "55s";
/// What steady.c keeps outstanding: hold_table 100000 + hold_names 16 x 1466.
const STEADY_BYTES: u64 = 123_456;
const HOLD_TABLE: u64 = 100_000;
const HOLD_NAMES: u64 = 23_456;

// ---------------------------------------------------------------------------------------------
// Processes and fixtures
// ---------------------------------------------------------------------------------------------

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the live tests need root (eBPF); run `sudo -E cargo test -p memprof-user --test live`"
    );
}

fn tool(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

/// steady.c, compiled once per test process.
fn steady() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("memprof-fixtures");
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("steady_fp");
        let cc = tool("CC", "cc");
        let res = Command::new(&cc)
            .args(["-O2", "-g", "-Wall", "-fno-omit-frame-pointer", "-o"])
            .arg(&out)
            .arg(Path::new(REPO).join("tests/fixtures/steady.c"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
        assert!(
            res.status.success(),
            "compiling steady.c failed:\n{}",
            String::from_utf8_lossy(&res.stderr)
        );
        out
    })
}

/// A pipe read line by line on its own thread.
struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
    eof: Arc<AtomicBool>,
}

impl Lines {
    fn new(reader: impl Read + Send + 'static) -> Lines {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let eof = Arc::new(AtomicBool::new(false));
        let (l, e) = (lines.clone(), eof.clone());
        thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            while let Ok(n) = reader.read_until(b'\n', &mut buf) {
                if n == 0 {
                    break;
                }
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                l.lock().unwrap().push(line);
                buf.clear();
            }
            e.store(true, Ordering::SeqCst);
        });
        Lines { lines, eof }
    }

    fn text(&self) -> String {
        let lines = self.lines.lock().unwrap();
        let mut text = String::new();
        // Chromium and Prometheus are chatty: keep the end.
        for l in lines.iter().skip(lines.len().saturating_sub(200)) {
            text.push_str(l);
            text.push('\n');
        }
        text
    }

    fn wait(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            if self.eof.load(Ordering::SeqCst) || Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A child in its own process group, killed with its group when dropped.
struct Proc {
    what: String,
    child: Child,
    out: Lines,
    err: Lines,
    status: Option<ExitStatus>,
}

impl Proc {
    fn spawn(what: &str, cmd: &mut Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        let out = Lines::new(child.stdout.take().unwrap());
        let err = Lines::new(child.stderr.take().unwrap());
        Proc {
            what: what.to_string(),
            child,
            out,
            err,
            status: None,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn output(&self) -> String {
        format!(
            "--- {} stdout ---\n{}--- {} stderr ---\n{}",
            self.what,
            self.out.text(),
            self.what,
            self.err.text()
        )
    }

    fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: plain syscall.
            unsafe { libc::kill(self.pid() as i32, sig) };
        }
    }

    /// Waits for the exit (up to `timeout`); None if it is still running.
    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
            if self.status.is_none() {
                if Instant::now() >= deadline {
                    return None;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        self.status
    }

    /// SIGTERM (or `sig`), then SIGKILL to the group after `grace`.
    fn stop(&mut self, sig: i32, grace: Duration) -> Option<ExitStatus> {
        self.signal(sig);
        let status = self.wait(grace);
        self.kill_group();
        status
    }

    fn kill_group(&mut self) {
        // SAFETY: plain syscalls; the group id is the child's pid (process_group(0)).
        unsafe {
            libc::kill(-(self.pid() as i32), libc::SIGKILL);
        }
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
    }

    fn expect_stdout(&self, timeout: Duration, line: &str) {
        if self.out.wait(timeout, |l| l.trim() == line).is_none() {
            panic!(
                "{} did not print {line:?} within {timeout:?}\n{}",
                self.what,
                self.output()
            );
        }
    }

    fn expect_stderr(&self, timeout: Duration, start: &str) -> String {
        self.err
            .wait(timeout, |l| l.starts_with(start))
            .unwrap_or_else(|| {
                panic!(
                    "{} did not print {start:?} on stderr within {timeout:?}\n{}",
                    self.what,
                    self.output()
                )
            })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// A port free on 127.0.0.1 (bound and released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("live-{what}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `memprof trace OPTS --duration SAFETY_NET -- steady ARGS`, once the fixture is ready.
fn trace_steady(opts: &[&str], fixture_args: &[&str]) -> (Proc, u32) {
    let mut cmd = Command::new(MEMPROF);
    cmd.arg("trace")
        .args(opts)
        .args(["--duration", SAFETY_NET, "--"])
        .arg(steady())
        .args(fixture_args);
    let mp = Proc::spawn(&format!("memprof trace {}", opts.join(" ")), &mut cmd);
    let line = mp.expect_stderr(Duration::from_secs(30), "memprof: tracing pid ");
    let pid = line["memprof: tracing pid ".len()..]
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    // Text mode: the fixture's stdout is memprof's.
    mp.expect_stdout(Duration::from_secs(30), "ready");
    (mp, pid)
}

/// SIGINT to memprof, which must then write its report and exit 0.
fn finish_trace(mut mp: Proc) -> String {
    mp.signal(libc::SIGINT);
    let status = mp.wait(Duration::from_secs(20));
    let output = mp.output();
    assert!(!output.contains("panicked"), "memprof panicked\n{output}");
    assert!(
        status.is_some_and(|s| s.success()),
        "memprof should exit 0 after SIGINT (status {status:?})\n{output}"
    );
    output
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

struct HttpResponse {
    status: u16,
    head: String,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One HTTP/1.0 GET (the server closes the connection after the response).
fn http_get(port: u16, path: &str) -> Result<HttpResponse, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {raw:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok(HttpResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `f` every 200 ms until it returns Some, up to `timeout`.
fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------------

struct Prometheus {
    proc: Proc,
    port: u16,
    _dir: TempDir,
}

impl Prometheus {
    /// A Prometheus on 127.0.0.1 scraping `target_port` every second, with memprof's rules.
    fn start(target_port: u16) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let rules = Path::new(REPO).join("deploy/prometheus/memprof-rules.yml");
        let config = dir.0.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: memprof\n    static_configs:\n      - targets: \
                 ['127.0.0.1:{target_port}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let mut cmd = Command::new(tool("PROMETHEUS", "prometheus"));
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(&dir.0);
        let proc = Proc::spawn("prometheus", &mut cmd);
        let p = Prometheus {
            proc,
            port,
            _dir: dir,
        };
        let ready = poll(Duration::from_secs(30), || {
            http_get(port, "/-/ready").ok().filter(|r| r.status == 200)
        });
        assert!(
            ready.is_some(),
            "prometheus not ready within 30 s\n{}",
            p.proc.output()
        );
        p
    }

    fn api(&self, path: &str) -> Value {
        let r = http_get(self.port, path)
            .unwrap_or_else(|e| panic!("GET {path} from prometheus: {e}\n{}", self.proc.output()));
        let v: Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {}", r.body));
        assert_eq!(v["status"], "success", "GET {path}: {v}");
        v["data"].clone()
    }

    /// The instant vector for `query`.
    fn query(&self, query: &str) -> Vec<Value> {
        self.api(&format!("/api/v1/query?query={}", url_encode(query)))["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The one sample's value of `query`, as Prometheus prints it.
    fn value(&self, query: &str) -> String {
        let result = self.query(query);
        assert_eq!(
            result.len(),
            1,
            "{query}: expected one series, got {result:?}"
        );
        result[0]["value"][1].as_str().unwrap().to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: Prometheus
// ---------------------------------------------------------------------------------------------

#[test]
fn prometheus_scrapes_exact_outstanding_bytes() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (mp, pid) = trace_steady(&["--metrics", &addr], &["50"]);
    let ready_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    mp.expect_stderr(
        Duration::from_secs(5),
        &format!("memprof: Prometheus metrics at http://{addr}/metrics"),
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
            mp.output()
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
            prom.proc.output(),
            mp.output()
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
    let (mp, pid) = trace_steady(
        &["--metrics", &format!(":{port}"), "--limit", "1.5GiB"],
        &["50"],
    );
    // A bare `:PORT` binds loopback.
    mp.expect_stderr(
        Duration::from_secs(5),
        &format!("memprof: Prometheus metrics at http://127.0.0.1:{port}/metrics"),
    );
    let want = format!("memprof_rss_limit_bytes{{pid=\"{pid}\"}} {}", 3u64 << 29);
    let found = poll(Duration::from_secs(20), || {
        http_get(port, "/metrics")
            .ok()
            .filter(|r| r.body.lines().any(|l| l == want))
    });
    assert!(found.is_some(), "no `{want}` in /metrics\n{}", mp.output());
    finish_trace(mp);
}

#[test]
fn metrics_address_in_use_is_a_clear_error() {
    require_root();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut cmd = Command::new(MEMPROF);
    cmd.args(["trace", "--metrics", &addr, "--duration", "5s", "--"])
        .arg(steady())
        .arg("5");
    let mut mp = Proc::spawn("memprof trace --metrics (taken)", &mut cmd);
    let status = mp.wait(Duration::from_secs(30));
    let output = mp.output();
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

// ---------------------------------------------------------------------------------------------
// Tests: dashboard
// ---------------------------------------------------------------------------------------------

/// A DevTools-protocol client over Chromium's `--remote-debugging-pipe`.
struct Chromium {
    proc: Proc,
    commands: fs::File,
    replies: mpsc::Receiver<Value>,
    next_id: u64,
    _profile: TempDir,
}

impl Chromium {
    fn open(url: &str) -> Chromium {
        let profile = TempDir::new("chromium");
        let (cmd_read, cmd_write) = pipe();
        let (reply_read, reply_write) = pipe();
        // The child's ends, above any fd it might already have, become its fds 3 and 4.
        let child_in = dup_high(&cmd_read);
        let child_out = dup_high(&reply_write);
        drop((cmd_read, reply_write));
        let mut cmd = Command::new(tool("CHROMIUM", "chromium"));
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .arg(url);
        // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(child_in, 3) < 0 || libc::dup2(child_out, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let proc = Proc::spawn("chromium", &mut cmd);
        // SAFETY: closing our copies of the child's ends.
        unsafe {
            libc::close(child_in);
            libc::close(child_out);
        }
        let (tx, replies) = mpsc::channel();
        let mut reader = BufReader::new(fs::File::from(reply_read));
        thread::spawn(move || {
            let mut buf = Vec::new();
            while let Ok(n) = reader.read_until(0, &mut buf) {
                if n == 0 || buf.last() != Some(&0) {
                    break;
                }
                buf.pop();
                if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(v).is_err()
                {
                    break;
                }
                buf.clear();
            }
        });
        Chromium {
            proc,
            commands: fs::File::from(cmd_write),
            replies,
            next_id: 1,
            _profile: profile,
        }
    }

    /// Sends a command and waits (10 s at most) for its reply's `result`.
    fn call(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("DevTools pipe: {e}\n{}", self.proc.output()));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(reply) if reply["id"] == id => {
                    assert!(reply.get("error").is_none(), "{method} failed: {reply}");
                    return reply["result"].clone();
                }
                Ok(_) => {} // events and other replies
                Err(e) => panic!(
                    "no reply to {method} within 10 s ({e})\n{}",
                    self.proc.output()
                ),
            }
        }
    }

    fn close(mut self) {
        let id = self.next_id;
        let msg = json!({"id": id, "method": "Browser.close", "params": {}});
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        let _ = self.commands.write_all(&bytes);
        if self.proc.wait(Duration::from_secs(10)).is_none() {
            self.proc.kill_group();
        }
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: freshly created, owned here.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A close-on-exec copy of `fd` numbered 10 or above.
fn dup_high(fd: &OwnedFd) -> i32 {
    use std::os::fd::AsRawFd;
    // SAFETY: plain fcntl on a valid fd.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    assert!(new >= 10, "fcntl: {}", std::io::Error::last_os_error());
    new
}

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
    let (mp, pid) = trace_steady(&["--ui", &port.to_string()], &["50", "grow"]);
    // A bare port binds loopback.
    mp.expect_stderr(
        Duration::from_secs(5),
        &format!("memprof: live dashboard at http://127.0.0.1:{port}/"),
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
    let (r, v) = state.unwrap_or_else(|| panic!("no update in /api/state\n{}", mp.output()));
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
        chromium.proc.output(),
        mp.output()
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
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("memprof-status-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let stdout_file = dir.join("stdout.txt");
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
    fs::remove_dir_all(&dir).unwrap();
}
