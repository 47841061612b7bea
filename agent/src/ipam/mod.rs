//! Pure IPAM: pools, blocks, affinities, handles, pool selection and consistency checks.
//!
//! Nothing here does I/O or knows about the datastore: functions take values and return values, and the
//! allocator turns their decisions into datastore transactions.

pub mod block;
pub mod check;
pub mod gc;
pub mod mismatch;
pub mod selection;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use block::{Allocation, Block, BlockError, Owner};
pub use selection::{NamespaceInfo, NodeInfo, PodInfo, Requested, Selection, SelectionError};

use crate::resources::IpPool;

/// Seconds since the Unix epoch, as the allocators and the catalog stamp released addresses and judge their
/// cooldown; tests move one of their own.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// A node's claim on a block.
///
/// The block, its affinity and the block's first allocation are created in one atomic transaction, and an
/// empty block and its affinity are deleted in one, so an affinity is never half-made: Calico's
/// pending/confirmed states exist because Kubernetes CRDs have no multi-object transactions, and our
/// datastores do. Two nodes racing for one block are arbitrated by create-if-absent on the block's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affinity {
    /// The node.
    pub node: String,
    /// The block.
    pub cidr: IpNet,
}

/// The addresses one (container, interface) holds, by block: lets release find them without a scan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleRecord {
    /// The handle.
    pub handle: String,
    /// How many addresses the handle holds in each block.
    pub blocks: BTreeMap<IpNet, u32>,
}

/// The handle for one attachment: one per (container, interface).
pub fn handle_for(container_id: &str, ifname: &str) -> String {
    format!("{container_id}.{ifname}")
}

/// The block of `pool` that contains `ip`, if `ip` is in the pool.
pub fn block_containing(pool: &IpPool, ip: IpAddr) -> Option<IpNet> {
    if !pool.contains(ip) {
        return None;
    }
    IpNet::new(ip, pool.block_size()).ok().map(|n| n.trunc())
}

/// The blocks of `pool` that nobody has claimed, in address order.
pub fn unclaimed_blocks<'a>(
    pool: &IpPool,
    claimed: &'a std::collections::BTreeSet<IpNet>,
) -> impl Iterator<Item = IpNet> + 'a {
    let subnets = pool.cidr().subnets(pool.block_size()).ok();
    subnets.into_iter().flatten().filter(move |b| !overlaps_any(*b, claimed))
}

/// Whether `candidate` shares an address with any of `blocks` (of any size: a block left by a deleted pool
/// of another block size overlaps without being equal). Blocks do not overlap each other, so the one that
/// starts last at or before `candidate`'s end is the only one that can.
pub fn overlaps_any(candidate: IpNet, blocks: &std::collections::BTreeSet<IpNet>) -> bool {
    let end = IpNet::new(candidate.broadcast(), candidate.max_prefix_len()).unwrap_or(candidate);
    blocks.range(..=end).next_back().is_some_and(|b| b.broadcast() >= candidate.network())
}

/// Which addresses an IPAM-only attachment may be given, as host-local rules its range: inside the subnet
/// its result reports (given, or the pool's range), never that subnet's network or IPv4 broadcast address nor
/// a gateway, and within `rangeStart`..`rangeEnd` where given (each per family).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Eligible {
    /// The subnet the result reports, per family (none for a family: the pool's range).
    pub subnets: Vec<IpNet>,
    /// The first address that may be given, per family.
    pub starts: Vec<IpAddr>,
    /// The last address that may be given, per family.
    pub ends: Vec<IpAddr>,
    /// Addresses never given (the gateways).
    pub exclude: Vec<IpAddr>,
}

impl Eligible {
    /// Whether `ip`, from the pool whose range is `pool`, may be given.
    pub fn allows(&self, ip: IpAddr, pool: IpNet) -> bool {
        let family = |a: &IpAddr| a.is_ipv4() == ip.is_ipv4();
        let subnet = self.subnets.iter().find(|s| family(&s.addr())).copied().unwrap_or(pool).trunc();
        if !subnet.contains(&ip) || self.exclude.contains(&ip) {
            return false;
        }
        let edges = match subnet {
            IpNet::V4(v4) if v4.prefix_len() < 31 => ip == subnet.network() || ip == IpAddr::V4(v4.broadcast()),
            IpNet::V6(v6) if v6.prefix_len() < 127 => ip == subnet.network(),
            _ => false,
        };
        let value = block::to_u128(ip);
        !edges
            && self.starts.iter().filter(|s| family(s)).all(|s| value >= block::to_u128(*s))
            && self.ends.iter().filter(|e| family(e)).all(|e| value <= block::to_u128(*e))
    }

    /// Whether any address of `block` (of the pool whose range is `pool`) may be given.
    pub fn any_in(&self, block: IpNet, pool: IpNet) -> bool {
        let first = block::to_u128(block.network());
        let count = 1u128 << (u32::from(block.max_prefix_len() - block.prefix_len())).min(16);
        (0..count).any(|offset| {
            let ip = match block {
                IpNet::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(u32::try_from(first + offset).unwrap_or(0))),
                IpNet::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(first + offset)),
            };
            self.allows(ip, pool)
        })
    }
}

#[cfg(test)]
mod overlap_tests {
    use super::*;

    #[test]
    fn blocks_of_another_size_overlap() {
        let blocks: std::collections::BTreeSet<IpNet> =
            ["10.0.0.0/29", "10.0.0.16/29", "10.0.1.0/26", "fd00::/120"].iter().map(|b| b.parse().unwrap()).collect();
        let overlaps = |c: &str| overlaps_any(c.parse().unwrap(), &blocks);
        assert!(overlaps("10.0.0.0/29"), "equal");
        assert!(overlaps("10.0.0.0/28"), "contains a smaller block");
        assert!(overlaps("10.0.0.16/28"), "contains one starting at its start");
        assert!(overlaps("10.0.1.32/28"), "inside a larger block");
        assert!(overlaps("10.0.0.0/24"), "contains several");
        assert!(!overlaps("10.0.0.8/29"), "between two");
        assert!(!overlaps("10.0.0.32/27"), "after");
        assert!(!overlaps("10.0.2.0/28"), "past everything");
        assert!(!overlaps("fd00::100/121") && overlaps("fd00::10/124"), "IPv6 too");
        assert!(!overlaps("9.255.255.0/24"), "before everything");
    }
}
