//! The README's jq recipes (in the crate's documentation), run verbatim on real reports.

use std::process::Command;

use super::{Build, alloc_cmd, pid_alloc_run, report::summary};
use crate::common::{output_with_input, spawn_trace};

const JQ_TOP3: &str = r#"select(.type=="report") | .leaks | group_by(.stack[0].function) | map({site: (.[0].stack[0].function // "?"), bytes: (map(.bytes) | add)}) | sort_by(-.bytes) | .[:3][] | "\(.site) \(.bytes)""#;
const JQ_OUTSTANDING: &str = r#"select(.type=="report") | .totals.outstanding_bytes"#;
const JQ_LOST: &str = r#"select(.type=="report") | .totals.lost_events"#;
const JQ_MMAP: &str = r#"select(.type=="report") | .mmap.outstanding_bytes"#;
const JQ_SNAPSHOTS: &str =
    r#"select(.type=="snapshot") | "\(.elapsed_s) \(.totals.outstanding_bytes)""#;

fn jq(filter: &str, raw: bool, input: &str) -> String {
    let mut cmd = Command::new("jq");
    if raw {
        cmd.arg("-r");
    }
    let (out, written) = output_with_input(cmd.arg(filter), input);
    written.unwrap();
    assert!(
        out.status.success(),
        "jq {filter:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn jq_recipes_on_real_report() {
    let (run, _) = pid_alloc_run(Build::Fp);
    run.assert_success();
    let report = run.report();
    // (recipe, raw output, output, what)
    for (recipe, raw, want, what) in [
        (
            JQ_TOP3,
            true,
            "leak_big 8388608\nleak_mmap 49152\nleak_posix_memalign 24594\n",
            "top-3",
        ),
        (JQ_OUTSTANDING, false, "8540498\n", "outstanding"),
        (JQ_LOST, false, "0\n", "lost-events"),
        (JQ_MMAP, false, "73728\n", "mmap"),
    ] {
        assert_eq!(
            jq(recipe, raw, &run.stdout),
            want,
            "{what} recipe\n{}",
            summary(&report)
        );
    }

    let snaps = spawn_trace(
        &["--interval", "200ms"],
        &alloc_cmd(Build::Fp, &["--sleep-ms", "600"]),
    );
    snaps.assert_success();
    let out = jq(JQ_SNAPSHOTS, true, &snaps.stdout);
    assert!(
        !out.is_empty(),
        "snapshot recipe printed nothing\n{}",
        snaps.context()
    );
    for line in out.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        assert!(
            parts.len() == 2 && parts[0].parse::<f64>().is_ok() && parts[1].parse::<u64>().is_ok(),
            "snapshot recipe line {line:?} is not `elapsed_s outstanding_bytes`"
        );
    }
}
