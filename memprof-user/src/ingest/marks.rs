//! Time marks sent to a running trace: `memprof mark NAME` connects to the trace's Unix socket
//! (`/run/memprof/PID.sock`, PID being the traced process), the trace takes every event already
//! in the ring buffer, starts the phase NAME, and answers `ok`, so whatever the marking script
//! does next is counted in the new phase.
//!
//! The socket is served by [`serve`], a task of its own on the runtime's worker, never by the
//! trace's event loop: it takes at most [`MAX_CONNECTIONS`] connections at once, reads at most
//! [`MAX_LINE`] bytes of a request line within 2 s, and hands only well-formed requests to the
//! trace (a channel of [`MAX_PENDING`]), which answers each once it has taken the ring. A
//! socket left behind by a trace that was killed is found (nobody accepts on it) and removed,
//! when a trace starts and when `memprof mark` looks for the running trace.

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

/// Connections served at once; more are answered `error: busy` and closed.
pub const MAX_CONNECTIONS: usize = 8;
/// The longest request line read (`mark ` and a name of at most 128 bytes, with room).
pub const MAX_LINE: u64 = 256;
/// Requests waiting for the trace at once.
pub const MAX_PENDING: usize = 16;
/// Time phases a trace takes at most; later marks are refused.
pub const MAX_MARKS: usize = 10_000;
/// How long a client has to send its request line.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request waits for the trace's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A well-formed mark request handed to the trace, and where its answer goes.
pub struct Request {
    pub name: String,
    pub answer: tokio::sync::oneshot::Sender<String>,
}

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
    // A socket left by a trace that was killed. One a running trace of the same process
    // accepts on is taken over: the newer trace gets the marks.
    if stale(&path) == Some(false) {
        eprintln!(
            "memprof: warning: another trace of this process listens at {}; marks now come here",
            path.display()
        );
    }
    let _ = fs::remove_file(&path);
    Ok(path)
}

/// Whether the socket at `path` is left over from a trace that is gone (nobody listens):
/// `None` when there is no socket there.
fn stale(path: &Path) -> Option<bool> {
    use std::os::unix::fs::FileTypeExt as _;
    let meta = fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_socket() {
        return Some(true);
    }
    match UnixStream::connect(path) {
        Ok(_) => Some(false),
        Err(e) => Some(e.raw_os_error() == Some(libc::ECONNREFUSED)),
    }
}

/// Serves the mark socket until the trace ends: each well-formed request goes to `requests`,
/// and the trace's answer back to the client. Runs on the runtime's worker, never blocking
/// the trace.
pub async fn serve(socket: tokio::net::UnixListener, requests: tokio::sync::mpsc::Sender<Request>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = socket.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(
                    READ_TIMEOUT,
                    tokio::io::AsyncWriteExt::write_all(&mut stream, b"error: busy\n"),
                )
                .await;
            });
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(ANSWER_TIMEOUT + READ_TIMEOUT, answer(stream, &requests))
                .await;
        });
    }
}

/// Reads one request line (bounded in length and time), has the trace act on it, answers.
async fn answer(stream: tokio::net::UnixStream, requests: &tokio::sync::mpsc::Sender<Request>) {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_LINE + 1));
    let Ok(Ok(_)) = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await
    else {
        return;
    };
    let reply = match std::str::from_utf8(&line).ok().and_then(parse_request) {
        _ if line.len() as u64 > MAX_LINE => {
            format!("error: request longer than {MAX_LINE} bytes\n")
        }
        None => "error: expected `mark NAME`\n".to_string(),
        Some(name) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let request = Request {
                name: name.to_string(),
                answer: tx,
            };
            if requests.try_send(request).is_err() {
                "error: busy\n".to_string()
            } else {
                match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
                    Ok(Ok(answer)) => answer,
                    _ => "error: the trace did not take the mark\n".to_string(),
                }
            }
        }
    };
    let _ = write.write_all(reply.as_bytes()).await;
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

/// The sockets of the traces running now; those of traces that were killed are removed.
pub fn running(dir: &Path) -> Vec<PathBuf> {
    let mut sockets: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    sockets.retain(|p| {
        let gone = stale(p) == Some(true);
        if gone {
            let _ = fs::remove_file(p);
        }
        !gone
    });
    sockets.sort();
    sockets
}

/// `memprof mark NAME [--pid PID]`: sends the mark and waits for the trace's answer.
pub fn send(dir: &Path, pid: Option<u32>, name: &str) -> Result<()> {
    if !valid_name(name) {
        bail!("invalid mark name {name:?} (1 to 128 characters, no control characters)");
    }
    let path = match pid {
        Some(pid) => socket_path(dir, pid),
        None => {
            let sockets = running(dir);
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

    #[test]
    fn stale_sockets_are_removed() {
        let dir = std::env::temp_dir().join(format!("memprof-stale-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        prepare(&dir, 7).unwrap();
        // A socket nobody accepts on any more, as a killed trace leaves it.
        drop(UnixListener::bind(socket_path(&dir, 7)).unwrap());
        let live = Listener::bind(&dir, 8).unwrap();
        assert_eq!(stale(&socket_path(&dir, 7)), Some(true));
        assert_eq!(stale(&socket_path(&dir, 8)), Some(false));
        // `mark` without --pid finds the one live trace.
        assert_eq!(running(&dir), vec![socket_path(&dir, 8)]);
        assert!(!socket_path(&dir, 7).exists());
        drop(live);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn server_bounds_lines_connections_and_waits() {
        use std::io::Read as _;
        let dir = std::env::temp_dir().join(format!("memprof-serve-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = Listener::bind(&dir, 9).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(MAX_PENDING);
        let socket = {
            let _e = rt.enter();
            tokio::net::UnixListener::from_std(listener.socket.try_clone().unwrap()).unwrap()
        };
        rt.spawn(serve(socket, tx));
        // The trace: answers every request.
        rt.spawn(async move {
            while let Some(r) = rx.recv().await {
                let _ = r.answer.send(format!("ok {}\n", r.name));
            }
        });
        let path = socket_path(&dir, 9);
        let ask = |bytes: &[u8]| {
            let mut s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.write_all(bytes);
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        };
        // Idle clients hold every slot: the next is told so at once.
        let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(ask(b"mark a\n"), "error: busy\n");
        drop(idle);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(ask(b"mark a\n"), "ok a\n");
        assert_eq!(
            ask(&[b'x'; 4096]),
            format!("error: request longer than {MAX_LINE} bytes\n")
        );
        assert_eq!(ask(b"nonsense\n"), "error: expected `mark NAME`\n");
        drop(listener);
        fs::remove_dir_all(&dir).unwrap();
    }
}
