//! Growth of one call-stack group over time: the verdict drawn from the least-squares fit of its
//! outstanding bytes ([`series`](super::series)).
//!
//! A leak is *sustained growth*, not age: old allocations that stay constant are not a leak, and
//! young allocations that keep piling up are. The verdict looks only at the shape of the series
//! (and, for churn, at how much of what the group allocates it frees).
//!
//! # Verdict rules
//!
//! Let `n` be the number of points, `span` the time between the first and the last, `whole` the
//! fit of all points and `recent` the fit of the last `ceil(n/2)` points.
//!
//! - **Noise floor.** A fit counts as rising only if its rise over its own window
//!   (`slope × window span`) exceeds `max(4096 B, 1% of the mean value of the whole series)`
//!   ([`NOISE_FLOOR_BYTES`], [`NOISE_FLOOR_FRACTION`]): a few pages of jitter, or 1% of what the
//!   group holds, is not growth.
//! - `unknown`: `n < 5` ([`MIN_POINTS`]) or `span < 2 s` ([`MIN_SPAN_S`]).
//! - `leak`: both fits rise, the recent slope is consistent with the whole one
//!   (`0.5 × whole ≤ recent ≤ 2 × whole`, [`LEAK_MIN_RECENT_RATIO`], [`LEAK_MAX_RECENT_RATIO`]),
//!   the whole fit is good (`r² ≥ 0.8`, [`LEAK_MIN_R2`]) and the series has at least 10 points
//!   ([`LEAK_MIN_POINTS`]): steady growth through the end of the window. Mildly accelerating
//!   growth is still a leak: a quadratic rising from zero has `recent / whole = 1.5`.
//! - `growing`: the recent fit rises but the leak bar is not met: lower r², recent growth more
//!   than twice the whole-series rate (e.g. flat, then rising), a whole series that does not rise,
//!   or fewer than 10 points.
//! - `churn`: not rising recently, and the group frees most of what it allocates
//!   (`frees ≥ 0.9 × allocs` with `allocs ≥ 100`, [`CHURN_MIN_FREE_RATIO`],
//!   [`CHURN_MIN_ALLOCS`]).
//! - `stable`: everything else: constant allocations however old, a cache that filled and then
//!   plateaued (whole fit rising, recent fit flat), a shrinking group.
//!
//! # Confidence
//!
//! Rounded to 2 decimals; `w = min(1, n / 20)` weighs the length of the series
//! ([`FULL_CONFIDENCE_POINTS`]).
//!
//! - `leak`: `r²(whole) × w`; `growing`: `r²(recent) × w`.
//! - `stable`, `churn`: `w × (1 − 0.5 × clamp(recent rise / noise floor, 0, 1))`: a recent rise
//!   just under the floor halves the confidence that the group is not growing.
//! - `unknown`: 0.
//!
//! The reported slope and r² are those of the fit the verdict rests on: `whole` for `leak`,
//! `recent` for every other verdict (0 and 0 when no fit exists).

use serde::Serialize;

use super::series::{Fit, Series, least_squares};

/// Absolute part of the noise floor, in bytes.
pub const NOISE_FLOOR_BYTES: f64 = 4096.0;
/// Relative part of the noise floor, as a fraction of the series' mean value.
pub const NOISE_FLOOR_FRACTION: f64 = 0.01;
/// Fewer points than this: `unknown`.
pub const MIN_POINTS: usize = 5;
/// A shorter span (seconds): `unknown`.
pub const MIN_SPAN_S: f64 = 2.0;
/// Least r² of the whole-series fit for `leak`.
pub const LEAK_MIN_R2: f64 = 0.8;
/// Least number of points for `leak`.
pub const LEAK_MIN_POINTS: usize = 10;
/// `leak` needs `recent slope ≥ this × whole slope` (growth continues to the end).
pub const LEAK_MIN_RECENT_RATIO: f64 = 0.5;
/// `leak` needs `recent slope ≤ this × whole slope` (growth is not just starting).
pub const LEAK_MAX_RECENT_RATIO: f64 = 2.0;
/// `churn` needs `frees ≥ this × allocs`.
pub const CHURN_MIN_FREE_RATIO: f64 = 0.9;
/// `churn` needs at least this many allocations.
pub const CHURN_MIN_ALLOCS: u64 = 100;
/// Shortest span of samples (seconds) over which a heap growth rate is given: a rate from a
/// few seconds extrapolated to an hour says nothing.
pub const RATE_MIN_SPAN_S: f64 = 5.0;
/// Least r² of the fit for a heap growth rate.
pub const RATE_MIN_R2: f64 = 0.8;

/// The growth of a heap (bytes/s) from its samples over the trace (or over a process's life,
/// its samples ending when it exited), or why none is given: fewer than [`MIN_POINTS`]
/// samples, a span under [`RATE_MIN_SPAN_S`], or a fit with `r² <` [`RATE_MIN_R2`].
pub fn heap_rate(points: &[(f64, f64)]) -> Result<f64, String> {
    if points.len() < MIN_POINTS {
        return Err(format!("{} samples, fewer than {MIN_POINTS}", points.len()));
    }
    let span = match (points.first(), points.last()) {
        (Some(a), Some(b)) => b.0 - a.0,
        _ => 0.0,
    };
    if span < RATE_MIN_SPAN_S {
        return Err(format!(
            "samples span {span:.1} s, under {RATE_MIN_SPAN_S} s"
        ));
    }
    let fit = least_squares(points).ok_or_else(|| "no fit".to_string())?;
    if fit.r2 < RATE_MIN_R2 {
        return Err(format!("weak fit (r² {:.2} < {RATE_MIN_R2})", fit.r2));
    }
    Ok(fit.slope)
}

/// Number of points at which confidence is no longer reduced for shortness.
pub const FULL_CONFIDENCE_POINTS: f64 = 20.0;

/// What the series of a group says about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Leak,
    Growing,
    Stable,
    Churn,
    Unknown,
}

impl Verdict {
    /// The name outputs use (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Leak => "leak",
            Verdict::Growing => "growing",
            Verdict::Stable => "stable",
            Verdict::Churn => "churn",
            Verdict::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Allocation activity of the group over the same window (from behaviour stats).
#[derive(Clone, Copy, Debug, Default)]
pub struct Activity {
    pub allocs: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
}

/// The verdict on one group, with the numbers it rests on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Growth {
    pub verdict: Verdict,
    /// 0..=1, rounded to 2 decimals.
    pub confidence: f64,
    /// Slope of the fit the verdict rests on.
    pub growth_bytes_per_s: f64,
    /// r² of that fit.
    pub r2: f64,
    /// Time from the last sample within the noise floor of the series' minimum to the newest
    /// sample (0 unless `leak` or `growing`).
    pub growing_for_s: f64,
    /// Why the verdict is `unknown` (None for every other verdict).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

/// Why a group's verdict is `unknown`: its series is too short.
pub const UNKNOWN_FEW_SAMPLES: &str = "fewer than 5 samples";
pub const UNKNOWN_SHORT_SPAN: &str = "samples span under 2 s";

impl Growth {
    fn unknown(fit: Option<Fit>, reason: &'static str) -> Self {
        Self {
            reason: Some(reason),
            verdict: Verdict::Unknown,
            confidence: 0.0,
            growth_bytes_per_s: fit.map_or(0.0, |f| f.slope),
            r2: fit.map_or(0.0, |f| f.r2),
            growing_for_s: 0.0,
        }
    }
}

/// The noise floor of a series: `max(4096 B, 1% of its mean value)`.
pub fn noise_floor(points: &[(f64, f64)]) -> f64 {
    if points.is_empty() {
        return NOISE_FLOOR_BYTES;
    }
    let mean = points.iter().map(|p| p.1).sum::<f64>() / points.len() as f64;
    NOISE_FLOOR_BYTES.max(NOISE_FLOOR_FRACTION * mean.abs())
}

/// Rise of `fit` over the window `points` (slope × span).
fn rise(fit: &Fit, points: &[(f64, f64)]) -> f64 {
    let span = points.last().map_or(0.0, |l| l.0) - points.first().map_or(0.0, |f| f.0);
    fit.slope * span
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Classifies a group from its series and its allocation activity (see the module doc).
pub fn classify(series: &Series, activity: &Activity) -> Growth {
    let points = series.points();
    let n = points.len();
    let whole = least_squares(points);
    let span = match (points.first(), points.last()) {
        (Some(first), Some(last)) => last.0 - first.0,
        _ => 0.0,
    };
    if n < MIN_POINTS {
        return Growth::unknown(whole, UNKNOWN_FEW_SAMPLES);
    }
    let Some(whole) = whole.filter(|_| span >= MIN_SPAN_S) else {
        return Growth::unknown(whole, UNKNOWN_SHORT_SPAN);
    };
    let recent_points = &points[n - n.div_ceil(2)..];
    let Some(recent) = least_squares(recent_points) else {
        return Growth::unknown(Some(whole), UNKNOWN_SHORT_SPAN);
    };

    let floor = noise_floor(points);
    let whole_rises = rise(&whole, points) > floor;
    let recent_rise = rise(&recent, recent_points);
    let recent_rises = recent_rise > floor;
    let weight = (n as f64 / FULL_CONFIDENCE_POINTS).min(1.0);

    if recent_rises {
        let steady = whole_rises
            && recent.slope >= LEAK_MIN_RECENT_RATIO * whole.slope
            && recent.slope <= LEAK_MAX_RECENT_RATIO * whole.slope
            && whole.r2 >= LEAK_MIN_R2
            && n >= LEAK_MIN_POINTS;
        let (verdict, fit) = if steady {
            (Verdict::Leak, whole)
        } else {
            (Verdict::Growing, recent)
        };
        return Growth {
            verdict,
            confidence: round2(fit.r2 * weight),
            growth_bytes_per_s: fit.slope,
            r2: fit.r2,
            growing_for_s: growing_for(points, floor),
            reason: None,
        };
    }

    let churn = activity.allocs >= CHURN_MIN_ALLOCS
        && activity.frees as f64 >= CHURN_MIN_FREE_RATIO * activity.allocs as f64;
    let near_floor = (recent_rise / floor).clamp(0.0, 1.0);
    Growth {
        verdict: if churn {
            Verdict::Churn
        } else {
            Verdict::Stable
        },
        confidence: round2(weight * (1.0 - 0.5 * near_floor)),
        growth_bytes_per_s: recent.slope,
        r2: recent.r2,
        growing_for_s: 0.0,
        reason: None,
    }
}

/// Time from the last point within `floor` of the series' minimum to the newest point.
fn growing_for(points: &[(f64, f64)], floor: f64) -> f64 {
    let min = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let start = points
        .iter()
        .rev()
        .find(|p| p.1 <= min + floor)
        .map_or(0.0, |p| p.0);
    points.last().map_or(0.0, |l| l.0 - start)
}

/// Hours until `current` reaches `limit` at `slope_bytes_per_s`; `None` if the slope is not
/// positive, `current` is already at or over `limit`, or an input is not finite.
pub fn projection_hours(current: f64, slope_bytes_per_s: f64, limit: f64) -> Option<f64> {
    if !(current.is_finite() && slope_bytes_per_s.is_finite() && limit.is_finite())
        || slope_bytes_per_s <= 0.0
        || current >= limit
    {
        return None;
    }
    Some((limit - current) / slope_bytes_per_s / 3600.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic jitter in [-1, 1].
    fn jitter(i: usize) -> f64 {
        (i as f64 * 2.4).sin()
    }

    fn series(values: impl IntoIterator<Item = (f64, f64)>) -> Series {
        let mut s = Series::new(512);
        for (t, v) in values {
            s.push(t, v);
        }
        s
    }

    fn quiet() -> Activity {
        Activity::default()
    }

    #[test]
    fn linear_growth_with_jitter_is_a_leak() {
        // 1000 B/s for 30 s from 50 KB, each value jittered by up to ±2% of the growth so far.
        let s = series((0..=30).map(|i| {
            let t = i as f64;
            (t, 50_000.0 + 1000.0 * t * (1.0 + 0.02 * jitter(i)))
        }));
        let g = classify(&s, &quiet());
        assert_eq!(g.verdict, Verdict::Leak, "{g:?}");
        assert!(
            (g.growth_bytes_per_s - 1000.0).abs() < 10.0,
            "slope within 1% of 1000 B/s: {g:?}"
        );
        assert!(g.r2 > 0.95, "{g:?}");
        assert!(g.confidence > 0.95 && g.confidence <= 1.0, "{g:?}");
        assert!(g.growing_for_s >= 25.0, "growing nearly all 30 s: {g:?}");
    }

    #[test]
    fn slow_leak_of_young_allocations_is_found() {
        // 64 B/s for 300 s: every block is young, but the group keeps growing.
        let s = series((0..=300).map(|i| (i as f64, 64.0 * i as f64)));
        let activity = Activity {
            allocs: 300,
            frees: 0,
            bytes_allocated: 19_200,
        };
        let g = classify(&s, &activity);
        assert_eq!(g.verdict, Verdict::Leak, "{g:?}");
        assert!((g.growth_bytes_per_s - 64.0).abs() < 1e-9, "{g:?}");
        assert_eq!(
            g.growing_for_s,
            300.0 - 64.0,
            "from t = 64 s, the last point within 4096 B of the minimum"
        );
    }

    #[test]
    fn fill_then_plateau_is_stable() {
        // Rises 100 KB/s for 20 s, then flat at 2 MB for 40 s: a cache, not a leak.
        let s = series((0..=60).map(|i| {
            let t = i as f64;
            (t, 100_000.0 * t.min(20.0) + 2_000.0 * jitter(i))
        }));
        let whole = least_squares(s.points()).unwrap();
        assert!(whole.slope > 10_000.0, "the whole series rises: {whole:?}");
        let g = classify(&s, &quiet());
        assert_eq!(g.verdict, Verdict::Stable, "{g:?}");
        assert_eq!(g.growing_for_s, 0.0);
    }

    #[test]
    fn heap_rate_needs_span_points_and_fit() {
        let line: Vec<(f64, f64)> = (0..7).map(|i| (i as f64, 1000.0 * i as f64)).collect();
        assert_eq!(heap_rate(&line), Ok(1000.0));
        let short: Vec<(f64, f64)> = (0..7).map(|i| (i as f64 * 0.5, 1e6 * i as f64)).collect();
        assert_eq!(
            heap_rate(&short),
            Err("samples span 3.0 s, under 5 s".to_string())
        );
        assert_eq!(
            heap_rate(&line[..4]),
            Err("4 samples, fewer than 5".to_string())
        );
        let noise: Vec<(f64, f64)> = (0..12)
            .map(|i| (i as f64, if i % 2 == 0 { 0.0 } else { 1e6 }))
            .collect();
        assert!(
            heap_rate(&noise)
                .unwrap_err()
                .starts_with("weak fit (r² 0.0")
        );
    }

    #[test]
    fn constant_series_is_stable_with_slope_0() {
        let s = series((0..30).map(|i| (i as f64, 1_048_576.0)));
        let g = classify(&s, &quiet());
        assert_eq!(
            g,
            Growth {
                verdict: Verdict::Stable,
                confidence: 1.0,
                growth_bytes_per_s: 0.0,
                r2: 1.0,
                growing_for_s: 0.0,
                reason: None,
            }
        );
    }

    #[test]
    fn sawtooth_with_frees_is_churn() {
        // 50 KB plus a 0..8 KB sawtooth of period 5 s, for 60 s.
        let s = series((0..60).map(|i| (i as f64, 50_000.0 + 2_000.0 * (i % 5) as f64)));
        let busy = Activity {
            allocs: 10_000,
            frees: 9_990,
            bytes_allocated: 1 << 20,
        };
        assert_eq!(classify(&s, &busy).verdict, Verdict::Churn);
        let keeps = Activity {
            frees: 8_999,
            ..busy
        };
        assert_eq!(
            classify(&s, &keeps).verdict,
            Verdict::Stable,
            "8999 of 10000 freed is under 90%"
        );
        let few = Activity {
            allocs: 99,
            frees: 99,
            bytes_allocated: 99,
        };
        assert_eq!(
            classify(&s, &few).verdict,
            Verdict::Stable,
            "99 allocs < 100"
        );
    }

    #[test]
    fn too_few_points_or_too_short_is_unknown() {
        let three = series([(0.0, 0.0), (1.0, 1e6), (2.0, 2e6)]);
        let g = classify(&three, &quiet());
        assert_eq!(g.verdict, Verdict::Unknown);
        assert_eq!(g.reason, Some(UNKNOWN_FEW_SAMPLES));
        assert_eq!(g.confidence, 0.0);
        let short = series((0..10).map(|i| (i as f64 * 0.1, 1e6 * i as f64)));
        let g = classify(&short, &quiet());
        assert_eq!(g.verdict, Verdict::Unknown, "0.9 s span");
        assert_eq!(g.reason, Some(UNKNOWN_SHORT_SPAN));
        let long = series((0..10).map(|i| (i as f64, 1e6 * i as f64)));
        assert_eq!(
            classify(&long, &quiet()).reason,
            None,
            "a verdict needs no reason"
        );
        assert_eq!(
            classify(&Series::new(8), &quiet()).verdict,
            Verdict::Unknown
        );
    }

    #[test]
    fn quadratic_growth_is_a_leak() {
        // v = 100 t²: recent slope / whole slope is about 1.5, within the leak's 0.5..2.
        let s = series((0..=30).map(|i| (i as f64, 100.0 * (i * i) as f64)));
        let g = classify(&s, &quiet());
        assert_eq!(g.verdict, Verdict::Leak, "{g:?}");
        assert!(g.r2 >= 0.9 && g.r2 < 1.0, "{g:?}");
    }

    #[test]
    fn flat_then_rising_is_growing() {
        // Flat at 1 MB for 20 s, then +20 KB/s for 10 s: recent rate more than twice the whole.
        let s = series((0..=30).map(|i| {
            let t = i as f64;
            (t, 1_000_000.0 + 20_000.0 * (t - 20.0).max(0.0))
        }));
        let g = classify(&s, &quiet());
        assert_eq!(g.verdict, Verdict::Growing, "{g:?}");
        assert_eq!(g.growing_for_s, 10.0, "rising since t = 20 s");
        assert!(g.growth_bytes_per_s > 10_000.0, "{g:?}");
    }

    #[test]
    fn short_steady_growth_is_growing_not_leak() {
        // 8 points (< 10) of a perfect line.
        let s = series((0..8).map(|i| (i as f64, 10_000.0 * i as f64)));
        let g = classify(&s, &quiet());
        assert_eq!(g.verdict, Verdict::Growing, "{g:?}");
        assert_eq!(g.confidence, 0.4, "r2 1 × 8/20");
    }

    #[test]
    fn jitter_under_the_noise_floor_is_not_growth() {
        // +100 B/s on 1 MB over 30 s: 3 KB, under max(4096, 1% of 1 MB).
        let s = series((0..=30).map(|i| (i as f64, 1e6 + 100.0 * i as f64)));
        let g = classify(&s, &quiet());
        assert_eq!(g.verdict, Verdict::Stable, "{g:?}");
        assert!(
            g.confidence < 1.0,
            "rise near the floor lowers confidence: {g:?}"
        );
    }

    #[test]
    fn projection_hours_arithmetic() {
        assert_eq!(projection_hours(1000.0, 1.0, 1000.0 + 7200.0), Some(2.0));
        assert_eq!(projection_hours(0.0, 1024.0, 1024.0 * 3600.0), Some(1.0));
        assert_eq!(projection_hours(100.0, 0.0, 200.0), None, "no growth");
        assert_eq!(projection_hours(100.0, -5.0, 200.0), None, "shrinking");
        assert_eq!(projection_hours(300.0, 5.0, 200.0), None, "already over");
        assert_eq!(
            projection_hours(200.0, 5.0, 200.0),
            None,
            "already at the limit"
        );
    }

    #[test]
    fn verdict_serializes_lowercase() {
        assert_eq!(serde_json::to_string(&Verdict::Leak).unwrap(), "\"leak\"");
        assert_eq!(Verdict::Churn.to_string(), "churn");
    }
}
