//! `--dhat FILE`: the profile as valgrind DHAT's JSON (file version 2, as valgrind 3.19 writes
//! with `--tool=dhat`), to open in DHAT's viewer (`dh_view.html`).
//!
//! Top level: every field valgrind writes, in its order: `dhatFileVersion` 2, `mode` "heap",
//! `verb` "Allocated", `bklt` true (lifetimes are known), `bkacc` false (memprof does not see
//! reads and writes, so `rb`, `wb` and `acc` are left out of every program point, as DHAT does
//! when it has no access data), `tu` "µs" with `Mtu` "s" (times are microseconds since the trace
//! started, rates per second), `tuth` 10 (the "short-lived" bar: 10 µs on average), `cmd`,
//! `pid`, `te` (the end), `tg` (when the heap peaked, among the samples), `pps` and `ftbl`.
//!
//! One program point per [`Site`] (mmap sites included), with:
//!
//! | field | value |
//! | --- | --- |
//! | `tb`, `tbk` | bytes and blocks allocated (`alloc_bytes`, `alloc_objects`) |
//! | `tl` | summed lifetimes, µs: the freed blocks' exact lifetimes, plus for blocks still live their age at the end, estimated as if they had been allocated at the midpoint of the site's first and last allocation |
//! | `mb`, `mbk` | the most the site held at once (`max_inuse_*`) |
//! | `gb`, `gbk` | what the site held when the heap peaked (`bytes_at_peak`; blocks are exact when those bytes equal the site's in-use or max bytes, else estimated from the site's average block size) |
//! | `eb`, `ebk` | still live at the end (`inuse_*`) |
//! | `fs` | indices into `ftbl`, innermost frame first |
//!
//! `ftbl` starts with `[root]`; frames are written like valgrind's, with the frame's offset in
//! its module's file where valgrind has an address: `0x1296: leak_widgets (outputs.c:47)` with
//! the file's base name, `0x...: fn (in /module)` without a line, `0x...: ??? (in /module)` when
//! the function is not known. A site without a stack gets the single frame
//! `0x0: ??? (no stack)`.

use std::collections::HashMap;

use serde::Serialize;

use crate::report::{Frame, Profile, Site, names::base_name};

/// The whole file, fields in valgrind's order.
#[derive(Debug, Serialize)]
pub struct DhatFile {
    #[serde(rename = "dhatFileVersion")]
    pub dhat_file_version: u32,
    pub mode: &'static str,
    pub verb: &'static str,
    pub bklt: bool,
    pub bkacc: bool,
    pub tu: &'static str,
    #[serde(rename = "Mtu")]
    pub mtu: &'static str,
    pub tuth: u64,
    pub cmd: String,
    pub pid: u32,
    pub te: u64,
    pub tg: u64,
    pub pps: Vec<ProgramPoint>,
    pub ftbl: Vec<String>,
}

/// One program point (call stack).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProgramPoint {
    pub tb: u64,
    pub tbk: u64,
    pub tl: u64,
    pub mb: u64,
    pub mbk: u64,
    pub gb: u64,
    pub gbk: u64,
    pub eb: u64,
    pub ebk: u64,
    pub fs: Vec<usize>,
}

/// The DHAT JSON for `profile`.
pub fn render(profile: &Profile) -> anyhow::Result<Vec<u8>> {
    let mut out = serde_json::to_vec(&build(profile))?;
    out.push(b'\n');
    Ok(out)
}

/// Builds the file's contents.
pub fn build(profile: &Profile) -> DhatFile {
    let end_ns = secs_to_ns(profile.duration_s);
    let mut ftbl = vec!["[root]".to_owned()];
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut frame_index = |text: String| -> usize {
        *index.entry(text).or_insert_with_key(|text| {
            ftbl.push(text.clone());
            ftbl.len() - 1
        })
    };
    let pps = profile
        .sites
        .iter()
        .map(|site| {
            let fs = if site.stack.is_empty() {
                vec![frame_index("0x0: ??? (no stack)".to_owned())]
            } else {
                site.stack
                    .iter()
                    .map(|f| frame_index(frame_text(f)))
                    .collect()
            };
            program_point(site, end_ns, fs)
        })
        .collect();
    DhatFile {
        dhat_file_version: 2,
        mode: "heap",
        verb: "Allocated",
        bklt: true,
        bkacc: false,
        tu: "µs",
        mtu: "s",
        tuth: 10,
        cmd: profile.command.join(" "),
        pid: profile.pid,
        te: end_ns / 1000,
        tg: (secs_to_ns(profile.peak_t_s) / 1000).min(end_ns / 1000),
        pps,
        ftbl,
    }
}

/// A site's numbers (see the module doc); `end_ns` is the end of the trace.
pub fn program_point(site: &Site, end_ns: u64, fs: Vec<usize>) -> ProgramPoint {
    // Live blocks: age at the end, as if allocated midway between first and last allocation.
    let mid_ns = site.first_alloc_ns / 2 + site.last_alloc_ns / 2;
    let live_ns = u128::from(site.inuse_objects) * u128::from(end_ns.saturating_sub(mid_ns));
    let tl_us = (site.freed_lifetime_ns.saturating_add(live_ns) + 500) / 1000;

    let mb = site.max_inuse_bytes.max(site.inuse_bytes);
    let mbk = site.max_inuse_objects.max(site.inuse_objects);
    let gb = site.bytes_at_peak.min(mb);
    let gbk = if gb == 0 {
        0
    } else if gb == site.inuse_bytes {
        site.inuse_objects
    } else if gb == mb {
        mbk
    } else if site.alloc_bytes > 0 {
        let est = (gb as f64 * site.alloc_objects as f64 / site.alloc_bytes as f64).round() as u64;
        est.clamp(1, mbk.max(1))
    } else {
        1
    };
    ProgramPoint {
        tb: site.alloc_bytes,
        tbk: site.alloc_objects,
        tl: u64::try_from(tl_us).unwrap_or(u64::MAX),
        mb,
        mbk,
        gb,
        gbk,
        eb: site.inuse_bytes,
        ebk: site.inuse_objects,
        fs,
    }
}

/// A frame as valgrind writes it: `0xOFFSET: function (file:line)` or `(in module)`, where
/// valgrind's address is the frame's offset in its module's file (the same in every run; 0
/// for Python frames and unknown ones).
pub fn frame_text(frame: &Frame) -> String {
    let addr = format!("{:X}", frame.offset.unwrap_or(0));
    let function = frame.function.as_deref().unwrap_or("???");
    let place = match (&frame.file, frame.line, &frame.module) {
        (Some(file), Some(line), _) => format!(" ({}:{line})", base_name(file)),
        (_, _, Some(module)) => format!(" (in {module})"),
        _ => String::new(),
    };
    format!("0x{addr}: {function}{place}")
}

fn secs_to_ns(s: f64) -> u64 {
    if s.is_finite() && s > 0.0 {
        (s * 1e9) as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::report::sample::sample_profile;

    #[test]
    fn top_level_fields_in_valgrinds_order() {
        let p = sample_profile();
        let v: Value = serde_json::from_slice(&render(&p).unwrap()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut expected = [
            "dhatFileVersion",
            "mode",
            "verb",
            "bklt",
            "bkacc",
            "tu",
            "Mtu",
            "tuth",
            "cmd",
            "pid",
            "te",
            "tg",
            "pps",
            "ftbl",
        ];
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        expected.sort_unstable();
        assert_eq!(sorted, expected);
        assert_eq!(v["dhatFileVersion"], 2);
        assert_eq!(v["cmd"], "./outputs <b>&co");
        assert_eq!(v["te"], 2_000_000);
        assert_eq!(v["tg"], 1_500_000);
        assert_eq!(v["ftbl"][0], "[root]");
    }

    #[test]
    fn field_mapping() {
        let p = sample_profile();
        let d = build(&p);
        let leak = &d.pps[0];
        // 7 blocks live from ~1.0 s (midway between 0.1 s and 1.9 s) to 2.0 s: 7 s in µs.
        assert_eq!(
            (
                leak.tb, leak.tbk, leak.tl, leak.mb, leak.mbk, leak.eb, leak.ebk
            ),
            (21000, 7, 7_000_000, 21000, 7, 21000, 7)
        );
        // 18000 B at the peak: 6 blocks of the site's 3000 B average.
        assert_eq!((leak.gb, leak.gbk), (18000, 6));
        let frames: Vec<&str> = leak.fs.iter().map(|&i| d.ftbl[i].as_str()).collect();
        assert_eq!(
            frames,
            [
                "0x1296: leak_widgets (outputs.c:47)",
                "0x10E7: main (outputs.c:87)",
                "0x27234: ??? (in /usr/lib/x86_64-linux-gnu/libc.so.6)",
            ]
        );
        // The mmap site's function has no line: module instead.
        assert_eq!(
            d.ftbl[d.pps[1].fs[0]],
            "0x2000: map<int, \"q\">::grow;now (in /opt/app)"
        );
        assert_eq!(d.ftbl[d.pps[2].fs[0]], "0x0: ??? (no stack)");
        // Churn: everything freed, 210 lifetimes summing to 2.1 ms.
        let churn = &d.pps[3];
        assert_eq!(
            (
                churn.tb, churn.tbk, churn.tl, churn.mb, churn.mbk, churn.gb, churn.gbk, churn.eb
            ),
            (26880, 210, 2100, 128, 1, 0, 0, 0)
        );
        // Frames shared between sites are listed once.
        let mains = d.ftbl.iter().filter(|f| f.contains(": main (")).count();
        assert_eq!(mains, 3);
    }

    #[test]
    fn odd_input_does_not_panic() {
        let mut p = sample_profile();
        p.duration_s = f64::NAN;
        p.peak_t_s = -1.0;
        p.sites[0].bytes_at_peak = 5000;
        p.sites[0].alloc_bytes = 0;
        let d = build(&p);
        assert_eq!((d.te, d.tg), (0, 0));
        assert_eq!(d.pps[0].gbk, 1);
        p.sites.clear();
        let d = build(&p);
        assert!(d.pps.is_empty());
        assert_eq!(d.ftbl, ["[root]"]);
    }
}
