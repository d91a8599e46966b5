//! `inbound:`: which of the app's ports callers reach through the proxy,
//! what happens while the proxy is down, and the policy per port.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use ambassador_common::DEFAULT_INBOUND_PORT;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::{upstream::TlsVersion, values::FailMode};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct InboundConfig {
    /// The app's ports whose incoming TCP connections go through the proxy:
    /// a list, or `all` (every port not excluded). Empty: no inbound
    /// interception.
    pub ports: InboundPorts,
    /// Ports never intercepted (with `ports: all`: kubelet probes, a
    /// metrics port scraped directly).
    pub exclude_ports: Vec<u16>,
    /// While the proxy is down: `closed` refuses new connections (nothing
    /// reaches the app past policy), `open` delivers them to the app.
    pub fail: FailMode,
    /// The proxy's inbound listener, on 127.0.0.1 and ::1 (connections get
    /// there only through the kernel program).
    pub port: u16,
    /// Where the proxy reaches the app: an IPv4 address of the Pod
    /// (loopback by default), from 127.0.0.6.
    #[schemars(with = "String")]
    pub app: IpAddr,
    /// Policy per port; a port without one is relayed as TCP.
    pub policies: Vec<InboundPolicy>,
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            ports: InboundPorts::List(Vec::new()),
            exclude_ports: Vec::new(),
            fail: FailMode::Closed,
            port: DEFAULT_INBOUND_PORT,
            app: IpAddr::V4(Ipv4Addr::LOCALHOST),
            policies: Vec::new(),
        }
    }
}

impl InboundConfig {
    /// Whether anything is intercepted at all.
    pub fn enabled(&self) -> bool {
        match &self.ports {
            InboundPorts::All => true,
            InboundPorts::List(l) => !l.is_empty(),
        }
    }

    /// Whether callers of `port` reach the proxy.
    pub fn intercepts(&self, port: u16) -> bool {
        !self.exclude_ports.contains(&port)
            && match &self.ports {
                InboundPorts::All => true,
                InboundPorts::List(l) => l.contains(&port),
            }
    }

    pub fn policy(&self, port: u16) -> Option<&InboundPolicy> {
        self.policies.iter().find(|p| p.port == port)
    }
}

/// `all`, or a list of ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    All,
    List(Vec<u16>),
}

impl Serialize for InboundPorts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            InboundPorts::All => s.serialize_str("all"),
            InboundPorts::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for InboundPorts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            List(Vec<u16>),
        }
        match Raw::deserialize(d)
            .map_err(|_| de::Error::custom("a list of ports (like [8080]) or `all`"))?
        {
            Raw::Word(w) if w == "all" => Ok(InboundPorts::All),
            Raw::Word(w) => Err(de::Error::custom(format!(
                "`{}` is neither `all` nor a list of ports",
                super::values::clip(&w)
            ))),
            Raw::List(l) => Ok(InboundPorts::List(l)),
        }
    }
}

impl schemars::JsonSchema for InboundPorts {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "InboundPorts".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "a list of ports, or `all`",
            "oneOf": [
                {"type": "string", "enum": ["all"]},
                {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 65535}}
            ]
        })
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum InboundProtocol {
    /// Requests are read, limited and forwarded one by one.
    #[default]
    Http,
    /// Bytes are relayed (after TLS termination, when configured).
    Tcp,
}

/// What an HTTP port's app speaks.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 on pooled keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2 in the clear (prior knowledge, h2c): gRPC apps; every caller's
    /// requests share the app's HTTP/2 connection.
    Http2,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InboundPolicy {
    pub port: u16,
    /// Names the port's series in metrics and access logs (default
    /// `inbound-<port>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: InboundProtocol,
    /// How the proxy speaks to the app on HTTP ports.
    #[serde(default)]
    pub app_protocol: AppProtocol,
    /// Terminate TLS from callers; the app gets cleartext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    /// Who the caller is (HTTP ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<super::authn::AuthConfig>,
    /// Who may call what (HTTP ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<super::gateway::AccessConfig>,
    /// How often (HTTP ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<super::gateway::RateLimit>,
    /// How much: body size (HTTP ports), connections at once.
    #[serde(default)]
    pub limits: super::gateway::InboundLimits,
    /// TCP ports: tell the app who the caller was with a PROXY protocol v2
    /// header before the caller's bytes (the app must expect it).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// HTTP ports: after the gateway's rules, first match wins (the same
    /// route model as a service's; `upstream` is not for inbound ports).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<super::route::RouteConfig>,
}

impl InboundPolicy {
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("inbound-{}", self.port))
    }
}

/// TLS toward callers: the Pod's certificate, reloaded when its files change
/// (live connections keep the one they started with).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RawServerTls")]
pub struct ServerTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Protocols offered by ALPN, in order (default h2, http/1.1).
    pub alpn: Vec<String>,
    pub min_version: TlsVersion,
    /// Mutual TLS: callers must present a certificate this CA bundle (PEM)
    /// signed; re-read when it changes.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: the client certificate must name one of these in
    /// its subject alternative names (DNS names, or URIs such as SPIFFE
    /// IDs, exactly); empty: any the CA signed.
    pub allowed_sans: Vec<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawServerTls {
    cert: PathBuf,
    key: PathBuf,
    alpn: Option<Vec<String>>,
    #[serde(default)]
    min_version: TlsVersion,
    client_ca: Option<PathBuf>,
    #[serde(default)]
    allowed_sans: Vec<String>,
}

impl TryFrom<RawServerTls> for ServerTls {
    type Error = String;
    fn try_from(r: RawServerTls) -> Result<Self, String> {
        let alpn = super::values::alpn_or_default(r.alpn)?;
        if !r.allowed_sans.is_empty() && r.client_ca.is_none() {
            return Err(
                "allowed_sans needs client_ca (the CA that signs callers' certificates)".into(),
            );
        }
        Ok(ServerTls {
            cert: r.cert,
            key: r.key,
            alpn,
            min_version: r.min_version,
            client_ca: r.client_ca,
            allowed_sans: r.allowed_sans,
        })
    }
}

/// Checks between one policy's fields.
fn validate_policy(p: &InboundPolicy) -> Result<(), String> {
    use super::gateway::RateKey;
    let http_only = [
        ("routes", !p.routes.is_empty()),
        ("auth", p.auth.is_some()),
        ("access", p.access.is_some()),
        ("rate_limit", p.rate_limit.is_some()),
        ("limits.max_body_bytes", p.limits.max_body_bytes.is_some()),
    ];
    if p.protocol != InboundProtocol::Http
        && let Some((what, _)) = http_only.iter().find(|(_, set)| *set)
    {
        return Err(format!("{what} needs protocol: http"));
    }
    if p.app_protocol != AppProtocol::Http1 && p.protocol != InboundProtocol::Http {
        return Err(
            "app_protocol needs protocol: http (a tcp port relays bytes as they are)".into(),
        );
    }
    if p.proxy_protocol && p.protocol != InboundProtocol::Tcp {
        return Err(
            "proxy_protocol is for protocol: tcp (HTTP ports name the caller in headers)".into(),
        );
    }
    if let Some(a) = &p.auth {
        a.validate()?;
    }
    let mut names = std::collections::HashSet::new();
    for (i, r) in p.routes.iter().enumerate() {
        if r.upstream.is_some() {
            return Err(format!(
                "routes[{i}].upstream: an inbound port's routes go to the app (upstream is for services)"
            ));
        }
        if r.transcode.is_some() {
            return Err(format!(
                "routes[{i}].transcode: an inbound port's routes go to the app as they came"
            ));
        }
        if r.cache != super::cache::RouteCache::Service {
            return Err(format!(
                "routes[{i}].cache: an inbound port's routes have no response cache (caching is for the app's calls out)"
            ));
        }
        if let Some(n) = &r.name
            && !names.insert(n.as_str())
        {
            return Err(format!("routes[{i}].name: `{n}` is used twice"));
        }
    }
    let jwt = p.auth.as_ref().is_some_and(|a| a.jwt.is_some());
    let keys = p.auth.as_ref().is_some_and(|a| a.api_keys.is_some());
    if let Some(r) = &p.rate_limit {
        r.validate()?;
        if matches!(r.key, RateKey::Claim(_)) && !jwt {
            return Err("rate_limit.key claim:... needs auth.jwt".into());
        }
    }
    for (i, r) in p.access.iter().flat_map(|a| a.rules.iter().enumerate()) {
        if !r.claims.is_empty() && !jwt {
            return Err(format!(
                "access.rules[{i}] names claims but there is no auth.jwt"
            ));
        }
        if !r.clients.is_empty() && !keys {
            return Err(format!(
                "access.rules[{i}] names clients but there is no auth.api_keys"
            ));
        }
    }
    if p.limits.max_connections == Some(0) || p.limits.max_body_bytes == Some(0) {
        return Err("limits: 0 would refuse everything".into());
    }
    Ok(())
}

/// Checks between the section's fields.
pub fn validate(i: &InboundConfig, proxy_port: u16) -> Result<(), String> {
    if i.port == 0 {
        return Err("inbound.port: must be 1-65535".into());
    }
    if i.port == proxy_port {
        return Err(format!(
            "inbound.port: {} is proxy.port too; the inbound listener needs its own port",
            i.port
        ));
    }
    if let InboundPorts::List(l) = &i.ports
        && l.len() + i.exclude_ports.len() > ambassador_common::maps::MAX_INBOUND_PORTS as usize
    {
        return Err(format!(
            "inbound.ports: at most {} ports and exclusions together",
            ambassador_common::maps::MAX_INBOUND_PORTS
        ));
    }
    let listed = match &i.ports {
        InboundPorts::All => &[][..],
        InboundPorts::List(l) => l,
    };
    if listed.iter().chain(&i.exclude_ports).any(|p| *p == 0) {
        return Err("inbound.ports: 0 is not a port".into());
    }
    match i.app {
        IpAddr::V4(a) if !a.is_unspecified() => {}
        other => {
            return Err(format!(
                "inbound.app: {other} is not usable; give an IPv4 address of the Pod (127.0.0.1 by default)"
            ));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for p in &i.policies {
        if !seen.insert(p.port) {
            return Err(format!(
                "inbound.policies: port {} has two policies",
                p.port
            ));
        }
        validate_policy(p).map_err(|e| format!("inbound.policies: port {}: {e}", p.port))?;
        if !i.intercepts(p.port) {
            return Err(format!(
                "inbound.policies: port {} is not intercepted (add it to inbound.ports, or remove it from exclude_ports): its policy would never run",
                p.port
            ));
        }
    }
    Ok(())
}
