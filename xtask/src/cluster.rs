//! `cargo xtask cluster up|down|status`: a real Kubernetes on this machine, for poolwarden's tests.
//!
//! Kubernetes v1.34.4 is built from its Go modules (`k8s/go.mod` pins it; Go's module and build caches make a
//! second build a link step). The control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler) runs in a network namespace of its own, each node (containerd, kubelet) in another, all
//! joined by a bridge in a third: nothing listens in the machine's own namespace, and `down` removes every
//! process (by the PID recorded when it started), namespace, mount and file `up` made.
//!
//! Certificates are made with openssl. Everything lives under `target/cluster/`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::run;

/// The Kubernetes version `k8s/go.mod` pins (the binaries report it).
pub const KUBERNETES_VERSION: &str = "v1.34.4";

/// The binaries built from `k8s/go.mod`.
const BINARIES: &[&str] =
    &["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl"];

/// Namespaces: the bridge's, the control plane's, and one per node.
const FABRIC_NS: &str = "pwk-fabric";
const CONTROL_NS: &str = "pwk-cp";
/// The control plane's address on the bridge.
const CONTROL_ADDRESS: &str = "10.250.0.1";
/// The first node's address; node N has .10+N.
const NODE_BASE: u8 = 10;
/// The API server's port (in the control plane's namespace).
const API_PORT: u16 = 6443;
/// poolwarden's etcd (in the control plane's namespace, not Kubernetes' own), which the agents share.
const POOLWARDEN_ETCD_PORT: u16 = 22379;
/// Services' range; the API server's own service address is its first.
const SERVICE_RANGE: &str = "10.96.0.0/16";
const API_SERVICE_ADDRESS: &str = "10.96.0.1";

/// Where everything the cluster has lives.
pub fn state_dir(root: &Path) -> PathBuf {
    root.join("target/cluster")
}

fn bin_dir(root: &Path) -> PathBuf {
    root.join("target/k8s/bin")
}

/// A node's name (`pwk-node1`, ...), which is also its namespace's.
pub fn node_name(n: u8) -> String {
    format!("pwk-node{n}")
}

fn node_address(n: u8) -> String {
    format!("10.250.0.{}", NODE_BASE + n)
}

/// Build the Kubernetes binaries (cached by Go; skipped when `k8s/go.mod`, `k8s/go.sum` and the flags are
/// what the last build used).
pub fn build(root: &Path) -> Result<PathBuf> {
    let bin = bin_dir(root);
    std::fs::create_dir_all(&bin)?;
    let k8s = root.join("k8s");
    let ldflags = [
        format!("-X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION}"),
        "-X k8s.io/component-base/version.gitMajor=1".into(),
        "-X k8s.io/component-base/version.gitMinor=34".into(),
        "-X k8s.io/component-base/version.gitTreeState=clean".into(),
        format!("-X k8s.io/client-go/pkg/version.gitVersion={KUBERNETES_VERSION}"),
        "-X k8s.io/client-go/pkg/version.gitMajor=1".into(),
        "-X k8s.io/client-go/pkg/version.gitMinor=34".into(),
    ]
    .join(" ");
    let stamp_text = format!(
        "{}\n{}\n{ldflags}\n",
        std::fs::read_to_string(k8s.join("go.mod"))?,
        std::fs::read_to_string(k8s.join("go.sum"))?
    );
    let stamp = bin.join(".built-from");
    let complete = BINARIES.iter().all(|b| bin.join(b).is_file());
    if complete && std::fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_text.as_str()) {
        return Ok(bin);
    }
    if !crate::have_command("go") {
        bail!("Go is needed to build Kubernetes for the test cluster; this machine has none on PATH");
    }
    eprintln!("cluster: building Kubernetes {KUBERNETES_VERSION} from k8s/go.mod (Go caches it for next time)");
    let started = Instant::now();
    let packages: Vec<String> = BINARIES.iter().map(|b| format!("k8s.io/kubernetes/cmd/{b}")).collect();
    let mut args = vec!["build".to_string(), "-o".into(), format!("{}/", bin.display()), "-ldflags".into(), ldflags];
    args.extend(packages);
    let status = Command::new("go")
        .args(&args)
        .current_dir(&k8s)
        // The machine's own Go, whatever go.mod's toolchain line says.
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "1")
        .status()
        .context("run go build")?;
    if !status.success() {
        bail!("go build of Kubernetes failed ({status})");
    }
    std::fs::write(&stamp, stamp_text)?;
    eprintln!("cluster: Kubernetes built in {:.0?}", started.elapsed());
    Ok(bin)
}

/// One certificate: its file stem, subject and extensions.
struct Cert<'a> {
    stem: &'a str,
    subject: String,
    /// `serverAuth`, `clientAuth` or both.
    usage: &'a str,
    /// Subject alternative names, as openssl writes them (`IP:...`, `DNS:...`).
    sans: Vec<String>,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").args(args).current_dir(dir).output().context("run openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The cluster's CA, serving and client certificates, and the service-account key, made once.
fn pki(dir: &Path, nodes: u8) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    if !dir.join("ca.crt").exists() {
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "3650",
            "-subj",
            "/CN=poolwarden-test-cluster-ca",
        ]);
        args.extend([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &args)?;
    }
    if !dir.join("sa.key").exists() {
        openssl(dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key"])?;
        openssl(dir, &["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    }
    let mut certs = vec![
        Cert {
            stem: "apiserver",
            subject: "/CN=kube-apiserver".into(),
            usage: "serverAuth",
            sans: vec![
                format!("IP:{CONTROL_ADDRESS}"),
                "IP:127.0.0.1".into(),
                format!("IP:{API_SERVICE_ADDRESS}"),
                "DNS:kubernetes".into(),
                "DNS:kubernetes.default".into(),
                "DNS:kubernetes.default.svc".into(),
                "DNS:kubernetes.default.svc.cluster.local".into(),
            ],
        },
        Cert { stem: "admin", subject: "/O=system:masters/CN=admin".into(), usage: "clientAuth", sans: vec![] },
        Cert {
            stem: "apiserver-kubelet-client",
            subject: "/O=system:masters/CN=kube-apiserver-kubelet-client".into(),
            usage: "clientAuth",
            sans: vec![],
        },
        Cert {
            stem: "controller-manager",
            subject: "/CN=system:kube-controller-manager".into(),
            usage: "clientAuth",
            sans: vec![],
        },
        Cert { stem: "scheduler", subject: "/CN=system:kube-scheduler".into(), usage: "clientAuth", sans: vec![] },
        Cert { stem: "kube-proxy", subject: "/CN=system:kube-proxy".into(), usage: "clientAuth", sans: vec![] },
    ];
    let node_stems: Vec<String> = (1..=nodes).map(node_name).collect();
    let serving_stems: Vec<String> = node_stems.iter().map(|name| format!("{name}-serving")).collect();
    for ((n, name), serving) in (1..=nodes).zip(&node_stems).zip(&serving_stems) {
        certs.push(Cert {
            stem: name,
            subject: format!("/O=system:nodes/CN=system:node:{name}"),
            usage: "clientAuth",
            sans: vec![],
        });
        // kubelet's serving certificate, so that the API server (logs, exec) can verify it.
        certs.push(Cert {
            stem: serving,
            subject: format!("/O=system:nodes/CN=system:node:{name}"),
            usage: "serverAuth",
            sans: vec![format!("IP:{}", node_address(n)), format!("DNS:{name}")],
        });
    }
    for cert in certs {
        if dir.join(format!("{}.crt", cert.stem)).exists() {
            continue;
        }
        let key = format!("{}.key", cert.stem);
        let csr = format!("{}.csr", cert.stem);
        let mut args = vec!["req", "-new"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &cert.subject]);
        openssl(dir, &args)?;
        let mut ext = format!("keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={}\n", cert.usage);
        if !cert.sans.is_empty() {
            ext.push_str(&format!("subjectAltName={}\n", cert.sans.join(",")));
        }
        let ext_file = format!("{}.ext", cert.stem);
        std::fs::write(dir.join(&ext_file), ext)?;
        let crt = format!("{}.crt", cert.stem);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "3650",
                "-out",
                &crt,
                "-extfile",
                &ext_file,
            ],
        )?;
    }
    Ok(())
}

/// A kubeconfig for `user` (certificate stem) against the API server's address.
fn kubeconfig(dir: &Path, user: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{user}.kubeconfig"));
    let pki = dir.join("pki");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: poolwarden\n  cluster:\n    server: https://{CONTROL_ADDRESS}:{API_PORT}\n    \
         certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
         contexts:\n- name: poolwarden\n  context:\n    cluster: poolwarden\n    user: {user}\ncurrent-context: poolwarden\n",
        ca = pki.join("ca.crt").display(),
        crt = pki.join(format!("{user}.crt")).display(),
        key = pki.join(format!("{user}.key")).display(),
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

fn netns_exists(name: &str) -> bool {
    Path::new("/var/run/netns").join(name).exists()
}

/// Whether `path` is a mount point with shared propagation.
fn shared_mount(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(path) && l.contains(" shared:"))
}

/// Make `path` a mount point of its own with shared propagation (a bind of itself), as `ip netns` does for
/// /run/netns on most machines: the DaemonSet mounts it with Bidirectional propagation, which needs that.
fn make_shared(path: &str) -> Result<()> {
    if !shared_mount(path) {
        std::fs::create_dir_all(path)?;
        run("mount", &["--bind", path, path])?;
        run("mount", &["--make-shared", path])?;
    }
    Ok(())
}

/// The bridge namespace, the control plane's, and the nodes', wired: 10.250.0.0/24.
fn network(nodes: u8) -> Result<()> {
    make_shared("/run/netns")?;
    if !netns_exists(FABRIC_NS) {
        ip(&["netns", "add", FABRIC_NS])?;
        ip(&["-n", FABRIC_NS, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", FABRIC_NS, "link", "set", "br0", "up"])?;
        ip(&["-n", FABRIC_NS, "link", "set", "lo", "up"])?;
    }
    let mut members = vec![(CONTROL_NS.to_string(), CONTROL_ADDRESS.to_string())];
    members.extend((1..=nodes).map(|n| (node_name(n), node_address(n))));
    for (i, (ns, address)) in members.iter().enumerate() {
        if netns_exists(ns) {
            continue;
        }
        ip(&["netns", "add", ns])?;
        let port = format!("port{i}");
        ip(&["-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", FABRIC_NS])?;
        ip(&["-n", FABRIC_NS, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", ns, "address", "add", &format!("{address}/24"), "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        // A default route inside the cluster's network only (the control plane answers for it), so that
        // components find a "default interface" without any path out of these namespaces.
        if ns != CONTROL_NS {
            ip(&["-n", ns, "route", "add", "default", "via", CONTROL_ADDRESS])?;
        } else {
            ip(&["-n", ns, "route", "add", "default", "dev", "eth0"])?;
        }
    }
    Ok(())
}

/// Start `program` with `args` in network namespace `ns` (and, for a node's processes, the node's mount
/// namespace), in a session of its own, logging to `logs/<name>.log` and recording its PID in `pids/<name>`.
fn start(state: &Path, name: &str, ns: &str, program: &Path, args: &[String]) -> Result<u32> {
    let logs = state.join("logs");
    let pids = state.join("pids");
    std::fs::create_dir_all(&logs)?;
    std::fs::create_dir_all(&pids)?;
    if let Some(pid) = running(state, name) {
        return Ok(pid);
    }
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    // nsenter, not `ip netns exec`: that one also enters a mount namespace with a sysfs of its own, where
    // kubelet finds no cgroup mounts.
    let mut command = Command::new("setsid");
    command.arg("nsenter").arg(format!("--net=/var/run/netns/{ns}"));
    if ns.starts_with("pwk-node") {
        command.arg(format!("--mount={}", mount_ns(ns).display()));
    }
    let child = command
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {name}"))?;
    std::fs::write(pids.join(name), child.id().to_string())?;
    Ok(child.id())
}

/// The PID of `name` if it was started by `up` and still runs.
fn running(state: &Path, name: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(state.join("pids").join(name)).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Wait until `check` (a command run in namespace `ns`) succeeds, showing `name`'s log if it does not.
fn wait_until(state: &Path, name: &str, ns: &str, check: &[&str], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(check)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        if running(state, name).is_none() || Instant::now() > deadline {
            let log = std::fs::read_to_string(state.join("logs").join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            bail!(
                "{name} did not become ready{}:\n{}",
                if running(state, name).is_none() { " (it exited)" } else { "" },
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `cluster up`: build, certify, wire and start a cluster of `nodes` nodes; print the kubeconfig.
pub fn up(root: &Path, nodes: u8, image: Build) -> Result<PathBuf> {
    let bin = build(root)?;
    let state = state_dir(root);
    let pki_dir = state.join("pki");
    // The pods' namespaces containerd makes (cni-*) that exist before the cluster are not the cluster's:
    // down removes only the others (a pod killed with its node gets no CNI DEL to remove its namespace).
    let before = state.join("netns-before");
    if !before.exists() {
        std::fs::create_dir_all(&state)?;
        std::fs::write(&before, pod_namespaces().join("\n"))?;
    }
    pki(&pki_dir, nodes)?;
    let admin = kubeconfig(&state, "admin")?;
    network(nodes)?;
    let s = |p: PathBuf| p.display().to_string();
    let pki_file = |f: &str| s(pki_dir.join(f));

    // etcd, on the control plane's loopback only.
    let etcd_data = state.join("etcd");
    start(
        &state,
        "etcd",
        CONTROL_NS,
        Path::new("/usr/bin/etcd"),
        &[
            "--name=pwk".into(),
            format!("--data-dir={}", s(etcd_data)),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=pwk=http://127.0.0.1:2380".into(),
        ],
    )?;
    wait_until(&state, "etcd", CONTROL_NS, &["curl", "-sf", "http://127.0.0.1:2379/health"], Duration::from_secs(30))?;

    start(
        &state,
        "kube-apiserver",
        CONTROL_NS,
        &bin.join("kube-apiserver"),
        &[
            "--etcd-servers=http://127.0.0.1:2379".into(),
            format!("--advertise-address={CONTROL_ADDRESS}"),
            format!("--bind-address={CONTROL_ADDRESS}"),
            format!("--secure-port={API_PORT}"),
            format!("--service-cluster-ip-range={SERVICE_RANGE}"),
            format!("--client-ca-file={}", pki_file("ca.crt")),
            format!("--tls-cert-file={}", pki_file("apiserver.crt")),
            format!("--tls-private-key-file={}", pki_file("apiserver.key")),
            format!("--kubelet-client-certificate={}", pki_file("apiserver-kubelet-client.crt")),
            format!("--kubelet-client-key={}", pki_file("apiserver-kubelet-client.key")),
            format!("--kubelet-certificate-authority={}", pki_file("ca.crt")),
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--service-account-key-file={}", pki_file("sa.pub")),
            format!("--service-account-signing-key-file={}", pki_file("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            "--allow-privileged=true".into(),
            "--endpoint-reconciler-type=lease".into(),
        ],
    )?;
    // poolwarden's datastore, on the control plane's address (the nodes reach it over the bridge).
    start(
        &state,
        "poolwarden-etcd",
        CONTROL_NS,
        Path::new("/usr/bin/etcd"),
        &[
            "--name=poolwarden".into(),
            format!("--data-dir={}", s(state.join("poolwarden-etcd"))),
            format!("--listen-client-urls=http://{CONTROL_ADDRESS}:{POOLWARDEN_ETCD_PORT}"),
            format!("--advertise-client-urls=http://{CONTROL_ADDRESS}:{POOLWARDEN_ETCD_PORT}"),
            "--listen-peer-urls=http://127.0.0.1:22380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:22380".into(),
            "--initial-cluster=poolwarden=http://127.0.0.1:22380".into(),
        ],
    )?;
    let kubectl = s(bin.join("kubectl"));
    let admin_path = s(admin.clone());
    wait_until(
        &state,
        "kube-apiserver",
        CONTROL_NS,
        &[&kubectl, "--kubeconfig", &admin_path, "get", "--raw", "/readyz"],
        Duration::from_secs(90),
    )?;
    wait_until(
        &state,
        "poolwarden-etcd",
        CONTROL_NS,
        &["curl", "-sf", &format!("http://{CONTROL_ADDRESS}:{POOLWARDEN_ETCD_PORT}/health")],
        Duration::from_secs(30),
    )?;

    let cm = kubeconfig(&state, "controller-manager")?;
    start(
        &state,
        "kube-controller-manager",
        CONTROL_NS,
        &bin.join("kube-controller-manager"),
        &[
            format!("--kubeconfig={}", s(cm.clone())),
            format!("--authentication-kubeconfig={}", s(cm.clone())),
            format!("--authorization-kubeconfig={}", s(cm)),
            "--bind-address=127.0.0.1".into(),
            format!("--service-account-private-key-file={}", pki_file("sa.key")),
            format!("--root-ca-file={}", pki_file("ca.crt")),
            format!("--cluster-signing-cert-file={}", pki_file("ca.crt")),
            format!("--cluster-signing-key-file={}", pki_file("ca.key")),
            "--use-service-account-credentials=true".into(),
            // poolwarden allocates pod addresses: no node CIDRs.
            "--allocate-node-cidrs=false".into(),
            "--leader-elect=false".into(),
        ],
    )?;
    let scheduler = kubeconfig(&state, "scheduler")?;
    start(
        &state,
        "kube-scheduler",
        CONTROL_NS,
        &bin.join("kube-scheduler"),
        &[
            format!("--kubeconfig={}", s(scheduler.clone())),
            format!("--authentication-kubeconfig={}", s(scheduler.clone())),
            format!("--authorization-kubeconfig={}", s(scheduler)),
            "--bind-address=127.0.0.1".into(),
            "--leader-elect=false".into(),
        ],
    )?;
    for n in 1..=nodes {
        start_node(root, &state, &bin, n)?;
    }
    let images = [poolwarden_image(root, &state, image)?, busybox_image(&state)?];
    for n in 1..=nodes {
        for image in &images {
            import(n, image)?;
        }
    }
    println!("{}", admin.display());
    Ok(admin)
}

/// Install poolwarden the way a user does: `kubectl apply -k` of an overlay of `deploy/` that changes the image
/// and nothing in the manifests. Its settings say what a user's would: the datastore is deploy/'s default (the
/// Kubernetes API; the cluster's poolwarden etcd is there for the tests that switch the agents to etcd), the
/// leak grace period is short for the garbage collection tests, and the agent is told where the API server is
/// (it must not need kube-proxy for that).
pub fn install(root: &Path, build: Build) -> Result<()> {
    let state = state_dir(root);
    let overlay = state.join("overlay");
    std::fs::create_dir_all(&overlay)?;
    let kustomization = format!(
        r#"apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {deploy}
images:
  - name: poolwarden
    newName: {image_name}
    newTag: {image_tag}
configMapGenerator:
  - name: poolwarden-config
    namespace: kube-system
    behavior: merge
    options: {{disableNameSuffixHash: true}}
    literals:
      # Short, for the garbage collection tests (the default is 15m).
      - POOLWARDEN_LEAK_GRACE_PERIOD=20s
  - name: poolwarden-api-endpoint
    namespace: kube-system
    options: {{disableNameSuffixHash: true}}
    literals:
      - KUBERNETES_SERVICE_HOST={CONTROL_ADDRESS}
      - KUBERNETES_SERVICE_PORT={API_PORT}
"#,
        // kustomize takes bases by relative path: target/cluster/overlay -> deploy.
        deploy = "../../../deploy",
        image_name = POOLWARDEN_IMAGE.rsplit_once(':').map_or(POOLWARDEN_IMAGE, |(n, _)| n),
        image_tag = POOLWARDEN_IMAGE.rsplit_once(':').map_or("latest", |(_, t)| t),
    );
    std::fs::write(overlay.join("kustomization.yaml"), kustomization)?;
    // The image of the tree as it is now, in every node's containerd (`up` loaded the one of its time).
    let image = poolwarden_image(root, &state, build)?;
    for n in (1..=u8::MAX).take_while(|n| containerd_socket(*n).exists()) {
        import(n, &image)?;
    }
    let applied = kubectl_output(root, &["apply", "-k", &overlay.display().to_string()])?;
    print!("{applied}");
    if applied.contains("daemonset.apps/poolwarden unchanged") {
        // Same spec, same tag: the image was replaced under it, so the agents restart to run it.
        kubectl(root, &["-n", "kube-system", "rollout", "restart", "daemonset/poolwarden"])?;
    }
    kubectl(root, &["-n", "kube-system", "rollout", "status", "daemonset/poolwarden", "--timeout=180s"])
}

/// Run kubectl with the admin kubeconfig, in the control plane's namespace.
pub fn kubectl(root: &Path, args: &[&str]) -> Result<()> {
    eprintln!("+ kubectl {}", args.join(" "));
    let status = kubectl_command(root, args).status()?;
    if !status.success() {
        bail!("kubectl {args:?} failed ({status})");
    }
    Ok(())
}

/// The sysctls kubelet sets on the machine (they are not per namespace); `up` records them first and `down`
/// puts them back.
const KUBELET_SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// Where a node's containerd keeps its runtime state (sockets; pods' namespaces are mounted under it).
fn run_dir(name: &str) -> PathBuf {
    Path::new("/run/pwk").join(name)
}

/// Where a node's mount namespace is kept (a bind of its nsfs file; the namespace lives while it is mounted
/// or a process of the node runs in it).
fn mount_ns(name: &str) -> PathBuf {
    Path::new("/run/pwk/mnt").join(name)
}

/// The machine's directories a node sees as its own: (path on the node, directory of the node's that is
/// mounted there). The nodes share one filesystem, but each node's containerd, kubelet and pods run in a
/// mount namespace of the node's where these paths are its own, so that poolwarden's DaemonSet is applied
/// with its host paths unchanged and the plugin finds its node's agent at the socket path the conflist names.
fn node_paths(state: &Path, name: &str) -> Vec<(&'static str, PathBuf)> {
    let dir = state.join(name);
    vec![
        ("/run/poolwarden", run_dir(name).join("poolwarden")),
        ("/var/lib/poolwarden", dir.join("poolwarden")),
        ("/opt/cni/bin", dir.join("cni/bin")),
        ("/etc/cni/net.d", dir.join("cni/net.d")),
    ]
}

/// Make node `name`'s mount namespace: a slave of the machine's (what the machine mounts later still
/// appears; nothing mounted in the node goes back), with the node's own directories over [`node_paths`],
/// a bpffs of its own at /sys/fs/bpf, and /run/netns shared within the node (the DaemonSet mounts both with
/// Bidirectional propagation; the pods' namespaces containerd mounts there stay in the node).
fn node_filesystem(state: &Path, name: &str) -> Result<()> {
    let file = mount_ns(name);
    let holder = file.parent().expect("a parent");
    std::fs::create_dir_all(holder)?;
    // unshare --mount=FILE needs FILE on a private mount (made private again in case an earlier up stopped
    // between the two).
    let shown = holder.display().to_string();
    if !mounted(holder) {
        run("mount", &["--bind", &shown, &shown])?;
    }
    run("mount", &["--make-private", &shown])?;
    if mounted(&file) {
        return Ok(());
    }
    let made = state.join("mountpoints-made");
    let mut script = String::from("set -e\n");
    for (point, source) in node_paths(state, name) {
        std::fs::create_dir_all(&source)?;
        // The mount point must exist on the machine; what up makes, down removes (when empty).
        let mut missing: Vec<PathBuf> =
            Path::new(point).ancestors().filter(|p| !p.exists()).map(Path::to_path_buf).collect();
        missing.reverse();
        for dir in missing {
            std::fs::create_dir(&dir)?;
            let mut list = std::fs::read_to_string(&made).unwrap_or_default();
            list.push_str(&format!("{}\n", dir.display()));
            std::fs::write(&made, list)?;
        }
        script.push_str(&format!("mount --bind '{}' '{point}'\n", source.display()));
    }
    script.push_str("mount -t bpf bpf /sys/fs/bpf\nmount --make-shared /sys/fs/bpf\nmount --make-shared /run/netns\n");
    std::fs::write(&file, "")?;
    let status = Command::new("unshare")
        .arg(format!("--mount={}", file.display()))
        .args(["--propagation", "slave", "sh", "-c", &script])
        .status()
        .context("run unshare")?;
    if !status.success() {
        let _ = Command::new("umount").arg(&file).status();
        bail!("making {name}'s mount namespace failed ({status})");
    }
    Ok(())
}

/// Whether `path` is a mount point.
fn mounted(path: &Path) -> bool {
    let path = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(path.as_str()))
}

/// The cgroup v1 hierarchies mounted here (kubelet's cgroupRoot must exist in each).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.is_symlink())
        .collect()
}

/// The pause image (a static program of ours), built once and imported into a node's containerd.
fn pause_image(state: &Path, root: &Path) -> Result<PathBuf> {
    let work = state.join("images/pause");
    let archive = work.join("image.tar");
    if archive.exists() {
        return Ok(archive);
    }
    std::fs::create_dir_all(&work)?;
    let binary = state.join("images/pause-bin");
    let source = root.join("k8s/images/pause.c");
    let status =
        Command::new("gcc").args(["-static", "-Os", "-o"]).arg(&binary).arg(&source).status().context("run gcc")?;
    if !status.success() {
        bail!("building {} failed", source.display());
    }
    crate::images::build(
        &crate::images::Image {
            name: PAUSE_IMAGE,
            files: vec![crate::images::File::program(&binary, "/pause")],
            links: vec![],
            entrypoint: vec!["/pause"],
            cmd: vec![],
        },
        &work,
    )
}

/// poolwarden's image: the agent (with the libraries it loads), the static plugin, and nft (natOutgoing's table),
/// as the DaemonSet runs it.
pub const POOLWARDEN_IMAGE: &str = "pwk.invalid/poolwarden:dev";

/// The pods' image: busybox-static (`httpd`, `sh`, `ping`).
pub const BUSYBOX_IMAGE: &str = "pwk.invalid/busybox:1";

/// Which build of poolwarden the image carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Build {
    /// The release build, as shipped (`cluster up`, the benches, the demo).
    Release,
    /// The debug build (`cargo xtask test`): its dependencies are those the workspace's tests have just built,
    /// so at most the agent's own crate is compiled again (the tests' build enables the test-only
    /// `fault-injection` feature, which the image must not have), not the whole graph optimised (about 13
    /// minutes of a CI run on two cores). Same code, with overflow checks and debug assertions on; its debug
    /// information is left out of the image.
    Debug,
}

fn poolwarden_image(root: &Path, state: &Path, build: Build) -> Result<PathBuf> {
    let (agent, plugin) = match build {
        Build::Release => {
            run("cargo", &["build", "--release", "-p", "poolwarden", "--bin", "poolwarden"])?;
            (root.join("target/release/poolwarden"), crate::build_plugin(root, true)?)
        }
        Build::Debug => {
            // As the test task builds it (with `-p poolwarden` alone, features unify differently: a rebuild).
            run("cargo", &["build", "--workspace", "--exclude", "poolwarden-ebpf", "--bins"])?;
            // Beside the image's directory, which building the image empties.
            let dir = state.join("images/poolwarden-stripped");
            std::fs::create_dir_all(&dir)?;
            let (agent, plugin) = (dir.join("poolwarden.stripped"), dir.join("poolwarden-cni.stripped"));
            for (from, to) in
                [(root.join("target/debug/poolwarden"), &agent), (crate::build_plugin(root, false)?, &plugin)]
            {
                run("objcopy", &["--strip-debug", &from.display().to_string(), &to.display().to_string()])?;
            }
            (agent, plugin)
        }
    };
    let mut files = crate::images::with_libraries(&[
        (agent.as_path(), "/usr/local/bin/poolwarden"),
        (Path::new("/usr/sbin/nft"), "/usr/sbin/nft"),
    ])?;
    files.push(crate::images::File::program(plugin, "/usr/local/bin/poolwarden-cni"));
    crate::images::build(
        &crate::images::Image {
            name: POOLWARDEN_IMAGE,
            files,
            links: vec![],
            entrypoint: vec![],
            cmd: vec!["poolwarden"],
        },
        &state.join("images/poolwarden"),
    )
}

fn busybox_image(state: &Path) -> Result<PathBuf> {
    let archive = state.join("images/busybox/image.tar");
    if archive.exists() {
        return Ok(archive);
    }
    crate::images::build(
        &crate::images::Image {
            name: BUSYBOX_IMAGE,
            files: vec![crate::images::File::program("/bin/busybox", "/bin/busybox")],
            links: vec![
                ("/bin/sh", "busybox"),
                ("/bin/httpd", "busybox"),
                ("/bin/ping", "busybox"),
                ("/bin/ip", "busybox"),
            ],
            entrypoint: vec![],
            cmd: vec!["/bin/sh"],
        },
        &state.join("images/busybox"),
    )
}

/// The sandbox image every pod starts with.
pub const PAUSE_IMAGE: &str = "pwk.invalid/pause:3.10";

/// A node's containerd socket.
pub fn containerd_socket(n: u8) -> PathBuf {
    run_dir(&node_name(n)).join("containerd.sock")
}

/// Import an OCI archive into node `n`'s containerd.
pub fn import(n: u8, archive: &Path) -> Result<()> {
    let socket = containerd_socket(n);
    run(
        "ctr",
        &[
            "--address",
            &socket.display().to_string(),
            "-n",
            "k8s.io",
            "images",
            "import",
            &archive.display().to_string(),
        ],
    )
}

/// Start node `n`: containerd and kubelet in its namespace, registered with the API server.
fn start_node(root: &Path, state: &Path, bin: &Path, n: u8) -> Result<()> {
    let name = node_name(n);
    let dir = state.join(&name);
    let run_dir = run_dir(&name);
    let cni_bin = dir.join("cni/bin");
    let cni_conf = dir.join("cni/net.d");
    for d in [&dir, &run_dir, &cni_bin, &cni_conf] {
        std::fs::create_dir_all(d)?;
    }
    // containerd's CRI plugin brings up each pod's loopback with the reference plugin.
    // (and portmap, which poolwarden's conflist chains).
    for plugin in ["loopback", "portmap"] {
        let installed = cni_bin.join(plugin);
        if !installed.exists() {
            std::fs::copy(Path::new("/usr/lib/cni").join(plugin), &installed)
                .with_context(|| format!("copy the {plugin} plugin"))?;
        }
    }
    node_filesystem(state, &name)?;
    let s = |p: &Path| p.display().to_string();
    let config = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  # Root here lacks CAP_SYS_RESOURCE, so no process may lower its OOM score below containerd's (0): without
  # this, every sandbox (-998) fails in runc with "failed to update /proc/self/oom_score_adj".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
  # The node's own directories (its mount namespace has them there).
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
        root = s(&dir.join("containerd")),
        state = s(&run_dir.join("containerd")),
        socket = s(&containerd_socket(n)),
        opt = s(&dir.join("containerd-opt")),
    );
    let config_path = dir.join("containerd.toml");
    std::fs::write(&config_path, config)?;
    let containerd = format!("containerd-{name}");
    start(state, &containerd, &name, Path::new("/usr/bin/containerd"), &["--config".into(), s(&config_path)])?;
    let socket = s(&containerd_socket(n));
    wait_until(state, &containerd, &name, &["ctr", "--address", &socket, "version"], Duration::from_secs(30))?;
    import(n, &pause_image(state, root)?)?;

    // kubelet's cgroups, under a root of the node's own.
    for hierarchy in cgroup_hierarchies() {
        let _ = std::fs::create_dir_all(hierarchy.join(&name));
    }
    let saved = state.join("sysctls");
    if !saved.exists() {
        let values: Vec<String> = KUBELET_SYSCTLS
            .iter()
            .filter_map(|k| {
                let v = std::fs::read_to_string(Path::new("/proc/sys").join(k)).ok()?;
                Some(format!("{k}={}", v.trim()))
            })
            .collect();
        std::fs::write(&saved, values.join("\n") + "\n")?;
    }
    let pki = state.join("pki");
    let kubelet_config = format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: "{ca}"}}
authorization: {{mode: AlwaysAllow}}
tlsCertFile: "{serving_crt}"
tlsPrivateKeyFile: "{serving_key}"
cgroupDriver: cgroupfs
cgroupRoot: /{name}
clusterDomain: cluster.local
clusterDNS: [10.96.0.10]
failSwapOn: false
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
resolvConf: /etc/resolv.conf
containerRuntimeEndpoint: unix://{socket}
podLogsDir: {logs}
evictionHard: {{memory.available: "0%", nodefs.available: "0%", nodefs.inodesFree: "0%", imagefs.available: "0%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 250
"#,
        ca = s(&pki.join("ca.crt")),
        serving_crt = s(&pki.join(format!("{name}-serving.crt"))),
        serving_key = s(&pki.join(format!("{name}-serving.key"))),
        logs = s(&dir.join("pod-logs")),
    );
    let kubelet_config_path = dir.join("kubelet.yaml");
    std::fs::write(&kubelet_config_path, kubelet_config)?;
    let kubelet_kubeconfig = kubeconfig(state, &name)?;
    let kubelet = format!("kubelet-{name}");
    start(
        state,
        &kubelet,
        &name,
        &bin.join("kubelet"),
        &[
            format!("--config={}", s(&kubelet_config_path)),
            format!("--kubeconfig={}", s(&kubelet_kubeconfig)),
            format!("--root-dir={}", s(&dir.join("kubelet"))),
            format!("--hostname-override={name}"),
            format!("--node-ip={}", node_address(n)),
        ],
    )?;
    // kube-proxy (iptables mode, in the node's namespace): Services' addresses work on the node and in its
    // pods. Conntrack's table size and timeouts are the machine's, not a namespace's: it leaves them alone.
    let proxy_kubeconfig = kubeconfig(state, "kube-proxy")?;
    let proxy_config = format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: "{kubeconfig}"
hostnameOverride: {name}
mode: iptables
bindAddress: {address}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        kubeconfig = s(&proxy_kubeconfig),
        address = node_address(n),
    );
    let proxy_config_path = dir.join("kube-proxy.yaml");
    std::fs::write(&proxy_config_path, proxy_config)?;
    let proxy = format!("kube-proxy-{name}");
    start(state, &proxy, &name, &bin.join("kube-proxy"), &[format!("--config={}", s(&proxy_config_path))])?;
    let kubectl = s(&bin.join("kubectl"));
    let admin = s(&state.join("admin.kubeconfig"));
    wait_until(state, &proxy, &name, &["curl", "-sf", "http://127.0.0.1:10256/healthz"], Duration::from_secs(60))?;
    wait_until(
        state,
        &kubelet,
        CONTROL_NS,
        &[&kubectl, "--kubeconfig", &admin, "get", "node", &name],
        Duration::from_secs(90),
    )
}

/// `cluster status`: what runs, and what the API server says of the nodes.
pub fn status(root: &Path) -> Result<()> {
    let state = state_dir(root);
    let pids = state.join("pids");
    let mut names: Vec<String> = std::fs::read_dir(&pids)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if names.is_empty() {
        println!("no cluster (nothing under {})", state.display());
        return Ok(());
    }
    for name in &names {
        match running(&state, name) {
            Some(pid) => println!("{name:<26} running (pid {pid})"),
            None => println!("{name:<26} not running"),
        }
    }
    let admin = state.join("admin.kubeconfig");
    let kubectl = bin_dir(root).join("kubectl");
    if running(&state, "kube-apiserver").is_some() {
        let _ = Command::new("ip")
            .args(["netns", "exec", CONTROL_NS])
            .arg(&kubectl)
            .args(["--kubeconfig", &admin.display().to_string(), "get", "nodes", "-o", "wide"])
            .status();
    }
    println!(
        "kubeconfig: {} (use it inside namespace {CONTROL_NS}: ip netns exec {CONTROL_NS} kubectl ...)",
        admin.display()
    );
    Ok(())
}

/// `cluster down`: stop every process `up` started (by its recorded PID), remove the namespaces and the
/// state directory.
pub fn down(root: &Path) -> Result<()> {
    let state = state_dir(root);
    let pids = state.join("pids");
    let names: Vec<String> = std::fs::read_dir(&pids)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let stop = |names: &[&String]| {
        for name in names {
            if let Some(pid) = running(&state, name) {
                let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for name in names {
            while let Some(pid) = running(&state, name) {
                if Instant::now() > deadline {
                    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                    std::thread::sleep(Duration::from_millis(200));
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    // Kubelets first (they would restart what goes next), then the pods' processes and their shims (by
    // the PIDs containerd recorded for them), then containerd, then the control plane.
    stop(&names.iter().filter(|n| n.starts_with("kubelet-")).collect::<Vec<_>>());
    for pid_file in recorded_pids(Path::new("/run/pwk")) {
        if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<u32>().ok())
            && alive(pid)
        {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
    stop(&names.iter().filter(|n| n.starts_with("containerd-")).collect::<Vec<_>>());
    // Whatever still runs in a node's mount namespace was started there by the node (a shim whose task
    // was deleted waits for its containerd's word to exit, and its PID file is gone).
    for node in std::fs::read_dir("/run/pwk/mnt").into_iter().flatten().flatten() {
        // Only a mounted namespace file names a namespace (an unmounted one is a plain file's inode).
        if !mounted(&node.path()) {
            continue;
        }
        if let Ok(link) =
            std::fs::metadata(node.path()).map(|m| format!("mnt:[{}]", std::os::unix::fs::MetadataExt::ino(&m)))
        {
            for pid in in_mount_namespace(&link) {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
    }
    stop(&names.iter().collect::<Vec<_>>());
    unmount_under(&state)?;
    unmount_under(Path::new("/run/pwk"))?;
    let _ = std::fs::remove_dir_all("/run/pwk");
    // The mount points up made on the machine for the nodes' own directories (empty: nothing was ever
    // mounted on them outside the nodes), deepest first.
    let made = std::fs::read_to_string(state.join("mountpoints-made")).unwrap_or_default();
    let mut made: Vec<&str> = made.lines().collect();
    made.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for dir in made {
        let _ = std::fs::remove_dir(dir);
    }
    // kubelet's cgroups (the pods' processes are gone, so they are empty), deepest first.
    for hierarchy in cgroup_hierarchies() {
        for ns in cluster_namespaces().iter().filter(|n| n.starts_with("pwk-node")) {
            remove_cgroup(&hierarchy.join(ns));
        }
    }
    if let Ok(saved) = std::fs::read_to_string(state.join("sysctls")) {
        for line in saved.lines() {
            if let Some((key, value)) = line.split_once('=') {
                let _ = std::fs::write(Path::new("/proc/sys").join(key), value);
            }
        }
    }
    let before = std::fs::read_to_string(state.join("netns-before")).unwrap_or_default();
    let made: Vec<String> = pod_namespaces().into_iter().filter(|n| !before.lines().any(|b| b == n)).collect();
    for ns in cluster_namespaces().into_iter().chain(made) {
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
    if state.exists() {
        std::fs::remove_dir_all(&state).with_context(|| format!("remove {}", state.display()))?;
    }
    Ok(())
}

/// The processes whose mount namespace is `link` (`mnt:[inode]`, as /proc/PID/ns/mnt reads).
fn in_mount_namespace(link: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).is_ok_and(|l| l.to_string_lossy() == link))
        .collect()
}

/// The pods' namespaces a containerd made (`cni-<uuid>` under /run/netns).
fn pod_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cni-"))
        .collect()
}

/// The namespaces `up` makes.
fn cluster_namespaces() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n == FABRIC_NS || n == CONTROL_NS || n.starts_with("pwk-node"))
        .collect()
}

/// Unmount whatever is mounted under `dir` (a kubelet's volumes, containerd's snapshots), deepest first.
fn unmount_under(dir: &Path) -> Result<()> {
    let Ok(dir) = dir.canonicalize() else { return Ok(()) };
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let mut points: Vec<&str> =
        mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|p| Path::new(p).starts_with(&dir)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount").args(["-l", point]).status();
    }
    Ok(())
}

/// The PID files containerd's shims write for themselves and the containers they run, under `dir`.
fn recorded_pids(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            } else if path.file_name().is_some_and(|f| f == "init.pid" || f == "shim.pid") {
                found.push(path);
            }
        }
    }
    // Containers before their shims.
    found.sort_by_key(|p| p.file_name().is_some_and(|f| f == "shim.pid"));
    found
}

/// Remove a cgroup directory and the empty ones under it, deepest first.
fn remove_cgroup(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().is_dir() {
            remove_cgroup(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// `cargo xtask demo --kubernetes`: the seed's example on a real cluster, each step printed with what kubectl
/// says; the cluster goes down at the end unless `keep`.
pub fn demo(root: &Path, keep: bool) -> Result<()> {
    let outcome = (|| {
        up(root, 2, Build::Release)?;
        install(root, Build::Release)?;
        let step = |title: &str| println!("\n== {title}");
        step(
            "Step 1: the seed's pools (Calico's YAML, unchanged, through poolwarden apply, which writes IPPool \
             resources; `kubectl apply -f examples/` takes poolwarden's own), external-pool bound to external-ns",
        );
        let seed = std::fs::read_to_string(root.join("examples/calico/seed-pools.yaml"))?.replacen(
            "  natOutgoing: true",
            "  natOutgoing: true\n  allowedNamespaces: [external-ns]",
            1,
        );
        let pools = state_dir(root).join("pools.yaml");
        std::fs::write(&pools, seed)?;
        apply_through_agent(root, &pools)?;
        kubectl(root, &["get", "ippools"])?;
        step("Step 2: namespaces, annotated (poolwarden's key for one, Calico's for the other)");
        kubectl(root, &["create", "namespace", "external-ns"])?;
        kubectl(root, &["create", "namespace", "internal-ns"])?;
        kubectl(root, &["annotate", "namespace", "external-ns", "poolwarden.io/ipv4pools=[\"external-pool\"]"])?;
        kubectl(
            root,
            &["annotate", "namespace", "internal-ns", "cni.projectcalico.org/ipv4pools=[\"internal-pool\"]"],
        )?;
        step("Step 3: three replicas of a small HTTP server in each");
        let server = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www";
        for ns in ["external-ns", "internal-ns"] {
            kubectl(
                root,
                &[
                    "create",
                    "deployment",
                    "web",
                    "-n",
                    ns,
                    "--image",
                    BUSYBOX_IMAGE,
                    "--replicas",
                    "3",
                    "--",
                    "/bin/sh",
                    "-c",
                    server,
                ],
            )?;
        }
        for ns in ["external-ns", "internal-ns"] {
            kubectl(root, &["-n", ns, "wait", "--for=condition=Available", "deployment/web", "--timeout=180s"])?;
        }
        kubectl(root, &["get", "pods", "-o", "wide", "-A", "-l", "app=web"])?;
        step("Each pod answers over HTTP from its address (asked from the node)");
        let ips =
            kubectl_output(root, &["get", "pods", "-A", "-l", "app=web", "-o", "jsonpath={.items[*].status.podIP}"])?;
        for ip in ips.split_whitespace() {
            let out = Command::new("ip")
                .args(["netns", "exec", &node_name(1), "curl", "-s", "--max-time", "3", &format!("http://{ip}:8080/")])
                .output()?;
            println!("{ip}: {}", String::from_utf8_lossy(&out.stdout).trim());
        }
        step("A pod of a third namespace that names the bound pool");
        kubectl(root, &["create", "namespace", "third-ns"])?;
        kubectl(root, &["annotate", "namespace", "third-ns", "poolwarden.io/ipv4pools=[\"external-pool\"]"])?;
        kubectl(
            root,
            &["run", "intruder", "-n", "third-ns", "--image", BUSYBOX_IMAGE, "--", "/bin/sh", "-c", "sleep 3600"],
        )?;
        std::thread::sleep(Duration::from_secs(10));
        kubectl(root, &["get", "pods", "-n", "third-ns"])?;
        kubectl(
            root,
            &[
                "get",
                "events",
                "-n",
                "third-ns",
                "--field-selector",
                "reason=FailedCreatePodSandBox",
                "-o",
                "custom-columns=MESSAGE:.message",
            ],
        )?;
        step("The pools as the cluster sees them (used and utilisation refreshed every 15 s by one agent)");
        kubectl(root, &["get", "ippools"])?;
        Ok(())
    })();
    if keep {
        eprintln!("the cluster stays up: cargo xtask cluster status | down");
        outcome
    } else {
        let down = down(root);
        outcome.and(down)
    }
}

/// `poolwarden apply` of `file` through the agent (it has the datastore's client), as an operator does.
pub fn apply_through_agent(root: &Path, file: &Path) -> Result<()> {
    let apply =
        ["-n", "kube-system", "exec", "-i", "ds/poolwarden", "-c", "agent", "--", "poolwarden", "apply", "-f", "-"];
    kubectl_stdin(root, &apply, file)
}

/// kubectl with a file on stdin.
pub fn kubectl_stdin(root: &Path, args: &[&str], stdin: &Path) -> Result<()> {
    let status = kubectl_command(root, args).stdin(std::fs::File::open(stdin)?).status()?;
    if !status.success() {
        bail!("kubectl {args:?} failed ({status})");
    }
    Ok(())
}

/// kubectl's standard output.
pub fn kubectl_output(root: &Path, args: &[&str]) -> Result<String> {
    let out = kubectl_command(root, args).output()?;
    if !out.status.success() {
        bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kubectl_command(root: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", CONTROL_NS])
        .arg(bin_dir(root).join("kubectl"))
        .arg("--kubeconfig")
        .arg(state_dir(root).join("admin.kubeconfig"))
        .args(args);
    command
}
