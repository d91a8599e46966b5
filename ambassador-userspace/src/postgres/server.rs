//! Server connections: TCP to an endpoint, TLS (after an SSLRequest, or
//! PostgreSQL 17's direct TLS), the startup message, authentication with the
//! ambassador's credentials (SCRAM-SHA-256, md5, cleartext), and the role
//! check (`target: read-write`) before a connection is used.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::BytesMut;
use postgres_protocol::{
    authentication::{
        md5_hash,
        sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256},
    },
    message::{backend::Message, frontend},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};

use super::{
    auth::{Credentials, Password},
    error::PgError,
    protocol::{error_fields, invalid, parse_backend},
};
use crate::{
    config::{
        service::TargetRole,
        upstream::{Fit, ServerRole},
    },
    endpoint::{Endpoint, EndpointSet},
    error::{Classified, Retry},
    net::Settings,
    tls::{PlainOrTls, TlsOrigin},
};

/// How a postgres service's servers are reached and logged in to.
pub struct Servers {
    pub name: String,
    pub endpoints: Arc<EndpointSet>,
    pub settings: Settings,
    pub tls: Option<TlsOrigin>,
    pub direct_tls: bool,
    pub target: TargetRole,
    pub credentials: Credentials,
    /// How long sessions waited for a server connection.
    pub pool_wait: prometheus_client::metrics::histogram::Histogram,
}

/// Login (TLS, startup, authentication, role check) must finish by then.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A logged-in server connection, ready for queries.
pub struct ServerConn {
    pub rd: ReadHalf<PlainOrTls>,
    pub wr: WriteHalf<PlainOrTls>,
    pub addr: SocketAddr,
    pub endpoint: Option<Arc<Endpoint>>,
    /// The server's cancel key for this connection.
    pub pid: i32,
    pub key: i32,
    /// ParameterStatus values the server reported at login.
    pub params: Vec<(String, String)>,
    /// Named statements prepared here (transaction pooling).
    pub statements: super::statements::ServerStatements,
}

impl ServerConn {
    /// False when the server has closed the connection or sent something
    /// while it sat idle (a FATAL before a shutdown, say): such a connection
    /// is dropped instead of being handed to an app.
    pub fn looks_alive(&mut self) -> bool {
        let mut scratch = [0u8; 64];
        let mut buf = ReadBuf::new(&mut scratch);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(
            Pin::new(&mut self.rd).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }

    /// `DISCARD ALL` before the connection serves another app session.
    pub async fn reset(&mut self) -> Result<(), PgError> {
        let addr = self.addr;
        let io = |source| PgError::ServerIo { addr, source };
        let mut out = BytesMut::new();
        frontend::query("DISCARD ALL", &mut out).map_err(io)?;
        self.statements.clear();
        self.wr.write_all(&out).await.map_err(io)?;
        let mut buf = BytesMut::new();
        let mut failed = None;
        loop {
            match read_message(&mut self.rd, &mut buf).await.map_err(io)? {
                Message::ReadyForQuery(_) => break,
                Message::ErrorResponse(body) => failed = Some(body),
                _ => {}
            }
        }
        if failed.is_some() || !buf.is_empty() {
            return Err(io(invalid("DISCARD ALL failed")));
        }
        Ok(())
    }
}

/// Reads the next whole backend message.
async fn read_message<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> io::Result<Message> {
    loop {
        if let Some(m) = parse_backend(buf)? {
            return Ok(m);
        }
        if r.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Opens a server connection for `user`: endpoints in priority order (the
/// original destination when there are none), skipping servers that do not
/// answer or have the wrong role. A server that refuses the login ends the
/// search: the app gets its reason.
pub async fn open(
    pg: &Servers,
    dst: Option<SocketAddr>,
    user: &str,
    password: &Password,
    startup: &[(String, String)],
) -> Result<ServerConn, PgError> {
    let endpoints = &pg.endpoints;
    let mut tried: Vec<Arc<Endpoint>> = Vec::new();
    let mut last: Option<PgError> = None;
    // Each endpoint's reason, for the error when none will do.
    let mut reasons: Vec<String> = Vec::new();
    let mut wrong_role = false;
    // A server that will do if none better answers (prefer-standby).
    let mut fallback: Option<ServerConn> = None;
    let mut dst = dst;
    loop {
        let (addr, endpoint) = if endpoints.is_empty() {
            match dst.take() {
                Some(d) => (d, None),
                None => break,
            }
        } else {
            let Some(picked) = endpoints.pick(&tried) else {
                break;
            };
            let ep = picked.endpoint.clone();
            tried.push(ep.clone());
            match ep.socket_addr().await {
                Ok(a) => (a, Some(ep)),
                Err(e) => {
                    endpoints.failure(&ep);
                    reasons.push(e.to_string());
                    last = Some(PgError::Connect(e.to_string()));
                    continue;
                }
            }
        };
        let attempt = tokio::time::timeout(
            pg.settings.connect_timeout + LOGIN_TIMEOUT,
            login(pg, addr, user, password, startup),
        )
        .await
        .unwrap_or_else(|_| Err(PgError::Connect(format!("login at {addr} timed out"))));
        match attempt {
            Ok(mut conn) => {
                if let Some(ep) = &endpoint {
                    endpoints.success(ep);
                }
                conn.endpoint = endpoint;
                let role = server_role(&mut conn).await?;
                match pg.target.fits(role) {
                    Fit::Yes => return Ok(conn),
                    Fit::Fallback if fallback.is_none() => fallback = Some(conn),
                    Fit::Fallback | Fit::No => {}
                }
                // Healthy, just not what is asked for.
                let what = if role.standby {
                    "a standby"
                } else if role.read_only_default {
                    "read-only"
                } else {
                    "a primary"
                };
                tracing::debug!(service = %pg.name, server = %addr, "server is {what}: trying the next endpoint");
                wrong_role = true;
                reasons.push(format!("{addr} is {what}"));
            }
            Err(e) if e.retry() == Retry::Elsewhere => {
                if let Some(ep) = &endpoint
                    && let Some(t) = endpoints.failure(ep)
                {
                    tracing::warn!(service = %pg.name, endpoint = %ep.label(), ejected_for = ?t, "endpoint ejected after consecutive failures");
                }
                tracing::info!(service = %pg.name, server = %addr, "{e}");
                reasons.push(e.to_string());
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(conn) = fallback {
        return Ok(conn);
    }
    Err(match last {
        Some(e) if !wrong_role => e,
        _ => PgError::NoServerWithRole {
            service: pg.name.clone(),
            target: pg.target.as_str(),
            reasons: reasons.join("; "),
        },
    })
}

/// TCP, then TLS as configured: after an SSLRequest the server accepted, or
/// directly (PostgreSQL 17). Plaintext only when the service has no TLS.
pub async fn connect(pg: &Servers, addr: SocketAddr) -> Result<PlainOrTls, PgError> {
    let tcp = crate::net::connect(addr, &pg.settings)
        .await
        .map_err(|e| PgError::Connect(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    // A server that vanishes without a FIN must not hang a session forever.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
    let Some(tls) = &pg.tls else {
        return Ok(PlainOrTls::Plain(tcp));
    };
    let mut tcp = tcp;
    let io = |source| PgError::ServerIo { addr, source };
    if !pg.direct_tls {
        let mut req = BytesMut::new();
        frontend::ssl_request(&mut req);
        tcp.write_all(&req).await.map_err(io)?;
        // Exactly one byte: anything the server sent after its `S` and before
        // the handshake would be injected plaintext (CVE-2021-23222).
        let answer = tcp.read_u8().await.map_err(io)?;
        match answer {
            b'S' => {}
            b'N' => return Err(PgError::NoTls { addr }),
            _ => {
                return Err(PgError::Tls {
                    addr,
                    reason: format!("unexpected answer {answer:#04x} to SSLRequest"),
                });
            }
        }
    }
    let stream = tls.connect(tcp).await.map_err(|e| PgError::Tls {
        addr,
        reason: crate::tls::reason(&e),
    })?;
    if pg.direct_tls && stream.get_ref().1.alpn_protocol() != Some(b"postgresql") {
        return Err(PgError::Tls {
            addr,
            reason:
                "the server did not agree to ALPN `postgresql` (direct TLS needs PostgreSQL 17)"
                    .into(),
        });
    }
    Ok(PlainOrTls::tls(stream))
}

/// Connects and logs in as `user` with the ambassador's password.
async fn login(
    pg: &Servers,
    addr: SocketAddr,
    user: &str,
    password: &Password,
    startup: &[(String, String)],
) -> Result<ServerConn, PgError> {
    let mut stream = connect(pg, addr).await?;
    let io = |source| PgError::ServerIo { addr, source };
    let mut out = BytesMut::new();
    frontend::startup_message(
        startup.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        &mut out,
    )
    .map_err(io)?;
    stream.write_all(&out).await.map_err(io)?;
    let mut buf = BytesMut::new();
    let mut scram: Option<ScramSha256> = None;
    let (mut pid, mut key, mut params) = (0, 0, Vec::new());
    loop {
        let msg = read_message(&mut stream, &mut buf).await.map_err(io)?;
        out.clear();
        match msg {
            Message::AuthenticationOk => {}
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(password.expose().as_bytes(), &mut out).map_err(io)?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(user.as_bytes(), password.expose().as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), &mut out).map_err(io)?;
            }
            Message::AuthenticationSasl(body) => {
                scram = Some(sasl_start(&body, password, addr, &mut out)?);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| io(invalid("SASL continue before start")))?;
                s.update(body.data()).map_err(|e| PgError::Scram {
                    addr,
                    reason: e.to_string(),
                })?;
                frontend::sasl_response(s.message(), &mut out).map_err(io)?;
            }
            Message::AuthenticationSaslFinal(body) => {
                // Checks the server's signature: it knows the verifier.
                scram
                    .as_mut()
                    .ok_or_else(|| io(invalid("SASL final before start")))?
                    .finish(body.data())
                    .map_err(|e| PgError::Scram {
                        addr,
                        reason: e.to_string(),
                    })?;
            }
            Message::AuthenticationGss
            | Message::AuthenticationSspi
            | Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationGssContinue(_) => {
                return Err(PgError::AuthMethod {
                    addr,
                    method: "GSSAPI/SSPI/Kerberos".into(),
                });
            }
            Message::ParameterStatus(body) => {
                let (Ok(n), Ok(v)) = (body.name(), body.value()) else {
                    continue;
                };
                params.push((n.to_string(), v.to_string()));
            }
            Message::BackendKeyData(body) => {
                pid = body.process_id();
                key = body.secret_key();
            }
            Message::ReadyForQuery(_) => break,
            Message::ErrorResponse(body) => {
                let raw = body_bytes(&body);
                let (_, code, message) = error_fields(&raw);
                return Err(PgError::ServerRefused {
                    addr,
                    code,
                    message,
                });
            }
            _ => {}
        }
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(io)?;
        }
    }
    if !buf.is_empty() {
        return Err(io(invalid("server sent more after ReadyForQuery at login")));
    }
    let (rd, wr) = tokio::io::split(stream);
    Ok(ServerConn {
        rd,
        wr,
        addr,
        endpoint: None,
        pid,
        key,
        params,
        statements: Default::default(),
    })
}

/// SCRAM-SHA-256 if the server offers it (nothing else of SASL is spoken):
/// the first client message, and the exchange that goes on from it.
fn sasl_start(
    body: &postgres_protocol::message::backend::AuthenticationSaslBody,
    password: &Password,
    addr: SocketAddr,
    out: &mut BytesMut,
) -> Result<ScramSha256, PgError> {
    let mut mechs = body.mechanisms();
    let mut offered = false;
    while let Ok(Some(m)) = fallible_iterator::FallibleIterator::next(&mut mechs) {
        offered |= m == SCRAM_SHA_256;
    }
    if !offered {
        return Err(PgError::AuthMethod {
            addr,
            method: "a SASL mechanism other than SCRAM-SHA-256".into(),
        });
    }
    // The certificate is verified already; channel binding would add
    // nothing against a server we trust by name.
    let s = ScramSha256::new(password.expose().as_bytes(), ChannelBinding::unsupported());
    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), out)
        .map_err(|source| PgError::ServerIo { addr, source })?;
    Ok(s)
}

/// The ErrorResponse body's fields, re-encoded for `error_fields`.
pub fn body_bytes(body: &postgres_protocol::message::backend::ErrorResponseBody) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut fields = body.fields();
    while let Ok(Some(f)) = fallible_iterator::FallibleIterator::next(&mut fields) {
        raw.push(f.type_());
        raw.extend_from_slice(f.value_bytes());
        raw.push(0);
    }
    raw.push(0);
    raw
}

/// What the server is. PostgreSQL 14+ reports `in_hot_standby` and
/// `default_transaction_read_only` at login; older servers are asked `SHOW
/// transaction_read_only` (on for a standby).
async fn server_role(conn: &mut ServerConn) -> Result<ServerRole, PgError> {
    let param = |n: &str| {
        conn.params
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    let read_only_default = param("default_transaction_read_only") == Some("on");
    if let Some(v) = param("in_hot_standby") {
        return Ok(ServerRole {
            standby: v == "on",
            read_only_default,
        });
    }
    let addr = conn.addr;
    let io = |source| PgError::ServerIo { addr, source };
    let mut out = BytesMut::new();
    frontend::query("SHOW transaction_read_only", &mut out).map_err(io)?;
    conn.wr.write_all(&out).await.map_err(io)?;
    let mut buf = BytesMut::new();
    let mut read_only = true;
    loop {
        match read_message(&mut conn.rd, &mut buf).await.map_err(io)? {
            Message::DataRow(row) => {
                let data = row.buffer();
                let mut ranges = row.ranges();
                if let Ok(Some(Some(r))) = fallible_iterator::FallibleIterator::next(&mut ranges) {
                    read_only = &data[r] == b"on";
                }
            }
            Message::ReadyForQuery(_) => break,
            _ => {}
        }
    }
    Ok(ServerRole {
        standby: read_only && !read_only_default,
        read_only_default,
    })
}

/// Passes an app's cancel on to the server connection it names.
pub async fn send_cancel(
    pg: &Servers,
    addr: SocketAddr,
    pid: i32,
    key: i32,
) -> Result<(), PgError> {
    let mut stream = connect(pg, addr).await?;
    let mut out = BytesMut::new();
    frontend::cancel_request(pid, key, &mut out);
    let io = |source| PgError::ServerIo { addr, source };
    stream.write_all(&out).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    // The server closes without an answer once it has acted.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    Ok(())
}
