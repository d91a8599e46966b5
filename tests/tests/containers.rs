//! The image and the manifests under a real container runtime (podman 4.3
//! with runc; root): the image `cargo xtask image` builds is the Dockerfile's
//! final stage, and a Pod made of `ambassador inject`'s output runs as the
//! manifests say: `init --cgroup auto` finds the Pod's cgroup by itself, the
//! app's calls go out through the sidecar with TLS and a credential from a
//! Secret, the metrics are scraped from outside the Pod, a dead sidecar fails
//! the app's connects closed and its restart restores them, and once the Pod
//! is gone the gc container of gc-daemonset.yaml leaves nothing pinned.
//!
//! What podman 4.3 cannot do, and what the test does instead (nothing else of
//! the manifests is changed):
//! - native sidecars are ignored and block the Pod: the `ambassador-proxy`
//!   init container is taken out of what `kube play` gets and run by the test
//!   in the Pod, its spec translated field by field (`containers::run_args`,
//!   which stops at any field it does not know), `subPathExpr` expanded as a
//!   kubelet would;
//! - init containers run only with `restartPolicy: OnFailure`;
//! - `securityContext.seccompProfile` is ignored: `Unconfined` is also given
//!   as podman's per-container annotation;
//! - the Pod's cgroup in the unified hierarchy is left behind on this hybrid
//!   host when the Pod is removed (podman cleans the v1 controllers): the test
//!   removes it, as the kubelet removes a deleted Pod's cgroup.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::{
    containers::{Source, ambassador_image, app_image, podman, podman_ok, run_args},
    upstream::{CertKind, HttpUpstream, TestCa, TlsVersions},
    *,
};
use serde::Deserialize as _;
use serde_yaml_ng::Value;

static SERIAL: Mutex<()> = Mutex::new(());

const POD_IP: &str = "10.251.7.2";
const API_IP: &str = "10.251.7.1";
const TOKEN: &str = "t0ken-from-a-secret";

#[test]
fn the_image_is_the_dockerfiles_final_stage() {
    require_root();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let image = ambassador_image();
    let text = fs::read_to_string(workspace().join("deploy/Dockerfile")).unwrap();
    let stages = dockerfile::parse(&text).unwrap();
    let last = stages.last().unwrap();
    let inspect: Value =
        serde_json::from_str::<serde_json::Value>(&podman_ok(&["image", "inspect", &image]))
            .map(|j| serde_yaml_ng::to_value(&j[0]["Config"]).unwrap())
            .unwrap();
    assert_eq!(inspect["User"].as_str(), last.user.as_deref());
    let seq = |v: &Value| -> Vec<String> {
        v.as_sequence()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(seq(&inspect["Entrypoint"]), last.entrypoint_argv().unwrap());
    assert_eq!(seq(&inspect["Cmd"]), last.cmd_argv().unwrap());

    // Its files: the binary where the Dockerfile copies it, what the
    // distroless base gives (glibc, CA bundle, users), and no shell.
    let ctr = podman_ok(&["create", &image]);
    let listing = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "CONTAINERS_CONF='{}' podman export {ctr} | tar -t",
            ambassador_tests::containers::podman_conf().display()
        ))
        .output()
        .unwrap();
    podman_ok(&["rm", &ctr]);
    let files = stdout(&listing);
    let binary = &last.copies.iter().find(|c| c.from.is_some()).unwrap().dest;
    for f in [
        binary.trim_start_matches('/'),
        "etc/ssl/certs/ca-certificates.crt",
        "etc/passwd",
        "etc/nsswitch.conf",
        "tmp/",
    ] {
        assert!(
            files.lines().any(|l| l.trim_start_matches("./") == f),
            "{f} missing: {files}"
        );
    }
    assert!(
        files.lines().any(|l| l.contains("/libc.so.6")),
        "no glibc: {files}"
    );
    assert!(
        !files
            .lines()
            .any(|l| l.ends_with("bin/sh") || l.ends_with("bin/bash")),
        "a shell in the image: {files}"
    );
    // It runs, as the Dockerfile's user.
    let version = podman_ok(&["run", "--rm", &image, "--version"]);
    assert!(version.starts_with("ambassador "), "{version}");
}

/// Everything one Pod run made, removed on drop (panics included).
struct PodRun {
    name: String,
    pod_id: String,
    cgroup: PathBuf,
    servers: Netns,
    dir: PathBuf,
}

impl Drop for PodRun {
    fn drop(&mut self) {
        let _ = podman(&["pod", "rm", "-f", "-t", "0", &self.name]);
        let _ = podman(&["secret", "rm", "api-token"]);
        if self.cgroup.is_dir() {
            let _ = Command::new(bin())
                .args(["uninstall", "--cgroup"])
                .arg(&self.cgroup)
                .output();
            remove_cgroup_tree(&self.cgroup);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// The app as its team wrote it: an unmodified curl, as uid 1000, and the
/// Secret it wants the proxy to hold.
fn app_manifest(name: &str, image: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  annotations:\n    \
         ambassador.io/secrets: api-token\nspec:\n  containers:\n    - name: app\n      \
         image: {image}\n      command: [sleep, \"3600\"]\n      securityContext:\n        \
         runAsUser: 1000\n        runAsNonRoot: true\n        allowPrivilegeEscalation: false\n"
    )
}

fn config(ca_path: &str) -> String {
    format!(
        "proxy: {{ port: 15001, uid: 1337 }}\nintercept: {{ fail: closed }}\ndefault: passthrough\n\
         services:\n  - name: api\n    match: {{ cidr: {API_IP}, port: 80 }}\n    protocol: http\n    \
         upstream:\n      endpoints: [{{ address: \"{API_IP}:8443\" }}]\n      \
         tls: {{ server_name: api.test, ca_file: {ca_path} }}\n    request:\n      set_headers:\n        \
         authorization: {{ file: /var/run/secrets/ambassador/api-token/token, prefix: \"Bearer \" }}\n"
    )
}

/// What `kube play` gets of the injected Pod, and the sidecar taken out.
fn for_kube_play(injected: &Value) -> (Value, Value) {
    let mut pod = injected.clone();
    let spec = pod["spec"].as_mapping_mut().unwrap();
    spec.insert("restartPolicy".into(), "OnFailure".into());
    let inits = spec["initContainers"].as_sequence_mut().unwrap();
    let i = inits
        .iter()
        .position(|c| c["restartPolicy"] == "Always")
        .expect("the native sidecar");
    let sidecar = inits.remove(i);
    // Volumes only the sidecar mounts go with it.
    let used: Vec<String> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[*k].as_sequence().into_iter().flatten())
        .flat_map(|c| c["volumeMounts"].as_sequence().into_iter().flatten())
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    spec["volumes"]
        .as_sequence_mut()
        .unwrap()
        .retain(|v| used.iter().any(|u| v["name"] == u.as_str()));
    let unconfined: Vec<String> = spec["initContainers"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|c| c["securityContext"]["seccompProfile"]["type"] == "Unconfined")
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    let annotations = pod["metadata"]["annotations"].as_mapping_mut().unwrap();
    for c in unconfined {
        annotations.insert(
            format!("container.seccomp.security.alpha.kubernetes.io/{c}").into(),
            "unconfined".into(),
        );
    }
    (pod, sidecar)
}

/// `curl` in the app container: (exit code, output, how long it took).
fn app_curl(run: &PodRun, url: &str) -> (i32, String, Duration) {
    let start = Instant::now();
    let out = podman(&[
        "exec",
        &format!("{}-app", run.name),
        "curl",
        "-sS",
        "-m",
        "5",
        "-w",
        "\n%{http_code}",
        url,
    ]);
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", stdout(&out), stderr(&out)),
        start.elapsed(),
    )
}

fn probe(run: &PodRun, sidecar: &Value, which: &str) -> bool {
    let cmd: Vec<&str> = sidecar[which]["exec"]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let name = format!("{}-ambassador-proxy", run.name);
    let mut args = vec!["exec", name.as_str()];
    args.extend(cmd);
    podman(&args).status.success()
}

fn wait_ready(run: &PodRun, sidecar: &Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !probe(run, sidecar, "startupProbe") {
        assert!(Instant::now() < deadline, "the sidecar never became ready");
        thread::sleep(Duration::from_millis(200));
    }
}

fn start_sidecar(run: &PodRun, sidecar: &Value, volumes: &BTreeMap<String, Source>) {
    let name = format!("{}-ambassador-proxy", run.name);
    let mut args = vec![
        "run".to_string(),
        "-d".into(),
        "--pod".into(),
        run.name.clone(),
        "--name".into(),
        name,
    ];
    args.extend(run_args(sidecar, volumes, &run.pod_id));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    podman_ok(&args);
}

/// A veth from the Pod's network namespace to a servers namespace of the test.
fn wire(run: &PodRun) {
    let pid = podman_ok(&[
        "inspect",
        &format!("{}-infra", &run.pod_id[..12]),
        "--format",
        "{{.State.Pid}}",
    ]);
    let (a, b) = (
        format!("ambc{}a", std::process::id() % 100_000),
        format!("ambc{}b", std::process::id() % 100_000),
    );
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {}", stderr(&out));
    };
    ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    ip(&["link", "set", &a, "netns", &pid]);
    ip(&["link", "set", &b, "netns", &run.servers.name]);
    let nsenter = |args: &[&str]| {
        let out = Command::new("nsenter")
            .args(["-t", &pid, "-n", "ip"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nsenter ip {args:?}: {}",
            stderr(&out)
        );
    };
    nsenter(&["addr", "add", &format!("{POD_IP}/24"), "dev", &a]);
    nsenter(&["link", "set", &a, "up"]);
    run.servers
        .ip(&["addr", "add", &format!("{API_IP}/24"), "dev", &b]);
    run.servers.ip(&["link", "set", &b, "up"]);
}

fn pins_of(run: &PodRun, cgroup_id: u64) -> Vec<PathBuf> {
    [
        format!("/sys/fs/bpf/ambassador/cgroup-{cgroup_id}"),
        format!("/sys/fs/bpf/ambassador/pod-{}", run.pod_id),
    ]
    .into_iter()
    .map(PathBuf::from)
    .filter(|p| p.exists())
    .collect()
}

#[test]
fn a_pod_made_by_inject_runs_proxied_fails_closed_and_leaves_nothing() {
    require_root();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !fs::read_to_string("/proc/mounts")
        .unwrap()
        .contains(" /sys/fs/bpf bpf ")
    {
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .output()
            .unwrap();
        assert!(out.status.success(), "mount bpffs: {}", stderr(&out));
    }
    let image = ambassador_image();
    let name = format!("amb-ctr-{}", std::process::id());
    let dir = workspace().join("target/containers").join(&name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();

    // The manifests: the app's Pod through `ambassador inject`, the ConfigMap
    // and the Secret it names.
    let ca = TestCa::new("containers test CA");
    let out = Command::new(bin())
        .args(["inject", "--image", &image])
        .arg(write(&dir, "app.yaml", &app_manifest(&name, &app_image())))
        .output()
        .unwrap();
    assert!(out.status.success(), "inject: {}", stderr(&out));
    let injected = documents(&stdout(&out)).remove(0);
    let (play, sidecar) = for_kube_play(&injected);
    let play_file = write(&dir, "play.yaml", &serde_yaml_ng::to_string(&play).unwrap());
    let cfg = config("/etc/ambassador/ca.pem");
    let cm: BTreeMap<&str, String> = [("config.yaml", cfg), ("ca.pem", ca.ca_pem())].into();
    let cm_yaml = serde_yaml_ng::to_string(&serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "ambassador"}, "data": cm,
    }))
    .unwrap();
    let cm_file = write(&dir, "configmap.yaml", &cm_yaml);

    // Up: init runs to completion (or kube play fails), then the app.
    let out = podman(&[
        "kube",
        "play",
        "--network",
        "none",
        "--configmap",
        cm_file.to_str().unwrap(),
        play_file.to_str().unwrap(),
    ]);
    let pod_id = podman(&["pod", "inspect", &name, "--format", "{{.ID}}"]);
    let mut run = PodRun {
        name: name.clone(),
        pod_id: stdout(&pod_id).trim().to_string(),
        cgroup: PathBuf::new(),
        servers: Netns::new("amb-ctr-srv-"),
        dir: dir.clone(),
    };
    assert!(
        out.status.success(),
        "kube play: {}{}\ninit's log: {}",
        stdout(&out),
        stderr(&out),
        stdout(&podman(&["logs", &format!("{name}-ambassador-init")]))
    );

    // `init --cgroup auto` found the Pod's cgroup (podman's is named after
    // the pod ID, which `kube play` gives as metadata.uid) and attached there.
    run.cgroup = cgroup2_mount().join("libpod_parent").join(&run.pod_id);
    let pod_cg_id = {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(&run.cgroup).unwrap().ino()
    };
    let programs = attached_programs(&run.cgroup);
    assert_eq!(
        programs.matches("ambassador_").count(),
        ambassador_common::programs::ALL.len(),
        "{programs}"
    );
    let app_cg = run.cgroup.join(format!(
        "libpod-{}",
        podman_ok(&["inspect", &format!("{name}-app"), "--format", "{{.Id}}"])
    ));
    assert_eq!(attached_programs(&app_cg).matches("ambassador_").count(), 0);
    assert_eq!(pins_of(&run, pod_cg_id).len(), 2, "cgroup and pod pins");

    // The sidecar, as the kubelet would run the native sidecar.
    wire(&run);
    let upstream = {
        let (cert, key) = ca.issue(
            CertKind::Valid,
            "api.test",
            Some(API_IP.parse::<IpAddr>().unwrap()),
        );
        let listener = run
            .servers
            .enter(|| TcpListener::bind(format!("{API_IP}:8443")).unwrap());
        HttpUpstream::tls(listener, &cert, &key, &["http/1.1"], TlsVersions::default())
    };
    let cm_dir = dir.join("configmap");
    let secret_dir = dir.join("secret");
    for (d, files) in [
        (
            &cm_dir,
            vec![
                ("config.yaml", config("/etc/ambassador/ca.pem")),
                ("ca.pem", ca.ca_pem()),
            ],
        ),
        (&secret_dir, vec![("token", TOKEN.to_string())]),
    ] {
        fs::create_dir_all(d).unwrap();
        for (f, text) in files {
            fs::write(d.join(f), text).unwrap();
        }
    }
    let volumes: BTreeMap<String, Source> = [
        ("ambassador-config".into(), Source::Dir(cm_dir)),
        ("ambassador-bpffs".into(), Source::Dir("/sys/fs/bpf".into())),
        ("ambassador-admin".into(), Source::Tmpfs),
        (
            "ambassador-secret-api-token".into(),
            Source::Dir(secret_dir),
        ),
    ]
    .into();
    let declared: Vec<&str> = injected["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(
        volumes.keys().all(|k| declared.contains(&k.as_str())),
        "{declared:?}"
    );
    start_sidecar(&run, &sidecar, &volumes);
    wait_ready(&run, &sidecar);
    let proxy = format!("{name}-ambassador-proxy");
    let seen = podman_ok(&[
        "inspect",
        &proxy,
        "--format",
        "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.EffectiveCaps}} {{.HostConfig.SecurityOpt}}",
    ]);
    assert!(seen.starts_with("1337:1337 true [] "), "{seen}");
    assert!(seen.contains("no-new-privileges"), "{seen}");
    assert!(probe(&run, &sidecar, "readinessProbe"));
    assert!(probe(&run, &sidecar, "livenessProbe"));
    let logs = stderr(&podman(&["logs", &proxy]));
    assert!(logs.contains("the Pod's kernel maps"), "{logs}");

    // The app's plain call leaves as TLS with the Secret's credential.
    let (code, text, _) = app_curl(&run, &format!("http://{API_IP}/orders"));
    assert_eq!(code, 0, "{text}");
    assert!(text.ends_with("\n200"), "{text}");
    let requests = upstream.seen();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].uri, "/orders");
    assert_eq!(
        requests[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );

    // Metrics from outside the Pod, and nothing else there.
    let request = |method: &str, path: &str| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &run.servers.name,
                "curl",
                "-sS",
                "-X",
                method,
                "-w",
                "\n%{http_code}",
            ])
            .arg(format!("http://{POD_IP}:15090{path}"))
            .output()
            .unwrap();
        stdout(&out)
    };
    let scrape = |path: &str| request("GET", path);
    let metrics = scrape("/metrics");
    assert!(metrics.ends_with("\n200"), "{metrics}");
    assert!(
        metrics.contains(r#"ambassador_http_requests_total{service="api",direction="outbound",status_class="2xx"} 1"#),
        "{metrics}"
    );
    // Callers outside the Pod reach this port: nothing but the metrics.
    for (method, path) in [
        ("GET", "/config"),
        ("GET", "/status"),
        ("POST", "/reload"),
        ("PUT", "/log-level"),
    ] {
        let got = request(method, path);
        assert!(got.ends_with("\n404"), "{method} {path}: {got}");
    }

    // A dead sidecar: the app's connects fail at once (fail closed) ...
    podman_ok(&["kill", "--signal", "KILL", &proxy]);
    let (code, text, took) = app_curl(&run, &format!("http://{API_IP}/orders"));
    assert_eq!(code, 7, "{text}");
    assert!(took < Duration::from_secs(2), "{took:?}: {text}");
    assert_eq!(upstream.seen().len(), 1, "nothing got past");
    // ... until it is back.
    podman_ok(&["start", &proxy]);
    wait_ready(&run, &sidecar);
    let (code, text, _) = app_curl(&run, &format!("http://{API_IP}/orders"));
    assert!(code == 0 && text.ends_with("\n200"), "{text}");
    assert_eq!(upstream.seen().len(), 2);

    // The Pod removed (and its cgroup, as the kubelet would), then the gc
    // container of gc-daemonset.yaml, run once: nothing of ours is left.
    podman_ok(&["pod", "rm", "-f", "-t", "0", &name]);
    remove_cgroup_tree(&run.cgroup);
    assert!(!run.cgroup.exists(), "the Pod's cgroup is still there");
    let gc_manifest =
        fs::read_to_string(workspace().join("deploy/kubernetes/gc-daemonset.yaml")).unwrap();
    let ds = documents(&gc_manifest)
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let mut gc = ds["spec"]["template"]["spec"]["containers"][0].clone();
    assert_eq!(
        gc["args"],
        serde_yaml_ng::to_value(["gc", "--every", "5m"]).unwrap()
    );
    gc["image"] = image.clone().into();
    gc["args"] = serde_yaml_ng::to_value(["gc"]).unwrap(); // once, not every 5 minutes
    let gc_volumes: BTreeMap<String, Source> = [
        ("bpffs".into(), Source::Dir("/sys/fs/bpf".into())),
        ("cgroup".into(), Source::Dir("/sys/fs/cgroup".into())),
    ]
    .into();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut args = vec!["run".to_string(), "--rm".into(), "--network=none".into()];
        args.extend(run_args(&gc, &gc_volumes, "unused"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = podman(&args);
        let said = format!("{}{}", stdout(&out), stderr(&out));
        assert!(out.status.success(), "gc: {said}");
        if pins_of(&run, pod_cg_id).is_empty() {
            assert!(said.contains(&pod_cg_id.to_string()), "{said}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pins left: {:?}; gc: {said}",
            pins_of(&run, pod_cg_id)
        );
        thread::sleep(Duration::from_millis(500));
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}
