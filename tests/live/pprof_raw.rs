//! `go tool pprof` run against memprof's live profile endpoints, and its `-raw` listing read
//! back: samples (values, innermost function, labels) and mappings.

use std::{collections::BTreeMap, process::Command};

use crate::common::tool;

/// `go tool pprof -symbolize=none ARGS URL`: its stdout, or its output on failure.
pub(crate) fn go_pprof(args: &[&str], url: &str) -> Result<String, String> {
    let go = tool("GO", "go");
    let out = Command::new(&go)
        .args(["tool", "pprof", "-symbolize=none"])
        .args(args)
        .arg(url)
        // pprof keeps a copy of what it fetched under $PPROF_TMPDIR (default ~/pprof).
        .env("PPROF_TMPDIR", std::env::temp_dir())
        .output()
        .map_err(|e| format!("cannot run {go} tool pprof: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("go tool pprof {args:?} {url}: {stdout}{stderr}"))
    }
}

#[derive(Debug, Default)]
pub(crate) struct RawSample {
    pub(crate) values: Vec<i64>,
    /// The innermost location's function.
    pub(crate) function: String,
    pub(crate) labels: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
pub(crate) struct RawProfile {
    pub(crate) samples: Vec<RawSample>,
    /// (file, build id) of each mapping.
    pub(crate) mappings: Vec<(String, String)>,
}

impl RawProfile {
    /// Reads `go tool pprof -raw` output.
    pub(crate) fn parse(text: &str) -> RawProfile {
        #[derive(PartialEq)]
        enum Part {
            Head,
            Samples,
            Locations,
            Mappings,
        }
        let mut part = Part::Head;
        let mut p = RawProfile::default();
        let mut innermost: Vec<u64> = Vec::new();
        let mut functions: BTreeMap<u64, String> = BTreeMap::new();
        for line in text.lines() {
            match line.trim_end() {
                "Samples:" => part = Part::Samples,
                "Locations" => part = Part::Locations,
                "Mappings" => part = Part::Mappings,
                l => match part {
                    Part::Head => {}
                    Part::Samples => {
                        let t = l.trim();
                        if t.contains(":[") {
                            let s = p.samples.last_mut().expect("labels after a sample");
                            for pair in t.split("] ").map(|x| x.trim_end_matches(']')) {
                                if let Some((k, v)) = pair.split_once(":[") {
                                    s.labels.insert(k.to_string(), v.to_string());
                                }
                            }
                        } else if let Some((values, locations)) = t.split_once(':')
                            && values.split_whitespace().all(|v| v.parse::<i64>().is_ok())
                        {
                            p.samples.push(RawSample {
                                values: values
                                    .split_whitespace()
                                    .map(|v| v.parse().unwrap())
                                    .collect(),
                                ..RawSample::default()
                            });
                            innermost.push(
                                locations
                                    .split_whitespace()
                                    .next()
                                    .and_then(|id| id.parse().ok())
                                    .unwrap_or(0),
                            );
                        }
                    }
                    Part::Locations => {
                        let t: Vec<&str> = l.split_whitespace().collect();
                        if let [id, _address, rest @ ..] = t.as_slice()
                            && let Some(id) = id.strip_suffix(':').and_then(|i| i.parse().ok())
                        {
                            let name = match rest {
                                [m, f, ..] if m.starts_with("M=") => f,
                                [f, ..] => f,
                                [] => "",
                            };
                            functions.insert(id, name.to_string());
                        }
                    }
                    Part::Mappings => {
                        let t: Vec<&str> = l.split_whitespace().collect();
                        if let [_id, _range, file, build_id, ..] = t.as_slice() {
                            p.mappings.push((file.to_string(), build_id.to_string()));
                        }
                    }
                },
            }
        }
        for (s, id) in p.samples.iter_mut().zip(innermost) {
            s.function = functions.get(&id).cloned().unwrap_or_default();
        }
        p
    }

    /// The samples of process `pid`.
    pub(crate) fn of(&self, pid: u32) -> impl Iterator<Item = &RawSample> {
        let pid = pid.to_string();
        self.samples
            .iter()
            .filter(move |s| s.labels.get("pid") == Some(&pid))
    }

    /// The distinct `pid` labels.
    pub(crate) fn pids(&self) -> std::collections::BTreeSet<u32> {
        self.samples
            .iter()
            .filter_map(|s| s.labels.get("pid")?.parse().ok())
            .collect()
    }
}

#[test]
fn raw_listings_are_read() {
    let text = "PeriodType: space bytes\nSamples:\n\
        alloc_objects/count alloc_space/bytes inuse_objects/count inuse_space/bytes[dflt]\n\
        \x20         1     100000          1     100000: 2 3 \n\
        \x20               allocator:[malloc] cgroup:[/a b] comm:[steady] kind:[heap] pid:[42]\n\
        Locations\n\
        \x20    2: 0x100000011a7 M=1 hold_table /src/steady.c:23 s=0\n\
        \x20    3: 0x100000012c2 M=1 main /src/steady.c:54 s=0\n\
        Mappings\n\
        1: 0x10000000000/0x100000012c8/0x0 /tmp/steady 47ea35 [FN][FL][LN]\n";
    let p = RawProfile::parse(text);
    assert_eq!(p.samples.len(), 1);
    let s = &p.samples[0];
    assert_eq!(s.values, [1, 100000, 1, 100000]);
    assert_eq!(s.function, "hold_table");
    assert_eq!(s.labels["cgroup"], "/a b");
    assert_eq!(s.labels["pid"], "42");
    assert_eq!(
        p.mappings,
        [("/tmp/steady".to_string(), "47ea35".to_string())]
    );
}
