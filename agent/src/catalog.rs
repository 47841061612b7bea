//! Operator actions on the datastore: applying and deleting pools, the IPAM config and standalone
//! namespaces, with the checks that need what is already stored (overlaps, immutable fields, pools in use).
//!
//! A batch of documents is validated whole and written in one transaction: either every document applies or
//! the store is left exactly as it was.

use std::{collections::BTreeMap, sync::Arc};

use serde::{Serialize, de::DeserializeOwned};

use crate::{
    ipam::Block,
    objects::{
        AFFINITY_LABEL, Kind, UNOWNED_LABEL,
        kv::{list_raw, stage_delete, stage_unchanged, stage_update},
    },
    resources::{
        IpPool, IpamConfig, Located, Location, Namespace, Resource, ResourceError, check_pool_annotation, valid_name,
    },
    store::{Revision, Store, StoreError, Txn, TxnOutcome, keys},
};

/// A deleted pool, as the firewall export remembers it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetiredPool {
    /// Its name.
    pub name: String,
    /// Its CIDR (the family of its set).
    pub cidr: ipnet::IpNet,
}

/// Errors from operator actions.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A document is invalid on its own.
    #[error(transparent)]
    Invalid(#[from] ResourceError),
    /// Two pools (given or stored) overlap.
    #[error("{at}: IPPool {pool:?}: field spec.cidr: {cidr} overlaps pool {other:?} ({other_cidr}){other_at}")]
    Overlap {
        /// The document being applied.
        at: Location,
        /// Its pool.
        pool: String,
        /// Its CIDR.
        cidr: String,
        /// The pool it overlaps.
        other: String,
        /// That pool's CIDR.
        other_cidr: String,
        /// Where the other pool was given, if in the same batch (` (from file: document N)`).
        other_at: String,
    },
    /// An immutable field of an existing pool was changed.
    #[error(
        "{at}: IPPool {pool:?}: field {field}: cannot change {old} to {new}: {field} is immutable once a pool exists. \
         To migrate, create a new pool with the new value, set `disabled: true` on {pool:?} so no new addresses come \
         from it, recreate the pods that use it, then delete it"
    )]
    Immutable {
        /// The document.
        at: Location,
        /// The pool.
        pool: String,
        /// `spec.cidr` or `spec.blockSize`.
        field: &'static str,
        /// The stored value.
        old: String,
        /// The value given.
        new: String,
    },
    /// The same object appears twice in one batch.
    #[error("{at}: {object} is also given at {first}; give each object once")]
    Duplicate {
        /// The second occurrence.
        at: Location,
        /// The object.
        object: String,
        /// The first occurrence.
        first: Location,
    },
    /// The named object does not exist.
    #[error("{kind} {name:?} does not exist")]
    NotFound {
        /// `IPPool` or `Namespace`.
        kind: &'static str,
        /// The name given.
        name: String,
    },
    /// A pool cannot be deleted while addresses are allocated from it.
    #[error(
        "IPPool {pool:?} still has {addresses} allocated address(es) in {blocks} block(s); release them first \
         (`poolwarden ipam release`), or use --force to delete the pool and leave them allocated until released"
    )]
    PoolInUse {
        /// The pool.
        pool: String,
        /// Addresses allocated from it.
        addresses: usize,
        /// Blocks claimed from it.
        blocks: usize,
    },
    /// A new pool covers blocks still in the datastore (left by a pool deleted with --force, or cooling down):
    /// their addresses may be live or just released, and a pool over them would hand those addresses out again.
    #[error(
        "{at}: IPPool {pool:?}: field spec.cidr: {cidr} overlaps block(s) {blocks} left by a deleted pool, whose \
         addresses may still be in use or were released less than reuseCooldownSeconds ago; release them first \
         (`poolwarden get blocks` lists them, `poolwarden ipam release --ip ADDRESS` frees an address, and an \
         empty block goes back with its node's `poolwarden ipam release-empty-blocks --node NODE`, or, owned by \
         nobody, with the agents' next collection once its addresses have cooled down)"
    )]
    LeftoverBlocks {
        /// Where the pool was given.
        at: Location,
        /// The pool.
        pool: String,
        /// Its CIDR.
        cidr: String,
        /// The blocks it overlaps, comma-separated.
        blocks: String,
    },
    /// A `key=value` argument was malformed or its value is invalid.
    #[error("{0}")]
    BadArgument(String),
    /// Concurrent writers kept changing what this action read.
    #[error("gave up after {0} attempts: the datastore kept changing underneath; try again")]
    Contention(usize),
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How many times an action is retried on a revision conflict.
pub const MAX_ATTEMPTS: usize = 16;

/// What applying one document did, as `kubectl apply` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// `ippool/external-pool`.
    pub object: String,
    /// `created`, `configured` or `unchanged`.
    pub action: &'static str,
}

/// Typed access to the operator-owned records.
pub struct Catalog {
    store: Arc<dyn Store>,
    clock: crate::ipam::Clock,
}

/// Decode a JSON record, naming the key if it is corrupt.
pub fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt { key: key.to_string(), message: e.to_string() })
}

/// Encode a record as JSON.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

impl Catalog {
    /// Operate on `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_clock(store, crate::ipam::system_clock())
    }

    /// Operate on `store`, judging cooldowns by `clock` (the allocator's, in tests).
    pub fn with_clock(store: Arc<dyn Store>, clock: crate::ipam::Clock) -> Self {
        Self { store, clock }
    }

    /// Every pool, with its revision, in name order.
    pub async fn pools(&self) -> Result<Vec<(IpPool, Revision)>, StoreError> {
        let (kvs, _) = self.store.list(keys::POOLS).await?;
        kvs.iter().map(|kv| Ok((decode(&kv.key, &kv.value)?, kv.mod_revision))).collect()
    }

    /// Every block, in either layout: the multi-key records, or the block objects of the single-object
    /// allocator (a datastore holds one of them).
    pub async fn blocks(&self) -> Result<Vec<Block>, StoreError> {
        let (kvs, _) = self.store.list(keys::BLOCKS).await?;
        let mut blocks: Vec<Block> = kvs.iter().map(|kv| decode(&kv.key, &kv.value)).collect::<Result<_, _>>()?;
        let objects = list_raw::<Block>(self.store.as_ref(), Kind::Block).await?;
        blocks.extend(objects.into_iter().map(|o| o.spec));
        Ok(blocks)
    }

    /// Record pool `name`, which had `cidr`, as deleted (a migration's copy of another datastore's record).
    pub async fn record_retired(&self, name: &str, cidr: ipnet::IpNet) -> Result<(), StoreError> {
        let retired = RetiredPool { name: name.to_string(), cidr };
        self.store.txn(Txn::new().put(keys::retired_pool(name), encode(&retired))).await.map(drop)
    }

    /// Pools deleted so far (by `delete pool`) that no pool of the same name has replaced.
    pub async fn retired_pools(&self) -> Result<Vec<RetiredPool>, StoreError> {
        let (kvs, _) = self.store.list(keys::RETIRED_POOLS).await?;
        let (live, _) = self.store.list(keys::POOLS).await?;
        let retired: Vec<RetiredPool> = kvs.iter().map(|kv| decode(&kv.key, &kv.value)).collect::<Result<_, _>>()?;
        Ok(retired.into_iter().filter(|r| !live.iter().any(|kv| kv.key == keys::pool(&r.name))).collect())
    }

    /// The IPAM config (the default if none was applied) and its revision.
    pub async fn config(&self) -> Result<(IpamConfig, Option<Revision>), StoreError> {
        match self.store.get(keys::IPAM_CONFIG).await? {
            Some(kv) => Ok((decode(&kv.key, &kv.value)?, Some(kv.mod_revision))),
            None => Ok((IpamConfig::default(), None)),
        }
    }

    /// One standalone namespace.
    pub async fn namespace(&self, name: &str) -> Result<Option<(Namespace, Revision)>, StoreError> {
        let key = keys::namespace(name);
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some((decode(&key, &kv.value)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Every standalone namespace.
    pub async fn namespaces(&self) -> Result<Vec<Namespace>, StoreError> {
        let (kvs, _) = self.store.list(keys::NAMESPACES).await?;
        kvs.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
    }

    /// Validate the documents against each other and the store, then write them all in one transaction.
    pub async fn apply(&self, docs: &[Located]) -> Result<Vec<Applied>, CatalogError> {
        Self::once_each(docs)?;
        for _ in 0..MAX_ATTEMPTS {
            let stored = self.pools().await?;
            let (mut txn, applied) = self.plan(docs, &stored).await?;
            if applied.iter().all(|a| a.action == "unchanged") {
                return Ok(applied);
            }
            // The overlap check depends on every stored pool, so the transaction requires none changed.
            for (pool, rev) in &stored {
                if !docs.iter().any(|d| matches!(&d.resource, Resource::IpPool(p) if p.name() == pool.name())) {
                    txn = txn.unchanged(keys::pool(pool.name()), *rev);
                }
            }
            if let TxnOutcome::Committed(_) = self.store.txn(txn).await? {
                return Ok(applied);
            }
        }
        Err(CatalogError::Contention(MAX_ATTEMPTS))
    }

    /// Judge the documents as [`Catalog::apply`] would, writing nothing.
    pub async fn check(&self, docs: &[Located]) -> Result<Vec<Applied>, CatalogError> {
        Self::once_each(docs)?;
        let stored = self.pools().await?;
        Ok(self.plan(docs, &stored).await?.1)
    }

    pub(crate) fn once_each(docs: &[Located]) -> Result<(), CatalogError> {
        let mut seen: BTreeMap<String, &Location> = BTreeMap::new();
        for doc in docs {
            let object = doc.resource.describe();
            if let Some(first) = seen.insert(object.clone(), &doc.at) {
                return Err(CatalogError::Duplicate { at: doc.at.clone(), object, first: first.clone() });
            }
        }
        Ok(())
    }

    async fn plan(&self, docs: &[Located], stored: &[(IpPool, Revision)]) -> Result<(Txn, Vec<Applied>), CatalogError> {
        let mut txn = Txn::new();
        let mut applied = Vec::new();
        let given: Vec<(&IpPool, &Location)> = docs
            .iter()
            .filter_map(|d| match &d.resource {
                Resource::IpPool(p) => Some((p, &d.at)),
                _ => None,
            })
            .collect();
        for (i, (pool, at)) in given.iter().enumerate() {
            let overlaps = |other: &IpPool| {
                other.name() != pool.name()
                    && (other.cidr().contains(&pool.cidr()) || pool.cidr().contains(&other.cidr()))
            };
            let overlap = |other: &IpPool, other_at: String| CatalogError::Overlap {
                at: (*at).clone(),
                pool: pool.name().to_string(),
                cidr: pool.cidr().to_string(),
                other: other.name().to_string(),
                other_cidr: other.cidr().to_string(),
                other_at,
            };
            if let Some((other, other_at)) = given[..i].iter().find(|(other, _)| overlaps(other)) {
                return Err(overlap(other, format!(" (from {other_at})")));
            }
            let replaced = |name: &str| given.iter().any(|(p, _)| p.name() == name);
            if let Some((other, _)) = stored.iter().find(|(other, _)| overlaps(other) && !replaced(other.name())) {
                return Err(overlap(other, " (already applied)".to_string()));
            }
            let existing = stored.iter().find(|(p, _)| p.name() == pool.name());
            if existing.is_none() {
                // Any block in the new pool's range is another pool's leftover: an overlap.
                // Either layout: the multi-key records, or the block objects of the single-object allocator.
                let (block_keys, _) = self.store.list_keys(keys::BLOCKS).await?;
                let objects = list_raw::<Block>(self.store.as_ref(), Kind::Block).await?;
                let leftovers: Vec<String> = block_keys
                    .iter()
                    .filter_map(|k| keys::parse_cidr_segment(k.strip_prefix(keys::BLOCKS)?))
                    .chain(objects.iter().map(|o| o.spec.cidr))
                    .filter(|b| pool.cidr().contains(b) || b.contains(&pool.cidr()))
                    .map(|b| b.to_string())
                    .collect();
                if !leftovers.is_empty() {
                    return Err(CatalogError::LeftoverBlocks {
                        at: (*at).clone(),
                        pool: pool.name().to_string(),
                        cidr: pool.cidr().to_string(),
                        blocks: leftovers.join(", "),
                    });
                }
            }
            if let Some((old, _)) = existing {
                let immutable = |field, old: String, new: String| CatalogError::Immutable {
                    at: (*at).clone(),
                    pool: pool.name().to_string(),
                    field,
                    old,
                    new,
                };
                if old.cidr() != pool.cidr() {
                    return Err(immutable("spec.cidr", old.cidr().to_string(), pool.cidr().to_string()));
                }
                if old.block_size() != pool.block_size() {
                    return Err(immutable(
                        "spec.blockSize",
                        old.block_size().to_string(),
                        pool.block_size().to_string(),
                    ));
                }
            }
            let object = format!("ippool/{}", pool.name());
            txn = Self::stage(
                txn,
                &mut applied,
                object,
                keys::pool(pool.name()),
                existing.map(|(p, r)| (encode(p), *r)),
                encode(pool),
            );
        }
        for doc in docs {
            match &doc.resource {
                Resource::IpPool(_) => {}
                Resource::IpamConfig(config) => {
                    let (old, rev) = self.config().await?;
                    let existing = rev.map(|r| (encode(&old), r));
                    txn = Self::stage(
                        txn,
                        &mut applied,
                        "ipamconfig/default".into(),
                        keys::IPAM_CONFIG.into(),
                        existing,
                        encode(config),
                    );
                }
                Resource::Namespace(ns) => {
                    let existing = self.namespace(ns.name()).await?.map(|(n, r)| (encode(&n), r));
                    let object = format!("namespace/{}", ns.name());
                    txn = Self::stage(txn, &mut applied, object, keys::namespace(ns.name()), existing, encode(ns));
                }
            }
        }
        Ok((txn, applied))
    }

    fn stage(
        mut txn: Txn,
        applied: &mut Vec<Applied>,
        object: String,
        key: String,
        existing: Option<(Vec<u8>, Revision)>,
        value: Vec<u8>,
    ) -> Txn {
        let action = match &existing {
            None => "created",
            Some((old, _)) if *old == value => "unchanged",
            Some(_) => "configured",
        };
        if action != "unchanged" {
            txn = txn.write(key, existing.map(|(_, r)| r), value);
        }
        applied.push(Applied { object, action });
        txn
    }

    /// Delete a pool. Refused while addresses are allocated from it, unless `force`; returns the blocks that
    /// were left behind (their addresses stay allocated until released). An empty block whose released
    /// addresses are still cooling down stays too, owned by nobody, until the agents' collection gives it
    /// back once they have cooled down: deleted now, a pool re-created over the range would hand them out at
    /// once (meanwhile such a pool is refused, as over any leftover block).
    pub async fn delete_pool(&self, name: &str, force: bool) -> Result<Vec<Block>, CatalogError> {
        let cooldown = self.config().await?.0.spec.reuse_cooldown_seconds;
        for _ in 0..MAX_ATTEMPTS {
            let now = (self.clock)();
            let key = keys::pool(name);
            let kv = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| CatalogError::NotFound { kind: "IPPool", name: name.to_string() })?;
            let pool: IpPool = decode(&key, &kv.value)?;
            let (block_kvs, _) = self.store.list(keys::BLOCKS).await?;
            let mut in_use = Vec::new();
            let mut txn = Txn::new().delete(&key, kv.mod_revision);
            for bkv in &block_kvs {
                let block: Block = decode(&bkv.key, &bkv.value)?;
                if !pool.cidr().contains(&block.cidr) {
                    continue;
                }
                if block.is_empty() {
                    // Empty blocks go with the pool, with their affinities; a cooling one stays, owned by
                    // nobody (indexed for the collection).
                    txn = if block.may_go_back(now, cooldown) {
                        delete_block(txn, &block, bkv.mod_revision)
                    } else {
                        disown_block(txn, &block, bkv.mod_revision)
                    };
                    if let Some(node) = &block.affinity {
                        let akey = keys::affinity(node, block.cidr);
                        if let Some(akv) = self.store.get(&akey).await? {
                            txn = txn.delete(akey, akv.mod_revision);
                        }
                    }
                } else {
                    txn = txn.unchanged(&bkv.key, bkv.mod_revision);
                    in_use.push(block);
                }
            }
            // The same for the block objects of the single-object allocator (a datastore holds one layout).
            for object in list_raw::<Block>(self.store.as_ref(), Kind::Block).await? {
                let block = &object.spec;
                if !pool.cidr().contains(&block.cidr) {
                    continue;
                }
                if !block.is_empty() {
                    txn = stage_unchanged(txn, Kind::Block, &object);
                    in_use.push(block.clone());
                } else if block.may_go_back(now, cooldown) {
                    txn = stage_delete(txn, Kind::Block, &object);
                } else {
                    let mut disowned = block.clone();
                    disowned.affinity = None;
                    let mut labels = object.labels.clone();
                    labels.remove(AFFINITY_LABEL);
                    labels.insert(UNOWNED_LABEL.to_string(), "true".to_string());
                    txn = stage_update(txn, Kind::Block, &object, &labels, &disowned);
                }
            }
            if !in_use.is_empty() && !force {
                let addresses = in_use.iter().map(|b| b.used() as usize).sum();
                return Err(CatalogError::PoolInUse { pool: name.to_string(), addresses, blocks: in_use.len() });
            }
            // The record that keeps the pool's firewall set emptied goes first, on its own: if the deletion
            // then fails, a record of a pool that exists is ignored.
            let retired = RetiredPool { name: name.to_string(), cidr: pool.cidr() };
            self.store.txn(Txn::new().put(keys::retired_pool(name), encode(&retired))).await?;
            if self.store.txn(txn).await?.is_committed() {
                return Ok(in_use);
            }
        }
        Err(CatalogError::Contention(MAX_ATTEMPTS))
    }

    /// Set or remove (`key-`) labels or annotations of a standalone namespace, creating it if needed.
    pub async fn edit_namespace(
        &self,
        name: &str,
        changes: &[String],
        annotations: bool,
    ) -> Result<Namespace, CatalogError> {
        if !valid_name(name) || name.contains('.') {
            return Err(CatalogError::BadArgument(format!("{name:?} is not a valid namespace name")));
        }
        let mut edits = Vec::new();
        for change in changes {
            let edit = if let Some(key) = change.strip_suffix('-') {
                (key.to_string(), None)
            } else if let Some((key, value)) = change.split_once('=') {
                (key.to_string(), Some(value.to_string()))
            } else {
                return Err(CatalogError::BadArgument(format!(
                    "{change:?}: expected key=value, or key- to remove the key"
                )));
            };
            if edit.0.is_empty() {
                return Err(CatalogError::BadArgument(format!("{change:?}: the key is empty")));
            }
            if let (true, Some(value)) = (annotations, &edit.1) {
                check_pool_annotation(&edit.0, value).map_err(|message| {
                    CatalogError::BadArgument(format!("annotation {} on namespace {name:?}: {message}", edit.0))
                })?;
            }
            edits.push(edit);
        }
        for _ in 0..MAX_ATTEMPTS {
            let (mut ns, rev) = match self.namespace(name).await? {
                Some((ns, rev)) => (ns, Some(rev)),
                None => {
                    let mut ns = Namespace::default();
                    ns.metadata.name = name.to_string();
                    ns.metadata.labels.insert("kubernetes.io/metadata.name".into(), name.to_string());
                    (ns, None)
                }
            };
            let map = if annotations { &mut ns.metadata.annotations } else { &mut ns.metadata.labels };
            for (key, value) in &edits {
                match value {
                    Some(value) => map.insert(key.clone(), value.clone()),
                    None => map.remove(key),
                };
            }
            if self.store.txn(Txn::new().write(keys::namespace(name), rev, encode(&ns))).await?.is_committed() {
                return Ok(ns);
            }
        }
        Err(CatalogError::Contention(MAX_ATTEMPTS))
    }
}

/// Write a block record and keep its node's room index in step with it, or, for a block nobody owns, the
/// index of those (an adoption, which gives it an owner again, removes that entry itself).
pub fn write_block(txn: Txn, block: &Block, revision: Option<Revision>) -> Txn {
    let txn = txn.write(keys::block(block.cidr), revision, encode(block));
    match &block.affinity {
        Some(node) if block.free_count() > 0 => txn.put(keys::room(node, block.cidr), Vec::new()),
        Some(node) => txn.remove(keys::room(node, block.cidr)),
        None => txn.put(keys::unowned(block.cidr), Vec::new()),
    }
}

/// Write `block` (read at `revision`) as owned by nobody: out of its node's room index, into the index of
/// blocks nobody owns. Its node's affinity record is the caller's to remove.
pub fn disown_block(txn: Txn, block: &Block, revision: Revision) -> Txn {
    let mut disowned = block.clone();
    let previous = disowned.affinity.take();
    let txn = write_block(txn, &disowned, Some(revision));
    match previous {
        Some(node) => txn.remove(keys::room(&node, block.cidr)),
        None => txn,
    }
}

/// Delete a block and its index entry (room, or unowned).
pub fn delete_block(txn: Txn, block: &Block, revision: Revision) -> Txn {
    let txn = txn.delete(keys::block(block.cidr), revision);
    match &block.affinity {
        Some(node) => txn.remove(keys::room(node, block.cidr)),
        None => txn.remove(keys::unowned(block.cidr)),
    }
}
