//! Signing keys for the JWTs callers present to the inbound gateway (tests
//! and the bench): RS256 keys made by openssl (ring cannot make RSA keys),
//! ES256 by rcgen, each with its public half as a JWK and as PEM.

use std::{path::Path, process::Command};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

use crate::{stderr, stdout};

/// Base64url without padding, as JWTs and JWKs spell bytes.
pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A signing key and its public half as a JWK.
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: serde_json::Value,
    /// The public key as PEM (SPKI): for the HMAC confusion attempt, and
    /// for HAProxy's `jwt_verify` in the bench.
    pub public_pem: Vec<u8>,
}

impl SigningKey {
    /// RS256, made by openssl (ring cannot make RSA keys).
    pub fn rsa(dir: &Path, kid: &str) -> SigningKey {
        let key = dir.join(format!("{kid}.pem"));
        let ok = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .output()
            .unwrap();
        assert!(ok.status.success(), "{}", stderr(&ok));
        let modulus = stdout(
            &Command::new("openssl")
                .args(["rsa", "-noout", "-modulus", "-in"])
                .arg(&key)
                .output()
                .unwrap(),
        );
        let hex = modulus.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let public_pem = Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&key)
            .output()
            .unwrap()
            .stdout;
        let pem = std::fs::read(&key).unwrap();
        SigningKey {
            kid: kid.into(),
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_pem(&pem).unwrap(),
            jwk: serde_json::json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64(&n), "e": "AQAB"}),
            public_pem,
        }
    }

    /// ES256 (P-256).
    pub fn ec(kid: &str) -> SigningKey {
        let key = rcgen::KeyPair::generate().unwrap();
        let raw = key.public_key_raw();
        SigningKey {
            kid: kid.into(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
            jwk: serde_json::json!({
                "kty": "EC", "crv": "P-256", "kid": kid,
                "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
            }),
            public_pem: key.public_key_pem().into_bytes(),
        }
    }

    /// A token with these claims, its header naming the key's `kid`.
    pub fn token(&self, claims: &serde_json::Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        encode(&h, claims, &self.encoding).unwrap()
    }
}

/// A JWKS document holding these keys' public halves.
pub fn jwks(keys: &[&SigningKey]) -> String {
    serde_json::json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}
