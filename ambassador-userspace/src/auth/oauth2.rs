//! OAuth2 client credentials (RFC 6749 §4.4): a token fetched from the token
//! endpoint with the client's id and secret (HTTP Basic, §2.3.1), cached, and
//! refreshed before it expires. However many requests wait, one fetch is in
//! flight. The client secret is read from a file (re-read when it rotates) and
//! never logged.

use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;

use super::error::AuthError;
use crate::{
    config::service::{OAuth2Config, TlsConfig},
    files::FromFiles,
    net::Settings,
    tls::TlsOrigin,
    upstream::UpstreamConnector,
};

/// Refresh when this share of the lifetime has passed (and at least this
/// long before expiry), so requests never carry a token about to lapse.
const REFRESH_AT: f64 = 0.8;
const REFRESH_MARGIN: Duration = Duration::from_secs(30);
/// Token responses are small; a larger one is refused, not buffered.
const MAX_RESPONSE: usize = 64 * 1024;
/// When the endpoint gives no `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

struct Token {
    value: HeaderValue,
    refresh_at: Instant,
    expires_at: Instant,
}

pub struct OAuth2Source {
    header: String,
    cfg: OAuth2Config,
    prefix: Option<String>,
    secret: FromFiles<String>,
    client: Client<UpstreamConnector, Full<Bytes>>,
    token: tokio::sync::Mutex<Option<Token>>,
}

impl OAuth2Source {
    pub fn new(
        header: &str,
        cfg: &OAuth2Config,
        prefix: &str,
        settings: &Settings,
    ) -> Result<OAuth2Source, AuthError> {
        let err = |reason: String| AuthError::OAuth2 {
            header: header.into(),
            reason,
        };
        let uri: http::Uri = cfg
            .token_url
            .parse()
            .map_err(|_| err("token_url is not a URL".into()))?;
        let tls = if uri.scheme_str() == Some("https") {
            let host = uri
                .host()
                .ok_or_else(|| err("token_url has no host".into()))?;
            let tls_cfg = TlsConfig {
                server_name: Some(host.to_string()),
                ca_file: None,
                client_cert: None,
                client_key: None,
                min_version: Default::default(),
                alpn: vec!["http/1.1".into()],
                insecure_skip_verify: false,
            };
            Some(std::sync::Arc::new(
                TlsOrigin::new(header, &tls_cfg, None).map_err(|e| err(e.to_string()))?,
            ))
        } else {
            None
        };
        let secret = read_secret(header, &cfg.client_secret_file)?;
        Ok(OAuth2Source {
            header: header.into(),
            cfg: cfg.clone(),
            prefix: (!prefix.is_empty()).then(|| prefix.to_string()),
            secret: FromFiles::new([cfg.client_secret_file.clone()], secret),
            client: UpstreamConnector::new(settings.clone(), tls).client_for(),
            token: tokio::sync::Mutex::new(None),
        })
    }

    pub async fn value(&self) -> Result<HeaderValue, AuthError> {
        // Held across the fetch: whoever comes next waits for its result.
        let mut slot = self.token.lock().await;
        let now = Instant::now();
        if let Some(t) = slot.as_ref()
            && now < t.refresh_at
        {
            return Ok(t.value.clone());
        }
        match self.fetch().await {
            Ok(t) => {
                let v = t.value.clone();
                *slot = Some(t);
                Ok(v)
            }
            // The old token still works for a while: use it, try again later.
            Err(e) => match slot.as_ref() {
                Some(t) if now < t.expires_at => {
                    tracing::warn!("{e}; using the current token until it expires");
                    Ok(t.value.clone())
                }
                _ => Err(e),
            },
        }
    }

    async fn fetch(&self) -> Result<Token, AuthError> {
        let err = |reason: String| AuthError::OAuth2 {
            header: self.header.clone(),
            reason,
        };
        let basic = {
            let secret = self.secret.get("client secret file", || {
                read_secret(&self.header, &self.cfg.client_secret_file)
            });
            let pair = format!("{}:{}", form(&self.cfg.client_id), form(&secret));
            base64::engine::general_purpose::STANDARD.encode(pair)
        };
        let mut auth = HeaderValue::from_str(&format!("Basic {basic}"))
            .map_err(|_| err("client credentials are not a valid header".into()))?;
        auth.set_sensitive(true);
        let mut body = String::from("grant_type=client_credentials");
        if !self.cfg.scopes.is_empty() {
            body.push_str("&scope=");
            body.push_str(&form(&self.cfg.scopes.join(" ")));
        }
        let req = Request::builder()
            .method(Method::POST)
            .uri(&self.cfg.token_url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .header(header::AUTHORIZATION, auth)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| err(format!("bad token request: {e}")))?;
        let started = Instant::now();
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| err(format!("token endpoint unreachable: {e}")))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| err(format!("reading the token response: {e}")))?
            .to_bytes();
        if status != StatusCode::OK {
            // The body may say why (invalid_client...); it holds no secret of ours.
            let why = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or_default();
            return Err(err(format!("token endpoint answered {status} {why}")));
        }
        let parsed: TokenResponse = serde_json::from_slice(&bytes)
            .map_err(|_| err("token response is not the expected JSON".into()))?;
        let (lifetime, refresh_in) = lifetimes(parsed.expires_in);
        let prefix = match &self.prefix {
            Some(p) => p.clone(),
            None => match parsed.token_type.as_deref() {
                Some(t) if t.eq_ignore_ascii_case("bearer") || t.is_empty() => "Bearer ".into(),
                Some(t) => format!("{t} "),
                None => "Bearer ".into(),
            },
        };
        let mut value = HeaderValue::from_str(&format!("{prefix}{}", parsed.access_token))
            .map_err(|_| err("access token is not a valid header value".into()))?;
        value.set_sensitive(true);
        tracing::info!(header = %self.header, lifetime = ?lifetime, "fetched an OAuth2 token");
        Ok(Token {
            value,
            refresh_at: started + refresh_in,
            expires_at: started + lifetime,
        })
    }
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: Option<String>,
    expires_in: Option<u64>,
}

fn read_secret(header: &str, path: &std::path::Path) -> Result<String, AuthError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|source| AuthError::File {
            header: header.into(),
            path: path.to_path_buf(),
            source,
        })
}

/// application/x-www-form-urlencoded, as RFC 6749 §2.3.1 asks for id and secret.
fn form(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// How long a token lives and when to fetch the next, from the token
/// endpoint's `expires_in` (bounded: it is added to the clock).
fn lifetimes(expires_in: Option<u64>) -> (Duration, Duration) {
    let lifetime = expires_in
        .map(|s| Duration::from_secs(s).min(crate::config::MAX_DURATION))
        .unwrap_or(DEFAULT_LIFETIME);
    let refresh_in = lifetime.mul_f64(REFRESH_AT).min(
        lifetime
            .saturating_sub(REFRESH_MARGIN)
            .max(lifetime.mul_f64(0.5)),
    );
    (lifetime, refresh_in)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding() {
        assert_eq!(form("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
        assert_eq!(form("plain-ID_1.x"), "plain-ID_1.x");
    }

    #[test]
    fn any_expires_in_from_the_network_fits_the_clock() {
        let now = Instant::now();
        for expires_in in [None, Some(0), Some(60), Some(u64::MAX)] {
            let (lifetime, refresh) = lifetimes(expires_in);
            assert!(refresh <= lifetime);
            // Panicked with "overflow when adding duration to instant".
            let _ = (now + lifetime, now + refresh);
        }
        assert_eq!(
            lifetimes(Some(600)),
            (Duration::from_secs(600), Duration::from_secs(480))
        );
    }
}
