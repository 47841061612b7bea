//! The allocator end to end on the embedded store: the seed's scenario, binding, limits, borrowing,
//! cooldown, idempotence and concurrency.

mod support;

use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use poolwarden::{
    allocator::AllocError,
    ipam::{SelectionError, check::check},
    resources::ANNOTATION_IPV4_POOLS,
};
use support::{Env, pool_yaml, request};

const EXTERNAL: &str = "[\"external-pool\"]";

async fn assert_clean(env: &Env) {
    let problems = check(&env.allocator.snapshot().await.unwrap());
    assert!(problems.is_empty(), "ipam check: {problems:?}");
}

#[tokio::test]
async fn seed_pool_gives_exactly_64_addresses_in_8_blocks_then_cooldown_gates_reuse() {
    let env = Env::new();
    env.apply(&pool_yaml("external-pool", "172.16.0.0/26", 29, "  allowedNamespaces: [external-ns]\n")).await;
    env.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {reuseCooldownSeconds: 60}\n",
    )
    .await;
    let ann = [(ANNOTATION_IPV4_POOLS, EXTERNAL)];
    let mut seen = BTreeSet::new();
    for i in 0..64 {
        let got = env.allocator.assign(&request(&format!("pod-{i}"), "node-0", "external-ns", &ann)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert!(seen.insert(got[0].ip), "{} handed out twice", got[0].ip);
        assert_eq!(got[0].pool, "external-pool");
    }
    let snapshot = env.allocator.snapshot().await.unwrap();
    assert_eq!(snapshot.blocks.len(), 8, "a /26 cut into /29s is 8 blocks");
    assert!(snapshot.blocks.iter().all(|b| b.used() == 8 && b.cidr.prefix_len() == 29));

    let err = env.allocator.assign(&request("pod-64", "node-0", "external-ns", &ann)).await.unwrap_err();
    assert!(matches!(err, AllocError::Exhausted { .. }), "{err}");
    assert!(err.to_string().contains("pool \"external-pool\" is exhausted"), "{err}");

    let released = env.allocator.release_handle("pod-17").await.unwrap();
    assert_eq!(released.len(), 1);
    let err = env.allocator.assign(&request("pod-65", "node-0", "external-ns", &ann)).await.unwrap_err();
    assert!(err.to_string().contains("wait 60s before reuse"), "inside the cooldown nothing is free: {err}");
    env.advance(60);
    let again = env.allocator.assign(&request("pod-65", "node-0", "external-ns", &ann)).await.unwrap();
    assert_eq!(again[0].ip, released[0], "exactly the released address comes back");
    assert!(env.allocator.assign(&request("pod-66", "node-0", "external-ns", &ann)).await.is_err(), "and only one");
    assert_clean(&env).await;
}

#[tokio::test]
async fn bound_pool_is_refused_to_other_namespaces_even_when_annotated() {
    let env = Env::new();
    env.apply(&pool_yaml("external-pool", "172.16.0.0/26", 29, "  allowedNamespaces: [external-ns]\n")).await;
    env.apply(&pool_yaml("internal-pool", "192.168.0.0/24", 29, "")).await;
    let mut req = request("p", "node-0", "default", &[]);
    req.pod.as_mut().unwrap().annotations.insert("cni.projectcalico.org/ipv4pools".into(), EXTERNAL.into());
    let err = env.allocator.assign(&req).await.unwrap_err();
    let AllocError::Selection(SelectionError::Refused { pool, namespace, .. }) = &err else { panic!("{err}") };
    assert_eq!((pool.as_str(), namespace.as_str()), ("external-pool", "default"));
    assert!(env.allocator.snapshot().await.unwrap().blocks.is_empty(), "a refused request claims nothing");

    // Without an annotation the default namespace gets the unbound pool only.
    let got = env.allocator.assign(&request("q", "node-0", "default", &[])).await.unwrap();
    assert_eq!(got[0].pool, "internal-pool");
}

#[tokio::test]
async fn assign_is_idempotent_per_handle_and_release_undoes_it() {
    let env = Env::new();
    env.apply(&pool_yaml("p4", "10.1.0.0/24", 28, "")).await;
    env.apply(&pool_yaml("p6", "fd00:1::/120", 124, "")).await;
    let req = request("c1.eth0", "node-0", "default", &[]);
    let first = env.allocator.assign(&req).await.unwrap();
    assert_eq!(first.len(), 2, "dual stack: one address per family: {first:?}");
    assert!(first[0].ip.is_ipv4() && first[1].ip.is_ipv6());
    assert_eq!(env.allocator.assign(&req).await.unwrap(), first, "a repeated ADD gets the same addresses");
    let released: BTreeSet<IpAddr> = env.allocator.release_handle("c1.eth0").await.unwrap().into_iter().collect();
    assert_eq!(released, first.iter().map(|a| a.ip).collect());
    assert!(env.allocator.release_handle("c1.eth0").await.unwrap().is_empty(), "release is idempotent");
    let snapshot = env.allocator.snapshot().await.unwrap();
    assert!(snapshot.handles.is_empty() && snapshot.blocks.iter().all(|b| b.used() == 0));
    assert_clean(&env).await;
}

#[tokio::test]
async fn max_blocks_per_host_then_borrowing_or_strict_refusal() {
    let env = Env::new();
    env.apply(&pool_yaml("small", "10.2.0.0/28", 30, "")).await; // 4 blocks of 4
    env.apply("apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {maxBlocksPerHost: 1, strictAffinity: true}\n").await;
    for i in 0..4 {
        env.allocator.assign(&request(&format!("a{i}"), "node-a", "default", &[])).await.unwrap();
    }
    let err = env.allocator.assign(&request("a4", "node-a", "default", &[])).await.unwrap_err();
    assert!(err.to_string().contains("maxBlocksPerHost"), "{err}");

    // Three other nodes claim the other three blocks and fill them.
    for i in 0..12 {
        let node = ["node-b", "node-c", "node-d"][i / 4];
        env.allocator
            .assign(&request(&format!("b{i}"), node, "default", &[]))
            .await
            .unwrap_or_else(|e| panic!("b{i}: {e}"));
    }
    env.allocator.release_handle("b0").await.unwrap();
    let err = env.allocator.assign(&request("a5", "node-a", "default", &[])).await.unwrap_err();
    assert!(err.to_string().contains("strictAffinity"), "strict: no borrowing: {err}");

    env.apply("apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {maxBlocksPerHost: 1, strictAffinity: false}\n").await;
    let got = env.allocator.assign(&request("a5", "node-a", "default", &[])).await.unwrap();
    let snapshot = env.allocator.snapshot().await.unwrap();
    let block = snapshot.blocks.iter().find(|b| b.cidr.contains(&got[0].ip)).unwrap();
    assert_eq!(block.affinity.as_deref(), Some("node-b"), "borrowed from node-b's block");
    assert_eq!(block.allocation(got[0].ip).unwrap().node, "node-a");
    assert_clean(&env).await;
}

/// A gone node's block that another node borrowed from loses its owner, not its borrowed address; when the
/// borrower releases that address the block stays, owned by nobody, until the address has cooled down, and
/// goes back to its pool then.
#[tokio::test]
async fn an_unowned_block_goes_back_once_its_last_address_has_cooled_down() {
    let env = Env::new();
    env.apply(&pool_yaml("tiny", "10.4.0.0/30", 30, "")).await; // one block of 4
    env.apply("apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {strictAffinity: false, reuseCooldownSeconds: 5}\n").await;
    env.allocator.assign(&request("gone0", "node-gone", "default", &[])).await.unwrap();
    let borrowed = env.allocator.assign(&request("b0", "node-b", "default", &[])).await.unwrap();
    let snapshot = env.allocator.snapshot().await.unwrap();
    assert_eq!(snapshot.blocks[0].affinity.as_deref(), Some("node-gone"), "node-b borrowed: {snapshot:?}");
    env.allocator.release_handle("gone0").await.unwrap();
    assert!(env.allocator.release_affinity(&snapshot.affinities[0]).await.unwrap());
    let snapshot = env.allocator.snapshot().await.unwrap();
    assert_eq!(snapshot.blocks.len(), 1, "the block keeps the borrowed address");
    assert_eq!(snapshot.blocks[0].affinity, None);
    assert_eq!(env.allocator.release_ip(borrowed[0].ip, None).await.unwrap().unwrap().handle, "b0");
    let cidr = snapshot.blocks[0].cidr;
    assert_eq!(env.allocator.unowned_blocks().await.unwrap(), [cidr], "indexed for the collector");
    assert!(!env.allocator.release_unowned_block(cidr).await.unwrap(), "not while an address cools down");
    let snapshot = env.allocator.snapshot().await.unwrap();
    assert!(snapshot.blocks.len() == 1 && snapshot.handles.is_empty(), "{snapshot:?}");
    env.advance(5);
    assert!(env.allocator.release_unowned_block(cidr).await.unwrap(), "once it has cooled down");
    assert!(env.allocator.unowned_blocks().await.unwrap().is_empty(), "and out of the index");
    let snapshot = env.allocator.snapshot().await.unwrap();
    assert!(snapshot.blocks.is_empty() && snapshot.handles.is_empty(), "{snapshot:?}");
    assert_clean(&env).await;
}

/// The reuse cooldown holds when the block an address was released from has lost its owner: the block is
/// not given back (and cut again, the address free at once) while the address cools down. A claim on a
/// pool with no unclaimed block left adopts the block nobody owns once it has an address to give.
#[tokio::test]
async fn a_released_address_cools_down_in_a_block_nobody_owns() {
    let cooldown = "apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {reuseCooldownSeconds: 60, strictAffinity: STRICT}\n";
    // A borrowed address released after its block's node went.
    let env = Env::new();
    env.apply(&pool_yaml("pair", "10.4.1.0/31", 31, "")).await; // one block of 2
    env.apply(&cooldown.replace("STRICT", "false")).await;
    let mine = env.allocator.assign(&request("a0", "node-a", "default", &[])).await.unwrap()[0].ip;
    let x = env.allocator.assign(&request("b0", "node-b", "default", &[])).await.unwrap()[0].ip;
    let affinity = env.allocator.snapshot().await.unwrap().affinities[0].clone();
    env.allocator.release_handle("a0").await.unwrap();
    assert!(env.allocator.release_affinity(&affinity).await.unwrap());
    env.allocator.release_handle("b0").await.unwrap();
    env.advance(1);
    let early = env.allocator.assign(&request("c0", "node-c", "default", &[])).await;
    assert!(matches!(early, Err(AllocError::Exhausted { .. })), "{x} and {mine} cool down: {early:?}");
    assert!(!env.allocator.release_unowned_block(affinity.cidr).await.unwrap(), "not given back while cooling");
    env.advance(60);
    let mut got = BTreeSet::new();
    for handle in ["c0", "c1"] {
        got.insert(env.allocator.assign(&request(handle, "node-c", "default", &[])).await.unwrap()[0].ip);
    }
    assert_eq!(got, BTreeSet::from([mine, x]), "after the cooldown both come back");
    assert!(env.allocator.unowned_blocks().await.unwrap().is_empty(), "adopted: out of the index");
    let snapshot = env.allocator.snapshot().await.unwrap();
    assert_eq!(snapshot.blocks[0].affinity.as_deref(), Some("node-c"), "adopted: {snapshot:?}");
    assert_clean(&env).await;

    // A block already empty when its node went, with and without strictAffinity.
    for strict in ["false", "true"] {
        let env = Env::new();
        env.apply(&pool_yaml("one", "10.4.2.7/32", 32, "")).await; // one block of 1
        env.apply(&cooldown.replace("STRICT", strict)).await;
        let x = env.allocator.assign(&request("a0", "node-a", "default", &[])).await.unwrap()[0].ip;
        let affinity = env.allocator.snapshot().await.unwrap().affinities[0].clone();
        env.allocator.release_handle("a0").await.unwrap();
        assert!(env.allocator.release_affinity(&affinity).await.unwrap());
        env.advance(1);
        let early = env.allocator.assign(&request("c0", "node-c", "default", &[])).await;
        assert!(matches!(early, Err(AllocError::Exhausted { .. })), "strict {strict}: {x} cools down: {early:?}");
        env.advance(60);
        let got = env.allocator.assign(&request("c0", "node-c", "default", &[])).await.unwrap();
        assert_eq!(got[0].ip, x, "strict {strict}");
        let snapshot = env.allocator.snapshot().await.unwrap();
        assert_eq!(snapshot.blocks[0].affinity.as_deref(), Some("node-c"), "strict {strict}: adopted");
        assert_clean(&env).await;
    }
}

/// A pool deleted right after an address of it was released, and applied again over the same range: the
/// released address is not handed out before its cooldown ends. The emptied block stays, owned by nobody,
/// while it cools down (the pool's re-creation is refused meanwhile, naming the cooldown), and the collection
/// gives it back after.
#[tokio::test]
async fn a_pool_deleted_and_re_created_keeps_the_cooldown_of_its_released_addresses() {
    let env = Env::new();
    let pool = pool_yaml("again", "10.4.3.0/30", 30, "");
    env.apply(&pool).await;
    env.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {reuseCooldownSeconds: 60}\n",
    )
    .await;
    let x = env.allocator.assign(&request("a0", "node-a", "default", &[])).await.unwrap()[0].ip;
    env.allocator.release_handle("a0").await.unwrap();
    assert!(env.catalog().delete_pool("again", false).await.unwrap().is_empty(), "nothing in use");
    env.advance(1);
    let docs = poolwarden::resources::parse_documents("again.yaml", &pool).unwrap();
    let refused = env.catalog().apply(&docs).await.unwrap_err();
    assert!(refused.to_string().contains("reuseCooldownSeconds"), "{refused}");
    let cidr: ipnet::IpNet = "10.4.3.0/30".parse().unwrap();
    assert_eq!(env.allocator.unowned_blocks().await.unwrap(), [cidr], "kept, owned by nobody");
    assert!(!env.allocator.release_unowned_block(cidr).await.unwrap(), "not before {x} has cooled down");
    env.advance(60);
    assert!(env.allocator.release_unowned_block(cidr).await.unwrap(), "once it has");
    env.apply(&pool).await;
    let got = env.allocator.assign(&request("b0", "node-b", "default", &[])).await.unwrap();
    assert_eq!(got[0].block, cidr);
    assert_clean(&env).await;
}

#[tokio::test]
async fn specific_addresses_and_in_use_errors() {
    let env = Env::new();
    env.apply(&pool_yaml("p", "10.3.0.0/24", 26, "")).await;
    let mut req = request("fixed", "node-0", "default", &[]);
    req.pod.as_mut().unwrap().annotations.insert("poolwarden.io/ipAddrs".into(), "[\"10.3.0.77\"]".into());
    assert_eq!(env.allocator.assign(&req).await.unwrap()[0].ip.to_string(), "10.3.0.77");
    let mut again = request("other", "node-1", "default", &[]);
    again.requested.ips = vec!["10.3.0.77".parse().unwrap()];
    let err = env.allocator.assign(&again).await.unwrap_err();
    assert!(err.to_string().contains("10.3.0.77 is already in use by fixed"), "{err}");
    assert_clean(&env).await;
}

#[tokio::test]
async fn empty_blocks_go_back_after_the_grace_period() {
    let env = Env::new();
    env.apply(&pool_yaml("p", "10.4.0.0/24", 29, "")).await;
    env.apply("apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {emptyBlockGraceSeconds: 100}\n").await;
    env.allocator.assign(&request("x", "node-0", "default", &[])).await.unwrap();
    env.allocator.release_handle("x").await.unwrap();
    assert!(env.allocator.release_empty_blocks("node-0").await.unwrap().is_empty(), "not before the grace period");
    env.advance(100);
    assert_eq!(env.allocator.release_empty_blocks("node-0").await.unwrap().len(), 1);
    let snapshot = env.allocator.snapshot().await.unwrap();
    assert!(snapshot.blocks.is_empty() && snapshot.affinities.is_empty());
    assert_clean(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_assigns_on_three_nodes_never_collide() {
    let env = Arc::new(Env::new());
    env.apply(&pool_yaml("p", "10.5.0.0/24", 28, "")).await;
    let mut tasks = Vec::new();
    for i in 0..120 {
        let env = Arc::clone(&env);
        tasks.push(tokio::spawn(async move {
            let node = format!("node-{}", i % 3);
            env.allocator
                .assign(&request(&format!("h{i}"), &node, "default", &[]))
                .await
                .unwrap_or_else(|e| panic!("h{i}: {e}"))
        }));
    }
    let mut ips = BTreeSet::new();
    for t in tasks {
        for a in t.await.unwrap() {
            assert!(ips.insert(a.ip), "{} assigned twice", a.ip);
        }
    }
    assert_eq!(ips.len(), 120);
    assert_clean(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_repeats_of_one_add_get_one_address() {
    let env = Arc::new(Env::new());
    env.apply(&pool_yaml("p", "10.6.0.0/24", 28, "")).await;
    // Warm the node with a block so the repeats race on the batched path too.
    env.allocator.assign(&request("warm", "node-0", "default", &[])).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let env = Arc::clone(&env);
        tasks.push(tokio::spawn(async move {
            env.allocator.assign(&request("same.eth0", "node-0", "default", &[])).await.unwrap()
        }));
    }
    let mut answers = BTreeSet::new();
    for t in tasks {
        answers.insert(t.await.unwrap()[0].ip);
    }
    assert_eq!(answers.len(), 1, "every repeat of one ADD gets the same address: {answers:?}");
    let snapshot = env.allocator.snapshot().await.unwrap();
    let held: usize = snapshot.blocks.iter().map(|b| b.ips_of("same.eth0").len()).sum();
    assert_eq!(held, 1);
    assert_clean(&env).await;
}

/// A pool deleted with --force while pods hold its addresses, then re-created with another block size: apply
/// refuses it, naming the blocks left behind; a pool record written over them anyway (an older agent's apply,
/// or a race) still never gets a block cut across them, so 200 new pods on two nodes get 0 of the 21 live
/// addresses, and `ipam check` reports exactly the leftover.
#[tokio::test]
async fn a_pool_recreated_with_another_block_size_never_hands_out_a_live_address() {
    let env = Env::new();
    env.apply(&pool_yaml("re", "10.80.0.0/24", 29, "")).await;
    let mut live = BTreeSet::new();
    for i in 0..21 {
        let node = if i % 2 == 0 { "node-a" } else { "node-b" };
        let got = env.allocator.assign(&request(&format!("old-{i}"), node, "default", &[])).await.unwrap();
        live.insert(got[0].ip);
    }
    let left = env.catalog().delete_pool("re", true).await.unwrap();
    assert!(!left.is_empty(), "--force leaves the blocks in use");

    // apply refuses the re-created pool: every existing block is an overlap.
    let docs = poolwarden::resources::parse_documents("re.yaml", &pool_yaml("re", "10.80.0.0/24", 28, "")).unwrap();
    let err = env.catalog().apply(&docs).await.unwrap_err().to_string();
    assert!(err.contains("left by a deleted pool") && err.contains("10.80.0.0/29"), "{err}");

    // Written past apply: claims still never overlap a block that exists.
    let pool = poolwarden::resources::parse_documents("re.yaml", &pool_yaml("re", "10.80.0.0/24", 28, "")).unwrap();
    let poolwarden::resources::Resource::IpPool(pool) = &pool[0].resource else { panic!("a pool") };
    env.store
        .txn(poolwarden::store::Txn::new().put(poolwarden::store::keys::pool("re"), poolwarden::catalog::encode(pool)))
        .await
        .unwrap();
    let mut given = BTreeSet::new();
    for i in 0..200 {
        let node = if i % 2 == 0 { "node-a" } else { "node-b" };
        match env.allocator.assign(&request(&format!("new-{i}"), node, "default", &[])).await {
            Ok(got) => {
                assert!(!live.contains(&got[0].ip), "{} is held by a live pod and was handed out again", got[0].ip);
                assert!(given.insert(got[0].ip), "{} handed out twice", got[0].ip);
            }
            Err(AllocError::Exhausted { .. }) => break,
            Err(e) => panic!("new-{i}: {e}"),
        }
    }
    assert!(given.len() > 150, "the rest of the range is still usable: {}", given.len());
    let problems = check(&env.allocator.snapshot().await.unwrap());
    assert!(!problems.is_empty() && problems.iter().all(|p| p.kind == "block-misaligned"), "{problems:?}");
}

/// A claim holds only if the pool is still the one read: deleted meanwhile, the claim fails and no block is
/// cut from the pool that is gone.
#[tokio::test]
async fn a_claim_is_conditional_on_the_pools_revision() {
    let env = Env::new();
    env.apply(&pool_yaml("gone", "10.81.0.0/24", 28, "")).await;
    let loaded = env.allocator.load().await.unwrap();
    env.catalog().delete_pool("gone", false).await.unwrap();
    let err =
        env.allocator.assign_recording(&request("late", "node-a", "default", &[]), None, &loaded).await.unwrap_err();
    assert!(matches!(err, AllocError::PoolChanged { .. }), "{err}");
    assert!(env.allocator.snapshot().await.unwrap().blocks.is_empty(), "no block was claimed");
}

/// Releasing an address of a block nobody claimed is "not allocated", not contention (it ran its 32 attempts
/// and aborted the collector's pass).
#[tokio::test]
async fn releasing_an_address_of_an_unclaimed_block_is_not_allocated() {
    let env = Env::new();
    env.apply(&pool_yaml("external-pool", "172.16.0.0/26", 29, "")).await;
    let ip: IpAddr = "172.16.0.9".parse().unwrap();
    assert!(env.allocator.release_ip(ip, None).await.unwrap().is_none());
    assert!(env.allocator.release_ip(ip, Some((3, "gone"))).await.unwrap().is_none());
}
