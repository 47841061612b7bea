//! The allocator: the one place that turns IPAM decisions into datastore transactions.
//!
//! Every operation reads what it needs, decides with the pure functions of [`crate::ipam`], and commits one
//! compare-and-swap transaction over every record it read and changes. A revision conflict means someone
//! else changed one of them in between: the operation starts over from fresh reads, at most
//! [`MAX_ATTEMPTS`] times. Any other failure is returned as it is.

pub mod single;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;
use tokio::sync::oneshot;

use crate::{
    catalog::{Catalog, decode, delete_block, disown_block, encode, write_block},
    ipam::{
        self, Affinity, Allocation, Block, BlockError, HandleRecord, NamespaceInfo, NodeInfo, Owner, PodInfo,
        Requested, SelectionError, check::Snapshot,
    },
    resources::{IpPool, IpamConfigSpec},
    store::{KeyValue, Revision, Store, StoreError, Txn, TxnOutcome, keys},
};

/// How many times an operation starts over after a revision conflict.
pub const MAX_ATTEMPTS: usize = 32;

/// Seconds since the epoch; injectable so tests can move time.
pub use crate::ipam::{Clock, system_clock};

/// Errors from allocation and release.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// No pool may be used, or a named pool is refused.
    #[error(transparent)]
    Selection(#[from] SelectionError),
    /// Every usable pool is full for this node.
    #[error("{family} pool {pools} is exhausted for node {node:?}: {detail}")]
    Exhausted {
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// The pools tried, quoted and comma-separated.
        pools: String,
        /// The node.
        node: String,
        /// Why nothing could be found.
        detail: String,
    },
    /// A specific address could not be assigned.
    #[error("cannot assign {ip}: {reason}")]
    AddressUnavailable {
        /// The address.
        ip: IpAddr,
        /// Why.
        reason: String,
    },
    /// The address changed hands since the caller looked (its sequence number differs).
    #[error("{ip} was reassigned since it was seen (sequence {expected}, now {actual}); not released")]
    Reassigned {
        /// The address.
        ip: IpAddr,
        /// The sequence the caller saw.
        expected: u64,
        /// The sequence now.
        actual: u64,
    },
    /// The pool a block was to be claimed from was deleted (or deleted and re-created) since it was read.
    #[error("pool {pool:?} changed while a block of it was being claimed: {detail}")]
    PoolChanged {
        /// The pool.
        pool: String,
        /// What changed.
        detail: String,
    },
    /// An attachment's attributes are larger than a block may carry for each of its addresses.
    #[error(
        "the attributes of {handle} are {bytes} bytes in {entries} entries; an allocation carries at most \
         {MAX_ATTRIBUTE_BYTES} bytes in {MAX_ATTRIBUTES} entries (each block holds them for every address it gives)"
    )]
    Attributes {
        /// The attachment.
        handle: String,
        /// Their size, keys and values.
        bytes: usize,
        /// How many.
        entries: usize,
    },
    /// Gone nodes were to be collected with no node live while blocks name some.
    #[error(
        "no node is live while blocks name {named} node(s): the list of live nodes is not trusted (a cache not \
         synced, or Nodes this agent may not list); nothing collected"
    )]
    NodesUnknown {
        /// How many nodes the blocks name.
        named: usize,
    },
    /// Concurrent writers kept winning.
    #[error("gave up on {operation} after {MAX_ATTEMPTS} attempts: other writers kept changing the same records")]
    Contention {
        /// What was being done.
        operation: String,
    },
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The object store failed.
    #[error(transparent)]
    Objects(#[from] crate::objects::ObjectError),
}

/// An assigned address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assigned {
    /// The address.
    pub ip: IpAddr,
    /// The pool it came from.
    pub pool: String,
    /// The block it came from.
    pub block: IpNet,
}

/// The most attributes an allocation carries, and their most bytes (keys and values): a block holds them for
/// each address it gives, and a block object must stay well under the API server's and etcd's 1.5 MiB.
pub const MAX_ATTRIBUTES: usize = 16;
/// See [`MAX_ATTRIBUTES`].
pub const MAX_ATTRIBUTE_BYTES: usize = 512;

/// Refuse attributes larger than a block may carry for each of its addresses ([`MAX_ATTRIBUTES`],
/// [`MAX_ATTRIBUTE_BYTES`]).
pub fn check_attributes(handle: &str, attributes: &BTreeMap<String, String>) -> Result<(), AllocError> {
    let bytes: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
    if attributes.len() > MAX_ATTRIBUTES || bytes > MAX_ATTRIBUTE_BYTES {
        return Err(AllocError::Attributes { handle: handle.to_string(), bytes, entries: attributes.len() });
    }
    Ok(())
}

/// One request for addresses.
#[derive(Clone, Debug, Default)]
pub struct AssignRequest {
    /// One per (container, interface): see [`ipam::handle_for`].
    pub handle: String,
    /// The node the pod runs on.
    pub node: NodeInfo,
    /// The pod's namespace.
    pub namespace: NamespaceInfo,
    /// The pod, when known.
    pub pod: Option<PodInfo>,
    /// What the runtime asked for.
    pub requested: Requested,
    /// IPAM-only: which addresses the attachment may be given (none: any of its pools').
    pub eligible: Option<Arc<ipam::Eligible>>,
    /// The attachment's attributes, kept in each of its allocations by the single-object allocator (its
    /// endpoint record); the multi-key allocator records endpoints apart and ignores them.
    pub attributes: BTreeMap<String, String>,
}

/// A record the caller wants committed in the same transaction as the addresses (the agent's endpoint
/// record), so that the common ADD is made durable by one commit instead of two.
#[derive(Clone)]
pub struct Record {
    /// Its key.
    pub key: String,
    /// Its value, given every address the request holds once the transaction commits.
    pub value: RecordValue,
}

/// How a [`Record`]'s value is made from the request's addresses.
pub type RecordValue = Arc<dyn Fn(&[IpAddr]) -> Vec<u8> + Send + Sync>;

/// How many requests one batch commits at most. Each costs two operations (its handle, its endpoint record),
/// the batch's blocks two each (block and room index), and the etcd backend's marker up to 17 more: 40 requests
/// stay under etcd's default `--max-txn-ops` of 128 however a burst arrives (a node rebooting with a full
/// complement of pods, after a stalled etcd), so no operator has to raise it.
pub const MAX_BATCH: usize = 40;

/// A [`Record`] on its way into a batch, with the addresses the request already holds.
#[derive(Clone)]
struct Recording {
    record: Record,
    earlier: Vec<IpAddr>,
}

/// Allocates and releases addresses in a datastore.
#[derive(Clone)]
pub struct Allocator {
    store: Arc<dyn Store>,
    clock: Clock,
    locks: Arc<Locks>,
    queues: Arc<Named<NodeQueue>>,
}

enum Attempt {
    Done(Assigned),
    Conflict,
    NoRoom,
}

/// Values created on first use under a name, shared by everyone who asks for the same name.
struct Named<T>(std::sync::Mutex<HashMap<String, Arc<T>>>);

impl<T: Default> Named<T> {
    fn get(&self, name: impl Into<String>) -> Arc<T> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(name.into()).or_default())
    }
}

impl<T> Default for Named<T> {
    fn default() -> Self {
        Self(std::sync::Mutex::new(HashMap::new()))
    }
}

/// Async locks by name: one per block and one per node's claims.
type Locks = Named<tokio::sync::Mutex<()>>;

/// Requests waiting to be assigned from one node's blocks, and the turn to serve them.
#[derive(Default)]
struct NodeQueue {
    waiting: std::sync::Mutex<Vec<Waiter>>,
    turn: tokio::sync::Mutex<()>,
}

struct Waiter {
    owner: Owner,
    /// The pools the request may use, as CIDRs, in preference order.
    pools: Vec<IpNet>,
    cooldown: u64,
    /// IPAM-only: which addresses it may be given.
    eligible: Option<Arc<ipam::Eligible>>,
    /// Written with the address when this waiter gets one.
    recording: Option<Recording>,
    reply: oneshot::Sender<Result<Attempt, StoreError>>,
}

/// What an assignment reads from the catalog: the pools and the IPAM configuration.
pub struct Loaded {
    /// Every pool.
    pub pools: Vec<IpPool>,
    /// The cluster's IPAM configuration.
    pub config: IpamConfigSpec,
}

impl Allocator {
    /// An allocator on `store` using the wall clock.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_clock(store, system_clock())
    }

    /// An allocator with an injected clock.
    pub fn with_clock(store: Arc<dyn Store>, clock: Clock) -> Self {
        Self { store, clock, locks: Arc::default(), queues: Arc::default() }
    }

    /// The datastore.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Read what an assignment needs from the catalog (a caller that needs the pools itself reads them once,
    /// here, and hands them to [`Allocator::assign_recording`]).
    pub async fn load(&self) -> Result<Loaded, StoreError> {
        let catalog = Catalog::new(Arc::clone(&self.store));
        let pools = catalog.pools().await?.into_iter().map(|(p, _)| p).collect();
        let config = catalog.config().await?.0.spec;
        Ok(Loaded { pools, config })
    }

    /// Assign addresses for a pod: one per family whose pools admit it, or exactly the fixed addresses asked
    /// for. Idempotent per handle: a repeated request returns what the handle already holds. If any family
    /// fails, nothing stays allocated.
    pub async fn assign(&self, request: &AssignRequest) -> Result<Vec<Assigned>, AllocError> {
        let loaded = self.load().await?;
        Ok(self.assign_recording(request, None, &loaded).await?.0)
    }

    /// [`Allocator::assign`] with the catalog as `loaded` (see [`Allocator::load`]), committing `record` in
    /// the same transaction as the addresses where it can: when the last address comes from a block this
    /// node owns (the common case). Returns whether it did; when it did not (a block claimed or borrowed,
    /// fixed addresses, a repeated request), the caller writes the record itself.
    pub async fn assign_recording(
        &self,
        request: &AssignRequest,
        record: Option<&Record>,
        loaded: &Loaded,
    ) -> Result<(Vec<Assigned>, bool), AllocError> {
        if let Some(existing) = self.addresses_of(&request.handle).await? {
            return Ok((existing, false));
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
            node: request.node.name.clone(),
            namespace: Some(request.namespace.name.clone()),
            pod: request.pod.as_ref().map(|p| p.name.clone()),
            attributes: BTreeMap::new(),
        };
        let mut done = Vec::new();
        let mut result = Ok(());
        for (ip, pool) in &selection.ips {
            if let Some(eligible) = &request.eligible
                && !eligible.allows(*ip, pool.cidr())
            {
                result = Err(AllocError::AddressUnavailable {
                    ip: *ip,
                    reason: "it is outside the configured range, or the subnet's network, broadcast or gateway address"
                        .into(),
                });
                break;
            }
            match self.assign_fixed(&owner, *ip, pool, &loaded.config).await {
                Ok(a) => done.push(a),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let families: Vec<_> = [("IPv4", &selection.ipv4), ("IPv6", &selection.ipv6)]
            .into_iter()
            .filter(|(_, pools)| !pools.is_empty())
            .collect();
        let mut recorded = false;
        for (n, (family, pools)) in families.iter().enumerate() {
            if result.is_err() {
                continue;
            }
            // The record goes with the last address, once every address it names is known.
            let recording = record.filter(|_| n + 1 == families.len()).map(|record| Recording {
                record: record.clone(),
                earlier: done.iter().map(|a: &Assigned| a.ip).collect(),
            });
            match self.assign_auto(&owner, family, pools, &loaded.config, recording, request.eligible.as_ref()).await {
                Ok((a, with_record)) => {
                    done.push(a);
                    recorded = with_record;
                }
                Err(e) => result = Err(e),
            }
        }
        if let Err(err) = result {
            if !done.is_empty() {
                // Roll back the families that succeeded; the original error is what the caller must see.
                let _ = self.release_handle(&request.handle).await;
            }
            return Err(err);
        }
        Ok((done, recorded))
    }

    /// The addresses a handle holds, or `None` if it holds none.
    pub async fn addresses_of(&self, handle: &str) -> Result<Option<Vec<Assigned>>, AllocError> {
        let key = keys::handle(handle);
        let Some(kv) = self.store.get(&key).await? else { return Ok(None) };
        let record: HandleRecord = decode(&key, &kv.value)?;
        let mut out = Vec::new();
        for cidr in record.blocks.keys() {
            if let Some((block, _)) = self.block(*cidr).await? {
                out.extend(block.ips_of(handle).into_iter().map(|ip| Assigned {
                    ip,
                    pool: block.pool.clone(),
                    block: block.cidr,
                }));
            }
        }
        Ok(Some(out))
    }

    async fn block(&self, cidr: IpNet) -> Result<Option<(Block, Revision)>, StoreError> {
        let key = keys::block(cidr);
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some((decode(&key, &kv.value)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// The block holding `ip`: computed from its pool, or found among the blocks if its pool was deleted.
    async fn block_of(&self, ip: IpAddr) -> Result<Option<IpNet>, StoreError> {
        let pools = Catalog::new(Arc::clone(&self.store)).pools().await?;
        if let Some(cidr) = pools.iter().find_map(|(p, _)| ipam::block_containing(p, ip)) {
            return Ok(Some(cidr));
        }
        Ok(self.block_cidrs().await?.into_iter().find(|c| c.contains(&ip)))
    }

    /// Every block's CIDR, from the block keys alone.
    async fn block_cidrs(&self) -> Result<Vec<IpNet>, StoreError> {
        let (block_keys, _) = self.store.list_keys(keys::BLOCKS).await?;
        Ok(block_keys.iter().filter_map(|k| keys::parse_cidr_segment(k.strip_prefix(keys::BLOCKS)?)).collect())
    }

    async fn handle_record(&self, handle: &str) -> Result<(HandleRecord, Option<Revision>), StoreError> {
        let key = keys::handle(handle);
        match self.store.get(&key).await? {
            Some(kv) => Ok((decode(&key, &kv.value)?, Some(kv.mod_revision))),
            None => Ok((HandleRecord { handle: handle.to_string(), ..Default::default() }, None)),
        }
    }

    /// Commit `block` (created if `block_rev` is `None`) with one more address for the owner's handle.
    async fn commit_assignment(
        &self,
        owner: &Owner,
        block: &Block,
        block_rev: Option<Revision>,
        extra: Txn,
    ) -> Result<bool, StoreError> {
        let (mut record, handle_rev) = self.handle_record(&owner.handle).await?;
        if holds_family(&record, block.cidr.network().is_ipv6()) {
            return Ok(false);
        }
        *record.blocks.entry(block.cidr).or_default() += 1;
        let mut txn = write_block(extra, block, block_rev);
        txn = txn.write(keys::handle(&owner.handle), handle_rev, encode(&record));
        Ok(self.store.txn(txn).await?.is_committed())
    }

    async fn assign_auto(
        &self,
        owner: &Owner,
        family: &'static str,
        pools: &[&IpPool],
        config: &IpamConfigSpec,
        recording: Option<Recording>,
        eligible: Option<&Arc<ipam::Eligible>>,
    ) -> Result<(Assigned, bool), AllocError> {
        let pool_of = |cidr: &IpNet| pools.iter().find(|p| p.cidr().contains(cidr)).map(|p| p.cidr());
        // Take the next address of `block`, only among those the attachment may be given.
        let take = |block: &mut Block, now: u64| match eligible {
            None => block.assign_next(owner, now, config.reuse_cooldown_seconds),
            Some(eligible) => {
                let pool = pool_of(&block.cidr).unwrap_or(block.cidr);
                block.assign_next_where(owner, now, config.reuse_cooldown_seconds, |ip| eligible.allows(ip, pool))
            }
        };
        let in_pools = |cidr: &IpNet| pools.iter().find(|p| p.cidr().contains(cidr));
        let cooldown = config.reuse_cooldown_seconds;
        // Selection gives one family's pools at a time.
        let ipv6 = pools.first().is_some_and(|p| p.is_ipv6());
        for attempt in 0..MAX_ATTEMPTS {
            // A repeated request for the same handle that lost a race to its twin gets the twin's address
            // (the first attempt follows `assign`'s own look, and a twin that commits meanwhile makes it
            // conflict, so only retries look again).
            if attempt > 0
                && let Some(existing) = self.addresses_of(&owner.handle).await?
                && let Some(same_family) = existing.into_iter().find(|a| a.ip.is_ipv6() == ipv6)
            {
                return Ok((same_family, false));
            }
            // 1. A block this node already owns that has room.
            match self.assign_from_owned(owner, pools, cooldown, recording.clone(), eligible).await? {
                Attempt::Done(assigned) => return Ok((assigned, recording.is_some())),
                Attempt::Conflict => continue,
                Attempt::NoRoom => {}
            }
            // Only one claim per node at a time: a burst of requests on a node with full blocks claims one new
            // block, not one each. Whoever waited here looks again first, since the claim before it made room.
            let claim_lock = self.locks.get(format!("claim/{}", owner.node));
            let _claiming = claim_lock.lock().await;
            match self.assign_from_owned(owner, pools, cooldown, recording.clone(), eligible).await? {
                Attempt::Done(assigned) => return Ok((assigned, recording.is_some())),
                Attempt::Conflict => continue,
                Attempt::NoRoom => {}
            }
            let now = (self.clock)();

            // 2. Claim a new block, unless the node is at its limit.
            let owned = if config.max_blocks_per_host > 0 {
                self.store.list_keys(&keys::node_affinities(&owner.node)).await?.0.len()
            } else {
                0
            };
            let at_limit = config.max_blocks_per_host > 0 && owned >= config.max_blocks_per_host as usize;
            if !at_limit {
                let (block_keys, _) = self.store.list_keys(keys::BLOCKS).await?;
                let claimed: BTreeSet<IpNet> =
                    block_keys.iter().filter_map(|k| keys::parse_cidr_segment(k.strip_prefix(keys::BLOCKS)?)).collect();
                // Pool by pool in their order of preference: a block not cut yet (IPAM-only: one holding an
                // address the attachment may be given), else one nobody owns any more (its node went) that
                // has an address to give, adopted with its free list and the cooldowns in it. The blocks'
                // values are read only when a pool has none left to cut.
                let mut listed: Option<Vec<KeyValue>> = None;
                let mut chosen = None;
                for pool in pools {
                    let unclaimed = ipam::unclaimed_blocks(pool, &claimed)
                        .find(|c| eligible.is_none_or(|e| e.any_in(*c, pool.cidr())));
                    if let Some(cidr) = unclaimed {
                        chosen = Some((*pool, Claim::Cut(cidr)));
                        break;
                    }
                    if listed.is_none() {
                        listed = Some(self.store.list(keys::BLOCKS).await?.0);
                    }
                    for kv in listed.iter().flatten() {
                        let mut block: Block = decode(&kv.key, &kv.value)?;
                        if block.affinity.is_some() || !belongs(&block, pool) || !block.has_available(now, cooldown) {
                            continue;
                        }
                        block.affinity = Some(owner.node.clone());
                        if let Some(ip) = take(&mut block, now) {
                            chosen = Some((*pool, Claim::Adopt(block, kv.mod_revision, ip)));
                            break;
                        }
                    }
                    if chosen.is_some() {
                        break;
                    }
                }
                if let Some((pool, claim)) = chosen {
                    // The claim holds only if the pool is still the one read: a pool deleted meanwhile (and
                    // maybe re-created with another block size) must not get a block cut the old way, nor
                    // hand out from one of its blocks.
                    let pool_key = keys::pool(pool.name());
                    let changed = |detail: &str| AllocError::PoolChanged {
                        pool: pool.name().to_string(),
                        detail: detail.to_string(),
                    };
                    let current = self.store.get(&pool_key).await?.ok_or_else(|| changed("it was deleted"))?;
                    let now_pool: IpPool = decode(&pool_key, &current.value)?;
                    if now_pool.cidr() != pool.cidr() || now_pool.block_size() != pool.block_size() {
                        return Err(changed("it was re-created with another range or block size"));
                    }
                    let (block, revision, ip) = match claim {
                        Claim::Cut(cidr) => {
                            let mut block = Block::new(cidr, pool.name(), &owner.node, now);
                            let ip = take(&mut block, now).ok_or_else(|| AllocError::Exhausted {
                                family,
                                pools: pool_names(pools),
                                node: owner.node.clone(),
                                detail: format!("new block {cidr} has no address"),
                            })?;
                            (block, None, ip)
                        }
                        Claim::Adopt(block, revision, ip) => (block, Some(revision), ip),
                    };
                    let affinity = Affinity { node: owner.node.clone(), cidr: block.cidr };
                    let mut txn = Txn::new()
                        .create(keys::affinity(&owner.node, block.cidr), encode(&affinity))
                        .unchanged(&pool_key, current.mod_revision);
                    if revision.is_some() {
                        txn = txn.remove(keys::unowned(block.cidr));
                    }
                    if self.commit_assignment(owner, &block, revision, txn).await? {
                        return Ok((Assigned { ip, pool: pool.name().to_string(), block: block.cidr }, false));
                    }
                    continue;
                }
            }

            // 3. Borrow from another node's block.
            if !config.strict_affinity {
                let (block_kvs, _) = self.store.list(keys::BLOCKS).await?;
                let mut borrowed = None;
                for kv in &block_kvs {
                    let mut block: Block = decode(&kv.key, &kv.value)?;
                    if in_pools(&block.cidr).is_none() || !block.has_available(now, cooldown) {
                        continue;
                    }
                    if let Some(ip) = take(&mut block, now) {
                        borrowed = Some((block, kv.mod_revision, ip));
                        break;
                    }
                }
                if let Some((block, rev, ip)) = borrowed {
                    if self.commit_assignment(owner, &block, Some(rev), Txn::new()).await? {
                        return Ok((Assigned { ip, pool: block.pool, block: block.cidr }, false));
                    }
                    continue;
                }
            }
            let detail = match (at_limit, config.strict_affinity) {
                (true, true) => format!(
                    "the node holds {} block(s), the maxBlocksPerHost limit, and they are full; strictAffinity forbids borrowing",
                    owned
                ),
                (true, false) => format!(
                    "the node holds {owned} block(s), the maxBlocksPerHost limit, and no block anywhere has a free address"
                ),
                (false, true) => {
                    "every block is claimed and this node's blocks are full; strictAffinity forbids borrowing"
                        .to_string()
                }
                (false, false) => {
                    let cooling = if cooldown > 0 {
                        format!(" (released addresses wait {cooldown}s before reuse)")
                    } else {
                        String::new()
                    };
                    format!("every address is in use{cooling}")
                }
            };
            return Err(AllocError::Exhausted { family, pools: pool_names(pools), node: owner.node.clone(), detail });
        }
        Err(AllocError::Contention { operation: format!("assigning an {family} address for {}", owner.handle) })
    }

    /// Assign from a block the node already owns. Concurrent requests on one node are served in batches of at
    /// most [`MAX_BATCH`]:
    /// whoever holds the node's turn takes every request waiting, assigns each an address from the node's
    /// blocks, and commits them all in one transaction, so a burst of pods on one node shares one commit
    /// instead of each racing for the same block's revision.
    async fn assign_from_owned(
        &self,
        owner: &Owner,
        pools: &[&IpPool],
        cooldown: u64,
        recording: Option<Recording>,
        eligible: Option<&Arc<ipam::Eligible>>,
    ) -> Result<Attempt, StoreError> {
        let queue = self.queues.get(&owner.node);
        let (reply, mut answer) = oneshot::channel();
        let pools = pools.iter().map(|p| p.cidr()).collect();
        queue.waiting.lock().unwrap_or_else(|p| p.into_inner()).push(Waiter {
            owner: owner.clone(),
            pools,
            cooldown,
            eligible: eligible.cloned(),
            recording,
            reply,
        });
        {
            let _turn = queue.turn.lock().await;
            match answer.try_recv() {
                Ok(result) => return result,
                // The batch that took this request was abandoned: try again.
                Err(oneshot::error::TryRecvError::Closed) => return Ok(Attempt::Conflict),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            // At most MAX_BATCH of them: the rest wait for the next turn, which one of them takes.
            let batch: Vec<Waiter> = {
                let mut waiting = queue.waiting.lock().unwrap_or_else(|p| p.into_inner());
                let take = waiting.len().min(MAX_BATCH);
                waiting.drain(..take).collect()
            };
            self.serve_batch(&owner.node, batch).await;
        }
        answer.await.unwrap_or(Ok(Attempt::Conflict))
    }

    async fn serve_batch(&self, node: &str, batch: Vec<Waiter>) {
        let outcome = self.assign_batch(node, &batch).await;
        match outcome {
            Ok(results) => {
                for (waiter, result) in batch.into_iter().zip(results) {
                    let _ = waiter.reply.send(Ok(result));
                }
            }
            Err(err) => {
                let message = err.to_string();
                for waiter in batch {
                    let _ = waiter.reply.send(Err(StoreError::backend("assign", &message)));
                }
            }
        }
    }

    async fn assign_batch(&self, node: &str, batch: &[Waiter]) -> Result<Vec<Attempt>, StoreError> {
        let (room_keys, _) = self.store.list_keys(&keys::node_room(node)).await?;
        let mut with_room: Vec<IpNet> = room_keys
            .iter()
            .filter_map(|k| keys::parse_cidr_segment(k.rsplit('/').next()?))
            .filter(|c| batch.iter().any(|w| w.pools.iter().any(|p| p.contains(c))))
            .collect();
        with_room.sort();
        // Releases in this process take the same block locks, in the same (sorted) order.
        let locks: Vec<_> = with_room.iter().map(|cidr| self.locks.get(format!("block/{cidr}"))).collect();
        let mut turns = Vec::with_capacity(locks.len());
        for lock in &locks {
            turns.push(lock.lock().await);
        }
        let now = (self.clock)();
        let mut blocks: BTreeMap<IpNet, (Block, Revision, bool)> = BTreeMap::new();
        for cidr in &with_room {
            if let Some((block, rev)) = self.block(*cidr).await?
                && block.affinity.as_deref() == Some(node)
            {
                blocks.insert(*cidr, (block, rev, false));
            }
        }

        let mut txn = Txn::new();
        let mut results = Vec::with_capacity(batch.len());
        let mut handles = BTreeSet::new();
        for waiter in batch {
            if !handles.insert(waiter.owner.handle.as_str()) {
                // The same handle twice in one batch (a repeated ADD): the retry finds the first one's address.
                results.push(Attempt::Conflict);
                continue;
            }
            let (mut record, handle_rev) = self.handle_record(&waiter.owner.handle).await?;
            let ipv6 = waiter.pools.first().is_some_and(|p| p.network().is_ipv6());
            if holds_family(&record, ipv6) {
                // A twin of this request committed since it looked; its retry returns the twin's address.
                results.push(Attempt::Conflict);
                continue;
            }
            let mut candidates: Vec<(usize, IpNet)> =
                blocks.keys().filter_map(|c| Some((waiter.pools.iter().position(|p| p.contains(c))?, *c))).collect();
            candidates.sort();
            let assigned = candidates.into_iter().find_map(|(_, cidr)| {
                let (block, _, dirty) = blocks.get_mut(&cidr)?;
                let ip = match &waiter.eligible {
                    None => block.assign_next(&waiter.owner, now, waiter.cooldown)?,
                    Some(eligible) => {
                        let pool = waiter.pools.iter().find(|p| p.contains(&cidr)).copied().unwrap_or(cidr);
                        block.assign_next_where(&waiter.owner, now, waiter.cooldown, |ip| eligible.allows(ip, pool))?
                    }
                };
                *dirty = true;
                Some(Assigned { ip, pool: block.pool.clone(), block: cidr })
            });
            let Some(assigned) = assigned else {
                results.push(Attempt::NoRoom);
                continue;
            };
            *record.blocks.entry(assigned.block).or_default() += 1;
            txn = txn.write(keys::handle(&waiter.owner.handle), handle_rev, encode(&record));
            if let Some(recording) = &waiter.recording {
                let ips: Vec<IpAddr> = recording.earlier.iter().copied().chain([assigned.ip]).collect();
                txn = txn.put(recording.record.key.clone(), (recording.record.value)(&ips));
            }
            results.push(Attempt::Done(assigned));
        }
        if !results.iter().any(|r| matches!(r, Attempt::Done(_))) {
            return Ok(results);
        }
        for (block, rev, dirty) in blocks.values() {
            if *dirty {
                txn = write_block(txn, block, Some(*rev));
            }
        }
        if self.store.txn(txn).await?.is_committed() {
            Ok(results)
        } else {
            Ok(batch.iter().map(|_| Attempt::Conflict).collect())
        }
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
        for _ in 0..MAX_ATTEMPTS {
            let now = (self.clock)();
            let committed = match self.block(cidr).await? {
                Some((mut block, rev)) => {
                    if config.strict_affinity && block.affinity.as_deref() != Some(owner.node.as_str()) {
                        return Err(unavailable(format!(
                            "its block {cidr} belongs to node {:?} and strictAffinity forbids borrowing",
                            block.affinity.unwrap_or_default()
                        )));
                    }
                    block
                        .assign_ip(ip, owner, now, config.reuse_cooldown_seconds)
                        .map_err(|e: BlockError| unavailable(e.to_string()))?;
                    self.commit_assignment(owner, &block, Some(rev), Txn::new()).await?
                }
                None => {
                    let mut block = Block::new(cidr, pool.name(), &owner.node, now);
                    block
                        .assign_ip(ip, owner, now, config.reuse_cooldown_seconds)
                        .map_err(|e| unavailable(e.to_string()))?;
                    let affinity = Affinity { node: owner.node.clone(), cidr };
                    let claim = Txn::new().create(keys::affinity(&owner.node, cidr), encode(&affinity));
                    self.commit_assignment(owner, &block, None, claim).await?
                }
            };
            if committed {
                return Ok(Assigned { ip, pool: pool.name().to_string(), block: cidr });
            }
        }
        Err(AllocError::Contention { operation: format!("assigning {ip}") })
    }

    /// Release every address of a handle, all in one transaction. Returns the addresses released (empty if
    /// the handle holds none: release is idempotent).
    pub async fn release_handle(&self, handle: &str) -> Result<Vec<IpAddr>, AllocError> {
        for _ in 0..MAX_ATTEMPTS {
            let now = (self.clock)();
            let key = keys::handle(handle);
            let Some(kv) = self.store.get(&key).await? else { return Ok(Vec::new()) };
            let record: HandleRecord = decode(&key, &kv.value)?;
            // The record's blocks are a sorted map, so every releaser takes the locks in one order.
            let locks: Vec<_> = record.blocks.keys().map(|cidr| self.locks.get(format!("block/{cidr}"))).collect();
            let mut turns = Vec::with_capacity(locks.len());
            for lock in &locks {
                turns.push(lock.lock().await);
            }
            let mut txn = Txn::new().delete(&key, kv.mod_revision);
            let mut released = Vec::new();
            for cidr in record.blocks.keys() {
                if let Some((mut block, rev)) = self.block(*cidr).await? {
                    released.extend(block.release_handle(handle, now));
                    txn = write_block(txn, &block, Some(rev));
                }
            }
            if self.store.txn(txn).await?.is_committed() {
                return Ok(released);
            }
        }
        Err(AllocError::Contention { operation: format!("releasing handle {handle}") })
    }

    /// Release one address. With `expected`, only if it is still the allocation the caller saw: the same
    /// block sequence number and the same handle (a block given back and claimed again starts its sequence
    /// over, so the sequence alone could match a newer allocation). Returns who held it, or `None` if it
    /// was not allocated.
    pub async fn release_ip(
        &self,
        ip: IpAddr,
        expected: Option<(u64, &str)>,
    ) -> Result<Option<Allocation>, AllocError> {
        for _ in 0..MAX_ATTEMPTS {
            let now = (self.clock)();
            let Some(cidr) = self.block_of(ip).await? else { return Ok(None) };
            let lock = self.locks.get(format!("block/{cidr}"));
            let _turn = lock.lock().await;
            // No block record: nobody claimed that block, so nothing in it is allocated.
            let Some((mut block, rev)) = self.block(cidr).await? else { return Ok(None) };
            let Some(current) = block.allocation(ip) else { return Ok(None) };
            if let Some((sequence, handle)) = expected
                && (current.sequence != sequence || current.handle != handle)
            {
                return Err(AllocError::Reassigned { ip, expected: sequence, actual: current.sequence });
            }
            let Some(allocation) = block.release_ip(ip, now) else { return Ok(None) };
            let mut txn = write_block(Txn::new(), &block, Some(rev));
            let (mut record, handle_rev) = self.handle_record(&allocation.handle).await?;
            if let Some(handle_rev) = handle_rev {
                let hkey = keys::handle(&allocation.handle);
                let count = record.blocks.entry(cidr).or_default();
                *count = count.saturating_sub(1);
                if *count == 0 {
                    record.blocks.remove(&cidr);
                }
                txn = if record.blocks.is_empty() {
                    txn.delete(hkey, handle_rev)
                } else {
                    txn.update(hkey, handle_rev, encode(&record))
                };
            }
            if self.store.txn(txn).await?.is_committed() {
                return Ok(Some(allocation));
            }
        }
        Err(AllocError::Contention { operation: format!("releasing {ip}") })
    }

    /// Give back to their pools the blocks of `node` that have been empty for the grace period and whose
    /// released addresses have finished their cooldown. Returns the blocks released.
    pub async fn release_empty_blocks(&self, node: &str) -> Result<Vec<IpNet>, AllocError> {
        let config = Catalog::new(Arc::clone(&self.store)).config().await?.0.spec;
        let now = (self.clock)();
        let (affinities, _) = self.store.list(&keys::node_affinities(node)).await?;
        let mut released = Vec::new();
        for akv in affinities {
            let affinity: Affinity = decode(&akv.key, &akv.value)?;
            let Some((block, rev)) = self.block(affinity.cidr).await? else { continue };
            let idle = block.empty_since.is_some_and(|t| now >= t.saturating_add(config.empty_block_grace_seconds));
            if idle && block.may_go_back(now, config.reuse_cooldown_seconds) {
                let txn = delete_block(Txn::new(), &block, rev).delete(&akv.key, akv.mod_revision);
                // A conflict means the block was used meanwhile: keep it.
                if let TxnOutcome::Committed(_) = self.store.txn(txn).await? {
                    released.push(block.cidr);
                }
            }
        }
        Ok(released)
    }

    /// Release a node's claim on a block (its node is gone): an empty block whose released addresses have
    /// cooled down goes back to its pool with the affinity; any other stays, owned by nobody, until it is
    /// (see [`Self::release_unowned_block`]), or until a claim adopts it. Returns whether anything was
    /// released.
    pub async fn release_affinity(&self, affinity: &Affinity) -> Result<bool, AllocError> {
        let cooldown = Catalog::new(Arc::clone(&self.store)).config().await?.0.spec.reuse_cooldown_seconds;
        let akey = keys::affinity(&affinity.node, affinity.cidr);
        for _ in 0..MAX_ATTEMPTS {
            let Some(akv) = self.store.get(&akey).await? else { return Ok(false) };
            let lock = self.locks.get(format!("block/{}", affinity.cidr));
            let _turn = lock.lock().await;
            let txn = Txn::new().delete(&akey, akv.mod_revision);
            let now = (self.clock)();
            let txn = match self.block(affinity.cidr).await? {
                None => txn,
                Some((block, rev)) if block.may_go_back(now, cooldown) => delete_block(txn, &block, rev),
                Some((block, rev)) => disown_block(txn, &block, rev),
            };
            if self.store.txn(txn).await?.is_committed() {
                return Ok(true);
            }
        }
        Err(AllocError::Contention { operation: format!("releasing node {}'s block {}", affinity.node, affinity.cidr) })
    }

    /// Give back a block nobody owns once it is empty and its released addresses have cooled down (given
    /// back sooner, it could be cut again at once and an address handed out inside its cooldown). Returns
    /// whether it was given back.
    pub async fn release_unowned_block(&self, cidr: IpNet) -> Result<bool, AllocError> {
        let cooldown = Catalog::new(Arc::clone(&self.store)).config().await?.0.spec.reuse_cooldown_seconds;
        let lock = self.locks.get(format!("block/{cidr}"));
        let _turn = lock.lock().await;
        let now = (self.clock)();
        match self.block(cidr).await? {
            Some((block, rev)) if block.affinity.is_none() && block.may_go_back(now, cooldown) => {
                Ok(self.store.txn(delete_block(Txn::new(), &block, rev)).await?.is_committed())
            }
            Some((block, _)) if block.affinity.is_none() => Ok(false),
            // Gone, or adopted: its index entry, if one is left, goes.
            _ => {
                self.store.txn(Txn::new().remove(keys::unowned(cidr))).await?;
                Ok(false)
            }
        }
    }

    /// The blocks nobody owns, from their index (what the collector gives back once empty and cooled down).
    pub async fn unowned_blocks(&self) -> Result<Vec<IpNet>, AllocError> {
        let (found, _) = self.store.list_keys(keys::UNOWNED).await?;
        Ok(found.iter().filter_map(|k| keys::parse_cidr_segment(k.strip_prefix(keys::UNOWNED)?)).collect())
    }

    /// What concerns `nodes`: their affinities, the blocks they own, and the blocks holding `addresses`
    /// (theirs, in blocks other nodes own). Reads per node and per block, never the whole store.
    pub async fn view_of(
        &self,
        nodes: &BTreeSet<String>,
        addresses: impl IntoIterator<Item = IpAddr>,
    ) -> Result<(Vec<Affinity>, Vec<Block>), AllocError> {
        let mut affinities = Vec::new();
        let mut cidrs = BTreeSet::new();
        for node in nodes {
            for kv in self.store.list(&keys::node_affinities(node)).await?.0 {
                let affinity: Affinity = decode(&kv.key, &kv.value)?;
                cidrs.insert(affinity.cidr);
                affinities.push(affinity);
            }
        }
        let elsewhere: Vec<IpAddr> = addresses.into_iter().filter(|ip| !cidrs.iter().any(|c| c.contains(ip))).collect();
        if !elsewhere.is_empty() {
            let pools = Catalog::new(Arc::clone(&self.store)).pools().await?;
            // Addresses of deleted pools are found among the block names, listed once for all of them.
            let mut orphans = Vec::new();
            for ip in elsewhere {
                match pools.iter().find_map(|(p, _)| ipam::block_containing(p, ip)) {
                    Some(cidr) => {
                        cidrs.insert(cidr);
                    }
                    None => orphans.push(ip),
                }
            }
            if !orphans.is_empty() {
                let listed = self.block_cidrs().await?;
                cidrs.extend(orphans.iter().filter_map(|ip| listed.iter().find(|c| c.contains(ip)).copied()));
            }
        }
        let mut blocks = Vec::with_capacity(cidrs.len());
        for cidr in cidrs {
            if let Some((block, _)) = self.block(cidr).await? {
                blocks.push(block);
            }
        }
        Ok((affinities, blocks))
    }

    /// Everything `ipam check` and `ipam show` look at.
    pub async fn snapshot(&self) -> Result<Snapshot, AllocError> {
        fn all<T: serde::de::DeserializeOwned>(kvs: &[KeyValue]) -> Result<Vec<T>, StoreError> {
            kvs.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
        }
        let pools = Catalog::new(Arc::clone(&self.store)).pools().await?.into_iter().map(|(p, _)| p).collect();
        Ok(Snapshot {
            pools,
            blocks: all(&self.store.list(keys::BLOCKS).await?.0)?,
            affinities: all(&self.store.list(keys::AFFINITIES).await?.0)?,
            handles: all(&self.store.list(keys::HANDLES).await?.0)?,
            nodes: self
                .store
                .list_keys(keys::NODES)
                .await?
                .0
                .iter()
                .filter_map(|k| k.strip_prefix(keys::NODES))
                .map(str::to_string)
                .collect(),
        })
    }
}

/// Whether a handle already holds an address of the family (a pod gets one per family).
fn holds_family(record: &HandleRecord, ipv6: bool) -> bool {
    record.blocks.keys().any(|cidr| cidr.network().is_ipv6() == ipv6)
}

/// How a claim gets its block: cut from the pool, or adopted from nobody (with its revision and the address
/// taken from it).
enum Claim {
    Cut(IpNet),
    Adopt(Block, Revision, IpAddr),
}

/// Whether `block` is a block of `pool` as the pool is now: a block of a deleted pool of the same name, cut
/// at another size or from another range, is not.
fn belongs(block: &Block, pool: &IpPool) -> bool {
    block.pool == pool.name() && block.cidr.prefix_len() == pool.block_size() && pool.cidr().contains(&block.cidr)
}

fn pool_names(pools: &[&IpPool]) -> String {
    pools.iter().map(|p| format!("{:?}", p.name())).collect::<Vec<_>>().join(", ")
}
