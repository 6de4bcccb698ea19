//! Disruptions that are not failures, as pure decisions (issue 12, items 4 and 5).
//!
//! - **Engine restart.** A primary engine whose node is Ready but whose pod is deleted, failed, missing or
//!   unready is restarting, not lost: the operator recreates its pod on the same node (same hostPath state
//!   dir, same `--role primary`), so the engine comes back at the same epoch and the workload's attachment,
//!   pinned to `<volume>@<epoch>`, reconnects: a stall, not an error. Only when it is not back within
//!   `spec.failover.engineRestartGrace` does the failover path take over, with the loss it always used
//!   (`PrimaryPodLost` / `PrimaryUnready`); then the workload pods on that node, whose attachment is pinned
//!   to the old epoch for good, are deleted so they stage again on the new primary.
//! - **Node drain.** One PodDisruptionBudget per volume (`maxUnavailable: 0`) selects the engine pods
//!   labelled `tandem.dev/disruption-allowed: "false"`: always the primary's, and the secondary's while
//!   the pair is not in sync. When the primary's node is cordoned and the pair is healthy, the operator
//!   hands the primary over to the secondary (Takeover, `WaitForPrimary`: the old primary drains its table
//!   while its node is still up) and labels the old primary's pod `"true"` only once it is an in-sync
//!   secondary, so the drain's eviction proceeds with nothing pending.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
    jiff::Timestamp,
};
use tandem_api::pb::PairState;

use crate::{
    crd::{
        parse_duration, EngineRestart, EngineRole, MirroredVolume, MirroredVolumeSpec,
        MirroredVolumeStatus, Slot, WorkloadRestart,
    },
    failover::{
        established, primary_slot, set_condition, slot_health, FailoverDecision, Health, Loss,
        TakeoverIntent,
    },
    observed::{Observed, WorkloadPod, DISRUPTION_LABEL, VOLUME_LABEL},
    plan,
};

/// Takeover reason of a planned switchover off a cordoned node.
pub const SWITCHOVER_REASON: &str = "SwitchoverForDrain";
/// Condition type shown while an engine node is cordoned.
pub const DRAIN_CONDITION: &str = "NodeDrain";
/// Recheck this often while a drain waits on the pair.
const DRAIN_RECHECK: Duration = Duration::from_secs(3);

/// An event to publish, in the controller's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub warning: bool,
    pub reason: &'static str,
    pub text: String,
}

pub(crate) fn note(reason: &'static str, text: String) -> Event {
    Event {
        warning: false,
        reason,
        text,
    }
}

pub(crate) fn warn(reason: &'static str, text: String) -> Event {
    Event {
        warning: true,
        reason,
        text,
    }
}

/// `spec.failover.engineRestartGrace` (60 s when unparsable; the schema's pattern makes that rare).
pub fn restart_grace(spec: &MirroredVolumeSpec) -> Duration {
    parse_duration(&spec.failover.engine_restart_grace).unwrap_or(Duration::from_secs(60))
}

/// Why the engine of `slot` is away although its node is up, if it is.
pub fn engine_away(observed: &Observed, slot: Slot) -> Option<&'static str> {
    if observed.node(slot).is_lost() {
        return None;
    }
    match observed.pod(slot) {
        None => Some("engine pod missing"),
        Some(p) if p.deleting => Some("engine pod deleted"),
        Some(p) if p.is_gone() => Some("engine pod failed"),
        Some(p) if !p.ready => Some("engine pod unready"),
        Some(_) => None,
    }
}

/// What the restart rule says about the primary this pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Nothing restarting (or nothing to decide).
    Idle,
    /// Restarting; the grace ends after this long.
    Waiting(Duration),
    /// Away for longer than the grace: the failover path may take over.
    Expired,
}

fn parse_time(s: &str) -> Option<Timestamp> {
    s.parse().ok()
}

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    now.duration_since(since).unsigned_abs()
}

/// Once the primary moved off a restarting engine (our takeover after the grace, or the CSI plugin's), the
/// restart is over and the workload pods still on that node are pinned to the old epoch: restart them.
fn restart_moved(status: &mut MirroredVolumeStatus, now: Timestamp) {
    let primary = primary_slot(status);
    if let Some(r) = status.engine_restart.take() {
        if r.slot == primary {
            status.engine_restart = Some(r);
        } else {
            status.workload_restart = Some(WorkloadRestart {
                node: r.node,
                before: now.to_string(),
                epoch: status.epoch,
            });
        }
    }
}

/// Keeps `status.engineRestart` in step with the primary's engine and says whether its grace still runs.
pub fn track_restart(
    status: &mut MirroredVolumeStatus,
    observed: &Observed,
    grace: Duration,
) -> (Restart, Vec<Event>) {
    let mut events = Vec::new();
    if !established(status) {
        status.engine_restart = None;
        return (Restart::Idle, events);
    }
    restart_moved(status, observed.now);
    let primary = primary_slot(status);
    let node = observed.node(primary).name.clone();
    let Some(why) = engine_away(observed, primary) else {
        let Some(r) = status.engine_restart.clone() else {
            return (Restart::Idle, events);
        };
        let back = observed
            .engine(primary)
            .is_some_and(|e| e.role == Some(EngineRole::Primary) && e.epoch >= status.epoch);
        if observed.node(primary).is_lost() {
            // The node went too: the node-loss path owns it now.
            status.engine_restart = None;
        } else if back {
            let away = parse_time(&r.since).map_or(0, |s| elapsed(s, observed.now).as_secs());
            status.engine_restart = None;
            events.push(note(
                "EngineRestarted",
                format!(
                    "primary engine on {node} is back at epoch {} after {away}s ({}); no takeover",
                    status.epoch, r.reason
                ),
            ));
        }
        // A ready pod whose engine does not answer yet: keep the record, nothing to decide.
        return (Restart::Idle, events);
    };
    let since = match status
        .engine_restart
        .as_ref()
        .and_then(|r| parse_time(&r.since))
    {
        Some(since) => since,
        None => {
            // First sight. An unready pod has been away since it turned unready.
            let since = observed
                .pod(primary)
                .filter(|p| !p.ready && !p.is_gone())
                .and_then(|p| p.not_ready_since)
                .map_or(observed.now, |t| t.min(observed.now));
            status.engine_restart = Some(EngineRestart {
                slot: primary,
                node: node.clone(),
                since: since.to_string(),
                reason: why.to_string(),
            });
            // Already away past the grace at first sight (an operator that was down): no promise of a
            // restart, the takeover's own events tell the rest.
            if elapsed(since, observed.now) < grace {
                events.push(warn(
                "EngineRestarting",
                format!(
                    "primary engine on {node} is away ({why}) while its node is up: its pod is restarted \
                     there on the same state dir; a takeover only if it is not back within {}s",
                    grace.as_secs()
                ),
            ));
            }
            since
        }
    };
    if let Some(r) = status.engine_restart.as_mut() {
        r.reason = why.to_string();
    }
    let away = elapsed(since, observed.now);
    if away < grace {
        (Restart::Waiting(grace - away), events)
    } else {
        (Restart::Expired, events)
    }
}

/// Applies the restart rule to the failover decision. Within the grace nothing is taken over (the pod is
/// recreated as primary by the plan); after it, the same loss the failover path knows is taken over even
/// if that path would still wait (its own clock started with the recreated pod).
pub fn gate_restart(
    decision: &mut FailoverDecision,
    restart: Restart,
    spec: &MirroredVolumeSpec,
    status: &MirroredVolumeStatus,
    observed: &Observed,
    peer_timeout: Duration,
) {
    match restart {
        Restart::Idle => {}
        // Invariant: a primary engine away on a live node is never replaced within the grace
        // (disruption::tests::a_restart_within_the_grace_is_not_a_failover).
        Restart::Waiting(left) => {
            decision.takeover = None;
            decision.stuck = None;
            decision.recheck = Some(decision.recheck.map_or(left, |r| r.min(left)));
        }
        Restart::Expired => {
            if decision.takeover.is_some() || decision.stuck.is_some() {
                return;
            }
            let primary = primary_slot(status);
            let loss = match observed.pod(primary) {
                Some(p) if !p.is_gone() => Loss::PodUnready,
                _ => Loss::PodLost,
            };
            // The same rules as any lost primary: a handoff if the engine answers, else a forced
            // promotion once its lease has provably run out, by the volume's policy.
            *decision =
                crate::failover::decide_for_loss(spec, status, observed, peer_timeout, loss);
        }
    }
}

/// The primary's engine reports the secondary holds every acknowledged write, and the secondary agrees it
/// is the secondary: nothing would be pending if the secondary's pod went away now.
pub fn in_sync(status: &MirroredVolumeStatus, observed: &Observed) -> bool {
    let primary = primary_slot(status);
    let secondary = primary.other();
    let p_ok = observed.engine(primary).is_some_and(|e| {
        e.role == Some(EngineRole::Primary)
            && e.epoch >= status.epoch
            && e.pair_state == PairState::Synced
            && e.pending_blocks == 0
            && e.peer_connected
            && !e.takeover_phase.in_progress()
    });
    let s_ok = observed
        .engine(secondary)
        .is_some_and(|e| e.role == Some(EngineRole::Secondary));
    let s_ready = observed
        .pod(secondary)
        .is_some_and(|p| p.ready && !p.is_gone());
    established(status) && p_ok && s_ok && s_ready
}

/// What a cordoned primary node asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Switchover {
    /// No engine node of the primary is cordoned.
    None,
    /// Hand the primary over to the secondary.
    Go(TakeoverIntent),
    /// Cordoned, but the pair cannot hand over now: why.
    Blocked(String),
}

/// Whether to switch the primary off its cordoned node.
pub fn switchover(
    status: &MirroredVolumeStatus,
    observed: &Observed,
    peer_timeout: Duration,
) -> Switchover {
    if !established(status) {
        return Switchover::None;
    }
    let primary = primary_slot(status);
    let secondary = primary.other();
    let (p_node, s_node) = (observed.node(primary), observed.node(secondary));
    if !p_node.unschedulable || p_node.is_lost() {
        return Switchover::None;
    }
    let blocked = |why: String| Switchover::Blocked(why);
    if s_node.unschedulable {
        return blocked(format!(
            "the secondary's node {} is cordoned too",
            s_node.name
        ));
    }
    if slot_health(observed, secondary, peer_timeout) != Health::Healthy {
        return blocked(format!("the secondary on {} is not ready", s_node.name));
    }
    let Some(s) = observed.engine(secondary) else {
        return blocked(format!(
            "the secondary's engine on {} does not answer",
            s_node.name
        ));
    };
    if s.role != Some(EngineRole::Secondary) {
        return blocked(format!(
            "the engine on {} reports {:?}, not Secondary",
            s_node.name, s.role
        ));
    }
    let Some(p) = observed
        .engine(primary)
        .filter(|e| e.role == Some(EngineRole::Primary))
    else {
        return blocked(format!(
            "the primary's engine on {} does not answer as primary",
            p_node.name
        ));
    };
    // A resyncing secondary holds an inconsistent copy: the engine would refuse to promote it anyway.
    let streaming = matches!(p.pair_state, PairState::Synced | PairState::Replicating);
    if !p.peer_connected || !streaming || p.takeover_phase.in_progress() {
        return blocked(format!(
            "the secondary on {} is not a streaming mirror yet ({:?}, {} blocks pending)",
            s_node.name, p.pair_state, p.pending_blocks
        ));
    }
    // A planned switchover never forces: both engines are up; the old primary hands its table over.
    Switchover::Go(TakeoverIntent {
        to: secondary,
        reason: SWITCHOVER_REASON,
        force: false,
        timeout: peer_timeout,
        wait: None,
    })
}

/// A disruption label to set on an engine pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelChange {
    pub slot: Slot,
    pub pod: String,
    pub allowed: bool,
}

/// What the disruption rules ask of one pass, besides the takeover.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Actions {
    /// Engine pod labels to change.
    pub labels: Vec<LabelChange>,
    /// Workload pods to delete (gracefully: their node is up) so they stage on the new primary.
    pub workloads: Vec<WorkloadPod>,
}

/// The rest of the pass once the primary is known: labels, workload restarts, events, a recheck.
/// `looked` says whether the observation listed workload pods on the restart node (it does when the
/// status it started from had a restart record).
pub fn finish(
    mv: &MirroredVolume,
    status: &mut MirroredVolumeStatus,
    observed: &Observed,
    looked: bool,
) -> (Actions, Vec<Event>, Option<Duration>) {
    let mut events = Vec::new();
    let mut recheck = None;
    restart_moved(status, observed.now);
    let workloads = restart_workloads(mv, status, observed, looked, &mut events);
    if status.workload_restart.is_some() {
        recheck = Some(Duration::from_secs(2));
    }
    let labels = label_changes(status, observed);
    for l in labels.iter().filter(|l| l.allowed) {
        let node = &observed.node(l.slot).name;
        if !observed.node(l.slot).unschedulable {
            continue;
        }
        let switched = status
            .takeover
            .as_ref()
            .is_some_and(|t| t.reason == SWITCHOVER_REASON && t.from_node == *node);
        let text = format!(
            "the engine on cordoned node {node} is an in-sync secondary: its pod {} may be evicted",
            l.pod
        );
        events.push(if switched {
            note("SwitchoverDone", text)
        } else {
            note("EvictionAllowed", text)
        });
    }
    let draining = Slot::BOTH.iter().any(|s| {
        let n = observed.node(*s);
        n.unschedulable
            && !n.is_lost()
            && observed
                .pod(*s)
                .is_some_and(|p| !p.is_gone() && p.disruption_allowed != Some(true))
    });
    if draining {
        recheck = Some(recheck.map_or(DRAIN_RECHECK, |r: Duration| r.min(DRAIN_RECHECK)));
    }
    (Actions { labels, workloads }, events, recheck)
}

/// Each engine pod's wanted label: `"false"` for the primary's always and for the secondary's until the
/// pair is in sync; only the changes.
pub fn label_changes(status: &MirroredVolumeStatus, observed: &Observed) -> Vec<LabelChange> {
    let primary = primary_slot(status);
    let synced = in_sync(status, observed);
    let mut out = Vec::new();
    for slot in Slot::BOTH {
        let Some(pod) = observed.pod(slot).filter(|p| !p.is_gone()) else {
            continue;
        };
        // Invariant: the primary's engine pod is never evictable: it is labelled "false", which the
        // budget (maxUnavailable 0) selects (disruption::tests::the_primary_is_never_evictable). A
        // takeover made by the CSI plugin leaves the new primary's "true" until the next pass relabels it;
        // an eviction in that window is an engine restart, handled by the restart rule.
        let allowed = slot != primary && synced;
        if pod.disruption_allowed != Some(allowed) {
            out.push(LabelChange {
                slot,
                pod: pod.name.clone(),
                allowed,
            });
        }
    }
    out
}

fn restart_workloads(
    mv: &MirroredVolume,
    status: &mut MirroredVolumeStatus,
    observed: &Observed,
    looked: bool,
    events: &mut Vec<Event>,
) -> Vec<WorkloadPod> {
    let Some(w) = status.workload_restart.clone() else {
        return Vec::new();
    };
    let node_lost = observed
        .nodes
        .iter()
        .find(|n| n.name == w.node)
        .is_none_or(|n| n.is_lost());
    if !mv.spec.failover.release_workloads || node_lost {
        // Opted out, or the node is lost and the release path (force, fenced) owns its workloads.
        status.workload_restart = None;
        return Vec::new();
    }
    if !looked {
        return Vec::new();
    }
    let Some(before) = parse_time(&w.before) else {
        status.workload_restart = None;
        return Vec::new();
    };
    // Only pods staged before the takeover: a pod created since stages against the new epoch.
    let stale: Vec<&WorkloadPod> = observed
        .workloads
        .iter()
        .filter(|p| p.node == w.node && p.created.is_some_and(|c| c < before))
        .collect();
    if stale.is_empty() {
        status.workload_restart = None;
    }
    let primary_node = &observed.node(primary_slot(status)).name;
    stale
        .into_iter()
        .filter(|p| !p.deleting)
        .map(|p| {
            events.push(warn(
                "WorkloadRestarted",
                format!(
                    "deleted pod {}/{} on {}: its attachment is pinned to the engine's old epoch there; it \
                     stages again on the primary on {primary_node} (epoch {})",
                    p.namespace, p.name, p.node, w.epoch
                ),
            ));
            p.clone()
        })
        .collect()
}

/// Conditions of the disruption rules, set after the failover summary: Ready says `EngineRestarting`
/// while the primary's engine restarts; `NodeDrain` says what a cordoned engine node waits for.
pub fn annotate(
    status: &mut MirroredVolumeStatus,
    observed: &Observed,
    generation: Option<i64>,
    peer_timeout: Duration,
    grace: Duration,
) {
    let now = observed.now.to_string();
    let primary = primary_slot(status);
    if let Some(r) = status.engine_restart.clone().filter(|r| r.slot == primary) {
        let msg = format!(
            "primary engine on {} is restarting ({}) since {}; takeover if it is not back within {}s",
            r.node,
            r.reason,
            r.since,
            grace.as_secs()
        );
        set_condition(
            &mut status.conditions,
            "Ready",
            false,
            "EngineRestarting",
            &msg,
            generation,
            &now,
        );
    }
    let shown = status.conditions.iter().any(|c| c.type_ == DRAIN_CONDITION);
    let p_node = observed.node(primary);
    let s_node = observed.node(primary.other());
    let (active, reason, msg) = if p_node.unschedulable && !p_node.is_lost() {
        match switchover(status, observed, peer_timeout) {
            Switchover::Blocked(why) => (
                true,
                "SwitchoverBlocked",
                format!(
                    "node {} is cordoned but the primary stays there: {why}; its engine pod is kept by the \
                     PodDisruptionBudget",
                    p_node.name
                ),
            ),
            _ => (
                true,
                "SwitchingOver",
                format!(
                    "node {} is cordoned: the primary is handed over to {}",
                    p_node.name, s_node.name
                ),
            ),
        }
    } else if s_node.unschedulable && !s_node.is_lost() {
        if in_sync(status, observed) {
            (
                true,
                "EvictionAllowed",
                format!(
                    "the engine on cordoned node {} is an in-sync secondary and may be evicted",
                    s_node.name
                ),
            )
        } else {
            (
                true,
                "WaitingForSync",
                format!(
                    "the engine on cordoned node {} is kept until it is an in-sync secondary",
                    s_node.name
                ),
            )
        }
    } else if shown {
        (false, "NoDrain", "no engine node is cordoned".to_string())
    } else {
        return;
    };
    set_condition(
        &mut status.conditions,
        DRAIN_CONDITION,
        active,
        reason,
        &msg,
        generation,
        &now,
    );
}

/// The volume's PodDisruptionBudget: no voluntary disruption of an engine pod labelled
/// `tandem.dev/disruption-allowed: "false"`. In the operator's namespace with the engines; the finalizer
/// deletes it.
pub fn budget(mv: &MirroredVolume, cfg: &plan::EngineConfig) -> PodDisruptionBudget {
    let key = plan::key(mv);
    let selector = BTreeMap::from([
        (VOLUME_LABEL.to_string(), key.clone()),
        (DISRUPTION_LABEL.to_string(), "false".to_string()),
    ]);
    PodDisruptionBudget {
        metadata: ObjectMeta {
            name: Some(plan::names::budget(&key)),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(plan::labels(mv)),
            ..Default::default()
        },
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(0)),
            selector: Some(LabelSelector {
                match_labels: Some(selector),
                match_expressions: None,
            }),
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
#[path = "disruption_tests.rs"]
mod tests;
