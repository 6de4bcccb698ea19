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
pub mod proxy;
pub mod route;

use std::{
    collections::VecDeque,
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU8, Ordering},
        Mutex, MutexGuard,
    },
};

use tokio::sync::Notify;

use crate::{bitmap::Bitmap, meta::Phase, repl::tracker::now_us, store::BlockStore};

/// Events kept for `status` (the newest win).
const EVENTS_KEPT: usize = 64;

/// The bitmaps of a takeover. Both live in the state dir and are rewritten atomically.
pub struct TakeoverState {
    /// DAT1' (after a takeover) or DAT2' (after a failback): blocks whose newest content is on the
    /// peer. Cleared per block when the drained image lands, wholesale at DrainComplete.
    pub peer_pending: Bitmap,
    /// Blocks of the overlay (the third or fourth storage area) that hold host data.
    pub overlay_present: Bitmap,
    pp_dirty: bool,
    ov_dirty: bool,
    /// `peer_pending` is empty on stable storage. Until then a restart could route reads of a block
    /// to the peer again, so host writes must keep going to the overlay.
    pub pp_durably_empty: bool,
}

/// The takeover areas of one engine: the overlay file, its presence bitmap, the handed-off table.
pub struct Areas {
    state: Mutex<TakeoverState>,
    pub overlay: BlockStore,
    pp_path: PathBuf,
    ov_path: PathBuf,
    phase: AtomicU8,
    events: Mutex<VecDeque<String>>,
    /// Wakes the merge task.
    pub merge_wake: Notify,
    /// Fault seam: hold the merge between chunks (AT-17).
    pub merge_paused: AtomicBool,
    pub proxy: proxy::Proxy,
    /// Why the volume is unhealthy right now ("" when it is not).
    pub condition: Mutex<String>,
    /// Time the last takeover took to become ready (this process's lifetime).
    pub ready_ms: std::sync::atomic::AtomicU64,
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
    ) -> Result<Self, crate::store::StoreError> {
        let overlay = BlockStore::open_or_create(&state_dir.join("overlay"), size)?;
        let pp_path = state_dir.join("peer_pending");
        let ov_path = state_dir.join("overlay_present");
        let io_err = |source| crate::store::StoreError::Io {
            path: state_dir.to_path_buf(),
            source,
        };
        let load = |p: &Path| -> io::Result<Bitmap> {
            Ok(Bitmap::load(p, blocks)?.unwrap_or_else(|| Bitmap::new(blocks)))
        };
        let (peer_pending, overlay_present) = if phase == Phase::Normal {
            (Bitmap::new(blocks), Bitmap::new(blocks))
        } else {
            (
                load(&pp_path).map_err(io_err)?,
                load(&ov_path).map_err(io_err)?,
            )
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
            pp_path,
            ov_path,
            phase: AtomicU8::new(phase_code(phase)),
            events: Mutex::new(VecDeque::new()),
            merge_wake: Notify::new(),
            merge_paused: AtomicBool::new(false),
            proxy,
            condition: Mutex::new(String::new()),
            ready_ms: std::sync::atomic::AtomicU64::new(0),
        })
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

    pub fn set_condition(&self, c: impl Into<String>) {
        *self.condition.lock().unwrap_or_else(|p| p.into_inner()) = c.into();
    }

    pub fn condition(&self) -> String {
        self.condition
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn mark_pp_dirty(st: &mut TakeoverState) {
        st.pp_dirty = true;
    }

    pub(crate) fn mark_ov_dirty(st: &mut TakeoverState) {
        st.ov_dirty = true;
    }

    /// Persists the bitmaps that changed. The caller has made the data (base and overlay) durable
    /// first: a bit must never claim data that is not on disk.
    pub fn persist(&self) -> io::Result<()> {
        let (pp, ov) = {
            let mut st = self.state();
            let pp = st.pp_dirty.then(|| st.peer_pending.clone());
            let ov = st.ov_dirty.then(|| st.overlay_present.clone());
            st.pp_dirty = false;
            st.ov_dirty = false;
            (pp, ov)
        };
        if let Some(ov) = ov {
            if let Err(e) = ov.store(&self.ov_path) {
                Self::mark_ov_dirty(&mut self.state());
                return Err(e);
            }
        }
        if let Some(pp) = pp {
            if let Err(e) = pp.store(&self.pp_path) {
                Self::mark_pp_dirty(&mut self.state());
                return Err(e);
            }
            if pp.is_empty() {
                self.state().pp_durably_empty = true;
            }
        }
        Ok(())
    }

    /// Replaces both bitmaps durably (start of a takeover, end of a merge).
    pub fn reset(&self, peer_pending: Bitmap) -> io::Result<()> {
        let blocks = peer_pending.len();
        let empty = Bitmap::new(blocks);
        empty.store(&self.ov_path)?;
        peer_pending.store(&self.pp_path)?;
        let mut st = self.state();
        st.pp_durably_empty = peer_pending.is_empty();
        st.peer_pending = peer_pending;
        st.overlay_present = empty;
        st.pp_dirty = false;
        st.ov_dirty = false;
        Ok(())
    }

    /// Durably stores the overlay bitmap with `blocks` cleared (after they were merged).
    pub fn clear_overlay_durably(&self, blocks: &[u64]) -> io::Result<()> {
        let snapshot = {
            let st = self.state();
            let mut s = st.overlay_present.clone();
            for &b in blocks {
                s.clear(b);
            }
            s
        };
        snapshot.store(&self.ov_path)?;
        let mut st = self.state();
        for &b in blocks {
            st.overlay_present.clear(b);
        }
        Ok(())
    }
}
