//! Processes the bench starts beside its workloads (servers, tracers, idle targets), ended with
//! everything they started when the bench fails half-way, so none outlives it.

use std::{
    fs,
    io::Read as _,
    os::unix::process::CommandExt as _,
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// A child process that is killed, with its descendants, when dropped before it was waited for.
/// It gets SIGKILL when the bench itself dies (`PR_SET_PDEATHSIG`).
pub(super) struct Guarded {
    pub child: Child,
    what: String,
    waited: bool,
}

impl Guarded {
    /// Starts `cmd`; `what` names it in messages.
    pub fn spawn(cmd: &mut Command, what: &str) -> Result<Self> {
        // SAFETY: prctl is async-signal-safe; it only sets the calling process's own attribute.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start {what}"))?;
        Ok(Self {
            child,
            what: what.to_string(),
            waited: false,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process alone.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling a child we started and have not reaped.
        unsafe { libc::kill(self.id() as i32, signal) };
    }

    /// Whether it has exited (and is reaped).
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        let status = self.child.try_wait()?;
        if status.is_some() {
            self.waited = true;
        }
        Ok(status)
    }

    /// Waits up to `timeout` for it to exit; kills it and fails after that.
    pub fn wait_for(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("{} did not exit within {timeout:?}; killed", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` and waits up to `timeout` for the exit.
    pub fn stop(&mut self, signal: i32, timeout: Duration) -> Result<ExitStatus> {
        self.signal(signal);
        self.wait_for(timeout)
    }

    /// Reads its stderr (a pipe) to the end, then waits up to `timeout` for the exit.
    pub fn stderr_and_exit(&mut self, timeout: Duration) -> Result<(String, ExitStatus)> {
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            stderr.read_to_string(&mut text)?;
        }
        let status = self.wait_for(timeout)?;
        Ok((text, status))
    }

    /// SIGKILL to it and its descendants, then reaps it.
    fn kill(&mut self) {
        if self.waited {
            return;
        }
        let mut pids = descendants(self.id());
        pids.push(self.id());
        for pid in pids {
            // SAFETY: signalling our child and the processes it started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = self.child.wait();
        self.waited = true;
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The processes descended from `pid`, children before their own children.
pub(super) fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            Some((pid, parent_of(&stat)?))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|&&(_, p)| p == parent)
                .map(|&(child, _)| child),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// The parent pid in a `/proc/PID/stat` line (`pid (comm) state ppid ...`; comm may hold
/// spaces and parentheses).
fn parent_of(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The name (`/proc/PID/comm`) of process `pid`.
pub(super) fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// A temporary file or directory, removed when dropped.
pub(super) struct TempPath(pub std::path::PathBuf);

impl TempPath {
    /// A directory of its own under the system's temporary directory.
    pub fn dir(prefix: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .with_context(|| format!("failed to create {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = fs::remove_dir_all(&self.0);
        } else {
            let _ = fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_parent_from_stat() {
        assert_eq!(
            parent_of("4242 (redis-server) S 4241 4242 100 0 -1 4194560 532"),
            Some(4241)
        );
        // A name with spaces and a closing parenthesis.
        assert_eq!(parent_of("7 (a) b (c)) R 1 7 7 0"), Some(1));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn finds_and_kills_descendants() {
        let mut sh = Guarded::spawn(
            Command::new("sh").args(["-c", "sleep 30 & sleep 30; true"]),
            "sh",
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut found = Vec::new();
        while found.len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            found = descendants(sh.id());
        }
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found
                .iter()
                .all(|&pid| comm(pid).as_deref() == Some("sleep"))
        );
        assert!(sh.exited().unwrap().is_none());
        drop(sh);
        std::thread::sleep(Duration::from_millis(100));
        // Killed; reaped by init or a subreaper, or still a zombie for an instant.
        for pid in found {
            let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = state[state.rfind(')').map_or(0, |i| i + 1)..].trim_start();
            assert!(state.is_empty() || state.starts_with('Z'), "{pid}: {state}");
        }
    }
}
