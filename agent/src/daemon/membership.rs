//! What the datastore says about the cluster's nodes, followed by watches so that neither a garbage
//! collection pass nor a route reconcile lists the cluster. On etcd and the embedded store: which nodes are
//! registered (`nodes/`, leased), known by their last addresses (`node-addresses/`, kept while the node is
//! not decommissioned) and decommissioned (`decommissioned/`). On the Kubernetes datastore: the Node
//! objects (a node is registered while its object exists, reached at its kubelet's `InternalIP`) and the
//! nodes the block objects name. Either way, what routes to them need: the blocks affine to each node and
//! the addresses nodes hold in blocks they do not own, read from the block objects (`objects/ipamblocks/`,
//! or the IPAMBlock resources; see `docs/allocator-single-object.md`). Listed once, then kept by the
//! watches' events; while a watch is broken (the store away, history compacted) they are listed afresh by
//! whoever asks, so nobody ever judges a node, or routes, by a stale view.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, ResourceExt,
    api::{ListParams, WatchEvent, WatchParams},
};
use tracing::{debug, info, warn};

use crate::{
    catalog::{decode, encode},
    cluster::{self, Borrowed, NodeRecord},
    ipam::{Affinity, Block},
    objects::{Kind, Labels, ObjectError, ObjectEvent, ObjectStore, kubernetes::KubeObjects},
    store::{EventKind, Store, StoreError, keys},
};

/// Where the nodes and blocks are followed from.
#[derive(Clone)]
pub enum Source {
    /// etcd or the embedded store.
    KeyValue(Arc<dyn Store>),
    /// The Kubernetes API server.
    Kubernetes(kube::Client),
}

/// The three sets of node names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Nodes {
    /// Nodes whose agent holds a registration now (on Kubernetes: whose Node object exists).
    pub registered: BTreeSet<String>,
    /// Nodes whose last addresses are kept (every node that registered and was not decommissioned since);
    /// on Kubernetes, also every node a block object names.
    pub known: BTreeSet<String>,
    /// Nodes an operator decommissioned (`poolwarden node decommission`; none on Kubernetes, where a node
    /// is gone when its Node object is deleted).
    pub decommissioned: BTreeSet<String>,
}

impl Nodes {
    /// The nodes other than `me` that may hold something but have no registration: the only ones whose
    /// blocks and addresses a collection pass reads besides its own.
    pub fn unregistered(&self, me: &str) -> BTreeSet<String> {
        self.known
            .iter()
            .chain(&self.decommissioned)
            .filter(|n| *n != me && !self.registered.contains(*n))
            .cloned()
            .collect()
    }

    /// List the three prefixes (keys only).
    pub async fn list(store: &dyn Store) -> Result<Self, StoreError> {
        Ok(Self {
            registered: names(keys::NODES, store.list_keys(keys::NODES).await?.0),
            known: names(keys::NODE_ADDRESSES, store.list_keys(keys::NODE_ADDRESSES).await?.0),
            decommissioned: names(keys::DECOMMISSIONED, store.list_keys(keys::DECOMMISSIONED).await?.0),
        })
    }
}

/// What routes to the other nodes are made of.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routing {
    /// Every node to route to, by name (see [`cluster::routable`]).
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Every node's blocks.
    pub affinities: Vec<Affinity>,
    /// Every address borrowed from another node's block.
    pub borrowed: Vec<Borrowed>,
}

impl Routing {
    /// List it from the store (what a reconcile read before the watches, and reads while they are broken).
    pub async fn list(store: &dyn Store) -> Result<Self, StoreError> {
        let (blocks, _) = store.list(&BLOCKS).await?;
        let mut routing = Self { nodes: cluster::routable(store).await?, ..Self::default() };
        for kv in &blocks {
            routing.add(decode(&kv.key, &block_routes(&kv.key, &kv.value))?);
        }
        Ok(routing)
    }

    fn add(&mut self, routes: BlockRoutes) {
        self.affinities.extend(routes.affinity);
        self.borrowed.extend(routes.borrowed);
    }
}

/// The key prefix of the block objects in a key-value datastore.
static BLOCKS: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| crate::objects::kv::object_prefix(crate::objects::Kind::Block));

/// What routes need of one block: the node it is affine to, and the addresses held in it by other nodes
/// (every address, when nobody owns it), and whether it is a block nobody owns that holds nothing (one the
/// collector may give back). Kept per block in the mirror instead of the block itself, which holds every
/// allocation's attributes: an address assigned in a node's own block changes none of this.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct BlockRoutes {
    affinity: Option<Affinity>,
    borrowed: Vec<Borrowed>,
    unowned_and_empty: bool,
}

/// [`BlockRoutes`] of the block object stored under `key`, encoded; none of a block that does not read
/// (logged: one damaged object must not keep every other route from being followed).
fn block_routes(key: &str, value: &[u8]) -> Vec<u8> {
    routes_of(key, crate::objects::kv::decode_spec::<Block>(key, value).map_err(|e| e.to_string()))
}

/// [`BlockRoutes`] of an IPAMBlock resource's spec, encoded.
fn resource_routes(name: &str, spec: &serde_json::Value) -> Vec<u8> {
    routes_of(name, serde_json::from_value::<Block>(spec.clone()).map_err(|e| e.to_string()))
}

fn routes_of(name: &str, block: Result<Block, String>) -> Vec<u8> {
    let routes = match block {
        Ok(block) => BlockRoutes {
            affinity: block.affinity.clone().map(|node| Affinity { node, cidr: block.cidr }),
            borrowed: block
                .allocated()
                .filter(|(_, a)| block.affinity.as_ref() != Some(&a.node))
                .map(|(ip, a)| Borrowed { ip, node: a.node.clone() })
                .collect(),
            unowned_and_empty: block.affinity.is_none() && block.is_empty(),
        },
        Err(e) => {
            tracing::warn!(block = %name, error = %e, "a block object does not read; no route follows it");
            BlockRoutes::default()
        }
    };
    encode(&routes)
}

fn names(prefix: &str, keys: Vec<String>) -> BTreeSet<String> {
    keys.into_iter().filter_map(|k| k.strip_prefix(prefix).map(str::to_string)).collect()
}

/// The followed prefixes' keys (without the prefix) and values, as the watches last reported them. On
/// Kubernetes, each Node object is kept under both `nodes/` and `node-addresses/` (registered and known
/// while it exists), and the block objects under the same prefix as in a key-value store.
#[derive(Clone, Debug, Default)]
struct Mirror {
    entries: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Whether it mirrors the Kubernetes API (then every node a block names is known).
    kubernetes: bool,
}

/// One change to the mirror.
enum Change {
    Put(&'static str, String, Vec<u8>),
    Delete(&'static str, String),
}

impl Mirror {
    fn names(&self, prefix: &str) -> BTreeSet<String> {
        self.entries.get(prefix).map(|entries| entries.keys().cloned().collect()).unwrap_or_default()
    }

    fn decoded<T: serde::de::DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        let entries = self.entries.get(prefix).into_iter().flatten();
        entries.map(|(key, value)| decode(&format!("{prefix}{key}"), value)).collect()
    }

    fn nodes(&self) -> Result<Nodes, StoreError> {
        let mut known = self.names(keys::NODE_ADDRESSES);
        if self.kubernetes {
            for routes in self.decoded::<BlockRoutes>(&BLOCKS)? {
                known.extend(routes.affinity.map(|a| a.node));
                known.extend(routes.borrowed.into_iter().map(|b| b.node));
            }
        }
        Ok(Nodes { registered: self.names(keys::NODES), known, decommissioned: self.names(keys::DECOMMISSIONED) })
    }

    /// As [`cluster::routable`] reads it, from the copy.
    fn routing(&self) -> Result<Routing, StoreError> {
        let nodes = cluster::routable_of(
            self.decoded::<NodeRecord>(keys::NODES)?,
            self.decoded::<NodeRecord>(keys::NODE_ADDRESSES)?,
            &self.names(keys::DECOMMISSIONED),
        );
        let mut routing = Routing { nodes, ..Routing::default() };
        for routes in self.decoded::<BlockRoutes>(&BLOCKS)? {
            routing.add(routes);
        }
        Ok(routing)
    }

    /// Apply one change: whether it changed what the mirror holds.
    fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Put(prefix, name, value) => self
                .entries
                .entry(prefix.to_string())
                .or_default()
                .insert(name, value.clone())
                .is_none_or(|old| old != value),
            Change::Delete(prefix, name) => {
                self.entries.get_mut(prefix).is_some_and(|entries| entries.remove(&name).is_some())
            }
        }
    }
}

/// The nodes and routing as the watches last reported them; `None` while not followed (or a watch is
/// broken).
pub struct Membership {
    source: Source,
    followed: Mutex<Option<Mirror>>,
    /// Woken after every change applied (and every fresh listing), so that whoever routes by the mirror
    /// looks again after the mirror changed, never before.
    changes: tokio::sync::Notify,
}

/// The followed prefixes: the nodes' three and the block objects'.
fn prefixes() -> [&'static str; 4] {
    [keys::NODES, keys::NODE_ADDRESSES, keys::DECOMMISSIONED, BLOCKS.as_str()]
}

/// What the mirror keeps of a value under `prefix`: a block's routes, anything else as it is.
fn mirrored(prefix: &str, key: &str, value: Vec<u8>) -> Vec<u8> {
    if prefix == BLOCKS.as_str() { block_routes(key, &value) } else { value }
}

/// A stream of changes; an error ends the following (everything is listed again).
type Changes = BoxStream<'static, Result<Vec<Change>, StoreError>>;

fn api_error(operation: &str, message: impl std::fmt::Display) -> StoreError {
    StoreError::Backend { operation: operation.to_string(), message: message.to_string() }
}

/// The Node objects and block objects listed, and the versions to watch them from.
async fn list_kubernetes(client: &kube::Client) -> Result<(Mirror, String, String), StoreError> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error("list of the Node objects", e))?;
    let (blocks, blocks_version) = KubeObjects::new(client.clone())
        .list(Kind::Block, &Labels::new())
        .await
        .map_err(|e| api_error("list of the IPAMBlock objects", e))?;
    let mut mirror = Mirror { kubernetes: true, ..Mirror::default() };
    for node in &nodes.items {
        let record = encode(&crate::k8s::node_record(node));
        mirror.apply(Change::Put(keys::NODES, node.name_any(), record.clone()));
        mirror.apply(Change::Put(keys::NODE_ADDRESSES, node.name_any(), record));
    }
    for object in &blocks {
        mirror.apply(Change::Put(BLOCKS.as_str(), object.name.clone(), resource_routes(&object.name, &object.spec)));
    }
    Ok((mirror, nodes.metadata.resource_version.unwrap_or_default(), blocks_version))
}

/// The Node objects' changes from `version`, the watch opened again from the last version seen whenever
/// the API server ends it.
fn node_changes(api: Api<Node>, version: String) -> Changes {
    type Watch = BoxStream<'static, Result<WatchEvent<Node>, kube::Error>>;
    let state: (Api<Node>, String, Option<Watch>) = (api, version, None);
    futures::stream::unfold(state, |(api, mut version, mut watch)| async move {
        loop {
            if watch.is_none() {
                match api.watch(&WatchParams::default(), &version).await {
                    Ok(opened) => watch = Some(opened.boxed()),
                    Err(e) => {
                        return Some((Err(api_error("watch of the Node objects", e)), (api, version, None)));
                    }
                }
            }
            let event = watch.as_mut().expect("opened above").next().await;
            let changes = match event {
                None => {
                    watch = None;
                    continue;
                }
                Some(Ok(WatchEvent::Added(node) | WatchEvent::Modified(node))) => {
                    version = node.resource_version().unwrap_or(version);
                    let record = encode(&crate::k8s::node_record(&node));
                    vec![
                        Change::Put(keys::NODES, node.name_any(), record.clone()),
                        Change::Put(keys::NODE_ADDRESSES, node.name_any(), record),
                    ]
                }
                Some(Ok(WatchEvent::Deleted(node))) => {
                    version = node.resource_version().unwrap_or(version);
                    vec![
                        Change::Delete(keys::NODES, node.name_any()),
                        Change::Delete(keys::NODE_ADDRESSES, node.name_any()),
                    ]
                }
                Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                    version = bookmark.metadata.resource_version;
                    continue;
                }
                Some(Ok(WatchEvent::Error(status))) => {
                    return Some((Err(api_error("watch of the Node objects", status.message)), (api, version, None)));
                }
                Some(Err(e)) => {
                    return Some((Err(api_error("watch of the Node objects", e)), (api, version, None)));
                }
            };
            return Some((Ok(changes), (api, version, watch)));
        }
    })
    .boxed()
}

/// The IPAMBlock objects' changes from `version`, the watch opened again from the last version seen
/// whenever the API server ends it.
fn block_changes(objects: Arc<KubeObjects>, version: String) -> Changes {
    let state = (objects, version, None);
    futures::stream::unfold(state, |(objects, mut version, mut watch)| async move {
        let failed = |e: ObjectError| api_error("watch of the IPAMBlock objects", e);
        loop {
            if watch.is_none() {
                match objects.watch(Kind::Block, &Labels::new(), &version).await {
                    Ok(opened) => watch = Some(opened),
                    Err(e) => return Some((Err(failed(e)), (objects, version, None))),
                }
            }
            let change = match watch.as_mut().expect("opened above").next().await {
                None => {
                    watch = None;
                    continue;
                }
                Some(Ok(ObjectEvent::Applied(object))) => {
                    version.clone_from(&object.version);
                    Change::Put(BLOCKS.as_str(), object.name.clone(), resource_routes(&object.name, &object.spec))
                }
                Some(Ok(ObjectEvent::Deleted { name, version: at })) => {
                    version = at;
                    Change::Delete(BLOCKS.as_str(), name)
                }
                Some(Ok(ObjectEvent::Progress(at))) => {
                    version = at;
                    continue;
                }
                Some(Err(e)) => return Some((Err(failed(e)), (objects, version, None))),
            };
            return Some((Ok(vec![change]), (objects, version, watch)));
        }
    })
    .boxed()
}

impl Membership {
    /// Nodes and routes of `source`, not followed yet (see [`Membership::follow`]).
    pub fn new(source: Source) -> Self {
        Self { source, followed: Mutex::new(None), changes: tokio::sync::Notify::new() }
    }

    /// The nodes: as followed, or listed now when not followed.
    pub async fn nodes(&self) -> Result<Nodes, StoreError> {
        if let Some(mirror) = self.followed.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return mirror.nodes();
        }
        match &self.source {
            Source::KeyValue(store) => Nodes::list(store.as_ref()).await,
            Source::Kubernetes(client) => list_kubernetes(client).await?.0.nodes(),
        }
    }

    /// What routes to the other nodes are made of: as followed, or listed now when not followed.
    pub async fn routing(&self) -> Result<Routing, StoreError> {
        let followed = self.followed.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(Mirror::routing);
        match (followed, &self.source) {
            (Some(routing), _) => routing,
            (None, Source::KeyValue(store)) => Routing::list(store.as_ref()).await,
            (None, Source::Kubernetes(client)) => list_kubernetes(client).await?.0.routing(),
        }
    }

    /// Wait for the next change of what is followed (one stored wake-up when nobody waits).
    pub async fn changed(&self) {
        self.changes.notified().await;
    }

    /// Whether a followed block belongs to no node and holds no address (one that does not read counts too):
    /// `None` when not followed. The collector lists the blocks nobody owns only when one of them could go
    /// back, so that at rest it asks nothing, even while a block of a gone node still holds the addresses a
    /// live node borrowed from it.
    pub fn any_unowned_empty_block(&self) -> Option<bool> {
        let followed = self.followed.lock().unwrap_or_else(|p| p.into_inner());
        let mirror = followed.as_ref()?;
        Some(mirror.decoded::<BlockRoutes>(&BLOCKS).map_or(true, |all| all.iter().any(|r| r.unowned_and_empty)))
    }

    /// Whether the sets are being followed (the watches run and were listed from).
    pub fn is_followed(&self) -> bool {
        self.followed.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Follow the source for as long as the process lives: list with its revision, watch from the next
    /// one, and on any watch failure forget what was followed and start over.
    pub async fn follow(self: Arc<Self>) {
        // Said once per run of failures (a forbidden list fails every second until RBAC is mended).
        let mut failing = false;
        loop {
            let (mirror, changes) = match self.listed().await {
                Ok(listed) => listed,
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "listing the nodes and blocks failed (not ready meanwhile); trying again");
                    }
                    failing = true;
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            if std::mem::take(&mut failing) {
                info!("the nodes and blocks are listed again");
            }
            if let Err(e) = self.apply_changes(mirror, changes).await {
                debug!(error = %e, "following the nodes and blocks failed; listing them again");
            }
            *self.followed.lock().unwrap_or_else(|p| p.into_inner()) = None;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    /// Everything listed, and the merged watches from the listing on.
    async fn listed(&self) -> Result<(Mirror, Changes), StoreError> {
        match &self.source {
            Source::KeyValue(store) => {
                let mut mirror = Mirror::default();
                let mut watches = Vec::new();
                for prefix in prefixes() {
                    let (listed, revision) = store.list(prefix).await?;
                    let entries = listed.into_iter().filter_map(|kv| {
                        let name = kv.key.strip_prefix(prefix)?.to_string();
                        Some((name, mirrored(prefix, &kv.key, kv.value)))
                    });
                    mirror.entries.insert(prefix.to_string(), entries.collect());
                    let watch = store.watch(prefix, revision + 1).await?;
                    // One stream of changes per watch, merged below; a watch that ends reports it, so a
                    // prefix is never silently no longer followed.
                    let events = futures::stream::unfold(Some(watch), |watch| async move {
                        let mut watch = watch?;
                        Some(match watch.next().await {
                            Some(event) => (event, Some(watch)),
                            None => (Err(StoreError::Closed), None),
                        })
                    });
                    watches.push(
                        events
                            .map(move |event| {
                                let event = event?;
                                let Some(name) = event.kv.key.strip_prefix(prefix) else { return Ok(Vec::new()) };
                                let name = name.to_string();
                                Ok(vec![match event.kind {
                                    EventKind::Put => {
                                        Change::Put(prefix, name, mirrored(prefix, &event.kv.key, event.kv.value))
                                    }
                                    EventKind::Delete => Change::Delete(prefix, name),
                                }])
                            })
                            .boxed(),
                    );
                }
                Ok((mirror, futures::stream::select_all(watches).boxed()))
            }
            Source::Kubernetes(client) => {
                let (mirror, nodes_version, blocks_version) = list_kubernetes(client).await?;
                let nodes = node_changes(Api::all(client.clone()), nodes_version);
                let blocks = block_changes(Arc::new(KubeObjects::new(client.clone())), blocks_version);
                Ok((mirror, futures::stream::select(nodes, blocks).boxed()))
            }
        }
    }

    async fn apply_changes(&self, mirror: Mirror, mut changes: Changes) -> Result<(), StoreError> {
        *self.followed.lock().unwrap_or_else(|p| p.into_inner()) = Some(mirror);
        // Whatever changed before the watches started is in the listing.
        self.changes.notify_one();
        while let Some(batch) = changes.next().await {
            let mut followed = self.followed.lock().unwrap_or_else(|p| p.into_inner());
            let Some(mirror) = followed.as_mut() else { return Ok(()) };
            let mut changed = false;
            for change in batch? {
                changed |= mirror.apply(change);
            }
            drop(followed);
            // A block written without a change to its routes (an address assigned in a node's own block, the
            // common ADD) wakes nobody: routes are recomputed when what they are made of changes.
            if changed {
                self.changes.notify_one();
            }
        }
        Err(StoreError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Txn, embedded::EmbeddedStore};

    #[tokio::test]
    async fn follows_registrations_and_lists_when_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let put = |key: String| Txn::new().put(key, b"{}".to_vec());
        store.txn(put(keys::node("a")).put(keys::node_addresses("a"), Vec::new())).await.unwrap();
        store.txn(put(keys::node_addresses("b"))).await.unwrap();
        let membership = Arc::new(Membership::new(Source::KeyValue(Arc::clone(&store))));
        let listed = membership.nodes().await.unwrap();
        assert_eq!(listed.unregistered("a"), BTreeSet::from(["b".to_string()]));
        tokio::spawn(Arc::clone(&membership).follow());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !membership.is_followed() {
            assert!(std::time::Instant::now() < deadline, "never followed");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        store
            .txn(
                Txn::new()
                    .remove(keys::node("a"))
                    .remove(keys::node_addresses("b"))
                    .put(keys::decommissioned("b"), Vec::new()),
            )
            .await
            .unwrap();
        let want = Nodes {
            registered: BTreeSet::new(),
            known: BTreeSet::from(["a".to_string()]),
            decommissioned: BTreeSet::from(["b".to_string()]),
        };
        while membership.nodes().await.unwrap() != want {
            assert!(std::time::Instant::now() < deadline, "{:?}", membership.nodes().await);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(want.unregistered("c"), BTreeSet::from(["a".to_string(), "b".to_string()]));
        assert_eq!(want, Nodes::list(store.as_ref()).await.unwrap());
    }

    #[tokio::test]
    async fn routing_follows_nodes_blocks_and_borrowed_addresses_as_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let record = |name: &str, address: &str| NodeRecord {
            name: name.into(),
            addresses: vec![address.parse().unwrap()],
            labels: Default::default(),
        };
        let register = |node: NodeRecord| {
            Txn::new()
                .put(keys::node(&node.name), crate::catalog::encode(&node))
                .put(keys::node_addresses(&node.name), crate::catalog::encode(&node))
        };
        let objects = crate::objects::kv::KeyValueObjects::new(Arc::clone(&store));
        // A block object as the allocator writes it (created, or written over what is stored).
        async fn put(objects: &crate::objects::kv::KeyValueObjects, block: &crate::ipam::Block) {
            use crate::{
                allocator::single::{block_name, labels_of},
                objects::{Kind, Object, ObjectStore},
            };
            let (name, spec) = (block_name(block.cidr), serde_json::to_value(block).unwrap());
            match objects.get(Kind::Block, &name).await.unwrap() {
                None => drop(objects.create(Kind::Block, &name, labels_of(block), spec).await.unwrap()),
                Some(old) => {
                    let object = Object { name, labels: labels_of(block), spec, version: old.version };
                    drop(objects.update(Kind::Block, &object).await.unwrap());
                }
            }
        }
        let mut block_a = crate::ipam::Block::new("10.0.0.0/26".parse().unwrap(), "p", "a", 0);
        store.txn(register(record("a", "192.0.2.1"))).await.unwrap();
        put(&objects, &block_a).await;
        let membership = Arc::new(Membership::new(Source::KeyValue(Arc::clone(&store))));
        tokio::spawn(Arc::clone(&membership).follow());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !membership.is_followed() {
            assert!(std::time::Instant::now() < deadline, "never followed");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Changes of every kind: a node registers and claims, the first one's agent goes (its addresses stay
        // known), a third node borrows, then it is decommissioned.
        store.txn(register(record("b", "192.0.2.2"))).await.unwrap();
        put(&objects, &crate::ipam::Block::new("10.0.0.64/26".parse().unwrap(), "p", "b", 0)).await;
        store.txn(Txn::new().remove(keys::node("a"))).await.unwrap();
        let borrowed = Borrowed { ip: "10.0.0.5".parse().unwrap(), node: "c".into() };
        store.txn(register(record("c", "192.0.2.3"))).await.unwrap();
        let owner = crate::ipam::Owner { handle: "h".into(), node: "c".into(), ..Default::default() };
        block_a.assign_ip(borrowed.ip, &owner, 0, 0).unwrap();
        put(&objects, &block_a).await;
        store
            .txn(
                Txn::new()
                    .remove(keys::node("c"))
                    .remove(keys::node_addresses("c"))
                    .put(keys::decommissioned("c"), b"{}".to_vec()),
            )
            .await
            .unwrap();
        let listed = Routing::list(store.as_ref()).await.unwrap();
        assert_eq!(listed.nodes.keys().collect::<Vec<_>>(), ["a", "b"], "{listed:?}");
        assert_eq!(listed.affinities.len(), 2);
        assert_eq!(listed.borrowed, [borrowed]);
        while membership.routing().await.unwrap() != listed {
            assert!(std::time::Instant::now() < deadline, "{:?}", membership.routing().await);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(membership.is_followed());
        assert_eq!(membership.any_unowned_empty_block(), Some(false), "every block has its node");

        // An address assigned in a node's own block changes no route: nobody is woken. One lent to another
        // node does.
        let woken = || tokio::time::timeout(std::time::Duration::from_millis(300), membership.changed());
        let _ = woken().await;
        let own = crate::ipam::Owner { handle: "own".into(), node: "a".into(), ..Default::default() };
        block_a.assign_ip("10.0.0.6".parse().unwrap(), &own, 0, 0).unwrap();
        put(&objects, &block_a).await;
        assert!(woken().await.is_err(), "woken by a write that changes no route");
        let lent = crate::ipam::Owner { handle: "lent".into(), node: "b".into(), ..Default::default() };
        block_a.assign_ip("10.0.0.7".parse().unwrap(), &lent, 0, 0).unwrap();
        put(&objects, &block_a).await;
        assert!(woken().await.is_ok(), "not woken by an address lent to another node");
        assert_eq!(membership.routing().await.unwrap().borrowed.len(), 2);

        // A block its node gave up, still holding addresses (every one is now routed as borrowed): nothing
        // for the collector to give back, so nothing for it to list. Once its last address goes, there is.
        block_a.affinity = None;
        put(&objects, &block_a).await;
        while membership.routing().await.unwrap().borrowed.len() != 3 {
            assert!(std::time::Instant::now() < deadline, "{:?}", membership.routing().await);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(membership.any_unowned_empty_block(), Some(false), "a block holding addresses");
        for ip in ["10.0.0.5", "10.0.0.6", "10.0.0.7"] {
            block_a.release_ip(ip.parse().unwrap(), 1).unwrap();
        }
        put(&objects, &block_a).await;
        while membership.any_unowned_empty_block() != Some(true) {
            assert!(std::time::Instant::now() < deadline, "an empty unowned block not seen");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn on_kubernetes_every_node_a_block_names_is_known_and_only_node_objects_are_registered() {
        let mut mirror = Mirror { kubernetes: true, ..Mirror::default() };
        let record =
            |name: &str| encode(&NodeRecord { name: name.into(), addresses: Vec::new(), labels: Default::default() });
        for prefix in [keys::NODES, keys::NODE_ADDRESSES] {
            mirror.apply(Change::Put(prefix, "a".into(), record("a")));
        }
        // A block of a node whose object is gone, in which a third node (also without one) holds an address.
        let mut block = crate::ipam::Block::new("10.0.0.0/26".parse().unwrap(), "p", "gone", 0);
        let owner = crate::ipam::Owner { handle: "h".into(), node: "borrower".into(), ..Default::default() };
        block.assign_ip("10.0.0.5".parse().unwrap(), &owner, 0, 0).unwrap();
        let spec = serde_json::to_value(&block).unwrap();
        mirror.apply(Change::Put(BLOCKS.as_str(), "10-0-0-0-26".into(), resource_routes("10-0-0-0-26", &spec)));
        let nodes = mirror.nodes().unwrap();
        assert_eq!(nodes.registered, BTreeSet::from(["a".to_string()]));
        let unregistered = nodes.unregistered("a");
        assert_eq!(unregistered, BTreeSet::from(["borrower".to_string(), "gone".to_string()]));
        // A key-value mirror knows nodes by their addresses' records only.
        let key_value = Mirror { kubernetes: false, ..mirror.clone() };
        assert!(key_value.nodes().unwrap().unregistered("a").is_empty());
        let routing = mirror.routing().unwrap();
        assert_eq!(routing.nodes.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(routing.borrowed.len(), 1);
        assert!(mirror.apply(Change::Delete(keys::NODES, "a".into())));
        assert!(!mirror.apply(Change::Delete(keys::NODES, "a".into())), "a second delete changes nothing");
    }
}
