//! `--kernel`: the kmem and percpu tracepoints. Where their fields lie is read from each
//! event's `format` file in tracefs (bounded reads), never assumed, and handed to the programs
//! in the `KMEM` global; then the programs are attached.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::Ebpf;
use memprof_common::KmemFields;

use super::tracepoints::{Tracepoints, attach_one};

/// A `format` file is a few hundred bytes; more is not a format file.
const MAX_FORMAT_BYTES: u64 = 64 * 1024;

/// The programs and their tracepoints (category, name).
const POINTS: [(&str, &str, &str); 8] = [
    ("kmem_kmalloc", "kmem", "kmalloc"),
    ("kmem_kfree", "kmem", "kfree"),
    ("kmem_cache_alloc", "kmem", "kmem_cache_alloc"),
    ("kmem_cache_free", "kmem", "kmem_cache_free"),
    ("kmem_page_alloc", "kmem", "mm_page_alloc"),
    ("kmem_page_free", "kmem", "mm_page_free"),
    ("percpu_alloc", "percpu", "percpu_alloc_percpu"),
    ("percpu_free", "percpu", "percpu_free_percpu"),
];

/// Where tracefs is mounted: `/sys/kernel/tracing`, else under debugfs.
fn tracefs() -> Option<PathBuf> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// The offsets of the fields the programs read, from tracefs.
pub fn fields() -> Result<KmemFields> {
    let root = tracefs().ok_or_else(|| {
        anyhow!("--kernel needs tracefs (/sys/kernel/tracing), which is not mounted")
    })?;
    fields_in(&root)
}

/// As [`fields`], with tracefs at `root`.
fn fields_in(root: &Path) -> Result<KmemFields> {
    let mut formats = Vec::with_capacity(POINTS.len());
    for (_, category, name) in POINTS {
        let path = root.join("events").join(category).join(name).join("format");
        let text = read_format(&path).with_context(|| {
            format!(
                "--kernel needs the kernel's tracepoint {category}:{name}, which it does not have"
            )
        })?;
        formats.push(text);
    }
    let at = |i: usize, field: &str| -> Result<u32> {
        let (_, category, name) = POINTS[i];
        offset_of(&formats[i], field)
            .ok_or_else(|| anyhow!("tracepoint {category}:{name} has no field {field}"))
    };
    Ok(KmemFields {
        kmalloc_ptr: at(0, "ptr")?,
        kmalloc_bytes: at(0, "bytes_req")?,
        kfree_ptr: at(1, "ptr")?,
        cache_alloc_ptr: at(2, "ptr")?,
        cache_alloc_bytes: at(2, "bytes_req")?,
        cache_free_ptr: at(3, "ptr")?,
        page_alloc_pfn: at(4, "pfn")?,
        page_alloc_order: at(4, "order")?,
        page_alloc_migratetype: at(4, "migratetype")?,
        page_free_pfn: at(5, "pfn")?,
        page_free_order: at(5, "order")?,
        percpu_alloc_ptr: at(6, "ptr")?,
        percpu_alloc_bytes: at(6, "bytes_alloc")?,
        percpu_free_ptr: at(7, "ptr")?,
        ready: 1,
        _pad: 0,
    })
}

fn read_format(path: &Path) -> Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FORMAT_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FORMAT_BYTES {
        bail!("{} is over {MAX_FORMAT_BYTES} bytes", path.display());
    }
    Ok(text)
}

/// The offset of `field` in a tracepoint's `format` text: its line reads
/// `field:TYPE NAME;\toffset:N;\tsize:N;\tsigned:N;` (NAME may carry `[...]`).
fn offset_of(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let decl = parts.next()?.strip_prefix("field:")?;
        let name = decl.rsplit([' ', '*']).next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        parts.find_map(|p| p.strip_prefix("offset:")?.parse().ok())
    })
}

/// Loads and attaches the kmem and percpu programs.
pub fn attach(ebpf: &mut Ebpf, links: &mut Tracepoints) -> Result<()> {
    for (program, category, name) in POINTS {
        links.push((program, attach_one(ebpf, program, category, name)?));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE_ALLOC: &str = "name: mm_page_alloc\nID: 312\nformat:\n\
        \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
        \tfield:unsigned long pfn;\toffset:8;\tsize:8;\tsigned:0;\n\
        \tfield:unsigned int order;\toffset:16;\tsize:4;\tsigned:0;\n\
        \tfield:int migratetype;\toffset:32;\tsize:4;\tsigned:1;\n\
        \tfield:void __seg_gs * ptr;\toffset:56;\tsize:8;\tsigned:0;\n\
        \tfield:char comm[16];\toffset:60;\tsize:16;\tsigned:0;\n";

    #[test]
    fn reads_offsets_from_format_text() {
        assert_eq!(offset_of(PAGE_ALLOC, "pfn"), Some(8));
        assert_eq!(offset_of(PAGE_ALLOC, "order"), Some(16));
        assert_eq!(offset_of(PAGE_ALLOC, "migratetype"), Some(32));
        assert_eq!(offset_of(PAGE_ALLOC, "ptr"), Some(56));
        assert_eq!(offset_of(PAGE_ALLOC, "comm"), Some(60));
        assert_eq!(offset_of(PAGE_ALLOC, "common_type"), Some(0));
        assert_eq!(offset_of(PAGE_ALLOC, "gfp_flags"), None);
        assert_eq!(offset_of(PAGE_ALLOC, "type"), None);
    }

    #[test]
    fn a_missing_tracepoint_is_named() {
        let dir = std::env::temp_dir().join(format!("memprof-tracefs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("events")).unwrap();
        let err = format!("{:#}", fields_in(&dir).unwrap_err());
        assert!(err.contains("tracepoint kmem:kmalloc"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
