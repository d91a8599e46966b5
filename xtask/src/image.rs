//! `cargo xtask image`: the runtime image of deploy/Dockerfile, built here,
//! offline, from a binary built here (no registry, no base image to pull).
//!
//! deploy/Dockerfile stays the description: the final stage's `USER`,
//! `ENTRYPOINT`, `CMD` and where it copies the binary are read from it. Its
//! base (distroless cc-debian12) is glibc, libgcc_s, CA certificates and the
//! passwd/group/nsswitch files, with no shell and no package manager; here
//! those come from this Debian host: the binary's shared libraries (`ldd`),
//! the CA bundle, and the same three files. The root filesystem goes to
//! `podman import` with the stage's settings as `--change`s, and with
//! `--save`, to an OCI archive that `kind load image-archive`, `ctr images
//! import` or `docker load` take.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use ambassador_tests::dockerfile::{self, Stage};
use anyhow::{Context as _, bail, ensure};

use crate::run_cmd;

/// The tag `cargo xtask image` gives: the manifests' image name.
pub fn default_tag() -> String {
    format!("localhost/ambassador:{}", env!("CARGO_PKG_VERSION"))
}

/// Files the distroless base has, as it has them: root and nonroot users,
/// name lookups from files then DNS.
const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n\
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n";
const NSSWITCH: &str = "passwd: files\ngroup: files\nhosts: files dns\n";
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The final stage of deploy/Dockerfile.
pub fn runtime_stage() -> anyhow::Result<Stage> {
    let path = crate::root().join("deploy/Dockerfile");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let stages =
        dockerfile::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    stages
        .last()
        .cloned()
        .context("deploy/Dockerfile has no stage")
}

/// Builds the image from `binary` as `tag` in podman's local storage.
pub fn build(binary: &Path, tag: &str) -> anyhow::Result<()> {
    let stage = runtime_stage()?;
    let dir = crate::root().join("target/image");
    let rootfs = dir.join("rootfs");
    if rootfs.exists() {
        fs::remove_dir_all(&rootfs).context("clearing target/image/rootfs")?;
    }
    fs::create_dir_all(&rootfs)?;
    let dest = binary_dest(&stage)?;
    let in_image = rootfs.join(dest.trim_start_matches('/'));
    fs::create_dir_all(in_image.parent().expect("an absolute path has a parent"))?;
    // Debug info is for debuggers, not for the image (a debug build's is most of it).
    run_cmd(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(binary)
            .arg(&in_image),
    )
    .context("copying the binary")?;
    for lib in shared_libraries(binary)? {
        copy_into(&rootfs, &lib)?;
    }
    copy_into(&rootfs, Path::new(CA_BUNDLE))?;
    for (path, text) in [
        ("etc/passwd", PASSWD),
        ("etc/group", GROUP),
        ("etc/nsswitch.conf", NSSWITCH),
    ] {
        fs::create_dir_all(rootfs.join("etc"))?;
        fs::write(rootfs.join(path), text)?;
    }
    for d in ["tmp", "home/nonroot"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    run_cmd(Command::new("chmod").arg("1777").arg(rootfs.join("tmp")))?;
    let tar = dir.join("rootfs.tar");
    run_cmd(
        Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    )
    .context("packing the root filesystem")?;
    let before = image_id(tag);
    let mut import = Command::new("podman");
    import.args(["import", "--quiet"]);
    for change in changes(&stage)? {
        import.arg("--change").arg(change);
    }
    import
        .arg(&tar)
        .arg(tag)
        .stdout(std::process::Stdio::null());
    run_cmd(&mut import).context("podman import")?;
    let _ = fs::remove_file(&tar);
    // The tag moved: the image it named would stay behind, untagged, at
    // every build (the test suite builds one each run).
    if let Some(old) = before.filter(|old| image_id(tag).as_ref() != Some(old)) {
        let _ = Command::new("podman")
            .args(["rmi", "--force", &old])
            .output();
    }
    Ok(())
}

/// The image `tag` names now, if any.
fn image_id(tag: &str) -> Option<String> {
    let out = Command::new("podman")
        .args(["image", "inspect", "--format", "{{.Id}}", tag])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Writes the image as an OCI archive; returns its path.
pub fn save(tag: &str) -> anyhow::Result<PathBuf> {
    let out = crate::root().join(format!(
        "target/image/ambassador-{}.oci.tar",
        env!("CARGO_PKG_VERSION")
    ));
    let _ = fs::remove_file(&out);
    run_cmd(
        Command::new("podman")
            .args(["save", "--quiet", "--format", "oci-archive", "-o"])
            .arg(&out)
            .arg(tag),
    )
    .context("podman save")?;
    Ok(out)
}

/// Where the final stage puts the binary (the one `COPY --from=` a stage).
fn binary_dest(stage: &Stage) -> anyhow::Result<String> {
    let copies: Vec<_> = stage.copies.iter().filter(|c| c.from.is_some()).collect();
    match copies.as_slice() {
        [c] if c.dest.starts_with('/') && !c.dest.ends_with('/') => Ok(c.dest.clone()),
        _ => bail!(
            "deploy/Dockerfile: the final stage should copy one file, the binary, from the build \
             stage to an absolute path; it copies {:?}",
            stage.copies
        ),
    }
}

/// The Dockerfile stage's settings as `podman import --change`s.
fn changes(stage: &Stage) -> anyhow::Result<Vec<String>> {
    let user = stage
        .user
        .as_deref()
        .context("deploy/Dockerfile: the final stage has no USER")?;
    let as_json = |v: Vec<String>| serde_json::to_string(&v).expect("strings serialize");
    let entrypoint = stage.entrypoint_argv().map_err(anyhow::Error::msg)?;
    let cmd = stage.cmd_argv().map_err(anyhow::Error::msg)?;
    Ok(vec![
        format!("USER {user}"),
        format!("ENTRYPOINT {}", as_json(entrypoint)),
        format!("CMD {}", as_json(cmd)),
        // What distroless sets; the binary needs no more.
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    ])
}

/// The shared libraries `binary` loads, the dynamic loader included.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot run ldd")?;
    ensure!(out.status.success(), "ldd {} failed", binary.display());
    let libs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect();
    ensure!(
        !libs.is_empty(),
        "ldd lists no libraries for {}",
        binary.display()
    );
    Ok(libs)
}

/// Copies a host file (following links) to the same path under `rootfs`.
fn copy_into(rootfs: &Path, file: &Path) -> anyhow::Result<()> {
    let to = rootfs.join(file.strip_prefix("/").unwrap_or(file));
    fs::create_dir_all(to.parent().expect("a file has a parent"))?;
    fs::copy(file, &to).with_context(|| format!("copying {}", file.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dockerfiles_runtime_stage_gives_the_import_settings() {
        let stage = runtime_stage().unwrap();
        assert_eq!(binary_dest(&stage).unwrap(), "/usr/local/bin/ambassador");
        let c = changes(&stage).unwrap();
        assert_eq!(c[0], "USER 1337:1337");
        assert_eq!(c[1], r#"ENTRYPOINT ["/usr/local/bin/ambassador"]"#);
        assert_eq!(
            c[2],
            r#"CMD ["proxy","--config","/etc/ambassador/config.yaml"]"#
        );
    }
}
