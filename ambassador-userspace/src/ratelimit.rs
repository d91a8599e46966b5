//! Local rate limits (an inbound port's, a route's): a token bucket for
//! the port or route, or for each caller key, with a bounded table. Decided on explicit instants, so it is tested
//! without sleeping.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::config::gateway::{RateKey, RateLimit};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + secs * rate).min(burst);
        self.at = now;
    }

    /// Takes a token, or says how long until there is one.
    fn take(&mut self, now: Instant, rate: f64, burst: f64) -> Result<(), Duration> {
        self.refill(now, rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// One port's limiter.
pub struct Limiter {
    rate: f64,
    burst: f64,
    pub key: RateKey,
    max_keys: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// The port's bucket (`key: port`), and the one callers share once the
    /// table is full.
    shared: Mutex<Option<Bucket>>,
}

impl Limiter {
    pub fn new(cfg: &RateLimit) -> Limiter {
        Limiter {
            rate: cfg.requests_per_second,
            burst: f64::from(cfg.burst),
            key: cfg.key.clone(),
            max_keys: cfg.max_keys,
            buckets: Mutex::new(HashMap::new()),
            shared: Mutex::new(None),
        }
    }

    /// A request with this key (none: the port's bucket): let through, or
    /// the time after which to try again.
    pub fn check(&self, key: Option<&str>, now: Instant) -> Result<(), Duration> {
        let (rate, burst) = (self.rate, self.burst);
        let Some(key) = key else {
            return self.take_shared(now);
        };
        let mut buckets = crate::sync::lock(&self.buckets);
        if let Some(b) = buckets.get_mut(key) {
            return b.take(now, rate, burst);
        }
        if buckets.len() >= self.max_keys {
            // Forget the buckets that are full again (they limit nobody).
            buckets.retain(|_, b| {
                b.refill(now, rate, burst);
                b.tokens < burst
            });
        }
        if buckets.len() >= self.max_keys {
            drop(buckets);
            return self.take_shared(now);
        }
        let mut b = Bucket::full(burst, now);
        let r = b.take(now, rate, burst);
        buckets.insert(key.to_string(), b);
        r
    }

    fn take_shared(&self, now: Instant) -> Result<(), Duration> {
        let mut shared = crate::sync::lock(&self.shared);
        shared
            .get_or_insert_with(|| Bucket::full(self.burst, now))
            .take(now, self.rate, self.burst)
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        crate::sync::lock(&self.buckets).len()
    }
}

/// `Retry-After` in whole seconds, at least 1.
pub fn retry_after(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(yaml: &str) -> Limiter {
        Limiter::new(&serde_yaml_ng::from_str(yaml).unwrap())
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let l = limiter("{ requests_per_second: 2, burst: 3 }");
        let t0 = Instant::now();
        let passed = (0..10).filter(|_| l.check(None, t0).is_ok()).count();
        assert_eq!(passed, 3);
        let wait = l.check(None, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(retry_after(wait), 1);
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        assert!(l.check(None, t1).is_ok());
        assert!(l.check(None, t1).is_err());
        // Long idle refills to the burst, no more.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| l.check(None, t2).is_ok()).count(), 3);
    }

    #[test]
    fn each_key_has_its_bucket() {
        let l = limiter("{ requests_per_second: 1, burst: 1, key: client_ip }");
        let t = Instant::now();
        assert!(l.check(Some("10.0.0.1"), t).is_ok());
        assert!(l.check(Some("10.0.0.1"), t).is_err());
        assert!(l.check(Some("10.0.0.2"), t).is_ok());
    }

    #[test]
    fn the_table_is_bounded_and_overflow_shares_one_bucket() {
        let l = limiter("{ requests_per_second: 1, burst: 2, key: client_ip, max_keys: 3 }");
        let t = Instant::now();
        for k in ["a", "b", "c"] {
            assert!(l.check(Some(k), t).is_ok());
        }
        assert_eq!(l.keys(), 3);
        // Table full of limiting buckets: newcomers share one bucket of 2.
        assert!(l.check(Some("d"), t).is_ok());
        assert!(l.check(Some("e"), t).is_ok());
        assert!(l.check(Some("f"), t).is_err());
        assert_eq!(l.keys(), 3);
        // Later the old buckets are full again and make room.
        let later = t + Duration::from_secs(10);
        assert!(l.check(Some("g"), later).is_ok());
        assert_eq!(l.keys(), 1);
    }
}
