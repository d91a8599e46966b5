//! What a Pod's annotations add to the config file: the same flags on `init`
//! and `proxy` (so the kernel's interception and the proxy's listeners
//! agree), applied at start and again to every reloaded file.

use super::{file::Config, inbound::InboundPorts, values::Cidr};

/// Additions to the file's `intercept` and `inbound` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// On top of `intercept.exclude_ports`.
    pub exclude_ports: Vec<u16>,
    /// On top of `intercept.exclude_cidrs`.
    pub exclude_cidrs: Vec<Cidr>,
    /// On top of `inbound.ports`: more ports, or `all`.
    pub inbound_ports: Option<InboundPorts>,
    /// On top of `inbound.exclude_ports`.
    pub exclude_inbound_ports: Vec<u16>,
}

impl Overrides {
    /// Adds these to `cfg` and checks the result as a file is checked (a
    /// port list past the kernel map's size, a policy's port now excluded).
    pub fn apply(&self, cfg: &mut Config) -> Result<(), String> {
        if *self == Overrides::default() {
            return Ok(());
        }
        cfg.intercept.exclude_ports.extend(&self.exclude_ports);
        cfg.intercept.exclude_cidrs.extend(&self.exclude_cidrs);
        match (&self.inbound_ports, &mut cfg.inbound.ports) {
            (None, _) | (Some(InboundPorts::List(_)), InboundPorts::All) => {}
            (Some(InboundPorts::All), ports) => *ports = InboundPorts::All,
            (Some(InboundPorts::List(more)), InboundPorts::List(ports)) => {
                for p in more {
                    if !ports.contains(p) {
                        ports.push(*p);
                    }
                }
            }
        }
        for p in &self.exclude_inbound_ports {
            if !cfg.inbound.exclude_ports.contains(p) {
                cfg.inbound.exclude_ports.push(*p);
            }
        }
        super::validate::validate(cfg, "").map_err(|e| format!("with the Pod's flags: {e}"))
    }
}

/// `all`, or ports separated by commas (`8080,8443`), as a flag takes it.
impl std::str::FromStr for InboundPorts {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "all" {
            return Ok(InboundPorts::All);
        }
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                    format!(
                        "`{}` is not a port (1-65535) or `all`",
                        super::values::clip(p)
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(InboundPorts::List)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> Config {
        Config::parse(yaml).unwrap()
    }

    #[test]
    fn flags_add_to_the_file_and_are_checked_like_it() {
        let mut c = cfg("inbound: { ports: [8080] }\n");
        let o = Overrides {
            inbound_ports: Some("8443, 8080".parse().unwrap()),
            exclude_inbound_ports: vec![9090],
            exclude_ports: vec![5432],
            ..Overrides::default()
        };
        o.apply(&mut c).unwrap();
        assert_eq!(c.inbound.ports, InboundPorts::List(vec![8080, 8443]));
        assert_eq!(c.inbound.exclude_ports, vec![9090]);
        assert!(c.intercept.exclude_ports.contains(&5432));
        // Applied again on a reload of the same file: nothing doubles.
        let mut again = cfg("inbound: { ports: [8080] }\n");
        o.apply(&mut again).unwrap();
        assert_eq!(again.inbound, c.inbound);

        let mut all = cfg("inbound: { ports: [8080] }\n");
        let o = Overrides {
            inbound_ports: Some("all".parse().unwrap()),
            ..Overrides::default()
        };
        o.apply(&mut all).unwrap();
        assert_eq!(all.inbound.ports, InboundPorts::All);

        // Excluding the port a policy guards is refused, as in the file.
        let mut guarded = cfg("inbound: { ports: [8080], policies: [{ port: 8080 }] }\n");
        let o = Overrides {
            exclude_inbound_ports: vec![8080],
            ..Overrides::default()
        };
        let e = o.apply(&mut guarded).unwrap_err();
        assert!(e.starts_with("with the Pod's flags: "), "{e}");
        assert!(e.contains("port 8080 is not intercepted"), "{e}");
    }

    #[test]
    fn port_flags_parse_or_name_the_bad_item() {
        assert_eq!("all".parse::<InboundPorts>(), Ok(InboundPorts::All));
        assert_eq!(
            "80,443".parse::<InboundPorts>(),
            Ok(InboundPorts::List(vec![80, 443]))
        );
        assert_eq!(
            "80,http".parse::<InboundPorts>().unwrap_err(),
            "`http` is not a port (1-65535) or `all`"
        );
        assert!("0".parse::<InboundPorts>().is_err());
    }
}
