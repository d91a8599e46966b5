//! What `inject` takes and gives, and why it may refuse.

use super::names::{DEFAULT_CONFIG_MAP, DEFAULT_IMAGE};

/// What `inject` adds, besides the annotations.
#[derive(Debug, Clone)]
pub struct Options {
    pub image: String,
    pub config_map: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image: DEFAULT_IMAGE.into(),
            config_map: DEFAULT_CONFIG_MAP.into(),
        }
    }
}

/// The manifests with the ambassador added, and one line per workload seen.
#[derive(Debug)]
pub struct Injected {
    pub text: String,
    pub report: Vec<String>,
}

/// Input `inject` cannot use; one line naming the document and the field.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("document {doc}: {message}")]
    Yaml { doc: usize, message: String },
    #[error("document {doc} (line {line}, {what}): {field}: {message}")]
    Field {
        doc: usize,
        line: usize,
        what: String,
        field: String,
        message: String,
    },
    #[error("--image {0:?}: an image reference cannot be empty or contain whitespace")]
    Image(String),
}

/// Where one document's errors point.
pub struct Ctx {
    pub doc: usize,
    pub line: usize,
    pub what: String,
}

impl Ctx {
    pub fn err(&self, field: impl Into<String>, message: impl Into<String>) -> InjectError {
        InjectError::Field {
            doc: self.doc,
            line: self.line,
            what: self.what.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}
