//! Tandem operator: reconciles `MirroredVolume`s (`tandem.dev/v1alpha1`) into a pair of engine pods, their
//! Services, the token and certificate Secrets (all in the operator's namespace), a PersistentVolume for
//! `csi.tandem.dev` and optionally a claim, and orchestrates failover when an engine or its node is lost.
//!
//! Layout: [`crd`] (types), [`observed`] (facts from the API), [`plan`], [`failover`] and [`disruption`]
//! (pure decisions; `disruption`: engine restarts and node drains),
//! [`controller`] (the reconciler: observe, decide, act, status), [`engine`] (the engine API behind a trait),
//! [`leader`] (Lease election), [`metrics`], [`http`] (probes and `/metrics`), [`telemetry`] (logs),
//! [`certs`] (the operator's CA and the certificates it mints per volume), [`csi`] (the CSI Controller
//! service, `tandem-operator csi-controller`: dynamic provisioning, expansion, snapshots).

pub mod certs;
pub mod controller;
pub mod crd;
pub mod crd_manage;
pub mod csi;
pub mod disruption;
pub mod engine;
pub mod engine_pod;
pub mod failover;
pub mod http;
pub mod kubectl;
pub mod leader;
pub mod metrics;
pub mod moving;
pub mod observed;
pub mod placement;
pub mod plan;
pub mod switchover;
pub mod telemetry;
pub mod wipe;
pub mod witness;

#[cfg(test)]
pub mod fixtures;

/// Errors of the operator's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API error: {0}")]
    Kube(#[source] kube::Error),

    /// An object could not be serialized for an apply patch.
    #[error("serialization error: {0}")]
    Serialization(#[source] serde_json::Error),

    /// The finalizer machinery failed (adding/removing it, or the wrapped apply/cleanup).
    #[error("finalizer error: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    /// The object lacks a namespace or name.
    #[error("MirroredVolume has no {0}")]
    MissingObjectKey(&'static str),

    /// Cleanup must wait: a claim still uses the volume.
    #[error("volume still in use by claim {0}")]
    VolumeInUse(String),

    /// Deletion waits for something to finish (engines stopping, a wipe running); retried soon.
    #[error("deletion in progress: {0}")]
    CleanupPending(String),

    /// Could not make a token for the volume.
    #[error("cannot generate a token: {0}")]
    Token(String),

    /// The CA or a certificate could not be loaded or minted.
    #[error("certificates: {0}")]
    Tls(String),
}

impl Error {
    /// A short label for the failures metric, e.g. `kube` or `finalizer(applyfailed(kube))`.
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube(_) => "kube".into(),
            Error::Serialization(_) => "serialization".into(),
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) => {
                    format!("finalizer(applyfailed({}))", e.metric_label())
                }
                kube::runtime::finalizer::Error::CleanupFailed(e) => {
                    format!("finalizer(cleanupfailed({}))", e.metric_label())
                }
                kube::runtime::finalizer::Error::AddFinalizer(_) => {
                    "finalizer(addfinalizer)".into()
                }
                kube::runtime::finalizer::Error::RemoveFinalizer(_) => {
                    "finalizer(removefinalizer)".into()
                }
                _ => "finalizer(other)".into(),
            },
            Error::MissingObjectKey(_) => "missingobjectkey".into(),
            Error::VolumeInUse(_) => "volumeinuse".into(),
            Error::CleanupPending(_) => "cleanuppending".into(),
            Error::Token(_) => "token".into(),
            Error::Tls(_) => "tls".into(),
        }
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
