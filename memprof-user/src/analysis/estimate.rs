//! How far a sampled estimate (`--sample-bytes`) may be from the exact value: 95% confidence
//! intervals from the variances the analysis sums as it goes.
//!
//! Every estimate of a sampled trace is a sum over the sampled blocks (see
//! `table::sample_variance`), so its variance is estimated by a sum too, kept beside it: added
//! at each sampled allocation, taken away at its free. The interval is the normal one,
//! `estimate ± 1.96 σ`, cut at 0; the peak has one of its own (see the peak module).

use serde::Serialize;

/// The two-sided 95% quantile of the normal distribution.
pub const Z95: f64 = 1.959_963_984_540_054;

/// A 95% confidence interval `[low, high]` (written as a two-element array).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Bounds(pub [u64; 2]);

impl Bounds {
    /// `estimate ± 1.96 sqrt(variance)`, the low end cut at 0, both ends rounded outwards.
    pub fn around(estimate: u64, variance: f64) -> Self {
        Self::between(estimate as f64, estimate as f64, variance, variance)
    }

    /// `[low - 1.96 σ_low, high + 1.96 σ_high]`, cut at 0 and rounded outwards.
    pub fn between(low: f64, high: f64, var_low: f64, var_high: f64) -> Self {
        let sd = |v: f64| {
            if v.is_finite() {
                v.max(0.0).sqrt()
            } else {
                0.0
            }
        };
        let lo = (low - Z95 * sd(var_low)).max(0.0).floor();
        let hi = (high + Z95 * sd(var_high)).max(0.0).ceil();
        Self([lo as u64, hi.min(u64::MAX as f64) as u64])
    }

    /// Bytes only: the high end at least `estimate + 3 × mean` (`mean` the sampling interval).
    /// Bytes that were never sampled leave no variance behind: with none sampled the estimate
    /// is 0 with variance 0, yet up to `-ln(0.05) × mean ≈ 3 × mean` bytes go unsampled with
    /// probability 5% (the gaps between sample points are exponential with mean `mean`).
    pub fn with_unseen(self, estimate: u64, mean: u64) -> Self {
        let floor = estimate.saturating_add(mean.saturating_mul(3));
        Self([self.0[0], self.0[1].max(floor)])
    }

    pub fn low(&self) -> u64 {
        self.0[0]
    }

    pub fn high(&self) -> u64 {
        self.0[1]
    }

    /// Whether `v` lies in the interval.
    pub fn contains(&self, v: u64) -> bool {
        self.low() <= v && v <= self.high()
    }
}

/// Variances of sampled estimates of bytes and blocks, summed as blocks come and go.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spread {
    pub bytes: f64,
    pub blocks: f64,
}

impl Spread {
    pub fn add(&mut self, other: &Spread) {
        self.bytes += other.bytes;
        self.blocks += other.blocks;
    }

    /// Takes `other` away; an empty set's variance is 0 exactly (no rounding left over).
    pub fn sub(&mut self, other: &Spread, empty: bool) {
        if empty {
            *self = Spread::default();
        } else {
            self.bytes = (self.bytes - other.bytes).max(0.0);
            self.blocks = (self.blocks - other.blocks).max(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_normal_intervals_cut_at_zero() {
        assert_eq!(Bounds::around(1000, 100.0).0, [980, 1020]);
        assert_eq!(Bounds::around(10, 10_000.0).0, [0, 206]);
        assert_eq!(Bounds::around(5, 0.0).0, [5, 5]);
        assert_eq!(Bounds::around(5, f64::NAN).0, [5, 5]);
        assert_eq!(Bounds::between(100.0, 300.0, 0.0, 25.0).0, [100, 310]);
        assert!(Bounds::around(1000, 100.0).contains(1019));
        assert!(!Bounds::around(1000, 100.0).contains(1021));
        assert_eq!(serde_json::to_string(&Bounds([1, 2])).unwrap(), "[1,2]");
        assert_eq!(Bounds::around(0, 0.0).with_unseen(0, 100).0, [0, 300]);
        assert_eq!(Bounds([5, 10_000]).with_unseen(5_000, 100).0, [5, 10_000]);
    }

    #[test]
    fn spread_of_an_empty_set_is_zero() {
        let mut s = Spread::default();
        let a = Spread {
            bytes: 0.1,
            blocks: 0.2,
        };
        s.add(&a);
        s.add(&a);
        s.sub(&a, false);
        assert!((s.bytes - 0.1).abs() < 1e-12);
        s.sub(&a, true);
        assert_eq!(s, Spread::default());
    }
}
