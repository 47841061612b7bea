//! poolwarden next to real third-party CNI pieces from Debian: the `bridge` plugin with poolwarden as its
//! IPAM, and a conflist chain of poolwarden, `portmap` and `tuning`.

use poolwarden_tests::{NetNs, Node, address_of, debian_plugins, k8s_args, privileged, run_chain, unique, wait_for};
use serde_json::{Value, json};

fn handles(node: &Node) -> Value {
    serde_json::from_str(&node.cli_ok(&["get", "handles", "-o", "json"])).expect("handles JSON")
}

#[test]
fn debian_bridge_with_poolwarden_as_ipam() {
    if !privileged() || !debian_plugins() {
        return;
    }
    let mut node = Node::new("10.255.1.1");
    node.apply("apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: bridge-pool}\nspec: {cidr: 10.63.0.128/25, blockSize: 29}\n");
    node.start_agent();
    let bridge = unique("pwbr");
    let conf = json!({
        "cniVersion": "1.0.0", "name": "brnet", "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
        "ipam": { "type": "poolwarden-cni", "socket": node.socket(), "pools": ["bridge-pool"], "subnet": "10.63.0.0/24", "gateway": "10.63.0.1" }
    });
    let pods: Vec<NetNs> = (0..2).map(|_| NetNs::new("pwp")).collect();
    let mut addresses = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let (ok, result) = node.plugin(
            "bridge",
            "ADD",
            &format!("br-{i}"),
            &pod.path(),
            &k8s_args("default", &format!("b{i}")),
            &conf,
        );
        assert!(ok, "bridge ADD {i}: {result}\n{}", node.agent_log());
        let address = result["ips"][0]["address"].as_str().expect("address").to_string();
        assert!(
            address.starts_with("10.63.0.1") && address.ends_with("/24"),
            "from the pool, with the bridge's prefix: {address}"
        );
        assert_eq!(result["ips"][0]["gateway"], "10.63.0.1");
        addresses.push(address.split('/').next().unwrap_or_default().to_string());
    }
    assert!(pods[0].pings(&addresses[1]), "pods on the bridge reach each other");
    assert!(pods[1].pings("10.63.0.1"), "and the bridge's gateway on the node");
    assert!(
        !node.ns.exec(&["ip", "route", "show", "proto", "97"]).contains("blackhole"),
        "no blackhole eats the bridge's pods"
    );
    assert_eq!(handles(&node).as_array().map(Vec::len), Some(2), "the agent holds both allocations");
    for (i, pod) in pods.iter().enumerate() {
        let (ok, out) = node.plugin("bridge", "DEL", &format!("br-{i}"), &pod.path(), "", &conf);
        assert!(ok, "bridge DEL {i}: {out}");
    }
    assert_eq!(handles(&node), json!([]), "bridge's DEL released through poolwarden");
    node.stop_agent();
}

#[test]
fn conflist_chain_with_portmap_and_tuning() {
    if !privileged() || !debian_plugins() {
        return;
    }
    let mut node = Node::new("10.255.1.2");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.64.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "chained",
        "plugins": [
            { "type": "poolwarden-cni", "socket": node.socket() },
            { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true },
            { "type": "tuning", "sysctl": { "net.core.somaxconn": "512" } }
        ],
        "runtimeConfig": { "portMappings": [ { "hostPort": 18080, "containerPort": 8080, "protocol": "tcp" } ] }
    });
    let pod = NetNs::new("pwp");
    let (ok, result) = run_chain(&node, &list, "ADD", "chain-1", &pod.path(), &k8s_args("default", "web"), None);
    assert!(ok, "chain ADD: {result}\n{}", node.agent_log());
    let address =
        result["ips"][0]["address"].as_str().expect("the chain's result keeps poolwarden's address").to_string();
    assert!(address.starts_with("10.64.0."), "{address}");
    assert_eq!(
        pod.exec(&["sysctl", "-n", "net.core.somaxconn"]).trim(),
        "512",
        "tuning ran inside the pod after poolwarden"
    );

    // portmap's DNAT reaches the pod's server through poolwarden's route.
    let ip = address.split('/').next().unwrap_or_default().to_string();
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.name, "python3", "-m", "http.server", "8080", "--bind", &ip])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start server");
    let url = format!("http://{}:18080/", node.address);
    let reached = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        node.ns.try_exec(&["curl", "-s", "--max-time", "2", "-o", "/dev/null", &url])
    });
    let _ = server.kill();
    let _ = server.wait();
    assert!(reached, "hostPort 18080 on the node reaches the pod through portmap");

    let (ok, out) = run_chain(&node, &list, "DEL", "chain-1", &pod.path(), &k8s_args("default", "web"), Some(&result));
    assert!(ok, "chain DEL: {out}");
    assert_eq!(handles(&node), json!([]));
    node.stop_agent();
}

/// Whether podman and busybox-static are here (CI requires them: setup installs them).
fn podman_available() -> bool {
    if std::path::Path::new("/usr/bin/podman").is_file() && std::path::Path::new("/bin/busybox").is_file() {
        return true;
    }
    assert!(
        std::env::var_os("POOLWARDEN_REQUIRE_PRIVILEGED").is_none(),
        "podman and busybox-static are required; run cargo xtask setup"
    );
    eprintln!("SKIPPED: podman or busybox-static missing; cargo xtask setup installs them");
    false
}

/// `podman run --rm` of a busybox container on the network `conflist` (named `poolwarden`), with its CNI
/// backend executing the node's plugins inside the node's namespace, running `script`. nsenter (not `ip netns
/// exec`) so that podman keeps the host's cgroup mounts while it runs in the node's network namespace.
fn podman_run(node: &Node, conflist: &Value, extra: &[&str], script: &str) -> std::process::Command {
    let dir = node.dir.path();
    let rootfs = dir.join("rootfs");
    for sub in ["bin", "etc", "proc", "sys", "dev"] {
        std::fs::create_dir_all(rootfs.join(sub)).expect("rootfs");
    }
    if !rootfs.join("bin/busybox").exists() {
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox");
    }
    let net_d = dir.join("net.d");
    std::fs::create_dir_all(&net_d).expect("net.d");
    std::fs::write(net_d.join("poolwarden.conflist"), conflist.to_string()).expect("conflist");
    let containers_conf = dir.join("containers.conf");
    std::fs::write(
        &containers_conf,
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n",
            node.cni_path().display(),
            net_d.display()
        ),
    )
    .expect("containers.conf");
    let mut command = std::process::Command::new("nsenter");
    command
        .arg(format!("--net={}", node.ns.path()))
        .arg("podman")
        .args([
            "--root",
            &dir.join("storage").display().to_string(),
            "--runroot",
            &dir.join("run").display().to_string(),
        ])
        .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--runtime", "runc"])
        .args(["run", "--rm", "--network", "poolwarden", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"])
        .args(extra)
        .arg("--rootfs")
        .arg(&rootfs)
        .args(["/bin/busybox", "sh", "-c", script])
        .env("CONTAINERS_CONF", &containers_conf)
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=external-ns");
    command
}

#[test]
fn podman_runs_a_container_on_a_poolwarden_network() {
    if !privileged() || !debian_plugins() {
        return;
    }
    if !podman_available() {
        return;
    }
    let mut node = Node::new("10.255.1.3");
    node.apply(include_str!("../../examples/calico/seed-pools.yaml"));
    node.cli_ok(&["annotate", "namespace", "external-ns", "poolwarden.io/ipv4pools=[\"external-pool\"]"]);
    node.start_agent();

    let conflist = json!({ "cniVersion": "1.0.0", "name": "poolwarden", "plugins": [ { "type": "poolwarden-cni", "socket": node.socket() } ] });
    let script = format!("/bin/busybox ip -4 addr show eth0 && /bin/busybox ping -c 1 -W 2 {}", node.address);
    let out = podman_run(&node, &conflist, &[], &script).output().expect("run podman");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "podman failed: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.agent_log()
    );
    assert!(stdout.contains("inet 172.16.0."), "the container's address comes from external-pool: {stdout}");
    assert!(stdout.contains("1 packets received"), "the container reaches the node: {stdout}");
    assert_eq!(handles(&node), json!([]), "podman's DEL (--rm) released the address");
    assert!(!node.ns.exec(&["ip", "route", "show", "proto", "97"]).contains(" dev pw"), "and its route");
    node.stop_agent();
}

/// Packets from `source` that reached the node's netfilter (raw PREROUTING runs after TC ingress).
fn arrived(node: &Node, source: &str) -> u64 {
    let table = node.ns.exec(&["iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-n", "-x"]);
    table
        .lines()
        .filter(|l| l.split_whitespace().nth(7) == Some(source))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The pod gives itself `source` and pings the node from it; the node counts what arrives from it.
fn spoof_arrivals(node: &Node, pod: &NetNs, source: &str) -> u64 {
    spoof_arrivals_to(node, pod, source, &node.address)
}

/// Debian's `bandwidth` chained after poolwarden, limiting both directions (what the pod annotations
/// `kubernetes.io/ingress-bandwidth` and `egress-bandwidth` ask for), with `portmap` and `tuning`: with the
/// default clsact attach, `bandwidth` cannot add its ingress qdisc; with `enforcementHook: tcx` the chain
/// works, the shaping is in place, and the pod is still enforced, also while the agent is down (killed -9)
/// and after it comes back.
#[test]
fn bandwidth_chained_after_poolwarden_with_enforcement_on_tcx() {
    if !privileged() || !debian_plugins() {
        return;
    }
    let mut node = Node::new("10.255.1.4");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.65.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let list = |hook: Option<&str>| {
        let mut ours = json!({ "type": "poolwarden-cni", "socket": node.socket() });
        if let Some(hook) = hook {
            ours["enforcementHook"] = json!(hook);
        }
        json!({
            "cniVersion": "1.0.0",
            "name": "shaped",
            "plugins": [
                ours,
                { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true },
                { "type": "bandwidth", "ingressRate": 8_000_000, "ingressBurst": 800_000, "egressRate": 4_000_000, "egressBurst": 400_000 },
                { "type": "tuning", "sysctl": { "net.core.somaxconn": "512" } }
            ],
            "runtimeConfig": { "portMappings": [ { "hostPort": 18081, "containerPort": 8080, "protocol": "tcp" } ] }
        })
    };

    // Control: on the clsact hook, bandwidth's ingress qdisc collides with ours.
    let refused = NetNs::new("pwp");
    let (ok, out) = run_chain(&node, &list(None), "ADD", "shaped-0", &refused.path(), &k8s_args("default", "s0"), None);
    assert!(!ok && out["plugin"] == "bandwidth", "bandwidth fails next to a clsact qdisc: {out}");
    let (ok, out) = run_chain(&node, &list(None), "DEL", "shaped-0", &refused.path(), &k8s_args("default", "s0"), None);
    assert!(ok, "{out}");
    assert_eq!(handles(&node), json!([]), "the refused chain's address is back");

    let pod = NetNs::new("pwp");
    let shaped = list(Some("tcx"));
    let (ok, result) = run_chain(&node, &shaped, "ADD", "shaped-1", &pod.path(), &k8s_args("default", "s1"), None);
    assert!(ok, "chain ADD with enforcement on TCX: {result}\n{}", node.agent_log());
    let own = address_of(&result);
    let routes = node.ns.exec(&["ip", "route", "show", &own]);
    let host = routes.split_whitespace().skip_while(|w| *w != "dev").nth(1).expect("the pod's route").to_string();
    let qdiscs = node.ns.exec(&["tc", "qdisc", "show", "dev", &host]);
    assert!(qdiscs.contains("tbf") && qdiscs.contains("ingress"), "both limits are in place on {host}:\n{qdiscs}");
    assert!(!qdiscs.contains("clsact"), "{qdiscs}");
    let ifbs = node.ns.exec(&["ip", "-o", "link", "show", "type", "ifb"]);
    let ifb = ifbs.split(": ").nth(1).expect("bandwidth's ifb device for the egress limit").to_string();
    let shaped_egress = node.ns.exec(&["tc", "qdisc", "show", "dev", &ifb]);
    assert!(shaped_egress.contains("tbf"), "{shaped_egress}");
    assert_eq!(pod.exec(&["sysctl", "-n", "net.core.somaxconn"]).trim(), "512", "tuning ran after us");
    let ifindex = node.ns.exec(&["cat", &format!("/sys/class/net/{host}/ifindex")]).trim().to_string();
    let pinned = std::path::Path::new(&node.bpf_dir())
        .join(format!("v{}/tcx/{ifindex}", poolwarden::dataplane::enforcement::PIN_ABI));
    assert!(pinned.exists(), "the TCX link is pinned at {}", pinned.display());

    assert!(pod.pings(&node.address), "the shaped pod's own traffic flows");
    assert_eq!(spoof_arrivals(&node, &pod, "10.65.0.200"), 0, "a spoof from the shaped pod never arrives");
    node.kill_agent();
    assert!(pod.pings(&node.address), "agent down: own traffic flows");
    assert_eq!(spoof_arrivals(&node, &pod, "10.65.0.201"), 0, "agent down: the pinned link still enforces");
    node.start_agent();
    assert!(pinned.exists(), "the restarted agent adopted the link");
    assert_eq!(spoof_arrivals(&node, &pod, "10.65.0.202"), 0, "agent back: still enforced");
    // An upgrade to a build with another map layout: the old build's pinned link gets the new program and
    // moves to the new directory, never detached in between.
    node.stop_agent();
    let current = pinned.parent().and_then(|p| p.parent()).expect("version directory").to_path_buf();
    let older = current.with_file_name("v1");
    std::fs::rename(&current, &older).expect("make the pins look like an older build's");
    assert_eq!(spoof_arrivals(&node, &pod, "10.65.0.203"), 0, "the older build's link still enforces");
    node.start_agent();
    assert!(pinned.exists() && !older.exists(), "the link moved to this build's directory");
    assert_eq!(spoof_arrivals(&node, &pod, "10.65.0.204"), 0, "and enforces with this build's program");
    assert!(pod.pings(&node.address));
    let status = node.cli_ok(&["enforcement", "status", "--bpf-dir", &node.bpf_dir()]);
    assert!(status.contains("spoofed_ipv4"), "{status}");

    let (ok, out) =
        run_chain(&node, &shaped, "DEL", "shaped-1", &pod.path(), &k8s_args("default", "s1"), Some(&result));
    assert!(ok, "chain DEL: {out}");
    assert_eq!(handles(&node), json!([]));
    // Once the interface is gone, the next reconcile (here: a restart's) removes its link's pin.
    wait_for("the host side to go", std::time::Duration::from_secs(10), || {
        !node.ns.try_exec(&["ip", "link", "show", &host])
    });
    node.stop_agent();
    node.start_agent();
    assert!(!pinned.exists(), "the defunct link's pin is gone");
    node.stop_agent();
}

/// The same chain through a real CNI client: podman's CNI backend runs poolwarden-cni (on TCX), portmap,
/// bandwidth (both directions) and tuning for a container that tries to spoof: it starts, tc shows the
/// shaping on its host side while it runs, tuning's sysctl is set, and its spoofed packets never arrive.
#[test]
fn podman_runs_a_shaped_container_that_is_still_enforced() {
    if !privileged() || !debian_plugins() || !podman_available() {
        return;
    }
    let mut node = Node::new("10.255.1.5");
    node.apply(include_str!("../../examples/calico/seed-pools.yaml"));
    node.start_agent();
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "poolwarden",
        "plugins": [
            { "type": "poolwarden-cni", "socket": node.socket(), "enforcementHook": "tcx" },
            { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true },
            { "type": "bandwidth", "ingressRate": 8_000_000, "ingressBurst": 800_000, "egressRate": 4_000_000, "egressBurst": 400_000 },
            { "type": "tuning", "sysctl": { "net.core.somaxconn": "512" } }
        ]
    });
    let spoofed = "172.16.0.250";
    node.ns.exec(&["iptables", "-t", "raw", "-I", "PREROUTING", "-s", spoofed, "-j", "ACCEPT"]);
    // The container (root with CAP_NET_ADMIN: a hostile one) gives itself another address and sends from it.
    let script = format!(
        "cat /proc/sys/net/core/somaxconn; /bin/busybox ping -c 1 -W 2 {node} && \
         /bin/busybox ip addr add {spoofed}/32 dev eth0 && /bin/busybox ping -c 3 -W 1 -I {spoofed} {node}; \
         /bin/busybox sleep 4; true",
        node = node.address
    );
    let podman = podman_run(&node, &conflist, &["--cap-add", "NET_ADMIN"], &script)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run podman");
    // While it runs: its host side carries bandwidth's qdiscs (and no clsact).
    let mut shaped = String::new();
    for _ in 0..100 {
        let links = node.ns.exec(&["ip", "-o", "link", "show"]);
        for host in links.lines().filter_map(|l| l.split(": ").nth(1)).map(|n| n.split('@').next().unwrap_or(n)) {
            if host.starts_with("pw") {
                let qdiscs = node.ns.exec(&["tc", "qdisc", "show", "dev", host]);
                if qdiscs.contains("tbf") && qdiscs.contains("ingress") {
                    shaped = qdiscs;
                }
            }
        }
        if !shaped.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = podman.wait_with_output().expect("podman");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "podman failed: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.agent_log()
    );
    assert!(
        !shaped.is_empty() && !shaped.contains("clsact"),
        "tc showed bandwidth's shaping on the host side: {shaped}"
    );
    assert!(stdout.starts_with("512"), "tuning set the container's sysctl: {stdout}");
    assert!(stdout.contains("1 packets received"), "the container's own traffic flows: {stdout}");
    assert_eq!(arrived(&node, spoofed), 0, "its spoofed packets never arrive: {stdout}");
    let status = node.cli_ok(&["enforcement", "status", "--bpf-dir", &node.bpf_dir()]);
    assert!(status.contains("spoofed_ipv4"), "{status}");
    assert_eq!(handles(&node), json!([]), "podman's DEL (--rm) released the address");
    node.stop_agent();
}

/// Debian's `bridge` with poolwarden as its IPAM and `"enforce": true`: the pod's source is enforced on its
/// bridge port (the node's side of the veth the bridge plugin made), so a spoof never reaches the bridge;
/// without `enforce` the same spoof arrives (the control), and pods on the bridge still reach each other.
#[test]
fn debian_bridge_pods_enforced_on_their_bridge_ports() {
    if !privileged() || !debian_plugins() {
        return;
    }
    let mut node = Node::new("10.255.1.6");
    node.apply("apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: bridge-pool}\nspec: {cidr: 10.66.0.128/25, blockSize: 29}\n");
    node.start_agent();
    let bridge = unique("pwbr");
    let socket = node.socket();
    let conf = |enforce: bool| {
        json!({
            "cniVersion": "1.0.0", "name": "brnet", "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
            "ipam": { "type": "poolwarden-cni", "socket": socket, "pools": ["bridge-pool"], "subnet": "10.66.0.0/24",
                      "gateway": "10.66.0.1", "enforce": enforce }
        })
    };
    let add = |node: &Node, id: &str, pod: &NetNs, enforce: bool| {
        let (ok, result) = node.plugin("bridge", "ADD", id, &pod.path(), &k8s_args("default", id), &conf(enforce));
        assert!(ok, "bridge ADD {id}: {result}\n{}", node.agent_log());
        address_of(&result)
    };
    let open = NetNs::new("pwp");
    add(&node, "br-open", &open, false);
    assert_ne!(
        spoof_arrivals_to(&node, &open, "10.66.0.250", "10.66.0.1"),
        0,
        "control: without enforce a spoof arrives"
    );

    let pods: Vec<NetNs> = (0..2).map(|_| NetNs::new("pwp")).collect();
    let addresses: Vec<String> =
        pods.iter().enumerate().map(|(i, pod)| add(&node, &format!("br-enf-{i}"), pod, true)).collect();
    assert!(pods[0].pings(&addresses[1]), "enforced pods on the bridge reach each other");
    assert!(pods[1].pings("10.66.0.1"), "and the bridge's gateway");
    // One pod knows the gateway's MAC already, so its spoof goes out as IPv4 without asking ARP first.
    let bridge_mac = node.ns.exec(&["cat", &format!("/sys/class/net/{bridge}/address")]).trim().to_string();
    pods[1].exec(&["ip", "neigh", "replace", "10.66.0.1", "lladdr", &bridge_mac, "dev", "eth0"]);
    assert_eq!(
        spoof_arrivals_to(&node, &pods[1], "10.66.0.253", "10.66.0.1"),
        0,
        "a spoofed IPv4 source never arrives"
    );
    assert_eq!(
        spoof_arrivals_to(&node, &pods[0], "10.66.0.251", "10.66.0.1"),
        0,
        "a spoof from an enforced pod never arrives"
    );
    let status = node.cli_ok(&["enforcement", "status", "--bpf-dir", &node.bpf_dir()]);
    // On a shared segment the spoofer first ARPs from the spoofed address: that is what gets dropped.
    assert!(
        status.contains("2 interface(s) enforced") && status.contains("spoofed_arp") && status.contains("spoofed_ipv4"),
        "{status}"
    );
    assert!(
        !node.ns.exec(&["ip", "route", "show", "proto", "97"]).contains(" dev "),
        "no route of ours to a bridge port"
    );
    // A restarted agent enforces the same ports (from the endpoint records), and DEL lets go of them.
    node.kill_agent();
    node.start_agent();
    assert_eq!(spoof_arrivals_to(&node, &pods[0], "10.66.0.252", "10.66.0.1"), 0, "still enforced after a restart");
    for (i, pod) in pods.iter().enumerate() {
        let (ok, out) = node.plugin("bridge", "DEL", &format!("br-enf-{i}"), &pod.path(), "", &conf(true));
        assert!(ok, "bridge DEL {i}: {out}");
    }
    let (ok, out) = node.plugin("bridge", "DEL", "br-open", &open.path(), "", &conf(false));
    assert!(ok, "{out}");
    let status = node.cli_ok(&["enforcement", "status", "--bpf-dir", &node.bpf_dir()]);
    assert!(status.contains("0 interface(s) enforced"), "{status}\n{}", node.agent_log());
    assert_eq!(handles(&node), json!([]));
    node.stop_agent();
}

/// The pod gives itself `source` and pings `to` from it; the node counts what arrives from it.
fn spoof_arrivals_to(node: &Node, pod: &NetNs, source: &str, to: &str) -> u64 {
    node.ns.exec(&["iptables", "-t", "raw", "-I", "PREROUTING", "-s", source, "-j", "ACCEPT"]);
    let _ = pod.try_exec(&["ip", "addr", "add", &format!("{source}/32"), "dev", "eth0"]);
    let _ = pod.try_exec(&["ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", source, to]);
    arrived(node, source)
}

/// IPAM-only mode gives what host-local would for the subnet it reports: never the subnet's network,
/// broadcast or gateway address, only inside rangeStart..rangeEnd, the configured routes in the result (the
/// pod gets its default route from them), and a CHECK that fails once the allocation is gone.
#[test]
fn ipam_only_gives_addresses_as_host_local_would() {
    if !privileged() || !debian_plugins() {
        return;
    }
    let mut node = Node::new("10.255.1.7");
    node.apply(concat!(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: whole}\nspec: {cidr: 10.65.0.0/28, blockSize: 28}\n---\n",
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: ranged}\nspec: {cidr: 10.65.1.0/28, blockSize: 28}\n",
    ));
    node.start_agent();
    let network = |name: &str, ipam: Value| {
        let mut section = json!({ "type": "poolwarden-cni", "socket": node.socket() });
        section.as_object_mut().expect("object").extend(ipam.as_object().expect("object").clone());
        json!({ "cniVersion": "1.0.0", "name": name, "plugins": [
            { "type": "bridge", "bridge": unique("pwbr"), "isGateway": true, "ipMasq": false, "ipam": section }
        ] })
    };
    let whole =
        network("whole", json!({ "pools": ["whole"], "subnet": "10.65.0.0/28", "routes": [ { "dst": "0.0.0.0/0" } ] }));
    // The pool's 16 addresses less network, broadcast and gateway: 13 pods, then none.
    let mut pods = Vec::new();
    let mut given = std::collections::BTreeSet::new();
    for i in 0..14 {
        let pod = NetNs::new("pwp");
        let (ok, result) =
            run_chain(&node, &whole, "ADD", &format!("whole-{i}"), &pod.path(), &k8s_args("default", "w"), None);
        if i == 13 {
            assert!(!ok, "a 14th address was given: {result}");
            assert!(result.to_string().contains("exhausted"), "{result}");
            break;
        }
        assert!(ok, "ADD {i}: {result}\n{}", node.agent_log());
        let address = address_of(&result);
        assert!(!["10.65.0.0", "10.65.0.1", "10.65.0.15"].contains(&address.as_str()), "gave {address}");
        assert_eq!(result["ips"][0]["gateway"], "10.65.0.1", "the default gateway is reported: {result}");
        assert_eq!(result["routes"], json!([ { "dst": "0.0.0.0/0" } ]), "{result}");
        assert!(pod.exec(&["ip", "route", "show"]).contains("default via 10.65.0.1"), "the pod's default route");
        given.insert(address);
        pods.push((pod, result));
    }
    assert_eq!(given.len(), 13);

    // CHECK: fine while the allocation is the pod's, an error once it is released behind the pod's back.
    let (pod, result) = &pods[0];
    let (ok, out) = run_chain(&node, &whole, "CHECK", "whole-0", &pod.path(), &k8s_args("default", "w"), Some(result));
    assert!(ok, "CHECK of a live attachment: {out}");
    node.cli_ok(&["ipam", "release", "--ip", &address_of(result)]);
    let (ok, out) = run_chain(&node, &whole, "CHECK", "whole-0", &pod.path(), &k8s_args("default", "w"), Some(result));
    assert!(!ok && out.to_string().contains("holds no address"), "CHECK after the release: {out}");

    // rangeStart and rangeEnd bound what is given.
    let ranged = network(
        "ranged",
        json!({ "pools": ["ranged"], "subnet": "10.65.1.0/28", "rangeStart": "10.65.1.5", "rangeEnd": "10.65.1.6" }),
    );
    let mut ranged_given = std::collections::BTreeSet::new();
    for i in 0..3 {
        let pod = NetNs::new("pwp");
        let (ok, result) =
            run_chain(&node, &ranged, "ADD", &format!("ranged-{i}"), &pod.path(), &k8s_args("default", "r"), None);
        if i == 2 {
            assert!(!ok, "a third address outside 10.65.1.5-10.65.1.6: {result}");
            break;
        }
        assert!(ok, "ADD {i}: {result}");
        ranged_given.insert(address_of(&result));
        pods.push((pod, result));
    }
    assert_eq!(ranged_given, ["10.65.1.5".to_string(), "10.65.1.6".to_string()].into_iter().collect());
    for (i, (pod, result)) in pods.iter().enumerate() {
        let (list, id) = if i < 13 { (&whole, format!("whole-{i}")) } else { (&ranged, format!("ranged-{}", i - 13)) };
        let (ok, out) = run_chain(&node, list, "DEL", &id, &pod.path(), "", Some(result));
        assert!(ok, "DEL {id}: {out}");
    }
    assert_eq!(handles(&node), json!([]));
    node.stop_agent();
}

/// Every CNI version runtimes send: the same ADD, CHECK and DEL through a conflist with portmap chained, the
/// result in that version's schema, and podman's CNI backend running a container whose published port works.
#[test]
fn every_cni_version_through_a_chain_with_portmap_and_podman() {
    if !privileged() || !debian_plugins() || !podman_available() {
        return;
    }
    let mut node = Node::new("10.255.1.8");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.66.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    for (n, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"].into_iter().enumerate() {
        let port = 18100 + n as u16;
        // Debian's portmap (and podman's libcni) stop at 1.0.0: 1.1.0 is checked on poolwarden alone.
        let newest = version == "1.1.0";
        let mut list = json!({
            "cniVersion": version,
            "name": "poolwarden",
            "plugins": [
                { "type": "poolwarden-cni", "socket": node.socket() },
                { "type": "portmap", "capabilities": { "portMappings": true } }
            ],
            "runtimeConfig": { "portMappings": [ { "hostPort": port, "containerPort": 8080, "protocol": "tcp" } ] }
        });
        if newest {
            list["plugins"] = json!([list["plugins"][0].clone()]);
        }
        let pod = NetNs::new("pwp");
        let id = format!("v{n}");
        let (ok, result) = run_chain(&node, &list, "ADD", &id, &pod.path(), &k8s_args("default", "v"), None);
        assert!(ok, "{version}: ADD: {result}\n{}", node.agent_log());
        assert_eq!(result["cniVersion"], version, "{result}");
        let ip = &result["ips"][0];
        if version.starts_with("0.") {
            assert_eq!(ip["version"], "4", "{version}: ips[].version: {result}");
        } else {
            assert!(ip.get("version").is_none(), "{version}: no ips[].version: {result}");
        }
        let index = ip["interface"].as_u64().expect("ips[].interface") as usize;
        assert_eq!(result["interfaces"][index]["name"], "eth0", "{version}: interface index: {result}");
        assert_eq!(result["interfaces"][index]["sandbox"], pod.path().as_str(), "{result}");
        // portmap chained after poolwarden, in that version.
        let address = address_of(&result);
        let url = format!("http://{}:{port}/", node.address);
        if !newest {
            let mut server = std::process::Command::new("ip")
                .args(["netns", "exec", &pod.name, "python3", "-m", "http.server", "8080", "--bind", &address])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start server");
            let reached = (0..50).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                node.ns.try_exec(&["curl", "-s", "--max-time", "2", "-o", "/dev/null", &url])
            });
            let _ = server.kill();
            let _ = server.wait();
            assert!(reached, "{version}: hostPort {port} reaches the pod through portmap");
        }
        // CHECK of poolwarden's part (Debian's portmap fails its own CHECK of an IPv4-only result: it looks
        // for an IPv6 chain it never made).
        let mut ours = list.clone();
        ours["plugins"] = json!([list["plugins"][0].clone()]);
        let (ok, out) = run_chain(&node, &ours, "CHECK", &id, &pod.path(), &k8s_args("default", "v"), Some(&result));
        if version.starts_with("0.3.") {
            assert!(!ok && out["error"]["code"] == 1, "{version} has no CHECK: {out}");
        } else {
            assert!(ok, "{version}: CHECK: {out}");
        }
        let (ok, out) = run_chain(&node, &list, "DEL", &id, &pod.path(), "", Some(&result));
        assert!(ok, "{version}: DEL: {out}");
        assert_eq!(handles(&node), json!([]), "{version}: DEL released");

        if newest {
            continue;
        }
        // podman's CNI backend, with a published port answered from inside the container.
        let mut podman_list = list.clone();
        podman_list.as_object_mut().expect("object").remove("runtimeConfig");
        let container = podman_run(
            &node,
            &podman_list,
            &["-p", &format!("{}:{port}:8080", node.address)],
            "/bin/busybox httpd -p 8080 -h /etc && /bin/busybox sleep 6",
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run podman");
        let reached = (0..60).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            node.ns.try_exec(&["curl", "-s", "--max-time", "1", "-o", "/dev/null", &url])
        });
        let out = container.wait_with_output().expect("podman");
        assert!(
            out.status.success(),
            "{version}: podman: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            node.agent_log()
        );
        assert!(reached, "{version}: podman's published port {port} reaches the container");
        assert_eq!(handles(&node), json!([]), "{version}: podman's DEL released the address");
    }
    node.stop_agent();
}
