//! Analytics state kept while tracing, fed by the table's changes: per call-stack group
//! behaviour and outstanding-bytes series, the process's series, and phases (functions named by
//! `--phase`, and time marks sent with `memprof mark`).

use foldhash::HashMap;

use memprof_common::AllocFn;
use serde::Serialize;

use crate::{
    analysis::{
        behaviour::StackStats,
        growth::{self, Activity, Growth},
        series::{Series, least_squares},
    },
    stacks::SiteId,
    table::Change,
};

/// A call-site group: the site (symbolized stack, see `stacks::sites`), allocator, whether it is
/// an anonymous mapping.
pub type GroupKey = (SiteId, AllocFn, bool);

/// Points kept per series before it halves its resolution.
const SERIES_CAP: usize = 240;

#[derive(Debug)]
pub struct GroupState {
    pub stats: StackStats,
    pub series: Series,
}

/// One phase's accounting.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PhaseReport {
    pub name: String,
    /// `function` (active while a thread is inside it) or `mark` (from its mark to the next).
    pub kind: &'static str,
    pub allocs: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
    pub bytes_freed: u64,
    /// Bytes allocated minus bytes freed inside the phase.
    pub net_bytes: i64,
    /// Highest running `net_bytes` inside the phase.
    pub peak_net_bytes: i64,
    /// Highest process outstanding heap bytes while the phase was active (never the global
    /// peak unless the phase held it).
    pub peak_outstanding_bytes: u64,
    /// Function phases: calls seen. Marks: 1.
    pub entries: u64,
    /// Marks: seconds since the trace started when the phase began and ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_s: Option<f64>,
}

impl PhaseReport {
    fn count(&mut self, change: &Change, outstanding: u64) {
        match *change {
            Change::Alloc { block, count, .. } => {
                let bytes = block.size * u64::from(count);
                self.allocs += u64::from(count);
                self.bytes_allocated += bytes;
                self.net_bytes += bytes as i64;
            }
            Change::Free {
                bytes,
                whole,
                count,
                ..
            } => {
                self.frees += u64::from(whole) * u64::from(count);
                self.bytes_freed += bytes;
                self.net_bytes -= bytes as i64;
            }
        }
        self.peak_net_bytes = self.peak_net_bytes.max(self.net_bytes);
        self.peak_outstanding_bytes = self.peak_outstanding_bytes.max(outstanding);
    }
}

#[derive(Debug, Default)]
struct Phases {
    functions: Vec<PhaseReport>,
    /// Threads currently inside each function phase.
    active: Vec<u32>,
    /// Per thread, the phases it is inside, innermost last (recursion repeats an index).
    threads: HashMap<u32, Vec<u32>>,
    marks: Vec<PhaseReport>,
}

pub struct Tracker {
    pub groups: HashMap<GroupKey, GroupState>,
    /// Outstanding heap bytes of the process over time.
    pub heap: Series,
    /// Resident set size of the process over time.
    pub rss: Series,
    phases: Phases,
    start_ns: u64,
}

impl Tracker {
    /// `functions`: the names of the `--phase` function phases, in cookie order.
    pub fn new(functions: &[String], start_ns: u64) -> Self {
        Self {
            groups: HashMap::default(),
            heap: Series::new(SERIES_CAP),
            rss: Series::new(SERIES_CAP),
            phases: Phases {
                functions: functions
                    .iter()
                    .map(|name| PhaseReport {
                        name: name.clone(),
                        kind: "function",
                        ..PhaseReport::default()
                    })
                    .collect(),
                active: vec![0; functions.len()],
                ..Phases::default()
            },
            start_ns,
        }
    }

    fn group(&mut self, key: GroupKey) -> &mut GroupState {
        self.groups.entry(key).or_insert_with(|| GroupState {
            stats: StackStats::default(),
            series: Series::new(SERIES_CAP),
        })
    }

    /// Records one table change of a block allocated at `site`; `outstanding` is the process's
    /// outstanding heap bytes after it.
    pub fn on_change(&mut self, change: &Change, site: SiteId, outstanding: u64) {
        let tid = match *change {
            Change::Alloc {
                block,
                tid,
                mmap,
                count,
            } => {
                let g = self.group((site, block.func, mmap));
                g.stats
                    .on_alloc_n(block.size, count, block.ts_ns, block.chain);
                tid
            }
            Change::Free {
                block,
                bytes,
                whole,
                tid,
                ts_ns,
                mmap,
                count,
            } => {
                let g = self.group((site, block.func, mmap));
                if whole && bytes == block.size * u64::from(count) {
                    g.stats.on_free_n(block.size, count, block.ts_ns, ts_ns);
                } else {
                    // Part of a mapping went away.
                    g.stats.outstanding_bytes = g.stats.outstanding_bytes.saturating_sub(bytes);
                    g.stats.bytes_freed += bytes;
                    if whole {
                        g.stats.frees += 1;
                        g.stats.outstanding_allocs = g.stats.outstanding_allocs.saturating_sub(1);
                    }
                }
                tid
            }
        };
        let heap_change = !matches!(
            change,
            Change::Alloc { mmap: true, .. } | Change::Free { mmap: true, .. }
        );
        if !heap_change {
            return;
        }
        let p = &mut self.phases;
        if let Some(stack) = p.threads.get(&tid) {
            let mut counted: Vec<u32> = Vec::new();
            for &i in stack {
                if !counted.contains(&i) {
                    counted.push(i);
                    if let Some(r) = p.functions.get_mut(i as usize) {
                        r.count(change, outstanding);
                    }
                }
            }
        }
        for (i, active) in p.active.iter().enumerate() {
            if *active > 0 {
                let r = &mut p.functions[i];
                r.peak_outstanding_bytes = r.peak_outstanding_bytes.max(outstanding);
            }
        }
        if let Some(mark) = p.marks.last_mut() {
            mark.count(change, outstanding);
        }
    }

    /// A thread entered or left function phase `phase`.
    pub fn on_phase(&mut self, tid: u32, phase: u32, enter: bool, outstanding: u64) {
        let p = &mut self.phases;
        let Some(report) = p.functions.get_mut(phase as usize) else {
            return;
        };
        let stack = p.threads.entry(tid).or_default();
        if enter {
            if !stack.contains(&phase) {
                p.active[phase as usize] += 1;
            }
            stack.push(phase);
            report.entries += 1;
            report.peak_outstanding_bytes = report.peak_outstanding_bytes.max(outstanding);
        } else if let Some(pos) = stack.iter().rposition(|&i| i == phase) {
            stack.remove(pos);
            if !stack.contains(&phase) {
                p.active[phase as usize] -= 1;
            }
            if stack.is_empty() {
                p.threads.remove(&tid);
            }
        }
    }

    /// Starts time phase `name` at `ts_ns`, ending the previous one.
    /// Time phases started so far.
    pub fn marks(&self) -> usize {
        self.phases.marks.len()
    }

    pub fn mark(&mut self, name: &str, ts_ns: u64, outstanding: u64) {
        let t = self.seconds(ts_ns);
        if let Some(prev) = self.phases.marks.last_mut() {
            prev.end_s = Some(t);
        }
        self.phases.marks.push(PhaseReport {
            name: name.to_string(),
            kind: "mark",
            entries: 1,
            peak_outstanding_bytes: outstanding,
            start_s: Some(t),
            ..PhaseReport::default()
        });
    }

    fn seconds(&self, ts_ns: u64) -> f64 {
        ts_ns.saturating_sub(self.start_ns) as f64 / 1e9
    }

    /// Samples every group's outstanding bytes and the process's memory at `ts_ns`.
    pub fn sample(&mut self, ts_ns: u64, heap_outstanding: u64, rss: Option<u64>) {
        let t = self.seconds(ts_ns);
        for g in self.groups.values_mut() {
            // A group that never held anything long enough to be sampled has no series yet;
            // one that did keeps getting points, zeros included.
            if g.stats.outstanding_bytes > 0 || g.series.last().is_some() {
                g.series.push(t, g.stats.outstanding_bytes as f64);
            }
        }
        self.heap.push(t, heap_outstanding as f64);
        if let Some(rss) = rss {
            self.rss.push(t, rss as f64);
        }
    }

    /// Forgets groups with nothing outstanding and no allocation for `idle_ns`, oldest first,
    /// until at most `keep` groups remain (a long trace of many short-lived processes would
    /// otherwise keep every call site it ever saw). Returns how many were forgotten.
    pub fn prune(&mut self, keep: usize, now_ns: u64, idle_ns: u64) -> usize {
        if self.groups.len() <= keep {
            return 0;
        }
        let mut idle: Vec<(u64, GroupKey)> = self
            .groups
            .iter()
            .filter(|(_, g)| {
                g.stats.outstanding_allocs == 0 && now_ns.saturating_sub(g.stats.last_ns) >= idle_ns
            })
            .map(|(k, g)| (g.stats.last_ns, *k))
            .collect();
        idle.sort_unstable_by_key(|(last, _)| *last);
        let excess = self.groups.len() - keep;
        let mut removed = 0;
        for (_, key) in idle.into_iter().take(excess) {
            self.groups.remove(&key);
            removed += 1;
        }
        removed
    }

    /// Growth verdict of one group.
    pub fn growth(&self, key: &GroupKey) -> Option<Growth> {
        let g = self.groups.get(key)?;
        let activity = Activity {
            allocs: g.stats.allocs,
            frees: g.stats.frees,
            bytes_allocated: g.stats.bytes_allocated,
        };
        Some(growth::classify(&g.series, &activity))
    }

    /// Slope of the process's outstanding heap bytes (bytes/s) over the trace.
    pub fn heap_slope(&self) -> Option<f64> {
        least_squares(self.heap.points()).map(|f| f.slope)
    }

    /// Slope of the process's RSS (bytes/s) over the trace.
    pub fn rss_slope(&self) -> Option<f64> {
        least_squares(self.rss.points()).map(|f| f.slope)
    }

    /// All phases, function phases first, the open mark closed at `end_ns`.
    pub fn phases(&self, end_ns: u64) -> Vec<PhaseReport> {
        let mut out = self.phases.functions.clone();
        let mut marks = self.phases.marks.clone();
        if let Some(last) = marks.last_mut()
            && last.end_s.is_none()
        {
            last.end_s = Some(self.seconds(end_ns));
        }
        out.extend(marks);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::LiveAlloc;

    /// The site of the blocks `alloc` and `free` make.
    const SITE: SiteId = SiteId::new(7);

    fn block(size: u64, stack: u64) -> LiveAlloc {
        LiveAlloc {
            size,
            ts_ns: 1_000,
            stack,
            func: AllocFn::Malloc,
            chain: 0,
        }
    }

    fn alloc(size: u64, tid: u32) -> Change {
        Change::Alloc {
            block: block(size, 7),
            tid,
            mmap: false,
            count: 1,
        }
    }

    fn free(size: u64, tid: u32) -> Change {
        Change::Free {
            block: block(size, 7),
            bytes: size,
            whole: true,
            tid,
            ts_ns: 2_000,
            mmap: false,
            count: 1,
        }
    }

    #[test]
    fn function_phase_counts_only_its_threads_and_its_peak() {
        let mut t = Tracker::new(&["render".to_string()], 0);
        let mut outstanding = 0;
        let mut apply = |t: &mut Tracker, c: Change, delta: i64| {
            outstanding = (outstanding as i64 + delta) as u64;
            t.on_change(&c, SITE, outstanding);
        };
        apply(&mut t, alloc(500, 2), 500); // outside the phase
        t.on_phase(1, 0, true, 500);
        apply(&mut t, alloc(100, 1), 100);
        apply(&mut t, alloc(200, 1), 200);
        apply(&mut t, free(100, 1), -100);
        t.on_phase(1, 0, false, 700);
        apply(&mut t, alloc(5000, 1), 5000); // after the phase
        let p = &t.phases(0)[0];
        assert_eq!(
            (p.allocs, p.frees, p.bytes_allocated, p.bytes_freed),
            (2, 1, 300, 100)
        );
        assert_eq!((p.net_bytes, p.peak_net_bytes), (200, 300));
        assert_eq!(p.peak_outstanding_bytes, 800, "peak while active, not 5700");
        assert_eq!(p.entries, 1);
    }

    #[test]
    fn marks_split_time_and_close_at_end() {
        let mut t = Tracker::new(&[], 0);
        t.mark("load", 1_000_000_000, 0);
        t.on_change(&alloc(64, 9), SITE, 64);
        t.mark("render", 2_000_000_000, 64);
        t.on_change(&alloc(32, 3), SITE, 96);
        t.on_change(&free(64, 3), SITE, 32);
        let phases = t.phases(5_000_000_000);
        let got: Vec<_> = phases
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.bytes_allocated,
                    p.net_bytes,
                    p.start_s,
                    p.end_s,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("load", 64, 64, Some(1.0), Some(2.0)),
                ("render", 32, -32, Some(2.0), Some(5.0)),
            ]
        );
        assert_eq!(phases[1].peak_outstanding_bytes, 96);
    }

    #[test]
    fn prune_forgets_idle_empty_groups_oldest_first() {
        let mut t = Tracker::new(&[], 0);
        for stack in 1..=4u64 {
            let block = LiveAlloc {
                size: 10,
                ts_ns: stack * 1_000,
                stack,
                func: AllocFn::Malloc,
                chain: 0,
            };
            t.on_change(
                &Change::Alloc {
                    block,
                    count: 1,
                    tid: 1,
                    mmap: false,
                },
                SiteId::new(stack as u32),
                10,
            );
            // Groups 1..=3 end empty; group 4 keeps its block.
            if stack != 4 {
                t.on_change(
                    &Change::Free {
                        block,
                        count: 1,
                        bytes: 10,
                        whole: true,
                        tid: 1,
                        ts_ns: stack * 1_000 + 1,
                        mmap: false,
                    },
                    SiteId::new(stack as u32),
                    0,
                );
            }
        }
        assert_eq!(t.prune(4, 10_000, 0), 0, "within the limit");
        assert_eq!(t.prune(2, 10_000, 0), 2);
        let mut left: Vec<SiteId> = t.groups.keys().map(|k| k.0).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [SiteId::new(3), SiteId::new(4)],
            "the oldest idle empty groups go; the one holding a block stays"
        );
        assert_eq!(t.prune(0, 10_000, 1_000_000), 0, "not idle long enough");
    }

    #[test]
    fn samples_feed_group_series() {
        let mut t = Tracker::new(&[], 0);
        for i in 0..10u64 {
            t.on_change(&alloc(1000, 1), SITE, 1000 * (i + 1));
            t.sample(i * 1_000_000_000, 1000 * (i + 1), Some(4096 * (i + 1)));
        }
        let key = (SITE, AllocFn::Malloc, false);
        assert_eq!(t.groups[&key].series.points().len(), 10);
        let slope = t.heap_slope().unwrap();
        assert!((slope - 1000.0).abs() < 1e-6, "{slope}");
        assert!((t.rss_slope().unwrap() - 4096.0).abs() < 1e-6);
        assert!(t.growth(&key).is_some());
    }
}
