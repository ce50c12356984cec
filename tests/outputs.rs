//! End-to-end tests of the file outputs (`--pprof`, `--folded`, `--flamegraph`, `--dhat`,
//! `--csv`, `--html`), each checked by the tool that consumes it:
//!
//! | output | consumer |
//! | --- | --- |
//! | pprof | `go tool pprof -top`/`-raw` (Debian's Go) |
//! | folded, flamegraph | the line format itself; the SVGs parsed by Python's XML parser |
//! | DHAT | valgrind's own `--tool=dhat` file for the same program, compared field by field |
//! | CSV | an RFC 4180 reader |
//! | HTML | headless Chromium (screenshot and `--dump-dom`) |
//!
//! The fixture tests/fixtures/outputs.c is compiled at test time and traced once, in spawn mode
//! with all six flags; its header lists the exact numbers asserted here (leak_widgets leaks
//! 7 x 3000 B). The fixture is also run once under valgrind's DHAT.
//!
//! Needs root (eBPF), `cc`, `go`, `valgrind`, `chromium`, `python3` and `readelf`:
//! `sudo -E cargo test --release -p memprof-user --test outputs -- --test-threads=1` (about
//! 15 s). A test panics (never skips) when something is missing. Environment: `CC` (default
//! `cc`), `MEMPROF_TEST_CHROMIUM` (default `chromium`).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use serde_json::Value;

const MEMPROF: &str = env!("CARGO_BIN_EXE_memprof");
const FIXTURE_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/outputs.c");
/// memprof's own `--duration` safety net: the fixture runs for about 3 s.
const SAFETY_NET: &str = "40s";
/// Passed to the fixture (which ignores it), to check escaping of the command everywhere.
const TAG: &str = "<i>x&y</i>";

/// The fixture's sites (see tests/fixtures/outputs.c).
const LEAK_FN: &str = "leak_widgets";
const LEAK_BYTES: u64 = 7 * 3000;
const LEAK_BLOCKS: u64 = 7;
const TABLES_BYTES: u64 = 2 * 5 * 700;
const CHURN_BYTES: u64 = 7 * 30 * 128;
const CHURN_BLOCKS: u64 = 7 * 30;
const SCRATCH_BYTES: u64 = 4 * 5000;
const TOTAL_ALLOCS: u64 = 223;
const TOTAL_BYTES: u64 = 74_880;
const TOTAL_FREES: u64 = 214;
const INUSE_BYTES: u64 = 28_000;
/// The fixture's functions and what each allocates: (function, bytes, blocks, in-use bytes,
/// in-use blocks).
const SITES: [(&str, u64, u64, u64, u64); 4] = [
    (LEAK_FN, LEAK_BYTES, LEAK_BLOCKS, LEAK_BYTES, LEAK_BLOCKS),
    ("leak_tables", TABLES_BYTES, 2, TABLES_BYTES, 2),
    ("churn_buffers", CHURN_BYTES, CHURN_BLOCKS, 0, 0),
    ("scratch_hold", SCRATCH_BYTES, 4, 0, 0),
];

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "integration tests need root: they load eBPF programs (euid is {euid}); run \
         `sudo -E cargo test -p memprof-user --test outputs`"
    );
}

fn work_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("memprof-outputs");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// The compiled fixture (once per test process).
fn fixture() -> &'static Path {
    static FIXTURE: OnceLock<PathBuf> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let out = work_dir().join("outputs");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let mut cmd = Command::new(&cc);
        cmd.args(["-O2", "-g", "-Wall", "-fno-omit-frame-pointer", "-o"])
            .arg(&out)
            .arg(FIXTURE_SRC);
        let res = run(&mut cmd);
        assert!(
            res.status.success(),
            "compiling the fixture failed ({cmd:?}):\n{}",
            String::from_utf8_lossy(&res.stderr)
        );
        out
    })
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn context(what: &str, out: &Output) -> String {
    format!(
        "{what} exited with {:?}\n--- stderr ---\n{}\n--- stdout ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

/// The one trace of the fixture with every file output.
struct Trace {
    dir: PathBuf,
    pid: u64,
    /// The final NDJSON report.
    report: Value,
}

impl Trace {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> String {
        let path = self.file(name);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    /// The report's verdict for the leak group whose innermost function is `function`.
    fn verdict(&self, function: &str) -> String {
        self.report["leaks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["stack"][0]["function"] == function)
            .and_then(|g| g["verdict"].as_str())
            .unwrap_or_else(|| panic!("no leak group for {function} in {}", self.report))
            .to_owned()
    }
}

fn trace() -> &'static Trace {
    static TRACE: OnceLock<Trace> = OnceLock::new();
    require_root();
    TRACE.get_or_init(|| {
        let dir = work_dir().join("trace");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new(MEMPROF);
        cmd.args([
            "trace",
            "--json",
            "--duration",
            SAFETY_NET,
            "--sample-every",
            "100ms",
        ])
        .args(["--phase", "scratch=scratch_hold"])
        .arg("--pprof")
        .arg(dir.join("profile.pb.gz"))
        .arg("--folded")
        .arg(dir.join("stacks.folded"))
        .arg("--flamegraph")
        .arg(dir.join("flame.svg"))
        .arg("--dhat")
        .arg(dir.join("dhat.json"))
        .arg("--csv")
        .arg(dir.join("sites.csv"))
        .arg("--html")
        .arg(dir.join("report.html"))
        .arg("--")
        .arg(fixture())
        .arg(TAG);
        let out = run(&mut cmd);
        let ctx = context("memprof trace", &out);
        assert!(out.status.success(), "{ctx}");
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("panicked"),
            "{ctx}"
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: Value = stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["type"] == "report")
            .unwrap_or_else(|| panic!("no report record\n{ctx}"));
        let pid = report["pid"].as_u64().unwrap();
        // The trace saw exactly the fixture's workload, so the files can be held to it.
        let totals = &report["totals"];
        for (key, want) in [
            ("allocs", TOTAL_ALLOCS),
            ("bytes_allocated", TOTAL_BYTES),
            ("frees", TOTAL_FREES),
            ("outstanding_bytes", INUSE_BYTES),
            ("lost_events", 0),
        ] {
            assert_eq!(totals[key], want, "totals.{key}\n{ctx}");
        }
        Trace { dir, pid, report }
    })
}

/// valgrind's DHAT file for the same fixture and argument.
fn valgrind_dhat() -> &'static Value {
    static DHAT: OnceLock<Value> = OnceLock::new();
    DHAT.get_or_init(|| {
        let path = work_dir().join("valgrind.dhat.json");
        let _ = fs::remove_file(&path);
        let mut arg = OsString::from("--dhat-out-file=");
        arg.push(&path);
        common::wait_for_probe_removal();
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

// ---------------------------------------------------------------------------------------------
// pprof
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Folded stacks and flamegraphs
// ---------------------------------------------------------------------------------------------

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

#[test]
fn flamegraphs_are_svg_with_exact_titles() {
    let t = trace();
    let svg = t.read("flame.svg");
    assert!(
        svg.starts_with("<?xml") && svg.contains("<svg"),
        "{}",
        &svg[..200.min(svg.len())]
    );
    assert!(svg.contains(&format!("memprof: in-use bytes (pid {})", t.pid)));
    let titles = svg_titles(&t.file("flame.svg"));
    assert!(
        titles
            .iter()
            .any(|s| s.starts_with("leak_widgets (21,000 bytes, 75.00%)")),
        "{titles:?}"
    );
    assert!(
        titles.iter().any(|s| s.starts_with("all (28,000 bytes")),
        "{titles:?}"
    );
    assert!(
        !titles.iter().any(|s| s.starts_with("churn_buffers")),
        "{titles:?}"
    );

    let alloc = t.read("flame.alloc.svg");
    assert!(alloc.starts_with("<?xml"));
    assert!(alloc.contains(&format!("memprof: allocated bytes (pid {})", t.pid)));
    let titles = svg_titles(&t.file("flame.alloc.svg"));
    assert!(
        titles
            .iter()
            .any(|s| s.starts_with("churn_buffers (26,880 bytes")),
        "{titles:?}"
    );
    assert!(
        titles.iter().any(|s| s.starts_with("all (74,880 bytes")),
        "{titles:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// DHAT
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// CSV
// ---------------------------------------------------------------------------------------------

/// An RFC 4180 reader: quoted fields (with "" for a quote, commas and line breaks inside),
/// CRLF or LF record ends.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(
        field.is_empty() && record.is_empty(),
        "unterminated last record"
    );
    records
}

#[test]
fn csv_rows_exact() {
    let t = trace();
    let text = t.read("sites.csv");
    assert!(text.ends_with("\r\n"), "RFC 4180 line ends");
    let rows = parse_csv(&text);
    let header = &rows[0];
    assert_eq!(
        header,
        &[
            "site",
            "module",
            "allocator",
            "kind",
            "inuse_bytes",
            "inuse_objects",
            "alloc_bytes",
            "alloc_objects",
            "frees",
            "max_inuse_bytes",
            "verdict",
            "growth_bytes_per_s",
            "stack",
        ]
    );
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let num = |row: &[String], name: &str| -> u64 {
        row[col(name)]
            .parse()
            .unwrap_or_else(|_| panic!("{name} in {row:?}"))
    };
    for row in &rows[1..] {
        assert_eq!(row.len(), header.len(), "{row:?}");
    }
    let leak: Vec<&Vec<String>> = rows[1..].iter().filter(|r| r[0] == LEAK_FN).collect();
    assert_eq!(leak.len(), 1, "{rows:?}");
    let leak = leak[0];
    assert!(leak[col("module")].ends_with("/outputs"), "{leak:?}");
    assert_eq!(leak[col("allocator")], "malloc");
    assert_eq!(leak[col("kind")], "heap");
    for (name, want) in [
        ("inuse_bytes", LEAK_BYTES),
        ("inuse_objects", LEAK_BLOCKS),
        ("alloc_bytes", LEAK_BYTES),
        ("alloc_objects", LEAK_BLOCKS),
        ("frees", 0),
        ("max_inuse_bytes", LEAK_BYTES),
    ] {
        assert_eq!(num(leak, name), want, "{name}: {leak:?}");
    }
    assert_eq!(
        leak[col("verdict")],
        t.verdict(LEAK_FN),
        "verdict as in the report"
    );
    assert!(leak[col("growth_bytes_per_s")].parse::<f64>().unwrap() > 0.0);
    assert!(
        leak[col("stack")].starts_with("leak_widgets <- main <- "),
        "{leak:?}"
    );
    // Every site adds up to the fixture's numbers, and the file to the report's totals.
    for (function, bytes, blocks, inuse_bytes, _) in SITES {
        let sum = |name: &str| -> u64 {
            rows[1..]
                .iter()
                .filter(|r| r[0] == function)
                .map(|r| num(r, name))
                .sum()
        };
        assert_eq!(sum("alloc_bytes"), bytes, "{function}");
        assert_eq!(sum("alloc_objects"), blocks, "{function}");
        assert_eq!(sum("inuse_bytes"), inuse_bytes, "{function}");
    }
    let total = |name: &str| rows[1..].iter().map(|r| num(r, name)).sum::<u64>();
    assert_eq!(total("alloc_objects"), TOTAL_ALLOCS);
    assert_eq!(total("alloc_bytes"), TOTAL_BYTES);
    assert_eq!(total("frees"), TOTAL_FREES);
    assert_eq!(total("inuse_bytes"), INUSE_BYTES);
}

// ---------------------------------------------------------------------------------------------
// HTML
// ---------------------------------------------------------------------------------------------

fn chromium(args: &[OsString]) -> Output {
    let browser = std::env::var("MEMPROF_TEST_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run_no = RUNS.fetch_add(1, Ordering::Relaxed);
    let profile = work_dir().join(format!("chromium-profile-{run_no}"));
    let _ = fs::remove_dir_all(&profile);
    let mut user_dir = OsString::from("--user-data-dir=");
    user_dir.push(&profile);
    let mut cmd = Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(user_dir)
    .args(args);
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", context("chromium", &out));
    out
}

fn file_url(path: &Path) -> OsString {
    let mut url = OsString::from("file://");
    url.push(path);
    url
}

#[test]
fn html_renders_in_chromium() {
    let t = trace();
    let page = file_url(&t.file("report.html"));
    let png = t.file("report.png");
    let _ = fs::remove_file(&png);
    let mut shot = OsString::from("--screenshot=");
    shot.push(&png);
    chromium(&[shot, "--window-size=1280,2000".into(), page.clone()]);
    let size = fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    // A blank 1280x2000 PNG is a few KB; the rendered page is far larger.
    assert!(size > 20_000, "screenshot is {size} bytes");

    let dom = String::from_utf8(chromium(&["--dump-dom".into(), page]).stdout).unwrap();
    assert!(
        dom.contains("<code>leak_widgets</code>"),
        "site name in the table"
    );
    assert!(dom.contains(">21,000 B<"), "exact bytes of the leak site");
    assert!(dom.contains("<svg id=\"memory-chart\""), "chart");
    assert!(dom.contains("<polyline class=\"heap\""), "heap line");
    assert!(
        dom.contains("<title>leak_widgets (21,000 bytes"),
        "flamegraph inline"
    );
    assert!(
        dom.contains("<details><summary>3 frames</summary>"),
        "expandable stacks"
    );
    assert!(dom.contains(&format!("memprof report: pid {}", t.pid)));
    assert!(dom.contains("28,000 B"), "outstanding bytes in the header");
    // The command's markup stays text: no <i> element was created from it.
    assert!(
        dom.contains("&lt;i&gt;x&amp;y&lt;/i&gt;"),
        "escaped command"
    );
    assert!(!dom.contains("<i>x"), "command injected markup");
    assert!(dom.contains("<td>scratch</td>"), "phases table");
    if t.verdict(LEAK_FN) == "leak" {
        assert!(dom.contains("<h2>Recommendations</h2>"), "recommendations");
    }
}

#[test]
fn html_is_self_contained() {
    let t = trace();
    let html = t.read("report.html");
    for needle in ["<script", "src=", "href=", "@import", "<link", "<iframe"] {
        assert!(!html.contains(needle), "page contains {needle}");
    }
    assert!(
        html.match_indices("url(")
            .all(|(i, _)| html[i..].starts_with("url(#"))
    );
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn unwritable_file_is_a_clear_error_and_others_are_written() {
    require_root();
    let dir = work_dir().join("errors");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("missing-dir").join("sites.csv");
    let good = dir.join("sites.folded");
    let out = run(Command::new(MEMPROF)
        .args(["trace", "--duration", SAFETY_NET, "--csv"])
        .arg(&bad)
        .arg("--folded")
        .arg(&good)
        .arg("--")
        .arg(fixture()));
    let ctx = context("memprof trace --csv <unwritable>", &out);
    assert!(!out.status.success(), "{ctx}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("failed to write {}", bad.display())),
        "{ctx}"
    );
    assert!(!stderr.contains("panicked"), "{ctx}");
    let folded = fs::read_to_string(&good).unwrap_or_default();
    assert!(folded.contains(";leak_widgets 21000"), "{folded}\n{ctx}");
}
