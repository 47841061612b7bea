//! Node reconciliation: the node's routes, blackholes, overlay, NAT table, forwarding and enforcement
//! entries made to match the datastore, after a change and every [`super::MAINTENANCE_INTERVAL`], and empty
//! blocks given back. Fails with a [`ReconcileError`], which the task running it logs; it answers no request.

use std::{collections::BTreeSet, net::IpAddr};

use tracing::{info, warn};

use super::{Agent, PoolRef, membership, wiring::WiringError};
use crate::{
    allocator::AllocError,
    cluster,
    dataplane::{
        enforcement::EnforcementError,
        routes::{OwnedRoute, RouteError},
    },
    store::StoreError,
};

/// Why a reconcile (or maintenance) failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The datastore failed.
    #[error("the datastore failed: {0}")]
    Store(#[from] StoreError),
    /// Programming the node's routes, links or overlay failed.
    #[error("programming the node's routes failed: {0}")]
    Routes(#[from] RouteError),
    /// An endpoint's enforcement could not be put back.
    #[error(transparent)]
    Endpoint(#[from] WiringError),
    /// The enforcement maps could not be read or written.
    #[error("{operation} failed: {source}")]
    Enforcement {
        /// What was being done.
        operation: &'static str,
        /// Why it failed.
        source: EnforcementError,
    },
    /// A pool's `vxlanMode` needs the overlay and the node has no IPv4 address to tunnel from.
    #[error(
        "a pool's vxlanMode needs the overlay, but this node has no IPv4 address to tunnel from (give --node-address)"
    )]
    NoTunnelAddress,
    /// Giving back empty blocks failed.
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

impl Agent {
    /// Make the node's routes match the store: a blackhole per block affine to this node, a route per local
    /// endpoint, nothing else with our protocol. Endpoints whose host interface is gone are reported.
    pub async fn reconcile(&self) -> Result<(usize, usize), ReconcileError> {
        let _alone = self.wiring.write().await;
        let mut desired = BTreeSet::new();
        let endpoints = self.endpoints().await?;
        let stored: Vec<crate::resources::IpPool> = self.pools().await?;
        let pools: Vec<PoolRef> = stored.iter().map(PoolRef::of).collect();
        let labels = self.directory.node(&self.node).await.map_or_else(|_| self.node.labels.clone(), |n| n.labels);
        match crate::dataplane::ensure_forwarding(&stored, &labels) {
            Ok(changed) if !changed.is_empty() => info!(sysctls = ?changed, "forwarding turned on for the pools"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "turning forwarding on failed: pods cannot reach other nodes"),
        }
        match self.nat.apply(&stored) {
            Ok(true) => info!(table = crate::dataplane::nat::TABLE, "NAT outgoing follows the pools"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "programming NAT outgoing failed"),
        }
        let ipam_only: Vec<IpAddr> =
            endpoints.iter().filter(|e| e.host_ifname.is_empty()).flat_map(|e| e.ips.clone()).collect();
        let owned = self.owned_blocks().await?;
        for cidr in owned.iter().map(|s| s.block.cidr) {
            // Blocks serving IPAM-only endpoints get no blackhole: see `wire`.
            if !ipam_only.iter().any(|ip| cidr.contains(ip)) {
                desired.insert(OwnedRoute::Blackhole(cidr));
            }
        }
        let mut enforced = BTreeSet::new();
        for endpoint in endpoints {
            if !endpoint.bridge_port.is_empty() {
                // IPAM-only, enforced on its bridge port: no route of ours.
                if let Some(port) = self.routes.ifindex(&endpoint.bridge_port).await? {
                    self.enforce_endpoint(&endpoint, port, &pools)?;
                    enforced.insert(port);
                }
                continue;
            }
            if endpoint.host_ifname.is_empty() {
                continue;
            }
            match self.routes.ifindex(&endpoint.host_ifname).await? {
                Some(ifindex) => {
                    desired.extend(endpoint.ips.iter().map(|ip| OwnedRoute::Endpoint(*ip, ifindex)));
                    self.enforce_endpoint(&endpoint, ifindex, &pools)?;
                    enforced.insert(ifindex);
                }
                None => warn!(
                    container = %endpoint.container_id, ifname = %endpoint.ifname, host_ifname = %endpoint.host_ifname,
                    addresses = ?endpoint.ips,
                    "endpoint's interface is gone: its container no longer exists; a CNI GC or DEL releases it"
                ),
            }
        }
        // Which interfaces exist (a TCX pin of one that does not holds a dead link); unknown when the dump
        // fails, and then no pin is touched.
        let interfaces = self.routes.link_indexes().await.ok();
        // Whatever decapsulates on this node now (ours, or another CNI's or the operator's devices). A failed
        // scan leaves the ports already closed as they are and the rest of the reconcile goes on.
        let ports = self.routes.decap_ports().await.unwrap_or_else(|e| {
            warn!(error = %e, "listing the node's VXLAN and GENEVE devices failed; their ports stay as they were");
            Default::default()
        });
        // Pinned links and entries of interfaces the datastore no longer knows go (a DEL lost with the agent).
        if let Some(enforcement) = &self.enforcement {
            let mut enforcement = enforcement.lock().unwrap_or_else(|p| p.into_inner());
            let entered = enforcement
                .entered()
                .map_err(|source| ReconcileError::Enforcement { operation: "reading enforcement entries", source })?;
            // An interface whose program could not be replaced may still hang on an older build's pinned link:
            // those pins stay until a pass replaces every program.
            let mut unreplaced = false;
            for stale in entered.into_iter().filter(|i| !enforced.contains(i)) {
                // An interface that still exists keeps its entry: a pod may be behind it whose record this
                // store lost (a restore, a collection by mistake), and cutting it off fixes nothing. Only the
                // entries of interfaces that are gone go (with an unknown interface list, none do).
                if interfaces.as_ref().is_none_or(|existing| existing.contains(&stale)) {
                    warn!(ifindex = stale, "an enforced interface has no endpoint record; its entry stays");
                    // It runs this build's program too (wherever ours is attached), which reads this agent's
                    // closed ports: an earlier agent's program keeps a copy of its own.
                    if let Err(e) = enforcement.adopt_unrecorded(stale) {
                        warn!(ifindex = stale, error = %e, "replacing the program on an unrecorded interface failed");
                        unreplaced = true;
                    }
                    continue;
                }
                info!(ifindex = stale, "removing the enforcement entry of an interface that is gone");
                enforcement.release(stale).map_err(|source| ReconcileError::Enforcement {
                    operation: "removing stale enforcement",
                    source,
                })?;
            }
            enforcement
                .block_decap_ports(ports)
                .map_err(|source| ReconcileError::Enforcement { operation: "blocking decapsulating ports", source })?;
            if let Some(interfaces) = &interfaces {
                enforcement.remove_defunct_tcx_pins(interfaces);
            }
            // Every endpoint's link has moved over to this build by now; what older builds pinned can go.
            if unreplaced {
                warn!("keeping older builds' pinned objects until every enforced interface runs this build's program");
            } else if let Err(e) = enforcement.remove_older_versions(interfaces.as_ref()) {
                warn!(error = %e, "removing an older build's pinned objects failed");
            }
        }
        desired.extend(self.remote_routes(&stored).await?);
        let (added, removed) = self.routes.reconcile(&desired).await?;
        self.metrics.set_blocks_owned(owned.len());
        Ok((added, removed))
    }

    /// The routes to the blocks and borrowed addresses other registered nodes hold, with the overlay device
    /// made (and its peers entered) when a pool's `vxlanMode` needs it, and removed when none does.
    async fn remote_routes(&self, pools: &[crate::resources::IpPool]) -> Result<BTreeSet<OwnedRoute>, ReconcileError> {
        // Followed by watches (see `Membership`): a reconcile at rest reads nothing of the other nodes.
        let routing = self.membership.routing().await?;
        let membership::Routing { nodes, affinities, borrowed } = routing;
        let overlay = crate::dataplane::overlay::Overlay::new(self.routes.clone());
        if nodes.keys().all(|name| *name == self.node.name) {
            overlay.remove().await?;
            return Ok(BTreeSet::new());
        }
        let subnets = self.routes.global_addresses().await?;
        let wanted = cluster::remote_routes(&self.node.name, &nodes, &affinities, &borrowed, pools, &subnets);

        let overlay_index = if wanted.iter().any(|r| r.overlay) {
            let local = nodes
                .get(&self.node.name)
                .and_then(|n| n.addresses.iter().find_map(|a| if let IpAddr::V4(v4) = a { Some(*v4) } else { None }))
                .ok_or(ReconcileError::NoTunnelAddress)?;
            let index = overlay.ensure(&self.node.name, local).await?;
            let peers: BTreeSet<(String, std::net::Ipv4Addr)> = wanted
                .iter()
                .filter(|r| r.overlay)
                .filter_map(|r| match r.via {
                    IpAddr::V4(via) => Some((r.node.clone(), via)),
                    IpAddr::V6(_) => None,
                })
                .collect();
            overlay.set_peers(index, &peers).await?;
            Some(index)
        } else {
            overlay.remove().await?;
            None
        };
        Ok(wanted
            .into_iter()
            .map(|r| match overlay_index {
                Some(index) if r.overlay => OwnedRoute::Overlay(r.destination, r.via, index),
                _ => OwnedRoute::Remote(r.destination, r.via),
            })
            .collect())
    }

    /// Give back empty blocks past their grace period, then reconcile (their blackholes go with them).
    pub async fn maintain(&self) -> Result<(), ReconcileError> {
        let config = self.blocks.load().await?.config;
        let released = self.blocks.release_empty_blocks(&self.node.name, &config).await?;
        for block in &released {
            info!(%block, "released empty block");
        }
        self.reconcile().await.map(|_| ())
    }
}
