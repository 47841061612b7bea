//! An object store that counts the requests made of the one it wraps (on Kubernetes, API requests: a watch
//! counts once, when it starts). The datastore benchmark prints requests per ADD with it.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use async_trait::async_trait;

use super::{Kind, Labels, Object, ObjectError, ObjectStore, ObjectWatch};

/// An [`ObjectStore`] counting the requests made through it.
pub struct CountingObjects {
    inner: Arc<dyn ObjectStore>,
    requests: AtomicU64,
}

impl CountingObjects {
    /// Count what goes to `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self { inner, requests: AtomicU64::new(0) }
    }

    /// The requests so far, starting over from zero.
    pub fn take(&self) -> u64 {
        self.requests.swap(0, Ordering::Relaxed)
    }

    fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl ObjectStore for CountingObjects {
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Object>, ObjectError> {
        self.request();
        self.inner.get(kind, name).await
    }

    async fn list(&self, kind: Kind, selector: &Labels) -> Result<(Vec<Object>, String), ObjectError> {
        self.request();
        self.inner.list(kind, selector).await
    }

    async fn create(
        &self,
        kind: Kind,
        name: &str,
        labels: Labels,
        spec: serde_json::Value,
    ) -> Result<Object, ObjectError> {
        self.request();
        self.inner.create(kind, name, labels, spec).await
    }

    async fn update(&self, kind: Kind, object: &Object) -> Result<Object, ObjectError> {
        self.request();
        self.inner.update(kind, object).await
    }

    async fn delete(&self, kind: Kind, name: &str, version: &str) -> Result<(), ObjectError> {
        self.request();
        self.inner.delete(kind, name, version).await
    }

    async fn watch(&self, kind: Kind, selector: &Labels, from: &str) -> Result<ObjectWatch, ObjectError> {
        self.request();
        self.inner.watch(kind, selector, from).await
    }
}
