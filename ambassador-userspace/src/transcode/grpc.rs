//! gRPC on the wire, as transcoding needs it: length-prefixed messages,
//! `grpc-timeout`, `grpc-message`'s %-encoding, and the standard mapping of
//! a gRPC status to the HTTP status a REST caller gets (the one
//! google.rpc.Code documents, as grpc-gateway and Envoy use it).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::StatusCode;

/// One message framed: uncompressed flag, 4-byte big-endian length, bytes.
pub fn frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(message.len() as u32);
    b.put_slice(message);
    b.freeze()
}

/// A stream of frames that does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a compressed gRPC message (the ambassador asks for none)")]
    Compressed,
    #[error("a gRPC message cut short ({0} bytes left over)")]
    Truncated(usize),
}

/// Takes the next whole message off `buf`; `None` until one is complete.
pub fn next_message(buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err(FrameError::Compressed);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Every message of a whole body.
pub fn messages(body: Bytes) -> Result<Vec<Bytes>, FrameError> {
    let mut buf = BytesMut::from(body);
    let mut out = Vec::new();
    while let Some(m) = next_message(&mut buf)? {
        out.push(m);
    }
    if !buf.is_empty() {
        return Err(FrameError::Truncated(buf.len()));
    }
    Ok(out)
}

/// The `grpc-status` a gRPC response's head or trailers carry.
pub fn status(h: &http::HeaderMap) -> Option<u16> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// `grpc-timeout` for a deadline (milliseconds; at most 8 digits).
pub fn timeout_value(t: std::time::Duration) -> String {
    let ms = t.as_millis().clamp(1, 99_999_999);
    format!("{ms}m")
}

/// `grpc-message` decoded (%-encoded UTF-8 by the spec).
pub fn message_text(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    super::template::decode(&s)
}

/// The HTTP status a REST caller gets for a gRPC status code.
pub fn http_status(code: u16) -> StatusCode {
    let s = match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    };
    StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The gRPC code for an answer of the ambassador's own (no gRPC status
/// came): what a gRPC client library would report for it.
pub fn code_for_http(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => 3,
        401 => 16,
        403 => 7,
        404 => 12,
        413 | 429 => 8,
        502 | 503 => 14,
        504 => 4,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_both_ways() {
        let mut body = BytesMut::new();
        body.extend_from_slice(&frame(b"one"));
        body.extend_from_slice(&frame(b""));
        body.extend_from_slice(&frame(b"three"));
        let all = messages(body.clone().freeze()).unwrap();
        assert_eq!(all, [&b"one"[..], b"", b"three"]);
        let cut = body.split_to(body.len() - 2).freeze();
        assert_eq!(messages(cut), Err(FrameError::Truncated(8)));
        let mut compressed = BytesMut::from(&frame(b"x")[..]);
        compressed[0] = 1;
        assert_eq!(next_message(&mut compressed), Err(FrameError::Compressed));
        let mut partial = BytesMut::from(&frame(b"abc")[..4]);
        assert_eq!(next_message(&mut partial), Ok(None));
    }

    #[test]
    fn statuses_and_headers() {
        for (code, http) in [
            (0, 200),
            (3, 400),
            (4, 504),
            (5, 404),
            (7, 403),
            (8, 429),
            (14, 503),
            (16, 401),
            (13, 500),
            (99, 500),
        ] {
            assert_eq!(http_status(code).as_u16(), http, "{code}");
        }
        assert_eq!(code_for_http(StatusCode::GATEWAY_TIMEOUT), 4);
        assert_eq!(timeout_value(std::time::Duration::from_secs(2)), "2000m");
        assert_eq!(timeout_value(std::time::Duration::ZERO), "1m");
        assert_eq!(message_text(b"no%20such%20book"), "no such book");
    }
}
