//! `inbound.policies[]`'s gateway rules: who may call what (`access`), how
//! often (`rate_limit`), and how much (`limits`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::request::HeaderKey;

/// Access rules, first match wins; no match: `default`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    #[serde(default)]
    pub default: Verdict,
    #[serde(default)]
    pub rules: Vec<AccessRule>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[default]
    Allow,
    Deny,
}

/// One rule: every condition given must hold.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RawRule")]
pub struct AccessRule {
    pub action: Verdict,
    pub path: PathMatch,
    /// Upper-case method names; empty: any.
    pub methods: Vec<String>,
    /// Verified JWT claims that must equal these (a list claim must
    /// contain the value).
    pub claims: BTreeMap<String, String>,
    /// API-key client names this rule is for; empty: any caller.
    pub clients: Vec<String>,
}

/// How a rule names paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub enum PathMatch {
    Any,
    /// This path exactly.
    Exact(String),
    /// This path and every path below it, by whole segments: `/v1/orders`
    /// covers `/v1/orders` and `/v1/orders/7`, not `/v1/ordersX`.
    Prefix(String),
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawRule {
    action: Verdict,
    path: Option<String>,
    path_prefix: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    claims: BTreeMap<String, String>,
    #[serde(default)]
    clients: Vec<String>,
}

impl TryFrom<RawRule> for AccessRule {
    type Error = String;
    fn try_from(r: RawRule) -> Result<Self, String> {
        let path = match (r.path, r.path_prefix) {
            (Some(_), Some(_)) => return Err("give path or path_prefix, not both".into()),
            (Some(p), None) => PathMatch::Exact(valid_path(p)?),
            (None, Some(p)) => PathMatch::Prefix(valid_path(p)?.trim_end_matches('/').to_string()),
            (None, None) => PathMatch::Any,
        };
        let methods = super::values::methods(r.methods)?;
        Ok(AccessRule {
            action: r.action,
            path,
            methods,
            claims: r.claims,
            clients: r.clients,
        })
    }
}

fn valid_path(p: String) -> Result<String, String> {
    if !p.starts_with('/') || p.contains(['?', '#', '%', '\\']) {
        return Err(format!(
            "`{}` is not a plain path (starts with /, no query, no %-escapes)",
            super::values::clip(&p)
        ));
    }
    Ok(p)
}

/// A token bucket per port, or per caller (address, header or claim).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Tokens added per second (fractions allowed: 0.5 is one every 2 s).
    pub requests_per_second: f64,
    /// The bucket's size: how many requests may come at once.
    pub burst: u32,
    /// Whose bucket a request takes from.
    #[serde(default)]
    pub key: RateKey,
    /// Buckets kept at most; past it, callers share one bucket.
    #[serde(default = "max_keys")]
    pub max_keys: usize,
}

impl Eq for RateLimit {}

fn max_keys() -> usize {
    10_000
}

#[derive(Debug, Clone, PartialEq, Eq, Default, schemars::JsonSchema)]
pub enum RateKey {
    /// One bucket for the port.
    #[default]
    Port,
    /// One per caller address.
    ClientIp,
    /// One per value of this request header.
    Header(HeaderKey),
    /// One per value of this verified JWT claim.
    Claim(String),
}

impl Serialize for RateKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RateKey::Port => s.serialize_str("port"),
            RateKey::ClientIp => s.serialize_str("client_ip"),
            RateKey::Header(h) => s.serialize_str(&format!("header:{}", h.0)),
            RateKey::Claim(c) => s.serialize_str(&format!("claim:{c}")),
        }
    }
}

impl<'de> Deserialize<'de> for RateKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad = || {
            serde::de::Error::custom(format!(
                "`{}` is not a rate-limit key (port, client_ip, header:NAME, claim:NAME)",
                super::values::clip(&s)
            ))
        };
        match s.split_once(':') {
            None if s == "port" => Ok(RateKey::Port),
            None if s == "client_ip" => Ok(RateKey::ClientIp),
            Some(("header", h)) => HeaderKey::try_from(h.to_string())
                .map(RateKey::Header)
                .map_err(serde::de::Error::custom),
            Some(("claim", c)) if !c.is_empty() => Ok(RateKey::Claim(c.to_string())),
            _ => Err(bad()),
        }
    }
}

/// What one caller may cost.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields, default)]
pub struct InboundLimits {
    /// Request bodies larger than this are refused (413): at once when the
    /// length is declared, else when the body passes it.
    pub max_body_bytes: Option<u64>,
    /// Callers' connections open at once on this port; past it new ones
    /// are reset at once.
    pub max_connections: Option<usize>,
}

impl RateLimit {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.requests_per_second > 0.0 && self.requests_per_second <= 1e6) {
            return Err("rate_limit.requests_per_second: more than 0, at most 1000000".into());
        }
        if self.burst == 0 || self.burst > 1_000_000 {
            return Err("rate_limit.burst: between 1 and 1000000".into());
        }
        if self.max_keys == 0 || self.max_keys > 1_000_000 {
            return Err("rate_limit.max_keys: between 1 and 1000000".into());
        }
        Ok(())
    }
}
