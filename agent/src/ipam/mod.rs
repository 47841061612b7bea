//! Pure IPAM: pools, blocks, affinities, handles, pool selection and consistency checks.
//!
//! Nothing here does I/O or knows about the datastore: functions take values and return values, and the
//! allocator turns their decisions into datastore transactions.

pub mod block;
pub mod check;
pub mod gc;
pub mod mismatch;
pub mod selection;

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use block::{Allocation, Block, BlockError, Owner};
pub use selection::{NamespaceInfo, NodeInfo, PodInfo, Requested, Selection, SelectionError};

use crate::resources::IpPool;

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
pub fn block_containing(pool: &IpPool, ip: std::net::IpAddr) -> Option<IpNet> {
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
    subnets.into_iter().flatten().filter(move |b| !claimed.contains(b))
}
