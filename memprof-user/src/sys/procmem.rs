//! Process memory as the kernel accounts it (RSS, PSS, VmSize, peak RSS), read from
//! `/proc/PID/status` and `/proc/PID/smaps_rollup` (`analysis::memory` sets them beside the
//! traced bytes).

use std::{fs, io};

use serde::Serialize;

/// Memory of a process as the kernel accounts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProcMem {
    /// Resident set size (`VmRSS`).
    pub rss_bytes: u64,
    /// Proportional set size (`Pss` of `/proc/PID/smaps_rollup`): shared pages divided among
    /// the processes sharing them. `None` when smaps_rollup could not be read.
    pub pss_bytes: Option<u64>,
    /// Virtual address space size (`VmSize`).
    pub vm_size_bytes: u64,
    /// Peak resident set size over the process's life (`VmHWM`).
    pub vm_hwm_bytes: u64,
}

impl ProcMem {
    /// Reads `/proc/PID/status` and, best effort, `/proc/PID/smaps_rollup` (it needs ptrace
    /// access to the process and exists since Linux 4.14).
    ///
    /// Fails when the status file cannot be read or has no memory lines (kernel threads and
    /// zombies have none).
    pub fn read(pid: u32) -> io::Result<Self> {
        let status_path = format!("/proc/{pid}/status");
        let status = fs::read_to_string(&status_path)?;
        let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok();
        Self::parse(&status, rollup.as_deref()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{status_path}: no VmRSS/VmSize/VmHWM lines (kernel thread or zombie?)"),
            )
        })
    }

    /// Parses the text of a status file and, if given, of an smaps_rollup file. Values are
    /// in kB there and in bytes here. `None` when the status text lacks `VmRSS`, `VmSize` or
    /// `VmHWM`; a rollup without a `Pss` line gives `pss_bytes: None`.
    pub fn parse(status: &str, smaps_rollup: Option<&str>) -> Option<Self> {
        Some(Self {
            rss_bytes: kb_field(status, "VmRSS")?,
            pss_bytes: smaps_rollup.and_then(|text| kb_field(text, "Pss")),
            vm_size_bytes: kb_field(status, "VmSize")?,
            vm_hwm_bytes: kb_field(status, "VmHWM")?,
        })
    }
}

/// The value of a `Key:   123 kB` line, in bytes. The key must match exactly (`Pss` is not
/// `Pss_Anon`).
fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, value) = line.split_once(':')?;
        if k != key {
            return None;
        }
        let kb: u64 = value.trim().strip_suffix("kB")?.trim_end().parse().ok()?;
        Some(kb.saturating_mul(1024))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/PID/status` of a Python process on Linux 6.1 (x86_64), trimmed after the memory
    /// lines.
    const STATUS: &str = "\
Name:\tpython3
Umask:\t0022
State:\tS (sleeping)
Tgid:\t4711
Ngid:\t0
Pid:\t4711
PPid:\t4700
TracerPid:\t0
Uid:\t1000\t1000\t1000\t1000
Gid:\t1000\t1000\t1000\t1000
FDSize:\t64
Groups:\t24 27 1000
NStgid:\t4711
NSpid:\t4711
NSpgid:\t4711
NSsid:\t4700
VmPeak:\t   52380 kB
VmSize:\t   48264 kB
VmLck:\t       0 kB
VmPin:\t       0 kB
VmHWM:\t   21032 kB
VmRSS:\t   19876 kB
RssAnon:\t    9120 kB
RssFile:\t   10756 kB
RssShmem:\t       0 kB
VmData:\t   12340 kB
VmStk:\t     132 kB
VmExe:\t    2860 kB
VmLib:\t    6580 kB
VmPTE:\t     120 kB
VmSwap:\t       0 kB
HugetlbPages:\t       0 kB
CoreDumping:\t0
THP_enabled:\t1
Threads:\t1
SigQ:\t0/31318
";

    /// `/proc/PID/smaps_rollup` of the same process.
    const ROLLUP: &str = "\
55a4c2e00000-7ffd3b5ff000 ---p 00000000 00:00 0                          [rollup]
Rss:               19876 kB
Pss:               12403 kB
Pss_Dirty:          9300 kB
Pss_Anon:           9120 kB
Pss_File:           3283 kB
Pss_Shmem:             0 kB
Shared_Clean:       9208 kB
Shared_Dirty:          0 kB
Private_Clean:      1368 kB
Private_Dirty:      9300 kB
Referenced:        19876 kB
Anonymous:          9120 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
";

    #[test]
    fn parses_status_and_rollup_in_bytes() {
        let m = ProcMem::parse(STATUS, Some(ROLLUP)).expect("status has memory lines");
        assert_eq!(
            m,
            ProcMem {
                rss_bytes: 19876 * 1024,
                pss_bytes: Some(12403 * 1024),
                vm_size_bytes: 48264 * 1024,
                vm_hwm_bytes: 21032 * 1024,
            },
            "VmRSS 19876 kB, Pss 12403 kB (not Pss_Dirty 9300), VmSize 48264 kB, VmHWM 21032 kB"
        );
    }

    #[test]
    fn pss_is_none_without_rollup() {
        let m = ProcMem::parse(STATUS, None).expect("status has memory lines");
        assert_eq!(m.pss_bytes, None, "no smaps_rollup text given");
        assert_eq!(m.rss_bytes, 19876 * 1024);
        let no_pss = ProcMem::parse(STATUS, Some("Rss: 19876 kB\nPss_Anon: 9120 kB\n"))
            .expect("status has memory lines");
        assert_eq!(no_pss.pss_bytes, None, "Pss_Anon is not Pss");
    }

    #[test]
    fn kernel_thread_status_has_no_memory() {
        // A kernel thread's status (kthreadd) has no Vm* lines.
        let kthread = "Name:\tkthreadd\nState:\tS (sleeping)\nTgid:\t2\nPid:\t2\nPPid:\t0\n\
                       Kthread:\t1\nThreads:\t1\n";
        assert_eq!(ProcMem::parse(kthread, Some(ROLLUP)), None);
        assert_eq!(ProcMem::parse("", None), None);
        let no_hwm = "VmSize:\t 100 kB\nVmRSS:\t 50 kB\n";
        assert_eq!(ProcMem::parse(no_hwm, None), None, "VmHWM is missing");
    }

    #[test]
    fn rejects_values_without_kb_unit() {
        let odd = "VmSize:\t100 MB\nVmRSS:\t50 kB\nVmHWM:\t60 kB\n";
        assert_eq!(ProcMem::parse(odd, None), None, "VmSize is not in kB");
    }

    #[test]
    fn reads_own_process() {
        let m = ProcMem::read(std::process::id()).expect("own /proc/self/status is readable");
        assert!(m.rss_bytes > 0, "{m:?}");
        assert!(m.vm_size_bytes >= m.rss_bytes, "{m:?}");
        assert!(
            m.vm_hwm_bytes >= m.rss_bytes,
            "peak RSS is at least RSS: {m:?}"
        );
        assert_eq!(m.rss_bytes % 1024, 0, "kB × 1024: {m:?}");
    }

    #[test]
    fn read_fails_for_missing_pid() {
        // Pids stop at 2^22 (PID_MAX_LIMIT) on 64-bit Linux.
        let err = ProcMem::read(u32::MAX).expect_err("no such process");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
