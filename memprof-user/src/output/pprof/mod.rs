//! `--pprof FILE`: the profile as a gzipped `profile.proto`, the format of Go's `pprof` and of
//! the tools built on it (<https://github.com/google/pprof/blob/main/proto/profile.proto>).
//!
//! The messages are written by hand with `prost` derives and the proto's field numbers. The
//! profile has six sample types, in this order: `alloc_objects/count`, `alloc_space/bytes`,
//! `inuse_objects/count`, `inuse_space/bytes` (the default, as in Go heap profiles), then
//! `peak_objects/count` and `peak_space/bytes`: what each site held when the heap peaked
//! (`-sample_index=peak_space`), and, when RSS was explained, a seventh: `resident_space/bytes`,
//! the site's in-use bytes that lie in resident pages. Each
//! [`Site`] becomes one sample with those values, labels `allocator`, `kind` and
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
    io::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use flate2::{Compression, write::GzEncoder};
use prost::Message as _;

mod proto;
mod rows;

pub use self::{
    proto::{Function, Label, Line, Location, Mapping, PbProfile, Sample, ValueType},
    rows::{Header, Row, build_rows, module_base},
};
use crate::report::{Profile, Site};

/// The sample types, in value order.
pub const SAMPLE_TYPES: [(&str, &str); 6] = [
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
    ("peak_objects", "count"),
    ("peak_space", "bytes"),
];

/// The sample type added when RSS was explained (sites have `resident_bytes`).
pub const RESIDENT_TYPE: (&str, &str) = ("resident_space", "bytes");

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

/// Builds the (uncompressed) profile.
pub fn build(profile: &Profile, start: SystemTime) -> PbProfile {
    let resident = profile.sites.iter().any(|s| s.resident_bytes.is_some());
    let sample_types: Vec<(&str, &str)> = SAMPLE_TYPES
        .iter()
        .chain(resident.then_some(&RESIDENT_TYPE))
        .copied()
        .collect();
    let rows: Vec<Row<'_>> = profile
        .sites
        .iter()
        .map(|site| Row {
            stack: &site.stack,
            values: {
                let mut v = values(site).to_vec();
                if resident {
                    let bytes = site.resident_bytes.unwrap_or(0);
                    v.push(i64::try_from(bytes).unwrap_or(i64::MAX));
                }
                v
            },
            labels: vec![
                ("allocator", site.allocator),
                ("kind", site.kind),
                ("verdict", site.verdict.as_str()),
            ],
        })
        .collect();
    let mut comment = vec![format!(
        "memprof: pid {} ({}), {:.3} s",
        profile.pid,
        profile.command.join(" "),
        profile.duration_s
    )];
    if let Some(s) = profile.report.sampling {
        comment.push(format!(
            "sampled: one allocation per {} bytes on average; values are estimates",
            s.mean_bytes
        ));
    }
    build_rows(
        &rows,
        &Header {
            sample_types: &sample_types,
            default_sample_type: "inuse_space",
            comment,
            program: profile.command.first().map(String::as_str),
            start,
            duration_ns: (profile.duration_s.max(0.0) * 1e9) as i64,
        },
    )
}

/// A site's values, in [`SAMPLE_TYPES`] order.
pub fn values(site: &Site) -> [i64; 6] {
    let v = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    [
        v(site.alloc_objects),
        v(site.alloc_bytes),
        v(site.inuse_objects),
        v(site.inuse_bytes),
        v(site.objects_at_peak),
        v(site.bytes_at_peak),
    ]
}

/// Reads a gzipped profile back (tests).
#[cfg(test)]
pub(crate) fn decode(gz: &[u8]) -> PbProfile {
    use std::io::Read as _;
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut raw)
        .unwrap();
    PbProfile::decode(&*raw).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::sample::{APP, APP_BUILD_ID, frame, sample_profile};

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
        // leak_widgets: 7 blocks of 3000 B, none freed; 6 of them held at the peak.
        let leak = &p.sample[0];
        assert_eq!(leak.value, vec![7, 21000, 7, 21000, 6, 18000]);
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
        assert_eq!(p.sample_type.len(), 6);
    }

    #[test]
    fn resident_space_when_rss_was_explained() {
        let mut profile = sample_profile();
        let p = decode(&render(&profile).unwrap());
        assert_eq!(p.sample_type.len(), 6, "not explained: six types");
        profile.sites[0].resident_bytes = Some(8192);
        profile.sites[1].resident_bytes = Some(0);
        let p = decode(&render(&profile).unwrap());
        let s = |i: i64| p.string_table[i as usize].as_str();
        assert_eq!(p.sample_type.len(), 7);
        assert_eq!(
            (s(p.sample_type[6].r#type), s(p.sample_type[6].unit)),
            RESIDENT_TYPE
        );
        assert_eq!(s(p.default_sample_type), "inuse_space");
        assert!(p.sample.iter().all(|x| x.value.len() == 7));
        assert_eq!(p.sample[0].value[6], 8192);
        assert_eq!(p.sample[0].value[3], 21000);
    }
}
