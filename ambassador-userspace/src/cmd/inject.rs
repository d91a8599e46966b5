//! `ambassador inject`: Kubernetes workloads in, the same with the
//! ambassador added out (see [`crate::inject`]).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;

use crate::inject;

#[derive(clap::Args)]
pub struct Args {
    /// The manifests (several documents, any kinds); `-` or none: stdin.
    file: Option<PathBuf>,
    /// Write here instead of stdout.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// The ambassador image for both containers.
    #[arg(long, default_value = inject::DEFAULT_IMAGE)]
    image: String,
    /// The ConfigMap holding `config.yaml` (a Pod annotation can override it).
    #[arg(long, default_value = inject::DEFAULT_CONFIG_MAP)]
    config_map: String,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let (name, text) = match &args.file {
        Some(p) if p.as_os_str() != "-" => (
            p.display().to_string(),
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        ),
        _ => {
            let mut t = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
                .context("cannot read stdin")?;
            ("stdin".to_string(), t)
        }
    };
    let opts = inject::Options {
        image: args.image,
        config_map: args.config_map,
    };
    let out = inject::inject(&text, &opts).with_context(|| name.clone())?;
    for line in &out.report {
        eprintln!("{line}");
    }
    match args.output {
        Some(p) => std::fs::write(&p, &out.text)
            .with_context(|| format!("cannot write {}", p.display()))?,
        None => print!("{}", out.text),
    }
    Ok(ExitCode::SUCCESS)
}
