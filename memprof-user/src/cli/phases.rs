//! `memprof trace`'s smaller decisions: the `--phase` specs, whether a program is a Python
//! interpreter, and a spawned command's exit code.

use anyhow::{Result, anyhow, bail};

use super::args::split_spec;
use crate::analysis::pyphases::PyPattern;

/// The `--phase NAME=FUNCTION` specs split into native functions and Python ones
/// (`NAME=py:QUALNAME`), each checked.
pub(super) fn phase_specs(specs: &[String]) -> Result<PhaseSpecs> {
    // Phases are counted per call site in a 64-bit set.
    const MAX_PHASES: usize = 64;
    if specs.len() > MAX_PHASES {
        bail!(
            "at most {MAX_PHASES} --phase options are supported ({} given)",
            specs.len()
        );
    }
    let mut native = Vec::new();
    let mut python = Vec::new();
    for spec in specs {
        let (name, function) = split_spec(spec, "--phase")?;
        match function.strip_prefix("py:") {
            Some(qualname) => {
                let pattern = PyPattern::parse(qualname)
                    .map_err(|e| anyhow!("invalid --phase {spec:?}: {e}"))?;
                python.push((name, pattern));
            }
            None => native.push((name, function)),
        }
    }
    Ok((native, python))
}

/// Native phases (name, function) and Python ones (name, function).
pub(super) type PhaseSpecs = (Vec<(String, String)>, Vec<(String, PyPattern)>);

/// Whether `path` is a CPython interpreter (`python3.12`) or its library (`libpython3.12.so`).
pub(super) fn is_python_program(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("python") || name.starts_with("libpython")
}

/// Shell-style exit code of a wait status: the exit status, or 128 + the killing signal.
pub(super) fn exit_code(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(7 << 8), 7);
        assert_eq!(exit_code(9), 137);
    }
}
