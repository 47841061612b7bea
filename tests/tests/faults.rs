//! `kill -9` at every step boundary of the single-object allocator, on the embedded store and on a real etcd
//! (the same on the API server is in `k8s_cluster.rs`): see `kill_points`.

mod kill_points;

use kill_points::Backend;

/// The child of every boundary's run (does nothing unless a parent started it).
#[test]
fn fault_child() {
    kill_points::child();
}

#[test]
fn a_kill_at_every_step_boundary_leaves_a_state_the_next_steps_clean_up_on_the_embedded_store() {
    kill_points::kill_at_every_boundary(|_, dir| Backend::Embedded(dir.join("store.redb")));
}

#[test]
fn a_kill_at_every_step_boundary_leaves_a_state_the_next_steps_clean_up_on_etcd() {
    if !poolwarden_tests::etcd::available() {
        return;
    }
    let cluster = poolwarden_tests::etcd::EtcdCluster::on_loopback(1);
    let spec = cluster.datastore();
    kill_points::kill_at_every_boundary(move |point, _| Backend::Etcd {
        spec: spec.clone(),
        prefix: format!("/faults/{point}/"),
    });
    drop(cluster);
}
