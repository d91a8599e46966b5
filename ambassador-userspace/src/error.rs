//! How every failure is classified, in one place: where it came from (who
//! is to blame, and so how loudly it is logged) and whether the same work
//! may be tried again. Each layer's error type says both through
//! [`Classified`]; HTTP and PostgreSQL alike decide retries and log lines
//! from it (pingora's `Error { etype, esource, retry }` is the model).

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The app: a bad request, a name it does not own, a limit it hit.
    App,
    /// An upstream: refused, reset, timed out, broke its protocol.
    Upstream,
    /// The proxy itself, or its node (interception, files, fds).
    Internal,
}

/// Whether the same request may go out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// No: trying again cannot help, or the work may have been done.
    Never,
    /// Nothing reached the upstream (a connect failed): another endpoint,
    /// at once, whatever the request.
    Elsewhere,
    /// It may have been processed: again only if idempotent, with its body
    /// at hand, within the budget.
    IfIdempotent,
    /// The upstream said it did not process it (HTTP/2 REFUSED_STREAM, or
    /// above its GOAWAY's last stream): again whatever the method.
    Unprocessed,
}

/// A classified failure.
pub trait Classified: std::error::Error {
    fn origin(&self) -> Origin;
    fn retry(&self) -> Retry;
}

/// Logs a failure at the level its origin calls for: the app's own are
/// `info` (a hostile app must not fill the warnings), upstreams' `warn`
/// (what an operator looks for), the proxy's own `error`. The fields and
/// message follow the origin, as in `tracing::info!`.
#[macro_export]
macro_rules! log_failure {
    ($origin:expr, $($arg:tt)+) => {
        match $origin {
            $crate::error::Origin::App => ::tracing::info!($($arg)+),
            $crate::error::Origin::Upstream => ::tracing::warn!($($arg)+),
            $crate::error::Origin::Internal => ::tracing::error!($($arg)+),
        }
    };
}
