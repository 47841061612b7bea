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

use crate::{
    catalog::decode,
    ipam::Affinity,
    resources::{EncapMode, IpPool},
    store::{Store, StoreError, keys},
};

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

/// Every node registered in `store`, by name.
pub async fn registered(store: &dyn Store) -> Result<BTreeMap<String, NodeRecord>, StoreError> {
    let (kvs, _) = store.list(keys::NODES).await?;
    kvs.iter().map(|kv| decode::<NodeRecord>(&kv.key, &kv.value).map(|n| (n.name.clone(), n))).collect()
}

/// Every node other nodes should route to: those registered, and those whose agent is down but that were
/// not decommissioned (by their last known addresses). A node's blocks are routed to it while its agent
/// restarts or is down, not only while its lease lives.
pub async fn routable(store: &dyn Store) -> Result<BTreeMap<String, NodeRecord>, StoreError> {
    let registered = registered(store).await?.into_values();
    let gone = decommissioned(store).await?;
    let (kvs, _) = store.list(keys::NODE_ADDRESSES).await?;
    let known: Vec<NodeRecord> = kvs.iter().map(|kv| decode(&kv.key, &kv.value)).collect::<Result<_, _>>()?;
    Ok(routable_of(registered, known, &gone))
}

/// [`routable`] from what it reads: the registered nodes first, then the others known by their last
/// addresses unless decommissioned.
pub fn routable_of(
    registered: impl IntoIterator<Item = NodeRecord>,
    known: impl IntoIterator<Item = NodeRecord>,
    decommissioned: &BTreeSet<String>,
) -> BTreeMap<String, NodeRecord> {
    let mut nodes: BTreeMap<String, NodeRecord> = registered.into_iter().map(|n| (n.name.clone(), n)).collect();
    for record in known.into_iter().filter(|r| !decommissioned.contains(&r.name)) {
        nodes.entry(record.name.clone()).or_insert(record);
    }
    nodes
}

/// The nodes an operator decommissioned.
pub async fn decommissioned(store: &dyn Store) -> Result<BTreeSet<String>, StoreError> {
    let (kvs, _) = store.list(keys::DECOMMISSIONED).await?;
    Ok(kvs.iter().filter_map(|kv| kv.key.strip_prefix(keys::DECOMMISSIONED).map(str::to_string)).collect())
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

/// A route to something another node holds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteRoute {
    /// The block, or the borrowed address.
    pub destination: IpNet,
    /// The node that holds it.
    pub node: String,
    /// That node's address.
    pub via: IpAddr,
    /// Through the VXLAN overlay (the pool's `vxlanMode` asks for it toward this node).
    pub overlay: bool,
}

/// The routes node `me` needs to reach what other nodes hold. Blocks and addresses of nodes that are not
/// registered (or have no address of the destination's family) get no route: there is nowhere to send them.
/// A destination goes through the overlay when its pool's `vxlanMode` is `Always`, or `CrossSubnet` and the
/// other node's address is in none of `local_subnets` (this node's own subnets).
pub fn remote_routes(
    me: &str,
    nodes: &BTreeMap<String, NodeRecord>,
    affinities: &[Affinity],
    borrowed: &[Borrowed],
    pools: &[IpPool],
    local_subnets: &[IpNet],
) -> BTreeSet<RemoteRoute> {
    let route = |node: &str, destination: IpNet| {
        let via = nodes.get(node).and_then(|n| n.address_for(destination))?;
        let mode = pools.iter().find(|p| p.cidr().contains(&destination.addr())).map(|p| p.spec.vxlan_mode);
        // The overlay's tunnels run over IPv4 between the nodes.
        let overlay = via.is_ipv4()
            && match mode {
                Some(EncapMode::Always) => true,
                Some(EncapMode::CrossSubnet) => !local_subnets.iter().any(|s| s.contains(&via)),
                Some(EncapMode::Never) | None => false,
            };
        Some(RemoteRoute { destination, node: node.to_string(), via, overlay })
    };
    let blocks = affinities.iter().filter(|a| a.node != me).filter_map(|a| route(&a.node, a.cidr));
    let hosts = borrowed.iter().filter(|b| b.node != me).filter_map(|b| route(&b.node, IpNet::from(b.ip)));
    blocks.chain(hosts).collect()
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

        let routes = |me: &str| -> BTreeSet<(IpNet, IpAddr)> {
            remote_routes(me, &nodes, &affinities, &blocks, &[], &[])
                .into_iter()
                .map(|r| (r.destination, r.via))
                .collect()
        };
        let on_b = routes("b");
        assert_eq!(
            on_b,
            [(block_a, "10.99.0.1".parse().unwrap()), (IpNet::from(borrowed), "10.99.0.3".parse().unwrap())].into()
        );
        // The owner routes the borrowed address to the borrower too (over its own blackhole).
        let on_a = routes("a");
        assert!(on_a.contains(&(IpNet::from(borrowed), "10.99.0.3".parse().unwrap())));
        assert!(!on_a.iter().any(|(net, _)| *net == block_a));
        // The borrower has its own /32 to the pod: no remote route for it.
        let on_c = routes("c");
        assert!(!on_c.iter().any(|(net, _)| net.contains(&borrowed) && net.prefix_len() == 32));
        assert!(on_c.contains(&(block_a, "10.99.0.1".parse().unwrap())));
    }

    #[test]
    fn vxlan_mode_decides_the_overlay_per_pool_and_peer_subnet() {
        let pool = |name: &str, cidr: &str, mode: &str| {
            let yaml = format!(
                "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {{cidr: {cidr}, vxlanMode: {mode}}}\n"
            );
            match &crate::resources::parse_documents("p.yaml", &yaml).unwrap()[0].resource {
                crate::resources::Resource::IpPool(p) => p.clone(),
                other => panic!("not a pool: {other:?}"),
            }
        };
        let pools = vec![
            pool("always", "10.1.0.0/16", "Always"),
            pool("cross", "10.2.0.0/16", "CrossSubnet"),
            pool("never", "10.3.0.0/16", "Never"),
        ];
        let nodes: BTreeMap<_, _> =
            [node("a", "10.99.1.1"), node("near", "10.99.1.2"), node("far", "10.99.2.1")].into();
        let affinities: Vec<Affinity> =
            [("near", "10.1.0.0/26"), ("near", "10.2.0.0/26"), ("far", "10.2.0.64/26"), ("far", "10.3.0.0/26")]
                .iter()
                .map(|(n, c)| Affinity { node: n.to_string(), cidr: c.parse().unwrap() })
                .collect();
        let local: Vec<IpNet> = vec!["10.99.1.1/24".parse().unwrap()];
        let overlay: BTreeMap<String, bool> = remote_routes("a", &nodes, &affinities, &[], &pools, &local)
            .into_iter()
            .map(|r| (r.destination.to_string(), r.overlay))
            .collect();
        assert_eq!(
            overlay,
            [
                ("10.1.0.0/26".to_string(), true),  // Always, even on the same subnet
                ("10.2.0.0/26".to_string(), false), // CrossSubnet, same subnet
                ("10.2.0.64/26".to_string(), true), // CrossSubnet, another subnet
                ("10.3.0.0/26".to_string(), false), // Never
            ]
            .into()
        );
    }
}
