//! The credentials the ambassador logs in with: a YAML file of
//! `user: password`, re-read when it changes (a rotated Secret). The app never
//! sees a password; a user the file does not list is refused.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::files::FromFiles;

/// A password; shown nowhere (Debug is redacted).
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// A credentials file that cannot be used. Never quotes the file's content.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("credentials file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credentials file {path}: {reason} (expected `user: password` lines)")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug)]
pub struct Credentials {
    path: PathBuf,
    table: FromFiles<BTreeMap<String, Password>>,
}

impl Credentials {
    /// Reads the file now, so a missing or bad one stops start-up.
    pub fn new(path: &Path) -> Result<Credentials, CredentialsError> {
        Ok(Credentials {
            table: FromFiles::new([path.to_path_buf()], read(path)?),
            path: path.to_path_buf(),
        })
    }

    /// The password for `user`, from the file as it is now (checked at most
    /// once a second). A file that became unreadable keeps the last good
    /// table: a rotation briefly removes it on some volume types.
    pub fn get(&self, user: &str) -> Option<Password> {
        let table = self.table.get("credentials file", || read(&self.path));
        table.get(user).cloned()
    }
}

fn read(path: &Path) -> Result<BTreeMap<String, Password>, CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text).map_err(|reason| CredentialsError::Invalid {
        path: path.into(),
        reason,
    })
}

/// Scalars only (a numeric password is still a password); errors name the
/// line or the user, never a value.
fn parse(text: &str) -> Result<BTreeMap<String, Password>, String> {
    use serde_yaml_ng::Value;
    let value: Value = serde_yaml_ng::from_str(text).map_err(|e| match e.location() {
        Some(l) => format!("line {}: not valid YAML", l.line()),
        None => "not valid YAML".into(),
    })?;
    let map = match value {
        Value::Mapping(m) => m,
        Value::Null => return Ok(BTreeMap::new()),
        _ => return Err("not a map".into()),
    };
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let user = match k {
            Value::String(s) if !s.is_empty() => s,
            _ => return Err("a user name is not a string".into()),
        };
        let password = match v {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => return Err(format!("the password of `{user}` is not a string")),
        };
        out.insert(user, Password(password));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_users_and_never_shows_passwords() {
        let t = parse("app: s3cret\nreport: 12345\n").unwrap();
        assert_eq!(t["app"].expose(), "s3cret");
        assert_eq!(t["report"].expose(), "12345");
        assert!(!format!("{t:?}").contains("s3cret"));
        let e = parse("app: [s3cret]\n").unwrap_err();
        assert!(e.contains("`app`") && !e.contains("s3cret"), "{e}");
        let e = parse("app: 's3cret\n").unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn rotation_is_picked_up() {
        let dir = std::env::temp_dir().join(format!("amb-pgcred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("credentials.yaml");
        std::fs::write(&f, "app: one\n").unwrap();
        let c = Credentials::new(&f).unwrap();
        assert_eq!(c.get("app").unwrap().expose(), "one");
        let tmp = dir.join("new.yaml");
        std::fs::write(&tmp, "app: two\nother: x\n").unwrap();
        std::fs::rename(&tmp, &f).unwrap();
        c.table.check_now();
        assert_eq!(c.get("app").unwrap().expose(), "two");
        assert!(c.get("nobody").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
