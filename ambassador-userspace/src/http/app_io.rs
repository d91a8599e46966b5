//! The app's socket under hyper's server, which can end in a reset.
//!
//! A response whose body breaks after its head went out (the upstream reset
//! mid-body, the request timeout cut it) must not reach the app as a clean
//! end of connection, or a truncated body could pass for a whole one. hyper
//! ends such an HTTP/1 connection with an error and drops the socket; this
//! wrapper then closes it with a reset (`SO_LINGER` 0) instead of a FIN.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

pub struct AppIo {
    stream: TcpStream,
    abort: Arc<AtomicBool>,
}

impl AppIo {
    /// The socket, and the switch that makes its close a reset.
    pub fn new(stream: TcpStream) -> (AppIo, Arc<AtomicBool>) {
        let abort = Arc::new(AtomicBool::new(false));
        (
            AppIo {
                stream,
                abort: abort.clone(),
            },
            abort,
        )
    }
}

impl Drop for AppIo {
    fn drop(&mut self) {
        if self.abort.load(Ordering::Relaxed) {
            crate::net::reset(&self.stream);
        }
    }
}

impl AsyncRead for AppIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AppIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
