//! Assign and release on the embedded store with durable commits, with 100, 10,000 and 100,000 addresses
//! already allocated, against the floor of one durable commit measured in the same run; and the throughput
//! of concurrent requests (group commit).
//!
//! Run with `cargo xtask bench` (or `cargo bench -p poolwarden --bench allocator`).

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group};
use poolwarden::{
    allocator::{Allocator, AssignRequest},
    catalog::Catalog,
    ipam::{NamespaceInfo, NodeInfo, PodInfo},
    resources::parse_documents,
    store::{Store, Txn, embedded::EmbeddedStore},
};
use tokio::runtime::Runtime;

const POOL: &str =
    "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: big}\nspec: {cidr: 10.0.0.0/8, blockSize: 26}\n";

struct Bench {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    allocator: Allocator,
}

fn request(handle: &str, node: &str) -> AssignRequest {
    AssignRequest {
        handle: handle.to_string(),
        node: NodeInfo { name: node.to_string(), labels: BTreeMap::new() },
        namespace: NamespaceInfo { name: "bench".into(), ..Default::default() },
        pod: Some(PodInfo { name: handle.to_string(), annotations: BTreeMap::new() }),
        requested: Default::default(),
        eligible: None,
        attributes: BTreeMap::new(),
    }
}

/// A store on the real disk (not tmpfs: the point is durable commits) with `prefill` addresses allocated.
async fn setup(prefill: usize) -> (Bench, Duration) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("bench.redb")).expect("open"));
    let docs = parse_documents("bench.yaml", POOL).expect("pool");
    Catalog::new(Arc::clone(&store)).apply(&docs).await.expect("apply");
    let allocator = Allocator::new(Arc::clone(&store));
    let elapsed = assign_concurrently(&allocator, "fill", prefill, 16, 64).await;
    (Bench { _dir: dir, store, allocator }, elapsed)
}

/// Assign `count` addresses with `concurrency` requests in flight spread over `nodes` nodes.
async fn assign_concurrently(
    allocator: &Allocator,
    tag: &str,
    count: usize,
    nodes: usize,
    concurrency: usize,
) -> Duration {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let allocator = allocator.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            for i in (worker..count).step_by(concurrency) {
                let node = format!("node-{}", i % nodes);
                allocator.assign(&request(&format!("{tag}-{i}"), &node)).await.expect("assign");
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    start.elapsed()
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Median and p99 of sequential operations, and group-commit throughput, printed as a table.
fn summary(runtime: &Runtime) {
    println!("\npoolwarden allocator, embedded store, durable commits (fsync per commit), {} samples per row", 400);
    println!(
        "{:<12} {:>14} {:>14} {:>14} {:>14} {:>16}",
        "allocated", "assign median", "assign p99", "release median", "commit floor", "assign / floor"
    );
    for prefill in [100usize, 10_000, 100_000] {
        runtime.block_on(async {
            let (bench, fill_time) = setup(prefill).await;
            let (mut assign, mut release, mut floor) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..400 {
                let handle = format!("s-{i}");
                let t = Instant::now();
                bench.allocator.assign(&request(&handle, "bench-node")).await.expect("assign");
                assign.push(t.elapsed());
                let t = Instant::now();
                bench.allocator.release_handle(&handle).await.expect("release");
                release.push(t.elapsed());
                let t = Instant::now();
                bench.store.txn(Txn::new().put(format!("floor/{i}"), vec![0; 64])).await.expect("floor");
                floor.push(t.elapsed());
            }
            let (a50, a99) = (percentile(&mut assign, 0.5), percentile(&mut assign, 0.99));
            let r50 = percentile(&mut release, 0.5);
            let f50 = percentile(&mut floor, 0.5);
            println!(
                "{:<12} {:>12.0}us {:>12.0}us {:>12.0}us {:>12.0}us {:>15.2}x   (prefill: {:.0} allocations/s)",
                prefill,
                micros(a50),
                micros(a99),
                micros(r50),
                micros(f50),
                micros(a50) / micros(f50),
                prefill as f64 / fill_time.as_secs_f64()
            );
        });
    }

    println!("\nthroughput of durable allocations (group commit), 4,000 assigns each, fresh store with 100 allocated:");
    println!("{:<44} {:>16} {:>12}", "load", "allocations/s", "vs sequential");
    runtime.block_on(async {
        let mut sequential = 0.0;
        for (label, nodes, concurrency) in [
            ("sequential, one node", 1usize, 1usize),
            ("64 concurrent requests, one node", 1, 64),
            ("64 concurrent requests over 16 nodes", 16, 64),
            ("256 concurrent requests over 64 nodes", 64, 256),
        ] {
            let (bench, _) = setup(100).await;
            let elapsed = assign_concurrently(&bench.allocator, "t", 4000, nodes, concurrency).await;
            let rate = 4000.0 / elapsed.as_secs_f64();
            if concurrency == 1 {
                sequential = rate;
            }
            println!("{label:<44} {rate:>16.0} {:>11.1}x", rate / sequential);
        }
    });
    println!();
}

fn criterion_benches(c: &mut Criterion) {
    let runtime = Runtime::new().expect("runtime");
    // `cargo test --all-targets` runs this binary without --bench just to smoke-test it: skip the long table.
    if std::env::args().any(|a| a == "--bench") {
        summary(&runtime);
    }
    let mut group = c.benchmark_group("allocator");
    group.sample_size(20).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    for prefill in [100usize, 10_000, 100_000] {
        let (bench, _) = runtime.block_on(setup(prefill));
        let mut n = 0u64;
        group.bench_function(format!("assign+release/{prefill}_allocated"), |b| {
            b.to_async(&runtime).iter(|| {
                n += 1;
                let handle = format!("c-{n}");
                let allocator = bench.allocator.clone();
                async move {
                    allocator.assign(&request(&handle, "bench-node")).await.expect("assign");
                    allocator.release_handle(&handle).await.expect("release");
                }
            });
        });
    }
    let (bench, _) = runtime.block_on(setup(100));
    let mut n = 0u64;
    group.bench_function("peer: one durable commit", |b| {
        b.to_async(&runtime).iter(|| {
            n += 1;
            let store = Arc::clone(&bench.store);
            async move {
                store.txn(Txn::new().put(format!("floor/{n}"), vec![0; 64])).await.expect("commit");
            }
        });
    });
    group.finish();
}

criterion_group!(benches, criterion_benches);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
