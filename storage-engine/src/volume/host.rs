//! The host I/O path: what an NBD session may do, and one path for every request that changes
//! blocks (write, zeroing write, trim), plain or routed through the takeover areas.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;

use crate::{
    meta::Role,
    nbd::proto as nbd,
    pb,
    repl::{tracker::Payload, Mode, Synced},
};

use super::{forward::SecondaryAccess, Volume};

/// Why a host request failed; each maps to one NBD errno.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("volume is {0} on this engine")]
    NotServing(Role),
    #[error("proxied read from the old primary failed: {0}")]
    Proxy(String),
    /// A paired primary without a write lease (or, sync mode, without the peer's acknowledgement
    /// and the witness's consent): the request is not acknowledged. What it wrote locally stays
    /// in the differential table, like any unacknowledged write.
    #[error("not acknowledged: {0}")]
    NoLease(&'static str),
    /// A read-write secondary that cannot serve now (not connected, not consistent, the primary
    /// refused or did not answer): the host gets EIO (`volume/forward.rs`).
    #[error("{0}")]
    Unavailable(String),
    /// A read-only secondary serves point-in-time views only, never its live copy.
    #[error(
        "this secondary serves point-in-time views only (--secondary-access read-only): take a \
         snapshot on it (CreateSnapshot) and open <volume>@snapshot/<id>"
    )]
    ViewsOnly,
}

impl HostError {
    pub fn errno(&self) -> u32 {
        match self {
            HostError::Io(e) if e.raw_os_error() == Some(28) => nbd::ENOSPC,
            HostError::Io(_)
            | HostError::Proxy(_)
            | HostError::NoLease(_)
            | HostError::Unavailable(_) => nbd::EIO,
            HostError::NotServing(_) | HostError::ViewsOnly => nbd::EPERM,
        }
    }
}

/// Counters reported by `status` and the metrics endpoint.
#[derive(Debug, Default)]
pub struct Counters {
    pub nbd_connections: AtomicU64,
    /// NBD connections closed at accept: the cap was reached and none was still in handshake.
    pub nbd_refused: AtomicU64,
    /// NBD connections still in handshake closed to make room for a newcomer at the cap.
    pub nbd_evicted: AtomicU64,
    /// NBD connections closed for not finishing the handshake in time.
    pub nbd_handshake_timeouts: AtomicU64,
    /// Failed NBD accepts (descriptors or memory exhausted) that paused the listeners.
    pub nbd_accept_errors: AtomicU64,
    /// What the gRPC acceptor turned away (refused, evicted, timed out, failed accepts).
    pub grpc: std::sync::Arc<tandem_api::tls::server::AcceptStats>,
    /// Latency histograms and error counters fed by the request paths (metrics endpoint).
    pub instruments: crate::metrics::Instruments,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub flushes: AtomicU64,
    /// Grows carried out (`Engine.Resize`, `Peer.Resize`, a restart with a larger `--size`).
    pub resizes: AtomicU64,
    /// Changes to cold extents the NBD server runs on blocking threads now (a gauge, capped by
    /// `nbd::server::COLD_DISPATCH_MAX`).
    pub cold_dispatched: AtomicU64,
}

/// What an NBD export name asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportName {
    Ok,
    Unknown,
    /// `<volume>@<epoch>` of an older (or other) epoch: a session from before a takeover.
    StaleEpoch(u64),
}

impl Volume {
    /// Whether host I/O is allowed right now, and why not.
    pub fn check_serving(&self) -> Result<(), HostError> {
        match self.role() {
            Role::Primary => Ok(()),
            r => Err(HostError::NotServing(r)),
        }
    }

    /// Whether a read can run inline on the connection's reader (no network wait).
    pub fn read_is_quick(&self, _offset: u64, _len: u32) -> bool {
        // A secondary's read waits for the primary's barrier.
        !self.areas.active() && self.role() == Role::Primary
    }

    /// Whether a change to `len` bytes at `offset` would wait for the write-intent log's
    /// fdatasync: an extent not hot yet, or one whose record no sync has covered yet. The NBD
    /// server runs such a change on a blocking thread (`nbd::server::serve_requests`).
    pub fn write_waits_for_intent(&self, offset: u64, len: u64) -> bool {
        match &self.repl {
            Some(r) if len > 0 && !self.areas.active() => r
                .tracker
                .waits_for_intent(crate::geometry::blocks_of(offset, len)),
            _ => false,
        }
    }

    /// Whether a plain write completes without waiting for the peer or for a lease. A write that may
    /// wait must not run inline on the connection's reader: the replies of earlier writes sit in the
    /// connection's buffer until the reader is idle, so a wait there would send them late, possibly
    /// after the lease that vouched for them ran out (the partition campaign's `AckAfterLease`). So a
    /// write runs inline only while the lease has room left for it (100 ms, far more than a quick write
    /// takes).
    pub fn write_is_quick(&self) -> bool {
        !self.areas.active()
            && self.role() == Role::Primary
            && match &self.repl {
                None => true,
                Some(r) => {
                    r.mode != Mode::Sync
                        && (!r.lease.enabled()
                            || r.lease.remaining() > std::time::Duration::from_millis(100))
                }
            }
    }

    /// Whether a host session on the volume's export may open now; `Ok(true)` would mean
    /// read-only. A read-write secondary opens read-write sessions only while connected to its
    /// primary with a consistent copy; a read-only secondary opens none on its live copy (which
    /// changes under the reader and may be stale): it serves point-in-time views, its snapshot
    /// exports (issue 18).
    pub fn host_access(&self) -> Result<bool, HostError> {
        match (self.role(), self.secondary_access) {
            (Role::Primary, _) => Ok(false),
            (Role::Secondary, SecondaryAccess::ReadWrite) => self.secondary_ready().map(|()| false),
            (Role::Secondary, SecondaryAccess::ReadOnly) => Err(HostError::ViewsOnly),
            (r, _) => Err(HostError::NotServing(r)),
        }
    }

    /// Export names: `""` or `<volume>` (whatever the epoch), or `<volume>@<epoch>`, which opens only
    /// while the volume is at that epoch. An attachment pinned to an epoch can never write into a
    /// later one, even if this engine serves again after a failback (a stale mount stays fenced).
    pub fn export_access(&self, name: &str) -> ExportName {
        if name.is_empty() || name == self.name {
            return ExportName::Ok;
        }
        match name.rsplit_once('@') {
            Some((v, e)) if v == self.name => match e.parse::<u64>() {
                Ok(e) if e == self.epoch() => ExportName::Ok,
                Ok(e) => ExportName::StaleEpoch(e),
                Err(_) => ExportName::Unknown,
            },
            _ => ExportName::Unknown,
        }
    }

    /// A host session is opening (NBD OPT_GO): with implicit takeover, a secondary takes over
    /// first (the handoff, then the session), as the patent's variant S:L279 allows.
    pub async fn open_session(&self) -> Result<bool, HostError> {
        if self.implicit_takeover && self.role() == Role::Secondary {
            let req = pb::TakeoverRequest {
                volume: self.name.clone(),
                ..Default::default()
            };
            if let Err(e) = self.takeover(req).await {
                tracing::warn!(error = %e, "implicit takeover failed");
            }
        }
        self.host_access()
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, HostError> {
        if self.role() == Role::Secondary {
            let buf = self.read_current(offset, len).await?;
            self.counters
                .bytes_read
                .fetch_add(u64::from(len), Ordering::Relaxed);
            return Ok(buf);
        }
        let _gate = self.gate.read().await;
        self.host_access()?;
        if self.areas.active() {
            let buf = self.read_routed(offset, len).await?;
            self.counters
                .bytes_read
                .fetch_add(u64::from(len), Ordering::Relaxed);
            return Ok(buf);
        }
        let buf = self.store.read_vec(len as usize, offset)?;
        self.counters
            .bytes_read
            .fetch_add(u64::from(len), Ordering::Relaxed);
        Ok(buf)
    }

    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), HostError> {
        let len = data.len() as u64;
        let payload = Payload::Data(Bytes::from(data));
        if self.role() == Role::Secondary {
            self.forward_modify(offset, payload, false).await?;
        } else {
            self.modify(offset, payload, false).await?;
        }
        self.counters
            .bytes_written
            .fetch_add(len, Ordering::Relaxed);
        self.after(fua).await
    }

    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), HostError> {
        if self.role() == Role::Secondary {
            self.forward_modify(offset, Payload::Zero(len), true)
                .await?;
        } else {
            self.modify(offset, Payload::Zero(len), false).await?;
        }
        self.after(fua).await
    }

    /// `no_hole`: the range stays allocated (zeros written), else it may be punched.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), HostError> {
        if self.role() == Role::Secondary {
            self.forward_modify(offset, Payload::Zero(len), false)
                .await?;
        } else {
            self.modify(offset, Payload::Zero(len), no_hole).await?;
        }
        self.counters
            .bytes_written
            .fetch_add(len, Ordering::Relaxed);
        self.after(fua).await
    }

    /// The one path of every request that changes blocks: under the gate (shared), to the overlay
    /// while a takeover is in progress, else through the tracker (journal and table) into the data
    /// file; then, in sync mode, wait for the peer. Zeroing is replicated as a zero record, so both
    /// sides read zeros. Returns the write's seq (0 unpaired): a forwarded write answers it.
    pub(super) async fn modify(
        &self,
        offset: u64,
        payload: Payload,
        keep_allocated: bool,
    ) -> Result<u64, HostError> {
        let gate = self.gate.read().await;
        self.check_serving()?;
        let apply = |p: &Payload| match p {
            Payload::Data(d) => self.store.write_at(d, offset),
            Payload::Zero(len) if keep_allocated => self.store.zero_range(offset, *len),
            Payload::Zero(len) => self.store.punch_hole(offset, *len),
        };
        let Some(r) = &self.repl else {
            apply(&payload)?;
            return Ok(0);
        };
        let len = match &payload {
            Payload::Data(d) => d.len() as u64,
            Payload::Zero(n) => *n,
        };
        let seq = if self.areas.active() {
            self.write_routed(offset, payload, keep_allocated).await?
        } else {
            r.tracker
                .write(offset, payload.clone(), || apply(&payload))?
        };
        r.wake.notify_one();
        // The waits below run outside the gate: a fence need not wait for a peer or a witness
        // that may never answer. The write is in the table either way, so a handoff carries it.
        drop(gate);
        if r.mode == Mode::Sync && r.wait_acked(seq).await == Synced::Refused {
            return Err(HostError::NoLease(
                "sync mode: the peer did not acknowledge and the witness did not consent",
            ));
        }
        if r.mode == Mode::Sync {
            self.wait_moved(r, crate::geometry::blocks_of(offset, len), seq)
                .await;
        }
        self.leased(r).await?;
        Ok(seq)
    }

    /// Sync mode during a live move: a write below the copy's watermark waits for the new engine
    /// too (its durable image), at most `--sync-timeout-ms`. The old secondary stays the
    /// authoritative copy until the cutover, and the cutover waits for every owed block, so a
    /// miss here only means the write reaches the new engine later.
    async fn wait_moved(&self, r: &crate::repl::Repl, blocks: std::ops::Range<u64>, seq: u64) {
        if r.tracker.move_watermark().is_none() {
            return;
        }
        self.mover.poke();
        let deadline = tokio::time::Instant::now() + r.sync_timeout;
        loop {
            let acked = r.tracker.move_acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            if !r.tracker.move_owes(blocks.clone(), seq) {
                return;
            }
            tokio::select! {
                _ = &mut acked => {}
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// The last check before a change is acknowledged: a paired primary must hold its write lease
    /// (`crate::lease`). Without one it waits for a renewal, at most the lease wait bound, then
    /// refuses. Invariant: no host write or flush is acknowledged by a primary whose lease ran
    /// out, so a peer promoted by force after the lease's guard never misses an acknowledged
    /// write. Test: `tests/lease.rs` `a_partitioned_primary_stops_acknowledging_when_its_lease_runs_out`.
    async fn leased(&self, r: &crate::repl::Repl) -> Result<(), HostError> {
        if r.lease.held() || r.lease.wait_held().await {
            return Ok(());
        }
        r.stats.lease_refused.fetch_add(1, Ordering::Relaxed);
        Err(HostError::NoLease("this primary holds no write lease"))
    }

    /// FUA: the request is durable before it is acknowledged (outside the gate: `flush` takes it).
    async fn after(&self, fua: bool) -> Result<(), HostError> {
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes every write completed so far durable.
    pub async fn flush(&self) -> Result<(), HostError> {
        if self.role() == Role::Secondary {
            self.forward_flush().await?;
            self.counters.flushes.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let gate = self.gate.read().await;
        self.host_access()?;
        self.store.sync_async().await?;
        if self.areas.active() {
            // A host FLUSH covers writes routed to the overlay too: their data, then their bits.
            self.persist_areas()?;
        }
        drop(gate);
        if let Some(r) = &self.repl {
            if self.role() == Role::Primary {
                if r.mode == Mode::Sync {
                    // Sync mode: a flush makes the writes durable on both sides.
                    let last = r.tracker.counts().last_seq;
                    if r.wait_durable(last).await == Synced::Refused {
                        return Err(HostError::NoLease(
                            "sync mode: the peer did not make the writes durable and the witness did not consent",
                        ));
                    }
                }
                self.leased(r).await?;
            }
        }
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
