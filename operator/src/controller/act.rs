//! Act: carries a plan out. The takeover call, engine pod deletions, workload releases and server-side
//! applies of the children, in that order; and the events, published after the status is written.

use k8s_openapi::api::{
    core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service},
    policy::v1::PodDisruptionBudget,
    storage::v1::VolumeAttachment,
};
use kube::{
    api::{DeleteParams, Patch, PatchParams},
    runtime::events::{Event as KubeEvent, EventType},
    Api, Resource, ResourceExt,
};
use serde::Serialize;
use tracing::{info, warn};

use super::{
    decide::{Note, Pending, Plan, TakeoverAttempt},
    Context, FIELD_MANAGER,
};
use crate::{
    crd::{CertificateStatus, LeaseGrant, MirroredVolume},
    engine::EngineTarget,
    failover::{PodDeletion, ReleasePlan},
    metrics::VolumeLabels,
    plan::{self, names, Desired},
    Error, Result,
};

pub(super) fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

/// Deletes, treating "already gone" as success.
pub(super) async fn delete_quietly<K>(api: &Api<K>, name: &str, dp: &DeleteParams) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, dp).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}

async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> Result<()>
where
    K: Resource + Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &apply_params(), &Patch::Apply(obj)).await?;
    Ok(())
}

/// Sets (`Some(value)`) or removes (`None`) a volume's node label on `node`, by a JSON merge patch of
/// that one key: the other volumes' labels stay (a server-side apply under our one field manager
/// would drop them). A node that is gone needs nothing.
pub(super) async fn set_node_label(
    ctx: &Context,
    node: &str,
    label: &str,
    value: Option<&str>,
) -> Result<()> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({"metadata": {"labels": {label: value}}});
    match api
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}

fn forced() -> DeleteParams {
    DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    }
}

impl MirroredVolume {
    /// Calls Takeover on the secondary and counts the attempt; when it answered ready, asks it right away
    /// what it does now.
    pub(super) async fn take_over(&self, ctx: &Context, pending: &Pending) -> TakeoverAttempt {
        let (ns, name) = (self.namespace().unwrap_or_default(), self.name_any());
        let intent = &pending.intent;
        let target = EngineTarget {
            address: plan::engine_address(self, intent.to, &ctx.config),
            volume: name.clone(),
            token: pending.token().map(str::to_string),
        };
        let result = ctx
            .engines
            .takeover(&target, intent.policy(), intent.timeout)
            .await;
        ctx.metrics
            .failover(&ns, &name, intent.reason, result.is_ok());
        let answer = match &result {
            Ok(outcome) => {
                info!(volume = %name, epoch = outcome.epoch, ready_ms = outcome.ready_ms, "takeover completed");
                ctx.engines.status(&target).await.ok()
            }
            Err(e) => {
                warn!(volume = %name, error = %e, "takeover failed; will retry");
                None
            }
        };
        TakeoverAttempt { result, answer }
    }

    /// Grants the lease, deletes and releases what the plan says, then applies its children (none when the
    /// spec is invalid).
    pub(super) async fn act(&self, ctx: &Context, plan: &mut Plan) -> Result<()> {
        self.grant(ctx, plan).await;
        self.delete_engine_pods(ctx, &plan.deletions).await?;
        self.release_workloads(ctx, &plan.release).await?;
        if plan.children.is_ok() {
            // Invariant: a node gets the volume's label before anything else of the pass, so before
            // `status.nodes` names it (a CreateVolume that waits for status.nodes answers a topology
            // whose label exists) and, at a cutover, before the old engine is released (tests
            // controller::tests::create_path_applies_secret_services_pods_and_pv,
            // decide_tests::the_cutover_moves_the_node_label_before_the_old_engine_goes).
            let (label, value) = plan::node_label(self);
            for node in &plan.label {
                set_node_label(ctx, node, &label, Some(&value)).await?;
            }
            self.apply_certificates(ctx, plan).await?;
            if let Ok(children) = &plan.children {
                self.apply_children(ctx, children).await?;
            }
            self.act_move(ctx, plan).await?;
            self.grow(ctx, plan).await;
            self.finish_restore(ctx, plan).await;
        }
        self.act_disruption(ctx, &plan.disruption).await
    }

    /// Grants the primary a write lease as the witness and remembers when. The time is read after the
    /// call returns, failed or not (a grant may arrive even when its answer does not): it is never earlier
    /// than the engine's stamp, so the wait `decide` derives from it covers the lease.
    async fn grant(&self, ctx: &Context, plan: &mut Plan) {
        let Some(g) = plan.grant.clone() else {
            return;
        };
        let Ok((ns, name)) = self.key() else {
            return;
        };
        let target = EngineTarget {
            address: plan::engine_address(self, g.slot, &ctx.config),
            volume: name.clone(),
            token: plan.observed.token.clone(),
        };
        let result = ctx.engines.grant(&target, g.lease_ms, g.allow_async).await;
        ctx.witness.sent(
            &format!("{ns}/{name}"),
            std::time::Instant::now(),
            g.lease_ms,
        );
        let error = match &result {
            Ok(granted) => {
                info!(volume = %name, lease_ms = granted.lease_remaining_ms, allow_async = g.allow_async, "lease granted");
                None
            }
            Err(e) => {
                warn!(volume = %name, error = %e, "lease grant failed");
                Some(e.to_string())
            }
        };
        plan.status.lease = Some(LeaseGrant {
            node: plan.observed.node(g.slot).name.clone(),
            at: plan.observed.now.to_string(),
            lease_ms: g.lease_ms,
            allow_async: g.allow_async,
            error,
        });
    }

    async fn delete_engine_pods(&self, ctx: &Context, deletions: &[PodDeletion]) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
        for d in deletions {
            let dp = if d.force {
                forced()
            } else {
                DeleteParams::default()
            };
            delete_quietly(&pods, &d.name, &dp).await?;
        }
        Ok(())
    }

    async fn release_workloads(&self, ctx: &Context, release: &ReleasePlan) -> Result<()> {
        let (ns, name) = self.key()?;
        for w in &release.pods {
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &w.namespace);
            delete_quietly(&api, &w.name, &forced()).await?;
            ctx.metrics
                .released_pods
                .get_or_create(&VolumeLabels {
                    namespace: ns.clone(),
                    volume: name.clone(),
                })
                .inc();
        }
        let va: Api<VolumeAttachment> = Api::all(ctx.client.clone());
        for a in &release.attachments {
            delete_quietly(&va, a, &DeleteParams::default()).await?;
        }
        Ok(())
    }

    /// Mints and applies the certificate Secrets the plan asks for (before the children, so a new pod
    /// finds its TLS Secret), and records when the volume's certificates expire.
    async fn apply_certificates(&self, ctx: &Context, plan: &mut Plan) -> Result<()> {
        let Ok(children) = &plan.children else {
            return Ok(());
        };
        let mut certs = plan.observed.certs.clone();
        if children.certs.any() {
            let nodes = plan.observed.nodes.clone().map(|n| n.name);
            let token = plan.observed.token.clone().unwrap_or_default();
            let (secrets, minted) = crate::certs::mint(
                self,
                &children.certs,
                &ctx.ca,
                &ctx.config,
                &token,
                &nodes,
                certs,
            )?;
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
            for secret in &secrets {
                apply(&api, &secret.name_any(), secret).await?;
            }
            certs = minted;
            let names: Vec<String> = secrets.iter().map(|s| s.name_any()).collect();
            plan.notes.push(super::decide::note(
                "CertificatesIssued",
                format!("issued certificates in secret(s) {}", names.join(", ")),
            ));
        }
        plan.status.certificates = certs.earliest().map(|t| CertificateStatus {
            not_after: t.to_string(),
        });
        Ok(())
    }

    async fn apply_children(&self, ctx: &Context, children: &Desired) -> Result<()> {
        let (ns, name) = self.key()?;
        let client = &ctx.client;
        // Everything but the claim goes into the operator's namespace.
        let home = &ctx.config.namespace;
        if let Some(secret) = &children.secret {
            let api: Api<Secret> = Api::namespaced(client.clone(), home);
            apply(&api, &secret.name_any(), secret).await?;
        }
        let engine_pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), home);
        for pvc in &children.engine_pvcs {
            apply(&engine_pvcs, &pvc.name_any(), pvc).await?;
        }
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        let services: Api<Service> = Api::namespaced(client.clone(), home);
        for svc in &children.services {
            apply(&services, &svc.name_any(), svc).await?;
        }
        if let Some(pdb) = &children.budget {
            let api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), home);
            apply(&api, &pdb.name_any(), pdb).await?;
        }
        let pods: Api<Pod> = Api::namespaced(client.clone(), home);
        for pod in &children.pods {
            apply(&pods, &pod.name_any(), pod).await?;
        }
        let pv_api: Api<PersistentVolume> = Api::all(client.clone());
        if let Some(pv) = &children.pv {
            apply(&pv_api, &pv.name_any(), pv).await?;
        }
        if let Some(size) = &children.pv_capacity {
            // The CSI source is immutable: growth patches the capacity alone.
            let patch = serde_json::json!({"spec": {"capacity": {"storage": size}}});
            pv_api
                .patch(
                    &names::pv(&ns, &name),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
        }
        if let Some(claim) = &children.claim {
            apply(&pvcs, &claim.name_any(), claim).await?;
        }
        Ok(())
    }

    /// Carries out a live move's step (`crate::moving`): wipe pods, StartMove or AbortMove on the
    /// primary (the answer goes into `status.move`), deletions of the old or new instance.
    async fn act_move(&self, ctx: &Context, plan: &mut Plan) -> Result<()> {
        let step = std::mem::take(&mut plan.moving);
        let home = &ctx.config.namespace;
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), home);
        let services: Api<Service> = Api::namespaced(ctx.client.clone(), home);
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), home);
        if let Some(w) = &step.wipe {
            let slot = plan
                .status
                .moving
                .as_ref()
                .map(|m| m.slot)
                .unwrap_or_default();
            let dir = plan.status.data_dir.clone();
            let pod = crate::wipe::named(
                self,
                w.name.clone(),
                slot,
                &w.node,
                dir.as_deref(),
                &ctx.config,
            );
            apply(&pods, &w.name, &pod).await?;
        }
        for name in &step.wiped {
            delete_quietly(&pods, name, &DeleteParams::default()).await?;
        }
        let primary = crate::failover::primary_slot(&plan.status);
        let target = EngineTarget {
            address: plan::engine_address(self, primary, &ctx.config),
            volume: self.name_any(),
            token: plan.observed.token.clone(),
        };
        let now = plan.observed.now.to_string();
        if let Some(to) = &step.start {
            let answer = ctx.engines.start_move(&target, to).await;
            if let Some(rec) = plan.status.moving.as_mut() {
                match answer {
                    Ok(p) => {
                        info!(volume = %self.name_any(), to = %to, "live move started");
                        rec.phase = crate::crd::MovePhase::Copying;
                        rec.copied_bytes = p.copied_bytes;
                        rec.total_bytes = p.total_bytes;
                        rec.message = format!("the primary copies the volume to {to}");
                    }
                    Err(e) => {
                        warn!(volume = %self.name_any(), error = %e, "StartMove failed; will retry");
                        rec.message = format!("StartMove failed: {e}; retrying");
                    }
                }
            }
        }
        if let Some(abort) = &step.abort {
            match ctx.engines.abort_move(&target).await {
                // Invariant: the new engine goes only once the primary no longer moves to it; after
                // a cutover it is the secondary and stays (moving_tests::
                // a_lost_new_engine_is_aborted_and_removed_only_once_the_primary_rolled_back).
                Ok(p) if p.state != crate::engine::MoveState::Done => {
                    if let Some(ev) = crate::moving::aborted(&mut plan.status, &abort.why, &now) {
                        plan.notes.push(super::decide::Note::from(ev));
                    }
                    delete_quietly(&pods, &abort.delete, &DeleteParams::default()).await?;
                    delete_quietly(&services, &abort.delete, &DeleteParams::default()).await?;
                    // Its claim is removed once the pod is (pvc-protection holds it until then).
                    if let Some(pvc) = &abort.pvc {
                        delete_quietly(&claims, pvc, &DeleteParams::default()).await?;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(volume = %self.name_any(), error = %e, "AbortMove failed; will retry");
                    if let Some(rec) = plan.status.moving.as_mut() {
                        rec.message = format!("{}; AbortMove failed: {e}; retrying", abort.why);
                    }
                }
            }
        }
        let dp = if step.force {
            forced()
        } else {
            DeleteParams::default()
        };
        for name in &step.delete {
            delete_quietly(&pods, name, &dp).await?;
            delete_quietly(&services, name, &DeleteParams::default()).await?;
        }
        // After the pods: a claim whose engine may still run is never deleted first.
        for name in &step.delete_pvcs {
            delete_quietly(&claims, name, &DeleteParams::default()).await?;
        }
        if let Some(node) = &step.unlabel {
            set_node_label(ctx, node, &plan::node_label(self).0, None).await?;
        }
        Ok(())
    }

    /// Publishes events; a failure to publish is logged, never fails the reconcile.
    pub(super) async fn publish(&self, ctx: &Context, notes: Vec<Note>) {
        let reference = self.object_ref(&());
        for n in notes {
            let ev = KubeEvent {
                type_: if n.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: n.reason.into(),
                note: Some(n.text),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(error) = ctx.recorder.publish(&ev, &reference).await {
                warn!(%error, reason = n.reason, "cannot publish event");
            }
        }
    }
}
