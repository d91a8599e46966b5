//! The value types and bounds every part of the file shares: address
//! blocks, durations (at most a year), limits and counts, and how an error
//! quotes a value (never at length).

use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// An address block, `10.0.0.0/8` or `fd00::/8`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Cidr(net.trunc()));
        }
        s.parse::<IpAddr>()
            .map(|ip| Cidr(IpNet::from(ip)))
            .map_err(|_| format!("`{s}` is not a CIDR (like 10.0.0.0/8 or fd00::/8)"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl schemars::JsonSchema for Cidr {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Cidr".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "An address block like 10.0.0.0/8 or fd00::/8; a bare address is a /32 or /128",
            "examples": ["10.96.0.0/12", "fd00::/8"]
        })
    }
}

/// A duration as written in the file: `1500ms`, `30s`, `5m`, `1h`.
pub struct DurationText;

impl schemars::JsonSchema for DurationText {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration: a number and a unit (ms, s, m, h), like 1500ms or 30s",
            "pattern": "^\\s*([0-9]+(\\.[0-9]+)?\\s*(ns|us|ms|s|sec|m|min|h|hr|d)\\s*)+$",
            "examples": ["1500ms", "30s", "5m"]
        })
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// The longest duration any setting takes: longer ones are mistakes, and
/// would overflow the clock where they are added to it.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// `1500ms`, `30s`, `5m`, `1h`; at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|_| format!("`{}` is not a duration (like 1500ms, 30s, 5m)", clip(s)))?;
    if d > MAX_DURATION {
        return Err(format!("`{}` is too long: at most 365d", clip(s)));
    }
    Ok(d)
}

/// Longest value an error quotes, and longest error line: a huge value in
/// a file must not come back as a huge error.
pub const MAX_QUOTED: usize = 64;
pub const MAX_ERROR: usize = 512;

/// `s`, cut in the middle when longer than an error should quote.
pub fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= MAX_QUOTED {
        return s.into();
    }
    let head: String = s.chars().take(MAX_QUOTED / 2).collect();
    let tail: String = {
        let t: Vec<char> = s.chars().rev().take(MAX_QUOTED / 4).collect();
        t.into_iter().rev().collect()
    };
    format!("{head}…{tail} ({} bytes)", s.len()).into()
}

/// An error line as shown: quoted runs (in backticks or double quotes) cut
/// by [`clip`], the whole at most [`MAX_ERROR`] bytes.
pub fn shorten(msg: String) -> String {
    if msg.len() <= MAX_ERROR / 2 {
        return msg;
    }
    let mut out = String::with_capacity(MAX_ERROR);
    let mut rest = msg.as_str();
    while let Some(open) = rest.find(['`', '"']) {
        let quote = rest[open..].chars().next().unwrap_or('`');
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        match rest.find(quote) {
            Some(close) => {
                out.push_str(&clip(&rest[..close]));
                out.push(quote);
                rest = &rest[close + 1..];
            }
            None => {
                out.push_str(&clip(rest));
                rest = "";
            }
        }
    }
    out.push_str(rest);
    if out.len() > MAX_ERROR {
        let mut cut = MAX_ERROR;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("… (cut)");
    }
    out
}

pub fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

pub fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

pub fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(de::Error::custom)
}

/// The most connections, requests or pooled clients any limit may name.
pub const MAX_LIMIT: usize = 1_000_000;
/// The most retries of one request.
pub const MAX_ATTEMPTS: u32 = 10;
/// The most failures or checks in a row any threshold may ask for.
pub const MAX_COUNT: u32 = 10_000;

/// A DNS name, lowercased; no port, no scheme.
pub fn valid_host(h: &str) -> Result<String, String> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(h.to_ascii_lowercase())
    } else {
        Err(format!("`{h}` is not a host name (like api.example.com)"))
    }
}

/// What happens while the proxy is down (outbound connects, inbound callers).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// The proxy is down: connects fail at once (nothing escapes policy).
    #[default]
    Closed,
    /// The proxy is down: connects go direct.
    Open,
}

/// The ALPN list a TLS block gives, or the default (h2, http/1.1); only
/// protocols the proxy speaks.
pub fn alpn_or_default(alpn: Option<Vec<String>>) -> Result<Vec<String>, String> {
    let alpn = alpn.unwrap_or_else(|| vec!["h2".into(), "http/1.1".into()]);
    if let Some(bad) = alpn
        .iter()
        .find(|p| p.as_str() != "h2" && p.as_str() != "http/1.1")
    {
        return Err(format!(
            "alpn `{}` is not supported (h2, http/1.1)",
            clip(bad)
        ));
    }
    Ok(alpn)
}

/// HTTP method names, upper-cased; a name that is not one is named.
pub fn methods(list: Vec<String>) -> Result<Vec<String>, String> {
    list.into_iter()
        .map(|m| {
            let up = m.to_ascii_uppercase();
            http::Method::from_bytes(up.as_bytes())
                .map(|_| up)
                .map_err(|_| format!("`{}` is not an HTTP method", clip(&m)))
        })
        .collect()
}
