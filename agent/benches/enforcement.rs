//! Per-packet cost of the enforcement program with BPF_PROG_TEST_RUN (1,000,000 repeats a run), for the
//! allowed path (by the default program, and by the one `--count-passed-packets` attaches) and the drop
//! path, against an empty TC program measured in the same rounds, with 10, 1,000 and
//! 100,000 endpoint entries in the map; beside them the floor program (the endpoint's entry and one comparison
//! of the source: what any check by one program shared by every pod costs at least). Medians of [`ROUNDS`]
//! rounds, each running the four one after the other, and the median of the rounds' own ratios (a round's runs
//! see the same machine, so its ratio is steadier than the times on a shared, noisy one). Needs root (run by
//! `cargo xtask bench`).

use std::{
    net::{IpAddr, Ipv4Addr},
    process::Command,
};

use poolwarden::dataplane::enforcement::{
    ENFORCE, ENFORCE_COUNTING, EndpointSpec, Enforcement, FLOOR, PASS, VERDICT_DROP, VERDICT_PASS, frames,
};

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 41;

/// Nanoseconds per packet of `program` on `frame` over one run of [`REPEAT`] (the kernel's figure, in whole
/// nanoseconds).
fn per_packet(enforcement: &Enforcement, program: &str, frame: &[u8], want: u32) -> f64 {
    let (verdict, per_run) = enforcement.run(program, frame, REPEAT).expect("BPF_PROG_TEST_RUN");
    assert_eq!(verdict, want, "{program} gave the wrong verdict");
    (per_run.as_nanos() as f64).max(1.0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or_default()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --all-targets` only checks that this builds.
    }
    let dir = tempfile::tempdir().expect("temp dir");
    assert!(
        Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.path()).status().is_ok_and(|s| s.success()),
        "mount bpffs (root needed)"
    );
    // Unmounted however this ends, a panic included.
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(dir.path());
    let mut enforcement = Enforcement::load(&dir.path().join("poolwarden")).expect("load");
    let pod = Ipv4Addr::new(10, 0, 0, 5);
    let allowed = frames::ipv4(pod, Ipv4Addr::new(10, 255, 0, 1));
    let spoofed = frames::ipv4(Ipv4Addr::new(10, 0, 0, 6), Ipv4Addr::new(10, 255, 0, 1));
    let spec = EndpointSpec { addresses: vec![IpAddr::V4(pod)], pools: vec![], pool_mode: false, pool_id: 1 };
    enforcement.set_endpoint(1, &spec).expect("entry for the test interface");

    println!(
        "\nenforcement program, BPF_PROG_TEST_RUN, {REPEAT} repeats a run, medians of {ROUNDS} rounds (ns per packet)"
    );
    println!(
        "{:>8} {:>6} {:>6} {:>8} {:>8} {:>8} {:>12} {:>14} {:>14} {:>14}",
        "entries",
        "empty",
        "floor",
        "allowed",
        "counted",
        "dropped",
        "floor/empty",
        "allowed/empty",
        "counted/empty",
        "dropped/empty"
    );
    let mut filled = 1u32;
    for entries in [10u32, 1_000, 100_000] {
        while filled < entries {
            // Other interfaces' entries: the indexes after the loopback's, as a busy node's would be (past
            // 65,536 they go to the hash map part).
            let other =
                EndpointSpec { addresses: vec![IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + filled))], ..spec.clone() };
            enforcement.set_endpoint(filled + 1, &other).expect("fill");
            filled += 1;
        }
        let rounds: Vec<[f64; 5]> = (0..ROUNDS)
            .map(|_| {
                let empty = per_packet(&enforcement, PASS, &allowed, VERDICT_PASS);
                let floor = per_packet(&enforcement, FLOOR, &allowed, VERDICT_PASS);
                let allowed_cost = per_packet(&enforcement, ENFORCE, &allowed, VERDICT_PASS);
                let counted = per_packet(&enforcement, ENFORCE_COUNTING, &allowed, VERDICT_PASS);
                let dropped = per_packet(&enforcement, ENFORCE, &spoofed, VERDICT_DROP);
                [empty, floor, allowed_cost, counted, dropped]
            })
            .collect();
        let column = |i: usize| median(rounds.iter().map(|r| r[i]).collect());
        let ratio = |i: usize| median(rounds.iter().map(|r| r[i] / r[0]).collect());
        println!(
            "{entries:>8} {:>6.0} {:>6.0} {:>8.0} {:>8.0} {:>8.0} {:>11.2}x {:>13.2}x {:>13.2}x {:>13.2}x",
            column(0),
            column(1),
            column(2),
            column(3),
            column(4),
            ratio(1),
            ratio(2),
            ratio(3),
            ratio(4)
        );
    }
    drop(enforcement);
}
