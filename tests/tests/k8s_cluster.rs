//! poolwarden on a real Kubernetes (`cargo xtask cluster up` and `install`: kube-apiserver, kubelet and
//! containerd built from their sources, poolwarden's DaemonSet applied from deploy/): the seed's example as its
//! text runs it, with kubectl.
//!
//! `cargo xtask test` brings the cluster up after the other tests, runs this file with
//! `POOLWARDEN_CLUSTER` set to the cluster's directory, and takes it down. Without that variable these tests
//! skip (unless `POOLWARDEN_REQUIRE_CLUSTER` is set, when they fail).

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The cluster's directory (target/cluster), when one is up for these tests.
fn cluster() -> Option<PathBuf> {
    match std::env::var_os("POOLWARDEN_CLUSTER") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            assert!(
                std::env::var_os("POOLWARDEN_REQUIRE_CLUSTER").is_none(),
                "POOLWARDEN_CLUSTER is not set: run through cargo xtask test, which brings the cluster up"
            );
            eprintln!("SKIPPED: no cluster (cargo xtask test brings one up and runs these tests)");
            None
        }
    }
}

struct Kubectl {
    binary: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn new(dir: &std::path::Path) -> Self {
        Self { binary: dir.join("../k8s/bin/kubectl"), kubeconfig: dir.join("admin.kubeconfig") }
    }

    /// Run kubectl in the control plane's namespace: (success, stdout, stderr).
    fn run(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", "pwk-cp"])
            .arg(&self.binary)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        if let Some(text) = stdin {
            child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write stdin");
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("kubectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, None)
    }

    fn ok_with(&self, args: &[&str], stdin: Option<&str>) -> String {
        let (ok, out, err) = self.run(args, stdin);
        assert!(ok, "kubectl {args:?}: {err}{out}");
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&all)).expect("kubectl JSON")
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn in_cidr(ip: &str, network: [u8; 4], prefix: u32) -> bool {
    let Ok(ip) = ip.parse::<std::net::Ipv4Addr>() else { return false };
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(ip) & mask == u32::from(std::net::Ipv4Addr::from(network)) & mask
}

/// The seed's example, step by step as its text runs it: pools applied, two namespaces created and annotated
/// (poolwarden's key for one, Calico's for the other), three replicas in each; every pod on an address of its
/// namespace's pool and answering HTTP from it; a pod of a third namespace that names the bound pool stays in
/// ContainerCreating with an event naming the pool and the rule.
#[test]
fn the_seed_example_with_kubectl() {
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    // Step 1: the pools, through the agent (it holds the datastore), with external-pool bound to external-ns.
    let seed = include_str!("../../examples/seed-pools.yaml").replacen(
        "  natOutgoing: true",
        "  natOutgoing: true\n  allowedNamespaces: [external-ns]",
        1,
    );
    let applied = kubectl.ok_with(
        &["-n", "kube-system", "exec", "-i", "ds/poolwarden", "-c", "agent", "--", "poolwarden", "apply", "-f", "-"],
        Some(&seed),
    );
    assert!(applied.contains("ippool/external-pool") && applied.contains("ippool/internal-pool"), "{applied}");

    // Step 2: namespaces and their annotations.
    for (namespace, key, pool) in [
        ("external-ns", "poolwarden.io/ipv4pools", "external-pool"),
        ("internal-ns", "cni.projectcalico.org/ipv4pools", "internal-pool"),
        ("third-ns", "poolwarden.io/ipv4pools", "external-pool"),
    ] {
        kubectl.ok(&["create", "namespace", namespace]);
        kubectl.ok(&["annotate", "namespace", namespace, &format!("{key}=[\"{pool}\"]")]);
    }

    // Step 3: three replicas of a small HTTP server in each.
    let server = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www";
    for namespace in ["external-ns", "internal-ns"] {
        kubectl.ok(&[
            "create",
            "deployment",
            "web",
            "--namespace",
            namespace,
            "--image",
            "pwk.invalid/busybox:1",
            "--replicas",
            "3",
            "--",
            "/bin/sh",
            "-c",
            server,
        ]);
    }
    for namespace in ["external-ns", "internal-ns"] {
        kubectl.ok(&["-n", namespace, "wait", "--for=condition=Available", "deployment/web", "--timeout=180s"]);
    }
    println!("{}", kubectl.ok(&["get", "pods", "-o", "wide", "-A", "-l", "app=web"]));
    let mut seen = std::collections::BTreeSet::new();
    for (namespace, network, prefix) in [("external-ns", [172, 16, 0, 0], 26), ("internal-ns", [192, 168, 0, 0], 16)] {
        let pods = kubectl.json(&["-n", namespace, "get", "pods", "-l", "app=web"]);
        let items = pods["items"].as_array().expect("items");
        assert_eq!(items.len(), 3, "{namespace}: {pods}");
        for pod in items {
            let name = pod["metadata"]["name"].as_str().expect("name");
            let ip = pod["status"]["podIP"].as_str().unwrap_or_default();
            assert!(in_cidr(ip, network, prefix), "{namespace}/{name} is on {ip:?}, not its pool");
            assert!(seen.insert(ip.to_string()), "{ip} given twice");
            // Each answers over HTTP from its address (asked from the node, where its route is).
            let url = format!("http://{ip}:8080/");
            let answered = (0..20).any(|_| {
                let out = Command::new("ip")
                    .args(["netns", "exec", "pwk-node1", "curl", "-s", "--max-time", "2", &url])
                    .output()
                    .expect("curl");
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                if text.trim() == name {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(500));
                false
            });
            assert!(answered, "{namespace}/{name} did not answer from {ip}");
        }
    }

    // A pod of the third namespace names the bound pool: refused, and the event says why.
    kubectl.ok(&[
        "run",
        "intruder",
        "--namespace",
        "third-ns",
        "--image",
        "pwk.invalid/busybox:1",
        "--",
        "/bin/sh",
        "-c",
        "sleep 3600",
    ]);
    let mut event = String::new();
    wait_for("the refused pod's event", Duration::from_secs(60), || {
        let events =
            kubectl.json(&["-n", "third-ns", "get", "events", "--field-selector", "reason=FailedCreatePodSandBox"]);
        event = events["items"][0]["message"].as_str().unwrap_or_default().to_string();
        !event.is_empty()
    });
    assert!(
        event.contains("pool \"external-pool\"")
            && event.contains("refuses namespace \"third-ns\"")
            && event.contains("allowedNamespaces"),
        "{event}"
    );
    let pod = kubectl.json(&["-n", "third-ns", "get", "pod", "intruder"]);
    assert_eq!(pod["status"]["phase"], "Pending", "{pod}");
    assert_eq!(
        pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"], "ContainerCreating",
        "{}",
        pod["status"]
    );
    let described = kubectl.ok(&["-n", "third-ns", "describe", "pod", "intruder"]);
    assert!(described.contains("external-pool"), "{described}");

    for namespace in ["external-ns", "internal-ns", "third-ns"] {
        kubectl.ok(&["delete", "namespace", namespace, "--wait=true", "--timeout=120s"]);
    }
}

/// A pod that sends from an address that is not its own (from inside its container, after adding the address
/// to its interface) gets those packets dropped, and the drop shows in `poolwarden_dropped_packets_total` as a
/// Prometheus on another host scrapes it (from the control plane's namespace, over the nodes' network).
#[test]
fn a_spoofing_pod_is_dropped_and_counted_on_the_metrics_endpoint() {
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    let pool = "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: spoof-pool}\nspec:\n  cidr: 10.77.0.0/28\n  blockSize: 28\n  allowedNamespaces: [spoof-ns]\n";
    kubectl.ok_with(
        &["-n", "kube-system", "exec", "-i", "ds/poolwarden", "-c", "agent", "--", "poolwarden", "apply", "-f", "-"],
        Some(pool),
    );
    kubectl.ok(&["create", "namespace", "spoof-ns"]);
    kubectl.ok(&["annotate", "namespace", "spoof-ns", "poolwarden.io/ipv4pools=[\"spoof-pool\"]"]);
    let pod = r#"
apiVersion: v1
kind: Pod
metadata: {name: spoofer, namespace: spoof-ns}
spec:
  containers:
    - name: spoofer
      image: pwk.invalid/busybox:1
      securityContext: {privileged: true}
      command: ["/bin/sh", "-c", "ip address add 10.99.99.99/32 dev eth0 && while true; do ping -c 1 -W 1 -I 10.99.99.99 10.250.0.11; sleep 1; done"]
"#;
    kubectl.ok_with(&["apply", "-f", "-"], Some(pod));
    kubectl.ok(&["-n", "spoof-ns", "wait", "--for=condition=Ready", "pod/spoofer", "--timeout=120s"]);
    let scraped = |url: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", "pwk-cp", "curl", "-s", "--max-time", "3", url])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut line = String::new();
    wait_for("the spoofed packets to be counted", Duration::from_secs(60), || {
        let metrics = scraped("http://10.250.0.11:9641/metrics");
        line = metrics
            .lines()
            .find(|l| {
                l.starts_with("poolwarden_dropped_packets_total{")
                    && l.contains("pool=\"spoof-pool\"")
                    && l.contains("reason=\"spoofed_ipv4\"")
            })
            .unwrap_or_default()
            .to_string();
        line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v > 0.0)
    });
    println!("{line}");
    // The pod's own address still works: the node answers its ping.
    let ip = kubectl.json(&["-n", "spoof-ns", "get", "pod", "spoofer"])["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(in_cidr(&ip, [10, 77, 0, 0], 28), "{ip}");
    let (ok, out, err) = kubectl.run(
        &["-n", "spoof-ns", "exec", "spoofer", "--", "ping", "-c", "1", "-W", "2", "-I", &ip, "10.250.0.11"],
        None,
    );
    assert!(ok, "the pod's own address is cut off: {out}{err}");
    kubectl.ok(&["delete", "namespace", "spoof-ns", "--wait=true", "--timeout=120s"]);
}
