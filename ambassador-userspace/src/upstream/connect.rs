//! Making upstream connections: TCP from the proxy's own socket, to the
//! original destination or a service's endpoints (with failover), TLS with
//! ALPN on top; and the clients built on it.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::{net::TcpStream, sync::Semaphore};

use super::stream::UpstreamStream;
use crate::{
    endpoint::{Endpoint, EndpointError, EndpointSet, resolve},
    net::{ConnectError as NetError, Settings},
    tls::{self, PlainOrTls, TlsOrigin},
};

/// Why no upstream connection could be had. The reason goes to the app in a
/// response header, so it is short and holds no secret.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Tcp(#[from] NetError),
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
            ConnectError::Tcp(NetError::Timeout(_)) => true,
            ConnectError::Endpoint(e) => e.is_timeout(),
            _ => false,
        }
    }
}

#[derive(Clone)]
pub struct UpstreamConnector {
    settings: Settings,
    pub(super) tls: Option<Arc<TlsOrigin>>,
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

    /// One new connection (with TLS when configured) to the endpoint the
    /// connector picks, or to the URI's host without endpoints.
    pub async fn connect(&self, uri: Uri) -> Result<TokioIo<UpstreamStream>, ConnectError> {
        use tower_service::Service as _;
        self.clone().call(uri).await
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
                        None => Ok(UpstreamStream::new(PlainOrTls::Plain(tcp))),
                        Some(origin) => match origin.connect(tcp).await {
                            Ok(s) => Ok(UpstreamStream::new(PlainOrTls::tls(s))),
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
                    let tcp = crate::net::connect(addr, &this.settings).await?;
                    handshake(tcp, addr).await?
                }
            };
            stream.permit = permit;
            Ok(TokioIo::new(stream))
        })
    }
}
