//! Time marks sent to a running trace: `memprof mark NAME` connects to the trace's Unix socket
//! (`/run/memprof/PID.sock`, PID being the traced process), the trace takes every event already
//! in the ring buffer, starts the phase NAME, and answers `ok`, so whatever the marking script
//! does next is counted in the new phase.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{
        fs::PermissionsExt as _,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// Directory of the mark sockets (root-only, like the tracer).
pub const SOCKET_DIR: &str = "/run/memprof";

pub fn socket_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.sock"))
}

/// Parses a request line `mark NAME`.
pub fn parse_request(line: &str) -> Option<&str> {
    let name = line.trim_end_matches(['\r', '\n']).strip_prefix("mark ")?;
    valid_name(name).then_some(name)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && !name.chars().any(char::is_control)
}

/// Creates the socket directory (mode 0700) and returns where the trace of `pid` listens.
pub fn prepare(dir: &Path, pid: u32) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("failed to restrict {}", dir.display()))?;
    let path = socket_path(dir, pid);
    // A socket left by a trace that was killed.
    let _ = fs::remove_file(&path);
    Ok(path)
}

/// The trace's end of the socket; the socket file goes away with it, however the trace ends.
#[derive(Debug)]
pub struct Listener {
    pub socket: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Listens for marks on the trace of `pid` (non-blocking, for the async runtime).
    pub fn bind(dir: &Path, pid: u32) -> Result<Self> {
        let path = prepare(dir, pid)?;
        let socket = UnixListener::bind(&path)
            .with_context(|| format!("failed to listen at {}", path.display()))?;
        socket.set_nonblocking(true)?;
        Ok(Self { socket, path })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// `memprof mark NAME [--pid PID]`: sends the mark and waits for the trace's answer.
pub fn send(dir: &Path, pid: Option<u32>, name: &str) -> Result<()> {
    if !valid_name(name) {
        bail!("invalid mark name {name:?} (1 to 128 characters, no control characters)");
    }
    let path = match pid {
        Some(pid) => socket_path(dir, pid),
        None => {
            let sockets: Vec<PathBuf> = fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                        .collect()
                })
                .unwrap_or_default();
            match sockets.as_slice() {
                [one] => one.clone(),
                [] => bail!(
                    "no memprof trace is running (no socket in {})",
                    dir.display()
                ),
                _ => bail!("several memprof traces are running; say which with --pid PID"),
            }
        }
    };
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "no memprof trace listens at {} (is the pid traced?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(stream, "mark {name}")?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .context("the trace did not answer the mark")?;
    if answer.trim() != "ok" {
        bail!("the trace refused the mark: {}", answer.trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(parse_request("mark render\n"), Some("render"));
        assert_eq!(parse_request("mark two words\n"), Some("two words"));
        assert_eq!(parse_request("mark \n"), None);
        assert_eq!(parse_request("phase x\n"), None);
        assert_eq!(parse_request("mark a\u{7}b"), None);
    }

    #[test]
    fn send_without_trace_says_so() {
        let dir = std::env::temp_dir().join(format!("memprof-marks-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let e = send(&dir, None, "x").unwrap_err().to_string();
        assert!(e.starts_with("no memprof trace is running"), "{e}");
        prepare(&dir, 42).unwrap();
        let e = format!("{:#}", send(&dir, Some(42), "x").unwrap_err());
        assert!(e.contains("no memprof trace listens at"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
