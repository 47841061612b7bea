//! What the datastore says about the cluster's nodes, followed by watches so that neither a garbage
//! collection pass nor a route reconcile lists the cluster: which nodes are registered (`nodes/`, leased),
//! known by their last addresses (`node-addresses/`, kept while the node is not decommissioned) and
//! decommissioned (`decommissioned/`), and what routes to them need: the blocks affine to each node
//! (`affinities/`) and the addresses nodes borrowed from others' blocks (`borrowed/`). Listed once, then kept
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
        let (affinities, _) = store.list(keys::AFFINITIES).await?;
        let (borrowed, _) = store.list(keys::BORROWED).await?;
        Ok(Self {
            nodes: cluster::routable(store).await?,
            affinities: affinities.iter().map(|kv| decode(&kv.key, &kv.value)).collect::<Result<_, _>>()?,
            borrowed: borrowed.iter().map(|kv| decode(&kv.key, &kv.value)).collect::<Result<_, _>>()?,
        })
    }
}

fn names(prefix: &str, keys: Vec<String>) -> BTreeSet<String> {
    keys.into_iter().filter_map(|k| k.strip_prefix(prefix).map(str::to_string)).collect()
}

/// The followed prefixes' keys (without the prefix) and values, as the watches last reported them.
#[derive(Clone, Debug, Default)]
struct Mirror {
    entries: BTreeMap<&'static str, BTreeMap<String, Vec<u8>>>,
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
        Ok(Routing { nodes, affinities: self.decoded(keys::AFFINITIES)?, borrowed: self.decoded(keys::BORROWED)? })
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

const PREFIXES: [&str; 5] = [keys::NODES, keys::NODE_ADDRESSES, keys::DECOMMISSIONED, keys::AFFINITIES, keys::BORROWED];

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
        for prefix in PREFIXES {
            let (listed, revision) = store.list(prefix).await?;
            let entries =
                listed.into_iter().filter_map(|kv| Some((kv.key.strip_prefix(prefix)?.to_string(), kv.value)));
            mirror.entries.insert(prefix, entries.collect());
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
            let entries = mirror.entries.entry(prefix).or_default();
            match event.kind {
                EventKind::Put => entries.insert(name.to_string(), event.kv.value),
                EventKind::Delete => entries.remove(name),
            };
            drop(followed);
            self.changes.notify_one();
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
        let block = |node: &str, cidr: &str| {
            let affinity = Affinity { node: node.into(), cidr: cidr.parse().unwrap() };
            Txn::new().put(keys::affinity(node, affinity.cidr), crate::catalog::encode(&affinity))
        };
        store.txn(register(record("a", "192.0.2.1"))).await.unwrap();
        store.txn(block("a", "10.0.0.0/26")).await.unwrap();
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
        store.txn(block("b", "10.0.0.64/26")).await.unwrap();
        store.txn(Txn::new().remove(keys::node("a"))).await.unwrap();
        let borrowed = Borrowed { ip: "10.0.0.5".parse().unwrap(), node: "c".into() };
        store
            .txn(register(record("c", "192.0.2.3")).put(keys::borrowed(borrowed.ip), crate::catalog::encode(&borrowed)))
            .await
            .unwrap();
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
    }
}
