//! Where a service's traffic goes: endpoints (with priorities), how they are
//! balanced and checked, and TLS toward them.

use std::{collections::BTreeMap, fmt, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize, Serializer, ser::SerializeMap};

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
    /// Only a server that does not take writes by default (a standby, or
    /// `default_transaction_read_only` on).
    #[serde(rename = "read-only")]
    ReadOnly,
    /// Only a server that is not in recovery.
    #[serde(rename = "primary")]
    Primary,
    /// Only a server in recovery (a replica).
    #[serde(rename = "standby")]
    Standby,
    /// A replica when one answers, else any server: the reader side of a
    /// read/write split that still works while the replicas are down.
    #[serde(rename = "prefer-standby")]
    PreferStandby,
}

/// What a server is, as far as choosing it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerRole {
    /// In recovery (`in_hot_standby`).
    pub standby: bool,
    /// `default_transaction_read_only` on.
    pub read_only_default: bool,
}

/// Whether a server will do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    Yes,
    /// Only if no better one answers (`prefer-standby` and a primary).
    Fallback,
    No,
}

impl TargetRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetRole::ReadWrite => "read-write",
            TargetRole::Any => "any",
            TargetRole::ReadOnly => "read-only",
            TargetRole::Primary => "primary",
            TargetRole::Standby => "standby",
            TargetRole::PreferStandby => "prefer-standby",
        }
    }

    /// As libpq decides `target_session_attrs`.
    pub fn fits(self, r: ServerRole) -> Fit {
        let read_only = r.standby || r.read_only_default;
        let yes = match self {
            TargetRole::Any => true,
            TargetRole::ReadWrite => !read_only,
            TargetRole::ReadOnly => read_only,
            TargetRole::Primary => !r.standby,
            TargetRole::Standby | TargetRole::PreferStandby => r.standby,
        };
        match (yes, self) {
            (true, _) => Fit::Yes,
            (false, TargetRole::PreferStandby) => Fit::Fallback,
            (false, _) => Fit::No,
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
    /// How often endpoints named by host are looked up again.
    #[serde(default)]
    pub dns: EndpointDns,
}

/// Endpoints named by host are looked up again when their answer's TTL runs
/// out, but never sooner than `min_ttl` (a TTL of 0 would be a lookup loop)
/// nor later than `max_ttl` (a day-long TTL would hide a moved server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RawEndpointDns")]
pub struct EndpointDns {
    #[serde(serialize_with = "super::values::ser_duration")]
    #[schemars(with = "super::values::DurationText")]
    pub min_ttl: Duration,
    #[serde(serialize_with = "super::values::ser_duration")]
    #[schemars(with = "super::values::DurationText")]
    pub max_ttl: Duration,
}

/// The shortest `min_ttl`: below a second, a name would be looked up as
/// fast as its resolver answers.
pub const MIN_DNS_TTL: Duration = Duration::from_secs(1);

impl Default for EndpointDns {
    fn default() -> Self {
        EndpointDns {
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
        }
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawEndpointDns {
    /// The shortest wait before a name is asked again, whatever its TTL,
    /// and the wait after a failed lookup (default 5s, at least 1s).
    #[serde(default, deserialize_with = "super::values::opt_duration")]
    #[schemars(with = "Option<super::values::DurationText>")]
    min_ttl: Option<Duration>,
    /// The longest, whatever its TTL (default 300s).
    #[serde(default, deserialize_with = "super::values::opt_duration")]
    #[schemars(with = "Option<super::values::DurationText>")]
    max_ttl: Option<Duration>,
}

impl TryFrom<RawEndpointDns> for EndpointDns {
    type Error = String;
    fn try_from(r: RawEndpointDns) -> Result<Self, String> {
        let d = EndpointDns::default();
        let min_ttl = r.min_ttl.unwrap_or(d.min_ttl);
        let max_ttl = r.max_ttl.unwrap_or(d.max_ttl.max(min_ttl));
        if min_ttl < MIN_DNS_TTL {
            return Err("min_ttl must be at least 1s".into());
        }
        if max_ttl < min_ttl {
            return Err("max_ttl must be at least min_ttl".into());
        }
        Ok(EndpointDns { min_ttl, max_ttl })
    }
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
    /// A passing check also ends an outlier ejection (as Envoy does by
    /// default): a recovered endpoint is back within about one interval,
    /// not after its whole ejection time.
    pub readmit_ejected: bool,
    #[schemars(skip)]
    pub kind: CheckKind,
}

impl Serialize for HealthCheck {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(6))?;
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
        m.serialize_entry("readmit_ejected", &self.readmit_ejected)?;
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
        deserialize_with = "super::values::duration",
        serialize_with = "super::values::ser_duration"
    )]
    #[schemars(with = "super::values::DurationText")]
    interval: Duration,
    #[serde(default, deserialize_with = "super::values::opt_duration")]
    #[schemars(with = "Option<super::values::DurationText>")]
    timeout: Option<Duration>,
    #[serde(default = "three")]
    unhealthy_threshold: u32,
    #[serde(default = "two")]
    healthy_threshold: u32,
    #[serde(default = "yes")]
    readmit_ejected: bool,
    tcp: Option<EmptyMap>,
    http: Option<RawHttpCheck>,
}

fn three() -> u32 {
    3
}
fn two() -> u32 {
    2
}
fn yes() -> bool {
    true
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
        let counts = 1..=super::values::MAX_COUNT;
        if !counts.contains(&r.unhealthy_threshold) || !counts.contains(&r.healthy_threshold) {
            return Err(format!(
                "thresholds between 1 and {}",
                super::values::MAX_COUNT
            ));
        }
        let kind = match (r.tcp, r.http) {
            (Some(_), None) => CheckKind::Tcp,
            (None, Some(h)) => {
                if !h.path.starts_with('/') || h.path.parse::<http::uri::PathAndQuery>().is_err() {
                    return Err(format!(
                        "http.path `{}` must be a path starting with /",
                        super::values::clip(&h.path)
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
            readmit_ejected: r.readmit_ejected,
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
            super::values::valid_host(host).map_err(|_| bad())?
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
        let alpn = super::values::alpn_or_default(r.alpn)?;
        let server_name = match r.server_name {
            Some(n) if n.parse::<std::net::IpAddr>().is_ok() => Some(n),
            Some(n) => Some(super::values::valid_host(&n)?),
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
