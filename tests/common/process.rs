//! Running processes: a child in its own process group with its stdout and stderr read line by
//! line on their own threads, deadlines that kill the whole group, and the finished process's
//! output.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::process::{CommandExt, ExitStatusExt},
    path::Path,
    process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

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

    /// The last `n` lines (chatty programs such as browsers: keep the end).
    pub(crate) fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().unwrap();
        let mut text = String::new();
        for l in lines.iter().skip(lines.len().saturating_sub(n)) {
            text.push_str(l);
            text.push('\n');
        }
        text
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
        Proc::start(what.into(), cmd, Stdio::null())
    }

    /// Starts `cmd` in its own process group with `stdin`, stdout and stderr read line by line.
    fn start(what: String, cmd: &mut Command, stdin: Stdio) -> Proc {
        cmd.stdin(stdin)
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

    /// Waits for the exit (up to `timeout`); None if it is still running.
    pub(crate) fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.alive() {
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.status
    }

    /// `sig`, then SIGKILL to the group after `grace`.
    pub(crate) fn stop(&mut self, sig: i32, grace: Duration) -> Option<ExitStatus> {
        self.signal(sig);
        let status = self.wait(grace);
        self.kill_group();
        status
    }

    /// SIGKILL to the process and to its group (where what it started may still run after it
    /// exited), and reaps it.
    pub(crate) fn kill_group(&mut self) {
        if self.status.is_none() {
            send_signal(self.pid(), libc::SIGKILL);
        }
        // SAFETY: as above; the process group id is the child's pid (process_group(0)).
        unsafe {
            libc::kill(-(self.pid() as i32), libc::SIGKILL);
        }
        if self.status.is_none() {
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

    /// The last 200 lines of stdout and of stderr.
    pub(crate) fn output_tail(&self) -> String {
        format!(
            "--- {} stdout ---\n{}--- {} stderr ---\n{}",
            self.what,
            self.out.tail(200),
            self.what,
            self.err.tail(200)
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

    /// Waits for a stderr line starting with `start` and returns it; panics (after killing the
    /// process and its group) with the output so far and `more` if it does not come within
    /// `timeout`.
    pub(crate) fn expect_stderr_start(
        &mut self,
        start: &str,
        timeout: Duration,
        more: impl FnOnce() -> String,
    ) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(line) = self.err.wait_line(deadline, |l| l.starts_with(start)) {
            return line;
        }
        let alive = self.alive();
        self.kill_group();
        panic!(
            "{} did not print `{start}...` on stderr within {timeout:?} (still running: {alive}, \
             status {:?})\n{}\n{}",
            self.what,
            self.status,
            self.output_so_far(),
            more()
        );
    }

    /// Waits for the process to exit (killing it and its group at the deadline) and collects
    /// its output. Panics on timeout, with the output.
    pub(crate) fn finish(mut self, timeout: Duration) -> Finished {
        if self.wait(timeout).is_none() {
            self.kill_group();
            self.out.wait_eof(Duration::from_secs(2));
            self.err.wait_eof(Duration::from_secs(2));
            panic!(
                "{} did not exit within {timeout:?}; killed it\n{}",
                self.what,
                self.output_so_far()
            );
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

    pub(crate) fn assert_no_panic(&self) {
        assert!(
            !self.stderr.contains("panicked"),
            "{} panicked\n{}",
            self.what,
            self.context()
        );
    }

    /// No panic and exit status `code`.
    pub(crate) fn assert_code(&self, code: i32, why: &str) {
        self.assert_no_panic();
        assert_eq!(
            self.code(),
            Some(code),
            "{} should exit {code} ({why})\n{}",
            self.what,
            self.context()
        );
    }

    /// No panic and exit status 0.
    pub(crate) fn assert_success(&self) {
        self.assert_code(0, "success");
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

    /// The records of one type.
    pub(crate) fn records(&self, kind: &str) -> Vec<Value> {
        self.ndjson()
            .into_iter()
            .filter(|r| r["type"] == kind)
            .collect()
    }

    /// The first record, which must be the `start` record.
    pub(crate) fn start(&self) -> Value {
        let start = self
            .ndjson()
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no NDJSON output\n{}", self.context()));
        assert_eq!(start["type"], "start", "{}", self.context());
        start
    }

    /// The final `report` record, after checking the stream's shape: `start` first, `report`
    /// last, only records of the types `between` in between.
    pub(crate) fn report_among(&self, between: &[&str]) -> Value {
        let records = self.ndjson();
        let types: Vec<&str> = records
            .iter()
            .map(|r| r["type"].as_str().unwrap())
            .collect();
        assert!(
            types.len() >= 2 && types[0] == "start" && types[types.len() - 1] == "report",
            "expected NDJSON start, ({})*, report; got types {types:?}\n{}",
            between.join("|"),
            self.context()
        );
        assert!(
            types[1..types.len() - 1]
                .iter()
                .all(|t| between.contains(t)),
            "only {between:?} records may come between start and report; got {types:?}"
        );
        records.last().unwrap().clone()
    }
}

/// A fixture driven through its stdin: it prints `ready` when it is set up, and runs its
/// workload when it reads a line.
pub(crate) struct Driven {
    pub(crate) proc: Proc,
    stdin: Option<ChildStdin>,
}

impl Driven {
    /// Starts `cmd` with stdin kept open for writing and waits for its `ready`.
    pub(crate) fn start(what: &str, cmd: &mut Command) -> Driven {
        let mut proc = Proc::start(what.to_string(), cmd, Stdio::piped());
        let stdin = proc.child.stdin.take();
        proc.expect_stdout_line("ready");
        Driven { proc, stdin }
    }

    /// Writes `go` and waits for a stdout line whose first word is `reply`.
    pub(crate) fn go(&mut self, reply: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
        let deadline = Instant::now() + STARTUP;
        if self
            .proc
            .out
            .wait_line(deadline, |l| l.split_whitespace().next() == Some(reply))
            .is_none()
        {
            self.proc.kill_group();
            panic!(
                "{} did not print {reply:?} within {STARTUP:?}\n{}",
                self.proc.what,
                self.proc.output_so_far()
            );
        }
    }

    /// Closes its stdin and waits for its exit.
    pub(crate) fn finish(mut self, timeout: Duration) -> Finished {
        drop(self.stdin.take());
        self.proc.finish(timeout)
    }
}

/// Starts a fixture that prints `ready` when it is set up and waits for SIGUSR1.
pub(crate) fn start_target(what: &str, program: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let mut target = Proc::spawn(what, &mut cmd);
    target.expect_stdout_line("ready");
    target
}

/// Runs `cmd` to the end with `input` on its stdin (written on its own thread, so that a large
/// input cannot block on a full pipe): its output, and whether all the input was written.
pub(crate) fn output_with_input(cmd: &mut Command, input: &str) -> (Output, std::io::Result<()>) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    let writer = thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    (out, writer.join().unwrap())
}
