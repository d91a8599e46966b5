//! When a failed HTTP request may be sent again, and after how long.
//!
//! Connect failures never reach this (the connector moves to the next
//! endpoint itself: nothing was sent), and an HTTP/2 stream the upstream
//! refused unprocessed may go again whatever its method; one left
//! unprocessed by a graceful GOAWAY (the connection's normal end: nginx sends
//! one every `keepalive_requests`) goes again at once and outside the budget,
//! as any HTTP/2 client would, since it says nothing of the upstream's
//! health. Otherwise, after a
//! `5xx` or a reset, when the request may have reached the upstream, only
//! idempotent methods whose body is still at hand are retried, so a
//! non-idempotent request is never processed twice; a budget keeps retries a small share of the requests in flight, so
//! retries cannot multiply an outage; backoff is exponential with full jitter.

use std::sync::atomic::{AtomicUsize, Ordering};

use http::Method;
use tokio::time::Duration;

use crate::config::service::Retries;

/// Largest request body kept for a replay; bigger ones are sent once.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;
/// Retries always allowed at once, whatever the budget (as Envoy's
/// min_retry_concurrency), so a quiet service can still retry.
const MIN_CONCURRENT_RETRIES: usize = 3;
/// Backoff never grows past this many times the base.
const MAX_BACKOFF_FACTOR: u32 = 10;

/// Safe to send twice (RFC 9110 §9.2.2).
pub fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// What happened to one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The upstream answered with this 5xx status.
    Status(u16),
    /// The exchange broke after the request may have been sent.
    Reset,
    /// The upstream refused the stream unprocessed (HTTP/2 REFUSED_STREAM):
    /// safe to send again whatever the method.
    Refused,
    /// The upstream ended the connection gracefully (HTTP/2 GOAWAY,
    /// NO_ERROR) before processing the stream: safe whatever the method,
    /// and no sign of trouble, so neither budgeted nor delayed.
    GoneAway,
    /// A gRPC status answered before any body (trailers-only).
    Grpc(u16),
}

/// A service's retry policy and its budget's counters.
#[derive(Debug)]
pub struct RetryPolicy {
    cfg: Retries,
    active_requests: AtomicUsize,
    active_retries: AtomicUsize,
}

/// A request in flight, counted for the budget while alive.
pub struct InFlight<'a>(&'a RetryPolicy);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry in flight, counted against the budget while alive (unless it
/// is outside it: `None`).
pub struct RetryPermit<'a>(Option<&'a RetryPolicy>);

impl Drop for RetryPermit<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            p.active_retries.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl RetryPolicy {
    pub fn new(cfg: Retries) -> RetryPolicy {
        RetryPolicy {
            cfg,
            active_requests: AtomicUsize::new(0),
            active_retries: AtomicUsize::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cfg.attempts > 0
    }

    pub fn request(&self) -> InFlight<'_> {
        self.active_requests.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// Whether attempt number `retry` (1 for the first retry) may go out
    /// after `failure`, and the permit that holds its place in the budget.
    pub fn allow(
        &self,
        method: &Method,
        body_replayable: bool,
        failure: Failure,
        retry: u32,
    ) -> Option<RetryPermit<'_>> {
        let safe = match failure {
            Failure::Refused | Failure::GoneAway => true,
            // Listed by the config: said to be safe whatever the method.
            Failure::Grpc(code) => self.cfg.grpc_on.contains(code),
            Failure::Status(_) | Failure::Reset => idempotent(method),
        };
        if retry > self.cfg.attempts || !safe || !body_replayable {
            return None;
        }
        if failure == Failure::GoneAway {
            return Some(RetryPermit(None));
        }
        if let Failure::Status(s) = failure
            && !(500..600).contains(&s)
        {
            return None;
        }
        let requests = self.active_requests.load(Ordering::Relaxed);
        let allowed = ((self.cfg.budget * requests as f64) as usize).max(MIN_CONCURRENT_RETRIES);
        let now = self.active_retries.fetch_add(1, Ordering::Relaxed);
        if now >= allowed {
            self.active_retries.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(RetryPermit(Some(self)))
    }

    /// How long to wait before retry number `retry` after `failure`:
    /// uniformly random up to base × 2^(retry-1), capped ("full jitter");
    /// nothing after a graceful GOAWAY, which only asks for a new connection.
    pub fn backoff(&self, retry: u32, failure: Failure) -> Duration {
        if failure == Failure::GoneAway {
            return Duration::ZERO;
        }
        let factor = (1u32 << retry.saturating_sub(1).min(16)).min(MAX_BACKOFF_FACTOR);
        let ceiling = self.cfg.backoff.saturating_mul(factor);
        ceiling.mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: u32, budget: f64) -> RetryPolicy {
        RetryPolicy::new(Retries {
            attempts,
            backoff: Duration::from_millis(25),
            budget,
            grpc_on: Default::default(),
        })
    }

    #[test]
    fn grpc_statuses_are_retried_only_where_listed_whatever_the_method() {
        let p = RetryPolicy::new(Retries {
            grpc_on: serde_yaml_ng::from_str("[unavailable]").unwrap(),
            ..Retries::default()
        });
        assert!(p.allow(&Method::POST, true, Failure::Grpc(14), 1).is_some());
        assert!(p.allow(&Method::POST, true, Failure::Grpc(13), 1).is_none());
        // Not replayable, or past the attempts: never.
        assert!(
            p.allow(&Method::POST, false, Failure::Grpc(14), 1)
                .is_none()
        );
        assert!(p.allow(&Method::POST, true, Failure::Grpc(14), 3).is_none());
        // Nothing listed: a gRPC status is an answer.
        let none = policy(2, 0.2);
        assert!(
            none.allow(&Method::POST, true, Failure::Grpc(14), 1)
                .is_none()
        );
    }

    #[test]
    fn only_idempotent_replayable_5xx_or_resets() {
        let p = policy(2, 0.2);
        let _r = p.request();
        assert!(
            p.allow(&Method::GET, true, Failure::Status(503), 1)
                .is_some()
        );
        assert!(p.allow(&Method::PUT, true, Failure::Reset, 1).is_some());
        assert!(
            p.allow(&Method::POST, true, Failure::Status(503), 1)
                .is_none()
        );
        assert!(p.allow(&Method::PATCH, true, Failure::Reset, 1).is_none());
        assert!(
            p.allow(&Method::GET, false, Failure::Status(503), 1)
                .is_none()
        );
        assert!(
            p.allow(&Method::GET, true, Failure::Status(404), 1)
                .is_none()
        );
        assert!(
            p.allow(&Method::GET, true, Failure::Status(503), 3)
                .is_none()
        );
    }

    #[test]
    fn the_budget_caps_concurrent_retries() {
        let p = policy(5, 0.2);
        let reqs: Vec<_> = (0..50).map(|_| p.request()).collect();
        // 20% of 50 in flight: ten retries at once, no more.
        let permits: Vec<_> = (0..20)
            .filter_map(|_| p.allow(&Method::GET, true, Failure::Reset, 1))
            .collect();
        assert_eq!(permits.len(), 10);
        drop(permits);
        assert!(p.allow(&Method::GET, true, Failure::Reset, 1).is_some());
        drop(reqs);
        // Quiet service: the floor of three still applies.
        let few: Vec<_> = (0..5)
            .filter_map(|_| p.allow(&Method::GET, true, Failure::Reset, 1))
            .collect();
        assert_eq!(few.len(), 3);
    }

    #[test]
    fn a_graceful_goaway_is_retried_whatever_the_method_and_outside_the_budget() {
        let p = policy(2, 0.2);
        let _r = p.request();
        // The budget's floor of three is taken by resets...
        let taken: Vec<_> = (0..3)
            .filter_map(|_| p.allow(&Method::GET, true, Failure::Reset, 1))
            .collect();
        assert_eq!(taken.len(), 3);
        assert!(p.allow(&Method::GET, true, Failure::Reset, 1).is_none());
        // ...a stream a GOAWAY left unprocessed still goes, POST included.
        let gone: Vec<_> = (0..10)
            .filter_map(|_| p.allow(&Method::POST, true, Failure::GoneAway, 1))
            .collect();
        assert_eq!(gone.len(), 10);
        drop(gone);
        // Still bounded by the attempts and by a body at hand.
        assert!(p.allow(&Method::POST, true, Failure::GoneAway, 3).is_none());
        assert!(
            p.allow(&Method::POST, false, Failure::GoneAway, 1)
                .is_none()
        );
        // And those permits were never counted: the budget is as it was.
        drop(taken);
        assert!(p.allow(&Method::GET, true, Failure::Reset, 1).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_jittered_exponential_and_capped() {
        let p = policy(20, 1.0);
        for retry in 1..=12u32 {
            let ceiling = Duration::from_millis(25) * (1u32 << (retry - 1)).min(10);
            for _ in 0..50 {
                let b = p.backoff(retry, Failure::Reset);
                assert!(b <= ceiling, "retry {retry}: {b:?} > {ceiling:?}");
            }
        }
        // Jitter: not always the same wait.
        let waits: std::collections::HashSet<_> =
            (0..20).map(|_| p.backoff(3, Failure::Reset)).collect();
        assert!(waits.len() > 1);
        let t = tokio::time::Instant::now();
        tokio::time::sleep(p.backoff(1, Failure::Status(503))).await;
        assert!(t.elapsed() <= Duration::from_millis(25));
        assert_eq!(p.backoff(5, Failure::GoneAway), Duration::ZERO);
    }
}
