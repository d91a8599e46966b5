//! Reading the file: parse, then validate what no single value can, into
//! one short error line naming the line and the field.

use std::path::Path;

use super::{
    file::{Config, ConfigError},
    service,
    validate::validate,
    values::shorten,
};

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

    /// Parses and validates; the error is one line with the field path and
    /// line, of bounded length whatever the file holds.
    pub fn parse(text: &str) -> Result<Config, String> {
        Config::parse_unbounded(text).map_err(shorten)
    }

    fn parse_unbounded(text: &str) -> Result<Config, String> {
        // An empty file (or only comments) is the all-defaults config.
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| yaml_error(&e))?;
        let mut cfg: Config = if value.is_null() {
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
        // Under `deny` nothing leaves the Pod unnamed: the default exclusion
        // (22) would let any host be reached on that port.
        let ports_given = value
            .get("intercept")
            .and_then(|i| i.get("exclude_ports"))
            .is_some();
        if cfg.default == service::DefaultPolicy::Deny && !ports_given {
            cfg.intercept.exclude_ports.clear();
        }
        validate(&cfg, text)?;
        Ok(cfg)
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
