//! Allocation behaviour of one call-stack group: counts, sizes and lifetimes (as log2
//! histograms), realloc chains, and the summary a report shows of them.
//!
//! Quantiles come from log2 buckets, so they are upper bounds: "the median size is at most
//! 255 B", never an exact value; bounds never go beyond the smallest and largest values
//! observed (a 1000 B allocation's bucket reads `1000..=1000`, not `512..=1023`).

use serde::Serialize;

/// Log2 histogram: bucket `i` counts values `v` with `floor(log2(max(v, 1))) == i` (bucket 0
/// holds 0 and 1), so bucket `i` spans `[2^i, 2^(i+1) − 1]` (bucket 0: `[0, 1]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Log2Hist {
    counts: [u64; 64],
    /// The smallest and largest values added.
    min: u64,
    max: u64,
}

impl Default for Log2Hist {
    fn default() -> Self {
        Self {
            counts: [0; 64],
            min: u64::MAX,
            max: 0,
        }
    }
}

/// Bucket of `v`.
fn bucket(v: u64) -> usize {
    63 - v.max(1).leading_zeros() as usize
}

/// Lower bound of bucket `i`.
fn lower(i: usize) -> u64 {
    if i == 0 { 0 } else { 1 << i }
}

/// Upper bound of bucket `i`: `2^(i+1) − 1`.
fn upper(i: usize) -> u64 {
    if i >= 63 {
        u64::MAX
    } else {
        (1 << (i + 1)) - 1
    }
}

impl Log2Hist {
    pub fn add(&mut self, v: u64) {
        self.add_n(v, 1);
    }

    /// Adds `v` `n` times (a sampled allocation standing for `n`).
    pub fn add_n(&mut self, v: u64, n: u64) {
        let b = bucket(v);
        self.counts[b] = self.counts[b].saturating_add(n);
        if n > 0 {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
    }

    /// Number of values added.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The upper bound (`2^(i+1) − 1`, or the largest value added if smaller) of the bucket
    /// holding the q-quantile, `q` in `[0, 1]` (clamped); `None` if empty. The q-quantile is the value of rank `max(1, ceil(q × count))`.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let q = if q.is_nan() { 0.5 } else { q.clamp(0.0, 1.0) };
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(upper(i).min(self.max));
            }
        }
        None
    }

    /// Non-empty buckets as (lower bound, upper bound, count), smallest first, the bounds
    /// within the smallest and largest values added.
    pub fn buckets(&self) -> Vec<(u64, u64, u64)> {
        self.counts
            .iter()
            .enumerate()
            .filter(|&(_, &c)| c > 0)
            .map(|(i, &c)| (lower(i).max(self.min), upper(i).min(self.max), c))
            .collect()
    }
}

/// Behaviour of one call-stack group, updated on each of its allocations and frees.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackStats {
    pub allocs: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
    pub bytes_freed: u64,
    pub outstanding_allocs: u64,
    pub outstanding_bytes: u64,
    /// Requested sizes of allocations.
    pub sizes: Log2Hist,
    /// Lifetimes of freed blocks, in nanoseconds.
    pub lifetimes_ns: Log2Hist,
    /// Reallocs that produced a block in this group.
    pub realloc_moves: u64,
    /// Longest chain of successive reallocs of one block ending here.
    pub max_realloc_chain: u32,
    /// Time of the first allocation (0 before any).
    pub first_ns: u64,
    /// Time of the last allocation (0 before any).
    pub last_ns: u64,
    /// Highest `outstanding_bytes` and `outstanding_allocs` the group reached.
    pub max_outstanding_bytes: u64,
    pub max_outstanding_allocs: u64,
    /// Sum of the lifetimes of the freed blocks, in nanoseconds.
    pub freed_lifetime_ns: u128,
}

impl StackStats {
    /// Records an allocation of `size` bytes at `ts_ns`. `realloc_chain` is 0 for a fresh block
    /// and `k` when the block is the result of the k-th successive realloc of one block.
    pub fn on_alloc(&mut self, size: u64, ts_ns: u64, realloc_chain: u32) {
        self.on_alloc_n(size, 1, ts_ns, realloc_chain);
    }

    /// [`on_alloc`](Self::on_alloc) for a sampled block standing for `count` allocations of
    /// `size` bytes.
    pub fn on_alloc_n(&mut self, size: u64, count: u32, ts_ns: u64, realloc_chain: u32) {
        let n = u64::from(count);
        let bytes = size.saturating_mul(n);
        if self.allocs == 0 {
            self.first_ns = ts_ns;
            self.last_ns = ts_ns;
        } else {
            self.first_ns = self.first_ns.min(ts_ns);
            self.last_ns = self.last_ns.max(ts_ns);
        }
        self.allocs += n;
        self.bytes_allocated = self.bytes_allocated.saturating_add(bytes);
        self.outstanding_allocs += n;
        self.outstanding_bytes = self.outstanding_bytes.saturating_add(bytes);
        self.max_outstanding_bytes = self.max_outstanding_bytes.max(self.outstanding_bytes);
        self.max_outstanding_allocs = self.max_outstanding_allocs.max(self.outstanding_allocs);
        self.sizes.add_n(size, n);
        if realloc_chain > 0 {
            self.realloc_moves += n;
            self.max_realloc_chain = self.max_realloc_chain.max(realloc_chain);
        }
    }

    /// Records the free of a block of `size` bytes allocated at `alloc_ts_ns`.
    pub fn on_free(&mut self, size: u64, alloc_ts_ns: u64, free_ts_ns: u64) {
        self.on_free_n(size, 1, alloc_ts_ns, free_ts_ns);
    }

    /// [`on_free`](Self::on_free) for a sampled block standing for `count` blocks.
    pub fn on_free_n(&mut self, size: u64, count: u32, alloc_ts_ns: u64, free_ts_ns: u64) {
        let n = u64::from(count);
        let bytes = size.saturating_mul(n);
        self.frees += n;
        self.bytes_freed = self.bytes_freed.saturating_add(bytes);
        self.outstanding_allocs = self.outstanding_allocs.saturating_sub(n);
        self.outstanding_bytes = self.outstanding_bytes.saturating_sub(bytes);
        let lifetime = free_ts_ns.saturating_sub(alloc_ts_ns);
        self.lifetimes_ns.add_n(lifetime, n);
        self.freed_lifetime_ns += u128::from(lifetime) * u128::from(n);
    }

    /// Allocations per second over `[first_ns, now_ns]`; `None` before any allocation or when
    /// that span is 0.
    pub fn alloc_rate(&self, now_ns: u64) -> Option<f64> {
        let span_ns = now_ns.saturating_sub(self.first_ns);
        if self.allocs == 0 || span_ns == 0 {
            return None;
        }
        Some(self.allocs as f64 / (span_ns as f64 / 1e9))
    }

    /// What a report shows of this group's behaviour at `now_ns`.
    pub fn summary(&self, now_ns: u64) -> BehaviourSummary {
        let seconds = |ns: u64| ns as f64 / 1e9;
        BehaviourSummary {
            allocs_total: self.allocs,
            frees_total: self.frees,
            alloc_rate_per_s: self
                .alloc_rate(now_ns)
                .map(|r| (r * 1000.0).round() / 1000.0),
            lifetime_p50_s: self.lifetimes_ns.quantile(0.5).map(seconds),
            lifetime_p90_s: self.lifetimes_ns.quantile(0.9).map(seconds),
            size_p50_bytes: self.sizes.quantile(0.5),
            size_histogram: self
                .sizes
                .buckets()
                .into_iter()
                .map(|(min_bytes, max_bytes, count)| SizeBucket {
                    min_bytes,
                    max_bytes,
                    count,
                })
                .collect(),
            realloc_moves: self.realloc_moves,
            max_realloc_chain: self.max_realloc_chain,
        }
    }
}

/// One bucket of a size histogram: `count` allocations of `min_bytes..=max_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SizeBucket {
    pub min_bytes: u64,
    pub max_bytes: u64,
    pub count: u64,
}

/// What a report shows of a group's behaviour (all derived from [`StackStats`]).
///
/// Lifetimes and the median size are bucket upper bounds (see [`Log2Hist::quantile`]); the
/// allocation rate is rounded to 3 decimals.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BehaviourSummary {
    pub allocs_total: u64,
    pub frees_total: u64,
    pub alloc_rate_per_s: Option<f64>,
    pub lifetime_p50_s: Option<f64>,
    pub lifetime_p90_s: Option<f64>,
    pub size_p50_bytes: Option<u64>,
    pub size_histogram: Vec<SizeBucket>,
    pub realloc_moves: u64,
    pub max_realloc_chain: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_buckets_and_bounds() {
        let mut h = Log2Hist::default();
        for v in [0, 1, 2, 3, 4, 7, 8, 1000, u64::MAX] {
            h.add(v);
        }
        assert_eq!(h.count(), 9);
        assert_eq!(
            h.buckets(),
            vec![
                (0, 1, 2),
                (2, 3, 2),
                (4, 7, 2),
                (8, 15, 1),
                (512, 1023, 1),
                (1 << 63, u64::MAX, 1)
            ]
        );
    }

    #[test]
    fn quantiles_are_bucket_upper_bounds() {
        let mut h = Log2Hist::default();
        assert_eq!(h.quantile(0.5), None, "empty");
        // 6 values of 100 (bucket 64..127) and 4 of 5000 (bucket 4096..8191).
        for _ in 0..6 {
            h.add(100);
        }
        for _ in 0..4 {
            h.add(5000);
        }
        assert_eq!(h.quantile(0.0), Some(127), "rank 1");
        assert_eq!(h.quantile(0.5), Some(127), "rank 5 of 10");
        assert_eq!(h.quantile(0.6), Some(127), "rank 6 of 10");
        assert_eq!(
            h.quantile(0.61),
            Some(5000),
            "rank 7 of 10: never above the largest value"
        );
        assert_eq!(h.quantile(0.9), Some(5000));
        assert_eq!(h.quantile(1.0), Some(5000));
        assert_eq!(h.quantile(7.0), Some(5000), "q clamped to 1");
        assert_eq!(h.buckets(), [(100, 127, 6), (4096, 5000, 4)]);
    }

    #[test]
    fn stats_track_allocs_frees_and_outstanding() {
        let mut s = StackStats::default();
        s.on_alloc(100, 2_000_000_000, 0);
        s.on_alloc(300, 1_000_000_000, 0);
        s.on_alloc(50, 3_000_000_000, 3);
        s.on_alloc(60, 3_500_000_000, 1);
        s.on_free(300, 1_000_000_000, 1_000_500_000);
        assert_eq!((s.allocs, s.frees), (4, 1));
        assert_eq!((s.bytes_allocated, s.bytes_freed), (510, 300));
        assert_eq!((s.outstanding_allocs, s.outstanding_bytes), (3, 210));
        assert_eq!((s.first_ns, s.last_ns), (1_000_000_000, 3_500_000_000));
        assert_eq!((s.realloc_moves, s.max_realloc_chain), (2, 3));
        assert_eq!(
            s.lifetimes_ns.buckets(),
            vec![(500_000, 500_000, 1)],
            "500 µs: the bucket's bounds cut to the value seen"
        );
        // 4 allocations over [1 s, 3 s].
        assert_eq!(s.alloc_rate(3_000_000_000), Some(2.0));
        assert_eq!(s.alloc_rate(1_000_000_000), None, "zero span");
        assert_eq!(StackStats::default().alloc_rate(5), None, "no allocations");
    }

    #[test]
    fn free_never_underflows() {
        let mut s = StackStats::default();
        s.on_free(64, 10, 5);
        assert_eq!((s.outstanding_allocs, s.outstanding_bytes), (0, 0));
        assert_eq!(
            s.lifetimes_ns.quantile(0.5),
            Some(0),
            "negative lifetime counts as 0"
        );
    }

    #[test]
    fn summary_numbers() {
        let mut s = StackStats::default();
        // 10 allocations of 48 B at 0.1 s steps from t = 0; 8 freed after 1 ms, 2 after 1 s.
        for i in 0..10u64 {
            s.on_alloc(48, i * 100_000_000, 0);
        }
        for i in 0..8u64 {
            s.on_free(48, i * 100_000_000, i * 100_000_000 + 1_000_000);
        }
        for i in 8..10u64 {
            s.on_free(48, i * 100_000_000, i * 100_000_000 + 1_000_000_000);
        }
        s.on_alloc(3000, 900_000_000, 9);
        let sum = s.summary(4_000_000_000);
        assert_eq!(
            sum,
            BehaviourSummary {
                allocs_total: 11,
                frees_total: 10,
                alloc_rate_per_s: Some(2.75),
                // 1 ms lies in [2^19, 2^20 − 1] ns; 1 s in [2^29, 2^30 − 1] ns, cut to the
                // longest lifetime seen (1 s).
                lifetime_p50_s: Some(1_048_575e-9),
                lifetime_p90_s: Some(1.0),
                size_p50_bytes: Some(63),
                size_histogram: vec![
                    SizeBucket {
                        min_bytes: 48,
                        max_bytes: 63,
                        count: 10
                    },
                    SizeBucket {
                        min_bytes: 2048,
                        max_bytes: 3000,
                        count: 1
                    },
                ],
                realloc_moves: 1,
                max_realloc_chain: 9,
            }
        );
        let json = serde_json::to_value(&sum).unwrap();
        assert_eq!(json["size_histogram"][1]["min_bytes"], 2048);
        assert_eq!(json["alloc_rate_per_s"], 2.75);
    }

    #[test]
    fn empty_summary_has_no_quantiles() {
        let sum = StackStats::default().summary(1_000);
        assert_eq!(sum.alloc_rate_per_s, None);
        assert_eq!(sum.lifetime_p50_s, None);
        assert_eq!(sum.size_p50_bytes, None);
        assert!(sum.size_histogram.is_empty());
    }
}
