//! Live move of an engine (issue 18, seed 002), as pure decisions: an edit of `spec.placement.nodes`
//! that replaces one node moves that slot's engine to the new node while the volume is in use, with
//! the engines' own live move (`Engine.StartMove` on the primary). `status.move` keeps where it stands,
//! so a restarted operator resumes it; `act` makes the calls this module asks for.
//!
//! - **Instances.** A slot's engine is an *instance*: generation 0 is `<key>-engine-<slot>`, the n-th
//!   move starts `<key>-engine-<slot>-m<n>` with its own Service (`plan::names::engine_instance`,
//!   `status.slotGenerations`). The primary stores the address it moved its secondary to and keeps it
//!   across restarts, so an instance's Service name never changes and never serves another engine.
//! - **Phases.** Pending (gate closed, or a switchover first) → Preparing (a wipe pod empties the new
//!   node's directories: the new engine must start empty) → Starting (the new pod and Service; the
//!   engine must answer as a secondary) → Copying (StartMove; GetMove's watermark copied into status)
//!   → CuttingOver → Finishing (the primary answered DONE: the new instance serves the slot, the old
//!   pod and Service are deleted, then a wipe pod empties the old node) → Done.
//! - **StorageClass storage.** Each instance has its own PVC (`plan::names::engine_pvc_at`,
//!   `<instance>-data`). Preparing creates the new one instead of a wipe (a new claim binds a new,
//!   empty volume; the new pod is pinned to the target node, so a WaitForFirstConsumer claim binds
//!   there); Finishing deletes the old instance's PVC once its pod is gone, instead of the wipe; a
//!   failed move deletes the new PVC with the new pod.
//! - **Gate.** A move starts only when nothing else moves the primary (no takeover, switchover or
//!   engine restart this pass or running), the primary answers as primary at the pair's epoch and
//!   streams to a connected secondary (Synced or Replicating: the old secondary keeps a consistent
//!   copy throughout, so the volume never has less than the primary plus one complete replica), and
//!   the new node is Ready and schedulable. Otherwise the move waits in Pending and says why (event
//!   `MoveWaits` when the reason changes). The primary's node is moved by a switchover first (the
//!   `switchoverPolicy` gate), then as the secondary.
//! - **Refused** (the edit is not carried out; condition `Moving` False with reason Refused, event
//!   `MoveRefused`): a node that holds the other engine, `spec.primaryNode` naming the node being left, a PV whose node affinity names
//!   fixed nodes (made before the node label; immutable).
//! - **Node label.** The volume's node label (`plan::node_label`, which its PV selects) goes on the
//!   new node in the cutover pass, before the old engine is released (`act`), and leaves the old node
//!   in Finishing. A node being left that is lost (gone, out of service, NotReady for
//!   [`OLD_NODE_PATIENCE`]) ends the move without its wipe, with a `WipeSkipped` warning (engine
//!   PVCs: its PVC is deleted all the same; the PV behind it is its StorageClass's to reclaim).
//! - **Failed.** The primary aborted the move (GetMove ABORTED), or the new engine was lost before the
//!   cutover (pod gone, node lost): AbortMove, then the new pod and Service go; the old pair is as
//!   before. Failed and Refused are kept for that value of the spec: changing `placement.nodes` again
//!   asks anew.

use std::time::Duration;

use tandem_api::client::PairState;

use crate::{
    crd::{
        EngineRole, MirroredVolume, MirroredVolumeStatus, MovePhase, MoveStatus, Slot,
        SwitchoverPhase,
    },
    disruption::{note, warn, Event},
    engine::MoveState,
    failover::{established, primary_slot, set_condition, TakeoverIntent},
    observed::{MovePvc, NodeObs, Observed},
    plan::{self, names, EngineConfig},
};

/// Condition type: whether a live move runs, and how the last one ended.
pub const CONDITION: &str = "Moving";
/// Look again this soon while a move waits or runs.
const RECHECK: Duration = Duration::from_secs(2);
/// How long the node being left may stay NotReady before the move finishes without wiping it (as
/// the finalizer waits for a wipe on an unreachable node, `controller::cleanup`).
pub const OLD_NODE_PATIENCE: Duration = Duration::from_secs(600);

/// What the move asks of one pass. `act` carries it out after the children are applied (the new pod
/// and Service are children: `plan::desired` adds them from `status.move`).
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    /// Hand the primary over first (the primary's node is the one replaced).
    pub takeover: Option<TakeoverIntent>,
    /// Call StartMove on the primary with this address (the new instance's Service).
    pub start: Option<String>,
    /// Call AbortMove on the primary; on an ABORTED answer the move is Failed and these go.
    pub abort: Option<Abort>,
    /// Pods and Services (same names) to delete in the operator's namespace.
    pub delete: Vec<String>,
    /// A wipe pod to apply: (pod name, node, data dir).
    pub wipe: Option<Wipe>,
    /// Wipe pods that finished (or will never run), to delete.
    pub wiped: Vec<String>,
    /// Delete the pods of `delete` at once (grace 0): their node is lost, so no kubelet confirms.
    pub force: bool,
    /// The node being left: it loses the volume's node label (`plan::node_label`).
    pub unlabel: Option<String>,
    /// Engine PVCs to delete (StorageClass storage), after the pods of `delete`.
    pub delete_pvcs: Vec<String>,
    pub events: Vec<Event>,
    pub recheck: Option<Duration>,
}

#[derive(Debug, PartialEq, Clone)]
pub struct Abort {
    /// Why, for status and the event.
    pub why: String,
    /// The new instance's pod and Service, deleted once the primary answered ABORTED.
    pub delete: String,
    /// Its PVC (StorageClass storage), deleted with them.
    pub pvc: Option<String>,
}

#[derive(Debug, PartialEq, Clone)]
pub struct Wipe {
    pub name: String,
    pub node: String,
}

/// The slot to move and its new node, when `spec.placement.nodes` differs from the recorded nodes.
/// One slot at a time: the secondary's first. A target that holds the other engine waits (a later
/// edit may move that one away first).
pub fn asked(mv: &MirroredVolume, status: &MirroredVolumeStatus) -> Option<(Slot, String)> {
    let want = mv.spec.placement.nodes.as_ref()?;
    let [a, b] = status.nodes.as_slice() else {
        return None;
    };
    let (Some(wa), Some(wb)) = (want.first(), want.get(1)) else {
        return None;
    };
    let now = [a, b];
    let wanted = [wa, wb];
    let secondary = primary_slot(status).other();
    [secondary, secondary.other()]
        .into_iter()
        .find(|s| wanted[s.index()] != now[s.index()])
        .map(|s| (s, wanted[s.index()].clone()))
}

/// Keeps `status.move` in step with the spec and the world, and says what to do this pass. `busy`
/// names another takeover or restart of this pass: a move waits for it.
pub fn track(
    mv: &MirroredVolume,
    status: &mut MirroredVolumeStatus,
    observed: &Observed,
    peer_timeout: Duration,
    busy: Option<&str>,
    cfg: &EngineConfig,
) -> Step {
    let mut step = Step::default();
    let now = observed.now.to_string();
    let key = plan::key(mv);
    if let Some(mut rec) = status
        .moving
        .clone()
        .filter(|r| r.phase.running() || r.phase == MovePhase::Finishing)
    {
        advance(mv, status, observed, &mut rec, &key, cfg, &now, &mut step);
        status.moving = Some(rec);
        return step;
    }
    let Some((slot, to)) = asked(mv, status) else {
        // Nothing asked: a Done record stays (history); a refusal or failure of a value the spec no
        // longer asks for goes.
        if status
            .moving
            .as_ref()
            .is_some_and(|r| r.phase != MovePhase::Done)
        {
            status.moving = None;
        }
        return step;
    };
    let from = status.nodes[slot.index()].clone();
    let other = status.nodes[slot.other().index()].clone();
    let old = status
        .moving
        .take()
        .filter(|r| r.slot == slot && r.to == to && r.from == from);
    if let Some(r) = old
        .as_ref()
        .filter(|r| matches!(r.phase, MovePhase::Failed | MovePhase::Refused))
    {
        // Carried out once per value: a failed or refused move is not retried by itself.
        status.moving = Some(r.clone());
        return step;
    }
    let generation = plan::generation(Some(status), slot) + 1;
    let mut rec = old.clone().unwrap_or_else(|| MoveStatus {
        phase: MovePhase::Pending,
        slot,
        from: from.clone(),
        to: to.clone(),
        generation,
        started_at: Some(now.clone()),
        ..Default::default()
    });
    if old.is_none() {
        step.events.push(note(
            "MoveRequested",
            format!(
                "placement.nodes asks to move the engine of slot {} from {from} to {to}",
                slot.as_str()
            ),
        ));
    }
    if let Some(why) = refusal(mv, &from, &to, &other, observed) {
        rec.phase = MovePhase::Refused;
        rec.message = why.clone();
        step.events.push(warn("MoveRefused", why));
        status.moving = Some(rec);
        return step;
    }
    step.recheck = Some(RECHECK);
    let primary = primary_slot(status);
    let gate = if to == other {
        Err(format!(
            "node {to} still holds the other engine of the volume; waiting until it moves away"
        ))
    } else if let Some(b) = busy {
        Err(format!("waiting: {b}"))
    } else if slot == primary && established(status) {
        // The primary's node is replaced: switch over first, then move it as the secondary.
        match crate::switchover::gate(&mv.spec, status, observed, peer_timeout, None) {
            Ok(()) => {
                step.takeover = Some(TakeoverIntent {
                    to: primary.other(),
                    reason: crate::switchover::REASON,
                    // Invariant: never forced, as any switchover (switchover.rs).
                    force: false,
                    timeout: peer_timeout,
                    wait: None,
                });
                Err(format!(
                    "the primary is on {from}: switching it over to {other} first"
                ))
            }
            Err((_, why)) => Err(format!(
                "the primary is on {from}, to switch over first: {why}"
            )),
        }
    } else {
        gate(status, observed, &to)
    };
    match gate {
        Err(why) => {
            if rec.message != why {
                step.events.push(note("MoveWaits", why.clone()));
            }
            rec.phase = MovePhase::Pending;
            rec.message = why;
        }
        Ok(()) => {
            rec.phase = MovePhase::Preparing;
            rec.generation = generation;
            rec.message = if claims(mv) {
                format!(
                    "creating PVC {} for the new engine",
                    names::engine_pvc_at(&key, slot, generation)
                )
            } else {
                format!("emptying the volume's directories on {to} for the new engine")
            };
            step.events.push(note(
                "MoveStarted",
                format!(
                    "moving the secondary of slot {} from {from} to {to} (engine {})",
                    slot.as_str(),
                    names::engine_instance(&key, slot, generation)
                ),
            ));
            // A fresh PVC needs no wipe: the new claim binds a new, empty volume (`advance`).
            if !claims(mv) {
                step.wipe = Some(Wipe {
                    name: names::move_wipe(&key, slot, generation, false),
                    node: to,
                });
            }
        }
    }
    status.moving = Some(rec);
    step
}

/// The engines keep their files on PVCs (StorageClass storage), one per instance.
fn claims(mv: &MirroredVolume) -> bool {
    mv.spec.engine_storage.storage_class_name.is_some()
}

/// Why the edit cannot be carried out at all.
fn refusal(
    mv: &MirroredVolume,
    from: &str,
    to: &str,
    other: &str,
    observed: &Observed,
) -> Option<String> {
    // Invariant: no move while the PV's (immutable) node affinity names fixed nodes: a workload
    // could then never be scheduled to the new node, nor fail over there by staging (moving_tests::
    // a_pv_that_names_its_nodes_refuses_a_move).
    if observed.pv.as_ref().is_some_and(|pv| !pv.follows_label) {
        let pv = plan::pv_name(mv);
        let fix = if mv.spec.persistent_volume_name.is_some() {
            "clone the claim (a PVC with dataSource naming it) and use the clone, whose PV can move"
                .to_string()
        } else {
            format!(
                "stop the workloads, delete their claim and PersistentVolume {pv} (the engines keep the data; \
                 the operator makes the PV again, and spec.claim's claim), then edit placement.nodes again"
            )
        };
        return Some(format!(
            "PersistentVolume {pv} was made before node affinity followed moves: it pins workloads to the \
             first nodes by name and cannot change, so after a move to {to} no workload could be scheduled \
             there; to move: {fix}"
        ));
    }
    if mv.spec.primary_node.as_deref() == Some(from) {
        return Some(format!(
            "spec.primaryNode names {from}, the node this edit leaves; change primaryNode (e.g. to {other}) \
             or clear it first"
        ));
    }
    None
}

/// Whether the pair may start a move of its secondary to `to` now.
fn gate(status: &MirroredVolumeStatus, observed: &Observed, to: &str) -> Result<(), String> {
    if !established(status) {
        return Err("waiting for the pair to be established".into());
    }
    if status.switchover.as_ref().is_some_and(|s| {
        matches!(
            s.phase,
            SwitchoverPhase::HandingOver | SwitchoverPhase::Draining | SwitchoverPhase::Merging
        )
    }) {
        return Err("waiting for the switchover to finish".into());
    }
    let primary = primary_slot(status);
    let p_node = &observed.node(primary).name;
    let Some(p) = observed
        .engine(primary)
        .filter(|e| e.role == Some(EngineRole::Primary) && e.epoch >= status.epoch)
    else {
        return Err(format!(
            "the primary's engine on {p_node} does not answer as primary"
        ));
    };
    if p.takeover_phase.in_progress() {
        return Err(format!(
            "the primary on {p_node} still finishes a takeover ({})",
            p.takeover_phase.label()
        ));
    }
    // Invariant: the old secondary stays a consistent, streaming replica until the cutover, so the
    // volume never has less than the primary plus one complete copy (moving_tests::
    // a_move_waits_while_the_secondary_is_not_a_streaming_mirror).
    if !p.peer_connected || !matches!(p.pair_state, PairState::Synced | PairState::Replicating) {
        return Err(format!(
            "waiting until the secondary is a streaming mirror: pair {}, peer {}",
            p.pair_state,
            if p.peer_connected {
                "connected"
            } else {
                "disconnected"
            }
        ));
    }
    match &observed.moving.target_node {
        Some(n) if n.exists && n.ready && !n.unschedulable && !n.out_of_service => Ok(()),
        Some(n) if !n.exists => Err(format!("node {to} does not exist")),
        _ => Err(format!("node {to} is not Ready or is cordoned")),
    }
}

/// One pass of a running move.
#[allow(clippy::too_many_arguments)]
fn advance(
    mv: &MirroredVolume,
    status: &mut MirroredVolumeStatus,
    observed: &Observed,
    rec: &mut MoveStatus,
    key: &str,
    cfg: &EngineConfig,
    now: &str,
    step: &mut Step,
) {
    step.recheck = Some(RECHECK);
    let slot = rec.slot;
    let gen = rec.generation;
    let new = names::engine_instance(key, slot, gen);
    let new_pvc = claims(mv).then(|| names::engine_pvc_at(key, slot, gen));
    let target = plan::engine_address_at(mv, slot, gen, cfg);
    let m = &observed.moving;
    let lost_target = |rec: &MoveStatus| -> Option<String> {
        if m.target_node.as_ref().is_some_and(|n| n.is_lost()) {
            return Some(format!("node {} was lost", rec.to));
        }
        match &m.pod {
            Some(p) if p.is_gone() => {
                Some(format!("the new engine's pod {new} failed or was deleted"))
            }
            None if rec.phase != MovePhase::Starting => {
                Some(format!("the new engine's pod {new} is gone"))
            }
            _ => None,
        }
    };
    match rec.phase {
        MovePhase::Preparing if claims(mv) => {
            let pvc = names::engine_pvc_at(key, slot, gen);
            // Invariant: the new engine starts on an empty volume: its claim is one this move
            // created (`plan::desired` applies it only once seen absent, annotated with the move's
            // start); one an earlier attempt left under the same name is deleted and waited out
            // (moving_tests::a_storage_class_move_gives_the_new_engine_its_own_fresh_pvc).
            match &m.pvc {
                MovePvc::Present {
                    deleting: false,
                    started_at,
                } if started_at.is_some() && *started_at == rec.started_at => {
                    rec.phase = MovePhase::Starting;
                    rec.message = format!("starting engine {new} on {} with PVC {pvc}", rec.to);
                }
                MovePvc::Present {
                    deleting: false, ..
                } => {
                    rec.message = format!(
                        "deleting PVC {pvc}, left by an earlier attempt: the new engine must start empty"
                    );
                    step.delete_pvcs.push(pvc);
                }
                MovePvc::Present { deleting: true, .. } => {
                    rec.message = format!("waiting for the earlier PVC {pvc} to be gone");
                }
                MovePvc::Absent | MovePvc::Unknown => {
                    rec.message = format!("creating PVC {pvc} for the new engine");
                }
            }
        }
        MovePhase::Preparing => {
            let wipe = names::move_wipe(key, slot, gen, false);
            match &m.wipe {
                Some(p) if p.phase == "Succeeded" => {
                    step.wiped.push(wipe);
                    rec.phase = MovePhase::Starting;
                    rec.message = format!("starting engine {new} on {}", rec.to);
                }
                Some(_) => rec.message = format!("waiting for wipe pod {wipe} on {}", rec.to),
                None => {
                    step.wipe = Some(Wipe {
                        name: wipe,
                        node: rec.to.clone(),
                    })
                }
            }
        }
        MovePhase::Starting => {
            if let Some(why) = lost_target(rec) {
                fail(rec, step, why, &new, new_pvc);
                return;
            }
            let serving = m.pod.as_ref().is_some_and(|p| p.ready)
                && m.engine
                    .as_ref()
                    .is_some_and(|e| e.role == Some(EngineRole::Secondary));
            if serving {
                rec.message = format!("asking the primary to copy the volume to {new}");
                step.start = Some(target);
            } else {
                rec.message = format!("waiting for engine {new} on {} to serve", rec.to);
            }
        }
        MovePhase::Copying | MovePhase::CuttingOver => {
            let progress = match &m.progress {
                Some(Ok(p)) => p,
                Some(Err(e)) => {
                    rec.message = format!("cannot ask the primary: {e}");
                    return;
                }
                None => {
                    rec.message = "the primary's engine does not answer".into();
                    return;
                }
            };
            let ours = progress.target == target;
            match progress.state {
                MoveState::Done if ours => cut_over(status, rec, step, key, now),
                MoveState::Aborted if ours => {
                    // The primary rolled back by itself: nothing to abort, the new engine goes.
                    rec.phase = MovePhase::Failed;
                    rec.completed_at = Some(now.to_string());
                    rec.message = format!("the primary aborted the move: {}", progress.message);
                    step.delete.push(new);
                    step.delete_pvcs.extend(new_pvc);
                    step.events.push(warn("MoveFailed", rec.message.clone()));
                }
                MoveState::Copying | MoveState::Cutover if ours => {
                    if let Some(why) = lost_target(rec) {
                        fail(rec, step, why, &new, new_pvc);
                        return;
                    }
                    rec.copied_bytes = progress.copied_bytes;
                    rec.total_bytes = progress.total_bytes;
                    if progress.state == MoveState::Cutover {
                        rec.phase = MovePhase::CuttingOver;
                        rec.message =
                            "the copy is done; the primary waits for the new engine to hold every write"
                                .into();
                    } else {
                        rec.message = format!(
                            "copied {} of {} bytes to {new}",
                            progress.copied_bytes, progress.total_bytes
                        );
                    }
                }
                // The primary knows no move to this target (its record was lost, or the start's
                // answer never came back): start it again, if the new engine still serves.
                _ => {
                    if let Some(why) = lost_target(rec) {
                        fail(rec, step, why, &new, new_pvc);
                        return;
                    }
                    rec.message = format!("the primary knows no move to {new}; starting it again");
                    step.start = Some(target);
                }
            }
        }
        MovePhase::Finishing => {
            let old = names::engine_instance(key, slot, gen.saturating_sub(1));
            let old_node = m.old_node.as_ref();
            if old_node.is_some_and(|n| n.labeled) && !status.nodes.contains(&rec.from) {
                // The old node no longer holds an engine of the volume: workloads go elsewhere.
                step.unlabel = Some(rec.from.clone());
            }
            let wipe = names::move_wipe(key, slot, gen, true);
            let wiped = m.wipe.as_ref().is_some_and(|p| p.phase == "Succeeded");
            let old_pvc =
                claims(mv).then(|| names::engine_pvc_at(key, slot, gen.saturating_sub(1)));
            if let Some(why) = old_node
                .and_then(|n| lost_for_good(n, observed))
                .filter(|_| !wiped)
            {
                // Its wipe pod would never run: finish without it, saying what stays there.
                if m.old_pod {
                    step.delete.push(old);
                    step.force = true;
                }
                if m.wipe.is_some() {
                    step.wiped.push(wipe);
                }
                let text = match old_pvc {
                    // The claim goes all the same (after the pod, in `act`); the PV behind it is
                    // its StorageClass's: a node-local one can only be reclaimed on that node.
                    Some(pvc) => {
                        let text = format!(
                            "node {} is lost ({why}): deleted PVC {pvc}; its PersistentVolume is \
                             reclaimed by its StorageClass's provisioner (a node-local one stays on \
                             that node until it returns or is removed by hand)",
                            rec.from
                        );
                        step.delete_pvcs.push(pvc);
                        text
                    }
                    None => {
                        let dir = plan::host_data_dir(mv, Some(&*status), cfg)
                            .ok()
                            .flatten()
                            .unwrap_or_else(|| "its socket dir".into());
                        format!(
                            "not wiping node {}: {why}; {dir} stays there until removed by hand",
                            rec.from
                        )
                    }
                };
                step.events.push(warn("WipeSkipped", text));
                let left = format!("{} was not wiped ({why})", rec.from);
                done(rec, step, now, &new, left);
                return;
            }
            if m.old_pod {
                step.delete.push(old);
                rec.message = format!("deleting the old engine's pod on {}", rec.from);
                return;
            }
            if let Some(pvc) = old_pvc {
                // Invariant: the old instance's claim goes only once its pod is gone (the engine
                // no longer holds it); deleting it is the wipe (moving_tests::
                // a_storage_class_move_deletes_the_old_pvc_after_the_old_pod).
                let left = format!(
                    "its PVC {pvc} is deleted (its PersistentVolume is its StorageClass's to reclaim)"
                );
                step.delete_pvcs.push(pvc);
                done(rec, step, now, &new, left);
                return;
            }
            match &m.wipe {
                Some(p) if p.phase == "Succeeded" => {
                    step.wiped.push(wipe);
                    let left = format!("{} holds nothing of the volume", rec.from);
                    done(rec, step, now, &new, left);
                }
                Some(_) => rec.message = format!("waiting for wipe pod {wipe} on {}", rec.from),
                None => {
                    rec.message = format!("emptying the volume's directories on {}", rec.from);
                    step.wipe = Some(Wipe {
                        name: wipe,
                        node: rec.from.clone(),
                    });
                }
            }
        }
        MovePhase::Pending | MovePhase::Done | MovePhase::Failed | MovePhase::Refused => {}
    }
}

/// The node being left is gone for good as far as its wipe goes: deleted, out of service, or NotReady
/// for [`OLD_NODE_PATIENCE`] (since its Ready condition changed; a node that never reported one counts
/// as lost). Why, or None.
fn lost_for_good(node: &NodeObs, observed: &Observed) -> Option<String> {
    if !node.exists {
        return Some("the node is gone".into());
    }
    if node.out_of_service {
        return Some("the node is out of service".into());
    }
    if node.ready {
        return None;
    }
    let waited = node.not_ready_since.is_none_or(|t| {
        observed.now.duration_since(t).as_secs() >= OLD_NODE_PATIENCE.as_secs() as i64
    });
    waited.then(|| {
        format!(
            "the node stayed NotReady for {} minutes",
            OLD_NODE_PATIENCE.as_secs() / 60
        )
    })
}

/// The move is over: the new instance serves the slot; `left` says what became of the old one's files.
fn done(rec: &mut MoveStatus, step: &mut Step, now: &str, new: &str, left: String) {
    rec.phase = MovePhase::Done;
    rec.completed_at = Some(now.to_string());
    rec.message = format!(
        "the engine of slot {} runs on {} ({new}); {left}",
        rec.slot.as_str(),
        rec.to
    );
    step.recheck = None;
    step.events.push(note("MoveCompleted", rec.message.clone()));
}

/// The primary answered DONE: the new instance serves the slot from now on.
fn cut_over(
    status: &mut MirroredVolumeStatus,
    rec: &mut MoveStatus,
    step: &mut Step,
    key: &str,
    now: &str,
) {
    let slot = rec.slot;
    let mut gens: Vec<u32> = Slot::BOTH
        .iter()
        .map(|s| plan::generation(Some(status), *s))
        .collect();
    gens[slot.index()] = rec.generation;
    status.slot_generations = gens;
    status.nodes[slot.index()] = rec.to.clone();
    rec.phase = MovePhase::Finishing;
    rec.copied_bytes = rec.total_bytes;
    rec.message = format!("cut over at {now}: the secondary runs on {}", rec.to);
    // The old instance: its pod and Service go (the primary no longer replicates to it).
    step.delete.push(names::engine_instance(
        key,
        slot,
        rec.generation.saturating_sub(1),
    ));
    step.events.push(note(
        "MoveCutOver",
        format!(
            "the secondary moved from {} to {}; the old engine is released",
            rec.from, rec.to
        ),
    ));
}

/// The move cannot go on: abort it on the primary (the new engine, and its PVC, go once the primary
/// answered).
fn fail(rec: &mut MoveStatus, step: &mut Step, why: String, new: &str, pvc: Option<String>) {
    rec.message = format!("{why}; aborting the move");
    step.abort = Some(Abort {
        why,
        delete: new.to_string(),
        pvc,
    });
}

/// The primary answered AbortMove (or GetMove) ABORTED: the move is Failed, the old pair serves.
pub fn aborted(status: &mut MirroredVolumeStatus, why: &str, now: &str) -> Option<Event> {
    let rec = status.moving.as_mut()?;
    rec.phase = MovePhase::Failed;
    rec.completed_at = Some(now.to_string());
    rec.message = format!(
        "{why}; rolled back: the old secondary on {} stays",
        rec.from
    );
    Some(warn("MoveFailed", rec.message.clone()))
}

/// The `Moving` condition: True while a move runs, else how the last one ended.
pub fn annotate(status: &mut MirroredVolumeStatus, observed: &Observed, generation: Option<i64>) {
    let Some(rec) = status.moving.clone() else {
        status.conditions.retain(|c| c.type_ != CONDITION);
        return;
    };
    let running = !matches!(
        rec.phase,
        MovePhase::Done | MovePhase::Failed | MovePhase::Refused
    );
    set_condition(
        &mut status.conditions,
        CONDITION,
        running,
        rec.phase.as_str(),
        &rec.message,
        generation,
        &observed.now.to_string(),
    );
}

#[cfg(test)]
#[path = "moving_tests.rs"]
mod tests;
