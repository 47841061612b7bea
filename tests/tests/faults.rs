//! `kill -9` at every step boundary of the single-object allocator (`allocator::single::faults::POINTS`,
//! compiled in through the `fault-injection` feature only this crate enables): a child process runs the
//! allocator on an embedded store until it reaches the armed boundary and SIGKILLs itself there; then this
//! process opens the same store and checks that the state is one the design allows (every block whole, its
//! labels what it holds, no overlap, no address twice) and that what the runtime and the agent do next
//! (kubelet's DEL before a new ADD, a repeated DEL, the next give-back or collection pass) leaves it clean:
//! nothing held twice, nothing leaked, `ipam check` finding nothing.

use std::{collections::BTreeMap, path::Path, process::Command, sync::Arc};

use poolwarden::{
    allocator::{
        AssignRequest,
        single::{BlockAllocator, PoolSource, conformance::checked_blocks, faults},
    },
    catalog::Catalog,
    ipam::{NamespaceInfo, NodeInfo, check::check},
    objects::{ObjectStore, kv::KeyValueObjects},
    resources::parse_documents,
    store::{Store, embedded::EmbeddedStore},
};

const POOLS: &str = "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: four}\nspec: {cidr: 10.253.0.0/28, blockSize: 30}\n---\n\
apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: six}\nspec: {cidr: 'fd00:253::/124', blockSize: 126}\n---\n\
apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {emptyBlockGraceSeconds: 0}\n";

fn request(node: &str, handle: &str) -> AssignRequest {
    AssignRequest {
        handle: handle.to_string(),
        node: NodeInfo { name: node.to_string(), labels: BTreeMap::new() },
        namespace: NamespaceInfo::bare("default"),
        pod: None,
        requested: Default::default(),
        eligible: None,
        attributes: BTreeMap::new(),
    }
}

fn open(path: &Path) -> (Arc<dyn ObjectStore>, BlockAllocator) {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(path).expect("open the embedded store"));
    let objects: Arc<dyn ObjectStore> = Arc::new(KeyValueObjects::new(Arc::clone(&store)));
    let pools: Arc<dyn PoolSource> = Arc::new(Catalog::new(store));
    (Arc::clone(&objects), BlockAllocator::new(objects, pools))
}

async fn add(allocator: &BlockAllocator, node: &str, handle: &str) -> Vec<std::net::IpAddr> {
    let loaded = allocator.load().await.expect("pools");
    allocator.assign(&request(node, handle), &loaded).await.expect("assign").into_iter().map(|a| a.ip).collect()
}

/// The steps before the armed one, then the one that reaches it. Runs in the child.
async fn scenario(point: &'static str, allocator: &BlockAllocator) {
    let config = allocator.load().await.expect("pools").config;
    match point {
        "claim-created" | "claim-confirmed" => {
            faults::arm(point);
            add(allocator, "a", "h1").await;
        }
        "assigned" => {
            add(allocator, "a", "h0").await;
            faults::arm(point);
            add(allocator, "a", "h1").await;
        }
        "borrowed" => {
            // Node a takes every block of both pools (15 of 16 addresses each); node b must borrow.
            for h in 0..15 {
                add(allocator, "a", &format!("a{h}")).await;
            }
            faults::arm(point);
            add(allocator, "b", "h1").await;
        }
        "released-one" => {
            add(allocator, "a", "h0").await;
            faults::arm(point);
            allocator.release_handle("a", "h0").await.expect("release");
        }
        "given-back" => {
            add(allocator, "a", "h0").await;
            allocator.release_handle("a", "h0").await.expect("release");
            faults::arm(point);
            allocator.release_empty_blocks("a", &config).await.expect("give back");
        }
        "node-released" => {
            add(allocator, "a", "h0").await;
            add(allocator, "a", "h1").await;
            faults::arm(point);
            allocator.release_node("a").await.expect("release node");
        }
        other => panic!("no scenario for {other}"),
    }
}

/// The child: set up, run to the armed boundary, die there. Does nothing unless a parent started it.
#[tokio::test]
async fn fault_child() {
    let (Ok(path), Ok(point)) = (std::env::var("POOLWARDEN_FAULT_STORE"), std::env::var("POOLWARDEN_FAULT_POINT"))
    else {
        return;
    };
    let point = *faults::POINTS.iter().find(|p| **p == point).expect("a known point");
    let (_, allocator) = open(Path::new(&path));
    scenario(point, &allocator).await;
    // Reaching here means the boundary was never reached: the parent sees a clean exit and fails.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_at_every_step_boundary_leaves_a_state_the_next_steps_clean_up() {
    for point in faults::POINTS {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("store.redb");
        {
            let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).expect("create the store"));
            let docs = parse_documents("pools.yaml", POOLS).expect("pools");
            Catalog::new(store).apply(&docs).await.expect("apply");
        }
        let status = Command::new(std::env::current_exe().expect("this test binary"))
            .args(["--exact", "fault_child", "--nocapture", "--test-threads", "1"])
            .env("POOLWARDEN_FAULT_STORE", &path)
            .env("POOLWARDEN_FAULT_POINT", point)
            .status()
            .expect("run the child");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{point}: the child must die at the boundary, not exit ({status})");

        let (objects, allocator) = open(&path);
        let blocks = checked_blocks(objects.as_ref()).await;
        let held = |handle: &str| blocks.iter().flat_map(|b| b.ips_of(handle)).count();
        // What the next steps do, per boundary, and what must hold once they have.
        match *point {
            "claim-created" | "claim-confirmed" | "assigned" => {
                assert_eq!(held("h1"), 1, "{point}: the first family's address is committed, the second is not");
                // kubelet's DEL of the failed ADD, then the ADD again.
                assert_eq!(allocator.release_handle("a", "h1").await.expect("DEL").len(), 1, "{point}");
                assert_eq!(add(&allocator, "a", "h1").await.len(), 2, "{point}: the retried ADD gets both families");
            }
            "borrowed" => {
                assert_eq!(held("h1"), 1, "{point}: the borrowed address is committed");
                assert_eq!(allocator.release_handle("b", "h1").await.expect("DEL").len(), 1, "{point}: found by label");
            }
            "released-one" => {
                assert_eq!(held("h0"), 1, "{point}: one family released, one not yet");
                assert_eq!(allocator.release_handle("a", "h0").await.expect("DEL again").len(), 1, "{point}");
            }
            "given-back" => {
                assert_eq!(blocks.len(), 1, "{point}: one of the two empty blocks went back");
                let config = allocator.load().await.expect("pools").config;
                allocator.release_empty_blocks("a", &config).await.expect("the next pass");
            }
            "node-released" => {
                assert_eq!(blocks.iter().filter(|b| b.affinity.is_none()).count(), 1, "{point}: one block released");
                assert_eq!(allocator.release_node("a").await.expect("the next pass").len(), 1, "{point}");
            }
            other => panic!("no check for {other}"),
        }
        // Everything released, the blocks given back: nothing left, and `ipam check` clean on the way.
        let snapshot = allocator.snapshot().await.expect("snapshot");
        assert!(check(&snapshot).is_empty(), "{point}: ipam check: {:?}", check(&snapshot));
        for block in checked_blocks(objects.as_ref()).await {
            for (_, allocation) in block.allocated() {
                allocator.release_handle(&allocation.node, &allocation.handle).await.expect("release");
            }
        }
        let config = allocator.load().await.expect("pools").config;
        for node in ["a", "b"] {
            allocator.release_empty_blocks(node, &config).await.expect("give back");
        }
        let left = checked_blocks(objects.as_ref()).await;
        assert!(left.is_empty(), "{point}: left after everything was released: {left:?}");
    }
}
