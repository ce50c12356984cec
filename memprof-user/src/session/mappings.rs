//! Where each process's code lies: the kernel's mapping records and `/proc` re-reads keep each
//! process's view of its address space current, so stacks are placed in their objects (and,
//! with `--unwind dwarf`, unwound) while the process still lives.

use memprof_common::{ExecMap, MAP_NO_TABLE};

use super::{Session, procs::Proc};
use crate::{
    ingest::{event, mmaps::MmapWatcher},
    report,
    stacks::{
        StackStore,
        namer::Namer,
        unwind::{self as unwinding, ObjectCache, ProcessUnwinder},
    },
    sys::{
        clock::monotonic_ns,
        maps::{self, Mapping},
    },
};

impl Session {
    /// Keeps the files of the traced process open when they live under another root.
    pub(super) fn pin_initial(&mut self) {
        if let Some(p) = self.procs.get(&self.pid) {
            pin_files(&mut self.namer, p);
        }
    }

    /// Lets the session place frames with the kernel's mapping records (see `mmaps`).
    pub fn watch_mappings(&mut self, watch: MmapWatcher) {
        self.watch = Some(watch);
    }

    /// Applies the kernel's mapping records: before the events that follow them, so code a
    /// process mapped is known even if it is gone before /proc can be read.
    pub(super) fn drain_mappings(&mut self) {
        drain_mappings(
            self.watch.as_mut(),
            &mut self.procs,
            &mut self.pending_maps,
            &mut self.namer,
        );
    }

    /// Registers process `tgid`, with the mapping records that arrived before it.
    pub(super) fn add_proc(&mut self, tgid: u32, p: Proc) {
        let p = self.procs.entry(tgid).or_insert(p);
        if let Some(maps) = self.pending_maps.remove(&tgid) {
            for m in maps {
                apply_mapping(&mut self.namer, p, tgid, m);
            }
        }
    }

    /// Reads a new stack from the kernel and normalizes it while the process is alive.
    ///
    /// The address-space view is re-read when a library was mapped since the last read, or when
    /// a frame falls outside every known mapping. The latter is rate-limited: without frame
    /// pointers deeper frames are often garbage that no re-read would place.
    pub(super) fn learn_stack(&mut self, tgid: u32, key: u64) {
        const REREAD_NS: u64 = 50_000_000;
        let (ips, end) = self.tracer.stack(key);
        if end != 0 {
            self.stack_ends.insert(key, end as u8);
        }
        let now = monotonic_ns();
        // Code mapped after the records were last taken (the ring is read while the process
        // runs on): take them again first.
        if self
            .procs
            .get(&tgid)
            .is_some_and(|p| !StackStore::covered(&p.space, &ips))
        {
            self.drain_mappings();
        }
        let Some(p) = self.procs.get_mut(&tgid) else {
            return;
        };
        let reread = p.space_stale
            || (!StackStore::covered(&p.space, &ips)
                && now.saturating_sub(p.space_read_ns) > REREAD_NS);
        if reread && p.reread(tgid, now) {
            pin_files(&mut self.namer, p);
        }
        // Files under another root are reachable only while the process lives: they were
        // opened, and their debug information found, as they were mapped (`pin_files`).
        self.stacks.insert(key, &ips, &p.space);
    }
}

impl Session {
    /// With `--unwind tables`: tells the kernel where process `tgid`'s executable files lie
    /// and which table each has, building and uploading the tables of files seen for the
    /// first time. Rewritten only when the list changed.
    pub(super) fn update_tables(&mut self, tgid: u32) {
        let Some(tables) = self.tracer.tables.as_mut() else {
            return;
        };
        // The epoch first: code mapped after this read moves it on, and walks meeting that
        // code fall back to stack copies until the next update.
        let epoch = tables.epoch(tgid);
        let Some(p) = self.procs.get_mut(&tgid) else {
            return;
        };
        if self.tables_epoch.get(&tgid).is_some_and(|&e| e != epoch)
            && p.reread(tgid, monotonic_ns())
        {
            pin_files(&mut self.namer, p);
        }
        self.tables_epoch.insert(tgid, epoch);
        let mut maps: Vec<ExecMap> = Vec::new();
        for m in p.space.mappings().iter().filter(|m| m.exec) {
            let Some(id) = m.file_id() else {
                continue;
            };
            // Through the process's own view of the file: it works for files deleted or
            // replaced since, and inside containers.
            let open = || {
                let via = format!("/proc/{tgid}/map_files/{:x}-{:x}", m.start, m.end);
                [via.as_str(), m.path.as_str()]
                    .into_iter()
                    .find_map(open_regular)
            };
            let (module, bias) = self
                .table_files
                .mapping(tables, id, m.start, m.offset, open)
                .unwrap_or((None, 0));
            maps.push(ExecMap {
                start: m.start,
                end: m.end,
                bias,
                module: module.unwrap_or(0),
                flags: if module.is_some() { 0 } else { MAP_NO_TABLE },
            });
        }
        let signature = {
            use std::hash::{Hash as _, Hasher as _};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for m in &maps {
                (m.start, m.end, m.bias, m.module, m.flags).hash(&mut h);
            }
            epoch.hash(&mut h);
            h.finish()
        };
        if self.tables_written.get(&tgid) != Some(&signature) {
            tables.set_process(tgid, &maps, epoch);
            self.tables_written.insert(tgid, signature);
        }
    }
}

/// What unwinding a stack copy touches (fields of `Session`, borrowed apart from the ring
/// buffer the copy lives in).
pub(super) struct Unwinding<'a> {
    pub(super) watch: Option<&'a mut MmapWatcher>,
    pub(super) procs: &'a mut foldhash::HashMap<u32, Proc>,
    pub(super) pending: &'a mut foldhash::HashMap<u32, Vec<Mapping>>,
    pub(super) unwinders: &'a mut foldhash::HashMap<u32, ProcessUnwinder>,
    pub(super) objects: &'a mut ObjectCache,
    pub(super) stacks: &'a mut StackStore,
    pub(super) stats: &'a mut report::UnwindStats,
    pub(super) namer: &'a mut Namer,
}

/// Unwinds one stack copy of process `tgid` (`--unwind dwarf`, or a table walk's fallback) and
/// returns its stack key, storing the stack the first time it is seen, and whether the unwind
/// stopped before the outermost frame.
pub(super) fn unwind_copy(
    u: &mut Unwinding<'_>,
    tgid: u32,
    copy: event::StackCopy<'_>,
) -> (u64, bool) {
    const REREAD_NS: u64 = 50_000_000;
    let now = monotonic_ns();
    if u.procs
        .get(&tgid)
        .is_some_and(|p| p.space.find(copy.ip).is_none())
    {
        drain_mappings(u.watch.as_deref_mut(), u.procs, u.pending, u.namer);
    }
    let p = u.procs.entry(tgid).or_insert_with(|| Proc::discover(tgid));
    if let Some(maps) = u.pending.remove(&tgid) {
        for m in maps {
            apply_mapping(u.namer, p, tgid, m);
        }
    }
    // The caller's code must be in the view of the address space, or its CFI is not found.
    let stale = p.space_stale
        || (p.space.find(copy.ip).is_none() && now.saturating_sub(p.space_read_ns) > REREAD_NS);
    if stale && p.reread(tgid, now) {
        pin_files(u.namer, p);
    }
    let unwinder = u.unwinders.entry(tgid).or_default();
    unwinder.update(&p.space, p.space_gen, u.objects);
    let out = unwinder.unwind(copy.ip, copy.sp, copy.bp, copy.stack);
    u.stats.allocations += 1;
    let key = unwinding::stack_key(&out.frames);
    if !u.stacks.contains(key) {
        u.stacks.insert(key, &out.frames, &p.space);
        u.stats.stacks += 1;
        if out.truncated {
            u.stats.truncated_stacks += 1;
        }
    }
    (key, out.truncated)
}

/// Applies the kernel's mapping records written since the last call (see `Session::watch`).
pub(super) fn drain_mappings(
    watch: Option<&mut MmapWatcher>,
    procs: &mut foldhash::HashMap<u32, Proc>,
    pending: &mut foldhash::HashMap<u32, Vec<Mapping>>,
    namer: &mut Namer,
) {
    const PENDING_MAX: usize = 16384;
    let Some(watch) = watch else {
        return;
    };
    watch.drain(|r| match procs.get_mut(&r.pid) {
        Some(p) => apply_mapping(namer, p, r.pid, r.mapping),
        None => {
            if pending.values().map(Vec::len).sum::<usize>() >= PENDING_MAX {
                pending.clear();
            }
            pending.entry(r.pid).or_default().push(r.mapping);
        }
    });
}

/// Adds a mapping the kernel reported to process `pid`'s view.
pub(super) fn apply_mapping(namer: &mut Namer, p: &mut Proc, pid: u32, mut m: Mapping) {
    if p.root.is_some() {
        m.path = maps::file_named(pid, &m.path, &m.dev, m.inode);
        namer.pin(&m.path);
    } else if let Some(name) = maps::registered(&m.dev, m.inode) {
        // A process under another root, gone before its root could be read: a file another
        // process there mapped before.
        m.path = name;
    }
    p.space.insert(m);
    p.space_gen += 1;
}

/// Keeps the mapped files of a process under another root open: their paths go away with it.
pub(super) fn pin_files(namer: &mut Namer, p: &Proc) {
    if p.root.is_some() {
        for m in p.space.mappings() {
            namer.pin(&m.path);
        }
    }
}

/// `path` opened for reading if it is a regular file: a FIFO or device a process put in a
/// file's place is refused without blocking.
fn open_regular(path: &str) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(maps::reachable(std::path::Path::new(path)))
        .ok()?;
    file.metadata().ok()?.is_file().then_some(file)
}
