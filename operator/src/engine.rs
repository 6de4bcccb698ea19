//! The operator's view of the engine API (`tandem.engine.v1`): a small trait with the two calls the
//! operator needs, a real implementation over `tandem_api::client::EngineClient`, and (in tests) a fake.
//!
//! Keeping the trait this narrow lets the reconciler be tested without engines, and keeps prost types out of
//! the operator.

use std::time::Duration;

use futures::future::BoxFuture;
use tandem_api::client::{ClientError, EngineClient, PairState, TakeoverPhase, TakeoverPolicy};
use tandem_api::Reason;

use crate::crd::{EngineRole, FailoverPolicy};

/// Where and how to reach one engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineTarget {
    /// gRPC address, `host:port`.
    pub address: String,
    /// Engine volume name (the export name).
    pub volume: String,
    /// The volume token, when known.
    pub token: Option<String>,
}

/// What the operator uses from an engine's `Status` reply.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct EngineState {
    pub role: Option<EngineRole>,
    pub epoch: u64,
    /// The engine's pair state (`Synced`, `Resyncing`, ...).
    pub pair_state: PairState,
    pub peer_connected: bool,
    pub pending_blocks: u64,
    pub pending_bytes: u64,
    pub lag_seconds: f64,
    pub resync_progress: f64,
    /// Takeover progress: `Draining` / `Merging` on the new primary while the old one drains and the
    /// overlay merges, `Fenced` on the old primary while it drains, `None` otherwise.
    pub takeover_phase: TakeoverPhase,
    pub peer_pending_blocks: u64,
    /// Blocks in the takeover overlay not yet merged into the data file.
    pub overlay_blocks: u64,
    pub proxied_reads: u64,
    /// Blocks a forced promotion of this engine lost (0 after a clean handoff).
    pub lost_blocks: u64,
    /// Why the engine is not healthy right now (`HandoffBlocked: ...`, `Degraded: ...`), empty when it is.
    pub condition: String,
    /// The condition's reason, what the operator acts on (`Degraded`: it serves, but something is wrong).
    pub condition_reason: Option<Reason>,
    pub block_size: u64,
    /// The size in bytes the engine serves now.
    pub size: u64,
    /// Primary: how long it still acknowledges writes without a renewal (0: none held).
    pub lease_remaining_ms: u64,
    /// The engine's `--lease-ms` (0: leases off).
    pub lease_ms: u32,
    /// Not primary: how long before it may be promoted by force (its promise to the primary's lease).
    pub promise_remaining_ms: u64,
    /// Sync mode, primary: it acknowledges writes without its peer, with the witness's consent.
    pub sync_fallback: bool,
    /// Secondary: blocks the primary had not replicated at its last heartbeat (what a forced promotion
    /// would lose, as far as it knows).
    pub peer_backlog_blocks: u64,
}

/// Result of a successful takeover call.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct TakeoverOutcome {
    pub epoch: u64,
    pub ready_ms: u64,
    pub peer_pending_blocks: u64,
    pub lost_blocks: u64,
    pub lost_seq_from: u64,
    pub lost_seq_to: u64,
    pub already_primary: bool,
}

/// A snapshot as an engine lists it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Snapshot {
    pub id: String,
    /// The volume's size when it was taken.
    pub size: u64,
    pub ready: bool,
}

/// A lease the operator (the witness) granted.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Granted {
    /// The lease the engine holds now (at most its own `--lease-ms`).
    pub lease_remaining_ms: u64,
    /// It acknowledges writes without its peer now (Sync mode, consented).
    pub sync_fallback: bool,
}

/// Where a live move stands on the primary (`GetMove`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MoveState {
    /// No move was ever started there.
    #[default]
    None,
    Copying,
    Cutover,
    /// The target is the secondary now.
    Done,
    /// Rolled back: the old secondary stays.
    Aborted,
}

/// A live move's progress as the primary answers it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct MoveProgress {
    pub state: MoveState,
    /// The new engine's address (empty with `None`).
    pub target: String,
    pub copied_bytes: u64,
    pub total_bytes: u64,
    /// Why it aborted, or what it waits for.
    pub message: String,
}

fn move_from_pb(m: tandem_api::pb::MoveStatus) -> MoveProgress {
    use tandem_api::pb::MovePhase;
    MoveProgress {
        state: match MovePhase::try_from(m.phase) {
            Ok(MovePhase::Copying) => MoveState::Copying,
            Ok(MovePhase::Cutover) => MoveState::Cutover,
            Ok(MovePhase::Done) => MoveState::Done,
            Ok(MovePhase::Aborted) => MoveState::Aborted,
            Ok(MovePhase::None) | Err(_) => MoveState::None,
        },
        target: m.target,
        copied_bytes: m.copied_bytes,
        total_bytes: m.total_bytes,
        message: m.message,
    }
}

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Could not connect or the call timed out: the engine may be down.
    #[error("engine at {address} unreachable: {message}")]
    Unreachable { address: String, message: String },
    /// The engine answered with an error (wrong state, stale epoch, never synced...).
    #[error("engine at {address} refused {op}: {message}")]
    Refused {
        address: String,
        op: &'static str,
        message: String,
        /// Why, when the engine said.
        reason: Option<Reason>,
    },
    /// The engine does not have this call yet (an older engine image): not an error to retry soon.
    #[error("engine at {address} does not implement {op} yet")]
    Unimplemented { address: String, op: &'static str },
    /// The secondary answered that it cannot reach the old primary and, under `WaitForPrimary`, was not
    /// promoted (reason `HandoffBlocked`). `message` is the engine's own (`HandoffBlocked: PeerUnreachable: ...`).
    #[error("{message} (engine at {address})")]
    HandoffBlocked { address: String, message: String },
}

impl EngineError {
    /// The takeover was refused because the old primary is unreachable under `WaitForPrimary`.
    pub fn is_handoff_blocked(&self) -> bool {
        matches!(self, EngineError::HandoffBlocked { .. })
    }

    /// The engine's reason for the failure, when it gave one.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            EngineError::HandoffBlocked { .. } => Some(Reason::HandoffBlocked),
            EngineError::Refused { reason, .. } => *reason,
            EngineError::Unreachable { .. } | EngineError::Unimplemented { .. } => None,
        }
    }
}

/// The engine calls the operator makes.
pub trait EngineApi: Send + Sync {
    /// `Status` of the volume on one engine.
    fn status<'a>(
        &'a self,
        target: &'a EngineTarget,
    ) -> BoxFuture<'a, Result<EngineState, EngineError>>;
    /// `Takeover` on the secondary: fence the primary, take its table, become primary at a higher epoch.
    fn takeover<'a>(
        &'a self,
        target: &'a EngineTarget,
        policy: FailoverPolicy,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<TakeoverOutcome, EngineError>>;
    /// `GrantLease` as the witness (it reads the engine's clock and instance first, then echoes them).
    /// `allow_async`: Sync mode, the secondary is lost: acknowledge without it.
    fn grant<'a>(
        &'a self,
        target: &'a EngineTarget,
        lease_ms: u32,
        allow_async: bool,
    ) -> BoxFuture<'a, Result<Granted, EngineError>>;
    /// `Resize` on the primary (it grows its secondary first); answers the size it serves now.
    fn resize<'a>(
        &'a self,
        target: &'a EngineTarget,
        size: u64,
    ) -> BoxFuture<'a, Result<u64, EngineError>>;
    /// `ListSnapshots` of the volume on one engine.
    fn list_snapshots<'a>(
        &'a self,
        target: &'a EngineTarget,
    ) -> BoxFuture<'a, Result<Vec<Snapshot>, EngineError>>;
    /// `CreateSnapshot` on the primary; idempotent by id.
    fn create_snapshot<'a>(
        &'a self,
        target: &'a EngineTarget,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Snapshot, EngineError>>;
    /// `DeleteSnapshot`; deleting an unknown id succeeds.
    fn delete_snapshot<'a>(
        &'a self,
        target: &'a EngineTarget,
        id: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>>;
    /// `StartMove` on the primary: fill the engine at `to` and make it the secondary; naming the same
    /// target again answers the move under way (or done).
    fn start_move<'a>(
        &'a self,
        target: &'a EngineTarget,
        to: &'a str,
    ) -> BoxFuture<'a, Result<MoveProgress, EngineError>>;
    /// `GetMove` on the primary.
    fn get_move<'a>(
        &'a self,
        target: &'a EngineTarget,
    ) -> BoxFuture<'a, Result<MoveProgress, EngineError>>;
    /// `AbortMove` on the primary: before the cutover the old secondary stays (refused after it).
    fn abort_move<'a>(
        &'a self,
        target: &'a EngineTarget,
    ) -> BoxFuture<'a, Result<MoveProgress, EngineError>>;
}

/// A raw `tandem.engine.v1.Engine` client for the calls `EngineClient` does not wrap (issue 14's
/// resize and snapshots), with the same channel (TLS) and token.
async fn raw_client(
    target: &EngineTarget,
) -> Result<
    tandem_api::pb::engine_client::EngineClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            tandem_api::client::TokenInterceptor,
        >,
    >,
    ClientError,
> {
    let ch = tandem_api::client::channel(&target.address, Duration::from_secs(5)).await?;
    let interceptor = tandem_api::client::TokenInterceptor::new(target.token.as_deref())?;
    Ok(tandem_api::pb::engine_client::EngineClient::with_interceptor(ch, interceptor))
}

/// One raw call within `limit`, errors mapped like [`one_call`]'s.
async fn raw_call<T, F, Fut>(
    target: &EngineTarget,
    op: &'static str,
    limit: Duration,
    call: F,
) -> Result<T, EngineError>
where
    F: FnOnce(
        tandem_api::pb::engine_client::EngineClient<
            tonic::service::interceptor::InterceptedService<
                tonic::transport::Channel,
                tandem_api::client::TokenInterceptor,
            >,
        >,
    ) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let attempt = async {
        let client = raw_client(target)
            .await
            .map_err(|e| map_client_error(&target.address, op, e))?;
        call(client)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| {
                map_client_error(&target.address, op, ClientError::Rpc { op, status })
            })
    };
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| EngineError::Unreachable {
            address: target.address.clone(),
            message: format!("no {op} answer within {limit:?}"),
        })?
}

fn snapshot_from_pb(info: tandem_api::pb::SnapshotInfo) -> Snapshot {
    Snapshot {
        id: info.id,
        size: info.size,
        ready: info.ready,
    }
}

/// The real engine API over gRPC. Connects per call (the operator calls rarely and engines move).
#[derive(Clone, Debug)]
pub struct GrpcEngines {
    /// Upper bound for a Status call including connecting.
    pub status_timeout: Duration,
}

impl Default for GrpcEngines {
    fn default() -> Self {
        Self {
            status_timeout: Duration::from_secs(3),
        }
    }
}

fn map_client_error(address: &str, op: &'static str, err: ClientError) -> EngineError {
    let reason = err.reason();
    match err {
        ClientError::Rpc { status, .. } if status.code() == tonic::Code::Unimplemented => {
            EngineError::Unimplemented {
                address: address.to_string(),
                op,
            }
        }
        // The engine's own verdict travels as UNAVAILABLE (kubelet and the CSI plugin retry on it), but it
        // is an answer from a healthy secondary, not a transport failure.
        ClientError::Rpc { status, .. } if reason == Some(Reason::HandoffBlocked) => {
            EngineError::HandoffBlocked {
                address: address.to_string(),
                message: status.message().to_string(),
            }
        }
        // LeaseHeld (UNAVAILABLE too) is the secondary's answer that its promise outlasts the call: a
        // retry, with its reason kept.
        ClientError::Rpc { status, .. }
            if reason == Some(Reason::LeaseHeld)
                || !matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                ) =>
        {
            EngineError::Refused {
                address: address.to_string(),
                op,
                message: format!("{:?}: {}", status.code(), status.message()),
                reason,
            }
        }
        other => EngineError::Unreachable {
            address: address.to_string(),
            message: other.to_string(),
        },
    }
}

/// One call to an engine: connect, then `call`, both within `limit`; every error mapped once.
async fn one_call<T, F, Fut>(
    target: &EngineTarget,
    op: &'static str,
    limit: Duration,
    call: F,
) -> Result<T, EngineError>
where
    F: FnOnce(EngineClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let attempt = async {
        let client = EngineClient::connect(&target.address, target.token.as_deref())
            .await
            .map_err(|e| map_client_error(&target.address, op, e))?;
        call(client)
            .await
            .map_err(|e| map_client_error(&target.address, op, e))
    };
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| EngineError::Unreachable {
            address: target.address.clone(),
            message: format!("no {op} answer within {limit:?}"),
        })?
}

fn role_from_pb(role: i32) -> Option<EngineRole> {
    use tandem_api::pb::Role;
    match Role::try_from(role).ok()? {
        Role::Primary => Some(EngineRole::Primary),
        Role::Secondary => Some(EngineRole::Secondary),
        Role::Fenced => Some(EngineRole::Fenced),
        Role::Unspecified => None,
    }
}

impl EngineApi for GrpcEngines {
    fn status<'a>(
        &'a self,
        target: &'a EngineTarget,
    ) -> BoxFuture<'a, Result<EngineState, EngineError>> {
        Box::pin(async move {
            let reply = one_call(target, "Status", self.status_timeout, |mut c| async move {
                c.status(&target.volume).await
            })
            .await?;
            Ok(EngineState {
                role: role_from_pb(reply.role),
                epoch: reply.epoch,
                pair_state: PairState::from_wire(reply.pair),
                peer_connected: reply.peer_connected,
                pending_blocks: reply.pending_blocks,
                pending_bytes: reply.pending_bytes,
                lag_seconds: reply.lag_seconds,
                resync_progress: reply.resync_progress,
                takeover_phase: TakeoverPhase::from_wire(reply.takeover),
                peer_pending_blocks: reply.peer_pending_blocks,
                overlay_blocks: reply.overlay_blocks,
                proxied_reads: reply.proxied_reads,
                lost_blocks: reply.lost_blocks,
                condition_reason: Reason::from_name(&reply.condition_reason),
                condition: reply.condition,
                block_size: u64::from(reply.block_size),
                size: reply.size,
                lease_remaining_ms: reply.lease_remaining_ms,
                lease_ms: reply.lease_ms,
                promise_remaining_ms: reply.promise_remaining_ms,
                sync_fallback: reply.sync_fallback,
                peer_backlog_blocks: reply.peer_backlog_blocks,
            })
        })
    }

    fn takeover<'a>(
        &'a self,
        target: &'a EngineTarget,
        policy: FailoverPolicy,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<TakeoverOutcome, EngineError>> {
        Box::pin(async move {
            // MaxLoss never reaches the engine as such: the operator calls Force once the bound holds.
            let pb_policy = match policy {
                FailoverPolicy::WaitForPrimary => TakeoverPolicy::Wait,
                FailoverPolicy::ForcePromote | FailoverPolicy::MaxLoss => TakeoverPolicy::Force,
            };
            // The engine bounds the call by `timeout`; allow for connecting and the answer on top.
            let limit = timeout + Duration::from_secs(10);
            let reply = one_call(target, "Takeover", limit, |mut c| async move {
                c.takeover(&target.volume, pb_policy, timeout).await
            })
            .await?;
            Ok(TakeoverOutcome {
                epoch: reply.epoch,
                ready_ms: reply.ready_ms,
                peer_pending_blocks: reply.peer_pending_blocks,
                lost_blocks: reply.lost_blocks,
                lost_seq_from: reply.lost_seq_from,
                lost_seq_to: reply.lost_seq_to,
                already_primary: reply.already_primary,
            })
        })
    }

    fn grant<'a>(
        &'a self,
        target: &'a EngineTarget,
        lease_ms: u32,
        allow_async: bool,
    ) -> BoxFuture<'a, Result<Granted, EngineError>> {
        Box::pin(async move {
            let reply = one_call(
                target,
                "GrantLease",
                self.status_timeout,
                |mut c| async move { c.witness_grant(&target.volume, lease_ms, allow_async).await },
            )
            .await?;
            Ok(Granted {
                lease_remaining_ms: reply.lease_remaining_ms,
                sync_fallback: reply.sync_fallback,
            })
        })
    }

    fn resize<'a>(
        &'a self,
        target: &'a EngineTarget,
        size: u64,
    ) -> BoxFuture<'a, Result<u64, EngineError>> {
        Box::pin(async move {
            let req = tandem_api::pb::ResizeRequest {
                volume: target.volume.clone(),
                epoch: 0,
                size,
            };
            let reply = raw_call(target, "Resize", Self::RESIZE_LIMIT, |mut c| async move {
                c.resize(req).await
            })
            .await?;
            Ok(reply.size)
        })
    }

    fn list_snapshots<'a>(
        &'a self,
        target: &'a EngineTarget,
    ) -> BoxFuture<'a, Result<Vec<Snapshot>, EngineError>> {
        Box::pin(async move {
            let req = tandem_api::pb::ListSnapshotsRequest {
                volume: target.volume.clone(),
            };
            let reply = raw_call(
                target,
                "ListSnapshots",
                self.status_timeout,
                |mut c| async move { c.list_snapshots(req).await },
            )
            .await?;
            Ok(reply.snapshots.into_iter().map(snapshot_from_pb).collect())
        })
    }

    fn create_snapshot<'a>(
        &'a self,
        target: &'a EngineTarget,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Snapshot, EngineError>> {
        Box::pin(async move {
            let req = tandem_api::pb::CreateSnapshotRequest {
                volume: target.volume.clone(),
                id: id.to_string(),
            };
            let reply = raw_call(
                target,
                "CreateSnapshot",
                Self::RESIZE_LIMIT,
                |mut c| async move { c.create_snapshot(req).await },
            )
            .await?;
            Ok(snapshot_from_pb(reply))
        })
    }

    fn delete_snapshot<'a>(
        &'a self,
        target: &'a EngineTarget,
        id: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let req = tandem_api::pb::DeleteSnapshotRequest {
                volume: target.volume.clone(),
                id: id.to_string(),
            };
            raw_call(
                target,
                "DeleteSnapshot",
                self.status_timeout,
                |mut c| async move { c.delete_snapshot(req).await },
            )
            .await?;
            Ok(())
        })
    }

    fn start_move<'a>(
        &'a self,
        target: &'a EngineTarget,
        to: &'a str,
    ) -> BoxFuture<'a, Result<MoveProgress, EngineError>> {
        Box::pin(self.move_call(target, "StartMove", Some(to)))
    }

    fn get_move<'a>(
        &'a self,
        target: &'a EngineTarget,
    ) -> BoxFuture<'a, Result<MoveProgress, EngineError>> {
        Box::pin(self.move_call(target, "GetMove", None))
    }

    fn abort_move<'a>(
        &'a self,
        target: &'a EngineTarget,
    ) -> BoxFuture<'a, Result<MoveProgress, EngineError>> {
        Box::pin(self.move_call(target, "AbortMove", None))
    }
}

impl GrpcEngines {
    /// `StartMove`, `GetMove`, `AbortMove`: answered from the primary's own record, or a store of it.
    pub async fn move_call(
        &self,
        target: &EngineTarget,
        op: &'static str,
        to: Option<&str>,
    ) -> Result<MoveProgress, EngineError> {
        let volume = target.volume.clone();
        let to = to.map(str::to_string);
        let reply = one_call(target, op, self.status_timeout, |mut c| async move {
            match (op, to) {
                ("StartMove", Some(to)) => c.start_move(&volume, &to).await,
                ("AbortMove", _) => c.abort_move(&volume).await,
                _ => c.get_move(&volume).await,
            }
        })
        .await?;
        Ok(move_from_pb(reply))
    }

    /// Resize grows the secondary's files, then its own: allow more than a Status.
    const RESIZE_LIMIT: Duration = Duration::from_secs(60);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_answers_map_to_refused_and_transport_trouble_to_unreachable() {
        let refused = map_client_error(
            "e:9500",
            "Takeover",
            ClientError::Rpc {
                op: "Takeover",
                status: tonic::Status::failed_precondition("peer unreachable under WAIT"),
            },
        );
        assert!(
            matches!(refused, EngineError::Refused { op: "Takeover", .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("peer unreachable under WAIT"));
        for status in [
            tonic::Status::unavailable("down"),
            tonic::Status::deadline_exceeded("slow"),
        ] {
            let e = map_client_error(
                "e:9500",
                "Status",
                ClientError::Rpc {
                    op: "Status",
                    status,
                },
            );
            assert!(matches!(e, EngineError::Unreachable { .. }), "{e}");
        }
        // The secondary's verdict under WaitForPrimary, by its reason: not a transport failure.
        let blocked = map_client_error(
            "e:9500",
            "Takeover",
            ClientError::Rpc {
                op: "Takeover",
                status: Reason::HandoffBlocked.status(
                    tonic::Code::Unavailable,
                    "HandoffBlocked: PeerUnreachable: peer 10.0.0.1:9500: connection refused; not promoted \
                     (policy wait; use policy force to promote and lose the peer's unsent writes)",
                ),
            },
        );
        assert_eq!(blocked.reason(), Some(Reason::HandoffBlocked));
        assert!(blocked.is_handoff_blocked(), "{blocked}");
        assert!(
            blocked
                .to_string()
                .starts_with("HandoffBlocked: PeerUnreachable: peer 10.0.0.1:9500"),
            "{blocked}"
        );
        assert!(!refused.is_handoff_blocked());
        // The text alone decides nothing: without the reason it is a transport-level UNAVAILABLE.
        let text_only = map_client_error(
            "e:9500",
            "Takeover",
            ClientError::Rpc {
                op: "Takeover",
                status: tonic::Status::unavailable("HandoffBlocked: PeerUnreachable: x"),
            },
        );
        assert!(
            matches!(text_only, EngineError::Unreachable { .. }),
            "{text_only}"
        );
        let stale = map_client_error(
            "e:9500",
            "Takeover",
            ClientError::Rpc {
                op: "Takeover",
                status: Reason::StaleEpoch
                    .status(tonic::Code::FailedPrecondition, "stale takeover epoch 2"),
            },
        );
        assert_eq!(stale.reason(), Some(Reason::StaleEpoch));
        let held = map_client_error(
            "e:9500",
            "Takeover",
            ClientError::Rpc {
                op: "Takeover",
                status: Reason::LeaseHeld
                    .status(tonic::Code::Unavailable, "LeaseHeld: promise 9000 ms"),
            },
        );
        assert_eq!(held.reason(), Some(Reason::LeaseHeld), "{held}");
        let e = map_client_error(
            "bad addr",
            "Status",
            ClientError::BadAddress("bad addr".into()),
        );
        assert!(matches!(e, EngineError::Unreachable { .. }));
    }

    #[test]
    fn roles_from_the_wire() {
        use tandem_api::pb::Role;
        assert_eq!(
            role_from_pb(Role::Primary as i32),
            Some(EngineRole::Primary)
        );
        assert_eq!(
            role_from_pb(Role::Secondary as i32),
            Some(EngineRole::Secondary)
        );
        assert_eq!(role_from_pb(Role::Fenced as i32), Some(EngineRole::Fenced));
        assert_eq!(role_from_pb(Role::Unspecified as i32), None);
        assert_eq!(role_from_pb(99), None);
    }

    #[tokio::test]
    async fn an_absent_engine_is_unreachable_quickly() {
        // Nothing listens on this port: connecting fails fast and is reported as unreachable.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let engines = GrpcEngines {
            status_timeout: Duration::from_secs(2),
        };
        let target = EngineTarget {
            address,
            volume: "v".into(),
            token: Some("t".into()),
        };
        let e = engines.status(&target).await.unwrap_err();
        assert!(matches!(e, EngineError::Unreachable { .. }), "{e}");
    }
}

#[cfg(test)]
pub mod fake {
    //! An in-memory engine pair for reconcile tests.
    use std::{
        collections::BTreeMap,
        sync::{Arc, Mutex},
    };

    use super::*;

    /// A snapshot call the fake saw: (op, address, id).
    pub type SnapshotCall = (&'static str, String, String);

    /// Scripted engines keyed by address. Missing address = unreachable.
    #[derive(Clone, Default)]
    pub struct FakeEngines {
        pub states: Arc<Mutex<BTreeMap<String, EngineState>>>,
        /// Takeover answers keyed by address; missing = refused.
        pub takeovers: Arc<Mutex<BTreeMap<String, TakeoverOutcome>>>,
        /// Every takeover call made: (address, policy).
        pub takeover_calls: Arc<Mutex<Vec<(String, FailoverPolicy)>>>,
        /// Addresses whose takeover answers `HandoffBlocked` (old primary unreachable under WAIT).
        pub blocked: Arc<Mutex<Vec<String>>>,
        /// Every lease grant made: (address, lease_ms, allow_async).
        pub grants: Arc<Mutex<Vec<(String, u32, bool)>>>,
        /// The engines answer UNIMPLEMENTED to resize and snapshot calls (an engine before issue 14).
        pub old_engines: bool,
        /// Every resize call: (address, size).
        pub resizes: Arc<Mutex<Vec<(String, u64)>>>,
        /// Snapshots per address.
        pub snapshots: Arc<Mutex<BTreeMap<String, Vec<Snapshot>>>>,
        /// Every snapshot call: (op, address, id).
        pub snapshot_calls: Arc<Mutex<Vec<SnapshotCall>>>,
        /// Live moves per primary address (GetMove's answer).
        pub moves: Arc<Mutex<BTreeMap<String, MoveProgress>>>,
        /// Every StartMove/AbortMove call: (op, address, to).
        pub move_calls: Arc<Mutex<Vec<SnapshotCall>>>,
    }

    impl FakeEngines {
        pub fn with_state(self, address: &str, state: EngineState) -> Self {
            self.states
                .lock()
                .unwrap()
                .insert(address.to_string(), state);
            self
        }
        pub fn with_takeover(self, address: &str, outcome: TakeoverOutcome) -> Self {
            self.takeovers
                .lock()
                .unwrap()
                .insert(address.to_string(), outcome);
            self
        }
        pub fn with_blocked_handoff(self, address: &str) -> Self {
            self.blocked.lock().unwrap().push(address.to_string());
            self
        }
        pub fn with_snapshot(self, address: &str, id: &str, size: u64) -> Self {
            self.snapshots
                .lock()
                .unwrap()
                .entry(address.to_string())
                .or_default()
                .push(Snapshot {
                    id: id.into(),
                    size,
                    ready: true,
                });
            self
        }
        pub fn old(mut self) -> Self {
            self.old_engines = true;
            self
        }
        fn unimplemented(&self, target: &EngineTarget, op: &'static str) -> Option<EngineError> {
            self.old_engines.then(|| EngineError::Unimplemented {
                address: target.address.clone(),
                op,
            })
        }
        fn unreachable(&self, target: &EngineTarget) -> Option<EngineError> {
            (!self.states.lock().unwrap().contains_key(&target.address)).then(|| {
                EngineError::Unreachable {
                    address: target.address.clone(),
                    message: "fake: no engine".into(),
                }
            })
        }
        pub fn calls(&self) -> Vec<(String, FailoverPolicy)> {
            self.takeover_calls.lock().unwrap().clone()
        }
        pub fn granted(&self) -> Vec<(String, u32, bool)> {
            self.grants.lock().unwrap().clone()
        }
    }

    impl EngineApi for FakeEngines {
        fn status<'a>(
            &'a self,
            target: &'a EngineTarget,
        ) -> BoxFuture<'a, Result<EngineState, EngineError>> {
            let found = self.states.lock().unwrap().get(&target.address).cloned();
            Box::pin(async move {
                found.ok_or_else(|| EngineError::Unreachable {
                    address: target.address.clone(),
                    message: "fake: no engine".into(),
                })
            })
        }

        fn takeover<'a>(
            &'a self,
            target: &'a EngineTarget,
            policy: FailoverPolicy,
            _timeout: Duration,
        ) -> BoxFuture<'a, Result<TakeoverOutcome, EngineError>> {
            self.takeover_calls
                .lock()
                .unwrap()
                .push((target.address.clone(), policy));
            let blocked = self.blocked.lock().unwrap().contains(&target.address)
                && policy == FailoverPolicy::WaitForPrimary;
            let found = self.takeovers.lock().unwrap().get(&target.address).cloned();
            if let (Some(outcome), false) = (&found, blocked) {
                // Like the engine: it serves at the new epoch, draining what the old primary still owes
                // (a clean handoff with a backlog) or reversing at once (nothing owed, or forced).
                let mut states = self.states.lock().unwrap();
                let state = states.entry(target.address.clone()).or_default();
                state.role = Some(EngineRole::Primary);
                state.epoch = outcome.epoch;
                state.peer_pending_blocks = outcome.peer_pending_blocks;
                state.lost_blocks = outcome.lost_blocks;
                state.takeover_phase = if outcome.peer_pending_blocks > 0 {
                    TakeoverPhase::Draining
                } else {
                    TakeoverPhase::None
                };
                state.pair_state = PairState::Reversing;
                state.peer_connected = false;
                state.condition = String::new();
                state.condition_reason = None;
            }
            Box::pin(async move {
                if blocked {
                    return Err(EngineError::HandoffBlocked {
                        address: target.address.clone(),
                        message:
                            "HandoffBlocked: PeerUnreachable: fake; not promoted (policy wait)"
                                .into(),
                    });
                }
                found.ok_or_else(|| EngineError::Refused {
                    address: target.address.clone(),
                    op: "Takeover",
                    message: "fake: stale epoch".into(),
                    reason: Some(Reason::StaleEpoch),
                })
            })
        }

        fn grant<'a>(
            &'a self,
            target: &'a EngineTarget,
            lease_ms: u32,
            allow_async: bool,
        ) -> BoxFuture<'a, Result<Granted, EngineError>> {
            let mut states = self.states.lock().unwrap();
            let answer = match states.get_mut(&target.address) {
                Some(state) => {
                    self.grants.lock().unwrap().push((
                        target.address.clone(),
                        lease_ms,
                        allow_async,
                    ));
                    state.lease_remaining_ms = u64::from(lease_ms);
                    state.sync_fallback |= allow_async;
                    Ok(Granted {
                        lease_remaining_ms: state.lease_remaining_ms,
                        sync_fallback: state.sync_fallback,
                    })
                }
                None => Err(EngineError::Unreachable {
                    address: target.address.clone(),
                    message: "fake: no engine".into(),
                }),
            };
            Box::pin(async move { answer })
        }

        fn resize<'a>(
            &'a self,
            target: &'a EngineTarget,
            size: u64,
        ) -> BoxFuture<'a, Result<u64, EngineError>> {
            self.resizes
                .lock()
                .unwrap()
                .push((target.address.clone(), size));
            let answer = match self
                .unreachable(target)
                .or_else(|| self.unimplemented(target, "Resize"))
            {
                Some(e) => Err(e),
                None => {
                    // Like the engine: the primary grows its peer, then itself.
                    for state in self.states.lock().unwrap().values_mut() {
                        state.size = state.size.max(size);
                    }
                    Ok(size)
                }
            };
            Box::pin(async move { answer })
        }

        fn list_snapshots<'a>(
            &'a self,
            target: &'a EngineTarget,
        ) -> BoxFuture<'a, Result<Vec<Snapshot>, EngineError>> {
            self.snapshot_calls.lock().unwrap().push((
                "list",
                target.address.clone(),
                String::new(),
            ));
            let answer = match self
                .unreachable(target)
                .or_else(|| self.unimplemented(target, "ListSnapshots"))
            {
                Some(e) => Err(e),
                None => Ok(self
                    .snapshots
                    .lock()
                    .unwrap()
                    .get(&target.address)
                    .cloned()
                    .unwrap_or_default()),
            };
            Box::pin(async move { answer })
        }

        fn create_snapshot<'a>(
            &'a self,
            target: &'a EngineTarget,
            id: &'a str,
        ) -> BoxFuture<'a, Result<Snapshot, EngineError>> {
            self.snapshot_calls.lock().unwrap().push((
                "create",
                target.address.clone(),
                id.to_string(),
            ));
            let answer = match self
                .unreachable(target)
                .or_else(|| self.unimplemented(target, "CreateSnapshot"))
            {
                Some(e) => Err(e),
                None => {
                    let size = self.states.lock().unwrap()[&target.address].size;
                    let snap = Snapshot {
                        id: id.to_string(),
                        size,
                        ready: true,
                    };
                    let mut all = self.snapshots.lock().unwrap();
                    let list = all.entry(target.address.clone()).or_default();
                    if !list.iter().any(|s| s.id == id) {
                        list.push(snap.clone());
                    }
                    Ok(snap)
                }
            };
            Box::pin(async move { answer })
        }

        fn delete_snapshot<'a>(
            &'a self,
            target: &'a EngineTarget,
            id: &'a str,
        ) -> BoxFuture<'a, Result<(), EngineError>> {
            self.snapshot_calls.lock().unwrap().push((
                "delete",
                target.address.clone(),
                id.to_string(),
            ));
            let answer = match self
                .unreachable(target)
                .or_else(|| self.unimplemented(target, "DeleteSnapshot"))
            {
                Some(e) => Err(e),
                None => {
                    if let Some(list) = self.snapshots.lock().unwrap().get_mut(&target.address) {
                        list.retain(|s| s.id != id);
                    }
                    Ok(())
                }
            };
            Box::pin(async move { answer })
        }

        fn start_move<'a>(
            &'a self,
            target: &'a EngineTarget,
            to: &'a str,
        ) -> BoxFuture<'a, Result<MoveProgress, EngineError>> {
            self.move_calls
                .lock()
                .unwrap()
                .push(("start", target.address.clone(), to.to_string()));
            let answer = match self.unreachable(target) {
                Some(e) => Err(e),
                None => {
                    let mut moves = self.moves.lock().unwrap();
                    let m = moves
                        .entry(target.address.clone())
                        .or_insert_with(|| MoveProgress {
                            state: MoveState::Copying,
                            target: to.to_string(),
                            total_bytes: 16 << 20,
                            ..Default::default()
                        });
                    Ok(m.clone())
                }
            };
            Box::pin(async move { answer })
        }

        fn get_move<'a>(
            &'a self,
            target: &'a EngineTarget,
        ) -> BoxFuture<'a, Result<MoveProgress, EngineError>> {
            let answer = match self.unreachable(target) {
                Some(e) => Err(e),
                None => Ok(self
                    .moves
                    .lock()
                    .unwrap()
                    .get(&target.address)
                    .cloned()
                    .unwrap_or_default()),
            };
            Box::pin(async move { answer })
        }

        fn abort_move<'a>(
            &'a self,
            target: &'a EngineTarget,
        ) -> BoxFuture<'a, Result<MoveProgress, EngineError>> {
            self.move_calls
                .lock()
                .unwrap()
                .push(("abort", target.address.clone(), String::new()));
            let answer = match self.unreachable(target) {
                Some(e) => Err(e),
                None => {
                    let mut moves = self.moves.lock().unwrap();
                    let m = moves.entry(target.address.clone()).or_default();
                    if m.state != MoveState::Done {
                        m.state = MoveState::Aborted;
                    }
                    Ok(m.clone())
                }
            };
            Box::pin(async move { answer })
        }
    }
}
