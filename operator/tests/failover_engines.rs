//! Failover orchestration end to end, without a cluster: two real `tandem-engine` processes, the operator's
//! own reconcile (observe → decide → `Takeover` over its real gRPC client → status), and a fake API server
//! playing the Kubernetes side from a small world (nodes, engine pods, the token Secret, the PV) that each
//! test changes the way a cluster would: a node goes NotReady, a pod turns unready, the kubelet starts the
//! pod the operator recreated (here: restarts the engine process on its state dir).
//!
//! The one seam: engine Service names (`<key>-engine-a.tandem-system.svc.cluster.local:9500`) are routed to the
//! engines' loopback ports, as cluster DNS would route them.
//!
//! The engines are the testkit's (which builds `tandem-engine` with the cargo that runs this test, or takes
//! `TANDEM_ENGINE_BIN`). qemu-io writes the data.
//!
//! Every gRPC call is mutual TLS, as in a cluster: each engine runs (`--tls-dir`, `--node-name`) on its
//! engine TLS Secret as the operator mints it from the CA its Context holds, the fake API server holds those
//! Secrets, and the operator calls the engines as its own `Operator` identity (the process-wide default
//! client, `certs::serve_operator_identity`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use clap::Parser;
use futures::future::BoxFuture;
use http::{Request, Response};
use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    jiff::{SignedDuration, Timestamp},
    ByteString,
};
use kube::{client::Body, runtime::controller::Action, Client};
use operator::{
    controller::Context,
    crd::{
        FailoverPolicy, MirroredVolume, MirroredVolumeStatus, MovePhase, Phase, Slot,
        SwitchoverPhase,
    },
    engine::{
        EngineApi, EngineError, EngineState, EngineTarget, Granted, GrpcEngines, MoveProgress,
        Snapshot, TakeoverOutcome,
    },
    kubectl,
    metrics::Metrics,
    plan::{self, EngineConfig},
};
use serde_json::{json, Value};
use tandem_api::{
    client::{EngineClient, PairState, StatusReply, TakeoverPhase},
    nbd::client::NbdClient,
    pb,
    tls::{self, Ca, ClientTls, Identity, Issued, VolumeRef},
};
use tandem_testkit::{qemu_io_ok, Engine, Pair};
use tokio::task::JoinHandle;

const NS: &str = "default";
/// The operator's namespace (`EngineConfig::default()`): engine pods, Services, Secrets, the budget.
const OP_NS: &str = "tandem-system";
/// The MirroredVolume's name, which is also the engines' volume (export) name.
const VOLUME: &str = "data";
const SIZE: u64 = 16 << 20;
const BLOCK: u64 = 4096;
const TOKEN: &str = "0123456789abcdef-volume-token";
/// The claim bound to the volume's PV, which workload pods use.
const CLAIM: &str = "data-claim";
/// `spec.failover.peerTimeout`: how long a pod may stay unready, and how long Takeover waits for the peer.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// `spec.failover.leaseMs` and the engines' `--lease-ms`: short, so the waits it imposes fit a test.
const LEASE_MS: u32 = 1000;
/// What the operator waits after its last grant (or its start) before it forces: guard(lease).
const WITNESS_WAIT: Duration = Duration::from_millis(1600);

// ---------------------------------------------------------------------------------------------------------
// The engine processes.

/// Pauses (true) or resumes (false) an engine's replication link.
async fn pause(e: &Engine, pause: bool) {
    e.fault(pb::FaultRequest {
        pause: Some(pause),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|err| panic!("{err:#}"));
}

fn role_name(role: i32) -> &'static str {
    match pb::Role::try_from(role) {
        Ok(pb::Role::Primary) => "primary",
        Ok(pb::Role::Secondary) => "secondary",
        Ok(pb::Role::Fenced) => "fenced",
        _ => "unspecified",
    }
}

// ---------------------------------------------------------------------------------------------------------
// Certificates.

/// The operator's CA: the one every test's Context holds. One per test binary, because the operator's
/// client identity (`tls::set_default_client`) is process-wide and the tests run in parallel threads.
fn test_ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        Ca::generate("failover-engines test CA", Duration::from_secs(24 * 3600)).unwrap()
    })
}

/// The volume's certificate Secrets (engine TLS of slot a and b, then the CSI Secret), minted by the
/// operator's own `certs::mint` from [`test_ca`] with the volume's token: what its reconcile applies. The
/// fake API server holds them from the start, as an earlier pass of the operator left them, so the engines
/// can start on them before the first reconcile; that reconcile finds them valid and issues nothing.
fn volume_secrets() -> &'static [Secret] {
    static SECRETS: OnceLock<Vec<Secret>> = OnceLock::new();
    SECRETS.get_or_init(|| {
        let mv = volume_object(FailoverPolicy::WaitForPrimary, None);
        let all = plan::CertPlan {
            engine: [true, true],
            csi: true,
        };
        let nodes = [
            node_name(Slot::A).to_string(),
            node_name(Slot::B).to_string(),
        ];
        operator::certs::mint(
            &mv,
            &all,
            test_ca(),
            &EngineConfig::default(),
            TOKEN,
            &nodes,
            Default::default(),
        )
        .unwrap()
        .0
    })
}

/// The Secret named `name` among [`volume_secrets`].
fn volume_secret(name: &str) -> &'static Secret {
    volume_secrets()
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no secret {name}"))
}

/// One key of a Secret, as text.
fn secret_text(secret: &Secret, key: &str) -> String {
    let data = secret.data.as_ref().expect("a secret with data");
    let bytes = &data.get(key).unwrap_or_else(|| panic!("no {key}")).0;
    String::from_utf8(bytes.clone()).unwrap()
}

/// Writes a certificate and key with the CA's certificate as a `--tls-dir` at `dir`.
fn write_tls_dir(dir: &Path, ca_pem: &str, cert_pem: &str, key_pem: &str) -> PathBuf {
    let issued = Issued {
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
        not_after: tls::mint::not_after(cert_pem).unwrap(),
    };
    tls::mint::write_dir(dir, ca_pem, &issued).unwrap();
    dir.to_path_buf()
}

/// The engine of `slot`'s `--tls-dir` at `dir`: its engine TLS Secret (`ca.crt`, `tls.crt`, `tls.key`), as
/// the kubelet mounts it into the engine pod.
fn engine_tls_dir(dir: &Path, slot: Slot) -> PathBuf {
    let secret = volume_secret(&plan::names::tls_secret(&key(), slot));
    let text = |k: &str| secret_text(secret, k);
    write_tls_dir(
        dir,
        &text(tls::CA_FILE),
        &text(tls::CERT_FILE),
        &text(tls::KEY_FILE),
    )
}

/// A client certificate for `identity` from [`test_ca`].
fn client_as(identity: &Identity) -> Issued {
    test_ca()
        .issue(identity, &[], Duration::from_secs(3600))
        .unwrap()
}

/// TLS is really on, with the operator's Secrets: each engine serves the certificate of its engine TLS
/// Secret; a plaintext client, even with the token, is UNAUTHENTICATED; the CSI plugin of another volume
/// (same CA) is PERMISSION_DENIED; this volume's CSI plugin, with the certificate of its CSI Secret, may
/// ask Status.
async fn assert_mutual_tls(pair: &Pair) {
    use tandem_api::contract::{secret_csi_cert_key, secret_csi_key_key, SECRET_CA_KEY};
    use tonic::Code;
    async fn status_as(
        addr: &str,
        tls: Option<&ClientTls>,
    ) -> Result<StatusReply, tandem_api::client::ClientError> {
        EngineClient::connect_with(addr, Some(TOKEN), tls)
            .await?
            .status(VOLUME)
            .await
    }
    let ca_pem = test_ca().cert_pem();
    let csi = volume_secret(&plan::names::csi_secret(&key()));
    let other = client_as(&Identity::Csi {
        volume: VolumeRef::new(NS, "other"),
        node: node_name(Slot::A).into(),
    });
    let other = ClientTls::from_pem(ca_pem, &other.cert_pem, &other.key_pem).unwrap();
    for (slot, e) in [(Slot::A, &pair.a), (Slot::B, &pair.b)] {
        let secret = volume_secret(&plan::names::tls_secret(&key(), slot));
        let served = tls::client::server_certificate(
            &e.grpc,
            &ClientTls::anonymous(ca_pem).unwrap(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(
            served,
            tls::mint::der_of_pem(&secret_text(secret, tls::CERT_FILE)).unwrap(),
            "engine {slot:?} serves its TLS Secret's certificate"
        );
        let plaintext = status_as(&e.grpc, None).await;
        assert_eq!(
            plaintext.as_ref().err().and_then(|e| e.code()),
            Some(Code::Unauthenticated),
            "{plaintext:?}"
        );
        let foreign = status_as(&e.grpc, Some(&other)).await;
        assert_eq!(
            foreign.as_ref().err().and_then(|e| e.code()),
            Some(Code::PermissionDenied),
            "{foreign:?}"
        );
        let node = node_name(slot);
        let own = ClientTls::from_pem(
            &secret_text(csi, SECRET_CA_KEY),
            &secret_text(csi, &secret_csi_cert_key(node)),
            &secret_text(csi, &secret_csi_key_key(node)),
        )
        .unwrap();
        let allowed = status_as(&e.grpc, Some(&own)).await;
        assert!(allowed.is_ok(), "{allowed:?}");
    }
}

/// Engine slot a (the first primary, on node n1) and slot b (its secondary, on n2), each knowing the
/// other's real gRPC address, in a directory that outlives them.
fn start_pair() -> (tempfile::TempDir, Pair) {
    start_pair_with(&[], |b| b.linked())
}

/// [`start_pair`] with more `serve` flags for both and a last change of the builder (links).
fn start_pair_with(
    extra: &[&str],
    link: impl FnOnce(tandem_testkit::PairBuilder) -> tandem_testkit::PairBuilder,
) -> (tempfile::TempDir, Pair) {
    let dir = tempfile::tempdir().unwrap();
    let tls_a = engine_tls_dir(&dir.path().join("tls-a"), Slot::A);
    let tls_b = engine_tls_dir(&dir.path().join("tls-b"), Slot::B);
    // The test's own calls (status, fault injection) speak as the operator, as the only identity that
    // may inject faults.
    let op = client_as(&Identity::Operator);
    let op_dir = write_tls_dir(
        &dir.path().join("tls-operator"),
        test_ca().cert_pem(),
        &op.cert_pem,
        &op.key_pem,
    );
    let builder = Pair::builder(dir.path())
        .volume(VOLUME)
        .size(&SIZE.to_string())
        .token(&format!("{TOKEN}\n"))
        .fault_injection()
        .args(&[
            "--lease-ms",
            &LEASE_MS.to_string(),
            "--lease-wait-ms",
            "1000",
        ])
        .args(extra)
        .a(|e| {
            e.role("primary")
                .tls_dir(&tls_a)
                .node_name(node_name(Slot::A))
                .client_tls_dir(&op_dir)
        })
        .b(|e| {
            e.tls_dir(&tls_b)
                .node_name(node_name(Slot::B))
                .client_tls_dir(&op_dir)
        });
    let pair = link(builder).start().unwrap_or_else(|e| panic!("{e:#}"));
    (dir, pair)
}

async fn wait_synced(pair: &Pair) {
    eventually("the pair to be in sync", 30, || async {
        let status = |e: &'static str, r: anyhow::Result<StatusReply>| {
            r.map_err(|err| format!("{e}: {err:#}"))
        };
        let a = status("a", pair.a.status().await)?;
        let b = status("b", pair.b.status().await)?;
        if a.pair() == PairState::Synced
            && a.pending_blocks == 0
            && b.pair() == PairState::Consistent
        {
            Ok(())
        } else {
            Err(format!("a: {a:?}\nb: {b:?}"))
        }
    })
    .await;
}

/// The network between the two engines, one direction: a TCP relay in front of one engine's gRPC port
/// that forwards while up. Cut, it closes every connection it carries and each new one at once: the
/// engine behind it is unreachable for the other engine, while hosts and the operator (which do not
/// go through it) still see whatever the test lets them see.
struct Relay {
    addr: String,
    target: Arc<Mutex<Option<String>>>,
    up: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    /// Listens at once (inside the test's runtime); connections are refused until `forward_to`.
    fn bind() -> Relay {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        let relay = Relay {
            addr: l.local_addr().unwrap().to_string(),
            target: Arc::default(),
            up: tokio::sync::watch::Sender::new(true),
        };
        let (target, up) = (relay.target.clone(), relay.up.clone());
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let target = target.lock().unwrap().clone();
                let mut up = up.subscribe();
                tokio::spawn(async move {
                    let Some(target) = target.filter(|_| *up.borrow()) else {
                        return;
                    };
                    let Ok(mut t) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut c, &mut t) => {}
                        _ = up.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        relay
    }

    fn forward_to(&self, target: &str) {
        *self.target.lock().unwrap() = Some(target.to_string());
    }

    /// The partition (false) or its end (true).
    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

/// [`start_pair`] whose engines reach each other only through relays: `.0` in front of a (b's peer),
/// `.1` in front of b (a's peer).
fn start_relayed_pair() -> (tempfile::TempDir, Pair, Relay, Relay) {
    let (to_a, to_b) = (Relay::bind(), Relay::bind());
    let (dir, pair) = start_pair_with(&[], |builder| {
        builder.a(|e| e.peer(&to_b.addr)).b(|e| e.peer(&to_a.addr))
    });
    to_a.forward_to(&pair.a.grpc);
    to_b.forward_to(&pair.b.grpc);
    (dir, pair, to_a, to_b)
}

/// Polls `f` until it answers Ok, failing the test with its last answer after `secs`.
async fn eventually<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let last = match f().await {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes whole blocks of `byte` through the engine's NBD export with qemu-io, and into the model.
fn write_blocks(e: &Engine, model: &mut [u8], blocks: std::ops::Range<u64>, byte: u8) {
    let (off, len) = (blocks.start * BLOCK, (blocks.end - blocks.start) * BLOCK);
    qemu_io_ok(&e.uri(), &[&format!("write -P {byte} {off} {len}")]);
    model[off as usize..(off + len) as usize].fill(byte);
}

/// Writes each block of `blocks` with its own qemu-io write command (one journal record each).
fn write_each_block(e: &Engine, model: &mut [u8], blocks: std::ops::Range<u64>, byte: u8) {
    for b in blocks {
        write_blocks(e, model, b..b + 1, byte);
    }
}

/// The whole volume as a host reads it through the engine's NBD export.
async fn read_volume(e: &Engine) -> Vec<u8> {
    read_image(e, SIZE).await
}

/// The volume through a new NBD session on the engine's export, which must negotiate `size` bytes.
async fn read_image(e: &Engine, size: u64) -> Vec<u8> {
    let mut c = NbdClient::connect(&e.nbd, VOLUME)
        .await
        .unwrap_or_else(|err| panic!("NBD connect to {}: {err}\n{}", e.nbd, e.log_tail(25)));
    assert_eq!(
        c.size(),
        size,
        "the size a new NBD session on {} negotiates",
        e.nbd
    );
    let mut out = Vec::with_capacity(size as usize);
    let chunk = 1u64 << 20;
    for off in (0..size).step_by(chunk as usize) {
        let data = c.read(off, chunk as u32).await.unwrap_or_else(|err| {
            panic!(
                "NBD read at {off} from {}: {err}\n{}",
                e.nbd,
                e.log_tail(25)
            )
        });
        out.extend_from_slice(&data);
    }
    out
}

/// First differing block between two images, for readable failures.
fn first_difference(got: &[u8], want: &[u8]) -> Option<u64> {
    got.chunks(BLOCK as usize)
        .zip(want.chunks(BLOCK as usize))
        .position(|(g, w)| g != w)
        .map(|b| b as u64)
}

// ---------------------------------------------------------------------------------------------------------
// The engine API as the operator sees it, over the real gRPC client, with Service names routed to loopback.

#[derive(Default)]
struct Routed {
    grpc: GrpcEngines,
    routes: Mutex<HashMap<String, String>>,
    /// Every Takeover the operator made: (slot, policy, timeout, when it was asked).
    takeovers: Mutex<Vec<(Slot, FailoverPolicy, Duration)>>,
    /// When each forced Takeover was asked.
    forced_at: Mutex<Vec<Instant>>,
    /// The target's `promise_remaining_ms` (read just before) and `peer_backlog_blocks` at each forced
    /// Takeover.
    forced_seen: Mutex<Vec<(u64, u64)>>,
    /// Every lease grant: (slot, allow_async).
    grants: Mutex<Vec<(Slot, bool)>>,
}

impl Routed {
    fn route(&self, target: &EngineTarget) -> Result<EngineTarget, EngineError> {
        let routes = self.routes.lock().unwrap();
        let address =
            routes
                .get(&target.address)
                .cloned()
                .ok_or_else(|| EngineError::Unreachable {
                    address: target.address.clone(),
                    message: "no such Service".into(),
                })?;
        Ok(EngineTarget {
            address,
            ..target.clone()
        })
    }

    fn slot_of(&self, target: &EngineTarget) -> Slot {
        let mv = volume_object(FailoverPolicy::WaitForPrimary, None);
        if target.address == plan::engine_address(&mv, Slot::A, &EngineConfig::default()) {
            Slot::A
        } else {
            Slot::B
        }
    }
}

impl EngineApi for Routed {
    fn status<'a>(
        &'a self,
        target: &'a EngineTarget,
    ) -> BoxFuture<'a, Result<EngineState, EngineError>> {
        Box::pin(async move {
            let local = self.route(target)?;
            self.grpc.status(&local).await
        })
    }

    fn takeover<'a>(
        &'a self,
        target: &'a EngineTarget,
        policy: FailoverPolicy,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<TakeoverOutcome, EngineError>> {
        Box::pin(async move {
            self.takeovers
                .lock()
                .unwrap()
                .push((self.slot_of(target), policy, timeout));
            let local = self.route(target)?;
            if policy == FailoverPolicy::ForcePromote {
                let seen = self.grpc.status(&local).await?;
                self.forced_seen
                    .lock()
                    .unwrap()
                    .push((seen.promise_remaining_ms, seen.peer_backlog_blocks));
                self.forced_at.lock().unwrap().push(Instant::now());
            }
            self.grpc.takeover(&local, policy, timeout).await
        })
    }

    fn grant<'a>(
        &'a self,
        target: &'a EngineTarget,
        lease_ms: u32,
        allow_async: bool,
    ) -> BoxFuture<'a, Result<Granted, EngineError>> {
        Box::pin(async move {
            self.grants
                .lock()
                .unwrap()
                .push((self.slot_of(target), allow_async));
            let local = self.route(target)?;
            self.grpc.grant(&local, lease_ms, allow_async).await
        })
    }

    fn resize<'a>(
        &'a self,
        target: &'a EngineTarget,
        size: u64,
    ) -> BoxFuture<'a, Result<u64, EngineError>> {
        Box::pin(async move {
            let local = self.route(target)?;
            self.grpc.resize(&local, size).await
        })
    }

    fn list_snapshots<'a>(
        &'a self,
        target: &'a EngineTarget,
    ) -> BoxFuture<'a, Result<Vec<Snapshot>, EngineError>> {
        Box::pin(async move {
            let local = self.route(target)?;
            self.grpc.list_snapshots(&local).await
        })
    }

    fn create_snapshot<'a>(
        &'a self,
        target: &'a EngineTarget,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Snapshot, EngineError>> {
        Box::pin(async move {
            let local = self.route(target)?;
            self.grpc.create_snapshot(&local, id).await
        })
    }

    fn delete_snapshot<'a>(
        &'a self,
        target: &'a EngineTarget,
        id: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let local = self.route(target)?;
            self.grpc.delete_snapshot(&local, id).await
        })
    }

    /// The move's target is a Service name too: the primary is told the routed address, as cluster
    /// DNS would resolve it for the engine.
    fn start_move<'a>(
        &'a self,
        target: &'a EngineTarget,
        to: &'a str,
    ) -> BoxFuture<'a, Result<MoveProgress, EngineError>> {
        Box::pin(async move {
            let local = self.route(target)?;
            let to_local = self.route(&EngineTarget {
                address: to.to_string(),
                ..target.clone()
            })?;
            let mut p = self.grpc.start_move(&local, &to_local.address).await?;
            p.target = self.unroute(&p.target);
            Ok(p)
        })
    }

    fn get_move<'a>(
        &'a self,
        target: &'a EngineTarget,
    ) -> BoxFuture<'a, Result<MoveProgress, EngineError>> {
        Box::pin(async move {
            let local = self.route(target)?;
            let mut p = self.grpc.get_move(&local).await?;
            p.target = self.unroute(&p.target);
            Ok(p)
        })
    }

    fn abort_move<'a>(
        &'a self,
        target: &'a EngineTarget,
    ) -> BoxFuture<'a, Result<MoveProgress, EngineError>> {
        Box::pin(async move {
            let local = self.route(target)?;
            let mut p = self.grpc.abort_move(&local).await?;
            p.target = self.unroute(&p.target);
            Ok(p)
        })
    }
}

impl Routed {
    /// The Service name a routed loopback address stands for (what the engine stored as its peer).
    fn unroute(&self, local: &str) -> String {
        let routes = self.routes.lock().unwrap();
        routes
            .iter()
            .find(|(_, l)| l.as_str() == local)
            .map_or_else(|| local.to_string(), |(service, _)| service.clone())
    }
}

// ---------------------------------------------------------------------------------------------------------
// The Kubernetes side: a world the test changes, served by a fake API server.

fn ago(secs: i64) -> String {
    Timestamp::now()
        .checked_sub(SignedDuration::from_secs(secs))
        .unwrap()
        .to_string()
}

fn node_name(slot: Slot) -> &'static str {
    match slot {
        Slot::A => "n1",
        Slot::B => "n2",
    }
}

fn pod_name(slot: Slot) -> String {
    plan::names::engine(&key(), slot)
}

/// The volume's key: its objects' names in the operator's namespace.
fn key() -> String {
    plan::names::key(NS, VOLUME)
}

/// The owner labels the operator puts on every object of the volume.
fn owner_labels() -> Value {
    serde_json::to_value(plan::labels(&volume_object(
        FailoverPolicy::WaitForPrimary,
        None,
    )))
    .unwrap()
}

/// What the API server holds.
#[derive(Default)]
struct World {
    /// Ready condition of n1 and n2.
    node_ready: [bool; 2],
    /// `spec.unschedulable` of n1 and n2 (cordoned).
    node_cordoned: [bool; 2],
    /// `spec.failover.engineRestartGrace` of the volume.
    grace: String,
    /// Merged into the volume's spec (`replication.mode`, `failover.maxLossBytes`); null: nothing.
    spec_patch: Value,
    /// Workload pods using the volume's claim, by name.
    workloads: BTreeMap<String, Value>,
    /// The PodDisruptionBudget the operator applied.
    budget: Option<Value>,
    /// (pod, value) of every `tandem.dev/disruption-allowed` label the operator set.
    labels: Vec<(String, String)>,
    /// Engine pods by name.
    pods: BTreeMap<String, Value>,
    /// The MirroredVolume as stored (spec and metadata), for answering status writes.
    volume: Value,
    /// The last status the operator wrote.
    status: Option<Value>,
    /// (reason, note) of every event.
    events: Vec<(String, String)>,
    /// (pod, gracePeriodSeconds) of every pod deletion.
    deletions: Vec<(String, Option<i64>)>,
    /// Engine pods the operator created.
    created: Vec<Value>,
    /// Secrets in the operator's namespace by name (the token, and the certificates it applied).
    secrets: BTreeMap<String, Value>,
    /// How many Secret applies the operator made.
    secret_applies: usize,
    /// The PersistentVolume's `spec.capacity.storage` as the operator last patched it (none: 16Mi).
    pv_capacity: Option<String>,
    /// Requests this fake does not know: the test fails on any.
    unexpected: Vec<String>,
    /// Ready nodes beyond n1 and n2 (a live move's targets).
    extra_nodes: Vec<String>,
    /// Services the operator deleted, by name.
    deleted_services: Vec<String>,
    /// Labels the operator merge-patched onto nodes (the volume's node label), by node.
    node_labels: BTreeMap<String, serde_json::Map<String, Value>>,
}

impl World {
    /// A pod running on its node: ready (since long ago) or unready since `unready_for` seconds.
    fn run_pod(&mut self, slot: Slot, role: &str, ready: bool, unready_for: i64) {
        let name = pod_name(slot);
        let mut pod = self.pods.remove(&name).unwrap_or_else(|| {
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": name, "namespace": OP_NS,
                    "labels": owner_labels(),
                    "annotations": {"tandem.dev/role": role},
                },
                "spec": {"containers": [{"name": "engine"}]},
            })
        });
        pod["metadata"]["labels"]["tandem.dev/slot"] = json!(slot.as_str());
        pod["metadata"]["creationTimestamp"] = json!(ago(600));
        pod["spec"]["nodeName"] = json!(node_name(slot));
        pod["status"] = json!({
            "phase": "Running",
            "conditions": [{
                "type": "Ready",
                "status": if ready { "True" } else { "False" },
                "lastTransitionTime": ago(if ready { 300 } else { unready_for }),
            }],
        });
        self.pods.insert(name, pod);
    }

    /// The volume as the API server would answer a GET: spec and metadata with the last status.
    fn stored_volume(&self) -> Value {
        let mut v = self.volume.clone();
        v["status"] = self.status.clone().unwrap_or(Value::Null);
        v
    }

    fn reasons(&self) -> Vec<&str> {
        self.events.iter().map(|e| e.0.as_str()).collect()
    }

    /// A workload pod of the claim on `node`, created `age` seconds ago.
    fn run_workload(&mut self, name: &str, node: &str, age: i64) {
        self.workloads.insert(
            name.into(),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NS, "creationTimestamp": ago(age)},
                "spec": {
                    "nodeName": node,
                    "containers": [{"name": "app"}],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": CLAIM}}],
                },
                "status": {"phase": "Running"},
            }),
        );
    }

    /// The disruption label an engine pod carries now.
    fn label(&self, slot: Slot) -> Option<String> {
        self.pods.get(&pod_name(slot)).and_then(|p| {
            p["metadata"]["labels"]["tandem.dev/disruption-allowed"]
                .as_str()
                .map(str::to_string)
        })
    }

    fn answer(&mut self, method: &str, path: &str, query: &str, body: &Value) -> (u16, Value) {
        let pods_prefix = format!("/api/v1/namespaces/{OP_NS}/pods");
        let workloads_prefix = format!("/api/v1/namespaces/{NS}/pods");
        let secrets_prefix = format!("/api/v1/namespaces/{OP_NS}/secrets");
        match (method, path) {
            (_, p) if p.starts_with("/apis/events.k8s.io/") => {
                self.events.push((
                    body["reason"].as_str().unwrap_or_default().to_string(),
                    body["note"].as_str().unwrap_or_default().to_string(),
                ));
                (201, body.clone())
            }
            // A node's labels are merge-patched (the volume's node label; null removes it).
            ("PATCH", p) if p.starts_with("/api/v1/nodes/") => {
                let name = p["/api/v1/nodes/".len()..].to_string();
                let labels = self.node_labels.entry(name.clone()).or_default();
                for (k, v) in body["metadata"]["labels"].as_object().unwrap() {
                    match v {
                        Value::Null => labels.remove(k),
                        v => labels.insert(k.clone(), v.clone()),
                    };
                }
                self.answer("GET", p, "", &Value::Null)
            }
            ("GET", p) if p.starts_with("/api/v1/nodes/") => {
                let name = &p["/api/v1/nodes/".len()..];
                let (ready, cordoned) = match name {
                    "n1" => (self.node_ready[0], self.node_cordoned[0]),
                    "n2" => (self.node_ready[1], self.node_cordoned[1]),
                    n if self.extra_nodes.iter().any(|e| e == n) => (true, false),
                    _ => return (404, not_found(name)),
                };
                let mut labels = self.node_labels.get(name).cloned().unwrap_or_default();
                labels.insert("kubernetes.io/hostname".into(), json!(name));
                (
                    200,
                    json!({
                        "apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": name, "labels": labels},
                        "spec": {"unschedulable": cordoned},
                        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "Unknown" }}]},
                    }),
                )
            }
            ("GET", p) if p == pods_prefix || p == workloads_prefix => {
                // Engine pods by label (operator's namespace); workload pods by node (field selector).
                let items: Vec<Value> = if p == pods_prefix {
                    assert!(query.contains("labelSelector"), "{query}");
                    self.pods.values().cloned().collect()
                } else {
                    self.workloads
                        .values()
                        .filter(|w| {
                            let node = w["spec"]["nodeName"].as_str().unwrap_or_default();
                            query.contains(&format!("spec.nodeName%3D{node}"))
                                || query.contains(&format!("spec.nodeName={node}"))
                        })
                        .cloned()
                        .collect()
                };
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}),
                )
            }
            // A merge patch of labels (no field manager): an existing pod is relabelled.
            ("PATCH", p) if p.starts_with(&pods_prefix) && !query.contains("fieldManager") => {
                let name = p[pods_prefix.len() + 1..].to_string();
                let Some(pod) = self.pods.get_mut(&name) else {
                    return (404, not_found(&name));
                };
                for (k, v) in body["metadata"]["labels"].as_object().unwrap() {
                    pod["metadata"]["labels"][k] = v.clone();
                    if k == "tandem.dev/disruption-allowed" {
                        self.labels
                            .push((name.clone(), v.as_str().unwrap().to_string()));
                    }
                }
                (200, pod.clone())
            }
            ("PATCH", p) if p.starts_with(&pods_prefix) => {
                let name = p[pods_prefix.len() + 1..].to_string();
                let mut pod = body.clone();
                pod["status"] = json!({"phase": "Pending"});
                self.created.push(body.clone());
                self.pods.insert(name, pod.clone());
                (200, pod)
            }
            ("DELETE", p) if p.starts_with(&pods_prefix) || p.starts_with(&workloads_prefix) => {
                let name = p.rsplit('/').next().unwrap_or_default().to_string();
                self.deletions
                    .push((name.clone(), body["gracePeriodSeconds"].as_i64()));
                let gone = if p.starts_with(&pods_prefix) {
                    self.pods.remove(&name)
                } else {
                    self.workloads.remove(&name)
                };
                match gone {
                    Some(pod) => (200, pod),
                    None => (404, not_found(&name)),
                }
            }
            ("GET", p) if p == secrets_prefix => {
                let token = Secret {
                    metadata: ObjectMeta {
                        name: Some(plan::names::secret(&key())),
                        namespace: Some(OP_NS.into()),
                        labels: serde_json::from_value(owner_labels()).unwrap(),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([(
                        "token".to_string(),
                        ByteString(TOKEN.as_bytes().to_vec()),
                    )])),
                    ..Default::default()
                };
                let mut items = vec![serde_json::to_value(token).unwrap()];
                items.extend(self.secrets.values().cloned());
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "SecretList", "metadata": {}, "items": items}),
                )
            }
            ("PATCH", p) if p.starts_with(&secrets_prefix) => {
                let name = p.rsplit('/').next().unwrap_or_default().to_string();
                self.secrets.insert(name, body.clone());
                self.secret_applies += 1;
                (200, body.clone())
            }
            ("GET", p)
                if p == format!("/api/v1/persistentvolumes/{}", plan::names::pv(NS, VOLUME)) =>
            {
                (
                    200,
                    json!({
                        "apiVersion": "v1", "kind": "PersistentVolume",
                        "metadata": {"name": plan::names::pv(NS, VOLUME), "labels": owner_labels()},
                        "spec": {
                            "capacity": {"storage": self.pv_capacity.as_deref().unwrap_or("16Mi")},
                            "csi": {"driver": "csi.tandem.dev", "volumeHandle": format!("{NS}/{VOLUME}")},
                            "claimRef": {"namespace": NS, "name": CLAIM},
                        },
                    }),
                )
            }
            // Growth patches the capacity alone (a merge patch).
            ("PATCH", p)
                if p == format!("/api/v1/persistentvolumes/{}", plan::names::pv(NS, VOLUME)) =>
            {
                let storage = body["spec"]["capacity"]["storage"].as_str();
                self.pv_capacity = Some(storage.unwrap_or_default().to_string());
                (200, body.clone())
            }
            ("GET", "/apis/storage.k8s.io/v1/volumeattachments") => (
                200,
                json!({"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachmentList", "metadata": {}, "items": []}),
            ),
            ("PATCH", p) if p.starts_with(&format!("/api/v1/namespaces/{OP_NS}/services/")) => {
                (200, body.clone())
            }
            ("DELETE", p) if p.starts_with(&format!("/api/v1/namespaces/{OP_NS}/services/")) => {
                let name = p.rsplit('/').next().unwrap_or_default().to_string();
                self.deleted_services.push(name.clone());
                (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                )
            }
            ("PATCH", p)
                if p == format!(
                    "/apis/policy/v1/namespaces/{OP_NS}/poddisruptionbudgets/{}",
                    plan::names::budget(&key())
                ) =>
            {
                self.budget = Some(body.clone());
                (200, body.clone())
            }
            // `kubectl tandem`: the volume as stored (with the last status), its events, and
            // its spec.primaryNode edits (a JSON merge patch; null clears).
            ("GET", p)
                if p == format!("/apis/tandem.dev/v1alpha1/namespaces/{NS}/mirroredvolumes")
                    || p == "/apis/tandem.dev/v1alpha1/mirroredvolumes" =>
            {
                (
                    200,
                    json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "MirroredVolumeList",
                           "metadata": {}, "items": [self.stored_volume()]}),
                )
            }
            ("GET", p)
                if p == format!(
                    "/apis/tandem.dev/v1alpha1/namespaces/{NS}/mirroredvolumes/{VOLUME}"
                ) =>
            {
                (200, self.stored_volume())
            }
            ("PATCH", p)
                if p == format!(
                    "/apis/tandem.dev/v1alpha1/namespaces/{NS}/mirroredvolumes/{VOLUME}"
                ) =>
            {
                let node = &body["spec"]["primaryNode"];
                if !self.spec_patch.is_object() {
                    self.spec_patch = json!({});
                }
                for spec in [&mut self.spec_patch, &mut self.volume["spec"]] {
                    if let Some(spec) = spec.as_object_mut() {
                        match node {
                            Value::Null => spec.remove("primaryNode"),
                            n => spec.insert("primaryNode".into(), n.clone()),
                        };
                    }
                }
                (200, self.stored_volume())
            }
            ("GET", p) if p == format!("/api/v1/namespaces/{NS}/events") => {
                assert!(query.contains("involvedObject.name"), "{query}");
                let items: Vec<Value> = self
                    .events
                    .iter()
                    .enumerate()
                    .map(|(i, (reason, note))| {
                        json!({
                            "metadata": {"name": format!("{VOLUME}.{i}"), "namespace": NS},
                            "involvedObject": {"kind": "MirroredVolume", "name": VOLUME, "namespace": NS},
                            "reason": reason, "message": note, "type": "Normal",
                            "eventTime": ago(0),
                        })
                    })
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": items}),
                )
            }
            ("PATCH", p)
                if p == format!(
                    "/apis/tandem.dev/v1alpha1/namespaces/{NS}/mirroredvolumes/{VOLUME}/status"
                ) =>
            {
                self.status = Some(body["status"].clone());
                let mut obj = self.volume.clone();
                obj["status"] = body["status"].clone();
                (200, obj)
            }
            _ => {
                self.unexpected.push(format!("{method} {path}?{query}"));
                (
                    500,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": format!("fake API server: unexpected {method} {path}"), "code": 500}),
                )
            }
        }
    }
}

fn not_found(what: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("{what} not found"), "reason": "NotFound", "code": 404})
}

/// Serves the world to a kube `Client` until the client is dropped.
fn api_server(world: Arc<Mutex<World>>) -> (Client, JoinHandle<()>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().to_string();
            let path = request.uri().path().to_string();
            let query = request.uri().query().unwrap_or_default().to_string();
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            let (code, answer) = world.lock().unwrap().answer(&method, &path, &query, &body);
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    (Client::new(service, NS), task)
}

/// `default/data`: 16Mi on n1 (slot a) and n2 (slot b), hostPath engines, the given policy.
fn volume_object(policy: FailoverPolicy, status: Option<&Value>) -> MirroredVolume {
    volume_with_grace(policy, "60s", status)
}

/// [`volume_object`] with `spec.failover.engineRestartGrace`.
fn volume_with_grace(
    policy: FailoverPolicy,
    grace: &str,
    status: Option<&Value>,
) -> MirroredVolume {
    let mut v = json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "MirroredVolume",
        "metadata": {
            "name": VOLUME, "namespace": NS, "generation": 1,
            "uid": "0c6a0d1e-0000-4000-8000-00000000e2e0",
            "finalizers": ["mirroredvolumes.tandem.dev"],
        },
        "spec": {
            "size": "16Mi",
            "placement": {"nodes": ["n1", "n2"]},
            "engineStorage": {"hostPath": "/var/lib/tandem"},
            "failover": {
                "policy": format!("{policy:?}"),
                "peerTimeout": format!("{}s", PEER_TIMEOUT.as_secs()),
                "engineRestartGrace": grace,
                "leaseMs": LEASE_MS,
            },
        },
    });
    if let Some(s) = status {
        v["status"] = s.clone();
    }
    serde_json::from_value(v).unwrap()
}

/// Merges `patch` into `v`, object by object (a JSON merge patch without deletions).
fn merge(v: &mut Value, patch: &Value) {
    match (v, patch) {
        (Value::Object(v), Value::Object(p)) => {
            for (k, pv) in p {
                merge(v.entry(k.clone()).or_insert(Value::Null), pv);
            }
        }
        (_, Value::Null) => {}
        (v, p) => *v = p.clone(),
    }
}

/// The operator: its Context over the fake API server and the routed real engine client.
struct Operator {
    /// When this operator (its Context, its witness memory) started.
    started: Instant,
    ctx: Arc<Context>,
    world: Arc<Mutex<World>>,
    engines: Arc<Routed>,
    _server: JoinHandle<()>,
    /// Renews the operator's client certificate (ends with the test's runtime).
    _identity: JoinHandle<()>,
}

impl Operator {
    fn new(pair: &Pair) -> Operator {
        let world = Arc::new(Mutex::new(World {
            node_ready: [true, true],
            grace: "60s".into(),
            secrets: volume_secrets()
                .iter()
                .map(|s| {
                    (
                        s.metadata.name.clone().unwrap(),
                        serde_json::to_value(s).unwrap(),
                    )
                })
                .collect(),
            ..Default::default()
        }));
        {
            let mut w = world.lock().unwrap();
            w.run_pod(Slot::A, "primary", true, 0);
            w.run_pod(Slot::B, "secondary", true, 0);
        }
        let engines = Arc::new(Routed::default());
        {
            let mv = volume_object(FailoverPolicy::WaitForPrimary, None);
            let cfg = EngineConfig::default();
            let mut routes = engines.routes.lock().unwrap();
            routes.insert(
                plan::engine_address(&mv, Slot::A, &cfg),
                pair.a.grpc.clone(),
            );
            routes.insert(
                plan::engine_address(&mv, Slot::B, &cfg),
                pair.b.grpc.clone(),
            );
        }
        let (client, server) = api_server(world.clone());
        // As the operator's main does: every engine channel of this process is mutual TLS as `Operator`.
        // The same CA in every test, so a parallel test installing its own changes nothing.
        let identity =
            operator::certs::serve_operator_identity(test_ca().clone(), Duration::from_secs(3600))
                .unwrap();
        let started = Instant::now();
        let ctx = Context::new(
            client,
            Metrics::default(),
            engines.clone(),
            EngineConfig::default(),
            test_ca().clone(),
            Some("failover-engines-test".into()),
        );
        Operator {
            started,
            ctx: Arc::new(ctx),
            world,
            engines,
            _server: server,
            _identity: identity,
        }
    }

    /// One reconcile of the volume as the watcher would deliver it (with the status last written).
    async fn reconcile(&self, policy: FailoverPolicy) -> (Action, MirroredVolumeStatus) {
        let mv = {
            let mut w = self.world.lock().unwrap();
            let patched = |status: Option<&Value>| {
                let mut v =
                    serde_json::to_value(volume_with_grace(policy, &w.grace, status)).unwrap();
                merge(&mut v["spec"], &w.spec_patch);
                v
            };
            let mv: MirroredVolume = serde_json::from_value(patched(w.status.as_ref())).unwrap();
            w.volume = patched(None);
            mv
        };
        let result = mv.reconcile(self.ctx.clone()).await;
        let w = self.world.lock().unwrap();
        assert!(
            w.unexpected.is_empty(),
            "unexpected API requests: {:?}",
            w.unexpected
        );
        let action = result.unwrap_or_else(|e| panic!("reconcile failed: {e}"));
        let status = serde_json::from_value(w.status.clone().expect("no status written")).unwrap();
        (action, status)
    }

    /// Reconciles until the phase is `want` (recording every phase seen on the way).
    async fn reconcile_until(
        &self,
        policy: FailoverPolicy,
        want: Phase,
        secs: u64,
        seen: &mut Vec<Phase>,
        pair: &Pair,
    ) -> MirroredVolumeStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (_, status) = self.reconcile(policy).await;
            if seen.last() != Some(&status.phase) {
                seen.push(status.phase);
            }
            if status.phase == want {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "phase never became {want:?} within {secs}s; phases seen {seen:?}; status {}\na: {:?}\nb: {:?}\na log:\n{}\nb log:\n{}",
                    serde_json::to_string_pretty(&status).unwrap(),
                    pair.a.status().await.map_err(|e| format!("{e:#}")),
                    pair.b.status().await.map_err(|e| format!("{e:#}")),
                    pair.a.log_tail(25),
                    pair.b.log_tail(25)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn takeovers(&self) -> Vec<(Slot, FailoverPolicy, Duration)> {
        self.engines.takeovers.lock().unwrap().clone()
    }
}

fn condition<'a>(status: &'a MirroredVolumeStatus, type_: &str) -> &'a operator::crd::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status:?}"))
}

/// The engines on this VM share two cores: one scenario at a time keeps the timings honest.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

// ---------------------------------------------------------------------------------------------------------
// Scenarios.

/// The primary's engine dies with writes the secondary never acknowledged. Under WaitForPrimary the operator
/// asks for the takeover, the secondary refuses (HandoffBlocked) and nothing is promoted; under ForcePromote
/// the secondary serves at the next epoch and the status names the lost blocks. The dead engine is restarted
/// on its state dir (the pod the operator recreated): it steps down, its divergent blocks are overwritten by
/// reverse replication, and the phase goes Reversing, then Synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_primary_blocks_under_wait_then_force_promotes_and_the_old_primary_rejoins() {
    let _serial = serial().await;
    let (_dir, mut pair) = start_pair();
    let mut model = vec![0u8; SIZE as usize];
    write_blocks(&pair.a, &mut model, 0..8, 0x11);
    wait_synced(&pair).await;
    let op = Operator::new(&pair);

    // The operator establishes the pair from the engines' own view.
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(status.phase, Phase::Synced, "{status:?}");
    assert_eq!(status.epoch, 1);
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::A);
    assert_mutual_tls(&pair).await;

    // Writes the secondary hears about (heartbeats carry the primary's pending set) but never acknowledges.
    pair.a
        .fault(pb::FaultRequest {
            rate_bytes_per_sec: Some(4096),
            hold_acks: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    // One record per block on a one-block-per-second link: the secondary has at most the first one or two
    // when the primary dies.
    write_each_block(&pair.a, &mut model, 10..16, 0xee);
    eventually(
        "the secondary to know the primary's backlog",
        20,
        || async {
            let b = pair.b.status().await.unwrap();
            if b.peer_pending_blocks == 6 {
                Ok(())
            } else {
                Err(format!("{b:?}"))
            }
        },
    )
    .await;
    pair.a.kill();
    // Its container restarts and fails; the pod stays unready past the engine restart grace (60 s).
    op.world
        .lock()
        .unwrap()
        .run_pod(Slot::A, "primary", false, 120);

    // WaitForPrimary: the operator asks, the engine refuses, nothing is promoted.
    let t = Instant::now();
    let (action, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert!(
        t.elapsed() < PEER_TIMEOUT + Duration::from_secs(8),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        op.takeovers(),
        vec![(Slot::B, FailoverPolicy::WaitForPrimary, PEER_TIMEOUT)]
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert_eq!(status.phase, Phase::TakingOver, "{status:?}");
    assert_eq!(status.epoch, 1, "nothing was promoted");
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::A);
    let c = condition(&status, "TakeoverInProgress");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "HandoffBlocked"),
        "{c:?}"
    );
    assert!(c.message.contains("PeerUnreachable"), "{}", c.message);
    assert_eq!(condition(&status, "Degraded").status, "True");
    assert_eq!(condition(&status, "Ready").status, "False");
    let takeover = status.takeover.as_ref().unwrap();
    assert!(takeover.completed_at.is_none());
    assert!(
        takeover
            .last_error
            .as_deref()
            .unwrap()
            .starts_with("HandoffBlocked: PeerUnreachable"),
        "{takeover:?}"
    );
    assert_eq!(takeover.last_reason.as_deref(), Some("HandoffBlocked"));
    assert!(op
        .world
        .lock()
        .unwrap()
        .reasons()
        .contains(&"HandoffBlocked"));
    let b = pair.b.status().await.unwrap();
    assert_eq!((role_name(b.role), b.epoch), ("secondary", 1), "{b:?}");
    assert!(b.condition.starts_with("HandoffBlocked"), "{b:?}");
    assert_eq!(b.condition_reason, "HandoffBlocked", "{b:?}");
    assert!(
        op.world.lock().unwrap().deletions.is_empty(),
        "the primary's pod is not touched while it is still the primary"
    );

    // WaitForPrimary never forces, however long the primary stays away (well past the lease).
    let until = op.started + WITNESS_WAIT + Duration::from_secs(1);
    while Instant::now() < until {
        let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
        assert_eq!(
            (status.epoch, status.primary.as_ref().unwrap().slot),
            (1, Slot::A)
        );
        assert_eq!(
            status.promotion_wait.as_ref().unwrap().reason,
            "WaitForPrimary"
        );
    }
    assert!(
        op.takeovers()
            .iter()
            .all(|t| t.1 == FailoverPolicy::WaitForPrimary),
        "{:?}",
        op.takeovers()
    );

    // ForcePromote: the secondary serves at epoch 2, and the status names what was lost. The operator forces
    // only once no lease it may have granted can run (it counts its own start as a grant) and the
    // secondary's promise to the old primary is over.
    let before_force = std::fs::read(pair.b.data()).unwrap();
    model[(10 * BLOCK) as usize..(16 * BLOCK) as usize]
        .copy_from_slice(&before_force[(10 * BLOCK) as usize..(16 * BLOCK) as usize]);
    let tries = op.takeovers().len();
    let (_, status) = op.reconcile(FailoverPolicy::ForcePromote).await;
    assert_eq!(
        op.takeovers()[tries..].to_vec(),
        vec![(Slot::B, FailoverPolicy::ForcePromote, PEER_TIMEOUT)]
    );
    let forced_at = op.engines.forced_at.lock().unwrap()[0];
    assert!(
        forced_at >= op.started + WITNESS_WAIT,
        "forced before the witness's wait"
    );
    assert_eq!(status.epoch, 2);
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::B);
    // Right after, the new primary (its peer is gone) gets a lease from the operator.
    let lease = status
        .lease
        .as_ref()
        .expect("a lease grant after the forced promotion");
    assert_eq!((lease.node.as_str(), lease.error.as_deref()), ("n2", None));
    assert_eq!(
        op.engines.grants.lock().unwrap().last(),
        Some(&(Slot::B, false))
    );
    assert!(pair.b.status().await.unwrap().lease_remaining_ms > 0);
    let takeover = status.takeover.as_ref().unwrap();
    // The six unacknowledged blocks, less any the engine knows it received (today it counts all six).
    assert!((1..=6).contains(&takeover.lost_blocks), "{takeover:?}");
    assert!(
        takeover.lost_seq_to >= takeover.lost_seq_from && takeover.lost_seq_from > 0,
        "{takeover:?} b: {:?}",
        pair.b.status().await.unwrap()
    );
    assert!(takeover.completed_at.is_some() && takeover.last_error.is_none());
    assert_eq!(takeover.attempts as usize, op.takeovers().len());
    assert_eq!(takeover.fence.as_deref(), Some("LeaseExpired"));
    assert_eq!(
        status.phase,
        Phase::Degraded,
        "the old primary is still down"
    );
    assert_eq!(condition(&status, "Ready").status, "True");
    assert_eq!(condition(&status, "TakeoverInProgress").status, "False");
    let b = pair.b.status().await.unwrap();
    assert_eq!(
        (role_name(b.role), b.epoch, b.lost_blocks),
        ("primary", 2, takeover.lost_blocks),
        "{b:?}"
    );
    {
        let w = op.world.lock().unwrap();
        assert!(
            w.reasons().contains(&"TakeoverCompleted"),
            "{:?}",
            w.reasons()
        );
        // The stale old primary's pod is restarted (gracefully) so it comes back as secondary.
        assert_eq!(w.deletions, vec![(pod_name(Slot::A), None)]);
    }
    assert_eq!(
        first_difference(&read_volume(&pair.b).await, &model),
        None,
        "the new primary serves what it had; the unacknowledged blocks are the lost ones"
    );

    // The operator recreates the pod as secondary, pointing at the new primary.
    let (_, status) = op.reconcile(FailoverPolicy::ForcePromote).await;
    assert_eq!(status.phase, Phase::Degraded);
    let created = op.world.lock().unwrap().created.clone();
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(
        created[0]["metadata"]["annotations"]["tandem.dev/role"],
        "secondary"
    );
    let args: Vec<&str> = created[0]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let peer = args.iter().position(|a| *a == "--peer").unwrap();
    let mv = volume_object(FailoverPolicy::ForcePromote, None);
    assert_eq!(
        args[peer + 1],
        plan::engine_address(&mv, Slot::B, &EngineConfig::default())
    );

    // The kubelet starts it: the same state dir (its meta still says primary at epoch 1, never fenced).
    // Reverse replication is held for a moment so the Reversing phase can be seen.
    pause(&pair.b, true).await;
    pair.a.restart_with(|c| c.role("secondary")).unwrap();
    op.world
        .lock()
        .unwrap()
        .run_pod(Slot::A, "secondary", true, 0);
    eventually("the old primary to step down", 20, || async {
        let a = pair.a.status().await.unwrap();
        if role_name(a.role) == "secondary" && a.epoch == 2 {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    })
    .await;
    let mut phases = vec![Phase::Degraded];
    let status = op
        .reconcile_until(
            FailoverPolicy::ForcePromote,
            Phase::Reversing,
            20,
            &mut phases,
            &pair,
        )
        .await;
    assert_eq!(status.epoch, 2);
    let secondary = status.secondary.as_ref().unwrap();
    assert_eq!((secondary.slot, secondary.reachable), (Slot::A, true));
    assert_eq!(condition(&status, "Synced").reason, "Reversing");
    assert!(op
        .world
        .lock()
        .unwrap()
        .reasons()
        .contains(&"EngineRejoined"));

    pause(&pair.b, false).await;
    let status = op
        .reconcile_until(
            FailoverPolicy::ForcePromote,
            Phase::Synced,
            30,
            &mut phases,
            &pair,
        )
        .await;
    assert_eq!(
        phases,
        vec![Phase::Degraded, Phase::Reversing, Phase::Synced],
        "phases after the forced promotion"
    );
    assert_eq!(status.epoch, 2);
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::B);
    assert_eq!(condition(&status, "Synced").status, "True");
    assert_eq!(condition(&status, "Degraded").status, "False");
    assert_eq!(condition(&status, "Ready").status, "True");
    assert_eq!(
        op.engines.forced_at.lock().unwrap().len(),
        1,
        "no takeover after the promotion"
    );

    // The two copies are equal again: the old primary's divergent blocks were overwritten.
    assert_eq!(first_difference(&read_volume(&pair.b).await, &model), None);
    eventually(
        "the old primary's copy to equal the new primary's",
        20,
        || async {
            let (a, b) = (
                std::fs::read(pair.a.data()).unwrap(),
                std::fs::read(pair.b.data()).unwrap(),
            );
            match first_difference(&a, &b) {
                None => Ok(()),
                Some(block) => Err(format!("block {block} differs")),
            }
        },
    )
    .await;
}

/// The primary's node stops reporting while its engine still runs. The operator takes over with
/// WaitForPrimary, the handoff succeeds (the old primary is fenced and hands over its table), and the phase
/// is TakingOver while the old primary drains: reads of blocks it still owes come through it. When the node
/// returns, the kubelet replaces the force-deleted pod's engine on the same state dir; it finishes the
/// drain, turns secondary, and the phase goes Reversing, then Synced, with every written byte served by the
/// new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_node_with_a_live_primary_hands_over_drains_reverses_and_syncs() {
    let _serial = serial().await;
    let (_dir, mut pair) = start_pair();
    let mut model = vec![0u8; SIZE as usize];
    write_blocks(&pair.a, &mut model, 0..8, 0x11);
    wait_synced(&pair).await;
    let op = Operator::new(&pair);
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(status.phase, Phase::Synced, "{status:?}");

    // A backlog the secondary does not have.
    pause(&pair.a, true).await;
    write_blocks(&pair.a, &mut model, 4..12, 0x22);
    write_blocks(&pair.a, &mut model, 100..110, 0x33);
    let pending = pair.a.status().await.unwrap().pending_blocks;
    assert_eq!(pending, 18);

    // Node n1 stops reporting: NotReady, the pods there still look ready.
    op.world.lock().unwrap().node_ready[0] = false;
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(
        op.takeovers(),
        vec![(Slot::B, FailoverPolicy::WaitForPrimary, PEER_TIMEOUT)]
    );
    assert_eq!(status.epoch, 2);
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::B);
    let takeover = status.takeover.as_ref().unwrap();
    assert_eq!(takeover.reason, "PrimaryNodeLost");
    assert_eq!(takeover.pending_blocks, pending, "{takeover:?}");
    assert_eq!(takeover.lost_blocks, 0);
    assert_eq!(status.phase, Phase::TakingOver, "{status:?}");
    let c = condition(&status, "TakeoverInProgress");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "TakingOver")
    );
    assert_eq!(condition(&status, "Ready").status, "True");
    {
        let w = op.world.lock().unwrap();
        for r in [
            "NodeLost",
            "TakeoverStarted",
            "TakeoverCompleted",
            "EngineNodeLost",
        ] {
            assert!(w.reasons().contains(&r), "{r} missing in {:?}", w.reasons());
        }
        // Fenced in Kubernetes too: the pod object goes at once, the kubelet kills it if the node returns.
        assert_eq!(w.deletions, vec![(pod_name(Slot::A), Some(0))]);
    }
    let (a, b) = (
        pair.a.status().await.unwrap(),
        pair.b.status().await.unwrap(),
    );
    assert_eq!(
        (role_name(a.role), a.epoch, a.takeover()),
        ("fenced", 2, TakeoverPhase::Fenced)
    );
    assert_eq!(
        (role_name(b.role), b.epoch, b.takeover()),
        ("primary", 2, TakeoverPhase::Draining)
    );

    // The workload sees every byte at once: blocks the old primary still owes are read through it.
    assert_eq!(first_difference(&read_volume(&pair.b).await, &model), None);
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(status.phase, Phase::TakingOver, "still draining");
    assert!(
        status.takeover.as_ref().unwrap().proxied_reads > 0,
        "{status:?}"
    );

    // The node returns. The kubelet kills the old container (its pod was force-deleted) and starts the pod
    // the operator recreated, on the same state dir: a fenced engine, which finishes its drain by itself.
    // Reverse replication is held for a moment so the Reversing phase can be seen.
    pause(&pair.b, true).await;
    {
        let mut w = op.world.lock().unwrap();
        w.node_ready[0] = true;
    }
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    let mut phases = vec![status.phase];
    pair.a.restart_with(|c| c.role("secondary")).unwrap();
    {
        let mut w = op.world.lock().unwrap();
        assert!(
            w.pods.contains_key(&pod_name(Slot::A)),
            "the operator recreated the pod"
        );
        w.run_pod(Slot::A, "secondary", true, 0);
    }
    let status = op
        .reconcile_until(
            FailoverPolicy::WaitForPrimary,
            Phase::Reversing,
            30,
            &mut phases,
            &pair,
        )
        .await;
    assert_eq!(status.epoch, 2);
    let a = pair.a.status().await.unwrap();
    assert_eq!((role_name(a.role), a.epoch), ("secondary", 2), "{a:?}");
    assert_eq!(
        pair.b.status().await.unwrap().takeover(),
        TakeoverPhase::None
    );

    pause(&pair.b, false).await;
    let status = op
        .reconcile_until(
            FailoverPolicy::WaitForPrimary,
            Phase::Synced,
            30,
            &mut phases,
            &pair,
        )
        .await;
    assert_eq!(
        phases,
        vec![Phase::TakingOver, Phase::Reversing, Phase::Synced],
        "phases after the takeover"
    );
    assert_eq!(status.epoch, 2);
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::B);
    assert_eq!(status.secondary.as_ref().unwrap().slot, Slot::A);
    assert_eq!(condition(&status, "Synced").status, "True");
    assert_eq!(condition(&status, "TakeoverInProgress").status, "False");
    assert_eq!(condition(&status, "Degraded").status, "False");
    assert_eq!(status.takeover.as_ref().unwrap().pending_blocks, 0);
    assert_eq!(op.takeovers().len(), 1, "one takeover, no more");

    // Every written byte, served by the new primary, and the same on the old one.
    assert_eq!(first_difference(&read_volume(&pair.b).await, &model), None);
    eventually("the old primary's copy to equal the model", 20, || async {
        match first_difference(&std::fs::read(pair.a.data()).unwrap(), &model) {
            None => Ok(()),
            Some(block) => Err(format!("block {block} differs")),
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------------------
// Disruptions that are not failures: an engine restart on a live node, a drain.

/// What a writer saw: every write acknowledged (block, byte), every error the engine answered, and how
/// often its connection broke.
#[derive(Default)]
struct Writes {
    acked: Vec<(u64, u8)>,
    /// When each acknowledgement (of `acked`, same order) reached the writer.
    acked_at: Vec<Instant>,
    errors: Vec<String>,
    /// When each error (of `errors`) reached the writer.
    errors_at: Vec<Instant>,
    reconnects: usize,
}

/// `spawn_writer` on engine `nbd` at epoch 1: what it saw, its stop flag, its task.
fn start_writer(
    nbd: &str,
) -> (
    Arc<Mutex<Writes>>,
    Arc<std::sync::atomic::AtomicBool>,
    JoinHandle<()>,
) {
    let writes = Arc::new(Mutex::new(Writes::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = spawn_writer(nbd.to_string(), 1, writes.clone(), stop.clone());
    (writes, stop, writer)
}

/// A writer attached the way the CSI plugin's attachment is: pinned to `<volume>@<epoch>`, and when the
/// connection breaks it reconnects (with a short back-off) and resends the unanswered write, so an engine
/// restart is a stall. An error the engine answers (EIO) is what the workload would see: recorded.
fn spawn_writer(
    nbd: String,
    epoch: u64,
    writes: Arc<Mutex<Writes>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let export = format!("{VOLUME}@{epoch}");
        let mut client: Option<NbdClient> = None;
        let mut i: u64 = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let (block, byte) = (200 + i % 64, (i % 251) as u8 + 1);
            let c = match client.as_mut() {
                Some(c) => c,
                None => match NbdClient::connect(&nbd, &export).await {
                    Ok(c) => client.insert(c),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            match c.write(block * BLOCK, &vec![byte; BLOCK as usize]).await {
                Ok(()) => {
                    let mut w = writes.lock().unwrap();
                    w.acked.push((block, byte));
                    w.acked_at.push(Instant::now());
                    i += 1;
                }
                Err(tandem_api::nbd::client::NbdError::Errno(e)) => {
                    let mut w = writes.lock().unwrap();
                    w.errors.push(format!("errno {e} on block {block}"));
                    w.errors_at.push(Instant::now());
                    i += 1;
                }
                // The connection broke: unanswered, so not acknowledged; resend after reconnecting.
                Err(_) => {
                    client = None;
                    writes.lock().unwrap().reconnects += 1;
                }
            }
        }
    })
}

/// The model of a writer's acknowledged writes: the last byte per block.
fn acked_model(writes: &Writes) -> BTreeMap<u64, u8> {
    writes.acked.iter().copied().collect()
}

/// The primary's engine pod is deleted on a live node. The operator recreates it there as primary (no
/// takeover), the engine comes back from its state dir at the same epoch, and a writer pinned to
/// `data@1` that reconnects like the CSI attachment sees a stall, not an error: every write it got
/// acknowledged reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_primary_pod_on_a_live_node_restarts_and_the_writer_only_stalls() {
    let _serial = serial().await;
    let (_dir, mut pair) = start_pair();
    wait_synced(&pair).await;
    let op = Operator::new(&pair);
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(
        (status.phase, status.epoch),
        (Phase::Synced, 1),
        "{status:?}"
    );

    let (writes, stop, writer) = start_writer(&pair.a.nbd);
    wait_acked(&writes, 20, 20).await;

    // `kubectl delete pod <key>-engine-a`: the pod object goes, the kubelet kills the engine.
    op.world.lock().unwrap().pods.remove(&pod_name(Slot::A));
    pair.a.kill();
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert!(
        op.takeovers().is_empty(),
        "an engine restart is not a failover"
    );
    assert_eq!(
        (status.epoch, status.primary.as_ref().unwrap().slot),
        (1, Slot::A)
    );
    let ready = condition(&status, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "EngineRestarting")
    );
    assert!(status.engine_restart.is_some(), "{status:?}");
    {
        let w = op.world.lock().unwrap();
        assert!(
            w.reasons().contains(&"EngineRestarting"),
            "{:?}",
            w.reasons()
        );
        assert_eq!(w.created.len(), 1);
        let pod = &w.created[0];
        assert_eq!(pod["metadata"]["name"], pod_name(Slot::A));
        assert_eq!(pod["metadata"]["annotations"]["tandem.dev/role"], "primary");
        assert_eq!(
            pod["metadata"]["labels"]["tandem.dev/disruption-allowed"],
            "false"
        );
    }
    let stalled = writes.lock().unwrap().acked.len();

    // The kubelet starts the recreated pod: same node, same state dir, same flags.
    pair.a.restart().unwrap();
    op.world
        .lock()
        .unwrap()
        .run_pod(Slot::A, "primary", true, 0);
    wait_acked(&writes, stalled + 20, 30).await;
    let mut seen = Vec::new();
    let status = op
        .reconcile_until(
            FailoverPolicy::WaitForPrimary,
            Phase::Synced,
            30,
            &mut seen,
            &pair,
        )
        .await;
    assert_eq!(status.engine_restart, None);
    assert_eq!(
        (status.epoch, status.primary.as_ref().unwrap().slot),
        (1, Slot::A)
    );
    assert_eq!(condition(&status, "Ready").reason, "PrimaryServing");
    assert!(op.takeovers().is_empty(), "no takeover at any point");
    assert!(op
        .world
        .lock()
        .unwrap()
        .reasons()
        .contains(&"EngineRestarted"));

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await.unwrap();
    let image = read_volume(&pair.a).await;
    let writes = writes.lock().unwrap();
    assert!(
        writes.errors.is_empty(),
        "the writer saw errors: {:?}",
        writes.errors
    );
    assert!(writes.reconnects > 0, "the connection did break");
    for (block, byte) in acked_model(&writes) {
        let at = (block * BLOCK) as usize;
        assert!(
            image[at..at + BLOCK as usize].iter().all(|b| *b == byte),
            "block {block}: acknowledged {byte:#x}, read {:#x}",
            image[at]
        );
    }
}

/// The primary's engine does not come back within the grace (its pod stays Pending). The operator takes
/// over, then deletes the workload pod on that node, staged before the takeover and pinned to the old
/// epoch, so it stages again on the new primary; a workload pod on the other node is left alone.
/// The old primary stays down longer than the secondary's lease promise (lease × 1.1 + 0.5 s, 11.5 s with
/// the default --lease-ms): a forced takeover waits that out (LeaseHeld) and is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_engine_not_back_within_the_grace_is_taken_over_and_its_workload_restarted() {
    let _serial = serial().await;
    let (_dir, mut pair) = start_pair();
    let mut model = vec![0u8; SIZE as usize];
    write_blocks(&pair.a, &mut model, 0..8, 0x44);
    wait_synced(&pair).await;
    let op = Operator::new(&pair);
    {
        let mut w = op.world.lock().unwrap();
        w.grace = "1s".into();
        w.run_workload("app-0", "n1", 600);
        w.run_workload("reader-0", "n2", 600);
    }
    let (_, status) = op.reconcile(FailoverPolicy::ForcePromote).await;
    assert_eq!(status.phase, Phase::Synced, "{status:?}");

    op.world.lock().unwrap().pods.remove(&pod_name(Slot::A));
    pair.a.kill();
    let (_, status) = op.reconcile(FailoverPolicy::ForcePromote).await;
    assert!(op.takeovers().is_empty(), "within the grace");
    assert!(status.engine_restart.is_some());
    assert!(
        op.world
            .lock()
            .unwrap()
            .pods
            .contains_key(&pod_name(Slot::A)),
        "recreated"
    );
    // The recreated pod never starts (say its image cannot be pulled): past the grace, the operator takes
    // over with the loss the failover path knows.
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        let (_, status) = op.reconcile(FailoverPolicy::ForcePromote).await;
        if status.epoch == 2 {
            break status;
        }
        assert!(Instant::now() < deadline, "no takeover: {status:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::B);
    let takeover = status.takeover.as_ref().unwrap();
    assert!(
        ["PrimaryPodLost", "PrimaryUnready"].contains(&takeover.reason.as_str()),
        "{takeover:?}"
    );
    assert_eq!(takeover.lost_blocks, 0, "the secondary was in sync");
    assert!(op.takeovers().iter().all(|t| t.0 == Slot::B));
    // Then the workload on the old primary's node is restarted (gracefully: its node is up).
    let (_, status) = op.reconcile(FailoverPolicy::ForcePromote).await;
    {
        let w = op.world.lock().unwrap();
        assert!(
            w.deletions.contains(&("app-0".to_string(), None)),
            "{:?}",
            w.deletions
        );
        assert!(
            w.workloads.contains_key("reader-0"),
            "the other node's pod stays"
        );
        let reasons = w.reasons();
        let taken = reasons
            .iter()
            .position(|r| *r == "TakeoverCompleted")
            .unwrap();
        let restarted = reasons
            .iter()
            .position(|r| *r == "WorkloadRestarted")
            .unwrap();
        assert!(taken < restarted, "{reasons:?}");
        assert!(reasons.contains(&"EngineRestarting"), "{reasons:?}");
    }
    assert_eq!(status.workload_restart, None, "done once the pod is gone");
    assert_eq!(first_difference(&read_volume(&pair.b).await, &model), None);
}

/// `kubectl drain` of the primary's node. The cordon makes the operator hand the primary over to the
/// secondary (WaitForPrimary), with both pods kept by the PodDisruptionBudget; only once the old primary
/// reports secondary and the new primary in sync with nothing pending is its pod labelled evictable. Every
/// acknowledged write reads back on the new primary after the old one is evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordoned_primary_node_switches_over_then_lets_the_drain_evict_the_old_primary() {
    let _serial = serial().await;
    let (_dir, mut pair) = start_pair();
    let mut model = vec![0u8; SIZE as usize];
    write_blocks(&pair.a, &mut model, 0..8, 0x55);
    wait_synced(&pair).await;
    let op = Operator::new(&pair);
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(status.phase, Phase::Synced, "{status:?}");
    {
        let w = op.world.lock().unwrap();
        let budget = w.budget.as_ref().expect("a PodDisruptionBudget");
        assert_eq!(budget["spec"]["maxUnavailable"], 0);
        assert_eq!(
            budget["spec"]["selector"]["matchLabels"],
            json!({"tandem.dev/volume": key(), "tandem.dev/disruption-allowed": "false"})
        );
        assert_eq!(
            w.label(Slot::A).as_deref(),
            Some("false"),
            "the primary stays"
        );
        assert_eq!(
            w.label(Slot::B).as_deref(),
            Some("true"),
            "an in-sync secondary may go"
        );
    }
    // Writes the secondary has not applied yet when the node is cordoned.
    pause(&pair.a, true).await;
    write_blocks(&pair.a, &mut model, 4..12, 0x66);
    pause(&pair.a, false).await;

    op.world.lock().unwrap().node_cordoned[0] = true;
    let mut seen = vec![Phase::Synced];
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
        if seen.last() != Some(&status.phase) {
            seen.push(status.phase);
        }
        if status.epoch == 2 {
            break status;
        }
        assert!(Instant::now() < deadline, "no switchover: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        op.takeovers(),
        vec![(Slot::B, FailoverPolicy::WaitForPrimary, PEER_TIMEOUT)]
    );
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::B);
    assert_eq!(
        status.takeover.as_ref().unwrap().reason,
        "SwitchoverForDrain"
    );
    {
        let w = op.world.lock().unwrap();
        assert!(
            w.reasons().contains(&"SwitchoverForDrain"),
            "{:?}",
            w.reasons()
        );
        assert_eq!(
            w.label(Slot::B).as_deref(),
            Some("false"),
            "the new primary stays"
        );
        assert_eq!(
            w.label(Slot::A).as_deref(),
            Some("false"),
            "not before it is in sync"
        );
        assert!(w.deletions.is_empty(), "nothing is deleted by the operator");
    }
    // Writes on the new primary while the old one drains and reverses.
    write_blocks(&pair.b, &mut model, 20..24, 0x77);

    // The old primary's pod is released only once it is an in-sync secondary.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
        if seen.last() != Some(&status.phase) {
            seen.push(status.phase);
        }
        if op.world.lock().unwrap().label(Slot::A).as_deref() == Some("true") {
            assert_eq!(condition(&status, "NodeDrain").reason, "EvictionAllowed");
            break;
        }
        assert!(Instant::now() < deadline, "never released: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (a, b) = (
        pair.a.status().await.unwrap(),
        pair.b.status().await.unwrap(),
    );
    assert_eq!((role_name(a.role), a.epoch), ("secondary", 2), "{a:?}");
    assert_eq!(
        (b.pair(), b.pending_blocks),
        (PairState::Synced, 0),
        "{b:?}"
    );
    {
        let w = op.world.lock().unwrap();
        assert!(w.reasons().contains(&"SwitchoverDone"), "{:?}", w.reasons());
        // Slot a's label went "true" once, last, after the switchover (the first "false" is the operator
        // labelling the pods it found unlabelled).
        let a_labels: Vec<&str> = w
            .labels
            .iter()
            .filter(|(p, _)| *p == pod_name(Slot::A))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(a_labels, ["false", "true"], "{:?}", w.labels);
    }

    // The drain evicts it. Every acknowledged write is on the new primary.
    op.world.lock().unwrap().pods.remove(&pod_name(Slot::A));
    pair.a.terminate();
    assert_eq!(first_difference(&read_volume(&pair.b).await, &model), None);
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::B);
    assert_eq!(op.takeovers().len(), 1, "one switchover, no failover");
    // The certificate Secrets the engines run on are the ones the operator finds valid: never issued again.
    let w = op.world.lock().unwrap();
    assert_eq!(w.secret_applies, 0, "{:?}", w.secrets.keys());
    assert!(status.certificates.is_some());
}

/// `spec.primaryNode` names the secondary's node while a writer pinned to `data@1` writes on the
/// primary's node. With the secondary behind (its link paused) the default policy postpones the
/// switchover and says why; with `Immediate` the secondary takes over by handoff (never forced), the new
/// primary drains and merges, the old one answers as its secondary, and status.switchover ends Done. The
/// writer's pod on the old node is restarted; every write it got acknowledged reads back on the new
/// primary, with the writes made there since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_node_edit_swaps_roles_under_writes_and_loses_nothing() {
    let _serial = serial().await;
    let Synced {
        _dir,
        pair,
        mut model,
        op,
    } = synced_with_a_workload().await;

    let (writes, stop, writer) = start_writer(&pair.a.nbd);
    wait_acked(&writes, 20, 20).await;
    // The secondary falls behind: WhenInSync postpones the switchover.
    pause(&pair.a, true).await;
    let acked = writes.lock().unwrap().acked.len();
    wait_acked(&writes, acked + 20, 20).await;
    op.world.lock().unwrap().spec_patch = json!({"primaryNode": "n2"});
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    let rec = status.switchover.clone().expect("status.switchover");
    assert_eq!(rec.phase, SwitchoverPhase::WaitingForSync, "{rec:?}");
    assert!(rec.message.contains("pending"), "{}", rec.message);
    assert_eq!(
        (rec.from.as_str(), rec.to.as_str()),
        ("n1", "n2"),
        "{rec:?}"
    );
    assert_eq!(condition(&status, "PrimaryNode").reason, "WaitingForSync");
    assert!(op.takeovers().is_empty(), "postponed, not started");

    // Immediate: a streaming mirror is enough; the handoff drains what is pending, under writes.
    pause(&pair.a, false).await;
    op.world.lock().unwrap().spec_patch =
        json!({"primaryNode": "n2", "switchoverPolicy": "Immediate"});
    let mut phases = vec![rec.phase];
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
        let phase = status.switchover.as_ref().unwrap().phase;
        if phases.last() != Some(&phase) {
            phases.push(phase);
        }
        if phase == SwitchoverPhase::Done {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "no switchover: phases {phases:?}; {status:?}\na log:\n{}\nb log:\n{}",
            pair.a.log_tail(20),
            pair.b.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        op.takeovers(),
        vec![(Slot::B, FailoverPolicy::WaitForPrimary, PEER_TIMEOUT)],
        "one handoff, never forced"
    );
    assert!(
        phases.contains(&SwitchoverPhase::Draining) || phases.contains(&SwitchoverPhase::Merging),
        "{phases:?}"
    );
    let rec = status.switchover.clone().unwrap();
    assert_eq!((rec.epoch, status.epoch), (2, 2), "{rec:?}");
    assert!(rec.completed_at.is_some());
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::B);
    assert_eq!(status.takeover.as_ref().unwrap().reason, "Switchover");
    assert_eq!(condition(&status, "PrimaryNode").status, "True");
    let a = pair.a.status().await.unwrap();
    assert_eq!((role_name(a.role), a.epoch), ("secondary", 2), "{a:?}");

    // The writer's pod on n1 (pinned to epoch 1) was restarted; nothing else was deleted.
    {
        let w = op.world.lock().unwrap();
        assert_eq!(
            w.deletions,
            vec![("app-0".to_string(), None)],
            "{:?}",
            w.reasons()
        );
        for r in [
            "SwitchoverRequested",
            "SwitchoverWaits",
            "SwitchoverCompleted",
            "WorkloadRestarted",
        ] {
            assert!(w.reasons().contains(&r), "{r}: {:?}", w.reasons());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await.unwrap();
    // It restages on the new primary and writes there.
    write_blocks(&pair.b, &mut model, 20..24, 0x77);
    let block = {
        let writes = writes.lock().unwrap();
        assert!(writes.acked.len() > acked + 20);
        for (block, byte) in acked_model(&writes) {
            model[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize].fill(byte);
        }
        // The one write that may have been in flight at the fence was never acknowledged: either value.
        unanswered(&writes).0
    };
    let image = read_volume(&pair.b).await;
    let mut got = image.clone();
    got[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize]
        .copy_from_slice(&model[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize]);
    assert_eq!(first_difference(&got, &model), None);
    // Done stays Done: no second handover.
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(status.switchover.unwrap().phase, SwitchoverPhase::Done);
    assert_eq!(op.takeovers().len(), 1);
}

/// A synced pair (blocks 0..8 written on the primary, n1) under an operator whose first reconcile
/// found it Synced, with a workload pod of the claim on n1.
struct Synced {
    _dir: tempfile::TempDir,
    pair: Pair,
    /// The volume's expected bytes.
    model: Vec<u8>,
    op: Operator,
}

async fn synced_with_a_workload() -> Synced {
    let (_dir, pair) = start_pair();
    let mut model = vec![0u8; SIZE as usize];
    write_blocks(&pair.a, &mut model, 0..8, 0x31);
    wait_synced(&pair).await;
    let op = Operator::new(&pair);
    op.world.lock().unwrap().run_workload("app-0", "n1", 600);
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(status.phase, Phase::Synced, "{status:?}");
    Synced {
        _dir,
        pair,
        model,
        op,
    }
}

/// `kubectl tandem` with `args` against the fake API server: its output, or its error.
async fn plugin(client: &Client, args: &[&str]) -> Result<String, String> {
    let cli =
        kubectl::Cli::try_parse_from(std::iter::once("kubectl-tandem").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let result = kubectl::run(client.clone(), NS, &cli, &mut out).await;
    let out = String::from_utf8(out).map_err(|e| e.to_string())?;
    result.map(|()| out).map_err(|e| format!("{e:#}"))
}

/// The plugin against a real pair: the table and its JSON, a refused switchover, then `switchover
/// --wait` through the operator: the roles swap, the plugin follows to Done, and the new primary
/// serves every byte written before; `failback --wait` brings the primary home.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubectl_plugin_shows_the_pair_and_switches_it_over() {
    let _serial = serial().await;
    let Synced {
        _dir,
        pair,
        model,
        op,
    } = synced_with_a_workload().await;
    let (client, _server) = api_server(op.world.clone());

    let table = plugin(&client, &["status"]).await.unwrap();
    assert_eq!(
        table,
        "NAME   PHASE    PRIMARY   SECONDARY   LAG    PENDING   LAST TAKEOVER\n\
         data   Synced   n1        n2          0.0s   0B        -\n"
    );
    let json: Value =
        serde_json::from_str(&plugin(&client, &["status", "-o", "json"]).await.unwrap()).unwrap();
    assert_eq!(
        json,
        json!([{
            "namespace": NS, "name": VOLUME, "phase": "Synced", "epoch": 1,
            "primary": "n1", "secondary": "n2", "lagSeconds": 0.0, "pendingBytes": 0,
            "pendingBlocks": 0, "lastTakeover": null, "switchover": null,
        }])
    );
    let err = plugin(&client, &["switchover", VOLUME, "--to", "n9"])
        .await
        .unwrap_err();
    assert!(
        err.contains("node n9 holds no engine of this volume"),
        "{err}"
    );

    // The operator runs beside the plugin, as it would in a cluster.
    let switch = |args: &'static [&'static str]| {
        let client = client.clone();
        tokio::spawn(async move { plugin(&client, args).await })
    };
    let until_done = |task: JoinHandle<Result<String, String>>| async {
        while !task.is_finished() {
            op.reconcile(FailoverPolicy::WaitForPrimary).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        task.await.unwrap()
    };
    let out = until_done(switch(&["switchover", VOLUME, "--wait", "--timeout", "20"]))
        .await
        .unwrap();
    assert!(
        out.starts_with("default/data: switchover n1 -> n2 asked (spec.primaryNode=n2)\n"),
        "{out}"
    );
    assert!(
        out.ends_with("default/data: the primary is on n2 at epoch 2\n"),
        "{out}"
    );
    let b = pair.b.status().await.unwrap();
    assert_eq!((role_name(b.role), b.epoch), ("primary", 2), "{b:?}");
    assert_eq!(first_difference(&read_volume(&pair.b).await, &model), None);
    let json: Value =
        serde_json::from_str(&plugin(&client, &["status", "-o", "json"]).await.unwrap()).unwrap();
    assert_eq!(
        (&json[0]["primary"], &json[0]["epoch"]),
        (&json!("n2"), &json!(2))
    );
    assert_eq!(json[0]["lastTakeover"]["reason"], "Switchover");
    let described = plugin(&client, &["describe", VOLUME]).await.unwrap();
    for line in [
        "Switchover:   Done n1 -> n2 at epoch 2",
        "SwitchoverCompleted",
        "  b      n2     Primary",
    ] {
        assert!(described.contains(line), "{line}:\n{described}");
    }

    // Home is n1: the failback is a switchover back to it.
    let out = until_done(switch(&["failback", VOLUME, "--wait", "--timeout", "20"]))
        .await
        .unwrap();
    assert!(
        out.ends_with("default/data: the primary is on n1 at epoch 3\n"),
        "{out}"
    );
    let a = pair.a.status().await.unwrap();
    assert_eq!((role_name(a.role), a.epoch), ("primary", 3), "{a:?}");
    assert_eq!(first_difference(&read_volume(&pair.a).await, &model), None);
}

/// The operator is down while the primary's node is lost: a new operator (a fresh Context, as after a
/// restart) catches up, but forces only a full witness wait after its own start, since the old one may
/// have granted a lease just before it went down. Then it promotes and grants the new primary a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_down_during_a_node_loss_waits_a_lease_from_its_start() {
    let _serial = serial().await;
    let (_dir, mut pair) = start_pair();
    let mut model = vec![0u8; SIZE as usize];
    write_blocks(&pair.a, &mut model, 0..8, 0x11);
    wait_synced(&pair).await;
    let first = Operator::new(&pair);
    let (_, status) = first.reconcile(FailoverPolicy::ForcePromote).await;
    assert_eq!(status.phase, Phase::Synced, "{status:?}");
    let stored = first.world.lock().unwrap().status.clone();
    drop(first);

    // While no operator runs: the primary's node dies (its engine with it), long enough for any lease.
    pair.a.kill();
    tokio::time::sleep(WITNESS_WAIT + Duration::from_millis(500)).await;

    let op = Operator::new(&pair);
    {
        let mut w = op.world.lock().unwrap();
        w.status = stored;
        w.node_ready[0] = false;
    }
    let (_, status) = op.reconcile(FailoverPolicy::ForcePromote).await;
    assert!(
        op.engines.forced_at.lock().unwrap().is_empty(),
        "forced at once after a restart"
    );
    assert_eq!(status.epoch, 1);
    let wait = status
        .promotion_wait
        .as_ref()
        .expect("the status says why it waits");
    assert_eq!(wait.reason, "LeaseHeld", "{wait:?}");
    assert_eq!(condition(&status, "TakeoverInProgress").reason, "LeaseHeld");

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let (_, status) = op.reconcile(FailoverPolicy::ForcePromote).await;
        if status.epoch == 2 {
            break status;
        }
        assert!(Instant::now() < deadline, "never promoted: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let forced_at = op.engines.forced_at.lock().unwrap().clone();
    assert_eq!(forced_at.len(), 1);
    assert!(
        forced_at[0] >= op.started + WITNESS_WAIT,
        "forced {:?} after the operator started, before its wait",
        forced_at[0] - op.started
    );
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::B);
    assert_eq!(
        status.takeover.as_ref().unwrap().fence.as_deref(),
        Some("LeaseExpired")
    );
    assert!(status.promotion_wait.is_none());
    assert_eq!(status.lease.as_ref().map(|l| l.node.as_str()), Some("n2"));
    // Every byte the old primary had replicated is served by the new one.
    assert_eq!(first_difference(&read_volume(&pair.b).await, &model), None);
}

// ---------------------------------------------------------------------------------------------------------
// Forced promotions by policy, and the lease that makes them safe.

/// Waits until the writer has `n` acknowledgements.
async fn wait_acked(writes: &Arc<Mutex<Writes>>, n: usize, secs: u64) {
    eventually("the writer's acknowledgements", secs, || async {
        let w = writes.lock().unwrap();
        if w.acked.len() >= n {
            Ok(())
        } else {
            Err(format!(
                "{} acked, {} errors",
                w.acked.len(),
                w.errors.len()
            ))
        }
    })
    .await;
}

/// The write the writer had sent and never got an answer to (its connection died with the engine):
/// the engine may or may not have applied it.
fn unanswered(writes: &Writes) -> (u64, u8) {
    let i = (writes.acked.len() + writes.errors.len()) as u64;
    (200 + i % 64, (i % 251) as u8 + 1)
}

/// Reconciles until the status has `epoch`, failing after `secs`.
async fn reconcile_to_epoch(
    op: &Operator,
    policy: FailoverPolicy,
    epoch: u64,
    secs: u64,
) -> MirroredVolumeStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (_, status) = op.reconcile(policy).await;
        if status.epoch == epoch {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "no epoch {epoch} within {secs}s: {status:?}\ntakeovers {:?}",
            op.takeovers()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A Sync pair loses its primary's node with a writer on it. An in-sync Sync secondary holds every
/// acknowledged write, so the operator promotes it by force whatever the async policy (here
/// WaitForPrimary, which never forces an async pair), but only once its own guard since its start and
/// the secondary's promise to the old primary are over; then it grants the new primary a lease, and
/// every write the writer got acknowledged reads back on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_node_loss_promotes_the_in_sync_secondary_after_the_lease_with_nothing_lost() {
    let _serial = serial().await;
    let (_dir, mut pair) = start_pair_with(&["--replication", "sync"], |b| b.linked());
    wait_synced(&pair).await;
    let op = Operator::new(&pair);
    op.world.lock().unwrap().spec_patch = json!({"replication": {"mode": "Sync"}});
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(
        (status.phase, status.epoch),
        (Phase::Synced, 1),
        "{status:?}"
    );

    let (writes, stop, writer) = start_writer(&pair.a.nbd);
    wait_acked(&writes, 20, 20).await;

    // Node n1 is lost with its engine.
    op.world.lock().unwrap().node_ready[0] = false;
    pair.a.kill();
    let status = reconcile_to_epoch(&op, FailoverPolicy::WaitForPrimary, 2, 30).await;

    let takeovers = op.takeovers();
    let (last, handoffs) = takeovers.split_last().unwrap();
    assert_eq!(
        *last,
        (Slot::B, FailoverPolicy::ForcePromote, PEER_TIMEOUT),
        "{takeovers:?}"
    );
    assert!(
        handoffs
            .iter()
            .all(|t| t.1 == FailoverPolicy::WaitForPrimary),
        "only handoffs were tried before: {takeovers:?}"
    );
    let forced_at = op.engines.forced_at.lock().unwrap().clone();
    assert!(
        forced_at[0] >= op.started + WITNESS_WAIT,
        "forced {:?} after the operator started, before its guard",
        forced_at[0] - op.started
    );
    let (promise, _) = op.engines.forced_seen.lock().unwrap()[0];
    assert_eq!(promise, 0, "forced while the secondary's promise ran");
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::B);
    assert!(status.promotion_wait.is_none(), "{status:?}");
    let takeover = status.takeover.as_ref().unwrap();
    assert_eq!(takeover.reason, "PrimaryNodeLost");
    assert_eq!(takeover.fence.as_deref(), Some("LeaseExpired"));
    assert_eq!(takeover.lost_blocks, 0, "Sync in sync loses nothing");
    assert_eq!(status.lease.as_ref().map(|l| l.node.as_str()), Some("n2"));
    assert_eq!(
        op.engines.grants.lock().unwrap().last(),
        Some(&(Slot::B, false))
    );
    let b = pair.b.status().await.unwrap();
    assert_eq!(
        (role_name(b.role), b.epoch, b.lost_blocks),
        ("primary", 2, 0),
        "{b:?}"
    );
    assert!(b.lease_remaining_ms > 0, "{b:?}");

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await.unwrap();
    let image = read_volume(&pair.b).await;
    let writes = writes.lock().unwrap();
    assert!(writes.errors.is_empty(), "{:?}", writes.errors);
    let (open_block, open_byte) = unanswered(&writes);
    for (block, byte) in acked_model(&writes) {
        let at = (block * BLOCK) as usize;
        let got = &image[at..at + BLOCK as usize];
        // The one write in flight when the engine died may have reached the secondary.
        let ok = got.iter().all(|b| *b == byte)
            || (block == open_block && got.iter().all(|b| *b == open_byte));
        assert!(
            ok,
            "block {block}: acknowledged {byte:#x}, the new primary reads {:#x}",
            got[0]
        );
    }
    eprintln!(
        "MEASURED sync node loss: {} writes acknowledged, forced {:?} after the operator started, {} handoff tries",
        writes.acked.len(),
        forced_at[0] - op.started,
        handoffs.len()
    );
}

/// An async pair under policy MaxLoss loses its primary's node with a backlog (24 blocks, 96 KiB) the
/// secondary knows from the last heartbeat. With maxLossBytes 16Ki the operator does not force: the status
/// says MaxLossExceeded with both numbers, however long it waits. With a bound above the backlog it
/// forces (after the lease) and reports the loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_loss_forces_only_within_its_bound() {
    let _serial = serial().await;
    let (_dir, mut pair) = start_pair();
    let mut model = vec![0u8; SIZE as usize];
    write_blocks(&pair.a, &mut model, 0..8, 0x11);
    wait_synced(&pair).await;
    let op = Operator::new(&pair);
    op.world.lock().unwrap().spec_patch = json!({"failover": {"maxLossBytes": "16Ki"}});
    let (_, status) = op.reconcile(FailoverPolicy::MaxLoss).await;
    assert_eq!(status.phase, Phase::Synced, "{status:?}");

    // One record per block on a one-block-per-second link whose acknowledgements the primary holds: its
    // heartbeats name all 24 blocks as not replicated; the secondary has at most the first few.
    pair.a
        .fault(pb::FaultRequest {
            rate_bytes_per_sec: Some(4096),
            hold_acks: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    write_each_block(&pair.a, &mut model, 300..324, 0x5a);
    eventually("the secondary to know the backlog", 20, || async {
        let b = pair.b.status().await.unwrap();
        if b.peer_backlog_blocks == 24 {
            Ok(())
        } else {
            Err(format!("{b:?}"))
        }
    })
    .await;
    op.world.lock().unwrap().node_ready[0] = false;
    pair.a.kill();

    // Past every wait (the operator's guard, the secondary's promise): still no force.
    let until = Instant::now().max(op.started + WITNESS_WAIT) + Duration::from_secs(2);
    let mut passes = 0;
    while Instant::now() < until || passes < 2 {
        let (_, status) = op.reconcile(FailoverPolicy::MaxLoss).await;
        passes += 1;
        assert_eq!(
            (status.epoch, status.primary.as_ref().unwrap().slot),
            (1, Slot::A),
            "{status:?}"
        );
        let wait = status.promotion_wait.as_ref().expect("why it waits");
        assert_eq!(wait.reason, "MaxLossExceeded", "{wait:?}");
        assert!(
            wait.message.contains("98304") && wait.message.contains("16384"),
            "{}",
            wait.message
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        op.takeovers()
            .iter()
            .all(|t| t.1 == FailoverPolicy::WaitForPrimary),
        "{:?}",
        op.takeovers()
    );
    assert!(op.engines.forced_at.lock().unwrap().is_empty());
    let b = pair.b.status().await.unwrap();
    assert_eq!((role_name(b.role), b.epoch), ("secondary", 1), "{b:?}");

    // The bound raised above the backlog: forced, and the loss is reported.
    op.world.lock().unwrap().spec_patch = json!({"failover": {"maxLossBytes": "128Ki"}});
    let status = reconcile_to_epoch(&op, FailoverPolicy::MaxLoss, 2, 20).await;
    assert_eq!(
        op.takeovers().last(),
        Some(&(Slot::B, FailoverPolicy::ForcePromote, PEER_TIMEOUT))
    );
    assert_eq!(
        op.engines.forced_seen.lock().unwrap().clone(),
        vec![(0, 24)],
        "(promise left, backlog) when forced"
    );
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::B);
    assert!(status.promotion_wait.is_none(), "{status:?}");
    let takeover = status.takeover.as_ref().unwrap();
    assert_eq!(takeover.fence.as_deref(), Some("LeaseExpired"));
    assert!((1..=24).contains(&takeover.lost_blocks), "{takeover:?}");
    let b = pair.b.status().await.unwrap();
    assert_eq!(
        (role_name(b.role), b.epoch, b.lost_blocks),
        ("primary", 2, takeover.lost_blocks),
        "{b:?}"
    );
    assert_eq!(status.lease.as_ref().map(|l| l.node.as_str()), Some("n2"));
    // What the new primary serves: everything but the lost blocks, each counted.
    let image = read_volume(&pair.b).await;
    let differ: Vec<usize> = image
        .chunks(BLOCK as usize)
        .zip(model.chunks(BLOCK as usize))
        .enumerate()
        .filter(|(_, (got, want))| got != want)
        .map(|(block, _)| block)
        .collect();
    assert!(
        !differ.is_empty() && differ.len() as u64 <= takeover.lost_blocks,
        "{} counted lost, blocks {differ:?} differ",
        takeover.lost_blocks
    );
    assert!(differ.iter().all(|b| (300..324).contains(b)), "{differ:?}");
    eprintln!(
        "MEASURED max loss: refused to force with a 98304-byte backlog over a 16384-byte bound; forced \
         within 131072: {} blocks counted lost, {} differ",
        takeover.lost_blocks,
        differ.len()
    );
}

/// The primary is partitioned from its secondary and from the operator, alive, with a writer on it that
/// still reaches it. It acknowledges nothing later than the cut + its lease (its last renewal was sent
/// before the cut), then refuses writes (EIO); the operator forces the secondary only once that lease
/// has provably run out, and every write acknowledged before the promotion either reads back on the new
/// primary or is counted in its lost_blocks once the old primary returns and compares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_primary_stops_acknowledging_before_the_operator_promotes() {
    let _serial = serial().await;
    let (_dir, mut pair, to_a, to_b) = start_relayed_pair();
    wait_synced(&pair).await;
    let op = Operator::new(&pair);
    let (_, status) = op.reconcile(FailoverPolicy::ForcePromote).await;
    assert_eq!(
        (status.phase, status.epoch),
        (Phase::Synced, 1),
        "{status:?}"
    );

    let (writes, stop, writer) = start_writer(&pair.a.nbd);
    wait_acked(&writes, 20, 20).await;

    // The cut: the engines no longer reach each other, the operator no longer reaches the primary, and
    // its node stops reporting. The writer, on the primary's node, still reaches it.
    let a_address = {
        let mv = volume_object(FailoverPolicy::ForcePromote, None);
        plan::engine_address(&mv, Slot::A, &EngineConfig::default())
    };
    to_a.set_up(false);
    to_b.set_up(false);
    op.engines.routes.lock().unwrap().remove(&a_address);
    let cut = Instant::now();
    op.world.lock().unwrap().node_ready[0] = false;

    let status = reconcile_to_epoch(&op, FailoverPolicy::ForcePromote, 2, 30).await;
    let forced_at = op.engines.forced_at.lock().unwrap().clone();
    assert_eq!(forced_at.len(), 1);
    eventually("the writer to see its writes refused", 10, || async {
        let w = writes.lock().unwrap();
        if w.errors.is_empty() {
            Err(format!("{} acked", w.acked.len()))
        } else {
            Ok(())
        }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await.unwrap();

    let lease = Duration::from_millis(LEASE_MS.into());
    let (last_ack, acked_after_cut, first_error) = {
        let w = writes.lock().unwrap();
        (
            *w.acked_at.last().unwrap(),
            w.acked_at.iter().filter(|t| **t > cut).count(),
            w.errors_at[0],
        )
    };
    assert!(
        last_ack <= cut + lease + Duration::from_millis(250),
        "a write was acknowledged {:?} after the cut, past the {LEASE_MS} ms lease",
        last_ack - cut
    );
    assert!(
        acked_after_cut > 0,
        "the lease held at the cut let writes through"
    );
    assert!(first_error > cut && first_error > last_ack);
    assert!(
        writes
            .lock()
            .unwrap()
            .errors
            .iter()
            .all(|e| e.contains("errno")),
        "{:?}",
        writes.lock().unwrap().errors
    );
    // The secondary's promise ends a guard after its last answer, which came after the stamp of the
    // primary's last lease: at least guard − lease (600 ms) after the last acknowledgement left the
    // engine (less 100 ms for its way to the writer).
    assert!(
        forced_at[0] + Duration::from_millis(100) >= last_ack + (WITNESS_WAIT - lease),
        "forced {:?} after the last acknowledgement",
        forced_at[0].saturating_duration_since(last_ack)
    );
    assert!(forced_at[0] >= op.started + WITNESS_WAIT);
    assert_eq!(op.engines.forced_seen.lock().unwrap()[0].0, 0);
    assert_eq!(status.primary.as_ref().unwrap().slot, Slot::B);
    assert_eq!(
        status.takeover.as_ref().unwrap().fence.as_deref(),
        Some("LeaseExpired")
    );
    assert_eq!(status.lease.as_ref().map(|l| l.node.as_str()), Some("n2"));

    // The partition heals; the kubelet on n1 replaces the force-deleted pod's engine with the pod the
    // operator recreated (same state dir). The old primary steps down and compares what it alone had.
    to_a.set_up(true);
    to_b.set_up(true);
    op.engines
        .routes
        .lock()
        .unwrap()
        .insert(a_address, pair.a.grpc.clone());
    op.world.lock().unwrap().node_ready[0] = true;
    let (_, _) = op.reconcile(FailoverPolicy::ForcePromote).await;
    pair.a.restart_with(|c| c.role("secondary")).unwrap();
    op.world
        .lock()
        .unwrap()
        .run_pod(Slot::A, "secondary", true, 0);
    let mut phases = Vec::new();
    op.reconcile_until(
        FailoverPolicy::ForcePromote,
        Phase::Synced,
        40,
        &mut phases,
        &pair,
    )
    .await;
    let b = pair.b.status().await.unwrap();
    assert_eq!((role_name(b.role), b.epoch), ("primary", 2), "{b:?}");
    let image = read_volume(&pair.b).await;
    let writes = writes.lock().unwrap();
    let missing: Vec<u64> = acked_model(&writes)
        .into_iter()
        .filter(|(block, byte)| {
            let at = (block * BLOCK) as usize;
            image[at..at + BLOCK as usize].iter().any(|b| b != byte)
        })
        .map(|(block, _)| block)
        .collect();
    assert!(
        missing.len() as u64 <= b.lost_blocks,
        "acknowledged writes of {} blocks are missing on the new primary ({missing:?}), {} counted lost\n{b:?}",
        missing.len(),
        b.lost_blocks
    );
    eprintln!(
        "MEASURED partition via the operator: last acknowledgement {:?} after the cut (lease {LEASE_MS} ms), \
         {acked_after_cut} acknowledged after the cut, forced {:?} after the cut; {} blocks missing, {} counted lost",
        last_ack - cut,
        forced_at[0] - cut,
        missing.len(),
        b.lost_blocks
    );
}

/// Online expansion on real engines: a synced pair serving 16Mi with data on it, and `spec.size` asks
/// for twice that. The operator's reconcile calls Engine.Resize on the primary (which grows its
/// secondary first): both engines serve the new size, `status.capacityBytes` says so, the
/// PersistentVolume's capacity follows on the next pass and Expanding ends as Expanded. The data
/// written before reads back unchanged, and a write past the old end (through a new NBD session, which
/// negotiates the new size) reaches the secondary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_spec_size_resizes_both_engines_and_the_new_area_replicates() {
    const GROWN: u64 = 2 * SIZE;
    let _serial = serial().await;
    // The engines start at --size 16Mi: they can only grow through the operator's Resize.
    let (_dir, pair) = start_pair();
    let mut model = vec![0u8; SIZE as usize];
    let old_end = SIZE / BLOCK;
    write_blocks(&pair.a, &mut model, 0..8, 0x11);
    write_blocks(&pair.a, &mut model, old_end - 4..old_end, 0x22);
    wait_synced(&pair).await;
    let op = Operator::new(&pair);
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(status.phase, Phase::Synced, "{status:?}");
    assert_eq!(status.capacity_bytes, SIZE, "{status:?}");

    op.world.lock().unwrap().spec_patch = json!({"size": "32Mi"});
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(status.capacity_bytes, GROWN, "{status:?}");
    let c = condition(&status, "Expanding");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Resized"),
        "{c:?}"
    );
    for (name, e) in [("a", &pair.a), ("b", &pair.b)] {
        let s = e
            .status()
            .await
            .unwrap_or_else(|err| panic!("{name}: {err:#}"));
        assert_eq!(s.size, GROWN, "engine {name} serves the new size: {s:?}");
    }
    assert!(op.world.lock().unwrap().reasons().contains(&"Resized"));

    // The next pass: the PersistentVolume shows what both engines serve now; the expansion is over.
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(status.phase, Phase::Synced, "{status:?}");
    assert_eq!(status.capacity_bytes, GROWN, "{status:?}");
    let c = condition(&status, "Expanding");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Expanded"),
        "{c:?}"
    );
    assert_eq!(
        op.world.lock().unwrap().pv_capacity.as_deref(),
        Some("32Mi")
    );

    // Writes past the old end, each through a new session (qemu-io connects anew).
    model.resize(GROWN as usize, 0);
    write_blocks(&pair.a, &mut model, old_end..old_end + 8, 0x33);
    write_blocks(&pair.a, &mut model, GROWN / BLOCK - 2..GROWN / BLOCK, 0x44);
    wait_synced(&pair).await;
    // The primary as a host reads it (a new session); the secondary (which refuses NBD) by its data
    // file, grown to the new size.
    let images = [
        ("a over NBD", read_image(&pair.a, GROWN).await),
        ("b's data file", std::fs::read(pair.b.data()).unwrap()),
    ];
    for (name, image) in images {
        assert_eq!(image.len() as u64, GROWN, "{name}");
        assert!(
            image == model,
            "{name} differs from what was written, first at block {:?}",
            first_difference(&image, &model)
        );
    }
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(
        (status.phase, status.capacity_bytes),
        (Phase::Synced, GROWN),
        "{status:?}"
    );
}

/// The kubelet's part in a live move, once per pass: runs the wipe pods (the new node's: nothing there
/// yet; the old node's: `tandem-engine wipe` on the old engine's files, as the pod's args ask), starts
/// the new engine when its pod is created (a secondary on an empty dir, peer = the primary, slot b's
/// TLS identity) and routes its Service, and kills the old engine once its pod is deleted.
fn run_move_pods(op: &Operator, pair: &mut Pair, new_engine: &mut Option<Engine>, dir: &Path) {
    let key = key();
    let new_pod = plan::names::engine_instance(&key, Slot::B, 1);
    let (wipes, start_new, old_gone) = {
        let w = op.world.lock().unwrap();
        let wipes: Vec<String> = w
            .pods
            .iter()
            .filter(|(n, p)| n.contains("-wipe-") && p["status"]["phase"] == "Pending")
            .map(|(n, _)| n.clone())
            .collect();
        let start_new = new_engine.is_none() && w.pods.contains_key(&new_pod);
        (wipes, start_new, !w.pods.contains_key(&pod_name(Slot::B)))
    };
    if old_gone && pair.b.alive() {
        pair.b.kill();
    }
    for name in &wipes {
        if name.ends_with("-old") {
            let run_dir = dir.join("run-b");
            std::fs::create_dir_all(&run_dir).unwrap();
            let out = pair
                .b
                .command()
                .arg("wipe")
                .arg("--state-dir")
                .arg(pair.b.state_dir())
                .arg("--data")
                .arg(pair.b.data())
                .arg("--run-dir")
                .arg(&run_dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut w = op.world.lock().unwrap();
        if let Some(p) = w.pods.get_mut(name) {
            p["status"] = json!({"phase": "Succeeded"});
        }
    }
    if start_new {
        let tls = engine_tls_dir(&dir.join("tls-c"), Slot::B);
        let e = tandem_testkit::EngineBuilder::new(dir.join("c"))
            .volume(VOLUME)
            .size(&SIZE.to_string())
            .token(&format!("{TOKEN}\n"))
            .role("secondary")
            .peer(&pair.a.grpc)
            .tls_dir(&tls)
            .node_name("n3")
            .args([
                "--lease-ms",
                &LEASE_MS.to_string(),
                "--lease-wait-ms",
                "1000",
            ])
            .start()
            .unwrap_or_else(|e| panic!("{e:#}"));
        let mv = volume_object(FailoverPolicy::WaitForPrimary, None);
        op.engines.routes.lock().unwrap().insert(
            plan::engine_address_at(&mv, Slot::B, 1, &EngineConfig::default()),
            e.grpc.clone(),
        );
        let mut w = op.world.lock().unwrap();
        if let Some(p) = w.pods.get_mut(&new_pod) {
            p["metadata"]["creationTimestamp"] = json!(ago(1));
            p["spec"]["nodeName"] = json!("n3");
            p["status"] = json!({
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": ago(1)}],
            });
        }
        *new_engine = Some(e);
    }
}

/// `spec.placement.nodes` replaces the secondary's node n2 by n3 while a writer pinned to `data@1`
/// writes through the primary. The operator empties n3 (a wipe pod), starts engine `b-m1` there with
/// its own Service, asks the primary to move its secondary to that Service's address and copies GetMove
/// into status.move; at the cutover slot b becomes the new instance, the old pod and Service go and a
/// wipe pod empties n2. Every acknowledged write reads back from the primary, the new engine's copy is
/// byte-identical to it, the old engine's files are gone, and the primary keeps the new secondary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_edit_moves_the_secondary_under_writes_and_loses_nothing() {
    let _serial = serial().await;
    let (dir, mut pair) = start_pair();
    let mut model = vec![0u8; SIZE as usize];
    write_blocks(&pair.a, &mut model, 0..1024, 0x42);
    wait_synced(&pair).await;
    let op = Operator::new(&pair);
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(status.phase, Phase::Synced, "{status:?}");
    let (writes, stop, writer) = start_writer(&pair.a.nbd);
    wait_acked(&writes, 20, 20).await;

    {
        let mut w = op.world.lock().unwrap();
        w.extra_nodes.push("n3".into());
        w.spec_patch = json!({"placement": {"nodes": ["n1", "n3"]}});
    }
    let mut new_engine = None;
    let mut phases: Vec<MovePhase> = Vec::new();
    let mut copying_seen = 0;
    let mut acked_copying = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
        let rec = status.moving.clone().expect("status.move");
        if phases.last() != Some(&rec.phase) {
            phases.push(rec.phase);
        }
        if rec.phase == MovePhase::Copying {
            copying_seen += 1;
            acked_copying.get_or_insert(writes.lock().unwrap().acked.len());
            assert_eq!(rec.total_bytes, SIZE, "{rec:?}");
        }
        if rec.phase == MovePhase::Done {
            break status;
        }
        assert!(
            !matches!(rec.phase, MovePhase::Failed | MovePhase::Refused)
                && Instant::now() < deadline,
            "no move: phases {phases:?}; {rec:?}\na log:\n{}",
            pair.a.log_tail(20)
        );
        run_move_pods(&op, &mut pair, &mut new_engine, dir.path());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for p in [
        MovePhase::Preparing,
        MovePhase::Starting,
        MovePhase::Copying,
        MovePhase::Finishing,
    ] {
        assert!(phases.contains(&p), "{p:?} in {phases:?}");
    }
    assert!(copying_seen >= 1);
    let acked_done = writes.lock().unwrap().acked.len();
    assert!(
        acked_copying.is_some_and(|n| n < acked_done),
        "writes went on while the copy ran: {acked_copying:?} then {acked_done}"
    );
    assert_eq!(status.nodes, ["n1", "n3"]);
    assert_eq!(status.slot_generations, [0, 1]);
    assert_eq!(condition(&status, "Moving").reason, "Done");
    // The volume's node label (which its PV selects) moved with the engine: workloads can be
    // scheduled to n3 now, and no longer to n2.
    {
        let (label, value) = plan::node_label(&volume_object(FailoverPolicy::WaitForPrimary, None));
        let w = op.world.lock().unwrap();
        let has = |n: &str| w.node_labels.get(n).and_then(|l| l.get(&label)) == Some(&json!(value));
        assert_eq!(
            (has("n1"), has("n2"), has("n3")),
            (true, false, true),
            "{:?}",
            w.node_labels
        );
    }
    let new = new_engine.expect("the new engine ran");
    let new_service = plan::names::engine_instance(&key(), Slot::B, 1);
    {
        let w = op.world.lock().unwrap();
        let deleted: Vec<&str> = w.deletions.iter().map(|d| d.0.as_str()).collect();
        assert!(deleted.contains(&pod_name(Slot::B).as_str()), "{deleted:?}");
        assert!(!deleted.contains(&new_service.as_str()), "{deleted:?}");
        assert_eq!(w.deleted_services, [pod_name(Slot::B)]);
        for r in [
            "MoveRequested",
            "MoveStarted",
            "MoveCutOver",
            "MoveCompleted",
        ] {
            assert!(w.reasons().contains(&r), "{r}: {:?}", w.reasons());
        }
    }
    assert!(!pair.b.alive());
    assert!(
        !pair.b.state_dir().exists() && !pair.b.data().exists(),
        "the old node's files are wiped"
    );
    // The writer kept writing through the move; then the primary streams to the new secondary.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await.unwrap();
    {
        let w = writes.lock().unwrap();
        assert!(w.errors.is_empty(), "{:?}", w.errors);
        assert!(w.acked.len() > 20);
        for (block, byte) in acked_model(&w) {
            model[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize].fill(byte);
        }
    }
    eventually("the primary in sync with the new secondary", 20, || async {
        let a = pair.a.status().await.map_err(|e| format!("{e:#}"))?;
        if a.pair() == PairState::Synced && a.pending_blocks == 0 && a.peer_connected {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    })
    .await;
    let image = read_volume(&pair.a).await;
    assert_eq!(
        first_difference(&image, &model),
        None,
        "acknowledged writes"
    );
    let copy = std::fs::read(new.data()).unwrap();
    assert_eq!(
        first_difference(&copy, &image),
        None,
        "the new engine's copy"
    );

    // The primary keeps the new secondary after a restart, whatever its --peer says (slot b's old
    // Service): the address it stored is the new instance's, which the operator keeps serving.
    pair.a.restart().unwrap();
    let a = pair.a.status().await.unwrap();
    assert!(
        a.peer.contains(&new.grpc) || a.peer.contains(&new_service),
        "peer after restart: {}",
        a.peer
    );
    let (_, status) = op.reconcile(FailoverPolicy::WaitForPrimary).await;
    assert_eq!(status.moving.unwrap().phase, MovePhase::Done);
}
