//! The one place that names frames and call sites and formats byte counts, for every output.

use std::fmt::Write as _;

use memprof_common::AllocFn;

use super::{Frame, Site};
use crate::analysis::recommend;

/// Site labels (Prometheus, dashboard) are cut to this many bytes.
pub const MAX_SITE_LABEL: usize = 200;

/// Human-readable byte count.
pub fn human_bytes(b: u64) -> String {
    recommend::fmt_bytes(b as f64)
}

/// Human-readable signed byte count: `-1.5 KiB`.
pub fn signed_bytes(b: i64) -> String {
    let sign = if b < 0 { "-" } else { "" };
    format!("{sign}{}", human_bytes(b.unsigned_abs()))
}

/// Human-readable byte change with its sign: `+2.4 KiB`, `-1000 B`, `0 B`.
pub fn change_bytes(b: i64) -> String {
    let sign = match b {
        0 => "",
        1.. => "+",
        _ => "-",
    };
    format!("{sign}{}", human_bytes(b.unsigned_abs()))
}

/// The last component of a path.
pub fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A frame's name, the same in every run: its function; else, for code nothing names,
/// `module+0xOFFSET` (the module's file name and the offset of the frame's return address in
/// that file, which `addr2line`, pprof or a later symbolizer can name with the module's debug
/// information); else `[unknown]` (an address in no module, or where unwinding stopped).
pub fn frame_name(frame: &Frame) -> String {
    match (&frame.function, &frame.module, frame.offset) {
        (Some(function), _, _) => function.clone(),
        (None, Some(module), Some(offset)) => format!("{}+{offset:#x}", base_name(module)),
        (None, Some(module), None) => base_name(module).to_owned(),
        (None, None, _) => "[unknown]".to_owned(),
    }
}

/// A stack's innermost named function, else [`frame_name`] of its innermost frame; None for
/// an empty stack. A kernel allocation's stack (`--kernel`, kernel frames first) is named by
/// the user code that caused it, `fill_pipe (kernel)`, else by its innermost kernel function.
fn stack_label(frames: &[Frame]) -> Option<String> {
    if frames.first().is_some_and(|f| f.kind == "kernel") {
        let user = frames
            .iter()
            .filter(|f| f.kind != "kernel")
            .find_map(|f| f.function.as_deref());
        if let Some(user) = user {
            return Some(format!("{user} (kernel)"));
        }
    }
    frames
        .iter()
        .find_map(|f| f.function.clone())
        .or_else(|| frames.first().map(frame_name))
}

/// A short name for a group's call site (hotspots, recommendations): [`stack_label`], else
/// `(no stack, ALLOCATOR)`.
pub fn group_name(frames: &[Frame], func: AllocFn) -> String {
    stack_label(frames).unwrap_or_else(|| format!("(no stack, {})", func.name()))
}

/// A site's label for metrics and the dashboard: [`stack_label`], else `(no stack)`; at most
/// [`MAX_SITE_LABEL`] bytes.
pub fn site_label(site: &Site) -> String {
    let mut name = stack_label(&site.stack).unwrap_or_else(|| "(no stack)".to_string());
    if name.len() > MAX_SITE_LABEL {
        let mut end = MAX_SITE_LABEL;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
        let _ = write!(name, "...");
    }
    name
}

/// A site's name in folded stacks, CSV and HTML: its innermost named function, else the name of
/// its innermost frame, else `[unknown]` (no stack).
pub fn site_name(site: &Site) -> String {
    stack_label(&site.stack).unwrap_or_else(|| "[unknown]".to_owned())
}

/// The frame a site is named after (see [`site_name`]), if it has a stack.
pub fn site_frame(site: &Site) -> Option<&Frame> {
    let named = |f: &&Frame| f.function.is_some();
    if site.stack.first().is_some_and(|f| f.kind == "kernel")
        && let Some(user) = site.stack.iter().filter(|f| f.kind != "kernel").find(named)
    {
        return Some(user);
    }
    site.stack.iter().find(named).or_else(|| site.stack.first())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::sample::{frame, sample_profile};

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(1000), "1000 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(8 << 20), "8.0 MiB");
        assert_eq!(signed_bytes(-1536), "-1.5 KiB");
        assert_eq!(signed_bytes(1536), "1.5 KiB");
        assert_eq!(change_bytes(1536), "+1.5 KiB");
        assert_eq!(change_bytes(0), "0 B");
    }

    #[test]
    fn frame_and_site_names() {
        let p = sample_profile();
        assert_eq!(frame_name(&p.sites[0].stack[2]), "libc.so.6+0x27234");
        assert_eq!(frame_name(&frame(None, None, None, 0x10)), "[unknown]");
        assert_eq!(site_name(&p.sites[0]), "leak_widgets");
        assert_eq!(site_name(&p.sites[2]), "[unknown]");
        let unnamed_inner = Site {
            stack: vec![
                frame(None, Some("/lib/x.so"), None, 0x20),
                frame(Some("f"), None, None, 0x30),
            ],
            ..p.sites[0].clone()
        };
        assert_eq!(site_name(&unnamed_inner), "f");
        assert_eq!(site_frame(&unnamed_inner).unwrap().offset, None);
        let unnamed = Site {
            stack: vec![frame(None, Some("/lib/x.so"), None, 0x20)],
            ..p.sites[0].clone()
        };
        assert_eq!(site_name(&unnamed), "x.so+0x20");
        assert_eq!(site_label(&unnamed), "x.so+0x20");
        assert_eq!(group_name(&[], AllocFn::Calloc), "(no stack, calloc)");
    }

    #[test]
    fn kernel_sites_are_named_by_the_user_code_that_caused_them() {
        let p = sample_profile();
        let kernel = |function: &str| Frame {
            kind: "kernel",
            module: Some("[kernel]".into()),
            ..frame(Some(function), None, None, 0)
        };
        let site = Site {
            stack: vec![
                kernel("__alloc_pages_noprof"),
                kernel("anon_pipe_write"),
                frame(None, Some("/lib/x.so"), None, 0x20),
                frame(Some("fill_pipe"), None, None, 0x30),
                frame(Some("main"), None, None, 0x40),
            ],
            ..p.sites[0].clone()
        };
        assert_eq!(site_name(&site), "fill_pipe (kernel)");
        assert_eq!(
            site_frame(&site).and_then(|f| f.function.as_deref()),
            Some("fill_pipe")
        );
        assert_eq!(group_name(&site.stack, AllocFn::Page), "fill_pipe (kernel)");
        let kernel_only = Site {
            stack: vec![kernel("__alloc_pages_noprof"), kernel("kthread")],
            ..p.sites[0].clone()
        };
        assert_eq!(site_name(&kernel_only), "__alloc_pages_noprof");
    }
}
