//! The disruption rules on plain observations (the whole pass is in controller/decide_disruption_tests.rs).

use k8s_openapi::jiff::SignedDuration;
use tandem_api::pb::TakeoverPhase;

use super::*;
use crate::{
    crd::MirroredVolume,
    engine::EngineState,
    fixtures::engine_state,
    observed::{NodeObs, PodObs, PvObs},
};

/// A change to the observation.
type Breakage = Box<dyn Fn(&mut Observed)>;

const T: Duration = Duration::from_secs(30);
const GRACE: Duration = Duration::from_secs(60);

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn node(name: &str) -> NodeObs {
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

fn pod(slot: Slot, allowed: Option<bool>) -> PodObs {
    PodObs {
        name: format!("data-engine-{}", slot.as_str()),
        node: Some(if slot == Slot::A { "n1" } else { "n2" }.into()),
        phase: "Running".into(),
        ready: true,
        deleting: false,
        disruption_allowed: allowed,
        ..Default::default()
    }
}

/// Slot a primary at epoch 1, in sync with slot b.
fn synced() -> Observed {
    Observed {
        witness: crate::witness::LeaseClock::long_ago(10_000),
        certs: Default::default(),
        conflict: None,
        moving: Default::default(),
        now: now(),
        nodes: [node("n1"), node("n2")],
        pods: [
            Some(pod(Slot::A, Some(false))),
            Some(pod(Slot::B, Some(false))),
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
        token: None,
        pv: Some(PvObs::default()),
        claim_exists: false,
        engine_pvcs: [false, false],
        workloads: vec![],
        attachments: vec![],
    }
}

fn status(primary: Slot) -> MirroredVolumeStatus {
    MirroredVolume::test()
        .established(primary, 1)
        .status
        .unwrap()
}

#[test]
fn a_restart_within_the_grace_is_not_a_failover() {
    let mut st = status(Slot::A);
    let mut o = synced();
    o.pods[0] = None;
    o.engines[0] = None;
    let (restart, events) = track_restart(&mut st, &o, GRACE);
    assert_eq!(restart, Restart::Waiting(GRACE));
    assert_eq!(events[0].reason, "EngineRestarting");
    let r = st.engine_restart.clone().unwrap();
    assert_eq!((r.slot, r.node.as_str()), (Slot::A, "n1"));
    // The failover path alone would take over at once; the restart rule holds it back.
    let mut d = crate::failover::decide(&crate::crd::MirroredVolumeSpec::default(), &st, &o, T);
    assert!(d.takeover.is_some(), "the failover path sees a pod loss");
    gate_restart(
        &mut d,
        restart,
        &crate::crd::MirroredVolumeSpec::default(),
        &st,
        &o,
        T,
    );
    assert_eq!((d.takeover, d.recheck), (None, Some(GRACE)));

    // Seen again 59 s later, the grace is counted from the first sight.
    o.now = now().checked_add(SignedDuration::from_secs(59)).unwrap();
    let (restart, events) = track_restart(&mut st, &o, GRACE);
    assert_eq!(restart, Restart::Waiting(Duration::from_secs(1)));
    assert!(events.is_empty());

    // An unready pod has been away since it turned unready.
    let mut st = status(Slot::A);
    let mut o = synced();
    o.pods[0].as_mut().unwrap().ready = false;
    o.pods[0].as_mut().unwrap().not_ready_since =
        now().checked_sub(SignedDuration::from_secs(50)).ok();
    assert_eq!(
        track_restart(&mut st, &o, GRACE).0,
        Restart::Waiting(Duration::from_secs(10))
    );
}

#[test]
fn after_the_grace_the_failover_loss_is_taken_over() {
    let mut st = status(Slot::A);
    let mut o = synced();
    // The recreated pod is Pending: the failover path would wait its own peer timeout from its creation.
    o.pods[0] = Some(PodObs {
        phase: "Pending".into(),
        ready: false,
        not_ready_since: now().checked_sub(SignedDuration::from_secs(1)).ok(),
        ..pod(Slot::A, Some(false))
    });
    o.engines[0] = None;
    st.engine_restart = Some(EngineRestart {
        slot: Slot::A,
        node: "n1".into(),
        since: now()
            .checked_sub(SignedDuration::from_secs(61))
            .unwrap()
            .to_string(),
        reason: "engine pod deleted".into(),
    });
    let (restart, _) = track_restart(&mut st, &o, GRACE);
    assert_eq!(restart, Restart::Expired);
    let mut d = crate::failover::decide(&crate::crd::MirroredVolumeSpec::default(), &st, &o, T);
    assert_eq!(d.takeover, None);
    gate_restart(
        &mut d,
        restart,
        &crate::crd::MirroredVolumeSpec::default(),
        &st,
        &o,
        T,
    );
    let t = d.takeover.expect("a takeover past the grace");
    // WaitForPrimary (the default spec): a handoff, never forced.
    assert_eq!(
        (t.to, t.reason, t.force),
        (Slot::B, "PrimaryUnready", false)
    );
    // A restart whose engine came back ends without a takeover.
    let o = synced();
    let (restart, events) = track_restart(&mut st, &o, GRACE);
    assert_eq!(restart, Restart::Idle);
    assert_eq!(st.engine_restart, None);
    assert_eq!(events[0].reason, "EngineRestarted");
}

#[test]
fn a_lost_node_is_not_a_restart() {
    let mut st = status(Slot::A);
    let mut o = synced();
    o.nodes[0].ready = false;
    o.engines[0] = None;
    assert_eq!(track_restart(&mut st, &o, GRACE).0, Restart::Idle);
    assert_eq!(st.engine_restart, None);
}

#[test]
fn the_primary_is_never_evictable() {
    let st = status(Slot::A);
    let mut o = synced();
    // In sync: only the secondary's pod is released.
    assert_eq!(
        label_changes(&st, &o),
        vec![LabelChange {
            slot: Slot::B,
            pod: "data-engine-b".into(),
            allowed: true
        }]
    );
    // A primary labelled "true" (say, just promoted by the CSI plugin) is put back under the budget.
    o.pods[0].as_mut().unwrap().disruption_allowed = Some(true);
    o.pods[1].as_mut().unwrap().disruption_allowed = Some(true);
    let changes = label_changes(&st, &o);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!((changes[0].slot, changes[0].allowed), (Slot::A, false));
    // Not in sync (backlog, resync, reversing, draining, secondary silent): the secondary stays too.
    let breakages: Vec<Breakage> = vec![
        Box::new(|o| o.engines[0].as_mut().unwrap().pending_blocks = 3),
        Box::new(|o| o.engines[0].as_mut().unwrap().pair_state = PairState::Replicating),
        Box::new(|o| o.engines[0].as_mut().unwrap().pair_state = PairState::Reversing),
        Box::new(|o| o.engines[0].as_mut().unwrap().takeover_phase = TakeoverPhase::Draining),
        Box::new(|o| o.engines[1] = None),
        Box::new(|o| {
            o.engines[1] = Some(EngineState {
                role: Some(EngineRole::Fenced),
                ..Default::default()
            })
        }),
    ];
    for (i, b) in breakages.iter().enumerate() {
        let mut o = synced();
        o.pods[1].as_mut().unwrap().disruption_allowed = Some(true);
        b(&mut o);
        assert_eq!(
            label_changes(&st, &o),
            vec![LabelChange {
                slot: Slot::B,
                pod: "data-engine-b".into(),
                allowed: false
            }],
            "case {i}"
        );
    }
}

#[test]
fn a_cordoned_primary_node_switches_over_only_to_a_healthy_secondary() {
    let st = status(Slot::A);
    let mut o = synced();
    assert_eq!(switchover(&st, &o, T), Switchover::None);
    o.nodes[0].unschedulable = true;
    let Switchover::Go(intent) = switchover(&st, &o, T) else {
        panic!("{:?}", switchover(&st, &o, T))
    };
    assert_eq!((intent.to, intent.reason), (Slot::B, SWITCHOVER_REASON));
    assert!(
        !intent.force,
        "a planned switchover is a handoff, never forced"
    );
    // Async lag is fine: the handoff carries the table.
    o.engines[0].as_mut().unwrap().pair_state = PairState::Replicating;
    assert!(matches!(switchover(&st, &o, T), Switchover::Go(_)));
    let blocked: Vec<(&str, Breakage)> = vec![
        (
            "not ready",
            Box::new(|o| o.pods[1].as_mut().unwrap().ready = false),
        ),
        ("does not answer", Box::new(|o| o.engines[1] = None)),
        (
            "cordoned too",
            Box::new(|o| o.nodes[1].unschedulable = true),
        ),
        (
            "not a streaming mirror",
            Box::new(|o| o.engines[0].as_mut().unwrap().pair_state = PairState::Resyncing),
        ),
    ];
    for (why, b) in blocked {
        let mut o = o.clone();
        b(&mut o);
        match switchover(&st, &o, T) {
            Switchover::Blocked(text) => assert!(text.contains(why), "{text}"),
            other => panic!("{why}: {other:?}"),
        }
    }
    // Once the primary moved, the cordoned node holds the secondary: nothing more to switch.
    assert_eq!(switchover(&status(Slot::B), &o, T), Switchover::None);
}

#[test]
fn the_budget_selects_the_engines_that_must_stay() {
    let pdb = budget(
        &MirroredVolume::test(),
        &crate::plan::EngineConfig::default(),
    );
    let key = crate::plan::key(&MirroredVolume::test());
    assert_eq!(pdb.metadata.name, Some(format!("{key}-engines")));
    // With the engines, in the operator's namespace; no owner reference across namespaces.
    assert_eq!(pdb.metadata.namespace.as_deref(), Some("tandem-system"));
    assert!(pdb.metadata.owner_references.is_none());
    let spec = pdb.spec.unwrap();
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(0)));
    let labels = spec.selector.unwrap().match_labels.unwrap();
    assert_eq!(labels[VOLUME_LABEL], key);
    assert_eq!(labels[DISRUPTION_LABEL], "false");
}
