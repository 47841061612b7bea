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

/// Two free ports on loopback.
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    (a.local_addr().expect("addr").port(), b.local_addr().expect("addr").port())
}

/// A running etcd cluster.
pub struct EtcdCluster {
    /// Where each member listens.
    pub members: Vec<Placement>,
    processes: Vec<Option<Child>>,
    dir: tempfile::TempDir,
    token: String,
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

    /// A cluster with the members where `members` says, started and answering.
    pub fn start(members: Vec<Placement>) -> Self {
        // /dev/shm when there is one: the tests measure poolwarden, not this disk's fsync.
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            tempfile::tempdir_in("/dev/shm").expect("etcd temp dir")
        } else {
            tempfile::tempdir().expect("etcd temp dir")
        };
        let token = crate::unique("pwetcd");
        let mut cluster = Self { processes: members.iter().map(|_| None).collect(), members, dir, token };
        for i in 0..cluster.members.len() {
            cluster.start_member(i);
        }
        cluster.wait_until_serving();
        cluster
    }

    /// `etcd:URL,URL,...` for `--datastore`.
    pub fn datastore(&self) -> String {
        format!("etcd:{}", self.members.iter().map(Placement::client_url).collect::<Vec<_>>().join(","))
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
        let child = command
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--listen-client-urls", &member.client_url(), "--advertise-client-urls", &member.client_url()])
            .args(["--listen-peer-urls", &member.peer_url(), "--initial-advertise-peer-urls", &member.peer_url()])
            .args(["--initial-cluster", &initial, "--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new", "--max-txn-ops", "4096"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.processes[i] = Some(child);
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
            let health = || match &member.netns {
                Some(ns) => Command::new("ip")
                    .args(["netns", "exec", ns, "etcdctl", "--endpoints", &member.client_url(), "endpoint", "health"])
                    .env("ETCDCTL_API", "3")
                    .output(),
                None => Command::new("etcdctl")
                    .args(["--endpoints", &member.client_url(), "endpoint", "health"])
                    .env("ETCDCTL_API", "3")
                    .output(),
            };
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
