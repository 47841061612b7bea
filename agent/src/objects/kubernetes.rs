//! Objects as custom resources (`<plural>.poolwarden.io`, cluster-scoped, v1): the spec is the resource's
//! `spec`, the labels its labels, the version its `resourceVersion`. Updates are replaces carrying the
//! `resourceVersion` read and deletes carry it as a precondition, so the API server does the compare-and-swap;
//! lists and watches select with a label selector on the server.

use async_trait::async_trait;
use futures::StreamExt;
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, ListParams, PostParams, Preconditions, WatchEvent, WatchParams},
};
use serde_json::json;
use tokio::sync::mpsc;

use super::{Kind, Labels, Object, ObjectError, ObjectEvent, ObjectStore, ObjectWatch};

/// The objects of a Kubernetes API server.
pub struct KubeObjects {
    client: Client,
}

impl KubeObjects {
    /// Objects kept as custom resources through `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    fn api(&self, kind: Kind) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &resource(kind))
    }
}

/// The custom resource of `kind`.
pub fn resource(kind: Kind) -> ApiResource {
    crate::k8s::pools::crd(kind.name(), kind.plural())
}

fn object_of(object: DynamicObject) -> Object {
    Object {
        name: object.name_any(),
        version: object.resource_version().unwrap_or_default(),
        labels: object.metadata.labels.clone().unwrap_or_default(),
        spec: object.data.get("spec").cloned().unwrap_or(serde_json::Value::Null),
    }
}

fn selector_text(selector: &Labels) -> String {
    selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// The API server's refusal as an [`ObjectError`]: 409 is `conflict` (a taken name for a create, a stale
/// version for the rest), 404 a missing object.
fn refusal(kind: Kind, name: &str, conflict: impl FnOnce() -> ObjectError, err: kube::Error) -> ObjectError {
    match err {
        kube::Error::Api(status) if status.code == 409 => conflict(),
        kube::Error::Api(status) if status.code == 404 => {
            ObjectError::NotFound { kind: kind.name(), name: name.to_string() }
        }
        kube::Error::Api(status) if status.code == 422 => {
            ObjectError::Invalid { kind: kind.name(), name: name.to_string(), message: status.message }
        }
        other => ObjectError::Api(other.to_string()),
    }
}

#[async_trait]
impl ObjectStore for KubeObjects {
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Object>, ObjectError> {
        let found = self.api(kind).get_opt(name).await.map_err(|e| ObjectError::Api(e.to_string()))?;
        Ok(found.map(object_of))
    }

    async fn list(&self, kind: Kind, selector: &Labels) -> Result<(Vec<Object>, String), ObjectError> {
        let params = ListParams::default().labels(&selector_text(selector));
        let list = self.api(kind).list(&params).await.map_err(|e| ObjectError::Api(e.to_string()))?;
        let version = list.metadata.resource_version.clone().unwrap_or_default();
        let mut objects: Vec<Object> = list.items.into_iter().map(object_of).collect();
        objects.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((objects, version))
    }

    async fn create(
        &self,
        kind: Kind,
        name: &str,
        labels: Labels,
        spec: serde_json::Value,
    ) -> Result<Object, ObjectError> {
        let mut object = DynamicObject::new(name, &resource(kind)).data(json!({ "spec": spec }));
        object.metadata.labels = Some(labels);
        let exists = || ObjectError::AlreadyExists { kind: kind.name(), name: name.to_string() };
        let created =
            self.api(kind).create(&PostParams::default(), &object).await.map_err(|e| refusal(kind, name, exists, e))?;
        Ok(object_of(created))
    }

    /// The whole object is replaced: annotations or finalizers another writer added are not kept (only the
    /// agents write these objects).
    async fn update(&self, kind: Kind, object: &Object) -> Result<Object, ObjectError> {
        let mut replacement = DynamicObject::new(&object.name, &resource(kind)).data(json!({ "spec": object.spec }));
        replacement.metadata.labels = Some(object.labels.clone());
        replacement.metadata.resource_version = Some(object.version.clone());
        let stale =
            || ObjectError::Conflict { kind: kind.name(), name: object.name.clone(), version: object.version.clone() };
        let replaced = self
            .api(kind)
            .replace(&object.name, &PostParams::default(), &replacement)
            .await
            .map_err(|e| refusal(kind, &object.name, stale, e))?;
        Ok(object_of(replaced))
    }

    async fn delete(&self, kind: Kind, name: &str, version: &str) -> Result<(), ObjectError> {
        let params = DeleteParams {
            preconditions: Some(Preconditions { resource_version: Some(version.to_string()), uid: None }),
            ..Default::default()
        };
        let stale =
            || ObjectError::Conflict { kind: kind.name(), name: name.to_string(), version: version.to_string() };
        self.api(kind).delete(name, &params).await.map_err(|e| refusal(kind, name, stale, e))?;
        Ok(())
    }

    async fn watch(&self, kind: Kind, selector: &Labels, from: &str) -> Result<ObjectWatch, ObjectError> {
        let params = WatchParams::default().labels(&selector_text(selector));
        let stream = self.api(kind).watch(&params, from).await.map_err(|e| match e {
            kube::Error::Api(status) if status.code == 410 => ObjectError::Expired(from.to_string()),
            other => ObjectError::Api(other.to_string()),
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let from = from.to_string();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => Ok(ObjectEvent::Applied(object_of(o))),
                    Ok(WatchEvent::Deleted(o)) => Ok(ObjectEvent::Deleted {
                        name: o.name_any(),
                        version: o.resource_version().unwrap_or_default(),
                    }),
                    Ok(WatchEvent::Bookmark(bookmark)) => Ok(ObjectEvent::Progress(bookmark.metadata.resource_version)),
                    Ok(WatchEvent::Error(status)) if status.code == 410 => Err(ObjectError::Expired(from.clone())),
                    Ok(WatchEvent::Error(status)) => Err(ObjectError::Api(status.message.clone())),
                    Err(e) => Err(ObjectError::Api(e.to_string())),
                };
                let failed = event.is_err();
                if tx.send(event).is_err() || failed {
                    return;
                }
            }
        });
        Ok(ObjectWatch::new(rx, task))
    }
}
