//! Symbolization of normalized frames with blazesym: function, module, and file:line where the
//! module carries debug information. Results are cached per (module, offset); a frame that cannot
//! be named keeps `function: null` (outputs count them).

use std::collections::HashMap;

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer as Blaze,
    source::{Elf, Source},
};
use serde::Serialize;

use super::{RawFrame, StackStore};

/// A frame as outputs show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Frame {
    pub function: Option<String>,
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// The absolute address, as `0x...`.
    pub addr: String,
    /// `native` (machine code in a mapped object), `python` (a Python function), or `unknown`
    /// (an address in no mapped object, or where unwinding stopped: see `unwind::TRUNCATED`).
    pub kind: &'static str,
}

#[derive(Clone, Debug)]
struct Resolved {
    function: Option<String>,
    file: Option<String>,
    line: Option<u32>,
}

pub struct Symbolizer {
    blaze: Blaze,
    cache: HashMap<(u32, u64), Resolved>,
    /// Files kept open by the path stacks name them with, for paths that stop working when
    /// their process exits (`/proc/PID/root/...` of a process under another root).
    pinned: HashMap<String, std::fs::File>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Self {
            blaze: Blaze::new(),
            cache: HashMap::new(),
            pinned: HashMap::new(),
        }
    }

    /// Keeps `path` open, so that frames in it can be named after it stops resolving.
    pub fn pin(&mut self, path: &str) {
        if !self.pinned.contains_key(path)
            && let Ok(file) = std::fs::File::open(path)
        {
            self.pinned.insert(path.to_string(), file);
        }
    }

    /// Symbolizes a stored stack.
    pub fn frames(&mut self, store: &StackStore, frames: &[RawFrame]) -> Vec<Frame> {
        self.prepare(store, frames);
        frames
            .iter()
            .map(|f| {
                if let Some(py) = f.python.and_then(|i| store.python_frames().get(i as usize)) {
                    let known = |s: &String| (!s.is_empty()).then(|| s.clone());
                    return Frame {
                        function: known(&py.function),
                        module: None,
                        file: known(&py.file),
                        line: py.line,
                        addr: "0x0".to_string(),
                        kind: "python",
                    };
                }
                let module = f.module.map(|m| store.modules()[m as usize].clone());
                let r = f
                    .module
                    .and_then(|m| self.cache.get(&(m, lookup_offset(f))));
                Frame {
                    kind: if module.is_some() {
                        "native"
                    } else {
                        "unknown"
                    },
                    function: r.and_then(|r| r.function.clone()),
                    module,
                    file: r.and_then(|r| r.file.clone()),
                    line: r.and_then(|r| r.line),
                    addr: format!("{:#x}", f.addr),
                }
            })
            .collect()
    }

    /// Resolves, one batch per module, the frames not yet in the cache.
    fn prepare(&mut self, store: &StackStore, frames: &[RawFrame]) {
        let mut todo: HashMap<u32, Vec<u64>> = HashMap::new();
        for f in frames {
            if let Some(m) = f.module {
                let off = lookup_offset(f);
                if !self.cache.contains_key(&(m, off)) {
                    todo.entry(m).or_default().push(off);
                }
            }
        }
        for (module, mut offsets) in todo {
            offsets.sort_unstable();
            offsets.dedup();
            let path = &store.modules()[module as usize];
            let src = match self.pinned.get(path) {
                Some(file) => {
                    use std::os::fd::AsRawFd as _;
                    Source::Elf(Elf::new(format!("/proc/self/fd/{}", file.as_raw_fd())))
                }
                None => Source::Elf(Elf::new(path)),
            };
            let results = self
                .blaze
                .symbolize(&src, Input::FileOffset(&offsets))
                .unwrap_or_default();
            for (i, off) in offsets.iter().enumerate() {
                let resolved = match results.get(i) {
                    Some(Symbolized::Sym(sym)) => {
                        let (file, line) = sym
                            .code_info
                            .as_ref()
                            .map(|ci| (Some(ci.to_path().display().to_string()), ci.line))
                            .unwrap_or((None, None));
                        Resolved {
                            function: Some(sym.name.to_string()),
                            file,
                            line,
                        }
                    }
                    _ => Resolved {
                        function: None,
                        file: None,
                        line: None,
                    },
                };
                self.cache.insert((module, *off), resolved);
            }
        }
    }
}

/// Every recorded frame is a return address: look up the byte before it, which lies in the call
/// instruction, so a call at the very end of a function is not attributed to the next one.
fn lookup_offset(f: &RawFrame) -> u64 {
    f.file_offset.saturating_sub(1)
}
