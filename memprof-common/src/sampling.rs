//! Byte sampling: the distance to the next sampled byte, drawn in the kernel.

/// Default number of sampled live blocks the kernel remembers with `--sample-bytes`.
pub const DEFAULT_SAMPLED_ENTRIES: u32 = 256 * 1024;

/// Largest mean sampling interval the kernel accepts (the countdown arithmetic stays within
/// 64 bits up to here).
pub const MAX_SAMPLE_MEAN: u64 = 1 << 40;

/// A draw from the exponential distribution with mean `mean` bytes, from 32 uniform random bits:
/// the distance to the next sample point of a Poisson process over the allocated bytes (as
/// tcmalloc and jemalloc sample). Integer-only, no loops and no 128-bit arithmetic, so the BPF
/// verifier and backend accept it.
///
/// The result is `floor(-ln(x) * mean)` for `x = (rand + 1) / 2^32` in `(0, 1]`, computed two
/// ways. What decides whether a block of `s` bytes is sampled is `P(draw < s)`, so small draws
/// (`x` near 1, where `-ln(x)` is small) need a small *relative* error:
///
/// - `u = 1 - x < 1/8`: the series `-ln(1 - u) = u + u^2/2 + u^3/3 + u^4/4 + u^5/5` in 32-bit
///   fixed point; the terms left out are below `u^5/6`, a relative error under 5e-6.
/// - otherwise (`-ln(x) > 0.133`): `(32 - log2(rand + 1)) * ln 2`, with `log2` the position of
///   the top bit plus `log2(1 + f)` of the 16-bit mantissa `f` by a quintic fitted by least
///   squares (error under 2.9e-5 in log2 units, so a relative error under 2e-4 here).
///
/// Checked by `exp_interval_samples_with_the_right_probability`: for `s` from `mean/1024` to
/// `4 * mean`, `P(draw < s)` is `1 - exp(-s/mean)` within 1e-4 relative (2e-4 asserted), and
/// the mean draw is `mean` within 1e-5. The largest draw is about 22.2 × `mean` (`rand = 0`);
/// the smallest is 0. `mean` is capped at [`MAX_SAMPLE_MEAN`].
#[inline(always)]
pub fn exp_interval(rand: u32, mean: u64) -> u64 {
    let mean = if mean > MAX_SAMPLE_MEAN {
        MAX_SAMPLE_MEAN
    } else {
        mean
    };
    // u = 1 - x in Q32.
    let k = (u32::MAX - rand) as u64;
    if k < 1 << 29 {
        let u2 = (k * k) >> 32;
        let u3 = (u2 * k) >> 32;
        let u4 = (u3 * k) >> 32;
        let u5 = (u4 * k) >> 32;
        return mul_q32(k + u2 / 2 + u3 / 3 + u4 / 4 + u5 / 5, mean);
    }
    let v = rand as u64 + 1; // 1..=2^32
    // Position of the top bit, by binary search (no ctlz on BPF).
    let mut p: u64 = 0;
    let mut t = v;
    if t >> 16 != 0 {
        t >>= 16;
        p += 16;
    }
    if t >> 8 != 0 {
        t >>= 8;
        p += 8;
    }
    if t >> 4 != 0 {
        t >>= 4;
        p += 4;
    }
    if t >> 2 != 0 {
        t >>= 2;
        p += 2;
    }
    if t >> 1 != 0 {
        p += 1;
    }
    if v >> 32 != 0 {
        p = 32;
    }
    // Mantissa in [2^32, 2^33): its 16 bits below the top one are `f` in Q16.
    let norm = v << (32 - p);
    let f = ((norm >> 16) & 0xffff) as i64;
    // log2(1 + f) in Q16, Horner.
    let mut y: i64 = 3007;
    y = ((y * f) >> 16) - 12741;
    y = ((y * f) >> 16) + 27224;
    y = ((y * f) >> 16) - 46444;
    y = ((y * f) >> 16) + 94491;
    y = (y * f) >> 16;
    let y = if y < 0 {
        0
    } else if y > 0xffff {
        0xffff
    } else {
        y as u64
    };
    // -log2(x) in Q16 times ln 2 in Q32, back to Q32: -ln(x) in Q32 (below 23 * 2^32).
    let neg_log2 = ((32 - p) << 16).saturating_sub(y);
    mul_q32((neg_log2 * LN2_Q32) >> 16, mean)
}

/// ln 2 in 32-bit fixed point.
const LN2_Q32: u64 = 2_977_044_472;

/// `(a * b) >> 32` for `a < 2^40`, `b <= 2^40`, without 128-bit arithmetic (within 1).
#[inline(always)]
fn mul_q32(a: u64, b: u64) -> u64 {
    ((a >> 16) * b + (((a & 0xffff) * b) >> 16)) >> 16
}
