//! The end of a trace: --duration and SIGINT hold against a hostile Python fake and against
//! records pouring in faster than memprof takes them.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    Dir, NOBODY, cc,
    common::{Proc, final_report, memprof_trace, num, require_root},
    wait_tracing,
};

/// A process named like python, run by `nobody`, exporting `_PyRuntime` whose interpreter,
/// thread and frame lists all loop back on themselves: the trace ends as soon after --duration
/// as it does for the same program under another name (within 1 s; detaching the probes
/// aside, the kernel's RCU waits that --probe-stats reports), with a report and no event lost
/// (it once ran 736 s for --duration 15s and lost 478 million events).
#[test]
fn cyclic_python_fake_cannot_delay_the_trace() {
    require_root();
    let dir = Dir::new("pyfake");
    let fake = dir.path("fakepython3");
    cc(
        &dir,
        &fake,
        r#"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
/* Every word points back at the array: each list, chain and object is a cycle of one. */
uint64_t _PyRuntime[16384];
uint32_t Py_Version = 0x030b00f0; /* 3.11.0 */
void *volatile sink;
int main(void) {
    for (int i = 0; i < 16384; i++) _PyRuntime[i] = (uint64_t)(uintptr_t)_PyRuntime;
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        /* About 10,000 allocations a second: what --unwind dwarf keeps up with on a busy
           machine, so any loss would be the fake's doing. */
        for (int i = 0; i < 10; i++) { sink = malloc(64 + i); free(sink); }
        usleep(1000);
    }
}
"#,
        &[],
    );
    // The same program under a name memprof does not take for python.
    let control = dir.path("plaincontrol");
    fs::copy(&fake, &control).unwrap();
    let mut ends = Vec::new();
    for exe in [&control, &fake] {
        let name = exe.file_name().unwrap().to_str().unwrap().to_string();
        let mut cmd = Command::new(exe);
        cmd.uid(NOBODY).gid(NOBODY).stdout(Stdio::piped());
        let mut target = Proc::spawn(&name, &mut cmd);
        target.expect_stdout_line("ready");
        let pid = target.pid().to_string();
        for args in [
            vec![
                "--json",
                "--probe-stats",
                "--all",
                "--comm",
                &name,
                "--duration",
                "4s",
            ],
            vec![
                "--json",
                "--probe-stats",
                "--pid",
                &pid,
                "--unwind",
                "dwarf",
                "--duration",
                "4s",
            ],
        ] {
            let mp = Proc::spawn("memprof", &mut memprof_trace(&args));
            let f = mp.finish(Duration::from_secs(60));
            let report = final_report(&f);
            let detach_ms: f64 = f
                .stderr
                .lines()
                .find_map(|l| {
                    l.strip_prefix("memprof: detached ")?
                        .split(" in ")
                        .nth(1)?
                        .strip_suffix(" ms")?
                        .parse()
                        .ok()
                })
                .unwrap_or_else(|| panic!("no detach time\n{}", f.context()));
            let elapsed = report["elapsed_s"].as_f64().unwrap() - detach_ms / 1e3;
            eprintln!(
                "{name} {args:?}: trace took {elapsed:.3} s besides detaching ({detach_ms:.0} ms)"
            );
            assert_eq!(
                num(&report["totals"], "lost_events"),
                0,
                "{args:?}\n{}",
                f.context()
            );
            assert!(num(&report["totals"], "allocs") > 10_000, "{args:?}");
            ends.push(elapsed);
        }
    }
    for (control, fake) in [(ends[0], ends[2]), (ends[1], ends[3])] {
        assert!(
            fake < (control + 1.0).max(5.0),
            "the python fake's trace took {fake:.3} s, the control's {control:.3} s"
        );
    }
}

/// Threads that allocate flat out from deep stacks, each record carrying a stack copy.
const FLOOD: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
void *volatile sink;
__attribute__((noinline)) static int down(int depth) {
    volatile char pad[256];
    pad[0] = (char)depth;
    if (depth == 0)
        for (;;) { sink = malloc(64); free(sink); }
    return down(depth - 1) + pad[0];
}
static void *run(void *arg) { down(100); return arg; }
int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    pthread_t t;
    for (int i = 1; i < threads; i++) pthread_create(&t, 0, run, 0);
    printf("ready\n");
    fflush(stdout);
    run(0);
}
"#;

/// A target run by `nobody` whose 8 threads allocate flat out, faster than memprof takes the
/// records with `--unwind dwarf` on a busy machine: what does not fit in the ring is dropped
/// by the kernel and counted, and the trace still ends within 1.5 s of --duration (or of
/// SIGINT), detaching and the report included: what the end finds no time for is let go
/// unread and counted. It once ran 38 s for --duration 4s: the event
/// loop drained the ring until it was empty before detaching the probes, which does not happen
/// while records pour in.
#[test]
fn event_flood_cannot_delay_the_end() {
    require_root();
    let dir = Dir::new("flood");
    let exe = dir.path("flooder");
    cc(&dir, &exe, FLOOD, &["-pthread"]);
    let mut cmd = Command::new(&exe);
    cmd.arg("8").uid(NOBODY).gid(NOBODY);
    let mut target = Proc::spawn("flooder", &mut cmd);
    target.expect_stdout_line("ready");
    let pid = target.pid().to_string();
    let runs: [(&[&str], bool); 4] = [
        (
            &[
                "--all",
                "--comm",
                "flooder",
                "--unwind",
                "dwarf",
                "--duration",
                "3s",
            ],
            false,
        ),
        (
            &["--pid", &pid, "--unwind", "dwarf", "--duration", "3s"],
            false,
        ),
        (&["--pid", &pid, "--duration", "3s"], false),
        (&["--pid", &pid, "--unwind", "dwarf"], true),
    ];
    for (args, interrupt) in runs {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let mut mp = Proc::spawn("memprof", &mut memprof_trace(&full));
        wait_tracing(&mut mp);
        let start = Instant::now();
        if interrupt {
            thread::sleep(Duration::from_secs(3));
            mp.signal(libc::SIGINT);
        }
        let f = mp.finish(Duration::from_secs(60));
        let took = start.elapsed().as_secs_f64();
        let report = final_report(&f);
        eprintln!(
            "{args:?}: ended {took:.3} s after the trace began, {} allocations taken, {} events lost",
            num(&report["totals"], "allocs"),
            num(&report["totals"], "lost_events")
        );
        assert!(
            took < 4.5,
            "{args:?}: ended {took:.3} s after the trace began"
        );
        assert!(num(&report["totals"], "allocs") > 0, "{args:?}");
        // Records let go unread at the end are among the lost.
        assert!(
            num(&report["totals"], "unread_at_end") <= num(&report["totals"], "lost_events"),
            "{args:?}"
        );
    }
}
