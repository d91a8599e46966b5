//! The one plain-or-TLS byte stream, either way: toward a server (HTTP and
//! TCP upstreams wrap it with what their pools need to know, PostgreSQL
//! uses it as is) and from a caller of the Pod whose TLS the proxy ends.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsStream;

pub enum PlainOrTls {
    Plain(TcpStream),
    // Boxed: a TLS session is ~1 KiB, a plain stream a few words.
    Tls(Box<TlsStream<TcpStream>>),
}

impl PlainOrTls {
    /// A TLS session the proxy began (toward a server).
    pub fn tls(s: tokio_rustls::client::TlsStream<TcpStream>) -> Self {
        PlainOrTls::Tls(Box::new(s.into()))
    }

    /// A TLS session a caller began, which the proxy ends.
    pub fn terminated(s: tokio_rustls::server::TlsStream<TcpStream>) -> Self {
        PlainOrTls::Tls(Box::new(s.into()))
    }

    /// TLS's ALPN picked HTTP/2.
    pub fn negotiated_h2(&self) -> bool {
        match self {
            PlainOrTls::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
            PlainOrTls::Plain(_) => false,
        }
    }

    /// The negotiated TLS version ("TLSv1_3"), for access logs.
    pub fn tls_version(&self) -> Option<&'static str> {
        match self {
            PlainOrTls::Tls(s) => s.get_ref().1.protocol_version().and_then(|v| v.as_str()),
            PlainOrTls::Plain(_) => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, PlainOrTls::Tls(_))
    }

    /// The certificate the peer showed (a caller's, under mutual TLS).
    pub fn peer_certificate(&self) -> Option<&rustls::pki_types::CertificateDer<'static>> {
        match self {
            PlainOrTls::Tls(s) => s.get_ref().1.peer_certificates()?.first(),
            PlainOrTls::Plain(_) => None,
        }
    }
}

impl AsyncRead for PlainOrTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PlainOrTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PlainOrTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PlainOrTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PlainOrTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PlainOrTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PlainOrTls::Plain(s) => Pin::new(s).poll_flush(cx),
            PlainOrTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PlainOrTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PlainOrTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PlainOrTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            PlainOrTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PlainOrTls::Plain(s) => s.is_write_vectored(),
            PlainOrTls::Tls(s) => s.is_write_vectored(),
        }
    }
}
