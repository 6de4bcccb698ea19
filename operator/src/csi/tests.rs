//! The controller against the fake API server (`fixtures`: a scripted conversation that checks
//! every request) and fake engines: each call's answer, its idempotency and its errors.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;
use serde_json::{json, Value};
use tandem_api::contract::{ATTR_ENGINES, ATTR_NBD, ATTR_VOLUME, TOPOLOGY_KEY};
use tandem_api::csi as pb;
use tandem_api::csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
use tonic::Code;

use super::{
    engines::{EngineSnapshot, SnapshotApi},
    grpc::ControllerGrpc,
    kube::KubeVolumes,
    params::PVC_NAMESPACE,
    service::Controller,
    CsiError, CsiResult,
};
use crate::{
    engine::EngineTarget,
    fixtures::{finish, mock_client, not_found, Call, OP_NS},
    plan::{names, EngineConfig},
};

const NS: &str = "apps";
const PV: &str = "pvc-0b5e6b7c-2f3a-4c1d-9e8f-0123456789ab";

fn mv_path(name: &str) -> String {
    format!("/apis/tandem.dev/v1alpha1/namespaces/{NS}/mirroredvolumes/{name}")
}
fn mvs_path() -> String {
    format!("/apis/tandem.dev/v1alpha1/namespaces/{NS}/mirroredvolumes?")
}
fn token_path() -> String {
    let key = names::key(NS, PV);
    format!("/api/v1/namespaces/{OP_NS}/secrets/{}", names::secret(&key))
}

/// Engines that keep snapshots in memory, per address; an address in `down` does not answer.
#[derive(Default)]
struct FakeSnapshots {
    taken: Mutex<HashMap<String, Vec<EngineSnapshot>>>,
    calls: Mutex<Vec<(String, String, Option<String>)>>,
    down: Vec<String>,
}

impl FakeSnapshots {
    fn record(&self, op: &str, t: &EngineTarget) -> CsiResult<()> {
        self.calls
            .lock()
            .unwrap()
            .push((op.into(), t.address.clone(), t.token.clone()));
        if self.down.contains(&t.address) {
            return Err(CsiError::Unavailable(format!("{} is down", t.address)));
        }
        Ok(())
    }
}

impl SnapshotApi for FakeSnapshots {
    fn create<'a>(
        &'a self,
        t: &'a EngineTarget,
        id: &'a str,
    ) -> BoxFuture<'a, CsiResult<EngineSnapshot>> {
        Box::pin(async move {
            self.record("create", t)?;
            let mut taken = self.taken.lock().unwrap();
            let list = taken.entry(t.address.clone()).or_default();
            if let Some(s) = list.iter().find(|s| s.id == id) {
                return Ok(s.clone());
            }
            let s = EngineSnapshot {
                id: id.into(),
                size: 1 << 30,
                created_unix_ms: 1_700_000_000_250,
                ready: true,
            };
            list.push(s.clone());
            Ok(s)
        })
    }
    fn delete<'a>(&'a self, t: &'a EngineTarget, id: &'a str) -> BoxFuture<'a, CsiResult<()>> {
        Box::pin(async move {
            self.record("delete", t)?;
            if let Some(list) = self.taken.lock().unwrap().get_mut(&t.address) {
                list.retain(|s| s.id != id);
            }
            Ok(())
        })
    }
    fn list<'a>(&'a self, t: &'a EngineTarget) -> BoxFuture<'a, CsiResult<Vec<EngineSnapshot>>> {
        Box::pin(async move {
            self.record("list", t)?;
            Ok(self
                .taken
                .lock()
                .unwrap()
                .get(&t.address)
                .cloned()
                .unwrap_or_default())
        })
    }
}

fn controller(
    wait: Duration,
    snapshots: Arc<FakeSnapshots>,
) -> (Controller, crate::fixtures::ApiServerVerifier) {
    let (client, verifier) = mock_client();
    let c = Controller {
        volumes: Arc::new(KubeVolumes {
            client,
            operator_namespace: OP_NS.into(),
        }),
        snapshots,
        cfg: EngineConfig::default(),
        wait,
        poll: Duration::from_millis(5),
    };
    (c, verifier)
}

fn cap(mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn topology(node: &str) -> pb::Topology {
    pb::Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_string(), node.to_string())]),
    }
}

/// What external-provisioner sends for a 1Gi RWO claim in `apps` with WaitForFirstConsumer on n2.
fn create_request() -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: PV.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap(Mode::SingleNodeWriter)],
        parameters: HashMap::from([
            (PVC_NAMESPACE.to_string(), NS.to_string()),
            (
                "csi.storage.k8s.io/pvc/name".to_string(),
                "data-db-0".to_string(),
            ),
            ("hostPath".to_string(), "/var/lib/tandem".to_string()),
            ("replication".to_string(), "Sync".to_string()),
        ]),
        accessibility_requirements: Some(pb::TopologyRequirement {
            requisite: vec![topology("n3"), topology("n1"), topology("n2")],
            preferred: vec![topology("n2"), topology("n1"), topology("n3")],
        }),
        ..Default::default()
    }
}

/// The MirroredVolume the first CreateVolume made, as the API server stores it.
fn created_volume() -> Value {
    json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "MirroredVolume",
        "metadata": {"name": PV, "namespace": NS, "uid": "u1"},
        "spec": {
            "size": "1Gi",
            "replication": {"mode": "Sync"},
            "placement": {"nodeSelector": {}, "allowedNodes": ["n1", "n2", "n3"], "preferredPrimary": "n2"},
            "engineStorage": {"hostPath": "/var/lib/tandem"},
            "persistentVolumeName": PV
        }
    })
}

fn placed(mut v: Value) -> Value {
    let key = names::key(NS, PV);
    let addr = |slot: &str| format!("{key}-engine-{slot}.{OP_NS}.svc.cluster.local:9500");
    v["status"] = json!({
        "nodes": ["n2", "n1"],
        "capacityBytes": 1u64 << 30,
        "placement": {"reason": "Placed", "message": "n2 (preferred) and n1"},
        "primary": {"slot": "a", "node": "n2", "pod": "p", "role": "Primary", "address": addr("a")},
        "secondary": {"slot": "b", "node": "n1", "pod": "p", "role": "Secondary", "address": addr("b")}
    });
    v
}

fn code<T: std::fmt::Debug>(r: CsiResult<T>) -> (Code, String) {
    let e = r.expect_err("an error");
    (e.code(), e.to_string())
}

#[tokio::test]
async fn create_volume_makes_the_mirrored_volume_and_answers_once_it_is_placed() {
    let (c, api) = controller(Duration::from_secs(2), Arc::default());
    let api = api.run(vec![
        Call::get(&mv_path(PV)).reply(404, not_found("mirroredvolume")),
        Call::post(&mvs_path()).check(|body| {
            let spec = &body["spec"];
            assert_eq!(body["metadata"]["namespace"], NS);
            assert_eq!(spec["size"], "1Gi");
            assert_eq!(spec["persistentVolumeName"], PV);
            assert_eq!(spec["replication"]["mode"], "Sync");
            assert_eq!(spec["engineStorage"]["hostPath"], "/var/lib/tandem");
            assert_eq!(spec["placement"]["allowedNodes"], json!(["n1", "n2", "n3"]));
            assert_eq!(spec["placement"]["preferredPrimary"], "n2");
            assert_eq!(spec["placement"]["nodeSelector"], json!({}));
            assert_eq!(spec["volumeMode"], "Filesystem");
            assert_eq!(spec["fsType"], "ext4");
            assert!(
                spec.get("claim").is_none(),
                "the provisioner binds the claim"
            );
        }),
        // Not placed at creation; the operator places it before the next look.
        Call::get(&mv_path(PV)).reply(200, placed(created_volume())),
    ]);
    let v = c.create_volume(create_request()).await.unwrap();
    drop(c);
    finish(api).await;
    assert_eq!(v.volume_id, format!("{NS}/{PV}"));
    assert_eq!(v.capacity_bytes, 1 << 30);
    assert_eq!(v.volume_context[ATTR_VOLUME], PV);
    assert!(
        v.volume_context[ATTR_ENGINES].starts_with("n2="),
        "{:?}",
        v.volume_context
    );
    assert!(
        v.volume_context[ATTR_NBD].contains("n1=unix:"),
        "{:?}",
        v.volume_context
    );
    // One segment: the volume's node label, which the operator keeps on its engine nodes (and
    // moves with them); external-provisioner makes it the PV's node affinity as it is.
    let label = crate::plan::names::node_label(NS, PV);
    let value = crate::plan::names::key(NS, PV);
    assert_eq!(v.accessible_topology.len(), 1);
    assert_eq!(
        v.accessible_topology[0].segments,
        HashMap::from([(label, value)])
    );
}

#[tokio::test]
async fn a_retried_create_volume_answers_the_same_without_creating() {
    let (c, api) = controller(Duration::ZERO, Arc::default());
    let api = api.run(vec![
        Call::get(&mv_path(PV)).reply(200, placed(created_volume())),
        Call::get(&mv_path(PV)).reply(200, placed(created_volume())),
    ]);
    let first = c.create_volume(create_request()).await.unwrap();
    let second = c.create_volume(create_request()).await.unwrap();
    drop(c);
    finish(api).await;
    assert_eq!(first, second);
}

#[tokio::test]
async fn an_existing_volume_with_other_parameters_or_owner_is_already_exists() {
    let (c, api) = controller(Duration::ZERO, Arc::default());
    let mut other_mode = placed(created_volume());
    other_mode["spec"]["replication"]["mode"] = json!("Async");
    let mut bigger = placed(created_volume());
    bigger["spec"]["size"] = json!("4Gi");
    let mut hand_written = placed(created_volume());
    hand_written["spec"]
        .as_object_mut()
        .unwrap()
        .remove("persistentVolumeName");
    let api = api.run(vec![
        Call::get(&mv_path(PV)).reply(200, other_mode),
        Call::get(&mv_path(PV)).reply(200, bigger),
        Call::get(&mv_path(PV)).reply(200, hand_written),
    ]);
    let mut limited = create_request();
    limited.capacity_range = Some(pb::CapacityRange {
        required_bytes: 1 << 30,
        limit_bytes: 2 << 30,
    });
    let (code1, _) = code(c.create_volume(create_request()).await);
    let (code2, msg2) = code(c.create_volume(limited).await);
    let (code3, msg3) = code(c.create_volume(create_request()).await);
    drop(c);
    finish(api).await;
    assert_eq!(code1, Code::AlreadyExists);
    assert_eq!(code2, Code::AlreadyExists, "{msg2}");
    assert_eq!(code3, Code::AlreadyExists);
    assert!(msg3.contains("not provisioned"), "{msg3}");
}

#[tokio::test]
async fn a_volume_not_placed_in_time_is_aborted_and_a_refused_placement_is_resource_exhausted() {
    let (c, api) = controller(Duration::ZERO, Arc::default());
    let mut refused = created_volume();
    refused["status"] =
        json!({"placement": {"reason": "NoPairFits", "message": "1 of 3 allowed nodes is ready"}});
    let api = api.run(vec![
        Call::get(&mv_path(PV)).reply(404, not_found("mirroredvolume")),
        Call::post(&mvs_path()),
        Call::get(&mv_path(PV)).reply(200, refused),
    ]);
    let (pending, msg) = code(c.create_volume(create_request()).await);
    let (exhausted, why) = code(c.create_volume(create_request()).await);
    drop(c);
    finish(api).await;
    assert_eq!(pending, Code::Aborted, "{msg}");
    assert!(msg.contains("not placed yet"), "{msg}");
    assert_eq!(exhausted, Code::ResourceExhausted);
    assert!(
        why.contains("NoPairFits") && why.contains("1 of 3"),
        "{why}"
    );
}

#[tokio::test]
async fn an_unplaced_volume_asked_again_with_other_topology_is_made_again() {
    let (c, api) = controller(Duration::ZERO, Arc::default());
    let api = api.run(vec![
        Call::get(&mv_path(PV)).reply(200, created_volume()),
        Call::delete(&mv_path(PV)),
    ]);
    let mut moved = create_request();
    moved.accessibility_requirements.as_mut().unwrap().preferred = vec![topology("n3")];
    let (code, msg) = code(c.create_volume(moved).await);
    drop(c);
    finish(api).await;
    assert_eq!(code, Code::Aborted, "{msg}");
}

#[tokio::test]
async fn a_placed_volume_answers_a_retry_whose_topology_still_allows_its_nodes() {
    let (c, api) = controller(Duration::ZERO, Arc::default());
    let api = api.run(vec![
        Call::get(&mv_path(PV)).reply(200, placed(created_volume())),
        Call::get(&mv_path(PV)).reply(200, placed(created_volume())),
    ]);
    // The pod moved to n1: another preferred node, the same allowed ones.
    let mut moved = create_request();
    moved.accessibility_requirements.as_mut().unwrap().preferred = vec![topology("n1")];
    let v = c.create_volume(moved).await.unwrap();
    // Now n2 is no longer allowed: the placed volume cannot answer.
    let mut elsewhere = create_request();
    elsewhere
        .accessibility_requirements
        .as_mut()
        .unwrap()
        .requisite = vec![topology("n1"), topology("n3")];
    let (code, msg) = code(c.create_volume(elsewhere).await);
    drop(c);
    finish(api).await;
    assert_eq!(v.volume_id, format!("{NS}/{PV}"));
    assert_eq!(code, Code::AlreadyExists, "{msg}");
}

#[tokio::test]
async fn bad_requests_are_refused_before_any_api_call() {
    let (c, api) = controller(Duration::ZERO, Arc::default());
    let api = api.run(vec![]);
    let mut rwx = create_request();
    rwx.volume_capabilities = vec![cap(Mode::MultiNodeMultiWriter)];
    let mut unknown = create_request();
    unknown.parameters.insert("replicas".into(), "3".into());
    let mut short_limit = create_request();
    short_limit.capacity_range = Some(pb::CapacityRange {
        required_bytes: 2 << 30,
        limit_bytes: 1 << 30,
    });
    let mut long_name = create_request();
    long_name.name = format!("{PV}-and-more");
    let mut strict = create_request();
    strict
        .accessibility_requirements
        .as_mut()
        .unwrap()
        .requisite = vec![topology("n2")];
    let mut mixed_fs = create_request();
    mixed_fs.parameters.insert("fsType".into(), "xfs".into());
    mixed_fs.volume_capabilities = vec![pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }];
    let results = [
        (
            code(c.create_volume(rwx).await),
            Code::InvalidArgument,
            "MULTI_NODE_MULTI_WRITER",
        ),
        (
            code(c.create_volume(unknown).await),
            Code::InvalidArgument,
            "\"replicas\"",
        ),
        (
            code(c.create_volume(short_limit).await),
            Code::OutOfRange,
            "limit_bytes",
        ),
        (
            code(c.create_volume(long_name).await),
            Code::InvalidArgument,
            "40",
        ),
        (
            code(c.create_volume(strict).await),
            Code::ResourceExhausted,
            "two nodes",
        ),
        (
            code(c.create_volume(mixed_fs).await),
            Code::InvalidArgument,
            "xfs",
        ),
    ];
    drop(c);
    finish(api).await;
    for ((got, msg), want, needle) in results {
        assert_eq!(got, want, "{msg}");
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }
}

#[tokio::test]
async fn content_sources_must_exist_in_the_claims_namespace_and_fit() {
    let (c, api) = controller(Duration::ZERO, Arc::default());
    let mut big_source = placed(created_volume());
    big_source["metadata"]["name"] = json!("src");
    big_source["spec"]["size"] = json!("2Gi");
    let api = api.run(vec![
        Call::get(&mv_path("gone")).reply(404, not_found("mirroredvolume")),
        Call::get(&mv_path("src")).reply(200, big_source),
    ]);
    let with = |source: pb::volume_content_source::Type| {
        let mut r = create_request();
        r.volume_content_source = Some(pb::VolumeContentSource {
            r#type: Some(source),
        });
        r
    };
    use pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let other_ns = with(Type::Volume(VolumeSource {
        volume_id: "other/src".into(),
    }));
    let gone = with(Type::Snapshot(SnapshotSource {
        snapshot_id: format!("{NS}/gone/snap-1"),
    }));
    let smaller = with(Type::Volume(VolumeSource {
        volume_id: format!("{NS}/src"),
    }));
    let r1 = code(c.create_volume(other_ns).await);
    let r2 = code(c.create_volume(gone).await);
    let r3 = code(c.create_volume(smaller).await);
    drop(c);
    finish(api).await;
    assert_eq!(r1.0, Code::InvalidArgument, "{}", r1.1);
    assert_eq!(r2.0, Code::NotFound, "{}", r2.1);
    assert_eq!(r3.0, Code::OutOfRange, "{}", r3.1);
}

#[tokio::test]
async fn a_restore_sets_spec_source() {
    let (c, api) = controller(Duration::ZERO, Arc::default());
    let mut source = placed(created_volume());
    source["metadata"]["name"] = json!("src");
    let api = api.run(vec![
        Call::get(&mv_path("src")).reply(200, source),
        Call::get(&mv_path(PV)).reply(404, not_found("mirroredvolume")),
        Call::post(&mvs_path()).check(|body| {
            assert_eq!(
                body["spec"]["source"],
                json!({"snapshot": {"volume": "src", "id": "snapshot-1"}})
            );
        }),
    ]);
    let mut r = create_request();
    r.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: format!("{NS}/src/snapshot-1"),
            },
        )),
    });
    let (code, _) = code(c.create_volume(r).await);
    drop(c);
    finish(api).await;
    assert_eq!(code, Code::Aborted, "created, not placed yet");
}

#[tokio::test]
async fn delete_volume_deletes_only_provisioned_volumes_and_unknown_ids_succeed() {
    let (c, api) = controller(Duration::ZERO, Arc::default());
    let mut hand_written = placed(created_volume());
    hand_written["spec"]
        .as_object_mut()
        .unwrap()
        .remove("persistentVolumeName");
    let api = api.run(vec![
        Call::get(&mv_path(PV)).reply(200, placed(created_volume())),
        Call::delete(&mv_path(PV)),
        Call::get(&mv_path(PV)).reply(404, not_found("mirroredvolume")),
        Call::get(&mv_path(PV)).reply(200, hand_written),
    ]);
    let id = format!("{NS}/{PV}");
    c.delete_volume(&id).await.unwrap();
    c.delete_volume(&id).await.unwrap();
    c.delete_volume("not-an-id").await.unwrap();
    let (refused, msg) = code(c.delete_volume(&id).await);
    drop(c);
    finish(api).await;
    assert_eq!(refused, Code::FailedPrecondition, "{msg}");
}

fn expand(bytes: i64) -> pb::ControllerExpandVolumeRequest {
    pb::ControllerExpandVolumeRequest {
        volume_id: format!("{NS}/{PV}"),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn expansion_patches_the_size_and_answers_once_the_engines_serve_it() {
    let (c, api) = controller(Duration::from_secs(2), Arc::default());
    let mut grown = placed(created_volume());
    grown["spec"]["size"] = json!("2Gi");
    let mut served = grown.clone();
    served["status"]["capacityBytes"] = json!(2u64 << 30);
    let api = api.run(vec![
        Call::get(&mv_path(PV)).reply(200, placed(created_volume())),
        Call::patch(&mv_path(PV)).check_reply(move |body| {
            assert_eq!(body, &json!({"spec": {"size": "2Gi"}}));
            grown
        }),
        Call::get(&mv_path(PV)).reply(200, served),
    ]);
    let r = c.expand_volume(expand(2 << 30)).await.unwrap();
    drop(c);
    finish(api).await;
    assert_eq!(r.capacity_bytes, 2 << 30);
    assert!(r.node_expansion_required);
}

#[tokio::test]
async fn expansion_never_shrinks_and_is_aborted_until_served() {
    let (c, api) = controller(Duration::ZERO, Arc::default());
    let mut grown = placed(created_volume());
    grown["spec"]["size"] = json!("2Gi");
    let api = api.run(vec![
        Call::get(&mv_path(PV)).reply(200, placed(created_volume())),
        Call::get(&mv_path(PV)).reply(200, grown),
        Call::get(&mv_path("nope")).reply(404, not_found("mirroredvolume")),
    ]);
    let shrink = code(c.expand_volume(expand(512 << 20)).await);
    // Asked again while the operator is still growing it: no second patch.
    let pending = code(c.expand_volume(expand(2 << 30)).await);
    let mut unknown = expand(2 << 30);
    unknown.volume_id = format!("{NS}/nope");
    let missing = code(c.expand_volume(unknown).await);
    drop(c);
    finish(api).await;
    assert_eq!(shrink.0, Code::OutOfRange, "{}", shrink.1);
    assert_eq!(pending.0, Code::Aborted, "{}", pending.1);
    assert!(pending.1.contains("serve 1073741824"), "{}", pending.1);
    assert_eq!(missing.0, Code::NotFound);
}

fn token_secret() -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "t", "namespace": OP_NS},
           "data": {"token": "c2VjcmV0"}})
}

#[tokio::test]
async fn snapshots_are_taken_on_the_primary_and_listed_and_deleted_on_both_engines() {
    let engines = Arc::new(FakeSnapshots::default());
    let (c, api) = controller(Duration::ZERO, engines.clone());
    let vol = || Call::get(&mv_path(PV)).reply(200, placed(created_volume()));
    let token = || Call::get(&token_path()).reply(200, token_secret());
    let api = api.run(vec![
        vol(),
        token(),
        vol(),
        token(),
        vol(),
        token(),
        vol(),
        token(),
        vol(),
        token(),
        Call::get(&mv_path("gone")).reply(404, not_found("mirroredvolume")),
    ]);
    let req = pb::CreateSnapshotRequest {
        source_volume_id: format!("{NS}/{PV}"),
        name: "snapshot-1".into(),
        ..Default::default()
    };
    let first = c.create_snapshot(req.clone()).await.unwrap();
    let again = c.create_snapshot(req).await.unwrap();
    let listed = c
        .list_snapshots(pb::ListSnapshotsRequest {
            snapshot_id: first.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    c.delete_snapshot(&first.snapshot_id).await.unwrap();
    let after = c
        .list_snapshots(pb::ListSnapshotsRequest {
            source_volume_id: format!("{NS}/{PV}"),
            ..Default::default()
        })
        .await
        .unwrap();
    let unknown = code(
        c.create_snapshot(pb::CreateSnapshotRequest {
            source_volume_id: format!("{NS}/gone"),
            name: "snapshot-2".into(),
            ..Default::default()
        })
        .await,
    );
    drop(c);
    finish(api).await;
    assert_eq!(first, again, "idempotent by name");
    assert_eq!(first.snapshot_id, format!("{NS}/{PV}/snapshot-1"));
    assert_eq!(first.source_volume_id, format!("{NS}/{PV}"));
    assert_eq!(first.size_bytes, 1 << 30);
    assert!(first.ready_to_use);
    let t = first.creation_time.unwrap();
    assert_eq!((t.seconds, t.nanos), (1_700_000_000, 250_000_000));
    assert_eq!(listed.entries.len(), 1);
    assert!(after.entries.is_empty(), "{after:?}");
    assert_eq!(unknown.0, Code::NotFound, "{}", unknown.1);
    let calls = engines.calls.lock().unwrap().clone();
    let key = names::key(NS, PV);
    let primary = format!("{key}-engine-a.{OP_NS}.svc.cluster.local:9500");
    for (op, address, token) in &calls {
        assert_eq!(token.as_deref(), Some("secret"), "{op} on {address}");
        if op == "create" {
            assert_eq!(address, &primary);
        }
    }
    let deletes = calls.iter().filter(|c| c.0 == "delete").count();
    assert_eq!(deletes, 2, "both engines: {calls:?}");
}

#[tokio::test]
async fn list_snapshots_pages_and_delete_of_unknown_ids_succeeds() {
    let engines = Arc::new(FakeSnapshots::default());
    let (c, api) = controller(Duration::ZERO, engines.clone());
    let vol = || Call::get(&mv_path(PV)).reply(200, placed(created_volume()));
    let token = || Call::get(&token_path()).reply(200, token_secret());
    let mut script = Vec::new();
    for _ in 0..6 {
        script.push(vol());
        script.push(token());
    }
    script.push(Call::get(&mv_path("gone")).reply(404, not_found("mirroredvolume")));
    let api = api.run(script);
    for name in ["s-c", "s-a", "s-b"] {
        c.create_snapshot(pb::CreateSnapshotRequest {
            source_volume_id: format!("{NS}/{PV}"),
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let page = |token: &str| pb::ListSnapshotsRequest {
        max_entries: 2,
        source_volume_id: format!("{NS}/{PV}"),
        starting_token: token.into(),
        ..Default::default()
    };
    let page1 = c.list_snapshots(page("")).await.unwrap();
    let page2 = c.list_snapshots(page(&page1.next_token)).await.unwrap();
    let bad_token = code(c.list_snapshots(page("x")).await);
    c.delete_snapshot(&format!("{NS}/gone/s-a")).await.unwrap();
    c.delete_snapshot("garbage").await.unwrap();
    drop(c);
    finish(api).await;
    let ids = |r: &pb::ListSnapshotsResponse| -> Vec<String> {
        r.entries
            .iter()
            .map(|e| e.snapshot.clone().unwrap().snapshot_id)
            .collect()
    };
    assert_eq!(
        ids(&page1),
        [format!("{NS}/{PV}/s-a"), format!("{NS}/{PV}/s-b")]
    );
    assert_eq!(page1.next_token, "2");
    assert_eq!(ids(&page2), [format!("{NS}/{PV}/s-c")]);
    assert_eq!(page2.next_token, "");
    assert_eq!(bad_token.0, Code::Aborted, "{}", bad_token.1);
}

#[tokio::test]
async fn the_grpc_adapter_maps_errors_to_codes_and_reports_capabilities() {
    use super::grpc::{IdentityGrpc, CAPABILITIES};
    use tandem_api::csi::controller_server::Controller as _;
    use tandem_api::csi::identity_server::Identity as _;
    let (c, api) = controller(Duration::ZERO, Arc::default());
    let api = api.run(vec![]);
    let grpc = ControllerGrpc {
        controller: Arc::new(c),
    };
    let mut rwx = create_request();
    rwx.volume_capabilities = vec![cap(Mode::MultiNodeMultiWriter)];
    let status = grpc
        .create_volume(tonic::Request::new(rwx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("one node at a time"),
        "{status:?}"
    );
    let caps = grpc
        .controller_get_capabilities(tonic::Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), CAPABILITIES.len());
    let plugin = IdentityGrpc
        .get_plugin_capabilities(tonic::Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plugin.capabilities.len(), 3);
    drop(grpc);
    finish(api).await;
}

#[tokio::test]
async fn the_sidecars_reach_the_controller_over_its_unix_socket() {
    use tandem_api::csi::{controller_client::ControllerClient, identity_client::IdentityClient};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi/csi.sock");
    let endpoint = format!("unix://{}", socket.display());
    let (c, api) = controller(Duration::ZERO, Arc::default());
    let api = api.run(vec![]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let endpoint = endpoint.clone();
        async move {
            super::grpc::serve(&endpoint, Arc::new(c), async {
                let _ = stopped.await;
            })
            .await
        }
    });
    let mut channel = None;
    for _ in 0..200 {
        if let Ok(ch) = tonic::transport::Endpoint::try_from(endpoint.clone())
            .unwrap()
            .connect()
            .await
        {
            channel = Some(ch);
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let channel = channel.expect("the controller's socket accepts connections");
    let info = IdentityClient::new(channel.clone())
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, tandem_api::contract::CSI_DRIVER);
    let mut ctl = ControllerClient::new(channel);
    let mut rwx = create_request();
    rwx.volume_capabilities = vec![cap(Mode::MultiNodeMultiWriter)];
    let status = ctl.create_volume(rwx).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    finish(api).await;
}

/// The controller's socket answers a client whatever it sends as `:authority`: kubelet's `localhost`,
/// Python gRPC's percent-encoded path, grpc-java's bare path, a `unix://` URI (h2 alone resets the
/// last three with PROTOCOL_ERROR).
#[tokio::test]
async fn the_controller_answers_any_authority() {
    use tandem_testkit::h2raw::assert_answers_any_authority;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let endpoint = format!("unix://{}", socket.display());
    let (c, api) = controller(Duration::ZERO, Arc::default());
    let api = api.run(vec![]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let endpoint = endpoint.clone();
        async move {
            super::grpc::serve(&endpoint, Arc::new(c), async {
                let _ = stopped.await;
            })
            .await
        }
    });
    assert_answers_any_authority(&socket, &endpoint).await;
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    finish(api).await;
}
