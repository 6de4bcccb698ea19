//! `decide` on plain observations: no API server, no engines.

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use tandem_api::pb::PairState;

use super::*;
use crate::{
    crd::FailoverPolicy,
    fixtures::engine_state,
    observed::{NodeObs, PodObs, PvObs},
};

pub(super) fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

pub(super) fn node(name: &str) -> NodeObs {
    NodeObs {
        name: name.into(),
        exists: true,
        ready: true,
        out_of_service: false,
        labeled: true,
        not_ready_since: None,
        unschedulable: false,
    }
}

pub(super) fn pod(slot: Slot, role: EngineRole) -> PodObs {
    PodObs {
        name: names::engine("data", slot),
        node: Some(if slot == Slot::A { "n1" } else { "n2" }.into()),
        phase: "Running".into(),
        ready: true,
        not_ready_since: None,
        deleting: false,
        role: Some(role),
        disruption_allowed: None,
    }
}

/// Nothing exists yet: two ready nodes and a token to create the Secret with.
fn nothing() -> Observed {
    Observed {
        now: now(),
        nodes: [node("n1"), node("n2")],
        pods: [None, None],
        engines: [None, None],
        secret_exists: false,
        token: Some("tok".into()),
        pv: None,
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

/// An established pair: slot a primary at epoch 1, slot b its secondary, both serving.
fn pair() -> Observed {
    Observed {
        pods: [
            Some(pod(Slot::A, EngineRole::Primary)),
            Some(pod(Slot::B, EngineRole::Secondary)),
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
        pv: Some(PvObs {
            capacity: Some("1Gi".into()),
            claim: None,
            follows_label: true,
        }),
        ..nothing()
    }
}

fn plan_of(decision: Decision) -> Plan {
    match decision {
        Decision::Act(plan) => *plan,
        Decision::TakeOver(p) => panic!("unexpected takeover to {:?}", p.intent.to),
    }
}

fn pending(decision: Decision) -> Pending {
    match decision {
        Decision::TakeOver(p) => p,
        Decision::Act(plan) => panic!("no takeover: {:?}", plan.notes),
    }
}

fn reasons(plan: &Plan) -> Vec<&str> {
    plan.notes.iter().map(|n| n.reason).collect()
}

fn roles(children: &Desired) -> Vec<(String, String)> {
    children
        .pods
        .iter()
        .map(|p| {
            let role = p.metadata.annotations.as_ref().unwrap()[ROLE_ANNOTATION].clone();
            (p.name_any(), role)
        })
        .collect()
}

#[test]
fn a_new_volume_creates_its_token_services_engines_and_pv() {
    let mv = MirroredVolume::test().finalized();
    let plan = plan_of(decide(&mv, &nothing(), &EngineConfig::default()));
    let children = plan.children.as_ref().unwrap();
    assert!(children.secret.is_some());
    assert_eq!(children.services.len(), 2);
    assert_eq!(
        roles(children),
        [
            (
                format!("{}-engine-a", crate::fixtures::key()),
                "primary".to_string()
            ),
            (
                format!("{}-engine-b", crate::fixtures::key()),
                "secondary".to_string()
            )
        ]
    );
    assert!(children.pv.is_some() && children.claim.is_none());
    assert!(plan.deletions.is_empty() && plan.release.pods.is_empty());
    assert_eq!(plan.status.nodes, ["n1", "n2"]);
    assert_eq!(
        plan.status.primary, None,
        "no primary before an engine says so"
    );
    assert_eq!(
        reasons(&plan),
        [
            "Placed",
            "TokenCreated",
            "EngineCreated",
            "EngineCreated",
            "PersistentVolumeCreated"
        ]
    );
}

#[test]
fn a_missing_secondary_pod_is_recreated_as_secondary() {
    let mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    let mut observed = pair();
    observed.pods[1] = None;
    observed.engines[1] = None;
    let plan = plan_of(decide(&mv, &observed, &EngineConfig::default()));
    let children = plan.children.as_ref().unwrap();
    assert_eq!(
        roles(children),
        [(
            format!("{}-engine-b", crate::fixtures::key()),
            "secondary".to_string()
        )]
    );
    assert!(children.secret.is_none() && children.pv.is_none());
    assert_eq!(reasons(&plan), ["EngineCreated"]);
    assert_eq!(plan.status.primary.as_ref().map(|p| p.slot), Some(Slot::A));
}

#[test]
fn a_missing_primary_pod_past_its_restart_grace_asks_the_secondary_to_take_over_first() {
    let mut mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    if let Some(s) = mv.status.as_mut() {
        s.engine_restart = Some(crate::crd::EngineRestart {
            slot: Slot::A,
            node: "n1".into(),
            since: now()
                .checked_sub(SignedDuration::from_secs(120))
                .unwrap()
                .to_string(),
            reason: "engine pod missing".into(),
        });
    }
    let mut observed = pair();
    observed.pods[0] = None;
    observed.engines[0] = None;
    let pending = pending(decide(&mv, &observed, &EngineConfig::default()));
    assert_eq!(
        (
            pending.intent.to,
            pending.intent.reason,
            pending.intent.force
        ),
        (Slot::B, "PrimaryPodLost", false)
    );
    assert_eq!(pending.token(), Some("tok"));

    // Once slot b answered ready, slot a comes back as its secondary.
    let attempt = TakeoverAttempt {
        result: Ok(TakeoverOutcome {
            epoch: 2,
            ..Default::default()
        }),
        answer: None,
    };
    let plan = pending.after(&mv, &EngineConfig::default(), attempt);
    assert_eq!(plan.status.epoch, 2);
    assert_eq!(plan.status.primary.as_ref().map(|p| p.slot), Some(Slot::B));
    let children = plan.children.as_ref().unwrap();
    assert_eq!(
        roles(children),
        [(
            format!("{}-engine-a", crate::fixtures::key()),
            "secondary".to_string()
        )]
    );
    let engine_b = plan.observed.engine(Slot::B).unwrap();
    assert_eq!(
        (engine_b.role, engine_b.epoch),
        (Some(EngineRole::Primary), 2)
    );
    assert_eq!(
        reasons(&plan),
        ["TakeoverStarted", "TakeoverCompleted", "EngineCreated"]
    );
}

#[test]
fn a_lost_primary_node_is_taken_over_and_its_pod_fenced() {
    let mut mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    mv.spec.failover.policy = FailoverPolicy::ForcePromote;
    let mut observed = pair();
    observed.nodes[0].ready = false;
    observed.engines[0] = None;
    let pending = pending(decide(&mv, &observed, &EngineConfig::default()));
    assert_eq!(pending.intent.to, Slot::B);
    assert_eq!(pending.intent.reason, "PrimaryNodeLost");

    let attempt = TakeoverAttempt {
        result: Ok(TakeoverOutcome {
            epoch: 2,
            lost_blocks: 3,
            ..Default::default()
        }),
        answer: Some(engine_state(EngineRole::Primary, 2, PairState::Reversing)),
    };
    let plan = pending.after(&mv, &EngineConfig::default(), attempt);
    assert_eq!(
        plan.status.primary.as_ref().map(|p| p.node.as_str()),
        Some("n2")
    );
    assert_eq!(plan.status.lost_nodes[0].node, "n1");
    assert_eq!(
        plan.deletions,
        [PodDeletion {
            slot: Slot::A,
            name: "data-engine-a".into(),
            force: true,
            reason: "EngineNodeLost"
        }]
    );
    assert!(
        plan.children.as_ref().unwrap().pods.is_empty(),
        "the fenced pod is recreated on a later pass"
    );
    assert_eq!(
        plan.observed.engine(Slot::B).map(|e| e.pair_state),
        Some(PairState::Reversing),
        "the new primary's own answer"
    );
    assert_eq!(
        reasons(&plan),
        [
            "NodeLost",
            "TakeoverStarted",
            "TakeoverCompleted",
            "EngineNodeLost"
        ]
    );
}

#[test]
fn a_refused_takeover_keeps_the_primary_and_retries_soon() {
    let mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    let mut observed = pair();
    observed.pods[0] = Some(PodObs {
        ready: false,
        not_ready_since: now().checked_sub(SignedDuration::from_secs(120)).ok(),
        ..pod(Slot::A, EngineRole::Primary)
    });
    observed.engines[0] = None;
    let pending = pending(decide(&mv, &observed, &EngineConfig::default()));
    assert_eq!(pending.intent.reason, "PrimaryUnready");
    let attempt = TakeoverAttempt {
        result: Err(EngineError::HandoffBlocked {
            address: "b".into(),
            message: "HandoffBlocked: PeerUnreachable".into(),
        }),
        answer: None,
    };
    let plan = pending.after(&mv, &EngineConfig::default(), attempt);
    assert_eq!(plan.requeue, Some(Duration::from_secs(5)));
    assert_eq!(plan.status.epoch, 1);
    assert_eq!(plan.status.primary.as_ref().map(|p| p.slot), Some(Slot::A));
    let takeover = plan.status.takeover.as_ref().unwrap();
    assert_eq!(
        (takeover.attempts, takeover.completed_at.as_ref()),
        (1, None)
    );
    assert_eq!(reasons(&plan), ["TakeoverStarted", "HandoffBlocked"]);
}

#[test]
fn an_invalid_spec_plans_no_children() {
    let mut mv = MirroredVolume::test().finalized();
    mv.spec.engine_storage.host_path = None;
    let plan = plan_of(decide(&mv, &nothing(), &EngineConfig::default()));
    assert!(plan.children.is_err());
    assert_eq!(
        reasons(&plan),
        ["Placed"],
        "no event for children never created"
    );
}

/// At a live move's cutover the new node gets the volume's label in the pass that releases the old
/// engine (act labels before it deletes), and the old node loses it once the move is Finishing.
#[test]
fn the_cutover_moves_the_node_label_before_the_old_engine_goes() {
    use crate::{
        crd::{MovePhase, MoveStatus},
        engine::{MoveProgress, MoveState},
    };
    let cfg = EngineConfig::default();
    let mut mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    mv.spec.placement.nodes = Some(vec!["n1".into(), "n3".into()]);
    if let Some(s) = mv.status.as_mut() {
        s.moving = Some(MoveStatus {
            phase: MovePhase::CuttingOver,
            slot: Slot::B,
            from: "n2".into(),
            to: "n3".into(),
            generation: 1,
            ..Default::default()
        });
    }
    let mut o = pair();
    let mut n3 = node("n3");
    n3.labeled = false;
    o.moving.target_node = Some(n3);
    o.moving.pod = Some(PodObs {
        name: names::engine_instance(&plan::key(&mv), Slot::B, 1),
        ..pod(Slot::B, EngineRole::Secondary)
    });
    o.moving.progress = Some(Ok(MoveProgress {
        state: MoveState::Done,
        target: plan::engine_address_at(&mv, Slot::B, 1, &cfg),
        ..Default::default()
    }));
    let plan = plan_of(decide(&mv, &o, &cfg));
    assert_eq!(plan.status.nodes, ["n1", "n3"]);
    assert_eq!(plan.label, ["n3"], "the new node is labelled in this pass");
    assert_eq!(
        plan.moving.delete,
        [names::engine(&plan::key(&mv), Slot::B)],
        "and the old engine released after it"
    );
    assert_eq!(
        plan.moving.unlabel, None,
        "the old node keeps it until Finishing"
    );

    // Next pass, Finishing: n3 labelled now, n2 loses the label.
    let mv = mv.with_status(plan.status);
    let mut o = pair();
    o.nodes = [node("n1"), node("n3")];
    o.moving.old_node = Some(node("n2"));
    o.moving.old_pod = true;
    let plan = plan_of(decide(&mv, &o, &cfg));
    assert!(plan.label.is_empty(), "{:?}", plan.label);
    assert_eq!(plan.moving.unlabel.as_deref(), Some("n2"));

    // A fresh volume: both nodes, before the status that names them is written.
    let plan = plan_of(decide(
        &MirroredVolume::test().finalized(),
        &Observed {
            nodes: [
                NodeObs {
                    labeled: false,
                    ..node("n1")
                },
                NodeObs {
                    labeled: false,
                    ..node("n2")
                },
            ],
            ..nothing()
        },
        &cfg,
    ));
    assert_eq!(plan.label, ["n1", "n2"]);
}
