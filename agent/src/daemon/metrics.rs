//! Prometheus metrics: requests by command and result, their latency, addresses used and free per pool,
//! blocks owned by this node.

use std::time::Duration;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::ipam::check::Snapshot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    command: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    pool: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PassLabels {
    pool: String,
}

type HistogramFamily = Family<CommandLabels, Histogram, fn() -> Histogram>;

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    addresses: Family<PoolLabels, Gauge>,
    blocks_owned: Gauge,
    dropped: Family<DropLabels, Counter>,
    passed: Family<PassLabels, Counter>,
    /// The kernel's totals last seen, so the counters advance by the difference.
    seen: std::sync::Mutex<std::collections::HashMap<(String, u32), u64>>,
}

fn latency_histogram() -> Histogram {
    // 100 us to about 3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("poolwarden");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let addresses = Family::<PoolLabels, Gauge>::default();
        let blocks_owned = Gauge::default();
        registry.register("requests", "Requests served, by command and result", requests.clone());
        registry.register("request_duration_seconds", "Time to serve a request, by command", latency.clone());
        registry.register("pool_addresses", "Addresses per pool, by state (used or free)", addresses.clone());
        registry.register("blocks_owned", "Blocks affine to this node", blocks_owned.clone());
        let dropped = Family::<DropLabels, Counter>::default();
        let passed = Family::<PassLabels, Counter>::default();
        registry.register(
            "dropped_packets",
            "Packets from pods dropped by enforcement, by pool and reason",
            dropped.clone(),
        );
        registry.register("passed_packets", "Packets from pods passed by enforcement, by pool", passed.clone());
        Self { registry, requests, latency, addresses, blocks_owned, dropped, passed, seen: Default::default() }
    }
}

impl Metrics {
    /// Count one request and its latency.
    pub fn observe(&self, command: &str, result: &str, elapsed: Duration) {
        self.requests.get_or_create(&RequestLabels { command: command.into(), result: result.into() }).inc();
        self.latency.get_or_create(&CommandLabels { command: command.into() }).observe(elapsed.as_secs_f64());
    }

    /// Set the number of blocks this node owns.
    pub fn set_blocks_owned(&self, blocks: usize) {
        self.blocks_owned.set(i64::try_from(blocks).unwrap_or(i64::MAX));
    }

    /// Set the per-pool address gauges.
    pub fn set_pools(&self, snapshot: &Snapshot) {
        for pool in &snapshot.pools {
            let used = snapshot.used_in(pool);
            let free = pool.size().saturating_sub(used);
            for (state, value) in [("used", used), ("free", free)] {
                self.addresses
                    .get_or_create(&PoolLabels { pool: pool.name().to_string(), state: state.into() })
                    .set(i64::try_from(value).unwrap_or(i64::MAX));
            }
        }
    }

    /// Advance the enforcement counters to the kernel's totals: (pool, reason, packets).
    pub fn set_enforcement(&self, totals: impl IntoIterator<Item = (String, u32, u64)>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for (pool, why, total) in totals {
            let last = seen.insert((pool.clone(), why), total).unwrap_or(0);
            let delta = total.saturating_sub(last);
            if why == poolwarden_ebpf_common::reason::PASSED {
                self.passed.get_or_create(&PassLabels { pool }).inc_by(delta);
            } else {
                let reason = poolwarden_ebpf_common::reason::name(why).to_string();
                self.dropped.get_or_create(&DropLabels { pool, reason }).inc_by(delta);
            }
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
