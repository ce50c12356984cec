//! A real workload: Debian's redis-server (jemalloc) under redis-benchmark, on loopback, its
//! throughput per test untraced, under memprof (full and sampled, `--pid`, attached before the
//! benchmark starts) and under heaptrack (LD_PRELOAD, for reference).

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    SAMPLE_BYTES,
    proc::{Guarded, TempPath, comm, descendants},
    run::{json_u64, libc_probed_elsewhere, median, wait_for_line},
};
use crate::util::find_program;

const PORT: u16 = 6399;

/// redis-benchmark's tests, as `-t` takes them and as it names them in its results.
const TESTS: [(&str, &str); 3] = [("set", "SET"), ("get", "GET"), ("lpush", "LPUSH")];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Untraced,
    Full,
    Sampled,
    Heaptrack,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Untraced => "untraced",
            Self::Full => "memprof --pid",
            Self::Sampled => "memprof --pid --sample-bytes 512K",
            Self::Heaptrack => "heaptrack",
        }
    }
}

/// One benchmark run: requests/s per test (in `TESTS` order) and, under memprof, its report's
/// allocations and frees (estimates when sampled) and lost events.
struct Run {
    rps: Vec<f64>,
    traced: Option<Traced>,
}

#[derive(Clone, Copy)]
struct Traced {
    events: u64,
    lost: u64,
}

/// The programs a run takes.
struct Programs<'a> {
    server: PathBuf,
    benchmark: PathBuf,
    heaptrack: Option<PathBuf>,
    memprof: &'a Path,
}

/// Runs redis-benchmark `reps` times in every mode, rep-major, and writes the medians; skips
/// with a message when redis-server or redis-benchmark is not installed. Before and after
/// each run, `churn` checks that no other tracer has breakpoints in libc.
pub(super) fn redis(
    memprof: &Path,
    churn: &Path,
    reps: usize,
    quick: bool,
    md: &mut String,
    json: &mut Vec<String>,
) -> Result<()> {
    let (Some(server), Some(benchmark)) = (
        find_program("redis-server"),
        find_program("redis-benchmark"),
    ) else {
        let why = "redis-server or redis-benchmark is not installed (`cargo xtask setup` \
                   installs Debian's redis-server and redis-tools)";
        eprintln!("bench: skipping the redis workload: {why}");
        let _ = writeln!(md, "\nredis-server under redis-benchmark: skipped, {why}.");
        json.push(format!("{{\"redis_skipped\":{why:?}}}"));
        return Ok(());
    };
    let programs = Programs {
        server,
        benchmark,
        heaptrack: find_program("heaptrack"),
        memprof,
    };
    let mut modes = vec![Mode::Untraced, Mode::Full, Mode::Sampled];
    if programs.heaptrack.is_some() {
        modes.push(Mode::Heaptrack);
    } else {
        eprintln!("bench: heaptrack not installed: no heaptrack row in the redis workload");
    }
    let requests = if quick { 20_000 } else { 200_000 };
    let dir = TempPath::dir("memprof-bench-redis")?;
    let mut runs: Vec<Vec<Run>> = modes.iter().map(|_| Vec::new()).collect();
    let mut disturbed = 0;
    for _ in 0..reps {
        for (&mode, runs) in modes.iter().zip(&mut runs) {
            let before = libc_probed_elsewhere(churn)?;
            let run = once(&programs, mode, requests, &dir.0)
                .with_context(|| format!("redis workload, {}", mode.name()))?;
            if before || libc_probed_elsewhere(churn)? {
                disturbed += 1;
            }
            eprintln!(
                "bench: redis / {}: {}",
                mode.name(),
                TESTS
                    .iter()
                    .zip(&run.rps)
                    .map(|((_, test), rps)| format!("{test} {rps:.0} req/s"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            runs.push(run);
        }
    }

    if disturbed > 0 {
        let _ = writeln!(
            md,
            "\nWarning: another tracer had breakpoints in libc around {disturbed} of the {} redis \
             runs below (another memprof --all, bpftrace, ...): their throughput says little.",
            reps * modes.len()
        );
        json.push(format!("{{\"redis_runs_disturbed\":{disturbed}}}"));
        eprintln!("bench: warning: another tracer probed libc around {disturbed} redis runs");
    }
    let _ = writeln!(
        md,
        "\nredis-server (Debian, jemalloc) under `redis-benchmark -t set,get,lpush -n {requests}` \
         on loopback, median of {reps}; requests/s and share of untraced (goal: at least 40% \
         under memprof, 55% sampled), and memprof's allocations + frees (estimated when sampled) \
         and lost events:\n\n| mode | {} | allocs + frees | lost |\n| --- |{} --- | --- |",
        TESTS.map(|(_, t)| t).join(" | "),
        " --- |".repeat(TESTS.len())
    );
    let medians: Vec<Vec<f64>> = runs
        .iter()
        .map(|runs| {
            (0..TESTS.len())
                .map(|i| median(runs.iter().map(|r| r.rps[i]).collect()))
                .collect()
        })
        .collect();
    for ((mode, runs), rps) in modes.iter().zip(&runs).zip(&medians) {
        let mut cells = Vec::new();
        for (i, (_, test)) in TESTS.iter().enumerate() {
            let share = rps[i] / medians[0][i].max(1e-9);
            cells.push(format!("{:.0} req/s ({:.0}%)", rps[i], share * 100.0));
            json.push(format!(
                "{{\"redis_mode\":{:?},\"test\":{test:?},\"requests\":{requests},\"requests_per_s\":{:.0},\"share_of_untraced\":{share:.3}}}",
                mode.name(),
                rps[i]
            ));
        }
        let traced: Vec<Traced> = runs.iter().filter_map(|r| r.traced).collect();
        let (mut events, mut lost) = (String::new(), String::new());
        if !traced.is_empty() {
            let median_events = median(traced.iter().map(|t| t.events as f64).collect());
            let max_lost = traced.iter().map(|t| t.lost).max().unwrap_or(0);
            json.push(format!(
                "{{\"redis_mode\":{:?},\"requests\":{requests},\"allocs_and_frees\":{median_events:.0},\"lost\":{max_lost}}}",
                mode.name()
            ));
            events = format!("{median_events:.0}");
            lost = max_lost.to_string();
        }
        let _ = writeln!(
            md,
            "| {} | {} | {events} | {lost} |",
            mode.name(),
            cells.join(" | "),
        );
    }
    Ok(())
}

/// Starts redis-server in `mode`, runs the benchmark against it and stops everything.
fn once(programs: &Programs, mode: Mode, requests: u32, dir: &Path) -> Result<Run> {
    let addr = SocketAddr::from(([127, 0, 0, 1], PORT));
    if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
        bail!(
            "127.0.0.1:{PORT} is already in use (a redis-server left by an earlier run? \
             `redis-cli -p {PORT} shutdown nosave` stops one)"
        );
    }
    let server_args = [
        "--bind",
        "127.0.0.1",
        "--port",
        &PORT.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
    ]
    .map(String::from);
    let mut cmd = match (mode, &programs.heaptrack) {
        (Mode::Heaptrack, Some(heaptrack)) => {
            let mut cmd = Command::new(heaptrack);
            cmd.arg("-o").arg(dir.join("heaptrack.redis"));
            cmd.arg(&programs.server);
            cmd
        }
        _ => Command::new(&programs.server),
    };
    cmd.args(&server_args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut started = Guarded::spawn(&mut cmd, "redis-server")?;
    // heaptrack's script reads from this pipe and removes it at its exit, which a kill skips.
    let _fifo = (mode == Mode::Heaptrack).then(|| {
        TempPath(PathBuf::from(format!(
            "/tmp/heaptrack_fifo{}",
            started.id()
        )))
    });
    wait_ready(&mut started, addr)?;
    // Under heaptrack, redis-server is a child of heaptrack's script.
    let redis_pid = if mode == Mode::Heaptrack {
        descendants(started.id())
            .into_iter()
            .find(|&pid| comm(pid).as_deref() == Some("redis-server"))
            .context("no redis-server process under heaptrack")?
    } else {
        started.id()
    };

    let mut tracer = match mode {
        Mode::Full | Mode::Sampled => {
            let mut cmd = Command::new(programs.memprof);
            cmd.args(["trace", "--json", "--pid", &redis_pid.to_string()]);
            if mode == Mode::Sampled {
                cmd.args(["--sample-bytes", SAMPLE_BYTES]);
            }
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut tracer = Guarded::spawn(&mut cmd, "memprof")?;
            let stdout = drain(tracer.child.stdout.take().context("no stdout")?);
            wait_for_line(&mut tracer.child, "memprof: tracing", true)?;
            Some((tracer, stdout))
        }
        _ => None,
    };

    let out = Command::new(&programs.benchmark)
        .args(["-h", "127.0.0.1", "-p", &PORT.to_string()])
        .args(["-t", &TESTS.map(|(t, _)| t).join(",")])
        .args(["-n", &requests.to_string(), "-q"])
        .stdin(Stdio::null())
        .output()
        .context("failed to run redis-benchmark")?;
    if !out.status.success() {
        bail!(
            "redis-benchmark failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let results = parse_benchmark(&text);
    let rps = TESTS
        .iter()
        .map(|(_, test)| {
            results
                .iter()
                .find(|(name, _)| name == test)
                .map(|&(_, rps)| rps)
                .with_context(|| format!("no {test} result from redis-benchmark: {text:?}"))
        })
        .collect::<Result<Vec<f64>>>()?;

    let mut traced = None;
    if let Some((mut tracer, stdout)) = tracer.take() {
        let status = tracer.stop(libc::SIGINT, Duration::from_secs(120))?;
        let stdout = stdout.join().unwrap_or_default();
        if !status.success() {
            bail!("memprof exited with {status}");
        }
        let report = stdout
            .lines()
            .rev()
            .find(|l| l.contains("\"type\":\"report\""))
            .context("no report from memprof")?;
        traced = Some(Traced {
            events: json_u64(report, "\"allocs\":") + json_u64(report, "\"frees\":"),
            lost: json_u64(report, "\"lost_events\":"),
        });
    }
    // redis-server shuts down on SIGTERM; heaptrack's script then waits for its interpreter to
    // finish writing before it exits.
    // SAFETY: signalling the redis-server we started (directly or through heaptrack).
    unsafe { libc::kill(redis_pid as i32, libc::SIGTERM) };
    let status = started.wait_for(Duration::from_secs(120))?;
    if mode != Mode::Heaptrack && !status.success() {
        bail!("redis-server exited with {status}");
    }
    Ok(Run { rps, traced })
}

/// Reads a pipe to its end on a thread of its own, so the writer never blocks on it.
fn drain(mut pipe: impl std::io::Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Waits until the server answers PING, at most 60 s.
fn wait_ready(server: &mut Guarded, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = server.exited()? {
            bail!("redis-server exited at start ({status})");
        }
        if ping(addr).unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("redis-server did not answer PING on {addr} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ping(addr: SocketAddr) -> Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"PING\r\n")?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(answer.trim_end() == "+PONG")
}

/// `(test, requests/s)` from `redis-benchmark -q` output: each test's progress lines end in
/// carriage returns, its result is `SET: 116009.28 requests per second, p50=0.223 msec`.
fn parse_benchmark(text: &str) -> Vec<(String, f64)> {
    text.split(['\r', '\n'])
        .filter_map(|line| {
            let (name, rest) = line.trim().split_once(": ")?;
            let (rps, unit) = rest.split_once(' ')?;
            if !unit.starts_with("requests per second") {
                return None;
            }
            Some((name.to_string(), rps.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_benchmark_quiet_output() {
        // `redis-benchmark -t set,get,lpush -n 20000 -q` (redis-tools 7.0.15): progress lines
        // are overwritten with carriage returns.
        let out = " \rSET: rps=0.0 (overall: 0.0) avg_msec=-nan (overall: -nan)\r     \
                   \rSET: rps=50561.8 (overall: 50361.1) avg_msec=0.673 (overall: 0.673)\r    \
                   \rSET: 51413.88 requests per second, p50=0.551 msec\n \
                   \rGET: rps=22580.0 (overall: 51789.0) avg_msec=0.653 (overall: 0.653)\r   \
                   \rGET: 47732.70 requests per second, p50=0.487 msec\n \
                   \rLPUSH: 56179.77 requests per second, p50=0.551 msec\n\n";
        assert_eq!(
            parse_benchmark(out),
            vec![
                ("SET".to_string(), 51413.88),
                ("GET".to_string(), 47732.70),
                ("LPUSH".to_string(), 56179.77)
            ]
        );
        // Older releases print no latency.
        assert_eq!(
            parse_benchmark("SET: 116009.28 requests per second\n"),
            vec![("SET".to_string(), 116009.28)]
        );
        assert!(parse_benchmark("Could not connect to Redis at 127.0.0.1:6399\n").is_empty());
    }
}
