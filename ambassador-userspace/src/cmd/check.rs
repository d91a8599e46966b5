//! `ambassador check FILE`: everything the proxy would verify at start, and a
//! bit more (certificates that expired, names that do not resolve), without
//! loading anything into the kernel; then a one-screen summary.

use std::{fmt::Write as _, path::Path, time::Duration};

use crate::{
    config::{
        Config, FailMode,
        service::{DefaultPolicy, Protocol, ServiceConfig, SourceKind},
    },
    net::Settings,
    service::ServiceTable,
};

/// Something `check` found wrong, as one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CheckError(pub String);

/// Checks the file; returns the summary to print.
pub async fn check(path: &Path) -> Result<String, CheckError> {
    let cfg = Config::load(path).map_err(|e| CheckError(e.to_string()))?;
    let settings = Settings::from_config(&cfg.proxy);
    // Reads every file and variable the services name, as the proxy does.
    ServiceTable::new(&cfg, &settings).map_err(|e| CheckError(e.to_string()))?;
    for s in &cfg.services {
        certificates_valid(s)?;
        endpoints_resolve(s).await?;
    }
    Ok(summary(path, &cfg))
}

/// Certificate files a service names must be in date now.
fn certificates_valid(s: &ServiceConfig) -> Result<(), CheckError> {
    let Some(tls) = &s.upstream.tls else {
        return Ok(());
    };
    for (what, file) in [("ca_file", &tls.ca_file), ("client_cert", &tls.client_cert)] {
        let Some(file) = file else { continue };
        let data = std::fs::read(file).map_err(|e| {
            CheckError(format!(
                "service {}: {what} {}: {e}",
                s.name,
                file.display()
            ))
        })?;
        for (i, pem) in x509_parser::pem::Pem::iter_from_buffer(&data).enumerate() {
            let pem = pem.map_err(|e| {
                CheckError(format!(
                    "service {}: {what} {}: PEM block {i}: {e}",
                    s.name,
                    file.display()
                ))
            })?;
            let Ok(cert) = pem.parse_x509() else { continue };
            let v = cert.validity();
            if !v.is_valid() {
                return Err(CheckError(format!(
                    "service {}: {what} {}: certificate {} is not valid now (valid {} to {})",
                    s.name,
                    file.display(),
                    cert.subject(),
                    v.not_before,
                    v.not_after
                )));
            }
        }
    }
    Ok(())
}

/// Endpoint names must resolve (within a few seconds each).
async fn endpoints_resolve(s: &ServiceConfig) -> Result<(), CheckError> {
    for e in &s.upstream.endpoints {
        let a = &e.address;
        if a.host.parse::<std::net::IpAddr>().is_ok() {
            continue;
        }
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::lookup_host((a.host.as_str(), a.port)),
        )
        .await;
        let resolved = match r {
            Ok(Ok(mut addrs)) => addrs.next().is_some(),
            _ => false,
        };
        if !resolved {
            return Err(CheckError(format!(
                "service {}: endpoint {a} does not resolve (is the name right, and DNS reachable from here?)",
                s.name
            )));
        }
    }
    Ok(())
}

fn summary(path: &Path, cfg: &Config) -> String {
    let mut out = String::new();
    let i = &cfg.intercept;
    let _ = writeln!(out, "{}: valid", path.display());
    let _ = writeln!(
        out,
        "intercept  every outbound TCP connect of the Pod{}; fail-{}",
        if i.loopback { " (loopback too)" } else { "" },
        match i.fail {
            FailMode::Closed => "closed (connects fail while the proxy is down)",
            FailMode::Open => "open (connects go direct while the proxy is down)",
        }
    );
    let _ = writeln!(out, "exempt     {}", exempt(cfg));
    if cfg.default == DefaultPolicy::Deny {
        let _ = writeln!(out, "udp        {}", udp(cfg));
    }
    let _ = writeln!(out, "dns        {}", dns(cfg));
    let _ = writeln!(
        out,
        "proxy      127.0.0.1:{0} and [::1]:{0}, uid {1}",
        cfg.proxy.port, cfg.proxy.uid
    );
    for s in &cfg.services {
        let m = &s.matcher;
        let mut what = Vec::new();
        if let Some(h) = &m.host {
            what.push(h.clone());
        }
        if let Some(c) = &m.cidr {
            what.push(c.to_string());
        }
        let port = m
            .port
            .map_or("any port".to_string(), |p| format!("port {p}"));
        let to = if s.upstream.endpoints.is_empty() {
            "the original destination".to_string()
        } else {
            s.upstream
                .endpoints
                .iter()
                .map(|e| format!("{} (priority {})", e.address, e.priority))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let proto = match s.protocol {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
            Protocol::Auto => "auto",
            Protocol::Postgres => "postgres",
        };
        let tls = match &s.upstream.tls {
            Some(t) if t.insecure_skip_verify => ", TLS WITHOUT VERIFICATION",
            Some(_) => ", TLS verified",
            None => "",
        };
        let _ = writeln!(
            out,
            "service    {}: {} {port} ({proto}) -> {to}{tls}",
            s.name,
            what.join(" + ")
        );
        if let Some(pg) = &s.postgres {
            let _ = writeln!(
                out,
                "             postgres: {} pooling (size {}, min_idle {}, max_clients {}, queue {:?}{}), target {}{}, credentials from {}",
                format!("{:?}", pg.pool.mode).to_lowercase(),
                pg.pool.size,
                pg.pool.min_idle,
                pg.pool.max_clients,
                pg.pool.queue_timeout,
                match (pg.pool.mode, pg.pool.max_prepared_statements) {
                    (crate::config::service::PoolMode::Session, _) => String::new(),
                    (_, 0) => ", named prepared statements refused".into(),
                    (_, n) => format!(", {n} prepared statements per server connection"),
                },
                s.upstream.target.unwrap_or_default().as_str(),
                if pg.direct_tls { ", direct TLS" } else { "" },
                pg.credentials_file.display()
            );
            let _ = writeln!(
                out,
                "             app side: {}",
                match &pg.app_tls {
                    Some(t) => format!("TLS when the app asks (certificate {})", t.cert.display()),
                    None => "plain; an app asking for TLS is told no (sslmode=prefer goes on in the clear, sslmode=require fails: set postgres.app_tls)".into(),
                }
            );
        }
        for (name, src) in &s.request.set_headers {
            let from = match &src.kind {
                SourceKind::Value(_) => "a literal value".to_string(),
                SourceKind::Env(v) => format!("${v}"),
                SourceKind::File(p) => p.display().to_string(),
                SourceKind::OAuth2(o) => format!("OAuth2 token from {}", o.token_url),
            };
            let _ = writeln!(out, "             sets {} from {from}", name.0);
        }
        if let Some(c) = &s.cache {
            let _ = writeln!(out, "             cache: {}", cache(c));
        }
        out.push_str(&routes(s));
    }
    let _ = writeln!(
        out,
        "otherwise  {}",
        match cfg.default {
            DefaultPolicy::Passthrough => "relayed as-is (default: passthrough)",
            DefaultPolicy::Deny => "refused (default: deny)",
        }
    );
    out
}

/// What leaves the Pod without any policy: excluded TCP ports and blocks,
/// every UDP datagram, and callers of excluded inbound ports.
fn exempt(cfg: &Config) -> String {
    let i = &cfg.intercept;
    let mut holes = Vec::new();
    if !i.exclude_ports.is_empty() {
        let ports: Vec<String> = i.exclude_ports.iter().map(u16::to_string).collect();
        holes.push(format!(
            "TCP to port {} of any host (intercept.exclude_ports)",
            ports.join(", ")
        ));
    }
    if !i.exclude_cidrs.is_empty() {
        let blocks: Vec<String> = i.exclude_cidrs.iter().map(|c| c.to_string()).collect();
        holes.push(format!(
            "TCP to {} on any port (intercept.exclude_cidrs)",
            blocks.join(", ")
        ));
    }
    if cfg.default != DefaultPolicy::Deny {
        holes.push("UDP (policed only under default: deny)".into());
    }
    if cfg.inbound.enabled() && !cfg.inbound.exclude_ports.is_empty() {
        let ports: Vec<String> = cfg
            .inbound
            .exclude_ports
            .iter()
            .map(u16::to_string)
            .collect();
        holes.push(format!(
            "callers of port {} (inbound.exclude_ports)",
            ports.join(", ")
        ));
    }
    if holes.is_empty() {
        return "nothing: every TCP connect is policed".into();
    }
    format!("{}: not under policy", holes.join("; "))
}

/// A transcoding route's REST bindings, one a line.
fn transcoded(t: &crate::config::transcode::TranscodeConfig) -> String {
    let mut out = String::new();
    match crate::transcode::Transcoder::load(t) {
        Ok(tr) => {
            let _ = writeln!(
                out,
                "               transcodes to gRPC ({}):",
                t.services.join(", ")
            );
            for b in tr.describe() {
                let _ = writeln!(out, "                 {b}");
            }
        }
        Err(e) => {
            let _ = writeln!(out, "               transcode: {e}");
        }
    }
    out
}

/// A response cache's bounds, and what it stores that the RFC alone would not.
fn cache(c: &crate::config::cache::CacheConfig) -> String {
    let mb = |b: u64| match b {
        0..1024 => format!("{b} bytes"),
        1024..1_048_576 => format!("{:.1} KiB", b as f64 / 1024.0),
        _ => format!("{:.1} MiB", b as f64 / 1_048_576.0),
    };
    let mut text = format!(
        "GET/HEAD responses up to {} each, {} in all",
        mb(c.max_entry_bytes),
        mb(c.max_bytes)
    );
    if let Some(t) = c.default_ttl {
        text.push_str(&format!(", {t:?} fresh when the upstream says nothing"));
    }
    if let Some(t) = c.stale_if_error {
        text.push_str(&format!(
            ", served up to {t:?} stale when the upstream fails"
        ));
    }
    text
}

/// Whether the app's DNS goes through the forwarder, and what it does there.
fn dns(cfg: &Config) -> String {
    let d = &cfg.dns;
    let resolvers = cfg.dns_resolvers();
    if !d.capture || resolvers.is_empty() {
        return format!(
            "not captured ({}): names are learned only by the proxy's own lookups",
            if d.capture {
                "no resolver in intercept.udp.resolvers_from"
            } else {
                "dns.capture: false"
            }
        );
    }
    let to: Vec<String> = resolvers
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{r} -> 127.0.0.1:{}", usize::from(d.port) + i))
        .collect();
    let mut text = format!("the app's queries go to the forwarder ({})", to.join(", "));
    if !d.hosts.is_empty() {
        text.push_str(&format!(
            "; {} name(s) answered from dns.hosts",
            d.hosts.len()
        ));
    }
    text.push_str(if d.deny_unknown {
        "; names no service names: NXDOMAIN, never asked upstream"
    } else {
        "; the rest forwarded"
    });
    text
}

/// Where datagrams may go under `default: deny`.
fn udp(cfg: &Config) -> String {
    let u = &cfg.intercept.udp;
    let mut to: Vec<String> = u.allow.iter().map(ToString::to_string).collect();
    if let Some(path) = &u.resolvers_from {
        let here = std::fs::read_to_string(path).unwrap_or_default();
        let servers: Vec<String> = crate::config::udp::nameservers(&here)
            .iter()
            .map(|ip| {
                crate::config::udp::UdpAllow {
                    net: Some((*ip).into()),
                    port: 53,
                }
                .to_string()
            })
            .collect();
        to.push(format!(
            "the nameservers of {} on port 53 ({} here)",
            path.display(),
            if servers.is_empty() {
                "none".to_string()
            } else {
                servers.join(", ")
            }
        ));
    }
    let to = if to.is_empty() {
        "nowhere (and no resolver: DNS lookups fail; allow it in intercept.udp.allow)".to_string()
    } else {
        format!("only to {}", to.join(", "))
    };
    format!("{to}; every other datagram refused (EPERM), QUIC included: clients fall back to TCP")
}

/// A service's routes in order, each its conditions and what it does, and
/// a warning for each route an earlier one leaves no request to.
fn routes(s: &ServiceConfig) -> String {
    use crate::config::{
        cache::RouteCache,
        route::{PathCond, RouteAction, ValueMatch},
    };
    let mut out = String::new();
    let value = |v: &ValueMatch| match v {
        ValueMatch::Present => "present".to_string(),
        ValueMatch::Exact(e) => format!("= {e:?}"),
        ValueMatch::Regex(r) => format!("~ /{r}/"),
    };
    for (i, r) in s.routes.iter().enumerate() {
        let m = &r.matcher;
        let mut when = Vec::new();
        match &m.path {
            PathCond::Any => {}
            PathCond::Exact(p) => when.push(format!("path {p}")),
            PathCond::Prefix(p) => when.push(format!("path {p}/...")),
            PathCond::Regex(re) => when.push(format!("path ~ /{re}/")),
        }
        if !m.methods.is_empty() {
            when.push(m.methods.join("|"));
        }
        when.extend(
            m.headers
                .iter()
                .map(|(k, v)| format!("{} {}", k.0, value(v))),
        );
        when.extend(m.query.iter().map(|(k, v)| format!("?{k} {}", value(v))));
        let to = r
            .upstream
            .as_ref()
            .map_or(String::new(), |u| format!(" to service {u}"));
        let does = match &r.action {
            RouteAction::Forward if r.transcode.is_some() => format!("gRPC call{to}"),
            RouteAction::Forward if r.rewrite == Default::default() => format!("forward{to}"),
            RouteAction::Forward => format!("forward{to}, rewritten"),
            RouteAction::Deny => "deny (403)".to_string(),
            RouteAction::Respond { status, .. } => format!("answer {status}"),
            RouteAction::Redirect { status, location } => {
                format!("redirect {status} to {location}")
            }
        };
        let mut limit = r.rate_limit.as_ref().map_or(String::new(), |l| {
            format!(", {} req/s burst {}", l.requests_per_second, l.burst)
        });
        match &r.cache {
            RouteCache::Service if s.cache.is_some() => limit.push_str(", cached (the service's)"),
            RouteCache::Service => {}
            RouteCache::Off if s.cache.is_some() => limit.push_str(", not cached"),
            RouteCache::Off => {}
            RouteCache::Own(c) => limit.push_str(&format!(", cached ({})", cache(c))),
        }
        let _ = writeln!(
            out,
            "             route {} {}: {} -> {does}{limit}",
            i + 1,
            r.name.as_deref().unwrap_or("(unnamed)"),
            if when.is_empty() {
                "every request".to_string()
            } else {
                when.join(", ")
            }
        );
        if let Some(t) = &r.transcode {
            out.push_str(&transcoded(t));
        }
    }
    for (later, earlier) in crate::route::Routes::shadowed(&s.routes) {
        let _ = writeln!(
            out,
            "             WARNING: route {} can never match: route {} before it matches every request it would",
            later + 1,
            earlier + 1
        );
    }
    out
}

#[derive(clap::Args)]
pub struct Args {
    /// The config file.
    file: std::path::PathBuf,
}

pub fn main(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let rt = super::runtime(1)?;
    let summary = rt.block_on(check(&args.file))?;
    print!("{summary}");
    Ok(std::process::ExitCode::SUCCESS)
}
