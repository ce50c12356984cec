//! `--html FILE`: one self-contained HTML page (no scripts, fonts or images from anywhere
//! else) for a person: a header with the process, the duration, the totals and what was lost;
//! a line chart of the heap's outstanding bytes and the RSS over time (inline SVG, from the
//! profile's timeline); the top call sites with verdict, bytes, growth and their stacks
//! (expandable `<details>`); the in-use flamegraph (inferno's SVG, inline and static, each
//! frame's `<title>` giving its bytes); and the report's phases and recommendations when
//! there are any.
//!
//! Every text from the profile is escaped ([`escape`](super::escape)). Byte counts are printed exactly, with
//! thousands separators (`21,000 B`, see [`exact_bytes`]), with the rounded size as a tooltip.

use std::fmt::Write as _;

use super::{escape, flamegraph, folded::Metric};
use crate::report::{
    Profile, RssPoint, Site, TimePoint,
    names::{frame_name, human_bytes, site_name},
};

/// Sites listed in the table, at most.
pub const TOP_SITES: usize = 50;

/// `n` with thousands separators: `21000` → `21,000`.
pub fn group_digits(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A byte count as the page prints it: `21,000 B`.
pub fn exact_bytes(n: u64) -> String {
    format!("{} B", group_digits(n))
}

/// `exact_bytes` in a span whose tooltip is the rounded size.
fn bytes_cell(n: u64) -> String {
    format!(
        "<span title=\"{}\">{}</span>",
        escape(&human_bytes(n)),
        exact_bytes(n)
    )
}

const STYLE: &str = "
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.5em; margin: 0 0 .3em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: .2em 1.2em; }
dl.facts dt { color: #555; }
dl.facts dd { margin: 0; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; font-size: .9em; }
th, td { border-bottom: 1px solid #e3e3e3; padding: .3em .6em; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.verdict { font-weight: 600; padding: 0 .4em; border-radius: 3px; }
.v-leak { background: #f8d0d0; color: #8a0000; }
.v-growing { background: #fde8c8; color: #7a4a00; }
.v-stable { background: #dcefdc; color: #1f5c1f; }
.v-churn { background: #dde6f6; color: #1f3c73; }
.v-unknown { background: #eee; color: #555; }
details ol { margin: .3em 0; padding-left: 1.6em; font-family: ui-monospace, monospace; font-size: .9em; }
.where { color: #666; }
.lost { color: #8a0000; font-weight: 600; }
#flame svg, #peak svg { max-width: 100%; height: auto; }
#flame #search, #flame #matched, #flame #unzoom { display: none; }
#peak #peak-search, #peak #peak-matched, #peak #peak-unzoom { display: none; }
#memory-chart { max-width: 100%; height: auto; font-family: system-ui, sans-serif; }
";

/// The page for `profile`.
pub fn render(profile: &Profile) -> anyhow::Result<String> {
    let flame = flamegraph::svg(profile, Metric::InUse, false)?;
    let peak = flamegraph::svg(profile, Metric::AtPeak, false)?;
    // Its ids apart from the first one's: one page, each id once.
    let peak = inline_svg(&peak)
        .replace(" id=\"", " id=\"peak-")
        .replace("url(#", "url(#peak-");
    Ok(page(profile, &inline_svg(&flame), &peak))
}

/// The page, with `flame_svg` and `peak_svg` (already fit to be inlined) as the flamegraphs
/// of in-use bytes and of bytes at the peak.
fn page(profile: &Profile, flame_svg: &str, peak_svg: &str) -> String {
    let mut h = String::new();
    let command = profile.command.join(" ");
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>memprof: pid {} {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        profile.pid,
        escape(&command)
    );
    header(&mut h, profile);
    h.push_str("<section id=\"memory\">\n<h2>Memory over time</h2>\n");
    h.push_str(&timeline_chart(&profile.timeline, profile.duration_s));
    h.push_str("</section>\n");
    if !profile.rss_timeline.is_empty() {
        h.push_str("<section id=\"rss\">\n<h2>RSS explained</h2>\n");
        h.push_str(&rss_chart(&profile.rss_timeline, profile.duration_s));
        h.push_str("</section>\n");
    }
    sites_table(&mut h, &profile.sites);
    let _ = write!(
        h,
        "<section id=\"flame\">\n<h2>In-use bytes by call stack</h2>\n{flame_svg}\n</section>\n"
    );
    let peak = &profile.report.peak;
    let _ = write!(
        h,
        "<section id=\"peak\">\n<h2>At the peak: {} in {} allocations, {:.3} s \
         into the trace</h2>\n{peak_svg}\n</section>\n",
        exact_bytes(peak.bytes),
        peak.allocs,
        peak.at_s
    );
    phases(&mut h, profile);
    recommendations(&mut h, profile);
    h.push_str("</body>\n</html>\n");
    h
}

fn header(h: &mut String, p: &Profile) {
    let r = &p.report;
    let t = &r.totals;
    let _ = write!(
        h,
        "<header>\n<h1>memprof report: pid {}</h1>\n<dl class=\"facts\">\n",
        p.pid
    );
    let mut fact = |name: &str, value: String| {
        let _ = writeln!(h, "<dt>{}</dt><dd>{value}</dd>", escape(name));
    };
    fact(
        "command",
        format!("<code>{}</code>", escape(&p.command.join(" "))),
    );
    fact("duration", format!("{:.2} s", p.duration_s));
    if let Some(s) = r.sampling {
        fact(
            "sampled",
            format!(
                "one allocation per {} on average: counts and bytes are estimates",
                escape(&human_bytes(s.mean_bytes))
            ),
        );
    }
    match (r.exited, r.exit_code) {
        (Some(true), Some(Some(code))) => fact("exit", format!("exited with status {code}")),
        (Some(true), _) => fact("exit", "exited".into()),
        _ => {}
    }
    fact(
        "allocations",
        format!(
            "{} ({})",
            group_digits(t.heap.allocs),
            exact_bytes(t.heap.bytes_allocated)
        ),
    );
    fact(
        "frees",
        format!(
            "{} ({})",
            group_digits(t.heap.frees),
            exact_bytes(t.heap.bytes_freed)
        ),
    );
    fact(
        "outstanding heap",
        format!(
            "{} in {} blocks",
            bytes_cell(t.heap.outstanding_bytes),
            group_digits(t.heap.outstanding_allocs)
        ),
    );
    fact(
        "peak outstanding heap",
        bytes_cell(t.heap.peak_outstanding_bytes),
    );
    fact(
        "outstanding mmap",
        format!(
            "{} in {} mappings",
            bytes_cell(r.mmap.outstanding_bytes),
            group_digits(r.mmap.outstanding_maps)
        ),
    );
    if let Some(rss) = r.rss_bytes {
        fact("RSS", bytes_cell(rss));
    }
    if let Some(e) = &r.rss_explained {
        fact(
            "RSS explained",
            format!(
                "live {}, retained by the allocator {}, other {}; allocated, never touched {}",
                bytes_cell(e.live_resident_bytes),
                bytes_cell(e.allocator_retained_bytes),
                bytes_cell(e.other_resident_bytes),
                bytes_cell(e.untouched_live_bytes)
            ),
        );
    }
    if let Some(rate) = r.growth_rate_mb_per_hour {
        fact("heap growth", format!("{rate:.3} MB/hour"));
    }
    fact(
        "leak detected",
        if r.leak_detected { "yes" } else { "no" }.into(),
    );
    let lost = |n: u64| {
        if n > 0 {
            format!("<span class=\"lost\">{}</span>", group_digits(n))
        } else {
            "0".into()
        }
    };
    fact("lost events", lost(t.lost_events));
    fact("allocations without a stack", lost(t.lost_stacks));
    fact("unmatched frees", group_digits(t.heap.unmatched_frees));
    h.push_str("</dl>\n</header>\n");
}

/// RSS explained over time: live, retained and other resident bytes stacked (their top is
/// RSS), against seconds, as an inline SVG.
pub fn rss_chart(points: &[RssPoint], duration_s: f64) -> String {
    const W: f64 = 900.0;
    const H: f64 = 280.0;
    const LEFT: f64 = 90.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 30.0;
    const BOTTOM: f64 = 40.0;
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let t_max = points
        .iter()
        .map(|p| finite(p.t_s))
        .fold(finite(duration_s), f64::max)
        .max(1e-3);
    let y_max = points
        .iter()
        .map(|p| p.rss.parts_bytes().max(p.rss.rss_bytes))
        .max()
        .unwrap_or(0)
        .max(1) as f64
        * 1.05;
    let x = |t: f64| LEFT + finite(t).clamp(0.0, t_max) / t_max * (W - LEFT - RIGHT);
    let y = |v: u64| H - BOTTOM - v as f64 / y_max * (H - TOP - BOTTOM);
    let mut s = format!(
        "<svg id=\"rss-chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" \
         height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"RSS explained over \
         time\">\n<rect x=\"0\" y=\"0\" width=\"{W}\" height=\"{H}\" fill=\"#fafafa\"/>\n"
    );
    let _ = writeln!(
        s,
        "<line x1=\"{LEFT}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#888\"/>",
        b = H - BOTTOM,
        r = W - RIGHT
    );
    for i in 0..=4 {
        let v = (y_max / 1.05 * f64::from(i) / 4.0) as u64;
        let t = t_max * f64::from(i) / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>\
             <text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{t:.2} s</text>",
            LEFT - 6.0,
            y(v) + 4.0,
            escape(&human_bytes(v)),
            x(t),
            H - BOTTOM + 16.0
        );
    }
    // Bands from the bottom: live, retained, other; each between the running sums.
    type Band = (&'static str, &'static str, fn(&RssPoint) -> u64);
    let bands: [Band; 3] = [
        ("live", "#2b6cd9", |p| p.rss.live_resident_bytes),
        ("retained", "#d9822b", |p| p.rss.allocator_retained_bytes),
        ("other", "#9a9a9a", |p| p.rss.other_resident_bytes),
    ];
    let mut below = vec![0u64; points.len()];
    for (k, (class, color, part)) in bands.iter().enumerate() {
        let above: Vec<u64> = points
            .iter()
            .zip(&below)
            .map(|(p, b)| b + part(p))
            .collect();
        let mut coords: Vec<String> = points
            .iter()
            .zip(&above)
            .map(|(p, v)| format!("{:.1},{:.1}", x(p.t_s), y(*v)))
            .collect();
        coords.extend(
            points
                .iter()
                .zip(&below)
                .rev()
                .map(|(p, v)| format!("{:.1},{:.1}", x(p.t_s), y(*v))),
        );
        let _ = writeln!(
            s,
            "<polygon class=\"{class}\" fill=\"{color}\" fill-opacity=\"0.75\" points=\"{}\"/>\
             <rect x=\"{:.1}\" y=\"8\" width=\"12\" height=\"10\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"17\" font-size=\"12\">{class}</text>",
            coords.join(" "),
            LEFT + 12.0 + 110.0 * k as f64,
            LEFT + 30.0 + 110.0 * k as f64,
        );
        below = above;
    }
    s.push_str("</svg>\n");
    s
}

/// The memory chart: heap outstanding bytes and RSS against seconds, as an inline SVG.
pub fn timeline_chart(points: &[TimePoint], duration_s: f64) -> String {
    const W: f64 = 900.0;
    const H: f64 = 320.0;
    const LEFT: f64 = 90.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 20.0;
    const BOTTOM: f64 = 50.0;
    let mut s = format!(
        "<svg id=\"memory-chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"memory over time\">\n\
         <rect x=\"0\" y=\"0\" width=\"{W}\" height=\"{H}\" fill=\"#fafafa\"/>\n"
    );
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let t_max = points
        .iter()
        .map(|p| finite(p.t_s))
        .fold(finite(duration_s), f64::max)
        .max(1e-3);
    let y_max = points
        .iter()
        .flat_map(|p| [p.heap_bytes, p.rss_bytes.unwrap_or(0)])
        .max()
        .unwrap_or(0)
        .max(1) as f64
        * 1.05;
    let x = |t: f64| LEFT + finite(t).clamp(0.0, t_max) / t_max * (W - LEFT - RIGHT);
    let y = |v: f64| H - BOTTOM - v / y_max * (H - TOP - BOTTOM);
    // Axes and grid.
    let _ = writeln!(
        s,
        "<line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/>\
         <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{}\" stroke=\"#888\"/>",
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM,
        H - BOTTOM
    );
    for i in 0..=4 {
        let v = y_max / 1.05 * i as f64 / 4.0;
        let yy = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" y1=\"{yy:.1}\" x2=\"{}\" y2=\"{yy:.1}\" stroke=\"#e4e4e4\"/>\
             <text x=\"{}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            escape(&human_bytes(v as u64))
        );
        let t = t_max * i as f64 / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{t:.2} s</text>",
            x(t),
            H - BOTTOM + 16.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">seconds since the trace started</text>",
        LEFT + (W - LEFT - RIGHT) / 2.0,
        H - 8.0
    );
    if points.is_empty() {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"14\" text-anchor=\"middle\">no samples were taken</text>",
            LEFT + (W - LEFT - RIGHT) / 2.0,
            H / 2.0
        );
    } else {
        let line = |values: Vec<(f64, u64)>| -> String {
            values
                .iter()
                .map(|&(t, v)| format!("{:.1},{:.1}", x(t), y(v as f64)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let rss: Vec<(f64, u64)> = points
            .iter()
            .filter_map(|p| p.rss_bytes.map(|r| (p.t_s, r)))
            .collect();
        if !rss.is_empty() {
            let _ = writeln!(
                s,
                "<polyline class=\"rss\" fill=\"none\" stroke=\"#d9822b\" stroke-width=\"2\" points=\"{}\"/>",
                line(rss)
            );
        }
        let heap: Vec<(f64, u64)> = points.iter().map(|p| (p.t_s, p.heap_bytes)).collect();
        let _ = writeln!(
            s,
            "<polyline class=\"heap\" fill=\"none\" stroke=\"#2b6cd9\" stroke-width=\"2\" points=\"{}\"/>",
            line(heap)
        );
    }
    // Legend.
    let _ = writeln!(
        s,
        "<rect x=\"{}\" y=\"{TOP}\" width=\"12\" height=\"3\" fill=\"#2b6cd9\"/>\
         <text x=\"{}\" y=\"{}\" font-size=\"12\">heap outstanding</text>\
         <rect x=\"{}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"#d9822b\"/>\
         <text x=\"{}\" y=\"{}\" font-size=\"12\">RSS</text>",
        LEFT + 12.0,
        LEFT + 30.0,
        TOP + 5.0,
        LEFT + 160.0,
        TOP,
        LEFT + 178.0,
        TOP + 5.0
    );
    s.push_str("</svg>\n");
    s
}

fn sites_table(h: &mut String, sites: &[Site]) {
    let _ = writeln!(
        h,
        "<section id=\"sites\">\n<h2>Top call sites ({} of {})</h2>",
        sites.len().min(TOP_SITES),
        sites.len()
    );
    if sites.is_empty() {
        h.push_str("<p>No allocations were traced.</p>\n</section>\n");
        return;
    }
    h.push_str(
        "<table>\n<thead><tr><th>site</th><th>allocator</th><th>verdict</th>\
         <th class=\"num\">in use</th><th class=\"num\">blocks</th>\
         <th class=\"num\">allocated</th><th class=\"num\">allocs</th><th class=\"num\">frees</th>\
         <th class=\"num\">max in use</th><th class=\"num\">growth</th><th>stack</th></tr></thead>\n<tbody>\n",
    );
    for site in sites.iter().take(TOP_SITES) {
        let verdict = site.verdict.as_str();
        let reason = site
            .verdict_reason
            .map_or(String::new(), |r| format!(" title=\"{}\"", escape(r)));
        let growth = if site.growth_bytes_per_s.is_finite() {
            format!("{:.1} B/s", site.growth_bytes_per_s)
        } else {
            String::new()
        };
        let _ = writeln!(
            h,
            "<tr><td><code>{}</code></td><td>{} ({})</td>\
             <td><span class=\"verdict v-{verdict}\"{reason}>{verdict}</span></td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td>{}</td></tr>",
            escape(&site_name(site)),
            escape(site.allocator),
            escape(site.kind),
            match site.resident_bytes {
                Some(r) => format!(
                    "{}<br><small class=\"resident\">{} resident</small>",
                    bytes_cell(site.inuse_bytes),
                    bytes_cell(r)
                ),
                None => bytes_cell(site.inuse_bytes),
            },
            group_digits(site.inuse_objects),
            bytes_cell(site.alloc_bytes),
            group_digits(site.alloc_objects),
            group_digits(site.frees),
            bytes_cell(site.max_inuse_bytes),
            escape(&growth),
            stack_details(site)
        );
    }
    h.push_str("</tbody>\n</table>\n</section>\n");
}

fn stack_details(site: &Site) -> String {
    if site.stack.is_empty() {
        return "<span class=\"where\">no stack</span>".into();
    }
    let mut s = format!(
        "<details><summary>{} frames</summary><ol>",
        site.stack.len()
    );
    for f in &site.stack {
        let mut place = String::new();
        if let (Some(file), Some(line)) = (&f.file, f.line) {
            place = format!(" {}:{line}", escape(file));
        }
        if let Some(module) = &f.module {
            let _ = write!(place, " in {}", escape(module));
        }
        let _ = write!(
            s,
            "<li><code>{}</code> <span class=\"where\">{}{place}</span></li>",
            escape(&frame_name(f)),
            f.offset.map(|o| format!("{o:#x}")).unwrap_or_default()
        );
    }
    s.push_str("</ol></details>");
    s
}

fn phases(h: &mut String, p: &Profile) {
    let phases = &p.report.phases;
    if phases.is_empty() {
        return;
    }
    h.push_str(
        "<section id=\"phases\">\n<h2>Phases</h2>\n<table>\n<thead><tr><th>phase</th><th>kind</th>\
         <th class=\"num\">allocs</th><th class=\"num\">frees</th><th class=\"num\">allocated</th>\
         <th class=\"num\">freed</th><th class=\"num\">net</th><th class=\"num\">peak net</th>\
         <th class=\"num\">entries</th></tr></thead>\n<tbody>\n",
    );
    for ph in phases {
        let signed = |b: i64| {
            let sign = if b < 0 { "-" } else { "" };
            format!("{sign}{}", exact_bytes(b.unsigned_abs()))
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&ph.name),
            escape(ph.kind),
            group_digits(ph.allocs),
            group_digits(ph.frees),
            exact_bytes(ph.bytes_allocated),
            exact_bytes(ph.bytes_freed),
            signed(ph.net_bytes),
            signed(ph.peak_net_bytes),
            group_digits(ph.entries)
        );
    }
    h.push_str("</tbody>\n</table>\n</section>\n");
}

fn recommendations(h: &mut String, p: &Profile) {
    let recs = &p.report.recommendations;
    if recs.is_empty() {
        return;
    }
    h.push_str("<section id=\"advice\">\n<h2>Recommendations</h2>\n<ul>\n");
    for r in recs {
        let _ = writeln!(
            h,
            "<li><strong>{}</strong> <code>{}</code>: {}</li>",
            escape(r.kind),
            escape(&r.site),
            escape(&r.message)
        );
    }
    h.push_str("</ul>\n</section>\n");
}

/// inferno's SVG made fit to sit inside the page: no XML prolog, doctype or comments, no
/// script and no `onload` (the static graph keeps each frame's `<title>` tooltip).
pub fn inline_svg(svg: &str) -> String {
    let mut s = match svg.find("<svg") {
        Some(i) => svg[i..].to_owned(),
        None => return String::new(),
    };
    for (open, close) in [("<!--", "-->"), ("<script", "</script>")] {
        while let Some(start) = s.find(open) {
            match s[start..].find(close) {
                Some(len) => s.replace_range(start..start + len + close.len(), ""),
                None => {
                    s.truncate(start);
                    break;
                }
            }
        }
    }
    s.replace(" onload=\"init(evt)\"", "")
}

#[cfg(test)]
mod tests;
