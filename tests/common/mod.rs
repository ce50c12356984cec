//! Running processes in the integration tests: a child with its stdout and stderr read line by
//! line on their own threads, deadlines that kill the whole process group, and the finished
//! process's output. Included by each test crate with `mod common;`.
#![allow(dead_code, reason = "each test crate uses a different part")]

use std::{
    ffi::OsString,
    io::{BufRead, BufReader, Read},
    os::unix::process::{CommandExt, ExitStatusExt},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The fixtures' sources.
pub(crate) const FIXTURE_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

/// Panics unless the tests run as root (they load eBPF programs).
pub(crate) fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "these tests load eBPF programs and need root");
}

/// The memprof binary under test.
pub(crate) const MEMPROF: &str = env!("CARGO_BIN_EXE_memprof");

/// `memprof trace ARGS`.
pub(crate) fn memprof_trace(args: &[&str]) -> Command {
    let mut cmd = Command::new(MEMPROF);
    cmd.arg("trace").args(args);
    cmd
}

/// The final `report` record of a `--json` run that ended normally (exit 0, no panic).
pub(crate) fn final_report(f: &Finished) -> Value {
    assert!(
        !f.stderr.contains("panicked"),
        "memprof panicked\n{}",
        f.context()
    );
    assert_eq!(f.code(), Some(0), "memprof failed\n{}", f.context());
    let records = f.ndjson();
    let last = records
        .last()
        .unwrap_or_else(|| panic!("no output\n{}", f.context()));
    assert_eq!(last["type"], "report", "{}", f.context());
    last.clone()
}

/// How long to wait for `ready` from a fixture or `memprof: tracing pid` from memprof.
pub(crate) const STARTUP: Duration = Duration::from_secs(30);

/// A pipe read line by line on its own thread.
pub(crate) struct Stream {
    pub(crate) lines: Arc<Mutex<Vec<String>>>,
    pub(crate) eof: Arc<AtomicBool>,
}

impl Stream {
    pub(crate) fn new(reader: impl Read + Send + 'static) -> Stream {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let eof = Arc::new(AtomicBool::new(false));
        let (l, e) = (lines.clone(), eof.clone());
        thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        l.lock()
                            .unwrap()
                            .push(line.trim_end_matches(['\n', '\r']).to_string());
                    }
                }
            }
            e.store(true, Ordering::SeqCst);
        });
        Stream { lines, eof }
    }

    pub(crate) fn text(&self) -> String {
        let lines = self.lines.lock().unwrap();
        let mut s = lines.join("\n");
        if !lines.is_empty() {
            s.push('\n');
        }
        s
    }

    /// The first line (from the start) satisfying `pred`, waiting until `deadline`.
    pub(crate) fn wait_line(
        &self,
        deadline: Instant,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
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

    pub(crate) fn wait_eof(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.eof.load(Ordering::SeqCst) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A child process in its own process group, killed (with its group) when dropped.
pub(crate) struct Proc {
    pub(crate) what: String,
    pub(crate) child: Child,
    pub(crate) out: Stream,
    pub(crate) err: Stream,
    pub(crate) status: Option<ExitStatus>,
}

/// A finished process and everything it printed.
pub(crate) struct Finished {
    pub(crate) what: String,
    pub(crate) pid: u32,
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

pub(crate) fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

impl Proc {
    pub(crate) fn spawn(what: impl Into<String>, cmd: &mut Command) -> Proc {
        let what = what.into();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        let out = Stream::new(child.stdout.take().unwrap());
        let err = Stream::new(child.stderr.take().unwrap());
        Proc {
            what,
            child,
            out,
            err,
            status: None,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn signal(&self, sig: i32) {
        if self.status.is_none() {
            send_signal(self.pid(), sig);
        }
    }

    pub(crate) fn alive(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status.is_none()
    }

    pub(crate) fn kill_group(&mut self) {
        if self.status.is_none() {
            send_signal(self.pid(), libc::SIGKILL);
            // SAFETY: as above; the process group id is the child's pid (process_group(0)).
            unsafe {
                libc::kill(-(self.pid() as i32), libc::SIGKILL);
            }
            self.status = self.child.wait().ok();
        }
    }

    pub(crate) fn output_so_far(&self) -> String {
        format!(
            "--- {} stdout ---\n{}--- {} stderr ---\n{}",
            self.what,
            truncate(&self.out.text(), 20_000),
            self.what,
            truncate(&self.err.text(), 20_000)
        )
    }

    /// Waits for a stdout line equal to `line`; panics with the output so far if it does not
    /// come.
    pub(crate) fn expect_stdout_line(&mut self, line: &str) {
        let deadline = Instant::now() + STARTUP;
        if self.out.wait_line(deadline, |l| l.trim() == line).is_none() {
            let alive = self.alive();
            self.kill_group();
            panic!(
                "{} did not print {line:?} within {STARTUP:?} (still running: {alive}, status \
                 {:?})\n{}",
                self.what,
                self.status,
                self.output_so_far()
            );
        }
    }

    /// Waits for the process to exit (killing it and its group at the deadline) and collects
    /// its output. Panics on timeout, with the output.
    pub(crate) fn finish(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        while self.alive() {
            if Instant::now() >= deadline {
                self.kill_group();
                self.out.wait_eof(Duration::from_secs(2));
                self.err.wait_eof(Duration::from_secs(2));
                panic!(
                    "{} did not exit within {timeout:?}; killed it\n{}",
                    self.what,
                    self.output_so_far()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        // Pipes may stay open a little longer in a grandchild (e.g. the traced command).
        self.out.wait_eof(Duration::from_secs(5));
        self.err.wait_eof(Duration::from_secs(5));
        Finished {
            what: self.what.clone(),
            pid: self.pid(),
            status: self.status.unwrap(),
            stdout: self.out.text(),
            stderr: self.err.text(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_group();
    }
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n... ({} more bytes)\n", &s[..end], s.len() - end)
}

impl Finished {
    pub(crate) fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub(crate) fn context(&self) -> String {
        format!(
            "{} exited with {:?} (signal {:?})\n--- stderr ---\n{}--- stdout ---\n{}",
            self.what,
            self.status.code(),
            self.status.signal(),
            truncate(&self.stderr, 20_000),
            truncate(&self.stdout, 20_000)
        )
    }

    /// Every stdout line parsed as a JSON object with a "type"; panics on anything else.
    pub(crate) fn ndjson(&self) -> Vec<Value> {
        let mut records = Vec::new();
        for (i, line) in self.stdout.lines().enumerate() {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!(
                    "stdout line {} is not JSON ({e}): {line:?}\n{}",
                    i + 1,
                    self.context()
                )
            });
            assert!(
                v.get("type").and_then(Value::as_str).is_some(),
                "stdout line {} is not an object with a string \"type\": {}\n{}",
                i + 1,
                truncate(line, 2000),
                self.context()
            );
            records.push(v);
        }
        records
    }
}

/// Collects failed checks so one run reports every mismatch at once.
pub(crate) struct Checks {
    pub(crate) what: String,
    pub(crate) failures: Vec<String>,
}

impl Checks {
    pub(crate) fn new(what: impl Into<String>) -> Checks {
        Checks {
            what: what.into(),
            failures: Vec::new(),
        }
    }

    pub(crate) fn check(&mut self, ok: bool, msg: impl Into<String>) {
        if !ok {
            self.failures.push(msg.into());
        }
    }

    pub(crate) fn eq<T: PartialEq + std::fmt::Debug>(
        &mut self,
        what: &str,
        actual: T,
        expected: T,
    ) {
        if actual != expected {
            self.failures
                .push(format!("{what}: got {actual:?}, expected {expected:?}"));
        }
    }

    pub(crate) fn finish(self, context: impl FnOnce() -> String) {
        if !self.failures.is_empty() {
            panic!(
                "{}: {} check(s) failed:\n  - {}\n\n{}",
                self.what,
                self.failures.len(),
                self.failures.join("\n  - "),
                context()
            );
        }
    }
}

pub(crate) fn frame_fn(frame: &Value) -> Option<&str> {
    frame.get("function").and_then(Value::as_str)
}

/// Function names of a group's frames, innermost first (`?` for a frame without one).
pub(crate) fn frame_names(group: &Value) -> Vec<&str> {
    stack(group)
        .iter()
        .map(|f| frame_fn(f).unwrap_or("?"))
        .collect()
}

pub(crate) fn leaks(report: &Value) -> &[Value] {
    report["leaks"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

pub(crate) fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or_else(|| {
        panic!(
            "expected a non-negative integer {key:?} in {}",
            truncate(&v.to_string(), 2000)
        )
    })
}

pub(crate) fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

pub(crate) fn stack(group: &Value) -> &[Value] {
    group
        .get("stack")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// Waits until no memprof process is left (up to 60 s). After a trace, a background memprof
/// process removes the probes, one at a time; probes that follow children or cover every
/// process are in every process mapping the C library until then, which a program that does
/// not run its code natively (valgrind) sees as breakpoints.
pub(crate) fn wait_for_probe_removal() {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let busy = std::fs::read_dir("/proc")
            .map(|dir| {
                dir.filter_map(Result::ok).any(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim_end() == "memprof")
                })
            })
            .unwrap_or(false);
        if !busy || Instant::now() >= deadline {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `cmd` with stdout and stderr read line by line and stdin kept open for writing.
pub(crate) fn spawn_with_stdin(what: &str, cmd: &mut Command) -> (Proc, std::process::ChildStdin) {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let stdin = child.stdin.take().unwrap();
    let out = Stream::new(child.stdout.take().unwrap());
    let err = Stream::new(child.stderr.take().unwrap());
    (
        Proc {
            what: what.to_string(),
            child,
            out,
            err,
            status: None,
        },
        stdin,
    )
}

/// Starts a fixture that prints `ready` when it is set up and waits for SIGUSR1.
pub(crate) fn start_target(what: &str, program: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let mut target = Proc::spawn(what, &mut cmd);
    target.expect_stdout_line("ready");
    target
}
