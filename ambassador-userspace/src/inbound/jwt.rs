//! A bearer JWT checked against the port's keys (the jsonwebtoken crate
//! does the signature and the claims), with the connection's memo of the
//! last token it verified.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::{
    failure::Failure,
    jwks::{Key, Keys, KeysError},
};

/// The last token verified on one caller's connection. Callers send the
/// same token with every request, and checking its signature again is most
/// of a request's cost (ES256: ~100 us). The same bytes, checked by the same
/// key object (a reloaded file or a refetched URL makes new ones, so a
/// rotated-out key takes its tokens with it), only have their time claims
/// checked again: the signature, issuer and audience cannot have changed.
#[derive(Default)]
pub struct TokenMemo(std::sync::Mutex<Option<Verified>>);

struct Verified {
    token: Box<str>,
    proof: Proof,
}

/// What a token was verified with, and what it said.
#[derive(Clone)]
struct Proof {
    kid: Option<Arc<str>>,
    key: Arc<Key>,
    claims: Arc<Map<String, Value>>,
}

impl TokenMemo {
    /// What was verified for exactly this token, if anything.
    fn get(&self, token: &str) -> Option<Proof> {
        let v = crate::sync::lock(&self.0);
        v.as_ref()
            .filter(|v| *v.token == *token)
            .map(|v| v.proof.clone())
    }

    fn set(&self, v: Verified) {
        *crate::sync::lock(&self.0) = Some(v);
    }
}

pub async fn verify(
    keys: &Keys,
    token: &str,
    memo: Option<&TokenMemo>,
) -> Result<Arc<Map<String, Value>>, Failure> {
    if let Some(p) = memo.and_then(|m| m.get(token))
        && let Ok(Some(current)) = keys.key(p.kid.as_deref()).await
        && Arc::ptr_eq(&current, &p.key)
    {
        in_time(&p.claims, &p.key.validation)?;
        return Ok(p.claims);
    }
    let head = jsonwebtoken::decode_header(token).map_err(|_| Failure::Malformed)?;
    let key = keys
        .key(head.kid.as_deref())
        .await
        .map_err(|KeysError(e)| {
            tracing::warn!("{e}");
            Failure::KeysUnavailable
        })?
        .ok_or(Failure::UnknownKey)?;
    let claims = Arc::new(checked(token, &key)?);
    if let Some(m) = memo {
        m.set(Verified {
            token: token.into(),
            proof: Proof {
                kid: head.kid.map(Arc::from),
                key,
                claims: claims.clone(),
            },
        });
    }
    Ok(claims)
}

/// The whole check: signature, then the claims `validation` names.
fn checked(token: &str, key: &Key) -> Result<Map<String, Value>, Failure> {
    use jsonwebtoken::errors::ErrorKind as K;
    match jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &key.validation) {
        Ok(data) => Ok(data.claims),
        Err(e) => Err(match e.kind() {
            K::ExpiredSignature => Failure::Expired,
            K::ImmatureSignature => Failure::NotYetValid,
            K::InvalidIssuer => Failure::Issuer,
            K::InvalidAudience => Failure::Audience,
            K::MissingRequiredClaim(_) => Failure::MissingClaim,
            K::InvalidSignature => Failure::Signature,
            K::InvalidAlgorithm => Failure::Algorithm,
            _ => Failure::Malformed,
        }),
    }
}

/// A verified token's `exp` and `nbf` against the clock again, with the
/// same leeway the full check used.
fn in_time(claims: &Map<String, Value>, v: &jsonwebtoken::Validation) -> Result<(), Failure> {
    let now = jsonwebtoken::get_current_timestamp() as f64;
    let leeway = v.leeway as f64;
    let at = |c: &str| claims.get(c).and_then(Value::as_f64);
    if v.validate_exp && at("exp").is_none_or(|exp| exp < now - leeway) {
        return Err(Failure::Expired);
    }
    if v.validate_nbf && at("nbf").is_some_and(|nbf| nbf > now + leeway) {
        return Err(Failure::NotYetValid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Header, encode};

    use super::*;
    use crate::{config::authn::JwtConfig, net::Settings};

    /// An ES256 signing key and its JWKS document under `kid`.
    fn signer(kid: &str) -> (EncodingKey, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let raw = key.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": kid,
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        }]});
        let enc = EncodingKey::from_ec_der(&key.serialize_der());
        (enc, jwks.to_string())
    }

    fn token(enc: &EncodingKey, kid: &str, exp: u64) -> String {
        let mut h = Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some(kid.into());
        encode(&h, &serde_json::json!({"sub": "alice", "exp": exp}), enc).unwrap()
    }

    /// The memo answers for the same bytes under the same key object only,
    /// and never past the token's expiry; a rotated key set verifies again.
    #[tokio::test]
    async fn a_remembered_token_is_rechecked_for_time_and_dropped_with_its_key() {
        let dir = std::env::temp_dir().join(format!("amb-jwt-memo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("jwks.json");
        let (enc, jwks) = signer("k1");
        std::fs::write(&file, jwks).unwrap();
        let cfg: JwtConfig = serde_yaml_ng::from_str(&format!(
            "{{ jwks_file: {}, clock_skew: 0s }}",
            file.display()
        ))
        .unwrap();
        let settings = Settings::from_config(&crate::config::ProxyConfig::default());
        let keys = Keys::new(&cfg, &settings).unwrap();
        let memo = TokenMemo::default();
        let now = jsonwebtoken::get_current_timestamp();

        let t = token(&enc, "k1", now + 2);
        let first = verify(&keys, &t, Some(&memo)).await.unwrap();
        let again = verify(&keys, &t, Some(&memo)).await.unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "the second check was not the memo's"
        );
        // Without the memo, every check is a full one.
        let fresh = verify(&keys, &t, None).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &fresh));
        // Other bytes are another token: a tampered copy fails in full.
        // (a character inside the signature: the last one has unused bits)
        let i = t.len() - 10;
        let swap = if &t[i..=i] == "A" { "B" } else { "A" };
        let tampered = format!("{}{swap}{}", &t[..i], &t[i + 1..]);
        assert_eq!(
            verify(&keys, &tampered, Some(&memo)).await.err(),
            Some(Failure::Signature)
        );

        // Past `exp`, the memo refuses it as the full check would.
        let t = token(&enc, "k1", now + 1);
        verify(&keys, &t, Some(&memo)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        assert_eq!(
            verify(&keys, &t, Some(&memo)).await.err(),
            Some(Failure::Expired)
        );

        // The key set rotates to another key under the same kid: the
        // remembered token is checked again, and fails.
        let t = token(&enc, "k1", now + 600);
        verify(&keys, &t, Some(&memo)).await.unwrap();
        let (_, other) = signer("k1");
        let tmp = dir.join("jwks.new");
        std::fs::write(&tmp, other).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        assert_eq!(
            verify(&keys, &t, Some(&memo)).await.err(),
            Some(Failure::Signature)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
