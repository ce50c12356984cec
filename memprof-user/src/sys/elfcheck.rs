//! A look at an ELF object before any library parses it whole: its section headers against the
//! file, and every compressed section's claimed size against caps (absolute, and as a ratio of
//! its compressed bytes), with the zlib stream inflated into nothing to check that it holds
//! what it claims and no more. A symbolizer that trusts a compressed section header allocates
//! what it claims (64 GiB: abort; 2^64-1: panic) and inflates whatever it holds (a 2 MB zlib
//! bomb: 2 GiB); this check is what stands in front of it.
//!
//! [`check_object`] answers [`Fit::Whole`] (safe to hand over), [`Fit::SymbolsOnly`] (the
//! symbol tables are sound, the debug sections are not: symbolize without DWARF) or a
//! [`Refusal`] (do not hand the object over at all).

use std::{
    fmt,
    fs::File,
    io::{self, Read},
    os::unix::fs::FileExt as _,
    path::Path,
};

use super::objfile::ObjectFile;

/// The most one compressed section may inflate to.
pub const MAX_INFLATED_SECTION: u64 = 512 << 20;
/// The most all of an object's compressed sections may inflate to.
pub const MAX_INFLATED_TOTAL: u64 = 1 << 30;
/// The most a section may inflate to, per compressed byte (zlib can reach about 1032).
pub const MAX_RATIO: u64 = 256;
/// The most section headers an object may have.
const MAX_SECTIONS: u64 = 1 << 18;
/// DWARF units walked in `.debug_info` at most.
const MAX_UNITS: u32 = 1 << 20;

const SHT_SYMTAB: u32 = 2;
const SHT_STRTAB: u32 = 3;
const SHT_NOBITS: u32 = 8;
const SHT_DYNSYM: u32 = 11;
const SHF_COMPRESSED: u64 = 0x800;
const ELFCOMPRESS_ZLIB: u32 = 1;
const CHDR_SIZE: u64 = 24;
const SHDR_SIZE: u64 = 64;

/// Why an object must not be handed to a parser.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

impl std::error::Error for Refusal {}

/// What may be read of an object that was not refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fit {
    /// Every section checked out.
    Whole,
    /// The symbol tables are sound; the debug sections are not (`why`): name frames from the
    /// symbol tables only.
    SymbolsOnly { why: String },
}

/// One section header, as far as the check needs it.
#[derive(Clone, Copy, Debug)]
struct Section {
    name: u32,
    kind: u32,
    flags: u64,
    offset: u64,
    size: u64,
}

/// Checks the object at `path`; see the module's documentation.
pub fn check_object(path: &Path) -> Result<Fit, Refusal> {
    let refuse = |reason: String| Refusal {
        path: path.display().to_string(),
        reason,
    };
    let file = ObjectFile::open(path).map_err(|e| refuse(format!("cannot open: {e}")))?;
    check(&file).map_err(refuse)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// The check on an open object; the error is the reason for a refusal.
pub fn check(file: &ObjectFile) -> Result<Fit, String> {
    let len = file.len();
    let head = file.head(64).ok_or("shorter than an ELF header")?;
    if head.len() < 64 || &head[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if head[4] != 2 || head[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let shoff = u64_at(head, 0x28);
    let shentsize = u64::from(u16_at(head, 0x3a));
    let mut shnum = u64::from(u16_at(head, 0x3c));
    let mut shstrndx = u64::from(u16_at(head, 0x3e));
    if shoff == 0 {
        // No section headers: nothing a symbolizer could be misled by.
        return Ok(Fit::Whole);
    }
    if shentsize != SHDR_SIZE {
        return Err(format!(
            "section headers of {shentsize} bytes (expected 64)"
        ));
    }
    let header = |i: u64| -> Result<Section, String> {
        let at = i
            .checked_mul(SHDR_SIZE)
            .and_then(|o| o.checked_add(shoff))
            .ok_or("section header table beyond any file")?;
        let b = file
            .bytes(at, SHDR_SIZE)
            .ok_or_else(|| format!("section header {i} lies past the end of the file"))?;
        Ok(Section {
            name: u32_at(b, 0),
            kind: u32_at(b, 4),
            flags: u64_at(b, 8),
            offset: u64_at(b, 0x18),
            size: u64_at(b, 0x20),
        })
    };
    // Extended numbering: the real counts live in section 0.
    if shnum == 0 || shstrndx == 0xffff {
        let zero = header(0)?;
        if shnum == 0 {
            shnum = zero.size;
        }
        if shstrndx == 0xffff {
            let b = file
                .bytes(shoff + 0x28, 4)
                .ok_or("section header 0 is cut")?;
            shstrndx = u64::from(u32_at(b, 0));
        }
    }
    if shnum > MAX_SECTIONS {
        return Err(format!("{shnum} section headers (at most {MAX_SECTIONS})"));
    }
    if shoff
        .checked_add(shnum * SHDR_SIZE)
        .is_none_or(|end| end > len)
    {
        return Err(format!(
            "its {shnum} section headers at offset {shoff} lie past the end of the file ({len} bytes)"
        ));
    }
    let sections = (0..shnum).map(header).collect::<Result<Vec<_>, _>>()?;
    let names = sections
        .get(shstrndx as usize)
        .filter(|s| s.kind != SHT_NOBITS && fits(s, len));
    let name_of = |s: &Section| -> String {
        let Some(table) = names else {
            return String::new();
        };
        let Some(at) = table.offset.checked_add(u64::from(s.name)) else {
            return String::new();
        };
        let end = table.offset + table.size;
        if u64::from(s.name) >= table.size {
            return String::new();
        }
        let want = (end - at).min(256);
        let bytes = file.bytes(at, want).unwrap_or_default();
        let n = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..n]).into_owned()
    };

    let mut debug_problem: Option<String> = None;
    let mut inflated_total: u64 = 0;
    for (i, s) in sections.iter().enumerate() {
        if s.kind == SHT_NOBITS || s.size == 0 {
            continue;
        }
        let name = name_of(s);
        let debug = name.starts_with(".debug_") || name.starts_with(".zdebug_");
        let symbols = matches!(s.kind, SHT_SYMTAB | SHT_DYNSYM | SHT_STRTAB);
        let problem = if !fits(s, len) {
            Some(format!(
                "section {i} ({name}) of {} bytes at offset {} lies past the end of the file",
                s.size, s.offset
            ))
        } else if s.flags & SHF_COMPRESSED != 0 || name.starts_with(".zdebug_") {
            match compressed(file, s, &name, &mut inflated_total) {
                Ok(()) => None,
                Err(why) => Some(format!("section {i} ({name}): {why}")),
            }
        } else if name == ".debug_info" {
            dwarf_units(file, s)
                .err()
                .map(|why| format!("section {i} ({name}): {why}"))
        } else {
            None
        };
        match problem {
            Some(p) if debug && !symbols => {
                debug_problem.get_or_insert(p);
            }
            Some(p) => return Err(p),
            None => {}
        }
    }
    Ok(match debug_problem {
        Some(why) => Fit::SymbolsOnly { why },
        None => Fit::Whole,
    })
}

fn fits(s: &Section, len: u64) -> bool {
    s.offset.checked_add(s.size).is_some_and(|end| end <= len)
}

/// Checks one compressed section: its header (ELF `Elf64_Chdr`, or the GNU `ZLIB` prefix of
/// `.zdebug_*`), its claimed size against the caps, and its zlib stream inflated to nowhere.
fn compressed(file: &ObjectFile, s: &Section, name: &str, total: &mut u64) -> Result<(), String> {
    let (claimed, data_at) = if s.flags & SHF_COMPRESSED != 0 {
        if s.size < CHDR_SIZE {
            return Err("compressed, but shorter than its header".into());
        }
        let h = file.bytes(s.offset, CHDR_SIZE).ok_or("unreadable header")?;
        let kind = u32_at(h, 0);
        if kind != ELFCOMPRESS_ZLIB {
            return Err(format!("compression type {kind} (only zlib is read)"));
        }
        (u64_at(h, 8), s.offset + CHDR_SIZE)
    } else {
        let h = file
            .bytes(s.offset, 12.min(s.size))
            .ok_or("unreadable header")?;
        if h.len() < 12 || &h[..4] != b"ZLIB" {
            return Err(format!("{name} without its ZLIB header"));
        }
        (
            u64::from_be_bytes(h[4..12].try_into().unwrap_or_default()),
            s.offset + 12,
        )
    };
    let packed = s.offset + s.size - data_at;
    if claimed > MAX_INFLATED_SECTION {
        return Err(format!(
            "claims {claimed} bytes inflated (at most {MAX_INFLATED_SECTION})"
        ));
    }
    if claimed > packed.saturating_mul(MAX_RATIO) {
        return Err(format!(
            "claims {claimed} bytes from {packed} compressed (at most {MAX_RATIO} times as many)"
        ));
    }
    *total = total.saturating_add(claimed);
    if *total > MAX_INFLATED_TOTAL {
        return Err(format!(
            "the object's compressed sections claim over {MAX_INFLATED_TOTAL} bytes inflated"
        ));
    }
    let got = inflated_size(file.raw(), data_at, packed, claimed)
        .map_err(|e| format!("its zlib stream is corrupt ({e})"))?;
    if got > claimed {
        return Err(format!(
            "claims {claimed} bytes inflated, its zlib stream holds over {claimed}"
        ));
    }
    if got < claimed {
        return Err(format!(
            "claims {claimed} bytes inflated, its zlib stream holds {got}"
        ));
    }
    Ok(())
}

/// What a zlib stream at `offset` (`len` bytes) of `file` inflates to, counting at most
/// `max + 1` bytes of output and keeping none.
pub fn inflated_size(file: &File, offset: u64, len: u64, max: u64) -> io::Result<u64> {
    let source = Range {
        file,
        pos: offset,
        end: offset + len,
    };
    let mut decoder =
        flate2::read::ZlibDecoder::new(io::BufReader::with_capacity(64 << 10, source));
    io::copy(&mut (&mut decoder).take(max + 1), &mut io::sink())
}

/// A byte range of a file, read with positioned reads.
struct Range<'f> {
    file: &'f File,
    pos: u64,
    end: u64,
}

impl Read for Range<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (buf.len() as u64).min(self.end - self.pos) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Walks the unit headers of an uncompressed `.debug_info`: each unit's length must stay in the
/// section and its version be one DWARF defines (2 to 5).
fn dwarf_units(file: &ObjectFile, s: &Section) -> Result<(), String> {
    let end = s.offset + s.size;
    let mut at = s.offset;
    let mut head = [0u8; 14];
    for _ in 0..MAX_UNITS {
        if at >= end {
            return Ok(());
        }
        let n = ((end - at) as usize).min(head.len());
        file.raw()
            .read_exact_at(&mut head[..n], at)
            .map_err(|e| format!("unreadable unit header at {at}: {e}"))?;
        let short = || format!("unit header at {at} is cut");
        let unit_start = at;
        let (length, header) = match u32_at(&head, 0) {
            0xffff_ffff if n >= 14 => (u64_at(&head, 4), 12),
            0xffff_fff0..=0xffff_fffe => return Err(format!("reserved unit length at {at}")),
            l if n >= 6 => (u64::from(l), 4),
            _ => return Err(short()),
        };
        let version = u16_at(&head, header);
        if !(2..=5).contains(&version) {
            return Err(format!("unit at {unit_start} has DWARF version {version}"));
        }
        at = at
            .checked_add(header as u64)
            .and_then(|a| a.checked_add(length))
            .filter(|a| *a <= end)
            .ok_or_else(|| {
                format!("unit at {unit_start} of {length} bytes runs past the section")
            })?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write as _;

    use super::*;

    /// A section of a crafted object.
    pub(crate) struct Part<'a> {
        pub name: &'a str,
        pub kind: u32,
        pub flags: u64,
        pub data: Vec<u8>,
        /// Overrides the size in the header (a lie about the data).
        pub size: Option<u64>,
    }

    /// A minimal ELF64 object holding `parts` (section 0 and `.shstrtab` added).
    pub(crate) fn elf(parts: &[Part<'_>]) -> Vec<u8> {
        let mut names = vec![0u8];
        let mut name_at = Vec::new();
        for p in parts.iter().map(|p| p.name).chain([".shstrtab"]) {
            name_at.push(names.len() as u32);
            names.extend_from_slice(p.as_bytes());
            names.push(0);
        }
        let mut body = vec![0u8; 64];
        let mut headers = vec![[0u8; 64]];
        let mut push = |name: u32, kind: u32, flags: u64, data: &[u8], size: Option<u64>| {
            let offset = body.len() as u64;
            body.extend_from_slice(data);
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&flags.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&offset.to_le_bytes());
            h[0x20..0x28].copy_from_slice(&size.unwrap_or(data.len() as u64).to_le_bytes());
            headers.push(h);
        };
        for (p, n) in parts.iter().zip(&name_at) {
            push(*n, p.kind, p.flags, &p.data, p.size);
        }
        push(*name_at.last().unwrap(), SHT_STRTAB, 0, &names, None);
        let shoff = body.len() as u64;
        let shnum = headers.len() as u16;
        for h in &headers {
            body.extend_from_slice(h);
        }
        body[..4].copy_from_slice(b"\x7fELF");
        body[4] = 2;
        body[5] = 1;
        body[6] = 1;
        body[0x10] = 3; // ET_DYN
        body[0x12] = 62; // EM_X86_64
        body[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        body[0x34] = 64;
        body[0x3a] = 64;
        body[0x3c..0x3e].copy_from_slice(&shnum.to_le_bytes());
        body[0x3e..0x40].copy_from_slice(&(shnum - 1).to_le_bytes());
        body
    }

    /// A compressed section's bytes: an `Elf64_Chdr` claiming `claimed` bytes, then `stream`.
    pub(crate) fn chdr(claimed: u64, stream: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&ELFCOMPRESS_ZLIB.to_le_bytes());
        d.extend_from_slice(&[0; 4]);
        d.extend_from_slice(&claimed.to_le_bytes());
        d.extend_from_slice(&1u64.to_le_bytes());
        d.extend_from_slice(stream);
        d
    }

    pub(crate) fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn check_bytes(name: &str, bytes: &[u8]) -> Result<Fit, Refusal> {
        let path =
            std::env::temp_dir().join(format!("memprof-elfcheck-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let r = check_object(&path);
        std::fs::remove_file(&path).unwrap();
        r
    }

    fn debug(name: &'static str, data: Vec<u8>) -> Part<'static> {
        Part {
            name,
            kind: 1,
            flags: SHF_COMPRESSED,
            data,
            size: None,
        }
    }

    fn symtab() -> Part<'static> {
        Part {
            name: ".symtab",
            kind: SHT_SYMTAB,
            flags: 0,
            data: vec![0; 48],
            size: None,
        }
    }

    #[test]
    fn sound_objects_pass() {
        let exe = std::env::current_exe().unwrap();
        assert_eq!(check_object(&exe), Ok(Fit::Whole));
        let text = b"hello debug world ".repeat(100);
        let good = elf(&[
            symtab(),
            debug(".debug_str", chdr(text.len() as u64, &zlib(&text))),
        ]);
        assert_eq!(check_bytes("good", &good), Ok(Fit::Whole));
    }

    #[test]
    fn lying_compressed_headers_cost_the_debug_sections_only() {
        let small = zlib(b"tiny");
        for (name, claimed, why) in [
            (
                "64g",
                64 << 30,
                "claims 68719476736 bytes inflated (at most",
            ),
            (
                "max",
                u64::MAX,
                "claims 18446744073709551615 bytes inflated",
            ),
            ("ratio", 100 << 20, "compressed (at most 256 times"),
            ("short", 3, "its zlib stream holds over 3"),
            (
                "long",
                40,
                "claims 40 bytes inflated, its zlib stream holds 4",
            ),
        ] {
            let bytes = elf(&[symtab(), debug(".debug_info", chdr(claimed, &small))]);
            match check_bytes(name, &bytes) {
                Ok(Fit::SymbolsOnly { why: got }) => assert!(got.contains(why), "{name}: {got}"),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn zlib_bomb_is_not_inflated_past_its_cap() {
        // 600 MiB of zeros in about 600 KB: over the per-section cap however honest.
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..600 {
            e.write_all(&zeros).unwrap();
        }
        let bomb = e.finish().unwrap();
        let bytes = elf(&[symtab(), debug(".debug_info", chdr(600 << 20, &bomb))]);
        let got = check_bytes("bomb", &bytes).unwrap();
        assert!(
            matches!(&got, Fit::SymbolsOnly { why } if why.contains("at most 536870912")),
            "{got:?}"
        );
        // A bomb that claims little is inflated only to its claim plus one byte.
        let bytes = elf(&[symtab(), debug(".debug_info", chdr(1 << 20, &bomb))]);
        let got = check_bytes("bomb-small-claim", &bytes).unwrap();
        assert!(
            matches!(&got, Fit::SymbolsOnly { why } if why.contains("holds over 1048576")),
            "{got:?}"
        );
    }

    #[test]
    fn broken_symbol_tables_and_headers_are_refused() {
        let mut lying = symtab();
        lying.size = Some(1 << 40);
        let e = check_bytes("symtab", &elf(&[lying])).unwrap_err();
        assert!(
            e.reason.contains("(.symtab)") && e.reason.contains("past the end"),
            "{e}"
        );
        let mut bytes = elf(&[symtab()]);
        bytes[0x3c..0x3e].copy_from_slice(&0xfff0u16.to_le_bytes());
        let e = check_bytes("shnum", &bytes).unwrap_err();
        assert!(e.reason.contains("section headers at offset"), "{e}");
        let e = check_bytes("text", b"just text").unwrap_err();
        assert!(e.to_string().ends_with(": not an ELF file"), "{e}");
        let e = check_object(Path::new("/dev/zero")).unwrap_err();
        assert!(e.reason.contains("not a regular file"), "{e}");
    }

    #[test]
    fn corrupt_dwarf_units_cost_the_debug_sections_only() {
        let mut unit = Vec::new();
        unit.extend_from_slice(&7u32.to_le_bytes());
        unit.extend_from_slice(&4u16.to_le_bytes());
        unit.extend_from_slice(&[0; 5]);
        let good = Part {
            name: ".debug_info",
            kind: 1,
            flags: 0,
            data: unit.clone(),
            size: None,
        };
        assert_eq!(
            check_bytes("dwarf-ok", &elf(&[symtab(), good])),
            Ok(Fit::Whole)
        );
        let mut bad = unit.clone();
        bad[0..4].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
        let bad = Part {
            name: ".debug_info",
            kind: 1,
            flags: 0,
            data: bad,
            size: None,
        };
        let got = check_bytes("dwarf-bad", &elf(&[symtab(), bad])).unwrap();
        assert!(
            matches!(&got, Fit::SymbolsOnly { why } if why.contains("runs past the section")),
            "{got:?}"
        );
    }
}
