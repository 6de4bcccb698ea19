//! Host access on a secondary while paired (issue 18, seed 004, `--secondary-access read-write`).
//!
//! - **Writes** (WRITE, WRITE_ZEROES, TRIM, FLUSH) go to the primary as `Peer.ForwardWrite`. The
//!   primary runs them through its own host path (`Volume::modify`: stripe locks, seq, journal,
//!   sync wait, lease), so they are ordered with its own writes and come back on the replication
//!   stream like them. It answers with the seq once it acknowledged the request; this secondary
//!   then waits until its own copy has applied that seq, and only then acknowledges its host.
//! - **Reads** are current: before reading its own copy, the secondary asks the primary for the
//!   last seq it assigned (a zero-length forwarded WRITE, the barrier) and waits until it has
//!   applied it. Every write acknowledged anywhere before the read began has a seq at most that, so
//!   the read never returns older data. Chosen over proxying the blocks (Peer.ReadBlocks): the
//!   barrier costs one small round trip and the bytes are read locally, so a backup or a reader
//!   on the secondary's node does not pull the volume over the link.
//! - **Refusals**: a secondary not connected to its primary, or whose copy is not consistent
//!   (resyncing, never filled), or fenced, refuses host I/O (EIO, a log line and
//!   `tandem_secondary_io_refused_total`); new sessions are refused at the handshake with the
//!   reason. A primary at another epoch refuses the forward (FAILED_PRECONDITION).
//!
//! Durability: a write acknowledged on the secondary was acknowledged by the primary first (its
//! lease held; in sync mode the secondary applied it before the primary answered) *and* is applied
//! on the secondary's own copy before the host hears of it (`wait_applied`). So if the primary
//! dies right after, the copy a takeover promotes (this one) holds it. A forwarded FLUSH flushes
//! the primary (sync mode: both copies durable) and then this copy's data file.
//! Test: `tests/secondary_access.rs` `a_forwarded_write_survives_the_primarys_death`.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use bytes::Bytes;
use tracing::warn;

use crate::{
    client::{channel, TokenInterceptor},
    meta::Role,
    pb::{self, ForwardOp},
    repl::tracker::Payload,
};

use super::{HostError, Volume};

/// What a secondary lets hosts do (`--secondary-access`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecondaryAccess {
    /// No host sessions on the secondary.
    #[default]
    None,
    /// Point-in-time views only: a snapshot taken on the secondary, opened as its snapshot export.
    ReadOnly,
    /// Read-write sessions: writes forwarded to the primary, current reads.
    ReadWrite,
}

type PeerClient = pb::peer_client::PeerClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, TokenInterceptor>,
>;

/// The secondary's client to its primary for forwarded requests.
pub struct Forwarder {
    peer: String,
    token: Option<String>,
    /// Bound of one forwarded request, and of the wait for the local copy to catch up with it
    /// (the proxy timeout: below a host's I/O timeout, so a host gets EIO rather than a hang).
    timeout: Duration,
    client: tokio::sync::Mutex<Option<PeerClient>>,
    /// Requests forwarded and acknowledged (counted on the secondary).
    pub forwarded: AtomicU64,
    /// Host requests refused on this secondary (not connected, not consistent, primary refused).
    pub refused: AtomicU64,
}

impl Forwarder {
    pub fn new(peer: String, token: Option<String>, timeout: Duration) -> Self {
        Self {
            peer,
            token,
            timeout,
            client: tokio::sync::Mutex::new(None),
            forwarded: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    async fn client(&self) -> Result<PeerClient, String> {
        let mut c = self.client.lock().await;
        if let Some(cl) = &*c {
            return Ok(cl.clone());
        }
        let ch = channel(&self.peer, self.timeout)
            .await
            .map_err(|e| format!("primary {} unreachable: {e}", self.peer))?;
        let interceptor =
            TokenInterceptor::new(self.token.as_deref()).map_err(|e| e.to_string())?;
        let cl = pb::peer_client::PeerClient::with_interceptor(ch, interceptor)
            .max_encoding_message_size(64 << 20);
        *c = Some(cl.clone());
        Ok(cl)
    }

    /// One forwarded request; the primary's seq for it.
    async fn call(&self, req: pb::ForwardWriteRequest) -> Result<u64, String> {
        let mut cl = self.client().await?;
        let mut r = tonic::Request::new(req);
        r.set_timeout(self.timeout);
        match tokio::time::timeout(self.timeout, cl.forward_write(r)).await {
            Ok(Ok(reply)) => Ok(reply.into_inner().seq),
            Ok(Err(s)) => {
                if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
                    *self.client.lock().await = None;
                }
                Err(format!("primary {} refused: {}", self.peer, s.message()))
            }
            Err(_) => Err(format!(
                "primary {} did not answer within {:?}",
                self.peer, self.timeout
            )),
        }
    }
}

impl Volume {
    /// Whether this secondary may serve a read-write host session right now, and why not.
    pub(crate) fn secondary_ready(&self) -> Result<(), HostError> {
        let role = self.role();
        if role != Role::Secondary || self.secondary_access != SecondaryAccess::ReadWrite {
            return Err(HostError::NotServing(role));
        }
        let why = match &self.repl {
            None => Some("it has no primary (not paired)"),
            Some(_) if self.areas.active() => Some("a takeover is in progress"),
            Some(r) if !r.connected() => Some("it is not connected to its primary"),
            Some(_) if self.replica().inconsistent() => {
                Some("its copy is not consistent (a resync or the first full copy is running)")
            }
            Some(_) => None,
        };
        match why {
            None => Ok(()),
            Some(w) => Err(HostError::Unavailable(format!(
                "this secondary serves no host I/O now: {w}"
            ))),
        }
    }

    /// Counts and logs a refused host request on this secondary.
    fn refused(&self, e: HostError) -> HostError {
        self.forward.refused.fetch_add(1, Ordering::Relaxed);
        warn!(volume = %self.name, error = %e, "host I/O on the secondary refused");
        e
    }

    /// Forwards one request to the primary and waits until this copy holds it.
    async fn forward(
        &self,
        op: ForwardOp,
        offset: u64,
        length: u64,
        data: Bytes,
    ) -> Result<u64, HostError> {
        self.secondary_ready().map_err(|e| self.refused(e))?;
        let req = pb::ForwardWriteRequest {
            volume: self.name.clone(),
            epoch: self.epoch(),
            op: op as i32,
            offset,
            length,
            data,
        };
        let seq = self
            .forward
            .call(req)
            .await
            .map_err(|e| self.refused(HostError::Unavailable(e)))?;
        self.wait_applied(seq).await.map_err(|e| self.refused(e))?;
        Ok(seq)
    }

    /// Waits until this copy has applied `seq`, while the link is up, at most the forward bound.
    async fn wait_applied(&self, seq: u64) -> Result<(), HostError> {
        let Some(r) = &self.repl else {
            return Err(HostError::Unavailable("not paired".into()));
        };
        let mut rx = self.applied.subscribe();
        // Registered before `connected` is read: a link going down in between still wakes us.
        let down = r.stats.link_down.notified();
        tokio::pin!(down);
        down.as_mut().enable();
        if *rx.borrow() >= seq {
            return Ok(());
        }
        if !r.connected() {
            return Err(HostError::Unavailable(format!(
                "the link to the primary went down before this copy applied seq {seq}"
            )));
        }
        tokio::select! {
            res = tokio::time::timeout(self.forward.timeout, rx.wait_for(|a| *a >= seq)) => {
                match res {
                    Ok(Ok(_)) => Ok(()),
                    _ => Err(HostError::Unavailable(format!(
                        "this copy did not apply seq {seq} within {:?}",
                        self.forward.timeout
                    ))),
                }
            }
            _ = &mut down => Err(HostError::Unavailable(format!(
                "the link to the primary went down before this copy applied seq {seq}"
            ))),
        }
    }

    /// A write, zeroing write or trim on a read-write secondary: forwarded.
    pub(super) async fn forward_modify(
        &self,
        offset: u64,
        payload: Payload,
        trim: bool,
    ) -> Result<u64, HostError> {
        let (op, len, data) = match payload {
            Payload::Data(d) => (ForwardOp::Write, d.len() as u64, d),
            Payload::Zero(n) if trim => (ForwardOp::Trim, n, Bytes::new()),
            Payload::Zero(n) => (ForwardOp::Zero, n, Bytes::new()),
        };
        let seq = self.forward(op, offset, len, data).await?;
        self.forward.forwarded.fetch_add(1, Ordering::Relaxed);
        Ok(seq)
    }

    /// A FLUSH on a read-write secondary: the primary flushes (in sync mode both copies are then
    /// durable), this copy catches up with everything the primary had acknowledged, then syncs
    /// its own data file too.
    pub(super) async fn forward_flush(&self) -> Result<(), HostError> {
        self.forward(ForwardOp::Flush, 0, 0, Bytes::new()).await?;
        let _gate = self.gate.read().await;
        self.secondary_ready().map_err(|e| self.refused(e))?;
        self.store.sync_async().await?;
        Ok(())
    }

    /// A current read on a read-write secondary (see the module comment: the barrier).
    pub(super) async fn read_current(&self, offset: u64, len: u32) -> Result<Vec<u8>, HostError> {
        // A zero-length WRITE writes nothing and answers the primary's last seq: the barrier.
        self.forward(ForwardOp::Write, 0, 0, Bytes::new()).await?;
        let _gate = self.gate.read().await;
        self.secondary_ready().map_err(|e| self.refused(e))?;
        let mut buf = vec![0u8; len as usize];
        self.store.read_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// The primary's side of `Peer.ForwardWrite`: the request runs through this engine's own host
    /// path. Refused unless this engine is the paired primary at the caller's epoch, its secondary
    /// is attached (the stream is up) and no takeover is in progress.
    pub async fn answer_forward(
        &self,
        r: pb::ForwardWriteRequest,
    ) -> Result<u64, crate::error::EngineError> {
        use crate::error::EngineError as E;
        let Some(repl) = &self.repl else {
            return Err(E::NotPaired("forwarded writes need a paired primary"));
        };
        if self.role() != Role::Primary {
            return Err(E::WrongRole(format!(
                "volume {:?} is {} here: forwarded writes go to the primary",
                self.name,
                self.role()
            )));
        }
        let epoch = self.epoch();
        if r.epoch != epoch {
            return Err(E::StaleEpoch(format!(
                "forwarded write at epoch {}, this primary is at epoch {epoch}; nothing written",
                r.epoch
            )));
        }
        if self.areas.active() {
            return Err(E::TakeoverInProgress(
                "this primary is draining or merging after a takeover".into(),
            ));
        }
        if !repl.connected() {
            return Err(E::WrongRole(
                "the caller is not this primary's attached secondary (no replication stream)"
                    .into(),
            ));
        }
        let op = ForwardOp::try_from(r.op)
            .map_err(|_| E::InvalidArgument(format!("unknown forwarded op {}", r.op)))?;
        let in_range = r
            .offset
            .checked_add(r.length)
            .is_some_and(|end| end <= self.size());
        if op != ForwardOp::Flush && !in_range {
            return Err(E::InvalidArgument(format!(
                "forwarded range {}+{} is past the end ({} bytes)",
                r.offset,
                r.length,
                self.size()
            )));
        }
        let host = |e: HostError| match e {
            HostError::Io(e) => E::Io(e.to_string()),
            e => E::PeerUnreachable(format!("the primary did not acknowledge: {e}")),
        };
        match op {
            ForwardOp::Write if r.length == 0 && r.data.is_empty() => {
                // The barrier: nothing written; every write acknowledged so far has a seq <= this.
                Ok(repl.tracker.counts().last_seq)
            }
            ForwardOp::Write => {
                if r.data.len() as u64 != r.length {
                    return Err(E::InvalidArgument(format!(
                        "forwarded write of {} bytes carries {}",
                        r.length,
                        r.data.len()
                    )));
                }
                let seq = self
                    .modify(r.offset, Payload::Data(r.data), false)
                    .await
                    .map_err(host)?;
                self.counters
                    .bytes_written
                    .fetch_add(r.length, Ordering::Relaxed);
                Ok(seq)
            }
            ForwardOp::Zero | ForwardOp::Trim if r.length == 0 => {
                Ok(repl.tracker.counts().last_seq)
            }
            ForwardOp::Zero => self
                .modify(r.offset, Payload::Zero(r.length), false)
                .await
                .map_err(host),
            ForwardOp::Trim => self
                .modify(r.offset, Payload::Zero(r.length), false)
                .await
                .map_err(host),
            ForwardOp::Flush => {
                // Taken first: the flush covers every write acknowledged before it was asked.
                let seq = repl.tracker.counts().last_seq;
                self.flush().await.map_err(host)?;
                Ok(seq)
            }
            ForwardOp::Unspecified => Err(E::InvalidArgument("forwarded op unspecified".into())),
        }
    }
}
