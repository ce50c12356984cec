//! The `memprof` binary: runs the command line and turns errors into one line and an exit code.

use std::{io, process::ExitCode};

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
            eprintln!("memprof: {err:#}");
            ExitCode::FAILURE
        }
    }
}
