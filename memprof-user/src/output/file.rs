//! Writing an output file where memprof, as root, was told to, without being turned against
//! another file: the bytes go to a new file created beside the target (`O_CREAT | O_EXCL |
//! O_NOFOLLOW`, with the requested mode, 0600 by default) and renamed over it, so a symbolic
//! link or hard link an attacker placed at the path is replaced, never written through, and a
//! reader never sees half a file. The directory is opened once and every step is relative to
//! it.
//!
//! What is already at the path decides the rest: nothing or a regular file is replaced; a
//! symbolic link is followed only when it belongs to memprof's own user (`/dev/stdout`), else
//! refused; a FIFO, socket or device (`/dev/null`) is written to in place, opened without
//! following links; a directory is an error.

use std::{
    ffi::{CString, OsStr},
    fs::File,
    io::{self, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::{ffi::OsStrExt as _, fs::OpenOptionsExt as _},
    },
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

/// The default mode of files memprof writes: they hold command lines and names from traced
/// processes.
pub const PRIVATE: u32 = 0o600;

fn c(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::other("a file name holds a NUL byte"))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Writes `bytes` to `path` with permissions `mode` (see the module's documentation).
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("the path names no file"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(parent)?;
    let cname = c(name)?;
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid directory fd, a C string and a stat buffer.
    let found = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            cname.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if found == 0 {
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(io::Error::other("it is a directory")),
            libc::S_IFLNK => {
                // SAFETY: geteuid cannot fail.
                let euid = unsafe { libc::geteuid() };
                if st.st_uid != euid {
                    return Err(io::Error::other(format!(
                        "it is a symbolic link owned by uid {}: memprof does not write through \
                         another user's link (remove it, or give the file's own path)",
                        st.st_uid
                    )));
                }
                // memprof's own user's link (`/dev/stdout`): its target, as it is.
                let mut f = File::options().write(true).truncate(true).open(path)?;
                return f.write_all(bytes);
            }
            _ => {
                // A FIFO, socket or device: written in place, never created nor followed.
                // SAFETY: as above.
                let fd = cvt(unsafe {
                    libc::openat(
                        dir.as_raw_fd(),
                        cname.as_ptr(),
                        libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY,
                    )
                })?;
                // SAFETY: a new fd we own.
                let mut f = unsafe { File::from_raw_fd(fd) };
                return f.write_all(bytes);
            }
        }
    } else {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
    }
    replace(&dir, &cname, name, bytes, mode)
}

/// Writes a new file beside `name` in `dir` and renames it over `name`.
fn replace(dir: &File, cname: &CString, name: &OsStr, bytes: &[u8], mode: u32) -> io::Result<()> {
    static SERIAL: AtomicU32 = AtomicU32::new(0);
    let mut temp = b".".to_vec();
    temp.extend_from_slice(name.as_bytes());
    temp.extend_from_slice(
        format!(
            ".memprof-{}-{}.tmp",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        )
        .as_bytes(),
    );
    let ctemp = c(OsStr::from_bytes(&temp))?;
    // SAFETY: a valid directory fd and C string.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            ctemp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: a new fd we own.
    let mut f = unsafe { File::from_raw_fd(fd) };
    let written = (|| {
        // The umask narrowed the mode at creation: set exactly what was asked.
        // SAFETY: an fd we own.
        cvt(unsafe { libc::fchmod(f.as_raw_fd(), mode as libc::mode_t) })?;
        f.write_all(bytes)?;
        drop(f);
        // SAFETY: valid fds and C strings.
        cvt(unsafe {
            libc::renameat(
                dir.as_raw_fd(),
                ctemp.as_ptr(),
                dir.as_raw_fd(),
                cname.as_ptr(),
            )
        })
        .map(drop)
    })();
    if written.is_err() {
        // SAFETY: as above.
        unsafe { libc::unlinkat(dir.as_raw_fd(), ctemp.as_ptr(), 0) };
    }
    written
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("memprof-file-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn new_and_replaced_files_get_the_mode() {
        let d = dir("modes");
        let p = d.join("out.json");
        write(&p, b"one", PRIVATE).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        write(&p, b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // Nothing left behind.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn links_are_not_written_through() {
        let d = dir("links");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        // A hard link at the path: replaced, the other name keeps its bytes.
        let hard = d.join("hard.csv");
        std::fs::hard_link(&victim, &hard).unwrap();
        write(&hard, b"report", PRIVATE).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&hard).unwrap(), b"report");
        // Another user's symbolic link: refused, its target untouched.
        let link = d.join("out.html");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let l = CString::new(link.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::lchown(l.as_ptr(), 65534, 65534) }, 0);
        let e = write(&link, b"report", PRIVATE).unwrap_err();
        assert!(
            e.to_string().contains("symbolic link owned by uid 65534"),
            "{e}"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::symlink_metadata(&link).unwrap().uid(), 65534);
        // A device is written in place.
        write(Path::new("/dev/null"), b"gone", PRIVATE).unwrap();
        let e = write(&d, b"x", PRIVATE).unwrap_err();
        assert!(
            e.to_string().contains("directory") || e.kind() == io::ErrorKind::Other,
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
