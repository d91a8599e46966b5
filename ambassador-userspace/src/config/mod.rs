//! The one YAML file that `init`, `proxy` and `run` read.
//!
//! Unknown keys, wrong types and bad values are errors naming the field path and
//! the line; every key has a default, so an empty file is valid.

pub mod authn;
pub mod cache;
pub mod dns;
pub mod file;
pub mod gateway;
pub mod grpc;
pub mod inbound;
pub mod load;
pub mod overrides;
pub mod request;
pub mod route;
pub mod service;
pub mod transcode;
pub mod udp;
pub mod upstream;
pub mod validate;
pub mod values;

pub use file::{
    AdminListen, AdminSocket, Config, ConfigError, DEFAULT_ADMIN, DEFAULT_ADMIN_SOCKET,
    DEFAULT_METRICS, FailMode, InterceptConfig, MAX_WORKERS, ProxyConfig, TelemetryConfig,
    TracingConfig,
};
pub use inbound::{
    AppProtocol, InboundConfig, InboundPolicy, InboundPorts, InboundProtocol, ServerTls,
};
pub use overrides::Overrides;
pub use values::{
    Cidr, DurationText, MAX_ATTEMPTS, MAX_COUNT, MAX_DURATION, MAX_LIMIT, clip, parse_duration,
};

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
