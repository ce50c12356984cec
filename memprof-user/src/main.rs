//! The `memprof` binary: runs the command line and turns errors into one line and an exit code.

use std::{io, process::ExitCode};

/// memprof's own memory comes from an allocator linked into it, not from the C library: with
/// `--all` or followed children the C library's malloc carries memprof's probes in every
/// process, memprof included, and each of its own allocations would pay a probe's trap.
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() -> ExitCode {
    match memprof::cli::run() {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(err) => {
            // A closed pipe (`memprof ... | head`) is not an error.
            if err
                .chain()
                .filter_map(|e| e.downcast_ref::<io::Error>())
                .any(|e| e.kind() == io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            // One line, whatever a file or process named in the error holds.
            let text = format!("{err:#}");
            eprintln!("memprof: {}", memprof::sys::printable::escape(&text));
            ExitCode::FAILURE
        }
    }
}
