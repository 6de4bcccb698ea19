//! The secondary's side of the link: the `Peer` gRPC service. One replication stream at a time
//! (a newer stream supersedes an older one); messages are applied in batches, made durable, then
//! acknowledged.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::{
    pb::{self, peer_server::Peer, replication_message::Body},
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
    generation: Arc<AtomicU64>,
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
}

impl PeerService {
    pub fn new(vol: Arc<Volume>, durable_interval: Duration) -> Self {
        Self {
            vol,
            durable_interval,
            generation: Arc::new(AtomicU64::new(0)),
            one_at_a_time: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

/// Marks the link up while a stream is being applied.
struct LinkUp(Arc<crate::repl::Repl>);
impl LinkUp {
    fn new(r: Arc<crate::repl::Repl>) -> Self {
        r.stats.connected.store(true, Ordering::Relaxed);
        Self(r)
    }
}
impl Drop for LinkUp {
    fn drop(&mut self) {
        self.0.stats.connected.store(false, Ordering::Relaxed);
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

async fn apply_loop(
    vol: &Arc<Volume>,
    inbound: &mut Streaming<pb::ReplicationMessage>,
    tx: &AckTx,
    images: &Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    durability: &Durability,
    generation: &AtomicU64,
    my_gen: u64,
) {
    loop {
        let first = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                debug!(error = %e, "replication stream ended");
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
        if generation.load(Ordering::SeqCst) != my_gen {
            return;
        }
        // Only a plain stream into a secondary syncs lazily; a resync, a drain into a primary and
        // a requested flush sync as soon as they are applied.
        let flush_now = vol.role() != crate::meta::Role::Secondary
            || batch.iter().any(|m| match &m.body {
                Some(Body::WriteBatch(b)) => b.flush,
                Some(Body::Heartbeat(_)) => false,
                _ => true,
            });
        // Small batches are a few page-cache writes: applying them here saves a thread hand-off on
        // the path a sync-mode write waits on. Large ones go to the blocking pool.
        let bytes: usize = batch.iter().map(prost::Message::encoded_len).sum();
        // Held while the batch applies: a fence or role change waits for it, and the role the
        // batch is checked against cannot change under it.
        let gate = vol.gate.read().await;
        let result = if bytes <= INLINE_APPLY_BYTES {
            vol.apply_batch(batch)
        } else {
            let v = Arc::clone(vol);
            tokio::task::spawn_blocking(move || v.apply_batch(batch))
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
                    if tx.send(Ok(ack)).await.is_err() {
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
                    if tx.send(Ok(ack)).await.is_err() {
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
                let _ = tx.send(Err(status)).await;
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
        if vol.role() == crate::meta::Role::Secondary {
            if let Some(r) = &vol.repl {
                // Blocks this secondary asked back (resend) are now the primary's content.
                r.tracker.forget(&blocks);
            }
        } else if let Err(e) = vol.persist_areas() {
            warn!(error = %e, "persisting the handed-off table failed");
        }
        let ack = pb::ReplicationAck {
            epoch: vol.epoch(),
            applied_seq: seq,
            blocks,
            generations,
            durable: true,
            ..Default::default()
        };
        // A source that went away stops reading acks: do not hold the stream slot for it.
        let sent = tokio::time::timeout(std::time::Duration::from_secs(1), tx.send(Ok(ack))).await;
        if !matches!(sent, Ok(Ok(()))) || last {
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
        let my_gen = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let generation = Arc::clone(&self.generation);
        let lock = Arc::clone(&self.one_at_a_time);
        let vol = Arc::clone(&self.vol);
        let interval = self.durable_interval;
        tokio::spawn(async move {
            let _one = lock.lock().await;
            if tx.send(Ok(vol.replica_hello())).await.is_err() {
                return;
            }
            // A drain into a primary is not "the link" its own sender reports.
            let _link = vol
                .repl
                .as_ref()
                .filter(|_| vol.role() == crate::meta::Role::Secondary)
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
            ));
            apply_loop(
                &vol,
                &mut inbound,
                &tx,
                &images,
                &durability,
                &generation,
                my_gen,
            )
            .await;
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
    }
}
