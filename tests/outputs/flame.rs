//! Folded stacks (the line format itself) and flamegraphs (SVG read by Python's XML parser).

use std::{path::Path, process::Command};

use super::{INUSE_BYTES, LEAK_BYTES, LEAK_FN, SITES, TOTAL_BYTES, context, run, trace};

/// Folded lines as (frames root first, count), checking the format on the way.
fn folded(text: &str) -> Vec<(Vec<String>, u64)> {
    text.lines()
        .map(|l| {
            let (stack, count) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("folded line without a count: {l:?}"));
            let count = count
                .parse()
                .unwrap_or_else(|_| panic!("folded line with a bad count: {l:?}"));
            assert!(count > 0, "zero line {l:?}");
            (stack.split(';').map(str::to_owned).collect(), count)
        })
        .collect()
}

/// Sum of the lines whose innermost (last) frame is `function`.
fn folded_sum(lines: &[(Vec<String>, u64)], function: &str) -> u64 {
    lines
        .iter()
        .filter(|(frames, _)| frames.last().is_some_and(|f| f == function))
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn folded_in_use_and_allocated_exact() {
    let t = trace();
    let inuse = folded(&t.read("stacks.folded"));
    let alloc = folded(&t.read("stacks.folded.alloc"));
    // The leak: one stack, root first, ending main;leak_widgets, with its exact bytes.
    let leak: Vec<_> = inuse
        .iter()
        .filter(|(f, _)| f.last().is_some_and(|f| f == LEAK_FN))
        .collect();
    assert_eq!(leak.len(), 1, "{inuse:?}");
    let (frames, bytes) = leak[0];
    assert_eq!(*bytes, LEAK_BYTES);
    assert_eq!(frames[frames.len() - 2], "main", "{frames:?}");
    for (function, bytes, _, inuse_bytes, _) in SITES {
        assert_eq!(
            folded_sum(&inuse, function),
            inuse_bytes,
            "in use: {function}"
        );
        assert_eq!(folded_sum(&alloc, function), bytes, "allocated: {function}");
    }
    assert_eq!(inuse.iter().map(|(_, n)| n).sum::<u64>(), INUSE_BYTES);
    assert_eq!(alloc.iter().map(|(_, n)| n).sum::<u64>(), TOTAL_BYTES);
}

/// The `<title>` texts of an SVG, read by Python's XML parser (which also proves it is XML).
fn svg_titles(path: &Path) -> Vec<String> {
    let script = "import sys, json, xml.etree.ElementTree as E\n\
                  root = E.parse(sys.argv[1]).getroot()\n\
                  assert root.tag == '{http://www.w3.org/2000/svg}svg', root.tag\n\
                  print(json.dumps([t.text for t in root.iter('{http://www.w3.org/2000/svg}title')]))";
    let out = run(Command::new("python3").arg("-c").arg(script).arg(path));
    assert!(
        out.status.success(),
        "{}",
        context(&format!("XML parse of {}", path.display()), &out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A flamegraph file of the trace: an SVG document headed `heading`; its titles, each checked
/// for (title start, whether one must start so).
fn check_flamegraph(name: &str, heading: &str, titles: &[(&str, bool)]) {
    let t = trace();
    let svg = t.read(name);
    assert!(
        svg.starts_with("<?xml") && svg.contains("<svg"),
        "{name}: {}",
        &svg[..200.min(svg.len())]
    );
    assert!(svg.contains(heading), "{name} is not headed {heading:?}");
    let found = svg_titles(&t.file(name));
    for (start, present) in titles {
        assert_eq!(
            found.iter().any(|s| s.starts_with(start)),
            *present,
            "{name}: a title starting {start:?}: {found:?}"
        );
    }
}

#[test]
fn flamegraphs_are_svg_with_exact_titles() {
    let pid = trace().pid;
    check_flamegraph(
        "flame.svg",
        &format!("memprof: in-use bytes (pid {pid})"),
        &[
            ("leak_widgets (21,000 bytes, 75.00%)", true),
            ("all (28,000 bytes", true),
            ("churn_buffers", false),
        ],
    );
    check_flamegraph(
        "flame.alloc.svg",
        &format!("memprof: allocated bytes (pid {pid})"),
        &[
            ("churn_buffers (26,880 bytes", true),
            ("all (74,880 bytes", true),
        ],
    );
}
