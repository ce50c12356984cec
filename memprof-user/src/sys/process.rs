//! Facts about processes from `/proc`: command lines, names, cgroups, the root a process lives
//! under, the list of processes.

use std::{fs, io::Read as _, os::unix::fs::MetadataExt as _};

/// Bytes of a command line read from `/proc` (the process sets its size: a command line of
/// megabytes is cut here).
const MAX_COMMAND_LINE: u64 = 64 << 10;

/// The command line of process `pid` (empty if unreadable; its first `MAX_COMMAND_LINE` bytes).
pub fn command_line(pid: u32) -> Vec<String> {
    let mut raw = Vec::new();
    match fs::File::open(format!("/proc/{pid}/cmdline"))
        .and_then(|f| f.take(MAX_COMMAND_LINE).read_to_end(&mut raw))
    {
        Ok(_) => parse_command_line(&raw),
        Err(_) => Vec::new(),
    }
}

/// Arguments separated by NULs, as `/proc/PID/cmdline` has them. Empty arguments are kept,
/// except at the end: a process that rewrites its command line pads it with NULs.
fn parse_command_line(raw: &[u8]) -> Vec<String> {
    let end = raw.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    if end == 0 {
        return Vec::new();
    }
    raw[..end].split(|b| *b == 0).map(text).collect()
}

/// The command line an exec record carries (`raw`, a bounded copy of the start of the
/// arguments, each ending in a NUL, and possibly more strings after them; `argc` the number of
/// arguments): its first `argc` arguments, or as many as the copy holds, the last one cut short
/// as far as it goes; and whether they are all there, whole.
pub fn exec_command_line(raw: &[u8], argc: u32) -> (Vec<String>, bool) {
    let mut whole = argc > 0;
    let args: Vec<String> = raw
        .split_inclusive(|b| *b == 0)
        .take(argc as usize)
        .map(|arg| match arg.strip_suffix(&[0]) {
            Some(arg) => text(arg),
            None => {
                whole = false;
                text(arg)
            }
        })
        .collect();
    let whole = whole && args.len() == argc as usize;
    (args, whole)
}

fn text(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).into_owned()
}

/// Every process id in /proc, in order.
pub fn all_pids() -> Vec<u32> {
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids
}

/// Kernel threads have no address space: an empty maps file.
pub fn is_kernel_thread(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/maps")).map_or(true, |m| m.is_empty())
}

/// `PF_KTHREAD` of `/proc/PID/stat`'s flags.
const PF_KTHREAD: u64 = 0x0020_0000;

/// The state letter and flags of `/proc/PID/stat`, and the name between its parentheses.
fn stat(pid: u32) -> Option<(char, u64, String)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_string();
    let mut fields = text.get(close + 1..)?.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state: ppid, pgrp, session, tty_nr, tpgid, flags.
    let flags = fields.nth(5)?.parse().ok()?;
    Some((state, flags, name))
}

/// Checks that process `pid` can be traced: it exists, is not a kernel thread nor a zombie,
/// and its executable can be read; the error is one line that says which.
pub fn check_traceable(pid: u32) -> anyhow::Result<()> {
    use anyhow::bail;
    let Some((state, flags, name)) = stat(pid) else {
        bail!("no such process: pid {pid}");
    };
    let name = super::printable::escape(&name);
    if flags & PF_KTHREAD != 0 {
        bail!("pid {pid} ({name}) is a kernel thread: it has no user-space memory to trace");
    }
    if state == 'Z' || state == 'X' {
        bail!("pid {pid} ({name}) has exited (a zombie): it has no memory left to trace");
    }
    if let Err(e) = fs::read_link(format!("/proc/{pid}/exe")) {
        match e.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) => bail!(
                "pid {pid} ({name}): the kernel denies memprof access to it (permission denied \
                 reading /proc/{pid}/exe: it holds capabilities memprof lacks, or lives in \
                 another user namespace)"
            ),
            Some(libc::ENOENT) if fs::metadata(format!("/proc/{pid}")).is_ok() => bail!(
                "pid {pid} ({name}) has no executable (a kernel thread, or exiting): nothing \
                 to trace"
            ),
            _ => bail!("pid {pid} ({name}): cannot read /proc/{pid}/exe: {e}"),
        }
    }
    Ok(())
}

/// The process's name (`/proc/PID/comm`).
pub fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// The process's cgroup v2 path (`0::/system.slice/x.service` → `/system.slice/x.service`).
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// Where cgroup v2 is mounted, from the text of /proc/self/mounts (`/sys/fs/cgroup` on a
/// unified hierarchy, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_root(mounts: &str) -> Option<std::path::PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| std::path::PathBuf::from(dir))
    })
}

/// `/proc/PID/root` when it is not memprof's own root.
pub fn foreign_root(pid: u32) -> Option<String> {
    let theirs = fs::metadata(format!("/proc/{pid}/root")).ok()?;
    let ours = fs::metadata("/proc/self/root").ok()?;
    ((theirs.dev(), theirs.ino()) != (ours.dev(), ours.ino())).then(|| format!("/proc/{pid}/root"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn proc_command_lines_keep_empty_arguments_but_not_padding() {
        use super::parse_command_line;
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_command_line(b"sh\0-c\0\0x\0"),
            owned(&["sh", "-c", "", "x"])
        );
        // A rewritten command line, padded with NULs to the size of the old one.
        assert_eq!(
            parse_command_line(b"nginx: worker process\0\0\0\0\0"),
            owned(&["nginx: worker process"])
        );
        assert_eq!(parse_command_line(b"\0\0"), Vec::<String>::new());
        assert_eq!(parse_command_line(b""), Vec::<String>::new());
    }

    #[test]
    fn exec_command_lines_whole_cut_and_followed_by_other_strings() {
        use super::exec_command_line;
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            exec_command_line(b"ls\0-l\0/tmp\0", 3),
            (owned(&["ls", "-l", "/tmp"]), true)
        );
        // Without an environment the copy runs on into the executable's name: argc bounds it.
        assert_eq!(
            exec_command_line(b"ls\0-l\0/usr/bin/ls\0\0\0", 2),
            (owned(&["ls", "-l"]), true)
        );
        // Cut short by the copy's size: the last argument as far as it goes.
        assert_eq!(
            exec_command_line(b"cc\0-o\0a-very-lo", 4),
            (owned(&["cc", "-o", "a-very-lo"]), false)
        );
        assert_eq!(exec_command_line(b"a\0b\0", 3), (owned(&["a", "b"]), false));
        assert_eq!(exec_command_line(b"", 2), (Vec::new(), false));
        assert_eq!(exec_command_line(b"x\0", 0), (Vec::new(), false));
        // An empty argument stays one.
        assert_eq!(
            exec_command_line(b"sh\0\0-c\0", 3),
            (owned(&["sh", "", "-c"]), true)
        );
    }

    use super::*;

    #[test]
    fn untraceable_processes_say_why() {
        // kthreadd is pid 2 on every Linux.
        let e = check_traceable(2).unwrap_err().to_string();
        assert!(e.starts_with("pid 2 (kthreadd) is a kernel thread"), "{e}");
        assert!(check_traceable(std::process::id()).is_ok());
        let e = check_traceable(4_194_303).unwrap_err().to_string();
        assert_eq!(e, "no such process: pid 4194303");
        // A zombie: a child that exited and is not reaped yet.
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stat(pid).is_some_and(|(s, _, _)| s != 'Z') && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let e = check_traceable(pid).unwrap_err().to_string();
        assert!(e.contains("has exited (a zombie)"), "{e}");
        drop(child);
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_root(hybrid),
            Some(std::path::PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_root("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n"),
            Some(std::path::PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_root("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn own_process_is_under_our_root() {
        assert_eq!(foreign_root(std::process::id()), None);
        assert!(comm(std::process::id()).is_some_and(|c| !c.is_empty()));
    }
}
