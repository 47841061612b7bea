//! Kubernetes as the source of namespaces, of this node's pods and of this node: reflector caches fed by
//! list + watch (kube-rs), so an ADD is answered from memory, with a direct GET only for what the cache does
//! not know yet (a pod created a moment ago). A lookup the API server cannot answer is reported as
//! unreachable, which the agent turns into CNI code 11 (try again later): kubelet retries the sandbox.

use std::{collections::BTreeMap, net::IpAddr, path::Path, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tracing::{info, warn};

use crate::{
    directory::{Directory, DirectoryError, Source},
    ipam::{NamespaceInfo, NodeInfo, PodInfo},
};

pub mod lease;
pub mod pools;
pub mod requests;

/// How long a direct GET on the ADD path may take before the ADD is answered "try again later".
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors connecting to the API server.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file given.
        path: String,
        /// What was wrong.
        message: String,
    },
    /// Neither in-cluster configuration nor a kubeconfig was found.
    #[error(
        "no Kubernetes configuration: not running in a pod (KUBERNETES_SERVICE_HOST unset) and no kubeconfig \
         ($KUBECONFIG, ~/.kube/config); give --kubeconfig: {0}"
    )]
    NoConfig(String),
    /// The client could not be built from the configuration.
    #[error("Kubernetes client: {0}")]
    Client(String),
}

/// A client for the API server: from `kubeconfig` when given, else in-cluster or `$KUBECONFIG`.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let fail = |e: &dyn std::fmt::Display| KubeError::Kubeconfig {
                path: path.display().to_string(),
                message: e.to_string(),
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| fail(&e))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| fail(&e))?
        }
        None => kube::Config::infer().await.map_err(|e| KubeError::NoConfig(e.to_string()))?,
    };
    counted_client(config, Arc::clone(&requests::PROCESS))
}

/// A client for `config` whose every request is counted into `tally`.
pub fn counted_client(config: kube::Config, tally: Arc<requests::Tally>) -> Result<Client, KubeError> {
    let builder = kube::client::ClientBuilder::try_from(config).map_err(|e| KubeError::Client(e.to_string()))?;
    Ok(builder.with_layer(&requests::CountLayer::new(tally)).build())
}

/// The caches, and the tasks that keep them current (stopped when this is dropped).
pub struct KubeDirectory {
    /// What a cache miss asks.
    lookups: KubeLookups,
    node: String,
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    nodes: Store<Node>,
    watches: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeDirectory {
    fn drop(&mut self) {
        for watch in &self.watches {
            watch.abort();
        }
    }
}

/// Keep a reflector store of `api` (filtered by `config`) current, restarting the watch with backoff
/// whenever it fails; a `410 Gone` makes the watcher list again.
fn reflect<K>(api: Api<K>, config: watcher::Config, what: &'static str) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    reflect_into(reflector::store::Writer::default(), api, config, what, None)
}

/// [`reflect`] into `writer`, waking `changed` (when given) after every event the store applied.
fn reflect_into<K>(
    writer: reflector::store::Writer<K>,
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    changed: Option<Arc<tokio::sync::Notify>>,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let reader = writer.as_reader();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut healthy = true;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if matches!(event, watcher::Event::InitDone) {
                        info!(cache = what, "the Kubernetes cache is in sync");
                    }
                    healthy = true;
                    if let Some(changed) = &changed {
                        changed.notify_one();
                    }
                }
                Err(e) if healthy => {
                    warn!(cache = what, error = %e, "watching the Kubernetes API failed; retrying with backoff");
                    healthy = false;
                }
                Err(_) => {}
            }
        }
    });
    (reader, task)
}

fn unreachable_or(what: String, err: kube::Error) -> DirectoryError {
    match err {
        kube::Error::Api(status) if status.code == 404 => DirectoryError::NotFound { what },
        kube::Error::Api(status) => {
            DirectoryError::Refused { what, message: format!("{} ({})", status.message, status.code) }
        }
        other => DirectoryError::Unreachable { what, message: other.to_string() },
    }
}

/// A request to the API server, bounded by [`LOOKUP_TIMEOUT`]; `what` names what it looks up.
async fn bounded<T>(
    what: String,
    request: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, DirectoryError> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, request).await {
        Ok(Ok(found)) => Ok(found),
        Ok(Err(e)) => Err(unreachable_or(what, e)),
        Err(_) => Err(DirectoryError::Unreachable { what, message: format!("no answer within {LOOKUP_TIMEOUT:?}") }),
    }
}

/// GET one object, bounded by [`LOOKUP_TIMEOUT`].
async fn get<K>(api: &Api<K>, name: &str, what: String) -> Result<K, DirectoryError>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    bounded(what, api.get(name)).await
}

fn namespace_info(ns: &Namespace) -> NamespaceInfo {
    let name = ns.metadata.name.clone().unwrap_or_default();
    let mut labels: BTreeMap<String, String> = ns.metadata.labels.clone().unwrap_or_default();
    labels.entry("kubernetes.io/metadata.name".to_string()).or_insert_with(|| name.clone());
    NamespaceInfo { name, labels, annotations: ns.metadata.annotations.clone().unwrap_or_default() }
}

/// A node's `InternalIP` addresses (then `ExternalIP` when it has no internal one), as its kubelet reported
/// them: where other nodes reach it.
pub fn node_addresses_of(node: &Node) -> Vec<IpAddr> {
    let reported = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    let of_type = |kind: &str| -> Vec<IpAddr> {
        reported.into_iter().flatten().filter(|a| a.type_ == kind).filter_map(|a| a.address.parse().ok()).collect()
    };
    let internal = of_type("InternalIP");
    if internal.is_empty() { of_type("ExternalIP") } else { internal }
}

/// The record routes use of a Node object: its name, its kubelet's addresses and its labels.
pub fn node_record(node: &Node) -> crate::cluster::NodeRecord {
    crate::cluster::NodeRecord {
        name: kube::ResourceExt::name_any(node),
        addresses: node_addresses_of(node),
        labels: kube::ResourceExt::labels(node).clone().into_iter().collect(),
    }
}

/// The node as selection sees it: `given` with the labels the API server has for it (those win).
fn node_info(given: &NodeInfo, node: &Node) -> NodeInfo {
    let mut labels = given.labels.clone();
    labels.extend(node.metadata.labels.iter().flatten().map(|(k, v)| (k.clone(), v.clone())));
    NodeInfo { name: given.name.clone(), labels }
}

/// The annotation a mirror pod (the API server's copy of a kubelet's static pod) carries with the UID the
/// kubelet gave the static pod, which is the UID the runtime passes as `K8S_POD_UID`.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Whether `pod` is the pod of UID `uid`: its own, or for a mirror pod the static pod's.
fn same_pod(pod: &Pod, uid: &str) -> bool {
    pod.metadata.uid.as_deref() == Some(uid)
        || pod.metadata.annotations.as_ref().and_then(|a| a.get(MIRROR_ANNOTATION)).map(String::as_str) == Some(uid)
}

fn pod_info(pod: &Pod) -> PodInfo {
    PodInfo {
        name: pod.metadata.name.clone().unwrap_or_default(),
        annotations: pod.metadata.annotations.clone().unwrap_or_default(),
    }
}

impl KubeDirectory {
    /// Start the caches for `node`: every namespace, the pods scheduled to `node`, and `node` itself.
    pub fn start(client: Client, node: &str) -> Self {
        let (namespaces, ns_task) =
            reflect(Api::<Namespace>::all(client.clone()), watcher::Config::default(), "namespaces");
        let pods_config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let (pods, pod_task) = reflect(Api::<Pod>::all(client.clone()), pods_config, "pods");
        let node_config = watcher::Config::default().fields(&format!("metadata.name={node}"));
        let (nodes, node_task) = reflect(Api::<Node>::all(client.clone()), node_config, "node");
        let lookups = KubeLookups::new(client);
        Self { lookups, node: node.to_string(), namespaces, pods, nodes, watches: vec![ns_task, pod_task, node_task] }
    }

    /// Wait until every cache has listed once, for at most `limit`; returns whether they all did.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let all = async {
            let _ = self.namespaces.wait_until_ready().await;
            let _ = self.pods.wait_until_ready().await;
            let _ = self.nodes.wait_until_ready().await;
        };
        tokio::time::timeout(limit, all).await.is_ok()
    }

    /// This node's `InternalIP` addresses (then `ExternalIP` when it has no internal one), as the kubelet
    /// reported them: where other nodes reach this one.
    pub async fn node_addresses(&self) -> Result<Vec<IpAddr>, DirectoryError> {
        Ok(node_addresses_of(&self.node_object().await?))
    }

    /// A namespace as the cache has it (no request).
    pub fn namespace_cached(&self, name: &str) -> Option<NamespaceInfo> {
        self.namespaces.get(&ObjectRef::new(name)).map(|ns| namespace_info(&ns))
    }

    async fn node_object(&self) -> Result<Node, DirectoryError> {
        match self.nodes.get(&ObjectRef::new(&self.node)) {
            Some(node) => Ok((*node).clone()),
            None => self.lookups.node_object(&self.node).await,
        }
    }
}

#[async_trait]
impl Directory for KubeDirectory {
    fn source(&self) -> Source {
        Source::Kubernetes
    }

    async fn namespace(&self, name: &str) -> Result<NamespaceInfo, DirectoryError> {
        match self.namespace_cached(name) {
            Some(ns) => Ok(ns),
            None => self.lookups.namespace(name).await,
        }
    }

    async fn namespaces(&self) -> Result<Vec<NamespaceInfo>, DirectoryError> {
        if futures::FutureExt::now_or_never(self.namespaces.wait_until_ready()).is_none() {
            return self.lookups.namespaces().await;
        }
        let mut all: Vec<NamespaceInfo> = self.namespaces.state().iter().map(|ns| namespace_info(ns)).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    async fn pod(&self, namespace: &str, name: &str, uid: &str) -> Result<PodInfo, DirectoryError> {
        match self.pods.get(&ObjectRef::new(name).within(namespace)) {
            Some(pod) if uid.is_empty() || same_pod(&pod, uid) => Ok(pod_info(&pod)),
            // Created a moment ago (the watch has not delivered it yet), or recreated under its name (the
            // cache still has the old one).
            _ => self.lookups.pod(namespace, name, uid).await,
        }
    }

    async fn node(&self, given: &NodeInfo) -> Result<NodeInfo, DirectoryError> {
        // Only the labels are copied, not the cached object (its status lists every image on the node).
        match self.nodes.get(&ObjectRef::new(&self.node)) {
            Some(node) => Ok(node_info(given, &node)),
            None => Ok(node_info(given, &self.lookups.node_object(&self.node).await?)),
        }
    }

    async fn pod_gone(&self, namespace: &str, name: &str, uid: &str) -> Result<bool, DirectoryError> {
        // The cache proves that it exists; only the API server proves that it is gone.
        match self.pods.get(&ObjectRef::new(name).within(namespace)) {
            Some(pod) if same_pod(&pod, uid) => Ok(false),
            _ => self.lookups.pod_gone(namespace, name, uid).await,
        }
    }

    async fn node_deleted(&self, name: &str) -> Result<bool, DirectoryError> {
        self.lookups.node_deleted(name).await
    }
}

/// A directory that only knows the API server through `client` (the commands, which run once and keep
/// no cache): every lookup is a request.
pub struct KubeLookups {
    client: Client,
}

impl KubeLookups {
    /// Look things up through `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    async fn node_object(&self, name: &str) -> Result<Node, DirectoryError> {
        get(&Api::<Node>::all(self.client.clone()), name, format!("node {name}")).await
    }
}

#[async_trait]
impl Directory for KubeLookups {
    fn source(&self) -> Source {
        Source::Kubernetes
    }

    async fn namespace(&self, name: &str) -> Result<NamespaceInfo, DirectoryError> {
        let ns = get(&Api::<Namespace>::all(self.client.clone()), name, format!("namespace {name}")).await?;
        Ok(namespace_info(&ns))
    }

    async fn namespaces(&self) -> Result<Vec<NamespaceInfo>, DirectoryError> {
        let api = Api::<Namespace>::all(self.client.clone());
        let listed = bounded("namespaces".into(), api.list(&Default::default())).await?;
        let mut all: Vec<NamespaceInfo> = listed.items.iter().map(namespace_info).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    async fn pod(&self, namespace: &str, name: &str, uid: &str) -> Result<PodInfo, DirectoryError> {
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        let pod = get(&api, name, format!("pod {namespace}/{name}")).await?;
        if uid.is_empty() || same_pod(&pod, uid) {
            return Ok(pod_info(&pod));
        }
        let found = pod.metadata.uid.as_deref().unwrap_or_default();
        Err(DirectoryError::NotFound { what: format!("pod {namespace}/{name} of UID {uid} (it has {found})") })
    }

    async fn node(&self, given: &NodeInfo) -> Result<NodeInfo, DirectoryError> {
        Ok(node_info(given, &self.node_object(&given.name).await?))
    }

    async fn pod_gone(&self, namespace: &str, name: &str, uid: &str) -> Result<bool, DirectoryError> {
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        match get(&api, name, format!("pod {namespace}/{name}")).await {
            Ok(pod) => Ok(!same_pod(&pod, uid)),
            Err(DirectoryError::NotFound { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    async fn node_deleted(&self, name: &str) -> Result<bool, DirectoryError> {
        match self.node_object(name).await {
            Ok(_) => Ok(false),
            Err(DirectoryError::NotFound { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
