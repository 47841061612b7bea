//! Objects over a key-value [`Store`] (etcd, embedded): `objects/<plural>/<name>` holds the labels and spec,
//! at the key's revision as version. Key-value stores have no labels, so each object keeps one pointer key per
//! label, `index/<plural>/<key>=<value>/<name>`, written in the same transaction as the object (and rewritten
//! with each write of it). A selected list reads the pointers of the selector's first pair, then the objects;
//! a selected watch follows those pointers, so a node reads its own objects, not every object of the kind.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Kind, Labels, Object, ObjectError, ObjectEvent, ObjectStore, ObjectWatch, selects};
use crate::store::{EventKind, KeyValue, Revision, Store, StoreError, Txn, TxnOutcome};

/// The objects of a key-value store.
pub struct KeyValueObjects {
    store: Arc<dyn Store>,
}

impl KeyValueObjects {
    /// Objects kept in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

#[derive(Serialize, Deserialize)]
struct Stored {
    #[serde(default)]
    labels: Labels,
    spec: serde_json::Value,
}

/// The key prefix of the objects of `kind`.
pub fn object_prefix(kind: Kind) -> String {
    format!("objects/{}/", kind.plural())
}

/// The spec of the object stored as `value` under `key`, read as a `T` (for whoever follows the objects'
/// keys directly, as the agent's routes do).
pub fn decode_spec<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, StoreError> {
    let corrupt = |e: serde_json::Error| StoreError::Corrupt { key: key.to_string(), message: e.to_string() };
    let stored: Stored = serde_json::from_slice(value).map_err(corrupt)?;
    serde_json::from_value(stored.spec).map_err(corrupt)
}

fn object_key(kind: Kind, name: &str) -> String {
    format!("{}{name}", object_prefix(kind))
}

fn index_prefix(kind: Kind, key: &str, value: &str) -> String {
    format!("index/{}/{key}={value}/", kind.plural())
}

fn index_keys(kind: Kind, name: &str, labels: &Labels) -> Vec<String> {
    labels.iter().map(|(k, v)| format!("{}{name}", index_prefix(kind, k, v))).collect()
}

/// What the Kubernetes API server refuses is refused here too, in the same terms: names as DNS subdomains,
/// labels as Kubernetes labels, a spec that is an object. (It also keeps the keys unambiguous.)
fn check(kind: Kind, name: &str, labels: &Labels, spec: &serde_json::Value) -> Result<(), ObjectError> {
    let invalid = |message: String| ObjectError::Invalid { kind: kind.name(), name: name.to_string(), message };
    if !super::dns_subdomain(name) {
        return Err(invalid(format!(
            "metadata.name {name:?}: must be lower-case letters, digits, '-' and '.', start and end with a letter or \
             digit, at most 253 characters"
        )));
    }
    for (key, value) in labels {
        if !super::label_key(key) || !super::label_value(value) {
            return Err(invalid(format!(
                "metadata.labels {key:?}: {value:?}: a label key is an optional DNS subdomain and '/' and a name of \
                 at most 63 letters, digits, '-', '_' and '.'; a value is empty or such a name"
            )));
        }
    }
    if !spec.is_object() {
        return Err(invalid("spec: must be an object".into()));
    }
    Ok(())
}

fn decode(kind: Kind, kv: &KeyValue) -> Result<Object, ObjectError> {
    let name = kv.key.rsplit('/').next().unwrap_or_default().to_string();
    let stored: Stored = serde_json::from_slice(&kv.value).map_err(|e| ObjectError::Corrupt {
        kind: kind.name(),
        name: name.clone(),
        message: e.to_string(),
    })?;
    Ok(Object { name, labels: stored.labels, spec: stored.spec, version: kv.mod_revision.to_string() })
}

fn encode(labels: &Labels, spec: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&Stored { labels: labels.clone(), spec: spec.clone() }).unwrap_or_default()
}

fn revision_of(kind: Kind, name: &str, version: &str) -> Result<Revision, ObjectError> {
    version.parse().map_err(|_| ObjectError::Conflict {
        kind: kind.name(),
        name: name.to_string(),
        version: version.to_string(),
    })
}

/// An object as a key-value store holds it, its spec read as a `T`: for a caller that changes objects in one
/// transaction with other keys (the catalog deleting a pool with its empty blocks).
#[derive(Clone, Debug)]
pub struct RawObject<T> {
    /// Its name.
    pub name: String,
    /// Its key's revision (its version).
    pub revision: Revision,
    /// Its labels.
    pub labels: Labels,
    /// Its spec.
    pub spec: T,
}

/// Every object of `kind` in `store`, its spec read as a `T`.
pub async fn list_raw<T: serde::de::DeserializeOwned>(
    store: &dyn Store,
    kind: Kind,
) -> Result<Vec<RawObject<T>>, StoreError> {
    let (kvs, _) = store.list(&object_prefix(kind)).await?;
    kvs.iter()
        .map(|kv| {
            let corrupt = |e: serde_json::Error| StoreError::Corrupt { key: kv.key.clone(), message: e.to_string() };
            let stored: Stored = serde_json::from_slice(&kv.value).map_err(corrupt)?;
            Ok(RawObject {
                name: kv.key.rsplit('/').next().unwrap_or_default().to_string(),
                revision: kv.mod_revision,
                labels: stored.labels,
                spec: serde_json::from_value(stored.spec).map_err(corrupt)?,
            })
        })
        .collect()
}

/// `txn` with `object` deleted at the revision read, its label pointers with it.
pub fn stage_delete<T>(txn: Txn, kind: Kind, object: &RawObject<T>) -> Txn {
    let mut txn = txn.delete(object_key(kind, &object.name), object.revision);
    for key in index_keys(kind, &object.name, &object.labels) {
        txn = txn.remove(key);
    }
    txn
}

/// `txn` with `object` replaced by `labels` and `spec` at the revision read, its label pointers following.
pub fn stage_update<T: Serialize>(txn: Txn, kind: Kind, object: &RawObject<T>, labels: &Labels, spec: &T) -> Txn {
    let spec = serde_json::to_value(spec).unwrap_or_default();
    let txn = txn.update(object_key(kind, &object.name), object.revision, encode(labels, &spec));
    KeyValueObjects::with_pointers(txn, kind, &object.name, &object.labels, labels)
}

/// `txn` with `object` left as it is read (the transaction fails if it changed).
pub fn stage_unchanged<T>(txn: Txn, kind: Kind, object: &RawObject<T>) -> Txn {
    txn.unchanged(object_key(kind, &object.name), object.revision)
}

impl KeyValueObjects {
    /// The write of `labels` and `spec` under `name`, after `txn`'s condition on the object key, with the
    /// pointers of `old` that `labels` no longer has removed.
    fn with_pointers(txn: Txn, kind: Kind, name: &str, old: &Labels, labels: &Labels) -> Txn {
        let mut txn = txn;
        for key in index_keys(kind, name, old) {
            if !index_keys(kind, name, labels).contains(&key) {
                txn = txn.remove(key);
            }
        }
        for key in index_keys(kind, name, labels) {
            txn = txn.put(key, Vec::new());
        }
        txn
    }

    /// Commit `txn`, or the error `refused` makes when its condition does not hold.
    async fn committed(&self, txn: Txn, refused: impl FnOnce() -> ObjectError) -> Result<Revision, ObjectError> {
        match self.store.txn(txn).await? {
            TxnOutcome::Committed(revision) => Ok(revision),
            TxnOutcome::Conflict { .. } => Err(refused()),
        }
    }
}

#[async_trait]
impl ObjectStore for KeyValueObjects {
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Object>, ObjectError> {
        match self.store.get(&object_key(kind, name)).await? {
            Some(kv) => Ok(Some(decode(kind, &kv)?)),
            None => Ok(None),
        }
    }

    async fn list(&self, kind: Kind, selector: &Labels) -> Result<(Vec<Object>, String), ObjectError> {
        let Some((key, value)) = selector.iter().next() else {
            let (kvs, revision) = self.store.list(&object_prefix(kind)).await?;
            let objects = kvs.iter().map(|kv| decode(kind, kv)).collect::<Result<_, _>>()?;
            return Ok((objects, revision.to_string()));
        };
        let (pointers, revision) = self.store.list_keys(&index_prefix(kind, key, value)).await?;
        let mut objects = Vec::new();
        for pointer in pointers {
            let name = pointer.rsplit('/').next().unwrap_or_default();
            if let Some(object) = self.get(kind, name).await?
                && selects(selector, &object.labels)
            {
                objects.push(object);
            }
        }
        Ok((objects, revision.to_string()))
    }

    async fn create(
        &self,
        kind: Kind,
        name: &str,
        labels: Labels,
        spec: serde_json::Value,
    ) -> Result<Object, ObjectError> {
        check(kind, name, &labels, &spec)?;
        let txn = Txn::new().create(object_key(kind, name), encode(&labels, &spec));
        let txn = Self::with_pointers(txn, kind, name, &Labels::new(), &labels);
        let exists = || ObjectError::AlreadyExists { kind: kind.name(), name: name.to_string() };
        let revision = self.committed(txn, exists).await?;
        Ok(Object { name: name.to_string(), labels, spec, version: revision.to_string() })
    }

    async fn update(&self, kind: Kind, object: &Object) -> Result<Object, ObjectError> {
        let name = object.name.as_str();
        check(kind, name, &object.labels, &object.spec)?;
        let revision = revision_of(kind, name, &object.version)?;
        // The pointers to remove are the stored object's: read it (the write is conditional on its revision,
        // so what is read is what is replaced, or nothing is written).
        let Some(current) = self.get(kind, name).await? else {
            return Err(ObjectError::NotFound { kind: kind.name(), name: name.to_string() });
        };
        if current.version != object.version {
            return Err(ObjectError::Conflict {
                kind: kind.name(),
                name: name.to_string(),
                version: object.version.clone(),
            });
        }
        let txn = Txn::new().update(object_key(kind, name), revision, encode(&object.labels, &object.spec));
        let txn = Self::with_pointers(txn, kind, name, &current.labels, &object.labels);
        let stale =
            || ObjectError::Conflict { kind: kind.name(), name: name.to_string(), version: object.version.clone() };
        let revision = self.committed(txn, stale).await?;
        Ok(Object { version: revision.to_string(), ..object.clone() })
    }

    async fn delete(&self, kind: Kind, name: &str, version: &str) -> Result<(), ObjectError> {
        let revision = revision_of(kind, name, version)?;
        let Some(current) = self.get(kind, name).await? else {
            return Err(ObjectError::NotFound { kind: kind.name(), name: name.to_string() });
        };
        let stale = || ObjectError::Conflict { kind: kind.name(), name: name.to_string(), version: version.into() };
        if current.version != version {
            return Err(stale());
        }
        let mut txn = Txn::new().delete(object_key(kind, name), revision);
        for key in index_keys(kind, name, &current.labels) {
            txn = txn.remove(key);
        }
        self.committed(txn, stale).await.map(drop)
    }

    async fn watch(&self, kind: Kind, selector: &Labels, from: &str) -> Result<ObjectWatch, ObjectError> {
        let after: Revision = from.parse().map_err(|_| ObjectError::Expired(from.to_string()))?;
        let first = selector.iter().next();
        let prefix = match first {
            Some((key, value)) => index_prefix(kind, key, value),
            None => object_prefix(kind),
        };
        let mut changes = self.store.watch(&prefix, after + 1).await.map_err(|e| match e {
            StoreError::Compacted { .. } => ObjectError::Expired(from.to_string()),
            other => other.into(),
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let store = Arc::clone(&self.store);
        let selector = selector.clone();
        let by_pointer = first.is_some();
        let task = tokio::spawn(async move {
            let objects = KeyValueObjects::new(store);
            while let Some(change) = changes.next().await {
                let event = match change {
                    Err(StoreError::Compacted { .. }) => Err(ObjectError::Expired(after.to_string())),
                    Err(e) => Err(e.into()),
                    Ok(change) => {
                        let name = change.kv.key.rsplit('/').next().unwrap_or_default().to_string();
                        match (change.kind, by_pointer) {
                            (EventKind::Delete, _) => {
                                Ok(Some(ObjectEvent::Deleted { name, version: change.kv.mod_revision.to_string() }))
                            }
                            (EventKind::Put, false) => decode(kind, &change.kv).map(|o| Some(ObjectEvent::Applied(o))),
                            // A pointer written: the object as that write left it. If it changed since (or went),
                            // a later event on the same pointer follows (every write of an object rewrites or
                            // removes its pointers), so this one is skipped: events keep their order.
                            (EventKind::Put, true) => match objects.get(kind, &name).await {
                                Ok(Some(object)) if object.version != change.kv.mod_revision.to_string() => Ok(None),
                                Ok(Some(object)) if selects(&selector, &object.labels) => {
                                    Ok(Some(ObjectEvent::Applied(object)))
                                }
                                Ok(Some(object)) => Ok(Some(ObjectEvent::Deleted { name, version: object.version })),
                                Ok(None) => Ok(None),
                                Err(e) => Err(e),
                            },
                        }
                    }
                };
                let event = match event {
                    Ok(None) => continue,
                    Ok(Some(event)) => Ok(event),
                    Err(e) => Err(e),
                };
                let failed = event.is_err();
                if tx.send(event).is_err() || failed {
                    return;
                }
            }
        });
        Ok(ObjectWatch::new(rx, task))
    }
}
