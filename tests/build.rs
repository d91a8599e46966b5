//! The bookstore gRPC service the transcoding tests run (tonic), generated
//! from tests/protos at build time. protox compiles the .proto in Rust, so
//! building this crate (which xtask depends on) needs no protoc; the tests
//! make the descriptor set the ambassador reads with protoc itself, as
//! users do.

fn main() {
    println!("cargo:rerun-if-changed=protos");
    let fds = protox::compile(["bookstore.proto"], ["protos"])
        .unwrap_or_else(|e| panic!("compiling tests/protos/bookstore.proto: {e}"));
    tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating the bookstore gRPC service: {e}"));
}
