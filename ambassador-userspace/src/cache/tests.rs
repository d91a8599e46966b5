use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};

use super::{
    fill::{Fill, Stored},
    key::{Ask, ask},
    *,
};

/// A service config of this name with this cache.
fn owner(name: &str, c: CacheConfig) -> crate::config::service::ServiceConfig {
    let yaml = format!(
        "name: {name}\nmatch: {{ host: {name}.test, port: 80 }}\nprotocol: http\ncache: {{ max_bytes: {}, max_entry_bytes: {} }}\n",
        c.max_bytes, c.max_entry_bytes
    );
    let mut s: crate::config::service::ServiceConfig = serde_yaml_ng::from_str(&yaml).unwrap();
    s.cache = Some(c);
    s
}

/// A cache of its own for a test.
fn cache(c: CacheConfig, name: &str) -> Arc<Cache> {
    Cache::shared(c, &owner(name, c), 0)
}

fn cfg(max_bytes: u64, max_entry_bytes: u64) -> CacheConfig {
    CacheConfig {
        max_bytes,
        max_entry_bytes,
        default_ttl: None,
        stale_if_error: None,
    }
}

fn get(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut b = Request::get(uri).header("host", "api");
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).unwrap()
}

fn head(status: u16, headers: &[(&str, &str)]) -> Parts {
    let mut b = Response::builder().status(status);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn key(r: &Request<()>) -> Key {
    match ask(r, 0) {
        Ask::Lookup(l) => l.key,
        other => panic!("{other:?}"),
    }
}

/// Stores `body` for `req` the way a streamed response is.
fn store(c: &Arc<Cache>, req: &Request<()>, h: &Parts, body: &'static [u8]) -> bool {
    let now = SystemTime::now();
    let p = PolicyRequest::new(req, false);
    let Some(policy) = c.admit(&p, h, now) else {
        return false;
    };
    let stored = Stored {
        policy,
        status: h.status,
        headers: h.headers.clone(),
        variant: entry::variant_of(&h.headers, p_headers(&p)),
        now,
    };
    let mut fill = Fill::new(c.clone(), key(req), stored, None);
    for chunk in body.chunks(3) {
        if !fill.data(&Bytes::from_static(chunk)) {
            return false;
        }
    }
    fill.end();
    true
}

fn p_headers<'a>(p: &'a PolicyRequest<'_>) -> &'a HeaderMap {
    http_cache_semantics::RequestLike::headers(p)
}

fn found(c: &Cache, req: &Request<()>) -> &'static str {
    let p = PolicyRequest::new(req, false);
    match c.find(&key(req), &p, SystemTime::now()) {
        Found::None => "none",
        Found::Fresh(_) => "fresh",
        Found::Stale(_) => "stale",
    }
}

#[test]
fn what_may_be_stored() {
    let c = cache(cfg(1 << 20, 1000), "cache-unit-admit");
    let now = SystemTime::now();
    let plain = get("/a", &[]);
    let authed = get("/a", &[("authorization", "Bearer t")]);
    type Case<'a> = (&'a Request<()>, Vec<(&'a str, &'a str)>, u16, bool);
    let cases: Vec<Case> = vec![
        (&plain, vec![("cache-control", "max-age=60")], 200, true),
        (
            &plain,
            vec![("cache-control", "no-store, max-age=60")],
            200,
            false,
        ),
        (
            &plain,
            vec![("cache-control", "private, max-age=60")],
            200,
            false,
        ),
        (
            &plain,
            vec![("cache-control", "max-age=60"), ("set-cookie", "a=1")],
            200,
            false,
        ),
        (
            &plain,
            vec![("cache-control", "max-age=60"), ("vary", "*")],
            200,
            false,
        ),
        (&plain, vec![("cache-control", "max-age=60")], 206, false),
        (
            &plain,
            vec![("cache-control", "max-age=60"), ("content-length", "1001")],
            200,
            false,
        ),
        // No freshness and no validator: nothing to reuse.
        (&plain, vec![], 200, false),
        // No freshness but a validator: kept to be revalidated.
        (&plain, vec![("etag", "\"1\"")], 200, true),
        (&plain, vec![("cache-control", "max-age=60")], 404, true),
        (&plain, vec![("cache-control", "max-age=60")], 500, false),
        // RFC 9111 §3.5: authenticated requests only with explicit leave.
        (&authed, vec![("cache-control", "max-age=60")], 200, false),
        (
            &authed,
            vec![("cache-control", "public, max-age=60")],
            200,
            true,
        ),
        (&authed, vec![("cache-control", "s-maxage=60")], 200, true),
    ];
    for (req, headers, status, want) in cases {
        let p = PolicyRequest::new(req, false);
        let got = c.admit(&p, &head(status, &headers), now).is_some();
        assert_eq!(got, want, "{status} {headers:?} {:?}", req.headers());
    }
    // An Authorization the ambassador adds counts the same.
    let p = PolicyRequest::new(&plain, true);
    let h = head(200, &[("cache-control", "max-age=60")]);
    assert!(c.admit(&p, &h, now).is_none());
}

#[test]
fn default_ttl_is_the_only_heuristic() {
    let h = head(200, &[("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")]);
    let req = get("/a", &[]);
    let none = cache(cfg(1 << 20, 1000), "cache-unit-ttl");
    assert!(store(&none, &req, &h, b"x"));
    // Ten years since the last change would be a year's heuristic: none.
    assert_eq!(found(&none, &req), "stale");
    let mut with = cfg(1 << 20, 1000);
    with.default_ttl = Some(Duration::from_secs(30));
    let ttl = cache(with, "cache-unit-ttl2");
    assert!(store(&ttl, &req, &h, b"x"));
    assert_eq!(found(&ttl, &req), "fresh");
    // The response's own freshness wins over the default.
    let own = head(200, &[("cache-control", "max-age=0"), ("etag", "\"1\"")]);
    let other = get("/b", &[]);
    assert!(store(&ttl, &other, &own, b"x"));
    assert_eq!(found(&ttl, &other), "stale");
}

#[test]
fn variants_by_vary_and_the_request_s_own_directives() {
    let c = cache(cfg(1 << 20, 1000), "cache-unit-vary");
    let h = head(
        200,
        &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
    );
    let en = get("/a", &[("accept-language", "en")]);
    let de = get("/a", &[("accept-language", "de")]);
    assert!(store(&c, &en, &h, b"hello"));
    assert_eq!(found(&c, &en), "fresh");
    assert_eq!(found(&c, &de), "none");
    assert!(store(&c, &de, &h, b"hallo"));
    assert_eq!((found(&c, &en), found(&c, &de)), ("fresh", "fresh"));
    // The same variant again replaces, not adds.
    assert!(store(&c, &de, &h, b"guten tag"));
    let p = PolicyRequest::new(&de, false);
    let Found::Fresh(e) = c.find(&key(&de), &p, SystemTime::now()) else {
        panic!()
    };
    assert_eq!(&e.body[..], b"guten tag");
    assert_eq!(c.held().1, 1);
    // A request that asks for a revalidation gets one.
    let no_cache = get(
        "/a",
        &[("accept-language", "en"), ("cache-control", "no-cache")],
    );
    assert_eq!(found(&c, &no_cache), "none");
}

#[test]
fn bodies_over_the_entry_bound_are_not_kept_and_bytes_are_bounded() {
    let c = cache(cfg(4000, 1000), "cache-unit-bound");
    let h = head(200, &[("cache-control", "max-age=60")]);
    assert!(!store(&c, &get("/big", &[]), &h, &[b'x'; 1001]));
    assert_eq!(found(&c, &get("/big", &[])), "none");
    for i in 0..40 {
        store(&c, &get(&format!("/{i}"), &[]), &h, &[b'y'; 900]);
    }
    let (bytes, entries) = c.held();
    assert!(bytes <= 4000, "{bytes}");
    assert!((1..40).contains(&entries), "{entries}");
    assert!(c.metrics.evicted.get() > 0);
}

#[tokio::test]
async fn one_leads_the_others_wait_for_it() {
    let c = cache(cfg(1 << 20, 1000), "cache-unit-turn");
    let req = get("/a", &[]);
    let k = key(&req);
    let Turn::Lead(lead) = c.turn(&k) else {
        panic!("first leads")
    };
    let Turn::Follow(mut rx) = c.turn(&k) else {
        panic!("second follows")
    };
    let waiter = tokio::spawn(async move { rx.changed().await.is_err() });
    drop(lead);
    assert!(waiter.await.unwrap(), "woken when the lead ends");
    assert!(
        matches!(c.turn(&k), Turn::Lead(_)),
        "a later one leads again"
    );
}

#[test]
fn a_reload_keeps_the_cache_of_an_unchanged_service() {
    let c = cfg(1 << 20, 1000);
    let first = Cache::shared(c, &owner("cache-unit-reload", c), 0);
    let same = Cache::shared(c, &owner("cache-unit-reload", c), 0);
    assert!(Arc::ptr_eq(&first, &same));
    // Another route, other bounds, another config of the service: its own.
    assert!(!Arc::ptr_eq(
        &first,
        &Cache::shared(c, &owner("cache-unit-reload", c), 2)
    ));
    let bigger = cfg(2 << 20, 1000);
    assert!(!Arc::ptr_eq(
        &first,
        &Cache::shared(bigger, &owner("cache-unit-reload", bigger), 0)
    ));
    let mut changed = owner("cache-unit-reload", c);
    changed.matcher.port = Some(81);
    assert!(!Arc::ptr_eq(&first, &Cache::shared(c, &changed, 0)));
    // Once no table holds it, it is gone.
    drop((first, same));
    let again = Cache::shared(c, &owner("cache-unit-reload", c), 0);
    assert_eq!(again.held(), (0, 0));
}
