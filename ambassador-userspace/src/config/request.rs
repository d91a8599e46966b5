//! What a service does to a request on its way: headers set (from values,
//! environment, files or OAuth2), removed and renamed.

use std::{collections::BTreeMap, fmt, path::PathBuf};

use serde::{Deserialize, Serialize, Serializer, ser::SerializeMap};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestPolicy {
    /// Headers the ambassador sets; any inbound copy is removed first.
    #[serde(default)]
    pub set_headers: BTreeMap<HeaderKey, HeaderSource>,
    #[serde(default)]
    pub remove_headers: Vec<HeaderKey>,
    /// `from: to`: the app's header goes out under another name.
    #[serde(default)]
    pub rename_headers: BTreeMap<HeaderKey, HeaderKey>,
}

/// A valid HTTP header name, lowercased.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(try_from = "String")]
pub struct HeaderKey(pub String);

impl TryFrom<String> for HeaderKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        http::HeaderName::from_bytes(lower.as_bytes())
            .map(|_| HeaderKey(lower))
            .map_err(|_| format!("`{s}` is not an HTTP header name"))
    }
}

/// Where a header value comes from. Exactly one of `value`, `env`, `file`,
/// `oauth2_client_credentials`; `prefix` (such as `"Bearer "`) goes in front.
#[derive(Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(try_from = "RawHeaderSource")]
pub struct HeaderSource {
    #[schemars(skip)]
    pub kind: SourceKind,
    pub prefix: String,
}

#[derive(Clone, PartialEq, Eq)]
pub enum SourceKind {
    Value(String),
    Env(String),
    File(PathBuf),
    OAuth2(OAuth2Config),
}

// Values may be secrets: Debug shows where they come from, never what they are.
impl fmt::Debug for HeaderSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            SourceKind::Value(_) => f.write_str("HeaderSource::Value(<redacted>)"),
            SourceKind::Env(v) => write!(f, "HeaderSource::Env({v})"),
            SourceKind::File(p) => write!(f, "HeaderSource::File({})", p.display()),
            SourceKind::OAuth2(o) => write!(f, "HeaderSource::OAuth2({})", o.token_url),
        }
    }
}

/// Shows where a value comes from, never a literal value: `/config` and
/// debug dumps must not carry secrets.
impl Serialize for HeaderSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        match &self.kind {
            SourceKind::Value(_) => m.serialize_entry("value", "<redacted>")?,
            SourceKind::Env(v) => m.serialize_entry("env", v)?,
            SourceKind::File(p) => m.serialize_entry("file", p)?,
            SourceKind::OAuth2(o) => m.serialize_entry("oauth2_client_credentials", o)?,
        }
        if !self.prefix.is_empty() {
            m.serialize_entry("prefix", &self.prefix)?;
        }
        m.end()
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawHeaderSource {
    value: Option<String>,
    env: Option<String>,
    file: Option<PathBuf>,
    oauth2_client_credentials: Option<OAuth2Config>,
    #[serde(default)]
    prefix: String,
}

impl TryFrom<RawHeaderSource> for HeaderSource {
    type Error = String;
    fn try_from(r: RawHeaderSource) -> Result<Self, String> {
        let mut kinds = Vec::new();
        if let Some(v) = r.value {
            kinds.push(SourceKind::Value(v));
        }
        if let Some(v) = r.env {
            kinds.push(SourceKind::Env(v));
        }
        if let Some(v) = r.file {
            kinds.push(SourceKind::File(v));
        }
        if let Some(v) = r.oauth2_client_credentials {
            kinds.push(SourceKind::OAuth2(v));
        }
        if kinds.len() != 1 {
            return Err(
                "a header needs exactly one of value, env, file, oauth2_client_credentials".into(),
            );
        }
        if http::HeaderValue::from_str(&r.prefix).is_err() {
            return Err("prefix is not a valid header value".into());
        }
        Ok(HeaderSource {
            kind: kinds.pop().expect("one"),
            prefix: r.prefix,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    pub token_url: String,
    pub client_id: String,
    pub client_secret_file: PathBuf,
    #[serde(default)]
    pub scopes: Vec<String>,
}
