//! The Node service's logic, free of gRPC and prost types: requests come in as checked domain values
//! (see `service.rs` for the conversion), every side effect goes through [`EngineApi`], [`Attacher`] and
//! [`Mounter`], and the state store remembers what this plugin did.
//!
//! Idempotency comes from observing: a repeated call looks at the state record and at the kernel's mount
//! table, and does only what is missing. Every operation holds the volume's [`OpGuard`] token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::attach::{pinned_export, AttachSpec, Attacher, Health};
use crate::context::{EngineRef, SecondaryAccess, SecondaryReadMode, VolumeParams};
use crate::engine::{current_source, plan, EngineApi, EngineError, Plan, SecondaryRead, Want};
use crate::error::{Error, Result};
use crate::mount::{MountState, Mounter};
use crate::state::{escape_id, Access, OpGuard, Publication, StateStore, ViewRecord, VolumeRecord};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub access: Access,
    pub read_only: bool,
    /// MULTI_NODE_MULTI_WRITER (raw block only): writers on both nodes at once. On the
    /// secondary's node its writes are forwarded to the primary; it never takes over.
    pub shared: bool,
    pub token: Option<String>,
    /// Mutual TLS material from the secrets (issue 13); empty: plaintext.
    pub tls: crate::engine::TlsSecrets,
    pub context: HashMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub target_path: PathBuf,
    pub access: Access,
    pub read_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpandRequest {
    pub volume_id: String,
    /// The staging path or a publication's target.
    pub volume_path: PathBuf,
    /// The size the CO asks for; 0: whatever the engine serves now.
    pub required_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeUsage {
    pub unit_bytes: bool,
    pub total: u64,
    pub available: u64,
    pub used: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeStats {
    pub usage: Vec<VolumeUsage>,
    /// `Some(message)` when the volume is abnormal.
    pub abnormal: Option<String>,
}

struct Inner<A, M> {
    node_id: String,
    state: StateStore,
    attacher: A,
    mounter: M,
}

/// The node plugin's logic.
pub struct NodeService<E, A, M> {
    inner: Arc<Inner<A, M>>,
    engines: E,
    guard: OpGuard,
}

async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    // Keep the caller's span (it carries the volume id) on the worker thread.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| Error::Internal(format!("worker thread: {e}")))?
}

enum Resume {
    /// Already staged (if the staging's epoch is still the primary's), nothing to do.
    Done(VolumeRecord),
    /// Attached; the mount step is missing.
    Mount(VolumeRecord),
    /// Needs an attachment (a record may exist whose attachment was torn down).
    Attach(Option<VolumeRecord>),
}

enum Retired {
    /// Still in use and current: left as it is.
    Kept(VolumeRecord),
    /// Unmounted and detached: attach afresh.
    Detached(VolumeRecord),
}

impl<E: EngineApi, A: Attacher, M: Mounter> NodeService<E, A, M> {
    pub fn new(node_id: String, state: StateStore, engines: E, attacher: A, mounter: M) -> Self {
        NodeService {
            inner: Arc::new(Inner {
                node_id,
                state,
                attacher,
                mounter,
            }),
            engines,
            guard: OpGuard::default(),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// NodeStageVolume. CSI: the plugin MUST make the volume available at the staging path (here: a
    /// block device attached to the current primary, which is always this node's engine; for mount
    /// volumes, a filesystem mounted there);
    /// MUST be idempotent (OK if already staged there with a compatible capability, ALREADY_EXISTS if
    /// staged incompatibly); NOT_FOUND if the volume does not exist; ABORTED while another call for the
    /// volume runs. Tandem: if this node's engine is the secondary, a writable stage here is the
    /// failover trigger: a takeover by handoff first (never forced: an unreachable old primary is
    /// UNAVAILABLE, and the operator promotes per the volume's policy), answer only when this engine
    /// serves I/O. A read-only stage (reader access mode or `ro` mount flag) never takes over: on
    /// the secondary's node it opens a point-in-time view there when the volume says
    /// `secondaryAccess: ReadOnly` or `ReadWrite` (see [`Self::attach_view`]), or attaches the live
    /// secondary read-only with `ReadWrite` and read mode `Current`; with `None` it is
    /// FAILED_PRECONDITION. Any other attachment is pinned to the epoch of the engine it reads
    /// (`<volume>@<epoch>`), so it never reconnects into a later epoch.
    /// NBD never crosses nodes (issue 13): the plugin attaches only to its own node's engine, over
    /// the engine's unix socket. When the volume is served from another node, the stage is
    /// UNAVAILABLE if this node's engine is down, fenced or behind (kubelet retries until it
    /// serves, or until a takeover can move the volume here) and FAILED_PRECONDITION if this node
    /// holds no engine of the volume.
    ///
    /// A repeated call checks the staging against the current primary (Status only): same engine
    /// and epoch → OK as it is. Otherwise the staging is stale (a takeover happened since): with
    /// no publication mounted it is unmounted, detached and staged afresh (a takeover included, as
    /// for a first stage); with one still mounted it is ABORTED and left alone (its I/O fails: the
    /// engine refuses its pinned export), so kubelet retries and unstages it once the pod is gone.
    /// No primary to compare with → UNAVAILABLE.
    pub async fn stage(&self, req: StageRequest) -> Result<()> {
        let _token = self.guard.try_acquire(&req.volume_id)?;
        let params = VolumeParams::parse(&req.context)?;
        let secret = req
            .token
            .clone()
            .filter(|t| !t.trim().is_empty())
            .ok_or(Error::FieldMissing("secrets.token"))?;
        let secret = crate::engine::Credentials {
            token: secret,
            tls: req
                .tls
                .client(self.node_id())
                .map_err(|e| Error::invalid("secrets", e))?,
        };

        let inner = self.inner.clone();
        let (r, volume) = (req.clone(), params.volume.clone());
        let resume = blocking(move || inner.stage_resume(&r, &volume)).await?;
        let (rec, done) = match resume {
            Resume::Attach(existing) => return self.attach(req, params, existing, &secret).await,
            Resume::Done(rec) => (rec, true),
            Resume::Mount(rec) => (rec, false),
        };
        if rec.view.is_some() {
            // A view is a frozen image on this node's engine: a takeover since changes nothing
            // it shows, so there is no epoch to check.
            let inner = self.inner.clone();
            return if done {
                tracing::info!("already staged (point-in-time view)");
                Ok(())
            } else {
                blocking(move || inner.finish_stage(rec)).await
            };
        }
        // An existing attachment is only as good as its epoch: check it against the primary now
        // (Status only; nothing is taken over for a staging that might be stale and in use).
        let want = want(&req, &params)?;
        let answers = self.statuses(&params, &secret).await;
        let (primary, epoch) = current_source(self.node_id(), &answers, want)?;
        let current = rec.engine_node == primary.node && rec.epoch == epoch;
        let pinned = rec
            .attachment
            .as_ref()
            .is_some_and(|a| a.pinned_epoch == Some(rec.epoch));
        let rec = if current && pinned {
            rec
        } else {
            let why = if current {
                format!(
                    "the attachment to {}'s engine at epoch {} predates epoch pinning",
                    rec.engine_node, rec.epoch
                )
            } else {
                format!(
                    "staged on {}'s engine at epoch {}, but the primary is now {}'s engine at \
                     epoch {} (a takeover happened since)",
                    rec.engine_node, rec.epoch, primary.node, epoch
                )
            };
            let inner = self.inner.clone();
            match blocking(move || inner.retire(rec, &why, current)).await? {
                Retired::Kept(rec) => rec,
                Retired::Detached(rec) => {
                    return self.attach(req, params, Some(rec), &secret).await;
                }
            }
        };
        let inner = self.inner.clone();
        if done {
            tracing::info!(engine = %rec.engine_node, epoch = rec.epoch, "already staged");
            Ok(())
        } else {
            blocking(move || inner.finish_stage(rec)).await
        }
    }

    /// Finds the primary (taking over first if this node holds the secondary), then attaches pinned
    /// to its epoch and mounts.
    async fn attach(
        &self,
        req: StageRequest,
        params: VolumeParams,
        existing: Option<VolumeRecord>,
        secret: &crate::engine::Credentials,
    ) -> Result<()> {
        let (engine, epoch, mut view) = self
            .choose_engine(&params, secret, want(&req, &params)?)
            .await?;
        // A staging that read a view (re-attached here after its device broke) reads a view
        // again, even if this node's engine was promoted since: views are taken on any role.
        if !view
            && req.read_only
            && engine.node == self.node_id()
            && existing.as_ref().is_some_and(|r| r.view.is_some())
        {
            view = true;
        }
        if view {
            return self
                .attach_view(req, params, existing, engine, epoch, secret)
                .await;
        }
        let inner = self.inner.clone();
        blocking(move || inner.attach_and_stage(&req, &params, existing, &engine, epoch, None))
            .await
    }

    /// A read-only stage on the secondary's node: takes point-in-time view
    /// `view-<hash of volume id and staging path>` on this node's engine (`Call::View`: this
    /// plugin may take and delete only such snapshots, only there), attaches its export
    /// `<volume>@snapshot/<id>` and mounts it read-only. A filesystem's device takes writes into a
    /// throw-away overlay in the attach daemon, so the `ro` mount replays the journal of the
    /// crash-consistent image; `noload` / `norecovery` would show it without the transactions
    /// the writer committed but had not yet written home (fsync'd files missing). A raw block
    /// view is read-only. NodeUnstageVolume detaches, then deletes the view.
    async fn attach_view(
        &self,
        req: StageRequest,
        params: VolumeParams,
        existing: Option<VolumeRecord>,
        engine: EngineRef,
        epoch: u64,
        secret: &crate::engine::Credentials,
    ) -> Result<()> {
        let view = ViewRecord {
            id: view_id(&req.volume_id, &req.staging_path),
            grpc: engine.grpc.clone(),
            token: secret.token.clone(),
            tls: req.tls.for_node(self.node_id()),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let mut rec = existing.unwrap_or_else(|| new_record(&req, &params, &engine, epoch));
        rec.engine_node = engine.node.clone();
        rec.epoch = epoch;
        rec.view = Some(view.clone());
        // Safety (no view kept silently): the record names the view before it exists, so a
        // crash from here on leaves the trail that NodeUnstageVolume, or the next stage at this
        // path, follows to delete it (node::tests::a_view_whose_stage_fails_is_deleted_again).
        let inner = self.inner.clone();
        let saved = rec.clone();
        blocking(move || inner.state.save(&saved)).await?;
        // A fresh image, never an old one: a view an earlier staging at this path left behind
        // (its unstage never came, or could not delete it) is replaced, not reused.
        let taken = async {
            self.engines
                .delete_view(&view.grpc, &params.volume, secret, &view.id)
                .await?;
            self.engines
                .create_view(&view.grpc, &params.volume, secret, &view.id)
                .await
        }
        .await;
        if let Err(e) = taken {
            self.abandon_view(&req.volume_id, secret).await;
            return Err(Error::Engine(e));
        }
        tracing::info!(view = %view.id, engine = %engine.node, epoch, "point-in-time view taken");
        let inner = self.inner.clone();
        let (r, p, id) = (req.clone(), params.clone(), view.id.clone());
        let staged =
            blocking(move || inner.attach_and_stage(&r, &p, Some(rec), &engine, epoch, Some(&id)))
                .await;
        if staged.is_err() {
            self.abandon_view(&req.volume_id, secret).await;
        }
        staged
    }

    /// After a failed view stage: deletes the view and forgets the record when nothing else is
    /// left in it; if the delete fails too, the record keeps the view for the unstage (or the
    /// next stage) to delete.
    async fn abandon_view(&self, volume_id: &str, secret: &crate::engine::Credentials) {
        let inner = self.inner.clone();
        let id = volume_id.to_string();
        let Ok(Some(mut rec)) = blocking(move || inner.state.load(&id)).await else {
            return;
        };
        let Some(view) = rec.view.clone() else {
            return;
        };
        if rec.attachment.is_some() {
            return;
        }
        match self
            .engines
            .delete_view(&view.grpc, &rec.engine_volume, secret, &view.id)
            .await
        {
            Ok(_) | Err(EngineError::VolumeUnknown { .. }) => {
                rec.view = None;
                let inner = self.inner.clone();
                let r = blocking(move || {
                    if rec.publications.is_empty() {
                        inner.state.remove(&rec.volume_id)
                    } else {
                        inner.state.save(&rec)
                    }
                })
                .await;
                if let Err(e) = r {
                    tracing::error!(view = %view.id, "view deleted, but its record stays: {e}");
                }
            }
            Err(e) => tracing::error!(
                view = %view.id,
                "cannot delete the view of a failed stage ({e}); the unstage or the next stage \
                 at this path deletes it"
            ),
        }
    }

    async fn statuses(
        &self,
        params: &VolumeParams,
        token: &crate::engine::Credentials,
    ) -> Vec<(
        EngineRef,
        std::result::Result<crate::engine::EngineStatus, crate::engine::EngineError>,
    )> {
        futures::future::join_all(params.engines.iter().map(|e| async {
            (
                e.clone(),
                self.engines.status(&e.grpc, &params.volume, token).await,
            )
        }))
        .await
    }

    /// Finds the engine to attach to, and whether to a view of it; takes over first when this
    /// node holds the secondary and the stage is writable.
    async fn choose_engine(
        &self,
        params: &VolumeParams,
        token: &crate::engine::Credentials,
        want: Want,
    ) -> Result<(EngineRef, u64, bool)> {
        let answers = self.statuses(params, token).await;
        match plan(self.node_id(), &answers, want)? {
            Plan::Attach { engine, epoch } => {
                tracing::info!(engine = %engine.node, epoch, ?want, "attaching");
                Ok((engine, epoch, false))
            }
            Plan::View { engine, epoch } => {
                tracing::info!(engine = %engine.node, epoch, "this node holds the secondary: a point-in-time view for a read-only stage");
                Ok((engine, epoch, true))
            }
            Plan::TakeoverThenAttach { engine } => {
                tracing::info!(engine = %engine.node, "this node holds the secondary: taking over (handoff)");
                let t = self
                    .engines
                    .takeover(&engine.grpc, &params.volume, token, params.peer_timeout)
                    .await
                    .map_err(|e| match e.code() {
                        tonic::Code::Unavailable => Error::PrimaryUnavailable(format!(
                            "{e}; the old primary did not hand over within {:?}. The plugin never \
                             forces a promotion: the operator promotes this engine per the \
                             volume's failover policy ({:?}) once the old primary's lease ran \
                             out; kubelet retries",
                            params.peer_timeout, params.policy
                        )),
                        _ => Error::Engine(e),
                    })?;
                tracing::info!(
                    epoch = t.epoch,
                    ready_ms = t.ready_ms,
                    peer_pending_blocks = t.peer_pending_blocks,
                    already_primary = t.already_primary,
                    "takeover complete"
                );
                if t.lost_blocks > 0 {
                    tracing::warn!(
                        lost_blocks = t.lost_blocks,
                        "forced promotion: the old primary's newest writes to these blocks are lost"
                    );
                }
                Ok((engine, t.epoch, false))
            }
        }
    }

    /// NodeUnstageVolume. CSI: MUST undo NodeStageVolume (here: unmount the staging path, detach the
    /// device: no mount, loop device or FUSE mount left); MUST reply OK if the volume is not staged at
    /// that path; the CO calls it only after every NodeUnpublishVolume, so a publication still mounted
    /// is FAILED_PRECONDITION. A point-in-time view is deleted on its engine after the detach, with
    /// the credentials its record kept; until that succeeds the unstage fails (kubelet retries,
    /// and the retry only deletes), except that a volume the engine no longer knows has no view.
    pub async fn unstage(&self, volume_id: String, staging_path: PathBuf) -> Result<()> {
        let _token = self.guard.try_acquire(&volume_id)?;
        let inner = self.inner.clone();
        let Some(rec) = blocking(move || inner.unstage(&volume_id, &staging_path)).await? else {
            return Ok(());
        };
        let Some(view) = rec.view.clone() else {
            return Ok(());
        };
        let creds = crate::engine::Credentials {
            token: view.token.clone(),
            tls: crate::engine::TlsSecrets(view.tls.clone())
                .client(self.node_id())
                .map_err(|e| Error::Internal(format!("the view's recorded credentials: {e}")))?,
        };
        // Safety (no view kept silently): the record, and with it the view's trail, goes only
        // once the engine confirmed the view is gone (node::tests::unstage_deletes_the_view_*).
        match self
            .engines
            .delete_view(&view.grpc, &rec.engine_volume, &creds, &view.id)
            .await
        {
            Ok(deleted) => tracing::info!(view = %view.id, deleted, "point-in-time view deleted"),
            Err(EngineError::VolumeUnknown { .. }) => {
                tracing::info!(view = %view.id, "the engine no longer holds the volume, nor its view")
            }
            Err(e) => {
                return Err(Error::Engine(e));
            }
        }
        let inner = self.inner.clone();
        blocking(move || inner.state.remove(&rec.volume_id)).await?;
        tracing::info!("unstaged");
        Ok(())
    }

    /// NodePublishVolume. CSI: MUST make the staged volume available at the target path (bind mount of
    /// the staging mount for filesystems; bind of the device node onto a file for raw block), read-only
    /// if asked; idempotent (OK if already published there compatibly, ALREADY_EXISTS if published
    /// there with another readonly flag or something else is mounted there); FAILED_PRECONDITION if the
    /// volume is not staged at the given staging path.
    pub async fn publish(&self, req: PublishRequest) -> Result<()> {
        let _token = self.guard.try_acquire(&req.volume_id)?;
        let inner = self.inner.clone();
        blocking(move || inner.publish(&req)).await
    }

    /// NodeUnpublishVolume. CSI: MUST undo NodePublishVolume and delete the file or directory it
    /// created at the target path; MUST reply OK if the volume is not published there.
    pub async fn unpublish(&self, volume_id: String, target_path: PathBuf) -> Result<()> {
        let _token = self.guard.try_acquire(&volume_id)?;
        let inner = self.inner.clone();
        blocking(move || inner.unpublish(&volume_id, &target_path)).await
    }

    /// NodeExpandVolume. CSI: the volume at `volume_path` (staging path or a publication) takes the
    /// size the controller gave it: here the device learns the engines' new size (the operator
    /// grew them first: `Engine.Resize`), then a mounted ext4 grows with resize2fs and xfs with
    /// xfs_growfs, online (block volumes: the device only). Returns the device's size.
    /// Idempotent: a volume already that large only grows its filesystem again (a no-op). NOT_FOUND
    /// for an unknown volume or path; FAILED_PRECONDITION when not staged here; UNAVAILABLE while
    /// the engine does not serve `required_bytes` yet (kubelet retries); ABORTED while another call
    /// for the volume runs. A read-only staging grows its device but not its filesystem (a writer
    /// grows that). A mounted ext4 whose online grow the kernel refuses for lack of privilege
    /// (CAP_SYS_RESOURCE) is FAILED_PRECONDITION: the device grew, the filesystem grows at the
    /// next stage (see `mount_staging`).
    pub async fn expand(&self, req: ExpandRequest) -> Result<u64> {
        let _token = self.guard.try_acquire(&req.volume_id)?;
        let inner = self.inner.clone();
        blocking(move || inner.expand(&req)).await
    }

    /// NodeGetVolumeStats. CSI: NOT_FOUND if the volume or the path is unknown; the condition reports
    /// an attachment whose engine connection or device is gone.
    pub async fn stats(&self, volume_id: String, path: PathBuf) -> Result<VolumeStats> {
        let inner = self.inner.clone();
        blocking(move || inner.stats(&volume_id, &path)).await
    }

    /// Start-up: report what the state dir says is attached, and remove leftovers of attachments
    /// that no record points to (a crash between attach and the first save).
    pub async fn recover(&self) -> Result<()> {
        let inner = self.inner.clone();
        blocking(move || inner.recover()).await
    }
}

impl<A: Attacher, M: Mounter> Inner<A, M> {
    fn stage_resume(&self, req: &StageRequest, engine_volume: &str) -> Result<Resume> {
        let Some(mut rec) = self.state.load(&req.volume_id)? else {
            if matches!(req.access, Access::Mount { .. })
                && self.mounter.is_mount_point(&req.staging_path)?
            {
                return Err(Error::VolumeIncompatible(format!(
                    "something else is mounted at {}",
                    req.staging_path.display()
                )));
            }
            return Ok(Resume::Attach(None));
        };
        if rec.staging_path != req.staging_path {
            return Err(Error::VolumeIncompatible(format!(
                "already staged at {}",
                rec.staging_path.display()
            )));
        }
        if rec.access != req.access || rec.read_only != req.read_only {
            return Err(Error::VolumeIncompatible(format!(
                "staged as {}{}, requested {}{}",
                rec.access.describe(),
                if rec.read_only { " read-only" } else { "" },
                req.access.describe(),
                if req.read_only { " read-only" } else { "" },
            )));
        }
        if rec.engine_volume != engine_volume {
            return Err(Error::VolumeIncompatible(format!(
                "staged for engine volume {:?}, context names {engine_volume:?}",
                rec.engine_volume
            )));
        }
        let Some(att) = rec.attachment.clone() else {
            return Ok(Resume::Attach(Some(rec)));
        };
        match self.attacher.health(&att) {
            Health::Healthy | Health::Degraded(_) => {
                let mounted = match &rec.access {
                    Access::Block => true,
                    Access::Mount { .. } => {
                        self.mounter.state(&rec.staging_path, &att.device)? == MountState::Device
                    }
                };
                if rec.staged && mounted {
                    Ok(Resume::Done(rec))
                } else {
                    Ok(Resume::Mount(rec))
                }
            }
            Health::Broken(why) => {
                tracing::warn!(device = %att.device.display(), "attachment is broken ({why}); attaching again");
                self.unmount_all(&rec.staging_path, &att.device)?;
                self.attacher.detach(&att)?;
                rec.attachment = None;
                rec.staged = false;
                self.state.save(&rec)?;
                Ok(Resume::Attach(Some(rec)))
            }
        }
    }

    fn attach_and_stage(
        &self,
        req: &StageRequest,
        params: &VolumeParams,
        existing: Option<VolumeRecord>,
        engine: &EngineRef,
        epoch: u64,
        view: Option<&str>,
    ) -> Result<()> {
        let spec = match view {
            None => AttachSpec {
                key: escape_id(&req.volume_id),
                nbd: engine.nbd.clone(),
                export: pinned_export(&params.volume, epoch),
                pinned_epoch: Some(epoch),
                read_only: req.read_only,
                overlay: false,
            },
            // A snapshot export: no epoch to pin (it is the same image at any epoch). A
            // filesystem's device takes its journal replay into the daemon's overlay.
            Some(id) => {
                let fs = matches!(req.access, Access::Mount { .. });
                AttachSpec {
                    key: escape_id(&req.volume_id),
                    nbd: engine.nbd.clone(),
                    export: tandem_api::contract::snapshot_export(&params.volume, id),
                    pinned_epoch: None,
                    read_only: !fs,
                    overlay: fs,
                }
            }
        };
        let mut rec = existing.unwrap_or_else(|| new_record(req, params, engine, epoch));
        let att = self.attacher.attach(&spec)?;
        rec.attachment = Some(att.clone());
        rec.engine_node = engine.node.clone();
        rec.epoch = epoch;
        if let Err(e) = self.state.save(&rec) {
            if let Err(d) = self.attacher.detach(&att) {
                tracing::error!("could not undo the attachment after a state write failure: {d}");
            }
            return Err(e);
        }
        self.finish_stage(rec)
    }

    /// Replaces a staging that no longer matches the primary (`why`), unless it is still in use:
    /// with a publication still mounted, a stale staging is refused (ABORTED; it stays fenced, as
    /// its pinned export is refused), and one that is `current` but unpinned is kept as it is.
    /// Otherwise unmounts the staging path and detaches, and returns the record without an
    /// attachment for a fresh attach. Never two writers: the old attachment is gone (or refused by
    /// the engine) before the new one exists.
    fn retire(&self, mut rec: VolumeRecord, why: &str, current: bool) -> Result<Retired> {
        let Some(att) = rec.attachment.clone() else {
            return Ok(Retired::Detached(rec));
        };
        let live = self.live_publications(&rec, &att.device);
        if !live.is_empty() {
            if current {
                tracing::warn!(
                    "{why}; still published at {}: kept as it is until it is unstaged",
                    live.join(", ")
                );
                return Ok(Retired::Kept(rec));
            }
            return Err(Error::StagingStale(format!(
                "{why}; it is still published at {}, so it stays as it is (fenced: its I/O fails) \
                 until it is unpublished; stage again then",
                live.join(", ")
            )));
        }
        tracing::warn!(device = %att.device.display(), "{why}: replacing the staging");
        self.unmount_all(&rec.staging_path, &att.device)?;
        self.attacher.detach(&att)?;
        rec.attachment = None;
        rec.staged = false;
        rec.publications.clear();
        self.state.save(&rec)?;
        Ok(Retired::Detached(rec))
    }

    /// The recorded publications that are still mounted from `device`.
    fn live_publications(&self, rec: &VolumeRecord, device: &Path) -> Vec<String> {
        rec.publications
            .keys()
            .filter(|t| matches!(self.mounter.state(t, device), Ok(MountState::Device)))
            .map(|t| t.display().to_string())
            .collect()
    }

    /// The mount step (mount volumes), then the record says "staged". A failure detaches.
    fn finish_stage(&self, mut rec: VolumeRecord) -> Result<()> {
        let Some(att) = rec.attachment.clone() else {
            return Err(Error::Internal("finish_stage without an attachment".into()));
        };
        if let Access::Mount {
            fs_type,
            mount_flags,
        } = &rec.access
        {
            if let Err(e) = self.mount_staging(&rec, &att.device, fs_type, mount_flags) {
                tracing::warn!("staging mount failed ({e}); detaching");
                match self.attacher.detach(&att) {
                    Ok(()) => rec.attachment = None,
                    Err(d) => tracing::error!("detach after a failed mount also failed: {d}"),
                }
                // A view's record stays: the caller deletes the view first.
                let cleanup = if rec.attachment.is_none()
                    && rec.publications.is_empty()
                    && rec.view.is_none()
                {
                    self.state.remove(&rec.volume_id)
                } else {
                    rec.staged = false;
                    self.state.save(&rec)
                };
                if let Err(s) = cleanup {
                    tracing::error!("state update after a failed mount: {s}");
                }
                return Err(e);
            }
        }
        rec.staged = true;
        self.state.save(&rec)?;
        tracing::info!(device = %att.device.display(), staging = %rec.staging_path.display(), "staged");
        Ok(())
    }

    fn mount_staging(
        &self,
        rec: &VolumeRecord,
        device: &Path,
        fs_type: &str,
        flags: &[String],
    ) -> Result<()> {
        let staging = &rec.staging_path;
        std::fs::create_dir_all(staging).map_err(|e| {
            Error::Internal(format!("create staging dir {}: {e}", staging.display()))
        })?;
        match self.mounter.state(staging, device)? {
            MountState::Device => return Ok(()),
            MountState::Other(what) => {
                return Err(Error::VolumeIncompatible(format!(
                    "{what} is mounted at {}",
                    staging.display()
                )))
            }
            MountState::NotMounted => {}
        }
        match self.mounter.probe(device)? {
            None if rec.read_only => {
                return Err(Error::PreconditionFailed(
                    "the volume is blank and cannot be formatted when staged read-only".into(),
                ))
            }
            None => {
                tracing::info!(fs_type, device = %device.display(), "blank volume: making a filesystem");
                self.mounter.mkfs(device, fs_type)?;
            }
            Some(found) if found == fs_type => {}
            Some(found) => {
                return Err(Error::PreconditionFailed(format!(
                    "the volume holds {found}, not {fs_type}; refusing to format it"
                )))
            }
        }
        // A volume grown while not staged (or whose online grow was refused) gets its filesystem
        // grown now: ext4 before the mount (offline needs no privilege beyond the device), xfs
        // after it (xfs grows only mounted). A read-only stage leaves the filesystem alone.
        let grow = !rec.read_only && self.mounter.fs_smaller_than_device(device, fs_type)?;
        let is_ext = matches!(fs_type, "ext2" | "ext3" | "ext4");
        if grow && is_ext {
            tracing::info!(fs_type, device = %device.display(), "filesystem smaller than the device: growing it before the mount");
            self.mounter.grow_fs_offline(device, fs_type)?;
        }
        let mut options = flags.to_vec();
        if rec.read_only {
            options.push("ro".into());
        }
        if rec.view.is_some() && fs_type == "xfs" {
            // The view carries the writer's filesystem UUID; xfs refuses a second mount of one.
            options.push("nouuid".into());
        }
        self.mounter.mount(device, staging, fs_type, &options)?;
        if grow && !is_ext {
            tracing::info!(fs_type, device = %device.display(), "filesystem smaller than the device: growing it after the mount");
            if let Err(e) = self.mounter.grow_fs(device, staging, fs_type) {
                // Leave nothing mounted behind a failed stage (the caller detaches).
                if let Err(u) = self.mounter.unmount(staging) {
                    tracing::error!("unmount after a failed grow: {u}");
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Unmounts every layer of `device` at `target` (repeated mounts stack).
    fn unmount_all(&self, target: &Path, device: &Path) -> Result<()> {
        for _ in 0..16 {
            match self.mounter.state(target, device)? {
                MountState::Device => self.mounter.unmount(target)?,
                _ => return Ok(()),
            }
        }
        Err(Error::Internal(format!(
            "{} stays mounted after 16 unmounts",
            target.display()
        )))
    }

    /// Unmounts and detaches; forgets the record unless it names a view, which is returned for
    /// the caller to delete (saved without its attachment, so a retry only deletes).
    fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<Option<VolumeRecord>> {
        let Some(mut rec) = self.state.load(volume_id)? else {
            tracing::info!("not staged on this node: nothing to do");
            return Ok(None);
        };
        if rec.staging_path != staging_path {
            tracing::info!(staged_at = %rec.staging_path.display(), "not staged at this path: nothing to do");
            return Ok(None);
        }
        if let Some(att) = &rec.attachment {
            let live = self.live_publications(&rec, &att.device);
            if !live.is_empty() {
                return Err(Error::PreconditionFailed(format!(
                    "still published at {}",
                    live.join(", ")
                )));
            }
            self.unmount_all(&rec.staging_path, &att.device)?;
            self.attacher.detach(att)?;
        }
        if rec.view.is_some() {
            if rec.attachment.is_some() {
                rec.attachment = None;
                rec.staged = false;
                rec.publications.clear();
                self.state.save(&rec)?;
            }
            return Ok(Some(rec));
        }
        self.state.remove(volume_id)?;
        tracing::info!("unstaged");
        Ok(None)
    }

    fn publish(&self, req: &PublishRequest) -> Result<()> {
        let mut rec = self
            .state
            .load(&req.volume_id)?
            .filter(|r| r.staged)
            .ok_or(Error::VolumeNotStaged(None))?;
        if rec.staging_path != req.staging_path {
            return Err(Error::VolumeNotStaged(Some(req.staging_path.clone())));
        }
        let same_kind = matches!(
            (&rec.access, &req.access),
            (Access::Block, Access::Block) | (Access::Mount { .. }, Access::Mount { .. })
        );
        if !same_kind {
            return Err(Error::PreconditionFailed(format!(
                "staged as {}, publish asks for {}",
                rec.access.describe(),
                req.access.describe()
            )));
        }
        let Some(att) = rec.attachment.clone() else {
            return Err(Error::VolumeNotStaged(None));
        };
        let target = &req.target_path;
        if let Some(p) = rec.publications.get(target) {
            if p.read_only != req.read_only {
                return Err(Error::VolumeIncompatible(format!(
                    "already published at {} {}",
                    target.display(),
                    if p.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    }
                )));
            }
        }
        match self.mounter.state(target, &att.device)? {
            MountState::Device => {
                if !rec.publications.contains_key(target) {
                    rec.publications.insert(
                        target.clone(),
                        Publication {
                            read_only: req.read_only,
                        },
                    );
                    self.state.save(&rec)?;
                }
                tracing::info!(target = %target.display(), "already published");
                return Ok(());
            }
            MountState::Other(what) => {
                return Err(Error::VolumeIncompatible(format!(
                    "{what} is mounted at {}",
                    target.display()
                )))
            }
            MountState::NotMounted => {}
        }
        let (source, created) = match &rec.access {
            Access::Mount { .. } => {
                let created = !target.exists();
                std::fs::create_dir_all(target)
                    .map_err(|e| Error::Internal(format!("create {}: {e}", target.display())))?;
                (rec.staging_path.clone(), created)
            }
            Access::Block => {
                let created = !target.exists();
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(target)
                    .map_err(|e| Error::Internal(format!("create {}: {e}", target.display())))?;
                (att.device.clone(), created)
            }
        };
        let read_only = req.read_only || rec.read_only;
        if let Err(e) = self.mounter.bind(&source, target, read_only) {
            if created {
                remove_target(target);
            }
            return Err(e.into());
        }
        rec.publications.insert(
            target.clone(),
            Publication {
                read_only: req.read_only,
            },
        );
        if let Err(e) = self.state.save(&rec) {
            let _ = self.mounter.unmount(target);
            if created {
                remove_target(target);
            }
            return Err(e);
        }
        tracing::info!(target = %target.display(), read_only, "published");
        Ok(())
    }

    fn unpublish(&self, volume_id: &str, target: &Path) -> Result<()> {
        let Some(mut rec) = self.state.load(volume_id)? else {
            if self.mounter.is_mount_point(target)? {
                return Err(Error::VolumeNotFound(format!(
                    "{volume_id} is not known here; not touching the mount at {}",
                    target.display()
                )));
            }
            tracing::info!("volume not staged here and target not mounted: nothing to do");
            return Ok(());
        };
        match &rec.attachment {
            Some(att) => {
                self.unmount_all(target, &att.device)?;
                if let MountState::Other(what) = self.mounter.state(target, &att.device)? {
                    if rec.publications.contains_key(target) {
                        return Err(Error::PreconditionFailed(format!(
                            "{what} is mounted over the publication at {}",
                            target.display()
                        )));
                    }
                }
            }
            None if rec.publications.contains_key(target) => {
                // The device is gone; what remains at the target is our dead bind.
                while self.mounter.is_mount_point(target)? {
                    self.mounter.unmount(target)?;
                }
            }
            None => {}
        }
        if rec.publications.contains_key(target) || !self.mounter.is_mount_point(target)? {
            remove_target(target);
        }
        if rec.publications.remove(target).is_some() {
            self.state.save(&rec)?;
        }
        tracing::info!(target = %target.display(), "unpublished");
        Ok(())
    }

    fn expand(&self, req: &ExpandRequest) -> Result<u64> {
        let rec = self
            .state
            .load(&req.volume_id)?
            .ok_or_else(|| Error::VolumeNotFound(req.volume_id.clone()))?;
        if rec.staging_path != req.volume_path && !rec.publications.contains_key(&req.volume_path) {
            return Err(Error::PathNotFound(req.volume_path.clone()));
        }
        let Some(att) = rec.attachment.as_ref().filter(|_| rec.staged) else {
            return Err(Error::VolumeNotStaged(Some(rec.staging_path.clone())));
        };
        let size = self.attacher.expand(att)?;
        if size < req.required_bytes {
            return Err(Error::PrimaryUnavailable(format!(
                "the engine serves {size} bytes, not yet the {} asked for; retry once the volume \
                 has grown",
                req.required_bytes
            )));
        }
        if let Access::Mount { fs_type, .. } = &rec.access {
            if rec.read_only {
                tracing::info!(
                    size,
                    "read-only staging: the device grew, its filesystem is the writer's to grow"
                );
                return Ok(size);
            }
            // What is on the device wins over what the stage asked for (an existing filesystem
            // is mounted as found).
            let found = self.mounter.probe(&att.device)?;
            let fs = found.as_deref().unwrap_or(fs_type);
            self.mounter
                .grow_fs(&att.device, &rec.staging_path, fs)
                .map_err(|e| match e {
                    crate::mount::MountError::GrowNotPermitted { .. } => {
                        Error::PreconditionFailed(format!(
                            "the device grew to {size} bytes, but the filesystem cannot grow while \
                             mounted here ({e}); it grows at the next stage (unstage and stage \
                             the volume again)"
                        ))
                    }
                    other => other.into(),
                })?;
            tracing::info!(size, fs, "filesystem grown");
        }
        Ok(size)
    }

    fn stats(&self, volume_id: &str, path: &Path) -> Result<VolumeStats> {
        let rec = self
            .state
            .load(volume_id)?
            .ok_or_else(|| Error::VolumeNotFound(volume_id.to_string()))?;
        if rec.staging_path != path && !rec.publications.contains_key(path) {
            return Err(Error::PathNotFound(path.to_path_buf()));
        }
        if !path.exists() {
            return Err(Error::PathNotFound(path.to_path_buf()));
        }
        let Some(att) = &rec.attachment else {
            return Ok(VolumeStats {
                usage: vec![],
                abnormal: Some("no device attached".into()),
            });
        };
        let abnormal = match self.attacher.health(att) {
            Health::Healthy => None,
            Health::Degraded(m) | Health::Broken(m) => Some(m),
        };
        let usage = match &rec.access {
            Access::Block => {
                let size = self.mounter.device_size(&att.device)?;
                vec![VolumeUsage {
                    unit_bytes: true,
                    total: size,
                    available: 0,
                    used: 0,
                }]
            }
            Access::Mount { .. } => {
                let s = self.mounter.fs_stats(path)?;
                vec![
                    VolumeUsage {
                        unit_bytes: true,
                        total: s.bytes_total,
                        available: s.bytes_available,
                        used: s.bytes_used,
                    },
                    VolumeUsage {
                        unit_bytes: false,
                        total: s.inodes_total,
                        available: s.inodes_free,
                        used: s.inodes_used,
                    },
                ]
            }
        };
        Ok(VolumeStats { usage, abnormal })
    }

    fn recover(&self) -> Result<()> {
        let records = self.state.list()?;
        let keys: Vec<String> = records.iter().map(|r| escape_id(&r.volume_id)).collect();
        for rec in &records {
            let span = tracing::info_span!("recover", volume_id = %rec.volume_id);
            let _e = span.enter();
            match &rec.attachment {
                None => tracing::info!("recorded without a device (staging was interrupted)"),
                Some(att) => match self.attacher.health(att) {
                    Health::Healthy => {
                        tracing::info!(device = %att.device.display(), publications = rec.publications.len(), "attachment found and healthy")
                    }
                    Health::Degraded(m) => {
                        tracing::warn!(device = %att.device.display(), "attachment found, degraded: {m}")
                    }
                    Health::Broken(m) => {
                        tracing::error!(device = %att.device.display(), "attachment broken: {m}; the next NodeStageVolume attaches again")
                    }
                },
            }
        }
        for key in self.attacher.list_keys() {
            if !keys.contains(&key) {
                if let Err(e) = self.attacher.cleanup_key(&key) {
                    tracing::error!(key, "cannot clean up an orphaned attachment: {e}");
                }
            }
        }
        Ok(())
    }
}

/// What a stage asks of the engines: a read-only stage only reads, on the secondary's node a
/// point-in-time view unless the volume asks for current reads; a shared writer needs a secondary
/// that forwards writes.
fn want(req: &StageRequest, params: &VolumeParams) -> Result<Want> {
    if !req.read_only {
        if !req.shared {
            return Ok(Want::Write);
        }
        if params.secondary_access != SecondaryAccess::ReadWrite {
            return Err(Error::invalid(
                "volume_capability.access_mode",
                format!(
                    "MULTI_NODE_MULTI_WRITER needs secondaryAccess ReadWrite (the secondary \
                     forwards writes to the primary); this volume has {:?}",
                    params.secondary_access
                ),
            ));
        }
        return Ok(Want::WriteShared);
    }
    Ok(Want::Read(
        match (params.secondary_access, params.secondary_read_mode) {
            (SecondaryAccess::None, _) => SecondaryRead::Refused,
            // Only a read-write secondary serves live sessions (`VolumeParams::parse` refuses
            // Current with anything else).
            (SecondaryAccess::ReadWrite, SecondaryReadMode::Current) => SecondaryRead::Current,
            _ => SecondaryRead::View,
        },
    ))
}

/// A new record for a stage of `req` on `engine` at `epoch`.
fn new_record(
    req: &StageRequest,
    params: &VolumeParams,
    engine: &EngineRef,
    epoch: u64,
) -> VolumeRecord {
    VolumeRecord {
        volume_id: req.volume_id.clone(),
        engine_volume: params.volume.clone(),
        staging_path: req.staging_path.clone(),
        access: req.access.clone(),
        read_only: req.read_only,
        engine_node: engine.node.clone(),
        epoch,
        attachment: None,
        staged: false,
        publications: Default::default(),
        view: None,
    }
}

/// The view id of a staging: `view-` and 16 hex digits of FNV-1a over the volume id and the
/// staging path. Stable across plugin versions and restarts (no std hasher, whose output may
/// change), so a retried stage finds its own view and a later stage at the path replaces it.
pub fn view_id(volume_id: &str, staging_path: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let path = staging_path.as_os_str().as_encoded_bytes();
    for b in volume_id.bytes().chain([0u8]).chain(path.iter().copied()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{}{h:016x}", tandem_api::contract::VIEW_SNAPSHOT_PREFIX)
}

/// Removes a publication target the plugin created (empty directory or file); failures are logged.
fn remove_target(target: &Path) {
    let r = match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(target),
        Ok(_) => std::fs::remove_file(target),
        Err(_) => Ok(()),
    };
    if let Err(e) = r {
        tracing::warn!(target = %target.display(), "cannot remove the target: {e}");
    }
}

#[cfg(test)]
mod tests;
