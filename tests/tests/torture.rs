//! Torture: 1,000 CNI operations (ADD, then DEL, of 500 pods) spread over three nodes, 20 at a time, on a
//! three-member etcd cluster, while one agent is killed and restarted at once, another is killed and kept
//! down past its registration TTL and grace period, and one etcd member is stopped and started. No address is ever held by two live pods, nothing leaks once the collector has run, and
//! `ipam check` is clean.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use poolwarden_tests::{Fabric, NetNs, Node, Runtime, etcd, etcd_on, k8s_args, nodes_on, privileged};
use serde_json::Value;

const PODS: usize = 500;
const IN_FLIGHT: usize = 20;

fn allocations(node: &Node) -> usize {
    let blocks: Value = serde_json::from_str(&node.cli_ok(&["get", "blocks", "-o", "json"])).expect("blocks JSON");
    blocks.as_array().map_or(0, |b| b.iter().map(|b| b["allocations"].as_object().map_or(0, |a| a.len())).sum())
}

#[test]
fn a_thousand_operations_through_agent_kills_and_an_etcd_member_restart() {
    if !privileged() || !etcd::available() {
        return;
    }
    let fabric = Fabric::new();
    let (_etcd_namespaces, mut cluster) = etcd_on(&fabric, 3);
    let mut nodes = nodes_on(&fabric, &cluster, 3);
    // Small blocks, so blocks are claimed and given back all through the run.
    nodes[0].apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: churn}\nspec: {cidr: 10.80.0.0/22, blockSize: 29}\n---\n\
         apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {emptyBlockGraceSeconds: 0}\n",
    );
    let agent_args = ["--registration-ttl", "5s", "--leak-grace-period", "2s"];
    for node in &mut nodes {
        node.start_agent_with(&agent_args);
    }
    let runtimes: Vec<Runtime> = nodes.iter().map(Node::runtime).collect();

    // Who holds each address, and whether a DEL attempt that may have reached the agent is under way or
    // ended without an answer. Then the address may be handed out again before the runtime hears of it (the
    // agent released it in an attempt whose answer the plugin gave up on; kubelet retries such a DEL too).
    // Otherwise never: not while the holder's DELs cannot even reach its agent (down, however long).
    let live: Mutex<BTreeMap<String, (String, bool)>> = Mutex::new(BTreeMap::new());
    let handed_during_del = AtomicUsize::new(0);
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let failed_adds: Mutex<Vec<String>> = Mutex::new(Vec::new());
    // Workers still running: a worker that panics ends the chaos's waiting too, so the test fails with the
    // worker's message instead of waiting for operations that never come.
    let working = AtomicUsize::new(IN_FLIGHT);
    struct Leaving<'a>(&'a AtomicUsize);
    impl Drop for Leaving<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    std::thread::scope(|scope| {
        for _ in 0..IN_FLIGHT {
            scope.spawn(|| {
                let _leaving = Leaving(&working);
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= PODS {
                        return;
                    }
                    let runtime = &runtimes[i % runtimes.len()];
                    let pod = NetNs::new("pwt");
                    let (container, name) = (format!("t{i}"), format!("pod-{i}"));
                    let args = k8s_args("default", &name);
                    let (ok, result) = runtime.cni("ADD", &container, &pod.path(), &args);
                    if ok {
                        let cidr = result["ips"][0]["address"].as_str().expect("address").to_string();
                        let address = cidr.split('/').next().expect("address").to_string();
                        match live.lock().expect("live").insert(address.clone(), (name.clone(), false)) {
                            Some((other, false)) => panic!("{address} handed to {name} while {other} still holds it"),
                            Some((_, true)) => {
                                handed_during_del.fetch_add(1, Ordering::SeqCst);
                            }
                            None => {}
                        }
                        std::thread::sleep(Duration::from_millis(20));
                        let asking = |asked: bool| {
                            if let Some((holder, asking)) = live.lock().expect("live").get_mut(&address)
                                && *holder == name
                            {
                                *asking = asked;
                            }
                        };
                        runtime.del_until_done(&container, &pod.path(), &args, Duration::from_secs(60), asking);
                        let mut held = live.lock().expect("live");
                        if held.get(&address).is_some_and(|(holder, _)| *holder == name) {
                            held.remove(&address);
                        }
                    } else {
                        failed_adds.lock().expect("failures").push(result["msg"].as_str().unwrap_or("?").to_string());
                        runtime.del_until_done(&container, &pod.path(), &args, Duration::from_secs(60), |_| {});
                    }
                    done.fetch_add(2, Ordering::SeqCst);
                }
            });
        }
        // Chaos while the workers run: kill -9 an agent and start it again, then stop and start a member.
        let wait_until = |ops: usize| {
            while done.load(Ordering::SeqCst) < ops
                && next.load(Ordering::SeqCst) < PODS
                && working.load(Ordering::SeqCst) > 0
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        wait_until(2 * PODS / 4);
        nodes[1].kill_agent();
        std::thread::sleep(Duration::from_millis(800));
        nodes[1].start_agent_with(&agent_args);
        // An agent down past its registration TTL and the grace period together: the other nodes take none
        // of its addresses (its pods' DELs wait for it), and its ADDs fail until it is back.
        wait_until(2 * PODS * 2 / 5);
        nodes[2].kill_agent();
        std::thread::sleep(Duration::from_secs(9));
        nodes[2].start_agent_with(&agent_args);
        wait_until(2 * PODS * 3 / 5);
        cluster.stop_member(2);
        std::thread::sleep(Duration::from_secs(2));
        cluster.start_member(2);
    });
    assert_eq!(done.load(Ordering::SeqCst), 2 * PODS, "every pod was added (or its ADD failed) and deleted");
    let failures = failed_adds.into_inner().expect("failures");
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for failure in &failures {
        *reasons.entry(failure.as_str()).or_default() += 1;
    }
    eprintln!("{} of {PODS} ADDs failed while an agent or a member was down: {reasons:?}", failures.len());
    let handed = handed_during_del.load(Ordering::SeqCst);
    eprintln!("{handed} addresses handed out again while their last holder's DEL was being retried or answered");

    // Whatever an interrupted ADD left behind is collected after the grace period.
    let deadline = Instant::now() + Duration::from_secs(30);
    while allocations(&nodes[0]) > 0 {
        assert!(
            Instant::now() < deadline,
            "addresses still allocated after garbage collection:\n{}",
            nodes[0].cli_ok(&["get", "blocks", "-o", "wide"])
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    for node in &nodes {
        let log = node.agent_log();
        assert!(!log.contains("is not registered any more"), "{} released another node's address:\n{log}", node.name);
    }
    let check = nodes[0].cli(&["ipam", "check"]);
    assert!(check.status.success(), "ipam check: {}", String::from_utf8_lossy(&check.stdout));
    for node in &nodes {
        let routes = node.ns.exec(&["ip", "route", "show", "proto", "97"]);
        assert!(!routes.contains("dev pw"), "pod routes left on {}:\n{routes}", node.name);
    }
}
