//! A service that cannot be built.

use crate::{auth::AuthError, tls::TlsError};

/// A service that cannot be built (a file it names is missing, say).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("service {service}: TLS: {source}")]
    Tls {
        service: String,
        #[source]
        source: TlsError,
    },
    #[error("service {service}: {source}")]
    Auth {
        service: String,
        #[source]
        source: AuthError,
    },
    #[error("building the service table: {0}")]
    Build(String),
    #[error("service {service}: {source}")]
    Postgres {
        service: String,
        #[source]
        source: crate::postgres::PgSetupError,
    },
}
