//! One node, for real: the agent in a node namespace on the embedded store, pods as namespaces wired by
//! `poolwarden-cni` invoked as kubelet invokes it.

use std::{collections::BTreeSet, process::Command, time::Duration};

use poolwarden_tests::{NetNs, Node, address_of, binary, k8s_args, privileged, wait_for};
use serde_json::{Value, json};

const SEED_POOLS: &str = include_str!("../../examples/calico/seed-pools.yaml");
const NO_GRACE: &str =
    "apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {emptyBlockGraceSeconds: 0}\n";

fn our_routes(node: &Node) -> String {
    node.ns.exec(&["ip", "route", "show", "proto", "97"])
}

fn host_links(node: &Node) -> Vec<String> {
    node.ns
        .exec(&["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .filter(|n| n.starts_with("pw"))
        .map(String::from)
        .collect()
}

#[test]
fn seed_example_three_pods_per_namespace() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.0.1");
    node.apply(SEED_POOLS);
    node.apply(NO_GRACE);
    node.cli_ok(&["annotate", "namespace", "external-ns", "poolwarden.io/ipv4pools=[\"external-pool\"]"]);
    node.cli_ok(&["annotate", "namespace", "internal-ns", "cni.projectcalico.org/ipv4pools=[\"internal-pool\"]"]);
    node.start_agent();

    let mut pods = Vec::new();
    for namespace in ["external-ns", "internal-ns"] {
        for i in 1..=3 {
            let pod_ns = NetNs::new("pwp");
            let container = format!("{namespace}-nginx-{i}");
            let (ok, result) = node.cni(
                "ADD",
                &container,
                &pod_ns.path(),
                &k8s_args(namespace, &format!("nginx-{i}")),
                &node.conf(json!({})),
            );
            assert!(ok, "ADD {container}: {result}\n{}", node.agent_log());
            let ip = address_of(&result);
            let prefix = if namespace == "external-ns" { "172.16.0." } else { "192.168.0." };
            assert!(ip.starts_with(prefix), "{container} got {ip}, not from its namespace's pool");
            assert_eq!(result["interfaces"][1]["sandbox"], pod_ns.path());
            assert_eq!(result["ips"][0]["interface"], 1);
            assert!(pod_ns.exec(&["ip", "-4", "addr", "show", "eth0"]).contains(&format!("{ip}/32")));
            assert!(pod_ns.pings(&node.address), "{container} ({ip}) cannot reach the node");
            pods.push((container, pod_ns, ip));
        }
    }
    // The CLI works while the agent holds the datastore: it forwards to the agent's socket.
    let show = node.cli_ok(&["ipam", "show"]);
    assert!(show.contains("external-pool   172.16.0.0/26    /29          1/8      3"), "{show}");
    let refused = node.cli(&["apply", "-f", "/nonexistent.yaml"]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("/nonexistent.yaml"),
        "errors come back through the agent"
    );
    let routes = our_routes(&node);
    assert!(routes.contains("blackhole 172.16.0.0/29"), "{routes}");
    assert!(routes.contains("blackhole 192.168.0.0/29"), "{routes}");
    for (container, _, ip) in &pods {
        assert!(routes.contains(&format!("{ip} dev pw")), "no route for {container} ({ip}):\n{routes}");
    }
    assert!(pods[0].1.pings(&pods[5].2), "pods on one node reach each other through the node");
    // The node's namespace started with forwarding off, as a new machine's may: the agent turned it on for
    // its IPv4 pools, and left IPv6's alone (no IPv6 pool; forwarding would stop router advertisements).
    assert_eq!(node.ns.exec(&["sysctl", "-n", "net.ipv4.ip_forward"]).trim(), "1");
    assert_eq!(node.ns.exec(&["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).trim(), "0");

    for (container, pod_ns, _) in &pods {
        let (ok, out) = node.cni("DEL", container, &pod_ns.path(), &k8s_args("x", "y"), &node.conf(json!({})));
        assert!(ok, "DEL {container}: {out}");
    }
    // DEL is idempotent, also once the netns is gone.
    let (first, pod_ns, _) = pods.remove(0);
    let (ok, out) = node.cni("DEL", &first, &pod_ns.path(), "", &node.conf(json!({})));
    assert!(ok, "repeated DEL: {out}");
    drop(pod_ns);
    let (ok, out) = node.cni("DEL", &first, "/var/run/netns/does-not-exist", "", &node.conf(json!({})));
    assert!(ok, "DEL after the netns is gone: {out}");

    assert_eq!(our_routes(&node), "", "DEL of every pod leaves none of our routes");
    wait_for("the veths to go", Duration::from_secs(10), || host_links(&node).is_empty());
    node.stop_agent();
    let handles = node.cli_ok(&["get", "handles", "-o", "json"]);
    assert_eq!(serde_json::from_str::<Value>(&handles).unwrap(), json!([]), "allocations left");
    assert!(node.cli_ok(&["ipam", "check"]).starts_with("ipam check: clean"));
}

#[test]
fn restart_after_kill_reconciles_routes_and_keeps_addresses() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.0.2");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.60.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let mut pods = Vec::new();
    for i in 0..3 {
        let pod_ns = NetNs::new("pwp");
        let container = format!("restart-{i}");
        let (ok, result) =
            node.cni("ADD", &container, &pod_ns.path(), &k8s_args("default", &container), &node.conf(json!({})));
        assert!(ok, "{result}");
        pods.push((container, pod_ns, address_of(&result)));
    }
    // Damage: one pod's route gone, a stray route of ours, and someone else's route that must survive.
    node.ns.exec(&["ip", "route", "del", &pods[1].2]);
    node.ns.exec(&["ip", "route", "add", "blackhole", "10.77.0.0/24", "proto", "97"]);
    node.ns.exec(&["ip", "route", "add", "blackhole", "10.78.0.0/24", "proto", "static"]);

    node.kill_agent();
    for (container, pod_ns, ip) in &pods[..1] {
        assert!(pod_ns.pings(&node.address), "{container} ({ip}) keeps working while the agent is down");
    }
    node.start_agent();
    wait_for("routes reconciled", Duration::from_secs(10), || {
        our_routes(&node).contains(&format!("{} dev pw", pods[1].2))
    });
    let routes = our_routes(&node);
    assert!(!routes.contains("10.77.0.0/24"), "a stray route of ours is removed:\n{routes}");
    assert!(node.routes().contains("blackhole 10.78.0.0/24 proto static"), "someone else's route is never touched");
    for (container, pod_ns, ip) in &pods {
        assert!(pod_ns.pings(&node.address), "{container} ({ip}) works after the restart");
        let (ok, again) =
            node.cni("ADD", container, &pod_ns.path(), &k8s_args("default", container), &node.conf(json!({})));
        assert!(ok, "{again}");
        assert_eq!(&address_of(&again), ip, "a repeated ADD after the restart keeps the address");
    }
    for (container, pod_ns, _) in &pods {
        assert!(node.cni("DEL", container, &pod_ns.path(), "", &node.conf(json!({}))).0);
    }
    node.stop_agent();
    assert!(node.cli_ok(&["ipam", "check"]).starts_with("ipam check: clean"));
    assert_eq!(
        serde_json::from_str::<Value>(&node.cli_ok(&["get", "handles", "-o", "json"])).unwrap(),
        json!([]),
        "nothing leaked"
    );
}

/// Rewrite the node's datastore (its agent stopped) as an older poolwarden would have left the same state: the
/// multi-key records (blocks, affinities, room, handles and endpoint records), no block object, no layout mark.
fn as_older_layout(node: &Node) {
    use poolwarden::store::{Store, Txn, embedded::EmbeddedStore, keys};
    let path = node.dir.path().join("store.redb");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(EmbeddedStore::open(&path).expect("open"));
        let allocator = poolwarden::allocator::single::BlockAllocator::of_store(std::sync::Arc::clone(&store));
        let blocks = allocator.blocks().await.expect("blocks");
        assert!(!blocks.is_empty(), "the agent wrote block objects");
        let records = poolwarden::migrate::records(&blocks).expect("records");
        let mut gone = store.list_keys("objects/").await.expect("objects").0;
        gone.extend(store.list_keys("index/").await.expect("index").0);
        gone.push(keys::MIGRATION_IN_PROGRESS.to_string());
        let writes = gone.into_iter().map(|k| (k, None)).chain(records.into_iter().map(|(k, v)| (k, Some(v))));
        let writes: Vec<(String, Option<Vec<u8>>)> = writes.collect();
        for chunk in writes.chunks(50) {
            let txn = chunk.iter().fold(Txn::new(), |txn, (key, value)| match value {
                Some(value) => txn.put(key.as_str(), value.clone()),
                None => txn.remove(key.as_str()),
            });
            store.txn(txn).await.expect("write");
        }
    });
}

/// The keys under `prefix` in the node's datastore (its agent stopped).
fn stored_keys(node: &Node, prefix: &str) -> Vec<String> {
    use poolwarden::store::{Store, embedded::EmbeddedStore};
    let store = EmbeddedStore::open(&node.dir.path().join("store.redb")).expect("open");
    tokio::runtime::Runtime::new().expect("runtime").block_on(store.list_keys(prefix)).expect("list").0
}

#[test]
fn an_upgrade_from_the_older_records_keeps_every_pod_its_address_and_route() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.0.9");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.69.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let mut pods = Vec::new();
    for i in 0..3 {
        let pod_ns = NetNs::new("pwp");
        let container = format!("upgrade-{i}");
        let (ok, result) =
            node.cni("ADD", &container, &pod_ns.path(), &k8s_args("default", &container), &node.conf(json!({})));
        assert!(ok, "{result}");
        pods.push((container, pod_ns, address_of(&result)));
    }
    // The older agent killed; what it wrote is the multi-key records (its registration, this node's, stays).
    node.kill_agent();
    as_older_layout(&node);
    assert!(!stored_keys(&node, "endpoints/").is_empty() && stored_keys(&node, "objects/").is_empty());
    // Until an agent of this version converted it, this version's commands do not read it as empty.
    let refused = node.cli(&["ipam", "check"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("records of an older poolwarden"), "{stderr}");
    node.start_agent();
    wait_for("the records converted and the routes reconciled", Duration::from_secs(30), || {
        node.agent_log().contains("converted the older version's records to block objects")
            && pods.iter().all(|(_, _, ip)| our_routes(&node).contains(&format!("{ip} dev pw")))
    });
    for (container, pod_ns, ip) in &pods {
        assert!(pod_ns.pings(&node.address), "{container} ({ip}) works after the upgrade");
        let (ok, again) =
            node.cni("ADD", container, &pod_ns.path(), &k8s_args("default", container), &node.conf(json!({})));
        assert!(ok, "{again}");
        assert_eq!(&address_of(&again), ip, "a repeated ADD after the upgrade keeps the address");
    }
    // A new pod gets none of theirs.
    let newcomer = NetNs::new("pwp");
    let (ok, result) =
        node.cni("ADD", "upgrade-new", &newcomer.path(), &k8s_args("default", "new"), &node.conf(json!({})));
    assert!(ok, "{result}");
    assert!(pods.iter().all(|(_, _, ip)| *ip != address_of(&result)), "{result}");
    for (container, pod_ns, _) in
        pods.iter().map(|(c, n, ip)| (c.as_str(), n, ip)).chain([("upgrade-new", &newcomer, &String::new())])
    {
        assert!(node.cni("DEL", container, &pod_ns.path(), "", &node.conf(json!({}))).0);
    }
    node.stop_agent();
    assert!(node.cli_ok(&["ipam", "check"]).starts_with("ipam check: clean"));
    assert!(stored_keys(&node, "endpoints/").is_empty() && stored_keys(&node, "blocks/").is_empty(), "no record left");
}

#[test]
fn fifty_concurrent_adds_are_distinct_and_wired() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.0.3");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.61.0.0/24, blockSize: 27}\n",
    );
    node.start_agent();
    let pods: Vec<NetNs> = (0..50).map(|_| NetNs::new("pwp")).collect();
    let results: Vec<(bool, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod_ns)| {
                let node = &node;
                scope.spawn(move || {
                    node.cni(
                        "ADD",
                        &format!("burst-{i}"),
                        &pod_ns.path(),
                        &k8s_args("default", &format!("p{i}")),
                        &node.conf(json!({})),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("ADD thread")).collect()
    });
    let mut addresses = BTreeSet::new();
    for (i, (ok, result)) in results.iter().enumerate() {
        assert!(ok, "ADD {i}: {result}\n{}", node.agent_log());
        assert!(addresses.insert(address_of(result)), "{} given twice", address_of(result));
    }
    assert_eq!(addresses.len(), 50);
    for (i, pod_ns) in pods.iter().enumerate() {
        assert!(pod_ns.pings(&node.address), "pod {i} is not wired");
    }
    let blocks = our_routes(&node).lines().filter(|l| l.starts_with("blackhole")).count();
    assert_eq!(blocks, 2, "50 pods fill two /27 blocks, not one block each:\n{}", our_routes(&node));
    std::thread::scope(|scope| {
        for (i, pod_ns) in pods.iter().enumerate() {
            let node = &node;
            scope.spawn(move || {
                assert!(node.cni("DEL", &format!("burst-{i}"), &pod_ns.path(), "", &node.conf(json!({}))).0)
            });
        }
    });
    wait_for("the veths to go", Duration::from_secs(10), || host_links(&node).is_empty());
    node.stop_agent();
    assert_eq!(serde_json::from_str::<Value>(&node.cli_ok(&["get", "handles", "-o", "json"])).unwrap(), json!([]));
}

#[test]
fn plugin_errors_carry_codes_and_leave_nothing_behind() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.0.4");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: bound}\nspec: {cidr: 10.62.0.0/24, blockSize: 28, allowedNamespaces: [team-a]}\n",
    );
    node.start_agent();
    let pod_ns = NetNs::new("pwp");
    let cases = [
        (
            "unknown pool",
            node.conf(json!({"pools": ["nope"]})),
            k8s_args("team-a", "p"),
            7,
            "pool \"nope\" named by the network configuration does not exist",
        ),
        (
            "refused pool",
            node.conf(json!({"pools": ["bound"]})),
            k8s_args("team-b", "p"),
            100,
            "refuses namespace \"team-b\"",
        ),
        (
            "no pool admits the namespace",
            node.conf(json!({})),
            k8s_args("team-b", "p"),
            100,
            "no pool admits namespace \"team-b\"",
        ),
        (
            "agent down",
            node.conf(json!({"socket": "/nonexistent/agent.sock"})),
            k8s_args("team-a", "p"),
            11,
            "not reachable",
        ),
        ("netns does not exist", node.conf(json!({})), k8s_args("team-a", "p"), 4, "cannot be opened"),
    ];
    for (what, conf, args, code, fragment) in cases {
        let netns = if what == "netns does not exist" { "/var/run/netns/nope".to_string() } else { pod_ns.path() };
        let (ok, out) = node.cni("ADD", "errors", &netns, &args, &conf);
        assert!(!ok, "{what}: should fail");
        assert_eq!(out["code"], code, "{what}: {out}");
        assert!(out["msg"].as_str().unwrap_or_default().contains(fragment), "{what}: {out}");
        assert!(host_links(&node).is_empty(), "{what}: veth left behind");
        assert_eq!(pod_ns.exec(&["ip", "-o", "link", "show"]).lines().count(), 1, "{what}: interface left in the pod");
    }
    node.stop_agent();
    assert_eq!(serde_json::from_str::<Value>(&node.cli_ok(&["get", "handles", "-o", "json"])).unwrap(), json!([]));
    assert!(node.cli_ok(&["get", "blocks", "-o", "json"]).trim() == "[]", "a refused ADD claims no block");
}

/// The plugin makes the veth while the agent allocates: the agent must wire the pod only once the host side
/// exists and is up (a route through a link that is down is refused), however late that is.
#[test]
fn the_agent_waits_for_the_host_interface_to_be_up() {
    use poolwarden_cni::protocol::{AddRequest, Request, Response};
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.0.7");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.62.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let pod_ns = NetNs::new("pwp");
    let host_name = poolwarden_cni::plugin::host_ifname("late", "eth0");
    let host = host_name.as_str();
    let request = Request::Add(AddRequest {
        container_id: "late".into(),
        ifname: "eth0".into(),
        netns: pod_ns.path(),
        namespace: "default".into(),
        pod: "late".into(),
        pod_uid: String::new(),
        host_ifname: host.into(),
        pools: vec![],
        ips: vec![],
        host_index_follows: false,
        hook: Default::default(),
        bridge_port: String::new(),
        network: String::new(),
        ipam_range: None,
    });
    let socket = node.socket();
    let asked = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(poolwarden_cni::plugin::call_agent(&socket, &request))
    });
    // The interface appears late, and down; only bringing it up lets the ADD finish.
    std::thread::sleep(Duration::from_millis(300));
    node.ns.exec(&["ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", &pod_ns.name]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!asked.is_finished(), "the agent answered before the host interface was up");
    node.ns.exec(&["ip", "link", "set", host, "up"]);
    let answer = asked.join().expect("join").expect("the agent answered");
    let Response::Added { ips } = answer else { panic!("ADD failed: {answer:?}\n{}", node.agent_log()) };
    let ip = ips[0].address.addr().to_string();
    assert!(our_routes(&node).contains(&format!("{ip} dev {host}")), "{}", our_routes(&node));
    node.stop_agent();
}

/// The plugin tells the agent when the veth cannot be made (it closes the connection instead of sending the
/// host side's index): the agent gives the address back at once, and its answer reaches the plugin.
#[test]
fn a_veth_that_cannot_be_made_releases_the_address_at_once() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.0.8");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.62.1.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let pod_ns = NetNs::new("pwp");
    // The pod's namespace already has an eth0: the pod side of the veth cannot be created there.
    pod_ns.exec(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0"]);
    let (ok, out) = node.cni("ADD", "taken", &pod_ns.path(), &k8s_args("default", "taken"), &node.conf(json!({})));
    assert!(!ok, "ADD succeeded with eth0 taken: {out}");
    assert!(out["msg"].as_str().unwrap_or_default().contains("create veth"), "{out}");
    let log = node.agent_log();
    assert!(log.contains("the plugin closed the connection without creating the host interface"), "{log}");
    assert!(host_links(&node).is_empty(), "veth left behind");
    assert_eq!(serde_json::from_str::<Value>(&node.cli_ok(&["get", "handles", "-o", "json"])).unwrap(), json!([]));
    node.stop_agent();
}

/// A host side left behind by an earlier attempt of the same ADD (its name is the attachment's) is deleted,
/// with its peer, and the pair made again; the host side's MAC in the result is the one it has.
#[test]
fn a_host_side_left_behind_is_replaced() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.0.9");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.62.2.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let pod_ns = NetNs::new("pwp");
    let host = poolwarden_cni::plugin::host_ifname("again", "eth0");
    node.ns.exec(&["ip", "link", "add", &host, "type", "veth", "peer", "name", "leftover0"]);
    let (ok, out) = node.cni("ADD", "again", &pod_ns.path(), &k8s_args("default", "again"), &node.conf(json!({})));
    assert!(ok, "ADD failed with a host side left behind: {out}");
    assert_eq!(host_links(&node), vec![format!("{host}@if2")], "the leftover pair is gone, the new one is there");
    assert!(!node.ns.exec(&["ip", "-o", "link", "show"]).contains("leftover0"), "the old peer is gone");
    let shown = node.ns.exec(&["ip", "-j", "link", "show", &host]);
    let mac = serde_json::from_str::<Value>(&shown).unwrap()[0]["address"].as_str().unwrap().to_string();
    assert_eq!(out["interfaces"][0]["name"], json!(host), "{out}");
    assert_eq!(out["interfaces"][0]["mac"], json!(mac), "{out}");
    assert!(mac.starts_with("02:"), "a locally administered unicast MAC: {mac}");
    let address = address_of(&out);
    assert!(pod_ns.exec(&["ip", "-o", "addr", "show", "eth0"]).contains(&address), "the pod has {address}");
    let (ok, out) = node.cni("DEL", "again", &pod_ns.path(), &k8s_args("default", "again"), &node.conf(json!({})));
    assert!(ok, "DEL failed: {out}");
    wait_for("the veth to go", Duration::from_secs(10), || host_links(&node).is_empty());
    node.stop_agent();
}

/// An agent (re)starting while a command holds the embedded datastore (here `firewall export --watch`, which
/// holds it for as long as it runs when no agent does) waits for it instead of exiting.
#[test]
fn the_agent_waits_for_a_datastore_another_process_holds() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.0.7");
    node.apply(SEED_POOLS);
    let mut holder = Command::new(binary("poolwarden"))
        .args(["firewall", "export", "--watch"])
        .env("POOLWARDEN_DATASTORE", node.datastore())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the holder");
    // Its first export is out: it holds the file.
    let mut first = [0u8; 1];
    std::io::Read::read_exact(holder.stdout.as_mut().expect("stdout"), &mut first).expect("the holder's export");
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        let _ = holder.kill();
        let _ = holder.wait();
    });
    node.start_agent();
    release.join().unwrap();
    let log = node.agent_log();
    assert!(log.contains("held by another process"), "{log}");
    assert!(node.cli_ok(&["ipam", "show"]).contains("external-pool"));
}

/// A datastore that a migration into it (`poolwarden datastore migrate --from kubernetes`) left part way
/// holds a partial IPAM state: the agent does not start on it, and says what to do; once the mark is gone
/// it starts.
#[test]
fn the_agent_does_not_start_on_a_datastore_a_migration_left_part_way() {
    if !privileged() {
        return;
    }
    use poolwarden::store::{Store, Txn, embedded::EmbeddedStore};
    let mut node = Node::new("10.255.9.1");
    let path = node.dir.path().join("store.redb");
    let mark = |put: bool| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let store = EmbeddedStore::open(&path).expect("the node's store");
            let txn = if put {
                Txn::new().put(poolwarden::migrate::IN_PROGRESS, b"kubernetes".to_vec())
            } else {
                Txn::new().remove(poolwarden::migrate::IN_PROGRESS)
            };
            store.txn(txn).await.expect("the mark");
        });
    };
    mark(true);
    let out = Command::new("ip")
        .args(["netns", "exec", &node.ns.name])
        .arg(binary("poolwarden"))
        .args(["agent", "--node", &node.name, "--socket", &node.socket(), "--bpf-dir", &node.bpf_dir()])
        .env("POOLWARDEN_DATASTORE", node.datastore())
        .output()
        .expect("run the agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("did not finish") && err.contains("datastore migrate"), "{err}");
    mark(false);
    node.start_agent();
    node.stop_agent();
}
