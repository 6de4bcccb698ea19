//! Every NodeStage/Publish/Unpublish/Unstage/Stats branch, against fake engines, a fake attacher and a
//! fake mounter (paths are real, in a temp dir).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::Code;

use super::*;
use crate::attach::fake::FakeAttacher;
use crate::context::test_context;
use crate::engine::{Credentials, EngineError, EngineStatus, Role, TakeoverOutcome};
use crate::mount::fake::FakeMounter;
use tandem_api::contract::{
    ATTR_FAILOVER_POLICY, ATTR_PEER_TIMEOUT, ATTR_SECONDARY_ACCESS, ATTR_SECONDARY_READ_MODE,
};

type Answer = Result<EngineStatus, EngineError>;

#[derive(Default)]
struct FakeEngines {
    status: Mutex<HashMap<String, Answer>>,
    /// Every takeover asked for: (engine, timeout). The trait has no policy: always a handoff.
    takeovers: Mutex<Vec<(String, Duration)>>,
    takeover_error: Mutex<Option<EngineError>>,
    /// Views each engine holds: (engine, id) → which create made it (1, 2, ...).
    views: Mutex<HashMap<(String, String), u32>>,
    creates: Mutex<u32>,
    /// Every view call: "create engine id" / "delete engine id".
    view_calls: Mutex<Vec<String>>,
    /// Fails the next view calls (create and delete) with this error.
    view_error: Mutex<Option<EngineError>>,
}

impl FakeEngines {
    fn set(&self, addr: &str, a: Answer) {
        self.status.lock().unwrap().insert(addr.into(), a);
    }
    fn views(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self.views.lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    }
    fn view_check(&self, creds: &Credentials) -> Result<(), EngineError> {
        if creds.token != "secret" {
            return Err(EngineError::Unauthenticated {
                addr: "fake".into(),
                message: "bad token".into(),
            });
        }
        match self.view_error.lock().unwrap().clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn engine_down() -> EngineError {
    EngineError::Unreachable {
        addr: A_GRPC.into(),
        message: "down".into(),
    }
}

impl EngineApi for FakeEngines {
    async fn status(&self, addr: &str, volume: &str, creds: &Credentials) -> Answer {
        if creds.token != "secret" {
            return Err(EngineError::Unauthenticated {
                addr: addr.into(),
                message: "bad token".into(),
            });
        }
        if volume != "vol" {
            return Err(EngineError::VolumeUnknown {
                addr: addr.into(),
                volume: volume.into(),
            });
        }
        self.status
            .lock()
            .unwrap()
            .get(addr)
            .cloned()
            .unwrap_or(Err(EngineError::Unreachable {
                addr: addr.into(),
                message: "down".into(),
            }))
    }

    async fn takeover(
        &self,
        addr: &str,
        _volume: &str,
        _creds: &Credentials,
        timeout: Duration,
    ) -> Result<TakeoverOutcome, EngineError> {
        self.takeovers.lock().unwrap().push((addr.into(), timeout));
        if let Some(e) = self.takeover_error.lock().unwrap().clone() {
            return Err(e);
        }
        self.set(
            addr,
            Ok(EngineStatus {
                role: Role::Primary,
                epoch: 8,
            }),
        );
        Ok(TakeoverOutcome {
            epoch: 8,
            ready_ms: 3,
            ..Default::default()
        })
    }

    async fn create_view(
        &self,
        addr: &str,
        _volume: &str,
        creds: &Credentials,
        id: &str,
    ) -> Result<(), EngineError> {
        self.view_calls
            .lock()
            .unwrap()
            .push(format!("create {addr} {id}"));
        self.view_check(creds)?;
        let mut n = self.creates.lock().unwrap();
        *n += 1;
        // Idempotent by id, as the engine's CreateSnapshot.
        self.views
            .lock()
            .unwrap()
            .entry((addr.into(), id.into()))
            .or_insert(*n);
        Ok(())
    }

    async fn delete_view(
        &self,
        addr: &str,
        _volume: &str,
        creds: &Credentials,
        id: &str,
    ) -> Result<bool, EngineError> {
        self.view_calls
            .lock()
            .unwrap()
            .push(format!("delete {addr} {id}"));
        self.view_check(creds)?;
        Ok(self
            .views
            .lock()
            .unwrap()
            .remove(&(addr.to_string(), id.to_string()))
            .is_some())
    }
}

const A_GRPC: &str = "10.0.0.1:7000";
const B_GRPC: &str = "10.0.0.2:7000";

struct Harness {
    svc: NodeService<FakeEngines, FakeAttacher, FakeMounter>,
    dir: tempfile::TempDir,
}

fn primary(epoch: u64) -> Answer {
    Ok(EngineStatus {
        role: Role::Primary,
        epoch,
    })
}
fn secondary(epoch: u64) -> Answer {
    Ok(EngineStatus {
        role: Role::Secondary,
        epoch,
    })
}

impl Harness {
    /// This plugin runs on node-a; node-a's engine is primary, node-b's secondary.
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::open(&dir.path().join("state")).unwrap();
        let engines = FakeEngines::default();
        engines.set(A_GRPC, primary(7));
        engines.set(B_GRPC, secondary(7));
        let svc = NodeService::new(
            "node-a".into(),
            state,
            engines,
            FakeAttacher::default(),
            FakeMounter::default(),
        );
        Harness { svc, dir }
    }
    fn attacher(&self) -> &FakeAttacher {
        &self.svc.inner.attacher
    }
    fn mounter(&self) -> &FakeMounter {
        &self.svc.inner.mounter
    }
    fn engines(&self) -> &FakeEngines {
        &self.svc.engines
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn record(&self) -> Option<VolumeRecord> {
        self.svc.inner.state.load("ns/pv").unwrap()
    }
    fn stage_req(&self, access: Access) -> StageRequest {
        StageRequest {
            volume_id: "ns/pv".into(),
            staging_path: self.path("staging"),
            access,
            read_only: false,
            shared: false,
            token: Some("secret".into()),
            tls: Default::default(),
            context: test_context("vol", &["node-a", "node-b"]),
        }
    }
    fn publish_req(&self, access: Access, target: &str) -> PublishRequest {
        PublishRequest {
            volume_id: "ns/pv".into(),
            staging_path: self.path("staging"),
            target_path: self.path(target),
            access,
            read_only: false,
        }
    }
    async fn stage_ext4(&self) {
        self.svc.stage(self.stage_req(ext4())).await.unwrap();
    }
}

fn ext4() -> Access {
    Access::Mount {
        fs_type: "ext4".into(),
        mount_flags: vec![],
    }
}

fn device_of(rec: &VolumeRecord) -> PathBuf {
    rec.attachment.as_ref().unwrap().device.clone()
}

// ---------- NodeStageVolume ----------

#[tokio::test]
async fn stage_on_the_primary_attaches_formats_and_mounts() {
    let h = Harness::new();
    h.stage_ext4().await;
    let rec = h.record().unwrap();
    assert!(rec.staged);
    assert_eq!(rec.engine_node, "node-a");
    assert_eq!(rec.epoch, 7);
    let dev = device_of(&rec);
    let spec = h.attacher().st.lock().unwrap().attached[&dev].clone();
    assert_eq!(spec.nbd, "10.0.0.1:10809");
    // Pinned to the primary's epoch: the daemon opens (and reopens) exactly this export.
    assert_eq!(spec.export, "vol@7");
    assert_eq!(spec.pinned_epoch, Some(7));
    assert_eq!(rec.attachment.as_ref().unwrap().pinned_epoch, Some(7));
    assert_eq!(spec.key, "ns%2Fpv");
    assert_eq!(
        h.mounter().st.lock().unwrap().mkfs_calls,
        vec![(dev.clone(), "ext4".to_string())]
    );
    assert_eq!(h.mounter().mounted(&h.path("staging")), Some((dev, false)));
    assert!(h.engines().takeovers.lock().unwrap().is_empty());
}

#[tokio::test]
async fn stage_twice_is_a_no_op() {
    let h = Harness::new();
    h.stage_ext4().await;
    h.stage_ext4().await;
    assert_eq!(h.attacher().st.lock().unwrap().attach_calls, 1);
    assert_eq!(h.mounter().mount_count(), 1);
}

#[tokio::test]
async fn stage_keeps_an_existing_filesystem() {
    let h = Harness::new();
    h.mounter()
        .st
        .lock()
        .unwrap()
        .filesystems
        .insert("/dev/fake1".into(), "ext4".into());
    h.stage_ext4().await;
    assert!(h.mounter().st.lock().unwrap().mkfs_calls.is_empty());
    assert!(h.record().unwrap().staged);
}

#[tokio::test]
async fn stage_refuses_to_format_over_another_filesystem_and_detaches() {
    let h = Harness::new();
    h.mounter()
        .st
        .lock()
        .unwrap()
        .filesystems
        .insert("/dev/fake1".into(), "xfs".into());
    let e = h.svc.stage(h.stage_req(ext4())).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.to_string().contains("xfs"), "{e}");
    assert_eq!(h.attacher().attached_count(), 0);
    assert_eq!(h.record(), None);
}

#[tokio::test]
async fn a_failed_mount_detaches_and_forgets() {
    for op in ["mount", "mkfs", "probe"] {
        let h = Harness::new();
        h.mounter().fail(op);
        let e = h.svc.stage(h.stage_req(ext4())).await.unwrap_err();
        assert_eq!(e.code(), Code::Internal, "{op}: {e}");
        assert_eq!(h.attacher().attached_count(), 0, "{op}");
        assert_eq!(h.record(), None, "{op}");
        assert_eq!(h.mounter().mount_count(), 0);
        // The next attempt, with the fault gone, succeeds from scratch.
        h.mounter().heal(op);
        h.stage_ext4().await;
        assert!(h.record().unwrap().staged);
    }
}

#[tokio::test]
async fn a_failed_attach_leaves_nothing() {
    let h = Harness::new();
    h.attacher().fail("attach");
    let e = h.svc.stage(h.stage_req(ext4())).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert_eq!(h.record(), None);
    assert_eq!(h.mounter().mount_count(), 0);
}

#[tokio::test]
async fn stage_on_the_secondarys_node_takes_over_first() {
    let h = Harness::new();
    h.engines().set(A_GRPC, secondary(7));
    h.engines().set(B_GRPC, primary(7));
    let mut req = h.stage_req(ext4());
    req.context
        .insert(ATTR_FAILOVER_POLICY.into(), "ForcePromote".into());
    req.context.insert(ATTR_PEER_TIMEOUT.into(), "5".into());
    h.svc.stage(req).await.unwrap();
    // A handoff (the only kind the engine API offers the plugin), whatever the PV's policy.
    assert_eq!(
        *h.engines().takeovers.lock().unwrap(),
        vec![(A_GRPC.to_string(), Duration::from_secs(5))]
    );
    let rec = h.record().unwrap();
    assert_eq!(rec.epoch, 8);
    assert_eq!(rec.engine_node, "node-a");
    let dev = device_of(&rec);
    let spec = h.attacher().st.lock().unwrap().attached[&dev].clone();
    assert_eq!(spec.nbd, "10.0.0.1:10809");
    // Pinned to the epoch the takeover produced, not the one Status showed before it.
    assert_eq!(spec.export, "vol@8");
}

#[tokio::test]
async fn a_takeover_that_cannot_finish_is_retryable_and_attaches_nothing() {
    let h = Harness::new();
    h.engines().set(A_GRPC, secondary(7));
    *h.engines().takeover_error.lock().unwrap() = Some(EngineError::Refused {
        addr: A_GRPC.into(),
        op: "Takeover",
        code: Code::DeadlineExceeded,
        message: "primary unreachable".into(),
    });
    let e = h.svc.stage(h.stage_req(ext4())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(h.attacher().attached_count(), 0);
    assert_eq!(h.record(), None);
}

#[tokio::test]
async fn stage_never_forces_whatever_the_policy() {
    // The old primary is unreachable: the handoff fails, and a ForcePromote volume gets no
    // forced promotion from the plugin either: UNAVAILABLE, naming the operator's part.
    let h = Harness::new();
    h.engines().set(A_GRPC, secondary(7));
    h.engines().set(
        B_GRPC,
        Err(EngineError::Unreachable {
            addr: B_GRPC.into(),
            message: "down".into(),
        }),
    );
    *h.engines().takeover_error.lock().unwrap() = Some(EngineError::Refused {
        addr: A_GRPC.into(),
        op: "Takeover",
        code: Code::Unavailable,
        message: "HandoffBlocked: the primary did not answer".into(),
    });
    let mut req = h.stage_req(ext4());
    req.context
        .insert(ATTR_FAILOVER_POLICY.into(), "ForcePromote".into());
    let e = h.svc.stage(req).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let msg = e.to_string();
    assert!(msg.contains("HandoffBlocked"), "{msg}");
    assert!(msg.contains("operator promotes"), "{msg}");
    assert!(msg.contains("ForcePromote"), "{msg}");
    assert_eq!(h.engines().takeovers.lock().unwrap().len(), 1);
    assert_eq!(h.attacher().attached_count(), 0);
    assert_eq!(h.record(), None);
}

#[tokio::test]
async fn a_read_only_stage_on_the_secondarys_node_reads_from_the_secondary() {
    let h = Harness::new();
    h.engines().set(A_GRPC, secondary(7));
    h.engines().set(B_GRPC, primary(7));
    h.mounter()
        .st
        .lock()
        .unwrap()
        .filesystems
        .insert("/dev/fake1".into(), "ext4".into());
    let mut req = StageRequest {
        read_only: true,
        ..h.stage_req(ext4())
    };
    req.context
        .insert(ATTR_SECONDARY_ACCESS.into(), "ReadWrite".into());
    req.context
        .insert(ATTR_SECONDARY_READ_MODE.into(), "Current".into());
    h.svc.stage(req.clone()).await.unwrap();
    assert!(h.engines().takeovers.lock().unwrap().is_empty());
    assert!(h.engines().views().is_empty(), "current reads take no view");
    let rec = h.record().unwrap();
    assert_eq!((rec.engine_node.as_str(), rec.epoch), ("node-a", 7));
    let spec = h.attacher().st.lock().unwrap().attached[&device_of(&rec)].clone();
    assert_eq!(spec.nbd, "10.0.0.1:10809");
    assert_eq!(spec.export, "vol@7");
    assert!(spec.read_only);
    // Staged again: still current (the secondary is its source), nothing replaced.
    h.svc.stage(req).await.unwrap();
    assert_eq!(h.attacher().st.lock().unwrap().attach_calls, 1);
    assert!(h.engines().takeovers.lock().unwrap().is_empty());
}

impl Harness {
    /// node-a (this plugin's) holds the secondary; a read-only stage of `access` with
    /// `secondaryAccess: <sa>` and an ext4 already on the device the fake attacher hands out next.
    fn view_req(&self, access: Access, sa: &str) -> StageRequest {
        self.engines().set(A_GRPC, secondary(7));
        self.engines().set(B_GRPC, primary(7));
        let mut st = self.mounter().st.lock().unwrap();
        for n in 1..5 {
            st.filesystems
                .insert(format!("/dev/fake{n}").into(), "ext4".into());
        }
        drop(st);
        let mut req = StageRequest {
            read_only: true,
            ..self.stage_req(access)
        };
        req.context.insert(ATTR_SECONDARY_ACCESS.into(), sa.into());
        req
    }
    fn view_id(&self) -> String {
        view_id("ns/pv", &self.path("staging"))
    }
}

/// Issue 18 (seed 004): a MULTI_NODE_MULTI_WRITER block stage on the secondary's node attaches
/// the secondary read-write at its epoch (its writes are forwarded to the primary) and never
/// takes over; without `secondaryAccess: ReadWrite` it is refused before anything is attached.
#[tokio::test]
async fn a_shared_writer_on_the_secondarys_node_attaches_the_secondary_without_a_takeover() {
    let h = Harness::new();
    let mut req = StageRequest {
        read_only: false,
        shared: true,
        ..h.view_req(Access::Block, "ReadWrite")
    };
    h.svc.stage(req.clone()).await.unwrap();
    assert!(h.engines().takeovers.lock().unwrap().is_empty());
    assert!(h.engines().views().is_empty());
    let rec = h.record().unwrap();
    let spec = h.attacher().st.lock().unwrap().attached[&device_of(&rec)].clone();
    assert_eq!(
        spec.nbd, "10.0.0.1:10809",
        "this node's engine, the secondary"
    );
    assert_eq!(spec.export, "vol@7");
    assert_eq!(spec.pinned_epoch, Some(7));
    assert!(!spec.read_only && !spec.overlay, "{spec:?}");
    // A retried stage keeps it: the secondary is still this staging's source.
    h.svc.stage(req.clone()).await.unwrap();
    assert!(h.engines().takeovers.lock().unwrap().is_empty());

    let h = Harness::new();
    req = StageRequest {
        read_only: false,
        shared: true,
        ..h.view_req(Access::Block, "ReadOnly")
    };
    let e = h.svc.stage(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.to_string().contains("secondaryAccess ReadWrite"), "{e}");
    assert!(h.record().is_none_or(|r| r.attachment.is_none()));
    assert!(h.engines().takeovers.lock().unwrap().is_empty());
}

/// Issue 18: a read-only stage on the secondary's node, ReadOnly or ReadWrite access, takes a
/// view on its own engine (never a takeover), attaches the snapshot export with a writable
/// overlay for the filesystem's journal replay, mounts it `ro`; a retried stage does nothing
/// more; the unstage detaches, then deletes the view.
#[tokio::test]
async fn a_read_only_stage_on_the_secondarys_node_opens_a_view_and_unstage_deletes_it() {
    for sa in ["ReadOnly", "ReadWrite"] {
        let h = Harness::new();
        let req = h.view_req(ext4(), sa);
        h.svc.stage(req.clone()).await.unwrap();
        assert!(h.engines().takeovers.lock().unwrap().is_empty());
        let id = h.view_id();
        assert!(id.starts_with("view-") && id.len() == 21, "{id}");
        assert_eq!(h.engines().views(), vec![(A_GRPC.to_string(), id.clone())]);
        let rec = h.record().unwrap();
        assert!(rec.staged);
        let view = rec.view.clone().unwrap();
        assert_eq!(
            (view.id.as_str(), view.grpc.as_str()),
            (id.as_str(), A_GRPC)
        );
        assert_eq!(view.token, "secret");
        let spec = h.attacher().st.lock().unwrap().attached[&device_of(&rec)].clone();
        assert_eq!(spec.nbd, "10.0.0.1:10809", "{sa}: this node's engine");
        assert_eq!(spec.export, format!("vol@snapshot/{id}"));
        assert_eq!(spec.pinned_epoch, None);
        assert!(spec.overlay && !spec.read_only, "{sa}: {spec:?}");
        let staging = h.path("staging");
        assert_eq!(
            h.mounter().mounted(&staging),
            Some((device_of(&rec), false))
        );
        let opts = h.mounter().st.lock().unwrap().options[&staging].clone();
        assert!(opts.contains(&"ro".to_string()), "{opts:?}");
        assert!(!opts.iter().any(|o| o == "noload"), "{opts:?}");
        assert!(h.mounter().st.lock().unwrap().mkfs_calls.is_empty());

        // Retried, and after a takeover moved the primary here: the same view, untouched.
        h.svc.stage(req.clone()).await.unwrap();
        h.engines().set(A_GRPC, primary(8));
        h.engines().set(
            B_GRPC,
            Ok(EngineStatus {
                role: Role::Fenced,
                epoch: 7,
            }),
        );
        h.svc.stage(req).await.unwrap();
        assert_eq!(h.attacher().st.lock().unwrap().attach_calls, 1);
        assert_eq!(*h.engines().creates.lock().unwrap(), 1);

        h.svc
            .unstage("ns/pv".into(), h.path("staging"))
            .await
            .unwrap();
        assert_eq!(h.attacher().attached_count(), 0);
        assert_eq!(h.mounter().mount_count(), 0);
        assert!(
            h.engines().views().is_empty(),
            "{sa}: the view outlived the unstage"
        );
        assert_eq!(h.record(), None);
    }
}

/// A view staging whose device broke gets a fresh view at the next stage, also when this
/// node's engine was promoted in between (it still holds views); the old one is replaced.
#[tokio::test]
async fn a_broken_view_attachment_is_replaced_by_a_fresh_view() {
    let h = Harness::new();
    let req = h.view_req(ext4(), "ReadOnly");
    h.svc.stage(req.clone()).await.unwrap();
    let dev = device_of(&h.record().unwrap());
    h.attacher().break_device(&dev);
    h.engines().set(A_GRPC, primary(8));
    h.engines().set(
        B_GRPC,
        Ok(EngineStatus {
            role: Role::Fenced,
            epoch: 7,
        }),
    );
    h.svc.stage(req).await.unwrap();
    let rec = h.record().unwrap();
    assert_ne!(device_of(&rec), dev);
    let spec = h.attacher().st.lock().unwrap().attached[&device_of(&rec)].clone();
    assert_eq!(spec.export, format!("vol@snapshot/{}", h.view_id()));
    assert_eq!(*h.engines().creates.lock().unwrap(), 2, "not a fresh view");
    assert_eq!(h.engines().views().len(), 1);
    assert!(h.engines().takeovers.lock().unwrap().is_empty());
}

/// A raw block view is a read-only device (nothing to replay); xfs mounts with `nouuid`.
#[tokio::test]
async fn a_block_view_is_read_only_and_an_xfs_view_mounts_nouuid() {
    let h = Harness::new();
    h.svc
        .stage(h.view_req(Access::Block, "ReadOnly"))
        .await
        .unwrap();
    let rec = h.record().unwrap();
    let spec = h.attacher().st.lock().unwrap().attached[&device_of(&rec)].clone();
    assert!(spec.read_only && !spec.overlay, "{spec:?}");
    h.svc
        .unstage("ns/pv".into(), h.path("staging"))
        .await
        .unwrap();

    let h = Harness::new();
    let xfs = Access::Mount {
        fs_type: "xfs".into(),
        mount_flags: vec![],
    };
    let req = h.view_req(xfs, "ReadOnly");
    h.mounter()
        .st
        .lock()
        .unwrap()
        .filesystems
        .insert("/dev/fake1".into(), "xfs".into());
    h.svc.stage(req).await.unwrap();
    let opts = h.mounter().st.lock().unwrap().options[&h.path("staging")].clone();
    assert!(
        opts.contains(&"ro".into()) && opts.contains(&"nouuid".into()),
        "{opts:?}"
    );
}

/// A stage that fails after the view was taken (mount, attach) deletes it again and leaves no
/// record; a create that fails with the engine down leaves the record for the unstage.
#[tokio::test]
async fn a_view_whose_stage_fails_is_deleted_again() {
    for fail in ["mount", "attach", "create"] {
        let h = Harness::new();
        let req = h.view_req(ext4(), "ReadOnly");
        match fail {
            "mount" => h.mounter().fail("mount"),
            "attach" => h.attacher().fail("attach"),
            _ => *h.engines().view_error.lock().unwrap() = Some(engine_down()),
        }
        let e = h.svc.stage(req).await.unwrap_err();
        if fail == "create" {
            // The engine is down, so the clean-up delete fails too: the record keeps the trail
            // (no attachment), and the unstage kubelet sends deletes the view once it answers.
            assert_eq!(e.code(), Code::Unavailable, "{e}");
            let rec = h.record().unwrap();
            assert!(rec.view.is_some() && rec.attachment.is_none() && !rec.staged);
            *h.engines().view_error.lock().unwrap() = None;
            h.svc
                .unstage("ns/pv".into(), h.path("staging"))
                .await
                .unwrap();
        }
        assert!(h.engines().views().is_empty(), "{fail}: the view stayed");
        assert_eq!(h.attacher().attached_count(), 0, "{fail}");
        assert_eq!(h.record(), None, "{fail}");
    }
}

/// The delete at unstage fails while the engine is down: the unstage fails (kubelet retries),
/// the record keeps the view but not the attachment, and the retry deletes it. A stage at the
/// same path replaces a view left behind rather than reading its old image.
#[tokio::test]
async fn unstage_deletes_the_view_or_fails_and_a_new_stage_replaces_a_leftover() {
    let h = Harness::new();
    let req = h.view_req(ext4(), "ReadOnly");
    h.svc.stage(req.clone()).await.unwrap();
    *h.engines().view_error.lock().unwrap() = Some(engine_down());
    let e = h
        .svc
        .unstage("ns/pv".into(), h.path("staging"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert_eq!(h.attacher().attached_count(), 0);
    let rec = h.record().unwrap();
    assert!(rec.attachment.is_none() && rec.view.is_some());
    assert_eq!(h.engines().views().len(), 1);
    *h.engines().view_error.lock().unwrap() = None;
    h.svc
        .unstage("ns/pv".into(), h.path("staging"))
        .await
        .unwrap();
    assert!(h.engines().views().is_empty());
    assert_eq!(h.record(), None);

    // A leftover view of this path (an unstage that never came): replaced, a fresh image.
    h.engines()
        .views
        .lock()
        .unwrap()
        .insert((A_GRPC.into(), h.view_id()), 0);
    h.svc.stage(req).await.unwrap();
    let made_by = h.engines().views.lock().unwrap()[&(A_GRPC.to_string(), h.view_id())];
    assert!(made_by > 0, "the stage reused an old view");
}

/// A volume the engine no longer knows has no view left to delete: the unstage succeeds.
#[tokio::test]
async fn unstage_of_a_view_whose_volume_is_gone_succeeds() {
    let h = Harness::new();
    h.svc
        .stage(h.view_req(Access::Block, "ReadOnly"))
        .await
        .unwrap();
    *h.engines().view_error.lock().unwrap() = Some(EngineError::VolumeUnknown {
        addr: A_GRPC.into(),
        volume: "vol".into(),
    });
    h.svc
        .unstage("ns/pv".into(), h.path("staging"))
        .await
        .unwrap();
    assert_eq!(h.record(), None);
}

#[tokio::test]
async fn a_read_only_stage_on_the_secondarys_node_without_secondary_reads_is_refused() {
    let h = Harness::new();
    h.engines().set(A_GRPC, secondary(7));
    h.engines().set(B_GRPC, primary(7));
    for access in [ext4(), Access::Block] {
        let req = StageRequest {
            read_only: true,
            ..h.stage_req(access)
        };
        let e = h.svc.stage(req).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(e.to_string().contains("never takes over"), "{e}");
    }
    assert!(h.engines().takeovers.lock().unwrap().is_empty());
    assert_eq!(h.attacher().attached_count(), 0);
    assert_eq!(h.record(), None);
}

#[tokio::test]
async fn a_stage_never_attaches_across_nodes() {
    // A node without an engine of the volume: FAILED_PRECONDITION, nothing attached or taken over.
    let h = Harness::new();
    let mut req = h.stage_req(ext4());
    req.context = test_context("vol", &["node-x", "node-y"]);
    h.engines().set(B_GRPC, primary(9));
    let e = h.svc.stage(req).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(
        e.to_string().contains("holds no engine of this volume"),
        "{e}"
    );
    assert_eq!(h.attacher().attached_count(), 0);
    assert_eq!(h.record(), None);
    assert!(h.engines().takeovers.lock().unwrap().is_empty());
    // This node's engine is down, or fenced, while node-b's serves: UNAVAILABLE until it is back.
    for local in [None, Some(Role::Fenced)] {
        let h = Harness::new();
        h.engines().set(B_GRPC, primary(8));
        match local {
            None => {
                h.engines().status.lock().unwrap().remove(A_GRPC);
            }
            Some(role) => h.engines().set(A_GRPC, Ok(EngineStatus { role, epoch: 7 })),
        }
        for access in [ext4(), Access::Block] {
            let e = h.svc.stage(h.stage_req(access)).await.unwrap_err();
            assert_eq!(e.code(), Code::Unavailable, "{e}");
            assert!(e.to_string().contains("never attached across nodes"), "{e}");
        }
        assert_eq!(h.attacher().attached_count(), 0);
        assert_eq!(h.record(), None);
        assert!(h.engines().takeovers.lock().unwrap().is_empty());
        // Once this node's engine serves again (restarted as primary), the stage attaches to it.
        h.engines().set(A_GRPC, primary(9));
        h.svc.stage(h.stage_req(ext4())).await.unwrap();
        let rec = h.record().unwrap();
        assert_eq!((rec.engine_node.as_str(), rec.epoch), ("node-a", 9));
    }
}

#[tokio::test]
async fn bad_requests_get_csi_codes_and_change_nothing() {
    let h = Harness::new();
    let cases: Vec<(StageRequest, Code)> = vec![
        (
            StageRequest {
                token: Some("wrong".into()),
                ..h.stage_req(ext4())
            },
            Code::Unauthenticated,
        ),
        (
            StageRequest {
                token: None,
                ..h.stage_req(ext4())
            },
            Code::InvalidArgument,
        ),
        (
            StageRequest {
                context: test_context("other-vol", &["node-a", "node-b"]),
                ..h.stage_req(ext4())
            },
            Code::NotFound,
        ),
        (
            StageRequest {
                context: HashMap::new(),
                ..h.stage_req(ext4())
            },
            Code::InvalidArgument,
        ),
    ];
    for (req, code) in cases {
        let e = h.svc.stage(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{e}");
    }
    assert_eq!(h.attacher().st.lock().unwrap().attach_calls, 0);
    assert_eq!(h.record(), None);
    assert_eq!(h.mounter().mount_count(), 0);
}

#[tokio::test]
async fn no_primary_anywhere_is_unavailable() {
    let h = Harness::new();
    h.engines().set(
        A_GRPC,
        Ok(EngineStatus {
            role: Role::Fenced,
            epoch: 3,
        }),
    );
    h.engines().status.lock().unwrap().remove(B_GRPC);
    let e = h.svc.stage(h.stage_req(ext4())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(h.attacher().attached_count(), 0);
}

#[tokio::test]
async fn a_concurrent_call_for_the_same_volume_is_aborted() {
    let h = Harness::new();
    let _busy = h.svc.guard.try_acquire("ns/pv").unwrap();
    for e in [
        h.svc.stage(h.stage_req(ext4())).await.unwrap_err(),
        h.svc
            .unstage("ns/pv".into(), h.path("staging"))
            .await
            .unwrap_err(),
        h.svc.publish(h.publish_req(ext4(), "t")).await.unwrap_err(),
        h.svc
            .unpublish("ns/pv".into(), h.path("t"))
            .await
            .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::Aborted);
    }
    assert_eq!(h.attacher().st.lock().unwrap().attach_calls, 0);
}

#[tokio::test]
async fn staging_again_incompatibly_is_already_exists() {
    let h = Harness::new();
    h.stage_ext4().await;
    let other_path = StageRequest {
        staging_path: h.path("elsewhere"),
        ..h.stage_req(ext4())
    };
    let other_fs = h.stage_req(Access::Mount {
        fs_type: "xfs".into(),
        mount_flags: vec![],
    });
    let block = h.stage_req(Access::Block);
    let ro = StageRequest {
        read_only: true,
        ..h.stage_req(ext4())
    };
    for req in [other_path, other_fs, block, ro] {
        let e = h.svc.stage(req).await.unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    }
    assert_eq!(h.attacher().st.lock().unwrap().attach_calls, 1);
}

#[tokio::test]
async fn a_foreign_mount_at_the_staging_path_is_already_exists() {
    let h = Harness::new();
    std::fs::create_dir_all(h.path("staging")).unwrap();
    h.mounter()
        .st
        .lock()
        .unwrap()
        .mounts
        .insert(h.path("staging"), vec![("/dev/sdz".into(), false)]);
    let e = h.svc.stage(h.stage_req(ext4())).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(h.attacher().st.lock().unwrap().attach_calls, 0);
}

#[tokio::test]
async fn a_broken_attachment_is_replaced_on_the_next_stage() {
    let h = Harness::new();
    h.stage_ext4().await;
    let old = device_of(&h.record().unwrap());
    h.attacher().break_device(&old);
    h.stage_ext4().await;
    let rec = h.record().unwrap();
    let new = device_of(&rec);
    assert_ne!(old, new);
    assert!(rec.staged);
    assert_eq!(h.attacher().attached_count(), 1);
    assert_eq!(h.mounter().mounted(&h.path("staging")), Some((new, false)));
    assert_eq!(h.mounter().mount_count(), 1);
}

// ---------- a repeated NodeStageVolume checks the staging's epoch ----------

#[tokio::test]
async fn a_stale_staging_is_replaced_by_one_at_the_primarys_epoch() {
    let h = Harness::new();
    h.stage_ext4().await;
    let old = device_of(&h.record().unwrap());
    // A takeover by node-b and a failback to node-a since: node-a's engine serves at epoch 9.
    h.engines().set(A_GRPC, primary(9));
    h.engines().set(B_GRPC, secondary(9));
    h.stage_ext4().await;
    let rec = h.record().unwrap();
    let new = device_of(&rec);
    assert_ne!(old, new);
    assert_eq!(
        (rec.engine_node.as_str(), rec.epoch, rec.staged),
        ("node-a", 9, true)
    );
    let st = h.attacher().st.lock().unwrap();
    assert!(
        !st.attached.contains_key(&old),
        "the stale attachment is left"
    );
    assert_eq!(st.attached[&new].export, "vol@9");
    drop(st);
    assert_eq!(h.mounter().mounted(&h.path("staging")), Some((new, false)));
    assert_eq!(h.mounter().mount_count(), 1);
    assert!(h.engines().takeovers.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_stale_staging_on_the_secondarys_node_is_detached_before_the_takeover() {
    let h = Harness::new();
    h.stage_ext4().await;
    let old = device_of(&h.record().unwrap());
    // node-b took over (epoch 8); node-a's engine is its secondary now.
    h.engines().set(A_GRPC, secondary(8));
    h.engines().set(B_GRPC, primary(8));
    h.stage_ext4().await;
    // Staging here again is the failover trigger, as for a first stage.
    assert_eq!(h.engines().takeovers.lock().unwrap().len(), 1);
    let rec = h.record().unwrap();
    assert_eq!((rec.engine_node.as_str(), rec.epoch), ("node-a", 8));
    assert_ne!(device_of(&rec), old);
    assert_eq!(h.attacher().attached_count(), 1);
    let calls = h.mounter().st.lock().unwrap().calls.clone();
    let unmounted = calls.iter().position(|c| c.starts_with("unmount"));
    assert!(
        unmounted.is_some(),
        "the stale staging was not unmounted: {calls:?}"
    );
}

#[tokio::test]
async fn a_stale_staging_still_published_is_aborted_and_left_fenced() {
    let h = Harness::new();
    h.stage_ext4().await;
    h.svc
        .publish(h.publish_req(ext4(), "target"))
        .await
        .unwrap();
    let before = h.record().unwrap();
    h.engines().set(A_GRPC, secondary(8));
    h.engines().set(B_GRPC, primary(8));
    let e = h.svc.stage(h.stage_req(ext4())).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("stale") && msg.contains("epoch 7") && msg.contains("epoch 8"),
        "{msg}"
    );
    assert!(msg.contains("target"), "{msg}");
    // Nothing changed, and no failback was triggered for a pod that runs on a stale staging.
    assert_eq!(h.record().unwrap(), before);
    assert_eq!(h.attacher().st.lock().unwrap().attach_calls, 1);
    assert_eq!(h.mounter().mount_count(), 2);
    assert!(h.engines().takeovers.lock().unwrap().is_empty());
    // Once kubelet unpublished the old pod, the next stage replaces the staging.
    h.svc
        .unpublish("ns/pv".into(), h.path("target"))
        .await
        .unwrap();
    h.stage_ext4().await;
    let rec = h.record().unwrap();
    assert_eq!((rec.epoch, rec.staged), (8, true));
    assert!(rec.publications.is_empty());
    assert_eq!(h.attacher().attached_count(), 1);
    assert_eq!(h.mounter().mount_count(), 1);
}

#[tokio::test]
async fn a_staging_whose_epoch_cannot_be_checked_is_unavailable_and_kept() {
    let h = Harness::new();
    h.stage_ext4().await;
    let before = h.record().unwrap();
    // node-a's engine is fenced and node-b's does not answer: no primary to compare with.
    h.engines().set(
        A_GRPC,
        Ok(EngineStatus {
            role: Role::Fenced,
            epoch: 8,
        }),
    );
    h.engines().status.lock().unwrap().remove(B_GRPC);
    let e = h.svc.stage(h.stage_req(ext4())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert_eq!(h.record().unwrap(), before);
    assert_eq!(h.attacher().attached_count(), 1);
}

#[tokio::test]
async fn a_staging_at_the_same_epoch_on_another_engine_is_stale() {
    let h = Harness::new();
    h.stage_ext4().await;
    // A record from before issue 13, attached across nodes to node-b's engine at the same epoch.
    let mut rec = h.record().unwrap();
    rec.engine_node = "node-b".into();
    h.svc.inner.state.save(&rec).unwrap();
    h.svc.stage(h.stage_req(ext4())).await.unwrap();
    let rec = h.record().unwrap();
    assert_eq!((rec.engine_node.as_str(), rec.epoch), ("node-a", 7));
    let spec = h.attacher().st.lock().unwrap().attached[&device_of(&rec)].clone();
    assert_eq!(
        (spec.nbd.as_str(), spec.export.as_str()),
        ("10.0.0.1:10809", "vol@7")
    );
    assert_eq!(h.attacher().attached_count(), 1);
    assert!(h.engines().takeovers.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_current_staging_from_before_pinning_is_pinned_when_idle_and_kept_when_in_use() {
    let unpin = |h: &Harness| {
        let mut rec = h.record().unwrap();
        let att = rec.attachment.as_mut().unwrap();
        att.export = "vol".into();
        att.pinned_epoch = None;
        h.svc.inner.state.save(&rec).unwrap();
        rec
    };
    // In use: left alone (a running pod keeps its device), and the answer is OK.
    let h = Harness::new();
    h.stage_ext4().await;
    h.svc
        .publish(h.publish_req(ext4(), "target"))
        .await
        .unwrap();
    let legacy = unpin(&h);
    h.stage_ext4().await;
    assert_eq!(h.record().unwrap(), legacy);
    assert_eq!(h.attacher().st.lock().unwrap().attach_calls, 1);
    // Idle: replaced by a pinned attachment.
    let h = Harness::new();
    h.stage_ext4().await;
    unpin(&h);
    h.stage_ext4().await;
    let rec = h.record().unwrap();
    assert_eq!(rec.attachment.as_ref().unwrap().pinned_epoch, Some(7));
    assert_eq!(rec.attachment.as_ref().unwrap().export, "vol@7");
    assert_eq!(h.attacher().attached_count(), 1);
    assert_eq!(h.mounter().mount_count(), 1);
}

#[tokio::test]
async fn an_interrupted_stage_of_a_stale_attachment_attaches_again() {
    let h = Harness::new();
    h.stage_ext4().await;
    h.mounter().unmount(&h.path("staging")).unwrap();
    let mut rec = h.record().unwrap();
    rec.staged = false;
    h.svc.inner.state.save(&rec).unwrap();
    h.engines().set(A_GRPC, primary(9));
    h.stage_ext4().await;
    let rec = h.record().unwrap();
    assert_eq!((rec.epoch, rec.staged), (9, true));
    assert_eq!(h.attacher().st.lock().unwrap().attach_calls, 2);
    assert_eq!(h.attacher().attached_count(), 1);
    assert_eq!(h.mounter().mount_count(), 1);
}

#[tokio::test]
async fn an_interrupted_stage_resumes_at_the_mount() {
    let h = Harness::new();
    h.stage_ext4().await;
    // As if the plugin died after attaching and saving, before mounting.
    h.mounter().unmount(&h.path("staging")).unwrap();
    let mut rec = h.record().unwrap();
    rec.staged = false;
    h.svc.inner.state.save(&rec).unwrap();
    h.stage_ext4().await;
    assert_eq!(h.attacher().st.lock().unwrap().attach_calls, 1);
    assert!(h.record().unwrap().staged);
    assert_eq!(h.mounter().mount_count(), 1);
}

#[tokio::test]
async fn block_stage_attaches_without_mounting() {
    let h = Harness::new();
    h.svc.stage(h.stage_req(Access::Block)).await.unwrap();
    let rec = h.record().unwrap();
    assert!(rec.staged);
    assert_eq!(h.mounter().mount_count(), 0);
    assert!(h.mounter().st.lock().unwrap().mkfs_calls.is_empty());
    h.svc.stage(h.stage_req(Access::Block)).await.unwrap();
    assert_eq!(h.attacher().st.lock().unwrap().attach_calls, 1);
}

#[tokio::test]
async fn a_blank_volume_staged_read_only_is_not_formatted() {
    let h = Harness::new();
    let req = StageRequest {
        read_only: true,
        ..h.stage_req(ext4())
    };
    let e = h.svc.stage(req).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(h.mounter().st.lock().unwrap().mkfs_calls.is_empty());
    assert_eq!(h.attacher().attached_count(), 0);
}

#[tokio::test]
async fn read_only_stage_of_a_formatted_volume_mounts_ro() {
    let h = Harness::new();
    h.mounter()
        .st
        .lock()
        .unwrap()
        .filesystems
        .insert("/dev/fake1".into(), "ext4".into());
    let req = StageRequest {
        read_only: true,
        ..h.stage_req(ext4())
    };
    h.svc.stage(req).await.unwrap();
    assert!(h.attacher().st.lock().unwrap().attached[&PathBuf::from("/dev/fake1")].read_only);
}

// ---------- NodePublishVolume ----------

#[tokio::test]
async fn publish_binds_the_staging_mount_and_is_idempotent() {
    let h = Harness::new();
    h.stage_ext4().await;
    h.svc
        .publish(h.publish_req(ext4(), "target"))
        .await
        .unwrap();
    assert!(h.path("target").is_dir());
    assert_eq!(
        h.mounter().mounted(&h.path("target")),
        Some((h.path("staging"), false))
    );
    h.svc
        .publish(h.publish_req(ext4(), "target"))
        .await
        .unwrap();
    assert_eq!(h.mounter().mount_count(), 2);
    let rec = h.record().unwrap();
    assert_eq!(rec.publications.len(), 1);
}

#[tokio::test]
async fn publish_read_only_binds_read_only_and_a_flip_is_already_exists() {
    let h = Harness::new();
    h.stage_ext4().await;
    let ro = PublishRequest {
        read_only: true,
        ..h.publish_req(ext4(), "target")
    };
    h.svc.publish(ro).await.unwrap();
    assert_eq!(
        h.mounter().mounted(&h.path("target")),
        Some((h.path("staging"), true))
    );
    let e = h
        .svc
        .publish(h.publish_req(ext4(), "target"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn publish_block_binds_the_device_onto_a_file() {
    let h = Harness::new();
    h.svc.stage(h.stage_req(Access::Block)).await.unwrap();
    h.svc
        .publish(h.publish_req(Access::Block, "dev-file"))
        .await
        .unwrap();
    assert!(h.path("dev-file").is_file());
    let dev = device_of(&h.record().unwrap());
    assert_eq!(h.mounter().mounted(&h.path("dev-file")), Some((dev, false)));
}

#[tokio::test]
async fn publish_without_staging_is_failed_precondition() {
    let h = Harness::new();
    let e = h
        .svc
        .publish(h.publish_req(ext4(), "target"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    h.stage_ext4().await;
    let wrong_staging = PublishRequest {
        staging_path: h.path("other-staging"),
        ..h.publish_req(ext4(), "target")
    };
    let e = h.svc.publish(wrong_staging).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let wrong_kind = h.publish_req(Access::Block, "target");
    let e = h.svc.publish(wrong_kind).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(!h.path("target").exists());
}

#[tokio::test]
async fn publish_over_a_foreign_mount_is_already_exists() {
    let h = Harness::new();
    h.stage_ext4().await;
    std::fs::create_dir_all(h.path("target")).unwrap();
    h.mounter()
        .st
        .lock()
        .unwrap()
        .mounts
        .insert(h.path("target"), vec![("/somewhere".into(), false)]);
    let e = h
        .svc
        .publish(h.publish_req(ext4(), "target"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn a_failed_bind_removes_the_target_it_created() {
    let h = Harness::new();
    h.stage_ext4().await;
    h.mounter().fail("bind");
    let e = h
        .svc
        .publish(h.publish_req(ext4(), "target"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(!h.path("target").exists());
    assert!(h.record().unwrap().publications.is_empty());
}

// ---------- NodeUnpublishVolume ----------

#[tokio::test]
async fn unpublish_unmounts_and_removes_the_target() {
    for (access, target) in [(ext4(), "t-dir"), (Access::Block, "t-file")] {
        let h = Harness::new();
        h.svc.stage(h.stage_req(access.clone())).await.unwrap();
        h.svc.publish(h.publish_req(access, target)).await.unwrap();
        h.svc
            .unpublish("ns/pv".into(), h.path(target))
            .await
            .unwrap();
        assert!(!h.path(target).exists());
        assert_eq!(h.mounter().mounted(&h.path(target)), None);
        assert!(h.record().unwrap().publications.is_empty());
        // Again: nothing published there, OK.
        h.svc
            .unpublish("ns/pv".into(), h.path(target))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn unpublish_of_an_unknown_volume() {
    let h = Harness::new();
    h.svc
        .unpublish("ns/none".into(), h.path("t"))
        .await
        .unwrap();
    std::fs::create_dir_all(h.path("t")).unwrap();
    h.mounter()
        .st
        .lock()
        .unwrap()
        .mounts
        .insert(h.path("t"), vec![("/x".into(), false)]);
    let e = h
        .svc
        .unpublish("ns/none".into(), h.path("t"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(h.mounter().mounted(&h.path("t")).is_some(), "left alone");
}

// ---------- NodeUnstageVolume ----------

#[tokio::test]
async fn unstage_unmounts_detaches_and_forgets() {
    let h = Harness::new();
    h.stage_ext4().await;
    h.svc
        .unstage("ns/pv".into(), h.path("staging"))
        .await
        .unwrap();
    assert_eq!(h.mounter().mount_count(), 0);
    assert_eq!(h.attacher().attached_count(), 0);
    assert_eq!(h.record(), None);
    h.svc
        .unstage("ns/pv".into(), h.path("staging"))
        .await
        .unwrap();
}

#[tokio::test]
async fn unstage_at_another_path_changes_nothing() {
    let h = Harness::new();
    h.stage_ext4().await;
    h.svc
        .unstage("ns/pv".into(), h.path("other"))
        .await
        .unwrap();
    assert!(h.record().is_some());
    assert_eq!(h.attacher().attached_count(), 1);
}

#[tokio::test]
async fn unstage_while_published_is_failed_precondition() {
    let h = Harness::new();
    h.stage_ext4().await;
    h.svc
        .publish(h.publish_req(ext4(), "target"))
        .await
        .unwrap();
    let e = h
        .svc
        .unstage("ns/pv".into(), h.path("staging"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(h.attacher().attached_count(), 1);
}

#[tokio::test]
async fn a_failed_detach_keeps_the_record_for_the_retry() {
    let h = Harness::new();
    h.svc.stage(h.stage_req(Access::Block)).await.unwrap();
    h.attacher().fail("detach");
    let e = h
        .svc
        .unstage("ns/pv".into(), h.path("staging"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(h.record().is_some());
    h.attacher().st.lock().unwrap().fail.clear();
    h.svc
        .unstage("ns/pv".into(), h.path("staging"))
        .await
        .unwrap();
    assert_eq!(h.record(), None);
}

// ---------- NodeGetVolumeStats ----------

#[tokio::test]
async fn stats_for_filesystem_and_block_volumes() {
    let h = Harness::new();
    h.stage_ext4().await;
    h.svc
        .publish(h.publish_req(ext4(), "target"))
        .await
        .unwrap();
    let s = h.svc.stats("ns/pv".into(), h.path("target")).await.unwrap();
    assert_eq!(s.abnormal, None);
    assert_eq!(s.usage.len(), 2);
    assert!(s.usage[0].unit_bytes && s.usage[0].total == 1000 && s.usage[0].used == 400);
    assert!(!s.usage[1].unit_bytes && s.usage[1].total == 100);

    let h = Harness::new();
    h.svc.stage(h.stage_req(Access::Block)).await.unwrap();
    h.svc
        .publish(h.publish_req(Access::Block, "dev"))
        .await
        .unwrap();
    let s = h.svc.stats("ns/pv".into(), h.path("dev")).await.unwrap();
    assert_eq!(s.usage.len(), 1);
    assert_eq!(s.usage[0].total, 1 << 30);
}

#[tokio::test]
async fn stats_errors_and_conditions() {
    let h = Harness::new();
    let e = h
        .svc
        .stats("ns/pv".into(), h.path("target"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    h.stage_ext4().await;
    let e = h
        .svc
        .stats("ns/pv".into(), h.path("unrelated"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let dev = device_of(&h.record().unwrap());
    h.attacher().break_device(&dev);
    let s = h
        .svc
        .stats("ns/pv".into(), h.path("staging"))
        .await
        .unwrap();
    assert!(s.abnormal.is_some());
}

// ---------- restart ----------

#[tokio::test]
async fn recovery_cleans_leftovers_that_no_record_claims() {
    let h = Harness::new();
    h.stage_ext4().await;
    h.attacher()
        .st
        .lock()
        .unwrap()
        .leftovers
        .push("ns%2Fcrashed".into());
    h.svc.recover().await.unwrap();
    assert_eq!(
        h.attacher().st.lock().unwrap().cleaned,
        vec!["ns%2Fcrashed".to_string()]
    );
    assert!(h.record().unwrap().staged);
}

#[tokio::test]
async fn a_new_service_on_the_same_state_dir_keeps_serving() {
    let h = Harness::new();
    h.stage_ext4().await;
    h.svc
        .publish(h.publish_req(ext4(), "target"))
        .await
        .unwrap();
    // A second service instance over the same state and the same (still attached) world.
    let state = StateStore::open(&h.dir.path().join("state")).unwrap();
    let restarted = NodeService {
        inner: Arc::new(Inner {
            node_id: "node-a".into(),
            state,
            attacher: FakeAttacher {
                st: Mutex::new(std::mem::take(&mut *h.attacher().st.lock().unwrap())),
            },
            mounter: FakeMounter {
                st: Mutex::new(std::mem::take(&mut *h.mounter().st.lock().unwrap())),
            },
        }),
        engines: FakeEngines::default(), // engines unreachable for now
        guard: OpGuard::default(),
    };
    restarted.recover().await.unwrap();
    // A repeated stage checks the staging's epoch: with no engine answering it cannot, so it is
    // retryable and changes nothing.
    let e = restarted.stage(h.stage_req(ext4())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert_eq!(restarted.inner.attacher.attached_count(), 1);
    assert_eq!(restarted.inner.mounter.mount_count(), 2);
    restarted.engines.set(A_GRPC, primary(7));
    restarted.stage(h.stage_req(ext4())).await.unwrap();
    assert_eq!(restarted.inner.attacher.st.lock().unwrap().attach_calls, 1);
    restarted
        .publish(h.publish_req(ext4(), "target"))
        .await
        .unwrap();
    restarted
        .unpublish("ns/pv".into(), h.path("target"))
        .await
        .unwrap();
    restarted
        .unstage("ns/pv".into(), h.path("staging"))
        .await
        .unwrap();
    assert_eq!(restarted.inner.attacher.attached_count(), 0);
    assert_eq!(restarted.inner.mounter.mount_count(), 0);
}

// ---------- NodeExpandVolume ----------

const GIB: u64 = 1 << 30;

fn expand_req(h: &Harness, path: &str, required: u64) -> ExpandRequest {
    ExpandRequest {
        volume_id: "ns/pv".into(),
        volume_path: h.path(path),
        required_bytes: required,
    }
}

#[tokio::test]
async fn expand_grows_the_device_then_the_mounted_filesystem_and_is_idempotent() {
    let h = Harness::new();
    h.stage_ext4().await;
    let dev = device_of(&h.record().unwrap());
    h.attacher().st.lock().unwrap().export_size = 4 * GIB;
    assert_eq!(
        h.svc
            .expand(expand_req(&h, "staging", 4 * GIB))
            .await
            .unwrap(),
        4 * GIB
    );
    assert_eq!(h.attacher().st.lock().unwrap().sizes[&dev], 4 * GIB);
    let grown = h.mounter().st.lock().unwrap().grown.clone();
    assert_eq!(grown, vec![(dev.clone(), h.path("staging"), "ext4".into())]);
    // Again (kubelet retries after a lost answer): the same answer, the grow is a no-op for the tools.
    assert_eq!(
        h.svc
            .expand(expand_req(&h, "staging", 4 * GIB))
            .await
            .unwrap(),
        4 * GIB
    );
    // Through a publication's path, and without a capacity range: whatever the engine serves.
    h.svc
        .publish(h.publish_req(ext4(), "target"))
        .await
        .unwrap();
    assert_eq!(
        h.svc.expand(expand_req(&h, "target", 0)).await.unwrap(),
        4 * GIB
    );
    assert_eq!(h.mounter().st.lock().unwrap().grown.len(), 3);
}

#[tokio::test]
async fn expand_before_the_engine_grew_is_unavailable_and_grows_nothing() {
    let h = Harness::new();
    h.stage_ext4().await;
    h.attacher().st.lock().unwrap().export_size = GIB;
    let e = h
        .svc
        .expand(expand_req(&h, "staging", 2 * GIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.to_string().contains("not yet"), "{e}");
    assert!(h.mounter().st.lock().unwrap().grown.is_empty());
}

#[tokio::test]
async fn expand_grows_xfs_through_its_mount_point_and_block_volumes_not_at_all() {
    let h = Harness::new();
    h.mounter()
        .st
        .lock()
        .unwrap()
        .filesystems
        .insert("/dev/fake1".into(), "xfs".into());
    let xfs = Access::Mount {
        fs_type: "xfs".into(),
        mount_flags: vec![],
    };
    h.svc.stage(h.stage_req(xfs)).await.unwrap();
    h.attacher().st.lock().unwrap().export_size = 2 * GIB;
    h.svc
        .expand(expand_req(&h, "staging", 2 * GIB))
        .await
        .unwrap();
    assert_eq!(
        h.mounter().st.lock().unwrap().grown,
        vec![("/dev/fake1".into(), h.path("staging"), "xfs".into())]
    );

    let b = Harness::new();
    b.svc.stage(b.stage_req(Access::Block)).await.unwrap();
    b.attacher().st.lock().unwrap().export_size = 2 * GIB;
    assert_eq!(
        b.svc
            .expand(expand_req(&b, "staging", 2 * GIB))
            .await
            .unwrap(),
        2 * GIB
    );
    assert!(b.mounter().st.lock().unwrap().grown.is_empty());
    assert_eq!(b.mounter().mount_count(), 0);
}

#[tokio::test]
async fn expand_of_unknown_volumes_paths_and_failed_grows_gets_csi_codes() {
    let h = Harness::new();
    let e = h
        .svc
        .expand(expand_req(&h, "staging", GIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    h.stage_ext4().await;
    let e = h
        .svc
        .expand(expand_req(&h, "elsewhere", GIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    h.attacher().st.lock().unwrap().export_size = 2 * GIB;
    h.attacher().fail("expand");
    let e = h
        .svc
        .expand(expand_req(&h, "staging", 2 * GIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(h.mounter().st.lock().unwrap().grown.is_empty());
    h.attacher().st.lock().unwrap().fail.clear();
    h.mounter().fail("grow_fs");
    let e = h
        .svc
        .expand(expand_req(&h, "staging", 2 * GIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    // Healed, the retry finishes the job.
    h.mounter().heal("grow_fs");
    h.svc
        .expand(expand_req(&h, "staging", 2 * GIB))
        .await
        .unwrap();
    assert_eq!(h.mounter().st.lock().unwrap().grown.len(), 1);
}

#[tokio::test]
async fn a_read_only_staging_grows_its_device_but_not_the_filesystem() {
    let h = Harness::new();
    h.mounter()
        .st
        .lock()
        .unwrap()
        .filesystems
        .insert("/dev/fake1".into(), "ext4".into());
    let req = StageRequest {
        read_only: true,
        ..h.stage_req(ext4())
    };
    h.svc.stage(req).await.unwrap();
    h.attacher().st.lock().unwrap().export_size = 2 * GIB;
    assert_eq!(
        h.svc
            .expand(expand_req(&h, "staging", 2 * GIB))
            .await
            .unwrap(),
        2 * GIB
    );
    assert!(h.mounter().st.lock().unwrap().grown.is_empty());
}

#[tokio::test]
async fn an_online_grow_refused_for_privilege_is_a_precondition_naming_the_next_stage() {
    let h = Harness::new();
    h.stage_ext4().await;
    h.attacher().st.lock().unwrap().export_size = 2 * GIB;
    h.mounter().fail("grow_fs_eperm");
    let e = h
        .svc
        .expand(expand_req(&h, "staging", 2 * GIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("next stage"), "{e}");
}

// ---------- growth at NodeStageVolume ----------

fn with_fs(h: &Harness, fs: &str, smaller: bool) {
    let mut st = h.mounter().st.lock().unwrap();
    st.filesystems.insert("/dev/fake1".into(), fs.into());
    if smaller {
        st.smaller.insert("/dev/fake1".into());
    }
}

#[tokio::test]
async fn stage_grows_a_smaller_ext4_offline_before_mounting() {
    let h = Harness::new();
    with_fs(&h, "ext4", true);
    h.stage_ext4().await;
    let st = h.mounter().st.lock().unwrap();
    assert_eq!(
        st.grown_offline,
        vec![("/dev/fake1".into(), "ext4".to_string())]
    );
    assert!(st.grown.is_empty());
    let grow = st.calls.iter().position(|c| c == "grow_fs_offline");
    let mount = st.calls.iter().position(|c| c == "mount");
    assert!(grow < mount, "{:?}", st.calls);
    drop(st);
    assert!(h.record().unwrap().staged);
}

#[tokio::test]
async fn stage_grows_a_smaller_xfs_once_mounted() {
    let h = Harness::new();
    with_fs(&h, "xfs", true);
    let xfs = Access::Mount {
        fs_type: "xfs".into(),
        mount_flags: vec![],
    };
    h.svc.stage(h.stage_req(xfs)).await.unwrap();
    let st = h.mounter().st.lock().unwrap();
    assert_eq!(
        st.grown,
        vec![("/dev/fake1".into(), h.path("staging"), "xfs".into())]
    );
    assert!(st.grown_offline.is_empty());
}

#[tokio::test]
async fn stage_does_not_grow_a_filesystem_that_fills_the_device() {
    let h = Harness::new();
    with_fs(&h, "ext4", false);
    h.stage_ext4().await;
    let st = h.mounter().st.lock().unwrap();
    assert!(st.grown_offline.is_empty() && st.grown.is_empty());
    assert!(st.calls.iter().any(|c| c == "fs_smaller_than_device"));
}

#[tokio::test]
async fn a_read_only_stage_never_grows_the_filesystem() {
    let h = Harness::new();
    with_fs(&h, "ext4", true);
    let req = StageRequest {
        read_only: true,
        ..h.stage_req(ext4())
    };
    h.svc.stage(req).await.unwrap();
    let st = h.mounter().st.lock().unwrap();
    assert!(st.grown_offline.is_empty() && st.grown.is_empty());
    assert!(!st.calls.iter().any(|c| c == "fs_smaller_than_device"));
}

#[tokio::test]
async fn a_failed_grow_at_stage_fails_the_stage_and_detaches() {
    for (fs, op) in [("ext4", "grow_fs_offline"), ("xfs", "grow_fs")] {
        let h = Harness::new();
        with_fs(&h, fs, true);
        h.mounter().fail(op);
        let access = Access::Mount {
            fs_type: fs.into(),
            mount_flags: vec![],
        };
        let e = h.svc.stage(h.stage_req(access)).await.unwrap_err();
        assert_eq!(e.code(), Code::Internal, "{fs}: {e}");
        assert_eq!(h.mounter().mount_count(), 0, "{fs}");
        assert_eq!(h.attacher().attached_count(), 0, "{fs}");
        assert_eq!(h.record(), None, "{fs}");
    }
}
