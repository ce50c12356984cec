//! The README's jq recipes for the analytics fields (in the crate's documentation), run
//! verbatim on real reports.

use std::process::Command;

use super::{
    growth::{LEAK_SIZE, growth_run},
    phases::phases_pid_run,
    plateau::plateau_run,
};
use crate::common::output_with_input;

const JQ_VERDICTS: &str = r#"jq -r 'select(.type=="report") | .leaks[] | "\(.stack[0].function // "?") \(.verdict) \(.growth_bytes_per_s) B/s \(.bytes) B"'"#;
const JQ_PHASES: &str = r#"jq -r 'select(.type=="report") | .phases[] | "\(.name) \(.kind) allocs=\(.allocs) frees=\(.frees) net=\(.net_bytes) peak_net=\(.peak_net_bytes) peak_outstanding=\(.peak_outstanding_bytes)"'"#;
const JQ_LEAK_GATE: &str = r#"jq -e 'select(.type=="report") | .leak_detected | not' > /dev/null"#;

/// Runs a recipe line with `sh -c`, `input` on stdin: (exit status, stdout).
fn sh_recipe(recipe: &str, input: &str) -> (Option<i32>, String) {
    // A recipe may stop reading early (jq -e): how much of the input it took does not matter.
    let (out, _) = output_with_input(Command::new("sh").args(["-c", recipe]), input);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.trim().is_empty(),
        "recipe {recipe:?} wrote to stderr (jq missing?): {stderr}"
    );
    (out.status.code(), String::from_utf8(out.stdout).unwrap())
}

/// The recipes in the crate's doc comment (main.rs), run verbatim on real reports.
#[test]
fn jq_recipes_on_real_reports() {
    let doc = include_str!("main.rs");
    for recipe in [JQ_VERDICTS, JQ_PHASES, JQ_LEAK_GATE] {
        assert!(
            doc.lines().any(|l| l == format!("//! {recipe}")),
            "the doc comment should carry the recipe verbatim: {recipe}"
        );
    }

    let (growth, facts) = growth_run();
    let (code, out) = sh_recipe(JQ_VERDICTS, &growth.stdout);
    assert_eq!(code, Some(0), "verdict recipe failed");
    let lines: Vec<&str> = out.lines().collect();
    let leak_bytes = facts.leaks * LEAK_SIZE;
    let ok = lines.len() == 3
        && lines[0].starts_with("steady_leak leak ")
        && lines[0].ends_with(&format!(" B/s {leak_bytes} B"))
        && lines[1].starts_with("cache_put ")
        && lines[1].ends_with(" B/s 307200 B")
        && lines[2].starts_with("churn_buffers churn ")
        && lines[2].ends_with(" B/s 2048 B");
    assert!(
        ok,
        "verdict recipe: expected `steady_leak leak R B/s {leak_bytes} B`, `cache_put ... 307200 \
         B`, `churn_buffers churn ... 2048 B`, got:\n{out}"
    );

    let phases = phases_pid_run();
    let (code, out) = sh_recipe(JQ_PHASES, &phases.stdout);
    assert_eq!(code, Some(0), "phases recipe failed");
    assert_eq!(
        out,
        "load function allocs=3 frees=2 net=100000 peak_net=300000 peak_outstanding=307000\n\
         render function allocs=2 frees=2 net=0 peak_net=50000 peak_outstanding=157000\n",
        "phases recipe on the pid-mode phases run"
    );

    let (code, out) = sh_recipe(JQ_LEAK_GATE, &growth.stdout);
    assert_eq!(
        (code, out.as_str()),
        (Some(1), ""),
        "leak gate on the growth run (steady_leak leaks): exit 1"
    );
    let plateau = plateau_run();
    let (code, _) = sh_recipe(JQ_LEAK_GATE, &plateau.saved);
    assert_eq!(
        code,
        Some(0),
        "leak gate on the plateau report saved with --output: exit 0"
    );
}
