//! The secondary's side of the link: the `Peer` gRPC service. One replication stream at a time
//! (a newer stream supersedes an older one at once); messages are applied in batches, made
//! durable, then acknowledged. A stream silent for longer than the peer timeout is dead.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::{
    pb::{self, peer_server::Peer, replication_message::Body},
    state::Receiving,
    volume::Volume,
};

/// Messages applied per durable batch at most.
const BATCH: usize = 512;
/// Batches up to this size are applied on the stream's task.
const INLINE_APPLY_BYTES: usize = 256 * 1024;
/// Received and not yet applied, at most (`read_loop`).
const READ_AHEAD_BYTES: usize = 8 << 20;

pub struct PeerService {
    vol: Arc<Volume>,
    /// A secondary makes streamed writes durable this long after the first unsynced one, unless
    /// the source asks sooner (a sync-mode FLUSH, a filling journal). Syncing after every batch
    /// wrote the page cache back continuously, one disk request per 4 KiB block, and put a disk
    /// round trip beside every sync-mode write; DRBD and Longhorn replicas likewise sync on the
    /// source's flush rather than per write. What is applied but not yet durable stays in the
    /// source's table, so a crash of this machine still loses nothing.
    durable_interval: Duration,
    /// A stream that brings nothing (not even the source's 250 ms heartbeat) for this long is dead.
    peer_timeout: Duration,
    /// The newest stream's number: an older stream sees it change and ends at once.
    generation: watch::Sender<u64>,
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
}

impl PeerService {
    pub fn new(vol: Arc<Volume>, durable_interval: Duration, peer_timeout: Duration) -> Self {
        Self {
            vol,
            durable_interval,
            peer_timeout,
            generation: watch::Sender::new(0),
            one_at_a_time: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

/// Marks the link up while a stream is being applied.
struct LinkUp(Arc<crate::repl::Repl>);
impl LinkUp {
    fn new(r: Arc<crate::repl::Repl>) -> Self {
        r.stats.set_connected(true);
        Self(r)
    }
}
impl Drop for LinkUp {
    fn drop(&mut self) {
        self.0.stats.set_connected(false);
    }
}

/// One stream's place in line: it ends as soon as a newer stream arrives. The source is the one
/// peer of this volume, so a newer stream means the older one's sender is gone or has given up on
/// it (a primary that died silently and came back, a reconnect after its own deadline); waiting
/// for the old stream to time out would hold the new one back (liveness::silent_primary_death_*).
#[derive(Clone)]
struct Turn {
    generation: watch::Receiver<u64>,
    mine: u64,
}

impl Turn {
    fn superseded(&self) -> bool {
        *self.generation.borrow() != self.mine
    }

    /// Resolves once a newer stream has arrived.
    async fn ended(&mut self) {
        let mine = self.mine;
        // The sender lives as long as the service: an error cannot happen, and would end us too.
        let _ = self.generation.wait_for(|g| *g != mine).await;
    }
}

type AckTx = mpsc::Sender<Result<pb::ReplicationAck, Status>>;

/// How the applying side tells the flusher there is something to make durable, and how soon.
#[derive(Default)]
struct Durability {
    /// Something was applied (or a flush was asked for).
    dirty: tokio::sync::Notify,
    /// Sync now instead of after the durable interval.
    urgent: tokio::sync::Notify,
}

/// Sends an acknowledgement unless the stream is superseded or the source stopped reading for
/// longer than the peer timeout (a dead source must not hold the stream slot).
async fn send_ack(
    tx: &AckTx,
    ack: Result<pb::ReplicationAck, Status>,
    turn: &mut Turn,
    silence: Duration,
) -> bool {
    tokio::select! {
        r = tokio::time::timeout(silence, tx.send(ack)) => matches!(r, Ok(Ok(()))),
        _ = turn.ended() => false,
    }
}

/// What a replication stream brings: tonic's `Streaming`, or a plain stream in unit tests.
pub(crate) trait Inbound:
    futures::Stream<Item = Result<pb::ReplicationMessage, Status>> + Unpin + Send + 'static
{
}
impl<S> Inbound for S where
    S: futures::Stream<Item = Result<pb::ReplicationMessage, Status>> + Unpin + Send + 'static
{
}

/// A received message and its share of the read-ahead budget.
type Queued = (pb::ReplicationMessage, tokio::sync::OwnedSemaphorePermit);

/// Reads the stream ahead of the applying loop, up to `READ_AHEAD_BYTES`: while a batch is
/// applied the next one arrives, so the source is not held to one batch at a time (the transport
/// window stays open). Ends the queue when the stream ends, dies or is superseded.
async fn read_loop(
    mut inbound: impl Inbound,
    queue: mpsc::UnboundedSender<Queued>,
    budget: Arc<tokio::sync::Semaphore>,
    mut turn: Turn,
    silence: Duration,
) {
    loop {
        // The source sends at least a heartbeat every 250 ms (sender::stream, drain::drain): a
        // stream silent for `silence` has a dead, stopped or cut-off source, which TCP may never
        // report (no FIN, no RST). End it, so the link reads down and a reconnect gets the slot
        // (liveness::blackholed_link_is_detected_and_heals).
        let m = tokio::select! {
            r = tokio::time::timeout(silence, inbound.next()) => match r {
                Ok(Some(Ok(m))) => m,
                Ok(None) => return,
                Ok(Some(Err(e))) => {
                    debug!(error = %e, "replication stream ended");
                    return;
                }
                Err(_) => {
                    warn!(?silence, "nothing from the replication source: the link is dead");
                    return;
                }
            },
            _ = turn.ended() => {
                debug!("replication stream superseded by a newer one");
                return;
            }
        };
        // A message larger than the whole budget takes all of it.
        let n = prost::Message::encoded_len(&m).clamp(1, READ_AHEAD_BYTES) as u32;
        let Ok(permit) = Arc::clone(&budget).acquire_many_owned(n).await else {
            return;
        };
        if queue.send((m, permit)).is_err() {
            return;
        }
    }
}

/// Ends a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[allow(clippy::too_many_arguments)]
async fn apply_loop(
    vol: &Arc<Volume>,
    inbound: impl Inbound,
    tx: &AckTx,
    images: &Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    durability: &Durability,
    turn: &mut Turn,
    silence: Duration,
) {
    let budget = Arc::new(tokio::sync::Semaphore::new(READ_AHEAD_BYTES));
    let (queue_tx, mut queue) = mpsc::unbounded_channel();
    let _reader = AbortOnDrop(tokio::spawn(read_loop(
        inbound,
        queue_tx,
        budget,
        turn.clone(),
        silence,
    )));
    loop {
        // What arrived before the stream ended is applied: the source sent it, in order.
        let first = tokio::select! {
            m = queue.recv() => match m {
                Some(m) => m,
                None => return,
            },
            _ = turn.ended() => return,
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if turn.superseded() {
            return;
        }
        // The budget comes back once the batch is applied.
        let (batch, _budget): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        // Only a plain stream into a secondary syncs lazily, with a table resync's images (marked
        // `lazy`); a resync's end, a live move's images, a drain into a primary and a requested
        // flush sync as soon as they are applied. Heartbeats alone never sync. A lazy image only
        // waits longer for its durable acknowledgement, which alone clears it on the source.
        let only_heartbeats = batch
            .iter()
            .all(|m| matches!(m.body, Some(Body::Heartbeat(_))));
        let flush_now = !only_heartbeats
            && (vol.receiving() != Receiving::Replica
                || batch.iter().any(|m| match &m.body {
                    Some(Body::WriteBatch(b)) => b.flush,
                    Some(Body::Block(b)) => !b.lazy,
                    Some(Body::Heartbeat(_)) => false,
                    _ => true,
                }));
        // Small batches are a few page-cache writes: applying them here saves a thread hand-off on
        // the path a sync-mode write waits on. Large ones go to the blocking pool.
        let bytes: usize = batch.iter().map(prost::Message::encoded_len).sum();
        // Held while the batch applies: a fence or role change waits for it, and the role the
        // batch is checked against cannot change under it.
        let gate = vol.gate.read().await;
        let result = if bytes <= INLINE_APPLY_BYTES {
            vol.apply_batch(batch).map_err(Status::from)
        } else {
            let v = Arc::clone(vol);
            tokio::task::spawn_blocking(move || v.apply_batch(batch).map_err(Status::from))
                .await
                .unwrap_or_else(|e| Err(Status::internal(e.to_string())))
        };
        drop(gate);
        match result {
            Ok(applied) => {
                if applied.drain_complete {
                    // Made durable before apply_batch returned.
                    let ack = pb::ReplicationAck {
                        epoch: applied.epoch,
                        drain_complete: true,
                        ..Default::default()
                    };
                    if !send_ack(tx, Ok(ack), turn, silence).await {
                        return;
                    }
                }
                if applied.wrote {
                    images
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(applied.images);
                    durability.dirty.notify_one();
                    let ack = pb::ReplicationAck {
                        epoch: applied.epoch,
                        applied_seq: applied.applied_seq,
                        durable: false,
                        ..Default::default()
                    };
                    if !send_ack(tx, Ok(ack), turn, silence).await {
                        return;
                    }
                }
                if flush_now {
                    // An empty flush batch wrote nothing, and still gets its durable ack.
                    durability.dirty.notify_one();
                    durability.urgent.notify_one();
                }
            }
            Err(status) => {
                warn!(error = %status.message(), "refused replication batch");
                let _ = send_ack(tx, Err(status), turn, silence).await;
                return;
            }
        }
    }
}

/// fdatasync + progress whenever something new was applied, then a durable acknowledgement.
async fn flush_loop(
    vol: Arc<Volume>,
    images: Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    durability: Arc<Durability>,
    interval: Duration,
    done: Arc<AtomicBool>,
    tx: AckTx,
    mut turn: Turn,
) {
    loop {
        durability.dirty.notified().await;
        if !done.load(Ordering::SeqCst) {
            tokio::select! {
                _ = durability.urgent.notified() => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
        let last = done.load(Ordering::SeqCst);
        // Images taken before the fsync are covered by it.
        let taken: Vec<(u64, u64)> =
            std::mem::take(&mut *images.lock().unwrap_or_else(|p| p.into_inner()));
        let v = Arc::clone(&vol);
        let sync = move || {
            v.areas.seams.hit("receiver.before_fdatasync");
            v.make_durable()
        };
        // The images taken above are named in the durable acknowledgement below, which clears them
        // on the source: only after this fdatasync covered them
        // (tests::a_lazy_image_is_acknowledged_only_after_the_fdatasync).
        let seq = match tokio::task::spawn_blocking(sync).await {
            Ok(Ok(seq)) => seq,
            Ok(Err(e)) => {
                let _ = tx
                    .send(Err(Status::internal(format!("fsync failed: {e}"))))
                    .await;
                return;
            }
            Err(_) => return,
        };
        let (blocks, generations): (Vec<u64>, Vec<u64>) = taken.into_iter().unzip();
        if vol.receiving() == Receiving::Replica {
            if let Some(r) = &vol.repl {
                // The loss export's decided blocks are stored first: a block this secondary no
                // longer asks back must not be stored as still to compare (`crate::loss`).
                match vol.persist_losses() {
                    // Blocks this secondary asked back (resend) are now the primary's content.
                    Ok(()) => r.tracker.forget(&blocks),
                    Err(e) => warn!(error = %e, "storing the loss export's progress failed"),
                }
            }
        } else if let Err(e) = vol.persist_areas() {
            warn!(error = %e, "persisting the handed-off table failed");
        }
        let (losses_checked_epoch, losses_exported) = vol.losses.finished().unwrap_or((0, 0));
        let ack = pb::ReplicationAck {
            epoch: vol.epoch(),
            applied_seq: seq,
            blocks,
            generations,
            durable: true,
            losses_exported,
            losses_checked_epoch,
            ..Default::default()
        };
        // A source that went away stops reading acks: do not hold the stream slot for it.
        if !send_ack(&tx, Ok(ack), &mut turn, Duration::from_secs(1)).await || last {
            return;
        }
    }
}

type AckStream = ReceiverStream<Result<pb::ReplicationAck, Status>>;

impl PeerService {
    /// Takes a replication stream: the newest one supersedes any older at once; the returned
    /// stream carries its acknowledgements (the hello first).
    pub(crate) fn accept(&self, inbound: impl Inbound) -> AckStream {
        let (tx, rx) = mpsc::channel(16);
        let mut mine = 0;
        self.generation.send_modify(|g| {
            *g += 1;
            mine = *g;
        });
        let mut turn = Turn {
            generation: self.generation.subscribe(),
            mine,
        };
        let lock = Arc::clone(&self.one_at_a_time);
        let vol = Arc::clone(&self.vol);
        let interval = self.durable_interval;
        let silence = self.peer_timeout;
        tokio::spawn(async move {
            // The older stream sees the new generation and gives the slot up at once.
            let _one = tokio::select! {
                l = lock.lock() => l,
                _ = turn.ended() => return,
            };
            if turn.superseded() || tx.send(Ok(vol.replica_hello())).await.is_err() {
                return;
            }
            // A drain into a primary is not "the link" its own sender reports.
            let link = vol
                .repl
                .as_ref()
                .filter(|_| vol.receiving() == Receiving::Replica)
                .map(|r| LinkUp::new(Arc::clone(r)));
            // Applying and making durable run side by side: a sync-mode writer waits only for the
            // apply; the differential table waits for the fsync.
            let images: Arc<std::sync::Mutex<Vec<(u64, u64)>>> = Arc::default();
            let durability = Arc::new(Durability::default());
            let done = Arc::new(AtomicBool::new(false));
            let flusher = tokio::spawn(flush_loop(
                Arc::clone(&vol),
                Arc::clone(&images),
                Arc::clone(&durability),
                interval,
                Arc::clone(&done),
                tx.clone(),
                turn.clone(),
            ));
            apply_loop(&vol, inbound, &tx, &images, &durability, &mut turn, silence).await;
            // The stream is over (closed, dead or superseded): the link reads down now, not after
            // the tail below.
            drop(link);
            // Make the tail durable and acknowledge it before the stream closes.
            done.store(true, Ordering::SeqCst);
            durability.dirty.notify_one();
            durability.urgent.notify_one();
            drop(tx);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), flusher).await;
        });
        ReceiverStream::new(rx)
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    type ReplicateStream = AckStream;

    async fn replicate(
        &self,
        req: Request<Streaming<pb::ReplicationMessage>>,
    ) -> Result<Response<AckStream>, Status> {
        Ok(Response::new(self.accept(req.into_inner())))
    }

    async fn fence_and_handoff(
        &self,
        req: Request<pb::FenceRequest>,
    ) -> Result<Response<pb::HandoffReply>, Status> {
        let r = req.into_inner();
        if r.volume != self.vol.name() {
            return Err(Status::not_found(format!("unknown volume {:?}", r.volume)));
        }
        self.vol
            .fence_and_handoff(r.new_epoch, r.accepts_runs)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn read_blocks(
        &self,
        req: Request<pb::ReadBlocksRequest>,
    ) -> Result<Response<pb::ReadBlocksReply>, Status> {
        let r = req.into_inner();
        if r.volume != self.vol.name() {
            return Err(Status::not_found(format!("unknown volume {:?}", r.volume)));
        }
        let vol = Arc::clone(&self.vol);
        tokio::task::spawn_blocking(move || vol.serve_read_blocks(&r))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseReply>, Status> {
        let r = req.into_inner();
        if r.volume != self.vol.name() {
            return Err(Status::not_found(format!("unknown volume {:?}", r.volume)));
        }
        self.vol
            .answer_lease(&r)
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn resize(
        &self,
        req: Request<pb::ResizeRequest>,
    ) -> Result<Response<pb::ResizeReply>, Status> {
        let r = req.into_inner();
        if r.volume != self.vol.name() {
            return Err(Status::not_found(format!("unknown volume {:?}", r.volume)));
        }
        self.vol
            .answer_resize(&r)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn announce(
        &self,
        req: Request<pb::AnnounceRequest>,
    ) -> Result<Response<pb::AnnounceReply>, Status> {
        let r = req.into_inner();
        if r.volume != self.vol.name() {
            return Err(Status::not_found(format!("unknown volume {:?}", r.volume)));
        }
        let Some(repl) = &self.vol.repl else {
            return Err(Status::from(crate::error::EngineError::NotPaired(
                "volume is not paired",
            )));
        };
        Ok(Response::new(super::announce::answer(&self.vol, repl)))
    }

    /// A read-write secondary's host request, run through this primary's host path
    /// (`volume/forward.rs`).
    async fn forward_write(
        &self,
        req: Request<pb::ForwardWriteRequest>,
    ) -> Result<Response<pb::ForwardWriteReply>, Status> {
        let r = req.into_inner();
        if r.volume != self.vol.name() {
            return Err(Status::not_found(format!("unknown volume {:?}", r.volume)));
        }
        self.vol
            .answer_forward(r)
            .await
            .map(|seq| Response::new(pb::ForwardWriteReply { seq }))
            .map_err(Status::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::takeover::tests::config;
    use futures::FutureExt;

    const BS: u64 = crate::geometry::BLOCK_SIZE as u64;

    fn image(b: u64, generation: u64, lazy: bool) -> pb::ReplicationMessage {
        let data = bytes::Bytes::from(vec![b as u8 ^ 0x5a; BS as usize]);
        pb::ReplicationMessage {
            volume: "v".into(),
            epoch: 1,
            body: Some(Body::Block(pb::BlockImage {
                block: b,
                generation,
                crc32c: crc32c::crc32c(&data),
                data,
                lazy,
            })),
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// The next acknowledgement that names blocks (a durable one), within 10 s.
    async fn named(acks: &mut AckStream) -> pb::ReplicationAck {
        loop {
            let a = tokio::time::timeout(Duration::from_secs(10), acks.next())
                .await
                .expect("no durable acknowledgement naming the images within 10 s")
                .expect("the acknowledgement stream ended")
                .expect("the batch was refused");
            if !a.blocks.is_empty() {
                return a;
            }
        }
    }

    /// A receiver on a fresh volume, its stream fed through `inbound`. The service is kept: the
    /// stream's turn lasts as long as it.
    struct Fed {
        vol: Arc<Volume>,
        rt: tokio::runtime::Runtime,
        _svc: PeerService,
        inbound: mpsc::Sender<Result<pb::ReplicationMessage, Status>>,
        acks: AckStream,
    }

    fn fed(dir: &std::path::Path, durable_interval: Duration) -> Fed {
        let vol = Volume::open(&config(dir)).unwrap();
        let rt = runtime();
        let svc = PeerService::new(Arc::clone(&vol), durable_interval, Duration::from_secs(30));
        let (inbound, rx) = mpsc::channel(64);
        let acks = rt.block_on(async { svc.accept(ReceiverStream::new(rx)) });
        Fed {
            vol,
            rt,
            _svc: svc,
            inbound,
            acks,
        }
    }

    /// A table resync's lazy images are named in an acknowledgement (which clears them on the
    /// source, `Tracker::ack_images`) only once the fdatasync covering them is done: with the
    /// flusher held just before its fdatasync nothing names them, and a power cut right after the
    /// acknowledgement still reads every named block back as its image.
    #[test]
    fn a_lazy_image_is_acknowledged_only_after_the_fdatasync() {
        let d = tempfile::tempdir().unwrap();
        let Fed {
            vol: v,
            rt,
            _svc,
            inbound: in_tx,
            mut acks,
        } = fed(d.path(), Duration::from_millis(50));
        let held = v.areas.seams.arm("receiver.before_fdatasync");
        let blocks: Vec<u64> = (10..30).collect();
        rt.block_on(async {
            for &b in &blocks {
                in_tx.send(Ok(image(b, 100 + b, true))).await.unwrap();
            }
        });
        assert!(held.wait_arrived(), "the flusher never came to sync");
        // Everything acknowledged so far is in the channel: none of it may name an image.
        while let Some(Some(a)) = acks.next().now_or_never() {
            let a = a.expect("the batch was refused");
            assert!(
                a.blocks.is_empty(),
                "blocks {:?} acknowledged before their fdatasync (durable: {})",
                a.blocks,
                a.durable
            );
        }
        held.release();
        let mut got = Vec::new();
        while got.len() < blocks.len() {
            let a = rt.block_on(named(&mut acks));
            assert!(
                a.durable,
                "images named in an acknowledgement that is not durable"
            );
            for (b, g) in a.blocks.iter().zip(&a.generations) {
                assert_eq!(
                    *g,
                    100 + b,
                    "block {b} acknowledged at the wrong generation"
                );
            }
            // The power goes out now: whatever no fdatasync covered is gone.
            v.store.lose_unsynced();
            for &b in &a.blocks {
                let mut buf = vec![0u8; BS as usize];
                v.read_local(&mut buf, b * BS).unwrap();
                assert!(
                    buf.iter().all(|&x| x == b as u8 ^ 0x5a),
                    "block {b} was acknowledged durable and lost at a power cut"
                );
            }
            got.extend(a.blocks);
        }
        got.sort_unstable();
        assert_eq!(got, blocks);
    }

    /// A live move's images (not lazy) are durable and acknowledged at once, however long the
    /// durable interval: a block the writer keeps rewriting is owed until an acknowledgement names
    /// its current generation, and the move's cutover waits for nothing owed (commit 52355e6 made
    /// them lazy and the operator's move test never converged). A resync's end does the same for
    /// its lazy images.
    #[test]
    fn move_images_and_a_resyncs_end_are_acknowledged_without_the_durable_interval() {
        let d = tempfile::tempdir().unwrap();
        let Fed {
            vol: _,
            rt,
            _svc,
            inbound: in_tx,
            mut acks,
        } = fed(d.path(), Duration::from_secs(3600));
        rt.block_on(async {
            in_tx.send(Ok(image(7, 70, false))).await.unwrap();
            let a = named(&mut acks).await;
            assert!(a.durable);
            assert_eq!((a.blocks, a.generations), (vec![7], vec![70]));
            in_tx.send(Ok(image(8, 80, true))).await.unwrap();
            in_tx
                .send(Ok(pb::ReplicationMessage {
                    volume: "v".into(),
                    epoch: 1,
                    body: Some(Body::ResyncDone(pb::ResyncDone {
                        consistent_seq: 0,
                        full: false,
                        next_seq: 1,
                    })),
                }))
                .await
                .unwrap();
            let a = named(&mut acks).await;
            assert!(a.durable);
            assert_eq!((a.blocks, a.generations), (vec![8], vec![80]));
        });
    }
}
