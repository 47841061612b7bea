//! The caches against kube-rs's mock service (tower-test), scenario by scenario. The mock is answered by a
//! small fake API server: objects with resource versions, list, watch (answered once there are events
//! after the version asked for), GET, a switch that makes it unreachable, one that withholds watch events,
//! and one that answers the next watches `410 Gone`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

use super::*;

#[derive(Default)]
struct State {
    revision: u64,
    /// (resource, "namespace/name" or "name") -> object.
    objects: BTreeMap<(&'static str, String), Value>,
    /// Every change: (revision, resource, ADDED/MODIFIED/DELETED, object).
    log: Vec<(u64, &'static str, &'static str, Value)>,
    unreachable: bool,
    withhold_events: bool,
    expire: Vec<&'static str>,
    requests: Vec<String>,
}

#[derive(Clone, Default)]
struct FakeApi {
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(Ok(b)) = text.get(i + 1..i + 3).map(|hex| u8::from_str_radix(hex, 16))
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn selector_matches(resource: &str, selector: Option<&str>, object: &Value) -> bool {
    let Some((field, want)) = selector.and_then(|s| s.split_once('=')) else { return true };
    let got = match (resource, field) {
        ("pods", "spec.nodeName") => object["spec"]["nodeName"].as_str(),
        (_, "metadata.name") => object["metadata"]["name"].as_str(),
        _ => None,
    };
    got == Some(want)
}

fn body(value: &Value) -> Response<Body> {
    Response::builder().status(200).body(Body::from(serde_json::to_vec(value).unwrap())).unwrap()
}

fn not_found(what: &str) -> Response<Body> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{what} not found"), "reason": "NotFound", "code": 404});
    Response::builder().status(404).body(Body::from(serde_json::to_vec(&status).unwrap())).unwrap()
}

impl FakeApi {
    /// Create or replace an object.
    fn apply(&self, resource: &'static str, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        state.revision += 1;
        let revision = state.revision;
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        let key = match object["metadata"]["namespace"].as_str() {
            Some(ns) => format!("{ns}/{}", object["metadata"]["name"].as_str().unwrap()),
            None => object["metadata"]["name"].as_str().unwrap().to_string(),
        };
        let kind = if state.objects.insert((resource, key), object.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        state.log.push((revision, resource, kind, object));
        drop(state);
        self.changed.notify_waiters();
    }

    /// Delete an object.
    fn delete(&self, resource: &'static str, key: &str) {
        let mut state = self.state.lock().unwrap();
        state.revision += 1;
        let revision = state.revision;
        if let Some(mut object) = state.objects.remove(&(resource, key.to_string())) {
            object["metadata"]["resourceVersion"] = json!(revision.to_string());
            state.log.push((revision, resource, "DELETED", object));
        }
        drop(state);
        self.changed.notify_waiters();
    }

    fn set(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.state.lock().unwrap());
        self.changed.notify_waiters();
    }

    fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    fn client(&self) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let fake = self.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let fake = fake.clone();
                let (method, uri) = (request.method().to_string(), request.uri().clone());
                tokio::spawn(async move {
                    match fake.answer(&method, &uri).await {
                        Some(response) => respond.send_response(response),
                        None => respond.send_error("connection refused (the fake API server is unreachable)"),
                    }
                });
            }
        });
        Client::new(service, "default")
    }

    async fn answer(&self, method: &str, uri: &http::Uri) -> Option<Response<Body>> {
        let path = uri.path().to_string();
        let query: BTreeMap<String, String> = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_string(), percent_decode(v)))
            .collect();
        {
            let mut state = self.state.lock().unwrap();
            state.requests.push(format!("{method} {uri}"));
            if state.unreachable {
                return None;
            }
        }
        let segments: Vec<&str> = path.trim_start_matches("/api/v1/").split('/').collect();
        let (resource, name): (&'static str, Option<String>) = match segments.as_slice() {
            ["namespaces"] => ("namespaces", None),
            ["namespaces", name] => ("namespaces", Some((*name).to_string())),
            ["namespaces", ns, "pods", name] => ("pods", Some(format!("{ns}/{name}"))),
            ["pods"] => ("pods", None),
            ["nodes"] => ("nodes", None),
            ["nodes", name] => ("nodes", Some((*name).to_string())),
            _ => return Some(not_found(&path)),
        };
        if let Some(name) = name {
            let state = self.state.lock().unwrap();
            return Some(match state.objects.get(&(resource, name.clone())) {
                Some(object) => body(object),
                None => not_found(&format!("{resource} {name}")),
            });
        }
        let selector = query.get("fieldSelector").map(String::as_str);
        if query.get("watch").map(String::as_str) != Some("true") {
            let state = self.state.lock().unwrap();
            let items: Vec<&Value> = state
                .objects
                .iter()
                .filter(|((r, _), o)| *r == resource && selector_matches(resource, selector, o))
                .map(|(_, o)| o)
                .collect();
            return Some(body(&json!({"apiVersion": "v1", "kind": "List", "items": items,
                "metadata": {"resourceVersion": state.revision.to_string()}})));
        }
        let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let changed = self.changed.notified();
            {
                let mut state = self.state.lock().unwrap();
                if state.unreachable {
                    return None;
                }
                if let Some(at) = state.expire.iter().position(|r| *r == resource) {
                    state.expire.remove(at);
                    let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                        "metadata": {}, "status": "Failure", "message": "too old resource version",
                        "reason": "Expired", "code": 410}});
                    return Some(body(&gone));
                }
                let events: Vec<String> = state
                    .log
                    .iter()
                    .filter(|(rev, r, _, o)| *rev > from && *r == resource && selector_matches(resource, selector, o))
                    .map(|(_, _, kind, o)| json!({"type": kind, "object": o}).to_string())
                    .collect();
                if (!events.is_empty() && !state.withhold_events) || Instant::now() > deadline {
                    let text = if state.withhold_events { String::new() } else { events.join("\n") + "\n" };
                    return Some(Response::builder().status(200).body(Body::from(text.into_bytes())).unwrap());
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), changed).await;
        }
    }
}

fn namespace(name: &str, annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "annotations": annotations,
        "labels": {"team": name}}})
}

fn pod(namespace: &str, name: &str, node: &str, annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace,
        "uid": format!("uid-{name}"), "annotations": annotations},
        "spec": {"nodeName": node, "containers": [{"name": "app"}]}})
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"zone": "a"}},
        "status": {"addresses": [{"type": "Hostname", "address": name},
            {"type": "InternalIP", "address": "192.0.2.10"}]}})
}

const POOLS: &str = "poolwarden.io/ipv4pools";

/// A fake with namespace `tenant-a` (bound to `external-pool`), node `n1`, a pod on it and one elsewhere.
fn seeded() -> FakeApi {
    let fake = FakeApi::default();
    fake.apply("namespaces", namespace("tenant-a", json!({POOLS: "[\"external-pool\"]"})));
    fake.apply("nodes", node("n1"));
    fake.apply("pods", pod("tenant-a", "web-1", "n1", json!({"poolwarden.io/ipAddrs": "[\"10.0.0.7\"]"})));
    fake.apply("pods", pod("tenant-a", "elsewhere", "n2", json!({})));
    fake
}

async fn started(fake: &FakeApi) -> KubeDirectory {
    let directory = KubeDirectory::start(fake.client(), "n1");
    assert!(directory.wait_ready(Duration::from_secs(10)).await, "caches never synced: {:?}", fake.requests());
    directory
}

/// Poll `check` until it holds, for at most 10 s.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn gets_of(fake: &FakeApi, path: &str) -> usize {
    fake.requests().iter().filter(|r| r.starts_with("GET ") && r.contains(path) && !r.contains("watch=")).count()
}

#[tokio::test]
async fn list_then_watch_answers_from_the_cache() {
    let fake = seeded();
    let directory = started(&fake).await;
    let requests = fake.requests();
    assert!(requests.iter().any(|r| r.contains("/api/v1/pods?") && r.contains("spec.nodeName%3Dn1")), "{requests:?}");

    let ns = directory.namespace("tenant-a").await.unwrap();
    assert_eq!(ns.annotations.get(POOLS).map(String::as_str), Some("[\"external-pool\"]"));
    assert_eq!(ns.labels.get("team").map(String::as_str), Some("tenant-a"));
    let web = directory.pod("tenant-a", "web-1", "uid-web-1").await.unwrap();
    assert_eq!(web.annotations.get("poolwarden.io/ipAddrs").map(String::as_str), Some("[\"10.0.0.7\"]"));
    let given = NodeInfo { name: "n1".into(), labels: [("rack".to_string(), "r1".to_string())].into() };
    let n1 = directory.node(&given).await.unwrap();
    assert_eq!(n1.labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(n1.labels.get("rack").map(String::as_str), Some("r1"));
    assert_eq!(directory.node_addresses().await.unwrap(), vec!["192.0.2.10".parse::<IpAddr>().unwrap()]);
    // All of that came from the caches: no single-object GET was needed.
    assert_eq!(gets_of(&fake, "/pods/web-1") + gets_of(&fake, "/namespaces/tenant-a") + gets_of(&fake, "/nodes/n1"), 0);

    // A namespace created later arrives through the watch.
    fake.apply("namespaces", namespace("tenant-b", json!({POOLS: "[\"internal-pool\"]"})));
    eventually("tenant-b in the cache", || async {
        directory.namespaces().await.unwrap().iter().any(|n| n.name == "tenant-b")
    })
    .await;
    assert_eq!(gets_of(&fake, "/namespaces/tenant-b"), 0);
}

#[tokio::test]
async fn an_annotation_change_reaches_the_cache() {
    let fake = seeded();
    let directory = started(&fake).await;
    fake.apply("namespaces", namespace("tenant-a", json!({POOLS: "[\"internal-pool\"]"})));
    eventually("the new annotation", || async {
        directory.namespace("tenant-a").await.unwrap().annotations.get(POOLS).map(String::as_str)
            == Some("[\"internal-pool\"]")
    })
    .await;
}

#[tokio::test]
async fn a_pod_not_yet_in_the_cache_is_fetched_directly() {
    let fake = seeded();
    let directory = started(&fake).await;
    fake.set(|s| s.withhold_events = true);
    fake.apply("pods", pod("tenant-a", "just-created", "n1", json!({POOLS: "[\"internal-pool\"]"})));
    let pod = directory.pod("tenant-a", "just-created", "").await.unwrap();
    assert_eq!(pod.annotations.get(POOLS).map(String::as_str), Some("[\"internal-pool\"]"));
    assert_eq!(gets_of(&fake, "/namespaces/tenant-a/pods/just-created"), 1);
    // A pod that does not exist at all is named as such.
    let missing = directory.pod("tenant-a", "ghost", "").await.unwrap_err();
    assert!(matches!(missing, DirectoryError::NotFound { .. }), "{missing}");
    assert!(missing.to_string().contains("pod tenant-a/ghost"), "{missing}");
}

#[tokio::test]
async fn an_unreachable_api_server_is_try_again_later_for_what_is_not_cached() {
    let fake = seeded();
    let directory = started(&fake).await;
    fake.set(|s| s.unreachable = true);
    // What the caches know is still answered.
    assert!(directory.pod("tenant-a", "web-1", "uid-web-1").await.is_ok());
    assert!(directory.namespace("tenant-a").await.is_ok());
    // What they don't is an error the agent answers with CNI code 11.
    let err = directory.pod("tenant-a", "new-pod", "").await.unwrap_err();
    assert!(matches!(err, DirectoryError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("pod tenant-a/new-pod"), "{err}");
    let reply = poolwarden_protocol::ErrorReply::from(err);
    assert_eq!(reply.code, poolwarden_protocol::code::TRY_AGAIN_LATER);
    assert!(reply.msg.contains("could not be reached"), "{}", reply.msg);
}

#[tokio::test]
async fn a_watch_restart_after_410_gone_lists_again_and_misses_nothing() {
    let fake = seeded();
    let directory = started(&fake).await;
    let lists = || {
        fake.requests().iter().filter(|r| r.starts_with("GET /api/v1/namespaces?") && !r.contains("watch=true")).count()
    };
    let before = lists();
    fake.set(|s| s.expire.push("namespaces"));
    // Changed while the watch was being told its version is too old.
    fake.apply("namespaces", namespace("tenant-c", json!({POOLS: "[\"external-pool\"]"})));
    eventually("tenant-c after the relist", || async { directory.namespace_cached("tenant-c").is_some() }).await;
    assert!(lists() > before, "the watcher did not list again after 410 Gone: {:?}", fake.requests());
    // And watching goes on after the restart.
    fake.apply("namespaces", namespace("tenant-d", json!({})));
    eventually("tenant-d after the restart", || async { directory.namespace_cached("tenant-d").is_some() }).await;
}

/// A pod is known by its UID: one recreated under its name (a StatefulSet's) is a new pod, for the ADD's
/// annotations and for the collector, which calls the old one gone; a pod or node is gone only when the
/// API server says so (an unreachable one is an error, never "gone").
#[tokio::test]
async fn pods_are_told_apart_by_uid_and_gone_only_when_the_api_says_so() {
    let fake = seeded();
    let directory = started(&fake).await;
    assert!(!directory.pod_gone("tenant-a", "web-1", "uid-web-1").await.unwrap());
    assert_eq!(gets_of(&fake, "/pods/web-1"), 0, "an existing pod is answered from the cache");
    // Recreated under its name, with other annotations; the watch has not delivered it yet.
    fake.set(|s| s.withhold_events = true);
    let mut again = pod("tenant-a", "web-1", "n1", json!({"poolwarden.io/ipAddrs": "[\"10.0.0.9\"]"}));
    again["metadata"]["uid"] = json!("uid-web-1-again");
    fake.apply("pods", again);
    let new = directory.pod("tenant-a", "web-1", "uid-web-1-again").await.unwrap();
    assert_eq!(new.annotations.get("poolwarden.io/ipAddrs").map(String::as_str), Some("[\"10.0.0.9\"]"));
    // The cache proves the old one existed a moment ago: not gone until the API server is asked.
    assert!(!directory.pod_gone("tenant-a", "web-1", "uid-web-1").await.unwrap());
    fake.set(|s| s.withhold_events = false);
    eventually("the new pod in the cache", || async {
        directory.pods.get(&ObjectRef::new("web-1").within("tenant-a")).and_then(|p| p.metadata.uid.clone())
            == Some("uid-web-1-again".into())
    })
    .await;
    let old = directory.pod("tenant-a", "web-1", "uid-web-1").await.unwrap_err();
    assert!(old.to_string().contains("of UID uid-web-1 (it has uid-web-1-again)"), "{old}");
    assert!(directory.pod_gone("tenant-a", "web-1", "uid-web-1").await.unwrap(), "the old pod is gone");
    assert!(!directory.pod_gone("tenant-a", "web-1", "uid-web-1-again").await.unwrap());
    fake.delete("pods", "tenant-a/web-1");
    eventually("the deleted pod to be gone", || async {
        directory.pod_gone("tenant-a", "web-1", "uid-web-1-again").await.unwrap()
    })
    .await;
    assert!(!directory.node_deleted("n1").await.unwrap());
    fake.delete("nodes", "n1");
    assert!(directory.node_deleted("n1").await.unwrap());
    // A static pod's mirror: the runtime passes the kubelet's UID, the mirror has its own and names the
    // kubelet's in an annotation. It is that pod, neither gone nor another.
    let mut mirror = pod("tenant-a", "etcd-n1", "n1", json!({"kubernetes.io/config.mirror": "static-uid"}));
    mirror["metadata"]["uid"] = json!("mirror-uid");
    fake.apply("pods", mirror);
    assert!(directory.pod("tenant-a", "etcd-n1", "static-uid").await.is_ok());
    assert!(!directory.pod_gone("tenant-a", "etcd-n1", "static-uid").await.unwrap());
    fake.set(|s| s.unreachable = true);
    assert!(directory.pod_gone("tenant-a", "ghost", "uid-ghost").await.is_err(), "unknown is not gone");
    assert!(directory.node_deleted("n2").await.is_err(), "unknown is not deleted");
}
