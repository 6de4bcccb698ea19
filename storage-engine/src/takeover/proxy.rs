//! Proxied reads (claim 1, S1003-S1007): blocks whose newest content is still on the old primary
//! are read from it with `Peer.ReadBlocks`. Every read has a deadline below a host's I/O timeout
//! (failover.md A19): on expiry the host gets EIO and the volume a condition, never a hang.
//! Concurrent reads of one block share one request; the number of requests in flight is bounded.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::{oneshot, Semaphore};

use crate::{
    client::{channel, TokenInterceptor},
    pb,
};

type PeerClient = pb::peer_client::PeerClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, TokenInterceptor>,
>;

type Waiters = Vec<oneshot::Sender<Result<Bytes, String>>>;

/// Why one ReadBlocks attempt failed.
enum Fetch {
    /// The connection broke or could not be made: worth another try before the deadline.
    Retry(String),
    /// The peer answered no (stale epoch, bad reply): final.
    Refused(String),
}

/// Pause between attempts on a broken connection.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// At most this many ReadBlocks requests in flight.
const MAX_IN_FLIGHT: usize = 32;

pub struct Proxy {
    /// A live move's cutover changes it (`set_peer`).
    peer: std::sync::RwLock<String>,
    token: Option<String>,
    pub timeout: Duration,
    inflight: Mutex<HashMap<u64, Waiters>>,
    /// The cached client and the address it was made for.
    client: tokio::sync::Mutex<Option<(String, PeerClient)>>,
    permits: Semaphore,
    pub reads: AtomicU64,
    pub errors: AtomicU64,
}

/// Removes the blocks this reader fetches from the in-flight map when it finishes or is dropped
/// (a cancelled reader must not leave waiters hanging).
struct Owner<'a> {
    proxy: &'a Proxy,
    blocks: Vec<u64>,
    results: HashMap<u64, Result<Bytes, String>>,
}

impl Drop for Owner<'_> {
    fn drop(&mut self) {
        let mut m = self
            .proxy
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for b in &self.blocks {
            let res = self
                .results
                .remove(b)
                .unwrap_or_else(|| Err("proxied read was cancelled".into()));
            for w in m.remove(b).unwrap_or_default() {
                let _ = w.send(res.clone());
            }
        }
    }
}

impl Proxy {
    pub fn new(peer: String, token: Option<String>, timeout: Duration) -> Self {
        Self {
            peer: std::sync::RwLock::new(peer),
            token,
            timeout,
            inflight: Mutex::new(HashMap::new()),
            client: tokio::sync::Mutex::new(None),
            permits: Semaphore::new(MAX_IN_FLIGHT),
            reads: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    fn peer(&self) -> String {
        self.peer.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Proxied reads go to `peer` from now on (a live move's cutover).
    pub fn set_peer(&self, peer: &str) {
        *self.peer.write().unwrap_or_else(|p| p.into_inner()) = peer.to_string();
    }

    /// Reads whole blocks from the peer at `epoch`; the results are in the order of `blocks`.
    pub async fn read(
        &self,
        volume: &str,
        epoch: u64,
        blocks: &[u64],
    ) -> Result<Vec<Bytes>, String> {
        let mut mine = Vec::new();
        let mut waits = Vec::new();
        {
            let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            for &b in blocks {
                if let Some(w) = m.get_mut(&b) {
                    let (tx, rx) = oneshot::channel();
                    w.push(tx);
                    waits.push((b, rx));
                } else if !mine.contains(&b) {
                    m.insert(b, Vec::new());
                    mine.push(b);
                }
            }
        }
        let mut owner = Owner {
            proxy: self,
            blocks: mine.clone(),
            results: HashMap::new(),
        };
        let mut got: HashMap<u64, Bytes> = HashMap::new();
        let deadline = tokio::time::Instant::now() + self.timeout;
        if !mine.is_empty() {
            // A broken connection is retried (reconnecting) until the deadline; a refusal is final.
            let mut last = String::new();
            let attempts = async {
                loop {
                    match self.fetch(volume, epoch, &mine).await {
                        Ok(d) => return Ok(d),
                        Err(Fetch::Retry(e)) => {
                            last = e;
                            tokio::time::sleep(RETRY_AFTER).await;
                        }
                        Err(Fetch::Refused(e)) => return Err(e),
                    }
                }
            };
            let res = tokio::time::timeout_at(deadline, attempts)
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "peer {} did not answer within {} ms ({last})",
                        self.peer(),
                        self.timeout.as_millis()
                    ))
                });
            self.reads.fetch_add(mine.len() as u64, Ordering::Relaxed);
            match res {
                Ok(data) => {
                    for (b, d) in mine.iter().zip(data) {
                        owner.results.insert(*b, Ok(d.clone()));
                        got.insert(*b, d);
                    }
                }
                Err(e) => {
                    self.errors.fetch_add(mine.len() as u64, Ordering::Relaxed);
                    for b in &mine {
                        owner.results.insert(*b, Err(e.clone()));
                    }
                    drop(owner);
                    return Err(e);
                }
            }
        }
        drop(owner);
        for (b, rx) in waits {
            let r = tokio::time::timeout_at(deadline, rx)
                .await
                .map_err(|_| format!("proxied read of block {b} timed out"))?
                .map_err(|_| format!("proxied read of block {b} was abandoned"))??;
            got.insert(b, r);
        }
        blocks
            .iter()
            .map(|b| {
                got.get(b)
                    .cloned()
                    .ok_or_else(|| format!("block {b} missing"))
            })
            .collect()
    }

    async fn fetch(&self, volume: &str, epoch: u64, blocks: &[u64]) -> Result<Vec<Bytes>, Fetch> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Fetch::Refused("proxy closed".to_string()))?;
        let mut client = {
            let mut c = self.client.lock().await;
            let peer = self.peer();
            match &*c {
                Some((at, cl)) if *at == peer => cl.clone(),
                _ => {
                    let ch = channel(&peer, self.timeout)
                        .await
                        .map_err(|e| Fetch::Retry(e.to_string()))?;
                    let interceptor = TokenInterceptor::new(self.token.as_deref())
                        .map_err(|e| Fetch::Refused(e.to_string()))?;
                    let cl = pb::peer_client::PeerClient::with_interceptor(ch, interceptor)
                        .max_decoding_message_size(64 << 20);
                    *c = Some((peer, cl.clone()));
                    cl
                }
            }
        };
        let reply = client
            .read_blocks(pb::ReadBlocksRequest {
                volume: volume.to_string(),
                epoch,
                blocks: blocks.to_vec(),
            })
            .await;
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(s) => {
                let msg = format!("peer {}: {}", self.peer(), s.message());
                if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown {
                    *self.client.lock().await = None;
                    return Err(Fetch::Retry(msg));
                }
                return Err(Fetch::Refused(msg));
            }
        };
        if reply.epoch != epoch {
            return Err(Fetch::Refused(format!(
                "peer answered at epoch {}, not {epoch}; refused",
                reply.epoch
            )));
        }
        if reply.data.len() != blocks.len()
            || reply
                .data
                .iter()
                .any(|d| d.len() != crate::geometry::BLOCK_SIZE as usize)
        {
            return Err(Fetch::Refused(
                "peer sent a malformed ReadBlocks reply".into(),
            ));
        }
        Ok(reply.data)
    }
}
