//! Objects with compare-and-swap on one object at a time: what the single-object allocator of
//! `docs/allocator-single-object.md` is written against, so one allocator serves the Kubernetes API (which has
//! nothing wider) and the etcd and embedded datastores alike.
//!
//! An object is a name, labels and a JSON spec, at an opaque version (`resourceVersion` in Kubernetes, the
//! key's revision in a key-value store). Every write names the version it replaces; a stale one is refused
//! with [`ObjectError::Conflict`]. Lists and watches select by labels (every `key=value` given must match), so
//! a node follows its own blocks, not the cluster's.
//!
//! Backends: [`kv::KeyValueObjects`] over any [`crate::store::Store`] (etcd, embedded), and
//! [`kubernetes::KubeObjects`] over custom resources. [`conformance`] holds the behaviour all of them show.

pub mod conformance;
pub mod counting;
pub mod kubernetes;
pub mod kv;

use std::collections::BTreeMap;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::store::StoreError;

/// The kinds of object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `ipamblocks.poolwarden.io`: a block with its affinity and allocations.
    Block,
}

impl Kind {
    /// Its kind name, as Kubernetes spells it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Block => "IPAMBlock",
        }
    }

    /// Its plural, the resource's name in URLs and the key-value backends' prefix.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Block => "ipamblocks",
        }
    }
}

/// The label naming a block's pool (its name, or a digest of a name too long for a label value).
pub const POOL_LABEL: &str = "poolwarden.io/pool";
/// The label naming the node a block is affine to; absent when it is owned by nobody.
pub const AFFINITY_LABEL: &str = "poolwarden.io/affinity";
/// The prefix of one label per node that holds an address in a block it does not own.
pub const BORROWER_PREFIX: &str = "borrower.poolwarden.io/";
/// The label (`true`) of a block owned by nobody (its node went, or its pool was deleted while it cooled
/// down), so that the collectors find such blocks with one selected list, usually empty, not a read of every
/// block.
pub const UNOWNED_LABEL: &str = "poolwarden.io/unowned";

/// A DNS subdomain (RFC 1123), as Kubernetes wants an object's name.
pub fn dns_subdomain(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|part| part.starts_with(alnum) && part.ends_with(alnum) && part.chars().all(|c| alnum(c) || c == '-'))
}

/// A label value (also the name part of a key): empty, or up to 63 letters, digits, `-`, `_` and `.`,
/// starting and ending with a letter or digit.
pub fn label_value(value: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    value.is_empty()
        || (value.len() <= 63
            && value.starts_with(alnum)
            && value.ends_with(alnum)
            && value.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.')))
}

/// A label key: an optional DNS subdomain and `/`, then a non-empty name as [`label_value`].
pub fn label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    !name.is_empty() && label_value(name) && prefix.is_none_or(dns_subdomain)
}

/// Labels, or a selector (every pair must match).
pub type Labels = BTreeMap<String, String>;

/// Whether `labels` has every pair of `selector`.
pub fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One object as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// Its name (unique within its kind).
    pub name: String,
    /// Its labels.
    pub labels: Labels,
    /// What it holds.
    pub spec: serde_json::Value,
    /// The version it was read at; a write of it must name this.
    pub version: String,
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq)]
pub enum ObjectEvent {
    /// Created, changed, or now selected: the object as it is.
    Applied(Object),
    /// Deleted, or no longer selected.
    Deleted {
        /// Its name.
        name: String,
        /// The version it left at: the deletion's, or the write that made it unselected. Later than every
        /// version it was seen at before, so a consumer holding a later one (re-created since) keeps that.
        version: String,
    },
    /// Nothing selected changed up to `version` (the API server's bookmark): a watch opened again may start
    /// there, which the API server still keeps when the last change seen is older than it does.
    Progress(String),
}

/// A stream of changes; ends (`None`) when the backend closed it, after which the caller watches again from the
/// last version it was given.
pub struct ObjectWatch {
    events: mpsc::UnboundedReceiver<Result<ObjectEvent, ObjectError>>,
    _task: Option<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ObjectWatch {
    /// A watch fed by `task` through `events`; the task stops when the watch is dropped.
    pub fn new(
        events: mpsc::UnboundedReceiver<Result<ObjectEvent, ObjectError>>,
        task: tokio::task::JoinHandle<()>,
    ) -> Self {
        Self { events, _task: Some(AbortOnDrop(task)) }
    }

    /// The next change.
    pub async fn next(&mut self) -> Option<Result<ObjectEvent, ObjectError>> {
        self.events.recv().await
    }
}

/// Why an object operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// A create found the name taken.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists {
        /// The kind.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A write named a version that is no longer the object's.
    #[error("{kind} {name:?} changed since it was read (version {version}); read it again")]
    Conflict {
        /// The kind.
        kind: &'static str,
        /// The name.
        name: String,
        /// The version the write named.
        version: String,
    },
    /// The object does not exist.
    #[error("{kind} {name:?} does not exist")]
    NotFound {
        /// The kind.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A watch asked for changes older than the backend keeps: list again.
    #[error("the changes since version {0} are no longer kept; list again")]
    Expired(String),
    /// A name, label or spec the API server would refuse.
    #[error("{kind} {name:?}: {message}")]
    Invalid {
        /// The kind.
        kind: &'static str,
        /// The name.
        name: String,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A stored value is not an object.
    #[error("{kind} {name:?}: stored value is not an object: {message}")]
    Corrupt {
        /// The kind.
        kind: &'static str,
        /// The name.
        name: String,
        /// What was wrong.
        message: String,
    },
    /// The key-value backend failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The Kubernetes API refused or did not answer.
    #[error("Kubernetes API: {0}")]
    Api(String),
}

/// Objects with single-object compare-and-swap.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// The object, if it exists.
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Object>, ObjectError>;

    /// The objects `selector` selects, in name order, and the version to watch from for what comes after.
    async fn list(&self, kind: Kind, selector: &Labels) -> Result<(Vec<Object>, String), ObjectError>;

    /// Create the object; [`ObjectError::AlreadyExists`] when the name is taken.
    async fn create(
        &self,
        kind: Kind,
        name: &str,
        labels: Labels,
        spec: serde_json::Value,
    ) -> Result<Object, ObjectError>;

    /// Replace `object` (name, labels, spec) if it is still at `object.version`.
    async fn update(&self, kind: Kind, object: &Object) -> Result<Object, ObjectError>;

    /// Delete the object if it is still at `version`.
    async fn delete(&self, kind: Kind, name: &str, version: &str) -> Result<(), ObjectError>;

    /// The changes to what `selector` selects after version `from` (as given by [`ObjectStore::list`]), in
    /// order. An object leaving the selection is [`ObjectEvent::Deleted`]; one entering it is
    /// [`ObjectEvent::Applied`]. A `Deleted` may also name an object that was not selected (the key-value
    /// backends cannot always tell): the consumer ignores what it does not hold. An `Applied` is never sent
    /// for an object the selector does not select. The Kubernetes backend's watch ends after the API server's
    /// timeout (minutes): the consumer watches again from the last version it was given (listing again only
    /// when that version is no longer kept, [`ObjectError::Expired`], or the watch failed).
    async fn watch(&self, kind: Kind, selector: &Labels, from: &str) -> Result<ObjectWatch, ObjectError>;
}
