//! IPPool and IPAMConfig custom resources as the source of pools (`--pool-source kubernetes`): what
//! `kubectl apply -f` writes is what the agents allocate from, and `kubectl get ippools` shows each pool's
//! verdict and utilisation.
//!
//! One agent at a time (the holder of the `poolwarden-pools` Lease) copies the resources into the datastore,
//! through the same [`Catalog::apply`] as `poolwarden apply`, so a pool is judged by the same rules (overlaps
//! with older pools and with blocks left by deleted ones included). Pools are applied oldest first
//! (creation time, then name), so of two overlapping pools the later one is refused, whichever agent judges.
//! The verdict is the `Ready` condition of the pool's status, with the refusal's own message; used, free and
//! blocks are refreshed from the datastore.
//!
//! Deleting an IPPool does not strand its addresses: a finalizer (`poolwarden.io/addresses`) keeps the resource
//! while addresses are allocated from it. Meanwhile the pool is disabled in the datastore (no new addresses)
//! and its status says what it waits for; once empty, the pool leaves the datastore and the finalizer goes.
//! A pool in the datastore with no resource (applied before the agents read resources) is adopted: a resource
//! is created for it, so turning this on loses nothing.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use ipnet::IpNet;

use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    runtime::{reflector::Store, watcher},
};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::lease::Holder;
use crate::{
    allocator::{AllocError, Loaded, single::PoolSource},
    catalog::{Catalog, CatalogError},
    ipam::Block,
    resources::{self, IpPool, IpamConfig, Located, Resource},
    store::{Store as Datastore, StoreError},
};

/// The API group and version of the resources.
pub const API_VERSION: &str = "poolwarden.io/v1";
/// The finalizer that keeps a deleted IPPool until no address is allocated from it.
pub const FINALIZER: &str = "poolwarden.io/addresses";
/// The Lease whose holder copies the resources into the datastore.
pub const LEASE: &str = "poolwarden-pools";
/// The field manager of what the agents and `poolwarden apply` write.
pub const MANAGER: &str = "poolwarden";
/// How long a holder's lease lasts without renewal.
const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews, and the longest it waits between two passes.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How long a pass waits after a change for the changes that come with it.
const SETTLE: Duration = Duration::from_millis(250);
/// How often the holder refreshes used and free counts.
const USAGE_EVERY: Duration = Duration::from_secs(15);
/// How long before its lease could be taken over a holder stops writing.
const TERM_MARGIN: Duration = Duration::from_secs(5);
/// The longest a condition's message gets (the schema allows 4096 characters).
const MESSAGE_LIMIT: usize = 1024;

/// `ippools.poolwarden.io`.
pub fn ippools() -> ApiResource {
    crd("IPPool", "ippools")
}

/// `ipamconfigs.poolwarden.io`.
pub fn ipamconfigs() -> ApiResource {
    crd("IPAMConfig", "ipamconfigs")
}

/// One of poolwarden's custom resources (`poolwarden.io/v1`), by kind and plural.
pub fn crd(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("poolwarden.io", "v1", kind), plural)
}

/// The resource that states `pool` (or the config), as `kubectl apply` would send it.
pub fn resource_of(resource: &Resource) -> Option<(ApiResource, String, Value)> {
    let (kind, name, spec) = match resource {
        Resource::IpPool(pool) => (ippools(), pool.name(), serde_json::to_value(&pool.spec).ok()?),
        Resource::IpamConfig(config) => (ipamconfigs(), "default", serde_json::to_value(&config.spec).ok()?),
        Resource::Namespace(_) => return None,
    };
    let body = json!({"apiVersion": API_VERSION, "kind": kind.kind, "metadata": {"name": name}, "spec": spec});
    Some((kind, name.to_string(), body))
}

/// The annotation on a pool (or the config) in the datastore that was copied there from a resource.
pub const SOURCE_ANNOTATION: &str = "poolwarden.io/source";
/// On a resource created for what only the datastore had: the datastore's object is the one it stands for.
const ADOPTED_ANNOTATION: &str = "poolwarden.io/adopted-from";
/// Where the pools' judge records that it accepted a pool resource: the resource's UID, the generation
/// judged and the spec accepted then (see [`Accepted`]).
pub const ACCEPTED_ANNOTATION: &str = "poolwarden.io/accepted";

/// A pool resource's acceptance, kept in its [`ACCEPTED_ANNOTATION`]. The agents allocate from the accepted
/// spec, not the current one: an edit counts once judged, and an invalid edit leaves the accepted spec in use
/// (as a refused `apply` leaves the stored pool). A pool with a record for its own UID takes part in every
/// later overlap check whatever the order of creation, and is never judged against its own blocks; a record
/// copied with the resource's YAML into a new resource names another UID and counts for nothing.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Accepted {
    uid: String,
    generation: i64,
    spec: Value,
}

/// The resource's acceptance, if it has one for its own UID.
fn accepted_of(object: &DynamicObject) -> Option<Accepted> {
    let record: Accepted = serde_json::from_str(object.annotations().get(ACCEPTED_ANNOTATION)?).ok()?;
    (object.metadata.uid.as_ref() == Some(&record.uid)).then_some(record)
}

/// The pool as it was accepted.
fn accepted_pool(object: &DynamicObject) -> Option<IpPool> {
    let record = accepted_of(object)?;
    let mut copy = object.clone();
    copy.data["spec"] = record.spec;
    match parse(&copy, "IPPool") {
        Ok(Located { resource: Resource::IpPool(pool), .. }) => Some(pool),
        _ => None,
    }
}

/// Record that `object` (as cached, its spec at its generation) is accepted, unless it already is at that
/// generation.
async fn accept(api: &Api<DynamicObject>, object: &DynamicObject) -> Result<(), SyncError> {
    let Some(uid) = object.metadata.uid.clone() else { return Ok(()) };
    let generation = object.metadata.generation.unwrap_or(0);
    if accepted_of(object).is_some_and(|r| r.generation == generation) {
        return Ok(());
    }
    let record = Accepted { uid, generation, spec: object.data.get("spec").cloned().unwrap_or_default() };
    let text = serde_json::to_string(&record).map_err(|e| SyncError::Encode(e.to_string()))?;
    // At the version read: a spec changed since is judged again before it is recorded.
    let patch = json!({"metadata": {
        "annotations": {ACCEPTED_ANNOTATION: text},
        "resourceVersion": object.metadata.resource_version,
    }});
    match api.patch(&object.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Record the pool resource `name` as accepted as it is now (a migration's pools, accepted in the datastore
/// they came from), with the finalizer that keeps it while an address is allocated from it (deleted before
/// the lease holder's first pass, it would otherwise go at once, unrecorded).
pub async fn accept_as_is(client: &Client, name: &str) -> Result<(), SyncError> {
    let api = Api::<DynamicObject>::all_with(client.clone(), &ippools());
    for _ in 0..5 {
        let Some(object) = api.get_opt(name).await? else { return Err(SyncError::NotFound(name.to_string())) };
        if !holds_finalizer(&object) {
            let mut finalizers = object.finalizers().to_vec();
            finalizers.push(FINALIZER.to_string());
            set_finalizers(&api, &object, finalizers).await?;
            continue;
        }
        accept(&api, &object).await?;
        if api.get_opt(name).await?.as_ref().and_then(accepted_of).is_some() {
            return Ok(());
        }
    }
    Err(SyncError::Encode(format!("IPPool {name:?} kept changing while its acceptance was recorded")))
}

/// The resource as poolwarden reads it: validated on its own, named `IPPool/<name>` in messages, a pool
/// marked as copied from a resource.
fn parse(object: &DynamicObject, kind: &str) -> Result<Located, resources::ResourceError> {
    let name = object.name_any();
    let document = json!({
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name},
        "spec": object.data.get("spec").cloned().unwrap_or_else(|| json!({})),
    });
    let mut doc = resources::parse_documents(&format!("{kind}/{name}"), &document.to_string())?.remove(0);
    match &mut doc.resource {
        Resource::IpPool(pool) => pool.metadata.annotations.insert(SOURCE_ANNOTATION.into(), "kubernetes".into()),
        Resource::IpamConfig(config) => {
            config.metadata.annotations.insert(SOURCE_ANNOTATION.into(), "kubernetes".into())
        }
        Resource::Namespace(_) => None,
    };
    Ok(doc)
}

/// Why a pool is (not) ready: the `Ready` condition's reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    Applied,
    Invalid,
    Overlap,
    LeftoverBlocks,
    Immutable,
    Deleting,
    /// Not judged: a block object does not read, so what its range holds is unknown.
    UnreadableBlock,
}

impl Reason {
    const ALL: [Reason; 7] = [
        Reason::Applied,
        Reason::Invalid,
        Reason::Overlap,
        Reason::LeftoverBlocks,
        Reason::Immutable,
        Reason::Deleting,
        Reason::UnreadableBlock,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Reason::Applied => "Applied",
            Reason::Invalid => "Invalid",
            Reason::Overlap => "Overlap",
            Reason::LeftoverBlocks => "LeftoverBlocks",
            Reason::Immutable => "Immutable",
            Reason::Deleting => "Deleting",
            Reason::UnreadableBlock => "UnreadableBlock",
        }
    }
}

/// A pool's verdict: the `Ready` condition's status, reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Verdict {
    ready: bool,
    reason: Reason,
    message: String,
}

impl Verdict {
    fn ready() -> Self {
        Self { ready: true, reason: Reason::Applied, message: "in the datastore; nodes allocate from it".into() }
    }

    /// Ready on the Kubernetes datastore, where nothing is copied.
    fn judged() -> Self {
        Self { ready: true, reason: Reason::Applied, message: "judged usable; nodes allocate from it".into() }
    }

    fn refused(err: &CatalogError) -> Option<Self> {
        let reason = match err {
            CatalogError::Invalid(_) => Reason::Invalid,
            CatalogError::Overlap { .. } => Reason::Overlap,
            CatalogError::LeftoverBlocks { .. } => Reason::LeftoverBlocks,
            CatalogError::Immutable { .. } => Reason::Immutable,
            // The datastore or a race: no verdict on the pool, the next pass tries again.
            _ => return None,
        };
        Some(Self { ready: false, reason, message: err.to_string() })
    }
}

/// Whether the resource's status was written for an older generation.
fn status_stale(object: &DynamicObject) -> bool {
    object.data["status"]["observedGeneration"].as_i64() != object.metadata.generation
}

/// Whether the resource's acceptance is not recorded at its generation.
fn unrecorded(object: &DynamicObject) -> bool {
    accepted_of(object).map(|r| r.generation) != object.metadata.generation
}

/// The resources whose status (and, for a ready verdict, acceptance record) must be written: all of them on
/// a `refresh`, otherwise those whose verdict, generation or record is not what the resource says.
fn due<'a>(
    resources: &'a [Arc<DynamicObject>],
    verdicts: &BTreeMap<String, Verdict>,
    refresh: bool,
) -> Vec<&'a Arc<DynamicObject>> {
    resources
        .iter()
        .filter(|object| {
            verdicts.get(&object.name_any()).is_some_and(|verdict| {
                refresh
                    || condition_of(object).as_ref() != Some(verdict)
                    || status_stale(object)
                    || (verdict.ready && unrecorded(object))
            })
        })
        .collect()
}

/// The verdicts of the pools waiting for one (none yet, or not at their generation; not deleted) while the
/// judge is stopped by `err`: not ready, with its words. Pools judged at their generation keep their verdict.
fn waiting(resources: &[Arc<DynamicObject>], err: &SyncError) -> BTreeMap<String, Verdict> {
    let verdict = Verdict { ready: false, reason: Reason::UnreadableBlock, message: err.to_string() };
    resources
        .iter()
        .filter(|o| o.metadata.deletion_timestamp.is_none() && (condition_of(o).is_none() || status_stale(o)))
        .map(|o| (o.name_any(), verdict.clone()))
        .collect()
}

/// What the judge does with one pool resource in a pass.
#[derive(Debug, PartialEq)]
enum Judgement {
    /// Deleted, and nothing is allocated in the range it was accepted with: its finalizer goes.
    Release,
    /// Deleted, and this finalizer no longer on it (released, the resource kept by another's; or removed by
    /// hand): nothing to hold or release, and nothing to list for it. `drained` when no block object in the
    /// range it was accepted with holds an address: then its retirement is recorded once, if it is not
    /// already (this finalizer removed by another hand before it was). Its range, as accepted, still counts
    /// in every overlap check while it is there.
    NotHeld { drained: bool },
    /// Its verdict (for a deleted one, `Deleting` while an address is allocated in its range).
    Verdict(Verdict),
}

/// Whether this finalizer is on `object`.
fn holds_finalizer(object: &DynamicObject) -> bool {
    object.finalizers().iter().any(|f| f == FINALIZER)
}

/// The judge's decisions on the Kubernetes datastore, one per resource of `resources` (oldest first), given
/// every block object. Every pool accepted before (its range as accepted) takes part in every overlap check,
/// whatever its place in the order: no newcomer may overlap one, even one created in the same second with a
/// name that sorts first. Newcomers are judged in order, each accepted one counting for those after it; a
/// newcomer is refused over any block in its range (another pool's, or an earlier incarnation's, whose
/// addresses may be held or cooling down); an accepted pool is never judged against its own blocks, and an
/// invalid edit of one is refused while its accepted spec stays in use.
fn judge(resources: &[Arc<DynamicObject>], blocks: &[Block]) -> Vec<Judgement> {
    let mut accepted: Vec<(String, IpNet)> =
        resources.iter().filter_map(|o| accepted_pool(o).map(|p| (o.name_any(), p.cidr()))).collect();
    let mut judged = Vec::new();
    for object in resources {
        let name = object.name_any();
        let range = accepted_pool(object).map(|p| p.cidr());
        if object.metadata.deletion_timestamp.is_some() {
            let held: Vec<&Block> = match range {
                Some(cidr) => blocks.iter().filter(|b| cidr.contains(&b.cidr) && b.used() > 0).collect(),
                None => Vec::new(),
            };
            if !holds_finalizer(object) {
                judged.push(Judgement::NotHeld { drained: held.is_empty() });
                continue;
            }
            judged.push(if held.is_empty() {
                Judgement::Release
            } else {
                let addresses: u32 = held.iter().map(|b| b.used()).sum();
                Judgement::Verdict(Verdict {
                    ready: false,
                    reason: Reason::Deleting,
                    message: format!(
                        "deleted, and disabled meanwhile: waiting for {addresses} allocated address(es) in {} \
                         block(s) to be released (their pods to go) before the resource goes",
                        held.len()
                    ),
                })
            });
            continue;
        }
        let doc = match parse(object, "IPPool") {
            Ok(doc) => doc,
            Err(e) => {
                let verdict = Verdict::refused(&CatalogError::Invalid(e)).expect("invalid is a verdict");
                judged.push(Judgement::Verdict(verdict));
                continue;
            }
        };
        let Resource::IpPool(pool) = &doc.resource else {
            let message = format!("{}: not an IPPool", doc.at);
            judged.push(Judgement::Verdict(Verdict { ready: false, reason: Reason::Invalid, message }));
            continue;
        };
        let overlaps = |cidr: &IpNet| cidr.contains(&pool.cidr()) || pool.cidr().contains(cidr);
        let refusal = if let Some((other, other_cidr)) = accepted.iter().find(|(o, c)| *o != name && overlaps(c)) {
            Some(CatalogError::Overlap {
                at: doc.at.clone(),
                pool: name.clone(),
                cidr: pool.cidr().to_string(),
                other: other.clone(),
                other_cidr: other_cidr.to_string(),
                other_at: " (accepted before it)".to_string(),
            })
        } else if range.is_none() {
            let leftovers: Vec<String> =
                blocks.iter().filter(|b| overlaps(&b.cidr)).map(|b| b.cidr.to_string()).collect();
            (!leftovers.is_empty()).then(|| CatalogError::LeftoverBlocks {
                at: doc.at.clone(),
                pool: name.clone(),
                cidr: pool.cidr().to_string(),
                blocks: leftovers.join(", "),
            })
        } else {
            None
        };
        match refusal.as_ref().and_then(Verdict::refused) {
            Some(verdict) => judged.push(Judgement::Verdict(verdict)),
            None => {
                if range.is_none() {
                    accepted.push((name, pool.cidr()));
                }
                judged.push(Judgement::Verdict(Verdict::judged()));
            }
        }
    }
    judged
}

/// Pool resources oldest first (creation time, then name): of two overlapping newcomers the later one is
/// refused, whichever agent judges.
fn oldest_first(mut resources: Vec<Arc<DynamicObject>>) -> Vec<Arc<DynamicObject>> {
    resources.sort_by(|a, b| {
        (a.metadata.creation_timestamp.as_ref().map(|t| t.0), a.name_any())
            .cmp(&(b.metadata.creation_timestamp.as_ref().map(|t| t.0), b.name_any()))
    });
    resources
}

/// Every IPAMBlock object's block, listed now.
async fn block_objects(client: &Client) -> Result<Vec<Block>, SyncError> {
    let api = Api::<DynamicObject>::all_with(client.clone(), &crd("IPAMBlock", "ipamblocks"));
    let listed = api.list(&kube::api::ListParams::default()).await?;
    listed.items.iter().map(block_of).collect()
}

/// The block an IPAMBlock object holds. One that does not read (its spec is kept as written: the schema
/// cannot refuse a hand-made one) is an error, never skipped: judged without it, a pool over its range could
/// be accepted, or a deleted pool's finalizer released, while it holds addresses.
fn block_of(object: &DynamicObject) -> Result<Block, SyncError> {
    let spec = object.data.get("spec").cloned().unwrap_or_default();
    serde_json::from_value::<Block>(spec)
        .map_err(|e| SyncError::UnreadableBlock { block: object.name_any(), error: e.to_string() })
}

/// How long a pass of the lease holder waits for its cache of the IPAMBlock objects to be listed (within
/// its term; a list that takes longer goes on in the background and the next pass finds it done).
const BLOCKS_LISTED: Duration = Duration::from_secs(5);

/// `poolwarden apply` on the Kubernetes datastore, before it writes anything: the documents judged as the
/// lease holder will judge them once written (each document's pool in its resource's place, a new one after
/// every existing resource, every block object counted), so that a refusal is said at once and nothing of
/// the file is written.
async fn check_on_resources(client: &Client, docs: &[Located]) -> Result<(), SyncError> {
    Catalog::once_each(docs)?;
    if !docs.iter().any(|d| matches!(d.resource, Resource::IpPool(_))) {
        return Ok(());
    }
    let api = Api::<DynamicObject>::all_with(client.clone(), &ippools());
    let listed = api.list(&kube::api::ListParams::default()).await?;
    let resources: Vec<Arc<DynamicObject>> = listed.items.into_iter().map(Arc::new).collect();
    judged_as_applied(resources, docs, &block_objects(client).await?)
}

/// [`check_on_resources`] on what it listed: `resources` with `docs` written over them, judged with `blocks`.
fn judged_as_applied(resources: Vec<Arc<DynamicObject>>, docs: &[Located], blocks: &[Block]) -> Result<(), SyncError> {
    let mut resources = oldest_first(resources);
    let mut named = Vec::new();
    for doc in docs {
        let Resource::IpPool(_) = &doc.resource else { continue };
        let Some((_, name, body)) = resource_of(&doc.resource) else { continue };
        match resources.iter_mut().find(|o| o.name_any() == name) {
            Some(existing) if existing.metadata.deletion_timestamp.is_some() => {
                return Err(SyncError::Refused(format!(
                    "{}: IPPool {name:?} is being deleted (it goes once no address is allocated from it): apply \
                     it again once `kubectl get ippool {name}` finds nothing",
                    doc.at
                )));
            }
            Some(existing) => {
                // What the resource's CEL rules would refuse only once the documents before it were written:
                // said first, as `apply` on a key-value datastore says it, reading the stored spec as those
                // rules do (the same network is the same CIDR, which `write_spec` then keeps as it was written;
                // an absent block size is the family's default), whether or not poolwarden reads the rest.
                if let Resource::IpPool(new) = &doc.resource {
                    let immutable = |field, old: String, new: String| {
                        SyncError::Catalog(CatalogError::Immutable {
                            at: doc.at.clone(),
                            pool: name.clone(),
                            field,
                            old,
                            new,
                        })
                    };
                    let stored = &existing.data["spec"];
                    let old_text = stored["cidr"].as_str().unwrap_or_default();
                    if old_text.parse::<IpNet>().ok() != Some(new.cidr()) {
                        return Err(immutable("spec.cidr", old_text.to_string(), new.cidr().to_string()));
                    }
                    let default = if new.cidr().addr().is_ipv4() { 26 } else { 122 };
                    let old_size = stored["blockSize"].as_u64().unwrap_or(default);
                    if old_size != u64::from(new.block_size()) {
                        return Err(immutable("spec.blockSize", old_size.to_string(), new.block_size().to_string()));
                    }
                }
                let mut edited = (**existing).clone();
                edited.data["spec"] = body["spec"].clone();
                edited.metadata.generation = Some(edited.metadata.generation.unwrap_or(0) + 1);
                *existing = Arc::new(edited);
            }
            None => {
                let object: DynamicObject =
                    serde_json::from_value(body).map_err(|e| SyncError::Encode(e.to_string()))?;
                resources.push(Arc::new(object));
            }
        }
        named.push(name);
    }
    for (object, judgement) in resources.iter().zip(judge(&resources, blocks)) {
        let name = object.name_any();
        if !named.contains(&name) {
            continue;
        }
        match judgement {
            Judgement::Verdict(verdict) if verdict.ready => {}
            Judgement::Verdict(verdict) => return Err(SyncError::Refused(verdict.message)),
            // Only a deleted resource, and one the documents name is refused above.
            Judgement::Release | Judgement::NotHeld { .. } => {}
        }
    }
    Ok(())
}

/// Where the pools' Lease and the retired pools' record live unless the agent says otherwise (its
/// `POD_NAMESPACE`).
pub const DEFAULT_NAMESPACE: &str = "kube-system";

/// The agents' namespace: `POD_NAMESPACE` (the DaemonSet sets it), else [`DEFAULT_NAMESPACE`].
pub fn agents_namespace() -> String {
    std::env::var("POD_NAMESPACE").unwrap_or_else(|_| DEFAULT_NAMESPACE.into())
}

/// The ConfigMap, in the pools' Lease's namespace, recording the pools deleted on the Kubernetes datastore
/// (name: the CIDR it was accepted with), so that every firewall export empties their sets: a set left
/// holding a deleted pool's range would admit whatever is given that range next.
pub const RETIRED_POOLS: &str = "poolwarden-retired-pools";

/// Record `pool`, accepted with `cidr`, as retired (before its resource goes, or by a migration).
pub async fn record_retired(client: &Client, namespace: &str, pool: &str, cidr: IpNet) -> Result<(), SyncError> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let params = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
    for _ in 0..5 {
        let written = match api.get_opt(RETIRED_POOLS).await? {
            None => {
                let map: ConfigMap = serde_json::from_value(json!({
                    "metadata": {"name": RETIRED_POOLS, "labels": {"app.kubernetes.io/name": "poolwarden"}},
                    "data": {pool: cidr.to_string()},
                }))
                .map_err(|e| SyncError::Encode(e.to_string()))?;
                api.create(&params, &map).await.map(drop)
            }
            Some(mut map) => {
                let data = map.data.get_or_insert_with(Default::default);
                if data.get(pool) == Some(&cidr.to_string()) {
                    return Ok(());
                }
                data.insert(pool.to_string(), cidr.to_string());
                // At the version read: a concurrent record is read again, not overwritten.
                api.replace(RETIRED_POOLS, &params, &map).await.map(drop)
            }
        };
        match written {
            Ok(()) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(SyncError::Catalog(CatalogError::Contention(5)))
}

/// The pools recorded as retired on the Kubernetes datastore: name and the CIDR it had.
pub async fn retired(client: &Client, namespace: &str) -> Result<Vec<(String, IpNet)>, SyncError> {
    let api = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), namespace);
    let Some(map) = api.get_opt(RETIRED_POOLS).await? else { return Ok(Vec::new()) };
    Ok(map.data.unwrap_or_default().into_iter().filter_map(|(name, cidr)| Some((name, cidr.parse().ok()?))).collect())
}

/// What `poolwarden apply` with pools as resources judges the documents against before writing them.
#[derive(Clone, Copy)]
pub enum Against<'a> {
    /// The datastore the agents copy the resources into (etcd or embedded), as its catalog would.
    Datastore(&'a Catalog),
    /// The Kubernetes datastore: the other pool resources and the IPAMBlock objects, as the judge would.
    Resources,
}

/// The copy of the resources into the datastore, run by every agent; only the lease holder writes.
pub struct PoolSync {
    client: Client,
    /// The datastore the pools are copied into; none on the Kubernetes datastore, where the resources are
    /// the pools and the holder only judges them (see [`PoolSync::judge`]).
    catalog: Option<Catalog>,
    pools: Store<DynamicObject>,
    configs: Store<DynamicObject>,
    /// `ippools.poolwarden.io` and `ipamconfigs.poolwarden.io`.
    pool_api: Api<DynamicObject>,
    config_api: Api<DynamicObject>,
    changed: Arc<tokio::sync::Notify>,
    watches: Vec<tokio::task::JoinHandle<()>>,
    /// Until when this process may write: its last renewal's start plus the lease's duration, less a margin.
    /// Every write first checks it, so a holder that stalled past its lease writes nothing more.
    term: std::sync::Mutex<tokio::time::Instant>,
    /// On the Kubernetes datastore, the IPAMBlock objects followed by a watch, opened by the first pass
    /// that needs them and closed when the lease is not held: the holder's passes ask the API server
    /// nothing, and the other agents do not follow the blocks twice.
    blocks: std::sync::Mutex<Option<(Store<DynamicObject>, tokio::task::JoinHandle<()>)>>,
    /// The namespace of the pools' Lease, where the retired pools are recorded ([`RETIRED_POOLS`]).
    namespace: String,
    /// The UIDs of the deleted pool resources whose retirement this process recorded (or found recorded):
    /// one it released, kept by another's finalizer, is not recorded again on every pass.
    retired: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Drop for PoolSync {
    fn drop(&mut self) {
        for watch in &self.watches {
            watch.abort();
        }
        if let Some((_, watch)) = self.blocks.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            watch.abort();
        }
    }
}

impl PoolSync {
    /// Follow the resources (every agent does, so a new holder starts from a full cache).
    pub fn start(client: Client, store: Arc<dyn Datastore>) -> Self {
        Self::following(client, Some(Catalog::new(store)))
    }

    /// Follow the resources on the Kubernetes datastore: nothing is copied; the holder judges each pool by
    /// the rules `poolwarden apply` applies (valid, no overlap with an older pool judged ready, no block
    /// object in its range when first judged), writes the verdict in its status (which the agents'
    /// [`ResourcePools`] allocate by), and keeps a deleted pool until no block object in its range holds an
    /// address.
    pub fn judge(client: Client) -> Self {
        Self::following(client, None)
    }

    fn following(client: Client, catalog: Option<Catalog>) -> Self {
        let changed = Arc::new(tokio::sync::Notify::new());
        let follow = |resource: ApiResource, what| {
            let writer = kube::runtime::reflector::store::Writer::new(resource.clone());
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            super::reflect_into(writer, api, watcher::Config::default(), what, Some(Arc::clone(&changed)))
        };
        let (pools, pools_task) = follow(ippools(), "ippools");
        let (configs, configs_task) = follow(ipamconfigs(), "ipamconfigs");
        Self {
            pool_api: Api::all_with(client.clone(), &ippools()),
            config_api: Api::all_with(client.clone(), &ipamconfigs()),
            client,
            catalog,
            pools,
            configs,
            changed,
            watches: vec![pools_task, configs_task],
            term: std::sync::Mutex::new(tokio::time::Instant::now()),
            blocks: std::sync::Mutex::default(),
            namespace: DEFAULT_NAMESPACE.to_string(),
            retired: std::sync::Mutex::default(),
        }
    }

    /// Record the retirement of `object` (a deleted pool resource, `name`, of range `cidr`) while this
    /// process holds the pools' Lease, and remember that it did.
    async fn record_retirement(&self, object: &DynamicObject, name: &str, cidr: IpNet) -> Result<(), SyncError> {
        self.fence()?;
        record_retired(&self.client, &self.namespace, name, cidr).await?;
        if let Some(uid) = &object.metadata.uid {
            self.retired.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(uid.clone());
        }
        Ok(())
    }

    /// Whether this process recorded the retirement of `object` (or found it recorded).
    fn is_retired_here(&self, object: &DynamicObject) -> bool {
        object
            .metadata
            .uid
            .as_ref()
            .is_some_and(|uid| self.retired.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(uid))
    }

    /// Run until the process ends: hold the lease when free, and while held copy every change.
    pub async fn run(mut self, namespace: String, identity: String) {
        self.namespace.clone_from(&namespace);
        let mut lease = Holder::new(self.client.clone(), &namespace, LEASE, &identity, LEASE_DURATION);
        for (cache, kind) in [(&self.pools, "IPPool"), (&self.configs, "IPAMConfig")] {
            while tokio::time::timeout(Duration::from_secs(60), cache.wait_until_ready()).await.is_err() {
                warn!(
                    "no {kind} resources could be listed for a minute: are poolwarden's custom resource \
                     definitions installed (kubectl apply -f deploy/crds.yaml) and may this agent read them?"
                );
            }
        }
        let mut held = false;
        let mut usage_at: Option<tokio::time::Instant> = None;
        loop {
            let renewing = tokio::time::Instant::now();
            match lease.hold().await {
                Ok(now) => {
                    if now != held {
                        info!(lease = %format!("{namespace}/{LEASE}"), held = now, "pool resources: lease changed hands");
                    }
                    held = now;
                }
                Err(e) => {
                    warn!(error = %e, "pool resources: the lease could not be read or renewed");
                    held = false;
                }
            }
            if held {
                *self.term.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    renewing + LEASE_DURATION - TERM_MARGIN;
                let refresh = usage_at.is_none_or(|at| at.elapsed() >= USAGE_EVERY);
                match self.pass(refresh).await {
                    Ok(()) if refresh => usage_at = Some(tokio::time::Instant::now()),
                    Ok(()) => {}
                    Err(e) => warn!(error = %e, "pool resources: a pass stopped; the next one tries again"),
                }
            } else {
                usage_at = None;
                // Only the holder follows the blocks: a follower asks nothing, not even a watch.
                if let Some((_, watch)) = self.blocks.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    watch.abort();
                }
            }
            tokio::select! {
                // A burst of changes (`kubectl apply -f` of many pools, a re-list) makes one pass, not one each.
                () = self.changed.notified() => tokio::time::sleep(SETTLE).await,
                () = tokio::time::sleep(RENEW_EVERY) => {}
            }
        }
    }

    /// Refuse to write once the lease's term is over (another agent may hold it by now).
    fn fence(&self) -> Result<(), SyncError> {
        let term = *self.term.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if tokio::time::Instant::now() >= term {
            return Err(SyncError::LeaseLapsed);
        }
        Ok(())
    }

    /// One pass: config, then pools oldest first, then pools only the datastore has, then the statuses of
    /// pools whose verdict or generation is not yet stated (all of them when `refresh`). One object's failure
    /// is logged and the pass goes on; a lapsed lease stops it.
    async fn pass(&self, refresh: bool) -> Result<(), SyncError> {
        let Some(catalog) = &self.catalog else { return self.judge_pass(refresh).await };
        if let Err(e) = self.config(catalog).await {
            lapsed_or_log(e, "IPAMConfig default")?;
        }
        let resources = self.oldest_first();
        let mut stored: BTreeMap<String, IpPool> =
            catalog.pools().await?.into_iter().map(|(p, _)| (p.name().to_string(), p)).collect();
        let mut verdicts: BTreeMap<String, Verdict> = BTreeMap::new();
        for object in &resources {
            let name = object.name_any();
            let here = stored.remove(&name);
            match self.pool(catalog, object, here.as_ref()).await {
                Ok(Some(verdict)) => {
                    verdicts.insert(name, verdict);
                }
                Ok(None) => {}
                Err(e) => lapsed_or_log(e, &format!("IPPool {name}"))?,
            }
        }
        for pool in stored.values() {
            if let Err(e) = self.unowned(catalog, pool).await {
                lapsed_or_log(e, &format!("IPPool {} (datastore)", pool.name()))?;
            }
        }
        let due = due(&resources, &verdicts, refresh);
        if !due.is_empty() {
            self.statuses(&due, &verdicts, &catalog.blocks().await?).await?;
        }
        Ok(())
    }

    /// One pass on the Kubernetes datastore: each pool judged oldest first, deleted ones kept while
    /// addresses are allocated in their range, then the statuses due. The block objects are listed only when
    /// something needs them (a pool not judged ready yet, a deletion, a status to write).
    async fn judge_pass(&self, refresh: bool) -> Result<(), SyncError> {
        let resources = self.oldest_first();
        // A refused pool at its current generation is judged again with the counts (every 15 s): what
        // refused it (a leftover block) may be gone by then.
        let needed = refresh
            || resources.iter().any(|o| {
                let ready = condition_of(o).map(|v| v.ready);
                ready.is_none()
                    || status_stale(o)
                    || (ready == Some(true) && unrecorded(o))
                    || (o.metadata.deletion_timestamp.is_some() && holds_finalizer(o))
            });
        if !needed {
            self.release_config_finalizer().await?;
            return Ok(());
        }
        let mut blocks = self.blocks_to_judge(&resources, false).await?;
        let mut judged = judge(&resources, &blocks);
        // A deleted pool's finalizer is released on what the API server says now, never on a cache that may
        // be a moment behind an allocation: listed only then, not on every pass while a pool drains.
        if judged.contains(&Judgement::Release) {
            blocks = self.blocks_to_judge(&resources, true).await?;
            judged = judge(&resources, &blocks);
        }
        let mut verdicts: BTreeMap<String, Verdict> = BTreeMap::new();
        for (object, judgement) in resources.iter().zip(judged) {
            let name = object.name_any();
            match judgement {
                Judgement::Release => {
                    // Recorded before the resource can go, so that every firewall export empties its set.
                    if let Some(pool) = accepted_pool(object) {
                        self.record_retirement(object, &name, pool.cidr()).await?;
                    }
                    self.fence()?;
                    release_finalizer(&self.pool_api, object).await?;
                    if accepted_of(object).is_some() {
                        info!(pool = %name, "IPPool deleted: nothing is allocated from it any more");
                    }
                }
                // Released by this process, or recorded by it already: nothing. Otherwise (released before,
                // or this finalizer removed by hand) the record is made sure of once: one read of it when
                // it is there. On the cache's blocks: no new address comes from a deleted pool, and the
                // record only empties the firewall export's set, it releases nothing.
                Judgement::NotHeld { drained: true } => {
                    if let Some(pool) = accepted_pool(object).filter(|_| !self.is_retired_here(object)) {
                        self.record_retirement(object, &name, pool.cidr()).await?;
                    }
                }
                Judgement::NotHeld { drained: false } => {}
                Judgement::Verdict(verdict) if verdict.reason == Reason::Deleting => {
                    verdicts.insert(name, verdict);
                }
                Judgement::Verdict(verdict) => {
                    // Nothing is recorded before the finalizer is on: a resource deleted without it would
                    // leave its addresses behind.
                    if !self.hold_finalizer(object).await? {
                        continue;
                    }
                    if !verdict.ready && condition_of(object).as_ref() != Some(&verdict) {
                        warn!(pool = %name, reason = verdict.reason.as_str(), "IPPool refused: {}", verdict.message);
                    }
                    verdicts.insert(name, verdict);
                }
            }
        }
        let due = due(&resources, &verdicts, refresh);
        if !due.is_empty() {
            self.statuses(&due, &verdicts, &blocks).await?;
        }
        self.release_config_finalizer().await
    }

    /// On the Kubernetes datastore nothing is copied from the IPAMConfig: a finalizer an earlier holder (on
    /// a key-value datastore) put on a deleted one is released.
    async fn release_config_finalizer(&self) -> Result<(), SyncError> {
        for object in self.configs.state() {
            if object.metadata.deletion_timestamp.is_some() && holds_finalizer(&object) {
                self.fence()?;
                release_finalizer(&self.config_api, &object).await?;
            }
        }
        Ok(())
    }

    /// [`Self::block_objects`] for a judgement. When one does not read, nothing is judged: the pools waiting
    /// for a verdict (none yet, or not at their generation) say so in their status, with the object to mend,
    /// and the pass fails with the same words.
    async fn blocks_to_judge(&self, resources: &[Arc<DynamicObject>], fresh: bool) -> Result<Vec<Block>, SyncError> {
        let err = match self.block_objects(fresh).await {
            Err(err @ SyncError::UnreadableBlock { .. }) => err,
            other => return other,
        };
        let verdicts = waiting(resources, &err);
        let due = due(resources, &verdicts, false);
        if !due.is_empty() {
            self.statuses(&due, &verdicts, &[]).await?;
        }
        Err(err)
    }

    /// The pool resources as cached, oldest first.
    fn oldest_first(&self) -> Vec<Arc<DynamicObject>> {
        oldest_first(self.pools.state())
    }

    /// Every IPAMBlock object's block.
    /// `fresh`: listed now (a deleted pool's finalizer is released on what the API server says at that
    /// moment, never on a cache that may be a moment behind an allocation); otherwise from the watch.
    async fn block_objects(&self, fresh: bool) -> Result<Vec<Block>, SyncError> {
        if fresh {
            return block_objects(&self.client).await;
        }
        let cache = {
            let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
            let (cache, _) = blocks.get_or_insert_with(|| {
                let resource = crd("IPAMBlock", "ipamblocks");
                let writer = kube::runtime::reflector::store::Writer::new(resource.clone());
                let api = Api::<DynamicObject>::all_with(self.client.clone(), &resource);
                super::reflect_into(writer, api, watcher::Config::default(), "ipamblocks", None)
            });
            cache.clone()
        };
        if tokio::time::timeout(BLOCKS_LISTED, cache.wait_until_ready()).await.is_err() {
            return Err(SyncError::NotListed("IPAMBlock", BLOCKS_LISTED));
        }
        cache.state().iter().map(|object| block_of(object)).collect()
    }

    /// One pool resource: deleted (the pool retired, then the finalizer released), or applied once the
    /// finalizer is on (nothing reaches the datastore before: a resource deleted without it would leave a
    /// pool behind).
    async fn pool(
        &self,
        catalog: &Catalog,
        object: &DynamicObject,
        stored: Option<&IpPool>,
    ) -> Result<Option<Verdict>, SyncError> {
        if object.metadata.deletion_timestamp.is_some() {
            return self.delete(catalog, object, stored).await;
        }
        if !self.hold_finalizer(object).await? {
            return Ok(None);
        }
        self.apply(catalog, object, stored).await
    }

    /// A pool in the datastore with no resource in the cache, confirmed absent from the API server: one
    /// that came from a resource is retired (its resource went without this finalizer's release); one that
    /// never did (applied with the datastore as the source) gets a resource.
    async fn unowned(&self, catalog: &Catalog, pool: &IpPool) -> Result<(), SyncError> {
        let api = &self.pool_api;
        if api.get_opt(pool.name()).await?.is_some() {
            return Ok(());
        }
        if !pool.metadata.annotations.contains_key(SOURCE_ANNOTATION) {
            return self.adopt(&Resource::IpPool(pool.clone()), "IPPool").await;
        }
        if let Some(verdict) = self.retire(catalog, pool).await? {
            warn!(pool = %pool.name(), "its IPPool resource is gone; {}", verdict.message);
        }
        Ok(())
    }

    /// The IPAMConfig `default` into the datastore; the datastore's back to defaults when it is deleted. A
    /// config the datastore has with no resource gets one, unless it came from a resource (then the
    /// resource was deleted: defaults).
    async fn config(&self, catalog: &Catalog) -> Result<(), SyncError> {
        let resource = self.configs.state().into_iter().find(|c| c.name_any() == "default");
        let (stored, _) = catalog.config().await?;
        let api = &self.config_api;
        let from_resource = stored.metadata.annotations.contains_key(SOURCE_ANNOTATION);
        let Some(object) = resource else {
            if same(&stored, &IpamConfig::default()) || api.get_opt("default").await?.is_some() {
                return Ok(());
            }
            if from_resource {
                self.write(catalog, Resource::IpamConfig(IpamConfig::default()), "IPAMConfig/default").await?;
                info!("IPAMConfig default is gone: the datastore's settings are back to their defaults");
                return Ok(());
            }
            return self.adopt(&Resource::IpamConfig(stored), "IPAMConfig").await;
        };
        if object.metadata.deletion_timestamp.is_some() {
            if !same(&stored, &IpamConfig::default()) {
                self.write(catalog, Resource::IpamConfig(IpamConfig::default()), "IPAMConfig/default").await?;
                info!("IPAMConfig default deleted: the datastore's settings are back to their defaults");
            }
            self.fence()?;
            return release_finalizer(api, &object).await.map(drop);
        }
        if !self.hold_finalizer_in(api, &object).await? {
            return Ok(());
        }
        match parse(&object, "IPAMConfig") {
            Ok(Located { resource: Resource::IpamConfig(config), .. }) if !same(&config, &stored) => {
                self.write(catalog, Resource::IpamConfig(config), "IPAMConfig/default").await?;
                info!("IPAMConfig default copied into the datastore");
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "IPAMConfig default is not valid; the datastore keeps its settings"),
        }
        Ok(())
    }

    /// Apply one pool resource unless the datastore has it as stated.
    async fn apply(
        &self,
        catalog: &Catalog,
        object: &DynamicObject,
        stored: Option<&IpPool>,
    ) -> Result<Option<Verdict>, SyncError> {
        let name = object.name_any();
        let doc = match parse(object, "IPPool") {
            Ok(doc) => doc,
            Err(e) => return Ok(Verdict::refused(&CatalogError::Invalid(e))),
        };
        if matches!((&doc.resource, stored), (Resource::IpPool(pool), Some(stored)) if same(pool, stored)) {
            return Ok(Some(Verdict::ready()));
        }
        self.fence()?;
        match catalog.apply(std::slice::from_ref(&doc)).await {
            Ok(_) => {
                info!(pool = %name, "IPPool copied into the datastore");
                Ok(Some(Verdict::ready()))
            }
            Err(e) => match Verdict::refused(&e) {
                Some(verdict) => {
                    if condition_of(object).as_ref() != Some(&verdict) {
                        warn!(pool = %name, error = %e, "IPPool refused");
                    }
                    Ok(Some(verdict))
                }
                None => Err(e.into()),
            },
        }
    }

    /// A deleted pool: disabled, then gone from the datastore once nothing is allocated from it, then the
    /// finalizer released.
    /// Only a pool that came from the resource is retired: copied from it (stamped with the source), or the
    /// pool the resource was adopted from (deleted before the next pass copied it back and stamped it; left
    /// alone, the pool would stay and be adopted again). A datastore pool of the same name that is neither
    /// (the resource was refused beside it) is left alone, and adopted once the resource is gone.
    async fn delete(
        &self,
        catalog: &Catalog,
        object: &DynamicObject,
        stored: Option<&IpPool>,
    ) -> Result<Option<Verdict>, SyncError> {
        let adopted = object.annotations().get(ADOPTED_ANNOTATION).is_some_and(|from| from == "datastore");
        if let Some(pool) = stored.filter(|p| adopted || p.metadata.annotations.contains_key(SOURCE_ANNOTATION))
            && let Some(waiting) = self.retire(catalog, pool).await?
        {
            return Ok(Some(waiting));
        }
        self.fence()?;
        release_finalizer(&self.pool_api, object).await?;
        Ok(None)
    }

    /// Take a deleted pool out of the datastore: disabled at once, gone once nothing is allocated from it.
    /// `Some` says what it waits for.
    async fn retire(&self, catalog: &Catalog, pool: &IpPool) -> Result<Option<Verdict>, SyncError> {
        let name = pool.name();
        if !pool.spec.disabled {
            let mut disabled = pool.clone();
            disabled.spec.disabled = true;
            self.write(catalog, Resource::IpPool(disabled), &format!("IPPool/{name}")).await?;
        }
        self.fence()?;
        match catalog.delete_pool(name, false).await {
            Ok(_) => {
                info!(pool = %name, "IPPool deleted: nothing was allocated from it; gone from the datastore");
                Ok(None)
            }
            Err(CatalogError::PoolInUse { addresses, blocks, .. }) => Ok(Some(Verdict {
                ready: false,
                reason: Reason::Deleting,
                message: format!(
                    "deleted, and disabled meanwhile: waiting for {addresses} allocated address(es) in {blocks} \
                     block(s) to be released (their pods to go) before the pool leaves the datastore"
                ),
            })),
            Err(CatalogError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Write `resource` into the datastore as poolwarden apply would.
    async fn write(&self, catalog: &Catalog, resource: Resource, file: &str) -> Result<(), SyncError> {
        self.fence()?;
        let at = resources::Location { file: file.to_string(), document: 1, line: 1, item: None };
        catalog.apply(&[Located { resource, at }]).await?;
        Ok(())
    }

    /// Whether the pool resource has the finalizer (adding it when missing).
    async fn hold_finalizer(&self, object: &DynamicObject) -> Result<bool, SyncError> {
        self.hold_finalizer_in(&self.pool_api, object).await
    }

    async fn hold_finalizer_in(&self, api: &Api<DynamicObject>, object: &DynamicObject) -> Result<bool, SyncError> {
        let mut finalizers = object.finalizers().to_vec();
        if finalizers.iter().any(|f| f == FINALIZER) {
            return Ok(true);
        }
        finalizers.push(FINALIZER.to_string());
        self.fence()?;
        set_finalizers(api, object, finalizers).await
    }

    /// Create the resource for what only the datastore has.
    async fn adopt(&self, resource: &Resource, kind: &str) -> Result<(), SyncError> {
        let Some((api_resource, name, mut body)) = resource_of(resource) else { return Ok(()) };
        body["metadata"]["finalizers"] = json!([FINALIZER]);
        body["metadata"]["annotations"] = json!({ADOPTED_ANNOTATION: "datastore"});
        let object: DynamicObject = serde_json::from_value(body).map_err(|e| SyncError::Encode(e.to_string()))?;
        let api = if api_resource.plural == "ippools" { &self.pool_api } else { &self.config_api };
        self.fence()?;
        match api.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &object).await {
            Ok(_) => {
                info!(%kind, %name, "adopted: the datastore had it with no resource; created the resource");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(e) => Err(SyncError::Api(e)),
        }
    }

    /// Each pool's status: verdict, effective block size, used, free, blocks and utilisation.
    async fn statuses(
        &self,
        resources: &[&Arc<DynamicObject>],
        verdicts: &BTreeMap<String, Verdict>,
        blocks: &[Block],
    ) -> Result<(), SyncError> {
        let api = &self.pool_api;
        for object in resources {
            let name = object.name_any();
            let Some(verdict) = verdicts.get(&name) else { continue };
            let generation = object.metadata.generation.unwrap_or(0);
            // What the agents allocate from: recorded before the status says so.
            if verdict.ready {
                self.fence()?;
                if let Err(e) = accept(api, object).await {
                    warn!(pool = %name, error = %e, "IPPool acceptance could not be recorded");
                    continue;
                }
            }
            // Counts absent are written as null, so a merge patch removes the old ones.
            let mut status = json!({
                "observedGeneration": generation,
                "blockSize": null, "used": null, "free": null, "blocks": null, "utilisation": null,
            });
            // A refused pool's range may hold another pool's blocks: no counts for it.
            let counted = verdict.ready || verdict.reason == Reason::Deleting;
            if let (true, Ok(Located { resource: Resource::IpPool(pool), .. })) = (counted, parse(object, "IPPool")) {
                let mine: Vec<&Block> = blocks.iter().filter(|b| pool.cidr().contains(&b.cidr)).collect();
                let used: u128 = mine.iter().map(|b| u128::from(b.used())).sum();
                let size = pool.size();
                let free = size.saturating_sub(used);
                status["blockSize"] = json!(pool.block_size());
                status["used"] = json!(u64::try_from(used).unwrap_or(u64::MAX).min(i64::MAX as u64));
                status["free"] = json!(u64::try_from(free).unwrap_or(u64::MAX).min(i64::MAX as u64));
                status["blocks"] = json!(mine.len());
                status["utilisation"] = json!(utilisation(used, size));
            }
            let old = object.data.get("status").cloned().unwrap_or_default();
            let kept = old["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                .filter(|c| c["status"] == ready_word(verdict.ready))
                .and_then(|c| c["lastTransitionTime"].as_str().map(str::to_string));
            let since = kept.unwrap_or_else(|| {
                k8s_openapi::jiff::Timestamp::now()
                    .round(k8s_openapi::jiff::Unit::Second)
                    .map(|t| t.to_string())
                    .unwrap_or_default()
            });
            status["conditions"] = json!([{
                "type": "Ready",
                "status": ready_word(verdict.ready),
                "reason": verdict.reason.as_str(),
                "message": clipped(&verdict.message),
                "lastTransitionTime": since,
                "observedGeneration": generation,
            }]);
            if old == without_nulls(&status) {
                continue;
            }
            self.fence()?;
            let patch = json!({"status": status});
            if let Err(e) = api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                warn!(pool = %name, error = %e, "IPPool status could not be written");
            }
        }
        Ok(())
    }
}

/// Make `body`'s spec the resource's: created, unchanged, or replaced at the version read (again on a
/// conflict). The action, and the resource's generation after it.
async fn write_spec(api: &Api<DynamicObject>, name: &str, body: Value) -> Result<(&'static str, i64), SyncError> {
    let mut spec = body["spec"].clone();
    for _ in 0..5 {
        let Some(mut existing) = api.get_opt(name).await? else {
            let object: DynamicObject =
                serde_json::from_value(body.clone()).map_err(|e| SyncError::Encode(e.to_string()))?;
            let params = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
            match api.create(&params, &object).await {
                Ok(created) => return Ok(("created", created.metadata.generation.unwrap_or(0))),
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        };
        // The CIDR as it was written when it is the same network (`FD00::/48` and `fd00::/48`): the API
        // server compares it as text, and refuses a change.
        let written = existing.data["spec"]["cidr"].clone();
        let network = |v: &Value| v.as_str().and_then(|t| t.parse::<IpNet>().ok());
        if network(&written).is_some() && network(&written) == network(&spec["cidr"]) {
            spec["cidr"] = written;
        }
        if existing.data.get("spec") == Some(&spec) {
            return Ok(("unchanged", existing.metadata.generation.unwrap_or(0)));
        }
        existing.data["spec"] = spec.clone();
        let params = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
        match api.replace(name, &params, &existing).await {
            Ok(replaced) => return Ok(("configured", replaced.metadata.generation.unwrap_or(0))),
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(SyncError::Catalog(CatalogError::Contention(5)))
}

/// How long `poolwarden apply` waits for the agents' verdict on what it wrote.
const APPLY_WAIT: Duration = Duration::from_secs(30);

/// `poolwarden apply` with pools from Kubernetes: judge the documents as the agents will (on their own and
/// against the datastore), write each as its resource's whole spec (created, or replaced at the version read,
/// so the spec is the document's whoever wrote it before), then wait for the agents' verdict on each pool and
/// report it. Returns the exit code.
pub async fn apply(client: Client, against: Against<'_>, docs: &[Located], out: &mut String) -> Result<u8, SyncError> {
    match against {
        Against::Datastore(catalog) => drop(catalog.check(docs).await?),
        Against::Resources => check_on_resources(&client, docs).await?,
    }
    let mut written = Vec::new();
    for doc in docs {
        let Some((resource, name, body)) = resource_of(&doc.resource) else { continue };
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        let (action, generation) = write_spec(&api, &name, body).await?;
        out.push_str(&format!("{}/{name} {action}\n", resource.kind.to_lowercase()));
        written.push((api, resource.kind.to_lowercase(), name, generation, doc));
    }
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    let mut refused = false;
    for (api, kind, name, generation, doc) in written {
        loop {
            let done = match &doc.resource {
                Resource::IpPool(_) => {
                    let object = api.get(&name).await?;
                    let condition = object.data["status"]["conditions"]
                        .as_array()
                        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                        .filter(|c| c["observedGeneration"].as_i64().unwrap_or(0) >= generation)
                        .cloned();
                    condition.map(|c| {
                        if c["status"] != "True" {
                            refused = true;
                            out.push_str(&format!(
                                "error: ippool/{name}: refused by the agents ({}): {}\n",
                                c["reason"].as_str().unwrap_or_default(),
                                c["message"].as_str().unwrap_or_default()
                            ));
                        }
                    })
                }
                Resource::IpamConfig(config) => match against {
                    Against::Datastore(catalog) => same(&catalog.config().await?.0.spec, &config.spec).then_some(()),
                    // Taken as it is by every agent: nothing to wait for.
                    Against::Resources => Some(()),
                },
                Resource::Namespace(_) => Some(()),
            };
            if done.is_some() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let running = match against {
                    Against::Datastore(_) => "with POOLWARDEN_POOL_SOURCE=kubernetes".to_string(),
                    Against::Resources => {
                        format!("one of them holding the {LEASE} Lease in {}", agents_namespace())
                    }
                };
                out.push_str(&format!(
                    "note: {kind}/{name}: no agent has judged it within {APPLY_WAIT:?}; are the poolwarden agents \
                     running, {running}?\n"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(u8::from(refused))
}

/// What the API server has for a resource a migration would create.
#[derive(Debug, PartialEq, Eq)]
pub enum Present {
    /// Nothing of that name.
    Absent,
    /// A resource stating the same spec.
    Same,
    /// A resource stating something else: what differs, for the refusal.
    Different(String),
}

/// Whether the resource stating `resource` (a pool or the config) exists, and states the same (compared as
/// poolwarden reads it, so defaults the API server filled in do not count as a difference).
pub async fn present(client: &Client, resource: &Resource) -> Result<Present, SyncError> {
    let Some((api_resource, name, body)) = resource_of(resource) else { return Ok(Present::Same) };
    let api = Api::<DynamicObject>::all_with(client.clone(), &api_resource);
    let Some(existing) = api.get_opt(&name).await? else { return Ok(Present::Absent) };
    let kind = api_resource.kind.as_str();
    let same_spec = match (parse(&existing, kind).map(|doc| doc.resource), resource) {
        (Ok(Resource::IpPool(found)), Resource::IpPool(wanted)) => same(&found.spec, &wanted.spec),
        (Ok(Resource::IpamConfig(found)), Resource::IpamConfig(wanted)) => same(&found.spec, &wanted.spec),
        _ => false,
    };
    if same_spec {
        return Ok(Present::Same);
    }
    Ok(Present::Different(format!(
        "{kind} {name} exists with spec {}, where the datastore has {}",
        existing.data.get("spec").unwrap_or(&Value::Null),
        body["spec"]
    )))
}

/// Create the resource stating `resource` (a pool or the config).
pub async fn create(client: &Client, resource: &Resource) -> Result<(), SyncError> {
    let Some((api_resource, _, body)) = resource_of(resource) else { return Ok(()) };
    let api = Api::<DynamicObject>::all_with(client.clone(), &api_resource);
    let object: DynamicObject = serde_json::from_value(body).map_err(|e| SyncError::Encode(e.to_string()))?;
    api.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &object).await?;
    Ok(())
}

/// Delete a resource [`create`] made (a migration undoing itself; no agent holds a finalizer on it yet, and
/// one that does keeps it until the pool is retired, as for any delete).
pub async fn remove(client: &Client, resource: &Resource) -> Result<(), SyncError> {
    let Some((api_resource, name, _)) = resource_of(resource) else { return Ok(()) };
    let api = Api::<DynamicObject>::all_with(client.clone(), &api_resource);
    match api.delete(&name, &Default::default()).await {
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        other => other.map(drop).map_err(Into::into),
    }
}

/// Every IPPool resource and the IPAMConfig `default` (when there is one) as poolwarden reads them (marked as
/// copied from a resource); an error names the first that does not read.
pub async fn resources(client: &Client) -> Result<Vec<Located>, SyncError> {
    let mut docs = Vec::new();
    for (api_resource, kind) in [(ippools(), "IPPool"), (ipamconfigs(), "IPAMConfig")] {
        let api = Api::<DynamicObject>::all_with(client.clone(), &api_resource);
        for object in api.list(&Default::default()).await? {
            docs.push(parse(&object, kind).map_err(|e| SyncError::Catalog(CatalogError::Invalid(e)))?);
        }
    }
    Ok(docs)
}

/// `poolwarden delete pool NAME` with pools from Kubernetes: delete the resource; its finalizer keeps it
/// until nothing is allocated from the pool.
pub async fn delete(client: Client, name: &str, force: bool, out: &mut String) -> Result<(), SyncError> {
    if force {
        return Err(SyncError::Forced(name.to_string()));
    }
    let api = Api::<DynamicObject>::all_with(client, &ippools());
    match api.delete(name, &Default::default()).await {
        Err(kube::Error::Api(status)) if status.code == 404 => return Err(SyncError::NotFound(name.to_string())),
        other => other?,
    };
    out.push_str(&format!(
        "ippool/{name} deleted (the pool is disabled at once and leaves the datastore when no address is \
         allocated from it; `kubectl get ippool {name}` shows what it waits for)\n"
    ));
    Ok(())
}

/// A pass's error: stop the pass when the lease lapsed, else log it (for `what`) and go on.
fn lapsed_or_log(err: SyncError, what: &str) -> Result<(), SyncError> {
    if matches!(err, SyncError::LeaseLapsed) {
        return Err(err);
    }
    warn!(object = %what, error = %err, "pool resources: not copied this pass; the next one tries again");
    Ok(())
}

/// Whether two pools or configs are the same as stored (what is not stored does not count, such as
/// Calico's `autoAllocateBlocks`).
pub(crate) fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// `message` cut to [`MESSAGE_LIMIT`] characters.
fn clipped(message: &str) -> String {
    match message.char_indices().nth(MESSAGE_LIMIT) {
        Some((at, _)) => format!("{}…", &message[..at]),
        None => message.to_string(),
    }
}

/// `status` as the API server keeps it: null fields are not there.
fn without_nulls(status: &Value) -> Value {
    match status {
        Value::Object(fields) => {
            Value::Object(fields.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect())
        }
        other => other.clone(),
    }
}

fn ready_word(ready: bool) -> &'static str {
    if ready { "True" } else { "False" }
}

/// `12.5%`: used of size, one decimal.
fn utilisation(used: u128, size: u128) -> String {
    if size == 0 {
        return "0%".into();
    }
    let tenths = used.saturating_mul(1000) / size;
    format!("{}.{}%", tenths / 10, tenths % 10)
}

/// The verdict the resource's status states now, if any.
fn condition_of(object: &DynamicObject) -> Option<Verdict> {
    let condition = object.data["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Ready")?.clone();
    let reason = Reason::ALL.into_iter().find(|r| condition["reason"] == r.as_str())?;
    Some(Verdict {
        ready: condition["status"] == "True",
        reason,
        message: condition["message"].as_str().unwrap_or_default().to_string(),
    })
}

/// Remove this finalizer: whether the resource is now without it.
async fn release_finalizer(api: &Api<DynamicObject>, object: &DynamicObject) -> Result<bool, SyncError> {
    let finalizers: Vec<String> = object.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    if finalizers.len() == object.finalizers().len() {
        return Ok(true);
    }
    set_finalizers(api, object, finalizers).await
}

/// Replace the finalizers, on the `resourceVersion` read: whether that went through (a conflict, or the
/// resource gone, waits for the next pass).
async fn set_finalizers(
    api: &Api<DynamicObject>,
    object: &DynamicObject,
    finalizers: Vec<String>,
) -> Result<bool, SyncError> {
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": object.resource_version()}});
    match api.patch(&object.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => Ok(false),
        Err(e) => Err(SyncError::Api(e)),
    }
}

/// IPPool and IPAMConfig resources as the block allocator's pools (the Kubernetes datastore): followed by
/// watches and read from their caches, so an ADD asks the API server nothing for its pools.
pub struct ResourcePools {
    pools: Store<DynamicObject>,
    configs: Store<DynamicObject>,
    changed: Arc<tokio::sync::Notify>,
    watches: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ResourcePools {
    fn drop(&mut self) {
        self.watches.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

impl ResourcePools {
    /// Follow the resources through `client`.
    pub fn start(client: Client) -> Self {
        let changed = Arc::new(tokio::sync::Notify::new());
        let follow = |resource: ApiResource, what| {
            let writer = kube::runtime::reflector::store::Writer::new(resource.clone());
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            super::reflect_into(writer, api, watcher::Config::default(), what, Some(Arc::clone(&changed)))
        };
        let (pools, pools_task) = follow(ippools(), "ippools");
        let (configs, configs_task) = follow(ipamconfigs(), "ipamconfigs");
        Self { pools, configs, changed, watches: vec![pools_task, configs_task] }
    }

    /// Woken (one stored wake-up) whenever a resource changes.
    pub fn changes(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.changed)
    }

    /// Whether both caches were listed within `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let both = async {
            let _ = self.pools.wait_until_ready().await;
            let _ = self.configs.wait_until_ready().await;
        };
        tokio::time::timeout(limit, both).await.is_ok()
    }
}

#[async_trait::async_trait]
impl PoolSource for ResourcePools {
    async fn load(&self) -> Result<Loaded, AllocError> {
        if !self.wait_ready(Duration::from_secs(5)).await {
            return Err(AllocError::Store(StoreError::Backend {
                operation: "list of the IPPool and IPAMConfig resources".into(),
                message: "not listed within 5 s: are poolwarden's custom resource definitions installed \
                          (kubectl apply -f deploy/crds.yaml), and may this agent read them?"
                    .into(),
            }));
        }
        Ok(loaded(&self.pools.state(), &self.configs.state()))
    }
}

/// What the allocator allocates from, given the resources as they are: every IPPool the lease holder accepted,
/// as accepted (its [`Accepted`] record for its own UID: a pool not judged yet, or refused, is not there; an
/// edit counts once judged, and an invalid one never), disabled while it is being deleted (its addresses
/// stay until released, nothing new is handed out from it); the `default` IPAMConfig's settings, or the
/// defaults without one. In name order, as the datastore's catalog lists them.
pub fn loaded(pools: &[Arc<DynamicObject>], configs: &[Arc<DynamicObject>]) -> Loaded {
    let mut found: Vec<IpPool> = pools
        .iter()
        .filter_map(|object| {
            let mut pool = accepted_pool(object)?;
            let deleting = object.metadata.deletion_timestamp.is_some()
                || condition_of(object).is_some_and(|v| v.reason == Reason::Deleting);
            pool.spec.disabled |= deleting;
            Some(pool)
        })
        .collect();
    found.sort_by(|a, b| a.name().cmp(b.name()));
    let config = configs
        .iter()
        .filter(|object| object.name_any() == "default" && object.metadata.deletion_timestamp.is_none())
        .find_map(|object| match parse(object, "IPAMConfig") {
            Ok(Located { resource: Resource::IpamConfig(config), .. }) => Some(config.spec),
            _ => None,
        })
        .unwrap_or_else(|| IpamConfig::default().spec);
    Loaded { pools: found, config }
}

/// Why a pass did not finish (tried again on the next).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The datastore refused (as `poolwarden apply` would), failed or kept changing.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The lease's term ended during the pass: another agent may hold it now.
    #[error("the lease's term ended during the pass (the agent stalled?): leaving the rest to its holder")]
    LeaseLapsed,
    /// `poolwarden apply` of a pool the judge would refuse: why.
    #[error("{0}")]
    Refused(String),
    /// A cache of the resources of that kind was not listed within that time.
    #[error("the {0} resources were not listed within {1:?}: may this agent list and watch them?")]
    NotListed(&'static str, Duration),
    /// The named pool resource does not exist.
    #[error("IPPool {0:?} does not exist")]
    NotFound(String),
    /// `--force` asked of a pool defined as a resource.
    #[error(
        "IPPool {0:?} is a Kubernetes resource, which stays while an address is allocated from it: --force is \
         refused (on a key-value datastore it would only remove the agents' copy, which they would write again). \
         Delete the resource (poolwarden delete pool NAME, or kubectl delete ippool NAME): it is disabled at once \
         and leaves when its last address is released"
    )]
    Forced(String),
    /// The datastore failed.
    #[error("datastore: {0}")]
    Store(#[from] StoreError),
    /// The API server refused or did not answer.
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    /// A resource could not be built from what the datastore holds.
    #[error("encoding a resource: {0}")]
    Encode(String),
    /// An IPAMBlock object whose spec does not read as a block: no pool is judged while it is there.
    #[error(
        "IPAMBlock {block:?} does not read as a block ({error}): no pool is accepted, changed or let go until it \
         is mended or deleted (kubectl get ipamblock {block} -o yaml), since the addresses it may hold are unknown"
    )]
    UnreadableBlock { block: String, error: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPPool resource at `generation`, with a `Ready` condition observed at `observed` when given, and
    /// an acceptance record (of its UID unless `foreign`) of `generation` with a spec of `cidr` when given.
    fn ippool(
        name: &str,
        cidr: &str,
        generation: i64,
        ready: Option<(&str, &str, i64)>,
        deleting: bool,
        accepted: Option<(i64, &str, bool)>,
    ) -> Arc<DynamicObject> {
        let uid = format!("uid-{name}");
        let mut object = json!({
            "apiVersion": API_VERSION, "kind": "IPPool",
            "metadata": {"name": name, "generation": generation, "uid": uid},
            "spec": {"cidr": cidr, "blockSize": 29},
        });
        if let Some((status, reason, observed)) = ready {
            object["status"] = json!({"conditions": [{
                "type": "Ready", "status": status, "reason": reason, "message": "", "observedGeneration": observed,
            }]});
        }
        if deleting {
            object["metadata"]["deletionTimestamp"] = json!("2026-12-02T10:00:00Z");
            object["metadata"]["finalizers"] = json!([FINALIZER]);
        }
        if let Some((generation, cidr, foreign)) = accepted {
            let uid = if foreign { "another".to_string() } else { uid };
            let record = Accepted { uid, generation, spec: json!({"cidr": cidr, "blockSize": 29}) };
            object["metadata"]["annotations"] = json!({ACCEPTED_ANNOTATION: serde_json::to_string(&record).unwrap()});
        }
        Arc::new(serde_json::from_value(object).expect("a resource"))
    }

    #[test]
    fn the_allocator_sees_the_pools_as_accepted_and_those_being_deleted_as_disabled() {
        let pools = [
            ippool("ready", "10.1.0.0/24", 1, Some(("True", "Applied", 1)), false, Some((1, "10.1.0.0/24", false))),
            ippool("refused", "10.1.0.0/25", 1, Some(("False", "Overlap", 1)), false, None),
            ippool("unjudged", "10.2.0.0/24", 1, None, false, None),
            // Ready, but its acceptance not recorded yet: not yet.
            ippool("unrecorded", "10.2.1.0/24", 1, Some(("True", "Applied", 1)), false, None),
            // Edited since it was accepted: used as accepted until the edit is judged.
            ippool(
                "changed-since",
                "10.3.0.0/24",
                2,
                Some(("True", "Applied", 1)),
                false,
                Some((1, "10.3.0.0/24", false)),
            ),
            ippool("deleting", "10.4.0.0/24", 2, Some(("True", "Applied", 1)), true, Some((1, "10.4.0.0/24", false))),
            ippool("draining", "10.5.0.0/24", 2, Some(("False", "Deleting", 2)), true, Some((1, "10.5.0.0/24", false))),
            ippool("refused-then-deleted", "10.1.0.0/26", 2, Some(("False", "Overlap", 1)), true, None),
            // An invalid edit of an accepted pool: the accepted spec stays in use.
            ippool(
                "invalid-edit",
                "10.6.0.0/33",
                2,
                Some(("False", "Invalid", 2)),
                false,
                Some((1, "10.6.0.0/24", false)),
            ),
            // A record copied from another resource (its YAML re-applied after a delete): nothing.
            ippool("copied", "10.7.0.0/24", 1, None, false, Some((1, "10.7.0.0/24", true))),
        ];
        let got = loaded(&pools, &[]);
        let seen: Vec<(&str, String, bool)> =
            got.pools.iter().map(|p| (p.name(), p.cidr().to_string(), p.spec.disabled)).collect();
        assert_eq!(
            seen,
            [
                ("changed-since", "10.3.0.0/24".to_string(), false),
                ("deleting", "10.4.0.0/24".to_string(), true),
                ("draining", "10.5.0.0/24".to_string(), true),
                ("invalid-edit", "10.6.0.0/24".to_string(), false),
                ("ready", "10.1.0.0/24".to_string(), false),
            ]
        );
        assert_eq!(got.config, IpamConfig::default().spec, "no IPAMConfig: the defaults");
        assert_eq!(got.config.empty_block_grace_seconds, resources::DEFAULT_EMPTY_BLOCK_GRACE_SECONDS);

        let config = |name: &str, deleting: bool| {
            let mut object = json!({
                "apiVersion": API_VERSION, "kind": "IPAMConfig", "metadata": {"name": name},
                "spec": {"strictAffinity": true, "reuseCooldownSeconds": 30},
            });
            if deleting {
                object["metadata"]["deletionTimestamp"] = json!("2026-12-02T10:00:00Z");
            }
            Arc::new(serde_json::from_value::<DynamicObject>(object).expect("a resource"))
        };
        let spec = loaded(&[], &[config("other", false), config("default", false)]).config;
        assert!(spec.strict_affinity && spec.reuse_cooldown_seconds == 30, "{spec:?}");
        let spec = loaded(&[], &[config("default", true)]).config;
        assert_eq!(spec, IpamConfig::default().spec, "a deleted default is the defaults");
    }

    #[test]
    fn apply_on_the_kubernetes_datastore_refuses_what_the_judge_would_before_writing() {
        let accepted =
            |name: &str, cidr: &str| ippool(name, cidr, 1, Some(("True", "Applied", 1)), false, Some((1, cidr, false)));
        let docs = |text: &str| resources::parse_documents("pools.yaml", text).expect("documents");
        let pool = |name: &str, cidr: &str| {
            format!(
                "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {{cidr: {cidr}, blockSize: 29}}\n"
            )
        };
        let existing =
            || vec![accepted("first", "10.60.0.0/24"), ippool("pending", "10.61.0.0/24", 1, None, false, None)];
        let refused = |result: Result<(), SyncError>| match result {
            Err(SyncError::Refused(message)) => message,
            other => panic!("not refused: {other:?}"),
        };
        // Over an accepted pool, or over one written and not judged yet (judged before it, so taken first).
        let message = refused(judged_as_applied(existing(), &docs(&pool("third", "10.60.0.128/25")), &[]));
        assert!(message.contains("overlaps pool \"first\""), "{message}");
        let message = refused(judged_as_applied(existing(), &docs(&pool("third", "10.61.0.0/16")), &[]));
        assert!(message.contains("\"pending\""), "{message}");
        // Over block objects another pool left: refused; an accepted pool re-applied over its own: fine.
        let mut left = Block::new("10.62.0.0/29".parse().unwrap(), "gone", "node-a", 0);
        let owner = crate::ipam::Owner { handle: "h".into(), node: "node-a".into(), ..Default::default() };
        left.assign_ip("10.62.0.1".parse().unwrap(), &owner, 0, 0).unwrap();
        let own = Block::new("10.60.0.0/29".parse().unwrap(), "first", "node-a", 0);
        let blocks = [left, own];
        let message = refused(judged_as_applied(existing(), &docs(&pool("new", "10.62.0.0/24")), &blocks));
        assert!(message.contains("10.62.0.0/29"), "{message}");
        assert!(judged_as_applied(existing(), &docs(&pool("first", "10.60.0.0/24")), &blocks).is_ok());
        // A refused document refuses the whole file, even after one that would pass; two of one file that
        // overlap each other: the second is refused.
        let both = format!("{}---\n{}", pool("fine", "10.63.0.0/24"), pool("bad", "10.60.0.0/16"));
        assert!(refused(judged_as_applied(existing(), &docs(&both), &[])).contains("\"bad\""));
        let pair = format!("{}---\n{}", pool("one", "10.64.0.0/24"), pool("two", "10.64.0.0/25"));
        assert!(refused(judged_as_applied(existing(), &docs(&pair), &[])).contains("overlaps pool \"one\""));
        // An immutable field changed: refused before anything is written (the API server would refuse that
        // document only after writing the ones before it); an absent block size is the default.
        let both = format!("{}---\n{}", pool("fine", "10.63.0.0/24"), pool("first", "10.60.0.0/23"));
        let refused_first = judged_as_applied(existing(), &docs(&both), &[]);
        assert!(matches!(&refused_first, Err(SyncError::Catalog(CatalogError::Immutable { field: "spec.cidr", .. }))));
        let resized = pool("first", "10.60.0.0/24").replace("blockSize: 29", "blockSize: 28");
        assert!(judged_as_applied(existing(), &docs(&resized), &[]).is_err());
        // A pool being deleted is not applied over.
        let draining =
            ippool("first", "10.60.0.0/24", 1, Some(("True", "Applied", 1)), true, Some((1, "10.60.0.0/24", false)));
        let message = refused(judged_as_applied(vec![draining], &docs(&pool("first", "10.60.0.0/24")), &[]));
        assert!(message.contains("being deleted"), "{message}");
    }

    #[test]
    fn an_ipamblock_that_does_not_read_stops_the_judge_naming_it() {
        let object = |name: &str, spec: serde_json::Value| {
            let mut object = DynamicObject::new(name, &crd("IPAMBlock", "ipamblocks"));
            object.data = serde_json::json!({ "spec": spec });
            object
        };
        let block = Block::new("10.70.0.0/29".parse().unwrap(), "p", "node-a", 0);
        let read = block_of(&object("10-70-0-0-29", serde_json::to_value(&block).unwrap())).expect("reads");
        assert_eq!(read, block);
        // Hand-made (the schema keeps any spec), or written by a version this one cannot read: never
        // skipped, which would let a pool over its range be accepted.
        for spec in [serde_json::json!({"cidr": "10.70.0.8/29"}), serde_json::json!("x"), serde_json::Value::Null] {
            let err = block_of(&object("10-70-0-8-29", spec.clone())).expect_err("does not read");
            assert!(matches!(&err, SyncError::UnreadableBlock { block, .. } if block == "10-70-0-8-29"), "{err:?}");
            assert!(err.to_string().contains("kubectl get ipamblock 10-70-0-8-29"), "{err}");
        }
    }

    #[test]
    fn while_a_block_does_not_read_only_pools_waiting_for_a_verdict_are_told_why() {
        let resource = |name: &str, generation: i64, status: serde_json::Value| {
            let mut object = DynamicObject::new(name, &crd("IPPool", "ippools"));
            object.metadata.generation = Some(generation);
            object.data = serde_json::json!({ "spec": {"cidr": "10.90.0.0/24"}, "status": status });
            object
        };
        let judged = |generation: i64, status: &str, reason: &str| {
            serde_json::json!({"observedGeneration": generation,
                "conditions": [{"type": "Ready", "status": status, "reason": reason, "message": "m"}]})
        };
        let mut deleted = resource("deleted", 1, serde_json::Value::Null);
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
        let resources: Vec<Arc<DynamicObject>> = [
            resource("new", 1, serde_json::Value::Null),
            resource("changed", 3, judged(2, "True", "Applied")),
            resource("accepted", 2, judged(2, "True", "Applied")),
            resource("refused", 1, judged(1, "False", "Overlap")),
            deleted,
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        let err = SyncError::UnreadableBlock { block: "10-90-0-0-28".into(), error: "missing field `pool`".into() };
        let verdicts = waiting(&resources, &err);
        assert_eq!(verdicts.keys().collect::<Vec<_>>(), ["changed", "new"]);
        for verdict in verdicts.values() {
            assert!(!verdict.ready && verdict.reason == Reason::UnreadableBlock, "{verdict:?}");
            assert!(verdict.message.contains("IPAMBlock \"10-90-0-0-28\""), "{}", verdict.message);
        }
        // Written, it reads back as the same verdict: the next failing pass writes nothing again.
        let written = resource(
            "new",
            1,
            serde_json::json!({"observedGeneration": 1, "conditions": [{
            "type": "Ready", "status": "False", "reason": "UnreadableBlock", "message": verdicts["new"].message}]}),
        );
        assert_eq!(condition_of(&written).as_ref(), Some(&verdicts["new"]));
        assert!(waiting(&[Arc::new(written)], &err).is_empty());
    }

    #[test]
    fn the_judge_never_accepts_two_overlapping_pools_nor_a_newcomer_over_blocks() {
        let reasons = |judged: Vec<Judgement>| -> Vec<String> {
            judged
                .into_iter()
                .map(|j| match j {
                    Judgement::Release => "release".to_string(),
                    Judgement::NotHeld { drained: true } => "not held, drained".to_string(),
                    Judgement::NotHeld { drained: false } => "not held, in use".to_string(),
                    Judgement::Verdict(v) if v.ready => "ready".to_string(),
                    Judgement::Verdict(v) => format!("{}: {}", v.reason.as_str(), v.message),
                })
                .collect()
        };
        let accepted =
            |name: &str, cidr: &str| ippool(name, cidr, 1, Some(("True", "Applied", 1)), false, Some((1, cidr, false)));
        let newcomer = |name: &str, cidr: &str| ippool(name, cidr, 1, None, false, None);
        // A newcomer created in the same second as an accepted pool, its name sorting first: refused.
        let got = reasons(judge(&[newcomer("alpha", "10.50.5.0/24"), accepted("zeta", "10.50.0.0/16")], &[]));
        assert_eq!(got[1], "ready");
        assert!(got[0].starts_with("Overlap") && got[0].contains("\"zeta\""), "{got:?}");
        // Two newcomers overlapping: the first in the order is accepted, the second refused over it.
        let got = reasons(judge(&[newcomer("first", "10.51.0.0/24"), newcomer("second", "10.51.0.0/25")], &[]));
        assert_eq!(got[0], "ready");
        assert!(got[1].starts_with("Overlap") && got[1].contains("\"first\""), "{got:?}");
        // Blocks in a newcomer's range refuse it, whatever pool they name; an accepted pool's own do not.
        let mut held = Block::new("10.52.0.0/29".parse().unwrap(), "old", "node-a", 0);
        let owner = crate::ipam::Owner { handle: "h".into(), node: "node-a".into(), ..Default::default() };
        held.assign_ip("10.52.0.1".parse().unwrap(), &owner, 0, 0).unwrap();
        let empty = Block::new("10.53.0.0/29".parse().unwrap(), "mine", "node-a", 0);
        let blocks = [held.clone(), empty.clone()];
        let got = reasons(judge(&[newcomer("old", "10.52.0.0/24"), accepted("mine", "10.53.0.0/24")], &blocks));
        assert!(got[0].starts_with("LeftoverBlocks") && got[0].contains("10.52.0.0/29"), "{got:?}");
        assert_eq!(got[1], "ready");
        // A record copied from another resource (its YAML re-applied after a delete) is no acceptance.
        let copied = ippool("old", "10.52.0.0/24", 1, None, false, Some((1, "10.52.0.0/24", true)));
        assert!(reasons(judge(&[copied], &blocks))[0].starts_with("LeftoverBlocks"));
        // An invalid edit of an accepted pool is refused (its accepted spec stays in use, see `loaded`), and
        // it still counts in every overlap check.
        let edited =
            ippool("edited", "10.54.0.0/33", 2, Some(("True", "Applied", 1)), false, Some((1, "10.54.0.0/24", false)));
        let got = reasons(judge(&[edited, newcomer("under", "10.54.0.0/26")], &[]));
        assert!(got[0].starts_with("Invalid"), "{got:?}");
        assert!(got[1].starts_with("Overlap") && got[1].contains("\"edited\""), "{got:?}");
        // Deleted: kept while an address is allocated in the range it was accepted with, then released; one
        // never accepted goes at once.
        let deleting = |name: &str, cidr: &str, accepted: bool| {
            ippool(name, cidr, 1, Some(("True", "Applied", 1)), true, accepted.then_some((1, cidr, false)))
        };
        let got = reasons(judge(
            &[
                deleting("busy", "10.52.0.0/24", true),
                deleting("idle", "10.53.0.0/24", true),
                deleting("never", "10.52.0.0/25", false),
            ],
            &blocks,
        ));
        assert!(got[0].starts_with("Deleting") && got[0].contains("1 allocated address"), "{got:?}");
        assert_eq!(got[1..], ["release", "release"]);
        // A deleted pool's range stays taken while it drains.
        let got = reasons(judge(&[deleting("busy", "10.52.0.0/24", true), newcomer("next", "10.52.0.0/24")], &blocks));
        assert!(got[1].starts_with("Overlap"), "{got:?}");
        // Released, the resource kept by another's finalizer: not this judge's any more (no release again, no
        // status, no fresh list of the blocks on every pass), its range still taken while it is there.
        let kept = |name: &str, cidr: &str| {
            let mut object = (*deleting(name, cidr, true)).clone();
            object.metadata.finalizers = Some(vec!["example.com/backup".to_string()]);
            Arc::new(object)
        };
        let got = reasons(judge(&[kept("kept", "10.53.0.0/24"), newcomer("next", "10.53.0.0/24")], &blocks));
        assert_eq!(got[0], "not held, drained");
        assert!(got[1].starts_with("Overlap") && got[1].contains("\"kept\""), "{got:?}");
        // Its finalizer removed by hand while an address is allocated: its retirement waits (see `judge_pass`).
        assert_eq!(reasons(judge(&[kept("busy", "10.52.0.0/24")], &blocks)), ["not held, in use"]);
    }

    #[test]
    fn utilisation_has_one_decimal_and_never_divides_by_zero() {
        assert_eq!(utilisation(0, 64), "0.0%");
        assert_eq!(utilisation(3, 64), "4.6%");
        assert_eq!(utilisation(64, 64), "100.0%");
        assert_eq!(utilisation(1, 0), "0%");
    }

    #[test]
    fn a_long_message_is_clipped_within_the_schema_and_null_counts_are_not_kept() {
        let long = "é".repeat(5000);
        assert_eq!(clipped(&long).chars().count(), MESSAGE_LIMIT + 1, "the limit and the ellipsis");
        assert_eq!(clipped("short"), "short");
        let status = json!({"used": null, "free": 3, "conditions": []});
        assert_eq!(without_nulls(&status), json!({"free": 3, "conditions": []}));
    }

    #[test]
    fn the_same_config_ignores_what_is_not_stored() {
        let written = resources::parse_documents(
            "c.yaml",
            "apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {autoAllocateBlocks: true}\n",
        )
        .expect("valid");
        let Resource::IpamConfig(config) = &written[0].resource else { panic!("a config") };
        assert_ne!(config, &IpamConfig::default(), "autoAllocateBlocks is read");
        assert!(same(config, &IpamConfig::default()), "but not stored, so the same as the default");
    }

    #[test]
    fn only_a_lapsed_lease_stops_a_pass() {
        assert!(matches!(lapsed_or_log(SyncError::LeaseLapsed, "x"), Err(SyncError::LeaseLapsed)));
        assert!(lapsed_or_log(SyncError::Encode("bad".into()), "x").is_ok());
    }

    #[test]
    fn a_resource_reads_as_the_same_pool_it_was_written_from() {
        let docs = resources::parse_documents(
            "calico.yaml",
            "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec:\n  cidr: 10.1.0.0/24\n  \
             blockSize: 29\n  ipipMode: Always\n  natOutgoing: true\n  nodeSelector: \"zone == 'a'\"\n  \
             allowedNamespaces: [a]\n",
        )
        .expect("valid");
        let (kind, name, body) = resource_of(&docs[0].resource).expect("a pool has a resource");
        assert_eq!((kind.plural.as_str(), name.as_str()), ("ippools", "p"));
        let object: DynamicObject = serde_json::from_value(body).expect("an object");
        let (Resource::IpPool(back), Resource::IpPool(given)) =
            (parse(&object, "IPPool").expect("valid again").resource, &docs[0].resource)
        else {
            panic!("not pools")
        };
        assert_eq!((&back.metadata.name, &back.spec), (&given.metadata.name, &given.spec));
        assert_eq!(back.metadata.annotations.get(SOURCE_ANNOTATION).map(String::as_str), Some("kubernetes"));
    }
}
