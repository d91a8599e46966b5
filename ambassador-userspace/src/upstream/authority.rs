//! How an upstream is named in a request (the URI's authority, `Host`).

use http::uri::Authority;

/// `host:port` for the request URI (IPv6 bracketed).
pub fn authority(host: &str, port: u16) -> Option<Authority> {
    let s = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    s.parse().ok()
}

/// The Host header value: the port only when it is not the scheme's default.
pub fn display_authority(host: &str, port: u16, tls: bool) -> String {
    let h = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    if (tls && port == 443) || (!tls && port == 80) {
        h
    } else {
        format!("{h}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_shows_port_only_when_not_default() {
        assert_eq!(
            display_authority("api.example.com", 443, true),
            "api.example.com"
        );
        assert_eq!(
            display_authority("api.example.com", 443, false),
            "api.example.com:443"
        );
        assert_eq!(display_authority("10.0.0.1", 80, false), "10.0.0.1");
        assert_eq!(display_authority("fd00::1", 8080, false), "[fd00::1]:8080");
    }
}
