//! Who may call what, when the engine runs with `--tls-dir`: the one table of rights.
//!
//! The caller's identity comes from its certificate, verified once per connection
//! (`tandem_api::tls::server`); this module reads the verdict from the request's extensions.
//! Without TLS every call passes here (the token, `grpc::AuthInterceptor`, still applies; with
//! TLS both apply).

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use tandem_api::{
    tls::{Identity, PeerAuth, PeerInfo, VolumeRef},
    Reason,
};
use tonic::{Code, Status};

use crate::pb::TakeoverPolicy;

/// One gRPC call, as the table sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Status,
    Takeover(TakeoverPolicy),
    Failback,
    GrantLease,
    InjectFault,
    /// CreateSnapshot, DeleteSnapshot, ListSnapshots.
    Snapshot,
    /// CreateSnapshot, DeleteSnapshot of a point-in-time view (`contract::VIEW_SNAPSHOT_PREFIX`).
    View,
    /// Online expansion (the operator, and the CSI controller that runs as the operator).
    Resize,
    /// StartMove, GetMove, AbortMove: the operator only (issue 18).
    Move,
    /// Any method of the Peer service (its gRPC path).
    Peer(&'static str),
}

impl Call {
    fn name(&self) -> &'static str {
        match self {
            Call::Status => "Engine.Status",
            Call::Takeover(TakeoverPolicy::Force) => "Engine.Takeover (policy Force)",
            Call::Takeover(_) => "Engine.Takeover (policy Wait)",
            Call::Failback => "Engine.Failback",
            Call::GrantLease => "Engine.GrantLease",
            Call::InjectFault => "Engine.InjectFault",
            Call::Snapshot => "Engine.CreateSnapshot/DeleteSnapshot/ListSnapshots",
            Call::View => "Engine.CreateSnapshot/DeleteSnapshot of a view",
            Call::Resize => "Engine.Resize",
            Call::Move => "Engine.StartMove/GetMove/AbortMove",
            Call::Peer(p) => p,
        }
    }
}

/// This engine, as the table needs it.
#[derive(Clone, Debug)]
pub struct Me {
    /// From the engine's own certificate (`Identity::Engine`).
    pub volume: VolumeRef,
    /// `--node-name`: a CSI plugin may take over only the engine on its own node.
    pub node: Option<String>,
}

/// The rights. Each line is a security invariant, checked by storage-engine/tests/tls.rs
/// (`identities_get_only_their_rights`, `refused_clients_get_unauthenticated`).
fn allowed(me: &Me, who: &Identity, call: Call) -> bool {
    let same_volume = who.volume() == Some(&me.volume);
    match (who, call) {
        // Replication, handoff, proxied reads, lease renewal, Peer.Resize: only the volume's other
        // engine.
        (Identity::Engine { .. }, Call::Peer(_)) => same_volume,
        (_, Call::Peer(_)) => false,
        // Who is primary: the operator, the other engine, the volume's CSI plugin on any node.
        (Identity::Operator, Call::Status) => true,
        (Identity::Engine { .. } | Identity::Csi { .. }, Call::Status) => same_volume,
        // A plugin takes over (by handoff, never by force) only the engine on its own node.
        (Identity::Csi { node, .. }, Call::Takeover(TakeoverPolicy::Wait)) => {
            same_volume && me.node.as_deref() == Some(node.as_str())
        }
        // A plugin takes and releases point-in-time views (issue 18) only on its own node's engine.
        (Identity::Csi { node, .. }, Call::View) => {
            same_volume && me.node.as_deref() == Some(node.as_str())
        }
        // Forced promotion, failback, witness grants, fault injection, Engine.Resize, snapshots
        // (the CSI controller runs as the operator): the operator only.
        (Identity::Operator, _) => true,
        _ => false,
    }
}

/// The engine's authorization: None when it runs without TLS.
#[derive(Clone, Debug)]
pub struct Authz {
    me: Option<Arc<Me>>,
}

impl Authz {
    pub fn new(me: Option<Me>) -> Self {
        Self {
            me: me.map(Arc::new),
        }
    }

    /// Allows or refuses `call` for the peer of the connection the request came on.
    pub fn check(&self, ext: &http::Extensions, call: Call) -> Result<(), Status> {
        let Some(me) = &self.me else {
            return Ok(());
        };
        let unauthenticated = |why: &str| {
            Err(Reason::Unauthenticated.status(
                Code::Unauthenticated,
                format!("this engine requires mutual TLS: {why}"),
            ))
        };
        // A request without connection info never came through the TLS acceptor: refuse.
        let Some(info) = ext.get::<PeerInfo>() else {
            return unauthenticated("no connection information");
        };
        let who = match &info.auth {
            PeerAuth::Verified(id) => id,
            PeerAuth::Plaintext => return unauthenticated("the client spoke plaintext"),
            PeerAuth::Refused(why) => return unauthenticated(why),
            PeerAuth::NotRequired => return unauthenticated("the connection was not checked"),
        };
        if allowed(me, who, call) {
            Ok(())
        } else {
            Err(Reason::PermissionDenied.status(
                Code::PermissionDenied,
                format!("the {who} may not call {} on this engine", call.name()),
            ))
        }
    }
}

/// The Peer service behind [`Authz`]: every method is checked by its path (after the token)
/// before the service sees the request.
#[derive(Clone)]
pub struct PeerAuthz<S> {
    inner: S,
    authz: Authz,
}

impl<S> PeerAuthz<S> {
    pub fn new(inner: S, authz: Authz) -> Self {
        Self { inner, authz }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for PeerAuthz<S> {
    const NAME: &'static str = S::NAME;
}

fn peer_method(path: &str) -> &'static str {
    // The names are the proto's; anything else is still a Peer call, named generically.
    match path.rsplit('/').next() {
        Some("Replicate") => "Peer.Replicate",
        Some("FenceAndHandoff") => "Peer.FenceAndHandoff",
        Some("ReadBlocks") => "Peer.ReadBlocks",
        Some("RenewLease") => "Peer.RenewLease",
        Some("Resize") => "Peer.Resize",
        Some("ForwardWrite") => "Peer.ForwardWrite",
        Some("Announce") => "Peer.Announce",
        _ => "a Peer method",
    }
}

impl<S, B> tower_service::Service<http::Request<B>> for PeerAuthz<S>
where
    S: tower_service::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = Call::Peer(peer_method(req.uri().path()));
        match self.authz.check(req.extensions(), call) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Me {
        Me {
            volume: VolumeRef::new("ns", "vol"),
            node: Some("node-a".into()),
        }
    }

    fn with(auth: PeerAuth) -> http::Extensions {
        let mut ext = http::Extensions::new();
        ext.insert(PeerInfo { remote: None, auth });
        ext
    }

    fn code(r: Result<(), Status>) -> Option<Code> {
        r.err().map(|s| s.code())
    }

    #[test]
    fn the_table() {
        let v = VolumeRef::new("ns", "vol");
        let other = VolumeRef::new("ns", "other");
        let engine = Identity::Engine { volume: v.clone() };
        let foreign_engine = Identity::Engine {
            volume: other.clone(),
        };
        let csi_here = Identity::Csi {
            volume: v.clone(),
            node: "node-a".into(),
        };
        let csi_there = Identity::Csi {
            volume: v.clone(),
            node: "node-b".into(),
        };
        let foreign_csi = Identity::Csi {
            volume: other,
            node: "node-a".into(),
        };
        let op = Identity::Operator;
        let wait = Call::Takeover(TakeoverPolicy::Wait);
        let force = Call::Takeover(TakeoverPolicy::Force);
        let peer = Call::Peer("Peer.Replicate");
        let cases: &[(&Identity, Call, bool)] = &[
            (&engine, peer, true),
            (&foreign_engine, peer, false),
            (&csi_here, peer, false),
            (&op, peer, false),
            (&engine, Call::Status, true),
            (&csi_there, Call::Status, true),
            (&foreign_csi, Call::Status, false),
            (&foreign_engine, Call::Status, false),
            (&op, Call::Status, true),
            (&csi_here, wait, true),
            (&csi_there, wait, false),
            (&foreign_csi, wait, false),
            (&csi_here, force, false),
            (&engine, wait, false),
            (&op, force, true),
            (&op, Call::Failback, true),
            (&csi_here, Call::Failback, false),
            (&csi_here, Call::GrantLease, false),
            (&engine, Call::GrantLease, false),
            (&op, Call::GrantLease, true),
            (&csi_here, Call::InjectFault, false),
            (&op, Call::InjectFault, true),
            // Snapshots: the operator (and the CSI controller, which runs as it) only.
            (&op, Call::Snapshot, true),
            (&csi_here, Call::Snapshot, false),
            (&csi_there, Call::Snapshot, false),
            (&engine, Call::Snapshot, false),
            (&foreign_engine, Call::Snapshot, false),
            // Views: the plugin on the engine's own node, and the operator.
            (&op, Call::View, true),
            (&csi_here, Call::View, true),
            (&csi_there, Call::View, false),
            (&foreign_csi, Call::View, false),
            (&engine, Call::View, false),
            (&op, Call::Resize, true),
            (&csi_here, Call::Resize, false),
            (&engine, Call::Resize, false),
            (&foreign_engine, Call::Resize, false),
            (&engine, Call::Peer("Peer.Resize"), true),
            (&op, Call::Move, true),
            (&csi_here, Call::Move, false),
            (&engine, Call::Move, false),
            (&engine, Call::Peer("Peer.ForwardWrite"), true),
            (&foreign_engine, Call::Peer("Peer.ForwardWrite"), false),
            (&foreign_engine, Call::Peer("Peer.Resize"), false),
            (&csi_here, Call::Peer("Peer.Resize"), false),
            (&op, Call::Peer("Peer.Resize"), false),
        ];
        for (who, call, ok) in cases {
            assert_eq!(allowed(&me(), who, *call), *ok, "{who} {}", call.name());
        }
        // No --node-name: no plugin may take over.
        let nameless = Me { node: None, ..me() };
        assert!(!allowed(&nameless, &csi_here, wait));
    }

    #[test]
    fn refusals_say_who_and_what() {
        let a = Authz::new(Some(me()));
        let id = Identity::Csi {
            volume: VolumeRef::new("ns", "vol"),
            node: "node-a".into(),
        };
        let err = a
            .check(&with(PeerAuth::Verified(id)), Call::GrantLease)
            .err();
        let err = err.map(|s| (s.code(), s.message().to_string(), Reason::of(&s)));
        assert_eq!(
            err,
            Some((
                Code::PermissionDenied,
                "the CSI plugin on node-a for ns/vol may not call Engine.GrantLease on this engine"
                    .to_string(),
                Some(Reason::PermissionDenied)
            ))
        );
        for auth in [
            PeerAuth::Plaintext,
            PeerAuth::Refused("certificate expired".into()),
            PeerAuth::NotRequired,
        ] {
            assert_eq!(
                code(a.check(&with(auth), Call::Status)),
                Some(Code::Unauthenticated)
            );
        }
        assert_eq!(
            code(a.check(&http::Extensions::new(), Call::Status)),
            Some(Code::Unauthenticated)
        );
        // Without TLS nothing is checked here.
        assert_eq!(
            code(Authz::new(None).check(&http::Extensions::new(), Call::GrantLease)),
            None
        );
    }
}
