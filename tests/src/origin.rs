//! An origin whose answers the request chooses, for the response-cache
//! tests: `GET /origin/...?cc=max-age%3D60&etag=v1&vary=x-tenant&size=100`
//! answers with those headers and a body that names how many requests for
//! this path the upstream has answered before (so a test can tell a stored
//! response from a new one), and answers a conditional request matching its
//! validators with 304, as a real origin does.
//!
//! Parameters: `cc` (Cache-Control), `etag` (quoted for you), `lm`
//! (Last-Modified, an HTTP date), `vary`, `expires`, `set_cookie`,
//! `status`, `size` (body bytes, padded), `delay_ms` (before the head).

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, http::request::Parts};

/// Whether the upstream answers `parts` as the origin.
pub fn is_origin(parts: &Parts) -> bool {
    parts.uri.path().starts_with("/origin")
}

/// The origin's answer; `before` is how many requests for the same path it
/// answered already.
pub async fn respond(parts: &Parts, before: usize) -> Response<Full<Bytes>> {
    let q: Vec<(String, String)> = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), decode(v)))
        .collect();
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if let Some(ms) = get("delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let etag = get("etag").map(|t| format!("\"{t}\""));
    let asked = |h: &str| parts.headers.get(h).and_then(|v| v.to_str().ok());
    let unchanged = match (
        asked("if-none-match"),
        &etag,
        asked("if-modified-since"),
        get("lm"),
    ) {
        (Some(inm), Some(tag), _, _) => inm.split(',').any(|t| t.trim() == tag),
        (None, _, Some(ims), Some(lm)) => ims == lm,
        _ => false,
    };
    let mut body = format!("{} #{}\n", parts.uri.path(), before + 1);
    if let Some(n) = get("size").and_then(|v| v.parse::<usize>().ok()) {
        while body.len() < n {
            body.push('.');
        }
    }
    let status = if unchanged {
        304
    } else {
        get("status").and_then(|s| s.parse().ok()).unwrap_or(200)
    };
    let mut r = Response::builder().status(status);
    for (name, value) in [
        ("cache-control", get("cc").map(str::to_string)),
        ("etag", etag),
        ("last-modified", get("lm").map(str::to_string)),
        ("vary", get("vary").map(str::to_string)),
        ("expires", get("expires").map(str::to_string)),
        ("set-cookie", get("set_cookie").map(|v| format!("sid={v}"))),
    ] {
        if let Some(v) = value {
            r = r.header(name, v);
        }
    }
    let body = if unchanged { String::new() } else { body };
    r.body(Full::new(Bytes::from(body)))
        .expect("the origin's head is valid")
}

/// `%XX` and `+` decoded (the parameters are ASCII).
fn decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(c) => out.push(c),
                    Err(_) => out.extend_from_slice(&b[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
