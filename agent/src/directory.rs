//! Where the agent and the commands learn about namespaces, pods and nodes: the datastore in standalone
//! mode (`poolwarden apply` of `kind: Namespace`, `poolwarden annotate namespace`), or the Kubernetes API
//! server (see the `k8s` module). Which one a datastore serves is recorded in it, so every command against a
//! cluster's datastore knows that namespaces come from the API server.

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{
    catalog::{Catalog, decode, encode},
    ipam::{NamespaceInfo, NodeInfo, PodInfo},
    store::{Store, StoreError},
};

/// The key recording where namespaces come from for this datastore.
pub const SOURCE_KEY: &str = "config/namespace-source";

/// Where namespaces, pods and node labels come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The datastore's own `namespaces/` records.
    #[default]
    Standalone,
    /// The Kubernetes API server.
    Kubernetes,
}

/// Errors looking something up.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The API server could not be reached (or did not answer in time) for something not cached.
    #[error("the Kubernetes API server could not be reached to look up {what}: {message}")]
    Unreachable {
        /// `pod default/web-1`, `namespace default`, ...
        what: String,
        /// What the client reported.
        message: String,
    },
    /// The API server refused or failed the request.
    #[error("the Kubernetes API server refused the lookup of {what}: {message}")]
    Refused {
        /// What was looked up.
        what: String,
        /// The API server's status message.
        message: String,
    },
    /// The object does not exist.
    #[error("{what} does not exist in the Kubernetes API server")]
    NotFound {
        /// What was looked up.
        what: String,
    },
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Namespaces, pods and nodes, from wherever this deployment keeps them.
#[async_trait]
pub trait Directory: Send + Sync {
    /// Which source this is.
    fn source(&self) -> Source;

    /// One namespace: its labels and annotations. A namespace nobody described (standalone) has only the
    /// `kubernetes.io/metadata.name` label Kubernetes gives every namespace.
    async fn namespace(&self, name: &str) -> Result<NamespaceInfo, DirectoryError>;

    /// Every namespace known.
    async fn namespaces(&self) -> Result<Vec<NamespaceInfo>, DirectoryError>;

    /// A pod's annotations (per-pod pools and addresses). With `uid` (`K8S_POD_UID`), that pod: a pod
    /// recreated under its name (a StatefulSet's) is not answered with the old one's annotations.
    async fn pod(&self, namespace: &str, name: &str, uid: &str) -> Result<PodInfo, DirectoryError>;

    /// The node as pools' `nodeSelector` sees it: `given` (name and `--node-labels`) with the labels the
    /// source knows for it.
    async fn node(&self, given: &NodeInfo) -> Result<NodeInfo, DirectoryError>;

    /// Whether the pod `namespace/name` of UID `uid` is gone: no pod of that name exists, or one of another
    /// UID does (recreated under its name). Only a source that knows pods can say so; the others answer no.
    async fn pod_gone(&self, _namespace: &str, _name: &str, _uid: &str) -> Result<bool, DirectoryError> {
        Ok(false)
    }

    /// Whether node `name`'s object was deleted. Only a source that knows nodes can say so; the others
    /// answer no.
    async fn node_deleted(&self, _name: &str) -> Result<bool, DirectoryError> {
        Ok(false)
    }
}

/// Standalone mode: namespaces are records in the datastore; pods carry no annotations of their own.
pub struct StandaloneDirectory {
    catalog: Catalog,
}

impl StandaloneDirectory {
    /// Read namespaces from `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { catalog: Catalog::new(store) }
    }
}

fn info_of(ns: crate::resources::Namespace) -> NamespaceInfo {
    let name = ns.name().to_string();
    let mut labels = ns.metadata.labels;
    labels.entry("kubernetes.io/metadata.name".to_string()).or_insert_with(|| name.clone());
    NamespaceInfo { name, labels, annotations: ns.metadata.annotations }
}

#[async_trait]
impl Directory for StandaloneDirectory {
    fn source(&self) -> Source {
        Source::Standalone
    }

    async fn namespace(&self, name: &str) -> Result<NamespaceInfo, DirectoryError> {
        Ok(match self.catalog.namespace(name).await? {
            Some((ns, _)) => info_of(ns),
            None => NamespaceInfo::bare(name),
        })
    }

    async fn namespaces(&self) -> Result<Vec<NamespaceInfo>, DirectoryError> {
        Ok(self.catalog.namespaces().await?.into_iter().map(info_of).collect())
    }

    async fn pod(&self, _namespace: &str, name: &str, _uid: &str) -> Result<PodInfo, DirectoryError> {
        Ok(PodInfo { name: name.to_string(), annotations: BTreeMap::new() })
    }

    async fn node(&self, given: &NodeInfo) -> Result<NodeInfo, DirectoryError> {
        Ok(given.clone())
    }
}

/// Where namespaces come from for `store` (standalone unless an agent in Kubernetes mode recorded otherwise).
pub async fn source_of(store: &dyn Store) -> Result<Source, StoreError> {
    match store.get(SOURCE_KEY).await? {
        Some(kv) => decode(SOURCE_KEY, &kv.value),
        None => Ok(Source::Standalone),
    }
}

/// Record that namespaces come from `source` for this datastore.
pub async fn record_source(store: &dyn Store, source: Source) -> Result<(), StoreError> {
    if source_of(store).await? != source {
        store.txn(crate::store::Txn::new().put(SOURCE_KEY, encode(&source))).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    #[tokio::test]
    async fn standalone_namespaces_come_from_the_store_and_the_source_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        assert_eq!(source_of(store.as_ref()).await.unwrap(), Source::Standalone);
        let directory = StandaloneDirectory::new(Arc::clone(&store));
        let bare = directory.namespace("tenant").await.unwrap();
        assert_eq!(bare.labels.get("kubernetes.io/metadata.name").map(String::as_str), Some("tenant"));
        assert!(bare.annotations.is_empty());
        record_source(store.as_ref(), Source::Kubernetes).await.unwrap();
        assert_eq!(source_of(store.as_ref()).await.unwrap(), Source::Kubernetes);
    }
}
