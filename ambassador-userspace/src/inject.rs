//! `ambassador inject`: adds the ambassador to Kubernetes workloads, like
//! `linkerd inject`: YAML in (several documents, any kinds), YAML out.
//!
//! The Pod template of a Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet,
//! ReplicationController, Job or CronJob (and of each item of a `List`) gets
//! the privileged `ambassador-init` init container, the `ambassador-proxy`
//! native sidecar (an init container with `restartPolicy: Always`), their
//! volumes and an `ambassador.io/injected` annotation. Only the fields it
//! touches are read: documents are generic YAML values, not a model of the
//! Kubernetes API.
//!
//! Injecting is idempotent: whatever an earlier injection added is taken out
//! first and added again from the current annotations, and a document that
//! comes out equal to what went in (like any other kind) is copied through
//! byte for byte, comments included. A changed document is written back by
//! serde_yaml_ng: same keys in the same order, but its comments are lost.
//!
//! Pod annotations (on the Pod template, or on the workload itself):
//! - `ambassador.io/inject: "false"`: leave this workload out (and take an
//!   earlier injection out again);
//! - `ambassador.io/exclude-outbound-ports: "5432,6379"` and
//!   `ambassador.io/exclude-outbound-cidrs: "10.0.0.0/8,fd00::/8"`: never
//!   intercepted, passed to `init` (`--exclude-ports`, `--exclude-cidrs`);
//! - `ambassador.io/config: NAME`: the ConfigMap with `config.yaml`;
//! - `ambassador.io/secrets: "a,b"`: Secrets mounted into the proxy at
//!   `/var/run/secrets/ambassador/<name>/`.

use serde_yaml_ng::{Mapping, Value};

use crate::config::Cidr;

pub const DEFAULT_IMAGE: &str = concat!("ambassador:", env!("CARGO_PKG_VERSION"));
pub const DEFAULT_CONFIG_MAP: &str = "ambassador";

pub const ANN_INJECT: &str = "ambassador.io/inject";
pub const ANN_INJECTED: &str = "ambassador.io/injected";
pub const ANN_EXCLUDE_PORTS: &str = "ambassador.io/exclude-outbound-ports";
pub const ANN_EXCLUDE_CIDRS: &str = "ambassador.io/exclude-outbound-cidrs";
pub const ANN_CONFIG: &str = "ambassador.io/config";
pub const ANN_SECRETS: &str = "ambassador.io/secrets";

pub const INIT_CONTAINER: &str = "ambassador-init";
pub const PROXY_CONTAINER: &str = "ambassador-proxy";
const VOL_CONFIG: &str = "ambassador-config";
const VOL_BPFFS: &str = "ambassador-bpffs";
/// Both containers get the Pod's UID: init finds the Pod's cgroup and names
/// the shared maps by it; the proxy's mount of those maps is named by it.
const POD_UID_ENV: &str = "env:
  - name: AMBASSADOR_POD_UID
    valueFrom:
      fieldRef:
        fieldPath: metadata.uid";
/// Where the sidecar sees its Pod's shared maps (`proxy --kernel-maps`).
const KERNEL_MAPS_DIR: &str = "/var/run/ambassador/kernel";
const VOL_CGROUP: &str = "ambassador-cgroup";
/// The sidecar's own directory for its admin socket (`proxy.admin_socket`).
const VOL_ADMIN: &str = "ambassador-admin";
const ADMIN_DIR: &str = "/var/run/ambassador/admin";
const VOL_SECRET: &str = "ambassador-secret-";

/// Where the image has the binary (deploy/Dockerfile), for exec probes.
pub const BINARY: &str = "/usr/local/bin/ambassador";
pub const CONFIG_DIR: &str = "/etc/ambassador";
pub const SECRETS_DIR: &str = "/var/run/secrets/ambassador";
/// Where the init container sees the node's cgroupfs.
pub const HOST_CGROUP_DIR: &str = "/host/sys/fs/cgroup";

/// What `inject` adds, besides the annotations.
#[derive(Debug, Clone)]
pub struct Options {
    pub image: String,
    pub config_map: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image: DEFAULT_IMAGE.into(),
            config_map: DEFAULT_CONFIG_MAP.into(),
        }
    }
}

/// The manifests with the ambassador added, and one line per workload seen.
#[derive(Debug)]
pub struct Injected {
    pub text: String,
    pub report: Vec<String>,
}

/// Input `inject` cannot use; one line naming the document and the field.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("document {doc}: {message}")]
    Yaml { doc: usize, message: String },
    #[error("document {doc} (line {line}, {what}): {field}: {message}")]
    Field {
        doc: usize,
        line: usize,
        what: String,
        field: String,
        message: String,
    },
    #[error("--image {0:?}: an image reference cannot be empty or contain whitespace")]
    Image(String),
}

/// One YAML document of the input, as text.
struct Document<'a> {
    /// The `---` line that opened it (empty for the first, unmarked one).
    marker: &'a str,
    body: &'a str,
    /// 1-based line of the body's first line in the input.
    line: usize,
}

/// A `---` line with nothing after it but a comment: a document marker that
/// carries no content of its own.
fn is_bare_marker(line: &str) -> Option<bool> {
    let rest = line.strip_prefix("---")?;
    let rest = rest.trim_end_matches(['\n', '\r']);
    if rest.is_empty()
        || rest.starts_with([' ', '\t']) && {
            let t = rest.trim_start();
            t.is_empty() || t.starts_with('#')
        }
    {
        Some(true)
    } else if rest.starts_with([' ', '\t']) {
        Some(false)
    } else {
        None
    }
}

/// Splits a YAML stream at its document markers. YAML forbids a `---` at the
/// start of a line inside any scalar, so the split is exact.
fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let (mut marker, mut start, mut start_line) = ("", 0, 1);
    let mut pos = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if let Some(bare) = is_bare_marker(line) {
            if pos > start || !marker.is_empty() || !docs.is_empty() {
                docs.push(Document {
                    marker,
                    body: &text[start..pos],
                    line: start_line,
                });
            }
            if bare {
                marker = &text[pos..pos + line.len()];
                start = pos + line.len();
                start_line = i + 2;
            } else {
                // `--- {kind: ...}`: the content starts on the marker line.
                marker = "";
                start = pos;
                start_line = i + 1;
            }
        }
        pos += line.len();
    }
    if pos > start || !marker.is_empty() || docs.is_empty() {
        docs.push(Document {
            marker,
            body: &text[start..],
            line: start_line,
        });
    }
    docs
}

/// Where one document's errors point.
struct Ctx {
    doc: usize,
    line: usize,
    what: String,
}

impl Ctx {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> InjectError {
        InjectError::Field {
            doc: self.doc,
            line: self.line,
            what: self.what.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Adds the ambassador to every workload in `text`.
pub fn inject(text: &str, opts: &Options) -> Result<Injected, InjectError> {
    if opts.image.is_empty() || opts.image.contains(char::is_whitespace) {
        return Err(InjectError::Image(opts.image.clone()));
    }
    let mut out = String::with_capacity(text.len() + 4096);
    let mut report = Vec::new();
    for (i, doc) in split_documents(text).into_iter().enumerate() {
        out.push_str(doc.marker);
        let original: Value = serde_yaml_ng::from_str(doc.body).map_err(|e| InjectError::Yaml {
            doc: i + 1,
            message: shift_lines(&e.to_string(), doc.line - 1),
        })?;
        let mut value = original.clone();
        let ctx = Ctx {
            doc: i + 1,
            line: doc.line,
            what: describe(&value),
        };
        inject_object(&mut value, "", &ctx, opts, &mut report)?;
        if value == original {
            out.push_str(doc.body);
        } else {
            let text = serde_yaml_ng::to_string(&value).map_err(|e| InjectError::Yaml {
                doc: i + 1,
                message: e.to_string(),
            })?;
            out.push_str(&text);
        }
    }
    Ok(Injected { text: out, report })
}

/// The parser counts lines from the start of the document: make every
/// `line N` in its message count from the start of the input.
fn shift_lines(message: &str, by: usize) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("line ") {
        let (head, tail) = rest.split_at(i + 5);
        out.push_str(head);
        let digits = tail.len() - tail.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_mapping().and_then(|m| m.get(key))
}

fn get_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    get(v, key).and_then(Value::as_str)
}

/// `Deployment web`, for messages.
fn describe(v: &Value) -> String {
    let kind = get_str(v, "kind").unwrap_or("(no kind)");
    let name = get(v, "metadata")
        .and_then(|m| get_str(m, "name").or_else(|| get_str(m, "generateName")))
        .unwrap_or("(unnamed)");
    format!("{kind} {name}")
}

/// The path from an object to its Pod template (metadata + spec), by kind;
/// `None` for kinds without one.
fn template_path(kind: &str, api_version: &str) -> Option<&'static [&'static str]> {
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    match (kind, group) {
        ("Pod", "") => Some(&[]),
        ("ReplicationController", "") => Some(&["spec", "template"]),
        ("Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet", "apps" | "extensions") => {
            Some(&["spec", "template"])
        }
        ("Job", "batch") => Some(&["spec", "template"]),
        ("CronJob", "batch") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn inject_object(
    obj: &mut Value,
    prefix: &str,
    ctx: &Ctx,
    opts: &Options,
    report: &mut Vec<String>,
) -> Result<(), InjectError> {
    let Some(map) = obj.as_mapping_mut() else {
        return Ok(()); // not a Kubernetes object: passed through
    };
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or_default();
    let api_version = map
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if kind == "List" && api_version == "v1" {
        let field = join(prefix, "items");
        let Some(items) = map.get_mut("items") else {
            return Ok(());
        };
        let items = items
            .as_sequence_mut()
            .ok_or_else(|| ctx.err(&field, "expected a list"))?;
        for (i, item) in items.iter_mut().enumerate() {
            let item_ctx = Ctx {
                doc: ctx.doc,
                line: ctx.line,
                what: format!("{}, item {i}: {}", ctx.what, describe(item)),
            };
            inject_object(item, &format!("{field}[{i}]"), &item_ctx, opts, report)?;
        }
        return Ok(());
    }
    let Some(path) = template_path(kind, api_version) else {
        return Ok(());
    };
    let name = describe(obj);
    let workload_annotations = annotations(obj, prefix, ctx)?;
    let mut field = prefix.to_string();
    let mut template = &mut *obj;
    for key in path {
        field = join(&field, key);
        template = template
            .as_mapping_mut()
            .ok_or_else(|| ctx.err(&field, "expected a mapping"))?
            .get_mut(*key)
            .ok_or_else(|| ctx.err(&field, "missing"))?;
    }
    if !template.is_mapping() {
        return Err(ctx.err(&field, "expected a mapping"));
    }
    let line = inject_template(template, &field, &workload_annotations, ctx, opts)?;
    report.push(format!("ambassador: {name}: {line}"));
    Ok(())
}

/// The string annotations of an object, checked to be strings.
fn annotations(obj: &Value, prefix: &str, ctx: &Ctx) -> Result<Mapping, InjectError> {
    let field = join(prefix, "metadata.annotations");
    match get(obj, "metadata").and_then(|m| get(m, "annotations")) {
        None | Some(Value::Null) => Ok(Mapping::new()),
        Some(Value::Mapping(m)) => Ok(m.clone()),
        Some(_) => Err(ctx.err(field, "expected a mapping of strings")),
    }
}

/// An annotation of ours: the Pod template's, else the workload's.
fn annotation<'a>(
    own: &'a Mapping,
    workload: &'a Mapping,
    key: &str,
    field: &str,
    ctx: &Ctx,
) -> Result<Option<(&'a str, String)>, InjectError> {
    let (value, where_) = match own.get(key) {
        Some(v) => (v, format!("{field}.metadata.annotations[{key}]")),
        None => match workload.get(key) {
            Some(v) => (v, format!("metadata.annotations[{key}]")),
            None => return Ok(None),
        },
    };
    match value.as_str() {
        Some(s) => Ok(Some((s, where_))),
        None => Err(ctx.err(where_, "must be a string (quote it)")),
    }
}

/// Takes out what an earlier injection added; true if there was any.
fn strip(spec: &mut Mapping, annotations: Option<&mut Mapping>) -> bool {
    let mut found = false;
    for key in ["initContainers", "containers"] {
        if let Some(Value::Sequence(list)) = spec.get_mut(key) {
            let before = list.len();
            list.retain(|c| !matches!(get_str(c, "name"), Some(INIT_CONTAINER | PROXY_CONTAINER)));
            found |= list.len() != before;
        }
    }
    if matches!(spec.get("initContainers"), Some(Value::Sequence(l)) if l.is_empty()) && found {
        spec.remove("initContainers");
    }
    if let Some(Value::Sequence(list)) = spec.get_mut("volumes") {
        let before = list.len();
        list.retain(|v| {
            !get_str(v, "name").is_some_and(|n| {
                [VOL_CONFIG, VOL_BPFFS, VOL_CGROUP, VOL_ADMIN].contains(&n)
                    || n.starts_with(VOL_SECRET)
            })
        });
        found |= list.len() != before;
        if list.is_empty() && found {
            spec.remove("volumes");
        }
    }
    if let Some(a) = annotations {
        found |= a.remove(ANN_INJECTED).is_some();
    }
    found
}

/// Injects into one Pod template; returns the report line.
fn inject_template(
    template: &mut Value,
    field: &str,
    workload: &Mapping,
    ctx: &Ctx,
    opts: &Options,
) -> Result<String, InjectError> {
    let before = template.clone();
    let own = annotations(template, field, ctx)?;
    let at = |k: &str| {
        if field.is_empty() {
            k.to_string()
        } else {
            format!("{field}.{k}")
        }
    };
    let map = template.as_mapping_mut().expect("checked by the caller");
    let spec_field = at("spec");
    let spec = match map.get_mut("spec") {
        Some(Value::Mapping(m)) => m,
        Some(_) => return Err(ctx.err(spec_field, "expected a mapping")),
        None => return Err(ctx.err(spec_field, "missing")),
    };
    for key in ["initContainers", "containers", "volumes"] {
        if !matches!(
            spec.get(key),
            None | Some(Value::Sequence(_)) | Some(Value::Null)
        ) {
            return Err(ctx.err(format!("{spec_field}.{key}"), "expected a list"));
        }
        if matches!(spec.get(key), Some(Value::Null)) {
            spec.remove(key);
        }
    }

    let opt_out = annotation(&own, workload, ANN_INJECT, field, ctx)?;
    let skip = match opt_out {
        Some((v @ ("false" | "disabled"), _)) => Some(format!("skipped ({ANN_INJECT}: {v:?})")),
        Some(("true" | "enabled", _)) => None,
        Some((v, where_)) => {
            return Err(ctx.err(where_, format!("`{v}` is neither \"true\" nor \"false\"")));
        }
        None => None,
    };
    let skip = skip.or_else(|| {
        matches!(spec.get("hostNetwork"), Some(Value::Bool(true))).then(|| {
            "skipped (hostNetwork: the proxy's loopback listener would be the node's)".to_string()
        })
    });

    // Parse everything before changing anything.
    let ports = match annotation(&own, workload, ANN_EXCLUDE_PORTS, field, ctx)? {
        Some((v, where_)) => parse_list(v, |p| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .map(|p| p.to_string())
                .ok_or_else(|| format!("`{p}` is not a port (1-65535)"))
        })
        .map_err(|m| ctx.err(where_, m))?,
        None => Vec::new(),
    };
    let cidrs = match annotation(&own, workload, ANN_EXCLUDE_CIDRS, field, ctx)? {
        Some((v, where_)) => parse_list(v, |c| c.parse::<Cidr>().map(|c| c.to_string()))
            .map_err(|m| ctx.err(where_, m))?,
        None => Vec::new(),
    };
    let config_map = match annotation(&own, workload, ANN_CONFIG, field, ctx)? {
        Some((v, where_)) => {
            check_name(v, 253).map_err(|m| ctx.err(where_, m))?;
            v.to_string()
        }
        None => opts.config_map.clone(),
    };
    let secrets = match annotation(&own, workload, ANN_SECRETS, field, ctx)? {
        Some((v, where_)) => parse_list(v, |s| {
            // The volume name (a DNS label) is the prefix and the Secret's name.
            check_name(s, 63 - VOL_SECRET.len())
                .and_then(|()| {
                    if s.contains('.') {
                        Err(format!(
                            "`{s}`: Secrets with dots in their names are not supported"
                        ))
                    } else {
                        Ok(())
                    }
                })
                .map(|()| s.to_string())
        })
        .map_err(|m| ctx.err(where_, m))?,
        None => Vec::new(),
    };

    let mut annotations_now = match map.get_mut("metadata") {
        Some(Value::Mapping(meta)) => match meta.get_mut("annotations") {
            Some(Value::Mapping(a)) => Some(a),
            _ => None,
        },
        _ => None,
    }
    .map(std::mem::take);
    let spec = map
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .expect("checked above");
    let was_injected = strip(spec, annotations_now.as_mut());
    let report = if let Some(reason) = skip {
        if was_injected {
            format!("{reason}; the earlier injection was taken out")
        } else {
            reason
        }
    } else {
        let mut init_list = vec![
            init_container(&opts.image, &ports, &cidrs),
            proxy_container(&opts.image, &secrets, &ports, &cidrs),
        ];
        if let Some(Value::Sequence(existing)) = spec.remove("initContainers") {
            init_list.extend(existing);
        }
        spec.insert("initContainers".into(), Value::Sequence(init_list));
        let mut volumes = match spec.remove("volumes") {
            Some(Value::Sequence(v)) => v,
            _ => Vec::new(),
        };
        volumes.extend(pod_volumes(&config_map, &secrets));
        spec.insert("volumes".into(), Value::Sequence(volumes));
        let a = annotations_now.get_or_insert_with(Mapping::new);
        a.insert(ANN_INJECTED.into(), env!("CARGO_PKG_VERSION").into());
        if was_injected {
            "injected again".to_string()
        } else {
            "injected".to_string()
        }
    };
    if let Some(a) = annotations_now {
        let meta = map
            .entry("metadata".into())
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if let Value::Null = meta {
            *meta = Value::Mapping(Mapping::new());
        }
        let Some(meta) = meta.as_mapping_mut() else {
            return Err(ctx.err(at("metadata"), "expected a mapping"));
        };
        if a.is_empty() && !meta.contains_key("annotations") {
            // Nothing to write: do not add an empty mapping.
        } else {
            meta.insert("annotations".into(), Value::Mapping(a));
        }
    }
    if *template == before {
        return Ok(if was_injected {
            "already injected, unchanged".into()
        } else {
            report
        });
    }
    Ok(report)
}

/// A comma-separated annotation, each item checked by `item`.
fn parse_list(
    value: &str,
    item: impl Fn(&str) -> Result<String, String>,
) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let v = item(part)?;
        if !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(out)
}

/// A Kubernetes object name (DNS-1123: lowercase letters, digits, '-' and '.').
fn check_name(name: &str, max: usize) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ends_ok = name
        .chars()
        .next()
        .zip(name.chars().last())
        .is_some_and(|(a, b)| a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric());
    if !name.is_empty() && name.len() <= max && ok_chars && ends_ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name (lowercase letters, digits, '-', at most {max} characters)"
        ))
    }
}

/// YAML from a template whose holes are filled with JSON (valid YAML flow
/// values), so no input can change the structure.
fn from_template(text: &str) -> Value {
    serde_yaml_ng::from_str(text).expect("the templates are valid YAML")
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("strings and lists serialize")
}

/// The annotation exclusions, as flags: `init` writes them to the kernel, and
/// the proxy keeps them across reloads.
fn exclusion_args(args: &mut Vec<String>, ports: &[String], cidrs: &[String]) {
    if !ports.is_empty() {
        args.extend(["--exclude-ports".into(), ports.join(",")]);
    }
    if !cidrs.is_empty() {
        args.extend(["--exclude-cidrs".into(), cidrs.join(",")]);
    }
}

fn init_container(image: &str, ports: &[String], cidrs: &[String]) -> Value {
    let mut args = vec![
        "init".to_string(),
        "--cgroup".into(),
        "auto".into(),
        "--config".into(),
        format!("{CONFIG_DIR}/config.yaml"),
    ];
    exclusion_args(&mut args, ports, cidrs);
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
  seccompProfile:
    type: RuntimeDefault
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

fn proxy_container(image: &str, secrets: &[String], ports: &[String], cidrs: &[String]) -> Value {
    let mut args = vec![
        "proxy".to_string(),
        "--config".into(),
        format!("{CONFIG_DIR}/config.yaml"),
        "--kernel-maps".into(),
        KERNEL_MAPS_DIR.into(),
    ];
    exclusion_args(&mut args, ports, cidrs);
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
securityContext:
  runAsUser: 1337
  runAsGroup: 1337
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
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

fn pod_volumes(config_map: &str, secrets: &[String]) -> Vec<Value> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
                "10.0.0.0/8,fd00::1/128"
            ]
        );
        // The proxy keeps the same exclusions across reloads.
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
        let app = include_str!("../../deploy/kubernetes/examples/app.yaml");
        let shipped = include_str!("../../deploy/kubernetes/deployment.yaml");
        assert_eq!(parse_all(&run(app).text), parse_all(shipped));
        let cm = &parse_all(include_str!("../../deploy/kubernetes/configmap.yaml"))[0];
        let cfg = crate::config::Config::parse(cm["data"]["config.yaml"].as_str().unwrap())
            .unwrap_or_else(|e| panic!("deploy/kubernetes/configmap.yaml: {e}"));
        assert_eq!(cfg.proxy.uid, 1337);
        assert_eq!(cfg.proxy.uid, ambassador_common::DEFAULT_PROXY_UID);
    }
}
