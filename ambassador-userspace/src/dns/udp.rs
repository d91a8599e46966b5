//! The forwarder's UDP sockets: resolver `i` is answered on 127.0.0.1 and
//! ::1 port `dns.port + i`, where the kernel sends the app's queries to it.
//! Each query is its own task, bounded in number: past the bound a query
//! is dropped (counted) and the app's resolver asks again.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use tokio::{net::UdpSocket, sync::watch};
use tracing::{info, warn};

use super::{Tables, Upstream, upstream::UdpPool};

/// Queries in flight at once.
const IN_FLIGHT: usize = 1024;
/// The largest query read (a query is a few dozen bytes; EDNS options add
/// a few more).
const MAX_QUERY: usize = 4096;

/// One forwarder socket and the resolver it answers for.
pub struct Listener {
    sock: Arc<UdpSocket>,
    resolver: SocketAddr,
    /// Sockets toward the resolver, kept between queries.
    pool: Arc<UdpPool>,
}

/// Binds the sockets for `resolvers` from `port` on (IPv6 only where the
/// host has it).
pub fn bind(resolvers: &[IpAddr], port: u16) -> io::Result<Vec<Listener>> {
    let mut all = Vec::new();
    for (i, r) in resolvers.iter().enumerate() {
        let p = port + i as u16;
        let resolver = SocketAddr::new(*r, 53);
        let v4 = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, p)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot bind the DNS forwarder on 127.0.0.1:{p}: {e}"),
            )
        })?;
        all.push(listener(v4, resolver)?);
        if let Ok(v6) = std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, p)) {
            all.push(listener(v6, resolver)?);
        }
    }
    Ok(all)
}

/// As `bind`, from a free port on: any block of consecutive free ports
/// (for `run`, where several may share a host). Returns the first port.
pub fn bind_anywhere(resolvers: &[IpAddr]) -> io::Result<(Vec<Listener>, u16)> {
    if resolvers.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let mut last = None;
    for _ in 0..32 {
        let first = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        if u32::from(first) + resolvers.len() as u32 > 65535 {
            continue;
        }
        match bind(resolvers, first) {
            Ok(l) => return Ok((l, first)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free ports for the DNS forwarder")))
}

fn listener(sock: std::net::UdpSocket, resolver: SocketAddr) -> io::Result<Listener> {
    sock.set_nonblocking(true)?;
    Ok(Listener {
        sock: Arc::new(UdpSocket::from_std(sock)?),
        resolver,
        pool: Arc::default(),
    })
}

/// Answers queries until `shutdown` turns true.
pub async fn serve(listeners: Vec<Listener>, tables: Tables, shutdown: watch::Receiver<bool>) {
    if listeners.is_empty() {
        return;
    }
    let resolvers: Vec<String> = listeners
        .iter()
        .map(|l| l.resolver.ip().to_string())
        .collect();
    info!(resolvers = %resolvers.join(", "), "DNS forwarder listening");
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut loops = tokio::task::JoinSet::new();
    for l in listeners {
        loops.spawn(one(l, tables.clone(), slots.clone(), shutdown.clone()));
    }
    while loops.join_next().await.is_some() {}
}

async fn one(
    l: Listener,
    tables: Tables,
    slots: Arc<tokio::sync::Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let m = crate::metrics::get().dns();
    let mut buf = vec![0u8; MAX_QUERY];
    loop {
        let (n, from) = tokio::select! {
            r = l.sock.recv_from(&mut buf) => match r {
                Ok(got) => got,
                Err(e) => {
                    warn!(resolver = %l.resolver, "DNS forwarder: {e}");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            m.query("dropped", None);
            continue;
        };
        let query = buf[..n].to_vec();
        let (sock, table, m) = (l.sock.clone(), tables(), m.clone());
        let mut up = Upstream::Udp {
            resolver: l.resolver,
            mark: table.settings.mark,
            pool: l.pool.clone(),
        };
        tokio::spawn(async move {
            if let Some(reply) = super::answer(&query, &mut up, &table, "udp", &m).await {
                let _ = sock.send_to(&reply, from).await;
            }
            drop(slot);
        });
    }
}
