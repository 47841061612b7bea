//! Per-packet cost of the enforcement program with BPF_PROG_TEST_RUN (1,000,000 repeats, best of several
//! runs), for the allowed path and the drop path, against an empty TC program measured in the same run, with
//! 10, 1,000 and 100,000 endpoint entries in the map. Needs root (run by `cargo xtask bench`).

use std::{
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::Duration,
};

use poolwarden::dataplane::enforcement::{
    ENFORCE, EndpointSpec, Enforcement, PASS, VERDICT_DROP, VERDICT_PASS, frames,
};

const REPEAT: u32 = 1_000_000;
const RUNS: usize = 7;

fn best(enforcement: &Enforcement, program: &str, frame: &[u8], want: u32) -> Duration {
    (0..RUNS)
        .map(|_| {
            let (verdict, per_run) = enforcement.run(program, frame, REPEAT).expect("BPF_PROG_TEST_RUN");
            assert_eq!(verdict, want, "{program} gave the wrong verdict");
            per_run
        })
        .min()
        .unwrap_or_default()
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

    println!("\nenforcement program, BPF_PROG_TEST_RUN, {REPEAT} repeats, best of {RUNS} runs (ns per packet)");
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>14} {:>14}",
        "entries", "empty", "allowed", "dropped", "allowed/empty", "dropped/empty"
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
        let empty = best(&enforcement, PASS, &allowed, VERDICT_PASS);
        let pass = best(&enforcement, ENFORCE, &allowed, VERDICT_PASS);
        let drop = best(&enforcement, ENFORCE, &spoofed, VERDICT_DROP);
        let ns = |d: Duration| d.as_nanos() as f64;
        println!(
            "{entries:>10} {:>10.0} {:>10.0} {:>10.0} {:>13.2}x {:>13.2}x",
            ns(empty),
            ns(pass),
            ns(drop),
            ns(pass) / ns(empty).max(1.0),
            ns(drop) / ns(empty).max(1.0)
        );
    }
    drop(enforcement);
}
