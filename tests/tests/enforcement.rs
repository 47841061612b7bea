//! A pod can send only from its own address: spoofed packets never arrive on the node, checked on the
//! receiving side with a netfilter counter in the node's namespace.

use poolwarden_tests::{NetNs, Node, address_of, k8s_args, privileged};
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

/// The spoofed-IPv4 drops of pool `a` in `poolwarden enforcement status` output.
fn spoofed_count(status: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with("a ") && l.contains("spoofed_ipv4"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
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
    let (pod, result) = node.add_pod("enf-1", "default", "p");
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
    // Passed packets are counted only when the agent is asked to (below).
    assert!(!metrics.contains("poolwarden_passed_packets_total{"), "{metrics}");
    assert!(status.contains("passed packets counted on 0 of 1 interface(s)"), "{status}");
    let log = node.agent_log();
    assert!(
        log.contains("enforcement dropped a packet") && log.contains("10.81.0.7"),
        "drops are reported to the agent's log:\n{log}"
    );
    // A pod added while enforcing is enforced from its first packet.
    let (second, _) = node.add_pod("enf-2", "default", "q");
    watch_source(&node, "10.81.0.8");
    send_from(&second, "10.81.0.8", &node.address);
    assert_eq!(arrived(&node, "10.81.0.8"), 0);
    assert!(second.pings(&node.address));

    // Passed packets, counted once the agent is asked to (its restart writes every entry again).
    node.stop_agent();
    node.start_agent_with(&["--count-passed-packets"]);
    assert!(pod.pings(&node.address), "the pod's own traffic flows");
    let status = node.cli_ok(&["enforcement", "status", "--bpf-dir", &node.bpf_dir()]);
    assert!(status.contains("passed packets counted on 2 of 2 interface(s)"), "{status}");
    assert!(status.lines().any(|l| l.starts_with("a ") && l.contains("passed")), "{status}");
    let metrics = node.ns.exec(&["curl", "-s", "http://127.0.0.1:9641/metrics"]);
    assert!(metrics.contains("poolwarden_passed_packets_total{pool=\"a\"}"), "{metrics}");
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
    let (pod, _) = node.add_pod("survivor", "default", "p");
    node.kill_agent();
    // The agent is gone (kill -9); its pinned link and maps are not.
    assert!(pod.pings(&node.address), "allowed traffic still flows while the agent is down");
    watch_source(&node, "10.82.0.99");
    send_from(&pod, "10.82.0.99", &node.address);
    assert_eq!(arrived(&node, "10.82.0.99"), 0, "spoofed packets are still dropped while the agent is down");
    let status = node.cli_ok(&["enforcement", "status", "--bpf-dir", &node.bpf_dir()]);
    assert!(status.contains("1 interface(s) enforced"), "the pod's entry stays pinned:\n{status}");
    // A pod created while the agent is down is refused (try again later), never wired unenforced.
    let late = NetNs::new("pwp");
    let (ok, out) = node.cni("ADD", "late", &late.path(), &k8s_args("default", "late"), &node.conf(json!({})));
    assert!(!ok && out["code"] == 11, "ADD with the agent down: {out}");
    assert_eq!(late.exec(&["ip", "-o", "link", "show"]).lines().count(), 1, "nothing wired for the refused pod");
    let before = node.cli(&["enforcement", "status", "--bpf-dir", &node.bpf_dir()]);
    let before = String::from_utf8_lossy(&before.stdout).into_owned();
    let dropped_before = spoofed_count(&before);
    assert!(dropped_before > 0, "{before}");
    node.start_agent();
    assert!(pod.pings(&node.address), "and after the restart, nothing was detached");
    watch_source(&node, "10.82.0.98");
    send_from(&pod, "10.82.0.98", &node.address);
    assert_eq!(arrived(&node, "10.82.0.98"), 0);
    let after = node.cli_ok(&["enforcement", "status", "--bpf-dir", &node.bpf_dir()]);
    assert!(spoofed_count(&after) > dropped_before, "the counters continue across the restart:\n{before}\n{after}");
    let (ok, out) = node.cni("DEL", "survivor", &pod.path(), "", &node.conf(json!({})));
    assert!(ok, "{out}");
    let status = node.cli_ok(&["enforcement", "status", "--bpf-dir", &node.bpf_dir()]);
    assert!(status.contains("0 interface(s) enforced"), "DEL removes the entry:\n{status}");
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

fn host_side(node: &Node, pod_ip: &str) -> String {
    let routes = node.ns.exec(&["ip", "route", "show", pod_ip]);
    routes
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .expect("the pod's route names its host veth")
        .to_string()
}

fn counted(node: &Node, tool: &str, source: &str) -> u64 {
    let table = node.ns.exec(&[tool, "-t", "raw", "-L", "PREROUTING", "-v", "-n", "-x"]);
    table.lines().filter(|l| l.contains(source)).filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok()).sum()
}

/// IPv6 from a pod without IPv6, and a gratuitous ARP for another pod's address: each arrives with
/// enforcement off (the node is set up to receive it) and never with it on. (VLAN-tagged frames, sent raw, are
/// in the spoof matrix below.)
#[test]
fn ipv6_and_arp_spoofs_never_arrive() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.3.4");
    node.apply("apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: four}\nspec: {cidr: 10.85.0.0/24, blockSize: 28}\n");
    node.ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.arp_accept=1"]);
    node.ns.exec(&["ip", "-6", "addr", "add", "fd00:85::1/128", "dev", "lo"]);
    node.start_agent_with(&["--enforcement", "off"]);
    let liar = NetNs::new("pwp");
    let victim = NetNs::new("pwp");
    let (ok, a) = node.cni("ADD", "liar", &liar.path(), &k8s_args("default", "liar"), &node.conf(json!({})));
    assert!(ok, "{a}");
    let (ok, b) = node.cni("ADD", "victim", &victim.path(), &k8s_args("default", "victim"), &node.conf(json!({})));
    assert!(ok, "{b}");
    let liar_ip = a["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
    let victim_ip = b["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
    let host = host_side(&node, &liar_ip);
    let host_mac = node.ns.exec(&["cat", &format!("/sys/class/net/{host}/address")]).trim().to_string();

    // The node can receive each kind: a route back for an IPv6 address the liar gives itself, and
    // arp_accept for gratuitous ARP.
    node.ns.exec(&["ip", "-6", "route", "add", "fd00:85::2/128", "dev", &host]);
    liar.exec(&["ip", "-6", "addr", "add", "fd00:85::2/128", "dev", "eth0", "nodad"]);
    // arping sends only from an address the interface has: the liar takes the victim's.
    liar.exec(&["ip", "addr", "add", &format!("{victim_ip}/32"), "dev", "eth0"]);
    liar.exec(&["ip", "-6", "neigh", "replace", "fe80::1", "lladdr", &host_mac, "dev", "eth0"]);
    liar.exec(&["ip", "-6", "route", "add", "fd00:85::1/128", "via", "fe80::1", "dev", "eth0"]);
    node.ns.exec(&["ip6tables", "-t", "raw", "-I", "PREROUTING", "-s", "fd00:85::2", "-j", "ACCEPT"]);

    let attempt = |node: &Node, round: &str| {
        let _ = liar.try_exec(&["ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", "fd00:85::1"]);
        let _ = liar.try_exec(&["arping", "-U", "-c", "2", "-I", "eth0", "-s", &victim_ip, &victim_ip]);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let arp = node.ns.exec(&["ip", "neigh", "show", "dev", &host]).contains(victim_ip.as_str());
        let counts = (counted(node, "ip6tables", "fd00:85::2"), arp);
        eprintln!("{round}: {counts:?}");
        counts
    };
    let (ipv6, arp) = attempt(&node, "enforcement off");
    assert!(ipv6 > 0 && arp, "without enforcement both arrive: ipv6 {ipv6}, arp {arp}");

    node.stop_agent();
    node.ns.exec(&["ip", "neigh", "flush", "dev", &host]);
    node.start_agent();
    let (ipv6_after, arp_after) = attempt(&node, "strict");
    assert_eq!(ipv6_after, ipv6, "IPv6 from a pod without IPv6 never arrives");
    assert!(!arp_after, "a gratuitous ARP for another pod's address never arrives");
    assert!(liar.pings(&node.address), "the pod's own traffic still flows");
    let status = node.cli_ok(&["enforcement", "status", "--bpf-dir", &node.bpf_dir()]);
    for why in ["no_ipv6", "spoofed_arp"] {
        assert!(status.contains(why), "the counters say why ({why}):\n{status}");
    }
}

/// Move this build's pin directory to `v1`, as an older build with another map layout would have pinned it;
/// the pin root.
fn pins_of_an_older_build(node: &Node) -> std::path::PathBuf {
    let root = std::path::Path::new(&node.bpf_dir()).to_path_buf();
    let current = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('v')))
        .expect("this build's pin directory");
    assert_ne!(current, root.join("v1"), "this build is not layout v1");
    std::fs::rename(&current, root.join("v1")).expect("rename the pin directory on bpffs");
    root
}

#[test]
fn a_new_build_takes_over_the_filters_without_a_gap() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.3.5");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: a}\nspec: {cidr: 10.86.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let (pod, _) = node.add_pod("upgraded", "default", "p");
    node.stop_agent();
    // Make what is pinned look like an older build's layout: the old program keeps running on the old maps.
    let root = pins_of_an_older_build(&node);
    watch_source(&node, "10.86.0.99");
    send_from(&pod, "10.86.0.99", &node.address);
    assert_eq!(arrived(&node, "10.86.0.99"), 0, "the old build's program still enforces");

    node.start_agent();
    let listing: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(
        !root.join("v1").exists(),
        "the old build's pins are gone once its filters run the new program: {listing:?}\n{}",
        node.agent_log()
    );
    watch_source(&node, "10.86.0.98");
    send_from(&pod, "10.86.0.98", &node.address);
    assert_eq!(arrived(&node, "10.86.0.98"), 0, "and the new program enforces in the same filter");
    assert!(pod.pings(&node.address));
    let status = node.cli_ok(&["enforcement", "status", "--bpf-dir", &node.bpf_dir()]);
    assert!(status.contains("1 interface(s) enforced"), "{status}");
}

/// The frames' own source MAC: the netdev counter on the host side counts exactly the test's frames.
const INJECTED_MAC: [u8; 6] = [0x02, 0xde, 0xad, 0, 0, 1];
/// The inner frames' source MAC.
const INNER_MAC: [u8; 6] = [0x02, 0xde, 0xad, 0, 0, 2];

/// Send raw Ethernet frames from the pod's eth0 (an AF_PACKET socket: what a hostile pod with CAP_NET_RAW
/// does), three times each.
fn inject(pod: &NetNs, frames: &[Vec<u8>]) {
    let hex: Vec<String> = frames.iter().map(|f| f.iter().map(|b| format!("{b:02x}")).collect()).collect();
    let mut command = vec![
        "python3",
        "-c",
        "import socket,sys\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\ns.bind(('eth0',0))\n\
         for _ in range(3):\n  for f in sys.argv[1:]: s.send(bytes.fromhex(f))",
    ];
    command.extend(hex.iter().map(String::as_str));
    pod.exec(&command);
    std::thread::sleep(std::time::Duration::from_millis(150));
}

/// Packets the nftables netdev chain `chain` of table `netdev pwtest` counted (after TC ingress).
fn netdev_count(node: &Node, chain: &str) -> u64 {
    let listing = node.ns.exec(&["nft", "list", "chain", "netdev", "pwtest", chain]);
    listing
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {chain}:\n{listing}"))
}

/// A spoof matrix sent from inside a pod as raw frames, counted on the receiving side after the TC hook (an
/// nftables netdev ingress counter on the host side, matching the frames' own MAC) and, for tunnels, on the
/// node's decapsulating VXLAN devices: what must pass does, everything else never gets past the hook,
/// with the agent running and after it was killed with -9. With enforcement off the same frames arrive and
/// their inner packets are decapsulated, so each assertion can fail.
#[test]
fn spoof_matrix_of_raw_frames_from_a_pod() {
    use std::net::Ipv4Addr;

    use poolwarden::dataplane::enforcement::frames;
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.3.6");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: a}\nspec: {cidr: 10.87.0.0/24, blockSize: 28}\n---\n\
         apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: b}\nspec: {cidr: 10.88.0.0/24, blockSize: 28}\n",
    );
    // Devices that decapsulate on the node: VXLAN on the standard port, and one on a port of its own that
    // only the agent's scan of the node's devices can know about.
    for (name, port) in [("pwt.vx", "4789"), ("pwt.vx2", "9999")] {
        node.ns.exec(&["ip", "link", "add", name, "type", "vxlan", "id", "42", "dstport", port, "nolearning"]);
        node.ns.exec(&["ip", "link", "set", name, "up"]);
    }
    node.start_agent_with(&["--enforcement", "off"]);
    let (pod, result) = node.add_pod("matrix", "default", "p");
    let own: Ipv4Addr = address_of(&result).parse().unwrap();
    let host = host_side(&node, &own.to_string());
    let host_mac: Vec<u8> = node
        .ns
        .exec(&["cat", &format!("/sys/class/net/{host}/address")])
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let host_mac: [u8; 6] = host_mac.try_into().unwrap();
    let node_ip: Ipv4Addr = node.address.parse().unwrap();
    let fmt_mac = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let mut ruleset = format!(
        "table netdev pwtest {{\n chain veth {{ type filter hook ingress device \"{host}\" priority 0; ether saddr {} counter; }}\n",
        fmt_mac(INJECTED_MAC)
    );
    for (chain, device) in [("vx", "pwt.vx"), ("vx2", "pwt.vx2")] {
        ruleset.push_str(&format!(
            " chain {chain} {{ type filter hook ingress device \"{device}\" priority 0; ether saddr {} counter; }}\n",
            fmt_mac(INNER_MAC)
        ));
    }
    ruleset.push_str("}\n");
    let rules = node.dir.path().join("pwtest.nft");
    std::fs::write(&rules, ruleset).unwrap();
    node.ns.exec(&["nft", "-f", &rules.display().to_string()]);

    let eth = |ethertype: u16, payload: &[u8]| frames::ethernet(host_mac, INJECTED_MAC, ethertype, payload);
    let ip = |source: Ipv4Addr, destination: Ipv4Addr, protocol: u8, options: &[u8], fragment: u16, payload: &[u8]| {
        eth(0x0800, &frames::ipv4_packet(source, destination, protocol, options, fragment, payload))
    };
    let udp = |source: Ipv4Addr, destination: Ipv4Addr, port: u16| {
        ip(source, destination, 17, &[], 0, &frames::udp(40000, port, b"poolwarden spoof matrix"))
    };
    let forged = Ipv4Addr::new(10, 88, 0, 7);
    let inner = frames::ethernet(
        [0xff; 6],
        INNER_MAC,
        0x0800,
        &frames::ipv4_packet(forged, node_ip, 17, &[], 0, &frames::udp(1, 9, b"inner")),
    );
    let vxlan = |destination: Ipv4Addr, port: u16| {
        ip(own, destination, 17, &[], 0, &frames::udp(40000, port, &frames::vxlan(42, &inner)))
    };
    let another_node = Ipv4Addr::new(10, 255, 3, 99);
    let world = Ipv4Addr::new(203, 0, 113, 1);
    let mut arp = frames::arp(Ipv4Addr::new(10, 87, 0, 9), Ipv4Addr::new(10, 87, 0, 9));
    arp[..12].copy_from_slice(&[[0xff; 6], INJECTED_MAC].concat());
    let ipv6 = eth(
        0x86dd,
        &frames::ipv6_packet("fe80::5".parse().unwrap(), "ff02::2".parse().unwrap(), 58, &frames::icmpv6(133, &[0; 4])),
    );
    let passes: Vec<(&str, Vec<u8>)> = vec![
        ("own source", udp(own, node_ip, 9)),
        ("own source with IP options", ip(own, node_ip, 17, &[1, 1, 1, 0], 0, &frames::udp(1, 9, b"x"))),
        ("own source, first fragment", ip(own, node_ip, 17, &[], 0x2000, &frames::udp(1, 9, b"fragment"))),
        ("own source, later fragment", ip(own, node_ip, 17, &[], 0x0002, b"rest of it")),
        ("own source, broadcast", udp(own, Ipv4Addr::BROADCAST, 9)),
    ];
    let drops: Vec<(&str, Vec<u8>)> = vec![
        ("same pool's other address", udp(Ipv4Addr::new(10, 87, 0, 9), node_ip, 9)),
        ("another pool's address", udp(forged, node_ip, 9)),
        ("an outside address", udp(world, node_ip, 9)),
        ("0.0.0.0", udp(Ipv4Addr::UNSPECIFIED, node_ip, 9)),
        ("ARP claiming another address", arp),
        ("IPv6 router solicitation from a pod without IPv6", ipv6),
        ("VLAN 0 (priority tag) with its own source", frames::tagged(&udp(own, node_ip, 9), 0x8100, 0)),
        ("VLAN 42 with its own source", frames::tagged(&udp(own, node_ip, 9), 0x8100, 42)),
        ("QinQ with its own source", frames::tagged(&frames::tagged(&udp(own, node_ip, 9), 0x8100, 42), 0x88a8, 7)),
        ("VXLAN to the node", vxlan(node_ip, 4789)),
        ("VXLAN to another node", vxlan(another_node, 4789)),
        ("VXLAN to the world", vxlan(world, 4789)),
        ("VXLAN to the node's own other device port", vxlan(node_ip, 9999)),
        ("GENEVE", ip(own, node_ip, 17, &[], 0, &frames::udp(1, 6081, &frames::geneve(42, &inner)))),
        ("IP-in-IP", ip(own, node_ip, 4, &[], 0, &inner[14..])),
        ("GRE", ip(own, node_ip, 47, &[], 0, &frames::gre(0x0800, &inner[14..]))),
        ("GRETAP", ip(own, another_node, 47, &[], 0, &frames::gre(0x6558, &inner))),
    ];
    let arrivals = |node: &Node, frame: &[u8]| {
        let before = netdev_count(node, "veth");
        inject(&pod, &[frame.to_vec()]);
        netdev_count(node, "veth") - before
    };
    let decapsulated = |node: &Node| netdev_count(node, "vx") + netdev_count(node, "vx2");

    // Control: without enforcement everything arrives, and the node decapsulates the VXLAN frames.
    for (what, frame) in passes.iter().chain(&drops) {
        assert!(arrivals(&node, frame) > 0, "enforcement off: {what} arrives");
    }
    assert!(netdev_count(&node, "vx") > 0 && netdev_count(&node, "vx2") > 0, "the node decapsulates VXLAN");

    for round in ["agent running", "agent killed with -9"] {
        node.stop_agent();
        if round == "agent running" {
            node.start_agent();
        }
        let inner_before = decapsulated(&node);
        for (what, frame) in &passes {
            assert!(arrivals(&node, frame) > 0, "{round}: {what} passes");
        }
        for (what, frame) in &drops {
            assert_eq!(arrivals(&node, frame), 0, "{round}: {what} must never get past the hook");
        }
        assert_eq!(decapsulated(&node), inner_before, "{round}: no inner packet reached a VXLAN device");
        if round == "agent running" {
            let status = node.cli_ok(&["enforcement", "status", "--bpf-dir", &node.bpf_dir()]);
            for why in ["encapsulated", "vlan", "spoofed_ipv4", "spoofed_arp", "no_ipv6"] {
                assert!(status.contains(why), "counted as {why}:\n{status}");
            }
            assert!(status.contains("9999"), "the agent found the device on 9999:\n{status}");
            node.kill_agent();
        }
    }
}

/// An enforced interface whose endpoint record was lost (a restore, a collection by mistake) keeps its entry,
/// and a restarted agent swaps its own program in there too: a decapsulating port it finds (a device made
/// while no agent ran) is closed on that pod as well. The program the earlier agent attached reads its own
/// copy of the closed ports, which nobody writes any more: left in place, it lets the tunnel through.
#[test]
fn an_unrecorded_interface_gets_the_ports_a_later_agent_finds() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.3.7");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: a}\nspec: {cidr: 10.89.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let (pod, result) = node.add_pod("unrecorded", "default", "p");
    let own = address_of(&result);
    node.stop_agent();
    node.cli_ok(&["ipam", "release", "--ip", &own]);
    node.ns.exec(&["ip", "link", "add", "pwt.vx3", "type", "vxlan", "id", "43", "dstport", "4799", "nolearning"]);
    node.ns.exec(&["ip", "link", "set", "pwt.vx3", "up"]);
    node.ns.exec(&["iptables", "-t", "raw", "-I", "PREROUTING", "-p", "udp", "--dport", "4799", "-j", "ACCEPT"]);
    node.start_agent();
    assert!(node.agent_log().contains("an enforced interface has no endpoint record"), "{}", node.agent_log());
    let send = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor _ in range(3): s.sendto(b'x',('{}',4799))",
        node.address
    );
    pod.exec(&["python3", "-c", &send]);
    std::thread::sleep(std::time::Duration::from_millis(150));
    let table = node.ns.exec(&["iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-n", "-x"]);
    let arrived: u64 = table
        .lines()
        .find(|l| l.contains("dpt:4799"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no counter for UDP 4799:\n{table}"));
    assert_eq!(arrived, 0, "UDP to the port a later agent found reached the node from {own}:\n{table}");
    let status = node.cli_ok(&["enforcement", "status", "--bpf-dir", &node.bpf_dir()]);
    assert!(status.lines().any(|l| l.starts_with("a ") && l.contains("encapsulated")), "{status}");
}

/// After an upgrade that changes the map layout, a pod attached by TCX whose endpoint record was lost has its
/// entry only in the older build's maps: the new agent leaves it the older program, and keeps the link pinned
/// (unpinning it would detach the program and leave the pod unenforced), while it removes the rest of the
/// older build's pins.
#[test]
fn an_unrecorded_tcx_link_of_an_older_build_stays_pinned() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.3.8");
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: a}\nspec: {cidr: 10.98.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let pod = NetNs::new("pwp");
    let conf = node.conf(json!({"enforcementHook": "tcx"}));
    let (ok, result) = node.cni("ADD", "unrecorded-tcx", &pod.path(), &k8s_args("default", "p"), &conf);
    assert!(ok, "ADD: {result}\n{}", node.agent_log());
    let own = address_of(&result);
    node.stop_agent();
    let root = pins_of_an_older_build(&node);
    node.cli_ok(&["ipam", "release", "--ip", &own]);
    node.start_agent();
    watch_source(&node, "10.98.0.99");
    send_from(&pod, "10.98.0.99", &node.address);
    assert_eq!(arrived(&node, "10.98.0.99"), 0, "the older build's program still enforces\n{}", node.agent_log());
    let pins: Vec<_> =
        std::fs::read_dir(root.join("v1")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert_eq!(pins, vec![root.join("v1").join("tcx")], "only the link stays of the older build's pins");
}
