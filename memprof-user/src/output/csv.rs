//! `--csv FILE`: one row per call site, for spreadsheets and scripts.
//!
//! RFC 4180: a header line, then one record per [`Site`] in the profile's order (most in-use
//! bytes first), lines ending in CRLF; a field holding a comma, a double quote, CR or LF is
//! quoted, with its double quotes doubled. Columns:
//!
//! | column | value |
//! | --- | --- |
//! | `site` | the innermost named function (else `module+0xADDR`, else `[unknown]`) |
//! | `module` | that frame's module path (empty when not known) |
//! | `allocator`, `kind` | `malloc`, `calloc`, ..., `mmap`; `heap` or `mmap` |
//! | `inuse_bytes`, `inuse_objects` | still allocated at the end of the trace |
//! | `alloc_bytes`, `alloc_objects` | allocated during the trace |
//! | `frees` | frees of the site's blocks |
//! | `max_inuse_bytes` | the most the site held at once |
//! | `verdict`, `growth_bytes_per_s` | the growth analysis (`leak`, `growing`, ...) |
//! | `stack` | frame names, innermost first, joined by ` <- ` |
//! | `resident_bytes` | of `inuse_bytes`, those in resident pages (empty when RSS was not explained: the process had exited, or the trace was sampled) |
//!
//! Names come from the traced programs: a text field (`site`, `module`, `stack`) that begins
//! with `=`, `+`, `-`, `@`, a tab or CR, which a spreadsheet would take for a formula, is
//! written with a leading `'` (OWASP's advice against CSV injection).

use std::fmt::Write as _;

use crate::report::{
    Profile, Site,
    names::{frame_name, site_frame, site_name},
};

/// The header's column names.
pub const COLUMNS: [&str; 14] = [
    "site",
    "module",
    "allocator",
    "kind",
    "inuse_bytes",
    "inuse_objects",
    "alloc_bytes",
    "alloc_objects",
    "frees",
    "max_inuse_bytes",
    "verdict",
    "growth_bytes_per_s",
    "stack",
    "resident_bytes",
];

/// The CSV file for `profile`.
pub fn render(profile: &Profile) -> String {
    let mut out = String::new();
    push_record(&mut out, COLUMNS.iter().map(|c| c.to_string()));
    for site in &profile.sites {
        push_record(&mut out, row(site));
    }
    out
}

/// A site's fields, in [`COLUMNS`] order.
pub fn row(site: &Site) -> [String; 14] {
    let module = site_frame(site)
        .and_then(|f| f.module.clone())
        .unwrap_or_default();
    let stack = if site.stack.is_empty() {
        "[unknown]".to_owned()
    } else {
        site.stack
            .iter()
            .map(frame_name)
            .collect::<Vec<_>>()
            .join(" <- ")
    };
    [
        neutral(site_name(site)),
        neutral(module),
        site.allocator.to_owned(),
        site.kind.to_owned(),
        site.inuse_bytes.to_string(),
        site.inuse_objects.to_string(),
        site.alloc_bytes.to_string(),
        site.alloc_objects.to_string(),
        site.frees.to_string(),
        site.max_inuse_bytes.to_string(),
        site.verdict.as_str().to_owned(),
        number(site.growth_bytes_per_s),
        neutral(stack),
        site.resident_bytes
            .map(|b| b.to_string())
            .unwrap_or_default(),
    ]
}

/// A text field a spreadsheet will not evaluate: `'` before a leading `= + - @`, tab or CR.
pub fn neutral(field: String) -> String {
    if field.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{field}")
    } else {
        field
    }
}

/// A rate as written: finite numbers as Rust prints them (`1500.25`, `0`), anything else empty.
fn number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        String::new()
    }
}

fn push_record(out: &mut String, fields: impl IntoIterator<Item = String>) {
    for (i, field) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{}", quote(&field));
    }
    out.push_str("\r\n");
}

/// `field` as an RFC 4180 field: quoted when it holds `,`, `"`, CR or LF.
pub fn quote(field: &str) -> std::borrow::Cow<'_, str> {
    if field.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\"")).into()
    } else {
        field.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::sample::sample_profile;

    /// A minimal RFC 4180 reader, to check that what is written reads back.
    fn parse(text: &str) -> Vec<Vec<String>> {
        let mut records = Vec::new();
        let mut record = Vec::new();
        let mut field = String::new();
        let mut chars = text.chars().peekable();
        let mut quoted = false;
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                (true, '"') => quoted = false,
                (true, c) => field.push(c),
                (false, '"') => quoted = true,
                (false, ',') => record.push(std::mem::take(&mut field)),
                (false, '\r') => {}
                (false, '\n') => {
                    record.push(std::mem::take(&mut field));
                    records.push(std::mem::take(&mut record));
                }
                (false, c) => field.push(c),
            }
        }
        records
    }

    #[test]
    fn formulas_are_neutralised() {
        for (from, to) in [
            (
                "=HYPERLINK(\"http://x\",\"y\")",
                "'=HYPERLINK(\"http://x\",\"y\")",
            ),
            ("+cmd", "'+cmd"),
            ("-2+3", "'-2+3"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("\rx", "'\rx"),
            ("main", "main"),
            ("", ""),
        ] {
            assert_eq!(neutral(from.to_string()), to);
        }
        let mut p = sample_profile();
        p.sites[0].stack[0].function = Some("=HYPERLINK(\"http://evil\")".into());
        let rows = parse(&render(&p));
        assert_eq!(rows[1][0], "'=HYPERLINK(\"http://evil\")");
        assert!(rows[1][12].starts_with("'=HYPERLINK"), "{:?}", rows[1]);
        // Numbers memprof writes keep their sign.
        p.sites[0].growth_bytes_per_s = -2.5;
        assert_eq!(parse(&render(&p))[1][11], "-2.5");
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("plain"), "plain");
        assert_eq!(quote("a,b"), "\"a,b\"");
        assert_eq!(quote("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(quote("two\nlines"), "\"two\nlines\"");
        assert_eq!(quote(""), "");
    }

    #[test]
    fn rows_read_back() {
        let p = sample_profile();
        let text = render(&p);
        assert!(text.ends_with("\r\n"));
        let rows = parse(&text);
        assert_eq!(rows.len(), 1 + p.sites.len());
        assert_eq!(rows[0], COLUMNS);
        assert!(rows.iter().all(|r| r.len() == COLUMNS.len()), "{rows:?}");
        assert_eq!(
            rows[1],
            [
                "leak_widgets",
                "/opt/app",
                "malloc",
                "heap",
                "21000",
                "7",
                "21000",
                "7",
                "0",
                "21000",
                "leak",
                "1500.25",
                "leak_widgets <- main <- libc.so.6+0x27234",
                "",
            ]
        );
        // The name with a comma and quotes survives the round trip.
        assert_eq!(rows[2][0], "map<int, \"q\">::grow;now");
        assert_eq!(rows[2][12], "map<int, \"q\">::grow;now <- main");
        // No stack: named [unknown], module empty.
        assert_eq!(&rows[3][..4], ["[unknown]", "", "calloc", "heap"]);
        assert_eq!(rows[4][8], "210");
        let mut p = sample_profile();
        p.sites[0].resident_bytes = Some(16384);
        assert_eq!(parse(&render(&p))[1][13], "16384");
    }

    #[test]
    fn empty_profile_is_header_only() {
        let mut p = sample_profile();
        p.sites.clear();
        assert_eq!(parse(&render(&p)), vec![COLUMNS.to_vec()]);
        assert_eq!(number(f64::NAN), "");
    }
}
