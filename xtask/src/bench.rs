//! `cargo xtask bench`, CNI part: `poolwarden-cni` ADD and DEL against Debian's `bridge` + `host-local`,
//! side by side on the same kind of node namespace, 100 pods with a netns each, sequential and 10 at a
//! time; then the agent's resident memory with 1,000 endpoints.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

const PODS: usize = 100;
const BATCH: usize = 10;
const MEMORY_ENDPOINTS: usize = 1000;

struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }
}

impl Namespaces {
    fn add(&mut self, name: String) -> Result<String> {
        let status = Command::new("ip").args(["netns", "add", &name]).status()?;
        if !status.success() {
            bail!("ip netns add {name} failed");
        }
        self.0.push(name.clone());
        Ok(name)
    }
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

/// Moves the calling thread (only it: a network namespace is per thread) into the node's namespace, so that
/// what it spawns starts there, as a plugin exec'd by kubelet starts in the host's namespace.
fn enter(node_ns: &str) -> Result<()> {
    let path = format!("/var/run/netns/{node_ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("enter {path}"))
}

/// One CNI invocation from a thread in the node namespace: the plugin is exec'd directly, the way kubelet
/// (and containerd) exec it, so both plugins' figures hold their own exec and nothing of the harness's.
fn invoke(
    node_ns: &str,
    cni_path: &Path,
    plugin: &str,
    command: &str,
    container: &str,
    netns: &str,
    conf: &str,
) -> Result<Duration> {
    enter(node_ns)?;
    let started = Instant::now();
    let mut child = Command::new(cni_path.join(plugin))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", format!("/var/run/netns/{netns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bench")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {plugin}"))?;
    child.stdin.take().context("stdin")?.write_all(conf.as_bytes())?;
    let out = child.wait_with_output()?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        bail!(
            "{plugin} {command} {container} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(elapsed)
}

/// What every figure holds before any plugin code runs: the driver spawning `/bin/true` the same way.
fn exec_floor(node_ns: &str) -> Result<f64> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(node_ns)?;
                let mut samples = Vec::new();
                for _ in 0..PODS {
                    let started = Instant::now();
                    let out = Command::new("/bin/true")
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .output()?;
                    samples.push(started.elapsed());
                    if !out.status.success() {
                        bail!("/bin/true failed");
                    }
                }
                Ok(percentile(&mut samples, 0.5))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread panicked"))?
    })
}

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index].as_secs_f64() * 1000.0
}

struct Figures {
    add: Vec<Duration>,
    del: Vec<Duration>,
    wall_add: Duration,
    wall_del: Duration,
}

/// ADD then DEL `pods` through `plugin`, `parallel` at a time.
fn run_pods(
    node_ns: &str,
    cni_path: &Path,
    plugin: &str,
    conf: &str,
    pods: &[String],
    tag: &str,
    parallel: usize,
) -> Result<Figures> {
    let mut figures = Figures { add: Vec::new(), del: Vec::new(), wall_add: Duration::ZERO, wall_del: Duration::ZERO };
    for command in ["ADD", "DEL"] {
        let started = Instant::now();
        for chunk in pods.chunks(parallel) {
            let times: Vec<Result<Duration>> = std::thread::scope(|scope| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|pod| {
                        scope.spawn(move || {
                            invoke(node_ns, cni_path, plugin, command, &format!("{tag}-{pod}"), pod, conf)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked"))))
                    .collect()
            });
            for time in times {
                let time = time?;
                if command == "ADD" { figures.add.push(time) } else { figures.del.push(time) }
            }
        }
        if command == "ADD" { figures.wall_add = started.elapsed() } else { figures.wall_del = started.elapsed() }
    }
    Ok(figures)
}

fn wait_for_socket(socket: &Path, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if Instant::now() > deadline {
            bail!("agent did not start: {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn start_agent(poolwarden: &Path, node_ns: &str, dir: &Path, enforcement: &str) -> Result<(Agent, PathBuf)> {
    let socket = dir.join("agent.sock");
    let log = dir.join("agent.log");
    let child = Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(poolwarden)
        .args(["agent", "--node", "bench-node", "--enforcement", enforcement, "--socket"])
        .arg(&socket)
        .env("POOLWARDEN_DATASTORE", format!("embedded:{}", dir.join("store.redb").display()))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let agent = Agent(child);
    wait_for_socket(&socket, &log)?;
    Ok((agent, socket))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// The bench row of ADDs whose enforcement attaches as a TCX link.
const TCX_LABEL: &str = "poolwarden-cni, enforcing on TCX";

pub fn run(root: &Path) -> Result<()> {
    // Both packages, as the tests build them (the same features, so no dependency is built twice).
    super::run("cargo", &["build", "--release", "-p", "poolwarden", "-p", "poolwarden-cni", "--bins"])?;
    let poolwarden = root.join("target/release/poolwarden");
    let plugin = super::build_plugin(root, true)?;
    let tag = std::process::id() % 100_000;
    let dir = std::env::temp_dir().join(format!("poolwarden-bench-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let cni_path = dir.join("cni-bin");
    std::fs::create_dir_all(&cni_path)?;
    std::os::unix::fs::symlink(&plugin, cni_path.join("poolwarden-cni"))?;
    for plugin in ["bridge", "host-local"] {
        std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(plugin), cni_path.join(plugin))?;
    }
    let mut namespaces = Namespaces(Vec::new());
    let node_ns = namespaces.add(format!("pwbench-node-{tag}"))?;
    for args in [&["ip", "link", "set", "lo", "up"][..], &["sysctl", "-qw", "net.ipv4.ip_forward=1"]] {
        Command::new("ip").args(["netns", "exec", &node_ns]).args(args).status()?;
    }
    let pods: Vec<String> = (0..PODS).map(|i| namespaces.add(format!("pwbench-{tag}-{i}"))).collect::<Result<_>>()?;

    let store = format!("embedded:{}", dir.join("store.redb").display());
    let pool = dir.join("pool.yaml");
    std::fs::write(
        &pool,
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: bench}\nspec: {cidr: 10.71.0.0/16, blockSize: 26}\n",
    )?;
    let applied =
        Command::new(&poolwarden).args(["apply", "-f"]).arg(&pool).env("POOLWARDEN_DATASTORE", &store).status()?;
    if !applied.success() {
        bail!("apply failed");
    }
    let peer = format!(
        r#"{{"cniVersion":"1.0.0","name":"br","type":"bridge","bridge":"pwbench{tag}","isGateway":true,"ipMasq":false,"ipam":{{"type":"host-local","subnet":"10.70.0.0/16","dataDir":"{}"}}}}"#,
        dir.join("host-local").display()
    );
    let ours_for = |socket: &Path| {
        format!(r#"{{"cniVersion":"1.0.0","name":"pw","type":"poolwarden-cni","socket":"{}"}}"#, socket.display())
    };

    println!(
        "\nCNI ADD/DEL, {PODS} pods with a netns each, same node namespace, measured in one run (milliseconds per exec)"
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "plugin, mode", "ADD p50", "ADD p99", "DEL p50", "DEL p99", "ADD wall", "DEL wall"
    );
    let mut medians = Vec::new();
    let peer_label = "bridge + host-local";
    for (label, enforcement) in [("poolwarden-cni, enforcing", "strict"), ("poolwarden-cni, --enforcement off", "off")]
    {
        let (agent, socket) = start_agent(&poolwarden, &node_ns, &dir, enforcement)?;
        let ours = ours_for(&socket);
        // The same with enforcement on a TCX link (what a chain with `bandwidth` after us uses).
        let ours_tcx = ours.replacen('{', r#"{"enforcementHook":"tcx","#, 1);
        for (parallel, mode) in [(1, "sequential"), (BATCH, "10 at a time")] {
            let mut runs = vec![(label, "poolwarden-cni", ours.as_str())];
            if enforcement == "strict" {
                runs.push((TCX_LABEL, "poolwarden-cni", ours_tcx.as_str()));
                runs.push((peer_label, "bridge", peer.as_str()));
            }
            for (label, plugin, conf) in runs {
                let tag = format!("{plugin}-{enforcement}-{parallel}");
                let mut f = run_pods(&node_ns, &cni_path, plugin, conf, &pods, &tag, parallel)?;
                let (a50, a99, d50, d99) = (
                    percentile(&mut f.add, 0.5),
                    percentile(&mut f.add, 0.99),
                    percentile(&mut f.del, 0.5),
                    percentile(&mut f.del, 0.99),
                );
                println!(
                    "{:<44} {a50:>9.2} {a99:>9.2} {d50:>9.2} {d99:>9.2} {:>9.0}ms {:>9.0}ms",
                    format!("{label}, {mode}"),
                    f.wall_add.as_secs_f64() * 1000.0,
                    f.wall_del.as_secs_f64() * 1000.0
                );
                medians.push((mode, label, a50, d50));
            }
        }
        drop(agent);
    }
    println!(
        "(every figure includes the exec itself: spawning /bin/true the same way takes {:.2} ms, median)",
        exec_floor(&node_ns)?
    );
    for mode in ["sequential", "10 at a time"] {
        let of = |label: &str| medians.iter().find(|m| m.0 == mode && m.1 == label).map(|m| (m.2, m.3));
        for ours in ["poolwarden-cni, enforcing", TCX_LABEL, "poolwarden-cni, --enforcement off"] {
            if let (Some((pa, pd)), Some((ba, bd))) = (of(ours), of(peer_label)) {
                println!("ratio {ours} / {peer_label}, {mode}: ADD {:.2}x, DEL {:.2}x (median)", pa / ba, pd / bd);
            }
        }
    }

    let (agent, socket) = start_agent(&poolwarden, &node_ns, &dir, "strict")?;
    let ours = ours_for(&socket);
    // Memory: the agent with 1,000 wired endpoints.
    println!(
        "\nagent resident memory with {MEMORY_ENDPOINTS} endpoints (each a netns with a veth, a /32 route, an endpoint record):"
    );
    let before = rss_kib(agent.0.id())?;
    let extra: Vec<String> =
        (PODS..MEMORY_ENDPOINTS).map(|i| namespaces.add(format!("pwbench-{tag}-{i}"))).collect::<Result<_>>()?;
    let all: Vec<String> = pods.iter().chain(&extra).cloned().collect();
    let started = Instant::now();
    for chunk in all.chunks(BATCH) {
        std::thread::scope(|scope| -> Result<()> {
            let handles: Vec<_> = chunk
                .iter()
                .map(|pod| {
                    let (node_ns, cni_path, ours) = (&node_ns, &cni_path, &ours);
                    scope.spawn(move || {
                        invoke(node_ns, cni_path, "poolwarden-cni", "ADD", &format!("mem-{pod}"), pod, ours)
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
            }
            Ok(())
        })?;
    }
    let wall = started.elapsed();
    let after = rss_kib(agent.0.id())?;
    println!(
        "RSS {:.1} MiB with {MEMORY_ENDPOINTS} endpoints (idle: {:.1} MiB; target: under 30 MiB); {MEMORY_ENDPOINTS} ADDs 10 at a time took {:.1} s",
        after as f64 / 1024.0,
        before as f64 / 1024.0,
        wall.as_secs_f64()
    );
    drop(agent);
    drop(namespaces);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
