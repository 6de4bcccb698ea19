//! The gRPC side of the engine (`tandem.engine.v1`): token check, request checks, and the
//! control service. Errors map to gRPC codes in one place (`From<ApiError> for Status`).

use std::sync::{atomic::Ordering, Arc};

use tandem_api::{
    pb::{PairState, TakeoverPhase},
    Reason,
};
use tonic::{Code, Request, Response, Status};

use crate::{
    authz::{Authz, Call},
    geometry::BLOCK_SIZE,
    meta::Role,
    pb::{self, engine_server::Engine},
    state::{EngineState, Standing},
    volume::Volume,
};

/// Checks `authorization: Bearer <token>` against the volume token, in constant time.
#[derive(Clone)]
pub struct AuthInterceptor {
    token: Option<Arc<str>>,
}

impl AuthInterceptor {
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.map(|t| Arc::from(t.trim())),
        }
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(given.trim().as_bytes(), expected.as_bytes()) {
            Ok(req)
        } else {
            Err(Reason::Unauthenticated
                .status(Code::Unauthenticated, "missing or wrong volume token"))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Errors of the engine API, mapped once to gRPC codes and reasons.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("unknown volume {0:?}")]
    UnknownVolume(String),
    #[error("{1}")]
    Precondition(Reason, String),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match &e {
            ApiError::UnknownVolume(_) => {
                Reason::UnknownVolume.status(Code::NotFound, e.to_string())
            }
            ApiError::Precondition(r, _) => r.status(Code::FailedPrecondition, e.to_string()),
        }
    }
}

/// A point-in-time view (issue 18) is a snapshot the CSI node plugin may take and release.
fn snapshot_call(id: &str) -> Call {
    if id.starts_with(tandem_api::contract::VIEW_SNAPSHOT_PREFIX) {
        Call::View
    } else {
        Call::Snapshot
    }
}

/// Snapshot errors: a bad id is INVALID_ARGUMENT, a secondary WrongRole, a takeover in progress
/// a retryable FAILED_PRECONDITION (`Superseded`), the engine's own I/O INTERNAL.
fn snap_status(e: crate::volume::SnapError) -> Status {
    use crate::volume::SnapError;
    match &e {
        SnapError::Invalid(_) => {
            Reason::InvalidArgument.status(Code::InvalidArgument, e.to_string())
        }
        SnapError::WrongRole(_) => {
            Reason::WrongRole.status(Code::FailedPrecondition, e.to_string())
        }
        SnapError::Busy(_) => Reason::Superseded.status(Code::FailedPrecondition, e.to_string()),
        SnapError::Io(_) => Reason::Internal.status(Code::Internal, e.to_string()),
    }
}

/// The control service for the one volume this engine serves.
pub struct EngineService {
    volume: Arc<Volume>,
    fault_injection: bool,
    authz: Authz,
}

impl EngineService {
    /// Counts a takeover or failback for the metrics, with its ready time when it promoted this
    /// engine (an idempotent repeat promoted nothing).
    fn count_takeover<E>(&self, kind: &'static str, res: &Result<pb::TakeoverReply, E>) {
        let ready = match res {
            Ok(r) if !r.already_primary => Some(std::time::Duration::from_millis(r.ready_ms)),
            _ => None,
        };
        self.volume
            .counters
            .instruments
            .takeover(kind, ready, res.is_ok());
    }

    pub fn new(volume: Arc<Volume>, fault_injection: bool, authz: Authz) -> Self {
        Self {
            volume,
            fault_injection,
            authz,
        }
    }

    fn check_volume(&self, name: &str) -> Result<(), ApiError> {
        if name == self.volume.name() {
            Ok(())
        } else {
            Err(ApiError::UnknownVolume(name.to_string()))
        }
    }
}

/// The status of a volume as this engine sees it.
pub fn status_of(v: &Volume) -> pb::StatusReply {
    let c = &v.counters;
    let state = v.state();
    let mut reply = pb::StatusReply {
        volume: v.name().to_string(),
        role: pb::Role::from(state.role) as i32,
        epoch: state.epoch,
        size: v.size(),
        block_size: BLOCK_SIZE,
        nbd_connections: c.nbd_connections.load(Ordering::Relaxed),
        bytes_read: c.bytes_read.load(Ordering::Relaxed),
        bytes_written: c.bytes_written.load(Ordering::Relaxed),
        flushes: c.flushes.load(Ordering::Relaxed),
        pair: pair_state(v, &state) as i32,
        events: v.areas.events(),
        takeover: match state.takeover_phase() {
            Some(crate::state::TakeoverPhase::Fenced) => TakeoverPhase::Fenced,
            Some(crate::state::TakeoverPhase::Draining) => TakeoverPhase::Draining,
            Some(crate::state::TakeoverPhase::Merging) => TakeoverPhase::Merging,
            None => TakeoverPhase::None,
        } as i32,
        ..Default::default()
    };
    let (reason, condition) = if v.store.failed() || v.areas.overlay.failed() {
        // Also "Degraded" to the operator; the host already gets EIO.
        (
            Some(Reason::Degraded),
            "Degraded: Failed: an fdatasync of the volume's files failed; writes since the last \
             good one may be lost, so every request fails until the engine restarts"
                .to_string(),
        )
    } else {
        v.areas.condition()
    };
    reply.condition = condition;
    reply.condition_reason = reason.map(|r| r.as_str().to_string()).unwrap_or_default();
    let (proxied, proxy_errors) = v.proxied();
    reply.proxied_reads = proxied;
    reply.proxied_read_errors = proxy_errors;
    {
        let m = v.meta();
        reply.lost_blocks = m.takeover.lost_blocks;
        reply.lost_seq_from = m.takeover.lost_seq_from;
        reply.lost_seq_to = m.takeover.lost_seq_to;
    }
    if let Some(l) = v.losses.latest() {
        reply.exported_lost_blocks = l.blocks;
        reply.lost_export = l.dir.display().to_string();
    }
    {
        let st = v.areas.state();
        reply.overlay_blocks = st.present_count();
        if state.role == Role::Primary {
            reply.peer_pending_blocks = st.pending_count();
        }
    }
    if state.role != Role::Primary {
        let rs = v.replica();
        reply.applied_seq = rs.applied_seq;
        reply.last_seq = rs.peer_last_seq;
        reply.resync_progress = if rs.inconsistent() { 0.0 } else { 1.0 };
        if state.role == Role::Secondary {
            reply.peer_pending_blocks = rs.peer_pending.as_ref().map_or(0, |b| b.count());
            reply.peer_backlog_blocks = reply.peer_pending_blocks;
        }
    }
    reply.clock_us = crate::lease::mono_us();
    let Some(r) = &v.repl else { return reply };
    reply.lease_ms = r.lease.lease_ms();
    reply.instance = r.lease.instance();
    if state.role == Role::Primary {
        reply.lease_remaining_ms = r.lease.remaining().as_millis() as u64;
        reply.sync_fallback = r.lease.async_consent();
    } else {
        reply.promise_remaining_ms = r.lease.promise_remaining().as_millis() as u64;
    }
    reply.peer = r.peer();
    reply.peer_connected = r.connected();
    reply.sync_degraded = r.stats.degraded();
    reply.sync_timeouts = r.stats.sync_timeouts.load(Ordering::Relaxed);
    if reply.sync_degraded && reply.condition.is_empty() {
        // The operator reads the reason Degraded as Degraded=True.
        reply.condition_reason = Reason::Degraded.as_str().to_string();
        reply.condition = format!(
            "Degraded: sync-mode writes stand on this copy alone ({}; {} waits without the peer's ack)",
            if reply.peer_connected {
                "the peer is catching up"
            } else {
                "the peer is unreachable"
            },
            reply.sync_timeouts
        );
    }
    reply.bytes_replicated = r.stats.bytes_replicated.load(Ordering::Relaxed);
    reply.bytes_resynced = r.stats.bytes_resynced.load(Ordering::Relaxed);
    if state.role != Role::Secondary {
        let t = r.tracker.counts();
        reply.pending_blocks = t.pending_blocks;
        reply.pending_bytes = t.pending_blocks * u64::from(BLOCK_SIZE);
        reply.journal_bytes = t.journal_bytes;
        reply.last_seq = t.last_seq;
        reply.applied_seq = t.acked_seq;
        reply.lag_seconds = r.tracker.lag_seconds();
        let total = r.stats.resync_total.load(Ordering::Relaxed);
        let done = r.stats.resync_done.load(Ordering::Relaxed);
        reply.resync_progress = if total == 0 {
            1.0
        } else {
            (done.min(total) as f64) / total as f64
        };
    }
    reply
}

/// One word for the pair: Standalone, Connecting, Resyncing, Replicating, Synced, Reversing
/// (primary); Inconsistent or Consistent (secondary); Fenced.
pub fn pair_state(v: &Volume, state: &EngineState) -> PairState {
    match (state.role, state.standing) {
        (Role::Fenced, _) => return PairState::Fenced,
        (Role::Secondary, Standing::Consistent) => return PairState::Consistent,
        (Role::Secondary, _) => return PairState::Inconsistent,
        (Role::Primary, _) => {}
    }
    let Some(r) = &v.repl else {
        return PairState::Standalone;
    };
    if v.meta().takeover.reversing && !state.routed() {
        return PairState::Reversing;
    }
    if !r.connected() {
        return PairState::Connecting;
    }
    if r.stats.resyncing.load(Ordering::Relaxed) || r.tracker.resync_needed() {
        return PairState::Resyncing;
    }
    if r.tracker.counts().pending_blocks > 0 {
        PairState::Replicating
    } else {
        PairState::Synced
    }
}

/// A takeover is a Wait only when it says so exactly; any other value counts as Force for the
/// rights (the handoff treats unknown values as Wait, so this is the stricter reading).
fn takeover_call(req: &pb::TakeoverRequest) -> Call {
    if req.policy == pb::TakeoverPolicy::Wait as i32 {
        Call::Takeover(pb::TakeoverPolicy::Wait)
    } else {
        Call::Takeover(pb::TakeoverPolicy::Force)
    }
}

#[tonic::async_trait]
impl Engine for EngineService {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        self.authz.check(req.extensions(), Call::Status)?;
        self.check_volume(&req.get_ref().volume)?;
        Ok(Response::new(status_of(&self.volume)))
    }

    async fn takeover(
        &self,
        req: Request<pb::TakeoverRequest>,
    ) -> Result<Response<pb::TakeoverReply>, Status> {
        self.authz
            .check(req.extensions(), takeover_call(req.get_ref()))?;
        self.check_volume(&req.get_ref().volume)?;
        let res = self.volume.takeover(req.into_inner()).await;
        self.count_takeover("takeover", &res);
        res.map(Response::new).map_err(Status::from)
    }

    async fn failback(
        &self,
        req: Request<pb::TakeoverRequest>,
    ) -> Result<Response<pb::TakeoverReply>, Status> {
        self.authz.check(req.extensions(), Call::Failback)?;
        self.check_volume(&req.get_ref().volume)?;
        // Failback is a takeover in the other direction (see takeover::handoff).
        let res = self.volume.takeover(req.into_inner()).await;
        self.count_takeover("failback", &res);
        res.map(Response::new).map_err(Status::from)
    }

    async fn grant_lease(
        &self,
        req: Request<pb::GrantLeaseRequest>,
    ) -> Result<Response<pb::GrantLeaseReply>, Status> {
        self.authz.check(req.extensions(), Call::GrantLease)?;
        self.check_volume(&req.get_ref().volume)?;
        self.volume
            .grant_lease(req.get_ref())
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn resize(
        &self,
        req: Request<pb::ResizeRequest>,
    ) -> Result<Response<pb::ResizeReply>, Status> {
        self.authz.check(req.extensions(), Call::Resize)?;
        self.check_volume(&req.get_ref().volume)?;
        self.volume
            .resize(req.get_ref())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        self.authz
            .check(req.extensions(), snapshot_call(&req.get_ref().id))?;
        self.check_volume(&req.get_ref().volume)?;
        self.volume
            .create_snapshot(&req.get_ref().id)
            .await
            .map(|s| Response::new(s.info()))
            .map_err(snap_status)
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotReply>, Status> {
        self.authz
            .check(req.extensions(), snapshot_call(&req.get_ref().id))?;
        self.check_volume(&req.get_ref().volume)?;
        self.volume
            .delete_snapshot(&req.get_ref().id)
            .await
            .map(|deleted| Response::new(pb::DeleteSnapshotReply { deleted }))
            .map_err(snap_status)
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsReply>, Status> {
        self.authz.check(req.extensions(), Call::Snapshot)?;
        self.check_volume(&req.get_ref().volume)?;
        let snapshots = self
            .volume
            .list_snapshots()
            .iter()
            .map(|s| s.info())
            .collect();
        Ok(Response::new(pb::ListSnapshotsReply { snapshots }))
    }

    // Live move of the secondary (issue 18): `crate::repl::mover`.
    async fn start_move(
        &self,
        req: Request<pb::StartMoveRequest>,
    ) -> Result<Response<pb::MoveStatus>, Status> {
        self.authz.check(req.extensions(), Call::Move)?;
        let r = req.into_inner();
        self.check_volume(&r.volume)?;
        let s = crate::repl::mover::start(&self.volume, &r.to).await?;
        Ok(Response::new(s))
    }

    async fn get_move(
        &self,
        req: Request<pb::GetMoveRequest>,
    ) -> Result<Response<pb::MoveStatus>, Status> {
        self.authz.check(req.extensions(), Call::Move)?;
        self.check_volume(&req.get_ref().volume)?;
        Ok(Response::new(crate::repl::mover::status(&self.volume)))
    }

    async fn abort_move(
        &self,
        req: Request<pb::GetMoveRequest>,
    ) -> Result<Response<pb::MoveStatus>, Status> {
        self.authz.check(req.extensions(), Call::Move)?;
        self.check_volume(&req.get_ref().volume)?;
        let s = crate::repl::mover::abort(&self.volume, "aborted by AbortMove").await?;
        Ok(Response::new(s))
    }

    async fn inject_fault(
        &self,
        req: Request<pb::FaultRequest>,
    ) -> Result<Response<pb::FaultReply>, Status> {
        self.authz.check(req.extensions(), Call::InjectFault)?;
        let f = req.into_inner();
        self.check_volume(&f.volume)?;
        if !self.fault_injection {
            return Err(ApiError::Precondition(
                Reason::FaultInjectionOff,
                "fault injection is off (start the engine with --fault-injection)".into(),
            )
            .into());
        }
        let Some(r) = &self.volume.repl else {
            return Err(
                ApiError::Precondition(Reason::NotPaired, "volume is not paired".into()).into(),
            );
        };
        let faults = &r.faults;
        if let Some(p) = f.pause {
            faults.paused.store(p, Ordering::Relaxed);
        }
        if let Some(h) = f.hold_acks {
            faults.hold_acks.store(h, Ordering::Relaxed);
        }
        if let Some(rate) = f.rate_bytes_per_sec {
            faults.rate.store(rate, Ordering::Relaxed);
        }
        if let Some(o) = f.rate_records_only {
            faults.rate_records_only.store(o, Ordering::Relaxed);
        }
        if let Some(p) = f.pause_merge {
            self.volume.areas.merge_paused.store(p, Ordering::Relaxed);
        }
        if f.drop_link {
            faults.drop_epoch.fetch_add(1, Ordering::Relaxed);
        }
        faults.changed.notify_waiters();
        r.wake.notify_one();
        Ok(Response::new(pb::FaultReply {
            paused: faults.paused.load(Ordering::Relaxed),
            holding_acks: faults.hold_acks.load(Ordering::Relaxed),
            rate_bytes_per_sec: faults.rate.load(Ordering::Relaxed),
            rate_records_only: faults.rate_records_only.load(Ordering::Relaxed),
        }))
    }
}
