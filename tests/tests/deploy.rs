//! The deploy/ material, checked without a cluster or a container engine: the
//! Dockerfile against the repository and the manifests, every manifest and
//! `ambassador inject`'s output against the Kubernetes API schemas
//! (kubernetes-validate, offline, strict: unknown fields are errors).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use ambassador_tests::*;
use serde::Deserialize as _;
use serde_yaml_ng::Value;

/// Native sidecars (`restartPolicy: Always` on an init container): on by
/// default from 1.29, GA in 1.33. Both are checked.
const KUBERNETES: [&str; 2] = ["1.29", "1.33"];

fn validator() -> PathBuf {
    let p = std::env::var_os("AMBASSADOR_K8S_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/k8s-venv/bin/kubernetes-validate"));
    assert!(
        p.is_file(),
        "{} not found: `cargo xtask test` installs it (pip, in target/k8s-venv)",
        p.display()
    );
    p
}

/// Validates a file (or stdin, with `-`) for one Kubernetes version.
fn validate(version: &str, file: &Path, stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(validator());
    cmd.args(["--strict", "--no-warn", "-k", version])
        .arg(file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run kubernetes-validate");
    let mut input = child.stdin.take().expect("piped");
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .expect("write stdin");
    drop(input);
    child
        .wait_with_output()
        .expect("kubernetes-validate output")
}

fn text_of(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[test]
fn every_manifest_in_deploy_passes_the_kubernetes_schemas() {
    let mut files = Vec::new();
    yaml_files(&workspace().join("deploy"), &mut files);
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    for file in &files {
        let resources = documents(&fs::read_to_string(file).unwrap()).len();
        for v in KUBERNETES {
            let out = validate(v, file, None);
            let text = text_of(&out);
            assert!(out.status.success(), "{}: {text}", file.display());
            // One "passed" line per resource: nothing was skipped as unknown.
            assert_eq!(
                text.matches(" passed for resource ").count(),
                resources,
                "{}: {text}",
                file.display()
            );
        }
    }
}

#[test]
fn the_validator_rejects_what_the_api_server_would() {
    let shipped =
        fs::read_to_string(workspace().join("deploy/kubernetes/deployment.yaml")).unwrap();
    let dir = std::env::temp_dir().join(format!("amb-k8s-neg-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            // A misspelled field.
            shipped.replacen("readOnlyRootFilesystem", "readOnlyRootFileSystem", 1),
            "1.29",
            "'readOnlyRootFileSystem' was unexpected",
        ),
        (
            // A wrong type.
            shipped.replace("runAsUser: 1337", "runAsUser: proxy"),
            "1.29",
            "'proxy' is not of type 'integer'",
        ),
        (
            // The native sidecar on a Kubernetes without them.
            shipped.clone(),
            "1.27",
            "'restartPolicy' was unexpected",
        ),
    ];
    for (i, (text, version, want)) in cases.into_iter().enumerate() {
        assert!(i == 2 || text != shipped, "case {i} changed nothing");
        let file = dir.join(format!("case{i}.yaml"));
        fs::write(&file, text).unwrap();
        let out = validate(version, &file, None);
        let text = text_of(&out);
        assert!(!out.status.success(), "case {i} passed: {text}");
        assert!(text.contains(want), "case {i}: {text}");
    }
    let _ = fs::remove_dir_all(&dir);
}

fn inject(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(bin())
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ambassador inject");
    let mut input = child.stdin.take().expect("piped");
    input.write_all(stdin.as_bytes()).expect("write stdin");
    drop(input);
    child.wait_with_output().expect("inject output")
}

#[test]
fn inject_output_passes_the_schemas_and_a_second_inject_changes_nothing() {
    let sample = workspace().join("tests/k8s/workloads.yaml");
    let dir = std::env::temp_dir().join(format!("amb-k8s-inj-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let once = dir.join("once.yaml");
    let out = Command::new(bin())
        .arg("inject")
        .arg(&sample)
        .arg("-o")
        .arg(&once)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text_of(&out));
    assert_eq!(
        stderr(&out),
        "ambassador: Pod debug: injected\n\
         ambassador: StatefulSet ledger: injected\n\
         ambassador: DaemonSet node-agent: injected\n\
         ambassador: Job report: injected\n\
         ambassador: CronJob nightly: injected\n\
         ambassador: Deployment legacy: skipped (ambassador.io/inject: \"false\")\n"
    );
    for v in KUBERNETES {
        let res = validate(v, &once, None);
        assert!(res.status.success(), "{}", text_of(&res));
        assert_eq!(text_of(&res).matches(" passed for resource ").count(), 7);
    }
    let injected = fs::read_to_string(&once).unwrap();
    let docs = documents(&injected);
    let sidecars = |d: &Value, path: &[&str]| -> Vec<String> {
        let spec = path.iter().fold(d, |v, k| &v[*k]);
        spec["initContainers"]
            .as_sequence()
            .map(|l| {
                l.iter()
                    .map(|c| c["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        sidecars(&docs[1], &["spec", "template", "spec"]),
        ["ambassador-init", "ambassador-proxy", "schema"]
    );
    assert_eq!(
        sidecars(
            &docs[4],
            &["spec", "jobTemplate", "spec", "template", "spec"]
        ),
        ["ambassador-init", "ambassador-proxy"]
    );
    assert!(sidecars(&docs[5], &["spec", "template", "spec"]).is_empty());
    // The Job's exclusion reached init's command line; the StatefulSet's CIDRs too.
    let args = |d: &Value| {
        serde_yaml_ng::to_string(&d["spec"]["template"]["spec"]["initContainers"][0]["args"])
            .unwrap()
    };
    assert!(
        args(&docs[3]).contains("- --exclude-ports\n- '5432'\n"),
        "{}",
        args(&docs[3])
    );
    assert!(
        args(&docs[1]).contains("- --exclude-cidrs\n- 10.0.0.0/8,fd00::/8\n"),
        "{}",
        args(&docs[1])
    );

    // From stdin to stdout, the injected text comes back byte for byte.
    let again = inject(&[], &injected);
    assert!(again.status.success(), "{}", text_of(&again));
    assert_eq!(stdout(&again), injected);
    assert!(stderr(&again).contains("ambassador: Pod debug: already injected, unchanged"));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn inject_errors_are_one_line_naming_the_document_and_the_field() {
    let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
                apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {}\n  template:\n    \
                metadata:\n      annotations: {ambassador.io/exclude-outbound-ports: \"5432,99999\"}\n    \
                spec: {containers: [{name: web, image: web}]}\n";
    let out = inject(&["-"], text);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty(), "nothing is written on error");
    assert_eq!(
        stderr(&out),
        "ambassador: error: stdin: document 2 (line 5, Deployment web): \
         spec.template.metadata.annotations[ambassador.io/exclude-outbound-ports]: \
         `99999` is not a port (1-65535)\n"
    );
}

/// The Dockerfile cannot be built here (no container engine): check that it
/// copies what exists, builds the binary the way xtask does, and that the
/// image it makes is what the manifests expect (binary path, uid, config path).
#[test]
fn dockerfile_matches_the_repository_and_the_manifests() {
    let root = workspace();
    let text = fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    let stages = dockerfile::parse(&text).unwrap_or_else(|e| panic!("deploy/Dockerfile: {e}"));
    let ignored: Vec<String> = fs::read_to_string(root.join(".dockerignore"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    // What the build copies from the repository: there, and not ignored.
    let mut copied: Vec<String> = Vec::new();
    for (i, stage) in stages.iter().enumerate() {
        for c in &stage.copies {
            match &c.from {
                Some(from) => assert!(
                    stages[..i].iter().any(|s| &s.name == from),
                    "COPY --from={from}: no earlier stage of that name"
                ),
                None => {
                    for src in &c.srcs {
                        let s = src.trim_end_matches('/');
                        assert!(root.join(s).exists(), "COPY {src}: not in the repository");
                        assert!(
                            !ignored.iter().any(|i| i == s),
                            "COPY {src}: in .dockerignore"
                        );
                        copied.push(s.to_string());
                    }
                }
            }
        }
    }
    assert_eq!(
        stages.len(),
        2,
        "a build stage and a runtime stage: {stages:?}"
    );

    // Everything cargo and xtask need: every workspace member, the eBPF crate,
    // the lock file and the `cargo xtask` alias.
    let manifest = fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members_line = manifest
        .lines()
        .find(|l| l.starts_with("members"))
        .expect("workspace members");
    let members: Vec<&str> = members_line.split('"').skip(1).step_by(2).collect();
    assert!(!members.is_empty());
    for needed in
        members
            .iter()
            .copied()
            .chain(["ambassador-ebpf", "Cargo.lock", "Cargo.toml", ".cargo"])
    {
        assert!(
            copied.iter().any(|c| c == needed),
            "{needed} is not copied: {copied:?}"
        );
    }

    // Built like `cargo xtask build`, with a toolchain new enough.
    let runs = &stages[0].runs;
    assert!(runs.contains("cargo xtask build"), "{runs}");
    let bin_manifest = fs::read_to_string(root.join("ambassador-userspace/Cargo.toml")).unwrap();
    let bin_name = bin_manifest
        .split("[[bin]]")
        .nth(1)
        .and_then(|s| s.lines().find_map(|l| l.trim().strip_prefix("name = ")))
        .map(|n| n.trim_matches('"'))
        .expect("[[bin]] name");
    let built = format!("target/release/{bin_name}");
    assert!(
        runs.contains(&built),
        "the RUN does not take {built}: {runs}"
    );
    let rust_version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"'))
        .expect("rust-version");
    let builder = &stages[0].base;
    let tag = builder.split(':').nth(1).expect("builder tag");
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    let tag_version = tag.split('-').next().unwrap();
    assert!(
        parse(tag_version) >= parse(rust_version),
        "builder {builder} is older than rust-version {rust_version}"
    );
    // glibc of the builder's Debian must be that of the runtime.
    let runtime = &stages[1].base;
    assert!(runtime.starts_with("gcr.io/distroless/"), "{runtime}");
    assert!(
        builder.contains("bookworm") && runtime.contains("debian12"),
        "builder {builder} and runtime {runtime} must be the same Debian release"
    );

    // The runtime: the binary where the manifests' exec probes call it, as the proxy's uid.
    let binary = "/usr/local/bin/ambassador";
    let last = &stages[1];
    assert!(
        last.copies
            .iter()
            .any(|c| c.from.as_ref() == Some(&stages[0].name)
                && c.srcs.iter().any(|s| s.ends_with(&format!("/{bin_name}")))
                && c.dest == binary),
        "{:?}",
        last.copies
    );
    assert_eq!(last.entrypoint_argv().unwrap(), [binary]);
    let user = last.user.clone().expect("the runtime stage sets USER");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("numeric USER");
    assert_eq!(uid, PROXY_UID, "USER {user}");
    assert_ne!(uid, 0);
    assert_eq!(
        last.cmd_argv().unwrap(),
        ["proxy", "--config", "/etc/ambassador/config.yaml"]
    );

    let deployment = fs::read_to_string(root.join("deploy/kubernetes/deployment.yaml")).unwrap();
    let docs = documents(&deployment);
    let spec = &docs[0]["spec"]["template"]["spec"];
    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["name"], "ambassador-proxy");
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(proxy[probe]["exec"]["command"][0], binary, "{probe}");
    }
    assert_eq!(
        proxy["securityContext"]["runAsUser"].as_u64(),
        Some(u64::from(uid))
    );
    assert_eq!(proxy["volumeMounts"][0]["mountPath"], "/etc/ambassador");
}

/// The Pod templates of a manifest's documents (Pods and workloads).
fn pod_templates(doc: &Value) -> Vec<&Value> {
    match doc["kind"].as_str() {
        Some("Pod") => vec![doc],
        Some("CronJob") => vec![&doc["spec"]["jobTemplate"]["spec"]["template"]],
        Some(_) if doc["spec"]["template"].is_mapping() => vec![&doc["spec"]["template"]],
        _ => Vec::new(),
    }
}

/// Container runtimes' default AppArmor profile (docker-default,
/// cri-containerd.apparmor.d) denies writes under /sys/fs/ except the
/// cgroupfs: a container that pins or unpins in the node's bpffs runs
/// unconfined, and says so in the manifest. Nothing else does.
#[test]
fn containers_that_write_the_bpffs_run_without_apparmor_confinement() {
    let mut files = Vec::new();
    yaml_files(&workspace().join("deploy"), &mut files);
    let mut writers = Vec::new();
    for file in files {
        for doc in documents(&fs::read_to_string(&file).unwrap()) {
            for t in pod_templates(&doc) {
                let bpffs: Vec<&str> = t["spec"]["volumes"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .filter(|v| v["hostPath"]["path"] == "/sys/fs/bpf")
                    .filter_map(|v| v["name"].as_str())
                    .collect();
                let containers = ["initContainers", "containers"]
                    .iter()
                    .flat_map(|k| t["spec"][*k].as_sequence().into_iter().flatten());
                for c in containers {
                    let name = c["name"].as_str().unwrap();
                    let writes = c["volumeMounts"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .any(|m| {
                            bpffs.contains(&m["name"].as_str().unwrap_or_default())
                                && m["readOnly"] != true
                        });
                    let key = format!("container.apparmor.security.beta.kubernetes.io/{name}");
                    let profile = &t["metadata"]["annotations"][key.as_str()];
                    if writes {
                        assert_eq!(profile, "unconfined", "{}: {name}", file.display());
                        // And it calls bpf(2), which default seccomp profiles
                        // of before 2023 allow only with CAP_SYS_ADMIN.
                        assert_eq!(
                            c["securityContext"]["seccompProfile"]["type"],
                            "Unconfined",
                            "{}: {name}",
                            file.display()
                        );
                        writers.push(format!(
                            "{}:{name}",
                            file.file_name().unwrap().to_string_lossy()
                        ));
                    } else {
                        assert!(
                            profile.is_null(),
                            "{}: {name} needs no exception",
                            file.display()
                        );
                    }
                }
            }
        }
    }
    writers.sort();
    assert_eq!(
        writers,
        ["deployment.yaml:ambassador-init", "gc-daemonset.yaml:gc"]
    );
}
