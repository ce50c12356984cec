//! What the HTTP endpoints share: listen addresses (loopback unless another is typed), binding,
//! headers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs as _};

use anyhow::{Context as _, anyhow, bail};

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

/// Binds `addr` for the endpoint `flag` (`--metrics`, `--ui`).
pub(super) fn bind(flag: &str, addr: &str) -> anyhow::Result<(tiny_http::Server, SocketAddr)> {
    let sa = listen_addr(addr).with_context(|| format!("{flag} {addr}: invalid address"))?;
    let server = tiny_http::Server::http(sa)
        .map_err(|e| anyhow!("{flag} {addr}: cannot listen on {sa}: {e}"))?;
    // With port 0 the system picks the port: report the real one.
    let bound = server.server_addr().to_ip().unwrap_or(sa);
    Ok((server, bound))
}

/// A header for tiny_http responses.
pub(super) fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes())
        .expect("static header names and values are valid")
}

#[cfg(test)]
mod tests {
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
}
