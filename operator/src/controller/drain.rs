//! Act for the disruption rules (`crate::disruption`): engine pod disruption labels, then the workload pods
//! to restart after a takeover from a live node.

use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{DeleteParams, Patch, PatchParams},
    Api,
};

use super::{act::delete_quietly, Context};
use crate::{crd::MirroredVolume, disruption::Actions, observed::DISRUPTION_LABEL, Result};

impl MirroredVolume {
    pub(super) async fn act_disruption(&self, ctx: &Context, actions: &Actions) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
        for l in &actions.labels {
            // A merge patch of the one label: pods are otherwise only created, never re-applied.
            let patch = serde_json::json!({
                "metadata": {"labels": {DISRUPTION_LABEL: if l.allowed { "true" } else { "false" }}}
            });
            match pods
                .patch(&l.pod, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                // Gone since it was observed: the next pass sees its replacement.
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        for w in &actions.workloads {
            // Graceful: the node is up, so the kubelet unmounts and unstages before the pod goes.
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &w.namespace);
            delete_quietly(&api, &w.name, &DeleteParams::default()).await?;
        }
        Ok(())
    }
}
