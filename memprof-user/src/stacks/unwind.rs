//! Unwinding user stacks from CFI (`.eh_frame`, `.debug_frame`) for code built without frame
//! pointers (`--unwind dwarf`).
//!
//! The kernel program copies the caller's registers and a window of its stack at each
//! allocator return (`UnwindEvent`); here the window is unwound against the unwind tables of the
//! objects the process maps, with `framehop`. Where an object has no CFI for an address,
//! framehop falls back to the frame pointer. An unwind that stops before the outermost frame
//! (the window ended, no rule applied) ends in [`TRUNCATED`], which outputs show as an unknown
//! frame: nothing is invented past it.

use std::{
    collections::{HashMap, HashSet},
    hash::{Hash as _, Hasher as _},
    ops::Range,
    path::Path,
    sync::Arc,
};

use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use memprof_common::MAX_STACK_DEPTH;
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

use crate::sys::{
    elfcheck::{self, Fit},
    maps::AddressSpace,
    objfile::ObjectFile,
};

/// The address recorded after the last frame of a stack that could not be unwound further.
pub const TRUNCATED: u64 = u64::MAX;

/// The unwinding sections of one object file, shared by every process mapping it.
struct Sections {
    text: Option<(Range<u64>, Arc<[u8]>)>,
    eh_frame: Option<(Range<u64>, Arc<[u8]>)>,
    eh_frame_hdr: Option<(Range<u64>, Arc<[u8]>)>,
    debug_frame: Option<Arc<[u8]>>,
    /// (file offset, vaddr, file size) of each loadable segment: maps file offsets to SVMAs.
    segments: Vec<(u64, u64, u64)>,
}

impl Sections {
    /// The sections of the object at `path`, read in bounded pieces (see [`ObjectFile`]); a
    /// compressed section is inflated only when [`elfcheck`] found every compressed section
    /// within its caps.
    fn read(path: &str) -> Option<Self> {
        let data = ObjectFile::open(Path::new(path)).ok()?;
        let inflate = elfcheck::check(&data).ok()? == Fit::Whole;
        let obj = object::File::parse(&data).ok()?;
        let section = |name: &str| -> Option<(Range<u64>, Arc<[u8]>)> {
            let s = obj.section_by_name(name)?;
            let bytes = match s.compressed_file_range().ok()?.format {
                object::CompressionFormat::None => s.data().ok()?.into(),
                _ if inflate => s.uncompressed_data().ok()?,
                _ => return None,
            };
            Some((s.address()..s.address() + s.size(), Arc::from(&*bytes)))
        };
        Some(Self {
            text: section(".text"),
            eh_frame: section(".eh_frame"),
            eh_frame_hdr: section(".eh_frame_hdr"),
            debug_frame: section(".debug_frame").map(|(_, d)| d),
            segments: obj
                .segments()
                .map(|s| {
                    let (off, size) = s.file_range();
                    (off, s.address(), size)
                })
                .collect(),
        })
    }

    /// The object's stated address of file offset `offset`.
    fn svma_of(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|(off, _, size)| (*off..off + size.max(&1)).contains(&offset))
            .map(|(off, vaddr, _)| vaddr + (offset - off))
    }

    fn info(&self) -> ExplicitModuleSectionInfo<Arc<[u8]>> {
        ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: self.text.as_ref().map(|(r, _)| r.clone()),
            text: self.text.as_ref().map(|(_, d)| d.clone()),
            eh_frame_svma: self.eh_frame.as_ref().map(|(r, _)| r.clone()),
            eh_frame: self.eh_frame.as_ref().map(|(_, d)| d.clone()),
            eh_frame_hdr_svma: self.eh_frame_hdr.as_ref().map(|(r, _)| r.clone()),
            eh_frame_hdr: self.eh_frame_hdr.as_ref().map(|(_, d)| d.clone()),
            debug_frame: self.debug_frame.clone(),
            ..Default::default()
        }
    }
}

/// Objects read once per trace, by path.
#[derive(Default)]
pub struct ObjectCache {
    objects: HashMap<String, Option<Arc<Sections>>>,
}

impl ObjectCache {
    /// Objects read (or found unreadable).
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    fn get(&mut self, path: &str) -> Option<Arc<Sections>> {
        self.objects
            .entry(path.to_string())
            .or_insert_with(|| Sections::read(path).map(Arc::new))
            .clone()
    }
}

/// Unwinding state of one process: its modules (as mapped) and framehop's rule cache.
#[derive(Default)]
pub struct ProcessUnwinder {
    unwinder: UnwinderX86_64<Arc<[u8]>>,
    cache: CacheX86_64,
    /// (path, lowest address) of the modules added.
    added: HashSet<(String, u64)>,
    /// The address-space generation last looked at (see `Proc::space_gen`).
    generation: Option<u64>,
}

/// What one unwind produced.
pub struct Unwound {
    /// Instruction pointer then return addresses, innermost first; ends in [`TRUNCATED`] when
    /// the unwind stopped early.
    pub frames: Vec<u64>,
    pub truncated: bool,
}

impl ProcessUnwinder {
    /// Adds the objects of `space` not added yet; a no-op while `generation` (bumped at each
    /// change of the space) stays the same.
    pub fn update(&mut self, space: &AddressSpace, generation: u64, objects: &mut ObjectCache) {
        if self.generation == Some(generation) {
            return;
        }
        self.generation = Some(generation);
        // Each object's mappings, lowest first.
        let mut spans: HashMap<&str, (u64, u64, u64)> = HashMap::new();
        for m in space.mappings() {
            let e = spans.entry(&m.path).or_insert((m.start, m.end, m.offset));
            if m.start < e.0 {
                *e = (m.start, e.1, m.offset);
            }
            e.1 = e.1.max(m.end);
        }
        for (path, (start, end, offset)) in spans {
            if !self.added.insert((path.to_string(), start)) {
                continue;
            }
            let Some(sections) = objects.get(path) else {
                continue;
            };
            let Some(svma) = sections.svma_of(offset) else {
                continue;
            };
            let bias = start.wrapping_sub(svma);
            self.unwinder.add_module(Module::new(
                path.to_string(),
                start..end,
                bias,
                sections.info(),
            ));
        }
    }

    /// Unwinds from the caller's registers over the copied `stack` (which starts at `sp`).
    pub fn unwind(&mut self, ip: u64, sp: u64, bp: u64, stack: &[u8]) -> Unwound {
        let mut read = |addr: u64| -> Result<u64, ()> {
            let at = addr.checked_sub(sp).ok_or(())? as usize;
            let bytes = stack.get(at..at.checked_add(8).ok_or(())?).ok_or(())?;
            Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| ())?))
        };
        let mut frames = Vec::new();
        let mut truncated = false;
        let mut iter = self.unwinder.iter_frames(
            ip,
            UnwindRegsX86_64::new(ip, sp, bp),
            &mut self.cache,
            &mut read,
        );
        loop {
            if frames.len() >= MAX_STACK_DEPTH {
                break;
            }
            match iter.next() {
                Ok(Some(FrameAddress::InstructionPointer(a))) => frames.push(a),
                Ok(Some(FrameAddress::ReturnAddress(a))) => frames.push(a.get()),
                Ok(None) => break,
                Err(_) => {
                    truncated = true;
                    break;
                }
            }
        }
        if truncated {
            frames.push(TRUNCATED);
        }
        Unwound { frames, truncated }
    }
}

/// The key of an unwound stack: a hash of its frames with the top bit set, so it never equals a
/// key the kernel's frame-pointer stacks use within one trace (those are hashes too, but the
/// two never mix in one trace) nor `NO_STACK`.
pub fn stack_key(frames: &[u64]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    frames.hash(&mut h);
    h.finish() | (1 << 63)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unwinds this test's own stack: copy it like the kernel program does and check that the
    /// frames include the test function's callers.
    #[test]
    #[inline(never)]
    fn unwinds_own_stack_from_a_copy() {
        let space = AddressSpace::read(std::process::id()).unwrap();
        let mut objects = ObjectCache::default();
        let mut u = ProcessUnwinder::default();
        u.update(&space, 0, &mut objects);
        let (ip, sp, bp): (u64, u64, u64);
        // SAFETY: reads three registers.
        unsafe {
            std::arch::asm!(
                "lea {ip}, [rip]",
                "mov {sp}, rsp",
                "mov {bp}, rbp",
                ip = out(reg) ip,
                sp = out(reg) sp,
                bp = out(reg) bp,
            );
        }
        // Copy at most 16 KiB from sp up, within the mapping that holds the stack.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let top = maps
            .lines()
            .filter_map(|l| {
                let (start, end) = l.split_whitespace().next()?.split_once('-')?;
                Some((
                    u64::from_str_radix(start, 16).ok()?,
                    u64::from_str_radix(end, 16).ok()?,
                ))
            })
            .find(|(start, end)| (*start..*end).contains(&sp))
            .map(|(_, end)| end)
            .unwrap();
        let len = (top - sp).min(16384) as usize;
        // SAFETY: `len` bytes from sp up lie in this thread's mapped stack.
        let stack = unsafe { std::slice::from_raw_parts(sp as *const u8, len) }.to_vec();
        let out = u.unwind(ip, sp, bp, &stack);
        assert!(out.frames.len() >= 3, "{:x?}", out.frames);
        // Every frame lies in a mapped object (or is the truncation mark).
        for f in &out.frames {
            assert!(
                *f == TRUNCATED || space.find(*f).is_some(),
                "frame {f:#x} outside every mapping: {:x?}",
                out.frames
            );
        }
    }

    #[test]
    fn keys_have_the_top_bit() {
        assert_ne!(stack_key(&[1, 2, 3]) & (1 << 63), 0);
        assert_ne!(stack_key(&[1, 2, 3]), stack_key(&[1, 2, 4]));
    }
}
