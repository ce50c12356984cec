//! Tests against real interpreters: every installed CPython version, threads, generators, the
//! facts the kernel side relies on.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use super::{
    detect::{file_name, runtime_symbols},
    *,
};

/// A python3 child running a script from a temporary directory, killed on drop.
struct PyChild {
    child: Child,
    dir: PathBuf,
    script: String,
    _stdout: BufReader<ChildStdout>,
}

impl PyChild {
    /// Starts `python` on `source` (saved as `<dir>/app.py`) and waits for its `ready` line.
    fn start(python: &str, source: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "memprof-python-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("create temp dir");
        let script = dir.join("app.py");
        fs::write(&script, source).expect("write script");
        let mut child = Command::new(python)
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {python}: {e}"));
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read child stdout");
        assert_eq!(line, "ready\n", "{python} did not get ready");
        Self {
            child,
            dir,
            script: script.display().to_string(),
            _stdout: stdout,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PyChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Polls the process's threads until `done` accepts them (the child prints `ready` just
/// before it blocks, so its innermost frame may still be on the print line for a moment),
/// then returns them; panics with the last ones after 5 s.
fn threads_when(pid: u32, done: impl Fn(&[PyThread]) -> bool) -> Vec<PyThread> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut resolver = Resolver::new(pid).expect("detect CPython");
    loop {
        let threads = resolver.threads().expect("walk threads");
        if done(&threads) || Instant::now() > deadline {
            return threads;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn frames(thread: &PyThread) -> Vec<(&str, Option<u32>)> {
    thread
        .frames
        .iter()
        .map(|f| (f.function.as_str(), f.line))
        .collect()
}

const NESTED: &str = "\
import sys
import time

def f3():
    print(\"ready\", flush=True)
    time.sleep(600)

def f2():
    f3()

def f1():
    x = 1
    f2()

f1()
";

/// Python interpreters installed here: `python3` from PATH, Debian's, pyenv's.
fn pythons() -> Vec<String> {
    let mut found = vec!["python3".to_string()];
    for p in ["/usr/bin/python3.11"] {
        if Path::new(p).exists() {
            found.push(p.to_string());
        }
    }
    if let Ok(dir) = fs::read_dir("/root/.pyenv/versions") {
        let mut versions: Vec<String> = dir
            .flatten()
            .map(|e| e.path().join("bin/python3").display().to_string())
            .filter(|p| Path::new(p).exists())
            .collect();
        versions.sort();
        found.extend(versions);
    }
    found
}

fn check_nested(python: &str) -> PyVersion {
    let child = PyChild::start(python, NESTED);
    let want = vec![
        ("f3", Some(6)),
        ("f2", Some(9)),
        ("f1", Some(13)),
        ("<module>", Some(15)),
    ];
    let threads = threads_when(child.pid(), |t| t.len() == 1 && frames(&t[0]) == want);
    let version = Resolver::new(child.pid()).expect("detect").process.version;
    assert_eq!(
        threads.len(),
        1,
        "{python} ({version}): one thread: {threads:#?}"
    );
    let main = &threads[0];
    assert_eq!(frames(main), want, "{python} ({version}): {main:#?}");
    assert!(
        main.frames.iter().all(|f| f.file == child.script),
        "{python} ({version}): every frame is in {}: {main:#?}",
        child.script
    );
    assert_eq!(
        main.tid,
        Some(child.pid()),
        "{python} ({version}): the main thread's tid is the pid"
    );
    version
}

#[test]
fn python_main_thread_stack_is_exact() {
    let version = check_nested("python3");
    assert_eq!(version.major, 3);
}

#[test]
fn python_every_installed_version() {
    let mut seen = Vec::new();
    for python in pythons() {
        let Ok(out) = Command::new(&python)
            .arg("-c")
            .arg("import sys; print(sys.version_info[1])")
            .output()
        else {
            continue;
        };
        let minor: u8 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        if !(8..=13).contains(&minor) {
            continue;
        }
        let version = check_nested(&python);
        assert_eq!(version.minor, minor, "{python}");
        eprintln!("verified {python}: CPython {version}");
        seen.push(version);
    }
    assert!(!seen.is_empty(), "no CPython 3.8 to 3.13 found");
}

const THREADED: &str = "\
import sys
import threading
import time

class Worker:
    def inner(self, ev):
        ev.set()
        time.sleep(600)

    def run(self, ev):
        self.inner(ev)

def main():
    ev = threading.Event()
    t = threading.Thread(target=Worker().run, args=(ev,), daemon=True)
    t.start()
    ev.wait()
    print(\"ready\", flush=True)
    sys.stdin.readline()

main()
";

/// The frames of the worker thread of [`THREADED`], innermost first, as far as app.py goes.
fn worker_frames(version: PyVersion) -> Vec<(&'static str, Option<u32>)> {
    if version.minor >= 11 {
        vec![("Worker.inner", Some(8)), ("Worker.run", Some(11))]
    } else {
        vec![("inner", Some(8)), ("run", Some(11))]
    }
}

fn check_threads(python: &str) -> PyVersion {
    let child = PyChild::start(python, THREADED);
    let pid = child.pid();
    let version = detect(pid).expect("detect").version;
    let want_worker = worker_frames(version);
    let want_main = vec![("main", Some(19)), ("<module>", Some(21))];
    let split = |threads: &[PyThread]| {
        let main = threads.iter().find(|t| t.tid == Some(pid)).cloned();
        let worker = threads.iter().find(|t| t.tid != Some(pid)).cloned();
        (main, worker)
    };
    let threads = threads_when(pid, |t| {
        let (Some(main), Some(worker)) = split(t) else {
            return false;
        };
        frames(&main) == want_main && frames(&worker).starts_with(&want_worker)
    });
    assert_eq!(
        threads.len(),
        2,
        "{python} ({version}): two threads: {threads:#?}"
    );
    let (main, worker) = split(&threads);
    let (main, worker) = (main.expect("main thread"), worker.expect("worker thread"));
    assert_eq!(
        frames(&main),
        want_main,
        "{python} ({version}): main: {main:#?}"
    );
    let got = frames(&worker);
    assert_eq!(
        got[..2],
        want_worker[..],
        "{python} ({version}): worker: {worker:#?}"
    );
    // Below the script: threading.Thread.run, _bootstrap_inner, _bootstrap.
    let below: Vec<&str> = worker.frames[2..]
        .iter()
        .map(|f| f.function.as_str())
        .collect();
    let want_below: Vec<String> = ["run", "_bootstrap_inner", "_bootstrap"]
        .iter()
        .map(|f| {
            if version.minor >= 11 {
                format!("Thread.{f}")
            } else {
                f.to_string()
            }
        })
        .collect();
    assert_eq!(
        below, want_below,
        "{python} ({version}): worker: {worker:#?}"
    );
    assert!(
        worker.frames[2..]
            .iter()
            .all(|f| f.file.ends_with("/threading.py")),
        "{python} ({version}): {worker:#?}"
    );
    let tid = worker.tid.expect("worker tid");
    assert_ne!(tid, pid);
    assert!(
        Path::new(&format!("/proc/{pid}/task/{tid}")).exists(),
        "{python} ({version}): worker tid {tid} is a task of {pid}"
    );
    version
}

#[test]
fn python_other_thread_stack_is_exact() {
    check_threads("python3");
}

#[test]
fn python_threads_on_every_installed_version() {
    let mut seen = 0;
    for python in pythons() {
        if minor_of(&python).is_some_and(|m| (8..=13).contains(&m)) {
            let version = check_threads(&python);
            eprintln!("threads verified on {python}: CPython {version}");
            seen += 1;
        }
    }
    assert!(seen > 0, "no CPython 3.8 to 3.13 found");
}

fn minor_of(python: &str) -> Option<u8> {
    let out = Command::new(python)
        .arg("-c")
        .arg("import sys; print(sys.version_info[1])")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// The `fs` base of a thread of a child, read with ptrace (seize, interrupt, getregs,
/// detach): what BPF reads as `task->thread.fsbase`.
fn fs_base(tid: u32) -> u64 {
    let tid = tid as libc::pid_t;
    // SAFETY: plain ptrace calls on a child thread; `regs` is a valid out parameter.
    unsafe {
        assert_eq!(
            libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0),
            0,
            "seize {tid}"
        );
        assert_eq!(
            libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0),
            0,
            "interrupt {tid}"
        );
        let mut status = 0;
        assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        let got = libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut _);
        libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0);
        assert_eq!(got, 0, "getregs {tid}");
        regs.fs_base
    }
}

/// The facts the kernel side relies on, on every installed version: a thread state's
/// `thread_id` is the thread's `fs` base; `autoTSSkey` through glibc's thread-specific data
/// gives each thread its own thread state, GIL or not; `gilstate.tstate_current` (3.8 to
/// 3.11) is 0 while every thread sleeps.
#[test]
fn python_kernel_side_facts() {
    for python in pythons() {
        if !minor_of(&python).is_some_and(|m| (8..=13).contains(&m)) {
            continue;
        }
        let child = PyChild::start(&python, THREADED);
        let pid = child.pid();
        let resolver = Resolver::new(pid).expect("detect");
        let version = resolver.process.version;
        let threads = threads_when(pid, |t| {
            t.len() == 2
                && t.iter()
                    .all(|t| t.frames.first().is_some_and(|f| f.line.is_some()))
        });
        for thread in &threads {
            let tid = thread.tid.expect("tid");
            assert_eq!(
                fs_base(tid),
                thread.pthread,
                "{python} ({version}): thread {tid}: fs base is PyThreadState.thread_id"
            );
            assert_eq!(
                tss_tstate(&resolver, thread.pthread).expect("read tss slot"),
                Some(thread.tstate),
                "{python} ({version}): thread {tid}: autoTSSkey slot"
            );
            let glibc_tid = resolver
                .mem
                .u32(thread.pthread + GLIBC_PTHREAD_TID)
                .expect("read");
            assert_eq!(glibc_tid, tid, "{python} ({version}): struct pthread tid");
        }
        let gil = gil_tstate(&resolver).expect("read tstate_current");
        if version.minor <= 11 {
            assert_eq!(
                gil,
                Some(0),
                "{python} ({version}): both threads wait without the GIL"
            );
        } else {
            assert_eq!(gil, None, "{python} ({version})");
        }
        eprintln!("kernel facts verified on {python}: CPython {version}");
    }
}

/// `gilstate.tstate_current` names the thread running Python code (3.8 to 3.11).
#[test]
fn python_gil_holder_is_the_running_thread() {
    const SPIN: &str = "print(\"ready\", flush=True)\nwhile True:\n    pass\n";
    for python in pythons() {
        if !minor_of(&python).is_some_and(|m| (8..=11).contains(&m)) {
            continue;
        }
        let child = PyChild::start(&python, SPIN);
        let resolver = Resolver::new(child.pid()).expect("detect");
        let states = resolver.thread_states().expect("thread states");
        assert_eq!(states.len(), 1);
        // The print released the GIL around its write(2): wait until it is taken back.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut gil = gil_tstate(&resolver).expect("read tstate_current");
        while gil == Some(0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            gil = gil_tstate(&resolver).expect("read tstate_current");
        }
        assert_eq!(
            gil,
            Some(states[0]),
            "{python}: the spinning main thread holds the GIL"
        );
    }
}

#[test]
fn python_debug_offsets_match_the_table() {
    let Some(python) = pythons().into_iter().find(|p| minor_of(p) == Some(13)) else {
        eprintln!("no CPython 3.13 installed: skipped");
        return;
    };
    let child = PyChild::start(&python, NESTED);
    let process = detect(child.pid()).expect("detect");
    assert!(process.from_debug_offsets, "{process:?}");
    assert_eq!(Some(process.offsets), PyOffsets::for_version(3, 13));
}

#[test]
fn python_detects_object_and_bias() {
    for python in pythons() {
        let Some(minor) = minor_of(&python).filter(|m| (8..=13).contains(m)) else {
            continue;
        };
        let child = PyChild::start(&python, NESTED);
        let p = detect(child.pid()).expect("detect");
        let base = file_name(&p.object);
        assert!(
            base.starts_with(&format!("libpython3.{minor}")) || base == format!("python3.{minor}"),
            "{python}: {p:?}"
        );
        let data = fs::read(&p.object).expect("read object");
        let file = object::File::parse(&*data).expect("parse");
        let symbols = runtime_symbols(&file).expect("_PyRuntime");
        assert_eq!(p.runtime, symbols.runtime + p.bias, "{python}: {p:?}");
        if p.object == "/usr/bin/python3.11" {
            assert_eq!(p.bias, 0, "Debian's python3.11 is not PIE: {p:?}");
        }
        let hex = Command::new(&python)
            .arg("-c")
            .arg("import sys; print(sys.hexversion)")
            .output()
            .expect("run python");
        let hex: u64 = String::from_utf8_lossy(&hex.stdout)
            .trim()
            .parse()
            .expect("hexversion");
        let want = PyVersion::from_hex(hex);
        if minor >= 11 {
            assert_eq!(p.version, want, "{python}: Py_Version or _Py_DebugOffsets");
        } else {
            assert_eq!(
                (p.version.major, p.version.minor),
                (want.major, want.minor),
                "{python}"
            );
        }
    }
}

#[test]
fn python_resolve_a_recorded_pair() {
    let child = PyChild::start("python3", NESTED);
    let pid = child.pid();
    threads_when(pid, |t| {
        t.len() == 1 && t[0].frames.len() == 4 && t[0].frames[0].line == Some(6)
    });
    let resolver = Resolver::new(pid).expect("detect");
    let tstate = resolver.thread_states().expect("states")[0];
    let pairs = resolver.frame_pairs(tstate).expect("pairs");
    assert_eq!(pairs.len(), 4);
    let (code, instr) = pairs[1];
    let frame = resolve(pid, code, instr).expect("resolve f2's frame");
    assert_eq!(
        frame,
        PyFrame {
            function: "f2".into(),
            file: child.script.clone(),
            line: Some(9)
        }
    );
    let err = resolve(pid, tstate, 0).expect_err("a thread state is not a code object");
    assert!(err.to_string().contains("not a code object"), "{err}");
}

#[test]
fn python_not_python() {
    let err = detect(std::process::id()).expect_err("the test binary is not CPython");
    assert!(matches!(err, PythonError::NotPython { .. }), "{err}");
}

const GENERATOR: &str = "\
import time

def gen():
    print(\"ready\", flush=True)
    time.sleep(600)
    yield 1

def consume():
    for x in gen():
        pass

consume()
";

const COROUTINE: &str = "\
import asyncio
import time

async def leaf():
    print(\"ready\", flush=True)
    time.sleep(600)

async def mid():
    await leaf()

asyncio.run(mid())
";

/// Generator and coroutine frames are in the chain (owned by their generator from 3.11).
#[test]
fn python_generator_and_coroutine_frames() {
    for python in pythons() {
        if !minor_of(&python).is_some_and(|m| (8..=13).contains(&m)) {
            continue;
        }
        let want = vec![
            ("gen", Some(5)),
            ("consume", Some(9)),
            ("<module>", Some(12)),
        ];
        let child = PyChild::start(&python, GENERATOR);
        let threads = threads_when(child.pid(), |t| t.len() == 1 && frames(&t[0]) == want);
        assert_eq!(frames(&threads[0]), want, "{python}: {threads:#?}");

        let child = PyChild::start(&python, COROUTINE);
        let threads = threads_when(child.pid(), |t| {
            t.len() == 1 && t[0].frames.first().is_some_and(|f| f.line == Some(6))
        });
        let got = frames(&threads[0]);
        assert_eq!(
            got[..2],
            [("leaf", Some(6)), ("mid", Some(9))],
            "{python}: {got:?}"
        );
        assert_eq!(
            got.last(),
            Some(&("<module>", Some(11))),
            "{python}: {got:?}"
        );
        assert!(
            threads[0].frames[2..got.len() - 1]
                .iter()
                .all(|f| f.file.contains("/asyncio/")),
            "{python}: asyncio's frames between mid and <module>: {got:?}"
        );
    }
}

#[test]
fn python_kernel_config() {
    let child = PyChild::start("python3", NESTED);
    let resolver = Resolver::new(child.pid()).expect("detect");
    let config = resolver.kernel_config().expect("kernel config");
    assert_eq!(config.runtime, resolver.process.runtime);
    assert_eq!(config.offsets, resolver.process.offsets);
    assert!(config.tss_key < 32, "{config:?}");
    assert_eq!(
        std::mem::size_of::<PyKernelConfig>(),
        8 + 4 + 4 + 31 * 4 + 4
    );
}
