//! Finding CPython in a process: the mapped object that defines `_PyRuntime`, its load bias,
//! its version and the layout to read it with.

use std::{fs, path::Path};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

use super::{
    DEBUG_OFFSETS_SIZE, DebugOffsets, DebugOffsetsError, Mem, PyOffsets, PyVersion, PythonError,
    Result,
};
use crate::sys::{
    maps::{self, AddressSpace, Mapping},
    objfile::ObjectFile,
};

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
    // _PyRuntime, and one that embeds the interpreter (`python3.11` on Debian and 3.14 on,
    // python-build-standalone's, uwsgi built statically) is found next.
    let mut candidates: Vec<&Mapping> = Vec::new();
    for m in space.mappings() {
        if seen.contains(&m.path.as_str()) {
            continue;
        }
        seen.push(&m.path);
        let base = file_name(&m.path);
        if base.starts_with("libpython") {
            candidates.insert(0, m);
        } else if base.contains("python") || exe.as_deref() == Some(m.path.as_str()) {
            candidates.push(m);
        }
    }
    for m in candidates.into_iter().take(MAX_CANDIDATES) {
        let path = m.path.as_str();
        // Read in bounded pieces: a "python"-named blob of any size costs one header read.
        let Some((host, data)) = open_mapped(pid, m) else {
            continue;
        };
        let file = match object::File::parse(&data) {
            Ok(file) => file,
            // Not an ELF file (a data file named like python): not the interpreter.
            Err(_) if data.refusal().is_none() => continue,
            Err(e) => {
                return Err(PythonError::Elf {
                    path: host,
                    reason: data.refusal().unwrap_or_else(|| e.to_string()),
                });
            }
        };
        let Some(mut symbols) = runtime_symbols(&file) else {
            continue;
        };
        // Only a file without a symbol table (stripped) hides the split-off parts' names.
        if file.symbols().next().is_none() {
            let split = split_parts(&file, &symbols.eval_loop);
            symbols.eval_loop.extend(split);
        }
        let bias = load_bias(&file, &space, path).ok_or_else(|| PythonError::Elf {
            path: host.clone(),
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
    let debug = match mem.read(runtime, &mut head) {
        Ok(()) => DebugOffsets::parse(&head),
        Err(_) => Err(DebugOffsetsError::NoCookie),
    };
    let version = if let Ok(d) = &debug {
        PyVersion::from_hex(d.version)
    } else if let Some(sym) = symbols.py_version {
        PyVersion::from_hex(u64::from(mem.u32(sym.wrapping_add(bias))?))
    } else {
        PyVersion::from_file_name(file_name(path)).ok_or_else(|| PythonError::UnknownVersion {
            path: path.to_string(),
        })?
    };
    let unsupported = |reason: String| PythonError::Unsupported {
        pid,
        version,
        reason,
    };
    if version.major != 3 || version.minor < 8 {
        return Err(unsupported("memprof reads CPython 3.8 and later".into()));
    }
    // A free-threaded build says so in its `_Py_DebugOffsets` (3.13t on), and its files are
    // named `python3.14t`, `libpython3.14t.so`.
    if named_free_threaded(path, version) || debug.as_ref().is_ok_and(|d| d.free_threaded != 0) {
        return Err(unsupported(
            "a free-threaded build (no GIL): its objects, frames and thread-local bytecode are \
             laid out differently, and memprof reads only default builds"
                .into(),
        ));
    }
    let table = PyOffsets::for_version(version.major, version.minor);
    let offsets = match (debug, table) {
        (Ok(d), table) if version.minor >= 13 => PyOffsets::from_debug_offsets(&d, table),
        (Err(e), _) if version.minor >= 13 => {
            return Err(unsupported(format!(
                "CPython 3.13 and later are read through the offsets they publish, and {e}"
            )));
        }
        (_, Some(table)) => table,
        (_, None) => return Err(unsupported("no layout known for this version".into())),
    };
    Ok(PyProcess {
        pid,
        version,
        object: path.to_string(),
        bias,
        runtime,
        code_type: symbols.code_type.map(|a| a.wrapping_add(bias)),
        from_debug_offsets: version.minor >= 13,
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

/// The file process `pid` maps at `m` (read in bounded pieces), and the path it is read through: the
/// process's own view of the mapping (`/proc/PID/map_files`, which works inside containers,
/// chroots and for files replaced since), else the file `m.path` names where it is that very
/// file, else `m.path` under the process's root.
fn open_mapped(pid: u32, m: &Mapping) -> Option<(String, ObjectFile)> {
    let via = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
    let named = maps::file_of(pid, &m.path, &m.dev, m.inode);
    [via, named]
        .into_iter()
        .find_map(|p| ObjectFile::open(Path::new(&p)).ok().map(|data| (p, data)))
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

/// Whether the object at `path` bears the name of a free-threaded build of `version`
/// (`python3.14t`, `libpython3.14t.so.1.0`).
fn named_free_threaded(path: &str, version: PyVersion) -> bool {
    let name = file_name(path);
    name.strip_prefix("lib")
        .unwrap_or(name)
        .starts_with(&format!("python{}.{}t", version.major, version.minor))
}

/// Most parts of the eval loop kept, and most jump targets out of its named parts followed.
const MAX_EVAL_PARTS: usize = 8;
const MAX_SPLIT_TARGETS: usize = 64;
/// Most bytes of the eval loop's named parts disassembled (3.11's is about 60 KiB).
const MAX_EVAL_BYTES: u64 = 4 << 20;

/// The parts of the eval loop a compiler split off (GCC's `_PyEval_EvalFrameDefault.cold`,
/// where a build profiled for speed puts code it saw run rarely, and where the calls from
/// Python into C can lie) that the symbol table does not name: a stripped executable, as
/// distributions ship, keeps only the dynamic symbols, which name the entry part alone.
/// Each is the `.eh_frame` entry that a direct jump from a named part (`parts`, link-time
/// (address, size)) lands in, if that entry starts inside a frame: a function's own entry
/// (where the caller's return address is all the stack holds: a tail call from the eval loop)
/// is no part of it. Returns link-time (address, size) pairs not already in `parts`.
pub(super) fn split_parts<'a, R: object::ReadRef<'a>>(
    file: &object::File<'a, R>,
    parts: &[(u64, u64)],
) -> Vec<(u64, u64)> {
    use gimli::{BaseAddresses, CfaRule, EhFrame, LittleEndian, UnwindContext, UnwindSection as _};
    use iced_x86::{Decoder, DecoderOptions, FlowControl, OpKind};
    use object::ObjectSection as _;

    let inside = |list: &[(u64, u64)], a: u64| {
        list.iter()
            .any(|&(lo, size)| lo <= a && a < lo.saturating_add(size))
    };
    let mut targets: Vec<u64> = Vec::new();
    for &(addr, size) in parts.iter().take(MAX_EVAL_PARTS) {
        if size == 0 || size > MAX_EVAL_BYTES {
            continue;
        }
        let Some(code) = file.sections().find_map(|sec| {
            let end = sec.address().checked_add(sec.size())?;
            if sec.address() <= addr && addr.checked_add(size)? <= end {
                sec.data_range(addr, size).ok().flatten()
            } else {
                None
            }
        }) else {
            continue;
        };
        let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
        for ins in decoder.iter() {
            let branch = matches!(
                ins.flow_control(),
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
            ) && ins.op0_kind() == OpKind::NearBranch64;
            let target = ins.near_branch_target();
            if branch && !inside(parts, target) && !targets.contains(&target) {
                targets.push(target);
                if targets.len() >= MAX_SPLIT_TARGETS {
                    break;
                }
            }
        }
    }
    if targets.is_empty() {
        return Vec::new();
    }
    let Some(eh) = file.section_by_name(".eh_frame") else {
        return Vec::new();
    };
    let Ok(data) = eh.data() else {
        return Vec::new();
    };
    let section = |name: &str| file.section_by_name(name).map_or(0, |s| s.address());
    let bases = BaseAddresses::default()
        .set_eh_frame(eh.address())
        .set_text(section(".text"))
        .set_got(section(".got"));
    let eh_frame = EhFrame::new(data, LittleEndian);
    let mut ctx = Box::new(UnwindContext::new());
    let mut found: Vec<(u64, u64)> = Vec::new();
    // One pass over the entries (a lookup per target would parse them all each time).
    let mut entries = eh_frame.entries(&bases);
    while let Ok(Some(entry)) = entries.next() {
        if parts.len() + found.len() >= MAX_EVAL_PARTS || targets.is_empty() {
            break;
        }
        let gimli::CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(EhFrame::cie_from_offset) else {
            continue;
        };
        let (start, end) = (fde.initial_address(), fde.end_address());
        if start == 0 || !targets.iter().any(|&t| start <= t && t < end) {
            continue;
        }
        targets.retain(|&t| !(start <= t && t < end));
        let Ok(row) = fde.unwind_info_for_address(&eh_frame, &bases, &mut ctx, start) else {
            continue;
        };
        // At a function's entry the frame is the return address alone: CFA = rsp + 8, no
        // register saved but the return address.
        let entry = matches!(
            row.cfa(),
            CfaRule::RegisterAndOffset { register, offset: 8 } if *register == gimli::X86_64::RSP
        ) && row.registers().all(|(r, _)| *r == gimli::X86_64::RA);
        if !entry && !inside(parts, start) {
            found.push((start, fde.len()));
        }
    }
    found
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
                (size > 0 && offset <= m.offset && m.offset < offset + size).then(|| {
                    let vaddr = seg.address() + (m.offset - offset);
                    m.start.wrapping_sub(vaddr)
                })
            })
        })
}

#[cfg(test)]
mod detect_tests {
    use super::*;

    #[test]
    fn free_threaded_names() {
        let v = PyVersion::from_hex(0x030e_08f0);
        assert!(named_free_threaded("/usr/bin/python3.14t", v));
        assert!(named_free_threaded("/usr/lib/libpython3.14t.so.1.0", v));
        assert!(!named_free_threaded("/usr/bin/python3.14", v));
        assert!(!named_free_threaded("/usr/lib/libpython3.14.so.1.0", v));
        assert!(!named_free_threaded("/opt/venv/bin/python", v));
    }
}
