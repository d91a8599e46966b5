//! The keys JWTs are checked against: a JWKS document from a rotating file
//! or an HTTPS URL, made into one verifier per key, each accepting only the
//! configured algorithms of its own family (so `HS256` signed with an RSA
//! key's public bytes, or `alg: none`, never verifies).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet},
};

use crate::{
    config::{
        authn::{JwtAlgorithm, JwtConfig, KeySource},
        service::TlsConfig,
    },
    files::FromFiles,
    net::Settings,
    tls::TlsOrigin,
    upstream::UpstreamConnector,
};

/// A JWKS document bigger than this is refused.
const MAX_JWKS: usize = 256 * 1024;
/// A token naming an unknown key fetches the URL again at most this often.
const REFETCH_AT_MOST_EVERY: Duration = Duration::from_secs(10);

/// One key, ready to verify.
pub struct Key {
    pub decoding: DecodingKey,
    pub validation: Validation,
}

/// The verifiers of one JWKS document, by `kid`.
#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    /// Keys without a `kid`: used for tokens without one, when alone.
    unnamed: Vec<Arc<Key>>,
}

impl KeySet {
    /// Keys of kinds no configured algorithm can use are left out.
    pub fn parse(json: &[u8], cfg: &JwtConfig) -> Result<KeySet, String> {
        let set: JwkSet =
            serde_json::from_slice(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut out = KeySet::default();
        for jwk in &set.keys {
            let Some(key) = key_for(jwk, cfg) else {
                continue;
            };
            match &jwk.common.key_id {
                Some(kid) => {
                    out.by_kid.insert(kid.clone(), Arc::new(key));
                }
                None => out.unnamed.push(Arc::new(key)),
            }
        }
        if out.by_kid.is_empty() && out.unnamed.is_empty() {
            return Err("no key in it can check the configured algorithms".into());
        }
        Ok(out)
    }

    /// The key a token names; without a `kid`, the one key without one.
    pub fn find(&self, kid: Option<&str>) -> Option<Arc<Key>> {
        match kid {
            Some(k) => self.by_kid.get(k).cloned(),
            None if self.unnamed.len() == 1 && self.by_kid.is_empty() => {
                self.unnamed.first().cloned()
            }
            None => None,
        }
    }
}

fn key_for(jwk: &Jwk, cfg: &JwtConfig) -> Option<Key> {
    use JwtAlgorithm::*;
    let fits: &[JwtAlgorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => &[ES256],
            EllipticCurve::P384 => &[ES384],
            _ => &[],
        },
        AlgorithmParameters::OctetKeyPair(_) => &[EdDSA],
        // Shared secrets are never accepted (see `config::authn`).
        AlgorithmParameters::OctetKey(_) => &[],
    };
    let named = jwk.common.key_algorithm.map(|a| format!("{a:?}"));
    let algorithms: Vec<Algorithm> = cfg
        .algorithms
        .iter()
        .filter(|a| fits.contains(a))
        .filter(|a| named.as_deref().is_none_or(|n| n == format!("{a:?}")))
        .map(|a| algorithm(*a))
        .collect();
    let first = *algorithms.first()?;
    let decoding = DecodingKey::from_jwk(jwk).ok()?;
    let mut validation = Validation::new(first);
    validation.algorithms = algorithms;
    validation.leeway = cfg.clock_skew.as_secs();
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if !cfg.issuers.is_empty() {
        validation.set_issuer(&cfg.issuers);
        required.push("iss");
    }
    if cfg.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&cfg.audiences);
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    Some(Key {
        decoding,
        validation,
    })
}

fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::RS384 => Algorithm::RS384,
        JwtAlgorithm::RS512 => Algorithm::RS512,
        JwtAlgorithm::PS256 => Algorithm::PS256,
        JwtAlgorithm::PS384 => Algorithm::PS384,
        JwtAlgorithm::PS512 => Algorithm::PS512,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::ES384 => Algorithm::ES384,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

/// Where a port's keys come from, and the last good set.
pub enum Keys {
    File(Box<FileKeys>),
    Url(Box<UrlKeys>),
}

/// Keys from a file, re-read when it changes.
pub struct FileKeys {
    path: PathBuf,
    cfg: JwtConfig,
    set: FromFiles<KeySet>,
}

/// Keys fetched over HTTPS.
pub struct UrlKeys {
    uri: http::Uri,
    cfg: JwtConfig,
    refresh: Duration,
    client: Client<UpstreamConnector, Full<Bytes>>,
    /// The set and when it was fetched; held across a fetch, so whoever
    /// comes next waits for its result instead of fetching too.
    state: tokio::sync::Mutex<Fetched>,
}

#[derive(Default)]
struct Fetched {
    set: Option<Arc<KeySet>>,
    at: Option<Instant>,
}

/// Why no key could be had.
#[derive(Debug, thiserror::Error)]
#[error("JWKS {0}")]
pub struct KeysError(pub String);

impl Keys {
    /// A file is read now (a bad one stops the start or the reload); a URL
    /// is fetched when first needed.
    pub fn new(cfg: &JwtConfig, settings: &Settings) -> Result<Keys, KeysError> {
        match &cfg.keys {
            KeySource::File(path) => {
                let first = read_file(path, cfg)?;
                Ok(Keys::File(Box::new(FileKeys {
                    set: FromFiles::new([path.clone()], first),
                    path: path.clone(),
                    cfg: cfg.clone(),
                })))
            }
            KeySource::Url {
                url,
                ca_file,
                refresh,
            } => {
                let uri: http::Uri = url.parse().map_err(|_| KeysError("URL".into()))?;
                let host = uri.host().unwrap_or_default().to_string();
                let tls = TlsConfig {
                    server_name: Some(host),
                    ca_file: ca_file.clone(),
                    client_cert: None,
                    client_key: None,
                    min_version: Default::default(),
                    alpn: vec!["http/1.1".into()],
                    insecure_skip_verify: false,
                };
                let origin = TlsOrigin::new("jwks", &tls, None)
                    .map_err(|e| KeysError(format!("TLS: {e}")))?;
                Ok(Keys::Url(Box::new(UrlKeys {
                    uri,
                    cfg: cfg.clone(),
                    refresh: *refresh,
                    client: UpstreamConnector::new(settings.clone(), Some(Arc::new(origin)))
                        .client_for(),
                    state: tokio::sync::Mutex::new(Fetched::default()),
                })))
            }
        }
    }

    /// The key for `kid`: from the current set, or (a URL whose set lacks
    /// it) from a fresh fetch, at most once per `REFETCH_AT_MOST_EVERY`.
    pub async fn key(&self, kid: Option<&str>) -> Result<Option<Arc<Key>>, KeysError> {
        match self {
            Keys::File(f) => {
                let set = f.set.get("JWKS file", || read_file(&f.path, &f.cfg));
                Ok(set.find(kid))
            }
            Keys::Url(u) => u.key(kid).await,
        }
    }
}

impl UrlKeys {
    async fn key(&self, kid: Option<&str>) -> Result<Option<Arc<Key>>, KeysError> {
        let mut state = self.state.lock().await;
        let age = state.at.map(|t| t.elapsed());
        let stale = age.is_none_or(|a| a >= self.refresh);
        if !stale && let Some(k) = state.set.as_ref().and_then(|s| s.find(kid)) {
            return Ok(Some(k));
        }
        let may_fetch = stale || age.is_some_and(|a| a >= REFETCH_AT_MOST_EVERY);
        if may_fetch {
            // Counted even when it fails: a broken URL is not hammered.
            state.at = Some(Instant::now());
            match self.fetch().await {
                Ok(set) => {
                    tracing::info!(url = %self.uri, "JWKS fetched");
                    state.set = Some(Arc::new(set));
                }
                Err(e) if state.set.is_some() => {
                    tracing::warn!("{e}; keeping the keys fetched before")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(state.set.as_ref().and_then(|s| s.find(kid)))
    }

    async fn fetch(&self) -> Result<KeySet, KeysError> {
        let err = |why: String| KeysError(format!("from {}: {why}", self.uri));
        let req = http::Request::get(self.uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| err(e.to_string()))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| err(format!("unreachable: {e}")))?;
        if resp.status() != http::StatusCode::OK {
            return Err(err(format!("answered {}", resp.status())));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS)
            .collect()
            .await
            .map_err(|e| err(format!("reading: {e}")))?
            .to_bytes();
        KeySet::parse(&body, &self.cfg).map_err(err)
    }
}

fn read_file(path: &std::path::Path, cfg: &JwtConfig) -> Result<KeySet, KeysError> {
    let bytes =
        std::fs::read(path).map_err(|e| KeysError(format!("file {}: {e}", path.display())))?;
    KeySet::parse(&bytes, cfg).map_err(|e| KeysError(format!("file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    fn cfg(yaml: &str) -> JwtConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    /// A P-256 public key as a JWK.
    fn ec_jwk(kid: Option<&str>) -> serde_json::Value {
        let key = rcgen::KeyPair::generate().unwrap();
        let raw = key.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let mut jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        });
        if let Some(k) = kid {
            jwk["kid"] = k.into();
        }
        jwk
    }

    #[test]
    fn shared_secrets_and_keys_no_algorithm_fits_are_left_out() {
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            ec_jwk(Some("ec")),
        ]});
        let bytes = serde_json::to_vec(&doc).unwrap();
        let set = KeySet::parse(&bytes, &cfg("jwks_file: /x")).unwrap();
        assert!(set.find(Some("hmac")).is_none());
        let ec = set.find(Some("ec")).unwrap();
        assert_eq!(ec.validation.algorithms, vec![Algorithm::ES256]);
        assert!(set.find(Some("other")).is_none());
        // Only RSA allowed: the EC key can check nothing, and the set is empty.
        let e = KeySet::parse(&bytes, &cfg("{jwks_file: /x, algorithms: [RS256]}"))
            .err()
            .unwrap();
        assert!(e.contains("no key"), "{e}");
    }

    #[test]
    fn a_token_without_kid_uses_the_only_key_there_is() {
        let one = serde_json::to_vec(&serde_json::json!({"keys": [ec_jwk(None)]})).unwrap();
        let set = KeySet::parse(&one, &cfg("jwks_file: /x")).unwrap();
        assert!(set.find(None).is_some());
        let two =
            serde_json::to_vec(&serde_json::json!({"keys": [ec_jwk(None), ec_jwk(None)]})).unwrap();
        let set = KeySet::parse(&two, &cfg("jwks_file: /x")).unwrap();
        assert!(set.find(None).is_none(), "which one would be a guess");
    }

    #[test]
    fn issuer_and_audience_when_set_are_required() {
        let doc = serde_json::to_vec(&serde_json::json!({"keys": [ec_jwk(Some("k"))]})).unwrap();
        let c =
            cfg("{jwks_file: /x, issuers: [https://i.test], audiences: [orders], clock_skew: 5s}");
        let key = KeySet::parse(&doc, &c).unwrap().find(Some("k")).unwrap();
        let req = &key.validation.required_spec_claims;
        assert!(req.contains("exp") && req.contains("iss") && req.contains("aud"));
        assert_eq!(key.validation.leeway, 5);
        let open = KeySet::parse(&doc, &cfg("jwks_file: /x"))
            .unwrap()
            .find(Some("k"))
            .unwrap();
        assert!(!open.validation.validate_aud);
    }
}
