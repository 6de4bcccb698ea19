//! Typed gRPC client for the engine's control API, used by the CLI, the CSI node plugin, the operator
//! and the test harnesses. Callers get plain Rust values and one error type; why the engine said no
//! is [`ClientError::reason`], never the message text.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tonic::{metadata::MetadataValue, service::Interceptor, transport::Channel, Request};

pub use crate::pb::{PairState, StatusReply, TakeoverPhase, TakeoverPolicy, TakeoverReply};
use crate::{pb, tls::ClientTls, Reason};

/// Errors a caller of the engine API can see.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    // The causes too: tonic says only "transport error", and why (a refused server identity, a
    // TLS alert) is what a user needs to fix a Secret.
    #[error("cannot connect to engine at {addr}: {}", causes(.source))]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("invalid engine address {0:?}")]
    BadAddress(String),
    #[error("token is not valid ASCII metadata")]
    BadToken,
    #[error("engine refused {op}: {status}")]
    Rpc {
        op: &'static str,
        status: tonic::Status,
    },
}

/// `e` and its sources, joined by ": ".
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        text.push_str(": ");
        text.push_str(&c.to_string());
        next = c.source();
    }
    text
}

impl ClientError {
    /// The gRPC code behind this error, when the engine answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// Why the engine refused, when it answered with a reason.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            ClientError::Rpc { status, .. } => Reason::of(status),
            _ => None,
        }
    }
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct TokenInterceptor {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl TokenInterceptor {
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        let header = match token {
            Some(t) => Some(
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| ClientError::BadToken)?,
            ),
            None => None,
        };
        Ok(Self { header })
    }
}

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

type Intercepted = tonic::service::interceptor::InterceptedService<Channel, TokenInterceptor>;

/// Default of `--peer-timeout-ms`: how long the peer may stay silent before the link is dead.
pub const DEFAULT_PEER_TIMEOUT_MS: u64 = 6000;

static PEER_TIMEOUT_MS: AtomicU64 = AtomicU64::new(DEFAULT_PEER_TIMEOUT_MS);

/// Sets the process-wide peer timeout (`serve` does, once, before any channel opens).
pub fn set_peer_timeout(t: Duration) {
    let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(300);
    PEER_TIMEOUT_MS.store(ms, Ordering::Relaxed);
}

/// How long a peer may stay silent before its link is declared dead (Liveness, ARCHITECTURE.md).
pub fn peer_timeout() -> Duration {
    Duration::from_millis(PEER_TIMEOUT_MS.load(Ordering::Relaxed))
}

/// Connects a channel to `addr` (`host:port` or `http://host:port`), with mutual TLS when the
/// process has default client credentials ([`crate::tls::set_default_client`]).
///
/// Every channel pings its server (HTTP/2 PING every third of the peer timeout, answered within
/// another third, also while idle) and sets TCP keepalive: a peer that vanished without FIN or
/// RST (a dead node, a blackhole, a stopped process) fails every call on the channel within the
/// peer timeout instead of hanging (liveness::blackholed_link_*).
pub async fn channel(addr: &str, connect_timeout: Duration) -> Result<Channel, ClientError> {
    channel_with(addr, connect_timeout, crate::tls::default_client().as_ref()).await
}

/// [`channel`] with these TLS credentials (None: plaintext), whatever the process default.
pub async fn channel_with(
    addr: &str,
    connect_timeout: Duration,
    tls: Option<&ClientTls>,
) -> Result<Channel, ClientError> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Channel::from_shared(uri)
        .map_err(|_| ClientError::BadAddress(addr.to_string()))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true);
    let third = peer_timeout() / 3;
    let idle = third.max(Duration::from_secs(1));
    let interval = (third / 2).max(Duration::from_secs(1));
    let endpoint = endpoint
        .http2_keep_alive_interval(third)
        .keep_alive_timeout(third)
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(idle))
        .tcp_keepalive_interval(Some(interval))
        .tcp_keepalive_retries(Some(2));
    let connected = match tls {
        None => endpoint.connect().await,
        Some(tls) => {
            let connector = crate::tls::client::TlsConnector::new(
                tls.clone(),
                connect_timeout,
                (idle, interval, 2),
            );
            endpoint.connect_with_connector(connector).await
        }
    };
    connected.map_err(|source| ClientError::Connect {
        addr: addr.to_string(),
        source,
    })
}

/// The engine's control API for one engine.
#[derive(Clone)]
pub struct EngineClient {
    inner: pb::engine_client::EngineClient<Intercepted>,
}

impl EngineClient {
    /// Connects to the engine's gRPC port; `token` is the volume token (None when the engine runs without one).
    pub async fn connect(addr: &str, token: Option<&str>) -> Result<Self, ClientError> {
        let ch = channel(addr, Duration::from_secs(5)).await?;
        Self::from_channel(ch, token)
    }

    /// [`EngineClient::connect`] with these TLS credentials (None: plaintext), e.g. the CSI
    /// plugin's per-volume identity.
    pub async fn connect_with(
        addr: &str,
        token: Option<&str>,
        tls: Option<&ClientTls>,
    ) -> Result<Self, ClientError> {
        let ch = channel_with(addr, Duration::from_secs(5), tls).await?;
        Self::from_channel(ch, token)
    }

    pub fn from_channel(ch: Channel, token: Option<&str>) -> Result<Self, ClientError> {
        let interceptor = TokenInterceptor::new(token)?;
        Ok(Self {
            inner: pb::engine_client::EngineClient::with_interceptor(ch, interceptor),
        })
    }

    pub async fn status(&mut self, volume: &str) -> Result<StatusReply, ClientError> {
        let req = pb::StatusRequest {
            volume: volume.to_string(),
        };
        self.inner
            .status(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|status| ClientError::Rpc {
                op: "Status",
                status,
            })
    }

    /// Takes snapshot `id` on the primary (idempotent by id).
    pub async fn create_snapshot(
        &mut self,
        volume: &str,
        id: &str,
    ) -> Result<pb::SnapshotInfo, ClientError> {
        let req = pb::CreateSnapshotRequest {
            volume: volume.to_string(),
            id: id.to_string(),
        };
        self.inner
            .create_snapshot(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|status| ClientError::Rpc {
                op: "CreateSnapshot",
                status,
            })
    }

    /// Deletes snapshot `id` (deleted: false when there was none).
    pub async fn delete_snapshot(
        &mut self,
        volume: &str,
        id: &str,
    ) -> Result<pb::DeleteSnapshotReply, ClientError> {
        let req = pb::DeleteSnapshotRequest {
            volume: volume.to_string(),
            id: id.to_string(),
        };
        self.inner
            .delete_snapshot(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|status| ClientError::Rpc {
                op: "DeleteSnapshot",
                status,
            })
    }

    /// The snapshots the engine holds.
    pub async fn list_snapshots(
        &mut self,
        volume: &str,
    ) -> Result<pb::ListSnapshotsReply, ClientError> {
        let req = pb::ListSnapshotsRequest {
            volume: volume.to_string(),
        };
        self.inner
            .list_snapshots(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|status| ClientError::Rpc {
                op: "ListSnapshots",
                status,
            })
    }

    /// Grows the volume to `size` bytes (on the primary: its secondary first, then itself).
    /// Shrinking is refused; the same size is a no-op.
    pub async fn resize(
        &mut self,
        volume: &str,
        size: u64,
    ) -> Result<pb::ResizeReply, ClientError> {
        let req = pb::ResizeRequest {
            volume: volume.to_string(),
            epoch: 0,
            size,
        };
        self.inner
            .resize(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|status| ClientError::Rpc {
                op: "Resize",
                status,
            })
    }

    /// Starts a live move of the secondary to the engine at `to` (called on the primary), or
    /// answers the move already under way (or done) to that engine.
    pub async fn start_move(
        &mut self,
        volume: &str,
        to: &str,
    ) -> Result<pb::MoveStatus, ClientError> {
        let req = pb::StartMoveRequest {
            volume: volume.to_string(),
            to: to.to_string(),
        };
        self.inner
            .start_move(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|status| ClientError::Rpc {
                op: "StartMove",
                status,
            })
    }

    /// The live move's progress (phase NONE when none was ever started).
    pub async fn get_move(&mut self, volume: &str) -> Result<pb::MoveStatus, ClientError> {
        let req = pb::GetMoveRequest {
            volume: volume.to_string(),
        };
        self.inner
            .get_move(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|status| ClientError::Rpc {
                op: "GetMove",
                status,
            })
    }

    /// Rolls a live move back before its cutover (refused after it: reason MoveCompleted).
    pub async fn abort_move(&mut self, volume: &str) -> Result<pb::MoveStatus, ClientError> {
        let req = pb::GetMoveRequest {
            volume: volume.to_string(),
        };
        self.inner
            .abort_move(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|status| ClientError::Rpc {
                op: "AbortMove",
                status,
            })
    }

    /// Test seam on the replication link (the engine must run with --fault-injection).
    pub async fn inject_fault(
        &mut self,
        req: pb::FaultRequest,
    ) -> Result<pb::FaultReply, ClientError> {
        self.inner
            .inject_fault(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|status| ClientError::Rpc {
                op: "InjectFault",
                status,
            })
    }

    /// Makes this engine (the secondary) the primary; see DESIGN.md §4.
    pub async fn takeover(
        &mut self,
        volume: &str,
        policy: TakeoverPolicy,
        timeout: Duration,
    ) -> Result<TakeoverReply, ClientError> {
        self.role_change(takeover_request(volume, policy, timeout), false)
            .await
    }

    /// Makes this engine (the old primary, now secondary) the primary again.
    pub async fn failback(
        &mut self,
        volume: &str,
        policy: TakeoverPolicy,
        timeout: Duration,
    ) -> Result<TakeoverReply, ClientError> {
        self.role_change(takeover_request(volume, policy, timeout), true)
            .await
    }

    /// Acts as the witness once (Engine.GrantLease): reads the engine's clock in a Status call,
    /// then grants a lease of `lease_ms` from that stamp. The caller must not promote the other
    /// engine by force before the moment this call was *sent* + `lease_ms` + the guard
    /// (`storage_engine::lease::guard`): the engine's lease runs from the earlier stamp, so it ends
    /// first.
    pub async fn witness_grant(
        &mut self,
        volume: &str,
        lease_ms: u32,
        allow_async: bool,
    ) -> Result<pb::GrantLeaseReply, ClientError> {
        let s = self.status(volume).await?;
        self.grant_lease(pb::GrantLeaseRequest {
            volume: volume.to_string(),
            epoch: s.epoch,
            instance: s.instance,
            stamp_us: s.clock_us,
            lease_ms,
            allow_async,
        })
        .await
    }

    /// One Engine.GrantLease as given (`witness_grant` builds it from a fresh status).
    pub async fn grant_lease(
        &mut self,
        req: pb::GrantLeaseRequest,
    ) -> Result<pb::GrantLeaseReply, ClientError> {
        self.inner
            .grant_lease(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|status| ClientError::Rpc {
                op: "GrantLease",
                status,
            })
    }

    /// Takeover (or failback) with every option of the request.
    pub async fn role_change(
        &mut self,
        req: pb::TakeoverRequest,
        failback: bool,
    ) -> Result<TakeoverReply, ClientError> {
        let (op, r) = if failback {
            ("Failback", self.inner.failback(req).await)
        } else {
            ("Takeover", self.inner.takeover(req).await)
        };
        r.map(|r| r.into_inner())
            .map_err(|status| ClientError::Rpc { op, status })
    }
}

/// A takeover request at the next epoch.
pub fn takeover_request(
    volume: &str,
    policy: TakeoverPolicy,
    timeout: Duration,
) -> pb::TakeoverRequest {
    pb::TakeoverRequest {
        volume: volume.to_string(),
        new_epoch: 0,
        policy: policy as i32,
        timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
        allow_inconsistent: false,
    }
}
