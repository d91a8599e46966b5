//! Why a header the ambassador sets could not be made.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("header {header}: environment variable {var} is not set")]
    Env { header: String, var: String },
    #[error("header {header}: cannot read {path}: {source}")]
    File {
        header: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("header {header}: the value from {from} is not a valid header value")]
    Invalid { header: String, from: String },
    #[error("header {header}: OAuth2: {reason}")]
    OAuth2 { header: String, reason: String },
}
