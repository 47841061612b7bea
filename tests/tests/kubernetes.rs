//! The agent in Kubernetes mode against an API server speaking real HTTP (a small fake one, inside the
//! node's namespace): namespaces, pods and the node come from it through the agent's caches, a namespace's
//! annotation changing reaches new pods (old ones are listed as mismatched), and the commands that go
//! through the agent see the API server's namespaces.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use poolwarden_tests::{NetNs, Node, address_of, k8s_args, privileged, wait_for};
use serde_json::{Value, json};

/// Serves list, watch (answered when the state's revision moves past the one asked for, else empty after
/// half a second) and GET of namespaces, pods and nodes from a JSON state file the test rewrites.
const FAKE_API: &str = r#"
import http.server, json, sys, time, urllib.parse
STATE = sys.argv[2]
def load():
    with open(STATE) as f:
        return json.load(f)
def key_of(o):
    m = o["metadata"]
    return (m.get("namespace", ""), m["name"])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def send(self, code, body):
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        parts = url.path.strip("/").split("/")[2:]
        state = load()
        rv = state["rv"]
        if parts in (["namespaces"], ["pods"], ["nodes"]):
            kind = parts[0]
            items = state[kind]
            sel = q.get("fieldSelector", "")
            if sel.startswith("spec.nodeName="):
                items = [o for o in items if o["spec"].get("nodeName") == sel.split("=", 1)[1]]
            if sel.startswith("metadata.name="):
                items = [o for o in items if o["metadata"]["name"] == sel.split("=", 1)[1]]
            for o in items:
                o["metadata"]["resourceVersion"] = str(rv)
            if q.get("watch") in ("true", "1"):
                since = int(q.get("resourceVersion") or 0)
                deadline = time.time() + 0.5
                while rv <= since and time.time() < deadline:
                    time.sleep(0.05)
                    rv = load()["rv"]
                if rv <= since:
                    return self.send(200, b"")
                return self.send(200, self.events(kind, sel, rv))
            return self.send(200, {"apiVersion": "v1", "kind": "List", "items": items,
                                   "metadata": {"resourceVersion": str(rv)}})
        if len(parts) == 2 and parts[0] in ("namespaces", "nodes"):
            found = [o for o in state[parts[0]] if o["metadata"]["name"] == parts[1]]
        elif len(parts) == 4 and parts[2] == "pods":
            found = [o for o in state["pods"] if key_of(o) == (parts[1], parts[3])]
        else:
            found = []
        if found:
            return self.send(200, found[0])
        self.send(404, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "not found", "reason": "NotFound", "code": 404})
    def events(self, kind, sel, rv):
        items = load()[kind]
        if sel.startswith("spec.nodeName="):
            items = [o for o in items if o["spec"].get("nodeName") == sel.split("=", 1)[1]]
        lines = []
        for o in items:
            o["metadata"]["resourceVersion"] = str(rv)
            lines.append(json.dumps({"type": "MODIFIED", "object": o}))
        return ("\n".join(lines) + "\n").encode()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

const POOLS: &str = "\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: external-pool}
spec: {cidr: 10.41.0.0/24, blockSize: 29, allowedNamespaces: [tenant-a]}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: internal-pool}
spec: {cidr: 10.42.0.0/24, blockSize: 29}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: zone-pool}
spec: {cidr: 10.43.0.0/24, blockSize: 29, nodeSelector: \"zone == 'a'\", assignmentMode: Manual}
";

struct FakeApi {
    child: Child,
    state: std::path::PathBuf,
    value: Value,
}

impl FakeApi {
    fn start(node: &Node, port: u16, value: Value) -> Self {
        let state = node.dir.path().join("api-state.json");
        std::fs::write(&state, value.to_string()).expect("write state");
        let child = Command::new("ip")
            .args(["netns", "exec", &node.ns.name, "python3", "-c", FAKE_API, &port.to_string()])
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the fake API server");
        let url = format!("http://127.0.0.1:{port}/api/v1/nodes");
        wait_for("the fake API server to come up", Duration::from_secs(10), || {
            node.ns.try_exec(&["curl", "-sf", "-m", "1", &url])
        });
        Self { child, state, value }
    }

    /// Change the state and move its revision on, as the API server does for a write.
    fn change(&mut self, edit: impl FnOnce(&mut Value)) {
        edit(&mut self.value);
        let rv = self.value["rv"].as_u64().unwrap_or(1) + 1;
        self.value["rv"] = json!(rv);
        let temporary = self.state.with_extension("tmp");
        std::fs::write(&temporary, self.value.to_string()).expect("write state");
        std::fs::rename(&temporary, &self.state).expect("replace state");
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn namespace(name: &str, pools: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name,
        "labels": {"kubernetes.io/metadata.name": name}, "annotations": {"poolwarden.io/ipv4pools": pools}}})
}

fn pod(namespace: &str, name: &str, annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace,
        "annotations": annotations}, "spec": {"nodeName": "node-0", "containers": [{"name": "app"}]}})
}

fn add(node: &Node, namespace: &str, pod: &str) -> (NetNs, String) {
    let pod_ns = NetNs::new("pwp");
    let (ok, result) = node.cni("ADD", pod, &pod_ns.path(), &k8s_args(namespace, pod), &node.conf(json!({})));
    assert!(ok, "ADD {namespace}/{pod}: {result}\n{}", node.agent_log());
    (pod_ns, address_of(&result))
}

#[test]
fn pools_follow_the_api_servers_namespaces_pods_and_node() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.97.0.20");
    node.apply(POOLS);
    let port = 18000 + (std::process::id() % 1000) as u16;
    let mut api = FakeApi::start(
        &node,
        port,
        json!({
            "rv": 1,
            "namespaces": [namespace("tenant-a", "[\"external-pool\"]"), namespace("tenant-b", "[\"internal-pool\"]")],
            "pods": [
                pod("tenant-a", "a-1", json!({})),
                pod("tenant-b", "b-1", json!({})),
                pod("tenant-b", "b-zone", json!({"poolwarden.io/ipv4pools": "[\"zone-pool\"]"})),
                pod("tenant-b", "b-sneaky", json!({"poolwarden.io/ipv4pools": "[\"external-pool\"]"})),
            ],
            "nodes": [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-0", "labels": {"zone": "a"}},
                       "status": {"addresses": [{"type": "InternalIP", "address": "10.97.0.20"}]}}],
        }),
    );
    let kubeconfig = node.dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\n\
             current-context: x\n"
        ),
    )
    .expect("write kubeconfig");
    node.start_agent_with(&["--kubernetes", "--kubeconfig", &kubeconfig.display().to_string()]);

    // The namespace's annotation, from the API server, picks the pool.
    let (_a1, a1) = add(&node, "tenant-a", "a-1");
    assert!(a1.starts_with("10.41.0."), "tenant-a takes external-pool: {a1}");
    let (_b1, b1) = add(&node, "tenant-b", "b-1");
    assert!(b1.starts_with("10.42.0."), "tenant-b takes internal-pool: {b1}");
    // A pod annotation refines it; the pool's nodeSelector matches the node's labels from the API server.
    let (_bz, bz) = add(&node, "tenant-b", "b-zone");
    assert!(bz.starts_with("10.43.0."), "the pod annotation picks zone-pool on a zone=a node: {bz}");
    // A pool bound to tenant-a is refused to tenant-b even when its pod asks for it.
    let sneaky = NetNs::new("pwp");
    let (ok, refused) =
        node.cni("ADD", "b-sneaky", &sneaky.path(), &k8s_args("tenant-b", "b-sneaky"), &node.conf(json!({})));
    assert!(!ok && refused["msg"].as_str().unwrap_or_default().contains("refuses namespace \"tenant-b\""), "{refused}");

    // kubectl annotate namespace tenant-a ... : the watch brings it to the cache, new pods follow it.
    api.change(|state| state["namespaces"][0] = namespace("tenant-a", "[\"internal-pool\"]"));
    wait_for("the annotation change to reach the agent's cache", Duration::from_secs(15), || {
        node.cli_ok(&["get", "namespaces"]).lines().any(|l| l.starts_with("tenant-a") && l.contains("internal-pool"))
    });
    api.change(|state| state["pods"].as_array_mut().unwrap().push(pod("tenant-a", "a-2", json!({}))));
    let (_a2, a2) = add(&node, "tenant-a", "a-2");
    assert!(a2.starts_with("10.42.0."), "a pod created after the change takes the new pool: {a2}");
    let mismatched = node.cli_ok(&["ipam", "show", "--mismatched"]);
    let rows: Vec<&str> = mismatched.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{mismatched}");
    assert!(rows[0].contains("a-1") && rows[0].contains(&a1) && rows[0].contains("internal-pool"), "{mismatched}");

    // Commands through the agent see the API server's namespaces; standalone namespace commands are refused.
    let export: Value = serde_json::from_str(&node.cli_ok(&["firewall", "export", "--format", "json"])).expect("json");
    let internal = export["pools"].as_array().unwrap().iter().find(|p| p["pool"] == "internal-pool").unwrap().clone();
    assert_eq!(internal["assignedNamespaces"], json!(["tenant-a", "tenant-b"]), "{export}");
    let out = node.cli(&["annotate", "namespace", "tenant-a", "poolwarden.io/ipv4pools=[\"external-pool\"]"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("come from the API server"));

    // The node registered with its InternalIP from the API server.
    assert!(node.cli_ok(&["get", "nodes"]).contains("10.97.0.20"));
    node.stop_agent();
}
