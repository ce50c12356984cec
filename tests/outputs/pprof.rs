//! pprof: `go tool pprof -top` and `-raw` on the profile.

use std::{collections::BTreeMap, process::Command};

use super::{INUSE_BYTES, LEAK_FN, SITES, TOTAL_ALLOCS, context, fixture, run, trace};

fn go_pprof(args: &[&str]) -> String {
    let t = trace();
    let mut cmd = Command::new("go");
    cmd.args(["tool", "pprof"])
        .args(args)
        .arg(t.file("profile.pb.gz"));
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "{}",
        context(&format!("{cmd:?}"), &out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `-top` rows as function → flat value (as printed).
fn top_flat(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() >= 6).then(|| (cols[5..].join(" "), cols[0].to_owned()))
        })
        .collect()
}

#[test]
fn pprof_top_inuse_space_exact_bytes() {
    let text = go_pprof(&["-top", "-sample_index=inuse_space", "-unit=B"]);
    assert!(text.contains("Type: inuse_space"), "{text}");
    // pprof names the first mapping as the profiled file: the executable comes first.
    assert!(text.starts_with("File: outputs\n"), "{text}");
    assert!(
        text.contains(&format!("Total samples = {INUSE_BYTES}B")),
        "{text}"
    );
    let flat = top_flat(&text);
    assert_eq!(
        flat.get(LEAK_FN).map(String::as_str),
        Some("21000B"),
        "{text}"
    );
    assert_eq!(
        flat.get("leak_tables").map(String::as_str),
        Some("7000B"),
        "{text}"
    );
    assert!(
        !flat.contains_key("churn_buffers") || flat["churn_buffers"] == "0",
        "{text}"
    );
    // The default sample type is inuse_space.
    let default = go_pprof(&["-top", "-unit=B"]);
    assert!(default.contains("Type: inuse_space"), "{default}");
}

#[test]
fn pprof_top_alloc_objects_and_space_exact() {
    let text = go_pprof(&["-top", "-sample_index=alloc_objects"]);
    assert!(
        text.contains(&format!("Total samples = {TOTAL_ALLOCS} ")),
        "{text}"
    );
    let flat = top_flat(&text);
    let bytes_text = go_pprof(&["-top", "-sample_index=alloc_space", "-unit=B"]);
    let flat_bytes = top_flat(&bytes_text);
    for (function, bytes, blocks, _, _) in SITES {
        assert_eq!(
            flat.get(function),
            Some(&blocks.to_string()),
            "{function}\n{text}"
        );
        assert_eq!(
            flat_bytes.get(function),
            Some(&format!("{bytes}B")),
            "{function}\n{bytes_text}"
        );
    }
    let inuse_objects = top_flat(&go_pprof(&["-top", "-sample_index=inuse_objects"]));
    assert_eq!(inuse_objects.get(LEAK_FN).map(String::as_str), Some("7"));
}

#[test]
fn pprof_raw_has_labels_lines_and_build_id() {
    let raw = go_pprof(&["-raw"]);
    assert!(
        raw.contains("allocator:[malloc]") && raw.contains("allocator:[calloc]"),
        "{raw}"
    );
    assert!(raw.contains("kind:[heap]"), "{raw}");
    assert!(
        raw.lines()
            .any(|l| l.contains(" leak_widgets ") && l.contains("outputs.c:")),
        "leak_widgets location with file:line\n{raw}"
    );
    let readelf = run(Command::new("readelf").arg("-n").arg(fixture()));
    let readelf = String::from_utf8_lossy(&readelf.stdout);
    let build_id = readelf
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build id in readelf -n\n{readelf}"));
    let fixture_path = fixture().to_str().unwrap();
    assert!(
        raw.lines()
            .any(|l| l.contains(fixture_path) && l.contains(build_id)),
        "mapping of {fixture_path} with build id {build_id}\n{raw}"
    );
}
