//! A simulated Pod on a real kernel, for the end-to-end tests.
//!
//! A Pod here is what the kubelet makes: a Pod cgroup with one child cgroup per
//! container (`app`, `proxy`), and a network namespace the containers share.
//! `ambassador init` attaches at the Pod cgroup; `ambassador proxy` runs as uid
//! 1337 in the proxy child; unmodified clients (curl, python3) run in the app
//! child. "Remote" servers live in a second namespace joined by a veth pair:
//! the Pod is 198.18.0.1 / fd00:a5::1, the servers 198.18.0.2-.9 / fd00:a5::2.
//! Everything is torn down on drop, panics included.
//!
//! Everything the tests use is re-exported here, so `use ambassador_tests::*`
//! finds it wherever it lives.

pub mod containers;
pub mod dns;
pub mod dockerfile;
pub mod framing;
pub mod grpc;
pub mod jwt;
mod netns;
pub mod origin;
mod otlp;
mod pod;
pub mod postgres;
mod process;
mod server;
pub mod upstream;

pub use netns::Netns;
pub use otlp::OtlpReceiver;
pub use pod::{
    Counters, POD_V4, POD_V6, PROXY_PORT, PROXY_UID, Pod, SERVER_V4, SERVER_V6, SERVER2_V4,
    attached_programs, bpf_object_counts,
};
pub use process::{
    Placement, bin, cgroup2_mount, client_py, cstr, hostile_py, placed, require_root, stderr,
    stdout, workspace,
};
pub use server::{Behaviour, Server, read_request_head};
