//! `poolwarden datastore migrate`: a cluster's IPAM state copied from the etcd or embedded datastore (the
//! multi-key layout of `agent/src/allocator/mod.rs`) to the objects of the single-object allocator
//! (`docs/allocator-single-object.md`, section "Migration"): every block with its affinity and allocations,
//! each allocation carrying the endpoint record its agent wrote (as the allocation's attributes), so nothing
//! an agent restarts from is lost. Pools and the IPAM configuration are copied by the caller as resources.
//!
//! It runs with the agents stopped and refuses, having kept nothing, when an agent is still registered, the
//! source does not pass `ipam check`, the target already holds blocks, or the source changed while it was
//! copied (its revision moved). A run stopped part way (killed, the API server gone) is run again: the blocks
//! it made are labelled with the source's revision, kept when the source is still at it, deleted otherwise.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    sync::Arc,
};

use ipnet::IpNet;

use crate::{
    allocator::{Allocator, check_attributes, single},
    catalog::{Catalog, CatalogError, decode},
    daemon::Endpoint,
    ipam::{Block, check},
    objects::{Kind, Labels, ObjectError, ObjectStore},
    resources::{IpPool, IpamConfig, Resource},
    store::{Revision, Store, StoreError, Txn, keys},
};

/// Why a migration stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The etcd or embedded datastore failed.
    #[error("the datastore: {0}")]
    Store(#[from] StoreError),
    /// The datastore's pools could not be read or written.
    #[error("the datastore's pools: {0}")]
    Catalog(#[from] CatalogError),
    /// The block objects failed.
    #[error("the IPAMBlocks: {0}")]
    Objects(#[from] ObjectError),
    /// The pool resources could not be read or written.
    #[error("the Kubernetes API: {0}")]
    Kubernetes(#[from] crate::k8s::pools::SyncError),
    /// The state is not one to copy as it is.
    #[error("{0}")]
    Refused(String),
}

fn refused(message: impl Into<String>) -> MigrateError {
    MigrateError::Refused(message.into())
}

/// What the source holds, read at one revision.
#[derive(Debug)]
pub struct Source {
    /// The source's newest revision when it was read ([`fingerprint`]); the copy is refused if it moves.
    pub revision: Revision,
    /// How many keys the source had then.
    pub keys: usize,
    /// The pools.
    pub pools: Vec<IpPool>,
    /// The IPAM configuration.
    pub config: IpamConfig,
    /// Every block, each allocation's attributes filled from its endpoint record.
    pub blocks: Vec<Block>,
    /// How many allocations had no endpoint record (an ADD cut short, or a leak): copied as they are, for
    /// the agents' collection to judge as before.
    pub without_record: usize,
    /// What the objects do not take, with why (counted by kind).
    pub left: Vec<String>,
}

impl Source {
    /// How many addresses the blocks hold.
    pub fn addresses(&self) -> usize {
        self.blocks.iter().map(|b| b.allocated().count()).sum()
    }

    /// The value of [`MIGRATED_LABEL`] on the blocks copied from this state.
    pub fn label(&self) -> String {
        format!("{}-{}", self.revision, self.keys)
    }
}

/// What a datastore holds, in two numbers: its newest key's revision and how many keys it has. Any write
/// moves one of them (a put raises the first, a delete lowers the second), and nothing else does: not a lease
/// keep-alive, not another user's keys in the same etcd (whose cluster-wide revision moves with them).
pub async fn fingerprint(store: &Arc<dyn Store>) -> Result<(Revision, usize), MigrateError> {
    let (all, _) = store.list("").await?;
    Ok((all.iter().map(|kv| kv.mod_revision).max().unwrap_or(0), all.len()))
}

/// Read everything to copy from `store`, with its agents stopped.
pub async fn read(store: &Arc<dyn Store>) -> Result<Source, MigrateError> {
    let (revision, count) = fingerprint(store).await?;
    if let Some(from) = crate::store::unfinished_migration(store.as_ref()).await? {
        return Err(refused(format!(
            "a migration into this datastore (from {from}) did not finish: its state is partial, nothing to copy from"
        )));
    }
    let (registered, _) = store.list_keys(keys::NODES).await?;
    let registered: Vec<&str> = registered.iter().filter_map(|k| k.strip_prefix(keys::NODES)).collect();
    if !registered.is_empty() {
        return Err(refused(format!(
            "agents are registered for node(s) {}: stop every agent first (delete the DaemonSet, or stop \
             `poolwarden agent` on each node) and wait for their registrations to lapse (--registration-ttl, 30s \
             by default), so nothing changes while the state is copied",
            registered.join(", ")
        )));
    }
    let source = read_state(store, revision, count).await?;
    unchanged(store, &source).await?;
    Ok(source)
}

/// What [`read`] copies, read without its checks of the agents and of a migration in progress (the in-place
/// conversion makes those itself): the multi-key records, or, on a datastore an agent of this version ran on,
/// its block objects.
async fn read_state(store: &Arc<dyn Store>, revision: Revision, count: usize) -> Result<Source, MigrateError> {
    if !has_records(store).await? {
        let allocator = single::BlockAllocator::of_store(Arc::clone(store));
        let snapshot = allocator.snapshot().await.map_err(|e| refused(e.to_string()))?;
        let (config, _) = Catalog::new(Arc::clone(store)).config().await?;
        let left = left_behind(store).await?;
        let blocks = snapshot.blocks;
        return Ok(Source { revision, keys: count, pools: snapshot.pools, config, blocks, without_record: 0, left });
    }
    let mut snapshot = Allocator::new(Arc::clone(store)).snapshot().await.map_err(|e| refused(e.to_string()))?;
    // With the agents stopped, nobody's liveness is known (a node's own registration may outlive its agent):
    // nothing is called leaked, as `ipam check` does with no agent registered.
    snapshot.nodes.clear();
    let problems = check::check(&snapshot);
    if !problems.is_empty() {
        let listed: Vec<String> = problems.iter().take(5).map(ToString::to_string).collect();
        return Err(refused(format!(
            "the source does not pass `poolwarden ipam check` ({} problem(s): {}{}): run `poolwarden ipam check \
             --repair` on it first, so that what is copied is one consistent state",
            problems.len(),
            listed.join("; "),
            if problems.len() > listed.len() { "; ..." } else { "" }
        )));
    }
    let (config, _) = Catalog::new(Arc::clone(store)).config().await?;
    let (records, _) = store.list(keys::ENDPOINTS).await?;
    let mut endpoints: BTreeMap<(String, String), Endpoint> = BTreeMap::new();
    for kv in &records {
        let Some((node, handle)) = kv.key.strip_prefix(keys::ENDPOINTS).and_then(|rest| rest.split_once('/')) else {
            continue;
        };
        endpoints.insert((node.to_string(), handle.to_string()), decode(&kv.key, &kv.value)?);
    }
    let mut blocks = snapshot.blocks;
    let mut without_record = 0;
    let mut used: BTreeSet<(String, String)> = BTreeSet::new();
    for block in &mut blocks {
        for allocation in block.allocations.values_mut() {
            let key = (allocation.node.clone(), allocation.handle.clone());
            let Some(endpoint) = endpoints.get(&key) else {
                without_record += 1;
                continue;
            };
            let attributes = endpoint.attributes();
            check_attributes(&allocation.handle, &attributes)
                .map_err(|e| refused(format!("the endpoint record on node {}: {e}", allocation.node)))?;
            allocation.attributes.extend(attributes);
            used.insert(key);
        }
    }
    let mut left = Vec::new();
    let unused = endpoints.keys().filter(|k| !used.contains(*k)).count();
    if unused > 0 {
        left.push(format!("{unused} endpoint record(s) with no address (their attachments hold none)"));
    }
    left.extend(left_behind(store).await?);
    Ok(Source { revision, keys: count, pools: snapshot.pools, config, blocks, without_record, left })
}

/// Whether `store` holds the IPAM state of an older poolwarden not converted yet (its multi-key records, and
/// no mark of this version's layout): what this version reads there would be empty.
pub async fn older_layout(store: &Arc<dyn Store>) -> Result<bool, MigrateError> {
    let mark = store.get(IN_PROGRESS).await?;
    let converted = mark.is_some_and(|kv| kv.value == crate::store::OBJECTS_LAYOUT.as_bytes());
    Ok(!converted && has_records(store).await?)
}

/// Whether `store` holds records of the multi-key layout.
async fn has_records(store: &Arc<dyn Store>) -> Result<bool, MigrateError> {
    for prefix in IPAM {
        if !store.list_keys(prefix).await?.0.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// What a copy to Kubernetes leaves behind, counted by kind.
async fn left_behind(store: &Arc<dyn Store>) -> Result<Vec<String>, MigrateError> {
    let mut left = Vec::new();
    for (prefix, what) in [
        (keys::NODE_ADDRESSES, "node address record(s) (Kubernetes' Node objects say where nodes are)"),
        (keys::DECOMMISSIONED, "decommissioned node mark(s) (in Kubernetes a node is gone when its Node is deleted)"),
        (keys::NAMESPACES, "standalone namespace record(s) (a cluster's namespaces are Kubernetes')"),
    ] {
        let (found, _) = store.list_keys(prefix).await?;
        if !found.is_empty() {
            left.push(format!("{} {what}", found.len()));
        }
    }
    Ok(left)
}

/// The label on a block a migration created, naming the source's revision it was copied at. The allocator
/// writes a block's labels from what the block holds, so the first write by an agent takes it away: a block
/// that has it was written by a migration and by nobody since.
pub const MIGRATED_LABEL: &str = "poolwarden.io/migrated-at-revision";

/// What the target's blocks let a migration of `source` do: the CIDRs of blocks already copied (left by a run
/// of this same migration that stopped part way: labelled with the source's revision, holding what the source
/// holds), which are kept. Blocks a stopped migration left from another revision of the source are deleted (no
/// agent ever wrote them). Any other block is refused: a migration never merges two states.
pub async fn check_target(objects: &dyn ObjectStore, source: &Source) -> Result<BTreeSet<IpNet>, MigrateError> {
    let (existing, _) = objects.list(Kind::Block, &Labels::new()).await?;
    if let Some(other) = existing.iter().find(|o| !o.labels.contains_key(MIGRATED_LABEL)) {
        return Err(refused(format!(
            "the target already holds {} IPAMBlock(s) ({} among them, written since by an agent or by hand, not \
             a migration's own): a migration copies into a target with none, it never merges two states",
            existing.len(),
            other.name
        )));
    }
    let revision = source.label();
    let wanted: BTreeMap<IpNet, &Block> = source.blocks.iter().map(|b| (b.cidr, b)).collect();
    let mut kept = BTreeSet::new();
    for object in &existing {
        let block = single::decode(object)?.block;
        if object.labels.get(MIGRATED_LABEL) == Some(&revision) && wanted.get(&block.cidr) == Some(&&block) {
            kept.insert(block.cidr);
        } else {
            objects.delete(Kind::Block, &object.name, &object.version).await?;
        }
    }
    Ok(kept)
}

/// Create one object per block not in `kept`, labelled with the source's `revision`; on a failure, delete
/// those created (the blocks kept stay, for a run again to keep). The names and versions created.
pub async fn write_blocks(
    objects: &dyn ObjectStore,
    blocks: &[Block],
    label: &str,
    kept: &BTreeSet<IpNet>,
) -> Result<Vec<(String, String)>, MigrateError> {
    let mut created = Vec::new();
    for block in blocks.iter().filter(|b| !kept.contains(&b.cidr)) {
        let name = single::block_name(block.cidr);
        let mut labels = single::labels_of(block);
        labels.insert(MIGRATED_LABEL.to_string(), label.to_string());
        match objects.create(Kind::Block, &name, labels, single::encode(block)).await {
            Ok(object) => created.push((object.name, object.version)),
            Err(e) => {
                remove_blocks(objects, &created).await;
                return Err(e.into());
            }
        }
    }
    Ok(created)
}

/// Delete the blocks a migration created (each at the version it created, so nothing another writer changed
/// since is touched). What could not be deleted is left, and reported by the next `check_target`.
pub async fn remove_blocks(objects: &dyn ObjectStore, created: &[(String, String)]) {
    for (name, version) in created {
        if let Err(e) = objects.delete(Kind::Block, name, version).await {
            tracing::warn!(block = %name, error = %e, "a block the migration created could not be removed");
        }
    }
}

/// Read the blocks back from the target and compare them with what was written.
pub async fn verify(objects: &dyn ObjectStore, blocks: &[Block]) -> Result<(), MigrateError> {
    let (stored, _) = objects.list(Kind::Block, &Labels::new()).await?;
    let read: BTreeMap<_, _> =
        stored.iter().map(|o| single::decode(o).map(|s| (s.block.cidr, s.block))).collect::<Result<_, _>>()?;
    for block in blocks {
        if read.get(&block.cidr) != Some(block) {
            return Err(refused(format!("block {} does not read back from the target as it was written", block.cidr)));
        }
    }
    if read.len() != blocks.len() {
        return Err(refused(format!(
            "the target holds {} blocks after the copy, not the {} written: did something else write to it?",
            read.len(),
            blocks.len()
        )));
    }
    Ok(())
}

/// Refuse if the source moved since `source` was read (checked once it is read, and after the copy: the
/// caller then removes what it wrote).
pub async fn unchanged(store: &Arc<dyn Store>, source: &Source) -> Result<(), MigrateError> {
    let now = fingerprint(store).await?;
    if now != (source.revision, source.keys) {
        return Err(refused(format!(
            "the source changed during the copy (newest revision and keys {}/{}, now {}/{}): an agent or a \
             command is still writing to it; nothing was kept in the target",
            source.revision, source.keys, now.0, now.1
        )));
    }
    Ok(())
}

/// `poolwarden datastore migrate --to kubernetes`: copy `store`'s pools, configuration and blocks to the API
/// server `client` reaches, as IPPool, IPAMConfig and IPAMBlock resources; all or nothing. What it did goes
/// to `out`.
pub async fn to_kubernetes(store: &Arc<dyn Store>, client: kube::Client, out: &mut String) -> Result<(), MigrateError> {
    use crate::k8s::pools::{self, Present};
    let source = read(store).await?;
    let objects = crate::objects::kubernetes::KubeObjects::new(client.clone());
    let mut resources: Vec<Resource> = source.pools.iter().cloned().map(Resource::IpPool).collect();
    resources.push(Resource::IpamConfig(source.config.clone()));
    let defaults = pools::same(&source.config.spec, &IpamConfig::default().spec);
    let mut absent = Vec::new();
    for resource in &resources {
        match pools::present(&client, resource).await? {
            // The defaults need no resource.
            Present::Absent if defaults && matches!(resource, Resource::IpamConfig(_)) => {}
            Present::Absent => absent.push(resource),
            Present::Same => {}
            Present::Different(what) => {
                return Err(refused(format!(
                    "{what}: a migration never overwrites what is already applied (delete that resource, or make \
                     the datastore's the same, and run it again)"
                )));
            }
        }
    }
    // After every refusal that writes nothing: this deletes what a stopped run left from another state.
    let kept = check_target(&objects, &source).await?;
    let mut created: Vec<&Resource> = Vec::new();
    let mut blocks = Vec::new();
    let copied = async {
        for resource in &absent {
            pools::create(&client, resource).await?;
            created.push(resource);
        }
        // Accepted where they come from: the agents allocate from them as they are, and never judge them
        // against their own blocks.
        for pool in &source.pools {
            pools::accept_as_is(&client, pool.name()).await?;
        }
        // The deleted pools' records, so that every firewall export goes on emptying their sets.
        for retired in Catalog::new(Arc::clone(store)).retired_pools().await? {
            pools::record_retired(&client, &crate::k8s::pools::agents_namespace(), &retired.name, retired.cidr).await?;
        }
        blocks = write_blocks(&objects, &source.blocks, &source.label(), &kept).await?;
        verify(&objects, &source.blocks).await?;
        unchanged(store, &source).await
    }
    .await;
    if let Err(e) = copied {
        remove_blocks(&objects, &blocks).await;
        for resource in created {
            if let Err(e) = pools::remove(&client, resource).await {
                tracing::warn!(error = %e, "a resource the migration created could not be removed");
            }
        }
        return Err(e);
    }
    let new_pools = absent.iter().filter(|r| matches!(r, Resource::IpPool(_))).count();
    let _ = writeln!(
        out,
        "copied {} pool(s) ({new_pools} created, {} already there), the IPAM configuration ({}) and {} block(s) \
         holding {} address(es) to Kubernetes; the datastore did not change throughout (newest revision {})",
        source.pools.len(),
        source.pools.len() - new_pools,
        if defaults { "the defaults: nothing to write" } else { "as IPAMConfig default" },
        source.blocks.len(),
        source.addresses(),
        source.revision
    );
    if !kept.is_empty() {
        let _ = writeln!(
            out,
            "note: {} of the blocks were already there, copied from this same state by a run that stopped part way",
            kept.len()
        );
    }
    if source.without_record > 0 {
        let _ = writeln!(
            out,
            "note: {} address(es) had no endpoint record (an ADD cut short, or a leak): copied with their handles, \
             for the agents' collection to judge as before",
            source.without_record
        );
    }
    for what in &source.left {
        let _ = writeln!(out, "not copied: {what}");
    }
    Ok(())
}

/// The key a migration into a key-value datastore holds while it writes: an agent does not start on a
/// datastore that has it (the state is partial), and a migration run again finds it and starts over.
pub const IN_PROGRESS: &str = keys::MIGRATION_IN_PROGRESS;

/// How many keys one transaction of the copy writes (etcd refuses more than 128 operations in one).
const KEYS_PER_TXN: usize = 64;

/// The records of the multi-key layout that hold `blocks`: each block with its node's room entry and its
/// affinity, a borrowed record for each address a node holds in a block it does not own, a handle record per
/// handle, and an endpoint record per attachment whose allocations carry one (its addresses gathered from
/// every block). Keyed as the multi-key allocator and the agent write them.
pub fn records(blocks: &[Block]) -> Result<BTreeMap<String, Vec<u8>>, MigrateError> {
    use crate::{cluster::Borrowed, ipam::Affinity, ipam::HandleRecord};
    let mut out = BTreeMap::new();
    let mut handles: BTreeMap<String, HandleRecord> = BTreeMap::new();
    let mut endpoints: BTreeMap<(String, String), Endpoint> = BTreeMap::new();
    for block in blocks {
        // The endpoint records hold the attributes in this layout.
        let mut bare = block.clone();
        bare.allocations.values_mut().for_each(|a| a.attributes.clear());
        out.insert(keys::block(block.cidr), crate::catalog::encode(&bare));
        if let Some(node) = &block.affinity {
            out.insert(
                keys::affinity(node, block.cidr),
                crate::catalog::encode(&Affinity { node: node.clone(), cidr: block.cidr }),
            );
            if block.free_count() > 0 {
                out.insert(keys::room(node, block.cidr), Vec::new());
            }
        } else {
            out.insert(keys::unowned(block.cidr), Vec::new());
        }
        for (ip, allocation) in block.allocated() {
            if block.affinity.as_deref() != Some(allocation.node.as_str()) {
                out.insert(keys::borrowed(ip), crate::catalog::encode(&Borrowed { ip, node: allocation.node.clone() }));
            }
            let record = handles
                .entry(allocation.handle.clone())
                .or_insert_with(|| HandleRecord { handle: allocation.handle.clone(), ..Default::default() });
            *record.blocks.entry(block.cidr).or_default() += 1;
            if allocation.attributes.is_empty() {
                continue;
            }
            let key = (allocation.node.clone(), allocation.handle.clone());
            if let Some(endpoint) = endpoints.get_mut(&key) {
                endpoint.ips.push(ip);
                continue;
            }
            let endpoint = Endpoint::from_attributes(
                allocation.namespace.as_deref().unwrap_or_default(),
                allocation.pod.as_deref().unwrap_or_default(),
                vec![ip],
                &allocation.attributes,
            )
            .and_then(|endpoint| endpoint.check_names(&allocation.handle).map(|()| endpoint))
            .map_err(|e| refused(format!("block {}, address {ip} (handle {}): {e}", block.cidr, allocation.handle)))?;
            endpoints.insert(key, endpoint);
        }
    }
    for (handle, record) in handles {
        out.insert(keys::handle(&handle), crate::catalog::encode(&record));
    }
    for ((node, handle), mut endpoint) in endpoints {
        endpoint.ips.sort_by_key(|ip| ip.is_ipv6());
        out.insert(keys::endpoint(&node, &handle), crate::catalog::encode(&endpoint));
    }
    Ok(out)
}

/// Most keys and bytes one transaction of the copy writes: etcd refuses more than 128 operations or 1.5 MiB
/// in one request.
const TXN_BYTES: usize = 1 << 20;

/// Write `records` in transactions within etcd's limits.
async fn put_all(store: &Arc<dyn Store>, records: &BTreeMap<String, Vec<u8>>) -> Result<(), MigrateError> {
    let mut txn = Txn::new();
    let (mut keys_in, mut bytes_in) = (0, 0);
    for (key, value) in records {
        let size = key.len() + value.len();
        if keys_in > 0 && (keys_in == KEYS_PER_TXN || bytes_in + size > TXN_BYTES) {
            store.txn(std::mem::replace(&mut txn, Txn::new())).await?;
            (keys_in, bytes_in) = (0, 0);
        }
        txn = txn.put(key.as_str(), value.clone());
        keys_in += 1;
        bytes_in += size;
    }
    if keys_in > 0 {
        store.txn(txn).await?;
    }
    Ok(())
}

/// What [`convert_in_place`] did, or why not now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conversion {
    /// The datastore holds no record of the older layout (it is marked [`crate::store::OBJECTS_LAYOUT`] now).
    NotNeeded,
    /// Its records were converted to block objects and removed.
    Converted {
        /// The blocks converted.
        blocks: usize,
        /// The addresses they hold.
        addresses: usize,
    },
    /// Not now, and why: agents of the older version are registered, or another agent converts.
    Wait(String),
}

/// What a caller of [`convert_in_place`] remembers, from call to call, of another agent's conversion mark: a
/// mark whose revision has not moved for `patience` on this process's own monotonic clock was left by a
/// converter that died (a running one rewrites it between its steps and every [`BLOCKS_PER_REFRESH`]
/// blocks), whatever the nodes' wall clocks say.
#[derive(Debug)]
pub struct MarkWatch {
    seen: Option<(Revision, std::time::Instant)>,
    patience: std::time::Duration,
}

impl Default for MarkWatch {
    fn default() -> Self {
        Self::with_patience(std::time::Duration::from_secs(60))
    }
}

impl MarkWatch {
    /// A watch that takes a mark over once it has not moved for `patience`.
    pub fn with_patience(patience: std::time::Duration) -> Self {
        Self { seen: None, patience }
    }
}

/// How many blocks a conversion writes between two rewrites of its mark.
const BLOCKS_PER_REFRESH: usize = 64;

/// Set, with [`crate::store::OBJECTS_LAYOUT`], while a conversion removes the records it converted: records
/// found under the layout mark without it were written since, by an agent of an older version.
const REMOVING: &str = "config/conversion-removing-records";

/// Convert, in place, what agents of older versions wrote (the multi-key records) into the block objects
/// this version's agents allocate in, as `me`'s agent starts (`docs/allocator-single-object.md`, "Switching
/// the agent", step 5). Only with every other agent stopped: while another node is registered (an older
/// agent still runs, or its registration has not lapsed) it is [`Conversion::Wait`]. The steps, each safe to
/// stop at:
///
/// 1. mark the datastore as being converted by `me` ([`crate::store::CONVERTING`]; taken only if nobody holds
///    it, or over a mark that has not moved for a minute, see [`MarkWatch`]), then look for registrations (an
///    older agent looks for a mark after it registers: one of the two sees the other);
/// 2. read the records (refused if they do not pass `ipam check`) and write one object per block, each
///    allocation carrying its endpoint record as attributes, rewriting the mark as it goes; read the objects
///    back and the records again;
/// 3. mark the layout for good ([`crate::store::OBJECTS_LAYOUT`]: older agents never start on it again);
/// 4. remove the records.
///
/// Stopped in 2, the next converter finds the objects and redoes them (or keeps those of the same records);
/// stopped in 4, the next agent removes what is left of the records. A datastore without records is only
/// marked (steps 1 and 3). Records that appear under the layout mark are refused, not removed: an agent of an
/// older version wrote them.
pub async fn convert_in_place(
    store: &Arc<dyn Store>,
    me: &str,
    watch: &mut MarkWatch,
) -> Result<Conversion, MigrateError> {
    use crate::store::{CONVERTING, OBJECTS_LAYOUT, TxnOutcome};
    let mark = store.get(IN_PROGRESS).await?;
    let value = mark.as_ref().map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
    match value.as_deref() {
        Some(v) if v == OBJECTS_LAYOUT => {
            if has_records(store).await? {
                if store.get(REMOVING).await?.is_none() {
                    return Err(refused(
                        "the datastore was converted to block objects, yet it holds records of the older layout \
                         (blocks/, endpoints/ ...) written since: an agent of an older poolwarden ran on it. Stop \
                         it; what it allocated there is not in this version's state",
                    ));
                }
                // A conversion stopped in step 4: its records go now.
                remove_records(store).await?;
            }
            store.txn(Txn::new().remove(REMOVING)).await?;
            return Ok(Conversion::NotNeeded);
        }
        Some(v) if v.starts_with(CONVERTING) => {
            let revision = mark.as_ref().map_or(0, |kv| kv.mod_revision);
            match watch.seen {
                Some((seen, since)) if seen == revision && since.elapsed() >= watch.patience => {}
                Some((seen, _)) if seen == revision => {
                    return Ok(Conversion::Wait(format!("{v} (waiting for it to finish)")));
                }
                _ => {
                    watch.seen = Some((revision, std::time::Instant::now()));
                    return Ok(Conversion::Wait(format!("{v} (waiting for it to finish)")));
                }
            }
        }
        Some(v) => {
            return Err(refused(format!(
                "a migration into this datastore (from {v}) did not finish: run `poolwarden datastore migrate` \
                 again to completion before starting agents on it"
            )));
        }
        None => {}
    }
    let ours = format!("{CONVERTING}node {me}");
    let taken = match &mark {
        None => Txn::new().still_absent(IN_PROGRESS),
        Some(kv) => Txn::new().unchanged(IN_PROGRESS, kv.mod_revision),
    };
    let TxnOutcome::Committed(mut held) = store.txn(taken.put(IN_PROGRESS, ours.clone().into_bytes())).await? else {
        return Ok(Conversion::Wait("another agent began converting the datastore".into()));
    };
    let done = convert_marked(store, me, &ours, &mut held).await;
    if !matches!(done, Ok(Conversion::NotNeeded | Conversion::Converted { .. })) {
        // Left for a run again, which keeps or redoes what this one wrote; nobody waits for a mark.
        store.txn(Txn::new().unchanged(IN_PROGRESS, held).remove(IN_PROGRESS)).await?;
    }
    done
}

/// The nodes other than `me` that hold a registration.
async fn other_registrations(store: &Arc<dyn Store>, me: &str) -> Result<Vec<String>, MigrateError> {
    let (registered, _) = store.list_keys(keys::NODES).await?;
    // This node's own registration is its previous agent's (a node runs one agent; the embedded store, which
    // one process holds, keeps it for good).
    Ok(registered.iter().filter_map(|k| k.strip_prefix(keys::NODES)).filter(|n| *n != me).map(String::from).collect())
}

/// Steps 2 to 4 of [`convert_in_place`], under `me`'s mark (`ours`, last written at `held`).
async fn convert_marked(
    store: &Arc<dyn Store>,
    me: &str,
    ours: &str,
    held: &mut Revision,
) -> Result<Conversion, MigrateError> {
    use crate::store::{OBJECTS_LAYOUT, TxnOutcome};
    let wait = |others: Vec<String>| {
        Conversion::Wait(format!(
            "agents are registered for node(s) {}, and an agent of this version starts only once the datastore \
             is converted to block objects, which needs every agent stopped: stop every agent of the older \
             version (their registrations lapse after --registration-ttl, 30s by default); the first agent of \
             this version to start then converts it",
            others.join(", ")
        ))
    };
    let others = other_registrations(store, me).await?;
    if !others.is_empty() {
        return Ok(wait(others));
    }
    let refresh = async |held: &mut Revision| -> Result<(), MigrateError> {
        let rewrite = Txn::new().unchanged(IN_PROGRESS, *held).put(IN_PROGRESS, ours.as_bytes().to_vec());
        match store.txn(rewrite).await? {
            TxnOutcome::Committed(revision) => {
                *held = revision;
                Ok(())
            }
            TxnOutcome::Conflict { .. } => {
                Err(refused("another agent took the conversion over: it took this one for dead"))
            }
        }
    };
    let records = has_records(store).await?;
    let mut converted = Conversion::NotNeeded;
    if records {
        let (revision, count) = fingerprint(store).await?;
        let source = read_state(store, revision, count).await?;
        let objects = crate::objects::kv::KeyValueObjects::new(Arc::clone(store));
        let kept = check_target(&objects, &source).await?;
        refresh(held).await?;
        let missing: Vec<Block> = source.blocks.iter().filter(|b| !kept.contains(&b.cidr)).cloned().collect();
        for chunk in missing.chunks(BLOCKS_PER_REFRESH) {
            write_blocks(&objects, chunk, &source.label(), &kept).await?;
            refresh(held).await?;
        }
        verify(&objects, &source.blocks).await?;
        // Nothing wrote records meanwhile (no agent runs, and the mark keeps new ones off): read them again.
        if read_state(store, revision, count).await?.blocks != source.blocks {
            return Err(refused(
                "the records changed while they were converted: is an agent of the older version running?",
            ));
        }
        converted = Conversion::Converted { blocks: source.blocks.len(), addresses: source.addresses() };
    }
    let others = other_registrations(store, me).await?;
    if !others.is_empty() {
        return Ok(wait(others));
    }
    let marked = Txn::new().unchanged(IN_PROGRESS, *held).put(IN_PROGRESS, OBJECTS_LAYOUT.as_bytes().to_vec());
    let marked = if records { marked.put(REMOVING, Vec::new()) } else { marked };
    if !store.txn(marked).await?.is_committed() {
        return Err(refused("another agent took the conversion over: it took this one for dead"));
    }
    if records {
        remove_records(store).await?;
        store.txn(Txn::new().remove(REMOVING)).await?;
    }
    Ok(converted)
}

/// Remove every record of the multi-key layout.
async fn remove_records(store: &Arc<dyn Store>) -> Result<(), MigrateError> {
    for prefix in IPAM {
        let (found, _) = store.list_keys(prefix).await?;
        for chunk in found.chunks(KEYS_PER_TXN) {
            store.txn(chunk.iter().fold(Txn::new(), |txn, key| txn.remove(key.as_str()))).await?;
        }
    }
    Ok(())
}

/// The prefixes of the multi-key layout's IPAM records.
const IPAM: [&str; 7] =
    [keys::BLOCKS, keys::AFFINITIES, keys::ROOM, keys::UNOWNED, keys::HANDLES, keys::ENDPOINTS, keys::BORROWED];

/// Write `blocks` into `store` in the multi-key layout (see [`records`]), the pools and configuration first
/// (through the catalog, so they are judged as `apply` judges them), and leave [`IN_PROGRESS`] set: the
/// caller clears it ([`finish`]) once it has checked what it wrote. Everything that can refuse is judged
/// before anything is written. Refused when an agent is registered on `store`, or it holds pools, settings
/// or IPAM records (a migration never merges), unless those are what a migration that did not finish left
/// ([`IN_PROGRESS`]): then they are removed and the copy starts over.
pub async fn into_store(
    store: &Arc<dyn Store>,
    docs: &[crate::resources::Located],
    blocks: &[Block],
    from: &str,
) -> Result<usize, MigrateError> {
    let records = records(blocks)?;
    let mark = store.get(IN_PROGRESS).await?.map(|kv| kv.value);
    if mark.as_deref() == Some(crate::store::OBJECTS_LAYOUT.as_bytes()) {
        return Err(refused(
            "agents of a newer poolwarden ran on the target (it keeps block objects): migrate into a datastore no \
             agent ran on",
        ));
    }
    let interrupted = mark.is_some();
    let mut leftovers = Vec::new();
    for prefix in IPAM.into_iter().chain([keys::POOLS, keys::IPAM_CONFIG]) {
        let (found, _) = store.list_keys(prefix).await?;
        if let Some(first) = found.first().filter(|_| !interrupted) {
            return Err(refused(format!(
                "the target already holds {} record(s) under {prefix} ({first} first): a migration copies into a \
                 datastore with no pools and no IPAM state, it never merges two states",
                found.len()
            )));
        }
        leftovers.extend(found);
    }
    let catalog = Catalog::new(Arc::clone(store));
    if !interrupted {
        catalog.check(docs).await?;
    }
    // Taken only if nobody holds it (another migration), then the agents: an agent that starts after this
    // finds it and does not start.
    let marked = store.txn(Txn::new().still_absent(IN_PROGRESS).put(IN_PROGRESS, from.as_bytes().to_vec())).await?;
    if !marked.is_committed() && !interrupted {
        return Err(refused("another migration into this datastore began meanwhile"));
    }
    let (registered, _) = store.list_keys(keys::NODES).await?;
    if let Some(node) = registered.first() {
        if !interrupted {
            store.txn(Txn::new().remove(IN_PROGRESS)).await?;
        }
        return Err(refused(format!(
            "an agent is registered on the target ({}): stop every agent before migrating into it",
            node.strip_prefix(keys::NODES).unwrap_or(node)
        )));
    }
    for chunk in leftovers.chunks(KEYS_PER_TXN) {
        store.txn(chunk.iter().fold(Txn::new(), |txn, key| txn.remove(key.as_str()))).await?;
    }
    catalog.apply(docs).await?;
    put_all(store, &records).await?;
    Ok(records.len())
}

/// The copy into `store` is whole and checked: agents may start on it.
pub async fn finish(store: &Arc<dyn Store>) -> Result<(), MigrateError> {
    store.txn(Txn::new().remove(IN_PROGRESS)).await?;
    Ok(())
}

/// `poolwarden datastore migrate --from kubernetes --to etcd:URL|embedded:PATH`: the IPPool, IPAMConfig and
/// IPAMBlock resources `client` reaches written into `store` in the multi-key layout the agents there run.
/// Until the copy is checked (`ipam check` on it, and no IPAMBlock changed meanwhile) the target stays marked
/// [`IN_PROGRESS`], so a failure or a kill at any point leaves agents refusing to start on it, and a run again
/// starts over.
pub async fn from_kubernetes(
    client: kube::Client,
    store: &Arc<dyn Store>,
    out: &mut String,
) -> Result<(), MigrateError> {
    let objects = crate::objects::kubernetes::KubeObjects::new(client.clone());
    let (before, _) = objects.list(Kind::Block, &Labels::new()).await?;
    let blocks: Vec<Block> = before.iter().map(|o| single::decode(o).map(|s| s.block)).collect::<Result<_, _>>()?;
    let docs = crate::k8s::pools::resources(&client).await?;
    let written = into_store(store, &docs, &blocks, "kubernetes").await?;
    let catalog = Catalog::new(Arc::clone(store));
    for (name, cidr) in crate::k8s::pools::retired(&client, &crate::k8s::pools::agents_namespace()).await? {
        catalog.record_retired(&name, cidr).await?;
    }
    let snapshot = Allocator::new(Arc::clone(store)).snapshot().await.map_err(|e| refused(e.to_string()))?;
    let problems = check::check(&snapshot);
    if let Some(first) = problems.first() {
        return Err(refused(format!(
            "what the API server's blocks hold does not pass `ipam check` once copied ({} problem(s), first: \
             {first}); the target stays marked as a migration that did not finish",
            problems.len()
        )));
    }
    let (after, _) = objects.list(Kind::Block, &Labels::new()).await?;
    let versions = |objects: &[crate::objects::Object]| -> Vec<(String, String)> {
        objects.iter().map(|o| (o.name.clone(), o.version.clone())).collect()
    };
    if versions(&before) != versions(&after) {
        return Err(refused(
            "the IPAMBlocks changed during the copy: is an agent still running? The target stays marked as a \
             migration that did not finish (its agents will not start on it); run the migration again once \
             nothing writes",
        ));
    }
    finish(store).await?;
    let pools = docs.iter().filter(|d| matches!(d.resource, Resource::IpPool(_))).count();
    let addresses: usize = blocks.iter().map(|b| b.allocated().count()).sum();
    let _ = writeln!(
        out,
        "copied {pools} pool(s), {} and {} block(s) holding {addresses} address(es) from Kubernetes into the \
         datastore ({written} records); no IPAMBlock changed during the copy",
        if docs.iter().any(|d| matches!(d.resource, Resource::IpamConfig(_))) {
            "the IPAM configuration"
        } else {
            "no IPAM configuration (the defaults)"
        },
        blocks.len()
    );
    Ok(())
}

/// What the tests of a migration (here, and on etcd and the API server in the test crate) start from.
pub mod fixtures {
    use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

    use crate::{
        allocator::{Allocator, AssignRequest, Record},
        catalog::encode,
        daemon::Endpoint,
        ipam::{NamespaceInfo, NodeInfo, PodInfo, Requested},
        store::{Store, Txn, keys},
    };

    /// The handle of attachment `n` (its container's and interface's, as an ADD makes it).
    pub fn handle(n: usize) -> String {
        crate::ipam::handle_for(&format!("{n:064x}"), "eth0")
    }

    /// The endpoint record of attachment `n` on `node`, as the agent writes it (addresses aside).
    pub fn endpoint(n: usize, node: &str) -> Endpoint {
        Endpoint {
            container_id: format!("{n:064x}"),
            ifname: "eth0".into(),
            host_ifname: poolwarden_protocol::host_ifname(&format!("{n:064x}"), "eth0"),
            netns: format!("/var/run/netns/cni-{n:08x}-0000-0000-0000-000000000000"),
            namespace: "default".into(),
            pod: format!("pod-{n}"),
            pod_uid: format!("{n:08x}-1111-2222-3333-444444444444"),
            ips: Vec::new(),
            hook: if n.is_multiple_of(2) { poolwarden_protocol::EnforcementHook::Tcx } else { Default::default() },
            bridge_port: String::new(),
            bridge_port_index: 0,
            network: format!("net-{node}"),
            added_at: 1_700_000_000 + n as u64,
        }
    }

    /// `count` attachments over `nodes` through the multi-key allocator from `pools` (every third from the
    /// last, the others from the first), each with its endpoint record (written with the addresses, or after
    /// them as the agent does when the allocator cannot), every fourth released, and attachment
    /// `without_record` (if any) with no record. The records of those kept, by (node, handle).
    pub async fn populate(
        store: &Arc<dyn Store>,
        pools: &[&str],
        nodes: &[&str],
        count: usize,
        without_record: Option<usize>,
    ) -> BTreeMap<(String, String), Endpoint> {
        let allocator = Allocator::new(Arc::clone(store));
        let loaded = allocator.load().await.expect("load");
        let mut kept = BTreeMap::new();
        for n in 0..count {
            let node = nodes[n % nodes.len()];
            let handle = handle(n);
            let template = endpoint(n, node);
            let value_of = template.clone();
            let record = Record {
                key: keys::endpoint(node, &handle),
                value: Arc::new(move |ips: &[IpAddr]| encode(&Endpoint { ips: ips.to_vec(), ..value_of.clone() })),
            };
            let pool = if n % 3 == 0 { pools[pools.len() - 1] } else { pools[0] };
            let request = AssignRequest {
                handle: handle.clone(),
                node: NodeInfo { name: node.into(), labels: Default::default() },
                namespace: NamespaceInfo::bare("default"),
                pod: Some(PodInfo { name: template.pod.clone(), annotations: Default::default() }),
                requested: Requested::from_pool_names(&loaded.pools, &[pool.into()], vec![]),
                eligible: None,
                attributes: Default::default(),
            };
            let recorded = without_record != Some(n);
            let (assigned, committed) =
                allocator.assign_recording(&request, recorded.then_some(&record), &loaded).await.expect("assign");
            let ips: Vec<IpAddr> = assigned.iter().map(|a| a.ip).collect();
            if recorded && !committed {
                store.txn(Txn::new().put(&record.key, (record.value)(&ips))).await.expect("record");
            }
            if n % 4 == 3 {
                allocator.release_handle(&handle).await.expect("release");
                store.txn(Txn::new().remove(record.key.clone())).await.expect("record");
            } else if recorded {
                kept.insert((node.to_string(), handle), Endpoint { ips, ..template });
            }
        }
        kept
    }

    /// Every record under the multi-key layout's IPAM prefixes, with its value as text.
    pub async fn ipam_records(store: &Arc<dyn Store>) -> BTreeMap<String, String> {
        let mut all = BTreeMap::new();
        for prefix in super::IPAM {
            let (kvs, _) = store.list(prefix).await.expect("list");
            all.extend(kvs.into_iter().map(|kv| (kv.key, String::from_utf8_lossy(&kv.value).into_owned())));
        }
        all
    }

    /// The records `a` and `b` do not share, each with its value on both sides.
    pub fn differences(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| format!("{k}: {:?} / {:?}", a.get(k), b.get(k)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{
        fixtures::{differences, endpoint, handle, ipam_records},
        *,
    };
    use crate::{catalog::encode, objects::kv::KeyValueObjects, store::embedded::EmbeddedStore};

    fn store(dir: &tempfile::TempDir, name: &str) -> Arc<dyn Store> {
        Arc::new(EmbeddedStore::open(&dir.path().join(name)).expect("embedded store"))
    }

    async fn pool(store: &Arc<dyn Store>, name: &str, cidr: &str) {
        let text = format!(
            "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {{cidr: {cidr}, blockSize: 29}}\n"
        );
        let docs = crate::resources::parse_documents("pools.yaml", &text).expect("pool");
        assert!(matches!(docs[0].resource, Resource::IpPool(_)));
        Catalog::new(Arc::clone(store)).apply(&docs).await.expect("apply");
    }

    /// 40 attachments on two nodes from pools `a` and `b`, 10 released, the fifth without a record.
    async fn populate(store: &Arc<dyn Store>) -> BTreeMap<(String, String), Endpoint> {
        pool(store, "a", "10.90.0.0/24").await;
        pool(store, "b", "10.91.0.0/24").await;
        fixtures::populate(store, &["a", "b"], &["node-a", "node-b"], 40, Some(5)).await
    }

    #[test]
    fn an_endpoint_reads_back_from_its_attributes() {
        let mut full = endpoint(4, "node-a");
        full.bridge_port = "veth1234".into();
        full.bridge_port_index = 17;
        full.ips = vec!["10.0.0.1".parse().unwrap()];
        for e in [full, endpoint(3, "node-b"), Endpoint { added_at: 0, network: String::new(), ..endpoint(5, "x") }] {
            let attributes = e.attributes();
            check_attributes(&e.container_id, &attributes).expect("within what a block keeps per address");
            assert!(attributes.values().all(|v| !v.is_empty()), "{attributes:?}");
            let back = Endpoint::from_attributes(&e.namespace, &e.pod, e.ips.clone(), &attributes).expect("reads");
            assert_eq!(back, e);
        }
        let own = endpoint(6, "node-a");
        own.check_names(&handle(6)).expect("an ADD's names");
        let err = own.check_names(&handle(7)).unwrap_err();
        assert!(err.contains(&handle(6)), "{err}");
        let uplink = Endpoint { host_ifname: "eth0".into(), ..own };
        let err = uplink.check_names(&handle(6)).unwrap_err();
        assert!(err.contains("\"eth0\""), "{err}");
        let bad = BTreeMap::from([("bridgePortIndex".to_string(), "x".to_string())]);
        let err = Endpoint::from_attributes("ns", "pod", vec![], &bad).unwrap_err();
        assert!(err.contains("bridgePortIndex"), "{err}");
    }

    #[tokio::test]
    async fn every_allocation_and_endpoint_record_reaches_the_block_objects() {
        let dir = tempfile::tempdir().unwrap();
        let source = store(&dir, "source.db");
        let endpoints = populate(&source).await;
        let read = read(&source).await.expect("read");
        assert_eq!(read.pools.len(), 2);
        assert_eq!(read.without_record, 1, "the fifth was assigned without a record");
        assert_eq!(read.addresses(), 30, "40 assigned, 10 released");

        let objects: Arc<dyn ObjectStore> = Arc::new(KeyValueObjects::new(store(&dir, "target.db")));
        let kept = check_target(objects.as_ref(), &read).await.expect("empty target");
        assert!(kept.is_empty());
        write_blocks(objects.as_ref(), &read.blocks, &read.label(), &kept).await.expect("write");
        verify(objects.as_ref(), &read.blocks).await.expect("verify");
        unchanged(&source, &read).await.expect("source unchanged");

        // The block allocator on the target finds every node's attachments with the endpoint each recorded.
        let pools: Arc<dyn single::PoolSource> = Arc::new(Catalog::new(Arc::clone(&source)));
        let allocator = single::BlockAllocator::new(Arc::clone(&objects), pools);
        let mut found = BTreeMap::new();
        for node in ["node-a", "node-b"] {
            for attachment in allocator.attachments(node).await.expect("attachments") {
                if attachment.handle == handle(5) {
                    assert!(attachment.attributes.is_empty());
                    continue;
                }
                let ips = attachment.addresses.iter().map(|a| a.ip).collect();
                let endpoint = Endpoint::from_attributes(
                    attachment.namespace.as_deref().unwrap_or_default(),
                    attachment.pod.as_deref().unwrap_or_default(),
                    ips,
                    &attachment.attributes,
                )
                .expect("endpoint");
                found.insert((node.to_string(), attachment.handle), endpoint);
            }
        }
        assert_eq!(found, endpoints);
        assert!(check::check(&allocator.snapshot().await.expect("snapshot")).is_empty());

        // Again: every block is kept (they hold what the source holds, at its revision); once an agent wrote
        // one, the target is refused.
        let kept = check_target(objects.as_ref(), &read).await.expect("a run again");
        assert_eq!(kept.len(), read.blocks.len());
        let (stored, _) = objects.list(Kind::Block, &Labels::new()).await.expect("list");
        let mut touched = stored[0].clone();
        touched.labels.remove(MIGRATED_LABEL);
        objects.update(Kind::Block, &touched).await.expect("an agent's write");
        let err = check_target(objects.as_ref(), &read).await.unwrap_err().to_string();
        assert!(err.contains(&format!("already holds {} IPAMBlock", read.blocks.len())), "{err}");
    }

    /// Every node's endpoints as the block objects of `store` hold them (the handle without a record left out).
    async fn endpoints_in_objects(store: &Arc<dyn Store>) -> BTreeMap<(String, String), Endpoint> {
        let allocator = single::BlockAllocator::of_store(Arc::clone(store));
        let mut found = BTreeMap::new();
        for node in ["node-a", "node-b"] {
            for attachment in allocator.attachments(node).await.expect("attachments") {
                let ips = attachment.addresses.iter().map(|a| a.ip).collect();
                let namespace = attachment.namespace.as_deref().unwrap_or_default();
                let pod = attachment.pod.as_deref().unwrap_or_default();
                if let Ok(endpoint) = Endpoint::from_attributes(namespace, pod, ips, &attachment.attributes)
                    && endpoint.check_names(&attachment.handle).is_ok()
                {
                    found.insert((node.to_string(), attachment.handle), endpoint);
                }
            }
        }
        found
    }

    #[tokio::test]
    async fn an_agent_converts_the_older_records_in_place_once_no_agent_runs() {
        use crate::store::{OBJECTS_LAYOUT, unfinished_migration};
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, "old.db");
        let endpoints = populate(&store).await;
        let before = read(&store).await.expect("read");

        // An older agent still registered: not now, and nothing is written.
        store.txn(Txn::new().put(keys::node("node-b"), b"{}".to_vec())).await.unwrap();
        let records = ipam_records(&store).await;
        match convert_in_place(&store, "node-a", &mut MarkWatch::default()).await.expect("convert") {
            Conversion::Wait(why) => assert!(why.contains("node(s) node-b"), "{why}"),
            other => panic!("converted with an agent registered: {other:?}"),
        }
        assert!(differences(&records, &ipam_records(&store).await).is_empty());
        assert!(store.get(IN_PROGRESS).await.unwrap().is_none());

        // Once it is gone: every allocation, with its endpoint, in the objects; no record left; the layout
        // marked for good (older agents take the mark for a migration that did not finish, this one does not).
        // This node's own registration, its previous agent's, neither holds it up nor makes node-b's
        // addresses look leaked.
        store.txn(Txn::new().remove(keys::node("node-b")).put(keys::node("node-a"), b"{}".to_vec())).await.unwrap();
        let done = convert_in_place(&store, "node-a", &mut MarkWatch::default()).await.expect("convert");
        assert_eq!(done, Conversion::Converted { blocks: before.blocks.len(), addresses: 30 });
        assert!(ipam_records(&store).await.is_empty(), "{:?}", ipam_records(&store).await);
        assert_eq!(endpoints_in_objects(&store).await, endpoints);
        let snapshot = single::BlockAllocator::of_store(Arc::clone(&store)).snapshot().await.unwrap();
        assert_eq!(snapshot.blocks, before.blocks);
        assert!(check::check(&snapshot).is_empty());
        assert_eq!(store.get(IN_PROGRESS).await.unwrap().unwrap().value, OBJECTS_LAYOUT.as_bytes());
        assert_eq!(unfinished_migration(store.as_ref()).await.unwrap(), None);
        assert_eq!(
            convert_in_place(&store, "node-b", &mut MarkWatch::default()).await.expect("again"),
            Conversion::NotNeeded
        );
        // `datastore migrate` never copies into it (it would take the mark for its own, left part way).
        let err = into_store(&store, &[], &[], "test").await.unwrap_err().to_string();
        assert!(err.contains("newer poolwarden ran on the target"), "{err}");
        // Records an older agent wrote since are refused, not removed.
        store.txn(Txn::new().put(keys::block("10.99.0.0/29".parse().unwrap()), b"{}".to_vec())).await.unwrap();
        let err = convert_in_place(&store, "node-a", &mut MarkWatch::default()).await.unwrap_err().to_string();
        assert!(err.contains("an agent of an older poolwarden ran on it"), "{err}");
        assert_eq!(ipam_records(&store).await.len(), 1);
    }

    #[tokio::test]
    async fn a_conversion_stopped_at_any_step_is_finished_by_the_next_agent() {
        use crate::store::{CONVERTING, OBJECTS_LAYOUT};
        let dir = tempfile::tempdir().unwrap();

        // Stopped in step 2 (its mark taken, half the objects written): the next agent waits while the mark
        // moves, takes it over once it has not moved for its patience, and redoes what was written.
        let store = store(&dir, "step2.db");
        let endpoints = populate(&store).await;
        let source = read(&store).await.expect("read");
        let objects = KeyValueObjects::new(Arc::clone(&store));
        let half: Vec<Block> = source.blocks.iter().take(source.blocks.len() / 2).cloned().collect();
        write_blocks(&objects, &half, &source.label(), &BTreeSet::new()).await.expect("half");
        store.txn(Txn::new().put(IN_PROGRESS, format!("{CONVERTING}node node-x").into_bytes())).await.unwrap();
        let mut patient = MarkWatch::default();
        for _ in 0..2 {
            match convert_in_place(&store, "node-a", &mut patient).await.expect("convert") {
                Conversion::Wait(why) => assert!(why.contains("node node-x"), "{why}"),
                other => panic!("took a mark over that was not left for long: {other:?}"),
            }
        }
        let mut impatient = MarkWatch::with_patience(std::time::Duration::ZERO);
        let first = convert_in_place(&store, "node-a", &mut impatient).await.expect("convert");
        assert!(matches!(first, Conversion::Wait(_)), "a mark is judged by what was seen of it before: {first:?}");
        let done = convert_in_place(&store, "node-a", &mut impatient).await.expect("convert");
        assert!(matches!(done, Conversion::Converted { addresses: 30, .. }), "{done:?}");
        assert_eq!(endpoints_in_objects(&store).await, endpoints);
        assert!(ipam_records(&store).await.is_empty());

        // Stopped in step 4 (marked, the records half removed): the next agent removes the rest.
        let store2 = self::store(&dir, "step4.db");
        populate(&store2).await;
        let records = ipam_records(&store2).await;
        let converted = convert_in_place(&store2, "node-a", &mut MarkWatch::default()).await.expect("convert");
        assert!(matches!(converted, Conversion::Converted { .. }), "{converted:?}");
        let half = records.keys().take(records.len() / 2);
        let restored = half.fold(Txn::new(), |txn, key| txn.put(key.as_str(), records[key].clone().into_bytes()));
        store2.txn(restored.put(REMOVING, Vec::new())).await.unwrap();
        assert_eq!(store2.get(IN_PROGRESS).await.unwrap().unwrap().value, OBJECTS_LAYOUT.as_bytes());
        let again = convert_in_place(&store2, "node-b", &mut MarkWatch::default()).await.expect("again");
        assert_eq!(again, Conversion::NotNeeded);
        assert!(ipam_records(&store2).await.is_empty());
        assert!(store2.get(REMOVING).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn there_and_back_again_every_record_is_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let source = store(&dir, "source.db");
        populate(&source).await;
        // A node holding an address in another's block: the agent's borrowed record.
        let (blocks, _) = source.list(keys::BLOCKS).await.expect("blocks");
        let block: Block = decode(&blocks[0].key, &blocks[0].value).expect("block");
        let owner = block.affinity.clone().expect("an owned block");
        let mut lent = block.clone();
        lent.affinity = Some("node-c".into());
        let mut txn = Txn::new()
            .put(keys::block(block.cidr), encode(&lent))
            .remove(keys::affinity(&owner, block.cidr))
            .remove(keys::room(&owner, block.cidr))
            .put(
                keys::affinity("node-c", block.cidr),
                encode(&crate::ipam::Affinity { node: "node-c".into(), cidr: block.cidr }),
            )
            .put(keys::room("node-c", block.cidr), Vec::new());
        for (ip, allocation) in block.allocated() {
            txn = txn.put(keys::borrowed(ip), encode(&crate::cluster::Borrowed { ip, node: allocation.node.clone() }));
        }
        source.txn(txn).await.expect("lend");
        let original = ipam_records(&source).await;

        let copied = read(&source).await.expect("read");
        let objects: Arc<dyn ObjectStore> = Arc::new(KeyValueObjects::new(store(&dir, "objects.db")));
        write_blocks(objects.as_ref(), &copied.blocks, &copied.label(), &BTreeSet::new()).await.expect("there");
        let (stored, _) = objects.list(Kind::Block, &Labels::new()).await.expect("list");
        let back: Vec<Block> = stored.iter().map(|o| single::decode(o).expect("block").block).collect();

        let target = store(&dir, "target.db");
        let docs: Vec<crate::resources::Located> = copied
            .pools
            .iter()
            .map(|p| crate::resources::Located {
                resource: Resource::IpPool(p.clone()),
                at: crate::resources::Location { file: "-".into(), document: 1, line: 1, item: None },
            })
            .collect();
        into_store(&target, &docs, &back, "test").await.expect("and back");
        assert!(target.get(IN_PROGRESS).await.expect("get").is_some(), "marked until checked");
        finish(&target).await.expect("finish");
        assert_eq!(differences(&ipam_records(&target).await, &original), Vec::<String>::new());
        assert!(target.get(IN_PROGRESS).await.expect("get").is_none());
        assert!(check::check(&Allocator::new(Arc::clone(&target)).snapshot().await.expect("snapshot")).is_empty());

        // A block whose record names the node's uplink as a pod's host side: refused before anything is written.
        let fresh = store(&dir, "fresh.db");
        let mut forged = back.clone();
        let allocation = forged[0].allocations.values_mut().find(|a| !a.attributes.is_empty()).expect("a record");
        allocation.attributes.insert("hostIfname".into(), "eth0".into());
        let err = into_store(&fresh, &docs, &forged, "test").await.unwrap_err().to_string();
        assert!(err.contains("\"eth0\""), "{err}");
        assert!(fresh.list("").await.expect("list").0.is_empty(), "nothing written");

        // Into a datastore holding records: refused; unless a migration into it did not finish.
        let err = into_store(&target, &docs, &back, "test").await.unwrap_err().to_string();
        assert!(err.contains("already holds") && err.contains("never merges"), "{err}");
        target.txn(Txn::new().put(IN_PROGRESS, b"test".to_vec()).remove(keys::handle(&handle(0)))).await.expect("cut");
        into_store(&target, &docs, &back, "test").await.expect("started over");
        finish(&target).await.expect("finish");
        assert_eq!(differences(&ipam_records(&target).await, &original), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_registered_agent_an_inconsistent_state_or_a_write_during_the_copy_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let source = store(&dir, "source.db");
        populate(&source).await;
        source.txn(Txn::new().put(format!("{}node-a", keys::NODES), b"{}".to_vec())).await.expect("register");
        let err = read(&source).await.unwrap_err().to_string();
        assert!(err.contains("node-a") && err.contains("stop every agent"), "{err}");
        source.txn(Txn::new().remove(format!("{}node-a", keys::NODES))).await.expect("unregister");

        let read_ok = read(&source).await.expect("read");
        let objects: Arc<dyn ObjectStore> = Arc::new(KeyValueObjects::new(store(&dir, "target.db")));
        // A run stopped part way (half the blocks written), then run again: the half is kept, the rest made.
        let half = read_ok.blocks.len() / 2;
        write_blocks(objects.as_ref(), &read_ok.blocks[..half], &read_ok.label(), &BTreeSet::new())
            .await
            .expect("half");
        let kept = check_target(objects.as_ref(), &read_ok).await.expect("resumed");
        assert_eq!(kept.len(), half);
        let created = write_blocks(objects.as_ref(), &read_ok.blocks, &read_ok.label(), &kept).await.expect("the rest");
        assert_eq!(created.len(), read_ok.blocks.len() - half);
        verify(objects.as_ref(), &read_ok.blocks).await.expect("whole");
        // The source written meanwhile: refused, what this run made removed; the next run, at the new
        // revision, deletes what the stopped run left and starts over.
        source.txn(Txn::new().put(format!("{}x", keys::NAMESPACES), b"{}".to_vec())).await.expect("a write");
        let err = unchanged(&source, &read_ok).await.unwrap_err().to_string();
        assert!(err.contains("changed during the copy"), "{err}");
        remove_blocks(objects.as_ref(), &created).await;
        let reread = read(&source).await.expect("read again");
        assert!(check_target(objects.as_ref(), &reread).await.expect("leftovers").is_empty());
        let (left, _) = objects.list(Kind::Block, &Labels::new()).await.expect("list");
        assert!(left.is_empty(), "{left:?}");

        // A block record whose handle index is gone: `ipam check` finds it, and so does the migration.
        let (handles, _) = source.list_keys(keys::HANDLES).await.expect("handles");
        source.txn(Txn::new().remove(&handles[0])).await.expect("remove a handle record");
        let err = read(&source).await.unwrap_err().to_string();
        assert!(err.contains("ipam check --repair"), "{err}");
    }
}
