//! Whole passes of `decide` (and the status step) for engine restarts and node drains: no API server,
//! no engines.

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use tandem_api::pb::{PairState, TakeoverPhase};

use super::{
    tests::{node, now},
    *,
};
use crate::{
    crd::{EngineRestart, WorkloadRestart},
    disruption::{LabelChange, DRAIN_CONDITION, SWITCHOVER_REASON},
    engine::EngineState,
    fixtures::engine_state,
    observed::{PodObs, PvObs, WorkloadPod},
};

pub(super) fn ago(secs: i64) -> Timestamp {
    now().checked_sub(SignedDuration::from_secs(secs)).unwrap()
}

/// The plain pass's engine pod, labelled as the operator labels a new one.
pub(super) fn pod(slot: Slot, role: EngineRole) -> PodObs {
    PodObs {
        disruption_allowed: Some(false),
        ..super::tests::pod(slot, role)
    }
}

pub(super) fn workload(name: &str, node: &str, created: Timestamp) -> WorkloadPod {
    WorkloadPod {
        namespace: "apps".into(),
        name: name.into(),
        node: node.into(),
        created: Some(created),
        deleting: false,
    }
}

/// Slot a primary at epoch 1 on n1, in sync with slot b on n2; the PV is bound to apps/data.
pub(super) fn pair() -> Observed {
    Observed {
        witness: crate::witness::LeaseClock::long_ago(10_000),
        certs: Default::default(),
        conflict: None,
        moving: Default::default(),
        now: now(),
        nodes: [node("n1"), node("n2")],
        pods: [
            Some(pod(Slot::A, EngineRole::Primary)),
            Some(pod(Slot::B, EngineRole::Secondary)),
        ],
        engines: [
            Some(engine_state(EngineRole::Primary, 1, PairState::Synced)),
            Some(engine_state(
                EngineRole::Secondary,
                1,
                PairState::Consistent,
            )),
        ],
        secret_exists: true,
        token: Some("tok".into()),
        pv: Some(PvObs {
            capacity: Some("1Gi".into()),
            claim: Some(("apps".into(), "data".into())),
            follows_label: true,
        }),
        claim_exists: false,
        engine_pvcs: [false, false],
        workloads: vec![],
        attachments: vec![],
    }
}

pub(super) fn plan_of(decision: Decision) -> Plan {
    match decision {
        Decision::Act(plan) => *plan,
        Decision::TakeOver(p) => panic!("unexpected takeover to {:?}", p.intent),
    }
}

pub(super) fn pending(decision: Decision) -> Pending {
    match decision {
        Decision::TakeOver(p) => p,
        Decision::Act(plan) => panic!("no takeover: {:?}", plan.notes),
    }
}

pub(super) fn reasons(plan: &Plan) -> Vec<&str> {
    plan.notes.iter().map(|n| n.reason).collect()
}

pub(super) fn cfg() -> EngineConfig {
    EngineConfig::default()
}

/// The status the status step would write, with `mv` as the volume before the pass.
pub(super) fn settled(mv: &MirroredVolume, plan: Plan) -> MirroredVolumeStatus {
    crate::controller::status::settle(mv, plan, &cfg()).0
}

pub(super) fn condition<'a>(
    status: &'a MirroredVolumeStatus,
    t: &str,
) -> &'a crate::crd::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .unwrap_or_else(|| panic!("no {t} in {:?}", status.conditions))
}

pub(super) fn ok(epoch: u64) -> TakeoverAttempt {
    TakeoverAttempt {
        result: Ok(TakeoverOutcome {
            epoch,
            ..Default::default()
        }),
        answer: None,
    }
}

#[test]
fn a_primary_pod_deleted_on_a_live_node_is_recreated_as_primary_without_a_takeover() {
    let mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    let mut o = pair();
    o.pods[0] = None;
    o.engines[0] = None;
    o.workloads = vec![workload("app-0", "n1", ago(600))];
    let plan = plan_of(decide(&mv, &o, &cfg()));
    assert!(plan.deletions.is_empty());
    let pods = &plan.children.as_ref().unwrap().pods;
    assert_eq!(pods.len(), 1);
    let pod = &pods[0];
    assert_eq!(
        pod.metadata.name.as_deref(),
        Some(format!("{}-engine-a", crate::fixtures::key()).as_str())
    );
    assert_eq!(
        pod.metadata.annotations.as_ref().unwrap()[ROLE_ANNOTATION],
        "primary",
        "same role, same node, same state dir: it comes back at the same epoch"
    );
    assert_eq!(
        pod.metadata.labels.as_ref().unwrap()[crate::observed::DISRUPTION_LABEL],
        "false"
    );
    assert_eq!(reasons(&plan), ["EngineRestarting", "EngineCreated"]);
    assert_eq!(plan.requeue, Some(Duration::from_secs(60)));
    assert!(
        plan.disruption.workloads.is_empty(),
        "the workload only stalls"
    );
    let restart = plan.status.engine_restart.clone().unwrap();
    assert_eq!((restart.slot, restart.since), (Slot::A, now().to_string()));
    let status = settled(&mv, plan);
    let ready = condition(&status, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "EngineRestarting")
    );
    assert_eq!(
        (status.epoch, status.primary.as_ref().map(|p| p.slot)),
        (1, Some(Slot::A))
    );

    // The kubelet started it; it answers as primary at epoch 1: over, no takeover.
    let mv = mv.clone().with_status(status);
    let plan = plan_of(decide(&mv, &pair(), &cfg()));
    assert_eq!(plan.status.engine_restart, None);
    assert!(
        reasons(&plan).contains(&"EngineRestarted"),
        "{:?}",
        reasons(&plan)
    );
    assert!(plan.children.as_ref().unwrap().pods.is_empty());
    let status = settled(&mv, plan);
    assert_eq!(condition(&status, "Ready").reason, "PrimaryServing");
}

#[test]
fn an_engine_not_back_within_the_grace_is_taken_over_then_its_workloads_restarted() {
    let mut mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    if let Some(s) = mv.status.as_mut() {
        s.engine_restart = Some(EngineRestart {
            slot: Slot::A,
            node: "n1".into(),
            since: ago(61).to_string(),
            reason: "engine pod deleted".into(),
        });
    }
    let mut o = pair();
    o.pods[0] = Some(PodObs {
        phase: "Pending".into(),
        ready: false,
        not_ready_since: Some(ago(30)),
        ..pod(Slot::A, EngineRole::Primary)
    });
    o.engines[0] = None;
    // Staged before the takeover: pinned to epoch 1. The other one is already going.
    o.workloads = vec![
        workload("app-0", "n1", ago(600)),
        WorkloadPod {
            deleting: true,
            ..workload("app-1", "n1", ago(600))
        },
    ];
    let pending = pending(decide(&mv, &o, &cfg()));
    assert_eq!(pending.intent.reason, "PrimaryUnready");
    assert_eq!(pending.intent.to, Slot::B);
    let plan = pending.after(&mv, &cfg(), ok(2));
    assert_eq!(plan.status.primary.as_ref().unwrap().slot, Slot::B);
    assert_eq!(plan.status.engine_restart, None);
    assert_eq!(
        plan.status.workload_restart,
        Some(WorkloadRestart {
            node: "n1".into(),
            before: now().to_string(),
            epoch: 2
        })
    );
    let names: Vec<&str> = plan
        .disruption
        .workloads
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(names, ["app-0"]);
    let r = reasons(&plan);
    let (taken, restarted) = (
        r.iter().position(|x| *x == "TakeoverCompleted").unwrap(),
        r.iter().position(|x| *x == "WorkloadRestarted").unwrap(),
    );
    assert!(taken < restarted, "{r:?}");

    // Next pass: a pod created since stages at epoch 2 and stays; the old one is gone: the record ends.
    let mv = mv.clone().with_status(settled(&mv, plan));
    let mut o = pair();
    o.engines = [
        Some(engine_state(EngineRole::Fenced, 2, PairState::Unspecified)),
        Some(engine_state(EngineRole::Primary, 2, PairState::Reversing)),
    ];
    o.now = now().checked_add(SignedDuration::from_secs(5)).unwrap();
    o.workloads = vec![workload("app-0-new", "n1", now())];
    let plan = plan_of(decide(&mv, &o, &cfg()));
    assert!(plan.disruption.workloads.is_empty());
    assert_eq!(plan.status.workload_restart, None);
}

#[test]
fn a_cordoned_primary_node_switches_over_then_lets_the_old_primary_go_once_in_sync() {
    let mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    let mut o = pair();
    o.nodes[0].unschedulable = true;
    let pending = pending(decide(&mv, &o, &cfg()));
    assert_eq!(
        (pending.intent.to, pending.intent.reason),
        (Slot::B, SWITCHOVER_REASON)
    );
    // The engines' answer after the handoff: b primary and draining, a fenced.
    let attempt = TakeoverAttempt {
        result: Ok(TakeoverOutcome {
            epoch: 2,
            peer_pending_blocks: 4,
            ..Default::default()
        }),
        answer: Some(EngineState {
            takeover_phase: TakeoverPhase::Draining,
            ..engine_state(EngineRole::Primary, 2, PairState::Connecting)
        }),
    };
    let plan = pending.after(&mv, &cfg(), attempt);
    assert!(reasons(&plan).starts_with(&["SwitchoverForDrain", "TakeoverStarted"]));
    assert!(
        plan.disruption.labels.is_empty(),
        "both pods stay under the budget while the old primary drains: {:?}",
        plan.disruption.labels
    );
    assert_eq!(plan.requeue, Some(Duration::from_secs(3)));
    let status = settled(&mv, plan);
    assert_eq!(condition(&status, DRAIN_CONDITION).reason, "WaitingForSync");
    let mv = mv.clone().with_status(status);

    // Draining: the old primary is fenced, still pending: it stays.
    o.engines = [
        Some(EngineState {
            takeover_phase: TakeoverPhase::Fenced,
            ..engine_state(EngineRole::Fenced, 2, PairState::Unspecified)
        }),
        Some(EngineState {
            takeover_phase: TakeoverPhase::Draining,
            pending_blocks: 4,
            ..engine_state(EngineRole::Primary, 2, PairState::Reversing)
        }),
    ];
    let plan = plan_of(decide(&mv, &o, &cfg()));
    assert!(plan.disruption.labels.is_empty());
    let mv = mv.clone().with_status(settled(&mv, plan));

    // Secondary and in sync, nothing pending: its pod may be evicted now.
    o.engines = [
        Some(engine_state(
            EngineRole::Secondary,
            2,
            PairState::Consistent,
        )),
        Some(engine_state(EngineRole::Primary, 2, PairState::Synced)),
    ];
    let plan = plan_of(decide(&mv, &o, &cfg()));
    assert_eq!(
        plan.disruption.labels,
        vec![LabelChange {
            slot: Slot::A,
            pod: "data-engine-a".into(),
            allowed: true
        }]
    );
    assert_eq!(reasons(&plan), ["SwitchoverDone"]);
    let status = settled(&mv, plan);
    assert_eq!(
        condition(&status, DRAIN_CONDITION).reason,
        "EvictionAllowed"
    );
    assert_eq!(status.primary.unwrap().slot, Slot::B);
}

#[test]
fn a_cordoned_primary_node_with_an_unhealthy_secondary_keeps_the_budget_blocking() {
    let mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    let mut o = pair();
    o.nodes[0].unschedulable = true;
    o.pods[1] = Some(PodObs {
        ready: false,
        not_ready_since: Some(ago(5)),
        ..pod(Slot::B, EngineRole::Secondary)
    });
    o.engines[1] = None;
    let plan = plan_of(decide(&mv, &o, &cfg()));
    assert_eq!(reasons(&plan), ["SwitchoverBlocked"]);
    assert!(plan.disruption.labels.is_empty(), "both stay \"false\"");
    let status = settled(&mv, plan);
    let c = condition(&status, DRAIN_CONDITION);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "SwitchoverBlocked")
    );
    assert!(c.message.contains("not ready"), "{}", c.message);
    // Said once.
    let mv = mv.clone().with_status(status);
    let plan = plan_of(decide(&mv, &o, &cfg()));
    assert!(reasons(&plan).is_empty(), "{:?}", reasons(&plan));
}
