//! Raw TCP test servers: a `Server` runs on threads in the servers'
//! namespace and does one `Behaviour` with every connection (greet and echo,
//! answer HTTP, read all, close first, reset, flood), recording what it saw
//! for the test's assertions; `read_request_head` helps tests that write
//! their own HTTP server on a raw listener.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// What a test server does with each connection.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Writes "HELLO <its own address> <peer address>\n", then echoes until EOF.
    Greet,
    /// Answers one HTTP request with its own address in the body.
    Http,
    /// Records what the app sent until EOF or error, then replies "got N" and closes.
    ReadAll,
    /// Sends "bye", half-closes, then records what still arrives.
    CloseFirst,
    /// Resets the connection as soon as it is accepted and something arrives.
    Reset,
    /// Writes without reading until a write has blocked for a second, then
    /// records "flooded N" (how much the path took from it) and closes.
    Flood,
}

/// A server running on threads; its events are recorded for assertions.
pub struct Server {
    pub addr: SocketAddr,
    pub events: Arc<Mutex<Vec<String>>>,
    pub accepted: Arc<AtomicUsize>,
}

impl Server {
    pub fn start_on(listener: TcpListener, behaviour: Behaviour) -> Server {
        let addr = listener.local_addr().expect("addr");
        let events = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (ev, acc) = (events.clone(), accepted.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                acc.fetch_add(1, Ordering::Relaxed);
                let ev = ev.clone();
                thread::spawn(move || serve(conn, behaviour, addr, &ev));
            }
        });
        Server {
            addr,
            events,
            accepted,
        }
    }

    pub fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }

    /// Waits for an event containing `needle`.
    pub fn wait_event(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(e) = self.events().into_iter().find(|e| e.contains(needle)) {
                return Some(e);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

fn serve(mut conn: TcpStream, behaviour: Behaviour, me: SocketAddr, ev: &Mutex<Vec<String>>) {
    let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    let record = |s: String| ev.lock().unwrap().push(s);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    match behaviour {
        Behaviour::Greet => {
            let _ = conn.write_all(format!("HELLO {me} {peer}\n").as_bytes());
            let mut buf = [0u8; 4096];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
        Behaviour::Http => {
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let body = format!("served by {me}\n");
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
        Behaviour::ReadAll => {
            let mut got = Vec::new();
            match conn.read_to_end(&mut got) {
                Ok(_) => {
                    record(format!("eof after {} bytes", got.len()));
                    let _ = conn.write_all(format!("got {}\n", got.len()).as_bytes());
                }
                Err(e) => record(format!("error {:?}", e.kind())),
            }
        }
        Behaviour::CloseFirst => {
            let _ = conn.write_all(b"bye\n");
            let _ = conn.shutdown(std::net::Shutdown::Write);
            record("half-closed".into());
            let mut got = Vec::new();
            match conn.read_to_end(&mut got) {
                Ok(_) => record(format!("then read {:?}", String::from_utf8_lossy(&got))),
                Err(e) => record(format!("error {:?}", e.kind())),
            }
        }
        Behaviour::Flood => {
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            let chunk = [b'y'; 65536];
            let mut total = 0usize;
            // At most 1 GiB: a path that never pushes back shows as that.
            while total < 1 << 30 {
                match conn.write(&chunk) {
                    Ok(n) => total += n,
                    Err(_) => break,
                }
            }
            record(format!("flooded {total}"));
        }
        Behaviour::Reset => {
            let mut buf = [0u8; 16];
            let _ = conn.read(&mut buf);
            let sock = socket_linger_zero(&conn);
            record(format!("resetting {sock}"));
            drop(conn);
        }
    }
}

fn socket_linger_zero(conn: &TcpStream) -> bool {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        ) == 0
    }
}

/// One HTTP/1.1 request head from a raw test server's reader: the request
/// line and the Content-Length (0 when absent); `None` at EOF.
pub fn read_request_head(reader: &mut impl BufRead) -> Option<(String, usize)> {
    let mut first = String::new();
    if reader.read_line(&mut first).ok()? == 0 {
        return None;
    }
    let mut len = 0;
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            len = value.trim().parse().unwrap_or(0);
        }
        line.clear();
    }
    Some((first.trim_end().to_string(), len))
}
