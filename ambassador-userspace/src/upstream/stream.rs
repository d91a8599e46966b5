//! An upstream connection: the plain-or-TLS stream with what its pool and
//! each response need to know of it.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::OwnedSemaphorePermit,
};

use crate::{
    endpoint::Endpoint,
    tls::{self, PlainOrTls},
};

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
    inner: PlainOrTls,
    last_tls_error: LastTlsError,
    /// The endpoint it goes to.
    pub(super) endpoint: Option<Arc<Endpoint>>,
    /// Connected to another endpoint than the pool's own: used once, not pooled.
    pub(super) fallback: bool,
    /// Its place under the service's max_connections.
    pub(super) permit: Option<OwnedSemaphorePermit>,
}

impl UpstreamStream {
    pub(super) fn new(inner: PlainOrTls) -> UpstreamStream {
        UpstreamStream {
            inner,
            last_tls_error: LastTlsError::default(),
            endpoint: None,
            fallback: false,
            permit: None,
        }
    }

    /// TLS's ALPN picked HTTP/2.
    pub fn negotiated_h2(&self) -> bool {
        self.inner.negotiated_h2()
    }

    /// What responses on this connection should know of it.
    pub fn info(&self) -> ConnInfo {
        ConnInfo {
            endpoint: self.endpoint.clone(),
            tls: self.inner.tls_version(),
            last_tls_error: self.last_tls_error.clone(),
            fallback: self.fallback,
        }
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
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
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
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Err(_))) && this.inner.is_tls() {
            // The peer may have said why before it closed (an alert waiting
            // in the receive buffer): read it for the reason.
            let mut scratch = [0u8; 512];
            let mut rb = ReadBuf::new(&mut scratch);
            if let Poll::Ready(Err(e)) = Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                this.last_tls_error.note(&e);
            }
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
