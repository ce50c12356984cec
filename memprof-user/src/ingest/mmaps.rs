//! The kernel's own record of executable mappings (perf `MMAP2` records), so frames of a
//! process can be placed in their files even when it exits before memprof reads
//! `/proc/PID/maps`.
//!
//! A software "dummy" perf event with `mmap`/`mmap2` set makes the kernel write a record for
//! every executable mapping created on its CPU, synchronously, into a ring memprof reads at its
//! leisure: process, range, file offset, device, inode and path. One event per CPU sees every
//! thread of every process (executable mappings are rare); the agent keeps the records of the
//! processes it traces.

use std::{io, os::fd::RawFd, ptr, sync::atomic};

use anyhow::{Context as _, Result};

use crate::sys::maps::Mapping;

/// `perf_event_attr`, as far as this module sets it (size `PERF_ATTR_SIZE_VER8`).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
    aux_sample_size: u32,
    reserved_3: u32,
    sig_data: u64,
    config3: u64,
}

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_DUMMY: u64 = 9;
const FLAG_INHERIT: u64 = 1 << 1;
const FLAG_MMAP: u64 = 1 << 8;
const FLAG_MMAP2: u64 = 1 << 23;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
const PERF_RECORD_LOST: u32 = 2;
const PERF_RECORD_MMAP2: u32 = 10;
/// `misc` bit: the record carries a build id instead of device and inode.
const PERF_RECORD_MISC_MMAP_BUILD_ID: u16 = 1 << 14;
/// Data pages per ring (a power of two).
const RING_PAGES: usize = 64;

/// One executable mapping the kernel reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmapRecord {
    pub pid: u32,
    pub mapping: Mapping,
}

/// The control page at the start of a perf ring (`perf_event_mmap_page`): only the fields read.
const DATA_HEAD_OFFSET: usize = 1024;
const DATA_TAIL_OFFSET: usize = 1032;

struct Ring {
    fd: RawFd,
    base: *mut u8,
    len: usize,
    page: usize,
}

impl Ring {
    fn open(pid: i32, cpu: i32, inherit: bool) -> io::Result<Self> {
        let attr = PerfEventAttr {
            type_: PERF_TYPE_SOFTWARE,
            size: size_of::<PerfEventAttr>() as u32,
            config: PERF_COUNT_SW_DUMMY,
            flags: FLAG_MMAP | FLAG_MMAP2 | if inherit { FLAG_INHERIT } else { 0 },
            ..Default::default()
        };
        // SAFETY: plain syscall with a valid attribute struct.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                pid,
                cpu,
                -1,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = fd as RawFd;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = page * (1 + RING_PAGES);
        // SAFETY: maps the event's ring; checked below.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            // SAFETY: we own the fd.
            unsafe { libc::close(fd) };
            return Err(err);
        }
        Ok(Self {
            fd,
            base: base.cast(),
            len,
            page,
        })
    }

    /// Hands every record written since the last call to `f`; returns records the kernel lost.
    fn drain(&mut self, f: &mut impl FnMut(MmapRecord)) -> u64 {
        let size = self.len - self.page;
        // SAFETY: the control page is mapped; data_head is written by the kernel.
        let head = unsafe { ptr::read_volatile(self.base.add(DATA_HEAD_OFFSET).cast::<u64>()) };
        atomic::fence(atomic::Ordering::Acquire);
        // SAFETY: as above; data_tail is ours.
        let mut tail = unsafe { ptr::read_volatile(self.base.add(DATA_TAIL_OFFSET).cast::<u64>()) };
        let mut lost = 0;
        let mut record = Vec::new();
        while tail < head {
            let at = |off: u64| (off % size as u64) as usize;
            let mut header = [0u8; 8];
            self.copy_out(at(tail), &mut header, size);
            let kind = u32::from_ne_bytes(header[0..4].try_into().unwrap());
            let misc = u16::from_ne_bytes(header[4..6].try_into().unwrap());
            let len = u16::from_ne_bytes(header[6..8].try_into().unwrap()) as usize;
            if len < 8 {
                break;
            }
            record.resize(len, 0);
            self.copy_out(at(tail), &mut record, size);
            match kind {
                PERF_RECORD_MMAP2 => {
                    if let Some(r) = parse_mmap2(&record, misc) {
                        f(r);
                    }
                }
                PERF_RECORD_LOST if record.len() >= 24 => {
                    lost += u64::from_ne_bytes(record[16..24].try_into().unwrap());
                }
                _ => {}
            }
            tail += len as u64;
        }
        atomic::fence(atomic::Ordering::Release);
        // SAFETY: tells the kernel the space up to `tail` is free again.
        unsafe { ptr::write_volatile(self.base.add(DATA_TAIL_OFFSET).cast::<u64>(), tail) };
        lost
    }

    /// Copies `out.len()` bytes from data offset `from`, wrapping at the end of the ring.
    fn copy_out(&self, from: usize, out: &mut [u8], size: usize) {
        for (i, byte) in out.iter_mut().enumerate() {
            // SAFETY: within the data pages, which follow the control page.
            *byte = unsafe { *self.base.add(self.page + (from + i) % size) };
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps and closes what `open` created.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
            libc::close(self.fd);
        }
    }
}

/// `PERF_RECORD_MMAP2`: header, pid, tid, addr, len, pgoff, maj, min, ino, ino_generation, prot,
/// flags, filename.
pub(crate) fn parse_mmap2(r: &[u8], misc: u16) -> Option<MmapRecord> {
    let u32_at = |o: usize| Some(u32::from_ne_bytes(r.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_ne_bytes(r.get(o..o + 8)?.try_into().ok()?));
    let pid = u32_at(8)?;
    let addr = u64_at(16)?;
    let len = u64_at(24)?;
    let pgoff = u64_at(32)?;
    let (dev, inode) = if misc & PERF_RECORD_MISC_MMAP_BUILD_ID != 0 {
        (String::new(), 0)
    } else {
        (
            format!("{:02x}:{:02x}", u32_at(40)?, u32_at(44)?),
            u64_at(48)?,
        )
    };
    let name = r.get(72..)?;
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    let path = String::from_utf8_lossy(&name[..end]).into_owned();
    if !path.starts_with('/') {
        return None;
    }
    let path = path.strip_suffix(" (deleted)").unwrap_or(&path).to_string();
    Some(MmapRecord {
        pid,
        mapping: Mapping {
            start: addr,
            end: addr.checked_add(len)?,
            offset: pgoff,
            dev,
            inode,
            path,
            // The records are of executable mappings only.
            exec: true,
        },
    })
}

/// Watches the executable mappings of the traced processes.
pub struct MmapWatcher {
    rings: Vec<Ring>,
    /// Records the kernel dropped (a ring filled up between two drains).
    pub lost: u64,
}

impl MmapWatcher {
    /// Every process, one ring per online CPU.
    pub fn system() -> Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as i32;
        let mut rings = Vec::new();
        for cpu in 0..cpus {
            match Ring::open(-1, cpu, false) {
                Ok(r) => rings.push(r),
                // An offline CPU has nothing to report.
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => return Err(e).context("failed to watch mappings system-wide"),
            }
        }
        Ok(Self { rings, lost: 0 })
    }

    /// Hands every new record to `f`.
    pub fn drain(&mut self, mut f: impl FnMut(MmapRecord)) {
        for ring in &mut self.rings {
            self.lost += ring.drain(&mut f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_mmap2_record() {
        let mut r = vec![0u8; 72];
        r[0..4].copy_from_slice(&PERF_RECORD_MMAP2.to_ne_bytes());
        r[8..12].copy_from_slice(&42u32.to_ne_bytes());
        r[16..24].copy_from_slice(&0x7f00_0000u64.to_ne_bytes());
        r[24..32].copy_from_slice(&0x2000u64.to_ne_bytes());
        r[32..40].copy_from_slice(&0x1000u64.to_ne_bytes());
        r[40..44].copy_from_slice(&0xfeu32.to_ne_bytes());
        r[48..56].copy_from_slice(&99u64.to_ne_bytes());
        r.extend(b"/lib/libx.so\0\0\0\0");
        let m = parse_mmap2(&r, 0).unwrap();
        assert_eq!(m.pid, 42);
        assert_eq!(
            (m.mapping.start, m.mapping.end, m.mapping.offset),
            (0x7f00_0000, 0x7f00_2000, 0x1000)
        );
        assert_eq!((m.mapping.dev.as_str(), m.mapping.inode), ("fe:00", 99));
        assert_eq!(m.mapping.path, "/lib/libx.so");
    }

    /// The kernel reports a library this process maps executable.
    #[test]
    fn sees_own_executable_mapping() {
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let mut w = MmapWatcher::system().unwrap();
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        use std::os::fd::AsRawFd as _;
        // SAFETY: maps one page of our own executable, unmapped below.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let mut seen = Vec::new();
        w.drain(|r| seen.push(r));
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, 4096) };
        assert!(
            seen.iter()
                .any(|r| r.mapping.start == p as u64 && r.pid == std::process::id()),
            "{seen:?}"
        );
    }
}
