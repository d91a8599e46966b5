//! `ambassador inject` on sample workloads.

use super::*;
use crate::inject::{containers::from_template, names::*};

fn run(text: &str) -> Injected {
    inject(text, &Options::default()).unwrap()
}

fn parse_all(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[k],
    })
}

fn names(list: &Value) -> Vec<&str> {
    list.as_sequence()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
    spec:
      initContainers:
        - {name: migrate, image: migrate:1}
      containers:
        - {name: web, image: web:1}
      volumes:
        - {name: data, emptyDir: {}}
";

#[test]
fn a_deployment_gets_init_sidecar_volumes_and_annotation() {
    let out = run(DEPLOYMENT);
    assert_eq!(out.report, vec!["ambassador: Deployment web: injected"]);
    let v = &parse_all(&out.text)[0];
    let spec = at(v, "spec.template.spec");
    // Ours first, so the user's init containers are intercepted and proxied too.
    assert_eq!(
        names(&spec["initContainers"]),
        vec![INIT_CONTAINER, PROXY_CONTAINER, "migrate"]
    );
    assert_eq!(names(&spec["containers"]), vec!["web"]);
    assert_eq!(
        names(&spec["volumes"]),
        vec!["data", VOL_CONFIG, VOL_BPFFS, VOL_CGROUP, VOL_ADMIN]
    );
    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(at(proxy, "securityContext.runAsUser").as_u64(), Some(1337));
    assert_eq!(at(proxy, "securityContext.capabilities.drop.0"), "ALL");
    let init = &spec["initContainers"][0];
    assert_eq!(
        at(init, "securityContext.capabilities.add"),
        &from_template("[BPF, NET_ADMIN, PERFMON]")
    );
    assert_eq!(init["args"][2], "auto");
    assert_eq!(
        at(v, "spec.template.metadata.annotations")[ANN_INJECTED],
        env!("CARGO_PKG_VERSION")
    );
}

#[test]
fn injecting_twice_is_injecting_once_byte_for_byte() {
    let once = run(DEPLOYMENT);
    let twice = run(&once.text);
    assert_eq!(once.text, twice.text);
    assert_eq!(
        twice.report,
        vec!["ambassador: Deployment web: already injected, unchanged"]
    );
}

#[test]
fn changed_annotations_are_applied_on_reinjection() {
    let once = run(DEPLOYMENT);
    let edited = once.text.replace(
        "      annotations:\n",
        "      annotations:\n        ambassador.io/exclude-outbound-ports: '5432'\n",
    );
    assert_ne!(edited, once.text);
    let out = run(&edited);
    assert_eq!(
        out.report,
        vec!["ambassador: Deployment web: injected again"]
    );
    let v = &parse_all(&out.text)[0];
    let spec = at(v, "spec.template.spec");
    assert_eq!(
        names(&spec["initContainers"]),
        vec![INIT_CONTAINER, PROXY_CONTAINER, "migrate"]
    );
    let args = &spec["initContainers"][0]["args"];
    assert_eq!(args[5], "--exclude-ports");
    assert_eq!(args[6], "5432");
}

#[test]
fn other_kinds_and_comments_pass_through_untouched() {
    let text = "\
# leading comment
apiVersion: v1
kind: Service   # trailing comment
metadata: {name: web}
spec: {ports: [{port: 80}]}
---
# only a comment
--- # marker with a comment
apiVersion: example.com/v1
kind: Deployment    # not apps/v1: someone else's kind
metadata: {name: crd}
spec: {template: {spec: {containers: []}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: c}
data:
  x: |
    ---
    not a marker: indented in a block scalar
...
";
    let out = run(text);
    assert_eq!(out.text, text);
    assert!(out.report.is_empty(), "{:?}", out.report);
}

#[test]
fn every_workload_kind_is_injected_at_its_pod_template() {
    let text = "\
apiVersion: v1
kind: Pod
metadata: {name: p}
spec: {containers: [{name: a, image: a}]}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: s}
spec: {serviceName: s, selector: {}, template: {spec: {containers: [{name: a, image: a}]}}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: d}
spec: {selector: {}, template: {spec: {containers: [{name: a, image: a}]}}}
---
apiVersion: batch/v1
kind: Job
metadata: {name: j}
spec: {template: {spec: {restartPolicy: Never, containers: [{name: a, image: a}]}}}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: c}
spec:
  schedule: '* * * * *'
  jobTemplate: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: a, image: a}]}}}}
---
apiVersion: v1
kind: List
items:
  - {apiVersion: apps/v1, kind: ReplicaSet, metadata: {name: r}, spec: {selector: {}, template: {spec: {containers: [{name: a, image: a}]}}}}
  - {apiVersion: v1, kind: Service, metadata: {name: svc}}
";
    let out = run(text);
    let docs = parse_all(&out.text);
    for (doc, path) in [
        (0, "spec"),
        (1, "spec.template.spec"),
        (2, "spec.template.spec"),
        (3, "spec.template.spec"),
        (4, "spec.jobTemplate.spec.template.spec"),
        (5, "items.0.spec.template.spec"),
    ] {
        let spec = at(&docs[doc], path);
        assert_eq!(
            names(&spec["initContainers"]),
            vec![INIT_CONTAINER, PROXY_CONTAINER],
            "document {doc}"
        );
    }
    assert!(docs[5]["items"][1].get("spec").is_none());
    assert_eq!(out.report.len(), 6, "{:?}", out.report);
    assert_eq!(run(&out.text).text, out.text);
}

#[test]
fn opting_out_leaves_the_workload_alone_or_takes_an_injection_out() {
    let opted = DEPLOYMENT.replace(
        "    metadata:\n      labels",
        "    metadata:\n      annotations: {ambassador.io/inject: \"false\"}\n      labels",
    );
    let out = run(&opted);
    assert_eq!(out.text, opted);
    assert_eq!(
        out.report,
        vec!["ambassador: Deployment web: skipped (ambassador.io/inject: \"false\")"]
    );
    // Opting out after an injection takes it out again.
    let injected = run(DEPLOYMENT).text;
    let v = &parse_all(&injected)[0];
    let mut v = v.clone();
    v["spec"]["template"]["metadata"]["annotations"]["ambassador.io/inject"] = "false".into();
    let out = run(&serde_yaml_ng::to_string(&v).unwrap());
    let back = &parse_all(&out.text)[0];
    let spec = at(back, "spec.template.spec");
    assert_eq!(names(&spec["initContainers"]), vec!["migrate"]);
    assert_eq!(names(&spec["volumes"]), vec!["data"]);
    assert!(out.report[0].contains("the earlier injection was taken out"));
    // On the workload's own metadata it counts too.
    let opted = DEPLOYMENT.replace(
        "metadata:\n  name: web",
        "metadata:\n  name: web\n  annotations: {ambassador.io/inject: disabled}",
    );
    assert_eq!(run(&opted).text, opted);
}

#[test]
fn annotations_become_init_exclusions_and_secret_mounts() {
    let text = DEPLOYMENT.replace(
            "    metadata:\n      labels",
            "    metadata:\n      annotations:\n        ambassador.io/exclude-outbound-ports: \"5432, 6379,5432\"\n        \
             ambassador.io/exclude-outbound-cidrs: 10.0.0.0/8,fd00::1\n        ambassador.io/secrets: tok,oauth-client\n        \
             ambassador.io/inbound-ports: \"8080,8443\"\n        ambassador.io/exclude-inbound-ports: \"9090\"\n        \
             ambassador.io/config: amb-special\n      labels",
        );
    let v = &parse_all(&run(&text).text)[0];
    let spec = at(v, "spec.template.spec");
    let args: Vec<&str> = spec["initContainers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args[5..],
        [
            "--exclude-ports",
            "5432,6379",
            "--exclude-cidrs",
            "10.0.0.0/8,fd00::1/128",
            "--inbound-ports",
            "8080,8443",
            "--exclude-inbound-ports",
            "9090"
        ]
    );
    // The proxy gets the same flags: the inbound ports open its listener,
    // and every flag is kept across reloads.
    let proxy_args: Vec<&str> = spec["initContainers"][1]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(proxy_args[5..], args[5..]);
    let mounts = &spec["initContainers"][1]["volumeMounts"];
    assert_eq!(
        mounts[1]["subPathExpr"],
        "ambassador/pod-$(AMBASSADOR_POD_UID)"
    );
    assert_eq!(mounts[1]["readOnly"], true);
    assert_eq!(mounts[2]["mountPath"], ADMIN_DIR);
    assert_eq!(mounts[3]["mountPath"], "/var/run/secrets/ambassador/tok");
    assert_eq!(
        mounts[4]["mountPath"],
        "/var/run/secrets/ambassador/oauth-client"
    );
    let vols = &spec["volumes"];
    assert_eq!(vols[1]["configMap"]["name"], "amb-special");
    assert_eq!(vols[4]["name"], VOL_ADMIN);
    assert_eq!(vols[5]["secret"]["secretName"], "tok");
    assert_eq!(vols[6]["name"], "ambassador-secret-oauth-client");
}

#[test]
fn errors_name_the_document_and_the_field() {
    let bad_port = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\n---\n{}",
            DEPLOYMENT.replace(
                "    metadata:\n      labels",
                "    metadata:\n      annotations: {ambassador.io/exclude-outbound-ports: \"80,http\"}\n      labels",
            )
        );
    let e = inject(&bad_port, &Options::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "document 2 (line 5, Deployment web): spec.template.metadata.annotations\
             [ambassador.io/exclude-outbound-ports]: `http` is not a port (1-65535)"
    );
    let cases = [
            (
                DEPLOYMENT.replace("  template:", "  templat:"),
                "document 1 (line 1, Deployment web): spec.template: missing",
            ),
            (
                DEPLOYMENT.replace("      containers:", "      containers: 3\n      x:"),
                "document 1 (line 1, Deployment web): spec.template.spec.containers: expected a list",
            ),
            (
                DEPLOYMENT.replace(
                    "    metadata:\n      labels",
                    "    metadata:\n      annotations: {ambassador.io/exclude-outbound-cidrs: 10.0.0.0/33}\n      labels",
                ),
                "document 1 (line 1, Deployment web): spec.template.metadata.annotations\
                 [ambassador.io/exclude-outbound-cidrs]: `10.0.0.0/33` is not a CIDR (like 10.0.0.0/8 or fd00::/8)",
            ),
            (
                DEPLOYMENT.replace(
                    "    metadata:\n      labels",
                    "    metadata:\n      annotations: {ambassador.io/inbound-ports: \"8080,every\"}\n      labels",
                ),
                "document 1 (line 1, Deployment web): spec.template.metadata.annotations\
                 [ambassador.io/inbound-ports]: `every` is not a port (1-65535) or `all`",
            ),
            (
                DEPLOYMENT.replace(
                    "metadata:\n  name: web",
                    "metadata:\n  name: web\n  annotations: {ambassador.io/inject: maybe}",
                ),
                "document 1 (line 1, Deployment web): metadata.annotations[ambassador.io/inject]: \
                 `maybe` is neither \"true\" nor \"false\"",
            ),
            (
                DEPLOYMENT.replace(
                    "    metadata:\n      labels",
                    "    metadata:\n      annotations: {ambassador.io/secrets: Bad_Name}\n      labels",
                ),
                "document 1 (line 1, Deployment web): spec.template.metadata.annotations\
                 [ambassador.io/secrets]: `Bad_Name` is not a valid name (lowercase letters, digits, '-', \
                 at most 45 characters)",
            ),
            (
                "a: 1\n---\nkind: Pod\nspec: [unclosed\n".to_string(),
                "document 2: did not find expected ',' or ']' at line 5 column 1, while parsing a flow \
                 sequence at line 4 column 7",
            ),
        ];
    for (text, want) in cases {
        let e = inject(&text, &Options::default()).unwrap_err().to_string();
        assert_eq!(e, want);
    }
}

#[test]
fn host_network_pods_are_skipped() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: h}\nspec: {hostNetwork: true, containers: [{name: a, image: a}]}\n";
    let out = run(text);
    assert_eq!(out.text, text);
    assert!(
        out.report[0].contains("skipped (hostNetwork"),
        "{:?}",
        out.report
    );
}

#[test]
fn documents_split_at_markers_only() {
    let text = "---\na: 1\n--- # c\nb: 2\n--- {c: 3}\n---\nd: 4";
    let docs = split_documents(text);
    let bodies: Vec<(&str, &str, usize)> =
        docs.iter().map(|d| (d.marker, d.body, d.line)).collect();
    assert_eq!(
        bodies,
        vec![
            ("---\n", "a: 1\n", 2),
            ("--- # c\n", "b: 2\n", 4),
            ("", "--- {c: 3}\n", 5),
            ("---\n", "d: 4", 7)
        ]
    );
    assert_eq!(split_documents("").len(), 1);
    let rebuilt: String = docs.iter().flat_map(|d| [d.marker, d.body]).collect();
    assert_eq!(rebuilt, text);
}

/// The shipped manifests agree with `inject`, and the shipped config is valid.
#[test]
fn deploy_manifests_are_what_inject_makes() {
    let app = include_str!("../../../deploy/kubernetes/examples/app.yaml");
    let shipped = include_str!("../../../deploy/kubernetes/deployment.yaml");
    assert_eq!(parse_all(&run(app).text), parse_all(shipped));
    let cm = &parse_all(include_str!("../../../deploy/kubernetes/configmap.yaml"))[0];
    let cfg = crate::config::Config::parse(cm["data"]["config.yaml"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("deploy/kubernetes/configmap.yaml: {e}"));
    assert_eq!(cfg.proxy.uid, 1337);
    assert_eq!(cfg.proxy.uid, ambassador_common::DEFAULT_PROXY_UID);
}

#[test]
fn the_init_container_runs_unconfined_and_the_metrics_port_is_announced() {
    let v = &parse_all(&run(DEPLOYMENT).text)[0];
    let a = at(v, "spec.template.metadata.annotations");
    // The runtime's default AppArmor profile denies writes to the bpffs.
    assert_eq!(a[ANN_APPARMOR_INIT], "unconfined");
    assert!(ANN_APPARMOR_INIT.ends_with(&format!("/{INIT_CONTAINER}")));
    assert_eq!(a["prometheus.io/scrape"], "true");
    assert_eq!(a["prometheus.io/port"], "15090");
    assert_eq!(a["prometheus.io/path"], "/metrics");
    let proxy = at(v, "spec.template.spec.initContainers.1");
    assert_eq!(at(proxy, "ports.0.containerPort").as_u64(), Some(15090));
    assert_eq!(at(proxy, "ports.0.name"), METRICS_PORT_NAME);
    assert!(
        METRICS_PORT_NAME.len() <= 15,
        "a port name is an IANA_SVC_NAME"
    );
}

#[test]
fn the_apps_own_scrape_annotations_are_left_alone() {
    let own = DEPLOYMENT.replace(
        "      labels: {app: web}\n",
        "      labels: {app: web}\n      annotations: {prometheus.io/scrape: 'true', prometheus.io/port: '9102'}\n",
    );
    let out = run(&own);
    assert!(
        out.report[0].contains("the Pod's prometheus.io annotations are its own"),
        "{:?}",
        out.report
    );
    let v = &parse_all(&out.text)[0];
    let a = at(v, "spec.template.metadata.annotations");
    assert_eq!(a["prometheus.io/port"], "9102");
    assert!(a.get("prometheus.io/path").is_none());
    // Injecting again changes nothing, and taking the injection out keeps them.
    assert_eq!(run(&out.text).text, out.text);
    let off = out.text.replace(
        "prometheus.io/port: '9102'",
        "prometheus.io/port: '9102'\n        ambassador.io/inject: 'false'",
    );
    let v = &parse_all(&run(&off).text)[0];
    let a = at(v, "spec.template.metadata.annotations");
    assert_eq!(a["prometheus.io/port"], "9102");
    assert!(a.get(ANN_APPARMOR_INIT).is_none());
    // Ours, once injected, go with the injection.
    let ours = run(DEPLOYMENT).text.replace(
        "      annotations:\n",
        "      annotations:\n        ambassador.io/inject: 'false'\n",
    );
    let v = &parse_all(&run(&ours).text)[0];
    let a = at(v, "spec.template.metadata.annotations");
    assert!(a.get("prometheus.io/scrape").is_none(), "{a:?}");
    assert!(a.get(ANN_APPARMOR_INIT).is_none());
}

#[test]
fn an_app_running_as_the_proxys_uid_is_refused() {
    let container = DEPLOYMENT.replace(
        "{name: web, image: web:1}",
        "{name: web, image: web:1, securityContext: {runAsUser: 1337}}",
    );
    let e = inject(&container, &Options::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "document 1 (line 1, Deployment web): spec.template.spec.containers[0].securityContext.runAsUser: \
         container `web` runs as uid 1337, the proxy's own (proxy.uid), whose connections are never \
         redirected: it would bypass the proxy; run it as another uid"
    );
    // Set for the whole Pod, it reaches the app's init containers too.
    let pod = DEPLOYMENT.replace(
        "      initContainers:\n",
        "      securityContext: {runAsUser: 1337}\n      initContainers:\n",
    );
    let e = inject(&pod, &Options::default()).unwrap_err().to_string();
    assert!(
        e.contains(
            "spec.template.spec.securityContext.runAsUser: container `migrate` runs as uid 1337"
        ),
        "{e}"
    );
    // Every container overriding the Pod's uid: nothing runs as 1337.
    let overridden = pod
        .replace(
            "{name: migrate, image: migrate:1}",
            "{name: migrate, image: migrate:1, securityContext: {runAsUser: 1000}}",
        )
        .replace(
            "{name: web, image: web:1}",
            "{name: web, image: web:1, securityContext: {runAsUser: 1000}}",
        );
    assert_eq!(
        run(&overridden).report,
        vec!["ambassador: Deployment web: injected"]
    );
}
