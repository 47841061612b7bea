//! What this process asks the API server, counted by verb and resource: every request of every client made by
//! [`super::connect`] goes through [`CountLayer`], and the agent's metrics expose the tally as
//! `poolwarden_kubernetes_requests_total{verb,resource}`. It is how the requests a node costs the API server at
//! rest are measured (issue 17: per node per minute with 1, 2 and 1,000 nodes), from the agents themselves.

use std::{
    collections::BTreeMap,
    sync::{Arc, LazyLock},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

/// One kind of request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ApiRequest {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection` (the API server's own
    /// verbs, as in its audit log and `apiserver_request_total`).
    pub verb: String,
    /// `pods`, `leases`, `ippools`, ...; `ippools/status` for a subresource; the path for anything else.
    pub resource: String,
}

/// A tally of requests: read back by [`Tally::counts`], and as a metric family.
#[derive(Default)]
pub struct Tally {
    counts: std::sync::Mutex<BTreeMap<ApiRequest, u64>>,
    family: Family<ApiRequest, Counter>,
}

impl Tally {
    /// Count one request.
    pub fn note(&self, request: ApiRequest) {
        self.family.get_or_create(&request).inc();
        *self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(request).or_default() += 1;
    }

    /// Every kind of request seen, with its count.
    pub fn counts(&self) -> BTreeMap<ApiRequest, u64> {
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The metric family (shared: what is counted later shows in it).
    pub fn family(&self) -> Family<ApiRequest, Counter> {
        self.family.clone()
    }
}

/// This process's tally (what the metrics endpoint shows).
pub static PROCESS: LazyLock<Arc<Tally>> = LazyLock::new(Arc::default);

/// The verb and resource of a request, as the API server names them.
pub fn classify(method: &http::Method, uri: &http::Uri) -> ApiRequest {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let rest = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[][..],
    };
    // namespaces/<ns>/<resource>... is namespaced; namespaces alone, or namespaces/<ns>, is the namespace itself.
    let rest = match rest {
        ["namespaces", _namespace, "status" | "finalize"] => rest.to_vec(),
        ["namespaces", _namespace, resource, tail @ ..] => {
            let mut all = vec![*resource];
            all.extend_from_slice(tail);
            all
        }
        other => other.to_vec(),
    };
    let query = uri.query().unwrap_or_default();
    let watching = query.split('&').any(|pair| pair == "watch=true" || pair == "watch=1");
    let (resource, named) = match rest.as_slice() {
        [] => (uri.path().to_string(), true),
        [resource] => ((*resource).to_string(), false),
        [resource, _name] => ((*resource).to_string(), true),
        [resource, _name, subresource, ..] => (format!("{resource}/{subresource}"), true),
    };
    let verb = match *method {
        http::Method::GET if watching => "watch",
        http::Method::GET if !named => "list",
        http::Method::GET => "get",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if !named => "deletecollection",
        http::Method::DELETE => "delete",
        _ => "other",
    };
    ApiRequest { verb: verb.to_string(), resource }
}

/// A tower layer counting each request into a tally before it is sent.
#[derive(Clone)]
pub struct CountLayer {
    tally: Arc<Tally>,
}

impl CountLayer {
    /// Count into `tally`.
    pub fn new(tally: Arc<Tally>) -> Self {
        Self { tally }
    }
}

impl<S> tower::Layer<S> for CountLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted { inner, tally: Arc::clone(&self.tally) }
    }
}

/// The service [`CountLayer`] makes.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    tally: Arc<Tally>,
}

impl<S, B> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        // Which request made a count (RUST_LOG=poolwarden::k8s::requests=debug): the tally has no room for it.
        tracing::debug!(method = %request.method(), uri = %request.uri(), "Kubernetes API request");
        self.tally.note(classify(request.method(), request.uri()));
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(method: http::Method, uri: &str) -> (String, String) {
        let request = classify(&method, &uri.parse().unwrap());
        (request.verb, request.resource)
    }

    #[tokio::test]
    async fn a_counted_client_counts_each_request_it_sends() {
        use k8s_openapi::api::coordination::v1::Lease;
        use tower::Layer as _;
        let (mock, mut handle) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
        let tally = Arc::new(Tally::default());
        let client = kube::Client::new(CountLayer::new(Arc::clone(&tally)).layer(mock), "default");
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (_, send) = handle.next_request().await.expect("a request");
                let lease = serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": "l", "namespace": "kube-system", "resourceVersion": "1"}});
                send.send_response(
                    http::Response::builder().body(kube::client::Body::from(lease.to_string().into_bytes())).unwrap(),
                );
            }
        });
        let api = kube::Api::<Lease>::namespaced(client, "kube-system");
        api.get("l").await.expect("get");
        api.get("l").await.expect("get again");
        server.await.unwrap();
        let counts: Vec<(String, String, u64)> =
            tally.counts().into_iter().map(|(k, n)| (k.verb, k.resource, n)).collect();
        assert_eq!(counts, vec![("get".to_string(), "leases".to_string(), 2)]);
    }

    #[test]
    fn requests_are_named_as_the_api_server_names_them() {
        let cases = [
            (http::Method::GET, "/api/v1/namespaces?watch=true&resourceVersion=5", "watch", "namespaces"),
            (http::Method::GET, "/api/v1/namespaces", "list", "namespaces"),
            (http::Method::GET, "/api/v1/namespaces/kube-system", "get", "namespaces"),
            (http::Method::GET, "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1", "list", "pods"),
            (http::Method::GET, "/api/v1/namespaces/a/pods/web-1", "get", "pods"),
            (http::Method::GET, "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/pw", "get", "leases"),
            (http::Method::PUT, "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/pw", "update", "leases"),
            (http::Method::PATCH, "/apis/poolwarden.io/v1/ippools/a/status", "patch", "ippools/status"),
            (http::Method::POST, "/apis/poolwarden.io/v1/ipamblocks", "create", "ipamblocks"),
            (http::Method::DELETE, "/apis/poolwarden.io/v1/ipamblocks/10-0-0-0-26", "delete", "ipamblocks"),
            (http::Method::GET, "/version", "get", "/version"),
            (http::Method::PUT, "/api/v1/namespaces/a/finalize", "update", "namespaces/finalize"),
        ];
        for (method, uri, verb, resource) in cases {
            assert_eq!(kind(method, uri), (verb.to_string(), resource.to_string()), "{uri}");
        }
    }
}
