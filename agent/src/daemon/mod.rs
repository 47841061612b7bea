//! The node agent: serves the CNI plugin on a Unix socket, allocates through the datastore, programs the
//! node's routes, and keeps them reconciled with the store across restarts.

mod collect;
pub mod install;
pub mod membership;
pub mod metrics;
pub mod server;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use poolwarden_protocol::{
    AddRequest, AssignedIp, CheckRequest, DelRequest, ErrorReply, GcRequest, Request, Response, code,
};
use serde::{Deserialize, Serialize};
use tracing::{Instrument, info, info_span, warn};

use self::membership::Membership;

use crate::{
    allocator::{AllocError, Allocator, AssignRequest, Record},
    catalog::{Catalog, decode, encode},
    cluster,
    dataplane::{
        enforcement::{EndpointSpec, Enforcement, EnforcementError},
        routes::{OwnedRoute, RouteError, Routes},
    },
    directory::{Directory, DirectoryError, StandaloneDirectory},
    ipam::{self, NodeInfo, Requested, SelectionError, selection::ChoiceSource},
    store::{Store, StoreError, Txn, keys},
};

/// A container ID and interface name as the CNI spec allows them (they also make the attachment's datastore
/// key and host interface name, so nothing else may pass).
fn check_attachment(container_id: &str, ifname: &str) -> Result<(), ErrorReply> {
    poolwarden_protocol::validate_container_id(container_id)
        .map_err(|why| reply(code::INVALID_ENVIRONMENT, format!("container ID {container_id:?} is not valid"), why))?;
    poolwarden_protocol::validate_ifname(ifname)
        .map_err(|why| reply(code::INVALID_ENVIRONMENT, format!("interface name {ifname:?} is not valid"), why))
}

pub use crate::dataplane::enforcement::EnforcementMode;

/// What enforcement needs to know of a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolRef {
    /// The pool's name.
    pub name: String,
    /// Its range.
    pub cidr: IpNet,
    /// Its override of the agent's mode.
    pub enforcement: Option<crate::resources::EnforcementMode>,
}

impl PoolRef {
    fn of(pool: &crate::resources::IpPool) -> Self {
        Self { name: pool.name().to_string(), cidr: pool.cidr(), enforcement: pool.spec.enforcement }
    }
}

/// Errors that keep the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Route programming could not be set up.
    #[error(transparent)]
    Routes(#[from] RouteError),
    /// The enforcement program could not be loaded.
    #[error(transparent)]
    Enforcement(#[from] EnforcementError),
}

/// What the agent remembers of each attachment it wired: enough to put its route back after a restart,
/// undo it on DEL, and collect it when its container is gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The host side of the veth (empty in IPAM-only mode).
    pub host_ifname: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's UID (`K8S_POD_UID`; empty when the runtime gave none): in Kubernetes mode, the attachment
    /// is collected once no pod of that UID exists.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_uid: String,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Where enforcement is attached on the host side.
    #[serde(default)]
    pub hook: poolwarden_protocol::EnforcementHook,
    /// IPAM-only with enforcement: the bridge port (the node's side of the pod's veth) it is enforced on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bridge_port: String,
    /// That port's interface index when the ADD found it: the main plugin may delete the port before our
    /// DEL, which then releases its entry by index.
    #[serde(default)]
    pub bridge_port_index: u32,
    /// The network (configuration `name`) it was added to: a CNI GC of another network leaves it alone.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    /// When its ADD started (seconds since the epoch): a CNI GC spares attachments younger than
    /// [`GC_GRACE`], which a runtime's list of valid attachments may predate.
    #[serde(default)]
    pub added_at: u64,
}

/// How old an attachment must be before a CNI GC may release it.
pub const GC_GRACE: Duration = Duration::from_secs(5);

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Where the plugin announces the index of an ADD's host interface once it is up (see
/// `poolwarden_protocol`): an error when it gave up.
pub type HostIndex = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u32, String>> + Send>>;

/// How long an ADD waits for the plugin to create the pod's host interface. Long: a plugin that dies closes
/// its connection, which ends the wait at once, but one that is alive may be slow, its veth waiting for the
/// kernel's RTNL lock while the node starts many pods at once (more than 5 s was seen with 50 pods starting
/// on each node of the test cluster, and each such failure costs the pod a kubelet retry).
pub const HOST_INTERFACE_WAIT: Duration = Duration::from_secs(60);

/// How long things last that outlive a moment.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    /// How long an address or affinity must look leaked before the collector releases it.
    pub leak_grace: Duration,
    /// How long another node must have been unregistered (its agent down) before its addresses and blocks
    /// count as leaked, unless it was decommissioned.
    pub node_gone_after: Duration,
    /// How long this node's registration outlives the agent.
    pub registration_ttl: Duration,
}

/// The agent's state, shared by every request.
pub struct Agent {
    node: NodeInfo,
    /// Where other nodes reach this one (`--node-address`; detected when not given).
    node_addresses: Vec<IpAddr>,
    store: Arc<dyn Store>,
    allocator: Allocator,
    routes: Routes,
    /// Requests wiring or unwiring endpoints share this; a reconcile takes it alone, so it never sees an
    /// endpoint's route without the endpoint record it is computed from (and removes it as a stray).
    wiring: tokio::sync::RwLock<()>,
    /// Source-address enforcement (`None` with `--enforcement off`).
    enforcement: Option<std::sync::Mutex<Enforcement>>,
    /// The kernel's drop reports, until the task that logs them takes them.
    drop_reports: std::sync::Mutex<Option<aya::maps::RingBuf<aya::maps::MapData>>>,
    /// Pool mode lets a pod send from anywhere in its pool, not only its own address.
    pool_mode: bool,
    /// Wakes the reaper of retired host interfaces.
    retired: tokio::sync::Notify,
    /// Counters and histograms served on the metrics port.
    pub metrics: metrics::Metrics,
    /// How long registrations and leaks last.
    lifetimes: Lifetimes,
    /// What looked leaked at the last collection, since when, and the grace period it waits under.
    suspects: std::sync::Mutex<BTreeMap<String, (Instant, Duration)>>,
    /// Every ADD holds this shared for its whole course; the collector takes it alone to release this node's
    /// leaked addresses, so an address allocated (or returned again to a repeated ADD) and not wired yet is
    /// never released under it.
    adds: tokio::sync::RwLock<()>,
    /// Where namespaces, pods and node labels come from.
    directory: Arc<dyn Directory>,
    /// The masquerade table for pools with `natOutgoing`.
    nat: crate::dataplane::nat::Nat,
    /// The nodes the store knows, followed by watches (see [`Agent::follow_membership`]).
    membership: Arc<Membership>,
}

fn reply(code: u32, msg: impl Into<String>, details: impl Into<String>) -> ErrorReply {
    ErrorReply { code, msg: msg.into(), details: details.into() }
}

fn store_reply(err: StoreError) -> ErrorReply {
    reply(code::IO_FAILURE, "the datastore failed", err.to_string())
}

/// A lookup of a namespace, pod or node failed: try again later when the API server could not answer.
pub fn directory_reply(err: DirectoryError) -> ErrorReply {
    let message = err.to_string();
    match err {
        DirectoryError::Unreachable { .. } => {
            reply(code::TRY_AGAIN_LATER, message, "the API server did not answer; kubelet retries the ADD")
        }
        DirectoryError::NotFound { .. } => {
            reply(code::TRY_AGAIN_LATER, message, "the pod's objects are not visible to the agent yet")
        }
        DirectoryError::Refused { .. } => reply(
            code::TRY_AGAIN_LATER,
            message,
            "check the agent's ServiceAccount: it needs get/list/watch on namespaces, pods and nodes",
        ),
        DirectoryError::Store(e) => store_reply(e),
    }
}

/// Enforcement on the host interface `ifname` failed.
fn enforcement_failed(ifname: &str) -> impl Fn(EnforcementError) -> ErrorReply + Copy + '_ {
    move |e| reply(code::INTERFACE_SETUP, format!("enforcement on {ifname} failed"), e.to_string())
}

fn route_reply(err: RouteError) -> ErrorReply {
    reply(code::IO_FAILURE, "programming the node's routes failed", err.to_string())
}

fn alloc_reply(err: AllocError) -> ErrorReply {
    let message = err.to_string();
    match err {
        AllocError::Selection(
            SelectionError::UnknownPool { named_by: ChoiceSource::Request, .. }
            | SelectionError::WrongFamily { named_by: ChoiceSource::Request, .. },
        ) => reply(code::INVALID_CONFIG, message, "fix `pools` in the network configuration"),
        AllocError::Selection(_) => reply(code::IPAM_REFUSED, message, "pool selection refused the request"),
        AllocError::Exhausted { .. } | AllocError::AddressUnavailable { .. } | AllocError::Reassigned { .. } => {
            reply(code::IPAM_REFUSED, message, "no address could be allocated")
        }
        AllocError::Contention { .. } | AllocError::PoolChanged { .. } => {
            reply(code::TRY_AGAIN_LATER, message, "retry the request")
        }
        AllocError::Store(e) => store_reply(e),
    }
}

impl Agent {
    /// An agent for `node` on `store`, programming routes in this process's network namespace.
    pub fn new(
        node: NodeInfo,
        store: Arc<dyn Store>,
        mode: EnforcementMode,
        bpf_dir: &std::path::Path,
        node_addresses: Vec<IpAddr>,
        lifetimes: Lifetimes,
    ) -> Result<Self, AgentError> {
        let mut enforcement = match mode {
            EnforcementMode::Off => None,
            EnforcementMode::Strict | EnforcementMode::Pool => Some(Enforcement::load(bpf_dir)?),
        };
        let drop_reports = enforcement.as_mut().and_then(Enforcement::take_drop_reports);
        let enforcement = enforcement.map(std::sync::Mutex::new);
        Ok(Self {
            drop_reports: std::sync::Mutex::new(drop_reports),
            enforcement,
            pool_mode: mode == EnforcementMode::Pool,
            allocator: Allocator::new(Arc::clone(&store)),
            routes: Routes::connect()?,
            wiring: tokio::sync::RwLock::new(()),
            retired: tokio::sync::Notify::new(),
            metrics: metrics::Metrics::default(),
            node,
            node_addresses,
            lifetimes,
            suspects: std::sync::Mutex::new(BTreeMap::new()),
            adds: tokio::sync::RwLock::new(()),
            directory: Arc::new(StandaloneDirectory::new(Arc::clone(&store))),
            nat: crate::dataplane::nat::Nat::default(),
            membership: Arc::default(),
            store,
        })
    }

    /// Take namespaces, pods and node labels from `directory` (the Kubernetes API) instead of the datastore.
    pub fn with_directory(mut self, directory: Arc<dyn Directory>) -> Self {
        self.directory = directory;
        self
    }

    /// Follow the nodes' registrations with watches from now on, so that collection passes do not list them.
    pub fn follow_membership(&self) {
        tokio::spawn(Arc::clone(&self.membership).follow(Arc::clone(&self.store)));
    }

    /// Wait until what routes are made of changes (see [`Membership::changed`]).
    pub async fn routing_changed(&self) {
        self.membership.changed().await;
    }

    /// Whether the nodes' registrations are being followed (see [`Agent::follow_membership`]).
    pub fn membership_followed(&self) -> bool {
        self.membership.is_followed()
    }

    /// The index of the host interface `name`, waiting for the plugin to create it and bring it up (it does
    /// so while the agent allocates) for at most [`HOST_INTERFACE_WAIT`].
    async fn host_interface(&self, name: &str) -> Result<u32, ErrorReply> {
        let started = Instant::now();
        loop {
            if let Some(ifindex) = self.routes.ifindex_when_up(name).await.map_err(route_reply)? {
                return Ok(ifindex);
            }
            let waited = started.elapsed();
            if waited >= HOST_INTERFACE_WAIT {
                return Err(reply(
                    code::INTERFACE_SETUP,
                    format!("host interface {name} was not up within {HOST_INTERFACE_WAIT:?}"),
                    "the plugin creates it while the agent allocates",
                ));
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

    /// Register this node (`nodes/<name>`: its addresses and labels) for as long as the agent runs, so other
    /// nodes route this node's blocks to it. Addresses not given are detected: the first global IPv4 and
    /// IPv6 address of the node's namespace.
    pub async fn register(&self) -> Result<cluster::NodeRecord, ErrorReply> {
        let mut addresses = self.node_addresses.clone();
        if addresses.is_empty() {
            let found: Vec<IpAddr> =
                self.routes.global_addresses().await.map_err(route_reply)?.iter().map(IpNet::addr).collect();
            addresses.extend(found.iter().find(|a| a.is_ipv4()));
            addresses.extend(found.iter().find(|a| a.is_ipv6()));
        }
        let record = cluster::NodeRecord { name: self.node.name.clone(), addresses, labels: self.node.labels.clone() };
        self.store
            .put_leased(&keys::node(&self.node.name), encode(&record), self.lifetimes.registration_ttl)
            .await
            .map_err(store_reply)?;
        // Kept without a lease (the other nodes route by it while this agent is down), and a node that
        // registers again is no longer decommissioned.
        let txn = Txn::new()
            .put(keys::node_addresses(&self.node.name), encode(&record))
            .remove(keys::decommissioned(&self.node.name));
        self.store.txn(txn).await.map_err(store_reply)?;
        Ok(record)
    }

    /// The node this agent serves.
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// The datastore.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Answer one request.
    pub async fn handle(&self, request: Request) -> Response {
        self.handle_with(request, None).await
    }

    /// Answer one request; for an ADD, `host_index` is where the plugin announces its host interface's index
    /// (otherwise the agent waits for the interface by name).
    pub async fn handle_with(&self, request: Request, host_index: Option<HostIndex>) -> Response {
        let started = Instant::now();
        let (command, span, response) = match request {
            Request::Add(add) => {
                let span = info_span!("add", container = %add.container_id, ifname = %add.ifname, namespace = %add.namespace, pod = %add.pod);
                let added = self.add(add, host_index).instrument(span.clone()).await;
                ("add", span, added.map(|ips| Response::Added { ips }))
            }
            Request::Del(del) => {
                let span = info_span!("del", container = %del.container_id, ifname = %del.ifname);
                let deleted = self.del(del).instrument(span.clone()).await;
                ("del", span, deleted.map(|released| Response::Deleted { released }))
            }
            Request::Status => ("status", info_span!("status"), self.status().await.map(|()| Response::Ready)),
            Request::Gc(gc) => {
                let span = info_span!("gc");
                let collected = self.gc(gc).instrument(span.clone()).await;
                ("gc", span, collected.map(|released| Response::Collected { released }))
            }
            Request::Cli(cli) => ("cli", info_span!("cli"), Ok(self.command(cli).await)),
            Request::Check(check) => {
                let span = info_span!("check", container = %check.container_id, ifname = %check.ifname);
                let checked = self.check(check).instrument(span.clone()).await;
                ("check", span, checked.map(|()| Response::Checked))
            }
        };
        // STATUS is asked every few seconds and its failure is its answer; the others are worth a line.
        if let Err(err) = &response
            && command != "status"
        {
            span.in_scope(|| warn!(code = err.code, error = %err.msg, details = %err.details, "request failed"));
        }
        let outcome = if response.is_ok() { "ok" } else { "error" };
        self.metrics.observe(command, outcome, started.elapsed());
        response.unwrap_or_else(Response::Error)
    }

    /// Run a `poolwarden` command for a client that could not open the datastore because we hold it.
    async fn command(&self, request: poolwarden_protocol::CliRequest) -> Response {
        use clap::Parser;
        let args = std::iter::once("poolwarden".to_string()).chain(request.args);
        let cli = match crate::commands::Cli::try_parse_from(args) {
            Ok(cli) => cli,
            Err(e) => return Response::CliOutput { stdout: String::new(), stderr: e.render().to_string(), exit: 2 },
        };
        let mut stdout = String::new();
        match crate::commands::execute(
            cli,
            Arc::clone(&self.store),
            Some(Arc::clone(&self.directory)),
            request.stdin,
            &mut stdout,
        )
        .await
        {
            Ok(exit) => Response::CliOutput { stdout, stderr: String::new(), exit },
            Err(e) => Response::CliOutput { stdout, stderr: format!("error: {e}\n"), exit: 1 },
        }
    }

    async fn add(&self, request: AddRequest, host_index: Option<HostIndex>) -> Result<Vec<AssignedIp>, ErrorReply> {
        check_attachment(&request.container_id, &request.ifname)?;
        // The only host interface an ADD may name is the one this attachment's plugin makes: anything else
        // (the node's uplink, another pod's veth) is refused before it is touched.
        let derived = poolwarden_protocol::host_ifname(&request.container_id, &request.ifname);
        if !request.host_ifname.is_empty() && request.host_ifname != derived {
            return Err(reply(
                code::INVALID_ENVIRONMENT,
                format!("host interface {:?} is not this attachment's", request.host_ifname),
                format!(
                    "the plugin names the node's side of container {} interface {} {derived}",
                    request.container_id, request.ifname
                ),
            ));
        }
        let namespace = if request.namespace.is_empty() { "default".to_string() } else { request.namespace.clone() };
        let handle = ipam::handle_for(&request.container_id, &request.ifname);
        // Until this ADD is over, its allocation without an endpoint is not a leak.
        let _adding = self.adds.read().await;
        // Read once: the allocator assigns from the same pools.
        let loaded = self.allocator.load().await.map_err(store_reply)?;
        let pool_list = &loaded.pools;
        let directory = &self.directory;
        let pod = if request.pod.is_empty() {
            None
        } else {
            Some(directory.pod(&namespace, &request.pod, &request.pod_uid).await.map_err(directory_reply)?)
        };
        let assign = AssignRequest {
            handle: handle.clone(),
            node: directory.node(&self.node).await.map_err(directory_reply)?,
            namespace: directory.namespace(&namespace).await.map_err(directory_reply)?,
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
        };
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
                self.routes.bridge_port(&request.bridge_port).await.map_err(route_reply)?.ok_or_else(|| {
                    reply(
                        code::INTERFACE_SETUP,
                        format!("{} is not a pod's bridge port", request.bridge_port),
                        "enforcement in IPAM-only mode goes on a veth enslaved to a bridge, whose peer is in the pod",
                    )
                })?;
            endpoint.bridge_port.clone_from(&request.bridge_port);
            // Attached before the addresses are allocated: with no entry yet it drops everything there.
            if let Some(enforcement) = &self.enforcement {
                let mut enforcement = enforcement.lock().unwrap_or_else(|p| p.into_inner());
                enforcement
                    .attach(&endpoint.bridge_port, endpoint.bridge_port_index, endpoint.hook)
                    .map_err(enforcement_failed(&endpoint.bridge_port))?;
            }
        }
        // The endpoint record is committed with the addresses when the allocator can (one fsync per ADD).
        let template = endpoint.clone();
        let record = Record {
            key: keys::endpoint(&self.node.name, &handle),
            value: Arc::new(move |ips: &[IpAddr]| encode(&Endpoint { ips: ips.to_vec(), ..template.clone() })),
        };
        // While the addresses are allocated, the plugin makes the veth: find its host side and attach the
        // program to it (with no entry yet it drops everything there), so that once the addresses are known
        // only the entry and the routes are left to write.
        let host = async {
            if endpoint.host_ifname.is_empty() {
                return Ok(None);
            }
            let ifindex = match host_index {
                Some(announced) => announced.await.map_err(|e| {
                    reply(code::INTERFACE_SETUP, format!("host interface {} did not come", endpoint.host_ifname), e)
                })?,
                None => self.host_interface(&endpoint.host_ifname).await?,
            };
            // The index is the plugin's word: it must be the veth of that name, with its peer in another
            // namespace (the pod's), before anything is attached to it.
            match self.routes.pod_veth(ifindex).await.map_err(route_reply)? {
                Some((name, _)) if name == endpoint.host_ifname => {}
                found => {
                    return Err(reply(
                        code::INTERFACE_SETUP,
                        format!("interface {ifindex} is not the host side {} of a pod's veth", endpoint.host_ifname),
                        match found {
                            Some((name, _)) => format!("it is {name}"),
                            None => format!(
                                "it is {}, not a veth whose peer is in another namespace",
                                crate::dataplane::enforcement::interface_name(ifindex)
                                    .unwrap_or_else(|| "no interface".into())
                            ),
                        },
                    ));
                }
            }
            if let Some(enforcement) = &self.enforcement {
                let mut enforcement = enforcement.lock().unwrap_or_else(|p| p.into_inner());
                enforcement
                    .attach(&endpoint.host_ifname, ifindex, endpoint.hook)
                    .map_err(enforcement_failed(&endpoint.host_ifname))?;
            }
            Ok(Some(ifindex))
        };
        let (allocated, host) = tokio::join!(self.allocator.assign_recording(&assign, Some(&record), &loaded), host);
        let ((assigned, recorded), ifindex) = match (allocated, host) {
            (Ok(allocated), Ok(ifindex)) => (allocated, ifindex),
            (Err(err), host) => {
                if let Ok(Some(ifindex)) = host {
                    self.forget_enforcement(ifindex);
                }
                if endpoint.bridge_port_index != 0 {
                    self.forget_enforcement(endpoint.bridge_port_index);
                }
                return Err(alloc_reply(err));
            }
            (Ok(_), Err(err)) => {
                let _ = self.allocator.release_handle(&handle).await;
                let _ = self.store.txn(Txn::new().remove(&record.key)).await;
                return Err(err);
            }
        };
        endpoint.ips = assigned.iter().map(|a| a.ip).collect();
        let pool_cidrs: Vec<PoolRef> =
            assigned.iter().filter_map(|a| pool_list.iter().find(|p| p.name() == a.pool).map(PoolRef::of)).collect();
        let blocks: Vec<IpNet> = assigned.iter().map(|a| a.block).collect();
        if let Err(err) = self.wire(&endpoint, &record.key, &blocks, &pool_cidrs, ifindex, recorded).await {
            let _ = self.allocator.release_handle(&handle).await;
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

    /// Record the endpoint under `key` (unless the allocation's transaction already did: `recorded`) and route its
    /// addresses to its host veth (`ifindex`, absent in IPAM-only mode); make sure its blocks' blackholes
    /// exist and its entry is in the enforcement maps. On failure, what this did is undone and the record
    /// removed; the caller releases the addresses.
    async fn wire(
        &self,
        endpoint: &Endpoint,
        key: &str,
        blocks: &[IpNet],
        pools: &[PoolRef],
        ifindex: Option<u32>,
        recorded: bool,
    ) -> Result<(), ErrorReply> {
        let _wiring = self.wiring.read().await;
        let mut owned = Vec::with_capacity(blocks.len());
        for block in blocks {
            // A block with no affinity to this node lent the address: other nodes must route it here.
            if self.store.get(&keys::affinity(&self.node.name, *block)).await.map_err(store_reply)?.is_some() {
                owned.push(*block);
            }
        }
        let borrowed: Vec<IpAddr> =
            endpoint.ips.iter().copied().filter(|ip| !owned.iter().any(|b| b.contains(ip))).collect();
        // The allocator records the endpoint only with addresses from this node's own blocks; a borrowed
        // address needs its `borrowed/` key beside the record, so that case (and every other) commits here.
        if !recorded || !borrowed.is_empty() {
            let existing = self.store.get(key).await.map_err(store_reply)?.map(|kv| kv.mod_revision);
            let mut txn = Txn::new().write(key, existing, encode(endpoint));
            for ip in &borrowed {
                txn =
                    txn.put(keys::borrowed(*ip), encode(&cluster::Borrowed { ip: *ip, node: self.node.name.clone() }));
            }
            if !self.store.txn(txn).await.map_err(store_reply)?.is_committed() {
                return Err(reply(
                    code::TRY_AGAIN_LATER,
                    "a concurrent request for the same attachment is in progress",
                    key,
                ));
            }
        }
        let Some(ifindex) = ifindex else {
            // IPAM-only: the main plugin (a bridge, say) routes the pod; a blackhole for its block would eat
            // the node's own traffic to it.
            for block in blocks {
                self.routes.remove(&OwnedRoute::Blackhole(*block)).await.map_err(route_reply)?;
            }
            if !endpoint.bridge_port.is_empty() {
                // Enforced on its bridge port before the plugin hears of the address.
                let port = endpoint.bridge_port_index;
                if let Err(err) = self.enforce_endpoint(endpoint, port, pools) {
                    let _ = self.store.txn(Txn::new().remove(key)).await;
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
            futures::future::try_join_all(routes.iter().map(|route| self.routes.install(route)))
                .await
                .map_err(route_reply)?;
            self.enforce_endpoint(endpoint, ifindex, pools)
        };
        let Err(err) = program.await else { return Ok(()) };
        let mut undo = Txn::new().remove(key);
        for ip in &endpoint.ips {
            undo = undo.remove(keys::borrowed(*ip));
        }
        let _ = self.store.txn(undo).await;
        for ip in &endpoint.ips {
            let _ = self.routes.remove(&OwnedRoute::Endpoint(*ip, ifindex)).await;
        }
        self.forget_enforcement(ifindex);
        Err(err)
    }

    /// On a failed ADD's way out: the interface's entry goes (its program, if attached, then drops
    /// everything there until the plugin deletes the interface) and it no longer counts as attached here.
    fn forget_enforcement(&self, ifindex: u32) {
        if let Some(enforcement) = &self.enforcement {
            let _ = enforcement.lock().unwrap_or_else(|p| p.into_inner()).release(ifindex);
        }
    }

    /// Write the endpoint's entry and attach the program to its host interface (idempotent).
    fn enforce_endpoint(&self, endpoint: &Endpoint, ifindex: u32, pools: &[PoolRef]) -> Result<(), ErrorReply> {
        let Some(enforcement) = &self.enforcement else { return Ok(()) };
        let own: Vec<&PoolRef> = pools.iter().filter(|p| endpoint.ips.iter().any(|ip| p.cidr.contains(ip))).collect();
        let mut enforcement = enforcement.lock().unwrap_or_else(|p| p.into_inner());
        // Its own veth's host side, or (IPAM-only) the bridge port the main plugin made for it.
        let ifname = if endpoint.bridge_port.is_empty() { &endpoint.host_ifname } else { &endpoint.bridge_port };
        let failed = enforcement_failed(ifname);
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

    async fn del(&self, request: DelRequest) -> Result<Vec<IpAddr>, ErrorReply> {
        check_attachment(&request.container_id, &request.ifname)?;
        let handle = ipam::handle_for(&request.container_id, &request.ifname);
        let _wiring = self.wiring.read().await;
        let released = self.allocator.release_handle(&handle).await.map_err(alloc_reply)?;
        let key = keys::endpoint(&self.node.name, &handle);
        let endpoint = match self.store.get(&key).await.map_err(store_reply)? {
            Some(kv) => Some((decode::<Endpoint>(&key, &kv.value).map_err(store_reply)?, kv.mod_revision)),
            None => None,
        };
        // The recorded interface; without a record (a lost store), the one this attachment's plugin would have
        // made, if the plugin names it: never another name it sends (the node's uplink, say).
        let derived = poolwarden_protocol::host_ifname(&request.container_id, &request.ifname);
        let host_ifname = endpoint
            .as_ref()
            .map(|(e, _)| e.host_ifname.clone())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| if request.host_ifname == derived { derived } else { String::new() });
        let found =
            if host_ifname.is_empty() { None } else { self.routes.ifindex(&host_ifname).await.map_err(route_reply)? };
        let ifindex = match found {
            // Only a pod's veth of that name is touched.
            Some(index) => match self.routes.pod_veth(index).await.map_err(route_reply)? {
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
        if let Some((recorded, _)) = &endpoint
            && recorded.bridge_port_index != 0
        {
            let now = crate::dataplane::enforcement::interface_name(recorded.bridge_port_index);
            if now.is_none_or(|name| name == recorded.bridge_port) {
                self.forget_enforcement(recorded.bridge_port_index);
            }
        }
        if let Some((endpoint, revision)) = endpoint {
            if let Some(ifindex) = ifindex {
                for ip in &endpoint.ips {
                    self.routes.remove(&OwnedRoute::Endpoint(*ip, ifindex)).await.map_err(route_reply)?;
                }
            }
            let mut txn = Txn::new().delete(&key, revision);
            for ip in &endpoint.ips {
                txn = txn.remove(keys::borrowed(*ip));
            }
            let _ = self.store.txn(txn).await.map_err(store_reply)?;
        }
        if let Some(index) = ifindex {
            // Deleting a device makes the kernel wait for an RCU grace period; retired links are deleted
            // together, shortly after, by the reaper, so neither this DEL nor the next waits for it.
            if let Some(enforcement) = &self.enforcement {
                // The entry goes now (the interface is going down: fail closed); the filter goes with it.
                let mut enforcement = enforcement.lock().unwrap_or_else(|p| p.into_inner());
                enforcement
                    .release(index)
                    .map_err(|e| reply(code::IO_FAILURE, "releasing enforcement failed", e.to_string()))?;
            }
            self.routes.retire_link(index).await.map_err(route_reply)?;
            self.retired.notify_one();
        }
        for ip in &released {
            info!(address = %ip, "released");
        }
        // A block emptied by this DEL goes back now if the grace period allows it (it is 0 in some setups);
        // otherwise the periodic maintenance gives it back later.
        for block in self.allocator.release_empty_blocks(&self.node.name).await.map_err(alloc_reply)? {
            self.routes.remove(&OwnedRoute::Blackhole(block)).await.map_err(route_reply)?;
            info!(%block, "released empty block");
        }
        Ok(released)
    }

    /// IPAM-only CHECK: the attachment's allocation exists and holds exactly the addresses its result gave.
    async fn check(&self, request: CheckRequest) -> Result<(), ErrorReply> {
        check_attachment(&request.container_id, &request.ifname)?;
        let handle = ipam::handle_for(&request.container_id, &request.ifname);
        let held: BTreeSet<IpAddr> = self
            .allocator
            .addresses_of(&handle)
            .await
            .map_err(alloc_reply)?
            .unwrap_or_default()
            .into_iter()
            .map(|a| a.ip)
            .collect();
        let reported: BTreeSet<IpAddr> = request.ips.iter().copied().collect();
        if held.is_empty() {
            return Err(reply(
                code::UNKNOWN_CONTAINER,
                format!("container {} interface {} holds no address", request.container_id, request.ifname),
                "its ADD was never made here, or its addresses were released",
            ));
        }
        if held != reported {
            return Err(reply(
                code::INTERFACE_SETUP,
                format!("container {} interface {} holds other addresses", request.container_id, request.ifname),
                format!("the result says {reported:?}; the datastore says {held:?}"),
            ));
        }
        Ok(())
    }

    /// CNI STATUS: whether an ADD can get an address here. Reads the pools and this node's room index; only
    /// when no block of this node has room (its next ADD claims a block) does it look at the whole store.
    pub async fn status(&self) -> Result<(), ErrorReply> {
        let pools: Vec<crate::resources::IpPool> = self.pools().await.map_err(store_reply)?;
        // Without the API server's labels, the given ones: STATUS answers about addresses, not the API.
        let node = self.directory.node(&self.node).await.unwrap_or_else(|_| self.node.clone());
        let usable: Vec<_> =
            pools.iter().filter(|p| !p.spec.disabled && p.spec.node_selector.matches(&node.labels)).collect();
        if usable.is_empty() {
            return Err(reply(
                code::LIMITED_CONNECTIVITY_NO_ADDRESSES,
                format!("no pool may be used on node {}", self.node.name),
                "apply an IPPool whose nodeSelector matches this node",
            ));
        }
        let prefix = keys::node_room(&self.node.name);
        let (room, _) = self.store.list_keys(&prefix).await.map_err(store_reply)?;
        let roomy = room
            .iter()
            .filter_map(|k| keys::parse_cidr_segment(k.strip_prefix(&prefix)?))
            .any(|cidr| usable.iter().any(|p| p.cidr().contains(&cidr)));
        if roomy {
            return Ok(());
        }
        let snapshot = self.allocator.snapshot().await.map_err(alloc_reply)?;
        let free: u128 = usable.iter().map(|p| p.size().saturating_sub(snapshot.used_in(p))).sum();
        if free == 0 {
            let names: Vec<&str> = usable.iter().map(|p| p.name()).collect();
            return Err(reply(
                code::LIMITED_CONNECTIVITY_NO_ADDRESSES,
                format!("the pools node {} may use are exhausted: {}", self.node.name, names.join(", ")),
                "free addresses or add a pool",
            ));
        }
        Ok(())
    }

    /// The pools, without their revisions.
    async fn pools(&self) -> Result<Vec<crate::resources::IpPool>, StoreError> {
        Ok(Catalog::new(Arc::clone(&self.store)).pools().await?.into_iter().map(|(p, _)| p).collect())
    }

    /// Every endpoint recorded for this node.
    pub async fn endpoints(&self) -> Result<Vec<Endpoint>, StoreError> {
        let (kvs, _) = self.store.list(&keys::node_endpoints(&self.node.name)).await?;
        kvs.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
    }

    /// CNI GC for one network: release its attachments on this node that the runtime no longer lists, but
    /// not those of other networks, nor one younger than [`GC_GRACE`] (the runtime's list may predate its
    /// ADD); no ADD runs meanwhile.
    async fn gc(&self, request: GcRequest) -> Result<Vec<IpAddr>, ErrorReply> {
        let _no_adds = self.adds.write().await;
        let valid: BTreeSet<(String, String)> =
            request.valid_attachments.into_iter().map(|a| (a.container_id, a.ifname)).collect();
        let mut released = Vec::new();
        let now = unix_now();
        for endpoint in self.endpoints().await.map_err(store_reply)? {
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

    /// Make the node's routes match the store: a blackhole per block affine to this node, a route per local
    /// endpoint, nothing else with our protocol. Endpoints whose host interface is gone are reported.
    pub async fn reconcile(&self) -> Result<(usize, usize), ErrorReply> {
        let _alone = self.wiring.write().await;
        let mut desired = BTreeSet::new();
        let endpoints = self.endpoints().await.map_err(store_reply)?;
        let stored: Vec<crate::resources::IpPool> = self.pools().await.map_err(store_reply)?;
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
        let (affinities, _) = self.store.list(&keys::node_affinities(&self.node.name)).await.map_err(store_reply)?;
        for kv in &affinities {
            let affinity: ipam::Affinity = decode(&kv.key, &kv.value).map_err(store_reply)?;
            // Blocks serving IPAM-only endpoints get no blackhole: see `wire`.
            if !ipam_only.iter().any(|ip| affinity.cidr.contains(ip)) {
                desired.insert(OwnedRoute::Blackhole(affinity.cidr));
            }
        }
        let mut enforced = BTreeSet::new();
        for endpoint in endpoints {
            if !endpoint.bridge_port.is_empty() {
                // IPAM-only, enforced on its bridge port: no route of ours.
                if let Some(port) = self.routes.ifindex(&endpoint.bridge_port).await.map_err(route_reply)? {
                    self.enforce_endpoint(&endpoint, port, &pools)?;
                    enforced.insert(port);
                }
                continue;
            }
            if endpoint.host_ifname.is_empty() {
                continue;
            }
            match self.routes.ifindex(&endpoint.host_ifname).await.map_err(route_reply)? {
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
                .map_err(|e| reply(code::IO_FAILURE, "reading enforcement entries failed", e.to_string()))?;
            for stale in entered.into_iter().filter(|i| !enforced.contains(i)) {
                // An interface that still exists keeps its entry: a pod may be behind it whose record this
                // store lost (a restore, a collection by mistake), and cutting it off fixes nothing. Only the
                // entries of interfaces that are gone go (with an unknown interface list, none do).
                if interfaces.as_ref().is_none_or(|existing| existing.contains(&stale)) {
                    warn!(ifindex = stale, "an enforced interface has no endpoint record; its entry stays");
                    continue;
                }
                info!(ifindex = stale, "removing the enforcement entry of an interface that is gone");
                enforcement
                    .release(stale)
                    .map_err(|e| reply(code::IO_FAILURE, "removing stale enforcement failed", e.to_string()))?;
            }
            enforcement
                .block_decap_ports(ports)
                .map_err(|e| reply(code::IO_FAILURE, "blocking decapsulating ports failed", e.to_string()))?;
            if let Some(interfaces) = &interfaces {
                enforcement.remove_defunct_tcx_pins(interfaces);
            }
            // Every endpoint's link has moved over to this build by now; what older builds pinned can go.
            if let Err(e) = enforcement.remove_older_versions() {
                warn!(error = %e, "removing an older build's pinned objects failed");
            }
        }
        desired.extend(self.remote_routes(&stored).await?);
        let (added, removed) = self.routes.reconcile(&desired).await.map_err(route_reply)?;
        self.metrics.set_blocks_owned(affinities.len());
        Ok((added, removed))
    }

    /// The routes to the blocks and borrowed addresses other registered nodes hold, with the overlay device
    /// made (and its peers entered) when a pool's `vxlanMode` needs it, and removed when none does.
    async fn remote_routes(&self, pools: &[crate::resources::IpPool]) -> Result<BTreeSet<OwnedRoute>, ErrorReply> {
        // Followed by watches (see `Membership`): a reconcile at rest reads nothing of the other nodes.
        let routing = self.membership.routing(self.store.as_ref()).await.map_err(store_reply)?;
        let membership::Routing { nodes, affinities, borrowed } = routing;
        let overlay = crate::dataplane::overlay::Overlay::new(self.routes.clone());
        if nodes.keys().all(|name| *name == self.node.name) {
            overlay.remove().await.map_err(route_reply)?;
            return Ok(BTreeSet::new());
        }
        let subnets = self.routes.global_addresses().await.map_err(route_reply)?;
        let wanted = cluster::remote_routes(&self.node.name, &nodes, &affinities, &borrowed, pools, &subnets);

        let overlay_index = if wanted.iter().any(|r| r.overlay) {
            let local = nodes
                .get(&self.node.name)
                .and_then(|n| n.addresses.iter().find_map(|a| if let IpAddr::V4(v4) = a { Some(*v4) } else { None }))
                .ok_or_else(|| {
                    reply(
                        code::IO_FAILURE,
                        "a pool's vxlanMode needs the overlay, but this node has no IPv4 address to tunnel from",
                        "give --node-address",
                    )
                })?;
            let index = overlay.ensure(&self.node.name, local).await.map_err(route_reply)?;
            let peers: BTreeSet<(String, std::net::Ipv4Addr)> = wanted
                .iter()
                .filter(|r| r.overlay)
                .filter_map(|r| match r.via {
                    IpAddr::V4(via) => Some((r.node.clone(), via)),
                    IpAddr::V6(_) => None,
                })
                .collect();
            overlay.set_peers(index, &peers).await.map_err(route_reply)?;
            Some(index)
        } else {
            overlay.remove().await.map_err(route_reply)?;
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

    /// Log the packets enforcement drops, as the kernel reports them (at most a hundred a second per CPU;
    /// the counters count them all).
    pub async fn log_drops(&self) {
        let Some(ring) = self.drop_reports.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        #[expect(unsafe_code, reason = "tokio's AsyncFd::register requires the fd to stay open while registered")]
        // SAFETY: the ring buffer owns its fd and is moved into the AsyncFd, which deregisters it before the
        // ring buffer (and the fd) is dropped.
        let registered = unsafe { tokio::io::unix::AsyncFd::register(ring) };
        let Ok(mut ring) = registered else { return };
        loop {
            let Ok(mut ready) = ring.readable_mut().await else { return };
            let mut events = Vec::new();
            while let Some(item) = ready.get_inner_mut().next() {
                events.extend(crate::dataplane::enforcement::decode_drop(&item));
            }
            ready.clear_ready();
            let named: Vec<_> = match &self.enforcement {
                Some(enforcement) => {
                    let enforcement = enforcement.lock().unwrap_or_else(|p| p.into_inner());
                    events.into_iter().map(|e| (enforcement.pool_name(e.pool_id).to_string(), e)).collect()
                }
                None => Vec::new(),
            };
            for (pool, event) in named {
                let source =
                    crate::dataplane::enforcement::drop_source(&event).map(|s| s.to_string()).unwrap_or_default();
                warn!(
                    ifindex = event.ifindex,
                    reason = poolwarden_ebpf_common::reason::name(event.reason),
                    %source,
                    pool,
                    "enforcement dropped a packet"
                );
            }
        }
    }

    /// Delete retired host interfaces in batches, forever: each wake-up waits a moment so that the DELs of a
    /// burst share one deletion.
    pub async fn reap_retired_links(&self) {
        loop {
            if let Err(e) = self.routes.reap().await {
                warn!(error = %e, "deleting retired host interfaces failed");
            }
            self.retired.notified().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Give back empty blocks past their grace period, then reconcile (their blackholes go with them).
    pub async fn maintain(&self) -> Result<(), ErrorReply> {
        let released = self.allocator.release_empty_blocks(&self.node.name).await.map_err(alloc_reply)?;
        for block in &released {
            info!(%block, "released empty block");
        }
        self.reconcile().await.map(|_| ())
    }

    /// Refresh the pool gauges from the pools and this node's blocks, and the enforcement counters from the
    /// kernel.
    pub async fn refresh_pool_metrics(&self) {
        // The pools and this node's blocks, not the whole store (see `metrics`).
        let Ok(pools) = self.pools().await else { return };
        let mine = BTreeSet::from([self.node.name.clone()]);
        let Ok((_, blocks)) = self.allocator.view_of(&mine, []).await else { return };
        self.metrics.set_pools(&pools, &blocks);
        if let Some(enforcement) = &self.enforcement {
            let counts = enforcement.lock().unwrap_or_else(|p| p.into_inner()).counts();
            if let Ok(counts) = counts {
                self.metrics.set_enforcement(counts);
            }
        }
    }
}

/// How often the agent gives back empty blocks and re-checks its routes even without a change in the store.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(30);
