//! 1,000 pods on 10 simulated nodes (namespaces on one fabric bridge) sharing a three-member etcd cluster:
//! wall time for all ADDs and per-ADD median and p99, then the same pods through Debian's `bridge` +
//! `host-local` on the same nodes in the same run (a node-local peer with no shared datastore: a lower
//! bound for any cluster IPAM). Needs root (run by `cargo xtask bench --only cluster`).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use poolwarden_tests::{Fabric, NetNs, Runtime, etcd_on, k8s_args, nodes_on};
use serde_json::{Value, json};

const NODES: usize = 10;
const PODS: usize = 1000;
/// Pods being added at once on each node (kubelet starts a node's pods in parallel).
const PER_NODE: usize = 4;

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index].as_secs_f64() * 1000.0
}

/// ADD (or DEL) every pod through its node's runtime, `PER_NODE` at a time per node; returns the wall time
/// and each invocation's time.
fn run(command: &str, runtimes: &[(Runtime, Value)], pods: &[NetNs], tag: &str) -> (Duration, Vec<Duration>) {
    let times = Mutex::new(Vec::with_capacity(pods.len()));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for node in 0..runtimes.len() {
            for lane in 0..PER_NODE {
                let times = &times;
                scope.spawn(move || {
                    let (runtime, conf) = &runtimes[node];
                    let plugin = conf["type"].as_str().expect("type").to_string();
                    for (i, pod) in pods.iter().enumerate() {
                        if i % runtimes.len() != node || (i / runtimes.len()) % PER_NODE != lane {
                            continue;
                        }
                        let container = format!("{tag}-{i}");
                        let t = Instant::now();
                        let (ok, out) = runtime.plugin(
                            &plugin,
                            command,
                            &container,
                            &pod.path(),
                            &k8s_args("default", &container),
                            conf,
                        );
                        let elapsed = t.elapsed();
                        assert!(ok, "{plugin} {command} {container}: {out}");
                        times.lock().expect("times").push(elapsed);
                    }
                });
            }
        }
    });
    (started.elapsed(), times.into_inner().expect("times"))
}

fn report(label: &str, add: (Duration, Vec<Duration>), del: (Duration, Vec<Duration>)) -> (f64, f64) {
    let (add_wall, mut adds) = add;
    let (_, mut dels) = del;
    let (a50, a99, d50) = (percentile(&mut adds, 0.5), percentile(&mut adds, 0.99), percentile(&mut dels, 0.5));
    println!("{label:<40} {:>10.1} {a50:>9.2} {a99:>9.2} {d50:>9.2}", add_wall.as_secs_f64());
    (add_wall.as_secs_f64(), a50)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --all-targets` only checks that this builds.
    }
    let fabric = Fabric::new();
    let (_etcd_namespaces, cluster) = etcd_on(&fabric, 3);
    let mut nodes = nodes_on(&fabric, &cluster, NODES);
    nodes[0].apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: bench}\nspec: {cidr: 10.64.0.0/16, blockSize: 26}\n",
    );
    for node in &mut nodes {
        node.start_agent();
    }
    let pods: Vec<NetNs> = (0..PODS).map(|_| NetNs::new("pwb")).collect();

    let ours: Vec<(Runtime, Value)> = nodes.iter().map(|n| (n.runtime(), n.conf(json!({})))).collect();
    let peer: Vec<(Runtime, Value)> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let conf = json!({
                "cniVersion": "1.0.0", "name": "br", "type": "bridge", "bridge": "pwbr0", "isGateway": true,
                "ipam": { "type": "host-local", "subnet": format!("10.{}.0.0/16", 100 + i),
                          "dataDir": n.dir.path().join("host-local").display().to_string() }
            });
            (n.runtime(), conf)
        })
        .collect();

    println!(
        "\n{PODS} pods on {NODES} nodes ({PER_NODE} at a time per node), 3-member etcd, one run (ADD wall in s, per exec in ms)"
    );
    println!("{:<40} {:>10} {:>9} {:>9} {:>9}", "plugin", "ADD wall", "ADD p50", "ADD p99", "DEL p50");
    let ours_add = run("ADD", &ours, &pods, "pw");
    let ours_del = run("DEL", &ours, &pods, "pw");
    let (ours_wall, ours_p50) = report("poolwarden-cni (etcd, enforcing)", ours_add, ours_del);
    let peer_add = run("ADD", &peer, &pods, "br");
    let peer_del = run("DEL", &peer, &pods, "br");
    let (peer_wall, peer_p50) = report("bridge + host-local (node-local)", peer_add, peer_del);
    println!(
        "ratio poolwarden / bridge+host-local: ADD wall {:.2}x, ADD median {:.2}x (target: all ADDs under 20 s)",
        ours_wall / peer_wall,
        ours_p50 / peer_p50
    );
}
