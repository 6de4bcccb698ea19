//! One error type for the node plugin and its single mapping to CSI (gRPC) status codes.
//!
//! Root causes are named `Object + Problem` (`VolumeBusy`, `EngineUnauthenticated`); the operation and
//! the volume id are added once, by the gRPC adapter, as an [`OpError`] context layer.

use std::path::PathBuf;

use tandem_api::client::ClientError;
use tandem_api::Reason;
use tonic::Code;

use crate::attach::AttachError;
use crate::mount::MountError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an engine call failed (kept here, beside the one mapping to CSI codes, so the error module
/// depends on nothing else of the plugin).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("engine {addr} rejected the volume token: {message}")]
    Unauthenticated { addr: String, message: String },
    #[error("engine {addr} does not serve volume {volume}")]
    VolumeUnknown { addr: String, volume: String },
    #[error("engine {addr} unreachable: {message}")]
    Unreachable { addr: String, message: String },
    #[error("engine {addr} refused {op}: {code:?}: {message}")]
    Refused {
        addr: String,
        op: &'static str,
        code: Code,
        message: String,
    },
}

impl EngineError {
    pub fn code(&self) -> Code {
        match self {
            EngineError::Unauthenticated { .. } => Code::Unauthenticated,
            EngineError::VolumeUnknown { .. } => Code::NotFound,
            EngineError::Unreachable { .. } => Code::Unavailable,
            // A takeover that could not finish (peer unreachable under WaitForPrimary, epoch race):
            // kubelet retries NodeStageVolume.
            EngineError::Refused { code, .. } => match code {
                Code::InvalidArgument | Code::NotFound | Code::Unauthenticated => *code,
                Code::PermissionDenied => Code::Unauthenticated,
                _ => Code::Unavailable,
            },
        }
    }

    pub(crate) fn from_client(addr: &str, volume: &str, op: &'static str, e: ClientError) -> Self {
        let addr = addr.to_string();
        let reason = e.reason();
        match e {
            // The engine's reason when it gave one; the code for what it did not say (a proxy,
            // a transport failure, an engine older than reasons).
            ClientError::Rpc { status, .. } => match (reason, status.code()) {
                (Some(Reason::Unauthenticated), _)
                | (None, Code::Unauthenticated | Code::PermissionDenied) => {
                    EngineError::Unauthenticated {
                        addr,
                        message: status.message().to_string(),
                    }
                }
                (Some(Reason::UnknownVolume), _) | (None, Code::NotFound) => {
                    EngineError::VolumeUnknown {
                        addr,
                        volume: volume.to_string(),
                    }
                }
                (None, Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled)
                    if op == "Status" =>
                {
                    EngineError::Unreachable {
                        addr,
                        message: status.message().to_string(),
                    }
                }
                (_, code) => EngineError::Refused {
                    addr,
                    op,
                    code,
                    message: status.message().to_string(),
                },
            },
            other => EngineError::Unreachable {
                addr,
                message: other.to_string(),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("missing required field {0}")]
    FieldMissing(&'static str),
    #[error("invalid {field}: {reason}")]
    FieldInvalid { field: String, reason: String },
    #[error("an operation on this volume is already in progress")]
    VolumeBusy,
    #[error("volume not found: {0}")]
    VolumeNotFound(String),
    #[error("volume is not staged on this node{}", .0.as_ref().map(|p| format!(" at {}", p.display())).unwrap_or_default())]
    VolumeNotStaged(Option<PathBuf>),
    #[error("incompatible with the existing staging or publication: {0}")]
    VolumeIncompatible(String),
    #[error("{0}")]
    PreconditionFailed(String),
    /// The volume is staged here from before a takeover and still in use, so it cannot be replaced.
    #[error("stale staging: {0}")]
    StagingStale(String),
    #[error("path not found: {0}")]
    PathNotFound(PathBuf),
    #[error("no engine can serve the volume: {0}")]
    PrimaryUnavailable(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("state directory: {0}")]
    State(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::FieldInvalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The CSI/gRPC code for this error (CSI spec, "Error Scheme" and each RPC's error table).
    pub fn code(&self) -> Code {
        match self {
            Error::FieldMissing(_) | Error::FieldInvalid { .. } => Code::InvalidArgument,
            // Retryable for kubelet (it keeps the staging "uncertain" and unstages it once the
            // pod is gone) where FAILED_PRECONDITION would be final.
            Error::VolumeBusy | Error::StagingStale(_) => Code::Aborted,
            Error::VolumeNotFound(_) | Error::PathNotFound(_) => Code::NotFound,
            Error::VolumeNotStaged(_) | Error::PreconditionFailed(_) => Code::FailedPrecondition,
            Error::VolumeIncompatible(_) => Code::AlreadyExists,
            Error::PrimaryUnavailable(_) => Code::Unavailable,
            Error::Engine(e) => e.code(),
            // The engine changed its mind between Status and attach (fenced, demoted): retryable.
            Error::Attach(AttachError::EngineRefused { .. }) => Code::Unavailable,
            Error::Attach(_) | Error::Mount(_) | Error::State(_) | Error::Internal(_) => {
                Code::Internal
            }
        }
    }
}

/// An error with the operation and the volume it happened to (the only layer carrying the id).
#[derive(Debug, thiserror::Error)]
#[error("{op} {volume_id}: {source}")]
pub struct OpError {
    pub op: &'static str,
    pub volume_id: String,
    #[source]
    pub source: Error,
}

impl From<OpError> for tonic::Status {
    fn from(e: OpError) -> Self {
        tonic::Status::new(e.source.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_csi_spec() {
        assert_eq!(
            Error::FieldMissing("volume_id").code(),
            Code::InvalidArgument
        );
        assert_eq!(Error::VolumeBusy.code(), Code::Aborted);
        assert_eq!(Error::VolumeNotFound("x".into()).code(), Code::NotFound);
        assert_eq!(
            Error::VolumeNotStaged(None).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            Error::VolumeIncompatible("x".into()).code(),
            Code::AlreadyExists
        );
        let st: tonic::Status = OpError {
            op: "NodeStageVolume",
            volume_id: "ns/v".into(),
            source: Error::VolumeBusy,
        }
        .into();
        assert_eq!(st.code(), Code::Aborted);
        assert!(st.message().starts_with("NodeStageVolume ns/v: "));
    }
}
