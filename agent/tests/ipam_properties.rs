//! Property tests over random sequences of assign/release/block-release across nodes, pools and block
//! sizes, against a model of who should hold what: no address is ever handed out twice, blocks never
//! overlap, used + free is conserved, release undoes assign, a released address is not handed out again
//! inside its cooldown (whatever happened to its block meanwhile), and `ipam check` stays clean.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use poolwarden::{
    allocator::AllocError,
    ipam::check::check,
    resources::{ANNOTATION_IPV4_POOLS, prefix_size},
};
use proptest::prelude::*;
use support::{Env, pool_yaml, request};

#[derive(Clone, Debug)]
enum Op {
    Assign {
        handle: u8,
        node: u8,
        bound_namespace: bool,
    },
    ReleaseHandle {
        handle: u8,
    },
    ReleaseIp {
        pick: usize,
    },
    ReleaseEmptyBlocks {
        node: u8,
    },
    /// The node is gone: the collector releases its blocks' affinities, then gives back blocks nobody owns.
    ReleaseNode {
        node: u8,
    },
    Advance {
        seconds: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..24, 0u8..3, any::<bool>()).prop_map(|(handle, node, bound_namespace)| Op::Assign { handle, node, bound_namespace }),
        2 => (0u8..24).prop_map(|handle| Op::ReleaseHandle { handle }),
        1 => any::<usize>().prop_map(|pick| Op::ReleaseIp { pick }),
        1 => (0u8..3).prop_map(|node| Op::ReleaseEmptyBlocks { node }),
        1 => (0u8..3).prop_map(|node| Op::ReleaseNode { node }),
        1 => (0u8..40).prop_map(|seconds| Op::Advance { seconds }),
    ]
}

async fn run(open_block: u8, bound_block: u8, v6_block: u8, strict: bool, cooldown: u8, ops: Vec<Op>) {
    let env = Env::new();
    let mut yaml = pool_yaml("open", "10.0.0.0/27", open_block, "");
    yaml += &pool_yaml("bound", "10.1.0.0/28", bound_block, "  allowedNamespaces: [team-b]\n");
    yaml += &pool_yaml("six", "fd00::/124", v6_block, "");
    yaml += &format!(
        "apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {{name: default}}\nspec:\n  strictAffinity: {strict}\n  reuseCooldownSeconds: {cooldown}\n  emptyBlockGraceSeconds: 30\n"
    );
    env.apply(&yaml).await;

    let mut model: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    // When each address was last released, to check its cooldown.
    let mut released_at: BTreeMap<IpAddr, u64> = BTreeMap::new();
    let now = || env.now.load(std::sync::atomic::Ordering::SeqCst);
    for op in ops {
        match op {
            Op::Assign { handle, node, bound_namespace } => {
                let handle = format!("h{handle}");
                let req = if bound_namespace {
                    request(&handle, &format!("n{node}"), "team-b", &[(ANNOTATION_IPV4_POOLS, "[\"bound\"]")])
                } else {
                    request(&handle, &format!("n{node}"), "team-a", &[])
                };
                match env.allocator.assign(&req).await {
                    Ok(got) => {
                        let ips: BTreeSet<IpAddr> = got.iter().map(|a| a.ip).collect();
                        if let Some(before) = model.get(&handle) {
                            assert_eq!(&ips, before, "a repeated assign for {handle} must return the same addresses");
                            continue;
                        }
                        for a in &got {
                            let pool_ok = if a.ip.is_ipv6() {
                                a.pool == "six"
                            } else if bound_namespace {
                                a.pool == "bound"
                            } else {
                                a.pool == "open"
                            };
                            assert!(pool_ok, "{handle} got {} from {}", a.ip, a.pool);
                            if let Some(at) = released_at.get(&a.ip) {
                                assert!(
                                    now() >= at + u64::from(cooldown),
                                    "{} handed to {handle} {}s after its release, inside the {cooldown}s cooldown",
                                    a.ip,
                                    now() - at
                                );
                            }
                            for (other, held) in &model {
                                assert!(
                                    other == &handle || !held.contains(&a.ip),
                                    "{} handed to {handle} while {other} holds it",
                                    a.ip
                                );
                            }
                        }
                        model.insert(handle, ips);
                    }
                    Err(AllocError::Exhausted { .. }) => {
                        assert!(!model.contains_key(&handle), "a held handle's repeat cannot be exhausted");
                    }
                    Err(other) => panic!("assign {handle}: unexpected error {other}"),
                }
            }
            Op::ReleaseHandle { handle } => {
                let handle = format!("h{handle}");
                let released: BTreeSet<IpAddr> =
                    env.allocator.release_handle(&handle).await.unwrap().into_iter().collect();
                released_at.extend(released.iter().map(|ip| (*ip, now())));
                assert_eq!(
                    released,
                    model.remove(&handle).unwrap_or_default(),
                    "release of {handle} undoes its assign"
                );
            }
            Op::ReleaseIp { pick } => {
                let all: Vec<(String, IpAddr)> =
                    model.iter().flat_map(|(h, ips)| ips.iter().map(move |ip| (h.clone(), *ip))).collect();
                if all.is_empty() {
                    continue;
                }
                let (handle, ip) = &all[pick % all.len()];
                let allocation =
                    env.allocator.release_ip(*ip, None).await.unwrap().expect("a held address is allocated");
                assert_eq!(&allocation.handle, handle);
                released_at.insert(*ip, now());
                let held = model.get_mut(handle).unwrap();
                held.remove(ip);
                if held.is_empty() {
                    model.remove(handle);
                }
            }
            Op::ReleaseEmptyBlocks { node } => {
                env.allocator.release_empty_blocks(&format!("n{node}")).await.unwrap();
            }
            Op::ReleaseNode { node } => {
                let node = format!("n{node}");
                for affinity in env.allocator.snapshot().await.unwrap().affinities.iter().filter(|a| a.node == node) {
                    env.allocator.release_affinity(affinity).await.unwrap();
                }
                // As the collector does: from the index of such blocks, not a read of every block.
                for cidr in env.allocator.unowned_blocks().await.unwrap() {
                    env.allocator.release_unowned_block(cidr).await.unwrap();
                }
            }
            Op::Advance { seconds } => env.advance(u64::from(seconds)),
        }

        let snapshot = env.allocator.snapshot().await.unwrap();
        let problems = check(&snapshot);
        assert!(problems.is_empty(), "ipam check: {problems:?}");
        let ownerless: BTreeSet<_> = snapshot.blocks.iter().filter(|b| b.affinity.is_none()).map(|b| b.cidr).collect();
        let indexed: BTreeSet<_> = env.allocator.unowned_blocks().await.unwrap().into_iter().collect();
        assert_eq!(indexed, ownerless, "the index of blocks nobody owns is those blocks");
        let mut stored: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        for block in &snapshot.blocks {
            assert_eq!(
                u128::from(block.used() + block.free_count()),
                prefix_size(block.cidr),
                "block {} conserves used+free",
                block.cidr
            );
            for (ip, a) in block.allocated() {
                assert!(stored.entry(a.handle.clone()).or_default().insert(ip), "{ip} twice");
            }
        }
        assert_eq!(stored, model, "the store holds exactly what the model says");
    }

    for handle in model.keys() {
        env.allocator.release_handle(handle).await.unwrap();
    }
    let snapshot = env.allocator.snapshot().await.unwrap();
    assert!(
        snapshot.blocks.iter().all(|b| b.used() == 0) && snapshot.handles.is_empty(),
        "releasing everything leaves nothing"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_every_invariant(
        open_block in 28u8..=32,
        bound_block in 29u8..=32,
        v6_block in 125u8..=128,
        strict in any::<bool>(),
        cooldown in prop_oneof![Just(0u8), Just(15u8)],
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run(open_block, bound_block, v6_block, strict, cooldown, ops));
    }
}

/// The same kind of sequences against the single-object allocator (`poolwarden::allocator::single`) on the
/// embedded store's objects; the etcd and Kubernetes backends run fixed seeds of it
/// (`block_allocator_tests!`, the cluster tests).
mod single_object {
    use std::sync::Arc;

    use poolwarden::{
        allocator::single::conformance::{Op, Shape, keeps_every_invariant},
        objects::{ObjectStore, kv::KeyValueObjects},
        store::embedded::EmbeddedStore,
    };
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u8..24, any::<bool>()).prop_map(|(handle, bound_namespace)| Op::Assign { handle, bound_namespace }),
            2 => (0u8..24).prop_map(|handle| Op::ReleaseHandle { handle }),
            1 => any::<usize>().prop_map(|pick| Op::ReleaseIp { pick }),
            1 => (0u8..3).prop_map(|node| Op::ReleaseEmptyBlocks { node }),
            1 => (0u8..3).prop_map(|node| Op::ReleaseNode { node }),
            1 => (0u8..40).prop_map(|seconds| Op::Advance { seconds }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn random_sequences_keep_every_invariant(
            open_block in 28u8..=32,
            bound_block in 29u8..=32,
            v6_block in 125u8..=128,
            strict in any::<bool>(),
            cooldown in prop_oneof![Just(0u8), Just(15u8)],
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = EmbeddedStore::open(&dir.path().join("store.redb")).expect("open embedded store");
            let objects: Arc<dyn ObjectStore> = Arc::new(KeyValueObjects::new(Arc::new(store)));
            let shape = Shape { open_block, bound_block, v6_block, strict, cooldown };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(keeps_every_invariant(objects, "p", shape, ops));
        }
    }
}
