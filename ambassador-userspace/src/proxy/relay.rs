//! L4 relay between the app's connection and the upstream's.
//!
//! Readiness-driven: each direction waits for its source to be readable, then
//! reads into a per-worker-thread scratch buffer and writes straight on. An idle
//! connection therefore holds no buffer at all; a connection only keeps bytes of
//! its own while the receiver pushes back. FIN is propagated as a write
//! shutdown, a reset as a reset (SO_LINGER 0), an idle connection is closed.
//! A direction that turns out to be bulk is handed to `splice(2)` (see
//! `splice.rs`).

use std::{
    cell::RefCell,
    io,
    net::Shutdown,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{net::TcpStream, time::Instant};

use super::splice::{Gate, Pipe};

/// Large enough for bulk transfers to move in few syscalls; one per worker thread.
const SCRATCH_SIZE: usize = 64 * 1024;
/// A backlog bigger than this is freed once drained, so a burst does not pin memory.
const KEEP_PENDING: usize = 16 * 1024;
/// A direction whose reads fill the buffer asks whether it may splice at
/// most once per this many bytes (one getsockopt when the source is the
/// app's end of a redirected connection).
const ASK_EVERY: u64 = 256 * 1024;

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
    /// Of both, the bytes moved by splice.
    pub spliced: u64,
}

/// Relays until both directions finish, one fails, or nothing moves for
/// `idle`. `gate` says when the app's bytes may be spliced (the upstream's
/// always may, unless `gate` is off).
pub async fn relay(
    app: &TcpStream,
    upstream: &TcpStream,
    idle: Duration,
    gate: Gate,
) -> (Outcome, Totals) {
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved, either way.
    let last = AtomicU64::new(0);
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let spliced = AtomicU64::new(0);
    let down_gate = if gate == Gate::Off {
        Gate::Off
    } else {
        Gate::Plain
    };
    let clock = Clock {
        start,
        last: &last,
        spliced: &spliced,
    };
    let up = pump(app, upstream, Side::App, clock, &sent, gate);
    let down = pump(upstream, app, Side::Upstream, clock, &received, down_gate);
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
        spliced: spliced.load(Ordering::Relaxed),
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
        spliced: 0,
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

/// When the last byte moved, either way (milliseconds since `start`), and
/// how many were spliced, both ways.
#[derive(Clone, Copy)]
struct Clock<'a> {
    start: Instant,
    last: &'a AtomicU64,
    spliced: &'a AtomicU64,
}

impl Clock<'_> {
    fn moved(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

enum Step {
    /// Bytes moved; how many were read.
    Data(usize),
    Eof,
    Spurious,
}

fn other(side: Side) -> Side {
    match side {
        Side::App => Side::Upstream,
        Side::Upstream => Side::App,
    }
}

/// Moves bytes from `src` to `dst` until `src` sends FIN; the error names the
/// side that failed. Copies through the scratch buffer until the direction
/// proves bulk and `gate` opens, then splices.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    src_side: Side,
    clock: Clock<'_>,
    total: &AtomicU64,
    gate: Gate,
) -> Result<(), Side> {
    let mut pending: Vec<u8> = Vec::new();
    let mut since_asked = ASK_EVERY;
    loop {
        src.readable().await.map_err(|_| src_side)?;
        let full = match copy_once(src, dst, src_side, total, &mut pending)? {
            Step::Spurious => continue,
            Step::Eof => return half_close(dst, other(src_side)),
            Step::Data(n) => {
                clock.moved();
                since_asked = since_asked.saturating_add(n as u64);
                n == SCRATCH_SIZE
            }
        };
        write_pending(dst, other(src_side), clock, &mut pending).await?;
        if full && since_asked >= ASK_EVERY && gate != Gate::Off {
            since_asked = 0;
            if gate.open(src, total.load(Ordering::Relaxed)) {
                // No pipe (out of descriptors, say): keep copying.
                if let Ok(pipe) = Pipe::new() {
                    return splice_pump(src, dst, src_side, clock, total, pipe).await;
                }
            }
        }
    }
}

/// One read into the scratch buffer and as much of it written on as `dst`
/// takes; the rest waits in `pending`.
fn copy_once(
    src: &TcpStream,
    dst: &TcpStream,
    src_side: Side,
    total: &AtomicU64,
    pending: &mut Vec<u8>,
) -> Result<Step, Side> {
    SCRATCH.with_borrow_mut(|buf| -> Result<Step, Side> {
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
                Err(_) => return Err(other(src_side)),
            }
        }
        Ok(Step::Data(n))
    })
}

/// Writes what `dst` did not take at once, waiting for it to drain.
async fn write_pending(
    dst: &TcpStream,
    dst_side: Side,
    clock: Clock<'_>,
    pending: &mut Vec<u8>,
) -> Result<(), Side> {
    while !pending.is_empty() {
        dst.writable().await.map_err(|_| dst_side)?;
        match dst.try_write(pending) {
            Ok(w) => {
                pending.drain(..w);
                clock.moved();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(dst_side),
        }
    }
    if pending.capacity() > KEEP_PENDING {
        *pending = Vec::new();
    }
    Ok(())
}

/// The source's FIN, passed on: the peer may still have a lot to say.
fn half_close(dst: &TcpStream, dst_side: Side) -> Result<(), Side> {
    match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(_) => Err(dst_side),
    }
}

/// The rest of a direction by splice: into the pipe, then all of it out
/// before reading more (the destination's pace holds the source back).
async fn splice_pump(
    src: &TcpStream,
    dst: &TcpStream,
    src_side: Side,
    clock: Clock<'_>,
    total: &AtomicU64,
    pipe: Pipe,
) -> Result<(), Side> {
    let dst_side = other(src_side);
    let mut pending = Vec::new();
    loop {
        src.readable().await.map_err(|_| src_side)?;
        let mut left = match pipe.fill(src) {
            Ok(0) => return half_close(dst, dst_side),
            Ok(n) => n,
            // Readable, yet nothing for splice: bytes a late shortcut send
            // (another thread of the app) left in the message queue, or a
            // spurious wake-up. Read the copying way.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match copy_once(src, dst, src_side, total, &mut pending)? {
                    Step::Eof => return half_close(dst, dst_side),
                    Step::Data(_) => clock.moved(),
                    Step::Spurious => {}
                }
                write_pending(dst, dst_side, clock, &mut pending).await?;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(src_side),
        };
        total.fetch_add(left as u64, Ordering::Relaxed);
        clock.spliced.fetch_add(left as u64, Ordering::Relaxed);
        clock.moved();
        while left > 0 {
            dst.writable().await.map_err(|_| dst_side)?;
            match pipe.drain(dst, left) {
                Ok(n) => {
                    left -= n;
                    clock.moved();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(dst_side),
            }
        }
    }
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod splice_tests;

#[cfg(test)]
mod tests {
    use super::splice_tests::pair;
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_and_fin_flow_both_ways() {
        let (app_proxy_end, mut app) = pair().await;
        let (up_proxy_end, mut upstream) = pair().await;
        let relay = tokio::spawn(async move {
            relay(
                &app_proxy_end,
                &up_proxy_end,
                Duration::from_secs(30),
                Gate::Off,
            )
            .await
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
            let r = relay(
                &app_proxy_end,
                &up_proxy_end,
                Duration::from_secs(30),
                Gate::Plain,
            )
            .await;
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
        let (outcome, _) = relay(
            &app_proxy_end,
            &up_proxy_end,
            Duration::from_secs(300),
            Gate::Plain,
        )
        .await;
        assert_eq!(outcome, Outcome::Idle);
        assert!(started.elapsed() >= Duration::from_secs(300));
        assert!(started.elapsed() < Duration::from_secs(302));
    }
}
