//! The one YAML file that `init`, `proxy` and `run` read.
//!
//! Unknown keys, wrong types and bad values are errors naming the field path and
//! the line; every key has a default, so an empty file is valid.

pub mod service;

use std::{fmt, net::IpAddr, path::Path, str::FromStr, time::Duration};

use ambassador_common::{DEFAULT_PROXY_PORT, DEFAULT_PROXY_UID, DEFAULT_TABLE_SIZE, maps};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

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
    /// For connections no service matches.
    pub default: service::DefaultPolicy,
    pub services: Vec<service::ServiceConfig>,
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

/// Where the admin API listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminListen {
    Off,
    At(std::net::SocketAddr),
}

pub const DEFAULT_ADMIN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15020);

impl schemars::JsonSchema for AdminListen {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "AdminListen".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "address:port for the admin API (like 127.0.0.1:15020), or `off`",
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
    /// Runtime worker threads. 1 (the default) runs a single-threaded
    /// runtime: a sidecar shares its Pod's CPU, and on a 2-core node one
    /// thread measured faster than two (no cross-thread wake-ups). 0 picks
    /// min(2, cores).
    pub workers: usize,
    /// The admin API: an address (loopback by default, 127.0.0.1:15020 for
    /// `proxy`) or `off`. `run` serves it only when this is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminListen>,
    /// The admin socket, the one door for changes: a path (for `proxy`
    /// /var/run/ambassador/admin/admin.sock by default) or `off`. `run`
    /// serves it only when this is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_socket: Option<AdminSocket>,
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
            drain_timeout: Duration::from_secs(10),
            workers: 1,
            admin: None,
            admin_socket: None,
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// The proxy is down: connects fail at once (nothing escapes policy).
    #[default]
    Closed,
    /// The proxy is down: connects go direct.
    Open,
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
        }
    }
}

/// An address block, `10.0.0.0/8` or `fd00::/8`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Cidr(net.trunc()));
        }
        s.parse::<IpAddr>()
            .map(|ip| Cidr(IpNet::from(ip)))
            .map_err(|_| format!("`{s}` is not a CIDR (like 10.0.0.0/8 or fd00::/8)"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl schemars::JsonSchema for Cidr {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Cidr".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "An address block like 10.0.0.0/8 or fd00::/8; a bare address is a /32 or /128",
            "examples": ["10.96.0.0/12", "fd00::/8"]
        })
    }
}

/// A duration as written in the file: `1500ms`, `30s`, `5m`, `1h`.
pub struct DurationText;

impl schemars::JsonSchema for DurationText {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration: a number and a unit (ms, s, m, h), like 1500ms or 30s",
            "pattern": "^\\s*([0-9]+(\\.[0-9]+)?\\s*(ns|us|ms|s|sec|m|min|h|hr|d)\\s*)+$",
            "examples": ["1500ms", "30s", "5m"]
        })
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// Runtime threads a proxy may ask for.
pub const MAX_WORKERS: usize = 256;

/// The longest duration any setting takes: longer ones are mistakes, and
/// would overflow the clock where they are added to it.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// `1500ms`, `30s`, `5m`, `1h`; at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|_| format!("`{}` is not a duration (like 1500ms, 30s, 5m)", clip(s)))?;
    if d > MAX_DURATION {
        return Err(format!("`{}` is too long: at most 365d", clip(s)));
    }
    Ok(d)
}

/// Longest value an error quotes, and longest error line: a huge value in
/// a file must not come back as a huge error.
const MAX_QUOTED: usize = 64;
const MAX_ERROR: usize = 512;

/// `s`, cut in the middle when longer than an error should quote.
pub fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= MAX_QUOTED {
        return s.into();
    }
    let head: String = s.chars().take(MAX_QUOTED / 2).collect();
    let tail: String = {
        let t: Vec<char> = s.chars().rev().take(MAX_QUOTED / 4).collect();
        t.into_iter().rev().collect()
    };
    format!("{head}…{tail} ({} bytes)", s.len()).into()
}

/// An error line as shown: quoted runs (in backticks or double quotes) cut
/// by [`clip`], the whole at most [`MAX_ERROR`] bytes.
fn shorten(msg: String) -> String {
    if msg.len() <= MAX_ERROR / 2 {
        return msg;
    }
    let mut out = String::with_capacity(MAX_ERROR);
    let mut rest = msg.as_str();
    while let Some(open) = rest.find(['`', '"']) {
        let quote = rest[open..].chars().next().unwrap_or('`');
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        match rest.find(quote) {
            Some(close) => {
                out.push_str(&clip(&rest[..close]));
                out.push(quote);
                rest = &rest[close + 1..];
            }
            None => {
                out.push_str(&clip(rest));
                rest = "";
            }
        }
    }
    out.push_str(rest);
    if out.len() > MAX_ERROR {
        let mut cut = MAX_ERROR;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("… (cut)");
    }
    out
}

pub(crate) fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

pub(crate) fn ser_opt_duration<S: Serializer>(
    d: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

pub(crate) fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(de::Error::custom)
}

impl Config {
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

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses and validates; the error is one line with the field path and
    /// line, of bounded length whatever the file holds.
    pub fn parse(text: &str) -> Result<Config, String> {
        Config::parse_unbounded(text).map_err(shorten)
    }

    fn parse_unbounded(text: &str) -> Result<Config, String> {
        // An empty file (or only comments) is the all-defaults config.
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| yaml_error(&e))?;
        let mut cfg: Config = if value.is_null() {
            Config::default()
        } else {
            serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(text)).map_err(
                |e| {
                    let path = e.path().to_string();
                    let inner = yaml_error(e.inner());
                    // Put the full field path after the line, where serde_yaml_ng's
                    // own (shorter) path would have been.
                    match inner.split_once(": ") {
                        Some((line, rest)) if line.starts_with("line ") && path != "." => {
                            let rest = rest.strip_prefix(&format!("{path}: ")).unwrap_or(rest);
                            let rest = match rest.split_once(": ") {
                                Some((p, r)) if path.starts_with(p) => r,
                                _ => rest,
                            };
                            format!("{line}: {path}: {rest}")
                        }
                        _ => inner,
                    }
                },
            )?
        };
        // Under `deny` nothing leaves the Pod unnamed: the default exclusion
        // (22) would let any host be reached on that port.
        let ports_given = value
            .get("intercept")
            .and_then(|i| i.get("exclude_ports"))
            .is_some();
        if cfg.default == service::DefaultPolicy::Deny && !ports_given {
            cfg.intercept.exclude_ports.clear();
        }
        cfg.validate(text)?;
        Ok(cfg)
    }

    fn validate(&self, text: &str) -> Result<(), String> {
        let at = |key: &str| match line_of(text, &format!("{key}:")) {
            Some(l) => format!("line {l}: "),
            None => String::new(),
        };
        if self.proxy.mark == Some(0) {
            return Err(format!(
                "{}proxy.mark: must not be 0 (0 means unmarked)",
                at("mark")
            ));
        }
        if self.proxy.port == 0 {
            return Err(format!("{}proxy.port: must be 1-65535", at("port")));
        }
        if self.intercept.exclude_ports.contains(&0) {
            return Err(format!(
                "{}intercept.exclude_ports: 0 is not a port",
                at("exclude_ports")
            ));
        }
        if self.intercept.exclude_ports.len() > maps::MAX_EXCLUDED_PORTS as usize {
            return Err(format!(
                "{}intercept.exclude_ports: at most {} ports",
                at("exclude_ports"),
                maps::MAX_EXCLUDED_PORTS
            ));
        }
        if self.intercept.exclude_cidrs.len() > maps::MAX_EXCLUDED_CIDRS as usize {
            return Err(format!(
                "{}intercept.exclude_cidrs: at most {} blocks",
                at("exclude_cidrs"),
                maps::MAX_EXCLUDED_CIDRS
            ));
        }
        if !(0..=MAX_WORKERS).contains(&self.proxy.workers) {
            return Err(format!(
                "{}proxy.workers: at most {MAX_WORKERS}",
                at("workers")
            ));
        }
        if !(256..=1 << 22).contains(&self.intercept.table_size) {
            return Err(format!(
                "{}intercept.table_size: must be between 256 and 4194304",
                at("table_size")
            ));
        }
        if let Some(t) = &self.telemetry.tracing
            && !(0.0..=1.0).contains(&t.sample_ratio)
        {
            return Err(format!(
                "{}telemetry.tracing.sample_ratio: a share between 0 and 1",
                at("sample_ratio")
            ));
        }
        self.validate_services(text)?;
        for (name, d) in [
            ("connect_timeout", self.proxy.connect_timeout),
            ("idle_timeout", self.proxy.idle_timeout),
            ("header_read_timeout", self.proxy.header_read_timeout),
            ("dns_refresh", self.proxy.dns_refresh),
        ] {
            if d.is_zero() {
                return Err(format!("{}proxy.{name}: must be more than 0", at(name)));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Checks between services and fields that no single value can check.
    /// Linear in the number of services: where an error is, is looked up
    /// only once there is one.
    fn validate_services(&self, text: &str) -> Result<(), String> {
        let mut seen = std::collections::HashSet::with_capacity(self.services.len());
        for (i, s) in self.services.iter().enumerate() {
            let checked = if seen.insert(s.name.as_str()) {
                check_service(s)
            } else {
                Err(format!(".name: `{}` is used twice", clip(&s.name)))
            };
            if let Err(e) = checked {
                let at = match line_of(text, &format!("name: {}", s.name)) {
                    Some(l) => format!("line {l}: services[{i}]"),
                    None => format!("services[{i}]"),
                };
                return Err(format!("{at}{e}"));
            }
        }
        Ok(())
    }
}

/// The most connections, requests or pooled clients any limit may name.
pub const MAX_LIMIT: usize = 1_000_000;
/// The most retries of one request.
pub const MAX_ATTEMPTS: u32 = 10;
/// The most failures or checks in a row any threshold may ask for.
pub const MAX_COUNT: u32 = 10_000;

/// One service's own checks; the error starts with the field (`.name: ...`).
fn check_service(s: &service::ServiceConfig) -> Result<(), String> {
    use service::{Protocol, SourceKind};
    if s.name.is_empty() {
        return Err(".name: must not be empty".into());
    }
    let has_policy = !s.request.set_headers.is_empty()
        || !s.request.remove_headers.is_empty()
        || !s.request.rename_headers.is_empty();
    if s.protocol == Protocol::Tcp && has_policy {
        return Err(format!(
            ".request: header policy needs `protocol: http` (service `{}`)",
            s.name
        ));
    }
    let t = &s.timeouts;
    for (name, d) in [
        ("connect", t.connect),
        ("request", t.request),
        ("idle", t.idle),
        ("header_read", t.header_read),
    ] {
        if d.is_some_and(|d| d.is_zero()) {
            return Err(format!(".timeouts.{name}: must be more than 0"));
        }
    }
    let l = &s.limits;
    for (name, v) in [
        ("max_connections", l.max_connections),
        ("max_pending", l.max_pending),
        ("max_requests", l.max_requests),
    ] {
        if !(1..=MAX_LIMIT).contains(&v) {
            return Err(format!(".limits.{name}: between 1 and {MAX_LIMIT}"));
        }
    }
    if s.retries.attempts > MAX_ATTEMPTS {
        return Err(format!(".retries.attempts: at most {MAX_ATTEMPTS}"));
    }
    if !(0.0..=1.0).contains(&s.retries.budget) {
        return Err(".retries.budget: a share between 0 and 1".into());
    }
    let o = &s.outlier;
    if !(1..=MAX_COUNT).contains(&o.consecutive_failures) {
        return Err(format!(
            ".outlier.consecutive_failures: between 1 and {MAX_COUNT}"
        ));
    }
    if !(0.0..=1.0).contains(&o.max_ejected) {
        return Err(".outlier.max_ejected: a share between 0 and 1".into());
    }
    if o.base_ejection.is_zero() || o.max_ejection < o.base_ejection {
        return Err(".outlier: base_ejection must be more than 0 and at most max_ejection".into());
    }
    if let Some(tls) = &s.upstream.tls {
        let named_endpoint = s
            .upstream
            .endpoints
            .iter()
            .any(|e| e.address.host.parse::<IpAddr>().is_err());
        if tls.server_name.is_none() && !named_endpoint {
            return Err(
                ".upstream.tls.server_name: required when no endpoint is named by host \
                 (the certificate is checked against it)"
                    .into(),
            );
        }
    }
    match (&s.postgres, s.protocol == Protocol::Postgres) {
        (None, true) => {
            return Err(".postgres: `protocol: postgres` needs a postgres section (credentials_file at least)".into());
        }
        (Some(_), false) => {
            return Err(".postgres: needs `protocol: postgres`".into());
        }
        (Some(pg), true) => {
            let p = &pg.pool;
            if !(1..=MAX_LIMIT).contains(&p.size) || !(1..=MAX_LIMIT).contains(&p.max_clients) {
                return Err(format!(
                    ".postgres.pool: size and max_clients between 1 and {MAX_LIMIT}"
                ));
            }
            if p.min_idle > p.size {
                return Err(format!(
                    ".postgres.pool.min_idle: at most pool.size ({})",
                    p.size
                ));
            }
            if p.queue_timeout.is_zero() {
                return Err(".postgres.pool.queue_timeout: must be more than 0".into());
            }
            if pg.direct_tls && s.upstream.tls.is_none() {
                return Err(".postgres.direct_tls: needs upstream.tls".into());
            }
            if has_policy {
                return Err(format!(
                    ".request: header policy needs `protocol: http` (service `{}`)",
                    s.name
                ));
            }
        }
        (None, false) => {}
    }
    if s.upstream.target.is_some() && s.protocol != Protocol::Postgres {
        return Err(".upstream.target: only postgres services check a server's role".into());
    }
    for (name, src) in &s.request.set_headers {
        if let SourceKind::OAuth2(o) = &src.kind
            && !(o.token_url.starts_with("https://") || o.token_url.starts_with("http://"))
        {
            {
                return Err(format!(
                    ".request.set_headers.{}.oauth2_client_credentials.token_url: must be an http(s) URL",
                    name.0
                ));
            }
        }
    }
    Ok(())
}

/// serde_yaml_ng says "path: problem at line L column C"; put the line first so
/// every error reads the same way.
fn yaml_error(e: &serde_yaml_ng::Error) -> String {
    let msg = e.to_string();
    let msg = match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    };
    match e.location() {
        Some(loc) => format!("line {}: {msg}", loc.line()),
        None => msg,
    }
}

/// The first line starting with `needle` (after indentation and a list dash),
/// for errors found after parsing.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix("- ")
                .unwrap_or(l)
                .trim_start()
                .starts_with(needle)
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_deny_exclusions_are_only_the_ones_written() {
        assert_eq!(Config::parse("").unwrap().intercept.exclude_ports, [22]);
        assert_eq!(
            Config::parse("default: passthrough")
                .unwrap()
                .intercept
                .exclude_ports,
            [22]
        );
        assert!(
            Config::parse("default: deny")
                .unwrap()
                .intercept
                .exclude_ports
                .is_empty()
        );
        assert_eq!(
            Config::parse("default: deny\nintercept: { exclude_ports: [22] }")
                .unwrap()
                .intercept
                .exclude_ports,
            [22]
        );
    }

    #[test]
    fn every_duration_and_count_is_bounded() {
        for (text, field) in [
            ("proxy: { idle_timeout: 10000000000000000000s }", "too long"),
            ("proxy: { header_read_timeout: 366d }", "too long"),
            ("proxy: { workers: 1000000 }", "proxy.workers: at most 256"),
            (
                "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, outlier: { base_ejection: 1s, max_ejection: 100000000000s } }]",
                "too long",
            ),
            (
                "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, limits: { max_requests: 100000000 } }]",
                "services[0].limits.max_requests: between 1 and 1000000",
            ),
            (
                "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, retries: { attempts: 4000000000 } }]",
                "services[0].retries.attempts: at most 10",
            ),
            (
                "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, outlier: { consecutive_failures: 4000000000 } }]",
                "consecutive_failures: between 1 and 10000",
            ),
            (
                "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, upstream: { health_check: { interval: 1s, tcp: {}, healthy_threshold: 4000000000 } } }]",
                "thresholds between 1 and 10000",
            ),
            (
                "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, upstream: { health_check: { interval: 1s, http: { path: \"/a b\" } } } }]",
                "must be a path",
            ),
        ] {
            let err = Config::parse(text).unwrap_err();
            assert!(err.contains(field), "{text}: {err}");
        }
        let max = Config::parse("proxy: { idle_timeout: 365d, workers: 256 }").unwrap();
        assert_eq!(max.proxy.idle_timeout, MAX_DURATION);
    }

    #[test]
    fn a_huge_value_comes_back_as_a_short_error() {
        let huge = "x".repeat(4 << 20);
        for text in [
            format!("proxy: {{ idle_timeout: {huge} }}"),
            format!("default: {huge}"),
            format!("services: [{{ name: a, match: {{ host: {huge} }} }}]"),
            format!("{huge}: 1"),
        ] {
            let err = Config::parse(&text).unwrap_err();
            assert!(err.len() < 600, "{} bytes: {}", err.len(), &err[..200]);
            assert!(!err.contains(&"x".repeat(100)), "{err}");
        }
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(1000);
        let c = clip(&long);
        assert!(c.ends_with("(2000 bytes)") && c.len() < 200, "{c}");
    }

    #[test]
    fn empty_file_is_all_defaults() {
        for text in ["", "\n", "# nothing\n"] {
            assert_eq!(Config::parse(text).unwrap(), Config::default());
        }
        let d = Config::default();
        assert_eq!(d.proxy.port, 15001);
        assert_eq!(d.proxy.uid, 1337);
        assert_eq!(d.intercept.fail, FailMode::Closed);
        assert_eq!(d.intercept.exclude_ports, vec![22]);
        assert!(!d.intercept.loopback);
    }

    #[test]
    fn documented_example_parses() {
        let cfg = Config::parse(
            "proxy:\n  port: 15001\n  uid: 1337\nintercept:\n  fail: closed\n  exclude_ports: [22]\n  exclude_cidrs: []\n  loopback: false\n",
        )
        .unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn values_are_read() {
        let cfg = Config::parse(
            "proxy: { port: 16001, idle_timeout: 1500ms }\nintercept:\n  fail: open\n  exclude_cidrs: [10.0.0.0/8, 'fd00::1']\n",
        )
        .unwrap();
        assert_eq!(cfg.proxy.port, 16001);
        assert_eq!(cfg.proxy.idle_timeout, Duration::from_millis(1500));
        assert_eq!(cfg.intercept.fail, FailMode::Open);
        assert_eq!(cfg.intercept.exclude_cidrs[1].to_string(), "fd00::1/128");
    }

    #[test]
    fn http_egress_example_parses() {
        use service::{DefaultPolicy, Protocol, SourceKind};
        let text = include_str!("../../../examples/http-egress.yaml");
        let cfg = Config::parse(text).unwrap();
        assert_eq!(cfg.default, DefaultPolicy::Deny);
        assert_eq!(cfg.services.len(), 2);
        let pay = &cfg.services[0];
        assert_eq!(pay.matcher.host.as_deref(), Some("payments.example.com"));
        assert_eq!(pay.protocol, Protocol::Http);
        assert_eq!(
            pay.upstream.endpoints[0].address.to_string(),
            "payments.example.com:443"
        );
        let tls = pay.upstream.tls.as_ref().unwrap();
        assert_eq!(tls.alpn, ["h2", "http/1.1"]);
        let auth = &pay.request.set_headers[&service::HeaderKey("authorization".into())];
        assert_eq!(auth.prefix, "Bearer ");
        assert!(matches!(auth.kind, SourceKind::File(_)));
        let api = &cfg.services[1];
        assert!(matches!(
            api.request.set_headers.values().next().unwrap().kind,
            SourceKind::OAuth2(_)
        ));
    }

    #[test]
    fn postgres_example_parses() {
        use service::{PoolMode, Protocol, TargetRole};
        let cfg = Config::parse(include_str!("../../../examples/postgres.yaml")).unwrap();
        let s = &cfg.services[0];
        assert_eq!(s.name, "orders-db");
        assert_eq!(s.protocol, Protocol::Postgres);
        assert_eq!(s.upstream.target, Some(TargetRole::ReadWrite));
        assert_eq!(s.upstream.endpoints.len(), 2);
        let tls = s.upstream.tls.as_ref().unwrap();
        assert_eq!(tls.server_name.as_deref(), Some("orders-db.internal"));
        let pg = s.postgres.as_ref().unwrap();
        assert_eq!(
            pg.credentials_file,
            std::path::Path::new("/var/run/secrets/orders-db/credentials.yaml")
        );
        assert_eq!(pg.pool.mode, PoolMode::Transaction);
        assert_eq!(pg.pool.size, 20);
        assert_eq!(pg.pool.min_idle, 2);
        assert_eq!(pg.pool.max_clients, 500);
        assert_eq!(pg.pool.queue_timeout, Duration::from_secs(5));
    }

    #[test]
    fn postgres_errors_name_field_and_line() {
        let base = "services:\n  - name: db\n    match: { cidr: 10.0.0.1, port: 5432 }\n";
        let e = Config::parse(&format!("{base}    protocol: postgres\n")).unwrap_err();
        assert!(e.contains("line 2: services[0].postgres"), "{e}");
        let e = Config::parse(&format!(
            "{base}    postgres: {{ credentials_file: /c.yaml }}\n"
        ))
        .unwrap_err();
        assert!(e.contains("needs `protocol: postgres`"), "{e}");
        let e = Config::parse(&format!(
            "{base}    protocol: postgres\n    postgres: {{ credentials_file: /c.yaml, pool: {{ mode: statement }} }}\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("line 5: services[0].postgres.pool.mode: unknown variant `statement`"),
            "{e}"
        );
        let e = Config::parse(&format!(
            "{base}    protocol: postgres\n    postgres: {{ credentials_file: /c.yaml, pool: {{ size: 2, min_idle: 3 }} }}\n"
        ))
        .unwrap_err();
        assert!(e.contains("min_idle: at most pool.size (2)"), "{e}");
        let e = Config::parse(&format!("{base}    upstream: {{ target: any }}\n")).unwrap_err();
        assert!(e.contains("upstream.target: only postgres"), "{e}");
        let e = Config::parse(&format!(
            "{base}    protocol: postgres\n    upstream: {{ target: primary }}\n    postgres: {{ credentials_file: /c.yaml }}\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("unknown variant `primary`, expected `read-write` or `any`"),
            "{e}"
        );
    }

    #[test]
    fn failover_example_parses() {
        use service::{Balance, CheckKind};
        let cfg = Config::parse(include_str!("../../../examples/failover.yaml")).unwrap();
        let s = &cfg.services[0];
        assert_eq!(s.timeouts.request, Some(Duration::from_secs(15)));
        assert_eq!(s.retries.attempts, 2);
        assert_eq!(s.retries.budget, 0.2);
        assert_eq!(s.limits.max_pending, 1024);
        assert_eq!(s.outlier.consecutive_failures, 5);
        assert_eq!(s.upstream.balance, Balance::P2c);
        assert_eq!(s.upstream.endpoints[1].priority, 1);
        let hc = s.upstream.health_check.as_ref().unwrap();
        assert_eq!(hc.interval, Duration::from_secs(2));
        assert_eq!(
            hc.kind,
            CheckKind::Http {
                path: "/healthz".into(),
                expect: 200
            }
        );
    }

    #[test]
    fn service_errors_name_field_and_line() {
        let e = Config::parse("services:\n  - name: a\n    match: { port: 80 }\n").unwrap_err();
        // The line is the service's (serde_yaml_ng marks the enclosing mapping).
        assert!(
            e.starts_with("line 2: ") && e.contains("services[0].match"),
            "{e}"
        );

        let e = Config::parse(
            "services:\n  - name: a\n    match: { cidr: 10.0.0.0/8 }\n    protocol: http\n    request:\n      set_headers:\n        x-a: { value: a, env: B }\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("line 7: ") && e.contains("set_headers.x-a"),
            "{e}"
        );
        assert!(e.contains("exactly one of"), "{e}");

        let e = Config::parse(
            "services:\n  - name: a\n    match: { cidr: 10.0.0.0/8 }\n    upstream:\n      endpoints:\n        - address: nope\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("line 6: ") && e.contains("endpoints[0].address"),
            "{e}"
        );

        let e = Config::parse(
            "services:\n  - name: a\n    match: { cidr: 10.0.0.0/8 }\n    request: { remove_headers: [x-a] }\n",
        )
        .unwrap_err();
        assert!(
            e.contains("line 2: services[0].request") && e.contains("protocol: http"),
            "{e}"
        );

        let e = Config::parse(
            "services:\n  - name: a\n    match: { cidr: 10.0.0.0/8 }\n    upstream: { tls: {} }\n",
        )
        .unwrap_err();
        assert!(e.contains("server_name: required"), "{e}");

        let e = Config::parse(
            "services:\n  - name: a\n    match: { cidr: 10.0.0.0/8 }\n  - name: a\n    match: { cidr: 10.0.0.0/8 }\n",
        )
        .unwrap_err();
        assert!(e.contains("used twice"), "{e}");
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let cfg = Config::parse(
            "services:\n  - name: a\n    match: { cidr: 10.0.0.0/8 }\n    protocol: http\n    request:\n      set_headers:\n        authorization: { value: s3cr3t-canary }\n",
        )
        .unwrap();
        let dump = format!("{cfg:?}");
        assert!(!dump.contains("s3cr3t-canary"), "{dump}");
        assert!(dump.contains("<redacted>"));
    }

    #[test]
    fn errors_name_field_and_line() {
        let e = Config::parse("proxy:\n  port: 15001\n  prot: 1\n").unwrap_err();
        assert!(e.starts_with("line 3: "), "{e}");
        assert!(e.contains("proxy") && e.contains("prot"), "{e}");

        let e = Config::parse("intercept:\n  fail: maybe\n").unwrap_err();
        assert!(
            e.starts_with("line 2: ") && e.contains("intercept.fail"),
            "{e}"
        );

        let e = Config::parse("proxy:\n  port: nope\n").unwrap_err();
        assert!(e.starts_with("line 2: ") && e.contains("proxy.port"), "{e}");

        let e = Config::parse("intercept:\n  exclude_cidrs: [10.0.0.0/33]\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("exclude_cidrs"), "{e}");

        let e = Config::parse("proxy:\n  idle_timeout: soon\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("idle_timeout"), "{e}");

        let e = Config::parse("proxy:\n  port: 0\n").unwrap_err();
        assert_eq!(e, "line 2: proxy.port: must be 1-65535");

        let e = Config::parse("service: []\n").unwrap_err();
        assert!(e.starts_with("line 1: ") && e.contains("service"), "{e}");
    }
}
