//! The file's shape: its sections and their defaults, as serde reads them
//! (unknown keys refused), and what every part of the proxy asks of it.

use std::time::Duration;

use ambassador_common::{DEFAULT_PROXY_PORT, DEFAULT_PROXY_UID, DEFAULT_TABLE_SIZE};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

pub use super::values::FailMode;
use super::{
    service,
    values::{Cidr, DurationText, clip, duration, ser_duration},
};

/// A config file that could not be used. The message is one line naming the
/// file, the line and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub intercept: InterceptConfig,
    /// Callers of the Pod: which ports reach the proxy, and the policy per port.
    pub inbound: super::inbound::InboundConfig,
    /// For connections no service matches.
    pub default: service::DefaultPolicy,
    pub services: Vec<service::ServiceConfig>,
    /// The app's DNS through the proxy's forwarder.
    pub dns: super::dns::DnsConfig,
    pub telemetry: TelemetryConfig,
}

/// Access logs and traces.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// One JSON line per request or TCP session on stdout. Unset: on for
    /// `proxy`, off for `run` (whose stdout is the command's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<bool>,
    /// Export spans over OTLP/HTTP; absent means no spans and no trace headers added.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingConfig>,
}

impl Eq for TelemetryConfig {}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP base URL, such as `http://127.0.0.1:4318`
    /// (`/v1/traces` is added).
    #[serde(deserialize_with = "otlp_url")]
    #[schemars(with = "String")]
    pub otlp_endpoint: String,
    /// `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Share of new traces (the app sent no `traceparent`) that are sampled;
    /// an app's own sampling decision is always followed.
    #[serde(default = "one")]
    pub sample_ratio: f64,
}

fn default_service_name() -> String {
    "ambassador".into()
}

fn one() -> f64 {
    1.0
}

fn otlp_url<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    let uri: http::Uri = s
        .parse()
        .map_err(|_| de::Error::custom(format!("`{s}` is not a URL")))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(de::Error::custom(format!(
            "`{s}` must be an http:// URL with a host (OTLP/HTTP, like http://127.0.0.1:4318)"
        )));
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// Runtime threads a proxy may ask for.
pub const MAX_WORKERS: usize = 256;

/// Where the admin API listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminListen {
    Off,
    At(std::net::SocketAddr),
}

pub const DEFAULT_ADMIN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15020);

/// The sidecar's metrics listener unless `proxy.metrics` says otherwise: on
/// the Pod's addresses, where a scraper outside the Pod reaches it.
pub const DEFAULT_METRICS: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 15090);

impl schemars::JsonSchema for AdminListen {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "AdminListen".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "address:port to listen on (like 127.0.0.1:15020), or `off`",
            "examples": ["127.0.0.1:15020", "off"]
        })
    }
}

impl Serialize for AdminListen {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AdminListen::Off => s.serialize_str("off"),
            AdminListen::At(a) => s.collect_str(a),
        }
    }
}

impl<'de> Deserialize<'de> for AdminListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "off" {
            return Ok(AdminListen::Off);
        }
        s.parse().map(AdminListen::At).map_err(|_| {
            de::Error::custom(format!(
                "`{s}` is not an address:port (like 127.0.0.1:15020) or `off`"
            ))
        })
    }
}

/// Where the admin socket is: the door for changes (`PUT /log-level`,
/// `POST /reload`), which TCP does not take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminSocket {
    Off,
    At(std::path::PathBuf),
}

/// The sidecar's admin socket unless `proxy.admin_socket` says otherwise: in
/// a directory of its own container (an emptyDir the app does not mount).
pub const DEFAULT_ADMIN_SOCKET: &str = "/var/run/ambassador/admin/admin.sock";

impl schemars::JsonSchema for AdminSocket {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "AdminSocket".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "an absolute path for the admin socket (reads and changes), or `off`",
            "examples": [DEFAULT_ADMIN_SOCKET, "off"]
        })
    }
}

impl Serialize for AdminSocket {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AdminSocket::Off => s.serialize_str("off"),
            AdminSocket::At(p) => s.collect_str(&p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for AdminSocket {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "off" => Ok(AdminSocket::Off),
            p if p.starts_with('/') && p.len() < 100 => Ok(AdminSocket::At(p.into())),
            _ => Err(de::Error::custom(format!(
                "`{}` is not an absolute path (under 100 bytes: a socket's limit) or `off`",
                clip(&s)
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Redirect target on 127.0.0.1 and ::1.
    pub port: u16,
    /// The proxy's own uid; sockets it creates are never redirected.
    pub uid: u32,
    /// Also recognise the proxy's upstream sockets by this SO_MARK (the proxy
    /// sets it; needs CAP_NET_ADMIN). For proxies that cannot have their own uid.
    pub mark: Option<u32>,
    /// Give up on an upstream that has not accepted the connection by then.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    #[schemars(with = "DurationText")]
    pub connect_timeout: Duration,
    /// Close a relayed connection after this long with no byte in either direction.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    #[schemars(with = "DurationText")]
    pub idle_timeout: Duration,
    /// Drop an HTTP client that has not sent a complete request head by then.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    #[schemars(with = "DurationText")]
    pub header_read_timeout: Duration,
    /// On SIGTERM: how long in-flight connections may take to finish.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    #[schemars(with = "DurationText")]
    pub drain_timeout: Duration,
    /// How often host names in `match.host` are resolved again.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    #[schemars(with = "DurationText")]
    pub dns_refresh: Duration,
    /// The domains short names (`payments`) are completed with, both in
    /// `match.host` and in the app's requests; default: the `search` line of
    /// /etc/resolv.conf (a Pod's: `default.svc.cluster.local ...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search_domains: Option<Vec<String>>,
    /// Runtime worker threads. 1 (the default) runs a single-threaded
    /// runtime: a sidecar shares its Pod's CPU, and on a 2-core node one
    /// thread measured faster than two (no cross-thread wake-ups). 0 picks
    /// min(2, cores).
    pub workers: usize,
    /// Plain TCP relays move bulk bytes with splice(2) (kernel to kernel,
    /// no copy through the proxy) once a direction proves bulk; false keeps
    /// every byte on read/write.
    pub splice: bool,
    /// The admin API: an address (loopback by default, 127.0.0.1:15020 for
    /// `proxy`) or `off`. `run` serves it only when this is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminListen>,
    /// The admin socket, the one door for changes: a path (for `proxy`
    /// /var/run/ambassador/admin/admin.sock by default) or `off`. `run`
    /// serves it only when this is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_socket: Option<AdminSocket>,
    /// The metrics listener: `GET /metrics` and nothing else, for scrapers
    /// outside the Pod. An address (0.0.0.0:15090 for `proxy`) or `off`.
    /// `run` serves it only when this is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<AdminListen>,
}

impl AdminListen {
    /// Where to listen: the address given, `default` when none is, nothing
    /// when `off`.
    pub fn or_default(
        v: Option<AdminListen>,
        default: std::net::SocketAddr,
    ) -> Option<std::net::SocketAddr> {
        match v {
            None => Some(default),
            Some(AdminListen::At(a)) => Some(a),
            Some(AdminListen::Off) => None,
        }
    }

    /// Where to listen when only an address given counts (`run`).
    pub fn given(v: Option<AdminListen>) -> Option<std::net::SocketAddr> {
        match v {
            Some(AdminListen::At(a)) => Some(a),
            _ => None,
        }
    }
}

impl ProxyConfig {
    /// The TCP ports `proxy` listens on besides the redirect port: never
    /// steered to the inbound listener.
    pub fn own_ports(&self) -> impl Iterator<Item = u16> {
        [
            AdminListen::or_default(self.admin, DEFAULT_ADMIN),
            AdminListen::or_default(self.metrics, DEFAULT_METRICS),
        ]
        .into_iter()
        .flatten()
        .map(|a| a.port())
        .chain([self.port])
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            port: DEFAULT_PROXY_PORT,
            uid: DEFAULT_PROXY_UID,
            mark: None,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            header_read_timeout: Duration::from_secs(10),
            dns_refresh: Duration::from_secs(30),
            search_domains: None,
            drain_timeout: Duration::from_secs(10),
            workers: 1,
            splice: true,
            admin: None,
            admin_socket: None,
            metrics: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct InterceptConfig {
    pub fail: FailMode,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<Cidr>,
    /// Also intercept connections to 127.0.0.0/8 and ::1.
    pub loopback: bool,
    /// Entries in each connection table (original destinations in flight).
    pub table_size: u32,
    /// Bytes between the app and the proxy skip the loopback TCP stack: an
    /// sk_msg program hands each side's sends to the other's socket.
    pub accelerate: bool,
    /// Where UDP may go under `default: deny`.
    pub udp: super::udp::UdpPolicy,
}

impl Default for InterceptConfig {
    fn default() -> Self {
        InterceptConfig {
            fail: FailMode::Closed,
            exclude_ports: vec![22],
            exclude_cidrs: Vec::new(),
            loopback: false,
            table_size: DEFAULT_TABLE_SIZE,
            accelerate: true,
            udp: Default::default(),
        }
    }
}

impl Config {
    /// The resolvers whose DNS the forwarder takes: the nameservers of
    /// `intercept.udp.resolvers_from` (in order, as the app's resolver
    /// tries them), when `dns.capture` is on; a file that cannot be read
    /// names none.
    pub fn dns_resolvers(&self) -> Vec<std::net::IpAddr> {
        let Some(path) = self
            .intercept
            .udp
            .resolvers_from
            .as_ref()
            .filter(|_| self.dns.capture)
        else {
            return Vec::new();
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut all = Vec::new();
        for ip in super::udp::nameservers(&text) {
            if !all.contains(&ip) && all.len() < ambassador_common::maps::MAX_DNS_RESOLVERS as usize
            {
                all.push(ip);
            }
        }
        all
    }

    /// Every duration the file sets (defaults included): what the proxy adds
    /// to the clock, for the fuzzer to check they all fit.
    pub fn durations(&self) -> Vec<Duration> {
        let p = &self.proxy;
        let mut all = vec![
            self.dns.timeout,
            self.dns.hosts_ttl,
            p.connect_timeout,
            p.idle_timeout,
            p.header_read_timeout,
            p.drain_timeout,
            p.dns_refresh,
        ];
        for s in &self.services {
            let t = &s.timeouts;
            all.extend(
                [t.connect, t.request, t.idle, t.header_read]
                    .into_iter()
                    .flatten(),
            );
            all.extend([
                s.outlier.base_ejection,
                s.outlier.max_ejection,
                s.retries.backoff,
            ]);
            if let Some(h) = &s.upstream.health_check {
                all.extend([h.interval, h.timeout]);
            }
            if let Some(pg) = &s.postgres {
                all.push(pg.pool.queue_timeout);
            }
        }
        all
    }

    /// The JSON Schema of the file (for editors; `ambassador schema`).
    pub fn json_schema() -> String {
        let schema = schemars::generate::SchemaSettings::draft07()
            .for_deserialize()
            .into_generator()
            .into_root_schema_for::<Config>();
        let mut text = serde_json::to_string_pretty(&schema).expect("a schema serialises");
        text.push('\n');
        text
    }
}
