//! Route programming: the agent's reconcile of 10,000 other nodes' blocks (aggregate routes via their node
//! addresses) from scratch, from a warm state (nothing to change) and with 1% of the blocks moved to another
//! node, against the same routes loaded by `ip -batch` in the same run, each in a network namespace of its
//! own. Medians of several runs. Needs root (run by `cargo xtask bench`).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::{Duration, Instant},
};

use ipnet::{IpNet, Ipv4Net};
use poolwarden::dataplane::routes::{OwnedRoute, ROUTE_PROTOCOL, Routes};

const BLOCKS: u32 = 10_000;
const NODES: u32 = 10;
const RUNS: usize = 5;

/// A namespace with a veth pair, one end holding 10.98.0.1/16 (so the node addresses are on-link; this kernel
/// has no dummy device), deleted on drop.
struct Namespace(String);

impl Namespace {
    fn new(name: String) -> Self {
        let ok = |args: &[&str]| Command::new("ip").args(args).status().is_ok_and(|s| s.success());
        assert!(ok(&["netns", "add", &name]), "ip netns add {name} (root needed)");
        let ns = Self(name);
        for args in [
            &["link", "add", "fabric0", "type", "veth", "peer", "name", "fabric1"][..],
            &["addr", "add", "10.98.0.1/16", "dev", "fabric0"],
            &["link", "set", "fabric1", "up"],
            &["link", "set", "fabric0", "up"],
        ] {
            assert!(ok(&[&["-n", ns.0.as_str()][..], args].concat()), "ip {args:?} in {}", ns.0);
        }
        ns
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn node_address(node: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 98, 0, 2 + node as u8))
}

/// The routes to 10,000 /26 blocks spread over ten nodes; `moved` of them on the next node instead.
fn remote_blocks(moved: u32) -> BTreeSet<OwnedRoute> {
    (0..BLOCKS)
        .map(|i| {
            let block = IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 6)), 26).expect("block"));
            let node = if i < moved { (i + 1) % NODES } else { i % NODES };
            OwnedRoute::Remote(block, node_address(node))
        })
        .collect()
}

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

fn ip_batch(ns: &str, verb: &str, moved: u32) -> Duration {
    let mut batch = String::new();
    for route in remote_blocks(moved) {
        if let OwnedRoute::Remote(block, via) = route {
            batch.push_str(&format!("route {verb} {block} via {via} proto {ROUTE_PROTOCOL}\n"));
        }
    }
    let file = tempfile::NamedTempFile::new().expect("batch file");
    std::fs::write(file.path(), batch).expect("write batch");
    let started = Instant::now();
    let status = Command::new("ip").args(["-n", ns, "-batch"]).arg(file.path()).status().expect("ip -batch");
    let elapsed = started.elapsed();
    assert!(status.success(), "ip -batch {verb} failed");
    elapsed
}

fn flush(ns: &str) {
    let _ = Command::new("ip").args(["-n", ns, "route", "flush", "proto", &ROUTE_PROTOCOL.to_string()]).status();
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --all-targets` only checks that this builds.
    }
    let tag = std::process::id() % 100_000;
    let ours = Namespace::new(format!("pwbench-routes-{tag}"));
    let peer = Namespace::new(format!("pwbench-ipbatch-{tag}"));

    // The agent's route programming runs on a thread that entered our namespace before opening netlink.
    let name = ours.0.clone();
    let (cold, warm, moved) = std::thread::spawn(move || {
        let netns = std::fs::File::open(format!("/var/run/netns/{name}")).expect("open netns");
        nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the namespace");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let routes = Routes::connect().expect("netlink");
            let (all, shifted) = (remote_blocks(0), remote_blocks(BLOCKS / 100));
            let (mut cold, mut warm, mut moved) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..RUNS {
                flush(&name);
                let started = Instant::now();
                let (added, _) = routes.reconcile(&all).await.expect("reconcile from scratch");
                cold.push(started.elapsed());
                assert_eq!(added, BLOCKS as usize);
                let started = Instant::now();
                let (added, removed) = routes.reconcile(&all).await.expect("warm reconcile");
                warm.push(started.elapsed());
                assert_eq!((added, removed), (0, 0));
                let started = Instant::now();
                let (added, _) = routes.reconcile(&shifted).await.expect("reconcile 1% moved");
                moved.push(started.elapsed());
                assert_eq!(added, (BLOCKS / 100) as usize);
            }
            (cold, warm, moved)
        })
    })
    .join()
    .expect("route programming thread");

    let (mut peer_cold, mut peer_warm) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        flush(&peer.0);
        peer_cold.push(ip_batch(&peer.0, "add", 0));
        peer_warm.push(ip_batch(&peer.0, "replace", 0));
    }
    let count = Command::new("ip").args(["-n", &peer.0, "route", "show", "proto", "97"]).output().expect("ip route");
    assert_eq!(String::from_utf8_lossy(&count.stdout).lines().count(), BLOCKS as usize, "ip -batch loaded them all");

    println!("\nroute programming, {BLOCKS} remote blocks via {NODES} node addresses, median of {RUNS} runs (ms)");
    println!("{:<48} {:>10} {:>12} {:>8}", "", "poolwarden", "ip -batch", "ratio");
    let (c, pc) = (median(cold), median(peer_cold));
    println!("{:<48} {c:>10.1} {pc:>12.1} {:>7.2}x", "from scratch (ip: route add)", c / pc);
    let (w, pw) = (median(warm), median(peer_warm));
    println!("{:<48} {w:>10.1} {pw:>12.1} {:>7.2}x", "warm, nothing to change (ip: route replace all)", w / pw);
    println!("{:<48} {:>10.1} {:>12} {:>8}", "1% of the blocks moved to another node", median(moved), "-", "-");
}
