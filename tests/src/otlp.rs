//! An OTLP/HTTP trace collector stand-in for the tracing tests: it listens
//! in a namespace, keeps every JSON body posted to it, answers as a
//! collector does, and hands the spans back (each with its resource).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use crate::Netns;

/// An OTLP/HTTP collector stand-in: accepts `POST /v1/traces` (JSON) and
/// keeps each body, answering as a collector does.
pub struct OtlpReceiver {
    bodies: Arc<Mutex<Vec<String>>>,
}

impl OtlpReceiver {
    /// Listens on `addr` inside `netns`.
    pub fn start(netns: &Netns, addr: &str) -> OtlpReceiver {
        let sa: SocketAddr = addr.parse().expect("address");
        let listener = netns
            .enter(move || TcpListener::bind(sa))
            .expect("bind the OTLP receiver");
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let keep = bodies.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let keep = keep.clone();
                thread::spawn(move || otlp_conn(conn, keep));
            }
        });
        OtlpReceiver { bodies }
    }

    /// Every span received so far, as JSON objects.
    pub fn spans(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for body in self.bodies.lock().unwrap().iter() {
            let v: serde_json::Value = serde_json::from_str(body).expect("OTLP JSON");
            for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for span in ss["spans"].as_array().into_iter().flatten() {
                        let mut span = span.clone();
                        span["resource"] = rs["resource"].clone();
                        out.push(span);
                    }
                }
            }
        }
        out
    }

    /// Waits (up to 10 s) for a span matching `pred`.
    pub fn wait_span(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(s) = self.spans().into_iter().find(&pred) {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

/// One keep-alive connection: each request's body is kept, each answered `{}`.
fn otlp_conn(conn: TcpStream, keep: Arc<Mutex<Vec<String>>>) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut conn = conn;
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        keep.lock()
            .unwrap()
            .push(String::from_utf8_lossy(&body).into_owned());
        let _ = conn.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        );
    }
}
