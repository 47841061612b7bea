//! A node's view of its blocks: the design's derived index (invariant 4). Two label-selected watches, the
//! blocks affine to the node and the blocks it borrowed from, each listed once and then followed, so an ADD
//! or DEL reads nothing from the store: it writes one block at the version the view holds. A view can be
//! behind (an event not yet arrived) or ahead of an event still on its way (this process's own writes are put
//! in at once); either way a write at a stale version is refused by the store, and the writer reads that one
//! block again and retries. What a view must never do is miss a block that holds a handle being released, so
//! it keeps its own writes until an event at least as recent confirms them, and a release that finds nothing
//! in the view reads the store before it says so.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tracing::warn;

use super::{Stored, decode};
use crate::objects::{Kind, Labels, Object, ObjectError, ObjectEvent, ObjectStore, selects};

/// The blocks one selector selects, kept current by a watch.
struct Followed {
    selector: Labels,
    blocks: Mutex<BTreeMap<String, Held>>,
    ready: watch::Sender<bool>,
}

/// A block as the view holds it.
#[derive(Clone)]
struct Held {
    stored: Stored,
    /// Put in by this process's own write, and no event since has shown that version or a later one.
    local: bool,
}

/// Whether version `a` is later than `b`. Both backends' versions are numbers that grow with every write
/// (etcd revisions; the API server's `resourceVersion` is its etcd revision); anything else counts as later,
/// which only costs a refused write and a read.
fn later(a: &str, b: &str) -> bool {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(a), Ok(b)) => a > b,
        _ => true,
    }
}

/// How long an ADD or DEL waits for a view's first list before it fails (kubelet retries it).
const FIRST_LIST: Duration = Duration::from_secs(30);

impl Followed {
    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Held>> {
        self.blocks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Put in (or take out, when no longer selected) what a write or read of this process (`local`) or an
    /// event says the object now is, unless the view already holds a later version. The view never takes a
    /// block back to an older state because an older event arrived late: a release must find every block
    /// holding its handle.
    fn apply(&self, object: &Object, local: bool) {
        let mut held = self.held();
        if let Some(h) = held.get(&object.name) {
            if h.stored.version == object.version {
                // The same state again (a write's reply after its own event, or the reverse): an event
                // confirms it, a reply changes nothing.
                if !local && let Some(h) = held.get_mut(&object.name) {
                    h.local = false;
                }
                return;
            }
            if !later(&object.version, &h.stored.version) {
                return;
            }
        }
        if !selects(&self.selector, &object.labels) {
            held.remove(&object.name);
            return;
        }
        match decode(object) {
            Ok(stored) => {
                held.insert(object.name.clone(), Held { stored, local });
            }
            Err(e) => warn!(error = %e, "ignoring a block object that does not decode"),
        }
    }

    /// The object left (deleted, or no longer selected) at `version`: dropped unless the view holds a later
    /// version of it (re-created, or selected again, since).
    fn gone(&self, name: &str, version: &str) {
        let mut held = self.held();
        if held.get(name).is_some_and(|h| !later(&h.stored.version, version)) {
            held.remove(name);
        }
    }

    /// A list's result (at `version`) replaces what is held, except this process's writes made after it.
    fn listed(&self, listed: &[Object], version: &str) {
        let mut fresh: BTreeMap<String, Held> = listed
            .iter()
            .filter_map(|o| decode(o).ok().map(|stored| (o.name.clone(), Held { stored, local: false })))
            .collect();
        let mut held = self.held();
        for (name, h) in held.iter().filter(|(_, h)| h.local && later(&h.stored.version, version)) {
            if fresh.get(name).is_none_or(|f| later(&h.stored.version, &f.stored.version)) {
                fresh.insert(name.clone(), h.clone());
            }
        }
        *held = fresh;
    }
}

/// A node's blocks as its two watches see them.
pub struct NodeView {
    followed: [Arc<Followed>; 2],
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for NodeView {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl NodeView {
    /// Start following the blocks `owned` and `borrowed` select.
    pub fn start(objects: &Arc<dyn ObjectStore>, owned: Labels, borrowed: Labels) -> Self {
        let followed = [owned, borrowed]
            .map(|selector| Arc::new(Followed { selector, blocks: Mutex::default(), ready: watch::channel(false).0 }));
        let tasks = followed.iter().map(|f| tokio::spawn(follow(Arc::clone(objects), Arc::clone(f)))).collect();
        Self { followed, tasks }
    }

    /// The owned and the borrowed-from blocks, once both have been listed (an error if that takes more than
    /// 30 s: the store is unreachable, or this agent may not list blocks).
    pub async fn blocks(&self) -> Result<(Vec<Stored>, Vec<Stored>), ObjectError> {
        for followed in &self.followed {
            let mut ready = followed.ready.subscribe();
            if tokio::time::timeout(FIRST_LIST, ready.wait_for(|listed| *listed)).await.is_err() {
                return Err(ObjectError::Api(format!(
                    "the blocks labelled {:?} could not be listed for {}s (see the agent's log)",
                    followed.selector,
                    FIRST_LIST.as_secs()
                )));
            }
        }
        let [owned, borrowed] = &self.followed;
        let owned = owned.held().values().map(|h| h.stored.clone()).collect();
        let borrowed = borrowed.held().values().map(|h| h.stored.clone()).collect();
        Ok((owned, borrowed))
    }

    /// What a write of this process made the object (or a read of it found).
    pub fn written(&self, object: &Object) {
        for followed in &self.followed {
            followed.apply(object, true);
        }
    }

    /// This process deleted the object `name` at `version` (or a read found it gone after `version`).
    pub fn deleted(&self, name: &str, version: &str) {
        for followed in &self.followed {
            followed.gone(name, version);
        }
    }
}

/// List, then follow from the list's version. A watch that ran its course (the API server ends each after a
/// few minutes) is opened again from the last version it delivered, without listing; a watch that fails or
/// whose version is no longer kept lists again, after a pause that grows while lists or watches keep failing
/// or ending early (an API server on its bad day is not hammered by every node's two watches).
async fn follow(objects: Arc<dyn ObjectStore>, followed: Arc<Followed>) {
    let mut pause = Duration::from_millis(100);
    // The version to watch from without listing: the list's, then each event's or bookmark's (a quiet node's
    // last change may be older than the API server keeps by the time its watch ends).
    let mut resume: Option<String> = None;
    loop {
        let started = tokio::time::Instant::now();
        let mut ran_its_course = false;
        let from = match resume.take() {
            Some(version) => Some(version),
            None => match objects.list(Kind::Block, &followed.selector).await {
                Ok((listed, version)) => {
                    followed.listed(&listed, &version);
                    followed.ready.send_replace(true);
                    Some(version)
                }
                Err(e) => {
                    warn!(error = %e, "cannot list blocks; retrying");
                    None
                }
            },
        };
        if let Some(mut version) = from {
            match objects.watch(Kind::Block, &followed.selector, &version).await {
                Ok(mut events) => {
                    ran_its_course = true;
                    while let Some(event) = events.next().await {
                        match event {
                            Ok(ObjectEvent::Applied(object)) => {
                                followed.apply(&object, false);
                                version.clone_from(&object.version);
                            }
                            Ok(ObjectEvent::Deleted { name, version: at }) => {
                                followed.gone(&name, &at);
                                version = at;
                            }
                            Ok(ObjectEvent::Progress(at)) => version = at,
                            Err(e) => {
                                if !matches!(e, ObjectError::Expired(_)) {
                                    warn!(error = %e, "block watch ended; listing again");
                                }
                                ran_its_course = false;
                                break;
                            }
                        }
                    }
                    if ran_its_course {
                        resume = Some(version);
                    }
                }
                Err(ObjectError::Expired(_)) => {}
                Err(e) => warn!(error = %e, "cannot watch blocks; listing again"),
            }
        }
        // A watch that ran its course is opened again at once.
        if ran_its_course && started.elapsed() >= Duration::from_secs(5) {
            pause = Duration::from_millis(100);
            continue;
        }
        // Ended early: from the list next time.
        resume = None;
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{allocator::single::labels_of, ipam::Block};

    fn followed() -> Followed {
        let selector = Labels::from([(super::super::AFFINITY_LABEL.to_string(), "a".to_string())]);
        Followed { selector, blocks: Mutex::default(), ready: watch::channel(false).0 }
    }

    fn at(version: u64, node: &str) -> Object {
        let block = Block::new("10.0.0.0/30".parse().unwrap(), "p", node, 0);
        Object {
            name: "10-0-0-0-30".into(),
            labels: labels_of(&block),
            spec: serde_json::to_value(&block).unwrap(),
            version: version.to_string(),
        }
    }

    fn version(f: &Followed) -> Option<String> {
        f.held().get("10-0-0-0-30").map(|h| h.stored.version.clone())
    }

    /// The embedded store's objects, with every watch ended by the store after `LIFETIME` (as the API server
    /// ends each after its timeout), counting lists and watches.
    struct Ending {
        inner: Arc<dyn ObjectStore>,
        lists: std::sync::atomic::AtomicUsize,
        watches: std::sync::atomic::AtomicUsize,
    }

    const LIFETIME: Duration = Duration::from_millis(5500);

    #[async_trait::async_trait]
    impl ObjectStore for Ending {
        async fn get(&self, kind: Kind, name: &str) -> Result<Option<Object>, ObjectError> {
            self.inner.get(kind, name).await
        }

        async fn list(&self, kind: Kind, selector: &Labels) -> Result<(Vec<Object>, String), ObjectError> {
            self.lists.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.list(kind, selector).await
        }

        async fn create(
            &self,
            kind: Kind,
            name: &str,
            labels: Labels,
            spec: serde_json::Value,
        ) -> Result<Object, ObjectError> {
            self.inner.create(kind, name, labels, spec).await
        }

        async fn update(&self, kind: Kind, object: &Object) -> Result<Object, ObjectError> {
            self.inner.update(kind, object).await
        }

        async fn delete(&self, kind: Kind, name: &str, version: &str) -> Result<(), ObjectError> {
            self.inner.delete(kind, name, version).await
        }

        async fn watch(
            &self,
            kind: Kind,
            selector: &Labels,
            from: &str,
        ) -> Result<crate::objects::ObjectWatch, ObjectError> {
            self.watches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut inner = self.inner.watch(kind, selector, from).await?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                let deadline = tokio::time::sleep(LIFETIME);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        () = &mut deadline => return,
                        event = inner.next() => match event {
                            Some(event) => if tx.send(event).is_err() { return },
                            None => return,
                        },
                    }
                }
            });
            Ok(crate::objects::ObjectWatch::new(rx, task))
        }
    }

    /// A watch that ran its course is opened again from the last version it gave, not by listing again, and
    /// nothing written meanwhile (before, between or after the watches) is missed.
    #[tokio::test]
    async fn a_watch_that_ran_its_course_resumes_without_listing() {
        use crate::{
            allocator::single::{block_name, node_selectors},
            objects::kv::KeyValueObjects,
            store::embedded::EmbeddedStore,
        };
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let ending = Arc::new(Ending {
            inner: Arc::new(KeyValueObjects::new(store)),
            lists: Default::default(),
            watches: Default::default(),
        });
        let objects: Arc<dyn ObjectStore> = ending.clone();
        let write = |cidr: &str| {
            let objects = Arc::clone(&objects);
            let block = Block::new(cidr.parse().unwrap(), "p", "a", 0);
            async move {
                let spec = serde_json::to_value(&block).unwrap();
                objects.create(Kind::Block, &block_name(block.cidr), labels_of(&block), spec).await.unwrap();
            }
        };
        write("10.0.0.0/30").await;
        let [owned, borrowed] = node_selectors("a");
        let view = NodeView::start(&objects, owned, borrowed);
        let names = || async {
            view.blocks().await.unwrap().0.into_iter().map(|s| s.block.cidr.to_string()).collect::<Vec<_>>()
        };
        assert_eq!(names().await, ["10.0.0.0/30"]);
        write("10.0.0.4/30").await;
        // Past the first watches' end, then past the second's.
        tokio::time::sleep(LIFETIME + Duration::from_millis(500)).await;
        write("10.0.0.8/30").await;
        tokio::time::sleep(LIFETIME).await;
        write("10.0.0.12/30").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut seen = names().await;
        seen.sort();
        assert_eq!(seen, ["10.0.0.0/30", "10.0.0.12/30", "10.0.0.4/30", "10.0.0.8/30"]);
        let (lists, watches) = (
            ending.lists.load(std::sync::atomic::Ordering::Relaxed),
            ending.watches.load(std::sync::atomic::Ordering::Relaxed),
        );
        assert_eq!(lists, 2, "one list per selector, at the start");
        assert!(watches >= 6, "each selector's watch opened three times: {watches}");
    }

    #[test]
    fn late_events_never_take_a_block_back() {
        let f = followed();
        f.apply(&at(5, "a"), true);
        f.apply(&at(3, "a"), false);
        assert_eq!(version(&f).as_deref(), Some("5"), "an older event is ignored");
        f.gone("10-0-0-0-30", "4");
        assert_eq!(version(&f).as_deref(), Some("5"), "a deletion before the held version is an older incarnation's");
        f.gone("10-0-0-0-30", "6");
        assert_eq!(version(&f), None, "a deletion after it removes it");
    }

    #[test]
    fn a_list_keeps_only_own_writes_made_after_it() {
        let f = followed();
        f.apply(&at(5, "a"), true);
        f.listed(&[], "4");
        assert_eq!(version(&f).as_deref(), Some("5"), "written after the list's version");
        f.listed(&[], "6");
        assert_eq!(version(&f), None, "the list is later: the block is gone");
    }

    #[test]
    fn an_event_confirms_a_write_whatever_arrives_first() {
        let f = followed();
        f.apply(&at(5, "a"), false);
        f.apply(&at(5, "a"), true);
        assert!(!f.held()["10-0-0-0-30"].local, "the reply after its event leaves it confirmed");
        f.apply(&at(7, "b"), false);
        assert_eq!(version(&f), None, "no longer selected (affine to another node)");
    }
}
