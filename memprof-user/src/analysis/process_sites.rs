//! Each process's allocations by call-site group, for the profiles the live endpoints serve
//! (`/debug/pprof/heap?pid=`): what it allocated and what it still holds, per group.
//!
//! Memory stays bounded: a process keeps at most [`SITES_PER_PROCESS`] groups, the first it
//! allocated at. Allocations at further groups fall over the cap: they are added to the
//! process's `over_cap` counts (served as one `[sites over cap]` sample, so a profile still adds
//! up to the process's totals) and counted in [`ProcessSites::over_cap_allocs`]. A group once
//! kept stays kept until the process is forgotten, so a block's free always lands where its
//! allocation did.

use foldhash::HashMap;

use crate::{analysis::tracking::GroupKey, table::Change};

/// Call-site groups kept per process.
pub const SITES_PER_PROCESS: usize = 4096;

/// What one group of one process allocated and still holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub alloc_objects: u64,
    pub alloc_bytes: u64,
    pub inuse_objects: u64,
    pub inuse_bytes: u64,
}

impl Counts {
    fn apply(&mut self, change: &Change) {
        match *change {
            Change::Alloc { block, count, .. } => {
                let n = u64::from(count);
                self.alloc_objects += n;
                self.alloc_bytes += block.size.saturating_mul(n);
                self.inuse_objects += n;
                self.inuse_bytes += block.size.saturating_mul(n);
            }
            Change::Free {
                block,
                bytes,
                whole,
                count,
                ..
            } => {
                self.inuse_bytes = self.inuse_bytes.saturating_sub(bytes);
                if whole {
                    // A block standing for `count` (sampling) goes whole; a mapping that lost
                    // its last part is one object.
                    let n = if bytes == block.size.saturating_mul(u64::from(count)) {
                        u64::from(count)
                    } else {
                        1
                    };
                    self.inuse_objects = self.inuse_objects.saturating_sub(n);
                }
            }
        }
    }
}

/// One process's groups.
#[derive(Debug, Default)]
pub struct ProcessGroups {
    pub groups: HashMap<GroupKey, Counts>,
    /// What fell over the cap, summed.
    pub over_cap: Counts,
}

/// Every process's groups.
#[derive(Debug)]
pub struct ProcessSites {
    cap: usize,
    processes: HashMap<u32, ProcessGroups>,
    over_cap_allocs: u64,
}

impl Default for ProcessSites {
    fn default() -> Self {
        Self::with_cap(SITES_PER_PROCESS)
    }
}

impl ProcessSites {
    /// Keeps at most `cap` groups per process.
    pub fn with_cap(cap: usize) -> Self {
        Self {
            cap,
            processes: HashMap::default(),
            over_cap_allocs: 0,
        }
    }

    /// Records one table change of process `pid`, of a block allocated at `key`.
    pub fn on_change(&mut self, pid: u32, change: &Change, key: GroupKey) {
        let p = self.processes.entry(pid).or_default();
        let alloc = matches!(change, Change::Alloc { .. });
        let kept = p.groups.contains_key(&key) || (alloc && p.groups.len() < self.cap);
        let counts = match kept {
            true => p.groups.entry(key).or_default(),
            false => {
                if let Change::Alloc { count, .. } = change {
                    self.over_cap_allocs += u64::from(*count);
                }
                &mut p.over_cap
            }
        };
        counts.apply(change);
    }

    /// Forgets process `pid` (no longer reported).
    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// Processes with groups kept, and their groups in all.
    pub fn sizes(&self) -> (usize, usize) {
        (
            self.processes.len(),
            self.processes.values().map(|p| p.groups.len()).sum(),
        )
    }

    /// The groups of process `pid`.
    pub fn process(&self, pid: u32) -> Option<&ProcessGroups> {
        self.processes.get(&pid)
    }

    /// Allocations (each sampled block counting as those it stands for) that fell over a
    /// process's cap, over the trace.
    pub fn over_cap_allocs(&self) -> u64 {
        self.over_cap_allocs
    }
}

#[cfg(test)]
mod tests {
    use memprof_common::AllocFn;

    use super::*;
    use crate::{stacks::SiteId, table::LiveAlloc};

    fn block(size: u64, stack: u64) -> LiveAlloc {
        LiveAlloc {
            size,
            ts_ns: 1,
            stack,
            func: AllocFn::Malloc,
            chain: 0,
        }
    }

    fn alloc(size: u64) -> Change {
        Change::Alloc {
            block: block(size, 1),
            tid: 1,
            mmap: false,
            count: 1,
        }
    }

    fn free(size: u64) -> Change {
        Change::Free {
            block: block(size, 1),
            bytes: size,
            whole: true,
            tid: 1,
            ts_ns: 2,
            mmap: false,
            count: 1,
        }
    }

    fn key(n: u32) -> GroupKey {
        (SiteId::new(n), AllocFn::Malloc, false)
    }

    #[test]
    fn groups_beyond_the_cap_are_summed_and_counted() {
        let mut s = ProcessSites::with_cap(2);
        for n in 0..5 {
            s.on_change(7, &alloc(100 + u64::from(n)), key(n));
        }
        // A kept group's free lands in it; a free at a group over the cap in over_cap.
        s.on_change(7, &free(100), key(0));
        s.on_change(7, &free(104), key(4));
        let p = s.process(7).unwrap();
        assert_eq!(p.groups.len(), 2);
        assert_eq!(
            p.groups[&key(0)],
            Counts {
                alloc_objects: 1,
                alloc_bytes: 100,
                inuse_objects: 0,
                inuse_bytes: 0
            }
        );
        assert_eq!(p.groups[&key(1)].inuse_bytes, 101);
        assert_eq!(
            p.over_cap,
            Counts {
                alloc_objects: 3,
                alloc_bytes: 102 + 103 + 104,
                inuse_objects: 2,
                inuse_bytes: 102 + 103
            }
        );
        assert_eq!(s.over_cap_allocs(), 3);
        // Another process has a cap of its own.
        s.on_change(8, &alloc(1), key(3));
        assert_eq!(s.process(8).unwrap().groups.len(), 1);
        s.forget(7);
        assert!(s.process(7).is_none());
        assert_eq!(s.over_cap_allocs(), 3, "the count is over the trace");
    }

    #[test]
    fn sampled_blocks_and_partial_unmaps() {
        let mut s = ProcessSites::with_cap(4);
        // A sampled block standing for 3 allocations, freed whole.
        let b = block(1000, 1);
        let sampled = |free: bool| {
            if free {
                Change::Free {
                    block: b,
                    bytes: 3000,
                    whole: true,
                    tid: 1,
                    ts_ns: 2,
                    mmap: false,
                    count: 3,
                }
            } else {
                Change::Alloc {
                    block: b,
                    tid: 1,
                    mmap: false,
                    count: 3,
                }
            }
        };
        s.on_change(1, &sampled(false), key(0));
        assert_eq!(s.process(1).unwrap().groups[&key(0)].inuse_objects, 3);
        s.on_change(1, &sampled(true), key(0));
        let c = s.process(1).unwrap().groups[&key(0)];
        assert_eq!((c.alloc_objects, c.alloc_bytes), (3, 3000));
        assert_eq!((c.inuse_objects, c.inuse_bytes), (0, 0));
        // A 3000-byte mapping loses 1000 bytes, then the rest.
        let m = block(3000, 2);
        s.on_change(
            1,
            &Change::Alloc {
                block: m,
                tid: 1,
                mmap: true,
                count: 1,
            },
            key(1),
        );
        for (bytes, whole, left) in [(1000, false, (1, 2000)), (2000, true, (0, 0))] {
            s.on_change(
                1,
                &Change::Free {
                    block: m,
                    bytes,
                    whole,
                    tid: 1,
                    ts_ns: 2,
                    mmap: true,
                    count: 1,
                },
                key(1),
            );
            let c = s.process(1).unwrap().groups[&key(1)];
            assert_eq!((c.inuse_objects, c.inuse_bytes), left);
        }
    }
}
