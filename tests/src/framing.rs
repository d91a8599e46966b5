//! HTTP/1 framing tricks a hostile client tries (CL/TE conflicts, odd
//! chunking, malformed heads, smuggled second requests), each with the most
//! requests a server behind the proxy may see from it: the standing cases
//! for both directions.

/// One framing case: the bytes the app sends, and how many requests the
/// upstream may see at most. What must hold whatever the case: the upstream
/// sees no request the app did not get an answer of its own for (a request
/// hidden in another's body would be one), and each request arrives with one
/// framing, the one the proxy parsed.
pub struct Framing {
    pub what: &'static str,
    pub bytes: String,
    pub max_upstream: usize,
}

pub fn framing_cases() -> Vec<Framing> {
    let s = "GET /smuggled HTTP/1.1\r\nHost: api\r\n\r\n";
    // After a `post`, the trailing GET is a second request when the proxy
    // takes the first as valid: at most two then.
    let case = |what, bytes: String, max_upstream| Framing {
        what,
        bytes,
        max_upstream,
    };
    let post = |headers: &str, body: &str| {
        format!("POST /a HTTP/1.1\r\nHost: api\r\n{headers}\r\n{body}{s}")
    };
    let long = "x".repeat(70_000);
    let many: String = (0..150).map(|i| format!("x-h{i}: 1\r\n")).collect();
    vec![
        case(
            "CL and TE",
            post(
                "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
            2,
        ),
        case(
            "TE and CL",
            post(
                "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                "0\r\n\r\n",
            ),
            2,
        ),
        case(
            "two different CLs",
            post("Content-Length: 0\r\nContent-Length: 44\r\n", ""),
            2,
        ),
        case(
            "two equal CLs",
            post("Content-Length: 0\r\nContent-Length: 0\r\n", ""),
            2,
        ),
        case("a CL list", post("Content-Length: 0, 44\r\n", ""), 2),
        case("a CL with a sign", post("Content-Length: +0\r\n", ""), 2),
        case("a negative CL", post("Content-Length: -1\r\n", ""), 2),
        case("a hex CL", post("Content-Length: 0x0\r\n", ""), 2),
        case(
            "a CL past u64",
            post("Content-Length: 99999999999999999999\r\n", ""),
            2,
        ),
        case(
            "space before the colon",
            post("Transfer-Encoding : chunked\r\n", "0\r\n\r\n"),
            2,
        ),
        case(
            "chunked not last",
            post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"),
            2,
        ),
        case(
            "an unknown coding",
            post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"),
            2,
        ),
        case(
            "a vertical tab",
            post("Transfer-Encoding: chunked\x0b\r\n", "0\r\n\r\n"),
            2,
        ),
        case(
            "two TE fields",
            post(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
            2,
        ),
        case(
            "TE in HTTP/1.0",
            format!(
                "POST /a HTTP/1.0\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{s}"
            ),
            2,
        ),
        case(
            "a chunk size past u64",
            post("Transfer-Encoding: chunked\r\n", "fffffffffffffffffff\r\n"),
            2,
        ),
        case(
            "a chunk size with 0x",
            post("Transfer-Encoding: chunked\r\n", "0x0\r\n\r\n"),
            2,
        ),
        case(
            "a chunk with a bad extension",
            post("Transfer-Encoding: chunked\r\n", "0;\x00\r\n\r\n"),
            2,
        ),
        case(
            "a chunk longer than said",
            post("Transfer-Encoding: chunked\r\n", "2\r\nabcdef\r\n0\r\n\r\n"),
            2,
        ),
        case(
            "a body shorter than its CL",
            "POST /a HTTP/1.1\r\nHost: api\r\nContent-Length: 400\r\n\r\nshort".into(),
            1,
        ),
        case("a folded header", post("X-A: 1\r\n  folded\r\n", ""), 2),
        case("a space in a header name", post("X A: 1\r\n", ""), 2),
        case("a NUL in a value", post("X-A: a\x00b\r\n", ""), 2),
        case("a bare CR", "GET /a HTTP/1.1\rHost: api\r\n\r\n".into(), 1),
        case("bare LFs", format!("GET /a HTTP/1.1\nHost: api\n\n{s}"), 2),
        case("HTTP/0.9", "GET /smuggled\r\n\r\n".into(), 0),
        case(
            "a bad version",
            "GET /smuggled HTTP/9.9\r\nHost: api\r\n\r\n".into(),
            0,
        ),
        case(
            "a space in the target",
            "GET /a b HTTP/1.1\r\nHost: api\r\n\r\n".into(),
            1,
        ),
        case(
            "tabs as separators",
            "GET\t/smuggled\tHTTP/1.1\r\nHost: api\r\n\r\n".into(),
            0,
        ),
        case(
            "a 70 KB header",
            format!("GET /a HTTP/1.1\r\nHost: api\r\nX-Big: {long}\r\n\r\n"),
            0,
        ),
        case(
            "150 headers",
            format!("GET /a HTTP/1.1\r\nHost: api\r\n{many}\r\n"),
            0,
        ),
        case(
            "a 70 KB target",
            format!("GET /{long} HTTP/1.1\r\nHost: api\r\n\r\n"),
            0,
        ),
        case(
            "two Host fields",
            "GET /smuggled HTTP/1.1\r\nHost: api\r\nHost: other\r\n\r\n".into(),
            0,
        ),
        case(
            "an absolute target unlike Host",
            "GET http://other/smuggled HTTP/1.1\r\nHost: api\r\n\r\n".into(),
            0,
        ),
        case(
            "userinfo in Host",
            "GET /smuggled HTTP/1.1\r\nHost: evil@api\r\n\r\n".into(),
            0,
        ),
        case(
            "CONNECT",
            "CONNECT api:443 HTTP/1.1\r\nHost: api:443\r\n\r\n".into(),
            0,
        ),
        case(
            "an h2c upgrade",
            "GET /a HTTP/1.1\r\nHost: api\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
                .into(),
            1,
        ),
        case(
            "pipelined, legitimately",
            "GET /one HTTP/1.1\r\nHost: api\r\n\r\nGET /two HTTP/1.1\r\nHost: api\r\n\r\n".into(),
            2,
        ),
    ]
}
