//! Embeds the eBPF object built by `cargo xtask build` (its own toolchain and
//! target, so it cannot be a normal dependency).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=AMBASSADOR_BPF_OBJECT");
    let obj = match std::env::var_os("AMBASSADOR_BPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/bpf/bpfel-unknown-none/release/ambassador"),
    };
    if !obj.is_file() {
        panic!(
            "the eBPF object {} is missing: run `cargo xtask build` first (it builds \
             ambassador-ebpf with the BPF toolchain, installing that if needed)",
            obj.display()
        );
    }
    println!("cargo:rerun-if-changed={}", obj.display());
    println!("cargo:rustc-env=AMBASSADOR_BPF_OBJECT={}", obj.display());
}
