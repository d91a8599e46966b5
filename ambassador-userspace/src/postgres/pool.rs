//! Pools of logged-in server connections, one per (user, database, startup
//! parameters): at most `size` connections each, idle or in use; an app that
//! finds them all busy waits up to `queue_timeout`, then gets an error. Idle
//! connections are checked on the way out (a server that went away while
//! they sat idle costs nothing but a new login), and `min_idle` are kept
//! open ahead of demand.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{
    error::PgError,
    server::{ServerConn, Servers},
};

/// What identifies a pool: connections in it are interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub user: String,
    pub database: String,
    /// Startup parameters besides user and database, as the app sent them.
    pub params: Vec<(String, String)>,
    /// The original destination, for services without endpoints.
    pub dst: Option<SocketAddr>,
}

impl PoolKey {
    /// The startup message toward the server.
    pub fn startup(&self) -> Vec<(String, String)> {
        let mut p = vec![
            ("user".to_string(), self.user.clone()),
            ("database".to_string(), self.database.clone()),
        ];
        p.extend(self.params.iter().cloned());
        p
    }
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.user, self.database)
    }
}

/// Counters of one pool, for `status` views and metrics.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Server connections open (idle + in use).
    pub servers: AtomicUsize,
    pub idle: AtomicUsize,
    pub in_use: AtomicUsize,
    /// Apps waiting for a server connection right now.
    pub waiting: AtomicUsize,
    /// Server connections opened since start.
    pub opened: AtomicU64,
    /// Logins that failed (unreachable, refused, wrong role).
    pub errors: AtomicU64,
    /// Apps that waited `queue_timeout` in vain.
    pub exhausted: AtomicU64,
    /// Named statements prepared on its server connections (transaction
    /// pooling), kept by each connection's set.
    pub statements: Arc<AtomicUsize>,
}

/// A point-in-time copy of [`PoolStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct PoolSnapshot {
    pub servers: usize,
    pub idle: usize,
    pub in_use: usize,
    pub waiting: usize,
    pub opened: u64,
    pub errors: u64,
    pub exhausted: u64,
    #[serde(default)]
    pub statements: usize,
}

impl std::ops::AddAssign for PoolSnapshot {
    fn add_assign(&mut self, o: PoolSnapshot) {
        self.servers += o.servers;
        self.idle += o.idle;
        self.in_use += o.in_use;
        self.waiting += o.waiting;
        self.opened += o.opened;
        self.errors += o.errors;
        self.exhausted += o.exhausted;
        self.statements += o.statements;
    }
}

impl PoolStats {
    pub fn snapshot(&self) -> PoolSnapshot {
        PoolSnapshot {
            servers: self.servers.load(Ordering::Relaxed),
            idle: self.idle.load(Ordering::Relaxed),
            in_use: self.in_use.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            opened: self.opened.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            exhausted: self.exhausted.load(Ordering::Relaxed),
            statements: self.statements.load(Ordering::Relaxed),
        }
    }
}

/// A server connection counted in its pool's `servers` until dropped.
pub struct Counted {
    pub conn: ServerConn,
    /// Weak: the pool holds its idle connections, and a strong reference
    /// back would keep both alive for good after a reload dropped the pool
    /// (their server connections with them).
    pool: Weak<Pool>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.stats.servers.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// ParameterStatus values a server reported at login, shared.
pub type ServerParams = Arc<[(String, String)]>;

pub struct Pool {
    pub key: PoolKey,
    idle: Mutex<Vec<Counted>>,
    /// One permit per connection in use (or being opened).
    slots: Arc<Semaphore>,
    size: usize,
    pub stats: PoolStats,
    /// What the first server said at login, for apps that start a session
    /// before they need a server (transaction mode).
    /// The first login's ParameterStatus values, shared by every session
    /// of the pool (transaction mode sends them without a server).
    params: Mutex<Option<ServerParams>>,
}

/// A server connection lent to one app session (or transaction).
pub struct Lease {
    pub conn: Counted,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(key: PoolKey, size: usize) -> Arc<Pool> {
        Arc::new(Pool {
            key,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(size)),
            size,
            stats: PoolStats::default(),
            params: Mutex::new(None),
        })
    }

    pub fn cached_params(&self) -> Option<ServerParams> {
        crate::sync::lock(&self.params).clone()
    }

    fn take_idle(&self, pg: &Servers) -> Option<Counted> {
        let mut idle = crate::sync::lock(&self.idle);
        // Most recently used first: its TLS session and caches are warm.
        while let Some(mut c) = idle.pop() {
            self.stats.idle.fetch_sub(1, Ordering::Relaxed);
            // An address its name no longer resolves to gets no new session.
            let listed = c
                .conn
                .endpoint
                .as_ref()
                .is_none_or(|e| pg.endpoints.contains(e));
            if !listed {
                tracing::debug!(server = %c.conn.addr, pool = %self.key, "idle server connection to an address that left the endpoints: dropped");
                continue;
            }
            if c.conn.looks_alive() {
                return Some(c);
            }
            tracing::debug!(server = %c.conn.addr, pool = %self.key, "idle server connection closed by the server: dropped");
        }
        None
    }

    /// A server connection: an idle one, or a new login when the pool has
    /// room; else wait for one up to `queue_timeout`.
    pub async fn checkout(
        self: &Arc<Self>,
        pg: &Servers,
        queue_timeout: Duration,
    ) -> Result<Lease, PgError> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => {
                pg.pool_wait.observe(0.0);
                p
            }
            Err(_) => {
                self.stats.waiting.fetch_add(1, Ordering::Relaxed);
                let since = tokio::time::Instant::now();
                let waited =
                    tokio::time::timeout(queue_timeout, self.slots.clone().acquire_owned()).await;
                pg.pool_wait.observe(since.elapsed().as_secs_f64());
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                match waited {
                    Ok(Ok(p)) => p,
                    _ => {
                        self.stats.exhausted.fetch_add(1, Ordering::Relaxed);
                        return Err(PgError::PoolExhausted {
                            service: pg.name.clone(),
                            pool: self.key.to_string(),
                            timeout: queue_timeout,
                            size: self.size,
                        });
                    }
                }
            }
        };
        let conn = match self.take_idle(pg) {
            Some(c) => c,
            // Boxed: a login is rare, and its state would make every
            // session future that can wait here kilobytes larger.
            None => Box::pin(self.open(pg)).await?,
        };
        self.stats.in_use.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            conn,
            _permit: permit,
        })
    }

    async fn open(self: &Arc<Self>, pg: &Servers) -> Result<Counted, PgError> {
        let password = pg
            .credentials
            .get(&self.key.user)
            .ok_or_else(|| PgError::UnknownUser {
                user: self.key.user.clone(),
                service: pg.name.clone(),
            })?;
        let opened = super::server::open(
            pg,
            self.key.dst,
            &self.key.user,
            &password,
            &self.key.startup(),
        )
        .await;
        let mut conn = match opened {
            Ok(c) => c,
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.stats.opened.fetch_add(1, Ordering::Relaxed);
        self.stats.servers.fetch_add(1, Ordering::Relaxed);
        conn.statements.count_in(self.stats.statements.clone());
        let mut params = crate::sync::lock(&self.params);
        if params.is_none() {
            *params = Some(conn.params.clone().into());
        }
        drop(params);
        tracing::debug!(service = %pg.name, pool = %self.key, server = %conn.addr, "server connection opened");
        Ok(Counted {
            conn,
            pool: Arc::downgrade(self),
        })
    }

    /// Takes a lease back: its connection is kept for the next app when
    /// `reusable`, closed otherwise.
    pub fn checkin(&self, lease: Lease, reusable: bool) {
        self.stats.in_use.fetch_sub(1, Ordering::Relaxed);
        if reusable {
            self.stats.idle.fetch_add(1, Ordering::Relaxed);
            crate::sync::lock(&self.idle).push(lease.conn);
        }
    }

    /// Keeps `min_idle` connections open while the pool and service live.
    pub fn keep_min_idle(self: &Arc<Self>, pg: Weak<Servers>, min_idle: usize) {
        if min_idle == 0 {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let (Some(pool), Some(pg)) = (pool.upgrade(), pg.upgrade()) else {
                    return;
                };
                if pool.stats.idle.load(Ordering::Relaxed) < min_idle
                    && let Ok(permit) = pool.slots.clone().try_acquire_owned()
                {
                    match pool.open(&pg).await {
                        Ok(c) => {
                            pool.stats.idle.fetch_add(1, Ordering::Relaxed);
                            crate::sync::lock(&pool.idle).push(c);
                            drop(permit);
                            continue;
                        }
                        Err(e) => {
                            tracing::info!(service = %pg.name, pool = %pool.key, "min_idle: {e}")
                        }
                    }
                }
                drop((pool, pg));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}
