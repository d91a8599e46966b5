//! `ambassador status`: what is attached where, counters, pins.

use std::fmt::Write as _;

use ambassador_common::{NO_UID, counter};

use crate::interception::status::{self, InstallStatus};

/// Renders every install on this host for a terminal.
pub fn render(installs: &[InstallStatus]) -> String {
    let mut out = String::new();
    if installs.is_empty() {
        let _ = writeln!(
            out,
            "no ambassador interception is installed (nothing pinned under {})",
            crate::interception::pins::root().display()
        );
        return out;
    }
    for s in installs {
        let cgroup = s
            .cgroup
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| {
                "(cgroup gone: `ambassador gc` or the next `init` removes these pins)".into()
            });
        let _ = writeln!(out, "cgroup {cgroup} (id {})", s.cgroup_id);
        let _ = writeln!(out, "  pins     {}", s.dir.display());
        let attached: Vec<&str> = s
            .links
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(n, _)| *n)
            .collect();
        let missing: Vec<&str> = s
            .links
            .iter()
            .filter(|(_, ok)| !*ok)
            .map(|(n, _)| *n)
            .collect();
        let _ = writeln!(
            out,
            "  attached {}",
            if attached.is_empty() {
                "none".into()
            } else {
                attached.join(", ")
            }
        );
        if !missing.is_empty() {
            let _ = writeln!(out, "  MISSING  {}", missing.join(", "));
        }
        if let Some(c) = &s.config {
            let uid = if c.proxy_uid == NO_UID {
                "none".into()
            } else {
                c.proxy_uid.to_string()
            };
            let _ = writeln!(
                out,
                "  proxy    127.0.0.1:{0} and [::1]:{0}, own uid {uid}{3}, fail-{1}, loopback {2}",
                c.proxy_port,
                if c.fail_open != 0 { "open" } else { "closed" },
                if c.loopback != 0 {
                    "intercepted"
                } else {
                    "bypassed"
                },
                if c.proxy_mark != 0 {
                    format!(", own mark {}", c.proxy_mark)
                } else {
                    String::new()
                },
            );
        }
        let accelerated = counter::NAMES[counter::ACCELERATED as usize];
        let counters: Vec<String> = s
            .counters
            .iter()
            .filter(|(n, _)| {
                *n != accelerated
                    && *n != counter::NAMES[counter::DNS_REDIRECTED as usize]
                    && !n.starts_with("inbound_")
            })
            .map(|(n, v)| format!("{n} {v}"))
            .collect();
        let _ = writeln!(out, "  connects {}", counters.join(", "));
        let _ = writeln!(out, "  exempt   {}", exempt_line(s));
        if let Some(c) = &s.config {
            let n = s.counters.iter().find(|(n, _)| *n == accelerated);
            let _ = writeln!(
                out,
                "  sk_msg   {}",
                match (c.accelerate != 0, n) {
                    (true, Some((_, n))) => format!("on, {n} byte stream(s) took the shortcut"),
                    (true, None) => "on".into(),
                    (false, _) => "off (app<->proxy bytes take loopback TCP)".into(),
                }
            );
        }
        let _ = writeln!(out, "  dns      {}", dns_line(s));
        let _ = writeln!(out, "  tracked  {} connection(s) in flight", s.tracked);
        let _ = writeln!(out, "  inbound  {}", inbound_line(s));
    }
    out
}

/// What the programs leave alone, from their maps.
fn exempt_line(s: &InstallStatus) -> String {
    let mut holes = Vec::new();
    if !s.exempt_ports.is_empty() {
        let ports: Vec<String> = s.exempt_ports.iter().map(u16::to_string).collect();
        holes.push(format!("TCP to port {} of any host", ports.join(", ")));
    }
    if !s.exempt_cidrs.is_empty() {
        holes.push(format!("TCP to {} on any port", s.exempt_cidrs.join(", ")));
    }
    // Under `default: deny` the kernel polices UDP; otherwise it is a hole.
    match s.config.filter(|c| c.udp_deny != 0) {
        Some(_) if s.udp_allowed.is_empty() => {
            return format!("{}; UDP refused everywhere", not_under(&holes));
        }
        Some(_) => {
            return format!(
                "{}; UDP only to {}",
                not_under(&holes),
                s.udp_allowed.join(", ")
            );
        }
        None => holes.push("UDP".into()),
    }
    not_under(&holes)
}

/// Where the app's DNS goes, from the maps.
fn dns_line(s: &InstallStatus) -> String {
    let port = s.config.map_or(0, |c| c.dns_port);
    if port == 0 || s.dns_resolvers.is_empty() {
        return "not captured".into();
    }
    let to: Vec<String> = s
        .dns_resolvers
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{r} -> 127.0.0.1:{}", usize::from(port) + i))
        .collect();
    let n = s
        .counters
        .iter()
        .find(|(n, _)| *n == counter::NAMES[counter::DNS_REDIRECTED as usize])
        .map_or(0, |(_, v)| *v);
    format!("captured ({}), {n} queries to the forwarder", to.join(", "))
}

fn not_under(holes: &[String]) -> String {
    if holes.is_empty() {
        return "nothing: every TCP connect is policed".into();
    }
    format!("{}: not under policy", holes.join("; "))
}

/// The inbound half: off, or the sk_lookup link, ports, fail mode, counters.
fn inbound_line(s: &InstallStatus) -> String {
    use ambassador_common::maps::{IN_PORT_EXCLUDE, IN_PORT_INTERCEPT};
    let Some(c) = s.inbound.filter(|c| c.enabled != 0) else {
        return "off".into();
    };
    let list = |want: u8| {
        let v: Vec<String> = s
            .inbound_ports
            .iter()
            .filter(|(_, k)| *k == want)
            .map(|(p, _)| p.to_string())
            .collect();
        v.join(",")
    };
    let counters: Vec<String> = s
        .counters
        .iter()
        .filter_map(|(n, v)| n.strip_prefix("inbound_").map(|n| format!("{n} {v}")))
        .collect();
    format!(
        "{}, ports {}{}, fail-{}, {}",
        if s.inbound_link {
            "sk_lookup attached"
        } else {
            "sk_lookup link MISSING"
        },
        if c.all_ports != 0 {
            "all".to_string()
        } else {
            list(IN_PORT_INTERCEPT)
        },
        match list(IN_PORT_EXCLUDE) {
            e if e.is_empty() => String::new(),
            e => format!(" (not {e})"),
        },
        if c.fail_open != 0 { "open" } else { "closed" },
        counters.join(", ")
    )
}

/// The proxy's own view, from its admin API (what `/status` says), for a
/// terminal. `None` when no proxy answers there.
pub fn proxy_view(admin: std::net::SocketAddr) -> Option<String> {
    let status: crate::admin::Status = serde_json::from_str(&get(admin, "/status")?).ok()?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "proxy {admin}: {}, config {}, default {}",
        if status.ready { "ready" } else { "NOT READY" },
        status
            .config_file
            .as_deref()
            .unwrap_or("(built-in defaults)"),
        match status.default {
            crate::config::service::DefaultPolicy::Deny => "deny",
            crate::config::service::DefaultPolicy::Passthrough => "passthrough",
        }
    );
    if let Some(e) = &status.last_reload_error {
        let _ = writeln!(out, "  LAST RELOAD REJECTED (old config serving): {e}");
    }
    if status.services.is_empty() {
        let _ = writeln!(out, "  no services: everything follows the default");
    }
    for s in &status.services {
        let _ = writeln!(
            out,
            "  service {} ({}): {} request(s) in flight, {} connection(s) open",
            s.name,
            format!("{:?}", s.protocol).to_lowercase(),
            s.requests_in_flight,
            s.connections_open
        );
        for e in &s.endpoints {
            let _ = writeln!(
                out,
                "    {:<8} {} (priority {}, {} outstanding)",
                e.state, e.address, e.priority, e.outstanding
            );
        }
        if let Some(c) = &s.cache {
            let _ = writeln!(
                out,
                "    cache    {} entr{}, {} of {} bytes",
                c.entries,
                if c.entries == 1 { "y" } else { "ies" },
                c.bytes,
                c.max_bytes
            );
        }
    }
    for p in &status.pools {
        let _ = writeln!(
            out,
            "  pool {} {}: {} server connection(s), {} idle, {} in use, {} waiting; opened {}, errors {}, exhausted {}; {} prepared statement(s)",
            p.service,
            p.pool,
            p.stats.servers,
            p.stats.idle,
            p.stats.in_use,
            p.stats.waiting,
            p.stats.opened,
            p.stats.errors,
            p.stats.exhausted,
            p.stats.statements
        );
    }
    Some(out)
}

/// A GET with a short timeout; the body when the answer is 200.
fn get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let timeout = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

#[derive(clap::Args)]
pub struct Args {
    /// The proxy's admin API.
    #[arg(long, default_value_t = crate::config::DEFAULT_ADMIN)]
    admin: std::net::SocketAddr,
}

/// What is attached where (when this process may see it), then what the
/// proxy's admin API reports.
pub fn main(args: Args) -> anyhow::Result<std::process::ExitCode> {
    use crate::interception;
    let proxy = proxy_view(args.admin);
    // In a locked-down sidecar the pins are not visible: the proxy's view
    // alone is still worth showing.
    match interception::check_environment() {
        Ok(()) => print!("{}", render(&status::list())),
        Err(e) if proxy.is_some() => println!("interception: not visible here ({e})"),
        Err(e) => return Err(e.into()),
    }
    match proxy {
        Some(p) => print!("{p}"),
        None => println!("proxy: no admin API answers at {}", args.admin),
    }
    Ok(std::process::ExitCode::SUCCESS)
}
