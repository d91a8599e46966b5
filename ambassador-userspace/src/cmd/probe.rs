//! `ambassador probe live|ready`: the sidecar's container probes.
//!
//! The admin API listens on the Pod's loopback. The kubelet makes `httpGet`
//! probes from the node's network namespace (to the Pod IP unless `host` says
//! otherwise; `host: 127.0.0.1` would be the node's own loopback), so it cannot
//! reach it; an `exec` probe runs inside the container, in the Pod's network
//! namespace, and the image has no curl. One GET, a short timeout, exit 0 on 2xx.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// Where the admin API listens unless `proxy.admin` says otherwise.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15020";

const TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Check {
    /// `/live`: the process answers.
    Live,
    /// `/ready`: interception attached and config loaded.
    Ready,
}

impl Check {
    fn path(self) -> &'static str {
        match self {
            Check::Live => "/live",
            Check::Ready => "/ready",
        }
    }
}

/// Why a probe failed: the probe's whole output, one line.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("admin API at {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("admin API at {addr}: {path} answered {status}")]
    Status {
        addr: SocketAddr,
        path: &'static str,
        status: String,
    },
}

/// Asks the admin API; Ok when it answers 2xx.
pub fn probe(check: Check, addr: SocketAddr) -> Result<(), ProbeError> {
    let io_err = |source| ProbeError::Io { addr, source };
    let mut conn = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(io_err)?;
    conn.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    conn.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
    let path = check.path();
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(io_err)?;
    // The status line is all that matters; 256 bytes hold it.
    let mut head = [0u8; 256];
    let mut n = 0;
    while n < head.len() && !head[..n].contains(&b'\n') {
        match conn.read(&mut head[n..]).map_err(io_err)? {
            0 => break,
            m => n += m,
        }
    }
    let text = String::from_utf8_lossy(&head[..n]);
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") && code.starts_with('2') => Ok(()),
        (Some(v), Some(_)) if v.starts_with("HTTP/") => Err(ProbeError::Status {
            addr,
            path,
            status: line[v.len()..].trim().to_string(),
        }),
        _ => Err(ProbeError::Status {
            addr,
            path,
            status: "something that is not HTTP".into(),
        }),
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(value_enum)]
    what: Check,
    /// The admin API's address.
    #[arg(long, default_value = DEFAULT_ADMIN)]
    admin: SocketAddr,
}

pub fn main(args: Args) -> anyhow::Result<std::process::ExitCode> {
    probe(args.what, args.admin)?;
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A real HTTP/1.1 server on loopback: `/live` 200, `/ready` 503.
    fn admin_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in l.incoming().take(3) {
                let mut conn = conn.unwrap();
                let mut buf = [0u8; 512];
                let n = conn.read(&mut buf).unwrap();
                let req = String::from_utf8_lossy(&buf[..n]);
                let reply = if req.starts_with("GET /live ") {
                    "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"
                } else if req.starts_with("GET /ready ") {
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
                } else {
                    "garbage\r\n"
                };
                conn.write_all(reply.as_bytes()).unwrap();
            }
        });
        addr
    }

    #[test]
    fn answers_follow_the_status() {
        let addr = admin_server();
        probe(Check::Live, addr).unwrap();
        let e = probe(Check::Ready, addr).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("admin API at {addr}: /ready answered 503 Service Unavailable")
        );
    }

    #[test]
    fn nothing_listening_is_a_failure() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = probe(Check::Live, addr).unwrap_err().to_string();
        assert!(e.starts_with(&format!("admin API at {addr}: ")), "{e}");
        assert!(e.contains("refused"), "{e}");
    }
}
