//! RSS explained (`rss_explained`, each group's `resident_bytes`) on the rss.c fixture, whose
//! allocated-but-untouched and freed-but-resident bytes are known exactly, on a real Python
//! interpreter, and on Debian's redis-server (jemalloc) against jemalloc's own statistics.
//! Environment: `REDIS_SERVER`, `REDIS_CLI` (default `redis-server`, `redis-cli` on PATH).

use std::{sync::OnceLock, time::Duration};

use serde_json::Value;

use super::{array, fixtures, one_group, summary};
use crate::common::{
    Checks, DEADLINE, Finished, Proc, attach, num, os, python, start_target, start_trace, tool,
    trace_while_held,
};

const MIB: u64 = 1 << 20;
/// rss.c: blocks of 32 KiB, 512 of them, every 8th kept.
const FRAG_SIZE: u64 = 32 * 1024;
const FRAG_BLOCKS: u64 = 512;
const FRAG_KEPT: u64 = FRAG_BLOCKS / 8;

/// rss.c traced from before its allocations until after them, the report taken (SIGINT) while
/// it still runs, then the fixture stopped.
fn rss_run() -> &'static Finished {
    static RUN: OnceLock<Finished> = OnceLock::new();
    RUN.get_or_init(|| {
        let target = start_target("rss --wait", &fixtures().rss, &["--wait"]);
        trace_while_held(target, &["--top", "50"])
    })
}

/// The parts of RSS add up to VmRSS within 2%.
fn check_parts(c: &mut Checks, what: &str, rss: &Value) {
    let total = num(rss, "rss_bytes");
    let parts = num(rss, "live_resident_bytes")
        + num(rss, "allocator_retained_bytes")
        + num(rss, "other_resident_bytes");
    c.check(
        total > 0 && parts.abs_diff(total) * 50 <= total,
        format!("{what}: live + retained + other = {parts} should be rss_bytes {total} within 2%"),
    );
    c.eq(
        &format!("{what}: unscanned_bytes"),
        num(rss, "unscanned_bytes"),
        0,
    );
}

/// The 64 MiB block with 16 MiB written is 16 MiB resident and 48 MiB untouched; the kept
/// fragment blocks are all resident; the 14 MiB freed between them stay resident as retained
/// bytes; the parts add up; and both recommendations quote them.
#[test]
fn rss_explained_on_fixture() {
    let run = rss_run();
    let report = run.report();
    let ctx = || {
        format!(
            "rss_explained: {}\n{}",
            report["rss_explained"],
            summary(&report)
        )
    };
    let mut c = Checks::new("rss explained (rss.c)");
    let rss = &report["rss_explained"];
    if !rss.is_object() {
        c.check(false, "the report has no rss_explained");
        c.finish(ctx);
        return;
    }
    check_parts(&mut c, "report", rss);

    let big = one_group(&report, "reserve_big");
    c.eq("reserve_big bytes", num(big, "bytes"), 64 * MIB);
    c.eq(
        "reserve_big resident_bytes",
        num(big, "resident_bytes"),
        16 * MIB,
    );
    let frag = one_group(&report, "frag_block");
    c.eq(
        "frag_block bytes",
        num(frag, "bytes"),
        FRAG_KEPT * FRAG_SIZE,
    );
    c.eq(
        "frag_block resident_bytes (written whole)",
        num(frag, "resident_bytes"),
        FRAG_KEPT * FRAG_SIZE,
    );

    let freed = (FRAG_BLOCKS - FRAG_KEPT) * FRAG_SIZE;
    let retained = num(rss, "allocator_retained_bytes");
    c.check(
        retained >= freed && retained <= freed + 4 * MIB,
        format!(
            "allocator_retained_bytes {retained} should hold the {freed} B freed between live \
             blocks (and at most 4 MiB of other slack: headers, the heap's free top, huge-page \
             rounding)"
        ),
    );
    let untouched = num(rss, "untouched_live_bytes");
    c.check(
        (48 * MIB..=48 * MIB + MIB).contains(&untouched),
        format!("untouched_live_bytes {untouched} should be reserve_big's 48 MiB (+ < 1 MiB)"),
    );
    let live = num(rss, "live_resident_bytes");
    c.check(
        live >= 16 * MIB + FRAG_KEPT * FRAG_SIZE,
        format!("live_resident_bytes {live} should hold at least both groups' resident bytes"),
    );

    let recs = array(&report, "recommendations");
    let kind = |k: &str| recs.iter().find(|r| r["kind"] == k);
    match kind("untouched") {
        Some(r) => {
            c.eq("untouched site", r["site"].as_str(), Some("reserve_big"));
            c.eq(
                "untouched evidence",
                num(&r["evidence"], "untouched_bytes"),
                48 * MIB,
            );
        }
        None => c.check(false, "no `untouched` recommendation"),
    }
    match kind("retained") {
        Some(r) => c.eq(
            "retained evidence",
            num(&r["evidence"], "allocator_retained_bytes"),
            retained,
        ),
        None => c.check(false, "no `retained` recommendation"),
    }
    c.finish(ctx);
}

/// A real interpreter (spawned, the report taken on SIGINT while it sleeps): Python 3 fills a 64 MiB bytearray's first
/// 16 MiB: its group is 16 MiB resident, up to a page and huge-page rounding, and the parts of
/// the interpreter's RSS add up.
#[test]
fn rss_explained_on_python() {
    let py = python();
    let code = "import mmap, sys, time\n\
                m = mmap.mmap(-1, 64 << 20)\n\
                m[0:16 << 20] = b'x' * (16 << 20)\n\
                print('rss-fixture: done', file=sys.stderr, flush=True)\n\
                time.sleep(30)\n";
    let mut args = os(&["--json", "--duration", "40s", "--top", "1000", "--"]);
    args.extend([py.into_os_string(), "-c".into(), code.into()]);
    // The report is taken (SIGINT) once the interpreter says it has written the 16 MiB.
    let mut mp = start_trace(&args, String::new);
    mp.expect_stderr_start("rss-fixture: done", Duration::from_secs(30), String::new);
    mp.signal(libc::SIGINT);
    let run = mp.finish(DEADLINE);
    let report = run.report();
    let ctx = || {
        format!(
            "rss_explained: {}\n{}",
            report["rss_explained"],
            summary(&report)
        )
    };
    let mut c = Checks::new("rss explained (python3)");
    let rss = &report["rss_explained"];
    if !rss.is_object() {
        c.check(false, "the report has no rss_explained");
        c.finish(ctx);
        return;
    }
    check_parts(&mut c, "report", rss);
    let groups: Vec<&Value> = array(&report, "leaks")
        .iter()
        .filter(|g| num(g, "bytes") == 64 * MIB && g["kind"] == "mmap")
        .collect();
    c.eq("mmap groups of 64 MiB", groups.len(), 1);
    if let Some(g) = groups.first() {
        let resident = num(g, "resident_bytes");
        c.check(
            (16 * MIB..=18 * MIB).contains(&resident),
            format!("the mapping's resident_bytes {resident} should be 16 MiB (+ <= 2 MiB)"),
        );
    }
    c.check(
        num(rss, "untouched_live_bytes") >= 46 * MIB,
        "at least 46 MiB of the mapping was never touched",
    );
    c.finish(ctx);
}

/// `redis-cli -s SOCKET ARGS...`'s output; panics unless it succeeds.
fn redis_cli(socket: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(tool("REDIS_CLI", "redis-cli"))
        .arg("-s")
        .arg(socket)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
    assert!(
        out.status.success(),
        "redis-cli {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Debian's redis-server (jemalloc): 200 000 values of 512 B, then every other key deleted,
/// while traced; the report is taken after that (SIGINT). The freed values stay in jemalloc's partly used slabs: jemalloc's own
/// statistics (`INFO memory`: `allocator_resident - allocator_allocated`) say how much it keeps
/// resident beyond what is allocated, and memprof's `allocator_retained_bytes` must agree
/// within 10% (plus 4 MiB for what redis allocated before the trace, which memprof cannot tell
/// from freed memory). Every live value is resident, and the parts add up.
#[test]
fn rss_explained_on_redis() {
    crate::common::require_root();
    let dir = crate::common::work_dir(&format!("memprof-rss-redis-{}", std::process::id()));
    let socket = dir.join("redis.sock");
    let _ = std::fs::remove_file(&socket);
    let mut server_cmd = std::process::Command::new(tool("REDIS_SERVER", "redis-server"));
    server_cmd
        .args(["--port", "0", "--save", "", "--appendonly", "no"])
        .args(["--enable-debug-command", "yes", "--unixsocket"])
        .arg(&socket);
    let mut server = Proc::spawn("redis-server", &mut server_cmd);
    let ready = std::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() && std::time::Instant::now() < ready {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        socket.exists(),
        "redis-server made no socket\n{}",
        server.output_so_far()
    );
    // Ended by SIGINT once redis is done (the safety net's --duration aside): a fixed
    // duration could end the trace before a slowed-down redis has deleted the keys.
    let mp = attach(&server, &["--top", "20"]);
    redis_cli(&socket, &["DEBUG", "POPULATE", "200000", "key", "512"]);
    redis_cli(
        &socket,
        &[
            "EVAL",
            "for i = 0, 199999, 2 do redis.call('DEL', 'key:' .. i) end return 0",
            "0",
        ],
    );
    let dbsize = redis_cli(&socket, &["DBSIZE"]);
    let info = redis_cli(&socket, &["INFO", "memory"]);
    mp.signal(libc::SIGINT);
    let run = mp.finish(DEADLINE);
    server.stop(libc::SIGTERM, Duration::from_secs(5));
    let stat = |key: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in INFO memory:\n{info}"))
    };
    let jemalloc_kept = stat("allocator_resident").saturating_sub(stat("allocator_allocated"));

    let report = run.report();
    let ctx = || {
        format!(
            "DBSIZE {dbsize}INFO memory:\n{info}\nrss_explained: {}\n{}",
            report["rss_explained"],
            summary(&report)
        )
    };
    let mut c = Checks::new("rss explained (redis-server)");
    c.eq(
        "DBSIZE after deleting every other key",
        dbsize.trim(),
        "100000",
    );
    let rss = &report["rss_explained"];
    if !rss.is_object() {
        c.check(false, "the report has no rss_explained");
        c.finish(ctx);
        return;
    }
    check_parts(&mut c, "report", rss);
    let retained = num(rss, "allocator_retained_bytes");
    let live = num(rss, "live_resident_bytes");
    // What memprof finds resident in jemalloc's regions is what jemalloc says it has resident.
    let resident = stat("allocator_resident");
    c.check(
        (live + retained).abs_diff(resident) <= resident / 20 + 4 * MIB,
        format!(
            "live {live} + retained {retained} should match jemalloc's allocator_resident \
             {resident} within 5% + 4 MiB"
        ),
    );
    // memprof's live bytes are the sizes asked for; jemalloc's allocated bytes are its size
    // classes (a 518-byte value takes 640): the difference lies in pages that hold live
    // blocks but no live byte, which memprof counts as retained and jemalloc as allocated.
    let rounding =
        stat("allocator_allocated").saturating_sub(num(&report["totals"], "outstanding_bytes"));
    c.check(
        retained + 4 * MIB >= jemalloc_kept
            && retained <= jemalloc_kept + rounding + jemalloc_kept / 10 + 4 * MIB,
        format!(
            "allocator_retained_bytes {retained} should be jemalloc's resident - allocated \
             {jemalloc_kept}, plus at most its size-class rounding of live blocks {rounding} \
             (+ 10% + 4 MiB)"
        ),
    );
    let (bytes, resident) = array(&report, "leaks").iter().fold((0, 0), |(b, r), g| {
        (b + num(g, "bytes"), r + num(g, "resident_bytes"))
    });
    c.check(
        bytes > 50 * MIB && resident * 100 >= bytes * 99,
        format!(
            "the top groups hold {bytes} B (> 50 MiB), of which {resident} B resident (>= 99%)"
        ),
    );
    c.check(
        array(&report, "recommendations")
            .iter()
            .any(|r| r["kind"] == "retained"),
        "a `retained` recommendation",
    );
    c.finish(ctx);
}
