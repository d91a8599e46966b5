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
//!   intercepted (`--exclude-ports`, `--exclude-cidrs`);
//! - `ambassador.io/inbound-ports: "8080,8443"` (or `"all"`) and
//!   `ambassador.io/exclude-inbound-ports: "9090"`: callers of these ports go
//!   through the proxy (on top of the config's `inbound.ports`), or reach the
//!   app directly (`--inbound-ports`, `--exclude-inbound-ports`);
//! - `ambassador.io/config: NAME`: the ConfigMap with `config.yaml`;
//! - `ambassador.io/secrets: "a,b"`: Secrets mounted into the proxy at
//!   `/var/run/secrets/ambassador/<name>/`.
//!
//! The interception flags go to both containers: `init` writes them to the
//! kernel, and the proxy opens its inbound listener by them and applies them
//! again to every reloaded config.

mod containers;
mod documents;
mod names;
mod pod;
mod types;

pub use names::{
    ANN_CONFIG, ANN_EXCLUDE_CIDRS, ANN_EXCLUDE_INBOUND_PORTS, ANN_EXCLUDE_PORTS, ANN_INBOUND_PORTS,
    ANN_INJECT, ANN_INJECTED, ANN_SECRETS, BINARY, CONFIG_DIR, DEFAULT_CONFIG_MAP, DEFAULT_IMAGE,
    HOST_CGROUP_DIR, INIT_CONTAINER, PROXY_CONTAINER, SECRETS_DIR,
};
pub use types::{InjectError, Injected, Options};

use serde_yaml_ng::Value;

use documents::split_documents;
use pod::{describe, inject_object};
use types::Ctx;

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

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
