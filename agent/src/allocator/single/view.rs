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
use crate::objects::{Kind, Labels, Object, ObjectEvent, ObjectStore, selects};

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

impl Followed {
    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Held>> {
        self.blocks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Put in (or take out, when no longer selected) what a write (`local`) or an event says the object now
    /// is, unless the view already holds a later version. The view errs towards holding a block that is gone
    /// (a write of it is refused, and the block read again) and never drops one it may still hold because an
    /// older event arrived late: a release must find every block holding its handle.
    fn apply(&self, object: &Object, local: bool) {
        let mut held = self.held();
        if let Some(h) = held.get(&object.name)
            && !later(&object.version, &h.stored.version)
            && h.stored.version != object.version
        {
            return;
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

    /// A watch says the object is gone: unless this process wrote it since (its event not yet seen).
    fn gone(&self, name: &str) {
        let mut held = self.held();
        if held.get(name).is_some_and(|h| !h.local) {
            held.remove(name);
        }
    }

    /// A list's result replaces what is held, except this process's writes the list may predate.
    fn listed(&self, listed: &[Object]) {
        let mut fresh: BTreeMap<String, Held> = listed
            .iter()
            .filter_map(|o| decode(o).ok().map(|stored| (o.name.clone(), Held { stored, local: false })))
            .collect();
        let mut held = self.held();
        for (name, h) in held.iter().filter(|(_, h)| h.local) {
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

    /// The owned and the borrowed-from blocks, once both have been listed.
    pub async fn blocks(&self) -> (Vec<Stored>, Vec<Stored>) {
        for followed in &self.followed {
            let mut ready = followed.ready.subscribe();
            // The sender lives as long as the view, so this only ends when the first list arrived.
            let _ = ready.wait_for(|listed| *listed).await;
        }
        let [owned, borrowed] = &self.followed;
        let owned = owned.held().values().map(|h| h.stored.clone()).collect();
        let borrowed = borrowed.held().values().map(|h| h.stored.clone()).collect();
        (owned, borrowed)
    }

    /// What a write of this process made the object (or a read of it found).
    pub fn written(&self, object: &Object) {
        for followed in &self.followed {
            followed.apply(object, true);
        }
    }

    /// This process deleted the object `name`, or a read found it gone.
    pub fn deleted(&self, name: &str) {
        for followed in &self.followed {
            followed.held().remove(name);
        }
    }
}

/// List, then follow from the list's version; list again whenever the watch ends or fails.
async fn follow(objects: Arc<dyn ObjectStore>, followed: Arc<Followed>) {
    let mut pause = Duration::from_millis(100);
    loop {
        match objects.list(Kind::Block, &followed.selector).await {
            Ok((listed, version)) => {
                followed.listed(&listed);
                followed.ready.send_replace(true);
                match objects.watch(Kind::Block, &followed.selector, &version).await {
                    Ok(mut events) => {
                        pause = Duration::from_millis(100);
                        while let Some(event) = events.next().await {
                            match event {
                                Ok(ObjectEvent::Applied(object)) => followed.apply(&object, false),
                                Ok(ObjectEvent::Deleted(name)) => followed.gone(&name),
                                Err(e) => {
                                    warn!(error = %e, "block watch ended; listing again");
                                    break;
                                }
                            }
                        }
                        continue;
                    }
                    Err(e) => warn!(error = %e, "cannot watch blocks; listing again"),
                }
            }
            Err(e) => warn!(error = %e, "cannot list blocks; retrying"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
