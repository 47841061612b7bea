//! A real etcd cluster for the tests: Debian's `etcd-server`, one process per member, on loopback or inside
//! network namespaces the test made. Members are stopped by their PID and their data removed on drop.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Where a member listens: an address (and the namespace it is in, if any) and two ports.
#[derive(Clone, Debug)]
pub struct Placement {
    /// `ip netns` name to run the member in; `None`: the machine's own namespace (loopback only).
    pub netns: Option<String>,
    /// The address it listens on (127.0.0.1 outside namespaces).
    pub address: String,
    /// Client port.
    pub client_port: u16,
    /// Peer port.
    pub peer_port: u16,
}

impl Placement {
    /// `http://address:client_port`.
    pub fn client_url(&self) -> String {
        format!("http://{}:{}", self.address, self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://{}:{}", self.address, self.peer_port)
    }
}

/// Whether Debian's etcd is installed (cargo xtask setup installs it); prints why not.
pub fn available() -> bool {
    if Command::new("etcd").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert!(
        std::env::var_os("POOLWARDEN_REQUIRE_PRIVILEGED").is_none(),
        "etcd is required; run cargo xtask setup (installs Debian's etcd-server)"
    );
    eprintln!("SKIPPED: etcd is not installed; cargo xtask setup installs Debian's etcd-server");
    false
}

/// Two free ports on loopback, below the kernel's ephemeral range. A port the kernel handed out for
/// `bind(0)` and given back is in that range, where any outgoing connection (another test's client, the
/// member's own peers) may take it as its source port before etcd binds it: a fresh-clone run lost a member
/// to "bind: address already in use" that way. Below the range only an explicit bind takes a port, so each
/// process counts through its own stretch of it and skips what is bound already.
fn free_ports() -> (u16, u16) {
    (free_port(), free_port())
}

fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // The ephemeral range's first port (32768 when unreadable); ours are the 12,000 ports below it.
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
        .unwrap_or(32768);
    let span = 12_000.min(ephemeral.saturating_sub(1024));
    assert!(span >= 1000, "the ephemeral port range starts at {ephemeral}: no room below it for test servers");
    let first = ephemeral - span;
    let start = std::process::id() * 97 % span;
    for _ in 0..span {
        let port = first + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(port).expect("a port");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on loopback between {first} and {ephemeral}");
}

/// Certificates for a cluster that requires TLS and client certificates: a CA, the members' certificate
/// (for 127.0.0.1) and a client's, made with openssl.
pub struct Tls {
    dir: tempfile::TempDir,
}

impl Tls {
    /// Make a CA and sign a server and a client certificate with it (P-256 keys, valid a day).
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("tls dir");
        let at = |name: &str| dir.path().join(name).display().to_string();
        let new_key = |name: &str| {
            vec![
                "-newkey".to_string(),
                "ec".into(),
                "-pkeyopt".into(),
                "ec_paramgen_curve:prime256v1".into(),
                "-nodes".into(),
                "-keyout".into(),
                at(&format!("{name}.key")),
                "-subj".into(),
                format!("/CN=poolwarden-test-{name}"),
            ]
        };
        let openssl = |args: Vec<String>| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::sh("openssl", &args)
        };
        let mut ca = vec!["req".to_string(), "-x509".into(), "-days".into(), "1".into(), "-out".into(), at("ca.crt")];
        ca.extend(new_key("ca"));
        openssl(ca);
        for (name, extensions) in [
            ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(at(&format!("{name}.ext")), extensions).expect("extensions");
            let mut request = vec!["req".to_string(), "-out".into(), at(&format!("{name}.csr"))];
            request.extend(new_key(name));
            openssl(request);
            openssl(
                [
                    "x509",
                    "-req",
                    "-days",
                    "1",
                    "-CAcreateserial",
                    "-in",
                    &at(&format!("{name}.csr")),
                    "-CA",
                    &at("ca.crt"),
                    "-CAkey",
                    &at("ca.key"),
                    "-out",
                    &at(&format!("{name}.crt")),
                    "-extfile",
                    &at(&format!("{name}.ext")),
                ]
                .iter()
                .map(|a| a.to_string())
                .collect(),
            );
        }
        Self { dir }
    }

    /// A file of the material: `ca.crt`, `server.crt`, `server.key`, `client.crt`, `client.key`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A running etcd cluster.
pub struct EtcdCluster {
    /// Where each member listens.
    pub members: Vec<Placement>,
    processes: Vec<Option<Child>>,
    dir: tempfile::TempDir,
    token: String,
    tls: Option<PathBuf>,
}

impl EtcdCluster {
    /// A cluster of `n` members on loopback.
    pub fn on_loopback(n: usize) -> Self {
        let members = (0..n)
            .map(|_| {
                let (client_port, peer_port) = free_ports();
                Placement { netns: None, address: "127.0.0.1".into(), client_port, peer_port }
            })
            .collect();
        Self::start(members)
    }

    /// A one-member cluster on loopback that serves clients only over TLS with a client certificate
    /// signed by `tls`'s CA.
    pub fn with_tls(tls: &Tls) -> Self {
        let (client_port, peer_port) = free_ports();
        let member = Placement { netns: None, address: "127.0.0.1".into(), client_port, peer_port };
        Self::launch(vec![member], Some(tls.dir.path().to_path_buf()))
    }

    /// A cluster with the members where `members` says, started and answering.
    pub fn start(members: Vec<Placement>) -> Self {
        Self::launch(members, None)
    }

    fn launch(members: Vec<Placement>, tls: Option<PathBuf>) -> Self {
        // /dev/shm when there is one: the tests measure poolwarden, not this disk's fsync.
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            tempfile::tempdir_in("/dev/shm").expect("etcd temp dir")
        } else {
            tempfile::tempdir().expect("etcd temp dir")
        };
        let token = crate::unique("pwetcd");
        let mut cluster = Self { processes: members.iter().map(|_| None).collect(), members, dir, token, tls };
        for i in 0..cluster.members.len() {
            cluster.start_member(i);
        }
        cluster.wait_until_serving();
        cluster
    }

    /// `etcd:URL,URL,...` for `--datastore`.
    pub fn datastore(&self) -> String {
        format!("etcd:{}", self.members.iter().map(|m| self.client_url(m)).collect::<Vec<_>>().join(","))
    }

    /// A member's client URL (`https://` when the cluster requires TLS).
    pub fn client_url(&self, member: &Placement) -> String {
        let url = member.client_url();
        if self.tls.is_some() { url.replacen("http://", "https://", 1) } else { url }
    }

    /// etcdctl talking to `member` (in its network namespace, with the cluster's TLS); the command's own
    /// arguments follow.
    fn etcdctl(&self, member: &Placement) -> Command {
        let mut command = match &member.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcdctl"]);
                c
            }
            None => Command::new("etcdctl"),
        };
        command.args(["--endpoints", &self.client_url(member)]).args(self.etcdctl_tls()).env("ETCDCTL_API", "3");
        command
    }

    /// etcdctl's TLS arguments for this cluster (none without TLS).
    fn etcdctl_tls(&self) -> Vec<String> {
        let Some(dir) = &self.tls else { return Vec::new() };
        let at = |name: &str| dir.join(name).display().to_string();
        vec![
            format!("--cacert={}", at("ca.crt")),
            format!("--cert={}", at("client.crt")),
            format!("--key={}", at("client.key")),
        ]
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{i}"))
    }

    /// Start member `i` (again, after [`EtcdCluster::stop_member`]: it rejoins with its data).
    pub fn start_member(&mut self, i: usize) {
        assert!(self.processes[i].is_none(), "etcd member {i} is already running");
        let member = &self.members[i];
        let initial = self
            .members
            .iter()
            .enumerate()
            .map(|(j, m)| format!("m{j}={}", m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let mut command = match &member.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        let log = std::fs::File::create(self.dir.path().join(format!("m{i}.log"))).expect("etcd log");
        if let Some(dir) = &self.tls {
            let at = |name: &str| dir.join(name).display().to_string();
            command.args(["--cert-file", &at("server.crt"), "--key-file", &at("server.key")]).args([
                "--client-cert-auth",
                "--trusted-ca-file",
                &at("ca.crt"),
            ]);
        }
        let client_url = self.client_url(member);
        let child = command
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &member.peer_url(), "--initial-advertise-peer-urls", &member.peer_url()])
            .args(["--initial-cluster", &initial, "--initial-cluster-token", &self.token])
            // etcd's own default limits (--max-txn-ops 128): what a stock etcd accepts is what the agents get.
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.processes[i] = Some(child);
    }

    /// Stall member `i` (SIGSTOP by its PID) for `pause`, then let it go on (SIGCONT): a slow etcd.
    pub fn stall_member(&self, i: usize, pause: Duration) {
        let pid = self.processes[i].as_ref().expect("the member runs").id().to_string();
        let _ = Command::new("kill").args(["-STOP", &pid]).status();
        std::thread::sleep(pause);
        let _ = Command::new("kill").args(["-CONT", &pid]).status();
    }

    /// SIGKILL member `i` by its PID.
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut child) = self.processes[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Block until every running member accepts connections and the cluster has a leader.
    pub fn wait_until_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, member) in self.members.iter().enumerate() {
            if self.processes[i].is_none() {
                continue;
            }
            let health = || self.etcdctl(member).args(["endpoint", "health"]).output();
            loop {
                let reachable = member.netns.is_some()
                    || TcpStream::connect_timeout(
                        &SocketAddr::new(member.address.parse().expect("member address"), member.client_port),
                        Duration::from_millis(200),
                    )
                    .is_ok();
                if reachable && health().is_ok_and(|o| o.status.success()) {
                    break;
                }
                assert!(Instant::now() < deadline, "etcd member {i} did not become healthy:\n{}", self.log(i));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Every key in the cluster (whatever prefix its writers use), read by etcdctl from member 0.
    pub fn keys(&self) -> Vec<String> {
        let output =
            self.etcdctl(&self.members[0]).args(["get", "", "--prefix", "--keys-only"]).output().expect("etcdctl");
        assert!(output.status.success(), "etcdctl get: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
    }

    /// Member `i`'s log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("m{i}.log"))).unwrap_or_default()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.processes.len() {
            self.stop_member(i);
        }
    }
}
