//! The plugin and the agent's socket against hostile or broken input: every case ends with a CNI error on
//! stdout carrying the spec's code and a message naming the input, a non-zero exit, and nothing left behind
//! (no interface, no address, `ipam check` clean, the node's routes as they were).

use std::{
    ffi::OsString,
    os::unix::ffi::OsStringExt,
    process::{Command, Stdio},
    time::Duration,
};

use poolwarden_tests::*;
use serde_json::{Value, json};

/// One invocation: variables set or removed on top of a valid ADD, and what stdin carries.
struct Case {
    what: &'static str,
    /// (name, Some(value)) sets, (name, None) removes.
    env: Vec<(OsString, Option<OsString>)>,
    stdin: Vec<u8>,
    code: u64,
    /// Found in `msg` or `details`.
    names: String,
}

fn os(text: &str) -> OsString {
    OsString::from(text)
}

fn bytes(raw: &[u8]) -> OsString {
    OsString::from_vec(raw.to_vec())
}

fn run_plugin(node: &Node, pod: &str, case: &Case) -> (Option<i32>, String) {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &node.ns.name])
        .arg(node.cni_path().join("poolwarden-cni"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "hostile")
        .env("CNI_NETNS", pod)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", node.cni_path())
        .env("CNI_ARGS", k8s_args("default", "hostile"));
    for (name, value) in &case.env {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    let out = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            // The plugin may refuse before reading all of a huge stdin: a broken pipe is its right.
            let _ = child.stdin.take().expect("stdin").write_all(&case.stdin);
            child.wait_with_output()
        })
        .expect("run poolwarden-cni");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn snapshot(node: &Node, pod: &NetNs) -> String {
    [
        node.ns.exec(&["ip", "-o", "link", "show"]),
        node.ns.exec(&["ip", "-o", "address", "show"]),
        node.ns.exec(&["ip", "route", "show", "table", "all"]),
        node.ns.exec(&["ip", "-6", "route", "show", "table", "all"]),
        pod.exec(&["ip", "-o", "link", "show"]),
        pod.exec(&["ip", "-o", "address", "show"]),
    ]
    .join("\n")
}

#[test]
fn fifty_hostile_invocations_end_in_spec_errors_and_leave_nothing_behind() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.9.1");
    // An uplink with the node's default route: what a hostile CNI_NETNS or interface name would take away.
    node.ns.exec(&["ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0peer"]);
    // No IPv6 there: link-local addresses finishing DAD would change the snapshot by themselves.
    for link in ["up0", "up0peer"] {
        node.ns.exec(&["sysctl", "-qw", &format!("net.ipv6.conf.{link}.disable_ipv6=1")]);
    }
    node.ns.exec(&["ip", "address", "add", "192.0.2.10/24", "dev", "up0"]);
    node.ns.exec(&["ip", "link", "set", "up0", "up"]);
    node.ns.exec(&["ip", "link", "set", "up0peer", "up"]);
    node.ns.exec(&["ip", "route", "add", "default", "via", "192.0.2.1", "dev", "up0"]);
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: hostile-pool}\nspec: {cidr: 10.63.0.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let pod = NetNs::new("pwp");
    let scratch = tempfile::tempdir().expect("tempdir");
    let file = scratch.path().join("a-file");
    std::fs::write(&file, "not a namespace").expect("file");
    let fifo = scratch.path().join("a-fifo");
    sh("mkfifo", &[&fifo.to_string_lossy()]);
    let socket_file = scratch.path().join("a-socket");
    let _listener = std::os::unix::net::UnixListener::bind(&socket_file).expect("socket");
    let own_link = scratch.path().join("own-ns");
    std::os::unix::fs::symlink("/proc/self/ns/net", &own_link).expect("symlink");

    let conf = node.conf(json!({}));
    let with = |extra: Value| {
        let mut c = conf.clone();
        if let (Some(map), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            map.extend(extra.clone());
        }
        c.to_string().into_bytes()
    };
    let without = |key: &str| {
        let mut c = conf.clone();
        c.as_object_mut().expect("object").remove(key);
        c.to_string().into_bytes()
    };
    let ipam_only = |ipam: Value| {
        json!({ "cniVersion": "1.0.0", "name": "ipamonly", "type": "bridge",
                "ipam": { "type": "poolwarden-cni", "socket": node.socket() } })
        .as_object()
        .map(|c| {
            let mut c = c.clone();
            if let (Some(section), Some(extra)) = (c.get_mut("ipam").and_then(Value::as_object_mut), ipam.as_object()) {
                section.extend(extra.clone());
            }
            Value::Object(c).to_string().into_bytes()
        })
        .expect("conf")
    };
    // The same configuration with runtimeConfig.ips asking for `ip`.
    let asking = |conf: Vec<u8>, ip: &str| {
        let mut v: Value = serde_json::from_slice(&conf).expect("conf");
        v["runtimeConfig"] = json!({ "ips": [ip] });
        v.to_string().into_bytes()
    };
    let valid = conf.to_string().into_bytes();
    let set = |name: &str, value: OsString| vec![(os(name), Some(value))];
    let unset = |name: &str| vec![(os(name), None)];
    let case = |what: &'static str, env: Vec<(OsString, Option<OsString>)>, stdin: Vec<u8>, code: u64, names: &str| {
        Case { what, env, stdin, code, names: names.to_string() }
    };
    let node_ns_path = format!("/var/run/netns/{}", node.ns.name);
    let file_path = file.to_string_lossy().into_owned();
    let dir_path = scratch.path().to_string_lossy().into_owned();
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes();
    let mut huge = br#"{"cniVersion":"1.0.0","name":"n","type":"poolwarden-cni","pad":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'x', 17 << 20));
    huge.extend(br#""}"#);

    let cases = vec![
        // The environment.
        case("no CNI_COMMAND", unset("CNI_COMMAND"), valid.clone(), 4, "CNI_COMMAND"),
        case("unknown command", set("CNI_COMMAND", os("BOGUS")), valid.clone(), 4, "BOGUS"),
        case("lowercase command", set("CNI_COMMAND", os("add")), valid.clone(), 4, "\"add\""),
        case("no container ID", unset("CNI_CONTAINERID"), valid.clone(), 4, "CNI_CONTAINERID"),
        case("container ID with /", set("CNI_CONTAINERID", os("a/b")), valid.clone(), 4, "a/b"),
        case("container ID ../", set("CNI_CONTAINERID", os("../etc")), valid.clone(), 4, "../etc"),
        case("container ID starting with -", set("CNI_CONTAINERID", os("-x")), valid.clone(), 4, "-x"),
        case("container ID with a space", set("CNI_CONTAINERID", os("a b")), valid.clone(), 4, "a b"),
        case("container ID with a newline", set("CNI_CONTAINERID", os("a\nb")), valid.clone(), 4, "CNI_CONTAINERID"),
        case("container ID not ASCII", set("CNI_CONTAINERID", os("é")), valid.clone(), 4, "é"),
        case("container ID not UTF-8", set("CNI_CONTAINERID", bytes(b"a\xffb")), valid.clone(), 4, "CNI_CONTAINERID"),
        case("no interface name", unset("CNI_IFNAME"), valid.clone(), 4, "CNI_IFNAME"),
        case(
            "interface name of 16 bytes",
            set("CNI_IFNAME", os("abcdefghijklmnop")),
            valid.clone(),
            4,
            "abcdefghijklmnop",
        ),
        case("interface name .", set("CNI_IFNAME", os(".")), valid.clone(), 4, "CNI_IFNAME"),
        case("interface name ..", set("CNI_IFNAME", os("..")), valid.clone(), 4, "CNI_IFNAME"),
        case("interface name with /", set("CNI_IFNAME", os("a/b")), valid.clone(), 4, "a/b"),
        case("interface name with :", set("CNI_IFNAME", os("eth0:1")), valid.clone(), 4, "eth0:1"),
        case("interface name with a space", set("CNI_IFNAME", os("eth 0")), valid.clone(), 4, "eth 0"),
        case("interface name not UTF-8", set("CNI_IFNAME", bytes(b"eth\xff")), valid.clone(), 4, "CNI_IFNAME"),
        case("no CNI_NETNS", unset("CNI_NETNS"), valid.clone(), 4, "CNI_NETNS"),
        case("CNI_NETNS missing", set("CNI_NETNS", os("/nonexistent/netns")), valid.clone(), 4, "/nonexistent/netns"),
        case("CNI_NETNS a regular file", set("CNI_NETNS", os(&file_path)), valid.clone(), 4, "regular file"),
        case("CNI_NETNS a directory", set("CNI_NETNS", os(&dir_path)), valid.clone(), 4, "directory"),
        case("CNI_NETNS a FIFO", set("CNI_NETNS", fifo.clone().into_os_string()), valid.clone(), 4, "FIFO"),
        case("CNI_NETNS a socket", set("CNI_NETNS", socket_file.clone().into_os_string()), valid.clone(), 4, "socket"),
        case("CNI_NETNS a device", set("CNI_NETNS", os("/dev/null")), valid.clone(), 4, "character device"),
        case("CNI_NETNS the node's own", set("CNI_NETNS", os("/proc/self/ns/net")), valid.clone(), 4, "node's own"),
        case("CNI_NETNS the node's, named", set("CNI_NETNS", os(&node_ns_path)), valid.clone(), 4, "node's own"),
        case(
            "CNI_NETNS a link to the node's",
            set("CNI_NETNS", own_link.clone().into_os_string()),
            valid.clone(),
            4,
            "node's own",
        ),
        case(
            "CNI_NETNS a mount namespace",
            set("CNI_NETNS", os("/proc/self/ns/mnt")),
            valid.clone(),
            4,
            "not a network namespace",
        ),
        case("CNI_NETNS relative", set("CNI_NETNS", os("netns/x")), valid.clone(), 4, "absolute"),
        case("CNI_NETNS not UTF-8", set("CNI_NETNS", bytes(b"/var/run/netns/\xff")), valid.clone(), 4, "CNI_NETNS"),
        case("CNI_ARGS without =", set("CNI_ARGS", os("K8S_POD_NAME")), valid.clone(), 4, "K8S_POD_NAME"),
        case("CNI_ARGS with an unknown key", set("CNI_ARGS", os("EVIL=1")), valid.clone(), 4, "EVIL"),
        case("CNI_ARGS not UTF-8", set("CNI_ARGS", bytes(b"K8S_POD_NAME=\xff")), valid.clone(), 4, "CNI_ARGS"),
        case(
            "an unrelated variable not UTF-8 (no panic)",
            vec![(os("FOO"), Some(bytes(b"\xff\xfe"))), (bytes(b"BAR\xff"), Some(os("x")))],
            without("name"),
            7,
            "name",
        ),
        // Standard input.
        case("empty stdin", vec![], vec![], 6, "not valid JSON"),
        case("not JSON", vec![], b"{not json".to_vec(), 6, "not valid JSON"),
        case("stdin not UTF-8", vec![], b"{\"cniVersion\":\"1.0.0\",\"name\":\"\xff\"}".to_vec(), 6, "not valid JSON"),
        case("stdin of 17 MiB", vec![], huge, 6, "too large"),
        case("JSON nested 100000 deep", vec![], nested, 6, "not valid JSON"),
        case("a JSON array", vec![], b"[1,2,3]".to_vec(), 6, "not valid JSON"),
        case("no cniVersion", vec![], without("cniVersion"), 7, "cniVersion"),
        case("cniVersion 0.2.0", vec![], with(json!({"cniVersion": "0.2.0"})), 1, "0.2.0"),
        case("cniVersion 9.9.9", vec![], with(json!({"cniVersion": "9.9.9"})), 1, "9.9.9"),
        case("cniVersion a number", vec![], with(json!({"cniVersion": 1})), 6, "cniVersion"),
        case("no name", vec![], without("name"), 7, "name"),
        case("name with /", vec![], with(json!({"name": "a/b"})), 7, "a/b"),
        case("empty name", vec![], with(json!({"name": ""})), 7, "name"),
        case("another plugin's type", vec![], with(json!({"type": "bridge"})), 7, "bridge"),
        case("CHECK at 0.3.1", set("CNI_COMMAND", os("CHECK")), with(json!({"cniVersion": "0.3.1"})), 1, "0.3.1"),
        case("GC at 1.0.0", set("CNI_COMMAND", os("GC")), valid.clone(), 1, "1.0.0"),
        case("STATUS at 0.4.0", set("CNI_COMMAND", os("STATUS")), with(json!({"cniVersion": "0.4.0"})), 1, "0.4.0"),
        case("CHECK without prevResult", set("CNI_COMMAND", os("CHECK")), valid.clone(), 7, "prevResult"),
        case("socket is a file", vec![], with(json!({"socket": file_path})), 11, &file_path),
        case("socket is a directory", vec![], with(json!({"socket": dir_path})), 11, &dir_path),
        case("mtu out of range", vec![], with(json!({"mtu": 100_000})), 7, "100000"),
        case("an enforcement hook that does not exist", vec![], with(json!({"enforcementHook": "xdp"})), 6, "xdp"),
        case("runtimeConfig.ips not an address", vec![], with(json!({"runtimeConfig": {"ips": ["ten"]}})), 7, "ten"),
        case("a pool that does not exist", vec![], with(json!({"pools": ["no-such-pool"]})), 7, "no-such-pool"),
        case(
            "an address outside every pool",
            vec![],
            with(json!({"runtimeConfig": {"ips": ["10.99.0.1"]}})),
            100,
            "10.99.0.1",
        ),
        case(
            "IPAM-only rangeStart outside the subnet",
            vec![],
            ipam_only(json!({"subnet": "10.63.0.0/24", "rangeStart": "10.64.0.1"})),
            7,
            "10.64.0.1",
        ),
        case(
            "IPAM-only rangeStart after rangeEnd",
            vec![],
            ipam_only(json!({"subnet": "10.63.0.0/24", "rangeStart": "10.63.0.9", "rangeEnd": "10.63.0.2"})),
            7,
            "rangeStart",
        ),
        case(
            "IPAM-only: the subnet's broadcast address",
            vec![],
            asking(ipam_only(json!({"subnet": "10.63.0.0/24"})), "10.63.0.255"),
            100,
            "10.63.0.255",
        ),
        case(
            "IPAM-only: the subnet's network address",
            vec![],
            asking(ipam_only(json!({"subnet": "10.63.0.0/24"})), "10.63.0.0"),
            100,
            "10.63.0.0",
        ),
        case(
            "IPAM-only: the gateway",
            vec![],
            asking(ipam_only(json!({"subnet": "10.63.0.0/24", "gateway": "10.63.0.1"})), "10.63.0.1"),
            100,
            "10.63.0.1",
        ),
    ];
    assert!(cases.len() >= 50, "{} cases", cases.len());

    let before = snapshot(&node, &pod);
    let mut failures = Vec::new();
    for case in &cases {
        let (exit, stdout) = run_plugin(&node, &pod.path(), case);
        let parsed: Option<Value> = serde_json::from_str(stdout.trim()).ok();
        let verdict = match (&parsed, exit) {
            (_, Some(0)) => Some(format!("exit 0: {stdout}")),
            (None, _) => Some(format!("exit {exit:?}, stdout not JSON: {stdout:?}")),
            (Some(err), _) if err["code"] != json!(case.code) => {
                Some(format!("code {} not {}: {err}", err["code"], case.code))
            }
            (Some(err), _) if err["cniVersion"].as_str().is_none_or(str::is_empty) => {
                Some(format!("no cniVersion: {err}"))
            }
            (Some(err), _) => {
                let text = format!(
                    "{} {}",
                    err["msg"].as_str().unwrap_or_default(),
                    err["details"].as_str().unwrap_or_default()
                );
                (!text.contains(&case.names)).then(|| format!("does not name {:?}: {err}", case.names))
            }
        };
        if let Some(verdict) = verdict {
            failures.push(format!("{}: {verdict}", case.what));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases wrong:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert_eq!(snapshot(&node, &pod), before, "an interface, address or route changed");
    let check = node.cli(&["ipam", "check"]);
    assert!(check.status.success(), "ipam check: {}", String::from_utf8_lossy(&check.stdout));
    assert_eq!(serde_json::from_str::<Value>(&node.cli_ok(&["get", "handles", "-o", "json"])).unwrap(), json!([]));
    node.stop_agent();
}

/// The agent acts only on interfaces it made: whatever name or index a client sends, the node's uplink is
/// never deleted and never gets a pod's enforcement.
#[test]
fn the_agent_touches_no_interface_but_the_attachments_own() {
    use poolwarden_cni::{
        plugin::{call_agent, host_ifname, send_to_agent},
        protocol::{AddRequest, DelRequest, Request, Response},
    };
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.255.9.2");
    node.ns.exec(&["ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0peer"]);
    node.ns.exec(&["ip", "link", "set", "up0", "up"]);
    node.apply(
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: trust}\nspec: {cidr: 10.63.1.0/24, blockSize: 28}\n",
    );
    node.start_agent();
    let pod = NetNs::new("pwp");
    let uplink_index: u32 = node.ns.exec(&["cat", "/sys/class/net/up0/ifindex"]).trim().parse().expect("ifindex");
    let socket = node.socket();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let add = |host_ifname: String, follows: bool| AddRequest {
        container_id: "trust".into(),
        ifname: "eth0".into(),
        netns: pod.path(),
        namespace: "default".into(),
        pod: "trust".into(),
        host_ifname,
        host_index_follows: follows,
        ..Default::default()
    };
    let untouched = |what: &str| {
        assert!(node.ns.try_exec(&["ip", "link", "show", "up0"]), "{what}: up0 was deleted");
        let qdiscs = node.ns.exec(&["tc", "qdisc", "show", "dev", "up0"]);
        assert!(!qdiscs.contains("clsact"), "{what}: enforcement attached to up0: {qdiscs}");
        let filters = node.ns.exec(&["tc", "filter", "show", "dev", "up0", "ingress"]);
        assert!(filters.trim().is_empty(), "{what}: a filter on up0: {filters}");
        assert_eq!(
            serde_json::from_str::<Value>(&node.cli_ok(&["get", "handles", "-o", "json"])).unwrap(),
            json!([]),
            "{what}: an address stayed allocated"
        );
    };

    // A DEL of an attachment the agent never saw, naming the uplink.
    let del = DelRequest { container_id: "ghost".into(), ifname: "eth0".into(), host_ifname: "up0".into() };
    let answer = runtime.block_on(call_agent(&socket, &Request::Del(del))).expect("answer");
    assert!(matches!(answer, Response::Deleted { .. }), "{answer:?}");
    untouched("DEL naming up0");

    // An ADD naming the uplink as its host side.
    let answer = runtime.block_on(call_agent(&socket, &Request::Add(add("up0".into(), false)))).expect("answer");
    let Response::Error(refusal) = answer else { panic!("ADD naming up0 was accepted: {answer:?}") };
    assert!(refusal.msg.contains("up0"), "{refusal:?}");
    untouched("ADD naming up0");

    // An ADD with the right name that announces the uplink's index.
    let answer = runtime.block_on(async {
        let mut pending = send_to_agent(&socket, &Request::Add(add(host_ifname("trust", "eth0"), true))).await?;
        if let Some(announcer) = pending.announcer() {
            let _ = announcer.up(uplink_index).await;
        }
        pending.answer().await
    });
    let Ok(Response::Error(refusal)) = answer else { panic!("ADD announcing up0's index was accepted: {answer:?}") };
    assert!(refusal.msg.contains(&uplink_index.to_string()) && refusal.details.contains("up0"), "{refusal:?}");
    untouched("ADD announcing up0's index");
    node.stop_agent();
}

/// The agent's socket is never reachable by a non-root user, not even in the moment after it is bound, and
/// whatever the umask: a hundred agent starts under umask 000 in a world-writable directory, with a user
/// `nobody` connecting and asking in a loop all along, get that user not one answer.
#[test]
fn a_hundred_starts_under_umask_000_never_answer_another_user() {
    if !privileged() {
        return;
    }
    let node = Node::new("10.255.9.3");
    let open = tempfile::Builder::new().prefix("pw-umask-").tempdir_in("/tmp").expect("dir");
    std::fs::set_permissions(open.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    let socket = open.path().join("agent.sock");
    let stop = open.path().join("stop");
    // The client: connect, ask STATUS, count answers; until told to stop.
    let client = r#"
import socket, sys, os, json
path, stop = sys.argv[1], sys.argv[2]
tries = connected = answered = 0
while not os.path.exists(stop):
    tries += 1
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        connected += 1
        s.sendall(b'{"command":"status"}\n')
        s.shutdown(socket.SHUT_WR)
        s.settimeout(2)
        if s.recv(1):
            answered += 1
    except OSError:
        pass
    finally:
        s.close()
print(json.dumps({"tries": tries, "connected": connected, "answered": answered}))
"#;
    let watcher = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", client])
        .arg(&socket)
        .arg(&stop)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the client as nobody");
    let agent_command = format!(
        "umask 000 && exec ip netns exec {} {} agent --node node-0 --socket {} --metrics-addr 127.0.0.1:9641 --bpf-dir {}",
        node.ns.name,
        binary("poolwarden").display(),
        socket.display(),
        node.bpf_dir()
    );
    for start in 0..100 {
        let mut agent = Command::new("sh")
            .args(["-c", &agent_command])
            .env("POOLWARDEN_DATASTORE", node.datastore())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start agent");
        wait_for(&format!("start {start} to answer"), Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).expect("socket").permissions());
        assert_eq!(mode & 0o777, 0o600, "start {start}: the socket's mode");
        let _ = Command::new("kill").args(["-TERM", &agent.id().to_string()]).status();
        let _ = agent.wait();
    }
    std::fs::write(&stop, "").expect("stop");
    let out = watcher.wait_with_output().expect("client");
    let counts: Value = serde_json::from_slice(&out.stdout).expect("client counts");
    assert!(counts["tries"].as_u64().unwrap_or(0) > 100, "the client hardly tried: {counts}");
    assert_eq!(counts["answered"], json!(0), "a non-root user was answered: {counts}");

    // A directory the agent makes for its socket is 0700 whatever the umask.
    let nested = open.path().join("made/by/agent.sock");
    let mut agent = Command::new("sh")
        .args(["-c", &agent_command.replace(&socket.display().to_string(), &nested.display().to_string())])
        .env("POOLWARDEN_DATASTORE", node.datastore())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start agent");
    wait_for("the agent to answer", Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&nested).is_ok()
    });
    for dir in ["made", "made/by"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(open.path().join(dir)).expect("dir").permissions(),
        );
        assert_eq!(mode & 0o777, 0o700, "{dir}'s mode");
    }
    let _ = Command::new("kill").args(["-TERM", &agent.id().to_string()]).status();
    let _ = agent.wait();
}
