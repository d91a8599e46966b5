//! What is added to a Pod template: the init container, the proxy's native
//! sidecar, and their volumes, written as YAML templates.

use serde_yaml_ng::Value;

use super::names::*;

/// YAML from a template whose holes are filled with JSON (valid YAML flow
/// values), so no input can change the structure.
pub fn from_template(text: &str) -> Value {
    serde_yaml_ng::from_str(text).expect("the templates are valid YAML")
}

pub fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("strings and lists serialize")
}

/// `flags`: the annotations' interception flags (the same on both
/// containers: `init` writes them to the kernel, the proxy opens its inbound
/// listener by them and keeps them across reloads).
pub fn init_container(image: &str, flags: &[String]) -> Value {
    let mut args = vec![
        "init".to_string(),
        "--cgroup".into(),
        "auto".into(),
        "--config".into(),
        format!("{CONFIG_DIR}/config.yaml"),
    ];
    args.extend_from_slice(flags);
    from_template(&format!(
        r#"
name: {INIT_CONTAINER}
image: {image}
args: {args}
{POD_UID_ENV}
resources:
  requests:
    cpu: 10m
    memory: 64Mi
  limits:
    memory: 256Mi
securityContext:
  runAsUser: 0
  runAsGroup: 0
  runAsNonRoot: false
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
    add: [BPF, NET_ADMIN, PERFMON]
  # Runtimes' default seccomp profiles of before 2023 (containers-common
  # 0.50, as in podman 4.3) allow bpf(2) only with CAP_SYS_ADMIN: far more
  # power than lifting seccomp for a run-once container of our binary.
  seccompProfile:
    type: Unconfined
volumeMounts:
  - name: {VOL_CONFIG}
    mountPath: {CONFIG_DIR}
    readOnly: true
  - name: {VOL_BPFFS}
    mountPath: /sys/fs/bpf
  - name: {VOL_CGROUP}
    mountPath: {HOST_CGROUP_DIR}
    readOnly: true
"#,
        image = json(&image),
        args = json(&args),
    ))
}

pub fn proxy_container(image: &str, secrets: &[String], flags: &[String]) -> Value {
    let mut args = vec![
        "proxy".to_string(),
        "--config".into(),
        format!("{CONFIG_DIR}/config.yaml"),
        "--kernel-maps".into(),
        KERNEL_MAPS_DIR.into(),
    ];
    args.extend_from_slice(flags);
    let mut c = from_template(&format!(
        r#"
name: {PROXY_CONTAINER}
image: {image}
restartPolicy: Always
args: {args}
{POD_UID_ENV}
startupProbe:
  exec:
    command: [{BINARY}, probe, ready]
  periodSeconds: 1
  timeoutSeconds: 2
  failureThreshold: 60
readinessProbe:
  exec:
    command: [{BINARY}, probe, ready]
  periodSeconds: 5
  timeoutSeconds: 2
livenessProbe:
  exec:
    command: [{BINARY}, probe, live]
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
resources:
  requests:
    cpu: 50m
    memory: 64Mi
  limits:
    memory: 512Mi
ports:
  - name: {METRICS_PORT_NAME}
    containerPort: {METRICS_PORT}
    protocol: TCP
securityContext:
  runAsUser: {PROXY_UID}
  runAsGroup: {PROXY_UID}
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
  # It opens its Pod's pinned maps with bpf(2) (counters, exclusions, the
  # inbound listener), which default seccomp profiles allow only with
  # CAP_SYS_ADMIN or CAP_BPF: unconfined, with no capability at all.
  seccompProfile:
    type: Unconfined
volumeMounts:
  - name: {VOL_CONFIG}
    mountPath: {CONFIG_DIR}
    readOnly: true
  # This Pod's counters and exclusion maps, shared by init, and nothing
  # else of the node's bpffs.
  - name: {VOL_BPFFS}
    mountPath: {KERNEL_MAPS_DIR}
    subPathExpr: ambassador/pod-$(AMBASSADOR_POD_UID)
    readOnly: true
  # The admin socket, the one door for changes: the app does not mount it.
  - name: {VOL_ADMIN}
    mountPath: {ADMIN_DIR}
"#,
        image = json(&image),
        args = json(&args),
    ));
    if let Some(Value::Sequence(mounts)) =
        c.as_mapping_mut().and_then(|m| m.get_mut("volumeMounts"))
    {
        for s in secrets {
            mounts.push(from_template(&format!(
                "{{name: {}, mountPath: {}, readOnly: true}}",
                json(&format!("{VOL_SECRET}{s}")),
                json(&format!("{SECRETS_DIR}/{s}")),
            )));
        }
    }
    c
}

pub fn pod_volumes(config_map: &str, secrets: &[String]) -> Vec<Value> {
    let mut v = vec![
        from_template(&format!(
            "{{name: {VOL_CONFIG}, configMap: {{name: {}}}}}",
            json(&config_map)
        )),
        from_template(&format!(
            "{{name: {VOL_BPFFS}, hostPath: {{path: /sys/fs/bpf, type: Directory}}}}"
        )),
        from_template(&format!(
            "{{name: {VOL_CGROUP}, hostPath: {{path: /sys/fs/cgroup, type: Directory}}}}"
        )),
        from_template(&format!(
            "{{name: {VOL_ADMIN}, emptyDir: {{medium: Memory, sizeLimit: 1Mi}}}}"
        )),
    ];
    for s in secrets {
        v.push(from_template(&format!(
            "{{name: {}, secret: {{secretName: {}}}}}",
            json(&format!("{VOL_SECRET}{s}")),
            json(s)
        )));
    }
    v
}
