//! The `services` section: what to recognise, where it goes, and the policy on
//! the way. Types validate themselves while they are read (`try_from`), so a
//! bad value is reported with its line and field path like a syntax error.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::{grpc::GrpcCodes, values::Cidr};
pub use super::{request::*, upstream::*};

/// What happens to a connection no service matches.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    /// Relay it as-is to where the app was going.
    #[default]
    Passthrough,
    /// Refuse it: reset for TCP, 403 with the reason for HTTP.
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: MatchConfig,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub request: RequestPolicy,
    /// HTTP services: first match wins; a request no route matches goes
    /// as the service sends it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<super::route::RouteConfig>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub outlier: Outlier,
    #[serde(default)]
    pub retries: Retries,
    /// HTTP services: a shared response cache (RFC 9111) for GET and HEAD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<super::cache::CacheConfig>,
    /// PostgreSQL policy (`protocol: postgres` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresConfig>,
}

/// The database ambassador: credentials the app never holds, pooled server
/// connections, TLS toward the server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// YAML `user: password` for each database user the app may connect as;
    /// re-read when it changes. Users not listed are refused.
    pub credentials_file: PathBuf,
    #[serde(default)]
    pub pool: PoolConfig,
    /// PostgreSQL 17 direct TLS: the handshake starts at once (ALPN
    /// `postgresql`), without an SSLRequest round trip. Needs `upstream.tls`.
    #[serde(default)]
    pub direct_tls: bool,
    /// TLS toward the app, for apps that insist (`sslmode=require`): the
    /// Pod-local certificate and key (PEM, re-read when they change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_tls: Option<AppTls>,
}

/// A certificate the ambassador shows the app.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AppTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Server connections are shared per user, database and startup parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Server connections per pool (idle and in use).
    pub size: usize,
    /// Idle server connections kept open ahead of demand.
    pub min_idle: usize,
    /// App connections open at once for this service.
    pub max_clients: usize,
    /// How long an app waits for a server connection before it gets an error.
    #[serde(
        deserialize_with = "super::values::duration",
        serialize_with = "super::values::ser_duration"
    )]
    #[schemars(with = "super::values::DurationText")]
    pub queue_timeout: Duration,
    /// Transaction mode: named prepared statements each server connection
    /// keeps (least recently used closed first); 0 refuses them.
    pub max_prepared_statements: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Session,
            size: 20,
            min_idle: 0,
            max_clients: 500,
            queue_timeout: Duration::from_secs(5),
            max_prepared_statements: 200,
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection per app session, reset (`DISCARD ALL`) and reused after it.
    #[default]
    Session,
    /// A server connection per transaction, returned at ReadyForQuery idle.
    Transaction,
}

/// Retries of HTTP requests that failed after they may have been sent: only
/// idempotent methods with a replayable body, within a budget.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Retries {
    /// Further tries after the first; 0 turns retries off.
    pub attempts: u32,
    /// The first backoff; each retry may wait up to twice as long as the last
    /// (full jitter), at most ten times this.
    #[serde(
        deserialize_with = "super::values::duration",
        serialize_with = "super::values::ser_duration"
    )]
    #[schemars(with = "super::values::DurationText")]
    pub backoff: Duration,
    /// Retries in flight may be at most this share of the requests in flight
    /// (three are always allowed).
    pub budget: f64,
    /// gRPC statuses answered before any response body (trailers-only) that
    /// may be tried again whatever the method: listing them says the calls
    /// are safe to repeat (UNAVAILABLE usually means nothing was done).
    #[serde(skip_serializing_if = "GrpcCodes::is_empty")]
    pub grpc_on: GrpcCodes,
}

impl Eq for Retries {}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: 2,
            backoff: Duration::from_millis(25),
            budget: 0.2,
            grpc_on: GrpcCodes::default(),
        }
    }
}

/// Per-service timeouts; each one that fires gives the app a clear error
/// (504 for HTTP, a reset for TCP) and a log line naming it. Unset ones take
/// the `proxy` section's value (`connect_timeout`, `idle_timeout`,
/// `header_read_timeout`); `request` defaults to 60 s.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Connecting to an upstream endpoint (per attempt).
    #[serde(
        deserialize_with = "super::values::opt_duration",
        serialize_with = "super::values::ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<super::values::DurationText>")]
    pub connect: Option<Duration>,
    /// One HTTP exchange, from the request to the end of the response body.
    #[serde(
        deserialize_with = "super::values::opt_duration",
        serialize_with = "super::values::ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<super::values::DurationText>")]
    pub request: Option<Duration>,
    /// No byte in either direction (TCP relays).
    #[serde(
        deserialize_with = "super::values::opt_duration",
        serialize_with = "super::values::ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<super::values::DurationText>")]
    pub idle: Option<Duration>,
    /// The app's request head, on connections that belong to this service.
    #[serde(
        deserialize_with = "super::values::opt_duration",
        serialize_with = "super::values::ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<super::values::DurationText>")]
    pub header_read: Option<Duration>,
}

pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Circuit breaking: past these the app gets an immediate 503 (or a refused
/// TCP connection), never a queue that grows without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Upstream connections open at once (TCP relays and HTTP pools).
    pub max_connections: usize,
    /// HTTP requests waiting for their response to start.
    pub max_pending: usize,
    /// HTTP requests in progress (until their response body ends).
    pub max_requests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_pending: 1024,
            max_requests: 1024,
        }
    }
}

/// Passive outlier detection: an endpoint is ejected after this many
/// consecutive failures (connect failures, resets, 5xx), for a time that
/// doubles with each ejection, capped.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Outlier {
    pub consecutive_failures: u32,
    #[serde(
        deserialize_with = "super::values::duration",
        serialize_with = "super::values::ser_duration"
    )]
    #[schemars(with = "super::values::DurationText")]
    pub base_ejection: Duration,
    #[serde(
        deserialize_with = "super::values::duration",
        serialize_with = "super::values::ser_duration"
    )]
    #[schemars(with = "super::values::DurationText")]
    pub max_ejection: Duration,
    /// The share of a service's endpoints that may be ejected at once (at
    /// least one always may).
    pub max_ejected: f64,
}

impl Eq for Outlier {}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected: 0.5,
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.x or HTTP/2 (prior knowledge) from the app; policy per request.
    Http,
    /// Opaque bytes, relayed.
    #[default]
    Tcp,
    /// Decide per connection from the first bytes: HTTP (then as `http`), TLS
    /// from the app (relayed as-is), anything else (relayed).
    Auto,
    /// The PostgreSQL wire protocol: TLS and authentication toward the
    /// server by the ambassador, pooled server connections (`postgres:`).
    Postgres,
}

/// How a service recognises its connections: by original destination
/// (`cidr`, `port`) and/or by name (`host`: the HTTP Host header, or the TLS
/// SNI when the app speaks TLS itself).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RawMatch")]
pub struct MatchConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Cidr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    host: Option<String>,
    cidr: Option<Cidr>,
    port: Option<u16>,
}

/// A host name, or `*.` and a domain of two labels or more (any name below
/// it).
fn match_host(h: &str) -> Result<String, String> {
    match h.strip_prefix("*.") {
        Some(domain) if domain.contains('.') => {
            Ok(format!("*.{}", super::values::valid_host(domain)?))
        }
        Some(_) => Err(format!(
            "`{}`: a wildcard covers the names below a domain of two labels or more (*.example.com)",
            super::values::clip(h)
        )),
        None => super::values::valid_host(h),
    }
}

impl TryFrom<RawMatch> for MatchConfig {
    type Error = String;
    fn try_from(r: RawMatch) -> Result<Self, String> {
        if r.host.is_none() && r.cidr.is_none() {
            return Err("a match needs `host` or `cidr` (and usually `port`)".into());
        }
        if r.port == Some(0) {
            return Err("port 0 is not a port".into());
        }
        let host = match r.host {
            Some(h) => Some(match_host(&h)?),
            None => None,
        };
        Ok(MatchConfig {
            host,
            cidr: r.cidr,
            port: r.port,
        })
    }
}
