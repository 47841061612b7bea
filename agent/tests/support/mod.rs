//! Shared helpers for the integration tests: a fresh embedded store, a clock the test moves, requests.
#![allow(dead_code, reason = "each test binary uses a different subset of the helpers")]

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use poolwarden::{
    allocator::{Allocator, AssignRequest},
    catalog::Catalog,
    ipam::{NamespaceInfo, NodeInfo, PodInfo},
    resources::parse_documents,
    store::{Store, embedded::EmbeddedStore},
};

pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: Arc<dyn Store>,
    pub now: Arc<AtomicU64>,
    pub allocator: Allocator,
}

impl Env {
    /// A fresh store; on /dev/shm when present so that durable commits do not dominate test time.
    pub fn new() -> Self {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            tempfile::tempdir_in("/dev/shm").expect("temp dir")
        } else {
            tempfile::tempdir().expect("temp dir")
        };
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).expect("open store"));
        let now = Arc::new(AtomicU64::new(1_000_000));
        let clock_now = Arc::clone(&now);
        let allocator = Allocator::with_clock(Arc::clone(&store), Arc::new(move || clock_now.load(Ordering::SeqCst)));
        Self { dir, store, now, allocator }
    }

    pub fn advance(&self, seconds: u64) {
        self.now.fetch_add(seconds, Ordering::SeqCst);
    }

    /// The catalog, on this environment's clock.
    pub fn catalog(&self) -> Catalog {
        let now = Arc::clone(&self.now);
        Catalog::with_clock(Arc::clone(&self.store), Arc::new(move || now.load(Ordering::SeqCst)))
    }

    pub async fn apply(&self, yaml: &str) {
        let docs = parse_documents("test.yaml", yaml).unwrap_or_else(|e| panic!("parse: {e}"));
        self.catalog().apply(&docs).await.unwrap_or_else(|e| panic!("apply: {e}"));
    }
}

pub fn pool_yaml(name: &str, cidr: &str, block: u8, extra: &str) -> String {
    format!(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  cidr: {cidr}\n  blockSize: {block}\n{extra}---\n"
    )
}

pub fn request(handle: &str, node: &str, namespace: &str, annotations: &[(&str, &str)]) -> AssignRequest {
    AssignRequest {
        handle: handle.to_string(),
        node: NodeInfo { name: node.to_string(), labels: BTreeMap::new() },
        namespace: NamespaceInfo {
            name: namespace.to_string(),
            labels: BTreeMap::new(),
            annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        },
        pod: Some(PodInfo { name: handle.to_string(), annotations: BTreeMap::new() }),
        requested: Default::default(),
        eligible: None,
        attributes: BTreeMap::new(),
    }
}
