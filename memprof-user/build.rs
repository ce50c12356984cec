//! Builds the kernel programs (`memprof-ebpf`) with the pinned nightly and bpf-linker, and leaves
//! the object in OUT_DIR for `include_bytes_aligned!`. With `AYA_BUILD_SKIP=1` (quick checks,
//! clippy) an empty placeholder is written instead and the binary refuses to trace.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Keep in step with xtask's setup and ../shared/toolchain.md.
const EBPF_TOOLCHAIN: &str = "nightly-2026-06-25";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let object = out_dir.join("memprof");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        if !object.exists() {
            fs::write(&object, b"").context("failed to write the placeholder object")?;
        }
        return Ok(());
    }
    let root = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| anyhow!("no CARGO_MANIFEST_DIR"))?,
    )
    .join("../memprof-ebpf");
    println!("cargo:rerun-if-changed=../memprof-common/src");
    aya_build::build_ebpf(
        [Package {
            name: "memprof-ebpf",
            root_dir: root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?,
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
