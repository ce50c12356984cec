//! Where the names of an object's code come from besides the object itself (whose `.symtab`,
//! `.dynsym` and DWARF blazesym reads): a separate debug file, and MiniDebugInfo.
//!
//! - **Debug files** are looked for by build id (`DIR/.build-id/xx/rest.debug`), then by the
//!   object's `.gnu_debuglink` name (next to the object, in its `.debug` folder, under `DIR`
//!   followed by the object's folder, and in `DIR`), where `DIR` is each debug directory in
//!   turn: those given with `--debug-dir`, then `/usr/lib/debug` of the process's root (a
//!   container's, reached through `/proc/PID/root`), then memprof's own `/usr/lib/debug`. A
//!   candidate counts only if it is an ELF file other than the object with symbols or DWARF,
//!   and if its build id equals the object's (or, for an object without one, if its CRC-32
//!   equals the debug link's).
//! - **MiniDebugInfo** (`.gnu_debugdata`, as Fedora and others ship): an xz-compressed ELF
//!   holding the function symbols `.dynsym` lacks. It is decoded here, with the object's
//!   `.dynsym`, into a [`SymbolTable`].
//!
//! Every file read here belongs to the traced program or its container, so it is untrusted:
//! sizes are checked before reading, decompression is bounded in input, dictionary and output,
//! and a file that does not parse is simply not used. [`open`] is where this module opens a file;
//! objects and debug file candidates are parsed through [`ObjectFile`] (bounded reads, never the
//! whole file).

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use object::{
    Endianness, Object as _, ObjectSection as _, SectionKind, SymbolKind,
    elf::PT_LOAD,
    read::elf::{ElfFile64, ProgramHeader as _},
};

use crate::sys::objfile::{MAX_OBJECT_BYTES, ObjectFile};

/// The system's debug directory (inside each root).
pub const SYSTEM_DEBUG_DIR: &str = "/usr/lib/debug";

/// Largest `.gnu_debugdata` section decompressed.
const MAX_COMPRESSED: u64 = 16 << 20;
/// Largest MiniDebugInfo ELF (decompressed), and largest xz dictionary allocated for it.
const MAX_DECOMPRESSED: usize = 64 << 20;
const MAX_DICTIONARY: usize = 64 << 20;
/// Largest debug file whose CRC-32 is computed (debug links of objects without a build id).
const MAX_CRC_FILE: u64 = 4 << 30;

/// What memprof learned of one object file for naming its code.
#[derive(Debug, Default)]
pub struct ObjectInfo {
    /// The GNU build id, as lowercase hex.
    pub build_id: Option<String>,
    /// `PT_LOAD` segments as (file offset, virtual address, bytes in the file).
    segments: Vec<(u64, u64, u64)>,
    /// A separate debug file for the object (see the module doc).
    pub debug_file: Option<PathBuf>,
    /// The debug file, kept open when it lies under a process's root (which goes away with
    /// the process).
    debug_open: Option<File>,
    /// The object's symbols are in `.gnu_debugdata` only (no `.symtab`): blazesym cannot read
    /// it (it fails on the compressed section), [`ObjectInfo::mini`] names its code instead.
    pub symbols_compressed: bool,
    /// Function symbols of MiniDebugInfo and `.dynsym`, when the object has `.gnu_debugdata`.
    pub mini: Option<SymbolTable>,
}

impl ObjectInfo {
    /// Reads the object at `path`, known to stacks as `logical` (a path, or a path under
    /// `/proc/PID/root` for a process under another root), and looks for its debug file in
    /// `debug_dirs` (see the module doc; the system directories are added).
    pub fn inspect(path: &Path, logical: &str, debug_dirs: &[PathBuf]) -> ObjectInfo {
        let Some(file) = open(path) else {
            return ObjectInfo::default();
        };
        let Ok(data) = ObjectFile::from_file(file, path.display().to_string(), MAX_OBJECT_BYTES)
        else {
            return ObjectInfo::default();
        };
        let Ok(elf) = ElfFile64::<Endianness, _>::parse(&data) else {
            return ObjectInfo::default();
        };
        let endian = elf.endian();
        let segments = elf
            .elf_program_headers()
            .iter()
            .filter(|ph| ph.p_type(endian) == PT_LOAD)
            .map(|ph| (ph.p_offset(endian), ph.p_vaddr(endian), ph.p_filesz(endian)))
            .collect();
        let build_id = elf.build_id().ok().flatten().map(<[u8]>::to_vec);
        let link = elf
            .gnu_debuglink()
            .ok()
            .flatten()
            .map(|(name, crc)| (name.to_vec(), crc));
        let has_symtab = elf
            .section_by_name(".symtab")
            .is_some_and(|s| s.size() > 0 && s.kind() != SectionKind::UninitializedData);
        let debugdata = elf.section_by_name(".gnu_debugdata");
        let symbols_compressed = debugdata.is_some() && !has_symtab;
        let mini = debugdata
            .filter(|s| s.size() <= MAX_COMPRESSED)
            .and_then(|s| s.data().ok())
            .and_then(|xz| unxz(xz, MAX_DECOMPRESSED))
            .map(|data| {
                let mut table = SymbolTable::default();
                if let Ok(inner) = object::File::parse(&*data) {
                    table.add(inner.symbols());
                }
                table.add(elf.dynamic_symbols());
                table.finish()
            });
        let debug_file = find_debug_file(
            path,
            logical,
            build_id.as_deref(),
            link.as_ref().map(|(n, c)| (n.as_slice(), *c)),
            debug_dirs,
        );
        let debug_open = debug_file
            .as_deref()
            .filter(|_| !split_root(logical).0.is_empty())
            .and_then(open);
        ObjectInfo {
            build_id: build_id.as_deref().map(hex),
            segments,
            debug_file,
            debug_open,
            symbols_compressed,
            mini,
        }
    }

    /// Where to read the debug file (its open file, when it was kept open).
    pub fn debug_path(&self) -> Option<PathBuf> {
        match &self.debug_open {
            Some(file) => Some(fd_path(file)),
            None => self.debug_file.clone(),
        }
    }

    /// The debug file's path as warnings show it.
    pub fn debug_file_shown(&self) -> String {
        self.debug_file
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    /// The virtual address (as in the object's symbols) of file offset `offset`.
    pub fn vaddr(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|(off, _, size)| (*off..off + size).contains(&offset))
            .map(|(off, vaddr, _)| vaddr + (offset - off))
    }
}

/// Opens a file this module reads (an object or a debug file candidate): a regular file, or
/// None. Without blocking: a FIFO put in a file's place is refused, not waited on.
pub fn open(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    file.metadata().ok()?.is_file().then_some(file)
}

/// A path that opens `file` as long as it is open.
pub fn fd_path(file: &File) -> PathBuf {
    use std::os::fd::AsRawFd as _;
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Bytes as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `/proc/PID/root` and the rest, for a path under a process's root; `""` and the path
/// otherwise.
pub fn split_root(path: &str) -> (&str, &str) {
    if let Some(rest) = path.strip_prefix("/proc/")
        && let Some((pid, _)) = rest.split_once('/')
        && !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && let Some(inner) = rest[pid.len()..].strip_prefix("/root")
        && inner.starts_with('/')
    {
        return path.split_at(path.len() - inner.len());
    }
    ("", path)
}

/// The debug directories searched for an object at `logical`, in order.
pub fn debug_dirs(logical: &str, extra: &[PathBuf]) -> Vec<PathBuf> {
    let (root, _) = split_root(logical);
    let mut dirs = extra.to_vec();
    for dir in [format!("{root}{SYSTEM_DEBUG_DIR}"), SYSTEM_DEBUG_DIR.into()] {
        let dir = PathBuf::from(dir);
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

/// Where a debug file for the object at `logical` may be, in the order they are tried.
pub fn candidates(
    logical: &str,
    build_id: Option<&[u8]>,
    link: Option<&[u8]>,
    extra: &[PathBuf],
) -> Vec<PathBuf> {
    let dirs = debug_dirs(logical, extra);
    let mut out = Vec::new();
    if let Some(id) = build_id.filter(|id| id.len() >= 2) {
        let rest = format!("{}.debug", hex(&id[1..]));
        for dir in &dirs {
            out.push(dir.join(".build-id").join(hex(&id[..1])).join(&rest));
        }
    }
    // A debug link names a file, never a path.
    let name = link
        .filter(|n| !n.is_empty() && !n.contains(&b'/') && *n != b"." && *n != b"..")
        .and_then(|n| std::str::from_utf8(n).ok());
    if let Some(name) = name {
        let (_, inner) = split_root(logical);
        let dir = Path::new(logical).parent().unwrap_or(Path::new("/"));
        let inner_dir = Path::new(inner)
            .parent()
            .and_then(|d| d.strip_prefix("/").ok())
            .unwrap_or(Path::new(""));
        out.push(dir.join(name));
        out.push(dir.join(".debug").join(name));
        for d in &dirs {
            out.push(d.join(inner_dir).join(name));
            out.push(d.join(name));
        }
    }
    out.dedup();
    out
}

/// The first candidate that is a debug file of the object (see the module doc).
fn find_debug_file(
    object: &Path,
    logical: &str,
    build_id: Option<&[u8]>,
    link: Option<(&[u8], u32)>,
    extra: &[PathBuf],
) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let id_of = |m: std::fs::Metadata| (m.dev(), m.ino());
    let itself = std::fs::metadata(object).ok().map(id_of);
    candidates(logical, build_id, link.map(|(n, _)| n), extra)
        .into_iter()
        .find(|path| {
            let Some(file) = open(path) else {
                return false;
            };
            if file.metadata().ok().map(id_of) == itself {
                return false;
            }
            is_debug_file_of(file, build_id, link.map(|(_, crc)| crc))
        })
}

/// Whether `file` is an ELF file with symbols or DWARF whose build id is `build_id` (or, with
/// no build id to compare, whose CRC-32 is `crc`).
fn is_debug_file_of(file: File, build_id: Option<&[u8]>, crc: Option<u32>) -> bool {
    let Ok(data) = ObjectFile::from_file(file, String::new(), MAX_OBJECT_BYTES) else {
        return false;
    };
    let size = data.len();
    let matches = {
        let Ok(elf) = object::File::parse(&data) else {
            return false;
        };
        let useful = [".debug_info", ".symtab"].iter().any(|name| {
            elf.section_by_name(name)
                .is_some_and(|s| s.size() > 0 && s.kind() != SectionKind::UninitializedData)
        });
        if !useful {
            return false;
        }
        match (build_id, crc) {
            (Some(id), _) => elf.build_id().ok().flatten() == Some(id),
            (None, Some(_)) => true,
            (None, None) => false,
        }
    };
    match (build_id, crc) {
        (None, Some(crc)) => size <= MAX_CRC_FILE && crc32(data.raw()) == Some(crc),
        _ => matches,
    }
}

/// The CRC-32 of a whole file (the checksum of `.gnu_debuglink`).
fn crc32(file: &File) -> Option<u32> {
    use std::os::unix::fs::FileExt as _;
    let mut crc = flate2::Crc::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut at = 0u64;
    loop {
        match file.read_at(&mut buf, at) {
            Ok(0) => return Some(crc.sum()),
            Ok(n) => {
                crc.update(&buf[..n]);
                at += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// Decompresses xz data into at most `cap` bytes; None when it is not xz, is corrupt or
/// truncated, or would exceed `cap` (or need a larger dictionary than `MAX_DICTIONARY`).
pub fn unxz(data: &[u8], cap: usize) -> Option<Vec<u8>> {
    use xz4rust::{XzDecoder, XzNextBlockResult};
    let mut decoder = XzDecoder::in_heap_with_alloc_dict_size(4096, MAX_DICTIONARY);
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut input = data;
    loop {
        let result = decoder.decode(input, &mut chunk).ok()?;
        let produced = result.output_produced();
        if out.len() + produced > cap {
            return None;
        }
        out.extend_from_slice(&chunk[..produced]);
        input = input.get(result.input_consumed()..)?;
        match result {
            XzNextBlockResult::EndOfStream(..) => return Some(out),
            XzNextBlockResult::NeedMoreData(..) if !result.made_progress() => return None,
            XzNextBlockResult::NeedMoreData(..) => {}
        }
    }
}

/// Function symbols by address, for objects blazesym cannot name (MiniDebugInfo).
#[derive(Debug, Default)]
pub struct SymbolTable {
    /// (start, end, demangled name), sorted by start.
    symbols: Vec<(u64, u64, Box<str>)>,
}

impl SymbolTable {
    /// Adds the defined, sized function symbols of `symbols`.
    fn add<'data, S: object::ObjectSymbol<'data>>(&mut self, symbols: impl Iterator<Item = S>) {
        for sym in symbols {
            if sym.kind() == SymbolKind::Text
                && sym.is_definition()
                && sym.size() > 0
                && let Ok(name) = sym.name()
                && !name.is_empty()
            {
                let end = sym.address().saturating_add(sym.size());
                self.symbols
                    .push((sym.address(), end, demangle(name).into_boxed_str()));
            }
        }
    }

    fn finish(mut self) -> Self {
        self.symbols.sort_unstable();
        self.symbols.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        self
    }

    /// The function holding virtual address `vaddr`.
    pub fn name(&self, vaddr: u64) -> Option<&str> {
        let after = self
            .symbols
            .partition_point(|(start, _, _)| *start <= vaddr);
        // The closest symbol starting at or before `vaddr` that covers it (a few back, for
        // symbols nested in larger ones).
        self.symbols[..after]
            .iter()
            .rev()
            .take(8)
            .find(|(_, end, _)| vaddr < *end)
            .map(|(_, _, name)| &**name)
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }
}

/// A symbol's name as blazesym shows it: Rust and C++ names demangled, others as they are.
pub fn demangle(name: &str) -> String {
    if let Ok(d) = rustc_demangle::try_demangle(name) {
        return format!("{d:#}");
    }
    if name.starts_with("_Z")
        && let Ok(sym) = cpp_demangle::Symbol::new(name)
        && let Ok(d) = sym.demangle()
    {
        return d;
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_split_off() {
        assert_eq!(
            split_root("/proc/42/root/usr/lib/libc.so.6"),
            ("/proc/42/root", "/usr/lib/libc.so.6")
        );
        assert_eq!(split_root("/usr/bin/x"), ("", "/usr/bin/x"));
        assert_eq!(split_root("/proc/self/root/x"), ("", "/proc/self/root/x"));
        assert_eq!(split_root("/proc/42/rootx/y"), ("", "/proc/42/rootx/y"));
    }

    #[test]
    fn candidates_by_build_id_then_debug_link() {
        let got = candidates(
            "/proc/7/root/usr/bin/app",
            Some(&[0xab, 0xcd, 0xef]),
            Some(b"app.debug"),
            &[PathBuf::from("/dbg")],
        );
        let got: Vec<&str> = got.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            got,
            [
                "/dbg/.build-id/ab/cdef.debug",
                "/proc/7/root/usr/lib/debug/.build-id/ab/cdef.debug",
                "/usr/lib/debug/.build-id/ab/cdef.debug",
                "/proc/7/root/usr/bin/app.debug",
                "/proc/7/root/usr/bin/.debug/app.debug",
                "/dbg/usr/bin/app.debug",
                "/dbg/app.debug",
                "/proc/7/root/usr/lib/debug/usr/bin/app.debug",
                "/proc/7/root/usr/lib/debug/app.debug",
                "/usr/lib/debug/usr/bin/app.debug",
                "/usr/lib/debug/app.debug",
            ]
        );
        // A debug link is a file name: anything else is ignored.
        for bad in [&b"../../etc/passwd"[..], b"", b".."] {
            assert!(candidates("/usr/bin/app", None, Some(bad), &[]).is_empty());
        }
    }

    #[test]
    fn symbol_table_lookups() {
        let table = SymbolTable {
            symbols: vec![
                (0x100, 0x200, "outer".into()),
                (0x120, 0x130, "nested".into()),
                (0x300, 0x310, "_ZN3foo3barEv".into()),
            ],
        }
        .finish();
        assert_eq!(table.name(0x100), Some("outer"));
        assert_eq!(table.name(0x125), Some("nested"));
        assert_eq!(table.name(0x140), Some("outer"), "past the nested symbol");
        assert_eq!(table.name(0x200), None, "end is exclusive");
        assert_eq!(table.name(0x50), None);
        assert_eq!(demangle("_ZN3foo3barEv"), "foo::bar()");
        assert_eq!(demangle("plain_c"), "plain_c");
    }

    #[test]
    fn xz_is_bounded() {
        // `printf 'hello hello hello hello' | xz -c | od -An -tx1`
        let data: &[u8] = &[
            0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0x00, 0x04, 0xe6, 0xd6, 0xb4, 0x46, 0x02, 0x00,
            0x21, 0x01, 0x16, 0x00, 0x00, 0x00, 0x74, 0x2f, 0xe5, 0xa3, 0xe0, 0x00, 0x16, 0x00,
            0x0b, 0x5d, 0x00, 0x34, 0x19, 0x49, 0xee, 0x8d, 0xe9, 0x56, 0x0a, 0xb5, 0xe0, 0x00,
            0x00, 0x00, 0x89, 0x43, 0xdb, 0xea, 0x03, 0x34, 0xe4, 0xd0, 0x00, 0x01, 0x27, 0x17,
            0x89, 0x82, 0x90, 0x79, 0x1f, 0xb6, 0xf3, 0x7d, 0x01, 0x00, 0x00, 0x00, 0x00, 0x04,
            0x59, 0x5a,
        ];
        assert_eq!(
            unxz(data, 1024).as_deref(),
            Some(&b"hello hello hello hello"[..])
        );
        assert_eq!(unxz(data, 10), None, "over the cap");
        assert_eq!(unxz(&data[..40], 1024), None, "truncated");
        assert_eq!(unxz(b"not xz at all", 1024), None);
    }
}
