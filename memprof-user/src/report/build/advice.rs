//! What the report advises: churn hotspots, recommendations over the groups whose numbers
//! call for one, and `untouched` advice from RSS explained.

use super::{Group, Inputs, verdict_reason};
use crate::{
    analysis::{
        growth::{self, Verdict},
        recommend::{self, Recommendation, SiteFacts},
        rss::{self, Residency},
        tracking::GroupKey,
    },
    report::{Hotspot, names::group_name},
};

/// Hotspots listed: at most this many, each with at least `HOTSPOT_MIN_ALLOCS` allocations of
/// which at least 90% were freed.
const HOTSPOTS: usize = 5;
const HOTSPOT_MIN_ALLOCS: u64 = 1000;

pub(super) fn churn_hotspots(inputs: &Inputs<'_>) -> Vec<Hotspot> {
    let mut busy: Vec<(&GroupKey, u64)> = inputs
        .tracker
        .groups
        .iter()
        .filter(|(_, g)| {
            g.stats.allocs >= HOTSPOT_MIN_ALLOCS && g.stats.frees * 10 >= g.stats.allocs * 9
        })
        .map(|(k, g)| (k, g.stats.allocs))
        .collect();
    busy.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then_with(|| inputs.sites.order(a.0.0, b.0.0))
            .then_with(|| a.0.1.name().cmp(b.0.1.name()))
    });
    busy.truncate(HOTSPOTS);
    busy.into_iter()
        .map(|(key, _)| {
            // The whole stack: where the churn comes from is often several frames up.
            let stack = inputs.sites.frames(key.0);
            let growth = inputs.tracker.growth(key);
            Hotspot {
                site: group_name(&stack, key.1),
                allocator: key.1.name(),
                verdict: growth.map_or(Verdict::Unknown, |g| g.verdict),
                verdict_reason: verdict_reason(growth.as_ref()),
                behaviour: inputs.tracker.groups[key].stats.summary(inputs.now_ns),
                stack,
            }
        })
        .collect()
}

/// Recommendations over every group whose numbers could call for one.
pub(super) fn recommendations(inputs: &Inputs<'_>) -> Vec<Recommendation> {
    let candidates: Vec<(&GroupKey, growth::Growth, String)> = inputs
        .tracker
        .groups
        .iter()
        .filter_map(|(key, g)| {
            let growth = inputs.tracker.growth(key)?;
            let notable = matches!(growth.verdict, Verdict::Leak | Verdict::Growing)
                || g.stats.allocs >= 10_000
                || g.stats.max_realloc_chain >= 8;
            notable.then(|| {
                let frames = inputs.sites.frames(key.0);
                (key, growth, group_name(&frames, key.1))
            })
        })
        .collect();
    let facts: Vec<SiteFacts<'_>> = candidates
        .iter()
        .map(|(key, growth, site)| SiteFacts {
            site,
            stats: &inputs.tracker.groups[*key].stats,
            growth,
            now_ns: inputs.now_ns,
        })
        .collect();
    recommend::recommend(&facts)
}

/// `untouched` advice for the groups (all of them, before `--top`) holding many bytes they
/// never made resident, largest untouched first.
pub(super) fn untouched_advice(
    inputs: &Inputs<'_>,
    ranked: &[(GroupKey, Group)],
    residency: Option<&Residency>,
) -> Vec<Recommendation> {
    let Some(residency) = residency else {
        return Vec::new();
    };
    let mut out: Vec<(u64, Recommendation)> = ranked
        .iter()
        .filter_map(|(key, g)| {
            let resident = residency.groups.get(key).copied().unwrap_or(0);
            let site = group_name(&inputs.sites.frames(key.0), key.1);
            let r = rss::untouched_advice(&site, g.bytes, resident)?;
            Some((g.bytes.saturating_sub(resident), r))
        })
        .collect();
    out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.site.cmp(&b.1.site)));
    out.into_iter().map(|(_, r)| r).collect()
}
