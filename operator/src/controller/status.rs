//! Status: phase, conditions, replication and engine refs computed from the plan ([`settle`], pure), then
//! written with server-side apply; the pass's events are published once it is written.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::{api::Patch, runtime::controller::Action, Api};

use super::{
    act::apply_params,
    decide::{note, warning, Note, Plan},
    observe::stamp,
    Context,
};
use crate::{
    crd::{EngineRole, MirroredVolume, MirroredVolumeStatus, Phase, PlacementStatus, Slot},
    failover, placement,
    plan::{self, names, EngineConfig, InvalidSpec},
    Result,
};

/// How soon a volume no pair of nodes fits is placed again (node events also wake it).
pub(super) const UNPLACED_RETRY: Duration = Duration::from_secs(15);

/// The status to write, the events that go with it, and when to look again.
pub(super) fn settle(
    mv: &MirroredVolume,
    plan: Plan,
    cfg: &EngineConfig,
) -> (MirroredVolumeStatus, Vec<Note>, Duration) {
    let old = mv.status.clone().unwrap_or_default();
    let Plan {
        mut status,
        observed,
        mut notes,
        requeue,
        ..
    } = plan;
    let key = plan::key(mv);
    // The instances serving now: a live move's cutover changes one in this pass.
    let gens = Slot::BOTH.map(|slot| plan::generation(Some(&status), slot));
    let names_of = |slot: Slot| {
        let g = gens[slot.index()];
        (
            names::engine_instance(&key, slot, g),
            plan::engine_address_at(mv, slot, g, cfg),
        )
    };
    failover::summarize(
        &mut status,
        &observed,
        mv.metadata.generation,
        mv.peer_timeout(),
        &names_of,
        None,
    );
    crate::disruption::annotate(
        &mut status,
        &observed,
        mv.metadata.generation,
        mv.peer_timeout(),
        crate::disruption::restart_grace(&mv.spec),
    );
    crate::switchover::annotate(&mv.spec, &mut status, &observed, mv.metadata.generation);
    crate::moving::annotate(&mut status, &observed, mv.metadata.generation);
    let was_away = old
        .secondary
        .as_ref()
        .filter(|e| e.role != EngineRole::Secondary || !e.reachable);
    let back = status
        .secondary
        .as_ref()
        .filter(|e| e.role == EngineRole::Secondary && e.reachable);
    if let (Some(_), Some(back)) = (was_away, back) {
        notes.push(note(
            "EngineRejoined",
            format!(
                "engine on {} is back as secondary and resyncs from the primary",
                back.node
            ),
        ));
    }
    if old.phase != status.phase || mv.status.is_none() {
        let text = format!("phase {} -> {}", old.phase.as_str(), status.phase.as_str());
        notes.push(note("PhaseChanged", text));
    }
    let default = match status.phase {
        Phase::Synced => Duration::from_secs(30),
        _ => Duration::from_secs(10),
    };
    let requeue = requeue.map_or(default, |r| r.min(default));
    (status, notes, requeue)
}

impl MirroredVolume {
    /// Writes the status of a pass, then its events. A spec the plan could not turn into objects is
    /// reported as such instead.
    pub(super) async fn write_status(&self, ctx: &Context, plan: Plan) -> Result<Action> {
        if let Err(invalid) = &plan.children {
            let invalid = invalid.clone();
            return self.write_invalid(ctx, plan.status, &invalid).await;
        }
        let (ns, name) = self.key()?;
        let (status, notes, requeue) = settle(self, plan, &ctx.config);
        self.patch_status(ctx, &status).await?;
        ctx.metrics.observe_volume(&ns, &name, &status);
        self.publish(ctx, notes).await;
        Ok(Action::requeue(requeue))
    }

    /// Marks the volume Failed for an invalid or refused spec (the Ready condition says why); the event
    /// only on the way in or when the reason changes.
    pub(super) async fn write_invalid(
        &self,
        ctx: &Context,
        mut status: MirroredVolumeStatus,
        invalid: &InvalidSpec,
    ) -> Result<Action> {
        let (reason, message) = (invalid.reason, invalid.message.as_str());
        let shown = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == reason);
        let first = status.phase != Phase::Failed || !shown;
        let now = stamp(Timestamp::now()).to_string();
        status.phase = Phase::Failed;
        status.observed_generation = self.metadata.generation;
        failover::set_condition(
            &mut status.conditions,
            "Ready",
            false,
            reason,
            message,
            self.metadata.generation,
            &now,
        );
        self.patch_status(ctx, &status).await?;
        if first {
            self.publish(ctx, vec![warning(reason, message)]).await;
        }
        Ok(Action::requeue(Duration::from_secs(60)))
    }

    /// No pair of nodes fits yet: `status.placement` and the Ready condition say why; looked at again
    /// soon (and whenever a node changes), since nodes may come. The event only when the reason changes.
    pub(super) async fn write_unplaced(
        &self,
        ctx: &Context,
        mut status: MirroredVolumeStatus,
        why: PlacementStatus,
    ) -> Result<Action> {
        let first = status.placement.as_ref().map(|p| &p.reason) != Some(&why.reason);
        let now = stamp(Timestamp::now()).to_string();
        status.phase = Phase::Creating;
        status.observed_generation = self.metadata.generation;
        use super::restore as r;
        let reason = [
            placement::PREFERRED_PRIMARY_UNAVAILABLE,
            placement::SNAPSHOT_NODE_UNAVAILABLE,
            r::SOURCE_NOT_FOUND,
            r::SOURCE_NOT_READY,
            r::SNAPSHOT_NOT_FOUND,
            r::SNAPSHOTS_NOT_SUPPORTED,
        ]
        .into_iter()
        .find(|r| *r == why.reason)
        .unwrap_or(placement::NO_PAIR_FITS);
        failover::set_condition(
            &mut status.conditions,
            "Ready",
            false,
            reason,
            &why.message,
            self.metadata.generation,
            &now,
        );
        let text = why.message.clone();
        status.placement = Some(why);
        self.patch_status(ctx, &status).await?;
        if first {
            self.publish(ctx, vec![warning(reason, text)]).await;
        }
        Ok(Action::requeue(UNPLACED_RETRY))
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
}
