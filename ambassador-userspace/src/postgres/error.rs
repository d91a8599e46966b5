//! Why a PostgreSQL session could not go on, classified once: where it came
//! from (the log level), whether another server could help, and the SQLSTATE
//! the app is told.

use std::{io, net::SocketAddr, time::Duration};

use super::auth::CredentialsError;
use crate::{
    error::{Classified, Origin, Retry},
    tls::TlsError,
};

/// A PostgreSQL session that could not go on, classified; the app gets it as
/// an ErrorResponse with [`PgError::sqlstate`].
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("bad startup from the app: {0}")]
    AppProtocol(#[source] io::Error),
    #[error(
        "user \"{user}\" is not allowed through the ambassador for service {service} (no credentials for it)"
    )]
    UnknownUser { user: String, service: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("too many clients for service {service} (postgres.pool.max_clients {max})")]
    TooManyClients { service: String, max: usize },
    #[error(
        "service {service}: no server connection free for {pool} within {timeout:?} (postgres.pool.size {size})"
    )]
    PoolExhausted {
        service: String,
        pool: String,
        timeout: Duration,
        size: usize,
    },
    #[error("cannot reach the server: {0}")]
    Connect(String),
    #[error("server {addr} does not support TLS: refusing to continue in plaintext")]
    NoTls { addr: SocketAddr },
    #[error("TLS with server {addr} failed: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("server {addr} refused the login: {message}")]
    ServerRefused {
        addr: SocketAddr,
        code: String,
        message: String,
    },
    #[error("server {addr} asks for {method} authentication, which the ambassador does not do")]
    AuthMethod { addr: SocketAddr, method: String },
    #[error("SCRAM authentication with server {addr} failed: {reason}")]
    Scram { addr: SocketAddr, reason: String },
    #[error("service {service}: no endpoint is a reachable {target} server ({reasons})")]
    NoServerWithRole {
        service: String,
        target: &'static str,
        reasons: String,
    },
    #[error("server connection to {addr} failed: {source}")]
    ServerIo {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("server connection to {addr} lost")]
    ServerLost { addr: SocketAddr },
}

impl Classified for PgError {
    fn origin(&self) -> Origin {
        match self {
            PgError::AppProtocol(_)
            | PgError::UnknownUser { .. }
            | PgError::Unsupported(_)
            | PgError::TooManyClients { .. } => Origin::App,
            PgError::PoolExhausted { .. } => Origin::Internal,
            _ => Origin::Upstream,
        }
    }

    /// The server's fault before anything of the session reached it
    /// (unreachable, bad TLS, a broken stream at login): the next endpoint
    /// may do better. A refused login is an answer, not a fault.
    fn retry(&self) -> Retry {
        match self {
            PgError::Connect(_)
            | PgError::NoTls { .. }
            | PgError::Tls { .. }
            | PgError::ServerIo { .. }
            | PgError::ServerLost { .. } => Retry::Elsewhere,
            _ => Retry::Never,
        }
    }
}

impl PgError {
    pub fn sqlstate(&self) -> &str {
        match self {
            PgError::AppProtocol(_) => "08P01",
            PgError::UnknownUser { .. } | PgError::AuthMethod { .. } | PgError::Scram { .. } => {
                "28000"
            }
            PgError::Unsupported(_) => "0A000",
            PgError::TooManyClients { .. } | PgError::PoolExhausted { .. } => "53300",
            PgError::ServerRefused { code, .. } if !code.is_empty() => code,
            PgError::ServerRefused { .. } => "28000",
            PgError::ServerIo { .. } | PgError::ServerLost { .. } => "08006",
            _ => "08001",
        }
    }
}

/// A postgres service that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum PgSetupError {
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}
