//! The test bookstore (tests/src/grpc.rs) as a process of its own:
//! `bookstore ADDR` serves gRPC there until it is killed. The transcoding
//! bench runs it built with `--release`, in the servers' namespace.

fn main() {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: bookstore ADDR:PORT");
        std::process::exit(2);
    };
    let listener = match std::net::TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bookstore: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let _server = ambassador_tests::grpc::GrpcUpstream::start(listener);
    loop {
        std::thread::park();
    }
}
