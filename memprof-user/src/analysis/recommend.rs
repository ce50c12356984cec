//! Recommendations drawn from measurements. Each one quotes the numbers it rests on, in its
//! message and in its `evidence`; no advice is given without them.
//!
//! | kind | fires when |
//! | --- | --- |
//! | `leak` | the growth verdict is `leak` |
//! | `growing` | the growth verdict is `growing` |
//! | `pool` | ≥ 10 000 allocations, at least half of them freed, median size ≤ 256 B and p90 lifetime ≤ 1 ms |
//! | `reserve` | a block was realloc'ed ≥ 8 times in a row, ending in this group |
//!
//! Sizes and lifetimes are log2-bucket upper bounds ([`Log2Hist::quantile`]), so the `pool` bar
//! is met only when the bucket's upper bound is under it (sizes ≤ 255 B, lifetimes ≤ 524 µs), and
//! what the message quotes ("≤127 B", "≤262 µs") is always true.
//!
//! Recommendations are ordered by kind as in the table, then by weight (growth rate for `leak`
//! and `growing`, allocations for `pool`, chain length for `reserve`), then by site.
//!
//! [`Log2Hist::quantile`]: super::behaviour::Log2Hist::quantile

use serde::Serialize;
use serde_json::json;

use super::behaviour::StackStats;
use super::growth::{Growth, Verdict};

/// `pool`: least number of allocations.
pub const POOL_MIN_ALLOCS: u64 = 10_000;
/// `pool`: greatest median size (bucket upper bound), bytes.
pub const POOL_MAX_MEDIAN_SIZE: u64 = 256;
/// `pool`: greatest p90 lifetime (bucket upper bound), nanoseconds.
pub const POOL_MAX_P90_LIFETIME_NS: u64 = 1_000_000;
/// `reserve`: shortest realloc chain.
pub const RESERVE_MIN_CHAIN: u32 = 8;

/// One piece of advice about one site.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recommendation {
    /// `leak`, `growing`, `pool` or `reserve`.
    pub kind: &'static str,
    pub site: String,
    pub message: String,
    /// The numbers the advice rests on.
    pub evidence: serde_json::Value,
}

/// What is known of one site (call-stack group).
#[derive(Clone, Copy, Debug)]
pub struct SiteFacts<'a> {
    /// Function of the innermost named frame, or module+address.
    pub site: &'a str,
    pub stats: &'a StackStats,
    pub growth: &'a Growth,
    pub now_ns: u64,
}

/// The recommendations for `sites` (see the module doc).
pub fn recommend(sites: &[SiteFacts<'_>]) -> Vec<Recommendation> {
    let mut out: Vec<(u8, f64, Recommendation)> = Vec::new();
    for f in sites {
        match f.growth.verdict {
            Verdict::Leak => out.push((0, f.growth.growth_bytes_per_s, leak(f))),
            Verdict::Growing => out.push((1, f.growth.growth_bytes_per_s, growing(f))),
            _ => {}
        }
        if let Some(r) = pool(f) {
            out.push((2, f.stats.allocs as f64, r));
        }
        if let Some(r) = reserve(f) {
            out.push((3, f64::from(f.stats.max_realloc_chain), r));
        }
    }
    out.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| b.1.total_cmp(&a.1))
            .then_with(|| a.2.site.cmp(&b.2.site))
    });
    out.into_iter().map(|(_, _, r)| r).collect()
}

fn leak(f: &SiteFacts<'_>) -> Recommendation {
    let g = f.growth;
    let s = f.stats;
    Recommendation {
        kind: "leak",
        site: f.site.to_string(),
        message: format!(
            "{} leaks {}/s ({}/h, r²={:.2}) — {} allocations outstanding ({}), growing for {:.0} s",
            f.site,
            fmt_bytes(g.growth_bytes_per_s),
            fmt_bytes(g.growth_bytes_per_s * 3600.0),
            g.r2,
            s.outstanding_allocs,
            fmt_bytes(s.outstanding_bytes as f64),
            g.growing_for_s,
        ),
        evidence: growth_evidence(f),
    }
}

fn growing(f: &SiteFacts<'_>) -> Recommendation {
    let g = f.growth;
    let s = f.stats;
    Recommendation {
        kind: "growing",
        site: f.site.to_string(),
        message: format!(
            "{} is growing {}/s ({}/h if it continues, r²={:.2}, confidence {:.2}; not steady \
             enough to call a leak yet) — {} allocations outstanding ({}), growing for {:.0} s",
            f.site,
            fmt_bytes(g.growth_bytes_per_s),
            fmt_bytes(g.growth_bytes_per_s * 3600.0),
            g.r2,
            g.confidence,
            s.outstanding_allocs,
            fmt_bytes(s.outstanding_bytes as f64),
            g.growing_for_s,
        ),
        evidence: growth_evidence(f),
    }
}

fn growth_evidence(f: &SiteFacts<'_>) -> serde_json::Value {
    let g = f.growth;
    json!({
        "growth_bytes_per_s": g.growth_bytes_per_s,
        "growth_bytes_per_h": g.growth_bytes_per_s * 3600.0,
        "r2": g.r2,
        "confidence": g.confidence,
        "growing_for_s": g.growing_for_s,
        "outstanding_allocs": f.stats.outstanding_allocs,
        "outstanding_bytes": f.stats.outstanding_bytes,
    })
}

fn pool(f: &SiteFacts<'_>) -> Option<Recommendation> {
    let s = f.stats;
    if s.allocs < POOL_MIN_ALLOCS || s.frees.saturating_mul(2) < s.allocs {
        return None;
    }
    let size_p50 = s
        .sizes
        .quantile(0.5)
        .filter(|&b| b <= POOL_MAX_MEDIAN_SIZE)?;
    let life_p90 = s
        .lifetimes_ns
        .quantile(0.9)
        .filter(|&ns| ns <= POOL_MAX_P90_LIFETIME_NS)?;
    let rate = s.alloc_rate(f.now_ns);
    let rate_text = rate.map_or(String::new(), |r| format!(", {r:.0}/s"));
    Some(Recommendation {
        kind: "pool",
        site: f.site.to_string(),
        message: format!(
            "pool or arena: {} allocations of ≤{} B (median) living ≤{} (p90){}, {} freed",
            s.allocs,
            size_p50,
            fmt_ns_at_most(life_p90),
            rate_text,
            s.frees,
        ),
        evidence: json!({
            "allocs": s.allocs,
            "frees": s.frees,
            "size_p50_bytes_at_most": size_p50,
            "lifetime_p90_ns_at_most": life_p90,
            "alloc_rate_per_s": rate,
        }),
    })
}

fn reserve(f: &SiteFacts<'_>) -> Option<Recommendation> {
    let s = f.stats;
    if s.max_realloc_chain < RESERVE_MIN_CHAIN {
        return None;
    }
    Some(Recommendation {
        kind: "reserve",
        site: f.site.to_string(),
        message: format!(
            "reserve capacity: a block was realloc'ed {} times in a row here ({} reallocs ended \
             in this stack)",
            s.max_realloc_chain, s.realloc_moves,
        ),
        evidence: json!({
            "max_realloc_chain": s.max_realloc_chain,
            "realloc_moves": s.realloc_moves,
        }),
    })
}

/// Bytes with a binary unit: `"640 B"`, `"1.2 KiB"`, `"4.3 MiB"`.
pub fn fmt_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A duration given as an upper bound, rounded up so the text stays an upper bound:
/// `"900 ns"`, `"525 µs"`, `"2 ms"`, `"3 s"`.
pub fn fmt_ns_at_most(ns: u64) -> String {
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{} µs", ns.div_ceil(1_000))
    } else if ns < 1_000_000_000 {
        format!("{} ms", ns.div_ceil(1_000_000))
    } else {
        format!("{} s", ns.div_ceil(1_000_000_000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn growth(verdict: Verdict, slope: f64, r2: f64) -> Growth {
        Growth {
            verdict,
            confidence: 0.9,
            growth_bytes_per_s: slope,
            r2,
            growing_for_s: 42.0,
            reason: None,
        }
    }

    fn stable() -> Growth {
        growth(Verdict::Stable, 0.0, 1.0)
    }

    /// `allocs` allocations of `size` B at 1 µs steps from t = 0, the first `frees` of them
    /// freed after `life_ns`.
    fn churn(allocs: u64, frees: u64, size: u64, life_ns: u64) -> StackStats {
        let mut s = StackStats::default();
        for i in 0..allocs {
            s.on_alloc(size, i * 1_000, 0);
        }
        for i in 0..frees {
            s.on_free(size, i * 1_000, i * 1_000 + life_ns);
        }
        s
    }

    fn run(site: &str, stats: &StackStats, growth: &Growth) -> Vec<Recommendation> {
        recommend(&[SiteFacts {
            site,
            stats,
            growth,
            now_ns: 1_000_000_000,
        }])
    }

    fn kinds(recs: &[Recommendation]) -> Vec<&'static str> {
        recs.iter().map(|r| r.kind).collect()
    }

    #[test]
    fn leak_quotes_rate_per_hour_r2_and_outstanding() {
        let mut stats = StackStats::default();
        for i in 0..37 {
            stats.on_alloc(64, i, 0);
        }
        let g = growth(Verdict::Leak, 1228.8, 0.987);
        let recs = run("parse_header", &stats, &g);
        assert_eq!(kinds(&recs), ["leak"]);
        let r = &recs[0];
        assert_eq!(r.site, "parse_header");
        assert_eq!(
            r.message,
            "parse_header leaks 1.2 KiB/s (4.2 MiB/h, r²=0.99) — 37 allocations outstanding \
             (2.3 KiB), growing for 42 s"
        );
        assert_eq!(r.evidence["outstanding_allocs"], 37);
        assert_eq!(r.evidence["growth_bytes_per_s"], 1228.8);
        assert_eq!(r.evidence["r2"], 0.987);
    }

    #[test]
    fn growing_fires_only_on_growing() {
        let stats = StackStats::default();
        let recs = run("f", &stats, &growth(Verdict::Growing, 100.0, 0.6));
        assert_eq!(kinds(&recs), ["growing"]);
        assert!(
            recs[0]
                .message
                .starts_with("f is growing 100 B/s (351.6 KiB/h"),
            "{}",
            recs[0].message
        );
        assert!(recs[0].message.contains("r²=0.60"), "{}", recs[0].message);
        for v in [Verdict::Stable, Verdict::Churn, Verdict::Unknown] {
            assert!(run("f", &stats, &growth(v, 100.0, 0.6)).is_empty(), "{v}");
        }
    }

    #[test]
    fn pool_fires_at_its_bar_with_numbers() {
        // 10 000 allocations of 100 B, all freed after 500 µs: the buckets' bounds (127 B,
        // 524 287 ns) are cut to the largest values seen.
        let stats = churn(10_000, 10_000, 100, 500_000);
        let recs = run("make_token", &stats, &stable());
        assert_eq!(kinds(&recs), ["pool"]);
        assert_eq!(
            recs[0].message,
            "pool or arena: 10000 allocations of ≤100 B (median) living ≤500 µs (p90), \
             10000/s, 10000 freed"
        );
        assert_eq!(recs[0].evidence["size_p50_bytes_at_most"], 100);
        assert_eq!(recs[0].evidence["lifetime_p90_ns_at_most"], 500_000);
        // Sizes up to 255 B still pass (bucket 128..255).
        assert_eq!(
            kinds(&run("s", &churn(10_000, 10_000, 255, 1_000), &stable())),
            ["pool"]
        );
    }

    #[test]
    fn pool_not_just_below_its_bar() {
        let g = stable();
        assert!(
            run("a", &churn(9_999, 9_999, 100, 500_000), &g).is_empty(),
            "9999 allocations"
        );
        assert!(
            run("b", &churn(10_000, 10_000, 257, 500_000), &g).is_empty(),
            "median 257 B"
        );
        assert!(
            run("c", &churn(10_000, 10_000, 100, 1_000_001), &g).is_empty(),
            "p90 lifetime over 1 ms"
        );
        assert!(
            run("d", &churn(10_000, 4_999, 100, 500_000), &g).is_empty(),
            "under half freed"
        );
        assert_eq!(
            kinds(&run("e", &churn(10_000, 5_000, 100, 500_000), &g)),
            ["pool"],
            "half freed"
        );
    }

    #[test]
    fn reserve_fires_at_chain_8() {
        let mut stats = StackStats::default();
        for k in 1..=7 {
            stats.on_alloc(64 << k, k as u64, k);
        }
        assert!(
            run("append_log", &stats, &stable()).is_empty(),
            "chain of 7"
        );
        stats.on_alloc(64 << 8, 8, 8);
        let recs = run("append_log", &stats, &stable());
        assert_eq!(kinds(&recs), ["reserve"]);
        assert_eq!(
            recs[0].message,
            "reserve capacity: a block was realloc'ed 8 times in a row here (8 reallocs ended in \
             this stack)"
        );
        assert_eq!(recs[0].evidence["max_realloc_chain"], 8);
    }

    #[test]
    fn ordered_by_kind_then_weight_then_site() {
        let empty = StackStats::default();
        let mut chained = StackStats::default();
        chained.on_alloc(1, 1, 31);
        let slow = growth(Verdict::Leak, 10.0, 0.9);
        let fast = growth(Verdict::Leak, 500.0, 0.9);
        let grow = growth(Verdict::Growing, 1e6, 0.5);
        let st = stable();
        let facts = |site, stats, growth| SiteFacts {
            site,
            stats,
            growth,
            now_ns: 1,
        };
        let recs = recommend(&[
            facts("r", &chained, &st),
            facts("g", &empty, &grow),
            facts("slow", &empty, &slow),
            facts("fast", &chained, &fast),
        ]);
        let got: Vec<_> = recs.iter().map(|r| (r.kind, r.site.as_str())).collect();
        assert_eq!(
            got,
            [
                ("leak", "fast"),
                ("leak", "slow"),
                ("growing", "g"),
                ("reserve", "fast"),
                ("reserve", "r")
            ]
        );
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_bytes(640.0), "640 B");
        assert_eq!(fmt_bytes(1536.0), "1.5 KiB");
        assert_eq!(fmt_bytes(4.5 * 1024.0 * 1024.0), "4.5 MiB");
        assert_eq!(fmt_ns_at_most(999), "999 ns");
        assert_eq!(fmt_ns_at_most(524_287), "525 µs");
        assert_eq!(fmt_ns_at_most(1_000_000), "1 ms");
        assert_eq!(fmt_ns_at_most(1_073_741_823), "2 s");
    }
}
