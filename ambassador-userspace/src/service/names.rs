//! Names as users write them in `match.host`: exact, `*.example.com` (any
//! name below it, not the domain itself), and Kubernetes short names
//! (`payments`) completed by the Pod's search domains, both ways: a short
//! name in the config matches the app's full one, and the app's short name
//! matches a full one in the config, as the Pod's resolver would complete it.

/// The names a request's `name` may be found under in the table, most
/// specific first: itself, then completed by each search domain, then each
/// wildcard above it (`*.b.example.com`, `*.example.com`).
pub fn candidates<'a>(name: &'a str, search: &'a [String]) -> impl Iterator<Item = String> + 'a {
    let completed = search.iter().map(move |d| format!("{name}.{d}"));
    let wildcards = name
        .match_indices('.')
        .map(move |(i, _)| format!("*{}", &name[i..]))
        // `*.com` is never a pattern (at least two labels under the star).
        .filter(|w| w[2..].contains('.'));
    std::iter::once(name.to_string())
        .chain(completed)
        .chain(wildcards)
}

/// The other names a config host is known by: a short one completed by
/// each search domain (a full or wildcard one has none).
pub fn aliases<'a>(host: &'a str, search: &'a [String]) -> impl Iterator<Item = String> + 'a {
    let short = !host.starts_with("*.");
    search
        .iter()
        .filter(move |_| short)
        .map(move |d| format!("{host}.{d}"))
}

/// Whether a service's config host matches a request's name.
pub fn matches(pattern: &str, name: &str, search: &[String]) -> bool {
    candidates(name, search).any(|c| c == pattern) || aliases(pattern, search).any(|a| a == name)
}

pub fn is_wildcard(host: &str) -> bool {
    host.starts_with("*.")
}

/// The `search` domains of a resolv.conf text (the last `search` line
/// wins, as the resolver reads it), lowercase, without trailing dots.
pub fn search_domains(resolv_conf: &str) -> Vec<String> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("search"))
        .next_back()
        .map(|rest| {
            rest.split_whitespace()
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                .filter(|d| !d.is_empty())
                .take(6)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k8s() -> Vec<String> {
        search_domains(
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
        )
    }

    #[test]
    fn what_matches_what() {
        let s = k8s();
        assert_eq!(
            s,
            [
                "default.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        for (pattern, name, yes) in [
            ("api.example.com", "api.example.com", true),
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "aexample.com", false),
            ("*.example.com", "a.example.com.evil.net", false),
            ("payments", "payments.default.svc.cluster.local", true),
            ("payments", "payments.svc.cluster.local", true),
            ("payments", "payments", true),
            ("payments", "payments.example.com", false),
            ("payments.default.svc.cluster.local", "payments", true),
            (
                "payments.default",
                "payments.default.svc.cluster.local",
                true,
            ),
            ("ledger.default.svc.cluster.local", "ledger.other", false),
        ] {
            assert_eq!(matches(pattern, name, &s), yes, "{pattern} vs {name}");
        }
        // No search domains: exact and wildcards only.
        assert!(!matches(
            "payments",
            "payments.default.svc.cluster.local",
            &[]
        ));
        assert!(matches("*.example.com", "x.example.com", &[]));
        // A one-label wildcard is never tried.
        assert!(candidates("a.com", &[]).all(|c| c != "*.com"));
    }
}
