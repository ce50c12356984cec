//! How probes are attached: only in traced processes (an unrelated process keeps its code
//! untouched), removed in the foreground when memprof exits, exact with every kind of link
//! (uprobe sessions, multi-uprobe links, classic uprobes), placed on emulated instructions,
//! and the kernel programs' own log, off unless asked. Run as root (`cargo xtask test`).

mod common;

use std::{
    fs,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use common::*;
use iced_x86::{Code, Decoder, DecoderOptions};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(120);

/// `tests/fixtures/procs.c`, built once.
fn procs() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    require_root();
    BIN.get_or_init(|| build_fixture("procs", "procs.c", &[]))
}

/// `tests/fixtures/allocators.c` linked with jemalloc, built once.
fn jemalloc_program() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    require_root();
    BIN.get_or_init(|| build_fixture("alloc_je", "allocators.c", &["-ljemalloc"]))
}

fn build_fixture(name: &str, source: &str, libs: &[&str]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("memprof-probes");
    fs::create_dir_all(&dir).unwrap();
    let out = dir.join(name);
    let res = Command::new("cc")
        .args(["-O2", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&out)
        .arg(Path::new(FIXTURE_SRC).join(source))
        .args(libs)
        .output()
        .expect("cc runs");
    assert!(
        res.status.success(),
        "cc {source}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    out
}

/// Bytes of the executable mappings of the file ending in `suffix` in process `pid` that
/// differ from the file: a uprobe is an int3 written into the process's copy of the page.
fn patched_bytes(pid: u32, suffix: &str) -> usize {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let Ok(mem) = fs::File::open(format!("/proc/{pid}/mem")) else {
        return 0;
    };
    let mut differing = 0;
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || !fields[1].contains('x') || !fields[5].ends_with(suffix) {
            continue;
        }
        let (start, end) = fields[0].split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let offset = u64::from_str_radix(fields[2], 16).unwrap() as usize;
        let file = fs::read(format!("/proc/{pid}/root{}", fields[5])).unwrap();
        let mut live = vec![0u8; (end - start) as usize];
        if mem.read_exact_at(&mut live, start).is_err() {
            continue;
        }
        let end_in_file = (offset + live.len()).min(file.len());
        differing += live[..end_in_file - offset]
            .iter()
            .zip(&file[offset..end_in_file])
            .filter(|(a, b)| a != b)
            .count();
    }
    differing
}

/// A `procs leak COUNT SIZE` process: it maps the C library and waits for a line on stdin.
struct Waiter(Driven);

impl Waiter {
    fn start(count: u64) -> Self {
        Self(Driven::start(
            "procs leak",
            Command::new(procs()).args(["leak", &count.to_string(), "100"]),
        ))
    }

    fn pid(&self) -> u32 {
        self.0.proc.pid()
    }

    /// Leaks its blocks, then ends.
    fn finish(mut self) -> Finished {
        self.0.go("leaked");
        self.0.finish(DEADLINE)
    }
}

/// Starts `memprof trace ARGS` and waits until it traces.
fn start_memprof(args: &[&str]) -> Proc {
    let mp = Proc::spawn(
        format!("memprof trace {}", args.join(" ")),
        &mut memprof_trace(args),
    );
    let deadline = Instant::now() + STARTUP;
    assert!(
        mp.err
            .wait_line(deadline, |l| l.starts_with("memprof: tracing "))
            .is_some(),
        "memprof did not start\n{}",
        mp.output_so_far()
    );
    mp
}

/// The pids of the children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn probes_live_only_in_the_traced_processes() {
    wait_for_probe_removal();
    let bystander = Waiter::start(1);
    let bin = procs().to_str().unwrap();
    // A shell that forks `procs spin 3`: both are traced, the bystander is not.
    let spin = format!("{bin} spin 3");
    let mp = start_memprof(&["--json", "--", "sh", "-c", &spin]);
    let shell = mp
        .out
        .wait_line(Instant::now() + STARTUP, |l| {
            l.contains("\"type\":\"start\"")
        })
        .and_then(|l| serde_json::from_str::<Value>(&l).ok())
        .and_then(|r| r["pid"].as_u64())
        .map(|p| p as u32);
    // Wait for the shell's child to run.
    let deadline = Instant::now() + STARTUP;
    let mut child = None;
    while child.is_none() && Instant::now() < deadline {
        child = shell.and_then(|s| children(s).first().copied());
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(300));
    let child_patched = child.map_or(0, |c| patched_bytes(c, "/libc.so.6"));
    let shell_patched = shell.map_or(0, |s| patched_bytes(s, "/libc.so.6"));
    let bystander_patched = patched_bytes(bystander.pid(), "/libc.so.6");
    let f = mp.finish(DEADLINE);
    let bystander_done = bystander.finish();
    let mut c = Checks::new("probes of a spawned command and its child");
    c.check(shell.is_some(), "the start record names the shell's pid");
    c.check(child.is_some(), "the shell forked its child");
    c.check(
        shell_patched > 0,
        format!("the shell's libc carries probes ({shell_patched} bytes)"),
    );
    c.check(
        child_patched > 0,
        format!("the child's libc carries probes of its own ({child_patched} bytes)"),
    );
    c.eq(
        "bytes patched in the bystander's libc",
        bystander_patched,
        0,
    );
    c.eq("memprof exit code", f.code(), Some(0));
    c.eq("bystander exit code", bystander_done.code(), Some(0));
    c.finish(|| f.context());
}

#[test]
fn probes_leave_a_running_target_when_memprof_ends() {
    wait_for_probe_removal();
    let target = Waiter::start(3);
    let pid = target.pid().to_string();
    let mp = start_memprof(&["--json", "--pid", &pid, "--duration", "1s"]);
    let during = patched_bytes(target.pid(), "/libc.so.6");
    let f = mp.finish(DEADLINE);
    // Right after memprof exits: no background process removes probes any more.
    let after = patched_bytes(target.pid(), "/libc.so.6");
    let done = target.finish();
    let mut c = Checks::new("--pid, memprof ends first");
    c.check(during > 0, format!("probes while tracing ({during} bytes)"));
    c.eq("bytes patched once memprof has exited", after, 0);
    c.eq("memprof exit code", f.code(), Some(0));
    c.eq("target exit code", done.code(), Some(0));
    c.finish(|| f.context());
}

/// `procs tree` traced with probes attached as `links`: every process's leak is exact.
fn tree_with_links(links: &str) {
    let bin = procs().to_str().unwrap();
    let f = Proc::spawn(
        format!("memprof trace --links {links} -- procs tree"),
        &mut memprof_trace(&["--json", "--links", links, "--", bin, "tree"]),
    )
    .finish(DEADLINE);
    let r = final_report(&f);
    let records = f.ndjson();
    let start = records.iter().find(|r| r["type"] == "start");
    let mut c = Checks::new(format!("procs tree, --links {links}"));
    c.eq(
        "start.links",
        start.and_then(|s| s["links"].as_str()),
        Some(links),
    );
    c.eq("lost events", num(&r["totals"], "lost_events"), 0);
    c.eq("orphan returns", num(&r["kernel"], "orphan_returns"), 0);
    for (function, bytes, blocks) in [
        ("leak_parent", 1000, 10),
        ("leak_child", 2000, 20),
        ("leak_exec", 3000, 30),
    ] {
        let site = leaks(&r)
            .iter()
            .filter(|g| frame_names(g).first() == Some(&function))
            .fold((0, 0), |(b, n), g| {
                (b + num(g, "bytes"), n + num(g, "allocs"))
            });
        c.eq(function, site, (bytes, blocks));
    }
    c.finish(|| f.context());
}

#[test]
fn session_links_count_exactly() {
    tree_with_links("session");
}

#[test]
fn multi_links_count_exactly() {
    tree_with_links("multi");
}

#[test]
fn classic_uprobes_count_exactly() {
    tree_with_links("classic");
}

/// Whether the kernel emulates the instruction at `offset` of `file`'s bytes at a uprobe
/// (push, relative jmp/jcc/call, nop) rather than single-stepping it.
fn emulated_at(file: &[u8], offset: u64) -> bool {
    let code = &file[offset as usize..(offset as usize + 16).min(file.len())];
    let insn = Decoder::with_ip(64, code, offset, DecoderOptions::NONE).decode();
    insn.code() == Code::Push_r64
        || insn.is_jmp_short_or_near()
        || insn.is_jcc_short_or_near()
        || insn.is_call_near()
        || matches!(insn.code(), Code::Nopd | Code::Nopq | Code::Nop_rm32)
}

#[test]
fn jemalloc_entry_probes_sit_on_emulated_instructions() {
    let program = jemalloc_program().to_str().unwrap();
    let f = Proc::spawn(
        "memprof trace -- allocators (jemalloc)",
        &mut memprof_trace(&["--json", "--", program]),
    )
    .finish(DEADLINE);
    let records = f.ndjson();
    let start = records
        .iter()
        .find(|r| r["type"] == "start")
        .cloned()
        .unwrap_or(Value::Null);
    let jemalloc = start["allocators"]
        .as_array()
        .and_then(|a| a.iter().find(|o| o["kind"] == "jemalloc"))
        .cloned()
        .unwrap_or(Value::Null);
    let path = jemalloc["path"].as_str().unwrap_or_default().to_string();
    let file = fs::read(&path).unwrap_or_default();
    let mut c = Checks::new("jemalloc's probes");
    c.check(
        !file.is_empty(),
        format!("jemalloc found in the start record: {jemalloc}"),
    );
    for function in ["malloc", "free"] {
        let placement = jemalloc["placements"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["function"] == function))
            .cloned()
            .unwrap_or(Value::Null);
        let offset = placement["offset"].as_u64().unwrap_or(0);
        // Debian's jemalloc starts both with instructions the kernel single-steps.
        c.check(
            offset > 0,
            format!("{function}: placed past its first instruction: {placement}"),
        );
        let symbol = symbol_offset(&file, function);
        c.check(
            symbol.is_some_and(|s| emulated_at(&file, s + offset)),
            format!("{function}: the instruction at +{offset} is emulated"),
        );
        c.check(
            placement["why"]
                .as_str()
                .is_some_and(|w| w.contains("is emulated")),
            format!("{function}: the start record says why: {placement}"),
        );
    }
    c.finish(|| f.context());
}

/// The file offset of the dynamic symbol `name` of an ELF file.
fn symbol_offset(file: &[u8], name: &str) -> Option<u64> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    let obj = object::File::parse(file).ok()?;
    let sym = obj.dynamic_symbols().find(|s| s.name() == Ok(name))?;
    let section = obj.section_by_index(sym.section_index()?).ok()?;
    let (offset, _) = section.file_range()?;
    Some(sym.address() - section.address() + offset)
}

#[test]
fn kernel_log_reports_forks_only_when_asked() {
    let bin = procs().to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", bin, "tree"]);
        Proc::spawn("memprof trace -- procs tree", &mut memprof_trace(&args)).finish(DEADLINE)
    };
    let quiet = run(&[]);
    let logged = run(&["--kernel-log", "debug"]);
    let parent = logged
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("pid parent "))
        .unwrap_or_default()
        .trim()
        .to_string();
    let forks: Vec<&str> = logged
        .stderr
        .lines()
        .filter(|l| l.starts_with("memprof: kernel debug: process ") && l.contains(" forked "))
        .collect();
    let mut c = Checks::new("--kernel-log");
    c.eq(
        "kernel lines without --kernel-log",
        quiet
            .stderr
            .lines()
            .filter(|l| l.starts_with("memprof: kernel "))
            .count(),
        0,
    );
    c.eq("forks logged at debug", forks.len(), 2);
    c.check(
        forks
            .iter()
            .all(|l| l.starts_with(&format!("memprof: kernel debug: process {parent} forked "))),
        format!("each names the parent {parent}: {forks:?}"),
    );
    c.eq("exit code", logged.code(), Some(0));
    c.finish(|| logged.context());
}
