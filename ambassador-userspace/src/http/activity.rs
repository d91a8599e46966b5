//! How busy an app connection is: what closes one that never sends a
//! request (a silent client, a stalled HTTP/2 preface) and one that sits
//! idle, HTTP/2 included, where hyper has neither timer.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    started: AtomicU64,
    ended: AtomicU64,
    /// When the last request ended, in ms since `opened`.
    last_end_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            started: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            last_end_ms: AtomicU64::new(0),
        }
    }

    /// Whether any request began.
    pub fn any(&self) -> bool {
        self.started.load(Ordering::Relaxed) > 0
    }

    pub fn start(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// A request's response has ended (or was dropped).
    pub fn end(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_end_ms.store(ms, Ordering::Relaxed);
        self.ended.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns when the connection should be closed: no request began by
    /// `first_by`, or none was in flight for `idle`.
    pub async fn until_idle(&self, first_by: Instant, idle: Duration) {
        tokio::time::sleep_until(first_by).await;
        if !self.any() {
            return;
        }
        loop {
            let ended = self.ended.load(Ordering::Relaxed);
            if ended == self.started.load(Ordering::Relaxed) {
                let last =
                    self.opened + Duration::from_millis(self.last_end_ms.load(Ordering::Relaxed));
                let quiet = last.elapsed();
                if quiet >= idle {
                    return;
                }
                tokio::time::sleep(idle - quiet).await;
            } else {
                tokio::time::sleep(idle).await;
            }
        }
    }
}

/// A request in flight on its app connection, until its response ends.
pub struct InFlight(Arc<Activity>);

impl InFlight {
    pub fn new(activity: &Arc<Activity>) -> InFlight {
        activity.start();
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_goes_at_the_first_request_deadline() {
        let a = Activity::new();
        let t0 = Instant::now();
        a.until_idle(t0 + Duration::from_secs(10), Duration::from_secs(3600))
            .await;
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_stays_and_an_idle_one_goes() {
        let a = std::sync::Arc::new(Activity::new());
        let t0 = Instant::now();
        a.start();
        let b = a.clone();
        tokio::spawn(async move {
            // A long response (a stream) ends at 100 s.
            tokio::time::sleep(Duration::from_secs(100)).await;
            b.end();
        });
        a.until_idle(t0 + Duration::from_secs(10), Duration::from_secs(30))
            .await;
        // In flight until 100 s, then 30 s idle; checked every 30 s while busy.
        let closed = t0.elapsed();
        assert!(
            closed >= Duration::from_secs(130) && closed <= Duration::from_secs(131),
            "{closed:?}"
        );
    }
}
