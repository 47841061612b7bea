//! The enforcement program's verdicts on crafted frames, run in the kernel with BPF_PROG_TEST_RUN (root).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use poolwarden::dataplane::enforcement::{
    ARRAY_ENDPOINTS, COUNT_PASSED, ENFORCE, ENFORCE_COUNTING, EndpointSpec, Enforcement, PASS, POOL_SLOTS,
    VERDICT_DROP, VERDICT_PASS, decode_drop, drop_source, frames, reason,
};

fn root() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false);
    if !root {
        assert!(std::env::var_os("POOLWARDEN_REQUIRE_PRIVILEGED").is_none(), "BPF tests need root");
        eprintln!("SKIPPED: loading BPF programs needs root");
    }
    root
}

/// A bpffs of the test's own for the pinned maps, unmounted when dropped.
struct Bpffs(tempfile::TempDir);

impl Bpffs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ok =
            std::process::Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.path()).status().unwrap().success();
        assert!(ok, "mount bpffs");
        Self(dir)
    }

    fn load(&self) -> Enforcement {
        Enforcement::load(&self.0.path().join("poolwarden")).expect("the verifier accepts the program")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

const LOOPBACK: u32 = 1;
const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);

#[test]
fn strict_mode_passes_only_the_pods_own_source() {
    if !root() {
        return;
    }
    let bpffs = Bpffs::new();
    let mut enforcement = bpffs.load();
    let mut reports = enforcement.take_drop_reports().expect("drop report ring buffer");
    let verdict = |e: &Enforcement, frame: &[u8]| e.run(ENFORCE_COUNTING, frame, 1).expect("test run").0;
    assert_eq!(verdict(&enforcement, &frames::ipv4(POD, NODE)), VERDICT_DROP, "no endpoint entry: fail closed");

    enforcement.count_passed_packets(true);
    let spec = EndpointSpec {
        addresses: vec![IpAddr::V4(POD)],
        pools: vec!["10.0.0.0/24".parse().unwrap()],
        pool_mode: false,
        pool_id: enforcement.pool_slot("seven").unwrap(),
    };
    enforcement.set_endpoint(LOOPBACK, &spec).unwrap();
    let link_local: Ipv6Addr = "fe80::1:2".parse().unwrap();
    for (what, frame, want) in [
        ("own address", frames::ipv4(POD, NODE), VERDICT_PASS),
        ("another pod of the same pool", frames::ipv4(Ipv4Addr::new(10, 0, 0, 6), NODE), VERDICT_DROP),
        ("an address in another pool", frames::ipv4(Ipv4Addr::new(192, 168, 0, 1), NODE), VERDICT_DROP),
        (
            "IPv6 from a pod without IPv6",
            frames::ipv6("fd00::5".parse().unwrap(), "fd00::1".parse().unwrap(), 17, 0),
            VERDICT_DROP,
        ),
        (
            "neighbour solicitation from a pod without IPv6",
            frames::ipv6(link_local, "ff02::1:ff00:1".parse().unwrap(), 58, 135),
            VERDICT_DROP,
        ),
        ("other ICMPv6 from link-local", frames::ipv6(link_local, "fe80::9".parse().unwrap(), 58, 128), VERDICT_DROP),
        ("ARP for its own address", frames::arp(POD, NODE), VERDICT_PASS),
        (
            "gratuitous ARP for another pod",
            frames::arp(Ipv4Addr::new(10, 0, 0, 6), Ipv4Addr::new(10, 0, 0, 6)),
            VERDICT_DROP,
        ),
        ("VLAN-tagged frame", frames::vlan(POD, NODE), VERDICT_DROP),
    ] {
        assert_eq!(verdict(&enforcement, &frame), want, "{what}");
    }
    let counters = enforcement.counts().unwrap();
    let count = |r: u32| counters.iter().find(|(p, why, _)| p == "seven" && *why == r).map_or(0, |(_, _, n)| *n);
    assert_eq!(count(reason::PASSED), 2);
    assert_eq!(count(reason::SPOOFED_IPV4), 2);
    assert_eq!(count(reason::NO_IPV6), 3, "every IPv6 frame, discovery included");
    assert_eq!(count(reason::SPOOFED_ARP), 1);
    assert_eq!(count(reason::VLAN), 1);

    // Every drop was reported (well under the per-second budget), with its reason and source.
    let mut reported = Vec::new();
    while let Some(item) = reports.next() {
        let event = decode_drop(&item).expect("a whole event");
        reported.push((event.reason, drop_source(&event)));
    }
    assert_eq!(reported.len(), 8, "{reported:?}");
    assert_eq!(reported[0], (reason::NO_ENDPOINT, Some(IpAddr::V4(POD))));
    assert_eq!(reported[1], (reason::SPOOFED_IPV4, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 6)))));

    // Pool mode: the pool's sources pass, others still do not.
    let pooled = EndpointSpec { pool_mode: true, ..spec };
    enforcement.set_endpoint(LOOPBACK, &pooled).unwrap();
    assert_eq!(verdict(&enforcement, &frames::ipv4(Ipv4Addr::new(10, 0, 0, 6), NODE)), VERDICT_PASS);
    assert_eq!(verdict(&enforcement, &frames::ipv4(Ipv4Addr::new(10, 0, 1, 6), NODE)), VERDICT_DROP);
    // Pool mode for a pod whose pool is unknown (deleted with --force): its own address only, not 0/0.
    let poolless = EndpointSpec { pools: vec![], ..pooled };
    enforcement.set_endpoint(LOOPBACK, &poolless).unwrap();
    assert_eq!(verdict(&enforcement, &frames::ipv4(POD, NODE)), VERDICT_PASS);
    assert_eq!(verdict(&enforcement, &frames::ipv4(Ipv4Addr::new(8, 8, 8, 8), NODE)), VERDICT_DROP, "no pool: no 0/0");
    enforcement.remove_endpoint(LOOPBACK).unwrap();
    assert_eq!(verdict(&enforcement, &frames::ipv4(POD, NODE)), VERDICT_DROP, "removed: fail closed");
    assert_eq!(enforcement.run(PASS, &frames::ipv4(POD, NODE), 1).unwrap().0, VERDICT_PASS);
}

#[test]
fn ipv6_pod_passes_its_own_address_only() {
    if !root() {
        return;
    }
    let bpffs = Bpffs::new();
    let mut enforcement = bpffs.load();
    let own: Ipv6Addr = "fd00:65::5".parse().unwrap();
    let spec =
        EndpointSpec { addresses: vec![IpAddr::V4(POD), IpAddr::V6(own)], pools: vec![], pool_mode: false, pool_id: 1 };
    enforcement.set_endpoint(LOOPBACK, &spec).unwrap();
    let to: Ipv6Addr = "fd00::1".parse().unwrap();
    assert_eq!(enforcement.run(ENFORCE, &frames::ipv6(own, to, 17, 0), 1).unwrap().0, VERDICT_PASS);
    assert_eq!(
        enforcement.run(ENFORCE, &frames::ipv6("fd00:65::6".parse().unwrap(), to, 17, 0), 1).unwrap().0,
        VERDICT_DROP
    );
}

/// An interface whose index is past the array's (a busy node's veths reach it: indexes only grow) has its
/// entry in the hash map part, looked up by a function of its own: the same verdicts, its own entry only.
#[test]
fn interfaces_past_the_array_are_enforced_by_their_own_entry() {
    if !root() {
        return;
    }
    let bpffs = Bpffs::new();
    let mut enforcement = bpffs.load();
    let high = ARRAY_ENDPOINTS + 4_464;
    let run = |e: &Enforcement, ifindex: u32, frame: &[u8]| e.run_on(ifindex, ENFORCE, frame, 1).unwrap().0;
    let other = Ipv4Addr::new(10, 0, 0, 6);
    assert_eq!(run(&enforcement, high, &frames::ipv4(POD, NODE)), VERDICT_DROP, "no entry: fail closed");
    let spec =
        |address| EndpointSpec { addresses: vec![IpAddr::V4(address)], pools: vec![], pool_mode: false, pool_id: 1 };
    enforcement.set_endpoint(high, &spec(POD)).unwrap();
    enforcement.set_endpoint(LOOPBACK, &spec(other)).unwrap();
    for (what, ifindex, source, want) in [
        ("own address, past the array", high, POD, VERDICT_PASS),
        ("another pod's address, past the array", high, other, VERDICT_DROP),
        ("the array's entry is its own interface's", LOOPBACK, POD, VERDICT_DROP),
        ("and passes that interface's own address", LOOPBACK, other, VERDICT_PASS),
    ] {
        assert_eq!(run(&enforcement, ifindex, &frames::ipv4(source, NODE)), want, "{what}");
    }
    // The other paths through the program find the entry too: ARP for its own address, and the drop of a
    // spoofed one.
    assert_eq!(run(&enforcement, high, &frames::arp(POD, NODE)), VERDICT_PASS);
    assert_eq!(run(&enforcement, high, &frames::arp(other, NODE)), VERDICT_DROP);
    enforcement.remove_endpoint(high).unwrap();
    assert_eq!(run(&enforcement, high, &frames::ipv4(POD, NODE)), VERDICT_DROP, "removed: fail closed");
}

/// Every pool counts in a slot of its own, named in the pinned maps (so the CLI reads names with the agent
/// down); a slot given to a new pool starts at zero; when all are taken, those no endpoint uses are freed.
#[test]
fn counter_slots_are_never_shared() {
    if !root() {
        return;
    }
    let bpffs = Bpffs::new();
    let mut enforcement = bpffs.load();
    let a = enforcement.pool_slot("pool-a").unwrap();
    let b = enforcement.pool_slot("pool-b").unwrap();
    assert!(a != 0 && b != 0 && a != b, "{a} {b}");
    assert_eq!(enforcement.pool_slot("pool-a").unwrap(), a, "a pool keeps its slot");
    let spec = |pool_id| EndpointSpec { addresses: vec![IpAddr::V4(POD)], pools: vec![], pool_mode: false, pool_id };
    enforcement.count_passed_packets(true);
    enforcement.set_endpoint(LOOPBACK, &spec(a)).unwrap();
    for _ in 0..3 {
        enforcement.run(ENFORCE_COUNTING, &frames::ipv4(POD, NODE), 1).unwrap();
    }
    enforcement.set_endpoint(LOOPBACK, &spec(b)).unwrap();
    enforcement.run(ENFORCE_COUNTING, &frames::ipv4(Ipv4Addr::new(10, 0, 0, 9), NODE), 1).unwrap();
    let counts = enforcement.counts().unwrap();
    assert_eq!(
        counts,
        vec![("pool-a".to_string(), reason::PASSED, 3), ("pool-b".to_string(), reason::SPOOFED_IPV4, 1)],
        "each pool its own counters"
    );
    // What the CLI reads from the pins, with no agent: the same, by name.
    let pinned = poolwarden::dataplane::enforcement::read_pinned(&bpffs.0.path().join("poolwarden")).unwrap();
    assert_eq!(pinned.counters, counts);
    assert_eq!(pinned.pool_names.get(&a).map(String::as_str), Some("pool-a"));

    // Fill every slot; pool-b's endpoint still uses its slot, pool-a's none does any more.
    for i in 0..POOL_SLOTS {
        enforcement.pool_slot(&format!("filler-{i}")).unwrap();
    }
    let late = enforcement.pool_slot("late").unwrap();
    assert_ne!(late, 0, "slots no endpoint uses were freed");
    assert_ne!(late, b, "the slot of a pool an endpoint uses is kept");
    assert_eq!(enforcement.pool_name(b), "pool-b");
    // pool-a's slot went to a filler, which does not inherit its 3 passes: only pool-b's drop is counted.
    assert_eq!(enforcement.counts().unwrap(), vec![("pool-b".to_string(), reason::SPOOFED_IPV4, 1)]);
    let pinned = poolwarden::dataplane::enforcement::read_pinned(&bpffs.0.path().join("poolwarden")).unwrap();
    assert!(pinned.pool_names.values().all(|name| name != "pool-a"), "pool-a's slot was freed");
    assert_eq!(pinned.pool_names.get(&late).map(String::as_str), Some("late"));
}

const OWN6: &str = "fd00:65::5";

/// An enforcement with one endpoint on loopback: `POD`, and `OWN6` when `ipv6`, counting passed packets too
/// (so that every verdict's reason can be read back).
fn enforcing(bpffs: &Bpffs, ipv6: bool) -> Enforcement {
    let mut enforcement = bpffs.load();
    enforcement.count_passed_packets(true);
    let mut addresses = vec![IpAddr::V4(POD)];
    if ipv6 {
        addresses.push(OWN6.parse().unwrap());
    }
    let pool_id = enforcement.pool_slot("three").unwrap();
    let spec = EndpointSpec { addresses, pools: vec![], pool_mode: false, pool_id };
    enforcement.set_endpoint(LOOPBACK, &spec).unwrap();
    enforcement
}

fn v4(payload: &[u8], protocol: u8) -> Vec<u8> {
    frames::ethernet(frames::MACS.0, frames::MACS.1, 0x0800, &frames::ipv4_packet(POD, NODE, protocol, &[], 0, payload))
}

/// An IPv4 UDP frame from the pod with IPv4 `options` and the `fragment` field.
fn v4_udp(options: &[u8], fragment: u16, udp: &[u8]) -> Vec<u8> {
    frames::ethernet(
        frames::MACS.0,
        frames::MACS.1,
        0x0800,
        &frames::ipv4_packet(POD, NODE, 17, options, fragment, udp),
    )
}

fn v6(source: &str, next_header: u8, payload: &[u8]) -> Vec<u8> {
    let packet = frames::ipv6_packet(source.parse().unwrap(), "fd00::1".parse().unwrap(), next_header, payload);
    frames::ethernet(frames::MACS.0, frames::MACS.1, 0x86dd, &packet)
}

/// (frame, verdict, reason counted) for each case, with what it is: the reason as the program that counts
/// passes too counts it, the verdict the same from both programs.
fn judge(enforcement: &Enforcement, cases: Vec<(&str, Vec<u8>, u32)>) {
    for (what, frame, want) in cases {
        let (default, _) = enforcement.run(ENFORCE, &frame, 1).expect("test run");
        let before = enforcement.counts().unwrap();
        let (verdict, _) = enforcement.run(ENFORCE_COUNTING, &frame, 1).expect("test run");
        assert_eq!(default, verdict, "{what}: the two programs disagree");
        let after = enforcement.counts().unwrap();
        let grew: Vec<u32> = after
            .iter()
            .filter(|(pool, why, n)| {
                pool == "three" && before.iter().find(|(p, w, _)| p == pool && w == why).map_or(0, |(_, _, m)| *m) < *n
            })
            .map(|(_, why, _)| *why)
            .collect();
        let expected = if want == reason::PASSED { VERDICT_PASS } else { VERDICT_DROP };
        assert_eq!(
            (verdict, grew.as_slice()),
            (expected, [want].as_slice()),
            "{what}: counted as {:?}",
            grew.iter().map(|r| reason::name(*r)).collect::<Vec<_>>()
        );
    }
}

/// A pod may not send a tunnel packet from its own address: whoever decapsulates it (its own node, another
/// node, a router) would deliver an inner packet whose source nobody checked.
#[test]
fn tunnels_from_the_pods_own_address_are_dropped() {
    if !root() {
        return;
    }
    let bpffs = Bpffs::new();
    let mut enforcement = enforcing(&bpffs, true);
    let forged = frames::ipv4_packet(Ipv4Addr::new(10, 99, 0, 1), NODE, 17, &[], 0, &frames::udp(1, 80, b"x"));
    let inner_frame = frames::ethernet(frames::MACS.0, frames::MACS.1, 0x0800, &forged);
    let forged6 = frames::ipv6_packet("fd00:99::1".parse().unwrap(), "fd00::1".parse().unwrap(), 59, &[]);
    let udp = |port: u16, payload: &[u8]| v4(&frames::udp(40000, port, payload), 17);
    let udp6 = |port: u16| v6(OWN6, 17, &frames::udp(40000, port, &frames::vxlan(1, &inner_frame)));
    let mut cases = vec![
        ("plain UDP from its own address", udp(53, b"query"), reason::PASSED),
        (
            "TCP from its own address",
            v4(&[0x9c, 0x40, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 2, 0, 0], 6),
            reason::PASSED,
        ),
        ("ICMP carrying an error's inner header", v4(&[3, 1, 0, 0, 0, 0, 0, 0], 1), reason::PASSED),
        ("VXLAN (4789)", udp(4789, &frames::vxlan(4097, &inner_frame)), reason::ENCAPSULATED),
        ("VXLAN on Linux's old port (8472)", udp(8472, &frames::vxlan(1, &inner_frame)), reason::ENCAPSULATED),
        ("VXLAN-GPE (4790)", udp(4790, &frames::vxlan(1, &inner_frame)), reason::ENCAPSULATED),
        ("GENEVE (6081)", udp(6081, &frames::geneve(1, &inner_frame)), reason::ENCAPSULATED),
        ("IP-in-IP", v4(&forged, 4), reason::ENCAPSULATED),
        ("IPv6-in-IPv4 (SIT)", v4(&forged6, 41), reason::ENCAPSULATED),
        ("GRE", v4(&frames::gre(0x0800, &forged), 47), reason::ENCAPSULATED),
        ("GRETAP", v4(&frames::gre(0x6558, &inner_frame), 47), reason::ENCAPSULATED),
        ("EtherIP", v4(&[[0x30, 0].as_slice(), &inner_frame].concat(), 97), reason::ENCAPSULATED),
        ("L2TPv3", v4(&[[0, 0, 0, 1].as_slice(), &inner_frame].concat(), 115), reason::ENCAPSULATED),
        ("MPLS-in-IP", v4(&[[0, 0, 0x11, 64].as_slice(), &forged].concat(), 137), reason::ENCAPSULATED),
        ("VXLAN over IPv6", udp6(4789), reason::ENCAPSULATED),
        ("IPv4-in-IPv6", v6(OWN6, 4, &forged), reason::ENCAPSULATED),
        ("IPv6-in-IPv6", v6(OWN6, 41, &forged6), reason::ENCAPSULATED),
        ("GRE over IPv6", v6(OWN6, 47, &frames::gre(0x0800, &forged)), reason::ENCAPSULATED),
        ("Ethernet over IPv6 (SRv6)", v6(OWN6, 143, &inner_frame), reason::ENCAPSULATED),
        ("plain UDP over IPv6", udp6(53), reason::PASSED),
        // IPv4 options move the transport header: the port is read where it is.
        (
            "VXLAN behind IPv4 options",
            v4_udp(&[1, 1, 1, 0, 1, 1, 1, 1], 0, &frames::udp(1, 4789, &frames::vxlan(1, &inner_frame))),
            reason::ENCAPSULATED,
        ),
        ("UDP behind IPv4 options", v4_udp(&[1, 1, 1, 0], 0, &frames::udp(1, 53, b"x")), reason::PASSED),
        // Fragments: the first carries the port and is judged by it; later ones carry none and pass.
        (
            "first fragment of VXLAN",
            v4_udp(&[], 0x2000, &frames::udp(1, 4789, &frames::vxlan(1, &inner_frame))),
            reason::ENCAPSULATED,
        ),
        ("later fragment", v4_udp(&[], 0x0003, &frames::udp(1, 4789, b"")), reason::PASSED),
        // IPv6 extension headers move it too: hop-by-hop (8 bytes), destination options (16 bytes).
        (
            "VXLAN behind IPv6 extension headers",
            v6(
                OWN6,
                0,
                &[
                    [60, 0, 1, 4, 0, 0, 0, 0].as_slice(),
                    &[17, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    &frames::udp(1, 4789, &frames::vxlan(1, &inner_frame)),
                ]
                .concat(),
            ),
            reason::ENCAPSULATED,
        ),
        (
            "first IPv6 fragment of VXLAN",
            v6(
                OWN6,
                44,
                &[[17, 0, 0, 1, 0, 0, 0, 7].as_slice(), &frames::udp(1, 4789, &frames::vxlan(1, &inner_frame))]
                    .concat(),
            ),
            reason::ENCAPSULATED,
        ),
        (
            "later IPv6 fragment",
            v6(OWN6, 44, &[[17, 0, 0, 0x10, 0, 0, 0, 7].as_slice(), &frames::udp(1, 4789, b"")].concat()),
            reason::PASSED,
        ),
        (
            "an extension header chain longer than any pod needs",
            v6(
                OWN6,
                60,
                &[
                    [60u8, 0, 1, 4, 0, 0, 0, 0].repeat(6).as_slice(),
                    &[17, 0, 1, 4, 0, 0, 0, 0],
                    &frames::udp(1, 53, b""),
                ]
                .concat(),
            ),
            reason::OTHER,
        ),
        (
            "six extension headers, the most it follows",
            v6(
                OWN6,
                60,
                &[
                    [60u8, 0, 1, 4, 0, 0, 0, 0].repeat(5).as_slice(),
                    &[17, 0, 1, 4, 0, 0, 0, 0],
                    &frames::udp(1, 4789, b""),
                ]
                .concat(),
            ),
            reason::ENCAPSULATED,
        ),
        ("a truncated UDP header", v4(&[0x9c, 0x40], 17), reason::OTHER),
        ("UDP to a port nothing decapsulates yet", udp(9999, &frames::vxlan(1, &inner_frame)), reason::PASSED),
    ];
    judge(&enforcement, std::mem::take(&mut cases));
    // A device decapsulating on another port (the agent finds it on the node) closes that port too.
    enforcement.block_decap_ports([9999]).unwrap();
    judge(
        &enforcement,
        vec![("UDP to a port a device listens on", udp(9999, &frames::vxlan(1, &inner_frame)), reason::ENCAPSULATED)],
    );
    // The next agent's program (its own copy of the ports) blocks what this one found, from the pinned record.
    drop(enforcement);
    let enforcement = bpffs.load();
    judge(
        &enforcement,
        vec![
            ("UDP to a port an earlier agent blocked", udp(9999, b""), reason::ENCAPSULATED),
            ("VXLAN", udp(4789, b""), reason::ENCAPSULATED),
            ("plain UDP", udp(53, b""), reason::PASSED),
        ],
    );
}

/// Drops are always counted; passed packets only by the program an agent counting them attaches, and the
/// entries it writes say so (for the status, read from the pins).
#[test]
fn passed_packets_are_counted_only_when_asked() {
    if !root() {
        return;
    }
    let bpffs = Bpffs::new();
    let mut enforcement = bpffs.load();
    let spec = EndpointSpec {
        addresses: vec![IpAddr::V4(POD)],
        pools: vec![],
        pool_mode: false,
        pool_id: enforcement.pool_slot("three").unwrap(),
    };
    enforcement.set_endpoint(LOOPBACK, &spec).unwrap();
    let own = frames::ipv4(POD, NODE);
    let spoofed = frames::ipv4(Ipv4Addr::new(10, 0, 0, 9), NODE);
    let tcp = v4(&[0; 20], 6);
    // The default program counts drops only.
    for frame in [&own, &own, &tcp, &spoofed] {
        enforcement.run(ENFORCE, frame, 1).unwrap();
    }
    assert_eq!(enforcement.counts().unwrap(), vec![("three".to_string(), reason::SPOOFED_IPV4, 1)]);
    let pinned = || poolwarden::dataplane::enforcement::read_pinned(&bpffs.0.path().join("poolwarden")).unwrap();
    assert!(pinned().endpoints.iter().all(|(_, e)| e.flags & COUNT_PASSED == 0));

    // The counting one passes too, the fast path (TCP, UDP) and the full check (ARP) alike; entries written
    // while counting say so.
    enforcement.count_passed_packets(true);
    enforcement.set_endpoint(LOOPBACK, &spec).unwrap();
    for frame in [&own, &tcp, &frames::arp(POD, NODE), &spoofed] {
        enforcement.run(ENFORCE_COUNTING, frame, 1).unwrap();
    }
    assert_eq!(
        enforcement.counts().unwrap(),
        vec![("three".to_string(), reason::PASSED, 3), ("three".to_string(), reason::SPOOFED_IPV4, 2)]
    );
    assert!(pinned().endpoints.iter().all(|(_, e)| e.flags & COUNT_PASSED != 0));
}

/// Neighbour and router discovery: a pod may send what a host sends (solicitations, advertisements for its
/// own addresses, listener reports), never what only a router sends, and nothing at all without IPv6.
#[test]
fn neighbour_discovery_passes_only_what_a_host_sends() {
    if !root() {
        return;
    }
    let bpffs = Bpffs::new();
    let enforcement = enforcing(&bpffs, true);
    let icmp = |source: &str, icmp_type: u8| v6(source, 58, &frames::icmpv6(icmp_type, &[0; 20]));
    let advertise =
        |source: &str, target: &str| v6(source, 58, &frames::neighbour_advertisement(target.parse().unwrap()));
    let ll = "fe80::5";
    let report_with_router_alert =
        v6(ll, 0, &[[58u8, 0, 5, 2, 0, 0, 1, 0].as_slice(), &frames::icmpv6(143, &[0; 4])].concat());
    judge(
        &enforcement,
        vec![
            ("router solicitation from link-local", icmp(ll, 133), reason::PASSED),
            ("neighbour solicitation from link-local", icmp(ll, 135), reason::PASSED),
            ("neighbour solicitation for duplicate address detection", icmp("::", 135), reason::PASSED),
            ("neighbour solicitation from its own address", icmp(OWN6, 135), reason::PASSED),
            ("neighbour solicitation from another address", icmp("fd00:65::6", 135), reason::SPOOFED_IPV6),
            ("listener report v2 behind a router alert", report_with_router_alert, reason::PASSED),
            ("advertisement for its own address", advertise(ll, OWN6), reason::PASSED),
            ("advertisement for its link-local address", advertise(ll, "fe80::5"), reason::PASSED),
            ("advertisement for another pod's address", advertise(ll, "fd00:65::6"), reason::SPOOFED_NEIGHBOUR),
            (
                "advertisement for another address from its own",
                advertise(OWN6, "fd00:65::6"),
                reason::SPOOFED_NEIGHBOUR,
            ),
            ("router advertisement", icmp(ll, 134), reason::FORBIDDEN_ICMPV6),
            ("router advertisement from its own address", icmp(OWN6, 134), reason::FORBIDDEN_ICMPV6),
            ("redirect", icmp(ll, 137), reason::FORBIDDEN_ICMPV6),
            ("listener query", icmp(ll, 130), reason::FORBIDDEN_ICMPV6),
            ("router renumbering", icmp(ll, 138), reason::FORBIDDEN_ICMPV6),
            ("certification path advertisement", icmp(ll, 149), reason::FORBIDDEN_ICMPV6),
            ("echo request from link-local", icmp(ll, 128), reason::SPOOFED_IPV6),
            ("echo request from its own address", icmp(OWN6, 128), reason::PASSED),
        ],
    );
    let bpffs = Bpffs::new();
    let without = enforcing(&bpffs, false);
    judge(
        &without,
        vec![
            ("router solicitation from a pod without IPv6", icmp(ll, 133), reason::NO_IPV6),
            ("listener report from a pod without IPv6", icmp("::", 143), reason::NO_IPV6),
        ],
    );
}

mod random_frames {
    use proptest::prelude::*;

    use super::*;

    /// Frames a pod could send: valid ones of every kind from its own address, to be mutated.
    fn templates() -> Vec<Vec<u8>> {
        let inner = frames::ipv4(Ipv4Addr::new(10, 99, 0, 1), NODE);
        vec![
            v4(&frames::udp(1, 53, b"payload"), 17),
            v4(&frames::udp(1, 4789, &frames::vxlan(1, &inner)), 17),
            v4(&inner[14..], 4),
            v4_udp(&[1, 1, 1, 0, 7, 3, 4, 0], 0x2000, &frames::udp(1, 80, b"x")),
            v6(OWN6, 17, &frames::udp(1, 53, b"payload")),
            v6(OWN6, 17, &frames::udp(1, 4789, &frames::vxlan(1, &inner))),
            v6("fe80::5", 17, &frames::udp(1, 53, b"from link-local")),
            v6(
                OWN6,
                0,
                &[[60u8, 0, 1, 4, 0, 0, 0, 0].as_slice(), &[17, 0, 1, 4, 0, 0, 0, 0], &frames::udp(1, 80, b"")]
                    .concat(),
            ),
            v6("fe80::5", 58, &frames::neighbour_advertisement(OWN6.parse().unwrap())),
            v6("::", 58, &frames::icmpv6(135, &[0; 20])),
            frames::arp(POD, NODE),
            frames::vlan(POD, NODE),
        ]
    }

    /// The sources that may pass: the pod's own addresses; and link-local or unspecified IPv6 only for the
    /// discovery a host sends (ICMPv6 right after the header or after one hop-by-hop header).
    fn source_allowed(frame: &[u8]) -> bool {
        let ethertype = frame.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]]));
        match ethertype {
            Some(0x0800) => frame.get(26..30) == Some(&POD.octets()[..]),
            Some(0x86dd) => frame.get(22..38).is_some_and(|s| {
                let own: Ipv6Addr = OWN6.parse().unwrap();
                if s == own.octets() {
                    return true;
                }
                let local = s == [0; 16] || (s[0] == 0xfe && s[1] & 0xc0 == 0x80);
                let icmp_at = match frame.get(20) {
                    Some(58) => Some(54),
                    Some(0) if frame.get(54) == Some(&58) => frame.get(55).map(|l| 54 + (usize::from(*l) + 1) * 8),
                    _ => None,
                };
                let discovery = icmp_at
                    .and_then(|at| frame.get(at))
                    .is_some_and(|t| matches!(t, 131 | 132 | 133 | 135 | 136 | 143));
                local && discovery
            }),
            Some(0x0806) => frame.get(28..32) == Some(&POD.octets()[..]),
            _ => false,
        }
    }

    /// An IPv6 packet from the pod's own address whose next header is a tunnel protocol, or UDP to VXLAN.
    fn ipv6_tunnel(frame: &[u8]) -> bool {
        let own: Ipv6Addr = OWN6.parse().unwrap();
        if frame.get(12..14) != Some(&[0x86, 0xdd]) || frame.get(22..38) != Some(&own.octets()[..]) {
            return false;
        }
        let next = frame.get(20).copied().unwrap_or(0);
        let udp_port = frame.get(56..58).map(|p| u16::from_be_bytes([p[0], p[1]]));
        frame.get(14).is_some_and(|v| v >> 4 == 6)
            && (poolwarden::dataplane::enforcement::TUNNEL_PROTOCOLS.contains(&next)
                || (next == 17
                    && udp_port.is_some_and(|p| poolwarden::dataplane::enforcement::DEFAULT_DECAP_PORTS.contains(&p))))
    }

    /// An unfragmented IPv4 packet with a well-formed header that carries a tunnel protocol, or UDP to VXLAN.
    fn ipv4_tunnel(frame: &[u8]) -> bool {
        if frame.get(12..14) != Some(&[8, 0]) || frame.len() < 34 || frame[14] >> 4 != 4 {
            return false;
        }
        let ihl = usize::from(frame[14] & 0xf) * 4;
        let unfragmented = u16::from_be_bytes([frame[20], frame[21]]) & 0x1fff == 0;
        let protocol = frame[23];
        let udp_port = frame.get(14 + ihl + 2..14 + ihl + 4).map(|p| u16::from_be_bytes([p[0], p[1]]));
        ihl >= 20
            && unfragmented
            && (poolwarden::dataplane::enforcement::TUNNEL_PROTOCOLS.contains(&protocol)
                || (protocol == 17
                    && udp_port.is_some_and(|p| poolwarden::dataplane::enforcement::DEFAULT_DECAP_PORTS.contains(&p))))
    }

    fn mutated() -> impl Strategy<Value = Vec<u8>> {
        let templates = templates();
        (
            0..templates.len(),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            prop::option::of(any::<prop::sample::Index>()),
            prop::option::of(any::<u16>()),
        )
            .prop_map(move |(which, flips, cut, ethertype)| {
                let mut frame = templates[which].clone();
                for (at, value) in flips {
                    let i = at.index(frame.len());
                    frame[i] = value;
                }
                if let Some(ethertype) = ethertype.filter(|e| e % 4 == 0) {
                    frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
                }
                if let Some(cut) = cut {
                    frame.truncate(cut.index(frame.len()).max(1));
                }
                frame
            })
    }

    /// Whatever a pod puts in a frame, it never passes unless its source is the pod's own, and a tunnel from
    /// its own source never passes either. (A runner inside the test, not `proptest!`, so the test's bpffs
    /// is unmounted when it ends.)
    #[test]
    fn nothing_passes_unless_its_source_is_the_pods_own() {
        if !root() {
            return;
        }
        let bpffs = Bpffs::new();
        let enforcement = enforcing(&bpffs, true);
        let mut runner =
            proptest::test_runner::TestRunner::new(ProptestConfig { cases: 3000, ..ProptestConfig::default() });
        let frames = (mutated(), prop::collection::vec(any::<u8>(), 0..96));
        let outcome = runner.run(&frames, |(frame, random)| {
            for frame in [frame, random] {
                // The kernel refuses test runs of some truncated frames (shorter than an Ethernet header, or
                // than the network header their ethertype names): those the program is never shown here.
                let Ok((verdict, _)) = enforcement.run(ENFORCE, &frame, 1) else { continue };
                let (counting, _) = enforcement.run(ENFORCE_COUNTING, &frame, 1).expect("test run");
                prop_assert_eq!(verdict, counting, "the two programs disagree: {:02x?}", frame);
                if verdict == VERDICT_PASS {
                    prop_assert!(source_allowed(&frame), "passed with a source not the pod's: {frame:02x?}");
                    prop_assert!(!ipv4_tunnel(&frame) && !ipv6_tunnel(&frame), "passed a tunnel: {frame:02x?}");
                }
            }
            Ok(())
        });
        if let Err(failure) = outcome {
            panic!("{failure}");
        }
    }
}
