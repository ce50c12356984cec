//! The program a command really ends up running, for messages and for finding functions in it:
//! symbolic links followed, version-manager shims asked (pyenv's `shims/python3` is a shell
//! script that runs `pyenv exec`), shell wrappers that `exec` an absolute path read, and `#!`
//! scripts taken to their interpreter.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use super::elf;

/// Wrappers followed at most.
const MAX_DEPTH: usize = 8;

/// The ELF executable `command` (a path found on `PATH`) runs in the end, as far as can be told
/// without running it; `command` itself when it is not a script.
pub fn real_program(command: &Path) -> PathBuf {
    let mut path = command.to_path_buf();
    for _ in 0..MAX_DEPTH {
        match next_program(&path) {
            Some(next) if next != path => path = next,
            _ => break,
        }
    }
    fs::canonicalize(&path).unwrap_or(path)
}

/// What `path` runs next: its target if it is a link, the program of a shim or wrapper script,
/// the interpreter of another script; None for an ELF file or anything unreadable.
fn next_program(path: &Path) -> Option<PathBuf> {
    let head = head(path)?;
    if !head.starts_with("#!") {
        let real = fs::canonicalize(path).ok()?;
        return (real != path).then_some(real);
    }
    if let Some(root) = pyenv_root(&head) {
        // The shim's own name is the program (`python3`, `python3.12`).
        let program = path.file_name()?.to_str()?;
        return pyenv_which(&root, program);
    }
    if is_shell(&head)
        && let Some(target) = exec_target(&head)
    {
        return Some(target);
    }
    elf::executed_elf(path).ok()
}

/// The first 4 KiB of a regular file.
fn head(path: &Path) -> Option<String> {
    let file = fs::File::open(path).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(4096).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// A pyenv shim's `PYENV_ROOT`: the script sets it and runs `"$PYENV_ROOT/libexec/pyenv" exec`.
fn pyenv_root(script: &str) -> Option<String> {
    if !script.contains("libexec/pyenv\" exec") {
        return None;
    }
    script.lines().find_map(|l| {
        l.trim()
            .strip_prefix("export PYENV_ROOT=")
            .map(|v| v.trim_matches('"').to_string())
    })
}

/// `pyenv which PROGRAM`, as the shim would resolve it here (same environment and working
/// directory, so `PYENV_VERSION` and `.python-version` files count).
fn pyenv_which(root: &str, program: &str) -> Option<PathBuf> {
    let out = Command::new(Path::new(root).join("libexec/pyenv"))
        .args(["which", program])
        .env("PYENV_ROOT", root)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let found = String::from_utf8(out.stdout).ok()?;
    let found = found.trim();
    (out.status.success() && found.starts_with('/')).then(|| PathBuf::from(found))
}

/// Whether a script runs under a POSIX shell (`#!/bin/sh`, `#!/usr/bin/env bash`...).
fn is_shell(script: &str) -> bool {
    let line = script.lines().next().unwrap_or_default();
    line.split(|c: char| c.is_whitespace() || c == '/')
        .any(|w| matches!(w, "sh" | "bash" | "dash" | "zsh" | "ksh"))
}

/// The absolute program of a wrapper's last `exec` line (`exec /opt/py/bin/python3 "$@"`).
fn exec_target(script: &str) -> Option<PathBuf> {
    script.lines().rev().find_map(|l| {
        let program = l.trim().strip_prefix("exec ")?.split_whitespace().next()?;
        let program = program.trim_matches(|c| c == '"' || c == '\'');
        program
            .starts_with('/')
            .then(|| PathBuf::from(program))
            .filter(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// A scratch directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let d =
                std::env::temp_dir().join(format!("memprof-shims-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            Self(d)
        }

        fn script(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            fs::write(&p, text).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
            p
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn links_wrappers_and_interpreters_lead_to_the_elf() {
        let d = Dir::new("wrap");
        let sh = fs::canonicalize("/bin/sh").unwrap();
        let env = fs::canonicalize("/usr/bin/env").unwrap();
        let wrapper = d.script(
            "tool",
            "#!/bin/sh\n# a wrapper\nexport X=1\nexec /usr/bin/env \"$@\"\n",
        );
        assert_eq!(real_program(&wrapper), env, "the exec'd program");
        let script = d.script("run.sh", "#!/bin/sh\necho hi\n");
        assert_eq!(real_program(&script), sh, "a script: its interpreter");
        let link = d.0.join("link");
        std::os::unix::fs::symlink(&wrapper, &link).unwrap();
        assert_eq!(real_program(&link), env, "through a link");
        assert_eq!(real_program(&env), env, "an ELF is itself");
        let missing = d.0.join("missing");
        assert_eq!(real_program(&missing), missing);
    }

    #[test]
    fn pyenv_shims_are_asked_which_python_they_run() {
        let shim = "#!/usr/bin/env bash\nset -e\nprogram=\"${0##*/}\"\n\
                    export PYENV_ROOT=\"/root/.pyenv\"\n\
                    exec \"/root/.pyenv/libexec/pyenv\" exec \"$program\" \"$@\"\n";
        assert_eq!(pyenv_root(shim).as_deref(), Some("/root/.pyenv"));
        assert_eq!(
            pyenv_root("#!/bin/sh\nexec /usr/bin/python3 \"$@\"\n"),
            None
        );
        // The machine's own shim, when pyenv is installed.
        let real = Path::new("/root/.pyenv/shims/python3");
        if real.exists() {
            let got = real_program(real);
            let name = got.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                got.starts_with("/root/.pyenv/versions") && name.starts_with("python3"),
                "{got:?}"
            );
        }
    }
}
