//! Failover orchestration as pure decisions: from (spec, status, observed) to what must happen.
//!
//! Rules (see operator/README.md for the scenarios):
//! - **Primary lost** (its node is gone/NotReady, its pod is gone or failed, or it stayed unready longer than
//!   `peerTimeout`) while the secondary is healthy: call `Takeover` on the secondary with the spec's policy.
//!   The engine bumps the epoch; the status follows the engine's answer.
//!   A `HandoffBlocked` answer (old primary unreachable under `WaitForPrimary`) promotes nothing: it is shown
//!   as TakingOver/HandoffBlocked and retried; the attempt ends when the old primary serves again.
//! - **Engines know best**: if an engine reports `Primary` at a higher epoch than the status (the CSI plugin
//!   triggered a takeover), the status adopts it and records the takeover.
//! - **Returning engine**: the slot that is not primary is (re)created with `--role secondary` once its pod is
//!   gone; an old primary that is still alive is left alone (it drains its backlog and serves proxied reads,
//!   then turns secondary by reverse replication).
//! - **Node lost**: engine pods there are force-deleted (the kubelet kills them if the node returns), and
//!   workload pods of the volume stuck there are released only once their writes are fenced: either the node
//!   carries `node.kubernetes.io/out-of-service` (confirmed down), or a takeover happened after the node was
//!   lost and the node does not hold the primary (every session opened before that takeover is refused by
//!   the epoch). Otherwise they stay, with an event saying why: never two writers.

use std::time::Duration;

use tandem_api::{pb::PairState, Reason};

use crate::{
    crd::{
        human_bytes, Condition, EngineReport, EngineRole, EngineStatusRef, FailoverPolicy,
        LostNode, MirroredVolumeSpec, MirroredVolumeStatus, Phase, PromotionWait, ReplicationMode,
        ReplicationStatus, Slot, SyncFallback, TakeoverStatus,
    },
    engine::{EngineState, TakeoverOutcome},
    observed::{Observed, WorkloadPod},
};

/// Why a slot's engine is considered lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    NodeLost,
    PodLost,
    PodUnready,
}

impl Loss {
    /// Event/condition reason for a takeover caused by this loss.
    pub fn reason(self) -> &'static str {
        match self {
            Loss::NodeLost => "PrimaryNodeLost",
            Loss::PodLost => "PrimaryPodLost",
            Loss::PodUnready => "PrimaryUnready",
        }
    }
}

/// The health of one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Pod ready on a ready node.
    Healthy,
    /// No pod yet (or being created); not a loss by itself.
    Absent,
    /// Pod exists but is not ready yet; `Some(d)` = it becomes a loss after `d` more.
    Starting(Option<Duration>),
    Lost(Loss),
}

/// Classifies one slot.
pub fn slot_health(observed: &Observed, slot: Slot, peer_timeout: Duration) -> Health {
    if observed.node(slot).is_lost() {
        return Health::Lost(Loss::NodeLost);
    }
    let Some(pod) = observed.pod(slot) else {
        return Health::Absent;
    };
    if pod.is_gone() {
        return Health::Lost(Loss::PodLost);
    }
    if pod.ready {
        return Health::Healthy;
    }
    match pod.not_ready_since {
        Some(since) => {
            let elapsed = observed.now.duration_since(since).unsigned_abs();
            if elapsed >= peer_timeout {
                Health::Lost(Loss::PodUnready)
            } else {
                Health::Starting(Some(peer_timeout - elapsed))
            }
        }
        None => Health::Starting(None),
    }
}

/// The slot the status names as primary (slot a before the pair was ever established).
pub fn primary_slot(status: &MirroredVolumeStatus) -> Slot {
    status.primary.as_ref().map(|p| p.slot).unwrap_or(Slot::A)
}

/// The pair was established: the operator has seen a primary engine serve.
pub fn established(status: &MirroredVolumeStatus) -> bool {
    status.primary.is_some()
}

/// Adopts the engines' own view: the engine that reports `Primary` at the highest epoch is the primary.
/// Returns the slot whose engine moved the primary (for an event), if it changed.
pub fn adopt_engine_view(status: &mut MirroredVolumeStatus, observed: &Observed) -> Option<Slot> {
    let mut best: Option<(Slot, u64)> = None;
    for slot in Slot::BOTH {
        if let Some(engine) = observed.engine(slot) {
            status.epoch = status.epoch.max(engine.epoch);
            if engine.role == Some(EngineRole::Primary)
                && best.is_none_or(|(_, e)| engine.epoch > e)
            {
                best = Some((slot, engine.epoch));
            }
        }
    }
    let (slot, epoch) = best?;
    if epoch < status.epoch {
        // A stale primary (lower epoch than the other engine knows): not the truth.
        return None;
    }
    let before = status.primary.as_ref().map(|p| p.slot);
    if before == Some(slot) {
        return None;
    }
    // First sight of a primary is not a move; a change of slot is.
    set_primary(status, observed, slot);
    let before = before?;
    // Someone else (the CSI plugin staging on the secondary's node) took over: record it like the operator's
    // own takeover, with what the new primary reports, so progress and losses show and an attempt of ours
    // that was still retrying is over.
    if let Some(e) = observed.engine(slot) {
        let attempts = status
            .takeover
            .as_ref()
            .filter(|t| t.completed_at.is_none())
            .map_or(0, |t| t.attempts);
        status.takeover = Some(TakeoverStatus {
            reason: "PrimaryMoved".to_string(),
            from_node: observed.node(before).name.clone(),
            to_node: observed.node(slot).name.clone(),
            started_at: None,
            completed_at: Some(observed.now.to_string()),
            ready_ms: 0,
            pending_blocks: e.peer_pending_blocks,
            drain_total_blocks: e.peer_pending_blocks,
            proxied_reads: e.proxied_reads,
            lost_blocks: e.lost_blocks,
            lost_seq_from: 0,
            lost_seq_to: 0,
            // Not ours: `release` asks whether a lease of ours may still run.
            fence: None,
            attempts,
            last_error: None,
            last_reason: None,
        });
    }
    Some(slot)
}

/// Ends a takeover attempt of ours that could not finish (e.g. `HandoffBlocked`) once the primary serves
/// again: nothing was promoted and the old primary kept its role, so the volume is no longer taking over.
/// Returns the ended attempt's error for an event.
pub fn abandon_takeover(
    status: &mut MirroredVolumeStatus,
    observed: &Observed,
    peer_timeout: Duration,
) -> Option<String> {
    let primary = primary_slot(status);
    let serving = slot_health(observed, primary, peer_timeout) == Health::Healthy
        && observed
            .engine(primary)
            .is_some_and(|e| e.role == Some(EngineRole::Primary) && e.epoch >= status.epoch);
    let t = status
        .takeover
        .as_mut()
        .filter(|t| t.completed_at.is_none())?;
    if !serving {
        return None;
    }
    let why = format!(
        "abandoned after {} attempt(s): the primary on {} serves again (last error: {})",
        t.attempts,
        observed.node(primary).name,
        t.last_error.as_deref().unwrap_or("none")
    );
    t.completed_at = Some(observed.now.to_string());
    t.last_error = Some(why.clone());
    Some(why)
}

/// Records `slot` as the primary and the other slot as the secondary.
pub fn set_primary(status: &mut MirroredVolumeStatus, observed: &Observed, slot: Slot) {
    status.primary = Some(engine_ref(status, observed, slot, EngineRole::Primary));
    status.secondary = Some(engine_ref(
        status,
        observed,
        slot.other(),
        EngineRole::Secondary,
    ));
}

fn engine_ref(
    status: &MirroredVolumeStatus,
    observed: &Observed,
    slot: Slot,
    role: EngineRole,
) -> EngineStatusRef {
    let node = status
        .nodes
        .get(slot.index())
        .cloned()
        .unwrap_or_else(|| observed.node(slot).name.clone());
    EngineStatusRef {
        slot,
        node,
        pod: String::new(),
        role,
        address: String::new(),
        reachable: observed.engine(slot).is_some(),
        reported: observed.engine(slot).map(report),
    }
}

/// `EngineStatusRef.reported`: the engine's own numbers, for `kubectl tandem`.
fn report(e: &crate::engine::EngineState) -> EngineReport {
    EngineReport {
        epoch: e.epoch,
        pair_state: e.pair_state.label().to_string(),
        takeover_phase: e.takeover_phase.label().to_string(),
        pending_blocks: e.pending_blocks,
        resync_progress: e.resync_progress,
        peer_pending_blocks: e.peer_pending_blocks,
        overlay_blocks: e.overlay_blocks,
    }
}

/// A takeover the operator should start now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakeoverIntent {
    /// The slot that becomes primary.
    pub to: Slot,
    pub reason: &'static str,
    /// Force: promote even when the old primary does not answer (its lease has provably run out).
    /// Otherwise a handoff only: the old primary must answer, be fenced and hand over its table.
    pub force: bool,
    /// How long the engine tries the old primary.
    pub timeout: Duration,
    /// Why it is not forced (yet), when the policy would rather force.
    pub wait: Option<PromotionWait>,
}

impl TakeoverIntent {
    /// The engine policy of the call.
    pub fn policy(&self) -> FailoverPolicy {
        if self.force {
            FailoverPolicy::ForcePromote
        } else {
            FailoverPolicy::WaitForPrimary
        }
    }
}

/// What the failover logic wants before the engine call.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct FailoverDecision {
    pub takeover: Option<TakeoverIntent>,
    /// The primary is lost but no takeover is possible (secondary not healthy): why.
    pub stuck: Option<String>,
    /// Recheck after this long (a primary pod that may still become a loss, a lease to wait out).
    pub recheck: Option<Duration>,
}

/// Whether the spec and the secondary allow promoting it without the old primary's table, and why not.
/// Sync mode with no recorded fallback and a consistent secondary: nothing acknowledged can be missing
/// (the primary acknowledged only what the secondary had, or with our consent, which is recorded first).
pub fn may_force(
    spec: &MirroredVolumeSpec,
    status: &MirroredVolumeStatus,
    secondary: &EngineState,
) -> Result<&'static str, PromotionWait> {
    let leases = spec.failover.lease_ms > 0;
    if leases
        && spec.replication.mode == ReplicationMode::Sync
        && status.sync_fallback.is_none()
        && secondary.pair_state == PairState::Consistent
    {
        return Ok("Sync mode, the secondary holds every acknowledged write");
    }
    match spec.failover.policy {
        FailoverPolicy::WaitForPrimary => Err(PromotionWait {
            reason: "WaitForPrimary".into(),
            message: format!(
                "policy WaitForPrimary never promotes without the old primary's table{}; the takeover \
                 is retried until the old primary answers (set spec.failover.policy to ForcePromote or \
                 MaxLoss to promote and lose its unsent writes)",
                if status.sync_fallback.is_some() {
                    " (Sync ran alone with the operator's consent: writes may be missing)"
                } else {
                    ""
                }
            ),
        }),
        FailoverPolicy::ForcePromote => Ok("policy ForcePromote"),
        FailoverPolicy::MaxLoss => {
            let backlog = secondary
                .peer_backlog_blocks
                .saturating_mul(secondary.block_size.max(1));
            match spec.failover.max_loss() {
                Some(max) if backlog <= max => Ok("policy MaxLoss, backlog within maxLossBytes"),
                max => Err(PromotionWait {
                    reason: "MaxLossExceeded".into(),
                    message: format!(
                        "the secondary's last known backlog is {backlog} bytes ({} blocks), more than \
                         maxLossBytes {}; waiting for the old primary",
                        secondary.peer_backlog_blocks,
                        max.map_or_else(|| "(unset)".to_string(), |m| m.to_string())
                    ),
                }),
            }
        }
    }
}

/// Decides whether to take over. Needs an established pair and a healthy, reachable secondary.
///
/// Safety invariant: a forced promotion is asked for only once no lease the operator granted can still
/// run (`observed.witness`) and the secondary's own promise to the old primary is over; before that only a
/// handoff is tried (the old primary must answer and is fenced by it). Tests:
/// `failover::tests::forced_promotion_waits_out_the_witness_lease`, `tests/failover_engines.rs`.
pub fn decide(
    spec: &MirroredVolumeSpec,
    status: &MirroredVolumeStatus,
    observed: &Observed,
    peer_timeout: Duration,
) -> FailoverDecision {
    let mut decision = FailoverDecision::default();
    if !established(status) {
        return decision;
    }
    let primary = primary_slot(status);
    let loss = match slot_health(observed, primary, peer_timeout) {
        Health::Lost(loss) => loss,
        Health::Starting(Some(left)) => {
            decision.recheck = Some(left);
            return decision;
        }
        // The primary's pod vanished (deleted by someone): that is a pod loss too.
        Health::Absent if observed.engine(primary).is_none() => Loss::PodLost,
        _ => return decision,
    };
    decide_for_loss(spec, status, observed, peer_timeout, loss)
}

/// What to do about a primary lost for `loss`: a handoff, or a forced promotion once the old primary's
/// lease has provably run out (and the policy allows it). Also used when an engine restart on a live node
/// outlasted its grace (`disruption::gate_restart`).
pub fn decide_for_loss(
    spec: &MirroredVolumeSpec,
    status: &MirroredVolumeStatus,
    observed: &Observed,
    peer_timeout: Duration,
    loss: Loss,
) -> FailoverDecision {
    let mut decision = FailoverDecision::default();
    let primary = primary_slot(status);
    let secondary = primary.other();
    let secondary_ok = slot_health(observed, secondary, peer_timeout) == Health::Healthy;
    let Some(engine) = observed.engine(secondary).filter(|_| secondary_ok) else {
        if loss != Loss::PodLost || observed.pod(primary).is_some() {
            decision.stuck = Some(format!(
                "primary engine on {} lost ({}) and the secondary on {} is not ready to take over",
                observed.node(primary).name,
                loss.reason(),
                observed.node(secondary).name
            ));
        }
        return decision;
    };
    let handoff = |wait: PromotionWait, timeout: Duration| TakeoverIntent {
        to: secondary,
        reason: loss.reason(),
        force: false,
        timeout,
        wait: Some(wait),
    };
    decision.takeover = Some(match may_force(spec, status, engine) {
        Err(wait) => handoff(wait, peer_timeout),
        Ok(why) => {
            let witness = observed.witness.wait_left();
            let promise = Duration::from_millis(engine.promise_remaining_ms);
            let left = witness.max(promise);
            if left.is_zero() {
                TakeoverIntent {
                    to: secondary,
                    reason: loss.reason(),
                    force: true,
                    timeout: peer_timeout,
                    wait: None,
                }
            } else {
                // Meanwhile a handoff may still work (the old primary may answer); it must not outlast
                // the wait by much.
                decision.recheck = Some(left.max(Duration::from_millis(200)));
                handoff(
                    PromotionWait {
                        reason: Reason::LeaseHeld.as_str().into(),
                        message: format!(
                            "{why}: promoting by force once the old primary's lease has provably run out: \
                             {} ms left on the operator's clock (its last grant), {} ms on the \
                             secondary's promise",
                            witness.as_millis(),
                            promise.as_millis()
                        ),
                    },
                    peer_timeout.min(left.max(Duration::from_secs(1))),
                )
            }
        }
    });
    // A workload stuck on the lost secondary node cannot be fenced by a handover (the handover target is
    // the lost node): nothing to decide here, `release` reports it.
    decision
}

/// A write-lease grant the operator makes as the pair's witness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantIntent {
    pub slot: Slot,
    pub lease_ms: u32,
    /// Sync mode, the secondary is lost: acknowledge writes without it.
    pub allow_async: bool,
}

/// The witness's part of a pass: the grant to make, and what changed in `status.syncFallback`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct WitnessPlan {
    pub grant: Option<GrantIntent>,
    /// The consent to run Sync alone was recorded now (an event).
    pub fallback_recorded: Option<String>,
    /// The secondary has everything again: the record is dropped (an event).
    pub fallback_ended: Option<String>,
}

/// Decides the lease grant: to a serving primary whose peer does not renew its lease, never to a lost one
/// (a forced promotion of the other engine may be in preparation, and `decide` counts from our last grant).
/// `persisted` is the status as stored: Sync mode runs alone only with a consent that is already recorded
/// there, so a forced promotion can always tell whether it may lose writes.
///
/// Safety invariant: `allow_async` only once `syncFallback` is persisted. Test:
/// `failover::tests::sync_fallback_is_recorded_before_it_is_granted`.
pub fn witness(
    spec: &MirroredVolumeSpec,
    persisted: &MirroredVolumeStatus,
    status: &mut MirroredVolumeStatus,
    observed: &Observed,
    peer_timeout: Duration,
) -> WitnessPlan {
    let mut plan = WitnessPlan::default();
    let lease_ms = spec.failover.lease_ms;
    if lease_ms == 0 || !established(status) {
        return plan;
    }
    let primary = primary_slot(status);
    let secondary = primary.other();
    if matches!(
        slot_health(observed, primary, peer_timeout),
        Health::Lost(_)
    ) {
        return plan;
    }
    let Some(e) = observed
        .engine(primary)
        .filter(|e| e.role == Some(EngineRole::Primary) && e.epoch >= status.epoch)
    else {
        return plan;
    };
    let s_health = slot_health(observed, secondary, peer_timeout);
    let s_lost = matches!(s_health, Health::Lost(_)) || observed.engine(secondary).is_none();
    let sync = spec.replication.mode == ReplicationMode::Sync;
    let node = observed.node(primary).name.clone();
    if sync && s_lost && status.sync_fallback.is_none() {
        let reason = match s_health {
            Health::Lost(loss) => format!(
                "secondary on {} lost ({loss:?})",
                observed.node(secondary).name
            ),
            _ => format!(
                "secondary on {} does not answer",
                observed.node(secondary).name
            ),
        };
        plan.fallback_recorded = Some(format!(
            "{reason}: the primary on {node} may acknowledge writes alone (Sync falls back to Async); \
             a forced promotion of that secondary may lose them"
        ));
        status.sync_fallback = Some(SyncFallback {
            since: observed.now.to_string(),
            node: node.clone(),
            reason,
        });
    } else if status.sync_fallback.is_some() && !s_lost && e.peer_connected && !e.sync_fallback {
        status.sync_fallback = None;
        plan.fallback_ended = Some(format!(
            "the secondary on {} holds every acknowledged write again: Sync",
            observed.node(secondary).name
        ));
    }
    let allow_async = sync && s_lost && persisted.sync_fallback.is_some();
    let renewed_by_peer = e.peer_connected && e.lease_remaining_ms >= u64::from(lease_ms) / 2;
    if !renewed_by_peer || (allow_async && !e.sync_fallback) {
        plan.grant = Some(GrantIntent {
            slot: primary,
            lease_ms,
            allow_async,
        });
    }
    plan
}

/// Updates the status after a successful takeover.
pub fn record_takeover(
    status: &mut MirroredVolumeStatus,
    observed: &Observed,
    intent: &TakeoverIntent,
    outcome: &TakeoverOutcome,
) {
    let from = intent.to.other();
    status.epoch = status.epoch.max(outcome.epoch);
    let started_at = status
        .takeover
        .as_ref()
        .filter(|t| t.completed_at.is_none())
        .and_then(|t| t.started_at.clone())
        .unwrap_or_else(|| observed.now.to_string());
    let attempts = status
        .takeover
        .as_ref()
        .filter(|t| t.completed_at.is_none())
        .map(|t| t.attempts)
        .unwrap_or(0)
        + 1;
    status.takeover = Some(TakeoverStatus {
        reason: intent.reason.to_string(),
        from_node: observed.node(from).name.clone(),
        to_node: observed.node(intent.to).name.clone(),
        started_at: Some(started_at),
        completed_at: Some(observed.now.to_string()),
        ready_ms: outcome.ready_ms,
        pending_blocks: outcome.peer_pending_blocks,
        drain_total_blocks: outcome.peer_pending_blocks,
        proxied_reads: 0,
        lost_blocks: outcome.lost_blocks,
        lost_seq_from: outcome.lost_seq_from,
        lost_seq_to: outcome.lost_seq_to,
        // A forced call was made only after the old primary's lease provably ran out; a handoff call
        // succeeds only when the old primary answered and fenced itself at the new epoch.
        fence: Some(
            if intent.force {
                FENCE_LEASE
            } else {
                FENCE_HANDOFF
            }
            .to_string(),
        ),
        attempts,
        last_error: None,
        last_reason: None,
    });
    status.promotion_wait = None;
    set_primary(status, observed, intent.to);
    if let Some(old) = status.secondary.as_mut() {
        old.role = EngineRole::Fenced;
    }
}

/// Updates the status after a failed takeover attempt (it is retried on the next reconcile).
pub fn record_takeover_failure(
    status: &mut MirroredVolumeStatus,
    observed: &Observed,
    intent: &TakeoverIntent,
    error: &str,
    reason: Option<Reason>,
) {
    let previous = status
        .takeover
        .as_ref()
        .filter(|t| t.completed_at.is_none());
    let started_at = previous
        .and_then(|t| t.started_at.clone())
        .unwrap_or_else(|| observed.now.to_string());
    let attempts = previous.map(|t| t.attempts).unwrap_or(0) + 1;
    status.takeover = Some(TakeoverStatus {
        reason: intent.reason.to_string(),
        from_node: observed.node(intent.to.other()).name.clone(),
        to_node: observed.node(intent.to).name.clone(),
        started_at: Some(started_at),
        completed_at: None,
        attempts,
        last_error: Some(error.to_string()),
        last_reason: reason.map(|r| r.as_str().to_string()),
        ..Default::default()
    });
    status.promotion_wait = intent.wait.clone();
}

/// `status.takeover.fence`: the old primary answered the handoff and is fenced at the new epoch.
pub const FENCE_HANDOFF: &str = "Handoff";
/// `status.takeover.fence`: a forced promotion after the old primary's lease provably ran out.
pub const FENCE_LEASE: &str = "LeaseExpired";

/// Keeps `status.lost_nodes` in step with the engine nodes: adds newly lost ones at the current epoch,
/// drops recovered ones. Returns the nodes newly found lost.
pub fn track_lost_nodes(status: &mut MirroredVolumeStatus, observed: &Observed) -> Vec<String> {
    let mut newly = Vec::new();
    let now = observed.now.to_string();
    for node in &observed.nodes {
        let known = status.lost_nodes.iter().any(|l| l.node == node.name);
        if node.is_lost() && !known {
            status.lost_nodes.push(LostNode {
                node: node.name.clone(),
                epoch: status.epoch,
                since: now.clone(),
                released: false,
            });
            newly.push(node.name.clone());
        }
    }
    status.lost_nodes.retain(|l| {
        observed
            .nodes
            .iter()
            .any(|n| n.name == l.node && n.is_lost())
    });
    newly
}

/// Release plan for workload pods stuck on lost nodes.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ReleasePlan {
    /// Workload pods to force-delete.
    pub pods: Vec<WorkloadPod>,
    /// VolumeAttachments to delete.
    pub attachments: Vec<String>,
    /// Nodes whose workloads stay because their writes are not fenced, with the reason.
    pub blocked: Vec<(String, String)>,
    /// Nodes released now (to mark in status).
    pub released_nodes: Vec<String>,
    /// Why each released node's writers are fenced: (node, why).
    pub fences: Vec<(String, String)>,
}

/// Decides which stuck workloads may be released (never two writers, see the module docs).
///
/// Safety invariant: a workload on a lost node is released only when nothing it wrote through can still
/// be acknowledged: the node is confirmed down (`out-of-service`), or a takeover after the loss moved the
/// primary off the node and the old primary is fenced (it answered the handoff) or its lease has provably
/// run out (no lease the operator granted can still run; a forced promotion waited out the secondary's
/// promise). Test: `failover::tests::release_needs_a_fence`.
pub fn release(
    spec: &MirroredVolumeSpec,
    status: &MirroredVolumeStatus,
    observed: &Observed,
) -> ReleasePlan {
    let mut plan = ReleasePlan::default();
    if !spec.failover.release_workloads {
        return plan;
    }
    let primary_node = status.primary.as_ref().map(|p| p.node.clone());
    let fence = status
        .takeover
        .as_ref()
        .filter(|t| t.completed_at.is_some())
        .and_then(|t| t.fence.as_deref());
    let leases = spec.failover.lease_ms > 0;
    for lost in &status.lost_nodes {
        let node = observed.nodes.iter().find(|n| n.name == lost.node);
        let out_of_service = node.is_some_and(|n| n.out_of_service);
        let moved =
            status.epoch > lost.epoch && primary_node.as_deref() != Some(lost.node.as_str());
        let fenced = match fence {
            _ if !moved => None,
            Some(FENCE_HANDOFF) => Some("the old primary answered the handoff and is fenced"),
            // A takeover the operator forced, or one it did not make (the CSI plugin's): the engine waited
            // out its own promise, and no grant of ours can still run.
            _ if leases && observed.witness.wait_left().is_zero() => Some(
                "the old primary's lease has provably run out (no renewal by its peer or the operator)",
            ),
            _ => None,
        };
        let pods: Vec<WorkloadPod> = observed
            .workloads
            .iter()
            .filter(|w| w.node == lost.node)
            .cloned()
            .collect();
        let attachments: Vec<String> = observed
            .attachments
            .iter()
            .filter(|(_, n)| *n == lost.node)
            .map(|(name, _)| name.clone())
            .collect();
        if pods.is_empty() && attachments.is_empty() {
            continue;
        }
        let why = if out_of_service {
            Some(format!(
                "the node carries {}",
                crate::observed::OUT_OF_SERVICE_TAINT
            ))
        } else {
            fenced.map(str::to_string)
        };
        if let Some(why) = why {
            plan.pods.extend(pods);
            plan.attachments.extend(attachments);
            plan.released_nodes.push(lost.node.clone());
            plan.fences.push((lost.node.clone(), why));
        } else {
            let why = if primary_node.as_deref() == Some(lost.node.as_str()) {
                "the node holds the primary and no takeover has fenced it yet".to_string()
            } else if moved {
                format!(
                    "the old primary there may still hold a write lease ({} ms left); confirm the node is \
                     down with the {} taint to release at once",
                    observed.witness.wait_left().as_millis(),
                    crate::observed::OUT_OF_SERVICE_TAINT
                )
            } else {
                format!(
                    "writers there may still reach the primary; confirm the node is down with the {} taint",
                    crate::observed::OUT_OF_SERVICE_TAINT
                )
            };
            plan.blocked.push((lost.node.clone(), why));
        }
    }
    plan
}

/// A change to an engine pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodDeletion {
    pub slot: Slot,
    pub name: String,
    /// Grace period 0: the node is lost, the pod object must go now (the kubelet kills it on return).
    pub force: bool,
    pub reason: &'static str,
}

/// Engine pods to delete so they are recreated with the right role: the non-primary slot's pod once it is
/// lost, and the primary slot's pod when it failed and no takeover could replace it.
pub fn pod_deletions(
    status: &MirroredVolumeStatus,
    observed: &Observed,
    peer_timeout: Duration,
) -> Vec<PodDeletion> {
    let mut out = Vec::new();
    let primary = primary_slot(status);
    for slot in Slot::BOTH {
        let Some(pod) = observed.pod(slot) else {
            continue;
        };
        let node_lost = observed.node(slot).is_lost();
        match slot_health(observed, slot, peer_timeout) {
            Health::Lost(Loss::NodeLost) => {
                // Fence: remove the pod object so the kubelet kills the engine if the node comes back.
                // A pod already deleted gracefully is forced too: its node will never confirm.
                out.push(PodDeletion {
                    slot,
                    name: pod.name.clone(),
                    force: true,
                    reason: "EngineNodeLost",
                });
            }
            Health::Lost(Loss::PodLost) if !pod.deleting => out.push(PodDeletion {
                slot,
                name: pod.name.clone(),
                force: false,
                reason: "EnginePodFailed",
            }),
            // An unready old primary: restart it as secondary (an unready secondary is the kubelet's job).
            Health::Lost(Loss::PodUnready)
                if slot != primary
                    && !node_lost
                    && !pod.deleting
                    && pod.role != Some(EngineRole::Secondary) =>
            {
                out.push(PodDeletion {
                    slot,
                    name: pod.name.clone(),
                    force: false,
                    reason: "RestartAsSecondary",
                });
            }
            _ => {}
        }
    }
    out
}

/// Fills phase, replication, conditions and engine refs from what was observed.
pub fn summarize(
    status: &mut MirroredVolumeStatus,
    observed: &Observed,
    generation: Option<i64>,
    peer_timeout: Duration,
    names: &dyn Fn(Slot) -> (String, String),
    invalid: Option<&str>,
) {
    status.observed_generation = generation;
    let now = observed.now.to_string();
    let primary = primary_slot(status);
    let secondary = primary.other();
    let p_health = slot_health(observed, primary, peer_timeout);
    let s_health = slot_health(observed, secondary, peer_timeout);
    let p_engine = observed.engine(primary);
    let s_engine = observed.engine(secondary);

    for slot in Slot::BOTH {
        let (pod, address) = names(slot);
        let engine_ref = if slot == primary {
            &mut status.primary
        } else {
            &mut status.secondary
        };
        if let Some(r) = engine_ref.as_mut() {
            r.pod = pod;
            r.address = address;
            r.reachable = observed.engine(slot).is_some();
            r.reported = observed.engine(slot).map(report);
            if let Some(e) = observed.engine(slot) {
                if let Some(role) = e.role {
                    r.role = role;
                }
            }
        }
    }

    if let Some(e) = p_engine {
        status.replication = Some(ReplicationStatus {
            pending_blocks: e.pending_blocks,
            pending_bytes: e.pending_bytes,
            lag_seconds: e.lag_seconds,
            lag: if e.pending_bytes == 0 {
                "0B".to_string()
            } else {
                format!("{}/{:.1}s", human_bytes(e.pending_bytes), e.lag_seconds)
            },
            resync_progress: e.resync_progress,
            peer_connected: e.peer_connected,
        });
        if let Some(t) = status.takeover.as_mut() {
            if t.completed_at.is_some() {
                t.pending_blocks = e.peer_pending_blocks;
                t.proxied_reads = t.proxied_reads.max(e.proxied_reads);
            }
        }
    }

    let primary_serving = p_engine.is_some_and(|e| e.role == Some(EngineRole::Primary));
    let takeover_running = status
        .takeover
        .as_ref()
        .is_some_and(|t| t.completed_at.is_none())
        || p_engine.is_some_and(|e| e.takeover_phase.in_progress());
    let reversing = p_engine.is_some_and(|e| e.pair_state == PairState::Reversing);
    let both_up = p_health == Health::Healthy && s_health == Health::Healthy;
    let synced = both_up
        && primary_serving
        && s_engine.is_some()
        && p_engine.is_some_and(|e| e.peer_connected && is_synced(e.pair_state, e.pending_blocks));
    let one_lost = matches!(p_health, Health::Lost(_)) || matches!(s_health, Health::Lost(_));
    // An established pair whose secondary is not there or does not answer runs on one copy.
    let copy_missing = established(status) && (s_health == Health::Absent || s_engine.is_none());

    let phase = if invalid.is_some() {
        Phase::Failed
    } else if takeover_running {
        Phase::TakingOver
    } else if !established(status) {
        Phase::Creating
    } else if matches!(p_health, Health::Lost(_)) && matches!(s_health, Health::Lost(_)) {
        Phase::Failed
    } else if one_lost || copy_missing {
        Phase::Degraded
    } else if reversing {
        Phase::Reversing
    } else if synced {
        Phase::Synced
    } else {
        Phase::Syncing
    };
    status.phase = phase;

    let gen = generation;
    let (ready, ready_reason, ready_msg) = if let Some(msg) = invalid {
        (false, "InvalidSpec", msg.to_string())
    } else if primary_serving {
        (
            true,
            "PrimaryServing",
            format!(
                "primary engine on {} serves at epoch {}",
                observed.node(primary).name,
                status.epoch
            ),
        )
    } else if established(status) {
        (
            false,
            "PrimaryUnavailable",
            "the primary engine does not answer".to_string(),
        )
    } else {
        (
            false,
            "Creating",
            "waiting for the engines to start".to_string(),
        )
    };
    set_condition(
        &mut status.conditions,
        "Ready",
        ready,
        ready_reason,
        &ready_msg,
        gen,
        &now,
    );
    let (s_reason, s_msg) = if synced {
        (
            "InSync",
            status
                .replication
                .as_ref()
                .filter(|r| r.pending_bytes > 0)
                .map(|r| {
                    format!(
                        "streaming; {} not yet on the secondary",
                        human_bytes(r.pending_bytes)
                    )
                })
                .unwrap_or_else(|| "the secondary holds every acknowledged write".to_string()),
        )
    } else if reversing {
        (
            "Reversing",
            "reverse replication to the old primary".to_string(),
        )
    } else {
        (
            "NotInSync",
            status
                .replication
                .as_ref()
                .map(|r| format!("{} pending", human_bytes(r.pending_bytes)))
                .unwrap_or_else(|| "no replication state yet".to_string()),
        )
    };
    set_condition(
        &mut status.conditions,
        "Synced",
        synced,
        s_reason,
        &s_msg,
        gen,
        &now,
    );
    // Degraded says whether the volume runs with less than two good copies, whatever the phase: a takeover
    // from a lost primary is degraded too, and so is a primary whose proxied reads fail.
    let engine_degraded = p_engine
        .filter(|e| e.condition_reason == Some(Reason::Degraded))
        .map(|e| e.condition.as_str());
    let engine_lost = matches!(phase, Phase::Degraded | Phase::Failed) || one_lost || copy_missing;
    let (degraded, d_reason, d_msg) = if engine_lost {
        let mut msg = format!(
            "primary on {}: {:?}; secondary on {}: {:?}",
            observed.node(primary).name,
            p_health,
            observed.node(secondary).name,
            s_health
        );
        if let Some(c) = engine_degraded {
            msg.push_str("; engine: ");
            msg.push_str(c);
        }
        (true, "EngineLost", msg)
    } else if let Some(c) = engine_degraded {
        (true, "EngineDegraded", c.to_string())
    } else {
        (false, "PairHealthy", "both engines are up".to_string())
    };
    set_condition(
        &mut status.conditions,
        "Degraded",
        degraded,
        d_reason,
        &d_msg,
        gen,
        &now,
    );
    let t_msg = status
        .takeover
        .as_ref()
        .map(|t| match (&t.completed_at, &t.last_error) {
            (None, Some(err)) => format!(
                "attempt {} from {} to {}: {err}",
                t.attempts, t.from_node, t.to_node
            ),
            (Some(_), Some(err)) => format!("{} -> {}: {err}", t.from_node, t.to_node),
            _ => format!(
                "{} -> {}: {} blocks pending from the old primary",
                t.from_node, t.to_node, t.pending_blocks
            ),
        })
        .unwrap_or_else(|| "no takeover".to_string());
    // Why a promotion waits comes first: the lease, the loss bound; under WaitForPrimary the engine's own
    // HandoffBlocked says it best, with the policy's reason added.
    let waiting = status.promotion_wait.as_ref().filter(|_| takeover_running);
    let t_msg = match waiting {
        Some(w) => format!("{}; {t_msg}", w.message),
        None => t_msg,
    };
    let t_reason = match waiting {
        Some(w) if w.reason != "WaitForPrimary" => w.reason.as_str(),
        _ if takeover_blocked(status) => Reason::HandoffBlocked.as_str(),
        _ if takeover_running => "TakingOver",
        _ => "Idle",
    };
    set_condition(
        &mut status.conditions,
        "TakeoverInProgress",
        takeover_running,
        t_reason,
        &t_msg,
        gen,
        &now,
    );
}

/// The last takeover attempt was refused by the secondary because the old primary cannot be reached under
/// `WaitForPrimary`: nothing was promoted, and the attempt is retried until the primary answers (or the
/// policy becomes `ForcePromote`).
pub fn takeover_blocked(status: &MirroredVolumeStatus) -> bool {
    status.takeover.as_ref().is_some_and(|t| {
        t.completed_at.is_none()
            && t.last_reason.as_deref().and_then(Reason::from_name) == Some(Reason::HandoffBlocked)
    })
}

/// The primary's pair state means "the secondary is a consistent, streaming mirror": `Synced`, or
/// `Replicating` (async lag, shown in the Lag column). `Connecting`, `Resyncing` and `Standalone` are not;
/// an engine that does not report it is judged by its backlog.
fn is_synced(pair_state: PairState, pending_blocks: u64) -> bool {
    match pair_state {
        PairState::Unspecified => pending_blocks == 0,
        p => p == PairState::Synced || p == PairState::Replicating,
    }
}

/// Sets a condition, keeping `lastTransitionTime` when the status did not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &str,
) {
    let status = if value { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.to_string();
            }
            c.status = status.to_string();
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            observed_generation: generation,
            last_transition_time: now.to_string(),
            reason: reason.to_string(),
            message: message.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        crd::{FailoverPolicy, MirroredVolume},
        engine::EngineState,
        fixtures::engine_state,
        observed::{NodeObs, PodObs, PvObs},
        witness::LeaseClock,
    };
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    use tandem_api::pb::TakeoverPhase;

    const T: Duration = Duration::from_secs(30);

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn node(name: &str, ready: bool) -> NodeObs {
        NodeObs {
            name: name.into(),
            exists: true,
            ready,
            out_of_service: false,
            labeled: true,
            not_ready_since: None,
            unschedulable: false,
        }
    }

    fn pod(slot: Slot, role: EngineRole, ready: bool, unready_for: i64) -> PodObs {
        PodObs {
            name: format!("data-engine-{}", slot.as_str()),
            node: Some(if slot == Slot::A { "n1" } else { "n2" }.into()),
            phase: "Running".into(),
            ready,
            not_ready_since: (!ready).then(|| {
                now()
                    .checked_sub(SignedDuration::from_secs(unready_for))
                    .unwrap()
            }),
            deleting: false,
            role: Some(role),
            disruption_allowed: None,
        }
    }

    /// Both engines up: a primary on n1, a secondary on n2.
    fn healthy() -> Observed {
        Observed {
            now: now(),
            nodes: [node("n1", true), node("n2", true)],
            pods: [
                Some(pod(Slot::A, EngineRole::Primary, true, 0)),
                Some(pod(Slot::B, EngineRole::Secondary, true, 0)),
            ],
            engines: [
                Some(engine_state(EngineRole::Primary, 1, PairState::Synced)),
                Some(engine_state(
                    EngineRole::Secondary,
                    1,
                    PairState::Unspecified,
                )),
            ],
            secret_exists: true,
            token: None,
            pv: Some(PvObs::default()),
            claim_exists: false,
            engine_pvcs: [false, false],
            workloads: vec![],
            attachments: vec![],
            witness: crate::witness::LeaseClock::long_ago(10_000),
            certs: Default::default(),
            conflict: None,
            moving: Default::default(),
        }
    }

    fn established(primary: Slot, epoch: u64) -> MirroredVolumeStatus {
        let mut status = MirroredVolumeStatus {
            epoch,
            nodes: vec!["n1".into(), "n2".into()],
            ..Default::default()
        };
        set_primary(&mut status, &healthy(), primary);
        status
    }

    #[test]
    fn health_of_slots() {
        let mut o = healthy();
        assert_eq!(slot_health(&o, Slot::A, T), Health::Healthy);
        o.pods[0] = Some(pod(Slot::A, EngineRole::Primary, false, 10));
        assert_eq!(
            slot_health(&o, Slot::A, T),
            Health::Starting(Some(Duration::from_secs(20)))
        );
        o.pods[0] = Some(pod(Slot::A, EngineRole::Primary, false, 31));
        assert_eq!(slot_health(&o, Slot::A, T), Health::Lost(Loss::PodUnready));
        o.pods[0].as_mut().unwrap().phase = "Failed".into();
        assert_eq!(slot_health(&o, Slot::A, T), Health::Lost(Loss::PodLost));
        o.pods[0] = None;
        assert_eq!(slot_health(&o, Slot::A, T), Health::Absent);
        o.nodes[0].ready = false;
        assert_eq!(slot_health(&o, Slot::A, T), Health::Lost(Loss::NodeLost));
        o.nodes[1] = NodeObs::missing("n2");
        assert_eq!(slot_health(&o, Slot::B, T), Health::Lost(Loss::NodeLost));
    }

    #[test]
    fn no_takeover_before_the_pair_is_established() {
        let mut o = healthy();
        o.pods[0] = None;
        o.engines[0] = None;
        assert_eq!(
            decide(
                &MirroredVolume::test().spec,
                &MirroredVolumeStatus::default(),
                &o,
                T
            ),
            FailoverDecision::default()
        );
    }

    #[test]
    fn healthy_pair_needs_nothing() {
        assert_eq!(
            decide(
                &MirroredVolume::test().spec,
                &established(Slot::A, 1),
                &healthy(),
                T
            ),
            FailoverDecision::default()
        );
    }

    #[test]
    fn primary_losses_take_over_to_the_secondary() {
        let status = established(Slot::A, 1);
        type Breakage = Box<dyn Fn(&mut Observed)>;
        let cases: Vec<(&str, Breakage)> = vec![
            ("PrimaryNodeLost", Box::new(|o| o.nodes[0].ready = false)),
            (
                "PrimaryPodLost",
                Box::new(|o| o.pods[0].as_mut().unwrap().deleting = true),
            ),
            (
                "PrimaryPodLost",
                Box::new(|o| {
                    o.pods[0] = None;
                    o.engines[0] = None;
                }),
            ),
            (
                "PrimaryUnready",
                Box::new(|o| o.pods[0] = Some(pod(Slot::A, EngineRole::Primary, false, 45))),
            ),
        ];
        for (reason, breakage) in cases {
            let mut o = healthy();
            breakage(&mut o);
            let d = decide(&MirroredVolume::test().spec, &status, &o, T);
            let t = d.takeover.unwrap();
            assert_eq!(
                (t.to, t.reason, t.force),
                (Slot::B, reason, false),
                "{reason}"
            );
            assert_eq!(t.wait.unwrap().reason, "WaitForPrimary");
        }
        // The other way round after a first takeover.
        let mut o = healthy();
        o.nodes[1].ready = false;
        let d = decide(
            &MirroredVolume::test().spec,
            &established(Slot::B, 2),
            &o,
            T,
        );
        assert_eq!(d.takeover.map(|t| t.to), Some(Slot::A));
    }

    #[test]
    fn unready_primary_within_timeout_is_rechecked_not_replaced() {
        let mut o = healthy();
        o.pods[0] = Some(pod(Slot::A, EngineRole::Primary, false, 5));
        let d = decide(
            &MirroredVolume::test().spec,
            &established(Slot::A, 1),
            &o,
            T,
        );
        assert_eq!(d.takeover, None);
        assert_eq!(d.recheck, Some(Duration::from_secs(25)));
    }

    #[test]
    fn no_takeover_to_an_unhealthy_or_silent_secondary() {
        let status = established(Slot::A, 1);
        let mut o = healthy();
        o.nodes[0].ready = false;
        o.pods[1] = Some(pod(Slot::B, EngineRole::Secondary, false, 100));
        let d = decide(&MirroredVolume::test().spec, &status, &o, T);
        assert_eq!(d.takeover, None);
        assert!(d.stuck.unwrap().contains("n2"));
        let mut o = healthy();
        o.nodes[0].ready = false;
        o.engines[1] = None;
        assert_eq!(
            decide(&MirroredVolume::test().spec, &status, &o, T).takeover,
            None
        );
    }

    #[test]
    fn engines_that_moved_the_primary_are_adopted() {
        // The CSI plugin promoted slot b at epoch 2.
        let mut status = established(Slot::A, 1);
        let mut o = healthy();
        o.engines = [
            Some(engine_state(EngineRole::Fenced, 2, PairState::Unspecified)),
            Some(engine_state(EngineRole::Primary, 2, PairState::Reversing)),
        ];
        assert_eq!(adopt_engine_view(&mut status, &o), Some(Slot::B));
        assert_eq!(primary_slot(&status), Slot::B);
        assert_eq!(status.epoch, 2);
        // Seen again: no move.
        assert_eq!(adopt_engine_view(&mut status, &o), None);
    }

    #[test]
    fn a_stale_primary_is_not_adopted() {
        let mut status = established(Slot::B, 3);
        let mut o = healthy();
        // Slot a restarted from old meta and still claims primary at epoch 2; slot b is primary at 3.
        o.engines = [
            Some(engine_state(EngineRole::Primary, 2, PairState::Unspecified)),
            Some(engine_state(EngineRole::Primary, 3, PairState::Synced)),
        ];
        assert_eq!(adopt_engine_view(&mut status, &o), None);
        assert_eq!(primary_slot(&status), Slot::B);
        // Only slot a answers, with its stale claim: still not adopted.
        o.engines[1] = None;
        assert_eq!(adopt_engine_view(&mut status, &o), None);
        assert_eq!(primary_slot(&status), Slot::B);
    }

    #[test]
    fn first_primary_sighting_establishes_without_a_move_event() {
        let mut status = MirroredVolumeStatus::default();
        assert_eq!(adopt_engine_view(&mut status, &healthy()), None);
        assert!(established(Slot::A, 1).primary.is_some());
        assert_eq!(primary_slot(&status), Slot::A);
        assert_eq!(
            status.secondary.as_ref().map(|s| s.node.as_str()),
            Some("n2")
        );
    }

    #[test]
    fn takeover_outcome_bumps_epoch_and_swaps_roles() {
        let mut status = established(Slot::A, 4);
        let o = healthy();
        let intent = TakeoverIntent {
            to: Slot::B,
            reason: "PrimaryNodeLost",
            force: false,
            timeout: T,
            wait: None,
        };
        record_takeover_failure(&mut status, &o, &intent, "peer unreachable", None);
        record_takeover_failure(&mut status, &o, &intent, "peer unreachable", None);
        assert_eq!(status.takeover.as_ref().unwrap().attempts, 2);
        assert_eq!(primary_slot(&status), Slot::A);
        let outcome = TakeoverOutcome {
            epoch: 5,
            ready_ms: 3,
            lost_blocks: 0,
            ..Default::default()
        };
        record_takeover(&mut status, &o, &intent, &outcome);
        let t = status.takeover.as_ref().unwrap();
        assert_eq!(
            (t.attempts, t.from_node.as_str(), t.to_node.as_str()),
            (3, "n1", "n2")
        );
        assert!(t.completed_at.is_some() && t.last_error.is_none());
        assert_eq!(status.epoch, 5);
        assert_eq!(primary_slot(&status), Slot::B);
        assert_eq!(status.secondary.as_ref().unwrap().role, EngineRole::Fenced);
    }

    fn spec(mode: ReplicationMode, policy: FailoverPolicy) -> MirroredVolumeSpec {
        let mut spec = MirroredVolume::test().spec;
        spec.replication.mode = mode;
        spec.failover.policy = policy;
        spec.failover.lease_ms = 1000;
        spec
    }

    /// The primary's node is lost; the secondary is a consistent copy that knows of 3 unsent blocks.
    fn primary_node_lost() -> Observed {
        let mut o = healthy();
        o.nodes[0].ready = false;
        o.engines[0] = None;
        o.engines[1] = Some(EngineState {
            peer_backlog_blocks: 3,
            ..engine_state(EngineRole::Secondary, 1, PairState::Consistent)
        });
        o
    }

    fn intent(
        spec: &MirroredVolumeSpec,
        status: &MirroredVolumeStatus,
        o: &Observed,
    ) -> TakeoverIntent {
        decide(spec, status, o, T).takeover.unwrap()
    }

    #[test]
    fn forced_promotion_waits_out_the_witness_lease() {
        let spec = spec(ReplicationMode::Async, FailoverPolicy::ForcePromote);
        let status = established(Slot::A, 1);
        let mut o = primary_node_lost();
        // Granted (or started: a fresh operator counts its start as a grant) 0.5 s ago: 1100 ms of the
        // 1600 ms guard left.
        o.witness = LeaseClock {
            lease_ms: 1000,
            since_grant: Duration::from_millis(500),
        };
        let d = decide(&spec, &status, &o, T);
        let t = d.takeover.clone().unwrap();
        assert!(!t.force, "only a handoff before the lease ran out: {t:?}");
        assert_eq!(t.policy(), FailoverPolicy::WaitForPrimary);
        assert_eq!(
            t.timeout,
            Duration::from_millis(1100),
            "bounded by the wait"
        );
        let wait = t.wait.unwrap();
        assert_eq!(wait.reason, "LeaseHeld");
        assert!(wait.message.contains("1100 ms left"), "{}", wait.message);
        assert_eq!(d.recheck, Some(Duration::from_millis(1100)));
        // The operator's wait is over, the secondary's promise is not.
        o.witness.since_grant = Duration::from_secs(3);
        o.engines[1].as_mut().unwrap().promise_remaining_ms = 700;
        let d = decide(&spec, &status, &o, T);
        assert!(!d.takeover.unwrap().force);
        assert_eq!(d.recheck, Some(Duration::from_millis(700)));
        // Both over: forced.
        o.engines[1].as_mut().unwrap().promise_remaining_ms = 0;
        let t = intent(&spec, &status, &o);
        assert_eq!((t.force, t.timeout, &t.wait), (true, T, &None));
        assert_eq!(t.policy(), FailoverPolicy::ForcePromote);
    }

    #[test]
    fn sync_in_sync_is_forced_whatever_the_policy_until_a_fallback_was_consented() {
        let mut status = established(Slot::A, 1);
        let o = primary_node_lost();
        for policy in [
            FailoverPolicy::WaitForPrimary,
            FailoverPolicy::ForcePromote,
            FailoverPolicy::MaxLoss,
        ] {
            let spec = spec(ReplicationMode::Sync, policy);
            let t = intent(&spec, &status, &o);
            assert!(t.force && t.wait.is_none(), "{policy:?}: {t:?}");
        }
        // A secondary that is not a consistent copy is judged by the policy.
        let spec_wait = spec(ReplicationMode::Sync, FailoverPolicy::WaitForPrimary);
        let mut inconsistent = o.clone();
        inconsistent.engines[1].as_mut().unwrap().pair_state = PairState::Inconsistent;
        assert!(!intent(&spec_wait, &status, &inconsistent).force);
        // Leases off: the engine may fall back alone, so Sync proves nothing.
        let mut no_leases = spec_wait.clone();
        no_leases.failover.lease_ms = 0;
        assert!(!intent(&no_leases, &status, &o).force);
        // After the operator consented to Sync running alone: the policy decides.
        status.sync_fallback = Some(SyncFallback::default());
        let t = intent(&spec_wait, &status, &o);
        assert!(!t.force);
        let wait = t.wait.unwrap();
        assert_eq!(wait.reason, "WaitForPrimary");
        assert!(
            wait.message.contains("operator's consent"),
            "{}",
            wait.message
        );
        assert!(
            intent(
                &spec(ReplicationMode::Sync, FailoverPolicy::ForcePromote),
                &status,
                &o
            )
            .force
        );
    }

    #[test]
    fn async_policies_wait_force_or_bound_the_loss() {
        let status = established(Slot::A, 1);
        let o = primary_node_lost();
        // WaitForPrimary never forces, however long the primary is away.
        let t = intent(
            &spec(ReplicationMode::Async, FailoverPolicy::WaitForPrimary),
            &status,
            &o,
        );
        assert!(!t.force);
        assert_eq!(t.wait.unwrap().reason, "WaitForPrimary");
        assert!(
            intent(
                &spec(ReplicationMode::Async, FailoverPolicy::ForcePromote),
                &status,
                &o
            )
            .force
        );
        // MaxLoss: 3 blocks of 4 KiB = 12288 bytes known unsent.
        let mut max_loss = spec(ReplicationMode::Async, FailoverPolicy::MaxLoss);
        max_loss.failover.max_loss_bytes = Some("12Ki".into());
        assert!(intent(&max_loss, &status, &o).force, "at the bound");
        max_loss.failover.max_loss_bytes = Some("8Ki".into());
        let t = intent(&max_loss, &status, &o);
        assert!(!t.force);
        let wait = t.wait.clone().unwrap();
        assert_eq!(wait.reason, "MaxLossExceeded");
        assert!(
            wait.message.contains("12288 bytes") && wait.message.contains("8192"),
            "{}",
            wait.message
        );
        // The condition says why.
        let mut status = status;
        record_takeover_failure(
            &mut status,
            &o,
            &t,
            "HandoffBlocked: PeerUnreachable: x",
            Some(Reason::HandoffBlocked),
        );
        summarized(&mut status, &o);
        let c = cond(&status, "TakeoverInProgress");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "MaxLossExceeded")
        );
        assert!(c.message.contains("12288 bytes"), "{}", c.message);
    }

    #[test]
    fn sync_fallback_is_recorded_before_it_is_granted() {
        let spec = spec(ReplicationMode::Sync, FailoverPolicy::WaitForPrimary);
        let persisted = established(Slot::A, 1);
        // A healthy pair: the peer renews the lease, nothing to grant.
        let mut status = persisted.clone();
        assert_eq!(
            witness(&spec, &persisted, &mut status, &healthy(), T),
            WitnessPlan::default()
        );
        // The peer stopped renewing (the link is down) but the secondary answers: a lease, no consent.
        let mut o = healthy();
        o.engines[0].as_mut().unwrap().peer_connected = false;
        let w = witness(&spec, &persisted, &mut status, &o, T);
        assert_eq!(
            w.grant,
            Some(GrantIntent {
                slot: Slot::A,
                lease_ms: 1000,
                allow_async: false
            })
        );
        assert!(status.sync_fallback.is_none());
        // The secondary's node is lost: the consent is recorded first, and granted only once stored.
        o.nodes[1].ready = false;
        o.engines[1] = None;
        let w = witness(&spec, &persisted, &mut status, &o, T);
        assert!(!w.grant.unwrap().allow_async);
        assert!(w.fallback_recorded.unwrap().contains("lost"));
        let stored = status.clone();
        assert_eq!(stored.sync_fallback.as_ref().unwrap().node, "n1");
        let w = witness(&spec, &stored, &mut status, &o, T);
        assert!(w.grant.unwrap().allow_async);
        assert!(w.fallback_recorded.is_none());
        // Async mode never consents (nothing to consent to).
        let mut plain = persisted.clone();
        let w = witness(&spec_async(), &stored, &mut plain, &o, T);
        assert!(!w.grant.unwrap().allow_async);
        // A lost primary gets nothing: its promotion may be prepared.
        let mut lost = status.clone();
        assert_eq!(
            witness(&spec, &stored, &mut lost, &primary_node_lost(), T).grant,
            None
        );
        // The secondary is back and has everything: the record goes.
        let w = witness(&spec, &stored, &mut status, &healthy(), T);
        assert!(w.fallback_ended.is_some() && status.sync_fallback.is_none());
        // Leases off: no witness.
        let mut off = spec.clone();
        off.failover.lease_ms = 0;
        assert_eq!(
            witness(&off, &stored, &mut status, &o, T),
            WitnessPlan::default()
        );
    }

    fn spec_async() -> MirroredVolumeSpec {
        spec(ReplicationMode::Async, FailoverPolicy::WaitForPrimary)
    }

    #[test]
    fn lost_nodes_are_tracked_at_their_epoch_and_forgotten_on_return() {
        let mut status = established(Slot::A, 7);
        let mut o = healthy();
        o.nodes[1].ready = false;
        assert_eq!(track_lost_nodes(&mut status, &o), vec!["n2".to_string()]);
        assert_eq!(status.lost_nodes[0].epoch, 7);
        status.epoch = 8;
        assert!(track_lost_nodes(&mut status, &o).is_empty());
        assert_eq!(status.lost_nodes[0].epoch, 7, "first sighting wins");
        o.nodes[1].ready = true;
        track_lost_nodes(&mut status, &o);
        assert!(status.lost_nodes.is_empty());
    }

    fn with_workload(node: &str) -> Observed {
        let mut o = healthy();
        let i = if node == "n1" { 0 } else { 1 };
        o.nodes[i].ready = false;
        o.workloads = vec![WorkloadPod {
            namespace: "default".into(),
            name: "app-0".into(),
            node: node.into(),
            ..Default::default()
        }];
        o.attachments = vec![("va-1".into(), node.into())];
        o
    }

    #[test]
    fn release_needs_a_fence() {
        let spec = MirroredVolume::test().spec;
        // Primary's node lost, takeover done since: released, with its attachment.
        let o = with_workload("n1");
        let mut status = established(Slot::A, 1);
        track_lost_nodes(&mut status, &o);
        let blocked = release(&spec, &status, &o);
        assert!(
            blocked.pods.is_empty() && blocked.blocked.len() == 1,
            "no takeover yet: {blocked:?}"
        );
        assert!(blocked.blocked[0].1.contains("holds the primary"));
        status.epoch = 2;
        set_primary(&mut status, &o, Slot::B);
        // The primary moved, but not by a handoff, and a lease we granted may still run: not yet.
        let mut waiting = o.clone();
        waiting.witness = LeaseClock {
            lease_ms: 10_000,
            since_grant: Duration::from_secs(5),
        };
        let plan = release(&spec, &status, &waiting);
        assert!(plan.pods.is_empty(), "{plan:?}");
        assert!(plan.blocked[0].1.contains("write lease"), "{plan:?}");
        // A handoff fenced it: released at once.
        status.takeover = Some(TakeoverStatus {
            completed_at: Some("t".into()),
            fence: Some(FENCE_HANDOFF.into()),
            ..Default::default()
        });
        let plan = release(&spec, &status, &waiting);
        assert_eq!(plan.pods.len(), 1);
        assert!(plan.fences[0].1.contains("handoff"), "{plan:?}");
        // Its lease provably ran out: released.
        status.takeover = None;
        let plan = release(&spec, &status, &o);
        assert_eq!(plan.pods.len(), 1);
        assert_eq!(plan.attachments, vec!["va-1".to_string()]);
        assert_eq!(plan.released_nodes, vec!["n1".to_string()]);
        assert!(plan.fences[0].1.contains("lease"), "{plan:?}");

        // Secondary's node lost: its writers may still reach the primary, so nothing moves...
        let mut o = with_workload("n2");
        let mut status = established(Slot::A, 1);
        track_lost_nodes(&mut status, &o);
        let plan = release(&spec, &status, &o);
        assert!(plan.pods.is_empty());
        assert!(plan.blocked[0].1.contains("out-of-service"));
        // ...until the node is confirmed down.
        o.nodes[1].out_of_service = true;
        assert_eq!(release(&spec, &status, &o).pods.len(), 1);

        // Opted out.
        let mut spec = spec;
        spec.failover.release_workloads = false;
        assert_eq!(release(&spec, &status, &o), ReleasePlan::default());
    }

    #[test]
    fn engine_pods_on_lost_nodes_are_fenced_and_stale_ones_restarted() {
        let status = established(Slot::B, 2);
        let mut o = healthy();
        o.nodes[0].ready = false;
        let d = pod_deletions(&status, &o, T);
        assert_eq!(d.len(), 1);
        assert!(d[0].force && d[0].slot == Slot::A && d[0].reason == "EngineNodeLost");

        // Old primary alive and ready after a takeover: left alone (it drains and serves proxied reads).
        assert!(pod_deletions(&status, &healthy(), T).is_empty());

        // Old primary unready for too long: restarted as secondary, gracefully.
        let mut o = healthy();
        o.pods[0] = Some(pod(Slot::A, EngineRole::Primary, false, 60));
        let d = pod_deletions(&status, &o, T);
        assert_eq!(
            (d.len(), d[0].force, d[0].reason),
            (1, false, "RestartAsSecondary")
        );

        // An unready secondary that already runs as secondary is the kubelet's business.
        let mut o = healthy();
        o.pods[0] = Some(pod(Slot::A, EngineRole::Secondary, false, 60));
        assert!(pod_deletions(&status, &o, T).is_empty());

        // A failed pod is deleted so it is recreated; one already being deleted is left to finish.
        let mut o = healthy();
        o.pods[1].as_mut().unwrap().phase = "Failed".into();
        assert_eq!(pod_deletions(&status, &o, T)[0].reason, "EnginePodFailed");
        o.pods[1].as_mut().unwrap().deleting = true;
        assert!(pod_deletions(&status, &o, T).is_empty());
    }

    fn summarized(status: &mut MirroredVolumeStatus, o: &Observed) -> Phase {
        let names = |s: Slot| {
            (
                format!("data-engine-{}", s.as_str()),
                format!("addr-{}", s.as_str()),
            )
        };
        summarize(status, o, Some(3), T, &names, None);
        status.phase
    }

    fn cond<'a>(status: &'a MirroredVolumeStatus, t: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn phases_and_conditions() {
        let mut status = MirroredVolumeStatus::default();
        let mut starting = healthy();
        starting.engines = [None, None];
        assert_eq!(summarized(&mut status, &starting), Phase::Creating);
        assert_eq!(cond(&status, "Ready").reason, "Creating");

        let mut status = established(Slot::A, 1);
        assert_eq!(summarized(&mut status, &healthy()), Phase::Synced);
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(cond(&status, "Ready").status, "True");
        assert_eq!(cond(&status, "Synced").status, "True");
        assert_eq!(status.primary.as_ref().unwrap().address, "addr-a");

        let mut o = healthy();
        o.engines[0] = Some(EngineState {
            pending_bytes: 49152,
            lag_seconds: 1.25,
            ..engine_state(EngineRole::Primary, 1, PairState::Resyncing)
        });
        assert_eq!(summarized(&mut status, &o), Phase::Syncing);
        assert_eq!(status.replication.as_ref().unwrap().lag, "48KiB/1.2s");
        assert_eq!(cond(&status, "Synced").status, "False");

        // Async streaming with lag is a healthy mirror.
        o.engines[0] = Some(EngineState {
            pending_bytes: 4096,
            pending_blocks: 1,
            lag_seconds: 0.05,
            ..engine_state(EngineRole::Primary, 1, PairState::Replicating)
        });
        assert_eq!(summarized(&mut status, &o), Phase::Synced);
        assert!(cond(&status, "Synced").message.contains("4KiB"));
        o.engines[0] = Some(engine_state(EngineRole::Primary, 1, PairState::Connecting));
        assert_eq!(summarized(&mut status, &o), Phase::Syncing);

        o.engines[0] = Some(engine_state(EngineRole::Primary, 1, PairState::Reversing));
        assert_eq!(summarized(&mut status, &o), Phase::Reversing);

        // The engine's takeover phases: draining and merging on the new primary, fenced on the old one.
        for phase in [
            TakeoverPhase::Draining,
            TakeoverPhase::Merging,
            TakeoverPhase::Fenced,
        ] {
            o.engines[0] = Some(EngineState {
                takeover_phase: phase,
                ..engine_state(EngineRole::Primary, 1, PairState::Replicating)
            });
            assert_eq!(summarized(&mut status, &o), Phase::TakingOver, "{phase:?}");
            assert_eq!(cond(&status, "TakeoverInProgress").status, "True");
            assert_eq!(cond(&status, "TakeoverInProgress").reason, "TakingOver");
            assert_eq!(cond(&status, "Degraded").status, "False", "both engines up");
        }
        o.engines[0] = Some(engine_state(EngineRole::Primary, 1, PairState::Reversing));
        assert_eq!(summarized(&mut status, &o), Phase::Reversing);
        assert_eq!(cond(&status, "TakeoverInProgress").reason, "Idle");

        // A proxied read failed on the primary: the engine says so, and so does the Degraded condition.
        o.engines[0] = Some(EngineState {
            takeover_phase: TakeoverPhase::Draining,
            condition: "Degraded: proxied read from the old primary failed: deadline".into(),
            condition_reason: Some(Reason::Degraded),
            ..engine_state(EngineRole::Primary, 1, PairState::Connecting)
        });
        assert_eq!(summarized(&mut status, &o), Phase::TakingOver);
        let d = cond(&status, "Degraded");
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "EngineDegraded")
        );
        assert!(d.message.contains("proxied read"), "{}", d.message);

        let mut o = healthy();
        o.nodes[1].ready = false;
        o.engines[1] = None;
        assert_eq!(summarized(&mut status, &o), Phase::Degraded);
        assert_eq!(cond(&status, "Degraded").status, "True");
        assert_eq!(
            cond(&status, "Ready").status,
            "True",
            "the primary still serves"
        );

        o.nodes[0].ready = false;
        o.engines[0] = None;
        assert_eq!(summarized(&mut status, &o), Phase::Failed);
        assert_eq!(cond(&status, "Ready").reason, "PrimaryUnavailable");
    }

    #[test]
    fn a_blocked_handoff_is_reported_and_a_lost_primary_is_degraded_while_taking_over() {
        let mut status = established(Slot::A, 1);
        let mut o = healthy();
        // The primary's engine died: its pod is unready past the peer timeout, its engine does not answer.
        o.pods[0] = Some(pod(Slot::A, EngineRole::Primary, false, 60));
        o.engines[0] = None;
        o.engines[1] = Some(EngineState {
            condition: "HandoffBlocked: PeerUnreachable: peer a:9500: refused; not promoted".into(),
            ..engine_state(EngineRole::Secondary, 1, PairState::Consistent)
        });
        let intent = decide(&MirroredVolume::test().spec, &status, &o, T)
            .takeover
            .unwrap();
        let error = crate::engine::EngineError::HandoffBlocked {
            address: "b:9500".into(),
            message: "HandoffBlocked: PeerUnreachable: peer a:9500: refused; not promoted".into(),
        };
        record_takeover_failure(&mut status, &o, &intent, &error.to_string(), error.reason());
        assert!(takeover_blocked(&status));
        assert_eq!(summarized(&mut status, &o), Phase::TakingOver);
        let t = cond(&status, "TakeoverInProgress");
        assert_eq!(
            (t.status.as_str(), t.reason.as_str()),
            ("True", "HandoffBlocked")
        );
        assert!(t.message.contains("PeerUnreachable"), "{}", t.message);
        assert_eq!(cond(&status, "Degraded").status, "True");
        assert_eq!(cond(&status, "Degraded").reason, "EngineLost");
        assert_eq!(cond(&status, "Ready").status, "False");
        assert_eq!(status.epoch, 1);
        assert_eq!(primary_slot(&status), Slot::A);

        // Another kind of refusal is a plain retry.
        record_takeover_failure(
            &mut status,
            &o,
            &intent,
            "engine at b:9500 refused Takeover: stale",
            Some(Reason::StaleEpoch),
        );
        assert!(!takeover_blocked(&status));
        summarized(&mut status, &o);
        assert_eq!(cond(&status, "TakeoverInProgress").reason, "TakingOver");
        assert_eq!(status.takeover.as_ref().unwrap().attempts, 2);
    }

    #[test]
    fn an_unfinished_takeover_ends_when_the_primary_serves_again() {
        let mut status = established(Slot::A, 1);
        let mut o = healthy();
        o.pods[0] = Some(pod(Slot::A, EngineRole::Primary, false, 60));
        o.engines[0] = None;
        let intent = decide(&MirroredVolume::test().spec, &status, &o, T)
            .takeover
            .unwrap();
        record_takeover_failure(
            &mut status,
            &o,
            &intent,
            "HandoffBlocked: PeerUnreachable: x",
            Some(Reason::HandoffBlocked),
        );
        // Still down: the attempt stays open.
        assert_eq!(abandon_takeover(&mut status, &o, T), None);
        assert_eq!(summarized(&mut status, &o), Phase::TakingOver);
        // The old primary's container came back and serves at the same epoch: nothing to take over.
        let o = healthy();
        assert_eq!(
            decide(&MirroredVolume::test().spec, &status, &o, T).takeover,
            None
        );
        let why = abandon_takeover(&mut status, &o, T).unwrap();
        assert!(
            why.contains("serves again") && why.contains("HandoffBlocked"),
            "{why}"
        );
        assert!(!takeover_blocked(&status));
        assert_eq!(summarized(&mut status, &o), Phase::Synced);
        let t = cond(&status, "TakeoverInProgress");
        assert_eq!((t.status.as_str(), t.reason.as_str()), ("False", "Idle"));
        assert!(t.message.contains("abandoned"), "{}", t.message);
        assert_eq!((status.epoch, primary_slot(&status)), (1, Slot::A));
        // Done once.
        assert_eq!(abandon_takeover(&mut status, &o, T), None);
        // A fresh loss starts a fresh attempt count.
        record_takeover_failure(
            &mut status,
            &o,
            &intent,
            "HandoffBlocked: again",
            Some(Reason::HandoffBlocked),
        );
        assert_eq!(status.takeover.as_ref().unwrap().attempts, 1);
    }

    #[test]
    fn a_takeover_by_the_csi_plugin_is_recorded_and_ends_our_attempt() {
        let mut status = established(Slot::A, 1);
        let mut o = healthy();
        o.pods[0] = Some(pod(Slot::A, EngineRole::Primary, false, 60));
        o.engines[0] = None;
        let intent = decide(&MirroredVolume::test().spec, &status, &o, T)
            .takeover
            .unwrap();
        record_takeover_failure(
            &mut status,
            &o,
            &intent,
            "HandoffBlocked: PeerUnreachable: x",
            Some(Reason::HandoffBlocked),
        );
        // NodeStage on n2 forced the promotion meanwhile.
        o.engines[1] = Some(EngineState {
            lost_blocks: 4,
            ..engine_state(EngineRole::Primary, 2, PairState::Reversing)
        });
        assert_eq!(adopt_engine_view(&mut status, &o), Some(Slot::B));
        let t = status.takeover.clone().unwrap();
        assert_eq!(
            (t.reason.as_str(), t.from_node.as_str(), t.to_node.as_str()),
            ("PrimaryMoved", "n1", "n2")
        );
        assert_eq!((t.lost_blocks, t.attempts), (4, 1));
        assert!(t.completed_at.is_some() && t.last_error.is_none());
        assert_eq!(status.epoch, 2);
        assert_eq!(summarized(&mut status, &o), Phase::Degraded);
        assert_eq!(cond(&status, "TakeoverInProgress").status, "False");
    }

    #[test]
    fn condition_transition_time_moves_only_on_change() {
        let mut c = Vec::new();
        set_condition(&mut c, "Ready", true, "A", "m", Some(1), "t1");
        set_condition(&mut c, "Ready", true, "B", "m2", Some(2), "t2");
        assert_eq!(
            (c[0].last_transition_time.as_str(), c[0].reason.as_str()),
            ("t1", "B")
        );
        set_condition(&mut c, "Ready", false, "C", "m3", Some(2), "t3");
        assert_eq!(c[0].last_transition_time, "t3");
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn policy_maps_to_the_csi_attribute() {
        assert_eq!(FailoverPolicy::WaitForPrimary.csi_value(), "wait");
    }
}
