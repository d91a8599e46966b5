//! `inbound.policies[].auth`: who a caller is — a JWT bearer token checked
//! against a key set, or an API key from a rotating file — and which of its
//! claims the app is told.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::{
    request::HeaderKey,
    values::{DurationText, ser_duration},
};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<ApiKeysConfig>,
    /// A request with no credentials at all: refused (401, the default), or
    /// let through as anonymous (rules may still refuse it). Credentials
    /// that are present and wrong are refused either way.
    #[serde(default = "yes")]
    pub required: bool,
    /// JWT claim → header the app receives it in (`sub: x-user`). The
    /// headers named here are removed from every request first, so a caller
    /// cannot send its own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub forward_claims: BTreeMap<String, HeaderKey>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RawJwt")]
pub struct JwtConfig {
    pub keys: KeySource,
    /// Accepted `iss` values; a token without `iss` is refused when set.
    pub issuers: Vec<String>,
    /// Accepted `aud` values; a token without `aud` is refused when set.
    pub audiences: Vec<String>,
    /// Signature algorithms accepted. Only public-key ones: an HMAC
    /// algorithm would let a token signed with a published key pass.
    pub algorithms: Vec<JwtAlgorithm>,
    /// Leeway on `exp` and `nbf`.
    #[serde(serialize_with = "ser_duration")]
    #[schemars(with = "DurationText")]
    pub clock_skew: Duration,
    /// A caller's connection remembers the last token it verified: the same
    /// token again, under the same key, has only `exp`/`nbf` checked again.
    pub remember_per_connection: bool,
}

/// Where the verification keys (a JWKS document) come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub enum KeySource {
    /// A file, re-read when it changes.
    File(PathBuf),
    /// An HTTPS URL, fetched when first needed, again every `refresh`, and
    /// once more (at most every 10 s) when a token names a key not in it.
    Url {
        url: String,
        ca_file: Option<PathBuf>,
        #[serde(serialize_with = "ser_duration")]
        #[schemars(with = "DurationText")]
        refresh: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
pub enum JwtAlgorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    jwks_file: Option<PathBuf>,
    jwks_url: Option<String>,
    jwks_ca_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "super::values::opt_duration")]
    #[schemars(with = "Option<DurationText>")]
    jwks_refresh: Option<Duration>,
    #[serde(default)]
    issuers: Vec<String>,
    #[serde(default)]
    audiences: Vec<String>,
    algorithms: Option<Vec<String>>,
    #[serde(default, deserialize_with = "super::values::opt_duration")]
    #[schemars(with = "Option<DurationText>")]
    clock_skew: Option<Duration>,
    #[serde(default = "yes")]
    remember_per_connection: bool,
}

impl TryFrom<RawJwt> for JwtConfig {
    type Error = String;
    fn try_from(r: RawJwt) -> Result<Self, String> {
        let keys = match (r.jwks_file, r.jwks_url) {
            (Some(f), None) => {
                if r.jwks_ca_file.is_some() || r.jwks_refresh.is_some() {
                    return Err("jwks_ca_file and jwks_refresh go with jwks_url".into());
                }
                KeySource::File(f)
            }
            (None, Some(url)) => {
                let uri: http::Uri = url.parse().map_err(|_| {
                    format!("jwks_url `{}` is not a URL", super::values::clip(&url))
                })?;
                if uri.scheme_str() != Some("https") || uri.host().is_none() {
                    return Err(format!(
                        "jwks_url `{}` must be an https:// URL: keys fetched in the clear could be swapped",
                        super::values::clip(&url)
                    ));
                }
                KeySource::Url {
                    url,
                    ca_file: r.jwks_ca_file,
                    refresh: r.jwks_refresh.unwrap_or(Duration::from_secs(300)),
                }
            }
            _ => return Err("give one of jwks_file and jwks_url".into()),
        };
        let algorithms = match r.algorithms {
            None => vec![JwtAlgorithm::RS256, JwtAlgorithm::ES256],
            Some(list) if list.is_empty() => return Err("algorithms: name at least one".into()),
            Some(list) => list
                .iter()
                .map(|a| algorithm(a))
                .collect::<Result<_, _>>()?,
        };
        Ok(JwtConfig {
            keys,
            issuers: r.issuers,
            audiences: r.audiences,
            algorithms,
            clock_skew: r.clock_skew.unwrap_or(Duration::from_secs(30)),
            remember_per_connection: r.remember_per_connection,
        })
    }
}

fn algorithm(name: &str) -> Result<JwtAlgorithm, String> {
    use JwtAlgorithm::*;
    Ok(match name {
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        "HS256" | "HS384" | "HS512" => {
            return Err(format!(
                "algorithm {name} is HMAC: with keys from a JWKS anyone holding the public key could sign; use RS*, PS*, ES* or EdDSA"
            ));
        }
        "none" => return Err("algorithm `none` would accept unsigned tokens".into()),
        other => {
            return Err(format!(
                "algorithm `{}` is not known (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)",
                super::values::clip(other)
            ));
        }
    })
}

/// API keys: a YAML map of client name → key, re-read when it rotates.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysConfig {
    pub file: PathBuf,
    /// The header callers send the key in.
    #[serde(default = "api_key_header")]
    pub header: HeaderKey,
    /// The header the app learns the client's name in (removed from
    /// callers' requests first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_name: Option<HeaderKey>,
}

fn api_key_header() -> HeaderKey {
    HeaderKey("x-api-key".into())
}

impl AuthConfig {
    /// The headers the proxy sets for the app, which callers may not send.
    pub fn forwarded_headers(&self) -> impl Iterator<Item = &str> {
        self.forward_claims.values().map(|h| h.0.as_str()).chain(
            self.api_keys
                .iter()
                .filter_map(|k| k.forward_name.as_ref())
                .map(|h| h.0.as_str()),
        )
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.jwt.is_none() && self.api_keys.is_none() {
            return Err("auth: give jwt, api_keys or both".into());
        }
        if !self.forward_claims.is_empty() && self.jwt.is_none() {
            return Err("auth.forward_claims needs auth.jwt".into());
        }
        Ok(())
    }
}
