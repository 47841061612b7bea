//! Garbage collection on a node: what looks leaked (this node's attachments whose container or pod is gone,
//! the addresses and blocks of nodes that are gone), held for its grace period, decided again, and released.
//! A pass reads what concerns this node; see [`Agent::collect_garbage`].

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use poolwarden_protocol::DelRequest;
use tracing::{debug, info, warn};

use ipnet::IpNet;

use super::{Agent, Endpoint, MAINTENANCE_INTERVAL, wiring::WiringError};
use crate::{
    allocator::AllocError,
    dataplane::routes::RouteError,
    ipam,
    store::{StoreError, Txn, keys},
};

/// Why a collection pass stopped (what it could not decide for one address or attachment is logged and
/// left to the next pass instead).
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The datastore failed.
    #[error("the datastore failed: {0}")]
    Store(#[from] StoreError),
    /// Reading or releasing allocations failed.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// Looking at the node's interfaces failed.
    #[error("reading the node's interfaces failed: {0}")]
    Routes(#[from] RouteError),
    /// Collecting one of this node's attachments as its DEL would failed.
    #[error("collecting an attachment failed: {0}")]
    Attachment(#[from] WiringError),
}

/// What identifies one allocation the collector suspects: the address, the block sequence number and the
/// handle (a block given back and claimed again starts its sequence over).
fn leak_key(leak: &ipam::gc::Leak) -> String {
    format!("{}#{}#{}", leak.ip, leak.sequence, leak.handle)
}

/// What identifies a suspected affinity of a gone node.
fn orphan_key(affinity: &ipam::Affinity) -> String {
    format!("{}@{}", affinity.cidr, affinity.node)
}

/// What identifies a decommissioned node that holds nothing any more.
fn forget_key(node: &str) -> String {
    format!("forget@{node}")
}

impl Agent {
    /// How often the collector looks for leaks: often enough to release them soon after their grace period.
    pub fn gc_interval(&self) -> Duration {
        (self.lifetimes.leak_grace / 3).clamp(Duration::from_millis(500), MAINTENANCE_INTERVAL)
    }

    /// Whether this node has an endpoint for `handle` whose container is still there by the kernel's
    /// account (recorded, and its interface or netns still there); the API server is not asked.
    async fn endpoint_alive(&self, handle: &str) -> Result<bool, CollectError> {
        let Some(endpoint) = self.endpoint(handle).await? else { return Ok(false) };
        self.endpoint_there(&endpoint).await
    }

    /// Whether an endpoint's container is still there by the kernel's account: its host interface, or
    /// (IPAM-only) its netns.
    async fn endpoint_there(&self, endpoint: &Endpoint) -> Result<bool, CollectError> {
        if endpoint.host_ifname.is_empty() {
            Ok(endpoint.netns.is_empty() || std::path::Path::new(&endpoint.netns).exists())
        } else {
            Ok(self.routes.ifindex(&endpoint.host_ifname).await?.is_some())
        }
    }

    /// Whether the API server says an endpoint's pod (by UID) is gone, in Kubernetes mode. A pod deleted from
    /// the API while its container lives on (force-deleted while this agent or the kubelet was down) is
    /// collected as its DEL would be, its host interface with its address, so the address is never routed to
    /// two pods. Only for endpoints with a host interface of ours: in IPAM-only mode the main plugin owns the
    /// pod's interface, which would keep the address while another pod got it, so there only a gone netns
    /// counts. Unknown (no UID, the API server not answering) is not gone.
    async fn pod_gone(&self, endpoint: &Endpoint) -> bool {
        if endpoint.host_ifname.is_empty() || endpoint.pod_uid.is_empty() || endpoint.pod.is_empty() {
            return false;
        }
        match self.directory.pod_gone(&endpoint.namespace, &endpoint.pod, &endpoint.pod_uid).await {
            Ok(gone) => gone,
            Err(e) => {
                debug!(error = %e, pod = %endpoint.pod, namespace = %endpoint.namespace, "cannot tell whether a pod exists");
                false
            }
        }
    }

    /// Release what has looked leaked for the whole grace period: addresses of gone nodes and of this
    /// node's attachments whose container is gone (or that were never wired), then the affinities of gone
    /// nodes and the blocks nobody owns any more. Returns how many addresses and blocks were released.
    ///
    /// A pass reads what concerns this node (its endpoints, its blocks, the blocks its pods' addresses are
    /// in), not the cluster: the registered nodes come from [`Membership`]'s watches, and another node's
    /// blocks and borrowed addresses are read only while that node is unregistered.
    pub async fn collect_garbage(&self) -> Result<(usize, usize), CollectError> {
        let nodes = self.membership.nodes().await?;
        let registered = &nodes.registered;
        let unregistered = nodes.unregistered(&self.node.name);
        let endpoints = self.endpoints().await?;
        // This node's blocks and those it borrowed from (its view), and those of the unregistered nodes (read).
        let (owned, borrowed) = self.blocks.node_blocks(&self.node.name).await?;
        let mut read: BTreeMap<IpNet, ipam::Block> =
            owned.into_iter().chain(borrowed).map(|s| (s.block.cidr, s.block)).collect();
        for node in &unregistered {
            let (owned, borrowed) = self.blocks.node_blocks_now(node).await?;
            read.extend(owned.into_iter().chain(borrowed).map(|s| (s.block.cidr, s.block)));
        }
        let read: Vec<ipam::Block> = read.into_values().collect();
        let mut whose = unregistered.clone();
        whose.insert(self.node.name.clone());
        let affinities: Vec<ipam::Affinity> = read
            .iter()
            .filter_map(|b| Some(ipam::Affinity { node: b.affinity.clone()?, cidr: b.cidr }))
            .filter(|a| whose.contains(&a.node))
            .collect();
        let mut local = ipam::gc::LocalEndpoints::new();
        // Handles whose pod the API server says is gone (asked here, not while ADDs are held off below).
        let mut pods_gone = BTreeSet::new();
        for endpoint in endpoints {
            let handle = ipam::handle_for(&endpoint.container_id, &endpoint.ifname);
            let there = match self.endpoint_there(&endpoint).await {
                Ok(there) => there,
                Err(e) => {
                    warn!(error = %e, %handle, "cannot tell whether an endpoint's interface exists");
                    true
                }
            };
            let gone = there && self.pod_gone(&endpoint).await;
            if gone {
                pods_gone.insert(handle.clone());
            }
            local.insert(handle, there && !gone);
        }
        let leaks = ipam::gc::leaked_addresses(&read, &self.node.name, registered, &local);
        // A node never judges its own blocks orphaned (its registration may lapse while it cannot reach
        // the store; it is running).
        let others: Vec<ipam::Affinity> = affinities.into_iter().filter(|a| a.node != self.node.name).collect();
        let orphans = ipam::gc::orphaned_affinities(&others, registered);

        // Only what looked leaked last time too, for the whole grace period, is released now. Another node's
        // addresses and blocks look leaked when its agent is not registered, which an agent down for a while
        // (a crash loop, an upgrade, a lost datastore) looks like too: unless the node was decommissioned,
        // they wait for --node-gone-after.
        let mut gone = nodes.decommissioned.clone();
        // In Kubernetes mode the API server says which nodes are gone: a node whose Node object was deleted
        // is decommissioned; one whose object exists is never collected, however long its agent is away.
        let kubernetes = self.directory.source() == crate::directory::Source::Kubernetes;
        if kubernetes {
            let unregistered: BTreeSet<&String> = leaks
                .iter()
                .map(|l| &l.node)
                .chain(orphans.iter().map(|a| &a.node))
                .filter(|n| **n != self.node.name && !gone.contains(*n))
                .collect();
            for node in unregistered {
                match self.directory.node_deleted(node).await {
                    Ok(true) => {
                        gone.insert(node.clone());
                    }
                    Ok(false) => {}
                    Err(e) => debug!(error = %e, %node, "cannot tell whether a node exists"),
                }
            }
        }
        let grace_for = |node: &str| {
            if node == self.node.name || gone.contains(node) {
                self.lifetimes.leak_grace
            } else if kubernetes {
                Duration::MAX
            } else {
                self.lifetimes.leak_grace.max(self.lifetimes.node_gone_after)
            }
        };
        // Decommissioned nodes this pass found nothing of (see the end of the pass).
        let forgettable: Vec<&String> = nodes
            .decommissioned
            .iter()
            .filter(|n| **n != self.node.name && !registered.contains(*n))
            .filter(|n| !others.iter().any(|a| &a.node == *n) && !leaks.iter().any(|l| &l.node == *n))
            .collect();
        let now = Instant::now();
        let due: BTreeSet<String> = {
            let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
            let current: BTreeMap<String, Duration> = leaks
                .iter()
                .map(|l| (leak_key(l), grace_for(&l.node)))
                .chain(orphans.iter().map(|a| (orphan_key(a), grace_for(&a.node))))
                .chain(forgettable.iter().map(|n| (forget_key(n), self.lifetimes.leak_grace * 2)))
                .collect();
            // A suspect whose grace changed (its node was just decommissioned, or its Node object deleted)
            // starts its grace period over: the time it waited under the other rule does not count.
            suspects.retain(|k, (_, grace)| current.get(k) == Some(grace));
            for (key, grace) in &current {
                suspects.entry(key.clone()).or_insert((now, *grace));
            }
            suspects
                .iter()
                .filter(|(_, (since, grace))| now.duration_since(*since) >= *grace)
                .map(|(k, _)| k.clone())
                .collect()
        };
        let mut released = 0;
        // Leaked addresses no longer held after this pass (released now, or by someone else meanwhile).
        let mut cleared = BTreeSet::new();
        for leak in leaks.iter().filter(|l| due.contains(&leak_key(l))) {
            // No ADD runs on this node while one of its addresses is released: one that allocated it, or
            // was handed it again by a repeated ADD, has wired it by now, and then it is no leak.
            let _alone = if leak.node == self.node.name { Some(self.adds.write().await) } else { None };
            if leak.node == self.node.name {
                // Decided again now that no ADD runs (by the kernel's account; the API server's answer was
                // had before the lock): an ADD may have wired it meanwhile.
                match self.endpoint_alive(&leak.handle).await {
                    Ok(true) if !pods_gone.contains(&leak.handle) => continue,
                    Ok(_) => {}
                    Err(e) => {
                        warn!(error = %e, handle = %leak.handle, "cannot tell whether a leak is still one; next pass");
                        continue;
                    }
                }
                // A recorded attachment goes as its DEL would take it: the interface, route and enforcement
                // with the address (its pod may be gone from the API while its container still runs).
                match self.collect_attachment(&leak.handle).await {
                    Ok(Some(freed)) => {
                        released += freed;
                        cleared.insert(leak.ip);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(error = %e, handle = %leak.handle, "collecting a leaked attachment failed; next pass");
                        continue;
                    }
                }
            }
            match self.blocks.release_ip(leak.ip, Some((leak.sequence, &leak.handle))).await {
                Ok(Some(_)) => {
                    released += 1;
                    cleared.insert(leak.ip);
                    warn!(address = %leak.ip, handle = %leak.handle, node = %leak.node, reason = %leak.reason, "released a leaked address");
                }
                // Released or reassigned since it was seen: nothing of ours to take.
                Ok(None) | Err(AllocError::Reassigned { .. }) => {
                    cleared.insert(leak.ip);
                }
                // One address that cannot be released now does not hold up the others: the next pass
                // decides again.
                Err(e) => warn!(address = %leak.ip, error = %e, "releasing a leaked address failed; retried next pass"),
            }
        }
        let mut blocks = 0;
        for affinity in orphans.iter().filter(|a| due.contains(&orphan_key(a))) {
            // A block that still holds an address its node leaked keeps its affinity until that address is
            // released: given up now, the block would belong to nobody, and nothing would read it again to
            // find the address.
            let holding = |l: &&ipam::gc::Leak| l.node == affinity.node && affinity.cidr.contains(&l.ip);
            if leaks.iter().filter(holding).any(|l| !cleared.contains(&l.ip)) {
                debug!(block = %affinity.cidr, node = %affinity.node, "a gone node's block keeps its affinity until its addresses are released");
                continue;
            }
            if self.blocks.release_claim(affinity.cidr, &affinity.node).await? {
                blocks += 1;
                warn!(block = %affinity.cidr, node = %affinity.node, "released the block of a node that is gone");
            }
        }
        // A block nobody owns goes back once it is empty and its released addresses have cooled down (until
        // then a claim may adopt it): one selected list, made only when the followed blocks include an empty
        // one (a gone node's block holding a live node's addresses stays as it is, and is not listed for).
        if self.membership.any_unowned_empty_block() != Some(false) {
            let config = self.blocks.load().await?.config;
            for cidr in self.blocks.release_unowned_blocks(&config).await? {
                blocks += 1;
                info!(block = %cidr, "gave a block nobody owns back to its pool");
            }
        }
        // A decommissioned node found holding nothing (no block, no address) for twice the leak grace period
        // is forgotten: its marker goes, unless it registered again or its addresses came back meanwhile.
        // By then every running owner of a block it borrowed from has released what it held there, even an
        // address it never recorded as borrowed, which no pass of this node can see.
        for node in &forgettable {
            if !due.contains(&forget_key(node)) {
                continue;
            }
            let forget = Txn::new()
                .still_absent(keys::node(node))
                .still_absent(keys::node_addresses(node))
                .remove(keys::decommissioned(node));
            let Some(store) = self.store() else { continue };
            if store.txn(forget).await?.is_committed() {
                info!(%node, "a decommissioned node holds nothing any more; its marker is removed");
            }
        }
        self.suspects.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| !due.contains(k));
        Ok((released, blocks))
    }

    /// Collect this node's attachment `handle` as its DEL would: how many addresses it freed, or `None` when it
    /// has no endpoint record (then only its address goes).
    async fn collect_attachment(&self, handle: &str) -> Result<Option<usize>, CollectError> {
        let Some(endpoint) = self.endpoint(handle).await? else { return Ok(None) };
        let freed = self
            .del(DelRequest {
                container_id: endpoint.container_id.clone(),
                ifname: endpoint.ifname.clone(),
                host_ifname: String::new(),
            })
            .await?;
        warn!(addresses = ?freed, %handle, namespace = %endpoint.namespace, pod = %endpoint.pod,
              pod_uid = %endpoint.pod_uid, "released a leaked attachment: its container or its pod is gone");
        Ok(Some(freed.len()))
    }
}
