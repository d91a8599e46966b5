//! `cargo xtask build|run|test|bench`: everything from a fresh machine to a
//! tested binary, installing what is missing on the way (idempotently: a second
//! run checks, finds everything, and says nothing).

mod bench;
mod demo;
mod fuzz;
mod image;
#[cfg(test)]
mod layers;
mod pgo;
mod soak;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the BPF toolchain if missing, build the eBPF programs and the `ambassador` binary.
    Build {
        /// Build the userspace binary in debug mode (the eBPF object is always optimised).
        #[arg(long, conflicts_with = "pgo")]
        debug: bool,
        /// Also build the profile-guided release binary (root: its training runs the
        /// bench's ambassador workloads in a simulated Pod; ~10 min), in target/pgo.
        #[arg(long)]
        pgo: bool,
    },
    /// The runtime image of deploy/Dockerfile, built offline with podman from the
    /// release binary (or the PGO one): into podman's local storage, and with
    /// `--save` to an OCI archive in target/image/ for `kind load image-archive`.
    Image {
        /// Build from the profile-guided binary (root; builds it if needed, ~10 min).
        #[arg(long, conflicts_with = "binary")]
        pgo: bool,
        /// Build from this binary instead of building one.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// The image's name.
        #[arg(long)]
        tag: Option<String>,
        /// Also write target/image/ambassador-VERSION.oci.tar.
        #[arg(long)]
        save: bool,
    },
    /// Demo: a local upstream, an unmodified curl under `ambassador run`, the redirect and counters.
    Run,
    /// The whole test suite: fmt, clippy (warnings denied), unit and simulated-Pod tests (root).
    Test {
        /// Extra arguments for `cargo test` (a filter, `--nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks: redirect vs direct vs iptables REDIRECT to the same proxy; relay throughput
    /// through ambassador vs nginx stream vs HAProxy mode tcp vs direct;
    /// HTTP through ambassador vs HAProxy vs nginx vs direct, out of the Pod and into it (TLS
    /// termination + JWT); pgbench through ambassador vs
    /// PgBouncer vs direct; ratios.
    Bench {
        /// Run one section only (`relay`, `http`, `inbound`, `transcode`, `postgres` or `dns`).
        #[arg(long, value_parser = ["relay", "http", "inbound", "transcode", "postgres", "dns"])]
        only: Option<String>,
        /// Measure the plain release build only, skipping the PGO build (and its
        /// no-PGO comparison row).
        #[arg(long)]
        no_pgo: bool,
        /// Measure the plain release build beside this earlier binary (its rows
        /// say `baseline`), in the same rounds; implies no PGO build.
        #[arg(long, value_name = "BINARY")]
        baseline: Option<PathBuf>,
    },
    /// Coverage-guided fuzzing (libFuzzer, via cargo-fuzz) of the parsers that take
    /// bytes from files, the app or servers; crashes land in fuzz/regressions/,
    /// which the test suite replays.
    Fuzz {
        /// One target (config, http_request, detect, pg_startup, pg_messages); default: all.
        target: Option<String>,
        /// How long to fuzz each target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Mixed HTTP/TCP/PostgreSQL traffic through one proxy with endpoint kills and
    /// reloads on a schedule; reports errors, RSS and open files over time (not in CI).
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Soak this binary instead of building the release one.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    #[command(name = "__echo", hide = true)]
    Echo { addr: String, threads: usize },
    #[command(name = "__connect", hide = true)]
    Connect {
        addr: String,
        each: usize,
        threads: usize,
    },
    #[command(name = "__dns", hide = true)]
    Dns {
        addr: String,
        name: String,
        each: usize,
        threads: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Build { debug, pgo: false } => build(!debug).map(|_| ()),
        Cmd::Build { pgo: true, .. } => build(true).and_then(|_| pgo::build()).map(|_| ()),
        Cmd::Image {
            pgo,
            binary,
            tag,
            save,
        } => image(pgo, binary, tag, save),
        Cmd::Run => build(true).and_then(|bin| demo::run(&bin)),
        Cmd::Test { args } => test(&args),
        Cmd::Bench {
            only,
            no_pgo,
            baseline,
        } => bench_bins(no_pgo, baseline).and_then(|bins| match only {
            None => bench::run(&bins),
            Some(s) => bench::run_section(&bins, &s),
        }),
        Cmd::Fuzz { target, seconds } => fuzz::run(target.as_deref(), seconds),
        Cmd::Soak { minutes, binary } => match binary {
            Some(bin) => soak::run(&bin, minutes),
            None => build(true).and_then(|bin| soak::run(&bin, minutes)),
        },
        Cmd::Echo { addr, threads } => bench::echo_server(&addr, threads),
        Cmd::Connect {
            addr,
            each,
            threads,
        } => bench::connect_client(&addr, each, threads),
        Cmd::Dns {
            addr,
            name,
            each,
            threads,
        } => bench::dns_client(&addr, &name, each, threads),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command, failing with its name when it fails.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Builds the eBPF object and the binary; returns the binary's path.
fn build(release: bool) -> anyhow::Result<PathBuf> {
    build_ebpf()?;
    let root = root();
    let mut user = Command::new(cargo());
    user.current_dir(&root)
        .args(["build", "--package", "ambassador-userspace"]);
    if release {
        user.arg("--release");
    }
    run_cmd(&mut user).context("building ambassador")?;
    // Where cargo put it: CARGO_TARGET_DIR when set (else a stale binary in
    // target/ would be tested).
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target
        .join(if release { "release" } else { "debug" })
        .join("ambassador"))
}

/// The eBPF object (installing its toolchain if missing), which the
/// userspace crate embeds.
pub fn build_ebpf() -> anyhow::Result<()> {
    let bpf = toolchain::ensure_bpf()?;
    let root = root();
    let mut ebpf = bpf.cargo();
    ebpf.current_dir(root.join("ambassador-ebpf"))
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .env("CARGO_TARGET_DIR", root.join("target/bpf"))
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf");
    run_cmd(&mut ebpf).context("building the eBPF programs")
}

/// The binaries `cargo xtask bench` measures: the PGO build and the plain one
/// beside it, or the plain one alone.
fn bench_bins(no_pgo: bool, baseline: Option<PathBuf>) -> anyhow::Result<bench::Bins> {
    let plain = build(true)?;
    Ok(match (baseline, no_pgo) {
        // The current build beside an earlier one, in the same rounds.
        (Some(b), _) => bench::Bins {
            main: plain,
            plain: Some(b),
            plain_label: "baseline",
        },
        (None, true) => bench::Bins {
            main: plain,
            plain: None,
            plain_label: "no PGO",
        },
        (None, false) => bench::Bins {
            main: pgo::build()?,
            plain: Some(plain),
            plain_label: "no PGO",
        },
    })
}

/// `cargo xtask image`.
fn image(
    pgo: bool,
    binary: Option<PathBuf>,
    tag: Option<String>,
    save: bool,
) -> anyhow::Result<()> {
    let bin = match (binary, pgo) {
        (Some(b), _) => b,
        (None, true) => build(true).and_then(|_| pgo::build())?,
        (None, false) => build(true)?,
    };
    toolchain::ensure_podman()?;
    let tag = tag.unwrap_or_else(image::default_tag);
    image::build(&bin, &tag)?;
    println!("xtask: image {tag} (from {})", bin.display());
    if save {
        println!("xtask: saved as {}", image::save(&tag)?.display());
    }
    Ok(())
}

/// The image the container tests run, from the binary under test.
const TEST_IMAGE: &str = "localhost/ambassador:test";

/// The cargo that runs xtask (rustup's stable), for host builds.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the test suite attaches eBPF programs to cgroups and creates network namespaces: run it as root"
        );
    }
    let bin = build(false)?;
    toolchain::ensure_test_tools()?;
    let k8s_validate = toolchain::ensure_k8s_validator()?;
    toolchain::ensure_podman()?;
    image::build(&bin, TEST_IMAGE).context("building the container tests' image")?;
    let root = root();
    run_cmd(
        Command::new(cargo())
            .current_dir(&root)
            .args(["fmt", "--all", "--check"]),
    )
    .context("formatting (run `cargo fmt --all`)")?;
    run_cmd(
        Command::new(cargo())
            .current_dir(root.join("ambassador-ebpf"))
            .args(["fmt", "--check"]),
    )
    .context("formatting of ambassador-ebpf (run `cargo fmt` there)")?;
    run_cmd(Command::new(cargo()).current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy")?;
    let mut cargo_test = Command::new(cargo());
    cargo_test
        .current_dir(&root)
        .args(["test", "--workspace"])
        .args(extra)
        .env("AMBASSADOR_BIN", &bin)
        .env("AMBASSADOR_K8S_VALIDATE", &k8s_validate)
        .env("AMBASSADOR_IMAGE", TEST_IMAGE);
    let (passed, failed, ignored) = run_counting(&mut cargo_test).context("tests")?;
    // cargo prints one result line per test binary, the last often "0 passed"
    // (doc-tests): close with the total.
    println!("xtask: {passed} passed, {failed} failed, {ignored} skipped");
    if failed > 0 {
        bail!("{failed} test(s) failed");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and adds up its result lines.
fn run_counting(cmd: &mut Command) -> anyhow::Result<(u64, u64, u64)> {
    use std::io::{BufRead, BufReader};
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split([';', '.']) {
                let mut w = part.split_whitespace();
                if let (Some(n), Some(what)) = (w.next(), w.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("{shown} failed ({status})");
    }
    Ok((passed, failed, ignored))
}
