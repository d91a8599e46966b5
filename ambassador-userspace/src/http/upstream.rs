//! Upstream HTTP connections: TCP (excluded from interception), optional TLS
//! origination with ALPN, pooled by hyper-util's client (HTTP/1.1 keep-alive,
//! HTTP/2 when the upstream offers `h2`).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
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

use crate::{
    config::service::HostPort,
    proxy::{ProxyError, Settings, connect_upstream},
    tls::{self, TlsOrigin},
};

pub type HttpClient = Client<UpstreamConnector, Incoming>;

/// Why no upstream connection could be had. The reason goes to the app in a
/// response header, so it is short and holds no secret.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tcp(#[from] ProxyError),
    #[error("TLS handshake with {addr} failed: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("upstream URI {0} has no host")]
    NoHost(Uri),
}

impl ConnectError {
    /// Timeouts are 504, everything else 502.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ConnectError::Tcp(ProxyError::ConnectTimeout(_)))
    }
}

#[derive(Clone)]
pub struct UpstreamConnector {
    settings: Settings,
    tls: Option<Arc<TlsOrigin>>,
    /// Where to connect whatever the request URI names (the URI then carries
    /// the upstream's own name, for `:authority`); `None`: the URI's host.
    endpoint: Option<HostPort>,
}

impl UpstreamConnector {
    pub fn new(
        settings: Settings,
        tls: Option<Arc<TlsOrigin>>,
        endpoint: Option<HostPort>,
    ) -> UpstreamConnector {
        UpstreamConnector {
            settings,
            tls,
            endpoint,
        }
    }

    pub fn client(self) -> HttpClient {
        self.client_for()
    }

    /// A client that speaks HTTP/2 without TLS (h2c, prior knowledge): for
    /// apps that speak HTTP/2 in the clear (gRPC) to plain upstreams.
    pub fn h2c_client(self) -> HttpClient {
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .timer(TokioTimer::new())
            .http2_only(true)
            .build(self)
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
            let addr = match &this.endpoint {
                Some(ep) => resolve(&ep.host, ep.port).await?,
                None => {
                    let host = uri
                        .host()
                        .ok_or_else(|| ConnectError::NoHost(uri.clone()))?;
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let port = uri
                        .port_u16()
                        .unwrap_or(if this.tls.is_some() { 443 } else { 80 });
                    resolve(host, port).await?
                }
            };
            let tcp = connect_upstream(addr, &this.settings).await?;
            let _ = tcp.set_nodelay(true);
            match &this.tls {
                None => Ok(TokioIo::new(UpstreamStream::Plain(tcp))),
                Some(origin) => match origin.connect(tcp).await {
                    Ok(s) => Ok(TokioIo::new(UpstreamStream::Tls(Box::new(s)))),
                    Err(e) => Err(ConnectError::Tls {
                        addr,
                        reason: tls::reason(&e),
                    }),
                },
            }
        })
    }
}

/// The first address of `host`; an IP literal needs no lookup.
async fn resolve(host: &str, port: u16) -> Result<SocketAddr, ConnectError> {
    if let Ok(ip) = host.parse() {
        return Ok(SocketAddr::new(ip, port));
    }
    let err = |source| ConnectError::Resolve {
        host: host.to_string(),
        source,
    };
    tokio::net::lookup_host((host, port))
        .await
        .map_err(err)?
        .next()
        .ok_or_else(|| err(io::Error::new(io::ErrorKind::NotFound, "no addresses")))
}

pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            UpstreamStream::Plain(_) => Connected::new(),
            UpstreamStream::Tls(s) => {
                if s.get_ref().1.alpn_protocol() == Some(b"h2") {
                    Connected::new().negotiated_h2()
                } else {
                    Connected::new()
                }
            }
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }
}
