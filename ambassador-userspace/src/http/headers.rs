//! Headers that belong to one hop: removed on the way through, but for a
//! protocol upgrade the proxy agrees to carry.

use http::{
    HeaderMap, HeaderValue, Request, Version,
    header::{self, HeaderName},
};

/// The protocol an HTTP/1.1 request asks to switch to, if it does.
/// An upgrade to h2c is never passed on (the headers go as hop-by-hop): once
/// the upstream switched, every request on that connection would go past
/// the proxy's per-request policy (h2c is served by prior knowledge).
pub fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let proto = req.headers().get(header::UPGRADE).filter(|_| asks)?;
    let h2c = proto.to_str().map_or(true, |p| {
        p.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c"))
    });
    (!h2c).then(|| proto.clone())
}

/// Removes the headers that describe one hop, as RFC 9110 §7.6.1 says: those
/// named in `Connection`, and the standard hop-by-hop set. `TE: trailers` is
/// end-to-end in practice (gRPC needs it) and is kept.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (standard ones
    // compare without hashing) spares the removals below.
    if !h.keys().any(|k| {
        k == header::CONNECTION
            || k == header::TE
            || k == header::TRAILER
            || k == header::TRANSFER_ENCODING
            || k == header::UPGRADE
            || k == header::PROXY_AUTHENTICATE
            || k == header::PROXY_AUTHORIZATION
            || k.as_str() == "keep-alive"
            || k.as_str() == "proxy-connection"
    }) {
        return;
    }
    // The names Connection lists go too (TE has its own rule below). One
    // Connection field (nginx's `keep-alive` on every response) is taken out
    // and its names removed by &str, which allocates nothing.
    let fields = h.get_all(header::CONNECTION).iter().count();
    if fields == 1 {
        if let Some(v) = h.remove(header::CONNECTION) {
            for n in v.to_str().unwrap_or("").split(',').map(str::trim) {
                if !n.is_empty() && !n.eq_ignore_ascii_case("te") {
                    h.remove(n);
                }
            }
        }
    } else if fields > 1 {
        let listed: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in listed {
            if n != header::TE {
                h.remove(n);
            }
        }
    }
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        h.remove(n);
    }
    let trailers_only = h
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("trailers"));
    if !trailers_only {
        h.remove(header::TE);
    }
}

/// The `grpc-status` a gRPC response's head or trailers carry.
pub use crate::transcode::grpc::status as grpc_status;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_end_to_end_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("x-end") && h.contains_key(header::TE));

        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());

        // Only end-to-end headers: all kept (the one-pass shortcut).
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert("x-keep-alive-ish", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);

        // A custom header named in Connection goes even with no standard one.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");

        // Names in any case, TE listed yet kept for trailers, a token that
        // is no header name ignored; and the same over two Connection fields.
        for fields in [
            &["X-Hop, TE, bad name, "][..],
            &["X-Hop", "te,bad name"][..],
        ] {
            let mut h = HeaderMap::new();
            for f in fields {
                h.append(header::CONNECTION, HeaderValue::from_static(f));
            }
            h.insert("x-hop", HeaderValue::from_static("1"));
            h.insert(header::TE, HeaderValue::from_static("trailers"));
            h.insert("x-end", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
            left.sort_unstable();
            assert_eq!(left, ["te", "x-end"], "{fields:?}");
        }
    }
}
