//! One session's message pump between the app and (when it holds one) a
//! server connection, both directions framed.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::{
    cancel,
    error::PgError,
    expect::Verdict,
    extended::{Named, Sides, Took},
    pool::{Lease, Pool},
    protocol,
    service::PgService,
};
use crate::{config::service::PoolMode, tls::PlainOrTls};

/// What one session moved, for metrics and the access log.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionTally {
    /// Bytes from the app after the startup phase.
    pub from_app: u64,
    /// Bytes to the app after the startup phase.
    pub to_app: u64,
    /// `closed`, or `error` when the ambassador ended it with an ErrorResponse.
    pub outcome: &'static str,
}

/// Named statements are handled in transaction pooling unless turned off.
fn named(pg: &PgService) -> Option<Named> {
    let cap = pg.pool.max_prepared_statements;
    if pg.pool.mode != PoolMode::Transaction || cap == 0 {
        return None;
    }
    Some(Named::new(cap, pg.statement_counters.clone()))
}

/// Bytes waiting to be written stop reading from the other side past this.
const HIGH_WATER: usize = 256 * 1024;

/// One session's message pump between the app and (when it holds one) a
/// server connection. Both directions are framed: the app's to see where
/// requests end (Sync, Query, FunctionCall) and what they ask; the server's to
/// see ReadyForQuery and its transaction status.
pub(super) struct Relay<'a> {
    pg: &'a Arc<PgService>,
    pool: &'a Arc<Pool>,
    registration: &'a cancel::Registration,
    bound: Option<Lease>,
    from_app: BytesMut,
    to_server: BytesMut,
    from_server: BytesMut,
    to_app: BytesMut,
    /// Requests sent whose ReadyForQuery has not come back.
    outstanding: usize,
    /// The last ReadyForQuery's status, `None` once anything was sent after it.
    status: Option<u8>,
    /// Bytes of the app's (the server's) current message still to pass on:
    /// a message is looked at by its first bytes and then streamed, so a
    /// large one (a 100 MB bytea) is never held whole.
    app_left: usize,
    server_left: usize,
    /// The server's current message is an answer the app did not ask for.
    server_drop: bool,
    /// The last ReadyForQuery status the app saw.
    app_status: u8,
    /// Transaction pooling with named statements: what the app's messages
    /// became, and the answers owed.
    named: Option<Named>,
    tally: &'a mut SessionTally,
}

/// How long the app may keep its end open after Terminate.
const AFTER_TERMINATE: Duration = Duration::from_millis(250);

enum Step {
    Continue,
    /// The app said Terminate or closed.
    AppDone,
    /// The next message is decided against a server connection's statements.
    NeedServer,
}

impl<'a> Relay<'a> {
    pub(super) fn new(
        pg: &'a Arc<PgService>,
        pool: &'a Arc<Pool>,
        registration: &'a cancel::Registration,
        (from_app, to_app): (BytesMut, BytesMut),
        tally: &'a mut SessionTally,
    ) -> Relay<'a> {
        Relay {
            pg,
            pool,
            registration,
            bound: None,
            from_app,
            to_server: BytesMut::new(),
            from_server: BytesMut::with_capacity(8 * 1024),
            to_app,
            outstanding: 0,
            status: Some(b'I'),
            app_left: 0,
            server_left: 0,
            server_drop: false,
            app_status: b'I',
            named: named(pg),
            tally,
        }
    }

    /// What is left for the app when the session ends.
    pub(super) fn take_to_app(&mut self) -> BytesMut {
        std::mem::take(&mut self.to_app)
    }

    pub(super) fn bind(&mut self, lease: Lease) {
        let c = &lease.conn.conn;
        self.registration.set(Some(cancel::CancelTarget {
            addr: c.addr,
            pid: c.pid,
            key: c.key,
        }));
        self.bound = Some(lease);
    }

    fn server_addr(&self) -> Option<SocketAddr> {
        self.bound.as_ref().map(|l| l.conn.conn.addr)
    }

    /// Idle with nothing in flight: the connection can serve someone else.
    fn server_idle(&self) -> bool {
        self.outstanding == 0
            && self.status == Some(b'I')
            && self.to_server.is_empty()
            && self.from_server.is_empty()
            && self.app_left == 0
            && self.server_left == 0
            && self.named.as_ref().is_none_or(|n| n.expected.is_empty())
    }

    fn release(&mut self) {
        if let Some(l) = self.bound.take() {
            self.registration.set(None);
            self.pool.checkin(l, true);
        }
    }

    /// Plain TCP splits for free; a TLS stream through tokio's split.
    pub(super) async fn run(&mut self, app: &mut PlainOrTls) -> Result<(), PgError> {
        match app {
            PlainOrTls::Plain(tcp) => {
                let (r, w) = tcp.split();
                self.pump(r, w).await
            }
            tls => {
                let (r, w) = tokio::io::split(tls);
                self.pump(r, w).await
            }
        }
    }

    async fn pump(
        &mut self,
        mut ard: impl AsyncRead + Unpin,
        mut awr: impl AsyncWrite + Unpin,
    ) -> Result<(), PgError> {
        loop {
            match self.frame_app()? {
                Step::AppDone => {
                    flush(&mut awr, &mut self.to_app).await;
                    // The app closes its end right after Terminate: wait for
                    // that (briefly), so its socket takes the TIME_WAIT and
                    // ours closes passively, as a server's does.
                    let _ = tokio::time::timeout(AFTER_TERMINATE, ard.read(&mut [0u8; 1])).await;
                    return Ok(());
                }
                Step::NeedServer => {
                    let lease = self
                        .pool
                        .checkout(&self.pg.servers, self.pg.pool.queue_timeout)
                        .await?;
                    self.bind(lease);
                    continue;
                }
                Step::Continue => {}
            }
            // Answered here with nothing sent: the server can go back (not
            // while the app is in the middle of its next message).
            if self.named.is_some()
                && self.bound.is_some()
                && self.from_app.is_empty()
                && self.server_idle()
            {
                self.release();
            }
            // Transaction mode: a request is waiting and no server is held.
            if self.bound.is_none() && !self.to_server.is_empty() {
                let lease = self
                    .pool
                    .checkout(&self.pg.servers, self.pg.pool.queue_timeout)
                    .await?;
                self.bind(lease);
            }
            let (srd, swr) = match self.bound.as_mut() {
                Some(l) => {
                    let c = &mut l.conn.conn;
                    (Some(&mut c.rd), Some(&mut c.wr))
                }
                None => (None, None),
            };
            let to_server_pending = !self.to_server.is_empty() && swr.is_some();
            let read_server = srd.is_some() && self.to_app.len() < HIGH_WATER;
            tokio::select! {
                r = ard.read_buf(&mut self.from_app), if self.to_server.len() < HIGH_WATER => {
                    match r {
                        Ok(0) | Err(_) => {
                            flush(&mut awr, &mut self.to_app).await;
                            return Ok(());
                        }
                        Ok(n) => self.tally.from_app += n as u64,
                    }
                }
                r = read_opt(srd, &mut self.from_server), if read_server => {
                    match r {
                        Ok(n) if n > 0 => self.frame_server()?,
                        _ => return Err(self.server_lost()),
                    }
                }
                r = write_opt(swr, &self.to_server), if to_server_pending => {
                    match r {
                        Ok(n) => self.to_server.advance(n),
                        Err(_) => return Err(self.server_lost()),
                    }
                }
                r = awr.write(&self.to_app), if !self.to_app.is_empty() => {
                    match r {
                        Ok(n) if n > 0 => {
                            self.tally.to_app += n as u64;
                            self.to_app.advance(n);
                        }
                        _ => return Ok(()),
                    }
                }
            }
        }
    }

    fn server_lost(&mut self) -> PgError {
        let addr = self
            .server_addr()
            .unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
        // Not reusable: closed, and its cancel key with it.
        self.registration.set(None);
        if let Some(l) = self.bound.take() {
            self.pool.checkin(l, false);
        }
        PgError::ServerLost { addr }
    }

    /// Moves the app's messages toward the server, each looked at by its
    /// header (and a Parse by its first body byte) and then streamed.
    fn frame_app(&mut self) -> Result<Step, PgError> {
        loop {
            protocol::pass_on(&mut self.from_app, &mut self.to_server, &mut self.app_left);
            if self.app_left > 0 {
                return Ok(Step::Continue);
            }
            let Some(m) = protocol::peek(&self.from_app).map_err(PgError::AppProtocol)? else {
                return Ok(Step::Continue);
            };
            if m.tag == b'X' {
                return Ok(Step::AppDone);
            }
            if self.named.is_some() {
                match self.take_named(m)? {
                    Some(step) => return Ok(step),
                    None => continue,
                }
            }
            match m.tag {
                // Named or not: the name's first byte tells (NUL: unnamed).
                b'P' if self.pg.pool.mode == PoolMode::Transaction => match m.first_body_byte {
                    None if m.len > 5 => return Ok(Step::Continue),
                    None | Some(0) => {}
                    Some(_) => {
                        return Err(PgError::Unsupported(
                            "named prepared statements are off in transaction pooling \
                             (postgres.pool.max_prepared_statements: 0): set it, use unnamed \
                             statements, or postgres.pool.mode: session"
                                .into(),
                        ));
                    }
                },
                b'Q' | b'S' | b'F' => self.outstanding += 1,
                _ => {}
            }
            self.status = None;
            self.app_left = m.len;
        }
    }

    /// One app message through the named-statement handling: `None` when
    /// it was taken (go on to the next), else where the pump goes next.
    fn take_named(&mut self, m: protocol::Peeked) -> Result<Option<Step>, PgError> {
        let (Some(named), Some(lease)) = (self.named.as_mut(), self.bound.as_mut()) else {
            return Ok(Some(Step::NeedServer));
        };
        let mut sides = Sides {
            from_app: &mut self.from_app,
            to_server: &mut self.to_server,
            server: &mut lease.conn.conn.statements,
            registry: &self.pg.statements,
            status: self.app_status,
        };
        match named.take(m, &mut sides)? {
            Took::More => return Ok(Some(Step::Continue)),
            Took::Sent { left, ready } => {
                if ready {
                    self.outstanding += 1;
                }
                self.status = None;
                self.app_left = left;
            }
            Took::Answered => named.expected.answer_due(&mut self.to_app),
        }
        Ok(None)
    }

    /// Moves the server's complete messages toward the app; gives the server
    /// back at an idle ReadyForQuery in transaction mode.
    fn frame_server(&mut self) -> Result<(), PgError> {
        let addr = self.server_addr();
        loop {
            if self.server_drop {
                let n = self.server_left.min(self.from_server.len());
                self.from_server.advance(n);
                self.server_left -= n;
            } else {
                protocol::pass_on(
                    &mut self.from_server,
                    &mut self.to_app,
                    &mut self.server_left,
                );
            }
            if self.server_left > 0 {
                break;
            }
            // The message is out: answers of ours due after it follow it.
            if let Some(n) = self.named.as_mut() {
                n.expected.answer_due(&mut self.to_app);
            }
            let peeked = protocol::peek(&self.from_server).map_err(|source| PgError::ServerIo {
                addr: addr.unwrap_or_else(|| ([0, 0, 0, 0], 0).into()),
                source,
            })?;
            let Some(m) = peeked else { break };
            if m.tag == b'Z' && m.len == 6 {
                let Some(status) = m.first_body_byte else {
                    break;
                };
                self.outstanding = self.outstanding.saturating_sub(1);
                self.status = Some(status);
                self.app_status = status;
            }
            self.server_drop = self.on_server(m.tag) == Verdict::Drop;
            self.server_left = m.len;
        }
        if self.pg.pool.mode == PoolMode::Transaction && self.server_idle() {
            self.release();
        }
        Ok(())
    }

    /// What to do with a server message, by the answers owed; what the
    /// server did not do after all is undone.
    fn on_server(&mut self, tag: u8) -> Verdict {
        let Some(named) = self.named.as_mut() else {
            return Verdict::Pass;
        };
        let mut undone = Vec::new();
        let v = named.expected.on_server(tag, &mut undone);
        for u in &undone {
            let server = self.bound.as_mut().map(|l| &mut l.conn.conn.statements);
            named.undo(u, server);
        }
        v
    }

    /// The session is over: its server connection goes back (after a
    /// reset, in session mode) if it is idle, and is closed if not.
    pub(super) fn finish(&mut self) {
        let Some(mut lease) = self.bound.take() else {
            return;
        };
        self.registration.set(None);
        if !self.server_idle() {
            debug!(pool = %self.pool.key, "session ended mid-request: server connection closed");
            self.pool.checkin(lease, false);
            return;
        }
        if self.pg.pool.mode == PoolMode::Transaction {
            self.pool.checkin(lease, true);
            return;
        }
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let ok = tokio::time::timeout(Duration::from_secs(5), lease.conn.conn.reset())
                .await
                .is_ok_and(|r| r.is_ok());
            pool.checkin(lease, ok);
        });
    }
}

async fn read_opt<R: AsyncRead + Unpin>(
    r: Option<&mut R>,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    match r {
        Some(r) => r.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

async fn write_opt<W: AsyncWrite + Unpin>(w: Option<&mut W>, buf: &[u8]) -> io::Result<usize> {
    match w {
        Some(w) => w.write(buf).await,
        None => std::future::pending().await,
    }
}

async fn flush<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut BytesMut) {
    if !buf.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(5), w.write_all(buf)).await;
        buf.clear();
    }
}
