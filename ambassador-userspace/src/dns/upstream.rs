//! The forwarder's side toward a resolver: over UDP, sockets connected to
//! it, each with a source port of the kernel's random choice, kept in a
//! small pool and used one query at a time (what a datagram answers is
//! checked: its id and question; a socket whose query went unanswered is
//! closed, never reused); over TCP, one connection per app connection,
//! queries one at a time.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

use super::wire::{Answer, Query};
use crate::net::Settings;

/// Idle sockets kept per resolver (more queries at once get new ones).
const POOL: usize = 64;

/// A resolver's idle connected UDP sockets.
#[derive(Default)]
pub struct UdpPool {
    idle: Mutex<Vec<UdpSocket>>,
}

impl UdpPool {
    fn take(&self) -> Option<UdpSocket> {
        crate::sync::lock(&self.idle).pop()
    }

    fn give_back(&self, sock: UdpSocket) {
        let mut idle = crate::sync::lock(&self.idle);
        if idle.len() < POOL {
            idle.push(sock);
        }
    }
}

pub enum Upstream {
    Udp {
        resolver: SocketAddr,
        mark: Option<u32>,
        pool: Arc<UdpPool>,
    },
    Tcp {
        resolver: SocketAddr,
        settings: Settings,
        conn: Option<TcpStream>,
    },
}

impl Upstream {
    pub fn resolver(&self) -> SocketAddr {
        match self {
            Upstream::Udp { resolver, .. } | Upstream::Tcp { resolver, .. } => *resolver,
        }
    }

    /// Sends `bytes` (the query `q` as the app wrote it) and returns the
    /// resolver's answer, read as an answer to `q`.
    /// `full`: read the answer's records too (to learn from), not only
    /// its header and question.
    pub async fn exchange(
        &mut self,
        q: &Query,
        bytes: &[u8],
        full: bool,
    ) -> io::Result<(Vec<u8>, Answer)> {
        match self {
            Upstream::Udp {
                resolver,
                mark,
                pool,
            } => {
                let sock = match pool.take() {
                    Some(s) => s,
                    None => udp_socket(*resolver, *mark).await?,
                };
                let answered = udp(&sock, q, bytes, full).await?;
                // Only a socket whose query was answered goes back: one still
                // waiting might take a late answer for the next query.
                pool.give_back(sock);
                Ok(answered)
            }
            Upstream::Tcp {
                resolver,
                settings,
                conn,
            } => {
                if conn.is_none() {
                    let c = crate::net::connect(*resolver, settings)
                        .await
                        .map_err(io::Error::other)?;
                    *conn = Some(c);
                }
                let c = conn.as_mut().expect("connected above");
                let result = tcp(c, q, bytes, full).await;
                if result.is_err() {
                    // Its state is unknown: the next query connects again.
                    *conn = None;
                }
                result
            }
        }
    }
}

/// A UDP socket of the proxy's (marked, if so configured), connected to
/// the resolver from a port the kernel picks.
async fn udp_socket(resolver: SocketAddr, mark: Option<u32>) -> io::Result<UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(resolver),
        socket2::Type::DGRAM,
        None,
    )?;
    if let Some(m) = mark {
        sock.set_mark(m)?;
    }
    sock.set_nonblocking(true)?;
    let any: IpAddr = match resolver {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    sock.bind(&SocketAddr::new(any, 0).into())?;
    let sock = UdpSocket::from_std(sock.into())?;
    sock.connect(resolver).await?;
    Ok(sock)
}

async fn udp(
    sock: &UdpSocket,
    q: &Query,
    bytes: &[u8],
    full: bool,
) -> io::Result<(Vec<u8>, Answer)> {
    sock.send(bytes).await?;
    let mut buf = vec![0u8; q.max_udp_answer() + 1];
    loop {
        let n = sock.recv(&mut buf).await?;
        // A datagram that is no answer to this query is ignored (the
        // caller's timeout bounds the wait).
        if let Ok(answer) = Answer::read(q, &buf[..n], full) {
            buf.truncate(n);
            return Ok((buf, answer));
        }
    }
}

async fn tcp(
    c: &mut TcpStream,
    q: &Query,
    bytes: &[u8],
    full: bool,
) -> io::Result<(Vec<u8>, Answer)> {
    let len = u16::try_from(bytes.len()).map_err(|_| io::Error::other("query too long"))?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    c.write_all(&framed).await?;
    let reply = read_framed(c).await?;
    let answer = Answer::read(q, &reply, full).map_err(io::Error::other)?;
    Ok((reply, answer))
}

/// One length-prefixed DNS message (RFC 1035 §4.2.2).
pub async fn read_framed(c: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = c.read_u16().await?;
    let mut msg = vec![0u8; usize::from(len)];
    c.read_exact(&mut msg).await?;
    Ok(msg)
}
