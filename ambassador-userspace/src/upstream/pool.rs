//! The HTTP/1.1 pool: connections made by the service's connector and driven
//! by `hyper::client::conn::http1`, kept per upstream authority, most recently
//! used first. For plain upstreams, TLS whose ALPN offers no h2, and
//! authorities learned to pick HTTP/1.1 (see `upstream::HttpClient`).
//!
//! hyper-util's pooled client (still used where ALPN picks HTTP/2, and for
//! h2c) costs, per request, a boxed future, two pool locks, an extensions map
//! for the connection's details, and a spawned task that waits for the
//! connection to be ready again. Here a request takes one lock to check a
//! connection out; it comes back when its response body has ended (the
//! response body holds the [`Lease`]), and its details travel beside the
//! response rather than in it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::{Request, Response, Uri, uri::Authority};
use hyper::{body::Incoming, client::conn::http1};
use tracing::{debug, trace};

use super::{
    body::ReqBody,
    connect::{ConnectError, UpstreamConnector},
    stream::ConnInfo,
};

/// Idle connections are closed after this long unused (as hyper-util's pool).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// At most this many idle connections per upstream authority.
const MAX_IDLE: usize = 64;
/// Past this many authorities (passthrough to many destinations), each new
/// idle connection first sweeps out the closed and expired ones everywhere.
const SWEEP_ABOVE: usize = 256;
/// A connection whose last response has ended is ready again as soon as its
/// task has seen the end; one that is still sending a request body is not
/// waited for longer than this.
const READY_WAIT: Duration = Duration::from_millis(100);
/// A request refused unsent by a reused connection (closed by the upstream
/// meanwhile) is tried again this many times.
const RETRY_UNSENT: usize = 3;

/// Why a request through the pool got no response.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be had; the connector says why.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The HTTP/1.1 handshake on a new connection failed.
    #[error("HTTP/1.1 handshake: {0}")]
    Handshake(#[source] hyper::Error),
    /// The exchange failed on the connection.
    #[error("{source}")]
    Exchange {
        #[source]
        source: hyper::Error,
        info: ConnInfo,
    },
}

impl PoolError {
    /// The connection's details, when one was had.
    pub fn conn_info(&self) -> Option<&ConnInfo> {
        match self {
            PoolError::Exchange { info, .. } => Some(info),
            _ => None,
        }
    }
}

struct Idle {
    tx: http1::SendRequest<ReqBody>,
    info: ConnInfo,
    since: Instant,
}

pub struct H1Pool {
    connector: UpstreamConnector,
    idle: Mutex<HashMap<Authority, Vec<Idle>>>,
}

/// What the pool did with a request.
pub enum Sent {
    /// Answered on an HTTP/1.1 connection; the lease goes with the response.
    Answered(Response<Incoming>, Lease),
    /// A new connection's ALPN picked HTTP/2, which this pool does not speak:
    /// the request comes back unsent, its URI as it was given.
    Http2(Request<ReqBody>),
}

/// A checked-out connection: back to the pool on [`Lease::release`] (once the
/// response has ended), closed if dropped otherwise.
pub struct Lease {
    pool: Arc<H1Pool>,
    key: Authority,
    tx: http1::SendRequest<ReqBody>,
    info: ConnInfo,
}

impl Lease {
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }

    pub fn release(self) {
        self.pool.put(self.key, self.tx, self.info);
    }
}

impl H1Pool {
    pub fn new(connector: UpstreamConnector) -> Arc<H1Pool> {
        Arc::new(H1Pool {
            connector,
            idle: Mutex::new(HashMap::new()),
        })
    }

    /// Sends `req` (absolute URI: its authority picks the pool and the
    /// connector's target) on an idle connection or a new one. The lease goes
    /// with the response; release it when the response body has ended.
    pub async fn request(self: &Arc<Self>, mut req: Request<ReqBody>) -> Result<Sent, PoolError> {
        let uri = req.uri().clone();
        let key = uri
            .authority()
            .cloned()
            .ok_or_else(|| ConnectError::NoHost(uri.clone()))?;
        // HTTP/1.1 to an origin server: the request line carries the path.
        *req.uri_mut() = origin_form(&uri);
        let mut tries = 0;
        loop {
            let (mut tx, info, reused) = match self.checkout(&key).await {
                Some((tx, info)) => (tx, info, true),
                None => match self.connect(&uri).await? {
                    Some((tx, info)) => (tx, info, false),
                    None => {
                        *req.uri_mut() = uri;
                        return Ok(Sent::Http2(req));
                    }
                },
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let lease = Lease {
                        pool: self.clone(),
                        key,
                        tx,
                        info,
                    };
                    return Ok(Sent::Answered(resp, lease));
                }
                Err(mut e) => match e.take_message() {
                    // Not sent: the upstream closed this idle connection.
                    Some(r) if reused && tries < RETRY_UNSENT => {
                        trace!(error = %e.error(), "pooled connection refused an unsent request: trying another");
                        tries += 1;
                        req = r;
                    }
                    _ => {
                        return Err(PoolError::Exchange {
                            source: e.into_error(),
                            info,
                        });
                    }
                },
            }
        }
    }

    /// The most recently used idle connection that is still open and ready.
    async fn checkout(&self, key: &Authority) -> Option<(http1::SendRequest<ReqBody>, ConnInfo)> {
        loop {
            let idle = {
                let mut map = crate::sync::lock(&self.idle);
                let list = map.get_mut(key)?;
                let now = Instant::now();
                let mut found = None;
                while let Some(i) = list.pop() {
                    if !i.tx.is_closed() && now.duration_since(i.since) < IDLE_TIMEOUT {
                        found = Some(i);
                        break;
                    }
                }
                if list.is_empty() {
                    map.remove(key);
                }
                found?
            };
            let Idle { mut tx, info, .. } = idle;
            if tx.is_ready() {
                return Some((tx, info));
            }
            match tokio::time::timeout(READY_WAIT, tx.ready()).await {
                Ok(Ok(())) => return Some((tx, info)),
                // Closed, or still busy: drop it and look again.
                _ => continue,
            }
        }
    }

    /// A new connection, or none if its ALPN picked HTTP/2.
    async fn connect(
        &self,
        uri: &Uri,
    ) -> Result<Option<(http1::SendRequest<ReqBody>, ConnInfo)>, PoolError> {
        let io = self.connector.connect(uri.clone()).await?;
        if io.inner().negotiated_h2() {
            debug!(%uri, "the upstream picked HTTP/2 on a new connection");
            return Ok(None);
        }
        let info = io.inner().info();
        let (tx, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(PoolError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream HTTP/1.1 connection ended with an error");
            }
        });
        Ok(Some((tx, info)))
    }

    fn put(&self, key: Authority, tx: http1::SendRequest<ReqBody>, info: ConnInfo) {
        // A connection to a fallback endpoint serves one request only.
        if tx.is_closed() || info.fallback {
            return;
        }
        let mut map = crate::sync::lock(&self.idle);
        let now = Instant::now();
        let usable = |i: &Idle| !i.tx.is_closed() && now.duration_since(i.since) < IDLE_TIMEOUT;
        if map.len() > SWEEP_ABOVE {
            map.retain(|_, list| {
                list.retain(usable);
                !list.is_empty()
            });
        }
        let list = map.entry(key).or_default();
        list.retain(usable);
        if list.len() < MAX_IDLE {
            list.push(Idle {
                tx,
                info,
                since: now,
            });
        }
    }
}

/// The URI as sent on an HTTP/1.1 request line to an origin server.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(p) if p.as_str() != "/" || uri.query().is_some() => Uri::from(p.clone()),
        _ => Uri::from_static("/"),
    }
}

/// For tests of the upstream clients: a loopback listener that counts its
/// connections and serves each with `serve` on a task of its own.
#[cfg(test)]
pub(crate) async fn counting_server<F, Fut>(
    serve: F,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(serve(tcp));
        }
    });
    (addr, accepted)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    use super::*;
    use crate::net::Settings;

    /// A plain HTTP/1.1 server on loopback that counts its connections.
    async fn server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        counting_server(|tcp| async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                    b"hello",
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        })
        .await
    }

    fn get(addr: std::net::SocketAddr) -> Request<ReqBody> {
        Request::get(format!("http://{addr}/x"))
            .body(http_body_util::Either::Right(Full::new(Bytes::new())))
            .unwrap()
    }

    fn answered(sent: Sent) -> (Response<Incoming>, Lease) {
        match sent {
            Sent::Answered(r, l) => (r, l),
            Sent::Http2(_) => panic!("a plain upstream cannot pick HTTP/2"),
        }
    }

    fn idle_count(pool: &H1Pool) -> (usize, usize) {
        let map = pool.idle.lock().unwrap();
        (map.len(), map.values().map(Vec::len).sum())
    }

    #[tokio::test]
    async fn a_connection_comes_back_after_its_body_and_is_used_again() {
        let (addr, accepted) = server().await;
        let settings = Settings::from_config(&crate::config::ProxyConfig::default());
        let pool = H1Pool::new(UpstreamConnector::new(settings, None));
        for round in 0..3 {
            let (resp, lease) = answered(pool.request(get(addr)).await.unwrap());
            // Checked out: nothing idle, and no empty entry left behind.
            assert_eq!(idle_count(&pool), (0, 0), "round {round}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"hello");
            lease.release();
            assert_eq!(idle_count(&pool), (1, 1), "round {round}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // A lease dropped before its body ended closes its connection.
        let (_resp, lease) = answered(pool.request(get(addr)).await.unwrap());
        drop(lease);
        assert_eq!(idle_count(&pool), (0, 0));
        let (resp, lease) = answered(pool.request(get(addr)).await.unwrap());
        resp.into_body().collect().await.unwrap();
        lease.release();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn requests_go_out_in_origin_form() {
        let u: Uri = "http://api.example.com:8080/a/b?x=1".parse().unwrap();
        assert_eq!(origin_form(&u), "/a/b?x=1");
        let u: Uri = "http://api.example.com".parse().unwrap();
        assert_eq!(origin_form(&u), "/");
    }
}
