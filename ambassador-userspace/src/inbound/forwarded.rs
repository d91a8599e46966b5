//! The caller as the app sees it: `X-Forwarded-For`, `Forwarded`
//! (RFC 7239), `X-Forwarded-Proto` and, under mutual TLS,
//! `X-Forwarded-Client-Cert` (Envoy's shape: `Hash=...;URI="...";DNS="..."`),
//! made once per connection from what the proxy saw. Copies a caller sent,
//! and the headers that would claim more of it (`X-Forwarded-Host`,
//! `-Port`, `X-Real-IP`), are removed: they would let it pose as anyone.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue, header};
use rustls::pki_types::CertificateDer;

use crate::tls::server::{San, sans};

const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// One connection's caller, ready to be written into each request.
pub struct Caller {
    forwarded: HeaderValue,
    xff: HeaderValue,
    tls: bool,
    client_cert: Option<HeaderValue>,
}

impl Caller {
    pub fn new(peer: SocketAddr, tls: bool, cert: Option<&CertificateDer<'_>>) -> Caller {
        Caller {
            forwarded: forwarded(peer, tls),
            xff: HeaderValue::from_str(&peer.ip().to_string())
                .expect("an address is a header value"),
            tls,
            client_cert: cert.and_then(xfcc),
        }
    }

    /// The caller's own claims out, the proxy's view in.
    pub fn apply(&self, h: &mut HeaderMap) {
        h.insert(header::FORWARDED, self.forwarded.clone());
        h.insert("x-forwarded-for", self.xff.clone());
        h.insert(
            "x-forwarded-proto",
            HeaderValue::from_static(if self.tls { "https" } else { "http" }),
        );
        h.remove("x-forwarded-host");
        h.remove("x-forwarded-port");
        h.remove("x-real-ip");
        match &self.client_cert {
            Some(v) => {
                h.insert(XFCC, v.clone());
            }
            None => {
                h.remove(XFCC);
            }
        }
    }
}

/// `Forwarded: for=...;proto=...` (IPv6 quoted and bracketed).
fn forwarded(peer: SocketAddr, tls: bool) -> HeaderValue {
    let proto = if tls { "https" } else { "http" };
    let v = match peer.ip() {
        std::net::IpAddr::V4(a) => format!("for={a};proto={proto}"),
        std::net::IpAddr::V6(a) => format!("for=\"[{a}]\";proto={proto}"),
    };
    HeaderValue::from_str(&v).expect("an address is a header value")
}

/// The client certificate's SHA-256 and names; names that cannot be a
/// header value are left out.
fn xfcc(cert: &CertificateDer<'_>) -> Option<HeaderValue> {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let mut v = String::from("Hash=");
    for b in digest.as_ref() {
        v.push_str(&format!("{b:02x}"));
    }
    for san in sans(cert) {
        let (key, value) = match &san {
            San::Uri(u) => ("URI", u),
            San::Dns(d) => ("DNS", d),
        };
        if value.chars().all(|c| c.is_ascii_graphic() && c != '"') {
            v.push_str(&format!(";{key}=\"{value}\""));
        }
    }
    HeaderValue::from_str(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_names_the_caller_and_the_scheme() {
        let v4 = forwarded("198.18.0.2:40000".parse().unwrap(), false);
        assert_eq!(v4, "for=198.18.0.2;proto=http");
        let v6 = forwarded("[fd00::2]:40000".parse().unwrap(), true);
        assert_eq!(v6, "for=\"[fd00::2]\";proto=https");
    }

    #[test]
    fn a_client_certificate_is_named_by_hash_and_sans_and_spoofs_go() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["orders.pod.test".into()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://cluster.local/ns/shop/sa/orders").unwrap(),
        ));
        let cert = params.self_signed(&key).unwrap();
        let caller = Caller::new("10.0.0.9:1234".parse().unwrap(), true, Some(cert.der()));
        let mut h = HeaderMap::new();
        h.insert(XFCC, HeaderValue::from_static("URI=\"spiffe://evil\""));
        h.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        caller.apply(&mut h);
        let v = h.get(XFCC).unwrap().to_str().unwrap();
        assert!(v.starts_with("Hash=") && v.len() > 5 + 64, "{v}");
        assert!(
            v.contains(";URI=\"spiffe://cluster.local/ns/shop/sa/orders\""),
            "{v}"
        );
        assert!(v.contains(";DNS=\"orders.pod.test\""), "{v}");
        assert!(h.get("x-real-ip").is_none());
        // Without a certificate the caller's copy goes and none comes.
        let plain = Caller::new("10.0.0.9:1234".parse().unwrap(), false, None);
        let mut h = HeaderMap::new();
        h.insert(XFCC, HeaderValue::from_static("URI=\"spiffe://evil\""));
        plain.apply(&mut h);
        assert!(h.get(XFCC).is_none());
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
    }
}
