//! The embedded backend against the store conformance suite, plus what only a file-backed store can show:
//! reopening, and a `kill -9` in the middle of a stream of commits losing nothing that was acknowledged.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    sync::Arc,
};

use poolwarden::store::{Store, Txn, TxnOutcome, embedded::EmbeddedStore};

fn fresh() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).expect("open embedded store");
    (dir, Arc::new(store))
}

async fn fresh_for_conformance() -> Option<(tempfile::TempDir, Arc<dyn Store>)> {
    Some(fresh())
}

poolwarden::store_conformance_tests!(fresh_for_conformance);

/// Objects (single-object compare-and-swap, labels as pointer keys) over the embedded store.
mod objects {
    use std::sync::Arc;

    use poolwarden::objects::{ObjectStore, kv::KeyValueObjects};

    async fn fresh() -> Option<(tempfile::TempDir, Arc<dyn ObjectStore>)> {
        let (dir, store) = super::fresh();
        Some((dir, Arc::new(KeyValueObjects::new(store))))
    }

    poolwarden::object_conformance_tests!(fresh);

    /// The single-object allocator over the same objects.
    mod allocator {
        poolwarden::block_allocator_tests!(super::fresh);
    }
}

#[tokio::test]
async fn reopen_keeps_data_and_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let rev = {
        let store = EmbeddedStore::open(&path).unwrap();
        store.txn(Txn::new().create("k", b"v".to_vec())).await.unwrap();
        store.revision().await.unwrap()
    };
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.revision().await.unwrap(), rev);
    assert_eq!(store.get("k").await.unwrap().unwrap().value, b"v");
    // History survives too: a watch from the first revision replays the write.
    let mut watch = store.watch("k", 1).await.unwrap();
    assert_eq!(watch.next().await.unwrap().unwrap().kv.value, b"v");
}

#[tokio::test]
async fn second_opener_gets_a_clear_error() {
    let (dir, _store) = fresh();
    let err = EmbeddedStore::open(&dir.path().join("store.redb")).err().expect("second open must fail");
    assert!(err.to_string().contains("in use by another process"), "{err}");
}

/// The child side of `kill_dash_9_loses_no_acknowledged_commit`: commits keys one after another and prints
/// each one only after its commit returned.
#[tokio::test]
async fn crash_child() {
    let Ok(path) = std::env::var("POOLWARDEN_CRASH_CHILD_STORE") else { return };
    let store = Arc::new(EmbeddedStore::open(std::path::Path::new(&path)).unwrap());
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("acked/{}/{writer}/{i}", std::process::id());
                let outcome = store.txn(Txn::new().create(&key, vec![7; 512])).await.unwrap();
                assert!(matches!(outcome, TxnOutcome::Committed(_)));
                let mut out = std::io::stdout().lock();
                writeln!(out, "{key}").unwrap();
                out.flush().unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn kill_dash_9_loses_no_acknowledged_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads", "1"])
            .env("POOLWARDEN_CRASH_CHILD_STORE", &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the crash child");
        let mut acked = Vec::new();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        while acked.len() < 300 + round * 97 {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("acked/") => acked.push(line),
                Some(Ok(_)) => {}
                other => panic!("crash child stopped early: {other:?}"),
            }
        }
        child.kill().expect("SIGKILL the child"); // std's kill is SIGKILL: no chance to flush anything
        child.wait().unwrap();

        let store = EmbeddedStore::open(&path).expect("reopen after kill -9");
        for key in &acked {
            assert!(store.get(key).await.unwrap().is_some(), "round {round}: acknowledged {key} lost after kill -9");
        }
        let (all, rev) = store.list("acked/").await.unwrap();
        assert!(all.len() >= acked.len());
        assert_eq!(rev, store.revision().await.unwrap());
        for kv in &all {
            assert_eq!(kv.value, vec![7; 512], "{} torn", kv.key);
            assert!(kv.mod_revision <= rev);
        }
    }
}
