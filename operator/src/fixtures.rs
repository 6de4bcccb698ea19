//! Test fixtures: fluent builders for MirroredVolumes and the objects around them, and a mocked API server
//! (`tower_test`) that checks every request of a scripted conversation and answers like the apiserver.

use std::{sync::Arc, time::Duration};

use http::{Method, Request, Response};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::{client::Body, Client, Resource, ResourceExt};
use serde_json::{json, Value};
use tandem_api::pb::{PairState, TakeoverPhase};
use tokio::task::JoinHandle;

use crate::{
    controller::Context,
    crd::{
        ClaimSpec, EngineRole, EngineStatusRef, EngineStorage, MirroredVolume, MirroredVolumeSpec,
        MirroredVolumeStatus, Placement, Slot, VOLUME_FINALIZER,
    },
    engine::{fake::FakeEngines, EngineState},
    metrics::Metrics,
    plan::{self, names, EngineConfig},
};

pub const NS: &str = "default";
pub const NAME: &str = "data";
/// The operator's namespace (`EngineConfig::default()`), where the engine objects live.
pub const OP_NS: &str = "tandem-system";

/// `default/data`'s key: its objects' names in the operator's namespace.
pub fn key() -> String {
    names::key(NS, NAME)
}

/// One CA for every test context (generating one per test would only cost time).
pub fn test_ca() -> &'static tandem_api::tls::Ca {
    static CA: std::sync::OnceLock<tandem_api::tls::Ca> = std::sync::OnceLock::new();
    CA.get_or_init(|| {
        tandem_api::tls::Ca::generate("test CA", Duration::from_secs(10 * 365 * 24 * 3600))
            .expect("a CA")
    })
}

/// Owner labels of `default/data`'s objects.
pub fn owner_labels() -> Value {
    serde_json::to_value(plan::labels(&MirroredVolume::test())).unwrap()
}

impl MirroredVolume {
    /// `default/data`: 1Gi on nodes n1 and n2, hostPath storage, no finalizer yet.
    pub fn test() -> Self {
        let mut mv = MirroredVolume::new(
            NAME,
            MirroredVolumeSpec {
                size: "1Gi".into(),
                placement: Placement {
                    nodes: Some(vec!["n1".into(), "n2".into()]),
                    ..Default::default()
                },
                engine_storage: EngineStorage {
                    host_path: Some("/var/lib/tandem".into()),
                    storage_class_name: None,
                },
                ..Default::default()
            },
        );
        mv.meta_mut().namespace = Some(NS.into());
        mv.meta_mut().uid = Some("0c6a0d1e-0000-4000-8000-000000000001".into());
        mv.meta_mut().generation = Some(1);
        mv
    }

    pub fn finalized(mut self) -> Self {
        self.finalizers_mut().push(VOLUME_FINALIZER.into());
        self
    }

    pub fn deleting(mut self) -> Self {
        self.meta_mut().deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        self
    }

    pub fn with_claim(mut self, claim: &str) -> Self {
        self.spec.claim = Some(ClaimSpec { name: claim.into() });
        self
    }

    pub fn with_status(mut self, status: MirroredVolumeStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Status of an established pair with `primary` serving at `epoch`.
    pub fn established(self, primary: Slot, epoch: u64) -> Self {
        let node = |s: Slot| if s == Slot::A { "n1" } else { "n2" };
        let r = |s: Slot, role| EngineStatusRef {
            slot: s,
            node: node(s).into(),
            pod: names::engine(&key(), s),
            role,
            address: address(s),
            reachable: true,
            reported: None,
        };
        self.with_status(MirroredVolumeStatus {
            epoch,
            nodes: vec!["n1".into(), "n2".into()],
            primary: Some(r(primary, EngineRole::Primary)),
            secondary: Some(r(primary.other(), EngineRole::Secondary)),
            ..Default::default()
        })
    }
}

/// Engine gRPC address of a slot of `default/data`.
pub fn address(slot: Slot) -> String {
    plan::engine_address(&MirroredVolume::test(), slot, &EngineConfig::default())
}

pub fn engine_state(role: EngineRole, epoch: u64, pair_state: PairState) -> EngineState {
    EngineState {
        role: Some(role),
        epoch,
        pair_state,
        peer_connected: role == EngineRole::Primary && pair_state != PairState::Unspecified,
        takeover_phase: TakeoverPhase::None,
        block_size: 4096,
        lease_ms: 10_000,
        // A connected primary's peer renews its lease; an engine without a peer holds none.
        lease_remaining_ms: if role == EngineRole::Primary && pair_state != PairState::Unspecified {
            10_000
        } else {
            0
        },
        ..Default::default()
    }
}

pub fn ago(secs: i64) -> Timestamp {
    Timestamp::now()
        .checked_sub(SignedDuration::from_secs(secs))
        .unwrap()
}

/// A Node object that holds an engine of `default/data` (it carries the volume's node label).
pub fn node_json(name: &str, ready: bool) -> Value {
    let mut node = bare_node_json(name, ready);
    let (label, value) = plan::node_label(&MirroredVolume::test());
    node["metadata"]["labels"][label] = json!(value);
    node
}

/// A Node object without the volume's node label.
pub fn bare_node_json(name: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "Unknown" }}]}
    })
}

/// The merge patch that sets (`true`) or removes `default/data`'s node label on `node`.
pub fn node_label_call(node: &str, set: bool) -> Call {
    let node = node.to_string();
    Call::patch(&format!("/api/v1/nodes/{node}?")).check_reply(move |body| {
        let (label, value) = plan::node_label(&MirroredVolume::test());
        let want = if set { json!(value) } else { Value::Null };
        assert_eq!(body, &json!({"metadata": {"labels": {label: want}}}));
        if set {
            node_json(&node, true)
        } else {
            bare_node_json(&node, true)
        }
    })
}

/// An engine pod of `default/data` as the apiserver returns it (in the operator's namespace).
pub fn engine_pod_json(
    slot: Slot,
    role: &str,
    phase: &str,
    ready: bool,
    since: Timestamp,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": names::engine(&key(), slot), "namespace": OP_NS,
            "labels": pod_labels(slot),
            "annotations": {"tandem.dev/role": role},
            "creationTimestamp": ago(600).to_string(),
        },
        "spec": {"nodeName": if slot == Slot::A { "n1" } else { "n2" }, "containers": [{"name": "engine"}]},
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "lastTransitionTime": since.to_string()}]
        }
    })
}

fn pod_labels(slot: Slot) -> Value {
    let mut l = owner_labels();
    l["tandem.dev/slot"] = json!(slot.as_str());
    l["tandem.dev/disruption-allowed"] = json!("false");
    l
}

pub fn pod_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
}

pub fn secret_json() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": names::secret(&key()), "namespace": OP_NS, "labels": owner_labels()},
        "data": {"token": "c2VjcmV0"}
    })
}

/// The volume's Secrets as the apiserver lists them: the token (`secret`), and the engine TLS and CSI
/// Secrets minted by the test CA, valid for 90 days (`certs`).
pub fn secret_list(secret: bool, certs: bool) -> Value {
    let mut items = Vec::new();
    if secret {
        items.push(secret_json());
    }
    if certs {
        let mv = MirroredVolume::test();
        let all = plan::CertPlan {
            engine: [true, true],
            csi: true,
        };
        let nodes = ["n1".to_string(), "n2".to_string()];
        let (minted, _) = crate::certs::mint(
            &mv,
            &all,
            test_ca(),
            &EngineConfig::default(),
            "secret",
            &nodes,
            Default::default(),
        )
        .unwrap();
        items.extend(minted.iter().map(|s| serde_json::to_value(s).unwrap()));
    }
    json!({"apiVersion": "v1", "kind": "SecretList", "metadata": {}, "items": items})
}

pub fn pv_json(claim: Option<&str>) -> Value {
    let mut pv = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": names::pv(NS, NAME), "labels": owner_labels()},
        "spec": {"capacity": {"storage": "1Gi"}, "csi": {"driver": "csi.tandem.dev", "volumeHandle": "default/data"}}
    });
    if let Some(c) = claim {
        pv["spec"]["claimRef"] = json!({"namespace": NS, "name": c});
    }
    pv
}

pub fn not_found(what: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{what} not found"), "reason": "NotFound", "code": 404
    })
}

pub fn deleted() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200})
}

type Responder = Box<dyn FnOnce(&Value) -> (u16, Value) + Send>;

/// One expected request and its answer.
pub struct Call {
    method: Method,
    path: String,
    respond: Responder,
}

impl Call {
    fn new(method: Method, path: &str) -> Self {
        Call {
            method,
            path: path.to_string(),
            // Writes echo the body, like the apiserver returning the stored object.
            respond: Box::new(|body| (200, body.clone())),
        }
    }
    pub fn get(path: &str) -> Self {
        Call::new(Method::GET, path)
    }
    pub fn patch(path: &str) -> Self {
        Call::new(Method::PATCH, path)
    }
    pub fn post(path: &str) -> Self {
        Call::new(Method::POST, path)
    }
    pub fn put(path: &str) -> Self {
        Call::new(Method::PUT, path)
    }
    pub fn delete(path: &str) -> Self {
        Call::new(Method::DELETE, path).reply(200, deleted())
    }
    /// Answers with a fixed status and body.
    pub fn reply(mut self, code: u16, body: Value) -> Self {
        self.respond = Box::new(move |_| (code, body));
        self
    }
    /// Checks the request body, then echoes it.
    pub fn check(mut self, f: impl FnOnce(&Value) + Send + 'static) -> Self {
        self.respond = Box::new(move |body| {
            f(body);
            (200, body.clone())
        });
        self
    }
    /// Checks the request body, then answers with `answer(body)`.
    pub fn check_reply(mut self, f: impl FnOnce(&Value) -> Value + Send + 'static) -> Self {
        self.respond = Box::new(move |body| (200, f(body)));
        self
    }
}

/// What the mocked apiserver saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// (method, path-and-query, body) of every non-event request.
    pub calls: Vec<(Method, String, Value)>,
    /// The Content-Type of each of `calls` (a patch's kind: apply, merge, JSON).
    pub content_types: Vec<Option<String>>,
    /// (type, reason, note) of every published event.
    pub events: Vec<(String, String, String)>,
}

impl Seen {
    pub fn reasons(&self) -> Vec<&str> {
        self.events.iter().map(|e| e.1.as_str()).collect()
    }
    pub fn body(&self, method: Method, path_prefix: &str) -> &Value {
        &self
            .calls
            .iter()
            .find(|c| c.0 == method && c.1.starts_with(path_prefix))
            .unwrap_or_else(|| {
                panic!(
                    "no {method} {path_prefix} in {:#?}",
                    self.calls.iter().map(|c| (&c.0, &c.1)).collect::<Vec<_>>()
                )
            })
            .2
    }
}

pub struct ApiServerVerifier(tower_test::mock::Handle<Request<Body>, Response<Body>>);

impl ApiServerVerifier {
    /// Serves `script` in order. Event writes (events.k8s.io) are answered wherever they come and recorded;
    /// anything else must match the next scripted call. Ends when the client is dropped.
    pub fn run(self, script: Vec<Call>) -> JoinHandle<Seen> {
        let mut handle = self.0;
        tokio::spawn(async move {
            let mut seen = Seen::default();
            let mut script = script.into_iter();
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().clone();
                let uri = request.uri().to_string();
                let content_type = request
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                };
                if uri.starts_with("/apis/events.k8s.io/v1/") {
                    seen.events.push((
                        body["type"].as_str().unwrap_or_default().to_string(),
                        body["reason"].as_str().unwrap_or_default().to_string(),
                        body["note"].as_str().unwrap_or_default().to_string(),
                    ));
                    send.send_response(
                        Response::builder()
                            .status(201)
                            .body(Body::from(serde_json::to_vec(&body).unwrap()))
                            .unwrap(),
                    );
                    continue;
                }
                let Some(call) = script.next() else {
                    panic!("unexpected request after the script ended: {method} {uri}");
                };
                assert_eq!(
                    method, call.method,
                    "request {uri}: expected {} {}",
                    call.method, call.path
                );
                assert!(
                    uri.starts_with(&call.path),
                    "expected {} {}, got {method} {uri}",
                    call.method,
                    call.path
                );
                let (code, answer) = (call.respond)(&body);
                seen.calls.push((method, uri, body));
                seen.content_types.push(content_type);
                send.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
            let left: Vec<String> = script.map(|c| format!("{} {}", c.method, c.path)).collect();
            assert!(left.is_empty(), "expected requests never came: {left:?}");
            seen
        })
    }
}

/// A client over a mocked API server, for code that takes a bare client (the CSI controller).
pub fn mock_client() -> (Client, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, NS), ApiServerVerifier(handle))
}

impl Context {
    /// A context over a mocked API server and fake engines.
    pub fn test(engines: FakeEngines) -> (Arc<Context>, ApiServerVerifier, Metrics) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, NS);
        let metrics = Metrics::default();
        let mut ctx = Context::new(
            client,
            metrics.clone(),
            Arc::new(engines),
            EngineConfig::default(),
            test_ca().clone(),
            Some("test".into()),
        );
        // Scenarios here start long after the operator did: no lease of ours can still run. The wait
        // itself is tested in `failover::tests` and `tests/failover_engines.rs`.
        ctx.witness = crate::witness::Witness::new(
            std::time::Instant::now()
                .checked_sub(Duration::from_secs(3600))
                .unwrap_or_else(std::time::Instant::now),
        );
        (Arc::new(ctx), ApiServerVerifier(handle), metrics)
    }
}

/// Waits for the verifier, failing the test if it hangs.
pub async fn finish(verifier: JoinHandle<Seen>) -> Seen {
    tokio::time::timeout(Duration::from_secs(5), verifier)
        .await
        .expect("the API conversation did not finish in time")
        .expect("the API conversation failed")
}

/// Paths of `default/data`'s objects.
pub mod paths {
    use super::*;

    pub fn node(n: &str) -> String {
        format!("/api/v1/nodes/{n}")
    }
    pub fn engine_pods() -> String {
        format!("/api/v1/namespaces/{OP_NS}/pods?")
    }
    pub fn pod(slot: Slot) -> String {
        format!(
            "/api/v1/namespaces/{OP_NS}/pods/{}?",
            names::engine(&key(), slot)
        )
    }
    /// An engine pod, for deletes and label patches.
    pub fn engine(slot: Slot) -> String {
        format!(
            "/api/v1/namespaces/{OP_NS}/pods/{}",
            names::engine(&key(), slot)
        )
    }
    /// A workload pod in the volume's namespace.
    pub fn pod_named(name: &str) -> String {
        format!("/api/v1/namespaces/{NS}/pods/{name}")
    }
    pub fn service(slot: Slot) -> String {
        format!(
            "/api/v1/namespaces/{OP_NS}/services/{}?",
            names::engine(&key(), slot)
        )
    }
    pub fn budget() -> String {
        format!(
            "/apis/policy/v1/namespaces/{OP_NS}/poddisruptionbudgets/{}?",
            names::budget(&key())
        )
    }
    /// The token Secret (applied).
    pub fn secret() -> String {
        format!(
            "/api/v1/namespaces/{OP_NS}/secrets/{}",
            names::secret(&key())
        )
    }
    /// The volume's Secrets, listed by its key.
    pub fn secrets() -> String {
        format!("/api/v1/namespaces/{OP_NS}/secrets?")
    }
    /// A certificate Secret (applied): `tls-a`, `tls-b` or `csi`.
    pub fn cert_secret(which: &str) -> String {
        format!("/api/v1/namespaces/{OP_NS}/secrets/{}-{which}?", key())
    }
    pub fn pv() -> String {
        format!("/api/v1/persistentvolumes/{}", names::pv(NS, NAME))
    }
    pub fn pvc(name: &str) -> String {
        format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/{name}")
    }
    pub fn volume() -> String {
        format!("/apis/tandem.dev/v1alpha1/namespaces/{NS}/mirroredvolumes/{NAME}?")
    }
    pub fn status() -> String {
        format!("/apis/tandem.dev/v1alpha1/namespaces/{NS}/mirroredvolumes/{NAME}/status?")
    }
}

/// Answer for a status apply: the volume with the applied status.
pub fn status_answer(mv: &MirroredVolume) -> impl FnOnce(&Value) -> Value + Send + 'static {
    let mut obj = serde_json::to_value(mv).unwrap();
    move |body| {
        obj["status"] = body["status"].clone();
        obj
    }
}

/// The observation calls of a hostPath volume without claim: nodes, engine pods, secrets, PV. With
/// `secret` the volume's Secrets all exist (token and valid certificates), without none does.
pub fn observe_calls(
    n1_ready: bool,
    n2_ready: bool,
    pods: Vec<Value>,
    secret: bool,
    pv: Option<Value>,
) -> Vec<Call> {
    vec![
        Call::get(&paths::node("n1")).reply(200, node_json("n1", n1_ready)),
        Call::get(&paths::node("n2")).reply(200, node_json("n2", n2_ready)),
        Call::get(&paths::engine_pods()).reply(200, pod_list(pods)),
        Call::get(&paths::secrets()).reply(200, secret_list(secret, secret)),
        match pv {
            Some(pv) => Call::get(&paths::pv()).reply(200, pv),
            None => Call::get(&paths::pv()).reply(404, not_found("persistentvolume")),
        },
    ]
}

/// The certificate Secrets' applies of a volume that has none yet.
pub fn cert_calls() -> Vec<Call> {
    vec![
        Call::patch(&paths::cert_secret("tls-a")),
        Call::patch(&paths::cert_secret("tls-b")),
        Call::patch(&paths::cert_secret("csi")),
    ]
}

/// The two Service applies, and the engines' PodDisruptionBudget right after them.
pub fn service_calls() -> Vec<Call> {
    vec![
        Call::patch(&paths::service(Slot::A)),
        Call::patch(&paths::service(Slot::B)),
        Call::patch(&paths::budget()),
    ]
}

/// A list of `kind` (e.g. `ServiceList`).
pub fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {}, "items": items})
}

/// A bare object named `name` (for list answers).
pub fn named(name: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": OP_NS}})
}

/// The name of a volume's object, for assertions.
pub fn name_of(v: &Value) -> String {
    v["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A plain observation of a pair on ready nodes n1 and n2, nothing else known.
pub fn observed_pair() -> crate::observed::Observed {
    let node = |name: &str| crate::observed::NodeObs {
        name: name.into(),
        exists: true,
        ready: true,
        out_of_service: false,
        labeled: true,
        not_ready_since: None,
        unschedulable: false,
    };
    crate::observed::Observed {
        now: Timestamp::from_second(1_800_000_000).unwrap(),
        nodes: [node("n1"), node("n2")],
        pods: [None, None],
        engines: [None, None],
        secret_exists: true,
        token: Some("secret".into()),
        pv: None,
        claim_exists: false,
        engine_pvcs: [false, false],
        workloads: vec![],
        attachments: vec![],
        witness: crate::witness::LeaseClock::long_ago(10_000),
        certs: Default::default(),
        conflict: None,
        moving: Default::default(),
    }
}
