//! Finding or installing what the eBPF build and the tests need.
//!
//! The eBPF crate needs `-Z build-std=core` for `bpfel-unknown-none`, hence a
//! compiler with its standard library source: a rustup nightly with rust-src
//! where one exists (the usual developer laptop), otherwise Debian's
//! `rustc-web` + `rust-web-src` with RUSTC_BOOTSTRAP. The linker is
//! `bpf-linker` built against Debian's LLVM 22.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail, ensure};

use crate::run_cmd;

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";
const LLVM_MAJOR: &str = "22";

/// How to invoke cargo for the eBPF crate.
pub enum BpfToolchain {
    Nightly,
    Debian,
}

impl BpfToolchain {
    pub fn cargo(&self) -> Command {
        let mut c = Command::new("cargo");
        // Flags meant for host builds must not leak into the BPF build.
        for v in [
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "RUSTC_WRAPPER",
            "RUSTC",
            "RUSTDOC",
        ] {
            c.env_remove(v);
        }
        match self {
            BpfToolchain::Nightly => {
                c.env("RUSTUP_TOOLCHAIN", "nightly");
            }
            BpfToolchain::Debian => {
                c.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
            }
        }
        c
    }
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn nightly_with_src() -> bool {
    // Ask rustup what is installed first: naming a toolchain it lacks may make
    // it try to download one, which this network does not allow.
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|l| l.lines().any(|t| t.starts_with("nightly")));
    if !installed {
        return false;
    }
    let Some(sysroot) = output(
        Command::new("rustc")
            .env("RUSTUP_TOOLCHAIN", "nightly")
            .args(["--print", "sysroot"]),
    ) else {
        return false;
    };
    Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .is_dir()
}

fn debian_ready() -> bool {
    Path::new(DEBIAN_RUSTC).exists() && Path::new(DEBIAN_RUST_SRC).is_dir()
}

static APT_UPDATED: std::sync::Once = std::sync::Once::new();

/// Installs Debian packages that are not installed yet.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {} (apt-get)", missing.join(" "));
    let mut update = Ok(());
    APT_UPDATED.call_once(|| {
        update = run_cmd(Command::new("apt-get").args(["update", "-qq"]));
    });
    update.context("apt-get update")?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("installing {}", missing.join(" ")))
}

/// Debian's multiarch triplet for this machine (`x86_64-linux-gnu`,
/// `aarch64-linux-gnu`): where its shared libraries are.
pub fn multiarch() -> String {
    output(Command::new("gcc").arg("-print-multiarch"))
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| format!("{}-linux-gnu", std::env::consts::ARCH))
}

/// The directory bpf-linker's build wants as LLVM_PREFIX: `lib/libLLVM.so`
/// pointing at Debian's shared LLVM.
fn llvm_prefix() -> anyhow::Result<PathBuf> {
    let libdir = Path::new("/usr/lib").join(multiarch());
    let libdir = libdir.as_path();
    let lib = std::fs::read_dir(libdir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{LLVM_MAJOR}")))
        })
        .min()
        .with_context(|| format!("no libLLVM.so.{LLVM_MAJOR}* in {}", libdir.display()))?;
    let prefix = crate::root().join("target/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)?;
    Ok(prefix)
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join("bin").join(name)
}

fn bpf_linker_ok() -> bool {
    quiet_ok(Command::new("bpf-linker").arg("--version"))
        || quiet_ok(Command::new(cargo_bin("bpf-linker")).arg("--version"))
}

/// Makes sure the eBPF crate can be built; installs what is missing.
pub fn ensure_bpf() -> anyhow::Result<BpfToolchain> {
    let tc = if nightly_with_src() {
        BpfToolchain::Nightly
    } else {
        if !debian_ready() {
            apt_install(&["rustc-web", "rust-web-src"])?;
            if !debian_ready() {
                bail!("rustc-web / rust-web-src installed but {DEBIAN_RUST_SRC} is missing");
            }
        }
        BpfToolchain::Debian
    };
    if !bpf_linker_ok() {
        apt_install(&[&format!("libllvm{LLVM_MAJOR}")])?;
        let prefix = llvm_prefix()?;
        eprintln!(
            "xtask: installing bpf-linker 0.13 against LLVM {LLVM_MAJOR} (cargo install, a few minutes)"
        );
        run_cmd(
            Command::new(crate::cargo())
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    "^0.13",
                    "--locked",
                    "--no-default-features",
                    "--features",
                    &format!("llvm-{LLVM_MAJOR}"),
                ])
                .env("LLVM_PREFIX", &prefix),
        )
        .context("installing bpf-linker")?;
    }
    Ok(tc)
}

/// What the simulated-Pod tests and the demo drive: unmodified clients and
/// network tools.
pub fn ensure_test_tools() -> anyhow::Result<()> {
    apt_install(&[
        "curl",
        "python3",
        "iproute2",
        "util-linux",
        "bpftool",
        "openssl",
        // The config schema test validates the examples with these.
        "python3-jsonschema",
        "python3-yaml",
        // The database ambassador's tests: real servers, psql, python drivers.
        "postgresql",
        "postgresql-client",
        "python3-psycopg",
        "python3-asyncpg",
        // Drivers that prepare statements by default: JDBC (run from source
        // by the JDK), pgx v4 (built offline from Debian's Go sources).
        "openjdk-17-jdk-headless",
        "libpostgresql-jdbc-java",
        "golang-go",
        "golang-github-jackc-pgx-v4-dev",
        // Transcoding: the descriptor sets users make, and the tests' tonic
        // server generated from the same .proto (tests/build.rs).
        "protobuf-compiler",
        // DNS capture: a real resolver in a test namespace, and dig.
        "dnsmasq-base",
        "bind9-dnsutils",
    ])
}

/// podman, to build the image (`cargo xtask image`) and run real Pods in the
/// container tests, with runc (Debian's crun refuses hybrid cgroup hosts) and
/// catatonit (the pause process of the pods' infra containers, built locally).
pub fn ensure_podman() -> anyhow::Result<()> {
    apt_install(&["podman", "runc", "catatonit"])
}

/// The pinned offline Kubernetes validator for the deploy tests.
const K8S_VALIDATE: &str = "kubernetes-validate";
const K8S_VALIDATE_VERSION: &str = "1.37.0";

/// The offline Kubernetes schema validator the deploy tests run on every
/// manifest and on `ambassador inject`'s output: kubernetes-validate from PyPI
/// (it bundles the API's JSON schemas for many Kubernetes versions; no cluster,
/// no download at test time), in a venv under target/ so the system Python
/// stays untouched. Returns the command.
pub fn ensure_k8s_validator() -> anyhow::Result<PathBuf> {
    let venv = crate::root().join("target/k8s-venv");
    let bin = venv.join("bin").join(K8S_VALIDATE);
    if output(Command::new(&bin).arg("--version")).as_deref() == Some(K8S_VALIDATE_VERSION) {
        return Ok(bin);
    }
    apt_install(&["python3-venv"])?;
    eprintln!("xtask: installing {K8S_VALIDATE} {K8S_VALIDATE_VERSION} (pip, in target/k8s-venv)");
    run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("creating target/k8s-venv")?;
    run_cmd(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("{K8S_VALIDATE}=={K8S_VALIDATE_VERSION}"),
    ]))
    .with_context(|| format!("installing {K8S_VALIDATE}"))?;
    Ok(bin)
}

/// The HTTP benchmark's load generator: oha, from crates.io (it holds a fixed
/// rate and corrects latency for coordinated omission, which Debian's wrk
/// does not). Returns how to run it.
pub fn ensure_oha() -> anyhow::Result<PathBuf> {
    let installed = cargo_bin("oha");
    for candidate in [PathBuf::from("oha"), installed.clone()] {
        if quiet_ok(Command::new(&candidate).arg("--version")) {
            return Ok(candidate);
        }
    }
    eprintln!("xtask: installing oha 1.16 (cargo install, a few minutes)");
    run_cmd(Command::new(crate::cargo()).args([
        "install",
        "oha",
        "--locked",
        "--version",
        "^1.16",
    ]))
    .context("installing oha")?;
    Ok(installed)
}

/// `llvm-profdata` of the host toolchain's own LLVM (rustup's `llvm-tools`
/// component), for the PGO build: a profile must be merged by the LLVM that
/// will read it.
pub fn ensure_llvm_profdata() -> anyhow::Result<PathBuf> {
    let sysroot = PathBuf::from(rustc(&["--print", "sysroot"])?.trim());
    let tool = sysroot
        .join("lib/rustlib")
        .join(host_triple()?)
        .join("bin/llvm-profdata");
    if !tool.is_file() {
        eprintln!("xtask: installing rustup's llvm-tools component (llvm-profdata)");
        run_cmd(Command::new("rustup").args(["component", "add", "llvm-tools"]))
            .context("installing llvm-tools (`rustup component add llvm-tools`)")?;
    }
    ensure!(
        tool.is_file(),
        "{} missing after installing llvm-tools",
        tool.display()
    );
    Ok(tool)
}

/// The host's target triple, as rustc names it.
pub fn host_triple() -> anyhow::Result<String> {
    rustc(&["-vV"])?
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_string())
        .context("no host line in `rustc -vV`")
}

/// What the host rustc prints for `args`.
fn rustc(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("rustc")
        .args(args)
        .output()
        .context("cannot run rustc")?;
    ensure!(out.status.success(), "rustc {args:?} failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_multiarch_triplet_names_this_machines_library_directory() {
        let t = super::multiarch();
        assert!(t.starts_with(std::env::consts::ARCH), "{t}");
        assert!(std::path::Path::new("/usr/lib").join(&t).is_dir(), "{t}");
    }
}
