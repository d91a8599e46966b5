//! Services: what the ambassador recognises among intercepted connections and
//! what it does with them. Built once from the config; looked up per
//! connection (by original destination) and per HTTP request (by Host).

pub mod error;
pub mod kind;
pub mod learned;
pub mod names;
pub mod pools;
pub mod table;

pub use error::ServiceError;
pub use kind::{HttpService, Kind, Limits, Service};
pub use table::{Route, ServiceTable};
