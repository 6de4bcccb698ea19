//! Takeover (failover and failback), the heart of seeds 000/001 (DESIGN.md §4):
//! - `handoff`: fencing the old primary and receiving its differential table in one call; promotion,
//!   stepping down, turning secondary;
//! - `route`: host I/O while the old primary drains: writes to the overlay, reads resolved
//!   overlay → local data → proxied read;
//! - `proxy`: proxied reads from the old primary, with a deadline and coalescing;
//! - `merge`: the overlay folded into the data file once the drain is complete.
//!
//! This file holds the state those share: the takeover areas of one engine.

pub mod handoff;
pub mod merge;
#[cfg(test)]
mod powerloss;
pub mod proxy;
pub mod route;
#[cfg(test)]
pub(crate) mod tests;

use std::{
    collections::VecDeque,
    io,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU8, Ordering},
        Mutex, MutexGuard,
    },
};

use tandem_api::Reason;
use tokio::sync::Notify;

use crate::{
    bitmap::{Bitmap, BitmapFile, EncodedBitmap},
    clock::now_us,
    geometry::BS,
    meta::Phase,
    store::BlockStore,
};

/// Events kept for `status` (the newest win).
const EVENTS_KEPT: usize = 64;

/// The bitmaps of a takeover. Both live in the state dir and are rewritten atomically.
pub struct TakeoverState {
    /// DAT1' (after a takeover) or DAT2' (after a failback): blocks whose newest content is on the
    /// peer. Cleared per block when the drained image lands, wholesale at DrainComplete.
    peer_pending: Bitmap,
    /// Blocks of the overlay (the third or fourth storage area) that hold host data.
    overlay_present: Bitmap,
    pp_dirty: bool,
    ov_dirty: bool,
    /// `peer_pending` is empty on stable storage. Until then a restart could route reads of a block
    /// to the peer again, so host writes must keep going to the overlay.
    pp_durably_empty: bool,
}

/// The fields are private so that every change marks its bitmap dirty for `Areas::persist`: a
/// change that skipped it would be lost at the next restart without anyone noticing.
impl TakeoverState {
    /// Block `b`'s newest content is (or may be) on the peer.
    pub fn pending(&self, b: u64) -> bool {
        self.peer_pending.get(b)
    }

    /// Block `b` is in the overlay.
    pub fn present(&self, b: u64) -> bool {
        self.overlay_present.get(b)
    }

    /// The peer holds a newer copy of `b` than anything here: handed off and not rewritten since.
    pub fn newer_on_peer(&self, b: u64) -> bool {
        self.pending(b) && !self.present(b)
    }

    pub fn pending_count(&self) -> u64 {
        self.peer_pending.count()
    }

    pub fn present_count(&self) -> u64 {
        self.overlay_present.count()
    }

    /// A copy of the handed-off table.
    pub fn pending_table(&self) -> Bitmap {
        self.peer_pending.clone()
    }

    /// The first overlay block at or after `from`.
    pub fn next_present(&self, from: u64) -> Option<u64> {
        self.overlay_present.next_one(from)
    }

    pub fn present_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.overlay_present.iter_ones()
    }

    /// No block is pending on stable storage (a restart cannot route a read to the peer).
    pub fn pending_durably_empty(&self) -> bool {
        self.pp_durably_empty
    }

    /// The data file now holds block `b`'s newest content (a drained image or a read-repair).
    pub fn clear_pending(&mut self, b: u64) {
        self.peer_pending.clear(b);
        self.pp_dirty = true;
    }

    /// Nothing is pending any more (the drain completed).
    pub fn clear_all_pending(&mut self) {
        self.peer_pending.clear_all();
        self.pp_dirty = true;
    }

    /// The overlay now holds host data for blocks `from..to`.
    pub fn set_present(&mut self, from: u64, to: u64) {
        for b in from..to {
            self.overlay_present.set(b);
        }
        self.ov_dirty = true;
    }
}

/// The takeover areas of one engine: the overlay file, its presence bitmap, the handed-off table.
pub struct Areas {
    state: Mutex<TakeoverState>,
    pub(crate) overlay: BlockStore,
    pp_file: BitmapFile,
    ov_file: BitmapFile,
    phase: AtomicU8,
    events: Mutex<VecDeque<String>>,
    /// Wakes the merge task.
    pub(crate) merge_wake: Notify,
    /// Wakes the lease renewal (`volume::renew_task`): this engine just became primary.
    pub(crate) lease_wake: Notify,
    /// Fault seam: hold the merge between chunks (AT-17).
    pub(crate) merge_paused: AtomicBool,
    pub(crate) proxy: proxy::Proxy,
    /// Why the volume is unhealthy right now (None when it is not).
    pub(crate) condition: Mutex<Option<(Reason, String)>>,
    /// Time the last takeover took to become ready (this process's lifetime).
    pub(crate) ready_ms: std::sync::atomic::AtomicU64,
    /// Points where a unit test holds a thread to force an interleaving (nothing outside tests).
    pub(crate) seams: crate::seam::Seams,
}

fn phase_code(p: Phase) -> u8 {
    match p {
        Phase::Normal => 0,
        Phase::Draining => 1,
        Phase::Merging => 2,
    }
}

impl Areas {
    pub fn open(
        state_dir: &Path,
        size: u64,
        blocks: u64,
        phase: Phase,
        proxy: proxy::Proxy,
        same_boot: bool,
        earlier_blocks: &[u64],
    ) -> Result<Self, crate::store::StoreError> {
        let overlay_path = state_dir.join("overlay");
        if phase == Phase::Normal {
            // Outside a takeover the overlay holds nothing that counts (it is punched empty before
            // a takeover writes to it): a grow that extended it and was cut short before `meta`
            // took the new size, or one the overlay missed, is set right here.
            set_len_if_present(&overlay_path, size).map_err(|source| {
                crate::store::StoreError::Io {
                    path: overlay_path.clone(),
                    source,
                }
            })?;
        }
        let overlay = BlockStore::open_or_create(&overlay_path, size)?;
        let pp_path = state_dir.join("peer_pending");
        let ov_path = state_dir.join("overlay_present");
        let io_err = |source| crate::store::StoreError::Io {
            path: state_dir.to_path_buf(),
            source,
        };
        let load = |p: &Path| -> io::Result<Bitmap> {
            Ok(Bitmap::load_grown(p, blocks, earlier_blocks)?
                .unwrap_or_else(|| Bitmap::new(blocks)))
        };
        let (peer_pending, overlay_present) = if phase == Phase::Normal {
            (Bitmap::new(blocks), Bitmap::new(blocks))
        } else {
            let mut ov = load(&ov_path).map_err(io_err)?;
            // Invariant: while a takeover is in progress, every allocated block of the overlay
            // holds host data written since the takeover (the overlay is punched empty, and
            // fdatasync'd, before the engine serves; zeroing writes into it write zeros; a merged
            // block is punched, durably, before its lock is released). The bits set since the
            // last store are lost with the process, the blocks are not: a write acknowledged just
            // before a SIGKILL is found again here. Test:
            // `takeover::tests::an_overlay_write_survives_a_kill_before_any_flush`.
            // After a reboot the page cache is gone and an allocated block may hold nothing
            // written (a power loss): only the stored bitmap counts then, and it covers every
            // FLUSHed write (`persist`). Test: `takeover::powerloss::powerloss_campaign`.
            if same_boot {
                for (start, end) in overlay.allocated_ranges().map_err(io_err)? {
                    ov.set_range(start / BS, end.div_ceil(BS).min(blocks));
                }
            }
            (load(&pp_path).map_err(io_err)?, ov)
        };
        let pp_durably_empty = peer_pending.is_empty();
        Ok(Self {
            state: Mutex::new(TakeoverState {
                peer_pending,
                overlay_present,
                pp_dirty: false,
                ov_dirty: false,
                pp_durably_empty,
            }),
            overlay,
            pp_file: BitmapFile::new(pp_path),
            ov_file: BitmapFile::new(ov_path),
            phase: AtomicU8::new(phase_code(phase)),
            events: Mutex::new(VecDeque::new()),
            merge_wake: Notify::new(),
            lease_wake: Notify::new(),
            merge_paused: AtomicBool::new(false),
            proxy,
            condition: Mutex::new(None),
            ready_ms: std::sync::atomic::AtomicU64::new(0),
            seams: Default::default(),
        })
    }

    /// The volume grew to `size` bytes (committed in `meta`; only outside a takeover): the
    /// bitmaps grow in memory, the overlay's length was extended before the commit
    /// (`Volume::grow_to`).
    pub(crate) fn grow(&self, size: u64) {
        let blocks = size / BS;
        let mut st = self.state();
        st.peer_pending.grow(blocks);
        st.overlay_present.grow(blocks);
        drop(st);
        self.overlay.publish_size(size);
    }

    pub fn state(&self) -> MutexGuard<'_, TakeoverState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            1 => Phase::Draining,
            2 => Phase::Merging,
            _ => Phase::Normal,
        }
    }

    /// Host I/O must take the routed path (overlay, proxied reads).
    pub fn active(&self) -> bool {
        self.phase.load(Ordering::Acquire) != 0
    }

    pub(crate) fn set_phase(&self, p: Phase) {
        self.phase.store(phase_code(p), Ordering::Release);
    }

    /// Records an event for `status` and the log.
    pub fn event(&self, what: impl Into<String>) {
        let what = what.into();
        tracing::info!(event = %what, "takeover event");
        let mut e = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if e.len() == EVENTS_KEPT {
            e.pop_front();
        }
        e.push_back(format!("{} {what}", now_us() / 1000));
    }

    pub fn events(&self) -> Vec<String> {
        let e = self.events.lock().unwrap_or_else(|p| p.into_inner());
        e.iter().cloned().collect()
    }

    /// `message` is for humans (it starts with the reason's name); programs read the reason.
    pub fn set_condition(&self, reason: Reason, message: impl Into<String>) {
        *self.condition.lock().unwrap_or_else(|p| p.into_inner()) = Some((reason, message.into()));
    }

    pub fn clear_condition(&self) {
        *self.condition.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The reason and message of the current condition; `(None, "")` when healthy.
    pub fn condition(&self) -> (Option<Reason>, String) {
        match &*self.condition.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((r, m)) => (Some(*r), m.clone()),
            None => (None, String::new()),
        }
    }

    fn mark_ov_dirty(st: &mut TakeoverState) {
        st.ov_dirty = true;
    }

    /// Persists the bitmaps that changed.
    ///
    /// Invariant: a bitmap reaches the disk only after the data its bits vouch for: a cleared
    /// `peer_pending` bit vouches for the data file (a read-repair or a drained image wrote the
    /// block there), a set `overlay_present` bit for the overlay. So the snapshot is taken first and
    /// the files it describes are fdatasync'd after it: every write the snapshot reflects happened
    /// before it, and is durable before the snapshot is stored. Tests:
    /// `takeover::tests::a_drained_block_survives_power_loss_after_a_checkpoint`.
    pub fn persist(&self, data: &BlockStore) -> io::Result<()> {
        let ov_turn = self.ov_file.turn();
        let pp_turn = self.pp_file.turn();
        let (pp, ov, pp_empty) = {
            let mut st = self.state();
            let pp = st.pp_dirty.then(|| st.peer_pending.encode());
            let ov = st.ov_dirty.then(|| st.overlay_present.encode());
            st.pp_dirty = false;
            st.ov_dirty = false;
            (pp, ov, st.peer_pending.is_empty())
        };
        let redo = |pp: bool, ov: bool| {
            let mut st = self.state();
            st.pp_dirty |= pp;
            st.ov_dirty |= ov;
        };
        let synced = (|| {
            if pp.is_some() {
                data.sync()?;
            }
            if ov.is_some() {
                self.overlay.sync()?;
            }
            Ok(())
        })();
        if let Err(e) = synced {
            redo(pp.is_some(), ov.is_some());
            return Err(e);
        }
        self.seams.hit("areas.persist.before_store");
        if let Some(ov) = &ov {
            if let Err(e) = ov_turn.store(ov) {
                redo(pp.is_some(), true);
                return Err(e);
            }
        }
        if let Some(pp) = &pp {
            if let Err(e) = pp_turn.store(pp) {
                redo(true, false);
                return Err(e);
            }
            if pp_empty {
                self.state().pp_durably_empty = true;
            }
        }
        Ok(())
    }

    /// Replaces both bitmaps durably (start of a takeover, end of a merge). `file`: the file form
    /// of `peer_pending` when the caller has it already (the handoff's runs, as received).
    pub fn reset(&self, peer_pending: Bitmap, file: Option<EncodedBitmap>) -> io::Result<()> {
        let ov_turn = self.ov_file.turn();
        let pp_turn = self.pp_file.turn();
        let blocks = peer_pending.len();
        let empty = Bitmap::new(blocks);
        ov_turn.store(&empty.encode())?;
        pp_turn.store(&file.unwrap_or_else(|| peer_pending.encode()))?;
        let mut st = self.state();
        st.pp_durably_empty = peer_pending.is_empty();
        st.peer_pending = peer_pending;
        st.overlay_present = empty;
        st.pp_dirty = false;
        st.ov_dirty = false;
        Ok(())
    }

    /// Durably stores the overlay bitmap with `blocks` cleared (after they were copied into the
    /// data file and that was made durable). The other set bits it stores vouch for their overlay
    /// data, so the overlay is synced after the snapshot, as in `persist`.
    pub fn clear_overlay_durably(&self, blocks: &[u64]) -> io::Result<()> {
        let turn = self.ov_file.turn();
        let snapshot = {
            let mut st = self.state();
            for &b in blocks {
                st.overlay_present.clear(b);
            }
            st.overlay_present.encode()
        };
        let stored = self.overlay.sync().and_then(|()| turn.store(&snapshot));
        if stored.is_err() {
            // The blocks are in the data file either way; the bitmap on disk is simply older.
            Self::mark_ov_dirty(&mut self.state());
        }
        stored
    }
}

/// Sets an existing file's length (durably); nothing when the file is absent.
fn set_len_if_present(path: &Path, size: u64) -> io::Result<()> {
    let f = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if f.metadata()?.len() != size {
        f.set_len(size)?;
        f.sync_all()?;
    }
    Ok(())
}
