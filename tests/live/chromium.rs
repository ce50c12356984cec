//! A DevTools-protocol client of headless Chromium over a pipe (`--remote-debugging-pipe`:
//! commands on fd 3, replies on fd 4, NUL-terminated JSON), which needs no WebSocket client and
//! no npm package.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::TempDir;
use crate::common::{Proc, headless_chromium};

/// A DevTools-protocol client over Chromium's `--remote-debugging-pipe`.
pub(crate) struct Chromium {
    pub(crate) proc: Proc,
    pub(crate) commands: fs::File,
    pub(crate) replies: mpsc::Receiver<Value>,
    pub(crate) next_id: u64,
    pub(crate) _profile: TempDir,
}

impl Chromium {
    pub(crate) fn open(url: &str) -> Chromium {
        let profile = TempDir::new("chromium");
        let (cmd_read, cmd_write) = pipe();
        let (reply_read, reply_write) = pipe();
        // The child's ends, above any fd it might already have, become its fds 3 and 4.
        let child_in = dup_high(&cmd_read);
        let child_out = dup_high(&reply_write);
        drop((cmd_read, reply_write));
        let mut cmd = headless_chromium("CHROMIUM", &profile.0);
        cmd.arg("--remote-debugging-pipe").arg(url);
        // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(child_in, 3) < 0 || libc::dup2(child_out, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let proc = Proc::spawn("chromium", &mut cmd);
        // SAFETY: closing our copies of the child's ends.
        unsafe {
            libc::close(child_in);
            libc::close(child_out);
        }
        let (tx, replies) = mpsc::channel();
        let mut reader = BufReader::new(fs::File::from(reply_read));
        thread::spawn(move || {
            let mut buf = Vec::new();
            while let Ok(n) = reader.read_until(0, &mut buf) {
                if n == 0 || buf.last() != Some(&0) {
                    break;
                }
                buf.pop();
                if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(v).is_err()
                {
                    break;
                }
                buf.clear();
            }
        });
        Chromium {
            proc,
            commands: fs::File::from(cmd_write),
            replies,
            next_id: 1,
            _profile: profile,
        }
    }

    /// Sends a command and waits for its reply's `result`: 10 s at most, except for the
    /// browser's first reply, which waits out its start-up (on a fresh machine that includes
    /// building the font cache, which has taken more than 10 s).
    pub(crate) fn call(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        let wait = if self.next_id == 1 {
            Duration::from_secs(120)
        } else {
            Duration::from_secs(10)
        };
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("DevTools pipe: {e}\n{}", self.proc.output_tail()));
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(reply) if reply["id"] == id => {
                    assert!(reply.get("error").is_none(), "{method} failed: {reply}");
                    return reply["result"].clone();
                }
                Ok(_) => {} // events and other replies
                Err(e) => panic!(
                    "no reply to {method} within {} s ({e})\n{}",
                    wait.as_secs(),
                    self.proc.output_tail()
                ),
            }
        }
    }

    pub(crate) fn close(mut self) {
        let id = self.next_id;
        let msg = json!({"id": id, "method": "Browser.close", "params": {}});
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        let _ = self.commands.write_all(&bytes);
        if self.proc.wait(Duration::from_secs(10)).is_none() {
            self.proc.kill_group();
        }
    }
}

pub(crate) fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: freshly created, owned here.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A close-on-exec copy of `fd` numbered 10 or above.
pub(crate) fn dup_high(fd: &OwnedFd) -> i32 {
    use std::os::fd::AsRawFd;
    // SAFETY: plain fcntl on a valid fd.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    assert!(new >= 10, "fcntl: {}", std::io::Error::last_os_error());
    new
}
