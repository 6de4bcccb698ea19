//! Replication between the two engines of a volume (the patent's first processing, claim 7 order):
//! `tracker` is the primary's differential table and journal, `sender` streams them to the peer,
//! `receiver` applies the stream on the secondary and acknowledges what is durable.

pub mod drain;
pub mod receiver;
pub mod sender;
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
    pub drop_epoch: AtomicU64,
    pub changed: Notify,
}

/// Counters and flags the status and metrics report.
#[derive(Debug, Default)]
pub struct ReplStats {
    pub connected: AtomicBool,
    pub resyncing: AtomicBool,
    pub bytes_replicated: AtomicU64,
    pub bytes_resynced: AtomicU64,
    pub resync_total: AtomicU64,
    pub resync_done: AtomicU64,
    pub stale_rejected: AtomicU64,
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
    pub peer: String,
    pub token: Option<String>,
    pub mode: Mode,
    pub sync_timeout: Duration,
    /// A sync-mode host FLUSH waits for the peer's stable storage: the sender asks it to sync now.
    pub flush_wanted: std::sync::atomic::AtomicBool,
    /// Blocks a proxied read asked for: a draining engine sends them first.
    pub priority: std::sync::Mutex<std::collections::VecDeque<u64>>,
}

impl Repl {
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
        self.stats.connected.load(Ordering::Relaxed)
    }

    /// Waits until the peer acknowledged `seq`, unless the link is down or the wait times out
    /// (then the write stands on the local copy and the pair reports Degraded).
    pub async fn wait_acked(&self, seq: u64) -> bool {
        self.wait_on(&self.acked, seq).await
    }

    /// Asks the peer to make `seq` durable now and waits until it has (sync-mode FLUSH and FUA).
    pub async fn wait_durable(&self, seq: u64) -> bool {
        self.flush_wanted.store(true, Ordering::Release);
        self.wake.notify_one();
        self.wait_on(&self.durable, seq).await
    }

    async fn wait_on(&self, w: &watch::Sender<u64>, seq: u64) -> bool {
        if !self.connected() {
            return false;
        }
        let mut rx = w.subscribe();
        tokio::time::timeout(self.sync_timeout, rx.wait_for(|a| *a >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}
