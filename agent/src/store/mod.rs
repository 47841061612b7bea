//! The datastore: a revisioned key/value store with compare-and-swap transactions and prefix watches.
//!
//! The semantics are etcd's, so that the etcd backend is a straight mapping: every committed transaction
//! gets the next cluster-wide revision; every key remembers the revision that created it and the one that
//! last changed it; a transaction commits all of its operations or none of them, and only if every one of
//! its comparisons holds. The embedded backend ([`embedded::EmbeddedStore`]) implements the same contract
//! on a single file.

pub mod conformance;
pub mod counting;
pub mod embedded;
pub mod etcd;

use std::{fmt, sync::Arc};

use async_trait::async_trait;
use tokio::sync::mpsc;

/// A store revision. Revisions start at 1 and increase by one per committed transaction; 0 means "none".
pub type Revision = i64;

/// One key with its value and revisions, as read from the store.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key, for example `blocks/10.0.0.0/29`.
    pub key: String,
    /// The value bytes (JSON documents for everything poolwarden writes).
    pub value: Vec<u8>,
    /// The revision of the transaction that created this key.
    pub create_revision: Revision,
    /// The revision of the transaction that last changed this key.
    pub mod_revision: Revision,
}

impl fmt::Debug for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyValue")
            .field("key", &self.key)
            .field("value", &String::from_utf8_lossy(&self.value))
            .field("create_revision", &self.create_revision)
            .field("mod_revision", &self.mod_revision)
            .finish()
    }
}

/// A condition a transaction checks before it applies its operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key must not exist (create-if-absent).
    Absent(String),
    /// The key must exist and have been last modified at exactly this revision (update/delete-if-revision).
    ModRevision(String, Revision),
}

impl Compare {
    /// The key the comparison is about.
    pub fn key(&self) -> &str {
        match self {
            Compare::Absent(key) | Compare::ModRevision(key, _) => key,
        }
    }
}

/// A write a transaction applies when its comparisons hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create or replace the value of a key.
    Put { key: String, value: Vec<u8> },
    /// Remove a key; removing an absent key is not an error.
    Delete { key: String },
}

/// An atomic compare-and-swap transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    /// Every comparison must hold for the operations to be applied.
    pub compares: Vec<Compare>,
    /// Applied in order, all at one revision.
    pub ops: Vec<Op>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Create `key` only if it does not exist yet.
    pub fn create(mut self, key: impl Into<String>, value: Vec<u8>) -> Self {
        let key = key.into();
        self.compares.push(Compare::Absent(key.clone()));
        self.ops.push(Op::Put { key, value });
        self
    }

    /// Replace `key` only if it was last modified at `revision`.
    pub fn update(mut self, key: impl Into<String>, revision: Revision, value: Vec<u8>) -> Self {
        let key = key.into();
        self.compares.push(Compare::ModRevision(key.clone(), revision));
        self.ops.push(Op::Put { key, value });
        self
    }

    /// Create `key` if `revision` is `None`, otherwise update it if it is still at that revision.
    pub fn write(self, key: impl Into<String>, revision: Option<Revision>, value: Vec<u8>) -> Self {
        match revision {
            None => self.create(key, value),
            Some(revision) => self.update(key, revision, value),
        }
    }

    /// Delete `key` only if it was last modified at `revision`.
    pub fn delete(mut self, key: impl Into<String>, revision: Revision) -> Self {
        let key = key.into();
        self.compares.push(Compare::ModRevision(key.clone(), revision));
        self.ops.push(Op::Delete { key });
        self
    }

    /// Create or replace `key` whatever its revision (for records derived from others guarded in the same txn).
    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>) -> Self {
        self.ops.push(Op::Put { key: key.into(), value });
        self
    }

    /// Delete `key` if present, whatever its revision.
    pub fn remove(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }

    /// Require `key` to still be at `revision` without writing it (a read the decision depended on).
    pub fn unchanged(mut self, key: impl Into<String>, revision: Revision) -> Self {
        self.compares.push(Compare::ModRevision(key.into(), revision));
        self
    }

    /// Require `key` to still be absent without writing it.
    pub fn still_absent(mut self, key: impl Into<String>) -> Self {
        self.compares.push(Compare::Absent(key.into()));
        self
    }
}

/// What happened to a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every comparison held; the operations were applied at this revision.
    Committed(Revision),
    /// A comparison failed (the first one, by key); nothing was written.
    Conflict { key: String },
}

impl TxnOutcome {
    /// Whether the transaction was applied.
    pub fn is_committed(&self) -> bool {
        matches!(self, TxnOutcome::Committed(_))
    }
}

/// What a watch reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or changed; `kv` holds the new value.
    Put,
    /// The key was deleted; `kv.value` is empty and `kv.mod_revision` is the deleting revision.
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change.
    pub kv: KeyValue,
}

/// A live stream of changes under a prefix, in revision order, with nothing skipped.
pub struct Watch {
    events: mpsc::UnboundedReceiver<Result<WatchEvent, StoreError>>,
}

impl Watch {
    /// Wrap a channel that a backend feeds.
    pub fn from_channel(events: mpsc::UnboundedReceiver<Result<WatchEvent, StoreError>>) -> Self {
        Self { events }
    }

    /// The next change; `None` when the store was closed.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, StoreError>> {
        self.events.recv().await
    }
}

/// Errors from a datastore.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The datastore location given by the user could not be understood.
    #[error("invalid datastore {spec:?}: {reason}")]
    InvalidSpec {
        /// What the user typed, for example `embedded:/var/lib/poolwarden/store.redb`.
        spec: String,
        /// Why it was refused.
        reason: String,
    },
    /// The embedded database file is held by another process.
    #[error(
        "the datastore {path} is in use by another process (is `poolwarden agent` running on it? \
         while it runs, use the agent's socket or stop it first)"
    )]
    Locked {
        /// The database file.
        path: String,
    },
    /// A read-only command found no datastore where it looked (it never creates one).
    #[error(
        "there is no datastore at {path} (--datastore {spec}): nothing has been stored there; give the \
         --datastore the agent uses (embedded:PATH or etcd:URL)"
    )]
    Missing {
        /// What the user typed (or the default).
        spec: String,
        /// Where it looked.
        path: String,
    },
    /// The backend failed to perform an operation.
    #[error("datastore {operation} failed: {message}")]
    Backend {
        /// What was being done, for example `commit` or `open /var/lib/poolwarden/store.redb`.
        operation: String,
        /// The backend's own message.
        message: String,
    },
    /// A watch asked for history the store no longer keeps.
    #[error(
        "watch from revision {requested} is no longer possible: history before revision {compacted} was compacted; list again and watch from the listed revision"
    )]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The oldest revision still available.
        compacted: Revision,
    },
    /// A stored value could not be decoded.
    #[error("stored value at {key} is corrupt: {message}")]
    Corrupt {
        /// The key whose value is bad.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// The store has been closed.
    #[error("the datastore is closed")]
    Closed,
}

impl StoreError {
    /// A backend error for `operation`.
    pub fn backend(operation: impl Into<String>, err: impl fmt::Display) -> Self {
        StoreError::Backend { operation: operation.into(), message: err.to_string() }
    }
}

/// A revisioned key/value store. Every poolwarden backend implements it and passes [`conformance`].
#[async_trait]
pub trait Store: Send + Sync {
    /// The value of one key, if present.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Every key starting with `prefix`, in key order, and the store revision the listing reflects.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;

    /// The keys starting with `prefix`, without their values (etcd's `keys_only`).
    async fn list_keys(&self, prefix: &str) -> Result<(Vec<String>, Revision), StoreError>;

    /// Apply `txn` atomically if all its comparisons hold.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;

    /// Every change under `prefix` with a revision of at least `from` (0: only future changes).
    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError>;

    /// The revision of the last committed transaction.
    async fn revision(&self) -> Result<Revision, StoreError>;

    /// Keep `key` holding `value` while this process lives. A shared store forgets it about `ttl` after the
    /// process stops renewing it (so a node that vanished is visible to the others); the embedded store,
    /// which serves one node, keeps it.
    async fn put_leased(&self, key: &str, value: Vec<u8>, _ttl: std::time::Duration) -> Result<(), StoreError> {
        self.txn(Txn::new().put(key, value)).await.map(|_| ())
    }
}

/// How the user names a backend on the command line: `embedded:PATH` (the default) or `etcd:URL[,URL...]`.
pub const DEFAULT_DATASTORE: &str = "embedded:/var/lib/poolwarden/store.redb";

/// `--datastore kubernetes`: the agent keeps everything as custom resources of the API server (see
/// `docs/allocator-single-object.md`); there is no key-value store to open.
pub const KUBERNETES_DATASTORE: &str = "kubernetes";

/// What [`keys::MIGRATION_IN_PROGRESS`] holds, for good, once an agent of this version ran on a datastore
/// (and converted what older versions wrote): the IPAM state is kept as block objects. Agents of older
/// versions take it for a migration that did not finish, and so never start on it (they would write the
/// multi-key records beside the objects: two sources of truth); this version does not.
pub const OBJECTS_LAYOUT: &str =
    "a newer poolwarden, which keeps the IPAM state as block objects: agents of this version cannot run on it";

/// How [`keys::MIGRATION_IN_PROGRESS`] begins while an agent of this version converts what older versions
/// wrote into block objects (`migrate::convert_in_place`); older agents do not start meanwhile.
pub const CONVERTING: &str = "an agent converting the multi-key records to block objects: ";

/// Where a `poolwarden datastore migrate` into `store` that has not finished came from ([`keys::MIGRATION_IN_PROGRESS`]):
/// while it is set, the IPAM state is partial. (Not [`OBJECTS_LAYOUT`] nor [`CONVERTING`], which mark the
/// layout and its conversion, not a copy.)
pub async fn unfinished_migration(store: &dyn Store) -> Result<Option<String>, StoreError> {
    let mark = store.get(keys::MIGRATION_IN_PROGRESS).await?;
    let mark = mark.map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
    Ok(mark.filter(|v| v != OBJECTS_LAYOUT && !v.starts_with(CONVERTING)))
}

/// Open the backend named by `spec`, as given to `--datastore`; an etcd backend takes what `spec` does not say
/// (TLS material, key prefix) from `etcd`.
pub async fn open(spec: &str, etcd: &etcd::EtcdConfig) -> Result<Arc<dyn Store>, StoreError> {
    open_for(spec, etcd, true).await
}

/// [`open`] for a command that only reads: an embedded store that does not exist is not created (an empty one
/// would report an empty world), but refused with [`StoreError::Missing`].
pub async fn open_existing(spec: &str, etcd: &etcd::EtcdConfig) -> Result<Arc<dyn Store>, StoreError> {
    open_for(spec, etcd, false).await
}

async fn open_for(spec: &str, etcd: &etcd::EtcdConfig, create: bool) -> Result<Arc<dyn Store>, StoreError> {
    if spec == KUBERNETES_DATASTORE {
        return Err(StoreError::InvalidSpec {
            spec: spec.to_string(),
            reason: "the Kubernetes datastore is read by the agents (`poolwarden agent --datastore kubernetes`); \
                     this command does not read it yet: `kubectl get ippools,ipamblocks` shows its pools and blocks"
                .into(),
        });
    }
    match spec.split_once(':') {
        Some(("embedded", path)) if !path.is_empty() => {
            let file = std::path::Path::new(path);
            if !create && !file.exists() {
                return Err(StoreError::Missing { spec: spec.to_string(), path: path.to_string() });
            }
            Ok(Arc::new(embedded::EmbeddedStore::open(file)?))
        }
        Some(("etcd", _)) => {
            let config = etcd::EtcdConfig { endpoints: etcd::EtcdConfig::from_spec(spec)?.endpoints, ..etcd.clone() };
            Ok(Arc::new(etcd::EtcdStore::connect(&config).await?))
        }
        _ => Err(StoreError::InvalidSpec {
            spec: spec.to_string(),
            reason: "expected embedded:PATH (for example embedded:/var/lib/poolwarden/store.redb) or \
                     etcd:URL[,URL...] (for example etcd:http://10.0.0.1:2379,http://10.0.0.2:2379)"
                .into(),
        }),
    }
}

/// Where poolwarden keeps each kind of record (the same in every backend).
pub mod keys {
    use ipnet::IpNet;

    /// `pools/<name>`: an IPPool.
    pub const POOLS: &str = "pools/";
    /// `config/ipam`: the IPAMConfig.
    pub const IPAM_CONFIG: &str = "config/ipam";
    /// `blocks/<cidr>`: a block with its allocations.
    pub const BLOCKS: &str = "blocks/";
    /// `affinities/<node>/<cidr>`: a node's claim on a block.
    pub const AFFINITIES: &str = "affinities/";
    /// `room/<node>/<cidr>`: an index of the blocks affine to a node that have a free address, written in the
    /// same transaction as the block, so that finding room costs the same however many full blocks a node has.
    pub const ROOM: &str = "room/";
    /// `unowned/<cidr>`: an index of the blocks nobody owns (their node went), written with the block, so the
    /// collector finds them to give back once empty and cooled down without reading every block.
    pub const UNOWNED: &str = "unowned/";
    /// `handles/<handle>`: which blocks hold a handle's addresses.
    pub const HANDLES: &str = "handles/";
    /// `endpoints/<node>/<handle>`: what a node's agent wired for one attachment.
    pub const ENDPOINTS: &str = "endpoints/";
    /// `namespaces/<name>`: standalone namespaces.
    pub const NAMESPACES: &str = "namespaces/";
    /// `borrowed/<ip>`: an address a node's pod holds in a block affine to another node.
    pub const BORROWED: &str = "borrowed/";
    /// `nodes/<name>`: a node's registration (addresses, labels), alive while its agent is.
    pub const NODES: &str = "nodes/";
    /// `node-addresses/<name>`: where a node was last reachable, kept (no lease) while its agent is down, so
    /// the other nodes go on routing to its blocks; removed when the node is decommissioned.
    pub const NODE_ADDRESSES: &str = "node-addresses/";
    /// `decommissioned/<name>`: an operator said the node is gone for good (`poolwarden node decommission`):
    /// its addresses and blocks are collected after the leak grace period instead of `--node-gone-after`.
    pub const DECOMMISSIONED: &str = "decommissioned/";
    /// `config/migration-in-progress`: a `poolwarden datastore migrate` into this datastore has not finished
    /// (its value says from where): the IPAM state is partial, and no agent starts on it.
    pub const MIGRATION_IN_PROGRESS: &str = "config/migration-in-progress";
    /// `retired-pools/<name>`: a deleted pool's name and CIDR, so the firewall export keeps emptying its set
    /// (ignored while a pool of that name exists).
    pub const RETIRED_POOLS: &str = "retired-pools/";

    /// A CIDR as one key segment (`10.0.0.0-29`).
    pub fn cidr_segment(cidr: IpNet) -> String {
        format!("{}-{}", cidr.network(), cidr.prefix_len())
    }

    /// Parse a key segment made by [`cidr_segment`].
    pub fn parse_cidr_segment(segment: &str) -> Option<IpNet> {
        let (addr, len) = segment.rsplit_once('-')?;
        IpNet::new(addr.parse().ok()?, len.parse().ok()?).ok()
    }

    /// The key of a pool.
    pub fn pool(name: &str) -> String {
        format!("{POOLS}{name}")
    }

    /// The key of a node's last known addresses.
    pub fn node_addresses(name: &str) -> String {
        format!("{NODE_ADDRESSES}{name}")
    }

    /// The key marking a node decommissioned.
    pub fn decommissioned(name: &str) -> String {
        format!("{DECOMMISSIONED}{name}")
    }

    /// The key of a deleted pool's record.
    pub fn retired_pool(name: &str) -> String {
        format!("{RETIRED_POOLS}{name}")
    }

    /// The key of a block.
    pub fn block(cidr: IpNet) -> String {
        format!("{BLOCKS}{}", cidr_segment(cidr))
    }

    /// The prefix of a node's affinities.
    pub fn node_affinities(node: &str) -> String {
        format!("{AFFINITIES}{node}/")
    }

    /// The key of a node's affinity for a block.
    pub fn affinity(node: &str, cidr: IpNet) -> String {
        format!("{AFFINITIES}{node}/{}", cidr_segment(cidr))
    }

    /// The prefix of a node's blocks with room.
    pub fn node_room(node: &str) -> String {
        format!("{ROOM}{node}/")
    }

    /// The room index key of a node's block.
    pub fn room(node: &str, cidr: IpNet) -> String {
        format!("{ROOM}{node}/{}", cidr_segment(cidr))
    }

    /// The index key of a block nobody owns.
    pub fn unowned(cidr: IpNet) -> String {
        format!("{UNOWNED}{}", cidr_segment(cidr))
    }

    /// The key of a handle.
    pub fn handle(handle: &str) -> String {
        format!("{HANDLES}{handle}")
    }

    /// The prefix of a node's endpoints.
    pub fn node_endpoints(node: &str) -> String {
        format!("{ENDPOINTS}{node}/")
    }

    /// The key of one endpoint.
    pub fn endpoint(node: &str, handle: &str) -> String {
        format!("{ENDPOINTS}{node}/{handle}")
    }

    /// The key of a borrowed address.
    pub fn borrowed(ip: std::net::IpAddr) -> String {
        format!("{BORROWED}{ip}")
    }

    /// The key of a node's registration.
    pub fn node(name: &str) -> String {
        format!("{NODES}{name}")
    }

    /// The key of a standalone namespace.
    pub fn namespace(name: &str) -> String {
        format!("{NAMESPACES}{name}")
    }
}
