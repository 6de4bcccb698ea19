//! The gRPC side of the engine (`tandem.engine.v1`): token check, request checks, and the
//! control service. Errors map to gRPC codes in one place (`From<ApiError> for Status`).

use std::sync::{atomic::Ordering, Arc};

use tonic::{Request, Response, Status};

use crate::{
    meta::Role,
    pb::{self, engine_server::Engine},
    volume::{Volume, BLOCK_SIZE},
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
            Err(Status::unauthenticated("missing or wrong volume token"))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Errors of the engine API, mapped once to gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("unknown volume {0:?}")]
    UnknownVolume(String),
    #[error("{0}")]
    Unsupported(&'static str),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::UnknownVolume(_) => Status::not_found(e.to_string()),
            ApiError::Unsupported(_) => Status::unimplemented(e.to_string()),
        }
    }
}

pub fn role_pb(r: Role) -> pb::Role {
    match r {
        Role::Primary => pb::Role::Primary,
        Role::Secondary => pb::Role::Secondary,
        Role::Fenced => pb::Role::Fenced,
    }
}

/// The control service for the one volume this engine serves.
pub struct EngineService {
    volume: Arc<Volume>,
}

impl EngineService {
    pub fn new(volume: Arc<Volume>) -> Self {
        Self { volume }
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
    pb::StatusReply {
        volume: v.name().to_string(),
        role: role_pb(v.role()) as i32,
        epoch: v.epoch(),
        size: v.size(),
        block_size: BLOCK_SIZE,
        nbd_connections: c.nbd_connections.load(Ordering::Relaxed),
        bytes_read: c.bytes_read.load(Ordering::Relaxed),
        bytes_written: c.bytes_written.load(Ordering::Relaxed),
        flushes: c.flushes.load(Ordering::Relaxed),
        pair_state: "Standalone".into(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Engine for EngineService {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        self.check_volume(&req.get_ref().volume)?;
        Ok(Response::new(status_of(&self.volume)))
    }

    async fn takeover(
        &self,
        req: Request<pb::TakeoverRequest>,
    ) -> Result<Response<pb::TakeoverReply>, Status> {
        self.check_volume(&req.get_ref().volume)?;
        Err(ApiError::Unsupported("takeover needs a paired engine").into())
    }

    async fn failback(
        &self,
        req: Request<pb::TakeoverRequest>,
    ) -> Result<Response<pb::TakeoverReply>, Status> {
        self.check_volume(&req.get_ref().volume)?;
        Err(ApiError::Unsupported("failback needs a paired engine").into())
    }
}
