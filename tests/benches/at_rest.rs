//! What a node costs the Kubernetes API server at rest (issue 17): requests per node per minute when nothing
//! changes, with 1, 2 and 1,000 nodes, in the same run, on the cluster of `cargo xtask cluster up`.
//!
//! - The cluster's own agents: read from their metrics endpoints (`poolwarden_kubernetes_requests_total`,
//!   counted by every agent's client), over the window.
//! - Simulated nodes: in this process, each with a client of its own counting what it sends, and what an agent
//!   on the Kubernetes datastore (the DaemonSet's default) opens against the API server: its directory
//!   (namespaces, its pods, its Node), the pool resources and the pools' Lease (`ResourcePools`, and
//!   `PoolSync::judge` competing for the lease with the real agents), its blocks' view (the single-object
//!   allocator's two label-selected watches on `ipamblocks`) and what it routes by (`Membership`: every Node
//!   and every IPAMBlock, listed and watched). 1, 2, then 1,000 of them; the start-up requests (lists and
//!   watches opened) are reported apart from the window.
//!
//! Needs root and a cluster (`cargo xtask bench --only at-rest`, which runs it from the tests' build with
//! `--bench`: it counts requests, its one time figure is how long the simulated nodes took to start); under
//! plain `cargo test` it is skipped (it takes about 17 minutes).

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use poolwarden::{
    allocator::single::{BlockAllocator, PoolSource},
    daemon::membership::{Membership, Source},
    k8s::{
        self, KubeDirectory,
        pools::{PoolSync, ResourcePools},
        requests::{ApiRequest, Tally},
    },
    objects::{ObjectStore, kubernetes::KubeObjects},
};

/// The window each figure is measured over: longer than a watch lasts (kube-rs asks the API server to end a
/// watch after 290 s, and then opens it again), so that re-opening every watch once is in it, as it is in
/// every such stretch of an agent's life. `POOLWARDEN_AT_REST_WINDOW=<seconds>` changes it.
fn window() -> Duration {
    let seconds = std::env::var("POOLWARDEN_AT_REST_WINDOW").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    Duration::from_secs(seconds)
}

/// One simulated node and what it keeps open.
struct Simulated {
    tally: Arc<Tally>,
    _directory: Arc<KubeDirectory>,
    _allocator: Arc<BlockAllocator>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Simulated {
    fn drop(&mut self) {
        self.tasks.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

fn total(counts: &BTreeMap<ApiRequest, u64>) -> u64 {
    counts.values().sum()
}

/// Start `n` simulated nodes named `<run>-<i>`, each with its own counted client; return once every one's
/// caches have listed and its blocks' view is open (its first list; retried while the API server is busy with
/// the others' start).
async fn start(config: &kube::Config, run: &str, n: usize) -> Vec<Simulated> {
    let mut nodes = Vec::with_capacity(n);
    let mut ready = Vec::with_capacity(n);
    for i in 0..n {
        let node = format!("{run}-{i:04}");
        let tally = Arc::new(Tally::default());
        let client = k8s::counted_client(config.clone(), Arc::clone(&tally)).expect("a client");
        let directory = Arc::new(KubeDirectory::start(client.clone(), &node));
        let pools = Arc::new(ResourcePools::start(client.clone()));
        let judge = tokio::spawn(PoolSync::judge(client.clone()).run("kube-system".into(), node.clone()));
        let membership = Arc::new(Membership::new(Source::Kubernetes(client.clone())));
        let follow = tokio::spawn(Arc::clone(&membership).follow());
        let objects: Arc<dyn ObjectStore> = Arc::new(KubeObjects::new(client));
        let allocator = Arc::new(BlockAllocator::new(objects, Arc::clone(&pools) as Arc<dyn PoolSource>));
        ready.push(tokio::spawn({
            let (directory, allocator) = (Arc::clone(&directory), Arc::clone(&allocator));
            async move {
                let deadline = Instant::now() + Duration::from_secs(600);
                while !directory.wait_ready(Duration::from_secs(30)).await {
                    assert!(Instant::now() < deadline, "{node}'s caches did not sync in 10 minutes");
                }
                while !pools.wait_ready(Duration::from_secs(30)).await {
                    assert!(Instant::now() < deadline, "{node}'s pool resources were not listed in 10 minutes");
                }
                while let Err(e) = allocator.node_blocks(&node).await {
                    assert!(Instant::now() < deadline, "{node}'s blocks were not listed in 10 minutes: {e}");
                }
                while !membership.is_followed() {
                    assert!(Instant::now() < deadline, "{node}'s nodes and blocks were not followed in 10 minutes");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }));
        nodes.push(Simulated { tally, _directory: directory, _allocator: allocator, tasks: vec![judge, follow] });
    }
    for started in ready {
        started.await.expect("a simulated node's start");
    }
    nodes
}

/// Per node per minute over the window: (mean, max, by kind summed over the nodes, per node).
fn rates(
    before: &[BTreeMap<ApiRequest, u64>],
    after: &[BTreeMap<ApiRequest, u64>],
    window: Duration,
) -> (f64, f64, BTreeMap<ApiRequest, f64>) {
    let per_minute = 60.0 / window.as_secs_f64();
    let mut by_kind: BTreeMap<ApiRequest, f64> = BTreeMap::new();
    let mut max = 0.0f64;
    let mut sum = 0.0;
    for (b, a) in before.iter().zip(after) {
        let node = (total(a) - total(b)) as f64 * per_minute;
        max = max.max(node);
        sum += node;
        for (kind, n) in a {
            let moved = (n - b.get(kind).copied().unwrap_or(0)) as f64 * per_minute / before.len() as f64;
            if moved > 0.0 {
                *by_kind.entry(kind.clone()).or_default() += moved;
            }
        }
    }
    (sum / before.len() as f64, max, by_kind)
}

fn kinds(by_kind: &BTreeMap<ApiRequest, f64>) -> String {
    if by_kind.is_empty() {
        return "none".into();
    }
    by_kind.iter().map(|(k, n)| format!("{} {} {n:.2}", k.verb, k.resource)).collect::<Vec<_>>().join(", ")
}

/// The cluster's agents' counts, from their metrics endpoints: (node, holds the lease, counts).
async fn agents(client: &kube::Client) -> Vec<(String, bool, BTreeMap<ApiRequest, u64>)> {
    use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
    let holder = kube::Api::<Lease>::namespaced(client.clone(), "kube-system")
        .get("poolwarden-pools")
        .await
        .ok()
        .and_then(|l| l.spec?.holder_identity)
        .unwrap_or_default();
    let pods = kube::Api::<Pod>::namespaced(client.clone(), "kube-system")
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=poolwarden"))
        .await
        .expect("the agents' pods");
    let mut found = Vec::new();
    for pod in pods {
        let node = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
        let ip = pod.status.and_then(|s| s.host_ip).unwrap_or_default();
        let out = std::process::Command::new("curl")
            .args(["-s", "--max-time", "3", &format!("http://{ip}:9641/metrics")])
            .output()
            .expect("curl");
        let counts = poolwarden_tests::api_requests(&String::from_utf8_lossy(&out.stdout))
            .into_iter()
            .map(|((verb, resource), value)| (ApiRequest { verb, resource }, value as u64))
            .collect();
        found.push((node.clone(), node == holder, counts));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("SKIPPED: a bench of minutes on the cluster (cargo xtask bench --only at-rest)");
        return;
    }
    let Some(dir) = poolwarden_tests::cluster_up() else {
        eprintln!("no cluster: cargo xtask cluster up --nodes 2 && cargo xtask cluster install first");
        std::process::exit(1);
    };
    let netns = std::fs::File::open("/run/netns/pwk-cp").expect("the control plane's namespace");
    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns (root?)");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    runtime.block_on(async {
        let file = kube::config::Kubeconfig::read_from(dir.join("admin.kubeconfig")).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(file, &Default::default()).await.expect("config");
        let admin = k8s::counted_client(config.clone(), Arc::new(Tally::default())).expect("client");
        let run = format!("rest{}", std::process::id());

        let window = window();
        println!("at rest: Kubernetes API requests per node per minute, {}s windows (same run)", window.as_secs());
        // The cluster's agents over the whole run (their window is the simulations').
        let (agents_before, agents_since) = (agents(&admin).await, Instant::now());
        let mut followers = BTreeMap::new();
        for n in [1usize, 2, 1000] {
            let started = Instant::now();
            let nodes = start(&config, &format!("{run}-{n}"), n).await;
            let up = started.elapsed();
            tokio::time::sleep(Duration::from_secs(5)).await;
            let before: Vec<_> = nodes.iter().map(|s| s.tally.counts()).collect();
            let startup = before.iter().map(total).sum::<u64>() as f64 / n as f64;
            tokio::time::sleep(window).await;
            let after: Vec<_> = nodes.iter().map(|s| s.tally.counts()).collect();
            let (mean, max, by_kind) = rates(&before, &after, window);
            println!(
                "  {n:>4} simulated node(s): {mean:.2}/min per node (max {max:.2}); all of them {:.1}/min; \
                 start-up {startup:.1} requests per node, all up in {up:.1?} ({})",
                mean * n as f64,
                kinds(&by_kind)
            );
            followers.insert(n, mean);
            drop(nodes);
        }
        let (after, elapsed) = (agents(&admin).await, agents_since.elapsed());
        let mut holder = None;
        for ((node, holds, b), (_, _, a)) in agents_before.iter().zip(&after) {
            let (rate, _, by_kind) = rates(std::slice::from_ref(b), std::slice::from_ref(a), elapsed);
            let role = if *holds { "holds the pools' lease" } else { "follows the lease" };
            println!(
                "  the cluster's agent on {node} ({role}), over {:.0?}: {rate:.2}/min ({})",
                elapsed,
                kinds(&by_kind)
            );
            if *holds {
                holder = Some(rate);
            }
        }
        // A cluster of n nodes: one holder and n - 1 followers (each measured above, the followers with n of them).
        if let Some(holder) = holder {
            for (n, follower) in &followers {
                let all = holder + (*n as f64 - 1.0) * follower;
                println!(
                    "  a cluster of {n:>4} node(s): {:.2}/min per node, {all:.1}/min in all (the holder's {holder:.2} \
                     and {} follower(s) at {follower:.2})",
                    all / *n as f64,
                    n - 1
                );
            }
        }
    });
}
