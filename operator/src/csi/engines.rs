//! The engines' snapshot calls (`Engine.CreateSnapshot/DeleteSnapshot/ListSnapshots`), made as the
//! operator identity (the process default TLS client, see `certs::serve_operator_identity`) with
//! the volume token, behind a trait so the logic is tested without engines.

use std::time::Duration;

use futures::future::BoxFuture;
use tandem_api::{client::TokenInterceptor, pb};

use super::{CsiError, CsiResult};
use crate::engine::EngineTarget;

/// One snapshot as an engine reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineSnapshot {
    pub id: String,
    pub size: u64,
    pub created_unix_ms: u64,
    pub ready: bool,
}

/// The snapshot calls on one engine.
pub trait SnapshotApi: Send + Sync + 'static {
    fn create<'a>(
        &'a self,
        target: &'a EngineTarget,
        id: &'a str,
    ) -> BoxFuture<'a, CsiResult<EngineSnapshot>>;
    fn delete<'a>(&'a self, target: &'a EngineTarget, id: &'a str) -> BoxFuture<'a, CsiResult<()>>;
    fn list<'a>(&'a self, target: &'a EngineTarget)
        -> BoxFuture<'a, CsiResult<Vec<EngineSnapshot>>>;
}

/// [`SnapshotApi`] over gRPC, one connection per call (snapshots are rare, engines move).
#[derive(Clone, Debug)]
pub struct GrpcSnapshots {
    /// Bound for connecting plus the call (a snapshot is a reflink or a table copy: quick).
    pub timeout: Duration,
}

impl Default for GrpcSnapshots {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
        }
    }
}

fn from_pb(s: pb::SnapshotInfo) -> EngineSnapshot {
    EngineSnapshot {
        id: s.id,
        size: s.size,
        created_unix_ms: s.created_unix_ms,
        ready: s.ready,
    }
}

/// Maps an engine's answer once. UNIMPLEMENTED means an engine image without snapshots: say so
/// instead of passing a bare code up to the snapshot's events.
pub fn engine_error(address: &str, op: &str, status: &tonic::Status) -> CsiError {
    let what = format!("{op} on engine {address}: {}", status.message());
    match status.code() {
        tonic::Code::Unimplemented => CsiError::Precondition(format!(
            "{what}: this engine does not support snapshots (UNIMPLEMENTED); upgrade the engine image"
        )),
        tonic::Code::InvalidArgument => CsiError::Invalid(what),
        tonic::Code::NotFound => CsiError::NotFound(what),
        tonic::Code::AlreadyExists => CsiError::AlreadyExists(what),
        tonic::Code::ResourceExhausted => CsiError::Exhausted(what),
        tonic::Code::FailedPrecondition => CsiError::Precondition(what),
        // WrongRole, a fenced engine, an unreachable one: the primary may be moving, retry.
        _ => CsiError::Unavailable(what),
    }
}

type Client = pb::engine_client::EngineClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, TokenInterceptor>,
>;

impl GrpcSnapshots {
    async fn call<T, F, Fut>(&self, target: &EngineTarget, op: &str, f: F) -> CsiResult<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let attempt = async {
            let channel = tandem_api::client::channel(&target.address, self.timeout)
                .await
                .map_err(|e| CsiError::Unavailable(format!("{op}: {e}")))?;
            let interceptor = TokenInterceptor::new(target.token.as_deref())
                .map_err(|e| CsiError::Internal(format!("{op}: volume token: {e}")))?;
            f(pb::engine_client::EngineClient::with_interceptor(
                channel,
                interceptor,
            ))
            .await
            .map_err(|s| engine_error(&target.address, op, &s))
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| {
                CsiError::Unavailable(format!(
                    "{op} on engine {}: no answer within {:?}",
                    target.address, self.timeout
                ))
            })?
    }
}

impl SnapshotApi for GrpcSnapshots {
    fn create<'a>(
        &'a self,
        target: &'a EngineTarget,
        id: &'a str,
    ) -> BoxFuture<'a, CsiResult<EngineSnapshot>> {
        Box::pin(self.call(target, "CreateSnapshot", move |mut c| async move {
            let req = pb::CreateSnapshotRequest {
                volume: target.volume.clone(),
                id: id.to_string(),
            };
            c.create_snapshot(req)
                .await
                .map(|r| from_pb(r.into_inner()))
        }))
    }

    fn delete<'a>(&'a self, target: &'a EngineTarget, id: &'a str) -> BoxFuture<'a, CsiResult<()>> {
        Box::pin(self.call(target, "DeleteSnapshot", move |mut c| async move {
            let req = pb::DeleteSnapshotRequest {
                volume: target.volume.clone(),
                id: id.to_string(),
            };
            c.delete_snapshot(req).await.map(|_| ())
        }))
    }

    fn list<'a>(
        &'a self,
        target: &'a EngineTarget,
    ) -> BoxFuture<'a, CsiResult<Vec<EngineSnapshot>>> {
        Box::pin(self.call(target, "ListSnapshots", move |mut c| async move {
            let req = pb::ListSnapshotsRequest {
                volume: target.volume.clone(),
            };
            c.list_snapshots(req)
                .await
                .map(|r| r.into_inner().snapshots.into_iter().map(from_pb).collect())
        }))
    }
}
