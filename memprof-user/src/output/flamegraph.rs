//! `--flamegraph FILE`: flamegraph SVGs drawn with inferno from the folded stacks.
//!
//! `FILE` draws in-use bytes ("memprof: in-use bytes (pid N)"), and the allocated bytes go next
//! to it in `FILE.alloc.svg` (`x.svg` → `x.alloc.svg`; any other name gets `.alloc.svg`
//! appended). When nothing is in use, the SVG says so instead of being empty.

use std::path::{Path, PathBuf};

use inferno::flamegraph::{
    self, Options,
    color::{BasicPalette, Palette},
};

use super::folded::{Metric, lines};
use crate::report::Profile;

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
pub fn svg(profile: &Profile, metric: Metric, interactive: bool) -> anyhow::Result<String> {
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
    let title = super::escape(title);
    let message = super::escape(message);
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
mod tests {
    use super::*;
    use crate::report::sample::sample_profile;

    #[test]
    fn sibling_path() {
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
        let drawn = svg(&p, Metric::InUse, true).unwrap();
        assert!(drawn.starts_with("<?xml") && drawn.contains("<svg"));
        assert!(drawn.contains("memprof: in-use bytes (pid 4242)"));
        assert!(
            drawn.contains("<title>leak_widgets (21,000 bytes"),
            "{drawn}"
        );
        // Names are XML-escaped by inferno.
        assert!(
            drawn.contains("map&lt;int, &quot;q&quot;&gt;::grow:now"),
            "{drawn}"
        );
        let alloc = svg(&p, Metric::Allocated, false).unwrap();
        assert!(alloc.contains("<title>churn_buffers (26,880 bytes"));
        assert!(!alloc.contains("function init(evt)"));
    }

    #[test]
    fn empty_profile_still_draws() {
        let mut p = sample_profile();
        p.sites.clear();
        assert!(lines(&p, Metric::InUse).is_empty());
        let drawn = svg(&p, Metric::InUse, true).unwrap();
        assert!(
            drawn.starts_with("<?xml")
                && drawn.contains("<svg")
                && drawn.contains("no in-use bytes")
        );
    }
}
