//! The VXLAN overlay for pools with `vxlanMode`, for nodes that do not share a layer-2 segment: one device
//! per node ([`DEVICE`], VNI [`VNI`], UDP port [`PORT`], no learning). A remote block's route goes via the
//! remote node's address *on the device* (`onlink`); a permanent neighbour entry maps that address to the
//! remote node's VTEP MAC, and a forwarding entry sends that MAC to the remote node's underlay address.
//! Every node derives every other node's VTEP MAC from its name ([`vtep_mac`]), so no extra record is needed.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use futures::TryStreamExt;
use netlink_packet_route::{
    AddressFamily,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags},
};
use rtnetlink::LinkVxlan;

use super::routes::{RouteError, Routes, netlink};

/// The overlay device's name.
pub const DEVICE: &str = "pw.vxlan";
/// The VXLAN network identifier poolwarden uses.
pub const VNI: u32 = 4097;
/// The UDP port (IANA's VXLAN port).
pub const PORT: u16 = 4789;
/// What the VXLAN header costs on a 1500-byte underlay (outer IPv4 20 + UDP 8 + VXLAN 8 + Ethernet 14).
pub const OVERHEAD: u32 = 50;

/// A node's VTEP MAC: locally administered, unicast, from a stable hash (FNV-1a) of its name.
pub fn vtep_mac(node: &str) -> [u8; 6] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = hash.to_be_bytes();
    [0x0e, b[3], b[4], b[5], b[6], b[7]]
}

/// The node's overlay device.
#[derive(Clone)]
pub struct Overlay {
    routes: Routes,
}

impl Overlay {
    /// Program the overlay over the routes' netlink connection.
    pub fn new(routes: Routes) -> Self {
        Self { routes }
    }

    /// The device's index, creating it (for `node`, sending from `local`) if it does not exist yet.
    pub async fn ensure(&self, node: &str, local: Ipv4Addr) -> Result<u32, RouteError> {
        if let Some(index) = self.routes.ifindex(DEVICE).await? {
            return Ok(index);
        }
        let message = LinkVxlan::new(DEVICE, VNI)
            .local(local)
            .port(PORT)
            .learning(false)
            .address(vtep_mac(node).to_vec())
            .mtu(1500 - OVERHEAD)
            .up()
            .build();
        self.routes.handle.link().add(message).execute().await.map_err(netlink(format!("create {DEVICE}")))?;
        self.routes.ifindex(DEVICE).await?.ok_or_else(|| RouteError::Netlink {
            operation: format!("create {DEVICE}"),
            message: "the device is not there after creating it".into(),
        })
    }

    /// Make exactly `peers` (remote nodes' names and underlay addresses) reachable over the device at
    /// `index`: add their neighbour and forwarding entries, remove those of nodes no longer among them.
    pub async fn set_peers(&self, index: u32, peers: &BTreeSet<(String, Ipv4Addr)>) -> Result<(), RouteError> {
        let macs: BTreeSet<Vec<u8>> = peers.iter().map(|(node, _)| vtep_mac(node).to_vec()).collect();
        let addresses: BTreeSet<Ipv4Addr> = peers.iter().map(|(_, ip)| *ip).collect();
        for family in [AddressFamily::Inet, AddressFamily::Bridge] {
            let mut entries = self.routes.handle.neighbours().get().set_address_family(family).execute();
            let mut stale = Vec::new();
            while let Some(entry) = entries.try_next().await.map_err(netlink("list overlay entries"))? {
                if entry.header.ifindex != index {
                    continue;
                }
                let known = entry.attributes.iter().any(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) if family == AddressFamily::Inet => {
                        addresses.contains(ip)
                    }
                    NeighbourAttribute::LinkLayerAddress(mac) if family == AddressFamily::Bridge => macs.contains(mac),
                    _ => false,
                });
                if !known {
                    stale.push(entry);
                }
            }
            for entry in stale {
                self.routes
                    .handle
                    .neighbours()
                    .del(entry)
                    .execute()
                    .await
                    .map_err(netlink("remove a stale overlay entry"))?;
            }
        }
        for (node, ip) in peers {
            self.add_peer(index, node, *ip).await?;
        }
        Ok(())
    }

    /// Make `peer` (a remote node's underlay address and name) reachable over the device at `index`.
    async fn add_peer(&self, index: u32, peer_node: &str, peer: Ipv4Addr) -> Result<(), RouteError> {
        let mac = vtep_mac(peer_node);
        let neighbours = self.routes.handle.neighbours();
        neighbours
            .add(index, IpAddr::V4(peer))
            .link_layer_address(&mac)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("add overlay neighbour {peer} for node {peer_node}")))?;
        neighbours
            .add_bridge(index, &mac)
            .destination(IpAddr::V4(peer))
            .flags(NeighbourFlags::Own)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("add overlay forwarding entry to {peer} for node {peer_node}")))
    }

    /// Remove the device (and with it every neighbour and forwarding entry on it).
    pub async fn remove(&self) -> Result<(), RouteError> {
        let Some(index) = self.routes.ifindex(DEVICE).await? else { return Ok(()) };
        self.routes.handle.link().del(index).execute().await.map_err(netlink(format!("delete {DEVICE}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_macs_are_stable_unicast_locally_administered_and_distinct() {
        let a = vtep_mac("node-0");
        assert_eq!(a, vtep_mac("node-0"));
        assert_ne!(a, vtep_mac("node-1"));
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
    }
}
