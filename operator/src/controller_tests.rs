//! Reconcile scenarios against a mocked API server and fake engines (see `fixtures`).

use std::{sync::Arc, time::Duration};

use http::Method;
use kube::runtime::controller::Action;
use serde_json::{json, Value};
use tandem_api::pb::PairState;

use super::{error_policy, reconcile};
use crate::{
    crd::{EngineRole, FailoverPolicy, MirroredVolume, Phase, Slot},
    engine::{fake::FakeEngines, TakeoverOutcome},
    fixtures::*,
    plan,
};

fn args(pod: &Value) -> Vec<String> {
    pod["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn flag(pod: &Value, name: &str) -> String {
    let a = args(pod);
    let i = a
        .iter()
        .position(|x| x == name)
        .unwrap_or_else(|| panic!("{name} missing in {a:?}"));
    a[i + 1].clone()
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

/// Runs one reconcile (and the error policy on failure), then collects the conversation.
async fn run(
    mv: MirroredVolume,
    engines: FakeEngines,
    script: Vec<Call>,
) -> (Result<Action, crate::Error>, Seen, crate::metrics::Metrics) {
    let (ctx, verifier, metrics) = crate::controller::Context::test(engines);
    let handle = verifier.run(script);
    let mv = Arc::new(mv);
    let result = reconcile(mv.clone(), ctx.clone()).await;
    if let Err(e) = &result {
        error_policy(mv, e, ctx.clone());
    }
    drop(ctx);
    (result, finish(handle).await, metrics)
}

#[tokio::test]
async fn finalizer_is_added_before_anything_else() {
    let mv = MirroredVolume::test();
    let answer = serde_json::to_value(MirroredVolume::test().finalized()).unwrap();
    let script = vec![Call::patch(&paths::volume()).check_reply(move |body| {
        assert!(
            body.to_string().contains("mirroredvolumes.tandem.dev"),
            "{body}"
        );
        answer
    })];
    let (result, seen, _) = run(mv, FakeEngines::default(), script).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(seen.calls.len(), 1);
}

#[tokio::test]
async fn create_path_applies_secret_services_pods_and_pv() {
    let mv = MirroredVolume::test().finalized();
    let answer = status_answer(&mv);
    let mut script = observe_calls(true, true, vec![], false, None);
    script[0] = Call::get(&paths::node("n1")).reply(200, bare_node_json("n1", true));
    script[1] = Call::get(&paths::node("n2")).reply(200, bare_node_json("n2", true));
    // The volume's node label goes on both nodes first: before the PV that selects it, and
    // before the status names the nodes (which a CreateVolume waits for).
    script.push(node_label_call("n1", true));
    script.push(node_label_call("n2", true));
    script.extend(cert_calls());
    script.push(Call::patch(&format!("{}?", paths::secret())).check(|s| {
        assert_eq!(
            s["data"]["token"].as_str().unwrap().len(),
            88,
            "base64 of 64 hex chars"
        );
        // In the operator's namespace, owned by labels (an owner reference cannot cross namespaces).
        assert_eq!(s["metadata"]["namespace"], OP_NS);
        assert!(s["metadata"].get("ownerReferences").is_none());
        assert_eq!(s["metadata"]["labels"]["tandem.dev/volume-namespace"], NS);
        assert_eq!(s["metadata"]["labels"]["tandem.dev/volume-name"], NAME);
        assert_eq!(
            s["metadata"]["labels"]["tandem.dev/volume-uid"],
            "0c6a0d1e-0000-4000-8000-000000000001"
        );
    }));
    script.extend(service_calls());
    script.push(Call::patch(&paths::pod(Slot::A)));
    script.push(Call::patch(&paths::pod(Slot::B)));
    script.push(Call::patch(&format!("{}?", paths::pv())));
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, _) = run(mv, FakeEngines::default(), script).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(10)));

    // Every apply is server-side apply under our field manager, forced; only the node labels are
    // merge patches of one key (an apply would drop the other volumes' labels).
    for (method, uri, _) in &seen.calls {
        if *method == Method::PATCH && !uri.starts_with("/api/v1/nodes/") {
            assert!(
                uri.contains("fieldManager=tandem-operator") && uri.contains("force=true"),
                "{uri}"
            );
        }
    }
    let pod_a = seen.body(Method::PATCH, &paths::pod(Slot::A));
    assert_eq!(flag(pod_a, "--role"), "primary");
    assert_eq!(flag(pod_a, "--peer"), address(Slot::B));
    assert_eq!(flag(pod_a, "--size"), (1u64 << 30).to_string());
    assert_eq!(flag(pod_a, "--nbd-listen"), "off");
    assert_eq!(flag(pod_a, "--grpc-listen"), "0.0.0.0:9500");
    assert_eq!(flag(pod_a, "--replication"), "async");
    assert_eq!(
        pod_a["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchFields"][0]["values"][0],
        "n1"
    );
    assert_eq!(
        pod_a["spec"]["volumes"][0]["hostPath"]["path"],
        "/var/lib/tandem/default/data-0c6a0d1e-0000-4000-8000-000000000001"
    );
    let pod_b = seen.body(Method::PATCH, &paths::pod(Slot::B));
    assert_eq!(flag(pod_b, "--role"), "secondary");
    assert_eq!(flag(pod_b, "--peer"), address(Slot::A));

    let pv = seen.body(Method::PATCH, &paths::pv());
    assert_eq!(pv["spec"]["csi"]["driver"], "csi.tandem.dev");
    assert_eq!(pv["spec"]["csi"]["volumeHandle"], "default/data");
    assert_eq!(
        pv["spec"]["csi"]["volumeAttributes"]["tandem.dev/volume"],
        "data"
    );
    assert_eq!(
        pv["spec"]["csi"]["volumeAttributes"]["tandem.dev/engines"],
        format!("n1={},n2={}", address(Slot::A), address(Slot::B))
    );
    assert_eq!(
        pv["spec"]["csi"]["volumeAttributes"]["tandem.dev/takeover-policy"],
        "wait"
    );
    assert_eq!(
        pv["spec"]["csi"]["nodeStageSecretRef"],
        json!({"name": format!("{}-csi", key()), "namespace": OP_NS})
    );
    assert_eq!(
        pv["spec"]["csi"]["volumeAttributes"]["tandem.dev/nbd"],
        format!(
            "n1=unix:/run/tandem/volumes/{k}/nbd.sock,n2=unix:/run/tandem/volumes/{k}/nbd.sock",
            k = key()
        )
    );
    // Every namespaced object the operator wrote is in its own namespace; the workload's holds none.
    for (method, uri, _) in &seen.calls {
        if *method == Method::PATCH && uri.starts_with("/api") && uri.contains("/namespaces/") {
            assert!(
                uri.contains(&format!("/namespaces/{OP_NS}/"))
                    || uri.starts_with("/apis/tandem.dev/"),
                "{uri}"
            );
        }
    }
    let csi = seen.body(Method::PATCH, &paths::cert_secret("csi"));
    assert_eq!(
        csi["data"]["token"],
        seen.body(Method::PATCH, &paths::secret())["data"]["token"],
        "the CSI plugins get the engines' token"
    );
    let (label, value) = plan::node_label(&MirroredVolume::test());
    assert_eq!(
        pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"],
        json!([{"matchExpressions": [{"key": label, "operator": "In", "values": [value]}]}])
    );
    assert!(pv["metadata"].get("ownerReferences").is_none());

    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["phase"], "Creating");
    assert_eq!(status["nodes"], json!(["n1", "n2"]));
    assert!(status["certificates"]["notAfter"].is_string(), "{status}");
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert_eq!(
        seen.reasons(),
        vec![
            "Placed",
            "TokenCreated",
            "EngineCreated",
            "EngineCreated",
            "PersistentVolumeCreated",
            "CertificatesIssued",
            "PhaseChanged"
        ]
    );
}

#[tokio::test]
async fn established_pair_reports_synced_and_lag() {
    let mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    let mut primary = engine_state(EngineRole::Primary, 1, PairState::Synced);
    primary.pending_bytes = 0;
    let engines = FakeEngines::default()
        .with_state(&address(Slot::A), primary)
        .with_state(
            &address(Slot::B),
            engine_state(EngineRole::Secondary, 1, PairState::Unspecified),
        );
    let pods = vec![
        engine_pod_json(Slot::A, "primary", "Running", true, ago(300)),
        engine_pod_json(Slot::B, "secondary", "Running", true, ago(300)),
    ];
    let answer = status_answer(&mv);
    let mut script = observe_calls(true, true, pods, true, Some(pv_json(None)));
    script.extend(service_calls());
    // In sync: the secondary's pod leaves the disruption budget (a drain may evict it).
    script.push(Call::patch(&paths::engine(Slot::B)).check(|p| {
        assert_eq!(
            p["metadata"]["labels"]["tandem.dev/disruption-allowed"],
            "true"
        );
    }));
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, metrics) = run(mv, engines, script).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(30)));
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["phase"], "Synced");
    assert_eq!(status["replication"]["lag"], "0B");
    assert_eq!(condition(status, "Ready")["status"], "True");
    assert_eq!(condition(status, "Synced")["status"], "True");
    assert_eq!(condition(status, "Degraded")["status"], "False");
    assert_eq!(condition(status, "TakeoverInProgress")["status"], "False");
    assert_eq!(status["primary"]["pod"], format!("{}-engine-a", key()));
    assert!(metrics
        .encode()
        .unwrap()
        .contains(r#"tandem_operator_volume_epoch{namespace="default",volume="data"} 1"#));
}

#[tokio::test]
async fn primary_pod_loss_triggers_takeover_and_epoch_bump() {
    let mut mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    // Its node is up: the pod was being restarted there, and the grace ran out.
    if let Some(s) = mv.status.as_mut() {
        s.engine_restart = Some(crate::crd::EngineRestart {
            slot: Slot::A,
            node: "n1".into(),
            since: ago(120).to_string(),
            reason: "engine pod missing".into(),
        });
    }
    let engines = FakeEngines::default()
        .with_state(
            &address(Slot::B),
            engine_state(EngineRole::Secondary, 1, PairState::Unspecified),
        )
        .with_takeover(
            &address(Slot::B),
            TakeoverOutcome {
                epoch: 2,
                ready_ms: 12,
                peer_pending_blocks: 40,
                ..Default::default()
            },
        );
    // Slot a's pod is gone; slot b is ready.
    let pods = vec![engine_pod_json(
        Slot::B,
        "secondary",
        "Running",
        true,
        ago(300),
    )];
    let answer = status_answer(&mv);
    let mut script = observe_calls(true, true, pods, true, Some(pv_json(None)));
    script.extend(service_calls());
    script.push(Call::patch(&paths::pod(Slot::A)));
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, metrics) = run(mv, engines.clone(), script).await;
    result.unwrap();

    assert_eq!(
        engines.calls(),
        vec![(address(Slot::B), FailoverPolicy::WaitForPrimary)]
    );
    // The lost slot comes back as a secondary pointing at the new primary.
    let pod_a = seen.body(Method::PATCH, &paths::pod(Slot::A));
    assert_eq!(flag(pod_a, "--role"), "secondary");
    assert_eq!(
        pod_a["metadata"]["annotations"]["tandem.dev/role"],
        "secondary"
    );
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["epoch"], 2);
    assert_eq!(status["primary"]["node"], "n2");
    assert_eq!(status["primary"]["slot"], "b");
    assert_eq!(status["secondary"]["node"], "n1");
    assert_eq!(status["takeover"]["reason"], "PrimaryPodLost");
    assert_eq!(status["takeover"]["readyMs"], 12);
    assert_eq!(status["takeover"]["pendingBlocks"], 40);
    assert_eq!(condition(status, "Ready")["status"], "True");
    // The new primary drains the 40 blocks the old one owes: the takeover is still in progress, and the pair
    // is degraded (the old primary is gone).
    assert_eq!(status["phase"], "TakingOver");
    assert_eq!(condition(status, "TakeoverInProgress")["status"], "True");
    assert_eq!(condition(status, "Degraded")["status"], "True");
    let reasons = seen.reasons();
    assert!(
        reasons.contains(&"TakeoverStarted") && reasons.contains(&"TakeoverCompleted"),
        "{reasons:?}"
    );
    assert!(metrics
        .encode()
        .unwrap()
        .contains(r#"tandem_operator_failovers_total{namespace="default",volume="data",reason="PrimaryPodLost",result="ok"} 1"#));
}

#[tokio::test]
async fn primary_node_loss_fences_and_releases_stuck_workloads() {
    let mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    let mut policy_mv = mv.clone();
    policy_mv.spec.failover.policy = FailoverPolicy::ForcePromote;
    let engines = FakeEngines::default()
        .with_state(
            &address(Slot::B),
            engine_state(EngineRole::Secondary, 1, PairState::Unspecified),
        )
        .with_takeover(
            &address(Slot::B),
            TakeoverOutcome {
                epoch: 2,
                lost_blocks: 3,
                lost_seq_from: 90,
                lost_seq_to: 92,
                ..Default::default()
            },
        );
    let pods = vec![
        // The kubelet on n1 stopped reporting: the pod still looks ready.
        engine_pod_json(Slot::A, "primary", "Running", true, ago(300)),
        engine_pod_json(Slot::B, "secondary", "Running", true, ago(300)),
    ];
    let workload = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app-0", "namespace": "default"},
        "spec": {"nodeName": "n1", "containers": [{"name": "app"}],
                 "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "app-data"}}]}
    });
    let bystander = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "other", "namespace": "default"},
        "spec": {"nodeName": "n1", "containers": [{"name": "x"}]}
    });
    let answer = status_answer(&policy_mv);
    let mut script = observe_calls(false, true, pods, true, Some(pv_json(Some("app-data"))));
    script.push(
        Call::get("/api/v1/namespaces/default/pods?&fieldSelector=spec.nodeName%3Dn1")
            .reply(200, pod_list(vec![workload, bystander])),
    );
    script.push(Call::get("/apis/storage.k8s.io/v1/volumeattachments").reply(
        200,
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachmentList", "metadata": {}, "items": [{
            "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment", "metadata": {"name": "csi-123"},
            "spec": {"attacher": "csi.tandem.dev", "nodeName": "n1", "source": {"persistentVolumeName": "tandem.default.data"}}
        }]}),
    ));
    // Fence the old primary's pod (grace 0), release the stuck workload (grace 0), drop its attachment.
    script.push(Call::delete(&paths::pod(Slot::A)).check_reply(|body| {
        assert_eq!(body["gracePeriodSeconds"], 0);
        deleted()
    }));
    script.push(
        Call::delete(&paths::pod_named("app-0")).check_reply(|body| {
            assert_eq!(body["gracePeriodSeconds"], 0);
            deleted()
        }),
    );
    script.push(Call::delete(
        "/apis/storage.k8s.io/v1/volumeattachments/csi-123",
    ));
    script.extend(service_calls());
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, metrics) = run(policy_mv, engines.clone(), script).await;
    result.unwrap();

    assert_eq!(
        engines.calls(),
        vec![(address(Slot::B), FailoverPolicy::ForcePromote)]
    );
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["epoch"], 2);
    assert_eq!(status["takeover"]["reason"], "PrimaryNodeLost");
    assert_eq!(status["takeover"]["lostBlocks"], 3);
    assert_eq!(
        status["lostNodes"][0],
        json!({"node": "n1", "epoch": 1, "since": status["lostNodes"][0]["since"], "released": true})
    );
    assert_eq!(status["primary"]["node"], "n2");
    let reasons = seen.reasons();
    for r in [
        "NodeLost",
        "TakeoverStarted",
        "TakeoverCompleted",
        "EngineNodeLost",
        "WorkloadReleased",
    ] {
        assert!(reasons.contains(&r), "{r} missing in {reasons:?}");
    }
    assert!(metrics.encode().unwrap().contains(
        r#"tandem_operator_released_workload_pods_total{namespace="default",volume="data"} 1"#
    ));
}

#[tokio::test]
async fn lost_secondary_node_keeps_workloads_until_fenced() {
    let mut mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    mv.spec.claim = None;
    let engines = FakeEngines::default().with_state(
        &address(Slot::A),
        engine_state(EngineRole::Primary, 1, PairState::Connecting),
    );
    let pods = vec![
        engine_pod_json(Slot::A, "primary", "Running", true, ago(300)),
        engine_pod_json(Slot::B, "secondary", "Running", true, ago(300)),
    ];
    let workload = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app-0", "namespace": "default"},
        "spec": {"nodeName": "n2", "containers": [{"name": "app"}],
                 "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "app-data"}}]}
    });
    let answer = status_answer(&mv);
    let mut script = observe_calls(true, false, pods, true, Some(pv_json(Some("app-data"))));
    script.push(
        Call::get("/api/v1/namespaces/default/pods?&fieldSelector=spec.nodeName%3Dn2")
            .reply(200, pod_list(vec![workload])),
    );
    script.push(Call::get("/apis/storage.k8s.io/v1/volumeattachments").reply(
        200,
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachmentList", "metadata": {}, "items": []}),
    ));
    // Only the engine pod on the lost node is fenced; the workload stays (its writes reach the primary).
    script.push(Call::delete(&paths::pod(Slot::B)));
    script.extend(service_calls());
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, _) = run(mv, engines.clone(), script).await;
    result.unwrap();
    assert!(
        engines.calls().is_empty(),
        "no takeover when the secondary is lost"
    );
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["phase"], "Degraded");
    assert_eq!(status["lostNodes"][0]["released"], false);
    assert_eq!(condition(status, "Degraded")["status"], "True");
    assert!(
        seen.reasons().contains(&"ReleaseBlocked"),
        "{:?}",
        seen.reasons()
    );
}

#[tokio::test]
async fn returning_engine_rejoins_as_secondary_and_resyncs() {
    // After a takeover to slot b, slot a's node is back and its pod was removed: it is recreated as secondary.
    let mut mv = MirroredVolume::test().finalized().established(Slot::B, 2);
    if let Some(s) = mv.status.as_mut() {
        if let Some(sec) = s.secondary.as_mut() {
            sec.role = EngineRole::Fenced;
        }
    }
    let engines = FakeEngines::default().with_state(
        &address(Slot::B),
        engine_state(EngineRole::Primary, 2, PairState::Reversing),
    );
    let pods = vec![engine_pod_json(
        Slot::B,
        "secondary",
        "Running",
        true,
        ago(300),
    )];
    let answer = status_answer(&mv);
    let mut script = observe_calls(true, true, pods, true, Some(pv_json(None)));
    script.extend(service_calls());
    script.push(Call::patch(&paths::pod(Slot::A)));
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, _) = run(mv.clone(), engines.clone(), script).await;
    result.unwrap();
    assert!(
        engines.calls().is_empty(),
        "a healthy primary is never taken over"
    );
    let pod_a = seen.body(Method::PATCH, &paths::pod(Slot::A));
    assert_eq!(flag(pod_a, "--role"), "secondary");
    assert_eq!(flag(pod_a, "--peer"), address(Slot::B));

    // Next round: the engine is back, resyncing; then in sync.
    for (pair_state, phase) in [
        (PairState::Resyncing, Phase::Syncing),
        (PairState::Synced, Phase::Synced),
    ] {
        let engines = FakeEngines::default()
            .with_state(
                &address(Slot::B),
                engine_state(EngineRole::Primary, 2, pair_state),
            )
            .with_state(
                &address(Slot::A),
                engine_state(EngineRole::Secondary, 2, PairState::Unspecified),
            );
        let pods = vec![
            engine_pod_json(Slot::A, "secondary", "Running", true, ago(30)),
            engine_pod_json(Slot::B, "secondary", "Running", true, ago(300)),
        ];
        let answer = status_answer(&mv);
        let mut script = observe_calls(true, true, pods, true, Some(pv_json(None)));
        script.extend(service_calls());
        if pair_state == PairState::Synced {
            // Only an in-sync secondary may be evicted by a drain.
            script.push(Call::patch(&paths::engine(Slot::A)).check(|p| {
                assert_eq!(
                    p["metadata"]["labels"]["tandem.dev/disruption-allowed"],
                    "true"
                );
            }));
        }
        script.push(Call::patch(&paths::status()).check_reply(answer));
        let (result, seen, _) = run(mv.clone(), engines, script).await;
        result.unwrap();
        let status = &seen.body(Method::PATCH, &paths::status())["status"];
        assert_eq!(status["phase"], phase.as_str());
        assert_eq!(status["secondary"]["role"], "Secondary");
        assert_eq!(status["secondary"]["reachable"], true);
        assert!(
            seen.reasons().contains(&"EngineRejoined"),
            "{:?}",
            seen.reasons()
        );
    }
}

#[tokio::test]
async fn wait_policy_takeover_failure_is_retried_and_counted() {
    let mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    // The secondary answers Status but refuses Takeover (old primary unreachable under WaitForPrimary).
    let engines = FakeEngines::default().with_state(
        &address(Slot::B),
        engine_state(EngineRole::Secondary, 1, PairState::Unspecified),
    );
    let pods = vec![
        engine_pod_json(Slot::A, "primary", "Running", false, ago(120)),
        engine_pod_json(Slot::B, "secondary", "Running", true, ago(300)),
    ];
    let answer = status_answer(&mv);
    let mut script = observe_calls(true, true, pods, true, Some(pv_json(None)));
    script.extend(service_calls());
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, metrics) = run(mv, engines.clone(), script).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(5)));
    assert_eq!(engines.calls().len(), 1);
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["phase"], "TakingOver");
    assert_eq!(status["epoch"], 1);
    assert_eq!(status["primary"]["node"], "n1");
    assert_eq!(status["takeover"]["attempts"], 1);
    assert_eq!(status["takeover"]["reason"], "PrimaryUnready");
    assert!(status["takeover"]["lastError"]
        .as_str()
        .unwrap()
        .contains("refused"));
    assert_eq!(condition(status, "TakeoverInProgress")["status"], "True");
    assert!(seen.reasons().contains(&"TakeoverFailed"));
    assert!(metrics
        .encode()
        .unwrap()
        .contains(r#"tandem_operator_failovers_total{namespace="default",volume="data",reason="PrimaryUnready",result="failed"} 1"#));
}

/// The calls of a deletion after the engines and the wipe: each kind in the operator's namespace is
/// listed by the owner labels and only what they list goes; then the finalizer.
fn teardown_calls(removed: Value, pods: Vec<Value>) -> Vec<Call> {
    teardown_calls_with(removed, pods, vec![])
}

/// [`teardown_calls`] where the engine PVC list answers `pvcs` (each is deleted).
fn teardown_calls_with(removed: Value, pods: Vec<Value>, pvcs: Vec<Value>) -> Vec<Call> {
    // The nodes carrying the volume's label (by key and value) lose it: n1, and n3, which a move
    // interrupted by a crash left labelled.
    let mut calls = vec![
        Call::get("/api/v1/nodes?").reply(
            200,
            list(
                "NodeList",
                vec![node_json("n1", true), node_json("n3", true)],
            ),
        ),
        node_label_call("n1", false),
        node_label_call("n3", false),
    ];
    calls.push(Call::get(&paths::engine_pods()).reply(200, pod_list(pods.clone())));
    for p in &pods {
        calls.push(Call::delete(&format!(
            "/api/v1/namespaces/{OP_NS}/pods/{}",
            name_of(p)
        )));
    }
    calls.extend([
        Call::get(&format!("/api/v1/namespaces/{OP_NS}/services?")).reply(
            200,
            list("ServiceList", vec![named(&format!("{}-engine-b", key()))]),
        ),
        Call::delete(&paths::service(Slot::B)).reply(404, not_found("service")),
        Call::get(&format!(
            "/apis/policy/v1/namespaces/{OP_NS}/poddisruptionbudgets?"
        ))
        .reply(200, list("PodDisruptionBudgetList", vec![])),
        Call::get(&format!(
            "/api/v1/namespaces/{OP_NS}/persistentvolumeclaims?"
        ))
        .reply(200, list("PersistentVolumeClaimList", pvcs.clone())),
    ]);
    for p in &pvcs {
        calls.push(Call::delete(&format!(
            "/api/v1/namespaces/{OP_NS}/persistentvolumeclaims/{}",
            name_of(p)
        )));
    }
    calls.extend([
        Call::get(&paths::secrets()).reply(200, secret_list(true, true)),
        Call::delete(&paths::secret()),
        Call::delete(&paths::cert_secret("tls-a")),
        Call::delete(&paths::cert_secret("tls-b")),
        Call::delete(&paths::cert_secret("csi")),
        Call::patch(&paths::volume()).check_reply(move |body| {
            assert!(
                body.to_string().contains("remove"),
                "finalizer removal is a JSON patch: {body}"
            );
            removed
        }),
    ]);
    calls
}

#[tokio::test]
async fn deletion_tears_everything_down_then_drops_the_finalizer() {
    let mv = MirroredVolume::test()
        .finalized()
        .with_claim("app-data")
        .deleting();
    let removed = serde_json::to_value(MirroredVolume::test().with_claim("app-data")).unwrap();
    let mut script = vec![
        Call::delete(&paths::pvc("app-data")),
        Call::get(&paths::pv()).reply(200, pv_json(Some("app-data"))),
        Call::get(&paths::pvc("app-data")).reply(404, not_found("claim")),
        Call::delete(&paths::pv()),
        // No engine pod left (and never placed: nothing to wipe).
        Call::get(&paths::engine_pods()).reply(200, pod_list(vec![])),
    ];
    script.extend(teardown_calls(removed, vec![]));
    let (result, seen, _) = run(mv, FakeEngines::default(), script).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(seen.reasons(), vec!["Deleted"]);
    let (label, value) = plan::node_label(&MirroredVolume::test());
    let nodes = seen
        .calls
        .iter()
        .find(|c| c.1.starts_with("/api/v1/nodes?"));
    assert!(
        nodes.is_some_and(|c| c
            .1
            .contains(&format!("{label}%3D{value}").replace('/', "%2F"))),
        "{nodes:?}"
    );
    // The lists ask for this volume's objects by every owner label, uid included.
    let lists: Vec<&String> = seen
        .calls
        .iter()
        .filter(|c| c.0 == Method::GET && c.1.contains(OP_NS))
        .map(|c| &c.1)
        .collect();
    assert_eq!(lists.len(), 6);
    for uri in lists {
        for label in [
            "volume-namespace%3Ddefault",
            "volume-name%3Ddata",
            "volume-uid%3D0c6a0d1e",
        ] {
            assert!(uri.contains(label), "{uri} lacks {label}");
        }
    }
}

/// The wipe pod of `default/data` for a slot, as the apiserver returns it.
fn wipe_pod_json(slot: Slot, phase: &str, created: k8s_openapi::jiff::Timestamp) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{}-wipe-{}", key(), slot.as_str()), "namespace": OP_NS,
            "labels": owner_labels(), "creationTimestamp": created.to_string(),
        },
        "spec": {"containers": [{"name": "wipe"}]},
        "status": {"phase": phase}
    })
}

fn wipe_path(slot: Slot) -> String {
    format!(
        "/api/v1/namespaces/{OP_NS}/pods/{}-wipe-{}",
        key(),
        slot.as_str()
    )
}

/// Deleting a placed volume: the engines stop first, then one wipe pod per node removes the engine's
/// files (the uid data dir and the socket dir), and only once both succeeded do the finalizer and the
/// remaining objects go. Three passes, as the operator sees them.
#[tokio::test]
async fn deletion_wipes_both_nodes_before_the_finalizer_goes() {
    let uid_dir = "/var/lib/tandem/default/data-0c6a0d1e-0000-4000-8000-000000000001";
    let placed = || {
        let mut mv = MirroredVolume::test()
            .established(Slot::A, 1)
            .finalized()
            .deleting();
        mv.status.as_mut().unwrap().data_dir = Some(uid_dir.into());
        mv
    };
    let gone_pv = || Call::get(&paths::pv()).reply(404, not_found("pv"));

    // 1: the engines are still there: they are deleted and the pass waits.
    let engine = engine_pod_json(Slot::A, "primary", "Running", true, ago(60));
    let script = vec![
        gone_pv(),
        Call::get(&paths::engine_pods()).reply(200, pod_list(vec![engine])),
        Call::delete(&paths::engine(Slot::A)),
    ];
    let (result, seen, _) = run(placed(), FakeEngines::default(), script).await;
    assert!(result.is_err(), "the finalizer stays while engines stop");
    assert!(
        seen.calls[1].1.contains("tandem.dev%2Fslot"),
        "{:?}",
        seen.calls[1]
    );

    // 2: engines gone: a wipe pod goes to n1; n2's already succeeded. Still waiting.
    let script = vec![
        gone_pv(),
        Call::get(&paths::engine_pods()).reply(200, pod_list(vec![])),
        Call::get(&wipe_path(Slot::A)).reply(404, not_found("pod")),
        Call::get(&paths::node("n1")).reply(200, node_json("n1", true)),
        Call::patch(&wipe_path(Slot::A)),
        Call::get(&wipe_path(Slot::B)).reply(200, wipe_pod_json(Slot::B, "Succeeded", ago(5))),
    ];
    let (result, seen, _) = run(placed(), FakeEngines::default(), script).await;
    assert!(result.is_err(), "the finalizer stays while a wipe runs");
    let pod = seen.body(Method::PATCH, &wipe_path(Slot::A));
    assert_eq!(pod["spec"]["nodeName"], "n1");
    assert_eq!(
        pod["spec"]["containers"][0]["args"],
        json!([
            "wipe",
            "--state-dir",
            "/host/data-0c6a0d1e-0000-4000-8000-000000000001/state",
            "--data",
            "/host/data-0c6a0d1e-0000-4000-8000-000000000001/data.img",
            "--run-dir",
            format!("/run/tandem/volumes/{}", key()),
        ])
    );
    assert_eq!(
        pod["spec"]["volumes"][1]["hostPath"]["path"],
        "/var/lib/tandem/default"
    );
    assert_eq!(seen.reasons(), vec!["Wiping"]);

    // 3: both succeeded: everything else goes, wipe pods included, then the finalizer.
    let removed = serde_json::to_value(MirroredVolume::test()).unwrap();
    let mut script = vec![
        gone_pv(),
        Call::get(&paths::engine_pods()).reply(200, pod_list(vec![])),
        Call::get(&wipe_path(Slot::A)).reply(200, wipe_pod_json(Slot::A, "Succeeded", ago(9))),
        Call::get(&wipe_path(Slot::B)).reply(200, wipe_pod_json(Slot::B, "Succeeded", ago(9))),
    ];
    script.extend(teardown_calls(
        removed,
        vec![
            wipe_pod_json(Slot::A, "Succeeded", ago(9)),
            wipe_pod_json(Slot::B, "Succeeded", ago(9)),
        ],
    ));
    let (result, seen, _) = run(placed(), FakeEngines::default(), script).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(seen
        .calls
        .iter()
        .any(|c| c.0 == Method::DELETE && c.1.starts_with(&wipe_path(Slot::B))));
    assert_eq!(seen.reasons(), vec!["Deleted"]);
}

/// A StorageClass volume whose slot b moved (instance `-m1`) and whose later move failed: deleting
/// it deletes every instance's engine PVC the owner labels list, the `-m<n>` ones included.
#[tokio::test]
async fn deletion_deletes_every_instances_engine_pvc() {
    let mut mv = MirroredVolume::test()
        .established(Slot::A, 1)
        .finalized()
        .deleting();
    mv.spec.engine_storage.host_path = None;
    mv.spec.engine_storage.storage_class_name = Some("local-path".into());
    if let Some(s) = mv.status.as_mut() {
        s.nodes = vec!["n1".into(), "n3".into()];
        s.slot_generations = vec![0, 1];
    }
    let removed = serde_json::to_value(MirroredVolume::test()).unwrap();
    let mut script = vec![
        Call::get(&paths::pv()).reply(404, not_found("pv")),
        Call::get(&paths::engine_pods()).reply(200, pod_list(vec![])),
        Call::get(&wipe_path(Slot::A)).reply(200, wipe_pod_json(Slot::A, "Succeeded", ago(9))),
        Call::get(&wipe_path(Slot::B)).reply(200, wipe_pod_json(Slot::B, "Succeeded", ago(9))),
    ];
    let pvcs: Vec<Value> = ["a", "b-m1", "b-m2"]
        .iter()
        .map(|i| named(&format!("{}-engine-{i}-data", key())))
        .collect();
    script.extend(teardown_calls_with(removed, vec![], pvcs));
    let (result, seen, _) = run(mv, FakeEngines::default(), script).await;
    assert_eq!(result.unwrap(), Action::await_change());
    let deleted: Vec<&str> = seen
        .calls
        .iter()
        .filter(|c| c.0 == Method::DELETE && c.1.contains("/persistentvolumeclaims/"))
        .filter_map(|c| c.1.rsplit('/').next()?.split('?').next())
        .collect();
    assert_eq!(
        deleted,
        ["a", "b-m1", "b-m2"].map(|i| format!("{}-engine-{i}-data", key()))
    );
    // The list asks by the owner labels, which every instance's PVC carries.
    let pvc = plan::engine_pvc_at(
        &mv_on_claims(),
        Slot::B,
        2,
        "local-path",
        &Default::default(),
    )
    .unwrap();
    let labels = pvc.metadata.labels.unwrap();
    for (k, v) in owner_labels().as_object().unwrap() {
        assert_eq!(labels.get(k).map(String::as_str), v.as_str(), "{k}");
    }
}

fn mv_on_claims() -> MirroredVolume {
    let mut mv = MirroredVolume::test();
    mv.spec.engine_storage.host_path = None;
    mv.spec.engine_storage.storage_class_name = Some("local-path".into());
    mv
}

/// A node that is gone is skipped and reported, not waited for; an unreachable one is waited for a
/// while, then skipped too.
#[tokio::test]
async fn a_gone_node_is_not_waited_for() {
    let mut mv = MirroredVolume::test()
        .established(Slot::A, 1)
        .finalized()
        .deleting();
    mv.status.as_mut().unwrap().data_dir =
        Some("/var/lib/tandem/default/data-0c6a0d1e-0000-4000-8000-000000000001".into());
    let removed = serde_json::to_value(MirroredVolume::test()).unwrap();
    let mut script = vec![
        Call::get(&paths::pv()).reply(404, not_found("pv")),
        Call::get(&paths::engine_pods()).reply(200, pod_list(vec![])),
        // n1: deleted from the cluster.
        Call::get(&wipe_path(Slot::A)).reply(404, not_found("pod")),
        Call::get(&paths::node("n1")).reply(404, not_found("node")),
        // n2: NotReady, and its wipe pod has waited longer than the patience.
        Call::get(&wipe_path(Slot::B)).reply(200, wipe_pod_json(Slot::B, "Pending", ago(3600))),
        Call::get(&paths::node("n2")).reply(200, node_json("n2", false)),
    ];
    script.extend(teardown_calls(
        removed,
        vec![wipe_pod_json(Slot::B, "Pending", ago(3600))],
    ));
    let (result, seen, _) = run(mv, FakeEngines::default(), script).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(
        seen.reasons(),
        vec!["WipeSkipped", "WipeSkipped", "Deleted"]
    );
    assert!(
        seen.events[0].2.contains("node n1: the node is gone"),
        "{:?}",
        seen.events
    );
    assert!(
        seen.events[2].2.contains("except on n1, n2"),
        "{:?}",
        seen.events
    );
}

/// Within the patience, an unreachable node's wipe is waited for.
#[tokio::test]
async fn an_unreachable_node_is_waited_for_a_while() {
    let mv = MirroredVolume::test()
        .established(Slot::A, 1)
        .finalized()
        .deleting();
    let script = vec![
        Call::get(&paths::pv()).reply(404, not_found("pv")),
        Call::get(&paths::engine_pods()).reply(200, pod_list(vec![])),
        Call::get(&wipe_path(Slot::A)).reply(200, wipe_pod_json(Slot::A, "Succeeded", ago(30))),
        Call::get(&wipe_path(Slot::B)).reply(200, wipe_pod_json(Slot::B, "Pending", ago(30))),
        Call::get(&paths::node("n2")).reply(200, node_json("n2", false)),
    ];
    let (result, seen, _) = run(mv, FakeEngines::default(), script).await;
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("waiting for the wipe on n2 (Pending)"),
        "{err}"
    );
    assert!(seen.events.is_empty());
}

#[tokio::test]
async fn cleanup_leaves_a_foreign_pv() {
    let mv = MirroredVolume::test().finalized().deleting();
    let removed = serde_json::to_value(MirroredVolume::test()).unwrap();
    let mut foreign = pv_json(Some("app-data"));
    foreign["metadata"]["labels"]["tandem.dev/volume-uid"] = json!("someone-else");
    let empty = |path: String, kind: &'static str| Call::get(&path).reply(200, list(kind, vec![]));
    let script = vec![
        // Not ours (another uid): neither waited for nor deleted.
        Call::get(&paths::pv()).reply(200, foreign),
        empty(paths::engine_pods(), "PodList"),
        empty("/api/v1/nodes?".into(), "NodeList"),
        empty(paths::engine_pods(), "PodList"),
        empty(
            format!("/api/v1/namespaces/{OP_NS}/services?"),
            "ServiceList",
        ),
        empty(
            format!("/apis/policy/v1/namespaces/{OP_NS}/poddisruptionbudgets?"),
            "PodDisruptionBudgetList",
        ),
        empty(
            format!("/api/v1/namespaces/{OP_NS}/persistentvolumeclaims?"),
            "PersistentVolumeClaimList",
        ),
        empty(paths::secrets(), "SecretList"),
        Call::patch(&paths::volume()).reply(200, removed),
    ];
    let (result, seen, _) = run(mv, FakeEngines::default(), script).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(seen.calls.iter().all(|c| c.0 != Method::DELETE));
}

#[tokio::test]
async fn a_foreign_pv_is_not_adopted() {
    let mv = MirroredVolume::test().finalized().with_claim("app-data");
    let answer = status_answer(&mv);
    // A PV of this volume's name made by someone else (no owner labels), bound to another claim.
    let mut foreign = pv_json(Some("their-claim"));
    foreign["metadata"]["labels"] = json!({"team": "other"});
    let mut script = observe_calls(true, true, vec![], true, Some(foreign));
    script.push(Call::get(&paths::pvc("app-data")).reply(404, not_found("claim")));
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, _) = run(mv, FakeEngines::default(), script).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(60)));
    // Nothing applied, patched or deleted but the volume's status.
    let writes: Vec<&String> = seen
        .calls
        .iter()
        .filter(|c| c.0 != Method::GET)
        .map(|c| &c.1)
        .collect();
    assert_eq!(writes.len(), 1, "{writes:?}");
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["phase"], "Failed");
    let ready = condition(status, "Ready");
    assert_eq!(ready["reason"], "PersistentVolumeConflict");
    let message = ready["message"].as_str().unwrap();
    assert!(message.contains("tandem.default.data"), "{message}");
    assert!(message.contains("no tandem.dev owner labels"), "{message}");
    assert_eq!(seen.reasons(), vec!["PersistentVolumeConflict"]);
}

#[tokio::test]
async fn a_key_collision_is_refused() {
    let mv = MirroredVolume::test().finalized();
    let answer = status_answer(&mv);
    // An engine pod under this volume's key whose owner labels name another volume.
    let mut theirs = engine_pod_json(Slot::A, "primary", "Running", true, ago(60));
    theirs["metadata"]["labels"]["tandem.dev/volume-namespace"] = json!("tenant-b");
    let mut script = observe_calls(true, true, vec![theirs], true, Some(pv_json(None)));
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, _) = run(mv, FakeEngines::default(), script).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(60)));
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    let ready = condition(status, "Ready");
    assert_eq!(ready["reason"], "NameConflict");
    assert!(ready["message"].as_str().unwrap().contains("tenant-b/data"));
    assert_eq!(
        seen.calls.iter().filter(|c| c.0 != Method::GET).count(),
        1,
        "only the status is written"
    );
}

#[tokio::test]
async fn a_host_path_outside_the_root_is_refused_before_anything_is_read() {
    let mut mv = MirroredVolume::test().finalized();
    mv.spec.engine_storage.host_path = Some("/var/lib/tandem/../../etc".into());
    let answer = status_answer(&mv);
    let script = vec![Call::patch(&paths::status()).check_reply(answer)];
    let (result, seen, _) = run(mv, FakeEngines::default(), script).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(60)));
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["phase"], "Failed");
    let ready = condition(status, "Ready");
    assert_eq!(ready["reason"], "HostPathNotAllowed");
    assert!(ready["message"].as_str().unwrap().contains("\"..\""));
    assert_eq!(seen.reasons(), vec!["HostPathNotAllowed"]);
}

#[tokio::test]
async fn certificates_are_issued_again_when_a_third_is_left() {
    let mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    let engines = FakeEngines::default()
        .with_state(
            &address(Slot::A),
            engine_state(EngineRole::Primary, 1, PairState::Synced),
        )
        .with_state(
            &address(Slot::B),
            engine_state(EngineRole::Secondary, 1, PairState::Unspecified),
        );
    let pods = vec![
        engine_pod_json(Slot::A, "primary", "Running", true, ago(300)),
        engine_pod_json(Slot::B, "secondary", "Running", true, ago(300)),
    ];
    // Slot a's engine certificate has 20 of its 90 days left; the others were just issued.
    let mut secrets = secret_list(true, true);
    let short = crate::plan::EngineConfig {
        cert_validity: Duration::from_secs(20 * 24 * 3600),
        ..Default::default()
    };
    let (minted, _) = crate::certs::mint(
        &mv,
        &crate::plan::CertPlan {
            engine: [true, false],
            csi: false,
        },
        test_ca(),
        &short,
        "secret",
        &["n1".to_string(), "n2".to_string()],
        Default::default(),
    )
    .unwrap();
    secrets["items"][1] = serde_json::to_value(&minted[0]).unwrap();
    let answer = status_answer(&mv);
    let mut script = observe_calls(true, true, pods, false, Some(pv_json(None)));
    script[3] = Call::get(&paths::secrets()).reply(200, secrets);
    script.push(Call::patch(&paths::cert_secret("tls-a")));
    script.extend(service_calls());
    script.push(Call::patch(&paths::engine(Slot::B)));
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, _) = run(mv, engines, script).await;
    result.unwrap();
    let renewed = seen.body(Method::PATCH, &paths::cert_secret("tls-a"));
    let pem = |key: &str| {
        let b64 = renewed["data"][key].as_str().unwrap();
        let bytes: k8s_openapi::ByteString = serde_json::from_value(json!(b64)).unwrap();
        String::from_utf8(bytes.0).unwrap()
    };
    let left = tandem_api::tls::mint::not_after(&pem("tls.crt"))
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left > Duration::from_secs(89 * 24 * 3600), "{left:?}");
    assert_eq!(
        tandem_api::tls::mint::identity_of_pem(&pem("tls.crt")).unwrap(),
        tandem_api::tls::Identity::Engine {
            volume: tandem_api::tls::VolumeRef::new(NS, NAME)
        }
    );
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    // The earliest expiry is now one of the fresh ones, ~90 days out.
    let not_after: k8s_openapi::jiff::Timestamp = status["certificates"]["notAfter"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        not_after.as_second() - k8s_openapi::jiff::Timestamp::now().as_second() > 89 * 24 * 3600
    );
    assert!(seen.reasons().contains(&"CertificatesIssued"));
}

#[tokio::test]
async fn deletion_waits_while_a_claim_uses_the_volume() {
    let mv = MirroredVolume::test().finalized().deleting();
    let claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "app-data", "namespace": "default"}});
    let script = vec![
        Call::get(&paths::pv()).reply(200, pv_json(Some("app-data"))),
        Call::get(&paths::pvc("app-data")).reply(200, claim),
    ];
    let (result, seen, metrics) = run(mv, FakeEngines::default(), script).await;
    let err = result.unwrap_err();
    assert_eq!(err.metric_label(), "finalizer(cleanupfailed(volumeinuse))");
    assert_eq!(seen.reasons(), vec!["WaitingForClaim"]);
    assert_eq!(
        metrics.failure_count("default", "data", "finalizer(cleanupfailed(volumeinuse))"),
        1
    );
}

#[tokio::test]
async fn api_error_fails_the_reconcile_and_counts_the_failure() {
    let mv = MirroredVolume::test().finalized();
    let boom = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500});
    let script = vec![Call::get(&paths::node("n1")).reply(500, boom)];
    let (result, seen, metrics) = run(mv, FakeEngines::default(), script).await;
    let err = result.unwrap_err();
    assert_eq!(err.metric_label(), "finalizer(applyfailed(kube))");
    assert_eq!(
        metrics.failure_count("default", "data", "finalizer(applyfailed(kube))"),
        1
    );
    assert!(seen.events.is_empty());
    let text = metrics.encode().unwrap();
    assert!(text.contains(r#"tandem_operator_reconcile_failures_total{namespace="default",volume="data",error="finalizer(applyfailed(kube))"} 1"#), "{text}");
    assert!(text.contains("tandem_operator_reconciles_total 1"));
}

#[tokio::test]
async fn invalid_size_is_reported_without_touching_children() {
    let mut mv = MirroredVolume::test().finalized();
    mv.spec.size = "8Ki".into();
    let answer = status_answer(&mv);
    let script = vec![Call::patch(&paths::status()).check_reply(answer)];
    let (result, seen, _) = run(mv, FakeEngines::default(), script).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(60)));
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["phase"], "Failed");
    assert_eq!(condition(status, "Ready")["reason"], "InvalidSpec");
    assert_eq!(seen.reasons(), vec!["InvalidSpec"]);
}

#[tokio::test]
async fn blocked_handoff_promotes_nothing_until_the_policy_forces_it() {
    let mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    // The old primary's engine is dead: its pod has been unready for two minutes. Under WaitForPrimary the
    // secondary answers HandoffBlocked and stays secondary.
    let engines = FakeEngines::default()
        .with_state(
            &address(Slot::B),
            engine_state(EngineRole::Secondary, 1, PairState::Consistent),
        )
        .with_blocked_handoff(&address(Slot::B))
        .with_takeover(
            &address(Slot::B),
            TakeoverOutcome {
                epoch: 2,
                lost_blocks: 6,
                lost_seq_from: 41,
                lost_seq_to: 46,
                ..Default::default()
            },
        );
    let pods = || {
        vec![
            engine_pod_json(Slot::A, "primary", "Running", false, ago(120)),
            engine_pod_json(Slot::B, "secondary", "Running", true, ago(300)),
        ]
    };
    let answer = status_answer(&mv);
    let mut script = observe_calls(true, true, pods(), true, Some(pv_json(None)));
    script.extend(service_calls());
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, _) = run(mv.clone(), engines.clone(), script).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(5)));
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["phase"], "TakingOver");
    assert_eq!(status["epoch"], 1, "nothing was promoted");
    assert_eq!(status["primary"]["slot"], "a");
    let t = condition(status, "TakeoverInProgress");
    assert_eq!(
        (&t["status"], &t["reason"]),
        (&json!("True"), &json!("HandoffBlocked"))
    );
    assert!(
        t["message"].as_str().unwrap().contains("PeerUnreachable"),
        "{t}"
    );
    assert_eq!(condition(status, "Degraded")["status"], "True");
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert!(
        seen.reasons().contains(&"HandoffBlocked"),
        "{:?}",
        seen.reasons()
    );

    // The user opts into ForcePromote: the next pass promotes and names what was lost.
    let mut forced = mv.clone();
    forced.spec.failover.policy = FailoverPolicy::ForcePromote;
    forced.status = Some(serde_json::from_value(status.clone()).unwrap());
    let answer = status_answer(&forced);
    let mut script = observe_calls(true, true, pods(), true, Some(pv_json(None)));
    // The stale old primary is restarted (gracefully) so it comes back as secondary.
    script.push(Call::delete(&paths::pod(Slot::A)).check_reply(|body| {
        assert_ne!(body["gracePeriodSeconds"], 0);
        deleted()
    }));
    script.extend(service_calls());
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, _) = run(forced, engines.clone(), script).await;
    result.unwrap();
    assert_eq!(
        engines.calls(),
        vec![
            (address(Slot::B), FailoverPolicy::WaitForPrimary),
            (address(Slot::B), FailoverPolicy::ForcePromote)
        ]
    );
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["epoch"], 2);
    assert_eq!(status["primary"]["slot"], "b");
    assert_eq!(status["takeover"]["lostBlocks"], 6);
    assert_eq!(status["takeover"]["attempts"], 2);
    assert!(status["takeover"]["lastError"].is_null());
    // Nothing to drain after a forced promotion: the pair is degraded until the old primary returns.
    assert_eq!(status["phase"], "Degraded");
    assert_eq!(condition(status, "TakeoverInProgress")["reason"], "Idle");
    assert_eq!(condition(status, "Ready")["status"], "True");
    assert!(seen.reasons().contains(&"RestartAsSecondary"));
}

#[tokio::test]
async fn a_blocked_takeover_is_abandoned_when_the_primary_serves_again() {
    let mut mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    if let Some(s) = mv.status.as_mut() {
        s.takeover = Some(crate::crd::TakeoverStatus {
            reason: "PrimaryUnready".into(),
            from_node: "n1".into(),
            to_node: "n2".into(),
            started_at: Some(ago(60).to_string()),
            attempts: 3,
            last_error: Some("HandoffBlocked: PeerUnreachable: peer a: refused".into()),
            ..Default::default()
        });
        s.phase = Phase::TakingOver;
    }
    // The old primary's container restarted and serves at its epoch again.
    let engines = FakeEngines::default()
        .with_state(
            &address(Slot::A),
            engine_state(EngineRole::Primary, 1, PairState::Synced),
        )
        .with_state(
            &address(Slot::B),
            engine_state(EngineRole::Secondary, 1, PairState::Consistent),
        );
    let pods = vec![
        engine_pod_json(Slot::A, "primary", "Running", true, ago(5)),
        engine_pod_json(Slot::B, "secondary", "Running", true, ago(300)),
    ];
    let answer = status_answer(&mv);
    let mut script = observe_calls(true, true, pods, true, Some(pv_json(None)));
    script.extend(service_calls());
    script.push(Call::patch(&paths::engine(Slot::B)));
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, _) = run(mv, engines.clone(), script).await;
    result.unwrap();
    assert!(engines.calls().is_empty());
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["phase"], "Synced");
    assert_eq!(status["epoch"], 1);
    assert_eq!(condition(status, "TakeoverInProgress")["status"], "False");
    assert!(status["takeover"]["completedAt"].is_string());
    assert!(status["takeover"]["lastError"]
        .as_str()
        .unwrap()
        .contains("abandoned after 3 attempt(s)"));
    assert!(
        seen.reasons().contains(&"TakeoverAbandoned"),
        "{:?}",
        seen.reasons()
    );
}

/// A selector volume: the operator lists the matching nodes and the engine pods, places the pair on the
/// emptiest fitting nodes (not the first by name), and records why in `status.placement`.
#[tokio::test]
async fn a_selector_volume_is_placed_on_the_emptiest_fitting_nodes() {
    let mut mv = MirroredVolume::test().finalized();
    mv.spec.placement = crate::crd::Placement {
        node_selector: Some([("tandem.dev/storage".to_string(), "true".to_string())].into()),
        ..Default::default()
    };
    let answer = status_answer(&mv);
    let mut cordoned = node_json("a0", true);
    cordoned["spec"] = json!({"unschedulable": true});
    let engine_on = |node: &str| json!({"metadata": {"name": format!("x-{node}"), "namespace": OP_NS}, "spec": {"nodeName": node, "containers": []}});
    let mut script = vec![
        Call::get("/api/v1/nodes?").check_reply(|_| {
            list(
                "NodeList",
                vec![
                    cordoned,
                    node_json("n2", true),
                    node_json("z9", true),
                    node_json("n1", true),
                ],
            )
        }),
        Call::get(&paths::engine_pods()).reply(
            200,
            pod_list(vec![engine_on("z9"), engine_on("z9"), engine_on("n2")]),
        ),
    ];
    script.extend(observe_calls(true, true, vec![], true, None));
    script.extend(service_calls());
    script.push(Call::patch(&paths::pod(Slot::A)));
    script.push(Call::patch(&paths::pod(Slot::B)));
    script.push(Call::patch(&format!("{}?", paths::pv())));
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, _) = run(mv, FakeEngines::default(), script).await;
    assert!(result.is_ok(), "{result:?}");
    let lists: Vec<&String> = seen.calls.iter().map(|c| &c.1).take(2).collect();
    assert!(
        lists[0].contains("labelSelector=tandem.dev%2Fstorage%3Dtrue"),
        "{lists:?}"
    );
    assert!(lists[1].contains("tandem.dev%2Fslot"), "{lists:?}");
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["nodes"], json!(["n1", "n2"]));
    assert_eq!(status["placement"]["reason"], "Placed");
    let message = status["placement"]["message"].as_str().unwrap();
    assert!(message.contains("primary on n1 (0 engine(s))"), "{message}");
    let placed = seen.events.iter().find(|e| e.1 == "Placed").unwrap();
    assert!(placed.2.contains("fewest engines"), "{placed:?}");
}

/// No pair fits: nothing is created, the volume waits in Creating with the reason in `status.placement`
/// and the Ready condition, and is looked at again soon.
#[tokio::test]
async fn no_pair_fits_is_reported_and_retried() {
    let mut mv = MirroredVolume::test().finalized();
    mv.spec.placement = crate::crd::Placement {
        node_selector: Some([("tandem.dev/storage".to_string(), "true".to_string())].into()),
        ..Default::default()
    };
    let answer = status_answer(&mv);
    let script = vec![
        Call::get("/api/v1/nodes?").reply(
            200,
            list(
                "NodeList",
                vec![node_json("n1", true), node_json("n2", false)],
            ),
        ),
        Call::get(&paths::engine_pods()).reply(200, pod_list(vec![])),
        Call::patch(&paths::status()).check_reply(answer),
    ];
    let (result, seen, _) = run(mv, FakeEngines::default(), script).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(15)));
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["phase"], "Creating");
    assert_eq!(status["placement"]["reason"], "NoPairFits");
    assert!(
        status["placement"]["message"]
            .as_str()
            .unwrap()
            .contains("n2 (not Ready)"),
        "{status}"
    );
    assert_eq!(condition(status, "Ready")["reason"], "NoPairFits");
    assert_eq!(seen.reasons(), vec!["NoPairFits"]);
}

/// A volume the CSI controller provisioned: no PV and no claim from the operator (the provisioner makes
/// them), and the stage Secret is `tandem-csi-<pv>`, the name its StorageClass asks for.
#[tokio::test]
async fn a_provisioned_volume_gets_no_pv_and_its_named_stage_secret() {
    let mut mv = MirroredVolume::test().finalized().with_claim("ignored");
    mv.spec.persistent_volume_name = Some("pvc-1234".into());
    let answer = status_answer(&mv);
    let provisioned = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": "pvc-1234"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "csi": {"driver": "csi.tandem.dev", "volumeHandle": "default/data"},
            "claimRef": {"namespace": NS, "name": "www-0"}
        }
    });
    let script = vec![
        Call::get(&paths::node("n1")).reply(200, node_json("n1", true)),
        Call::get(&paths::node("n2")).reply(200, node_json("n2", true)),
        Call::get(&paths::engine_pods()).reply(200, pod_list(vec![])),
        Call::get(&paths::secrets()).reply(200, secret_list(true, false)),
        Call::get("/api/v1/persistentvolumes/pvc-1234").reply(200, provisioned),
        Call::get(&paths::pvc("ignored")).reply(404, not_found("claim")),
        Call::patch(&paths::cert_secret("tls-a")),
        Call::patch(&paths::cert_secret("tls-b")),
        Call::patch(&format!(
            "/api/v1/namespaces/{OP_NS}/secrets/tandem-csi-pvc-1234?"
        )),
        Call::patch(&paths::service(Slot::A)),
        Call::patch(&paths::service(Slot::B)),
        Call::patch(&paths::budget()),
        Call::patch(&paths::pod(Slot::A)),
        Call::patch(&paths::pod(Slot::B)),
        Call::patch(&paths::status()).check_reply(answer),
    ];
    let (result, seen, _) = run(mv, FakeEngines::default(), script).await;
    assert!(result.is_ok(), "{result:?}");
    let csi = seen.body(
        Method::PATCH,
        &format!("/api/v1/namespaces/{OP_NS}/secrets/tandem-csi-pvc-1234"),
    );
    assert!(csi["data"]["token"].is_string(), "same content: {csi}");
    assert!(csi["data"]["csi.n1.crt"].is_string(), "{csi}");
    assert_eq!(csi["metadata"]["labels"]["tandem.dev/volume-name"], NAME);
    assert!(
        seen.calls
            .iter()
            .all(|c| !(c.0 == Method::PATCH && c.1.contains("persistentvolume"))),
        "no PV and no claim written"
    );
}

/// A pair serving 1Gi whose spec grew to 2Gi: the operator asks the primary to grow (with the volume
/// token, to the spec's bytes), and `status.capacityBytes` follows what the engines serve. With engines
/// that do not implement Resize yet it says so and changes nothing.
async fn grow_pass(engines: FakeEngines) -> (Value, Seen) {
    let mut mv = MirroredVolume::test().finalized().established(Slot::A, 1);
    mv.spec.size = "2Gi".into();
    mv.status.as_mut().unwrap().capacity_bytes = 1 << 30;
    let pods = vec![
        engine_pod_json(Slot::A, "primary", "Running", true, ago(300)),
        engine_pod_json(Slot::B, "secondary", "Running", true, ago(300)),
    ];
    let answer = status_answer(&mv);
    let mut script = observe_calls(true, true, pods, true, Some(pv_json(None)));
    script.extend(service_calls());
    script.push(Call::patch(&paths::engine(Slot::B)));
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, _) = run(mv, engines, script).await;
    assert!(result.is_ok(), "{result:?}");
    // The PV is not touched while the engines serve less than the spec.
    assert!(!seen
        .calls
        .iter()
        .any(|c| c.0 == Method::PATCH && c.1.starts_with(&paths::pv())));
    let status = seen.body(Method::PATCH, &paths::status())["status"].clone();
    (status, seen)
}

fn serving(role: EngineRole, size: u64) -> crate::engine::EngineState {
    let pair = if role == EngineRole::Primary {
        PairState::Synced
    } else {
        PairState::Unspecified
    };
    crate::engine::EngineState {
        size,
        ..engine_state(role, 1, pair)
    }
}

#[tokio::test]
async fn a_grown_spec_resizes_the_pair_and_reports_the_capacity() {
    let engines = FakeEngines::default()
        .with_state(&address(Slot::A), serving(EngineRole::Primary, 1 << 30))
        .with_state(&address(Slot::B), serving(EngineRole::Secondary, 1 << 30));
    let (status, seen) = grow_pass(engines.clone()).await;
    assert_eq!(
        *engines.resizes.lock().unwrap(),
        vec![(address(Slot::A), 2u64 << 30)]
    );
    assert_eq!(status["capacityBytes"], json!(2u64 << 30));
    assert_eq!(condition(&status, "Expanding")["status"], "False");
    assert_eq!(condition(&status, "Expanding")["reason"], "Resized");
    assert!(seen.reasons().contains(&"Resized"), "{:?}", seen.reasons());
}

#[tokio::test]
async fn engines_without_resize_leave_the_size_waiting_and_say_why() {
    let engines = FakeEngines::default()
        .with_state(&address(Slot::A), serving(EngineRole::Primary, 1 << 30))
        .with_state(&address(Slot::B), serving(EngineRole::Secondary, 1 << 30))
        .old();
    let (status, seen) = grow_pass(engines.clone()).await;
    assert_eq!(engines.resizes.lock().unwrap().len(), 1);
    assert_eq!(status["capacityBytes"], json!(1u64 << 30));
    let c = condition(&status, "Expanding");
    assert_eq!(c["status"], "True");
    assert_eq!(c["reason"], "ResizeNotSupported");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("do not implement online expansion yet"),
        "{c}"
    );
    assert!(seen.reasons().contains(&"ResizeNotSupported"));
}

/// The source volume `default/src` (nodes n2, n1), established with slot a primary.
fn source_volume() -> MirroredVolume {
    let mut src = MirroredVolume::test();
    src.metadata.name = Some("src".into());
    src.metadata.uid = Some("5e5e5e5e-0000-4000-8000-000000000005".into());
    src.status = Some(crate::crd::MirroredVolumeStatus {
        nodes: vec!["n2".into(), "n1".into()],
        primary: MirroredVolume::test()
            .established(Slot::A, 1)
            .status
            .unwrap()
            .primary,
        capacity_bytes: 1 << 30,
        ..Default::default()
    });
    src
}

fn source_address(slot: Slot) -> String {
    crate::plan::engine_address(
        &source_volume(),
        slot,
        &crate::plan::EngineConfig::default(),
    )
}

fn source_calls() -> Vec<Call> {
    let src = source_volume();
    let token = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": crate::plan::names::secret(&crate::plan::key(&src)), "namespace": OP_NS,
            "labels": crate::plan::labels(&src),
        },
        "data": {"token": "c3Jj"}
    });
    vec![
        Call::get(&format!(
            "/apis/tandem.dev/v1alpha1/namespaces/{NS}/mirroredvolumes/src"
        ))
        .reply(200, serde_json::to_value(&src).unwrap()),
        Call::get(&format!(
            "/api/v1/namespaces/{OP_NS}/secrets/{}",
            crate::plan::names::secret(&crate::plan::key(&src))
        ))
        .reply(200, token),
    ]
}

/// A restore from a snapshot: the operator asks both source engines which holds it, finds it on the
/// engine on n1, requires the new primary there, and gives the primary's pod the seed init container
/// reading the source engine's socket; the secondary starts empty. The choice is recorded.
#[tokio::test]
async fn a_snapshot_restore_seeds_the_primary_on_the_snapshot_node() {
    let mut mv = MirroredVolume::test().finalized();
    mv.spec.source = Some(crate::crd::VolumeSource {
        snapshot: Some(crate::crd::SnapshotSource {
            volume: "src".into(),
            id: "s1".into(),
        }),
        volume: None,
    });
    let engines = FakeEngines::default()
        .with_state(&source_address(Slot::A), Default::default())
        .with_state(&source_address(Slot::B), Default::default())
        .with_snapshot(&source_address(Slot::B), "s1", 1 << 30);
    let answer = status_answer(&mv);
    let mut script = source_calls();
    script.extend(observe_calls(true, true, vec![], true, Some(pv_json(None))));
    script.extend(service_calls());
    script.push(Call::patch(&paths::pod(Slot::A)));
    script.push(Call::patch(&paths::pod(Slot::B)));
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, _) = run(mv, engines.clone(), script).await;
    assert!(result.is_ok(), "{result:?}");
    let lists: Vec<String> = engines
        .snapshot_calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.1.clone())
        .collect();
    assert_eq!(
        lists,
        vec![source_address(Slot::A), source_address(Slot::B)]
    );
    let pod_a = seen.body(Method::PATCH, &paths::pod(Slot::A));
    let init = &pod_a["spec"]["initContainers"][0];
    let src_key = crate::plan::names::key(NS, "src");
    assert_eq!(
        init["args"],
        json!([
            "seed",
            "--from",
            "unix:/src/nbd.sock",
            "--export",
            "src@snapshot/s1",
            "--state-dir",
            "/var/lib/tandem/state",
            "--data",
            "/var/lib/tandem/data.img",
            "--volume",
            "data",
            "--size",
            (1u64 << 30).to_string()
        ])
    );
    let source = pod_a["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "source")
        .unwrap();
    assert_eq!(
        source["hostPath"]["path"],
        format!("/run/tandem/volumes/{src_key}")
    );
    assert!(init["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "source" && m["readOnly"] == true));
    let pod_b = seen.body(Method::PATCH, &paths::pod(Slot::B));
    assert!(
        pod_b["spec"].get("initContainers").is_none(),
        "the secondary resyncs"
    );
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(
        status["restore"],
        json!({"volume": "src", "snapshot": "s1", "node": "n1", "clone": false, "done": false, "snapshotDeleted": false})
    );
}

/// A missing snapshot, or engines that cannot list snapshots yet, wait (retried) with a reason; a
/// snapshot on the node placement.nodes does not give the primary is refused the same way.
#[tokio::test]
async fn restores_that_cannot_start_say_why_and_wait() {
    let snapshot_of = |id: &str| {
        let mut mv = MirroredVolume::test().finalized();
        mv.spec.source = Some(crate::crd::VolumeSource {
            snapshot: Some(crate::crd::SnapshotSource {
                volume: "src".into(),
                id: id.into(),
            }),
            volume: None,
        });
        mv
    };
    let cases = [
        (
            "nope",
            FakeEngines::default()
                .with_state(&source_address(Slot::A), Default::default())
                .with_state(&source_address(Slot::B), Default::default()),
            "SnapshotNotFound",
        ),
        (
            "s1",
            FakeEngines::default()
                .with_state(&source_address(Slot::A), Default::default())
                .old(),
            "SnapshotsNotSupported",
        ),
        (
            "s1",
            FakeEngines::default()
                .with_state(&source_address(Slot::A), Default::default())
                .with_snapshot(&source_address(Slot::A), "s1", 1 << 20),
            "SnapshotNodeUnavailable",
        ),
    ];
    for (id, engines, reason) in cases {
        let mv = snapshot_of(id);
        let answer = status_answer(&mv);
        let mut script = source_calls();
        script.push(Call::patch(&paths::status()).check_reply(answer));
        let (result, seen, _) = run(mv, engines, script).await;
        assert_eq!(
            result.unwrap(),
            Action::requeue(Duration::from_secs(15)),
            "{reason}"
        );
        let status = &seen.body(Method::PATCH, &paths::status())["status"];
        assert_eq!(condition(status, "Ready")["reason"], reason, "{status}");
        assert_eq!(status["phase"], "Creating");
    }
    // The source does not exist.
    let mv = snapshot_of("s1");
    let answer = status_answer(&mv);
    let script = vec![
        Call::get(&format!(
            "/apis/tandem.dev/v1alpha1/namespaces/{NS}/mirroredvolumes/src"
        ))
        .reply(404, not_found("mirroredvolume")),
        Call::patch(&paths::status()).check_reply(answer),
    ];
    let (_, seen, _) = run(mv, FakeEngines::default(), script).await;
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(condition(status, "Ready")["reason"], "SourceNotFound");
}

/// A clone: the operator snapshots the source's primary as `clone-<uid>`, restores from it, and deletes
/// that snapshot once the new primary serves.
#[tokio::test]
async fn a_clone_snapshots_the_source_and_deletes_the_snapshot_once_restored() {
    let mut mv = MirroredVolume::test().finalized();
    mv.spec.source = Some(crate::crd::VolumeSource {
        snapshot: None,
        volume: Some("src".into()),
    });
    // The source's primary is slot a on n2: placement.nodes must give the new primary n2.
    mv.spec.placement.nodes = Some(vec!["n2".into(), "n1".into()]);
    let engines = FakeEngines::default()
        .with_state(&source_address(Slot::A), Default::default())
        .with_state(&source_address(Slot::B), Default::default());
    let answer = status_answer(&mv);
    let mut script = source_calls();
    script.extend([
        Call::get(&paths::node("n2")).reply(200, node_json("n2", true)),
        Call::get(&paths::node("n1")).reply(200, node_json("n1", true)),
        Call::get(&paths::engine_pods()).reply(200, pod_list(vec![])),
        Call::get(&paths::secrets()).reply(200, secret_list(true, false)),
        Call::get(&paths::pv()).reply(200, pv_json(None)),
    ]);
    script.extend(cert_calls());
    script.extend(service_calls());
    script.push(Call::patch(&paths::pod(Slot::A)));
    script.push(Call::patch(&paths::pod(Slot::B)));
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, _) = run(mv.clone(), engines.clone(), script).await;
    assert!(result.is_ok(), "{result:?}");
    let id = format!("clone-{}", mv.metadata.uid.clone().unwrap());
    assert_eq!(
        *engines.snapshot_calls.lock().unwrap(),
        vec![("create", source_address(Slot::A), id.clone())]
    );
    let pod_a = seen.body(Method::PATCH, &paths::pod(Slot::A));
    assert_eq!(
        pod_a["spec"]["initContainers"][0]["args"][4],
        format!("src@snapshot/{id}")
    );
    let status = seen.body(Method::PATCH, &paths::status())["status"].clone();
    assert_eq!(status["restore"]["clone"], true);

    // Later: the new primary serves; the clone's snapshot goes, and that is recorded.
    let mut later = mv.clone();
    let mut st = MirroredVolume::test()
        .established(Slot::A, 1)
        .status
        .unwrap();
    st.nodes = vec!["n2".into(), "n1".into()];
    st.restore = serde_json::from_value(status["restore"].clone()).unwrap();
    later.status = Some(st);
    let engines = engines
        .with_state(
            &address(Slot::A),
            engine_state(EngineRole::Primary, 1, PairState::Synced),
        )
        .with_state(
            &address(Slot::B),
            engine_state(EngineRole::Secondary, 1, PairState::Unspecified),
        );
    let answer = status_answer(&later);
    let pods = vec![
        engine_pod_json(Slot::A, "primary", "Running", true, ago(300)),
        engine_pod_json(Slot::B, "secondary", "Running", true, ago(300)),
    ];
    let mut script = vec![
        Call::get(&paths::node("n2")).reply(200, node_json("n2", true)),
        Call::get(&paths::node("n1")).reply(200, node_json("n1", true)),
        Call::get(&paths::engine_pods()).reply(200, pod_list(pods)),
        Call::get(&paths::secrets()).reply(200, secret_list(true, false)),
        Call::get(&paths::pv()).reply(200, pv_json(None)),
    ];
    script.extend(cert_calls());
    script.extend(service_calls());
    script.extend(source_calls());
    script.push(Call::patch(&paths::engine(Slot::B)));
    script.push(Call::patch(&paths::status()).check_reply(answer));
    let (result, seen, _) = run(later, engines.clone(), script).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        engines.snapshot_calls.lock().unwrap().last().unwrap(),
        &("delete", source_address(Slot::A), id)
    );
    let status = &seen.body(Method::PATCH, &paths::status())["status"];
    assert_eq!(status["restore"]["done"], true);
    assert_eq!(status["restore"]["snapshotDeleted"], true);
    assert!(seen.reasons().contains(&"Restored"));
}

/// A clone deleted before it was restored takes its snapshot off the source on the way out.
#[tokio::test]
async fn deleting_an_unfinished_clone_deletes_its_snapshot_on_the_source() {
    let mut mv = MirroredVolume::test().finalized().deleting();
    mv.status = Some(crate::crd::MirroredVolumeStatus {
        restore: Some(crate::crd::RestoreStatus {
            volume: "src".into(),
            snapshot: "clone-x".into(),
            node: "n2".into(),
            clone: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let engines = FakeEngines::default()
        .with_state(&source_address(Slot::A), Default::default())
        .with_snapshot(&source_address(Slot::A), "clone-x", 1 << 20);
    let removed = serde_json::to_value(MirroredVolume::test()).unwrap();
    let mut script = vec![
        Call::get(&paths::pv()).reply(404, not_found("pv")),
        Call::get(&paths::engine_pods()).reply(200, pod_list(vec![])),
    ];
    script.extend(source_calls());
    script.extend(teardown_calls(removed, vec![]));
    let (result, _, _) = run(mv, engines.clone(), script).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(
        *engines.snapshot_calls.lock().unwrap(),
        vec![("delete", source_address(Slot::A), "clone-x".to_string())]
    );
    assert!(engines.snapshots.lock().unwrap()[&source_address(Slot::A)].is_empty());
}
