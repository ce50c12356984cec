//! The traced process's address space as `/proc/PID/maps` shows it, and the normalization of
//! absolute addresses to (module, file offset) pairs.
//!
//! Stacks are normalized as soon as they are first seen, while the process is alive: a module
//! path and a file offset stay valid after the process exits, so symbolization can happen at any
//! later time.

use std::{fs, io, path::Path};

/// One file-backed mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    pub dev: String,
    pub inode: u64,
    pub path: String,
}

/// A view of the file-backed mappings of one process, sorted by start address.
#[derive(Clone, Debug, Default)]
pub struct AddressSpace {
    mappings: Vec<Mapping>,
}

impl AddressSpace {
    /// Reads `/proc/PID/maps`. A process that has exited but not been reaped (a zombie) has an
    /// empty maps file: that is an error (`NotFound`), so callers keep the view they had instead
    /// of replacing it with nothing (which left every stack learned afterwards unnamed when
    /// the agent lagged behind a short-lived process).
    pub fn read(pid: u32) -> io::Result<Self> {
        let text = fs::read_to_string(format!("/proc/{pid}/maps"))?;
        if text.trim().is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {pid} has no mappings (it has exited)"),
            ));
        }
        Ok(Self::parse(&text))
    }

    /// Parses the text of a maps file, keeping file-backed mappings only.
    pub fn parse(text: &str) -> Self {
        let mut mappings: Vec<Mapping> = text.lines().filter_map(parse_line).collect();
        mappings.sort_by_key(|m| m.start);
        Self { mappings }
    }

    /// The mapping containing `addr`, if file-backed.
    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(i.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }

    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// The first mapped file whose name looks like `name` (`libc.so.6` also matches glibc's older
    /// `libc-2.31.so`).
    pub fn find_library(&self, name: &str) -> Option<&Mapping> {
        self.mappings.iter().find(|m| {
            let base = Path::new(&m.path)
                .file_name()
                .and_then(|b| b.to_str())
                .unwrap_or("");
            base == name
                || (name == "libc.so.6" && base.starts_with("libc-") && base.ends_with(".so"))
        })
    }
}

fn parse_line(line: &str) -> Option<Mapping> {
    // 7f..-7f.. r-xp 00028000 08:01 1234   /usr/lib/x86_64-linux-gnu/libc.so.6
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let _perms = fields.next()?;
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let dev = fields.next()?.to_string();
    let inode: u64 = fields.next()?.parse().ok()?;
    let path = fields.next().unwrap_or("").trim_start();
    if inode == 0 || !path.starts_with('/') {
        return None;
    }
    let path = path.strip_suffix(" (deleted)").unwrap_or(path).to_string();
    let (start, end) = range.split_once('-')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset,
        dev,
        inode,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exited_process_has_no_address_space() {
        assert!(
            !AddressSpace::read(std::process::id())
                .unwrap()
                .mappings()
                .is_empty()
        );
        let mut child = std::process::Command::new("true").spawn().unwrap();
        // Not reaped yet: a zombie, whose maps file is empty.
        let stat = format!("/proc/{}/stat", child.id());
        while !fs::read_to_string(&stat).is_ok_and(|s| s.contains(") Z ")) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let err = AddressSpace::read(child.id()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        child.wait().unwrap();
    }

    const MAPS: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 131 /tmp/fixture
55d0c0a01000-55d0c0a02000 r-xp 00001000 08:01 131 /tmp/fixture
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000028000 r--p 00000000 08:01 77 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000028000-7f000019d000 r-xp 00028000 08:01 77 /usr/lib/x86_64-linux-gnu/libc.so.6
7f00001a0000-7f00001a1000 r-xp 00000000 08:01 78 /tmp/gone.so (deleted)
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn parses_file_mappings_only() {
        let space = AddressSpace::parse(MAPS);
        assert_eq!(space.mappings().len(), 5);
        assert_eq!(space.mappings()[4].path, "/tmp/gone.so");
    }

    #[test]
    fn finds_containing_mapping() {
        let space = AddressSpace::parse(MAPS);
        let m = space.find(0x7f0000030000).expect("in libc text");
        assert_eq!((m.start, m.offset, m.inode), (0x7f0000028000, 0x28000, 77));
        assert!(space.find(0x55d0c1000010).is_none(), "heap is anonymous");
        assert!(space.find(0x1000).is_none());
        assert!(space.find(0x7f000019d000).is_none(), "end is exclusive");
    }

    #[test]
    fn finds_libc_by_name() {
        let space = AddressSpace::parse(MAPS);
        assert_eq!(
            space.find_library("libc.so.6").map(|m| m.path.as_str()),
            Some("/usr/lib/x86_64-linux-gnu/libc.so.6")
        );
        let old = AddressSpace::parse("7f00-7f10 r-xp 0 08:01 5 /lib/libc-2.31.so\n");
        assert!(old.find_library("libc.so.6").is_some());
        assert!(
            AddressSpace::parse(MAPS)
                .find_library("libm.so.6")
                .is_none()
        );
    }
}
