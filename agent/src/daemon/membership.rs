//! Which nodes the datastore knows, followed by watches so that a garbage collection pass does not list
//! the cluster's nodes: registered (`nodes/`, leased), known by their last addresses (`node-addresses/`,
//! kept while the node is not decommissioned) and decommissioned (`decommissioned/`). Listed once, then
//! kept by the watches' events; while a watch is broken (the store away, history compacted) the sets are
//! listed afresh by whoever asks, so nobody ever judges a node by a stale view.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use futures::StreamExt;
use tracing::debug;

use crate::store::{EventKind, Store, StoreError, keys};

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

    fn set(&mut self, prefix: &str) -> &mut BTreeSet<String> {
        match prefix {
            keys::NODES => &mut self.registered,
            keys::NODE_ADDRESSES => &mut self.known,
            _ => &mut self.decommissioned,
        }
    }
}

fn names(prefix: &str, keys: Vec<String>) -> BTreeSet<String> {
    keys.into_iter().filter_map(|k| k.strip_prefix(prefix).map(str::to_string)).collect()
}

/// The nodes as the watches last reported them; `None` while not followed (or a watch is broken).
#[derive(Default)]
pub struct Membership {
    followed: Mutex<Option<Nodes>>,
}

const PREFIXES: [&str; 3] = [keys::NODES, keys::NODE_ADDRESSES, keys::DECOMMISSIONED];

impl Membership {
    /// The nodes: as followed, or listed now when not followed.
    pub async fn nodes(&self, store: &dyn Store) -> Result<Nodes, StoreError> {
        if let Some(nodes) = self.followed.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(nodes);
        }
        Nodes::list(store).await
    }

    /// Whether the sets are being followed (the watches run and were listed from).
    pub fn is_followed(&self) -> bool {
        self.followed.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Follow the three prefixes for as long as the store lives: list them with their revision, watch from
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
        let mut nodes = Nodes::default();
        let mut watches = Vec::new();
        for prefix in PREFIXES {
            let (listed, revision) = store.list_keys(prefix).await?;
            *nodes.set(prefix) = names(prefix, listed);
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
        *self.followed.lock().unwrap_or_else(|p| p.into_inner()) = Some(nodes);
        let mut events = futures::stream::select_all(watches);
        while let Some((prefix, event)) = events.next().await {
            let event = event?;
            let Some(name) = event.kv.key.strip_prefix(prefix) else { continue };
            let mut followed = self.followed.lock().unwrap_or_else(|p| p.into_inner());
            let Some(nodes) = followed.as_mut() else { return Ok(()) };
            match event.kind {
                EventKind::Put => nodes.set(prefix).insert(name.to_string()),
                EventKind::Delete => nodes.set(prefix).remove(name),
            };
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
}
