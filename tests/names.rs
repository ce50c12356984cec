//! End-to-end tests of how frames are named and grouped, with the real `memprof` binary and
//! real eBPF: one call site is one group in every output (two calls on one line, functions
//! inlined twice), frames nothing names read `module+0xOFFSET` with the offset in the module's
//! file (the same in every run, so identical runs give identical stacks and `memprof diff`
//! matches them), build ids in JSON and pprof, and names found wherever the system keeps them:
//! a debug file by build id (`--debug-dir`), by `.gnu_debuglink`, under a container's root, and
//! MiniDebugInfo (`.gnu_debugdata`).
//!
//! The fixture's source is below ([`SOURCE`]); each test builds what it needs from it with
//! `cc`, `strip`, `objcopy`, `nm` and `xz` (binutils, xz-utils). Needs root:
//! `cargo test --release -p memprof-user --test names -- --test-threads=1`.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use common::{
    Checks, Driven, Finished, Proc, final_report, frame_fn, leaks, memprof_trace, num,
    require_root, stack,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(90);

/// The fixture. `names ROUNDS` allocates, per round, 2 x 48 B on one line of
/// `two_on_one_line`, 80 B and 96 B through `grab` inlined on two lines of `through_inline`,
/// and 112 B in `hidden_static` (a static function: `.symtab` names it, `.dynsym` does not);
/// nothing is freed. `names ROUNDS wait` first prints `ready` and waits for a line on stdin,
/// then prints `done` and waits for stdin to close.
const SOURCE: &str = r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Global, so that the compiler keeps every block (and every call to malloc). */
#define KEEP 65536
void *keep[KEEP];
int kept;

static void hold(void *p) { keep[kept++ % KEEP] = p; }

__attribute__((noinline)) void two_on_one_line(void) {
    void *a = malloc(48), *b = malloc(48); /* LINE_TWO */
    hold(a);
    hold(b);
}

static inline __attribute__((always_inline)) void *grab(size_t size) {
    return malloc(size); /* LINE_GRAB */
}

__attribute__((noinline)) void through_inline(void) {
    hold(grab(80)); /* LINE_INLINE_A */
    hold(grab(96)); /* LINE_INLINE_B */
}

static __attribute__((noinline)) void hidden_static(void) {
    hold(malloc(112));
}

__attribute__((noinline)) static void work(int rounds) {
    for (int i = 0; i < rounds; i++) {
        two_on_one_line();
        through_inline();
        hidden_static();
    }
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 100;
    if (argc > 2 && strcmp(argv[2], "wait") == 0) {
        char line[64];
        setvbuf(stdout, NULL, _IONBF, 0);
        fputs("ready\n", stdout);
        if (!fgets(line, sizeof line, stdin))
            return 1;
        work(rounds);
        fputs("done\n", stdout);
        while (fgets(line, sizeof line, stdin))
            ;
        return 0;
    }
    work(rounds);
    return 0;
}
"#;

/// The line of the source holding `marker`.
fn line_of(marker: &str) -> u64 {
    SOURCE
        .lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker} in the source")) as u64
        + 1
}

const ROUNDS: u64 = 100;

fn dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("memprof-names");
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a tool to its end (through `common::Proc`), panicking when it fails.
fn tool(cmd: &mut Command) -> Finished {
    let f = Proc::spawn(format!("{cmd:?}"), cmd).finish(DEADLINE);
    assert_eq!(f.code(), Some(0), "{}", f.context());
    f
}

fn stdout_of(cmd: &mut Command) -> String {
    tool(cmd).stdout
}

/// The fixture built with debug information (`names`), and the same binary stripped of it
/// and of its symbol table (`names.stripped`, no debug link).
fn built() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    require_root();
    BUILT.get_or_init(|| {
        let dir = dir();
        let src = dir.join("names.c");
        fs::write(&src, SOURCE).unwrap();
        let full = dir.join("names");
        tool(
            Command::new("cc")
                .args(["-O2", "-g", "-fno-omit-frame-pointer", "-o"])
                .arg(&full)
                .arg(&src),
        );
        let stripped = dir.join("names.stripped");
        tool(Command::new("strip").arg("-o").arg(&stripped).arg(&full));
        (full, stripped)
    })
}

/// The GNU build id of `elf`, as `readelf -n` prints it.
fn build_id(elf: &Path) -> String {
    let notes = stdout_of(Command::new("readelf").arg("-n").arg(elf));
    notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build id in readelf -n {}\n{notes}", elf.display()))
        .to_string()
}

/// `objcopy --only-keep-debug FROM TO`: the debug file of `from`.
fn keep_debug(from: &Path, to: &Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    tool(
        Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(from)
            .arg(to),
    );
}

/// Where debug directory `dir` keeps the debug file of `elf`: `.build-id/xx/rest.debug`.
fn by_build_id(dir: &Path, elf: &Path) -> PathBuf {
    let id = build_id(elf);
    dir.join(".build-id")
        .join(&id[..2])
        .join(format!("{}.debug", &id[2..]))
}

/// `function` -> (file offset of its start, size), from `nm -S` of `elf` and its program
/// headers (`readelf -lW`).
fn functions(elf: &Path) -> BTreeMap<String, (u64, u64)> {
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let loads: Vec<(u64, u64, u64)> = stdout_of(Command::new("readelf").arg("-lW").arg(elf))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // LOAD offset vaddr paddr filesz memsz flags align
            (f.first() == Some(&"LOAD")).then(|| (hex(f[1]), hex(f[2]), hex(f[4])))
        })
        .collect();
    stdout_of(Command::new("nm").arg("-S").arg(elf))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 4 || !matches!(f[2], "T" | "t") {
                return None;
            }
            let vaddr = hex(f[0]);
            let (off, seg_vaddr, _) = loads
                .iter()
                .find(|(_, v, size)| (*v..v + size).contains(&vaddr))?;
            Some((f[3].to_string(), (vaddr - seg_vaddr + off, hex(f[1]))))
        })
        .collect()
}

/// `memprof trace --json ARGS -- PROGRAM ROUNDS`, finished.
fn trace(program: &Path, rounds: u64, args: &[&str]) -> Finished {
    let rounds = rounds.to_string();
    let mut cmd = memprof_trace(&[&["--json"], args, &["--", program.to_str().unwrap()]].concat());
    cmd.arg(&rounds);
    Proc::spawn(format!("memprof trace {}", program.display()), &mut cmd).finish(DEADLINE)
}

/// A group's frames, innermost first, as `name@line` (`?` for no name, `-` for no line), with
/// `(inlined)` for inlined frames.
fn frames(group: &Value) -> Vec<String> {
    stack(group)
        .iter()
        .map(|f| {
            format!(
                "{}@{}{}",
                frame_fn(f).unwrap_or("?"),
                f["line"]
                    .as_u64()
                    .map_or("-".to_string(), |l| l.to_string()),
                if f["inlined"] == true {
                    "(inlined)"
                } else {
                    ""
                }
            )
        })
        .collect()
}

/// The groups whose innermost frame is `function`.
fn groups_of<'a>(r: &'a Value, function: &str) -> Vec<&'a Value> {
    leaks(r)
        .iter()
        .filter(|g| stack(g).first().and_then(frame_fn) == Some(function))
        .collect()
}

/// Checks that no two groups of the report share a symbolized stack, allocator and kind.
fn check_unique_groups(c: &mut Checks, r: &Value) {
    let mut seen = BTreeSet::new();
    for g in leaks(r) {
        let key = format!("{} {} {}", g["stack"], g["allocator"], g["kind"]);
        c.check(seen.insert(key.clone()), format!("two groups for {key}"));
    }
}

/// The number of frames without a function in every group of the report.
fn unnamed_frames(r: &Value) -> (u64, u64) {
    let all: Vec<&Value> = leaks(r).iter().flat_map(stack).collect();
    let unnamed = all.iter().filter(|f| f["function"].is_null()).count();
    (unnamed as u64, all.len() as u64)
}

// ---------------------------------------------------------------------------------------------
// One site, one group
// ---------------------------------------------------------------------------------------------

/// The unstripped fixture traced once, with `--csv`, `--folded` and `--pprof` files in
/// [`dir`] (`full.csv`, `full.folded`, `full.pb.gz`).
fn outputs() -> &'static Finished {
    static RUN: OnceLock<Finished> = OnceLock::new();
    RUN.get_or_init(|| {
        let file = |ext: &str| dir().join(format!("full.{ext}"));
        let (csv, folded, pprof) = (file("csv"), file("folded"), file("pb.gz"));
        trace(
            &built().0,
            ROUNDS,
            &[
                "--csv",
                csv.to_str().unwrap(),
                "--folded",
                folded.to_str().unwrap(),
                "--pprof",
                pprof.to_str().unwrap(),
            ],
        )
    })
}

/// An output file of [`outputs`].
fn output(ext: &str) -> String {
    outputs();
    fs::read_to_string(dir().join(format!("full.{ext}"))).unwrap()
}

/// `go tool pprof -raw` of the profile of [`outputs`].
fn pprof_raw() -> String {
    outputs();
    stdout_of(
        Command::new("go")
            .args(["tool", "pprof", "-raw"])
            .arg(dir().join("full.pb.gz")),
    )
}

/// Two calls to malloc on one line have two return addresses; memprof gives them one group,
/// with both calls' bytes, in JSON, CSV and folded stacks.
#[test]
fn two_calls_on_one_line_are_one_group_everywhere() {
    let (full, _) = built();
    // The fixture really calls malloc twice from two_on_one_line (two return addresses).
    let (start, size) = functions(full)["two_on_one_line"];
    let disasm = stdout_of(Command::new("objdump").args([
        "-d",
        "--no-show-raw-insn",
        &format!("--start-address={start:#x}"),
        &format!("--stop-address={:#x}", start + size),
        full.to_str().unwrap(),
    ]));
    let calls = disasm
        .lines()
        .filter(|l| l.contains("call") && l.contains("<malloc@plt>"))
        .count();
    assert_eq!(calls, 2, "two malloc calls in two_on_one_line:\n{disasm}");

    let o = outputs();
    let r = final_report(o);
    let mut c = Checks::new("two calls on one line");
    let bytes = ROUNDS * 2 * 48;
    let got: Vec<(u64, u64, Option<String>)> = groups_of(&r, "two_on_one_line")
        .iter()
        .map(|g| {
            (
                num(g, "bytes"),
                num(g, "allocs"),
                frames(g).first().cloned(),
            )
        })
        .collect();
    c.eq(
        "JSON groups of two_on_one_line (bytes, allocs, innermost frame)",
        got,
        vec![(
            bytes,
            2 * ROUNDS,
            Some(format!("two_on_one_line@{}", line_of("LINE_TWO"))),
        )],
    );
    check_unique_groups(&mut c, &r);

    // CSV: one row for the site, with both calls' bytes and allocations.
    let csv = output("csv");
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let mine: Vec<&Vec<&str>> = rows.iter().filter(|r| r[0] == "two_on_one_line").collect();
    c.eq("CSV rows of two_on_one_line", mine.len(), 1);
    if let Some(row) = mine.first() {
        // inuse_bytes, inuse_objects, alloc_bytes, alloc_objects
        c.eq(
            "CSV bytes and objects",
            row[4..8].to_vec(),
            vec![
                bytes.to_string().as_str(),
                (2 * ROUNDS).to_string().as_str(),
                bytes.to_string().as_str(),
                (2 * ROUNDS).to_string().as_str(),
            ],
        );
    }
    // Nothing is freed: every group is in `leaks`, one CSV row each.
    c.eq("CSV rows", rows.len(), leaks(&r).len());

    // Folded stacks (root first): one line ending in the site, with both calls' bytes.
    let folded = output("folded");
    let lines: Vec<&str> = folded
        .lines()
        .filter(|l| {
            l.rsplit_once(' ')
                .is_some_and(|(s, _)| s.ends_with(";two_on_one_line"))
        })
        .collect();
    c.eq("folded lines of two_on_one_line", lines.len(), 1);
    c.eq(
        "folded bytes",
        lines
            .first()
            .and_then(|l| l.rsplit_once(' '))
            .map(|(_, n)| n),
        Some(bytes.to_string().as_str()),
    );
    c.finish(|| o.context());
}

/// A function inlined into two lines of its caller: two groups, each with the inlined function
/// as a frame of its own (`inlined: true`) above the caller at its line; in pprof, one location
/// holding both lines.
#[test]
fn inlined_functions_are_frames_and_sites_by_line() {
    let o = outputs();
    let r = final_report(o);
    let mut c = Checks::new("inlined grab");
    let mut got: Vec<(Vec<String>, u64, u64)> = groups_of(&r, "grab")
        .iter()
        .map(|g| {
            (
                frames(g).into_iter().take(2).collect(),
                num(g, "bytes"),
                num(g, "allocs"),
            )
        })
        .collect();
    got.sort();
    let grab = format!("grab@{}(inlined)", line_of("LINE_GRAB"));
    let at = |marker| format!("through_inline@{}", line_of(marker));
    c.eq(
        "groups of grab (two frames, bytes, allocs)",
        got,
        vec![
            (vec![grab.clone(), at("LINE_INLINE_A")], ROUNDS * 80, ROUNDS),
            (vec![grab, at("LINE_INLINE_B")], ROUNDS * 96, ROUNDS),
        ],
    );
    // pprof: the inlined function and its caller are one location, innermost line first.
    let raw = pprof_raw();
    let loc = raw
        .lines()
        .zip(raw.lines().skip(1))
        .find(|(l, _)| l.contains(" grab ") && l.contains("names.c"));
    c.check(
        loc.is_some_and(|(_, next)| {
            next.trim_start().starts_with("through_inline ") && next.contains("names.c:")
        }),
        format!("a pprof location with grab, then through_inline:\n{raw}"),
    );
    c.finish(|| o.context());
}

/// Build ids: in every JSON frame of the fixture, and in pprof's mapping of it, whose range and
/// file offset turn a location's address into the frame's file offset.
#[test]
fn build_ids_in_json_and_pprof_mappings() {
    let (full, _) = built();
    let id = build_id(full);
    let o = outputs();
    let r = final_report(o);
    let mut c = Checks::new("build ids");
    let path = full.to_str().unwrap();
    let mine: Vec<&Value> = leaks(&r)
        .iter()
        .flat_map(stack)
        .filter(|f| f["module"] == path)
        .collect();
    c.check(!mine.is_empty(), "frames in the fixture");
    for f in &mine {
        c.eq("frame build_id", f["build_id"].as_str(), Some(id.as_str()));
    }
    // `1: 0x10000000000/0x10000001234/0x0 /path/names BUILDID [FN][FL][LN][IN]`
    let raw = pprof_raw();
    let mapping = raw
        .lines()
        .skip_while(|l| *l != "Mappings")
        .find(|l| l.contains(&format!(" {path} ")));
    let fields: Vec<&str> = mapping.map_or(vec![], |l| l.split_whitespace().collect());
    c.check(
        fields.len() >= 4 && fields[3] == id,
        format!("pprof mapping of {path} with build id {id}: {mapping:?}"),
    );
    let range: Vec<u64> = fields.get(1).map_or(vec![], |r| {
        r.split('/')
            .map(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).unwrap())
            .collect()
    });
    // The two_on_one_line location: address - start + file offset is its JSON offset.
    let json_offset = groups_of(&r, "two_on_one_line")
        .first()
        .and_then(|g| stack(g)[0]["offset"].as_str())
        .map(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).unwrap());
    let address = raw
        .lines()
        .find(|l| l.contains(" two_on_one_line "))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).unwrap());
    match (range.as_slice(), address, json_offset) {
        ([start, limit, file_offset], Some(address), Some(offset)) => {
            c.check(
                (*start..*limit).contains(&address),
                format!("{address:#x} in {start:#x}..{limit:#x}"),
            );
            c.eq(
                "file offset of the location",
                address - start + file_offset,
                offset,
            );
        }
        other => c.check(false, format!("mapping range, address, offset: {other:?}")),
    }
    c.finish(|| format!("{}\n{raw}", o.context()));
}

// ---------------------------------------------------------------------------------------------
// Unnamed frames: module + file offset, the same in every run
// ---------------------------------------------------------------------------------------------

/// The stripped fixture traced `rounds` rounds, its report saved with `--output` and as CSV.
fn stripped_run(name: &str, rounds: u64) -> (Finished, PathBuf, String) {
    let (_, stripped) = built();
    let (out, csv) = (
        dir().join(format!("{name}.json")),
        dir().join(format!("{name}.csv")),
    );
    let f = trace(
        stripped,
        rounds,
        &[
            "--output",
            out.to_str().unwrap(),
            "--csv",
            csv.to_str().unwrap(),
        ],
    );
    (f, out, fs::read_to_string(&csv).unwrap())
}

fn stripped_runs() -> &'static [(Finished, PathBuf, String); 2] {
    static RUNS: OnceLock<[(Finished, PathBuf, String); 2]> = OnceLock::new();
    RUNS.get_or_init(|| {
        [
            stripped_run("stripped-a", ROUNDS),
            stripped_run("stripped-b", ROUNDS),
        ]
    })
}

/// In the stripped fixture nothing names two_on_one_line: its frames read
/// `names.stripped+0xOFFSET`, the offset lying in the function as `nm` of the unstripped build
/// places it in the file; `unknown_frames` counts exactly the frames without a name.
#[test]
fn stripped_frames_are_module_offsets() {
    let (full, stripped) = built();
    let fns = functions(full);
    let (f, _, csv) = &stripped_runs()[0];
    let r = final_report(f);
    let mut c = Checks::new("stripped fixture");
    let path = stripped.to_str().unwrap();
    let name = "names.stripped";
    let offset_of = |f: &Value| {
        f["offset"]
            .as_str()
            .and_then(|h| u64::from_str_radix(h.strip_prefix("0x")?, 16).ok())
    };
    // Per function of the fixture, the groups whose innermost frame lies in it.
    let mut sizes: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for g in leaks(&r) {
        let Some(inner) = stack(g).first() else {
            continue;
        };
        if inner["module"] != path {
            continue;
        }
        c.check(
            inner["function"].is_null() && inner["file"].is_null(),
            format!("nothing names {inner}"),
        );
        let Some(offset) = offset_of(inner) else {
            c.check(false, format!("no offset: {inner}"));
            continue;
        };
        let holder = fns
            .iter()
            .find(|(_, (start, size))| *start < offset && offset <= start + size);
        match holder {
            Some((function, _)) => sizes
                .entry(function.as_str())
                .or_default()
                .push((num(g, "bytes"), num(g, "allocs"))),
            None => c.check(false, format!("{offset:#x} is in no function of {fns:?}")),
        }
        // The CSV names the frame the same way.
        let label = format!("{name}+{offset:#x} <- ");
        c.check(
            csv.lines()
                .any(|l| l.rsplit(',').next().is_some_and(|s| s.starts_with(&label))),
            format!("a CSV row whose stack starts with {label}"),
        );
    }
    // Without line information every return address is a site of its own: two_on_one_line's
    // two calls are two groups of one call each, and so are through_inline's.
    for groups in sizes.values_mut() {
        groups.sort_unstable();
    }
    c.eq(
        "groups (bytes, allocs) per function",
        sizes,
        BTreeMap::from([
            ("hidden_static", vec![(ROUNDS * 112, ROUNDS)]),
            (
                "through_inline",
                vec![(ROUNDS * 80, ROUNDS), (ROUNDS * 96, ROUNDS)],
            ),
            (
                "two_on_one_line",
                vec![(ROUNDS * 48, ROUNDS), (ROUNDS * 48, ROUNDS)],
            ),
        ]),
    );
    // Nothing is freed: every group is in `leaks`, and unknown_frames counts their unnamed
    // frames.
    let (unnamed, all) = unnamed_frames(&r);
    c.check(
        unnamed >= 5,
        format!("at least the fixture's 5 sites' frames: {unnamed}"),
    );
    c.eq(
        "unknown_frames, stack_frames",
        (num(&r, "unknown_frames"), num(&r, "stack_frames")),
        (unnamed, all),
    );
    check_unique_groups(&mut c, &r);
    c.finish(|| f.context());
}

/// Two identical runs of the stripped fixture (different load addresses: ASLR) give the same
/// stacks, byte for byte, in JSON and CSV.
#[test]
fn identical_runs_give_identical_stacks() {
    let [(fa, _, csv_a), (fb, _, csv_b)] = stripped_runs();
    let (ra, rb) = (final_report(fa), final_report(fb));
    let stacks = |r: &Value| -> Vec<String> {
        leaks(r)
            .iter()
            .map(|g| {
                format!(
                    "{} {} {} {}",
                    g["bytes"], g["allocator"], g["kind"], g["stack"]
                )
            })
            .collect()
    };
    let csv_stacks = |csv: &str| -> Vec<String> {
        csv.lines()
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                format!("{} {} {}", f[..4].join(","), f[6], f[12..].join(","))
            })
            .collect()
    };
    let mut c = Checks::new("identical runs");
    c.check(
        ra["pid"] != rb["pid"],
        "two processes (two address-space layouts)",
    );
    c.eq("JSON stacks", stacks(&ra), stacks(&rb));
    c.eq("CSV stacks", csv_stacks(csv_a), csv_stacks(csv_b));
    c.check(
        !ra.to_string().contains("\"addr\""),
        "no absolute addresses in the report",
    );
    c.finish(|| format!("{}\n{}", fa.context(), fb.context()));
}

/// `memprof diff` matches sites with unnamed frames across runs by their stable names.
#[test]
fn diff_matches_unnamed_frames_across_runs() {
    let (_, before, _) = &stripped_runs()[0];
    let (f, after, _) = stripped_run("stripped-more", ROUNDS + 50);
    final_report(&f);
    let out = tool(
        Command::new(common::MEMPROF)
            .arg("diff")
            .arg(before)
            .arg(after)
            .arg("--json"),
    );
    let d: Value = serde_json::from_str(&out.stdout).unwrap();
    let mut c = Checks::new("diff of the stripped fixture");
    let sites = d["sites"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    // Each of the fixture's 5 sites grew by 50 rounds, matched by its `names.stripped+0x...`
    // frames; no site is new or gone.
    let mut grew: Vec<i64> = sites
        .iter()
        .filter(|s| {
            s["stack"][0]
                .as_str()
                .is_some_and(|l| l.starts_with("names.stripped+0x"))
        })
        .map(|s| {
            c.eq("status", s["status"].as_str(), Some("grew"));
            s["delta_bytes"].as_i64().unwrap_or(0)
        })
        .collect();
    grew.sort_unstable();
    c.eq(
        "growth of the fixture's sites",
        grew,
        vec![50 * 48, 50 * 48, 50 * 80, 50 * 96, 50 * 112],
    );
    c.finish(|| format!("{d:#}\n{}", f.context()));
}

// ---------------------------------------------------------------------------------------------
// Names wherever the system keeps them
// ---------------------------------------------------------------------------------------------

/// Checks that the run `f` ended well and named the fixture's sites with files and lines, as
/// in the unstripped build.
fn expect_named_with_lines(what: &str, f: &Finished) {
    let r = final_report(f);
    let mut c = Checks::new(what);
    check_named_with_lines(&mut c, &r);
    c.finish(|| f.context());
}

fn check_named_with_lines(c: &mut Checks, r: &Value) {
    let groups = groups_of(r, "two_on_one_line");
    c.eq("groups of two_on_one_line", groups.len(), 1);
    if let Some(g) = groups.first() {
        c.eq("its bytes", num(g, "bytes"), ROUNDS * 2 * 48);
        c.eq(
            "its frame",
            frames(g).first().cloned(),
            Some(format!("two_on_one_line@{}", line_of("LINE_TWO"))),
        );
        c.check(
            stack(g)[0]["file"]
                .as_str()
                .is_some_and(|f| f.ends_with("names.c")),
            format!("file names.c: {}", stack(g)[0]),
        );
    }
    c.eq("groups of grab", groups_of(r, "grab").len(), 2);
    c.eq(
        "groups of hidden_static",
        groups_of(r, "hidden_static").len(),
        1,
    );
}

/// The stripped binary (no debug link) and `objcopy --only-keep-debug` of the build in a
/// debug directory by build id: `--debug-dir` finds it.
#[test]
fn debug_file_by_build_id() {
    let (full, stripped) = built();
    let debug_dir = dir().join("debug-dir");
    let _ = fs::remove_dir_all(&debug_dir);
    keep_debug(full, &by_build_id(&debug_dir, full));
    let f = trace(
        stripped,
        ROUNDS,
        &["--debug-dir", debug_dir.to_str().unwrap()],
    );
    expect_named_with_lines("debug file by build id", &f);
}

/// The stripped binary with a `.gnu_debuglink` to its debug file in `.debug/` beside it.
#[test]
fn debug_file_by_debug_link() {
    let (full, stripped) = built();
    let place = dir().join("linked");
    let _ = fs::remove_dir_all(&place);
    let debug = place.join(".debug").join("names.debug");
    keep_debug(full, &debug);
    let linked = place.join("names");
    tool(
        Command::new("objcopy")
            .arg(format!("--add-gnu-debuglink={}", debug.display()))
            .arg(stripped)
            .arg(&linked),
    );
    expect_named_with_lines("debug file by debug link", &trace(&linked, ROUNDS, &[]));
}

/// MiniDebugInfo as Fedora makes it: the function symbols `.dynsym` lacks, in an xz-compressed
/// ELF in `.gnu_debugdata` of the stripped binary. Functions are named (no lines: two calls in
/// one function are one site, and so are an inlined function's two lines).
#[test]
fn minidebuginfo_names_functions() {
    let (full, stripped) = built();
    let work = dir().join("mini");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let symbols = |args: &[&str]| -> BTreeSet<String> {
        stdout_of(
            Command::new("nm")
                .args(args)
                .args(["--format=posix", "--defined-only"])
                .arg(full),
        )
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 2 && (args.contains(&"-D") || matches!(f[1], "T" | "t")))
                .then(|| f[0].to_string())
        })
        .collect()
    };
    let keep: Vec<String> = symbols(&[])
        .difference(&symbols(&["-D"]))
        .cloned()
        .collect();
    assert!(
        keep.iter().any(|s| s == "hidden_static"),
        "funcs to keep: {keep:?}"
    );
    let keep_file = work.join("keep_symbols");
    fs::write(&keep_file, keep.join("\n") + "\n").unwrap();
    let debug = work.join("debug");
    keep_debug(full, &debug);
    let mini = work.join("mini_debuginfo");
    tool(
        Command::new("objcopy")
            .args(["-S", "--remove-section", ".gdb_index", "--remove-section"])
            .arg(".comment")
            .arg(format!("--keep-symbols={}", keep_file.display()))
            .arg(&debug)
            .arg(&mini),
    );
    tool(Command::new("xz").arg("-f").arg(&mini));
    let with_mini = work.join("names");
    tool(
        Command::new("objcopy")
            .arg(format!(
                "--add-section=.gnu_debugdata={}",
                work.join("mini_debuginfo.xz").display()
            ))
            .arg(stripped)
            .arg(&with_mini),
    );
    let sections = stdout_of(Command::new("readelf").arg("-SW").arg(&with_mini));
    assert!(
        sections.contains(".gnu_debugdata") && !sections.contains(".symtab"),
        "{sections}"
    );

    let f = trace(&with_mini, ROUNDS, &[]);
    let r = final_report(&f);
    let mut c = Checks::new("MiniDebugInfo");
    let site = |function: &str| -> Vec<(Vec<String>, u64)> {
        groups_of(&r, function)
            .iter()
            .map(|g| (frames(g).into_iter().take(1).collect(), num(g, "bytes")))
            .collect()
    };
    c.eq(
        "two_on_one_line",
        site("two_on_one_line"),
        vec![(vec!["two_on_one_line@-".to_string()], ROUNDS * 2 * 48)],
    );
    c.eq(
        "through_inline",
        site("through_inline"),
        vec![(vec!["through_inline@-".to_string()], ROUNDS * (80 + 96))],
    );
    c.eq(
        "hidden_static",
        site("hidden_static"),
        vec![(vec!["hidden_static@-".to_string()], ROUNDS * 112)],
    );
    check_unique_groups(&mut c, &r);
    c.finish(|| f.context());
}

/// A process under its own root (a container's mount namespace: `unshare` and `pivot_root`)
/// whose debug file lies in that root's `/usr/lib/debug/.build-id`: found through
/// `/proc/PID/root`. The process is a static build (the root needs no libraries) stripped of its
/// debug information but not of its symbol table (its malloc is found there): file names,
/// lines and inlined functions can only come from the container's debug file.
#[test]
fn debug_file_inside_a_container_root() {
    let (full, _) = built();
    let work = dir().join("static");
    fs::create_dir_all(&work).unwrap();
    let static_full = work.join("names");
    tool(
        Command::new("cc")
            .args(["-static", "-O2", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(&static_full)
            .arg(full.with_extension("c")),
    );
    let root = dir().join("container");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(root.join("old")).unwrap();
    tool(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(root.join("app"))
            .arg(&static_full),
    );
    keep_debug(
        &static_full,
        &by_build_id(&root.join("usr/lib/debug"), &static_full),
    );
    let script = format!(
        "set -e; mount --make-rprivate /; mount --bind {r} {r}; cd {r}; pivot_root . old; \
         exec /app {ROUNDS} wait",
        r = root.display()
    );
    let mut app = Driven::start(
        "container app",
        Command::new("unshare").args(["--mount", "sh", "-c", &script]),
    );
    let pid = app.proc.pid().to_string();
    let mp = Proc::spawn(
        "memprof trace --pid",
        &mut memprof_trace(&["--json", "--pid", &pid, "--duration", "60s"]),
    );
    let started = mp
        .err
        .wait_line(std::time::Instant::now() + common::STARTUP, |l| {
            l.starts_with("memprof: tracing ")
        });
    assert!(started.is_some(), "{}", mp.output_so_far());
    app.go("done");
    let done = app.finish(DEADLINE);
    let f = mp.finish(DEADLINE);
    let r = final_report(&f);
    let mut c = Checks::new("debug file inside a container root");
    c.eq("app exit code", done.code(), Some(0));
    check_named_with_lines(&mut c, &r);
    let module = groups_of(&r, "two_on_one_line")
        .first()
        .and_then(|g| stack(g)[0]["module"].as_str().map(str::to_string));
    c.eq(
        "module, through the process's root",
        module,
        Some(format!("/proc/{pid}/root/app")),
    );
    c.finish(|| f.context());
}
