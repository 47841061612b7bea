//! A pod can send only from its own address: spoofed packets never arrive on the node, checked on the
//! receiving side with a netfilter counter in the node's namespace.

use poolwarden_tests::{NetNs, Node, k8s_args, privileged};
use serde_json::json;

/// Packets from `source` that reached the node's netfilter (raw PREROUTING runs after TC ingress).
fn arrived(node: &Node, source: &str) -> u64 {
    let table = node.ns.exec(&["iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-n", "-x"]);
    table
        .lines()
        .find(|l| l.split_whitespace().nth(7) == Some(source))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn watch_source(node: &Node, source: &str) {
    node.ns.exec(&["iptables", "-t", "raw", "-I", "PREROUTING", "-s", source, "-j", "ACCEPT"]);
}

fn send_from(pod: &NetNs, source: &str, to: &str) {
    // The pod gives itself another address and sends from it: whatever it does in its own namespace.
    let _ = pod.try_exec(&["ip", "addr", "add", &format!("{source}/32"), "dev", "eth0"]);
    let _ = pod.try_exec(&["ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", source, to]);
}

#[test]
fn spoofed_sources_never_arrive_and_own_traffic_flows() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.3.1");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: a}\nspec: {cidr: 10.80.0.0/24, blockSize: 28}\n---\n\
         apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: b}\nspec: {cidr: 10.81.0.0/24, blockSize: 28}\n",
    );
    // Control: without enforcement, a spoofed source does arrive (so the counter below can fail).
    node.start_agent_with(&["--enforcement", "off"]);
    let pod = NetNs::new("pwp");
    let (ok, result) = node.cni("ADD", "enf-1", &pod.path(), &k8s_args("default", "p"), &node.conf(json!({})));
    assert!(ok, "{result}");
    let own = result["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
    watch_source(&node, "10.80.0.200");
    send_from(&pod, "10.80.0.200", &node.address);
    assert!(arrived(&node, "10.80.0.200") > 0, "with enforcement off the spoofed packets arrive");

    // Strict enforcement, attached to the existing pod when the agent starts.
    node.stop_agent();
    node.start_agent();
    watch_source(&node, &own);
    assert!(pod.pings(&node.address), "the pod's own traffic flows");
    assert!(arrived(&node, &own) > 0);
    for (what, spoofed) in
        [("same pool", "10.80.0.201"), ("another pool", "10.81.0.7"), ("outside every pool", "203.0.113.9")]
    {
        watch_source(&node, spoofed);
        send_from(&pod, spoofed, &node.address);
        assert_eq!(arrived(&node, spoofed), 0, "{what}: spoofed {spoofed} must never arrive");
    }
    // The counters say why, in the CLI (read from the pinned maps) and in the metrics.
    let status = node.cli_ok(&["enforcement", "status", "--bpf-dir", &node.bpf_dir()]);
    assert!(status.contains(&own) && status.contains("strict"), "{status}");
    assert!(status.lines().any(|l| l.starts_with("a ") && l.contains("spoofed_ipv4")), "{status}");
    let metrics = node.ns.exec(&["curl", "-s", "http://127.0.0.1:9641/metrics"]);
    assert!(metrics.contains("poolwarden_dropped_packets_total{pool=\"a\",reason=\"spoofed_ipv4\"}"), "{metrics}");
    assert!(metrics.contains("poolwarden_passed_packets_total{pool=\"a\"}"), "{metrics}");
    let log = node.agent_log();
    assert!(
        log.contains("enforcement dropped a packet") && log.contains("10.81.0.7"),
        "drops are reported to the agent's log:\n{log}"
    );
    // A pod added while enforcing is enforced from its first packet.
    let second = NetNs::new("pwp");
    let (ok, result) = node.cni("ADD", "enf-2", &second.path(), &k8s_args("default", "q"), &node.conf(json!({})));
    assert!(ok, "{result}");
    watch_source(&node, "10.81.0.8");
    send_from(&second, "10.81.0.8", &node.address);
    assert_eq!(arrived(&node, "10.81.0.8"), 0);
    assert!(second.pings(&node.address));
}

#[test]
fn enforcement_outlives_a_killed_agent() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.3.2");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: a}\nspec: {cidr: 10.82.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let pod = NetNs::new("pwp");
    let (ok, result) = node.cni("ADD", "survivor", &pod.path(), &k8s_args("default", "p"), &node.conf(json!({})));
    assert!(ok, "{result}");
    node.kill_agent();
    // The agent is gone (kill -9); its pinned link and maps are not.
    assert!(pod.pings(&node.address), "allowed traffic still flows while the agent is down");
    watch_source(&node, "10.82.0.99");
    send_from(&pod, "10.82.0.99", &node.address);
    assert_eq!(arrived(&node, "10.82.0.99"), 0, "spoofed packets are still dropped while the agent is down");
    let pins = std::fs::read_dir(std::path::Path::new(&node.bpf_dir()).join("links")).unwrap().count();
    assert_eq!(pins, 1, "the pod's link stays pinned");
    node.start_agent();
    assert!(pod.pings(&node.address), "and after the restart, nothing was detached");
    watch_source(&node, "10.82.0.98");
    send_from(&pod, "10.82.0.98", &node.address);
    assert_eq!(arrived(&node, "10.82.0.98"), 0);
    let (ok, out) = node.cni("DEL", "survivor", &pod.path(), "", &node.conf(json!({})));
    assert!(ok, "{out}");
    let pins = std::fs::read_dir(std::path::Path::new(&node.bpf_dir()).join("links")).unwrap().count();
    assert_eq!(pins, 0, "DEL unpins the link");
}

#[test]
fn a_pool_can_override_the_agents_mode() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.3.3");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: open}\nspec: {cidr: 10.83.0.0/24, blockSize: 28, enforcement: Off}\n---\n\
         apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: pooled}\nspec: {cidr: 10.84.0.0/24, blockSize: 28, enforcement: Pool}\n",
    );
    node.start_agent();
    let free = NetNs::new("pwp");
    assert!(node.cni("ADD", "free", &free.path(), &k8s_args("default", "f"), &node.conf(json!({"pools": ["open"]}))).0);
    watch_source(&node, "192.0.2.7");
    send_from(&free, "192.0.2.7", &node.address);
    assert!(arrived(&node, "192.0.2.7") > 0, "enforcement: Off on the pool leaves its pods unchecked");
    let pooled = NetNs::new("pwp");
    assert!(
        node.cni("ADD", "pooled", &pooled.path(), &k8s_args("default", "p"), &node.conf(json!({"pools": ["pooled"]})))
            .0
    );
    watch_source(&node, "10.84.0.77");
    send_from(&pooled, "10.84.0.77", &node.address);
    assert!(arrived(&node, "10.84.0.77") > 0, "pool mode: another source of the pod's pool passes");
    watch_source(&node, "10.83.0.77");
    send_from(&pooled, "10.83.0.77", &node.address);
    assert_eq!(arrived(&node, "10.83.0.77"), 0, "but not one of another pool");
}
