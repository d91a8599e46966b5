//! What an app connection speaks, from its first bytes (peeked, never
//! consumed): HTTP/1.x, HTTP/2 prior knowledge, a TLS ClientHello (and its
//! SNI), or something else. Bounded in time, so a server-speaks-first protocol
//! (the app waits for a greeting) is only delayed by the timeout, once.

use std::time::Duration;

use tokio::net::TcpStream;

/// How long to wait for an app's first bytes before calling it opaque.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Enough for a ClientHello with post-quantum key shares.
const PEEK_MAX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    Http,
    /// TLS from the app itself, with the server name it asked for.
    Tls {
        sni: Option<String>,
    },
    Opaque,
}

const METHODS: [&[u8]; 10] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
    b"PRI * HTTP/2",
];

/// Classifies what is known so far; `None` means "need more bytes".
pub fn classify(seen: &[u8]) -> Option<Detected> {
    if seen.is_empty() {
        return None;
    }
    if seen[0] == 0x16 {
        return match client_hello_sni(seen) {
            Parse::Done(sni) => Some(Detected::Tls { sni }),
            Parse::Incomplete if seen.len() < PEEK_MAX => None,
            // Too long to parse in the peek window, or not a ClientHello.
            Parse::Incomplete | Parse::Invalid => Some(Detected::Tls { sni: None }),
        };
    }
    let mut undecided = false;
    for m in METHODS {
        let k = m.len().min(seen.len());
        if seen[..k] == m[..k] {
            if seen.len() >= m.len() {
                return Some(Detected::Http);
            }
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(Detected::Opaque)
    }
}

/// Peeks until the bytes say what they are, or the timeout says "opaque".
pub async fn detect(app: &TcpStream) -> Detected {
    let mut buf = vec![0u8; PEEK_MAX];
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let mut last = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, app.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return Detected::Opaque,
        };
        if n == 0 {
            return Detected::Opaque;
        }
        if let Some(d) = classify(&buf[..n]) {
            return d;
        }
        if n == last {
            // peek returns at once while data is queued: wait for more.
            if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(2)))
                .await
                .is_err()
            {
                return Detected::Opaque;
            }
        }
        last = n;
    }
}

enum Parse {
    Done(Option<String>),
    Incomplete,
    Invalid,
}

/// A bounds-checked reader over the peeked bytes.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|s| s[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|s| (s[0] as usize) << 8 | s[1] as usize)
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|s| (s[0] as usize) << 16 | (s[1] as usize) << 8 | s[2] as usize)
    }
}

/// The SNI of a ClientHello in the first TLS record (RFC 8446 §4.1.2, RFC 6066
/// §3). Missing bytes are `Incomplete`; anything malformed is `Invalid`.
fn client_hello_sni(b: &[u8]) -> Parse {
    let mut r = Reader { b, at: 0 };
    let Some(header) = r.take(5) else {
        return Parse::Incomplete;
    };
    if header[0] != 0x16 || header[1] != 0x03 {
        return Parse::Invalid;
    }
    let record_len = (header[3] as usize) << 8 | header[4] as usize;
    let Some(record) = r.take(record_len) else {
        return Parse::Incomplete;
    };
    let mut h = Reader { b: record, at: 0 };
    let parsed = (|| -> Option<Option<String>> {
        if h.u8()? != 1 {
            return None; // not a ClientHello
        }
        let _len = h.u24()?;
        h.take(2 + 32)?; // version, random
        let sid = h.u8()?;
        h.take(sid)?;
        let suites = h.u16()?;
        h.take(suites)?;
        let comp = h.u8()?;
        h.take(comp)?;
        if h.at == h.b.len() {
            return Some(None); // no extensions
        }
        let ext_len = h.u16()?;
        let mut e = Reader {
            b: h.take(ext_len)?,
            at: 0,
        };
        while e.at < e.b.len() {
            let kind = e.u16()?;
            let len = e.u16()?;
            let body = e.take(len)?;
            if kind == 0 {
                let mut s = Reader { b: body, at: 0 };
                let list = s.u16()?;
                let mut l = Reader {
                    b: s.take(list)?,
                    at: 0,
                };
                while l.at < l.b.len() {
                    let name_type = l.u8()?;
                    let n = l.u16()?;
                    let name = l.take(n)?;
                    if name_type == 0 {
                        let name = std::str::from_utf8(name).ok()?;
                        return Some(Some(name.to_ascii_lowercase()));
                    }
                }
            }
        }
        Some(None)
    })();
    match parsed {
        Some(sni) => Parse::Done(sni),
        None => Parse::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello, made by rustls, for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        use std::sync::Arc;
        let roots = rustls::RootCertStore::empty();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), name.to_string().try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn finds_the_sni_of_a_real_client_hello() {
        let hello = client_hello("Api.Example.test");
        assert_eq!(
            classify(&hello),
            Some(Detected::Tls {
                sni: Some("api.example.test".into())
            })
        );
        // Cut anywhere: asks for more, never panics.
        for cut in 1..hello.len() {
            assert_eq!(classify(&hello[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn http_and_opaque() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Some(Detected::Http));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            Some(Detected::Opaque)
        );
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Detected::Opaque));
    }

    #[test]
    fn garbage_that_looks_like_tls_is_not_a_panic() {
        let mut b = vec![0x16, 0x03, 0x01, 0x00, 0x40];
        b.extend(std::iter::repeat_n(0xff, 0x40));
        assert_eq!(classify(&b), Some(Detected::Tls { sni: None }));
        let b = [0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3];
        assert_eq!(classify(&b), None);
    }
}
