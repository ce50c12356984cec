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
//! Locations carry the frame's absolute address, a function (its name, or `module+0xADDR` when
//! it could not be named; see [`frame_name`]) and the line when known. Every
//! module gets a mapping spanning the addresses seen in it (not the module's real load range,
//! which is gone once the process exits; `file_offset` is 0), with its path and, when the ELF
//! file is readable, the hex GNU build id. The executable's mapping comes first, as `pprof`
//! expects of the main binary. Mappings are marked as already symbolized, so `pprof` does not
//! look for the binaries.

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

/// The gzipped profile for `profile`, reading build ids from the modules' ELF files.
pub fn render(profile: &Profile) -> anyhow::Result<Vec<u8>> {
    let start = SystemTime::now()
        .checked_sub(Duration::from_secs_f64(profile.duration_s.max(0.0)))
        .unwrap_or(UNIX_EPOCH);
    let pb = build(profile, start, &mut read_build_id);
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

/// Addresses seen in one module, and whether its frames carry files and lines.
struct ModuleSpan {
    low: u64,
    high: u64,
    files: bool,
    lines: bool,
}

/// Builds the (uncompressed) profile. `build_id` reads a module's build id (hex) from its path.
pub fn build(
    profile: &Profile,
    start: SystemTime,
    build_id: &mut dyn FnMut(&str) -> Option<String>,
) -> PbProfile {
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
        let addr = parse_addr(&frame.addr);
        let span = spans.entry(module).or_insert(ModuleSpan {
            low: addr,
            high: addr,
            files: false,
            lines: false,
        });
        span.low = span.low.min(addr);
        span.high = span.high.max(addr);
        span.files |= frame.file.is_some();
        span.lines |= frame.line.is_some();
    }
    let mut ordered: Vec<(&str, &ModuleSpan)> = spans.iter().map(|(m, s)| (*m, s)).collect();
    ordered.sort_by_key(|(module, _)| main_first(profile, module));
    let mut mapping_ids: HashMap<&str, u64> = HashMap::new();
    let mut mapping = Vec::new();
    for (i, (module, span)) in ordered.into_iter().enumerate() {
        let id = i as u64 + 1;
        mapping_ids.insert(module, id);
        mapping.push(Mapping {
            id,
            memory_start: span.low,
            memory_limit: span.high.saturating_add(1),
            file_offset: 0,
            filename: strings.get(module),
            build_id: build_id(module).map_or(0, |b| strings.get(&b)),
            has_functions: true,
            has_filenames: span.files,
            has_line_numbers: span.lines,
            has_inline_frames: false,
        });
    }

    let mut functions: Vec<Function> = Vec::new();
    let mut function_ids: HashMap<(String, Option<String>), u64> = HashMap::new();
    let mut locations: Vec<Location> = Vec::new();
    let mut location_ids: HashMap<LocationKey, u64> = HashMap::new();
    let mut location_of = |frame: Option<&Frame>, strings: &mut Strings| -> u64 {
        let key = LocationKey::of(frame);
        if let Some(&id) = location_ids.get(&key) {
            return id;
        }
        let name = frame.map_or_else(|| "[unknown]".to_owned(), frame_name);
        let file = frame.and_then(|f| f.file.clone());
        let function_id = *function_ids
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
            });
        let id = locations.len() as u64 + 1;
        locations.push(Location {
            id,
            mapping_id: frame
                .and_then(|f| f.module.as_deref())
                .and_then(|m| mapping_ids.get(m).copied())
                .unwrap_or(0),
            address: frame.map_or(0, |f| parse_addr(&f.addr)),
            line: vec![Line {
                function_id,
                line: frame.and_then(|f| f.line).map_or(0, i64::from),
            }],
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
        let location_id = if site.stack.is_empty() {
            vec![location_of(None, &mut strings)]
        } else {
            site.stack
                .iter()
                .map(|f| location_of(Some(f), &mut strings))
                .collect()
        };
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

/// What makes two frames one location: address, module and symbolization.
#[derive(Clone, PartialEq, Eq, Hash)]
struct LocationKey {
    addr: u64,
    module: Option<String>,
    function: Option<String>,
    file: Option<String>,
    line: Option<u32>,
    known: bool,
}

impl LocationKey {
    fn of(frame: Option<&Frame>) -> Self {
        match frame {
            Some(f) => Self {
                addr: parse_addr(&f.addr),
                module: f.module.clone(),
                function: f.function.clone(),
                file: f.file.clone(),
                line: f.line,
                known: true,
            },
            None => Self {
                addr: 0,
                module: None,
                function: None,
                file: None,
                line: None,
                known: false,
            },
        }
    }
}

/// `0x1234` (or `1234`) as a number; 0 when it is not hex.
fn parse_addr(s: &str) -> u64 {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u64::from_str_radix(digits, 16).unwrap_or(0)
}

/// The GNU build id of the ELF file at `path`, as lowercase hex; None when the file cannot be
/// read or has none.
pub fn read_build_id(path: &str) -> Option<String> {
    use object::Object as _;
    let data = std::fs::read(path).ok()?;
    let obj = object::File::parse(&*data).ok()?;
    let id = obj.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::report::sample::sample_profile;

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
            ["leak_widgets", "main", "libc.so.6+0x7f0000001234"]
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
        assert_eq!(loc.address, 0x5555_0000_1296);
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
        let p = build(&profile, UNIX_EPOCH, &mut |m| {
            m.ends_with("/app").then(|| "abcd01".to_owned())
        });
        assert_eq!(p.mapping.len(), 2);
        // The executable (holding main) comes first, though its path sorts after libc's.
        assert_eq!(s(&p, p.mapping[0].filename), "/opt/app");
        assert_eq!(p.mapping[0].id, 1);
        let app = p
            .mapping
            .iter()
            .find(|m| s(&p, m.filename) == "/opt/app")
            .unwrap();
        assert_eq!(s(&p, app.build_id), "abcd01");
        assert!(app.has_functions && app.has_line_numbers);
        let libc = p
            .mapping
            .iter()
            .find(|m| s(&p, m.filename).ends_with("libc.so.6"))
            .unwrap();
        assert_eq!(libc.build_id, 0);
        for loc in &p.location {
            if let Some(m) = p.mapping.iter().find(|m| m.id == loc.mapping_id) {
                assert!(m.memory_start <= loc.address && loc.address < m.memory_limit);
            }
        }
        // Identical frames share one location and one function.
        let main_fns = p
            .function
            .iter()
            .filter(|f| s(&p, f.name) == "main")
            .count();
        assert_eq!(main_fns, 1);
    }

    #[test]
    fn empty_profile_is_valid() {
        let mut profile = sample_profile();
        profile.sites.clear();
        let p = decode(&render(&profile).unwrap());
        assert!(p.sample.is_empty() && p.location.is_empty() && p.mapping.is_empty());
        assert_eq!(p.sample_type.len(), 4);
    }

    #[test]
    fn build_id_of_a_real_elf_file() {
        let exe = std::env::current_exe().unwrap();
        // Rust test binaries are linked with a GNU build id on Linux; a missing file has none.
        let id = read_build_id(exe.to_str().unwrap());
        assert!(id.is_none_or(|id| id.len() >= 16 && id.chars().all(|c| c.is_ascii_hexdigit())));
        assert_eq!(read_build_id("/nonexistent/memprof"), None);
        assert_eq!(parse_addr("0x10"), 16);
        assert_eq!(parse_addr("junk"), 0);
    }
}
