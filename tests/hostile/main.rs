//! Hostile input: targets, files and clients that try to hurt a root memprof (issue 21). Each
//! test reproduces one attack and asserts what must hold: a bound on memprof's memory, threads
//! or descriptors, a trace that still ends on time with a full report, or a one-line error.
//!
//! Needs root (eBPF); targets that play the attacker run as `nobody` (uid 65534). Fixtures are
//! compiled at test time with `cc` (`CC`):
//! `cargo test --release -p memprof-user --test hostile -- --test-threads=1`.

#[path = "../common/mod.rs"]
mod common;

mod end;
mod http;
mod objects;
mod options;
mod outputs;

use std::{
    ffi::OsStr,
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::Proc;

/// uid and gid of `nobody`.
pub(crate) const NOBODY: u32 = 65534;

/// A directory under /tmp everyone can read, removed on drop.
pub(crate) struct Dir(pub(crate) PathBuf);

impl Dir {
    pub(crate) fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("memprof-hostile-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        Dir(d)
    }

    pub(crate) fn path(&self, name: impl AsRef<OsStr>) -> PathBuf {
        self.0.join(name.as_ref())
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Compiles C `source` into `out` with extra `flags`.
pub(crate) fn cc(dir: &Dir, out: &Path, source: &str, flags: &[&str]) {
    let src = dir.path("fixture.c");
    fs::write(&src, source).unwrap();
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let res = Command::new(&compiler)
        .args(["-O1", "-fno-omit-frame-pointer", "-o"])
        .arg(out)
        .arg(&src)
        .args(flags)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(
        res.status.success(),
        "compiling failed: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    fs::set_permissions(out, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A field of `/proc/PID/status` in bytes (`VmHWM`, `VmRSS`), or a count (`Threads`).
pub(crate) fn status_field(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    let n: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(if line.ends_with("kB") { n * 1024 } else { n })
}

/// memprof's stderr line announcing the trace, waited for.
pub(crate) fn wait_tracing(mp: &mut Proc) {
    let deadline = Instant::now() + common::STARTUP;
    if mp
        .err
        .wait_line(deadline, |l| l.starts_with("memprof: tracing"))
        .is_none()
    {
        panic!("memprof did not start tracing\n{}", mp.output_so_far());
    }
}

/// Lets this process hold as many descriptors as its hard limit allows; returns that.
pub(crate) fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit buffer.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    lim.rlim_cur
}

/// One HTTP/1.0 GET with a `Host` header; the whole response.
pub(crate) fn get(port: u16, path: &str, host: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A program that allocates and frees in a loop until killed, printing `ready` first.
pub(crate) const CHURN: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
void *volatile sink;
int main(void) {
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        for (int i = 0; i < 1000; i++) { sink = malloc(64 + i); free(sink); }
        usleep(1000);
    }
}
"#;
