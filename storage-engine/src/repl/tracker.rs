//! The primary's differential table and everything that keeps it exact:
//! - `pending`: one bit per 4 KiB block not yet acknowledged by the peer (DAT1 / `pending_to_peer`);
//! - `last_seq`: the generation of each pending block, so an old acknowledgement never clears a block
//!   that was written again meanwhile (no lost update, failover.md AT-04 / A11);
//! - the journal of ordered records, and the write-intent extents that make the table crash-safe.
//!
//! Write path (the block's stripe lock is held throughout, so overlapping writes and resync reads of
//! the same block serialize):
//!   1. set the pending bits (marked in flight); if an extent turns hot, write it to the intent log
//!      (`intent_log.rs`), then, outside the tracker's lock, wait for an fdatasync that covers it
//!      (shared by concurrent writes: group commit); a write to an extent whose record is written
//!      but not yet synced waits for that sync too;
//!   2. write the data file;
//!   3. assign the seq, record the generation, append to the journal; acknowledge the host.
//!
//! After a crash, pending = last persisted table ∪ every block of every hot extent (the `intent`
//! bitmap ∪ the intent log): a superset of what the peer may lack.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use bytes::Bytes;

use super::intent_log::{Standing, Ticket};
use crate::blocking::off_the_runtime;

use crate::{
    bitmap::{Bitmap, BitmapFile},
    clock::now_us,
    geometry::{blocks_of, BLOCK_SIZE},
    journal::{Append, Journal, Record},
};

/// Blocks per write-intent extent (1 MiB).
pub const EXTENT_BLOCKS: u64 = 256;
const IN_FLIGHT: u64 = u64::MAX;
/// The live move's table of blocks owed to the new engine (`MoveTable`).
pub const MOVE_PENDING_FILE: &str = "move_pending";
/// Generation of a block whose data write failed: above every seq, so no record's
/// acknowledgement clears it; an image read now carries it and clears it.
const CONTENT_UNKNOWN: u64 = u64::MAX - 1;
/// The generation of an image whose durable acknowledgement clears nothing (`read_image`).
pub const NO_CLEAR: u64 = u64::MAX - 2;
/// Checkpoints (500 ms apart) an extent must stay unwritten and clean before it cools.
pub const COOL_AFTER_TICKS: u32 = 20;
const STRIPES: u64 = 1024;
/// Blocks per stripe lock (64 KiB), so a large write takes few locks.
const STRIPE_BLOCKS: u64 = 16;

/// Striped locks over blocks.
pub struct BlockLocks {
    stripes: Vec<Mutex<()>>,
}

pub struct BlockGuard<'a> {
    _guards: Vec<MutexGuard<'a, ()>>,
}

impl BlockLocks {
    pub fn new() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Locks every stripe covering `blocks`, in ascending stripe order (no deadlock).
    pub fn lock(&self, blocks: std::ops::Range<u64>) -> BlockGuard<'_> {
        let mut ids: Vec<u64> = (blocks.start / STRIPE_BLOCKS..blocks.end.div_ceil(STRIPE_BLOCKS))
            .map(|s| s % STRIPES)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        BlockGuard {
            _guards: ids
                .into_iter()
                .map(|i| {
                    self.stripes[i as usize]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                })
                .collect(),
        }
    }
}

impl Default for BlockLocks {
    fn default() -> Self {
        Self::new()
    }
}

/// What the table says after an acknowledgement or a checkpoint.
#[derive(Debug, Default, Clone, Copy)]
pub struct TableCounts {
    pub pending_blocks: u64,
    pub journal_bytes: u64,
    pub last_seq: u64,
    pub acked_seq: u64,
}

/// The table's fields, private to this module: callers go through `Tracker`'s methods, which keep
/// its rules (a bit is cleared only by the acknowledgement of its generation, the journal and the
/// table agree on what is owed).
pub struct TrackState {
    pending: Bitmap,
    last_seq: HashMap<u64, u64>,
    journal: Journal,
    acked_seq: u64,
    /// Blocks are pending that no journal record covers: the sender must resync from the table.
    resync_needed: bool,
    /// The hot extents. Invariant: never holds an extent the durable intent set (the `intent` file
    /// and the intent log) lacks, except one whose log record is written and not yet synced, which
    /// the log lists (`IntentLog::owed_for`) until a sync covers it or fails (then it is cleared
    /// here). Only `write`, which logs the extent before its data write, and `checkpoint`, which
    /// stores the file before it replaces this, add to it. A write finding its extent set here
    /// skips the log, and waits only for a sync the log still owes; a bit set only in memory would
    /// leave that write in neither file after a crash, and the returning primary would not offer it
    /// back (replicas silently differing). Tests:
    /// `tests::writes_in_extents_of_marked_blocks_survive_a_crash`,
    /// `tests::a_write_to_an_extent_logged_but_not_synced_waits_for_the_sync`, `tests/reboot_forced.rs`.
    intent: Bitmap,
    /// Extents made hot since `intent` was last stored (`intent_log.rs`).
    intent_log: super::intent_log::IntentLog,
    /// Checkpoint tick of each extent's last write: extents cool only after a quiet spell, so a busy
    /// region does not pay an intent fsync again and again (the idea of DRBD's activity log).
    last_touch: Vec<u32>,
    tick: u32,
    dirty: bool,
    epoch: u64,
    /// First seq this process issued; a peer that applied this seq or more heard it from our
    /// previous incarnation, so the numbers collide and the journal cannot be trusted.
    boot_next: u64,
    seq_checked: bool,
    /// The new engine's table while a live move copies (issue 18); `None` otherwise.
    moving: Option<MoveTable>,
}

/// What a live move owes its new engine beyond the copy (issue 18, the position correlation).
/// The copier reads a chunk and moves `watermark` past it under the chunk's block locks, and a
/// host write decides under its own block locks: below the watermark the copier already read the
/// block, so the write is owed to the new engine (set here); at or above it the copier reads it
/// later. A write and the copier's read of the same block therefore never interleave unseen.
/// Test: `tracker::tests::a_write_racing_the_copier_is_copied_or_owed`.
struct MoveTable {
    watermark: u64,
    pending: Bitmap,
    /// The seq each pending block was last written at: only the new engine's durable
    /// acknowledgement of that generation clears it (as `last_seq` does for the peer).
    gen: HashMap<u64, u64>,
    dirty: bool,
}

/// What the sender streams next (`Tracker::next_records`).
pub enum Next {
    /// Records from the cursor on, and whether the journal is filling up (the batch asks the peer
    /// to sync, so the acknowledgements trim it).
    Records(Vec<Record>, bool),
    /// The journal does not cover the cursor: resync from the table.
    Resync,
}

impl TrackState {
    /// A write that never reached the data file: each block keeps the generation it had (see
    /// `mark_pending` for why a generation is never lowered).
    fn unmark(&mut self, before: Vec<(u64, Option<u64>)>) {
        for (b, g) in before {
            self.last_seq.insert(b, g.unwrap_or(0));
            // Unchanged content: any image of it the new engine acknowledges is good.
            self.move_generation(b, 0);
        }
    }

    /// Records the generation of a block this write marked owed to the new engine.
    fn move_generation(&mut self, b: u64, gen: u64) {
        if let Some(m) = &mut self.moving {
            if let Some(g) = m.gen.get_mut(&b) {
                if *g == IN_FLIGHT {
                    *g = gen;
                }
            }
        }
    }

    /// Extents that must stay covered: any with a pending block (writes in flight included), and,
    /// unless `quiesced`, any written in the last `COOL_AFTER_TICKS` checkpoints.
    fn hot_extents(&self, quiesced: bool) -> Bitmap {
        let mut hot = Bitmap::new(self.intent.len());
        for b in self.pending.iter_ones() {
            hot.set(b / EXTENT_BLOCKS);
        }
        if !quiesced {
            for e in self.intent.iter_ones() {
                if self.tick.wrapping_sub(self.last_touch[e as usize]) < COOL_AFTER_TICKS {
                    hot.set(e);
                }
            }
        }
        hot
    }
}

/// The primary side's replication bookkeeping for one volume.
pub struct Tracker {
    state: Mutex<TrackState>,
    pub locks: BlockLocks,
    pending_file: BitmapFile,
    intent_path: PathBuf,
    move_file: BitmapFile,
    /// Grows with the volume (`grow`), after the tables have.
    blocks: std::sync::atomic::AtomicU64,
    /// Held by the one thread syncing the intent log (`intent_durable`); the others wait here.
    intent_sync: Mutex<()>,
    /// Points where a unit test holds a thread (nothing outside tests).
    pub(crate) seams: crate::seam::Seams,
    /// Woken when the new engine of a live move acknowledged owed blocks.
    pub move_acked: tokio::sync::Notify,
}

#[derive(Clone)]
pub enum Payload {
    Data(Bytes),
    Zero(u64),
}

fn intent_sync_failed() -> io::Error {
    io::Error::other("the write-intent log's fdatasync failed")
}

impl Tracker {
    /// Loads the table from `state_dir` (recovering a crash from the intent extents).
    pub fn open(
        state_dir: &Path,
        blocks: u64,
        acked_seq: u64,
        epoch: u64,
        journal_bytes: u64,
    ) -> io::Result<Self> {
        Self::open_grown(state_dir, blocks, &[], acked_seq, epoch, journal_bytes)
    }

    /// `open` for a volume that had `earlier` sizes (in blocks) before it grew: tables stored at
    /// one of them load grown.
    pub fn open_grown(
        state_dir: &Path,
        blocks: u64,
        earlier: &[u64],
        acked_seq: u64,
        epoch: u64,
        journal_bytes: u64,
    ) -> io::Result<Self> {
        let pending_path = state_dir.join("pending_to_peer");
        let intent_path = state_dir.join("intent");
        let extents = blocks.div_ceil(EXTENT_BLOCKS);
        let earlier_extents: Vec<u64> = earlier.iter().map(|b| b.div_ceil(EXTENT_BLOCKS)).collect();
        let mut pending = Bitmap::load_grown(&pending_path, blocks, earlier)?
            .unwrap_or_else(|| Bitmap::new(blocks));
        let mut intent = Bitmap::load_grown(&intent_path, extents, &earlier_extents)?
            .unwrap_or_else(|| Bitmap::new(extents));
        let (intent_log, logged) =
            super::intent_log::IntentLog::open(&state_dir.join("intent.log"), extents)?;
        for e in logged {
            intent.set(e);
        }
        for e in intent.iter_ones() {
            pending.set_range(e * EXTENT_BLOCKS, (e + 1) * EXTENT_BLOCKS);
        }
        let resync_needed = !pending.is_empty();
        Ok(Self {
            state: Mutex::new(TrackState {
                pending,
                last_seq: HashMap::new(),
                journal: Journal::new(journal_bytes, acked_seq + 1),
                acked_seq,
                resync_needed,
                last_touch: vec![0; extents as usize],
                tick: 1,
                intent,
                intent_log,
                dirty: true,
                epoch,
                boot_next: acked_seq + 1,
                seq_checked: false,
                moving: None,
            }),
            locks: BlockLocks::new(),
            pending_file: BitmapFile::new(pending_path),
            intent_path,
            move_file: BitmapFile::new(state_dir.join(MOVE_PENDING_FILE)),
            blocks: blocks.into(),
            intent_sync: Mutex::new(()),
            seams: Default::default(),
            move_acked: Default::default(),
        })
    }

    pub fn blocks(&self) -> u64 {
        self.blocks.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The volume grew to `blocks` (its new size is committed in `meta`): the table and the
    /// intent extents grow in memory, the new blocks owing nothing (zeros on both sides). The
    /// files grow at their next store; a smaller file loads grown (`Bitmap::load`).
    pub fn grow(&self, blocks: u64) {
        let mut s = self.state();
        let extents = blocks.div_ceil(EXTENT_BLOCKS);
        s.pending.grow(blocks);
        s.intent.grow(extents);
        if let Some(m) = &mut s.moving {
            m.pending.grow(blocks);
        }
        if s.last_touch.len() < extents as usize {
            s.last_touch.resize(extents as usize, 0);
        }
        drop(s);
        self.blocks
            .fetch_max(blocks, std::sync::atomic::Ordering::AcqRel);
    }

    fn state(&self) -> MutexGuard<'_, TrackState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The seq of the newest record (0 when none was ever written).
    pub fn last_seq(&self) -> u64 {
        self.state().journal.last_seq()
    }

    pub fn is_pending(&self, b: u64) -> bool {
        self.state().pending.get(b)
    }

    /// A copy of the pending set.
    pub fn pending(&self) -> Bitmap {
        self.state().pending.clone()
    }

    /// The pending set as one snapshot: sparse words, count, and the last seq it covers.
    pub fn pending_snapshot(&self) -> (Vec<u8>, u64, u64) {
        let s = self.state();
        (
            s.pending.to_sparse(),
            s.pending.count(),
            s.journal.last_seq(),
        )
    }

    /// The table in the handoff's wire form (`Bitmap::wire_form`), its count and the last seq, in
    /// one snapshot.
    pub fn handoff_snapshot(&self, runs_ok: bool) -> (crate::bitmap::WireTable, u64, u64) {
        let s = self.state();
        (
            s.pending.wire_form(runs_ok),
            s.pending.count(),
            s.journal.last_seq(),
        )
    }

    /// Pending blocks for which `keep` holds.
    pub fn pending_where(&self, keep: impl Fn(u64) -> bool) -> Vec<u64> {
        self.state()
            .pending
            .iter_ones()
            .filter(|&b| keep(b))
            .collect()
    }

    /// Blocks are pending that no record covers: the next session resyncs from the table.
    pub fn resync_needed(&self) -> bool {
        self.state().resync_needed
    }

    /// The next session resyncs from the table (a restart that must reach InSync again).
    pub fn need_resync(&self) {
        self.state().resync_needed = true;
    }

    /// New records and images are numbered at `epoch`.
    pub fn set_epoch(&self, epoch: u64) {
        self.state().epoch = epoch;
    }

    /// A role change: records journaled under the old role are never replayed (`drop`: and are
    /// dropped); the next session resyncs from the table, at `epoch`.
    pub fn restart(&self, epoch: u64, drop: bool) {
        let mut s = self.state();
        if drop {
            s.journal.reset();
        }
        s.epoch = epoch;
        s.resync_needed = true;
    }

    /// The peer says it applied up to `applied` when a session opens: decides whether the journal
    /// can resume it, renumbering past seqs the peer heard from an earlier incarnation of this
    /// engine. `true`: the session must resync from the table.
    pub fn agree_resume(&self, applied: u64, durable: u64) -> bool {
        let mut s = self.state();
        if !s.seq_checked {
            s.seq_checked = true;
            if applied >= s.boot_next {
                // Seqs from before our restart reached the peer: renumber and resync from the table.
                s.journal.reset();
                s.journal.bump_to(applied + 1);
                s.resync_needed = true;
            }
        }
        if applied >= s.journal.next_seq() {
            // We restarted and lost records the peer already has: renumber past them.
            s.journal.bump_to(applied + 1);
            s.resync_needed = true;
        }
        s.resync_needed || !s.journal.covers(durable + 1)
    }

    /// The records to stream from `cursor` (at most about `max_bytes`), or `Next::Resync` when the
    /// journal no longer covers it (or `resync` asks for one). `flush_upto` grows to the last seq
    /// when `flush_asked` (a sync-mode FLUSH covers every record journaled before it).
    pub fn next_records(
        &self,
        cursor: u64,
        max_bytes: u64,
        resync: bool,
        flush_asked: bool,
        flush_upto: &mut Option<u64>,
    ) -> Next {
        let mut s = self.state();
        if flush_asked {
            *flush_upto = (*flush_upto).max(Some(s.journal.last_seq()));
        }
        if s.resync_needed || resync || !s.journal.covers(cursor) {
            s.resync_needed = true;
            return Next::Resync;
        }
        Next::Records(s.journal.read_from(cursor, max_bytes), s.journal.filling())
    }

    pub fn counts(&self) -> TableCounts {
        let s = self.state();
        TableCounts {
            pending_blocks: s.pending.count(),
            journal_bytes: s.journal.bytes(),
            last_seq: s.journal.last_seq(),
            acked_seq: s.acked_seq,
        }
    }

    /// Waits until the intent log's records behind `t` are durable. One fdatasync at a time, each
    /// covering every record written before it began (group commit); the tracker's lock is not
    /// held across it, so other writes, the sender and acknowledgements go on meanwhile. A failed
    /// sync voids its generation's unsynced records and unmarks their extents: every write
    /// waiting on them gets the error and never reaches the data file.
    fn intent_durable(&self, t: Ticket) -> io::Result<()> {
        self.seams.hit("tracker.intent.wait");
        let _turn = self.intent_sync.lock().unwrap_or_else(|p| p.into_inner());
        let (file, path, cover) = {
            let s = self.state();
            match s.intent_log.stands(t) {
                Standing::Durable => return Ok(()),
                Standing::Failed => return Err(intent_sync_failed()),
                Standing::Owed => s.intent_log.sync_start()?,
            }
        };
        self.seams.hit("tracker.intent.sync");
        let synced = crate::seam::power::io(&path).and_then(|()| file.sync_data());
        let mut s = self.state();
        for e in s.intent_log.sync_done(cover, synced.is_ok()) {
            s.intent.clear(e);
        }
        match s.intent_log.stands(t) {
            Standing::Durable => Ok(()),
            _ => Err(synced.err().unwrap_or_else(intent_sync_failed)),
        }
    }

    /// Whether a write to `blocks` would wait for an intent-log sync (see `write`). A range over
    /// more than `WIDE_EXTENTS` extents answers yes without looking: zeroing that much is slow
    /// anyway, and the look would hold the lock for it.
    pub fn waits_for_intent(&self, blocks: std::ops::Range<u64>) -> bool {
        const WIDE_EXTENTS: u64 = 64;
        if blocks.is_empty() {
            return false;
        }
        let extents = blocks.start / EXTENT_BLOCKS..(blocks.end - 1) / EXTENT_BLOCKS + 1;
        if extents.end - extents.start > WIDE_EXTENTS {
            return true;
        }
        let s = self.state();
        extents
            .into_iter()
            .any(|e| !s.intent.get(e) || s.intent_log.owed_for(e).is_some())
    }

    /// Host write: runs `apply` (the data file write) between marking the blocks and journaling it.
    /// Returns the record's seq.
    pub fn write(
        &self,
        offset: u64,
        payload: Payload,
        apply: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<u64> {
        let len = match &payload {
            Payload::Data(d) => d.len() as u64,
            Payload::Zero(n) => *n,
        };
        let blocks = blocks_of(offset, len);
        let _g = self.locks.lock(blocks.clone());
        {
            let mut s = self.state();
            let mut cold = Vec::new();
            let mut before = Vec::new();
            let tick = s.tick;
            if let Some(m) = &mut s.moving {
                // Decided under the block locks, which the copier holds while it reads a chunk
                // and moves the watermark past it (`MoveTable`).
                for b in blocks.clone().filter(|&b| b < m.watermark) {
                    m.pending.set(b);
                    m.gen.insert(b, IN_FLIGHT);
                    m.dirty = true;
                }
            }
            // The log sync this write waits for before its data write, if any.
            let mut owed: Option<Ticket> = None;
            let mut last_extent = None;
            for b in blocks.clone() {
                s.pending.set(b);
                before.push((b, s.last_seq.insert(b, IN_FLIGHT)));
                let e = b / EXTENT_BLOCKS;
                s.last_touch[e as usize] = tick;
                if last_extent == Some(e) {
                    continue;
                }
                last_extent = Some(e);
                if s.intent.set(e) {
                    cold.push(e);
                } else if let Some(t) = s.intent_log.owed_for(e) {
                    // Hot, but its record is not synced yet: wait for the same sync.
                    owed = Some(owed.map_or(t, |o: Ticket| o.max(t)));
                }
            }
            s.dirty = true;
            if !cold.is_empty() {
                match s.intent_log.write(&cold) {
                    Ok(t) => owed = Some(owed.map_or(t, |o| o.max(t))),
                    Err(e) => {
                        // Not marked on disk, so not in memory either: the next write to the
                        // extent tries the store again instead of trusting a mark that is not
                        // there. Test: `takeover::powerloss::failpoint_campaign`.
                        for x in cold {
                            s.intent.clear(x);
                        }
                        s.unmark(before);
                        return Err(e);
                    }
                }
            }
            drop(s);
            // Write-intent: the extent is durably marked (logged and fdatasync'd, or in a stored
            // bitmap) before its data can reach the disk; the sync runs outside the tracker's
            // lock and is shared by every write waiting for it. Tests:
            // `tests::a_cold_extent_is_logged_before_its_data_write`,
            // `tests::a_write_to_an_extent_logged_but_not_synced_waits_for_the_sync`,
            // `takeover::powerloss::powerloss_campaign`, `tests/reboot_forced.rs`.
            if let Some(t) = owed {
                if let Err(e) = off_the_runtime(|| self.intent_durable(t)) {
                    // A failed sync unmarked the extents it lost (`intent_durable`).
                    self.state().unmark(before);
                    return Err(e);
                }
            }
        }
        let applied = apply();
        let mut s = self.state();
        if applied.is_err() {
            // The block's content is unknown: keep it pending and let a resync send what is there.
            // Invariant: only an image clears it, never the acknowledgement of a record (an older
            // one would leave the peer without the torn bytes this file may hold). Test:
            // `tests::failed_data_write_stays_pending_for_resync`.
            for b in blocks {
                s.last_seq.insert(b, CONTENT_UNKNOWN);
                s.move_generation(b, CONTENT_UNKNOWN);
            }
            s.resync_needed = true;
            return applied.map(|_| 0);
        }
        let seq = s.journal.next_seq();
        let tick = s.tick;
        for b in blocks {
            s.last_seq.insert(b, seq);
            s.move_generation(b, seq);
            // Touched again after the data write, so a checkpoint whose data sync began before
            // it cannot cool this extent.
            s.last_touch[(b / EXTENT_BLOCKS) as usize] = tick;
        }
        let (data, zero_len) = match payload {
            Payload::Data(d) => (d, 0),
            Payload::Zero(n) => (Bytes::new(), n),
        };
        let epoch = s.epoch;
        if s.journal.append(Record {
            seq,
            epoch,
            timestamp_us: now_us(),
            offset,
            data,
            zero_len,
        }) == Append::Overflowed
        {
            s.resync_needed = true;
        }
        Ok(seq)
    }

    /// Whether some pending block has no journal record at or after `from` (then streaming the
    /// journal alone would never clear it, and a resync from the table is needed).
    pub fn pending_uncovered(&self, from: u64) -> bool {
        let s = self.state();
        if s.pending.is_empty() {
            return false;
        }
        // The records' block ranges, merged: memory follows the journal, not the volume (a
        // bitmap of the volume's size touched a page per scattered record, issue 17).
        let mut covered: Vec<std::ops::Range<u64>> = s
            .journal
            .iter_from(from)
            .map(|r| blocks_of(r.offset, r.len()))
            .filter(|r| !r.is_empty())
            .collect();
        covered.sort_unstable_by_key(|r| r.start);
        let mut merged: Vec<std::ops::Range<u64>> = Vec::with_capacity(covered.len());
        for r in covered {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        let uncovered = s.pending.iter_ones().any(|b| {
            // The last merged range starting at or before b.
            let i = merged.partition_point(|r| r.start <= b);
            i == 0 || merged[i - 1].end <= b
        });
        uncovered
    }

    /// The peer durably applied every record up to `applied`.
    pub fn ack_journal(&self, applied: u64) {
        let mut guard = self.state();
        let s = &mut *guard;
        if applied <= s.acked_seq {
            return;
        }
        for r in s
            .journal
            .iter_from(s.acked_seq + 1)
            .take_while(|r| r.seq <= applied)
        {
            for b in blocks_of(r.offset, r.len()) {
                if s.last_seq.get(&b).is_some_and(|&g| g <= applied) {
                    s.pending.clear(b);
                    s.last_seq.remove(&b);
                }
            }
        }
        s.journal.trim(applied);
        s.acked_seq = applied;
        s.dirty = true;
    }

    /// The peer durably stored block images (block, generation).
    pub fn ack_images(&self, blocks: &[u64], gens: &[u64]) -> u64 {
        let mut s = self.state();
        let mut cleared = 0;
        for (&b, &g) in blocks.iter().zip(gens) {
            if s.last_seq.get(&b).copied().unwrap_or(0) == g && s.pending.clear(b) {
                s.last_seq.remove(&b);
                cleared += 1;
            }
        }
        s.dirty = true;
        cleared
    }

    /// Makes `set` pending (durably: the table is stored) so a resync sends these blocks.
    /// The intent extents are left alone: the stored table covers these blocks, and an extent
    /// marked hot here without its fsync would let a later write in it skip the intent store
    /// (see `TrackState::intent`).
    ///
    /// Invariant: a block already pending keeps its generation (the seq of its newest write, or
    /// IN_FLIGHT). Lowered to 0, an acknowledgement of an *older* record of the block cleared it:
    /// a returning secondary's hello asks its stale table back and reports the records it made
    /// durable before the link broke; the primary had rewritten some of those blocks since, and
    /// they were never resent (replicas silently differing: the sync partition campaign's
    /// "reboot B (secondary)" round, after issue 14). Test:
    /// `tests::a_block_asked_back_keeps_its_newest_write_pending`.
    pub fn mark_pending(&self, set: &Bitmap) -> io::Result<()> {
        let turn = self.pending_file.turn();
        let snapshot = {
            let mut s = self.state();
            s.pending.union_with(set);
            for b in set.iter_ones() {
                s.last_seq.entry(b).or_insert(0);
            }
            s.resync_needed = true;
            s.dirty = true;
            s.pending.encode()
        };
        turn.store(&snapshot)
    }

    /// Forgets pending blocks the peer has overwritten (a secondary's blocks that were asked back).
    pub fn forget(&self, blocks: &[u64]) {
        let mut s = self.state();
        for &b in blocks {
            if s.pending.clear(b) {
                s.last_seq.remove(&b);
                s.dirty = true;
            }
        }
    }

    /// Starts a table-driven resync: the journal restarts, and the blocks to send are returned.
    /// With `extra`, those blocks (a new secondary's full copy) become pending too (in memory: a
    /// restart finds the peer still NeedsFull and copies again). No intent extent is set here
    /// (see `TrackState::intent`).
    pub fn begin_resync(&self, extra: Option<&Bitmap>) -> (u64, Bitmap) {
        let mut s = self.state();
        if let Some(x) = extra {
            s.pending.union_with(x);
        }
        s.journal.reset();
        s.resync_needed = false;
        s.dirty = true;
        (s.journal.next_seq(), s.pending.clone())
    }

    /// Reads one block for a resync image: (generation, data), consistent under the block lock.
    /// `since`: the seq the resync's stream resumes at after its end (`begin_resync`'s start).
    ///
    /// Invariant: an image of a block written at or after `since` carries `NO_CLEAR`. That write's
    /// record follows the resync's end, behind any older record of the block written since, so the
    /// peer applies those after this image; only the newest record's acknowledgement may clear the
    /// block. Cleared by the image's, a journal overflow that drops the newest record before it
    /// leaves would leave an older one standing on the peer with nothing pending (replicas silently
    /// differing: `scripts/hunt-divergence.sh`). Test:
    /// `tests::an_image_of_a_block_written_during_the_resync_clears_nothing`.
    pub fn read_image(
        &self,
        block: u64,
        since: u64,
        read: impl FnOnce(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<Option<(u64, Vec<u8>)>> {
        let _g = self.locks.lock(block..block + 1);
        let gen = {
            let s = self.state();
            if !s.pending.get(block) {
                return Ok(None);
            }
            match s.last_seq.get(&block).copied().unwrap_or(0) {
                g if g != CONTENT_UNKNOWN && g >= since => NO_CLEAR,
                g => g,
            }
        };
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        read(&mut buf)?;
        Ok(Some((gen, buf)))
    }

    /// Persists the table if it changed, then cools extents that stayed unwritten and clean.
    ///
    /// Cooling drops an extent's write-intent cover, so `sync_data` (the data file's fdatasync)
    /// runs first: a write here that never reached the disk could otherwise differ from what the
    /// peer acknowledged, with nothing left to resync it. The table itself needs no data sync, as
    /// the intent file still covers every block written since the last one. Syncing only when
    /// something cools keeps a busy primary from writing its whole page cache back twice a second
    /// (an unpaired engine never does). `quiesced` (a clean shutdown whose data is already synced)
    /// cools every extent with nothing pending at once.
    pub fn checkpoint(
        &self,
        sync_data: impl FnOnce() -> io::Result<()>,
        quiesced: bool,
    ) -> io::Result<()> {
        let turn = self.pending_file.turn();
        let snapshot = {
            let mut s = self.state();
            s.tick = s.tick.wrapping_add(1);
            if s.dirty {
                s.dirty = false;
                // Encoded under the lock: a pass over the words, no copy of a large table.
                Some(s.pending.encode())
            } else {
                None
            }
        };
        if let Some(p) = snapshot {
            self.seams.hit("tracker.checkpoint.before_store");
            if let Err(e) = turn.store(&p) {
                self.state().dirty = true;
                return Err(e);
            }
        }
        drop(turn);
        // The move's table is stored before any extent cools below: a block owed to the new
        // engine is either in this file or in a hot extent, which a restart adds back
        // (`MoveTable`, `Tracker::intent_blocks`). Test: `tests/move.rs` kill loop.
        self.store_move_table()?;
        let cooling = {
            let s = self.state();
            let hot = s.hot_extents(quiesced);
            let cools = s.intent.iter_ones().any(|e| !hot.get(e));
            cools
        };
        if cooling {
            if !quiesced {
                // Every write that completed before this point is on disk afterwards; a write
                // that starts later marks its extent with the current tick, which keeps it hot.
                sync_data()?;
            }
            let mut s = self.state();
            let hot = s.hot_extents(quiesced);
            if hot != s.intent {
                hot.store(&self.intent_path)?;
                s.intent = hot;
                // The stored bitmap covers every extent still hot: the log is no longer needed.
                s.intent_log.clear()?;
                return Ok(());
            }
        }
        // Nothing cooled: a long log is folded into the bitmap (which holds every logged extent),
        // then emptied. One bitmap store per checkpoint at most.
        let mut s = self.state();
        if s.intent_log.records() >= super::intent_log::COMPACT_RECORDS {
            s.intent.store(&self.intent_path)?;
            s.intent_log.clear()?;
        }
        Ok(())
    }

    /// Unit tests' power loss: the intent log's appends no fdatasync covered are gone.
    #[cfg(test)]
    pub fn lose_unsynced(&self) {
        self.state().intent_log.lose_unsynced();
    }

    /// A live move starts (or resumes after a restart): the copier is at `watermark`, and
    /// `owed` are the blocks below it the new engine may lack.
    pub fn start_move(&self, watermark: u64, owed: Bitmap) {
        let mut s = self.state();
        s.moving = Some(MoveTable {
            watermark,
            gen: owed.iter_ones().map(|b| (b, 0)).collect(),
            pending: owed,
            dirty: true,
        });
    }

    /// The move ended (cut over or aborted): writes go to the one peer again.
    pub fn end_move(&self) {
        self.state().moving = None;
        self.move_acked.notify_waiters();
    }

    /// The copier's watermark, while a move copies.
    pub fn move_watermark(&self) -> Option<u64> {
        self.state().moving.as_ref().map(|m| m.watermark)
    }

    /// The copier's step: under the block locks of `lo..hi`, runs `read` (the chunk's bytes) and
    /// moves the watermark past the chunk, so a host write to it lands either before the read
    /// (the copy carries it) or after the watermark moved (it is owed: `MoveTable`).
    pub fn copy_chunk<T>(
        &self,
        lo: u64,
        hi: u64,
        read: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let _g = self.locks.lock(lo..hi);
        let out = read()?;
        self.seams.hit("move.copy.read");
        if let Some(m) = &mut self.state().moving {
            m.watermark = m.watermark.max(hi);
        }
        Ok(out)
    }

    /// Up to `max` blocks owed to the new engine.
    pub fn move_owed(&self, max: usize) -> Vec<u64> {
        self.state()
            .moving
            .as_ref()
            .filter(|m| !m.pending.is_empty())
            .map(|m| m.pending.iter_ones().take(max).collect())
            .unwrap_or_default()
    }

    /// How many blocks are owed to the new engine (0 when no move copies).
    pub fn move_owed_count(&self) -> u64 {
        self.state()
            .moving
            .as_ref()
            .map_or(0, |m| m.pending.count())
    }

    /// Reads an owed block for the new engine: (generation, data), consistent under its lock;
    /// `None` when it is no longer owed.
    pub fn read_move_image(
        &self,
        block: u64,
        read: impl FnOnce(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<Option<(u64, Vec<u8>)>> {
        let _g = self.locks.lock(block..block + 1);
        let gen = {
            let s = self.state();
            match &s.moving {
                Some(m) if m.pending.get(block) => m.gen.get(&block).copied().unwrap_or(0),
                _ => return Ok(None),
            }
        };
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        read(&mut buf)?;
        Ok(Some((gen, buf)))
    }

    /// The new engine durably stored these images (block, generation): a block written again
    /// since its image was read stays owed.
    pub fn ack_move_images(&self, blocks: &[u64], gens: &[u64]) {
        {
            let mut s = self.state();
            let Some(m) = &mut s.moving else { return };
            for (&b, &g) in blocks.iter().zip(gens) {
                if m.gen.get(&b).copied() == Some(g) && m.pending.clear(b) {
                    m.gen.remove(&b);
                    m.dirty = true;
                }
            }
        }
        self.move_acked.notify_waiters();
    }

    /// Whether the new engine of a live move still lacks the write `seq` to `blocks` (one of them
    /// owed at that generation or an older one).
    pub fn move_owes(&self, blocks: std::ops::Range<u64>, seq: u64) -> bool {
        let s = self.state();
        let Some(m) = &s.moving else { return false };
        let owes = blocks
            .into_iter()
            .any(|b| m.pending.get(b) && m.gen.get(&b).is_some_and(|&g| g <= seq));
        owes
    }

    /// Every block of every hot intent extent: with the stored move table, a superset of what
    /// the new engine may lack after a crash.
    pub fn intent_blocks(&self) -> Bitmap {
        let s = self.state();
        let mut out = Bitmap::new(self.blocks());
        for e in s.intent.iter_ones() {
            out.set_range(e * EXTENT_BLOCKS, ((e + 1) * EXTENT_BLOCKS).min(out.len()));
        }
        out
    }

    /// Stores the move's table if it changed.
    pub fn store_move_table(&self) -> io::Result<()> {
        let turn = self.move_file.turn();
        let snapshot = {
            let mut s = self.state();
            match &mut s.moving {
                Some(m) if m.dirty => {
                    m.dirty = false;
                    Some(m.pending.encode())
                }
                _ => None,
            }
        };
        if let Some(p) = snapshot {
            if let Err(e) = turn.store(&p) {
                if let Some(m) = &mut self.state().moving {
                    m.dirty = true;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// The stored move table (empty when there is none).
    pub fn load_move_table(&self) -> io::Result<Bitmap> {
        Ok(Bitmap::load(self.move_file.path(), self.blocks())?
            .unwrap_or_else(|| Bitmap::new(self.blocks())))
    }

    /// Oldest unacknowledged write's age, for the lag report.
    pub fn lag_seconds(&self) -> f64 {
        let s = self.state();
        match s.journal.oldest_timestamp_us() {
            Some(t) => now_us().saturating_sub(t) as f64 / 1e6,
            None => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };

    fn tracker(dir: &Path) -> Tracker {
        Tracker::open(dir, 4096, 0, 1, 1 << 20).unwrap()
    }

    /// Writes one 4 KiB block; returns its seq.
    fn put(t: &Tracker, block: u64) -> u64 {
        t.write(
            block * 4096,
            Payload::Data(Bytes::from(vec![1; 4096])),
            || Ok(()),
        )
        .unwrap()
    }

    /// Only pending blocks that no journal record at or after the cursor covers call for a
    /// resync: a record over several blocks covers each, one ending before a block does not.
    #[test]
    fn pending_uncovered_asks_for_a_resync_only_for_blocks_no_record_covers() {
        let d = tempfile::tempdir().unwrap();
        let t = tracker(d.path());
        assert!(!t.pending_uncovered(1));
        let first = t
            .write(
                8 * 4096,
                Payload::Data(Bytes::from(vec![1; 3 * 4096])),
                || Ok(()),
            )
            .unwrap();
        let second = put(&t, 2000);
        assert!(!t.pending_uncovered(first));
        // From the second record on, blocks 8..11 are pending with no record left to send them.
        assert!(t.pending_uncovered(second));
        t.ack_journal(first);
        assert!(!t.pending_uncovered(second));
        // A block asked back (marked pending without a record) is uncovered.
        let mut set = Bitmap::new(4096);
        set.set(9);
        t.mark_pending(&set).unwrap();
        assert!(t.pending_uncovered(second));
    }

    /// Block 0 written and acknowledged; block 600 (another extent) written and still pending.
    fn acked_and_pending(t: &Tracker) {
        let s = put(t, 0);
        put(t, 600);
        t.ack_journal(s);
    }

    /// The copier's read of a chunk and a host write to a block in it, forced to race: the
    /// copier is held after its read, before its watermark passes the chunk, while the write is
    /// issued. Whatever the order, the new engine must end up with the write: the copy read it,
    /// or the block is owed. (If the watermark moved outside the block locks, the write would
    /// land in between unseen: neither copied nor owed.)
    #[test]
    fn a_write_racing_the_copier_is_copied_or_owed() {
        let d = tempfile::tempdir().unwrap();
        let t = std::sync::Arc::new(tracker(d.path()));
        let disk = std::sync::Arc::new(Mutex::new(vec![0u8; 64]));
        t.start_move(0, Bitmap::new(4096));
        let held = t.seams.arm("move.copy.read");
        let copier = {
            let (t, disk) = (std::sync::Arc::clone(&t), std::sync::Arc::clone(&disk));
            std::thread::spawn(move || {
                t.copy_chunk(0, 64, || Ok(disk.lock().unwrap().clone()))
                    .unwrap()
            })
        };
        assert!(held.wait_arrived(), "the copier never read its chunk");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let writer = {
            let (t, disk) = (std::sync::Arc::clone(&t), std::sync::Arc::clone(&disk));
            std::thread::spawn(move || {
                let seq = t
                    .write(5 * 4096, Payload::Data(Bytes::from(vec![7; 4096])), || {
                        disk.lock().unwrap()[5] = 7;
                        Ok(())
                    })
                    .unwrap();
                let _ = done_tx.send(());
                seq
            })
        };
        // The write must wait for the copier's block locks: it cannot finish while the copier
        // is held between its read and the watermark (a negative check, bounded).
        assert!(
            done_rx
                .recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "the write finished between the copier's read and its watermark"
        );
        held.release();
        let copied = copier.join().unwrap();
        let seq = writer.join().unwrap();
        assert_eq!(t.move_watermark(), Some(64));
        let owed = t.move_owed(10);
        assert!(
            copied[5] == 7 || owed.contains(&5),
            "block 5's write is neither in the copy nor owed: the new engine would lack it"
        );
        // Owed at the write's generation: only that acknowledgement clears it.
        t.ack_move_images(&[5], &[seq - 1]);
        assert_eq!(t.move_owed(10), vec![5]);
        let (g, _) = t.read_move_image(5, |_| Ok(())).unwrap().unwrap();
        assert_eq!(g, seq);
        t.ack_move_images(&[5], &[g]);
        assert!(t.move_owed(10).is_empty());
        // Above the watermark a write is the copier's, not owed.
        put(&t, 100);
        assert!(t.move_owed(10).is_empty());
    }

    /// A checkpoint's snapshot stored late must not overwrite the table `mark_pending` stored
    /// after it (the blocks asked back by a stepped-down peer would vanish from disk).
    #[test]
    fn marked_pending_blocks_survive_a_racing_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        let t = std::sync::Arc::new(tracker(d.path()));
        put(&t, 3);
        let held = t.seams.arm("tracker.checkpoint.before_store");
        let ck = {
            let t = std::sync::Arc::clone(&t);
            std::thread::spawn(move || t.checkpoint(|| Ok(()), false))
        };
        assert!(
            held.wait_arrived(),
            "the checkpoint never took its snapshot"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let marker = {
            let t = std::sync::Arc::clone(&t);
            std::thread::spawn(move || {
                let mut set = Bitmap::new(4096);
                set.set(700);
                let r = t.mark_pending(&set);
                let _ = tx.send(());
                r
            })
        };
        // With the store turn, mark_pending waits for the checkpoint; without it, it finishes
        // first and the checkpoint's older snapshot is renamed over it.
        let _ = rx.recv_timeout(std::time::Duration::from_millis(300));
        held.release();
        ck.join().unwrap().unwrap();
        marker.join().unwrap().unwrap();
        let on_disk = Bitmap::load(&d.path().join("pending_to_peer"), 4096)
            .unwrap()
            .unwrap();
        assert!(on_disk.get(3));
        assert!(
            on_disk.get(700),
            "the block marked pending was lost from the stored table"
        );
    }

    /// A write after `mark_pending` (a returning peer's blocks, a forced promotion's losses) or a
    /// full copy's resync, in one of their extents, is covered after a crash that came before any
    /// checkpoint: those set no intent bit in memory that the intent file lacks, so the write
    /// stores it. Before, the write skipped the intent store and was in neither file; the
    /// restarted primary did not offer it back and the replicas differed (the partition
    /// campaign's "reboot (primary) + forced takeover" round).
    #[test]
    fn writes_in_extents_of_marked_blocks_survive_a_crash() {
        for full_copy in [false, true] {
            let d = tempfile::tempdir().unwrap();
            {
                let t = tracker(d.path());
                let mut set = Bitmap::new(4096);
                set.set(700);
                if full_copy {
                    t.begin_resync(Some(&set));
                    t.checkpoint(|| Ok(()), false).unwrap();
                } else {
                    t.mark_pending(&set).unwrap();
                }
                // The peer stored block 700: the table no longer holds it.
                t.forget(&[700]);
                t.checkpoint(|| Ok(()), false).unwrap();
                put(&t, 701);
                // A crash here: no checkpoint stored the table since the write.
            }
            let t = tracker(d.path());
            assert!(
                t.is_pending(701),
                "a write after {} is missing from the table after a crash",
                if full_copy {
                    "a full copy"
                } else {
                    "mark_pending"
                }
            );
        }
    }

    /// The interleaving of the finding: the primary wrote block 5 at s1 and again at s2; the
    /// secondary made s1 durable, its acknowledgement was lost with the link, and it restarted.
    /// Its hello asks block 5 back (its table, stored before the resync that overwrote it, is
    /// stale) and reports s1 durable. Block 5 must stay pending: the secondary lacks s2.
    #[test]
    fn a_block_asked_back_keeps_its_newest_write_pending() {
        let d = tempfile::tempdir().unwrap();
        let t = tracker(d.path());
        let s1 = put(&t, 5);
        let s2 = put(&t, 5);
        put(&t, 9);
        assert!(s2 > s1);
        let mut asked = Bitmap::new(4096);
        asked.set(5);
        asked.set(7);
        // `repl::sender::session`'s order: the table asked back, then the durable seq.
        t.mark_pending(&asked).unwrap();
        t.ack_journal(s1);
        assert!(
            t.is_pending(5),
            "block 5 cleared by the ack of s1 although s2 rewrote it"
        );
        assert!(t.is_pending(7), "a block only asked back stays pending");
        // An image of block 5 read now carries s2, and its acknowledgement clears it.
        let (g, _) = t.read_image(5, u64::MAX, |_| Ok(())).unwrap().unwrap();
        assert_eq!(g, s2);
        assert_eq!(t.ack_images(&[5], &[g]), 1);
        assert!(!t.is_pending(5));
    }

    #[test]
    fn ack_of_an_old_generation_keeps_the_block_pending() {
        let d = tempfile::tempdir().unwrap();
        let t = tracker(d.path());
        let s1 = t
            .write(40960, Payload::Data(Bytes::from(vec![1; 4096])), || Ok(()))
            .unwrap();
        let s2 = t
            .write(40960, Payload::Data(Bytes::from(vec![2; 4096])), || Ok(()))
            .unwrap();
        t.ack_journal(s1);
        assert!(
            t.state().pending.get(10),
            "rewritten block must stay pending (AT-04)"
        );
        t.ack_journal(s2);
        assert!(!t.state().pending.get(10));
        assert_eq!(t.counts().pending_blocks, 0);
    }

    #[test]
    fn image_ack_clears_only_the_same_generation() {
        let d = tempfile::tempdir().unwrap();
        let t = tracker(d.path());
        t.write(0, Payload::Data(Bytes::from(vec![1; 8192])), || Ok(()))
            .unwrap();
        let (start, todo) = t.begin_resync(None);
        assert_eq!(todo.iter_ones().collect::<Vec<_>>(), vec![0, 1]);
        let (g0, _) = t.read_image(0, start, |_| Ok(())).unwrap().unwrap();
        let (g1, _) = t.read_image(1, start, |_| Ok(())).unwrap().unwrap();
        t.write(4096, Payload::Zero(4096), || Ok(())).unwrap();
        assert_eq!(t.ack_images(&[0, 1], &[g0, g1]), 1);
        assert!(t.state().pending.get(1));
    }

    /// A block written after a resync began: its image (newest content) reaches the peer before
    /// the older records of the block written since, which follow the resync's end. If the newest
    /// record is then dropped by a journal overflow, only the block still being pending sends it
    /// again; the image's acknowledgement must not have cleared it.
    #[test]
    fn an_image_of_a_block_written_during_the_resync_clears_nothing() {
        let d = tempfile::tempdir().unwrap();
        let t = tracker(d.path());
        put(&t, 0);
        let (start, _) = t.begin_resync(None);
        let older = put(&t, 0);
        let newest = put(&t, 0);
        assert!(older >= start && newest > older);
        let (g, _) = t.read_image(0, start, |_| Ok(())).unwrap().unwrap();
        assert_eq!(g, NO_CLEAR);
        assert_eq!(t.ack_images(&[0], &[g]), 0);
        assert!(
            t.is_pending(0),
            "the image's ack cleared a block whose newest record may never leave"
        );
        // The peer applied `older` after the image, then the journal overflowed and dropped
        // `newest`: the next resync sends the block again, and that image clears it.
        t.ack_journal(older);
        assert!(t.is_pending(0));
        let (start, todo) = t.begin_resync(None);
        assert!(todo.get(0));
        let (g, _) = t.read_image(0, start, |_| Ok(())).unwrap().unwrap();
        assert_eq!(g, newest);
        assert_eq!(t.ack_images(&[0], &[g]), 1);
        assert!(!t.is_pending(0));
    }

    #[test]
    fn crash_recovery_marks_hot_extents_pending() {
        let d = tempfile::tempdir().unwrap();
        {
            let t = tracker(d.path());
            t.write(
                300 * 4096,
                Payload::Data(Bytes::from(vec![1; 4096])),
                || Ok(()),
            )
            .unwrap();
            // No checkpoint: a crash now. The intent file was written before the data.
        }
        let t = tracker(d.path());
        let s = t.state();
        assert!(s.pending.get(300));
        assert_eq!(
            s.pending.count(),
            EXTENT_BLOCKS,
            "the whole hot extent is resynced"
        );
        assert!(s.resync_needed);
    }

    #[test]
    fn checkpoint_cools_extents_and_persists_the_table() {
        let d = tempfile::tempdir().unwrap();
        {
            let t = tracker(d.path());
            acked_and_pending(&t);
            for _ in 0..=COOL_AFTER_TICKS {
                t.state().dirty = true;
                t.checkpoint(|| Ok(()), false).unwrap();
            }
        }
        let t = tracker(d.path());
        let s = t.state();
        // Block 0 was acknowledged and its extent cooled; block 600's extent is still hot.
        assert!(!s.pending.get(0));
        assert!(s.pending.get(600));
        assert_eq!(s.pending.count(), EXTENT_BLOCKS);
    }

    /// A write to a cold extent logs the extent durably before its data write runs, without
    /// rewriting the `intent` bitmap; after a power loss (what no fdatasync covered is gone) every
    /// written block is pending again. A long log is folded into the bitmap at a checkpoint.
    #[test]
    fn a_cold_extent_is_logged_before_its_data_write() {
        use crate::repl::intent_log::{durable_extents, COMPACT_RECORDS};
        let d = tempfile::tempdir().unwrap();
        let extents = COMPACT_RECORDS + 3;
        let blocks = extents * EXTENT_BLOCKS;
        let written: Vec<u64> = (0..extents).map(|e| e * EXTENT_BLOCKS + e % 7).collect();
        {
            let t = Tracker::open(d.path(), blocks, 0, 1, 1 << 20).unwrap();
            for &b in &written {
                t.write(b * 4096, Payload::Data(Bytes::from(vec![1; 4096])), || {
                    // The extent is on disk before the data write.
                    assert!(durable_extents(d.path(), extents).get(b / EXTENT_BLOCKS));
                    Ok(())
                })
                .unwrap();
            }
            assert!(
                !d.path().join("intent").exists(),
                "a cold write rewrote the intent bitmap"
            );
            t.state().intent_log.lose_unsynced();
            // Power loss: no checkpoint stored the table.
        }
        let t = Tracker::open(d.path(), blocks, 0, 1, 1 << 20).unwrap();
        for &b in &written {
            assert!(t.is_pending(b), "block {b} was lost from the table");
        }
        // The log (past COMPACT_RECORDS) is folded into the bitmap and emptied.
        t.checkpoint(|| Ok(()), false).unwrap();
        assert_eq!(t.state().intent_log.records(), 0);
        assert_eq!(durable_extents(d.path(), extents).count(), extents);
        drop(t);
        let t = Tracker::open(d.path(), blocks, 0, 1, 1 << 20).unwrap();
        assert!(written.iter().all(|&b| t.is_pending(b)));
    }

    /// Group commit: a write to an extent whose log record another write has written but not yet
    /// synced waits for that sync before its data write (it finds the extent hot and must not
    /// trust it yet). The first write is held just before its fdatasync; the second must arrive
    /// at the wait, and its data write sees the extent durable.
    #[test]
    fn a_write_to_an_extent_logged_but_not_synced_waits_for_the_sync() {
        use crate::repl::intent_log::durable_extents;
        let d = tempfile::tempdir().unwrap();
        let t = Arc::new(tracker(d.path()));
        let extents = t.blocks().div_ceil(EXTENT_BLOCKS);
        put(&t, 5 * EXTENT_BLOCKS); // the log exists: what follows is one record and one sync
        let syncing = t.seams.arm("tracker.intent.sync");
        let first = {
            let t = Arc::clone(&t);
            std::thread::spawn(move || put(&t, 0))
        };
        assert!(
            syncing.wait_arrived(),
            "the first write never reached its sync"
        );
        let waiting = t.seams.arm("tracker.intent.wait");
        let second = {
            let (t, dir) = (Arc::clone(&t), d.path().to_path_buf());
            std::thread::spawn(move || {
                // Block 100: the same extent as block 0, another block-lock stripe.
                t.write(
                    100 * 4096,
                    Payload::Data(Bytes::from(vec![2; 4096])),
                    || {
                        assert!(
                            durable_extents(&dir, extents).get(0),
                            "data written before its extent's record was synced"
                        );
                        Ok(())
                    },
                )
            })
        };
        assert!(
            waiting.wait_arrived(),
            "the second write did not wait for the first one's sync"
        );
        waiting.release();
        syncing.release();
        first.join().unwrap();
        second.join().unwrap().unwrap();
        assert!(durable_extents(d.path(), extents).get(0));
    }

    /// A write waiting for the intent sync on a runtime worker does not hold the worker: with one
    /// worker and the sync held at its seam, another task still runs (an HTTP/2 keep-alive must
    /// be answered meanwhile, or the peer drops the link).
    #[test]
    fn a_write_waiting_for_the_intent_sync_leaves_the_runtime_free() {
        let d = tempfile::tempdir().unwrap();
        let t = Arc::new(tracker(d.path()));
        put(&t, 5 * EXTENT_BLOCKS);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let syncing = t.seams.arm("tracker.intent.sync");
        let write = {
            let t = Arc::clone(&t);
            rt.spawn(async move { put(&t, 0) })
        };
        assert!(syncing.wait_arrived(), "the write never reached its sync");
        // Timed on this thread, not on the runtime: a held worker would stop its timers too.
        let (tx, rx) = std::sync::mpsc::channel();
        drop(rt.spawn(async move { tx.send(7) }));
        let ran = rx.recv_timeout(std::time::Duration::from_secs(10));
        syncing.release();
        assert_eq!(
            ran,
            Ok(7),
            "the runtime's only worker was held by a write waiting for the intent sync"
        );
        rt.block_on(write).unwrap();
    }

    /// A failed fdatasync of the intent log refuses every write waiting on it (none reaches the
    /// data file) and unmarks the extent, so the next write to it logs it again.
    #[test]
    fn a_failed_intent_sync_refuses_its_writers_and_the_next_write_logs_again() {
        use crate::repl::intent_log::durable_extents;
        use crate::seam::power::{Cut, Kind};
        let d = tempfile::tempdir().unwrap();
        let t = Arc::new(tracker(d.path()));
        let extents = t.blocks().div_ceil(EXTENT_BLOCKS);
        put(&t, 5 * EXTENT_BLOCKS);
        let syncing = t.seams.arm("tracker.intent.sync");
        let wrote = Arc::new(AtomicBool::new(false));
        let write = |block: u64| {
            let (t, wrote) = (Arc::clone(&t), Arc::clone(&wrote));
            std::thread::spawn(move || {
                t.write(
                    block * 4096,
                    Payload::Data(Bytes::from(vec![3; 4096])),
                    || {
                        wrote.store(true, Ordering::SeqCst);
                        Ok(())
                    },
                )
            })
        };
        let first = write(0);
        assert!(syncing.wait_arrived());
        let waiting = t.seams.arm("tracker.intent.wait");
        let second = write(100); // same extent, another block-lock stripe
        assert!(waiting.wait_arrived());
        waiting.release();
        // The next file operation under the state dir, the held sync, fails.
        let fault = Cut::fault(d.path(), 0, Kind::Eio);
        syncing.release();
        assert!(first.join().unwrap().is_err());
        assert!(second.join().unwrap().is_err());
        drop(fault);
        assert!(
            !wrote.load(Ordering::SeqCst),
            "a refused write reached the data file"
        );
        assert!(
            !t.state().intent.get(0),
            "the lost record's extent stayed marked"
        );
        put(&t, 2);
        assert!(durable_extents(d.path(), extents).get(0));
        assert!(t.state().intent_log.owed_for(0).is_none());
    }

    /// A checkpoint that cools extents while the intent log is long stores the bitmap once, not
    /// a fold and then the cooled set: as many file operations as with a short log, and the
    /// durable set is what stays hot.
    #[test]
    fn a_cooling_checkpoint_stores_the_intent_bitmap_once_even_with_a_long_log() {
        use crate::repl::intent_log::{durable_extents, COMPACT_RECORDS};
        use crate::seam::power::Cut;
        let ops_of_cooling_checkpoint = |extents: u64| {
            let d = tempfile::tempdir().unwrap();
            let t = Tracker::open(
                d.path(),
                (COMPACT_RECORDS + 8) * EXTENT_BLOCKS,
                0,
                1,
                64 << 20,
            )
            .unwrap();
            let mut last = 0;
            for e in 0..extents {
                last = put(&t, e * EXTENT_BLOCKS);
            }
            t.ack_journal(last);
            assert_eq!(t.state().intent_log.records(), extents);
            // Counts the table's store too: the same in both runs (an empty table).
            let cut = Cut::after(d.path(), i64::MAX / 2);
            // Quiesced: every extent with nothing pending cools at once.
            t.checkpoint(|| Ok(()), true).unwrap();
            let used = cut.used();
            drop(cut);
            assert_eq!(t.state().intent_log.records(), 0);
            assert_eq!(
                durable_extents(d.path(), COMPACT_RECORDS + 8).count(),
                0,
                "every extent was clean and should have cooled"
            );
            used
        };
        assert_eq!(
            ops_of_cooling_checkpoint(COMPACT_RECORDS + 2),
            ops_of_cooling_checkpoint(3)
        );
    }

    #[test]
    fn an_extent_cools_only_after_a_data_sync_that_it_still_covers() {
        let d = tempfile::tempdir().unwrap();
        let t = tracker(d.path());
        let s = put(&t, 0);
        t.ack_journal(s);
        let intent_on_disk = || {
            crate::repl::intent_log::durable_extents(d.path(), t.blocks().div_ceil(EXTENT_BLOCKS))
                .get(0)
        };
        let syncs = std::cell::Cell::new(0);
        for _ in 0..COOL_AFTER_TICKS - 1 {
            t.checkpoint(|| panic!("nothing cools yet: no data sync"), false)
                .unwrap();
        }
        assert!(intent_on_disk(), "recently written extent stays covered");
        t.checkpoint(
            || {
                syncs.set(syncs.get() + 1);
                assert!(intent_on_disk(), "the cover is dropped only after the sync");
                Ok(())
            },
            false,
        )
        .unwrap();
        assert_eq!(syncs.get(), 1);
        assert!(!intent_on_disk());
    }

    #[test]
    fn a_failed_data_sync_keeps_the_cover() {
        let d = tempfile::tempdir().unwrap();
        let t = tracker(d.path());
        let s = put(&t, 0);
        t.ack_journal(s);
        for _ in 0..COOL_AFTER_TICKS - 1 {
            t.checkpoint(|| Ok(()), false).unwrap();
        }
        assert!(t
            .checkpoint(|| Err(io::Error::other("EIO")), false)
            .is_err());
        drop(t);
        let t = tracker(d.path());
        assert!(
            t.state().pending.get(0),
            "after a restart the extent is still resynced"
        );
    }

    #[test]
    fn a_clean_shutdown_cools_every_extent_with_nothing_pending() {
        let d = tempfile::tempdir().unwrap();
        {
            let t = tracker(d.path());
            acked_and_pending(&t);
            t.checkpoint(|| panic!("the caller synced already"), true)
                .unwrap();
        }
        let t = tracker(d.path());
        let s = t.state();
        assert!(!s.pending.get(0));
        assert!(s.pending.get(600));
        assert_eq!(s.pending.count(), EXTENT_BLOCKS, "only the unsent extent");
    }

    #[test]
    fn failed_data_write_stays_pending_for_resync() {
        let d = tempfile::tempdir().unwrap();
        let t = tracker(d.path());
        // Block 0 written at s1 (sent, not yet acknowledged), then a write to it fails midway.
        let s1 = put(&t, 0);
        assert!(t
            .write(0, Payload::Data(Bytes::from(vec![2; 4096])), || Err(
                io::Error::other("EIO")
            ))
            .is_err());
        {
            let s = t.state();
            assert!(s.pending.get(0) && s.resync_needed);
        }
        // The peer's acknowledgement of s1 does not vouch for the torn bytes here.
        t.ack_journal(s1);
        assert!(
            t.is_pending(0),
            "an older record's ack cleared a torn block"
        );
        // An image does.
        let (g, _) = t.read_image(0, u64::MAX, |_| Ok(())).unwrap().unwrap();
        assert_eq!(t.ack_images(&[0], &[g]), 1);
        assert!(!t.is_pending(0));
    }
}

#[cfg(test)]
mod at02 {
    use super::*;
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };

    /// AT-02: at the instant a host write is acknowledged, its blocks are pending unless the peer has
    /// already acknowledged that very version; checked for 10,000 writes racing a stream of acks.
    #[test]
    fn at02_bit_is_set_before_every_ack() {
        let d = tempfile::tempdir().unwrap();
        let t = Arc::new(Tracker::open(d.path(), 1 << 14, 0, 1, 256 << 20).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let acker = {
            let t = Arc::clone(&t);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let last = t.counts().last_seq;
                    t.ack_journal(last);
                }
            })
        };
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let block = x % (1 << 14);
            let seq = t
                .write(
                    block * 4096,
                    Payload::Data(Bytes::from(vec![1u8; 4096])),
                    || Ok(()),
                )
                .unwrap();
            // The host ack happens here.
            let s = t.state();
            assert!(
                s.pending.get(block) || s.acked_seq >= seq,
                "block {block} (seq {seq}) acknowledged to the host without being pending"
            );
        }
        stop.store(true, Ordering::Relaxed);
        acker.join().unwrap();
    }
}
