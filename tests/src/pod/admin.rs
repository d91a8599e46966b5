//! The proxy's admin API as the tests reach it: one HTTP/1.1 request per
//! connection, to 127.0.0.1:15020 inside the Pod (read-only) or to the Unix
//! socket a config may name (changes), and `/metrics`.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use super::Pod;

impl Pod {
    /// One request to the proxy's admin API (127.0.0.1:15020 in the Pod):
    /// (status, body).
    pub fn admin(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let text = self.netns.enter(move || {
            let mut s = TcpStream::connect("127.0.0.1:15020").expect("connect to the admin API");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).expect("admin response");
            out
        });
        status_and_body(&text)
    }

    /// Where a test's config may put the proxy's admin socket
    /// (`proxy.admin_socket`): a directory the proxy makes itself.
    pub fn admin_socket_path(&self) -> PathBuf {
        std::env::temp_dir()
            .join(format!(
                "{}-admin",
                self.cgroup.file_name().unwrap().to_string_lossy()
            ))
            .join("admin.sock")
    }

    /// One request on the admin socket at `admin_socket_path`: (status, body).
    pub fn admin_socket(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s =
            UnixStream::connect(self.admin_socket_path()).expect("connect to the admin socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).expect("admin response");
        status_and_body(&text)
    }

    /// `/metrics`, as text.
    pub fn metrics(&self) -> String {
        let (status, body) = self.admin("GET", "/metrics", "");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// `relay_spliced_bytes_total` once it is above `above`, or as it is
    /// after 5 s: a session's bytes are counted when the proxy ends it, a
    /// moment after the client has closed and moved on.
    pub fn spliced_bytes_above(&self, above: u64) -> u64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let m = self.metrics();
            let n = m
                .lines()
                .find_map(|l| l.strip_prefix("ambassador_relay_spliced_bytes_total "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no relay_spliced_bytes_total in\n{m}"));
            if n > above || std::time::Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// A whole `connection: close` response: its status and its body.
fn status_and_body(text: &str) -> (u16, String) {
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (status, body.to_string())
}
