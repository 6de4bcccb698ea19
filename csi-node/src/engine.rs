//! Talking to the volume's engines: who is primary, and takeover. Behind [`EngineApi`] so the node
//! logic is tested with a fake; [`GrpcEngines`] is the real one (the engine's typed gRPC client).
//!
//! [`plan`] is the decision itself, a pure function of this node's name and the engines' answers.

use std::future::Future;
use std::time::Duration;

use tandem_api::client::{EngineClient, TakeoverPolicy};
use tandem_api::contract::{secret_csi_cert_key, secret_csi_key_key, SECRET_CA_KEY};
use tandem_api::pb::Role as PbRole;
use tandem_api::tls::{ClientTls, Identity};

use crate::context::EngineRef;
pub use crate::error::EngineError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
    Fenced,
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineStatus {
    pub role: Role,
    pub epoch: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TakeoverOutcome {
    pub epoch: u64,
    pub ready_ms: u64,
    pub peer_pending_blocks: u64,
    pub lost_blocks: u64,
    pub already_primary: bool,
}

/// The TLS entries of NodeStageVolume's secrets (`ca.crt`, `csi.<node>.crt`, `csi.<node>.key`);
/// never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsSecrets(pub std::collections::BTreeMap<String, String>);

impl std::fmt::Debug for TlsSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl TlsSecrets {
    /// The TLS entries among a Secret's keys.
    pub fn from_secrets(secrets: &std::collections::HashMap<String, String>) -> Self {
        TlsSecrets(
            secrets
                .iter()
                .filter(|(k, _)| k.as_str() == SECRET_CA_KEY || k.starts_with("csi."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    /// The entries this node's plugin uses: the CA and its own pair (what a view's record keeps).
    pub fn for_node(&self, node: &str) -> std::collections::BTreeMap<String, String> {
        let keep = [
            SECRET_CA_KEY.to_string(),
            secret_csi_cert_key(node),
            secret_csi_key_key(node),
        ];
        self.0
            .iter()
            .filter(|(k, _)| keep.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// This node's client credentials: None when the Secret has no CA (plaintext); an error
    /// when it has a CA but not this node's pair, or a pair that is not the CSI plugin of this
    /// node (a Secret must not let one node speak as another).
    pub fn client(&self, node: &str) -> Result<Option<ClientTls>, String> {
        let Some(ca) = self.0.get(SECRET_CA_KEY) else {
            return Ok(None);
        };
        let (ck, kk) = (secret_csi_cert_key(node), secret_csi_key_key(node));
        let (Some(cert), Some(key)) = (self.0.get(&ck), self.0.get(&kk)) else {
            return Err(format!(
                "the Secret has {SECRET_CA_KEY} but not {ck} and {kk}"
            ));
        };
        let tls = ClientTls::from_pem(ca, cert, key).map_err(|e| format!("{ck}: {e}"))?;
        match tls.source().map(|s| s.identity()) {
            // Only an engine of the volume our certificate names may answer.
            Some(Identity::Csi { volume, node: n }) if n == node => {
                Ok(Some(tls.expect_volume(volume)))
            }
            Some(other) => Err(format!(
                "{ck} names the {other}, not this node's CSI plugin"
            )),
            None => Err(format!("{ck}: no identity")),
        }
    }
}

/// How the plugin authenticates to a volume's engines: the volume token, and this node's
/// certificate when the volume's Secret carries one.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub token: String,
    pub tls: Option<ClientTls>,
}

/// What the node plugin needs from an engine.
pub trait EngineApi: Send + Sync + 'static {
    fn status(
        &self,
        addr: &str,
        volume: &str,
        creds: &Credentials,
    ) -> impl Future<Output = Result<EngineStatus, EngineError>> + Send;

    /// A takeover by handoff (policy Wait): the old primary fences itself and hands over its
    /// table, or the call fails (old primary unreachable: UNAVAILABLE). Never forced.
    fn takeover(
        &self,
        addr: &str,
        volume: &str,
        creds: &Credentials,
        timeout: Duration,
    ) -> impl Future<Output = Result<TakeoverOutcome, EngineError>> + Send;

    /// Takes point-in-time view `id` (a `view-` snapshot) on the engine at `addr`; returns it as it
    /// is when it exists already (the engine's CreateSnapshot is idempotent by id).
    fn create_view(
        &self,
        addr: &str,
        volume: &str,
        creds: &Credentials,
        id: &str,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// Deletes view `id`; false when there was none.
    fn delete_view(
        &self,
        addr: &str,
        volume: &str,
        creds: &Credentials,
        id: &str,
    ) -> impl Future<Output = Result<bool, EngineError>> + Send;
}

/// How long a view's create or delete may take (a reflink or a copy-on-write area: quick, but
/// the engine holds host writes for as long as a FLUSH).
const VIEW_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The real engines, over gRPC (`tandem.engine.v1`).
#[derive(Clone, Debug)]
pub struct GrpcEngines {
    pub status_timeout: Duration,
}

impl Default for GrpcEngines {
    fn default() -> Self {
        GrpcEngines {
            status_timeout: Duration::from_secs(10),
        }
    }
}

impl EngineApi for GrpcEngines {
    async fn status(
        &self,
        addr: &str,
        volume: &str,
        creds: &Credentials,
    ) -> Result<EngineStatus, EngineError> {
        let call = async {
            let mut c = EngineClient::connect_with(addr, Some(&creds.token), creds.tls.as_ref())
                .await
                .map_err(|e| EngineError::from_client(addr, volume, "Status", e))?;
            c.status(volume)
                .await
                .map_err(|e| EngineError::from_client(addr, volume, "Status", e))
        };
        let reply = tokio::time::timeout(self.status_timeout, call)
            .await
            .map_err(|_| EngineError::Unreachable {
                addr: addr.to_string(),
                message: format!("no answer within {:?}", self.status_timeout),
            })??;
        let role = match PbRole::try_from(reply.role) {
            Ok(PbRole::Primary) => Role::Primary,
            Ok(PbRole::Secondary) => Role::Secondary,
            Ok(PbRole::Fenced) => Role::Fenced,
            _ => Role::Unknown,
        };
        Ok(EngineStatus {
            role,
            epoch: reply.epoch,
        })
    }

    async fn takeover(
        &self,
        addr: &str,
        volume: &str,
        creds: &Credentials,
        timeout: Duration,
    ) -> Result<TakeoverOutcome, EngineError> {
        // Safety (issue 12, no split brain): the plugin never forces a promotion. With write
        // leases a forced promotion is safe only for the witness (the operator), which waits out
        // the old primary's lease and then grants the new primary one; a stage that forced would
        // promote behind the witness's back. Whatever the volume's policy, this is a handoff.
        // Checked by node::tests::stage_never_forces_whatever_the_policy and the e2e test
        // staging_while_the_primary_is_dead_is_unavailable_whatever_the_policy.
        let pol = TakeoverPolicy::Wait;
        let call = async {
            let mut c = EngineClient::connect_with(addr, Some(&creds.token), creds.tls.as_ref())
                .await
                .map_err(|e| EngineError::from_client(addr, volume, "Takeover", e))?;
            c.takeover(volume, pol, timeout)
                .await
                .map_err(|e| EngineError::from_client(addr, volume, "Takeover", e))
        };
        // The engine bounds its own wait by `timeout`; allow it a margin to answer.
        let r = tokio::time::timeout(timeout + Duration::from_secs(10), call)
            .await
            .map_err(|_| EngineError::Unreachable {
                addr: addr.to_string(),
                message: format!("takeover did not answer within {timeout:?} + 10s"),
            })??;
        Ok(TakeoverOutcome {
            epoch: r.epoch,
            ready_ms: r.ready_ms,
            peer_pending_blocks: r.peer_pending_blocks,
            lost_blocks: r.lost_blocks,
            already_primary: r.already_primary,
        })
    }

    async fn create_view(
        &self,
        addr: &str,
        volume: &str,
        creds: &Credentials,
        id: &str,
    ) -> Result<(), EngineError> {
        let op = "CreateSnapshot";
        let call = async {
            let mut c = EngineClient::connect_with(addr, Some(&creds.token), creds.tls.as_ref())
                .await
                .map_err(|e| EngineError::from_client(addr, volume, op, e))?;
            c.create_snapshot(volume, id)
                .await
                .map_err(|e| EngineError::from_client(addr, volume, op, e))
        };
        tokio::time::timeout(VIEW_CALL_TIMEOUT, call)
            .await
            .map_err(|_| EngineError::Unreachable {
                addr: addr.to_string(),
                message: format!("{op} of {id} did not answer within {VIEW_CALL_TIMEOUT:?}"),
            })?
            .map(|_| ())
    }

    async fn delete_view(
        &self,
        addr: &str,
        volume: &str,
        creds: &Credentials,
        id: &str,
    ) -> Result<bool, EngineError> {
        let op = "DeleteSnapshot";
        let call = async {
            let mut c = EngineClient::connect_with(addr, Some(&creds.token), creds.tls.as_ref())
                .await
                .map_err(|e| EngineError::from_client(addr, volume, op, e))?;
            c.delete_snapshot(volume, id)
                .await
                .map_err(|e| EngineError::from_client(addr, volume, op, e))
        };
        tokio::time::timeout(VIEW_CALL_TIMEOUT, call)
            .await
            .map_err(|_| EngineError::Unreachable {
                addr: addr.to_string(),
                message: format!("{op} of {id} did not answer within {VIEW_CALL_TIMEOUT:?}"),
            })?
            .map(|r| r.deleted)
    }
}

/// What NodeStageVolume should do, given every engine's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Attach to this engine's NBD export (the primary, or for a read-only stage on the
    /// secondary's node with current reads the secondary, which serves read-only sessions).
    Attach { engine: EngineRef, epoch: u64 },
    /// This node's engine is the secondary: take over, then attach to it.
    TakeoverThenAttach { engine: EngineRef },
    /// This node's engine is the secondary and the stage only reads: take a point-in-time view
    /// there and attach its snapshot export.
    View { engine: EngineRef, epoch: u64 },
}

/// What a read-only stage on the secondary's node gets from the secondary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondaryRead {
    /// Nothing (`secondaryAccess: None`): FAILED_PRECONDITION.
    Refused,
    /// The live secondary, read-only: current reads (`ReadWrite` with read mode `Current`).
    Current,
    /// A point-in-time view (`ReadOnly`, or `ReadWrite` with read mode `Snapshot`).
    View,
}

/// What a stage asks for: writing, or only reading (a read-only access mode or mount), and then
/// what the volume's secondary gives a reader on its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Write,
    /// A writer beside a writer on the other node (MULTI_NODE_MULTI_WRITER, raw block,
    /// `secondaryAccess: ReadWrite`): on the secondary's node the secondary serves it, forwarding
    /// its writes to the primary; it never takes over (that would fence the other writer).
    WriteShared,
    Read(SecondaryRead),
}

/// Decides where to attach (DESIGN.md §6): the primary with the highest epoch, unless this node holds
/// the secondary: then a writable stage is the failover trigger, and a read-only one never is (issue
/// 12 item 6: it reads from the secondary if that serves reads, else FAILED_PRECONDITION). The
/// engine attached to is always this node's (issue 13): when the volume is served from another
/// node, a stage here is UNAVAILABLE if this node holds one of its engines (down, fenced or behind:
/// kubelet retries) and FAILED_PRECONDITION if it holds none. Errors otherwise: every engine
/// rejected the token → that error; every engine that answered does not know the volume → not
/// found; no usable engine → unavailable (kubelet retries).
pub fn plan(
    node_id: &str,
    answers: &[(EngineRef, Result<EngineStatus, EngineError>)],
    want: Want,
) -> Result<Plan, crate::error::Error> {
    refusals(answers)?;
    let plan = plan_anywhere(node_id, answers, want)?;
    // Safety: NBD never leaves the node. Engines serve it on a unix socket shared only with this
    // node's plugin, and a plan that names another node's engine is refused here rather than
    // attempted across the network (tests::a_remote_primary_is_never_attached,
    // node::tests::a_stage_never_attaches_across_nodes).
    match plan {
        Plan::Attach { engine, .. } if engine.node != node_id => {
            Err(remote_refusal(node_id, answers, &engine))
        }
        p => Ok(p),
    }
}

/// Why a stage on `node_id` cannot attach to `remote`, the engine serving the volume: this node's
/// engine is not serving yet (UNAVAILABLE: kubelet retries, and it attaches once this node's
/// engine is back or a takeover moved the volume here), or this node holds no engine of the
/// volume at all (FAILED_PRECONDITION: the workload belongs on one of the engines' nodes).
fn remote_refusal(
    node_id: &str,
    answers: &[(EngineRef, Result<EngineStatus, EngineError>)],
    remote: &EngineRef,
) -> crate::error::Error {
    use crate::error::Error;
    match answers.iter().find(|(e, _)| e.node == node_id) {
        Some((_, r)) => {
            let local = match r {
                Ok(s) => format!("{:?} at epoch {}", s.role, s.epoch),
                Err(e) => format!("unreachable ({e})"),
            };
            Error::PrimaryUnavailable(format!(
                "the volume is served by the engine on {}, and NBD is never attached across \
                 nodes; this node's engine is {local}: the stage attaches once it serves the \
                 volume (after it restarts, or once a takeover can move the volume here)",
                remote.node
            ))
        }
        None => {
            let nodes: Vec<&str> = answers.iter().map(|(e, _)| e.node.as_str()).collect();
            Error::PreconditionFailed(format!(
                "node {node_id} holds no engine of this volume (its engines run on {}), and NBD \
                 is never attached across nodes: schedule the workload onto one of those nodes",
                nodes.join(", ")
            ))
        }
    }
}

/// [`plan`] before the same-node rule: the engine that serves the volume, wherever it runs.
fn plan_anywhere(
    node_id: &str,
    answers: &[(EngineRef, Result<EngineStatus, EngineError>)],
    want: Want,
) -> Result<Plan, crate::error::Error> {
    use crate::error::Error;
    let primary = highest_primary(answers);
    let local = answers.iter().find(|(e, _)| e.node == node_id);
    match (local, primary) {
        // Safety: only a writable stage takes over; a read-only stage (a backup mount, a
        // reader) must not move the primary away from its writer. Checked by
        // tests::a_read_only_stage_on_the_secondarys_node_never_takes_over and the e2e test
        // a_read_only_stage_on_the_secondarys_node_does_not_take_over.
        (Some((e, Ok(s))), _) if s.role == Role::Secondary => match want {
            Want::Write => Ok(Plan::TakeoverThenAttach { engine: e.clone() }),
            Want::WriteShared => Ok(Plan::Attach {
                engine: e.clone(),
                epoch: s.epoch,
            }),
            Want::Read(SecondaryRead::Current) => Ok(Plan::Attach {
                engine: e.clone(),
                epoch: s.epoch,
            }),
            Want::Read(SecondaryRead::View) => Ok(Plan::View {
                engine: e.clone(),
                epoch: s.epoch,
            }),
            Want::Read(SecondaryRead::Refused) => Err(Error::PreconditionFailed(format!(
                "a read-only stage on {node_id}, which holds the volume's secondary: it never \
                 takes over, and the secondary serves no reads (secondaryAccess is None); stage \
                 it read-write to move the volume here, or give the volume secondaryAccess: \
                 ReadOnly (point-in-time views) or ReadWrite"
            ))),
        },
        (Some((e, Ok(s))), Some((_, top))) if s.role == Role::Primary && s.epoch >= top => {
            Ok(Plan::Attach {
                engine: e.clone(),
                epoch: s.epoch,
            })
        }
        (Some((_, Ok(s))), None) if s.role == Role::Fenced => Err(Error::PrimaryUnavailable(
            format!("the engine on {node_id} is fenced and no other engine is primary"),
        )),
        (_, Some((e, epoch))) => Ok(Plan::Attach {
            engine: e.clone(),
            epoch,
        }),
        (_, None) => Err(no_primary(answers)),
    }
}

/// The engine an existing staging should be attached to now, and its epoch, without taking anything
/// over: for a read-only stage on the secondary's node whose secondary serves reads, or a shared
/// writer there, that secondary; otherwise the primary with the highest epoch. Errors as [`plan`]'s.
pub fn current_source(
    node_id: &str,
    answers: &[(EngineRef, Result<EngineStatus, EngineError>)],
    want: Want,
) -> Result<(EngineRef, u64), crate::error::Error> {
    refusals(answers)?;
    if matches!(
        want,
        Want::Read(SecondaryRead::Current | SecondaryRead::View) | Want::WriteShared
    ) {
        if let Some((e, Ok(s))) = answers.iter().find(|(e, _)| e.node == node_id) {
            if s.role == Role::Secondary {
                return Ok((e.clone(), s.epoch));
            }
        }
    }
    current_primary(answers)
}

/// The engine serving the volume now and its epoch (the primary with the highest epoch), without
/// taking anything over: what an existing staging is checked against. Errors as [`plan`]'s.
pub fn current_primary(
    answers: &[(EngineRef, Result<EngineStatus, EngineError>)],
) -> Result<(EngineRef, u64), crate::error::Error> {
    refusals(answers)?;
    highest_primary(answers)
        .map(|(e, epoch)| (e.clone(), epoch))
        .ok_or_else(|| no_primary(answers))
}

/// Every engine rejected the token → that error; every engine that answered does not know the
/// volume → not found.
fn refusals(
    answers: &[(EngineRef, Result<EngineStatus, EngineError>)],
) -> Result<(), crate::error::Error> {
    use crate::error::Error;
    if let Some((_, Err(e))) = answers
        .iter()
        .find(|(_, r)| matches!(r, Err(EngineError::Unauthenticated { .. })))
    {
        return Err(Error::Engine(e.clone()));
    }
    let answered = answers.iter().filter(|(_, r)| r.is_ok()).count();
    let unknown = answers
        .iter()
        .filter(|(_, r)| matches!(r, Err(EngineError::VolumeUnknown { .. })))
        .count();
    if answered == 0 && unknown > 0 && unknown == answers.len() {
        if let Some((_, Err(e))) = answers.first() {
            return Err(Error::Engine(e.clone()));
        }
    }
    Ok(())
}

fn highest_primary(
    answers: &[(EngineRef, Result<EngineStatus, EngineError>)],
) -> Option<(&EngineRef, u64)> {
    answers
        .iter()
        .filter_map(|(e, r)| match r {
            Ok(s) if s.role == Role::Primary => Some((e, s.epoch)),
            _ => None,
        })
        .max_by_key(|(_, epoch)| *epoch)
}

fn no_primary(answers: &[(EngineRef, Result<EngineStatus, EngineError>)]) -> crate::error::Error {
    let why = answers
        .iter()
        .map(|(e, r)| match r {
            Ok(s) => format!("{}: {:?} at epoch {}", e.node, s.role, s.epoch),
            Err(err) => format!("{}: {err}", e.node),
        })
        .collect::<Vec<_>>()
        .join("; ");
    crate::error::Error::PrimaryUnavailable(format!("no primary ({why})"))
}

#[cfg(test)]
mod tests {
    use tandem_api::client::ClientError;
    use tandem_api::Reason;
    use tonic::Code;

    use super::*;

    /// The writable stage's plan (what most tests look at).
    fn plan(
        node_id: &str,
        answers: &[(EngineRef, Result<EngineStatus, EngineError>)],
    ) -> Result<Plan, crate::error::Error> {
        super::plan(node_id, answers, Want::Write)
    }

    fn eng(node: &str) -> EngineRef {
        EngineRef {
            node: node.into(),
            grpc: format!("{node}:7000"),
            nbd: format!("{node}:10809"),
        }
    }
    fn ok(role: Role, epoch: u64) -> Result<EngineStatus, EngineError> {
        Ok(EngineStatus { role, epoch })
    }
    fn unreachable(node: &str) -> Result<EngineStatus, EngineError> {
        Err(EngineError::Unreachable {
            addr: node.into(),
            message: "down".into(),
        })
    }

    #[test]
    fn local_primary_is_attached() {
        let p = plan(
            "a",
            &[
                (eng("a"), ok(Role::Primary, 3)),
                (eng("b"), ok(Role::Secondary, 3)),
            ],
        )
        .unwrap();
        assert_eq!(
            p,
            Plan::Attach {
                engine: eng("a"),
                epoch: 3
            }
        );
    }

    #[test]
    fn local_secondary_takes_over_even_if_the_primary_is_down() {
        for other in [ok(Role::Primary, 3), unreachable("a")] {
            let p = plan(
                "b",
                &[(eng("a"), other), (eng("b"), ok(Role::Secondary, 3))],
            )
            .unwrap();
            assert_eq!(p, Plan::TakeoverThenAttach { engine: eng("b") });
        }
    }

    /// Issue 18 (seed 004): a shared writer on the secondary's node is served by the secondary
    /// (which forwards its writes), never by a takeover that would fence the other writer; on
    /// the primary's node it is served by the primary.
    #[test]
    fn a_shared_writer_on_the_secondarys_node_never_takes_over() {
        let answers = [
            (eng("a"), ok(Role::Primary, 3)),
            (eng("b"), ok(Role::Secondary, 3)),
        ];
        for (node, serving) in [("b", "b"), ("a", "a")] {
            assert_eq!(
                super::plan(node, &answers, Want::WriteShared).unwrap(),
                Plan::Attach {
                    engine: eng(serving),
                    epoch: 3
                }
            );
            assert_eq!(
                current_source(node, &answers, Want::WriteShared).unwrap(),
                (eng(serving), 3)
            );
        }
        // With the primary down the secondary still serves it (and refuses I/O while it cannot
        // reach the primary): promoting is the operator's call, not a writer's.
        let down = [
            (eng("a"), unreachable("a")),
            (eng("b"), ok(Role::Secondary, 3)),
        ];
        assert_eq!(
            super::plan("b", &down, Want::WriteShared).unwrap(),
            Plan::Attach {
                engine: eng("b"),
                epoch: 3
            }
        );
    }

    #[test]
    fn a_read_only_stage_on_the_secondarys_node_never_takes_over() {
        let answers = [
            (eng("a"), ok(Role::Primary, 3)),
            (eng("b"), ok(Role::Secondary, 3)),
        ];
        let reads = Want::Read(SecondaryRead::Current);
        assert_eq!(
            super::plan("b", &answers, reads).unwrap(),
            Plan::Attach {
                engine: eng("b"),
                epoch: 3
            }
        );
        assert_eq!(current_source("b", &answers, reads).unwrap(), (eng("b"), 3));
        // A view: taken on the secondary, never a takeover.
        let view = Want::Read(SecondaryRead::View);
        assert_eq!(
            super::plan("b", &answers, view).unwrap(),
            Plan::View {
                engine: eng("b"),
                epoch: 3
            }
        );
        let no_reads = Want::Read(SecondaryRead::Refused);
        let e = super::plan("b", &answers, no_reads).unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.to_string().contains("never takes over"), "{e}");
        // Even with the primary down: a reader is no reason to promote.
        let down = [
            (eng("a"), unreachable("a")),
            (eng("b"), ok(Role::Secondary, 3)),
        ];
        assert_eq!(
            super::plan("b", &down, no_reads).unwrap_err().code(),
            Code::FailedPrecondition
        );
        // On the primary's node a read-only stage reads from the primary, as any stage does.
        for want in [reads, no_reads, view] {
            assert_eq!(
                super::plan("a", &answers, want).unwrap(),
                Plan::Attach {
                    engine: eng("a"),
                    epoch: 3
                }
            );
            assert_eq!(current_source("a", &answers, want).unwrap(), (eng("a"), 3));
        }
        assert_eq!(
            current_source("b", &answers, Want::Write).unwrap(),
            (eng("a"), 3)
        );
    }

    #[test]
    fn a_remote_primary_is_never_attached() {
        // This node's engine is a stale primary, down, or fenced while the primary is elsewhere:
        // UNAVAILABLE (kubelet retries until this node's engine serves), never a remote attach.
        for local in [ok(Role::Primary, 3), unreachable("a"), ok(Role::Fenced, 3)] {
            let e = plan("a", &[(eng("a"), local), (eng("b"), ok(Role::Primary, 4))]).unwrap_err();
            assert_eq!(e.code(), Code::Unavailable, "{e}");
            assert!(e.to_string().contains("never attached across nodes"), "{e}");
            assert!(e.to_string().contains("served by the engine on b"), "{e}");
        }
        // A node with no engine of the volume: FAILED_PRECONDITION, whatever the access.
        for want in [
            Want::Write,
            Want::Read(SecondaryRead::Current),
            Want::Read(SecondaryRead::View),
        ] {
            let e = super::plan(
                "c",
                &[
                    (eng("a"), ok(Role::Primary, 1)),
                    (eng("b"), ok(Role::Secondary, 1)),
                ],
                want,
            )
            .unwrap_err();
            assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
            assert!(
                e.to_string().contains("holds no engine of this volume"),
                "{e}"
            );
        }
        // The engine a staging is checked against may still be remote: that only says it is stale.
        let answers = [
            (eng("a"), ok(Role::Primary, 3)),
            (eng("b"), ok(Role::Primary, 4)),
        ];
        assert_eq!(current_primary(&answers).unwrap(), (eng("b"), 4));
    }

    #[test]
    fn errors_map_to_csi_codes() {
        let unauth = Err(EngineError::Unauthenticated {
            addr: "a".into(),
            message: "bad token".into(),
        });
        let e = plan("a", &[(eng("a"), unauth), (eng("b"), ok(Role::Primary, 1))]).unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);

        let unknown = |n: &str| {
            Err(EngineError::VolumeUnknown {
                addr: n.into(),
                volume: "v".into(),
            })
        };
        let e = plan("a", &[(eng("a"), unknown("a")), (eng("b"), unknown("b"))]).unwrap_err();
        assert_eq!(e.code(), Code::NotFound);

        let e = plan(
            "a",
            &[(eng("a"), unreachable("a")), (eng("b"), unreachable("b"))],
        )
        .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);

        let e = plan(
            "a",
            &[
                (eng("a"), ok(Role::Fenced, 2)),
                (eng("b"), unreachable("b")),
            ],
        )
        .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.to_string().contains("fenced"), "{e}");
    }

    #[test]
    fn the_engines_reason_decides_before_the_code() {
        let rpc = |status| ClientError::Rpc {
            op: "Status",
            status,
        };
        let e = EngineError::from_client(
            "a",
            "v",
            "Status",
            rpc(Reason::UnknownVolume.status(Code::NotFound, "unknown volume \"v\"")),
        );
        assert!(matches!(e, EngineError::VolumeUnknown { .. }), "{e}");
        let e = EngineError::from_client(
            "a",
            "v",
            "Status",
            rpc(Reason::Unauthenticated.status(Code::Unauthenticated, "wrong token")),
        );
        assert_eq!(e.code(), Code::Unauthenticated);
        // Without a reason (a proxy, an older engine) the code still decides.
        let e = EngineError::from_client("a", "v", "Status", rpc(tonic::Status::not_found("x")));
        assert!(matches!(e, EngineError::VolumeUnknown { .. }), "{e}");
        let blocked = Reason::HandoffBlocked.status(Code::Unavailable, "HandoffBlocked: x");
        let e = EngineError::from_client("a", "v", "Takeover", rpc(blocked));
        assert!(
            matches!(
                e,
                EngineError::Refused {
                    code: Code::Unavailable,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.code(), Code::Unavailable);
    }

    #[test]
    fn engine_refusals_are_retryable_unless_the_request_is_wrong() {
        let r = |code| EngineError::Refused {
            addr: "a".into(),
            op: "Takeover",
            code,
            message: String::new(),
        };
        assert_eq!(r(Code::FailedPrecondition).code(), Code::Unavailable);
        assert_eq!(r(Code::DeadlineExceeded).code(), Code::Unavailable);
        assert_eq!(r(Code::PermissionDenied).code(), Code::Unauthenticated);
        assert_eq!(r(Code::NotFound).code(), Code::NotFound);
    }

    #[test]
    fn the_current_primary_is_the_highest_epoch_and_never_a_takeover() {
        // A local secondary does not make its node the answer: checking is not taking over.
        let (e, epoch) = current_primary(&[
            (eng("a"), ok(Role::Secondary, 2)),
            (eng("b"), ok(Role::Primary, 2)),
        ])
        .unwrap();
        assert_eq!((e.node.as_str(), epoch), ("b", 2));
        let (e, epoch) = current_primary(&[
            (eng("a"), ok(Role::Primary, 3)),
            (eng("b"), ok(Role::Primary, 1)),
        ])
        .unwrap();
        assert_eq!((e.node.as_str(), epoch), ("a", 3));
        let e = current_primary(&[
            (eng("a"), ok(Role::Fenced, 2)),
            (eng("b"), unreachable("b")),
        ])
        .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        let unauth = Err(EngineError::Unauthenticated {
            addr: "a".into(),
            message: "bad token".into(),
        });
        let e =
            current_primary(&[(eng("a"), unauth), (eng("b"), ok(Role::Primary, 1))]).unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
}

#[cfg(test)]
mod tls_secrets_tests {
    use super::*;
    use std::collections::HashMap;
    use tandem_api::tls::{Ca, VolumeRef};

    #[test]
    fn a_node_speaks_only_with_its_own_certificate() {
        let day = Duration::from_secs(86400);
        let ca = Ca::generate("test CA", day).unwrap();
        let vol = VolumeRef::new("ns", "vol");
        let id = |node: &str| Identity::Csi {
            volume: vol.clone(),
            node: node.into(),
        };
        let a = ca.issue(&id("node-a"), &[], day).unwrap();
        let mut secrets = HashMap::from([("token".to_string(), "t".to_string())]);
        // No CA: plaintext, as before.
        assert!(TlsSecrets::from_secrets(&secrets)
            .client("node-a")
            .unwrap()
            .is_none());
        secrets.insert(SECRET_CA_KEY.into(), ca.cert_pem().into());
        let err = TlsSecrets::from_secrets(&secrets)
            .client("node-a")
            .unwrap_err();
        assert!(err.contains("csi.node-a.crt"), "{err}");
        secrets.insert(secret_csi_cert_key("node-a"), a.cert_pem.clone());
        secrets.insert(secret_csi_key_key("node-a"), a.key_pem.clone());
        let tls = TlsSecrets::from_secrets(&secrets).client("node-a").unwrap();
        assert_eq!(
            tls.and_then(|t| t.source().map(|s| s.identity())),
            Some(id("node-a"))
        );
        // node-a's pair filed under node-b's keys does not make node-b speak as node-a.
        secrets.insert(secret_csi_cert_key("node-b"), a.cert_pem.clone());
        secrets.insert(secret_csi_key_key("node-b"), a.key_pem.clone());
        let err = TlsSecrets::from_secrets(&secrets)
            .client("node-b")
            .unwrap_err();
        assert!(err.contains("not this node's CSI plugin"), "{err}");
        // The key never shows in Debug.
        let shown = format!("{:?}", TlsSecrets::from_secrets(&secrets));
        assert!(
            !shown.contains("PRIVATE KEY") && shown.contains("csi.node-a.key"),
            "{shown}"
        );
    }
}
