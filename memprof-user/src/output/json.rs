//! JSON: NDJSON records on stdout (`--json`: start, snapshots, alerts, the report; `memprof
//! diff --json`) and the final report saved for `memprof diff` (`--output`).

use std::{
    io::{self, Write as _},
    path::Path,
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::report::Report;

/// Writes one NDJSON line to stdout.
pub fn write_line<T: Serialize>(value: &T) -> io::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Saves `report` as one JSON line to `path` (`--output`), with permissions `mode` (see
/// [`super::file::write`]).
pub fn save_report(path: &Path, report: &Report, mode: u32) -> Result<()> {
    let mut bytes = serde_json::to_vec(report)?;
    bytes.push(b'\n');
    super::file::write(path, &bytes, mode)
        .with_context(|| format!("failed to write {}", path.display()))
}
