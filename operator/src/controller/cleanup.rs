//! The delete path: waits while a claim still uses the volume, then removes the PV (cluster-scoped) and
//! every child in the operator's namespace. Nothing there has an owner reference (they cannot cross
//! namespaces), so this is the only way they go.

use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    api::{DeleteParams, ListParams},
    runtime::controller::Action,
    Api, Resource, ResourceExt,
};

use super::{act::delete_quietly, decide::note, Context};
use crate::{
    crd::MirroredVolume,
    observed::{NAMESPACE_LABEL, NAME_LABEL, UID_LABEL, VOLUME_LABEL},
    plan::{self, names},
    Error, Result,
};

impl MirroredVolume {
    /// Cleanup path: the claim, the PV once no claim uses it, then the engines, Services, PVCs, budget and
    /// Secrets.
    pub async fn cleanup(&self, ctx: Arc<Context>) -> Result<Action> {
        let (ns, name) = self.key()?;
        let client = ctx.client.clone();
        let home = ctx.config.namespace.as_str();
        let none = DeleteParams::default();
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        if let Some(c) = &self.spec.claim {
            delete_quietly(&pvcs, &c.name, &none).await?;
        }
        let pv_api: Api<PersistentVolume> = Api::all(client.clone());
        let pv_name = names::pv(&ns, &name);
        if let Some(pv) = pv_api.get_opt(&pv_name).await? {
            // Invariant: only our own PV is deleted; another volume's PV of this name stays (test
            // `controller::tests::cleanup_leaves_a_foreign_pv`).
            if plan::owned_by(pv.metadata.labels.as_ref(), self).is_ok() {
                self.wait_for_claim(&ctx, &pv, &ns).await?;
                delete_quietly(&pv_api, &pv_name, &none).await?;
            }
        }
        // Invariant: in the shared namespace only objects whose owner labels name this volume are
        // deleted, never merely those named after its key (test
        // `controller::tests::deletion_tears_everything_down_then_drops_the_finalizer`).
        let owned = ListParams::default().labels(&owner_selector(self));
        delete_owned(&Api::<Pod>::namespaced(client.clone(), home), &owned).await?;
        delete_owned(&Api::<Service>::namespaced(client.clone(), home), &owned).await?;
        delete_owned(
            &Api::<PodDisruptionBudget>::namespaced(client.clone(), home),
            &owned,
        )
        .await?;
        delete_owned(
            &Api::<PersistentVolumeClaim>::namespaced(client.clone(), home),
            &owned,
        )
        .await?;
        delete_owned(&Api::<Secret>::namespaced(client.clone(), home), &owned).await?;
        ctx.metrics.forget_volume(&ns, &name);
        let text = format!(
            "removed the engines, services, secrets and PersistentVolume {pv_name} (namespace {home})"
        );
        self.publish(&ctx, vec![note("Deleted", text)]).await;
        Ok(Action::await_change())
    }

    /// Fails (to be retried) while the claim bound to the PV still exists.
    async fn wait_for_claim(&self, ctx: &Context, pv: &PersistentVolume, ns: &str) -> Result<()> {
        let claim = pv
            .spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .and_then(|r| {
                Some((
                    r.namespace.clone().unwrap_or_else(|| ns.to_string()),
                    r.name.clone()?,
                ))
            });
        let Some((claim_ns, claim_name)) = claim else {
            return Ok(());
        };
        let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &claim_ns);
        if api.get_opt(&claim_name).await?.is_none() {
            return Ok(());
        }
        let text = format!(
            "claim {claim_ns}/{claim_name} still exists; the engines stay until it is gone"
        );
        self.publish(ctx, vec![note("WaitingForClaim", text)]).await;
        Err(Error::VolumeInUse(format!("{claim_ns}/{claim_name}")))
    }
}

/// A label selector for the objects whose owner labels name `mv` (key, namespace, name, and uid when set).
fn owner_selector(mv: &MirroredVolume) -> String {
    let mut s = format!(
        "{VOLUME_LABEL}={},{NAMESPACE_LABEL}={},{NAME_LABEL}={}",
        plan::key(mv),
        mv.namespace().unwrap_or_default(),
        mv.name_any()
    );
    if let Some(uid) = &mv.metadata.uid {
        s.push_str(&format!(",{UID_LABEL}={uid}"));
    }
    s
}

/// Deletes every object the selector lists, one by one.
async fn delete_owned<K>(api: &Api<K>, owned: &ListParams) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    for item in api.list(owned).await?.items {
        delete_quietly(api, &item.name_any(), &DeleteParams::default()).await?;
    }
    Ok(())
}
