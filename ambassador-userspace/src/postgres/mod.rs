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
pub mod pool;
pub mod protocol;
pub mod server;
pub mod service;

pub use error::{PgError, PgSetupError};
pub use pool::PoolSnapshot;
pub use service::{PgService, PoolReport};

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tracing::{debug, info};

use crate::{config::service::PoolMode, error::Classified, tls::PlainOrTls};
use pool::{Lease, Pool, PoolKey};
use protocol::{Severity, Startup};

/// Serves one app connection of a postgres service.
/// What one session moved, for metrics and the access log.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionTally {
    /// Bytes from the app after the startup phase.
    pub from_app: u64,
    /// Bytes to the app after the startup phase.
    pub to_app: u64,
    /// `closed`, or `error` when the ambassador ended it with an ErrorResponse.
    pub outcome: &'static str,
}

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
    let (mut app, first) = match negotiate(&pg, app).await {
        Ok(Some(n)) => n,
        Ok(None) => return tally,
        Err(e) => {
            crate::log_failure!(e.origin(), %peer, service = %pg.servers.name, "{e}");
            tally.outcome = "error";
            return tally;
        }
    };
    let result = session(&pg, &mut app, first, dst, &mut out, &mut tally).await;
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
    let _ = app.shutdown().await;
    tally
}

/// The startup phase, then the session; bytes for the app that are left when
/// it ends (an error included) are in `out`.
/// The app's first messages: SSLRequest answered `S` and TLS ended when
/// the service has `app_tls` (else `N`: the hop inside the Pod stays
/// plain), GSSENCRequest `N`; returns the stream and the message after them
/// (none: the app left).
async fn negotiate(
    pg: &PgService,
    mut tcp: TcpStream,
) -> Result<Option<(PlainOrTls, Startup)>, PgError> {
    loop {
        let first = match protocol::read_startup(&mut tcp).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(PgError::AppProtocol(e)),
        };
        match (first, &pg.app_tls) {
            (Startup::SslRequest, Some(tls)) => {
                tcp.write_all(b"S").await.map_err(PgError::AppProtocol)?;
                // The app is in the Pod, but a stalled one must not hold a
                // client slot.
                let accepted = tokio::time::timeout(APP_TLS_HANDSHAKE, tls.accept(tcp))
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the app's TLS handshake took over 10 s",
                        ))
                    });
                let mut app = PlainOrTls::terminated(accepted.map_err(PgError::AppProtocol)?);
                return match protocol::read_startup(&mut app).await {
                    Ok(Startup::SslRequest | Startup::GssEncRequest) => Err(PgError::AppProtocol(
                        protocol::invalid("an encryption request inside TLS"),
                    )),
                    Ok(next) => Ok(Some((app, next))),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
                    Err(e) => Err(PgError::AppProtocol(e)),
                };
            }
            (Startup::SslRequest | Startup::GssEncRequest, _) => {
                tcp.write_all(b"N").await.map_err(PgError::AppProtocol)?;
            }
            (next, _) => return Ok(Some((PlainOrTls::Plain(tcp), next))),
        }
    }
}

async fn session(
    pg: &Arc<PgService>,
    app: &mut PlainOrTls,
    first: Startup,
    dst: SocketAddr,
    out: &mut BytesMut,
    tally: &mut SessionTally,
) -> Result<(), PgError> {
    let params = match first {
        Startup::Cancel { pid, key } => {
            forward_cancel(pg, pid, key).await;
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
            let p = l.conn.conn.params.clone();
            if mode == PoolMode::Session {
                lease = Some(l);
            } else {
                pool.checkin(l, true);
            }
            p
        }
    };
    protocol::auth_ok(out);
    for (k, v) in &server_params {
        protocol::parameter_status(out, k, v);
    }
    protocol::backend_key_data(out, registration.pid, registration.key);
    protocol::ready_for_query(out, b'I');
    debug!(service = %pg.servers.name, pool = %pool.key, mode = ?pg.pool.mode, "session started");
    let mut relay = Relay {
        pg,
        pool: &pool,
        registration: &registration,
        bound: None,
        from_app: BytesMut::with_capacity(8 * 1024),
        to_server: BytesMut::new(),
        from_server: BytesMut::with_capacity(8 * 1024),
        to_app: std::mem::take(out),
        outstanding: 0,
        status: Some(b'I'),
        app_left: 0,
        server_left: 0,
        tally,
    };
    if let Some(l) = lease {
        relay.bind(l);
    }
    let result = relay.run(app).await;
    *out = std::mem::take(&mut relay.to_app);
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

/// Bytes waiting to be written stop reading from the other side past this.
const HIGH_WATER: usize = 256 * 1024;

/// One session's message pump between the app and (when it holds one) a
/// server connection. Both directions are framed: the app's to see where
/// requests end (Sync, Query, FunctionCall) and what they ask; the server's to
/// see ReadyForQuery and its transaction status.
struct Relay<'a> {
    pg: &'a Arc<PgService>,
    pool: &'a Arc<Pool>,
    registration: &'a cancel::Registration,
    bound: Option<Lease>,
    from_app: BytesMut,
    to_server: BytesMut,
    from_server: BytesMut,
    to_app: BytesMut,
    /// Requests sent whose ReadyForQuery has not come back.
    outstanding: usize,
    /// The last ReadyForQuery's status, `None` once anything was sent after it.
    status: Option<u8>,
    /// Bytes of the app's (the server's) current message still to pass on:
    /// a message is looked at by its first bytes and then streamed, so a
    /// large one (a 100 MB bytea) is never held whole.
    app_left: usize,
    server_left: usize,
    tally: &'a mut SessionTally,
}

enum Step {
    Continue,
    /// The app said Terminate or closed.
    AppDone,
}

impl Relay<'_> {
    fn bind(&mut self, lease: Lease) {
        let c = &lease.conn.conn;
        self.registration.set(Some(cancel::CancelTarget {
            addr: c.addr,
            pid: c.pid,
            key: c.key,
        }));
        self.bound = Some(lease);
    }

    fn server_addr(&self) -> Option<SocketAddr> {
        self.bound.as_ref().map(|l| l.conn.conn.addr)
    }

    /// Idle with nothing in flight: the connection can serve someone else.
    fn server_idle(&self) -> bool {
        self.outstanding == 0
            && self.status == Some(b'I')
            && self.to_server.is_empty()
            && self.from_server.is_empty()
            && self.app_left == 0
            && self.server_left == 0
    }

    fn release(&mut self) {
        if let Some(l) = self.bound.take() {
            self.registration.set(None);
            self.pool.checkin(l, true);
        }
    }

    /// Plain TCP splits for free; a TLS stream through tokio's split.
    async fn run(&mut self, app: &mut PlainOrTls) -> Result<(), PgError> {
        match app {
            PlainOrTls::Plain(tcp) => {
                let (r, w) = tcp.split();
                self.pump(r, w).await
            }
            tls => {
                let (r, w) = tokio::io::split(tls);
                self.pump(r, w).await
            }
        }
    }

    async fn pump(
        &mut self,
        mut ard: impl AsyncRead + Unpin,
        mut awr: impl AsyncWrite + Unpin,
    ) -> Result<(), PgError> {
        loop {
            if let Step::AppDone = self.frame_app()? {
                flush(&mut awr, &mut self.to_app).await;
                return Ok(());
            }
            // Transaction mode: a request is waiting and no server is held.
            if self.bound.is_none() && !self.to_server.is_empty() {
                let lease = self
                    .pool
                    .checkout(&self.pg.servers, self.pg.pool.queue_timeout)
                    .await?;
                self.bind(lease);
            }
            let (srd, swr) = match self.bound.as_mut() {
                Some(l) => {
                    let c = &mut l.conn.conn;
                    (Some(&mut c.rd), Some(&mut c.wr))
                }
                None => (None, None),
            };
            let to_server_pending = !self.to_server.is_empty() && swr.is_some();
            let read_server = srd.is_some() && self.to_app.len() < HIGH_WATER;
            tokio::select! {
                r = ard.read_buf(&mut self.from_app), if self.to_server.len() < HIGH_WATER => {
                    match r {
                        Ok(0) | Err(_) => {
                            flush(&mut awr, &mut self.to_app).await;
                            return Ok(());
                        }
                        Ok(n) => self.tally.from_app += n as u64,
                    }
                }
                r = read_opt(srd, &mut self.from_server), if read_server => {
                    match r {
                        Ok(n) if n > 0 => self.frame_server()?,
                        _ => return Err(self.server_lost()),
                    }
                }
                r = write_opt(swr, &self.to_server), if to_server_pending => {
                    match r {
                        Ok(n) => self.to_server.advance(n),
                        Err(_) => return Err(self.server_lost()),
                    }
                }
                r = awr.write(&self.to_app), if !self.to_app.is_empty() => {
                    match r {
                        Ok(n) if n > 0 => {
                            self.tally.to_app += n as u64;
                            self.to_app.advance(n);
                        }
                        _ => return Ok(()),
                    }
                }
            }
        }
    }

    fn server_lost(&mut self) -> PgError {
        let addr = self
            .server_addr()
            .unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
        // Not reusable: closed, and its cancel key with it.
        self.registration.set(None);
        if let Some(l) = self.bound.take() {
            self.pool.checkin(l, false);
        }
        PgError::ServerLost { addr }
    }

    /// Moves the app's messages toward the server, each looked at by its
    /// header (and a Parse by its first body byte) and then streamed.
    fn frame_app(&mut self) -> Result<Step, PgError> {
        loop {
            protocol::pass_on(&mut self.from_app, &mut self.to_server, &mut self.app_left);
            if self.app_left > 0 {
                return Ok(Step::Continue);
            }
            let Some(m) = protocol::peek(&self.from_app).map_err(PgError::AppProtocol)? else {
                return Ok(Step::Continue);
            };
            match m.tag {
                b'X' => return Ok(Step::AppDone),
                // Named or not: the name's first byte tells (NUL: unnamed).
                b'P' if self.pg.pool.mode == PoolMode::Transaction => match m.first_body_byte {
                    None if m.len > 5 => return Ok(Step::Continue),
                    None | Some(0) => {}
                    Some(_) => {
                        return Err(PgError::Unsupported(
                            "named prepared statements are not supported in transaction pooling mode \
                             (use unnamed statements, or postgres.pool.mode: session)"
                                .into(),
                        ));
                    }
                },
                b'Q' | b'S' | b'F' => self.outstanding += 1,
                _ => {}
            }
            self.status = None;
            self.app_left = m.len;
        }
    }

    /// Moves the server's complete messages toward the app; gives the server
    /// back at an idle ReadyForQuery in transaction mode.
    fn frame_server(&mut self) -> Result<(), PgError> {
        let addr = self.server_addr();
        loop {
            protocol::pass_on(
                &mut self.from_server,
                &mut self.to_app,
                &mut self.server_left,
            );
            if self.server_left > 0 {
                break;
            }
            let peeked = protocol::peek(&self.from_server).map_err(|source| PgError::ServerIo {
                addr: addr.unwrap_or_else(|| ([0, 0, 0, 0], 0).into()),
                source,
            })?;
            let Some(m) = peeked else { break };
            if m.tag == b'Z' && m.len == 6 {
                let Some(status) = m.first_body_byte else {
                    break;
                };
                self.outstanding = self.outstanding.saturating_sub(1);
                self.status = Some(status);
            }
            self.server_left = m.len;
        }
        if self.pg.pool.mode == PoolMode::Transaction && self.server_idle() {
            self.release();
        }
        Ok(())
    }

    /// The session is over: its server connection goes back (after a
    /// reset, in session mode) if it is idle, and is closed if not.
    fn finish(&mut self) {
        let Some(mut lease) = self.bound.take() else {
            return;
        };
        self.registration.set(None);
        if !self.server_idle() {
            debug!(pool = %self.pool.key, "session ended mid-request: server connection closed");
            self.pool.checkin(lease, false);
            return;
        }
        if self.pg.pool.mode == PoolMode::Transaction {
            self.pool.checkin(lease, true);
            return;
        }
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let ok = tokio::time::timeout(Duration::from_secs(5), lease.conn.conn.reset())
                .await
                .is_ok_and(|r| r.is_ok());
            pool.checkin(lease, ok);
        });
    }
}

async fn read_opt<R: AsyncRead + Unpin>(
    r: Option<&mut R>,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    match r {
        Some(r) => r.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

async fn write_opt<W: AsyncWrite + Unpin>(w: Option<&mut W>, buf: &[u8]) -> io::Result<usize> {
    match w {
        Some(w) => w.write(buf).await,
        None => std::future::pending().await,
    }
}

async fn flush<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut BytesMut) {
    if !buf.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(5), w.write_all(buf)).await;
        buf.clear();
    }
}
