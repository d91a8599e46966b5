//! The database ambassador: `protocol: postgres` services.
//!
//! The app connects in plain TCP and without a password. The ambassador reads
//! its startup (answering SSLRequest and GSSENCRequest with `N`: the hop
//! inside the Pod stays plain), looks the user up in the credentials file,
//! tells the app authentication succeeded, and serves the session over pooled
//! server connections ([`pool`]) that it opened itself ([`server`]: verified
//! TLS, SCRAM/md5/cleartext with the file's password, the role check). In
//! `session` mode a session keeps one server connection to its end; in
//! `transaction` mode it holds one from its first message to the
//! ReadyForQuery that says idle. CancelRequest is mapped to the server
//! connection the session is on ([`cancel`]).

pub mod auth;
pub mod cancel;
pub mod pool;
pub mod protocol;
pub mod server;

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
};
use tracing::{debug, info, warn};

use crate::{
    config::service::{PoolConfig, PoolMode, PostgresConfig, TargetRole, TlsConfig},
    endpoint::EndpointSet,
    proxy::{Origin, Settings},
    tls::{TlsError, TlsOrigin},
};
use auth::{Credentials, CredentialsError};
pub use pool::PoolSnapshot;
use pool::{Lease, Pool, PoolKey};
use protocol::{Severity, Startup};

/// A PostgreSQL session that could not go on, classified; the app gets it as
/// an ErrorResponse with [`PgError::sqlstate`].
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("bad startup from the app: {0}")]
    AppProtocol(#[source] io::Error),
    #[error(
        "user \"{user}\" is not allowed through the ambassador for service {service} (no credentials for it)"
    )]
    UnknownUser { user: String, service: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("too many clients for service {service} (postgres.pool.max_clients {max})")]
    TooManyClients { service: String, max: usize },
    #[error(
        "service {service}: no server connection free for {pool} within {timeout:?} (postgres.pool.size {size})"
    )]
    PoolExhausted {
        service: String,
        pool: String,
        timeout: Duration,
        size: usize,
    },
    #[error("cannot reach the server: {0}")]
    Connect(String),
    #[error("server {addr} does not support TLS: refusing to continue in plaintext")]
    NoTls { addr: SocketAddr },
    #[error("TLS with server {addr} failed: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("server {addr} refused the login: {message}")]
    ServerRefused {
        addr: SocketAddr,
        code: String,
        message: String,
    },
    #[error("server {addr} asks for {method} authentication, which the ambassador does not do")]
    AuthMethod { addr: SocketAddr, method: String },
    #[error("SCRAM authentication with server {addr} failed: {reason}")]
    Scram { addr: SocketAddr, reason: String },
    #[error("service {service}: no endpoint is a reachable read-write server ({reasons})")]
    NoServerWithRole { service: String, reasons: String },
    #[error("server connection to {addr} failed: {source}")]
    ServerIo {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("server connection to {addr} lost")]
    ServerLost { addr: SocketAddr },
}

impl PgError {
    pub fn origin(&self) -> Origin {
        match self {
            PgError::AppProtocol(_)
            | PgError::UnknownUser { .. }
            | PgError::Unsupported(_)
            | PgError::TooManyClients { .. } => Origin::App,
            PgError::PoolExhausted { .. } => Origin::Internal,
            _ => Origin::Upstream,
        }
    }

    /// Whether the app trying again later could succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            PgError::TooManyClients { .. }
                | PgError::PoolExhausted { .. }
                | PgError::Connect(_)
                | PgError::NoServerWithRole { .. }
                | PgError::ServerIo { .. }
                | PgError::ServerLost { .. }
        )
    }

    /// The server's fault (unreachable, bad TLS, broken stream): the next
    /// endpoint may do better. A refused login is an answer, not a fault.
    pub fn server_fault(&self) -> bool {
        matches!(
            self,
            PgError::Connect(_)
                | PgError::NoTls { .. }
                | PgError::Tls { .. }
                | PgError::ServerIo { .. }
                | PgError::ServerLost { .. }
        )
    }

    pub fn sqlstate(&self) -> &str {
        match self {
            PgError::AppProtocol(_) => "08P01",
            PgError::UnknownUser { .. } | PgError::AuthMethod { .. } | PgError::Scram { .. } => {
                "28000"
            }
            PgError::Unsupported(_) => "0A000",
            PgError::TooManyClients { .. } | PgError::PoolExhausted { .. } => "53300",
            PgError::ServerRefused { code, .. } if !code.is_empty() => code,
            PgError::ServerRefused { .. } => "28000",
            PgError::ServerIo { .. } | PgError::ServerLost { .. } => "08006",
            _ => "08001",
        }
    }
}

/// A postgres service that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum PgSetupError {
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

/// One postgres service, ready for sessions.
pub struct PgService {
    pub name: String,
    pub endpoints: Arc<EndpointSet>,
    pub settings: Settings,
    pub tls: Option<TlsOrigin>,
    pub direct_tls: bool,
    pub target: TargetRole,
    pub pool: PoolConfig,
    pub credentials: Credentials,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    clients: Arc<Semaphore>,
    cancels: Arc<cancel::Registry>,
}

impl std::fmt::Debug for PgService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgService")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What `status` views and metrics show of one pool.
#[derive(Debug, Clone)]
pub struct PoolReport {
    pub service: String,
    pub pool: String,
    pub stats: PoolSnapshot,
}

impl PgService {
    pub fn new(
        name: &str,
        cfg: &PostgresConfig,
        tls: Option<&TlsConfig>,
        default_name: Option<&str>,
        target: Option<TargetRole>,
        endpoints: Arc<EndpointSet>,
        settings: Settings,
    ) -> Result<PgService, PgSetupError> {
        let tls = match tls {
            Some(t) => {
                // libpq 17 offers ALPN `postgresql` on every TLS connection;
                // older servers ignore it, direct TLS requires it.
                let mut t = t.clone();
                t.alpn = vec!["postgresql".into()];
                Some(TlsOrigin::new(name, &t, default_name)?)
            }
            None => None,
        };
        Ok(PgService {
            name: name.to_string(),
            endpoints,
            settings,
            tls,
            direct_tls: cfg.direct_tls,
            target: target.unwrap_or_default(),
            pool: cfg.pool,
            credentials: Credentials::new(&cfg.credentials_file)?,
            pools: Mutex::new(HashMap::new()),
            clients: Arc::new(Semaphore::new(cfg.pool.max_clients)),
            cancels: Arc::new(cancel::Registry::default()),
        })
    }

    /// Every pool's counters.
    pub fn pools(&self) -> Vec<PoolReport> {
        let pools = crate::sync::lock(&self.pools);
        let mut out: Vec<PoolReport> = pools
            .values()
            .map(|p| PoolReport {
                service: self.name.clone(),
                pool: p.key.to_string(),
                stats: p.stats.snapshot(),
            })
            .collect();
        out.sort_by(|a, b| a.pool.cmp(&b.pool));
        out
    }

    /// App sessions open now.
    pub fn clients(&self) -> usize {
        self.pool.max_clients - self.clients.available_permits()
    }

    fn pool_for(self: &Arc<Self>, key: PoolKey) -> Arc<Pool> {
        let mut pools = crate::sync::lock(&self.pools);
        if let Some(p) = pools.get(&key) {
            return p.clone();
        }
        let p = Pool::new(key.clone(), self.pool.size);
        p.keep_min_idle(Arc::downgrade(self), self.pool.min_idle);
        pools.insert(key, p.clone());
        p
    }
}

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
    mut app: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
) -> SessionTally {
    let mut out = BytesMut::new();
    let mut tally = SessionTally {
        outcome: "closed",
        ..SessionTally::default()
    };
    let result = session(&pg, &mut app, dst, &mut out, &mut tally).await;
    if let Err(e) = &result {
        match e.origin() {
            Origin::App => info!(%peer, service = %pg.name, "refused: {e}"),
            Origin::Upstream => info!(%peer, service = %pg.name, "{e}"),
            Origin::Internal => warn!(%peer, service = %pg.name, "{e}"),
        }
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
async fn session(
    pg: &Arc<PgService>,
    app: &mut TcpStream,
    dst: SocketAddr,
    out: &mut BytesMut,
    tally: &mut SessionTally,
) -> Result<(), PgError> {
    let params = loop {
        match protocol::read_startup(app).await {
            Ok(Startup::SslRequest) | Ok(Startup::GssEncRequest) => {
                // The hop inside the Pod stays plain.
                app.write_all(b"N").await.map_err(PgError::AppProtocol)?;
            }
            Ok(Startup::Cancel { pid, key }) => {
                forward_cancel(pg, pid, key).await;
                return Ok(());
            }
            Ok(Startup::Startup(p)) => break p,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(PgError::AppProtocol(e)),
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
    if pg.credentials.get(&user).is_none() {
        return Err(PgError::UnknownUser {
            user,
            service: pg.name.clone(),
        });
    }
    let Ok(_client) = pg.clients.clone().try_acquire_owned() else {
        return Err(PgError::TooManyClients {
            service: pg.name.clone(),
            max: pg.pool.max_clients,
        });
    };
    let key = PoolKey {
        user,
        database,
        params: rest,
        dst: pg.endpoints.is_empty().then_some(dst),
    };
    let pool = pg.pool_for(key);
    let registration = pg.cancels.register();
    // Session mode: the session's own server connection from the start.
    // Transaction mode: what a server said at login before, else ask one.
    let mut lease = None;
    let server_params = match (pg.pool.mode, pool.cached_params()) {
        (PoolMode::Transaction, Some(p)) => p,
        (mode, _) => {
            let l = pool.checkout(pg, pg.pool.queue_timeout).await?;
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
    debug!(service = %pg.name, pool = %pool.key, mode = ?pg.pool.mode, "session started");
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
        debug!(service = %pg.name, "cancel for no running query (or an unknown key): ignored");
        return;
    };
    match server::send_cancel(pg, t.addr, t.pid, t.key).await {
        Ok(()) => info!(service = %pg.name, server = %t.addr, "cancel request passed on"),
        Err(e) => info!(service = %pg.name, server = %t.addr, "cancel request failed: {e}"),
    }
}

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
    }

    fn release(&mut self) {
        if let Some(l) = self.bound.take() {
            self.registration.set(None);
            self.pool.checkin(l, true);
        }
    }

    async fn run(&mut self, app: &mut TcpStream) -> Result<(), PgError> {
        let (mut ard, mut awr) = app.split();
        loop {
            if let Step::AppDone = self.frame_app()? {
                flush(&mut awr, &mut self.to_app).await;
                return Ok(());
            }
            // Transaction mode: a request is waiting and no server is held.
            if self.bound.is_none() && !self.to_server.is_empty() {
                let lease = self
                    .pool
                    .checkout(self.pg, self.pg.pool.queue_timeout)
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

    /// Moves the app's complete messages toward the server.
    fn frame_app(&mut self) -> Result<Step, PgError> {
        while let Some((tag, len)) =
            protocol::frame(&self.from_app).map_err(PgError::AppProtocol)?
        {
            if self.from_app.len() < len {
                break;
            }
            match tag {
                b'X' => return Ok(Step::AppDone),
                b'P' if self.pg.pool.mode == PoolMode::Transaction
                    && !protocol::first_cstr(&self.from_app[5..len]).is_empty() =>
                {
                    return Err(PgError::Unsupported(
                        "named prepared statements are not supported in transaction pooling mode \
                         (use unnamed statements, or postgres.pool.mode: session)"
                            .into(),
                    ));
                }
                b'Q' | b'S' | b'F' => self.outstanding += 1,
                _ => {}
            }
            self.status = None;
            let msg = self.from_app.split_to(len);
            self.to_server.extend_from_slice(&msg);
        }
        Ok(Step::Continue)
    }

    /// Moves the server's complete messages toward the app; gives the server
    /// back at an idle ReadyForQuery in transaction mode.
    fn frame_server(&mut self) -> Result<(), PgError> {
        let addr = self.server_addr();
        while let Some((tag, len)) =
            protocol::frame(&self.from_server).map_err(|source| PgError::ServerIo {
                addr: addr.unwrap_or_else(|| ([0, 0, 0, 0], 0).into()),
                source,
            })?
        {
            if self.from_server.len() < len {
                break;
            }
            if tag == b'Z' && len == 6 {
                self.outstanding = self.outstanding.saturating_sub(1);
                self.status = Some(self.from_server[5]);
            }
            let msg = self.from_server.split_to(len);
            self.to_app.extend_from_slice(&msg);
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
