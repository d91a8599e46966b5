//! What a request names as its destination (the URI's authority, else the
//! Host header), and the checks that it names one thing only. A request that
//! says two things (two Host fields; a Host that differs from the absolute
//! URI or the HTTP/2 `:authority`) could be matched to a service on one and
//! be routed by the upstream on the other: it is refused before any policy
//! runs.

use http::{Request, header, uri::Authority};

/// Why a request's target was refused (the 400's reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("the Host header is not a valid host[:port]")]
    InvalidHost,
    #[error("the Host header names another host than the request target")]
    HostMismatch,
}

/// Checks that the request names one destination; returns it (lowercased
/// host, without port), or `None` when it names none (HTTP/1.0 without Host).
pub fn request_host<B>(req: &Request<B>) -> Result<Option<String>, TargetError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host_field = hosts.next();
    if hosts.next().is_some() {
        return Err(TargetError::DuplicateHost);
    }
    let host_field = match host_field {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<Authority>().ok())
                .filter(|a| !a.host().is_empty() && !a.as_str().contains('@'))
                .ok_or(TargetError::InvalidHost)?,
        ),
        None => None,
    };
    let uri = req.uri();
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let named = match (uri.authority(), &host_field) {
        (Some(u), Some(h)) => {
            let same_host = u.host().eq_ignore_ascii_case(h.host());
            let same_port =
                u.port_u16().unwrap_or(default_port) == h.port_u16().unwrap_or(default_port);
            if !(same_host && same_port) {
                return Err(TargetError::HostMismatch);
            }
            Some(u.host())
        }
        (Some(u), None) => Some(u.host()),
        (None, Some(h)) => Some(h.host()),
        (None, None) => None,
    };
    Ok(named.map(|h| {
        h.trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn a_request_names_one_destination_or_is_refused() {
        use TargetError::*;
        type Case<'a> = (&'a str, &'a [&'a str], Result<Option<&'a str>, TargetError>);
        let cases: &[Case] = &[
            ("/", &["API.example.test"], Ok(Some("api.example.test"))),
            (
                "/",
                &["api.example.test:8080"],
                Ok(Some("api.example.test")),
            ),
            ("/", &["[fd00::2]:80"], Ok(Some("fd00::2"))),
            ("/", &[], Ok(None)),
            (
                "http://api.example.test/x",
                &[],
                Ok(Some("api.example.test")),
            ),
            // Absolute form and Host agree (the port may be implied).
            (
                "http://api.example.test/x",
                &["api.example.test:80"],
                Ok(Some("api.example.test")),
            ),
            (
                "http://api.example.test:80/x",
                &["API.example.test"],
                Ok(Some("api.example.test")),
            ),
            ("/", &["a.test", "b.test"], Err(DuplicateHost)),
            ("/", &["a.test", "a.test"], Err(DuplicateHost)),
            ("/", &["a b"], Err(InvalidHost)),
            ("/", &[""], Err(InvalidHost)),
            ("/", &["user@a.test"], Err(InvalidHost)),
            ("/", &["a.test/path"], Err(InvalidHost)),
            ("http://allowed.test/", &["other.test"], Err(HostMismatch)),
            (
                "http://allowed.test/",
                &["allowed.test:8080"],
                Err(HostMismatch),
            ),
            (
                "http://allowed.test:8080/",
                &["allowed.test"],
                Err(HostMismatch),
            ),
        ];
        for (uri, hosts, want) in cases {
            let got = request_host(&req(uri, hosts));
            assert_eq!(
                got,
                want.clone().map(|o| o.map(String::from)),
                "{uri} {hosts:?}"
            );
        }
    }
}
