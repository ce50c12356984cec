//! Spawn mode: the objects the loader will map for a command, found before it runs: the
//! executable, its interpreter, `LD_PRELOAD` entries and, breadth first, the `DT_NEEDED`
//! libraries, each resolved the way the interpreter resolves it (`ld.so.cache`, default paths).

use std::{
    env,
    ffi::OsString,
    fs,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::Result;

use crate::sys::{elf, objfile::ObjectFile};

/// The most of `/etc/ld.so.cache` read.
const MAX_LD_SO_CACHE: u64 = 64 << 20;

/// The entries of `/etc/ld.so.cache`, read with a cap (it is root's file, but no file is read
/// unbounded).
fn read_ld_so_cache() -> Option<Vec<(String, PathBuf)>> {
    let file = ObjectFile::open_limited(Path::new("/etc/ld.so.cache"), MAX_LD_SO_CACHE).ok()?;
    Some(parse_ld_so_cache(file.head(MAX_LD_SO_CACHE)?))
}

/// How many objects spawn mode follows through `DT_NEEDED` at most.
const MAX_OBJECTS: usize = 1024;

/// An ELF file the process maps or will map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Where to read it and attach to it (in pid mode, inside `/proc/PID/root`).
    pub path: PathBuf,
    /// The path as the process sees it.
    pub shown: String,
    /// The main executable.
    pub executable: bool,
}

/// The executable, its interpreter, `LD_PRELOAD` entries and, breadth first, the `DT_NEEDED`
/// libraries, each resolved the way the interpreter resolves it.
pub fn objects_of_command(elf: &Path) -> Result<Vec<Candidate>> {
    let file = elf::open(elf)?;
    let obj = elf::parse(&file, elf)?;
    let machine = elf_machine(file.head(20).unwrap_or_default());
    let interp = elf::interpreter(&obj);
    let musl = interp.as_deref().is_some_and(|i| i.contains("musl"));
    let search = Search::new(musl, machine);
    let exe_dyn = dynamic_info(&obj);

    let mut out = vec![Candidate {
        path: elf.to_path_buf(),
        shown: elf.display().to_string(),
        executable: true,
    }];
    let push = |out: &mut Vec<Candidate>, p: PathBuf| {
        let shown = p.display().to_string();
        if !out.iter().any(|c| c.shown == shown) {
            out.push(Candidate {
                path: p,
                shown,
                executable: false,
            });
        }
    };
    let Some(interp) = interp else {
        return Ok(out); // static: the executable is all there is
    };
    // The loader's own search for preloads uses the executable's paths.
    if let Some(preload) = env::var_os("LD_PRELOAD") {
        for name in preload
            .as_bytes()
            .split(|b| *b == b':' || *b == b' ')
            .filter(|n| !n.is_empty())
        {
            let name = String::from_utf8_lossy(name);
            if let Some(p) = search.find(&name, elf, &exe_dyn, &exe_dyn) {
                push(&mut out, p);
            }
        }
    }
    let mut queue: Vec<(PathBuf, DynInfo)> = vec![(elf.to_path_buf(), exe_dyn.clone())];
    let mut next = 0;
    while next < queue.len() && out.len() < MAX_OBJECTS {
        let (path, info) = queue[next].clone();
        next += 1;
        for name in &info.needed {
            // musl's libc is its loader.
            if musl && name.starts_with("libc.so") {
                continue;
            }
            let Some(found) = search.find(name, &path, &info, &exe_dyn) else {
                continue;
            };
            let shown = found.display().to_string();
            if out.iter().any(|c| c.shown == shown) {
                continue;
            }
            push(&mut out, found.clone());
            if let Ok(file) = ObjectFile::open(&found)
                && let Ok(lib) = object::File::parse(&file)
            {
                queue.push((found, dynamic_info(&lib)));
            }
        }
    }
    push(&mut out, PathBuf::from(interp));
    Ok(out)
}

/// The `DT_NEEDED`, `DT_RPATH` and `DT_RUNPATH` entries of an object.
#[derive(Clone, Debug, Default)]
struct DynInfo {
    needed: Vec<String>,
    rpath: Vec<String>,
    runpath: Vec<String>,
}

fn dynamic_info<'a, R: object::ReadRef<'a>>(obj: &object::File<'a, R>) -> DynInfo {
    use object::elf;
    let mut info = DynInfo::default();
    let object::File::Elf64(f) = obj else {
        return info;
    };
    let Ok(table) = f.elf_dynamic_table() else {
        return info;
    };
    for d in table.iter() {
        if ![elf::DT_NEEDED, elf::DT_RPATH, elf::DT_RUNPATH].contains(&d.tag) {
            continue;
        }
        let Ok(s) = table.string(d) else { continue };
        let s = String::from_utf8_lossy(s).into_owned();
        match d.tag {
            elf::DT_NEEDED => info.needed.push(s),
            elf::DT_RPATH => info.rpath.extend(s.split(':').map(String::from)),
            _ => info.runpath.extend(s.split(':').map(String::from)),
        }
    }
    info
}

fn elf_machine(data: &[u8]) -> u16 {
    data.get(18..20)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .unwrap_or(0)
}

/// Whether `path` is a 64-bit ELF file for `machine`.
fn elf_matches(path: &Path, machine: u16) -> bool {
    let Ok(file) = ObjectFile::open(path) else {
        return false;
    };
    let head = file.head(20).unwrap_or_default();
    head.len() == 20 && head.starts_with(b"\x7fELF") && head[4] == 2 && elf_machine(head) == machine
}

/// How the program's loader finds a library by name.
struct Search {
    musl: bool,
    machine: u16,
    ld_library_path: Vec<PathBuf>,
    /// `/etc/ld.so.cache` entries (glibc): name and path, in the cache's order.
    cache: Vec<(String, PathBuf)>,
    /// The loader's fixed directories (after the cache for glibc; `/etc/ld-musl-*.path` or the
    /// built-in list for musl).
    dirs: Vec<PathBuf>,
}

impl Search {
    fn new(musl: bool, machine: u16) -> Self {
        let ld_library_path = env::var_os("LD_LIBRARY_PATH")
            .map(|v| {
                v.as_bytes()
                    .split(|b| *b == b':' || *b == b';')
                    .filter(|d| !d.is_empty())
                    .map(|d| PathBuf::from(OsString::from(String::from_utf8_lossy(d).as_ref())))
                    .collect()
            })
            .unwrap_or_default();
        let (cache, dirs) = if musl {
            let path_file = fs::read_dir("/etc")
                .ok()
                .and_then(|entries| {
                    entries.flatten().find(|e| {
                        let n = e.file_name();
                        let n = n.to_string_lossy();
                        n.starts_with("ld-musl-") && n.ends_with(".path")
                    })
                })
                .and_then(|e| fs::read_to_string(e.path()).ok());
            let dirs = match path_file {
                Some(text) => text
                    .split(['\n', ':'])
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from)
                    .collect(),
                None => ["/lib", "/usr/local/lib", "/usr/lib"]
                    .iter()
                    .map(PathBuf::from)
                    .collect(),
            };
            (Vec::new(), dirs)
        } else {
            let cache = read_ld_so_cache().unwrap_or_default();
            let dirs = [
                "/lib/x86_64-linux-gnu",
                "/usr/lib/x86_64-linux-gnu",
                "/lib64",
                "/usr/lib64",
                "/lib",
                "/usr/lib",
                "/usr/local/lib",
            ]
            .iter()
            .map(PathBuf::from)
            .collect();
            (cache, dirs)
        };
        Self {
            musl,
            machine,
            ld_library_path,
            cache,
            dirs,
        }
    }

    /// Resolves `name`, needed by the object at `from` (with dynamic entries `info`; `exe` are
    /// the executable's).
    fn find(&self, name: &str, from: &Path, info: &DynInfo, exe: &DynInfo) -> Option<PathBuf> {
        if name.contains('/') {
            let p = PathBuf::from(name);
            return p.is_file().then_some(p);
        }
        let origin = from.parent().unwrap_or(Path::new("/"));
        let expand = |dirs: &[String]| -> Vec<PathBuf> {
            dirs.iter()
                .filter(|d| !d.is_empty())
                .map(|d| {
                    PathBuf::from(
                        d.replace("${ORIGIN}", &origin.to_string_lossy())
                            .replace("$ORIGIN", &origin.to_string_lossy()),
                    )
                })
                .collect()
        };
        let mut dirs: Vec<PathBuf> = Vec::new();
        if self.musl {
            dirs.extend(self.ld_library_path.iter().cloned());
            dirs.extend(expand(&info.rpath));
            dirs.extend(expand(&info.runpath));
        } else {
            // glibc: DT_RPATH (of the object, then of the executable) only without DT_RUNPATH.
            if info.runpath.is_empty() {
                dirs.extend(expand(&info.rpath));
                if exe.runpath.is_empty() {
                    dirs.extend(expand(&exe.rpath));
                }
            }
            dirs.extend(self.ld_library_path.iter().cloned());
            dirs.extend(expand(&info.runpath));
        }
        if let Some(p) = dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| elf_matches(p, self.machine))
        {
            return Some(p);
        }
        if let Some(p) = self
            .cache
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, p)| p)
            .find(|p| elf_matches(p, self.machine))
        {
            return Some(p.clone());
        }
        self.dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| elf_matches(p, self.machine))
    }
}

/// The (name, path) entries of glibc's `/etc/ld.so.cache` (the "glibc-ld.so.cache1.1" format,
/// alone or after the old one).
fn parse_ld_so_cache(data: &[u8]) -> Vec<(String, PathBuf)> {
    const MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
    const HEADER: usize = 48;
    const ENTRY: usize = 24;
    let Some(base) = data.windows(MAGIC.len()).position(|w| w == MAGIC) else {
        return Vec::new();
    };
    let u32_at = |off: usize| -> Option<u32> {
        data.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let Some(nlibs) = u32_at(base + 20) else {
        return Vec::new();
    };
    // Offsets of strings are relative to the new-format header.
    let string_at = |off: u32| -> Option<String> {
        let start = base.checked_add(off as usize)?;
        let rest = data.get(start..)?;
        let end = rest.iter().position(|b| *b == 0)?;
        Some(String::from_utf8_lossy(&rest[..end]).into_owned())
    };
    let mut out = Vec::new();
    for i in 0..nlibs as usize {
        let e = base + HEADER + i * ENTRY;
        let (Some(key), Some(value)) = (u32_at(e + 4), u32_at(e + 8)) else {
            break;
        };
        if let (Some(name), Some(path)) = (string_at(key), string_at(value)) {
            out.push((name, PathBuf::from(path)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ld_so_cache_resolves_libc() {
        let Ok(data) = fs::read("/etc/ld.so.cache") else {
            return;
        };
        let entries = parse_ld_so_cache(&data);
        assert!(
            entries.iter().any(|(n, p)| n == "libc.so.6" && p.is_file()),
            "{entries:?}"
        );
    }
}
