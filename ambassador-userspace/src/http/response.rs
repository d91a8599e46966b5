//! What goes back to the app: an upstream's response body, streamed under
//! the request timeout and holding the request's permits to its end; the
//! ambassador's own answers, with their reason; and the relay an upgrade
//! turns a connection into.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{
    HeaderValue, Response, StatusCode,
    header::{self, HeaderName},
};
use http_body_util::{Either, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use super::finish::Finish;
use crate::{
    cache::fill::Fill,
    endpoint::Picked,
    tls::TlsOrigin,
    transcode::stream::JsonStream,
    upstream::{ConnectError, Lease, RequestError},
};

pub type Body = Either<ResponseBody, Full<Bytes>>;

/// An upstream response body on its way to the app: streamed frame by frame,
/// cut when the service's request timeout passes, and holding the request's
/// circuit-breaker permit until it ends.
pub struct ResponseBody {
    inner: Incoming,
    deadline: Option<(std::pin::Pin<Box<tokio::time::Sleep>>, std::time::Duration)>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The endpoint stays "outstanding" until the response ends.
    _endpoint: Option<Picked>,
    /// Metrics and the access-log line, done when the body ends or is dropped.
    pub(super) finish: Option<Finish>,
    sent: u64,
    /// The HTTP/1.1 pool's connection: back to the pool once the body has
    /// ended, closed if the body is dropped before.
    pub(super) lease: Option<Lease>,
    /// The response cache keeps the body as it goes by.
    pub(super) fill: Option<Fill>,
    /// A server-streaming gRPC answer made into JSON message by message.
    pub(super) json: Option<JsonStream>,
    ended: bool,
}

impl ResponseBody {
    pub(super) fn new(
        inner: Incoming,
        deadline: Option<(std::pin::Pin<Box<tokio::time::Sleep>>, std::time::Duration)>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
        endpoint: Option<Picked>,
    ) -> ResponseBody {
        ResponseBody {
            // An empty body may never be polled: it has ended already.
            ended: inner.is_end_stream(),
            inner,
            deadline,
            _permit: permit,
            _endpoint: endpoint,
            finish: None,
            sent: 0,
            lease: None,
            fill: None,
            json: None,
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            f.done(self.sent);
        }
        if let Some(l) = self.lease.take()
            && self.ended
        {
            l.release();
        }
    }
}

/// The request timeout fired while the response body was streaming.
#[derive(Debug, thiserror::Error)]
#[error("request timeout ({0:?}) fired during the response body")]
pub struct BodyTimeout(std::time::Duration);

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some((sleep, t)) = &mut this.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            warn!("request timeout ({t:?}) fired during the response body: cutting it");
            if let Some(f) = &this.finish {
                f.who.metrics().timeouts.inc();
            }
            return std::task::Poll::Ready(Some(Err(Box::new(BodyTimeout(*t)))));
        }
        let r = this.next_frame(cx);
        match &r {
            std::task::Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.sent += d.len() as u64;
                    if this.fill.as_mut().is_some_and(|fill| !fill.data(d)) {
                        this.fill = None;
                    }
                } else if let Some(t) = f.trailers_ref() {
                    // Trailers are not stored: nor is what they end.
                    this.fill = None;
                    if let (Some(fin), Some(code)) =
                        (&mut this.finish, super::headers::grpc_status(t))
                    {
                        fin.exchange.grpc_status = Some(code);
                    }
                }
                this.ended = this.inner.is_end_stream();
            }
            std::task::Poll::Ready(None) => this.ended = true,
            // An error: what came is not the whole body.
            std::task::Poll::Ready(Some(Err(_))) => this.fill = None,
            std::task::Poll::Pending => {}
        }
        if this.ended
            && let Some(fill) = this.fill.take()
        {
            fill.end();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.json {
            Some(j) => j.closed(),
            None => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match &self.json {
            Some(_) => hyper::body::SizeHint::default(),
            None => self.inner.size_hint(),
        }
    }
}

type Polled = std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl ResponseBody {
    /// The next frame for the app: the upstream's, or (a streamed gRPC
    /// answer being transcoded) the JSON its messages make; the gRPC status
    /// of its trailers is kept for the series and the log.
    fn next_frame(&mut self, cx: &mut std::task::Context<'_>) -> Polled {
        use hyper::body::Frame;
        use std::task::Poll;
        let Some(json) = self.json.as_mut() else {
            return std::pin::Pin::new(&mut self.inner)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError);
        };
        if let Some(b) = json.take_ready() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        loop {
            let out = match std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => json.data(&d),
                    Err(f) => {
                        let t = f.into_trailers().ok();
                        if let (Some(fin), Some(code)) = (
                            &mut self.finish,
                            t.as_ref().and_then(super::headers::grpc_status),
                        ) {
                            fin.exchange.grpc_status = Some(code);
                        }
                        json.end(t.as_ref())
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(Box::new(e)))),
                None => json.end(None),
            };
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            if json.closed() {
                return Poll::Ready(None);
            }
        }
    }
}

/// The header that tells the app why the ambassador answered itself.
pub const ERROR_HEADER: &str = "x-ambassador-error";

/// The ambassador's own answer to a request it will not send: a status and
/// its reason, made into a response where the request's life ends.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub reason: String,
}

impl Refused {
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Refused {
        Refused {
            status,
            reason: reason.into(),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        error_response(self.status, &self.reason)
    }
}

/// A response the ambassador makes itself, with the reason in a header and
/// the body (whatever the streamed side `L` of its body type is).
pub fn error_response<L>(status: StatusCode, reason: &str) -> Response<Either<L, Full<Bytes>>> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "ambassador: {reason}\n"
    )))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    set_reason(h, reason);
    resp
}

/// The reason in `x-ambassador-error` (header values must be visible
/// ASCII: the reason is kept readable anyway).
pub(super) fn set_reason(h: &mut http::HeaderMap, reason: &str) {
    let clean: String = reason
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&clean) {
        h.insert(HeaderName::from_static(ERROR_HEADER), v);
    }
}

/// The app's answer when no response came: 503 for our limits, 504 for
/// timeouts, 502 otherwise, with the most telling reason.
pub(super) fn exchange_failed(
    e: &RequestError,
    tls: Option<&TlsOrigin>,
    name: &str,
    dst: SocketAddr,
) -> Response<Body> {
    let (status, reason) = match e.connect_error() {
        Some(c @ ConnectError::Limit(_)) => (StatusCode::SERVICE_UNAVAILABLE, c.to_string()),
        Some(c) if c.is_timeout() => (StatusCode::GATEWAY_TIMEOUT, c.to_string()),
        Some(c) => (StatusCode::BAD_GATEWAY, c.to_string()),
        None => {
            let missing_cert = tls.is_some_and(TlsOrigin::client_cert_missing);
            let why = if missing_cert {
                "the upstream requires a client certificate and none is configured \
                 (upstream.tls.client_cert)"
                    .to_string()
            } else {
                // An alert after the handshake explains a "canceled" best.
                e.conn_info()
                    .and_then(|i| i.last_tls_error.get())
                    .unwrap_or_else(|| describe(e))
            };
            (
                StatusCode::BAD_GATEWAY,
                format!("upstream request failed: {why}"),
            )
        }
    };
    warn!(service = name, %dst, "{reason}");
    error_response(status, &reason)
}

/// The most telling cause of a failed exchange: a TLS alert the upstream sent
/// after the handshake (TLS 1.3 rejects a client certificate then), an I/O
/// error, HTTP/2's own (a reset or GOAWAY and its code), or else hyper's
/// words with their causes.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut io = None;
    let mut chain = String::new();
    while let Some(c) = cause {
        if let Some(ioe) = c.downcast_ref::<std::io::Error>() {
            if ioe
                .get_ref()
                .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
            {
                return crate::tls::reason(ioe);
            }
            io.get_or_insert_with(|| ioe.to_string());
        }
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return format!("HTTP/2: {h2}");
        }
        if !chain.is_empty() {
            chain.push_str(": ");
        }
        chain.push_str(&c.to_string());
        cause = c.source();
    }
    io.unwrap_or(chain)
}

/// Relays an upgraded connection's bytes both ways until either side ends.
pub(crate) async fn splice_upgraded(
    app: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    service: String,
) {
    match tokio::try_join!(app, upstream) {
        Ok((a, u)) => {
            let (mut a, mut u) = (TokioIo::new(a), TokioIo::new(u));
            let r = tokio::io::copy_bidirectional(&mut a, &mut u).await;
            debug!(%service, result = ?r.map_err(|e| e.kind()), "upgraded connection closed");
        }
        Err(e) => warn!(%service, error = %e, "protocol upgrade failed"),
    }
}
