//! What an agent shares with the other nodes of a cluster: its registration (`nodes/<name>`: addresses and
//! labels, kept alive by a lease so that a node that vanished is visible), and the routes to what the other
//! nodes hold: an aggregate route per block affine to another node, via that node's address, and a /32 (or
//! /128) route per address another node borrowed from a block it does not own, so that the block owner's
//! aggregate (or blackhole) does not swallow it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{dataplane::routes::OwnedRoute, ipam::Affinity};

/// A node as registered in the datastore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's name.
    pub name: String,
    /// Where other nodes send traffic for this node's blocks (one per family at most is used).
    pub addresses: Vec<IpAddr>,
    /// Its labels (for pools' nodeSelector).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl NodeRecord {
    /// The node's address of the same family as `net`.
    fn address_for(&self, net: IpNet) -> Option<IpAddr> {
        self.addresses.iter().copied().find(|a| a.is_ipv4() == net.addr().is_ipv4())
    }
}

/// An address a node holds in a block affine to another node (`borrowed/<ip>`), written by the borrowing
/// agent in the same transaction as its endpoint record and removed with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Borrowed {
    /// The address.
    pub ip: IpAddr,
    /// The node whose pod holds it.
    pub node: String,
}

/// The routes node `me` needs to reach what other nodes hold. Blocks and addresses of nodes that are not
/// registered (or have no address of the block's family) get no route: there is nowhere to send them.
pub fn remote_routes(
    me: &str,
    nodes: &BTreeMap<String, NodeRecord>,
    affinities: &[Affinity],
    borrowed: &[Borrowed],
) -> BTreeSet<OwnedRoute> {
    let via = |node: &str, net: IpNet| nodes.get(node).and_then(|n| n.address_for(net));
    let mut routes = BTreeSet::new();
    for affinity in affinities.iter().filter(|a| a.node != me) {
        if let Some(gateway) = via(&affinity.node, affinity.cidr) {
            routes.insert(OwnedRoute::Remote(affinity.cidr, gateway));
        }
    }
    for borrowed in borrowed.iter().filter(|b| b.node != me) {
        let host = IpNet::from(borrowed.ip);
        if let Some(gateway) = via(&borrowed.node, host) {
            routes.insert(OwnedRoute::Remote(host, gateway));
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, address: &str) -> (String, NodeRecord) {
        (
            name.to_string(),
            NodeRecord { name: name.into(), addresses: vec![address.parse().unwrap()], labels: BTreeMap::new() },
        )
    }

    #[test]
    fn other_nodes_blocks_route_via_their_address_and_borrowed_addresses_via_the_borrower() {
        let nodes: BTreeMap<_, _> = [node("a", "10.99.0.1"), node("b", "10.99.0.2"), node("c", "10.99.0.3")].into();
        let block_a: IpNet = "172.16.0.0/29".parse().unwrap();
        let block_b: IpNet = "172.16.0.8/29".parse().unwrap();
        let affinities = vec![
            Affinity { node: "a".into(), cidr: block_a },
            Affinity { node: "b".into(), cidr: block_b },
            // A node that is not registered gets no route.
            Affinity { node: "gone".into(), cidr: "172.16.0.16/29".parse().unwrap() },
        ];
        let borrowed: IpAddr = "172.16.0.1".parse().unwrap();
        let blocks = vec![Borrowed { ip: borrowed, node: "c".into() }];

        let on_b = remote_routes("b", &nodes, &affinities, &blocks);
        assert_eq!(
            on_b,
            [
                OwnedRoute::Remote(block_a, "10.99.0.1".parse().unwrap()),
                OwnedRoute::Remote(IpNet::from(borrowed), "10.99.0.3".parse().unwrap()),
            ]
            .into()
        );
        // The owner routes the borrowed address to the borrower too (over its own blackhole).
        let on_a = remote_routes("a", &nodes, &affinities, &blocks);
        assert!(on_a.contains(&OwnedRoute::Remote(IpNet::from(borrowed), "10.99.0.3".parse().unwrap())));
        assert!(!on_a.iter().any(|r| matches!(r, OwnedRoute::Remote(net, _) if *net == block_a)));
        // The borrower has its own /32 to the pod: no remote route for it.
        let on_c = remote_routes("c", &nodes, &affinities, &blocks);
        assert!(
            !on_c
                .iter()
                .any(|r| matches!(r, OwnedRoute::Remote(net, _) if net.contains(&borrowed) && net.prefix_len() == 32))
        );
        assert!(on_c.contains(&OwnedRoute::Remote(block_a, "10.99.0.1".parse().unwrap())));
    }
}
