//! Locating the workspace and running child processes.

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// The workspace root and how to run tools in it.
pub struct Workspace {
    pub root: PathBuf,
}

impl Workspace {
    pub fn locate() -> Self {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir
            .parent()
            .expect("xtask lives in a subdirectory of the workspace")
            .to_path_buf();
        Self { root }
    }

    /// Cargo's target directory: `CARGO_TARGET_DIR` when set, else `target/`.
    pub fn target_dir(&self) -> PathBuf {
        match env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => self.root.join(dir),
            _ => self.root.join("target"),
        }
    }

    /// A command run from the workspace root with cargo's bin directory on `PATH`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.root).env("PATH", search_path());
        cmd
    }

    /// The cargo that runs xtask (`CARGO`), else `cargo` from `PATH`.
    pub fn cargo(&self) -> Command {
        self.command(cargo_program())
    }
}

/// The cargo that runs xtask (`CARGO`), else `cargo` from `PATH`.
pub fn cargo_program() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`), where rustup and `cargo install` put binaries.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = match env::var_os("CARGO_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home),
        _ => PathBuf::from(env::var_os("HOME")?).join(".cargo"),
    };
    Some(home.join("bin"))
}

/// `PATH` with cargo's bin directory appended when missing, so that rustup, cargo and
/// bpf-linker are found even from a shell that never sourced `~/.cargo/env`.
pub fn search_path() -> OsString {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|path| env::split_paths(&path).collect())
        .unwrap_or_default();
    if let Some(bin) = cargo_bin_dir()
        && !dirs.contains(&bin)
    {
        dirs.push(bin);
    }
    env::join_paths(dirs).unwrap_or_else(|_| env::var_os("PATH").unwrap_or_default())
}

/// The first executable called `name` on [`search_path`].
pub fn find_program(name: &str) -> Option<PathBuf> {
    env::split_paths(&search_path())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// Runs `cmd` with inherited stdio after printing it; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    eprintln!("+ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout when it exits 0; `None` when it cannot start or fails.
pub fn output_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(std::process::Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line, with paths inside the workspace shown relative to it.
pub fn display(cmd: &Command) -> String {
    let root = Workspace::locate().root;
    let show = |s: &OsStr| -> String {
        let path = Path::new(s);
        if let Ok(rel) = path.strip_prefix(&root) {
            rel.display().to_string()
        } else if path.is_absolute() && s == cargo_program() {
            "cargo".to_owned()
        } else {
            s.to_string_lossy().into_owned()
        }
    };
    std::iter::once(show(cmd.get_program()))
        .chain(cmd.get_args().map(show))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fails unless the effective user is root.
pub fn ensure_root(command: &str, why: &str) -> Result<()> {
    let status =
        fs::read_to_string("/proc/self/status").context("failed to read /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    if euid != "0" {
        bail!(
            "`cargo xtask {command}` must run as root ({why}); run it again as root, e.g. with sudo"
        );
    }
    Ok(())
}

/// Waits for child `pid`: its wait status and resource usage.
pub fn wait4(pid: u32) -> Result<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value to be overwritten.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid pointers.
    let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    if r != pid as i32 {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    Ok((status, usage))
}

/// A `timeval` in seconds.
pub fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}
