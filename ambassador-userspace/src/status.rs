//! `ambassador status`: what is attached where, counters, pins.

use std::fmt::Write as _;

use ambassador_common::NO_UID;

use crate::interception::pins::{self, InstallStatus};

/// Renders every install on this host for a terminal.
pub fn render(installs: &[InstallStatus]) -> String {
    let mut out = String::new();
    if installs.is_empty() {
        let _ = writeln!(
            out,
            "no ambassador interception is installed (nothing pinned under {})",
            pins::root().display()
        );
        return out;
    }
    for s in installs {
        let cgroup = s
            .cgroup
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| {
                "(cgroup gone: run `ambassador uninstall` or remove the pins)".into()
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
        let counters: Vec<String> = s.counters.iter().map(|(n, v)| format!("{n} {v}")).collect();
        let _ = writeln!(out, "  connects {}", counters.join(", "));
        let _ = writeln!(out, "  tracked  {} connection(s) in flight", s.tracked);
    }
    out
}
