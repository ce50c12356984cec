//! Developer tasks for the memprof workspace, run as `cargo xtask <command>`.
//!
//! xtask only orchestrates: it installs the toolchain (`setup`), and runs cargo, the C compiler
//! and the memprof binary. The eBPF object is normally built by `memprof-user/build.rs`;
//! `build-ebpf` builds it standalone for working on the kernel side.

mod bench;
mod setup;
mod soak;
mod soak_all;
mod util;

use std::{ffi::OsString, process::ExitCode};

use anyhow::{Context as _, Result, bail};

use crate::util::{Workspace, ensure_root, run};

const USAGE: &str = "\
usage: cargo xtask <command> [args...]

commands:
  setup                 install what building and testing need (apt packages, the pinned
                        nightly with rust-src, bpf-linker) and mount tracefs; needs root
  build-ebpf [ARGS]     build the eBPF object standalone into target/ebpf (ARGS go to cargo build)
  test [ARGS] [-- HARNESS_ARGS]
                        setup, build memprof, run all tests serially; needs root.
                        ARGS go to cargo test (e.g. a test-name filter), HARNESS_ARGS to the
                        test binaries (e.g. --nocapture)
  bench [--reps N] [--quick] [--micro] [--kernel]
                        setup, build memprof, measure tracing cost on bench/ workloads (churn
                        with and without frame pointers, Python): untraced, probe floor on
                        each kind of link, memprof with unwind tables, frame pointers, multi
                        links, sampled, dwarf, bpftrace; attach/detach times, an unrelated
                        process beside memprof, redis under memprof and heaptrack, the agent's
                        throughput; writes target/bench/results.md and results.json; needs
                        root. --micro: only the agent microbenchmark (memprof-bench, criterion,
                        events/s), into target/bench/micro.md. --kernel: only the cost of
                        --kernel on pipe rounds (bench/pipes.c), into target/bench/kernel.md
  soak [--minutes N] [--rate ALLOCS_PER_S]
                        setup, build memprof, trace a process churning ALLOCS_PER_S (default
                        20000) malloc/free pairs with a bounded live set for N minutes (default
                        60), sampling memprof's RSS; writes target/bench/soak.md and soak.json;
                        needs root
  soak --all [--minutes N] [--spawn-rate PROCS_PER_S] [--everything]
                        setup, build memprof, run it as a node agent (trace --all --comm procs
                        --metrics; --everything: every process) while PROCS_PER_S (default 10)
                        short-lived processes start and exit, scraping its profiles and
                        metrics every 15 s, for N minutes (default 60); prints its RSS at the
                        start and end and the growth over the last third; writes
                        target/bench/soak-all.md and soak-all.json; needs root
  demo [MEMPROF_ARGS]   setup, build memprof, trace the bundled demo/leaky_cache.c workload;
                        MEMPROF_ARGS go to `memprof trace` (e.g. --json); needs root
";

/// Crates tested by `cargo xtask test`. Not `--workspace`: that selects every member,
/// including `memprof-ebpf`, which only builds for the BPF target.
const TEST_PACKAGES: &[&str] = &["memprof-common", "memprof-user", "memprof-bench", "xtask"];

/// Flags aya-build passes for the kernel object: debug info carries the BTF the loader needs.
const EBPF_RUSTFLAGS: &[&str] = &[
    "--cfg=bpf_target_arch=\"x86_64\"",
    "-Cdebuginfo=2",
    "-Clink-arg=--btf",
];

/// Set by the outer cargo and rustup for xtask; inherited, they would pin the nested nightly
/// build to the host toolchain.
const HOST_TOOLCHAIN_VARS: &[&str] = &[
    "RUSTC",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO",
    "RUSTUP_TOOLCHAIN",
];

/// The bundled demo workload: `demo/<name>.c`, built into `target/demo/<name>`.
const DEMO_PROGRAM: &str = "leaky_cache";

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let Some(command) = args.next() else {
        eprint!("{USAGE}");
        bail!("no command given");
    };
    let rest: Vec<OsString> = args.collect();
    let ws = Workspace::locate();
    match command.to_str() {
        Some("setup") => {
            no_args("setup", &rest)?;
            setup::setup()
        }
        Some("build-ebpf") => build_ebpf(&ws, &rest),
        Some("test") => test(&ws, &rest),
        Some("demo") => demo(&ws, &rest),
        Some("bench") if rest.iter().any(|a| a.as_os_str() == "--micro") => {
            bench::bench(&ws, &rest)
        }
        Some("bench") => {
            ensure_root("bench", "memprof loads eBPF programs")?;
            setup::setup()?;
            build_memprof(&ws)?;
            bench::bench(&ws, &rest)
        }
        Some("soak") => {
            ensure_root("soak", "memprof loads eBPF programs")?;
            setup::setup()?;
            build_memprof(&ws)?;
            soak::soak(&ws, &rest)
        }
        Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            Ok(())
        }
        _ => {
            eprint!("{USAGE}");
            bail!("unknown command {command:?}")
        }
    }
}

fn no_args(command: &str, rest: &[OsString]) -> Result<()> {
    if let Some(arg) = rest.first() {
        bail!("`cargo xtask {command}` takes no arguments, got {arg:?}");
    }
    Ok(())
}

/// Builds the kernel programs with the pinned nightly, the way aya-build does from
/// `memprof-user/build.rs`, but into a target directory of their own.
fn build_ebpf(ws: &Workspace, extra: &[OsString]) -> Result<()> {
    let target_dir = ws.target_dir().join("ebpf");
    let mut cmd = ws.command("rustup");
    cmd.args(["run", setup::NIGHTLY, "cargo", "build"])
        .args(["--package", "memprof-ebpf", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .args(extra)
        .env("CARGO_ENCODED_RUSTFLAGS", EBPF_RUSTFLAGS.join("\x1f"));
    for var in HOST_TOOLCHAIN_VARS {
        cmd.env_remove(var);
    }
    run(&mut cmd).context(
        "building the eBPF object failed; `cargo xtask setup` (as root) installs the pinned \
         nightly and bpf-linker",
    )?;
    let object = target_dir.join("bpfel-unknown-none/release/memprof");
    eprintln!("ebpf object: {}", object.display());
    Ok(())
}

/// `cargo build --release -p memprof-user`, with the eBPF object built by its build.rs.
fn build_memprof(ws: &Workspace) -> Result<()> {
    let mut cmd = ws.cargo();
    cmd.args(["build", "--release", "--package", "memprof-user"])
        // The build script skips the eBPF object when this is set (for check/clippy); the
        // tests and the demo need the real one.
        .env_remove("AYA_BUILD_SKIP");
    run(&mut cmd)
}

fn test(ws: &Workspace, extra: &[OsString]) -> Result<()> {
    ensure_root("test", "the tests load eBPF programs")?;
    setup::setup()?;
    build_memprof(ws)?;

    let split = extra.iter().position(|arg| arg == "--");
    let (cargo_args, harness_args) = match split {
        Some(i) => (&extra[..i], &extra[i + 1..]),
        None => (extra, &[][..]),
    };
    let mut cmd = ws.cargo();
    cmd.args(["test", "--release"]);
    for package in TEST_PACKAGES {
        cmd.args(["--package", package]);
    }
    // Run every test binary even when one fails, so a run shows all failures.
    if !cargo_args.iter().any(|arg| arg == "--no-fail-fast") {
        cmd.arg("--no-fail-fast");
    }
    cmd.args(cargo_args)
        .args(["--", "--test-threads=1"])
        .args(harness_args)
        .env_remove("AYA_BUILD_SKIP");
    run_counting_tests(&mut cmd)
}

/// Runs `cargo test`, echoing its output, and ends with one line totalling every test binary's
/// `test result:` line (doc-test binaries with no tests come last and would otherwise close the
/// log with "0 passed").
fn run_counting_tests(cmd: &mut std::process::Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    eprintln!("+ {}", util::display(cmd));
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("failed to start cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("failed to read cargo test output")?;
            println!("{line}");
            if let Some((p, f)) = parse_test_result(&line) {
                passed += p;
                failed += f;
            }
        }
    }
    let status = child.wait().context("failed to wait for cargo test")?;
    println!("\ntests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}

/// `(passed, failed)` from a libtest summary such as
/// `test result: ok. 27 passed; 0 failed; 0 ignored; ...`.
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    // Parts look like "ok. 27 passed", "0 failed": the number is the word before the name.
    let count = |word: &str| -> Option<u64> {
        rest.split(';').find_map(|part| {
            let words: Vec<&str> = part.split_whitespace().collect();
            match words[..] {
                [.., n, w] if w == word => n.parse().ok(),
                _ => None,
            }
        })
    };
    Some((count("passed")?, count("failed")?))
}

fn demo(ws: &Workspace, memprof_args: &[OsString]) -> Result<()> {
    ensure_root("demo", "memprof loads eBPF programs")?;
    setup::setup()?;
    build_memprof(ws)?;

    let source = ws.root.join("demo").join(format!("{DEMO_PROGRAM}.c"));
    let out_dir = ws.target_dir().join("demo");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("failed to create {}", out_dir.display()))?;
    let program = out_dir.join(DEMO_PROGRAM);
    let mut cc = ws.command("cc");
    cc.args(["-O2", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&program)
        .arg(&source);
    run(&mut cc)?;

    let memprof = ws.target_dir().join("release/memprof");
    let mut trace = ws.command(&memprof);
    trace.arg("trace").args(memprof_args);
    // The demo runs 3 s: sample growth often enough for a verdict on its steady leak.
    if !memprof_args.iter().any(|a| a == "--sample-every") {
        trace.args(["--sample-every", "200ms"]);
    }
    trace.arg("--").arg(&program);
    run(&mut trace)
}

#[cfg(test)]
mod tests {
    use super::parse_test_result;

    #[test]
    fn parses_libtest_summary() {
        assert_eq!(
            parse_test_result(
                "test result: ok. 27 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some((27, 0))
        );
        assert_eq!(
            parse_test_result("test result: FAILED. 3 passed; 2 failed; 0 ignored"),
            Some((3, 2))
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
