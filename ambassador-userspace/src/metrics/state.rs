//! Live state read at scrape time (endpoint health, kernel counters,
//! pools), instead of gauges the data path would have to keep up to date.

use std::sync::Mutex;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

/// A scrape-time source of gauges and counters: (metric, help, type, rows of
/// labels and value).
pub type StateSource = Box<dyn Fn(&mut StateRows) + Send + Sync>;

/// What a source reports at a scrape.
#[derive(Default)]
pub struct StateRows {
    /// Endpoint up (1) or out (0: ejected or failing its health check).
    pub endpoint_up: Vec<(String, String, bool)>,
    /// Kernel connect counters, by outcome; empty when the maps are not
    /// readable by this process.
    pub kernel: Vec<(&'static str, u64)>,
    /// Named gauges with one `service` label: (metric suffix, help, service, value).
    pub gauges: Vec<(&'static str, &'static str, String, i64)>,
    /// Named counters with one `service` label, as `gauges`.
    pub counters: Vec<(&'static str, &'static str, String, u64)>,
}

/// Reads live state at each scrape instead of mirroring it in gauges that
/// the data path would have to keep up to date.
#[derive(Default)]
pub struct StateCollector {
    sources: Mutex<Vec<(&'static str, StateSource)>>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

impl StateCollector {
    /// Adds (or replaces, by key) a source.
    pub fn set(&self, key: &'static str, source: StateSource) {
        let mut s = crate::sync::lock(&self.sources);
        s.retain(|(k, _)| *k != key);
        s.push((key, source));
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut rows = StateRows::default();
        for (_, source) in crate::sync::lock(&self.sources).iter() {
            source(&mut rows);
        }
        if !rows.endpoint_up.is_empty() {
            let g = ConstGauge::new(0i64);
            let mut e = encoder.encode_descriptor(
                "endpoint_up",
                "1 when an endpoint takes traffic, 0 when ejected or failing its health check",
                None,
                g.metric_type(),
            )?;
            for (service, endpoint, up) in &rows.endpoint_up {
                let labels = [
                    ("service", service.as_str()),
                    ("endpoint", endpoint.as_str()),
                ];
                let fam = e.encode_family(&labels)?;
                ConstGauge::new(i64::from(*up)).encode(fam)?;
            }
        }
        use ambassador_common::counter::{ACCELERATED, DNS_REDIRECTED, NAMES};
        // Counters with a series of their own, not connect outcomes.
        let singles = [
            (
                NAMES[ACCELERATED as usize],
                "kernel_accelerated_streams",
                "app<->proxy byte streams (one per direction) that took the sk_msg shortcut past the loopback TCP stack",
            ),
            (
                NAMES[DNS_REDIRECTED as usize],
                "kernel_dns_redirected",
                "The app's DNS queries (UDP) the kernel handed to the proxy's forwarder",
            ),
        ];
        if !rows.kernel.is_empty() {
            let c = ConstCounter::new(0u64);
            let mut e = encoder.encode_descriptor(
                "kernel_connects",
                "connect() calls and callers' connections the kernel programs saw, by outcome (redirected, bypassed, refused, passed; inbound_redirected, inbound_passed, inbound_refused)",
                None,
                c.metric_type(),
            )?;
            for (outcome, v) in rows
                .kernel
                .iter()
                .filter(|(n, _)| !singles.iter().any(|s| s.0 == *n) && !n.starts_with("udp_"))
            {
                let labels = [("outcome", *outcome)];
                let fam = e.encode_family(&labels)?;
                ConstCounter::new(*v).encode(fam)?;
            }
        }
        let mut udp = rows
            .kernel
            .iter()
            .filter(|(n, _)| n.starts_with("udp_"))
            .peekable();
        if udp.peek().is_some() {
            let c = ConstCounter::new(0u64);
            let mut e = encoder.encode_descriptor(
                "kernel_udp",
                "UDP sends and connects under default: deny, by outcome: allowed (intercept.udp), refused (EPERM)",
                None,
                c.metric_type(),
            )?;
            for (name, v) in udp {
                let labels = [("outcome", name.trim_start_matches("udp_"))];
                ConstCounter::new(*v).encode(e.encode_family(&labels)?)?;
            }
        }
        for (counter, name, help) in singles {
            if let Some((_, v)) = rows.kernel.iter().find(|(n, _)| *n == counter) {
                let c = ConstCounter::new(*v);
                c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
            }
        }
        rows.gauges.sort_by_key(|g| g.0);
        for group in rows.gauges.chunk_by(|a, b| a.0 == b.0) {
            let (name, help, _, _) = group[0];
            let g = ConstGauge::new(0i64);
            let mut e = encoder.encode_descriptor(name, help, None, g.metric_type())?;
            for (_, _, service, v) in group {
                let labels = [("service", service.as_str())];
                ConstGauge::new(*v).encode(e.encode_family(&labels)?)?;
            }
        }
        rows.counters.sort_by_key(|c| c.0);
        for group in rows.counters.chunk_by(|a, b| a.0 == b.0) {
            let (name, help, _, _) = group[0];
            let c = ConstCounter::new(0u64);
            let mut e = encoder.encode_descriptor(name, help, None, c.metric_type())?;
            for (_, _, service, v) in group {
                let labels = [("service", service.as_str())];
                ConstCounter::new(*v).encode(e.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
