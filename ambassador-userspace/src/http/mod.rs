//! The HTTP ambassador: hyper on the app side (HTTP/1.x and HTTP/2 prior
//! knowledge), per-request service choice by Host, the service's request
//! policy, and pooled upstream clients. Bodies stream both ways.
//!
//! A request's life, a file a step: [`server`] serves the app connection
//! ([`conn`]: what its requests share; [`activity`]: its timers; [`app_io`]:
//! its socket), and hands each request to [`admit`] (which service, may it
//! go), then [`routed`] (the service's routes decide: an answer of the
//! proxy's own, or on), [`cached`] (a stored response answers, or one is
//! stored on the way back) or [`transcoded`] (REST/JSON made into a gRPC
//! call and back), and [`forward`]: [`rewrite`], [`replay`], [`attempt`]
//! with [`classify`]; [`response`] is what goes back, [`finish`] its series and
//! log line.

pub mod activity;
mod admit;
mod app_io;
mod attempt;
mod cached;
mod classify;
mod conn;
mod dest;
mod finish;
mod forward;
pub mod headers;
mod replay;
pub mod response;
mod rewrite;
mod routed;
pub mod server;
pub mod target;
mod transcoded;

pub use headers::{strip_hop_by_hop, upgrade_protocol};
pub use response::{Body, ERROR_HEADER, error_response};
pub use server::serve;
