//! Per-node cost against cluster size (issue 14): with 10, 100 and 1,000 registered nodes holding 30 pods each
//! (nodes simulated as store writers: registrations and allocations written through the allocator the agents
//! run, in block objects), the etcd
//! requests and keys read by one STATUS, one metrics scrape, one garbage collection pass, one route reconcile
//! (routes to every other node's block) and one ADD of one real agent, printed side by side; and, as the peers
//! measured in the same run, what the same actions read before (one whole-store snapshot each, now every block
//! object; the reconcile listed every node and block). Target: the same at 1,000 nodes as at 10. Under `cargo test` it
//! runs with 10 and 100 nodes and fails if any action reads more requests or keys with more nodes.
//!
//! The agent runs in a network namespace this bench makes (its IPAM-only ADDs touch no interface, but the
//! agent's netlink socket lives there), with etcd on that namespace's loopback. Needs root and Debian's etcd
//! (`cargo xtask bench --only cost`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use poolwarden::{
    allocator::{AssignRequest, single::BlockAllocator},
    catalog::{Catalog, encode},
    cluster::NodeRecord,
    daemon::{Agent, EnforcementMode, Lifetimes, membership::Routing},
    ipam::{NamespaceInfo, NodeInfo, PodInfo},
    resources::parse_documents,
    store::{
        self, Store, Txn,
        counting::{CountingStore, Counts},
        etcd::EtcdConfig,
        keys,
    },
};
use poolwarden_protocol::{AddRequest, Request, Response};
use poolwarden_tests::etcd::EtcdCluster;

const SIZES: [usize; 3] = [10, 100, 1000];
const PODS_PER_NODE: usize = 30;
const POOL: &str =
    "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: big}\nspec: {cidr: 10.0.0.0/8, blockSize: 26}\n";
/// The node the agent runs as.
const ME: &str = "node-0000";

fn node_name(i: usize) -> String {
    format!("node-{i:04}")
}

/// Register node `i` as its agent would (without a lease: it stays for the run).
async fn register(store: &dyn Store, i: usize) {
    let record = NodeRecord {
        name: node_name(i),
        addresses: vec![IpAddr::V4(Ipv4Addr::new(192, 168, (i / 250) as u8, (i % 250 + 1) as u8))],
        labels: BTreeMap::new(),
    };
    let txn = Txn::new()
        .put(keys::node(&record.name), encode(&record))
        .put(keys::node_addresses(&record.name), encode(&record));
    store.txn(txn).await.expect("register");
}

/// Nodes 1..nodes, each with `PODS_PER_NODE` addresses, 32 assignments in flight.
async fn simulate(store: Arc<dyn Store>, nodes: usize) {
    let allocator = Arc::new(BlockAllocator::of_store(Arc::clone(&store)));
    let loaded = Arc::new(allocator.load().await.expect("pools"));
    for i in 1..nodes {
        register(store.as_ref(), i).await;
    }
    let jobs: Vec<(usize, usize)> = (1..nodes).flat_map(|n| (0..PODS_PER_NODE).map(move |p| (n, p))).collect();
    let mut lanes = Vec::new();
    for lane in 0..32 {
        let (allocator, loaded) = (Arc::clone(&allocator), Arc::clone(&loaded));
        let mine: Vec<(usize, usize)> = jobs.iter().copied().skip(lane).step_by(32).collect();
        lanes.push(tokio::spawn(async move {
            for (n, p) in mine {
                let handle = format!("sim-{n}-{p}.eth0");
                let request = AssignRequest {
                    handle: handle.clone(),
                    node: NodeInfo { name: node_name(n), labels: BTreeMap::new() },
                    namespace: NamespaceInfo { name: "bench".into(), ..Default::default() },
                    pod: Some(PodInfo { name: handle, annotations: BTreeMap::new() }),
                    requested: Default::default(),
                    eligible: None,
                    attributes: BTreeMap::new(),
                };
                allocator.assign(&request, &loaded).await.expect("assign");
            }
        }));
    }
    for lane in lanes {
        lane.await.expect("lane");
    }
}

fn add(i: usize) -> Request {
    Request::Add(AddRequest {
        container_id: format!("pod{i:05}"),
        ifname: "eth0".into(),
        netns: format!("/run/netns/poolwarden-cost-bench-{i}"),
        namespace: "bench".into(),
        pod: format!("pod-{i}"),
        network: "bench".into(),
        ..Default::default()
    })
}

/// What one action cost: (requests, keys read, bytes read).
fn cell(counts: Counts) -> String {
    format!("{:>5} req {:>6} keys {:>9} B", counts.requests, counts.keys, counts.bytes)
}

async fn measure(etcd: &EtcdCluster, nodes: usize) -> Vec<(&'static str, Counts)> {
    let mut config = EtcdConfig::from_spec(&etcd.datastore()).expect("etcd spec");
    config.prefix = format!("/cost-{nodes}/");
    let plain = store::open(&etcd.datastore(), &config).await.expect("open etcd");
    let docs = parse_documents("bench.yaml", POOL).expect("pool");
    Catalog::new(Arc::clone(&plain)).apply(&docs).await.expect("apply");
    let started = Instant::now();
    simulate(Arc::clone(&plain), nodes).await;
    eprintln!("{nodes} nodes: {} addresses written in {:.1?}", (nodes - 1) * PODS_PER_NODE, started.elapsed());

    let counting = Arc::new(CountingStore::new(Arc::clone(&plain)));
    let dir = tempfile::tempdir().expect("bpf dir");
    let lifetimes = Lifetimes {
        leak_grace: Duration::from_secs(3600),
        node_gone_after: Duration::from_secs(86_400),
        registration_ttl: Duration::from_secs(60),
    };
    let node = NodeInfo { name: ME.into(), labels: BTreeMap::new() };
    let shared: Arc<dyn Store> = counting.clone();
    let agent =
        Agent::new(node, shared, EnforcementMode::Off, dir.path(), vec!["192.168.200.1".parse().unwrap()], lifetimes)
            .expect("agent");
    agent.register().await.expect("register");
    for i in 0..PODS_PER_NODE {
        let answer = agent.handle(add(i)).await;
        assert!(matches!(answer, Response::Added { .. }), "{answer:?}");
    }
    agent.follow_membership();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.membership_followed() {
        assert!(Instant::now() < deadline, "the membership watches never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    counting.take();
    let mut rows = Vec::new();
    agent.status().await.expect("status");
    rows.push(("STATUS", counting.take()));
    agent.refresh_pool_metrics().await;
    let _ = agent.metrics.render();
    rows.push(("metrics scrape", counting.take()));
    agent.collect_garbage().await.expect("gc");
    rows.push(("GC pass", counting.take()));
    // Routes to every other node's block (the namespace's dummy link makes their addresses reachable).
    agent.reconcile().await.expect("reconcile");
    let table = std::process::Command::new("ip").args(["-4", "route", "show"]).output().expect("ip route");
    let routed = String::from_utf8_lossy(&table.stdout).lines().filter(|l| l.contains(" via 192.168.")).count();
    assert!(routed >= nodes - 1, "{routed} routes for {} other nodes", nodes - 1);
    rows.push(("route reconcile", counting.take()));
    let answer = agent.handle(add(PODS_PER_NODE)).await;
    assert!(matches!(answer, Response::Added { .. }), "{answer:?}");
    // The node's view follows its blocks' label pointers and reads the block each write of it points to
    // (`objects::kv`): that read of the ADD's own write is the ADD's, whenever its event arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rows.push(("ADD", counting.take()));
    // The peer: the whole-store snapshot each of the first three read before.
    let allocator = BlockAllocator::of_store(counting.clone() as Arc<dyn Store>);
    allocator.snapshot().await.expect("snapshot");
    rows.push(("whole-store snapshot (before)", counting.take()));
    // The route reconcile's peer: the nodes, blocks and borrowed addresses it listed before.
    Routing::list(counting.as_ref()).await.expect("routing");
    rows.push(("routes listed (before)", counting.take()));
    rows
}

fn main() {
    // `cargo test --all-targets` runs it as a check with 10 and 100 nodes; `cargo bench` measures up to 1,000.
    let bench = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if bench { &SIZES } else { &SIZES[..2] };
    if !poolwarden_tests::privileged() || !poolwarden_tests::etcd::available() {
        return;
    }
    // A network namespace of the bench's own, with its loopback up, for the agent's netlink socket and etcd.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare the network namespace (root?)");
    let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("ip");
    assert!(up.success(), "bringing loopback up failed");
    // The simulated nodes' addresses (192.168.0.0/16) on a link of the namespace (a veth pair, both ends
    // here: this kernel has no dummy links), so routes via them can be made by a route reconcile.
    for args in [
        &["link", "add", "pwcost0", "type", "veth", "peer", "name", "pwcost1"][..],
        &["address", "add", "192.168.255.254/16", "dev", "pwcost0"],
        &["link", "set", "pwcost1", "up"],
        &["link", "set", "pwcost0", "up"],
    ] {
        let status = std::process::Command::new("ip").args(args).status().expect("ip");
        assert!(status.success(), "ip {args:?} failed");
    }
    let etcd = EtcdCluster::on_loopback(1);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut table: Vec<(usize, Vec<(&'static str, Counts)>)> = Vec::new();
    for &nodes in sizes {
        table.push((nodes, runtime.block_on(measure(&etcd, nodes))));
    }
    let last = table.len() - 1;
    println!("\nper-node cost: what one action of {ME} reads from etcd, {PODS_PER_NODE} pods per node");
    print!("{:<30}", "action");
    for (nodes, _) in &table {
        print!(" | {:<35}", format!("{nodes} nodes"));
    }
    println!(" | ratio of requests / keys, {} vs {}", table[last].0, table[0].0);
    for row in 0..table[0].1.len() {
        print!("{:<30}", table[0].1[row].0);
        for (_, rows) in &table {
            print!(" | {:<35}", cell(rows[row].1));
        }
        let (small, big) = (table[0].1[row].1, table[last].1[row].1);
        println!(
            " | {:.2} / {:.2}",
            big.requests as f64 / small.requests.max(1) as f64,
            big.keys as f64 / small.keys.max(1) as f64
        );
    }
    // Every action of the node but the peers (what was read before) reads the same at every size.
    for row in 0..table[0].1.len() {
        let (action, small) = table[0].1[row];
        if action.ends_with("(before)") {
            continue;
        }
        let big = table[last].1[row].1;
        assert_eq!(
            (small.requests, small.keys),
            (big.requests, big.keys),
            "{action} reads more with {} nodes than with {}",
            table[last].0,
            table[0].0
        );
    }
}
