//! The node agent: serves the CNI plugin on a Unix socket, allocates through the datastore, programs the
//! node's routes, and keeps them reconciled with the store across restarts.
//!
//! [`Agent`] holds the shared state and answers requests; what it does lives in three parts, each with its own
//! error type: wiring one attachment (`wiring`: ADD, DEL, CHECK, a CNI GC; [`WiringError`]), node
//! reconciliation (`reconcile`: routes, overlay, NAT, enforcement entries; [`ReconcileError`]) and garbage
//! collection (`collect`; [`CollectError`]). `reply` is the one place errors become CNI replies; `membership`
//! follows what the other nodes hold, `server` runs the process.

mod collect;
pub mod install;
pub mod membership;
pub mod metrics;
mod reconcile;
mod reply;
pub mod server;
mod wiring;

pub use self::{collect::CollectError, reconcile::ReconcileError, reply::StatusError, wiring::WiringError};

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use poolwarden_protocol::{ErrorReply, Request, Response};
use serde::{Deserialize, Serialize};
use tracing::{Instrument, info_span, warn};

use self::membership::Membership;

use crate::{
    allocator::{
        AllocError,
        single::{BlockAllocator, Stored},
    },
    catalog::{Catalog, encode},
    cluster,
    dataplane::{
        enforcement::{Enforcement, EnforcementError},
        routes::{RouteError, Routes},
    },
    directory::{Directory, StandaloneDirectory},
    ipam::NodeInfo,
    store::{Store, StoreError, Txn, keys},
};

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

/// Errors that keep the agent from starting or registering.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Route programming could not be set up.
    #[error(transparent)]
    Routes(#[from] RouteError),
    /// The enforcement program could not be loaded.
    #[error(transparent)]
    Enforcement(#[from] EnforcementError),
    /// The node's registration could not be written.
    #[error("the datastore failed: {0}")]
    Store(#[from] StoreError),
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

/// The attribute names an [`Endpoint`] is kept under in a block object's allocation (the single-object
/// allocator of `docs/allocator-single-object.md`), beside the allocation's handle, node, namespace and pod.
/// Empty values are left out: the common record is about 250 bytes, within the allocator's limit.
mod attribute {
    pub const CONTAINER_ID: &str = "containerID";
    pub const IFNAME: &str = "ifname";
    pub const HOST_IFNAME: &str = "hostIfname";
    pub const NETNS: &str = "netns";
    pub const POD_UID: &str = "podUID";
    pub const HOOK: &str = "hook";
    pub const BRIDGE_PORT: &str = "bridgePort";
    pub const BRIDGE_PORT_INDEX: &str = "bridgePortIndex";
    pub const NETWORK: &str = "network";
    pub const ADDED_AT: &str = "addedAt";
}

impl Endpoint {
    /// What an allocation of this endpoint carries as its attributes (its namespace, pod and addresses are
    /// the allocation's own).
    pub fn attributes(&self) -> std::collections::BTreeMap<String, String> {
        let hook = serde_json::to_value(self.hook).ok().and_then(|v| v.as_str().map(str::to_string));
        let index = (self.bridge_port_index != 0).then(|| self.bridge_port_index.to_string());
        [
            (attribute::CONTAINER_ID, Some(self.container_id.clone())),
            (attribute::IFNAME, Some(self.ifname.clone())),
            (attribute::HOST_IFNAME, Some(self.host_ifname.clone())),
            (attribute::NETNS, Some(self.netns.clone())),
            (attribute::POD_UID, Some(self.pod_uid.clone())),
            (attribute::HOOK, hook.filter(|_| self.hook != poolwarden_protocol::EnforcementHook::default())),
            (attribute::BRIDGE_PORT, Some(self.bridge_port.clone())),
            (attribute::BRIDGE_PORT_INDEX, index),
            (attribute::NETWORK, Some(self.network.clone())),
            (attribute::ADDED_AT, (self.added_at != 0).then(|| self.added_at.to_string())),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.filter(|v| !v.is_empty()).map(|v| (name.to_string(), v)))
        .collect()
    }

    /// Whether this endpoint can be the attachment `handle` names, as an ADD would have made it: its handle is
    /// its container's and interface's, and its host interface (if any) the one the plugin names for them.
    /// What a datastore says is checked before the agent acts on it (attaches a program, removes a route):
    /// a record naming the node's uplink as a pod's host side is refused.
    pub fn check_names(&self, handle: &str) -> Result<(), String> {
        let own = crate::ipam::handle_for(&self.container_id, &self.ifname);
        if handle != own {
            return Err(format!(
                "the endpoint of container {} interface {} is handle {own}, not {handle}",
                self.container_id, self.ifname
            ));
        }
        let host = poolwarden_protocol::host_ifname(&self.container_id, &self.ifname);
        if !self.host_ifname.is_empty() && self.host_ifname != host {
            return Err(format!(
                "host interface {:?} is not the one of container {} interface {} ({host})",
                self.host_ifname, self.container_id, self.ifname
            ));
        }
        Ok(())
    }

    /// The endpoint an allocation's attributes describe, with its namespace, pod and addresses; an error
    /// names the attribute that does not read.
    pub fn from_attributes(
        namespace: &str,
        pod: &str,
        ips: Vec<IpAddr>,
        attributes: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let text = |name: &str| attributes.get(name).cloned().unwrap_or_default();
        let number = |name: &str| -> Result<u64, String> {
            attributes.get(name).map_or(Ok(0), |v| v.parse().map_err(|e| format!("attribute {name}={v:?}: {e}")))
        };
        let hook = match attributes.get(attribute::HOOK) {
            None => poolwarden_protocol::EnforcementHook::default(),
            Some(v) => serde_json::from_value(serde_json::Value::String(v.clone()))
                .map_err(|e| format!("attribute {}={v:?}: {e}", attribute::HOOK))?,
        };
        Ok(Self {
            container_id: text(attribute::CONTAINER_ID),
            ifname: text(attribute::IFNAME),
            host_ifname: text(attribute::HOST_IFNAME),
            netns: text(attribute::NETNS),
            namespace: namespace.to_string(),
            pod: pod.to_string(),
            pod_uid: text(attribute::POD_UID),
            ips,
            hook,
            bridge_port: text(attribute::BRIDGE_PORT),
            bridge_port_index: u32::try_from(number(attribute::BRIDGE_PORT_INDEX)?)
                .map_err(|e| format!("attribute {}: {e}", attribute::BRIDGE_PORT_INDEX))?,
            network: text(attribute::NETWORK),
            added_at: number(attribute::ADDED_AT)?,
        })
    }
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
    /// The datastore: etcd or the embedded store, or the Kubernetes API server.
    datastore: membership::Source,
    /// The single-object allocator on the datastore's block objects (`docs/allocator-single-object.md`):
    /// the blocks hold the allocations and, in each allocation's attributes, the endpoint its ADD wired.
    blocks: BlockAllocator,
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
    /// Woken when the pools change, on the Kubernetes datastore (a key-value store's pools are watched).
    pool_changes: Option<Arc<tokio::sync::Notify>>,
}

impl Agent {
    /// An agent for `node` on `store` (etcd or the embedded store), programming routes in this process's
    /// network namespace.
    pub fn new(
        node: NodeInfo,
        store: Arc<dyn Store>,
        mode: EnforcementMode,
        bpf_dir: &std::path::Path,
        node_addresses: Vec<IpAddr>,
        lifetimes: Lifetimes,
    ) -> Result<Self, AgentError> {
        let blocks = BlockAllocator::of_store(Arc::clone(&store));
        let directory = Arc::new(StandaloneDirectory::new(Arc::clone(&store)));
        Self::build(
            node,
            membership::Source::KeyValue(store),
            blocks,
            directory,
            mode,
            bpf_dir,
            node_addresses,
            lifetimes,
        )
    }

    /// An agent for `node` on the Kubernetes datastore: blocks as IPAMBlock resources through `client`,
    /// pools from `pools` (the IPPool resources as judged), nodes from the Node objects, namespaces and pods
    /// from `directory`.
    #[expect(clippy::too_many_arguments, reason = "each is one independent part of the agent")]
    pub fn on_kubernetes(
        node: NodeInfo,
        client: kube::Client,
        pools: Arc<dyn crate::allocator::single::PoolSource>,
        directory: Arc<dyn Directory>,
        mode: EnforcementMode,
        bpf_dir: &std::path::Path,
        node_addresses: Vec<IpAddr>,
        lifetimes: Lifetimes,
    ) -> Result<Self, AgentError> {
        let objects = Arc::new(crate::objects::kubernetes::KubeObjects::new(client.clone()));
        let blocks = BlockAllocator::new(objects, pools);
        let source = membership::Source::Kubernetes(client);
        Self::build(node, source, blocks, directory, mode, bpf_dir, node_addresses, lifetimes)
    }

    #[expect(clippy::too_many_arguments, reason = "each is one independent part of the agent")]
    fn build(
        node: NodeInfo,
        datastore: membership::Source,
        blocks: BlockAllocator,
        directory: Arc<dyn Directory>,
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
            blocks,
            routes: Routes::connect()?,
            wiring: tokio::sync::RwLock::new(()),
            retired: tokio::sync::Notify::new(),
            metrics: metrics::Metrics::default(),
            node,
            node_addresses,
            lifetimes,
            suspects: std::sync::Mutex::new(BTreeMap::new()),
            adds: tokio::sync::RwLock::new(()),
            directory,
            nat: crate::dataplane::nat::Nat::default(),
            membership: Arc::new(Membership::new(datastore.clone())),
            datastore,
            pool_changes: None,
        })
    }

    /// Be woken by `changes` when the pools change (the Kubernetes datastore's pool resources).
    pub fn with_pool_changes(mut self, changes: Arc<tokio::sync::Notify>) -> Self {
        self.pool_changes = Some(changes);
        self
    }

    /// What wakes a reconcile when the pools change, if not a watch of the key-value store.
    pub fn pool_changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.pool_changes.clone()
    }

    /// Whether the datastore answers: a revision read; on Kubernetes, without asking anything (readiness is
    /// probed every few seconds on every node), whether the Node and IPAMBlock objects are followed: listed,
    /// and their watches running (not while listing or watching them fails, as it does when the API server
    /// is unreachable or this agent may not read them).
    pub async fn datastore_answers(&self) -> Result<(), String> {
        match &self.datastore {
            membership::Source::KeyValue(store) => store.revision().await.map(drop).map_err(|e| e.to_string()),
            membership::Source::Kubernetes(_) if self.membership.is_followed() => Ok(()),
            membership::Source::Kubernetes(_) => Err("the Node and IPAMBlock objects are not followed: listing or \
                                                      watching them fails (is the API server reachable, and may \
                                                      this agent list and watch nodes and ipamblocks?)"
                .into()),
        }
    }

    /// Have enforcement count the packets it passes: the program attached from now on is the one that counts
    /// them. Set before the first reconcile, which puts this agent's program on every enforced interface.
    pub fn counting_passed_packets(self, on: bool) -> Self {
        if let Some(enforcement) = &self.enforcement {
            enforcement.lock().unwrap_or_else(|p| p.into_inner()).count_passed_packets(on);
        }
        self
    }

    /// Take namespaces, pods and node labels from `directory` (the Kubernetes API) instead of the datastore.
    pub fn with_directory(mut self, directory: Arc<dyn Directory>) -> Self {
        self.directory = directory;
        self
    }

    /// Follow the nodes' registrations with watches from now on, so that collection passes do not list them.
    pub fn follow_membership(&self) {
        tokio::spawn(Arc::clone(&self.membership).follow());
    }

    /// Wait until what routes are made of changes (see [`Membership::changed`]).
    pub async fn routing_changed(&self) {
        self.membership.changed().await;
    }

    /// Whether the nodes' registrations are being followed (see [`Agent::follow_membership`]).
    pub fn membership_followed(&self) -> bool {
        self.membership.is_followed()
    }

    /// Register this node (`nodes/<name>`: its addresses and labels) for as long as the agent runs, so other
    /// nodes route this node's blocks to it. Addresses not given are detected: the first global IPv4 and
    /// IPv6 address of the node's namespace.
    pub async fn register(&self) -> Result<cluster::NodeRecord, AgentError> {
        let mut addresses = self.node_addresses.clone();
        if addresses.is_empty() {
            let found: Vec<IpAddr> = self.routes.global_addresses().await?.iter().map(IpNet::addr).collect();
            addresses.extend(found.iter().find(|a| a.is_ipv4()));
            addresses.extend(found.iter().find(|a| a.is_ipv6()));
        }
        let record = cluster::NodeRecord { name: self.node.name.clone(), addresses, labels: self.node.labels.clone() };
        // On Kubernetes the Node object is the registration: its kubelet keeps it, other nodes route by it.
        let membership::Source::KeyValue(store) = &self.datastore else { return Ok(record) };
        store.put_leased(&keys::node(&self.node.name), encode(&record), self.lifetimes.registration_ttl).await?;
        // Kept without a lease (the other nodes route by it while this agent is down), and a node that
        // registers again is no longer decommissioned.
        let txn = Txn::new()
            .put(keys::node_addresses(&self.node.name), encode(&record))
            .remove(keys::decommissioned(&self.node.name));
        store.txn(txn).await?;
        Ok(record)
    }

    /// The node this agent serves.
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// The key-value datastore (etcd or the embedded store); none on the Kubernetes datastore.
    pub fn store(&self) -> Option<&Arc<dyn Store>> {
        match &self.datastore {
            membership::Source::KeyValue(store) => Some(store),
            membership::Source::Kubernetes(_) => None,
        }
    }

    /// The Kubernetes API server, when it is the datastore.
    pub fn kubernetes(&self) -> Option<&kube::Client> {
        match &self.datastore {
            membership::Source::KeyValue(_) => None,
            membership::Source::Kubernetes(client) => Some(client),
        }
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
                ("add", span, added.map(|ips| Response::Added { ips }).map_err(ErrorReply::from))
            }
            Request::Del(del) => {
                let span = info_span!("del", container = %del.container_id, ifname = %del.ifname);
                let deleted = self.del(del).instrument(span.clone()).await;
                ("del", span, deleted.map(|released| Response::Deleted { released }).map_err(ErrorReply::from))
            }
            Request::Status => (
                "status",
                info_span!("status"),
                self.status().await.map(|()| Response::Ready).map_err(ErrorReply::from),
            ),
            Request::Gc(gc) => {
                let span = info_span!("gc");
                let collected = self.gc(gc).instrument(span.clone()).await;
                ("gc", span, collected.map(|released| Response::Collected { released }).map_err(ErrorReply::from))
            }
            Request::Cli(cli) => ("cli", info_span!("cli"), Ok(self.command(cli).await)),
            Request::Check(check) => {
                let span = info_span!("check", container = %check.container_id, ifname = %check.ifname);
                let checked = self.check(check).instrument(span.clone()).await;
                ("check", span, checked.map(|()| Response::Checked).map_err(ErrorReply::from))
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
        let Some(store) = self.store() else {
            let stderr = "this agent's datastore is the Kubernetes API: run the command with --datastore kubernetes, \
                          or read the IPPool and IPAMBlock resources with kubectl\n";
            return Response::CliOutput { stdout: String::new(), stderr: stderr.into(), exit: 1 };
        };
        let mut stdout = String::new();
        match crate::commands::execute(
            cli,
            crate::commands::Held::key_value(Arc::clone(store)),
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

    /// CNI STATUS: whether an ADD can get an address here. Reads the pools and this node's room index; only
    /// when no block of this node has room (its next ADD claims a block) does it look at the whole store.
    pub async fn status(&self) -> Result<(), StatusError> {
        // The pools and the configuration in one read.
        let crate::allocator::Loaded { pools, config } = self.blocks.load().await?;
        // Without the API server's labels, the given ones: STATUS answers about addresses, not the API.
        let node = self.directory.node(&self.node).await.unwrap_or_else(|_| self.node.clone());
        let usable: Vec<_> =
            pools.iter().filter(|p| !p.spec.disabled && p.spec.node_selector.matches(&node.labels)).collect();
        if usable.is_empty() {
            return Err(StatusError::NoPool { node: self.node.name.clone() });
        }
        let now = unix_now();
        let (owned, _) = self.blocks.node_blocks(&self.node.name).await?;
        let roomy = owned.iter().map(|s| &s.block).any(|block| {
            block.has_available(now, config.reuse_cooldown_seconds)
                && usable.iter().any(|p| p.cidr().contains(&block.cidr))
        });
        if roomy {
            return Ok(());
        }
        let snapshot = self.blocks.snapshot().await?;
        let free: u128 = usable.iter().map(|p| p.size().saturating_sub(snapshot.used_in(p))).sum();
        if free == 0 {
            let pools = usable.iter().map(|p| p.name().to_string()).collect();
            return Err(StatusError::Exhausted { node: self.node.name.clone(), pools });
        }
        Ok(())
    }

    /// The pools, without their revisions.
    pub(crate) async fn pools(&self) -> Result<Vec<crate::resources::IpPool>, StoreError> {
        match &self.datastore {
            membership::Source::KeyValue(store) => {
                Ok(Catalog::new(Arc::clone(store)).pools().await?.into_iter().map(|(p, _)| p).collect())
            }
            // The pools judged usable, as every allocation sees them.
            membership::Source::Kubernetes(_) => match self.blocks.load().await {
                Ok(loaded) => Ok(loaded.pools),
                Err(AllocError::Store(e)) => Err(e),
                Err(other) => {
                    Err(StoreError::Backend { operation: "loading the pools".into(), message: other.to_string() })
                }
            },
        }
    }

    /// Every endpoint wired on this node, as its allocations' attributes hold it (from the node's view of its
    /// blocks). An allocation whose attributes do not make an endpoint of its handle (written by something
    /// else than an ADD, or damaged) is logged and left out: nothing is done to an interface on its word, and
    /// the collector judges its address as one no endpoint was wired for.
    pub async fn endpoints(&self) -> Result<Vec<Endpoint>, AllocError> {
        let attachments = self.blocks.attachments(&self.node.name).await?;
        Ok(attachments.iter().filter_map(|a| self.endpoint_of(a)).collect())
    }

    /// The endpoint an attachment's attributes describe, if they describe one of its handle.
    fn endpoint_of(&self, attachment: &crate::allocator::single::Attachment) -> Option<Endpoint> {
        let ips = attachment.addresses.iter().map(|a| a.ip).collect();
        let namespace = attachment.namespace.as_deref().unwrap_or_default();
        let pod = attachment.pod.as_deref().unwrap_or_default();
        let endpoint = Endpoint::from_attributes(namespace, pod, ips, &attachment.attributes)
            .and_then(|e| e.check_names(&attachment.handle).map(|()| e));
        match endpoint {
            Ok(endpoint) => Some(endpoint),
            Err(e) => {
                warn!(handle = %attachment.handle, error = %e, "an allocation of this node does not describe an endpoint; left to the collector");
                None
            }
        }
    }

    /// This node's endpoint for `handle`, if it has one.
    pub async fn endpoint(&self, handle: &str) -> Result<Option<Endpoint>, AllocError> {
        let attachment = self.blocks.attachment(&self.node.name, handle).await?;
        Ok(attachment.as_ref().and_then(|a| self.endpoint_of(a)))
    }

    /// The blocks this node owns, from its view.
    async fn owned_blocks(&self) -> Result<Vec<Stored>, AllocError> {
        Ok(self.blocks.node_blocks(&self.node.name).await?.0)
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

    /// Refresh the pool gauges from the pools and this node's blocks, and the enforcement counters from the
    /// kernel.
    pub async fn refresh_pool_metrics(&self) {
        // The pools and this node's blocks, not the whole store (see `metrics`).
        let Ok(pools) = self.pools().await else { return };
        let Ok(owned) = self.owned_blocks().await else { return };
        let blocks: Vec<crate::ipam::Block> = owned.into_iter().map(|s| s.block).collect();
        self.metrics.set_pools(&pools, &blocks);
        if let Some(enforcement) = &self.enforcement {
            let enforcement = enforcement.lock().unwrap_or_else(|p| p.into_inner());
            if let Ok(mut counts) = enforcement.counts() {
                // Passes an earlier run counted stay pinned; they are exported only while counted.
                if !enforcement.counts_passed_packets() {
                    counts.retain(|(_, why, _)| *why != crate::dataplane::enforcement::reason::PASSED);
                }
                self.metrics.set_enforcement(counts);
            }
        }
    }
}

/// How often the agent gives back empty blocks and re-checks its routes even without a change in the store.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(30);
