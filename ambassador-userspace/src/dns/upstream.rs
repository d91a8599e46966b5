//! The forwarder's side toward a resolver: over UDP, a fresh socket per
//! query (a random source port each time, as resolvers expect of a
//! forwarder, and no answer can be mistaken for another query's); over
//! TCP, one connection per app connection, queries one at a time.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

use super::wire::{Answer, Query};
use crate::net::Settings;

pub enum Upstream {
    Udp {
        resolver: SocketAddr,
        mark: Option<u32>,
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
    pub async fn exchange(&mut self, q: &Query, bytes: &[u8]) -> io::Result<(Vec<u8>, Answer)> {
        match self {
            Upstream::Udp { resolver, mark } => udp(*resolver, *mark, q, bytes).await,
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
                let result = tcp(c, q, bytes).await;
                if result.is_err() {
                    // Its state is unknown: the next query connects again.
                    *conn = None;
                }
                result
            }
        }
    }
}

async fn udp(
    resolver: SocketAddr,
    mark: Option<u32>,
    q: &Query,
    bytes: &[u8],
) -> io::Result<(Vec<u8>, Answer)> {
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
    sock.send(bytes).await?;
    let mut buf = vec![0u8; q.max_udp_answer() + 1];
    loop {
        let n = sock.recv(&mut buf).await?;
        // A datagram that is no answer to this query is ignored (the
        // caller's timeout bounds the wait).
        if let Ok(answer) = Answer::read(q, &buf[..n]) {
            buf.truncate(n);
            return Ok((buf, answer));
        }
    }
}

async fn tcp(c: &mut TcpStream, q: &Query, bytes: &[u8]) -> io::Result<(Vec<u8>, Answer)> {
    let len = u16::try_from(bytes.len()).map_err(|_| io::Error::other("query too long"))?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    c.write_all(&framed).await?;
    let reply = read_framed(c).await?;
    let answer = Answer::read(q, &reply).map_err(io::Error::other)?;
    Ok((reply, answer))
}

/// One length-prefixed DNS message (RFC 1035 §4.2.2).
pub async fn read_framed(c: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = c.read_u16().await?;
    let mut msg = vec![0u8; usize::from(len)];
    c.read_exact(&mut msg).await?;
    Ok(msg)
}
