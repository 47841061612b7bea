//! Prometheus metrics: requests by command and result, their latency, each pool's size, the addresses used
//! and free in the blocks this node owns (per pool: `sum by (pool)` over the nodes gives the pool's totals,
//! so that no node reads the whole store for them), blocks owned by this node, enforcement's verdicts, and the
//! requests sent to the Kubernetes API server.

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

use crate::{ipam::Block, resources::IpPool};

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
struct SizeLabels {
    pool: String,
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
    sizes: Family<SizeLabels, Gauge>,
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
        let sizes = Family::<SizeLabels, Gauge>::default();
        registry.register("pool_size_addresses", "Addresses in each pool's CIDR", sizes.clone());
        registry.register(
            "node_addresses",
            "Addresses of the blocks this node owns, per pool, by state (used or free); sum by pool for the pool",
            addresses.clone(),
        );
        registry.register("blocks_owned", "Blocks affine to this node", blocks_owned.clone());
        let dropped = Family::<DropLabels, Counter>::default();
        let passed = Family::<PassLabels, Counter>::default();
        registry.register(
            "dropped_packets",
            "Packets from pods dropped by enforcement, by pool and reason",
            dropped.clone(),
        );
        registry.register("passed_packets", "Packets from pods passed by enforcement, by pool", passed.clone());
        registry.register(
            "kubernetes_requests",
            "Requests this agent sent to the Kubernetes API server, by verb and resource (watches count once, when \
             opened)",
            crate::k8s::requests::PROCESS.family(),
        );
        Self { registry, requests, latency, addresses, sizes, blocks_owned, dropped, passed, seen: Default::default() }
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

    /// Set the pools' sizes and the addresses of `blocks` (this node's) per pool; pools gone lose their series.
    pub fn set_pools(&self, pools: &[IpPool], blocks: &[Block]) {
        self.sizes.clear();
        self.addresses.clear();
        for pool in pools {
            self.sizes.get_or_create(&SizeLabels { pool: pool.name().to_string() }).set(saturating(pool.size()));
            let mine = blocks.iter().filter(|b| b.pool == pool.name());
            let (used, free) =
                mine.fold((0u128, 0u128), |(u, f), b| (u + u128::from(b.used()), f + u128::from(b.free_count())));
            for (state, value) in [("used", used), ("free", free)] {
                self.addresses
                    .get_or_create(&PoolLabels { pool: pool.name().to_string(), state: state.into() })
                    .set(saturating(value));
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

fn saturating(value: u128) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Resource, parse_documents};

    #[test]
    fn pool_series_are_this_nodes_blocks_and_pools_gone_lose_theirs() {
        let docs = parse_documents(
            "p.yaml",
            "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: a}\nspec: {cidr: 10.9.0.0/24, blockSize: 29}\n---\n\
             apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: b}\nspec: {cidr: 10.8.0.0/24, blockSize: 29}\n",
        )
        .unwrap();
        let pools: Vec<IpPool> = docs
            .into_iter()
            .filter_map(|d| if let Resource::IpPool(p) = d.resource { Some(p) } else { None })
            .collect();
        let mut block = Block::new("10.9.0.0/29".parse().unwrap(), "a", "node-1", 0);
        let owner = crate::ipam::Owner { node: "node-1".into(), handle: "h".into(), ..Default::default() };
        block.assign_ip("10.9.0.3".parse().unwrap(), &owner, 0, 0).unwrap();
        let metrics = Metrics::default();
        metrics.set_pools(&pools, &[block]);
        let text = metrics.render();
        for line in [
            "poolwarden_pool_size_addresses{pool=\"a\"} 256",
            "poolwarden_node_addresses{pool=\"a\",state=\"used\"} 1",
            "poolwarden_node_addresses{pool=\"a\",state=\"free\"} 7",
            "poolwarden_node_addresses{pool=\"b\",state=\"used\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        metrics.set_pools(&pools[..1], &[]);
        let text = metrics.render();
        assert!(!text.contains("pool=\"b\""), "{text}");
        assert!(text.contains("poolwarden_node_addresses{pool=\"a\",state=\"used\"} 0"), "{text}");
    }
}
