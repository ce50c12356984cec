//! Who held the heap at its peak: `tests/fixtures/peak.c`, whose peak is a temporary buffer
//! freed before the end, every number exact, in the JSON report, the text report and the DHAT
//! file (compared with valgrind's own for the same program); and no growth rate from a short
//! run that frees everything.

use std::{ffi::OsString, fs, process::Command};

use serde_json::Value;

use super::{fixtures, run_memprof, scratch, summary};
use crate::common::{Checks, DEADLINE, Proc, frame_names, os, spawn_trace, wait_for_probe_removal};

/// peak.c's global peak: the cache's first 10 blocks and the 1 MiB temporary buffer.
const PEAK_BYTES: u64 = 10_000 + 1_048_576;
const PEAK_BLOCKS: u64 = 11;
/// (innermost function, its caller, bytes, blocks) of each site at the peak, largest first.
const AT_PEAK: [(&str, u64, u64); 2] = [("temp_buffer", 1_048_576, 1), ("cache_add", 10_000, 10)];

/// The sites of a `peak` object as (innermost function, bytes, allocs), in order.
fn peak_sites(peak: &Value) -> Vec<(String, u64, u64)> {
    site_list(&peak["sites"])
}

/// A list of sites at a peak as (innermost function, bytes, allocs), in order.
fn site_list(sites: &Value) -> Vec<(String, u64, u64)> {
    sites
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|s| {
            (
                frame_names(s).first().copied().unwrap_or("?").to_string(),
                s["bytes"].as_u64().unwrap_or(u64::MAX),
                s["allocs"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

fn expected_sites() -> Vec<(String, u64, u64)> {
    AT_PEAK
        .iter()
        .map(|(f, b, n)| (f.to_string(), *b, *n))
        .collect()
}

/// A DHAT file's program points as (the first frame naming one of the fixture's functions,
/// the point).
fn dhat_points(file: &Value) -> Vec<(String, Value)> {
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
            let name = pp["fs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| ftbl[i.as_u64().unwrap() as usize])
                .find_map(|f| {
                    ["temp_buffer", "cache_add"]
                        .into_iter()
                        .find(|n| f.contains(&format!(": {n} (")))
                })
                .unwrap_or("?");
            (name.to_string(), pp.clone())
        })
        .collect()
}

/// `(gb, gbk)` summed by function, and the sums over the file.
fn at_gmax(points: &[(String, Value)]) -> (Vec<(String, u64, u64)>, u64, u64, u64) {
    let mut by_fn: Vec<(String, u64, u64)> = Vec::new();
    let (mut gb, mut gbk, mut tb) = (0, 0, 0);
    for (name, pp) in points {
        let (b, k) = (pp["gb"].as_u64().unwrap(), pp["gbk"].as_u64().unwrap());
        gb += b;
        gbk += k;
        tb += pp["tb"].as_u64().unwrap();
        if b == 0 {
            continue;
        }
        match by_fn.iter_mut().find(|e| e.0 == *name) {
            Some(e) => {
                e.1 += b;
                e.2 += k;
            }
            None => by_fn.push((name.clone(), b, k)),
        }
    }
    by_fn.sort_by_key(|e| std::cmp::Reverse(e.1));
    (by_fn, gb, gbk, tb)
}

/// JSON and DHAT: the peak names the freed temporary buffer with its exact size, the cache
/// with its 10 blocks; the DHAT file's `tg` is the peak's moment, its `gb` sum to the peak,
/// every `mb` is at least its `gb`, and valgrind's DHAT on the same program agrees on every
/// site's `gb`/`gbk` and on the sums.
#[test]
fn peak_names_the_temporary_buffer_json_and_dhat() {
    let dhat = scratch().join("peak.dhat.json");
    let _ = fs::remove_file(&dhat);
    let dhat_arg = dhat.to_str().unwrap();
    let csv = scratch().join("peak.csv");
    let _ = fs::remove_file(&csv);
    let run = spawn_trace(
        &[
            "--csv",
            csv.to_str().unwrap(),
            "--dhat",
            dhat_arg,
            "--phase",
            "build=build",
            "--phase",
            "serve=serve",
        ],
        &[&fixtures().peak],
    );
    run.assert_code(0, "the fixture exits 0");
    let report = run.report();
    let mut c = Checks::new("peak: JSON and DHAT");
    // Each phase's own peak: build holds the global one; serve peaks at its end on the cache
    // (its 300 blocks and build's 10), the buffer long gone.
    let phases = report["phases"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let phase = |name: &str| {
        phases
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let (build, serve) = (phase("build"), phase("serve"));
    c.eq(
        "build: peak_sites",
        site_list(&build["peak_sites"]),
        expected_sites(),
    );
    c.eq(
        "build: peak_outstanding_bytes",
        build["peak_outstanding_bytes"].as_u64(),
        Some(PEAK_BYTES),
    );
    c.eq(
        "serve: peak_sites",
        site_list(&serve["peak_sites"]),
        vec![
            ("cache_add".to_string(), 300_000, 300),
            ("cache_add".to_string(), 10_000, 10),
        ],
    );
    let callers: Vec<&str> = serve["peak_sites"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|s| frame_names(s).get(1).copied().unwrap_or("?"))
        .collect();
    c.eq(
        "serve: the cache's callers",
        callers,
        vec!["serve", "build"],
    );
    c.eq(
        "serve: peak_outstanding_bytes",
        serve["peak_outstanding_bytes"].as_u64(),
        Some(310_000),
    );
    let peak = &report["peak"];
    c.eq("peak.bytes", peak["bytes"].as_u64(), Some(PEAK_BYTES));
    c.eq("peak.allocs", peak["allocs"].as_u64(), Some(PEAK_BLOCKS));
    c.eq(
        "totals.peak_outstanding_bytes",
        report["totals"]["peak_outstanding_bytes"].as_u64(),
        Some(PEAK_BYTES),
    );
    c.eq(
        "totals.outstanding_bytes at the end",
        report["totals"]["outstanding_bytes"].as_u64(),
        Some(310_000),
    );
    c.eq("peak.sites", peak_sites(peak), expected_sites());
    let at_s = peak["at_s"].as_f64().unwrap_or(-1.0);
    let duration = report["duration_s"].as_f64().unwrap_or(0.0);
    c.check(
        at_s > 0.0 && at_s < duration,
        format!("peak.at_s {at_s} inside the trace (0, {duration})"),
    );

    let file: Value =
        serde_json::from_slice(&fs::read(&dhat).unwrap_or_default()).unwrap_or(Value::Null);
    c.check(file.is_object(), "the DHAT file is JSON");
    if file.is_object() {
        let points = dhat_points(&file);
        let (by_fn, gb, gbk, tb) = at_gmax(&points);
        c.eq("DHAT gb by function", by_fn, expected_sites());
        c.eq("DHAT gb sum = peak.bytes", gb, PEAK_BYTES);
        c.eq("DHAT gbk sum = peak.allocs", gbk, PEAK_BLOCKS);
        c.eq(
            "DHAT tb sum = bytes_allocated",
            Some(tb),
            report["totals"]["bytes_allocated"].as_u64(),
        );
        for (name, pp) in &points {
            c.check(
                pp["mb"].as_u64() >= pp["gb"].as_u64() && pp["mbk"].as_u64() >= pp["gbk"].as_u64(),
                format!("{name}: mb >= gb, mbk >= gbk: {pp}"),
            );
        }
        let (tg, te) = (file["tg"].as_u64().unwrap(), file["te"].as_u64().unwrap());
        c.eq("DHAT tg = peak.at_s in µs", tg, (at_s * 1e6).round() as u64);
        c.check(tg < te, format!("tg {tg} before te {te}"));

        // valgrind's DHAT on the same program.
        wait_for_probe_removal();
        let vg_path = scratch().join("peak.valgrind.dhat.json");
        let _ = fs::remove_file(&vg_path);
        let mut arg = OsString::from("--dhat-out-file=");
        arg.push(&vg_path);
        let mut cmd = Command::new("valgrind");
        cmd.arg("--tool=dhat").arg(arg).arg(&fixtures().peak);
        let vg = Proc::spawn("valgrind --tool=dhat peak", &mut cmd).finish(DEADLINE);
        vg.assert_code(0, "valgrind runs the fixture");
        let vg_file: Value =
            serde_json::from_slice(&fs::read(&vg_path).unwrap_or_default()).unwrap_or(Value::Null);
        let (vg_by_fn, vg_gb, vg_gbk, vg_tb) = at_gmax(&dhat_points(&vg_file));
        c.eq(
            "valgrind's gb by function = memprof's",
            vg_by_fn,
            expected_sites(),
        );
        c.eq(
            "valgrind's sums (gb, gbk, tb) = memprof's",
            (vg_gb, vg_gbk, vg_tb),
            (gb, gbk, tb),
        );
    }
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
}

/// The text report: an "At the peak" section with the exact bytes and blocks of each site.
#[test]
fn peak_section_in_the_text_report() {
    let mut args = os(&["trace", "--duration", "60s", "--"]);
    args.push(fixtures().peak.clone().into_os_string());
    let run = run_memprof(&args);
    run.assert_code(0, "memprof ends when the fixture exits 0");
    let text = &run.stdout;
    let mut c = Checks::new("peak: text");
    c.check(
        text.contains(&format!("\nAt the peak: {PEAK_BYTES} B (")),
        "an \"At the peak: 1058576 B (...)\" heading",
    );
    for (function, bytes, blocks) in AT_PEAK {
        c.check(
            text.lines().any(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.len() > 7
                    && words[0] == bytes.to_string()
                    && words[3] == blocks.to_string()
                    && words[7] == function
            }),
            format!("a line \"{bytes} B in {blocks} allocations via malloc {function} ...\""),
        );
    }
    c.finish(|| format!("{text}\n{}", run.context()));
}

/// A 2 s run that allocates and frees everything: no growth rate, and the reason.
#[test]
fn short_run_has_no_growth_rate() {
    let run = spawn_trace(
        &[],
        &[
            fixtures().peak.as_os_str(),
            "--churn".as_ref(),
            "2".as_ref(),
        ],
    );
    run.assert_code(0, "the fixture exits 0");
    let report = run.report();
    let mut c = Checks::new("peak: short run");
    c.eq(
        "growth_rate_mb_per_hour",
        &report["growth_rate_mb_per_hour"],
        &Value::Null,
    );
    let note = report["growth_rate_note"].as_str().unwrap_or("");
    c.check(
        note.contains("under 5 s") || note.contains("fewer than 5"),
        format!("growth_rate_note says why: {note:?}"),
    );
    c.eq(
        "outstanding at the end",
        report["totals"]["outstanding_bytes"].as_u64(),
        Some(0),
    );
    c.finish(|| format!("{}\n{}", summary(&report), run.context()));
}
