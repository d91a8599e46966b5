//! The database ambassador: `protocol: postgres` services.
//!
//! The app connects in plain TCP and without a password. The ambassador reads
//! its startup (answering SSLRequest with `S` and ending the app's TLS when
//! the service has `app_tls`, else `N`: the hop inside the Pod stays plain;
//! GSSENCRequest always `N`), looks the user up in the credentials file,
//! tells the app authentication succeeded, and serves the session over pooled
//! server connections ([`pool`]) that it opened itself ([`server`]: verified
//! TLS, SCRAM/md5/cleartext with the file's password, the role check). In
//! `session` mode a session keeps one server connection to its end; in
//! `transaction` mode it holds one from its first message to the
//! ReadyForQuery that says idle. CancelRequest is mapped to the server
//! connection the session is on ([`cancel`]).

pub mod auth;
pub mod cancel;
pub mod error;
pub(crate) mod expect;
pub(crate) mod extended;
pub mod pool;
pub mod protocol;
mod relay;
pub mod server;
pub mod service;
pub(crate) mod statements;

pub use error::{PgError, PgSetupError};
pub use pool::PoolSnapshot;
pub use relay::SessionTally;
pub use service::{PgService, PoolReport};

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::BytesMut;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::{debug, info};

use crate::{config::service::PoolMode, error::Classified, tls::PlainOrTls};
use pool::PoolKey;
use protocol::{Severity, Startup};

/// Serves one app connection of a postgres service.
pub async fn serve(
    pg: Arc<PgService>,
    app: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
) -> SessionTally {
    let mut out = BytesMut::new();
    let mut tally = SessionTally {
        outcome: "closed",
        ..SessionTally::default()
    };
    let (mut app, first, from_app) = match negotiate(&pg, app).await {
        Ok(Some(n)) => n,
        Ok(None) => return tally,
        Err(e) => {
            crate::log_failure!(e.origin(), %peer, service = %pg.servers.name, "{e}");
            tally.outcome = "error";
            return tally;
        }
    };
    let result = session(&pg, &mut app, (first, from_app), dst, &mut out, &mut tally).await;
    if let Err(e) = &result {
        crate::log_failure!(e.origin(), %peer, service = %pg.servers.name, "{e}");
        protocol::error_response(
            &mut out,
            Severity::Fatal,
            e.sqlstate(),
            &format!("ambassador: {e}"),
        );
    }
    if result.is_err() {
        tally.outcome = "error";
    }
    if !out.is_empty() {
        tally.to_app += out.len() as u64;
        let _ = tokio::time::timeout(Duration::from_secs(5), app.write_all(&out)).await;
    }
    // TLS ends with close_notify; a plain socket's close (the drop) sends
    // the FIN without a shutdown call of its own.
    if matches!(app, PlainOrTls::Tls(_)) {
        let _ = app.shutdown().await;
    }
    tally
}

/// The startup phase, then the session; bytes for the app that are left when
/// it ends (an error included) are in `out`.
/// The app's first messages: SSLRequest answered `S` and TLS ended when
/// the service has `app_tls` (else `N`: the hop inside the Pod stays
/// plain), GSSENCRequest `N`; returns the stream and the message after them
/// (none: the app left), and what the app sent after it.
async fn negotiate(
    pg: &PgService,
    mut tcp: TcpStream,
) -> Result<Option<(PlainOrTls, Startup, BytesMut)>, PgError> {
    // Becomes the session's buffer of the app's bytes.
    let mut buf = BytesMut::with_capacity(8 * 1024);
    eager_read(&tcp, &mut buf);
    loop {
        let first = match protocol::read_startup(&mut tcp, &mut buf).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(PgError::AppProtocol(e)),
        };
        match (first, &pg.app_tls) {
            (Startup::SslRequest, Some(tls)) => {
                // Bytes sent before the answer are not the TLS handshake's,
                // nor to be trusted as inside it (as PostgreSQL refuses them).
                if !buf.is_empty() {
                    return Err(PgError::AppProtocol(protocol::invalid(
                        "data after an SSLRequest before its answer",
                    )));
                }
                tcp.write_all(b"S").await.map_err(PgError::AppProtocol)?;
                // The app is in the Pod, but a stalled one must not hold a
                // client slot.
                let accepted = tokio::time::timeout(APP_TLS_HANDSHAKE, Box::pin(tls.accept(tcp)))
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the app's TLS handshake took over 10 s",
                        ))
                    });
                let mut app = PlainOrTls::terminated(accepted.map_err(PgError::AppProtocol)?);
                return match protocol::read_startup(&mut app, &mut buf).await {
                    Ok(Startup::SslRequest | Startup::GssEncRequest) => Err(PgError::AppProtocol(
                        protocol::invalid("an encryption request inside TLS"),
                    )),
                    Ok(next) => Ok(Some((app, next, buf))),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
                    Err(e) => Err(PgError::AppProtocol(e)),
                };
            }
            (Startup::SslRequest | Startup::GssEncRequest, _) => {
                tcp.write_all(b"N").await.map_err(PgError::AppProtocol)?;
            }
            (next, _) => return Ok(Some((PlainOrTls::Plain(tcp), next, buf))),
        }
    }
}

async fn session(
    pg: &Arc<PgService>,
    app: &mut PlainOrTls,
    (first, from_app): (Startup, BytesMut),
    dst: SocketAddr,
    out: &mut BytesMut,
    tally: &mut SessionTally,
) -> Result<(), PgError> {
    let params = match first {
        Startup::Cancel { pid, key } => {
            Box::pin(forward_cancel(pg, pid, key)).await;
            return Ok(());
        }
        Startup::Startup(p) => p,
        Startup::SslRequest | Startup::GssEncRequest => {
            return Err(PgError::AppProtocol(protocol::invalid(
                "an encryption request after the startup phase began",
            )));
        }
    };
    let mut user = None;
    let mut database = None;
    let mut rest = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "user" => user = Some(v),
            "database" => database = Some(v),
            "replication" if v != "false" && v != "0" && v != "off" => {
                return Err(PgError::Unsupported(
                    "replication connections are not supported through the ambassador".into(),
                ));
            }
            // Protocol extensions the ambassador does not speak.
            k if k.starts_with("_pq_.") => {}
            _ => rest.push((k, v)),
        }
    }
    let user = user
        .ok_or_else(|| PgError::AppProtocol(protocol::invalid("no user in the startup message")))?;
    let database = database.unwrap_or_else(|| user.clone());
    if pg.servers.credentials.get(&user).is_none() {
        return Err(PgError::UnknownUser {
            user,
            service: pg.servers.name.clone(),
        });
    }
    let Ok(_client) = pg.clients.clone().try_acquire_owned() else {
        return Err(PgError::TooManyClients {
            service: pg.servers.name.clone(),
            max: pg.pool.max_clients,
        });
    };
    let key = PoolKey {
        user,
        database,
        params: rest,
        dst: pg.servers.endpoints.is_empty().then_some(dst),
    };
    let pool = pg.pool_for(key);
    let registration = pg.cancels.register();
    // Session mode: the session's own server connection from the start.
    // Transaction mode: what a server said at login before, else ask one.
    let mut lease = None;
    let server_params = match (pg.pool.mode, pool.cached_params()) {
        (PoolMode::Transaction, Some(p)) => p,
        (mode, _) => {
            let l = pool.checkout(&pg.servers, pg.pool.queue_timeout).await?;
            let p: pool::ServerParams = l.conn.conn.params.clone().into();
            if mode == PoolMode::Session {
                lease = Some(l);
            } else {
                pool.checkin(l, true);
            }
            p
        }
    };
    // The whole answer (a dozen ParameterStatus) in one allocation.
    out.reserve(1024);
    protocol::auth_ok(out);
    for (k, v) in server_params.iter() {
        protocol::parameter_status(out, k, v);
    }
    protocol::backend_key_data(out, registration.pid, registration.key);
    protocol::ready_for_query(out, b'I');
    debug!(service = %pg.servers.name, pool = %pool.key, mode = ?pg.pool.mode, "session started");
    let mut relay = relay::Relay::new(
        pg,
        &pool,
        &registration,
        (from_app, std::mem::take(out)),
        tally,
    );
    if let Some(l) = lease {
        relay.bind(l);
    }
    let result = relay.run(app).await;
    *out = relay.take_to_app();
    relay.finish();
    result
}

/// Sends an app's CancelRequest on to the server its session is using.
async fn forward_cancel(pg: &PgService, pid: i32, key: i32) {
    let Some(t) = pg.cancels.target(pid, key) else {
        debug!(service = %pg.servers.name, "cancel for no running query (or an unknown key): ignored");
        return;
    };
    match server::send_cancel(&pg.servers, t.addr, t.pid, t.key).await {
        Ok(()) => info!(service = %pg.servers.name, server = %t.addr, "cancel request passed on"),
        Err(e) => info!(service = %pg.servers.name, server = %t.addr, "cancel request failed: {e}"),
    }
}

/// How long the app may take over its TLS handshake.
const APP_TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// The app's startup is usually queued by the time its connection is
/// accepted (it sends right after connecting): read it now rather than a
/// turn of the event loop later, when the runtime has learnt the socket is
/// readable. Nothing there (or an error) leaves it to the awaited read.
fn eager_read(tcp: &TcpStream, buf: &mut BytesMut) {
    use std::io::Read as _;
    let mut first = [0u8; 1024];
    let sock = socket2::SockRef::from(tcp);
    if let Ok(n) = (&*sock).read(&mut first) {
        buf.extend_from_slice(&first[..n]);
    }
}

#[cfg(test)]
mod tests {
    use tokio::{io::AsyncWriteExt as _, net::TcpListener};

    use super::*;

    #[tokio::test]
    async fn the_startup_already_queued_is_read_without_waiting_and_nothing_queued_reads_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (proxy, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        eager_read(&proxy, &mut buf);
        assert!(buf.is_empty(), "nothing sent yet: {buf:?}");
        app.write_all(b"\0\0\0\x08\x04\xd2\x16\x2f").await.unwrap();
        // Loopback delivery is done when the write returns.
        eager_read(&proxy, &mut buf);
        assert_eq!(&buf[..], b"\0\0\0\x08\x04\xd2\x16\x2f");
        let mut proxy = proxy;
        let read = protocol::read_startup(&mut proxy, &mut buf).await.unwrap();
        assert!(matches!(read, Startup::SslRequest));
    }
}
