//! The behaviour every [`Store`] backend must show, written once and run against each backend's tests.
//!
//! Each check takes a fresh, empty store and panics with context when the backend deviates.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use super::{EventKind, Store, Txn, TxnOutcome};

/// One `#[tokio::test]` per conformance check, each on a store made by `$fresh`: an async function returning
/// `Option<(guard, Arc<dyn Store>)>` (the guard keeps the backend alive; `None` skips, having said why). A
/// check added here runs against every backend.
#[macro_export]
macro_rules! store_conformance_tests {
    ($fresh:path) => {
        $crate::store_conformance_tests!(
            $fresh;
            compare_and_swap,
            atomic_transactions,
            list_by_prefix,
            watch_sees_every_change_in_order,
            concurrent_writers
        );
    };
    ($fresh:path; $($name:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            let Some((_backend, store)) = $fresh().await else { return };
            $crate::store::conformance::$name(store).await;
        }
    )*};
}

fn committed(outcome: TxnOutcome, what: &str) -> i64 {
    match outcome {
        TxnOutcome::Committed(rev) => rev,
        TxnOutcome::Conflict { key } => panic!("{what}: expected commit, got conflict on {key}"),
    }
}

/// Create-if-absent, update-if-revision and delete-if-revision succeed and fail exactly as etcd's would.
pub async fn compare_and_swap(store: Arc<dyn Store>) {
    let r1 = committed(store.txn(Txn::new().create("a/x", b"1".to_vec())).await.unwrap(), "create a/x");
    assert_eq!(
        store.txn(Txn::new().create("a/x", b"again".to_vec())).await.unwrap(),
        TxnOutcome::Conflict { key: "a/x".into() },
        "a second create of the same key must conflict"
    );
    let kv = store.get("a/x").await.unwrap().expect("a/x exists after create");
    assert_eq!((kv.value.as_slice(), kv.create_revision, kv.mod_revision), (&b"1"[..], r1, r1));

    assert!(!store.txn(Txn::new().update("a/x", r1 + 100, b"2".to_vec())).await.unwrap().is_committed());
    let r2 = committed(store.txn(Txn::new().update("a/x", r1, b"2".to_vec())).await.unwrap(), "update a/x");
    assert!(r2 > r1, "revisions increase: {r1} then {r2}");
    let kv = store.get("a/x").await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.create_revision, kv.mod_revision), (&b"2"[..], r1, r2));
    assert!(!store.txn(Txn::new().update("a/x", r1, b"stale".to_vec())).await.unwrap().is_committed());

    assert!(!store.txn(Txn::new().delete("a/x", r1)).await.unwrap().is_committed(), "delete at a stale revision");
    committed(store.txn(Txn::new().delete("a/x", r2)).await.unwrap(), "delete a/x");
    assert_eq!(store.get("a/x").await.unwrap(), None);
    assert!(
        !store.txn(Txn::new().update("a/x", r2, b"3".to_vec())).await.unwrap().is_committed(),
        "update of a deleted key"
    );
    assert_eq!(store.revision().await.unwrap(), store.list("").await.unwrap().1);
}

/// A transaction with one failing comparison writes nothing; one that holds writes every key at one revision.
pub async fn atomic_transactions(store: Arc<dyn Store>) {
    committed(store.txn(Txn::new().create("b/1", b"x".to_vec())).await.unwrap(), "create b/1");
    let before = store.revision().await.unwrap();
    let outcome = store
        .txn(Txn::new().create("b/2", b"y".to_vec()).create("b/3", b"z".to_vec()).create("b/1", b"clash".to_vec()))
        .await
        .unwrap();
    assert_eq!(outcome, TxnOutcome::Conflict { key: "b/1".into() });
    assert_eq!(store.get("b/2").await.unwrap(), None, "nothing of a failed transaction is written");
    assert_eq!(store.revision().await.unwrap(), before, "a failed transaction takes no revision");

    let rev = committed(
        store.txn(Txn::new().create("b/2", b"y".to_vec()).create("b/3", b"z".to_vec())).await.unwrap(),
        "create b/2 and b/3",
    );
    for key in ["b/2", "b/3"] {
        assert_eq!(store.get(key).await.unwrap().unwrap().mod_revision, rev, "{key} written at the txn's revision");
    }
    let b1 = store.get("b/1").await.unwrap().unwrap();
    assert!(
        !store
            .txn(Txn::new().unchanged("b/1", b1.mod_revision + 1).create("b/4", vec![]))
            .await
            .unwrap()
            .is_committed()
    );
    committed(
        store.txn(Txn::new().unchanged("b/1", b1.mod_revision).create("b/4", vec![])).await.unwrap(),
        "guarded create",
    );
}

/// Listing returns exactly the keys under a prefix, in key order.
pub async fn list_by_prefix(store: Arc<dyn Store>) {
    for key in ["pools/b", "pools/a", "poolsx", "blocks/10.0.0.0-29", "pools/c/d"] {
        committed(store.txn(Txn::new().create(key, key.as_bytes().to_vec())).await.unwrap(), key);
    }
    let (listed, rev) = store.list("pools/").await.unwrap();
    let keys: Vec<_> = listed.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["pools/a", "pools/b", "pools/c/d"]);
    assert_eq!(rev, store.revision().await.unwrap());
    assert_eq!(store.list("nothing/").await.unwrap().0, vec![]);
}

/// A watch sees every change under its prefix, in order, from a past revision and then live.
pub async fn watch_sees_every_change_in_order(store: Arc<dyn Store>) {
    let start = committed(store.txn(Txn::new().create("w/a", b"0".to_vec())).await.unwrap(), "create w/a");
    committed(store.txn(Txn::new().create("other/z", b"0".to_vec())).await.unwrap(), "create other/z");
    let mut replay = store.watch("w/", start).await.unwrap();
    let mut live = store.watch("w/", 0).await.unwrap();

    let mut expected = vec![(EventKind::Put, "w/a".to_string(), b"0".to_vec())];
    let mut rev = start;
    for i in 1..=50u32 {
        let value = i.to_string().into_bytes();
        rev = committed(store.txn(Txn::new().update("w/a", rev, value.clone())).await.unwrap(), "update w/a");
        expected.push((EventKind::Put, "w/a".to_string(), value));
        committed(store.txn(Txn::new().create(format!("other/{i}"), vec![])).await.unwrap(), "noise");
    }
    committed(store.txn(Txn::new().delete("w/a", rev)).await.unwrap(), "delete w/a");
    expected.push((EventKind::Delete, "w/a".to_string(), vec![]));

    for (name, watch, skip) in [("replay", &mut replay, 0), ("live", &mut live, 1)] {
        let mut last = 0;
        for (i, want) in expected.iter().enumerate().skip(skip) {
            let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await
                .unwrap_or_else(|_| panic!("{name} watch: event {i} never arrived"))
                .expect("watch open")
                .expect("watch event");
            assert_eq!(
                (&event.kind, &event.kv.key, &event.kv.value),
                (&want.0, &want.1, &want.2),
                "{name} watch event {i}"
            );
            assert!(event.kv.mod_revision > last, "{name} watch: revisions in order");
            last = event.kv.mod_revision;
        }
    }
}

/// Many writers racing on one key with compare-and-swap: every increment lands exactly once.
pub async fn concurrent_writers(store: Arc<dyn Store>) {
    const WRITERS: usize = 16;
    const INCREMENTS: usize = 50;
    committed(store.txn(Txn::new().create("counter", b"0".to_vec())).await.unwrap(), "create counter");
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..INCREMENTS {
                loop {
                    let kv = store.get("counter").await.unwrap().unwrap();
                    let n: usize = String::from_utf8(kv.value).unwrap().parse().unwrap();
                    let txn = Txn::new()
                        .update("counter", kv.mod_revision, (n + 1).to_string().into_bytes())
                        .create(format!("marks/{writer}/{i}"), vec![]);
                    if let TxnOutcome::Committed(rev) = store.txn(txn).await.unwrap() {
                        revisions.push(rev);
                        break;
                    }
                }
            }
            revisions
        }));
    }
    let mut all = BTreeSet::new();
    for task in tasks {
        for rev in task.await.unwrap() {
            assert!(all.insert(rev), "revision {rev} given to two transactions");
        }
    }
    let n: usize = String::from_utf8(store.get("counter").await.unwrap().unwrap().value).unwrap().parse().unwrap();
    assert_eq!(n, WRITERS * INCREMENTS, "every compare-and-swap increment counted exactly once");
    assert_eq!(store.list("marks/").await.unwrap().0.len(), WRITERS * INCREMENTS);
}
