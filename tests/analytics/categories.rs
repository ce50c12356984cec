//! Categories: a `--category` rule, and every other group in its module's category.

use serde_json::Value;

use super::{
    array,
    growth::{CACHE_SIZE, CACHE_SLOTS, CHURN_SIZE, CHURN_SLOTS, LEAK_SIZE, growth_run},
    summary,
};
use crate::common::{Checks, frame_fn, leaks, num, stack};

/// `--category mine=steady_leak`: the rule's category holds exactly the steady_leak groups;
/// every other group falls into its module (the fixture binary, `growth`); together the
/// categories cover every group.
#[test]
fn categories_rule_and_modules() {
    let (run, facts) = growth_run();
    let report = run.report();
    let cats = array(&report, "categories");
    let mut c = Checks::new("categories");
    let in_leak = |g: &&Value| stack(g).iter().any(|f| frame_fn(f) == Some("steady_leak"));
    let mine_groups: Vec<&Value> = leaks(&report).iter().filter(in_leak).collect();
    let mine_bytes: u64 = mine_groups.iter().map(|g| num(g, "bytes")).sum();
    let mine_allocs: u64 = mine_groups.iter().map(|g| num(g, "allocs")).sum();
    c.eq(
        "steady_leak bytes (leaks x 1000)",
        mine_bytes,
        facts.leaks * LEAK_SIZE,
    );
    let mine: Vec<&Value> = cats.iter().filter(|k| k["name"] == "mine").collect();
    c.eq("categories named mine", mine.len(), 1);
    if let Some(m) = mine.first() {
        c.eq("mine.by", m["by"].as_str(), Some("rule"));
        c.eq("mine.bytes", m["bytes"].as_u64(), Some(mine_bytes));
        c.eq("mine.allocs", m["allocs"].as_u64(), Some(mine_allocs));
        c.eq(
            "mine.groups",
            m["groups"].as_u64(),
            Some(mine_groups.len() as u64),
        );
    }
    let others: Vec<&Value> = leaks(&report).iter().filter(|g| !in_leak(g)).collect();
    let module: Vec<&Value> = cats.iter().filter(|k| k["name"] == "growth").collect();
    c.eq(
        "categories named growth (the fixture's module)",
        module.len(),
        1,
    );
    if let Some(m) = module.first() {
        c.eq("growth.by", m["by"].as_str(), Some("module"));
        c.eq(
            "growth.bytes (cache_put + churn_buffers)",
            m["bytes"].as_u64(),
            Some(others.iter().map(|g| num(g, "bytes")).sum()),
        );
        c.eq(
            "growth.bytes value",
            m["bytes"].as_u64(),
            Some(CACHE_SLOTS * CACHE_SIZE + CHURN_SLOTS * CHURN_SIZE),
        );
    }
    let cat_bytes: u64 = cats.iter().map(|k| num(k, "bytes")).sum();
    let leak_bytes: u64 = leaks(&report).iter().map(|g| num(g, "bytes")).sum();
    c.eq(
        "sum of category bytes vs sum of leak bytes",
        cat_bytes,
        leak_bytes,
    );
    c.finish(|| summary(&report));
}
