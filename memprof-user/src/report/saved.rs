//! Reports saved by `memprof trace --output` or `--json`, loaded again (`memprof diff`).

use std::{fs, io::Read as _, os::unix::fs::OpenOptionsExt as _, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

/// The largest saved report read: 1 GiB.
pub const MAX_SAVED_BYTES: u64 = 1 << 30;

/// Loads a saved report: a file holding one `report` JSON object, a whole NDJSON stream (its
/// last `report` line is taken, or without one its last `snapshot` line), or one `snapshot`.
///
/// Errors name the file: `FILE: not JSON: ...`, `FILE: no memprof report found ...`,
/// `FILE: not a regular file ...`, `FILE: larger than ...`.
pub fn load_report(path: &Path) -> Result<Value> {
    load_report_capped(path, MAX_SAVED_BYTES)
}

/// [`load_report`] with a size cap of `max` bytes.
pub fn load_report_capped(path: &Path, max: u64) -> Result<Value> {
    let name = path.display();
    let bytes = read_regular(path, max)?;
    let mut last_report = None;
    let mut last_snapshot = None;
    // A stream of JSON values: one object, NDJSON, or pretty-printed objects one after another.
    for value in serde_json::Deserializer::from_slice(&bytes).into_iter::<Value>() {
        let value = value.map_err(|e| anyhow!("{name}: not JSON: {e}"))?;
        match value.get("type").and_then(Value::as_str) {
            Some("report") => last_report = Some(value),
            Some("snapshot") => last_snapshot = Some(value),
            _ => {}
        }
    }
    last_report.or(last_snapshot).ok_or_else(|| {
        anyhow!(
            "{name}: no memprof report found (expected a JSON object with \"type\":\"report\" \
             or \"snapshot\", as `memprof trace --json` writes)"
        )
    })
}

/// The bytes of `path`, a regular file of at most `max` bytes: a device (`/dev/zero`), a FIFO
/// (opened without blocking) or an overlong file is refused with a one-line error.
fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>> {
    let name = path.display();
    let file = fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("{name}: cannot read"))?;
    let meta = file
        .metadata()
        .with_context(|| format!("{name}: cannot read"))?;
    if !meta.is_file() {
        bail!(
            "{name}: not a regular file (a saved report is a file that `memprof trace --output` or `--json` wrote)"
        );
    }
    if meta.len() > max {
        bail!(
            "{name}: larger than {max} bytes ({} bytes): not a saved report",
            meta.len()
        );
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow while read: never past the cap.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("{name}: cannot read"))?;
    if bytes.len() as u64 > max {
        bail!("{name}: larger than {max} bytes: not a saved report");
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::analysis::diff::tests::report;

    /// A file in the temp directory, removed on drop.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> Self {
            let path = std::env::temp_dir()
                .join(format!("memprof-diff-test-{}-{name}", std::process::id()));
            fs::write(&path, contents).expect("temp dir is writable");
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }

    #[test]
    fn load_report_takes_last_report_of_ndjson() {
        let start = json!({"type": "start", "pid": 42, "probes": ["malloc"], "missing": []});
        let snap = report("snapshot", 111, 0, vec![]);
        let rep = report("report", 222, 0, vec![]);
        let text = format!("{start}\n{snap}\n{rep}\n{snap}\n");
        let f = TempFile::new("ndjson", text.as_bytes());
        let v = load_report(&f.0).expect("stream has a report");
        assert_eq!(v["type"], "report");
        assert_eq!(v["totals"]["outstanding_bytes"], 222);
    }

    #[test]
    fn load_report_accepts_single_report_or_snapshot() {
        let f = TempFile::new(
            "single",
            serde_json::to_string_pretty(&report("report", 5, 0, vec![]))
                .unwrap()
                .as_bytes(),
        );
        assert_eq!(
            load_report(&f.0).unwrap()["totals"]["outstanding_bytes"],
            5,
            "a pretty-printed report"
        );
        let snaps = format!(
            "{}\n{}\n",
            report("snapshot", 6, 0, vec![]),
            report("snapshot", 7, 0, vec![])
        );
        let f = TempFile::new("snapshots", snaps.as_bytes());
        assert_eq!(
            load_report(&f.0).unwrap()["totals"]["outstanding_bytes"],
            7,
            "without a report, the last snapshot"
        );
    }

    #[test]
    fn load_report_errors_name_the_file() {
        let f = TempFile::new("not-json", b"memprof report: pid 42, 3.00 s\n");
        let err = format!("{:#}", load_report(&f.0).unwrap_err());
        let name = f.0.display().to_string();
        assert!(
            err.starts_with(&format!("{name}: not JSON: ")),
            "text report instead of JSON: {err}"
        );

        let f = TempFile::new("no-report", b"{\"type\":\"start\",\"pid\":42}\n[1,2]\n");
        let err = format!("{:#}", load_report(&f.0).unwrap_err());
        assert!(
            err.starts_with(&format!(
                "{name}: no memprof report found",
                name = f.0.display()
            )),
            "{err}"
        );

        let f = TempFile::new("empty", b"");
        let err = format!("{:#}", load_report(&f.0).unwrap_err());
        assert!(err.contains("no memprof report found"), "{err}");

        for dev in ["/dev/zero", "/dev/null", "/proc/self"] {
            let err = format!("{:#}", load_report(Path::new(dev)).unwrap_err());
            assert_eq!(
                err,
                format!(
                    "{dev}: not a regular file (a saved report is a file that `memprof trace --output` or `--json` wrote)"
                )
            );
        }
        let fifo = std::env::temp_dir().join(format!("memprof-diff-fifo-{}", std::process::id()));
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = format!("{:#}", load_report(&fifo).unwrap_err());
        assert!(err.ends_with(": not a regular file (a saved report is a file that `memprof trace --output` or `--json` wrote)"), "{err}");
        fs::remove_file(&fifo).unwrap();
        let f = TempFile::new("big", &[b' '; 100]);
        let err = format!("{:#}", load_report_capped(&f.0, 99).unwrap_err());
        assert!(
            err.ends_with(": larger than 99 bytes (100 bytes): not a saved report"),
            "{err}"
        );

        let missing = std::env::temp_dir().join("memprof-diff-test-does-not-exist");
        let err = format!("{:#}", load_report(&missing).unwrap_err());
        assert!(
            err.starts_with(&format!("{}: cannot read: ", missing.display())),
            "{err}"
        );
    }
}
