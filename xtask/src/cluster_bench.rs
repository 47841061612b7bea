//! `cargo xtask bench --only kubernetes`: on the real cluster (`cargo xtask cluster`), the time from
//! `kubectl apply` of a 100-replica deployment to all its pods Running, with what the CNI plugins took of it,
//! for poolwarden (installed from deploy/) and for Debian's bridge + host-local installed as the cluster's CNI
//! instead, in the same run. Both chain Debian's portmap, as poolwarden's conflist does.
//!
//! The plugins' share is measured by a wrapper put in place of each plugin in the nodes' CNI directories
//! (the same for both): it notes when the runtime execs the plugin and when the plugin exits. A pod's CNI time
//! is the sum over its chain's ADDs and their retries. An agent restarting during the bench would put the
//! plugin back over its wrapper (its init step installs it): the bench fails then, since fewer ADDs are seen.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::cluster::{self, kubectl, kubectl_output, kubectl_stdin, node_name};

const NODES: u8 = 2;
const REPLICAS: usize = 100;
const ROUNDS: usize = 3;
const NAMESPACE: &str = "bench-ns";

/// One round: apply -> all Running, and each pod's CNI ADD time (the chain's sum).
struct Round {
    wall: Duration,
    adds: Vec<Duration>,
    failed: usize,
}

fn cni_dir(root: &Path, n: u8) -> PathBuf {
    cluster::state_dir(root).join(node_name(n)).join("cni")
}

fn cni_log(root: &Path) -> PathBuf {
    cluster::state_dir(root).join("bench/cni-times.log")
}

/// Put the timing wrapper in place of `plugin` on every node (the real one becomes `<plugin>.real`).
fn wrap(root: &Path, plugin: &str) -> Result<()> {
    let log = cni_log(root);
    std::fs::create_dir_all(log.parent().expect("a parent"))?;
    for n in 1..=NODES {
        let bin = cni_dir(root, n).join("bin");
        let (path, real) = (bin.join(plugin), bin.join(format!("{plugin}.real")));
        if !real.exists() {
            std::fs::rename(&path, &real).with_context(|| format!("move {}", path.display()))?;
        }
        // The plugin's answer is passed on as it is; a failure's answer is also logged. Times are noted by
        // pod (K8S_POD_NAME): a kubelet retry after a failed ADD comes with a new container ID.
        let script = format!(
            "#!/bin/sh\nstart=$(date +%s%N)\nout=$(\"$0.real\" \"$@\")\nrc=$?\nend=$(date +%s%N)\n\
             printf '%s\\n' \"$out\"\n\
             pod=$(printf '%s' \"$CNI_ARGS\" | tr ';' '\\n' | sed -n 's/^K8S_POD_NAME=//p')\n\
             echo \"$CNI_COMMAND $pod {plugin} $start $end $rc\" >> '{log}'\n\
             [ $rc -eq 0 ] || printf 'FAILED %s {plugin}: %s\\n' \"$CNI_COMMAND\" \"$(printf '%s' \"$out\" | tr '\\n' ' ')\" >> '{log}.failures'\n\
             exit $rc\n",
            log = log.display()
        );
        std::fs::write(&path, script)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    Ok(())
}

/// Each pod's ADD time, summed over its chain and its attempts, from the wrappers' log.
fn adds_logged(root: &Path) -> Result<Vec<Duration>> {
    let text = std::fs::read_to_string(cni_log(root)).unwrap_or_default();
    let mut by_pod: std::collections::BTreeMap<&str, u64> = Default::default();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [command, pod, _plugin, start, end, _rc] = fields[..] else { continue };
        if command != "ADD" {
            continue;
        }
        let (start, end): (u64, u64) = (start.parse()?, end.parse()?);
        *by_pod.entry(pod).or_default() += end.saturating_sub(start);
    }
    Ok(by_pod.values().map(|ns| Duration::from_nanos(*ns)).collect())
}

/// The pods of the bench namespace: how many, and how many Running.
fn pods(root: &Path) -> Result<(usize, usize)> {
    let out = kubectl_output(root, &["-n", NAMESPACE, "get", "pods", "-o", "jsonpath={.items[*].status.phase}"])?;
    let phases: Vec<&str> = out.split_whitespace().collect();
    Ok((phases.len(), phases.iter().filter(|p| **p == "Running").count()))
}

fn round(root: &Path) -> Result<Round> {
    let _ = std::fs::remove_file(cni_log(root));
    let _ = std::fs::remove_file(cni_log(root).with_extension("log.failures"));
    let deployment = cluster::state_dir(root).join("bench/deployment.json");
    let manifest = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "bench", "namespace": NAMESPACE},
        "spec": {
            "replicas": REPLICAS,
            "selector": {"matchLabels": {"app": "bench"}},
            "template": {
                "metadata": {"labels": {"app": "bench"}},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "main", "image": cluster::BUSYBOX_IMAGE, "command": ["/bin/sh", "-c", "exec sleep 3600"]}],
                },
            },
        },
    });
    std::fs::write(&deployment, manifest.to_string())?;
    let started = Instant::now();
    kubectl_stdin(root, &["apply", "-f", "-"], &deployment)?;
    loop {
        let (_, running) = pods(root)?;
        if running == REPLICAS {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("{running} of {REPLICAS} pods Running after 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let wall = started.elapsed();
    let adds = adds_logged(root)?;
    // A failed ADD is retried by the kubelet (and its time counts in its pod's): the bench reports them.
    let failures = std::fs::read_to_string(cni_log(root).with_extension("log.failures")).unwrap_or_default();
    let failed = failures.matches("FAILED ADD ").count();
    if !failures.is_empty() {
        eprintln!("round: {failed} CNI ADD(s) failed and were retried by the kubelet:\n{failures}");
    }
    kubectl(root, &["-n", NAMESPACE, "delete", "deployment", "bench", "--wait=true"])?;
    let gone = Instant::now();
    while pods(root)?.0 > 0 {
        if gone.elapsed() > Duration::from_secs(300) {
            bail!("the bench's pods did not go within 5 minutes");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("round: {REPLICAS} Running in {wall:.1?}; ADDs of {} pods logged", adds.len());
    if adds.len() != REPLICAS {
        bail!("ADDs of {} pods were timed, not {REPLICAS}: a plugin was put back over its wrapper?", adds.len());
    }
    Ok(Round { wall, adds, failed })
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

fn percentile(mut values: Vec<Duration>, p: f64) -> Duration {
    values.sort();
    let index = ((values.len() as f64 - 1.0) * p).round() as usize;
    values.get(index).copied().unwrap_or_default()
}

/// Replace poolwarden with Debian's bridge + host-local (and portmap) on every node, once every pod of the
/// bench has had its DEL (the kubelet tears sandboxes down after their pods are gone from the API).
fn install_bridge(root: &Path) -> Result<()> {
    let waited = Instant::now();
    loop {
        let show = kubectl_output(
            root,
            &["-n", "kube-system", "exec", "ds/poolwarden", "-c", "agent", "--", "poolwarden", "ipam", "show"],
        )?;
        let used = show.lines().find(|l| l.starts_with("bench-pool")).and_then(|l| l.split_whitespace().nth(4));
        if used == Some("0") {
            break;
        }
        if waited.elapsed() > Duration::from_secs(180) {
            bail!("the bench's pods still hold addresses 3 minutes after they were deleted:\n{show}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let overlay = cluster::state_dir(root).join("overlay");
    kubectl(root, &["delete", "-k", &overlay.display().to_string(), "--wait=true"])?;
    for n in 1..=NODES {
        let dir = cni_dir(root, n);
        for plugin in ["bridge", "host-local"] {
            std::fs::copy(Path::new("/usr/lib/cni").join(plugin), dir.join("bin").join(plugin))
                .with_context(|| format!("copy Debian's {plugin} plugin"))?;
        }
        for entry in std::fs::read_dir(dir.join("net.d"))? {
            std::fs::remove_file(entry?.path())?;
        }
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "bench-bridge",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("10.84.{n}.0/24")}]],
                          "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": cluster::state_dir(root).join(node_name(n)).join("host-local")}},
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
            ],
        });
        std::fs::write(dir.join("net.d/10-bridge.conflist"), serde_json::to_string_pretty(&conflist)?)?;
    }
    wrap(root, "bridge")
}

pub fn run(root: &Path) -> Result<()> {
    let outcome = (|| {
        cluster::up(root, NODES, cluster::Build::Release)?;
        cluster::install(root, cluster::Build::Release)?;
        let pool = cluster::state_dir(root).join("bench/pool.yaml");
        std::fs::create_dir_all(pool.parent().expect("a parent"))?;
        std::fs::write(
            &pool,
            format!(
                "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {{name: bench-pool}}\nspec:\n  cidr: 10.82.0.0/22\n  allowedNamespaces: [{NAMESPACE}]\n"
            ),
        )?;
        cluster::apply_through_agent(root, &pool)?;
        kubectl(root, &["create", "namespace", NAMESPACE])?;
        kubectl(root, &["annotate", "namespace", NAMESPACE, "poolwarden.io/ipv4pools=[\"bench-pool\"]"])?;
        wrap(root, "poolwarden-cni")?;
        wrap(root, "portmap")?;
        let ours: Vec<Round> = (0..ROUNDS).map(|_| round(root)).collect::<Result<_>>()?;
        install_bridge(root)?;
        let peer: Vec<Round> = (0..ROUNDS).map(|_| round(root)).collect::<Result<_>>()?;
        let summary = |rounds: &[Round]| {
            let wall = median(rounds.iter().map(|r| r.wall).collect());
            let adds: Vec<Duration> = rounds.iter().flat_map(|r| r.adds.clone()).collect();
            let total: Duration =
                rounds.iter().map(|r| r.adds.iter().sum::<Duration>()).sum::<Duration>() / rounds.len() as u32;
            (wall, median(adds.clone()), percentile(adds, 0.9), total)
        };
        let (a, b) = (summary(&ours), summary(&peer));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "\nkubernetes: {REPLICAS}-replica deployment on {NODES} nodes, kubectl apply -> all Running ({ROUNDS} rounds each, medians)"
        );
        println!("{:<44} {:>12} {:>20} {:>8}", "", "poolwarden", "bridge+host-local", "ratio");
        println!(
            "{:<44} {:>10.1} s {:>18.1} s {:>8.2}",
            "apply -> all Running",
            a.0.as_secs_f64(),
            b.0.as_secs_f64(),
            a.0.as_secs_f64() / b.0.as_secs_f64()
        );
        println!(
            "{:<44} {:>9.1} ms {:>17.1} ms {:>8.2}",
            "CNI ADD per pod, chain (median)",
            ms(a.1),
            ms(b.1),
            ms(a.1) / ms(b.1)
        );
        println!(
            "{:<44} {:>9.1} ms {:>17.1} ms {:>8.2}",
            "CNI ADD per pod, chain (p90)",
            ms(a.2),
            ms(b.2),
            ms(a.2) / ms(b.2)
        );
        println!(
            "{:<44} {:>10.1} s {:>18.1} s {:>8.2}",
            "sum of the pods' CNI ADDs per round",
            a.3.as_secs_f64(),
            b.3.as_secs_f64(),
            a.3.as_secs_f64() / b.3.as_secs_f64()
        );
        let failed = |rounds: &[Round]| rounds.iter().map(|r| r.failed).sum::<usize>();
        println!("{:<44} {:>12} {:>20}", "CNI ADDs failed (retried by the kubelet)", failed(&ours), failed(&peer));
        println!(
            "{:<44} {:>11.1}% {:>19.1}%",
            "plugins' share (CNI ADD sum / pods x wall)",
            100.0 * a.3.as_secs_f64() / (REPLICAS as f64 * a.0.as_secs_f64()),
            100.0 * b.3.as_secs_f64() / (REPLICAS as f64 * b.0.as_secs_f64())
        );
        Ok(())
    })();
    let down = cluster::down(root);
    outcome.and(down)
}
