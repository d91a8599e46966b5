//! Toward upstreams: connections (TCP from the proxy's own socket, TLS with
//! ALPN on top, one plain-or-TLS stream type), the HTTP/1.1 pool, the client
//! that picks between it and hyper-util's (HTTP/2, h2c), request bodies, and
//! how the upstream is named. Below the services (which build clients from
//! it) and the protocol handlers (which send on them).

pub mod authority;
pub mod body;
pub mod client;
pub mod connect;
pub mod pool;
pub mod stream;

pub use body::{AppBody, AppBodyError, ReqBody};
pub use client::{Answer, HttpClient, RequestError, Unprocessed, names_uri_authority, unprocessed};
pub use connect::{ConnectError, UpstreamConnector};
pub use pool::Lease;
pub use stream::{ConnInfo, LastTlsError, UpstreamStream};
