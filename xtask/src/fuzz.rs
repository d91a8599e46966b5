//! `cargo xtask fuzz [TARGET] [--seconds N]`: coverage-guided fuzzing with
//! libFuzzer through cargo-fuzz (installed from crates.io when missing), on
//! the stable toolchain: `RUSTC_BOOTSTRAP=1` lets it pass its `-Z` flags
//! (no nightly is reachable from this machine's registries). The targets
//! (`fuzz/fuzz_targets/`) call `ambassador_userspace::fuzzing`, whose test
//! replays `fuzz/corpus/` and `fuzz/regressions/` in `cargo xtask test`; a
//! crash found here is copied into `fuzz/regressions/<target>/`, to be
//! committed with its fix.

use std::{collections::BTreeSet, path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{root, run_cmd};

pub const TARGETS: [&str; 7] = [
    "config",
    "http_request",
    "detect",
    "pg_startup",
    "pg_messages",
    "answers",
    "dns",
];

pub fn run(target: Option<&str>, seconds: u64) -> anyhow::Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target `{t}` (there are: {})", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    ensure_cargo_fuzz()?;
    crate::build_ebpf()?;
    let fuzz = root().join("fuzz");
    let mut found = Vec::new();
    for t in targets {
        let artifacts = fuzz.join("artifacts").join(t);
        let before = files(&artifacts);
        println!("xtask: fuzzing {t} for {seconds} s");
        let status = Command::new(crate::cargo())
            .current_dir(root())
            .env("RUSTC_BOOTSTRAP", "1")
            .args([
                "fuzz",
                "run",
                "--fuzz-dir",
                "fuzz",
                "--sanitizer",
                "address",
                t,
            ])
            .arg(fuzz.join("corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
            .status()
            .context("running cargo fuzz")?;
        let new: Vec<String> = files(&artifacts).difference(&before).cloned().collect();
        let keep = fuzz.join("regressions").join(t);
        std::fs::create_dir_all(&keep)?;
        for name in &new {
            std::fs::copy(artifacts.join(name), keep.join(name))?;
            found.push(format!("fuzz/regressions/{t}/{name}"));
        }
        if !status.success() && new.is_empty() {
            bail!("cargo fuzz run {t} failed ({status}) without a crash input: see above");
        }
        // Keep the corpus small enough to commit: the fewest inputs that
        // reach everything the grown one reaches.
        run_cmd(
            Command::new(crate::cargo())
                .current_dir(root())
                .env("RUSTC_BOOTSTRAP", "1")
                .args([
                    "fuzz",
                    "cmin",
                    "--fuzz-dir",
                    "fuzz",
                    "--sanitizer",
                    "address",
                    t,
                ])
                .arg(fuzz.join("corpus").join(t)),
        )
        .with_context(|| format!("minimising the {t} corpus"))?;
    }
    if !found.is_empty() {
        bail!(
            "crashes found; replayed by `cargo xtask test` from now on: {}",
            found.join(", ")
        );
    }
    println!("xtask: no crash (the corpus in fuzz/corpus/ grew with what was new)");
    Ok(())
}

fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let present = Command::new(crate::cargo())
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz (crates.io)");
    run_cmd(Command::new(crate::cargo()).args(["install", "cargo-fuzz", "--locked"]))
        .context("installing cargo-fuzz")
}
