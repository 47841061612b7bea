//! One holder at a time for cluster-wide work, by a `coordination.k8s.io/v1` Lease (what kube-controller-manager
//! and client-go's leader election use). Expiry is judged by this process's own clock: a lease whose
//! `resourceVersion` has not moved for its whole duration, as seen from here, is free, so nodes' clocks need
//! not agree. Every write is a compare-and-swap on the lease's `resourceVersion`.
//!
//! Every agent of a DaemonSet competes, so what a non-holder costs is multiplied by the cluster's nodes: a
//! non-holder follows the lease by a watch (one request when the watch opens) and asks the API server nothing
//! while the holder renews; it reads the lease itself only when the watch says it went unrenewed for its
//! duration (or the watch has not listed yet). The holder renews with one update at the version it wrote last.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::{
        reflector::{ObjectRef, Store},
        watcher,
    },
};

/// A lease this process may hold.
pub struct Holder {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The lease's `resourceVersion` as last seen held by another, and when it was first seen.
    observed: Option<(String, Instant)>,
    /// The lease as the watch last saw it, under `key`.
    followed: Store<Lease>,
    key: ObjectRef<Lease>,
    /// The lease as this process last wrote it (renewed at its version without reading it first).
    written: Option<Lease>,
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

impl Holder {
    /// The lease `namespace/name`, held as `identity` for `duration` per renewal.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        let api: Api<Lease> = Api::namespaced(client, namespace);
        let (followed, watch) =
            super::reflect(api.clone(), watcher::Config::default().fields(&format!("metadata.name={name}")), "lease");
        Self {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
            observed: None,
            followed,
            key: ObjectRef::new(name).within(namespace),
            written: None,
            watch,
        }
    }

    /// Take or renew the lease: whether this process holds it now (for `duration` from the call, at most).
    /// Another writer winning the same race is not an error: the answer is `false`.
    pub async fn hold(&mut self) -> Result<bool, kube::Error> {
        let now = Some(MicroTime(Timestamp::now()));
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        // Held here: renew at the version written last, whatever a (possibly stale) watch says; a conflict means
        // another wrote it since: not held.
        if let Some(mut lease) = self.written.take() {
            if let Some(spec) = lease.spec.as_mut() {
                spec.renew_time = now;
                spec.lease_duration_seconds = Some(seconds);
            }
            return self.write(self.api.replace(&self.name, &PostParams::default(), &lease).await);
        }
        // Held by another and renewed within its duration, as the watch sees it: nothing to ask.
        if let Some(seen) = self.followed.get(&self.key) {
            let holder = seen.spec.as_ref().and_then(|s| s.holder_identity.as_deref());
            let version = seen.metadata.resource_version.clone().unwrap_or_default();
            if holder.is_some_and(|h| h != self.identity) && !self.expired(&version) {
                return Ok(false);
            }
        }
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: now.clone(),
                    renew_time: now,
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return self.write(self.api.create(&PostParams::default(), &lease).await);
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let spec = lease.spec.get_or_insert_with(Default::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !ours && spec.holder_identity.is_some() && !self.expired(&version) {
            return Ok(false);
        }
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = now.clone();
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.renew_time = now;
        spec.lease_duration_seconds = Some(seconds);
        self.observed = None;
        self.write(self.api.replace(&self.name, &PostParams::default(), &lease).await)
    }

    /// A write's outcome: held when it went through (and renewed from what it wrote next time), not held when
    /// another writer changed the lease first.
    fn write(&mut self, result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
        match result {
            Ok(lease) => {
                self.written = Some(lease);
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether another's lease at `version` has stood unrenewed for a whole duration, by this clock.
    fn expired(&mut self, version: &str) -> bool {
        match &self.observed {
            Some((seen, since)) if seen == version => since.elapsed() > self.duration,
            _ => {
                self.observed = Some((version.to_string(), Instant::now()));
                false
            }
        }
    }
}
