//! Replication between the two engines of a volume (the patent's first processing, claim 7 order):
//! `tracker` is the primary's differential table and journal, `sender` streams them to the peer,
//! `receiver` applies the stream on the secondary and acknowledges what is durable.

pub mod announce;
pub mod drain;
pub mod intent_log;
pub mod mover;
pub mod receiver;
pub mod sender;
pub mod task;
pub mod tracker;

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use tokio::sync::{watch, Notify};

pub use tracker::Tracker;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Acknowledge the host after the local write (default).
    Async,
    /// Acknowledge the host after the peer has the write durably.
    Sync,
}

/// Test seam on the peer link, driven by `InjectFault` (only with --fault-injection).
#[derive(Debug, Default)]
pub struct Faults {
    pub paused: AtomicBool,
    pub hold_acks: AtomicBool,
    pub rate: AtomicU64,
    /// `rate` holds back journal records only, not images.
    pub rate_records_only: AtomicBool,
    pub drop_epoch: AtomicU64,
    pub changed: Notify,
}

/// Counters and flags the status and metrics report.
#[derive(Debug, Default)]
pub struct ReplStats {
    /// A session is up and not known dead: set after the peer's first message, cleared within
    /// `--peer-timeout-ms` of the peer going silent (Liveness in ARCHITECTURE.md). Change it only
    /// through `set_connected`, which wakes sync-mode writers waiting on a link that went down.
    pub connected: AtomicBool,
    /// Woken when `connected` turns false.
    pub link_down: Notify,
    /// Sync-mode waits that ended without the peer's ack (timeout or link down).
    pub sync_timeouts: AtomicU64,
    /// Sync-mode writes and flushes refused: no peer acknowledgement and no witness consent.
    pub sync_refused: AtomicU64,
    /// Host writes and flushes refused for want of a write lease.
    pub lease_refused: AtomicU64,
    /// Highest seq a sync-mode write or flush stood on the local copy alone; 0 when none does.
    /// Cleared once the peer has that seq durably (the sender's acknowledgement task).
    pub degraded_upto: AtomicU64,
    pub resyncing: AtomicBool,
    pub bytes_replicated: AtomicU64,
    pub bytes_resynced: AtomicU64,
    pub resync_total: AtomicU64,
    pub resync_done: AtomicU64,
    pub stale_rejected: AtomicU64,
}

impl ReplStats {
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
        if !up {
            self.link_down.notify_waiters();
        }
    }

    /// Whether some sync-mode write stands on the local copy alone right now.
    pub fn degraded(&self) -> bool {
        self.degraded_upto.load(Ordering::Acquire) != 0
    }

    /// The peer has everything up to `durable_seq` on stable storage (and no resync is under way):
    /// the writes that stood alone are mirrored again.
    pub fn caught_up(&self, durable_seq: u64) {
        let upto = self.degraded_upto.load(Ordering::Acquire);
        if upto != 0 && durable_seq >= upto && !self.resyncing.load(Ordering::Acquire) {
            // A newer miss noted meanwhile keeps the state (compare-exchange, not store).
            let _ =
                self.degraded_upto
                    .compare_exchange(upto, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

/// Everything both sides of a pair share about the link.
pub struct Repl {
    pub tracker: Tracker,
    pub faults: Faults,
    pub stats: ReplStats,
    /// Wakes the sender: new journal records, a resync request, a fault change.
    pub wake: Notify,
    /// Highest seq the peer applied (a sync-mode write waits on it).
    pub acked: watch::Sender<u64>,
    /// Highest seq on the peer's stable storage (a sync-mode flush waits on it).
    pub durable: watch::Sender<u64>,
    /// The peer's address: a live move's cutover changes it (`set_peer`); read it with `peer()`.
    pub peer: std::sync::RwLock<String>,
    /// Bumped by `set_peer`: a session to the old peer ends.
    pub peer_gen: AtomicU64,
    pub token: Option<String>,
    pub mode: Mode,
    pub sync_timeout: Duration,
    /// The primary's write lease and, as the peer, the promise (`crate::lease`).
    pub lease: crate::lease::Lease,
    /// A sync-mode host FLUSH waits for the peer's stable storage: the sender asks it to sync now.
    pub flush_wanted: std::sync::atomic::AtomicBool,
    /// Blocks a proxied read asked for: a draining engine sends them first.
    pub priority: std::sync::Mutex<std::collections::VecDeque<u64>>,
    /// The peer announced itself (`Peer.Announce`): a reconnect backoff ends now (`task::run`).
    pub peer_back: Notify,
    /// `task::run` is waiting out a backoff (what an announcement's answer reports).
    pub backing_off: AtomicBool,
}

impl Repl {
    /// The peer's address now.
    pub fn peer(&self) -> String {
        self.peer.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replication (and lease renewals, handoffs, resizes) go to `peer` from now on; the session
    /// to the old one ends.
    pub fn set_peer(&self, peer: &str) {
        *self.peer.write().unwrap_or_else(|p| p.into_inner()) = peer.to_string();
        self.peer_gen.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_one();
    }

    pub fn prioritize(&self, blocks: &[u64]) {
        let mut q = self.priority.lock().unwrap_or_else(|p| p.into_inner());
        let room = 4096usize.saturating_sub(q.len());
        q.extend(blocks.iter().copied().take(room));
        drop(q);
        self.wake.notify_one();
    }

    pub fn pop_priority(&self) -> Option<u64> {
        self.priority
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }
    pub fn connected(&self) -> bool {
        self.stats.connected.load(Ordering::Acquire)
    }

    /// Waits until the peer acknowledged `seq`, unless the link is down or the wait times out:
    /// then the write may stand on the local copy alone (it is in the table and reaches the peer
    /// when the link is back) and the pair reports it (`sync_degraded`, condition `Degraded: ...`,
    /// `tandem_sync_timeouts_total`). With leases on, standing alone needs the witness's consent
    /// (`GrantLease` allow_async); without it the write keeps waiting for the peer or the consent
    /// until the lease wait bound, then is refused (`Synced::Refused`, EIO to the host): a sync
    /// write is never acknowledged on one copy that the witness did not allow.
    /// Test: `tests/lease.rs` `sync_mode_falls_back_only_with_the_witness_consent`.
    pub async fn wait_acked(&self, seq: u64) -> Synced {
        self.wait_on(&self.acked, seq).await
    }

    /// Asks the peer to make `seq` durable now and waits until it has (sync-mode FLUSH and FUA);
    /// on a miss as `wait_acked`.
    pub async fn wait_durable(&self, seq: u64) -> Synced {
        self.flush_wanted.store(true, Ordering::Release);
        self.wake.notify_one();
        self.wait_on(&self.durable, seq).await
    }

    async fn wait_on(&self, w: &watch::Sender<u64>, seq: u64) -> Synced {
        let mut rx = w.subscribe();
        // Registered before `connected` is read, so a link going down in between still wakes us.
        let down = self.stats.link_down.notified();
        tokio::pin!(down);
        down.as_mut().enable();
        // A link known down answers at once: a blackholed peer costs one wait of at most
        // `--peer-timeout-ms`, not `--sync-timeout-ms` per write (liveness::sync_mode_*).
        let ok = *rx.borrow() >= seq
            || (self.connected()
                && tokio::select! {
                    r = tokio::time::timeout(self.sync_timeout, rx.wait_for(|a| *a >= seq)) => {
                        r.is_ok_and(|r| r.is_ok())
                    }
                    _ = &mut down => false,
                })
            || *w.borrow() >= seq;
        if ok {
            return Synced::Peer;
        }
        if self.lease.enabled() && !self.lease.async_consent() {
            let deadline = tokio::time::Instant::now() + self.lease.wait_bound();
            let peer = loop {
                let consent = self.lease.renewed.notified();
                tokio::pin!(consent);
                consent.as_mut().enable();
                if *w.borrow() >= seq {
                    break true;
                }
                if self.lease.async_consent() {
                    break false;
                }
                tokio::select! {
                    r = rx.wait_for(|a| *a >= seq) => if r.is_ok() { break true },
                    _ = &mut consent => {}
                    _ = tokio::time::sleep_until(deadline) => {
                        self.stats.sync_refused.fetch_add(1, Ordering::Relaxed);
                        return Synced::Refused;
                    }
                }
            };
            if peer {
                return Synced::Peer;
            }
        }
        self.stats.sync_timeouts.fetch_add(1, Ordering::Relaxed);
        self.stats.degraded_upto.fetch_max(seq, Ordering::AcqRel);
        Synced::Alone
    }
}

/// How a sync-mode wait for the peer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// The peer has it.
    Peer,
    /// It stands on this copy alone (leases off, or the witness consented), reported as degraded.
    Alone,
    /// Neither the peer nor the witness's consent came in time: the host gets an error.
    Refused,
}
