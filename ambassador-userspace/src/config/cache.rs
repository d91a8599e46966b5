//! `cache:` of an HTTP service or one of its routes: a shared response
//! cache by RFC 9111, bounded in bytes. A route may keep its own (its own
//! limits) or none (`cache: false`); otherwise it uses its service's.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::values::{DurationText, opt_duration, ser_opt_duration};

/// The most one cache may hold.
pub const MAX_CACHE_BYTES: u64 = 16 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RawCache")]
pub struct CacheConfig {
    /// Bytes of stored responses (bodies and heads); past it, the least
    /// valuable entries go first.
    pub max_bytes: u64,
    /// The largest response stored; a bigger one streams through uncached.
    pub max_entry_bytes: u64,
    /// Freshness for responses that give none (no `max-age`, `s-maxage` or
    /// `Expires`); none: such responses are stored only to be revalidated
    /// (they have an `ETag` or `Last-Modified`), never served unasked.
    #[serde(
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<DurationText>")]
    pub default_ttl: Option<Duration>,
    /// How long past its freshness a stored response may still answer when
    /// the upstream fails (no response, or 500/502/503/504); never for a
    /// response marked `must-revalidate`, `proxy-revalidate` or `no-cache`.
    #[serde(
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<DurationText>")]
    pub stale_if_error: Option<Duration>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default = "max_bytes")]
    max_bytes: u64,
    #[serde(default = "max_entry_bytes")]
    max_entry_bytes: u64,
    #[serde(default, deserialize_with = "opt_duration")]
    #[schemars(with = "Option<DurationText>")]
    default_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    #[schemars(with = "Option<DurationText>")]
    stale_if_error: Option<Duration>,
}

fn max_bytes() -> u64 {
    64 << 20
}

fn max_entry_bytes() -> u64 {
    1 << 20
}

impl TryFrom<RawCache> for CacheConfig {
    type Error = String;
    fn try_from(r: RawCache) -> Result<Self, String> {
        if !(1..=MAX_CACHE_BYTES).contains(&r.max_bytes) {
            return Err(format!("max_bytes: between 1 and {MAX_CACHE_BYTES}"));
        }
        if r.max_entry_bytes == 0 || r.max_entry_bytes > r.max_bytes {
            return Err("max_entry_bytes: more than 0, at most max_bytes".into());
        }
        if r.default_ttl.is_some_and(|d| d.is_zero()) {
            return Err("default_ttl: more than 0 (leave it out for none)".into());
        }
        Ok(CacheConfig {
            max_bytes: r.max_bytes,
            max_entry_bytes: r.max_entry_bytes,
            default_ttl: r.default_ttl,
            stale_if_error: r.stale_if_error,
        })
    }
}

/// A route's `cache`: its own, none (`false`), or (left out) its
/// service's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteCache {
    #[default]
    Service,
    Off,
    Own(CacheConfig),
}

impl RouteCache {
    pub fn is_service(&self) -> bool {
        *self == RouteCache::Service
    }
}

impl Serialize for RouteCache {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RouteCache::Service => s.serialize_none(),
            RouteCache::Off => s.serialize_bool(false),
            RouteCache::Own(c) => c.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for RouteCache {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RouteCache;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "false (no cache for this route) or the route's own cache ({max_bytes, ...})",
                )
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<RouteCache, E> {
                if b {
                    return Err(E::custom(
                        "`true` is not a cache: leave `cache` out for the service's, \
                         give the route's own ({} for the defaults), or `false` for none",
                    ));
                }
                Ok(RouteCache::Off)
            }
            fn visit_unit<E: de::Error>(self) -> Result<RouteCache, E> {
                Ok(RouteCache::Service)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RouteCache, A::Error> {
                CacheConfig::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RouteCache::Own)
            }
        }
        d.deserialize_any(V)
    }
}

impl schemars::JsonSchema for RouteCache {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RouteCache".into()
    }

    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let own = g.subschema_for::<CacheConfig>();
        schemars::json_schema!({
            "description": "false: no cache for this route; an object: the route's own cache; left out: the service's",
            "anyOf": [{ "const": false }, own]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(yaml: &str) -> Result<RouteCache, String> {
        serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_bounds_and_the_route_forms() {
        let c: CacheConfig = serde_yaml_ng::from_str("{}").unwrap();
        assert_eq!((c.max_bytes, c.max_entry_bytes), (64 << 20, 1 << 20));
        assert_eq!((c.default_ttl, c.stale_if_error), (None, None));
        let e = serde_yaml_ng::from_str::<CacheConfig>("{max_bytes: 10, max_entry_bytes: 11}")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_entry_bytes: more than 0, at most max_bytes"),
            "{e}"
        );
        let e = serde_yaml_ng::from_str::<CacheConfig>("{default_ttl: 0s}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("default_ttl: more than 0"), "{e}");
        assert_eq!(route("false"), Ok(RouteCache::Off));
        assert!(route("true").unwrap_err().contains("`true` is not a cache"));
        let own = route("{max_bytes: 1000, max_entry_bytes: 100, default_ttl: 5s}").unwrap();
        let RouteCache::Own(c) = own else {
            panic!("{own:?}")
        };
        assert_eq!(c.default_ttl, Some(Duration::from_secs(5)));
        assert!(route("{max_byte: 3}").unwrap_err().contains("max_byte"));
        // What `config` prints reads back the same.
        let text = serde_yaml_ng::to_string(&own).unwrap();
        assert_eq!(route(&text), Ok(own));
    }
}
