//! Building the fixtures and finding the tools: where they go, the compilers, the Python
//! interpreter and a headless Chromium.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The fixtures' sources.
pub(crate) const FIXTURE_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
/// The C compilers' flag for frame pointers.
pub(crate) const FP: &str = "-fno-omit-frame-pointer";

/// Panics unless the tests run as root (they load eBPF programs).
pub(crate) fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load eBPF programs and attach uprobes, and need root (euid is {euid}); run \
         them with `sudo -E cargo test`"
    );
}

/// `CARGO_TARGET_TMPDIR/NAME`, created.
pub(crate) fn work_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// A program named by the environment variable `var`, else `default`.
pub(crate) fn tool(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

/// Headless Chromium (the program named by `var`, default `chromium`) with its own profile in
/// `profile` and nothing that reaches out to the network by itself.
pub(crate) fn headless_chromium(var: &str, profile: &Path) -> Command {
    let mut user_dir = OsString::from("--user-data-dir=");
    user_dir.push(profile);
    let mut cmd = Command::new(tool(var, "chromium"));
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
    .arg(user_dir);
    cmd
}

/// `COMPILER -O2 -g -Wall -o OUT SOURCE FLAGS` (flags after the source, so libraries link).
pub(crate) fn compiler(compiler: &str, out: &Path, source: &Path, flags: &[&str]) -> Command {
    let mut cmd = Command::new(compiler);
    cmd.args(["-O2", "-g", "-Wall", "-o"])
        .arg(out)
        .arg(source)
        .args(flags);
    cmd
}

/// Checks what a compiler run gave; panics with its stderr unless it succeeded.
pub(crate) fn check_compiled(what: &str, res: std::io::Result<Output>) {
    let res = res.unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        res.status.success(),
        "compiling a fixture failed ({what}):\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

/// `COMPILER -O2 -g -Wall -o OUT SOURCE FLAGS`, to the end. Compiled under a temporary name and
/// renamed into place, so that another test process using the same fixture at the same time
/// never sees a half-written file.
pub(crate) fn compile_with(compiler_name: &str, out: &Path, source: &Path, flags: &[&str]) {
    let tmp = out.with_extension(format!("{}.tmp", std::process::id()));
    let mut cmd = compiler(compiler_name, &tmp, source, flags);
    check_compiled(&format!("{cmd:?}"), cmd.output());
    fs::rename(&tmp, out)
        .unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), out.display()));
}

/// A C fixture, `tests/fixtures/SOURCE`, built by the C compiler (`CC`, default `cc`) with
/// `FLAGS` into `DIR/NAME`; returns its path.
pub(crate) fn compile_c(dir: &Path, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let src = Path::new(FIXTURE_SRC).join(source);
    compile_with(&tool("CC", "cc"), &out, &src, flags);
    out
}

/// The output of `program -c CODE`, trimmed; panics unless it succeeds.
pub(crate) fn python_query(program: &Path, code: &str) -> String {
    let out = Command::new(program)
        .args(["-c", code])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{code}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The real Python interpreter with ctypes (not a launcher or pyenv shim script that executes
/// it): `MEMPROF_TEST_PYTHON`, else what `python3` on PATH resolves to.
pub(crate) fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MEMPROF_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let exe = PathBuf::from(python_query(
        Path::new("python3"),
        "import sys, ctypes; print(sys.executable)",
    ));
    assert!(
        exe.is_file(),
        "python3 reported sys.executable {exe:?}, which is not a file"
    );
    exe
}
