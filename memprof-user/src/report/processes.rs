//! Each process's allocations by call site, as the live profiles serve them
//! (`/debug/pprof/heap`, `/debug/pprof/allocs`): made from
//! [`crate::analysis::process_sites`] when a profile is asked for.

use std::{collections::HashMap, sync::Arc};

use crate::{
    analysis::process_sites::{Counts, ProcessGroups},
    stacks::{Frame, SiteId, Sites},
};

/// The key of the `[sites over cap]` sample (see `analysis::process_sites`).
pub const OVER_CAP_KEY: u64 = u64::MAX;

/// One process's samples.
#[derive(Clone, Debug)]
pub struct ProcessSamples {
    pub pid: u32,
    pub comm: String,
    /// Its cgroup v2 path (multi-process traces).
    pub cgroup: Option<String>,
    pub samples: Vec<ProcessSample>,
}

/// One call-site group of one process.
#[derive(Clone, Debug)]
pub struct ProcessSample {
    /// The group across requests (for deltas): site, allocator and kind.
    pub key: u64,
    pub stack: Arc<[Frame]>,
    pub allocator: &'static str,
    pub kind: &'static str,
    /// `alloc_objects`, `alloc_space`, `inuse_objects`, `inuse_space`.
    pub values: [i64; 4],
}

/// What one profile request gets: the selected processes, and the trace's sampling mean (0:
/// every allocation was seen).
#[derive(Clone, Debug, Default)]
pub struct LiveSamples {
    pub processes: Vec<ProcessSamples>,
    pub sample_mean: u64,
    /// Seconds since the trace started.
    pub elapsed_s: f64,
}

/// Frames of sites already looked up for one request, shared by the processes that share a
/// site.
#[derive(Default)]
pub struct FrameCache(HashMap<SiteId, Arc<[Frame]>>);

fn values(c: &Counts) -> [i64; 4] {
    let v = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    [
        v(c.alloc_objects),
        v(c.alloc_bytes),
        v(c.inuse_objects),
        v(c.inuse_bytes),
    ]
}

/// The samples of one process's groups: one per group that allocated something, and one
/// `[sites over cap]` sample when some allocations fell over the cap.
pub fn process_samples(
    groups: &ProcessGroups,
    sites: &Sites,
    cache: &mut FrameCache,
) -> Vec<ProcessSample> {
    let mut out: Vec<ProcessSample> = groups
        .groups
        .iter()
        .filter(|(_, c)| c.alloc_objects > 0)
        .map(|(&(site, func, mmap), c)| ProcessSample {
            key: (u64::from(site.index()) << 32) | (u64::from(func as u32) << 1) | u64::from(mmap),
            stack: cache
                .0
                .entry(site)
                .or_insert_with(|| sites.frames(site).into())
                .clone(),
            allocator: func.name(),
            kind: if mmap { "mmap" } else { "heap" },
            values: values(c),
        })
        .collect();
    if groups.over_cap.alloc_objects > 0 {
        out.push(ProcessSample {
            key: OVER_CAP_KEY,
            stack: Arc::new([Frame {
                function: Some("[sites over cap]".into()),
                ..Frame::unknown()
            }]),
            allocator: "any",
            kind: "any",
            values: values(&groups.over_cap),
        });
    }
    out.sort_unstable_by_key(|s| s.key);
    out
}
