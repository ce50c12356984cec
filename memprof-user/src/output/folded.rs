//! `--folded FILE`: Brendan Gregg's folded stacks (the flamegraphs of `flamegraph` are drawn
//! from them).
//!
//! Folded stacks: one line per distinct stack, frames root first joined by `;`, then a space
//! and the byte count (`main;leak_widgets 21000`). Lines of identical stacks are summed and
//! lines with nothing to count are left out. There are two metrics, each in its own file so
//! that every file works as it is with `flamegraph.pl`, inferno or speedscope:
//!
//! | file | holds |
//! | --- | --- |
//! | `FILE` | in-use bytes at the end of the trace (what is still allocated) |
//! | `FILE.alloc` | bytes allocated during the trace (freed or not) |
//!
//! Frame names (`report::names`, all outputs): the function, else `module+0xADDR` (the module's file name and the
//! frame's absolute address) when the address could not be named, else `[unknown]`; a site
//! without a stack is a single `[unknown]` frame. In folded lines `;` inside a name becomes `:`
//! and line breaks become spaces, so a name never splits a stack.

use std::path::{Path, PathBuf};

use crate::report::{Profile, Site, names::frame_name};

/// What a folded line or flamegraph counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Bytes still allocated at the end of the trace.
    InUse,
    /// Bytes allocated during the trace.
    Allocated,
}

impl Metric {
    pub fn of(self, site: &Site) -> u64 {
        match self {
            Metric::InUse => site.inuse_bytes,
            Metric::Allocated => site.alloc_bytes,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Metric::InUse => "in-use bytes",
            Metric::Allocated => "allocated bytes",
        }
    }
}

/// A site's stack as a folded-stack key: root first, `;`-joined.
pub fn folded_stack(site: &Site) -> String {
    if site.stack.is_empty() {
        return "[unknown]".to_owned();
    }
    let names: Vec<String> = site
        .stack
        .iter()
        .rev()
        .map(|f| frame_name(f).replace(';', ":").replace(['\n', '\r'], " "))
        .collect();
    names.join(";")
}

/// The folded lines for `metric` (without newlines), identical stacks summed, sorted by stack.
pub fn lines(profile: &Profile, metric: Metric) -> Vec<String> {
    let mut sums: std::collections::BTreeMap<String, u64> = Default::default();
    for site in &profile.sites {
        let n = metric.of(site);
        if n > 0 {
            *sums.entry(folded_stack(site)).or_default() += n;
        }
    }
    sums.into_iter()
        .map(|(stack, n)| format!("{stack} {n}"))
        .collect()
}

/// The folded file for `metric`: [`lines`], each ending in a newline.
pub fn render(profile: &Profile, metric: Metric) -> String {
    lines(profile, metric)
        .into_iter()
        .map(|l| l + "\n")
        .collect()
}

/// Where the allocated-bytes folded file goes, next to `path`: `FILE.alloc`.
pub fn alloc_folded_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".alloc");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::sample::sample_profile;

    #[test]
    fn folded_lines_root_first_with_exact_counts() {
        let p = sample_profile();
        assert_eq!(
            lines(&p, Metric::InUse),
            [
                "[unknown] 64",
                "libc.so.6+0x27234;main;leak_widgets 21000",
                "main;map<int, \"q\">::grow:now 4096",
            ]
        );
        let alloc = render(&p, Metric::Allocated);
        assert!(alloc.contains("main;churn_buffers 26880\n"), "{alloc}");
        assert!(
            alloc.ends_with('\n') && alloc.lines().count() == 4,
            "{alloc}"
        );
    }

    #[test]
    fn identical_stacks_are_summed() {
        let mut p = sample_profile();
        let mut twin = p.sites[0].clone();
        twin.allocator = "calloc";
        twin.inuse_bytes = 1000;
        p.sites.push(twin);
        assert!(
            lines(&p, Metric::InUse)
                .contains(&"libc.so.6+0x27234;main;leak_widgets 22000".to_owned())
        );
    }

    #[test]
    fn sibling_paths() {
        assert_eq!(
            alloc_folded_path(Path::new("/t/x.folded")),
            Path::new("/t/x.folded.alloc")
        );
    }
}
