//! The enforcement program's verdicts on crafted frames, run in the kernel with BPF_PROG_TEST_RUN (root).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use poolwarden::dataplane::enforcement::{
    ENFORCE, EndpointSpec, Enforcement, PASS, VERDICT_DROP, VERDICT_PASS, decode_drop, drop_source, frames, reason,
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
    let verdict = |e: &Enforcement, frame: &[u8]| e.run(ENFORCE, frame, 1).expect("test run").0;
    assert_eq!(verdict(&enforcement, &frames::ipv4(POD, NODE)), VERDICT_DROP, "no endpoint entry: fail closed");

    let spec = EndpointSpec {
        addresses: vec![IpAddr::V4(POD)],
        pools: vec!["10.0.0.0/24".parse().unwrap()],
        pool_mode: false,
        pool_id: 7,
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
            "neighbour solicitation from link-local",
            frames::ipv6(link_local, "ff02::1:ff00:1".parse().unwrap(), 58, 135),
            VERDICT_PASS,
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
    let counters = enforcement.counts(&[7]).unwrap();
    let count = |r: u32| counters.iter().find(|(k, _)| k.pool_id == 7 && k.reason == r).map_or(0, |(_, v)| *v);
    assert_eq!(count(reason::PASSED), 3);
    assert_eq!(count(reason::SPOOFED_IPV4), 2);
    assert_eq!(count(reason::NO_IPV6), 2, "both non-discovery IPv6 frames");
    assert_eq!(count(reason::SPOOFED_ARP), 1);
    assert_eq!(count(reason::VLAN), 1);

    // Every drop was reported (well under the per-second budget), with its reason and source.
    let mut reported = Vec::new();
    while let Some(item) = reports.next() {
        let event = decode_drop(&item).expect("a whole event");
        reported.push((event.reason, drop_source(&event)));
    }
    assert_eq!(reported.len(), 7, "{reported:?}");
    assert_eq!(reported[0], (reason::NO_ENDPOINT, Some(IpAddr::V4(POD))));
    assert_eq!(reported[1], (reason::SPOOFED_IPV4, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 6)))));

    // Pool mode: the pool's sources pass, others still do not.
    let pooled = EndpointSpec { pool_mode: true, ..spec };
    enforcement.set_endpoint(LOOPBACK, &pooled).unwrap();
    assert_eq!(verdict(&enforcement, &frames::ipv4(Ipv4Addr::new(10, 0, 0, 6), NODE)), VERDICT_PASS);
    assert_eq!(verdict(&enforcement, &frames::ipv4(Ipv4Addr::new(10, 0, 1, 6), NODE)), VERDICT_DROP);
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
