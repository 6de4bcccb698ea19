//! Observe: every read of one pass, into one [`Observed`]. The only choice made here is which two nodes to
//! look at (`plan::fixed_nodes` or `placement::place`, sticky once recorded in status); everything else is read as it is.

use k8s_openapi::{
    api::{
        core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod, Secret},
        storage::v1::VolumeAttachment,
    },
    jiff::Timestamp,
};
use kube::{api::ListParams, Api, ResourceExt};
use tracing::info;

use super::{restore::Source, Context};
use crate::{
    crd::{MirroredVolume, PlacementStatus, RestoreStatus, Slot},
    engine::{EngineState, EngineTarget},
    observed::{
        MoveObs, MovePvc, NodeObs, Observed, PodObs, PvObs, WorkloadPod, SLOT_LABEL, VOLUME_LABEL,
    },
    placement,
    plan::{self, names, InvalidSpec, MANAGED_BY_LABEL},
    Error, Result,
};

/// What placement concluded for one pass.
pub(super) enum Placed {
    /// `[slot a, slot b]`, the decision to record in `status.placement`, and the restore to record.
    Nodes([String; 2], Option<PlacementStatus>, Option<RestoreStatus>),
    /// The spec cannot be placed as written (Failed until it changes).
    Invalid(InvalidSpec),
    /// No pair fits now (or the restore source is not ready): retried, nodes may come.
    Refused(PlacementStatus, Option<RestoreStatus>),
}

/// The engine pods of slot a and b (the instance each slot's generation names).
type EnginePods = [Option<PodObs>; 2];

/// A fresh volume token: 32 random bytes, hex.
fn new_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Token(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Second-precision RFC 3339.
pub(super) fn stamp(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

fn volume_selector(name: &str) -> ListParams {
    ListParams::default().labels(&format!("{VOLUME_LABEL}={name}"))
}

impl MirroredVolume {
    /// The two engine nodes: the ones recorded in status; before that the spec's, or the pair
    /// `placement::place` chooses among the nodes its selector matches. Invalid when the spec names no
    /// two nodes or an unusable size; unplaced (retried) when no pair fits yet.
    pub(super) async fn place(&self, ctx: &Context) -> Result<Placed> {
        let status = self.status.clone().unwrap_or_default();
        if let Err(invalid) = plan::validate(self, &ctx.config) {
            return Ok(Placed::Invalid(invalid));
        }
        let restore = match self.resolve_source(ctx).await? {
            Source::None => None,
            Source::Ready(r) => Some(r),
            Source::Wait(why) => return Ok(Placed::Refused(why, None)),
            Source::Invalid(invalid) => return Ok(Placed::Invalid(invalid)),
        };
        match plan::fixed_nodes(self, &status) {
            Err(invalid) => return Ok(Placed::Invalid(invalid)),
            Ok(Some(nodes)) => {
                // Before the first placement, the primary (slot a) must be where the snapshot is.
                if let Some(r) = restore.as_ref().filter(|_| status.nodes.len() != 2) {
                    if nodes[0] != r.node {
                        let why = PlacementStatus {
                            reason: placement::SNAPSHOT_NODE_UNAVAILABLE.into(),
                            message: format!(
                                "the restore source {}@{} is on node {}, but placement.nodes puts the primary on {}",
                                r.volume, r.snapshot, r.node, nodes[0]
                            ),
                        };
                        return Ok(Placed::Refused(why, restore));
                    }
                }
                let placement = status.placement.clone().or_else(|| {
                    Some(PlacementStatus {
                        reason: placement::PLACED.into(),
                        message: format!(
                            "placement.nodes: primary on {}, secondary on {}",
                            nodes[0], nodes[1]
                        ),
                    })
                });
                return Ok(Placed::Nodes(nodes, placement, restore));
            }
            Ok(None) => (),
        }
        let selector = self
            .spec
            .placement
            .node_selector
            .clone()
            .unwrap_or_default();
        let lp = ListParams::default().labels(&plan::selector_string(&selector));
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        let matched = nodes.list(&lp).await?.items;
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
        let engines = pods
            .list(
                &ListParams::default()
                    .labels(&format!("{MANAGED_BY_LABEL}=tandem-operator,{SLOT_LABEL}")),
            )
            .await?
            .items;
        let per_node = placement::engines_per_node(&engines);
        let candidates: Vec<placement::Candidate> = matched
            .iter()
            .map(|n| {
                let count = per_node.get(&n.name_any()).copied().unwrap_or(0);
                placement::Candidate::from_node(n, count)
            })
            .collect();
        let key = plan::key(self);
        let wishes = placement::Wishes {
            key: &key,
            allowed_nodes: self.spec.placement.allowed_nodes.as_deref(),
            preferred_primary: self.spec.placement.preferred_primary.as_deref(),
            required_primary: restore.as_ref().map(|r| r.node.as_str()),
        };
        let decision = placement::place(&wishes, &candidates);
        let shown = PlacementStatus {
            reason: decision.reason.into(),
            message: decision.message,
        };
        Ok(match decision.nodes {
            Some(nodes) => Placed::Nodes(nodes, Some(shown), restore),
            None => Placed::Refused(shown, restore),
        })
    }

    /// Reads the volume's world. The engines are asked with the Secret's token; the observation carries a
    /// fresh token when there is no Secret yet (the plan creates it). Objects found under the volume's
    /// key or PV name that belong to another volume are neither read nor used: they become the
    /// observation's `conflict`.
    pub(super) async fn observe(&self, ctx: &Context, nodes: &[String; 2]) -> Result<Observed> {
        let (ns, name) = self.key()?;
        let key = plan::key(self);
        let now = stamp(Timestamp::now());
        let node_names = nodes.clone();
        let nodes = observe_nodes(ctx, nodes, &plan::node_label(self).0).await?;
        let (pods, pod_conflict, all_pods) = self.engine_pods(ctx, &key).await?;
        let (secrets, secret_conflict) = self.secrets(ctx, &key).await?;
        let token_secret = secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(names::secret(&key).as_str()));
        let secret_exists = token_secret.is_some();
        let token = token_secret
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(plan::SECRET_TOKEN_KEY))
            .and_then(|b| String::from_utf8(b.0.clone()).ok());
        let (pv, pv_conflict) = match observe_pv(ctx, self).await? {
            Ok(pv) => (pv, None),
            // Invariant: a PV of another volume is never read further (its claim's pods are not ours
            // to release) nor changed; test `controller::tests::a_foreign_pv_is_not_adopted`.
            Err(conflict) => (None, Some(conflict)),
        };
        let (claim_exists, engine_pvcs, own_pvcs, pvc_conflict) =
            self.claims(ctx, &ns, &key).await?;
        let engines = self.ask_engines(ctx, &nodes, &pods, token.as_deref()).await;
        let (workloads, attachments) = self.stuck_workloads(ctx, &nodes, pv.as_ref()).await?;
        let token = match token {
            Some(t) => t,
            None => new_token()?,
        };
        let mut certs = crate::certs::observe(self, &secrets, &ctx.ca, Some(&token), &node_names);
        let csi_secret = plan::csi_secret_name(self);
        let csi_data = secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(csi_secret.as_str()))
            .and_then(|s| s.data.as_ref());
        if csi_data
            .is_some_and(|d| !plan::csi_secret_maps_current(self, d, &node_names, &ctx.config))
        {
            // Its engine maps are stale (a live move): issued again with the current ones.
            certs.csi = None;
        }
        let moving = self
            .observe_move(
                ctx,
                &all_pods,
                &pods,
                &engines,
                &own_pvcs,
                &key,
                token.as_str(),
            )
            .await?;
        Ok(Observed {
            now,
            nodes,
            pods,
            engines,
            secret_exists,
            token: Some(token),
            pv,
            certs,
            conflict: pv_conflict
                .or(pod_conflict)
                .or(secret_conflict)
                .or(pvc_conflict),
            claim_exists,
            engine_pvcs,
            workloads,
            attachments,
            moving,
            witness: ctx.witness.clock(
                &format!("{ns}/{name}"),
                self.spec.failover.lease_ms,
                std::time::Instant::now(),
            ),
        })
    }

    /// The engine pods of both slots, by name, in the operator's namespace; and a conflict when a pod
    /// under the key belongs to another volume.
    async fn engine_pods(
        &self,
        ctx: &Context,
        key: &str,
    ) -> Result<(EnginePods, Option<InvalidSpec>, Vec<PodObs>)> {
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
        let (list, conflict) = self.own(api.list(&volume_selector(key)).await?.items, "pod");
        let all: Vec<PodObs> = list.iter().map(PodObs::from_pod).collect();
        let pods = Slot::BOTH.map(|slot| {
            let g = plan::generation(self.status.as_ref(), slot);
            let wanted = names::engine_instance(key, slot, g);
            all.iter().find(|p| p.name == wanted).cloned()
        });
        Ok((pods, conflict, all))
    }

    /// What a live move needs: its pods (the new engine, the wipe of this phase, the old engine),
    /// the new engine's PVC (StorageClass storage), its Status, the primary's GetMove, and the node
    /// the spec asks for.
    #[allow(clippy::too_many_arguments)]
    async fn observe_move(
        &self,
        ctx: &Context,
        all: &[PodObs],
        pods: &EnginePods,
        engines: &[Option<EngineState>; 2],
        pvcs: &[PersistentVolumeClaim],
        key: &str,
        token: &str,
    ) -> Result<MoveObs> {
        use crate::crd::MovePhase;
        let mut out = MoveObs::default();
        let Some(status) = self.status.as_ref() else {
            return Ok(out);
        };
        let find = |name: &str| all.iter().find(|p| p.name == name).cloned();
        let target = |address: String| EngineTarget {
            address,
            volume: self.name_any(),
            token: Some(token.to_string()),
        };
        let rec = status.moving.as_ref();
        let asked = crate::moving::asked(self, status).map(|(_, to)| to);
        let to = match rec {
            Some(r) if r.phase.running() => Some(r.to.clone()),
            _ => asked,
        };
        let (label, _) = plan::node_label(self);
        let api: Api<Node> = Api::all(ctx.client.clone());
        let node = |name: String| {
            let (api, label) = (api.clone(), label.clone());
            async move {
                Ok::<_, Error>(match api.get_opt(&name).await? {
                    Some(n) => NodeObs::for_volume(&n, &label),
                    None => NodeObs::missing(&name),
                })
            }
        };
        if let Some(to) = to {
            out.target_node = Some(node(to).await?);
        }
        let Some(rec) = rec else {
            return Ok(out);
        };
        let (slot, gen) = (rec.slot, rec.generation);
        match rec.phase {
            MovePhase::Preparing if self.spec.engine_storage.storage_class_name.is_some() => {
                let name = names::engine_pvc_at(key, slot, gen);
                out.pvc = MovePvc::of(
                    pvcs.iter()
                        .find(|p| p.metadata.name.as_deref() == Some(name.as_str())),
                );
            }
            MovePhase::Preparing => out.wipe = find(&names::move_wipe(key, slot, gen, false)),
            MovePhase::Finishing => {
                out.wipe = find(&names::move_wipe(key, slot, gen, true));
                let old = names::engine_instance(key, slot, gen.saturating_sub(1));
                out.old_pod = all.iter().any(|p| p.name == old);
                out.old_node = Some(node(rec.from.clone()).await?);
            }
            _ => {}
        }
        if matches!(
            rec.phase,
            MovePhase::Starting | MovePhase::Copying | MovePhase::CuttingOver
        ) {
            out.pod = find(&names::engine_instance(key, slot, gen));
            if out
                .pod
                .as_ref()
                .is_some_and(|p| p.phase == "Running" && !p.deleting)
            {
                let t = target(plan::engine_address_at(self, slot, gen, &ctx.config));
                out.engine = ctx.engines.status(&t).await.ok();
            }
        }
        if matches!(rec.phase, MovePhase::Copying | MovePhase::CuttingOver) {
            let primary = crate::failover::primary_slot(status);
            if pods[primary.index()].is_some() && engines[primary.index()].is_some() {
                let t = target(plan::engine_address(self, primary, &ctx.config));
                out.progress = Some(MoveObs::progress_of(ctx.engines.get_move(&t).await));
            }
        }
        Ok(out)
    }

    /// The volume's Secrets in the operator's namespace (token, engine TLS, CSI), and a conflict when one
    /// under the key belongs to another volume. Every volume has a token Secret from its first pass, so a
    /// key shared with another volume shows here even before pods or Services would (Services are applied
    /// by name, so this check is what keeps us from overwriting theirs).
    async fn secrets(
        &self,
        ctx: &Context,
        key: &str,
    ) -> Result<(Vec<Secret>, Option<InvalidSpec>)> {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
        Ok(self.own(api.list(&volume_selector(key)).await?.items, "secret"))
    }

    /// Splits objects found under the key into this volume's and a conflict naming the first other one.
    fn own<K: kube::Resource>(&self, items: Vec<K>, kind: &str) -> (Vec<K>, Option<InvalidSpec>) {
        let mut conflict = None;
        let mut mine = Vec::new();
        for item in items {
            match plan::owned_by(item.meta().labels.as_ref(), self) {
                Ok(()) => mine.push(item),
                Err(why) => {
                    conflict.get_or_insert_with(|| {
                        InvalidSpec::refused(
                            plan::NAME_CONFLICT,
                            format!(
                                "{kind} {} in the operator's namespace carries this volume's key but {why}; nothing is changed until it is gone",
                                item.meta().name.clone().unwrap_or_default()
                            ),
                        )
                    });
                }
            }
        }
        (mine, conflict)
    }

    /// Whether the claim of `spec.claim` exists, and the engines' own PVCs (StorageClass storage only; one
    /// of another volume under the key is a conflict: an engine never mounts another volume's data):
    /// whether each slot's current instance has one, and all of this volume's.
    async fn claims(
        &self,
        ctx: &Context,
        ns: &str,
        key: &str,
    ) -> Result<(
        bool,
        [bool; 2],
        Vec<PersistentVolumeClaim>,
        Option<InvalidSpec>,
    )> {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
        let claim_exists = match &self.spec.claim {
            Some(c) => pvcs.get_opt(&c.name).await?.is_some(),
            None => false,
        };
        let mut engine_pvcs = [false, false];
        let mut conflict = None;
        let mut own = Vec::new();
        if self.spec.engine_storage.storage_class_name.is_some() {
            let engine_api: Api<PersistentVolumeClaim> =
                Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
            let (list, theirs) = self.own(
                engine_api.list(&volume_selector(key)).await?.items,
                "PersistentVolumeClaim",
            );
            conflict = theirs;
            engine_pvcs = Slot::BOTH.map(|slot| {
                let g = plan::generation(self.status.as_ref(), slot);
                let wanted = names::engine_pvc_at(key, slot, g);
                list.iter()
                    .any(|p| p.metadata.name.as_deref() == Some(wanted.as_str()))
            });
            own = list;
        }
        Ok((claim_exists, engine_pvcs, own, conflict))
    }

    /// The engines' Status. Only those whose pod runs on a live node are asked (an absent engine would
    /// just time out); an engine that does not answer is `None`.
    async fn ask_engines(
        &self,
        ctx: &Context,
        nodes: &[NodeObs; 2],
        pods: &[Option<PodObs>; 2],
        token: Option<&str>,
    ) -> [Option<EngineState>; 2] {
        let name = self.name_any();
        let mut engines = [None, None];
        for slot in Slot::BOTH {
            let running = pods[slot.index()]
                .as_ref()
                .is_some_and(|p| p.phase == "Running" && !p.deleting);
            if !running || nodes[slot.index()].is_lost() {
                continue;
            }
            let target = EngineTarget {
                address: plan::engine_address(self, slot, &ctx.config),
                volume: name.clone(),
                token: token.map(str::to_string),
            };
            engines[slot.index()] = match ctx.engines.status(&target).await {
                Ok(s) => Some(s),
                Err(e) => {
                    info!(volume = %name, slot = slot.as_str(), error = %e, "engine status unavailable");
                    None
                }
            };
        }
        engines
    }

    /// Workload pods of the volume's claim and the PV's VolumeAttachments on lost engine nodes (looked up
    /// only when a node is lost and workloads may be released); and the claim's pods on the node of a
    /// restart record (`status.engineRestart` / `workloadRestart`), which may have to be restarted.
    async fn stuck_workloads(
        &self,
        ctx: &Context,
        nodes: &[NodeObs; 2],
        pv: Option<&PvObs>,
    ) -> Result<(Vec<WorkloadPod>, Vec<(String, String)>)> {
        let lost: Vec<&NodeObs> = nodes.iter().filter(|n| n.is_lost()).collect();
        let status = self.status.as_ref();
        let mut look: Vec<String> = lost.iter().map(|n| n.name.clone()).collect();
        let restart_nodes = status
            .and_then(|s| s.engine_restart.as_ref().map(|r| r.node.clone()))
            .into_iter()
            .chain(status.and_then(|s| s.workload_restart.as_ref().map(|w| w.node.clone())));
        for node in restart_nodes {
            if !look.contains(&node) {
                look.push(node);
            }
        }
        if !self.spec.failover.release_workloads || look.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut workloads = Vec::new();
        if let Some((claim_ns, claim_name)) = pv.and_then(|p| p.claim.as_ref()) {
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), claim_ns);
            for node in &look {
                let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
                for p in api.list(&lp).await?.items {
                    if uses_claim(&p, claim_name) {
                        workloads.push(WorkloadPod {
                            namespace: claim_ns.clone(),
                            name: p.name_any(),
                            node: node.clone(),
                            created: p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                            deleting: p.metadata.deletion_timestamp.is_some(),
                        });
                    }
                }
            }
        }
        if lost.is_empty() {
            return Ok((workloads, Vec::new()));
        }
        let pv_name = plan::pv_name(self);
        let va: Api<VolumeAttachment> = Api::all(ctx.client.clone());
        let mut attachments = Vec::new();
        for a in va.list(&ListParams::default()).await?.items {
            let node = a.spec.node_name.clone();
            let ours = a.spec.source.persistent_volume_name.as_deref() == Some(pv_name.as_str());
            if ours && lost.iter().any(|n| n.name == node) {
                attachments.push((a.name_any(), node));
            }
        }
        Ok((workloads, attachments))
    }
}

/// The two engine nodes (and whether they carry the volume's node `label`); a node missing from the
/// cluster is observed as such.
async fn observe_nodes(ctx: &Context, nodes: &[String; 2], label: &str) -> Result<[NodeObs; 2]> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let mut out = [NodeObs::missing(&nodes[0]), NodeObs::missing(&nodes[1])];
    for (obs, name) in out.iter_mut().zip(nodes) {
        if let Some(node) = api.get_opt(name).await? {
            *obs = NodeObs::for_volume(&node, label);
        }
    }
    Ok(out)
}

/// The volume's PersistentVolume: its capacity and the claim bound to it; `Err` when a PV of that name
/// exists but its owner labels name another volume (or none).
async fn observe_pv(
    ctx: &Context,
    mv: &MirroredVolume,
) -> Result<Result<Option<PvObs>, InvalidSpec>> {
    let (ns, name) = (mv.namespace().unwrap_or_default(), mv.name_any());
    let pv_name = plan::pv_name(mv);
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let Some(pv) = api.get_opt(&pv_name).await? else {
        return Ok(Ok(None));
    };
    if mv.spec.persistent_volume_name.is_some() {
        // The provisioner's PV carries no owner labels: it is this volume's when its CSI handle is.
        let csi = pv.spec.as_ref().and_then(|s| s.csi.as_ref());
        let ours = csi.is_some_and(|c| {
            c.driver == crate::crd::CSI_DRIVER && c.volume_handle == format!("{ns}/{name}")
        });
        if !ours {
            return Ok(Ok(None));
        }
    } else if let Err(why) = plan::owned_by(pv.metadata.labels.as_ref(), mv) {
        return Ok(Err(InvalidSpec::refused(
            plan::PV_CONFLICT,
            format!("PersistentVolume {pv_name} is in the way: {why}; it is left as it is"),
        )));
    }
    let (label, _) = plan::node_label(mv);
    Ok(Ok(Some({
        let spec = pv.spec.unwrap_or_default();
        PvObs {
            follows_label: follows_label(spec.node_affinity.as_ref(), &label),
            capacity: spec
                .capacity
                .and_then(|c| c.get("storage").map(|q| q.0.clone())),
            claim: spec
                .claim_ref
                .and_then(|r| Some((r.namespace.unwrap_or_else(|| ns.clone()), r.name?))),
        }
    })))
}

/// Whether a PV's node affinity lets workloads follow the volume's engines: no required affinity,
/// or every term selects the volume's node `label` (a term on `kubernetes.io/hostname` or the CSI
/// topology key names fixed nodes).
pub(crate) fn follows_label(
    affinity: Option<&k8s_openapi::api::core::v1::VolumeNodeAffinity>,
    label: &str,
) -> bool {
    let Some(terms) = affinity
        .and_then(|a| a.required.as_ref())
        .map(|r| &r.node_selector_terms)
        .filter(|t| !t.is_empty())
    else {
        return true;
    };
    terms.iter().all(|t| {
        t.match_expressions
            .as_ref()
            .is_some_and(|es| es.iter().any(|e| e.key == label))
    })
}

fn uses_claim(pod: &Pod, claim: &str) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .is_some_and(|vs| {
            vs.iter().any(|v| {
                v.persistent_volume_claim
                    .as_ref()
                    .is_some_and(|c| c.claim_name == claim)
            })
        })
}
