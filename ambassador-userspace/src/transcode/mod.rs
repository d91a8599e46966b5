//! HTTP/JSON to gRPC transcoding for a route: its descriptor set read once
//! per config, each exposed method's bindings (its `google.api.http`
//! annotation and additional bindings, and `POST /package.Service/Method`
//! always), and per request the binding that matches. [`template`] is the
//! path templates, [`request`] the protobuf request made of the app's,
//! [`answer`] the JSON made of the gRPC answer ([`stream`]: a streamed one,
//! message by message), [`grpc`] the wire's framing
//! and the status mapping.

pub mod answer;
pub mod grpc;
pub mod request;
pub mod stream;
pub mod template;

use http::Method;
use prost_reflect::{
    DescriptorPool, DynamicMessage, ExtensionDescriptor, FieldDescriptor, Kind, MethodDescriptor,
};

use crate::config::transcode::{StreamFormat, TranscodeConfig};
use template::{Template, Var};

pub struct Transcoder {
    bindings: Vec<Binding>,
    pub stream: StreamFormat,
    pub max_request_bytes: u64,
    pub max_response_bytes: u64,
}

/// Where a request's JSON body goes.
pub enum BodyTo {
    /// Nowhere: the method takes none (GET).
    None,
    /// The whole request message (`body: "*"`).
    All,
    /// One field of it (`body: "book"`).
    Field(FieldDescriptor),
}

pub struct Binding {
    http_method: Method,
    template: Template,
    pub method: MethodDescriptor,
    /// `/package.Service/Method`, the gRPC request's path.
    pub path: http::uri::PathAndQuery,
    pub body: BodyTo,
    /// The answer's JSON is this field of the response message.
    pub response_body: Option<FieldDescriptor>,
}

/// A request's binding and its path variables' values.
pub struct Matched<'a> {
    pub binding: &'a Binding,
    pub vars: Vec<(&'a Var, String)>,
}

impl Transcoder {
    /// Reads the descriptor set and binds the named services' methods.
    pub fn load(cfg: &TranscodeConfig) -> Result<Transcoder, String> {
        let file = cfg.descriptor_set.display();
        let bytes = std::fs::read(&cfg.descriptor_set)
            .map_err(|e| format!("transcode.descriptor_set {file}: {e}"))?;
        let pool = DescriptorPool::decode(bytes.as_slice()).map_err(|e| {
            format!(
                "transcode.descriptor_set {file}: not a protobuf FileDescriptorSet with its imports \
                 (protoc --include_imports --descriptor_set_out): {e}"
            )
        })?;
        let http = pool.get_extension_by_name("google.api.http");
        let mut bindings = Vec::new();
        for name in &cfg.services {
            let svc = pool.get_service_by_name(name).ok_or_else(|| {
                format!("transcode.services: `{name}` is not a service of {file}")
            })?;
            for m in svc.methods() {
                // A stream from the caller has no REST shape.
                if m.is_client_streaming() {
                    continue;
                }
                if let Some(rule) = http.as_ref().and_then(|x| rule_of(&m, x)) {
                    bind_rule(&rule, &m, &mut bindings)
                        .map_err(|e| format!("transcode: {}: {e}", m.full_name()))?;
                }
                let path = format!("/{}/{}", svc.full_name(), m.name());
                bindings.push(binding(Method::POST, &path, "*", "", &m)?);
            }
        }
        // The more literal segments, the more specific: tried first.
        bindings.sort_by_key(|b| std::cmp::Reverse(b.template.literals()));
        Ok(Transcoder {
            bindings,
            stream: cfg.stream,
            max_request_bytes: cfg.max_request_bytes,
            max_response_bytes: cfg.max_response_bytes,
        })
    }

    /// The binding for a request, if one matches its method and path.
    pub fn find(&self, method: &Method, path: &str) -> Option<Matched<'_>> {
        self.bindings.iter().find_map(|b| {
            if b.http_method != method {
                return None;
            }
            let vars = b.template.matches(path)?;
            Some(Matched { binding: b, vars })
        })
    }

    /// Each binding as `check` prints it: `GET /v1/books/{id} -> pkg.Svc.Get`.
    pub fn describe(&self) -> Vec<String> {
        self.bindings
            .iter()
            .map(|b| {
                format!(
                    "{} {} -> {}",
                    b.http_method,
                    b.template,
                    b.method.full_name()
                )
            })
            .collect()
    }
}

/// The method's `google.api.http` rule, when it has one.
fn rule_of(m: &MethodDescriptor, ext: &ExtensionDescriptor) -> Option<DynamicMessage> {
    let opts = m.options();
    if !opts.has_extension(ext) {
        return None;
    }
    opts.get_extension(ext).as_message().cloned()
}

/// A rule's binding and its additional bindings'.
fn bind_rule(
    rule: &DynamicMessage,
    m: &MethodDescriptor,
    out: &mut Vec<Binding>,
) -> Result<(), String> {
    let text = |name: &str| {
        rule.get_field_by_name(name)
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let mut pattern = None;
    for verb in ["get", "put", "post", "delete", "patch"] {
        if rule.has_field_by_name(verb) {
            let method =
                Method::from_bytes(verb.to_ascii_uppercase().as_bytes()).expect("a method");
            pattern = Some((method, text(verb)));
        }
    }
    if rule.has_field_by_name("custom")
        && let Some(c) = rule
            .get_field_by_name("custom")
            .and_then(|v| v.as_message().cloned())
    {
        let kind = c
            .get_field_by_name("kind")
            .and_then(|v| v.as_str().map(str::to_string));
        let path = c
            .get_field_by_name("path")
            .and_then(|v| v.as_str().map(str::to_string));
        let method = Method::from_bytes(kind.unwrap_or_default().as_bytes())
            .map_err(|_| "a custom pattern's kind is no HTTP method".to_string())?;
        pattern = Some((method, path.unwrap_or_default()));
    }
    if let Some((method, path)) = pattern {
        out.push(binding(
            method,
            &path,
            &text("body"),
            &text("response_body"),
            m,
        )?);
    }
    if let Some(more) = rule.get_field_by_name("additional_bindings")
        && let Some(list) = more.as_list()
    {
        for r in list.iter().filter_map(|v| v.as_message()) {
            bind_rule(r, m, out)?;
        }
    }
    Ok(())
}

fn binding(
    http_method: Method,
    path: &str,
    body: &str,
    response_body: &str,
    m: &MethodDescriptor,
) -> Result<Binding, String> {
    let template = Template::parse(path)?;
    let input = m.input();
    for field in template.fields() {
        check_path(&input, field)?;
    }
    let body = match body {
        "" => BodyTo::None,
        "*" => BodyTo::All,
        name => BodyTo::Field(
            input
                .get_field_by_name(name)
                .ok_or_else(|| format!("body `{name}` is no field of {}", input.full_name()))?,
        ),
    };
    let response_body = match response_body {
        "" => None,
        name => Some(m.output().get_field_by_name(name).ok_or_else(|| {
            format!(
                "response_body `{name}` is no field of {}",
                m.output().full_name()
            )
        })?),
    };
    let grpc = format!("/{}/{}", m.parent_service().full_name(), m.name());
    Ok(Binding {
        http_method,
        template,
        method: m.clone(),
        path: grpc
            .parse()
            .map_err(|_| format!("`{grpc}` is no request path"))?,
        body,
        response_body,
    })
}

/// A variable's field path names a singular non-message field, through
/// singular message fields.
fn check_path(input: &prost_reflect::MessageDescriptor, path: &[String]) -> Result<(), String> {
    let mut msg = input.clone();
    for (i, name) in path.iter().enumerate() {
        let f = msg.get_field_by_name(name).ok_or_else(|| {
            format!(
                "path variable `{}`: no field `{name}` in {}",
                path.join("."),
                msg.full_name()
            )
        })?;
        let last = i + 1 == path.len();
        match (f.kind(), last) {
            (_, _) if f.is_list() || f.is_map() => {
                return Err(format!(
                    "path variable `{}`: a repeated field",
                    path.join(".")
                ));
            }
            (Kind::Message(m), false) => msg = m,
            (_, false) => {
                return Err(format!(
                    "path variable `{}`: `{name}` is no message",
                    path.join(".")
                ));
            }
            (_, true) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
