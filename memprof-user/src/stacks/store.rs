//! Interned call stacks, normalized to (module, file offset) when first seen.

use std::collections::HashMap;

use super::python::PyFrame;
use crate::sys::maps::AddressSpace;

/// One frame of a stored stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawFrame {
    /// The absolute address the kernel recorded (a return address).
    pub addr: u64,
    /// Index into [`StackStore::modules`], or `None` when no file mapping held the address.
    pub module: Option<u32>,
    /// Offset of `addr` in the module file.
    pub file_offset: u64,
    /// A Python frame: index into [`StackStore::python_frames`] (`addr` and `module` unused).
    pub python: Option<u32>,
}

/// The module of kernel frames (`--kernel` stacks start with the kernel's frames): their
/// `file_offset` is their address, which `/proc/kallsyms` names.
pub const KERNEL_MODULE: &str = "[kernel]";

/// How many of `ips` are kernel frames: the leading ones in the kernel's half of the address
/// space (x86-64). Only a `--kernel` stack starts in the kernel; an address there further out
/// is a user stack's garbage, not kernel code.
pub fn kernel_frames(ips: &[u64]) -> usize {
    ips.iter()
        .take_while(|ip| **ip >= 0xffff_8000_0000_0000)
        .count()
}

#[derive(Debug, Default)]
pub struct StackStore {
    stacks: HashMap<u64, Vec<RawFrame>>,
    modules: Vec<String>,
    module_ids: HashMap<String, u32>,
    python_frames: Vec<PyFrame>,
    python_ids: HashMap<PyFrame, u32>,
}

impl StackStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.stacks.contains_key(&id)
    }

    /// Forgets stack `id` (no block of a process still reported has it).
    pub fn remove(&mut self, id: u64) {
        self.stacks.remove(&id);
    }

    /// Whether every address of `ips` lies in a file mapping of `space` (or in the kernel).
    pub fn covered(space: &AddressSpace, ips: &[u64]) -> bool {
        ips[kernel_frames(ips)..]
            .iter()
            .all(|ip| space.find(*ip).is_some())
    }

    /// Stores stack `id` with frames `ips` (innermost first), normalized against `space`.
    pub fn insert(&mut self, id: u64, ips: &[u64], space: &AddressSpace) {
        let kernel = kernel_frames(ips);
        let frames = ips
            .iter()
            .enumerate()
            .map(|(i, &addr)| match space.find(addr) {
                _ if i < kernel => RawFrame {
                    addr,
                    module: Some(self.intern(KERNEL_MODULE)),
                    file_offset: addr,
                    python: None,
                },
                Some(m) => RawFrame {
                    addr,
                    module: Some(self.intern(&m.path)),
                    file_offset: addr - m.start + m.offset,
                    python: None,
                },
                None => RawFrame {
                    addr,
                    module: None,
                    file_offset: 0,
                    python: None,
                },
            })
            .collect();
        self.stacks.insert(id, frames);
    }

    /// Stores stack `id`: the native `frames` of another stack with blocks of Python frames
    /// (each innermost first) inserted, block `k` before native frame `places[k]` (in order;
    /// blocks at one place keep their order).
    pub fn insert_mixed(
        &mut self,
        id: u64,
        frames: &[RawFrame],
        blocks: &[Vec<PyFrame>],
        places: &[usize],
    ) {
        let mut out = Vec::with_capacity(frames.len() + blocks.iter().map(Vec::len).sum::<usize>());
        let mut next = 0;
        for (block, &at) in blocks.iter().zip(places) {
            let at = at.clamp(next, frames.len());
            out.extend_from_slice(&frames[next..at]);
            next = at;
            self.push_python(&mut out, block);
        }
        out.extend_from_slice(&frames[next..]);
        self.stacks.insert(id, out);
    }

    /// Appends Python frames `python` to `out`, interning them.
    fn push_python(&mut self, out: &mut Vec<RawFrame>, python: &[PyFrame]) {
        for f in python {
            let index = match self.python_ids.get(f) {
                Some(i) => *i,
                None => {
                    let i = self.python_frames.len() as u32;
                    self.python_frames.push(f.clone());
                    self.python_ids.insert(f.clone(), i);
                    i
                }
            };
            out.push(RawFrame {
                addr: 0,
                module: None,
                file_offset: 0,
                python: Some(index),
            });
        }
    }

    /// Python frames referred to by [`RawFrame::python`].
    pub fn python_frames(&self) -> &[PyFrame] {
        &self.python_frames
    }

    fn intern(&mut self, path: &str) -> u32 {
        if let Some(id) = self.module_ids.get(path) {
            return *id;
        }
        let id = self.modules.len() as u32;
        self.modules.push(path.to_string());
        self.module_ids.insert(path.to_string(), id);
        id
    }

    pub fn get(&self, id: u64) -> Option<&[RawFrame]> {
        self.stacks.get(&id).map(Vec::as_slice)
    }

    pub fn modules(&self) -> &[String] {
        &self.modules
    }

    pub fn len(&self) -> usize {
        self.stacks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stacks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_to_file_offsets() {
        let space = AddressSpace::parse(
            "1000-2000 r-xp 00003000 08:01 9 /bin/app\n5000-6000 r-xp 00000000 08:01 10 /lib/x.so\n",
        );
        let mut store = StackStore::new();
        store.insert(4, &[0x1010, 0x5020, 0x9999], &space);
        let frames = store.get(4).unwrap();
        assert_eq!(frames[0].file_offset, 0x3010);
        assert_eq!(
            store.modules()[frames[0].module.unwrap() as usize],
            "/bin/app"
        );
        assert_eq!(frames[1].file_offset, 0x20);
        assert_eq!(frames[2].module, None);
        assert!(!StackStore::covered(&space, &[0x1010, 0x9999]));
        assert!(StackStore::covered(&space, &[0x1010, 0x5fff]));
        // Kernel frames (`--kernel`) are their addresses in the kernel's module.
        store.insert(5, &[0xffff_ffff_8100_0010, 0x1010], &space);
        let frames = store.get(5).unwrap();
        assert_eq!(
            store.modules()[frames[0].module.unwrap() as usize],
            KERNEL_MODULE
        );
        assert_eq!(frames[0].file_offset, 0xffff_ffff_8100_0010);
        assert!(StackStore::covered(
            &space,
            &[0xffff_ffff_8100_0010, 0x1010]
        ));
    }
}
