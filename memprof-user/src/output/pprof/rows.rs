//! The profile built from rows: each row a stack, its values in the profile's sample-type
//! order and its labels. `--pprof FILE` writes one row per site; the live endpoints
//! (`/debug/pprof/heap`) one per site of each process, labelled with the process.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{SystemTime, UNIX_EPOCH},
};

use super::proto::{Function, Label, Line, Location, Mapping, PbProfile, Sample, ValueType};
use crate::report::{
    Frame,
    names::{base_name, frame_name},
};

/// One sample: a stack (innermost frame first; empty when none was captured), its values and
/// its string labels.
pub struct Row<'a> {
    pub stack: &'a [Frame],
    pub values: Vec<i64>,
    pub labels: Vec<(&'static str, &'a str)>,
}

/// What a profile says besides its samples.
pub struct Header<'a> {
    pub sample_types: &'a [(&'a str, &'a str)],
    pub default_sample_type: &'a str,
    pub comment: Vec<String>,
    /// The traced program (its first argument), to tell the executable's mapping when no frame
    /// is `main`.
    pub program: Option<&'a str>,
    pub start: SystemTime,
    pub duration_ns: i64,
}

/// Interns strings: index 0 is always "".
#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Self::default();
        s.get("");
        s
    }

    fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }
}

/// Where module `i` (0-based, in mapping order) is laid out: its locations' addresses are this
/// plus their file offsets.
pub fn module_base(i: usize) -> u64 {
    (i as u64 + 1) << 40
}

/// What the frames of one module tell about its mapping.
struct ModuleSpan {
    /// Highest file offset of a frame in it.
    high: u64,
    build_id: Option<String>,
    files: bool,
    lines: bool,
    inlined: bool,
}

/// Builds the (uncompressed) profile of `rows`.
pub fn build_rows(rows: &[Row<'_>], header: &Header<'_>) -> PbProfile {
    let mut strings = Strings::new();
    let sample_type = header
        .sample_types
        .iter()
        .map(|(t, u)| ValueType {
            r#type: strings.get(t),
            unit: strings.get(u),
        })
        .collect();

    // Mappings first, so that locations can name them: one per module. pprof takes the first
    // mapping for the main binary, so the executable comes first (see `main_first`), then the
    // others in path order.
    let mut spans: BTreeMap<&str, ModuleSpan> = BTreeMap::new();
    for frame in rows.iter().flat_map(|r| r.stack) {
        let Some(module) = frame.module.as_deref() else {
            continue;
        };
        let span = spans.entry(module).or_insert(ModuleSpan {
            high: 0,
            build_id: None,
            files: false,
            lines: false,
            inlined: false,
        });
        span.high = span.high.max(frame.offset.unwrap_or(0));
        if span.build_id.is_none() {
            span.build_id.clone_from(&frame.build_id);
        }
        span.files |= frame.file.is_some();
        span.lines |= frame.line.is_some();
        span.inlined |= frame.inlined;
    }
    let holding_main: HashSet<&str> = rows
        .iter()
        .flat_map(|r| r.stack)
        .filter(|f| f.function.as_deref() == Some("main"))
        .filter_map(|f| f.module.as_deref())
        .collect();
    let mut ordered: Vec<(&str, &ModuleSpan)> = spans.iter().map(|(m, s)| (*m, s)).collect();
    ordered.sort_by_key(|(module, _)| main_first(&holding_main, header.program, module));
    // Mapping id and base address of each module.
    let mut mapping_of: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut mapping = Vec::new();
    for (i, (module, span)) in ordered.into_iter().enumerate() {
        let id = i as u64 + 1;
        let base = module_base(i);
        mapping_of.insert(module, (id, base));
        mapping.push(Mapping {
            id,
            memory_start: base,
            memory_limit: base + span.high + 1,
            file_offset: 0,
            filename: strings.get(module),
            build_id: span.build_id.as_deref().map_or(0, |b| strings.get(b)),
            has_functions: true,
            has_filenames: span.files,
            has_line_numbers: span.lines,
            has_inline_frames: span.inlined,
        });
    }

    let mut functions: Vec<Function> = Vec::new();
    let mut function_ids: HashMap<(String, Option<String>), u64> = HashMap::new();
    let mut function_of = |frame: Option<&Frame>, strings: &mut Strings| -> u64 {
        let name = frame.map_or_else(|| "[unknown]".to_owned(), frame_name);
        let file = frame.and_then(|f| f.file.clone());
        *function_ids
            .entry((name.clone(), file.clone()))
            .or_insert_with(|| {
                let id = functions.len() as u64 + 1;
                let name = strings.get(&name);
                functions.push(Function {
                    id,
                    name,
                    system_name: name,
                    filename: file.as_deref().map_or(0, |f| strings.get(f)),
                    start_line: 0,
                });
                id
            })
    };
    let mut locations: Vec<Location> = Vec::new();
    // (mapping, address, lines as (function, line)) -> location id
    type LocationKey = (u64, u64, Vec<(u64, i64)>);
    let mut location_ids: HashMap<LocationKey, u64> = HashMap::new();
    // The location of `frame` (None: a site without a stack), with the functions inlined into
    // it, innermost first.
    let mut location_of =
        |frame: Option<&Frame>, inlined: &[&Frame], strings: &mut Strings| -> u64 {
            let line: Vec<Line> = inlined
                .iter()
                .copied()
                .map(Some)
                .chain([frame])
                .map(|f| Line {
                    function_id: function_of(f, strings),
                    line: f.and_then(|f| f.line).map_or(0, i64::from),
                })
                .collect();
            let (mapping_id, address) = match frame.and_then(|f| Some((f.module.as_deref()?, f))) {
                Some((module, f)) => {
                    let (id, base) = mapping_of[module];
                    (id, base + f.offset.unwrap_or(0))
                }
                None => (0, 0),
            };
            let key = (
                mapping_id,
                address,
                line.iter().map(|l| (l.function_id, l.line)).collect(),
            );
            if let Some(&id) = location_ids.get(&key) {
                return id;
            }
            let id = locations.len() as u64 + 1;
            locations.push(Location {
                id,
                mapping_id,
                address,
                line,
                is_folded: false,
            });
            location_ids.insert(key, id);
            id
        };

    let mut sample = Vec::with_capacity(rows.len());
    for row in rows {
        let mut location_id = Vec::new();
        let mut inlined: Vec<&Frame> = Vec::new();
        for (i, f) in row.stack.iter().enumerate() {
            if f.inlined && i + 1 < row.stack.len() {
                inlined.push(f);
            } else {
                location_id.push(location_of(Some(f), &inlined, &mut strings));
                inlined.clear();
            }
        }
        if row.stack.is_empty() {
            location_id.push(location_of(None, &[], &mut strings));
        }
        let label = row
            .labels
            .iter()
            .map(|(key, value)| Label {
                key: strings.get(key),
                str: strings.get(value),
                num: 0,
                num_unit: 0,
            })
            .collect();
        sample.push(Sample {
            location_id,
            value: row.values.clone(),
            label,
        });
    }

    let period_type = ValueType {
        r#type: strings.get("space"),
        unit: strings.get("bytes"),
    };
    let comment = header.comment.iter().map(|c| strings.get(c)).collect();
    let default_sample_type = strings.get(header.default_sample_type);
    let time_nanos = header
        .start
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    PbProfile {
        sample_type,
        sample,
        mapping,
        location: locations,
        function: functions,
        string_table: strings.table,
        drop_frames: 0,
        keep_frames: 0,
        time_nanos,
        duration_nanos: header.duration_ns,
        period_type: Some(period_type),
        period: 1,
        comment,
        default_sample_type,
    }
}

/// Sort key putting the executable first: the module holding a `main` frame, else the one
/// named like the program, else any (stable, so path order is kept).
fn main_first(holding_main: &HashSet<&str>, program: Option<&str>, module: &str) -> u8 {
    let program = program.map(base_name);
    if holding_main.contains(module) {
        0
    } else if program.is_some_and(|p| !p.is_empty() && p == base_name(module)) {
        1
    } else {
        2
    }
}
