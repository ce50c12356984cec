//! The layering rule, checked on the source itself: each top-level module imports only from its
//! own layer or the layers listed before it in [`LAYERS`], and no file imports, directly or
//! through others, a file that imports it back (a module's own submodules aside). Test code is
//! left out.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// The pipeline's layers, lowest first (see the crate's documentation).
const LAYERS: &[&str] = &[
    "sys", "probe", "ingest", "stacks", "table", "analysis", "report", "output", "serve",
    "session", "cli",
];

/// A source file: its module path (`report::names`) and its text without test code.
struct Source {
    module: Vec<String>,
    text: String,
}

fn read_sources(dir: &Path, module: &[String], out: &mut Vec<Source>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        if path.is_dir() {
            let mut sub = module.to_vec();
            sub.push(name);
            read_sources(&path, &sub, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let mut m = module.to_vec();
            if name != "mod" && name != "lib" && name != "main" {
                m.push(name);
            }
            let text = fs::read_to_string(&path).unwrap();
            out.push(Source {
                module: m,
                text: without_tests(&text),
            });
        }
    }
}

/// The text before the first `#[cfg(test)]`: tests come last in every file.
fn without_tests(text: &str) -> String {
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_string(),
        None => text.to_string(),
    }
}

/// Every path imported or named from the crate root, resolved to absolute module paths:
/// `use crate::{a::{b, c::D}}` gives `a::b` and `a::c::D`; `super::x` is resolved against
/// `module`.
fn imported_paths(text: &str, module: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        let boundary = i == 0 || !is_ident(bytes[i - 1]);
        let (base, skip): (Vec<String>, usize) = if boundary && rest.starts_with(b"crate::") {
            (Vec::new(), "crate::".len())
        } else if boundary && rest.starts_with(b"super::") {
            let mut n = 0;
            while rest[n * 7..].starts_with(b"super::") {
                n += 1;
            }
            // `super` of a module file is its parent module.
            let keep = module.len().saturating_sub(n);
            (module[..keep].to_vec(), n * 7)
        } else {
            i += 1;
            continue;
        };
        let (paths, used) = parse_tree(&text[i + skip..]);
        for p in paths {
            let mut full = base.clone();
            full.extend(p);
            out.push(full);
        }
        i += skip + used.max(1);
    }
    out
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Parses a use tree (`a::b`, `a::{b, c::{d}}`, `{a, b}`, `self`) at the start of `s`; returns
/// its paths and the bytes read.
fn parse_tree(s: &str) -> (Vec<Vec<String>>, usize) {
    let b = s.as_bytes();
    let mut prefix = Vec::new();
    let mut i = 0;
    loop {
        if b.get(i) == Some(&b'{') {
            i += 1;
            let mut paths = Vec::new();
            loop {
                while i < b.len() && b[i].is_ascii_whitespace() || b.get(i) == Some(&b',') {
                    i += 1;
                }
                if i >= b.len() || b[i] == b'}' {
                    i += 1;
                    break;
                }
                let (sub, used) = parse_tree(&s[i..]);
                for p in sub {
                    let mut full = prefix.clone();
                    full.extend(p.into_iter().filter(|x| x != "self"));
                    paths.push(full);
                }
                i += used.max(1);
                // Skip `as name`.
                while i < b.len() && b[i] != b',' && b[i] != b'}' {
                    i += 1;
                }
            }
            return (paths, i);
        }
        let start = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        if i > start {
            prefix.push(s[start..i].to_string());
        }
        if b[i..].starts_with(b"::") {
            i += 2;
        } else {
            return (vec![prefix], i);
        }
    }
}

/// The file (module path) a path points into: its longest prefix that is a source file.
fn file_of<'a>(path: &[String], files: &'a BTreeSet<Vec<String>>) -> Option<&'a Vec<String>> {
    (1..=path.len()).rev().find_map(|n| files.get(&path[..n]))
}

#[test]
fn layers_import_only_below() {
    let mut sources = Vec::new();
    read_sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &[],
        &mut sources,
    );
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut wrong = Vec::new();
    for s in &sources {
        let Some(own) = s.module.first().and_then(|m| rank(m)) else {
            continue;
        };
        for p in imported_paths(&s.text, &s.module) {
            if let Some(to) = p.first().and_then(|m| rank(m))
                && to > own
            {
                wrong.push(format!("{} imports {}", s.module.join("::"), p.join("::")));
            }
        }
    }
    assert!(wrong.is_empty(), "upward imports:\n{}", wrong.join("\n"));
}

#[test]
fn no_file_imports_in_a_circle() {
    let mut sources = Vec::new();
    read_sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &[],
        &mut sources,
    );
    let files: BTreeSet<Vec<String>> = sources.iter().map(|s| s.module.clone()).collect();
    let mut edges: BTreeMap<&Vec<String>, BTreeSet<&Vec<String>>> = BTreeMap::new();
    for s in &sources {
        let from = files.get(&s.module).unwrap();
        for p in imported_paths(&s.text, &s.module) {
            if let Some(to) = file_of(&p, &files)
                && to != from
                // A module naming its own submodules (declaring, re-exporting) is no circle.
                && !to.starts_with(from)
            {
                edges.entry(from).or_default().insert(to);
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit<'a>(
        n: &'a Vec<String>,
        edges: &BTreeMap<&'a Vec<String>, BTreeSet<&'a Vec<String>>>,
        state: &mut BTreeMap<&'a Vec<String>, u8>,
        stack: &mut Vec<&'a Vec<String>>,
    ) -> Option<Vec<String>> {
        state.insert(n, 1);
        stack.push(n);
        for &m in edges.get(n).into_iter().flatten() {
            match state.get(m) {
                Some(1) => {
                    let at = stack.iter().position(|x| *x == m).unwrap();
                    let mut circle: Vec<String> =
                        stack[at..].iter().map(|x| x.join("::")).collect();
                    circle.push(m.join("::"));
                    return Some(circle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n, 2);
        None
    }
    let mut state = BTreeMap::new();
    for f in &files {
        if !state.contains_key(f)
            && let Some(circle) = visit(f, &edges, &mut state, &mut Vec::new())
        {
            panic!("import circle: {}", circle.join(" -> "));
        }
    }
}

#[test]
fn use_trees_resolve() {
    let m = vec!["report".to_string(), "build".to_string()];
    let got = imported_paths(
        "use super::{Report, names::{self, human_bytes}};\nuse crate::{a::{b, c::D as E}, f};\nlet x = crate::sys::clock::now();",
        &m,
    );
    let got: Vec<String> = got.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        got,
        [
            "report::Report",
            "report::names",
            "report::names::human_bytes",
            "a::b",
            "a::c::D",
            "f",
            "sys::clock::now"
        ]
    );
}
