//! The Kubernetes API the controller needs, behind a small trait: MirroredVolumes (namespaced, in
//! the claim's namespace) and the volume token (a Secret in the operator's namespace).

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    Api, Client,
};
use tandem_api::contract::SECRET_TOKEN_KEY;

use super::{CsiError, CsiResult};
use crate::crd::MirroredVolume;

/// What a create answered.
pub enum Created {
    Created(Box<MirroredVolume>),
    /// Someone created the name first (a concurrent retry): read it again.
    Conflict,
}

/// The controller's view of the Kubernetes API.
pub trait VolumeApi: Send + Sync + 'static {
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, CsiResult<Option<MirroredVolume>>>;
    fn create<'a>(&'a self, mv: &'a MirroredVolume) -> BoxFuture<'a, CsiResult<Created>>;
    /// Deletes the volume; an absent one is not an error.
    fn delete<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, CsiResult<()>>;
    /// Sets `spec.size` (the CRD's rule refuses a shrink).
    fn set_size<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        size: &'a str,
    ) -> BoxFuture<'a, CsiResult<MirroredVolume>>;
    /// Every MirroredVolume (ListSnapshots without a volume).
    fn list(&self) -> BoxFuture<'_, CsiResult<Vec<MirroredVolume>>>;
    /// The token in Secret `secret` of the operator's namespace, when it exists.
    fn token<'a>(&'a self, secret: &'a str) -> BoxFuture<'a, CsiResult<Option<String>>>;
}

/// [`VolumeApi`] over a kube client.
pub struct KubeVolumes {
    pub client: Client,
    /// The operator's namespace (volume tokens).
    pub operator_namespace: String,
}

fn kube_error(what: &str, e: kube::Error) -> CsiError {
    match &e {
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => {
            CsiError::Invalid(format!("{what}: {}", s.message))
        }
        kube::Error::Api(s) if s.code == 403 => {
            CsiError::Precondition(format!("{what}: {}", s.message))
        }
        _ => CsiError::Unavailable(format!("{what}: {e}")),
    }
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

impl VolumeApi for KubeVolumes {
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, CsiResult<Option<MirroredVolume>>> {
        Box::pin(async move {
            let api: Api<MirroredVolume> = Api::namespaced(self.client.clone(), namespace);
            api.get_opt(name)
                .await
                .map_err(|e| kube_error(&format!("reading MirroredVolume {namespace}/{name}"), e))
        })
    }

    fn create<'a>(&'a self, mv: &'a MirroredVolume) -> BoxFuture<'a, CsiResult<Created>> {
        Box::pin(async move {
            let ns = mv.metadata.namespace.as_deref().unwrap_or_default();
            let api: Api<MirroredVolume> = Api::namespaced(self.client.clone(), ns);
            match api.create(&PostParams::default(), mv).await {
                Ok(created) => Ok(Created::Created(Box::new(created))),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Created::Conflict),
                Err(e) => Err(kube_error("creating the MirroredVolume", e)),
            }
        })
    }

    fn delete<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, CsiResult<()>> {
        Box::pin(async move {
            let api: Api<MirroredVolume> = Api::namespaced(self.client.clone(), namespace);
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => Ok(()),
                Err(e) if not_found(&e) => Ok(()),
                Err(e) => Err(kube_error(
                    &format!("deleting MirroredVolume {namespace}/{name}"),
                    e,
                )),
            }
        })
    }

    fn set_size<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        size: &'a str,
    ) -> BoxFuture<'a, CsiResult<MirroredVolume>> {
        Box::pin(async move {
            let api: Api<MirroredVolume> = Api::namespaced(self.client.clone(), namespace);
            let patch = serde_json::json!({"spec": {"size": size}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| {
                    kube_error(
                        &format!("setting spec.size of MirroredVolume {namespace}/{name}"),
                        e,
                    )
                })
        })
    }

    fn list(&self) -> BoxFuture<'_, CsiResult<Vec<MirroredVolume>>> {
        Box::pin(async move {
            let api: Api<MirroredVolume> = Api::all(self.client.clone());
            api.list(&ListParams::default())
                .await
                .map(|l| l.items)
                .map_err(|e| kube_error("listing MirroredVolumes", e))
        })
    }

    fn token<'a>(&'a self, secret: &'a str) -> BoxFuture<'a, CsiResult<Option<String>>> {
        Box::pin(async move {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.operator_namespace);
            let found = api.get_opt(secret).await.map_err(|e| {
                kube_error(
                    &format!("reading Secret {}/{secret}", self.operator_namespace),
                    e,
                )
            })?;
            Ok(found.and_then(|s| {
                let bytes = s.data?.remove(SECRET_TOKEN_KEY)?;
                String::from_utf8(bytes.0)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            }))
        })
    }
}
