//! One postgres service in runtime form: how its servers are reached, its
//! pools (one per user, database and parameters), its client limit and its
//! cancel keys.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::Semaphore;

use super::{
    auth::Credentials,
    cancel,
    error::PgSetupError,
    pool::{Pool, PoolKey, PoolSnapshot},
    server::Servers,
};
use crate::{
    config::{
        ServerTls,
        service::{PoolConfig, PostgresConfig, TargetRole, TlsConfig, TlsVersion},
    },
    endpoint::EndpointSet,
    net::Settings,
    tls::{TlsOrigin, TlsTermination},
};

/// One postgres service, ready for sessions.
pub struct PgService {
    /// How its servers are reached and logged in to.
    pub servers: Arc<Servers>,
    pub pool: PoolConfig,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    pub(super) clients: Arc<Semaphore>,
    pub(super) cancels: Arc<cancel::Registry>,
    /// Ends the app's TLS when it asks (SSLRequest); else the answer is `N`.
    pub(super) app_tls: Option<TlsTermination>,
    /// Named statements' server-side names (transaction pooling).
    pub(super) statements: super::statements::Registry,
    /// Their metrics, looked up once rather than per session.
    pub(super) statement_counters: super::extended::Counters,
}

impl std::fmt::Debug for PgService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgService")
            .field("name", &self.servers.name)
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
        let app_tls = match &cfg.app_tls {
            Some(a) => Some(TlsTermination::new(&ServerTls {
                cert: a.cert.clone(),
                key: a.key.clone(),
                // What libpq 17 offers; older clients offer none.
                alpn: vec!["postgresql".into()],
                min_version: TlsVersion::V1_2,
                client_ca: None,
                allowed_sans: Vec::new(),
            })?),
            None => None,
        };
        Ok(PgService {
            app_tls,
            servers: Arc::new(Servers {
                name: name.to_string(),
                endpoints,
                settings,
                tls,
                direct_tls: cfg.direct_tls,
                target: target.unwrap_or_default(),
                credentials: Credentials::new(&cfg.credentials_file)?,
                pool_wait: crate::metrics::get().pool_wait(name),
            }),
            pool: cfg.pool,
            pools: Mutex::new(HashMap::new()),
            clients: Arc::new(Semaphore::new(cfg.pool.max_clients)),
            cancels: Arc::new(cancel::Registry::default()),
            statements: Default::default(),
            statement_counters: {
                let m = crate::metrics::get();
                super::extended::Counters {
                    prepared: m.pg_statements(name, "prepared"),
                    reused: m.pg_statements(name, "reused"),
                    evicted: m.pg_statements(name, "evicted"),
                }
            },
        })
    }

    /// Every pool's counters.
    pub fn pools(&self) -> Vec<PoolReport> {
        let pools = crate::sync::lock(&self.pools);
        let mut out: Vec<PoolReport> = pools
            .values()
            .map(|p| PoolReport {
                service: self.servers.name.clone(),
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

    pub(super) fn pool_for(&self, key: PoolKey) -> Arc<Pool> {
        let mut pools = crate::sync::lock(&self.pools);
        if let Some(p) = pools.get(&key) {
            return p.clone();
        }
        let p = Pool::new(key.clone(), self.pool.size);
        p.keep_min_idle(Arc::downgrade(&self.servers), self.pool.min_idle);
        pools.insert(key, p.clone());
        p
    }
}
