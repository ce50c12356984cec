//! CSV: read back by an RFC 4180 reader.

use super::{
    INUSE_BYTES, LEAK_BLOCKS, LEAK_BYTES, LEAK_FN, SITES, TOTAL_ALLOCS, TOTAL_BYTES, TOTAL_FREES,
    trace,
};

/// An RFC 4180 reader: quoted fields (with "" for a quote, commas and line breaks inside),
/// CRLF or LF record ends.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
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
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(
        field.is_empty() && record.is_empty(),
        "unterminated last record"
    );
    records
}

#[test]
fn csv_rows_exact() {
    let t = trace();
    let text = t.read("sites.csv");
    assert!(text.ends_with("\r\n"), "RFC 4180 line ends");
    let rows = parse_csv(&text);
    let header = &rows[0];
    assert_eq!(
        header,
        &[
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
        ]
    );
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let num = |row: &[String], name: &str| -> u64 {
        row[col(name)]
            .parse()
            .unwrap_or_else(|_| panic!("{name} in {row:?}"))
    };
    for row in &rows[1..] {
        assert_eq!(row.len(), header.len(), "{row:?}");
    }
    let leak: Vec<&Vec<String>> = rows[1..].iter().filter(|r| r[0] == LEAK_FN).collect();
    assert_eq!(leak.len(), 1, "{rows:?}");
    let leak = leak[0];
    assert!(leak[col("module")].ends_with("/outputs"), "{leak:?}");
    assert_eq!(leak[col("allocator")], "malloc");
    assert_eq!(leak[col("kind")], "heap");
    for (name, want) in [
        ("inuse_bytes", LEAK_BYTES),
        ("inuse_objects", LEAK_BLOCKS),
        ("alloc_bytes", LEAK_BYTES),
        ("alloc_objects", LEAK_BLOCKS),
        ("frees", 0),
        ("max_inuse_bytes", LEAK_BYTES),
    ] {
        assert_eq!(num(leak, name), want, "{name}: {leak:?}");
    }
    assert_eq!(
        leak[col("verdict")],
        t.verdict(LEAK_FN),
        "verdict as in the report"
    );
    assert!(leak[col("growth_bytes_per_s")].parse::<f64>().unwrap() > 0.0);
    assert!(
        leak[col("stack")].starts_with("leak_widgets <- main <- "),
        "{leak:?}"
    );
    // Every site adds up to the fixture's numbers, and the file to the report's totals.
    for (function, bytes, blocks, inuse_bytes, _) in SITES {
        let sum = |name: &str| -> u64 {
            rows[1..]
                .iter()
                .filter(|r| r[0] == function)
                .map(|r| num(r, name))
                .sum()
        };
        assert_eq!(sum("alloc_bytes"), bytes, "{function}");
        assert_eq!(sum("alloc_objects"), blocks, "{function}");
        assert_eq!(sum("inuse_bytes"), inuse_bytes, "{function}");
    }
    let total = |name: &str| rows[1..].iter().map(|r| num(r, name)).sum::<u64>();
    assert_eq!(total("alloc_objects"), TOTAL_ALLOCS);
    assert_eq!(total("alloc_bytes"), TOTAL_BYTES);
    assert_eq!(total("frees"), TOTAL_FREES);
    assert_eq!(total("inuse_bytes"), INUSE_BYTES);
}
