//! Decide: what one pass does, as a pure function of the volume and what was observed, built on the
//! `failover` and `plan` decisions. No I/O.
//!
//! One engine call sits in the middle of a pass: a takeover moves the primary, and with it the role of every
//! pod to create and which workloads are fenced. So [`decide`] either returns the whole [`Plan`] or asks for
//! the takeover first ([`Decision::TakeOver`]); [`Pending::after`] finishes the plan with its answer.

use std::time::Duration;

use kube::ResourceExt;

use crate::{
    crd::{EngineRole, FailoverPolicy, MirroredVolume, MirroredVolumeStatus, Phase, Slot},
    disruption::{self, Switchover},
    engine::{EngineError, EngineState, TakeoverOutcome},
    failover::{self, GrantIntent, PodDeletion, ReleasePlan, TakeoverIntent},
    observed::{Observed, ROLE_ANNOTATION},
    plan::{self, names, Desired, EngineConfig, InvalidSpec},
};

/// A Kubernetes event to publish once the status is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub text: String,
}

impl From<disruption::Event> for Note {
    fn from(e: disruption::Event) -> Self {
        Note {
            warning: e.warning,
            reason: e.reason,
            text: e.text,
        }
    }
}

pub fn note(reason: &'static str, text: impl Into<String>) -> Note {
    Note {
        warning: false,
        reason,
        text: text.into(),
    }
}

pub fn warning(reason: &'static str, text: impl Into<String>) -> Note {
    Note {
        warning: true,
        reason,
        text: text.into(),
    }
}

/// What one pass does.
#[derive(Debug)]
pub struct Plan {
    /// The status so far: placement, lost nodes, the engines' view, the takeover's record, released nodes.
    /// The status step adds phase, conditions and engine refs.
    pub status: MirroredVolumeStatus,
    /// What was observed, with the new primary's own answer after a takeover.
    pub observed: Observed,
    /// Events of the pass, in order.
    pub notes: Vec<Note>,
    /// Look again this soon at the latest (a primary that may become a loss, a takeover to retry).
    pub requeue: Option<Duration>,
    /// Engine pods to delete; they are recreated with the right role on a later pass.
    pub deletions: Vec<PodDeletion>,
    /// Workload pods and attachments on lost nodes to release.
    pub release: ReleasePlan,
    /// A write lease to grant the primary (the operator is the pair's witness).
    pub grant: Option<GrantIntent>,
    /// Children to create or apply, or why the spec cannot be turned into objects.
    pub children: Result<Desired, InvalidSpec>,
    /// Engine pod disruption labels and workload restarts (`disruption`).
    pub disruption: disruption::Actions,
    /// A live move's calls, deletions and wipes (`crate::moving`).
    pub moving: crate::moving::Step,
    /// Nodes of `status.nodes` that lack the volume's node label (`plan::node_label`): `act` labels
    /// them before it applies anything else, so before `status.nodes` names them.
    pub label: Vec<String>,
}

/// The nodes of `status.nodes` that exist and lack the volume's node label: both at the first
/// placement, the new node at a live move's cutover (found among the observed engine nodes and the
/// move's target).
fn unlabeled(status: &MirroredVolumeStatus, observed: &Observed) -> Vec<String> {
    status
        .nodes
        .iter()
        .filter(|name| {
            observed
                .nodes
                .iter()
                .chain(observed.moving.target_node.as_ref())
                .find(|n| &n.name == *name)
                .is_some_and(|n| n.exists && !n.labeled)
        })
        .cloned()
        .collect()
}

/// What [`decide`] concluded.
#[derive(Debug)]
pub enum Decision {
    /// Nothing waits on an engine: act on the plan.
    Act(Box<Plan>),
    /// Ask a secondary to take over first.
    TakeOver(Pending),
}

/// A plan waiting for a takeover's answer.
#[derive(Debug)]
pub struct Pending {
    pub intent: TakeoverIntent,
    pass: Box<Pass>,
}

/// The answer to a takeover call.
#[derive(Debug)]
pub struct TakeoverAttempt {
    pub result: Result<TakeoverOutcome, EngineError>,
    /// The new primary's Status, asked right after it answered ready (`None`: no answer).
    pub answer: Option<EngineState>,
}

/// A plan in the making: the status bookkeeping and events so far.
#[derive(Debug)]
struct Pass {
    status: MirroredVolumeStatus,
    observed: Observed,
    notes: Vec<Note>,
    requeue: Option<Duration>,
    moving: crate::moving::Step,
}

/// Decides one pass from the volume (spec and last status) and the observation.
pub fn decide(mv: &MirroredVolume, observed: &Observed, cfg: &EngineConfig) -> Decision {
    let (pass, takeover) = assess(mv, observed.clone(), cfg);
    match takeover {
        Some(intent) => Decision::TakeOver(Pending {
            intent,
            pass: Box::new(pass),
        }),
        None => Decision::Act(Box::new(pass.finish(mv, cfg))),
    }
}

impl Pending {
    /// The volume token to call the engine with.
    pub fn token(&self) -> Option<&str> {
        self.pass.observed.token.as_deref()
    }

    /// Records the takeover's answer and finishes the plan from where the primary is now.
    pub fn after(self, mv: &MirroredVolume, cfg: &EngineConfig, attempt: TakeoverAttempt) -> Plan {
        let Pending { intent, mut pass } = self;
        let from = pass.observed.node(intent.to.other()).name.clone();
        let to = pass.observed.node(intent.to).name.clone();
        let policy = mv.spec.failover.policy;
        pass.notes.push(warning(
            "TakeoverStarted",
            format!(
                "{}: asking the secondary on {to} to take over from {from} ({}; policy {policy:?})",
                intent.reason,
                if intent.force {
                    "forced: the old primary's lease has run out"
                } else {
                    "handoff"
                }
            ),
        ));
        let switchover = intent.reason == crate::switchover::REASON;
        match attempt.result {
            Ok(outcome) => {
                pass.took_over(&intent, &outcome, attempt.answer, &to);
                if switchover {
                    crate::switchover::handed_over(
                        &mv.spec,
                        &mut pass.status,
                        &pass.observed,
                        &from,
                    );
                }
            }
            Err(e) => {
                if switchover {
                    crate::switchover::handover_failed(&mut pass.status, &e.to_string());
                }
                pass.takeover_failed(&intent, &e, policy, &from, &to)
            }
        }
        pass.finish(mv, cfg)
    }
}

/// Status bookkeeping from the observation (placement, lost nodes, the engines' own view, a takeover that
/// is over) and whether to take over.
fn assess(
    mv: &MirroredVolume,
    observed: Observed,
    cfg: &EngineConfig,
) -> (Pass, Option<TakeoverIntent>) {
    let old = mv.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let mut notes = Vec::new();
    if old.nodes.len() != 2 {
        let how = old
            .placement
            .as_ref()
            .map(|p| format!(": {}", p.message))
            .unwrap_or_default();
        notes.push(note(
            "Placed",
            format!(
                "engines pinned to nodes {} (slot a) and {} (slot b){how}",
                observed.nodes[0].name, observed.nodes[1].name
            ),
        ));
    }
    status.nodes = observed.nodes.iter().map(|n| n.name.clone()).collect();
    status.capacity_bytes = super::grow::capacity(old.capacity_bytes, &observed);
    // Recorded from the first pass on, so the deletion wipes what the engines used.
    if let Ok(Some(dir)) = plan::host_data_dir(mv, Some(&old), cfg) {
        status.data_dir = Some(dir);
    }
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
    if old.primary.is_none() && status.primary.is_some() {
        notes.push(note(
            "PairEstablished",
            format!("primary engine serves at epoch {}", status.epoch),
        ));
    }
    let peer_timeout = mv.peer_timeout();
    let grace = disruption::restart_grace(&mv.spec);
    let (restart, events) = disruption::track_restart(&mut status, &observed, grace);
    notes.extend(events.into_iter().map(Note::from));
    let mut decision = failover::decide(&mv.spec, &status, &observed, peer_timeout);
    disruption::gate_restart(
        &mut decision,
        restart,
        &mv.spec,
        &status,
        &observed,
        peer_timeout,
    );
    if decision.takeover.is_none() && restart == disruption::Restart::Idle {
        match disruption::switchover(&status, &observed, peer_timeout) {
            Switchover::Go(intent) => {
                notes.push(note(
                    disruption::SWITCHOVER_REASON,
                    format!(
                        "node {} is cordoned: handing the primary over to the secondary on {}",
                        observed.node(intent.to.other()).name,
                        observed.node(intent.to).name
                    ),
                ));
                decision.takeover = Some(intent);
            }
            Switchover::Blocked(why) => {
                let shown = old.conditions.iter().any(|c| {
                    c.type_ == disruption::DRAIN_CONDITION && c.reason == "SwitchoverBlocked"
                });
                if !shown {
                    notes.push(warning("SwitchoverBlocked", why));
                }
            }
            Switchover::None => {}
        }
    }
    let busy = if decision.takeover.is_some() {
        Some("another takeover goes first")
    } else if restart != disruption::Restart::Idle {
        Some("the primary's engine is restarting")
    } else {
        None
    };
    let step = crate::switchover::track(&mv.spec, &mut status, &observed, peer_timeout, busy);
    notes.extend(step.events.into_iter().map(Note::from));
    if let Some(r) = step.recheck {
        decision.recheck = Some(decision.recheck.map_or(r, |q| q.min(r)));
    }
    if decision.takeover.is_none() {
        decision.takeover = step.takeover;
    }
    let busy = if decision.takeover.is_some() {
        Some("a takeover goes first")
    } else {
        busy
    };
    let mut moving = crate::moving::track(mv, &mut status, &observed, peer_timeout, busy, cfg);
    notes.extend(moving.events.drain(..).map(Note::from));
    if let Some(r) = moving.recheck {
        decision.recheck = Some(decision.recheck.map_or(r, |q| q.min(r)));
    }
    if decision.takeover.is_none() {
        decision.takeover = moving.takeover.take();
    }
    if decision.takeover.is_none() {
        status.promotion_wait = None;
        if let Some(why) = failover::abandon_takeover(&mut status, &observed, peer_timeout) {
            notes.push(note("TakeoverAbandoned", why));
        }
    }
    if let Some(stuck) = &decision.stuck {
        if !matches!(old.phase, Phase::Failed | Phase::Degraded) {
            notes.push(warning("TakeoverImpossible", stuck.clone()));
        }
    }
    let pass = Pass {
        status,
        observed,
        notes,
        requeue: decision.recheck,
        moving,
    };
    (pass, decision.takeover)
}

impl Pass {
    fn took_over(
        &mut self,
        intent: &TakeoverIntent,
        outcome: &TakeoverOutcome,
        answer: Option<EngineState>,
        to: &str,
    ) {
        failover::record_takeover(&mut self.status, &self.observed, intent, outcome);
        let lost = if outcome.lost_blocks > 0 {
            format!(
                "; forced: {} blocks lost (seq {}..{})",
                outcome.lost_blocks, outcome.lost_seq_from, outcome.lost_seq_to
            )
        } else {
            String::new()
        };
        self.notes.push(note(
            "TakeoverCompleted",
            format!(
                "engine on {to} is primary at epoch {} after {} ms; {} blocks still owed by the old primary{lost}",
                outcome.epoch, outcome.ready_ms, outcome.peer_pending_blocks
            ),
        ));
        // The engine answered ready: it serves as primary now, whatever it said before the call. Its own
        // answer tells what it does now (draining, merging or reversing); without one, the takeover's reply.
        let epoch = self.status.epoch;
        let slot = intent.to.index();
        self.observed.engines[slot] = match answer {
            Some(now) if now.role == Some(EngineRole::Primary) && now.epoch >= epoch => Some(now),
            _ => {
                let mut engine = self.observed.engines[slot].take().unwrap_or_default();
                engine.role = Some(EngineRole::Primary);
                engine.epoch = epoch;
                engine.peer_pending_blocks = self
                    .status
                    .takeover
                    .as_ref()
                    .map_or(0, |t| t.pending_blocks);
                Some(engine)
            }
        };
    }

    fn takeover_failed(
        &mut self,
        intent: &TakeoverIntent,
        error: &EngineError,
        policy: FailoverPolicy,
        from: &str,
        to: &str,
    ) {
        failover::record_takeover_failure(
            &mut self.status,
            &self.observed,
            intent,
            &error.to_string(),
            error.reason(),
        );
        let waiting = intent
            .wait
            .as_ref()
            .filter(|w| w.reason != "WaitForPrimary");
        if let (Some(w), true) = (waiting, error.is_handoff_blocked()) {
            // The policy would force, but not before the old primary's lease has run out (or the loss
            // bound holds): the handoff it tried meanwhile found no old primary. A wait, not a failure.
            self.notes
                .push(note("PromotionWaits", format!("{}; {error}", w.message)));
            return;
        }
        if error.reason() == Some(tandem_api::Reason::LeaseHeld) {
            // The engine's own promise outlasted the call: nothing promoted, retry soon.
            self.notes.push(note(
                "PromotionWaits",
                format!("{error}; retrying once the secondary's promise is over"),
            ));
            self.requeue = Some(Duration::from_secs(1));
            return;
        }
        let (reason, text) = if error.is_handoff_blocked() {
            (
                tandem_api::Reason::HandoffBlocked.as_str(),
                format!(
                    "{error}; the secondary on {to} stays secondary and the takeover is retried while the \
                     old primary on {from} is unreachable (policy {policy:?}; set \
                     spec.failover.policy to ForcePromote to promote and lose its unsent writes)"
                ),
            )
        } else {
            (
                "TakeoverFailed",
                format!("{error}; retrying (policy {policy:?})"),
            )
        };
        self.notes.push(warning(reason, text));
        self.requeue = Some(Duration::from_secs(5));
    }

    /// The writes of the pass, decided from the status as it stands now.
    fn finish(mut self, mv: &MirroredVolume, cfg: &EngineConfig) -> Plan {
        let deletions = failover::pod_deletions(&self.status, &self.observed, mv.peer_timeout());
        let primary = self.status.primary.as_ref().map(|p| p.slot);
        for d in &deletions {
            // The primary's own pod on a live node is recreated as primary (an engine restart, not a
            // failover); any other engine comes back as the secondary.
            let comes_back = if Some(d.slot) == primary {
                "it comes back as primary from its state dir"
            } else {
                "it comes back as secondary"
            };
            self.notes.push(note(
                d.reason,
                format!(
                    "deleted engine pod {}{}; {comes_back}",
                    d.name,
                    if d.force { " (forced: node lost)" } else { "" }
                ),
            ));
        }
        let release = failover::release(&mv.spec, &self.status, &self.observed);
        self.released(&release);
        // After the takeover, if any: a new primary that lost its peer needs a lease from us at once.
        let persisted = mv.status.clone().unwrap_or_default();
        let witness = failover::witness(
            &mv.spec,
            &persisted,
            &mut self.status,
            &self.observed,
            mv.peer_timeout(),
        );
        if let Some(text) = witness.fallback_recorded {
            self.notes.push(warning("SyncFallback", text));
        }
        if let Some(text) = witness.fallback_ended {
            self.notes.push(note("SyncRestored", text));
        }
        if let Some(g) = &witness.grant {
            // Renew well before the lease runs out while we are the only one renewing it.
            let every = Duration::from_millis(u64::from(g.lease_ms) / 3);
            self.requeue = Some(self.requeue.map_or(every, |r| r.min(every)));
        }
        let looked = mv
            .status
            .as_ref()
            .is_some_and(|s| s.engine_restart.is_some() || s.workload_restart.is_some());
        let (disruption, events, recheck) =
            disruption::finish(mv, &mut self.status, &self.observed, looked);
        self.notes.extend(events.into_iter().map(Note::from));
        if let Some(r) = recheck {
            self.requeue = Some(self.requeue.map_or(r, |q| q.min(r)));
        }
        let skip: Vec<Slot> = deletions.iter().map(|d| d.slot).collect();
        let token = self.observed.token.as_deref();
        let children = plan::desired(mv, &self.status, &self.observed, cfg, token, &skip);
        if let Ok(children) = &children {
            self.notes.extend(created(mv, children));
        }
        let label = unlabeled(&self.status, &self.observed);
        Plan {
            label,
            status: self.status,
            observed: self.observed,
            notes: self.notes,
            requeue: self.requeue,
            deletions,
            release,
            grant: witness.grant,
            children,
            disruption,
            moving: self.moving,
        }
    }

    /// Marks the released nodes in status, with an event per released pod and per node that stays.
    fn released(&mut self, release: &ReleasePlan) {
        for w in &release.pods {
            let why = release
                .fences
                .iter()
                .find(|(node, _)| *node == w.node)
                .map_or("", |(_, why)| why.as_str());
            self.notes.push(warning(
                "WorkloadReleased",
                format!(
                    "force-deleted pod {}/{} stuck on lost node {}: {why}",
                    w.namespace, w.name, w.node
                ),
            ));
        }
        for l in self.status.lost_nodes.iter_mut() {
            if release.released_nodes.contains(&l.node) {
                l.released = true;
            }
        }
        for (node, why) in &release.blocked {
            self.notes.push(warning(
                "ReleaseBlocked",
                format!("workload pods on lost node {node} stay: {why}"),
            ));
        }
    }
}

/// An event per child the plan creates (or resizes).
fn created(mv: &MirroredVolume, children: &Desired) -> Vec<Note> {
    let mut notes = Vec::new();
    if children.secret.is_some() {
        let secret = names::secret(&plan::key(mv));
        notes.push(note(
            "TokenCreated",
            format!("created token secret {secret}"),
        ));
    }
    for pod in &children.pods {
        let role = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ROLE_ANNOTATION))
            .cloned()
            .unwrap_or_default();
        notes.push(note(
            "EngineCreated",
            format!("created engine pod {} as {role}", pod.name_any()),
        ));
    }
    if let Some(pv) = &children.pv {
        notes.push(note(
            "PersistentVolumeCreated",
            format!("created PersistentVolume {}", pv.name_any()),
        ));
    }
    if let Some(size) = &children.pv_capacity {
        notes.push(note(
            "Resized",
            format!("PersistentVolume capacity set to {size}, what both engines serve now"),
        ));
    }
    if let Some(claim) = &children.claim {
        notes.push(note(
            "ClaimCreated",
            format!("created claim {} bound to the volume", claim.name_any()),
        ));
    }
    notes
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "decide_disruption_tests.rs"]
mod disruption_tests;

#[cfg(test)]
#[path = "decide_switchover_tests.rs"]
mod switchover_tests;
