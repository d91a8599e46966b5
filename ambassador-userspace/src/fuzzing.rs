//! Entry points for coverage-guided fuzzing (`cargo xtask fuzz`, libFuzzer)
//! and for replaying the corpus and every crash ever found as regressions
//! (`cargo xtask test`). Each takes any bytes and must not panic: what it
//! drives is what takes bytes from files, the app or a server.

use std::sync::OnceLock;

use bytes::BytesMut;

/// One fuzz target: any bytes in, no panic.
pub type Target = fn(&[u8]);

/// The targets by name (the fuzz crate has one binary each).
pub const TARGETS: &[(&str, Target)] = &[
    ("config", config),
    ("http_request", http_request),
    ("detect", detect),
    ("pg_startup", pg_startup),
    ("pg_messages", pg_messages),
    ("answers", answers),
    ("dns", dns),
];

/// A runtime for the async parts (built once; inputs run one at a time).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
    })
}

/// The config loader, and what the proxy does with what it accepts: every
/// duration is added to the clock, and `/config` shows it all.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = crate::config::Config::parse(text) else {
        return;
    };
    let now = std::time::Instant::now();
    for d in cfg.durations() {
        let _ = now + d;
    }
    let _ = serde_json::to_string(&cfg);
}

/// A request head as hyper parses it (httparse), then what the proxy does
/// to one before it goes upstream: the target check, hop-by-hop removal,
/// the upgrade decision, a service's header policy, the Host comparison.
pub fn http_request(data: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(data) else {
        return;
    };
    let mut b = http::Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"))
        .version(match parsed.version {
            Some(0) => http::Version::HTTP_10,
            _ => http::Version::HTTP_11,
        });
    for h in parsed.headers.iter() {
        b = b.header(h.name, h.value);
    }
    let Ok(mut req) = b.body(()) else {
        return;
    };
    let _ = crate::http::target::request_host(&req);
    let _ = crate::http::upgrade_protocol(&req);
    crate::http::strip_hop_by_hop(req.headers_mut());
    if let Some(host) = req.headers().get(http::header::HOST).cloned() {
        let _ = crate::upstream::names_uri_authority(&host, req.uri());
    }
    static RULES: OnceLock<crate::auth::RequestRules> = OnceLock::new();
    let rules = RULES.get_or_init(|| {
        let policy = serde_yaml_ng::from_str(
            "set_headers: { authorization: { value: \"Bearer fuzz\" } }\n\
             remove_headers: [x-debug]\n\
             rename_headers: { x-from: x-to }\n",
        )
        .expect("a valid policy");
        let settings = crate::net::Settings::from_config(&Default::default());
        crate::auth::RequestRules::new(&policy, &settings).expect("literal values only")
    });
    let _ = runtime().block_on(rules.apply(req.headers_mut()));
}

/// The protocol detector on an app's first bytes.
pub fn detect(data: &[u8]) {
    let _ = crate::proxy::detect::classify(data);
}

/// The startup packets an app sends a PostgreSQL service.
pub fn pg_startup(data: &[u8]) {
    let mut rest = data;
    let mut buf = BytesMut::new();
    runtime().block_on(async {
        // SSLRequests may come before the StartupMessage.
        for _ in 0..4 {
            match crate::postgres::protocol::read_startup(&mut rest, &mut buf).await {
                Ok(crate::postgres::protocol::Startup::SslRequest) => continue,
                _ => return,
            }
        }
    });
}

/// Message streams both ways: the session pump's framing (first byte: how
/// the bytes are cut into reads), transaction pooling's named statements,
/// and a server's login messages as the login reads them.
pub fn pg_messages(data: &[u8]) {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut).max(1);
    let (mut from, mut to, mut left) = (BytesMut::new(), BytesMut::new(), 0);
    for read in data.chunks(step) {
        from.extend_from_slice(read);
        loop {
            crate::postgres::protocol::pass_on(&mut from, &mut to, &mut left);
            if left > 0 {
                break;
            }
            match crate::postgres::protocol::peek(&from) {
                Ok(Some(m)) => left = m.len,
                _ => break,
            }
        }
    }
    pg_extended(data, step);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(m)) = crate::postgres::protocol::parse_backend(&mut buf) {
        if let postgres_protocol::message::backend::Message::ErrorResponse(body) = m {
            let _ = crate::postgres::protocol::error_fields(&crate::postgres::server::body_bytes(
                &body,
            ));
        }
    }
}

/// The app's messages through transaction pooling's named-statement
/// handling (a server connection keeping `cap` statements), then every byte
/// as a server message tag against the answers owed.
fn pg_extended(data: &[u8], cap: usize) {
    use crate::postgres::{
        extended::{Counters, Named, Sides, Took},
        protocol,
        statements::{Registry, ServerStatements},
    };
    let counters = Counters {
        prepared: Default::default(),
        reused: Default::default(),
        evicted: Default::default(),
    };
    let mut named = Named::new(cap % 4 + 1, counters);
    let (registry, mut server) = (Registry::default(), ServerStatements::default());
    let (mut from_app, mut to_server, mut to_app) =
        (BytesMut::from(data), BytesMut::new(), BytesMut::new());
    while let Ok(Some(m)) = protocol::peek(&from_app) {
        let mut sides = Sides {
            from_app: &mut from_app,
            to_server: &mut to_server,
            server: &mut server,
            registry: &registry,
            status: b'I',
        };
        match named.take(m, &mut sides) {
            Ok(Took::Sent { left, .. }) => {
                let n = left.min(from_app.len());
                to_server.extend_from_slice(&from_app.split_to(n));
                if n < left {
                    break;
                }
            }
            Ok(Took::Answered) => named.expected.answer_due(&mut to_app),
            Ok(Took::More) | Err(_) => break,
        }
    }
    let mut undone = Vec::new();
    for &tag in data {
        named.expected.on_server(tag, &mut undone);
        for u in undone.drain(..) {
            named.undo(&u, Some(&mut server));
        }
        named.expected.answer_due(&mut to_app);
    }
}

/// What the proxy reads of an upstream's answers itself: a response head
/// the cache judges (stores, answers a conditional from, refreshes with a
/// 304's fields); the bytes as gRPC frames made into streamed JSON; and, as
/// text, a path template (first line) matched against a path (second).
pub fn answers(data: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    if let Ok(httparse::Status::Complete(_)) = parsed.parse(data) {
        let mut b = http::Response::builder().status(parsed.code.unwrap_or(200));
        for h in parsed.headers.iter() {
            b = b.header(h.name, h.value);
        }
        if let Ok(r) = b.body(()) {
            cache_judges(&r.into_parts().0);
        }
    }
    let desc = prost_reflect::DescriptorPool::global()
        .get_message_by_name("google.protobuf.Struct")
        .expect("a well-known type");
    for format in [
        crate::config::transcode::StreamFormat::Array,
        crate::config::transcode::StreamFormat::Ndjson,
    ] {
        let mut s = crate::transcode::stream::JsonStream::new(desc.clone(), None, format, 4096);
        for chunk in data.chunks(7) {
            let _ = s.data(chunk);
        }
        let _ = s.end(None);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Some((template, path)) = text.split_once('\n')
        && let Ok(t) = crate::transcode::template::Template::parse(template)
    {
        let _ = t.matches(path);
    }
}

/// What the DNS forwarder reads from the app and from resolvers: the bytes
/// as the app's query (decided against a table with `hosts`, wildcards and
/// `deny_unknown`, each of its own answers made and read back), and as a
/// resolver's answer to a query for the same name.
pub fn dns(data: &[u8]) {
    use crate::dns::{plan::plan, wire};
    static TABLE: OnceLock<crate::service::ServiceTable> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let cfg = crate::config::Config::parse(
            "dns: { deny_unknown: true, hosts: { h.test: [10.0.0.1, \"fd00::1\"] } }\nservices:\n  - { name: w, match: { host: \"*.w.test\", port: 80 } }\n",
        )
        .expect("a valid config");
        let settings = crate::net::Settings::from_config(&cfg.proxy);
        crate::service::ServiceTable::new(&cfg, &settings).expect("a table")
    });
    let Ok(q) = wire::Query::parse(data) else {
        return;
    };
    let ips = match plan(&q.name, q.qtype, table) {
        crate::dns::plan::Plan::Hosts(ips) => ips,
        _ => Vec::new(),
    };
    for code in [
        hickory_proto::op::ResponseCode::NoError,
        hickory_proto::op::ResponseCode::NXDomain,
    ] {
        let made = q.answer(code, &ips, std::time::Duration::from_secs(30));
        assert!(
            wire::Answer::read(&q, &made, true).is_ok()
                && wire::Answer::read(&q, &made, false).is_ok(),
            "our own answer reads back"
        );
    }
    let _ = wire::Answer::read(&q, data, true);
    let _ = wire::Answer::read(&q, data, false);
}

/// A response head through the cache's rules, as for `GET /a` with the
/// head's own fields as the request's too (conditionals, Vary values).
fn cache_judges(head: &http::response::Parts) {
    use crate::cache::{Cache, entry, key::PolicyRequest};
    static CACHE: OnceLock<std::sync::Arc<Cache>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| {
        let owner: crate::config::service::ServiceConfig = serde_yaml_ng::from_str(
            "name: fuzz\nmatch: { host: fuzz.test, port: 80 }\nprotocol: http\ncache: { default_ttl: 5s, stale_if_error: 5s }\n",
        )
        .expect("a valid service");
        Cache::shared(owner.cache.expect("a cache"), &owner, 0)
    });
    let mut req = http::Request::get("/a").body(()).expect("a request");
    *req.headers_mut() = head.headers.clone();
    let p = PolicyRequest::new(&req, true);
    let now = std::time::SystemTime::now();
    if let Some(policy) = cache.admit(&p, head, now) {
        let variant = entry::variant_of(&head.headers, req.headers());
        let e = entry::Entry::new(
            policy,
            head.status,
            head.headers.clone(),
            bytes::Bytes::new(),
            variant,
            now,
        );
        let _ = e.policy.before_request(&p, now);
        let _ = e.not_modified_for(req.headers());
        let _ = e.freshened(&head.headers);
        let _ = e.head(now);
        let _ = e.usable_stale(Some(std::time::Duration::from_secs(5)), now);
    }
}

#[cfg(test)]
mod tests {
    /// Every input in the corpus and every crash found, on every target:
    /// the regressions the fuzzer ever found stay fixed.
    #[test]
    fn the_fuzz_corpus_and_every_crash_found_replay_without_a_panic() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut replayed = 0;
        for (name, target) in super::TARGETS {
            for dir in ["corpus", "regressions"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                    continue;
                };
                for e in entries.flatten() {
                    let data = std::fs::read(e.path()).unwrap();
                    target(&data);
                    replayed += 1;
                }
            }
        }
        assert!(
            replayed >= super::TARGETS.len(),
            "no corpus under {}",
            root.display()
        );
    }
}
