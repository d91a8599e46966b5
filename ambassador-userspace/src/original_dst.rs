//! Where a redirected connection was going.
//!
//! In a Pod the proxy is unprivileged and asks the kernel the standard way,
//! `getsockopt(SO_ORIGINAL_DST)`, which the `getsockopt` program answers (and
//! which netfilter answers behind iptables, so the same binary works there).
//! Under `ambassador run` the proxy owns the maps and lives outside the
//! intercepted cgroup, so it reads the connection table directly.

use std::{io, net::SocketAddr, sync::Arc};

use ambassador_common::ConnKey;
use tokio::net::TcpStream;

use crate::interception::ConnTable;

#[derive(Clone)]
pub enum OriginalDst {
    /// `getsockopt(SOL_IP/SOL_IPV6, SO_ORIGINAL_DST)` on the accepted socket.
    SocketOption,
    /// Direct lookup in the kernel's table, keyed by the accepted connection.
    Table(Arc<ConnTable>),
}

impl OriginalDst {
    /// `Ok(None)`: the connection was not redirected (someone dialled the proxy
    /// port directly, or its record was evicted). `peer` is what `accept`
    /// said and `port` the listener's: no syscall asks them again (the
    /// listeners are 127.0.0.1 and ::1 only, so the peer's family is the
    /// socket's).
    pub fn lookup(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        port: u16,
    ) -> io::Result<Option<SocketAddr>> {
        match self {
            OriginalDst::SocketOption => {
                let sock = socket2::SockRef::from(stream);
                let res = if peer.is_ipv4() {
                    sock.original_dst()
                } else {
                    sock.original_dst_ipv6()
                };
                match res {
                    Ok(addr) => Ok(addr.as_socket()),
                    // Not ours: neither the program nor netfilter knew it.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENOPROTOOPT) | Some(libc::ENOENT)
                        ) =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            }
            OriginalDst::Table(table) => {
                let key = ConnKey::from_accepted(peer, port);
                match table.get(&key, 0) {
                    Ok(orig) => Ok(orig.socket_addr()),
                    Err(aya::maps::MapError::KeyNotFound) => Ok(None),
                    Err(e) => Err(io::Error::other(e.to_string())),
                }
            }
        }
    }
}
