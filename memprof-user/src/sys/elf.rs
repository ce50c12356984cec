//! Facts about ELF files: identity, whether one is static, its program interpreter, and the ELF
//! a command really runs (`#!` lines followed).

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};

use super::{objfile::ObjectFile, target::resolve_command};

/// (device, inode) of a file.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Opens the ELF file at `path` for bounded reads (see [`ObjectFile`]), with an error that
/// names it.
pub fn open(path: &Path) -> Result<ObjectFile> {
    ObjectFile::open(path).with_context(|| format!("failed to read {}", path.display()))
}

/// Parses `file` (opened from `path`), with a one-line error naming the file: the cap it hit
/// when it hit one, else what is wrong with it.
pub fn parse<'a>(file: &'a ObjectFile, path: &Path) -> Result<object::File<'a, &'a ObjectFile>> {
    object::File::parse(file).map_err(|e| match file.refusal() {
        Some(why) => anyhow!("{why}"),
        None => anyhow!("{} is not an ELF file ({e})", path.display()),
    })
}

/// Whether the ELF file at `path` has no program interpreter (statically linked).
pub fn elf_is_static(path: &Path) -> Result<bool> {
    let file = open(path)?;
    let obj = parse(&file, path)?;
    Ok(interpreter(&obj).is_none())
}

/// The program interpreter (`PT_INTERP`) of an ELF file, if it has one.
pub fn interpreter<'a, R: object::ReadRef<'a>>(obj: &object::File<'a, R>) -> Option<String> {
    use object::{elf, read::elf::ProgramHeader as _};
    match obj {
        object::File::Elf64(elf_file) => {
            let endian = elf_file.endian();
            elf_file.elf_program_headers().iter().find_map(|ph| {
                (ph.p_type(endian) == elf::PT_INTERP)
                    .then(|| ph.data(endian, elf_file.data()).ok())
                    .flatten()
                    .filter(|d| d.len() <= 4096)
                    .map(|d| {
                        String::from_utf8_lossy(d)
                            .trim_end_matches('\0')
                            .to_string()
                    })
            })
        }
        _ => None,
    }
}

/// The ELF the kernel will really run for `path`: follows `#!` lines (one level, and
/// `/usr/bin/env NAME`).
pub fn executed_elf(path: &Path) -> Result<PathBuf> {
    // The kernel reads at most 256 bytes of a `#!` line.
    let file = open(path)?;
    let head = file.head(256).unwrap_or_default();
    if !head.starts_with(b"#!") {
        return Ok(path.to_path_buf());
    }
    let line = head[2..].split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let interp = words
        .next()
        .ok_or_else(|| anyhow!("{} has an empty #! line", path.display()))?;
    if Path::new(interp).file_name().is_some_and(|n| n == "env")
        && let Some(name) = words.find(|w| !w.starts_with('-'))
    {
        return resolve_command(name);
    }
    Ok(PathBuf::from(interp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_executable_is_dynamic() {
        let exe = std::env::current_exe().unwrap();
        assert!(!elf_is_static(&exe).unwrap());
    }
}
