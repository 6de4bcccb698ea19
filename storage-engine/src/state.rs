//! The engine's state for its volume, and every way it changes: one pure function, `next`.
//!
//! The state is persisted: role, epoch and takeover phase in the meta file (`meta.rs`), the
//! replica's standing in the progress file (`volume/replica.rs`). The takeover areas present follow
//! from the phase (`EngineState::areas`). Callers never change those fields themselves: they ask
//! `next` for a `Step` and the volume carries out its effects in order (`volume::transition`), so
//! the order of durable writes is part of the table below and nowhere else.
//!
//! | from                        | event                   | to                              | effects (in order)                                                                  |
//! |-----------------------------|-------------------------|---------------------------------|-------------------------------------------------------------------------------------|
//! | Primary e (any phase)       | Fence n > e             | Fenced n (same phase)           | Persist, SetTrackerEpoch, CloseHostSessions, WakeSender                             |
//! | Fenced e                    | Fence n > e             | Fenced n (same phase)           | Persist, SetTrackerEpoch, CloseHostSessions, WakeSender                             |
//! | Fenced e                    | Fence e                 | (stays: a repeat, AT-34)        | —                                                                                   |
//! | Secondary                   | Fence                   | refused: NoPrimaryHere          |                                                                                     |
//! | any other                   | Fence n <= e            | refused: StaleEpoch             |                                                                                     |
//! | Secondary/Fenced e, usable  | Promote n > e           | Primary n Draining              | FoldOverlay, EmptyOverlay, StoreTable, RestartJournal, Persist, Serve, RecordStanding, WakeSender |
//! | Secondary/Fenced e, usable  | ForcePromote n > e      | Primary n Normal                | FoldOverlay, EmptyOverlay, StoreTable, RestartJournal, MarkLost, Persist, Serve, RecordStanding, WakeSender |
//! | Primary                     | Promote/ForcePromote    | refused: AlreadyPrimary         |                                                                                     |
//! | Secondary NeedsFull         | Promote/ForcePromote    | refused: NoUsableData           |                                                                                     |
//! | any other                   | Promote n <= e          | refused: StaleEpoch             |                                                                                     |
//! | Primary e Draining          | DrainComplete           | Primary e Merging               | ClearTable, PersistAreas, Persist, StartMerge                                       |
//! | Primary e Draining          | AbandonDrain            | Primary e Merging               | MarkLost, ClearTable, PersistAreas, Persist, ClearCondition, StartMerge             |
//! | Primary e Merging           | MergeComplete           | Primary e Normal                | FoldOverlay, Persist, EmptyOverlay, WakeSender                                      |
//! | Fenced e                    | DrainAcknowledged e     | Secondary e Inconsistent        | FoldOverlay, ResetAreas, RestartJournal, ResetReplica, Persist                      |
//! | Primary/Fenced e            | StepDown n > e          | Secondary n Inconsistent        | CloseHostSessions, FoldOverlay, ResetAreas, KeepLosses, RestartJournal, ResetReplica, Persist |
//! | Secondary e                 | AdoptEpoch n > e        | Secondary n                     | Persist                                                                             |
//! | Secondary Consistent        | ResyncStarted           | Secondary Inconsistent          | RecordStanding, WriteProgress                                                       |
//! | Secondary Inconsistent      | ResyncReachedTarget     | Secondary Consistent            | RecordStanding (written with the next durable batch)                                |
//! | Secondary NeedsFull         | FullCopyDone            | Secondary Inconsistent          | RecordStanding (written with the next durable batch)                                |
//!
//! Any other (state, event) pair of DrainComplete, MergeComplete, DrainAcknowledged, StepDown,
//! AdoptEpoch and the replica events leaves the state as it is with no effect: those events come
//! from streams and tasks that may lag behind a role change, and are idempotent. AbandonDrain
//! outside a drain is refused (Superseded): it comes from a user's request.
//!
//! Invariants the table keeps (checked by `tests::every_transition_keeps_the_invariants`):
//! - the epoch never decreases;
//! - a phase other than Normal only on a primary, or on a fenced engine that was one: it keeps its
//!   takeover areas until it folds them (serving again, or turning secondary);
//! - only Promote/ForcePromote make a primary, and only at an epoch newer than the engine's;
//! - a state change that other engines or a restart must see is persisted (`Persist`) before the
//!   engine acts on it towards the outside (`CloseHostSessions` after it for a fence, `Serve` after
//!   it for a promotion), and after the durable writes it depends on (the table before the role).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
    Fenced,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
            Role::Fenced => "fenced",
        }
    }
}

impl From<Role> for crate::pb::Role {
    fn from(r: Role) -> Self {
        match r {
            Role::Primary => Self::Primary,
            Role::Secondary => Self::Secondary,
            Role::Fenced => Self::Fenced,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The takeover phase of a serving engine (DESIGN.md §4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No takeover in progress: host I/O goes to the data file.
    #[default]
    Normal,
    /// Serving while the old primary drains its table (first processing): overlay and proxied reads.
    Draining,
    /// DrainComplete received: the overlay is being merged into the data file.
    Merging,
}

/// The replica's standing (the progress file's flags): can this copy serve as the volume?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// A prefix of the primary's history: promotable without loss of anything it acknowledged.
    Consistent,
    /// A resync is running (blocks arrive out of order): a torn image until it completes.
    Inconsistent,
    /// A new secondary before its first full copy: holds no data of the volume at all.
    NeedsFull,
}

/// Which takeover areas are live (they follow from the phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AreasPresent {
    /// The handed-off table (DAT1'/DAT2'): blocks still to come from the old primary.
    pub table: bool,
    /// The overlay: host writes since the takeover, not yet merged.
    pub overlay: bool,
}

/// Everything that decides what the engine may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineState {
    pub role: Role,
    pub epoch: u64,
    pub phase: Phase,
    pub standing: Standing,
}

/// What the replication task does in a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sending {
    /// Nothing to send: a secondary, or a primary still in its own takeover (the merge comes before
    /// the second processing, OC10).
    Idle,
    /// Replicate host writes to the secondary.
    Stream,
    /// Drain the table to the engine that took over (the first processing).
    Drain,
}

/// What a replication stream arriving at this engine is applied as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receiving {
    /// Records and images of the primary's stream.
    Replica,
    /// The fenced old primary's drain after our takeover.
    Drain,
    /// Nothing: this engine is fenced.
    Refuse,
}

impl EngineState {
    pub fn areas(&self) -> AreasPresent {
        AreasPresent {
            table: self.phase == Phase::Draining,
            overlay: self.phase != Phase::Normal,
        }
    }

    /// Host I/O may run (the role check; a read-only secondary is the volume's business).
    pub fn serves_host(&self) -> bool {
        self.role == Role::Primary
    }

    /// Host I/O takes the routed path (overlay, proxied reads).
    pub fn routed(&self) -> bool {
        self.phase != Phase::Normal
    }

    pub fn sending(&self) -> Sending {
        sending(self.role, self.phase)
    }

    pub fn receiving(&self) -> Receiving {
        receiving(self.role)
    }

    /// Peer.ReadBlocks is answered only by a fenced engine, for a reader at its epoch.
    pub fn serves_proxied_reads(&self, reader_epoch: u64) -> bool {
        self.role == Role::Fenced && reader_epoch == self.epoch
    }

    /// The merge task may fold the overlay.
    pub fn merging(&self) -> bool {
        self.role == Role::Primary && self.phase == Phase::Merging
    }

    /// Where a takeover stands, for status: this engine as the old primary (fenced), or as the new
    /// one (draining, merging); `None` when none is in progress.
    pub fn takeover_phase(&self) -> Option<TakeoverPhase> {
        match (self.role, self.phase) {
            (Role::Fenced, _) => Some(TakeoverPhase::Fenced),
            (Role::Primary, Phase::Draining) => Some(TakeoverPhase::Draining),
            (Role::Primary, Phase::Merging) => Some(TakeoverPhase::Merging),
            _ => None,
        }
    }
}

/// `EngineState::sending` from the two fields it reads (hot paths read them lock-free).
pub fn sending(role: Role, phase: Phase) -> Sending {
    match (role, phase) {
        (Role::Fenced, _) => Sending::Drain,
        (Role::Primary, Phase::Normal) => Sending::Stream,
        _ => Sending::Idle,
    }
}

/// `EngineState::receiving` from the role alone.
pub fn receiving(role: Role) -> Receiving {
    match role {
        Role::Secondary => Receiving::Replica,
        Role::Primary => Receiving::Drain,
        Role::Fenced => Receiving::Refuse,
    }
}

/// A takeover in progress, as status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeoverPhase {
    Fenced,
    Draining,
    Merging,
}

impl TakeoverPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            TakeoverPhase::Fenced => "fenced",
            TakeoverPhase::Draining => "draining",
            TakeoverPhase::Merging => "merging",
        }
    }
}

/// Something that happened to the engine, and may change its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Peer.FenceAndHandoff: the peer takes over at `new_epoch`.
    Fence { new_epoch: u64 },
    /// The old primary handed its table over: serve at `new_epoch`, draining.
    Promote { new_epoch: u64 },
    /// The old primary is unreachable and the policy is force: serve at `new_epoch` without it.
    ForcePromote { new_epoch: u64 },
    /// The old primary's last drained image arrived (the first processing is complete).
    DrainComplete,
    /// A forced takeover on a draining primary whose old primary stays unreachable.
    AbandonDrain,
    /// Every overlay block is in the data file.
    MergeComplete,
    /// The new primary acknowledged this (fenced) engine's whole drain.
    DrainAcknowledged { fenced_epoch: u64 },
    /// The peer serves at a newer epoch (a forced promotion while this engine was away).
    StepDown { peer_epoch: u64 },
    /// A replication stream at a newer epoch reached this secondary.
    AdoptEpoch { epoch: u64 },
    /// The first out-of-order block image of a resync arrived.
    ResyncStarted,
    /// The journal was applied up to the resync's consistent point.
    ResyncReachedTarget,
    /// A full copy's ResyncDone arrived.
    FullCopyDone,
}

/// One thing the volume does to carry out a step; `volume::transition` runs them in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Write the new state to the meta file (durably), then publish it in memory.
    Persist,
    /// The tracker numbers new records and images at the new epoch.
    SetTrackerEpoch,
    /// Open host sessions close (they belong to the old role or epoch).
    CloseHostSessions,
    /// The replication task re-reads the state.
    WakeSender,
    /// The engine's own overlay blocks go into the data file (they are its newest data).
    FoldOverlay,
    /// The overlay is punched empty and synced before any host write lands in it.
    EmptyOverlay,
    /// The handed-off table (empty for a forced promotion) replaces both takeover bitmaps durably.
    StoreTable,
    /// Both takeover bitmaps are replaced by empty ones durably.
    ResetAreas,
    /// The tracker takes the new epoch, and records journaled under the old role are never
    /// replayed: the next session resyncs from the table. A secondary, which sends nothing, also
    /// drops the records (its table stays).
    RestartJournal,
    /// A stepping-down primary's unsent table becomes a loss export: each of its blocks is
    /// compared with the new primary's copy before that copy overwrites it (`crate::loss`).
    KeepLosses,
    /// Blocks whose newest copy stayed on the lost peer are marked to be sent back over it.
    MarkLost,
    /// Blocks still pending from the old primary are forgotten (in memory).
    ClearTable,
    /// The takeover bitmaps are stored after the data they vouch for (`Areas::persist`).
    PersistAreas,
    /// The replica forgets its progress: the new primary resends before it is consistent again.
    ResetReplica,
    /// The progress file is rewritten now.
    WriteProgress,
    /// Serving starts: the condition clears, the last heartbeat's set is forgotten.
    Serve,
    ClearCondition,
    /// The replica's standing changes in memory (the progress file follows with the next durable
    /// batch, or at once with `WriteProgress`).
    RecordStanding,
    /// The merge task starts.
    StartMerge,
}

/// Why an event cannot happen in this state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("stale takeover epoch {asked}: this engine is {role} at epoch {epoch}")]
    StaleEpoch { asked: u64, role: Role, epoch: u64 },
    #[error(
        "this engine is secondary at epoch {epoch}: there is no primary here to take over from"
    )]
    NoPrimaryHere { epoch: u64 },
    #[error("this engine is already primary at epoch {epoch}")]
    AlreadyPrimary { epoch: u64 },
    #[error(
        "this replica has never completed its initial copy and holds no usable data; it cannot take over"
    )]
    NoUsableData,
    #[error("superseded: this engine is {role} at epoch {epoch} (phase {phase:?})")]
    Superseded {
        role: Role,
        epoch: u64,
        phase: Phase,
    },
}

/// The state an event leads to, and what to do to get there (empty: nothing changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub to: EngineState,
    pub effects: &'static [Effect],
}

impl Step {
    fn stay(s: &EngineState) -> Self {
        Step {
            to: *s,
            effects: &[],
        }
    }

    pub fn changes(&self) -> bool {
        !self.effects.is_empty()
    }
}

// The effect lists of the table, one per row (kept on one line each: they are the table).
#[rustfmt::skip]
mod lists {
    use super::Effect::{self, *};
    pub(super) const FENCE: &[Effect] = &[Persist, SetTrackerEpoch, CloseHostSessions, WakeSender];
    pub(super) const PROMOTE: &[Effect] = &[FoldOverlay, EmptyOverlay, StoreTable, RestartJournal, Persist, Serve, RecordStanding, WakeSender];
    pub(super) const FORCE_PROMOTE: &[Effect] = &[FoldOverlay, EmptyOverlay, StoreTable, RestartJournal, MarkLost, Persist, Serve, RecordStanding, WakeSender];
    pub(super) const DRAIN_COMPLETE: &[Effect] = &[ClearTable, PersistAreas, Persist, StartMerge];
    pub(super) const ABANDON_DRAIN: &[Effect] = &[MarkLost, ClearTable, PersistAreas, Persist, ClearCondition, StartMerge];
    pub(super) const MERGE_COMPLETE: &[Effect] = &[FoldOverlay, Persist, EmptyOverlay, WakeSender];
    pub(super) const TO_SECONDARY: &[Effect] = &[FoldOverlay, ResetAreas, RestartJournal, ResetReplica, Persist];
    pub(super) const STEP_DOWN: &[Effect] = &[CloseHostSessions, FoldOverlay, ResetAreas, KeepLosses, RestartJournal, ResetReplica, Persist];
    pub(super) const ADOPT_EPOCH: &[Effect] = &[Persist];
    /// Inconsistent durably before the first out-of-order image lands.
    pub(super) const RESYNC_STARTED: &[Effect] = &[RecordStanding, WriteProgress];
    /// Written with the next durable batch (`make_durable`): until then a restart finds it older.
    pub(super) const STANDING_ONLY: &[Effect] = &[RecordStanding];
}
use lists::*;

/// The transition function: pure, total, and the only place the rules live.
pub fn next(s: &EngineState, e: Event) -> Result<Step, Refusal> {
    let go = |to: EngineState, effects| Ok(Step { to, effects });
    match e {
        Event::Fence { new_epoch } => match s.role {
            Role::Fenced if new_epoch == s.epoch => Ok(Step::stay(s)),
            _ if new_epoch <= s.epoch => Err(Refusal::StaleEpoch {
                asked: new_epoch,
                role: s.role,
                epoch: s.epoch,
            }),
            Role::Secondary => Err(Refusal::NoPrimaryHere { epoch: s.epoch }),
            // The phase stays: a fenced engine keeps its takeover areas (its newest data may be
            // in its overlay, and blocks in its table are the other engine's) until it folds them
            // when it serves again or turns secondary.
            Role::Primary | Role::Fenced => go(
                EngineState {
                    role: Role::Fenced,
                    epoch: new_epoch,
                    ..*s
                },
                FENCE,
            ),
        },
        Event::Promote { new_epoch } | Event::ForcePromote { new_epoch } => {
            if s.role == Role::Primary {
                return Err(Refusal::AlreadyPrimary { epoch: s.epoch });
            }
            if new_epoch <= s.epoch {
                return Err(Refusal::StaleEpoch {
                    asked: new_epoch,
                    role: s.role,
                    epoch: s.epoch,
                });
            }
            if s.role == Role::Secondary && s.standing == Standing::NeedsFull {
                return Err(Refusal::NoUsableData);
            }
            let forced = matches!(e, Event::ForcePromote { .. });
            go(
                EngineState {
                    role: Role::Primary,
                    epoch: new_epoch,
                    phase: if forced {
                        Phase::Normal
                    } else {
                        Phase::Draining
                    },
                    standing: Standing::Consistent,
                },
                if forced { FORCE_PROMOTE } else { PROMOTE },
            )
        }
        Event::DrainComplete => Ok(rephase(s, Phase::Draining, Phase::Merging, DRAIN_COMPLETE)),
        // From a user's request: outside a drain it is refused, not ignored.
        Event::AbandonDrain => match rephase(s, Phase::Draining, Phase::Merging, ABANDON_DRAIN) {
            step if step.changes() => Ok(step),
            _ => Err(Refusal::Superseded {
                role: s.role,
                epoch: s.epoch,
                phase: s.phase,
            }),
        },
        Event::MergeComplete => Ok(rephase(s, Phase::Merging, Phase::Normal, MERGE_COMPLETE)),
        Event::DrainAcknowledged { fenced_epoch } => match s.role {
            Role::Fenced if s.epoch == fenced_epoch => go(to_secondary(s.epoch), TO_SECONDARY),
            _ => Ok(Step::stay(s)),
        },
        Event::StepDown { peer_epoch } => match s.role {
            Role::Primary | Role::Fenced if peer_epoch > s.epoch => {
                go(to_secondary(peer_epoch), STEP_DOWN)
            }
            _ => Ok(Step::stay(s)),
        },
        Event::AdoptEpoch { epoch } => match s.role {
            Role::Secondary if epoch > s.epoch => go(EngineState { epoch, ..*s }, ADOPT_EPOCH),
            _ => Ok(Step::stay(s)),
        },
        Event::ResyncStarted => Ok(restand(
            s,
            Standing::Consistent,
            Standing::Inconsistent,
            RESYNC_STARTED,
        )),
        Event::ResyncReachedTarget => Ok(restand(
            s,
            Standing::Inconsistent,
            Standing::Consistent,
            STANDING_ONLY,
        )),
        Event::FullCopyDone => Ok(restand(
            s,
            Standing::NeedsFull,
            Standing::Inconsistent,
            STANDING_ONLY,
        )),
    }
}

/// A secondary's standing moves `from` → `to`; in any other state the event changes nothing.
fn restand(s: &EngineState, from: Standing, to: Standing, effects: &'static [Effect]) -> Step {
    if s.role == Role::Secondary && s.standing == from {
        Step {
            to: EngineState { standing: to, ..*s },
            effects,
        }
    } else {
        Step::stay(s)
    }
}

/// A primary's takeover phase moves `from` → `to`; in any other state the event changes nothing.
fn rephase(s: &EngineState, from: Phase, to: Phase, effects: &'static [Effect]) -> Step {
    if s.role == Role::Primary && s.phase == from {
        Step {
            to: EngineState { phase: to, ..*s },
            effects,
        }
    } else {
        Step::stay(s)
    }
}

/// A secondary after a role change: its copy is a torn mix until the new primary resends its table.
fn to_secondary(epoch: u64) -> EngineState {
    EngineState {
        role: Role::Secondary,
        epoch,
        phase: Phase::Normal,
        standing: Standing::Inconsistent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn st(role: Role, epoch: u64, phase: Phase, standing: Standing) -> EngineState {
        EngineState {
            role,
            epoch,
            phase,
            standing,
        }
    }

    fn any_state() -> impl Strategy<Value = EngineState> {
        (
            prop_oneof![
                Just(Role::Primary),
                Just(Role::Secondary),
                Just(Role::Fenced)
            ],
            1u64..6,
            prop_oneof![
                Just(Phase::Normal),
                Just(Phase::Draining),
                Just(Phase::Merging)
            ],
            prop_oneof![
                Just(Standing::Consistent),
                Just(Standing::Inconsistent),
                Just(Standing::NeedsFull)
            ],
        )
            .prop_map(|(r, e, p, s)| {
                st(
                    r,
                    e,
                    if r == Role::Secondary {
                        Phase::Normal
                    } else {
                        p
                    },
                    s,
                )
            })
    }

    fn any_event() -> impl Strategy<Value = Event> {
        (0u64..8, 0usize..12).prop_map(|(n, k)| match k {
            0 => Event::Fence { new_epoch: n },
            1 => Event::Promote { new_epoch: n },
            2 => Event::ForcePromote { new_epoch: n },
            3 => Event::DrainComplete,
            4 => Event::AbandonDrain,
            5 => Event::MergeComplete,
            6 => Event::DrainAcknowledged { fenced_epoch: n },
            7 => Event::StepDown { peer_epoch: n },
            8 => Event::AdoptEpoch { epoch: n },
            9 => Event::ResyncStarted,
            10 => Event::ResyncReachedTarget,
            _ => Event::FullCopyDone,
        })
    }

    proptest! {
        /// The invariants in the module's doc hold along any sequence of events from any state.
        #[test]
        fn every_transition_keeps_the_invariants(
            start in any_state(),
            events in proptest::collection::vec(any_event(), 1..40),
        ) {
            let mut s = start;
            for e in events {
                let Ok(step) = next(&s, e) else { continue };
                let to = step.to;
                prop_assert!(to.epoch >= s.epoch, "{s:?} --{e:?}--> {to:?}: epoch went back");
                prop_assert!(
                    to.phase == Phase::Normal || to.role != Role::Secondary,
                    "{s:?} --{e:?}--> {to:?}: takeover areas on a secondary"
                );
                prop_assert!(
                    to.role != Role::Fenced || to.phase == s.phase,
                    "{s:?} --{e:?}--> {to:?}: a fence dropped the areas"
                );
                if to.role == Role::Primary && s.role != Role::Primary {
                    prop_assert!(
                        matches!(e, Event::Promote { .. } | Event::ForcePromote { .. }) && to.epoch > s.epoch,
                        "{s:?} --{e:?}--> {to:?}: a primary made otherwise"
                    );
                }
                if to != s {
                    prop_assert!(step.changes(), "{s:?} --{e:?}--> {to:?} without effects");
                    let persisted = to.role != s.role || to.epoch != s.epoch || to.phase != s.phase;
                    if persisted {
                        prop_assert!(step.effects.contains(&Effect::Persist));
                    }
                }
                if let Some(p) = step.effects.iter().position(|&x| x == Effect::Persist) {
                    // What the new state depends on is durable before it; acting on it comes after.
                    for (i, x) in step.effects.iter().enumerate() {
                        match x {
                            Effect::Serve | Effect::StartMerge => prop_assert!(i > p, "{x:?} before Persist"),
                            Effect::StoreTable | Effect::PersistAreas | Effect::MarkLost
                            | Effect::ResetReplica | Effect::FoldOverlay | Effect::ResetAreas
                            | Effect::RestartJournal | Effect::KeepLosses => prop_assert!(i < p, "{x:?} after Persist"),
                            _ => {}
                        }
                    }
                }
                s = to;
            }
        }
    }

    #[test]
    fn replica_events_only_touch_the_standing() {
        for standing in [
            Standing::Consistent,
            Standing::Inconsistent,
            Standing::NeedsFull,
        ] {
            for role in [Role::Primary, Role::Secondary, Role::Fenced] {
                let s = st(role, 2, Phase::Normal, standing);
                for e in [
                    Event::ResyncStarted,
                    Event::ResyncReachedTarget,
                    Event::FullCopyDone,
                ] {
                    let step = next(&s, e).expect("replica events are never refused");
                    assert!(step
                        .effects
                        .iter()
                        .all(|x| matches!(x, Effect::RecordStanding | Effect::WriteProgress)));
                    assert_eq!((step.to.role, step.to.epoch), (role, 2));
                }
            }
        }
    }

    #[test]
    fn a_fence_is_repeatable_at_its_epoch_and_refused_below() {
        let fenced = st(Role::Fenced, 3, Phase::Normal, Standing::Consistent);
        assert!(!next(&fenced, Event::Fence { new_epoch: 3 })
            .unwrap()
            .changes());
        assert!(matches!(
            next(&fenced, Event::Fence { new_epoch: 2 }),
            Err(Refusal::StaleEpoch { .. })
        ));
        let primary = st(Role::Primary, 3, Phase::Merging, Standing::Consistent);
        let step = next(&primary, Event::Fence { new_epoch: 4 }).unwrap();
        assert_eq!(
            step.to,
            st(Role::Fenced, 4, Phase::Merging, Standing::Consistent)
        );
        assert!(matches!(
            next(&primary, Event::Fence { new_epoch: 3 }),
            Err(Refusal::StaleEpoch { .. })
        ));
        let secondary = st(Role::Secondary, 3, Phase::Normal, Standing::Consistent);
        assert!(matches!(
            next(&secondary, Event::Fence { new_epoch: 9 }),
            Err(Refusal::NoPrimaryHere { .. })
        ));
    }

    #[test]
    fn only_a_usable_copy_is_promoted_and_a_forced_one_skips_the_drain() {
        let empty = st(Role::Secondary, 1, Phase::Normal, Standing::NeedsFull);
        assert_eq!(
            next(&empty, Event::ForcePromote { new_epoch: 2 }),
            Err(Refusal::NoUsableData)
        );
        // An inconsistent copy may be promoted by the rules; the volume asks for consent first.
        let torn = st(Role::Secondary, 1, Phase::Normal, Standing::Inconsistent);
        let step = next(&torn, Event::ForcePromote { new_epoch: 2 }).unwrap();
        assert_eq!(step.to.phase, Phase::Normal);
        assert!(step.effects.contains(&Effect::MarkLost));
        let handed = next(&torn, Event::Promote { new_epoch: 2 }).unwrap();
        assert_eq!(handed.to.phase, Phase::Draining);
        assert!(!handed.effects.contains(&Effect::MarkLost));
        let primary = st(Role::Primary, 2, Phase::Normal, Standing::Consistent);
        assert!(matches!(
            next(&primary, Event::Promote { new_epoch: 3 }),
            Err(Refusal::AlreadyPrimary { .. })
        ));
    }

    #[test]
    fn a_takeover_walks_draining_merging_normal() {
        let mut s = st(Role::Secondary, 1, Phase::Normal, Standing::Consistent);
        let mut phases = vec![];
        for e in [
            Event::Promote { new_epoch: 2 },
            Event::DrainComplete,
            Event::DrainComplete,
            Event::MergeComplete,
        ] {
            s = next(&s, e).unwrap().to;
            phases.push(s.phase);
        }
        assert_eq!(
            phases,
            [
                Phase::Draining,
                Phase::Merging,
                Phase::Merging,
                Phase::Normal
            ]
        );
        assert!(matches!(
            next(&s, Event::AbandonDrain),
            Err(Refusal::Superseded { .. })
        ));
    }

    #[test]
    fn the_old_primary_becomes_secondary_only_at_its_fence_epoch() {
        let fenced = st(Role::Fenced, 4, Phase::Normal, Standing::Consistent);
        assert!(!next(&fenced, Event::DrainAcknowledged { fenced_epoch: 3 })
            .unwrap()
            .changes());
        let step = next(&fenced, Event::DrainAcknowledged { fenced_epoch: 4 }).unwrap();
        assert_eq!(
            step.to,
            st(Role::Secondary, 4, Phase::Normal, Standing::Inconsistent)
        );
        let primary = st(Role::Primary, 4, Phase::Draining, Standing::Consistent);
        let down = next(&primary, Event::StepDown { peer_epoch: 6 }).unwrap();
        assert_eq!(down.to.epoch, 6);
        assert_eq!(down.effects[0], Effect::CloseHostSessions);
        assert!(!next(&primary, Event::StepDown { peer_epoch: 4 })
            .unwrap()
            .changes());
    }
}
