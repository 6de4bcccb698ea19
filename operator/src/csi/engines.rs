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
    fn list<'a>(
        &'a self,
        target: &'a EngineTarget,
    ) -> BoxFuture<'a, CsiResult<Vec<EngineSnapshot>>>;
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
        Box::pin(
            self.call(target, "CreateSnapshot", move |mut c| async move {
                let req = pb::CreateSnapshotRequest {
                    volume: target.volume.clone(),
                    id: id.to_string(),
                };
                c.create_snapshot(req)
                    .await
                    .map(|r| from_pb(r.into_inner()))
            }),
        )
    }

    fn delete<'a>(&'a self, target: &'a EngineTarget, id: &'a str) -> BoxFuture<'a, CsiResult<()>> {
        Box::pin(
            self.call(target, "DeleteSnapshot", move |mut c| async move {
                let req = pb::DeleteSnapshotRequest {
                    volume: target.volume.clone(),
                    id: id.to_string(),
                };
                c.delete_snapshot(req).await.map(|_| ())
            }),
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_api::pb::engine_server::{Engine, EngineServer};
    use tonic::{Request, Response, Status};

    /// An engine with snapshots (`with_snapshots`) or one from before them (UNIMPLEMENTED, what
    /// every engine answers until the snapshot work lands). Records the bearer tokens it saw.
    struct FakeEngine {
        with_snapshots: bool,
        tokens: std::sync::Mutex<Vec<String>>,
    }

    impl FakeEngine {
        fn saw<T>(&self, req: &Request<T>) {
            let token = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            self.tokens.lock().unwrap().push(token);
        }
    }

    fn none<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    #[tonic::async_trait]
    impl Engine for FakeEngine {
        async fn status(
            &self,
            _: Request<pb::StatusRequest>,
        ) -> Result<Response<pb::StatusReply>, Status> {
            none()
        }
        async fn takeover(
            &self,
            _: Request<pb::TakeoverRequest>,
        ) -> Result<Response<pb::TakeoverReply>, Status> {
            none()
        }
        async fn failback(
            &self,
            _: Request<pb::TakeoverRequest>,
        ) -> Result<Response<pb::TakeoverReply>, Status> {
            none()
        }
        async fn inject_fault(
            &self,
            _: Request<pb::FaultRequest>,
        ) -> Result<Response<pb::FaultReply>, Status> {
            none()
        }
        async fn grant_lease(
            &self,
            _: Request<pb::GrantLeaseRequest>,
        ) -> Result<Response<pb::GrantLeaseReply>, Status> {
            none()
        }
        async fn resize(
            &self,
            _: Request<pb::ResizeRequest>,
        ) -> Result<Response<pb::ResizeReply>, Status> {
            none()
        }
        async fn start_move(
            &self,
            _: Request<pb::StartMoveRequest>,
        ) -> Result<Response<pb::MoveStatus>, Status> {
            none()
        }
        async fn get_move(
            &self,
            _: Request<pb::GetMoveRequest>,
        ) -> Result<Response<pb::MoveStatus>, Status> {
            none()
        }
        async fn abort_move(
            &self,
            _: Request<pb::GetMoveRequest>,
        ) -> Result<Response<pb::MoveStatus>, Status> {
            none()
        }
        async fn create_snapshot(
            &self,
            req: Request<pb::CreateSnapshotRequest>,
        ) -> Result<Response<pb::SnapshotInfo>, Status> {
            self.saw(&req);
            if !self.with_snapshots {
                return Err(Status::unimplemented("snapshots: issue 14 in progress"));
            }
            let r = req.into_inner();
            Ok(Response::new(pb::SnapshotInfo {
                volume: r.volume,
                id: r.id,
                size: 64 << 20,
                created_unix_ms: 5_000,
                ready: true,
                ..Default::default()
            }))
        }
        async fn delete_snapshot(
            &self,
            req: Request<pb::DeleteSnapshotRequest>,
        ) -> Result<Response<pb::DeleteSnapshotReply>, Status> {
            self.saw(&req);
            Ok(Response::new(pb::DeleteSnapshotReply { deleted: false }))
        }
        async fn list_snapshots(
            &self,
            req: Request<pb::ListSnapshotsRequest>,
        ) -> Result<Response<pb::ListSnapshotsReply>, Status> {
            self.saw(&req);
            if req.get_ref().volume != "vol" {
                return Err(Status::not_found("no such volume"));
            }
            Ok(Response::new(pb::ListSnapshotsReply { snapshots: vec![] }))
        }
    }

    async fn serve(with_snapshots: bool) -> (String, Arc<FakeEngine>) {
        let engine = Arc::new(FakeEngine {
            with_snapshots,
            tokens: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = tonic::transport::Server::builder()
            .add_service(EngineServer::from_arc(engine.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        (address, engine)
    }

    use std::sync::Arc;

    fn target(address: &str, volume: &str) -> EngineTarget {
        EngineTarget {
            address: address.into(),
            volume: volume.into(),
            token: Some("tok".into()),
        }
    }

    #[tokio::test]
    async fn calls_carry_the_token_and_map_the_engines_answers() {
        let snapshots = GrpcSnapshots::default();
        let (with, engine) = serve(true).await;
        let s = snapshots
            .create(&target(&with, "vol"), "snap-1")
            .await
            .unwrap();
        assert_eq!(
            s,
            EngineSnapshot {
                id: "snap-1".into(),
                size: 64 << 20,
                created_unix_ms: 5_000,
                ready: true
            }
        );
        snapshots
            .delete(&target(&with, "vol"), "snap-1")
            .await
            .unwrap();
        let e = snapshots.list(&target(&with, "other")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
        assert_eq!(
            *engine.tokens.lock().unwrap(),
            ["Bearer tok", "Bearer tok", "Bearer tok"]
        );

        let (without, _) = serve(false).await;
        let e = snapshots
            .create(&target(&without, "vol"), "snap-1")
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        assert!(e.to_string().contains("does not support snapshots"), "{e}");

        // Nothing listens: a retryable UNAVAILABLE, not a hang.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap().to_string();
        drop(closed);
        let e = snapshots.list(&target(&gone, "vol")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    }
}
