//! The delete path: waits while a claim still uses the volume, then removes the PV (cluster-scoped, so not
//! garbage-collected) and every namespaced child.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service};
use kube::{api::DeleteParams, runtime::controller::Action, Api};

use super::{act::delete_quietly, decide::note, Context};
use crate::{
    crd::{MirroredVolume, Slot},
    plan::names,
    Error, Result,
};

impl MirroredVolume {
    /// Cleanup path: the claim, the PV once no claim uses it, then the engines, Services, PVCs and token.
    pub async fn cleanup(&self, ctx: Arc<Context>) -> Result<Action> {
        let (ns, name) = self.key()?;
        let client = ctx.client.clone();
        let none = DeleteParams::default();
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        if let Some(c) = &self.spec.claim {
            delete_quietly(&pvcs, &c.name, &none).await?;
        }
        let pv_api: Api<PersistentVolume> = Api::all(client.clone());
        let pv_name = names::pv(&ns, &name);
        if let Some(pv) = pv_api.get_opt(&pv_name).await? {
            self.wait_for_claim(&ctx, &pv, &ns).await?;
            delete_quietly(&pv_api, &pv_name, &none).await?;
        }
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        for slot in Slot::BOTH {
            delete_quietly(&pods, &names::engine(&name, slot), &none).await?;
            delete_quietly(&services, &names::engine(&name, slot), &none).await?;
            if self.spec.engine_storage.storage_class_name.is_some() {
                delete_quietly(&pvcs, &names::engine_pvc(&name, slot), &none).await?;
            }
        }
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        delete_quietly(&secrets, &names::secret(&name), &none).await?;
        ctx.metrics.forget_volume(&ns, &name);
        let text = format!("removed the engines, services, token and PersistentVolume {pv_name}");
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
