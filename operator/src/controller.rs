//! The reconciler: a thin instrumented shell around `finalizer`, with `MirroredVolume::reconcile` (observe,
//! decide with the pure `failover`/`plan` code, act, write status) and `MirroredVolume::cleanup`.
//!
//! Every side effect goes through [`Context`]: the Kubernetes client, the event recorder, the metrics and
//! the engine API. Children are written with server-side apply under the `tandem-operator` field manager.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service},
        storage::v1::VolumeAttachment,
    },
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{
        controller::{Action, Controller},
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        finalizer::{finalizer, Event as Finalizer},
        reflector::ObjectRef,
        watcher,
    },
    Api, Client, Resource, ResourceExt,
};
use serde::Serialize;
use tracing::{field, info, instrument, warn, Span};

use crate::{
    crd::{
        parse_duration, EngineRole, MirroredVolume, MirroredVolumeStatus, Phase, Slot,
        VOLUME_FINALIZER,
    },
    engine::{EngineApi, EngineTarget},
    failover::{self, TakeoverIntent},
    metrics::Metrics,
    observed::{NodeObs, Observed, PodObs, PvObs, WorkloadPod, VOLUME_LABEL},
    plan::{self, names, EngineConfig},
    Error, Result,
};

/// Field manager for every server-side apply.
pub const FIELD_MANAGER: &str = "tandem-operator";

/// Everything the reconciler may touch.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub engines: Arc<dyn EngineApi>,
    pub config: EngineConfig,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Metrics,
        engines: Arc<dyn EngineApi>,
        config: EngineConfig,
        instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance,
            },
        );
        Context {
            client,
            recorder,
            metrics,
            engines,
            config,
        }
    }
}

/// Entry point for the controller: instruments, then lets `finalizer` pick apply or cleanup.
#[instrument(skip(mv, ctx), fields(namespace, volume, trace_id))]
pub async fn reconcile(mv: Arc<MirroredVolume>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.count_and_measure();
    let namespace = mv.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    Span::current().record("namespace", field::display(&namespace));
    Span::current().record("volume", field::display(mv.name_any()));
    let api: Api<MirroredVolume> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, VOLUME_FINALIZER, mv, |event| async {
        match event {
            Finalizer::Apply(mv) => mv.reconcile(ctx.clone()).await,
            Finalizer::Cleanup(mv) => mv.cleanup(ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Counts the failure under its label and retries soon.
pub fn error_policy(mv: Arc<MirroredVolume>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(volume = %mv.name_any(), %error, "reconcile failed");
    ctx.metrics.set_failure(
        &mv.namespace().unwrap_or_default(),
        &mv.name_any(),
        &error.metric_label(),
    );
    Action::requeue(Duration::from_secs(5))
}

/// A Kubernetes event to publish after acting.
struct Note {
    warning: bool,
    reason: &'static str,
    text: String,
}

fn note(reason: &'static str, text: impl Into<String>) -> Note {
    Note {
        warning: false,
        reason,
        text: text.into(),
    }
}

fn warning(reason: &'static str, text: impl Into<String>) -> Note {
    Note {
        warning: true,
        reason,
        text: text.into(),
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

/// Deletes, treating "already gone" as success.
async fn delete_quietly<K>(api: &Api<K>, name: &str, dp: &DeleteParams) -> Result<()>
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

/// A fresh volume token: 32 random bytes, hex.
fn new_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Token(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Second-precision RFC 3339.
fn stamp(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

impl MirroredVolume {
    fn key(&self) -> Result<(String, String)> {
        let ns = self
            .namespace()
            .ok_or(Error::MissingObjectKey("namespace"))?;
        let name = self
            .metadata
            .name
            .clone()
            .ok_or(Error::MissingObjectKey("name"))?;
        Ok((ns, name))
    }

    fn peer_timeout(&self) -> Duration {
        parse_duration(&self.spec.failover.peer_timeout).unwrap_or(Duration::from_secs(30))
    }

    /// Apply path: observe, decide, act, report. Idempotent; never branches on why it was called.
    pub async fn reconcile(&self, ctx: Arc<Context>) -> Result<Action> {
        let (ns, name) = self.key()?;
        let client = ctx.client.clone();
        let old_status = self.status.clone().unwrap_or_default();
        let mut status = old_status.clone();
        let mut notes: Vec<Note> = Vec::new();
        let peer_timeout = self.peer_timeout();

        // Placement: the nodes are fixed once recorded in status.
        let node_api: Api<Node> = Api::all(client.clone());
        let mut candidates = Vec::new();
        if status.nodes.len() != 2 && self.spec.placement.nodes.is_none() {
            if let Some(selector) = &self.spec.placement.node_selector {
                let lp = ListParams::default().labels(&plan::selector_string(selector));
                candidates = node_api
                    .list(&lp)
                    .await?
                    .items
                    .iter()
                    .map(NodeObs::from_node)
                    .collect();
            }
        }
        let nodes = match plan::choose_nodes(self, &status, &candidates)
            .and_then(|n| plan::volume_bytes(self).map(|_| n))
        {
            Ok(nodes) => nodes,
            Err(invalid) => return self.report_invalid(&ctx, status, &invalid.0).await,
        };
        if status.nodes.len() != 2 {
            notes.push(note(
                "Placed",
                format!(
                    "engines pinned to nodes {} (slot a) and {} (slot b)",
                    nodes[0], nodes[1]
                ),
            ));
        }
        status.nodes = nodes.to_vec();

        // Observe.
        let observed = self.observe(&ctx, &nodes).await?;
        let token = match &observed.1 {
            Some(t) => Some(t.clone()),
            None => Some(new_token()?),
        };
        let mut observed = observed.0;

        // Decide: lost nodes, the engines' own view, takeover.
        for node in failover::track_lost_nodes(&mut status, &observed) {
            notes.push(warning(
                "NodeLost",
                format!("node {node} is lost (NotReady, gone or out of service)"),
            ));
        }
        if let Some(slot) = failover::adopt_engine_view(&mut status, &observed) {
            notes.push(note(
                "PrimaryMoved",
                format!(
                    "engine on {} reports primary at epoch {}",
                    observed.node(slot).name,
                    status.epoch
                ),
            ));
        }
        if old_status.primary.is_none() && status.primary.is_some() {
            notes.push(note(
                "PairEstablished",
                format!("primary engine serves at epoch {}", status.epoch),
            ));
        }
        let decision = failover::decide(&status, &observed, peer_timeout);
        if decision.takeover.is_none() {
            if let Some(why) = failover::abandon_takeover(&mut status, &observed, peer_timeout) {
                notes.push(note("TakeoverAbandoned", why));
            }
        }
        let mut requeue = decision.recheck;
        if let Some(stuck) = &decision.stuck {
            if !matches!(old_status.phase, Phase::Failed | Phase::Degraded) {
                notes.push(warning("TakeoverImpossible", stuck.clone()));
            }
        }
        if let Some(intent) = &decision.takeover {
            let ok = self
                .take_over(
                    &ctx,
                    &mut status,
                    &observed,
                    intent,
                    token.as_deref(),
                    &mut notes,
                )
                .await;
            if ok {
                // The engine answered ready: it serves as primary now, whatever it said before the call.
                // Ask it again so this pass reports what it does now (draining, merging or reversing);
                // if it does not answer, record what the takeover reply told.
                let target = EngineTarget {
                    address: plan::engine_address(self, intent.to, &ctx.config),
                    volume: name.clone(),
                    token: token.clone(),
                };
                let epoch = status.epoch;
                observed.engines[intent.to.index()] = match ctx.engines.status(&target).await {
                    Ok(now) if now.role == Some(EngineRole::Primary) && now.epoch >= epoch => {
                        Some(now)
                    }
                    _ => {
                        let mut engine = observed.engines[intent.to.index()]
                            .take()
                            .unwrap_or_default();
                        engine.role = Some(EngineRole::Primary);
                        engine.epoch = epoch;
                        engine.peer_pending_blocks =
                            status.takeover.as_ref().map_or(0, |t| t.pending_blocks);
                        Some(engine)
                    }
                };
            } else {
                requeue = Some(Duration::from_secs(5));
            }
        }

        // Engine pods to replace, workloads to release.
        let deletions = failover::pod_deletions(&status, &observed, peer_timeout);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        for d in &deletions {
            let dp = if d.force {
                DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                }
            } else {
                DeleteParams::default()
            };
            delete_quietly(&pods, &d.name, &dp).await?;
            notes.push(note(
                d.reason,
                format!(
                    "deleted engine pod {}{}; it comes back as secondary",
                    d.name,
                    if d.force { " (forced: node lost)" } else { "" }
                ),
            ));
        }
        let release = failover::release(&self.spec, &status, &observed);
        for w in &release.pods {
            let api: Api<Pod> = Api::namespaced(client.clone(), &w.namespace);
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            };
            delete_quietly(&api, &w.name, &dp).await?;
            ctx.metrics
                .released_pods
                .get_or_create(&crate::metrics::VolumeLabels {
                    namespace: ns.clone(),
                    volume: name.clone(),
                })
                .inc();
            notes.push(warning(
                "WorkloadReleased",
                format!(
                    "force-deleted pod {}/{} stuck on lost node {}",
                    w.namespace, w.name, w.node
                ),
            ));
        }
        if !release.attachments.is_empty() {
            let va: Api<VolumeAttachment> = Api::all(client.clone());
            for a in &release.attachments {
                delete_quietly(&va, a, &DeleteParams::default()).await?;
            }
        }
        for l in status.lost_nodes.iter_mut() {
            if release.released_nodes.contains(&l.node) {
                l.released = true;
            }
        }
        for (node, why) in &release.blocked {
            notes.push(warning(
                "ReleaseBlocked",
                format!("workload pods on lost node {node} stay: {why}"),
            ));
        }

        // Desired children.
        let skip: Vec<Slot> = deletions.iter().map(|d| d.slot).collect();
        let desired = match plan::desired(
            self,
            &status,
            &observed,
            &ctx.config,
            token.as_deref(),
            &skip,
        ) {
            Ok(d) => d,
            Err(invalid) => return self.report_invalid(&ctx, status, &invalid.0).await,
        };
        if let Some(secret) = &desired.secret {
            let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
            apply(&api, &names::secret(&name), secret).await?;
            notes.push(note(
                "TokenCreated",
                format!("created token secret {}", names::secret(&name)),
            ));
        }
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        for pvc in &desired.engine_pvcs {
            apply(&pvcs, &pvc.name_any(), pvc).await?;
        }
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        for svc in &desired.services {
            apply(&services, &svc.name_any(), svc).await?;
        }
        for pod in &desired.pods {
            apply(&pods, &pod.name_any(), pod).await?;
            let role = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(crate::observed::ROLE_ANNOTATION))
                .cloned()
                .unwrap_or_default();
            notes.push(note(
                "EngineCreated",
                format!("created engine pod {} as {role}", pod.name_any()),
            ));
        }
        let pv_api: Api<PersistentVolume> = Api::all(client.clone());
        if let Some(pv) = &desired.pv {
            apply(&pv_api, &pv.name_any(), pv).await?;
            notes.push(note(
                "PersistentVolumeCreated",
                format!("created PersistentVolume {}", pv.name_any()),
            ));
        }
        if let Some(size) = &desired.pv_capacity {
            let patch = serde_json::json!({"spec": {"capacity": {"storage": size}}});
            pv_api
                .patch(
                    &names::pv(&ns, &name),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
            notes.push(note(
                "Resized",
                format!(
                    "PersistentVolume capacity set to {size}; engines pick it up when they restart"
                ),
            ));
        }
        if let Some(claim) = &desired.claim {
            apply(&pvcs, &claim.name_any(), claim).await?;
            notes.push(note(
                "ClaimCreated",
                format!("created claim {} bound to the volume", claim.name_any()),
            ));
        }

        // Report.
        let names_of = |slot: Slot| {
            (
                names::engine(&name, slot),
                plan::engine_address(self, slot, &ctx.config),
            )
        };
        failover::summarize(
            &mut status,
            &observed,
            self.metadata.generation,
            peer_timeout,
            &names_of,
            None,
        );
        let was = old_status
            .secondary
            .as_ref()
            .filter(|e| e.role != EngineRole::Secondary || !e.reachable);
        let now_ok = status
            .secondary
            .as_ref()
            .filter(|e| e.role == EngineRole::Secondary && e.reachable);
        if let (Some(_), Some(back)) = (was, now_ok) {
            notes.push(note(
                "EngineRejoined",
                format!(
                    "engine on {} is back as secondary and resyncs from the primary",
                    back.node
                ),
            ));
        }
        if old_status.phase != status.phase || self.status.is_none() {
            let text = format!(
                "phase {} -> {}",
                old_status.phase.as_str(),
                status.phase.as_str()
            );
            notes.push(note("PhaseChanged", text));
        }
        self.patch_status(&ctx, &status).await?;
        ctx.metrics.observe_volume(&ns, &name, &status);
        self.publish(&ctx, notes).await;

        let default = match status.phase {
            Phase::Synced => Duration::from_secs(30),
            _ => Duration::from_secs(10),
        };
        Ok(Action::requeue(requeue.map_or(default, |r| r.min(default))))
    }

    /// Calls takeover on the secondary and records the outcome. Returns success.
    async fn take_over(
        &self,
        ctx: &Context,
        status: &mut MirroredVolumeStatus,
        observed: &Observed,
        intent: &TakeoverIntent,
        token: Option<&str>,
        notes: &mut Vec<Note>,
    ) -> bool {
        let (ns, name) = (self.namespace().unwrap_or_default(), self.name_any());
        let target = EngineTarget {
            address: plan::engine_address(self, intent.to, &ctx.config),
            volume: name.clone(),
            token: token.map(str::to_string),
        };
        let from = observed.node(intent.to.other()).name.clone();
        let to = observed.node(intent.to).name.clone();
        notes.push(warning(
            "TakeoverStarted",
            format!(
                "{}: asking the secondary on {to} to take over from {from} ({:?})",
                intent.reason, self.spec.failover.policy
            ),
        ));
        let policy = self.spec.failover.policy;
        match ctx
            .engines
            .takeover(&target, policy, self.peer_timeout())
            .await
        {
            Ok(outcome) => {
                failover::record_takeover(status, observed, intent, &outcome);
                ctx.metrics.failover(&ns, &name, intent.reason, true);
                let lost = if outcome.lost_blocks > 0 {
                    format!(
                        "; forced: {} blocks lost (seq {}..{})",
                        outcome.lost_blocks, outcome.lost_seq_from, outcome.lost_seq_to
                    )
                } else {
                    String::new()
                };
                info!(volume = %name, epoch = outcome.epoch, ready_ms = outcome.ready_ms, "takeover completed");
                notes.push(note(
                    "TakeoverCompleted",
                    format!(
                        "engine on {to} is primary at epoch {} after {} ms; {} blocks still owed by the old primary{lost}",
                        outcome.epoch, outcome.ready_ms, outcome.peer_pending_blocks
                    ),
                ));
                true
            }
            Err(e) => {
                failover::record_takeover_failure(
                    status,
                    observed,
                    intent,
                    &e.to_string(),
                    e.reason(),
                );
                ctx.metrics.failover(&ns, &name, intent.reason, false);
                warn!(volume = %name, error = %e, "takeover failed; will retry");
                let text = if e.is_handoff_blocked() {
                    format!(
                        "{e}; the secondary on {to} stays secondary and the takeover is retried while the \
                         old primary on {from} is unreachable (policy {policy:?}; set \
                         spec.failover.policy to ForcePromote to promote and lose its unsent writes)"
                    )
                } else {
                    format!("{e}; retrying (policy {policy:?})")
                };
                let reason = if e.is_handoff_blocked() {
                    tandem_api::Reason::HandoffBlocked.as_str()
                } else {
                    "TakeoverFailed"
                };
                notes.push(warning(reason, text));
                false
            }
        }
    }

    /// Gathers what the decisions need. Returns the observation and the existing token, if any.
    async fn observe(
        &self,
        ctx: &Context,
        nodes: &[String; 2],
    ) -> Result<(Observed, Option<String>)> {
        let (ns, name) = self.key()?;
        let client = ctx.client.clone();
        let now = stamp(Timestamp::now());
        let node_api: Api<Node> = Api::all(client.clone());
        let mut node_obs = Vec::with_capacity(2);
        for n in nodes {
            node_obs.push(match node_api.get_opt(n).await? {
                Some(node) => NodeObs::from_node(&node),
                None => NodeObs::missing(n),
            });
        }
        let node_obs: [NodeObs; 2] = [node_obs[0].clone(), node_obs[1].clone()];

        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let engine_pods = pods
            .list(&ListParams::default().labels(&format!("{VOLUME_LABEL}={name}")))
            .await?;
        let mut pod_obs: [Option<PodObs>; 2] = [None, None];
        for slot in Slot::BOTH {
            let wanted = names::engine(&name, slot);
            pod_obs[slot.index()] = engine_pods
                .items
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(wanted.as_str()))
                .map(PodObs::from_pod);
        }

        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let secret = secrets.get_opt(&names::secret(&name)).await?;
        let token = secret
            .as_ref()
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get("token"))
            .and_then(|b| String::from_utf8(b.0.clone()).ok());

        let pv_api: Api<PersistentVolume> = Api::all(client.clone());
        let pv = pv_api.get_opt(&names::pv(&ns, &name)).await?.map(|pv| {
            let spec = pv.spec.unwrap_or_default();
            PvObs {
                capacity: spec
                    .capacity
                    .and_then(|c| c.get("storage").map(|q| q.0.clone())),
                claim: spec
                    .claim_ref
                    .and_then(|r| Some((r.namespace.unwrap_or_else(|| ns.clone()), r.name?))),
            }
        });

        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        let claim_exists = match &self.spec.claim {
            Some(c) => pvcs.get_opt(&c.name).await?.is_some(),
            None => false,
        };
        let mut engine_pvcs = [false, false];
        if self.spec.engine_storage.storage_class_name.is_some() {
            let list = pvcs
                .list(&ListParams::default().labels(&format!("{VOLUME_LABEL}={name}")))
                .await?;
            for slot in Slot::BOTH {
                let wanted = names::engine_pvc(&name, slot);
                engine_pvcs[slot.index()] = list
                    .items
                    .iter()
                    .any(|p| p.metadata.name.as_deref() == Some(wanted.as_str()));
            }
        }

        // Engines: ask only those whose pod runs (an absent engine would just time out).
        let mut engines = [None, None];
        for slot in Slot::BOTH {
            let running = pod_obs[slot.index()]
                .as_ref()
                .is_some_and(|p| p.phase == "Running" && !p.deleting);
            if running && !node_obs[slot.index()].is_lost() {
                let target = EngineTarget {
                    address: plan::engine_address(self, slot, &ctx.config),
                    volume: name.clone(),
                    token: token.clone(),
                };
                engines[slot.index()] = match ctx.engines.status(&target).await {
                    Ok(s) => Some(s),
                    Err(e) => {
                        info!(volume = %name, slot = slot.as_str(), error = %e, "engine status unavailable");
                        None
                    }
                };
            }
        }

        // Workloads stuck on lost engine nodes (only looked up when a node is lost).
        let mut workloads = Vec::new();
        let mut attachments = Vec::new();
        let claim = pv.as_ref().and_then(|p| p.claim.clone());
        let lost: Vec<&NodeObs> = node_obs.iter().filter(|n| n.is_lost()).collect();
        if self.spec.failover.release_workloads && !lost.is_empty() {
            if let Some((claim_ns, claim_name)) = &claim {
                let api: Api<Pod> = Api::namespaced(client.clone(), claim_ns);
                for node in &lost {
                    let lp = ListParams::default().fields(&format!("spec.nodeName={}", node.name));
                    for p in api.list(&lp).await?.items {
                        let uses = p
                            .spec
                            .as_ref()
                            .and_then(|s| s.volumes.as_ref())
                            .is_some_and(|vs| {
                                vs.iter().any(|v| {
                                    v.persistent_volume_claim
                                        .as_ref()
                                        .is_some_and(|c| &c.claim_name == claim_name)
                                })
                            });
                        if uses {
                            workloads.push(WorkloadPod {
                                namespace: claim_ns.clone(),
                                name: p.name_any(),
                                node: node.name.clone(),
                            });
                        }
                    }
                }
            }
            let pv_name = names::pv(&ns, &name);
            let va: Api<VolumeAttachment> = Api::all(client.clone());
            for a in va.list(&ListParams::default()).await?.items {
                let node = a.spec.node_name.clone();
                let ours =
                    a.spec.source.persistent_volume_name.as_deref() == Some(pv_name.as_str());
                if ours && lost.iter().any(|n| n.name == node) {
                    attachments.push((a.name_any(), node));
                }
            }
        }

        Ok((
            Observed {
                now,
                nodes: node_obs,
                pods: pod_obs,
                engines,
                secret_exists: secret.is_some(),
                pv,
                claim_exists,
                engine_pvcs,
                workloads,
                attachments,
            },
            token,
        ))
    }

    async fn report_invalid(
        &self,
        ctx: &Context,
        mut status: MirroredVolumeStatus,
        message: &str,
    ) -> Result<Action> {
        let first = status.phase != Phase::Failed;
        let now = stamp(Timestamp::now()).to_string();
        status.phase = Phase::Failed;
        status.observed_generation = self.metadata.generation;
        failover::set_condition(
            &mut status.conditions,
            "Ready",
            false,
            "InvalidSpec",
            message,
            self.metadata.generation,
            &now,
        );
        self.patch_status(ctx, &status).await?;
        if first {
            self.publish(ctx, vec![warning("InvalidSpec", message)])
                .await;
        }
        Ok(Action::requeue(Duration::from_secs(60)))
    }

    async fn patch_status(&self, ctx: &Context, status: &MirroredVolumeStatus) -> Result<()> {
        let (ns, name) = self.key()?;
        let api: Api<MirroredVolume> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({
            "apiVersion": "tandem.dev/v1alpha1",
            "kind": "MirroredVolume",
            "status": status,
        });
        api.patch_status(&name, &apply_params(), &Patch::Apply(patch))
            .await?;
        Ok(())
    }

    /// Publishes events; a failure to publish is logged, never fails the reconcile.
    async fn publish(&self, ctx: &Context, notes: Vec<Note>) {
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

    /// Cleanup path: waits while a claim still uses the volume, then removes the PV (cluster-scoped, so not
    /// garbage-collected) and every namespaced child.
    pub async fn cleanup(&self, ctx: Arc<Context>) -> Result<Action> {
        let (ns, name) = self.key()?;
        let client = ctx.client.clone();
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        if let Some(c) = &self.spec.claim {
            delete_quietly(&pvcs, &c.name, &DeleteParams::default()).await?;
        }
        let pv_api: Api<PersistentVolume> = Api::all(client.clone());
        let pv_name = names::pv(&ns, &name);
        if let Some(pv) = pv_api.get_opt(&pv_name).await? {
            let claim = pv
                .spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| {
                    Some((
                        r.namespace.clone().unwrap_or_else(|| ns.clone()),
                        r.name.clone()?,
                    ))
                });
            if let Some((claim_ns, claim_name)) = claim {
                let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &claim_ns);
                if api.get_opt(&claim_name).await?.is_some() {
                    self.publish(&ctx, vec![note("WaitingForClaim", format!("claim {claim_ns}/{claim_name} still exists; the engines stay until it is gone"))]).await;
                    return Err(Error::VolumeInUse(format!("{claim_ns}/{claim_name}")));
                }
            }
            delete_quietly(&pv_api, &pv_name, &DeleteParams::default()).await?;
        }
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        for slot in Slot::BOTH {
            delete_quietly(&pods, &names::engine(&name, slot), &DeleteParams::default()).await?;
            delete_quietly(
                &services,
                &names::engine(&name, slot),
                &DeleteParams::default(),
            )
            .await?;
            if self.spec.engine_storage.storage_class_name.is_some() {
                delete_quietly(
                    &pvcs,
                    &names::engine_pvc(&name, slot),
                    &DeleteParams::default(),
                )
                .await?;
            }
        }
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        delete_quietly(&secrets, &names::secret(&name), &DeleteParams::default()).await?;
        ctx.metrics.forget_volume(&ns, &name);
        self.publish(
            &ctx,
            vec![note(
                "Deleted",
                format!("removed the engines, services, token and PersistentVolume {pv_name}"),
            )],
        )
        .await;
        Ok(Action::await_change())
    }
}

/// Runs the controller until a shutdown signal. Fails fast if the CRD is not installed.
pub async fn run(ctx: Arc<Context>) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let volumes: Api<MirroredVolume> = Api::all(client.clone());
    if let Err(e) = volumes.list(&ListParams::default().limit(1)).await {
        anyhow::bail!(
            "cannot list MirroredVolumes ({e}); is the CRD installed? `tandem-operator crd | kubectl apply -f -`"
        );
    }
    let controller = Controller::new(volumes, watcher::Config::default().any_semantic());
    let store = controller.store();
    controller
        .owns(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().labels("app.kubernetes.io/managed-by=tandem-operator"),
        )
        .watches(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            move |node: Node| {
                let node_name = node.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|mv| {
                        mv.status
                            .as_ref()
                            .is_some_and(|s| s.nodes.contains(&node_name))
                    })
                    .map(|mv| ObjectRef::from_obj(mv.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(volume = %obj.name, "reconciled"),
                Err(error) => tracing::debug!(%error, "reconcile error"),
            }
        })
        .await;
    Ok(())
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
