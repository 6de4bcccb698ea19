//! The delete path: waits while a claim still uses the volume, removes the PV (cluster-scoped), stops
//! the engines, wipes their files on both nodes (one `tandem-engine wipe` pod per node), then removes
//! every child in the operator's namespace. Nothing there has an owner reference (they cannot cross
//! namespaces), so this is the only way they go.
//!
//! Every wait is an error to kube's finalizer (it keeps the finalizer and the error policy retries
//! soon): returning `Ok` would remove the finalizer.

use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    api::{DeleteParams, ListParams, Patch},
    runtime::controller::Action,
    Api, Resource, ResourceExt,
};

use super::{
    act::{apply_params, delete_quietly, set_node_label},
    decide::{note, warning},
    Context,
};
use crate::{
    crd::{MirroredVolume, Slot},
    observed::{NodeObs, NAMESPACE_LABEL, NAME_LABEL, SLOT_LABEL, UID_LABEL, VOLUME_LABEL},
    plan::{self, names},
    wipe, Error, Result,
};

/// How long a wipe pod waits for an unreachable (NotReady) node before its node is skipped.
const WIPE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

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
        let pods: Api<Pod> = Api::namespaced(client.clone(), home);
        let engines =
            ListParams::default().labels(&format!("{},{SLOT_LABEL}", owner_selector(self)));
        let running = pods.list(&engines).await?.items;
        if !running.is_empty() {
            for pod in &running {
                delete_quietly(&pods, &pod.name_any(), &none).await?;
            }
            let names: Vec<String> = running.iter().map(|p| p.name_any()).collect();
            return Err(Error::CleanupPending(format!(
                "engine pod(s) {} stopping before their files are wiped",
                names.join(", ")
            )));
        }
        let skipped = self.wipe(&ctx).await?;
        self.drop_clone_snapshot(&ctx).await;
        // Every node that carries the volume's label loses it (the engine nodes, and any a crash
        // left labelled during a move); its value is checked, so a hash collision's is left alone.
        let (label, value) = plan::node_label(self);
        let nodes: Api<Node> = Api::all(client.clone());
        for node in nodes
            .list(&ListParams::default().labels(&format!("{label}={value}")))
            .await?
            .items
        {
            set_node_label(&ctx, &node.name_any(), &label, None).await?;
        }
        delete_owned(&pods, &owned).await?;
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
        let wiped = if skipped.is_empty() {
            "wiped the engines' files on their nodes".to_string()
        } else {
            format!("wiped the engines' files except on {}", skipped.join(", "))
        };
        let text = format!(
            "removed the engines, services, secrets and PersistentVolume {pv_name} (namespace {home}); {wiped}"
        );
        self.publish(&ctx, vec![note("Deleted", text)]).await;
        Ok(Action::await_change())
    }

    /// Runs a wipe pod on each engine node and waits for it to succeed. A node that is gone (deleted,
    /// or declared out of service) is skipped and reported, and so is one that stayed unreachable
    /// for `WIPE_PATIENCE` after its wipe pod was created: the deletion does not wait forever for a
    /// node that may never return. What such a node keeps sits under the deleted volume's uid
    /// directory, which no later volume opens (`plan::host_data_dir`). Returns the skipped nodes.
    async fn wipe(&self, ctx: &Context) -> Result<Vec<String>> {
        let status = self.status.clone().unwrap_or_default();
        let [a, b] = status.nodes.as_slice() else {
            // Never placed: no engine ever ran.
            return Ok(Vec::new());
        };
        let data_dir = plan::host_data_dir(self, Some(&status), &ctx.config)
            .map_err(|e| Error::CleanupPending(format!("cannot wipe: {}", e.message)))?;
        let key = plan::key(self);
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        let now = k8s_openapi::jiff::Timestamp::now();
        let mut skipped = Vec::new();
        let mut waiting = Vec::new();
        let mut notes = Vec::new();
        for (slot, node) in Slot::BOTH.into_iter().zip([a, b]) {
            let name = wipe::pod_name(&key, slot);
            let existing = pods.get_opt(&name).await?;
            let phase = existing
                .as_ref()
                .and_then(|p| p.status.as_ref())
                .and_then(|s| s.phase.clone());
            if phase.as_deref() == Some("Succeeded") {
                continue;
            }
            let obs = match nodes.get_opt(node).await? {
                Some(n) => NodeObs::from_node(&n),
                None => NodeObs::missing(node),
            };
            let created = existing
                .as_ref()
                .and_then(|p| p.metadata.creation_timestamp.as_ref())
                .map(|t| t.0);
            let impatient = created
                .is_some_and(|c| now.duration_since(c).as_secs() >= WIPE_PATIENCE.as_secs() as i64);
            if !obs.exists || obs.out_of_service || (obs.is_lost() && impatient) {
                let why = if !obs.exists {
                    "the node is gone"
                } else if obs.out_of_service {
                    "the node is out of service"
                } else {
                    "the node stayed unreachable"
                };
                notes.push(warning(
                    "WipeSkipped",
                    format!(
                        "not wiping node {node}: {why}; {} stays there until removed by hand",
                        data_dir.as_deref().unwrap_or("its socket dir")
                    ),
                ));
                skipped.push(node.clone());
                continue;
            }
            if existing.is_none() {
                let pod = wipe::pod(self, slot, node, data_dir.as_deref(), &ctx.config);
                pods.patch(&name, &apply_params(), &Patch::Apply(&pod))
                    .await?;
                notes.push(note(
                    "Wiping",
                    format!("wiping the engine's files on node {node} (pod {name})"),
                ));
            }
            waiting.push(format!(
                "{node} ({})",
                phase.as_deref().unwrap_or("Pending")
            ));
        }
        self.publish(ctx, notes).await;
        if !waiting.is_empty() {
            return Err(Error::CleanupPending(format!(
                "waiting for the wipe on {}",
                waiting.join(", ")
            )));
        }
        Ok(skipped)
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
