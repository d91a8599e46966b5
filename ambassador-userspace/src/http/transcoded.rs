//! A request of a transcoding route: the app's REST call (method, path,
//! query, JSON body) made into the gRPC call its binding names, sent as a
//! request of the proxy's own (HTTP/2, the route's upstream, its
//! credentials, timeout as `grpc-timeout`, retries), and the gRPC answer
//! (head, messages, trailers) made into JSON with the mapped HTTP status.
//! Every refusal is a JSON error body too, as a REST caller expects.

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Request, Response, StatusCode, header, request::Parts, uri::Authority,
};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;

use super::{
    dest::Dest,
    finish::Exchange,
    forward,
    headers::grpc_status,
    response::{Body, ERROR_HEADER, ResponseBody, set_reason},
};
use crate::transcode::{Matched, Transcoder, answer, grpc, request, stream::JsonStream};

pub(super) async fn forward(
    req: Request<Incoming>,
    to: Dest<'_>,
    upstream: Option<&(Authority, HeaderValue)>,
    t: &Transcoder,
    exchange: &mut Exchange,
) -> Response<Body> {
    let (head, body) = req.into_parts();
    let Some(m) = t.find(&head.method, head.uri.path()) else {
        let why = format!(
            "no method of the route's gRPC services is bound to {} {}",
            head.method,
            head.uri.path()
        );
        return error(StatusCode::NOT_FOUND, 12, &why);
    };
    let json = match Limited::new(body, t.max_request_bytes as usize)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let why = format!(
                "the request body is larger than {} bytes",
                t.max_request_bytes
            );
            return error(StatusCode::PAYLOAD_TOO_LARGE, 8, &why);
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                3,
                &format!("reading the request body: {e}"),
            );
        }
    };
    exchange.bytes_in = Some(json.len() as u64);
    let msg = match request::message(&m, head.uri.query(), &json) {
        Ok(msg) => msg,
        Err(why) => return error(StatusCode::BAD_REQUEST, 3, &why),
    };
    let call = call(
        head,
        &m,
        prost::Message::encode_to_vec(&msg),
        to.request_timeout(),
    );
    let resp = forward::send_made(call, to, upstream, exchange).await;
    answered(resp, &m, t, exchange).await
}

/// The gRPC request: the app's headers (its metadata) but for those that
/// describe its body, then the call's own.
fn call(
    mut head: Parts,
    m: &Matched<'_>,
    message: Vec<u8>,
    timeout: Option<std::time::Duration>,
) -> Request<Bytes> {
    for h in [
        header::CONTENT_LENGTH,
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::ACCEPT,
        header::ACCEPT_ENCODING,
        header::TRANSFER_ENCODING,
        header::EXPECT,
    ] {
        head.headers.remove(h);
    }
    let h = &mut head.headers;
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    if let Some(t) = timeout
        && let Ok(v) = HeaderValue::from_str(&grpc::timeout_value(t))
    {
        h.insert("grpc-timeout", v);
    }
    head.method = http::Method::POST;
    head.uri = http::Uri::from(m.binding.path.clone());
    Request::from_parts(head, grpc::frame(&message))
}

/// The REST answer to a gRPC one.
async fn answered(
    resp: Response<Body>,
    m: &Matched<'_>,
    t: &Transcoder,
    exchange: &mut Exchange,
) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let body = match body {
        Either::Left(b) => b,
        // The ambassador's own answer (no connection, timeout, a limit).
        Either::Right(_) => {
            let why = parts
                .headers
                .get(ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("no answer from the upstream");
            return error(parts.status, grpc::code_for_http(parts.status), why);
        }
    };
    if parts.status != StatusCode::OK || !is_grpc(&parts.headers) {
        let why = format!(
            "the upstream answered HTTP {} to a gRPC call, not gRPC",
            parts.status
        );
        return error(StatusCode::BAD_GATEWAY, 14, &why);
    }
    // Trailers-only: the status is in the head, and there is nothing else.
    if let Some(code) = grpc_status(&parts.headers) {
        exchange.grpc_status = Some(code);
        return status_error(code, &parts.headers);
    }
    if m.binding.method.is_server_streaming() {
        return streamed(body, m, t, exchange).await;
    }
    let collected = match Limited::new(body, t.max_response_bytes as usize)
        .collect()
        .await
    {
        Ok(c) => c,
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let why = format!(
                "the gRPC answer is larger than {} bytes (transcode.max_response_bytes)",
                t.max_response_bytes
            );
            return error(StatusCode::BAD_GATEWAY, 8, &why);
        }
        Err(e) if e.is::<super::response::BodyTimeout>() => {
            return error(StatusCode::GATEWAY_TIMEOUT, 4, &e.to_string());
        }
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                14,
                &format!("the gRPC answer broke: {e}"),
            );
        }
    };
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let Some(code) = grpc_status(&trailers) else {
        return error(
            StatusCode::BAD_GATEWAY,
            13,
            "the gRPC answer ended without a grpc-status",
        );
    };
    exchange.grpc_status = Some(code);
    if code != 0 {
        return status_error(code, &trailers);
    }
    match json_answer(collected.to_bytes(), m) {
        Ok(body) => ok_json(body, false, t),
        Err(why) => error(StatusCode::BAD_GATEWAY, 13, &why),
    }
}

/// A server-streaming answer, made into JSON message by message as it
/// comes. Its first frame is read before the head goes out, so a stream
/// that fails before any message still gets its HTTP status.
async fn streamed(
    mut body: ResponseBody,
    m: &Matched<'_>,
    t: &Transcoder,
    exchange: &mut Exchange,
) -> Response<Body> {
    let b = m.binding;
    let mut json = JsonStream::new(
        b.method.output(),
        b.response_body.clone(),
        t.stream,
        t.max_response_bytes,
    );
    match body.frame().await {
        Some(Ok(f)) => match f.into_data() {
            Ok(d) => json.prime(&d),
            Err(f) => {
                let trailers = f.into_trailers().unwrap_or_default();
                exchange.grpc_status = grpc_status(&trailers);
                return match exchange.grpc_status {
                    // No message at all: an empty array (or nothing).
                    Some(0) => ok_json(json.end(Some(&trailers)).to_vec(), true, t),
                    Some(code) => status_error(code, &trailers),
                    None => error(
                        StatusCode::BAD_GATEWAY,
                        13,
                        "the gRPC answer ended without a grpc-status",
                    ),
                };
            }
        },
        Some(Err(e)) if e.is::<super::response::BodyTimeout>() => {
            return error(StatusCode::GATEWAY_TIMEOUT, 4, &e.to_string());
        }
        Some(Err(e)) => {
            return error(
                StatusCode::BAD_GATEWAY,
                14,
                &format!("the gRPC answer broke: {e}"),
            );
        }
        None => {
            return error(
                StatusCode::BAD_GATEWAY,
                13,
                "the gRPC answer ended without a grpc-status",
            );
        }
    }
    body.json = Some(json);
    let mut resp = Response::new(Either::Left(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(answer::content_type(true, t.stream)),
    );
    resp
}

/// A 200 with JSON.
fn ok_json(body: Vec<u8>, streaming: bool, t: &Transcoder) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(answer::content_type(streaming, t.stream)),
    );
    resp
}

/// A unary answer's one message as JSON.
fn json_answer(body: Bytes, m: &Matched<'_>) -> Result<Vec<u8>, String> {
    let messages = grpc::messages(body).map_err(|e| e.to_string())?;
    let [one] = <[Bytes; 1]>::try_from(messages)
        .map_err(|v| format!("a unary call answered with {} messages", v.len()))?;
    answer::json(
        &m.binding.method.output(),
        &one,
        m.binding.response_body.as_ref(),
    )
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A non-OK gRPC status as the REST caller gets it.
fn status_error(code: u16, h: &HeaderMap) -> Response<Body> {
    let message = h
        .get("grpc-message")
        .map(|v| grpc::message_text(v.as_bytes()))
        .unwrap_or_default();
    let mut resp = error(grpc::http_status(code), code, &message);
    resp.headers_mut().remove(ERROR_HEADER);
    resp
}

/// A JSON error body, with the reason in `x-ambassador-error` as every
/// answer of the ambassador's own has it.
fn error(status: StatusCode, code: u16, why: &str) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(answer::error(code, why))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    set_reason(h, why);
    resp
}
