//! Whole passes of `decide` (and the status step) for a switchover asked by `spec.primaryNode`: no API
//! server, no engines (tests/failover_engines.rs has the same with real engines).

use tandem_api::pb::{PairState, TakeoverPhase};

use super::{
    disruption_tests::{
        ago, cfg, condition, ok, pair, pending, plan_of, reasons, settled, workload,
    },
    *,
};
use crate::{
    crd::{SwitchoverPhase, SwitchoverPolicy},
    fixtures::engine_state,
    switchover,
};

fn asking(node: &str, policy: SwitchoverPolicy) -> MirroredVolume {
    let mut mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    mv.spec.primary_node = Some(node.into());
    mv.spec.switchover_policy = policy;
    mv
}

fn phase(status: &MirroredVolumeStatus) -> SwitchoverPhase {
    status.switchover.as_ref().expect("status.switchover").phase
}

#[test]
fn a_primary_node_edit_hands_over_and_restarts_the_workloads_on_the_old_node() {
    let mv = asking("n2", SwitchoverPolicy::WhenInSync);
    let mut o = pair();
    o.workloads = vec![workload("app-0", "n1", ago(600))];
    let p = pending(decide(&mv, &o, &cfg()));
    assert_eq!(
        (p.intent.to, p.intent.reason, p.intent.force),
        (Slot::B, switchover::REASON, false),
        "a handoff to the secondary, never forced"
    );
    // The new primary answers: draining the old one's table.
    let mut answer = engine_state(EngineRole::Primary, 2, PairState::Reversing);
    answer.takeover_phase = TakeoverPhase::Draining;
    answer.peer_pending_blocks = 3;
    let attempt = TakeoverAttempt {
        answer: Some(answer.clone()),
        ..ok(2)
    };
    let plan = p.after(&mv, &cfg(), attempt);
    assert!(
        reasons(&plan).starts_with(&[
            "SwitchoverRequested",
            "TakeoverStarted",
            "TakeoverCompleted"
        ]),
        "{:?}",
        reasons(&plan)
    );
    let rec = plan.status.switchover.clone().unwrap();
    assert_eq!(
        (rec.phase, rec.from.as_str(), rec.to.as_str(), rec.epoch),
        (SwitchoverPhase::Draining, "n1", "n2", 2)
    );
    assert!(rec.started_at.is_some());
    assert_eq!(plan.status.takeover.as_ref().unwrap().reason, "Switchover");
    let restart = plan.status.workload_restart.clone().unwrap();
    assert_eq!((restart.node.as_str(), restart.epoch), ("n1", 2));
    let status = settled(&mv, plan);
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::B);
    let c = condition(&status, switchover::CONDITION);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Draining")
    );

    // Next pass: merging; the workload staged before the handover (pinned to epoch 1) is restarted.
    let mv2 = mv.clone().with_status(status);
    let mut o = pair();
    answer.takeover_phase = TakeoverPhase::Merging;
    o.engines = [
        Some(engine_state(EngineRole::Fenced, 2, PairState::Fenced)),
        Some(answer.clone()),
    ];
    o.workloads = vec![workload("app-0", "n1", ago(600))];
    let plan = plan_of(decide(&mv2, &o, &cfg()));
    assert_eq!(phase(&plan.status), SwitchoverPhase::Merging);
    let restarted: Vec<&str> = plan
        .disruption
        .workloads
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(restarted, ["app-0"]);
    let status = settled(&mv2, plan);

    // The merge is over and the old primary answers as the secondary: Done.
    let mv3 = mv.clone().with_status(status);
    let mut o = pair();
    o.engines = [
        Some(engine_state(
            EngineRole::Secondary,
            2,
            PairState::Consistent,
        )),
        Some(engine_state(EngineRole::Primary, 2, PairState::Synced)),
    ];
    let plan = plan_of(decide(&mv3, &o, &cfg()));
    assert!(reasons(&plan).contains(&"SwitchoverCompleted"));
    let rec = plan.status.switchover.clone().unwrap();
    assert_eq!(rec.phase, SwitchoverPhase::Done);
    assert!(rec.completed_at.is_some());
    let status = settled(&mv3, plan);
    let c = condition(&status, switchover::CONDITION);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "OnPrimaryNode")
    );

    // A workload staged writable on n1 later: the CSI plugin moved the primary back (epoch 3). The
    // request was carried out once: no switchover again, the condition says so.
    let mv4 = mv.clone().with_status(status);
    let mut o = pair();
    o.engines = [
        Some(engine_state(EngineRole::Primary, 3, PairState::Synced)),
        Some(engine_state(
            EngineRole::Secondary,
            3,
            PairState::Consistent,
        )),
    ];
    let plan = plan_of(decide(&mv4, &o, &cfg()));
    assert_eq!(phase(&plan.status), SwitchoverPhase::Done);
    let status = settled(&mv4, plan);
    assert_eq!(
        condition(&status, switchover::CONDITION).reason,
        "PrimaryMoved"
    );
}

#[test]
fn a_switchover_is_postponed_until_in_sync_or_goes_at_once_when_immediate() {
    let mv = asking("n2", SwitchoverPolicy::WhenInSync);
    let mut o = pair();
    if let Some(p) = o.engines[0].as_mut() {
        p.pair_state = PairState::Replicating;
        p.pending_blocks = 10;
        p.pending_bytes = 40960;
    }
    let plan = plan_of(decide(&mv, &o, &cfg()));
    let rec = plan.status.switchover.clone().unwrap();
    assert_eq!(rec.phase, SwitchoverPhase::WaitingForSync);
    assert!(
        rec.message.contains("10 blocks (40960 bytes) pending")
            && rec.message.contains("WhenInSync"),
        "{}",
        rec.message
    );
    assert_eq!(reasons(&plan), ["SwitchoverRequested", "SwitchoverWaits"]);
    assert_eq!(plan.requeue, Some(Duration::from_secs(2)));
    let status = settled(&mv, plan);
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::A);
    let c = condition(&status, switchover::CONDITION);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "WaitingForSync")
    );

    // Still behind on the next pass: the same wait, no new event.
    let mv2 = mv.clone().with_status(status.clone());
    let plan = plan_of(decide(&mv2, &o, &cfg()));
    assert!(!reasons(&plan).contains(&"SwitchoverWaits"));

    // Immediate: a streaming mirror is enough (the handoff drains the rest).
    let mut mv3 = mv2.clone();
    mv3.spec.switchover_policy = SwitchoverPolicy::Immediate;
    let p = pending(decide(&mv3, &o, &cfg()));
    assert_eq!((p.intent.to, p.intent.force), (Slot::B, false));

    // Even Immediate waits for a resyncing secondary (its copy is not consistent).
    if let Some(p) = o.engines[0].as_mut() {
        p.pair_state = PairState::Resyncing;
    }
    let plan = plan_of(decide(&mv3, &o, &cfg()));
    assert_eq!(phase(&plan.status), SwitchoverPhase::WaitingForSync);
}

#[test]
fn a_node_without_an_engine_is_refused_and_the_current_primary_node_is_done_at_once() {
    let mv = asking("n3", SwitchoverPolicy::WhenInSync);
    let plan = plan_of(decide(&mv, &pair(), &cfg()));
    let rec = plan.status.switchover.clone().unwrap();
    assert_eq!(rec.phase, SwitchoverPhase::Refused);
    assert!(
        rec.message.contains("n3 holds no engine"),
        "{}",
        rec.message
    );
    assert_eq!(reasons(&plan), ["SwitchoverRefused"]);
    assert!(plan.notes[0].warning);
    let status = settled(&mv, plan);
    assert_eq!(condition(&status, switchover::CONDITION).reason, "Refused");
    // Shown once.
    let mv2 = mv.clone().with_status(status.clone());
    assert!(reasons(&plan_of(decide(&mv2, &pair(), &cfg()))).is_empty());

    // Corrected to where the primary is: nothing to hand over.
    let mut mv3 = mv2.clone();
    mv3.spec.primary_node = Some("n1".into());
    let plan = plan_of(decide(&mv3, &pair(), &cfg()));
    assert_eq!(phase(&plan.status), SwitchoverPhase::Done);
    assert!(plan.status.workload_restart.is_none());
    // Cleared: no record, no condition.
    let status = settled(&mv3, plan);
    let mut mv4 = mv3.clone().with_status(status);
    mv4.spec.primary_node = None;
    let plan = plan_of(decide(&mv4, &pair(), &cfg()));
    assert!(plan.status.switchover.is_none());
    let status = settled(&mv4, plan);
    assert!(status
        .conditions
        .iter()
        .all(|c| c.type_ != switchover::CONDITION));
}

#[test]
fn a_failed_handover_is_pending_and_retried_and_a_lost_secondary_blocks_it() {
    let mv = asking("n2", SwitchoverPolicy::WhenInSync);
    let p = pending(decide(&mv, &pair(), &cfg()));
    let attempt = TakeoverAttempt {
        result: Err(crate::engine::EngineError::Refused {
            address: "b".into(),
            op: "Takeover",
            message: "peer went away".into(),
            reason: None,
        }),
        answer: None,
    };
    let plan = p.after(&mv, &cfg(), attempt);
    let rec = plan.status.switchover.clone().unwrap();
    assert_eq!(rec.phase, SwitchoverPhase::Pending);
    assert!(rec.message.contains("peer went away"), "{}", rec.message);
    assert!(plan.status.workload_restart.is_none());
    let status = settled(&mv, plan);
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::A);

    // Retried on the next pass (a restarted operator does the same from the status).
    let mv2 = mv.clone().with_status(status);
    let p = pending(decide(&mv2, &pair(), &cfg()));
    assert_eq!(p.intent.reason, switchover::REASON);

    // The secondary's engine does not answer: no handover, Pending with why.
    let mut o = pair();
    o.engines[1] = None;
    let plan = plan_of(decide(&mv2, &o, &cfg()));
    let rec = plan.status.switchover.clone().unwrap();
    assert_eq!(rec.phase, SwitchoverPhase::Pending);
    assert!(
        rec.message.contains("does not answer as the secondary"),
        "{}",
        rec.message
    );
}
