//! Upstream HTTP connections: TCP (excluded from interception), optional TLS
//! origination with ALPN; pooled by the HTTP/1.1 pool where the protocol is
//! HTTP/1.1, by hyper-util's client where ALPN picks HTTP/2 (and for h2c).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, Uri, Version, uri::Authority};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use super::pool::Lease;
use super::pool::{H1Pool, PoolError, Sent};
use crate::{
    endpoint::{Endpoint, EndpointError, EndpointSet, resolve},
    proxy::{ProxyError, Settings, connect_upstream},
    tls::{self, TlsOrigin},
};

/// A request body toward an upstream: the app's, streamed, or a copy kept
/// for a replay.
pub type ReqBody = http_body_util::Either<AppBody, http_body_util::Full<bytes::Bytes>>;

/// The upstream client of one pool: the HTTP/1.1 pool of this module's
/// sibling where the wire protocol is HTTP/1.1, hyper-util's pooled client
/// where ALPN picks HTTP/2, and for h2c.
pub struct HttpClient {
    legacy: Client<UpstreamConnector, ReqBody>,
    h1: Option<H1Route>,
}

/// Which requests the HTTP/1.1 pool takes.
enum H1Route {
    /// All: nothing can pick HTTP/2 (plain, or ALPN without h2).
    Always(Arc<H1Pool>),
    /// ALPN offers h2: those to an authority whose connection picked
    /// HTTP/1.1 (a response over hyper-util's client tells; `true`). A new
    /// pool connection that picks HTTP/2 (the upstream changed) sends its
    /// request back to hyper-util's client, and the authority stays there
    /// (`false`): that client may still hold an HTTP/1.1 connection whose
    /// responses would teach the pool again, and each new pool connection
    /// would be one wasted handshake.
    Learned {
        pool: Arc<H1Pool>,
        http1: Mutex<HashMap<Authority, bool>>,
    },
}

/// Past this many authorities learned (TLS to many original destinations),
/// the set starts again.
const MAX_LEARNED: usize = 1024;

/// A response, what is known of the connection it came on, and (from the
/// HTTP/1.1 pool) the lease to give back once its body has ended.
pub struct Answer {
    pub response: Response<Incoming>,
    pub info: Option<ConnInfo>,
    pub lease: Option<Lease>,
}

/// Why an upstream request got no response.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Pooled(#[from] hyper_util::client::legacy::Error),
    #[error(transparent)]
    H1(#[from] PoolError),
}

impl RequestError {
    /// The connection's details, when the request got as far as one.
    pub fn conn_info(&self) -> Option<ConnInfo> {
        match self {
            RequestError::Pooled(e) => {
                let info = e.connect_info()?;
                let mut ext = http::Extensions::new();
                info.get_extras(&mut ext);
                ext.get::<ConnInfo>().cloned()
            }
            RequestError::H1(e) => e.conn_info().cloned(),
        }
    }

    /// No connection could be had (every endpoint was tried).
    pub fn connect_error(&self) -> Option<&ConnectError> {
        match self {
            RequestError::Pooled(e) => {
                std::error::Error::source(e).and_then(|s| s.downcast_ref::<ConnectError>())
            }
            RequestError::H1(PoolError::Connect(c)) => Some(c),
            RequestError::H1(_) => None,
        }
    }
}

impl HttpClient {
    pub async fn request(&self, mut req: Request<ReqBody>) -> Result<Answer, RequestError> {
        let pool = match &self.h1 {
            Some(H1Route::Always(pool)) => Some(pool),
            Some(H1Route::Learned { pool, http1 }) => req
                .uri()
                .authority()
                .is_some_and(|a| crate::sync::lock(http1).get(a) == Some(&true))
                .then_some(pool),
            None => None,
        };
        if let Some(pool) = pool {
            match pool.request(req).await? {
                Sent::Answered(response, lease) => {
                    return Ok(Answer {
                        response,
                        info: Some(lease.info().clone()),
                        lease: Some(lease),
                    });
                }
                Sent::Http2(unsent) => {
                    if let (Some(H1Route::Learned { http1, .. }), Some(a)) =
                        (&self.h1, unsent.uri().authority())
                    {
                        crate::sync::lock(http1).insert(a.clone(), false);
                    }
                    req = unsent;
                }
            }
        }
        // Over HTTP/2 the authority goes in :authority (from the URI), and a
        // Host beside it is refused by some servers (nginx: "duplicate host
        // header"). On an HTTP/1.1 connection hyper-util puts the same Host
        // back from the URI. A Host that names something else (the app's
        // own, kept) stays.
        if req
            .headers()
            .get(http::header::HOST)
            .is_some_and(|h| names_uri_authority(h, req.uri()))
        {
            req.headers_mut().remove(http::header::HOST);
        }
        let learn = match &self.h1 {
            Some(H1Route::Learned { http1, .. }) => req.uri().authority().cloned().zip(Some(http1)),
            _ => None,
        };
        let response = self.legacy.request(req).await?;
        if let Some((authority, http1)) = learn
            && response.version() == Version::HTTP_11
        {
            let mut learned = crate::sync::lock(http1);
            if learned.len() >= MAX_LEARNED {
                learned.clear();
            }
            learned.entry(authority).or_insert(true);
        }
        let info = response.extensions().get::<ConnInfo>().cloned();
        Ok(Answer {
            response,
            info,
            lease: None,
        })
    }
}

/// Whether `host` is what hyper-util would write as Host for `uri`: its host,
/// and its port unless the scheme's default.
fn names_uri_authority(host: &http::HeaderValue, uri: &Uri) -> bool {
    let (Some(h), Ok(host)) = (uri.host(), host.to_str()) else {
        return false;
    };
    let default = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    match uri.port_u16().filter(|p| *p != default) {
        Some(p) => host
            .rsplit_once(':')
            .is_some_and(|(a, b)| a.eq_ignore_ascii_case(h) && b.parse() == Ok(p)),
        None => host.eq_ignore_ascii_case(h),
    }
}

/// The app's request body broke (bad chunked framing, a reset, a stream
/// error): the app's fault, never the upstream's.
#[derive(Debug, thiserror::Error)]
#[error("reading the request body from the app: {0}")]
pub struct AppBodyError(#[source] pub hyper::Error);

impl AppBodyError {
    /// Whether this error (or one of its causes) is the app's body failing.
    pub fn in_chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a AppBodyError> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cause {
            if let Some(b) = c.downcast_ref::<AppBodyError>() {
                return Some(b);
            }
            cause = c.source();
        }
        None
    }
}

/// The app's request body, streamed upstream and counted on the way.
pub struct AppBody {
    inner: Incoming,
    counter: prometheus_client::metrics::counter::Counter,
}

impl AppBody {
    pub fn new(inner: Incoming, counter: prometheus_client::metrics::counter::Counter) -> AppBody {
        AppBody { inner, counter }
    }
}

impl hyper::body::Body for AppBody {
    type Data = bytes::Bytes;
    type Error = AppBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, AppBodyError>>> {
        let r = Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(AppBodyError);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            self.counter.inc_by(d.len() as u64);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// What a pooled connection tells each response (and failed request) about
/// itself: one extension, so one insertion per response.
#[derive(Clone, Debug, Default)]
pub struct ConnInfo {
    /// The endpoint it goes to: its status counts toward that endpoint's health.
    pub endpoint: Option<Arc<Endpoint>>,
    /// The negotiated TLS version, for access logs.
    pub tls: Option<&'static str>,
    pub last_tls_error: LastTlsError,
    /// Connected to another endpoint than its pool's own: used once.
    pub fallback: bool,
}

/// Why no upstream connection could be had. The reason goes to the app in a
/// response header, so it is short and holds no secret.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Tcp(#[from] ProxyError),
    #[error("TLS handshake with {addr} failed: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("upstream URI {0} has no host")]
    NoHost(Uri),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("circuit breaker: max_connections ({0}) reached")]
    Limit(usize),
}

impl ConnectError {
    /// Timeouts are 504, limits 503, everything else 502.
    pub fn is_timeout(&self) -> bool {
        match self {
            ConnectError::Tcp(ProxyError::ConnectTimeout(_)) => true,
            ConnectError::Endpoint(e) => e.is_timeout(),
            _ => false,
        }
    }
}

#[derive(Clone)]
pub struct UpstreamConnector {
    settings: Settings,
    tls: Option<Arc<TlsOrigin>>,
    /// Where to connect whatever the request URI names (the URI then carries
    /// the upstream's own name, for `:authority`); none: the URI's host.
    endpoints: Option<Arc<EndpointSet>>,
    /// Upstream connections the service may have open at once.
    /// The semaphore and its size (for the message when it is exhausted).
    connection_limit: Option<(Arc<Semaphore>, usize)>,
    /// The endpoint this connector's pool is for; others are only a fallback
    /// when it cannot be reached (and such connections are not pooled).
    preferred: Option<Arc<Endpoint>>,
    /// Without endpoints: where to connect whatever the URI names (one app
    /// connection's original destination, so the URI keeps the app's own
    /// authority for `:authority`); none: the URI's host.
    dial: Option<SocketAddr>,
}

impl UpstreamConnector {
    pub fn new(settings: Settings, tls: Option<Arc<TlsOrigin>>) -> UpstreamConnector {
        UpstreamConnector {
            settings,
            tls,
            endpoints: None,
            connection_limit: None,
            preferred: None,
            dial: None,
        }
    }

    /// A connector that connects to `dst` whatever the request URI names.
    pub fn dialing(mut self, dst: SocketAddr) -> Self {
        self.dial = Some(dst);
        self
    }

    /// A connector whose pool holds connections to `ep` only.
    pub fn for_endpoint(mut self, ep: Arc<Endpoint>) -> Self {
        self.preferred = Some(ep);
        self
    }

    pub fn with_endpoints(mut self, set: Arc<EndpointSet>) -> Self {
        if !set.is_empty() {
            self.endpoints = Some(set);
        }
        self
    }

    pub fn with_connection_limit(mut self, limit: Arc<Semaphore>, max: usize) -> Self {
        self.connection_limit = Some((limit, max));
        self
    }

    /// HTTP/1.1, or HTTP/2 where TLS's ALPN picks it.
    pub fn client(self) -> HttpClient {
        let pool = H1Pool::new(self.clone());
        // Without TLS, or with ALPN offering no h2, nothing can pick HTTP/2.
        let h1 = if self.tls.as_ref().is_none_or(|t| t.http1_only()) {
            H1Route::Always(pool)
        } else {
            H1Route::Learned {
                pool,
                http1: Mutex::new(HashMap::new()),
            }
        };
        HttpClient {
            legacy: self.client_for(),
            h1: Some(h1),
        }
    }

    /// One new connection (with TLS when configured) to the endpoint the
    /// connector picks, or to the URI's host without endpoints.
    pub async fn connect(&self, uri: Uri) -> Result<TokioIo<UpstreamStream>, ConnectError> {
        use tower_service::Service as _;
        self.clone().call(uri).await
    }

    /// A client that speaks HTTP/2 without TLS (h2c, prior knowledge): for
    /// apps that speak HTTP/2 in the clear (gRPC) to plain upstreams.
    pub fn h2c_client(self) -> HttpClient {
        let legacy = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .timer(TokioTimer::new())
            .http2_only(true)
            .build(self);
        HttpClient { legacy, h1: None }
    }

    /// A pooled client for request bodies of type `B`.
    pub fn client_for<B>(self) -> Client<UpstreamConnector, B>
    where
        B: hyper::body::Body + Send + 'static + Unpin,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .timer(TokioTimer::new())
            .build(self)
    }
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let permit = match &this.connection_limit {
                Some((sem, max)) => Some(
                    sem.clone()
                        .try_acquire_owned()
                        .map_err(|_| ConnectError::Limit(*max))?,
                ),
                None => None,
            };
            let tls = this.tls.clone();
            let handshake = |tcp: TcpStream, addr: SocketAddr| {
                let tls = tls.clone();
                async move {
                    let _ = tcp.set_nodelay(true);
                    match tls {
                        None => Ok(UpstreamStream::plain(tcp)),
                        Some(origin) => match origin.connect(tcp).await {
                            Ok(s) => Ok(UpstreamStream::tls(s)),
                            Err(e) => Err(ConnectError::Tls {
                                addr,
                                reason: tls::reason(&e),
                            }),
                        },
                    }
                }
            };
            let mut stream = match &this.endpoints {
                Some(set) => {
                    let (mut stream, picked) = set
                        .connect(this.preferred.as_ref(), &this.settings, handshake)
                        .await?;
                    stream.fallback = this
                        .preferred
                        .as_ref()
                        .is_some_and(|p| !Arc::ptr_eq(p, &picked.endpoint));
                    // Requests count as outstanding (see http::forward), not
                    // pooled connections: `picked` goes now.
                    stream.endpoint = Some(picked.endpoint.clone());
                    stream
                }
                None => {
                    let addr = match this.dial {
                        Some(dst) => dst,
                        None => {
                            let host = uri
                                .host()
                                .ok_or_else(|| ConnectError::NoHost(uri.clone()))?;
                            let host = host.trim_start_matches('[').trim_end_matches(']');
                            let port =
                                uri.port_u16()
                                    .unwrap_or(if this.tls.is_some() { 443 } else { 80 });
                            resolve(host, port).await?
                        }
                    };
                    let tcp = connect_upstream(addr, &this.settings).await?;
                    handshake(tcp, addr).await?
                }
            };
            stream.permit = permit;
            Ok(TokioIo::new(stream))
        })
    }
}

/// The last TLS error an upstream connection saw after its handshake (an
/// alert, such as a client certificate refused under TLS 1.3). The request
/// that failed with it only learns "canceled"; this tells it why.
#[derive(Clone, Default, Debug)]
pub struct LastTlsError(Arc<std::sync::Mutex<Option<String>>>);

impl LastTlsError {
    pub fn get(&self) -> Option<String> {
        crate::sync::lock(&self.0).clone()
    }

    fn note(&self, e: &io::Error) {
        tracing::trace!(error = %e, kind = ?e.kind(), "upstream stream error");
        if e.get_ref()
            .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
        {
            *crate::sync::lock(&self.0) = Some(tls::reason(e));
        }
    }
}

pub struct UpstreamStream {
    inner: Inner,
    last_tls_error: LastTlsError,
    /// The endpoint it goes to.
    endpoint: Option<Arc<Endpoint>>,
    /// Connected to another endpoint than the pool's own: used once, not pooled.
    fallback: bool,
    /// Its place under the service's max_connections.
    permit: Option<OwnedSemaphorePermit>,
}

enum Inner {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamStream {
    fn plain(s: TcpStream) -> UpstreamStream {
        UpstreamStream {
            inner: Inner::Plain(s),
            last_tls_error: LastTlsError::default(),
            endpoint: None,
            fallback: false,
            permit: None,
        }
    }

    fn tls(s: TlsStream<TcpStream>) -> UpstreamStream {
        UpstreamStream {
            inner: Inner::Tls(Box::new(s)),
            last_tls_error: LastTlsError::default(),
            endpoint: None,
            fallback: false,
            permit: None,
        }
    }
}

impl UpstreamStream {
    /// TLS's ALPN picked HTTP/2.
    pub fn negotiated_h2(&self) -> bool {
        match &self.inner {
            Inner::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
            Inner::Plain(_) => false,
        }
    }

    /// What responses on this connection should know of it.
    pub fn info(&self) -> ConnInfo {
        let mut info = ConnInfo {
            endpoint: self.endpoint.clone(),
            tls: None,
            last_tls_error: self.last_tls_error.clone(),
            fallback: self.fallback,
        };
        if let Inner::Tls(s) = &self.inner {
            info.tls = s.get_ref().1.protocol_version().and_then(|v| v.as_str());
        }
        info
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        let c = Connected::new().extra(self.info());
        if self.fallback {
            c.poison();
        }
        if self.negotiated_h2() {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if let Poll::Ready(Err(e)) = &r {
            this.last_tls_error.note(e);
        }
        r
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Tls(s) => {
                let r = Pin::new(s.as_mut()).poll_write(cx, buf);
                if let Poll::Ready(Err(_)) = &r {
                    // The peer may have said why before it closed (an alert
                    // waiting in the receive buffer): read it for the reason.
                    let mut scratch = [0u8; 512];
                    let mut rb = ReadBuf::new(&mut scratch);
                    if let Poll::Ready(Err(e)) = Pin::new(s.as_mut()).poll_read(cx, &mut rb) {
                        this.last_tls_error.note(&e);
                    }
                }
                r
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Plain(s) => s.is_write_vectored(),
            Inner::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    use super::*;

    /// A TLS server on loopback for `name` that picks `h2` by ALPN while
    /// `h2` is set, else `http/1.1`; counts its connections. Returns its
    /// address and its (self-signed) certificate as PEM.
    async fn server(name: &str, h2: Arc<AtomicBool>) -> (SocketAddr, String, Arc<AtomicUsize>) {
        let cert = tls::testing::SelfSigned::new(name);
        let (with_h2, with_h1) = (cert.acceptor(&[b"h2"]), cert.acceptor(&[b"http/1.1"]));
        let (addr, accepted) = crate::http::pool::counting_server(move |tcp| {
            let acceptor = if h2.load(Ordering::SeqCst) {
                with_h2.clone()
            } else {
                with_h1.clone()
            };
            async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // As nginx: Host beside :authority is a "duplicate host
                // header"; and HTTP/1.1 needs one.
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let v = format!("{:?}", req.version());
                    let host = req.headers().contains_key(http::header::HOST);
                    let mut resp = Response::new(Full::new(Bytes::from(v)));
                    if host == (req.version() == Version::HTTP_2) {
                        *resp.status_mut() = http::StatusCode::BAD_REQUEST;
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            }
        })
        .await;
        (addr, cert.pem(), accepted)
    }

    /// A GET with the Host the app's request had, as the service leaves it.
    fn get(addr: SocketAddr) -> Request<ReqBody> {
        Request::get(format!("https://{addr}/x"))
            .header(http::header::HOST, addr.to_string())
            .body(http_body_util::Either::Right(Full::new(Bytes::new())))
            .unwrap()
    }

    /// One exchange: the protocol the server saw, and whether the HTTP/1.1
    /// pool carried it (only it hands out a lease).
    async fn exchange(client: &HttpClient, addr: SocketAddr) -> (String, bool) {
        let answer = client.request(get(addr)).await.unwrap();
        assert_eq!(answer.response.status(), http::StatusCode::OK);
        let pooled = answer.lease.is_some();
        let body = answer.response.into_body().collect().await.unwrap();
        if let Some(lease) = answer.lease {
            lease.release();
        }
        (String::from_utf8(body.to_bytes().to_vec()).unwrap(), pooled)
    }

    #[test]
    fn host_is_recognised_as_the_uri_authority() {
        for (host, uri, same) in [
            ("api.test", "https://api.test/x", true),
            ("API.test", "https://api.test:443/", true),
            ("api.test:8443", "https://api.test:8443/", true),
            ("10.0.0.1:8080", "http://10.0.0.1:8080/", true),
            ("api.test", "https://api.test:8443/", false),
            ("other.test", "https://api.test/", false),
            ("api.test:80", "https://api.test:8443/", false),
        ] {
            let h = http::HeaderValue::from_str(host).unwrap();
            let u: Uri = uri.parse().unwrap();
            assert_eq!(names_uri_authority(&h, &u), same, "{host} vs {uri}");
        }
    }

    #[tokio::test]
    async fn tls_offering_h2_learns_which_authorities_pick_http1() {
        let h2 = Arc::new(AtomicBool::new(false));
        let (addr, ca, accepted) = server("learn.test", h2.clone()).await;
        let (origin, _ca_file) = tls::testing::origin("learn.test", &ca, &["h2", "http/1.1"]);
        let origin = Arc::new(origin);
        let settings = Settings::from_config(&crate::config::ProxyConfig::default());
        let client_tls = Some(origin);
        let client = UpstreamConnector::new(settings, client_tls.clone()).client();

        // The first goes by hyper-util's client, which finds HTTP/1.1; the
        // next ones by the HTTP/1.1 pool, on one new connection.
        assert_eq!(exchange(&client, addr).await, ("HTTP/1.1".into(), false));
        for _ in 0..3 {
            assert_eq!(exchange(&client, addr).await, ("HTTP/1.1".into(), true));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // The upstream now picks h2: the pool's idle connection is still
        // HTTP/1.1 and serves; dropped unreleased, it closes, and the pool's
        // next connection picks h2: that request goes to hyper-util's client
        // unsent, and the authority stays with hyper-util's client, whose
        // first HTTP/1.1 connection is still open.
        let answer = client.request(get(addr)).await.unwrap();
        assert!(answer.lease.is_some());
        h2.store(true, Ordering::SeqCst);
        drop(answer);
        for _ in 0..3 {
            assert_eq!(exchange(&client, addr).await, ("HTTP/1.1".into(), false));
        }
        // Connections: the first two and the pool's h2 one (closed at once).
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        // A fresh client (a reload) asks hyper-util's client first: h2.
        let settings = Settings::from_config(&crate::config::ProxyConfig::default());
        let fresh = UpstreamConnector::new(settings, client_tls.clone()).client();
        for _ in 0..2 {
            assert_eq!(exchange(&fresh, addr).await, ("HTTP/2.0".into(), false));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }
}
