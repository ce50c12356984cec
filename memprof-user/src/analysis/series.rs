//! A bounded time series of one quantity and its least-squares line.

/// Time series of one quantity (bytes) at sample times (seconds since trace start), bounded.
///
/// At most `cap` points. When full, the series halves its resolution: the first point is kept as
/// an anchor (so the whole span is kept), and the others are merged in adjacent pairs, each pair
/// keeping its later time and later value. From then on each point stands for `stride` samples
/// (1, 2, 4, ...), so the points stay evenly spaced; the last point is replaced by each new sample
/// until it has absorbed `stride` of them, so the series always ends at the newest sample.
#[derive(Clone, Debug)]
pub struct Series {
    cap: usize,
    points: Vec<(f64, f64)>,
    /// Samples each point after the first stands for.
    stride: usize,
    /// Samples the last point (after the first) stands for so far, `1..=stride`.
    last_fill: usize,
}

impl Series {
    /// A series of at most `cap` points (raised to 8 if smaller).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(8);
        Self {
            cap,
            // Grows as points come: many series (idle groups, short-lived processes) stay
            // short or empty.
            points: Vec::new(),
            stride: 1,
            last_fill: 0,
        }
    }

    /// Appends a sample. Times are expected to be non-decreasing.
    pub fn push(&mut self, t_s: f64, value: f64) {
        if self.points.len() >= 2 && self.last_fill < self.stride {
            *self.points.last_mut().expect("len >= 2") = (t_s, value);
            self.last_fill += 1;
            return;
        }
        if self.points.len() == self.cap {
            self.halve();
            if self.last_fill < self.stride {
                *self.points.last_mut().expect("halving keeps >= 2 points") = (t_s, value);
                self.last_fill += 1;
                return;
            }
        }
        self.points.push((t_s, value));
        self.last_fill = 1;
    }

    /// Merges the points after the first in adjacent pairs and doubles the stride.
    fn halve(&mut self) {
        let rest = &self.points[1..];
        let odd = rest.len() % 2 == 1;
        let merged: Vec<(f64, f64)> = rest
            .chunks(2)
            .map(|pair| *pair.last().expect("chunks are non-empty"))
            .collect();
        self.last_fill = if odd {
            self.last_fill
        } else {
            self.stride + self.last_fill
        };
        self.points.truncate(1);
        self.points.extend(merged);
        self.stride *= 2;
    }

    /// The points, chronological.
    pub fn points(&self) -> &[(f64, f64)] {
        &self.points
    }

    /// The newest sample.
    pub fn last(&self) -> Option<(f64, f64)> {
        self.points.last().copied()
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The most points the series keeps.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Samples each point (after the first) currently stands for.
    pub fn stride(&self) -> usize {
        self.stride
    }
}

/// A least-squares line `value = intercept + slope × t`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    pub slope: f64,
    pub intercept: f64,
    pub r2: f64,
    pub n: usize,
}

/// Ordinary least squares of value on time. `None` for fewer than 2 points or zero time variance.
///
/// `r2 = 1 − SSres/SStot`, clamped to `[0, 1]`; a flat series (`SStot == 0`) has slope 0 and
/// `r2 = 1`.
pub fn least_squares(points: &[(f64, f64)]) -> Option<Fit> {
    let n = points.len();
    if n < 2 {
        return None;
    }
    let nf = n as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / nf;
    let mean_v = points.iter().map(|p| p.1).sum::<f64>() / nf;
    let (mut sxx, mut sxy, mut syy) = (0.0, 0.0, 0.0);
    for &(t, v) in points {
        let (dt, dv) = (t - mean_t, v - mean_v);
        sxx += dt * dt;
        sxy += dt * dv;
        syy += dv * dv;
    }
    if sxx <= 0.0 || !sxx.is_finite() {
        return None;
    }
    let slope = sxy / sxx;
    let intercept = mean_v - slope * mean_t;
    let r2 = if syy == 0.0 {
        1.0
    } else {
        let ss_res: f64 = points
            .iter()
            .map(|&(t, v)| {
                let e = v - (intercept + slope * t);
                e * e
            })
            .sum();
        (1.0 - ss_res / syy).clamp(0.0, 1.0)
    };
    Some(Fit {
        slope,
        intercept,
        r2,
        n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_squares_exact_lines() {
        let line: Vec<_> = (0..10)
            .map(|i| (i as f64 * 0.5, 3.0 + 2.0 * i as f64 * 0.5))
            .collect();
        let f = least_squares(&line).unwrap();
        assert!((f.slope - 2.0).abs() < 1e-9, "slope of 3 + 2t is 2: {f:?}");
        assert!(
            (f.intercept - 3.0).abs() < 1e-9,
            "intercept of 3 + 2t is 3: {f:?}"
        );
        assert!((f.r2 - 1.0).abs() < 1e-9, "an exact line has r2 1: {f:?}");
        assert_eq!(f.n, 10);

        let down = least_squares(&[(1.0, 10.0), (2.0, 7.0), (3.0, 4.0)]).unwrap();
        assert!(
            (down.slope + 3.0).abs() < 1e-9,
            "slope of 13 - 3t is -3: {down:?}"
        );
        assert!((down.intercept - 13.0).abs() < 1e-9, "{down:?}");
        assert!((down.r2 - 1.0).abs() < 1e-9, "{down:?}");

        let flat = least_squares(&[(0.0, 5.0), (1.0, 5.0), (2.0, 5.0)]).unwrap();
        assert_eq!((flat.slope, flat.intercept, flat.r2), (0.0, 5.0, 1.0));

        // Points (0,0) (1,1) (2,0): slope 0, mean 1/3, SSres = SStot, r2 = 0.
        let vee = least_squares(&[(0.0, 0.0), (1.0, 1.0), (2.0, 0.0)]).unwrap();
        assert!(vee.slope.abs() < 1e-12 && vee.r2.abs() < 1e-9, "{vee:?}");
    }

    #[test]
    fn least_squares_degenerate() {
        assert_eq!(least_squares(&[]), None);
        assert_eq!(least_squares(&[(1.0, 2.0)]), None);
        assert_eq!(
            least_squares(&[(1.0, 2.0), (1.0, 3.0)]),
            None,
            "zero time variance"
        );
    }

    #[test]
    fn series_downsampling_keeps_first_and_newest_and_cap() {
        let cap = 16;
        let mut s = Series::new(cap);
        for i in 0..10 * cap {
            s.push(i as f64, i as f64 * 10.0);
            assert!(s.len() <= cap, "{} points after {} pushes", s.len(), i + 1);
            assert_eq!(
                s.last(),
                Some((i as f64, i as f64 * 10.0)),
                "ends at the newest"
            );
        }
        let p = s.points();
        assert_eq!(p[0], (0.0, 0.0), "first sample kept");
        assert_eq!(s.last(), Some((159.0, 1590.0)));
        assert!(p.len() >= cap / 2, "{} points kept of cap {cap}", p.len());
        assert!(
            p.windows(2).all(|w| w[0].0 < w[1].0),
            "chronological: {p:?}"
        );
        // 160 samples after 3 halvings: stride 16, points at 0, 16, 32, ..., 144 and 159.
        assert_eq!(s.stride(), 16);
        let times: Vec<f64> = p.iter().map(|p| p.0).collect();
        let mut want: Vec<f64> = (0..10).map(|k| k as f64 * 16.0).collect();
        want.push(159.0);
        assert_eq!(times, want);
    }

    #[test]
    fn series_small_cap_is_raised_to_8() {
        let mut s = Series::new(2);
        assert_eq!(s.cap(), 8);
        for i in 0..100 {
            s.push(i as f64, 1.0);
        }
        assert!(s.len() <= 8 && s.len() >= 4, "{} points", s.len());
        assert_eq!(s.points()[0].0, 0.0);
        assert_eq!(s.last(), Some((99.0, 1.0)));
    }
}
