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

use futures::FutureExt;
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

#[allow(clippy::too_many_arguments)]
async fn apply_loop(
    vol: &Arc<Volume>,
    inbound: &mut Streaming<pb::ReplicationMessage>,
    tx: &AckTx,
    images: &Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    durability: &Durability,
    turn: &mut Turn,
    silence: Duration,
) {
    loop {
        // The source sends at least a heartbeat every 250 ms (sender::stream, drain::drain): a
        // stream silent for `silence` has a dead, stopped or cut-off source, which TCP may never
        // report (no FIN, no RST). End it, so the link reads down and a reconnect gets the slot
        // (liveness::blackholed_link_is_detected_and_heals).
        let first = tokio::select! {
            r = tokio::time::timeout(silence, inbound.message()) => match r {
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
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
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match inbound.message().now_or_never() {
                Some(Ok(Some(m))) => batch.push(m),
                _ => break,
            }
        }
        if turn.superseded() {
            return;
        }
        // Only a plain stream into a secondary syncs lazily; a resync, a drain into a primary and
        // a requested flush sync as soon as they are applied. Heartbeats alone never sync.
        let only_heartbeats = batch
            .iter()
            .all(|m| matches!(m.body, Some(Body::Heartbeat(_))));
        let flush_now = !only_heartbeats
            && (vol.receiving() != Receiving::Replica
                || batch.iter().any(|m| match &m.body {
                    Some(Body::WriteBatch(b)) => b.flush,
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
        let seq = match tokio::task::spawn_blocking(move || v.make_durable()).await {
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

#[tonic::async_trait]
impl Peer for PeerService {
    type ReplicateStream = AckStream;

    async fn replicate(
        &self,
        req: Request<Streaming<pb::ReplicationMessage>>,
    ) -> Result<Response<AckStream>, Status> {
        let mut inbound = req.into_inner();
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
            apply_loop(
                &vol,
                &mut inbound,
                &tx,
                &images,
                &durability,
                &mut turn,
                silence,
            )
            .await;
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
        Ok(Response::new(ReceiverStream::new(rx)))
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
            .fence_and_handoff(r.new_epoch)
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
