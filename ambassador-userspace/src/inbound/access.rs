//! Who may call what: the port's rules against a request's method, path and
//! verified identity, first match wins; decided without sockets. Paths are
//! judged only in normal form: a path the app could read as another (dot
//! segments, escaped dots or slashes, backslashes, doubled slashes) is
//! refused before any rule, so no rule can be stepped around.

use http::Method;

use super::authn::Identity;
use crate::config::gateway::{AccessConfig, AccessRule, PathMatch, Verdict};

/// The outcome for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// By the rule at this index (0-based), or by the default.
    Deny(Option<usize>),
}

pub struct Access {
    default: Verdict,
    rules: Vec<AccessRule>,
}

impl Access {
    pub fn new(cfg: &AccessConfig) -> Access {
        Access {
            default: cfg.default,
            rules: cfg.rules.clone(),
        }
    }

    pub fn decide(&self, method: &Method, path: &str, id: &Identity) -> Decision {
        for (i, r) in self.rules.iter().enumerate() {
            if matches(r, method, path, id) {
                return match r.action {
                    Verdict::Allow => Decision::Allow,
                    Verdict::Deny => Decision::Deny(Some(i)),
                };
            }
        }
        match self.default {
            Verdict::Allow => Decision::Allow,
            Verdict::Deny => Decision::Deny(None),
        }
    }
}

fn matches(r: &AccessRule, method: &Method, path: &str, id: &Identity) -> bool {
    let path_ok = match &r.path {
        PathMatch::Any => true,
        PathMatch::Exact(p) => path == p,
        PathMatch::Prefix(p) => path
            .strip_prefix(p.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
    };
    let method_ok = r.methods.is_empty() || r.methods.iter().any(|m| m == method.as_str());
    let claims_ok = r.claims.is_empty()
        || match id {
            Identity::Jwt(claims) => r
                .claims
                .iter()
                .all(|(k, want)| claims.get(k).is_some_and(|v| claim_is(v, want))),
            _ => false,
        };
    let client_ok = r.clients.is_empty()
        || matches!(id, Identity::ApiKey(name) if r.clients.iter().any(|c| c == name));
    path_ok && method_ok && claims_ok && client_ok
}

/// A claim equals `want`: a string as it is, a number or boolean as its
/// text, a list when it holds one of those.
fn claim_is(v: &serde_json::Value, want: &str) -> bool {
    match v {
        serde_json::Value::String(s) => s == want,
        serde_json::Value::Array(a) => a.iter().any(|x| claim_is(x, want)),
        serde_json::Value::Number(n) => n.to_string() == want,
        serde_json::Value::Bool(b) => b.to_string() == want,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(yaml: &str) -> Access {
        Access::new(&serde_yaml_ng::from_str(yaml).unwrap())
    }

    fn jwt(claims: serde_json::Value) -> Identity {
        Identity::Jwt(std::sync::Arc::new(claims.as_object().unwrap().clone()))
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let a = access(
            r#"
default: deny
rules:
  - { action: deny, path_prefix: /v1/invoices, methods: [DELETE] }
  - { action: allow, path_prefix: /v1/invoices, methods: [get, HEAD] }
  - { action: allow, path_prefix: /admin, claims: { role: admin } }
  - { action: allow, path: /health }
  - { action: allow, path_prefix: /partners, clients: [billing] }
"#,
        );
        let anon = Identity::Anonymous;
        let admin = jwt(serde_json::json!({"role": ["staff", "admin"]}));
        let staff = jwt(serde_json::json!({"role": "staff"}));
        let billing = Identity::ApiKey("billing".into());
        let cases: &[(&str, &str, &Identity, Decision)] = &[
            ("GET", "/v1/invoices", &anon, Decision::Allow),
            ("GET", "/v1/invoices/7", &anon, Decision::Allow),
            ("DELETE", "/v1/invoices/7", &admin, Decision::Deny(Some(0))),
            ("GET", "/v1/invoicesX", &anon, Decision::Deny(None)),
            ("POST", "/v1/invoices", &anon, Decision::Deny(None)),
            ("GET", "/admin/users", &admin, Decision::Allow),
            ("GET", "/admin/users", &staff, Decision::Deny(None)),
            ("GET", "/admin", &billing, Decision::Deny(None)),
            ("GET", "/health", &anon, Decision::Allow),
            ("GET", "/health/x", &anon, Decision::Deny(None)),
            ("PUT", "/partners/1", &billing, Decision::Allow),
            ("PUT", "/partners/1", &staff, Decision::Deny(None)),
        ];
        for (m, p, id, want) in cases {
            let got = a.decide(&Method::from_bytes(m.as_bytes()).unwrap(), p, id);
            assert_eq!(got, *want, "{m} {p}");
        }
    }

    #[test]
    fn a_root_prefix_covers_everything_and_default_is_allow() {
        let a = access("rules: [{ action: deny, path_prefix: / , methods: [TRACE] }]");
        assert_eq!(
            a.decide(&Method::TRACE, "/x/y", &Identity::Anonymous),
            Decision::Deny(Some(0))
        );
        assert_eq!(
            a.decide(&Method::GET, "/x", &Identity::Anonymous),
            Decision::Allow
        );
    }
}
