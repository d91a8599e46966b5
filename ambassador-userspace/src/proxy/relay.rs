//! L4 relay between the app's connection and the upstream's.
//!
//! Readiness-driven: each direction waits for its source to be readable, then
//! reads into a per-worker-thread scratch buffer and writes straight on. An idle
//! connection therefore holds no buffer at all; a connection only keeps bytes of
//! its own while the receiver pushes back. FIN is propagated as a write
//! shutdown, a reset as a reset (SO_LINGER 0), an idle connection is closed.

use std::{
    cell::RefCell,
    io,
    net::Shutdown,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{net::TcpStream, time::Instant};

/// Large enough for bulk transfers to move in few syscalls; one per worker thread.
const SCRATCH_SIZE: usize = 64 * 1024;
/// A backlog bigger than this is freed once drained, so a burst does not pin memory.
const KEEP_PENDING: usize = 16 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_SIZE].into_boxed_slice());
}

/// How a relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides finished with FIN.
    Closed,
    /// One side reset or failed; the other was reset too.
    Reset(Side),
    /// No byte moved for the idle timeout.
    Idle,
}

impl Outcome {
    /// For access logs.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::Reset(Side::App) => "reset_by_app",
            Outcome::Reset(Side::Upstream) => "reset_by_upstream",
            Outcome::Idle => "idle_timeout",
        }
    }
}

/// Which connection a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    App,
    Upstream,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    /// App to upstream.
    pub sent: u64,
    /// Upstream to app.
    pub received: u64,
}

/// Relays until both directions finish, one fails, or nothing moves for `idle`.
pub async fn relay(app: &TcpStream, upstream: &TcpStream, idle: Duration) -> (Outcome, Totals) {
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved, either way.
    let last = AtomicU64::new(0);
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let up = pump(app, upstream, Side::App, &last, &sent, start);
    let down = pump(upstream, app, Side::Upstream, &last, &received, start);
    let watchdog = idle_watchdog(start, &last, idle);
    let outcome = tokio::select! {
        r = async { tokio::try_join!(up, down) } => match r {
            Ok(_) => Outcome::Closed,
            Err(failed) => {
                // Tell the other side the way the failed side told us.
                crate::net::reset(app);
                crate::net::reset(upstream);
                Outcome::Reset(failed)
            }
        },
        _ = watchdog => Outcome::Idle,
    };
    let totals = Totals {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
    };
    (outcome, totals)
}

/// Relays between two byte streams of any kind (a TLS stream, say) until
/// both end, one fails, or nothing moves for `idle`. Stream copies need their
/// own buffers (8 KiB each way); plain TCP uses [`relay`] instead.
pub async fn relay_io<A, B>(app: A, upstream: B, idle: Duration) -> (Outcome, Totals)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let (mut ar, mut aw) = tokio::io::split(app);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    async fn copy<R, W>(
        r: &mut R,
        w: &mut W,
        last: &AtomicU64,
        start: Instant,
        moved: &AtomicU64,
    ) -> io::Result<()>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let mut buf = vec![0u8; 8192];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return w.shutdown().await;
            }
            w.write_all(&buf[..n]).await?;
            moved.fetch_add(n as u64, Ordering::Relaxed);
            last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }
    let watchdog = idle_watchdog(start, &last, idle);
    let outcome = tokio::select! {
        r = async { tokio::try_join!(copy(&mut ar, &mut uw, &last, start, &sent), copy(&mut ur, &mut aw, &last, start, &received)) } => match r {
            Ok(_) => Outcome::Closed,
            Err(_) => Outcome::Reset(Side::Upstream),
        },
        _ = watchdog => Outcome::Idle,
    };
    let totals = Totals {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
    };
    (outcome, totals)
}

/// Resolves once nothing has moved for `idle`: `last` holds the milliseconds
/// since `start` of the last byte moved, either way.
async fn idle_watchdog(start: Instant, last: &AtomicU64, idle: Duration) {
    loop {
        let deadline = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        tokio::time::sleep_until(deadline).await;
        let now_ms = start.elapsed().as_millis() as u64;
        if now_ms.saturating_sub(last.load(Ordering::Relaxed)) >= idle.as_millis() as u64 {
            return;
        }
    }
}

enum Step {
    Data,
    Eof,
    Spurious,
}

/// Moves bytes from `src` to `dst` until `src` sends FIN; the error names the
/// side that failed.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    src_side: Side,
    last: &AtomicU64,
    total: &AtomicU64,
    start: Instant,
) -> Result<(), Side> {
    let dst_side = match src_side {
        Side::App => Side::Upstream,
        Side::Upstream => Side::App,
    };
    let mut pending: Vec<u8> = Vec::new();
    loop {
        src.readable().await.map_err(|_| src_side)?;
        let step = SCRATCH.with_borrow_mut(|buf| -> Result<Step, Side> {
            let n = match src.try_read(buf) {
                Ok(0) => return Ok(Step::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Spurious),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Step::Spurious),
                Err(_) => return Err(src_side),
            };
            total.fetch_add(n as u64, Ordering::Relaxed);
            let mut off = 0;
            while off < n {
                match dst.try_write(&buf[off..n]) {
                    Ok(w) => off += w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        pending.extend_from_slice(&buf[off..n]);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Err(dst_side),
                }
            }
            Ok(Step::Data)
        })?;
        match step {
            Step::Spurious => continue,
            Step::Eof => {
                // Half-close: the peer may still have a lot to say.
                return match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                    Err(_) => Err(dst_side),
                };
            }
            Step::Data => {
                last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }
        while !pending.is_empty() {
            dst.writable().await.map_err(|_| dst_side)?;
            match dst.try_write(&pending) {
                Ok(w) => {
                    pending.drain(..w);
                    last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(dst_side),
            }
        }
        if pending.capacity() > KEEP_PENDING {
            pending = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    /// A connected pair: (our end, the far end).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap());
        let (a, b) = tokio::join!(a, l.accept());
        (b.unwrap().0, a.unwrap())
    }

    #[tokio::test]
    async fn bytes_and_fin_flow_both_ways() {
        let (app_proxy_end, mut app) = pair().await;
        let (up_proxy_end, mut upstream) = pair().await;
        let relay = tokio::spawn(async move {
            relay(&app_proxy_end, &up_proxy_end, Duration::from_secs(30)).await
        });
        let payload = vec![7u8; 1 << 20];
        let writer = {
            let payload = payload.clone();
            tokio::spawn(async move {
                app.write_all(&payload).await.unwrap();
                app.shutdown().await.unwrap(); // FIN app -> upstream
                let mut back = Vec::new();
                app.read_to_end(&mut back).await.unwrap();
                back
            })
        };
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap(); // ends only on relayed FIN
        assert_eq!(got.len(), payload.len());
        upstream.write_all(b"bye").await.unwrap();
        upstream.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"bye");
        let (outcome, totals) = relay.await.unwrap();
        assert_eq!(outcome, Outcome::Closed);
        assert_eq!(totals.sent, 1 << 20);
        assert_eq!(totals.received, 3);
    }

    #[tokio::test]
    async fn upstream_reset_resets_app() {
        let (app_proxy_end, mut app) = pair().await;
        let (up_proxy_end, upstream) = pair().await;
        let relay = tokio::spawn(async move {
            let r = relay(&app_proxy_end, &up_proxy_end, Duration::from_secs(30)).await;
            drop((app_proxy_end, up_proxy_end));
            r
        });
        crate::net::reset(&upstream);
        drop(upstream);
        let (outcome, _) = relay.await.unwrap();
        assert_eq!(outcome, Outcome::Reset(Side::Upstream));
        let mut buf = [0u8; 8];
        let err = app.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_close() {
        let (app_proxy_end, _app) = pair().await;
        let (up_proxy_end, _upstream) = pair().await;
        let started = Instant::now();
        let (outcome, _) = relay(&app_proxy_end, &up_proxy_end, Duration::from_secs(300)).await;
        assert_eq!(outcome, Outcome::Idle);
        assert!(started.elapsed() >= Duration::from_secs(300));
        assert!(started.elapsed() < Duration::from_secs(302));
    }
}
