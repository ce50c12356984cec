//! Reading a process's memory (`/proc/PID/mem`), bounded and with errors that say what was
//! read.

use std::{fs, io, os::unix::fs::FileExt};

use super::{PythonError, Result};

/// Reads another process's memory: `process_vm_readv`, or `/proc/PID/mem` where that is
/// refused.
pub struct Mem {
    pid: u32,
}

impl Mem {
    pub fn new(pid: u32) -> Self {
        Self { pid }
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` describes `buf`, which is writable for its length; the remote iovec
        // is only read by the kernel, in the other process.
        let n =
            unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n == buf.len() as isize {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        let result = match err.raw_os_error() {
            Some(libc::EPERM | libc::ENOSYS) => fs::File::open(format!("/proc/{}/mem", self.pid))
                .and_then(|f| f.read_exact_at(buf, addr)),
            _ if n >= 0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read")),
            _ => Err(err),
        };
        result.map_err(|source| PythonError::Io {
            pid: self.pid,
            what: format!("{} bytes at {addr:#x}", buf.len()),
            source,
        })
    }

    pub fn u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn u32(&self, addr: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn u8(&self, addr: u64) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read(addr, &mut b)?;
        Ok(b[0])
    }

    pub fn bytes(&self, addr: u64, len: u64) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len as usize];
        self.read(addr, &mut v)?;
        Ok(v)
    }
}
