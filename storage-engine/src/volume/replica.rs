//! The secondary's side of replication: applying the primary's stream in order, making it
//! durable, and the progress file that says how far it got and whether the copy is consistent.

use std::{
    io,
    path::Path,
    sync::{atomic::Ordering, MutexGuard},
};

use crate::{
    bitmap::Bitmap,
    error::EngineError,
    format::{self, progress::Progress},
    geometry::{blocks_in, blocks_of, BLOCK_SIZE, BS},
    loss::Incoming,
    meta::Role,
    pb::{self, replication_message::Body},
    state::{self, Effect, EngineState, Event, Receiving, Standing},
};

use super::{Carry, Volume};

/// What one applied batch changed (before it is made durable).
#[derive(Debug, Default)]
pub struct Applied {
    pub epoch: u64,
    pub applied_seq: u64,
    /// Resync images written: (block, generation), acknowledged once durable.
    pub images: Vec<(u64, u64)>,
    pub wrote: bool,
    /// A DrainComplete was applied and made durable.
    pub drain_complete: bool,
}

/// The secondary's view of the stream it applies.
#[derive(Debug)]
pub struct ReplicaState {
    pub applied_seq: u64,
    /// Highest seq known to be on stable storage (what the progress file says).
    pub durable_seq: u64,
    /// Whether this copy could serve as the volume (the progress file's flags).
    pub standing: Standing,
    /// Consistent again once the journal is applied up to here (after a resync).
    pub consistent_target: Option<u64>,
    /// The primary's pending set from its last heartbeat (what a forced promotion would lose).
    pub peer_pending: Option<Bitmap>,
    pub peer_last_seq: u64,
    pub peer_seen_us: u64,
    /// The heartbeat set changed since it was last persisted.
    pub hb_dirty: bool,
}

/// The primary's pending set as last heard on a heartbeat (secondary side).
pub(super) const HB_FILE: &str = "peer_pending_heartbeat";
/// The seq of that heartbeat.
pub(super) const HB_SEQ_FILE: &str = "peer_last_seq";

impl ReplicaState {
    /// A resync is running or the copy was never filled: a torn image.
    pub fn inconsistent(&self) -> bool {
        self.standing != Standing::Consistent
    }
}

impl Volume {
    /// Persists the primary's last heartbeat set (secondary side), so a forced promotion after a
    /// restart still knows what it loses.
    pub(super) fn persist_heartbeat_set(&self) -> io::Result<()> {
        let (set, seq) = {
            let mut rs = self.replica();
            if !rs.hb_dirty {
                return Ok(());
            }
            rs.hb_dirty = false;
            (
                rs.peer_pending.as_ref().map(Bitmap::encode),
                rs.peer_last_seq,
            )
        };
        let dir = self.meta_path.parent().unwrap_or(Path::new("."));
        if let Some(set) = set {
            set.store(&dir.join(HB_FILE))?;
        }
        format::seq::store(&dir.join(HB_SEQ_FILE), seq)
    }

    /// Drops the last heartbeat's pending set (after a role change it describes an old stream).
    pub(crate) fn forget_heartbeat_set(&self) {
        {
            let mut rs = self.replica();
            rs.peer_pending = None;
            rs.peer_last_seq = 0;
            rs.hb_dirty = false;
        }
        let dir = self.meta_path.parent().unwrap_or(Path::new("."));
        let _ = std::fs::remove_file(dir.join(HB_FILE));
        let _ = std::fs::remove_file(dir.join(HB_SEQ_FILE));
    }

    pub fn replica(&self) -> MutexGuard<'_, ReplicaState> {
        self.replica.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// First message of a replication stream: where this replica stands.
    ///
    /// Invariant: one snapshot, taken under `transitions`: a step-down racing the hello is seen
    /// whole or not at all. Read piecemeal, the table was read while still primary (nothing to
    /// resend) and the role and epoch after the step-down, so the new primary took a secondary
    /// that offered nothing and never overwrote its unsent writes (replicas silently differing).
    /// Test: `tests/reboot_forced.rs`.
    pub fn replica_hello(&self) -> pb::ReplicationAck {
        let _one = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        let resend = match (&self.repl, self.role()) {
            (Some(r), Role::Secondary) => {
                let pending = r.tracker.pending();
                if pending.is_empty() {
                    Vec::new()
                } else {
                    pending.to_bytes()
                }
            }
            _ => Vec::new(),
        };
        self.areas.seams.hit("replica.hello.table_read");
        let (losses_checked_epoch, losses_exported) = self.losses.finished().unwrap_or((0, 0));
        let r = self.replica();
        pb::ReplicationAck {
            losses_exported,
            losses_checked_epoch,
            epoch: self.epoch(),
            applied_seq: r.applied_seq,
            durable_seq: r.durable_seq,
            need_full_resync: r.standing == Standing::NeedsFull,
            inconsistent: r.inconsistent(),
            role: pb::Role::from(self.role()) as i32,
            resend_bitmap: resend.into(),
            ..Default::default()
        }
    }

    /// Applies a batch of replication messages (not yet durable: see `make_durable`).
    /// A stale epoch, a gap or a checksum error refuses the batch before anything is written.
    pub fn apply_batch(&self, batch: Vec<pb::ReplicationMessage>) -> Result<Applied, EngineError> {
        match self.receiving() {
            Receiving::Replica => {}
            // The old primary draining its table to us after a takeover.
            Receiving::Drain => return self.apply_drain(batch),
            Receiving::Refuse => {
                return Err(EngineError::WrongRole(format!(
                    "volume {} is {} here, not secondary",
                    self.name,
                    self.role()
                )))
            }
        }
        let my_epoch = self.epoch();
        let mut newest_epoch = my_epoch;
        for m in &batch {
            if m.volume != self.name {
                return Err(EngineError::UnknownVolume(m.volume.clone()));
            }
            if m.epoch < my_epoch {
                if let Some(r) = &self.repl {
                    r.stats.stale_rejected.fetch_add(1, Ordering::Relaxed);
                }
                return Err(EngineError::StaleEpoch(format!(
                    "stale epoch {} < {my_epoch}; nothing written",
                    m.epoch
                )));
            }
            newest_epoch = newest_epoch.max(m.epoch);
            let bad_write =
                |w: &pb::WriteRecord| w.zero_length == 0 && crc32c::crc32c(&w.data) != w.crc32c;
            match &m.body {
                Some(Body::Write(w)) if bad_write(w) => {
                    return Err(EngineError::Corrupt(format!(
                        "checksum mismatch in record {}",
                        w.seq
                    )));
                }
                Some(Body::WriteBatch(wb)) => {
                    if let Some(w) = wb.records.iter().find(|w| bad_write(w)) {
                        return Err(EngineError::Corrupt(format!(
                            "checksum mismatch in record {}",
                            w.seq
                        )));
                    }
                }
                Some(Body::Block(b))
                    if crc32c::crc32c(&b.data) != b.crc32c
                        || b.data.len() != BLOCK_SIZE as usize =>
                {
                    return Err(EngineError::Corrupt(format!(
                        "bad image of block {}",
                        b.block
                    )));
                }
                _ => {}
            }
        }
        if newest_epoch > my_epoch {
            self.transition(
                Event::AdoptEpoch {
                    epoch: newest_epoch,
                },
                Carry::default(),
            )?;
        }
        let io = |e: io::Error| EngineError::io(format!("applying replication: {e}"));
        let mut rs = self.replica();
        // A stepped-down primary compares the blocks it asked back before the first of them is
        // overwritten; every lost one is exported durably first (`Losses::check`).
        if self.losses.armed() {
            let touches = touches(&batch, rs.applied_seq, blocks_in(self.size()));
            self.losses.check(&self.store, &touches).map_err(io)?;
        }
        let mut out = Applied {
            epoch: newest_epoch,
            ..Default::default()
        };
        // Images of adjacent blocks, one after another in the batch, land in one write (a table
        // resync sends its blocks in order). Written before any other message is applied, so
        // nothing is reordered.
        let mut run = ImageRun::default();
        for m in batch {
            if !matches!(m.body, Some(Body::Block(_))) {
                run.write(&self.store).map_err(io)?;
            }
            match m.body {
                Some(Body::Write(w)) => {
                    self.apply_record(&mut rs, &w)?;
                    out.wrote = true;
                }
                Some(Body::WriteBatch(wb)) => {
                    for w in &wb.records {
                        self.apply_record(&mut rs, w)?;
                    }
                    out.wrote = true;
                }
                Some(Body::Block(b)) => {
                    if b.block >= blocks_in(self.size()) {
                        // The batch applies in order up to the message it refuses: the images
                        // gathered before this one land first (tests/fuzz.rs
                        // `fuzz_secondary_apply_batch_matches_its_contract`).
                        run.write(&self.store).map_err(io)?;
                        return Err(EngineError::InvalidArgument(format!(
                            "block {} is out of range",
                            b.block
                        )));
                    }
                    // Inconsistent durably before the first out-of-order write lands (asked
                    // once per resync: every later image finds the standing already changed).
                    if rs.standing == Standing::Consistent {
                        self.replica_event(&mut rs, Event::ResyncStarted)
                            .map_err(io)?;
                    }
                    run.add(&self.store, b.block, &b.data).map_err(io)?;
                    out.images.push((b.block, b.generation));
                    out.wrote = true;
                }
                Some(Body::ResyncDone(d)) => {
                    rs.consistent_target = Some(d.consistent_seq);
                    if d.next_seq > 0 {
                        rs.applied_seq = rs.applied_seq.max(d.next_seq - 1);
                    }
                    if d.full {
                        self.replica_event(&mut rs, Event::FullCopyDone)
                            .map_err(io)?;
                    }
                    out.wrote = true;
                }
                Some(Body::Heartbeat(h)) => {
                    let blocks = blocks_in(self.size());
                    let set = if let Some(w) = &h.pending_words {
                        Some(Bitmap::from_sparse(blocks, w))
                    } else if !h.pending_bitmap.is_empty() {
                        Some(Bitmap::from_bytes(blocks, &h.pending_bitmap))
                    } else {
                        None
                    };
                    match set {
                        // Unchanged since the last heartbeat.
                        None => {}
                        Some(None) => {
                            return Err(EngineError::InvalidArgument(
                                "heartbeat: malformed pending set (size or encoding)".into(),
                            ))
                        }
                        Some(s) => rs.peer_pending = s,
                    }
                    rs.peer_last_seq = h.last_seq;
                    rs.peer_seen_us = crate::clock::now_us();
                    rs.hb_dirty = true;
                }
                Some(Body::DrainComplete(_)) | None => {}
            }
        }
        run.write(&self.store).map_err(io)?;
        if rs.consistent_target.is_some_and(|t| rs.applied_seq >= t) {
            rs.consistent_target = None;
            self.replica_event(&mut rs, Event::ResyncReachedTarget)
                .map_err(io)?;
            self.finish_losses().map_err(io)?;
        }
        out.applied_seq = rs.applied_seq;
        // Forwarded requests waiting on this copy (`forward::wait_applied`).
        self.applied.send_if_modified(|a| {
            let changed = *a != rs.applied_seq;
            *a = rs.applied_seq;
            changed
        });
        Ok(out)
    }

    /// The new primary's resync ended: the loss export (if one is comparing) is complete.
    fn finish_losses(&self) -> io::Result<()> {
        let Some(r) = &self.repl else { return Ok(()) };
        if let Some(s) = self
            .losses
            .finish(&self.store, |b| r.tracker.is_pending(b))?
        {
            self.areas.event(format!(
                "LossesExported blocks={} dir={}",
                s.blocks,
                s.dir.display()
            ));
        }
        Ok(())
    }

    /// A replica event (`state::next`), carried out under the replica lock the caller holds.
    /// Those events are never refused and only ever record the standing and write progress
    /// (`state::tests::replica_events_only_touch_the_standing`).
    fn replica_event(&self, rs: &mut ReplicaState, event: Event) -> io::Result<()> {
        let now = EngineState {
            role: self.role(),
            epoch: self.epoch(),
            phase: self.areas.phase(),
            standing: rs.standing,
        };
        let step = state::next(&now, event).map_err(io::Error::other)?;
        for effect in step.effects {
            match effect {
                Effect::RecordStanding => rs.standing = step.to.standing,
                Effect::WriteProgress => self.write_progress(rs.durable_seq, rs)?,
                other => {
                    return Err(io::Error::other(format!(
                        "replica event {event:?} asked for {other:?}"
                    )))
                }
            }
        }
        Ok(())
    }

    fn apply_record(&self, rs: &mut ReplicaState, w: &pb::WriteRecord) -> Result<(), EngineError> {
        if w.seq <= rs.applied_seq {
            return Ok(());
        }
        if w.seq != rs.applied_seq + 1 {
            return Err(EngineError::Gap(format!(
                "gap in the stream: got seq {} after {}",
                w.seq, rs.applied_seq
            )));
        }
        let len = if w.zero_length > 0 {
            w.zero_length
        } else {
            w.data.len() as u64
        };
        if w.offset.checked_add(len).is_none_or(|e| e > self.size()) {
            return Err(EngineError::InvalidArgument(format!(
                "record {} is out of range",
                w.seq
            )));
        }
        let res = if w.zero_length > 0 {
            self.store.punch_hole(w.offset, w.zero_length)
        } else {
            self.store.write_at(&w.data, w.offset)
        };
        res.map_err(|e| EngineError::io(format!("applying record {}: {e}", w.seq)))?;
        rs.applied_seq = w.seq;
        Ok(())
    }

    /// The loss export's decided blocks are stored (before the table forgets them).
    pub(crate) fn persist_losses(&self) -> io::Result<()> {
        self.losses.persist()
    }

    /// Makes everything applied so far durable (data fdatasync, then the progress file);
    /// returns the seq that is now durable.
    pub fn make_durable(&self) -> io::Result<u64> {
        let (seq, standing) = {
            let rs = self.replica();
            (rs.applied_seq, rs.standing)
        };
        self.store.sync()?;
        use std::os::unix::fs::FileExt;
        crate::seam::power::io(&self.meta_path)?;
        self.progress.write_all_at(
            &format::progress::encode(Progress {
                applied_seq: seq,
                standing,
            }),
            0,
        )?;
        self.progress.sync_data()?;
        let mut rs = self.replica();
        rs.durable_seq = rs.durable_seq.max(seq);
        Ok(seq)
    }

    /// Rewrites the progress file from the replica state now.
    pub(crate) fn write_progress_now(&self) -> io::Result<()> {
        let rs = self.replica();
        self.write_progress(rs.durable_seq, &rs)
    }

    /// The progress file (`format::progress`), rewritten in place.
    fn write_progress(&self, seq: u64, rs: &ReplicaState) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let b = format::progress::encode(Progress {
            applied_seq: seq,
            standing: rs.standing,
        });
        crate::seam::power::io(&self.meta_path)?;
        self.progress.write_all_at(&b, 0)?;
        self.progress.sync_data()
    }
}

/// Adjacent block images gathered into one write of the data file.
#[derive(Default)]
struct ImageRun {
    first: u64,
    data: Vec<u8>,
}

impl ImageRun {
    /// At most this many bytes are gathered before they are written.
    const MAX: usize = 1 << 20;

    fn add(&mut self, store: &crate::store::BlockStore, block: u64, data: &[u8]) -> io::Result<()> {
        let bs = u64::from(BLOCK_SIZE);
        let next = self.first + self.data.len() as u64 / bs;
        if self.data.is_empty() || block != next || self.data.len() >= Self::MAX {
            self.write(store)?;
            self.first = block;
        }
        self.data.extend_from_slice(data);
        Ok(())
    }

    fn write(&mut self, store: &crate::store::BlockStore) -> io::Result<()> {
        if !self.data.is_empty() {
            store.write_at(&self.data, self.first * u64::from(BLOCK_SIZE))?;
            self.data.clear();
        }
        Ok(())
    }
}

/// The blocks `batch` overwrites, in the order `apply_batch` would (a record already applied is
/// skipped; the batch stops at a gap or a message out of range), each with what lands on it.
fn touches(
    batch: &[pb::ReplicationMessage],
    applied_seq: u64,
    blocks: u64,
) -> Vec<(u64, Incoming<'_>)> {
    let mut out = Vec::new();
    let mut applied = applied_seq;
    for m in batch {
        let records: &[pb::WriteRecord] = match &m.body {
            Some(Body::Write(w)) => std::slice::from_ref(w),
            Some(Body::WriteBatch(wb)) => &wb.records,
            Some(Body::Block(b)) if b.block < blocks => {
                out.push((b.block, Incoming::Block(&b.data)));
                continue;
            }
            Some(Body::Block(_)) => return out,
            Some(Body::ResyncDone(d)) => {
                if d.next_seq > 0 {
                    applied = applied.max(d.next_seq - 1);
                }
                continue;
            }
            _ => continue,
        };
        for w in records {
            if w.seq <= applied {
                continue;
            }
            let zero = w.zero_length > 0;
            let len = if zero {
                w.zero_length
            } else {
                w.data.len() as u64
            };
            let end = match w.offset.checked_add(len) {
                Some(e) if w.seq == applied + 1 && e <= blocks * BS => e,
                _ => return out,
            };
            for b in blocks_of(w.offset, len) {
                let from = b * BS;
                let incoming = if w.offset > from || end < from + BS {
                    Incoming::Part
                } else if zero {
                    Incoming::Zeros
                } else {
                    let at = (from - w.offset) as usize;
                    Incoming::Block(&w.data[at..at + BS as usize])
                };
                out.push((b, incoming));
            }
            applied = w.seq;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::pb::{replication_message::Body, ReplicationMessage, WriteRecord};
    use crate::{meta::Meta, volume::VolumeConfig};

    fn secondary_at_epoch(dir: &Path, epoch: u64) -> Arc<Volume> {
        let cfg = VolumeConfig {
            name: "v".into(),
            data: dir.join("data"),
            size: 1 << 20,
            state_dir: dir.join("state"),
            initial_role: Role::Secondary,
            pair: None,
            secondary_access: Default::default(),
            proxy_timeout: std::time::Duration::from_secs(1),
            implicit_takeover: false,
        };
        drop(Volume::open(&cfg).unwrap());
        let meta_path = cfg.state_dir.join("meta");
        let mut m = Meta::load(&meta_path).unwrap().unwrap();
        m.epoch = epoch;
        m.store(&meta_path).unwrap();
        Volume::open(&cfg).unwrap()
    }

    fn write_msg(epoch: u64, seq: u64, byte: u8) -> ReplicationMessage {
        let data = Bytes::from(vec![byte; 4096]);
        ReplicationMessage {
            volume: "v".into(),
            epoch,
            body: Some(Body::Write(WriteRecord {
                seq,
                timestamp_us: 0,
                offset: 0,
                crc32c: crc32c::crc32c(&data),
                data,
                zero_length: 0,
            })),
        }
    }

    fn heartbeat(words: Option<Vec<u8>>) -> ReplicationMessage {
        ReplicationMessage {
            volume: "v".into(),
            epoch: 5,
            body: Some(Body::Heartbeat(crate::pb::Heartbeat {
                pending_words: words.map(Bytes::from),
                last_seq: 9,
                ..Default::default()
            })),
        }
    }

    /// The pending set a heartbeat carries (sparse) is kept; an absent one leaves it as it was;
    /// a malformed one is refused and changes nothing.
    #[test]
    fn heartbeat_pending_sets_are_kept_and_malformed_ones_refused() {
        let d = tempfile::tempdir().unwrap();
        let v = secondary_at_epoch(d.path(), 5);
        let mut set = Bitmap::new(256);
        set.set(3);
        set.set(200);
        v.apply_batch(vec![heartbeat(Some(set.to_sparse()))])
            .unwrap();
        assert_eq!(v.replica().peer_pending.as_ref(), Some(&set));
        v.apply_batch(vec![heartbeat(None)]).unwrap();
        assert_eq!(v.replica().peer_pending.as_ref(), Some(&set));
        let err = v
            .apply_batch(vec![heartbeat(Some(vec![1; 15]))])
            .unwrap_err();
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(v.replica().peer_pending.as_ref(), Some(&set));
        // An empty set is a set: everything reached this side.
        v.apply_batch(vec![heartbeat(Some(Vec::new()))]).unwrap();
        assert_eq!(
            v.replica().peer_pending.as_ref().map(Bitmap::count),
            Some(0)
        );
    }

    /// A step-down racing a stream's first message: the hello is the state before it (a primary,
    /// which the new primary does not stream to) or after it (a secondary offering its table),
    /// never a secondary offering nothing. The hello is held after it read the table; without the
    /// snapshot the step-down finished meanwhile and the hello said "secondary, nothing unsent".
    #[test]
    fn a_hello_racing_a_step_down_offers_the_table_whenever_it_says_secondary() {
        let d = tempfile::tempdir().unwrap();
        let cfg = VolumeConfig {
            initial_role: Role::Primary,
            ..crate::takeover::tests::base_config(d.path())
        };
        let v = Volume::open(&cfg).unwrap();
        let mut unsent = Bitmap::new(blocks_in(v.size()));
        unsent.set(7);
        v.repl
            .as_ref()
            .unwrap()
            .tracker
            .mark_pending(&unsent)
            .unwrap();
        let held = v.areas.seams.arm("replica.hello.table_read");
        let hello = {
            let v = Arc::clone(&v);
            std::thread::spawn(move || v.replica_hello())
        };
        assert!(held.wait_arrived(), "the hello never read the table");
        let (tx, rx) = std::sync::mpsc::channel();
        let down = {
            let v = Arc::clone(&v);
            std::thread::spawn(move || {
                let r = crate::takeover::tests::block_on(v.step_down(5));
                let _ = tx.send(());
                r
            })
        };
        // With the snapshot the step-down waits for the hello; without it, it finishes here.
        let _ = rx.recv_timeout(std::time::Duration::from_millis(300));
        held.release();
        let h = hello.join().unwrap();
        down.join().unwrap().unwrap();
        assert_eq!(v.role(), Role::Secondary);
        if h.role == pb::Role::Secondary as i32 {
            assert_eq!(h.epoch, 5);
            assert!(
                !h.resend_bitmap.is_empty(),
                "a secondary at the new epoch offered no unsent table"
            );
        } else {
            assert_eq!((h.role, h.epoch), (pb::Role::Primary as i32, 1));
        }
    }

    /// AT-30: a message from an older epoch is refused and nothing of its batch is written;
    /// a newer epoch is adopted durably.
    #[test]
    fn at30_stale_epoch_is_refused_and_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let v = secondary_at_epoch(d.path(), 5);
        let err = v
            .apply_batch(vec![write_msg(5, 1, 0xaa), write_msg(4, 2, 0xbb)])
            .unwrap_err();
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::FailedPrecondition
        );
        let mut b = vec![0u8; 4096];
        v.read_local(&mut b, 0).unwrap();
        assert!(
            b.iter().all(|x| *x == 0),
            "a refused batch must write nothing"
        );
        assert_eq!(v.replica().applied_seq, 0);
        let ok = v.apply_batch(vec![write_msg(6, 1, 0xcc)]).unwrap();
        assert_eq!(ok.applied_seq, 1);
        assert_eq!(v.epoch(), 6);
        v.read_local(&mut b, 0).unwrap();
        assert!(b.iter().all(|x| *x == 0xcc));
        // Corrupt data is refused too.
        let mut m = write_msg(6, 2, 0xdd);
        if let Some(Body::Write(w)) = &mut m.body {
            w.crc32c ^= 1;
        }
        assert_eq!(
            tonic::Status::from(v.apply_batch(vec![m]).unwrap_err()).code(),
            tonic::Code::DataLoss
        );
        // A gap is refused.
        assert_eq!(
            tonic::Status::from(v.apply_batch(vec![write_msg(6, 5, 0xee)]).unwrap_err()).code(),
            tonic::Code::FailedPrecondition
        );
    }
}
