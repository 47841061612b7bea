//! Consistency checks over a snapshot of the whole IPAM state (`poolwarden ipam check`).

use std::{collections::BTreeMap, fmt};

use ipnet::IpNet;

use super::{Affinity, Block, HandleRecord};
use crate::resources::IpPool;

/// One inconsistency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// A short stable kind, for scripts: `orphan-allocation`, `handle-mismatch`, ...
    pub kind: &'static str,
    /// What is wrong, naming the block, address, handle or node.
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// Everything `check` looks at.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every pool.
    pub pools: Vec<IpPool>,
    /// Every block.
    pub blocks: Vec<Block>,
    /// Every affinity.
    pub affinities: Vec<Affinity>,
    /// Every handle record.
    pub handles: Vec<HandleRecord>,
    /// The nodes registered by their agents (empty when no agent ever registered: then nobody's liveness
    /// is known, and nothing is called leaked).
    pub nodes: std::collections::BTreeSet<String>,
}

impl Snapshot {
    /// How many addresses of `pool` are allocated.
    pub fn used_in(&self, pool: &IpPool) -> u128 {
        self.blocks.iter().filter(|b| pool.cidr().contains(&b.cidr)).map(|b| u128::from(b.used())).sum()
    }
}

/// Every inconsistency in the snapshot; empty means clean.
pub fn check(snapshot: &Snapshot) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut report = |kind, detail: String| problems.push(Problem { kind, detail });

    for (i, a) in snapshot.pools.iter().enumerate() {
        for b in &snapshot.pools[i + 1..] {
            if a.cidr().contains(&b.cidr()) || b.cidr().contains(&a.cidr()) {
                report(
                    "pool-overlap",
                    format!("pools {} ({}) and {} ({}) overlap", a.name(), a.cidr(), b.name(), b.cidr()),
                );
            }
        }
    }

    let mut sorted: Vec<&Block> = snapshot.blocks.iter().collect();
    sorted.sort_by_key(|b| (b.cidr.network(), b.cidr.prefix_len()));
    for pair in sorted.windows(2) {
        if pair[0].cidr.contains(&pair[1].cidr.network()) {
            report("block-overlap", format!("blocks {} and {} overlap", pair[0].cidr, pair[1].cidr));
        }
    }

    let mut held: BTreeMap<&str, BTreeMap<IpNet, u32>> = BTreeMap::new();
    for block in &snapshot.blocks {
        if !block.is_consistent() {
            report("block-corrupt", format!("block {}: an address is both free and allocated, or neither", block.cidr));
        }
        match snapshot.pools.iter().find(|p| p.cidr().contains(&block.cidr.network())) {
            None => report(
                "block-outside-pools",
                format!("block {} is in no pool (pool {:?} deleted?)", block.cidr, block.pool),
            ),
            Some(pool) if !pool.cidr().contains(&block.cidr) || pool.block_size() != block.cidr.prefix_len() => report(
                "block-misaligned",
                format!(
                    "block {} crosses the boundary or block size of pool {} ({}, /{})",
                    block.cidr,
                    pool.name(),
                    pool.cidr(),
                    pool.block_size()
                ),
            ),
            Some(_) => {}
        }
        if let Some(node) = &block.affinity {
            let affine = snapshot.affinities.iter().any(|a| a.cidr == block.cidr && &a.node == node);
            if !affine {
                report(
                    "missing-affinity",
                    format!("block {} names node {node} but that node has no affinity record for it", block.cidr),
                );
            }
        }
        for (ip, allocation) in block.allocated() {
            *held.entry(allocation.handle.as_str()).or_default().entry(block.cidr).or_default() += 1;
            if !snapshot.handles.iter().any(|h| h.handle == allocation.handle) {
                report(
                    "orphan-allocation",
                    format!("{ip} in block {} is held by handle {} which has no record", block.cidr, allocation.handle),
                );
            }
        }
    }

    for handle in &snapshot.handles {
        let actual = held.get(handle.handle.as_str()).cloned().unwrap_or_default();
        if actual != handle.blocks {
            report(
                "handle-mismatch",
                format!("handle {} records {:?} but the blocks hold {:?}", handle.handle, handle.blocks, actual),
            );
        }
    }

    if !snapshot.nodes.is_empty() {
        let nobody = super::gc::LocalEndpoints::new();
        for leak in super::gc::leaked_addresses(&snapshot.blocks, "", &snapshot.nodes, &nobody) {
            report(
                "leaked-address",
                format!("{} (handle {}) was assigned on node {}: {}", leak.ip, leak.handle, leak.node, leak.reason),
            );
        }
        for affinity in super::gc::orphaned_affinities(&snapshot.affinities, &snapshot.nodes) {
            report(
                "orphaned-affinity",
                format!(
                    "block {} is affine to node {}, which is not registered any more",
                    affinity.cidr, affinity.node
                ),
            );
        }
    }

    for affinity in &snapshot.affinities {
        match snapshot.blocks.iter().find(|b| b.cidr == affinity.cidr) {
            None => report(
                "orphan-affinity",
                format!("node {} has an affinity for block {} which does not exist", affinity.node, affinity.cidr),
            ),
            Some(b) if b.affinity.as_deref() != Some(affinity.node.as_str()) => report(
                "affinity-mismatch",
                format!(
                    "node {} claims block {} but the block is affine to {:?}",
                    affinity.node, affinity.cidr, b.affinity
                ),
            ),
            Some(_) => {}
        }
    }
    problems
}
