//! The `services` section: what to recognise, where it goes, and the policy on
//! the way. Types validate themselves while they are read (`try_from`), so a
//! bad value is reported with its line and field path like a syntax error.

use std::{collections::BTreeMap, fmt, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize, Serializer, ser::SerializeMap};

use super::Cidr;

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
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub outlier: Outlier,
    #[serde(default)]
    pub retries: Retries,
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
        deserialize_with = "super::duration",
        serialize_with = "super::ser_duration"
    )]
    #[schemars(with = "super::DurationText")]
    pub queue_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Session,
            size: 20,
            min_idle: 0,
            max_clients: 500,
            queue_timeout: Duration::from_secs(5),
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

/// Which servers a new server connection may use (libpq's `target_session_attrs`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema,
)]
pub enum TargetRole {
    /// Only a server that accepts writes (a primary).
    #[default]
    #[serde(rename = "read-write")]
    ReadWrite,
    /// Any server that answers.
    #[serde(rename = "any")]
    Any,
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
        deserialize_with = "super::duration",
        serialize_with = "super::ser_duration"
    )]
    #[schemars(with = "super::DurationText")]
    pub backoff: Duration,
    /// Retries in flight may be at most this share of the requests in flight
    /// (three are always allowed).
    pub budget: f64,
}

impl Eq for Retries {}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: 2,
            backoff: Duration::from_millis(25),
            budget: 0.2,
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
        deserialize_with = "super::opt_duration",
        serialize_with = "super::ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<super::DurationText>")]
    pub connect: Option<Duration>,
    /// One HTTP exchange, from the request to the end of the response body.
    #[serde(
        deserialize_with = "super::opt_duration",
        serialize_with = "super::ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<super::DurationText>")]
    pub request: Option<Duration>,
    /// No byte in either direction (TCP relays).
    #[serde(
        deserialize_with = "super::opt_duration",
        serialize_with = "super::ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<super::DurationText>")]
    pub idle: Option<Duration>,
    /// The app's request head, on connections that belong to this service.
    #[serde(
        deserialize_with = "super::opt_duration",
        serialize_with = "super::ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<super::DurationText>")]
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
        deserialize_with = "super::duration",
        serialize_with = "super::ser_duration"
    )]
    #[schemars(with = "super::DurationText")]
    pub base_ejection: Duration,
    #[serde(
        deserialize_with = "super::duration",
        serialize_with = "super::ser_duration"
    )]
    #[schemars(with = "super::DurationText")]
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
#[serde(rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
    /// Power of two choices on least outstanding requests.
    #[default]
    P2c,
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
            Some(h) => Some(valid_host(&h)?),
            None => None,
        };
        Ok(MatchConfig {
            host,
            cidr: r.cidr,
            port: r.port,
        })
    }
}

/// A DNS name, lowercased; no port, no scheme.
fn valid_host(h: &str) -> Result<String, String> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(h.to_ascii_lowercase())
    } else {
        Err(format!("`{h}` is not a host name (like api.example.com)"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Where to send it; empty means the original destination.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// Originate TLS to the upstream; absent means plain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// How to spread load over the healthy endpoints of one priority.
    #[serde(default)]
    pub balance: Balance,
    /// Active checks of each endpoint, besides the passive signals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Postgres services: the role a server must have (read-write by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetRole>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RawHealthCheck")]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    /// Failed checks in a row that mark an endpoint down.
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that bring it back.
    pub healthy_threshold: u32,
    #[schemars(skip)]
    pub kind: CheckKind,
}

impl Serialize for HealthCheck {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry(
            "interval",
            &humantime::format_duration(self.interval).to_string(),
        )?;
        m.serialize_entry(
            "timeout",
            &humantime::format_duration(self.timeout).to_string(),
        )?;
        m.serialize_entry("unhealthy_threshold", &self.unhealthy_threshold)?;
        m.serialize_entry("healthy_threshold", &self.healthy_threshold)?;
        match &self.kind {
            CheckKind::Tcp => m.serialize_entry("tcp", &BTreeMap::<String, String>::new())?,
            CheckKind::Http { path, expect } => {
                let mut h = BTreeMap::new();
                h.insert("path", path.clone());
                h.insert("expect", expect.to_string());
                m.serialize_entry("http", &h)?
            }
        }
        m.end()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// The endpoint accepts a TCP connection (and the TLS handshake, when
    /// the service originates TLS).
    Tcp,
    /// `GET path` answers `expect`.
    Http { path: String, expect: u16 },
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    #[serde(
        deserialize_with = "super::duration",
        serialize_with = "super::ser_duration"
    )]
    #[schemars(with = "super::DurationText")]
    interval: Duration,
    #[serde(default, deserialize_with = "super::opt_duration")]
    #[schemars(with = "Option<super::DurationText>")]
    timeout: Option<Duration>,
    #[serde(default = "three")]
    unhealthy_threshold: u32,
    #[serde(default = "two")]
    healthy_threshold: u32,
    tcp: Option<EmptyMap>,
    http: Option<RawHttpCheck>,
}

fn three() -> u32 {
    3
}
fn two() -> u32 {
    2
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct EmptyMap {}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawHttpCheck {
    path: String,
    #[serde(default = "ok200")]
    expect: u16,
}

fn ok200() -> u16 {
    200
}

impl TryFrom<RawHealthCheck> for HealthCheck {
    type Error = String;
    fn try_from(r: RawHealthCheck) -> Result<Self, String> {
        if r.interval.is_zero() {
            return Err("interval must be more than 0".into());
        }
        let counts = 1..=super::MAX_COUNT;
        if !counts.contains(&r.unhealthy_threshold) || !counts.contains(&r.healthy_threshold) {
            return Err(format!("thresholds between 1 and {}", super::MAX_COUNT));
        }
        let kind = match (r.tcp, r.http) {
            (Some(_), None) => CheckKind::Tcp,
            (None, Some(h)) => {
                if !h.path.starts_with('/') || h.path.parse::<http::uri::PathAndQuery>().is_err() {
                    return Err(format!(
                        "http.path `{}` must be a path starting with /",
                        super::clip(&h.path)
                    ));
                }
                if !(100..600).contains(&h.expect) {
                    return Err(format!("http.expect {} is not an HTTP status", h.expect));
                }
                CheckKind::Http {
                    path: h.path,
                    expect: h.expect,
                }
            }
            _ => return Err("a health check needs exactly one of tcp: {} or http: {...}".into()),
        };
        Ok(HealthCheck {
            interval: r.interval,
            timeout: r.timeout.unwrap_or(r.interval.min(Duration::from_secs(1))),
            unhealthy_threshold: r.unhealthy_threshold,
            healthy_threshold: r.healthy_threshold,
            kind,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub address: HostPort,
    /// 0 first; traffic goes to the lowest number with a healthy endpoint.
    #[serde(default)]
    pub priority: u32,
}

/// `host:port` or `ip:port` (`[v6]:port`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(try_from = "String")]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl TryFrom<String> for HostPort {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("`{s}` is not host:port (like api.example.com:443 or 10.0.0.5:8080)");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        let host = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            v6.to_string()
        } else if host.parse::<std::net::Ipv4Addr>().is_ok() {
            host.to_string()
        } else {
            valid_host(host).map_err(|_| bad())?
        };
        Ok(HostPort { host, port })
    }
}

impl Serialize for HostPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema,
)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RawTls")]
pub struct TlsConfig {
    /// SNI and the name the certificate must be valid for.
    pub server_name: Option<String>,
    /// PEM bundle added to the built-in (webpki) roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mTLS to the upstream.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub min_version: TlsVersion,
    pub alpn: Vec<String>,
    /// Accept any certificate. Named to be noticed; warned about at every start.
    pub insecure_skip_verify: bool,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawTls {
    server_name: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(default)]
    min_version: TlsVersion,
    alpn: Option<Vec<String>>,
    #[serde(default)]
    insecure_skip_verify: bool,
}

impl TryFrom<RawTls> for TlsConfig {
    type Error = String;
    fn try_from(r: RawTls) -> Result<Self, String> {
        if r.client_cert.is_some() != r.client_key.is_some() {
            return Err("client_cert and client_key go together".into());
        }
        let alpn = r
            .alpn
            .unwrap_or_else(|| vec!["h2".into(), "http/1.1".into()]);
        if let Some(bad) = alpn
            .iter()
            .find(|p| p.as_str() != "h2" && p.as_str() != "http/1.1")
        {
            return Err(format!("alpn `{bad}` is not supported (h2, http/1.1)"));
        }
        let server_name = match r.server_name {
            Some(n) if n.parse::<std::net::IpAddr>().is_ok() => Some(n),
            Some(n) => Some(valid_host(&n)?),
            None => None,
        };
        Ok(TlsConfig {
            server_name,
            ca_file: r.ca_file,
            client_cert: r.client_cert,
            client_key: r.client_key,
            min_version: r.min_version,
            alpn,
            insecure_skip_verify: r.insecure_skip_verify,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestPolicy {
    /// Headers the ambassador sets; any inbound copy is removed first.
    #[serde(default)]
    pub set_headers: BTreeMap<HeaderKey, HeaderSource>,
    #[serde(default)]
    pub remove_headers: Vec<HeaderKey>,
    /// `from: to`: the app's header goes out under another name.
    #[serde(default)]
    pub rename_headers: BTreeMap<HeaderKey, HeaderKey>,
}

/// A valid HTTP header name, lowercased.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(try_from = "String")]
pub struct HeaderKey(pub String);

impl TryFrom<String> for HeaderKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        http::HeaderName::from_bytes(lower.as_bytes())
            .map(|_| HeaderKey(lower))
            .map_err(|_| format!("`{s}` is not an HTTP header name"))
    }
}

/// Where a header value comes from. Exactly one of `value`, `env`, `file`,
/// `oauth2_client_credentials`; `prefix` (such as `"Bearer "`) goes in front.
#[derive(Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(try_from = "RawHeaderSource")]
pub struct HeaderSource {
    #[schemars(skip)]
    pub kind: SourceKind,
    pub prefix: String,
}

#[derive(Clone, PartialEq, Eq)]
pub enum SourceKind {
    Value(String),
    Env(String),
    File(PathBuf),
    OAuth2(OAuth2Config),
}

// Values may be secrets: Debug shows where they come from, never what they are.
impl fmt::Debug for HeaderSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            SourceKind::Value(_) => f.write_str("HeaderSource::Value(<redacted>)"),
            SourceKind::Env(v) => write!(f, "HeaderSource::Env({v})"),
            SourceKind::File(p) => write!(f, "HeaderSource::File({})", p.display()),
            SourceKind::OAuth2(o) => write!(f, "HeaderSource::OAuth2({})", o.token_url),
        }
    }
}

/// Shows where a value comes from, never a literal value: `/config` and
/// debug dumps must not carry secrets.
impl Serialize for HeaderSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        match &self.kind {
            SourceKind::Value(_) => m.serialize_entry("value", "<redacted>")?,
            SourceKind::Env(v) => m.serialize_entry("env", v)?,
            SourceKind::File(p) => m.serialize_entry("file", p)?,
            SourceKind::OAuth2(o) => m.serialize_entry("oauth2_client_credentials", o)?,
        }
        if !self.prefix.is_empty() {
            m.serialize_entry("prefix", &self.prefix)?;
        }
        m.end()
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawHeaderSource {
    value: Option<String>,
    env: Option<String>,
    file: Option<PathBuf>,
    oauth2_client_credentials: Option<OAuth2Config>,
    #[serde(default)]
    prefix: String,
}

impl TryFrom<RawHeaderSource> for HeaderSource {
    type Error = String;
    fn try_from(r: RawHeaderSource) -> Result<Self, String> {
        let mut kinds = Vec::new();
        if let Some(v) = r.value {
            kinds.push(SourceKind::Value(v));
        }
        if let Some(v) = r.env {
            kinds.push(SourceKind::Env(v));
        }
        if let Some(v) = r.file {
            kinds.push(SourceKind::File(v));
        }
        if let Some(v) = r.oauth2_client_credentials {
            kinds.push(SourceKind::OAuth2(v));
        }
        if kinds.len() != 1 {
            return Err(
                "a header needs exactly one of value, env, file, oauth2_client_credentials".into(),
            );
        }
        if http::HeaderValue::from_str(&r.prefix).is_err() {
            return Err("prefix is not a valid header value".into());
        }
        Ok(HeaderSource {
            kind: kinds.pop().expect("one"),
            prefix: r.prefix,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    pub token_url: String,
    pub client_id: String,
    pub client_secret_file: PathBuf,
    #[serde(default)]
    pub scopes: Vec<String>,
}
