//! DHAT: compared field by field with valgrind's own `--tool=dhat` file for the same program.

use std::{collections::BTreeSet, ffi::OsString, fs, process::Command, sync::OnceLock};

use serde_json::Value;

use super::{LEAK_BLOCKS, LEAK_BYTES, LEAK_FN, SITES, TAG, context, fixture, run, trace, work_dir};
use crate::common::wait_for_probe_removal;

/// valgrind's DHAT file for the same fixture and argument.
fn valgrind_dhat() -> &'static Value {
    static DHAT: OnceLock<Value> = OnceLock::new();
    DHAT.get_or_init(|| {
        let path = work_dir().join("valgrind.dhat.json");
        let _ = fs::remove_file(&path);
        let mut arg = OsString::from("--dhat-out-file=");
        arg.push(&path);
        wait_for_probe_removal();
        let out = run(Command::new("valgrind")
            .arg("--tool=dhat")
            .arg(arg)
            .arg(fixture())
            .arg(TAG));
        assert!(
            out.status.success(),
            "{}",
            context("valgrind --tool=dhat", &out)
        );
        serde_json::from_slice(&fs::read(&path).unwrap()).expect("valgrind's DHAT file is JSON")
    })
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A DHAT frame's function: `0x1092A5: leak_widgets (outputs.c:47)` → `leak_widgets`.
fn dhat_function(frame: &str) -> &str {
    let rest = frame.split_once(": ").map_or(frame, |(_, r)| r);
    rest.split(" (").next().unwrap_or(rest)
}

/// A DHAT frame without its address: `leak_widgets (outputs.c:47)`.
fn dhat_place(frame: &str) -> &str {
    frame.split_once(": ").map_or(frame, |(_, r)| r)
}

/// The program's own frames of each pp (valgrind's allocator frames, in its preload library,
/// left out), and its numbers.
fn dhat_points(file: &Value) -> Vec<(Vec<String>, &Value)> {
    let ftbl: Vec<&str> = file["ftbl"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    file["pps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pp| {
            let frames = pp["fs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| ftbl[i.as_u64().unwrap() as usize].to_owned())
                .filter(|f| !f.contains("vgpreload"))
                .collect();
            (frames, pp)
        })
        .collect()
}

/// Sum of `field` over the pps whose innermost program frame is `function`.
fn dhat_sum(points: &[(Vec<String>, &Value)], function: &str, field: &str) -> u64 {
    points
        .iter()
        .filter(|(f, _)| f.first().is_some_and(|f| dhat_function(f) == function))
        .map(|(_, pp)| {
            pp[field]
                .as_u64()
                .unwrap_or_else(|| panic!("{field} in {pp}"))
        })
        .sum()
}

#[test]
fn dhat_has_valgrinds_fields() {
    let t = trace();
    let ours: Value = serde_json::from_str(&t.read("dhat.json")).expect("DHAT file is JSON");
    let theirs = valgrind_dhat();
    // Top level: the same fields, of the same JSON types.
    assert_eq!(keys(&ours), keys(theirs), "top-level fields");
    for k in keys(theirs) {
        assert_eq!(json_kind(&ours[&k]), json_kind(&theirs[&k]), "type of {k}");
    }
    for k in ["dhatFileVersion", "mode", "verb", "bklt"] {
        assert_eq!(ours[k], theirs[k], "{k}");
    }
    // memprof sees no reads or writes: bkacc false, so rb/wb (and acc) are not written, as
    // DHAT's viewer expects (it asks for rb/wb only when bkacc is true).
    assert_eq!(ours["bkacc"], false);
    assert_eq!(theirs["bkacc"], true);
    let access: BTreeSet<String> = ["rb", "wb", "acc"].map(String::from).into();
    let ours_pps = ours["pps"].as_array().unwrap();
    assert!(!ours_pps.is_empty());
    for (i, pp) in theirs["pps"].as_array().unwrap().iter().enumerate() {
        let want: BTreeSet<String> = keys(pp).difference(&access).cloned().collect();
        for (j, mine) in ours_pps.iter().enumerate() {
            assert_eq!(
                keys(mine),
                want,
                "fields of memprof pp {j} vs valgrind pp {i}"
            );
            for k in &want {
                assert_eq!(
                    json_kind(&mine[k]),
                    json_kind(&pp[k]),
                    "type of pps[{j}].{k}"
                );
            }
        }
    }
    assert_eq!(ours["ftbl"][0], "[root]");
    assert_eq!(theirs["ftbl"][0], "[root]");
    assert_eq!(ours["pid"], t.pid);
    assert_eq!(ours["cmd"], format!("{} {TAG}", fixture().display()));
    assert!(ours["tg"].as_u64().unwrap() <= ours["te"].as_u64().unwrap());
    let te_s = ours["te"].as_f64().unwrap() / 1e6;
    let duration = t.report["duration_s"].as_f64().unwrap();
    // The profile is built just after the report (tens of ms later): te is its duration.
    assert!(
        (te_s - duration).abs() < 0.5,
        "te {te_s} s vs duration {duration} s"
    );
}

#[test]
fn dhat_numbers_match_valgrind() {
    let t = trace();
    let ours: Value = serde_json::from_str(&t.read("dhat.json")).unwrap();
    let theirs = valgrind_dhat();
    let (mine, vg) = (dhat_points(&ours), dhat_points(theirs));
    // Exact numbers for the leak site, from the fixture.
    for (field, want) in [
        ("tb", LEAK_BYTES),
        ("tbk", LEAK_BLOCKS),
        ("mb", LEAK_BYTES),
        ("mbk", LEAK_BLOCKS),
        ("eb", LEAK_BYTES),
        ("ebk", LEAK_BLOCKS),
    ] {
        assert_eq!(
            dhat_sum(&mine, LEAK_FN, field),
            want,
            "memprof {LEAK_FN}.{field}"
        );
    }
    // Every site's totals and end state agree with valgrind's, and with the fixture.
    for (function, bytes, blocks, inuse_bytes, inuse_blocks) in SITES {
        for (field, want) in [
            ("tb", bytes),
            ("tbk", blocks),
            ("eb", inuse_bytes),
            ("ebk", inuse_blocks),
        ] {
            assert_eq!(
                dhat_sum(&vg, function, field),
                want,
                "valgrind {function}.{field}"
            );
            assert_eq!(
                dhat_sum(&mine, function, field),
                want,
                "memprof {function}.{field}"
            );
        }
        // Lifetimes: the site's blocks lived a positive time; gb never exceeds mb.
        assert!(dhat_sum(&mine, function, "tl") > 0, "{function}.tl");
        assert!(dhat_sum(&mine, function, "gb") <= dhat_sum(&mine, function, "mb"));
    }
    // Frames are written like valgrind's: the leak's innermost two frames read the same once
    // the addresses are dropped (`leak_widgets (outputs.c:N)`, `main (outputs.c:M)`).
    let leak_frames = |points: &[(Vec<String>, &Value)]| -> Vec<String> {
        let (frames, _) = points
            .iter()
            .find(|(f, _)| f.first().is_some_and(|f| dhat_function(f) == LEAK_FN))
            .unwrap();
        frames
            .iter()
            .take(2)
            .map(|f| dhat_place(f).to_owned())
            .collect()
    };
    assert_eq!(leak_frames(&mine), leak_frames(&vg));
    let first = &leak_frames(&mine)[0];
    assert!(first.starts_with("leak_widgets (outputs.c:"), "{first}");
    let ftbl = ours["ftbl"].as_array().unwrap();
    for f in &ftbl[1..] {
        let f = f.as_str().unwrap();
        let (addr, _) = f.split_once(": ").unwrap_or_else(|| panic!("frame {f:?}"));
        assert!(
            addr.strip_prefix("0x").is_some_and(|h| h
                .chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())),
            "frame address {f:?}"
        );
    }
}
