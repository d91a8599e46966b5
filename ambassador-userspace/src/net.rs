//! Sockets toward the network and the app, and nothing above them: the
//! settings every connect uses, connecting with the proxy's mark and a
//! timeout, the loopback listeners, the open-files limit and what is kept
//! back of it, and closing with a reset. Every layer imports this; it
//! imports only the config and the error classification.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::warn;

use crate::error::{Classified, Origin, Retry};

#[derive(Clone, Debug)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// SO_MARK for upstream sockets, so the kernel programs skip them.
    pub mark: Option<u32>,
    /// An HTTP client that has not sent its request head by then is dropped.
    pub header_read_timeout: Duration,
    /// The source address of connections (the inbound path's 127.0.0.6,
    /// which the inbound program lets through); none: the kernel's choice.
    pub bind: Option<IpAddr>,
    /// Plain relays may splice bulk bytes (`proxy.splice`).
    pub splice: bool,
}

impl Settings {
    pub fn from_config(cfg: &crate::config::ProxyConfig) -> Settings {
        Settings {
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            mark: cfg.mark,
            header_read_timeout: cfg.header_read_timeout,
            bind: None,
            splice: cfg.splice,
        }
    }

    /// Fails at start-up, not on the first connection, when the mark cannot be set.
    pub fn check(&self) -> Result<(), ListenError> {
        if let Some(mark) = self.mark {
            let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .and_then(|s| s.set_mark(mark));
            if let Err(source) = probe {
                return Err(ListenError::Mark { mark, source });
            }
        }
        Ok(())
    }
}

/// A connect that did not give a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} failed: {source}")]
    Failed {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error(
        "the proxy's own connection to {0} was intercepted: is proxy.uid the uid the proxy runs as (or proxy.mark set)?"
    )]
    Intercepted(SocketAddr),
}

impl ConnectError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, ConnectError::Timeout(_))
    }
}

impl Classified for ConnectError {
    fn origin(&self) -> Origin {
        match self {
            ConnectError::Intercepted(_) => Origin::Internal,
            _ => Origin::Upstream,
        }
    }

    /// Nothing was sent: another endpoint may be tried at once.
    fn retry(&self) -> Retry {
        match self {
            ConnectError::Intercepted(_) => Retry::Never,
            _ => Retry::Elsewhere,
        }
    }
}

/// Connects to an upstream from the proxy: its own socket (marked when
/// configured), so the kernel programs let it through.
pub async fn connect(dst: SocketAddr, settings: &Settings) -> Result<TcpStream, ConnectError> {
    let failed = |source| ConnectError::Failed { addr: dst, source };
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(failed)?;
    if let Some(mark) = settings.mark {
        socket2::SockRef::from(&sock)
            .set_mark(mark)
            .map_err(failed)?;
    }
    if let Some(ip) = settings.bind {
        sock.bind(SocketAddr::new(ip, 0)).map_err(failed)?;
    }
    match tokio::time::timeout(settings.connect_timeout, sock.connect(dst)).await {
        // A non-loopback destination reached from a loopback address means
        // the kernel sent our own connect back to us: stop the loop here.
        Ok(Ok(s))
            if settings.bind.is_none()
                && !dst.ip().is_loopback()
                && s.local_addr().is_ok_and(|a| a.ip().is_loopback()) =>
        {
            reset(&s);
            Err(ConnectError::Intercepted(dst))
        }
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(failed(source)),
        Err(_) => Err(ConnectError::Timeout(dst)),
    }
}

/// Closes with a reset (`SO_LINGER` 0) when the socket goes: the peer learns
/// at once that the exchange broke, rather than seeing a clean end.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "port {port} on {ip} is in use (is another ambassador or program listening there? set proxy.port)"
    )]
    InUse { ip: IpAddr, port: u16 },
    #[error(
        "cannot set proxy.mark {mark} on sockets: {source} (the proxy needs CAP_NET_ADMIN for a mark; or use proxy.uid)"
    )]
    Mark {
        mark: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The listeners of one proxy: 127.0.0.1:port always, [::1]:port when the host
/// has IPv6.
pub struct Listeners {
    pub v4: TcpListener,
    pub v6: Option<TcpListener>,
}

impl Listeners {
    /// Binds both loopback listeners on `port`; port 0 picks a free port (the
    /// same one on both families).
    pub fn bind(port: u16) -> Result<Listeners, ListenError> {
        for _ in 0..16 {
            let v4 = listen(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))?;
            let actual = v4.local_addr().map(|a| a.port()).unwrap_or(port);
            match listen(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), actual)) {
                Ok(v6) => return Ok(Listeners { v4, v6: Some(v6) }),
                // Picked a port that is taken on ::1 only: try another.
                Err(ListenError::InUse { .. }) if port == 0 => continue,
                Err(ListenError::Bind { source, .. })
                    if source.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                        || source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
                {
                    warn!("IPv6 loopback unavailable: listening on 127.0.0.1 only");
                    return Ok(Listeners { v4, v6: None });
                }
                Err(e) => return Err(e),
            }
        }
        Err(ListenError::InUse {
            ip: Ipv6Addr::LOCALHOST.into(),
            port,
        })
    }

    pub fn port(&self) -> u16 {
        self.v4.local_addr().map(|a| a.port()).unwrap_or(0)
    }
}

fn listen(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let bind_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::AddrInUse {
            ListenError::InUse {
                ip: addr.ip(),
                port: addr.port(),
            }
        } else {
            ListenError::Bind { addr, source }
        }
    };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(bind_err)?;
    sock.set_reuseaddr(true).map_err(bind_err)?;
    // Accepted sockets inherit it (Linux copies it from the listener): no
    // setsockopt per connection.
    socket2::SockRef::from(&sock)
        .set_nodelay(true)
        .map_err(bind_err)?;
    if addr.is_ipv6() {
        socket2::SockRef::from(&sock)
            .set_only_v6(true)
            .map_err(bind_err)?;
    }
    sock.bind(addr).map_err(bind_err)?;
    sock.listen(1024).map_err(bind_err)
}

/// Raises the soft open-files limit to the hard one (each proxied connection
/// costs two fds; 1024 is a common default soft limit). Returns the old limit
/// so a spawned command can be given back what it would have had.
pub fn raise_fd_limit() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    let old = lim;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: lim is a valid, initialised rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            warn!("could not raise the open-files limit");
        }
    }
    Some(old)
}

/// Keeps the last part of the open-files limit for what must go on working
/// when app connections pile up: the admin API and its probes, upstream
/// connects of connections already taken, files. An app connection whose
/// socket is numbered past the rest is reset at once: the lowest free number
/// is what accept returns, so a number that high means the ones below are
/// all in use.
#[derive(Debug, Clone, Copy)]
pub struct FdBudget {
    pub last_for_apps: u64,
}

impl FdBudget {
    pub fn now() -> FdBudget {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: lim is a valid out-pointer for getrlimit.
        let limit = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur
        } else {
            1024
        };
        FdBudget::of(limit)
    }

    fn of(limit: u64) -> FdBudget {
        let keep = (limit / 8).clamp(32, 1024);
        FdBudget {
            last_for_apps: limit.saturating_sub(keep),
        }
    }

    pub fn allows(&self, fd: i32) -> bool {
        (fd as u64) < self.last_for_apps
    }
}

#[cfg(test)]
mod tests {
    use super::{FdBudget, Listeners};

    /// The proxy sets no TCP_NODELAY per app connection: accepted sockets
    /// must have it from the listener.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let l = Listeners::bind(0).unwrap();
        let addr = l.v4.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = l.v4.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn the_last_part_of_the_fd_limit_is_kept_back_from_apps() {
        // 1024 (a common default): 128 kept; tiny limits keep 32, huge 1024.
        assert_eq!(FdBudget::of(1024).last_for_apps, 896);
        assert_eq!(FdBudget::of(128).last_for_apps, 96);
        assert_eq!(FdBudget::of(20).last_for_apps, 0);
        assert_eq!(FdBudget::of(1 << 20).last_for_apps, (1 << 20) - 1024);
        assert!(FdBudget::of(1024).allows(895) && !FdBudget::of(1024).allows(896));
    }
}
