//! Access logs: one JSON line per HTTP request or TCP session, on stdout
//! (process logs go to stderr). Lines are appended to a shared buffer and
//! written by one thread every 100 ms or sooner when it fills, so the data
//! path never blocks on the terminal or the container runtime's pipe.
//!
//! A line names the service, original destination, endpoint, method, status,
//! bytes, duration, retries, upstream TLS and trace id. It never holds a
//! header value, a query string or a body: those may carry secrets.

use std::{
    io::Write as _,
    net::SocketAddr,
    sync::{
        Condvar, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde::Serialize;

/// Flush early past this much buffered text.
const FLUSH_AT: usize = 64 * 1024;

struct Sink {
    buf: Mutex<Vec<u8>>,
    ready: Condvar,
}

static SINK: OnceLock<Sink> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns access logging on or off (config `telemetry.access_log`); the
/// writer thread starts the first time it is turned on.
pub fn set_enabled(on: bool) {
    if on {
        let mut first = false;
        let sink = SINK.get_or_init(|| {
            first = true;
            Sink {
                buf: Mutex::new(Vec::with_capacity(FLUSH_AT)),
                ready: Condvar::new(),
            }
        });
        if first {
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || writer(sink))
                .expect("spawn the access-log thread");
        }
    }
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn writer(sink: &'static Sink) {
    let mut out: Vec<u8> = Vec::with_capacity(FLUSH_AT);
    loop {
        {
            let mut buf = crate::sync::lock(&sink.buf);
            if buf.is_empty() {
                buf = sink
                    .ready
                    .wait_timeout(buf, Duration::from_millis(100))
                    .expect("access log buffer")
                    .0;
            }
            std::mem::swap(&mut *buf, &mut out);
        }
        if !out.is_empty() {
            let mut stdout = std::io::stdout().lock();
            // Nobody to tell when stdout is gone; the proxy goes on.
            let _ = stdout.write_all(&out);
            let _ = stdout.flush();
            out.clear();
        }
    }
}

/// Writes out what is buffered (at exit).
pub fn flush() {
    let Some(sink) = SINK.get() else { return };
    let mut buf = crate::sync::lock(&sink.buf);
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(&buf);
    let _ = stdout.flush();
    buf.clear();
}

fn emit(line: &impl Serialize) {
    let Some(sink) = SINK.get() else { return };
    let mut buf = crate::sync::lock(&sink.buf);
    // Serialising plain structs into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, line);
    buf.push(b'\n');
    if buf.len() >= FLUSH_AT {
        sink.ready.notify_one();
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// One HTTP request.
#[derive(Serialize)]
pub struct HttpLine<'a> {
    pub service: &'a str,
    pub dst: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub method: &'a str,
    pub authority: &'a str,
    /// The path without the query string (queries may carry tokens).
    pub path: &'a str,
    pub version: &'a str,
    pub status: u16,
    /// Request body bytes, when the length was known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub retries: u32,
    /// A gRPC response's status (0 is OK).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u16>,
    /// What the response cache did (hit, miss, revalidated, stale,
    /// coalesced, not_modified, bypass), for services with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_tls: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<&'a str>,
    /// Why the ambassador answered itself, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

#[derive(Serialize)]
struct Stamped<'a, T: Serialize> {
    time: String,
    kind: &'static str,
    /// `inbound` for callers of the Pod; the app's own calls carry none.
    #[serde(skip_serializing_if = "Option::is_none")]
    direction: Option<&'static str>,
    #[serde(flatten)]
    line: &'a T,
}

pub fn http(line: &HttpLine<'_>) {
    emit(&Stamped {
        time: now(),
        kind: "http",
        direction: None,
        line,
    });
}

/// One DNS query of the app's, as the forwarder answered it.
#[derive(Serialize)]
pub struct DnsLine<'a> {
    pub name: &'a str,
    /// The question's type: A, AAAA, ...
    #[serde(rename = "type")]
    pub qtype: &'a str,
    /// `udp` or `tcp`.
    pub transport: &'static str,
    /// The resolver the app asked.
    pub resolver: std::net::IpAddr,
    /// What the forwarder did: forwarded, hosts, denied, upstream_error.
    pub outcome: &'a str,
    /// The code the app got: NOERROR, NXDOMAIN, SERVFAIL...
    pub rcode: &'a str,
    /// Address records in the answer.
    pub answers: usize,
    pub duration_ms: f64,
}

pub fn dns(line: &DnsLine<'_>) {
    emit(&Stamped {
        time: now(),
        kind: "dns",
        direction: None,
        line,
    });
}

/// One TCP session (relayed bytes, PostgreSQL or opaque).
#[derive(Serialize)]
pub struct TcpLine<'a> {
    pub service: &'a str,
    pub dst: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    /// How it ended: `closed`, `reset`, `idle_timeout`, `refused`...
    pub outcome: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_tls: Option<&'a str>,
}

pub fn tcp(line: &TcpLine<'_>) {
    emit(&Stamped {
        time: now(),
        kind: "tcp",
        direction: None,
        line,
    });
}

/// An HTTP version as access-log lines name it.
pub fn version_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

/// One request from a caller of the Pod.
#[derive(Serialize)]
pub struct InboundHttpLine<'a> {
    /// The port policy's name.
    pub service: &'a str,
    /// The caller, as its connection shows it.
    pub client: SocketAddr,
    /// The Pod address and port the caller dialled.
    pub dst: SocketAddr,
    pub method: &'a str,
    /// The path without the query string (queries may carry tokens).
    pub path: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub bytes_out: u64,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<&'a str>,
    /// A gRPC response's status (0 is OK).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u16>,
    /// Why the ambassador answered itself, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

/// One TCP session from a caller of the Pod.
#[derive(Serialize)]
pub struct InboundTcpLine<'a> {
    pub service: &'a str,
    pub client: SocketAddr,
    pub dst: SocketAddr,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub outcome: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<&'a str>,
}

pub fn inbound_http(line: &InboundHttpLine<'_>) {
    emit(&Stamped {
        time: now(),
        kind: "http",
        direction: Some("inbound"),
        line,
    });
}

pub fn inbound_tcp(line: &InboundTcpLine<'_>) {
    emit(&Stamped {
        time: now(),
        kind: "tcp",
        direction: Some("inbound"),
        line,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_one_json_object_each() {
        let line = HttpLine {
            service: "s",
            dst: "10.0.0.1:80".parse().unwrap(),
            endpoint: Some("api:443".into()),
            method: "GET",
            authority: "api",
            path: "/x\"y\n",
            version: "HTTP/1.1",
            status: 200,
            bytes_in: None,
            bytes_out: 5,
            duration_ms: 1.5,
            retries: 0,
            grpc_status: None,
            cache: Some("hit"),
            upstream_tls: Some("TLSv1_3"),
            trace_id: None,
            error: None,
        };
        let text = serde_json::to_string(&Stamped {
            time: now(),
            kind: "http",
            direction: None,
            line: &line,
        })
        .unwrap();
        assert!(!text.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["kind"], "http");
        assert_eq!(v["path"], "/x\"y\n");
        assert_eq!(v["status"], 200);
        assert!(v.get("bytes_in").is_none());
    }
}
