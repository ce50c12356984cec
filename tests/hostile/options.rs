//! Options and inputs out of range, untraceable pids, the fate of a spawned command: one-line
//! errors or documented behaviour, never a panic or a hang.

use std::{
    fs,
    os::unix::ffi::OsStrExt as _,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::{
    Dir,
    common::{MEMPROF, Proc, final_report, memprof_trace, num, require_root},
};

/// Numeric options out of range: a one-line usage error, never a panic (exit 101).
#[test]
fn numeric_options_out_of_range_are_refused() {
    for (flag, value, why) in [
        ("--duration", "99999999999999999h", "longer than 366 days"),
        ("--interval", "0s", "shorter than 10ms"),
        ("--sample-every", "0s", "shorter than 10ms"),
        ("--duration", "0", "above zero"),
        ("--limit", "99999999999T", "too large"),
        ("--ring-bytes", "4294967296", "invalid size"),
        ("--pid", "0", "process id from 1"),
        ("--top", "18446744073709551616", "from 0 to"),
        ("--growth-threshold", "NaN", "at least 0"),
        ("--file-mode", "4777", "octal mode"),
    ] {
        let out = memprof_trace(&[flag, value, "--", "true"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flag} {value}: {stderr}");
        let first = stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error: invalid value") && first.contains(why),
            "{flag} {value}: {stderr}"
        );
    }
}

/// `memprof diff` on a device, a FIFO nobody writes, a directory: a one-line error at once,
/// never an endless read (`/dev/zero` grew memprof to 23.5 GB) or a hang.
#[test]
fn diff_reads_regular_files_only() {
    let dir = Dir::new("diff");
    let a = dir.path("a.json");
    fs::write(&a, br#"{"type":"report","totals":{},"leaks":[]}"#).unwrap();
    let fifo = dir.path("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for b in [Path::new("/dev/zero"), &fifo, &dir.0] {
        let started = Instant::now();
        let out = Command::new(MEMPROF)
            .arg("diff")
            .arg(&a)
            .arg(b)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{b:?} took {:?}",
            started.elapsed()
        );
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(
            stderr,
            format!(
                "memprof: {}: not a regular file (a saved report is a file that `memprof trace \
                 --output` or `--json` wrote)\n",
                b.display()
            )
        );
    }
}

/// A kernel thread, a zombie, pid 1: one line saying why, not "failed to read /proc/N/exe".
#[test]
fn untraceable_pids_say_why() {
    require_root();
    let run = |pid: u32| {
        let out = memprof_trace(&["--pid", &pid.to_string(), "--duration", "1s"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert_eq!(
        run(2),
        "memprof: pid 2 (kthreadd) is a kernel thread: it has no user-space memory to trace\n"
    );
    // `sh` forks `true` and becomes `sleep`, which never reaps it: a zombie.
    let mut parent = Command::new("sh")
        .args(["-c", "true & exec sleep 30"])
        .spawn()
        .unwrap();
    let children = format!("/proc/{0}/task/{0}/children", parent.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let zombie = loop {
        let kids = fs::read_to_string(&children).unwrap_or_default();
        if let Some(pid) = kids
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            && fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "no zombie");
        thread::sleep(Duration::from_millis(20));
    };
    let said = run(zombie);
    assert!(
        said.starts_with(&format!("memprof: pid {zombie} ("))
            && said.ends_with(") has exited (a zombie): it has no memory left to trace\n"),
        "{said}"
    );
    let _ = parent.kill();
    let _ = parent.wait();
    let one = run(1);
    assert_eq!(one.lines().count(), 1, "{one}");
    assert!(!one.contains("failed to read /proc/1/exe"), "{one}");
}

/// With a COMMAND and --duration, the command ends with the trace (SIGTERM); --keep-running
/// leaves it running. memprof ends within 1 s of --duration either way.
#[test]
fn spawned_command_fate_at_duration_end() {
    require_root();
    for keep in [false, true] {
        let mut args = vec!["--json", "--duration", "1s"];
        if keep {
            args.push("--keep-running");
        }
        args.extend(["--", "sleep", "60"]);
        let started = Instant::now();
        let mp = Proc::spawn("memprof", &mut memprof_trace(&args));
        let f = mp.finish(Duration::from_secs(60));
        let took = started.elapsed();
        let report = final_report(&f);
        let pid = num(&report, "pid") as u32;
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        eprintln!("keep-running {keep}: memprof took {took:?} for --duration 1s");
        if keep {
            assert!(alive, "--keep-running: the command must still run");
            assert!(
                f.stderr
                    .contains("goes on running untraced (--keep-running)")
            );
            crate::common::send_signal(pid, libc::SIGKILL);
        } else {
            assert!(
                !alive,
                "the command (pid {pid}) outlived the trace\n{}",
                f.context()
            );
        }
        assert_eq!(report["exited"], false);
    }
}
