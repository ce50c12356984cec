//! The traced process's address space as `/proc/PID/maps` shows it, and the normalization of
//! absolute addresses to (module, file offset) pairs.
//!
//! Stacks are normalized as soon as they are first seen, while the process is alive: a module
//! path and a file offset stay valid after the process exits, so symbolization can happen at any
//! later time.

use std::{
    borrow::Cow,
    collections::HashMap,
    fs, io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::{
        LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// Files of processes under another root (containers) memprof keeps open, at most.
const FOREIGN_FILES_MAX: usize = 4096;

/// Files of processes under another root, by (device, inode) as `stat` gives them (see
/// [`Mapping::file_id`]): the name each was first reached by (its path from memprof's root when
/// that names it, a chroot's file; else `/proc/PID/root/PATH`, with memprof's own descriptor of
/// it). Every later process mapping the same file gets the same name, so that stacks, modules
/// and symbolizers are kept once per file, not once per process (a node with containers starts
/// processes without end); and the name stays readable through the descriptor once that PID is
/// gone (see [`reachable`]).
#[derive(Default)]
struct Foreign {
    by_id: HashMap<(u64, u64), (String, Option<fs::File>)>,
    /// The descriptor behind each `/proc/PID/root/...` name.
    by_name: HashMap<String, i32>,
}

static FOREIGN: LazyLock<Mutex<Foreign>> = LazyLock::new(Default::default);

/// Files of processes under another root not kept because `FOREIGN_FILES_MAX` were.
static FOREIGN_OVER_CAP: AtomicU64 = AtomicU64::new(0);

/// Files of processes under another root kept open, and those left out over the cap.
pub fn foreign_files() -> (u64, u64) {
    let kept = FOREIGN.lock().map_or(0, |f| f.by_id.len());
    (kept as u64, FOREIGN_OVER_CAP.load(Ordering::Relaxed))
}

/// Where `path` opens: a name [`file_named`] gave a file of a process under another root opens
/// through memprof's descriptor of that file (the process may be gone); any other path as is.
pub fn reachable(path: &Path) -> Cow<'_, Path> {
    if !path.starts_with("/proc/") {
        return Cow::Borrowed(path);
    }
    let fd = FOREIGN
        .lock()
        .ok()
        .and_then(|f| f.by_name.get(path.to_str()?).copied());
    match fd {
        Some(fd) => Cow::Owned(PathBuf::from(format!("/proc/self/fd/{fd}"))),
        None => Cow::Borrowed(path),
    }
}

/// [`file_of`] for the view memprof keeps of a process: a file under another root gets the name
/// it was first reached by, the same for every process that maps it (see `Foreign`).
pub fn file_named(pid: u32, path: &str, dev: &str, inode: u64) -> String {
    let Some(id) = file_id(dev, inode) else {
        return file_of(pid, path, dev, inode);
    };
    let Ok(mut foreign) = FOREIGN.lock() else {
        return file_of(pid, path, dev, inode);
    };
    if let Some((name, _)) = foreign.by_id.get(&id) {
        return name.clone();
    }
    let name = file_of(pid, path, dev, inode);
    if foreign.by_id.len() >= FOREIGN_FILES_MAX {
        FOREIGN_OVER_CAP.fetch_add(1, Ordering::Relaxed);
        return name;
    }
    if !name.starts_with("/proc/") {
        // Reachable by that path for as long as it names the file.
        foreign.by_id.insert(id, (name.clone(), None));
    } else if let Some(file) = open_same(&name, id) {
        foreign.by_name.insert(name.clone(), file.as_raw_fd());
        foreign.by_id.insert(id, (name.clone(), Some(file)));
    }
    name
}

/// The name [`file_named`] gave file `dev`/`inode`, if it did: a process that is gone before
/// memprof could read its root still has its files named (the kernel's mapping records give
/// their paths as the process saw them, under its own root).
pub fn registered(dev: &str, inode: u64) -> Option<String> {
    let id = file_id(dev, inode)?;
    let foreign = FOREIGN.lock().ok()?;
    foreign.by_id.get(&id).map(|(name, _)| name.clone())
}

/// `path` opened for reading if it is the regular file `id` (device, inode).
fn open_same(path: &str, id: (u64, u64)) -> Option<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let m = file.metadata().ok()?;
    (m.is_file() && (m.dev(), m.ino()) == id).then_some(file)
}

/// (device, inode) of a mapped file from the `major:minor` (hex) and inode its maps line gives,
/// as `stat` gives them.
fn file_id(dev: &str, inode: u64) -> Option<(u64, u64)> {
    let (major, minor) = dev.split_once(':')?;
    let major = u32::from_str_radix(major, 16).ok()?;
    let minor = u32::from_str_radix(minor, 16).ok()?;
    Some((libc::makedev(major, minor), inode))
}

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
    /// Mapped executable.
    pub exec: bool,
}

impl Mapping {
    /// (device, inode) of the mapped file, as `stat` gives them (see `target::file_id`).
    pub fn file_id(&self) -> Option<(u64, u64)> {
        file_id(&self.dev, self.inode)
    }
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

    /// The same view with every path replaced by one memprof can open (see [`file_of`]): for a
    /// process under another root (a container), whose paths name files in its own root.
    pub fn resolved(mut self, pid: u32) -> Self {
        let mut cache: std::collections::HashMap<(String, u64), String> = Default::default();
        for m in &mut self.mappings {
            let key = (m.path.clone(), m.inode);
            let path = cache
                .entry(key)
                .or_insert_with(|| file_named(pid, &m.path, &m.dev, m.inode));
            m.path = path.clone();
        }
        self
    }

    /// Adds a mapping the kernel reported; it replaces whatever it overlaps.
    pub fn insert(&mut self, m: Mapping) {
        self.mappings
            .retain(|o| o.end <= m.start || o.start >= m.end);
        let at = self.mappings.partition_point(|o| o.start < m.start);
        self.mappings.insert(at, m);
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

/// A path memprof can open for the file process `pid` maps as `path` (device `dev` as the maps
/// file writes it, `major:minor` in hex; inode `inode`). The kernel writes map paths relative to
/// the reader's root when it can reach the file from there (a chroot under it) and relative to
/// the process's own root otherwise (a container's mount namespace). The path itself is
/// preferred when it names that very file: it outlives the process. Otherwise the file is
/// reached through `/proc/PID/root` while the process lives.
pub fn file_of(pid: u32, path: &str, dev: &str, inode: u64) -> String {
    let id = file_id(dev, inode);
    if fs::metadata(path).is_ok_and(|m| Some((m.dev(), m.ino())) == id) {
        return path.to_string();
    }
    format!("/proc/{pid}/root{path}")
}

/// The kernel writes a newline in a mapped file's name as `\012` (the one character it escapes):
/// the file is found under its real name, unless only the written one exists.
fn unescape_newlines(path: &str) -> String {
    if !path.contains("\\012") {
        return path.to_string();
    }
    let real = path.replace("\\012", "\n");
    if Path::new(path).exists() && !Path::new(&real).exists() {
        path.to_string()
    } else {
        real
    }
}

fn parse_line(line: &str) -> Option<Mapping> {
    // 7f..-7f.. r-xp 00028000 08:01 1234   /usr/lib/x86_64-linux-gnu/libc.so.6
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let dev = fields.next()?.to_string();
    let inode: u64 = fields.next()?.parse().ok()?;
    let path = fields.next().unwrap_or("").trim_start();
    if inode == 0 || !path.starts_with('/') {
        return None;
    }
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let path = unescape_newlines(path);
    let (start, end) = range.split_once('-')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset,
        dev,
        inode,
        path,
        exec: perms.as_bytes().get(2) == Some(&b'x'),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_in_paths_are_unescaped() {
        let space = AddressSpace::parse(
            "7f0000000000-7f0000001000 r-xp 00000000 08:01 77 /tmp/memprof-no-dir/a\\012b.so\n",
        );
        assert_eq!(space.mappings()[0].path, "/tmp/memprof-no-dir/a\nb.so");
        assert_eq!(unescape_newlines("/usr/lib/x"), "/usr/lib/x");
    }

    #[test]
    fn file_id_matches_stat() {
        use std::os::unix::fs::MetadataExt as _;
        let space = AddressSpace::read(std::process::id()).unwrap();
        let exe = fs::canonicalize("/proc/self/exe").unwrap();
        let m = space
            .mappings()
            .iter()
            .find(|m| std::path::Path::new(&m.path) == exe)
            .unwrap();
        let meta = fs::metadata(&exe).unwrap();
        assert_eq!(m.file_id(), Some((meta.dev(), meta.ino())));
    }

    #[test]
    fn inserted_mapping_replaces_overlaps() {
        let mut s = AddressSpace::parse(
            "1000-2000 r-xp 00000000 08:01 9 /bin/a\n3000-4000 r-xp 00000000 08:01 10 /lib/b.so\n",
        );
        let m = |start, end, path: &str| Mapping {
            start,
            end,
            offset: 0,
            dev: "08:01".into(),
            inode: 11,
            path: path.into(),
            exec: true,
        };
        s.insert(m(0x1800, 0x2800, "/lib/c.so"));
        s.insert(m(0x5000, 0x6000, "/lib/d.so"));
        let paths: Vec<&str> = s.mappings().iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths, ["/lib/c.so", "/lib/b.so", "/lib/d.so"]);
        assert_eq!(s.find(0x1900).unwrap().path, "/lib/c.so");
        assert!(s.find(0x1100).is_none());
    }

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
