//! The kernel programs' diagnostics (aya-log), off unless `--kernel-log` names a level. The
//! level is a global the loader sets: with logs off, the verifier drops the logging code, so
//! it costs nothing.

use std::io::Write as _;

/// The log levels, as the kernel side numbers them (0: off).
pub const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The number of level `name` (an entry of [`LEVELS`]).
pub fn level(name: &str) -> Option<u8> {
    LEVELS.iter().position(|l| *l == name).map(|i| i as u8)
}

/// Writes the kernel programs' log records to stderr, one line each.
#[derive(Clone, Copy, Debug)]
pub struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let _ = writeln!(
            std::io::stderr().lock(),
            "memprof: kernel {}: {}",
            record.level().as_str().to_ascii_lowercase(),
            record.args()
        );
    }

    fn flush(&self) {}
}
