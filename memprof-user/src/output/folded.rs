//! `--folded FILE` and `--flamegraph FILE`: Brendan Gregg's folded stacks and the flamegraph
//! SVGs drawn from them (with inferno), plus the frame and site names every output shares.
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
//! Flamegraphs: `FILE` draws in-use bytes ("memprof: in-use bytes (pid N)"), and the allocated
//! bytes go next to it in `FILE.alloc.svg` (`x.svg` → `x.alloc.svg`; any other name gets
//! `.alloc.svg` appended). When nothing is in use, the SVG says so instead of being empty.
//!
//! Frame names (all outputs): the function, else `module+0xADDR` (the module's file name and the
//! frame's absolute address) when the address could not be named, else `[unknown]`; a site
//! without a stack is a single `[unknown]` frame. In folded lines `;` inside a name becomes `:`
//! and line breaks become spaces, so a name never splits a stack.

use std::path::{Path, PathBuf};

use inferno::flamegraph::{
    self, Options,
    color::{BasicPalette, Palette},
};

use super::{Profile, Site};
use crate::symbolize::Frame;

/// What a folded line or flamegraph counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Bytes still allocated at the end of the trace.
    InUse,
    /// Bytes allocated during the trace.
    Allocated,
}

impl Metric {
    fn of(self, site: &Site) -> u64 {
        match self {
            Metric::InUse => site.inuse_bytes,
            Metric::Allocated => site.alloc_bytes,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Metric::InUse => "in-use bytes",
            Metric::Allocated => "allocated bytes",
        }
    }
}

/// A frame's name: function, else `module+0xADDR`, else `[unknown]`.
pub fn frame_name(frame: &Frame) -> String {
    match (&frame.function, &frame.module) {
        (Some(function), _) => function.clone(),
        (None, Some(module)) => format!("{}+{}", base_name(module), frame.addr),
        (None, None) => "[unknown]".to_owned(),
    }
}

/// The last component of a path.
pub fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A site's name: its innermost named function, else the name of its innermost frame, else
/// `[unknown]` (no stack).
pub fn site_name(site: &Site) -> String {
    site.stack
        .iter()
        .find_map(|f| f.function.clone())
        .or_else(|| site.stack.first().map(frame_name))
        .unwrap_or_else(|| "[unknown]".to_owned())
}

/// The frame a site is named after (see [`site_name`]), if it has a stack.
pub fn site_frame(site: &Site) -> Option<&Frame> {
    site.stack
        .iter()
        .find(|f| f.function.is_some())
        .or_else(|| site.stack.first())
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

/// Where the allocated-bytes flamegraph goes, next to `path`: `x.svg` → `x.alloc.svg`, any
/// other name gets `.alloc.svg` appended.
pub fn alloc_svg_path(path: &Path) -> PathBuf {
    match path.extension() {
        Some(ext) if ext.eq_ignore_ascii_case("svg") => path.with_extension("alloc.svg"),
        _ => {
            let mut s = path.as_os_str().to_owned();
            s.push(".alloc.svg");
            PathBuf::from(s)
        }
    }
}

/// The flamegraph SVG of `metric`. `interactive` keeps inferno's JavaScript (zoom, search);
/// without it the SVG is static and can be embedded in a page.
pub fn flamegraph_svg(
    profile: &Profile,
    metric: Metric,
    interactive: bool,
) -> anyhow::Result<String> {
    let title = format!("memprof: {} (pid {})", metric.describe(), profile.pid);
    let lines = lines(profile, metric);
    if lines.is_empty() {
        return Ok(empty_svg(
            &title,
            &format!("no {} to draw", metric.describe()),
        ));
    }
    let mut opt = Options::default();
    opt.title = title;
    opt.count_name = "bytes".to_owned();
    opt.colors = Palette::Basic(BasicPalette::Mem);
    opt.no_javascript = !interactive;
    if !profile.command.is_empty() {
        opt.subtitle = Some(profile.command.join(" "));
    }
    let mut out = Vec::new();
    flamegraph::from_lines(&mut opt, lines.iter().map(String::as_str), &mut out)
        .map_err(|e| anyhow::anyhow!("cannot draw the flamegraph: {e}"))?;
    String::from_utf8(out).map_err(|e| anyhow::anyhow!("flamegraph is not UTF-8: {e}"))
}

/// A small valid SVG carrying `title` and `message`, for a graph with nothing to draw.
fn empty_svg(title: &str, message: &str) -> String {
    let title = super::html::escape(title);
    let message = super::html::escape(message);
    format!(
        "<?xml version=\"1.0\" standalone=\"no\"?>\n\
         <svg version=\"1.1\" width=\"1200\" height=\"80\" viewBox=\"0 0 1200 80\" \
         xmlns=\"http://www.w3.org/2000/svg\">\
         <rect x=\"0\" y=\"0\" width=\"100%\" height=\"100%\" fill=\"#eeeeee\"/>\
         <text x=\"600\" y=\"28\" text-anchor=\"middle\" font-size=\"17\">{title}</text>\
         <text x=\"600\" y=\"56\" text-anchor=\"middle\" font-size=\"12\">{message}</text>\
         </svg>\n"
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        analysis::growth::Verdict,
        output::TimePoint,
        report::{KernelLosses, Report, Totals},
        table::{HeapTotals, MmapTotals},
    };

    fn frame(function: Option<&str>, module: Option<&str>, line: Option<u32>, addr: u64) -> Frame {
        Frame {
            function: function.map(str::to_owned),
            module: module.map(str::to_owned),
            file: line.map(|_| "/src/outputs.c".to_owned()),
            line,
            addr: format!("{addr:#x}"),
            kind: "native",
        }
    }

    fn site(stack: Vec<Frame>, allocator: &'static str, kind: &'static str) -> Site {
        Site {
            stack,
            allocator,
            kind,
            alloc_objects: 0,
            alloc_bytes: 0,
            inuse_objects: 0,
            inuse_bytes: 0,
            max_inuse_bytes: 0,
            max_inuse_objects: 0,
            frees: 0,
            freed_lifetime_ns: 0,
            bytes_at_peak: 0,
            verdict: Verdict::Unknown,
            growth_bytes_per_s: 0.0,
            first_alloc_ns: 0,
            last_alloc_ns: 0,
        }
    }

    /// A profile shaped like the outputs.c fixture, shared by the writers' unit tests:
    /// `leak_widgets` (7 x 3000 B, all in use), an mmap site whose function name needs escaping
    /// everywhere, a site without a stack (1 x 64 B) and `churn_buffers` (210 x 128 B, all freed).
    pub(crate) fn sample_profile() -> Profile {
        const APP: &str = "/opt/app";
        const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let main = |line, addr| frame(Some("main"), Some(APP), Some(line), addr);
        let leak = Site {
            alloc_objects: 7,
            alloc_bytes: 21000,
            inuse_objects: 7,
            inuse_bytes: 21000,
            max_inuse_bytes: 21000,
            max_inuse_objects: 7,
            bytes_at_peak: 18000,
            verdict: Verdict::Leak,
            growth_bytes_per_s: 1500.25,
            first_alloc_ns: 100_000_000,
            last_alloc_ns: 1_900_000_000,
            ..site(
                vec![
                    frame(Some("leak_widgets"), Some(APP), Some(47), 0x5555_0000_1296),
                    main(87, 0x5555_0000_10e7),
                    frame(None, Some(LIBC), None, 0x7f00_0000_1234),
                ],
                "malloc",
                "heap",
            )
        };
        let odd = Site {
            alloc_objects: 1,
            alloc_bytes: 4096,
            inuse_objects: 1,
            inuse_bytes: 4096,
            max_inuse_bytes: 4096,
            max_inuse_objects: 1,
            bytes_at_peak: 4096,
            verdict: Verdict::Stable,
            first_alloc_ns: 500_000_000,
            last_alloc_ns: 500_000_000,
            ..site(
                vec![
                    frame(
                        Some("map<int, \"q\">::grow;now"),
                        Some(APP),
                        None,
                        0x5555_0000_2000,
                    ),
                    main(95, 0x5555_0000_1100),
                ],
                "mmap",
                "mmap",
            )
        };
        let nostack = Site {
            alloc_objects: 1,
            alloc_bytes: 64,
            inuse_objects: 1,
            inuse_bytes: 64,
            max_inuse_bytes: 64,
            max_inuse_objects: 1,
            bytes_at_peak: 64,
            first_alloc_ns: 10_000_000,
            last_alloc_ns: 10_000_000,
            ..site(vec![], "calloc", "heap")
        };
        let churn = Site {
            alloc_objects: 210,
            alloc_bytes: 26880,
            max_inuse_bytes: 128,
            max_inuse_objects: 1,
            frees: 210,
            freed_lifetime_ns: 2_100_000,
            verdict: Verdict::Churn,
            first_alloc_ns: 100_000_000,
            last_alloc_ns: 1_900_000_000,
            ..site(
                vec![
                    frame(Some("churn_buffers"), Some(APP), Some(60), 0x5555_0000_1309),
                    main(90, 0x5555_0000_113b),
                ],
                "malloc",
                "heap",
            )
        };
        let heap = HeapTotals {
            allocs: 219,
            frees: 210,
            bytes_allocated: 47944,
            bytes_freed: 26880,
            outstanding_allocs: 8,
            outstanding_bytes: 21064,
            peak_outstanding_bytes: 21192,
            ..HeapTotals::default()
        };
        let report = Report {
            record: "report",
            pid: 4242,
            elapsed_s: 2.0,
            duration_s: Some(2.0),
            exited: Some(true),
            exit_code: Some(Some(0)),
            sampling: None,
            totals: Totals {
                heap,
                lost_events: 3,
                lost_stacks: 1,
            },
            mmap: MmapTotals::default(),
            kernel: KernelLosses::default(),
            probe_stats: Vec::new(),
            min_age_s: 0.0,
            leak_groups: 3,
            unknown_frames: 1,
            leak_detected: true,
            growth_rate_mb_per_hour: Some(5.4),
            projected_limit_hours: None,
            rss_bytes: None,
            pss_bytes: None,
            vm_size_bytes: None,
            untraced_bytes: None,
            phases: vec![],
            categories: vec![],
            recommendations: vec![],
            churn_hotspots: vec![],
            leaks: vec![],
            processes: None,
            unwind: None,
            forgotten: Default::default(),
        };
        Profile {
            pid: 4242,
            command: vec!["./outputs".into(), "<b>&co".into()],
            duration_s: 2.0,
            peak_t_s: 1.5,
            sites: vec![leak, odd, nostack, churn],
            timeline: (0..5)
                .map(|i| TimePoint {
                    t_s: i as f64 * 0.5,
                    heap_bytes: 3000 * i,
                    rss_bytes: Some(1_000_000 + 4096 * i),
                })
                .collect(),
            report,
        }
    }

    #[test]
    fn frame_and_site_names() {
        let p = sample_profile();
        assert_eq!(frame_name(&p.sites[0].stack[2]), "libc.so.6+0x7f0000001234");
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
        assert_eq!(site_frame(&unnamed_inner).unwrap().addr, "0x30");
    }

    #[test]
    fn folded_lines_root_first_with_exact_counts() {
        let p = sample_profile();
        assert_eq!(
            lines(&p, Metric::InUse),
            [
                "[unknown] 64",
                "libc.so.6+0x7f0000001234;main;leak_widgets 21000",
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
                .contains(&"libc.so.6+0x7f0000001234;main;leak_widgets 22000".to_owned())
        );
    }

    #[test]
    fn sibling_paths() {
        assert_eq!(
            alloc_folded_path(Path::new("/t/x.folded")),
            Path::new("/t/x.folded.alloc")
        );
        assert_eq!(
            alloc_svg_path(Path::new("/t/x.svg")),
            Path::new("/t/x.alloc.svg")
        );
        assert_eq!(
            alloc_svg_path(Path::new("/t/flame")),
            Path::new("/t/flame.alloc.svg")
        );
    }

    #[test]
    fn flamegraph_titles_and_counts() {
        let p = sample_profile();
        let svg = flamegraph_svg(&p, Metric::InUse, true).unwrap();
        assert!(svg.starts_with("<?xml") && svg.contains("<svg"));
        assert!(svg.contains("memprof: in-use bytes (pid 4242)"));
        assert!(svg.contains("<title>leak_widgets (21,000 bytes"), "{svg}");
        // Names are XML-escaped by inferno.
        assert!(
            svg.contains("map&lt;int, &quot;q&quot;&gt;::grow:now"),
            "{svg}"
        );
        let alloc = flamegraph_svg(&p, Metric::Allocated, false).unwrap();
        assert!(alloc.contains("<title>churn_buffers (26,880 bytes"));
        assert!(!alloc.contains("function init(evt)"));
    }

    #[test]
    fn empty_profile_still_draws() {
        let mut p = sample_profile();
        p.sites.clear();
        assert!(lines(&p, Metric::InUse).is_empty());
        let svg = flamegraph_svg(&p, Metric::InUse, true).unwrap();
        assert!(
            svg.starts_with("<?xml") && svg.contains("<svg") && svg.contains("no in-use bytes")
        );
    }
}
