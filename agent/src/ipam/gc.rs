//! Which addresses and affinities have leaked: pure decisions for the agents' garbage collector and for
//! `ipam check`. An address leaks when the attachment that holds it is gone: its node is no longer
//! registered, or, on the node looking, no endpoint was ever wired for it or the endpoint's container is
//! gone. An affinity leaks when its node is no longer registered.
//!
//! Deciding is not releasing: the collector releases only what has looked leaked for a whole grace period,
//! decides again just before, and releases each address only at the block sequence number it saw, so an
//! address freed and handed to a new pod in between is never taken from it (Calico's issue #5044).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

use super::{Affinity, Block};

/// An address that looks leaked.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Leak {
    /// The address.
    pub ip: IpAddr,
    /// The block sequence number of the allocation seen: release only this allocation.
    pub sequence: u64,
    /// The handle that holds it.
    pub handle: String,
    /// The node it was assigned on.
    pub node: String,
    /// Why it looks leaked, for logs and `ipam check`.
    pub reason: String,
}

/// What the node looking knows of its own attachments: every endpoint it recorded (by handle), and
/// whether that endpoint's container still exists.
pub type LocalEndpoints = BTreeMap<String, bool>;

/// The addresses that look leaked from node `me`'s point of view: those of nodes not in `registered`, and
/// those of `me` whose handle has no live endpoint in `local`.
pub fn leaked_addresses(
    blocks: &[Block],
    me: &str,
    registered: &BTreeSet<String>,
    local: &LocalEndpoints,
) -> Vec<Leak> {
    let mut leaks = Vec::new();
    for block in blocks {
        for (ip, allocation) in block.allocated() {
            let reason = if allocation.node == me {
                match local.get(&allocation.handle) {
                    None => "no endpoint was wired for it on its node".to_string(),
                    Some(false) => "its container is gone".to_string(),
                    Some(true) => continue,
                }
            } else if !registered.contains(&allocation.node) {
                format!("its node {} is not registered any more", allocation.node)
            } else {
                continue;
            };
            leaks.push(Leak {
                ip,
                sequence: allocation.sequence,
                handle: allocation.handle.clone(),
                node: allocation.node.clone(),
                reason,
            });
        }
    }
    leaks
}

/// The affinities whose node is not registered any more.
pub fn orphaned_affinities(affinities: &[Affinity], registered: &BTreeSet<String>) -> Vec<Affinity> {
    affinities.iter().filter(|a| !registered.contains(&a.node)).cloned().collect()
}

/// Blocks that no node owns and that hold nothing (what is left when a gone node's affinity was released
/// while another node still borrowed from the block): they go back to their pool once their released
/// addresses have cooled down (the allocator checks that, at the block's version).
pub fn unowned_empty_blocks(blocks: &[Block]) -> Vec<IpNet> {
    blocks.iter().filter(|b| b.affinity.is_none() && b.is_empty()).map(|b| b.cidr).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::Owner;

    fn owner(node: &str, handle: &str) -> Owner {
        Owner { handle: handle.into(), node: node.into(), ..Owner::default() }
    }

    #[test]
    fn leaks_are_addresses_of_gone_nodes_and_of_local_attachments_without_a_live_endpoint() {
        let mut block = Block::new("10.0.0.0/29".parse().unwrap(), "p", "a", 0);
        let wired = block.assign_next(&owner("a", "wired"), 0, 0).unwrap();
        let gone_container = block.assign_next(&owner("a", "gone"), 0, 0).unwrap();
        let never_wired = block.assign_next(&owner("a", "unwired"), 0, 0).unwrap();
        let on_live_node = block.assign_next(&owner("b", "b1"), 0, 0).unwrap();
        let on_gone_node = block.assign_next(&owner("c", "c1"), 0, 0).unwrap();
        let registered: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let local: LocalEndpoints = [("wired".to_string(), true), ("gone".to_string(), false)].into();

        let leaks = leaked_addresses(std::slice::from_ref(&block), "a", &registered, &local);
        let ips: Vec<IpAddr> = leaks.iter().map(|l| l.ip).collect();
        assert_eq!(ips, vec![gone_container, never_wired, on_gone_node]);
        assert!(!ips.contains(&wired) && !ips.contains(&on_live_node));
        assert_eq!(leaks[2].reason, "its node c is not registered any more");
        assert_eq!(leaks[0].sequence, block.allocation(gone_container).unwrap().sequence);

        // From b's point of view only the gone node's address leaked: a's attachments are a's to judge.
        let from_b = leaked_addresses(std::slice::from_ref(&block), "b", &registered, &[("b1".into(), true)].into());
        assert_eq!(from_b.iter().map(|l| l.ip).collect::<Vec<_>>(), vec![on_gone_node]);
    }

    #[test]
    fn affinities_of_unregistered_nodes_and_unowned_empty_blocks() {
        let registered: BTreeSet<String> = ["a".to_string()].into();
        let a = Affinity { node: "a".into(), cidr: "10.0.0.0/29".parse().unwrap() };
        let c = Affinity { node: "c".into(), cidr: "10.0.0.8/29".parse().unwrap() };
        assert_eq!(orphaned_affinities(&[a, c.clone()], &registered), vec![c]);

        let mut unowned = Block::new("10.0.0.16/29".parse().unwrap(), "p", "x", 0);
        unowned.affinity = None;
        let mut still_used = unowned.clone();
        still_used.cidr = "10.0.0.24/29".parse().unwrap();
        still_used.assign_next(&owner("a", "h"), 0, 0).unwrap();
        let owned = Block::new("10.0.0.32/29".parse().unwrap(), "p", "a", 0);
        assert_eq!(unowned_empty_blocks(&[unowned.clone(), still_used, owned]), vec![unowned.cidr]);
    }
}
