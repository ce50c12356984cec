//! What the HTTP endpoints share: listen addresses (loopback unless another is typed), and one
//! bounded server on memprof's tokio runtime (hyper, HTTP/1.1) that both run on.
//!
//! The server holds up against clients that try to exhaust it: at most [`MAX_CONNECTIONS`]
//! connections are open at once, and a new one pushes out the oldest connection that has no
//! request in progress (a connection whose every slot is busy with a request or an event stream
//! is refused instead), so idle connections cannot lock out a client that asks something.
//! Request headers are limited to [`MAX_HEADER_BYTES`] and must arrive within
//! [`HEADER_TIMEOUT`]; no request body is ever read (only GET and HEAD are served); a
//! connection lives [`CONNECTION_LIFETIME`] at most unless it streams events. No thread is
//! started per connection: every connection is a task on the runtime.
//!
//! When bound to a loopback address, requests must name a loopback host (`Host: 127.0.0.1`,
//! `localhost`, `[::1]`, any port): a web page that rebinds its own DNS name to 127.0.0.1 is
//! answered 421 and learns nothing. With `--http-token FILE`, every request must carry the
//! token from FILE, as `Authorization: Bearer TOKEN` or `?token=TOKEN` (for a browser's page and
//! its event stream), or it is answered 401.

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs as _},
    path::Path,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Notify, mpsc};

/// Connections open at once, per endpoint.
pub const MAX_CONNECTIONS: usize = 128;
/// The most a request's header may hold (hyper's smallest read buffer).
pub const MAX_HEADER_BYTES: usize = 8192;
/// How long a client has to send a request's header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection lives at most, unless it is streaming events.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// The longest token file read.
const MAX_TOKEN_BYTES: u64 = 4096;

/// Parses a listen address: `HOST:PORT`, or a bare `PORT` / `:PORT` meaning 127.0.0.1:PORT.
pub fn listen_addr(addr: &str) -> anyhow::Result<SocketAddr> {
    let s = addr.trim();
    let loopback = |port: &str| -> anyhow::Result<SocketAddr> {
        let port: u16 = port
            .parse()
            .map_err(|_| anyhow!("{port:?} is not a port number"))?;
        Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
    };
    if s.is_empty() {
        bail!("empty address: expected HOST:PORT or PORT");
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return loopback(s);
    }
    if let Some(port) = s.strip_prefix(':') {
        return loopback(port);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if s.parse::<IpAddr>().is_ok() || !s.contains(':') {
        bail!("{s:?} has no port: expected HOST:PORT or PORT");
    }
    s.to_socket_addrs()
        .with_context(|| format!("cannot resolve {s:?}"))?
        .next()
        .ok_or_else(|| anyhow!("{s:?} resolves to no address"))
}

/// Reads the bearer token of `--http-token FILE`: a regular file of at most 4 KiB, its text
/// trimmed, not empty.
pub fn read_token(path: &Path) -> anyhow::Result<Arc<str>> {
    use std::io::Read as _;
    let name = path.display();
    use std::os::unix::fs::OpenOptionsExt as _;
    // Non-blocking: a FIFO must not hang the start.
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("--http-token {name}"))?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        bail!("--http-token {name}: not a regular file");
    }
    let mut text = String::new();
    file.take(MAX_TOKEN_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("--http-token {name}: not text"))?;
    if text.len() as u64 > MAX_TOKEN_BYTES {
        bail!("--http-token {name}: longer than {MAX_TOKEN_BYTES} bytes");
    }
    let token = text.trim();
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("--http-token {name}: expected one token without spaces");
    }
    Ok(token.into())
}

/// How the endpoints are guarded.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    /// `--http-token`: the token every request must carry.
    pub token: Option<Arc<str>>,
}

/// A response body: whole, or a stream of chunks (Server-Sent Events) that ends when its
/// sender goes away.
pub enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>, Busy),
}

impl Body {
    pub fn text(s: impl Into<String>) -> Self {
        Body::Full(Some(Bytes::from(s.into())))
    }

    pub fn empty() -> Self {
        Body::Full(None)
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Stream(rx, _) => rx.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Body::Full(Some(d)) => hyper::body::SizeHint::with_exact(d.len() as u64),
            Body::Full(None) => hyper::body::SizeHint::with_exact(0),
            Body::Stream(..) => hyper::body::SizeHint::default(),
        }
    }
}

/// A connection's count of work in progress: while it is not zero the connection is not idle
/// (neither pushed out for a newcomer nor closed at the end of its lifetime).
#[derive(Default)]
pub struct Slot {
    busy: AtomicUsize,
    close: Notify,
}

/// Holds its connection busy until dropped (with the request's response, or its event stream).
pub struct Busy(Arc<Slot>);

impl Busy {
    fn new(slot: &Arc<Slot>) -> Self {
        slot.busy.fetch_add(1, Ordering::SeqCst);
        Busy(slot.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a route handler gets: the request's method, path and query, and the connection's slot
/// (to hold it busy while streaming).
pub struct Ask<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    /// The query string, without its `?` (empty when none).
    pub query: &'a str,
    pub slot: &'a Arc<Slot>,
}

impl Ask<'_> {
    /// Marks the connection busy for as long as the returned guard lives.
    pub fn busy(&self) -> Busy {
        Busy::new(self.slot)
    }
}

/// A handler's answer: a response now, or one that comes later (a profile taken over seconds).
/// A later answer holds its connection busy itself ([`Ask::busy`]) until it is ready.
pub enum Reply {
    Now(Response<Body>),
    Later(Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>),
}

impl From<Response<Body>> for Reply {
    fn from(r: Response<Body>) -> Self {
        Reply::Now(r)
    }
}

/// A route handler: the answer to a GET or HEAD request that passed the guards.
pub type Handler = Arc<dyn Fn(Ask<'_>) -> Reply + Send + Sync>;

/// A response with a status and a plain-text body.
pub fn status(code: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(Body::text(text));
    *r.status_mut() = code;
    r
}

/// Adds a header to a response.
pub fn with_header(
    mut r: Response<Body>,
    name: header::HeaderName,
    value: &'static str,
) -> Response<Body> {
    r.headers_mut()
        .insert(name, HeaderValue::from_static(value));
    r
}

/// Binds `addr` for the endpoint `flag` (`--metrics`, `--ui`) now, so errors come before the
/// trace starts.
pub fn bind(flag: &str, addr: &str) -> anyhow::Result<(std::net::TcpListener, SocketAddr)> {
    let sa = listen_addr(addr).with_context(|| format!("{flag} {addr}: invalid address"))?;
    let listener = std::net::TcpListener::bind(sa)
        .map_err(|e| anyhow!("{flag} {addr}: cannot listen on {sa}: {e}"))?;
    listener.set_nonblocking(true)?;
    // With port 0 the system picks the port: report the real one.
    let bound = listener.local_addr().unwrap_or(sa);
    Ok((listener, bound))
}

/// Serves `handler` on `listener` (bound at `bound`) from the runtime of `runtime`.
pub fn spawn(
    runtime: &tokio::runtime::Handle,
    listener: std::net::TcpListener,
    bound: SocketAddr,
    guard: Guard,
    handler: Handler,
) -> anyhow::Result<()> {
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    runtime.spawn(accept_loop(listener, bound, guard, handler));
    Ok(())
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    bound: SocketAddr,
    guard: Guard,
    handler: Handler,
) {
    let open: Arc<Mutex<VecDeque<Arc<Slot>>>> = Arc::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors, or the like: wait rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = Arc::new(Slot::default());
        {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            if open.len() >= MAX_CONNECTIONS {
                // Push out the oldest connection doing nothing; if every one is busy, the
                // newcomer is the one turned away.
                match open.iter().position(|s| s.busy.load(Ordering::SeqCst) == 0) {
                    Some(i) => {
                        if let Some(old) = open.remove(i) {
                            old.close.notify_one();
                        }
                    }
                    None => continue,
                }
            }
            open.push_back(slot.clone());
        }
        let (open, guard, handler) = (open.clone(), guard.clone(), handler.clone());
        tokio::spawn(async move {
            connection(stream, &slot, bound, guard, handler).await;
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = open.iter().position(|s| Arc::ptr_eq(s, &slot)) {
                open.remove(i);
            }
        });
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    slot: &Arc<Slot>,
    bound: SocketAddr,
    guard: Guard,
    handler: Handler,
) {
    let for_service = slot.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let reply = answer(&request, &for_service, bound, &guard, &handler);
        async move {
            Ok::<_, Infallible>(match reply {
                Reply::Now(response) => response,
                Reply::Later(response) => response.await,
            })
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let lifetime = tokio::time::sleep(CONNECTION_LIFETIME);
    tokio::pin!(lifetime);
    loop {
        tokio::select! {
            _ = &mut conn => return,
            _ = slot.close.notified() => return,
            _ = &mut lifetime => {
                if slot.busy.load(Ordering::SeqCst) == 0 {
                    return;
                }
                lifetime.as_mut().reset(tokio::time::Instant::now() + CONNECTION_LIFETIME);
            }
        }
    }
}

/// The guards, then the handler.
fn answer(
    request: &Request<Incoming>,
    slot: &Arc<Slot>,
    bound: SocketAddr,
    guard: &Guard,
    handler: &Handler,
) -> Reply {
    let _busy = Busy::new(slot);
    if bound.ip().is_loopback() && !loopback_host(request) {
        return status(
            StatusCode::MISDIRECTED_REQUEST,
            "this endpoint answers requests for a loopback host only\n",
        )
        .into();
    }
    if let Some(token) = &guard.token
        && !carries_token(request, token)
    {
        return with_header(
            status(
                StatusCode::UNAUTHORIZED,
                "a token is required (--http-token)\n",
            ),
            header::WWW_AUTHENTICATE,
            "Bearer",
        )
        .into();
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return with_header(
            status(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            header::ALLOW,
            "GET, HEAD",
        )
        .into();
    }
    handler(Ask {
        method: request.method(),
        path: request.uri().path(),
        query: request.uri().query().unwrap_or(""),
        slot,
    })
}

/// Whether the request names a loopback host (its `Host` header, or the absolute URI's
/// authority); a request without one (HTTP/1.0) is let through.
fn loopback_host(request: &Request<Incoming>) -> bool {
    let host = match request.headers().get(header::HOST) {
        Some(h) => match h.to_str() {
            Ok(h) => h.to_string(),
            Err(_) => return false,
        },
        None => match request.uri().authority() {
            Some(a) => a.as_str().to_string(),
            None => return true,
        },
    };
    is_loopback_host(&host)
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.starts_with(':') => ip,
            _ => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether the request carries `token` (bearer header, or `token=` in its query).
fn carries_token(request: &Request<Incoming>, token: &str) -> bool {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let query = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    header
        .into_iter()
        .chain(query)
        .any(|t| same(t.as_bytes(), token.as_bytes()))
}

/// Compares in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A runtime for the unit tests of the endpoints: one worker thread, as memprof's own.
#[cfg(test)]
pub(crate) fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
    };

    use super::*;

    #[test]
    fn addresses() {
        let v4 = |s: &str| listen_addr(s).unwrap().to_string();
        assert_eq!(v4("9464"), "127.0.0.1:9464");
        assert_eq!(v4(":9464"), "127.0.0.1:9464");
        assert_eq!(v4("127.0.0.1:9464"), "127.0.0.1:9464");
        assert_eq!(v4("0.0.0.0:9464"), "0.0.0.0:9464");
        assert_eq!(v4("[::1]:80"), "[::1]:80");
        assert!(listen_addr("localhost:9464").unwrap().ip().is_loopback());
        assert!(listen_addr("").is_err());
        assert!(listen_addr("127.0.0.1").is_err());
        assert!(listen_addr(":http").is_err());
        assert!(listen_addr("99999").is_err());
    }

    #[test]
    fn loopback_hosts() {
        for ok in [
            "localhost",
            "LOCALHOST:80",
            "127.0.0.1",
            "127.1.2.3:9464",
            "[::1]",
            "[::1]:1",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9464",
            "10.0.0.1",
            "[::1]x",
            "localhost.evil",
            "",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    fn raw(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn guards_hosts_tokens_methods_and_floods() {
        let rt = test_runtime();
        let handler: Handler = Arc::new(|_ask| Response::new(Body::text("hello\n")).into());
        let (listener, addr) = bind("--test", "127.0.0.1:0").unwrap();
        let token: Arc<str> = "s3cret".into();
        let guard = Guard { token: Some(token) };
        spawn(rt.handle(), listener, addr, guard, handler).unwrap();
        let get = |extra: &str, path: &str| {
            raw(
                addr,
                &format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{extra}\r\n"),
            )
        };
        assert!(get("", "/").starts_with("HTTP/1.0 401"), "{}", get("", "/"));
        assert!(get("Authorization: Bearer nope\r\n", "/").starts_with("HTTP/1.0 401"));
        let ok = get("Authorization: Bearer s3cret\r\n", "/");
        assert!(
            ok.starts_with("HTTP/1.0 200") && ok.ends_with("hello\n"),
            "{ok}"
        );
        assert!(get("", "/?token=s3cret").starts_with("HTTP/1.0 200"));
        let rebound = raw(
            addr,
            "GET / HTTP/1.1\r\nHost: attacker.example:80\r\nAuthorization: Bearer s3cret\r\nConnection: close\r\n\r\n",
        );
        assert!(rebound.starts_with("HTTP/1.1 421"), "{rebound}");
        let post = raw(
            addr,
            "POST / HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer s3cret\r\nContent-Length: 5\r\n\r\nhello",
        );
        assert!(post.starts_with("HTTP/1.0 405"), "{post}");
        // A header larger than the limit is refused, not buffered.
        let big = raw(
            addr,
            &format!(
                "GET / HTTP/1.0\r\nHost: localhost\r\nX: {}\r\n\r\n",
                "a".repeat(64 << 10)
            ),
        );
        assert!(big.is_empty() || big.starts_with("HTTP/1.1 431"), "{big}");

        // Idle connections beyond the cap push out the oldest: a client still gets answers.
        let idle: Vec<TcpStream> = (0..3 * MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let ok = get("Authorization: Bearer s3cret\r\n", "/");
        assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
        drop(idle);
    }

    #[test]
    fn tokens_from_files() {
        let dir = std::env::temp_dir().join(format!("memprof-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "abc123\n").unwrap();
        assert_eq!(&*read_token(&f).unwrap(), "abc123");
        std::fs::write(&f, "two words").unwrap();
        assert!(read_token(&f).is_err());
        std::fs::write(&f, "x".repeat(5000)).unwrap();
        assert!(format!("{:#}", read_token(&f).unwrap_err()).contains("longer than"));
        assert!(format!("{:#}", read_token(&dir).unwrap_err()).contains("not a regular file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
