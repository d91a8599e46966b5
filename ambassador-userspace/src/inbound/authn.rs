//! Who a caller is: a bearer JWT verified against the port's keys, or an
//! API key looked up by its digest; what the app is told of it (claims in
//! headers the caller cannot send itself); and why a caller was refused,
//! in a reason from a small fixed set (for the metric and the 401).

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use http::{HeaderMap, HeaderName, HeaderValue, header};
use serde_json::{Map, Value};

use super::failure::Failure;
use super::{
    jwks::Keys,
    jwt::{TokenMemo, verify},
};
use crate::{
    config::authn::{ApiKeysConfig, AuthConfig},
    files::FromFiles,
    net::Settings,
};

/// A port's authentication, built once per config.
pub struct Authn {
    jwt: Option<Keys>,
    /// Whether a connection remembers the last token it verified.
    remember: bool,
    api_keys: Option<ApiKeys>,
    required: bool,
    forward_claims: Vec<(String, HeaderName)>,
    /// Set by the proxy only: removed from every request first.
    strip: Vec<HeaderName>,
}

/// Who made a request.
pub enum Identity {
    Anonymous,
    Jwt(Arc<Map<String, Value>>),
    ApiKey(String),
}

impl Authn {
    pub fn new(cfg: &AuthConfig, settings: &Settings) -> Result<Authn, String> {
        let jwt = match &cfg.jwt {
            Some(j) => Some(Keys::new(j, settings).map_err(|e| e.to_string())?),
            None => None,
        };
        let api_keys = match &cfg.api_keys {
            Some(k) => Some(ApiKeys::new(k)?),
            None => None,
        };
        let name = |h: &str| HeaderName::from_bytes(h.as_bytes()).expect("validated at load");
        Ok(Authn {
            remember: cfg.jwt.as_ref().is_some_and(|j| j.remember_per_connection),
            jwt,
            api_keys,
            required: cfg.required,
            forward_claims: cfg
                .forward_claims
                .iter()
                .map(|(claim, h)| (claim.clone(), name(&h.0)))
                .collect(),
            strip: cfg.forwarded_headers().map(name).collect(),
        })
    }

    /// Who sent these headers. A bearer token is checked when present (and
    /// never falls back to an API key when wrong); else the API key.
    /// `memo` is the caller's connection's.
    pub async fn check(&self, headers: &HeaderMap, memo: &TokenMemo) -> Result<Identity, Failure> {
        if let Some(keys) = &self.jwt
            && let Some(token) = bearer(headers)?
        {
            let memo = self.remember.then_some(memo);
            return verify(keys, token, memo).await.map(Identity::Jwt);
        }
        if let Some(k) = &self.api_keys
            && let Some(presented) = headers.get(&k.header)
        {
            return k.lookup(presented.as_bytes()).map(Identity::ApiKey);
        }
        match self.required {
            true => Err(Failure::Missing),
            false => Ok(Identity::Anonymous),
        }
    }

    /// The app's view: what the caller sent in our headers goes, what the
    /// proxy verified goes in.
    pub fn apply(&self, id: &Identity, headers: &mut HeaderMap) {
        for h in &self.strip {
            headers.remove(h);
        }
        match id {
            Identity::Jwt(claims) => {
                for (claim, h) in &self.forward_claims {
                    if let Some(v) = claims.get(claim).and_then(claim_value) {
                        headers.insert(h.clone(), v);
                    }
                }
            }
            Identity::ApiKey(name) => {
                let target = self.api_keys.as_ref().and_then(|k| k.forward_name.as_ref());
                if let (Some(h), Ok(v)) = (target, HeaderValue::from_str(name)) {
                    headers.insert(h.clone(), v);
                }
            }
            Identity::Anonymous => {}
        }
    }
}

/// The token of `Authorization: Bearer <token>`; another scheme is no
/// token; two Authorization headers are malformed.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, Failure> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(Failure::Malformed);
    }
    let v = v.to_str().map_err(|_| Failure::Malformed)?;
    match v.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(token.trim())),
        _ => Ok(None),
    }
}

/// A claim as a header value: strings as they are, other JSON as its text.
fn claim_value(v: &Value) -> Option<HeaderValue> {
    match v {
        Value::String(s) => HeaderValue::from_str(s).ok(),
        Value::Null => None,
        other => HeaderValue::from_str(&other.to_string()).ok(),
    }
}

/// The API keys of a port: client name by the key's SHA-256, so a lookup
/// reveals nothing about keys by its timing.
struct ApiKeys {
    path: PathBuf,
    header: HeaderName,
    forward_name: Option<HeaderName>,
    keys: FromFiles<HashMap<[u8; 32], String>>,
}

impl ApiKeys {
    fn new(cfg: &ApiKeysConfig) -> Result<ApiKeys, String> {
        let first = read_keys(&cfg.file)?;
        let name = |h: &str| HeaderName::from_bytes(h.as_bytes()).expect("validated at load");
        Ok(ApiKeys {
            keys: FromFiles::new([cfg.file.clone()], first),
            path: cfg.file.clone(),
            header: name(&cfg.header.0),
            forward_name: cfg.forward_name.as_ref().map(|h| name(&h.0)),
        })
    }

    fn lookup(&self, presented: &[u8]) -> Result<String, Failure> {
        let keys = self.keys.get("API keys file", || read_keys(&self.path));
        keys.get(&digest(presented))
            .cloned()
            .ok_or(Failure::UnknownApiKey)
    }
}

fn digest(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `name: key` lines (a YAML map); errors name the file and never a key.
fn read_keys(path: &std::path::Path) -> Result<HashMap<[u8; 32], String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("API keys file {}: {e}", path.display()))?;
    let map: std::collections::BTreeMap<String, String> =
        serde_yaml_ng::from_str(&text).map_err(|_| {
            format!(
                "API keys file {}: not a map of client name to key (name: key, one per line)",
                path.display()
            )
        })?;
    let mut out = HashMap::with_capacity(map.len());
    for (name, key) in map {
        if key.len() < 16 {
            return Err(format!(
                "API keys file {}: the key of `{name}` is shorter than 16 characters",
                path.display()
            ));
        }
        out.insert(digest(key.as_bytes()), name);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_token_is_read_and_two_authorizations_are_refused() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Ok(None));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), Ok(None));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer a.b.c"),
        );
        assert_eq!(bearer(&h), Ok(Some("a.b.c")));
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer d.e.f"),
        );
        assert_eq!(bearer(&h), Err(Failure::Malformed));
    }

    #[test]
    fn claims_become_header_values() {
        assert_eq!(claim_value(&Value::from("alice")).unwrap(), "alice");
        assert_eq!(claim_value(&Value::from(42)).unwrap(), "42");
        assert_eq!(
            claim_value(&serde_json::json!(["a", "b"])).unwrap(),
            r#"["a","b"]"#
        );
        assert!(claim_value(&Value::from("line\nbreak")).is_none());
        assert!(claim_value(&Value::Null).is_none());
    }

    #[test]
    fn api_key_files_are_checked_and_never_quoted() {
        let dir = std::env::temp_dir().join(format!("amb-apikeys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("keys.yaml");
        std::fs::write(&f, "billing: tiny1\n").unwrap();
        let e = read_keys(&f).unwrap_err();
        assert!(e.contains("billing") && !e.contains("tiny1"), "{e}");
        std::fs::write(&f, "billing: 0123456789abcdef0123\n").unwrap();
        let keys = read_keys(&f).unwrap();
        assert_eq!(
            keys.get(&digest(b"0123456789abcdef0123"))
                .map(String::as_str),
            Some("billing")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
