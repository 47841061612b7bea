//! `kill -9` at every step boundary of the single-object allocator (`allocator::single::faults::POINTS`,
//! compiled in through the `fault-injection` feature only the tests enable), on any of its three backends: a
//! child process runs the allocator until it reaches the armed boundary and SIGKILLs itself there; then the
//! parent opens the same state and checks that it is one the design allows (every block whole, its labels what
//! it holds, no overlap, no address twice) and that what the runtime and the agent do next (kubelet's DEL before
//! a new ADD, a repeated DEL, the next give-back or collection pass) leaves it clean: nothing held twice, nothing
//! leaked, `ipam check` finding nothing.
//!
//! Shared by `faults.rs` (the embedded store and a real etcd) and `k8s_cluster.rs` (IPAMBlock objects of the
//! test cluster's API server); each has a `#[test] fn fault_child` calling [`child`].

use std::{
    collections::BTreeMap,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use poolwarden::{
    allocator::{
        AssignRequest,
        single::{BlockAllocator, PoolSource, conformance::checked_blocks, faults},
    },
    catalog::Catalog,
    ipam::{NamespaceInfo, NodeInfo, check::check},
    objects::{ObjectStore, kubernetes::KubeObjects, kv::KeyValueObjects},
    resources::parse_documents,
    store::{
        Store,
        embedded::EmbeddedStore,
        etcd::{EtcdConfig, EtcdStore},
    },
};

const POOLS: &str = "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: four}\nspec: {cidr: 10.253.0.0/28, blockSize: 30}\n---\n\
apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: six}\nspec: {cidr: 'fd00:253::/124', blockSize: 126}\n---\n\
apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {emptyBlockGraceSeconds: 0}\n";

/// What the child is told, in its environment.
const BACKEND_VARIABLE: &str = "POOLWARDEN_FAULT_BACKEND";
const POINT_VARIABLE: &str = "POOLWARDEN_FAULT_POINT";

/// Where one boundary's run keeps its state.
#[derive(Clone, Debug)]
pub enum Backend {
    /// Pools and blocks in one embedded store (a file).
    Embedded(PathBuf),
    /// Pools and blocks in etcd (a `--datastore` spec), under a key prefix of the run's own.
    Etcd { spec: String, prefix: String },
    /// Blocks as IPAMBlock objects of the API server that `kubeconfig` names, reached from the network
    /// namespace `netns` (the test cluster's control plane); pools from an embedded store (a file).
    Kubernetes { kubeconfig: PathBuf, netns: PathBuf, pools: PathBuf },
}

impl Backend {
    fn encode(&self) -> String {
        match self {
            Self::Embedded(path) => format!("embedded\n{}", path.display()),
            Self::Etcd { spec, prefix } => format!("etcd\n{spec}\n{prefix}"),
            Self::Kubernetes { kubeconfig, netns, pools } => {
                format!("kubernetes\n{}\n{}\n{}", kubeconfig.display(), netns.display(), pools.display())
            }
        }
    }

    fn decode(text: &str) -> Self {
        let parts: Vec<&str> = text.split('\n').collect();
        match parts.as_slice() {
            ["embedded", path] => Self::Embedded(PathBuf::from(path)),
            ["etcd", spec, prefix] => Self::Etcd { spec: (*spec).to_string(), prefix: (*prefix).to_string() },
            ["kubernetes", kubeconfig, netns, pools] => {
                Self::Kubernetes { kubeconfig: kubeconfig.into(), netns: netns.into(), pools: pools.into() }
            }
            _ => panic!("{BACKEND_VARIABLE}: not a backend: {text:?}"),
        }
    }

    /// Enter the backend's network namespace, if it has one: call on a thread of its own (the namespace is
    /// the calling thread's, and threads it starts inherit it) before it makes a runtime.
    fn enter(&self) {
        if let Self::Kubernetes { netns, .. } = self {
            enter(netns);
        }
    }

    async fn pools_store(&self) -> Arc<dyn Store> {
        match self {
            Self::Embedded(path) | Self::Kubernetes { pools: path, .. } => {
                Arc::new(EmbeddedStore::open(path).expect("open the embedded store"))
            }
            Self::Etcd { spec, prefix } => {
                let mut config = EtcdConfig::from_spec(spec).expect("datastore spec");
                config.prefix.clone_from(prefix);
                Arc::new(EtcdStore::connect(&config).await.expect("connect to etcd"))
            }
        }
    }

    /// The pools (two pools of four blocks each, no grace for empty blocks) into a fresh backend.
    async fn seed(&self) {
        let docs = parse_documents("pools.yaml", POOLS).expect("pools");
        Catalog::new(self.pools_store().await).apply(&docs).await.expect("apply");
    }

    /// The objects and an allocator on them.
    async fn open(&self) -> (Arc<dyn ObjectStore>, BlockAllocator) {
        let store = self.pools_store().await;
        let objects: Arc<dyn ObjectStore> = match self {
            Self::Embedded(_) | Self::Etcd { .. } => Arc::new(KeyValueObjects::new(Arc::clone(&store))),
            Self::Kubernetes { kubeconfig, .. } => Arc::new(KubeObjects::new(
                poolwarden::k8s::connect(Some(kubeconfig)).await.expect("a client of the API server"),
            )),
        };
        let pools: Arc<dyn PoolSource> = Arc::new(Catalog::new(store));
        (Arc::clone(&objects), BlockAllocator::new(objects, pools))
    }
}

/// Move the calling thread into the network namespace at `netns` (threads it starts afterwards inherit it).
pub fn enter(netns: &Path) {
    let file = std::fs::File::open(netns).unwrap_or_else(|e| panic!("{}: {e}", netns.display()));
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

fn request(node: &str, handle: &str) -> AssignRequest {
    AssignRequest {
        handle: handle.to_string(),
        node: NodeInfo { name: node.to_string(), labels: BTreeMap::new() },
        namespace: NamespaceInfo::bare("default"),
        pod: None,
        requested: Default::default(),
        eligible: None,
        attributes: BTreeMap::new(),
    }
}

async fn add(allocator: &BlockAllocator, node: &str, handle: &str) -> Vec<std::net::IpAddr> {
    let loaded = allocator.load().await.expect("pools");
    allocator.assign(&request(node, handle), &loaded).await.expect("assign").into_iter().map(|a| a.ip).collect()
}

/// The steps before the armed one, then the one that reaches it. Runs in the child.
async fn scenario(point: &'static str, allocator: &BlockAllocator) {
    let config = allocator.load().await.expect("pools").config;
    match point {
        "claim-created" | "claim-confirmed" => {
            faults::arm(point);
            add(allocator, "a", "h1").await;
        }
        "assigned" => {
            add(allocator, "a", "h0").await;
            faults::arm(point);
            add(allocator, "a", "h1").await;
        }
        "borrowed" => {
            // Node a takes every block of both pools (15 of 16 addresses each); node b must borrow.
            for h in 0..15 {
                add(allocator, "a", &format!("a{h}")).await;
            }
            faults::arm(point);
            add(allocator, "b", "h1").await;
        }
        "released-one" => {
            add(allocator, "a", "h0").await;
            faults::arm(point);
            allocator.release_handle("a", "h0").await.expect("release");
        }
        "given-back" => {
            add(allocator, "a", "h0").await;
            allocator.release_handle("a", "h0").await.expect("release");
            faults::arm(point);
            allocator.release_empty_blocks("a", &config).await.expect("give back");
        }
        "node-released" => {
            add(allocator, "a", "h0").await;
            add(allocator, "a", "h1").await;
            faults::arm(point);
            allocator.release_node("a").await.expect("release node");
        }
        other => panic!("no scenario for {other}"),
    }
}

/// The child: set up, run to the armed boundary, die there. Does nothing unless a parent started it (call it
/// from a `#[test] fn fault_child`, which the parent runs alone).
pub fn child() {
    let (Ok(backend), Ok(point)) = (std::env::var(BACKEND_VARIABLE), std::env::var(POINT_VARIABLE)) else {
        return;
    };
    let backend = Backend::decode(&backend);
    let point = *faults::POINTS.iter().find(|p| **p == point).expect("a known point");
    backend.enter();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let (_, allocator) = backend.open().await;
        scenario(point, &allocator).await;
    });
    // Reaching here means the boundary was never reached: the parent sees a clean exit and fails.
}

/// For every boundary: a fresh backend from `fresh` (given the boundary's name and an empty directory of its
/// own), the child killed there, then the checks and the clean-up. Runs on a thread of its own (in the
/// backend's network namespace, if any).
pub fn kill_at_every_boundary(fresh: impl Fn(&str, &Path) -> Backend + Send + 'static) {
    let thread = std::thread::spawn(move || {
        for point in faults::POINTS {
            let dir = tempfile::tempdir().expect("temp dir");
            let backend = fresh(point, dir.path());
            backend.enter();
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            runtime.block_on(backend.seed());
            let status = Command::new(std::env::current_exe().expect("this test binary"))
                .args(["--exact", "fault_child", "--nocapture", "--test-threads", "1"])
                .env(BACKEND_VARIABLE, backend.encode())
                .env(POINT_VARIABLE, point)
                .status()
                .expect("run the child");
            assert_eq!(status.signal(), Some(9), "{point}: the child must die at the boundary, not exit ({status})");
            runtime.block_on(after_the_kill(point, &backend));
        }
    });
    assert!(thread.join().is_ok(), "a boundary failed (its panic is printed above)");
}

/// What the next steps do after a kill at `point`, and what must hold once they have; then everything released
/// and given back, and nothing left.
async fn after_the_kill(point: &str, backend: &Backend) {
    let (objects, allocator) = backend.open().await;
    let blocks = checked_blocks(objects.as_ref()).await;
    let held = |handle: &str| blocks.iter().flat_map(|b| b.ips_of(handle)).count();
    match point {
        "claim-created" | "claim-confirmed" | "assigned" => {
            assert_eq!(held("h1"), 1, "{point}: the first family's address is committed, the second is not");
            // kubelet's DEL of the failed ADD, then the ADD again.
            assert_eq!(allocator.release_handle("a", "h1").await.expect("DEL").len(), 1, "{point}");
            assert_eq!(add(&allocator, "a", "h1").await.len(), 2, "{point}: the retried ADD gets both families");
        }
        "borrowed" => {
            assert_eq!(held("h1"), 1, "{point}: the borrowed address is committed");
            assert_eq!(allocator.release_handle("b", "h1").await.expect("DEL").len(), 1, "{point}: found by label");
        }
        "released-one" => {
            assert_eq!(held("h0"), 1, "{point}: one family released, one not yet");
            assert_eq!(allocator.release_handle("a", "h0").await.expect("DEL again").len(), 1, "{point}");
        }
        "given-back" => {
            assert_eq!(blocks.len(), 1, "{point}: one of the two empty blocks went back");
            let config = allocator.load().await.expect("pools").config;
            allocator.release_empty_blocks("a", &config).await.expect("the next pass");
        }
        "node-released" => {
            assert_eq!(blocks.iter().filter(|b| b.affinity.is_none()).count(), 1, "{point}: one block released");
            assert_eq!(allocator.release_node("a").await.expect("the next pass").len(), 1, "{point}");
        }
        other => panic!("no check for {other}"),
    }
    let snapshot = allocator.snapshot().await.expect("snapshot");
    assert!(check(&snapshot).is_empty(), "{point}: ipam check: {:?}", check(&snapshot));
    for block in checked_blocks(objects.as_ref()).await {
        for (_, allocation) in block.allocated() {
            allocator.release_handle(&allocation.node, &allocation.handle).await.expect("release");
        }
    }
    let config = allocator.load().await.expect("pools").config;
    for node in ["a", "b"] {
        allocator.release_empty_blocks(node, &config).await.expect("give back");
    }
    allocator.release_unowned_blocks(&config).await.expect("give back the blocks nobody owns");
    let left = checked_blocks(objects.as_ref()).await;
    assert!(left.is_empty(), "{point}: left after everything was released: {left:?}");
}
