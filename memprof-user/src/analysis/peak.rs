//! The heap at its peak, kept while tracing: what each call site held, in bytes and blocks, at
//! the moment the outstanding heap was highest (over the whole trace, per process, and per
//! phase), without keeping the trace or replaying it.
//!
//! # How
//!
//! Each site has a [`Slot`]: what it holds now and, once it changed after the last peak, what
//! it held at that peak. A [`PeakTrack`] follows the heap's total through every change:
//!
//! - while the total stands at a new high (`pending`), nothing needs remembering: the peak is
//!   now;
//! - the first change that lowers the heap after a new high makes that high the peak: every
//!   site changed since the previous peak (the `dirty` list) forgets what it remembered, its
//!   current value being its value at the new peak;
//! - after a peak, the first change of a site copies its current value aside before it moves.
//!
//! A change costs the update of its site's slot, and the first time a site changes after a
//! peak, a push on the list; a new peak costs one visit per site on the list, each paid for by
//! the change that put it there. Memory: one slot per site (sites that hold nothing now and
//! held nothing at the peak can be dropped: [`PeakSet::prune`]) and the list, at most one entry
//! per site. Ties keep the earliest moment. The peak is the heap's (the malloc family):
//! anonymous mappings made outside malloc are not part of it.
//!
//! A phase's peak is the heap's highest while the phase was active. A [`Watch`] follows it
//! beside the trace's own peak: it reads the sites' current values from their slots and keeps,
//! in a map, the value each site held at the phase's peak once the site changed since.
//!
//! # Sampled traces
//!
//! With `--sample-bytes` every value is an estimate with a variance ([`Held::spread`]). The
//! highest estimate over a trace is biased upward (it is the largest of many noisy
//! estimates), so the peak's interval is not the plain one:
//!
//! - **high end**: at the moment `t_p` the real heap peaked, its estimate `X(t_p)` is no more
//!   than the highest `X(t*)`, and the real peak is below `X(t_p) + 1.96 σ(t_p)` with
//!   probability 97.5% (one moment, chosen without looking at the samples). So the high end is
//!   `X(t*) + 1.96 σ_max`, with `σ_max` the largest standard deviation the heap's estimate had;
//! - **low end**: the sampled blocks are split into two independent samples at half the rate
//!   (`table::sample_split`). The moment one half's estimate peaked is chosen from that half
//!   alone, so the other half's estimate at that moment is unbiased for what the heap really
//!   held then, which is at most the peak. The low end is the mean of the two such estimates
//!   less 1.96 of their standard deviations (averaged), and never above the estimate.
//!
//! The interval holds the real peak with probability at least 95% (each end fails with at
//! most 2.5%).

use std::hash::Hash;

use foldhash::HashMap;

use super::estimate::{Bounds, Spread};

/// What a site, or the heap, holds: bytes and blocks, and with sampling the variance of their
/// estimates.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Held {
    pub bytes: u64,
    pub blocks: u64,
    pub spread: Spread,
}

impl Held {
    pub fn is_empty(&self) -> bool {
        self.bytes == 0 && self.blocks == 0
    }

    fn apply(&mut self, step: &Step) {
        let d = &step.held;
        if step.increase {
            self.bytes = self.bytes.saturating_add(d.bytes);
            self.blocks = self.blocks.saturating_add(d.blocks);
            self.spread.add(&d.spread);
        } else {
            self.bytes = self.bytes.saturating_sub(d.bytes);
            self.blocks = self.blocks.saturating_sub(d.blocks);
            self.spread.sub(&d.spread, self.blocks == 0);
        }
    }

    /// The interval of a sampled value (not a peak's: see [`PeakTrack::bounds`]).
    pub fn bounds(&self) -> (Bounds, Bounds) {
        (
            Bounds::around(self.bytes, self.spread.bytes),
            Bounds::around(self.blocks, self.spread.blocks),
        )
    }
}

/// One change of what is outstanding, as the peak sees it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Step {
    /// The bytes and blocks that came or went (and their variance, with sampling).
    pub held: Held,
    pub increase: bool,
    pub ts_ns: u64,
    /// Sampled traces: the block's bytes in each of the two half-rate samples, and their
    /// variances (see `table::sample_split`).
    pub halves: [(f64, f64); 2],
}

/// A site's value now and, when it changed since the last peak, at that peak.
#[derive(Clone, Copy, Debug, Default)]
pub struct Slot {
    pub now: Held,
    kept: Held,
    dirty: bool,
}

impl Slot {
    /// A new peak: the site's value at the peak is its current one.
    pub fn settle(&mut self) {
        self.dirty = false;
    }
}

/// The two half-rate samples' estimates at the moments each peaked.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CrossFit {
    /// Each half's highest estimate of the heap.
    max: [f64; 2],
    /// The other half's estimate and its variance at that moment.
    other: [(f64, f64); 2],
    /// The largest variance of the whole estimate.
    max_var: f64,
}

impl CrossFit {
    fn observe(&mut self, halves: &[(f64, f64); 2], var: f64) {
        for i in 0..2 {
            if halves[i].0 > self.max[i] {
                self.max[i] = halves[i].0;
                self.other[i] = halves[1 - i];
            }
        }
        self.max_var = self.max_var.max(var);
    }

    /// The interval of a sampled peak whose estimate is `peak` (see the module doc).
    pub fn bounds(&self, peak: &Held) -> (Bounds, Bounds) {
        let low = (self.other[0].0 + self.other[1].0) / 2.0;
        let low_sd = (self.other[0].1.max(0.0).sqrt() + self.other[1].1.max(0.0).sqrt()) / 2.0;
        let mut bytes = Bounds::between(low, peak.bytes as f64, low_sd * low_sd, self.max_var);
        bytes.0[0] = bytes.0[0].min(peak.bytes);
        (bytes, Bounds::around(peak.blocks, peak.spread.blocks))
    }
}

/// The heap's total through every change, and the moment of its peak (see the module doc).
#[derive(Clone, Debug)]
pub struct PeakTrack<K> {
    now: Held,
    peak: Held,
    peak_ns: u64,
    /// The time of the newest change while the total stands at a new high.
    pending: Option<u64>,
    /// Sites whose slot keeps their value at the peak.
    dirty: Vec<K>,
    /// Sampled traces: each half-rate sample's estimate now, and their peaks.
    halves: Option<([(f64, f64); 2], CrossFit)>,
}

impl<K: Copy> PeakTrack<K> {
    /// `sampled`: the trace is sampled, and the peak's interval is kept.
    pub fn new(sampled: bool) -> Self {
        Self {
            now: Held::default(),
            peak: Held::default(),
            peak_ns: 0,
            pending: None,
            dirty: Vec::new(),
            halves: sampled.then(Default::default),
        }
    }

    /// Before `step` is recorded: when it lowers the heap right after a new high, that high
    /// is the peak, and `settle` is called with each site on the list to [`Slot::settle`] its
    /// slot (a site whose slot is gone is skipped).
    pub fn before(&mut self, step: &Step, mut settle: impl FnMut(K)) {
        if step.increase || self.pending.is_none() {
            return;
        }
        for key in self.dirty.drain(..) {
            settle(key);
        }
        self.peak = self.now;
        self.peak_ns = self.pending.take().unwrap_or(self.peak_ns);
    }

    /// Records `step` of site `key`, whose slot is `slot`.
    pub fn record(&mut self, key: K, slot: &mut Slot, step: &Step) {
        if self.pending.is_none() && !slot.dirty {
            slot.kept = slot.now;
            slot.dirty = true;
            self.dirty.push(key);
        }
        slot.now.apply(step);
        self.now.apply(step);
        if let Some((halves, cross)) = &mut self.halves {
            for (half, d) in halves.iter_mut().zip(step.halves) {
                if step.increase {
                    half.0 += d.0;
                    half.1 += d.1;
                } else {
                    half.0 = (half.0 - d.0).max(0.0);
                    half.1 = (half.1 - d.1).max(0.0);
                }
            }
            cross.observe(halves, self.now.spread.bytes);
        }
        if step.increase && self.now.bytes > self.peak.bytes {
            self.pending = Some(step.ts_ns);
        }
    }

    /// The heap now.
    pub fn now(&self) -> &Held {
        &self.now
    }

    /// The peak and when it was reached (CLOCK_MONOTONIC ns; 0 before anything was held).
    pub fn peak(&self) -> (Held, u64) {
        match self.pending {
            Some(ts) => (self.now, ts),
            None => (self.peak, self.peak_ns),
        }
    }

    /// What the site of `slot` held at the peak.
    pub fn value(&self, slot: &Slot) -> Held {
        if self.pending.is_none() && slot.dirty {
            slot.kept
        } else {
            slot.now
        }
    }

    /// Sampled traces: the peak's intervals of bytes and blocks.
    pub fn bounds(&self) -> Option<(Bounds, Bounds)> {
        let (_, cross) = self.halves.as_ref()?;
        Some(cross.bounds(&self.peak().0))
    }

    /// Sampled traces: the half-rate samples' estimates now (for [`Watch`]es).
    pub fn halves(&self) -> Option<&[(f64, f64); 2]> {
        self.halves.as_ref().map(|(h, _)| h)
    }

    /// Drops the sites of the list `keep` says are gone.
    pub fn retain_dirty(&mut self, keep: impl FnMut(&K) -> bool) {
        self.dirty.retain(keep);
    }
}

/// The peak of one set of sites with their own slots (a process's).
#[derive(Clone, Debug)]
pub struct PeakSet<K> {
    pub track: PeakTrack<K>,
    slots: HashMap<K, Slot>,
}

impl<K: Copy + Eq + Hash> PeakSet<K> {
    pub fn new(sampled: bool) -> Self {
        Self {
            track: PeakTrack::new(sampled),
            slots: HashMap::default(),
        }
    }

    /// Records `step` of site `key`.
    pub fn change(&mut self, key: K, step: &Step) {
        let slots = &mut self.slots;
        self.track.before(step, |k| {
            if let Some(s) = slots.get_mut(&k) {
                s.settle();
            }
        });
        let slot = self.slots.entry(key).or_default();
        self.track.record(key, slot, step);
    }

    /// Drops the slots of sites holding nothing now and nothing at the peak.
    pub fn prune(&mut self) {
        let track = &self.track;
        self.slots
            .retain(|_, s| !(s.now.is_empty() && track.value(s).is_empty()));
        let slots = &self.slots;
        self.track.retain_dirty(|k| slots.contains_key(k));
    }

    /// The peak: its total, when, and each site holding something then.
    pub fn snapshot(&self) -> Snapshot<K> {
        let (total, at_ns) = self.track.peak();
        Snapshot {
            total,
            at_ns,
            sites: self
                .slots
                .iter()
                .map(|(k, s)| (*k, self.track.value(s)))
                .filter(|(_, v)| !v.is_empty())
                .collect(),
            bounds: self.track.bounds(),
        }
    }

    /// What site `key` holds now.
    pub fn now_of(&self, key: &K) -> Held {
        self.slots.get(key).map(|s| s.now).unwrap_or_default()
    }

    /// Every site with a slot and what it holds now.
    pub fn current(&self) -> impl Iterator<Item = (K, &Held)> {
        self.slots.iter().map(|(k, s)| (*k, &s.now))
    }

    /// Slots kept (for the cost measurements).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// A peak as reports take it: the heap's total then, the moment, the sites holding something
/// then (in no particular order), and with sampling the intervals of the total's bytes and
/// blocks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot<K> {
    pub total: Held,
    pub at_ns: u64,
    pub sites: Vec<(K, Held)>,
    pub bounds: Option<(Bounds, Bounds)>,
}

impl<K> Snapshot<K> {
    /// Keeps the `n` largest sites (by bytes, then blocks); returns how many were dropped and
    /// what they held together.
    pub fn keep_largest(&mut self, n: usize) -> (usize, Held) {
        self.sites
            .sort_by_key(|s| std::cmp::Reverse((s.1.bytes, s.1.blocks)));
        let mut rest = Held::default();
        let dropped = self.sites.len().saturating_sub(n);
        for (_, v) in self.sites.drain(n.min(self.sites.len())..) {
            rest.bytes += v.bytes;
            rest.blocks += v.blocks;
            rest.spread.add(&v.spread);
        }
        (dropped, rest)
    }
}

/// The peak of the heap while a phase is active, beside the trace's own (see the module doc).
#[derive(Clone, Debug)]
pub struct Watch<K> {
    active: bool,
    started: bool,
    peak: Held,
    peak_ns: u64,
    pending: Option<u64>,
    /// The value at the phase's peak of each site that changed since (empty while the heap
    /// stands at a new high of the phase: the peak is now).
    since: HashMap<K, Held>,
    cross: Option<CrossFit>,
}

impl<K: Copy + Eq + Hash> Watch<K> {
    pub fn new(sampled: bool) -> Self {
        Self {
            active: false,
            started: false,
            peak: Held::default(),
            peak_ns: 0,
            pending: None,
            since: HashMap::default(),
            cross: sampled.then(CrossFit::default),
        }
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Before `step` of site `key`, which holds `now`; the heap holds `total`.
    pub fn before(&mut self, key: K, now: Held, total: &Held, step: &Step) {
        if !self.started {
            return;
        }
        if !step.increase && self.pending.is_some() {
            self.commit(total);
        }
        if self.pending.is_none() {
            self.since.entry(key).or_insert(now);
        }
    }

    /// After a change while the heap holds `total` (`halves`: its half-rate estimates).
    pub fn after(&mut self, total: &Held, halves: Option<&[(f64, f64); 2]>, ts_ns: u64) {
        if !self.active {
            return;
        }
        if let (Some(cross), Some(halves)) = (&mut self.cross, halves) {
            cross.observe(halves, total.spread.bytes);
        }
        if total.bytes > self.peak.bytes || (!self.started && self.pending.is_none()) {
            if self.pending.is_none() {
                self.since.clear();
            }
            self.pending = Some(ts_ns);
        }
    }

    /// The phase became active at `ts_ns`, the heap holding `total`.
    pub fn activate(&mut self, total: &Held, halves: Option<&[(f64, f64); 2]>, ts_ns: u64) {
        self.active = true;
        self.after(total, halves, ts_ns);
        self.started = true;
    }

    /// The phase stopped being active, the heap holding `total`.
    pub fn deactivate(&mut self, total: &Held) {
        self.active = false;
        if self.pending.is_some() {
            self.commit(total);
        }
    }

    fn commit(&mut self, total: &Held) {
        self.peak = *total;
        self.peak_ns = self.pending.take().unwrap_or(self.peak_ns);
        self.since.clear();
    }

    /// What site `key`, holding `now`, held at the phase's peak.
    pub fn value(&self, key: &K, now: Held) -> Held {
        self.since.get(key).copied().unwrap_or(now)
    }

    /// The phase's peak (the heap holding `total` now) and when it was reached; None if the
    /// phase was never active.
    pub fn peak(&self, total: &Held) -> Option<(Held, u64)> {
        if !self.started {
            return None;
        }
        Some(match self.pending {
            Some(ts) => (*total, ts),
            None => (self.peak, self.peak_ns),
        })
    }

    /// The peak's intervals (sampled traces), the heap holding `total` now.
    pub fn bounds(&self, total: &Held) -> Option<(Bounds, Bounds)> {
        Some(self.cross.as_ref()?.bounds(&self.peak(total)?.0))
    }

    /// The sites whose value at the phase's peak is kept here, not in their slots.
    pub fn remembered(&self) -> impl Iterator<Item = (&K, &Held)> {
        self.since.iter()
    }

    /// Forgets what equals the site's current value (`now_of`): nothing is lost.
    pub fn prune(&mut self, now_of: impl Fn(&K) -> Held) {
        self.since.retain(|k, v| *v != now_of(k));
    }

    /// The phase's peak as it stands, from the sites' current values `now` (every site with a
    /// slot): its total, moment and sites (None if never active).
    pub fn snapshot<'a>(
        &self,
        total: &Held,
        now: impl Iterator<Item = (K, &'a Held)>,
    ) -> Option<Snapshot<K>> {
        let (peak, at_ns) = self.peak(total)?;
        let mut sites: Vec<(K, Held)> = now
            .filter(|(k, _)| !self.since.contains_key(k))
            .map(|(k, v)| (k, *v))
            .collect();
        sites.extend(self.remembered().map(|(k, v)| (*k, *v)));
        sites.retain(|(_, v)| !v.is_empty());
        Some(Snapshot {
            total: peak,
            at_ns,
            sites,
            bounds: self.bounds(total),
        })
    }
}

#[cfg(test)]
mod tests;
