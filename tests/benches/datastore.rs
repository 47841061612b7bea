//! The datastores side by side (issue 17): ADD and DEL latency (median, p99) and requests per ADD and per DEL
//! for one node's 200 sequential pods (blocks of 64: four claims among them), in the same run, on
//!
//! - etcd with the multi-key allocator the agent runs today (one transaction per step; etcd requests),
//! - the same etcd with the single-object allocator over key-value objects (object requests, and the etcd
//!   requests they make),
//! - the Kubernetes API server of `cargo xtask cluster` with the single-object allocator (API requests), when
//!   a cluster is up (`POOLWARDEN_CLUSTER`, or `target/cluster` with its control plane's namespace).
//!
//! etcd is a three-member cluster on the loopback of a network namespace this bench makes; the API server is
//! reached from inside the cluster's control-plane namespace. Needs root and Debian's etcd
//! (`cargo xtask bench --only datastore`). Under `cargo test` it runs 20 pods and checks that everything
//! released is gone.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use poolwarden::{
    allocator::{
        Allocator, AssignRequest, Loaded,
        single::{
            BlockAllocator, PoolSource,
            conformance::{FixedPools, pool},
        },
    },
    catalog::Catalog,
    ipam::{NamespaceInfo, NodeInfo, PodInfo},
    objects::{ObjectStore, counting::CountingObjects, kubernetes::KubeObjects, kv::KeyValueObjects},
    resources::parse_documents,
    store::{self, Store, counting::CountingStore, etcd::EtcdConfig},
};
use poolwarden_tests::etcd::EtcdCluster;

const NODE: &str = "bench-node";

/// One backend's figures.
struct Figures {
    name: &'static str,
    add: Vec<Duration>,
    del: Vec<Duration>,
    /// Requests per ADD and per DEL, as the backend counts them.
    add_requests: f64,
    del_requests: f64,
    /// For key-value objects: the etcd requests per ADD and per DEL underneath.
    etcd: Option<(f64, f64)>,
}

fn request(i: usize) -> AssignRequest {
    let handle = format!("bench-{i:05}.eth0");
    AssignRequest {
        handle: handle.clone(),
        node: NodeInfo { name: NODE.into(), labels: BTreeMap::new() },
        namespace: NamespaceInfo::bare("bench"),
        pod: Some(PodInfo { name: handle, annotations: BTreeMap::new() }),
        requested: Default::default(),
        eligible: None,
        attributes: BTreeMap::new(),
    }
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The multi-key allocator on etcd, under `prefix`.
async fn multi_key(etcd: &EtcdCluster, pods: usize) -> Figures {
    let mut config = EtcdConfig::from_spec(&etcd.datastore()).expect("etcd spec");
    config.prefix = "/multi-key/".into();
    let plain = store::open(&etcd.datastore(), &config).await.expect("open etcd");
    let yaml = "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: bench}\nspec: {cidr: 10.252.0.0/16, blockSize: 26}\n";
    Catalog::new(Arc::clone(&plain)).apply(&parse_documents("bench.yaml", yaml).expect("pool")).await.expect("apply");
    let counting = Arc::new(CountingStore::new(plain));
    let allocator = Allocator::new(counting.clone() as Arc<dyn Store>);
    let loaded = allocator.load().await.expect("load");
    counting.take();
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for i in 0..pods {
        let started = Instant::now();
        allocator.assign_recording(&request(i), None, &loaded).await.expect("assign");
        add.push(started.elapsed());
    }
    let add_requests = counting.take().requests as f64 / pods as f64;
    for i in 0..pods {
        let started = Instant::now();
        let released = allocator.release_handle(&request(i).handle).await.expect("release");
        assert_eq!(released.len(), 1);
        del.push(started.elapsed());
    }
    let del_requests = counting.take().requests as f64 / pods as f64;
    Figures { name: "etcd, multi-key allocator (today)", add, del, add_requests, del_requests, etcd: None }
}

/// The single-object allocator on `objects` (counted by `counting`; `etcd` counts what a key-value backend
/// sends underneath), with pools from `pools`.
async fn single_object(
    name: &'static str,
    counting: Arc<CountingObjects>,
    etcd: Option<Arc<CountingStore>>,
    pools: Arc<dyn PoolSource>,
    pods: usize,
) -> Figures {
    let allocator = BlockAllocator::new(counting.clone() as Arc<dyn ObjectStore>, pools);
    let loaded: Loaded = allocator.load().await.expect("load");
    // The node's view lists its blocks once, as an agent does when it starts.
    allocator.node_blocks(NODE).await.expect("the node's view");
    counting.take();
    let etcd_take = || etcd.as_ref().map_or(0, |c| c.take().requests);
    etcd_take();
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for i in 0..pods {
        let started = Instant::now();
        allocator.assign(&request(i), &loaded).await.expect("assign");
        add.push(started.elapsed());
    }
    let add_requests = counting.take() as f64 / pods as f64;
    let etcd_add = etcd_take() as f64 / pods as f64;
    for i in 0..pods {
        let started = Instant::now();
        let released = allocator.release_handle(NODE, &request(i).handle).await.expect("release");
        assert_eq!(released.len(), 1);
        del.push(started.elapsed());
    }
    let del_requests = counting.take() as f64 / pods as f64;
    let etcd_del = etcd_take() as f64 / pods as f64;
    let mut config = loaded.config.clone();
    config.empty_block_grace_seconds = 0;
    allocator.release_empty_blocks(NODE, &config).await.expect("give back");
    // From the store, not the node's view.
    let left = allocator.blocks().await.expect("blocks");
    let left: Vec<_> = left.iter().filter(|b| loaded.pools.iter().any(|p| p.name() == b.pool)).collect();
    assert!(left.is_empty(), "{name}: blocks left after everything was released: {}", left.len());
    Figures { name, add, del, add_requests, del_requests, etcd: etcd.map(|_| (etcd_add, etcd_del)) }
}

/// The single-object allocator on the cluster's API server, from a thread in its control plane's namespace.
fn on_kubernetes(dir: &Path, pods: usize) -> Figures {
    let kubeconfig = dir.join("admin.kubeconfig");
    let thread = std::thread::spawn(move || {
        let netns = std::fs::File::open("/run/netns/pwk-cp").expect("the control plane's namespace");
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        runtime.block_on(async {
            let client = poolwarden::k8s::connect(Some(&kubeconfig)).await.expect("a client of the API server");
            let objects: Arc<dyn ObjectStore> = Arc::new(KubeObjects::new(client));
            let counting = Arc::new(CountingObjects::new(objects));
            let pools: Arc<dyn PoolSource> = FixedPools::new(vec![pool("bench-datastore", "10.252.0.0/16", 26)]);
            single_object("Kubernetes API, single-object allocator", counting, None, pools, pods).await
        })
    });
    thread.join().expect("the Kubernetes run")
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let pods = if bench { 200 } else { 20 };
    if !poolwarden_tests::privileged() || !poolwarden_tests::etcd::available() {
        eprintln!("SKIPPED: needs root and Debian's etcd");
        return;
    }
    // The cluster's directory is found before this thread leaves the machine's namespace.
    let cluster = poolwarden_tests::cluster_up();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare the network namespace (root?)");
    let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("ip");
    assert!(up.success(), "bringing loopback up failed");
    let etcd = EtcdCluster::on_loopback(3);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut rows = vec![runtime.block_on(multi_key(&etcd, pods))];
    rows.push(runtime.block_on(async {
        let mut config = EtcdConfig::from_spec(&etcd.datastore()).expect("etcd spec");
        config.prefix = "/single-object/".into();
        let plain = store::open(&etcd.datastore(), &config).await.expect("open etcd");
        let yaml = "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: bench}\nspec: {cidr: 10.252.0.0/16, blockSize: 26}\n";
        Catalog::new(Arc::clone(&plain))
            .apply(&parse_documents("bench.yaml", yaml).expect("pool"))
            .await
            .expect("apply");
        let counting_store = Arc::new(CountingStore::new(plain));
        let objects: Arc<dyn ObjectStore> = Arc::new(KeyValueObjects::new(counting_store.clone() as Arc<dyn Store>));
        // The pools are read through the counted store too, as the multi-key allocator's are.
        let pools: Arc<dyn PoolSource> = Arc::new(Catalog::new(counting_store.clone() as Arc<dyn Store>));
        let counting = Arc::new(CountingObjects::new(objects));
        single_object("etcd, single-object allocator", counting, Some(counting_store), pools, pods).await
    }));
    match &cluster {
        Some(dir) => rows.push(on_kubernetes(dir, pods)),
        None => eprintln!("no cluster: the Kubernetes API row is left out (cargo xtask cluster up --nodes 2)"),
    }
    drop(runtime);
    println!("\ndatastores: {pods} sequential ADDs then DELs on one node, blocks of 64 (same run)");
    println!(
        "{:<42} | {:>10} {:>10} | {:>10} {:>10} | {:>12} {:>12} | {:>14}",
        "backend", "ADD p50", "ADD p99", "DEL p50", "DEL p99", "req/ADD", "req/DEL", "etcd req/ADD,DEL"
    );
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    for row in &rows {
        println!(
            "{:<42} | {:>10} {:>10} | {:>10} {:>10} | {:>12.2} {:>12.2} | {:>14}",
            row.name,
            ms(percentile(&row.add, 0.5)),
            ms(percentile(&row.add, 0.99)),
            ms(percentile(&row.del, 0.5)),
            ms(percentile(&row.del, 0.99)),
            row.add_requests,
            row.del_requests,
            row.etcd.map_or("-".to_string(), |(a, d)| format!("{a:.2}, {d:.2}"))
        );
    }
    println!(
        "(etcd rows count the pools' reads; on Kubernetes an agent reads pools from its watch cache, so the row \
         counts none; the etcd requests include those the view's watch makes, one read per event)"
    );
    let base = percentile(&rows[0].add, 0.5).as_secs_f64();
    for row in &rows[1..] {
        println!(
            "ratio {} / {}: ADD p50 {:.2}x",
            row.name,
            rows[0].name,
            percentile(&row.add, 0.5).as_secs_f64() / base
        );
    }
}
