//! Analytics state kept while tracing, fed by the table's changes: per call-stack group
//! behaviour and outstanding-bytes series, the process's series, and phases (functions named by
//! `--phase`, native or Python, and time marks sent with `memprof mark`).

use foldhash::HashMap;

use memprof_common::AllocFn;
use serde::Serialize;

use crate::{
    analysis::{
        behaviour::StackStats,
        estimate::Spread,
        growth::{self, Activity, Growth},
        peak::{Held, PeakSet, Snapshot, Step, Watch},
        series::{Series, least_squares},
    },
    stacks::SiteId,
    table::{Change, sample_split, sample_variance},
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
    /// `function` (active while a thread is inside it), `python` (the same, for a Python
    /// function) or `mark` (from its mark to the next).
    pub kind: &'static str,
    pub allocs: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
    pub bytes_freed: u64,
    /// Bytes allocated minus bytes freed inside the phase.
    pub net_bytes: i64,
    /// Highest running `net_bytes` inside the phase.
    pub peak_net_bytes: i64,
    /// Bytes allocated inside the phase and not freed yet (wherever the free comes), and
    /// their blocks.
    pub outstanding_bytes: u64,
    pub outstanding_allocs: u64,
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

    /// Keeps `outstanding_bytes` and `outstanding_allocs`: a block allocated inside the phase,
    /// or freed after being allocated there.
    fn hold(&mut self, change: &Change) {
        match *change {
            Change::Alloc { block, count, .. } => {
                self.outstanding_bytes += block.size * u64::from(count);
                self.outstanding_allocs += u64::from(count);
            }
            Change::Free {
                bytes,
                whole,
                count,
                ..
            } => {
                self.outstanding_bytes = self.outstanding_bytes.saturating_sub(bytes);
                if whole {
                    self.outstanding_allocs =
                        self.outstanding_allocs.saturating_sub(u64::from(count));
                }
            }
        }
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
    /// Per group allocated inside function phases, those phases (bit `i` for phase `i`, the
    /// first 64): a block freed is taken from the outstanding bytes of its group's phases.
    /// A call site's stack holds the phase's function, so its blocks share their phases.
    group_phases: HashMap<GroupKey, u64>,
}

pub struct Tracker {
    pub groups: HashMap<GroupKey, GroupState>,
    /// Outstanding heap bytes of the process over time.
    pub heap: Series,
    /// Resident set size of the process over time.
    pub rss: Series,
    phases: Phases,
    start_ns: u64,
    /// What each group held at the heap's peak, over every traced process (see
    /// [`crate::analysis::peak`]).
    peak: PeakSet<GroupKey>,
    /// The same per process, when the trace covers several (`--all`, followed children).
    process_peaks: Option<HashMap<u32, PeakSet<GroupKey>>>,
    /// `--sample-bytes` (0 without sampling).
    sample_mean: u64,
    /// The peak of each function phase while active, and of the open mark.
    function_watches: Vec<Watch<GroupKey>>,
    mark_watch: Option<Watch<GroupKey>>,
    /// The peaks of the closed marks, in order.
    mark_peaks: Vec<Option<Snapshot<GroupKey>>>,
    /// The newest change's time (ns).
    last_ns: u64,
    /// Sampled traces: the variance of the estimated heap allocations, bytes and count.
    pub allocated_spread: Spread,
}

/// One heap change as the peak takes it: bytes and blocks, with sampling their variances and
/// the block's weights in the two half-rate samples (see `table::sample_split`).
fn peak_step(change: &Change, mean: u64) -> Step {
    let (block, increase, ts_ns, count) = match *change {
        Change::Alloc { block, count, .. } => (block, true, block.ts_ns, count),
        Change::Free {
            block,
            ts_ns,
            count,
            ..
        } => (block, false, ts_ns, count),
    };
    let count = u64::from(count);
    let (spread, halves) = if mean == 0 {
        (Spread::default(), [(0.0, 0.0); 2])
    } else {
        let s = block.size as f64;
        let v = sample_variance(&block, mean);
        (
            Spread {
                bytes: v * s * s,
                blocks: v,
            },
            sample_split(&block, mean).map(|w| (s * w, s * s * (w * w - w).max(0.0))),
        )
    };
    Step {
        held: Held {
            bytes: block.size.saturating_mul(count),
            blocks: count,
            spread,
        },
        increase,
        ts_ns,
        halves,
    }
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
            peak: PeakSet::new(false),
            process_peaks: None,
            sample_mean: 0,
            function_watches: functions.iter().map(|_| Watch::new(false)).collect(),
            mark_watch: None,
            mark_peaks: Vec::new(),
            last_ns: start_ns,
            allocated_spread: Spread::default(),
        }
    }

    /// Adds function phases of kind `python`, named by `names`, after those `new` was given:
    /// their indexes follow.
    pub fn add_python_phases(&mut self, names: &[String]) {
        let p = &mut self.phases;
        p.functions.extend(names.iter().map(|name| PhaseReport {
            name: name.clone(),
            kind: "python",
            ..PhaseReport::default()
        }));
        p.active.resize(p.functions.len(), 0);
        let sampled = self.sample_mean > 0;
        self.function_watches
            .extend(names.iter().map(|_| Watch::new(sampled)));
    }

    /// Keeps the peak's intervals for a trace sampled at `sample_mean` bytes (0: exact), and
    /// with `per_process` a peak of each process besides the trace's.
    pub fn with_peaks(mut self, sample_mean: u64, per_process: bool) -> Self {
        self.sample_mean = sample_mean;
        self.peak = PeakSet::new(sample_mean > 0);
        self.process_peaks = per_process.then(HashMap::default);
        for w in &mut self.function_watches {
            *w = Watch::new(sample_mean > 0);
        }
        self
    }

    /// The peaks of the phases, in the order of [`Tracker::phases`] (None: never active).
    pub fn phase_peaks(&self) -> Vec<Option<Snapshot<GroupKey>>> {
        let total = self.peak.track.now();
        let snap = |w: &Watch<GroupKey>| w.snapshot(total, self.peak.current());
        let mut out: Vec<_> = self.function_watches.iter().map(snap).collect();
        out.extend(self.mark_peaks.iter().cloned());
        if let Some(w) = &self.mark_watch {
            out.push(snap(w));
        }
        out
    }

    fn watches(&mut self) -> impl Iterator<Item = &mut Watch<GroupKey>> {
        self.function_watches
            .iter_mut()
            .chain(self.mark_watch.as_mut())
    }

    /// The heap's peak over the trace: its total, moment and what each group held then.
    pub fn peak(&self) -> Snapshot<GroupKey> {
        self.peak.snapshot()
    }

    /// The peak of process `pid` (multi-process traces only).
    pub fn process_peak(&self, pid: u32) -> Option<Snapshot<GroupKey>> {
        Some(self.process_peaks.as_ref()?.get(&pid)?.snapshot())
    }

    /// Forgets what was kept for the peak of process `pid` (no longer reported).
    pub fn forget_process(&mut self, pid: u32) {
        if let Some(p) = &mut self.process_peaks {
            p.remove(&pid);
        }
    }

    /// Slots the peaks keep (one per group holding something now or at a peak).
    pub fn peak_slots(&self) -> usize {
        self.peak.len()
            + self
                .process_peaks
                .as_ref()
                .map_or(0, |p| p.values().map(PeakSet::len).sum())
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
        self.on_change_in(0, change, site, outstanding);
    }

    /// [`Tracker::on_change`] for a block of process `pid`.
    pub fn on_change_in(&mut self, pid: u32, change: &Change, site: SiteId, outstanding: u64) {
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
        let key = (site, change.block().func, false);
        let step = peak_step(change, self.sample_mean);
        if step.increase {
            self.allocated_spread.add(&step.held.spread);
        }
        self.last_ns = self.last_ns.max(step.ts_ns);
        let held = self.peak.now_of(&key);
        let total = *self.peak.track.now();
        for w in self.watches() {
            w.before(key, held, &total, &step);
        }
        self.peak.change(key, &step);
        let total = *self.peak.track.now();
        let halves = self.peak.track.halves().copied();
        for w in self.watches() {
            w.after(&total, halves.as_ref(), step.ts_ns);
        }
        if let Some(peaks) = &mut self.process_peaks {
            let sampled = self.sample_mean > 0;
            peaks
                .entry(pid)
                .or_insert_with(|| PeakSet::new(sampled))
                .change(key, &step);
        }
        let born_s = self.seconds(change.block().ts_ns);
        let p = &mut self.phases;
        let mut inside = 0u64;
        if let Some(stack) = p.threads.get(&tid) {
            let mut counted: Vec<u32> = Vec::new();
            for &i in stack {
                if !counted.contains(&i) {
                    counted.push(i);
                    if let Some(r) = p.functions.get_mut(i as usize) {
                        r.count(change, outstanding);
                        if matches!(change, Change::Alloc { .. }) {
                            r.hold(change);
                            inside |= 1u64.checked_shl(i).unwrap_or(0);
                        }
                    }
                }
            }
        }
        if inside != 0 {
            *p.group_phases.entry(key).or_default() |= inside;
        }
        if let (Change::Free { .. }, Some(&held)) = (change, p.group_phases.get(&key)) {
            for (i, r) in p.functions.iter_mut().enumerate().take(64) {
                if held & (1 << i) != 0 {
                    r.hold(change);
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
        // The mark the block was allocated in: the last to start before it.
        let held_by = match change {
            Change::Alloc { .. } => p.marks.last_mut(),
            Change::Free { .. } => {
                let n = p
                    .marks
                    .partition_point(|m| m.start_s.is_some_and(|s| s <= born_s));
                n.checked_sub(1).and_then(|i| p.marks.get_mut(i))
            }
        };
        if let Some(mark) = held_by {
            mark.hold(change);
        }
    }

    /// A thread entered or left function phase `phase`.
    pub fn on_phase(&mut self, tid: u32, phase: u32, enter: bool, outstanding: u64) {
        let p = &mut self.phases;
        let Some(report) = p.functions.get_mut(phase as usize) else {
            return;
        };
        let stack = p.threads.entry(tid).or_default();
        let total = *self.peak.track.now();
        let Some(watch) = self.function_watches.get_mut(phase as usize) else {
            return;
        };
        if enter {
            if !stack.contains(&phase) {
                p.active[phase as usize] += 1;
                if p.active[phase as usize] == 1 {
                    watch.activate(&total, self.peak.track.halves(), self.last_ns);
                }
            }
            stack.push(phase);
            report.entries += 1;
            report.peak_outstanding_bytes = report.peak_outstanding_bytes.max(outstanding);
        } else if let Some(pos) = stack.iter().rposition(|&i| i == phase) {
            stack.remove(pos);
            if !stack.contains(&phase) {
                p.active[phase as usize] -= 1;
                if p.active[phase as usize] == 0 {
                    watch.deactivate(&total);
                }
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
        let total = *self.peak.track.now();
        if let Some(mut w) = self.mark_watch.take() {
            w.deactivate(&total);
            self.mark_peaks
                .push(w.snapshot(&total, self.peak.current()));
        }
        let mut w = Watch::new(self.sample_mean > 0);
        w.activate(&total, self.peak.track.halves(), ts_ns);
        self.mark_watch = Some(w);
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
        let peak = &self.peak;
        for w in self
            .function_watches
            .iter_mut()
            .chain(self.mark_watch.as_mut())
        {
            w.prune(|k| peak.now_of(k));
        }
        self.peak.prune();
        if let Some(peaks) = &mut self.process_peaks {
            peaks.values_mut().for_each(PeakSet::prune);
        }
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
            self.phases.group_phases.remove(&key);
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
mod tests;
