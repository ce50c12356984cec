//! Attaching and detaching the full probe set, for each kind of link: memprof `--probe-stats`
//! traces an idle `sleep` (it maps libc) for a second and says on stderr how long attaching and
//! detaching took.

use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{proc::Guarded, run::median};

/// The kinds of link memprof can attach (`--links`), the default first.
const KINDS: [&str; 3] = ["session", "multi", "classic"];

/// One attach and detach.
#[derive(Clone, Debug, Default, PartialEq)]
struct Timing {
    links: u64,
    attach_ms: f64,
    detach_ms: f64,
}

/// Measures `reps` attaches and detaches of each kind, rep-major, and writes their medians.
pub(super) fn attach_detach(
    memprof: &Path,
    reps: usize,
    md: &mut String,
    json: &mut Vec<String>,
) -> Result<()> {
    let mut timings: Vec<Vec<Timing>> = vec![Vec::new(); KINDS.len()];
    for _ in 0..reps {
        for (kind, timings) in KINDS.iter().zip(&mut timings) {
            timings.push(once(memprof, kind)?);
        }
    }
    let _ = writeln!(
        md,
        "\nAttach and detach of the full probe set on an idle `sleep` (`--probe-stats`, median \
         of {reps}; goal: at most 200 ms together):\n\n\
         | links | probe links | attach | detach | attach + detach |\n| --- | --- | --- | --- | --- |"
    );
    for (kind, timings) in KINDS.iter().zip(&timings) {
        let links = median(timings.iter().map(|t| t.links as f64).collect());
        let attach = median(timings.iter().map(|t| t.attach_ms).collect());
        let detach = median(timings.iter().map(|t| t.detach_ms).collect());
        let total = median(timings.iter().map(|t| t.attach_ms + t.detach_ms).collect());
        let _ = writeln!(
            md,
            "| {kind} | {links:.0} | {attach:.1} ms | {detach:.1} ms | {total:.1} ms |"
        );
        json.push(format!(
            "{{\"attach_links\":{kind:?},\"probe_links\":{links:.0},\"attach_ms\":{attach:.1},\"detach_ms\":{detach:.1},\"attach_detach_ms\":{total:.1}}}"
        ));
        eprintln!("bench: attach/detach {kind}: {attach:.1} ms + {detach:.1} ms");
    }
    Ok(())
}

/// One memprof run of a second on a fresh `sleep`, with links of `kind`.
fn once(memprof: &Path, kind: &str) -> Result<Timing> {
    let sleep = Guarded::spawn(
        Command::new("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
        "sleep",
    )?;
    wait_for_libc(sleep.id())?;
    let mut tracer = Guarded::spawn(
        Command::new(memprof)
            .args([
                "trace",
                "--probe-stats",
                "--duration",
                "1s",
                "--links",
                kind,
            ])
            .args(["--pid", &sleep.id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
        "memprof",
    )?;
    let (stderr, status) = tracer.stderr_and_exit(Duration::from_secs(120))?;
    drop(sleep);
    if !status.success() {
        bail!("memprof --links {kind} failed ({status}):\n{stderr}");
    }
    parse_timing(&stderr).with_context(|| {
        format!("no attach and detach lines from memprof --links {kind}:\n{stderr}")
    })
}

/// Waits until process `pid` has libc mapped (a spawned process maps it after its exec), at
/// most 10 s.
fn wait_for_libc(pid: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        if maps_libc(&maps) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("sleep (pid {pid}) did not map libc within 10 s")
}

/// Whether a `/proc/PID/maps` listing maps glibc's `libc.so.6`.
fn maps_libc(maps: &str) -> bool {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .any(|path| path.rsplit('/').next() == Some("libc.so.6"))
}

/// The two `--probe-stats` lines of memprof's stderr.
fn parse_timing(stderr: &str) -> Option<Timing> {
    let (links, _, attach_ms) = stderr.lines().find_map(parse_attached)?;
    let (_, detach_ms) = stderr.lines().find_map(parse_detached)?;
    Some(Timing {
        links,
        attach_ms,
        detach_ms,
    })
}

/// `memprof: attached N probe links (KIND) in X ms` → (N, KIND, X).
fn parse_attached(line: &str) -> Option<(u64, &str, f64)> {
    let rest = line.trim().strip_prefix("memprof: attached ")?;
    let (links, rest) = rest.split_once(" probe links (")?;
    let (kind, rest) = rest.split_once(") in ")?;
    let ms = rest.strip_suffix(" ms")?;
    Some((links.parse().ok()?, kind, ms.parse().ok()?))
}

/// `memprof: detached N probe links in Y ms` → (N, Y).
fn parse_detached(line: &str) -> Option<(u64, f64)> {
    let rest = line.trim().strip_prefix("memprof: detached ")?;
    let (links, rest) = rest.split_once(" probe links in ")?;
    let ms = rest.strip_suffix(" ms")?;
    Some((links.parse().ok()?, ms.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_libc_in_maps() {
        let maps = "55d0c2a00000-55d0c2a02000 r--p 00000000 fe:01 1234 /usr/bin/sleep\n\
                    7f1e2c400000-7f1e2c428000 r--p 00000000 fe:01 5678 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
                    7ffd5a1f0000-7ffd5a211000 rw-p 00000000 00:00 0 [stack]\n";
        assert!(maps_libc(maps));
        let before = "55d0c2a00000-55d0c2a02000 r--p 00000000 fe:01 1234 /usr/bin/sleep\n\
                      7f1e2c600000-7f1e2c62a000 r--p 00000000 fe:01 91 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\n";
        assert!(!maps_libc(before));
        assert!(maps_libc(&fs::read_to_string("/proc/self/maps").unwrap()));
    }

    #[test]
    fn parses_probe_stats_lines() {
        assert_eq!(
            parse_attached("memprof: attached 2 probe links (session) in 38.4 ms"),
            Some((2, "session", 38.4))
        );
        assert_eq!(
            parse_detached("memprof: detached 40 probe links in 1210.0 ms\n"),
            Some((40, 1210.0))
        );
        assert_eq!(parse_attached("memprof: tracing pid 12"), None);
        assert_eq!(
            parse_detached("memprof: detached some probe links in 1 ms"),
            None
        );
        let stderr = "memprof: attached 4 probe links (multi) in 51.0 ms\n\
                      memprof: tracing pid 7 (20 probes on libc.so.6; Ctrl-C to stop)\n\
                      memprof: detached 4 probe links in 60.5 ms\n";
        assert_eq!(
            parse_timing(stderr),
            Some(Timing {
                links: 4,
                attach_ms: 51.0,
                detach_ms: 60.5
            })
        );
        assert_eq!(
            parse_timing("memprof: attached 4 probe links (multi) in 51.0 ms\n"),
            None
        );
    }
}
