//! Tracing: W3C trace context (`traceparent`, `tracestate`) and spans
//! exported over OTLP/HTTP (opentelemetry crates).
//!
//! With `telemetry.tracing` set, each HTTP request gets a client span: a
//! child of the app's `traceparent` when it sent one (its sampling decision
//! is followed), else the root of a new trace. The upstream receives a
//! `traceparent` naming that span, and `tracestate` passes through. Without
//! the setting nothing is added to requests and nothing is exported.

use std::{str::FromStr as _, sync::OnceLock, time::Duration};

use http::{HeaderMap, HeaderValue};
use opentelemetry::{
    Context, KeyValue,
    trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags,
        TraceId, TraceState, Tracer as _, TracerProvider as _,
    },
};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};

use crate::config::TracingConfig;

/// A request's span, ended when its response ends.
pub type Span = opentelemetry_sdk::trace::Span;

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP exporter to {endpoint}: {reason}")]
pub struct TraceError {
    endpoint: String,
    reason: String,
}

/// Keeps the exporter; `shutdown` sends what is still batched.
pub struct Tracing(SdkTracerProvider);

impl Tracing {
    pub fn shutdown(self) {
        // Best effort at exit: an unreachable collector must not hang us.
        let _ = self.0.shutdown_with_timeout(Duration::from_secs(2));
    }
}

/// Starts exporting when the config asks for it.
pub fn init_configured(cfg: &crate::config::Config) -> Result<Option<Tracing>, TraceError> {
    cfg.telemetry.tracing.as_ref().map(init).transpose()
}

/// Starts exporting. Call outside the async runtime: the exporter has its
/// own thread and blocking HTTP client.
pub fn init(cfg: &TracingConfig) -> Result<Tracing, TraceError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let endpoint = format!("{}/v1/traces", cfg.otlp_endpoint);
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
        .with_endpoint(endpoint.clone())
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| TraceError {
            endpoint: endpoint.clone(),
            reason: e.to_string(),
        })?;
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_millis(500))
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.sample_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build(),
        )
        .build();
    let _ = TRACER.set(provider.tracer("ambassador"));
    Ok(Tracing(provider))
}

/// Whether spans are exported (`telemetry.tracing` was set at start).
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// Which way a request goes through the proxy: the app's call (a client
/// span) or a caller's request to the app (a server span).
#[derive(Debug, Clone, Copy)]
pub enum Role {
    Outbound,
    Inbound,
}

/// Starts the span of one request and points the request's `traceparent`
/// at it. `None` when tracing is off.
pub fn start(
    headers: &mut HeaderMap,
    role: Role,
    service: &str,
    method: &http::Method,
    path: &str,
) -> Option<Span> {
    let tracer = TRACER.get()?;
    let state = headers
        .get("tracestate")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| TraceState::from_str(v).ok())
        .unwrap_or_default();
    let parent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parse)
        .and_then(|p| {
            let flags = if p.sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            };
            Some(SpanContext::new(
                TraceId::from_hex(p.trace_id).ok()?,
                SpanId::from_hex(p.parent_id).ok()?,
                flags,
                true,
                state,
            ))
        });
    let cx = match parent {
        Some(sc) => Context::new().with_remote_span_context(sc),
        None => Context::new(),
    };
    let span = tracer
        .span_builder(method.as_str().to_string())
        .with_kind(match role {
            Role::Outbound => SpanKind::Client,
            Role::Inbound => SpanKind::Server,
        })
        .with_attributes([
            KeyValue::new("http.request.method", method.as_str().to_string()),
            KeyValue::new("url.path", path.to_string()),
            KeyValue::new("ambassador.service", service.to_string()),
        ])
        .start_with_context(tracer, &cx);
    let sc = span.span_context();
    let tp = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    if let Ok(v) = HeaderValue::from_str(&tp) {
        headers.insert("traceparent", v);
    }
    Some(span)
}

/// Ends a request's span with what happened.
pub fn finish(mut span: Span, status: u16, endpoint: Option<String>, error: Option<&str>) {
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status),
    ));
    if let Some(e) = endpoint {
        span.set_attribute(KeyValue::new("server.address", e));
    }
    if status >= 500 {
        span.set_status(Status::error(error.unwrap_or("").to_string()));
    }
    span.end();
}

/// The trace id of a valid `traceparent`, if the request has one.
pub fn trace_id(headers: &HeaderMap) -> Option<&str> {
    let tp = headers.get("traceparent")?.to_str().ok()?;
    parse(tp).map(|p| p.trace_id)
}

/// The parts of a `traceparent` header (version 00 layout; later versions
/// may append fields, which are ignored as the spec says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent<'a> {
    pub trace_id: &'a str,
    pub parent_id: &'a str,
    pub sampled: bool,
}

pub fn parse(tp: &str) -> Option<TraceParent<'_>> {
    let mut parts = tp.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let parent_id = parts.next()?;
    let flags = parts.next()?;
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !hex(trace_id, 32) || !hex(parent_id, 16) || !hex(flags, 2) {
        return None;
    }
    // All-zero ids are invalid.
    if trace_id.bytes().all(|b| b == b'0') || parent_id.bytes().all(|b| b == b'0') {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceParent {
        trace_id,
        parent_id,
        sampled: flags & 1 == 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_strictly() {
        let ok = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(ok.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(ok.sampled);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
