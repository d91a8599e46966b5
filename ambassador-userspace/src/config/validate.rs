//! What no single value can check: bounds between fields, and each
//! service against the rest.

use std::net::IpAddr;

use ambassador_common::maps;

use super::{
    file::{Config, MAX_WORKERS},
    service,
    values::{MAX_ATTEMPTS, MAX_COUNT, MAX_LIMIT, clip},
};

/// Checks between fields and services that no single value can check.
pub fn validate(cfg: &Config, text: &str) -> Result<(), String> {
    let at = |key: &str| match line_of(text, &format!("{key}:")) {
        Some(l) => format!("line {l}: "),
        None => String::new(),
    };
    if cfg.proxy.mark == Some(0) {
        return Err(format!(
            "{}proxy.mark: must not be 0 (0 means unmarked)",
            at("mark")
        ));
    }
    if cfg.proxy.port == 0 {
        return Err(format!("{}proxy.port: must be 1-65535", at("port")));
    }
    if cfg.intercept.exclude_ports.contains(&0) {
        return Err(format!(
            "{}intercept.exclude_ports: 0 is not a port",
            at("exclude_ports")
        ));
    }
    if cfg.intercept.udp.allow.len() > maps::MAX_UDP_ALLOWED as usize - 8 {
        return Err(format!(
            "{}intercept.udp.allow: at most {} destinations",
            at("udp"),
            maps::MAX_UDP_ALLOWED - 8
        ));
    }
    if cfg.intercept.exclude_ports.len() > maps::MAX_EXCLUDED_PORTS as usize {
        return Err(format!(
            "{}intercept.exclude_ports: at most {} ports",
            at("exclude_ports"),
            maps::MAX_EXCLUDED_PORTS
        ));
    }
    if cfg.intercept.exclude_cidrs.len() > maps::MAX_EXCLUDED_CIDRS as usize {
        return Err(format!(
            "{}intercept.exclude_cidrs: at most {} blocks",
            at("exclude_cidrs"),
            maps::MAX_EXCLUDED_CIDRS
        ));
    }
    super::inbound::validate(&cfg.inbound, cfg.proxy.port)
        .map_err(|e| format!("{}{e}", at("inbound")))?;
    if !(0..=MAX_WORKERS).contains(&cfg.proxy.workers) {
        return Err(format!(
            "{}proxy.workers: at most {MAX_WORKERS}",
            at("workers")
        ));
    }
    if !(256..=1 << 22).contains(&cfg.intercept.table_size) {
        return Err(format!(
            "{}intercept.table_size: must be between 256 and 4194304",
            at("table_size")
        ));
    }
    if let Some(t) = &cfg.telemetry.tracing
        && !(0.0..=1.0).contains(&t.sample_ratio)
    {
        return Err(format!(
            "{}telemetry.tracing.sample_ratio: a share between 0 and 1",
            at("sample_ratio")
        ));
    }
    validate_services(cfg, text)?;
    let taken: Vec<u16> = cfg
        .proxy
        .own_ports()
        .chain(cfg.inbound.enabled().then_some(cfg.inbound.port))
        .collect();
    cfg.dns
        .validate(&taken)
        .map_err(|e| format!("{}{e}", at("dns")))?;
    for d in cfg.proxy.search_domains.iter().flatten() {
        if d.starts_with("*.") || super::values::valid_host(d).is_err() {
            return Err(format!(
                "{}proxy.search_domains: `{}` is not a domain (like default.svc.cluster.local)",
                at("search_domains"),
                clip(d)
            ));
        }
    }
    for (name, d) in [
        ("connect_timeout", cfg.proxy.connect_timeout),
        ("idle_timeout", cfg.proxy.idle_timeout),
        ("header_read_timeout", cfg.proxy.header_read_timeout),
        ("dns_refresh", cfg.proxy.dns_refresh),
    ] {
        if d.is_zero() {
            return Err(format!("{}proxy.{name}: must be more than 0", at(name)));
        }
    }
    Ok(())
}

/// Linear in the number of services: where an error is, is looked up only
/// once there is one.
fn validate_services(cfg: &Config, text: &str) -> Result<(), String> {
    let mut seen = std::collections::HashSet::with_capacity(cfg.services.len());
    for (i, s) in cfg.services.iter().enumerate() {
        let checked = if seen.insert(s.name.as_str()) {
            check_service(s).and_then(|()| route_upstreams(s, cfg))
        } else {
            Err(format!(".name: `{}` is used twice", clip(&s.name)))
        };
        if let Err(e) = checked {
            let at = match line_of(text, &format!("name: {}", s.name)) {
                Some(l) => format!("line {l}: services[{i}]"),
                None => format!("services[{i}]"),
            };
            return Err(format!("{at}{e}"));
        }
    }
    Ok(())
}

/// A route's `upstream` names another HTTP service that has endpoints.
fn route_upstreams(s: &service::ServiceConfig, cfg: &Config) -> Result<(), String> {
    use service::Protocol;
    for (i, r) in s.routes.iter().enumerate() {
        let Some(name) = &r.upstream else { continue };
        let target = cfg.services.iter().find(|t| &t.name == name);
        let why = match target {
            None => "no service has that name",
            Some(t) if t.name == s.name => "that is this service",
            Some(t) if !matches!(t.protocol, Protocol::Http | Protocol::Auto) => {
                "that service is not `protocol: http`"
            }
            Some(t) if t.upstream.endpoints.is_empty() => {
                "that service has no endpoints (it would go to the app's original destination)"
            }
            Some(_) => continue,
        };
        return Err(format!(".routes[{i}].upstream: `{}`: {why}", clip(name)));
    }
    Ok(())
}

/// Routes are for HTTP services, and their names are one each.
fn check_routes(s: &service::ServiceConfig) -> Result<(), String> {
    use service::Protocol;
    if !s.routes.is_empty() && !matches!(s.protocol, Protocol::Http | Protocol::Auto) {
        return Err(format!(
            ".routes: need `protocol: http` (service `{}`)",
            s.name
        ));
    }
    let mut names = std::collections::HashSet::new();
    for (i, r) in s.routes.iter().enumerate() {
        if let Some(n) = &r.name
            && !names.insert(n.as_str())
        {
            return Err(format!(".routes[{i}].name: `{}` is used twice", clip(n)));
        }
    }
    Ok(())
}

/// One service's own checks; the error starts with the field (`.name: ...`).
fn check_service(s: &service::ServiceConfig) -> Result<(), String> {
    use service::{Protocol, SourceKind};
    if s.name.is_empty() {
        return Err(".name: must not be empty".into());
    }
    let has_policy = !s.request.set_headers.is_empty()
        || !s.request.remove_headers.is_empty()
        || !s.request.rename_headers.is_empty();
    check_routes(s)?;
    if s.cache.is_some() && !matches!(s.protocol, Protocol::Http | Protocol::Auto) {
        return Err(format!(
            ".cache: needs `protocol: http` (service `{}`)",
            s.name
        ));
    }
    if s.protocol == Protocol::Tcp && has_policy {
        return Err(format!(
            ".request: header policy needs `protocol: http` (service `{}`)",
            s.name
        ));
    }
    let t = &s.timeouts;
    for (name, d) in [
        ("connect", t.connect),
        ("request", t.request),
        ("idle", t.idle),
        ("header_read", t.header_read),
    ] {
        if d.is_some_and(|d| d.is_zero()) {
            return Err(format!(".timeouts.{name}: must be more than 0"));
        }
    }
    let l = &s.limits;
    for (name, v) in [
        ("max_connections", l.max_connections),
        ("max_pending", l.max_pending),
        ("max_requests", l.max_requests),
    ] {
        if !(1..=MAX_LIMIT).contains(&v) {
            return Err(format!(".limits.{name}: between 1 and {MAX_LIMIT}"));
        }
    }
    if s.retries.attempts > MAX_ATTEMPTS {
        return Err(format!(".retries.attempts: at most {MAX_ATTEMPTS}"));
    }
    if !(0.0..=1.0).contains(&s.retries.budget) {
        return Err(".retries.budget: a share between 0 and 1".into());
    }
    let o = &s.outlier;
    if !(1..=MAX_COUNT).contains(&o.consecutive_failures) {
        return Err(format!(
            ".outlier.consecutive_failures: between 1 and {MAX_COUNT}"
        ));
    }
    if !(0.0..=1.0).contains(&o.max_ejected) {
        return Err(".outlier.max_ejected: a share between 0 and 1".into());
    }
    if o.base_ejection.is_zero() || o.max_ejection < o.base_ejection {
        return Err(".outlier: base_ejection must be more than 0 and at most max_ejection".into());
    }
    if let Some(tls) = &s.upstream.tls {
        let named_endpoint = s
            .upstream
            .endpoints
            .iter()
            .any(|e| e.address.host.parse::<IpAddr>().is_err());
        if tls.server_name.is_none() && !named_endpoint {
            return Err(
                ".upstream.tls.server_name: required when no endpoint is named by host \
             (the certificate is checked against it)"
                    .into(),
            );
        }
    }
    match (&s.postgres, s.protocol == Protocol::Postgres) {
        (None, true) => {
            return Err(".postgres: `protocol: postgres` needs a postgres section (credentials_file at least)".into());
        }
        (Some(_), false) => {
            return Err(".postgres: needs `protocol: postgres`".into());
        }
        (Some(pg), true) => {
            check_pool(&pg.pool)?;
            if pg.direct_tls && s.upstream.tls.is_none() {
                return Err(".postgres.direct_tls: needs upstream.tls".into());
            }
            if has_policy {
                return Err(format!(
                    ".request: header policy needs `protocol: http` (service `{}`)",
                    s.name
                ));
            }
        }
        (None, false) => {}
    }
    if s.upstream.target.is_some() && s.protocol != Protocol::Postgres {
        return Err(".upstream.target: only postgres services check a server's role".into());
    }
    for (name, src) in &s.request.set_headers {
        if let SourceKind::OAuth2(o) = &src.kind
            && !(o.token_url.starts_with("https://") || o.token_url.starts_with("http://"))
        {
            {
                return Err(format!(
                    ".request.set_headers.{}.oauth2_client_credentials.token_url: must be an http(s) URL",
                    name.0
                ));
            }
        }
    }
    Ok(())
}

/// The first line starting with `needle` (after indentation and a list dash),
/// for errors found after parsing.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix("- ")
                .unwrap_or(l)
                .trim_start()
                .starts_with(needle)
        })
        .map(|i| i + 1)
}

/// A postgres service's pool limits.
fn check_pool(p: &crate::config::service::PoolConfig) -> Result<(), String> {
    if !(1..=MAX_LIMIT).contains(&p.size) || !(1..=MAX_LIMIT).contains(&p.max_clients) {
        return Err(format!(
            ".postgres.pool: size and max_clients between 1 and {MAX_LIMIT}"
        ));
    }
    if p.min_idle > p.size {
        return Err(format!(
            ".postgres.pool.min_idle: at most pool.size ({})",
            p.size
        ));
    }
    if p.max_prepared_statements > MAX_LIMIT {
        return Err(format!(
            ".postgres.pool.max_prepared_statements: at most {MAX_LIMIT}"
        ));
    }
    if p.queue_timeout.is_zero() {
        return Err(".postgres.pool.queue_timeout: must be more than 0".into());
    }
    Ok(())
}
