//! What the single-object allocator must do on every [`ObjectStore`] backend, written once and run against the
//! embedded store and a three-member etcd (`block_allocator_tests!`) and the real Kubernetes API server
//! ([`all`], from the cluster tests).
//!
//! Each check uses its own pool (named `run`, its range fixed per check) and nodes named after `run`, starts
//! by removing blocks a failed earlier run left in its range, and leaves nothing behind when it passes, so
//! the checks can share a backend. The pools are given to the allocator as a fixed list (the catalog is not
//! what is tested here; a check changes the list to re-create a pool under a claim).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use ipnet::IpNet;

use super::{BlockAllocator, GoneNodes, PoolSource, labels_of};
use crate::{
    allocator::{AllocError, AssignRequest, Loaded},
    ipam::{Block, NamespaceInfo, NodeInfo, Requested},
    ipam::{PodInfo, check::check},
    objects::{Kind, Labels, ObjectStore},
    resources::{
        ANNOTATION_IPV4_POOLS, AllowedUse, AssignmentMode, DEFAULT_EMPTY_BLOCK_GRACE_SECONDS, IpPool, IpPoolSpec,
        IpamConfigSpec, ObjectMeta, Selector, prefix_size,
    },
};

/// One `#[tokio::test]` per check, each on a backend made by `$fresh`: an async function returning
/// `Option<(guard, Arc<dyn ObjectStore>)>` (`None` skips, having said why).
#[macro_export]
macro_rules! block_allocator_tests {
    ($fresh:path) => {
        $crate::block_allocator_tests!($fresh; claims_assigns_and_gives_back, borrows_and_respects_strict_affinity,
            a_pool_changed_under_a_claim_is_refused, fixed_addresses, concurrent_nodes_never_share_an_address,
            random_sequences_keep_every_invariant, attachments_are_read_back_with_their_attributes,
            a_released_address_cools_down_in_a_block_nobody_owns, gone_nodes_are_collected_after_their_grace);
    };
    ($fresh:path; $($name:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            let Some((_backend, objects)) = $fresh().await else { return };
            $crate::allocator::single::conformance::$name(objects, stringify!($name).replace('_', "-").as_str()).await;
        }
    )*};
}

/// Every check, one after the other.
pub async fn all(objects: Arc<dyn ObjectStore>, run: &str) {
    random_sequences_keep_every_invariant(Arc::clone(&objects), &format!("{run}-random")).await;
    claims_assigns_and_gives_back(Arc::clone(&objects), &format!("{run}-claims")).await;
    borrows_and_respects_strict_affinity(Arc::clone(&objects), &format!("{run}-borrows")).await;
    a_pool_changed_under_a_claim_is_refused(Arc::clone(&objects), &format!("{run}-changed")).await;
    fixed_addresses(Arc::clone(&objects), &format!("{run}-fixed")).await;
    attachments_are_read_back_with_their_attributes(Arc::clone(&objects), &format!("{run}-attachments")).await;
    a_released_address_cools_down_in_a_block_nobody_owns(Arc::clone(&objects), &format!("{run}-cooldown")).await;
    gone_nodes_are_collected_after_their_grace(Arc::clone(&objects), &format!("{run}-gone")).await;
    concurrent_nodes_never_share_an_address(objects, &format!("{run}-concurrent")).await;
}

/// Pools and configuration a check sets and changes.
pub struct FixedPools(Mutex<(Vec<IpPool>, IpamConfigSpec)>);

impl FixedPools {
    /// These pools, the default configuration but no grace period before an empty block goes back.
    pub fn new(pools: Vec<IpPool>) -> Arc<Self> {
        let mut config = IpamConfigSpec::default();
        config.empty_block_grace_seconds = 0;
        Arc::new(Self(Mutex::new((pools, config))))
    }

    fn set(&self, pools: Vec<IpPool>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).0 = pools;
    }

    fn configure(&self, change: impl FnOnce(&mut IpamConfigSpec)) {
        change(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()).1);
    }

    fn loaded(&self) -> Loaded {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Loaded { pools: held.0.clone(), config: held.1.clone() }
    }
}

#[async_trait]
impl PoolSource for FixedPools {
    async fn load(&self) -> Result<Loaded, AllocError> {
        Ok(self.loaded())
    }
}

/// An unbound, automatic pool for workloads.
pub fn pool(name: &str, cidr: &str, block_size: u8) -> IpPool {
    IpPool {
        metadata: ObjectMeta::named(name),
        spec: IpPoolSpec {
            cidr: cidr.parse().expect("a CIDR"),
            block_size: Some(block_size),
            disabled: false,
            node_selector: Selector::all(),
            namespace_selector: Selector::all(),
            allowed_namespaces: Vec::new(),
            nat_outgoing: false,
            ipip_mode: Default::default(),
            vxlan_mode: Default::default(),
            allowed_uses: vec![AllowedUse::Workload],
            disable_bgp_export: false,
            assignment_mode: AssignmentMode::Automatic,
            enforcement: None,
        },
    }
}

/// A check's allocator and what it sees: the pool, a clock it moves, and its backend.
struct Bench {
    run: String,
    objects: Arc<dyn ObjectStore>,
    pools: Arc<FixedPools>,
    now: Arc<AtomicU64>,
}

impl Bench {
    async fn new(objects: Arc<dyn ObjectStore>, run: &str, cidr: &str, block_size: u8) -> Self {
        Self::with_pools(objects, run, vec![pool(run, cidr, block_size)]).await
    }

    async fn with_pools(objects: Arc<dyn ObjectStore>, run: &str, pools: Vec<IpPool>) -> Self {
        let ranges: Vec<IpNet> = pools.iter().map(IpPool::cidr).collect();
        let bench =
            Self { run: run.to_string(), objects, pools: FixedPools::new(pools), now: Arc::new(AtomicU64::new(1_000)) };
        // What a failed earlier run left in these ranges.
        for object in bench.objects.list(Kind::Block, &Labels::new()).await.expect("list blocks").0 {
            let block: Option<Block> = serde_json::from_value(object.spec.clone()).ok();
            if block.is_some_and(|b| ranges.iter().any(|r| r.contains(&b.cidr) || b.cidr.contains(&r.network()))) {
                let _ = bench.objects.delete(Kind::Block, &object.name, &object.version).await;
            }
        }
        bench
    }

    /// An allocator as one agent has it (its own locks).
    fn agent(&self) -> BlockAllocator {
        let now = Arc::clone(&self.now);
        let pools: Arc<dyn PoolSource> = self.pools.clone();
        BlockAllocator::with_clock(Arc::clone(&self.objects), pools, Arc::new(move || now.load(Ordering::SeqCst)))
    }

    fn node(&self, n: &str) -> String {
        format!("{}-{n}", self.run)
    }

    fn request(&self, node: &str, handle: &str) -> AssignRequest {
        AssignRequest {
            handle: format!("{}-{handle}", self.run),
            node: NodeInfo { name: self.node(node), labels: BTreeMap::new() },
            namespace: NamespaceInfo::bare("default"),
            pod: None,
            requested: Requested::default(),
            eligible: None,
            attributes: BTreeMap::new(),
        }
    }

    async fn assign(&self, agent: &BlockAllocator, node: &str, handle: &str) -> Result<IpAddr, AllocError> {
        let got = agent.assign(&self.request(node, handle), &self.pools.loaded()).await?;
        assert_eq!(got.len(), 1, "one address for {handle}: {got:?}");
        Ok(got[0].ip)
    }

    async fn release(&self, agent: &BlockAllocator, node: &str, handle: &str) -> Vec<IpAddr> {
        agent.release_handle(&self.node(node), &format!("{}-{handle}", self.run)).await.expect("release")
    }

    /// The blocks of this check's pool, after checking every invariant of the design on them: each block
    /// whole, its labels what it holds, no two overlapping, no handle with two addresses of one family.
    async fn blocks(&self) -> Vec<Block> {
        let mut objects = Vec::new();
        for pool in self.pools.loaded().pools {
            let selector = Labels::from([(super::POOL_LABEL.to_string(), super::label_for(pool.name()))]);
            objects.extend(self.objects.list(Kind::Block, &selector).await.expect("list blocks").0);
        }
        checked(&objects)
    }

    fn allocated(blocks: &[Block]) -> BTreeMap<IpAddr, String> {
        blocks.iter().flat_map(|b| b.allocated().map(|(ip, a)| (ip, a.handle.clone()))).collect()
    }
}

/// What an ADD recorded with its addresses is read back by its node, by any agent of that node (one that
/// restarted included), for addresses in its own blocks and in blocks it borrowed from; another node's are
/// not its; a released attachment is gone from them.
pub async fn attachments_are_read_back_with_their_attributes(objects: Arc<dyn ObjectStore>, run: &str) {
    let bench = Bench::new(objects, run, "10.251.5.0/29", 30).await;
    let (a, b) = (bench.agent(), bench.agent());
    let attributes = |container: &str| {
        BTreeMap::from([
            ("containerID".to_string(), container.to_string()),
            ("netns".to_string(), format!("/var/run/netns/{container}")),
        ])
    };
    let loaded = bench.pools.loaded();
    let mut held = BTreeMap::new();
    for h in 0..5 {
        let mut request = bench.request("a", &format!("a{h}"));
        request.attributes = attributes(&format!("ca{h}"));
        held.insert(request.handle.clone(), a.assign(&request, &loaded).await.expect("node a")[0].ip);
    }
    // Every block is a's now: b borrows.
    let mut request = bench.request("b", "b0");
    request.attributes = attributes("cb0");
    let borrowed = b.assign(&request, &loaded).await.expect("node b borrows")[0].clone();
    let blocks = bench.blocks().await;
    assert!(blocks.iter().all(|blk| blk.affinity.as_deref() == Some(bench.node("a").as_str())), "b claimed nothing");

    let restarted = bench.agent();
    for agent in [&a, &restarted] {
        let seen = agent.attachments(&bench.node("a")).await.expect("a's attachments");
        let got: BTreeMap<String, IpAddr> = seen.iter().map(|t| (t.handle.clone(), t.addresses[0].ip)).collect();
        assert_eq!(got, held, "a's attachments are its five handles, b's is not among them");
        for attachment in &seen {
            let h = attachment.handle.rsplit('-').next().expect("a handle");
            assert_eq!(attachment.attributes, attributes(&format!("c{h}")), "{}", attachment.handle);
            assert_eq!(attachment.namespace.as_deref(), Some("default"));
        }
    }
    for agent in [&b, &bench.agent()] {
        let seen = agent.attachments(&bench.node("b")).await.expect("b's attachments");
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(
            (seen[0].addresses.clone(), seen[0].attributes.clone()),
            (vec![borrowed.clone()], attributes("cb0"))
        );
    }

    // A repeated ADD keeps the address and records what it says now (here in a borrowed block), for every
    // agent that reads the node's attachments afterwards.
    let mut again = bench.request("b", "b0");
    again.attributes = attributes("cb0-again");
    assert_eq!(b.assign(&again, &loaded).await.expect("repeated ADD"), vec![borrowed.clone()]);
    for agent in [&b, &bench.agent()] {
        let seen = agent.attachments(&bench.node("b")).await.expect("b's attachments");
        assert_eq!((seen.len(), &seen[0].attributes), (1, &attributes("cb0-again")), "{seen:?}");
    }

    // Too much to carry for every address: refused, naming the limits.
    let mut request = bench.request("a", "big");
    request.attributes = BTreeMap::from([("netns".to_string(), "x".repeat(super::super::MAX_ATTRIBUTE_BYTES))]);
    let refused = a.assign(&request, &loaded).await;
    assert!(matches!(refused, Err(AllocError::Attributes { entries: 1, .. })), "{refused:?}");

    bench.release(&a, "a", "a0").await;
    let seen = a.attachments(&bench.node("a")).await.expect("a's attachments");
    assert!(seen.iter().all(|t| !t.handle.ends_with("-a0")) && seen.len() == 4, "released: {seen:?}");
    bench.release(&b, "b", "b0").await;
    assert!(b.attachments(&bench.node("b")).await.expect("b's").is_empty());
    for h in 1..5 {
        bench.release(&a, "a", &format!("a{h}")).await;
    }
    let config = bench.pools.loaded().config;
    a.release_empty_blocks(&bench.node("a"), &config).await.expect("give back");
    assert!(bench.blocks().await.is_empty(), "nothing left");
}

/// A node claims blocks as it fills them, a repeated request gets what the handle holds, and released
/// blocks go back to the pool once empty (not while an address is held).
pub async fn claims_assigns_and_gives_back(objects: Arc<dyn ObjectStore>, run: &str) {
    let bench = Bench::new(objects, run, "10.251.0.0/28", 30).await;
    let agent = bench.agent();
    let mut ips = Vec::new();
    for h in 0..5 {
        ips.push(bench.assign(&agent, "a", &format!("h{h}")).await.expect("assign"));
    }
    assert_eq!(ips.iter().collect::<BTreeSet<_>>().len(), 5, "five different addresses: {ips:?}");
    assert_eq!(bench.assign(&agent, "a", "h0").await.expect("again"), ips[0], "a repeated request");
    let blocks = bench.blocks().await;
    assert_eq!(blocks.len(), 2, "4 addresses a block: two claimed");
    assert!(blocks.iter().all(|b| b.affinity.as_deref() == Some(bench.node("a").as_str())));
    assert_eq!(Bench::allocated(&blocks).len(), 5);

    let config = bench.pools.loaded().config;
    assert_eq!(bench.release(&agent, "a", "h4").await, vec![ips[4]]);
    let node = bench.node("a");
    assert_eq!(agent.release_empty_blocks(&node, &config).await.expect("give back").len(), 1, "the emptied block");
    assert!(bench.release(&agent, "a", "h4").await.is_empty(), "a second release finds nothing");
    for (h, ip) in ips.iter().take(4).enumerate() {
        assert_eq!(bench.release(&agent, "a", &format!("h{h}")).await, vec![*ip]);
    }
    let mut grace = config.clone();
    grace.empty_block_grace_seconds = DEFAULT_EMPTY_BLOCK_GRACE_SECONDS;
    assert!(agent.release_empty_blocks(&node, &grace).await.expect("give back").is_empty(), "within the grace period");
    bench.now.fetch_add(DEFAULT_EMPTY_BLOCK_GRACE_SECONDS, Ordering::SeqCst);
    assert_eq!(agent.release_empty_blocks(&node, &grace).await.expect("give back").len(), 1, "after it");
    assert!(bench.blocks().await.is_empty(), "nothing left");
}

/// With its own blocks full a node borrows from another's (a borrower label marks it), is refused once
/// every address is taken or when strictAffinity forbids borrowing; a gone node's blocks stay, owned by
/// nobody, until their last address goes.
pub async fn borrows_and_respects_strict_affinity(objects: Arc<dyn ObjectStore>, run: &str) {
    let bench = Bench::new(objects, run, "10.251.1.0/29", 30).await;
    let (a, b) = (bench.agent(), bench.agent());
    for h in 0..5 {
        bench.assign(&a, "a", &format!("a{h}")).await.expect("node a");
    }
    for h in 0..3 {
        bench.assign(&b, "b", &format!("b{h}")).await.expect("node b borrows");
    }
    let blocks = bench.blocks().await;
    assert!(blocks.iter().all(|blk| blk.affinity.as_deref() == Some(bench.node("a").as_str())), "b claimed nothing");
    let full = bench.assign(&b, "b", "b3").await;
    assert!(matches!(full, Err(AllocError::Exhausted { .. })), "every address taken: {full:?}");
    let borrowed = b.node_blocks(&bench.node("b")).await.expect("b's blocks").1;
    assert_eq!(borrowed.len(), 1, "found by its borrower label");

    for h in 0..3 {
        assert_eq!(bench.release(&b, "b", &format!("b{h}")).await.len(), 1);
    }
    assert!(b.node_blocks(&bench.node("b")).await.expect("b's blocks").1.is_empty(), "borrower label gone");
    bench.pools.configure(|c| c.strict_affinity = true);
    let strict = bench.assign(&b, "b", "b4").await;
    assert!(
        matches!(&strict, Err(AllocError::Exhausted { detail, .. }) if detail.contains("strictAffinity")),
        "{strict:?}"
    );
    bench.pools.configure(|c| c.strict_affinity = false);

    // Node a is gone: its blocks lose their affinity and stay while its addresses are held.
    assert_eq!(a.release_node(&bench.node("a")).await.expect("release node").len(), 2);
    let blocks = bench.blocks().await;
    assert_eq!(blocks.len(), 2, "both still hold addresses");
    assert!(blocks.iter().all(|blk| blk.affinity.is_none()));
    for h in 0..5 {
        assert_eq!(bench.release(&a, "a", &format!("a{h}")).await.len(), 1, "released by its node's name");
    }
    let config = bench.pools.loaded().config;
    assert_eq!(b.release_unowned_blocks(&config).await.expect("give back").len(), 2, "empty and cooled down");
    assert!(bench.blocks().await.is_empty(), "an unowned block goes once empty");
}

/// A node missing from the live ones (its Node object deleted) for the grace period loses its addresses and
/// its claim on its blocks; one seen again in between starts over; a live node's address in a gone node's
/// block stays, and the block goes back once that is released too.
pub async fn gone_nodes_are_collected_after_their_grace(objects: Arc<dyn ObjectStore>, run: &str) {
    let bench = Bench::new(objects, run, "10.251.7.0/30", 30).await;
    let (a, b) = (bench.agent(), bench.agent());
    let mut held = BTreeSet::new();
    for h in ["a0", "a1"] {
        held.insert(bench.assign(&a, "a", h).await.expect("node a"));
    }
    let borrowed = bench.assign(&b, "b", "b0").await.expect("node b borrows");
    let config = bench.pools.loaded().config;
    let live = |nodes: &[&str]| nodes.iter().map(|n| bench.node(n)).collect::<BTreeSet<String>>();
    let mut absent = BTreeMap::new();
    let collector = bench.agent();
    // The grace on a clock of its own, moved by the check (the allocator's wall clock is not used for it).
    let start = std::time::Instant::now();
    let at = |seconds: u64| start + std::time::Duration::from_secs(seconds);
    let grace = std::time::Duration::from_secs(60);
    let me = bench.node("b");
    let pass = async |nodes: &[&str], absent: &mut BTreeMap<String, std::time::Instant>, now| {
        collector.collect_gone_nodes(&me, &live(nodes), absent, now, grace, &config).await.expect("a pass")
    };
    assert_eq!(pass(&["b"], &mut absent, at(0)).await, GoneNodes::default(), "missing, not yet gone");
    assert_eq!(pass(&["a", "b"], &mut absent, at(30)).await, GoneNodes::default(), "seen again");
    assert_eq!(pass(&["b"], &mut absent, at(31)).await, GoneNodes::default(), "missing again: the grace starts over");
    assert_eq!(pass(&["b"], &mut absent, at(90)).await, GoneNodes::default(), "59 s");
    let unknown = collector.collect_gone_nodes(&me, &BTreeSet::new(), &mut absent, at(1_000), grace, &config).await;
    assert!(matches!(unknown, Err(AllocError::NodesUnknown { named: 2 })), "no live node: refused: {unknown:?}");
    let mine = collector
        .collect_gone_nodes(&bench.node("a"), &live(&["b"]), &mut absent.clone(), at(91), grace, &config)
        .await;
    assert_eq!(mine.expect("a pass"), GoneNodes::default(), "the caller's own node is never gone");
    let collected = pass(&["b"], &mut absent, at(91)).await;
    assert_eq!(collected.nodes, live(&["a"]));
    assert_eq!(collected.addresses.iter().copied().collect::<BTreeSet<_>>(), held, "a's addresses");
    assert_eq!(collected.blocks.len(), 1, "a's block, owned by nobody now");
    assert!(collected.given_back.is_empty(), "b still holds {borrowed} in it");
    let blocks = bench.blocks().await;
    assert_eq!(Bench::allocated(&blocks).into_keys().collect::<Vec<_>>(), [borrowed], "b's address stays");

    bench.release(&b, "b", "b0").await;
    let collected = pass(&["b"], &mut absent, at(92)).await;
    assert_eq!((collected.nodes.len(), collected.given_back.len()), (0, 1), "the empty block goes back: {collected:?}");
    assert!(absent.is_empty(), "nothing names a any more: {absent:?}");
    assert!(bench.blocks().await.is_empty(), "nothing left");
}

/// The reuse cooldown holds when the block an address was released from has lost its owner: the block is not
/// given back (and cut again, the address free at once) while the address cools down. A claim in a pool with
/// no block left to cut adopts the block nobody owns once it has an address to give, with or without
/// strictAffinity.
pub async fn a_released_address_cools_down_in_a_block_nobody_owns(objects: Arc<dyn ObjectStore>, run: &str) {
    // A borrowed address released after its block's node went (one block of two addresses).
    let bench = Bench::new(Arc::clone(&objects), run, "10.251.6.0/31", 31).await;
    bench.pools.configure(|c| c.reuse_cooldown_seconds = 60);
    let (a, b, c) = (bench.agent(), bench.agent(), bench.agent());
    let mine = bench.assign(&a, "a", "a0").await.expect("node a claims");
    let x = bench.assign(&b, "b", "b0").await.expect("node b borrows");
    bench.release(&a, "a", "a0").await;
    assert_eq!(a.release_node(&bench.node("a")).await.expect("node a goes").len(), 1);
    bench.release(&b, "b", "b0").await;
    bench.now.fetch_add(1, Ordering::SeqCst);
    let early = bench.assign(&c, "c", "c0").await;
    assert!(matches!(early, Err(AllocError::Exhausted { .. })), "{x} and {mine} cool down: {early:?}");
    let config = bench.pools.loaded().config;
    assert!(c.release_unowned_blocks(&config).await.expect("give back").is_empty(), "not while cooling");
    bench.now.fetch_add(60, Ordering::SeqCst);
    let got = BTreeSet::from([
        bench.assign(&c, "c", "c0").await.expect("after the cooldown"),
        bench.assign(&c, "c", "c1").await.expect("after the cooldown"),
    ]);
    assert_eq!(got, BTreeSet::from([mine, x]), "both come back");
    let blocks = bench.blocks().await;
    assert_eq!(blocks[0].affinity.as_deref(), Some(bench.node("c").as_str()), "adopted: {blocks:?}");
    for h in ["c0", "c1"] {
        bench.release(&c, "c", h).await;
    }
    bench.now.fetch_add(1_000, Ordering::SeqCst);
    c.release_empty_blocks(&bench.node("c"), &config).await.expect("give back");
    assert!(bench.blocks().await.is_empty(), "nothing left");

    // A block already empty when its node went (one block of one address).
    for strict in [false, true] {
        let run = format!("{run}-{strict}");
        let bench = Bench::new(Arc::clone(&objects), &run, "10.251.6.7/32", 32).await;
        bench.pools.configure(|c| {
            c.reuse_cooldown_seconds = 60;
            c.strict_affinity = strict;
        });
        let (a, c) = (bench.agent(), bench.agent());
        let x = bench.assign(&a, "a", "a0").await.expect("node a claims");
        bench.release(&a, "a", "a0").await;
        a.release_node(&bench.node("a")).await.expect("node a goes");
        bench.now.fetch_add(1, Ordering::SeqCst);
        let early = bench.assign(&c, "c", "c0").await;
        assert!(matches!(early, Err(AllocError::Exhausted { .. })), "strict {strict}: {x} cools down: {early:?}");
        bench.now.fetch_add(60, Ordering::SeqCst);
        assert_eq!(bench.assign(&c, "c", "c0").await.expect("after the cooldown"), x, "strict {strict}");
        let blocks = bench.blocks().await;
        assert_eq!(blocks[0].affinity.as_deref(), Some(bench.node("c").as_str()), "strict {strict}: adopted");
        bench.release(&c, "c", "c0").await;
        bench.now.fetch_add(1_000, Ordering::SeqCst);
        let config = bench.pools.loaded().config;
        c.release_empty_blocks(&bench.node("c"), &config).await.expect("give back");
        assert!(bench.blocks().await.is_empty(), "nothing left");
    }
}

/// A pool deleted and re-created with another block size between reading it and claiming a block of it: the
/// claim is taken back and the request refused; the next request claims a block of the new size.
pub async fn a_pool_changed_under_a_claim_is_refused(objects: Arc<dyn ObjectStore>, run: &str) {
    let bench = Bench::new(objects, run, "10.251.2.0/28", 30).await;
    let agent = bench.agent();
    let before = bench.pools.loaded();
    bench.pools.set(vec![pool(run, "10.251.2.0/28", 29)]);
    let refused = agent.assign(&bench.request("a", "h0"), &before).await;
    assert!(matches!(refused, Err(AllocError::PoolChanged { .. })), "{refused:?}");
    assert!(bench.blocks().await.is_empty(), "the claim was taken back");
    let ip = bench.assign(&agent, "a", "h0").await.expect("assign against the pool as it is");
    let blocks = bench.blocks().await;
    assert_eq!(blocks.iter().map(|b| b.cidr.prefix_len()).collect::<Vec<_>>(), vec![29], "cut the new way");
    assert_eq!(bench.release(&agent, "a", "h0").await, vec![ip]);
    agent.release_empty_blocks(&bench.node("a"), &bench.pools.loaded().config).await.expect("give back");
    assert!(bench.blocks().await.is_empty());
}

/// A fixed address claims its block, is refused to a second handle while held, and is released by its
/// address only when it is still the allocation seen.
pub async fn fixed_addresses(objects: Arc<dyn ObjectStore>, run: &str) {
    let bench = Bench::new(objects, run, "10.251.3.0/28", 30).await;
    let agent = bench.agent();
    let ip: IpAddr = "10.251.3.5".parse().expect("an address");
    let loaded = bench.pools.loaded();
    let mut request = bench.request("a", "h0");
    request.requested.ips = vec![ip];
    let got = agent.assign(&request, &loaded).await.expect("fixed");
    assert_eq!((got[0].ip, got[0].block.to_string()), (ip, "10.251.3.4/30".to_string()));
    let mut second = bench.request("b", "h1");
    second.requested.ips = vec![ip];
    let refused = agent.assign(&second, &loaded).await;
    assert!(
        matches!(&refused, Err(AllocError::AddressUnavailable { reason, .. }) if reason.contains("in use")),
        "{refused:?}"
    );
    let seen = bench.blocks().await[0].allocation(ip).cloned().expect("allocated");
    let stale = agent.release_ip(ip, Some((seen.sequence + 1, &seen.handle))).await;
    assert!(matches!(stale, Err(AllocError::Reassigned { .. })), "{stale:?}");
    let released = agent.release_ip(ip, Some((seen.sequence, &seen.handle))).await.expect("release");
    assert_eq!(released.map(|a| a.handle), Some(seen.handle));
    agent.release_empty_blocks(&bench.node("a"), &loaded.config).await.expect("give back");
    assert!(bench.blocks().await.is_empty());
}

/// Three nodes' agents assigning and releasing at once (twelve at a time) over a pool of 64 addresses in
/// blocks of 8: no address is ever held twice, every handle finds what it was given, and once everything
/// is released every block goes back.
pub async fn concurrent_nodes_never_share_an_address(objects: Arc<dyn ObjectStore>, run: &str) {
    let bench = Arc::new(Bench::new(objects, run, "10.251.4.0/26", 29).await);
    let agents: Vec<BlockAllocator> = (0..3).map(|_| bench.agent()).collect();
    let mut workers = Vec::new();
    for w in 0..12_u64 {
        let (bench, agent) = (Arc::clone(&bench), agents[(w % 3) as usize].clone());
        workers.push(tokio::spawn(async move {
            let node = format!("n{}", w % 3);
            let mut seed = w.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut random = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let mut held: Vec<(String, IpAddr)> = Vec::new();
            for op in 0..24 {
                if held.is_empty() || random() % 3 != 0 {
                    let handle = format!("w{w}-{op}");
                    match bench.assign(&agent, &node, &handle).await {
                        Ok(ip) => held.push((handle, ip)),
                        Err(AllocError::Exhausted { .. }) => {}
                        Err(e) => panic!("assign {handle}: {e}"),
                    }
                } else {
                    let (handle, ip) = held.remove((random() % held.len() as u64) as usize);
                    assert_eq!(bench.release(&agent, &node, &handle).await, vec![ip], "{handle} released");
                }
            }
            (node, held)
        }));
    }
    let mut held = Vec::new();
    for worker in workers {
        held.push(worker.await.expect("a worker"));
    }
    let allocated = Bench::allocated(&bench.blocks().await);
    let live: BTreeMap<IpAddr, String> =
        held.iter().flat_map(|(_, h)| h.iter().map(|(handle, ip)| (*ip, format!("{run}-{handle}")))).collect();
    assert_eq!(allocated, live, "exactly what the workers hold is allocated, each address once");
    for (node, handles) in &held {
        let agent = &agents[0];
        for (handle, ip) in handles {
            assert_eq!(bench.release(agent, node, handle).await, vec![*ip]);
        }
    }
    give_back_all(&bench, &agents).await;
}

/// One step of a random sequence.
#[derive(Clone, Debug)]
pub enum Op {
    /// Assign for handle `h<handle>` on node `handle % 3`, in a namespace bound to the `bound` pool or not.
    Assign {
        /// Which handle.
        handle: u8,
        /// Whether the namespace names the bound pool.
        bound_namespace: bool,
    },
    /// Release a handle (on its node).
    ReleaseHandle {
        /// Which handle.
        handle: u8,
    },
    /// Release one held address by itself, picked among those held.
    ReleaseIp {
        /// Which one, modulo how many are held.
        pick: usize,
    },
    /// Give back a node's empty blocks.
    ReleaseEmptyBlocks {
        /// Which node.
        node: u8,
    },
    /// A node is gone: its blocks lose their affinity.
    ReleaseNode {
        /// Which node.
        node: u8,
    },
    /// Time passes.
    Advance {
        /// How many seconds.
        seconds: u8,
    },
}

/// The pools and configuration one sequence runs with.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// The open pool's block size, 28-32 (the pool is a /27).
    pub open_block: u8,
    /// The bound pool's block size, 29-32 (the pool is a /28, bound to namespace `team-b`).
    pub bound_block: u8,
    /// The IPv6 pool's block size, 125-128 (the pool is a /124).
    pub v6_block: u8,
    /// strictAffinity.
    pub strict: bool,
    /// reuseCooldownSeconds.
    pub cooldown: u8,
}

/// The check `block_allocator_tests!` runs: a few sequences from fixed seeds (the property test of
/// `agent/tests/ipam_properties.rs` draws many more, and shrinks).
pub async fn random_sequences_keep_every_invariant(objects: Arc<dyn ObjectStore>, run: &str) {
    for seed in 1..=6 {
        let (shape, ops) = random_case(seed);
        keeps_every_invariant(Arc::clone(&objects), &format!("{run}-{seed}"), shape, ops).await;
    }
}

/// A sequence of up to 60 steps and its shape, drawn from `seed`.
pub fn random_case(seed: u64) -> (Shape, Vec<Op>) {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move |below: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % below
    };
    let small = |n: u64| u8::try_from(n).unwrap_or(u8::MAX);
    let shape = Shape {
        open_block: 28 + small(next(5)),
        bound_block: 29 + small(next(4)),
        v6_block: 125 + small(next(4)),
        strict: next(2) == 0,
        cooldown: if next(2) == 0 { 0 } else { 15 },
    };
    let len = 1 + next(60);
    let ops = (0..len)
        .map(|_| match next(12) {
            0..=4 => Op::Assign { handle: small(next(24)), bound_namespace: next(2) == 0 },
            5 | 6 => Op::ReleaseHandle { handle: small(next(24)) },
            7 => Op::ReleaseIp { pick: usize::try_from(next(1 << 16)).unwrap_or(0) },
            8 => Op::ReleaseEmptyBlocks { node: small(next(3)) },
            9 => Op::ReleaseNode { node: small(next(3)) },
            _ => Op::Advance { seconds: small(next(40)) },
        })
        .collect();
    (shape, ops)
}

/// Run `ops` against a model of who should hold what, checking after every step that no address is held
/// twice, blocks never overlap and carry the labels of what they hold, used + free is conserved, release
/// undoes assign, no address is handed out again inside its cooldown, the store holds exactly the model and
/// `ipam check` finds nothing; then release
/// everything and check every block went back.
pub async fn keeps_every_invariant(objects: Arc<dyn ObjectStore>, run: &str, shape: Shape, ops: Vec<Op>) {
    let (open, bound, six) = (format!("{run}-open"), format!("{run}-bound"), format!("{run}-six"));
    let mut bound_pool = pool(&bound, "10.251.9.0/28", shape.bound_block);
    bound_pool.spec.allowed_namespaces = vec!["team-b".to_string()];
    let pools =
        vec![pool(&open, "10.251.8.0/27", shape.open_block), bound_pool, pool(&six, "fd00:251::/124", shape.v6_block)];
    let bench = Bench::with_pools(objects, run, pools).await;
    bench.pools.configure(|c| {
        c.strict_affinity = shape.strict;
        c.reuse_cooldown_seconds = u64::from(shape.cooldown);
        c.empty_block_grace_seconds = 30;
    });
    let agents: Vec<BlockAllocator> = (0..3).map(|_| bench.agent()).collect();
    let node_of = |handle: u8| usize::from(handle % 3);
    let full = |handle: u8| format!("{run}-h{handle}");
    let mut model: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    // When each address was last released, to check its cooldown.
    let mut released_at: BTreeMap<IpAddr, u64> = BTreeMap::new();
    let now = || bench.now.load(Ordering::SeqCst);
    for op in ops {
        match op {
            Op::Assign { handle, bound_namespace } => {
                let n = node_of(handle);
                let mut request = bench.request(&format!("n{n}"), &format!("h{handle}"));
                request.pod = Some(PodInfo { name: format!("h{handle}"), annotations: BTreeMap::new() });
                request.namespace = if bound_namespace {
                    let mut ns = NamespaceInfo::bare("team-b");
                    ns.annotations.insert(ANNOTATION_IPV4_POOLS.to_string(), format!("[\"{bound}\"]"));
                    ns
                } else {
                    NamespaceInfo::bare("team-a")
                };
                match agents[n].assign(&request, &bench.pools.loaded()).await {
                    Ok(got) => {
                        let ips: BTreeSet<IpAddr> = got.iter().map(|a| a.ip).collect();
                        if let Some(before) = model.get(&request.handle) {
                            assert_eq!(&ips, before, "a repeated assign for {} returns the same", request.handle);
                            continue;
                        }
                        for a in &got {
                            let want = if a.ip.is_ipv6() {
                                &six
                            } else if bound_namespace {
                                &bound
                            } else {
                                &open
                            };
                            assert_eq!(&a.pool, want, "{} for {}", a.ip, request.handle);
                            if let Some(at) = released_at.get(&a.ip) {
                                assert!(
                                    now() >= at + u64::from(shape.cooldown),
                                    "{} handed to {} {}s after its release, inside the cooldown",
                                    a.ip,
                                    request.handle,
                                    now() - at
                                );
                            }
                            assert!(
                                model.values().all(|held| !held.contains(&a.ip)),
                                "{} handed to {} while held",
                                a.ip,
                                request.handle
                            );
                        }
                        model.insert(request.handle, ips);
                    }
                    Err(AllocError::Exhausted { .. }) => {
                        assert!(!model.contains_key(&request.handle), "a held handle's repeat cannot be exhausted");
                    }
                    Err(other) => panic!("assign {}: {other}", request.handle),
                }
            }
            Op::ReleaseHandle { handle } => {
                let node = bench.node(&format!("n{}", node_of(handle)));
                let released: BTreeSet<IpAddr> = agents[node_of(handle)]
                    .release_handle(&node, &full(handle))
                    .await
                    .expect("release")
                    .into_iter()
                    .collect();
                released_at.extend(released.iter().map(|ip| (*ip, now())));
                assert_eq!(released, model.remove(&full(handle)).unwrap_or_default(), "release undoes assign");
            }
            Op::ReleaseIp { pick } => {
                let all: Vec<(String, IpAddr)> =
                    model.iter().flat_map(|(h, ips)| ips.iter().map(move |ip| (h.clone(), *ip))).collect();
                if all.is_empty() {
                    continue;
                }
                let (handle, ip) = &all[pick % all.len()];
                let allocation = agents[0].release_ip(*ip, None).await.expect("release").expect("held is allocated");
                assert_eq!(&allocation.handle, handle);
                released_at.insert(*ip, now());
                let held = model.get_mut(handle).expect("held");
                held.remove(ip);
                if held.is_empty() {
                    model.remove(handle);
                }
            }
            Op::ReleaseEmptyBlocks { node } => {
                let name = bench.node(&format!("n{node}"));
                let config = bench.pools.loaded().config;
                agents[usize::from(node)].release_empty_blocks(&name, &config).await.expect("give back");
            }
            Op::ReleaseNode { node } => {
                // The node is gone: the collector releases its blocks, then gives back those nobody owns.
                agents[usize::from(node)].release_node(&bench.node(&format!("n{node}"))).await.expect("release node");
                let config = bench.pools.loaded().config;
                agents[0].release_unowned_blocks(&config).await.expect("give back unowned");
            }
            Op::Advance { seconds } => {
                bench.now.fetch_add(u64::from(seconds), Ordering::SeqCst);
            }
        }
        let blocks = bench.blocks().await;
        let mut stored: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        for block in &blocks {
            assert_eq!(
                u128::from(block.used() + block.free_count()),
                prefix_size(block.cidr),
                "{} conserves",
                block.cidr
            );
            for (ip, a) in block.allocated() {
                assert!(stored.entry(a.handle.clone()).or_default().insert(ip), "{ip} twice");
            }
        }
        assert_eq!(stored, model, "the store holds exactly what the model says");
        let mut snapshot = agents[0].snapshot().await.expect("snapshot");
        snapshot.blocks.retain(|b| blocks.contains(b));
        snapshot.affinities.retain(|a| blocks.iter().any(|b| b.cidr == a.cidr));
        snapshot.handles.retain(|h| h.handle.starts_with(run));
        let problems = check(&snapshot);
        assert!(problems.is_empty(), "ipam check: {problems:?}");
    }
    for handle in model.keys() {
        let h: u8 = handle.rsplit_once("-h").and_then(|(_, n)| n.parse().ok()).expect("a handle of the model");
        agents[node_of(h)].release_handle(&bench.node(&format!("n{}", node_of(h))), handle).await.expect("release");
    }
    bench.now.fetch_add(1_000, Ordering::SeqCst);
    give_back_all(&bench, &agents).await;
}

/// Give back every node's empty blocks until none is left. A node gives back what its view shows empty, and
/// its view may not have seen another agent's last release yet (the next pass gives that block back): a
/// few passes, bounded, as the agents' maintenance would make.
async fn give_back_all(bench: &Bench, agents: &[BlockAllocator]) {
    let config = bench.pools.loaded().config;
    for _ in 0..50 {
        for (n, agent) in agents.iter().enumerate() {
            agent.release_empty_blocks(&bench.node(&format!("n{n}")), &config).await.expect("give back");
        }
        agents[0].release_unowned_blocks(&config).await.expect("give back unowned");
        if bench.blocks().await.is_empty() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let left = bench.blocks().await;
    panic!("releasing everything gives every block back: {left:?}");
}

/// Every block of the store, after checking the design's invariants on them (see [`checked`]).
pub async fn checked_blocks(objects: &dyn ObjectStore) -> Vec<Block> {
    checked(&objects.list(Kind::Block, &Labels::new()).await.expect("list blocks").0)
}

/// The blocks `objects` hold, after checking every invariant of the design on them: each block whole (every
/// address allocated or free, once), its labels what it holds, no two overlapping, no handle with two
/// addresses of one family.
pub fn checked(objects: &[crate::objects::Object]) -> Vec<Block> {
    let mut blocks = Vec::new();
    for object in objects {
        let stored = super::decode(object).expect("a block");
        assert!(stored.block.is_consistent(), "{}: an address both allocated and free, or missing", object.name);
        assert_eq!(object.labels, labels_of(&stored.block), "{}: labels differ from what it holds", object.name);
        blocks.push(stored.block);
    }
    for (i, a) in blocks.iter().enumerate() {
        for b in &blocks[i + 1..] {
            assert!(!a.cidr.contains(&b.cidr.network()) && !b.cidr.contains(&a.cidr.network()), "{a:?} {b:?}");
        }
    }
    let mut families = BTreeSet::new();
    for block in &blocks {
        for (ip, allocation) in block.allocated() {
            assert!(
                families.insert((allocation.handle.clone(), ip.is_ipv6())),
                "{} holds two addresses",
                allocation.handle
            );
        }
    }
    blocks
}
