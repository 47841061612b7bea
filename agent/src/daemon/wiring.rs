//! Wiring one attachment: the CNI requests about one pod's interface (ADD, DEL, CHECK) and the CNI GC of a
//! network, from the allocation through the endpoint record, the routes and the enforcement entry, undone
//! in order when a step fails. Fails with a [`WiringError`]; `reply` says what the runtime is told.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use poolwarden_protocol::{AddRequest, AssignedIp, CheckRequest, DelRequest, GcRequest};
use tracing::{info, warn};

use super::{Agent, Endpoint, GC_GRACE, HOST_INTERFACE_WAIT, HostIndex, PoolRef, unix_now};
use crate::{
    allocator::{AllocError, AssignRequest},
    dataplane::{
        enforcement::{EndpointSpec, EnforcementError},
        routes::{OwnedRoute, RouteError},
    },
    directory::DirectoryError,
    ipam::{self, Requested},
    store::StoreError,
};

/// Why a request about one attachment failed.
#[derive(Debug, thiserror::Error)]
pub enum WiringError {
    /// The request names an attachment or interface it may not.
    #[error("{what}")]
    Invalid {
        /// What was refused, naming the input.
        what: String,
        /// The rule it broke.
        rule: String,
    },
    /// The pod's host interface (or bridge port) is missing or is not what it must be.
    #[error("{what}")]
    HostInterface {
        /// What is wrong with it.
        what: String,
        /// What was found, or what should have happened.
        detail: String,
    },
    /// Another request for the same attachment changed its record meanwhile.
    #[error("a concurrent request for the same attachment is in progress")]
    Busy {
        /// The endpoint record's key.
        key: String,
    },
    /// CHECK: the attachment holds no address.
    #[error("container {container} interface {ifname} holds no address")]
    NoAddress {
        /// `CNI_CONTAINERID`.
        container: String,
        /// `CNI_IFNAME`.
        ifname: String,
    },
    /// CHECK: the attachment holds other addresses than its result says.
    #[error("container {container} interface {ifname} holds other addresses")]
    OtherAddresses {
        /// `CNI_CONTAINERID`.
        container: String,
        /// `CNI_IFNAME`.
        ifname: String,
        /// What the result says.
        reported: BTreeSet<IpAddr>,
        /// What the datastore says.
        held: BTreeSet<IpAddr>,
    },
    /// Enforcement on the pod's interface could not be set up.
    #[error("enforcement on {ifname} failed")]
    Enforcement {
        /// The host interface (or bridge port).
        ifname: String,
        /// Why.
        source: EnforcementError,
    },
    /// A DEL could not remove the interface's enforcement entry.
    #[error("releasing enforcement failed")]
    EnforcementRelease(#[source] EnforcementError),
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Allocating or releasing failed.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// Programming the node's routes or links failed.
    #[error(transparent)]
    Routes(#[from] RouteError),
    /// The namespace, pod or node could not be looked up.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
}

/// A container ID and interface name as the CNI spec allows them (they also make the attachment's datastore
/// key and host interface name, so nothing else may pass).
fn check_attachment(container_id: &str, ifname: &str) -> Result<(), WiringError> {
    poolwarden_protocol::validate_container_id(container_id)
        .map_err(|rule| WiringError::Invalid { what: format!("container ID {container_id:?} is not valid"), rule })?;
    poolwarden_protocol::validate_ifname(ifname)
        .map_err(|rule| WiringError::Invalid { what: format!("interface name {ifname:?} is not valid"), rule })
}

impl Agent {
    /// The index of the host interface `name`, waiting for the plugin to create it and bring it up (it does
    /// so while the agent allocates) for at most [`HOST_INTERFACE_WAIT`].
    async fn host_interface(&self, name: &str) -> Result<u32, WiringError> {
        let started = Instant::now();
        loop {
            if let Some(ifindex) = self.routes.ifindex_when_up(name).await? {
                return Ok(ifindex);
            }
            let waited = started.elapsed();
            if waited >= HOST_INTERFACE_WAIT {
                return Err(WiringError::HostInterface {
                    what: format!("host interface {name} was not up within {HOST_INTERFACE_WAIT:?}"),
                    detail: "the plugin creates it while the agent allocates".into(),
                });
            }
            // The veth is usually a fraction of a millisecond away, finer than the timer's 1 ms ticks: ask
            // again at once for the first few milliseconds, then back off.
            if waited < Duration::from_millis(3) {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }

    pub(super) async fn add(
        &self,
        request: AddRequest,
        host_index: Option<HostIndex>,
    ) -> Result<Vec<AssignedIp>, WiringError> {
        check_attachment(&request.container_id, &request.ifname)?;
        // The only host interface an ADD may name is the one this attachment's plugin makes: anything else
        // (the node's uplink, another pod's veth) is refused before it is touched.
        let derived = poolwarden_protocol::host_ifname(&request.container_id, &request.ifname);
        if !request.host_ifname.is_empty() && request.host_ifname != derived {
            return Err(WiringError::Invalid {
                what: format!("host interface {:?} is not this attachment's", request.host_ifname),
                rule: format!(
                    "the plugin names the node's side of container {} interface {} {derived}",
                    request.container_id, request.ifname
                ),
            });
        }
        let namespace = if request.namespace.is_empty() { "default".to_string() } else { request.namespace.clone() };
        let handle = ipam::handle_for(&request.container_id, &request.ifname);
        // Until this ADD is over, its allocation without an endpoint is not a leak.
        let _adding = self.adds.read().await;
        // Read once: the allocator assigns from the same pools.
        let loaded = self.blocks.load().await?;
        let pool_list = &loaded.pools;
        let directory = &self.directory;
        let pod = if request.pod.is_empty() {
            None
        } else {
            Some(directory.pod(&namespace, &request.pod, &request.pod_uid).await?)
        };
        let node = directory.node(&self.node).await?;
        let namespace_info = directory.namespace(&namespace).await?;
        let mut endpoint = Endpoint {
            container_id: request.container_id.clone(),
            ifname: request.ifname.clone(),
            host_ifname: request.host_ifname.clone(),
            netns: request.netns.clone(),
            namespace,
            pod: request.pod.clone(),
            pod_uid: request.pod_uid.clone(),
            ips: Vec::new(),
            hook: request.hook,
            bridge_port: String::new(),
            bridge_port_index: 0,
            network: request.network.clone(),
            added_at: unix_now(),
        };
        if request.host_ifname.is_empty() && !request.bridge_port.is_empty() {
            endpoint.bridge_port_index =
                self.routes.bridge_port(&request.bridge_port).await?.ok_or_else(|| WiringError::HostInterface {
                    what: format!("{} is not a pod's bridge port", request.bridge_port),
                    detail:
                        "enforcement in IPAM-only mode goes on a veth enslaved to a bridge, whose peer is in the pod"
                            .into(),
                })?;
            endpoint.bridge_port.clone_from(&request.bridge_port);
            // Attached before the addresses are allocated: with no entry yet it drops everything there.
            if let Some(enforcement) = &self.enforcement {
                let mut enforcement = enforcement.lock().unwrap_or_else(|p| p.into_inner());
                enforcement
                    .attach(&endpoint.bridge_port, endpoint.bridge_port_index, endpoint.hook)
                    .map_err(|source| WiringError::Enforcement { ifname: endpoint.bridge_port.clone(), source })?;
            }
        }
        let assign = AssignRequest {
            handle: handle.clone(),
            node,
            namespace: namespace_info,
            pod,
            requested: Requested::from_pool_names(pool_list, &request.pools, request.ips.clone()),
            eligible: request.ipam_range.as_ref().map(|range| {
                Arc::new(ipam::Eligible {
                    subnets: range.subnets.clone(),
                    starts: range.starts.clone(),
                    ends: range.ends.clone(),
                    exclude: range.gateways.clone(),
                })
            }),
            // The endpoint is kept in its allocations: no record apart, nothing to keep in step with them.
            attributes: endpoint.attributes(),
        };
        // While the addresses are allocated, the plugin makes the veth: find its host side and attach the
        // program to it (with no entry yet it drops everything there), so that once the addresses are known
        // only the entry and the routes are left to write.
        let host = async {
            if endpoint.host_ifname.is_empty() {
                return Ok(None);
            }
            let ifindex = match host_index {
                Some(announced) => announced.await.map_err(|detail| WiringError::HostInterface {
                    what: format!("host interface {} did not come", endpoint.host_ifname),
                    detail,
                })?,
                None => self.host_interface(&endpoint.host_ifname).await?,
            };
            // The index is the plugin's word: it must be the veth of that name, with its peer in another
            // namespace (the pod's), before anything is attached to it.
            match self.routes.pod_veth(ifindex).await? {
                Some((name, _)) if name == endpoint.host_ifname => {}
                found => {
                    return Err(WiringError::HostInterface {
                        what: format!(
                            "interface {ifindex} is not the host side {} of a pod's veth",
                            endpoint.host_ifname
                        ),
                        detail: match found {
                            Some((name, _)) => format!("it is {name}"),
                            None => format!(
                                "it is {}, not a veth whose peer is in another namespace",
                                crate::dataplane::enforcement::interface_name(ifindex)
                                    .unwrap_or_else(|| "no interface".into())
                            ),
                        },
                    });
                }
            }
            if let Some(enforcement) = &self.enforcement {
                let mut enforcement = enforcement.lock().unwrap_or_else(|p| p.into_inner());
                enforcement
                    .attach(&endpoint.host_ifname, ifindex, endpoint.hook)
                    .map_err(|source| WiringError::Enforcement { ifname: endpoint.host_ifname.clone(), source })?;
            }
            Ok(Some(ifindex))
        };
        let (allocated, host) = tokio::join!(self.blocks.assign(&assign, &loaded), host);
        let (assigned, ifindex) = match (allocated, host) {
            (Ok(allocated), Ok(ifindex)) => (allocated, ifindex),
            (Err(err), host) => {
                if let Ok(Some(ifindex)) = host {
                    self.forget_enforcement(ifindex);
                }
                if endpoint.bridge_port_index != 0 {
                    self.forget_enforcement(endpoint.bridge_port_index);
                }
                return Err(err.into());
            }
            (Ok(_), Err(err)) => {
                let _ = self.blocks.release_handle(&self.node.name, &handle).await;
                return Err(err);
            }
        };
        endpoint.ips = assigned.iter().map(|a| a.ip).collect();
        let pool_cidrs: Vec<PoolRef> =
            assigned.iter().filter_map(|a| pool_list.iter().find(|p| p.name() == a.pool).map(PoolRef::of)).collect();
        let blocks: Vec<IpNet> = assigned.iter().map(|a| a.block).collect();
        if let Err(err) = self.wire(&endpoint, &blocks, &pool_cidrs, ifindex).await {
            let _ = self.blocks.release_handle(&self.node.name, &handle).await;
            return Err(err);
        }
        for a in &assigned {
            info!(address = %a.ip, pool = %a.pool, block = %a.block, "assigned");
        }
        Ok(assigned
            .into_iter()
            .map(|a| {
                let pool_cidr = pool_list.iter().find(|p| p.name() == a.pool).map_or(a.block, |p| p.cidr());
                AssignedIp { address: IpNet::from(a.ip), pool: a.pool, pool_cidr }
            })
            .collect())
    }

    /// Route an endpoint's addresses (held by its allocations, with the endpoint in their attributes) to its
    /// host veth (`ifindex`, absent in IPAM-only mode); make sure its blocks' blackholes exist and its entry
    /// is in the enforcement maps. On failure, what this did is undone; the caller releases the addresses.
    async fn wire(
        &self,
        endpoint: &Endpoint,
        blocks: &[IpNet],
        pools: &[PoolRef],
        ifindex: Option<u32>,
    ) -> Result<(), WiringError> {
        let _wiring = self.wiring.read().await;
        // A block this node does not own lent the address: its owner gets no blackhole from us, and the other
        // nodes route the address here from the block's allocation.
        let mine: BTreeSet<IpNet> = self.owned_blocks().await?.into_iter().map(|s| s.block.cidr).collect();
        let owned: Vec<IpNet> = blocks.iter().copied().filter(|b| mine.contains(b)).collect();
        let Some(ifindex) = ifindex else {
            // IPAM-only: the main plugin (a bridge, say) routes the pod; a blackhole for its block would eat
            // the node's own traffic to it.
            for block in blocks {
                self.routes.remove(&OwnedRoute::Blackhole(*block)).await?;
            }
            if !endpoint.bridge_port.is_empty() {
                // Enforced on its bridge port before the plugin hears of the address.
                let port = endpoint.bridge_port_index;
                if let Err(err) = self.enforce_endpoint(endpoint, port, pools) {
                    self.forget_enforcement(port);
                    return Err(err);
                }
            }
            return Ok(());
        };
        // The record is durable before the kernel is programmed (a reconcile in between finds the record
        // and programs the same); the plugin hears of the address only when both are done, and the pod is
        // enforced before it can send.
        let program = async {
            // Only blocks this node owns get a blackhole; a borrowed address's block belongs to another node.
            // The routes are independent of each other: all are queued at once, and the netlink connection
            // sends each as soon as the one before is answered (not after a trip back through this task).
            let routes: Vec<OwnedRoute> = owned
                .iter()
                .map(|block| OwnedRoute::Blackhole(*block))
                .chain(endpoint.ips.iter().map(|ip| OwnedRoute::Endpoint(*ip, ifindex)))
                .collect();
            futures::future::try_join_all(routes.iter().map(|route| self.routes.install(route))).await?;
            self.enforce_endpoint(endpoint, ifindex, pools)
        };
        let Err(err) = program.await else { return Ok(()) };
        for ip in &endpoint.ips {
            let _ = self.routes.remove(&OwnedRoute::Endpoint(*ip, ifindex)).await;
        }
        self.forget_enforcement(ifindex);
        Err(err)
    }

    /// On a failed ADD's way out: the interface's entry goes (its program, if attached, then drops
    /// everything there until the plugin deletes the interface) and it no longer counts as attached here.
    pub(super) fn forget_enforcement(&self, ifindex: u32) {
        if let Some(enforcement) = &self.enforcement {
            let _ = enforcement.lock().unwrap_or_else(|p| p.into_inner()).release(ifindex);
        }
    }

    /// Write the endpoint's entry and attach the program to its host interface (idempotent).
    pub(super) fn enforce_endpoint(
        &self,
        endpoint: &Endpoint,
        ifindex: u32,
        pools: &[PoolRef],
    ) -> Result<(), WiringError> {
        let Some(enforcement) = &self.enforcement else { return Ok(()) };
        let own: Vec<&PoolRef> = pools.iter().filter(|p| endpoint.ips.iter().any(|ip| p.cidr.contains(ip))).collect();
        let mut enforcement = enforcement.lock().unwrap_or_else(|p| p.into_inner());
        // Its own veth's host side, or (IPAM-only) the bridge port the main plugin made for it.
        let ifname = if endpoint.bridge_port.is_empty() { &endpoint.host_ifname } else { &endpoint.bridge_port };
        let failed = |source| WiringError::Enforcement { ifname: ifname.clone(), source };
        // The pod's pool may override the agent's mode (the first address's pool decides).
        let pool_mode = match own.first().and_then(|p| p.enforcement) {
            Some(crate::resources::EnforcementMode::Off) => {
                // The program went on while the addresses were allocated; this pod is not enforced.
                enforcement.detach(ifname, ifindex).map_err(failed)?;
                return enforcement.release(ifindex).map_err(failed);
            }
            Some(crate::resources::EnforcementMode::Pool) => true,
            Some(crate::resources::EnforcementMode::Strict) => false,
            None => self.pool_mode,
        };
        // Counted under the pool of its first address (a dual-stack pod's two pools share its counters).
        let pool_id = match own.first() {
            Some(pool) => enforcement.pool_slot(&pool.name).map_err(failed)?,
            None => 0,
        };
        let spec = EndpointSpec {
            addresses: endpoint.ips.clone(),
            pools: own.iter().map(|p| p.cidr).collect(),
            pool_mode,
            pool_id,
        };
        enforcement.enforce(ifname, ifindex, &spec, endpoint.hook).map_err(failed)
    }

    pub(super) async fn del(&self, request: DelRequest) -> Result<Vec<IpAddr>, WiringError> {
        check_attachment(&request.container_id, &request.ifname)?;
        let handle = ipam::handle_for(&request.container_id, &request.ifname);
        let _wiring = self.wiring.read().await;
        // What the ADD wired, read before its allocations (which hold it) go.
        let endpoint = self.endpoint(&handle).await?;
        let released = self.blocks.release_handle(&self.node.name, &handle).await?;
        // The recorded interface; without a record (a lost store), the one this attachment's plugin would have
        // made, if the plugin names it: never another name it sends (the node's uplink, say).
        let derived = poolwarden_protocol::host_ifname(&request.container_id, &request.ifname);
        let host_ifname = endpoint
            .as_ref()
            .map(|e| e.host_ifname.clone())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| if request.host_ifname == derived { derived } else { String::new() });
        let found = if host_ifname.is_empty() { None } else { self.routes.ifindex(&host_ifname).await? };
        let ifindex = match found {
            // Only a pod's veth of that name is touched.
            Some(index) => match self.routes.pod_veth(index).await? {
                Some((name, _)) if name == host_ifname => Some(index),
                _ => {
                    warn!(interface = %host_ifname, "not deleting it: it is not the host side of a pod's veth");
                    None
                }
            },
            _ => None,
        };
        // A bridge port's entry goes (fail closed until the main plugin deletes the veth; the port is not ours
        // to delete). The main plugin may have deleted the port already: by its index, unless that index is
        // another interface's now.
        if let Some(recorded) = &endpoint
            && recorded.bridge_port_index != 0
        {
            let now = crate::dataplane::enforcement::interface_name(recorded.bridge_port_index);
            if now.is_none_or(|name| name == recorded.bridge_port) {
                self.forget_enforcement(recorded.bridge_port_index);
            }
        }
        if let Some(endpoint) = endpoint
            && let Some(ifindex) = ifindex
        {
            for ip in &endpoint.ips {
                self.routes.remove(&OwnedRoute::Endpoint(*ip, ifindex)).await?;
            }
        }
        if let Some(index) = ifindex {
            // Deleting a device makes the kernel wait for an RCU grace period; retired links are deleted
            // together, shortly after, by the reaper, so neither this DEL nor the next waits for it.
            if let Some(enforcement) = &self.enforcement {
                // The entry goes now (the interface is going down: fail closed); the filter goes with it.
                let mut enforcement = enforcement.lock().unwrap_or_else(|p| p.into_inner());
                enforcement.release(index).map_err(WiringError::EnforcementRelease)?;
            }
            self.routes.retire_link(index).await?;
            self.retired.notify_one();
        }
        for ip in &released {
            info!(address = %ip, "released");
        }
        // A block emptied by this DEL goes back now if the grace period allows it (it is 0 in some setups);
        // otherwise the periodic maintenance gives it back later.
        let config = self.blocks.load().await?.config;
        for block in self.blocks.release_empty_blocks(&self.node.name, &config).await? {
            self.routes.remove(&OwnedRoute::Blackhole(block)).await?;
            info!(%block, "released empty block");
        }
        Ok(released)
    }

    /// IPAM-only CHECK: the attachment's allocation exists and holds exactly the addresses its result gave.
    pub(super) async fn check(&self, request: CheckRequest) -> Result<(), WiringError> {
        check_attachment(&request.container_id, &request.ifname)?;
        let handle = ipam::handle_for(&request.container_id, &request.ifname);
        let held: BTreeSet<IpAddr> = self
            .blocks
            .addresses_of(&self.node.name, &handle)
            .await?
            .unwrap_or_default()
            .into_iter()
            .map(|a| a.ip)
            .collect();
        let reported: BTreeSet<IpAddr> = request.ips.iter().copied().collect();
        if held.is_empty() {
            return Err(WiringError::NoAddress { container: request.container_id, ifname: request.ifname });
        }
        if held != reported {
            return Err(WiringError::OtherAddresses {
                container: request.container_id,
                ifname: request.ifname,
                reported,
                held,
            });
        }
        Ok(())
    }

    /// CNI GC for one network: release its attachments on this node that the runtime no longer lists, but
    /// not those of other networks, nor one younger than [`GC_GRACE`] (the runtime's list may predate its
    /// ADD); no ADD runs meanwhile.
    pub(super) async fn gc(&self, request: GcRequest) -> Result<Vec<IpAddr>, WiringError> {
        let _no_adds = self.adds.write().await;
        let valid: BTreeSet<(String, String)> =
            request.valid_attachments.into_iter().map(|a| (a.container_id, a.ifname)).collect();
        let mut released = Vec::new();
        let now = unix_now();
        for endpoint in self.endpoints().await? {
            if endpoint.network != request.network
                || valid.contains(&(endpoint.container_id.clone(), endpoint.ifname.clone()))
                || now.saturating_sub(endpoint.added_at) < GC_GRACE.as_secs()
            {
                continue;
            }
            warn!(container = %endpoint.container_id, ifname = %endpoint.ifname, "releasing an attachment the runtime no longer has");
            released.extend(
                self.del(DelRequest {
                    container_id: endpoint.container_id,
                    ifname: endpoint.ifname,
                    host_ifname: String::new(),
                })
                .await?,
            );
        }
        Ok(released)
    }
}
