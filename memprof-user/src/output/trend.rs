//! `memprof trend` as text and as a self-contained HTML page with a chart of outstanding bytes
//! per run for the total and the steepest sites.

use std::fmt::Write as _;

use super::escape;
use crate::{
    analysis::trend::{SiteTrend, Trend},
    report::names::human_bytes,
};

/// Sites drawn in the HTML chart.
const CHART_SITES: usize = 8;

/// A site's name: its innermost frames, outermost last.
fn site_name(s: &SiteTrend) -> String {
    let frames: Vec<&str> = s.stack.iter().take(3).map(String::as_str).collect();
    let mut name = if frames.is_empty() {
        "?".to_string()
    } else {
        frames.join(" < ")
    };
    if s.stack.len() > 3 {
        name.push_str(" < ...");
    }
    name
}

fn signed_bytes(b: f64) -> String {
    let sign = if b < 0.0 { "-" } else { "+" };
    format!("{sign}{}", human_bytes(b.abs().round() as u64))
}

/// The trend as a text table: the total, then the first `top` sites (growing first).
pub fn render(t: &Trend, top: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "memprof trend over {} runs: outstanding heap {} -> {}, {:+.1} B/run (r² {:.3}, {})",
        t.runs.len(),
        human_bytes(t.outstanding_bytes.first().copied().unwrap_or(0)),
        human_bytes(t.outstanding_bytes.last().copied().unwrap_or(0)),
        t.total_slope_bytes_per_run,
        t.total_r2,
        t.total_verdict,
    );
    let growing = t.sites.iter().filter(|s| s.verdict == "growing").count();
    let _ = writeln!(
        out,
        "{} sites, {growing} growing; bytes per run in run order, - where the site is absent\n",
        t.sites.len()
    );
    let _ = writeln!(
        out,
        "{:<10} {:>14} {:>6}  {:<40} runs",
        "verdict", "slope/run", "r²", "site"
    );
    for s in t.sites.iter().take(top) {
        let runs: Vec<String> = s
            .bytes
            .iter()
            .map(|b| b.map_or_else(|| "-".to_string(), |b| b.to_string()))
            .collect();
        let _ = writeln!(
            out,
            "{:<10} {:>14} {:>6.3}  {:<40} {}",
            s.verdict,
            format!("{:+.1} B", s.slope_bytes_per_run),
            s.r2,
            site_name(s),
            runs.join(" ")
        );
    }
    if t.sites.len() > top {
        let _ = writeln!(out, "... {} more sites (--top)", t.sites.len() - top);
    }
    out
}

/// The trend as an HTML page: a line chart (total and the steepest sites) and the table.
pub fn render_html(t: &Trend) -> String {
    let mut h = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>memprof trend</title>\n<style>body{font-family:sans-serif;margin:2em}\
         table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;\
         text-align:right}td.site{text-align:left;font-family:monospace}</style>\n</head>\n<body>\n",
    );
    let _ = writeln!(
        h,
        "<h1>Outstanding heap bytes over {} runs</h1>\n<p>total: {}/run, r² {:.3}, {}</p>",
        t.runs.len(),
        escape(&signed_bytes(t.total_slope_bytes_per_run)),
        t.total_r2,
        t.total_verdict
    );
    let mut series: Vec<(String, Vec<u64>)> =
        vec![("total".to_string(), t.outstanding_bytes.clone())];
    series.extend(t.sites.iter().take(CHART_SITES).map(|s| {
        (
            format!("{} ({})", site_name(s), s.verdict),
            s.bytes.iter().map(|b| b.unwrap_or(0)).collect(),
        )
    }));
    h.push_str(&chart(&series));
    h.push_str(
        "<table id=\"sites\">\n<tr><th>verdict</th><th>slope (B/run)</th><th>r²</th>\
         <th>site</th>",
    );
    for i in 1..=t.runs.len() {
        let _ = write!(h, "<th>run {i}</th>");
    }
    h.push_str("</tr>\n");
    for s in &t.sites {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{:.1}</td><td>{:.3}</td><td class=\"site\">{}</td>",
            s.verdict,
            s.slope_bytes_per_run,
            s.r2,
            escape(&s.stack.join(" < "))
        );
        for b in &s.bytes {
            match b {
                Some(b) => {
                    let _ = write!(h, "<td>{b}</td>");
                }
                None => h.push_str("<td>-</td>"),
            }
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n<h2>Runs</h2>\n<ol>\n");
    for r in &t.runs {
        let _ = writeln!(h, "<li>{}</li>", escape(r));
    }
    h.push_str("</ol>\n</body>\n</html>\n");
    h
}

/// An SVG line chart of bytes per run, one polyline per series.
fn chart(series: &[(String, Vec<u64>)]) -> String {
    const W: f64 = 900.0;
    const H: f64 = 320.0;
    const LEFT: f64 = 90.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 20.0;
    const BOTTOM: f64 = 40.0;
    const COLOURS: [&str; 9] = [
        "#222", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
        "#17becf",
    ];
    let runs = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    let y_max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let x = |i: usize| LEFT + (W - LEFT - RIGHT) * i as f64 / (runs.max(2) - 1) as f64;
    let y = |b: u64| TOP + (H - TOP - BOTTOM) * (1.0 - b as f64 / y_max);
    let mut s = format!(
        "<svg id=\"trend-chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" \
         height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"bytes per run\">\n\
         <rect x=\"0\" y=\"0\" width=\"{W}\" height=\"{H}\" fill=\"#fafafa\"/>\n\
         <text x=\"4\" y=\"{:.1}\" font-size=\"11\">{}</text>\n\
         <text x=\"4\" y=\"{:.1}\" font-size=\"11\">0 B</text>\n",
        TOP + 4.0,
        escape(&human_bytes(y_max as u64)),
        H - BOTTOM,
    );
    for i in 0..runs {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
            x(i),
            H - BOTTOM + 16.0,
            i + 1
        );
    }
    for (k, (name, values)) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, &b)| format!("{:.1},{:.1}", x(i), y(b)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\">\
             <title>{}</title></polyline>",
            points.join(" "),
            escape(name)
        );
    }
    s.push_str("</svg>\n<ul class=\"legend\">\n");
    for (k, (name, _)) in series.iter().enumerate() {
        let _ = writeln!(
            s,
            "<li><span style=\"color:{}\">&#9632;</span> {}</li>",
            COLOURS[k % COLOURS.len()],
            escape(name)
        );
    }
    s.push_str("</ul>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Trend {
        Trend {
            record: "trend",
            runs: vec!["a<1>.json".into(), "b.json".into(), "c.json".into()],
            outstanding_bytes: vec![1000, 4000, 7000],
            total_slope_bytes_per_run: 3000.0,
            total_r2: 1.0,
            total_verdict: "growing",
            sites: vec![
                SiteTrend {
                    stack: vec!["leak<T>".into(), "main".into()],
                    allocator: "libc".into(),
                    kind: "heap".into(),
                    bytes: vec![Some(1000), Some(4000), Some(7000)],
                    allocs: vec![Some(1), Some(4), Some(7)],
                    slope_bytes_per_run: 3000.0,
                    r2: 1.0,
                    verdict: "growing",
                    present_runs: 3,
                },
                SiteTrend {
                    stack: vec!["once".into()],
                    allocator: "libc".into(),
                    kind: "heap".into(),
                    bytes: vec![None, Some(10), None],
                    allocs: vec![None, Some(1), None],
                    slope_bytes_per_run: 0.0,
                    r2: 1.0,
                    verdict: "noisy",
                    present_runs: 1,
                },
            ],
            incomplete_runs: Vec::new(),
        }
    }

    #[test]
    fn text_lists_runs_and_absent_ones() {
        let text = render(&sample(), 20);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("memprof trend over 3 runs: "),
            "{text}"
        );
        assert!(
            lines[0].ends_with("+3000.0 B/run (r² 1.000, growing)"),
            "{text}"
        );
        assert!(
            lines[4].starts_with("growing   ")
                && lines[4].contains("+3000.0 B  1.000  leak<T> < main ")
                && lines[4].ends_with(" 1000 4000 7000"),
            "{text}"
        );
        assert!(
            lines[5].ends_with(" - 10 -") && lines[5].contains("  once "),
            "{text}"
        );
        assert!(render(&sample(), 1).ends_with("... 1 more sites (--top)\n"));
    }

    #[test]
    fn html_escapes_and_draws_every_series() {
        let html = render_html(&sample());
        assert!(html.contains("leak&lt;T&gt; &lt; main"));
        assert!(html.contains("a&lt;1&gt;.json"));
        assert!(!html.contains("leak<T>"));
        assert_eq!(html.matches("<polyline").count(), 3, "total and two sites");
        assert!(html.contains("<td>-</td><td>10</td><td>-</td>"));
    }
}
