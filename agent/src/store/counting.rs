//! A store that counts what is asked of the store it wraps: requests, and keys (with their values) read.
//! The per-node cost benchmark wraps one node's store with it to print what each periodic action reads;
//! a test can use it to check that an action reads only what concerns its node.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use async_trait::async_trait;

use super::{KeyValue, Revision, Store, StoreError, Txn, TxnOutcome, Watch};

/// What was asked of a store since the counts were last taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests (get, list, list_keys, txn, watch, revision, put_leased).
    pub requests: u64,
    /// Keys returned by gets and lists (a key-only listing counts its keys too).
    pub keys: u64,
    /// Bytes of keys and values returned.
    pub bytes: u64,
}

/// A [`Store`] counting the requests made through it and the keys they read.
pub struct CountingStore {
    inner: Arc<dyn Store>,
    requests: AtomicU64,
    keys: AtomicU64,
    bytes: AtomicU64,
}

impl CountingStore {
    /// Count what goes to `inner`.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner, requests: AtomicU64::new(0), keys: AtomicU64::new(0), bytes: AtomicU64::new(0) }
    }

    /// The counts so far, starting over from zero.
    pub fn take(&self) -> Counts {
        Counts {
            requests: self.requests.swap(0, Ordering::Relaxed),
            keys: self.keys.swap(0, Ordering::Relaxed),
            bytes: self.bytes.swap(0, Ordering::Relaxed),
        }
    }

    fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn read<'a>(&self, keys: impl IntoIterator<Item = (&'a str, usize)>) {
        for (key, value) in keys {
            self.keys.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add((key.len() + value) as u64, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl Store for CountingStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.request();
        let found = self.inner.get(key).await?;
        self.read(found.iter().map(|kv| (kv.key.as_str(), kv.value.len())));
        Ok(found)
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.request();
        let listed = self.inner.list(prefix).await?;
        self.read(listed.0.iter().map(|kv| (kv.key.as_str(), kv.value.len())));
        Ok(listed)
    }

    async fn list_keys(&self, prefix: &str) -> Result<(Vec<String>, Revision), StoreError> {
        self.request();
        let listed = self.inner.list_keys(prefix).await?;
        self.read(listed.0.iter().map(|k| (k.as_str(), 0)));
        Ok(listed)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.request();
        self.inner.txn(txn).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        self.request();
        self.inner.watch(prefix, from).await
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.request();
        self.inner.revision().await
    }

    async fn put_leased(&self, key: &str, value: Vec<u8>, ttl: std::time::Duration) -> Result<(), StoreError> {
        self.request();
        self.inner.put_leased(key, value, ttl).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    #[tokio::test]
    async fn counts_requests_and_the_keys_they_read() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let store = CountingStore::new(inner);
        store.txn(Txn::new().put("a/1", b"xy".to_vec()).put("a/2", Vec::new()).put("b/1", Vec::new())).await.unwrap();
        assert_eq!(store.take(), Counts { requests: 1, keys: 0, bytes: 0 });
        assert_eq!(store.list("a/").await.unwrap().0.len(), 2);
        assert!(store.get("a/1").await.unwrap().is_some());
        assert!(store.get("c").await.unwrap().is_none());
        assert_eq!(store.list_keys("b/").await.unwrap().0.len(), 1);
        assert_eq!(store.take(), Counts { requests: 4, keys: 4, bytes: 3 + 2 + 3 + 3 + 2 + 3 });
        assert_eq!(store.take(), Counts::default());
    }
}
