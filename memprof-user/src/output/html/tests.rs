use super::*;
use crate::report::{Phase, PhaseReport, Recommendation, sample::sample_profile};

#[test]
fn digits_and_bytes() {
    assert_eq!(group_digits(0), "0");
    assert_eq!(group_digits(999), "999");
    assert_eq!(group_digits(21000), "21,000");
    assert_eq!(group_digits(1234567), "1,234,567");
    assert_eq!(exact_bytes(21000), "21,000 B");
}

#[test]
fn page_has_everything_escaped() {
    let mut p = sample_profile();
    p.report.phases.push(Phase::from(PhaseReport {
        name: "load<x>".into(),
        kind: "mark",
        allocs: 3,
        frees: 1,
        bytes_allocated: 3000,
        bytes_freed: 1000,
        net_bytes: 2000,
        peak_net_bytes: 2500,
        outstanding_bytes: 2000,
        outstanding_allocs: 2,
        peak_outstanding_bytes: 9000,
        entries: 1,
        start_s: Some(0.0),
        end_s: Some(1.0),
    }));
    p.report.recommendations.push(Recommendation {
        kind: "leak",
        site: "leak_widgets".into(),
        message: "grows by 1.5 KB/s & holds <21 KB>".into(),
        evidence: serde_json::Value::Null,
    });
    let html = render(&p).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("<code>./outputs &lt;b&gt;&amp;co</code>"));
    assert!(!html.contains("<b>&co"));
    assert!(html.contains("<code>leak_widgets</code>"));
    assert!(html.contains(">21,000 B<"));
    assert!(html.contains("map&lt;int, &quot;q&quot;&gt;::grow;now"));
    assert!(html.contains("<svg id=\"memory-chart\""));
    assert!(html.contains("class=\"heap\"") && html.contains("class=\"rss\""));
    assert!(html.contains("<details><summary>3 frames</summary>"));
    assert!(html.contains("<title>leak_widgets (21,000 bytes"));
    assert!(
        html.contains("load&lt;x&gt;")
            && html.contains("grows by 1.5 KB/s &amp; holds &lt;21 KB&gt;")
    );
    assert!(html.contains("<span class=\"lost\">3</span>"));
    // Self-contained, and the flamegraph is static.
    for needle in [
        "<script",
        "src=",
        "href=",
        "@import",
        "<?xml",
        "<!DOCTYPE svg",
        "onload",
    ] {
        assert!(!html.contains(needle), "page contains {needle}");
    }
    // inferno's gradient fill is the only url(): a reference inside the page.
    assert!(
        html.match_indices("url(")
            .all(|(i, _)| html[i..].starts_with("url(#"))
    );
}

#[test]
fn rss_chart_stacks_the_parts_up_to_rss() {
    let point = |t_s: f64| RssPoint {
        t_s,
        rss: crate::report::RssExplained {
            rss_bytes: 200,
            live_resident_bytes: 100,
            allocator_retained_bytes: 50,
            other_resident_bytes: 50,
            untouched_live_bytes: 1000,
            ..Default::default()
        },
    };
    let svg = rss_chart(&[point(0.0), point(1.0)], 1.0);
    // y_max = 200 x 1.05 = 210 over the 210 px between y 30 and y 240: a byte is a pixel.
    assert!(
        svg.contains("class=\"live\" fill=\"#2b6cd9\" fill-opacity=\"0.75\" points=\"90.0,140.0 880.0,140.0 880.0,240.0 90.0,240.0\""),
        "{svg}"
    );
    assert!(
        svg.contains("class=\"retained\" fill=\"#d9822b\" fill-opacity=\"0.75\" points=\"90.0,90.0 880.0,90.0 880.0,140.0 90.0,140.0\""),
        "{svg}"
    );
    assert!(
        svg.contains("class=\"other\" fill=\"#9a9a9a\" fill-opacity=\"0.75\" points=\"90.0,40.0 880.0,40.0 880.0,90.0 90.0,90.0\""),
        "{svg}"
    );
    let mut p = sample_profile();
    p.sites[0].resident_bytes = Some(16384);
    let html = render(&p).unwrap();
    assert!(
        html.contains(
            "<small class=\"resident\"><span title=\"16.0 KiB\">16,384 B</span> resident</small>"
        ),
        "{html}"
    );
    assert!(
        html.contains("<section id=\"rss\">"),
        "the sample has an RSS timeline"
    );
}

#[test]
fn empty_profile_renders() {
    let mut p = sample_profile();
    p.sites.clear();
    p.timeline.clear();
    p.duration_s = 0.0;
    let html = render(&p).unwrap();
    assert!(html.contains("No allocations were traced."));
    assert!(html.contains("no samples were taken"));
    assert!(html.contains("no in-use bytes to draw"));
    assert!(!html.contains("NaN"));
}

#[test]
fn peak_flamegraph_beside_the_in_use_one() {
    let mut p = sample_profile();
    p.report.peak.bytes = 18064;
    p.report.peak.allocs = 7;
    p.report.peak.at_s = 1.5;
    let html = render(&p).unwrap();
    assert!(html.contains("<h2>At the peak: 18,064 B in 7 allocations, 1.500 s"));
    let peak = &html[html.find("<section id=\"peak\">").unwrap()..];
    assert!(
        peak.contains("leak_widgets"),
        "the site holding bytes at the peak"
    );
    assert!(!peak.contains("churn_buffers"), "nothing at the peak");
    // Each id once on the page.
    let ids: Vec<&str> = html
        .split(" id=\"")
        .skip(1)
        .map(|s| &s[..s.find('"').unwrap()])
        .collect();
    let unique: std::collections::BTreeSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "duplicate ids");
}

#[test]
fn inline_svg_strips_prolog_script_and_comments() {
    let svg = "<?xml version=\"1.0\"?><!DOCTYPE svg><svg onload=\"init(evt)\"><!-- c -->\
               <script type=\"t\"><![CDATA[x]]></script><g/></svg>";
    assert_eq!(inline_svg(svg), "<svg><g/></svg>");
    assert_eq!(inline_svg("garbage"), "");
}
