//! The primary's replication sender: connects to the peer, agrees where to resume, then streams
//! journal records in seq order, falling back to block images from the table when the journal
//! cannot cover the gap (overflow, restart, new secondary).

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::info;

use super::{tracker::Next, Repl};
use crate::{
    bitmap::Bitmap,
    client::{channel, TokenInterceptor},
    clock::now_us,
    geometry::BLOCK_SIZE,
    journal::Record,
    meta::Role,
    pb::{self, replication_message::Body},
    state::Sending,
    volume::Volume,
};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error("peer: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("peer closed the stream")]
    Closed,
    #[error("link dropped by fault injection")]
    Dropped,
    #[error("peer is at epoch {0}, newer than ours")]
    PeerNewer(u64),
    #[error("reading the data file: {0}")]
    Io(#[from] std::io::Error),
    #[error("stopping")]
    Stopping,
    #[error("the peer does not serve at our epoch yet (it is at epoch {0})")]
    NotServingYet(u64),
    #[error("this engine's role changed")]
    RoleChanged,
    #[error("peer is primary at epoch {0}, newer than ours")]
    PeerPrimaryNewer(u64),
    #[error("peer silent for {0:?} (dead, stopped or cut off)")]
    PeerSilent(Duration),
}

fn message(vol: &Volume, epoch: u64, body: Body) -> pb::ReplicationMessage {
    pb::ReplicationMessage {
        volume: vol.name().to_string(),
        epoch,
        body: Some(body),
    }
}

fn write_record(r: &Record) -> pb::WriteRecord {
    pb::WriteRecord {
        seq: r.seq,
        timestamp_us: r.timestamp_us,
        offset: r.offset,
        crc32c: crc32c::crc32c(&r.data),
        data: r.data.clone(),
        zero_length: r.zero_len,
    }
}

pub struct Link<'a> {
    pub vol: &'a Arc<Volume>,
    pub repl: &'a Arc<Repl>,
    tx: mpsc::Sender<pb::ReplicationMessage>,
    stop: &'a mut watch::Receiver<bool>,
    drop_epoch: u64,
    next_send: Instant,
    role: Role,
    epoch: u64,
    fenced: watch::Receiver<u64>,
    /// `Repl::peer_gen` when the session opened.
    peer_gen: u64,
}

impl<'a> Link<'a> {
    pub fn new(
        vol: &'a Arc<Volume>,
        repl: &'a Arc<Repl>,
        tx: mpsc::Sender<pb::ReplicationMessage>,
        stop: &'a mut watch::Receiver<bool>,
        drop_epoch: u64,
        (role, epoch): (Role, u64),
    ) -> Self {
        Self {
            vol,
            repl,
            tx,
            stop,
            drop_epoch,
            next_send: Instant::now(),
            role,
            epoch,
            fenced: vol.fenced.subscribe(),
            peer_gen: repl.peer_gen.load(Ordering::Acquire),
        }
    }

    /// Sends one message, honouring pause, rate limit, drop and stop.
    pub async fn send(&mut self, body: Body, bytes: u64) -> Result<(), SessionError> {
        loop {
            if *self.stop.borrow() {
                return Err(SessionError::Stopping);
            }
            if self.vol.role() != self.role || self.vol.epoch() != self.epoch {
                return Err(SessionError::RoleChanged);
            }
            if self.repl.faults.drop_epoch.load(Ordering::Relaxed) != self.drop_epoch {
                return Err(SessionError::Dropped);
            }
            if !self.repl.faults.paused.load(Ordering::Relaxed) {
                break;
            }
            tokio::select! {
                _ = self.repl.faults.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = self.stop.changed() => {}
            }
        }
        let faults = &self.repl.faults;
        let rate = match &body {
            Body::WriteBatch(_) => faults.rate.load(Ordering::Relaxed),
            _ if faults.rate_records_only.load(Ordering::Relaxed) => 0,
            _ => faults.rate.load(Ordering::Relaxed),
        };
        if rate > 0 {
            let now = Instant::now();
            if self.next_send > now {
                // A fence must not wait for a throttled send to finish; a changed rate (lifted,
                // say) applies at once.
                tokio::select! {
                    _ = tokio::time::sleep_until(self.next_send.into()) => {}
                    _ = faults.changed.notified() => self.next_send = now,
                    _ = self.fenced.changed() => return Err(SessionError::RoleChanged),
                }
            }
            self.next_send =
                self.next_send.max(now) + Duration::from_secs_f64(bytes as f64 / rate as f64);
        }
        self.vol.areas.seams.hit("link.send.checked");
        // Every message of a session carries the epoch the session began at. Reading the volume's
        // epoch here could send a fence's new epoch on the old session: the peer would adopt it
        // and refuse the takeover that fence belongs to.
        self.tx
            .send(message(self.vol, self.epoch, body))
            .await
            .map_err(|_| SessionError::Closed)
    }

    /// Sends block `b`'s current content and generation, if it is still pending; returns whether
    /// it was sent. Content and generation are read together under the block's lock. `lazy`: the
    /// peer may make it durable at its durable interval (a table resync's images only).
    /// `since`: the seq the stream resumes at after this resync (`Tracker::read_image`).
    pub async fn send_image(
        &mut self,
        b: u64,
        lazy: bool,
        since: u64,
    ) -> Result<bool, SessionError> {
        let vol = self.vol;
        let image = self
            .repl
            .tracker
            .read_image(b, since, |buf| vol.read_own_block(b, buf))?;
        let Some((gen, data)) = image else {
            return Ok(false);
        };
        let crc = crc32c::crc32c(&data);
        self.send(
            Body::Block(pb::BlockImage {
                block: b,
                generation: gen,
                data: data.into(),
                crc32c: crc,
                lazy,
            }),
            u64::from(BLOCK_SIZE),
        )
        .await?;
        self.repl
            .stats
            .bytes_resynced
            .fetch_add(u64::from(BLOCK_SIZE), Ordering::Relaxed);
        Ok(true)
    }

    /// Sends every pending block's current content, then the marker that ends the resync.
    async fn resync(&mut self, full: bool) -> Result<u64, SessionError> {
        let t = &self.repl.tracker;
        let extra = if full {
            Some(allocated_blocks(self.vol, t.blocks())?)
        } else {
            None
        };
        let (start, todo) = t.begin_resync(extra.as_ref());
        let stats = &self.repl.stats;
        stats.resync_total.store(todo.count(), Ordering::Relaxed);
        stats.resync_done.store(0, Ordering::Relaxed);
        stats.resyncing.store(true, Ordering::Relaxed);
        info!(
            blocks = todo.count(),
            full, "resync from the differential table"
        );
        // Lazy images: the secondary syncs them at its durable interval, not once per batch (one
        // fdatasync per received batch had capped a scattered resync at the disk's sync rate).
        // Nothing is lost by waiting: only a durable acknowledgement naming the block at its
        // generation clears it here (`Tracker::ack_images`, from the ack task above), and the
        // secondary names it only after the fdatasync that covers it
        // (receiver::tests::a_lazy_image_is_acknowledged_only_after_the_fdatasync).
        for b in todo.iter_ones() {
            self.send_image(b, true, start).await?;
        }
        let consistent_seq = t.last_seq();
        self.send(
            Body::ResyncDone(pb::ResyncDone {
                consistent_seq,
                full,
                next_seq: start,
            }),
            64,
        )
        .await?;
        stats.resyncing.store(false, Ordering::Relaxed);
        Ok(start)
    }
}

/// Blocks holding data in the primary's file (holes read as zeros on a blank secondary too).
fn allocated_blocks(vol: &Volume, blocks: u64) -> std::io::Result<Bitmap> {
    let mut m = Bitmap::new(blocks);
    let bs = u64::from(BLOCK_SIZE);
    for (start, end) in vol.allocated_ranges()? {
        m.set_range(start / bs, end.div_ceil(bs));
    }
    Ok(m)
}

/// The next acknowledgement, held back while the `hold_acks` fault is set.
pub async fn next_ack(
    acks: &mut tonic::Streaming<pb::ReplicationAck>,
    faults: &super::Faults,
) -> Result<pb::ReplicationAck, SessionError> {
    let a = match acks.message().await {
        Ok(Some(a)) => a,
        Ok(None) => return Err(SessionError::Closed),
        Err(s) => return Err(SessionError::Rpc(s)),
    };
    while faults.hold_acks.load(Ordering::Relaxed) {
        tokio::select! {
            _ = faults.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    Ok(a)
}

/// The outbound half, the acknowledgement stream, and the peer's first message (where it stands).
pub type Opened = (
    mpsc::Sender<pb::ReplicationMessage>,
    tonic::Streaming<pb::ReplicationAck>,
    pb::ReplicationAck,
);

/// Opens `Peer.Replicate` to the peer and reads its first message, within the peer timeout: a
/// peer that accepts the connection and then says nothing (stopped, blackholed) is retried with
/// backoff, never waited on forever.
pub async fn open_stream(repl: &Repl) -> Result<Opened, SessionError> {
    let size = repl.tracker.blocks() * u64::from(BLOCK_SIZE);
    open_stream_to(&repl.peer(), repl.token.as_deref(), size).await
}

/// [`open_stream`] to any engine of the volume (`size` bytes): also a live move's new engine
/// (`repl::mover`).
pub(crate) async fn open_stream_to(
    target: &str,
    token: Option<&str>,
    size: u64,
) -> Result<Opened, SessionError> {
    let limit = crate::client::peer_timeout();
    tokio::time::timeout(limit, open_stream_now(target, token, size))
        .await
        .unwrap_or(Err(SessionError::PeerSilent(limit)))
}

async fn open_stream_now(
    target: &str,
    token: Option<&str>,
    size: u64,
) -> Result<Opened, SessionError> {
    let ch = channel(target, Duration::from_secs(2)).await?;
    let cap = crate::takeover::handoff::message_cap(size);
    let mut client =
        pb::peer_client::PeerClient::with_interceptor(ch, TokenInterceptor::new(token)?)
            .max_decoding_message_size(cap)
            .max_encoding_message_size(cap);
    let (tx, rx) = mpsc::channel(64);
    let mut acks = client
        .replicate(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let hello = acks.message().await?.ok_or(SessionError::Closed)?;
    Ok((tx, acks, hello))
}

pub(super) async fn session(
    vol: &Arc<Volume>,
    repl: &Arc<Repl>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let drop_epoch = repl.faults.drop_epoch.load(Ordering::Relaxed);
    // The role and epoch this session belongs to, taken before anything is sent: a fence while
    // the stream opens must end the session, never lend it the fence's epoch.
    let at = (vol.role(), vol.epoch());
    // Before the peer's address is read: a cutover from here on ends this session.
    let peer_gen = repl.peer_gen.load(Ordering::Acquire);
    let (tx, mut acks, hello) = open_stream(repl).await?;
    if hello.epoch > at.1 {
        if hello.role == pb::Role::Primary as i32 {
            return Err(SessionError::PeerPrimaryNewer(hello.epoch));
        }
        return Err(SessionError::PeerNewer(hello.epoch));
    }
    if hello.role != pb::Role::Secondary as i32 {
        return Err(SessionError::NotServingYet(hello.epoch));
    }
    let t = &repl.tracker;
    // A stepped-down primary asks for its divergent blocks to be overwritten.
    if !hello.resend_bitmap.is_empty() {
        if let Some(set) = Bitmap::from_bytes(t.blocks(), &hello.resend_bitmap) {
            t.mark_pending(&set)?;
            vol.count_returned_losses(set.count());
        }
    }
    vol.count_exact_losses(hello.losses_checked_epoch, hello.losses_exported);
    let durable = hello.durable_seq.min(hello.applied_seq);
    let need_resync =
        t.agree_resume(hello.applied_seq, durable) || hello.need_full_resync || hello.inconsistent;
    // Only what is on the peer's stable storage clears the table; records applied but not yet
    // durable there are cleared by its next durable acknowledgement.
    t.ack_journal(durable);
    // A resync cut short (or a restart) can leave pending blocks that no record will ever clear.
    let need_resync = need_resync || t.pending_uncovered(durable + 1);
    repl.stats.set_connected(true);
    info!(peer = %repl.peer(), applied = hello.applied_seq, full = hello.need_full_resync, "replication link up");

    let ack_repl = Arc::clone(repl);
    let ack_vol = Arc::clone(vol);
    let mut ack_task = tokio::spawn(async move {
        loop {
            let a = match next_ack(&mut acks, &ack_repl.faults).await {
                Ok(a) => a,
                Err(e) => return e,
            };
            let bump = |w: &watch::Sender<u64>, seq: u64| {
                w.send_if_modified(|v| {
                    let grew = seq > *v;
                    *v = (*v).max(seq);
                    grew
                });
            };
            bump(&ack_repl.acked, a.applied_seq);
            if a.durable {
                let tr = &ack_repl.tracker;
                tr.ack_journal(a.applied_seq);
                tr.ack_images(&a.blocks, &a.generations);
                ack_repl
                    .stats
                    .resync_done
                    .fetch_add(a.blocks.len() as u64, Ordering::Relaxed);
                bump(&ack_repl.durable, a.applied_seq);
                ack_vol.count_exact_losses(a.losses_checked_epoch, a.losses_exported);
                // Sync-mode writes that stood on our copy alone are on the peer's disk now.
                ack_repl.stats.caught_up(a.applied_seq);
                // The witness's consent to stand alone covers one outage: it ends once the peer
                // has every write durably again.
                if ack_repl.lease.async_consent()
                    && !ack_repl.stats.degraded()
                    && tr.counts().pending_blocks == 0
                    && ack_repl.lease.consent(false)
                {
                    ack_vol
                        .areas
                        .event("SyncFallbackEnded (the peer has every write durably again)");
                }
                if ack_vol.meta().takeover.reversing
                    && !ack_repl.stats.resyncing.load(Ordering::Relaxed)
                    && !tr.resync_needed()
                    && tr.counts().pending_blocks == 0
                {
                    ack_vol.reverse_in_sync();
                }
            }
        }
    });

    if (vol.role(), vol.epoch()) != at || vol.sending() != Sending::Stream {
        ack_task.abort();
        return Err(SessionError::RoleChanged);
    }
    let mut link = Link::new(vol, repl, tx, stop, drop_epoch, at);
    link.peer_gen = peer_gen;
    let result = stream(
        &mut link,
        need_resync,
        hello.need_full_resync,
        hello.applied_seq + 1,
        &mut ack_task,
    )
    .await;
    ack_task.abort();
    result
}

async fn stream(
    link: &mut Link<'_>,
    mut need_resync: bool,
    full: bool,
    mut cursor: u64,
    ack_task: &mut tokio::task::JoinHandle<SessionError>,
) -> Result<(), SessionError> {
    let t = &link.repl.tracker;
    let peer_gen = link.peer_gen;
    if need_resync {
        cursor = link.resync(full).await?;
        need_resync = false;
    }
    let mut last_heartbeat = Instant::now();
    let mut last_pending_sent: Option<u64> = None;
    // Ack deadline: records sent and not applied by the peer for longer than the peer timeout
    // mean a dead peer, whatever TCP says (liveness::sync_mode_blackholed_peer_*). End the session;
    // `run` reconnects with backoff and the table keeps what the peer lacks.
    let silence = crate::client::peer_timeout();
    let mut sent_upto = 0u64;
    let mut last_acked = *link.repl.acked.borrow();
    let mut waiting_since = Instant::now();
    // A sync-mode FLUSH covers every record journaled before it: ask the peer to sync with the
    // batch that carries the last of them.
    let mut flush_upto: Option<u64> = None;
    loop {
        if let Some(r) = (&mut *ack_task).now_or_never() {
            return Err(r.unwrap_or(SessionError::Closed));
        }
        if link.vol.sending() != Sending::Stream {
            return Err(SessionError::RoleChanged);
        }
        // A live move's cutover pointed replication at another engine: reconnect there.
        if link.repl.peer_gen.load(Ordering::Acquire) != peer_gen {
            return Err(SessionError::RoleChanged);
        }
        let acked = *link.repl.acked.borrow();
        if acked != last_acked || sent_upto <= acked {
            last_acked = acked;
            waiting_since = Instant::now();
        } else if waiting_since.elapsed() > silence {
            return Err(SessionError::PeerSilent(silence));
        }
        // A throttled link sends about a tenth of a second's worth per message, so the cap is smooth.
        let rate = link.repl.faults.rate.load(Ordering::Relaxed);
        let batch_bytes = if rate > 0 {
            (rate / 10).max(1)
        } else {
            1 << 20
        };
        let flush_asked = link.repl.flush_wanted.swap(false, Ordering::AcqRel);
        let next = t.next_records(
            cursor,
            batch_bytes,
            need_resync,
            flush_asked,
            &mut flush_upto,
        );
        let Next::Records(recs, filling) = next else {
            cursor = link.resync(false).await?;
            continue;
        };
        let next_cursor = recs.last().map_or(cursor, |r| r.seq + 1);
        let flush = (filling && !recs.is_empty()) || flush_upto.is_some_and(|u| next_cursor > u);
        if flush {
            flush_upto = None;
        }
        // Heartbeats go out even under a steady stream: the secondary must always know the
        // pending set a forced promotion would lose (failover.md A18). And on an idle link (the
        // wait below wakes every 100 ms): the secondary declares a stream silent for the peer
        // timeout dead (receiver::apply_loop).
        {
            if last_heartbeat.elapsed() >= Duration::from_millis(250) {
                // The pending set travels whenever it is not empty, and once when it becomes
                // empty, so a forced promotion knows its losses. Sparse: what is set, not the volume.
                let (sparse, count, last_seq) = t.pending_snapshot();
                let words = (last_pending_sent != Some(count) || count > 0).then(|| {
                    last_pending_sent = Some(count);
                    sparse
                });
                let bytes = words.as_ref().map_or(64, |w| 64 + w.len() as u64);
                link.send(
                    Body::Heartbeat(pb::Heartbeat {
                        pending_words: words.map(Into::into),
                        last_seq,
                        timestamp_us: now_us(),
                        ..Default::default()
                    }),
                    bytes,
                )
                .await?;
                last_heartbeat = Instant::now();
            }
        }
        if recs.is_empty() && flush {
            link.send(
                Body::WriteBatch(pb::WriteBatch {
                    records: Vec::new(),
                    flush: true,
                }),
                64,
            )
            .await?;
            continue;
        }
        if recs.is_empty() {
            let repl = link.repl;
            tokio::select! {
                _ = repl.wake.notified() => {}
                _ = repl.faults.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = link.stop.changed() => {}
                r = &mut *ack_task => return Err(r.unwrap_or(SessionError::Closed)),
            }
            continue;
        }
        let cost: u64 = recs.iter().map(|r| r.cost()).sum();
        let bytes: u64 = recs.iter().map(|r| r.len()).sum();
        cursor = next_cursor;
        let batch = pb::WriteBatch {
            records: recs.iter().map(write_record).collect(),
            flush,
        };
        link.send(Body::WriteBatch(batch), cost).await?;
        sent_upto = next_cursor - 1;
        link.repl
            .stats
            .bytes_replicated
            .fetch_add(bytes, Ordering::Relaxed);
        if link.repl.mode == super::Mode::Async && rate == 0 && cost < batch_bytes / 2 {
            // Async: linger a moment so the next message carries many records, not one; each
            // message costs a frame, a syscall and an acknowledgement on both sides. Sync writes
            // wait for the peer and must not wait for this.
            tokio::time::sleep(LINGER).await;
        }
    }
}

/// How long an async sender waits to fill a batch after sending a small one.
const LINGER: Duration = Duration::from_millis(1);

#[cfg(test)]
mod tests {
    use super::*;

    /// A fence that lands between a send's checks and its message must not put the fence's new
    /// epoch on the old session's message (the peer would adopt it and refuse the takeover).
    #[test]
    fn a_message_carries_its_sessions_epoch_even_across_a_fence() {
        let d = tempfile::tempdir().unwrap();
        let cfg = crate::volume::VolumeConfig {
            initial_role: Role::Primary,
            ..crate::takeover::tests::base_config(d.path())
        };
        let v = Volume::open(&cfg).unwrap();
        let repl = Arc::clone(v.repl.as_ref().unwrap());
        let (tx, mut rx) = mpsc::channel(4);
        let held = v.areas.seams.arm("link.send.checked");
        let sender = {
            let (v, repl) = (Arc::clone(&v), Arc::clone(&repl));
            std::thread::spawn(move || {
                let (_stop_tx, mut stop) = watch::channel(false);
                let mut link = Link::new(&v, &repl, tx, &mut stop, 0, (v.role(), v.epoch()));
                crate::takeover::tests::block_on(
                    link.send(Body::WriteBatch(pb::WriteBatch::default()), 64),
                )
            })
        };
        assert!(held.wait_arrived(), "the send never passed its checks");
        crate::takeover::tests::block_on(v.fence_and_handoff(5, true)).unwrap();
        held.release();
        sender.join().unwrap().unwrap();
        let m = rx.try_recv().unwrap();
        assert_eq!(
            m.epoch, 1,
            "the old session's message carried the fence's epoch"
        );
    }
}
