//! The wire format pieces the ambassador reads and writes itself: the
//! untagged startup packets, message framing, and the few backend messages it
//! sends the app in the server's place. Client-side messages toward the
//! server and the authentication replies are `postgres-protocol`'s.

use std::io;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
pub const PROTOCOL_3_0: i32 = 0x0003_0000;

/// Startup packets are small; a bigger one is not PostgreSQL (the server's
/// own limit is 10000 bytes).
const MAX_STARTUP: usize = 10_000;

/// The first packet of an app connection.
#[derive(Debug)]
pub enum Startup {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        key: i32,
    },
    /// Protocol 3.0 and its parameters in the order sent.
    Startup(Vec<(String, String)>),
}

/// Bad bytes from a peer.
pub fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Reads one untagged startup packet (as few reads as the app's writes
/// allow: what came beyond it stays in `buf`, for the next packet or, after
/// the StartupMessage, for the session).
pub async fn read_startup<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> io::Result<Startup> {
    loop {
        if buf.len() >= 4 {
            let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if !(8..=MAX_STARTUP as i32).contains(&len) {
                return Err(invalid(format!(
                    "startup packet of {len} bytes: not a PostgreSQL client (or an app speaking TLS directly)"
                )));
            }
            let len = len as usize;
            if buf.len() >= len {
                let packet = buf.split_to(len);
                return parse_startup(&packet[4..]);
            }
            buf.reserve(len - buf.len());
        } else {
            buf.reserve(512);
        }
        if r.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// A startup packet's body (after its length).
fn parse_startup(mut b: &[u8]) -> io::Result<Startup> {
    let code = b.get_i32();
    match code {
        SSL_REQUEST if b.is_empty() => Ok(Startup::SslRequest),
        GSSENC_REQUEST if b.is_empty() => Ok(Startup::GssEncRequest),
        CANCEL_REQUEST if b.len() == 8 => Ok(Startup::Cancel {
            pid: b.get_i32(),
            key: b.get_i32(),
        }),
        PROTOCOL_3_0 => {
            let mut params = Vec::new();
            loop {
                let name = cstr(&mut b)?;
                if name.is_empty() {
                    break;
                }
                let value = cstr(&mut b)?;
                params.push((name, value));
            }
            Ok(Startup::Startup(params))
        }
        other => Err(invalid(format!(
            "unsupported startup code {other} (protocol {}.{})",
            other >> 16,
            other & 0xffff
        ))),
    }
}

fn cstr(b: &mut &[u8]) -> io::Result<String> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| invalid("unterminated string in startup packet"))?;
    let s = String::from_utf8(b[..end].to_vec())
        .map_err(|_| invalid("startup parameter is not UTF-8"))?;
    *b = &b[end + 1..];
    Ok(s)
}

/// The tag and total length (tag included) of the message at the front of
/// `buf`, once its header is there.
pub fn frame(buf: &[u8]) -> io::Result<Option<(u8, usize)>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(invalid(format!("message length {len}")));
    }
    Ok(Some((buf[0], len as usize + 1)))
}

/// The largest message the ambassador reads whole from a server itself (at
/// login, the role check, the reset): those are small. The parser reserves
/// what a header says, so a bigger length (a broken or hostile server) is
/// refused before anything is allocated for it.
pub const MAX_CONTROL_MESSAGE: usize = 1 << 20;

/// The next whole backend message in `buf`, if it is all there.
pub fn parse_backend(
    buf: &mut BytesMut,
) -> io::Result<Option<postgres_protocol::message::backend::Message>> {
    if let Some((tag, len)) = frame(buf)?
        && len > MAX_CONTROL_MESSAGE
    {
        return Err(invalid(format!(
            "the server sent a {len}-byte message (tag {tag}) where at most {MAX_CONTROL_MESSAGE} are expected"
        )));
    }
    postgres_protocol::message::backend::Message::parse(buf)
}

/// What the pump needs of a message before streaming it: its header, and
/// its first body byte once there (a Parse's name, a ReadyForQuery's status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peeked {
    pub tag: u8,
    /// Total length, tag included.
    pub len: usize,
    pub first_body_byte: Option<u8>,
}

/// Moves what is there of the current message (`left` bytes of it still to
/// go) from one side's buffer to the other's.
pub fn pass_on(from: &mut BytesMut, to: &mut BytesMut, left: &mut usize) {
    let n = (*left).min(from.len());
    if n > 0 {
        to.extend_from_slice(&from.split_to(n));
        *left -= n;
    }
}

pub fn peek(buf: &[u8]) -> io::Result<Option<Peeked>> {
    Ok(frame(buf)?.map(|(tag, len)| Peeked {
        tag,
        len,
        first_body_byte: buf.get(5).copied().filter(|_| len > 5),
    }))
}

fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn auth_ok(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(0));
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, b'S', |b| {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_slice(value.as_bytes());
        b.put_u8(0);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, key: i32) {
    message(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(key);
    });
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, b'C', |b| {
        b.put_slice(tag.as_bytes());
        b.put_u8(0);
    });
}

/// A frontend message whose body is a kind byte and a name (Describe,
/// Close), or a Parse: the name, NUL-terminated, then `rest`.
pub fn named_message(buf: &mut BytesMut, tag: u8, kind: Option<u8>, name: &[u8], rest: &[u8]) {
    message(buf, tag, |b| {
        if let Some(k) = kind {
            b.put_u8(k);
        }
        b.put_slice(name);
        b.put_slice(rest);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    message(buf, b'Z', |b| b.put_u8(status));
}

/// How bad an error the ambassador reports is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The session ends.
    Fatal,
    /// This request failed; the session goes on.
    Error,
}

/// An ErrorResponse, as a driver shows it: severity, SQLSTATE, message.
pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, msg: &str) {
    let sev = match severity {
        Severity::Fatal => "FATAL",
        Severity::Error => "ERROR",
    };
    message(buf, b'E', |b| {
        for (field, value) in [(b'S', sev), (b'V', sev), (b'C', code), (b'M', msg)] {
            b.put_u8(field);
            b.put_slice(value.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
    });
}

/// The fields of an ErrorResponse body (for logs and for passing a server's
/// refusal on): (severity, code, message).
pub fn error_fields(body: &[u8]) -> (String, String, String) {
    let (mut sev, mut code, mut msg) = (String::new(), String::new(), String::new());
    let mut b = body;
    while let Some((&field, rest)) = b.split_first() {
        if field == 0 {
            break;
        }
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        let value = String::from_utf8_lossy(&rest[..end]).into_owned();
        match field {
            b'V' => sev = value,
            b'S' if sev.is_empty() => sev = value,
            b'C' => code = value,
            b'M' => msg = value,
            _ => {}
        }
        b = rest.get(end + 1..).unwrap_or(&[]);
    }
    (sev, code, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An app that writes its SSLRequest, StartupMessage and first query at
    /// once: each packet read in turn from what one read brought, the query
    /// left for the session.
    #[tokio::test]
    async fn startup_packets_written_together_are_taken_apart() {
        let mut wire = BytesMut::from(&[0u8, 0, 0, 8, 4, 210, 22, 47][..]);
        postgres_protocol::message::frontend::startup_message([("user", "app")], &mut wire)
            .unwrap();
        postgres_protocol::message::frontend::query("select 1", &mut wire).unwrap();
        let query_len = 1 + 4 + "select 1".len() + 1;
        let (mut r, mut buf) = (&wire[..], BytesMut::new());
        assert!(matches!(
            read_startup(&mut r, &mut buf).await.unwrap(),
            Startup::SslRequest
        ));
        assert!(r.is_empty(), "one read took it all");
        let Startup::Startup(p) = read_startup(&mut r, &mut buf).await.unwrap() else {
            panic!("not a startup message")
        };
        assert_eq!(p, [("user".into(), "app".into())]);
        assert_eq!(buf.len(), query_len);
        assert_eq!(buf[0], b'Q');
        // Cut short: the app left.
        let err = read_startup(&mut &wire[..5], &mut BytesMut::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn startup_packets() {
        let mut ssl = &[0u8, 0, 0, 8, 4, 210, 22, 47][..];
        assert!(matches!(
            read_startup(&mut ssl, &mut BytesMut::new()).await.unwrap(),
            Startup::SslRequest
        ));
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [("user", "app"), ("database", "orders")],
            &mut buf,
        )
        .unwrap();
        let Startup::Startup(p) = read_startup(&mut &buf[..], &mut BytesMut::new())
            .await
            .unwrap()
        else {
            panic!("not a startup message")
        };
        assert_eq!(
            p,
            [
                ("user".into(), "app".into()),
                ("database".into(), "orders".into())
            ]
        );
        let mut cancel = BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(7, -9, &mut cancel);
        assert!(matches!(
            read_startup(&mut &cancel[..], &mut BytesMut::new())
                .await
                .unwrap(),
            Startup::Cancel { pid: 7, key: -9 }
        ));
        // An app speaking TLS first: a ClientHello is no startup packet.
        let hello = [0x16u8, 3, 1, 2, 0, 1, 0, 1, 0xfc];
        assert!(
            read_startup(&mut &hello[..], &mut BytesMut::new())
                .await
                .is_err()
        );
    }

    #[test]
    fn a_server_message_longer_than_any_login_needs_is_refused_before_allocating() {
        // Found by `cargo xtask fuzz pg_messages` (an out-of-memory): the
        // parser reserved the 4 GiB this header declares.
        let mut buf = BytesMut::from(&[b'R', 0xff, 0xff, 0xf5, 0x17, 0, 0, 0, 10][..]);
        assert!(parse_backend(&mut buf).is_err());
        let mut buf = BytesMut::from(&[b'R', 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 10][..]);
        let Err(err) = parse_backend(&mut buf) else {
            panic!("a 2 MiB message was taken");
        };
        let err = err.to_string();
        assert!(err.contains("2097153-byte message"), "{err}");
        // A whole small one is parsed; a partial one waits.
        let mut buf = BytesMut::from(&[b'Z', 0, 0, 0, 5, b'I'][..]);
        assert!(parse_backend(&mut buf).unwrap().is_some());
        let mut buf = BytesMut::from(&[b'Z', 0, 0, 0, 5][..]);
        assert!(parse_backend(&mut buf).unwrap().is_none());
    }

    #[test]
    fn error_response_round_trip() {
        let mut buf = BytesMut::new();
        error_response(&mut buf, Severity::Fatal, "28000", "no such user");
        let (tag, len) = frame(&buf).unwrap().unwrap();
        assert_eq!((tag, len), (b'E', buf.len()));
        let (sev, code, msg) = error_fields(&buf[5..]);
        assert_eq!(
            (sev.as_str(), code.as_str(), msg.as_str()),
            ("FATAL", "28000", "no such user")
        );
    }
}
