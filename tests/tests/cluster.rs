//! A simulated cluster: a fabric namespace with a bridge, node namespaces each running an agent on a shared
//! etcd cluster whose members run in namespaces of their own. Every address is inside those namespaces.

use std::time::{Duration, Instant};

use poolwarden_tests::{
    Fabric, NetNs, Node, address_of,
    etcd::{self, EtcdCluster, Placement},
    etcd_on, k8s_args, nodes_on, privileged, wait_for,
};
use serde_json::json;

const SEED_POOLS: &str = include_str!("../../examples/calico/seed-pools.yaml");

fn our_routes(node: &Node) -> String {
    node.ns.exec(&["ip", "route", "show", "proto", "97"])
}

/// The block (a /29 of the seed's pools) an address is in.
fn block_of(address: &str) -> String {
    let ip: std::net::Ipv4Addr = address.parse().expect("IPv4 address");
    let base = u32::from(ip) & !7;
    format!("{}/29", std::net::Ipv4Addr::from(base))
}

#[test]
fn three_nodes_route_every_pod_to_every_other() {
    if !privileged() || !etcd::available() {
        return;
    }
    let fabric = Fabric::new();
    let (_etcd_namespaces, cluster) = etcd_on(&fabric, 3);
    let mut nodes = nodes_on(&fabric, &cluster, 3);
    nodes[0].apply(SEED_POOLS);
    nodes[0].cli_ok(&["annotate", "namespace", "external-ns", "poolwarden.io/ipv4pools=[\"external-pool\"]"]);
    nodes[0].cli_ok(&["annotate", "namespace", "internal-ns", "cni.projectcalico.org/ipv4pools=[\"internal-pool\"]"]);
    for node in &mut nodes {
        node.start_agent_with(&["--registration-ttl", "3s"]);
    }

    // Every agent registered its node with the address other nodes route its blocks to.
    let registered = nodes[0].cli_ok(&["get", "nodes"]);
    for n in 0..3 {
        assert!(
            registered.contains(&format!("node-{n}")) && registered.contains(&format!("10.99.0.{}", n + 1)),
            "{registered}"
        );
    }

    // Two pods per namespace per node.
    let mut pods = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for namespace in ["external-ns", "internal-ns"] {
            for i in 0..2 {
                let name = format!("{namespace}-{n}-{i}");
                let (ns, result) = node.add_pod(&format!("c-{name}"), namespace, &name);
                let address = address_of(&result);
                let expected = if namespace == "external-ns" { "172.16.0." } else { "192.168." };
                assert!(address.starts_with(expected), "{name} got {address}, outside its namespace's pool");
                pods.push((n, name, ns, address));
            }
        }
    }

    // Every node: a blackhole for each of its own blocks, an aggregate route to every other node's blocks.
    let last_add = Instant::now();
    for (n, node) in nodes.iter().enumerate() {
        wait_for(&format!("node-{n}'s routes to the other nodes' blocks"), Duration::from_secs(5), || {
            let routes = our_routes(node);
            pods.iter().all(|(owner, _, _, address)| {
                let block = block_of(address);
                if *owner == n {
                    routes.contains(&format!("blackhole {block}"))
                } else {
                    routes.contains(&format!("{block} via 10.99.0.{} dev fabric0", owner + 1))
                }
            })
        });
    }

    eprintln!("routes on every node {:?} after the last ADD returned", last_add.elapsed());
    for (_, from, from_ns, _) in &pods {
        for (_, to, _, address) in &pods {
            if from != to {
                assert!(from_ns.pings(address), "{from} cannot reach {to} at {address}");
            }
        }
    }

    // DEL everything: no endpoint route is left on any node, the aggregates stay with the blocks.
    for (n, name, ns, _) in &pods {
        let (ok, out) =
            nodes[*n].cni("DEL", &format!("c-{name}"), &ns.path(), &k8s_args("x", name), &nodes[*n].conf(json!({})));
        assert!(ok, "DEL {name}: {out}");
    }
    for node in &nodes {
        let routes = our_routes(node);
        assert!(!routes.contains("dev pw"), "endpoint routes left on {}:\n{routes}", node.name);
    }
    let check = nodes[0].cli(&["ipam", "check"]);
    assert!(check.status.success(), "ipam check: {}", String::from_utf8_lossy(&check.stdout));

    // A node whose agent stops: its registration expires with its lease, but its pods may still run, so the
    // other nodes' routes to it stay; once an operator decommissions it, they go.
    nodes[2].kill_agent();
    wait_for("node-2's registration to expire", Duration::from_secs(15), || {
        !nodes[0].cli_ok(&["get", "nodes"]).contains("node-2")
    });
    assert!(our_routes(&nodes[0]).contains("via 10.99.0.3"), "routes to a node whose agent is down stay");
    nodes[0].cli_ok(&["node", "decommission", "node-2"]);
    wait_for("routes via node-2 to go", Duration::from_secs(5), || !our_routes(&nodes[0]).contains("via 10.99.0.3"));
}

#[test]
fn a_node_borrows_from_a_full_pool_and_its_pod_is_reachable() {
    if !privileged() || !etcd::available() {
        return;
    }
    let fabric = Fabric::new();
    let (_etcd_namespaces, cluster) = etcd_on(&fabric, 1);
    let mut nodes = nodes_on(&fabric, &cluster, 3);
    // One block in the whole pool: the first node to ask claims it; the others can only borrow.
    nodes[0].apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: tiny}\nspec: {cidr: 10.77.0.0/29, blockSize: 29}\n",
    );
    for node in &mut nodes {
        node.start_agent();
    }
    let (owner_ns, owner_pod) = nodes[0].add_pod("c-owner", "default", "owner");
    let (borrower_ns, borrower_pod) = nodes[1].add_pod("c-borrower", "default", "borrower");
    let (third_ns, third_pod) = nodes[2].add_pod("c-third", "default", "third");
    let (owner_ip, borrower_ip, third_ip) = (address_of(&owner_pod), address_of(&borrower_pod), address_of(&third_pod));
    assert!(our_routes(&nodes[0]).contains("blackhole 10.77.0.0/29"), "{}", our_routes(&nodes[0]));
    assert!(!our_routes(&nodes[1]).contains("blackhole"), "a borrower gets no blackhole for another's block");

    // The owner routes the borrowed addresses to their nodes over its own blackhole (Calico's issue #3246).
    for (borrowed, via) in [(&borrower_ip, "10.99.0.2"), (&third_ip, "10.99.0.3")] {
        wait_for(&format!("a /32 for {borrowed} via {via} on the owner"), Duration::from_secs(5), || {
            our_routes(&nodes[0]).contains(&format!("{borrowed} via {via} dev fabric0"))
        });
    }
    for (from, from_ns, to) in [
        ("owner", &owner_ns, &borrower_ip),
        ("borrower", &borrower_ns, &owner_ip),
        ("third", &third_ns, &borrower_ip),
        ("borrower", &borrower_ns, &third_ip),
        ("owner", &owner_ns, &third_ip),
    ] {
        assert!(from_ns.pings(to), "{from} cannot reach {to}");
    }

    // The borrowed address's routes go with its pod.
    let (ok, out) = nodes[1].cni(
        "DEL",
        "c-borrower",
        &borrower_ns.path(),
        &k8s_args("default", "borrower"),
        &nodes[1].conf(json!({})),
    );
    assert!(ok, "DEL: {out}");
    let deleted = Instant::now();
    wait_for("the borrowed address's /32 to go", Duration::from_secs(5), || {
        !our_routes(&nodes[0]).contains(&format!("{borrower_ip} via"))
            && !our_routes(&nodes[2]).contains(&format!("{borrower_ip} via"))
    });
    eprintln!("the borrowed address's /32 left the other nodes {:?} after its DEL returned", deleted.elapsed());
}

#[test]
fn a_node_removed_for_good_gives_its_addresses_and_blocks_back_to_the_others() {
    if !privileged() || !etcd::available() {
        return;
    }
    let fabric = Fabric::new();
    let (_etcd_namespaces, cluster) = etcd_on(&fabric, 1);
    let mut nodes = nodes_on(&fabric, &cluster, 2);
    // Two blocks in the whole pool, one per node; released addresses cool down for 3 s, so node-1's block,
    // emptied by the collection, waits that long owned by nobody before it goes back.
    nodes[0].apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: two}\nspec: {cidr: 10.78.0.0/28, blockSize: 29}\n---\n\
apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {reuseCooldownSeconds: 3}\n",
    );
    for node in &mut nodes {
        node.start_agent_with(&["--registration-ttl", "2s", "--leak-grace-period", "1s"]);
    }
    let (first_ns, first) = nodes[0].add_pod("c-first", "default", "first");
    let (_lost_ns, lost) = nodes[1].add_pod("c-lost", "default", "lost");
    let lost_block = block_of(&address_of(&lost));
    assert_ne!(block_of(&address_of(&first)), lost_block, "each node claimed a block of its own");

    // node-1 goes for good with its pod still there: nobody will DEL it. An agent that merely stopped keeps
    // its node's addresses (--node-gone-after, days); the operator says this node is gone.
    nodes[1].kill_agent();
    wait_for("node-1's registration to lapse", Duration::from_secs(10), || {
        !nodes[0].cli_ok(&["get", "nodes"]).contains("node-1")
    });
    nodes[0].cli_ok(&["node", "decommission", "node-1"]);
    wait_for("node-1's blocks and addresses to be taken back", Duration::from_secs(20), || {
        let affinities = nodes[0].cli_ok(&["get", "affinities"]);
        let blocks = nodes[0].cli_ok(&["get", "blocks"]);
        !affinities.contains("node-1") && !blocks.contains(&lost_block)
    });
    let check = nodes[0].cli(&["ipam", "check"]);
    assert!(check.status.success(), "ipam check after the collection: {}", String::from_utf8_lossy(&check.stdout));
    // Holding nothing any more, node-1 is forgotten: its decommission marker goes too.
    wait_for("node-1's decommission marker to go", Duration::from_secs(10), || {
        !cluster.keys().iter().any(|k| k.ends_with("decommissioned/node-1"))
    });
    assert!(nodes[0].agent_log().contains("its marker is removed"), "{}", nodes[0].agent_log());

    // node-0 fills its own block (7 more), then claims node-1's former block for the next pod.
    let mut pods = Vec::new();
    for i in 0..8 {
        let (ns, result) = nodes[0].add_pod(&format!("c-more-{i}"), "default", &format!("more-{i}"));
        pods.push((ns, address_of(&result)));
    }
    let (last_ns, last) = pods.last().expect("pods");
    assert_eq!(block_of(last), lost_block, "the 8th pod's address comes from the block node-1 gave back");
    assert!(first_ns.pings(last) && last_ns.pings(&address_of(&first)), "the reused block's pod is reachable");
}

#[test]
fn vxlan_carries_pods_between_nodes_on_different_segments() {
    if !privileged() || !etcd::available() {
        return;
    }
    // Two segments joined by a router that knows the nodes' subnets and nothing of the pools.
    let (segment_a, segment_b) = (Fabric::new(), Fabric::new());
    let router = NetNs::new("pwr");
    segment_a.attach(&router, "10.99.1.254/24");
    segment_b.attach_as(&router, "10.99.2.254/24", "fabric1");
    router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let etcd_ns = NetNs::new("pwe");
    segment_a.attach(&etcd_ns, "10.99.1.101/24");
    etcd_ns.exec(&["ip", "route", "add", "10.99.2.0/24", "via", "10.99.1.254"]);
    let cluster = EtcdCluster::start(vec![Placement {
        netns: Some(etcd_ns.name.clone()),
        address: "10.99.1.101".into(),
        client_port: 2379,
        peer_port: 2380,
    }]);
    // node-0 and node-2 on segment A, node-1 on segment B.
    let mut nodes = Vec::new();
    for (i, (segment, address, other, router_address)) in [
        (&segment_a, "10.99.1.1", "10.99.2.0/24", "10.99.1.254"),
        (&segment_b, "10.99.2.1", "10.99.1.0/24", "10.99.2.254"),
        (&segment_a, "10.99.1.2", "10.99.2.0/24", "10.99.1.254"),
    ]
    .into_iter()
    .enumerate()
    {
        let node = Node::in_cluster(address, &format!("node-{i}"), &cluster.datastore());
        segment.attach(&node.ns, &format!("{address}/24"));
        node.ns.exec(&["ip", "route", "add", other, "via", router_address]);
        nodes.push(node);
    }
    nodes[0].apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: over}\nspec: {cidr: 10.81.0.0/16, vxlanMode: CrossSubnet}\n---\n\
         apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: plain}\nspec: {cidr: 10.82.0.0/16}\n",
    );
    nodes[0].cli_ok(&["annotate", "namespace", "over-ns", "poolwarden.io/ipv4pools=[\"over\"]"]);
    nodes[0].cli_ok(&["annotate", "namespace", "plain-ns", "poolwarden.io/ipv4pools=[\"plain\"]"]);
    for node in &mut nodes {
        node.start_agent_with(&["--registration-ttl", "2s"]);
    }
    let mut over = Vec::new();
    let mut plain = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let (ns, result) = node.add_pod(&format!("c-over-{i}"), "over-ns", &format!("over-{i}"));
        over.push((ns, address_of(&result)));
        let (ns, result) = node.add_pod(&format!("c-plain-{i}"), "plain-ns", &format!("plain-{i}"));
        plain.push((ns, address_of(&result)));
    }

    // CrossSubnet: through the overlay to node-1 on the other segment, directly to node-2 on the same one.
    let (to_far, to_near) = (block_of_26(&over[1].1), block_of_26(&over[2].1));
    wait_for("node-0's overlay and direct routes", Duration::from_secs(5), || {
        let routes = our_routes(&nodes[0]);
        routes.contains(&format!("{to_far} via 10.99.2.1 dev pw.vxlan"))
            && routes.contains(&format!("{to_near} via 10.99.1.2 dev fabric0"))
    });
    for (i, (from, _)) in over.iter().enumerate() {
        for (j, (_, to)) in over.iter().enumerate() {
            if i != j {
                assert!(from.pings(to), "over-{i} cannot reach over-{j} at {to}");
            }
        }
    }
    // Without encapsulation the router drops what it has no route for: only the same segment is reachable.
    let near_plain = block_of_26(&plain[2].1);
    wait_for("node-0's direct route to node-2's plain block", Duration::from_secs(5), || {
        our_routes(&nodes[0]).contains(&format!("{near_plain} via 10.99.1.2 dev fabric0"))
    });
    assert!(
        plain[0].0.pings(&plain[2].1),
        "plain pods on one segment reach each other:\n{}\n{}\n{}",
        our_routes(&nodes[0]),
        our_routes(&nodes[2]),
        nodes[0].agent_log()
    );
    assert!(!plain[0].0.pings(&plain[1].1), "a plain pod across the router must not be reachable");

    // node-1 leaves for good: node-0 no longer needs the overlay, and its device (with its entries) goes.
    assert!(nodes[0].ns.try_exec(&["ip", "link", "show", "pw.vxlan"]));
    nodes[1].kill_agent();
    wait_for("node-1's registration to expire", Duration::from_secs(15), || {
        !nodes[0].cli_ok(&["get", "nodes"]).contains("node-1")
    });
    nodes[0].cli_ok(&["node", "decommission", "node-1"]);
    wait_for("node-0's overlay device to go with its only remote peer", Duration::from_secs(15), || {
        !nodes[0].ns.try_exec(&["ip", "link", "show", "pw.vxlan"])
    });
    assert!(!our_routes(&nodes[0]).contains("pw.vxlan"), "{}", our_routes(&nodes[0]));
}

/// The /26 block (the default block size) an address is in.
fn block_of_26(address: &str) -> String {
    let ip: std::net::Ipv4Addr = address.parse().expect("IPv4 address");
    format!("{}/26", std::net::Ipv4Addr::from(u32::from(ip) & !63))
}

/// Pings from `from` to `to` at 20 Hz for `seconds`: (sent, received).
fn ping_for(from: &NetNs, to: &str, seconds: u32) -> (u32, u32) {
    let count = (seconds * 20).to_string();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &from.name, "ping", "-q", "-i", "0.05", "-W", "1", "-c", &count, to])
        .output()
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("packets transmitted")).unwrap_or_default().to_string();
    let number = |word: &str| {
        line.split(", ").find(|p| p.contains(word)).and_then(|p| p.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    };
    (number("transmitted"), number("received"))
}

/// The agents' flags in the lifecycle tests: short timers.
const SHORT_TIMERS: [&str; 4] = ["--registration-ttl", "2s", "--leak-grace-period", "1s"];

/// Two nodes on one etcd, with agents (short timers) and a pod each that reaches the other.
struct Pair {
    nodes: Vec<Node>,
    here_ns: NetNs,
    here: String,
    there_ns: NetNs,
    there: String,
}

fn two_nodes_with_a_pod_each(fabric: &Fabric, cluster: &EtcdCluster) -> Pair {
    let mut nodes = nodes_on(fabric, cluster, 2);
    nodes[0].apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.79.0.0/24, blockSize: 29}\n",
    );
    for node in &mut nodes {
        node.start_agent_with(&SHORT_TIMERS);
    }
    let (here_ns, here) = nodes[0].add_pod("c-here", "default", "here");
    let (there_ns, there) = nodes[1].add_pod("c-there", "default", "there");
    let (here, there) = (address_of(&here), address_of(&there));
    wait_for("the pods on the two nodes to reach each other", Duration::from_secs(10), || here_ns.pings(&there));
    Pair { nodes, here_ns, here, there_ns, there }
}

/// An agent killed -9 and kept down for three times its registration TTL plus the leak grace period: no other
/// node releases its pod's address or its block (they wait --node-gone-after, days, unless the node is
/// decommissioned), the other node keeps routing to its pod throughout (a 20 Hz ping loses nothing), and when the
/// agent comes back its pod still sends and receives. Decommissioning is refused while the node is registered.
#[test]
fn an_agent_down_past_its_grace_keeps_its_pods_addresses_and_routes() {
    if !privileged() || !etcd::available() {
        return;
    }
    let fabric = Fabric::new();
    let (_etcd_namespaces, cluster) = etcd_on(&fabric, 1);
    let Pair { mut nodes, here_ns, here, there_ns, there } = two_nodes_with_a_pod_each(&fabric, &cluster);
    let refused = nodes[0].cli(&["node", "decommission", "node-1"]);
    assert!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("is registered"),
        "a registered node cannot be decommissioned: {}",
        String::from_utf8_lossy(&refused.stderr)
    );

    nodes[1].kill_agent();
    // 3 x (TTL 2 s + grace 1 s), pinging the whole time.
    let (sent, received) = ping_for(&here_ns, &there, 9);
    eprintln!("node-1's agent down for 9 s: {sent} pings sent from node-0's pod to node-1's, {received} answered");
    assert!(!nodes[0].cli_ok(&["get", "nodes"]).contains("node-1"), "node-1's registration lapsed meanwhile");
    assert_eq!(received, sent, "node-1's pod stays reachable while its agent is down");
    let handles = nodes[0].cli_ok(&["get", "handles"]);
    assert!(handles.contains("c-there"), "node-1's pod keeps its address:\n{handles}");
    let affinities = nodes[0].cli_ok(&["get", "affinities"]);
    assert!(
        affinities.contains("node-1") && affinities.contains(&block_of(&there)),
        "and node-1 its block:\n{affinities}"
    );
    assert!(our_routes(&nodes[0]).contains(&block_of(&there)), "node-0 still routes node-1's block");
    assert!(!nodes[0].agent_log().contains("released a leaked address"), "{}", nodes[0].agent_log());

    nodes[1].start_agent_with(&SHORT_TIMERS);
    assert!(there_ns.pings(&here), "back: node-1's pod sends and receives");
    let status = nodes[1].cli_ok(&["enforcement", "status", "--bpf-dir", &nodes[1].bpf_dir()]);
    assert!(status.contains(&there), "its enforcement entry is intact:\n{status}");
}

/// A rolling restart of every agent (SIGTERM, 3 s without an agent, longer than its registration TTL, then a
/// new agent, one node at a time, as a DaemonSet's rolling update does), three rounds, while a pod on each node pings a pod on the other at 20 Hz: no packet is lost in
/// either direction, and no address changes.
#[test]
fn three_rounds_of_rolling_restarts_lose_no_packet() {
    if !privileged() || !etcd::available() {
        return;
    }
    let fabric = Fabric::new();
    let (_etcd_namespaces, cluster) = etcd_on(&fabric, 1);
    let Pair { mut nodes, here_ns, here, there_ns, there } = two_nodes_with_a_pod_each(&fabric, &cluster);
    let handles_before = nodes[0].cli_ok(&["get", "handles"]);
    let seconds = 35;
    let started = Instant::now();
    let (forth, back, restarts) = std::thread::scope(|scope| {
        let forth = scope.spawn(|| ping_for(&here_ns, &there, seconds));
        let back = scope.spawn(|| ping_for(&there_ns, &here, seconds));
        for round in 1..=3 {
            for node in nodes.iter_mut() {
                node.stop_agent();
                // Down for longer than its registration TTL, as an agent is while its new image is pulled.
                std::thread::sleep(Duration::from_secs(3));
                node.start_agent_with(&SHORT_TIMERS);
            }
            eprintln!("round {round} of restarts done {:.1?} after the pings started", started.elapsed());
        }
        let restarts = started.elapsed();
        (forth.join().expect("ping"), back.join().expect("ping"), restarts)
    });
    eprintln!(
        "three rounds of rolling restarts in {restarts:.1?}: node-0 -> node-1 {}/{} answered, node-1 -> node-0 {}/{}",
        forth.1, forth.0, back.1, back.0
    );
    assert!(restarts < Duration::from_secs(seconds.into()), "the restarts outlasted the pings: nothing was shown");
    assert!(forth.0 >= seconds * 20 && back.0 >= seconds * 20, "{forth:?} {back:?}");
    assert_eq!((forth.1, back.1), (forth.0, back.0), "packets were lost during the restarts");
    assert_eq!(nodes[0].cli_ok(&["get", "handles"]), handles_before, "an address changed");
}

/// A node rebooting with kubelet's default pod limit: 110 ADDs at once on one node against an etcd with its
/// default settings (--max-txn-ops 128), arriving while etcd is stalled for two seconds (SIGSTOP/SIGCONT) so they
/// pile up into batches: every one succeeds, with distinct addresses.
#[test]
fn a_burst_of_110_adds_on_a_stock_etcd_all_succeed() {
    if !privileged() || !etcd::available() {
        return;
    }
    let fabric = Fabric::new();
    let (_etcd_namespaces, cluster) = etcd_on(&fabric, 1);
    let mut nodes = nodes_on(&fabric, &cluster, 1);
    nodes[0].apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: big}\nspec: {cidr: 10.80.0.0/23, blockSize: 26}\n",
    );
    nodes[0].start_agent();
    // Claim the blocks first (claims go one at a time per node), so the burst is served from owned blocks
    // in batches.
    let warm: Vec<NetNs> = (0..2).map(|_| NetNs::new("pwp")).collect();
    for (i, pod) in warm.iter().enumerate() {
        let (ok, out) = nodes[0].cni(
            "ADD",
            &format!("warm-{i}"),
            &pod.path(),
            &k8s_args("default", "w"),
            &nodes[0].conf(json!({})),
        );
        assert!(ok, "{out}");
    }
    let pods: Vec<NetNs> = (0..110).map(|_| NetNs::new("pwp")).collect();
    let node = &nodes[0];
    let results: Vec<(bool, serde_json::Value)> = std::thread::scope(|scope| {
        let stall = scope.spawn(|| cluster.stall_member(0, Duration::from_secs(2)));
        std::thread::sleep(Duration::from_millis(50));
        let adds: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                scope.spawn(move || {
                    node.cni(
                        "ADD",
                        &format!("burst-{i}"),
                        &pod.path(),
                        &k8s_args("default", &format!("b{i}")),
                        &node.conf(json!({})),
                    )
                })
            })
            .collect();
        stall.join().expect("stall");
        adds.into_iter().map(|h| h.join().expect("ADD thread")).collect()
    });
    let mut addresses = std::collections::BTreeSet::new();
    let failed: Vec<String> = results
        .iter()
        .enumerate()
        .filter(|(_, (ok, _))| !ok)
        .map(|(i, (_, out))| format!("burst-{i}: {out}"))
        .collect();
    assert!(failed.is_empty(), "{} of 110 ADDs failed:\n{}", failed.len(), failed.join("\n"));
    for (_, result) in &results {
        assert!(addresses.insert(address_of(result)), "{} given twice", address_of(result));
    }
    assert_eq!(addresses.len(), 110);
    eprintln!("110 ADDs through a 2 s etcd stall on a stock etcd: all succeeded, 110 distinct addresses");
}
