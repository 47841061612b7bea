//! Firewall alignment and Kubernetes mode on a real node: `natOutgoing` masquerades (or not) what a
//! destination outside the pools sees, the firewall export loads into nftables and ipset and follows pool
//! changes with `--watch`, and an agent in Kubernetes mode whose API server is unreachable answers an ADD
//! with CNI code 11 and leaves nothing behind.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use poolwarden_tests::{Fabric, NetNs, Node, address_of, binary, k8s_args, privileged, wait_for};
use serde_json::{Value, json};

const POOLS: &str = "\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: nat-pool}
spec: {cidr: 10.31.0.0/24, blockSize: 29, natOutgoing: true}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: plain-pool}
spec: {cidr: 10.32.0.0/24, blockSize: 29, natOutgoing: false, allowedNamespaces: [plain-ns]}
---
apiVersion: v1
kind: Namespace
metadata: {name: nat-ns, annotations: {poolwarden.io/ipv4pools: '[\"nat-pool\"]'}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain-ns, annotations: {poolwarden.io/ipv4pools: '[\"plain-pool\"]'}}
";

/// An HTTP server in `ns` answering every GET with the address the request came from; killed by PID.
struct WhoAmI {
    child: Child,
    url: String,
}

impl WhoAmI {
    fn start(ns: &NetNs, address: &str) -> Self {
        let script = format!(
            "import http.server\n\
             class H(http.server.BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       body = self.client_address[0].encode()\n\
             \x20       self.send_response(200)\n\
             \x20       self.send_header('Content-Length', str(len(body)))\n\
             \x20       self.end_headers()\n\
             \x20       self.wfile.write(body)\n\
             \x20   def log_message(self, *args):\n\
             \x20       pass\n\
             http.server.HTTPServer(('{address}', 7000), H).serve_forever()\n"
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "python3", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the whoami server");
        let server = Self { child, url: format!("http://{address}:7000/") };
        wait_for("the whoami server to come up", Duration::from_secs(10), || {
            ns.try_exec(&["curl", "-sf", "-m", "1", &server.url])
        });
        server
    }

    /// The source address the server sees for a request from `ns`.
    fn seen_from(&self, ns: &NetNs) -> String {
        ns.exec(&["curl", "-sf", "-m", "3", &self.url]).trim().to_string()
    }
}

impl Drop for WhoAmI {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node on a segment with an "outside" host (the external firewall's side) that routes the pools back
/// to the node, as a network routing the pools' CIDRs would.
fn node_with_outside() -> (Fabric, Node, NetNs) {
    let fabric = Fabric::new();
    let node = Node::new("10.97.0.1");
    fabric.attach(&node.ns, "10.98.0.1/24");
    let outside = NetNs::new("pwo");
    fabric.attach(&outside, "10.98.0.50/24");
    for pool in ["10.31.0.0/24", "10.32.0.0/24"] {
        outside.exec(&["ip", "route", "add", pool, "via", "10.98.0.1"]);
    }
    (fabric, node, outside)
}

#[test]
fn nat_outgoing_masquerades_only_nat_pools_and_follows_pool_changes() {
    if !privileged() {
        return;
    }
    let (_fabric, mut node, outside) = node_with_outside();
    node.apply(POOLS);
    node.start_agent();
    let server = WhoAmI::start(&outside, "10.98.0.50");

    let (nat_pod, nat_result) = node.add_pod("nat-1", "nat-ns", "nat-1");
    let (plain_pod, plain_result) = node.add_pod("plain-1", "plain-ns", "plain-1");
    let (nat_ip, plain_ip) = (address_of(&nat_result), address_of(&plain_result));
    assert!(nat_ip.starts_with("10.31.0.") && plain_ip.starts_with("10.32.0."), "{nat_ip} {plain_ip}");

    let table = node.ns.exec(&["nft", "list", "table", "inet", "poolwarden_nat"]);
    assert!(table.contains("masquerade"), "{table}");
    assert_eq!(server.seen_from(&nat_pod), "10.98.0.1", "a natOutgoing pool is seen as the node");
    assert_eq!(server.seen_from(&plain_pod), plain_ip, "natOutgoing: false keeps the pod's address visible");
    // Between pools nothing is masqueraded: the plain pod sees the NAT pod's own address.
    let inner = WhoAmI::start(&plain_pod, &plain_ip);
    assert_eq!(inner.seen_from(&nat_pod), nat_ip, "traffic to another pool is not masqueraded");

    // Turning NAT off for the pool removes the table (the agent follows the pool), and the outside host
    // then sees the pod's own address.
    node.apply(&POOLS.replacen("natOutgoing: true", "natOutgoing: false", 1));
    wait_for("the NAT table to go", Duration::from_secs(10), || {
        !node.ns.try_exec(&["nft", "list", "table", "inet", "poolwarden_nat"])
    });
    assert_eq!(server.seen_from(&nat_pod), nat_ip);
    // And back on.
    node.apply(POOLS);
    wait_for("the NAT table to return", Duration::from_secs(10), || {
        node.ns.try_exec(&["nft", "list", "table", "inet", "poolwarden_nat"])
    });
    assert_eq!(server.seen_from(&nat_pod), "10.98.0.1");
    drop(inner);
    drop(server);
    node.stop_agent();
}

#[test]
fn firewall_export_loads_into_nftables_and_ipset_and_follows_changes() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.97.0.2");
    node.apply(POOLS);
    node.start_agent();

    let nft = node.cli_ok(&["firewall", "export", "--format", "nftables"]);
    assert!(nft.contains("add set inet poolwarden_pools pool_nat_pool {"), "{nft}");
    // A firewall host (here: a namespace of its own) loads it, twice (the second load replaces the first).
    let firewall = NetNs::new("pwfw");
    let file = node.dir.path().join("pools.nft");
    std::fs::write(&file, &nft).expect("write the ruleset");
    for _ in 0..2 {
        firewall.exec(&["nft", "-f", &file.display().to_string()]);
    }
    let set = firewall.exec(&["nft", "list", "set", "inet", "poolwarden_pools", "pool_plain_pool"]);
    assert!(set.contains("10.32.0.0/24"), "{set}");

    let ipset = node.cli_ok(&["firewall", "export", "--format", "iptables", "--pool", "plain-pool"]);
    assert!(
        ipset.contains("add pool_plain_pool-swap 10.32.0.0/24\nswap pool_plain_pool-swap pool_plain_pool\n"),
        "{ipset}"
    );
    assert!(!ipset.contains("nat_pool"), "--pool plain-pool exports only that pool: {ipset}");
    let file = node.dir.path().join("pools.ipset");
    std::fs::write(&file, &ipset).expect("write the ipset file");
    if firewall.try_exec(&["ipset", "list", "-n"]) {
        // Twice: the second load swaps into a set that exists (and that a rule could be using).
        for _ in 0..2 {
            firewall.exec(&["sh", "-c", &format!("ipset restore -exist < {}", file.display())]);
        }
        let listed = firewall.exec(&["ipset", "list", "pool_plain_pool"]);
        assert!(listed.contains("10.32.0.0/24"), "{listed}");
        assert_eq!(firewall.exec(&["ipset", "list", "-n"]).trim(), "pool_plain_pool", "the temporary set is gone");
        firewall.exec(&["ipset", "destroy", "pool_plain_pool"]);
    } else {
        eprintln!("ipset restore not checked: this kernel has no ip_set support");
    }

    let json: Value = serde_json::from_str(&node.cli_ok(&["firewall", "export", "--format", "json"])).expect("json");
    let plain = json["pools"].as_array().unwrap().iter().find(|p| p["pool"] == "plain-pool").expect("plain-pool");
    assert_eq!(plain["allowedNamespaces"], json!(["plain-ns"]));
    assert_eq!(plain["assignedNamespaces"], json!(["plain-ns"]));
    assert_eq!(plain["natOutgoing"], false);
    let csv = node.cli_ok(&["firewall", "export", "--format", "csv"]);
    assert!(csv.contains("\nnat-pool,10.31.0.0/24,ipv4,*,nat-ns,true,false\n"), "{csv}");
    let unknown = node.cli(&["firewall", "export", "--pool", "nope"]);
    assert!(!unknown.status.success() && String::from_utf8_lossy(&unknown.stderr).contains("\"nope\" does not exist"));

    // --watch prints the export again when a pool is added (through the agent, which holds the store).
    let mut watch = Command::new("ip")
        .args(["netns", "exec", &node.ns.name])
        .arg(binary("poolwarden"))
        .args(["firewall", "export", "--watch", "--format", "csv"])
        .env("POOLWARDEN_DATASTORE", node.datastore())
        .env("POOLWARDEN_SOCKET", node.socket())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start firewall export --watch");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let wait_line = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.starts_with(want) => return,
                Ok(_) => {}
                Err(_) => panic!("--watch never printed a line starting {want:?}"),
            }
        }
    };
    wait_line("plain-pool,");
    node.apply(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: late-pool}\nspec: {cidr: 10.33.0.0/24}\n",
    );
    wait_line("late-pool,10.33.0.0/24,");
    let _ = watch.kill();
    let _ = watch.wait();
    node.stop_agent();
}

#[test]
fn kubernetes_mode_with_the_api_server_unreachable() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.97.0.3");
    node.apply(POOLS);
    // An API server address nothing listens on, inside the node's namespace.
    let kubeconfig = node.dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n\
         users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n",
    )
    .expect("write kubeconfig");
    let kubeconfig = kubeconfig.display().to_string();
    node.start_agent_with(&["--kubernetes", "--kubeconfig", &kubeconfig, "--kube-sync-timeout", "1s"]);

    let pod_ns = NetNs::new("pwp");
    let (ok, error) = node.cni("ADD", "k8s-1", &pod_ns.path(), &k8s_args("nat-ns", "k8s-1"), &node.conf(json!({})));
    assert!(!ok, "ADD succeeded without an API server: {error}");
    assert_eq!(error["code"], 11, "{error}");
    let msg = error["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("could not be reached") && msg.contains("k8s-1"), "{error}");
    // Nothing left behind: no veth on the node, no address allocated.
    let links = node.ns.exec(&["ip", "-o", "link", "show"]);
    assert!(!links.lines().any(|l| l.contains(": pw") && !l.contains("pw.")), "{links}");
    let blocks = node.cli_ok(&["get", "blocks"]);
    assert!(blocks.lines().count() <= 1, "{blocks}");

    // The datastore now says namespaces come from the API server: standalone namespace commands are refused.
    for args in [
        &["annotate", "namespace", "nat-ns", "poolwarden.io/ipv4pools=[\"plain-pool\"]"][..],
        &["label", "namespace", "nat-ns", "team=x"][..],
    ] {
        let out = node.cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("namespaces come from the API server"), "{args:?}: {stderr}");
    }
    let file = node.dir.path().join("ns.yaml");
    std::fs::write(&file, "apiVersion: v1\nkind: Namespace\nmetadata: {name: extra}\n").expect("write");
    let out = node.cli(&["apply", "-f", &file.display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("Namespace") && stderr.contains("kubectl annotate"), "{stderr}");
    // Pools still apply.
    node.apply(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: k8s-pool}\nspec: {cidr: 10.34.0.0/24}\n",
    );
    node.stop_agent();
    // An agent started without --kubernetes on this datastore would take namespaces from the wrong place.
    let out = node.cli(&["agent", "--node", &node.name, "--socket", &node.socket(), "--enforcement", "off"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("start the agent with --kubernetes"), "{stderr}");
}

#[test]
fn a_namespace_annotation_change_keeps_pods_and_lists_them_as_mismatched() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.97.0.4");
    node.apply(POOLS);
    node.start_agent();
    let (_pod, result) = node.add_pod("mm-1", "nat-ns", "mm-1");
    let before = address_of(&result);
    assert!(before.starts_with("10.31.0."), "{before}");
    let clean = node.cli_ok(&["ipam", "show", "--mismatched"]);
    assert!(clean.starts_with("no pod holds"), "{clean}");

    node.cli_ok(&["annotate", "namespace", "nat-ns", "poolwarden.io/ipv4pools=[\"10.35.0.0/24\"]"]);
    node.apply(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: later-pool}\nspec: {cidr: 10.35.0.0/24}\n",
    );
    // The existing pod keeps its address; a new one gets the new pool.
    let (_pod2, result2) = node.add_pod("mm-2", "nat-ns", "mm-2");
    assert!(address_of(&result2).starts_with("10.35.0."), "{result2}");
    assert!(node.cli_ok(&["get", "handles"]).contains(&before), "the old pod's address was kept");
    let listed = node.cli_ok(&["ipam", "show", "--mismatched"]);
    let rows: Vec<&str> = listed.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{listed}");
    assert!(rows[0].contains("mm-1") && rows[0].contains(&before) && rows[0].contains("10.35.0.0/24"), "{listed}");
    node.stop_agent();
}

/// The firewall's side of the promise: the export is loaded on a router (the "outside" host) whose admin
/// has a chain of their own in the export's table referencing the sets; `--watch` reloads it on every pool
/// change, and after each reload the admin's chain is still there and the verdicts follow the pools: the
/// trusted pool's pod passes, the other pool's pod does not, nor does that pod spoofing a trusted address.
#[test]
fn the_admins_chain_survives_every_reload_and_verdicts_follow_the_pools() {
    if !privileged() {
        return;
    }
    let (_fabric, mut node, outside) = node_with_outside();
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: trusted}\nspec: {cidr: 10.31.0.0/24, blockSize: 29}\n---\n\
         apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: untrusted}\nspec: {cidr: 10.32.0.0/24, blockSize: 29}\n",
    );
    node.start_agent();
    let pod_in = |pool: &str| {
        let pod = NetNs::new("pwp");
        let (ok, out) = node.cni(
            "ADD",
            &pod.name,
            &pod.path(),
            &k8s_args("default", &pod.name),
            &node.conf(json!({ "pools": [pool] })),
        );
        assert!(ok, "{out}");
        pod
    };
    let trusted = pod_in("trusted");
    let untrusted = pod_in("untrusted");

    let mut watch = Command::new("ip")
        .args(["netns", "exec", &node.ns.name])
        .arg(binary("poolwarden"))
        .args(["firewall", "export", "--watch", "--format", "nftables"])
        .env("POOLWARDEN_DATASTORE", node.datastore())
        .env("POOLWARDEN_SOCKET", node.socket())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start firewall export --watch");
    // The loader: each export that --watch prints is applied on the router with `nft -f` when its last line
    // arrives, as an operator's `--watch | loader` would.
    let (loaded_tx, loaded) = std::sync::mpsc::channel::<String>();
    let stdout = watch.stdout.take().expect("stdout");
    let file = node.dir.path().join("watched.nft");
    let router = outside.name.clone();
    std::thread::spawn(move || {
        let mut export = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            export.push_str(&line);
            export.push('\n');
            if line == poolwarden::firewall::EXPORT_END {
                std::fs::write(&file, &export).expect("write the export");
                let ok = Command::new("ip")
                    .args(["netns", "exec", &router, "nft", "-f"])
                    .arg(&file)
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(ok, "nft -f refused the export:\n{export}");
                let _ = loaded_tx.send(std::mem::take(&mut export));
            }
        }
    });
    let next_load =
        || loaded.recv_timeout(Duration::from_secs(20)).expect("--watch printed and the router loaded an export");
    next_load();
    // The admin's own chain, in the export's table (sets are usable only from their own table).
    outside.exec(&[
        "nft",
        "add",
        "chain",
        "inet",
        "poolwarden_pools",
        "admin",
        "{ type filter hook input priority 0; policy accept; }",
    ]);
    outside.exec(&[
        "nft",
        "add",
        "rule",
        "inet",
        "poolwarden_pools",
        "admin",
        "icmp",
        "type",
        "echo-request",
        "ip",
        "saddr",
        "@pool_trusted",
        "accept",
    ]);
    outside.exec(&["nft", "add", "rule", "inet", "poolwarden_pools", "admin", "icmp", "type", "echo-request", "drop"]);
    let spoofed = "10.31.0.250";
    untrusted.exec(&["ip", "addr", "add", &format!("{spoofed}/32"), "dev", "eth0"]);
    let verdicts = |round: &str| {
        let chain = outside.exec(&["nft", "list", "chain", "inet", "poolwarden_pools", "admin"]);
        assert!(
            chain.contains("@pool_trusted accept") && chain.contains("drop"),
            "{round}: the admin's chain survives:\n{chain}"
        );
        assert!(trusted.pings("10.98.0.50"), "{round}: the trusted pool's pod passes the firewall");
        assert!(!untrusted.pings("10.98.0.50"), "{round}: the other pool's pod does not");
        assert!(
            !untrusted.try_exec(&["ping", "-c", "1", "-W", "1", "-I", spoofed, "10.98.0.50"]),
            "{round}: nor does it with a trusted address it gave itself"
        );
    };
    verdicts("first load");
    node.apply("apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: late}\nspec: {cidr: 10.33.0.0/24}\n");
    let export = next_load();
    assert!(export.contains("pool_late"), "{export}");
    verdicts("a pool added");
    node.cli_ok(&["delete", "pool", "late"]);
    let export = next_load();
    assert!(
        export.contains("flush set inet poolwarden_pools pool_late"),
        "the deleted pool's set is emptied:\n{export}"
    );
    let late = outside.exec(&["nft", "list", "set", "inet", "poolwarden_pools", "pool_late"]);
    assert!(!late.contains("10.33.0.0"), "{late}");
    // Every later export, a one-shot one too, keeps that set empty (the deletion is recorded).
    let one_shot = node.cli_ok(&["firewall", "export", "--format", "nftables"]);
    assert!(one_shot.contains("flush set inet poolwarden_pools pool_late"), "{one_shot}");
    assert!(!one_shot.contains("10.33.0.0"), "{one_shot}");
    verdicts("a pool deleted");
    node.apply("apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: later}\nspec: {cidr: 10.34.0.0/24, natOutgoing: true}\n");
    next_load();
    verdicts("another pool added");
    let _ = watch.kill();
    let _ = watch.wait();
    node.stop_agent();
}
