//! What the engine answers when it says no, as one type. Every layer returns an `EngineError`;
//! the gRPC services turn it into a `tonic::Status` in one place (`From<EngineError> for Status`),
//! with a machine-readable reason (`tandem_api::Reason`) the operator and the CSI plugin match on.
//! The messages are for people and keep the words earlier releases printed.

use std::io;

use tandem_api::Reason;

use crate::state::Refusal;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown volume {0:?}")]
    UnknownVolume(String),
    /// The request itself is malformed: a block out of range, too many blocks, a bad token string.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotPaired(&'static str),
    /// The state machine said no (`state::next`).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A request at an epoch older than the engine's (a stale stream, a stale takeover).
    #[error("{0}")]
    StaleEpoch(String),
    /// The engine's role forbids the request.
    #[error("{0}")]
    WrongRole(String),
    /// The peer answered the handoff, and said no: nothing was promoted, whatever the policy.
    #[error("HandoffRefused: {0}; not promoted")]
    HandoffRefused(String),
    /// The peer could not be reached and the policy (or a torn replica) forbids promoting.
    #[error("{0}")]
    HandoffBlocked(String),
    /// A concurrent role change won the race: nothing changed.
    #[error("{0}")]
    Superseded(String),
    #[error("DrainNotAbandoned: the old primary answers ({0}); its drain goes on")]
    DrainNotAbandoned(String),
    /// Bytes that fail their checksum, a table of the wrong size: refused before anything lands.
    #[error("{0}")]
    Corrupt(String),
    /// A record out of order in the replication stream.
    #[error("{0}")]
    Gap(String),
    /// The engine's own I/O failed.
    #[error("{0}")]
    Io(String),
    /// A forced promotion must wait out the old primary's possible lease: nothing was promoted.
    #[error("LeaseHeld: {0}")]
    LeaseHeld(String),
    /// A witness's grant that does not match this engine: nothing was granted.
    #[error("LeaseRefused: {0}")]
    LeaseRefused(String),
    /// A resize during a takeover's drain or merge: nothing changed, retry once it ends.
    #[error("TakeoverInProgress: {0}")]
    TakeoverInProgress(String),
    /// The peer a request needs first could not be reached: nothing changed here.
    #[error("PeerUnreachable: {0}")]
    PeerUnreachable(String),
    /// A live move is under way: nothing changed, retry once it is done or aborted.
    #[error("MoveInProgress: {0}")]
    MoveInProgress(String),
    /// AbortMove after the cutover.
    #[error("MoveCompleted: {0}")]
    MoveCompleted(String),
}

impl EngineError {
    /// An I/O failure, with what the engine was doing.
    pub fn io(what: impl std::fmt::Display) -> Self {
        EngineError::Io(what.to_string())
    }
}

impl From<io::Error> for EngineError {
    fn from(e: io::Error) -> Self {
        EngineError::Io(e.to_string())
    }
}

impl From<crate::volume::TransitionError> for EngineError {
    fn from(e: crate::volume::TransitionError) -> Self {
        match e {
            crate::volume::TransitionError::Refused(r) => EngineError::Refused(r),
            crate::volume::TransitionError::Io(e) => EngineError::Io(e.to_string()),
        }
    }
}

impl EngineError {
    /// The machine-readable reason a client matches on.
    pub fn reason(&self) -> Reason {
        match self {
            EngineError::UnknownVolume(_) => Reason::UnknownVolume,
            EngineError::InvalidArgument(_) => Reason::InvalidArgument,
            EngineError::NotPaired(_) => Reason::NotPaired,
            EngineError::Refused(Refusal::StaleEpoch { .. }) | EngineError::StaleEpoch(_) => {
                Reason::StaleEpoch
            }
            EngineError::Refused(Refusal::NoPrimaryHere { .. })
            | EngineError::Refused(Refusal::AlreadyPrimary { .. })
            | EngineError::WrongRole(_) => Reason::WrongRole,
            EngineError::Refused(Refusal::NoUsableData) => Reason::NeverSynced,
            EngineError::Refused(Refusal::Superseded { .. }) | EngineError::Superseded(_) => {
                Reason::Superseded
            }
            EngineError::HandoffRefused(_) => Reason::HandoffRefused,
            EngineError::HandoffBlocked(_) => Reason::HandoffBlocked,
            EngineError::DrainNotAbandoned(_) => Reason::DrainNotAbandoned,
            EngineError::Corrupt(_) => Reason::Corrupt,
            EngineError::Gap(_) => Reason::StreamGap,
            EngineError::Io(_) => Reason::Internal,
            EngineError::LeaseHeld(_) => Reason::LeaseHeld,
            EngineError::LeaseRefused(_) => Reason::LeaseRefused,
            EngineError::TakeoverInProgress(_) => Reason::TakeoverInProgress,
            EngineError::PeerUnreachable(_) => Reason::PeerUnreachable,
            EngineError::MoveInProgress(_) => Reason::MoveInProgress,
            EngineError::MoveCompleted(_) => Reason::MoveCompleted,
        }
    }
}

impl From<EngineError> for tonic::Status {
    fn from(e: EngineError) -> Self {
        use tonic::Code;
        let code = match &e {
            EngineError::UnknownVolume(_) => Code::NotFound,
            EngineError::InvalidArgument(_) => Code::InvalidArgument,
            EngineError::Refused(Refusal::Superseded { .. }) | EngineError::Superseded(_) => {
                Code::Aborted
            }
            EngineError::NotPaired(_)
            | EngineError::Refused(_)
            | EngineError::StaleEpoch(_)
            | EngineError::WrongRole(_)
            | EngineError::HandoffRefused(_)
            | EngineError::DrainNotAbandoned(_)
            | EngineError::Gap(_)
            | EngineError::LeaseRefused(_)
            | EngineError::TakeoverInProgress(_)
            | EngineError::MoveInProgress(_)
            | EngineError::MoveCompleted(_) => Code::FailedPrecondition,
            EngineError::HandoffBlocked(_)
            | EngineError::LeaseHeld(_)
            | EngineError::PeerUnreachable(_) => Code::Unavailable,
            EngineError::Corrupt(_) => Code::DataLoss,
            EngineError::Io(_) => Code::Internal,
        };
        e.reason().status(code, e.to_string())
    }
}
