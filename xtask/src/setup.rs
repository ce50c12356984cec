//! `cargo xtask setup`: idempotent installation of what building and testing memprof need on a
//! Debian 12 machine. Every step checks first and installs only what is missing, so a second
//! run only reads package and toolchain state.

use std::{fs, process::Stdio};

use anyhow::{Context as _, Result, bail};

use crate::util::{Workspace, cargo_program, ensure_root, find_program, output_of, run};

/// The nightly that builds the eBPF crate; keep in step with `memprof-user/build.rs`. Newer
/// nightlies may move to an LLVM that Debian 12 does not ship for bpf-linker.
pub const NIGHTLY: &str = "nightly-2026-06-25";

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian's LLVM 22 (from bookworm-security); `/usr/bin/llvm-config` is LLVM 14.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Debian packages: LLVM 22 and its link dependencies for bpf-linker, then what the tests and
/// the demo use (jq, a C compiler and headers, setpriv from util-linux), then the real
/// consumers the output tests feed (`go tool pprof`, Prometheus and promtool, headless
/// Chromium, valgrind's DHAT), the allocators the allocator tests link against (jemalloc,
/// tcmalloc, mimalloc, musl), the distribution's own programs the stack tests trace as they
/// ship, without frame pointers (sqlite3, python3), the bench's real workload and reference
/// tracer (redis-server under redis-benchmark from redis-tools, heaptrack), and what the
/// naming tests make debug files and MiniDebugInfo with (binutils' objcopy, strip and nm; xz).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "libxml2-dev",
    "jq",
    "libc6-dev",
    "gcc",
    "util-linux",
    "golang-go",
    "prometheus",
    "chromium",
    "valgrind",
    "libjemalloc-dev",
    "libgoogle-perftools-dev",
    "libmimalloc-dev",
    "musl-tools",
    "sqlite3",
    "python3",
    "redis-server",
    "redis-tools",
    "heaptrack",
    "binutils",
    "xz-utils",
];

const TRACEFS: &str = "/sys/kernel/tracing";

pub fn setup() -> Result<()> {
    ensure_root("setup", "it installs packages")?;
    let ws = Workspace::locate();
    apt_packages(&ws)?;
    nightly(&ws)?;
    bpf_linker(&ws)?;
    tracefs(&ws);
    Ok(())
}

fn apt_packages(ws: &Workspace) -> Result<()> {
    let mut wanted: Vec<&str> = APT_PACKAGES.to_vec();
    // The machine's python3 normally comes from pyenv (with its headers, which the Python
    // frame tests build an extension module against); fall back to Debian's headers.
    let python = output_of(ws.command("python3").arg("--version"));
    if python.is_none() {
        wanted.push("python3-dev");
    }

    let missing = missing_packages(ws, &wanted)?;
    if missing.is_empty() {
        eprintln!("ok: apt packages ({})", wanted.join(" "));
        if let Some(version) = python {
            eprintln!("ok: {}", version.trim());
        }
        return Ok(());
    }

    eprintln!("installing apt packages: {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut cmd = ws.command("apt-get");
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        cmd
    };
    run(&mut apt(&["update", "-q"]))?;
    run(apt(&["install", "-y", "-q", "--no-upgrade"]).args(&missing))?;
    let still = missing_packages(ws, &wanted)?;
    if !still.is_empty() {
        bail!("apt-get left packages uninstalled: {}", still.join(" "));
    }
    if python.is_none() {
        output_of(ws.command("python3").arg("--version"))
            .context("python3 still not runnable after installing Debian's python3")?;
    }
    Ok(())
}

/// The subset of `packages` that dpkg does not report as installed.
fn missing_packages<'a>(ws: &Workspace, packages: &[&'a str]) -> Result<Vec<&'a str>> {
    // dpkg-query exits 1 when a package is unknown to dpkg but still prints the known ones.
    let out = ws
        .command("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(packages)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("failed to run dpkg-query: setup supports Debian 12 only")?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let installed = installed_packages(&listing);
    Ok(packages
        .iter()
        .copied()
        .filter(|package| !installed.contains(package))
        .collect())
}

/// Packages in `dpkg-query -W -f='${Package} ${Status}\n'` output that are fully installed
/// (not, say, removed with their configuration files kept).
fn installed_packages(listing: &str) -> Vec<&str> {
    listing
        .lines()
        .filter_map(|line| line.strip_suffix(" install ok installed"))
        .collect()
}

/// The pinned nightly with rust-src (`-Z build-std=core` compiles core from it).
fn nightly(ws: &Workspace) -> Result<()> {
    if find_program("rustup").is_none() {
        bail!(
            "rustup not found on PATH or in ~/.cargo/bin: install rustup with a stable toolchain first"
        );
    }
    let toolchains = output_of(ws.command("rustup").args(["toolchain", "list"]))
        .context("`rustup toolchain list` failed")?;
    if lists_toolchain(&toolchains, NIGHTLY) {
        let components = output_of(ws.command("rustup").args([
            "component",
            "list",
            "--toolchain",
            NIGHTLY,
            "--installed",
        ]))
        .unwrap_or_default();
        if lists_component(&components, "rust-src") {
            eprintln!("ok: rust toolchain {NIGHTLY} with rust-src");
            return Ok(());
        }
        eprintln!("installing rust-src for {NIGHTLY}");
        let mut cmd = ws.command("rustup");
        cmd.args(["component", "add", "rust-src", "--toolchain", NIGHTLY])
            .stdin(Stdio::null());
        return run(&mut cmd)
            .context("failed to add rust-src; is the Rust distribution server reachable?");
    }

    eprintln!("installing rust toolchain {NIGHTLY} with rust-src");
    let mut cmd = ws.command("rustup");
    // --no-self-update: otherwise rustup may replace itself with an older release.
    cmd.args(["toolchain", "install", NIGHTLY])
        .args([
            "--profile",
            "minimal",
            "--component",
            "rust-src",
            "--no-self-update",
        ])
        .stdin(Stdio::null());
    run(&mut cmd).with_context(|| {
        format!("failed to install {NIGHTLY}; is the Rust distribution server reachable?")
    })
}

/// Whether `rustup toolchain list` output has `name`, listed with its host triple
/// (`nightly-2026-06-25-x86_64-unknown-linux-gnu (active)`) or without.
fn lists_toolchain(list: &str, name: &str) -> bool {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .any(|toolchain| {
            toolchain == name
                || toolchain
                    .strip_prefix(name)
                    .is_some_and(|host| host.starts_with('-') && host.matches('-').count() >= 3)
        })
}

/// Whether `rustup component list --installed` output has `component` for any target
/// (`rust-src` is listed without one).
fn lists_component(list: &str, component: &str) -> bool {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .any(|name| {
            name == component
                || name
                    .strip_prefix(component)
                    .is_some_and(|target| target.starts_with('-'))
        })
}

/// bpf-linker at the pinned version, linked against Debian's libLLVM 22.
fn bpf_linker(ws: &Workspace) -> Result<()> {
    let existing = find_program("bpf-linker");
    if let Some(path) = &existing {
        match check_bpf_linker(ws, path) {
            Ok(llvm) => {
                eprintln!("ok: bpf-linker {BPF_LINKER_VERSION} ({llvm})");
                return Ok(());
            }
            Err(why) => eprintln!("installing bpf-linker {BPF_LINKER_VERSION}: {why}"),
        }
    } else {
        eprintln!("installing bpf-linker {BPF_LINKER_VERSION} (takes a few minutes)");
    }

    let mut cmd = ws.command(cargo_program());
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
    ])
    .args(["--no-default-features", "--features", "llvm-22"])
    // Without it llvm-sys finds /usr/bin/llvm-config (LLVM 14) and fails to link -lLLVM.
    .env("LLVM_PREFIX", LLVM_PREFIX)
    // Outside the workspace, so that its .cargo/config.toml does not apply.
    .current_dir(std::env::temp_dir())
    .stdin(Stdio::null());
    if existing.is_some() {
        cmd.arg("--force");
    }
    run(&mut cmd)?;

    let path = find_program("bpf-linker").context("bpf-linker not on PATH after cargo install")?;
    let llvm = check_bpf_linker(ws, &path)
        .map_err(anyhow::Error::msg)
        .context("the bpf-linker just installed does not work")?;
    eprintln!("ok: bpf-linker {BPF_LINKER_VERSION} ({llvm})");
    Ok(())
}

/// Checks the version and that libLLVM resolves; returns the libLLVM it links.
fn check_bpf_linker(ws: &Workspace, path: &std::path::Path) -> Result<String, String> {
    let version = output_of(ws.command(path).arg("--version"))
        .ok_or_else(|| format!("`{} --version` failed", path.display()))?;
    let version = version.trim();
    if version != format!("bpf-linker {BPF_LINKER_VERSION}") {
        return Err(format!("found `{version}`"));
    }
    let libs = output_of(ws.command("ldd").arg(path))
        .ok_or_else(|| format!("`ldd {}` failed", path.display()))?;
    linked_llvm(&libs)
}

/// From `ldd` output: the libLLVM the binary links, or why it is unusable.
fn linked_llvm(ldd: &str) -> Result<String, String> {
    if let Some(line) = ldd.lines().find(|line| line.contains("not found")) {
        return Err(format!("a library is missing: {}", line.trim()));
    }
    ldd.lines()
        .filter_map(|line| line.split_whitespace().next())
        .find(|lib| lib.starts_with("libLLVM"))
        .map(str::to_owned)
        .ok_or_else(|| "it does not link libLLVM".to_owned())
}

/// Best effort: the syscall tracepoints (mmap tracking) are found through tracefs.
fn tracefs(ws: &Workspace) {
    if is_tracefs_mounted() {
        eprintln!("ok: tracefs at {TRACEFS}");
        return;
    }
    eprintln!("mounting tracefs at {TRACEFS}");
    let mut cmd = ws.command("mount");
    cmd.args(["-t", "tracefs", "tracefs", TRACEFS]);
    match run(&mut cmd) {
        Ok(()) if is_tracefs_mounted() => eprintln!("ok: tracefs at {TRACEFS}"),
        Ok(()) => eprintln!("warning: tracefs still not visible at {TRACEFS}"),
        Err(err) => eprintln!(
            "warning: could not mount tracefs at {TRACEFS}: {err:#}; mmap tracking may be unavailable"
        ),
    }
}

fn is_tracefs_mounted() -> bool {
    fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| mounts_tracefs(&mounts))
}

/// Whether a `/proc/self/mounts` listing has tracefs mounted at [`TRACEFS`].
fn mounts_tracefs(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, mount_point, fs_type) = (fields.next(), fields.next(), fields.next());
        mount_point == Some(TRACEFS) && fs_type == Some("tracefs")
    })
}

/// The checks that decide whether a step is skipped, on output captured from real machines,
/// with the tool present and absent.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status() {
        // `dpkg-query -W -f='${Package} ${Status}\n' jq hello libc6-dev nonexistent-pkg`:
        // unknown packages only print to stderr.
        let listing = "jq install ok installed\nlibc6-dev install ok installed\n\
                       zlib1g-dev deinstall ok config-files\n";
        assert_eq!(installed_packages(listing), ["jq", "libc6-dev"]);
        assert_eq!(installed_packages(""), Vec::<&str>::new());
    }

    #[test]
    fn rustup_toolchains() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n\
                    nightly-2026-06-25-x86_64-unknown-linux-gnu\n\
                    1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(lists_toolchain(list, NIGHTLY));
        assert!(lists_toolchain(
            "nightly-2026-06-25-x86_64-unknown-linux-gnu (active)\n",
            NIGHTLY
        ));
        let without = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                       nightly-x86_64-unknown-linux-gnu\n\
                       nightly-2026-05-19-x86_64-unknown-linux-gnu\n";
        assert!(!lists_toolchain(without, NIGHTLY));
        assert!(!lists_toolchain("no installed toolchains\n", NIGHTLY));
    }

    #[test]
    fn rustup_components() {
        let with = "cargo-x86_64-unknown-linux-gnu\nrust-src\nrust-std-x86_64-unknown-linux-gnu\n\
                    rustc-x86_64-unknown-linux-gnu\n";
        assert!(lists_component(with, "rust-src"));
        let without = "cargo-x86_64-unknown-linux-gnu\nrust-std-x86_64-unknown-linux-gnu\n\
                       rustc-x86_64-unknown-linux-gnu\n";
        assert!(!lists_component(without, "rust-src"));
    }

    #[test]
    fn bpf_linker_libraries() {
        let good = "\tlinux-vdso.so.1 (0x00007ffd6b1f2000)\n\
                    \tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007fe1af000000)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fe1aee1f000)\n";
        assert_eq!(linked_llvm(good).as_deref(), Ok("libLLVM.so.22.1"));
        let removed = "\tlibLLVM.so.22.1 => not found\n\
                       \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fe1aee1f000)\n";
        assert!(linked_llvm(removed).unwrap_err().contains("missing"));
        let static_llvm = "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fe1aee1f000)\n";
        assert!(linked_llvm(static_llvm).is_err());
    }

    #[test]
    fn tracefs_mount() {
        let mounted = "sysfs /sys sysfs rw,relatime 0 0\n\
                       tracefs /sys/kernel/tracing tracefs rw,relatime 0 0\n";
        assert!(mounts_tracefs(mounted));
        let debug_only = "sysfs /sys sysfs rw,relatime 0 0\n\
                          tracefs /sys/kernel/debug/tracing tracefs rw,relatime 0 0\n";
        assert!(!mounts_tracefs(debug_only));
    }
}
