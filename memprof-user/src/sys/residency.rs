//! Which pages of a process are resident: its mappings with their `Rss` from `/proc/PID/smaps`,
//! and the present bits of `/proc/PID/pagemap` over chosen address ranges
//! (`analysis::rss` explains RSS from them).
//!
//! The process is not trusted: smaps is read up to [`MAX_SMAPS_BYTES`] (a process can make tens
//! of thousands of mappings), and pagemap in chunks of [`PAGEMAP_CHUNK`] entries, so what is
//! read is bounded by the caller's budget of address space.

use std::{
    fs::File,
    io::{self, Read},
    os::unix::fs::FileExt,
};

/// Most smaps text read (about 64 000 mappings at ~1 KiB each).
pub const MAX_SMAPS_BYTES: u64 = 64 << 20;
/// Pagemap entries read at a time (512 KiB).
pub const PAGEMAP_CHUNK: usize = 64 * 1024;

/// The page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// One mapping of the process, as smaps lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// Resident bytes (`Rss`).
    pub rss_bytes: u64,
    /// `[heap]`: the brk heap.
    pub brk_heap: bool,
    /// Anonymous: no file behind it (`[heap]`, `[stack]`, unnamed or `[anon:...]`).
    pub anonymous: bool,
}

/// Reads and parses `/proc/PID/smaps`; fails when it is larger than [`MAX_SMAPS_BYTES`].
pub fn read_smaps(pid: u32) -> io::Result<Vec<Region>> {
    let path = format!("/proc/{pid}/smaps");
    let mut text = String::new();
    File::open(&path)?
        .take(MAX_SMAPS_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_SMAPS_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: over {MAX_SMAPS_BYTES} bytes"),
        ));
    }
    if text.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{path}: empty (the process has exited)"),
        ));
    }
    Ok(parse_smaps(&text))
}

/// The mappings of an smaps text, sorted by start, each with its `Rss`.
pub fn parse_smaps(text: &str) -> Vec<Region> {
    let mut regions: Vec<Region> = Vec::new();
    for line in text.lines() {
        if let Some(region) = parse_header(line) {
            regions.push(region);
        } else if let Some(rest) = line.strip_prefix("Rss:")
            && let Some(last) = regions.last_mut()
            && let Some(kb) = rest.trim().strip_suffix("kB")
            && let Ok(kb) = kb.trim_end().parse::<u64>()
        {
            last.rss_bytes = kb.saturating_mul(1024);
        }
    }
    regions.sort_by_key(|r| r.start);
    regions
}

/// `start-end perms offset dev inode [path]`.
fn parse_header(line: &str) -> Option<Region> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    if perms.len() != 4 || end < start {
        return None;
    }
    let _offset = fields.next()?;
    let _dev = fields.next()?;
    let inode: u64 = fields.next()?.parse().ok()?;
    let path = fields.collect::<Vec<_>>().join(" ");
    let anonymous = inode == 0
        && (path.is_empty()
            || path == "[heap]"
            || path == "[stack]"
            || path.starts_with("[anon:")
            || path.starts_with("[stack:"));
    Some(Region {
        start,
        end,
        rss_bytes: 0,
        brk_heap: path == "[heap]",
        anonymous,
    })
}

/// Appends the resident runs of `[start, end)` (page aligned) of the process whose pagemap is
/// `pagemap` to `runs`.
pub fn resident_runs(
    pagemap: &File,
    start: u64,
    end: u64,
    page: u64,
    runs: &mut Vec<(u64, u64)>,
) -> io::Result<()> {
    let mut buf = vec![0u8; PAGEMAP_CHUNK * 8];
    let mut entries = Vec::with_capacity(PAGEMAP_CHUNK);
    let mut at = start;
    while at < end {
        let pages = ((end - at) / page).min(PAGEMAP_CHUNK as u64) as usize;
        if pages == 0 {
            break;
        }
        let bytes = &mut buf[..pages * 8];
        pagemap.read_exact_at(bytes, at / page * 8)?;
        entries.clear();
        entries.extend(
            bytes
                .as_chunks::<8>()
                .0
                .iter()
                .map(|c| u64::from_ne_bytes(*c)),
        );
        add_runs(runs, at, page, &entries);
        at += pages as u64 * page;
    }
    Ok(())
}

/// Opens `/proc/PID/pagemap`.
pub fn open_pagemap(pid: u32) -> io::Result<File> {
    File::open(format!("/proc/{pid}/pagemap"))
}

/// Resident runs from pagemap entries: `entries[k]` describes the page at `first + k * page`;
/// bit 63 set means present in RAM. Runs are appended to `runs`, merged with its last run when
/// they touch.
pub fn add_runs(runs: &mut Vec<(u64, u64)>, first: u64, page: u64, entries: &[u64]) {
    for (k, entry) in entries.iter().enumerate() {
        if entry >> 63 == 0 {
            continue;
        }
        let s = first + k as u64 * page;
        match runs.last_mut() {
            Some(last) if last.1 == s => last.1 = s + page,
            _ => runs.push((s, s + page)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:01 1311028                    /usr/bin/cat
Size:                  8 kB
Rss:                   8 kB
Pss:                   8 kB
55d0c1e3a000-55d0c1e5b000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  12 kB
Pss_Dirty:            12 kB
7f1b2c000000-7f1b2c021000 rw-p 00000000 00:00 0 
Size:                132 kB
Rss:                   4 kB
7f1b2c021000-7f1b30000000 ---p 00000000 00:00 0 
Size:              65404 kB
Rss:                   0 kB
7f1b34000000-7f1b34001000 rw-s 00000000 00:01 2048                       /memfd:x (deleted)
Rss:                   4 kB
7ffc8e9d0000-7ffc8e9f1000 rw-p 00000000 00:00 0                          [stack]
Rss:                  16 kB
VmFlags: rd wr mr mw me gd ac
";

    #[test]
    fn runs_from_pagemap_entries() {
        let mut runs = Vec::new();
        let present = 1u64 << 63;
        let swapped = 1u64 << 62;
        add_runs(
            &mut runs,
            0x1000,
            4096,
            &[present, present, 0, swapped, present],
        );
        assert_eq!(runs, vec![(0x1000, 0x3000), (0x5000, 0x6000)]);
        // The next chunk continues the last run.
        add_runs(&mut runs, 0x6000, 4096, &[present | 0x1234, 0]);
        assert_eq!(runs, vec![(0x1000, 0x3000), (0x5000, 0x7000)]);
    }

    #[test]
    fn parses_regions_with_rss() {
        let r = parse_smaps(SMAPS);
        assert_eq!(r.len(), 6);
        assert_eq!(
            r[0],
            Region {
                start: 0x55d0c0a00000,
                end: 0x55d0c0a02000,
                rss_bytes: 8192,
                brk_heap: false,
                anonymous: false
            }
        );
        assert!(r[1].brk_heap && r[1].anonymous);
        assert_eq!(r[1].rss_bytes, 12 * 1024, "Rss, not Pss_Dirty");
        assert!(!r[2].brk_heap && r[2].anonymous, "unnamed anonymous");
        assert_eq!(r[3].rss_bytes, 0);
        assert!(!r[4].anonymous, "memfd has an inode");
        assert!(r[5].anonymous && !r[5].brk_heap);
        assert_eq!(r.iter().map(|r| r.rss_bytes).sum::<u64>(), 44 * 1024);
    }

    #[test]
    fn own_pages_written_are_resident() {
        let page = page_size();
        let len = 64 * page as usize;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let start = p as u64;
        // SAFETY: inside the mapping; no huge pages, so each page faults alone.
        unsafe {
            libc::madvise(p, len, libc::MADV_NOHUGEPAGE);
            for k in [0u64, 1, 2, 10, 63] {
                *((start + k * page) as *mut u8) = 1;
            }
        }
        let pagemap = open_pagemap(std::process::id()).expect("own pagemap");
        let mut runs = Vec::new();
        resident_runs(&pagemap, start, start + 64 * page, page, &mut runs).expect("read");
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len) };
        assert_eq!(
            runs,
            vec![
                (start, start + 3 * page),
                (start + 10 * page, start + 11 * page),
                (start + 63 * page, start + 64 * page)
            ]
        );
    }
}
