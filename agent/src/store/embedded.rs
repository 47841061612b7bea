//! The embedded backend: one redb file, durable commits, group commit, and watches from a change log.
//!
//! All writes go through one writer thread. It takes every transaction waiting in its queue, evaluates and
//! applies them one after another inside a single redb write transaction, and commits that once with
//! `Durability::Immediate` (an fsync): many concurrent allocations share one fsync instead of each paying for
//! its own, and a caller is answered only once its transaction is on disk. Each store transaction still gets
//! a revision of its own and sees the writes of those before it, so the batching is invisible to callers.
//!
//! Every revision's changes are also written to a change log table in the same commit, which is what lets a
//! watch start from an old revision and see every change in order. The log keeps the last
//! [`LOG_RETENTION`] revisions; older ones are compacted, as etcd does.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc as std_mpsc},
    thread,
};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{Compare, EventKind, KeyValue, Op, Revision, Store, StoreError, Txn, TxnOutcome, Watch, WatchEvent};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<i64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// How many revisions of change history are kept for watches.
pub const LOG_RETENTION: i64 = 10_000;
/// The most store transactions committed by one fsync.
const MAX_BATCH: usize = 1024;

/// The embedded datastore. Cheap to share behind an `Arc`; dropping the last handle flushes and closes it.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    writer: Option<std_mpsc::Sender<WriteRequest>>,
    writer_thread: Option<thread::JoinHandle<()>>,
}

struct Shared {
    db: Database,
    path: PathBuf,
    watchers: Mutex<Vec<Watcher>>,
}

struct Watcher {
    prefix: String,
    next_revision: Revision,
    events: mpsc::UnboundedSender<Result<WatchEvent, StoreError>>,
}

struct WriteRequest {
    txn: Txn,
    reply: oneshot::Sender<Result<TxnOutcome, StoreError>>,
}

impl EmbeddedStore {
    /// Open (or create) the store at `path`, creating its directory if needed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::backend(format!("create directory {}", dir.display()), e))?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { path: shown.clone() },
            other => StoreError::backend(format!("open {shown}"), other),
        })?;
        let init = (|| -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(KV)?;
            txn.open_table(LOG)?;
            txn.open_table(META)?;
            txn.commit()?;
            Ok(())
        })();
        init.map_err(|e| StoreError::backend(format!("initialise {shown}"), e))?;

        let shared = Arc::new(Shared { db, path: path.to_path_buf(), watchers: Mutex::new(Vec::new()) });
        let (writer, requests) = std_mpsc::channel();
        let writer_shared = Arc::clone(&shared);
        let writer_thread = thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(&writer_shared, &requests))
            .map_err(|e| StoreError::backend("start the writer thread", e))?;
        Ok(Self { shared, writer: Some(writer), writer_thread: Some(writer_thread) })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    fn scan(&self, prefix: &str, with_values: bool) -> Result<(Vec<RawEntry>, Revision), StoreError> {
        self.read("list", |txn| {
            let table = txn.open_table(KV)?;
            let mut raw = Vec::new();
            for entry in table.range(prefix..)? {
                let (k, v) = entry?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                let value = if with_values { v.value().to_vec() } else { Vec::new() };
                raw.push((k.value().to_string(), value));
            }
            let meta = txn.open_table(META)?;
            let revision = meta.get(META_REVISION)?.map(|g| g.value()).unwrap_or(0);
            Ok((raw, revision))
        })
    }

    fn read<T>(
        &self,
        operation: &str,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let txn = self.shared.db.begin_read().map_err(|e| StoreError::backend(operation, e))?;
        f(&txn).map_err(|e| StoreError::backend(operation, e))
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and exit; joining it means the file is
        // released when drop returns, so the same path can be opened again at once.
        self.writer.take();
        if let Some(handle) = self.writer_thread.take() {
            let _ = handle.join();
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let found = self.read("get", |txn| {
            let table = txn.open_table(KV)?;
            Ok(table.get(key)?.map(|v| v.value().to_vec()))
        })?;
        found.map(|raw| decode_entry(key, &raw)).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let (raw, revision) = self.scan(prefix, true)?;
        let kvs = raw.iter().map(|(k, v)| decode_entry(k, v)).collect::<Result<_, _>>()?;
        Ok((kvs, revision))
    }

    async fn list_keys(&self, prefix: &str) -> Result<(Vec<String>, Revision), StoreError> {
        let (raw, revision) = self.scan(prefix, false)?;
        Ok((raw.into_iter().map(|(k, _)| k).collect(), revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        let writer = self.writer.as_ref().ok_or(StoreError::Closed)?;
        writer.send(WriteRequest { txn, reply }).map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        // The registry lock is held across the replay so that the writer cannot publish a revision between
        // our read of the log and our registration; revisions published twice are dropped by next_revision.
        let mut watchers = self.shared.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let (current, compacted, history) = self.read("watch", |txn| {
            let meta = txn.open_table(META)?;
            let current = meta.get(META_REVISION)?.map(|g| g.value()).unwrap_or(0);
            let compacted = meta.get(META_COMPACTED)?.map(|g| g.value()).unwrap_or(0);
            let mut history = Vec::new();
            if from > 0 && from > compacted {
                let log = txn.open_table(LOG)?;
                for entry in log.range(from..=current)? {
                    let (rev, raw) = entry?;
                    history.push((rev.value(), raw.value().to_vec()));
                }
            }
            Ok((current, compacted, history))
        })?;
        if from > 0 && from <= compacted {
            return Err(StoreError::Compacted { requested: from, compacted: compacted + 1 });
        }
        for (revision, raw) in history {
            for event in decode_log(revision, &raw)? {
                if event.kv.key.starts_with(prefix) {
                    let _ = tx.send(Ok(event));
                }
            }
        }
        watchers.push(Watcher { prefix: prefix.to_string(), next_revision: current + 1, events: tx });
        Ok(Watch::from_channel(rx))
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.read("read revision", |txn| {
            let meta = txn.open_table(META)?;
            Ok(meta.get(META_REVISION)?.map(|g| g.value()).unwrap_or(0))
        })
    }
}

fn writer_loop(shared: &Shared, requests: &std_mpsc::Receiver<WriteRequest>) {
    while let Ok(first) = requests.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        match commit_batch(&shared.db, &batch) {
            Ok((outcomes, events)) => {
                publish(shared, &events);
                for (request, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = request.reply.send(Ok(outcome));
                }
            }
            Err(err) => {
                let message = err.to_string();
                for request in batch {
                    let _ = request.reply.send(Err(StoreError::backend("commit", &message)));
                }
            }
        }
    }
}

/// A key and its encoded entry, as scanned from the table.
type RawEntry = (String, Vec<u8>);

type Published = Vec<(Revision, Vec<WatchEvent>)>;

fn commit_batch(db: &Database, batch: &[WriteRequest]) -> Result<(Vec<TxnOutcome>, Published), redb::Error> {
    let write = db.begin_write()?;
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut published = Vec::new();
    {
        let mut kv = write.open_table(KV)?;
        let mut log = write.open_table(LOG)?;
        let mut meta = write.open_table(META)?;
        let mut revision = meta.get(META_REVISION)?.map(|g| g.value()).unwrap_or(0);
        let compacted = meta.get(META_COMPACTED)?.map(|g| g.value()).unwrap_or(0);

        for request in batch {
            if let Some(key) = first_failed_compare(&kv, &request.txn.compares)? {
                outcomes.push(TxnOutcome::Conflict { key });
                continue;
            }
            revision += 1;
            let mut events = Vec::with_capacity(request.txn.ops.len());
            for op in &request.txn.ops {
                match op {
                    Op::Put { key, value } => {
                        let create_revision = match kv.get(key.as_str())? {
                            Some(old) => header(old.value()).0,
                            None => revision,
                        };
                        kv.insert(key.as_str(), encode_entry(create_revision, revision, value).as_slice())?;
                        events.push(WatchEvent {
                            kind: EventKind::Put,
                            kv: KeyValue {
                                key: key.clone(),
                                value: value.clone(),
                                create_revision,
                                mod_revision: revision,
                            },
                        });
                    }
                    Op::Delete { key } => {
                        let removed = kv.remove(key.as_str())?.map(|old| header(old.value()).0);
                        if let Some(create_revision) = removed {
                            events.push(WatchEvent {
                                kind: EventKind::Delete,
                                kv: KeyValue {
                                    key: key.clone(),
                                    value: Vec::new(),
                                    create_revision,
                                    mod_revision: revision,
                                },
                            });
                        }
                    }
                }
            }
            log.insert(revision, encode_log(&events).as_slice())?;
            published.push((revision, events));
            outcomes.push(TxnOutcome::Committed(revision));
        }

        meta.insert(META_REVISION, revision)?;
        let floor = revision - LOG_RETENTION;
        if floor > compacted + 1024 {
            // Compact in steps so that no single commit carries a large deletion.
            let upto = compacted + 1024;
            log.retain_in(..=upto, |_, _| false)?;
            meta.insert(META_COMPACTED, upto)?;
        }
    }
    write.commit()?;
    Ok((outcomes, published))
}

fn first_failed_compare(
    kv: &impl ReadableTable<&'static str, &'static [u8]>,
    compares: &[Compare],
) -> Result<Option<String>, redb::Error> {
    for compare in compares {
        let current = kv.get(compare.key())?.map(|v| header(v.value()).1);
        let holds = match compare {
            Compare::Absent(_) => current.is_none(),
            Compare::ModRevision(_, expected) => current == Some(*expected),
        };
        if !holds {
            return Ok(Some(compare.key().to_string()));
        }
    }
    Ok(None)
}

fn publish(shared: &Shared, published: &Published) {
    let mut watchers = shared.watchers.lock().unwrap_or_else(|p| p.into_inner());
    watchers.retain_mut(|watcher| {
        for (revision, events) in published {
            if *revision < watcher.next_revision {
                continue;
            }
            for event in events.iter().filter(|e| e.kv.key.starts_with(&watcher.prefix)) {
                if watcher.events.send(Ok(event.clone())).is_err() {
                    return false;
                }
            }
            watcher.next_revision = revision + 1;
        }
        !watcher.events.is_closed()
    });
}

const HEADER: usize = 16;

fn encode_entry(create_revision: Revision, mod_revision: Revision, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + value.len());
    out.extend_from_slice(&create_revision.to_le_bytes());
    out.extend_from_slice(&mod_revision.to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn header(raw: &[u8]) -> (Revision, Revision) {
    let mut create = [0u8; 8];
    let mut modified = [0u8; 8];
    if raw.len() >= HEADER {
        create.copy_from_slice(&raw[..8]);
        modified.copy_from_slice(&raw[8..16]);
    }
    (i64::from_le_bytes(create), i64::from_le_bytes(modified))
}

fn decode_entry(key: &str, raw: &[u8]) -> Result<KeyValue, StoreError> {
    if raw.len() < HEADER {
        return Err(StoreError::Corrupt {
            key: key.to_string(),
            message: format!("entry of {} bytes has no header", raw.len()),
        });
    }
    let (create_revision, mod_revision) = header(raw);
    Ok(KeyValue { key: key.to_string(), value: raw[HEADER..].to_vec(), create_revision, mod_revision })
}

// Log record: for each event, kind (1 byte), create revision (8), key length (4), key, value length (4), value.
fn encode_log(events: &[WatchEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    for event in events {
        out.push(match event.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        out.extend_from_slice(&event.kv.create_revision.to_le_bytes());
        for part in [event.kv.key.as_bytes(), event.kv.value.as_slice()] {
            out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_le_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}

fn decode_log(revision: Revision, raw: &[u8]) -> Result<Vec<WatchEvent>, StoreError> {
    let corrupt = || StoreError::Corrupt { key: format!("log/{revision}"), message: "truncated change record".into() };
    let mut events = Vec::new();
    let mut rest = raw;
    let take = |n: usize, rest: &mut &[u8]| -> Result<Vec<u8>, StoreError> {
        if rest.len() < n {
            return Err(corrupt());
        }
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Ok(head.to_vec())
    };
    while !rest.is_empty() {
        let kind = match take(1, &mut rest)?[0] {
            0 => EventKind::Put,
            _ => EventKind::Delete,
        };
        let create_revision = i64::from_le_bytes(take(8, &mut rest)?.try_into().map_err(|_| corrupt())?);
        let key_len = u32::from_le_bytes(take(4, &mut rest)?.try_into().map_err(|_| corrupt())?) as usize;
        let key = String::from_utf8(take(key_len, &mut rest)?).map_err(|_| corrupt())?;
        let value_len = u32::from_le_bytes(take(4, &mut rest)?.try_into().map_err(|_| corrupt())?) as usize;
        let value = take(value_len, &mut rest)?;
        events.push(WatchEvent { kind, kv: KeyValue { key, value, create_revision, mod_revision: revision } });
    }
    Ok(events)
}
