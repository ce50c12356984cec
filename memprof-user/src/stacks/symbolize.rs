//! Naming normalized frames: function, file:line and the functions inlined at the frame's
//! return address, with blazesym, from wherever the system keeps names (see [`debuginfo`]).
//!
//! A frame in a module is named, in this order, by: the module's separate debug file (by
//! virtual address), the module itself (`.symtab`, `.dynsym`, its own DWARF; by file offset),
//! then its MiniDebugInfo and `.dynsym` (when blazesym cannot read its symbols). Results are
//! cached per (module, offset); a frame no source names keeps `function: null` (outputs show
//! it as `module+0xOFFSET` and count it in `unknown_frames`). Every name blazesym reads comes
//! through [`names_in`], the one place it opens an object, and only after [`elfcheck`] looked at
//! the object's section headers and compressed sections: an object it refuses is not named (a
//! warning says why), one whose debug sections fail is named from its symbol tables alone.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use blazesym::{
    MaybeDefault,
    symbolize::{
        Input, Sym, Symbolized, Symbolizer as Blaze,
        source::{Elf, Kernel, Source},
    },
};
use serde::{Serialize, Serializer};

use super::{
    RawFrame,
    debuginfo::{ObjectInfo, fd_path},
    python::PyFrame,
    store::KERNEL_MODULE,
};
use crate::sys::{
    elfcheck::{self, Fit},
    printable::escape,
};

/// A frame as outputs show it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Frame {
    pub function: Option<String>,
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Where the frame is in its module: the offset in the module's file of the return address
    /// (`0x...`), the same in every run. When several return addresses share one name (one
    /// source line) the lowest is shown. None for Python frames and `unknown` ones.
    #[serde(serialize_with = "hex_offset")]
    pub offset: Option<u64>,
    /// The module's GNU build id (hex), when it has one.
    pub build_id: Option<String>,
    /// A function the compiler inlined into the frame that follows (same return address).
    pub inlined: bool,
    /// `native` (machine code in a mapped object), `kernel` (the kernel's code, `--kernel`;
    /// module `[kernel]`), `python` (a Python function), or `unknown` (an address in no mapped
    /// object, or where unwinding stopped: see `unwind::TRUNCATED`).
    pub kind: &'static str,
}

impl Frame {
    /// A frame of kind `unknown`: no module, no name.
    pub fn unknown() -> Frame {
        Frame {
            function: None,
            module: None,
            file: None,
            line: None,
            offset: None,
            build_id: None,
            inlined: false,
            kind: "unknown",
        }
    }
}

fn hex_offset<S: Serializer>(offset: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match offset {
        Some(o) => s.serialize_str(&format!("{o:#x}")),
        None => s.serialize_none(),
    }
}

/// One named function at an address: innermost first when functions were inlined there.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Named {
    function: String,
    file: Option<String>,
    line: Option<u32>,
    inlined: bool,
}

pub struct Symbolizer {
    blaze: Blaze,
    /// Names per (module, lookup offset); empty when nothing names the address.
    cache: HashMap<(u32, u64), Vec<Named>>,
    /// What was learned of each module, by path (build id, debug file, MiniDebugInfo).
    objects: HashMap<String, ObjectInfo>,
    /// Files kept open by the path stacks name them with, for paths that stop working when
    /// their process exits (`/proc/PID/root/...` of a process under another root).
    pinned: HashMap<String, std::fs::File>,
    /// `--debug-dir`: searched for debug files before the system's.
    debug_dirs: Vec<PathBuf>,
    /// What [`elfcheck`] said of each file blazesym may open.
    checked: Checked,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Self::with_debug_dirs(Vec::new())
    }

    /// A symbolizer that looks for debug files in `debug_dirs` first (see [`debuginfo`]).
    pub fn with_debug_dirs(debug_dirs: Vec<PathBuf>) -> Self {
        Self {
            // Debug files are found by `debuginfo` (which knows the process's root); blazesym
            // reads the objects' own DWARF only.
            blaze: Blaze::builder()
                .set_debug_dirs(Some::<&[PathBuf]>(&[]))
                .build(),
            cache: HashMap::new(),
            objects: HashMap::new(),
            pinned: HashMap::new(),
            debug_dirs,
            checked: Checked::new(),
        }
    }

    /// Names frames in `path` from `file` (kept open: the path stops working when its process
    /// exits), with what [`ObjectInfo::inspect`] learned of it while the path still worked.
    pub fn pin(&mut self, path: &str, file: std::fs::File, object: ObjectInfo) {
        self.pinned.insert(path.to_string(), file);
        self.objects.insert(path.to_string(), object);
    }

    /// The path that opens `logical` (its pinned file, if any).
    fn open_path(&self, logical: &str) -> PathBuf {
        match self.pinned.get(logical) {
            Some(file) => fd_path(file),
            None => PathBuf::from(logical),
        }
    }

    /// What is known of the object at `logical`, inspected the first time.
    fn object(&mut self, logical: &str) -> &ObjectInfo {
        if !self.objects.contains_key(logical) {
            let info = ObjectInfo::inspect(&self.open_path(logical), logical, &self.debug_dirs);
            self.objects.insert(logical.to_string(), info);
        }
        &self.objects[logical]
    }

    /// Symbolizes a stored stack (whose frames index `modules` and `python`, as in the
    /// `StackStore`): one frame per raw frame, preceded by the functions inlined at its address
    /// (innermost first).
    pub fn frames(
        &mut self,
        modules: &[String],
        python: &[PyFrame],
        frames: &[RawFrame],
    ) -> Vec<Frame> {
        self.prepare(modules, frames);
        let mut out = Vec::with_capacity(frames.len());
        for f in frames {
            if let Some(py) = f.python.and_then(|i| python.get(i as usize)) {
                let known = |s: &String| (!s.is_empty()).then(|| s.clone());
                out.push(Frame {
                    function: known(&py.function),
                    module: None,
                    file: known(&py.file),
                    line: py.line,
                    offset: None,
                    build_id: None,
                    inlined: false,
                    kind: "python",
                });
                continue;
            }
            let Some(m) = f.module else {
                out.push(Frame::unknown());
                continue;
            };
            let Some(module) = modules.get(m as usize) else {
                out.push(Frame::unknown());
                continue;
            };
            let kernel = module == KERNEL_MODULE;
            let native = Frame {
                function: None,
                module: Some(module.clone()),
                file: None,
                line: None,
                offset: Some(f.file_offset),
                build_id: if kernel {
                    None
                } else {
                    self.objects.get(module).and_then(|o| o.build_id.clone())
                },
                inlined: false,
                kind: if kernel { "kernel" } else { "native" },
            };
            match self.cache.get(&(m, lookup_offset(f))) {
                Some(names) if !names.is_empty() => {
                    out.extend(names.iter().map(|n| Frame {
                        function: Some(n.function.clone()),
                        file: n.file.clone(),
                        line: n.line,
                        inlined: n.inlined,
                        // A kernel address moves with each boot (KASLR): its name is the frame.
                        offset: if kernel { None } else { native.offset },
                        ..native.clone()
                    }));
                }
                _ => out.push(native),
            }
        }
        out
    }

    /// Resolves, one batch per module, the frames not yet in the cache.
    fn prepare(&mut self, modules: &[String], frames: &[RawFrame]) {
        let mut todo: HashMap<u32, Vec<u64>> = HashMap::new();
        for f in frames {
            if let (Some(m), None) = (f.module, f.python)
                && (m as usize) < modules.len()
            {
                let off = lookup_offset(f);
                if !self.cache.contains_key(&(m, off)) {
                    todo.entry(m).or_default().push(off);
                }
            }
        }
        for (module, mut offsets) in todo {
            offsets.sort_unstable();
            offsets.dedup();
            let logical = &modules[module as usize];
            if logical == KERNEL_MODULE {
                let names = kernel_names(&self.blaze, &offsets);
                for (off, names) in offsets.into_iter().zip(names) {
                    self.cache.insert((module, off), names);
                }
                continue;
            }
            let open = self.open_path(logical);
            self.object(logical);
            let names = resolve(
                &self.blaze,
                &mut self.checked,
                &self.objects[logical],
                (&open, logical),
                &offsets,
            );
            for (off, names) in offsets.into_iter().zip(names) {
                self.cache.insert((module, off), names);
            }
        }
    }
}

/// Names `offsets` (file offsets) of `object` (opened as `open`): from its debug file, then
/// itself, then its MiniDebugInfo; each source only for what the previous ones left unnamed.
/// `open` is the path to read, `logical` the module's name in warnings.
fn resolve(
    blaze: &Blaze,
    checked: &mut Checked,
    object: &ObjectInfo,
    (open, logical): (&Path, &str),
    offsets: &[u64],
) -> Vec<Vec<Named>> {
    let mut names = vec![Vec::new(); offsets.len()];
    let unnamed = |names: &[Vec<Named>]| -> Vec<usize> {
        (0..names.len()).filter(|&i| names[i].is_empty()).collect()
    };
    if let Some(debug) = object.debug_path() {
        let (at, vaddrs): (Vec<usize>, Vec<u64>) = offsets
            .iter()
            .enumerate()
            .filter_map(|(i, off)| Some((i, object.vaddr(*off)?)))
            .unzip();
        for (i, n) in at.into_iter().zip(names_in(
            blaze,
            checked,
            (&debug, &object.debug_file_shown()),
            Input::VirtOffset(&vaddrs),
        )) {
            names[i] = n;
        }
    }
    if !object.symbols_compressed {
        let at = unnamed(&names);
        let todo: Vec<u64> = at.iter().map(|&i| offsets[i]).collect();
        if !todo.is_empty() {
            for (i, n) in at.into_iter().zip(names_in(
                blaze,
                checked,
                (open, logical),
                Input::FileOffset(&todo),
            )) {
                names[i] = n;
            }
        }
    }
    if let Some(mini) = &object.mini {
        for i in unnamed(&names) {
            if let Some(function) = object.vaddr(offsets[i]).and_then(|v| mini.name(v)) {
                names[i] = vec![Named {
                    function: function.to_string(),
                    file: None,
                    line: None,
                    inlined: false,
                }];
            }
        }
    }
    names
}

/// What [`elfcheck`] said of each file blazesym may open, by path: whether its DWARF may be
/// read (None: not to be opened at all).
type Checked = HashMap<PathBuf, Option<bool>>;

/// What blazesym names at each address of `input` in the ELF file at `path` (shown as `shown`;
/// one entry per address, empty when unnamed): the one place blazesym opens an object, once
/// [`elfcheck`] passed it.
fn names_in(
    blaze: &Blaze,
    checked: &mut Checked,
    (path, shown): (&Path, &str),
    input: Input<&[u64]>,
) -> Vec<Vec<Named>> {
    let count = input.as_inner_ref().len();
    let fit = *checked
        .entry(path.to_path_buf())
        .or_insert_with(|| check(path, shown));
    let Some(debug_syms) = fit else {
        return vec![Vec::new(); count];
    };
    let mut elf = Elf::new(path);
    elf.debug_syms = debug_syms;
    let src = Source::Elf(elf);
    let results = blaze.symbolize(&src, input).unwrap_or_default();
    (0..count)
        .map(|i| match results.get(i) {
            Some(Symbolized::Sym(sym)) => named(sym),
            _ => Vec::new(),
        })
        .collect()
}

/// What `/proc/kallsyms` names at each kernel address of `addrs` (one entry per address,
/// empty when unnamed). The kernel's own symbol list: no object file is opened.
fn kernel_names(blaze: &Blaze, addrs: &[u64]) -> Vec<Vec<Named>> {
    let src = Source::Kernel(Kernel {
        kallsyms: MaybeDefault::Default,
        vmlinux: MaybeDefault::None,
        debug_syms: false,
        ..Default::default()
    });
    let results = blaze
        .symbolize(&src, Input::AbsAddr(addrs))
        .unwrap_or_default();
    (0..addrs.len())
        .map(|i| match results.get(i) {
            Some(Symbolized::Sym(sym)) => named(sym),
            _ => Vec::new(),
        })
        .collect()
}

/// Whether blazesym may open the object at `path` (`shown` in warnings) and read its DWARF,
/// by [`elfcheck`]: a symbolizer trusts compressed section headers (a claimed 64 GiB aborted
/// memprof, 2^64-1 panicked it, a zlib bomb took it to 2 GiB), so those are checked first.
fn check(path: &Path, shown: &str) -> Option<bool> {
    match elfcheck::check_object(path) {
        Ok(Fit::Whole) => Some(true),
        Ok(Fit::SymbolsOnly { why }) => {
            eprintln!(
                "memprof: warning: {}: debug sections not read ({}); its functions are named from its symbol tables",
                escape(shown),
                escape(&why)
            );
            Some(false)
        }
        Err(refusal) => {
            eprintln!(
                "memprof: warning: {}: its code is not named: {}",
                escape(shown),
                escape(&refusal.reason)
            );
            None
        }
    }
}

/// A symbol with the functions inlined at its address, innermost first. blazesym lists inlined
/// functions outermost first, each with the location inside it; the symbol's own location is
/// where it calls the outermost one.
fn named(sym: &Sym<'_>) -> Vec<Named> {
    let place = |ci: Option<&blazesym::symbolize::CodeInfo<'_>>| match ci {
        Some(ci) => (Some(ci.to_path().display().to_string()), ci.line),
        None => (None, None),
    };
    let mut out: Vec<Named> = sym
        .inlined
        .iter()
        .rev()
        .map(|f| {
            let (file, line) = place(f.code_info.as_ref());
            Named {
                function: f.name.to_string(),
                file,
                line,
                inlined: true,
            }
        })
        .collect();
    let (file, line) = place(sym.code_info.as_deref());
    out.push(Named {
        function: sym.name.to_string(),
        file,
        line,
        inlined: false,
    });
    out
}

/// Every recorded frame is a return address: look up the byte before it, which lies in the call
/// instruction, so a call at the very end of a function is not attributed to the next one.
fn lookup_offset(f: &RawFrame) -> u64 {
    f.file_offset.saturating_sub(1)
}

/// The build id of the ELF file at `path` (hex), for outputs that name modules without frames.
pub fn build_id(path: &str) -> Option<String> {
    ObjectInfo::inspect(Path::new(path), path, &[]).build_id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{stacks::StackStore, sys::maps::AddressSpace};

    /// The test binary names its own functions, with offsets in its file and its build id.
    #[test]
    fn names_own_code_with_offsets_and_build_id() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_str().unwrap();
        let space = AddressSpace::read(std::process::id()).unwrap();
        let here = names_own_code_with_offsets_and_build_id as *const () as u64 + 1;
        let mut store = StackStore::new();
        store.insert(1, &[here, u64::MAX], &space);
        let raw = store.get(1).unwrap().to_vec();
        let mut sym = Symbolizer::new();
        let frames = sym.frames(store.modules(), store.python_frames(), &raw);
        let own = frames.iter().find(|f| !f.inlined).unwrap();
        assert!(
            own.function
                .as_deref()
                .is_some_and(|f| f.contains("names_own_code_with_offsets_and_build_id")),
            "{frames:?}"
        );
        assert_eq!(own.module.as_deref(), Some(exe));
        assert_eq!(own.offset, Some(raw[0].file_offset));
        assert_eq!(own.build_id, build_id(exe));
        let last = frames.last().unwrap();
        assert_eq!(
            (last.kind, last.function.as_deref(), last.offset),
            ("unknown", None, None),
            "an address in no module"
        );
        let json = serde_json::to_value(own).unwrap();
        assert_eq!(
            json["offset"],
            format!("{:#x}", raw[0].file_offset),
            "offsets are hex strings"
        );
    }
}
