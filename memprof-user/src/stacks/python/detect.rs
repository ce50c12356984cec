//! Finding CPython in a process: the mapped object that defines `_PyRuntime`, its load bias,
//! its version and the layout to read it with.

use std::{
    fs,
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

use super::{DEBUG_OFFSETS_SIZE, DebugOffsets, Mem, PyOffsets, PyVersion, PythonError, Result};
use crate::sys::{maps::AddressSpace, objfile::ObjectFile};

/// Mapped files looked at per detection at most (a process may map thousands named python).
const MAX_CANDIDATES: usize = 16;

/// A CPython interpreter found in a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyProcess {
    pub pid: u32,
    pub version: PyVersion,
    /// The object defining `_PyRuntime`, as `/proc/PID/maps` names it (inside the process's
    /// mount namespace): the executable or `libpython3.X.so`.
    pub object: String,
    /// Load bias of that object: runtime address = symbol value + bias.
    pub bias: u64,
    /// Runtime address of `_PyRuntime`.
    pub runtime: u64,
    /// Runtime address of `PyCode_Type`, to check that an address holds a code object.
    pub code_type: Option<u64>,
    /// Whether `offsets` came from the process's `_Py_DebugOffsets` (3.13+).
    pub from_debug_offsets: bool,
    pub offsets: PyOffsets,
    /// Runtime address ranges of the eval loop, `_PyEval_EvalFrameDefault` (and its parts the
    /// compiler split off, when the symbol table names them): a native frame there runs Python
    /// frames.
    pub eval_loop: Vec<std::ops::Range<u64>>,
}

/// Symbols of the object defining `_PyRuntime`, as link-time values.
pub(super) struct RuntimeSymbols {
    pub(super) runtime: u64,
    code_type: Option<u64>,
    py_version: Option<u64>,
    /// (address, size) of `_PyEval_EvalFrameDefault` and its split-off parts.
    eval_loop: Vec<(u64, u64)>,
}

/// Finds CPython in process `pid`: the mapped object (the executable or a `libpython`) that
/// defines `_PyRuntime`, its load bias, and the version and layout.
pub fn detect(pid: u32) -> Result<PyProcess> {
    let space = AddressSpace::read(pid).map_err(|source| PythonError::Io {
        pid,
        what: format!("/proc/{pid}/maps"),
        source,
    })?;
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let mut seen: Vec<&str> = Vec::new();
    // libpython before the executable: an executable linked against it does not define
    // _PyRuntime, and one that embeds the interpreter (`python3.11` on Debian, uwsgi built
    // statically) is found next.
    let mut candidates: Vec<&str> = Vec::new();
    for m in space.mappings() {
        if seen.contains(&m.path.as_str()) {
            continue;
        }
        seen.push(&m.path);
        let base = file_name(&m.path);
        if base.starts_with("libpython") {
            candidates.insert(0, &m.path);
        } else if base.contains("python") || exe.as_deref() == Some(m.path.as_str()) {
            candidates.push(&m.path);
        }
    }
    for path in candidates.into_iter().take(MAX_CANDIDATES) {
        let host = host_path(pid, path);
        // Read in bounded pieces: a "python"-named blob of any size costs one header read.
        let Ok(data) = ObjectFile::open(&host) else {
            continue;
        };
        let file = match object::File::parse(&data) {
            Ok(file) => file,
            // Not an ELF file (a data file named like python): not the interpreter.
            Err(_) if data.refusal().is_none() => continue,
            Err(e) => {
                return Err(PythonError::Elf {
                    path: host.display().to_string(),
                    reason: data.refusal().unwrap_or_else(|| e.to_string()),
                });
            }
        };
        let Some(symbols) = runtime_symbols(&file) else {
            continue;
        };
        let bias = load_bias(&file, &space, path).ok_or_else(|| PythonError::Elf {
            path: host.display().to_string(),
            reason: "no mapping of a loadable segment".into(),
        })?;
        return finish_detect(pid, path, bias, &symbols);
    }
    Err(PythonError::NotPython { pid })
}

fn finish_detect(pid: u32, path: &str, bias: u64, symbols: &RuntimeSymbols) -> Result<PyProcess> {
    let mem = Mem::new(pid);
    let runtime = symbols.runtime.wrapping_add(bias);
    let mut head = [0u8; DEBUG_OFFSETS_SIZE];
    let debug = mem
        .read(runtime, &mut head)
        .ok()
        .and_then(|()| DebugOffsets::parse(&head));
    let version = if let Some(d) = &debug {
        PyVersion::from_hex(d.version)
    } else if let Some(sym) = symbols.py_version {
        PyVersion::from_hex(u64::from(mem.u32(sym.wrapping_add(bias))?))
    } else {
        PyVersion::from_file_name(file_name(path)).ok_or_else(|| PythonError::UnknownVersion {
            path: path.to_string(),
        })?
    };
    let unsupported = PythonError::Unsupported { pid, version };
    if version.major != 3 || debug.is_some_and(|d| d.free_threaded != 0) {
        return Err(unsupported);
    }
    let table = PyOffsets::for_version(version.major, version.minor).ok_or(unsupported)?;
    let offsets = match &debug {
        Some(d) => table.with_debug_offsets(d),
        None => table,
    };
    Ok(PyProcess {
        pid,
        version,
        object: path.to_string(),
        bias,
        runtime,
        code_type: symbols.code_type.map(|a| a.wrapping_add(bias)),
        from_debug_offsets: debug.is_some(),
        offsets,
        eval_loop: symbols
            .eval_loop
            .iter()
            .map(|&(a, size)| a.wrapping_add(bias)..a.wrapping_add(bias).wrapping_add(size))
            .collect(),
    })
}

pub(super) fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The file behind a path of the process's mount namespace.
fn host_path(pid: u32, path: &str) -> PathBuf {
    Path::new(&format!("/proc/{pid}/root")).join(path.trim_start_matches('/'))
}

pub(super) fn runtime_symbols<'a, R: object::ReadRef<'a>>(
    file: &object::File<'a, R>,
) -> Option<RuntimeSymbols> {
    let mut found = RuntimeSymbols {
        runtime: 0,
        code_type: None,
        py_version: None,
        eval_loop: Vec::new(),
    };
    // The symbol table when present (unstripped), else the dynamic one: CPython exports these.
    for sym in file.symbols().chain(file.dynamic_symbols()) {
        if sym.is_undefined() {
            continue;
        }
        match sym.name() {
            Ok("_PyRuntime") if found.runtime == 0 => found.runtime = sym.address(),
            Ok("PyCode_Type") if found.code_type.is_none() => found.code_type = Some(sym.address()),
            Ok("Py_Version") if found.py_version.is_none() => {
                found.py_version = Some(sym.address())
            }
            Ok(name)
                if (name == "_PyEval_EvalFrameDefault"
                    || name.starts_with("_PyEval_EvalFrameDefault."))
                    && sym.size() > 0
                    && found.eval_loop.len() < 8
                    && !found.eval_loop.contains(&(sym.address(), sym.size())) =>
            {
                found.eval_loop.push((sym.address(), sym.size()));
            }
            _ => {}
        }
    }
    (found.runtime != 0).then_some(found)
}

/// Load bias of the object at `path` in the process: the start of one of its mappings minus the
/// link-time address of the file offset mapped there.
fn load_bias<'a, R: object::ReadRef<'a>>(
    file: &object::File<'a, R>,
    space: &AddressSpace,
    path: &str,
) -> Option<u64> {
    space
        .mappings()
        .iter()
        .filter(|m| m.path == path)
        .find_map(|m| {
            file.segments().find_map(|seg| {
                let (offset, size) = seg.file_range();
                (size > 0 && offset <= m.offset && m.offset < offset.saturating_add(size)).then(
                    || {
                        let vaddr = seg.address().wrapping_add(m.offset - offset);
                        m.start.wrapping_sub(vaddr)
                    },
                )
            })
        })
}
