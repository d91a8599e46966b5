//! Real containers for the container tests: podman (with runc, as this host's
//! hybrid cgroup layout needs), the images they run, and a container of a
//! Kubernetes Pod spec run the way a kubelet would run it, for what podman
//! 4.3's `kube play` cannot do (native sidecars, `subPathExpr`).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_yaml_ng::Value;

use crate::process::{stderr, stdout, workspace};

/// podman's settings for the tests, written once: runc (crun refuses hybrid
/// cgroups), cgroupfs (no systemd here), ulimits this sandbox may set, logs
/// in files podman can read back.
pub fn podman_conf() -> PathBuf {
    let dir = workspace().join("target/containers");
    fs::create_dir_all(&dir).expect("create target/containers");
    let conf = dir.join("containers.conf");
    fs::write(
        &conf,
        "[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
         [containers]\nlog_driver = \"k8s-file\"\n\
         default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n",
    )
    .expect("write containers.conf");
    conf
}

/// `podman ARGS` with the tests' settings.
pub fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .env("CONTAINERS_CONF", podman_conf())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run podman (cargo xtask test installs it): {e}"))
}

/// `podman ARGS`, which must succeed; its stdout, trimmed.
pub fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?} failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out).trim().to_string()
}

/// The ambassador image under test: `cargo xtask test` builds it from the
/// binary under test (`cargo xtask image`'s way) and names it here.
pub fn ambassador_image() -> String {
    let tag = std::env::var("AMBASSADOR_IMAGE")
        .expect("AMBASSADOR_IMAGE is not set: run the tests through `cargo xtask test`, which builds the image");
    podman_ok(&["image", "exists", &tag]);
    tag
}

/// An app image with unmodified Debian clients (curl, sh, sleep) and the
/// libraries they load, made from this host's files: no registry here.
pub fn app_image() -> String {
    let tag = "localhost/ambassador-test-app:1".to_string();
    let dir = workspace().join("target/containers/app-rootfs");
    let _ = fs::remove_dir_all(&dir);
    for program in ["/usr/bin/curl", "/usr/bin/sh", "/usr/bin/sleep"] {
        copy_with_libraries(&dir, Path::new(program));
    }
    let tar = dir.with_extension("tar");
    let out = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&dir)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .output()
        .expect("run tar");
    assert!(out.status.success(), "tar: {}", stderr(&out));
    let before = podman(&["image", "inspect", "--format", "{{.Id}}", &tag]);
    let new = podman_ok(&[
        "import",
        "--quiet",
        "--change",
        "ENV PATH=/usr/bin:/bin",
        tar.to_str().unwrap(),
        &tag,
    ]);
    // The image the tag named before would stay behind, untagged.
    let old = stdout(&before).trim().to_string();
    if before.status.success() && !new.contains(&old) {
        let _ = podman(&["rmi", "--force", &old]);
    }
    tag
}

fn copy_with_libraries(root: &Path, program: &Path) {
    let out = Command::new("ldd").arg(program).output().expect("run ldd");
    let libs = stdout(&out);
    let files = libs
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .chain([program.to_path_buf()]);
    for f in files {
        let to = root.join(f.strip_prefix("/").unwrap());
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(&f, &to).unwrap_or_else(|e| panic!("copy {}: {e}", f.display()));
    }
}

/// Where each volume of a Pod spec comes from on this host, as the kubelet
/// would provide it.
pub enum Source {
    /// A directory (a hostPath; a ConfigMap or Secret the test wrote out).
    Dir(PathBuf),
    /// An emptyDir in memory.
    Tmpfs,
}

/// `podman run` arguments for one container of a Pod spec, translated field
/// by field as a kubelet applies them: `$(VAR)` in `subPathExpr` expanded
/// from the container's env, `fieldRef: metadata.uid` from `pod_uid`.
/// A field it does not know stops the test: nothing in the manifests goes
/// unapplied without a word.
pub fn run_args(c: &Value, pod_volumes: &BTreeMap<String, Source>, pod_uid: &str) -> Vec<String> {
    let name = c["name"].as_str().expect("container name");
    let mut args: Vec<String> = Vec::new();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for e in c["env"].as_sequence().into_iter().flatten() {
        let value = match (
            &e["value"],
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Value::String(v), _) => v.clone(),
            (_, Some("metadata.uid")) => pod_uid.to_string(),
            other => panic!("{name}: env {:?}: not translated ({other:?})", e["name"]),
        };
        let key = e["name"].as_str().unwrap().to_string();
        args.extend(["--env".into(), format!("{key}={value}")]);
        env.insert(key, value);
    }
    for (k, v) in c.as_mapping().expect("a container is a mapping") {
        match k.as_str().unwrap() {
            "name" | "image" | "args" | "env" | "volumeMounts" => {}
            // The test runs the probes' commands itself, and restarts.
            "startupProbe" | "readinessProbe" | "livenessProbe" | "restartPolicy" => {}
            // Declared for the Pod's network, which its containers share.
            "ports" => {}
            "resources" => {
                if let Some(m) = v["limits"]["memory"].as_str() {
                    let mib = m.strip_suffix("Mi").expect("memory limit in Mi");
                    args.push(format!("--memory={mib}m"));
                }
            }
            "securityContext" => args.extend(security_args(name, v)),
            other => panic!("{name}: field {other} is not translated to podman"),
        }
    }
    for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
        args.push(mount_arg(name, m, pod_volumes, &env));
    }
    args.push(c["image"].as_str().expect("image").to_string());
    for a in c["args"].as_sequence().into_iter().flatten() {
        let a = a.as_str().expect("string args");
        assert!(!a.contains("$("), "{name}: args need expanding: {a}");
        args.push(a.to_string());
    }
    args
}

fn security_args(name: &str, sc: &Value) -> Vec<String> {
    let mut args = Vec::new();
    let uid = sc["runAsUser"].as_u64();
    for (k, v) in sc.as_mapping().expect("securityContext is a mapping") {
        match (k.as_str().unwrap(), v) {
            ("runAsUser", _) => {
                let gid = sc["runAsGroup"].as_u64().unwrap_or(0);
                args.push(format!("--user={}:{gid}", uid.unwrap()));
            }
            ("runAsGroup", _) => {}
            ("runAsNonRoot", Value::Bool(true)) => {
                assert!(uid.is_some_and(|u| u != 0), "{name}: runAsNonRoot as root")
            }
            ("runAsNonRoot", Value::Bool(false)) => {}
            ("allowPrivilegeEscalation", Value::Bool(false)) => {
                args.push("--security-opt=no-new-privileges".into())
            }
            // podman's --read-only adds writable tmpfs mounts Kubernetes does not.
            ("readOnlyRootFilesystem", Value::Bool(true)) => {
                args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()])
            }
            ("capabilities", caps) => {
                for d in caps["drop"].as_sequence().into_iter().flatten() {
                    args.push(format!("--cap-drop={}", d.as_str().unwrap()));
                }
                for a in caps["add"].as_sequence().into_iter().flatten() {
                    args.push(format!("--cap-add={}", a.as_str().unwrap()));
                }
            }
            ("seccompProfile", p) => match p["type"].as_str() {
                Some("RuntimeDefault") => {}
                Some("Unconfined") => args.push("--security-opt=seccomp=unconfined".into()),
                other => panic!("{name}: seccompProfile {other:?} not translated"),
            },
            (other, v) => panic!("{name}: securityContext.{other}: {v:?} not translated"),
        }
    }
    args
}

fn mount_arg(
    name: &str,
    m: &Value,
    volumes: &BTreeMap<String, Source>,
    env: &BTreeMap<String, String>,
) -> String {
    let vol = m["name"].as_str().unwrap();
    let to = m["mountPath"].as_str().unwrap();
    let ro = m["readOnly"] == true;
    let sub = match (m["subPath"].as_str(), m["subPathExpr"].as_str()) {
        (Some(s), _) => s.to_string(),
        (None, Some(expr)) => expand(expr, env),
        (None, None) => String::new(),
    };
    match volumes.get(vol) {
        Some(Source::Dir(dir)) => {
            let from = dir.join(sub);
            assert!(
                from.exists(),
                "{name}: volume {vol}: {} missing",
                from.display()
            );
            format!(
                "--volume={}:{to}{}",
                from.display(),
                if ro { ":ro" } else { "" }
            )
        }
        Some(Source::Tmpfs) => {
            format!("--mount=type=tmpfs,destination={to},tmpfs-size=1m,tmpfs-mode=0777")
        }
        None => panic!("{name}: volume {vol} is not provided"),
    }
}

/// `$(VAR)` references replaced from `env`, as the kubelet does.
fn expand(expr: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find(')').expect("closed $(") + i;
        let var = &rest[i + 2..end];
        out.push_str(
            env.get(var)
                .unwrap_or_else(|| panic!("$({var}) is not in env")),
        );
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}
