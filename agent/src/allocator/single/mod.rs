//! The allocator of `docs/allocator-single-object.md`: every step is one compare-and-swap on one block object
//! of an [`ObjectStore`], so it runs on the Kubernetes API (which has nothing wider) as on etcd and the
//! embedded store.
//!
//! A block object holds its affinity and every allocation (handle, node, namespace, pod, sequence). Claim is a
//! create (the ADD's allocation already in it), assign and borrow are an update of one block, release is an
//! update of each block holding the handle, and giving back is a delete at the version read. Labels
//! (`poolwarden.io/pool`, `poolwarden.io/affinity`, `borrower.poolwarden.io/<node>`) are written with the
//! block they describe, from its contents, so a node finds its blocks by label and never reads the cluster's.
//! Labels only narrow a search: what a block holds is decided by its spec.
//!
//! Crash safety (the design's invariant 3): a process killed between two steps leaves nothing, an
//! allocation whose interface was never made, an empty block, or a claim whose pool changed meanwhile; no
//! address is ever held twice, since every address lives in exactly one block object and every write of that
//! object names the version it read.

pub mod conformance;
pub mod view;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use ipnet::IpNet;

use self::view::NodeView;
use super::{
    AllocError, AssignRequest, Assigned, Clock, Loaded, Locks, MAX_ATTEMPTS, belongs, pool_names, system_clock,
};
use crate::{
    catalog::Catalog,
    ipam::{self, Affinity, Allocation, Block, BlockError, HandleRecord, Owner, check::Snapshot},
    objects::{Kind, Labels, Object, ObjectError, ObjectStore, label_value},
    resources::{IpPool, IpamConfigSpec},
};

pub use crate::objects::{AFFINITY_LABEL, BORROWER_PREFIX, POOL_LABEL, UNOWNED_LABEL};

/// Where the allocator reads the pools and the IPAM configuration: the datastore's catalog, or the resources
/// on Kubernetes.
#[async_trait]
pub trait PoolSource: Send + Sync {
    /// The pools and the configuration as they are now.
    async fn load(&self) -> Result<Loaded, AllocError>;
}

#[async_trait]
impl PoolSource for Catalog {
    async fn load(&self) -> Result<Loaded, AllocError> {
        let pools = self.pools().await?.into_iter().map(|(p, _)| p).collect();
        let config = self.config().await?.0.spec;
        Ok(Loaded { pools, config })
    }
}

/// A pool or node name as a label value: itself when Kubernetes takes it (up to 63 characters), else a
/// stable digest of it. Either way the block's spec holds the full name, which is what decides.
pub fn label_for(name: &str) -> String {
    if !name.is_empty() && label_value(name) {
        return name.to_string();
    }
    // FNV-1a, 64 bits: stable across builds and platforms (unlike std's hasher).
    let digest = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("h-{digest:016x}")
}

/// A block's object name: its address parts and prefix joined by `-` (`10-80-0-0-29`; IPv6 with all eight
/// groups, `fd00-0-0-0-0-0-0-0-120`), a DNS subdomain for every CIDR, and never the same for two.
pub fn block_name(cidr: IpNet) -> String {
    let parts: Vec<String> = match cidr {
        IpNet::V4(n) => n.network().octets().iter().map(u8::to_string).collect(),
        IpNet::V6(n) => n.network().segments().iter().map(|s| format!("{s:x}")).collect(),
    };
    format!("{}-{}", parts.join("-"), cidr.prefix_len())
}

/// The labels a block carries, from what it holds.
pub fn labels_of(block: &Block) -> Labels {
    let mut labels = Labels::from([(POOL_LABEL.to_string(), label_for(&block.pool))]);
    match &block.affinity {
        Some(node) => labels.insert(AFFINITY_LABEL.to_string(), label_for(node)),
        None => labels.insert(UNOWNED_LABEL.to_string(), "true".to_string()),
    };
    for (_, allocation) in block.allocated() {
        if block.affinity.as_deref() != Some(allocation.node.as_str()) {
            labels.insert(borrower_label(&allocation.node), String::new());
        }
    }
    labels
}

fn borrower_label(node: &str) -> String {
    format!("{BORROWER_PREFIX}{}", label_for(node))
}

/// Step boundaries a test can stop the process at, to check that a process killed between any two steps
/// leaves a state the design allows (invariant 3). The hook exists only with the `fault-injection` feature,
/// which only the test crate enables: a release build has none.
pub mod faults {
    /// Every boundary, after the write it names: a claim's create, its confirmation, an assignment in an
    /// owned block, a borrow, one block of a release, an empty block given back, a gone node's block.
    pub const POINTS: &[&str] =
        &["claim-created", "claim-confirmed", "assigned", "borrowed", "released-one", "given-back", "node-released"];

    #[cfg(feature = "fault-injection")]
    static ARMED: std::sync::Mutex<Option<&'static str>> = std::sync::Mutex::new(None);

    /// Make the process kill itself (SIGKILL: nothing after the step runs, no destructor, as `kill -9`) when
    /// it next reaches `point`.
    #[cfg(feature = "fault-injection")]
    pub fn arm(point: &'static str) {
        *ARMED.lock().unwrap_or_else(|p| p.into_inner()) = Some(point);
    }

    #[inline]
    pub(super) fn reached(point: &'static str) {
        #[cfg(feature = "fault-injection")]
        if *ARMED.lock().unwrap_or_else(|p| p.into_inner()) == Some(point) {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        let _ = point;
    }
}

/// An attachment as a node's blocks hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// Its handle.
    pub handle: String,
    /// The pod's namespace, when known.
    pub namespace: Option<String>,
    /// The pod's name, when known.
    pub pod: Option<String>,
    /// Its addresses, in address order.
    pub addresses: Vec<Assigned>,
    /// What its ADD recorded with them.
    pub attributes: BTreeMap<String, String>,
}

/// A block as read, with the version a write of it must name.
#[derive(Clone, Debug)]
pub struct Stored {
    /// The block.
    pub block: Block,
    /// Its object's version.
    pub version: String,
}

pub(crate) fn decode(object: &Object) -> Result<Stored, ObjectError> {
    let corrupt =
        |message: String| ObjectError::Corrupt { kind: Kind::Block.name(), name: object.name.clone(), message };
    let block: Block = serde_json::from_value(object.spec.clone()).map_err(|e| corrupt(e.to_string()))?;
    if block_name(block.cidr) != object.name {
        return Err(corrupt(format!("it holds block {}, whose name is {}", block.cidr, block_name(block.cidr))));
    }
    Ok(Stored { block, version: object.version.clone() })
}

pub(crate) fn encode(block: &Block) -> serde_json::Value {
    serde_json::to_value(block).unwrap_or_default()
}

/// Allocates and releases addresses in block objects.
#[derive(Clone)]
pub struct BlockAllocator {
    objects: Arc<dyn ObjectStore>,
    pools: Arc<dyn PoolSource>,
    clock: Clock,
    locks: Arc<Locks>,
    views: Arc<Mutex<HashMap<String, Arc<NodeView>>>>,
}

impl BlockAllocator {
    /// An allocator on `objects` reading pools from `pools`, on the wall clock.
    pub fn new(objects: Arc<dyn ObjectStore>, pools: Arc<dyn PoolSource>) -> Self {
        Self::with_clock(objects, pools, system_clock())
    }

    /// The allocator of a key-value datastore (etcd, embedded): its block objects, the pools of its catalog.
    pub fn of_store(store: Arc<dyn crate::store::Store>) -> Self {
        Self::new(Arc::new(crate::objects::kv::KeyValueObjects::new(Arc::clone(&store))), Arc::new(Catalog::new(store)))
    }

    /// An allocator with an injected clock.
    pub fn with_clock(objects: Arc<dyn ObjectStore>, pools: Arc<dyn PoolSource>, clock: Clock) -> Self {
        Self { objects, pools, clock, locks: Arc::default(), views: Arc::default() }
    }

    /// The pools and configuration, read now.
    pub async fn load(&self) -> Result<Loaded, AllocError> {
        self.pools.load().await
    }

    async fn selected(&self, selector: Labels) -> Result<Vec<Stored>, AllocError> {
        let (objects, _) = self.objects.list(Kind::Block, &selector).await?;
        Ok(objects.iter().map(decode).collect::<Result<_, _>>()?)
    }

    /// The view of `node`'s blocks, started on first use.
    fn view(&self, node: &str) -> Arc<NodeView> {
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        let view = views.entry(node.to_string()).or_insert_with(|| {
            let [owned, borrowed] = node_selectors(node);
            Arc::new(NodeView::start(&self.objects, owned, borrowed))
        });
        Arc::clone(view)
    }

    fn views(&self) -> Vec<Arc<NodeView>> {
        self.views.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// The blocks `node` owns, and those it holds addresses in without owning them, from its view (no read
    /// of the store once the view has listed them).
    pub async fn node_blocks(&self, node: &str) -> Result<(Vec<Stored>, Vec<Stored>), AllocError> {
        let (owned, borrowed) = self.view(node).blocks().await?;
        Ok(mine(node, owned, borrowed))
    }

    /// The blocks `node` owns and those it borrowed from, read from the store now (for another node's
    /// collector: no view of that node is started).
    pub async fn node_blocks_now(&self, node: &str) -> Result<(Vec<Stored>, Vec<Stored>), AllocError> {
        self.node_blocks_read(node).await
    }

    /// [`BlockAllocator::node_blocks`] read from the store, not the view (and put into the views).
    async fn node_blocks_read(&self, node: &str) -> Result<(Vec<Stored>, Vec<Stored>), AllocError> {
        let [owned, borrowed] = node_selectors(node);
        let (owned, borrowed) = (self.read_selected(&owned).await?, self.read_selected(&borrowed).await?);
        Ok(mine(node, owned, borrowed))
    }

    /// The blocks `selector` selects, read from the store (and put into the views).
    async fn read_selected(&self, selector: &Labels) -> Result<Vec<Stored>, AllocError> {
        let (objects, _) = self.objects.list(Kind::Block, selector).await?;
        objects
            .iter()
            .map(|object| {
                self.written(object);
                Ok(decode(object)?)
            })
            .collect()
    }

    /// Tell every view what this process wrote.
    fn written(&self, object: &Object) {
        for view in self.views() {
            view.written(object);
        }
    }

    /// Every block carrying `pool`'s name (of this pool or of a deleted one of the same name).
    async fn named_blocks(&self, pool: &str) -> Result<Vec<Stored>, AllocError> {
        let blocks = self.selected(Labels::from([(POOL_LABEL.to_string(), label_for(pool))])).await?;
        Ok(blocks.into_iter().filter(|s| s.block.pool == pool).collect())
    }

    /// Every block (for `ipam check` and tests: cluster-sized).
    pub async fn blocks(&self) -> Result<Vec<Block>, AllocError> {
        Ok(self.selected(Labels::new()).await?.into_iter().map(|s| s.block).collect())
    }

    /// Everything `ipam check` looks at, with the affinities and handles derived from the blocks (they are
    /// not stored apart in this model) and no node list (nobody is called leaked).
    pub async fn snapshot(&self) -> Result<Snapshot, AllocError> {
        let pools = self.pools.load().await?.pools;
        let blocks = self.blocks().await?;
        let affinities =
            blocks.iter().filter_map(|b| Some(Affinity { node: b.affinity.clone()?, cidr: b.cidr })).collect();
        let mut handles: BTreeMap<String, HandleRecord> = BTreeMap::new();
        for block in &blocks {
            for (_, allocation) in block.allocated() {
                let record = handles
                    .entry(allocation.handle.clone())
                    .or_insert_with(|| HandleRecord { handle: allocation.handle.clone(), ..Default::default() });
                *record.blocks.entry(block.cidr).or_default() += 1;
            }
        }
        Ok(Snapshot { pools, blocks, affinities, handles: handles.into_values().collect(), nodes: BTreeSet::new() })
    }

    async fn get(&self, cidr: IpNet) -> Result<Option<Stored>, AllocError> {
        Ok(self.objects.get(Kind::Block, &block_name(cidr)).await?.as_ref().map(decode).transpose()?)
    }

    /// Write `block` over `stored` (one read at `stored.version`). Returns false when the object changed or
    /// went since it was read.
    async fn write(&self, stored: &Stored, block: &Block) -> Result<bool, AllocError> {
        self.commit(stored, Some(block)).await
    }

    /// Delete the block `stored` holds, at the version read (a block used meanwhile stays). Returns false
    /// when it changed or went since it was read.
    async fn delete(&self, stored: &Stored) -> Result<bool, AllocError> {
        self.commit(stored, None).await
    }

    async fn commit(&self, stored: &Stored, block: Option<&Block>) -> Result<bool, AllocError> {
        let name = block_name(stored.block.cidr);
        let result = match block {
            None => self.objects.delete(Kind::Block, &name, &stored.version).await.map(|()| None),
            Some(block) => {
                let object = Object {
                    name: name.clone(),
                    labels: labels_of(block),
                    spec: encode(block),
                    version: stored.version.clone(),
                };
                self.objects.update(Kind::Block, &object).await.map(Some)
            }
        };
        match result {
            Ok(Some(object)) => self.written(&object),
            // Deleted at the version read: a view holding a later one holds a block created since.
            Ok(None) => self.views().iter().for_each(|v| v.deleted(&name, &stored.version)),
            Err(ObjectError::Conflict { .. } | ObjectError::NotFound { .. }) => {
                // The views were behind (or ahead): read this block again before the caller retries.
                match self.objects.get(Kind::Block, &name).await? {
                    Some(object) => self.written(&object),
                    None => self.views().iter().for_each(|v| v.deleted(&name, &stored.version)),
                }
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(true)
    }

    /// Create a claimed block; false when another claim took its name first.
    async fn create(&self, block: &Block) -> Result<Option<Object>, AllocError> {
        match self.objects.create(Kind::Block, &block_name(block.cidr), labels_of(block), encode(block)).await {
            Ok(object) => {
                self.written(&object);
                Ok(Some(object))
            }
            Err(ObjectError::AlreadyExists { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The addresses `handle` holds on `node`, or `None` if it holds none. The view says which blocks hold
    /// it; those are read again from the store (one read each), since another process may have released an
    /// address since (`ipam release`, a collector): a repeated ADD must not be answered with an address that
    /// is free again.
    pub async fn addresses_of(&self, node: &str, handle: &str) -> Result<Option<Vec<Assigned>>, AllocError> {
        let (owned, borrowed) = self.node_blocks(node).await?;
        let mut confirmed = Vec::new();
        for stored in owned.iter().chain(&borrowed).filter(|s| s.block.holds(handle)) {
            let name = block_name(stored.block.cidr);
            match self.objects.get(Kind::Block, &name).await? {
                Some(object) => {
                    self.written(&object);
                    confirmed.push(decode(&object)?);
                }
                None => self.views().iter().for_each(|v| v.deleted(&name, &stored.version)),
            }
        }
        let held = holdings(&confirmed, handle);
        Ok((!held.is_empty()).then_some(held))
    }

    /// Every attachment `node` holds addresses for, from its view (its own blocks and those it borrowed from;
    /// no read of the store once the view has listed them): the derived endpoint index of the design, which an
    /// agent restarting rebuilds its kernel state from. An attachment's attributes are those of its first
    /// address (an ADD writes the same to each).
    pub async fn attachments(&self, node: &str) -> Result<Vec<Attachment>, AllocError> {
        self.attachments_of(node, None).await
    }

    /// `node`'s attachment `handle`, as [`BlockAllocator::attachments`] reads it, from the blocks holding it
    /// only (a DEL's lookup).
    pub async fn attachment(&self, node: &str, handle: &str) -> Result<Option<Attachment>, AllocError> {
        Ok(self.attachments_of(node, Some(handle)).await?.pop())
    }

    async fn attachments_of(&self, node: &str, handle: Option<&str>) -> Result<Vec<Attachment>, AllocError> {
        let (owned, borrowed) = self.node_blocks(node).await?;
        let mut found: BTreeMap<String, Attachment> = BTreeMap::new();
        for stored in owned.iter().chain(&borrowed).filter(|s| handle.is_none_or(|h| s.block.holds(h))) {
            let block = &stored.block;
            let wanted = |a: &Allocation| a.node == node && handle.is_none_or(|h| a.handle == h);
            for (ip, allocation) in block.allocated().filter(|(_, a)| wanted(a)) {
                let attachment = found.entry(allocation.handle.clone()).or_insert_with(|| Attachment {
                    handle: allocation.handle.clone(),
                    namespace: allocation.namespace.clone(),
                    pod: allocation.pod.clone(),
                    addresses: Vec::new(),
                    attributes: allocation.attributes.clone(),
                });
                attachment.addresses.push(Assigned { ip, pool: block.pool.clone(), block: block.cidr });
            }
        }
        let mut all: Vec<Attachment> = found.into_values().collect();
        for attachment in &mut all {
            attachment.addresses.sort_by_key(|a| a.ip);
        }
        Ok(all)
    }

    /// Assign addresses for a pod: one per family whose pools admit it, or exactly the fixed addresses asked
    /// for, with the pools and configuration as `loaded`. Idempotent per handle; if any family fails,
    /// nothing stays allocated.
    pub async fn assign(&self, request: &AssignRequest, loaded: &Loaded) -> Result<Vec<Assigned>, AllocError> {
        let node = request.node.name.as_str();
        super::check_attributes(&request.handle, &request.attributes)?;
        // One ADD at a time per node in this process: the node's blocks are written by its own agent, so its
        // requests would otherwise only conflict with each other.
        let lock = self.locks.get(format!("node/{node}"));
        let _turn = lock.lock().await;
        if let Some(existing) = self.addresses_of(node, &request.handle).await? {
            // A repeated ADD: the addresses stay, and what it recorded is what this one says (another host
            // interface or bridge port, or a record an older version never wrote).
            self.record_attributes(node, &request.handle, &request.attributes).await?;
            return Ok(existing);
        }
        let selection = ipam::selection::select(
            &loaded.pools,
            &request.node,
            &request.namespace,
            request.pod.as_ref(),
            &request.requested,
        )?;
        let owner = Owner {
            handle: request.handle.clone(),
            node: node.to_string(),
            namespace: Some(request.namespace.name.clone()),
            pod: request.pod.as_ref().map(|p| p.name.clone()),
            attributes: request.attributes.clone(),
        };
        let mut done = Vec::new();
        let result = async {
            for (ip, pool) in &selection.ips {
                if let Some(eligible) = &request.eligible
                    && !eligible.allows(*ip, pool.cidr())
                {
                    return Err(AllocError::AddressUnavailable {
                        ip: *ip,
                        reason:
                            "it is outside the configured range, or the subnet's network, broadcast or gateway address"
                                .into(),
                    });
                }
                done.push(self.assign_fixed(&owner, *ip, pool, &loaded.config).await?);
            }
            for (family, pools) in [("IPv4", &selection.ipv4), ("IPv6", &selection.ipv6)] {
                if !pools.is_empty() {
                    done.push(
                        self.assign_auto(&owner, family, pools, &loaded.config, request.eligible.as_ref()).await?,
                    );
                }
            }
            Ok(())
        }
        .await;
        if let Err(err) = result {
            if !done.is_empty() {
                // Roll back the families that succeeded; the original error is what the caller must see.
                let _ = self.release_handle_locked(node, &request.handle).await;
            }
            return Err(err);
        }
        Ok(done)
    }

    async fn assign_auto(
        &self,
        owner: &Owner,
        family: &'static str,
        pools: &[&IpPool],
        config: &IpamConfigSpec,
        eligible: Option<&Arc<ipam::Eligible>>,
    ) -> Result<Assigned, AllocError> {
        let cooldown = config.reuse_cooldown_seconds;
        let take = |block: &mut Block, pool: &IpPool, now: u64| match eligible {
            None => block.assign_next(owner, now, cooldown),
            Some(eligible) => block.assign_next_where(owner, now, cooldown, |ip| eligible.allows(ip, pool.cidr())),
        };
        let exhausted = |detail: String| AllocError::Exhausted {
            family,
            pools: pool_names(pools),
            node: owner.node.clone(),
            detail,
        };
        let mut lost = BTreeSet::new();
        'attempt: for _ in 0..MAX_ATTEMPTS {
            let now = (self.clock)();
            // 1. A block this node owns with room, in the pools' order of preference.
            let (owned, _) = self.node_blocks(&owner.node).await?;
            for pool in pools {
                for stored in owned.iter().filter(|s| belongs(&s.block, pool)) {
                    let mut block = stored.block.clone();
                    let Some(ip) = take(&mut block, pool, now) else { continue };
                    if !self.write(stored, &block).await? {
                        continue 'attempt;
                    }
                    faults::reached("assigned");
                    return Ok(Assigned { ip, pool: pool.name().to_string(), block: block.cidr });
                }
            }
            // 2. Claim a block: create it with this allocation in it. Another node creating the same block
            //    first makes the create fail, and this node chooses again.
            let at_limit = config.max_blocks_per_host > 0 && owned.len() >= config.max_blocks_per_host as usize;
            if !at_limit {
                for pool in pools {
                    let named = self.named_blocks(pool.name()).await?;
                    let mut claimed: BTreeSet<IpNet> = named.iter().map(|s| s.block.cidr).collect();
                    // Names found taken by a block this list does not show (another pool's, left over).
                    claimed.extend(lost.iter().copied());
                    let unclaimed = ipam::unclaimed_blocks(pool, &claimed)
                        .find(|c| eligible.is_none_or(|e| e.any_in(*c, pool.cidr())));
                    if let Some(cidr) = unclaimed {
                        let mut block = Block::new(cidr, pool.name(), &owner.node, now);
                        let ip = take(&mut block, pool, now)
                            .ok_or_else(|| exhausted(format!("new block {cidr} has no address it may give")))?;
                        let Some(object) = self.create(&block).await? else {
                            lost.insert(cidr);
                            continue 'attempt;
                        };
                        faults::reached("claim-created");
                        self.confirm_claim(pool, object).await?;
                        faults::reached("claim-confirmed");
                        return Ok(Assigned { ip, pool: pool.name().to_string(), block: cidr });
                    }
                    // Every block of the pool is cut: adopt one nobody owns any more (its node went) that has
                    // an address to give, keeping its free list and the cooldowns in it. One update, as an
                    // assignment in an owned block.
                    for stored in named.iter().filter(|s| s.block.affinity.is_none() && belongs(&s.block, pool)) {
                        let mut block = stored.block.clone();
                        block.affinity = Some(owner.node.clone());
                        let Some(ip) = take(&mut block, pool, now) else { continue };
                        if !self.write(stored, &block).await? {
                            continue 'attempt;
                        }
                        faults::reached("assigned");
                        return Ok(Assigned { ip, pool: pool.name().to_string(), block: block.cidr });
                    }
                }
            }
            // 3. Borrow from another node's block.
            if !config.strict_affinity {
                for pool in pools {
                    for stored in self.named_blocks(pool.name()).await? {
                        if !belongs(&stored.block, pool) || !stored.block.has_available(now, cooldown) {
                            continue;
                        }
                        let mut block = stored.block.clone();
                        let Some(ip) = take(&mut block, pool, now) else { continue };
                        if !self.write(&stored, &block).await? {
                            continue 'attempt;
                        }
                        faults::reached("borrowed");
                        return Ok(Assigned { ip, pool: pool.name().to_string(), block: block.cidr });
                    }
                }
            }
            let detail = match (at_limit, config.strict_affinity) {
                (true, true) => format!(
                    "the node holds {} block(s), the maxBlocksPerHost limit, and they are full; strictAffinity forbids borrowing",
                    owned.len()
                ),
                (true, false) => format!(
                    "the node holds {} block(s), the maxBlocksPerHost limit, and no block anywhere has a free address",
                    owned.len()
                ),
                (false, true) => {
                    "every block is claimed and this node's blocks are full; strictAffinity forbids borrowing".into()
                }
                (false, false) if cooldown > 0 => {
                    format!("every address is in use (released addresses wait {cooldown}s before reuse)")
                }
                (false, false) => "every address is in use".into(),
            };
            return Err(exhausted(detail));
        }
        Err(AllocError::Contention { operation: format!("assigning an {family} address for {}", owner.handle) })
    }

    /// After a claim: the pool must still be the one the block was cut from. A pool deleted meanwhile (and
    /// maybe re-created with another range or block size) must not keep a block cut the old way, so the
    /// block is taken back and the ADD refused (kubelet retries it against the pool as it is now).
    async fn confirm_claim(&self, pool: &IpPool, created: Object) -> Result<(), AllocError> {
        let now = self.pools.load().await?;
        let detail = match now.pools.iter().find(|p| p.name() == pool.name()) {
            None => "it was deleted",
            Some(p) if p.cidr() != pool.cidr() || p.block_size() != pool.block_size() => {
                "it was re-created with another range or block size"
            }
            Some(p) if p.spec.disabled => "it was disabled (or is being deleted)",
            Some(_) => return Ok(()),
        };
        let mut stored = decode(&created)?;
        for _ in 0..MAX_ATTEMPTS {
            let mut block = stored.block.clone();
            // Only this claim's allocation is in it unless another node borrowed meanwhile; either way this
            // node gives up its claim and its address, and the block goes once nobody holds anything in it.
            let claimer = block.affinity.take();
            let own: Vec<IpAddr> =
                stored.block.allocated().filter(|(_, a)| Some(&a.node) == claimer.as_ref()).map(|(ip, _)| ip).collect();
            for ip in own {
                block.release_ip(ip, (self.clock)());
            }
            // An empty block goes at once when no address of it was ever released before (the claim's own
            // was never wired to a pod); one another node borrowed and released from meanwhile stays, owned by
            // nobody, until that address has cooled down.
            let never_released = stored.block.cooled_down_at(0) == 0;
            let undone = if block.is_empty() && never_released {
                self.delete(&stored).await?
            } else {
                self.write(&stored, &block).await?
            };
            if undone {
                break;
            }
            match self.get(stored.block.cidr).await? {
                Some(again) => stored = again,
                None => break,
            }
        }
        Err(AllocError::PoolChanged { pool: pool.name().to_string(), detail: detail.to_string() })
    }

    async fn assign_fixed(
        &self,
        owner: &Owner,
        ip: IpAddr,
        pool: &IpPool,
        config: &IpamConfigSpec,
    ) -> Result<Assigned, AllocError> {
        let cidr = ipam::block_containing(pool, ip)
            .ok_or_else(|| AllocError::AddressUnavailable { ip, reason: format!("not in pool {}", pool.name()) })?;
        let unavailable = |reason: String| AllocError::AddressUnavailable { ip, reason };
        let assigned = Assigned { ip, pool: pool.name().to_string(), block: cidr };
        for _ in 0..MAX_ATTEMPTS {
            let now = (self.clock)();
            match self.get(cidr).await? {
                Some(stored) => {
                    let mut block = stored.block.clone();
                    if !belongs(&block, pool) {
                        return Err(unavailable(format!(
                            "its block {cidr} is left from a deleted pool {:?} and is not given out",
                            block.pool
                        )));
                    }
                    if config.strict_affinity && block.affinity.as_deref() != Some(owner.node.as_str()) {
                        return Err(unavailable(format!(
                            "its block {cidr} belongs to node {:?} and strictAffinity forbids borrowing",
                            block.affinity.unwrap_or_default()
                        )));
                    }
                    block
                        .assign_ip(ip, owner, now, config.reuse_cooldown_seconds)
                        .map_err(|e: BlockError| unavailable(e.to_string()))?;
                    if self.write(&stored, &block).await? {
                        faults::reached("assigned");
                        return Ok(assigned);
                    }
                }
                None => {
                    let mut block = Block::new(cidr, pool.name(), &owner.node, now);
                    block
                        .assign_ip(ip, owner, now, config.reuse_cooldown_seconds)
                        .map_err(|e| unavailable(e.to_string()))?;
                    if let Some(object) = self.create(&block).await? {
                        faults::reached("claim-created");
                        self.confirm_claim(pool, object).await?;
                        faults::reached("claim-confirmed");
                        return Ok(assigned);
                    }
                }
            }
        }
        Err(AllocError::Contention { operation: format!("assigning {ip}") })
    }

    /// Make every allocation of `handle` on `node` carry `attributes` (one update per block whose allocations
    /// carry others; none when they all do).
    async fn record_attributes(
        &self,
        node: &str,
        handle: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<(), AllocError> {
        for _ in 0..MAX_ATTEMPTS {
            let (owned, borrowed) = self.node_blocks(node).await?;
            let mut again = false;
            for stored in owned.iter().chain(&borrowed) {
                let stale = |a: &ipam::Allocation| a.handle == handle && a.node == node && a.attributes != *attributes;
                if !stored.block.allocations.values().any(stale) {
                    continue;
                }
                let mut block = stored.block.clone();
                for allocation in block.allocations.values_mut().filter(|a| stale(a)) {
                    allocation.attributes.clone_from(attributes);
                }
                again |= !self.write(stored, &block).await?;
            }
            if !again {
                return Ok(());
            }
        }
        Err(AllocError::Contention { operation: format!("recording handle {handle}'s attributes") })
    }

    /// Release every address `handle` holds on `node` (one update per block holding it). Returns the
    /// addresses released; none if it holds none (release is idempotent).
    pub async fn release_handle(&self, node: &str, handle: &str) -> Result<Vec<IpAddr>, AllocError> {
        let lock = self.locks.get(format!("node/{node}"));
        let _turn = lock.lock().await;
        self.release_handle_locked(node, handle).await
    }

    async fn release_handle_locked(&self, node: &str, handle: &str) -> Result<Vec<IpAddr>, AllocError> {
        let mut released = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            let now = (self.clock)();
            let (owned, borrowed) = self.node_blocks(node).await?;
            let mut holding: Vec<Stored> =
                owned.into_iter().chain(borrowed).filter(|s| s.block.holds(handle)).collect();
            if holding.is_empty() {
                // The view may be behind a write of another process: the store has the last word on "none".
                let (owned, borrowed) = self.node_blocks_read(node).await?;
                holding = owned.into_iter().chain(borrowed).filter(|s| s.block.holds(handle)).collect();
            }
            let mut again = false;
            for stored in &holding {
                let mut block = stored.block.clone();
                let ips = block.release_handle(handle, now);
                if self.write(stored, &block).await? {
                    released.extend(ips);
                    faults::reached("released-one");
                } else {
                    again = true;
                }
            }
            if !again {
                return Ok(released);
            }
        }
        Err(AllocError::Contention { operation: format!("releasing handle {handle}") })
    }

    /// Release one address. With `expected`, only if it is still the allocation the caller saw (its block's
    /// sequence number and its handle). Returns who held it, or `None` if it was not allocated.
    pub async fn release_ip(
        &self,
        ip: IpAddr,
        expected: Option<(u64, &str)>,
    ) -> Result<Option<Allocation>, AllocError> {
        for _ in 0..MAX_ATTEMPTS {
            let Some(stored) = self.block_holding(ip).await? else { return Ok(None) };
            let Some(current) = stored.block.allocation(ip) else { return Ok(None) };
            if let Some((sequence, handle)) = expected
                && (current.sequence != sequence || current.handle != handle)
            {
                return Err(AllocError::Reassigned { ip, expected: sequence, actual: current.sequence });
            }
            let mut block = stored.block.clone();
            let Some(allocation) = block.release_ip(ip, (self.clock)()) else { return Ok(None) };
            if self.write(&stored, &block).await? {
                faults::reached("released-one");
                return Ok(Some(allocation));
            }
        }
        Err(AllocError::Contention { operation: format!("releasing {ip}") })
    }

    /// The block an address is in: computed from its pool, or found among all blocks if its pool is gone.
    async fn block_holding(&self, ip: IpAddr) -> Result<Option<Stored>, AllocError> {
        let loaded = self.pools.load().await?;
        // In a pool: its block is known, and no block object means nothing there is allocated. Only an address
        // of a deleted pool is looked for among every block.
        if let Some(cidr) = loaded.pools.iter().find_map(|p| ipam::block_containing(p, ip)) {
            return self.get(cidr).await;
        }
        Ok(self.selected(Labels::new()).await?.into_iter().find(|s| s.block.cidr.contains(&ip)))
    }

    /// Give back the blocks `node` owns that have been empty for the grace period and whose released
    /// addresses have cooled down (a delete at the version read: a block used meanwhile stays). Returns them.
    pub async fn release_empty_blocks(&self, node: &str, config: &IpamConfigSpec) -> Result<Vec<IpNet>, AllocError> {
        // Not while this process assigns on the node (a block re-created between the delete and the view's
        // update would otherwise be dropped from the view).
        let lock = self.locks.get(format!("node/{node}"));
        let _turn = lock.lock().await;
        let now = (self.clock)();
        let (owned, _) = self.node_blocks(node).await?;
        let mut released = Vec::new();
        for stored in owned {
            let block = &stored.block;
            let idle = block.empty_since.is_some_and(|t| now >= t.saturating_add(config.empty_block_grace_seconds));
            if !(idle && block.may_go_back(now, config.reuse_cooldown_seconds)) {
                continue;
            }
            if self.delete(&stored).await? {
                released.push(block.cidr);
                faults::reached("given-back");
            }
        }
        Ok(released)
    }

    /// Give back the blocks nobody owns (their node went) that are empty and whose released addresses have
    /// cooled down (given back sooner, a block could be cut again at once and an address handed out inside
    /// its cooldown). One list of every block, a delete at the version read for each. Returns them.
    pub async fn release_unowned_blocks(&self, config: &IpamConfigSpec) -> Result<Vec<IpNet>, AllocError> {
        let unowned = self.selected(Labels::from([(UNOWNED_LABEL.to_string(), "true".to_string())])).await?;
        self.give_back_unowned(unowned, config).await
    }

    /// Take `node`'s claim off block `cidr` if it still has it (a gone node's block, one at a time): the
    /// block stays, owned by nobody, until it is empty and cooled down or a claim adopts it. Returns whether
    /// this took it.
    pub async fn release_claim(&self, cidr: IpNet, node: &str) -> Result<bool, AllocError> {
        for _ in 0..MAX_ATTEMPTS {
            let Some(stored) = self.get(cidr).await? else { return Ok(false) };
            if stored.block.affinity.as_deref() != Some(node) {
                return Ok(false);
            }
            let mut block = stored.block.clone();
            block.affinity = None;
            if self.write(&stored, &block).await? {
                faults::reached("node-released");
                return Ok(true);
            }
        }
        Err(AllocError::Contention { operation: format!("releasing node {node}'s claim on {cidr}") })
    }

    /// [`Self::release_unowned_blocks`] among `blocks` as read (a delete at each one's version).
    async fn give_back_unowned(&self, blocks: Vec<Stored>, config: &IpamConfigSpec) -> Result<Vec<IpNet>, AllocError> {
        let now = (self.clock)();
        let mut released = Vec::new();
        for stored in blocks {
            let block = &stored.block;
            if block.affinity.is_some() || !block.may_go_back(now, config.reuse_cooldown_seconds) {
                continue;
            }
            if self.delete(&stored).await? {
                released.push(block.cidr);
                faults::reached("given-back");
            }
        }
        Ok(released)
    }

    /// A gone node's claim on its blocks: each stays, owned by nobody, until it is empty and its released
    /// addresses have cooled down ([`Self::release_unowned_blocks`]) or a claim adopts it. Returns the blocks
    /// released.
    pub async fn release_node(&self, node: &str) -> Result<Vec<IpNet>, AllocError> {
        let mut released = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            // From the store, not a view: another node's agent does this, and must not start (and keep) a
            // view of a gone node, nor miss a block it claimed just before it went.
            let (owned, _) = self.node_blocks_read(node).await?;
            let mut again = false;
            for stored in owned {
                let mut block = stored.block.clone();
                block.affinity = None;
                if self.write(&stored, &block).await? {
                    released.push(block.cidr);
                    faults::reached("node-released");
                } else {
                    again = true;
                }
            }
            if !again {
                return Ok(released);
            }
        }
        Err(AllocError::Contention { operation: format!("releasing node {node}'s blocks") })
    }

    /// Release what nodes that are gone hold: a node named by a block (its affinity, or an allocation) that
    /// is not in `live` (on Kubernetes, the Node objects of a synced cache) is gone once it has been missing
    /// from every pass for `grace`, as `absent_since` (kept by the caller from pass to pass, on the monotonic
    /// clock `now`: a step of the wall clock shortens nothing) remembers; a node seen again in between
    /// starts over. For each gone node: its addresses, at the allocation seen (one reassigned meanwhile
    /// stays), then its claim on its blocks; then every block nobody owns that is empty and cooled down goes
    /// back. One list of every block a pass (two when it collected a node). `me`, the caller's own node, is never gone, and an empty `live`
    /// while blocks name nodes is refused (a cache not synced, or a list it may not read, would otherwise
    /// make every node gone). A process that restarts forgets the absences it saw and waits the grace
    /// period again. The caller confirms a node gone with the API server before relying on this for one it
    /// has not seen for long; a node whose Node object is deleted while its kubelet runs registers again.
    pub async fn collect_gone_nodes(
        &self,
        me: &str,
        live: &BTreeSet<String>,
        absent_since: &mut BTreeMap<String, std::time::Instant>,
        now: std::time::Instant,
        grace: std::time::Duration,
        config: &IpamConfigSpec,
    ) -> Result<GoneNodes, AllocError> {
        let read = self.selected(Labels::new()).await?;
        let named: BTreeSet<&str> = read
            .iter()
            .map(|s| &s.block)
            .flat_map(|b| b.affinity.as_deref().into_iter().chain(b.allocated().map(|(_, a)| a.node.as_str())))
            .collect();
        if live.is_empty() && !named.is_empty() {
            return Err(AllocError::NodesUnknown { named: named.len() });
        }
        let missing: BTreeSet<&str> = named.iter().copied().filter(|n| !live.contains(*n) && *n != me).collect();
        absent_since.retain(|node, _| missing.contains(node.as_str()));
        for node in &missing {
            absent_since.entry((*node).to_string()).or_insert(now);
        }
        let gone: BTreeSet<String> = absent_since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= grace)
            .map(|(node, _)| node.clone())
            .collect();
        let mut collected = GoneNodes::default();
        for block in read.iter().map(|s| &s.block) {
            for (ip, allocation) in block.allocated().filter(|(_, a)| gone.contains(&a.node)) {
                match self.release_ip(ip, Some((allocation.sequence, &allocation.handle))).await {
                    Ok(Some(_)) => collected.addresses.push(ip),
                    Ok(None) | Err(AllocError::Reassigned { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        for node in &gone {
            collected.blocks.extend(self.release_node(node).await?);
        }
        // The blocks as read, unless this pass changed some.
        let now_read = if gone.is_empty() { read } else { self.selected(Labels::new()).await? };
        collected.given_back = self.give_back_unowned(now_read, config).await?;
        collected.nodes = gone;
        Ok(collected)
    }
}

/// What [`BlockAllocator::collect_gone_nodes`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GoneNodes {
    /// The nodes found gone.
    pub nodes: BTreeSet<String>,
    /// Their addresses, released.
    pub addresses: Vec<IpAddr>,
    /// Their blocks, now owned by nobody.
    pub blocks: Vec<IpNet>,
    /// Blocks nobody owns given back to their pools (theirs and any earlier).
    pub given_back: Vec<IpNet>,
}

/// The selectors of a node's blocks: those affine to it, and those it borrowed addresses from.
fn node_selectors(node: &str) -> [Labels; 2] {
    [
        Labels::from([(AFFINITY_LABEL.to_string(), label_for(node))]),
        Labels::from([(borrower_label(node), String::new())]),
    ]
}

/// Of what a node's two selectors selected, the blocks it owns and those it holds an address in without owning
/// them (labels only narrow: the spec decides, whatever a digest of a long name may also match).
fn mine(node: &str, owned: Vec<Stored>, borrowed: Vec<Stored>) -> (Vec<Stored>, Vec<Stored>) {
    let owned = owned.into_iter().filter(|s| s.block.affinity.as_deref() == Some(node)).collect();
    let borrowed = borrowed
        .into_iter()
        .filter(|s| s.block.affinity.as_deref() != Some(node) && s.block.allocated().any(|(_, a)| a.node == node))
        .collect();
    (owned, borrowed)
}

/// What `handle` holds among `blocks`.
fn holdings<'a>(blocks: impl IntoIterator<Item = &'a Stored>, handle: &str) -> Vec<Assigned> {
    let mut held = Vec::new();
    for stored in blocks {
        let block = &stored.block;
        held.extend(block.ips_of(handle).into_iter().map(|ip| Assigned {
            ip,
            pool: block.pool.clone(),
            block: block.cidr,
        }));
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_names_are_dns_subdomains_and_distinct() {
        let cidrs = ["10.80.0.0/29", "10.80.0.0/26", "0.0.0.0/32", "fd00::/120", "::/128", "::1/128", "fd00::100/120"];
        let names: BTreeSet<String> = cidrs.iter().map(|c| block_name(c.parse().unwrap())).collect();
        assert_eq!(names.len(), cidrs.len(), "{names:?}");
        assert!(names.iter().all(|n| crate::objects::dns_subdomain(n)), "{names:?}");
        assert_eq!(block_name("10.80.0.0/29".parse().unwrap()), "10-80-0-0-29");
        assert_eq!(block_name("fd00::100/120".parse().unwrap()), "fd00-0-0-0-0-0-0-100-120");
    }

    #[test]
    fn long_names_become_stable_label_values() {
        assert_eq!(label_for("node-1"), "node-1");
        let long = "n".repeat(64);
        assert_eq!(label_for(&long), label_for(&long));
        assert_ne!(label_for(&long), label_for(&"n".repeat(65)));
        assert!(label_value(&label_for(&long)));
        assert!(crate::objects::label_key(&borrower_label(&long)));
    }

    #[test]
    fn labels_follow_the_allocations() {
        let owner = |handle: &str, node: &str| Owner { handle: handle.into(), node: node.into(), ..Owner::default() };
        let mut block = Block::new("10.0.0.0/30".parse().unwrap(), "p", "a", 0);
        block.assign_next(&owner("h1", "a"), 0, 0);
        let ip = block.assign_next(&owner("h2", "b"), 0, 0).unwrap();
        let labels = labels_of(&block);
        assert_eq!(labels.get(AFFINITY_LABEL).map(String::as_str), Some("a"));
        assert!(labels.contains_key(&borrower_label("b")) && !labels.contains_key(&borrower_label("a")));
        block.release_ip(ip, 1);
        assert!(!labels_of(&block).contains_key(&borrower_label("b")));
    }
}
