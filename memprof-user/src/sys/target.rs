//! The process to trace: checks made before anything is loaded (privileges, kernel support, the
//! command), spawning a command stopped before `exec` so tracing starts at its first
//! allocation, and a handle that tells when a process exited. Which allocators the process uses
//! is `probe::allocators`' business.

use std::{
    env,
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Fails with a one-line explanation when the effective capability set `cap_eff` cannot load
/// and attach the programs.
pub fn check_capabilities(cap_eff: u64, euid: u32) -> Result<()> {
    let has = |c: u32| cap_eff & (1 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if missing.is_empty() {
        return Ok(());
    }
    let plural = if missing.len() == 1 { "y" } else { "ies" };
    let missing = missing.join(", ");
    if euid == 0 {
        bail!(
            "running as root but missing capabilit{plural} {missing} (reduced capability set); \
             give memprof CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN"
        )
    }
    bail!(
        "not running as root (uid {euid}) and missing capabilit{plural} {missing}; run memprof \
         with sudo"
    )
}

/// The effective capability mask from `/proc/self/status`.
pub fn effective_capabilities() -> Result<u64> {
    let status =
        fs::read_to_string("/proc/self/status").context("failed to read /proc/self/status")?;
    parse_cap_eff(&status).ok_or_else(|| anyhow!("no CapEff line in /proc/self/status"))
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

/// Fails when the kernel lacks what the programs need, looking under `sys` (normally `/sys`).
pub fn check_kernel(sys: &Path) -> Result<()> {
    if !sys.join("kernel/btf/vmlinux").exists() {
        bail!(
            "the kernel exposes no BTF ({} is missing); memprof needs a kernel built with \
             CONFIG_DEBUG_INFO_BTF=y",
            sys.join("kernel/btf/vmlinux").display()
        );
    }
    if !sys.join("bus/event_source/devices/uprobe").exists() {
        bail!(
            "the kernel has no uprobe support ({} is missing); memprof needs CONFIG_UPROBE_EVENTS=y",
            sys.join("bus/event_source/devices/uprobe").display()
        );
    }
    Ok(())
}

/// Finds `program` the way `execvp` would.
pub fn resolve_command(program: &str) -> Result<PathBuf> {
    let candidate = Path::new(program);
    if program.contains('/') {
        if candidate.is_file() {
            return Ok(candidate.to_path_buf());
        }
        bail!("command not found: {program}");
    }
    let path = env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
        .ok_or_else(|| anyhow!("command not found: {program}"))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A command forked and stopped before `exec`.
pub struct Spawned {
    pub pid: u32,
}

/// Forks; the child stops itself with SIGSTOP, then (once continued) redirects stdout to stderr
/// if asked and executes `argv`. Must be called before any thread is started.
pub fn spawn_stopped(path: &Path, argv: &[String], stdout_to_stderr: bool) -> Result<Spawned> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let c_args: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .context("argument contains a NUL byte")?;
    let mut c_argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
    c_argv.push(std::ptr::null());

    // SAFETY: single-threaded at this point; the child only makes async-signal-safe calls.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork failed: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe {
            libc::raise(libc::SIGSTOP);
            if stdout_to_stderr {
                libc::dup2(2, 1);
            }
            libc::execv(c_path.as_ptr(), c_argv.as_ptr());
            let msg = b"memprof: exec failed\n";
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(127);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) };
    if r != pid || !libc::WIFSTOPPED(status) {
        bail!("the command did not stop before exec (status {status:#x})");
    }
    Ok(Spawned { pid: pid as u32 })
}

impl Spawned {
    /// Lets the stopped child run (it executes the command).
    pub fn resume(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGCONT) };
    }

    /// Ends a command that outlived the trace: SIGTERM (and SIGCONT, should it be stopped),
    /// then SIGKILL once `grace` has passed; reaps it either way. Returns its wait status.
    pub fn terminate(&self, grace: std::time::Duration) -> Option<i32> {
        let pid = self.pid as i32;
        let reaped = |flags| {
            let mut status = 0;
            // SAFETY: reaping our own child.
            let r = unsafe { libc::waitpid(pid, &mut status, flags) };
            (r == pid).then_some(status)
        };
        if let Some(status) = reaped(libc::WNOHANG) {
            return Some(status);
        }
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
            libc::kill(pid, libc::SIGCONT);
        }
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Some(status) = reaped(libc::WNOHANG) {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        reaped(0)
    }

    /// Kills and reaps the child (setup failed).
    pub fn abort(&self) {
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGKILL);
            libc::waitpid(self.pid as i32, std::ptr::null_mut(), 0);
        }
    }
}

/// A pidfd: readable once the process has exited. Opened before tracing starts, so a process
/// that exits at any later time is still seen to exit.
pub struct PidFd(RawFd);

impl PidFd {
    pub fn open(pid: u32) -> Result<Self> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                anyhow::bail!("no such process: pid {pid}");
            }
            return Err(err).context("pidfd_open failed");
        }
        Ok(Self(fd as RawFd))
    }
}

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl Drop for PidFd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities() {
        let all = (1u64 << 41) - 1;
        assert!(check_capabilities(all, 0).is_ok());
        assert!(check_capabilities(1 << CAP_SYS_ADMIN, 0).is_ok());
        let e = check_capabilities(all & !(1 << CAP_BPF) & !(1 << CAP_SYS_ADMIN), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing capability CAP_BPF (reduced"), "{e}");
        let e = check_capabilities(0, 1000).unwrap_err().to_string();
        assert!(e.contains("not running as root (uid 1000)"), "{e}");
        assert!(e.contains("CAP_BPF, CAP_PERFMON"), "{e}");
    }

    #[test]
    fn cap_eff_line() {
        assert_eq!(
            parse_cap_eff("Name:\tx\nCapEff:\t000001ffffffffff\n"),
            Some(0x1ff_ffff_ffff)
        );
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn kernel_support_checks() {
        let dir = std::env::temp_dir().join(format!("memprof-sys-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bus/event_source/devices/uprobe")).unwrap();
        let e = check_kernel(&dir).unwrap_err().to_string();
        assert!(e.contains("no BTF"), "{e}");
        fs::create_dir_all(dir.join("kernel/btf")).unwrap();
        fs::write(dir.join("kernel/btf/vmlinux"), b"").unwrap();
        assert!(check_kernel(&dir).is_ok());
        fs::remove_dir_all(dir.join("bus")).unwrap();
        let e = check_kernel(&dir).unwrap_err().to_string();
        assert!(e.contains("no uprobe support"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn command_lookup() {
        assert!(resolve_command("sh").is_ok());
        let e = resolve_command("memprof-no-such-command")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "command not found: memprof-no-such-command");
        assert!(resolve_command("/nonexistent/x").is_err());
    }
}
