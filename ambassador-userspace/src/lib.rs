//! ambassador: an eBPF-accelerated transparent ambassador sidecar.
//!
//! The tree follows the data path: [`interception`] (kernel programs, maps,
//! cgroups, pins) sends an app's connects to the [`proxy`], which asks
//! [`original_dst`] where each was going and relays it there; callers of the
//! Pod reach [`inbound`], which applies the port's policy and forwards to
//! the app. [`config`] is the one file all commands read; [`cmd`] holds the
//! commands.

pub mod access_log;
pub mod admin;
pub mod auth;
pub mod cache;
pub mod cmd;
pub mod config;
pub mod dns;
pub mod endpoint;
pub mod error;
pub mod files;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod inbound;
pub mod inject;
pub mod interception;
pub mod metrics;
pub mod net;
pub mod original_dst;
pub mod postgres;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod retry;
pub mod route;
pub mod service;
pub mod sync;
pub mod tls;
pub mod trace;
pub mod transcode;
pub mod upstream;
