//! Harness for the privileged tests: network namespaces and agent processes that remove themselves when
//! dropped (also when a test panics), and the plugin invoked exactly as kubelet invokes it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

pub mod etcd;

/// Whether privileged tests can run here. When they cannot, the caller prints why and returns, unless
/// `POOLWARDEN_REQUIRE_PRIVILEGED` is set (CI sets it), in which case this panics.
pub fn privileged() -> bool {
    let root = nix_is_root();
    let has_ip = Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success());
    if root && has_ip {
        return true;
    }
    let why = if root { "the ip command (iproute2) is missing" } else { "not running as root" };
    assert!(std::env::var_os("POOLWARDEN_REQUIRE_PRIVILEGED").is_none(), "privileged tests required but {why}");
    eprintln!("SKIPPED: {why}; privileged tests need root and iproute2 (cargo xtask test runs them)");
    false
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// A workspace binary built next to this test (`cargo xtask test` builds them first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first (cargo xtask test does)",
        path.display()
    );
    path
}

/// The CNI plugin the tests run: the static build `cargo xtask test` makes (as it ships), named by
/// `POOLWARDEN_CNI_PLUGIN`, else the workspace's own build.
pub fn plugin_binary() -> PathBuf {
    match std::env::var_os("POOLWARDEN_CNI_PLUGIN") {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(path.is_file(), "POOLWARDEN_CNI_PLUGIN names {}, which is not a file", path.display());
            path
        }
        None => binary("poolwarden-cni"),
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name unique to this process and call, short enough for an interface or namespace.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id() % 100_000, COUNTER.fetch_add(1, Ordering::SeqCst))
}

/// Run a command, panicking with its output if it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace created for the test and deleted on drop.
pub struct NetNs {
    /// Its name under /var/run/netns.
    pub name: String,
}

impl NetNs {
    /// Create a namespace with loopback up.
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        sh("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The path runtimes pass as `CNI_NETNS`.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Run a command inside, panicking on failure; returns stdout.
    pub fn exec(&self, command: &[&str]) -> String {
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend_from_slice(command);
        sh("ip", &args)
    }

    /// Run a command inside; returns whether it succeeded.
    pub fn try_exec(&self, command: &[&str]) -> bool {
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend_from_slice(command);
        Command::new("ip").args(&args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    }

    /// Whether one ping to `address` is answered.
    pub fn pings(&self, address: &str) -> bool {
        self.try_exec(&["ping", "-c", "1", "-W", "2", address])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

/// A node: a namespace with an address on loopback, a datastore and (when started) an agent.
pub struct Node {
    /// The node's namespace.
    pub ns: NetNs,
    /// The node's address (on its loopback).
    pub address: String,
    /// Holds the datastore and socket.
    pub dir: tempfile::TempDir,
    /// The node's name.
    pub name: String,
    /// `--datastore` for this node's agent and CLI.
    store: String,
    agent: Option<Child>,
}

impl Node {
    /// A new node namespace; `address` goes on its loopback.
    pub fn new(address: &str) -> Self {
        let ns = NetNs::new("pwn");
        ns.exec(&["ip", "addr", "add", &format!("{address}/32"), "dev", "lo"]);
        // Forwarding stays off, as in a new namespace: the agent turns it on for its pools' families.
        let dir = tempfile::tempdir().expect("temp dir");
        // A bpffs of the node's own, mounted in this (the host's) mount namespace so that it outlives the
        // agent process, whose `ip netns exec` mount namespace dies with it: enforcement must survive a kill.
        let bpffs = dir.path().join("bpf");
        std::fs::create_dir_all(&bpffs).expect("bpf dir");
        sh("mount", &["-t", "bpf", "bpf", &bpffs.display().to_string()]);
        let store = format!("embedded:{}", dir.path().join("store.redb").display());
        let node = Self { ns, address: address.to_string(), dir, name: "node-0".to_string(), store, agent: None };
        let cni_path = node.cni_path();
        std::fs::create_dir_all(&cni_path).expect("cni-bin");
        std::os::unix::fs::symlink(plugin_binary(), cni_path.join("poolwarden-cni")).expect("link plugin");
        for entry in std::fs::read_dir(DEBIAN_PLUGINS).into_iter().flatten().flatten() {
            let _ = std::os::unix::fs::symlink(entry.path(), cni_path.join(entry.file_name()));
        }
        node
    }

    /// A node of a cluster: named `name`, on the shared `datastore` (etcd:...), its CLI run inside its
    /// namespace (where the datastore is reachable).
    pub fn in_cluster(address: &str, name: &str, datastore: &str) -> Self {
        let mut node = Self::new(address);
        node.name = name.to_string();
        node.store = datastore.to_string();
        node
    }

    /// `--datastore` for this node.
    pub fn datastore(&self) -> String {
        self.store.clone()
    }

    /// Where the agent pins its enforcement maps and links.
    pub fn bpf_dir(&self) -> String {
        self.dir.path().join("bpf/poolwarden").display().to_string()
    }

    /// The agent's socket.
    pub fn socket(&self) -> String {
        self.dir.path().join("agent.sock").display().to_string()
    }

    /// Run the CLI against this node's datastore (through the agent's socket while the agent holds it).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(binary("poolwarden"))
            .args(args)
            .env("POOLWARDEN_DATASTORE", self.datastore())
            .env("POOLWARDEN_SOCKET", self.socket())
            .output()
            .expect("run poolwarden")
    }

    /// Run the CLI, panicking if it fails.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "poolwarden {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Apply YAML text.
    pub fn apply(&self, yaml: &str) {
        let file = self.dir.path().join(unique("apply-") + ".yaml");
        std::fs::write(&file, yaml).expect("write yaml");
        self.cli_ok(&["apply", "-f", &file.display().to_string()]);
    }

    /// Start the agent inside the node's namespace and wait until it answers.
    pub fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// Start the agent with extra arguments.
    pub fn start_agent_with(&mut self, extra: &[&str]) {
        assert!(self.agent.is_none(), "agent already running");
        let log = std::fs::File::create(self.dir.path().join("agent.log")).expect("agent log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(binary("poolwarden"))
            .args(["agent", "--node", &self.name, "--socket", &self.socket(), "--metrics-addr", "127.0.0.1:9641"])
            .args(["--bpf-dir", &self.bpf_dir()])
            .args(extra)
            .env("POOLWARDEN_DATASTORE", self.datastore())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start agent");
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(Instant::now() < deadline, "agent did not come up:\n{}", self.agent_log());
            if let Some(child) = self.agent.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("agent exited with {status}:\n{}", self.agent_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// SIGKILL the agent (by its PID) and wait for it.
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM the agent and wait for it to exit.
    pub fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }

    /// The node's routes.
    pub fn routes(&self) -> String {
        self.ns.exec(&["ip", "route", "show"]) + &self.ns.exec(&["ip", "-6", "route", "show"])
    }

    /// Invoke the plugin in the node's namespace exactly as kubelet does: environment and stdin.
    pub fn cni(&self, command: &str, container: &str, pod_netns: &str, args: &str, conf: &Value) -> (bool, Value) {
        self.plugin("poolwarden-cni", command, container, pod_netns, args, conf)
    }

    /// A CNI_PATH holding poolwarden-cni and Debian's reference plugins (made with the node).
    pub fn cni_path(&self) -> PathBuf {
        self.dir.path().join("cni-bin")
    }

    /// Invoke any plugin from [`Node::cni_path`] by its type, in the node's namespace.
    pub fn plugin(
        &self,
        plugin_type: &str,
        command: &str,
        container: &str,
        pod_netns: &str,
        args: &str,
        conf: &Value,
    ) -> (bool, Value) {
        self.runtime().plugin(plugin_type, command, container, pod_netns, args, conf)
    }

    /// What a container runtime on this node needs to run the plugin, owned, for other threads.
    pub fn runtime(&self) -> Runtime {
        Runtime { node_ns: self.ns.name.clone(), cni_path: self.cni_path(), conf: self.conf(json!({})) }
    }

    /// A new pod namespace wired by ADD (default network configuration), asserting it succeeded.
    pub fn add_pod(&self, container: &str, namespace: &str, pod: &str) -> (NetNs, Value) {
        let pod_ns = NetNs::new("pwp");
        let (ok, result) = self.cni("ADD", container, &pod_ns.path(), &k8s_args(namespace, pod), &self.conf(json!({})));
        assert!(ok, "ADD {container}: {result}\n{}", self.agent_log());
        (pod_ns, result)
    }

    /// A network configuration for this node's agent.
    pub fn conf(&self, extra: Value) -> Value {
        let mut conf =
            json!({ "cniVersion": "1.0.0", "name": "poolwarden", "type": "poolwarden-cni", "socket": self.socket() });
        if let (Some(map), Some(extra)) = (conf.as_object_mut(), extra.as_object()) {
            map.extend(extra.clone());
        }
        conf
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
        let _ = Command::new("umount").arg("-l").arg(self.dir.path().join("bpf")).status();
    }
}

/// A layer-2 segment: a namespace holding a bridge, and a veth from it into each namespace attached.
pub struct Fabric {
    /// The namespace holding the bridge.
    pub ns: NetNs,
}

impl Fabric {
    /// A new segment.
    pub fn new() -> Self {
        let ns = NetNs::new("pwf");
        ns.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        ns.exec(&["ip", "link", "set", "br0", "up"]);
        Self { ns }
    }

    /// Plug `ns` into the segment with `address` (CIDR) on its interface `fabric0`.
    pub fn attach(&self, ns: &NetNs, address: &str) {
        self.attach_as(ns, address, "fabric0");
    }

    /// Plug `ns` into the segment with `address` (CIDR) on its interface `ifname`.
    pub fn attach_as(&self, ns: &NetNs, address: &str, ifname: &str) {
        attach_to_bridge(&self.ns.name, ns, address, ifname);
    }
}

/// Plug `ns` into the bridge `br0` of the namespace `fabric` (a [`Fabric`]'s, or a test cluster's) with
/// `address` (CIDR) on its interface `ifname`; the veth goes with `ns`.
pub fn attach_to_bridge(fabric: &str, ns: &NetNs, address: &str, ifname: &str) {
    let port = unique("pwfp");
    sh("ip", &["link", "add", &port, "netns", fabric, "type", "veth", "peer", "name", ifname, "netns", &ns.name]);
    sh("ip", &["-n", fabric, "link", "set", &port, "master", "br0", "up"]);
    ns.exec(&["ip", "addr", "add", address, "dev", ifname]);
    ns.exec(&["ip", "link", "set", ifname, "up"]);
}

impl Default for Fabric {
    fn default() -> Self {
        Self::new()
    }
}

/// A cluster's datastore on `fabric`: an etcd cluster of `n` members, each in a namespace of its own at
/// 10.99.0.101, .102, ... (the namespaces are returned so they outlive the members).
pub fn etcd_on(fabric: &Fabric, n: usize) -> (Vec<NetNs>, etcd::EtcdCluster) {
    let namespaces: Vec<NetNs> = (0..n).map(|_| NetNs::new("pwe")).collect();
    let mut placements = Vec::new();
    for (i, ns) in namespaces.iter().enumerate() {
        let address = format!("10.99.0.{}", 101 + i);
        fabric.attach(ns, &format!("{address}/24"));
        placements.push(etcd::Placement { netns: Some(ns.name.clone()), address, client_port: 2379, peer_port: 2380 });
    }
    (namespaces, etcd::EtcdCluster::start(placements))
}

/// `n` nodes `node-0`, `node-1`, ... on `fabric` at 10.99.0.1, .2, ..., on `cluster`, agents not started.
pub fn nodes_on(fabric: &Fabric, cluster: &etcd::EtcdCluster, n: usize) -> Vec<Node> {
    (0..n)
        .map(|i| {
            let address = format!("10.99.0.{}", i + 1);
            let node = Node::in_cluster(&address, &format!("node-{i}"), &cluster.datastore());
            fabric.attach(&node.ns, &format!("{address}/24"));
            node
        })
        .collect()
}

/// A node's container runtime: runs the plugin in the node's namespace as kubelet does.
#[derive(Clone, Debug)]
pub struct Runtime {
    node_ns: String,
    cni_path: PathBuf,
    /// The node's default network configuration.
    pub conf: Value,
}

impl Runtime {
    /// Invoke a plugin by its type with the environment and stdin kubelet gives it.
    pub fn plugin(
        &self,
        plugin_type: &str,
        command: &str,
        container: &str,
        pod_netns: &str,
        args: &str,
        conf: &Value,
    ) -> (bool, Value) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.node_ns])
            .arg(self.cni_path.join(plugin_type))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", pod_netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cni_path)
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().expect("stdin").write_all(conf.to_string().as_bytes())?;
                child.wait_with_output()
            })
            .expect("run poolwarden-cni");
        let text = String::from_utf8_lossy(&out.stdout);
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("plugin printed non-JSON ({e}): {text}"))
        };
        (out.status.success(), value)
    }

    /// `poolwarden-cni` with the node's default configuration.
    pub fn cni(&self, command: &str, container: &str, pod_netns: &str, args: &str) -> (bool, Value) {
        self.plugin("poolwarden-cni", command, container, pod_netns, args, &self.conf)
    }

    /// Like kubelet: a failed ADD is followed by DEL, and a DEL is retried until it succeeds. `asking` is told
    /// whether an attempt so far may have reached the agent: true before each attempt, and after an attempt that
    /// provably did not (the plugin could not connect) whatever the earlier attempts left it at. An attempt
    /// whose answer was lost may have released the address, and a later refused attempt does not undo that.
    pub fn del_until_done(&self, container: &str, netns: &str, args: &str, limit: Duration, asking: impl Fn(bool)) {
        let deadline = Instant::now() + limit;
        let mut reached = false;
        loop {
            asking(true);
            let (ok, out) = self.cni("DEL", container, netns, args);
            if ok {
                return;
            }
            // Refused or no socket at all: the request never reached an agent.
            let details = out["details"].as_str().unwrap_or_default();
            if out["msg"].as_str().is_some_and(|m| m.contains("agent is not reachable"))
                && (details.contains("Connection refused") || details.contains("No such file or directory"))
            {
                asking(reached);
            } else {
                reached = true;
            }
            assert!(Instant::now() < deadline, "DEL {container} kept failing: {out}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Where Debian's containernetworking-plugins live.
pub const DEBIAN_PLUGINS: &str = "/usr/lib/cni";

/// Whether Debian's reference plugins are installed (cargo xtask setup installs them); prints why not.
pub fn debian_plugins() -> bool {
    if Path::new(DEBIAN_PLUGINS).join("bridge").is_file() {
        return true;
    }
    assert!(
        std::env::var_os("POOLWARDEN_REQUIRE_PRIVILEGED").is_none(),
        "Debian's containernetworking-plugins are required; run cargo xtask setup"
    );
    eprintln!("SKIPPED: {DEBIAN_PLUGINS}/bridge is missing; cargo xtask setup installs containernetworking-plugins");
    false
}

/// Run a network configuration list the way libcni does: ADD through the plugins in order, each given the
/// previous result as `prevResult`; DEL in reverse order, each given the ADD's final result.
pub fn run_chain(
    node: &Node,
    list: &Value,
    command: &str,
    container: &str,
    netns: &str,
    args: &str,
    prev: Option<&Value>,
) -> (bool, Value) {
    let plugins = list["plugins"].as_array().expect("plugins");
    let order: Vec<&Value> = if command == "DEL" { plugins.iter().rev().collect() } else { plugins.iter().collect() };
    let mut result = prev.cloned();
    for plugin in order {
        let mut conf = plugin.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if let Some(runtime) = list.get("runtimeConfig") {
            conf["runtimeConfig"] = runtime.clone();
        }
        if let Some(prev) = &result {
            conf["prevResult"] = prev.clone();
        }
        let plugin_type = plugin["type"].as_str().expect("type");
        let (ok, out) = node.plugin(plugin_type, command, container, netns, args, &conf);
        if !ok {
            return (false, json!({ "plugin": plugin_type, "error": out }));
        }
        if command == "ADD" {
            result = Some(out);
        }
    }
    (true, result.unwrap_or(Value::Null))
}

/// The first address of a CNI result, without its prefix length.
pub fn address_of(result: &Value) -> String {
    let cidr = result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no address in {result}"));
    cidr.split('/').next().unwrap_or_default().to_string()
}

/// Check `done` every 50 ms until it holds; panic naming `what` once `timeout` has passed.
pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The CNI_ARGS kubelet passes for a pod.
pub fn k8s_args(namespace: &str, pod: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={pod}")
}

/// The test cluster's directory (`POOLWARDEN_CLUSTER`, else `target/cluster`), when one is up: its admin
/// kubeconfig and its control plane's namespace exist.
pub fn cluster_up() -> Option<PathBuf> {
    let dir = std::env::var_os("POOLWARDEN_CLUSTER")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cluster"));
    (dir.join("admin.kubeconfig").exists() && std::path::Path::new("/run/netns/pwk-cp").exists()).then_some(dir)
}

/// The `poolwarden_kubernetes_requests_total` counters of an agent's metrics text: (verb, resource) -> count.
pub fn api_requests(metrics: &str) -> std::collections::BTreeMap<(String, String), f64> {
    metrics
        .lines()
        .filter_map(|line| {
            let labels = line.strip_prefix("poolwarden_kubernetes_requests_total{")?;
            let label = |name: &str| -> Option<String> {
                let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
                Some(labels[start..].split('"').next()?.to_string())
            };
            let value = line.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some(((label("verb")?, label("resource")?), value))
        })
        .collect()
}
