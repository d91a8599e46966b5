//! The one plain-or-TLS stream toward an upstream, and what it tells each
//! response about itself.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::OwnedSemaphorePermit,
};
use tokio_rustls::client::TlsStream;

use crate::{endpoint::Endpoint, tls};

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
    pub(super) endpoint: Option<Arc<Endpoint>>,
    /// Connected to another endpoint than the pool's own: used once, not pooled.
    pub(super) fallback: bool,
    /// Its place under the service's max_connections.
    pub(super) permit: Option<OwnedSemaphorePermit>,
}

enum Inner {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamStream {
    pub(super) fn plain(s: TcpStream) -> UpstreamStream {
        UpstreamStream {
            inner: Inner::Plain(s),
            last_tls_error: LastTlsError::default(),
            endpoint: None,
            fallback: false,
            permit: None,
        }
    }

    pub(super) fn tls(s: TlsStream<TcpStream>) -> UpstreamStream {
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
