//! Bad inputs: each a non-zero exit with one clear `memprof: ` line on stderr, never a panic.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use super::fixtures;
use crate::common::{
    DEADLINE, Finished, MEMPROF, Proc, clean_error, require_root, run_trace, start_target,
};

/// Non-zero exit, no panic, and exactly one stderr line: `memprof: ...` containing one of
/// `needles` (case-insensitive).
fn assert_clean_error(run: &Finished, needles: &[&str]) {
    let (mut c, first) = clean_error(run, format!("error case: {}", run.what));
    let lower = first.to_lowercase();
    c.check(
        needles.iter().any(|n| lower.contains(&n.to_lowercase())),
        format!("error line should mention one of {needles:?}: {first:?}"),
    );
    c.finish(|| run.context());
}

/// `memprof trace --json --pid PID`, to the end.
fn trace_pid(pid: u32) -> Finished {
    run_trace(&["--json", "--pid", &pid.to_string()], DEADLINE)
}

/// `setpriv OPTS PROGRAM trace --json -- /bin/true` (PROGRAM a memprof binary), run from `/`,
/// to the end.
fn setpriv_trace(what: &str, opts: &[&str], program: &Path) -> Finished {
    let mut cmd = Command::new("setpriv");
    cmd.args(opts)
        .arg(program)
        .args(["trace", "--json", "--", "/bin/true"])
        .current_dir("/");
    Proc::spawn(what, &mut cmd).finish(DEADLINE)
}

#[test]
fn error_nonexistent_pid() {
    require_root();
    // A pid that just existed and has been reaped.
    let mut child = Command::new("true").spawn().expect("run true");
    let pid = child.id();
    child.wait().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} was reused already"
    );
    assert_clean_error(&trace_pid(pid), &["no such process"]);
}

#[test]
fn error_command_not_found() {
    require_root();
    for cmd in [
        "memprof-test-no-such-command",
        "/nonexistent/memprof-test-no-such-command",
    ] {
        let run = run_trace(&["--json", "--", cmd], DEADLINE);
        assert_clean_error(&run, &["command not found"]);
    }
}

#[test]
fn error_static_binary_spawn() {
    let f = fixtures();
    let run = run_trace(
        &["--json", "--", f.alloc_static.to_str().unwrap()],
        DEADLINE,
    );
    assert_clean_error(&run, &["static"]);
}

#[test]
fn error_static_binary_pid() {
    let f = fixtures();
    let target = start_target("alloc_sites_static --wait", &f.alloc_static, &["--wait"]);
    let run = trace_pid(target.pid());
    assert_clean_error(&run, &["static", "libc"]);
    drop(target);
}

/// A world-executable copy of memprof (the build tree may not be reachable for an
/// unprivileged user), removed when dropped.
struct PublicCopy(PathBuf);

impl PublicCopy {
    fn new() -> PublicCopy {
        let dir = std::env::temp_dir().join(format!("memprof-trace-tests-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let copy = dir.join("memprof");
        fs::copy(MEMPROF, &copy).unwrap();
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
        PublicCopy(dir)
    }
}

impl Drop for PublicCopy {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn error_not_root() {
    require_root();
    let copy = PublicCopy::new();
    let run = setpriv_trace(
        "setpriv (nobody) memprof trace -- /bin/true",
        &["--reuid=65534", "--regid=65534", "--clear-groups"],
        &copy.0.join("memprof"),
    );
    assert_clean_error(&run, &["root", "CAP_"]);
}

/// Root without CAP_BPF and CAP_SYS_ADMIN (either one lets the kernel load BPF programs) cannot
/// trace; memprof must say which capability is missing.
#[test]
fn error_missing_cap_bpf() {
    require_root();
    let run = setpriv_trace(
        "memprof trace -- /bin/true without CAP_BPF/CAP_SYS_ADMIN",
        &["--bounding-set=-bpf,-sys_admin"],
        Path::new(MEMPROF),
    );
    assert_clean_error(&run, &["CAP_BPF"]);
}
