//! Declarative switchover (seed 003), as pure decisions: `spec.primaryNode` naming the secondary's node
//! asks for a planned swap of roles, carried out with the engines' takeover by handoff (never forced):
//! the secondary takes over, the old primary is fenced at the new epoch and hands over its table, the new
//! primary drains and merges it, and the old primary replicates back as the secondary.
//!
//! - **Once per value.** The request is recorded in `status.switchover` and carried out once; when it is
//!   Done it stays Done even if the primary later moves (a failover, or a workload staging writable on the
//!   other node: the CSI plugin takes over there). The operator then shows the mismatch in the
//!   `PrimaryNode` condition rather than fight the workload's placement; clearing or changing
//!   `spec.primaryNode` makes a new request.
//! - **Gated.** `switchoverPolicy: WhenInSync` (default) waits until the primary reports nothing pending;
//!   `Immediate` only until the secondary is a streaming mirror. Both wait for a healthy pair and for no
//!   other takeover; a node that holds no engine of the volume is refused.
//! - **Workloads.** A workload on the old primary's node is attached to that engine, pinned to the old
//!   epoch: after the handover its I/O is refused (never acknowledged, so nothing acknowledged is lost:
//!   every write the old primary acknowledged is in the table it hands over). With
//!   `failover.releaseWorkloads` its pods are restarted (`status.workloadRestart`) so they stage again.

use std::time::Duration;

use tandem_api::pb::{PairState, TakeoverPhase};

use crate::{
    crd::{
        EngineRole, MirroredVolumeSpec, MirroredVolumeStatus, Slot, SwitchoverPhase,
        SwitchoverPolicy, SwitchoverStatus, WorkloadRestart,
    },
    disruption::{self, note, warn, Event},
    engine::EngineState,
    failover::{established, primary_slot, set_condition, slot_health, Health, TakeoverIntent},
    observed::Observed,
};

/// Takeover reason (`status.takeover.reason`) of a switchover asked by `spec.primaryNode`.
pub const REASON: &str = "Switchover";
/// Condition type: whether the primary is on `spec.primaryNode`.
pub const CONDITION: &str = "PrimaryNode";
/// Look again this soon while a switchover waits or runs.
const RECHECK: Duration = Duration::from_secs(2);

/// What the switchover rule asks of one pass.
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    /// Hand the primary over now.
    pub takeover: Option<TakeoverIntent>,
    pub events: Vec<Event>,
    pub recheck: Option<Duration>,
}

/// Keeps `status.switchover` in step with `spec.primaryNode` and the engines, and says whether to hand
/// over now. `busy` names another takeover or restart of this pass: the switchover waits for it.
pub fn track(
    spec: &MirroredVolumeSpec,
    status: &mut MirroredVolumeStatus,
    observed: &Observed,
    peer_timeout: Duration,
    busy: Option<&str>,
) -> Step {
    let mut step = Step::default();
    let Some(want) = spec.primary_node.clone() else {
        status.switchover = None;
        return step;
    };
    let now = observed.now.to_string();
    // A record of another value is a request of the past: this one starts afresh.
    let old = status.switchover.take().filter(|r| r.to == want);
    let primary = primary_slot(status);
    let (p_node, s_node) = (
        observed.node(primary).name.clone(),
        observed.node(primary.other()).name.clone(),
    );
    let mut rec = old.clone().unwrap_or_else(|| SwitchoverStatus {
        phase: SwitchoverPhase::Pending,
        from: p_node.clone(),
        to: want.clone(),
        message: String::new(),
        started_at: Some(now.clone()),
        completed_at: None,
        epoch: 0,
    });
    let before = old.as_ref().map(|r| r.phase);
    if before == Some(SwitchoverPhase::Done) {
        // Carried out once; a later move of the primary is not undone (module docs).
        status.switchover = old;
        return step;
    }
    if want != p_node && want != s_node {
        rec.phase = SwitchoverPhase::Refused;
        rec.message = format!(
            "node {want} holds no engine of this volume (its engines run on {p_node} and {s_node}); \
             the primary stays on {p_node}"
        );
        if before != Some(SwitchoverPhase::Refused) {
            step.events
                .push(warn("SwitchoverRefused", rec.message.clone()));
        }
        status.switchover = Some(rec);
        return step;
    }
    if !established(status) {
        rec.message = "waiting for the pair to be established".into();
        status.switchover = Some(rec);
        step.recheck = Some(RECHECK);
        return step;
    }
    if want == p_node {
        let handed = matches!(
            before,
            Some(
                SwitchoverPhase::HandingOver | SwitchoverPhase::Draining | SwitchoverPhase::Merging
            )
        );
        if !handed {
            // Asked where the primary already is (or refused before, or moved there meanwhile).
            rec.phase = SwitchoverPhase::Done;
            rec.message = format!("the primary is on {want}");
            rec.completed_at = Some(now);
            status.switchover = Some(rec);
            return step;
        }
        progress(&mut rec, status, observed, primary, &now, &mut step);
        status.switchover = Some(rec);
        return step;
    }
    // The primary is on the other node: hand over once the gate opens.
    if old.is_none() {
        step.events.push(note(
            "SwitchoverRequested",
            format!(
                "spec.primaryNode asks for the primary on {want}: switching over from {p_node} ({:?})",
                spec.switchover_policy
            ),
        ));
    }
    step.recheck = Some(RECHECK);
    match gate(spec, status, observed, peer_timeout, busy) {
        Err((phase, why)) => {
            if rec.phase != phase || rec.message != why {
                step.events.push(note("SwitchoverWaits", why.clone()));
            }
            rec.phase = phase;
            rec.message = why;
        }
        Ok(()) => {
            rec.phase = SwitchoverPhase::HandingOver;
            rec.from = p_node.clone();
            rec.message = format!("asking the secondary on {want} to take over from {p_node}");
            step.takeover = Some(TakeoverIntent {
                to: primary.other(),
                reason: REASON,
                // Invariant: a switchover never forces. Both engines answer; the old primary fences
                // itself and hands its table over, so every acknowledged write reaches the new primary
                // (tests/failover_engines.rs::a_primary_node_edit_swaps_roles_under_writes_and_loses_nothing).
                force: false,
                timeout: peer_timeout,
                wait: None,
            });
        }
    }
    status.switchover = Some(rec);
    step
}

/// Why the switchover cannot start now: the phase to show and the reason.
pub(crate) fn gate(
    spec: &MirroredVolumeSpec,
    status: &MirroredVolumeStatus,
    observed: &Observed,
    peer_timeout: Duration,
    busy: Option<&str>,
) -> Result<(), (SwitchoverPhase, String)> {
    let pending = |why: String| Err((SwitchoverPhase::Pending, why));
    if let Some(busy) = busy {
        return pending(format!("waiting: {busy}"));
    }
    let primary = primary_slot(status);
    let secondary = primary.other();
    let s_node = &observed.node(secondary).name;
    let p_node = &observed.node(primary).name;
    if slot_health(observed, secondary, peer_timeout) != Health::Healthy {
        return pending(format!(
            "the secondary's engine pod on {s_node} is not ready"
        ));
    }
    if observed
        .engine(secondary)
        .and_then(|e| e.role)
        .is_none_or(|r| r != EngineRole::Secondary)
    {
        return pending(format!(
            "the engine on {s_node} does not answer as the secondary"
        ));
    }
    let Some(p) = observed
        .engine(primary)
        .filter(|e| e.role == Some(EngineRole::Primary) && e.epoch >= status.epoch)
    else {
        return pending(format!(
            "the primary's engine on {p_node} does not answer as primary"
        ));
    };
    if p.takeover_phase.in_progress() {
        return pending(format!(
            "the primary on {p_node} still finishes a takeover ({})",
            p.takeover_phase.label()
        ));
    }
    let waiting = |what: &str| {
        Err((
            SwitchoverPhase::WaitingForSync,
            format!(
                "postponed until {what} (switchoverPolicy {:?}): pair {}, peer {}, {} blocks ({} bytes) \
                 pending",
                spec.switchover_policy,
                p.pair_state,
                if p.peer_connected {
                    "connected"
                } else {
                    "disconnected"
                },
                p.pending_blocks,
                p.pending_bytes
            ),
        ))
    };
    match spec.switchover_policy {
        SwitchoverPolicy::WhenInSync if !disruption::in_sync(status, observed) => {
            waiting("the secondary is in sync")
        }
        // A resyncing secondary holds an inconsistent copy: the engine would refuse to promote it.
        SwitchoverPolicy::Immediate
            if !p.peer_connected
                || !matches!(p.pair_state, PairState::Synced | PairState::Replicating) =>
        {
            waiting("the secondary is a streaming mirror")
        }
        _ => Ok(()),
    }
}

/// After the handover: Draining and Merging as the new primary reports them, Done once it finished and
/// the old primary answers as its secondary.
fn progress(
    rec: &mut SwitchoverStatus,
    status: &MirroredVolumeStatus,
    observed: &Observed,
    primary: Slot,
    now: &str,
    step: &mut Step,
) {
    step.recheck = Some(RECHECK);
    let new = observed.engine(primary);
    let old = observed.engine(primary.other());
    let phase = phase_of(new);
    let (new_node, old_node) = (
        &observed.node(primary).name,
        &observed.node(primary.other()).name,
    );
    if let Some(phase) = phase {
        rec.phase = phase;
        rec.message = format!(
            "the new primary on {new_node} {} the old primary's table ({} blocks owed)",
            if phase == SwitchoverPhase::Draining {
                "drains"
            } else {
                "merges"
            },
            new.map_or(0, |e| e.peer_pending_blocks)
        );
        return;
    }
    let reversed =
        old.is_some_and(|e| e.role == Some(EngineRole::Secondary) && e.epoch >= rec.epoch);
    let serving =
        new.is_some_and(|e| e.role == Some(EngineRole::Primary) && e.epoch >= status.epoch);
    if !(reversed && serving) {
        rec.message = format!(
            "handed over to {new_node}; waiting for the engine on {old_node} to answer as its secondary"
        );
        return;
    }
    rec.phase = SwitchoverPhase::Done;
    rec.completed_at = Some(now.to_string());
    rec.message = format!(
        "the primary is on {new_node} at epoch {}; {old_node} replicates back as the secondary",
        status.epoch
    );
    step.recheck = None;
    step.events
        .push(note("SwitchoverCompleted", rec.message.clone()));
}

fn phase_of(engine: Option<&EngineState>) -> Option<SwitchoverPhase> {
    match engine.map(|e| e.takeover_phase) {
        Some(TakeoverPhase::Draining) => Some(SwitchoverPhase::Draining),
        Some(TakeoverPhase::Merging) => Some(SwitchoverPhase::Merging),
        _ => None,
    }
}

/// Records a handover that succeeded: its epoch and phase, and (with `releaseWorkloads`) the workload
/// pods on the old primary's node to restart, since their attachment is pinned to the old epoch.
pub fn handed_over(
    spec: &MirroredVolumeSpec,
    status: &mut MirroredVolumeStatus,
    observed: &Observed,
    from_node: &str,
) {
    let primary = primary_slot(status);
    let epoch = status.epoch;
    if let Some(rec) = status.switchover.as_mut() {
        rec.epoch = epoch;
        rec.phase = phase_of(observed.engine(primary)).unwrap_or(SwitchoverPhase::Draining);
        rec.message = format!(
            "handed over at epoch {epoch}: the old primary on {from_node} is fenced and hands its table over"
        );
    }
    if spec.failover.release_workloads {
        // Invariant: no writer stays attached to the fenced engine: the workload pods there that
        // staged before the handover are restarted (controller/decide_tests.rs::
        // a_primary_node_edit_hands_over_and_restarts_the_workloads_on_the_old_node).
        status.workload_restart = Some(WorkloadRestart {
            node: from_node.to_string(),
            before: observed.now.to_string(),
            epoch,
        });
    }
}

/// Records a handover that failed: back to Pending with the engine's answer; retried.
pub fn handover_failed(status: &mut MirroredVolumeStatus, error: &str) {
    if let Some(rec) = status.switchover.as_mut() {
        rec.phase = SwitchoverPhase::Pending;
        rec.message = format!("the handover failed: {error}; retrying");
    }
}

/// The `PrimaryNode` condition: True when the primary is on `spec.primaryNode`, else why not.
pub fn annotate(
    spec: &MirroredVolumeSpec,
    status: &mut MirroredVolumeStatus,
    observed: &Observed,
    generation: Option<i64>,
) {
    let now = observed.now.to_string();
    let Some(want) = spec.primary_node.as_deref() else {
        status.conditions.retain(|c| c.type_ != CONDITION);
        return;
    };
    let Some(rec) = status.switchover.clone() else {
        return;
    };
    let on = established(status) && observed.node(primary_slot(status)).name == want;
    let (ok, reason, message) = match rec.phase {
        SwitchoverPhase::Done if on => (true, "OnPrimaryNode", rec.message),
        SwitchoverPhase::Done => (
            false,
            "PrimaryMoved",
            format!(
                "the switchover to {want} was done, but the primary moved to {} since (a failover, or a \
                 workload staged there); clear or change spec.primaryNode to ask again",
                observed.node(primary_slot(status)).name
            ),
        ),
        phase => (false, phase.as_str(), rec.message),
    };
    set_condition(
        &mut status.conditions,
        CONDITION,
        ok,
        reason,
        &message,
        generation,
        &now,
    );
}
