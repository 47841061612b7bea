//! poolwarden on a real Kubernetes (`cargo xtask cluster up` and `install`: kube-apiserver, kubelet and
//! containerd built from their sources, poolwarden's DaemonSet applied from deploy/): the seed's example as its
//! text runs it, with kubectl.
//!
//! `cargo xtask test` brings the cluster up after the other tests, runs this file with
//! `POOLWARDEN_CLUSTER` set to the cluster's directory, and takes it down. Without that variable these tests
//! skip (unless `POOLWARDEN_REQUIRE_CLUSTER` is set, when they fail).

mod kill_points;

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

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
    // Step 1: the pools, as resources (`kubectl apply -f examples/`), then external-pool bound to external-ns.
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/");
    let applied = kubectl.ok(&["apply", "-f", examples]);
    assert!(
        applied.contains("ippool.poolwarden.io/external-pool")
            && applied.contains("ippool.poolwarden.io/internal-pool"),
        "{applied}"
    );
    kubectl.ok(&[
        "patch",
        "ippool",
        "external-pool",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"allowedNamespaces":["external-ns"]}}"#,
    ]);
    for pool in ["external-pool", "internal-pool"] {
        let (ready, reason, message) = verdict(&kubectl, pool, Duration::from_secs(60));
        assert!(ready, "{pool} is not ready: {reason}: {message}");
    }

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

    // `kubectl get ippools` shows what each pool holds: three pods each (the status is refreshed by the agent
    // that holds the pools' lease).
    wait_for("three addresses used in each pool", Duration::from_secs(60), || {
        let used = |pool: &str| kubectl.json(&["get", "ippool", pool])["status"]["used"].as_u64();
        used("external-pool") == Some(3) && used("internal-pool") == Some(3)
    });
    // Read after the counts are in (a table read before them would show the previous status).
    let table = kubectl.ok(&["get", "ippools"]);
    println!("{table}");
    let row = |pool: &str| table.lines().find(|l| l.starts_with(pool)).unwrap_or_default().to_string();
    assert!(row("external-pool").contains("172.16.0.0/26") && row("external-pool").contains("4.6%"), "{table}");
    assert!(row("internal-pool").contains("192.168.0.0/16") && row("internal-pool").contains("0.0%"), "{table}");
    let status = &kubectl.json(&["get", "ippool", "external-pool"])["status"];
    assert_eq!((status["free"].as_u64(), status["blockSize"].as_u64()), (Some(61), Some(29)), "{status}");

    // Through a Service (kube-proxy's NAT on the node): answered by a pod of the deployment.
    kubectl.ok(&["-n", "external-ns", "expose", "deployment/web", "--port=80", "--target-port=8080"]);
    let service_ip = kubectl.json(&["-n", "external-ns", "get", "service", "web"])["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let names: Vec<String> = kubectl.json(&["-n", "external-ns", "get", "pods", "-l", "app=web"])["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap_or_default().to_string())
        .collect();
    let mut answer = String::new();
    wait_for("an answer through the Service", Duration::from_secs(30), || {
        let out = Command::new("ip")
            .args(["netns", "exec", "pwk-node2", "curl", "-s", "--max-time", "2", &format!("http://{service_ip}/")])
            .output()
            .expect("curl");
        answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        names.contains(&answer)
    });
    println!("service {service_ip} answered by {answer}");

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
    // The spoofer's node's agent counts its drops.
    let node = kubectl.json(&["-n", "spoof-ns", "get", "pod", "spoofer"])["status"]["hostIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut line = String::new();
    wait_for("the spoofed packets to be counted", Duration::from_secs(60), || {
        let metrics = scraped(&format!("http://{node}:9641/metrics"));
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

/// The `Ready` condition of pool `name` for its current generation, waited for up to `limit`:
/// (ready, reason, message).
fn verdict(kubectl: &Kubectl, name: &str, limit: Duration) -> (bool, String, String) {
    let mut found = None;
    wait_for(&format!("the agents' verdict on IPPool {name}"), limit, || {
        let pool = kubectl.json(&["get", "ippool", name]);
        let generation = pool["metadata"]["generation"].as_i64();
        found = pool["status"]["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Ready")).and_then(
            |c| {
                (c["observedGeneration"].as_i64() == generation).then(|| {
                    let text = |field: &str| c[field].as_str().unwrap_or_default().to_string();
                    (c["status"] == "True", text("reason"), text("message"))
                })
            },
        );
        found.is_some()
    });
    found.expect("waited for")
}

/// Pools as resources, as the agents treat them on their default, the Kubernetes datastore: of two
/// overlapping pools the later is refused (and taken once the first is gone), `poolwarden apply` in an
/// agent's container judges as the agents will, writes resources and fails on a refusal, a deleted pool stays
/// disabled while an address is allocated from it and goes with the last; then on etcd, a pool that only
/// the datastore had gets a resource.
#[test]
fn pool_resources_are_judged_kept_while_used_and_adopted_by_the_agents() {
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    let pool = |name: &str, cidr: &str| {
        format!(
            "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {{cidr: {cidr}, blockSize: 29}}\n"
        )
    };

    // Overlap: the API server takes both; the agents refuse the later one, naming the first.
    kubectl.ok_with(&["apply", "-f", "-"], Some(&pool("ov-first", "10.120.0.0/24")));
    assert!(verdict(&kubectl, "ov-first", Duration::from_secs(60)).0);
    kubectl.ok_with(&["apply", "-f", "-"], Some(&pool("ov-second", "10.120.0.0/25")));
    let (ready, reason, message) = verdict(&kubectl, "ov-second", Duration::from_secs(60));
    assert!(!ready && reason == "Overlap" && message.contains("overlaps pool \"ov-first\""), "{reason}: {message}");
    let stored = agent_cli(&kubectl, &["get", "pools"]);
    assert!(stored.contains("ov-first") && !stored.contains("ov-second"), "{stored}");
    // poolwarden apply judges before writing: refused, nothing written.
    let (ok, out, err) = in_agent(&kubectl, &["apply", "-f", "-"], Some(&pool("ov-third", "10.120.0.128/25")));
    assert!(!ok && err.contains("overlaps pool \"ov-first\""), "{out}{err}");
    let (exists, _, _) = kubectl.run(&["get", "ippool", "ov-third"], None);
    assert!(!exists, "a refused pool was written");
    // The first goes: the second is taken (its generation is the same, so wait for the verdict to turn).
    kubectl.ok(&["delete", "ippool", "ov-first", "--timeout=60s"]);
    wait_for("ov-second to be taken once ov-first is gone", Duration::from_secs(60), || {
        verdict(&kubectl, "ov-second", Duration::from_secs(10)).0
    });
    assert!(agent_cli(&kubectl, &["get", "pools"]).contains("ov-second"));
    kubectl.ok(&["delete", "ippool", "ov-second", "--timeout=60s"]);

    // poolwarden apply writes the resource, and the pool serves a namespace.
    pool_for_namespace(&kubectl, "fin-pool", "10.121.0.0/28", 29, "fin-ns");
    let written = kubectl.json(&["get", "ippool", "fin-pool"]);
    assert_eq!(written["spec"]["cidr"], "10.121.0.0/28", "{written}");
    pod_on(&kubectl, "fin-ns", "holder", "pwk-node1", "sleep 3600");
    kubectl.ok(&["-n", "fin-ns", "wait", "--for=condition=Ready", "pod/holder", "--timeout=120s"]);
    // Deleted while its address is in use: kept, disabled, saying why.
    kubectl.ok(&["delete", "ippool", "fin-pool", "--wait=false"]);
    let (ready, reason, message) = verdict(&kubectl, "fin-pool", Duration::from_secs(60));
    assert!(!ready && reason == "Deleting" && message.contains("1 allocated address"), "{reason}: {message}");
    let stored = agent_cli(&kubectl, &["get", "pools", "fin-pool", "-o", "yaml"]);
    assert!(stored.contains("disabled: true"), "{stored}");
    // The pod goes: so does the pool, from the datastore and the API.
    kubectl.ok(&["-n", "fin-ns", "delete", "pod", "holder", "--wait=true", "--timeout=120s"]);
    kubectl.ok(&["wait", "--for=delete", "ippool/fin-pool", "--timeout=90s"]);
    let stored = agent_cli(&kubectl, &["get", "pools"]);
    assert!(!stored.contains("fin-pool"), "{stored}");
    kubectl.ok(&["delete", "namespace", "fin-ns", "--wait=true", "--timeout=120s"]);

    // poolwarden apply makes the resource's spec the document's, whoever wrote it before: kubectl's
    // natOutgoing: true goes when the document has none.
    kubectl.ok_with(
        &["apply", "-f", "-"],
        Some("apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: nat-pool}\nspec: {cidr: 10.124.0.0/24, blockSize: 29, natOutgoing: true}\n"),
    );
    assert!(verdict(&kubectl, "nat-pool", Duration::from_secs(60)).0);
    assert!(agent_cli(&kubectl, &["get", "pools", "nat-pool", "-o", "yaml"]).contains("natOutgoing: true"));
    apply_pools(&kubectl, &pool("nat-pool", "10.124.0.0/24"));
    let spec = kubectl.json(&["get", "ippool", "nat-pool"])["spec"].clone();
    assert!(spec.get("natOutgoing").is_none(), "{spec}");
    let stored = agent_cli(&kubectl, &["get", "pools", "nat-pool", "-o", "yaml"]);
    assert!(!stored.contains("natOutgoing"), "{stored}");
    // delete pool --force would only remove the datastore's copy: refused; without it, the resource goes.
    let (ok, out, err) = in_agent(&kubectl, &["delete", "pool", "nat-pool", "--force"], None);
    assert!(!ok && err.contains("is a Kubernetes resource"), "{out}{err}");
    agent_cli(&kubectl, &["delete", "pool", "nat-pool"]);
    kubectl.ok(&["wait", "--for=delete", "ippool/nat-pool", "--timeout=60s"]);

    // Calico's YAML through poolwarden apply: the same resource as poolwarden's own document.
    let calico = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: calico-pool}\nspec:\n  \
                  cidr: 10.125.0.0/24\n  blockSize: 29\n  ipipMode: Always\n  natOutgoing: true\n";
    let (ok, out, err) = in_agent(&kubectl, &["apply", "-f", "-"], Some(calico));
    assert!(ok && out.contains("ippool/calico-pool created"), "{out}{err}");
    let spec = kubectl.json(&["get", "ippool", "calico-pool"])["spec"].clone();
    assert_eq!(
        spec,
        json!({"cidr": "10.125.0.0/24", "blockSize": 29, "ipipMode": "Always", "natOutgoing": true}),
        "Calico's pool as a resource"
    );
    let own = "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: calico-pool}\nspec: {cidr: 10.125.0.0/24, \
               blockSize: 29, ipipMode: Always, natOutgoing: true}\n";
    let (ok, out, err) = in_agent(&kubectl, &["apply", "-f", "-"], Some(own));
    assert!(ok && out.contains("ippool/calico-pool unchanged"), "{out}{err}");
    agent_cli(&kubectl, &["delete", "pool", "calico-pool"]);
    kubectl.ok(&["wait", "--for=delete", "ippool/calico-pool", "--timeout=60s"]);

    // The IPAMConfig resource: copied, and its deletion puts the defaults back.
    kubectl.ok_with(
        &["apply", "-f", "-"],
        Some("apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {emptyBlockGraceSeconds: 600}\n"),
    );
    wait_for("the IPAMConfig in the datastore", Duration::from_secs(30), || {
        agent_cli(&kubectl, &["get", "ipamconfig", "-o", "yaml"]).contains("emptyBlockGraceSeconds: 600")
    });
    kubectl.ok(&["delete", "ipamconfig", "default", "--timeout=60s"]);
    let config = agent_cli(&kubectl, &["get", "ipamconfig", "-o", "yaml"]);
    assert!(config.contains("emptyBlockGraceSeconds: 300"), "{config}");

    // With the agents on etcd (pools copied from the resources into it): a pool only the datastore has
    // (written with the datastore as the source) gets a resource; deleting that resource takes the pool out
    // of the datastore, even when the delete comes at once, before the lease holder's next pass (three
    // times, since that window is a quarter of a second).
    let _agents = OnEtcdDatastore::switch(&kubectl);
    for round in 1..=3 {
        let name = format!("adopted-{round}");
        let (ok, out, err) = in_agent(
            &kubectl,
            &["--pool-source", "datastore", "apply", "-f", "-"],
            Some(&pool(&name, "10.122.0.0/28")),
        );
        assert!(ok, "{out}{err}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let adopted: Value = loop {
            let (exists, out, _) = kubectl.run(&["get", "ippool", &name, "-o", "json"], None);
            if exists {
                break serde_json::from_str(&out).unwrap_or_default();
            }
            assert!(Instant::now() < deadline, "timed out waiting for a resource for the pool only the datastore had");
        };
        kubectl.ok(&["delete", "ippool", &name, "--timeout=60s"]);
        assert_eq!(adopted["metadata"]["annotations"]["poolwarden.io/adopted-from"], "datastore", "{adopted}");
        assert_eq!(adopted["spec"]["cidr"], "10.122.0.0/28", "{adopted}");
        let stored = agent_cli(&kubectl, &["get", "pools"]);
        assert!(!stored.contains(&name), "round {round}: {stored}");
    }
}

/// The pools' lease holder stalls (its agent stopped with SIGSTOP, as a node under memory pressure or a
/// stuck process would): within the lease's duration the other node's agent takes over and a new pool is
/// judged; the stalled agent, resumed, does not take the lease back or undo anything.
#[test]
fn the_pools_are_taken_over_when_the_lease_holder_stalls() {
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    let holder = || {
        kubectl.json(&["-n", "kube-system", "get", "lease", "poolwarden-pools"])["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let first = holder();
    assert!(first.starts_with("pwk-node"), "lease holder {first:?}");
    let pid = agent_pid(&first);
    let stalled_at = Instant::now();
    {
        let _stopped = Stopped::new(pid);
        kubectl.ok_with(
            &["apply", "-f", "-"],
            Some(
                "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: takeover}\nspec: {cidr: 10.123.0.0/24}\n",
            ),
        );
        let (ready, reason, message) = verdict(&kubectl, "takeover", Duration::from_secs(40));
        assert!(ready, "{reason}: {message}");
        let second = holder();
        assert!(second != first && second.starts_with("pwk-node"), "lease still with {second:?}");
        println!("{first} stopped; {second} took the lease and judged the pool after {:?}", stalled_at.elapsed());
    }
    // Resumed: it finds the lease taken and stays out; the pool stays.
    std::thread::sleep(Duration::from_secs(12));
    assert_ne!(holder(), first, "the resumed agent took the lease back");
    let (ready, reason, message) = verdict(&kubectl, "takeover", Duration::from_secs(10));
    assert!(ready, "{reason}: {message}");
    assert!(agent_cli(&kubectl, &["get", "pools"]).contains("takeover"));
    kubectl.ok(&["delete", "ippool", "takeover", "--timeout=60s"]);
}

/// At rest (no pod coming or going, no pool changing), what each agent asks the API server, from its own count
/// (`poolwarden_kubernetes_requests_total` on its metrics endpoint), per minute over a window: printed by verb and
/// resource. An agent that does not hold the pools' lease follows it by a watch, so it reads nothing on a
/// timer (a DaemonSet's followers are as many as the cluster's nodes); the holder renews with one update, no read.
/// One window of three in a row must be clean: a timer shows in each, what earlier tests left to finish does not.
#[test]
fn at_rest_the_agents_follow_by_watches_and_poll_nothing() {
    const WINDOW: Duration = Duration::from_secs(40);
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    let holder = lease_holder(&kubectl);
    let agents = running_agents(&kubectl);
    let counts = request_counts;
    // At rest first: what earlier tests left behind (a namespace still being deleted, its pods' addresses
    // released, the pools' counts following in their status) settles, until for 15 s in a row nothing but
    // watches and the Lease's renewals is asked.
    let changes = |before: &[std::collections::BTreeMap<(String, String), f64>],
                   after: &[std::collections::BTreeMap<(String, String), f64>]| {
        let mut moved = Vec::new();
        for (b, a) in before.iter().zip(after) {
            for (kind, n) in a {
                let routine = kind.0 == "watch" || (kind.0 == "update" && kind.1 == "leases");
                if !routine && *n > b.get(kind).copied().unwrap_or(0.0) {
                    moved.push(kind.clone());
                }
            }
        }
        moved
    };
    let mut before: Vec<_> = agents.iter().map(|(_, ip)| counts(ip)).collect();
    assert!(before.iter().all(|c| !c.is_empty()), "an agent shows no request count: {before:?}");
    let (deadline, mut quiet_since) = (Instant::now() + Duration::from_secs(180), Instant::now());
    while quiet_since.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_secs(5));
        let now: Vec<_> = agents.iter().map(|(_, ip)| counts(ip)).collect();
        let moved = changes(&before, &now);
        assert!(Instant::now() < deadline, "the agents did not come to rest in 3 minutes: still asking {moved:?}");
        if !moved.is_empty() {
            quiet_since = Instant::now();
        }
        before = now;
    }
    // A timer shows in every window; what an earlier test left behind (a deleted pool's blocks going back
    // one by one, a namespace's pods leaving) is done by the next one. Up to three windows, one clean.
    let per_minute = 60.0 / WINDOW.as_secs_f64();
    let mut last_polled = Vec::new();
    for window in 1..=3 {
        std::thread::sleep(WINDOW);
        let after: Vec<_> = agents.iter().map(|(_, ip)| counts(ip)).collect();
        let mut polled_here = Vec::new();
        for ((node, _), (before, after)) in agents.iter().zip(before.iter().zip(&after)) {
            let role = if *node == holder { "holds the pools' lease" } else { "follows the lease" };
            let moved: Vec<((String, String), f64)> = after
                .iter()
                .map(|(kind, n)| (kind.clone(), (n - before.get(kind).copied().unwrap_or(0.0)) * per_minute))
                .filter(|(_, rate)| *rate > 0.0)
                .collect();
            let total = moved.iter().fold(0.0, |sum, (_, rate)| sum + rate);
            println!("window {window}: {node} ({role}): {total:.1} requests per minute at rest");
            for ((verb, resource), rate) in &moved {
                println!("    {verb:>8} {resource:<24} {rate:.1}/min");
            }
            let polled: Vec<((String, String), f64)> = moved
                .iter()
                .filter(|((verb, resource), _)| verb != "watch" && !(*node == holder && resource == "leases"))
                .cloned()
                .collect();
            if !polled.is_empty() {
                polled_here.push(format!("{node} ({role}): {polled:?}"));
            }
            if *node == holder {
                let renewals = moved.iter().find(|((v, r), _)| v == "update" && r == "leases").map_or(0.0, |(_, n)| *n);
                assert!(renewals > 0.0, "the holder {node} did not renew the lease");
            }
        }
        if polled_here.is_empty() {
            return;
        }
        last_polled = polled_here;
        before = after;
    }
    panic!(
        "the agents ask the API server on a timer at rest, in three windows of {WINDOW:?} in a row: {last_polled:?}"
    );
}

/// The node whose agent holds the pools' Lease.
fn lease_holder(kubectl: &Kubectl) -> String {
    kubectl.json(&["-n", "kube-system", "get", "lease", "poolwarden-pools"])["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The Running agents' nodes and host addresses (where their metrics listen): two. Running ones only: a test's
/// kubelet-less Node objects (and the DaemonSet's pods for them, Pending until the objects' deletion is
/// noticed) may still be about.
fn running_agents(kubectl: &Kubectl) -> Vec<(String, String)> {
    let pods = kubectl.json(&["-n", "kube-system", "get", "pods", "-l", "app.kubernetes.io/name=poolwarden"]);
    let agents: Vec<(String, String)> = pods["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|p| p["status"]["phase"] == "Running")
        .map(|p| {
            let field = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (field(&p["spec"]["nodeName"]), field(&p["status"]["hostIP"]))
        })
        .collect();
    assert_eq!(agents.len(), 2, "{pods}");
    agents
}

/// The Kubernetes API requests an agent made so far, by verb and resource, from its metrics endpoint at `ip`.
fn request_counts(ip: &str) -> std::collections::BTreeMap<(String, String), f64> {
    let out = Command::new("ip")
        .args(["netns", "exec", "pwk-cp", "curl", "-s", "--max-time", "3"])
        .arg(format!("http://{ip}:9641/metrics"))
        .output()
        .expect("curl");
    poolwarden_tests::api_requests(&String::from_utf8_lossy(&out.stdout))
}

/// A deleted IPPool that another controller's finalizer keeps after poolwarden released its own is not
/// poolwarden's any more: the lease holder's passes (every 5 s, and on every change) neither list the
/// IPAMBlocks again to release it nor read the retired pools' record again for it. Up to three windows of
/// 30 s, one clean: another test's leftovers may ask for a while, a pass that judges this pool again asks in
/// every window. One whose poolwarden finalizer was removed by hand still gets its retirement recorded, once
/// nothing is allocated from it.
#[test]
fn a_deleted_pool_kept_by_another_finalizer_is_left_alone() {
    const WINDOW: Duration = Duration::from_secs(30);
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    kubectl.ok_with(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: kept-pool, finalizers: [example.com/keep]}\n\
             spec: {cidr: 10.143.0.0/24, blockSize: 29}\n",
        ),
    );
    assert!(verdict(&kubectl, "kept-pool", Duration::from_secs(60)).0);
    kubectl.ok(&["delete", "ippool", "kept-pool", "--wait=false"]);
    wait_for("poolwarden's finalizer on kept-pool to be released", Duration::from_secs(60), || {
        kubectl.json(&["get", "ippool", "kept-pool"])["metadata"]["finalizers"] == json!(["example.com/keep"])
    });
    let holder = lease_holder(&kubectl);
    let (_, ip) = running_agents(&kubectl).into_iter().find(|(node, _)| *node == holder).expect("the holder runs");
    let watched = [("list", "ipamblocks"), ("get", "configmaps")];
    let asked = |before: &std::collections::BTreeMap<(String, String), f64>,
                 after: &std::collections::BTreeMap<(String, String), f64>| {
        watched
            .iter()
            .map(|(verb, resource)| {
                let kind = (verb.to_string(), resource.to_string());
                (kind.clone(), after.get(&kind).copied().unwrap_or(0.0) - before.get(&kind).copied().unwrap_or(0.0))
            })
            .filter(|(_, n)| *n > 0.0)
            .collect::<Vec<_>>()
    };
    let mut before = request_counts(&ip);
    let mut seen = Vec::new();
    for window in 1..=3 {
        std::thread::sleep(WINDOW);
        let after = request_counts(&ip);
        seen = asked(&before, &after);
        println!("window {window}: the holder {holder} asked {seen:?}");
        if seen.is_empty() {
            break;
        }
        before = after;
    }
    // The other finalizer goes: so does the resource.
    kubectl.ok(&["patch", "ippool", "kept-pool", "--type=merge", "-p", r#"{"metadata":{"finalizers":null}}"#]);
    kubectl.ok(&["wait", "--for=delete", "ippool/kept-pool", "--timeout=60s"]);
    assert!(
        seen.is_empty(),
        "the holder {holder} kept asking for a pool it released, three windows of {WINDOW:?}: {seen:?}"
    );

    // poolwarden's finalizer removed by hand from a deleted pool still in use, another's keeping the resource:
    // the pool's retirement is recorded once its last address goes (so every firewall export empties its
    // set), not before.
    pool_for_namespace(&kubectl, "bare-pool", "10.144.0.0/28", 29, "bare-ns");
    pod_on(&kubectl, "bare-ns", "holder", "pwk-node1", "sleep 3600");
    kubectl.ok(&["-n", "bare-ns", "wait", "--for=condition=Ready", "pod/holder", "--timeout=120s"]);
    let finalizers = |list: Value| json!({"metadata": {"finalizers": list}}).to_string();
    kubectl.ok(&[
        "patch",
        "ippool",
        "bare-pool",
        "--type=merge",
        "-p",
        &finalizers(json!(["poolwarden.io/addresses", "example.com/keep"])),
    ]);
    kubectl.ok(&["delete", "ippool", "bare-pool", "--wait=false"]);
    let (ready, reason, _) = verdict(&kubectl, "bare-pool", Duration::from_secs(60));
    assert!(!ready && reason == "Deleting", "{reason}");
    kubectl.ok(&["patch", "ippool", "bare-pool", "--type=merge", "-p", &finalizers(json!(["example.com/keep"]))]);
    let retired = || {
        let (_, out, _) =
            kubectl.run(&["-n", "kube-system", "get", "configmap", "poolwarden-retired-pools", "-o", "json"], None);
        serde_json::from_str::<Value>(&out).unwrap_or_default()["data"]["bare-pool"].clone()
    };
    std::thread::sleep(Duration::from_secs(20));
    assert_ne!(retired(), json!("10.144.0.0/28"), "recorded as retired while an address is allocated from it");
    kubectl.ok(&["-n", "bare-ns", "delete", "pod", "holder", "--wait=true", "--timeout=120s"]);
    wait_for("bare-pool's retirement to be recorded", Duration::from_secs(60), || retired() == json!("10.144.0.0/28"));
    kubectl.ok(&["patch", "ippool", "bare-pool", "--type=merge", "-p", &finalizers(Value::Null)]);
    kubectl.ok(&["wait", "--for=delete", "ippool/bare-pool", "--timeout=60s"]);
    kubectl.ok(&["delete", "namespace", "bare-ns", "--wait=true", "--timeout=120s"]);
}

/// The PID of the agent process serving `node` (its container's, read from /proc: NODENAME in its environment).
fn agent_pid(node: &str) -> u32 {
    let want = format!("NODENAME={node}");
    let found: Vec<u32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            args.first().is_some_and(|a| a.ends_with(b"poolwarden"))
                && args.get(1) == Some(&&b"agent"[..])
                && environ.split(|b| *b == 0).any(|v| v == want.as_bytes())
        })
        .collect();
    assert_eq!(found.len(), 1, "agent processes of {node}: {found:?}");
    found[0]
}

/// The object store's conformance suite (what the single-object allocator relies on: create once, update and
/// delete only at the version read, label-selected lists and watches, no lost update under racing writers)
/// against the real API server, on `ipamblocks.poolwarden.io` from deploy/crds.yaml. The suite runs on a thread
/// moved into the control plane's network namespace, where the API server listens.
#[test]
fn the_object_store_conformance_suite_passes_on_the_api_server() {
    on_the_api_server("the object store's conformance suite", |objects, run| {
        Box::pin(async move { poolwarden::objects::conformance::all(objects, &run).await })
    });
}

/// The single-object allocator's checks (claims, borrowing, a pool changed under a claim, fixed addresses,
/// three nodes at once) on IPAMBlock objects of the real API server.
#[test]
fn the_block_allocator_passes_its_checks_on_the_api_server() {
    on_the_api_server("the block allocator's checks", |objects, run| {
        Box::pin(async move { poolwarden::allocator::single::conformance::all(objects, &run).await })
    });
}

/// The Kubernetes datastore's pools: what `kubectl apply -f` writes, as the pools' lease holder judged it, is
/// what the block allocator allocates from (`ResourcePools` over the API server's IPPool and IPAMConfig
/// resources, IPAMBlock objects for the blocks): a ready pool gives addresses, a pool refused as overlapping
/// it is never seen, and once the ready one is deleted nothing more comes from it while what it gave is still
/// released.
#[test]
fn the_block_allocator_allocates_from_the_ippool_resources_as_judged() {
    use std::{collections::BTreeMap, sync::Arc};

    use poolwarden::{
        allocator::{
            AllocError, AssignRequest,
            single::{BlockAllocator, PoolSource},
        },
        ipam::{NamespaceInfo, NodeInfo},
        k8s::pools::ResourcePools,
        objects::{ObjectStore, kubernetes::KubeObjects},
        resources::ANNOTATION_IPV4_POOLS,
    };

    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    let _agents = OnEtcdDatastore::switch(&kubectl);
    let run = format!("r{}", std::process::id());
    let (ready, overlapping) = (format!("{run}-ready"), format!("{run}-overlapping"));
    // Bound to a namespace no pod is in: the agents judge the pools, and allocate nothing from them.
    let yaml = format!(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {{name: {ready}}}\nspec: {{cidr: 10.253.0.0/28, blockSize: 30, allowedNamespaces: [{run}]}}\n---\n\
apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {{name: {overlapping}}}\nspec: {{cidr: 10.253.0.0/29, blockSize: 30, allowedNamespaces: [{run}]}}\n"
    );
    let verdict = |name: &str| {
        let (found, out, _) = kubectl.run(&["get", "ippool", name, "-o", "json"], None);
        let object: Value = if found { serde_json::from_str(&out).expect("kubectl JSON") } else { Value::Null };
        let conditions = object["status"]["conditions"].as_array().cloned().unwrap_or_default();
        let ready = conditions.into_iter().find(|c| c["type"] == "Ready").unwrap_or(Value::Null);
        (found, ready["status"].as_str().map(str::to_string), ready["reason"].as_str().map(str::to_string))
    };
    // Applied one after the other: the older of two overlapping pools is the one kept.
    kubectl.ok_with(&["apply", "-f", "-"], Some(yaml.split("---").next().expect("the first pool")));
    wait_for("the pool judged ready", Duration::from_secs(60), || verdict(&ready).1.as_deref() == Some("True"));
    kubectl.ok_with(&["apply", "-f", "-"], Some(&yaml));
    wait_for("the overlapping pool refused", Duration::from_secs(60), || {
        verdict(&overlapping).2.as_deref() == Some("Overlap")
    });

    let kubeconfig = dir.join("admin.kubeconfig");
    let (deleted, released) = (std::sync::mpsc::channel::<()>(), std::sync::mpsc::channel::<()>());
    let (deleted_tx, deleted_rx) = deleted;
    let (released_tx, released_rx) = released;
    let thread_run = run.clone();
    let thread = std::thread::spawn(move || {
        let run = thread_run;
        kill_points::enter(std::path::Path::new(CONTROL_PLANE_NETNS));
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let client = poolwarden::k8s::connect(Some(&kubeconfig)).await.expect("a client of the API server");
            let pools = Arc::new(ResourcePools::start(client.clone()));
            let objects: Arc<dyn ObjectStore> = Arc::new(KubeObjects::new(client));
            let source: Arc<dyn PoolSource> = pools.clone();
            let allocator = BlockAllocator::new(objects, source);
            let loaded = pools.load().await.expect("the resources listed");
            let mine: Vec<(&str, bool)> = loaded
                .pools
                .iter()
                .filter(|p| p.name().starts_with(&run))
                .map(|p| (p.name(), p.spec.disabled))
                .collect();
            assert_eq!(mine, [(format!("{run}-ready").as_str(), false)], "the ready pool, not the refused one");
            let request = |handle: &str| {
                let mut namespace = NamespaceInfo::bare(&run);
                namespace.annotations.insert(ANNOTATION_IPV4_POOLS.into(), format!("[\"{run}-ready\"]"));
                AssignRequest {
                    handle: format!("{run}-{handle}"),
                    node: NodeInfo { name: format!("{run}-node"), labels: BTreeMap::new() },
                    namespace,
                    pod: None,
                    requested: Default::default(),
                    eligible: None,
                    attributes: BTreeMap::new(),
                }
            };
            let got = allocator.assign(&request("h0"), &loaded).await.expect("an address from the ready pool");
            assert_eq!(got[0].pool, format!("{run}-ready"));
            let std::net::IpAddr::V4(ip) = got[0].ip else { panic!("an IPv4 address: {got:?}") };
            assert!((0x0afd_0000..0x0afd_0010).contains(&u32::from(ip)), "in 10.253.0.0/28: {got:?}");
            let second = allocator.assign(&request("h1"), &loaded).await;
            assert!(second.is_ok(), "a second address: {second:?}");

            // The operator deletes the ready pool: once its resource is gone, nothing more comes from it.
            deleted_tx.send(()).expect("the test");
            let node = format!("{run}-node");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let now = pools.load().await.expect("the resources listed");
                if !now.pools.iter().any(|p| p.name() == format!("{run}-ready") && !p.spec.disabled) {
                    let after = allocator.assign(&request("h2"), &now).await;
                    assert!(matches!(after, Err(AllocError::Selection(_) | AllocError::Exhausted { .. })), "{after:?}");
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "the deleted pool is still given out from");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            for handle in ["h0", "h1"] {
                let ips = allocator.release_handle(&node, &format!("{run}-{handle}")).await.expect("release");
                assert_eq!(ips.len(), 1, "{handle}'s address released after its pool went");
            }
            let mut config = pools.load().await.expect("the resources listed").config;
            config.empty_block_grace_seconds = 0;
            assert_eq!(allocator.release_empty_blocks(&node, &config).await.expect("give back").len(), 1);
            released_tx.send(()).expect("the test");
        });
    });
    // Whatever the thread did (a failed assertion drops its senders), the pools go, and its blocks with them.
    let _ = deleted_rx.recv();
    kubectl.ok(&["delete", "ippool", &ready, &overlapping, "--wait=false"]);
    let ok = released_rx.recv().is_ok() && thread.join().is_ok();
    if !ok {
        kubectl.run(&["delete", "ipamblocks", "-l", &format!("poolwarden.io/pool={ready}")], None);
    }
    assert!(ok, "the allocator's thread failed (its panic is printed above)");
    wait_for("the pools gone", Duration::from_secs(60), || !verdict(&ready).0 && !verdict(&overlapping).0);
    no_ipamblocks_left(&kubectl);
}

/// The control plane's network namespace, where the API server is reached from.
const CONTROL_PLANE_NETNS: &str = "/run/netns/pwk-cp";

/// No IPAMBlock is left (the tests on the API server's blocks end with this).
fn no_ipamblocks_left(kubectl: &Kubectl) {
    let left = kubectl.ok(&["get", "ipamblocks", "-o", "name"]);
    assert!(left.trim().is_empty(), "objects left behind: {left}");
}

/// `kill -9` at every step boundary of the single-object allocator on IPAMBlock objects of the real API
/// server (the child runs in the control plane's network namespace): see `kill_points`.
#[test]
fn a_kill_at_every_step_boundary_leaves_a_state_the_next_steps_clean_up_on_the_api_server() {
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    let _agents = OnEtcdDatastore::switch(&kubectl);
    let kubeconfig = dir.join("admin.kubeconfig");
    kill_points::kill_at_every_boundary(move |_, scratch| kill_points::Backend::Kubernetes {
        kubeconfig: kubeconfig.clone(),
        netns: CONTROL_PLANE_NETNS.into(),
        pools: scratch.join("pools.redb"),
    });
    no_ipamblocks_left(&kubectl);
}

/// The kube-apiserver killed with -9 and started again, as `cargo xtask cluster up` started it (its command
/// line, in the control plane's network namespace, its log appended to, its PID recorded for `cluster down`);
/// returns once it answers again.
fn restart_api_server(dir: &std::path::Path) -> Duration {
    let pid_file = dir.join("pids/kube-apiserver");
    let pid: i32 = std::fs::read_to_string(&pid_file).expect("the API server's PID").trim().parse().expect("a PID");
    let command_line = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the API server's command line");
    let args: Vec<String> =
        command_line.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into()).collect();
    let killed = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill -9");
    // Gone, or a zombie: under `cargo xtask test` the API server is the child of xtask, which reaps it
    // only when it exits. A zombie leader whose other threads are still exiting still holds the process's
    // sockets (its listening port with them): gone only once it is the last of its threads.
    let gone = || {
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')));
        zombie && std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count) <= 1
    };
    while !gone() {
        assert!(killed.elapsed() < Duration::from_secs(30), "the API server ({pid}) outlived kill -9 by 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("logs/kube-apiserver.log"))
        .expect("the API server's log");
    #[expect(
        clippy::zombie_processes,
        reason = "it outlives this test, as the cluster's; cluster down stops it by PID"
    )]
    let mut child = Command::new("setsid")
        .arg("nsenter")
        .arg("--net=/var/run/netns/pwk-cp")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start the API server again");
    std::fs::write(&pid_file, child.id().to_string()).expect("record its PID");
    let kubectl = Kubectl::new(dir);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (ready, out, err) = kubectl.run(&["get", "--raw", "/readyz?verbose"], None);
        if ready {
            break;
        }
        if Instant::now() >= deadline {
            // What it says of itself, for whoever reads the failure (the cluster's directory goes with it).
            let log = std::fs::read_to_string(dir.join("logs/kube-apiserver.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect();
            let exited = child.try_wait().ok().flatten();
            panic!(
                "the API server did not come back in 120 s (process {}: {exited:?}); /readyz: {out}{err}\nits log's \
                 last lines:\n{}",
                child.id(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    killed.elapsed()
}

/// What issue 17's torture asks of the Kubernetes datastore, at the allocator: 1,000 ADDs and DELs of 500
/// pods over two nodes (an allocator, view and pool source each, as two agents), 20 at a time, through the
/// block allocator on IPAMBlock objects, from a pool applied as an IPPool resource and read from it, with the
/// kube-apiserver killed (-9) and restarted a quarter of the way in. A failed ADD
/// is followed by its DEL and retried, as kubelet does; a failed DEL is retried. No address is ever held by two
/// pods at once, and at the end nothing is held, `ipam check` finds nothing and no block is left once given back.
#[test]
fn the_block_allocator_keeps_addresses_unique_through_an_api_server_restart() {
    use std::{
        collections::HashMap,
        sync::{
            Arc, Mutex,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use poolwarden::{
        allocator::{
            AssignRequest,
            single::{BlockAllocator, PoolSource},
        },
        ipam::{NamespaceInfo, NodeInfo, check::check},
        k8s::pools::ResourcePools,
        objects::{ObjectStore, kubernetes::KubeObjects},
        resources::ANNOTATION_IPV4_POOLS,
    };

    const PODS: usize = 500;
    const AT_ONCE: usize = 20;
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    let _agents = OnEtcdDatastore::switch(&kubectl);
    let kubeconfig = dir.join("admin.kubeconfig");
    // Bound to the namespace the churn's pods are in, so the cluster's own pods never take from it.
    kubectl.ok_with(
        &["apply", "-f", "-"],
        Some("apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: churn}\nspec: {cidr: 10.252.0.0/24, blockSize: 28, allowedNamespaces: [churn]}\n"),
    );
    let ready =
        || kubectl.ok(&["get", "ippool", "churn", "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"]);
    wait_for("the churn pool judged ready", Duration::from_secs(60), || ready() == "True");
    let started = Arc::new(AtomicUsize::new(0));
    let restart_dir = dir.clone();
    let restart_started = Arc::clone(&started);
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let restart_finished = Arc::clone(&finished);
    // The restart, from a thread of its own once a quarter of the pods have started (none if the churn ended
    // before that: it failed).
    let restarter = std::thread::spawn(move || {
        while restart_started.load(Ordering::SeqCst) < PODS / 4 {
            if restart_finished.load(Ordering::SeqCst) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(restart_api_server(&restart_dir))
    });
    /// Tells the restarter the churn is over, however it ended.
    struct Finished(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Finished {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let thread = std::thread::spawn(move || {
        let _finished = Finished(finished);
        kill_points::enter(std::path::Path::new(CONTROL_PLANE_NETNS));
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let client = poolwarden::k8s::connect(Some(&kubeconfig)).await.expect("a client of the API server");
            let objects: Arc<dyn ObjectStore> = Arc::new(KubeObjects::new(client.clone()));
            let nodes: Arc<Vec<(String, BlockAllocator)>> = Arc::new(
                ["churn-1", "churn-2"]
                    .into_iter()
                    .map(|node| {
                        let pools: Arc<dyn PoolSource> = Arc::new(ResourcePools::start(client.clone()));
                        (node.to_string(), BlockAllocator::new(Arc::clone(&objects), pools))
                    })
                    .collect(),
            );
            // Who holds each address as far as the pods know: (handle, whether its DEL has begun). An ADD may
            // get an address whose holder's DEL has begun (it may have committed), never one whose holder has
            // not.
            let held: Arc<Mutex<HashMap<std::net::IpAddr, (String, bool)>>> = Arc::default();
            let failures = Arc::new(AtomicUsize::new(0));
            let next = Arc::new(AtomicUsize::new(0));
            let workers: Vec<_> = (0..AT_ONCE)
                .map(|_| {
                    let (nodes, held, failures, next, started) = (
                        Arc::clone(&nodes),
                        Arc::clone(&held),
                        Arc::clone(&failures),
                        Arc::clone(&next),
                        Arc::clone(&started),
                    );
                    tokio::spawn(async move {
                        loop {
                            let i = next.fetch_add(1, Ordering::SeqCst);
                            if i >= PODS {
                                return;
                            }
                            started.fetch_add(1, Ordering::SeqCst);
                            let (node, allocator) = &nodes[i % 2];
                            let handle = format!("churn.pod-{i}");
                            let mut namespace = NamespaceInfo::bare("churn");
                            namespace.annotations.insert(ANNOTATION_IPV4_POOLS.into(), "[\"churn\"]".into());
                            let request = AssignRequest {
                                handle: handle.clone(),
                                node: NodeInfo { name: node.clone(), labels: Default::default() },
                                namespace,
                                pod: None,
                                requested: Default::default(),
                                eligible: None,
                                attributes: Default::default(),
                            };
                            let deadline = Instant::now() + Duration::from_secs(180);
                            let retry = |what: String| {
                                assert!(Instant::now() < deadline, "{handle}: {what} for 180 s");
                                failures.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(250))
                            };
                            // ADD, and after a failed one its DEL before the next try.
                            let ips = loop {
                                let assigned = async { allocator.assign(&request, &allocator.load().await?).await };
                                match assigned.await {
                                    Ok(assigned) => break assigned.into_iter().map(|a| a.ip).collect::<Vec<_>>(),
                                    Err(e) => {
                                        retry(format!("ADD failed: {e}")).await;
                                        while let Err(e) = allocator.release_handle(node, &handle).await {
                                            retry(format!("DEL after a failed ADD failed: {e}")).await;
                                        }
                                    }
                                }
                            };
                            assert_eq!(ips.len(), 1, "{handle}: one IPv4 address");
                            for ip in &ips {
                                let mut held = held.lock().expect("held");
                                if let Some((other, false)) = held.insert(*ip, (handle.clone(), false)) {
                                    panic!("{ip} given to {handle} while {other} holds it");
                                }
                            }
                            // The pod lives a while (0-49 ms), then its DEL begins and runs until it succeeds.
                            tokio::time::sleep(Duration::from_millis((i * 7 % 50) as u64)).await;
                            {
                                let mut held = held.lock().expect("held");
                                for ip in &ips {
                                    if let Some(entry) = held.get_mut(ip).filter(|(holder, _)| *holder == handle) {
                                        entry.1 = true;
                                    }
                                }
                            }
                            while let Err(e) = allocator.release_handle(node, &handle).await {
                                retry(format!("DEL failed: {e}")).await;
                            }
                            let mut held = held.lock().expect("held");
                            held.retain(|_, (holder, _)| *holder != handle);
                        }
                    })
                })
                .collect();
            for worker in workers {
                worker.await.expect("a worker panicked (above)");
            }
            let retried = failures.load(Ordering::SeqCst);
            let (_, first) = &nodes[0];
            let snapshot = first.snapshot().await.expect("snapshot");
            assert!(check(&snapshot).is_empty(), "ipam check: {:?}", check(&snapshot));
            let blocks = poolwarden::allocator::single::conformance::checked_blocks(objects.as_ref()).await;
            let left: Vec<_> =
                blocks.iter().flat_map(|b| b.allocated().map(|(ip, a)| (ip, a.handle.clone()))).collect();
            assert!(left.is_empty(), "still held after every DEL: {left:?}");
            let mut config = first.load().await.expect("pools").config;
            config.empty_block_grace_seconds = 0;
            for (node, allocator) in nodes.iter() {
                allocator.release_empty_blocks(node, &config).await.expect("give back");
            }
            let blocks = poolwarden::allocator::single::conformance::checked_blocks(objects.as_ref()).await;
            assert!(blocks.is_empty(), "blocks left once given back: {blocks:?}");
            retried
        })
    });
    let restart = restarter.join().expect("the restart");
    let outcome = thread.join();
    if outcome.is_err() {
        // What the churn left would break the next tests on the API server's blocks.
        kubectl.run(&["delete", "ipamblocks", "-l", "poolwarden.io/pool=churn", "--wait=false"], None);
    }
    kubectl.ok(&["delete", "ippool", "churn", "--wait=false"]);
    let retried = outcome.expect("the churn failed (its panic is printed above)");
    let restart = restart.expect("the API server was restarted");
    no_ipamblocks_left(&kubectl);
    wait_for("the churn pool gone", Duration::from_secs(60), || !kubectl.run(&["get", "ippool", "churn"], None).0);
    println!(
        "{PODS} pods (1,000 ADD/DEL), {AT_ONCE} at a time: API server down and back in {restart:.1?}; {retried} failed \
         ADDs or DELs retried; no address twice, nothing left"
    );
}

/// The child of every boundary's run on the API server (does nothing unless a parent started it).
#[test]
fn fault_child() {
    kill_points::child();
}

type Suite = fn(
    std::sync::Arc<dyn poolwarden::objects::ObjectStore>,
    String,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Run `suite` against IPAMBlock objects of the cluster's API server (from inside the control plane's
/// network namespace, on a thread of its own), and check it left no object behind.
fn on_the_api_server(what: &str, suite: Suite) {
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    let _agents = OnEtcdDatastore::switch(&kubectl);
    let kubeconfig = dir.join("admin.kubeconfig");
    let run = format!("c{}", std::process::id());
    let thread = std::thread::spawn(move || {
        kill_points::enter(std::path::Path::new(CONTROL_PLANE_NETNS));
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async {
            let client = poolwarden::k8s::connect(Some(&kubeconfig)).await.expect("a client of the API server");
            let objects: std::sync::Arc<dyn poolwarden::objects::ObjectStore> =
                std::sync::Arc::new(poolwarden::objects::kubernetes::KubeObjects::new(client));
            suite(objects, run).await;
        });
    });
    assert!(thread.join().is_ok(), "{what} failed on the API server (its panic is printed above)");
    no_ipamblocks_left(&kubectl);
}

/// A `poolwarden` command in an agent's container (its datastore), output on success.
fn agent_cli(kubectl: &Kubectl, args: &[&str]) -> String {
    let (ok, out, err) = in_agent(kubectl, args, None);
    assert!(ok, "poolwarden {args:?} in an agent: {out}{err}");
    out
}

/// A `poolwarden` command in an agent's container, with `stdin`: (success, stdout, stderr).
fn in_agent(kubectl: &Kubectl, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut full = vec!["-n", "kube-system", "exec", "-i", "ds/poolwarden", "-c", "agent", "--", "poolwarden"];
    full.extend_from_slice(args);
    kubectl.run(&full, stdin)
}

/// Apply pools through the agent (it holds the datastore's client), as an operator does with kubectl.
fn apply_pools(kubectl: &Kubectl, yaml: &str) {
    kubectl.ok_with(
        &["-n", "kube-system", "exec", "-i", "ds/poolwarden", "-c", "agent", "--", "poolwarden", "apply", "-f", "-"],
        Some(yaml),
    );
}

/// A pool bound to one namespace, and that namespace, annotated to take its pods' addresses from it.
fn pool_for_namespace(kubectl: &Kubectl, pool: &str, cidr: &str, block_size: u8, namespace: &str) {
    apply_pools(
        kubectl,
        &format!(
            "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {{name: {pool}}}\nspec:\n  cidr: {cidr}\n  blockSize: {block_size}\n  allowedNamespaces: [{namespace}]\n"
        ),
    );
    kubectl.ok(&["create", "namespace", namespace]);
    kubectl.ok(&["annotate", "namespace", namespace, &format!("poolwarden.io/ipv4pools=[\"{pool}\"]")]);
}

/// A busybox pod on `node` running `command`.
fn pod_on(kubectl: &Kubectl, namespace: &str, name: &str, node: &str, command: &str) {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": "pwk.invalid/busybox:1", "command": ["/bin/sh", "-c", command]}],
        },
    });
    kubectl.ok_with(&["apply", "-f", "-"], Some(&pod.to_string()));
}

/// A pod's address and the names of the agent's pods, by node.
fn pod_ip(kubectl: &Kubectl, namespace: &str, name: &str) -> String {
    kubectl.json(&["-n", namespace, "get", "pod", name])["status"]["podIP"].as_str().unwrap_or_default().to_string()
}

fn agent_pods(kubectl: &Kubectl) -> Vec<(String, String)> {
    let pods = kubectl.json(&["-n", "kube-system", "get", "pods", "-l", "app.kubernetes.io/name=poolwarden"]);
    let mut found: Vec<(String, String)> = pods["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| {
            (
                p["spec"]["nodeName"].as_str().unwrap_or_default().to_string(),
                p["metadata"]["name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    found.sort();
    found
}

/// `kubectl rollout restart daemonset/poolwarden` while a pod on one node pings a pod on the other at 20 Hz:
/// every agent is replaced, no packet is lost, and neither pod's address changes. (Routes and pinned
/// enforcement stay in the kernel while an agent restarts, and the other nodes keep routing to its blocks.)
#[test]
fn a_rolling_restart_of_the_agents_loses_no_packet() {
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    pool_for_namespace(&kubectl, "ping-pool", "10.78.0.0/24", 28, "ping-ns");
    pod_on(&kubectl, "ping-ns", "target", "pwk-node2", "exec sleep 3600");
    kubectl.ok(&["-n", "ping-ns", "wait", "--for=condition=Ready", "pod/target", "--timeout=120s"]);
    let target = pod_ip(&kubectl, "ping-ns", "target");
    // 1,200 echo requests at 20 Hz: a minute, longer than the restart of both agents.
    let count = 1200;
    pod_on(
        &kubectl,
        "ping-ns",
        "pinger",
        "pwk-node1",
        &format!("ping -i 0.05 -c {count} -W 2 {target}; exec sleep 3600"),
    );
    kubectl.ok(&["-n", "ping-ns", "wait", "--for=condition=Ready", "pod/pinger", "--timeout=120s"]);
    let pinger = pod_ip(&kubectl, "ping-ns", "pinger");
    assert!(in_cidr(&target, [10, 78, 0, 0], 24) && in_cidr(&pinger, [10, 78, 0, 0], 24), "{pinger} {target}");
    let logs = || kubectl.ok(&["-n", "ping-ns", "logs", "pinger"]);
    wait_for("the first echo reply", Duration::from_secs(30), || logs().contains("seq="));
    let pinging = Instant::now();

    let before = agent_pods(&kubectl);
    let restarted = Instant::now();
    kubectl.ok(&["-n", "kube-system", "rollout", "restart", "daemonset/poolwarden"]);
    kubectl.ok(&["-n", "kube-system", "rollout", "status", "daemonset/poolwarden", "--timeout=120s"]);
    let restart = restarted.elapsed();
    let restart_ended = pinging.elapsed();
    let after = agent_pods(&kubectl);
    assert_eq!(after.len(), 2, "{after:?}");
    for ((node, old), (_, new)) in before.iter().zip(&after) {
        assert_ne!(old, new, "the agent on {node} was not replaced");
    }
    let summary = {
        let mut text = String::new();
        wait_for("the pings to finish", Duration::from_secs(120), || {
            text = logs();
            text.contains("packets transmitted")
        });
        text
    };
    let line = summary.lines().find(|l| l.contains("packets transmitted")).unwrap_or_default().to_string();
    println!("rollout restart of both agents took {restart:.1?}; pings: {line}");
    // The pings (count / 20 Hz) started before the restart and ran past its end by five seconds at least.
    let pings_end = Duration::from_millis(count as u64 * 50);
    assert!(
        restart_ended + Duration::from_secs(5) < pings_end,
        "the restart ({restart:?}) did not end while the pings ran; nothing was shown"
    );
    assert!(line.starts_with(&format!("{count} packets transmitted, {count} packets received")), "{summary}");
    assert_eq!(pod_ip(&kubectl, "ping-ns", "target"), target, "the target's address changed");
    assert_eq!(pod_ip(&kubectl, "ping-ns", "pinger"), pinger, "the pinger's address changed");
    let inside = kubectl.ok(&["-n", "ping-ns", "exec", "target", "--", "ip", "-4", "addr", "show", "eth0"]);
    assert!(inside.contains(&format!("{target}/32")), "{inside}");
    kubectl.ok(&["delete", "namespace", "ping-ns", "--wait=true", "--timeout=120s"]);
}

/// The pods of `namespace`: (name, phase, address, whether it is being deleted).
fn pods_of(kubectl: &Kubectl, namespace: &str) -> Vec<(String, String, String, bool)> {
    let pods = kubectl.json(&["-n", namespace, "get", "pods"]);
    pods["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                p["status"]["phase"].as_str().unwrap_or_default().to_string(),
                p["status"]["podIP"].as_str().unwrap_or_default().to_string(),
                p["metadata"]["deletionTimestamp"].is_string(),
            )
        })
        .collect()
}

/// Wait until `namespace` has exactly `replicas` pods, every one Running with an address; returns them.
fn settled(kubectl: &Kubectl, namespace: &str, replicas: usize) -> Vec<(String, String, String, bool)> {
    let mut pods = Vec::new();
    wait_for(&format!("{replicas} pods Running in {namespace}"), Duration::from_secs(600), || {
        pods = pods_of(kubectl, namespace);
        pods.len() == replicas
            && pods.iter().all(|(_, phase, ip, deleting)| phase == "Running" && !ip.is_empty() && !deleting)
    });
    pods
}

/// `poolwarden ipam check` on the cluster's datastore, through an agent.
fn ipam_check(kubectl: &Kubectl) -> String {
    kubectl.ok(&["-n", "kube-system", "exec", "ds/poolwarden", "-c", "agent", "--", "poolwarden", "ipam", "check"])
}

/// Pod churn through a deployment: 100 replicas, then scaled down to 30 and at once up to 130 (100 pods
/// created while 70 are deleted), then to 0. 200 pods in all, every one Running on an address of the pool,
/// no address held twice, `ipam check` clean, and nothing held once they are gone.
#[test]
fn pod_churn_through_a_deployment_never_gives_an_address_twice() {
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    pool_for_namespace(&kubectl, "churn-pool", "10.79.0.0/23", 27, "churn-ns");
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "churn", "namespace": "churn-ns"},
        "spec": {
            "replicas": 100,
            "selector": {"matchLabels": {"app": "churn"}},
            "template": {
                "metadata": {"labels": {"app": "churn"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "main", "image": "pwk.invalid/busybox:1", "command": ["/bin/sh", "-c", "exec sleep 3600"]}],
                },
            },
        },
    });
    let started = Instant::now();
    kubectl.ok_with(&["apply", "-f", "-"], Some(&deployment.to_string()));
    let first = settled(&kubectl, "churn-ns", 100);
    println!("100 pods Running {:.1?} after the apply", started.elapsed());
    let check = |pods: &[(String, String, String, bool)]| {
        let mut seen = std::collections::BTreeMap::new();
        for (name, _, ip, _) in pods {
            assert!(in_cidr(ip, [10, 79, 0, 0], 23), "{name} is on {ip}, not churn-pool");
            if let Some(other) = seen.insert(ip.clone(), name.clone()) {
                panic!("{ip} is held by {other} and {name}");
            }
        }
    };
    check(&first);
    kubectl.ok(&["-n", "churn-ns", "scale", "deployment/churn", "--replicas=30"]);
    kubectl.ok(&["-n", "churn-ns", "scale", "deployment/churn", "--replicas=130"]);
    let second = settled(&kubectl, "churn-ns", 130);
    check(&second);
    let names: std::collections::BTreeSet<&String> = first.iter().chain(&second).map(|(n, ..)| n).collect();
    println!("{} pods created in all; 130 Running {:.1?} after the apply", names.len(), started.elapsed());
    assert!(names.len() >= 200, "only {} pods were created", names.len());
    let report = ipam_check(&kubectl);
    assert!(report.starts_with("ipam check: clean"), "{report}");
    let listed = kubectl.ok(&["-n", "churn-ns", "get", "pods", "--no-headers"]);
    assert_eq!(listed.lines().filter(|l| l.contains(" Running ")).count(), 130, "{listed}");

    kubectl.ok(&["-n", "churn-ns", "scale", "deployment/churn", "--replicas=0"]);
    wait_for("every churn pod to go", Duration::from_secs(300), || pods_of(&kubectl, "churn-ns").is_empty());
    let mut held = String::new();
    wait_for("churn-pool's addresses to be released", Duration::from_secs(60), || {
        held = kubectl.ok(&[
            "-n",
            "kube-system",
            "exec",
            "ds/poolwarden",
            "-c",
            "agent",
            "--",
            "poolwarden",
            "ipam",
            "show",
        ]);
        held.lines().any(|l| l.starts_with("churn-pool") && l.split_whitespace().nth(4) == Some("0"))
    });
    let report = ipam_check(&kubectl);
    assert!(report.starts_with("ipam check: clean"), "{report}");
    kubectl.ok(&["delete", "namespace", "churn-ns", "--wait=true", "--timeout=120s"]);
}

/// How many addresses of `pool` are held, from `poolwarden ipam show` in pwk-node1's agent (node2's kubelet
/// may be stopped, and an exec through it would hang).
fn used_in(kubectl: &Kubectl, pool: &str) -> Option<u32> {
    let agent = agent_pods(kubectl).into_iter().find(|(node, _)| node == "pwk-node1").expect("node1's agent").1;
    let show = kubectl.ok(&[
        "--request-timeout=30s",
        "-n",
        "kube-system",
        "exec",
        &agent,
        "-c",
        "agent",
        "--",
        "poolwarden",
        "ipam",
        "show",
    ]);
    show.lines().find(|l| l.split_whitespace().next() == Some(pool))?.split_whitespace().nth(4)?.parse().ok()
}

/// node2's route to `ip` (empty when there is none but the block's).
fn route_on_node2(ip: &str) -> String {
    let out = Command::new("ip").args(["-n", "pwk-node2", "route", "show", ip]).output().expect("ip route");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Resumes a stopped process when dropped (a failing test must not leave the node's kubelet stopped).
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        assert!(Command::new("kill").args(["-STOP", &pid.to_string()]).status().expect("kill").success());
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

/// Garbage collection on the real cluster (the agents run with a 20 s leak grace period here) follows the
/// API server, not the agents' heartbeats:
/// - a pod force-deleted while its node's kubelet is stopped (its container lives on, no DEL comes) has its
///   address released and its route removed by its node's agent once the API server has no pod of its UID;
/// - with node2's agent removed from the node (the DaemonSet kept off it) for longer than its registration
///   TTL and the grace period together, node2's pods keep their addresses and stay reachable from node1; a
///   pod force-deleted meanwhile has its address released once the agent is back.
#[test]
fn garbage_collection_follows_the_api_server_not_the_agents() {
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    pool_for_namespace(&kubectl, "gc-pool", "10.81.0.0/24", 28, "gc-ns");
    for name in ["kept", "orphan", "victim"] {
        pod_on(&kubectl, "gc-ns", name, "pwk-node2", "exec sleep 3600");
    }
    for name in ["kept", "orphan", "victim"] {
        kubectl.ok(&["-n", "gc-ns", "wait", "--for=condition=Ready", &format!("pod/{name}"), "--timeout=120s"]);
    }
    let kept = pod_ip(&kubectl, "gc-ns", "kept");
    let orphan = pod_ip(&kubectl, "gc-ns", "orphan");
    let victim = pod_ip(&kubectl, "gc-ns", "victim");
    // Pings from node1 to the kept pod for the whole test (5 Hz, answered throughout).
    let count = 1000;
    pod_on(&kubectl, "gc-ns", "watcher", "pwk-node1", &format!("ping -i 0.2 -c {count} -W 2 {kept}; exec sleep 3600"));
    kubectl.ok(&["-n", "gc-ns", "wait", "--for=condition=Ready", "pod/watcher", "--timeout=120s"]);
    let watching = Instant::now();
    assert_eq!(used_in(&kubectl, "gc-pool"), Some(4));

    // 1. node2's kubelet stopped, a pod force-deleted: its container runs on and no DEL comes. The agent
    //    sees no pod of its UID in the API and releases its address and route after the grace period.
    assert!(route_on_node2(&orphan).contains("dev pw"), "{}", route_on_node2(&orphan));
    let kubelet: u32 =
        std::fs::read_to_string(dir.join("pids/kubelet-pwk-node2")).expect("pid").trim().parse().unwrap();
    {
        let _stopped = Stopped::new(kubelet);
        kubectl.ok(&["-n", "gc-ns", "delete", "pod", "orphan", "--grace-period=0", "--force"]);
        let started = Instant::now();
        wait_for("the orphan's address to be released", Duration::from_secs(45), || {
            used_in(&kubectl, "gc-pool") == Some(3)
        });
        println!("force-deleted pod with its kubelet stopped: released {:.1?} after the delete", started.elapsed());
        assert!(!route_on_node2(&orphan).contains("dev pw"), "its route stays: {}", route_on_node2(&orphan));
    }

    // 2. node2's agent kept off the node: past its registration TTL (30 s) and the grace period (20 s).
    kubectl.ok(&[
        "-n",
        "kube-system",
        "patch",
        "daemonset/poolwarden",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"spec":{"affinity":{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpressions":[{"key":"kubernetes.io/hostname","operator":"NotIn","values":["pwk-node2"]}]}]}}}}}}}"#,
    ]);
    wait_for("node2's agent to go", Duration::from_secs(120), || {
        agent_pods(&kubectl).iter().all(|(node, _)| node != "pwk-node2")
    });
    kubectl.ok(&["-n", "kube-system", "rollout", "status", "daemonset/poolwarden", "--timeout=120s"]);
    kubectl.ok(&["-n", "gc-ns", "delete", "pod", "victim", "--grace-period=0", "--force"]);
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(80) {
        assert_eq!(pod_ip(&kubectl, "gc-ns", "kept"), kept);
        assert!(route_on_node2(&kept).contains("dev pw"), "{}", route_on_node2(&kept));
        std::thread::sleep(Duration::from_secs(5));
    }
    // Nothing of node2's was released by node1's agent: the kept pod's address and the victim's (no DEL
    // could reach an agent) are both still held.
    assert_eq!(used_in(&kubectl, "gc-pool"), Some(3), "an address of node2 was released while its agent was away");
    kubectl.ok(&[
        "-n",
        "kube-system",
        "patch",
        "daemonset/poolwarden",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/template/spec/affinity"}]"#,
    ]);
    kubectl.ok(&["-n", "kube-system", "rollout", "status", "daemonset/poolwarden", "--timeout=120s"]);
    let back = Instant::now();
    wait_for("the victim's address to be released", Duration::from_secs(90), || {
        used_in(&kubectl, "gc-pool") == Some(2)
    });
    println!("pod force-deleted while its agent was away: released {:.1?} after the agent's return", back.elapsed());
    assert!(!route_on_node2(&victim).contains("dev pw"), "{}", route_on_node2(&victim));
    assert_eq!(pod_ip(&kubectl, "gc-ns", "kept"), kept);
    let (ok, out, err) =
        kubectl.run(&["-n", "gc-ns", "exec", "kept", "--", "ping", "-c", "1", "-W", "2", "10.250.0.12"], None);
    assert!(ok, "the kept pod cannot send after its agent's return: {out}{err}");
    let logs = kubectl.ok(&["-n", "gc-ns", "logs", "watcher"]);
    let answered = logs.lines().filter(|l| l.contains("bytes from")).count();
    println!("node1 -> kept pod on node2: {answered} echo replies, none missing");
    let seqs: Vec<u32> =
        logs.lines().filter_map(|l| l.split("seq=").nth(1)?.split_whitespace().next()?.parse().ok()).collect();
    assert!(seqs.len() > 100, "{logs}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "a ping to the kept pod went unanswered:\n{logs}");
    // And none is missing at the end: the replies go on until now (5 a second, a few seconds' slack).
    let expected = watching.elapsed().as_secs() as u32 * 5;
    assert!(
        seqs.last().is_some_and(|last| last + 20 >= expected.min(count)),
        "the pings stopped being answered ({} replies, {expected} expected by now):\n{logs}",
        seqs.len()
    );
    let report = ipam_check(&kubectl);
    assert!(report.starts_with("ipam check: clean"), "{report}");
    kubectl.ok(&["delete", "namespace", "gc-ns", "--wait=true", "--timeout=120s"]);
}

/// The custom resources installed from deploy/crds.yaml judge a pool on its own as `poolwarden apply` does:
/// each document of the table is accepted by both or refused by both, and a refusal names the same field (in
/// the same words, where the schema's rules say it). CIDR and block size cannot change once the pool exists,
/// an absent block size counting as its family's default; `kubectl get ippools` shows the printer columns.
#[test]
fn the_custom_resources_validate_a_pool_as_apply_does() {
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    for crd in ["ippools.poolwarden.io", "ipamconfigs.poolwarden.io"] {
        kubectl.ok(&["wait", "--for=condition=Established", &format!("crd/{crd}"), "--timeout=60s"]);
    }
    let pool = |name: &str, spec: &str| {
        format!("apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {spec}\n")
    };
    let config = |name: &str, spec: &str| {
        format!("apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {{name: {name}}}\nspec: {spec}\n")
    };
    // A document, and what both refusals say (empty: both accept it).
    let cases = [
        (pool("v4", "{cidr: 10.90.0.0/24, blockSize: 28, natOutgoing: true, allowedNamespaces: [a-ns]}"), ""),
        (pool("v6", "{cidr: 'fd00:90::/112', vxlanMode: Always, enforcement: Pool}"), ""),
        (pool("v6-default", "{cidr: 'fd00:91::/120'}"), ""),
        (pool("small", "{cidr: 10.91.0.0/28}"), "is larger than the pool 10.91.0.0/28"),
        (pool("host-bits", "{cidr: 10.92.0.1/24}"), "has host bits set"),
        (pool("not-cidr", "{cidr: 10.93.0.0}"), "is not a CIDR"),
        (pool("big-block", "{cidr: 10.94.0.0/16, blockSize: 19}"), "IPv4 block sizes are 20 to 32"),
        (pool("v6-block", "{cidr: 'fd00:92::/64', blockSize: 64}"), "IPv6 block sizes are 116 to 128"),
        (pool("both", "{cidr: 10.95.0.0/24, ipipMode: Always, vxlanMode: CrossSubnet}"), "cannot both be enabled"),
        (pool("v6-ipip", "{cidr: 'fd00:93::/112', ipipMode: Always}"), "IP-in-IP carries IPv4 only"),
        (pool("bad-ns", "{cidr: 10.96.0.0/24, allowedNamespaces: [Bad_NS]}"), "is not a valid namespace name"),
        (pool("no-uses", "{cidr: 10.97.0.0/24, allowedUses: []}"), "spec.allowedUses"),
        (pool("bad-mode", "{cidr: 10.98.0.0/24, ipipMode: Sometimes}"), "spec.ipipMode"),
        (pool("extra", "{cidr: 10.99.0.0/24, colour: blue}"), "colour"),
        (pool("Upper", "{cidr: 10.100.0.0/24}"), "metadata.name"),
        (config("default", "{strictAffinity: true, emptyBlockGraceSeconds: 60}"), ""),
        (config("other", "{strictAffinity: true}"), "the one IPAMConfig must be named \"default\""),
        (config("default", "{autoAllocateBlocks: false}"), "false is not supported"),
    ];
    let mut differences = Vec::new();
    for (document, refusal) in &cases {
        let by_apply = poolwarden::resources::parse_documents("case.yaml", document)
            .map(|_| "accepted".to_string())
            .map_err(|e| e.to_string());
        let (ok, out, err) = kubectl.run(&["apply", "--dry-run=server", "-f", "-"], Some(document));
        let by_server = if ok { Ok(out) } else { Err(err) };
        let agrees = |verdict: &Result<String, String>| match verdict {
            Ok(_) => refusal.is_empty(),
            Err(message) => !refusal.is_empty() && message.contains(refusal),
        };
        if !agrees(&by_apply) || !agrees(&by_server) {
            differences.push(format!(
                "{document}  expected {}\n  apply: {by_apply:?}\n  API server: {by_server:?}",
                if refusal.is_empty() { "acceptance".to_string() } else { format!("a refusal saying {refusal:?}") }
            ));
        }
    }
    assert!(differences.is_empty(), "apply and the API server disagree:\n{}", differences.join("\n"));

    // Immutable once created; an absent block size is its family's default.
    kubectl.ok_with(&["apply", "-f", "-"], Some(&pool("immutable", "{cidr: 10.90.1.0/24}")));
    kubectl.ok_with(&["apply", "-f", "-"], Some(&pool("immutable", "{cidr: 10.90.1.0/24, blockSize: 26}")));
    for (spec, refusal) in [
        ("{cidr: 10.90.1.0/24, blockSize: 27}", "spec.blockSize is immutable"),
        ("{cidr: 10.90.2.0/24, blockSize: 26}", "spec.cidr is immutable"),
    ] {
        let (ok, _, err) = kubectl.run(&["apply", "-f", "-"], Some(&pool("immutable", spec)));
        assert!(!ok && err.contains(refusal), "changing the pool to {spec} was not refused with {refusal:?}: {err}");
    }
    let table = kubectl.ok(&["get", "ippools", "immutable"]);
    for column in ["CIDR", "BLOCK SIZE", "NAT", "ALLOWED NAMESPACES", "USED", "UTILISATION", "10.90.1.0/24"] {
        assert!(table.contains(column), "kubectl get ippools shows no {column}:\n{table}");
    }
    kubectl.ok(&["delete", "ippool", "immutable"]);
}

/// `poolwarden datastore migrate --to kubernetes` against the real API server: a datastore's state (made by
/// the multi-key allocator the agents run today, with their endpoint records) becomes IPPool, IPAMConfig and
/// IPAMBlock resources, each allocation carrying its endpoint record; refused while an agent is registered
/// (nothing written) and when the API server holds blocks other than its own (its own, it keeps: a run
/// again after one stopped part way goes on); and back from the API server into a new
/// embedded datastore, every IPAM record as the source had it.
#[test]
fn a_datastore_migrates_to_the_api_server_and_back_with_every_endpoint_record() {
    use std::{collections::BTreeMap, sync::Arc};

    use poolwarden::{
        catalog::Catalog,
        daemon::Endpoint,
        ipam::Block,
        store::{Store, Txn, embedded::EmbeddedStore, keys},
    };

    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    let _agents = OnEtcdDatastore::switch(&kubectl);
    /// What the migration wrote goes, however the test ends (the agents retire the pool, and put the IPAM
    /// settings back to their defaults, once its resources are deleted).
    struct Cleanup<'a>(&'a Kubectl);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            self.0.run(&["delete", "ipamblocks", "-l", "poolwarden.io/pool=migrated"], None);
            self.0.run(&["delete", "ippool", "migrated", "--ignore-not-found", "--timeout=60s"], None);
            self.0.run(&["delete", "ipamconfig", "default", "--ignore-not-found", "--timeout=60s"], None);
        }
    }
    let scratch = tempfile::tempdir().expect("temp dir");
    let path = scratch.path().join("source.redb");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    // The source: 24 attachments on two nodes through the multi-key allocator, each with its endpoint record, 6
    // released.
    let records: BTreeMap<(String, String), Endpoint> = runtime.block_on(async {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).expect("source store"));
        let docs = poolwarden::resources::parse_documents(
            "pools.yaml",
            "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: migrated}\nspec: {cidr: 10.126.0.0/24, blockSize: 29}\n---\n\
             apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {emptyBlockGraceSeconds: 600}\n",
        )
        .expect("pools");
        Catalog::new(Arc::clone(&store)).apply(&docs).await.expect("apply");
        // A pool deleted before: its firewall set is emptied by every export, on either side.
        let gone = "10.127.0.0/24".parse().expect("a CIDR");
        Catalog::new(Arc::clone(&store)).record_retired("migrated-gone", gone).await.expect("retired record");
        poolwarden::migrate::fixtures::populate(&store, &["migrated"], &["migrated-a", "migrated-b"], 24, None).await
    });
    assert_eq!(records.len(), 18);
    let from = format!("embedded:{}", path.display());
    let migrate = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", "pwk-cp"])
            .arg(poolwarden_tests::binary("poolwarden"))
            .args(["datastore", "migrate"])
            .args(args)
            .arg("--kubeconfig")
            .arg(dir.join("admin.kubeconfig"))
            .output()
            .expect("run poolwarden datastore migrate");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let _cleanup = Cleanup(&kubectl);

    // An agent registered on the source: refused, nothing written.
    let registration = format!("{}migrated-a", keys::NODES);
    runtime.block_on(async {
        let store = EmbeddedStore::open(&path).expect("source store");
        store.txn(Txn::new().put(&registration, b"{}".to_vec())).await.expect("register");
    });
    let (ok, out) = migrate(&["--from", &from, "--to", "kubernetes"]);
    assert!(!ok && out.contains("migrated-a") && out.contains("stop every agent"), "{out}");
    assert!(!kubectl.run(&["get", "ippool", "migrated"], None).0, "a refused migration wrote the pool");
    assert!(kubectl.ok(&["get", "ipamblocks", "-o", "name"]).trim().is_empty());
    runtime.block_on(async {
        let store = EmbeddedStore::open(&path).expect("source store");
        store.txn(Txn::new().remove(&registration)).await.expect("unregister");
    });

    let (ok, out) = migrate(&["--from", &from, "--to", "kubernetes"]);
    assert!(ok, "{out}");
    assert!(out.contains("copied 1 pool(s) (1 created") && out.contains("18 address(es)"), "{out}");
    let pool = kubectl.json(&["get", "ippool", "migrated", "-o", "json"]);
    assert_eq!(pool["spec"]["cidr"], "10.126.0.0/24");
    // Kept while an address is allocated from it, as a pool the agents accepted is.
    assert_eq!(pool["metadata"]["finalizers"], json!(["poolwarden.io/addresses"]), "{pool}");
    let retired = kubectl.json(&["-n", "kube-system", "get", "configmap", "poolwarden-retired-pools", "-o", "json"]);
    assert_eq!(retired["data"]["migrated-gone"], "10.127.0.0/24", "{retired}");
    assert_eq!(kubectl.json(&["get", "ipamconfig", "default", "-o", "json"])["spec"]["emptyBlockGraceSeconds"], 600);
    // Every allocation in the API server's blocks, read back as the endpoint its agent recorded.
    let blocks = kubectl.json(&["get", "ipamblocks", "-l", "poolwarden.io/pool=migrated", "-o", "json"]);
    let mut copied: BTreeMap<(String, String), Endpoint> = BTreeMap::new();
    for item in blocks["items"].as_array().expect("items") {
        let block: Block = serde_json::from_value(item["spec"].clone()).expect("a block");
        for (ip, allocation) in block.allocated() {
            let endpoint = copied.entry((allocation.node.clone(), allocation.handle.clone())).or_insert_with(|| {
                Endpoint::from_attributes(
                    allocation.namespace.as_deref().unwrap_or_default(),
                    allocation.pod.as_deref().unwrap_or_default(),
                    Vec::new(),
                    &allocation.attributes,
                )
                .expect("an endpoint")
            });
            endpoint.ips.push(ip);
        }
    }
    assert_eq!(copied, records);

    // Again (as after a run stopped part way): the blocks it made are kept. Once one was written by someone
    // else (an agent's write takes the migration's label away), the API server's blocks are refused.
    let (ok, out) = migrate(&["--from", &from, "--to", "kubernetes"]);
    assert!(ok && out.contains("3 of the blocks were already there"), "{out}");
    kubectl.ok(&["label", "ipamblock", "10-126-0-0-29", "poolwarden.io/migrated-at-revision-"]);
    let (ok, out) = migrate(&["--from", &from, "--to", "kubernetes"]);
    assert!(!ok && out.contains("already holds"), "{out}");
    println!("{}", out.trim());

    // And back, into a new embedded datastore: every IPAM record as the source had it.
    let back = scratch.path().join("back.redb");
    let (ok, out) = migrate(&["--from", "kubernetes", "--to", &format!("embedded:{}", back.display())]);
    assert!(ok && out.contains("pool(s)"), "{out}");
    println!("{}", out.trim());
    let (original, copied) = runtime.block_on(async {
        let records = |path: std::path::PathBuf| async move {
            let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).expect("store"));
            let all = poolwarden::migrate::fixtures::ipam_records(&store).await;
            let pools = Catalog::new(store).pools().await.expect("pools");
            (all, pools.into_iter().map(|(p, _)| format!("{}={}", p.name(), p.cidr())).collect::<Vec<_>>())
        };
        (records(path.clone()).await, records(back.clone()).await)
    });
    assert_eq!(poolwarden::migrate::fixtures::differences(&copied.0, &original.0), Vec::<String>::new());
    assert!(copied.1.contains(&"migrated=10.126.0.0/24".to_string()), "{:?}", copied.1);
    let retired = runtime.block_on(async {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&back).expect("store"));
        Catalog::new(store).retired_pools().await.expect("retired pools")
    });
    assert!(retired.iter().any(|r| r.name == "migrated-gone" && r.cidr.to_string() == "10.127.0.0/24"), "{retired:?}");
}

/// The cluster's etcd for poolwarden (`cargo xtask cluster up` starts it in the control plane's namespace).
const POOLWARDEN_ETCD: &str = "etcd:http://10.250.0.1:22379";

/// The agents switched from their default, the Kubernetes datastore, to the cluster's etcd
/// (`POOLWARDEN_DATASTORE` on the DaemonSet's agent container) for as long as this lives, and back when
/// dropped, even when the test failed. Switched, the IPAMBlock objects the agents left with nothing allocated
/// (empty blocks within their grace period) are deleted, so that a test of the API server's blocks has them to
/// itself; one still holding an address means a pod of an earlier test is left, and fails the switch.
struct OnEtcdDatastore<'a>(&'a Kubectl);

impl<'a> OnEtcdDatastore<'a> {
    fn switch(kubectl: &'a Kubectl) -> Self {
        kubectl.ok(&["wait", "--for=condition=Established", "crd/ipamblocks.poolwarden.io", "--timeout=60s"]);
        let datastore = format!("POOLWARDEN_DATASTORE={POOLWARDEN_ETCD}");
        kubectl.ok(&["-n", "kube-system", "set", "env", "ds/poolwarden", "-c", "agent", &datastore]);
        let switched = Self(kubectl);
        kubectl.ok(&["-n", "kube-system", "rollout", "status", "daemonset/poolwarden", "--timeout=180s"]);
        let blocks = kubectl.json(&["get", "ipamblocks"]);
        for block in blocks["items"].as_array().expect("items") {
            let name = block["metadata"]["name"].as_str().expect("a name");
            let held = held_in(block);
            assert_eq!(held, 0, "IPAMBlock {name} still holds addresses (a pod of an earlier test left?): {block}");
            kubectl.ok(&["delete", "ipamblock", name, "--ignore-not-found"]);
        }
        switched
    }
}

impl Drop for OnEtcdDatastore<'_> {
    fn drop(&mut self) {
        let kubectl = self.0;
        kubectl
            .run(&["-n", "kube-system", "set", "env", "ds/poolwarden", "-c", "agent", "POOLWARDEN_DATASTORE-"], None);
        kubectl.run(&["-n", "kube-system", "rollout", "status", "daemonset/poolwarden", "--timeout=180s"], None);
    }
}

/// An IPAMBlock resource as a test reads it: its CIDR, its affinity, and its allocations' (node, pod).
type BlockSeen = (String, String, Vec<(String, String)>);

/// The IPAMBlock resources in the /16 whose first two octets are `first`.
fn ipamblocks_in(kubectl: &Kubectl, first: [u8; 2]) -> Vec<BlockSeen> {
    let blocks = kubectl.json(&["get", "ipamblocks"]);
    let mut found: Vec<BlockSeen> = blocks["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|b| {
            let spec = &b["spec"];
            let cidr = spec["cidr"].as_str()?.to_string();
            in_cidr(cidr.split('/').next()?, [first[0], first[1], 0, 0], 16).then(|| {
                let allocations = spec["allocations"]
                    .as_object()
                    .map(|a| {
                        a.values()
                            .map(|a| {
                                let text = |f: &str| a[f].as_str().unwrap_or_default().to_string();
                                (text("node"), text("pod"))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (cidr, spec["affinity"].as_str().unwrap_or_default().to_string(), allocations)
            })
        })
        .collect();
    found.sort();
    found
}

/// The agents on the Kubernetes datastore (issue 17: nothing in etcd). An IPPool applied with kubectl is
/// judged by the agents themselves (ready; a later pool overlapping it refused with the reason), a pod on
/// each node gets an address of it from an IPAMBlock resource its node claimed, the pods reach each other
/// across the nodes (routes from the block objects and the Node objects), `kubectl get ippool` counts them,
/// and once the pods are deleted their addresses are released in the blocks and the pool can be deleted.
#[test]
fn the_agents_allocate_on_the_kubernetes_datastore() {
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    let _blocks = EmptyBlocksGone(&kubectl, "kd-pool");
    let _cleanup = Cleanup(
        &kubectl,
        &[
            &["delete", "ipamblock", "10-141-0-0-28", "--ignore-not-found"],
            &["delete", "namespace", "kd-ns", "--ignore-not-found", "--timeout=120s"],
            &["delete", "ippool", "kd-pool", "kd-overlap", "kd-fourth", "--ignore-not-found", "--timeout=60s"],
        ],
    );
    let pool = |name: &str, cidr: &str| {
        format!(
            "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {{name: {name}}}\nspec:\n  cidr: {cidr}\n  blockSize: 28\n  allowedNamespaces: [kd-ns]\n"
        )
    };
    kubectl.ok_with(&["apply", "-f", "-"], Some(&pool("kd-pool", "10.140.0.0/24")));
    let (ready, reason, message) = verdict(&kubectl, "kd-pool", Duration::from_secs(90));
    assert!(ready, "{reason}: {message}");
    kubectl.ok_with(&["apply", "-f", "-"], Some(&pool("kd-overlap", "10.140.0.128/25")));
    let (ready, reason, message) = verdict(&kubectl, "kd-overlap", Duration::from_secs(60));
    assert!(!ready && reason == "Overlap" && message.contains("kd-pool"), "{ready} {reason}: {message}");
    kubectl.ok(&["create", "namespace", "kd-ns"]);
    kubectl.ok(&["annotate", "namespace", "kd-ns", "poolwarden.io/ipv4pools=[\"kd-pool\"]"]);
    pod_on(&kubectl, "kd-ns", "one", "pwk-node1", "exec sleep 3600");
    pod_on(&kubectl, "kd-ns", "two", "pwk-node2", "exec sleep 3600");
    for pod in ["one", "two"] {
        kubectl.ok(&["-n", "kd-ns", "wait", "--for=condition=Ready", &format!("pod/{pod}"), "--timeout=120s"]);
    }
    let (one, two) = (pod_ip(&kubectl, "kd-ns", "one"), pod_ip(&kubectl, "kd-ns", "two"));
    assert!(in_cidr(&one, [10, 140, 0, 0], 24) && in_cidr(&two, [10, 140, 0, 0], 24), "{one} {two}");
    let blocks = ipamblocks_in(&kubectl, [10, 140]);
    let owners: Vec<&str> = blocks.iter().map(|(_, affinity, _)| affinity.as_str()).collect();
    assert!(owners.contains(&"pwk-node1") && owners.contains(&"pwk-node2"), "{blocks:?}");
    let mut held: Vec<(String, String)> = blocks.iter().flat_map(|(_, _, a)| a.clone()).collect();
    held.sort();
    assert_eq!(held, [("pwk-node1".into(), "one".into()), ("pwk-node2".into(), "two".into())], "{blocks:?}");
    // Across the nodes, both ways: node1 routes node2's block to node2's InternalIP, and back.
    for (from, to) in [("one", &two), ("two", &one)] {
        let (ok, out, err) = kubectl.run(&["-n", "kd-ns", "exec", from, "--", "ping", "-c", "3", "-W", "2", to], None);
        assert!(ok, "{from} -> {to}: {out}{err}");
    }
    wait_for("the pool's status to count both pods", Duration::from_secs(60), || {
        kubectl.json(&["get", "ippool", "kd-pool"])["status"]["used"].as_u64() == Some(2)
    });
    println!("{}", kubectl.ok(&["get", "ippools", "kd-pool", "kd-overlap"]));
    println!("{}", kubectl.ok(&["get", "ipamblocks"]));
    // The commands in an agent's container read the same resources: the accepted pool only, both pods'
    // addresses with their node, the nodes as the Node objects, the firewall export with the namespace.
    let pools = agent_cli(&kubectl, &["get", "pools"]);
    assert!(pools.contains("kd-pool") && !pools.contains("kd-overlap"), "{pools}");
    let handles = agent_cli(&kubectl, &["get", "handles", "-o", "json"]);
    assert!(handles.contains(&one) && handles.contains(&two), "{handles}");
    let nodes = agent_cli(&kubectl, &["get", "nodes"]);
    assert!(nodes.contains("pwk-node1") && nodes.contains("10.250.0.12"), "{nodes}");
    let export = agent_cli(&kubectl, &["firewall", "export", "--format", "csv"]);
    assert!(export.contains("kd-pool,10.140.0.0/24,ipv4,kd-ns,kd-ns,"), "{export}");
    let (ok, out, err) = in_agent(&kubectl, &["apply", "-f", "-"], Some(&pool("kd-third", "10.140.0.0/16")));
    assert!(!ok && err.contains("overlaps pool \"kd-pool\""), "{out}{err}");
    assert!(!kubectl.run(&["get", "ippool", "kd-third"], None).0, "a refused pool was written");
    // A block object that does not read (the schema keeps any spec): its range may hold addresses, so
    // nothing is judged past it, and apply says which object to mend.
    let unreadable =
        "apiVersion: poolwarden.io/v1\nkind: IPAMBlock\nmetadata: {name: 10-141-0-0-28}\nspec: {cidr: 10.141.0.0/28}\n";
    kubectl.ok_with(&["create", "-f", "-"], Some(unreadable));
    let (ok, out, err) = in_agent(&kubectl, &["apply", "-f", "-"], Some(&pool("kd-third", "10.141.0.0/24")));
    assert!(!ok && err.contains("IPAMBlock \"10-141-0-0-28\" does not read"), "{out}{err}");
    assert!(!kubectl.run(&["get", "ippool", "kd-third"], None).0, "a refused pool was written");
    // A pool applied with kubectl meanwhile waits, and its status says for what; mended, it is judged.
    kubectl.ok_with(&["apply", "-f", "-"], Some(&pool("kd-fourth", "10.142.0.0/24")));
    let (ready, reason, message) = verdict(&kubectl, "kd-fourth", Duration::from_secs(60));
    assert!(!ready && reason == "UnreadableBlock" && message.contains("\"10-141-0-0-28\""), "{reason}: {message}");
    kubectl.ok(&["delete", "ipamblock", "10-141-0-0-28"]);
    wait_for("IPPool kd-fourth judged once the block is gone", Duration::from_secs(60), || {
        verdict(&kubectl, "kd-fourth", Duration::from_secs(10)).0
    });
    kubectl.ok(&["delete", "ippool", "kd-fourth", "--timeout=60s"]);
    let report = ipam_check(&kubectl);
    assert!(report.contains("ipam check: clean"), "{report}");

    kubectl.ok(&["delete", "namespace", "kd-ns", "--wait=true", "--timeout=120s"]);
    wait_for("the pods' addresses to be released in their blocks", Duration::from_secs(60), || {
        ipamblocks_in(&kubectl, [10, 140]).iter().all(|(_, _, held)| held.is_empty())
    });
    // Nothing allocated from it any more: the finalizer goes and the resource with it.
    kubectl.ok(&["delete", "ippool", "kd-pool", "kd-overlap", "--wait=true", "--timeout=60s"]);
    // Its firewall set stays, emptied by every export from now on (the lease holder recorded it retired).
    let export = agent_cli(&kubectl, &["firewall", "export"]);
    assert!(
        export.contains("flush set inet poolwarden_pools pool_kd_pool") && !export.contains("10.140.0.0/24"),
        "{export}"
    );
}

/// Nodes of the test's own on the cluster: a Node object each (no kubelet: the test's agents are theirs),
/// each a namespace on the cluster's bridge at `10.250.0.20x`; the objects are deleted when this is dropped.
struct TestNodes<'a> {
    kubectl: &'a Kubectl,
    nodes: Vec<poolwarden_tests::Node>,
}

impl<'a> TestNodes<'a> {
    fn create(kubectl: &'a Kubectl, names: &[&str]) -> Self {
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let address = format!("10.250.0.{}", 201 + i);
            let node = json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"poolwarden.io/test-node": "true"}},
                "status": {"addresses": [{"type": "InternalIP", "address": address}]},
            });
            kubectl.ok_with(&["create", "-f", "-"], Some(&node.to_string()));
            let node = poolwarden_tests::Node::in_cluster(&address, name, "kubernetes");
            poolwarden_tests::attach_to_bridge("pwk-fabric", &node.ns, &format!("{address}/24"), "fabric0");
            nodes.push(node);
        }
        Self { kubectl, nodes }
    }
}

impl Drop for TestNodes<'_> {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill_agent();
        }
        for node in &self.nodes {
            self.kubectl.run(&["delete", "node", &node.name, "--wait=false"], None);
        }
    }
}

/// What a test made, deleted when it ends (passed or failed): kubectl commands run on drop, in order.
struct Cleanup<'a>(&'a Kubectl, &'a [&'a [&'a str]]);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for command in self.1 {
            self.0.run(command, None);
        }
    }
}

/// How many addresses an IPAMBlock object (as kubectl prints it) holds.
fn held_in(block: &Value) -> usize {
    block["spec"]["allocations"].as_object().map_or(0, serde_json::Map::len)
}

/// When dropped (after the test's other cleanup, when declared before it): the pool's IPAMBlock objects that
/// hold nothing are deleted (the agents would give them back after the grace period); one still holding an
/// address stays, for the agents and the next `OnEtcdDatastore::switch` to find.
struct EmptyBlocksGone<'a>(&'a Kubectl, &'a str);

impl Drop for EmptyBlocksGone<'_> {
    fn drop(&mut self) {
        let (ok, out, _) =
            self.0.run(&["get", "ipamblocks", "-l", &format!("poolwarden.io/pool={}", self.1), "-o", "json"], None);
        let listed: Value = if ok { serde_json::from_str(&out).unwrap_or_default() } else { Value::Null };
        for block in listed["items"].as_array().into_iter().flatten() {
            if held_in(block) == 0
                && let Some(name) = block["metadata"]["name"].as_str()
            {
                self.0.run(&["delete", "ipamblock", name, "--ignore-not-found"], None);
            }
        }
    }
}

/// The IPAMBlock resources as objects, checked as the conformance suite checks them (labels match what a
/// block holds, no address both allocated and free, no two blocks overlapping, no handle holding two
/// addresses of a family).
fn checked_blocks(kubectl: &Kubectl) -> Vec<poolwarden::ipam::Block> {
    let listed = kubectl.json(&["get", "ipamblocks"]);
    let objects: Vec<poolwarden::objects::Object> = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| poolwarden::objects::Object {
            name: item["metadata"]["name"].as_str().unwrap_or_default().to_string(),
            version: item["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string(),
            labels: serde_json::from_value(item["metadata"]["labels"].clone()).unwrap_or_default(),
            spec: item["spec"].clone(),
        })
        .collect();
    poolwarden::allocator::single::conformance::checked(&objects)
}

/// Issue 17's torture through agents on the Kubernetes datastore: 1,000 CNI operations (ADD, then DEL, of 500
/// attachments) over two nodes of the test's own, 20 at a time, their agents on `--datastore kubernetes`
/// (blocks as IPAMBlock resources, the pool an IPPool resource judged by the agents), while one agent is
/// killed (-9) and started again at once, the kube-apiserver is killed (-9) and started again, and the other
/// agent is killed and kept down for nine seconds. Small blocks given back as soon as they are empty, so
/// claims and give-backs run all through. No address is ever held by two attachments, nothing is held once the
/// collector has run (an ADD cut off by a kill leaves an address for it), every block object passes the
/// invariant checks, and no pod route is left on either node. The ADDs name a namespace and no pod: the
/// agents' pod lookups are not what is tortured (500 pod objects bound to nodes without a kubelet would only
/// add the node lifecycle controller's evictions).
#[test]
fn a_thousand_operations_through_agents_and_an_api_server_restart_on_the_kubernetes_datastore() {
    const PODS: usize = 500;
    const IN_FLIGHT: usize = 20;
    let Some(dir) = cluster() else { return };
    let kubectl = Kubectl::new(&dir);
    let (exists, _, _) = kubectl.run(&["get", "ipamconfig", "default"], None);
    assert!(!exists, "an IPAMConfig default is left from another test");
    let _blocks = EmptyBlocksGone(&kubectl, "kd-churn");
    let _cleanup = Cleanup(
        &kubectl,
        &[
            &["delete", "namespace", "kd-torture", "--ignore-not-found", "--wait=false"],
            &["delete", "ipamconfig", "default", "--ignore-not-found"],
            &["delete", "ippool", "kd-churn", "--ignore-not-found", "--timeout=60s"],
        ],
    );
    kubectl.ok_with(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {emptyBlockGraceSeconds: 0}\n---\n\
             apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: kd-churn}\nspec: {cidr: 10.141.0.0/22, blockSize: 29, allowedNamespaces: [kd-torture]}\n",
        ),
    );
    let (ready, reason, message) = verdict(&kubectl, "kd-churn", Duration::from_secs(90));
    assert!(ready, "{reason}: {message}");
    kubectl.ok(&["create", "namespace", "kd-torture"]);
    kubectl.ok(&["annotate", "namespace", "kd-torture", "poolwarden.io/ipv4pools=[\"kd-churn\"]"]);
    let mut test_nodes = TestNodes::create(&kubectl, &["pwt-kd-a", "pwt-kd-b"]);
    let kubeconfig = dir.join("admin.kubeconfig").display().to_string();
    let agent_args = |address: &str| {
        vec![
            "--kubernetes".to_string(),
            "--kubeconfig".to_string(),
            kubeconfig.clone(),
            "--node-address".to_string(),
            address.to_string(),
            "--registration-ttl".to_string(),
            "5s".to_string(),
            "--leak-grace-period".to_string(),
            "2s".to_string(),
        ]
    };
    let start = |node: &mut poolwarden_tests::Node| {
        let args = agent_args(&node.address);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        node.start_agent_with(&args);
    };
    for node in &mut test_nodes.nodes {
        start(node);
    }
    let runtimes: Vec<poolwarden_tests::Runtime> =
        test_nodes.nodes.iter().map(poolwarden_tests::Node::runtime).collect();
    let live: std::sync::Mutex<std::collections::BTreeMap<String, String>> = std::sync::Mutex::default();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let failed_adds: std::sync::Mutex<Vec<String>> = std::sync::Mutex::default();
    let working = std::sync::atomic::AtomicUsize::new(IN_FLIGHT);
    struct Leaving<'a>(&'a std::sync::atomic::AtomicUsize);
    impl Drop for Leaving<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    use std::sync::atomic::Ordering::SeqCst;
    let started = Instant::now();
    let mut api_down = Duration::ZERO;
    std::thread::scope(|scope| {
        for _ in 0..IN_FLIGHT {
            scope.spawn(|| {
                let _leaving = Leaving(&working);
                loop {
                    let i = next.fetch_add(1, SeqCst);
                    if i >= PODS {
                        return;
                    }
                    let runtime = &runtimes[i % runtimes.len()];
                    let pod = poolwarden_tests::NetNs::new("pwt");
                    let container = format!("kd{i}");
                    let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=kd-torture";
                    let (ok, result) = runtime.cni("ADD", &container, &pod.path(), args);
                    if ok {
                        let cidr = result["ips"][0]["address"].as_str().expect("address").to_string();
                        let address = cidr.split('/').next().expect("address").to_string();
                        if let Some(other) = live.lock().expect("live").insert(address.clone(), container.clone()) {
                            panic!("{address} handed to {container} while {other} still holds it");
                        }
                        std::thread::sleep(Duration::from_millis(20));
                        // Released from the live set before its DEL: once the DEL is asked, the address may
                        // go to another ADD as soon as the agent answers (before this thread hears it).
                        live.lock().expect("live").remove(&address);
                        runtime.del_until_done(&container, &pod.path(), args, Duration::from_secs(120), |_| {});
                    } else {
                        failed_adds.lock().expect("failures").push(result["msg"].as_str().unwrap_or("?").to_string());
                        runtime.del_until_done(&container, &pod.path(), args, Duration::from_secs(120), |_| {});
                    }
                    done.fetch_add(2, SeqCst);
                }
            });
        }
        let wait_until = |ops: usize| {
            while done.load(SeqCst) < ops && next.load(SeqCst) < PODS && working.load(SeqCst) > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        wait_until(2 * PODS / 4);
        test_nodes.nodes[0].kill_agent();
        std::thread::sleep(Duration::from_millis(800));
        start(&mut test_nodes.nodes[0]);
        wait_until(2 * PODS * 2 / 5);
        api_down = restart_api_server(&dir);
        wait_until(2 * PODS * 3 / 5);
        test_nodes.nodes[1].kill_agent();
        std::thread::sleep(Duration::from_secs(9));
        start(&mut test_nodes.nodes[1]);
    });
    let took = started.elapsed();
    assert_eq!(done.load(SeqCst), 2 * PODS, "every attachment was added (or its ADD failed) and deleted");
    let failures = failed_adds.into_inner().expect("failures");
    let mut reasons: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for failure in &failures {
        *reasons.entry(failure.as_str()).or_default() += 1;
    }
    println!(
        "{} operations in {took:.1?} (the API server down for {api_down:.1?}); {} of {PODS} ADDs failed while an \
         agent or the API server was down: {reasons:?}",
        2 * PODS,
        failures.len()
    );
    assert!(failures.len() < PODS / 5, "most ADDs must succeed, or nothing was tortured: {reasons:?}");
    // Whatever an interrupted ADD left is collected after the grace period; every block passes the checks.
    let held = |kubectl: &Kubectl| -> usize {
        checked_blocks(kubectl).iter().filter(|b| b.pool == "kd-churn").map(|b| b.allocations.len()).sum()
    };
    wait_for("every address of the run to be released", Duration::from_secs(60), || held(&kubectl) == 0);
    for (node, other) in test_nodes.nodes.iter().zip(["pwt-kd-b", "pwt-kd-a"]) {
        // The other node's Node object exists all along: none of its addresses is ever taken.
        let log = node.agent_log();
        let taken = log.lines().find(|l| l.contains("released a leaked") && l.contains(&format!("node={other}")));
        assert!(taken.is_none(), "{} took {other}'s address: {taken:?}", node.name);
        let routes = node.ns.exec(&["ip", "route", "show", "proto", "97"]);
        assert!(!routes.contains("dev pw"), "pod routes left on {}:\n{routes}", node.name);
    }
    let check = test_nodes.nodes[0].cli(&["--kubeconfig", &kubeconfig, "ipam", "check"]);
    let said = String::from_utf8_lossy(&check.stdout).into_owned() + &String::from_utf8_lossy(&check.stderr);
    println!("{said}");
    assert!(check.status.success() && said.contains("ipam check: clean"), "{said}");
    // The blocks go back as their nodes give them back (the grace is 0 here).
    wait_for("the run's blocks to be given back", Duration::from_secs(90), || {
        checked_blocks(&kubectl).iter().all(|b| b.pool != "kd-churn")
    });
}
