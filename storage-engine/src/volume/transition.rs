//! Carries out a state change (`state::next`) on the volume: the one place the engine's role,
//! epoch, phase and standing change, effect by effect in the order the table gives.
//!
//! Transitions are serialized by `Volume::transitions`. Lock order (outermost first):
//! `takeover_lock` (one takeover at a time) → `gate` (host I/O shared, role changes exclusive) →
//! `transitions` → the tracker's block locks → the leaf mutexes (`meta`, `replica`, the areas'
//! state, the tracker's state), which are never held across one another's acquisition except
//! areas → tracker (`fence_and_handoff`'s stale-bit scan) and never across an await.

use std::{
    io,
    time::{Duration, Instant},
};

use crate::{
    bitmap::{Bitmap, EncodedBitmap},
    geometry::blocks_in,
    meta::Role,
    state::{self, Effect, EngineState, Event, Refusal, Step},
};

use super::Volume;

/// What some effects need beyond the event.
#[derive(Default)]
pub(crate) struct Carry {
    /// `StoreTable`: the handed-off table (absent: empty).
    pub table: Option<Bitmap>,
    /// `StoreTable`: that table's file form as the peer sent it (absent: encoded from `table`).
    pub table_file: Option<EncodedBitmap>,
    /// `MarkLost` on a forced promotion: the blocks whose newest copy stayed on the lost peer,
    /// and the sequence range they were written in.
    pub lost: Option<(Bitmap, u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TransitionError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Volume {
    /// The engine's state now (each field read once; a consistent snapshot under `transitions`).
    pub fn state(&self) -> EngineState {
        EngineState {
            role: self.role(),
            epoch: self.epoch(),
            phase: self.areas.phase(),
            standing: self.replica().standing,
        }
    }

    /// What the replication task does now (lock-free: the role and phase are atomics).
    pub fn sending(&self) -> state::Sending {
        state::sending(self.role(), self.areas.phase())
    }

    /// What a replication stream arriving now is applied as (lock-free).
    pub fn receiving(&self) -> state::Receiving {
        state::receiving(self.role())
    }

    /// Asks the state machine what `event` does now and carries it out. A refusal changes nothing;
    /// an I/O error stops at the failing effect (every effect before `Persist` is safe to repeat,
    /// and the state on disk is the old one until `Persist` succeeds).
    pub(crate) fn transition(&self, event: Event, carry: Carry) -> Result<Step, TransitionError> {
        self.transition_timed(event, carry).map(|(step, _)| step)
    }

    /// `transition`, also answering how long each effect took (the takeover's ready path reports
    /// them in its `HandoffStored` event).
    pub(crate) fn transition_timed(
        &self,
        event: Event,
        mut carry: Carry,
    ) -> Result<(Step, Vec<(Effect, Duration)>), TransitionError> {
        let _one = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        let from = self.state();
        let step = state::next(&from, event)?;
        // The effects store files and fsync them (a fence's meta, a handed-off table), which can
        // wait seconds behind the data files' writeback: never on a runtime worker, or the HTTP/2
        // keep-alives it serves go unanswered and the peer drops the link mid-takeover. Test:
        // `takeover::tests::a_fence_waiting_on_the_disk_leaves_the_runtime_free`.
        crate::blocking::off_the_runtime(|| {
            self.areas.seams.hit("transition.effects");
            let mut lost_now = 0;
            let mut times = Vec::with_capacity(step.effects.len());
            for &effect in step.effects {
                let t = Instant::now();
                self.carry_out(effect, &step.to, event, &mut carry, &mut lost_now)?;
                times.push((effect, t.elapsed()));
            }
            Ok((step, times))
        })
    }

    fn carry_out(
        &self,
        effect: Effect,
        to: &EngineState,
        event: Event,
        carry: &mut Carry,
        lost_now: &mut u64,
    ) -> io::Result<()> {
        let blocks = blocks_in(self.size());
        match effect {
            Effect::Persist => self.persist_state(to, event, carry, *lost_now)?,
            Effect::SetTrackerEpoch => {
                if let Some(r) = &self.repl {
                    r.tracker.set_epoch(to.epoch);
                }
            }
            Effect::CloseHostSessions => self.fenced.send_modify(|g| *g += 1),
            Effect::WakeSender => {
                if let Some(r) = &self.repl {
                    r.wake.notify_one();
                }
            }
            Effect::FoldOverlay => self.fold_overlay()?,
            Effect::EmptyOverlay => {
                // Empty, durably, before the first host write lands in it (see `Areas::open`).
                self.areas.overlay.punch_hole(0, self.size())?;
                self.areas.overlay.sync()?;
            }
            Effect::StoreTable => {
                let table = carry.table.take().unwrap_or_else(|| Bitmap::new(blocks));
                self.areas.reset(table, carry.table_file.take())?;
            }
            Effect::ResetAreas => self.areas.reset(Bitmap::new(blocks), None)?,
            Effect::RestartJournal => {
                if let Some(r) = &self.repl {
                    r.tracker.restart(to.epoch, to.role == Role::Secondary);
                }
            }
            Effect::KeepLosses => {
                // Before the role is persisted: once this engine is a secondary at the new epoch
                // the new primary's images may arrive, and each block of this table must be
                // compared before one overwrites it (`crate::loss`). `self.epoch()` is still the
                // old epoch here.
                if let Some(r) = &self.repl {
                    let table = r.tracker.pending();
                    if let Some(s) = self.losses.begin(self.epoch(), to.epoch, &table)? {
                        self.areas.event(format!(
                            "LossExportStarted blocks_to_compare={} dir={}",
                            table.count(),
                            s.dir.display()
                        ));
                    }
                }
            }
            Effect::MarkLost => {
                // The peer's copies of these blocks are newer than ours and will never be ours:
                // ours go back over them when it returns, so the two never silently differ.
                let set = match carry.lost.as_ref() {
                    Some((set, _, _)) => set.clone(),
                    None => self.areas.state().pending_table(),
                };
                *lost_now = set.count();
                if let Some(r) = &self.repl {
                    r.tracker.mark_pending(&set)?;
                }
            }
            Effect::ClearTable => {
                let mut st = self.areas.state();
                st.clear_all_pending();
            }
            Effect::PersistAreas => self.persist_areas()?,
            Effect::ResetReplica => {
                {
                    // The new primary resends its table before this copy is consistent again.
                    let mut rs = self.replica();
                    rs.applied_seq = 0;
                    rs.durable_seq = 0;
                    rs.standing = to.standing;
                    rs.consistent_target = None;
                }
                self.applied.send_replace(0);
                self.forget_heartbeat_set();
                self.write_progress_now()?;
            }
            Effect::WriteProgress => self.write_progress_now()?,
            Effect::Serve => {
                self.areas.clear_condition();
                self.forget_heartbeat_set();
            }
            Effect::ClearCondition => self.areas.clear_condition(),
            Effect::RecordStanding => self.replica().standing = to.standing,
            Effect::StartMerge => self.areas.merge_wake.notify_one(),
        }
        Ok(())
    }

    /// The meta file gets the new role, epoch and phase (and what the event records about the
    /// takeover), durably; then the in-memory copies follow.
    fn persist_state(
        &self,
        to: &EngineState,
        event: Event,
        carry: &Carry,
        lost_now: u64,
    ) -> io::Result<()> {
        let io = |e: crate::meta::MetaError| io::Error::other(e.to_string());
        self.update_meta(|m| {
            m.role = to.role;
            m.epoch = to.epoch;
            m.takeover.phase = to.phase;
            match event {
                Event::Promote { .. } | Event::ForcePromote { .. } => {
                    m.takeover.reversing = true;
                    let (n, from, upto) = carry
                        .lost
                        .as_ref()
                        .map_or((0, 0, 0), |(s, f, t)| (s.count(), *f, *t));
                    m.takeover.lost_blocks = n;
                    m.takeover.forced = carry.lost.is_some();
                    m.takeover.lost_seq_from = if n > 0 { from } else { 0 };
                    m.takeover.lost_seq_to = if n > 0 { upto } else { 0 };
                }
                Event::AbandonDrain => m.takeover.lost_blocks += lost_now,
                _ if to.role == Role::Secondary => m.takeover = Default::default(),
                _ => {}
            }
        })
        .map_err(io)?;
        self.areas.set_phase(to.phase);
        Ok(())
    }
}
