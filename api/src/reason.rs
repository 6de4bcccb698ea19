//! Why the engine said no, in a form programs match on: a [`Reason`] travels with the gRPC status
//! as a `google.rpc.ErrorInfo` detail (domain [`REASON_DOMAIN`]); the message stays for humans.

use std::collections::HashMap;

use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every reason the engine attaches.
pub const REASON_DOMAIN: &str = "tandem.dev";

/// A stable, machine-readable cause of a refused engine call (or of an unhealthy engine's
/// `StatusReply.condition`). The names are part of the API: never rename one, only add.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Missing or wrong volume token, or (mutual TLS) no acceptable client certificate.
    Unauthenticated,
    /// The engine does not serve the volume the request names.
    UnknownVolume,
    /// The request itself is malformed (a block out of range, too many blocks).
    InvalidArgument,
    /// The volume has no peer: nothing to take over from, no link to inject faults into.
    NotPaired,
    /// The request's epoch is not newer than the engine's own.
    StaleEpoch,
    /// The engine's role forbids the request (a secondary asked to hand off, a primary asked to take
    /// over at another epoch, proxied reads from an engine that is not fenced).
    WrongRole,
    /// This replica never completed its initial copy and holds no usable data.
    NeverSynced,
    /// The peer answered the handoff with a refusal: nothing was promoted.
    HandoffRefused,
    /// The peer could not be reached and the policy (or a torn replica) forbids promoting without
    /// its table: nothing was promoted. Also a `condition`.
    HandoffBlocked,
    /// A concurrent role change won the race: nothing changed.
    Superseded,
    /// A forced takeover while draining found the old primary answering: its drain goes on.
    DrainNotAbandoned,
    /// `InjectFault` on an engine started without `--fault-injection`.
    FaultInjectionOff,
    /// A `condition` only: the engine serves, but with less than two good copies (a failed sync,
    /// a proxied read that failed, sync-mode writes standing on one copy).
    Degraded,
    /// Bytes that fail their checksum, a table of the wrong size: refused before anything landed.
    Corrupt,
    /// A record out of order in the replication stream: the sender resumes or resyncs.
    StreamGap,
    /// The engine's own I/O failed.
    Internal,
    /// A forced promotion must wait: the old primary may still hold a write lease this engine
    /// promised (or must assume after a restart). Nothing was promoted; retry after the time given.
    LeaseHeld,
    /// A GrantLease that does not match this engine (another instance, epoch or a stamp from the
    /// future), or on an engine that is not a paired primary: nothing granted.
    LeaseRefused,
    /// The caller's certificate names an identity that may not make this call (mutual TLS).
    PermissionDenied,
    /// A request that must wait for a takeover's drain or merge to end (a resize): nothing
    /// changed; retry later.
    TakeoverInProgress,
    /// The peer could not be reached for a request that needs it first (a resize grows the
    /// secondary before the primary): nothing changed here; retry later.
    PeerUnreachable,
    /// A live move of the secondary is under way (issue 18): a takeover, a resize or a move to
    /// another engine waits until it is done or aborted. Nothing changed; retry later.
    MoveInProgress,
    /// AbortMove after the move's cutover: the new engine is the secondary already.
    MoveCompleted,
}

impl Reason {
    /// Every reason, for parsing and tests.
    pub const ALL: [Reason; 23] = [
        Reason::Unauthenticated,
        Reason::UnknownVolume,
        Reason::InvalidArgument,
        Reason::NotPaired,
        Reason::StaleEpoch,
        Reason::WrongRole,
        Reason::NeverSynced,
        Reason::HandoffRefused,
        Reason::HandoffBlocked,
        Reason::Superseded,
        Reason::DrainNotAbandoned,
        Reason::FaultInjectionOff,
        Reason::Degraded,
        Reason::Corrupt,
        Reason::StreamGap,
        Reason::Internal,
        Reason::LeaseHeld,
        Reason::LeaseRefused,
        Reason::PermissionDenied,
        Reason::TakeoverInProgress,
        Reason::PeerUnreachable,
        Reason::MoveInProgress,
        Reason::MoveCompleted,
    ];

    /// The stable name on the wire (`ErrorInfo.reason`), also used as a Kubernetes condition reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unauthenticated => "Unauthenticated",
            Reason::UnknownVolume => "UnknownVolume",
            Reason::InvalidArgument => "InvalidArgument",
            Reason::NotPaired => "NotPaired",
            Reason::StaleEpoch => "StaleEpoch",
            Reason::WrongRole => "WrongRole",
            Reason::NeverSynced => "NeverSynced",
            Reason::HandoffRefused => "HandoffRefused",
            Reason::HandoffBlocked => "HandoffBlocked",
            Reason::Superseded => "Superseded",
            Reason::DrainNotAbandoned => "DrainNotAbandoned",
            Reason::FaultInjectionOff => "FaultInjectionOff",
            Reason::Degraded => "Degraded",
            Reason::Corrupt => "Corrupt",
            Reason::StreamGap => "StreamGap",
            Reason::Internal => "Internal",
            Reason::LeaseHeld => "LeaseHeld",
            Reason::LeaseRefused => "LeaseRefused",
            Reason::PermissionDenied => "PermissionDenied",
            Reason::TakeoverInProgress => "TakeoverInProgress",
            Reason::PeerUnreachable => "PeerUnreachable",
            Reason::MoveInProgress => "MoveInProgress",
            Reason::MoveCompleted => "MoveCompleted",
        }
    }

    /// The reason named `name`; `None` for a name this build does not know (a newer engine).
    pub fn from_name(name: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// A status with this reason attached.
    pub fn status(self, code: tonic::Code, message: impl Into<String>) -> tonic::Status {
        let details = ErrorDetails::with_error_info(self.as_str(), REASON_DOMAIN, HashMap::new());
        tonic::Status::with_error_details(code, message, details)
    }

    /// The reason the engine attached to `status`; `None` when there is none (a transport error,
    /// an older engine, another domain).
    pub fn of(status: &tonic::Status) -> Option<Reason> {
        let info = status.get_details_error_info()?;
        if info.domain != REASON_DOMAIN {
            return None;
        }
        Reason::from_name(&info.reason)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn every_reason_survives_a_status_round_trip() {
        for r in Reason::ALL {
            let s = r.status(Code::FailedPrecondition, format!("{r}: for humans"));
            assert_eq!(s.code(), Code::FailedPrecondition);
            assert_eq!(s.message(), format!("{r}: for humans"));
            assert_eq!(Reason::of(&s), Some(r));
            assert_eq!(Reason::from_name(r.as_str()), Some(r));
            // Through the wire form: what a client decodes from the trailers.
            let wire = s.clone().into_http::<()>();
            let back = tonic::Status::from_header_map(wire.headers()).unwrap();
            assert_eq!(Reason::of(&back), Some(r));
        }
    }

    #[test]
    fn a_status_without_a_reason_has_none() {
        assert_eq!(Reason::of(&tonic::Status::unavailable("down")), None);
        // Text that looks like a reason is still no reason.
        assert_eq!(
            Reason::of(&tonic::Status::unavailable("HandoffBlocked: x")),
            None
        );
        let foreign = tonic::Status::with_error_details(
            Code::Aborted,
            "x",
            ErrorDetails::with_error_info("HandoffBlocked", "example.com", HashMap::new()),
        );
        assert_eq!(Reason::of(&foreign), None);
        assert_eq!(Reason::from_name("NoSuchReason"), None);
    }
}
