//! The `poolwarden` commands: their arguments (clap) and what they do, writing their output to a string so
//! the same code serves the command line and, while an agent holds the datastore, the agent's socket.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    sync::Arc,
};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    allocator::{AssignRequest, single::BlockAllocator},
    catalog::Catalog,
    cli::{self, Format},
    directory::{self, Directory, Source},
    firewall::{self, ExportFormat},
    ipam::{self, NodeInfo, PodInfo, Requested, check},
    resources,
    store::{self, Store},
};

/// Any failure of a command, shown to the user as `error: ...`.
pub type CommandError = Box<dyn std::error::Error + Send + Sync>;

macro_rules! w {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

macro_rules! fail {
    ($($arg:tt)*) => {
        return Err(format!($($arg)*).into())
    };
}

/// The command line.
#[derive(Parser)]
#[command(name = "poolwarden", version, about = "Per-namespace IP address management with kernel enforcement")]
pub struct Cli {
    /// Where IPAM state lives: embedded:PATH (a single local file), etcd:URL[,URL...] (a cluster) or
    /// kubernetes (custom resources of the API server, with pools from the IPPool resources; the agent).
    #[arg(long, global = true, env = "POOLWARDEN_DATASTORE", default_value = store::DEFAULT_DATASTORE)]
    pub datastore: String,
    /// The CA certificate that signed the etcd members' certificates (PEM).
    #[arg(long, global = true, env = "POOLWARDEN_ETCD_CA")]
    pub etcd_ca: Option<std::path::PathBuf>,
    /// This client's certificate for etcd (PEM), with --etcd-key.
    #[arg(long, global = true, env = "POOLWARDEN_ETCD_CERT")]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// This client's private key for etcd (PEM), with --etcd-cert.
    #[arg(long, global = true, env = "POOLWARDEN_ETCD_KEY")]
    pub etcd_key: Option<std::path::PathBuf>,
    /// Where under etcd's key space poolwarden keeps its keys.
    #[arg(long, global = true, env = "POOLWARDEN_ETCD_PREFIX", default_value = store::etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// The kubeconfig for reaching the Kubernetes API server (default: in-cluster config, then $KUBECONFIG
    /// or ~/.kube/config). Used in Kubernetes mode, where namespaces come from the API server.
    #[arg(long, global = true, env = "POOLWARDEN_KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Where pools and the IPAM config are defined: `datastore` (written by `poolwarden apply`) or
    /// `kubernetes` (IPPool and IPAMConfig custom resources, copied into the datastore by the agents; `apply`
    /// and `delete pool` then write the resources). On `--datastore kubernetes` they are always the resources.
    #[arg(long, global = true, value_enum, env = "POOLWARDEN_POOL_SOURCE", default_value = "datastore")]
    pub pool_source: PoolSource,
    #[command(subcommand)]
    pub command: Command,
    /// The agent's socket, used when the datastore is held by a running agent.
    #[arg(long = "agent-socket", global = true, env = "POOLWARDEN_SOCKET", default_value = poolwarden_protocol::DEFAULT_SOCKET)]
    pub agent_socket: String,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the node agent: serve the CNI plugin, allocate, and program this node's routes.
    Agent {
        /// This node's name.
        #[arg(long, env = "NODENAME")]
        node: Option<String>,
        /// The socket the plugin talks to.
        #[arg(long, default_value = poolwarden_protocol::DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
        /// Node labels, k=v,... (for pools' nodeSelector).
        #[arg(long, value_delimiter = ',')]
        node_labels: Vec<String>,
        /// Where other nodes reach this one (IPv4 and/or IPv6, comma-separated); default: the first global
        /// address of each family.
        #[arg(long, env = "NODE_IP", value_delimiter = ',')]
        node_address: Vec<std::net::IpAddr>,
        /// How long an address (its container, its pod in Kubernetes mode, or its decommissioned node gone)
        /// or a gone node's block must look leaked before it is released: 15m, 90s, 1h, or seconds.
        #[arg(long, env = "POOLWARDEN_LEAK_GRACE_PERIOD", default_value = "15m")]
        leak_grace_period: DurationArg,
        /// How long this node's registration outlives the agent (its lease in etcd). An unregistered node
        /// claims no new block; the other nodes keep routing to its blocks and leave what it holds alone.
        #[arg(long, env = "POOLWARDEN_REGISTRATION_TTL", default_value = "30s")]
        registration_ttl: DurationArg,
        /// Without Kubernetes: how long another node's agent must have been gone (unregistered) before this
        /// agent takes its addresses and blocks back, unless the node was decommissioned (`poolwarden node
        /// decommission`). Long by design: an agent down for a while still has running pods; set it short
        /// only where a node that stops registering is known to be gone with its pods. In Kubernetes mode it
        /// is not used: a node is gone when its Node object is deleted, never before.
        #[arg(long, env = "POOLWARDEN_NODE_GONE_AFTER", default_value = "7d")]
        node_gone_after: DurationArg,
        /// Where Prometheus scrapes /metrics.
        #[arg(long, default_value = "127.0.0.1:9641")]
        metrics_addr: std::net::SocketAddr,
        /// Log format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// Source-address enforcement on every pod's host interface.
        #[arg(long, value_enum, env = "POOLWARDEN_ENFORCEMENT", default_value = "strict")]
        enforcement: crate::dataplane::enforcement::EnforcementMode,
        /// Count the packets enforcement passes, per pool (`poolwarden_passed_packets_total`), besides the
        /// drops, which are always counted. Off by default: counting makes the check of an allowed packet about
        /// a third dearer (the enforcement bench measures both).
        #[arg(long, env = "POOLWARDEN_COUNT_PASSED_PACKETS")]
        count_passed_packets: bool,
        /// Where (on bpffs) the enforcement maps and links are pinned; mounted at /sys/fs/bpf if needed.
        #[arg(long, default_value = crate::dataplane::enforcement::DEFAULT_PIN_DIR)]
        bpf_dir: std::path::PathBuf,
        /// Take namespaces, this node's pods and this node's labels and addresses from the Kubernetes API
        /// server (in-cluster config or --kubeconfig) instead of the datastore's standalone records.
        #[arg(long, env = "POOLWARDEN_KUBERNETES")]
        kubernetes: bool,
        /// How long to wait at start for the Kubernetes caches before serving with direct lookups.
        #[arg(long, default_value = "30s")]
        kube_sync_timeout: DurationArg,
    },
    /// Install the CNI plugin and its conflist on this node (the DaemonSet's init step), each file replaced
    /// atomically.
    InstallCni {
        /// The plugin binary to install.
        #[arg(long, default_value = "/usr/local/bin/poolwarden-cni")]
        plugin: std::path::PathBuf,
        /// Where kubelet looks for CNI plugins.
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: std::path::PathBuf,
        /// The network configuration list to install (its first plugin must be poolwarden-cni).
        #[arg(long)]
        conflist: std::path::PathBuf,
        /// Where kubelet reads network configurations.
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: std::path::PathBuf,
    },
    /// Remove what poolwarden put on this node: the conflist and the plugin, every route with its protocol,
    /// the overlay device, the NAT table and the pinned enforcement. Run after the agent has stopped.
    Uninstall {
        /// Where the plugin was installed.
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: std::path::PathBuf,
        /// Where the conflist was installed.
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: std::path::PathBuf,
        /// Where the agent pinned its enforcement.
        #[arg(long, default_value = crate::dataplane::enforcement::DEFAULT_PIN_DIR)]
        bpf_dir: std::path::PathBuf,
    },
    /// Create or update IPPool, IPAMConfig and Namespace documents (all or nothing).
    Apply {
        /// A file, a directory of .yaml/.yml/.json files, or - for standard input; may be repeated.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// List pools, blocks, affinities, handles, namespaces or the IPAM config.
    Get {
        /// What to list.
        what: Kind,
        /// Only this one (pools and namespaces).
        name: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Delete a pool.
    Delete {
        /// Only `pool` can be deleted.
        what: DeleteKind,
        /// The pool's name.
        name: String,
        /// Delete even though addresses are allocated from it; they stay allocated until released.
        #[arg(long)]
        force: bool,
    },
    /// Set (key=value) or remove (key-) annotations of a standalone namespace.
    Annotate {
        /// Only `namespace`.
        what: NamespaceKind,
        /// The namespace.
        name: String,
        /// key=value or key-.
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Set (key=value) or remove (key-) labels of a standalone namespace.
    Label {
        /// Only `namespace`.
        what: NamespaceKind,
        /// The namespace.
        name: String,
        /// key=value or key-.
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Source-address enforcement as pinned in the kernel (works while the agent is down).
    Enforcement {
        #[command(subcommand)]
        command: EnforcementCommand,
    },
    /// Inspect and repair address management.
    Ipam {
        #[command(subcommand)]
        command: IpamCommand,
    },
    /// Tell an external firewall which address ranges belong to whom.
    Firewall {
        #[command(subcommand)]
        command: FirewallCommand,
    },
    /// Nodes of the cluster.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Move the IPAM state between datastores.
    Datastore {
        #[command(subcommand)]
        command: DatastoreCommand,
    },
}

/// `poolwarden datastore ...`.
#[derive(Subcommand)]
pub enum DatastoreCommand {
    /// Copy pools, the IPAM configuration and every block (each allocation with its endpoint record) from an
    /// etcd or embedded datastore to the Kubernetes API (--kubeconfig), as IPPool, IPAMConfig and IPAMBlock
    /// resources, or back. Run it with every agent stopped: it refuses while an agent is registered, when the
    /// source fails `ipam check`, when the target already holds blocks or other pools of the same names, and
    /// when the source changes during the copy, keeping nothing then (into etcd or embedded, a copy that did
    /// not finish is marked so agents do not start on it, and run again it starts over).
    Migrate {
        /// Where to copy from: etcd:URL[,URL...], embedded:PATH or kubernetes (default: --datastore).
        #[arg(long)]
        from: Option<String>,
        /// Where to copy to: kubernetes, or etcd:URL[,URL...] or embedded:PATH.
        #[arg(long)]
        to: String,
    },
}

impl Command {
    /// Whether the command only reads the datastore (it must then never create one).
    pub fn read_only(&self) -> bool {
        match self {
            Self::Get { .. } | Self::Firewall { .. } | Self::Enforcement { .. } => true,
            Self::Ipam { command } => matches!(command, IpamCommand::Show { .. } | IpamCommand::Check),
            _ => false,
        }
    }
}

/// `poolwarden node ...`.
#[derive(Subcommand)]
pub enum NodeCommand {
    /// Say a node is gone for good, with its pods: the other agents take its addresses and blocks back after
    /// their leak grace period (instead of --node-gone-after) and stop routing to it. Refused while the
    /// node's agent is registered.
    Decommission {
        /// The node's name.
        name: String,
    },
}

/// `poolwarden firewall ...`.
#[derive(Subcommand)]
pub enum FirewallCommand {
    /// Per pool: its CIDR(s), the namespaces allowed to use it and assigned to it, whether NAT outgoing
    /// applies; for nftables and iptables (ipset) a ruleset of named sets `pool_<name>` ready to load.
    Export {
        /// Output format.
        #[arg(long, value_enum, default_value = "nftables")]
        format: ExportFormat,
        /// Only this pool.
        #[arg(long)]
        pool: Option<String>,
        /// Keep running and print the export again whenever it changes.
        #[arg(long)]
        watch: bool,
    },
}

/// A duration as typed: `15m`, `90s`, `1h`, `500ms`, or plain seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurationArg(pub std::time::Duration);

impl std::str::FromStr for DurationArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 15m, 90s or 1h"))?;
        let seconds = |s: u64| std::time::Duration::from_secs(s);
        Ok(Self(match unit {
            "" | "s" => seconds(n),
            "ms" => std::time::Duration::from_millis(n),
            "m" => seconds(n * 60),
            "h" => seconds(n * 3600),
            "d" => seconds(n * 86_400),
            _ => return Err(format!("{text:?}: unknown unit {unit:?}; use ms, s, m, h or d")),
        }))
    }
}

impl Cli {
    /// What an etcd datastore needs besides the endpoints `--datastore` names.
    pub fn etcd_options(&self) -> store::etcd::EtcdConfig {
        store::etcd::EtcdConfig {
            endpoints: Vec::new(),
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            prefix: self.etcd_prefix.clone(),
        }
    }
}

/// `poolwarden enforcement ...`.
#[derive(Subcommand)]
pub enum EnforcementCommand {
    /// Enforced interfaces, their entries, and packets passed and dropped per pool and reason.
    Status {
        /// Where the agent pins its maps and links.
        #[arg(long, default_value = crate::dataplane::enforcement::DEFAULT_PIN_DIR)]
        bpf_dir: std::path::PathBuf,
    },
}

/// Where pools are defined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PoolSource {
    /// In the datastore, by `poolwarden apply`.
    Datastore,
    /// As custom resources in the Kubernetes API.
    Kubernetes,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Kind {
    #[value(alias = "pool", alias = "ippools", alias = "ippool")]
    Pools,
    #[value(alias = "block")]
    Blocks,
    #[value(alias = "affinity")]
    Affinities,
    #[value(alias = "handle")]
    Handles,
    #[value(alias = "namespace", alias = "ns")]
    Namespaces,
    #[value(alias = "ipamconfiguration", alias = "config")]
    Ipamconfig,
    /// Nodes registered by their agents.
    #[value(alias = "node")]
    Nodes,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DeleteKind {
    #[value(alias = "ippool")]
    Pool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum NamespaceKind {
    #[value(alias = "ns")]
    Namespace,
}

#[derive(Subcommand)]
pub enum IpamCommand {
    /// Per pool: blocks claimed, addresses used and free.
    Show {
        /// Per block instead: node and use.
        #[arg(long, conflicts_with = "mismatched")]
        blocks: bool,
        /// Pods whose address is no longer in a pool their namespace (or pod) asks for; they keep it until
        /// recreated.
        #[arg(long)]
        mismatched: bool,
    },
    /// Check consistency across all pools, blocks, affinities and handles; exits 1 on any problem.
    Check,
    /// Release one address or every address of a handle.
    Release {
        /// The address.
        #[arg(long, conflicts_with = "handle", required_unless_present = "handle")]
        ip: Option<IpAddr>,
        /// The handle (`<container-id>.<ifname>`).
        #[arg(long)]
        handle: Option<String>,
    },
    /// Assign addresses as a pod ADD would, without wiring anything (standalone mode, scripts, dry runs).
    Assign {
        /// The pod's namespace (its standalone annotations and labels apply).
        #[arg(long)]
        namespace: String,
        /// The pod's name.
        #[arg(long)]
        pod: Option<String>,
        /// Pod annotations, key=value (for example poolwarden.io/ipv4pools='["p"]').
        #[arg(long = "pod-annotation")]
        pod_annotations: Vec<String>,
        /// The handle; defaults to <namespace>.<pod>.
        #[arg(long)]
        handle: Option<String>,
        /// The node; defaults to NODENAME or the host name.
        #[arg(long, env = "NODENAME")]
        node: Option<String>,
        /// Node labels, k=v,... (for nodeSelector).
        #[arg(long, value_delimiter = ',')]
        node_labels: Vec<String>,
        /// Request these pools (as the network configuration would).
        #[arg(long)]
        pool: Vec<String>,
        /// Request this address.
        #[arg(long)]
        ip: Vec<IpAddr>,
    },
    /// Give back this node's blocks that have been empty for the grace period.
    ReleaseEmptyBlocks {
        /// The node.
        #[arg(long, env = "NODENAME")]
        node: Option<String>,
    },
}

/// Parse `key=value` arguments.
pub fn parse_pairs(pairs: &[String], what: &str) -> Result<BTreeMap<String, String>, CommandError> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("{what} {p:?}: expected key=value").into())
        })
        .collect()
}

/// The node name given, or the host name.
pub fn node_name(node: Option<String>) -> String {
    node.filter(|n| !n.is_empty()).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
    })
}

/// Where namespaces come from for a command: the agent's own (cached) directory when the agent runs it,
/// otherwise what the datastore records (standalone records, or the API server through --kubeconfig).
pub struct Namespaces {
    /// The key-value datastore whose records say where namespaces come from (none on the Kubernetes one).
    store: Option<Arc<dyn Store>>,
    agent: Option<Arc<dyn Directory>>,
    kubeconfig: Option<std::path::PathBuf>,
}

impl Namespaces {
    /// Namespaces for a command on `store`; `agent` is the running agent's directory when it runs it.
    pub fn new(
        store: Arc<dyn Store>,
        agent: Option<Arc<dyn Directory>>,
        kubeconfig: Option<std::path::PathBuf>,
    ) -> Self {
        Self { store: Some(store), agent, kubeconfig }
    }

    /// Namespaces for a command on the Kubernetes datastore: the API server's.
    pub fn on_kubernetes(kubeconfig: Option<std::path::PathBuf>) -> Self {
        Self { store: None, agent: None, kubeconfig }
    }

    async fn source(&self) -> Result<Source, CommandError> {
        match (&self.agent, &self.store) {
            (Some(directory), _) => Ok(directory.source()),
            (None, Some(store)) => Ok(directory::source_of(store.as_ref()).await?),
            (None, None) => Ok(Source::Kubernetes),
        }
    }

    async fn directory(&self) -> Result<Arc<dyn Directory>, CommandError> {
        if let Some(directory) = &self.agent {
            return Ok(Arc::clone(directory));
        }
        match (self.source().await?, &self.store) {
            (Source::Standalone, Some(store)) => Ok(Arc::new(directory::StandaloneDirectory::new(Arc::clone(store)))),
            _ => {
                let client = crate::k8s::connect(self.kubeconfig.as_deref()).await?;
                Ok(Arc::new(crate::k8s::KubeLookups::new(client)))
            }
        }
    }

    /// Refuse a standalone namespace command when namespaces come from the API server.
    async fn refuse_in_kubernetes(&self, what: &str) -> Result<(), CommandError> {
        if self.source().await? == Source::Kubernetes {
            fail!(
                "{what}: this datastore serves a Kubernetes cluster, where namespaces come from the API server; \
                 use `kubectl annotate namespace NAME poolwarden.io/ipv4pools='[\"POOL\"]'` (or `kubectl label`) \
                 instead. Pools and the IPAM commands work as before"
            );
        }
        Ok(())
    }
}

/// What a command reads and writes: a key-value datastore (embedded or etcd) with its catalog of pools, or
/// the Kubernetes API (`--datastore kubernetes`: the IPAMBlock resources, the IPPool resources as the agents
/// judged them, the Node objects as the registered nodes).
pub enum Held {
    /// Embedded or etcd.
    KeyValue {
        /// The datastore.
        store: Arc<dyn Store>,
        /// Its pools and IPAM config.
        catalog: Catalog,
    },
    /// The API server.
    Kubernetes {
        /// Its client.
        client: kube::Client,
        /// The pool resources, followed.
        pools: Arc<crate::k8s::pools::ResourcePools>,
    },
}

impl Held {
    /// The key-value datastore `store`.
    pub fn key_value(store: Arc<dyn Store>) -> Self {
        Self::KeyValue { catalog: Catalog::new(Arc::clone(&store)), store }
    }

    /// The Kubernetes datastore, through `client`.
    pub fn kubernetes(client: kube::Client) -> Self {
        Self::Kubernetes { pools: Arc::new(crate::k8s::pools::ResourcePools::start(client.clone())), client }
    }

    /// A client of the API server that holds the pool resources: the datastore's own, or `--kubeconfig`'s
    /// (pools as resources over a key-value datastore).
    async fn client(&self, kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, CommandError> {
        match self {
            Self::Kubernetes { client, .. } => Ok(client.clone()),
            Self::KeyValue { .. } => Ok(crate::k8s::connect(kubeconfig).await?),
        }
    }

    /// An allocator on it.
    pub fn allocator(&self) -> BlockAllocator {
        match self {
            Self::KeyValue { store, .. } => BlockAllocator::of_store(Arc::clone(store)),
            Self::Kubernetes { client, pools } => BlockAllocator::new(
                Arc::new(crate::objects::kubernetes::KubeObjects::new(client.clone())),
                Arc::clone(pools) as Arc<dyn crate::allocator::single::PoolSource>,
            ),
        }
    }

    /// The pools, in name order (on Kubernetes, those the agents accepted, as accepted).
    async fn pools(&self) -> Result<Vec<crate::resources::IpPool>, CommandError> {
        use crate::allocator::single::PoolSource as _;
        Ok(match self {
            Self::KeyValue { catalog, .. } => catalog.pools().await?.into_iter().map(|(p, _)| p).collect(),
            Self::Kubernetes { pools, .. } => pools.load().await?.pools,
        })
    }

    /// The pools deleted whose firewall sets stay (emptied by every load): on Kubernetes, those the pools'
    /// lease holder recorded ([`crate::k8s::pools::RETIRED_POOLS`], in the agents' namespace) that are not
    /// pools again.
    async fn retired(&self) -> Result<Vec<(String, bool)>, CommandError> {
        Ok(match self {
            Self::KeyValue { catalog, .. } => catalog
                .retired_pools()
                .await?
                .iter()
                .map(|r| (firewall::set_name(&r.name), r.cidr.addr().is_ipv6()))
                .collect(),
            Self::Kubernetes { client, .. } => {
                use crate::k8s::pools;
                let namespace = pools::agents_namespace();
                let live: BTreeSet<String> = self.pools().await?.iter().map(|p| p.name().to_string()).collect();
                pools::retired(client, &namespace)
                    .await?
                    .into_iter()
                    .filter(|(name, _)| !live.contains(name))
                    .map(|(name, cidr)| (firewall::set_name(&name), cidr.addr().is_ipv6()))
                    .collect()
            }
        })
    }

    /// Everything `ipam check` and `get` look at: the blocks, with the nodes registered now (an address of a
    /// node that is not, and a block affine to one, are reported as leaked): on Kubernetes the Node objects.
    async fn snapshot(&self, allocator: &BlockAllocator) -> Result<ipam::check::Snapshot, CommandError> {
        if let Self::KeyValue { store, .. } = self {
            refuse_older_layout(store).await?;
        }
        let mut snapshot = allocator.snapshot().await?;
        snapshot.nodes = match self {
            Self::KeyValue { store, .. } => {
                let (registered, _) = store.list_keys(store::keys::NODES).await?;
                registered.iter().filter_map(|k| k.strip_prefix(store::keys::NODES)).map(str::to_string).collect()
            }
            Self::Kubernetes { client, .. } => {
                let nodes = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
                    .list_metadata(&kube::api::ListParams::default())
                    .await?;
                nodes.items.iter().map(kube::ResourceExt::name_any).collect()
            }
        };
        Ok(snapshot)
    }
}

/// The firewall export of the pools `held` has, as text.
pub async fn firewall_export(
    held: &Held,
    namespaces: &Namespaces,
    format: ExportFormat,
    pool: Option<&str>,
) -> Result<String, CommandError> {
    let pools = held.pools().await?;
    if let Some(name) = pool
        && !pools.iter().any(|p| p.name() == name)
    {
        fail!("IPPool {name:?} does not exist");
    }
    let known = namespaces.directory().await?.namespaces().await?;
    // Deleted pools' sets stay in the firewall and are emptied by every load (not for `--pool`).
    let retired = match pool {
        Some(_) => Vec::new(),
        None => held.retired().await?,
    };
    Ok(firewall::render_with_retired(&firewall::export(&pools, &known, pool), &retired, format))
}

/// Run one command on the datastore `held`, writing what it prints to `out`; returns the exit code.
/// `stdin` is what `-f -` reads (the caller read it; the agent gets it over the socket); `agent` is the
/// agent's directory when the agent runs the command. On the Kubernetes datastore pools are always the
/// IPPool resources (`apply` and `delete pool` write them, judged first as the agents will judge them),
/// namespaces and nodes the API server's; what only a key-value datastore has (standalone namespaces, a
/// node's decommissioning) is refused there, naming what to use instead.
pub async fn execute(
    cli: Cli,
    held: Held,
    agent: Option<Arc<dyn Directory>>,
    stdin: Option<String>,
    out: &mut String,
) -> Result<u8, CommandError> {
    let allocator = held.allocator();
    let namespaces = match &held {
        Held::KeyValue { store, .. } => Namespaces::new(Arc::clone(store), agent, cli.kubeconfig.clone()),
        Held::Kubernetes { .. } => Namespaces::on_kubernetes(cli.kubeconfig.clone()),
    };
    let pools_as_resources = matches!(held, Held::Kubernetes { .. }) || cli.pool_source == PoolSource::Kubernetes;
    match cli.command {
        Command::Agent { .. } | Command::InstallCni { .. } | Command::Uninstall { .. } => {
            fail!("this command acts on the node it runs on, not through the agent's socket")
        }
        Command::Datastore { .. } => {
            fail!("datastore migrate runs with every agent stopped, never through an agent's socket")
        }
        Command::Apply { files } => {
            let docs = resources::read_paths(&files, stdin.as_deref())?;
            if docs.is_empty() {
                fail!("no documents found in {}", files.join(", "));
            }
            if let Some(doc) = docs.iter().find(|d| matches!(d.resource, resources::Resource::Namespace(_))) {
                namespaces.refuse_in_kubernetes(&format!("{}: {}", doc.at, doc.resource.describe())).await?;
            }
            let against = match &held {
                Held::KeyValue { catalog, .. } if !pools_as_resources => {
                    for applied in catalog.apply(&docs).await? {
                        w!(out, "{} {}", applied.object, applied.action);
                    }
                    None
                }
                Held::KeyValue { catalog, .. } => Some(crate::k8s::pools::Against::Datastore(catalog)),
                Held::Kubernetes { .. } => Some(crate::k8s::pools::Against::Resources),
            };
            if let Some(against) = against {
                let code = crate::k8s::pools::apply(held.client(cli.kubeconfig.as_deref()).await?, against, &docs, out)
                    .await?;
                if code != 0 {
                    return Ok(code);
                }
            }
            for doc in &docs {
                if let resources::Resource::IpPool(pool) = &doc.resource
                    && let Some(notice) = crate::dataplane::encapsulation_not_applied(pool)
                {
                    w!(out, "note: {notice}");
                }
            }
        }
        Command::Get { what, name, output } => {
            let text = match what {
                Kind::Pools => {
                    let mut pools = held.pools().await?;
                    if let Some(name) = &name {
                        pools.retain(|p| p.name() == name);
                        if pools.is_empty() {
                            fail!("IPPool {name:?} does not exist{}", not_accepted(&held));
                        }
                    }
                    cli::pools(&pools, output)
                }
                Kind::Blocks => cli::blocks(&held.snapshot(&allocator).await?.blocks, output),
                Kind::Affinities => cli::affinities(&held.snapshot(&allocator).await?, output),
                Kind::Handles => cli::handles(&held.snapshot(&allocator).await?, output),
                Kind::Namespaces => {
                    let mut known: Vec<resources::Namespace> = namespaces
                        .directory()
                        .await?
                        .namespaces()
                        .await?
                        .into_iter()
                        .map(|ns| resources::Namespace::from(&ns))
                        .collect();
                    if let Some(name) = &name {
                        known.retain(|n| n.name() == name);
                        if known.is_empty() {
                            fail!("Namespace {name:?} does not exist");
                        }
                    }
                    cli::namespaces(&known, output)
                }
                Kind::Ipamconfig => {
                    let config = match &held {
                        Held::KeyValue { catalog, .. } => catalog.config().await?.0,
                        Held::Kubernetes { .. } => resources::IpamConfig {
                            spec: allocator.load().await?.config,
                            ..resources::IpamConfig::default()
                        },
                    };
                    cli::config(&config, output)
                }
                Kind::Nodes => {
                    let mut nodes: Vec<_> = match &held {
                        Held::KeyValue { store, .. } => {
                            crate::cluster::registered(store.as_ref()).await?.into_values().collect()
                        }
                        Held::Kubernetes { client, .. } => node_objects(client).await?,
                    };
                    nodes.retain(|n| name.as_ref().is_none_or(|want| &n.name == want));
                    cli::nodes(&nodes, output)
                }
            };
            out.push_str(&text);
        }
        Command::Delete { what: DeleteKind::Pool, name, force } if pools_as_resources => {
            crate::k8s::pools::delete(held.client(cli.kubeconfig.as_deref()).await?, &name, force, out).await?;
        }
        Command::Delete { what: DeleteKind::Pool, name, force } => {
            let Held::KeyValue { catalog, .. } = &held else { unreachable!("pools are resources on Kubernetes") };
            let left = catalog.delete_pool(&name, force).await?;
            w!(out, "ippool/{name} deleted");
            if !left.is_empty() {
                let addresses: u32 = left.iter().map(ipam::Block::used).sum();
                w!(
                    out,
                    "left behind: {addresses} allocated address(es) in {} block(s) ({}); they stay allocated until \
                     their pods are deleted or `poolwarden ipam release` frees them",
                    left.len(),
                    left.iter().map(|b| b.cidr.to_string()).collect::<Vec<_>>().join(", ")
                );
            }
        }
        Command::Node { command: NodeCommand::Decommission { name } } => {
            let Held::KeyValue { store, .. } = &held else {
                fail!(
                    "node decommission {name}: on the Kubernetes datastore a node is gone when its Node object is \
                     deleted (`kubectl delete node {name}`); the agents then take its addresses and blocks back"
                )
            };
            if store.get(&store::keys::node(&name)).await?.is_some() {
                fail!(
                    "node {name} is registered: its agent is running (or stopped less than its registration TTL \
                     ago); stop it, then decommission the node"
                );
            }
            let txn = store::Txn::new()
                .put(store::keys::decommissioned(&name), b"{}".to_vec())
                .remove(store::keys::node_addresses(&name));
            store.txn(txn).await?;
            w!(
                out,
                "node/{name} decommissioned: the other agents stop routing to it and take its addresses and blocks \
                 back after their leak grace period"
            );
        }
        Command::Annotate { what: NamespaceKind::Namespace, name, changes } => {
            namespaces.refuse_in_kubernetes(&format!("annotate namespace {name}")).await?;
            let Held::KeyValue { catalog, .. } = &held else { unreachable!("refused above") };
            catalog.edit_namespace(&name, &changes, true).await?;
            w!(out, "namespace/{name} annotated");
        }
        Command::Label { what: NamespaceKind::Namespace, name, changes } => {
            namespaces.refuse_in_kubernetes(&format!("label namespace {name}")).await?;
            let Held::KeyValue { catalog, .. } = &held else { unreachable!("refused above") };
            catalog.edit_namespace(&name, &changes, false).await?;
            w!(out, "namespace/{name} labeled");
        }
        Command::Ipam { command } => {
            return ipam_command(command, &allocator, &held, &namespaces, out).await;
        }
        Command::Firewall { command: FirewallCommand::Export { format, pool, watch: _ } } => {
            // `--watch` is the caller's loop around this (see the `poolwarden` binary).
            out.push_str(&firewall_export(&held, &namespaces, format, pool.as_deref()).await?);
        }
        Command::Enforcement { command: EnforcementCommand::Status { bpf_dir } } => enforcement_status(&bpf_dir, out)?,
    }
    Ok(0)
}

/// What `get pools NAME` adds on the Kubernetes datastore, where a resource the agents refused (or have not
/// judged yet) is not a pool.
fn not_accepted(held: &Held) -> &'static str {
    match held {
        Held::KeyValue { .. } => "",
        Held::Kubernetes { .. } => {
            " as a pool the agents accepted (`kubectl get ippool NAME` shows a resource's verdict)"
        }
    }
}

/// The Node objects as registered nodes: name, the addresses other nodes route its blocks to, labels.
async fn node_objects(client: &kube::Client) -> Result<Vec<crate::cluster::NodeRecord>, CommandError> {
    let nodes = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .list(&kube::api::ListParams::default())
        .await?;
    Ok(nodes.items.iter().map(crate::k8s::node_record).collect())
}

/// `enforcement status`: everything comes from the pinned maps (pool names too), so this works with the
/// agent down and on any datastore.
fn enforcement_status(bpf_dir: &std::path::Path, out: &mut String) -> Result<(), CommandError> {
    use crate::dataplane::enforcement::{self, COUNT_PASSED, HAS_IPV4, HAS_IPV6, POOL_MODE, reason};
    let state = enforcement::read_pinned(bpf_dir)?;
    let name_of = |slot: u32| state.pool_names.get(&slot).map_or(enforcement::NO_POOL, String::as_str);
    w!(out, "{} interface(s) enforced (maps pinned in {})", state.attached.len(), bpf_dir.display());
    let ports: Vec<String> = state.decap_ports.iter().map(u16::to_string).collect();
    w!(out, "tunnels dropped: IP protocols {:?}, UDP ports {}", enforcement::TUNNEL_PROTOCOLS, ports.join(","));
    let counting = state.endpoints.iter().filter(|(_, e)| e.flags & COUNT_PASSED != 0).count();
    w!(
        out,
        "passed packets counted on {counting} of {} interface(s) (agent --count-passed-packets); drops on every one",
        state.endpoints.len()
    );
    let rows: Vec<Vec<String>> = state
        .endpoints
        .iter()
        .map(|(ifindex, e)| {
            let mut addresses = Vec::new();
            if e.flags & HAS_IPV4 != 0 {
                addresses.push(std::net::Ipv4Addr::from(e.ipv4).to_string());
            }
            if e.flags & HAS_IPV6 != 0 {
                addresses.push(std::net::Ipv6Addr::from(e.ipv6).to_string());
            }
            let mode = if e.flags & POOL_MODE != 0 { "pool" } else { "strict" };
            let attached = if state.attached.contains(ifindex) { "yes" } else { "no" };
            vec![
                ifindex.to_string(),
                addresses.join(","),
                name_of(e.pool_id).to_string(),
                mode.to_string(),
                attached.to_string(),
            ]
        })
        .collect();
    out.push_str(&cli::table(&["IFINDEX", "ADDRESSES", "POOL", "MODE", "ATTACHED"], &rows));
    let rows: Vec<Vec<String>> = state
        .counters
        .iter()
        .map(|(pool, why, n)| vec![pool.clone(), reason::name(*why).to_string(), n.to_string()])
        .collect();
    out.push_str(&cli::table(&["POOL", "REASON", "PACKETS"], &rows));
    Ok(())
}

/// Refused on a datastore whose IPAM state an older poolwarden wrote and no agent of this version converted
/// yet: read as block objects it would look empty (and a block written into it would stop the conversion).
async fn refuse_older_layout(store: &Arc<dyn Store>) -> Result<(), CommandError> {
    if crate::migrate::older_layout(store).await.map_err(|e| e.to_string())? {
        fail!(
            "this datastore holds the IPAM records of an older poolwarden, not converted yet: start an agent of this \
             version on it (it converts them once no older agent runs), or use the older version's command"
        );
    }
    Ok(())
}

/// `ipam check` of `snapshot`: each problem, then the verdict; the exit code (1 on any problem).
fn report_check(snapshot: &ipam::check::Snapshot, out: &mut String) -> u8 {
    let problems = check::check(snapshot);
    for problem in &problems {
        w!(out, "{problem}");
    }
    let counts = format!(
        "{} pool(s), {} block(s), {} affinit(ies), {} handle(s)",
        snapshot.pools.len(),
        snapshot.blocks.len(),
        snapshot.affinities.len(),
        snapshot.handles.len()
    );
    if !problems.is_empty() {
        w!(out, "ipam check: {} problem(s) in {counts}", problems.len());
        return 1;
    }
    w!(out, "ipam check: clean ({counts})");
    0
}

async fn ipam_command(
    command: IpamCommand,
    allocator: &BlockAllocator,
    held: &Held,
    namespaces: &Namespaces,
    out: &mut String,
) -> Result<u8, CommandError> {
    if let Held::KeyValue { store, .. } = held {
        refuse_older_layout(store).await?;
    }
    match command {
        IpamCommand::Show { mismatched: true, .. } => {
            let snapshot = held.snapshot(allocator).await?;
            let directory = namespaces.directory().await?;
            let known: BTreeMap<String, ipam::NamespaceInfo> =
                directory.namespaces().await?.into_iter().map(|ns| (ns.name.clone(), ns)).collect();
            let mut pods = BTreeMap::new();
            for block in &snapshot.blocks {
                for (_, a) in block.allocated() {
                    if let (Some(ns), Some(pod)) = (&a.namespace, &a.pod)
                        && !pods.contains_key(&(ns.clone(), pod.clone()))
                        && let Ok(info) = directory.pod(ns, pod, "").await
                    {
                        pods.insert((ns.clone(), pod.clone()), info);
                    }
                }
            }
            let found = ipam::mismatch::mismatched(&snapshot.blocks, &snapshot.pools, &known, &pods);
            out.push_str(&cli::mismatched(&found));
        }
        IpamCommand::Show { blocks, .. } => {
            let snapshot = held.snapshot(allocator).await?;
            out.push_str(&if blocks { cli::ipam_show_blocks(&snapshot) } else { cli::ipam_show(&snapshot) });
        }
        IpamCommand::Check => return Ok(report_check(&held.snapshot(allocator).await?, out)),
        IpamCommand::Release { ip: Some(ip), .. } => match allocator.release_ip(ip, None).await? {
            Some(a) => w!(out, "released {ip} (handle {})", a.handle),
            None => w!(out, "{ip} was not allocated"),
        },
        IpamCommand::Release { handle: Some(handle), .. } => {
            // On every node that holds an address for it (one, unless something went wrong).
            let held = held.snapshot(allocator).await?;
            let nodes: BTreeSet<String> = held
                .blocks
                .iter()
                .flat_map(|b| b.allocated().filter(|(_, a)| a.handle == handle).map(|(_, a)| a.node.clone()))
                .collect();
            let mut ips = Vec::new();
            for node in nodes {
                ips.extend(allocator.release_handle(&node, &handle).await?);
            }
            if ips.is_empty() {
                w!(out, "handle {handle} held no address");
            }
            for ip in ips {
                w!(out, "released {ip} (handle {handle})");
            }
        }
        IpamCommand::Release { .. } => fail!("give --ip or --handle"),
        IpamCommand::Assign { namespace, pod, pod_annotations, handle, node, node_labels, pool, ip } => {
            let ns = namespaces.directory().await?.namespace(&namespace).await?;
            let pools = held.pools().await?;
            let handle =
                handle.unwrap_or_else(|| format!("{namespace}.{}", pod.clone().unwrap_or_else(|| "standalone".into())));
            let request = AssignRequest {
                handle: handle.clone(),
                node: NodeInfo { name: node_name(node), labels: parse_pairs(&node_labels, "node label")? },
                namespace: ns,
                pod: pod.map(|name| PodInfo { name, annotations: BTreeMap::new() }),
                requested: Requested::from_pool_names(&pools, &pool, ip),
                eligible: None,
                attributes: BTreeMap::new(),
            };
            let mut request = request;
            if !pod_annotations.is_empty() {
                let annotations = parse_pairs(&pod_annotations, "pod annotation")?;
                let pod =
                    request.pod.get_or_insert_with(|| PodInfo { name: "standalone".into(), ..Default::default() });
                pod.annotations = annotations;
            }
            let loaded = allocator.load().await?;
            for a in allocator.assign(&request, &loaded).await? {
                w!(out, "{}\t{}\t{}\t{}", a.ip, a.pool, a.block, handle);
            }
        }
        IpamCommand::ReleaseEmptyBlocks { node } => {
            let node = node_name(node);
            let config = allocator.load().await?.config;
            let released = allocator.release_empty_blocks(&node, &config).await?;
            w!(out, "released {} empty block(s) of node {node}", released.len());
            for cidr in released {
                w!(out, "  {cidr}");
            }
        }
    }
    Ok(0)
}
