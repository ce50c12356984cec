//! The HTTP endpoints under a flood of idle connections and a rebinding page.

use std::{
    fs,
    net::TcpStream,
    time::{Duration, Instant},
};

use crate::{
    CHURN, Dir, cc,
    common::{Proc, memprof_trace, require_root},
    free_port, get, raise_fd_limit, status_field, wait_tracing,
};

/// 10,000 idle connections, 5,000 to each of --metrics and --ui: both still answer a normal
/// client, with memprof's threads and descriptors bounded; a rebinding page's Host is refused.
#[test]
fn idle_connection_floods_leave_endpoints_answering() {
    require_root();
    assert!(
        raise_fd_limit() > 10_500,
        "the test needs 10,500 descriptors"
    );
    let dir = Dir::new("flood");
    let exe = dir.path("churn");
    cc(&dir, &exe, CHURN, &[]);
    let (metrics, ui) = (free_port(), free_port());
    let mut mp = Proc::spawn(
        "memprof",
        memprof_trace(&[
            "--metrics",
            &metrics.to_string(),
            "--ui",
            &ui.to_string(),
            "--duration",
            "120s",
            "--",
        ])
        .arg(&exe),
    );
    wait_tracing(&mut mp);
    let pid = mp.pid();
    let fds = || fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let before = (status_field(pid, "Threads").unwrap(), fds());
    let started = Instant::now();
    let mut idle = Vec::new();
    for port in [metrics, ui] {
        for _ in 0..5_000 {
            if let Ok(s) =
                TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))
            {
                idle.push(s);
            }
        }
    }
    let opened = idle.len();
    let flood = started.elapsed();
    let threads = status_field(pid, "Threads").unwrap();
    let open_fds = fds();
    let t = Instant::now();
    let m = get(metrics, "/metrics", &format!("127.0.0.1:{metrics}")).unwrap();
    let s = get(ui, "/api/state", "localhost").unwrap();
    let answered = t.elapsed();
    let rss = status_field(pid, "VmHWM").unwrap();
    eprintln!(
        "flood: {opened} connections in {flood:?}; memprof threads {} -> {threads}, fds {} -> \
         {open_fds}, peak RSS {} MiB; answers in {answered:?}",
        before.0,
        before.1,
        rss >> 20
    );
    assert!(opened >= 9_900, "only {opened} connections opened");
    assert!(
        m.starts_with("HTTP/1.0 200") && m.contains("memprof_up"),
        "{m}"
    );
    assert!(
        s.starts_with("HTTP/1.0 200") && s.contains("\"updates\""),
        "{s}"
    );
    assert!(answered < Duration::from_secs(2), "{answered:?}");
    assert!(
        threads <= before.0,
        "threads grew: {} -> {threads}",
        before.0
    );
    assert!(
        open_fds <= before.1 + 2 * 128 + 2 * 128,
        "fds: {} -> {open_fds}",
        before.1
    );
    let rebound = get(ui, "/api/state", "attacker.example").unwrap();
    assert!(rebound.starts_with("HTTP/1.0 421"), "{rebound}");
    drop(idle);
    mp.signal(libc::SIGINT);
    let f = mp.finish(Duration::from_secs(60));
    assert!(!f.stderr.contains("panicked"), "{}", f.context());
}
