//! Credentials and other headers the ambassador adds to requests.
//!
//! Values come from a literal, an environment variable, a file (re-read when
//! it changes: mounted Secrets and projected tokens rotate) or an OAuth2 token
//! endpoint (`oauth2`). Every value is
//! marked sensitive (never indexed by HPACK) and never appears in a log, an
//! error or a `Debug` dump; errors say where a value should have come from.

pub mod error;
pub mod oauth2;

pub use error::AuthError;

use std::path::PathBuf;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::{
    config::service::{HeaderKey, HeaderSource, RequestPolicy, SourceKind},
    files::FromFiles,
    net::Settings,
};

/// One header the ambassador sets.
pub struct Injector {
    name: HeaderName,
    source: Source,
}

enum Source {
    Fixed(HeaderValue),
    OAuth2(Box<oauth2::OAuth2Source>),
    File {
        path: PathBuf,
        prefix: String,
        value: FromFiles<HeaderValue>,
    },
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let from = match &self.source {
            Source::Fixed(_) => "fixed".to_string(),
            Source::OAuth2(_) => "oauth2".to_string(),
            Source::File { path, .. } => path.display().to_string(),
        };
        write!(f, "Injector({}, from {from}, value <redacted>)", self.name)
    }
}

fn sensitive(header: &str, from: &str, prefix: &str, raw: &str) -> Result<HeaderValue, AuthError> {
    // Secrets written with `echo` end in a newline; it is never part of a value.
    let mut v = HeaderValue::from_str(&format!("{prefix}{}", raw.trim_end_matches(['\n', '\r'])))
        .map_err(|_| AuthError::Invalid {
        header: header.into(),
        from: from.into(),
    })?;
    v.set_sensitive(true);
    Ok(v)
}

fn read_file(header: &str, path: &PathBuf, prefix: &str) -> Result<HeaderValue, AuthError> {
    let raw = std::fs::read_to_string(path).map_err(|source| AuthError::File {
        header: header.into(),
        path: path.clone(),
        source,
    })?;
    sensitive(header, &path.display().to_string(), prefix, &raw)
}

impl Injector {
    /// Reads the value now, so a missing variable or file stops start-up.
    pub fn new(
        key: &HeaderKey,
        src: &HeaderSource,
        settings: &Settings,
    ) -> Result<Injector, AuthError> {
        let header = key.0.as_str();
        let name = HeaderName::from_bytes(header.as_bytes()).expect("validated at parse");
        let source = match &src.kind {
            SourceKind::Value(v) => Source::Fixed(sensitive(header, "value", &src.prefix, v)?),
            SourceKind::Env(var) => {
                let v = std::env::var(var).map_err(|_| AuthError::Env {
                    header: header.into(),
                    var: var.clone(),
                })?;
                Source::Fixed(sensitive(header, &format!("${var}"), &src.prefix, &v)?)
            }
            SourceKind::File(path) => Source::File {
                value: FromFiles::new([path.clone()], read_file(header, path, &src.prefix)?),
                path: path.clone(),
                prefix: src.prefix.clone(),
            },
            SourceKind::OAuth2(cfg) => Source::OAuth2(Box::new(oauth2::OAuth2Source::new(
                header,
                cfg,
                &src.prefix,
                settings,
            )?)),
        };
        Ok(Injector { name, source })
    }

    /// The current value. A rotated file is picked up within a second; if the
    /// new file cannot be read the last good value stays (a rotation briefly
    /// removes the file on some volume types).
    pub async fn value(&self) -> Result<HeaderValue, AuthError> {
        match &self.source {
            Source::Fixed(v) => Ok(v.clone()),
            Source::OAuth2(o) => o.value().await,
            Source::File {
                path,
                prefix,
                value,
            } => {
                let what = "header file";
                let v = value.get(what, || read_file(self.name.as_str(), path, prefix));
                Ok((*v).clone())
            }
        }
    }
}

/// A service's request policy, ready to apply.
#[derive(Debug, Default)]
pub struct RequestRules {
    set: Vec<Injector>,
    remove: Vec<HeaderName>,
    rename: Vec<(HeaderName, HeaderName)>,
}

impl RequestRules {
    pub fn new(policy: &RequestPolicy, settings: &Settings) -> Result<RequestRules, AuthError> {
        let set = policy
            .set_headers
            .iter()
            .map(|(k, v)| Injector::new(k, v, settings))
            .collect::<Result<_, _>>()?;
        let remove = policy
            .remove_headers
            .iter()
            .map(|k| HeaderName::from_bytes(k.0.as_bytes()).expect("validated at parse"))
            .collect();
        let name = |k: &HeaderKey| HeaderName::from_bytes(k.0.as_bytes()).expect("validated");
        let rename = policy
            .rename_headers
            .iter()
            .map(|(from, to)| (name(from), name(to)))
            .collect();
        Ok(RequestRules {
            set,
            remove,
            rename,
        })
    }

    /// Whether the policy sets this header (the ambassador's own value).
    pub fn sets(&self, name: &HeaderName) -> bool {
        self.set.iter().any(|i| i.name == *name)
    }

    /// Removes what must go (including any inbound copy of a header we set, so
    /// the app can neither spoof nor read it) and sets ours.
    pub async fn apply(&self, headers: &mut HeaderMap) -> Result<(), AuthError> {
        for name in &self.remove {
            headers.remove(name);
        }
        for (from, to) in &self.rename {
            if let http::header::Entry::Occupied(e) = headers.entry(from) {
                let (_, values) = e.remove_entry_mult();
                let values: Vec<HeaderValue> = values.collect();
                headers.remove(to);
                for v in values {
                    headers.append(to.clone(), v);
                }
            }
        }
        // Set last: a rename cannot carry an app's value into a header we own.
        for inj in &self.set {
            // insert replaces every inbound value of the name.
            headers.insert(inj.name.clone(), inj.value().await?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(kind: SourceKind, prefix: &str) -> HeaderSource {
        HeaderSource {
            kind,
            prefix: prefix.into(),
        }
    }

    fn settings() -> Settings {
        Settings::from_config(&crate::config::ProxyConfig::default())
    }

    #[tokio::test]
    async fn values_are_sensitive_and_inbound_copies_removed() {
        let mut policy = RequestPolicy::default();
        policy.set_headers.insert(
            HeaderKey("authorization".into()),
            source(SourceKind::Value("tok".into()), "Bearer "),
        );
        policy.remove_headers.push(HeaderKey("x-debug".into()));
        policy
            .rename_headers
            .insert(HeaderKey("x-old".into()), HeaderKey("x-new".into()));
        // An app cannot smuggle a value into an injected header by renaming.
        policy.rename_headers.insert(
            HeaderKey("x-sneaky".into()),
            HeaderKey("authorization".into()),
        );
        let rules = RequestRules::new(&policy, &settings()).unwrap();
        let mut h = HeaderMap::new();
        h.append("authorization", HeaderValue::from_static("Bearer spoofed"));
        h.append("authorization", HeaderValue::from_static("Basic again"));
        h.insert("x-debug", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        h.append("x-old", HeaderValue::from_static("a"));
        h.append("x-old", HeaderValue::from_static("b"));
        h.insert("x-sneaky", HeaderValue::from_static("Bearer stolen"));
        rules.apply(&mut h).await.unwrap();
        let renamed: Vec<_> = h.get_all("x-new").iter().collect();
        assert_eq!(renamed, ["a", "b"]);
        assert!(!h.contains_key("x-old") && !h.contains_key("x-sneaky"));
        let auth: Vec<_> = h.get_all("authorization").iter().collect();
        assert_eq!(auth, ["Bearer tok"]);
        assert!(auth[0].is_sensitive());
        assert!(!h.contains_key("x-debug"));
        assert!(h.contains_key("x-keep"));
        assert!(!format!("{rules:?}").contains("tok"));
    }

    #[tokio::test]
    async fn file_values_follow_rotation_and_missing_sources_fail_clearly() {
        let dir = std::env::temp_dir().join(format!("amb-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "first\n").unwrap();
        let inj = Injector::new(
            &HeaderKey("authorization".into()),
            &source(SourceKind::File(f.clone()), "Bearer "),
            &settings(),
        )
        .unwrap();
        assert_eq!(inj.value().await.unwrap(), "Bearer first");
        let tmp = dir.join("token.new");
        std::fs::write(&tmp, "second").unwrap();
        std::fs::rename(&tmp, &f).unwrap();
        if let Source::File { value: watch, .. } = &inj.source {
            watch.check_now();
        }
        assert_eq!(inj.value().await.unwrap(), "Bearer second");

        let e = Injector::new(
            &HeaderKey("x-a".into()),
            &source(SourceKind::Env("AMB_TEST_SURELY_UNSET".into()), ""),
            &settings(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "header x-a: environment variable AMB_TEST_SURELY_UNSET is not set"
        );
        let e = Injector::new(
            &HeaderKey("x-a".into()),
            &source(SourceKind::File(dir.join("nope")), ""),
            &settings(),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("header x-a: cannot read"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
