//! The one YAML file that `init`, `proxy` and `run` read.
//!
//! Unknown keys, wrong types and bad values are errors naming the field path and
//! the line; every key has a default, so an empty file is valid.

use std::{fmt, net::IpAddr, path::Path, str::FromStr, time::Duration};

use ambassador_common::{DEFAULT_PROXY_PORT, DEFAULT_PROXY_UID, DEFAULT_TABLE_SIZE, maps};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, de};

/// A config file that could not be used. The message is one line naming the
/// file, the line and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub intercept: InterceptConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Redirect target on 127.0.0.1 and ::1.
    pub port: u16,
    /// The proxy's own uid; sockets it creates are never redirected.
    pub uid: u32,
    /// Also recognise the proxy's upstream sockets by this SO_MARK (the proxy
    /// sets it; needs CAP_NET_ADMIN). For proxies that cannot have their own uid.
    pub mark: Option<u32>,
    /// Give up on an upstream that has not accepted the connection by then.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Close a relayed connection after this long with no byte in either direction.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Runtime worker threads; 0 picks min(2, cores): a sidecar shares its Pod's CPU.
    pub workers: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            port: DEFAULT_PROXY_PORT,
            uid: DEFAULT_PROXY_UID,
            mark: None,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            workers: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// The proxy is down: connects fail at once (nothing escapes policy).
    #[default]
    Closed,
    /// The proxy is down: connects go direct.
    Open,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InterceptConfig {
    pub fail: FailMode,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<Cidr>,
    /// Also intercept connections to 127.0.0.0/8 and ::1.
    pub loopback: bool,
    /// Entries in each connection table (original destinations in flight).
    pub table_size: u32,
}

impl Default for InterceptConfig {
    fn default() -> Self {
        InterceptConfig {
            fail: FailMode::Closed,
            exclude_ports: vec![22],
            exclude_cidrs: Vec::new(),
            loopback: false,
            table_size: DEFAULT_TABLE_SIZE,
        }
    }
}

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

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// `1500ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|_| format!("`{s}` is not a duration (like 1500ms, 30s, 5m)"))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(de::Error::custom)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses and validates; the error is one line with the field path and line.
    pub fn parse(text: &str) -> Result<Config, String> {
        // An empty file (or only comments) is the all-defaults config.
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| yaml_error(&e))?;
        let cfg: Config = if value.is_null() {
            Config::default()
        } else {
            serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(text)).map_err(
                |e| {
                    let path = e.path().to_string();
                    let inner = yaml_error(e.inner());
                    // Put the full field path after the line, where serde_yaml_ng's
                    // own (shorter) path would have been.
                    match inner.split_once(": ") {
                        Some((line, rest)) if line.starts_with("line ") && path != "." => {
                            let rest = rest.strip_prefix(&format!("{path}: ")).unwrap_or(rest);
                            let rest = match rest.split_once(": ") {
                                Some((p, r)) if path.starts_with(p) => r,
                                _ => rest,
                            };
                            format!("{line}: {path}: {rest}")
                        }
                        _ => inner,
                    }
                },
            )?
        };
        cfg.validate(text)?;
        Ok(cfg)
    }

    fn validate(&self, text: &str) -> Result<(), String> {
        let at = |key: &str| match line_of(text, key) {
            Some(l) => format!("line {l}: "),
            None => String::new(),
        };
        if self.proxy.mark == Some(0) {
            return Err(format!(
                "{}proxy.mark: must not be 0 (0 means unmarked)",
                at("mark")
            ));
        }
        if self.proxy.port == 0 {
            return Err(format!("{}proxy.port: must be 1-65535", at("port")));
        }
        if self.intercept.exclude_ports.contains(&0) {
            return Err(format!(
                "{}intercept.exclude_ports: 0 is not a port",
                at("exclude_ports")
            ));
        }
        if self.intercept.exclude_ports.len() > maps::MAX_EXCLUDED_PORTS as usize {
            return Err(format!(
                "{}intercept.exclude_ports: at most {} ports",
                at("exclude_ports"),
                maps::MAX_EXCLUDED_PORTS
            ));
        }
        if self.intercept.exclude_cidrs.len() > maps::MAX_EXCLUDED_CIDRS as usize {
            return Err(format!(
                "{}intercept.exclude_cidrs: at most {} blocks",
                at("exclude_cidrs"),
                maps::MAX_EXCLUDED_CIDRS
            ));
        }
        if !(256..=1 << 22).contains(&self.intercept.table_size) {
            return Err(format!(
                "{}intercept.table_size: must be between 256 and 4194304",
                at("table_size")
            ));
        }
        for (name, d) in [
            ("connect_timeout", self.proxy.connect_timeout),
            ("idle_timeout", self.proxy.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{}proxy.{name}: must be more than 0", at(name)));
            }
        }
        Ok(())
    }
}

/// serde_yaml_ng says "path: problem at line L column C"; put the line first so
/// every error reads the same way.
fn yaml_error(e: &serde_yaml_ng::Error) -> String {
    let msg = e.to_string();
    let msg = match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    };
    match e.location() {
        Some(loc) => format!("line {}: {msg}", loc.line()),
        None => msg,
    }
}

/// The first line holding `key:`, for errors found after parsing.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let needle = format!("{key}:");
    text.lines()
        .position(|l| l.trim_start().starts_with(&needle))
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        for text in ["", "\n", "# nothing\n"] {
            assert_eq!(Config::parse(text).unwrap(), Config::default());
        }
        let d = Config::default();
        assert_eq!(d.proxy.port, 15001);
        assert_eq!(d.proxy.uid, 1337);
        assert_eq!(d.intercept.fail, FailMode::Closed);
        assert_eq!(d.intercept.exclude_ports, vec![22]);
        assert!(!d.intercept.loopback);
    }

    #[test]
    fn documented_example_parses() {
        let cfg = Config::parse(
            "proxy:\n  port: 15001\n  uid: 1337\nintercept:\n  fail: closed\n  exclude_ports: [22]\n  exclude_cidrs: []\n  loopback: false\n",
        )
        .unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn values_are_read() {
        let cfg = Config::parse(
            "proxy: { port: 16001, idle_timeout: 1500ms }\nintercept:\n  fail: open\n  exclude_cidrs: [10.0.0.0/8, 'fd00::1']\n",
        )
        .unwrap();
        assert_eq!(cfg.proxy.port, 16001);
        assert_eq!(cfg.proxy.idle_timeout, Duration::from_millis(1500));
        assert_eq!(cfg.intercept.fail, FailMode::Open);
        assert_eq!(cfg.intercept.exclude_cidrs[1].to_string(), "fd00::1/128");
    }

    #[test]
    fn errors_name_field_and_line() {
        let e = Config::parse("proxy:\n  port: 15001\n  prot: 1\n").unwrap_err();
        assert!(e.starts_with("line 3: "), "{e}");
        assert!(e.contains("proxy") && e.contains("prot"), "{e}");

        let e = Config::parse("intercept:\n  fail: maybe\n").unwrap_err();
        assert!(
            e.starts_with("line 2: ") && e.contains("intercept.fail"),
            "{e}"
        );

        let e = Config::parse("proxy:\n  port: nope\n").unwrap_err();
        assert!(e.starts_with("line 2: ") && e.contains("proxy.port"), "{e}");

        let e = Config::parse("intercept:\n  exclude_cidrs: [10.0.0.0/33]\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("exclude_cidrs"), "{e}");

        let e = Config::parse("proxy:\n  idle_timeout: soon\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("idle_timeout"), "{e}");

        let e = Config::parse("proxy:\n  port: 0\n").unwrap_err();
        assert_eq!(e, "line 2: proxy.port: must be 1-65535");

        let e = Config::parse("services: []\n").unwrap_err();
        assert!(e.starts_with("line 1: ") && e.contains("services"), "{e}");
    }
}
