//! The etcd backend: the [`Store`] contract mapped onto etcd's v3 API, for clusters of nodes sharing one
//! datastore.
//!
//! Every poolwarden key lives under one prefix (`/poolwarden/` by default), so the etcd cluster can be shared
//! with other users. Revisions are etcd's own. A transaction becomes one etcd `Txn`: `Compare::Absent` is
//! `create_revision == 0`, `Compare::ModRevision` is `mod_revision == rev`; its failure branch reads back the
//! compared keys so a conflict names the first comparison that did not hold, as the embedded backend does.
//!
//! Failures of the cluster (a member stopped, a leader election, a connection reset) are retried with backoff
//! for a bounded time and never turn into a wrong answer: a transaction whose first attempt may or may not
//! have been applied is retried, and if the retry conflicts the store checks whether its writes are already
//! there (every write is compare-and-swap, so an applied transaction cannot be applied twice). Watches
//! reconnect by themselves and resume after the last revision they delivered.

use std::{
    collections::BTreeMap,
    future::Future,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, PutOptions, TlsOptions, Txn as EtcdTxn, TxnOp, TxnOpResponse, WatchOptions, WatchResponse, WatchStream,
};
use tokio::sync::mpsc;

use super::{Compare, EventKind, KeyValue, Op, Revision, Store, StoreError, Txn, TxnOutcome, Watch, WatchEvent};

/// The prefix every poolwarden key gets in etcd unless told otherwise.
pub const DEFAULT_PREFIX: &str = "/poolwarden/";

/// How long one request may take before it is abandoned and retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an operation keeps retrying through cluster failures before it reports them.
const RETRY_BUDGET: Duration = Duration::from_secs(30);
/// Keys per page when listing, so a large listing never exceeds a gRPC message.
const PAGE: i64 = 500;

/// How to reach and authenticate to an etcd cluster.
#[derive(Clone, Debug, Default)]
pub struct EtcdConfig {
    /// Client URLs, `http://host:port` or `https://host:port`.
    pub endpoints: Vec<String>,
    /// The CA that signed the members' certificates (TLS).
    pub ca: Option<PathBuf>,
    /// This client's certificate (mutual TLS), with `key`.
    pub cert: Option<PathBuf>,
    /// This client's private key (mutual TLS), with `cert`.
    pub key: Option<PathBuf>,
    /// Where under etcd's key space poolwarden keeps its keys; ends with `/`.
    pub prefix: String,
}

impl EtcdConfig {
    /// The configuration for `spec` (`etcd:URL[,URL...]`, as typed after `--datastore`) with the default prefix.
    pub fn from_spec(spec: &str) -> Result<Self, StoreError> {
        let invalid = |reason: String| StoreError::InvalidSpec { spec: spec.to_string(), reason };
        let list = spec.strip_prefix("etcd:").ok_or_else(|| invalid("expected etcd:URL[,URL...]".into()))?;
        let endpoints: Vec<String> = list.split(',').map(str::trim).map(str::to_string).collect();
        for endpoint in &endpoints {
            let rest = endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty()) {
                return Err(invalid(format!(
                    "endpoint {endpoint:?} is not a URL; expected etcd:http://host:port[,http://host:port...]"
                )));
            }
        }
        Ok(Self { endpoints, prefix: DEFAULT_PREFIX.to_string(), ..Self::default() })
    }
}

/// A [`Store`] on an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    markers: Arc<Markers>,
}

/// Every conditional transaction also writes a marker key of its own, outside the store's prefix, so that a
/// transaction whose answer was lost can tell, when its retry conflicts, whether the first attempt was
/// applied: the marker exists exactly when it was. Markers of settled transactions are deleted by later
/// ones.
struct Markers {
    /// `<prefix without its slash>.txn/<random id of this client>/`.
    base: String,
    next: AtomicU64,
    settled: std::sync::Mutex<Vec<String>>,
}

/// How many settled markers one transaction deletes at most.
const MARKERS_PER_TXN: usize = 16;

impl EtcdStore {
    /// Connect to the cluster described by `config`. Fails when no member answers within the retry budget.
    pub async fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        let spec = format!("etcd:{}", config.endpoints.join(","));
        let invalid = |reason: String| StoreError::InvalidSpec { spec: spec.clone(), reason };
        if !config.prefix.ends_with('/') {
            return Err(invalid(format!("the key prefix {:?} must end with /", config.prefix)));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            // A member cut off from the quorum answers nothing rather than something stale.
            .with_require_leader(true);
        let tls = config.ca.is_some() || config.cert.is_some() || config.key.is_some();
        if tls {
            let read = |path: &PathBuf, what: &str| {
                std::fs::read(path).map_err(|e| invalid(format!("cannot read the etcd {what} {}: {e}", path.display())))
            };
            let mut tls_options = TlsOptions::new();
            if let Some(ca) = &config.ca {
                tls_options = tls_options.ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?));
            }
            match (&config.cert, &config.key) {
                (Some(cert), Some(key)) => {
                    tls_options = tls_options
                        .identity(Identity::from_pem(read(cert, "client certificate")?, read(key, "client key")?));
                }
                (None, None) => {}
                _ => return Err(invalid("--etcd-cert and --etcd-key must be given together".into())),
            }
            options = options.with_tls(tls_options);
        }
        if tls && config.endpoints.iter().any(|e| e.starts_with("http://")) {
            return Err(invalid("TLS options were given but an endpoint uses http://; use https://".into()));
        }
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|e| StoreError::backend(format!("connect to {spec}"), e))?;
        let id = {
            use std::hash::{BuildHasher, Hasher};
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u32(std::process::id());
            hasher.write_u128(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
            );
            hasher.finish()
        };
        let markers = Markers {
            base: format!("{}.txn/{id:016x}/", config.prefix.trim_end_matches('/')),
            next: AtomicU64::new(1),
            settled: std::sync::Mutex::new(Vec::new()),
        };
        let store = Self { client, prefix: config.prefix.clone(), markers: Arc::new(markers) };
        // Fail now, with the endpoints named, rather than at the first request.
        store.revision().await.map_err(|e| StoreError::backend(format!("connect to {spec}"), e))?;
        Ok(store)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        let key = kv.key_str().map_err(|e| StoreError::backend("decode key", e))?;
        let key = key.strip_prefix(&self.prefix).unwrap_or(key).to_string();
        Ok(KeyValue {
            key,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        })
    }

    /// Run `call` until it succeeds, fails for good, or the retry budget is spent.
    async fn retrying<T, F, Fut>(&self, operation: &str, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            let failure = match tokio::time::timeout(REQUEST_TIMEOUT, call(self.client.clone())).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(err)) if !transient(&err) => return Err(StoreError::backend(operation, err)),
                Ok(Err(err)) => err.to_string(),
                Err(_) => format!("no answer within {REQUEST_TIMEOUT:?}"),
            };
            if started.elapsed() + backoff > RETRY_BUDGET {
                return Err(StoreError::backend(
                    operation,
                    format!("the etcd cluster did not answer for {RETRY_BUDGET:?}; last error: {failure}"),
                ));
            }
            tracing::debug!(operation, error = %failure, "etcd request failed, retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One page-wise listing at a single revision.
    async fn range(&self, prefix: &str, keys_only: bool) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let full = self.full(prefix);
        let end = prefix_end(full.as_bytes());
        let mut start = full.clone().into_bytes();
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE).with_revision(revision);
            if keys_only {
                options = options.with_keys_only();
            }
            let key = start.clone();
            let response = self
                .retrying(&format!("list {prefix}"), |mut client| {
                    let (key, options) = (key.clone(), options.clone());
                    async move { client.get(key, Some(options)).await }
                })
                .await?;
            if revision == 0 {
                revision = response.header().map_or(0, |h| h.revision());
            }
            for kv in response.kvs() {
                out.push(self.kv(kv)?);
            }
            match (response.more(), response.kvs().last()) {
                (true, Some(last)) => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok((out, revision)),
            }
        }
    }

    /// What a transaction's answer means: committed, or the first comparison that did not hold.
    async fn outcome(
        &self,
        txn: &Txn,
        response: &etcd_client::TxnResponse,
        attempts: u32,
        marker: Option<&str>,
    ) -> Result<TxnOutcome, StoreError> {
        if response.succeeded() {
            return Ok(TxnOutcome::Committed(response.header().map_or(0, |h| h.revision())));
        }
        if attempts > 1
            && let Some(marker) = marker
            && let Some(applied) = self.raw_get(marker).await?
        {
            // An earlier attempt committed but its answer was lost; this one conflicted with it.
            return Ok(TxnOutcome::Committed(applied.mod_revision()));
        }
        let reads = response.op_responses();
        for (compare, read) in txn.compares.iter().zip(reads) {
            let TxnOpResponse::Get(read) = read else { continue };
            let found = read.kvs().first();
            let holds = match compare {
                Compare::Absent(_) => found.is_none(),
                Compare::ModRevision(_, rev) => found.is_some_and(|kv| kv.mod_revision() == *rev),
            };
            if !holds {
                return Ok(TxnOutcome::Conflict { key: compare.key().to_string() });
            }
        }
        // Every comparison holds now, so one changed and changed back between the commit and the read.
        let key = txn.compares.first().map(|c| c.key().to_string()).unwrap_or_default();
        Ok(TxnOutcome::Conflict { key })
    }

    /// One key by its full name (outside the prefix too).
    async fn raw_get(&self, full: &str) -> Result<Option<etcd_client::KeyValue>, StoreError> {
        let response = self
            .retrying(&format!("get {full}"), |mut client| {
                let full = full.to_string();
                async move { client.get(full, None).await }
            })
            .await?;
        Ok(response.kvs().first().cloned())
    }

    /// Whether history from `from` on is gone, and if so the first revision still kept.
    async fn compacted_before(&self, full: &str, from: Revision) -> Result<Option<Revision>, StoreError> {
        let probe = self
            .client
            .clone()
            .get(full.to_string(), Some(GetOptions::new().with_count_only().with_revision(from)))
            .await;
        match probe {
            Err(etcd_client::Error::GRpcStatus(status)) if status.message().contains("compacted") => {
                // The watch's cancellation names the revision compacted to.
                let mut stream = self.open_watch(full, from).await?;
                for _ in 0..2 {
                    match tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await {
                        Ok(Ok(Some(m))) if m.compact_revision() > 0 => return Ok(Some(m.compact_revision())),
                        Ok(Ok(Some(_))) => continue,
                        _ => break,
                    }
                }
                Ok(Some(from + 1))
            }
            _ => Ok(None),
        }
    }

    async fn open_watch(&self, full: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        self.retrying(&format!("watch {full}"), |client| {
            let (full, options) = (full.to_string(), options.clone());
            async move { client.watch_client().watch(full, Some(options)).await }
        })
        .await
    }

    /// Forward `stream` to `events` until the receiver goes away; reconnect from the next revision on failure.
    /// History compacted while disconnected ends the watch with [`StoreError::Compacted`]: the watcher must
    /// list again.
    async fn pump(self, full: String, mut next: Revision, mut stream: WatchStream, events: WatchSender) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                () = events.closed() => return,
            };
            match message {
                Ok(Some(response)) => {
                    backoff = Duration::from_millis(50);
                    match self.deliver(&response, &events, next) {
                        Delivered::Upto(Some(revision)) => next = revision + 1,
                        Delivered::Upto(None) => {}
                        Delivered::Stop => return,
                    }
                    if response.canceled() && response.compact_revision() == 0 {
                        // Cancelled by the server (no leader, say): open it again from where we are.
                        tracing::debug!(prefix = %full, reason = response.cancel_reason(), "etcd watch cancelled");
                    } else {
                        continue;
                    }
                }
                Ok(None) => tracing::debug!(prefix = %full, "etcd watch stream ended"),
                Err(err) => tracing::debug!(prefix = %full, error = %err, "etcd watch failed"),
            }
            loop {
                if events.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                match self.open_watch(&full, next).await {
                    Ok(reopened) => {
                        stream = reopened;
                        break;
                    }
                    Err(err) => tracing::warn!(prefix = %full, error = %err, "cannot reopen the etcd watch yet"),
                }
            }
        }
    }

    fn deliver(&self, response: &WatchResponse, events: &WatchSender, next: Revision) -> Delivered {
        if response.canceled() && response.compact_revision() > 0 {
            let _ = events.send(Err(StoreError::Compacted { requested: next, compacted: response.compact_revision() }));
            return Delivered::Stop;
        }
        let mut last = None;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let mut kv = match self.kv(kv) {
                Ok(kv) => kv,
                Err(err) => {
                    let _ = events.send(Err(err));
                    return Delivered::Stop;
                }
            };
            let kind = match event.event_type() {
                EventType::Put => EventKind::Put,
                EventType::Delete => {
                    kv.value.clear();
                    EventKind::Delete
                }
            };
            last = Some(kv.mod_revision);
            if events.send(Ok(WatchEvent { kind, kv })).is_err() {
                return Delivered::Stop;
            }
        }
        Delivered::Upto(last)
    }
}

type WatchSender = mpsc::UnboundedSender<Result<WatchEvent, StoreError>>;

enum Delivered {
    /// Every event up to this revision went out.
    Upto(Option<Revision>),
    /// The watch is over (receiver gone, or history compacted).
    Stop,
}

/// Whether an etcd failure is the cluster being briefly unavailable (retry) rather than a refusal (report).
/// A TLS refusal (a certificate the other side rejects) arrives as a transport error too, but no retry mends
/// it: it is reported at once.
fn transient(err: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    let detail = format!("{err:?}").to_ascii_lowercase();
    if ["certificate", "fatal alert", "handshake"].iter().any(|word| detail.contains(word)) {
        return false;
    }
    match err {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => true,
        E::GRpcStatus(status) => {
            use tonic::Code;
            let message = status.message();
            matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled)
                || message.contains("leader changed")
                || message.contains("no leader")
                || message.contains("request timed out")
                || message.contains("too many requests")
                || message.contains("transport")
        }
        _ => false,
    }
}

/// The smallest key greater than every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The operations of `txn` with one write per key (etcd refuses a key written twice in one transaction); the
/// last write of a key is the one that counts, as it would be applied in order.
fn last_write_per_key(ops: &[Op]) -> Vec<&Op> {
    let mut last: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, op) in ops.iter().enumerate() {
        let key = match op {
            Op::Put { key, .. } | Op::Delete { key } => key.as_str(),
        };
        last.insert(key, i);
    }
    let mut keep: Vec<usize> = last.into_values().collect();
    keep.sort_unstable();
    keep.into_iter().map(|i| &ops[i]).collect()
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.raw_get(&self.full(key)).await?.map(|kv| self.kv(&kv)).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.range(prefix, false).await
    }

    async fn list_keys(&self, prefix: &str) -> Result<(Vec<String>, Revision), StoreError> {
        let (kvs, revision) = self.range(prefix, true).await?;
        Ok((kvs.into_iter().map(|kv| kv.key).collect(), revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::Absent(key) => EtcdCompare::create_revision(self.full(key), CompareOp::Equal, 0),
                Compare::ModRevision(key, rev) => EtcdCompare::mod_revision(self.full(key), CompareOp::Equal, *rev),
            })
            .collect();
        let mut ops: Vec<TxnOp> = last_write_per_key(&txn.ops)
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(self.full(key), value.clone(), None::<PutOptions>),
                Op::Delete { key } => TxnOp::delete(self.full(key), None::<DeleteOptions>),
            })
            .collect();
        let marker = (!txn.compares.is_empty())
            .then(|| format!("{}{}", self.markers.base, self.markers.next.fetch_add(1, Ordering::Relaxed)));
        let cleared: Vec<String> = {
            let mut settled = self.markers.settled.lock().unwrap_or_else(|p| p.into_inner());
            let keep = settled.len().saturating_sub(MARKERS_PER_TXN);
            settled.split_off(keep)
        };
        if let Some(marker) = &marker {
            ops.push(TxnOp::put(marker.clone(), Vec::new(), None::<PutOptions>));
        }
        ops.extend(cleared.iter().map(|m| TxnOp::delete(m.clone(), None::<DeleteOptions>)));
        // On failure, read the compared keys back to name the first comparison that did not hold.
        let reads: Vec<TxnOp> = txn
            .compares
            .iter()
            .map(|c| TxnOp::get(self.full(c.key()), Some(GetOptions::new().with_keys_only())))
            .collect();
        let request = EtcdTxn::new().when(compares).and_then(ops).or_else(reads);
        let mut attempts = 0u32;
        let response = self
            .retrying("commit", |mut client| {
                attempts += 1;
                let request = request.clone();
                async move { client.txn(request).await }
            })
            .await;
        if !response.as_ref().is_ok_and(|r| r.succeeded()) {
            // Not deleted by this transaction: a later one tries again.
            self.markers.settled.lock().unwrap_or_else(|p| p.into_inner()).extend(cleared);
        }
        let outcome = match response {
            Ok(response) => self.outcome(&txn, &response, attempts, marker.as_deref()).await,
            Err(err) => Err(err),
        };
        // This transaction's own marker is settled now (applied or not, its answer is in): a later one
        // deletes it.
        self.markers.settled.lock().unwrap_or_else(|p| p.into_inner()).extend(marker);
        outcome
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        let full = self.full(prefix);
        // "Only future changes" is pinned to a revision now, so a reconnect cannot skip or repeat anything.
        let start = if from > 0 { from } else { self.revision().await? + 1 };
        if from > 0
            && let Some(compacted) = self.compacted_before(&full, from).await?
        {
            return Err(StoreError::Compacted { requested: from, compacted });
        }
        let mut stream = self.open_watch(&full, start).await?;
        // The first answer says whether the watch exists or the history it asks for is gone.
        let first = tokio::time::timeout(REQUEST_TIMEOUT, stream.message())
            .await
            .map_err(|_| StoreError::backend(format!("watch {prefix}"), "no answer from etcd"))?
            .map_err(|e| StoreError::backend(format!("watch {prefix}"), e))?
            .ok_or_else(|| StoreError::backend(format!("watch {prefix}"), "etcd closed the watch"))?;
        if first.canceled() && first.compact_revision() > 0 {
            return Err(StoreError::Compacted { requested: from, compacted: first.compact_revision() });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut next = start;
        match self.deliver(&first, &tx, start) {
            Delivered::Upto(Some(revision)) => next = revision + 1,
            Delivered::Upto(None) | Delivered::Stop => {}
        }
        tokio::spawn(self.clone().pump(full, next, stream, tx));
        Ok(Watch::from_channel(rx))
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        let key = self.prefix.clone();
        let response = self
            .retrying("read revision", |mut client| {
                let key = key.clone();
                async move { client.get(key, Some(GetOptions::new().with_count_only())).await }
            })
            .await?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    async fn put_leased(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), StoreError> {
        let lease = self.lease_and_put(key, &value, ttl).await?;
        tokio::spawn(self.clone().keep_leased(key.to_string(), value, ttl, lease));
        Ok(())
    }
}

impl EtcdStore {
    /// Grant a lease of `ttl` and put `key` under it; returns the lease.
    async fn lease_and_put(&self, key: &str, value: &[u8], ttl: Duration) -> Result<i64, StoreError> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted = self
            .retrying(&format!("grant a lease for {key}"), |mut client| async move {
                client.lease_grant(seconds, None).await
            })
            .await?;
        let lease = granted.id();
        let full = self.full(key);
        self.retrying(&format!("put {key}"), |mut client| {
            let (full, value) = (full.clone(), value.to_vec());
            async move { client.put(full, value, Some(PutOptions::new().with_lease(lease))).await }
        })
        .await?;
        Ok(lease)
    }

    /// Renew the lease a third of its time before it runs out, forever; when it was lost (the cluster was
    /// unreachable for longer than `ttl`), take a new one and write the key again.
    async fn keep_leased(self, key: String, value: Vec<u8>, ttl: Duration, mut lease: i64) {
        let period = ttl / 3;
        loop {
            let renewed = async {
                let (mut keeper, mut answers) = self.client.clone().lease_keep_alive(lease).await?;
                loop {
                    keeper.keep_alive().await?;
                    match answers.message().await? {
                        Some(answer) if answer.ttl() > 0 => tokio::time::sleep(period).await,
                        _ => return Ok::<(), etcd_client::Error>(()),
                    }
                }
            };
            match renewed.await {
                Ok(()) => tracing::warn!(%key, "the registration's lease expired; registering again"),
                Err(err) => tracing::warn!(%key, error = %err, "renewing the registration's lease failed"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            match self.lease_and_put(&key, &value, ttl).await {
                Ok(new) => lease = new,
                Err(err) => tracing::warn!(%key, error = %err, "registering again failed; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/poolwarden/"), b"/poolwarden0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn spec_lists_endpoints_and_refuses_what_is_not_a_url() {
        let config = EtcdConfig::from_spec("etcd:http://127.0.0.1:2379, http://127.0.0.2:2379").unwrap();
        assert_eq!(config.endpoints, ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]);
        assert_eq!(config.prefix, DEFAULT_PREFIX);
        let err = EtcdConfig::from_spec("etcd:127.0.0.1:2379").unwrap_err().to_string();
        assert!(err.contains("\"127.0.0.1:2379\" is not a URL"), "{err}");
        assert!(EtcdConfig::from_spec("etcd:").is_err());
    }

    #[test]
    fn a_key_written_twice_keeps_its_last_write_in_place() {
        let put = |k: &str, v: &str| Op::Put { key: k.into(), value: v.as_bytes().to_vec() };
        let ops = vec![put("a", "1"), put("b", "1"), Op::Delete { key: "a".into() }, put("c", "1")];
        let kept = last_write_per_key(&ops);
        assert_eq!(kept, vec![&ops[1], &ops[2], &ops[3]]);
    }
}
