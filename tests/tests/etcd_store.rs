//! The etcd backend against the store conformance suite on a real three-member etcd cluster, and what only a
//! cluster can do to it: a member killed and restarted under a stream of compare-and-swap writes and a watch,
//! and history compacted under a watch.

use std::{sync::Arc, time::Duration};

use poolwarden::store::{
    EventKind, Store, StoreError, Txn, TxnOutcome, conformance,
    etcd::{EtcdConfig, EtcdStore},
};
use poolwarden_tests::{
    etcd::{EtcdCluster, Tls},
    unique,
};

async fn connect(cluster: &EtcdCluster) -> Arc<dyn Store> {
    let mut config = EtcdConfig::from_spec(&cluster.datastore()).expect("datastore spec");
    config.prefix = format!("/{}/", unique("t"));
    Arc::new(EtcdStore::connect(&config).await.expect("connect to etcd"))
}

/// A store on a fresh three-member cluster of its own (the cluster is the guard).
async fn fresh_cluster() -> Option<(EtcdCluster, Arc<dyn Store>)> {
    if !poolwarden_tests::etcd::available() {
        return None;
    }
    let cluster = EtcdCluster::on_loopback(3);
    let store = connect(&cluster).await;
    Some((cluster, store))
}

poolwarden::store_conformance_tests!(fresh_cluster);

/// Objects (single-object compare-and-swap, labels as pointer keys) over etcd.
mod objects {
    use std::sync::Arc;

    use poolwarden::objects::{ObjectStore, kv::KeyValueObjects};
    use poolwarden_tests::etcd::EtcdCluster;

    async fn fresh() -> Option<(EtcdCluster, Arc<dyn ObjectStore>)> {
        let (cluster, store) = super::fresh_cluster().await?;
        Some((cluster, Arc::new(KeyValueObjects::new(store))))
    }

    poolwarden::object_conformance_tests!(fresh);

    /// The single-object allocator over the same objects.
    mod allocator {
        poolwarden::block_allocator_tests!(super::fresh);
    }
}

/// More keys than one page of a listing (500), all returned in order at one revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_spans_pages() {
    if !poolwarden_tests::etcd::available() {
        return;
    }
    let cluster = EtcdCluster::on_loopback(1);
    let store = connect(&cluster).await;
    let mut want = Vec::new();
    for chunk in 0..13 {
        let mut txn = Txn::new();
        for i in 0..100 {
            let key = format!("many/{:05}", chunk * 100 + i);
            txn = txn.create(&key, key.as_bytes().to_vec());
            want.push(key);
        }
        assert!(store.txn(txn).await.unwrap().is_committed());
    }
    let (listed, revision) = store.list("many/").await.unwrap();
    assert_eq!(listed.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(), want);
    assert!(listed.iter().all(|kv| kv.value == kv.key.as_bytes()));
    assert_eq!(revision, store.revision().await.unwrap());
    let (keys, _) = store.list_keys("many/").await.unwrap();
    assert_eq!(keys, want);
}

/// Kill each member in turn (SIGKILL) while writers increment a counter with compare-and-swap and a watch
/// follows it: no write fails, every increment counts once, and the watch sees every revision in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_killed_and_restarted_under_writes_and_a_watch() {
    if !poolwarden_tests::etcd::available() {
        return;
    }
    let mut cluster = EtcdCluster::on_loopback(3);
    let store = connect(&cluster).await;
    let start = match store.txn(Txn::new().create("counter", b"0".to_vec())).await.unwrap() {
        TxnOutcome::Committed(rev) => rev,
        other => panic!("create counter: {other:?}"),
    };
    let mut watch = store.watch("counter", start).await.unwrap();

    const WRITERS: usize = 4;
    const INCREMENTS: usize = 60;
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for _ in 0..INCREMENTS {
                loop {
                    let kv = store.get("counter").await.expect("get through a member failure").unwrap();
                    let n: usize = String::from_utf8(kv.value).unwrap().parse().unwrap();
                    let txn = Txn::new().update("counter", kv.mod_revision, (n + 1).to_string().into_bytes());
                    if store.txn(txn).await.expect("commit through a member failure").is_committed() {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for member in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.stop_member(member);
        tokio::time::sleep(Duration::from_millis(700)).await;
        cluster.start_member(member);
    }
    for task in tasks {
        task.await.expect("writer");
    }
    let total: usize = String::from_utf8(store.get("counter").await.unwrap().unwrap().value).unwrap().parse().unwrap();
    assert_eq!(total, WRITERS * INCREMENTS, "every increment counted exactly once");

    let mut seen = Vec::new();
    while seen.len() <= WRITERS * INCREMENTS {
        let event = tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .unwrap_or_else(|_| panic!("watch stalled after {} events", seen.len()))
            .expect("watch open")
            .expect("watch event");
        assert_eq!(event.kind, EventKind::Put);
        seen.push(String::from_utf8(event.kv.value).unwrap().parse::<usize>().unwrap());
    }
    assert_eq!(seen, (0..=WRITERS * INCREMENTS).collect::<Vec<_>>(), "the watch saw every value once, in order");
}

/// A watch from a revision etcd has compacted away is refused with the compaction named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_compacted_history_is_refused() {
    if !poolwarden_tests::etcd::available() {
        return;
    }
    let cluster = EtcdCluster::on_loopback(1);
    let store = connect(&cluster).await;
    let mut rev = 0;
    for i in 0..5 {
        if let TxnOutcome::Committed(r) = store.txn(Txn::new().put("k", vec![i])).await.unwrap() {
            rev = r;
        }
    }
    poolwarden_tests::sh("etcdctl", &["--endpoints", &cluster.members[0].client_url(), "compact", &rev.to_string()]);
    match store.watch("k", rev - 2).await {
        Err(StoreError::Compacted { compacted, .. }) => assert_eq!(compacted, rev),
        Err(other) => panic!("expected a compaction error, got {other}"),
        Ok(_) => panic!("a watch from compacted history must be refused"),
    }
}

/// A cluster that serves only TLS with client certificates: the store connects with --etcd-ca,
/// --etcd-cert and --etcd-key and behaves as ever; without a client certificate, or over http://, it is
/// refused with a message naming what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls() {
    if !poolwarden_tests::etcd::available() {
        return;
    }
    let tls = Tls::generate();
    let cluster = EtcdCluster::with_tls(&tls);
    let mut config = EtcdConfig::from_spec(&cluster.datastore()).expect("datastore spec");
    assert!(config.endpoints[0].starts_with("https://"), "{:?}", config.endpoints);
    config.ca = Some(tls.path("ca.crt"));
    config.cert = Some(tls.path("client.crt"));
    config.key = Some(tls.path("client.key"));
    config.prefix = format!("/{}/", unique("tls"));
    let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(&config).await.expect("connect over mutual TLS"));
    conformance::compare_and_swap(store).await;

    let half = EtcdConfig { cert: None, key: Some(tls.path("client.key")), ..config.clone() };
    let err = EtcdStore::connect(&half).await.err().expect("a key without a certificate is refused").to_string();
    assert!(err.contains("--etcd-cert and --etcd-key must be given together"), "{err}");

    // The server requires a client certificate: the refusal says so (and is not retried as an outage).
    // With TLS 1.3 the client's handshake is over before the server checks its certificate, so when the
    // server hangs up before its alert is read (seen under load), the refusal arrives as a broken pipe, which
    // looks like an outage and is retried until the budget runs out.
    let anonymous = EtcdConfig { cert: None, key: None, ..config.clone() };
    let err = EtcdStore::connect(&anonymous).await.err().expect("no client certificate is refused").to_string();
    let alert = err.contains("BadCertificate") || err.contains("CertificateRequired");
    assert!((alert && !err.contains("did not answer")) || err.contains("broken pipe"), "{err}");

    let plain =
        EtcdConfig { endpoints: vec![config.endpoints[0].replacen("https://", "http://", 1)], ..config.clone() };
    let err = EtcdStore::connect(&plain).await.err().expect("TLS options with http:// are refused").to_string();
    assert!(err.contains("use https://"), "{err}");
}

/// `datastore migrate` on etcd: a source of 150 attachments (more records than one transaction of the copy
/// takes) read and checked unchanged while another user of the same etcd writes under another prefix (etcd's
/// cluster-wide revision moves, poolwarden's keys do not), written back into a second prefix record for record,
/// and refused as changed once one of its own keys is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_reads_and_writes_etcd_within_its_limits() {
    use poolwarden::{catalog::Catalog, migrate, resources::parse_documents};
    let Some((cluster, source)) = fresh_cluster().await else { return };
    let docs = parse_documents(
        "pools.yaml",
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: a}\nspec: {cidr: 10.90.0.0/23, blockSize: 28}\n---\n\
         apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: b}\nspec: {cidr: '10.91.0.0/24', blockSize: 27}\n",
    )
    .expect("pools");
    Catalog::new(Arc::clone(&source)).apply(&docs).await.expect("apply");
    let kept = migrate::fixtures::populate(&source, &["a", "b"], &["node-a", "node-b", "node-c"], 150, Some(8)).await;
    let copied = migrate::read(&source).await.expect("read");
    assert_eq!(copied.addresses(), kept.len() + 1);
    let other = connect(&cluster).await;
    other.txn(Txn::new().put("unrelated", b"x".to_vec())).await.expect("another user's write");
    migrate::unchanged(&source, &copied).await.expect("poolwarden's keys did not change");

    let target = connect(&cluster).await;
    let docs: Vec<_> = copied
        .pools
        .iter()
        .map(|p| poolwarden::resources::Located {
            resource: poolwarden::resources::Resource::IpPool(p.clone()),
            at: poolwarden::resources::Location { file: "-".into(), document: 1, line: 1, item: None },
        })
        .collect();
    let written = migrate::into_store(&target, &docs, &copied.blocks, "test").await.expect("into etcd");
    assert!(written > 128, "{written} records: more than one transaction's worth");
    migrate::finish(&target).await.expect("finish");
    let (original, back) =
        (migrate::fixtures::ipam_records(&source).await, migrate::fixtures::ipam_records(&target).await);
    assert_eq!(migrate::fixtures::differences(&back, &original), Vec::<String>::new());

    source.txn(Txn::new().put("pools/x", b"{}".to_vec())).await.expect("a write to the source");
    let err = migrate::unchanged(&source, &copied).await.unwrap_err().to_string();
    assert!(err.contains("changed during the copy"), "{err}");
}
