//! `cargo xtask demo`: the seed's example, for real, on this machine: a node namespace running the agent on
//! the embedded datastore, the two pools applied as Calico YAML, two annotated namespaces, and three pods in
//! each, wired by `poolwarden-cni` exactly as kubelet invokes it and each serving HTTP from its address.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

const SEED_POOLS: &str = include_str!("../../examples/calico/seed-pools.yaml");

/// Everything the demo made, removed on drop unless kept.
struct Made {
    netns: Vec<String>,
    children: Vec<Child>,
    dir: PathBuf,
    keep: bool,
}

impl Drop for Made {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Servers first (they are at the front), then the agent, then the namespaces and the files.
        for child in &mut self.children {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
        for ns in self.netns.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn add_netns(name: &str) -> Result<()> {
    let status = Command::new("ip").args(["netns", "add", name]).status().context("run ip netns add")?;
    if !status.success() {
        bail!("ip netns add {name} failed");
    }
    Ok(())
}

fn ip_netns(ns: &str, command: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(command)
        .output()
        .with_context(|| format!("run {command:?} in {ns}"))?;
    if !out.status.success() {
        bail!("{command:?} in {ns} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cni(
    plugin: &Path,
    node_ns: &str,
    command: &str,
    container: &str,
    netns: &str,
    args: &str,
    conf: &str,
) -> Result<serde_like::Reply> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("run poolwarden-cni")?;
    child.stdin.take().context("plugin stdin")?.write_all(conf.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(serde_like::Reply { ok: out.status.success(), text: String::from_utf8_lossy(&out.stdout).trim().to_string() })
}

/// Just enough JSON reading for the plugin's answer, without a JSON dependency in xtask.
mod serde_like {
    pub struct Reply {
        pub ok: bool,
        pub text: String,
    }

    impl Reply {
        /// The first `"address":"..."` value without its prefix length.
        pub fn address(&self) -> Option<String> {
            let start = self.text.find("\"address\":\"")? + "\"address\":\"".len();
            let rest = &self.text[start..];
            Some(rest[..rest.find('"')?].split('/').next()?.to_string())
        }

        /// The `"msg":"..."` of an error.
        pub fn message(&self) -> String {
            self.text
                .find("\"msg\":\"")
                .map(|i| {
                    let rest = &self.text[i + 7..];
                    rest[..rest.find("\",").unwrap_or(rest.len())].replace("\\\"", "\"")
                })
                .unwrap_or_else(|| self.text.clone())
        }
    }
}

pub fn run(root: &Path, keep: bool) -> Result<()> {
    // Both packages, as the tests build them (the same features, so no dependency is built twice).
    super::run("cargo", &["build", "--release", "-p", "poolwarden", "-p", "poolwarden-cni", "--bins"])?;
    let poolwarden = root.join("target/release/poolwarden");
    let plugin = super::build_plugin(root, true)?;
    let tag = std::process::id() % 100_000;
    let dir = std::env::temp_dir().join(format!("poolwarden-demo-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let mut made = Made { netns: Vec::new(), children: Vec::new(), dir: dir.clone(), keep };
    let datastore = format!("embedded:{}", dir.join("store.redb").display());
    let socket = dir.join("agent.sock").display().to_string();
    let pw = |args: &[&str]| -> Result<String> {
        let out = Command::new(&poolwarden)
            .args(args)
            .env("POOLWARDEN_DATASTORE", &datastore)
            .env("POOLWARDEN_SOCKET", &socket)
            .output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let step = |title: &str, command: &str| println!("\n== {title}\n$ {command}");

    // The node: its own namespace, an address on loopback, forwarding on, the agent inside.
    let node_ns = format!("pwdemo-node-{tag}");
    let node_address = "10.255.255.1";
    add_netns(&node_ns)?;
    made.netns.push(node_ns.clone());
    ip_netns(&node_ns, &["ip", "link", "set", "lo", "up"])?;
    ip_netns(&node_ns, &["ip", "addr", "add", &format!("{node_address}/32"), "dev", "lo"])?;
    ip_netns(&node_ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;

    step(
        "Step 1: create the pools (the seed's Calico YAML, unchanged)",
        "poolwarden apply -f examples/calico/seed-pools.yaml",
    );
    let pools = root.join("examples/calico/seed-pools.yaml");
    print!("{}", pw(&["apply", "-f", &pools.display().to_string()])?);

    step(
        "Start the node agent (embedded datastore)",
        &format!("ip netns exec {node_ns} poolwarden agent --node node-0"),
    );
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let agent = Command::new("ip")
        .args(["netns", "exec", &node_ns])
        .arg(&poolwarden)
        .args(["agent", "--node", "node-0", "--socket", &socket])
        .env("POOLWARDEN_DATASTORE", &datastore)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    made.children.push(agent);
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > deadline {
            bail!("the agent did not start: {}", std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("agent ready on {socket}");
    print!("{}", pw(&["get", "pools", "-o", "wide"])?);

    step(
        "Step 2: assign each pool to a namespace",
        "poolwarden annotate namespace external-ns 'poolwarden.io/ipv4pools=[\"external-pool\"]' (and internal-ns)",
    );
    print!("{}", pw(&["annotate", "namespace", "external-ns", "poolwarden.io/ipv4pools=[\"external-pool\"]"])?);
    print!("{}", pw(&["annotate", "namespace", "internal-ns", "cni.projectcalico.org/ipv4pools=[\"internal-pool\"]"])?);
    print!("{}", pw(&["get", "namespaces"])?);

    step(
        "Step 3: three pods in each namespace, wired by poolwarden-cni as kubelet runs it",
        "CNI_COMMAND=ADD ... poolwarden-cni < conflist",
    );
    let conf = format!(r#"{{"cniVersion":"1.0.0","name":"poolwarden","type":"poolwarden-cni","socket":"{socket}"}}"#);
    let mut pods = Vec::new();
    for namespace in ["external-ns", "internal-ns"] {
        for i in 1..=3 {
            let pod = format!("nginx-{i}");
            let pod_ns = format!("pwdemo-{}-{i}-{tag}", &namespace[..3]);
            add_netns(&pod_ns)?;
            made.netns.push(pod_ns.clone());
            let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}");
            let container = format!("{namespace}-{pod}-{tag}");
            let reply = cni(&plugin, &node_ns, "ADD", &container, &format!("/var/run/netns/{pod_ns}"), &args, &conf)?;
            if !reply.ok {
                bail!("ADD {namespace}/{pod} failed: {}", reply.text);
            }
            let ip = reply.address().context("no address in the ADD result")?;
            let pool = if ip.starts_with("172.16.") { "external-pool" } else { "internal-pool" };
            // A small HTTP server in the pod, bound to the pod's address only.
            let www = dir.join(&pod_ns);
            std::fs::create_dir_all(&www)?;
            std::fs::write(www.join("index.html"), format!("{namespace}/{pod} answering from {ip}\n"))?;
            let server = Command::new("ip")
                .args(["netns", "exec", &pod_ns, "python3", "-m", "http.server", "8080", "--bind", &ip, "--directory"])
                .arg(&www)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            made.children.insert(0, server);
            pods.push((namespace, pod, ip, pool, container, pod_ns));
        }
    }
    println!("{:<13}{:<10}{:<15}{:<15}NODE", "NAMESPACE", "NAME", "IP", "POOL");
    for (namespace, pod, ip, pool, _, _) in &pods {
        println!("{namespace:<13}{pod:<10}{ip:<15}{pool:<15}node-0");
    }

    step("Each pod answers from its own address (fetched from the node)", "curl http://<pod ip>:8080/");
    for (_, _, ip, _, _, _) in &pods {
        let url = format!("http://{ip}:8080/");
        let deadline = Instant::now() + Duration::from_secs(10);
        let body = loop {
            match ip_netns(&node_ns, &["curl", "-s", "--max-time", "2", &url]) {
                Ok(body) if body.contains(ip.as_str()) => break body,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                other => bail!("{url} did not answer from the node: {other:?}"),
            }
        };
        print!("{url:<28} -> {body}");
    }

    step("Pools and blocks", "poolwarden ipam show; poolwarden ipam show --blocks");
    print!("{}", pw(&["ipam", "show"])?);
    print!("{}", pw(&["ipam", "show", "--blocks"])?);
    step("The node's routes (protocol 97 is poolwarden's)", "ip route show proto 97");
    print!("{}", ip_netns(&node_ns, &["ip", "route", "show", "proto", "97"])?);

    step(
        "Step 4: bind external-pool to external-ns only (allowedNamespaces), then ask for it from namespace default",
        "poolwarden apply -f bound.yaml; CNI ADD with \"pools\": [\"external-pool\"] for a pod in default",
    );
    let bound = dir.join("bound.yaml");
    let first = SEED_POOLS.split("---").next().unwrap_or_default();
    std::fs::write(
        &bound,
        first.replace("natOutgoing: true", "natOutgoing: true\n  allowedNamespaces: [external-ns]"),
    )?;
    print!("{}", pw(&["apply", "-f", &bound.display().to_string()])?);
    let intruder_ns = format!("pwdemo-intruder-{tag}");
    add_netns(&intruder_ns)?;
    made.netns.push(intruder_ns.clone());
    let asking = conf.replace("\"type\"", "\"pools\":[\"external-pool\"],\"type\"");
    let reply = cni(
        &plugin,
        &node_ns,
        "ADD",
        &format!("intruder-{tag}"),
        &format!("/var/run/netns/{intruder_ns}"),
        "K8S_POD_NAMESPACE=default;K8S_POD_NAME=intruder",
        &asking,
    )?;
    if reply.ok {
        bail!("a pod in namespace default got an address from the bound pool: {}", reply.text);
    }
    println!("refused, as it must be: {}", reply.message());

    step(
        "Step 5: a pod sends from another pod's address (eBPF enforcement on its host veth)",
        "ip netns exec <pod> ping -I <other pod's ip> <node>; counted on arrival at the node",
    );
    let (_, _, liar_ip, _, _, liar_ns) = &pods[0];
    let (_, _, victim_ip, _, _, _) = &pods[1];
    ip_netns(&node_ns, &["iptables", "-t", "raw", "-I", "PREROUTING", "-s", victim_ip, "-j", "ACCEPT"])?;
    ip_netns(&node_ns, &["iptables", "-t", "raw", "-I", "PREROUTING", "-s", liar_ip, "-j", "ACCEPT"])?;
    let _ = ip_netns(liar_ns, &["ip", "addr", "add", &format!("{victim_ip}/32"), "dev", "eth0"]);
    let _ = ip_netns(liar_ns, &["ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", victim_ip, node_address]);
    let _ = ip_netns(liar_ns, &["ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", liar_ip, node_address]);
    let counters = ip_netns(&node_ns, &["iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-n", "-x"])?;
    let arrived = |source: &str| {
        counters
            .lines()
            .find(|l| l.split_whitespace().nth(7) == Some(source))
            .and_then(|l| l.split_whitespace().next().map(String::from))
    };
    println!(
        "packets that reached the node from {liar_ip} (its own address): {}; from {victim_ip} (spoofed): {}",
        arrived(liar_ip).unwrap_or_default(),
        arrived(victim_ip).unwrap_or_default()
    );
    print!("{}", pw(&["enforcement", "status"])?);

    step("Consistency", "poolwarden ipam check");
    print!("{}", pw(&["ipam", "check"])?);

    if keep {
        println!(
            "\nLeft running (--keep): node namespace {node_ns}, agent socket {socket}, datastore {}.",
            dir.display()
        );
        println!(
            "Explore: POOLWARDEN_SOCKET={socket} POOLWARDEN_DATASTORE={datastore} {} ipam show",
            poolwarden.display()
        );
        println!(
            "Clean up: kill the agent and servers (pgrep -a -f {}), then ip netns del each pwdemo-*-{tag}.",
            dir.display()
        );
    } else {
        step("Clean up: DEL every pod, stop the agent, remove the namespaces", "CNI_COMMAND=DEL ...");
        for (namespace, pod, _, _, container, pod_ns) in &pods {
            let reply = cni(&plugin, &node_ns, "DEL", container, &format!("/var/run/netns/{pod_ns}"), "", &conf)?;
            if !reply.ok {
                bail!("DEL {namespace}/{pod} failed: {}", reply.text);
            }
        }
        let left = ip_netns(&node_ns, &["ip", "route", "show", "proto", "97"])?;
        println!(
            "deleted 6 pods; what is left of ours is the blocks' blackholes, kept for the empty-block grace period:"
        );
        print!("{left}");
    }

    step(
        "Finally: what the external firewall needs, per pool: its CIDR, the namespaces allowed and assigned, NAT",
        "poolwarden firewall export --format nftables   (also: iptables, json, csv; --pool; --watch)",
    );
    print!("{}", pw(&["firewall", "export", "--format", "nftables"])?);
    print!("{}", pw(&["firewall", "export", "--format", "csv"])?);
    Ok(())
}
