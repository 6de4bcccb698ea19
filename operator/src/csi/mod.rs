//! The CSI Controller service (`tandem-operator csi-controller`): dynamic provisioning for
//! `csi.tandem.dev`. The kubernetes-csi sidecars (external-provisioner, external-resizer,
//! csi-snapshotter) call it over a unix socket; it turns each call into a `MirroredVolume` change
//! and lets the operator's reconciler do the work (placement, engines, the stage Secret, deletion
//! wipes, expansion), then answers from the volume's status.
//!
//! Why in the operator crate: it writes the CRD's own types, answers CreateVolume with the very PV
//! attributes the operator writes for hand-made volumes ([`crate::plan::pv_attributes`]), and calls
//! the engines for snapshots as the operator identity (`Identity::Operator`, minted from the
//! operator's CA like [`crate::certs::serve_operator_identity`]). It runs in its own Deployment
//! (next to its sidecars, so they share the socket) and holds no reconcile logic.
//!
//! Layout: [`params`] (StorageClass parameters, capabilities, capacity: pure), [`kube`] (the
//! Kubernetes API behind [`kube::VolumeApi`]), [`engines`] (the engines' snapshot calls behind
//! [`engines::SnapshotApi`]), [`service`] (the logic), [`grpc`] (gRPC adapters, errors mapped to
//! codes in one place, and `serve`).
//!
//! Ids: volume id `<namespace>/<mirroredvolume>`; snapshot id `<namespace>/<volume>/<id>`, where
//! `id` is the CSI snapshot name (the engine's snapshot id, so a retry finds it).
//!
//! StorageClass parameters (all optional but one of `hostPath` / `engineStorageClass`; any other key
//! is INVALID_ARGUMENT, keys under `csi.storage.k8s.io/` are the sidecars' and are ignored):
//! - `replication`: `Async` (default) | `Sync` (`spec.replication.mode`).
//! - `journalSize`: binary quantity, the engines' journal bound (`spec.replication.journalSize`).
//! - `failoverPolicy`: `WaitForPrimary` (default) | `ForcePromote` | `MaxLoss`.
//! - `maxLossBytes`: binary quantity, required with `MaxLoss`.
//! - `peerTimeout`: `500ms` | `30s` | `2m` (`spec.failover.peerTimeout`).
//! - `leaseMs`: the primary's write lease in ms, 0..=600000 (`spec.failover.leaseMs`).
//! - `fsType`: `ext4` (default) | `xfs`, for Filesystem volumes (external-provisioner's
//!   `csi.storage.k8s.io/fstype` wins when both are set and must then agree).
//! - `secondaryAccess`: `None` (default) | `ReadOnly` | `ReadWrite`.
//! - `hostPath`: engine data under this node directory (`spec.engineStorage.hostPath`), or
//! - `engineStorageClass`: a StorageClass for the engines' own claims
//!   (`spec.engineStorage.storageClassName`).
//! - `nodeSelector`: `k=v,k2=v2`, the nodes the engines may run on (default: any node).
//!
//! Required from external-provisioner: `--extra-create-metadata` (the claim's namespace becomes the
//! volume's, `csi.storage.k8s.io/pvc/namespace`) and topology without `--strict-topology` (the
//! requisite list must name both engine nodes' candidates, the preferred list the selected node).

pub mod engines;
pub mod grpc;
pub mod kube;
pub mod params;
pub mod service;

#[cfg(test)]
mod tests;

/// Why a CSI call failed, in the terms of the CSI error tables; [`grpc`] maps each to its code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsiError {
    /// A missing or unsupported field or parameter: the caller must change the request.
    #[error("{0}")]
    Invalid(String),
    /// The volume (or snapshot) name exists with other parameters.
    #[error("{0}")]
    AlreadyExists(String),
    /// The capacity range cannot be served (or would shrink the volume).
    #[error("{0}")]
    OutOfRange(String),
    /// The volume, snapshot or content source does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The operation is under way (the volume is not placed yet, the expansion not served yet):
    /// the caller retries with back-off.
    #[error("{0}")]
    Pending(String),
    /// No pair of nodes fits the volume (topology, selector, capacity): external-provisioner
    /// reschedules the claim.
    #[error("{0}")]
    Exhausted(String),
    /// The volume exists but cannot do this (e.g. its engines lack snapshots, or it is not a
    /// provisioned volume).
    #[error("{0}")]
    Precondition(String),
    /// The Kubernetes API or an engine could not be reached: retry.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    /// The gRPC code the CSI specification gives for this error.
    pub fn code(&self) -> tonic::Code {
        match self {
            CsiError::Invalid(_) => tonic::Code::InvalidArgument,
            CsiError::AlreadyExists(_) => tonic::Code::AlreadyExists,
            CsiError::OutOfRange(_) => tonic::Code::OutOfRange,
            CsiError::NotFound(_) => tonic::Code::NotFound,
            CsiError::Pending(_) => tonic::Code::Aborted,
            CsiError::Exhausted(_) => tonic::Code::ResourceExhausted,
            CsiError::Precondition(_) => tonic::Code::FailedPrecondition,
            CsiError::Unavailable(_) => tonic::Code::Unavailable,
            CsiError::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl From<CsiError> for tonic::Status {
    fn from(e: CsiError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// Result of the controller's logic.
pub type CsiResult<T> = std::result::Result<T, CsiError>;
