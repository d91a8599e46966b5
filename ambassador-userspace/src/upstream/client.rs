//! The upstream client of one pool: the HTTP/1.1 pool where the wire
//! protocol is HTTP/1.1, hyper-util's pooled client where ALPN picks HTTP/2,
//! and for h2c; what a request got back, or why it got nothing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response, Uri, Version, uri::Authority};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioTimer},
};

use super::{
    body::{AppBodyError, ReqBody},
    connect::{ConnectError, UpstreamConnector},
    pool::{H1Pool, Lease, PoolError, Sent},
    stream::ConnInfo,
};
use crate::error::{Classified, Origin, Retry};

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

/// An HTTP/2 stream the upstream did not process: refused
/// (RST_STREAM(REFUSED_STREAM)), or above the last stream id of the GOAWAY
/// it ended the connection with (h2 fails only those with the GOAWAY's
/// error; RFC 9113 §6.8: they may be sent again). A graceful GOAWAY
/// (NO_ERROR) is the connection's normal end, any other code trouble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unprocessed {
    GoneAway,
    Refused,
}

pub fn unprocessed(e: &(dyn std::error::Error + 'static)) -> Option<Unprocessed> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            if h2.is_go_away() && h2.is_remote() {
                return Some(match h2.reason() {
                    Some(h2::Reason::NO_ERROR) => Unprocessed::GoneAway,
                    _ => Unprocessed::Refused,
                });
            }
            return (h2.reason() == Some(h2::Reason::REFUSED_STREAM))
                .then_some(Unprocessed::Refused);
        }
        cause = c.source();
    }
    None
}

impl Classified for RequestError {
    /// The app's body breaking is the app's; the rest the upstream's.
    fn origin(&self) -> Origin {
        match AppBodyError::in_chain(self) {
            Some(_) => Origin::App,
            None => Origin::Upstream,
        }
    }

    fn retry(&self) -> Retry {
        if self.connect_error().is_some() || AppBodyError::in_chain(self).is_some() {
            // A connect failure was tried on every endpoint already.
            Retry::Never
        } else if unprocessed(self).is_some() {
            Retry::Unprocessed
        } else {
            Retry::IfIdempotent
        }
    }
}

/// Whether `host` is what hyper-util would write as Host for `uri`: its host,
/// and its port unless the scheme's default.
pub fn names_uri_authority(host: &http::HeaderValue, uri: &Uri) -> bool {
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

/// The clients a connector makes.
impl UpstreamConnector {
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
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    use super::*;
    use hyper_util::rt::TokioIo;

    use crate::{net::Settings, tls};

    /// A TLS server on loopback for `name` that picks `h2` by ALPN while
    /// `h2` is set, else `http/1.1`; counts its connections. Returns its
    /// address and its (self-signed) certificate as PEM.
    async fn server(name: &str, h2: Arc<AtomicBool>) -> (SocketAddr, String, Arc<AtomicUsize>) {
        let cert = tls::testing::SelfSigned::new(name);
        let (with_h2, with_h1) = (cert.acceptor(&[b"h2"]), cert.acceptor(&[b"http/1.1"]));
        let (addr, accepted) = crate::upstream::pool::counting_server(move |tcp| {
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
