//! What the datastore says about the cluster's nodes, followed by watches so that neither a garbage
//! collection pass nor a route reconcile lists the cluster: which nodes are registered (`nodes/`, leased),
//! known by their last addresses (`node-addresses/`, kept while the node is not decommissioned) and
//! decommissioned (`decommissioned/`), and what routes to them need: the blocks affine to each node
//! and the addresses nodes hold in blocks they do not own, both read from the block objects
//! (`objects/ipamblocks/`, see `docs/allocator-single-object.md`). Listed once, then kept
//! by the watches' events; while a watch is broken (the store away, history compacted) they are listed
//! afresh by whoever asks, so nobody ever judges a node, or routes, by a stale view.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use futures::StreamExt;
use tracing::debug;

use crate::{
    catalog::decode,
    cluster::{self, Borrowed, NodeRecord},
    ipam::Affinity,
    store::{EventKind, Store, StoreError, keys},
};

/// The three sets of node names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Nodes {
    /// Nodes whose agent holds a registration now.
    pub registered: BTreeSet<String>,
    /// Nodes whose last addresses are kept (every node that registered and was not decommissioned since).
    pub known: BTreeSet<String>,
    /// Nodes an operator decommissioned (`poolwarden node decommission`).
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
/// (every address, when nobody owns it). Kept per block in the mirror instead of the block itself, which
/// holds every allocation's attributes.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct BlockRoutes {
    affinity: Option<Affinity>,
    borrowed: Vec<Borrowed>,
}

/// [`BlockRoutes`] of the block object stored under `key`, encoded; none of a block that does not read
/// (logged: one damaged object must not keep every other route from being followed).
fn block_routes(key: &str, value: &[u8]) -> Vec<u8> {
    let block = crate::objects::kv::decode_spec::<crate::ipam::Block>(key, value);
    let routes = match block {
        Ok(block) => BlockRoutes {
            affinity: block.affinity.clone().map(|node| Affinity { node, cidr: block.cidr }),
            borrowed: block
                .allocated()
                .filter(|(_, a)| block.affinity.as_ref() != Some(&a.node))
                .map(|(ip, a)| Borrowed { ip, node: a.node.clone() })
                .collect(),
        },
        Err(e) => {
            tracing::warn!(%key, error = %e, "a block object does not read; no route follows it");
            BlockRoutes::default()
        }
    };
    crate::catalog::encode(&routes)
}

fn names(prefix: &str, keys: Vec<String>) -> BTreeSet<String> {
    keys.into_iter().filter_map(|k| k.strip_prefix(prefix).map(str::to_string)).collect()
}

/// The followed prefixes' keys (without the prefix) and values, as the watches last reported them.
#[derive(Clone, Debug, Default)]
struct Mirror {
    entries: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

impl Mirror {
    fn names(&self, prefix: &str) -> BTreeSet<String> {
        self.entries.get(prefix).map(|entries| entries.keys().cloned().collect()).unwrap_or_default()
    }

    fn decoded<T: serde::de::DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        let entries = self.entries.get(prefix).into_iter().flatten();
        entries.map(|(key, value)| decode(&format!("{prefix}{key}"), value)).collect()
    }

    fn nodes(&self) -> Nodes {
        Nodes {
            registered: self.names(keys::NODES),
            known: self.names(keys::NODE_ADDRESSES),
            decommissioned: self.names(keys::DECOMMISSIONED),
        }
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
}

/// The nodes and routing as the watches last reported them; `None` while not followed (or a watch is
/// broken).
#[derive(Default)]
pub struct Membership {
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

impl Membership {
    /// The nodes: as followed, or listed now when not followed.
    pub async fn nodes(&self, store: &dyn Store) -> Result<Nodes, StoreError> {
        if let Some(mirror) = self.followed.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(mirror.nodes());
        }
        Nodes::list(store).await
    }

    /// What routes to the other nodes are made of: as followed, or listed now when not followed.
    pub async fn routing(&self, store: &dyn Store) -> Result<Routing, StoreError> {
        let followed = self.followed.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(Mirror::routing);
        match followed {
            Some(routing) => routing,
            None => Routing::list(store).await,
        }
    }

    /// Wait for the next change of what is followed (one stored wake-up when nobody waits).
    pub async fn changed(&self) {
        self.changes.notified().await;
    }

    /// Whether the sets are being followed (the watches run and were listed from).
    pub fn is_followed(&self) -> bool {
        self.followed.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Follow the prefixes for as long as the store lives: list them with their revision, watch from
    /// the next one, and on any watch failure forget the sets and start over.
    pub async fn follow(self: Arc<Self>, store: Arc<dyn Store>) {
        loop {
            if let Err(e) = self.follow_once(store.as_ref()).await {
                debug!(error = %e, "following the node registrations failed; listing them again");
            }
            *self.followed.lock().unwrap_or_else(|p| p.into_inner()) = None;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    async fn follow_once(&self, store: &dyn Store) -> Result<(), StoreError> {
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
            // One stream of (prefix, event) per watch, merged below and dropped with this call; a watch that
            // ends reports it, so a prefix is never silently no longer followed.
            let events = futures::stream::unfold(Some(watch), |watch| async move {
                let mut watch = watch?;
                Some(match watch.next().await {
                    Some(event) => (event, Some(watch)),
                    None => (Err(StoreError::Closed), None),
                })
            });
            watches.push(events.map(move |event| (prefix, event)).boxed());
        }
        *self.followed.lock().unwrap_or_else(|p| p.into_inner()) = Some(mirror);
        // Whatever changed before the watches started is in the listing.
        self.changes.notify_one();
        let mut events = futures::stream::select_all(watches);
        while let Some((prefix, event)) = events.next().await {
            let event = event?;
            let Some(name) = event.kv.key.strip_prefix(prefix) else { continue };
            let mut followed = self.followed.lock().unwrap_or_else(|p| p.into_inner());
            let Some(mirror) = followed.as_mut() else { return Ok(()) };
            let entries = mirror.entries.entry(prefix.to_string()).or_default();
            let changed = match event.kind {
                EventKind::Put => {
                    let value = mirrored(prefix, &event.kv.key, event.kv.value);
                    entries.insert(name.to_string(), value.clone()).is_none_or(|old| old != value)
                }
                EventKind::Delete => entries.remove(name).is_some(),
            };
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
        let membership = Arc::new(Membership::default());
        let listed = membership.nodes(store.as_ref()).await.unwrap();
        assert_eq!(listed.unregistered("a"), BTreeSet::from(["b".to_string()]));
        tokio::spawn(Arc::clone(&membership).follow(Arc::clone(&store)));
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
        while membership.nodes(store.as_ref()).await.unwrap() != want {
            assert!(std::time::Instant::now() < deadline, "{:?}", membership.nodes(store.as_ref()).await);
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
        let membership = Arc::new(Membership::default());
        tokio::spawn(Arc::clone(&membership).follow(Arc::clone(&store)));
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
        while membership.routing(store.as_ref()).await.unwrap() != listed {
            assert!(std::time::Instant::now() < deadline, "{:?}", membership.routing(store.as_ref()).await);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(membership.is_followed());

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
        assert_eq!(membership.routing(store.as_ref()).await.unwrap().borrowed.len(), 2);
    }
}
