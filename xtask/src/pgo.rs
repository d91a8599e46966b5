//! `cargo xtask build --pgo`: the release binary, optimised with a profile of
//! its own hot paths (profile-guided optimisation). An instrumented build
//! runs a short pass of the bench's ambassador set-ups in a simulated Pod
//! with other traffic than the bench measures (L4 connects and relaying the
//! other way; HTTP/1.1 POSTs with 4 KiB bodies and 300-byte answers, plain and
//! with TLS origination, HTTP/2 to a TLS upstream and h2c from the app, one
//! and two workers; PostgreSQL read-write transactions over the extended
//! protocol through the transaction pool), each process writing its counts
//! when it exits; rustup's `llvm-profdata` merges them, and the final build lays out
//! and inlines code by them. On the test VM: 8-13 % less CPU per proxied
//! HTTP request (README, `cargo xtask bench`).
//!
//! Root, like the bench: the training runs under real interception. Builds
//! go to `target/pgo/` so they never overwrite `target/release`.

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{
    bench::{self, Bins, Pass},
    root, run_cmd, toolchain,
};

/// Builds the instrumented binary, trains it, and builds the optimised one;
/// returns the optimised binary's path. The eBPF object must be built (it is
/// embedded): `crate::build` first.
pub fn build() -> anyhow::Result<PathBuf> {
    bench::require_root()?;
    let profdata = toolchain::ensure_llvm_profdata()?;
    let dir = root().join("target/pgo");
    let raw = dir.join("raw");
    let instrumented = cargo_build(
        &dir.join("gen"),
        &format!("-Cprofile-generate={}", raw.display()),
    )
    .context("building the instrumented binary")?;
    // Only this training's counts. A file per process: by default processes
    // of one binary merge into one file, and the proxy (uid 1337) could not
    // write to the one `init` (root) made. The harness's processes inherit
    // the variable.
    let _ = fs::remove_dir_all(&raw);
    fs::create_dir_all(&raw)?;
    fs::set_permissions(&raw, fs::Permissions::from_mode(0o1777))?;
    // SAFETY: no other thread runs yet.
    unsafe { std::env::set_var("LLVM_PROFILE_FILE", raw.join("ambassador-%p.profraw")) };
    let trained = train(&instrumented).context("training the instrumented binary");
    // SAFETY: the training's threads have ended.
    unsafe { std::env::remove_var("LLVM_PROFILE_FILE") };
    trained?;
    // The proxies' counts, not only the short-lived commands': the data
    // path must be in there.
    let from_proxy = fs::read_dir(&raw)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.uid() == 1337)
        .count();
    anyhow::ensure!(
        from_proxy > 0,
        "no profile from the proxy (uid 1337) in {}: did it exit on SIGTERM?",
        raw.display()
    );

    let merged = dir.join("merged.profdata");
    run_cmd(
        Command::new(&profdata)
            .arg("merge")
            .arg("-o")
            .arg(&merged)
            .arg(&raw),
    )
    .context("merging the profiles")?;
    // Named by its content: cargo rebuilds a dependency when its flags change,
    // not when a file they name does (only the workspace's crates list the
    // profile in their dep-info), so a new profile must be a new path.
    let profile = dir.join(format!("ambassador-{:016x}.profdata", {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        fs::read(&merged)?.hash(&mut h);
        h.finish()
    }));
    for old in fs::read_dir(&dir)?.filter_map(Result::ok) {
        if old.file_name().to_string_lossy().starts_with("ambassador-") {
            let _ = fs::remove_file(old.path());
        }
    }
    fs::rename(&merged, &profile)?;
    let bin = cargo_build(
        &dir.join("use"),
        &format!("-Cprofile-use={}", profile.display()),
    )
    .context("building with the profile")?;
    eprintln!("xtask: PGO build: {}", bin.display());
    Ok(bin)
}

/// A release build of the binary with `rustflags`, in its own target
/// directory. `--target` keeps the flags off build scripts and proc macros
/// (an instrumented build script would write counts while building).
fn cargo_build(target_dir: &Path, rustflags: &str) -> anyhow::Result<PathBuf> {
    let host = toolchain::host_triple()?;
    run_cmd(
        Command::new(crate::cargo())
            .current_dir(root())
            .args(["build", "--release", "--package", "ambassador-userspace"])
            .args(["--target", &host])
            .env("CARGO_TARGET_DIR", target_dir)
            .env("RUSTFLAGS", rustflags),
    )?;
    Ok(target_dir.join(host).join("release/ambassador"))
}

/// The bench's sections in their training pass, with `bin`.
fn train(bin: &Path) -> anyhow::Result<()> {
    bench::l4_tools()?;
    bench::use_binary(bin);
    let bins = Bins {
        main: bin.to_path_buf(),
        plain: None,
        plain_label: "no PGO",
    };
    eprintln!("xtask: PGO training: L4");
    bench::train_l4()?;
    eprintln!("xtask: PGO training: HTTP");
    bench::http::run(&bins, Pass::Train)?;
    eprintln!("xtask: PGO training: PostgreSQL");
    bench::postgres::run(Pass::Train)?;
    Ok(())
}

/// One line for a report: which ambassador build it measured.
pub fn described(bins: &Bins) -> String {
    match &bins.plain {
        Some(b) if bins.plain_label == "baseline" => format!(
            "ambassador: release build of this tree without PGO; `ambassador, baseline`: {}\n",
            b.display()
        ),
        Some(_) => "ambassador: release build with profile-guided optimisation (`cargo xtask build --pgo`: \
                    trained in the same set-ups on other traffic: HTTP POSTs with 4 KiB bodies and 300-byte\n\
                    answers, also over HTTP/2 both ways; pgbench TPC-B-like over the extended protocol; iperf3 reversed)\n"
            .into(),
        None => "ambassador: release build without PGO (`--no-pgo`)\n".into(),
    }
}
