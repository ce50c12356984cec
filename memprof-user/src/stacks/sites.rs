//! Call sites: symbolized stacks, interned, so that every output groups by what a person reads
//! and not by the kernel's stack key (a hash of return addresses, which differs for two calls
//! on one line, and for each garbage frame an unstable unwind leaves).
//!
//! Each raw stack key is mapped once, when its frames have been named ([`Sites::intern`]), to
//! the site of its symbolized frames; the mapping never changes afterwards, so the allocations
//! and frees of one block always land in the same site. A key whose stack was not stored, or
//! is empty, maps to [`SiteId::NONE`]. Two frames are the same
//! when they read the same ([`FrameKey`]): a named frame by module, function, file, line and
//! whether it was inlined (its return address does not matter); an unnamed native frame by
//! module and file offset; a Python frame by function, file and line; every `unknown` frame is
//! the same. A site's frames are kept once however many raw stacks map to it.

use std::{cmp::Ordering, collections::HashMap};

use memprof_common::NO_STACK;

use super::Frame;

/// A call site; [`SiteId::NONE`] for allocations without a stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteId(u32);

impl SiteId {
    /// No stack (not captured, or none stored).
    pub const NONE: SiteId = SiteId(u32::MAX);

    /// The site's number (stable for the trace: a site is never renumbered).
    pub fn index(self) -> u32 {
        self.0
    }

    /// Site number `n`, for tests that need sites without stacks.
    #[cfg(test)]
    pub(crate) const fn new(n: u32) -> SiteId {
        SiteId(n)
    }
}

/// What makes two frames one (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FrameKey {
    kind: &'static str,
    module: Option<String>,
    function: Option<String>,
    file: Option<String>,
    line: Option<u32>,
    inlined: bool,
    offset: Option<u64>,
}

impl FrameKey {
    fn of(f: &Frame) -> Self {
        let named = f.function.is_some() || f.kind == "python";
        match f.kind {
            "unknown" => Self {
                kind: "unknown",
                module: None,
                function: None,
                file: None,
                line: None,
                inlined: false,
                offset: None,
            },
            _ => Self {
                kind: f.kind,
                module: f.module.clone(),
                function: f.function.clone(),
                file: f.file.clone(),
                line: f.line,
                inlined: f.inlined,
                offset: if named { None } else { f.offset },
            },
        }
    }
}

#[derive(Debug, Default)]
pub struct Sites {
    /// Raw stack key to site.
    by_stack: foldhash::HashMap<u64, SiteId>,
    /// Frames (indices into `frames`) to site, and back.
    by_frames: HashMap<Box<[u32]>, SiteId>,
    sites: Vec<Box<[u32]>>,
    /// Distinct frames, each with the lowest offset seen for it.
    frames: Vec<Frame>,
    frame_ids: HashMap<FrameKey, u32>,
}

impl Sites {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps raw stack `stack` to the site of `frames` (innermost first), interning it.
    pub fn intern(&mut self, stack: u64, frames: &[Frame]) -> SiteId {
        let site = if frames.is_empty() {
            SiteId::NONE
        } else {
            let ids: Box<[u32]> = frames.iter().map(|f| self.frame_id(f)).collect();
            match self.by_frames.get(&ids) {
                Some(site) => *site,
                None => {
                    let site = SiteId(self.sites.len() as u32);
                    self.sites.push(ids.clone());
                    self.by_frames.insert(ids, site);
                    site
                }
            }
        };
        if stack != NO_STACK {
            self.by_stack.insert(stack, site);
        }
        site
    }

    /// Forgets which site raw stack `stack` maps to (no block of a process still reported has
    /// it); the site itself stays.
    pub fn forget_stack(&mut self, stack: u64) {
        self.by_stack.remove(&stack);
    }

    fn frame_id(&mut self, f: &Frame) -> u32 {
        let key = FrameKey::of(f);
        if let Some(&id) = self.frame_ids.get(&key) {
            let kept = &mut self.frames[id as usize];
            if let (Some(new), Some(old)) = (f.offset, kept.offset)
                && new < old
            {
                kept.offset = Some(new);
            }
            return id;
        }
        let id = self.frames.len() as u32;
        self.frames.push(match f.kind {
            "unknown" => Frame::unknown(),
            _ => f.clone(),
        });
        self.frame_ids.insert(key, id);
        id
    }

    /// The site raw stack `stack` was mapped to ([`SiteId::NONE`] when it never was).
    pub fn site_of(&self, stack: u64) -> SiteId {
        self.get(stack).unwrap_or(SiteId::NONE)
    }

    /// The site raw stack `stack` was mapped to, if it was (`NO_STACK` always is).
    pub fn get(&self, stack: u64) -> Option<SiteId> {
        match stack {
            NO_STACK => Some(SiteId::NONE),
            _ => self.by_stack.get(&stack).copied(),
        }
    }

    fn ids(&self, site: SiteId) -> &[u32] {
        self.sites.get(site.0 as usize).map_or(&[], |ids| &ids[..])
    }

    /// A site's frames, innermost first (none for [`SiteId::NONE`]).
    pub fn frames(&self, site: SiteId) -> Vec<Frame> {
        self.ids(site)
            .iter()
            .map(|&i| self.frames[i as usize].clone())
            .collect()
    }

    /// How many of a site's frames have no name (see `Report::unknown_frames`), and how many
    /// frames it has.
    pub fn unnamed(&self, site: SiteId) -> (usize, usize) {
        let ids = self.ids(site);
        let unnamed = ids
            .iter()
            .filter(|&&i| self.frames[i as usize].function.is_none())
            .count();
        (unnamed, ids.len())
    }

    /// An order of sites that is the same in every run: by their frames (function, module,
    /// file, line, offset), innermost first.
    pub fn order(&self, a: SiteId, b: SiteId) -> Ordering {
        let key = |i: &u32| {
            let f = &self.frames[*i as usize];
            (
                &f.function,
                &f.module,
                &f.file,
                f.line,
                f.offset,
                f.kind,
                f.inlined,
            )
        };
        self.ids(a).iter().map(key).cmp(self.ids(b).iter().map(key))
    }

    /// Distinct frames, and raw stack keys mapped to a site.
    pub fn sizes(&self) -> (usize, usize) {
        (self.frames.len(), self.by_stack.len())
    }

    /// Number of distinct sites.
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A native frame of `/opt/app`.
    pub(crate) fn native(function: Option<&str>, line: Option<u32>, offset: u64) -> Frame {
        Frame {
            function: function.map(str::to_owned),
            module: Some("/opt/app".into()),
            file: line.map(|_| "/src/app.c".into()),
            line,
            offset: Some(offset),
            build_id: Some("beef".into()),
            inlined: false,
            kind: "native",
        }
    }

    #[test]
    fn same_line_from_two_return_addresses_is_one_site() {
        let mut sites = Sites::new();
        let main = native(Some("main"), Some(20), 0x1200);
        let a = sites.intern(11, &[native(Some("twice"), Some(8), 0x1213), main.clone()]);
        let b = sites.intern(12, &[native(Some("twice"), Some(8), 0x120e), main.clone()]);
        assert_eq!(a, b);
        assert_eq!(sites.len(), 1);
        assert_eq!((sites.site_of(11), sites.site_of(12)), (a, a));
        // The lowest return address stands for the line.
        assert_eq!(sites.frames(a)[0].offset, Some(0x120e));
        // Another line, or the same function inlined, is another site.
        let c = sites.intern(13, &[native(Some("twice"), Some(9), 0x1220), main.clone()]);
        let mut inlined = native(Some("twice"), Some(8), 0x1213);
        inlined.inlined = true;
        let d = sites.intern(14, &[inlined, main.clone()]);
        assert!(c != a && d != a && c != d);
    }

    #[test]
    fn unnamed_frames_keep_their_offsets_and_unknown_frames_merge() {
        let mut sites = Sites::new();
        let a = sites.intern(1, &[native(None, None, 0x10), Frame::unknown()]);
        let b = sites.intern(2, &[native(None, None, 0x20), Frame::unknown()]);
        assert_ne!(a, b, "unnamed frames differ by offset");
        let mut garbage = Frame::unknown();
        garbage.offset = Some(0x7fff_0000);
        let c = sites.intern(3, &[native(None, None, 0x10), garbage]);
        assert_eq!(c, a, "every unknown frame is the same");
        assert_eq!(sites.frames(c)[1], Frame::unknown());
        assert_eq!(sites.unnamed(a), (2, 2));
    }

    #[test]
    fn empty_and_missing_stacks_have_no_site() {
        let mut sites = Sites::new();
        assert_eq!(sites.intern(5, &[]), SiteId::NONE);
        assert_eq!(sites.site_of(5), SiteId::NONE);
        assert_eq!(sites.site_of(6), SiteId::NONE, "never learned");
        assert_eq!(sites.get(6), None);
        assert_eq!(sites.get(5), Some(SiteId::NONE));
        assert_eq!(sites.get(NO_STACK), Some(SiteId::NONE));
        assert!(sites.frames(SiteId::NONE).is_empty());
        assert!(sites.is_empty());
    }

    #[test]
    fn order_is_by_frames() {
        let mut sites = Sites::new();
        let b = sites.intern(1, &[native(Some("b"), None, 1)]);
        let a = sites.intern(2, &[native(Some("a"), None, 2)]);
        assert_eq!(sites.order(a, b), Ordering::Less);
        assert_eq!(sites.order(SiteId::NONE, a), Ordering::Less);
        assert_eq!(sites.order(b, b), Ordering::Equal);
    }
}
