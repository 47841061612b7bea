//! The rest of a pod's life as the runtime drives it: dual-stack ADD, CHECK against the ADD's result,
//! STATUS, and GC of attachments the runtime no longer has.

use poolwarden_tests::{NetNs, Node, k8s_args, privileged};
use serde_json::{Value, json};

fn addresses(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .map(|ips| ips.iter().filter_map(|ip| ip["address"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

#[test]
fn dual_stack_pod_gets_one_address_per_family_and_reaches_the_node_on_both() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.2.1");
    node.ns.exec(&["ip", "-6", "addr", "add", "fd00:255::1/128", "dev", "lo"]);
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: four}\nspec: {cidr: 10.65.0.0/24, blockSize: 28}\n---\n\
         apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: six}\nspec: {cidr: 'fd00:65::/120', blockSize: 124}\n",
    );
    node.start_agent();
    let pod = NetNs::new("pwp");
    let (ok, result) = node.cni("ADD", "dual", &pod.path(), &k8s_args("default", "dual"), &node.conf(json!({})));
    assert!(ok, "{result}\n{}", node.agent_log());
    let ips = addresses(&result);
    assert_eq!(ips.len(), 2, "{result}");
    assert!(ips[0].starts_with("10.65.0.") && ips[0].ends_with("/32"), "{ips:?}");
    assert!(ips[1].starts_with("fd00:65::") && ips[1].ends_with("/128"), "{ips:?}");
    assert_eq!(result["routes"].as_array().map(Vec::len), Some(2), "a default route per family: {result}");
    assert!(pod.pings(&node.address), "IPv4 to the node");
    // One packet, answered: no address on either side is held back by duplicate address detection.
    if !pod.try_exec(&["ping", "-6", "-c", "1", "-W", "2", "fd00:255::1"]) {
        eprintln!(
            "POD\n{}{}{}\nNODE\n{}{}",
            pod.exec(&["ip", "-6", "addr"]),
            pod.exec(&["ip", "-6", "route"]),
            pod.exec(&["ip", "-6", "neigh"]),
            node.ns.exec(&["ip", "-6", "addr"]),
            node.ns.exec(&["ip", "-6", "neigh"])
        );
        panic!("IPv6 to the node");
    }
    let routes = node.routes();
    assert!(routes.contains("blackhole fd00:65::/124"), "{routes}");
    assert!(node.cni("DEL", "dual", &pod.path(), "", &node.conf(json!({}))).0);
}

#[test]
fn a_failing_second_family_releases_the_first() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.2.2");
    // The IPv6 pool has room for one pod only.
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: four}\nspec: {cidr: 10.66.0.0/24, blockSize: 28}\n---\n\
         apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: six}\nspec: {cidr: 'fd00:66::/128', blockSize: 128}\n",
    );
    node.start_agent();
    let first = NetNs::new("pwp");
    assert!(node.cni("ADD", "one", &first.path(), &k8s_args("default", "one"), &node.conf(json!({}))).0);
    let second = NetNs::new("pwp");
    let (ok, out) = node.cni("ADD", "two", &second.path(), &k8s_args("default", "two"), &node.conf(json!({})));
    assert!(!ok, "{out}");
    assert!(out["msg"].as_str().unwrap_or_default().contains("IPv6 pool \"six\" is exhausted"), "{out}");
    let handles: Value = serde_json::from_str(&node.cli_ok(&["get", "handles", "-o", "json"])).unwrap();
    assert_eq!(handles.as_array().map(Vec::len), Some(1), "the second pod's IPv4 address was released too: {handles}");
}

#[test]
fn check_verifies_the_pod_against_the_add_result() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.2.3");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.67.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let (pod, result) = node.add_pod("checked", "default", "c");
    let with_prev = node.conf(json!({ "prevResult": result }));
    let (ok, out) = node.cni("CHECK", "checked", &pod.path(), "", &with_prev);
    assert!(ok, "CHECK of a healthy pod: {out}");
    let address = addresses(&result)[0].clone();
    pod.exec(&["ip", "addr", "del", &address, "dev", "eth0"]);
    let (ok, out) = node.cni("CHECK", "checked", &pod.path(), "", &with_prev);
    assert!(!ok, "CHECK must notice the missing address");
    assert!(out["details"].as_str().unwrap_or_default().contains(&format!("eth0 lacks address {address}")), "{out}");
    let (ok, out) = node.cni("CHECK", "checked", &pod.path(), "", &node.conf(json!({})));
    assert!(!ok && out["code"] == 7, "CHECK without prevResult: {out}");
}

#[test]
fn status_reports_ready_exhausted_and_unreachable() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.2.4");
    node.apply("apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: tiny}\nspec: {cidr: 10.68.0.0/30, blockSize: 30}\n");
    node.start_agent();
    // STATUS is 1.1.0's: a configuration of an older version cannot ask it.
    let (ok, out) = node.cni("STATUS", "", "", "", &node.conf(json!({})));
    assert!(!ok && out["code"] == 1, "STATUS of a 1.0.0 configuration: {out}");
    let status = |conf: &Value| {
        let mut conf = conf.clone();
        conf["cniVersion"] = json!("1.1.0");
        node.cni("STATUS", "", "", "", &conf)
    };
    let (ok, out) = status(&node.conf(json!({})));
    assert!(ok, "STATUS with room: {out}");
    let pods: Vec<NetNs> = (0..4).map(|_| NetNs::new("pwp")).collect();
    for (i, pod) in pods.iter().enumerate() {
        assert!(node.cni("ADD", &format!("fill-{i}"), &pod.path(), &k8s_args("default", "f"), &node.conf(json!({}))).0);
    }
    let (ok, out) = status(&node.conf(json!({})));
    assert!(!ok && out["code"] == 51, "STATUS with the pools exhausted: {out}");
    assert!(out["msg"].as_str().unwrap_or_default().contains("tiny"), "{out}");
    let (ok, out) = status(&node.conf(json!({ "socket": "/nonexistent/agent.sock" })));
    assert!(!ok && out["code"] == 50, "STATUS without an agent: {out}");
    for (i, pod) in pods.iter().enumerate() {
        assert!(node.cni("DEL", &format!("fill-{i}"), &pod.path(), "", &node.conf(json!({}))).0);
    }
}

#[test]
fn gc_releases_every_attachment_not_listed() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.2.5");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.69.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let pods: Vec<NetNs> = (0..3).map(|_| NetNs::new("pwp")).collect();
    for (i, pod) in pods.iter().enumerate() {
        assert!(node.cni("ADD", &format!("gc-{i}"), &pod.path(), &k8s_args("default", "g"), &node.conf(json!({}))).0);
    }
    // Attachments younger than the GC grace are spared (the runtime's list may predate their ADD).
    let conf = node.conf(
        json!({ "cniVersion": "1.1.0", "cni.dev/valid-attachments": [ { "containerID": "gc-1", "ifname": "eth0" } ] }),
    );
    let (ok, out) = node.cni("GC", "", "", "", &conf);
    assert!(ok, "GC: {out}");
    assert_eq!(handle_names(&node).len(), 3, "a GC right after the ADDs releases nothing");
    std::thread::sleep(poolwarden::daemon::GC_GRACE + std::time::Duration::from_millis(500));
    let (ok, out) = node.cni("GC", "", "", "", &conf);
    assert!(ok, "GC: {out}");
    assert_eq!(handle_names(&node), ["gc-1.eth0"], "only the listed attachment keeps its address");
    assert!(pods[1].pings(&node.address), "the kept pod still works");
    assert_eq!(
        node.ns.exec(&["ip", "route", "show", "proto", "97"]).lines().filter(|l| l.contains(" dev pw")).count(),
        1
    );
}

#[test]
fn runtime_config_ips_and_mtu_are_honoured() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.2.6");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.70.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let pod = NetNs::new("pwp");
    let conf = node.conf(json!({ "mtu": 1400, "runtimeConfig": { "ips": ["10.70.0.77/24"] } }));
    let (ok, result) = node.cni("ADD", "fixed", &pod.path(), &k8s_args("default", "fixed"), &conf);
    assert!(ok, "{result}");
    assert_eq!(addresses(&result), ["10.70.0.77/32"]);
    assert!(pod.exec(&["ip", "link", "show", "eth0"]).contains("mtu 1400"));
    assert!(pod.pings(&node.address));
    let other = NetNs::new("pwp");
    let (ok, out) = node.cni("ADD", "clash", &other.path(), &k8s_args("default", "clash"), &conf);
    assert!(
        !ok && out["msg"].as_str().unwrap_or_default().contains("10.70.0.77 is already in use by fixed.eth0"),
        "{out}"
    );
}

/// The handles holding addresses, sorted.
fn handle_names(node: &Node) -> Vec<String> {
    let handles: Value = serde_json::from_str(&node.cli_ok(&["get", "handles", "-o", "json"])).unwrap();
    let mut names: Vec<String> =
        handles.as_array().unwrap().iter().filter_map(|h| h["handle"].as_str().map(str::to_string)).collect();
    names.sort();
    names
}

/// Two networks on one node (poolwarden as the plugin of both, as when it is the IPAM of another plugin for a
/// second network): a GC for one never touches the other's attachments, and a GC without the list of valid
/// attachments changes nothing.
#[test]
fn gc_is_scoped_to_its_network_and_needs_the_list() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.2.8");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.71.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let net = |name: &str, extra: Value| {
        let mut conf = node.conf(extra);
        conf["name"] = json!(name);
        conf
    };
    let pods: Vec<NetNs> = (0..4).map(|_| NetNs::new("pwp")).collect();
    for (i, pod) in pods.iter().enumerate() {
        let network = if i < 3 { "net-a" } else { "net-b" };
        let (ok, out) = node.cni(
            "ADD",
            &format!("{network}-{i}"),
            &pod.path(),
            &k8s_args("default", "n"),
            &net(network, json!({})),
        );
        assert!(ok, "{out}");
    }
    std::thread::sleep(poolwarden::daemon::GC_GRACE + std::time::Duration::from_millis(500));
    let everyone = ["net-a-0.eth0", "net-a-1.eth0", "net-a-2.eth0", "net-b-3.eth0"];
    assert_eq!(handle_names(&node), everyone);

    // A GC of net-b listing nothing releases net-b's pod only.
    let (ok, out) =
        node.cni("GC", "", "", "", &net("net-b", json!({ "cniVersion": "1.1.0", "cni.dev/valid-attachments": [] })));
    assert!(ok, "{out}");
    assert_eq!(handle_names(&node), everyone[..3], "net-a's pods are not net-b's to collect");
    for pod in &pods[..3] {
        assert!(pod.pings(&node.address), "net-a's pods still work");
    }
    // Without the key, a GC knows nothing about what is in use: it changes nothing.
    let (ok, out) = node.cni("GC", "", "", "", &net("net-a", json!({ "cniVersion": "1.1.0" })));
    assert!(ok, "{out}");
    assert_eq!(handle_names(&node), everyone[..3]);
    // A GC of net-a listing two of its three releases the third.
    let listed =
        json!([ { "containerID": "net-a-0", "ifname": "eth0" }, { "containerID": "net-a-2", "ifname": "eth0" } ]);
    let (ok, out) = node.cni(
        "GC",
        "",
        "",
        "",
        &net("net-a", json!({ "cniVersion": "1.1.0", "cni.dev/valid-attachments": listed })),
    );
    assert!(ok, "{out}");
    assert_eq!(handle_names(&node), ["net-a-0.eth0", "net-a-2.eth0"]);
}
