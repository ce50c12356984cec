//! Reading memprof's JSON records: leak groups, their frames and numbers.

use serde_json::Value;

use super::{Finished, truncate};

/// The final `report` record of a `--json` run that ended normally (exit 0, no panic).
pub(crate) fn final_report(f: &Finished) -> Value {
    assert!(
        !f.stderr.contains("panicked"),
        "memprof panicked\n{}",
        f.context()
    );
    assert_eq!(f.code(), Some(0), "memprof failed\n{}", f.context());
    let records = f.ndjson();
    let last = records
        .last()
        .unwrap_or_else(|| panic!("no output\n{}", f.context()));
    assert_eq!(last["type"], "report", "{}", f.context());
    last.clone()
}

pub(crate) fn frame_fn(frame: &Value) -> Option<&str> {
    frame.get("function").and_then(Value::as_str)
}

/// Function names of a group's frames, innermost first (`?` for a frame without one).
pub(crate) fn frame_names(group: &Value) -> Vec<&str> {
    stack(group)
        .iter()
        .map(|f| frame_fn(f).unwrap_or("?"))
        .collect()
}

/// The leak groups of a report, snapshot or process entry.
pub(crate) fn leaks(report: &Value) -> &[Value] {
    report["leaks"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

pub(crate) fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or_else(|| {
        panic!(
            "expected a non-negative integer {key:?} in {}",
            truncate(&v.to_string(), 2000)
        )
    })
}

pub(crate) fn stack(group: &Value) -> &[Value] {
    group
        .get("stack")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// The leak groups whose innermost frame (the allocator's caller) is `function`.
pub(crate) fn site_groups<'a>(report: &'a Value, function: &str) -> Vec<&'a Value> {
    leaks(report)
        .iter()
        .filter(|g| stack(g).first().and_then(frame_fn) == Some(function))
        .collect()
}

/// (bytes, blocks) outstanding in the leak groups whose innermost frame is `function`.
pub(crate) fn site_total(report: &Value, function: &str) -> (u64, u64) {
    site_groups(report, function)
        .iter()
        .fold((0, 0), |(b, n), g| {
            (b + num(g, "bytes"), n + num(g, "allocs"))
        })
}
