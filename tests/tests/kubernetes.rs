//! What the Kubernetes manifests in deploy/ rely on, on the real kernel:
//! `init --cgroup auto` run the way the init container runs it (a child cgroup
//! of the Pod's, private cgroup and mount namespaces, the node's cgroupfs
//! mounted in, only the manifest's capabilities) attaches at the Pod's cgroup;
//! and a Pod deleted without `uninstall` leaves nothing of ours on the node
//! once `init` or `gc` has run. Its own test binary, the tests one at a time:
//! a sweep by one test's `init` must not race another's assertions.

use std::{
    fs,
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ambassador_common::{maps, programs as p};
use ambassador_tests::*;
use serde::Deserialize as _;
use serde_yaml_ng::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    require_root();
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}{}-{nanos}", std::process::id())
}

/// A cgroup made by a test: on drop, whatever `init` attached there is
/// uninstalled, its processes killed and the directory removed.
struct Cg(PathBuf);

impl Cg {
    fn new(path: PathBuf) -> Cg {
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Cg(path)
    }
    fn child(&self, name: &str) -> Cg {
        Cg::new(self.0.join(name))
    }
    fn id(&self) -> u64 {
        fs::metadata(&self.0).unwrap().ino()
    }
    fn pins(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/ambassador/cgroup-{}", self.id()))
    }
    /// Removes the directory now, as the kubelet does when a Pod ends.
    fn remove(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = fs::remove_dir(&self.0) {
            assert!(Instant::now() < deadline, "rmdir {}: {e}", self.0.display());
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Cg {
    fn drop(&mut self) {
        if !self.0.exists() {
            return;
        }
        let _ = Command::new(bin())
            .args(["uninstall", "--cgroup"])
            .arg(&self.0)
            .output();
        let _ = fs::write(self.0.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

fn ambassador(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run ambassador")
}

fn text(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

/// The capabilities a container of a shipped manifest adds (e.g. `[BPF, NET_ADMIN, PERFMON]`).
fn manifest_caps(file: &str, doc: usize, container: &[&str]) -> Vec<String> {
    let text = fs::read_to_string(workspace().join("deploy/kubernetes").join(file)).unwrap();
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    let c = container
        .iter()
        .fold(&docs[doc], |v, k| match k.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[*k],
        });
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"][0], "ALL",
        "{file}: the container must drop all capabilities first"
    );
    c["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn init_caps() -> Vec<String> {
    let caps = manifest_caps(
        "deployment.yaml",
        0,
        &["spec", "template", "spec", "initContainers", "0"],
    );
    assert_eq!(caps, ["BPF", "NET_ADMIN", "PERFMON"]);
    caps
}

/// `setpriv` arguments that leave exactly `caps` (Kubernetes names), with
/// no_new_privs (`allowPrivilegeEscalation: false`).
fn setpriv(caps: &[String]) -> Vec<String> {
    let mut bounding = String::from("-all");
    for c in caps {
        bounding.push_str(&format!(",+{}", c.to_ascii_lowercase()));
    }
    vec![
        "setpriv".into(),
        "--inh-caps=-all".into(),
        format!("--bounding-set={bounding}"),
        "--no-new-privs".into(),
        "--".into(),
    ]
}

/// How the simulated init container sees the cgroup tree.
#[derive(Clone, Copy, PartialEq)]
enum View {
    /// Its own cgroup2 mount (rooted at its own cgroup, as runc mounts it in
    /// a private cgroup namespace) and the node's cgroupfs from a hostPath.
    ContainerAndHost,
    /// Only the node's cgroupfs.
    HostOnly,
}

/// Runs `ambassador ARGS` as deploy/'s init container runs: in `container`
/// (a child of the Pod's cgroup), in new cgroup and mount namespaces, with the
/// cgroup2 mounts of `view`, with only the manifest's capabilities.
fn as_init_container(container: &Cg, view: View, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mount = cgroup2_mount();
    let host = std::env::temp_dir().join(unique("amb-hostcg-"));
    fs::create_dir(&host).unwrap();
    let own = if view == View::ContainerAndHost {
        format!("mount -t cgroup2 cgroup2 '{}'\n", mount.display())
    } else {
        String::new()
    };
    // The node's cgroupfs at another path, then the usual one replaced by the
    // container's own view (nothing of this leaves the new mount namespace).
    let script = format!(
        "set -e\nmount --bind '{m}' '{h}'\numount '{m}'\n{own}exec \"$@\"",
        m = mount.display(),
        h = host.display(),
    );
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(container.0.join("cgroup.procs"))
        .unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--cgroup", "--mount", "--propagation", "private", "--"])
        .args(["sh", "-c", &script, "sh"])
        .args(setpriv(&init_caps()))
        .arg(bin())
        .args(args)
        .envs(env.iter().copied());
    // SAFETY: one write(2) on an fd opened before the fork.
    unsafe {
        use std::os::fd::AsRawFd;
        let fd = procs.as_raw_fd();
        cmd.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run unshare");
    drop(procs);
    let _ = fs::remove_dir(&host);
    out
}

/// Programs of ours attached directly at a cgroup.
fn attached(cg: &Path) -> usize {
    attached_programs(cg).matches("ambassador_").count()
}

#[test]
fn init_container_finds_the_pod_cgroup_through_its_cgroup_namespace() {
    let _s = serial();
    let mut pod = Pod::new("");
    // Start from nothing attached: this test's init does the attaching.
    let out = pod.ambassador(&["uninstall", "--cgroup"], Some(&pod.cgroup.clone()));
    assert!(out.status.success(), "{}", text(&out));
    // Declared after the Pod: removed before the Pod's cgroup is.
    let container = Cg::new(pod.cgroup.join("ambassador-init"));
    let config = pod.config.to_str().unwrap().to_string();

    // A Pod UID that is not this cgroup's name: the cross-check refuses.
    let wrong = "0b6ad8e2-4b1c-4d8e-9e0f-2f6f1c1c2a3b";
    let out = as_init_container(
        &container,
        View::ContainerAndHost,
        &[("AMBASSADOR_POD_UID", wrong)],
        &["init", "--cgroup", "auto", "--config", &config],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!("which is not named after Pod UID {wrong}")),
        "{}",
        text(&out)
    );
    assert_eq!(attached(&pod.cgroup), 0);

    let out = as_init_container(
        &container,
        View::ContainerAndHost,
        &[],
        &["init", "--cgroup", "auto", "--config", &config],
    );
    assert!(out.status.success(), "{}", text(&out));
    // Found as the node sees it, under the hostPath mount, by the inode of
    // its own cgroup (which its namespace shows as `/`).
    let said = stdout(&out);
    let pod_name = pod
        .cgroup
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        said.contains(&format!(
            "/{pod_name} (parent of this container's cgroup (id {}, found as ",
            container.id()
        )),
        "{said}"
    );
    // Attached at the Pod's cgroup, not the init container's own.
    assert_eq!(
        attached(&pod.cgroup),
        p::ALL.len(),
        "{}",
        attached_programs(&pod.cgroup)
    );
    assert_eq!(attached(&container.0), 0);
    assert!(pod.pin_dir().is_dir());

    // And it intercepts: the app's connection reaches the server through the proxy.
    pod.start_proxy();
    let _server = pod.server(SERVER_V4, 7101, Behaviour::Greet);
    let out = pod.client(&["greet", SERVER_V4, "7101"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains(&format!("GREETING HELLO {SERVER_V4}:7101")));
    assert_eq!(pod.counters().redirected, 1);
}

#[test]
fn init_container_finds_the_pod_cgroup_by_uid_when_its_own_is_hidden() {
    let _s = serial();
    let uid = format!(
        "{:08x}-4b1c-4d8e-9e0f-{:012x}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    // The systemd cgroup driver's layout.
    let kubepods = Cg::new(cgroup2_mount().join(unique("amb-kubepods-")));
    let pod = kubepods.child(&format!(
        "kubepods-burstable-pod{}.slice",
        uid.replace('-', "_")
    ));
    let container = pod.child("cri-containerd-0123abcd.scope");
    let args = ["init", "--cgroup", "auto"];

    let out = as_init_container(&container, View::HostOnly, &[], &args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("or pass --pod-uid"), "{}", text(&out));

    let out = as_init_container(
        &container,
        View::HostOnly,
        &[("AMBASSADOR_POD_UID", &uid)],
        &args,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains(&format!("named after Pod UID {uid}")),
        "{}",
        text(&out)
    );
    assert_eq!(attached(&pod.0), p::ALL.len());
    assert_eq!(attached(&container.0), 0);
    assert!(pod.pins().is_dir());
}

/// The ids of every bpf object an install pinned: (links, programs, maps).
fn pinned_ids(dir: &Path) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let (mut links, mut progs, mut maps) = (Vec::new(), Vec::new(), Vec::new());
    for e in fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let kind = if name.starts_with("link_") {
            "link"
        } else {
            "map"
        };
        let out = Command::new("bpftool")
            .args([kind, "show", "pinned"])
            .arg(e.path())
            .output()
            .unwrap();
        let first = stdout(&out);
        let id: u32 = first.split(':').next().unwrap().trim().parse().unwrap();
        if kind == "link" {
            links.push(id);
            let prog = first.split("prog ").nth(1).unwrap();
            progs.push(prog.split_whitespace().next().unwrap().parse().unwrap());
        } else {
            maps.push(id);
        }
    }
    (links, progs, maps)
}

fn exists(kind: &str, id: u32) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()
        .unwrap()
        .status
        .success()
}

/// Waits (up to 10 s: the kernel frees after an RCU grace period) for none of
/// the objects to exist any more.
fn all_gone(ids: &(Vec<u32>, Vec<u32>, Vec<u32>)) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = [("link", &ids.0), ("prog", &ids.1), ("map", &ids.2)]
            .iter()
            .flat_map(|(kind, ids)| {
                ids.iter()
                    .filter(|id| exists(kind, **id))
                    .map(move |id| format!("{kind} {id}"))
            })
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for the kernel to detach an install's links from its removed cgroup
/// (asynchronously, once no socket holds the cgroup any more).
fn wait_detached(pins: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = Command::new("bpftool")
            .args(["link", "show", "pinned"])
            .arg(pins.join("link_ambassador_connect4"))
            .output()
            .unwrap();
        if stdout(&out).contains("cgroup_id 0 ") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "link still attached: {}",
            text(&out)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_deleted_pod_leaves_nothing_once_gc_has_run() {
    let _s = serial();
    let pod = Cg::new(cgroup2_mount().join(unique("amb-gc-")));
    // With the Pod's UID, init also shares maps with the proxy in pod-<uid>/.
    let uid = unique("uid-");
    let out = ambassador(&[
        "init",
        "--pod-uid",
        &uid,
        "--cgroup",
        pod.0.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let shared = PathBuf::from(format!("/sys/fs/bpf/ambassador/pod-{uid}"));
    assert!(shared.join("AMB_COUNTERS").exists(), "{}", text(&out));
    let (id, pins) = (pod.id(), pod.pins());
    let ids = pinned_ids(&pins);
    // Six cgroup links and the sk_msg link to the sockhash; every map.
    assert_eq!(
        (ids.0.len(), ids.1.len()),
        (p::ALL.len() + 1, p::ALL.len() + 1),
        "{ids:?}"
    );
    assert_eq!(ids.2.len(), maps::PINNED.len(), "{ids:?}");

    // The kubelet removes the Pod's cgroup: the kernel detaches our links
    // (they now report cgroup 0) but the pins keep everything alive.
    pod.remove();
    wait_detached(&pins);
    assert!(pins.is_dir());
    assert!(ids.1.iter().all(|id| exists("prog", *id)));
    assert!(ids.2.iter().all(|id| exists("map", *id)));

    // gc with only what the gc DaemonSet has: CAP_BPF.
    let caps = manifest_caps(
        "gc-daemonset.yaml",
        1,
        &["spec", "template", "spec", "containers", "0"],
    );
    assert_eq!(caps, ["BPF"]);
    let out = Command::new(setpriv(&caps)[0].clone())
        .args(&setpriv(&caps)[1..])
        .arg(bin())
        .arg("gc")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("removed the pins of"),
        "{}",
        text(&out)
    );
    assert!(stdout(&out).contains(&id.to_string()), "{}", text(&out));
    assert!(!pins.exists(), "{} is still there", pins.display());
    assert!(!shared.exists(), "{} is still there", shared.display());
    let left = all_gone(&ids);
    assert!(left.is_empty(), "still in the kernel: {left:?}");

    // A second gc finds nothing of this Pod.
    let out = ambassador(&["gc"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!stdout(&out).contains(&id.to_string()), "{}", text(&out));
}

#[test]
fn init_cleans_up_after_deleted_pods_and_never_touches_live_ones() {
    let _s = serial();
    let live = Pod::new("");
    let gone = Cg::new(cgroup2_mount().join(unique("amb-gone-")));
    let out = ambassador(&["init", "--cgroup", gone.0.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let (gone_id, gone_pins) = (gone.id(), gone.pins());
    let ids = pinned_ids(&gone_pins);
    gone.remove();
    wait_detached(&gone_pins);

    // The next Pod's init on this node sweeps; the live Pod keeps everything.
    let next = Cg::new(cgroup2_mount().join(unique("amb-next-")));
    let out = ambassador(&["init", "--cgroup", next.0.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains(&gone_id.to_string()),
        "init did not report the sweep: {}",
        text(&out)
    );
    assert!(!gone_pins.exists());
    assert!(all_gone(&ids).is_empty());
    assert!(live.pin_dir().is_dir());
    assert_eq!(attached(&live.cgroup), p::ALL.len());
    assert!(next.pins().is_dir());
    assert_eq!(attached(&next.0), p::ALL.len());
}

#[test]
fn an_install_without_links_is_removed_only_when_abandoned_and_its_cgroup_gone() {
    let _s = serial();
    // `init` that died after pinning the maps: no link pinned.
    let half = |name: &str| {
        let cg = Cg::new(cgroup2_mount().join(unique(name)));
        let out = ambassador(&["init", "--cgroup", cg.0.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
        for e in fs::read_dir(cg.pins()).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("link_") {
                fs::remove_file(e.path()).unwrap();
            }
        }
        cg
    };
    let age = |dir: &Path| {
        let out = Command::new("touch")
            .args(["-d", "2 minutes ago"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    };
    let dead = half("amb-half-dead-");
    let alive = half("amb-half-alive-");
    let (dead_pins, alive_pins) = (dead.pins(), alive.pins());
    dead.remove();

    // Young: maybe an init still at work. Kept.
    let out = ambassador(&["gc"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(dead_pins.is_dir());
    // Old, and its cgroup gone: removed. Old but its cgroup alive: kept.
    age(&dead_pins);
    age(&alive_pins);
    let out = ambassador(&["gc"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!dead_pins.exists(), "{}", text(&out));
    assert!(alive_pins.is_dir());
}

#[test]
fn each_capability_of_the_init_container_is_needed() {
    let _s = serial();
    let caps = init_caps();
    let cg = Cg::new(cgroup2_mount().join(unique("amb-caps-")));
    let path = cg.0.to_str().unwrap().to_string();
    let run = |caps: &[String]| {
        let sp = setpriv(caps);
        Command::new(&sp[0])
            .args(&sp[1..])
            .arg(bin())
            .args(["init", "--cgroup", &path])
            .output()
            .unwrap()
    };
    // What the process really holds under setpriv: exactly these.
    let sp = setpriv(&caps);
    let status = Command::new(&sp[0])
        .args(&sp[1..])
        .args(["cat", "/proc/self/status"])
        .output()
        .unwrap();
    let eff = stdout(&status)
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    // CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(eff, 1 << 12 | 1 << 38 | 1 << 39, "{:x}", eff);

    for i in 0..caps.len() {
        let fewer: Vec<String> = caps
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, c)| c.clone())
            .collect();
        let out = run(&fewer);
        assert!(!out.status.success(), "init worked without {}", caps[i]);
        assert_eq!(attached(&cg.0), 0);
    }
    let out = run(&caps);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(attached(&cg.0), p::ALL.len());
}
