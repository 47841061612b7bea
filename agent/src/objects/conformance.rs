//! The behaviour every [`ObjectStore`] backend must show, written once and run against the embedded and etcd
//! datastores (`object_conformance_tests!`) and the real Kubernetes API server ([`all`], from the cluster
//! tests). Each check works on objects named and labelled with `run`, so checks can share a backend that holds
//! other objects, and removes what it made.

use std::{sync::Arc, time::Duration};

use serde_json::json;

use super::{Kind, Labels, Object, ObjectError, ObjectEvent, ObjectStore, ObjectWatch};

/// One `#[tokio::test]` per check, each on a backend made by `$fresh`: an async function returning
/// `Option<(guard, Arc<dyn ObjectStore>)>` (`None` skips, having said why).
#[macro_export]
macro_rules! object_conformance_tests {
    ($fresh:path) => {
        $crate::object_conformance_tests!($fresh; compare_and_swap, invalid_objects_are_refused, list_by_labels, watch_by_labels,
            concurrent_updates);
    };
    ($fresh:path; $($name:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            let Some((_backend, objects)) = $fresh().await else { return };
            $crate::objects::conformance::$name(objects, stringify!($name).replace('_', "-").as_str()).await;
        }
    )*};
}

/// Every check, one after the other.
pub async fn all(objects: Arc<dyn ObjectStore>, run: &str) {
    compare_and_swap(Arc::clone(&objects), &format!("{run}-cas")).await;
    invalid_objects_are_refused(Arc::clone(&objects), &format!("{run}-invalid")).await;
    list_by_labels(Arc::clone(&objects), &format!("{run}-list")).await;
    watch_by_labels(Arc::clone(&objects), &format!("{run}-watch")).await;
    concurrent_updates(objects, &format!("{run}-concurrent")).await;
}

const KIND: Kind = Kind::Block;

fn labels(run: &str, pairs: &[(&str, &str)]) -> Labels {
    let mut labels = Labels::from([("poolwarden.io/run".to_string(), run.to_string())]);
    labels.extend(pairs.iter().map(|(k, v)| (format!("poolwarden.io/{k}"), v.to_string())));
    labels
}

/// What the API server refuses is refused: a name that is not a DNS subdomain, a label it does not take, a
/// spec that is not an object.
pub async fn invalid_objects_are_refused(objects: Arc<dyn ObjectStore>, run: &str) {
    let cases = [
        (format!("{run}-Upper"), labels(run, &[]), json!({})),
        (format!("{run}-fd00::-120"), labels(run, &[]), json!({})),
        (format!("{run}-bad-label"), labels(run, &[("node", "a,b")]), json!({})),
        (format!("{run}-long-label"), labels(run, &[("node", "n".repeat(64).as_str())]), json!({})),
        (format!("{run}-not-object"), labels(run, &[]), json!(7)),
    ];
    for (name, labels, spec) in cases {
        let refused = objects.create(KIND, &name, labels.clone(), spec.clone()).await;
        assert!(matches!(refused, Err(ObjectError::Invalid { .. })), "{name} {labels:?} {spec}: {refused:?}");
    }
}

/// Create succeeds once; update and delete succeed at the version read and are refused at any other; a
/// missing object is not found.
pub async fn compare_and_swap(objects: Arc<dyn ObjectStore>, run: &str) {
    let name = format!("{run}-a");
    let a = objects.create(KIND, &name, labels(run, &[]), json!({"n": 1})).await.expect("create");
    assert_eq!(objects.get(KIND, &name).await.expect("get"), Some(a.clone()), "read back as created");
    let again = objects.create(KIND, &name, labels(run, &[]), json!({"n": 9})).await;
    assert!(matches!(again, Err(ObjectError::AlreadyExists { .. })), "a second create: {again:?}");

    let a2 = objects.update(KIND, &Object { spec: json!({"n": 2}), ..a.clone() }).await.expect("update");
    assert_ne!(a2.version, a.version, "an update makes a new version");
    assert_eq!(objects.get(KIND, &name).await.expect("get").map(|o| o.spec), Some(json!({"n": 2})));
    let stale = objects.update(KIND, &Object { spec: json!({"n": 3}), ..a.clone() }).await;
    assert!(matches!(stale, Err(ObjectError::Conflict { .. })), "an update at a stale version: {stale:?}");
    let stale = objects.delete(KIND, &name, &a.version).await;
    assert!(matches!(stale, Err(ObjectError::Conflict { .. })), "a delete at a stale version: {stale:?}");
    assert_eq!(objects.get(KIND, &name).await.expect("get").map(|o| o.spec), Some(json!({"n": 2})), "untouched");

    objects.delete(KIND, &name, &a2.version).await.expect("delete");
    assert_eq!(objects.get(KIND, &name).await.expect("get"), None, "gone");
    let missing = objects.update(KIND, &a2).await;
    assert!(matches!(missing, Err(ObjectError::NotFound { .. })), "an update of a deleted object: {missing:?}");
    let missing = objects.delete(KIND, &name, &a2.version).await;
    assert!(matches!(missing, Err(ObjectError::NotFound { .. })), "a delete of a deleted object: {missing:?}");
}

/// A list returns exactly the objects every pair of the selector matches, in name order.
pub async fn list_by_labels(objects: Arc<dyn ObjectStore>, run: &str) {
    let made = [
        (format!("{run}-a"), labels(run, &[("node", "n1")])),
        (format!("{run}-b"), labels(run, &[("node", "n2")])),
        (format!("{run}-c"), labels(run, &[("node", "n1"), ("pool", "p")])),
    ];
    for (name, labels) in &made {
        objects.create(KIND, name, labels.clone(), json!({})).await.expect("create");
    }
    let names = |found: Vec<Object>| found.into_iter().map(|o| o.name).collect::<Vec<_>>();
    let cases = [
        (labels(run, &[]), vec!["a", "b", "c"]),
        (labels(run, &[("node", "n1")]), vec!["a", "c"]),
        (labels(run, &[("node", "n1"), ("pool", "p")]), vec!["c"]),
        (labels(run, &[("node", "n3")]), vec![]),
    ];
    for (selector, expected) in cases {
        let (found, version) = objects.list(KIND, &selector).await.expect("list");
        assert!(!version.is_empty(), "a list has a version to watch from");
        let expected: Vec<String> = expected.iter().map(|n| format!("{run}-{n}")).collect();
        assert_eq!(names(found), expected, "selected by {selector:?}");
    }
    // A relabelled object moves between selections.
    let (found, _) = objects.list(KIND, &labels(run, &[("node", "n2")])).await.expect("list");
    let b = found.into_iter().next().expect("b");
    objects.update(KIND, &Object { labels: labels(run, &[("node", "n1")]), ..b }).await.expect("relabel");
    let (found, _) = objects.list(KIND, &labels(run, &[("node", "n1")])).await.expect("list");
    assert_eq!(names(found), vec![format!("{run}-a"), format!("{run}-b"), format!("{run}-c")]);
    let (found, _) = objects.list(KIND, &labels(run, &[("node", "n2")])).await.expect("list");
    assert!(found.is_empty(), "relabelled away: {found:?}");
    remove_all(&objects, run).await;
}

/// The next event, passing over deletions of `unselected` (allowed, never required: see
/// [`ObjectStore::watch`]) and progress marks.
async fn next_event(watch: &mut ObjectWatch, after: &str, unselected: &[String]) -> ObjectEvent {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), watch.next()).await {
            Ok(Some(Ok(ObjectEvent::Deleted { name, .. }))) if unselected.contains(&name) => {}
            Ok(Some(Ok(ObjectEvent::Progress(_)))) => {}
            Ok(Some(Ok(event))) => return event,
            Ok(Some(Err(e))) => panic!("after {after}: the watch failed: {e}"),
            Ok(None) => panic!("after {after}: the watch ended"),
            Err(_) => panic!("after {after}: no event within 15 s"),
        }
    }
}

/// The name a `Deleted` event names, having checked its version is later than `before` (both backends'
/// versions are numbers).
fn deleted(event: &ObjectEvent, before: &str) -> String {
    let ObjectEvent::Deleted { name, version } = event else { panic!("expected a deletion, got {event:?}") };
    let (after, before): (u64, u64) = (version.parse().expect("a number"), before.parse().expect("a number"));
    assert!(after > before, "{name} left at version {after}, not later than {before}");
    name.clone()
}

/// A watch from a list's version sees each change to what it selects, in order: creation, change, leaving
/// the selection (as a deletion) and deletion; nothing of objects it does not select.
pub async fn watch_by_labels(objects: Arc<dyn ObjectStore>, run: &str) {
    let mine = labels(run, &[("node", "n1")]);
    let x = objects.create(KIND, &format!("{run}-x"), mine.clone(), json!({"n": 0})).await.expect("create");
    let (listed, version) = objects.list(KIND, &mine).await.expect("list");
    assert_eq!(listed, vec![x.clone()]);
    // Made after the list, before the watch: the watch from the list's version sees it.
    let w = objects.create(KIND, &format!("{run}-w"), mine.clone(), json!({})).await.expect("create");
    let mut watch = objects.watch(KIND, &mine, &version).await.expect("watch");
    let other = format!("{run}-o");
    let unselected = [format!("{run}-z"), other.clone()];
    assert_eq!(next_event(&mut watch, "a create before the watch", &unselected).await, ObjectEvent::Applied(w));

    let y = objects.create(KIND, &format!("{run}-y"), mine.clone(), json!({"n": 1})).await.expect("create");
    assert_eq!(next_event(&mut watch, "a create", &unselected).await, ObjectEvent::Applied(y.clone()));
    let y2 = objects.update(KIND, &Object { spec: json!({"n": 2}), ..y }).await.expect("update");
    assert_eq!(next_event(&mut watch, "an update", &unselected).await, ObjectEvent::Applied(y2.clone()));
    // Leaving by one pair, coming back, leaving by the other.
    let y2_version = y2.version.clone();
    let y3 = objects.update(KIND, &Object { labels: labels(run, &[("node", "n2")]), ..y2 }).await.expect("relabel");
    let left = next_event(&mut watch, "a relabel", &unselected).await;
    assert_eq!(deleted(&left, &y2_version), format!("{run}-y"));
    let y4 = objects.update(KIND, &Object { labels: mine.clone(), ..y3 }).await.expect("relabel back");
    assert_eq!(next_event(&mut watch, "a relabel back", &unselected).await, ObjectEvent::Applied(y4.clone()));
    let mut moved = mine.clone();
    moved.insert("poolwarden.io/run".into(), format!("{run}-elsewhere"));
    let y4_version = y4.version.clone();
    objects.update(KIND, &Object { labels: moved, ..y4 }).await.expect("relabel by the other pair");
    let left = next_event(&mut watch, "a relabel by the other pair", &unselected).await;
    assert_eq!(deleted(&left, &y4_version), format!("{run}-y"));
    // Never selected (one shares no pair, one shares a pair): never applied (the next event is the deletion).
    objects.create(KIND, &unselected[0], labels(run, &[("node", "n2")]), json!({})).await.expect("create");
    let mut half = mine.clone();
    half.insert("poolwarden.io/run".into(), format!("{run}-other"));
    objects.create(KIND, &other, half, json!({})).await.expect("create");
    objects.delete(KIND, &x.name, &x.version).await.expect("delete");
    let gone = next_event(&mut watch, "a delete", &unselected).await;
    assert_eq!(deleted(&gone, &x.version), format!("{run}-x"));
    drop(watch);
    remove_all(&objects, run).await;
    remove_all(&objects, &format!("{run}-elsewhere")).await;
    remove_all(&objects, &format!("{run}-other")).await;
}

/// Writers racing on one object lose no update: each retries on a conflict from a fresh read.
pub async fn concurrent_updates(objects: Arc<dyn ObjectStore>, run: &str) {
    let name = format!("{run}-counter");
    objects.create(KIND, &name, labels(run, &[]), json!({"n": 0})).await.expect("create");
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let objects = Arc::clone(&objects);
            let name = name.clone();
            tokio::spawn(async move {
                let mut conflicts = 0;
                for _ in 0..5 {
                    loop {
                        assert!(conflicts < 200, "200 conflicts for 5 updates: no writer gets through");
                        let current = objects.get(KIND, &name).await.expect("get").expect("exists");
                        let n = current.spec["n"].as_u64().expect("n");
                        match objects.update(KIND, &Object { spec: json!({"n": n + 1}), ..current }).await {
                            Ok(_) => break,
                            Err(ObjectError::Conflict { .. }) => conflicts += 1,
                            Err(e) => panic!("update: {e}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    let mut conflicts = 0;
    for writer in writers {
        conflicts += writer.await.expect("writer");
    }
    let last = objects.get(KIND, &name).await.expect("get").expect("exists");
    assert_eq!(last.spec["n"], 20, "20 increments by 4 writers ({conflicts} conflicts retried)");
    remove_all(&objects, run).await;
}

async fn remove_all(objects: &Arc<dyn ObjectStore>, run: &str) {
    let (left, _) = objects.list(KIND, &labels(run, &[])).await.expect("list");
    for object in left {
        objects.delete(KIND, &object.name, &object.version).await.expect("delete");
    }
}
