//! Finding the Pod templates in a document (by kind, through `List`s) and
//! injecting into each: what was added before taken out, the annotations
//! read and checked, the containers and volumes added again.

use serde_yaml_ng::{Mapping, Value};

use super::{
    containers::{init_container, pod_volumes, proxy_container},
    names::*,
    types::{Ctx, InjectError, Options},
};
use crate::config::Cidr;

pub fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_mapping().and_then(|m| m.get(key))
}

pub fn get_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    get(v, key).and_then(Value::as_str)
}

/// `Deployment web`, for messages.
pub fn describe(v: &Value) -> String {
    let kind = get_str(v, "kind").unwrap_or("(no kind)");
    let name = get(v, "metadata")
        .and_then(|m| get_str(m, "name").or_else(|| get_str(m, "generateName")))
        .unwrap_or("(unnamed)");
    format!("{kind} {name}")
}

/// The path from an object to its Pod template (metadata + spec), by kind;
/// `None` for kinds without one.
pub fn template_path(kind: &str, api_version: &str) -> Option<&'static [&'static str]> {
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

pub fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

pub fn inject_object(
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
pub fn annotations(obj: &Value, prefix: &str, ctx: &Ctx) -> Result<Mapping, InjectError> {
    let field = join(prefix, "metadata.annotations");
    match get(obj, "metadata").and_then(|m| get(m, "annotations")) {
        None | Some(Value::Null) => Ok(Mapping::new()),
        Some(Value::Mapping(m)) => Ok(m.clone()),
        Some(_) => Err(ctx.err(field, "expected a mapping of strings")),
    }
}

/// An annotation of ours: the Pod template's, else the workload's.
pub fn annotation<'a>(
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
pub fn strip(spec: &mut Mapping, annotations: Option<&mut Mapping>) -> bool {
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
    if let Some(a) = annotations
        && a.remove(ANN_INJECTED).is_some()
    {
        found = true;
        a.remove(ANN_APPARMOR_INIT);
        let ours = scrape_values();
        if ANN_SCRAPE
            .iter()
            .zip(&ours)
            .all(|(k, v)| a.get(*k).and_then(Value::as_str) == Some(v.as_str()))
        {
            for k in ANN_SCRAPE {
                a.remove(k);
            }
        }
    }
    found
}

/// What a Pod's annotations ask of the injection, read and checked before
/// anything changes.
struct Asked {
    /// Why not to inject (opted out, host network), if so.
    skip: Option<String>,
    /// The interception annotations as `init`/`proxy` flags.
    flags: Vec<String>,
    config_map: String,
    secrets: Vec<String>,
}

/// Injects into one Pod template; returns the report line.
pub fn inject_template(
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
    let host_network = checked_spec(map, &at("spec"), ctx)?;
    let asked = read_asked(&own, workload, field, ctx, opts, host_network)?;
    let mut annotations_now = match map.get_mut("metadata") {
        Some(Value::Mapping(meta)) => match meta.get_mut("annotations") {
            Some(Value::Mapping(a)) => Some(std::mem::take(a)),
            _ => None,
        },
        _ => None,
    };
    let spec = map
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .expect("checked above");
    let was_injected = strip(spec, annotations_now.as_mut());
    let report = match asked.skip {
        Some(reason) if was_injected => format!("{reason}; the earlier injection was taken out"),
        Some(reason) => reason,
        None => {
            check_app_uids(spec, &at("spec"), ctx)?;
            add(spec, &asked, opts);
            let a = annotations_now.get_or_insert_with(Mapping::new);
            let scrape_taken = add_annotations(a);
            let mut line = if was_injected {
                "injected again"
            } else {
                "injected"
            }
            .to_string();
            if scrape_taken {
                line.push_str(&format!(
                    " (the Pod's prometheus.io annotations are its own: the proxy's metrics, \
                     on port {METRICS_PORT}, are not announced)"
                ));
            }
            line
        }
    };
    if let Some(a) = annotations_now {
        write_annotations(map, a, &at("metadata"), ctx)?;
    }
    if *template == before && was_injected {
        return Ok("already injected, unchanged".into());
    }
    Ok(report)
}

/// Ours, after the injection's containers; true when the Pod has scrape
/// annotations of its own (left as they are).
fn add_annotations(a: &mut Mapping) -> bool {
    a.insert(ANN_INJECTED.into(), env!("CARGO_PKG_VERSION").into());
    a.insert(ANN_APPARMOR_INIT.into(), "unconfined".into());
    let taken = ANN_SCRAPE.iter().any(|k| a.contains_key(*k));
    if !taken {
        for (k, v) in ANN_SCRAPE.iter().zip(scrape_values()) {
            a.insert((*k).into(), v.into());
        }
    }
    taken
}

/// The proxy's sockets are never redirected: an app container running as
/// its uid would bypass it, silently. Refused, naming where the uid is set.
fn check_app_uids(spec: &Mapping, spec_field: &str, ctx: &Ctx) -> Result<(), InjectError> {
    let uid_of = |v: Option<&Value>| {
        v.and_then(|sc| get(sc, "runAsUser"))
            .and_then(Value::as_u64)
    };
    let pod_uid = uid_of(spec.get("securityContext"));
    for key in ["initContainers", "containers"] {
        let Some(Value::Sequence(list)) = spec.get(key) else {
            continue;
        };
        for (i, c) in list.iter().enumerate() {
            let (uid, field) = match uid_of(get(c, "securityContext")) {
                Some(u) => (
                    u,
                    format!("{spec_field}.{key}[{i}].securityContext.runAsUser"),
                ),
                None => match pod_uid {
                    Some(u) => (u, format!("{spec_field}.securityContext.runAsUser")),
                    None => continue,
                },
            };
            if uid == u64::from(PROXY_UID) {
                let name = get_str(c, "name").unwrap_or("(unnamed)");
                return Err(ctx.err(
                    field,
                    format!(
                        "container `{name}` runs as uid {uid}, the proxy's own (proxy.uid), whose \
                         connections are never redirected: it would bypass the proxy; run it as \
                         another uid"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The template's spec is a mapping whose lists are lists (a null one is
/// taken out); whether it is on the host's network.
fn checked_spec(map: &mut Mapping, spec_field: &str, ctx: &Ctx) -> Result<bool, InjectError> {
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
    Ok(matches!(spec.get("hostNetwork"), Some(Value::Bool(true))))
}

fn read_asked(
    own: &Mapping,
    workload: &Mapping,
    field: &str,
    ctx: &Ctx,
    opts: &Options,
    host_network: bool,
) -> Result<Asked, InjectError> {
    let skip = match annotation(own, workload, ANN_INJECT, field, ctx)? {
        Some((v @ ("false" | "disabled"), _)) => Some(format!("skipped ({ANN_INJECT}: {v:?})")),
        Some(("true" | "enabled", _)) | None => None,
        Some((v, where_)) => {
            return Err(ctx.err(where_, format!("`{v}` is neither \"true\" nor \"false\"")));
        }
    };
    let skip = skip.or_else(|| {
        host_network.then(|| {
            "skipped (hostNetwork: the proxy's loopback listener would be the node's)".to_string()
        })
    });
    let list = |ann: &str, item: &dyn Fn(&str) -> Result<String, String>| match annotation(
        own, workload, ann, field, ctx,
    )? {
        Some((v, where_)) => parse_list(v, item).map_err(|m| ctx.err(where_, m)),
        None => Ok(Vec::new()),
    };
    let mut flags = Vec::new();
    let mut flag = |name: &str, items: Vec<String>| {
        if !items.is_empty() {
            flags.extend([name.to_string(), items.join(",")]);
        }
    };
    flag("--exclude-ports", list(ANN_EXCLUDE_PORTS, &port)?);
    flag(
        "--exclude-cidrs",
        list(ANN_EXCLUDE_CIDRS, &|c| {
            c.parse::<Cidr>().map(|c| c.to_string())
        })?,
    );
    let inbound = match annotation(own, workload, ANN_INBOUND_PORTS, field, ctx)? {
        Some((v, _)) if v.trim() == "all" => vec!["all".to_string()],
        Some((v, where_)) => parse_list(v, |p| port(p).map_err(|m| format!("{m} or `all`")))
            .map_err(|m| ctx.err(where_, m))?,
        None => Vec::new(),
    };
    flag("--inbound-ports", inbound);
    flag(
        "--exclude-inbound-ports",
        list(ANN_EXCLUDE_INBOUND_PORTS, &port)?,
    );
    let config_map = match annotation(own, workload, ANN_CONFIG, field, ctx)? {
        Some((v, where_)) => {
            check_name(v, 253).map_err(|m| ctx.err(where_, m))?;
            v.to_string()
        }
        None => opts.config_map.clone(),
    };
    let secrets = list(ANN_SECRETS, &secret_name)?;
    Ok(Asked {
        skip,
        flags,
        config_map,
        secrets,
    })
}

/// A port in an annotation's list.
fn port(p: &str) -> Result<String, String> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .map(|p| p.to_string())
        .ok_or_else(|| format!("`{p}` is not a port (1-65535)"))
}

/// The volume name (a DNS label) is the prefix and the Secret's name.
fn secret_name(s: &str) -> Result<String, String> {
    check_name(s, 63 - VOL_SECRET.len())?;
    if s.contains('.') {
        return Err(format!(
            "`{s}`: Secrets with dots in their names are not supported"
        ));
    }
    Ok(s.to_string())
}

/// Ours first, so the app's own init containers are intercepted too.
fn add(spec: &mut Mapping, asked: &Asked, opts: &Options) {
    let mut init_list = vec![
        init_container(&opts.image, &asked.flags),
        proxy_container(&opts.image, &asked.secrets, &asked.flags),
    ];
    if let Some(Value::Sequence(existing)) = spec.remove("initContainers") {
        init_list.extend(existing);
    }
    spec.insert("initContainers".into(), Value::Sequence(init_list));
    let mut volumes = match spec.remove("volumes") {
        Some(Value::Sequence(v)) => v,
        _ => Vec::new(),
    };
    volumes.extend(pod_volumes(&asked.config_map, &asked.secrets));
    spec.insert("volumes".into(), Value::Sequence(volumes));
}

fn write_annotations(
    map: &mut Mapping,
    a: Mapping,
    meta_field: &str,
    ctx: &Ctx,
) -> Result<(), InjectError> {
    let meta = map
        .entry("metadata".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if let Value::Null = meta {
        *meta = Value::Mapping(Mapping::new());
    }
    let Some(meta) = meta.as_mapping_mut() else {
        return Err(ctx.err(meta_field, "expected a mapping"));
    };
    // Nothing to write: no empty mapping is added.
    if !a.is_empty() || meta.contains_key("annotations") {
        meta.insert("annotations".into(), Value::Mapping(a));
    }
    Ok(())
}

/// A comma-separated annotation, each item checked by `item`.
pub fn parse_list(
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
pub fn check_name(name: &str, max: usize) -> Result<(), String> {
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
