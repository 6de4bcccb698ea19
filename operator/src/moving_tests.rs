//! `moving::track`, phase by phase and refusal by refusal, on plain values (no API server, no engines;
//! tests/failover_engines.rs has a real move).

use k8s_openapi::jiff::SignedDuration;
use tandem_api::pb::PairState;

use super::*;
use crate::{
    crd::{EngineRole, MirroredVolume, MoveStatus, Slot},
    engine::{MoveProgress, MoveState},
    fixtures::{engine_state, observed_pair},
    observed::{MovePvc, NodeObs, PodObs},
};

const TIMEOUT: Duration = Duration::from_secs(30);

fn cfg() -> EngineConfig {
    EngineConfig::default()
}

/// `default/data` on n1 (primary, slot a) and n2, asked to put slot b on n3.
fn asking(nodes: [&str; 2]) -> MirroredVolume {
    let mut mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    mv.spec.placement.nodes = Some(nodes.map(String::from).to_vec());
    mv
}

fn pod(name: &str, ready: bool) -> PodObs {
    PodObs {
        name: name.into(),
        phase: "Running".into(),
        ready,
        ..Default::default()
    }
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

/// A pair in sync: slot a primary at epoch 1 streaming to slot b; the asked node n3 is Ready.
fn synced() -> Observed {
    let mut o = observed_pair();
    let key = plan::key(&MirroredVolume::test());
    o.pods = [
        Some(pod(&names::engine(&key, Slot::A), true)),
        Some(pod(&names::engine(&key, Slot::B), true)),
    ];
    o.engines = [
        Some(engine_state(EngineRole::Primary, 1, PairState::Synced)),
        Some(engine_state(
            EngineRole::Secondary,
            1,
            PairState::Consistent,
        )),
    ];
    o.moving.target_node = Some(node("n3"));
    o
}

fn key() -> String {
    plan::key(&MirroredVolume::test())
}

fn reasons(step: &Step) -> Vec<&str> {
    step.events.iter().map(|e| e.reason).collect()
}

/// The status after one pass of `track`.
fn pass(mv: &MirroredVolume, o: &Observed, busy: Option<&str>) -> (MirroredVolumeStatus, Step) {
    let mut status = mv.status.clone().unwrap_or_default();
    let step = track(mv, &mut status, o, TIMEOUT, busy, &cfg());
    (status, step)
}

fn rec(status: &MirroredVolumeStatus) -> &MoveStatus {
    status.moving.as_ref().expect("status.move")
}

/// `mv` with its status after a pass, ready for the next one.
fn next(mv: &MirroredVolume, status: MirroredVolumeStatus) -> MirroredVolume {
    mv.clone().with_status(status)
}

fn in_phase(mv: &MirroredVolume, phase: MovePhase) -> MirroredVolume {
    let mut status = mv.status.clone().unwrap_or_default();
    status.moving = Some(MoveStatus {
        phase,
        slot: Slot::B,
        from: "n2".into(),
        to: "n3".into(),
        generation: 1,
        total_bytes: 1 << 30,
        ..Default::default()
    });
    next(mv, status)
}

/// A move from n2 to n3 past its cutover: slot B's engine now lives on n3, at its next generation.
fn finishing(mv: MirroredVolume) -> MirroredVolume {
    let mut mv = in_phase(&mv, MovePhase::Finishing);
    if let Some(s) = mv.status.as_mut() {
        s.nodes = vec!["n1".into(), "n3".into()];
        s.slot_generations = vec![0, 1];
    }
    mv
}

/// The pair synced, the old engine's pod still there, and its node as given.
fn old_engine_still_up(old_node: NodeObs) -> Observed {
    let mut o = synced();
    o.moving.old_pod = true;
    o.moving.old_node = Some(old_node);
    o
}

fn target() -> String {
    plan::engine_address_at(&MirroredVolume::test(), Slot::B, 1, &cfg())
}

#[test]
fn a_placement_edit_of_the_secondary_empties_the_new_node_first() {
    let mv = asking(["n1", "n3"]);
    let (status, step) = pass(&mv, &synced(), None);
    let r = rec(&status);
    assert_eq!(
        (
            r.phase,
            r.slot,
            r.from.as_str(),
            r.to.as_str(),
            r.generation
        ),
        (MovePhase::Preparing, Slot::B, "n2", "n3", 1)
    );
    assert!(r.started_at.is_some());
    assert_eq!(reasons(&step), ["MoveRequested", "MoveStarted"]);
    let wipe = step.wipe.expect("a wipe pod on the new node");
    assert_eq!(
        (wipe.name, wipe.node.as_str()),
        (format!("{}-wipe-b-m1", key()), "n3")
    );
    assert_eq!(step.start, None);
    // The recorded nodes stay until the cutover.
    assert_eq!(status.nodes, ["n1", "n2"]);
}

#[test]
fn a_finished_wipe_starts_the_new_engine_and_a_serving_one_is_asked_to_copy() {
    let mv = in_phase(&asking(["n1", "n3"]), MovePhase::Preparing);
    let mut o = synced();
    o.moving.wipe = Some(PodObs {
        phase: "Running".into(),
        ..pod("w", false)
    });
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Preparing, "the wipe runs");
    assert_eq!(step.wipe, None, "applied once");
    o.moving.wipe = Some(PodObs {
        phase: "Succeeded".into(),
        ..pod("w", false)
    });
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Starting);
    assert_eq!(step.wiped, [format!("{}-wipe-b-m1", key())]);

    // Starting: the new pod and its Service are children; no StartMove before the engine serves.
    let mv = next(&mv, status);
    let o = synced();
    let children = plan::desired(&mv, mv.status.as_ref().unwrap(), &o, &cfg(), None, &[]).unwrap();
    let new = format!("{}-engine-b-m1", key());
    assert!(children
        .pods
        .iter()
        .any(|p| p.metadata.name.as_deref() == Some(new.as_str())));
    assert!(children
        .services
        .iter()
        .any(|s| s.metadata.name.as_deref() == Some(new.as_str())));
    let pod_spec = children
        .pods
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(new.as_str()))
        .and_then(|p| p.spec.clone())
        .unwrap();
    let args = pod_spec.containers[0].args.clone().unwrap();
    let flag = |f: &str| args[args.iter().position(|a| a == f).unwrap() + 1].clone();
    assert_eq!(flag("--role"), "secondary");
    assert_eq!(flag("--peer"), plan::engine_address(&mv, Slot::A, &cfg()));
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(
        (rec(&status).phase, step.start),
        (MovePhase::Starting, None)
    );

    let mut o = synced();
    o.moving.pod = Some(pod(&new, true));
    o.moving.engine = Some(engine_state(
        EngineRole::Secondary,
        0,
        PairState::Inconsistent,
    ));
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(step.start, Some(target()));
    assert_eq!(
        rec(&status).phase,
        MovePhase::Starting,
        "act records the answer"
    );
}

#[test]
fn the_copy_is_shown_then_the_cutover_makes_the_new_instance_the_slots() {
    let mv = in_phase(&asking(["n1", "n3"]), MovePhase::Copying);
    let new = format!("{}-engine-b-m1", key());
    let mut o = synced();
    o.moving.pod = Some(pod(&new, true));
    let progress = |state, copied| {
        Some(Ok(MoveProgress {
            state,
            target: target(),
            copied_bytes: copied,
            total_bytes: 1 << 30,
            message: String::new(),
        }))
    };
    o.moving.progress = progress(MoveState::Copying, 1 << 20);
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(
        (rec(&status).phase, rec(&status).copied_bytes),
        (MovePhase::Copying, 1 << 20)
    );
    assert!(step.recheck.is_some());
    o.moving.progress = progress(MoveState::Cutover, 1 << 30);
    let (status, _) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::CuttingOver);

    o.moving.progress = progress(MoveState::Done, 1 << 30);
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Finishing);
    assert_eq!(status.slot_generations, [0, 1]);
    assert_eq!(status.nodes, ["n1", "n3"]);
    assert_eq!(
        step.delete,
        [format!("{}-engine-b", key())],
        "the old instance goes"
    );
    assert_eq!(reasons(&step), ["MoveCutOver"]);
    // From now on slot b is reached at the new instance's address, the one the primary stored.
    let mv = next(&mv, status);
    assert_eq!(plan::engine_address(&mv, Slot::B, &cfg()), target());
    let attrs = plan::engines_attribute(&mv, &["n1".into(), "n3".into()], &cfg());
    assert!(attrs.ends_with(&format!("n3={}", target())), "{attrs}");
}

#[test]
fn finishing_deletes_the_old_pod_then_wipes_the_old_node_then_is_done() {
    let mv = finishing(asking(["n1", "n3"]));
    let mut o = old_engine_still_up(node("n2"));
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Finishing);
    assert_eq!(step.delete, [format!("{}-engine-b", key())]);
    assert!(!step.force, "its node is up: a graceful delete");
    assert_eq!(step.wipe, None, "not while the old engine may still run");
    // The old node holds no engine of the volume any more: workloads no longer go there.
    assert_eq!(step.unlabel.as_deref(), Some("n2"));
    o.moving.old_node.as_mut().unwrap().labeled = false;

    o.moving.old_pod = false;
    let (_, step) = pass(&mv, &o, None);
    let wipe = step.wipe.expect("the old node's wipe");
    assert_eq!(
        (wipe.name, wipe.node.as_str()),
        (format!("{}-wipe-b-m1-old", key()), "n2")
    );
    o.moving.wipe = Some(PodObs {
        phase: "Succeeded".into(),
        ..pod("w", false)
    });
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Done);
    assert!(rec(&status).completed_at.is_some());
    assert_eq!(reasons(&step), ["MoveCompleted"]);
    assert_eq!(step.recheck, None);

    // Done stays Done: the spec matches the recorded nodes, nothing else is asked.
    let mv = next(&mv, status);
    let (status, step) = pass(&mv, &synced(), None);
    assert_eq!(rec(&status).phase, MovePhase::Done);
    assert_eq!(step, Step::default());
}

#[test]
fn a_move_waits_while_the_secondary_is_not_a_streaming_mirror() {
    let mv = asking(["n1", "n3"]);
    let mut o = synced();
    o.engines[0] = Some(engine_state(EngineRole::Primary, 1, PairState::Resyncing));
    let (status, step) = pass(&mv, &o, None);
    let r = rec(&status);
    assert_eq!(r.phase, MovePhase::Pending);
    assert!(r.message.contains("streaming mirror"), "{}", r.message);
    assert_eq!(reasons(&step), ["MoveRequested", "MoveWaits"]);
    assert_eq!((step.wipe, step.start), (None, None), "nothing done");

    // The same reason again: no second event.
    let mv2 = next(&mv, status);
    let (_, step) = pass(&mv2, &o, None);
    assert!(step.events.is_empty(), "{:?}", reasons(&step));

    // Another takeover of this pass, or a node that is not Ready: waits too.
    let (status, _) = pass(&mv, &synced(), Some("another takeover goes first"));
    assert_eq!(rec(&status).phase, MovePhase::Pending);
    let mut o = synced();
    o.moving.target_node = Some(NodeObs::missing("n3"));
    let (status, _) = pass(&mv, &o, None);
    assert!(rec(&status).message.contains("does not exist"));
}

#[test]
fn refused_edits_change_nothing_and_are_not_retried() {
    let mut mv = asking(["n1", "n3"]);
    mv.spec.primary_node = Some("n2".into());
    let (status, step) = pass(&mv, &synced(), None);
    assert_eq!(rec(&status).phase, MovePhase::Refused);
    assert!(rec(&status).message.contains("primaryNode"));
    assert!(reasons(&step).contains(&"MoveRefused"));
    assert_eq!((step.wipe, step.start), (None, None));
    let (again, step) = pass(&next(&mv, status.clone()), &synced(), None);
    assert_eq!(again.moving, status.moving);
    assert!(step.events.is_empty());

    // The spec back where the engines are: the refusal goes.
    let mut back = next(&mv, status);
    back.spec.placement.nodes = Some(vec!["n1".into(), "n2".into()]);
    let (status, _) = pass(&back, &synced(), None);
    assert_eq!(status.moving, None);
}

#[test]
fn a_lost_new_engine_is_aborted_and_removed_only_once_the_primary_rolled_back() {
    let mv = in_phase(&asking(["n1", "n3"]), MovePhase::Copying);
    let new = format!("{}-engine-b-m1", key());
    let mut o = synced();
    o.moving.pod = Some(PodObs {
        phase: "Failed".into(),
        ..pod(&new, false)
    });
    o.moving.progress = Some(Ok(MoveProgress {
        state: MoveState::Copying,
        target: target(),
        ..Default::default()
    }));
    let (mut status, step) = pass(&mv, &o, None);
    let abort = step.abort.expect("AbortMove");
    assert_eq!(abort.delete, new);
    assert!(
        step.delete.is_empty(),
        "nothing deleted before the primary answers"
    );
    assert_eq!(rec(&status).phase, MovePhase::Copying);
    // The primary answered ABORTED (act): Failed, the old pair as it was.
    let ev = aborted(&mut status, &abort.why, "now").unwrap();
    assert_eq!(ev.reason, "MoveFailed");
    assert_eq!(rec(&status).phase, MovePhase::Failed);
    assert_eq!(status.nodes, ["n1", "n2"]);
    assert!(status.slot_generations.is_empty());
    // Not retried for the same spec.
    let (again, step) = pass(&next(&mv, status.clone()), &synced(), None);
    assert_eq!(rec(&again).phase, MovePhase::Failed);
    assert_eq!(step, Step::default());
}

#[test]
fn an_abort_by_the_primary_fails_the_move_and_removes_the_new_engine() {
    let mv = in_phase(&asking(["n1", "n3"]), MovePhase::CuttingOver);
    let new = format!("{}-engine-b-m1", key());
    let mut o = synced();
    o.moving.pod = Some(pod(&new, true));
    o.moving.progress = Some(Ok(MoveProgress {
        state: MoveState::Aborted,
        target: target(),
        message: "new engine refused".into(),
        ..Default::default()
    }));
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Failed);
    assert!(rec(&status).message.contains("new engine refused"));
    assert_eq!(step.delete, [new]);
    assert_eq!(reasons(&step), ["MoveFailed"]);
}

#[test]
fn the_primarys_node_is_switched_over_first_then_moved_as_the_secondary() {
    let mv = asking(["n3", "n2"]);
    let (status, step) = pass(&mv, &synced(), None);
    let t = step.takeover.expect("a switchover first");
    assert_eq!(
        (t.to, t.reason, t.force),
        (Slot::B, crate::switchover::REASON, false)
    );
    let r = rec(&status);
    assert_eq!((r.phase, r.slot), (MovePhase::Pending, Slot::A));
    assert!(r.message.contains("switching it over"), "{}", r.message);
    // Once slot b is the primary, slot a moves as the secondary.
    let mut after = MirroredVolume::test().finalized().established(Slot::B, 2);
    after.spec.placement.nodes = Some(vec!["n3".into(), "n2".into()]);
    let mut o = synced();
    o.engines = [
        Some(engine_state(
            EngineRole::Secondary,
            2,
            PairState::Consistent,
        )),
        Some(engine_state(EngineRole::Primary, 2, PairState::Synced)),
    ];
    let (status, step) = pass(&after, &o, None);
    assert_eq!(step.takeover, None);
    assert_eq!(
        (rec(&status).phase, rec(&status).slot),
        (MovePhase::Preparing, Slot::A)
    );
}

#[test]
fn two_replaced_nodes_move_one_at_a_time_the_secondary_first() {
    let mv = asking(["n3", "n4"]);
    let status = mv.status.clone().unwrap();
    assert_eq!(asked(&mv, &status), Some((Slot::B, "n4".into())));
    // A target that still holds the other engine waits for it to leave.
    let mv = asking(["n1", "n1x"]);
    assert_eq!(asked(&mv, &status), Some((Slot::B, "n1x".into())));
    let mut swap = asking(["n1", "n3"]);
    swap.spec.placement.nodes = Some(vec!["n2".into(), "n2".into()]);
    let (status, step) = pass(&swap, &synced(), None);
    assert_eq!(rec(&status).phase, MovePhase::Pending);
    assert!(rec(&status).message.contains("holds the other engine"));
    assert_eq!(step.wipe, None);
}

#[test]
fn the_moving_condition_follows_the_record() {
    let mv = in_phase(&asking(["n1", "n3"]), MovePhase::Copying);
    let mut status = mv.status.clone().unwrap();
    annotate(&mut status, &synced(), Some(2));
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION)
        .unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Copying"));
    status.moving.as_mut().unwrap().phase = MovePhase::Done;
    annotate(&mut status, &synced(), Some(2));
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION)
        .unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Done"));
    status.moving = None;
    annotate(&mut status, &synced(), Some(2));
    assert!(status.conditions.iter().all(|c| c.type_ != CONDITION));
}

/// A PV made before the node label (its affinity names the nodes by hostname, or by the CSI
/// topology key) cannot change: a move would leave workloads unschedulable on the new node, so the
/// edit is refused and the message says what to do.
#[test]
fn a_pv_that_names_its_nodes_refuses_a_move() {
    let mv = asking(["n1", "n3"]);
    let mut o = synced();
    o.pv = Some(crate::observed::PvObs {
        follows_label: false,
        ..Default::default()
    });
    let (status, step) = pass(&mv, &o, None);
    let r = rec(&status);
    assert_eq!(r.phase, MovePhase::Refused);
    assert!(
        r.message.contains("PersistentVolume tandem.default.data")
            && r.message
                .contains("delete their claim and PersistentVolume"),
        "{}",
        r.message
    );
    assert_eq!(reasons(&step), ["MoveRequested", "MoveRefused"]);
    assert_eq!((step.wipe, step.start), (None, None));
    assert_eq!(status.nodes, ["n1", "n2"]);
    // A provisioned volume's PV is the provisioner's: the way out is a clone.
    let mut provisioned = mv.clone();
    provisioned.spec.persistent_volume_name = Some("pvc-1".into());
    let (status, _) = pass(&provisioned, &o, None);
    assert!(rec(&status).message.contains("clone the claim"));
    // A PV that selects the volume's label moves.
    o.pv.as_mut().unwrap().follows_label = true;
    let (status, _) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Preparing);
}

/// The node being left is lost while Finishing: its wipe pod would never run, so the move ends
/// without it (WipeSkipped names what stays there), the old pod is deleted at once and the node
/// loses the volume's label. A node NotReady for less than the patience is waited for.
#[test]
fn a_lost_old_node_finishes_the_move_without_its_wipe() {
    let mut mv = finishing(asking(["n1", "n3"]));
    if let Some(s) = mv.status.as_mut() {
        s.data_dir = Some("/var/lib/tandem/default/data-u1".into());
    }
    let mut o = synced();
    o.moving.old_pod = true;
    o.moving.wipe = Some(PodObs {
        phase: "Pending".into(),
        ..pod(&format!("{}-wipe-b-m1-old", key()), false)
    });
    // NotReady for 5 minutes: still waited for (the old pod goes gracefully).
    let mut n2 = node("n2");
    n2.ready = false;
    n2.not_ready_since = o.now.checked_sub(SignedDuration::from_secs(300)).ok();
    o.moving.old_node = Some(n2.clone());
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Finishing);
    assert!(!step.force);
    assert!(!reasons(&step).contains(&"WipeSkipped"));

    // NotReady past the patience: done without the wipe.
    n2.not_ready_since = o.now.checked_sub(SignedDuration::from_secs(601)).ok();
    o.moving.old_node = Some(n2);
    let (status, step) = pass(&mv, &o, None);
    let r = rec(&status);
    assert_eq!(r.phase, MovePhase::Done, "{}", r.message);
    assert!(r.message.contains("n2 was not wiped"), "{}", r.message);
    assert_eq!(reasons(&step), ["WipeSkipped", "MoveCompleted"]);
    let skipped = &step.events[0].text;
    assert!(
        skipped.contains("node n2") && skipped.contains("/var/lib/tandem/default/data-u1"),
        "{skipped}"
    );
    assert_eq!(step.delete, [format!("{}-engine-b", key())]);
    assert!(step.force, "no kubelet confirms a graceful delete there");
    assert_eq!(step.wiped, [format!("{}-wipe-b-m1-old", key())]);
    assert_eq!(step.unlabel.as_deref(), Some("n2"));
    assert_eq!(step.recheck, None);

    // A deleted Node object: done at once, nothing to unlabel.
    o.moving.old_node = Some(NodeObs::missing("n2"));
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Done);
    assert!(step.events[0].text.contains("the node is gone"));
    assert_eq!(step.unlabel, None);
}

/// `asking(nodes)` with its engines on PVCs of StorageClass `local-path`.
fn on_claims(mv: MirroredVolume) -> MirroredVolume {
    let mut mv = mv;
    mv.spec.engine_storage.host_path = None;
    mv.spec.engine_storage.storage_class_name = Some("local-path".into());
    mv
}

fn children(mv: &MirroredVolume, o: &Observed) -> plan::Desired {
    plan::desired(mv, mv.status.as_ref().unwrap(), o, &cfg(), None, &[]).unwrap()
}

fn names_of<'a>(metas: impl Iterator<Item = &'a kube::api::ObjectMeta>) -> Vec<String> {
    metas.filter_map(|m| m.name.clone()).collect()
}

fn claim_of(pod: &k8s_openapi::api::core::v1::Pod) -> Option<String> {
    pod.spec.as_ref()?.volumes.as_ref()?.iter().find_map(|v| {
        v.persistent_volume_claim
            .as_ref()
            .map(|c| c.claim_name.clone())
    })
}

/// A StorageClass volume moves: Preparing gives the new instance its own PVC (no wipe pod), applied
/// only once seen absent and waited for before the new pod exists; a claim of that name left by an
/// earlier attempt is deleted first, so the new engine always starts empty.
#[test]
fn a_storage_class_move_gives_the_new_engine_its_own_fresh_pvc() {
    let mv = on_claims(asking(["n1", "n3"]));
    let pvc = format!("{}-engine-b-m1-data", key());
    let new = format!("{}-engine-b-m1", key());
    let mut o = synced();
    o.engine_pvcs = [true, true];
    let (status, step) = pass(&mv, &o, None);
    let r = rec(&status).clone();
    assert_eq!(r.phase, MovePhase::Preparing);
    assert!(r.message.contains(&pvc), "{}", r.message);
    assert_eq!(step.wipe, None, "a fresh claim needs no wipe pod");
    assert_eq!(reasons(&step), ["MoveRequested", "MoveStarted"]);
    // Not looked at yet in this pass: nothing is applied over a claim that may exist.
    let mv = next(&mv, status);
    assert!(children(&mv, &o).engine_pvcs.is_empty());

    // Seen absent: it is created (same size and class as the slot's first one, the instance's
    // labels), and no pod yet.
    o.moving.pvc = MovePvc::Absent;
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Preparing);
    assert!(step.delete_pvcs.is_empty());
    let d = children(&next(&mv, status), &o);
    assert_eq!(
        names_of(d.engine_pvcs.iter().map(|p| &p.metadata)),
        std::slice::from_ref(&pvc)
    );
    assert!(d.pods.is_empty(), "the pod comes once its claim exists");
    let made = &d.engine_pvcs[0];
    let first = plan::engine_pvc(&mv, Slot::B, "local-path", &cfg()).unwrap();
    assert_eq!(made.spec, first.spec, "same size and class");
    let labels = made.metadata.labels.clone().unwrap();
    for (k, v) in first.metadata.labels.clone().unwrap() {
        if k != crate::observed::SLOT_LABEL {
            assert_eq!(labels.get(&k), Some(&v), "owner label {k}");
        }
    }
    assert_eq!(labels[crate::observed::SLOT_LABEL], "b-m1");
    assert_eq!(
        made.metadata.annotations.as_ref().unwrap()[crate::observed::MOVE_ANNOTATION],
        r.started_at.clone().unwrap()
    );

    // A claim of that name from an earlier attempt: deleted and waited out, never used.
    o.moving.pvc = MovePvc::Present {
        deleting: false,
        started_at: Some("2026-01-01T00:00:00Z".into()),
    };
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Preparing);
    assert_eq!(step.delete_pvcs, std::slice::from_ref(&pvc));
    assert!(children(&next(&mv, status), &o).engine_pvcs.is_empty());
    o.moving.pvc = MovePvc::Present {
        deleting: true,
        started_at: Some("2026-01-01T00:00:00Z".into()),
    };
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Preparing);
    assert!(step.delete_pvcs.is_empty(), "deleted once");

    // Ours: Starting, and the new pod (pinned to n3) mounts it.
    o.moving.pvc = MovePvc::Present {
        deleting: false,
        started_at: r.started_at.clone(),
    };
    let (status, _) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Starting);
    let mv = next(&mv, status);
    o.moving.pvc = MovePvc::Unknown;
    let d = children(&mv, &o);
    assert!(d.engine_pvcs.is_empty());
    let pod = d
        .pods
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(new.as_str()))
        .expect("the new pod");
    assert_eq!(claim_of(pod).as_deref(), Some(pvc.as_str()));
    let pinned = serde_json::to_string(&pod.spec.as_ref().unwrap().affinity).unwrap();
    assert!(pinned.contains("\"n3\""), "{pinned}");
}

/// Finishing on PVC storage: the old pod goes first, then the old instance's PVC instead of a wipe
/// pod; after the cutover the slot's claim is the new instance's (the old name is never recreated).
#[test]
fn a_storage_class_move_deletes_the_old_pvc_after_the_old_pod() {
    let mv = finishing(on_claims(asking(["n1", "n3"])));
    let mut o = old_engine_still_up(node("n2"));
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Finishing);
    assert_eq!(step.delete, [format!("{}-engine-b", key())]);
    assert!(step.delete_pvcs.is_empty(), "not while its engine may run");

    o.moving.old_pod = false;
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(step.delete_pvcs, [format!("{}-engine-b-data", key())]);
    assert_eq!(step.wipe, None, "the claim's deletion is the wipe");
    assert_eq!(rec(&status).phase, MovePhase::Done);
    assert!(rec(&status).message.contains("-engine-b-data is deleted"));
    assert_eq!(reasons(&step), ["MoveCompleted"]);

    // The slot's claim is now the new instance's: a missing one is that name, and a missing pod
    // mounts it.
    let mv = next(&mv, status);
    o.engine_pvcs = [true, false];
    o.pods[1] = None;
    let d = children(&mv, &o);
    assert_eq!(
        names_of(d.engine_pvcs.iter().map(|p| &p.metadata)),
        [format!("{}-engine-b-m1-data", key())]
    );
    let pod_b = d
        .pods
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(format!("{}-engine-b-m1", key()).as_str()))
        .expect("slot b's pod");
    assert_eq!(claim_of(pod_b), Some(format!("{}-engine-b-m1-data", key())));
}

/// The node being left is lost: its pod is force-deleted and its PVC deleted in the same pass (the
/// PV behind it is the StorageClass's business, and the warning says so).
#[test]
fn a_lost_old_node_on_pvc_storage_deletes_its_pvc() {
    let mv = finishing(on_claims(asking(["n1", "n3"])));
    let o = old_engine_still_up(NodeObs::missing("n2"));
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Done);
    assert_eq!(step.delete, [format!("{}-engine-b", key())]);
    assert!(step.force);
    assert_eq!(step.delete_pvcs, [format!("{}-engine-b-data", key())]);
    assert_eq!(reasons(&step), ["WipeSkipped", "MoveCompleted"]);
    let text = &step.events[0].text;
    assert!(
        text.contains("deleted PVC") && text.contains("StorageClass"),
        "{text}"
    );
}

/// A failed move on PVC storage takes the new instance's claim with its pod: on the abort the
/// operator asks for, and when the primary aborted by itself.
#[test]
fn a_failed_storage_class_move_deletes_the_new_pvc() {
    let pvc = format!("{}-engine-b-m1-data", key());
    let new = format!("{}-engine-b-m1", key());
    let mv = on_claims(in_phase(&asking(["n1", "n3"]), MovePhase::Copying));
    let mut o = synced();
    o.moving.pod = Some(PodObs {
        phase: "Failed".into(),
        ..pod(&new, false)
    });
    o.moving.progress = Some(Ok(MoveProgress {
        state: MoveState::Copying,
        target: target(),
        ..Default::default()
    }));
    let (_, step) = pass(&mv, &o, None);
    let abort = step.abort.expect("AbortMove");
    assert_eq!((abort.delete, abort.pvc), (new.clone(), Some(pvc.clone())));
    assert!(
        step.delete_pvcs.is_empty(),
        "only once the primary answered"
    );

    let mv = on_claims(in_phase(&asking(["n1", "n3"]), MovePhase::CuttingOver));
    let mut o = synced();
    o.moving.pod = Some(pod(&new, true));
    o.moving.progress = Some(Ok(MoveProgress {
        state: MoveState::Aborted,
        target: target(),
        ..Default::default()
    }));
    let (status, step) = pass(&mv, &o, None);
    assert_eq!(rec(&status).phase, MovePhase::Failed);
    assert_eq!((step.delete, step.delete_pvcs), (vec![new], vec![pvc]));

    // hostPath storage has no claim to delete.
    let mv = in_phase(&asking(["n1", "n3"]), MovePhase::CuttingOver);
    let (_, step) = pass(&mv, &o, None);
    assert!(step.delete_pvcs.is_empty());
}
