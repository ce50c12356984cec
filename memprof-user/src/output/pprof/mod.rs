//! `--pprof FILE`: the profile as a gzipped `profile.proto`, the format of Go's `pprof` and of
//! the tools built on it (<https://github.com/google/pprof/blob/main/proto/profile.proto>).
//!
//! The messages are written by hand with `prost` derives and the proto's field numbers. The
//! profile has four sample types, in this order: `alloc_objects/count`, `alloc_space/bytes`,
//! `inuse_objects/count`, `inuse_space/bytes` (the default, as in Go heap profiles). Each
//! [`Site`] becomes one sample with those four values, labels `allocator`, `kind` and
//! `verdict`, and its stack as locations, innermost first. A site without a stack gets one
//! `[unknown]` location, so the samples still add up to the report's totals.
//!
//! Each frame of a site's stack becomes a location, except that functions inlined at an address
//! go with the frame they were inlined into: one location with one line per function, innermost
//! first, as pprof expects. A line names the function (its name, or `module+0xOFFSET` when it
//! could not be named; see [`frame_name`]), the file and the line when known.
//!
//! Every module gets a mapping, with its path and GNU build id, laid out at its own base
//! address: module `i` (in mapping order) at `(i + 1) << 40`, file offset 0, up to its highest
//! frame. A location's address is that base plus the frame's offset in the module's file, so
//! `address - memory_start + file_offset` is the file offset, the same in every run: pprof,
//! Parca or Pyroscope can symbolize the profile later from the module's debug information (the
//! process's real load addresses are not kept; they change with every run). The executable's
//! mapping comes first, as `pprof` expects of the main binary. Mappings are marked as already
//! symbolized, so `pprof` does not look for the binaries.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use flate2::{Compression, write::GzEncoder};
use prost::Message as _;

mod proto;

pub use self::proto::{Function, Label, Line, Location, Mapping, PbProfile, Sample, ValueType};

use crate::report::{
    Frame, Profile, Site,
    names::{base_name, frame_name},
};

/// The sample types, in value order.
pub const SAMPLE_TYPES: [(&str, &str); 4] = [
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
];

/// The gzipped profile for `profile`.
pub fn render(profile: &Profile) -> anyhow::Result<Vec<u8>> {
    let start = SystemTime::now()
        .checked_sub(Duration::from_secs_f64(profile.duration_s.max(0.0)))
        .unwrap_or(UNIX_EPOCH);
    let pb = build(profile, start);
    gzip(&pb.encode_to_vec())
}

/// Gzips `bytes`.
pub fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(bytes)?;
    Ok(gz.finish()?)
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

/// Builds the (uncompressed) profile.
pub fn build(profile: &Profile, start: SystemTime) -> PbProfile {
    let mut strings = Strings::new();
    let sample_type = SAMPLE_TYPES
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
    for frame in profile.sites.iter().flat_map(|s| &s.stack) {
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
    let mut ordered: Vec<(&str, &ModuleSpan)> = spans.iter().map(|(m, s)| (*m, s)).collect();
    ordered.sort_by_key(|(module, _)| main_first(profile, module));
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

    let allocator_key = strings.get("allocator");
    let kind_key = strings.get("kind");
    let verdict_key = strings.get("verdict");
    let mut sample = Vec::with_capacity(profile.sites.len());
    for site in &profile.sites {
        let mut location_id = Vec::new();
        let mut inlined: Vec<&Frame> = Vec::new();
        for (i, f) in site.stack.iter().enumerate() {
            if f.inlined && i + 1 < site.stack.len() {
                inlined.push(f);
            } else {
                location_id.push(location_of(Some(f), &inlined, &mut strings));
                inlined.clear();
            }
        }
        if site.stack.is_empty() {
            location_id.push(location_of(None, &[], &mut strings));
        }
        let label = |key: i64, value: &str, strings: &mut Strings| Label {
            key,
            str: strings.get(value),
            num: 0,
            num_unit: 0,
        };
        sample.push(Sample {
            location_id,
            value: values(site).to_vec(),
            label: vec![
                label(allocator_key, site.allocator, &mut strings),
                label(kind_key, site.kind, &mut strings),
                label(verdict_key, site.verdict.as_str(), &mut strings),
            ],
        });
    }

    let period_type = ValueType {
        r#type: strings.get("space"),
        unit: strings.get("bytes"),
    };
    let mut comment = vec![strings.get(&format!(
        "memprof: pid {} ({}), {:.3} s",
        profile.pid,
        profile.command.join(" "),
        profile.duration_s
    ))];
    if let Some(s) = profile.report.sampling {
        comment.push(strings.get(&format!(
            "sampled: one allocation per {} bytes on average; values are estimates",
            s.mean_bytes
        )));
    }
    let default_sample_type = strings.get("inuse_space");
    let time_nanos = start
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
        duration_nanos: (profile.duration_s.max(0.0) * 1e9) as i64,
        period_type: Some(period_type),
        period: 1,
        comment,
        default_sample_type,
    }
}

/// Sort key putting the executable first: the module holding a `main` frame, else the one
/// named like the command's program, else any (stable, so path order is kept).
fn main_first(profile: &Profile, module: &str) -> u8 {
    let holds_main = profile
        .sites
        .iter()
        .flat_map(|s| &s.stack)
        .any(|f| f.function.as_deref() == Some("main") && f.module.as_deref() == Some(module));
    let program = profile.command.first().map(|c| base_name(c));
    if holds_main {
        0
    } else if program.is_some_and(|p| !p.is_empty() && p == base_name(module)) {
        1
    } else {
        2
    }
}

/// A site's values, in [`SAMPLE_TYPES`] order.
pub fn values(site: &Site) -> [i64; 4] {
    let v = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    [
        v(site.alloc_objects),
        v(site.alloc_bytes),
        v(site.inuse_objects),
        v(site.inuse_bytes),
    ]
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::report::sample::{APP, APP_BUILD_ID, frame, sample_profile};

    fn decode(gz: &[u8]) -> PbProfile {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .unwrap();
        PbProfile::decode(&*raw).unwrap()
    }

    fn s(p: &PbProfile, i: i64) -> &str {
        &p.string_table[i as usize]
    }

    /// The function names of a sample's locations, innermost first.
    fn names(p: &PbProfile, sample: &Sample) -> Vec<String> {
        sample
            .location_id
            .iter()
            .map(|id| {
                let loc = p.location.iter().find(|l| l.id == *id).unwrap();
                let f = p
                    .function
                    .iter()
                    .find(|f| f.id == loc.line[0].function_id)
                    .unwrap();
                s(p, f.name).to_owned()
            })
            .collect()
    }

    #[test]
    fn round_trip_keeps_values_stacks_and_labels() {
        let profile = sample_profile();
        let gz = render(&profile).unwrap();
        assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
        let p = decode(&gz);
        assert_eq!(p.string_table[0], "");
        let types: Vec<(&str, &str)> = p
            .sample_type
            .iter()
            .map(|t| (s(&p, t.r#type), s(&p, t.unit)))
            .collect();
        assert_eq!(types, SAMPLE_TYPES);
        assert_eq!(s(&p, p.default_sample_type), "inuse_space");
        assert_eq!(p.sample.len(), profile.sites.len());
        // leak_widgets: 7 blocks of 3000 B, none freed.
        let leak = &p.sample[0];
        assert_eq!(leak.value, vec![7, 21000, 7, 21000]);
        assert_eq!(
            names(&p, leak),
            ["leak_widgets", "main", "libc.so.6+0x27234"]
        );
        let labels: Vec<(&str, &str)> = leak
            .label
            .iter()
            .map(|l| (s(&p, l.key), s(&p, l.str)))
            .collect();
        assert_eq!(
            labels,
            [
                ("allocator", "malloc"),
                ("kind", "heap"),
                ("verdict", "leak")
            ]
        );
        // Line numbers and file names where known.
        let loc = p
            .location
            .iter()
            .find(|l| l.id == leak.location_id[0])
            .unwrap();
        assert_eq!(loc.line[0].line, 47);
        // The executable is the first mapping: at 1 << 40, its file offsets added.
        assert_eq!(loc.address, (1 << 40) + 0x1296);
        let f = p
            .function
            .iter()
            .find(|f| f.id == loc.line[0].function_id)
            .unwrap();
        assert_eq!(s(&p, f.filename), "/src/outputs.c");
        // The site without a stack still counts, at an [unknown] location.
        let nostack = p.sample.iter().find(|s| s.value[3] == 64).unwrap();
        assert_eq!(names(&p, nostack), ["[unknown]"]);
        assert_eq!(
            p.location
                .iter()
                .find(|l| l.id == nostack.location_id[0])
                .unwrap()
                .mapping_id,
            0
        );
        // Totals add up.
        let inuse: i64 = p.sample.iter().map(|s| s.value[3]).sum();
        assert_eq!(
            inuse,
            profile
                .sites
                .iter()
                .map(|s| s.inuse_bytes as i64)
                .sum::<i64>()
        );
    }

    #[test]
    fn mappings_span_modules_and_carry_build_ids() {
        let mut profile = sample_profile();
        // A library whose path sorts before the executable's.
        profile.sites[0].stack[2].module = Some("/lib/libc.so.6".into());
        let p = build(&profile, UNIX_EPOCH);
        assert_eq!(p.mapping.len(), 2);
        // The executable (holding main) comes first, though its path sorts after libc's.
        assert_eq!(s(&p, p.mapping[0].filename), "/opt/app");
        let app = &p.mapping[0];
        assert_eq!(app.id, 1);
        assert_eq!(s(&p, app.build_id), APP_BUILD_ID);
        // From its base, file offset 0, up to its highest frame (0x2000).
        assert_eq!(
            (app.memory_start, app.memory_limit, app.file_offset),
            (1 << 40, (1 << 40) + 0x2001, 0)
        );
        assert!(app.has_functions && app.has_line_numbers && !app.has_inline_frames);
        let libc = &p.mapping[1];
        assert_eq!(s(&p, libc.filename), "/lib/libc.so.6");
        assert_eq!(libc.build_id, 0, "not known");
        assert_eq!(
            (libc.memory_start, libc.memory_limit),
            (2 << 40, (2 << 40) + 0x2_7235)
        );
        // Every location's address lies in its mapping, at its frame's file offset.
        for loc in &p.location {
            if let Some(m) = p.mapping.iter().find(|m| m.id == loc.mapping_id) {
                assert!(m.memory_start <= loc.address && loc.address < m.memory_limit);
            }
        }
        let offsets: Vec<u64> = p
            .location
            .iter()
            .filter(|l| l.mapping_id == 1)
            .map(|l| l.address - (1 << 40))
            .collect();
        assert_eq!(offsets, [0x1296, 0x10e7, 0x2000, 0x1100, 0x1309, 0x113b]);
        // Identical frames share one location and one function.
        let main_fns = p
            .function
            .iter()
            .filter(|f| s(&p, f.name) == "main")
            .count();
        assert_eq!(main_fns, 1);
    }

    #[test]
    fn inlined_functions_share_their_frame_location() {
        let mut profile = sample_profile();
        let mut grab = frame(Some("grab"), Some(APP), Some(6), 0x1296);
        grab.inlined = true;
        profile.sites[0].stack.insert(0, grab);
        let p = build(&profile, UNIX_EPOCH);
        let leak = &p.sample[0];
        assert_eq!(
            leak.location_id.len(),
            3,
            "grab and leak_widgets: one location"
        );
        let loc = p
            .location
            .iter()
            .find(|l| l.id == leak.location_id[0])
            .unwrap();
        let lines: Vec<(&str, i64)> = loc
            .line
            .iter()
            .map(|l| {
                let f = p.function.iter().find(|f| f.id == l.function_id).unwrap();
                (s(&p, f.name), l.line)
            })
            .collect();
        assert_eq!(lines, [("grab", 6), ("leak_widgets", 47)]);
        assert_eq!(loc.address, (1 << 40) + 0x1296);
        assert!(p.mapping[0].has_inline_frames);
    }

    #[test]
    fn empty_profile_is_valid() {
        let mut profile = sample_profile();
        profile.sites.clear();
        let p = decode(&render(&profile).unwrap());
        assert!(p.sample.is_empty() && p.location.is_empty() && p.mapping.is_empty());
        assert_eq!(p.sample_type.len(), 4);
    }
}
