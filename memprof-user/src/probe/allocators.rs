//! Which allocators a process really uses: every ELF object it maps (pid mode) or will map
//! (spawn mode: the executable, its program interpreter, `LD_PRELOAD` and its `DT_NEEDED`
//! libraries, resolved as the loader would) that *defines* `malloc` is an allocator object, and
//! each one is probed (see `load`). The allocator families are reported, never relied on; the
//! kinds are told apart by symbols (glibc's `__libc_malloc` is its `malloc`, musl's is not).
//!
//! An object defines `malloc` when its dynamic or static symbol table has a global or weak
//! function of that name: glibc's and musl's libc, jemalloc, tcmalloc, mimalloc, and executables
//! that link an allocator statically (static glibc or musl binaries, Rust programs with
//! jemallocator). jemalloc builds with a prefix (`je_malloc`, Rust's `_rjem_malloc`) count when
//! the object has no unprefixed `malloc`.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use object::{Object as _, ObjectSymbol as _};

use super::loader::{self, Candidate};
use crate::sys::elf;

/// Symbol prefixes of jemalloc builds, tried in order; the first under which the object defines
/// `malloc` is its prefix.
pub const PREFIXES: &[&str] = &["", "je_", "_rjem_"];

/// The allocator family an object belongs to, told by the symbols it defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Glibc,
    Musl,
    Jemalloc,
    Tcmalloc,
    Mimalloc,
    /// Defines `malloc` but matches none of the above.
    Other,
    /// Defines C++ `operator new` but no `malloc` (libstdc++, libc++): its `operator new`
    /// calls `malloc`, and is probed so that the stack starts at its caller (it has no frame
    /// pointer, so a walk from `malloc` would skip that caller).
    Cxx,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Glibc => "glibc",
            Kind::Musl => "musl",
            Kind::Jemalloc => "jemalloc",
            Kind::Tcmalloc => "tcmalloc",
            Kind::Mimalloc => "mimalloc",
            Kind::Other => "other",
            Kind::Cxx => "c++",
        }
    }

    /// A C library's allocator (the fallback every other allocator interposes on) or a C++
    /// runtime's `operator new` (which calls `malloc`): never the main allocator when another
    /// object defines `malloc`.
    pub fn is_fallback(self) -> bool {
        matches!(self, Kind::Glibc | Kind::Musl | Kind::Cxx)
    }
}

/// An object that defines `malloc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocator {
    pub path: PathBuf,
    pub shown: String,
    pub kind: Kind,
    /// The allocator is linked into the executable (a static binary, or a dynamic one that
    /// links its allocator statically).
    pub executable: bool,
    /// Prefix of its malloc-family names (`""`, `je_`, `_rjem_`).
    pub prefix: &'static str,
}

/// The allocator objects of running process `pid`, the main one first.
pub fn of_pid(pid: u32) -> Result<Vec<Allocator>> {
    crate::sys::process::check_traceable(pid)?;
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("failed to read the memory map of pid {pid}"))?;
    let exe_path = fs::read_link(format!("/proc/{pid}/exe"))
        .with_context(|| format!("failed to read /proc/{pid}/exe"))?;
    let exe_shown = exe_path.display().to_string();
    let exe_shown = exe_shown
        .strip_suffix(" (deleted)")
        .unwrap_or(&exe_shown)
        .to_string();
    let mut candidates = vec![Candidate {
        // Readable even when the file was deleted or lives in another mount namespace.
        path: PathBuf::from(format!("/proc/{pid}/exe")),
        shown: exe_shown.clone(),
        executable: true,
    }];
    let space = crate::sys::maps::AddressSpace::parse(&maps);
    for path in executable_mappings(&maps) {
        if path != exe_shown && !candidates.iter().any(|c| c.shown == path) {
            let file = space
                .mappings()
                .iter()
                .find(|m| m.path == path)
                .map(|m| crate::sys::maps::file_of(pid, &m.path, &m.dev, m.inode))
                .unwrap_or_else(|| format!("/proc/{pid}/root{path}"));
            candidates.push(Candidate {
                path: PathBuf::from(file),
                shown: path,
                executable: false,
            });
        }
    }
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    detect(&candidates, &format!("pid {pid} ({})", comm.trim()))
}

/// `a` (found in process `pid`) with a path that outlives the process when it can: the file's
/// own path when the process shares memprof's root, else its path through /proc/PID/root.
pub fn stable_path(pid: u32, mut a: Allocator) -> Allocator {
    if crate::sys::process::foreign_root(pid).is_some() {
        return a;
    }
    let own = Path::new(&a.shown);
    if own.is_absolute() && crate::sys::elf::file_id(own) == crate::sys::elf::file_id(&a.path) {
        a.path = own.to_path_buf();
    }
    a
}

/// Paths of the file-backed executable mappings in the text of a maps file, in order.
fn executable_mappings(maps: &str) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    for line in maps.lines() {
        let mut fields = line.splitn(6, ' ');
        let (Some(_), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let path = fields.nth(3).unwrap_or("").trim_start();
        if !perms.contains('x') || !path.starts_with('/') {
            continue;
        }
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        if !paths.iter().any(|p| p == path) {
            paths.push(path.to_string());
        }
    }
    paths
}

/// The allocator objects a spawned `command` will use, the main one first: its executable (the
/// interpreter of a `#!` script), program interpreter, `LD_PRELOAD` and `DT_NEEDED` libraries.
pub fn for_command(command: &Path) -> Result<Vec<Allocator>> {
    let elf = elf::executed_elf(command)?;
    let candidates = loader::objects_of_command(&elf)?;
    detect(&candidates, &elf.display().to_string())
}

/// Every object of `candidates` that defines `malloc` (and C++ runtimes defining `operator
/// new`), the main allocator first. Fails with a one-line explanation when none defines
/// `malloc` (`what` names the process).
pub fn detect(candidates: &[Candidate], what: &str) -> Result<Vec<Allocator>> {
    let mut found = Vec::new();
    let mut exe_info = None;
    for c in candidates {
        let Ok(file) = crate::sys::objfile::ObjectFile::open(&c.path) else {
            continue;
        };
        let obj = match object::File::parse(&file) {
            Ok(obj) => obj,
            Err(_) => {
                // A file that is no ELF is not an allocator; one that hit a cap says so.
                if let Some(why) = file.refusal() {
                    eprintln!(
                        "memprof: warning: {}; skipped",
                        crate::sys::printable::escape(&why)
                    );
                }
                continue;
            }
        };
        if c.executable {
            let has_symbols =
                obj.symbols().next().is_some() || obj.dynamic_symbols().next().is_some();
            exe_info = Some((
                elf::interpreter(&obj).is_none(),
                has_symbols,
                c.shown.clone(),
            ));
        }
        if let Some((kind, prefix)) = classify(&obj, &c.shown) {
            found.push(Allocator {
                path: c.path.clone(),
                shown: c.shown.clone(),
                kind,
                executable: c.executable,
                prefix,
            });
        }
    }
    if found.iter().all(|a| a.kind == Kind::Cxx) {
        match exe_info {
            Some((true, false, path)) => bail!(
                "{path} is a static binary without symbols; memprof needs its symbol table to \
                 find malloc"
            ),
            Some((true, true, path)) => bail!(
                "{path} is a static binary that defines no malloc; memprof traces programs that \
                 allocate with a C allocator"
            ),
            _ => bail!(
                "{what} uses no object that defines malloc ({} objects checked); memprof traces \
                 programs that use a C allocator (glibc, musl, jemalloc, tcmalloc, mimalloc)",
                candidates.len()
            ),
        }
    }
    // The main allocator: the first that is not a libc (the one malloc resolves to by symbol
    // interposition, since the executable and preloads come first); else the libc.
    if let Some(i) = found
        .iter()
        .position(|a| !a.kind.is_fallback())
        .or_else(|| found.iter().position(|a| a.kind != Kind::Cxx))
    {
        let main = found.remove(i);
        found.insert(0, main);
    }
    Ok(found)
}

/// The allocator family and name prefix of `obj`, if it defines `malloc` (or, `Kind::Cxx`, only
/// C++ `operator new`).
fn classify<'a, R: object::ReadRef<'a>>(
    obj: &object::File<'a, R>,
    shown: &str,
) -> Option<(Kind, &'static str)> {
    let mut globals: HashMap<&str, u64> = HashMap::new();
    let mut all: HashSet<&str> = HashSet::new();
    for sym in obj.dynamic_symbols().chain(obj.symbols()) {
        if sym.is_undefined() || sym.kind() != object::SymbolKind::Text {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        let base = name.split('@').next().unwrap_or(name);
        all.insert(base);
        if !sym.is_local() {
            globals.entry(base).or_insert(sym.address());
        }
    }
    let Some(prefix) = PREFIXES
        .iter()
        .find(|p| globals.contains_key(format!("{p}malloc").as_str()))
    else {
        return globals.contains_key("_Znwm").then_some((Kind::Cxx, ""));
    };
    let prefix = *prefix;
    let file = Path::new(shown)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let has = |n: &str| all.contains(n);
    // glibc's `__libc_malloc` is `malloc`; musl's is a different function, kept for its own use.
    let libc_malloc_is_malloc = globals.contains_key("__libc_malloc")
        && globals.get("__libc_malloc") == globals.get("malloc");
    let kind = if has("mi_malloc") {
        Kind::Mimalloc
    } else if has("tc_malloc") || has("TCMallocInternalMalloc") {
        Kind::Tcmalloc
    } else if !prefix.is_empty() || has("mallocx") || has("malloc_stats_print") {
        Kind::Jemalloc
    } else if has("gnu_get_libc_version") || libc_malloc_is_malloc {
        Kind::Glibc
    } else if has("__libc_start_main")
        || has("__libc_malloc_impl")
        || has("__init_libc")
        || file.starts_with("ld-musl-")
        || file.starts_with("libc.musl-")
    {
        Kind::Musl
    } else {
        Kind::Other
    };
    Some((kind, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_mappings_in_order() {
        let maps = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 131 /tmp/fixture
55d0c0a01000-55d0c0a02000 r-xp 00001000 08:01 131 /tmp/fixture
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000028000 r--p 00000000 08:01 77 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
7f0000028000-7f000019d000 r-xp 00028000 08:01 77 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
7f00001a0000-7f00001a1000 r-xp 00000000 08:01 78 /tmp/gone.so (deleted)
7f00001b0000-7f00001b1000 r--p 00000000 08:01 79 /usr/lib/locale/locale-archive
7ffc00000000-7ffc00021000 r-xp 00000000 00:00 0                          [vdso]
";
        assert_eq!(
            executable_mappings(maps),
            vec![
                "/tmp/fixture",
                "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                "/tmp/gone.so"
            ]
        );
    }

    #[test]
    fn own_process_uses_glibc() {
        let found = of_pid(std::process::id()).unwrap();
        assert!(
            found
                .iter()
                .any(|a| a.kind == Kind::Glibc && a.shown.contains("libc.so.6")),
            "{found:?}"
        );
        let exe = std::env::current_exe().unwrap();
        let spawned = for_command(&exe).unwrap();
        assert_eq!(spawned[0].kind, Kind::Glibc, "{spawned:?}");
        assert!(spawned[0].shown.contains("libc.so.6"), "{spawned:?}");
    }

    #[test]
    fn no_allocator_errors() {
        let e = detect(&[], "pid 1 (x)").unwrap_err().to_string();
        assert!(
            e.starts_with("pid 1 (x) uses no object that defines malloc"),
            "{e}"
        );
    }
}
