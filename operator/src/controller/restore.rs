//! Restores (`spec.source`): which engine of the source volume holds the snapshot, so the new
//! primary is placed on that node and seeds from the source engine's NBD socket there (an init
//! container, `plan::engine_pod`); for a clone the operator takes the snapshot `clone-<uid>` first and
//! deletes it once the new volume serves. Progress lives in `status.restore`, so a restarted operator
//! resumes instead of taking another snapshot or seeding again.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use tracing::warn;

use super::{decide::note, Context};
use crate::{
    crd::{MirroredVolume, PlacementStatus, RestoreStatus, Slot},
    engine::{EngineError, EngineTarget},
    failover::primary_slot,
    plan::{self, names, InvalidSpec},
    Result,
};

pub const SOURCE_NOT_FOUND: &str = "SourceNotFound";
pub const SOURCE_NOT_READY: &str = "SourceNotReady";
pub const SNAPSHOT_NOT_FOUND: &str = "SnapshotNotFound";
pub const SNAPSHOTS_NOT_SUPPORTED: &str = "SnapshotsNotSupported";
pub const SOURCE_ON_ENGINE_PVC: &str = "SourceOnEnginePvc";
pub const SIZE_SMALLER_THAN_SOURCE: &str = "SizeSmallerThanSource";

/// What `spec.source` resolved to this pass.
pub(super) enum Source {
    /// No source: the volume starts as zeros.
    None,
    /// Restore from this snapshot, on this node.
    Ready(RestoreStatus),
    /// Not yet (the source or its snapshot may appear, engines may be upgraded): retried.
    Wait(PlacementStatus),
    /// Never, as written (Failed until the spec changes).
    Invalid(InvalidSpec),
}

fn wait(reason: &str, message: String) -> Source {
    Source::Wait(PlacementStatus {
        reason: reason.into(),
        message,
    })
}

impl MirroredVolume {
    /// Resolves `spec.source`, or resumes what `status.restore` recorded.
    pub(super) async fn resolve_source(&self, ctx: &Context) -> Result<Source> {
        if let Some(r) = self.status.as_ref().and_then(|s| s.restore.clone()) {
            return Ok(Source::Ready(r));
        }
        let Some(source) = &self.spec.source else {
            return Ok(Source::None);
        };
        let (ns, _) = self.key()?;
        let (src_name, snapshot) = match (&source.snapshot, &source.volume) {
            (Some(s), _) => (s.volume.clone(), Some(s.id.clone())),
            (None, Some(v)) => (v.clone(), None),
            (None, None) => {
                return Ok(Source::Invalid(InvalidSpec::new(
                    "source needs snapshot or volume",
                )))
            }
        };
        let api: Api<MirroredVolume> = Api::namespaced(ctx.client.clone(), &ns);
        let Some(src) = api.get_opt(&src_name).await? else {
            return Ok(wait(
                SOURCE_NOT_FOUND,
                format!("source volume {ns}/{src_name} does not exist"),
            ));
        };
        // The new primary reads the snapshot through the source engine's socket on the host; an
        // engine on PVC storage has its data elsewhere than that node's host path.
        if src.spec.engine_storage.storage_class_name.is_some() {
            return Ok(Source::Invalid(InvalidSpec::refused(
                SOURCE_ON_ENGINE_PVC,
                format!("source volume {src_name} keeps its engines' data on PVCs; restores need hostPath engines"),
            )));
        }
        let want = match plan::volume_bytes(self) {
            Ok(b) => b,
            Err(e) => return Ok(Source::Invalid(e)),
        };
        let src_status = src.status.clone().unwrap_or_default();
        let [a, b] = src_status.nodes.as_slice() else {
            return Ok(wait(
                SOURCE_NOT_READY,
                format!("source volume {src_name} is not placed yet"),
            ));
        };
        let src_nodes = [a.clone(), b.clone()];
        let token = self.source_token(ctx, &src).await?;
        let target = |slot: Slot| EngineTarget {
            address: plan::engine_address(&src, slot, &ctx.config),
            volume: src_name.clone(),
            token: token.clone(),
        };
        let too_small = |size: u64| {
            Source::Invalid(InvalidSpec::refused(
                SIZE_SMALLER_THAN_SOURCE,
                format!("size {want} bytes is smaller than the source's {size}"),
            ))
        };
        let unsupported = || {
            wait(
                SNAPSHOTS_NOT_SUPPORTED,
                format!("the engines of {src_name} do not implement snapshots yet"),
            )
        };
        match snapshot {
            Some(id) => {
                let mut tried = Vec::new();
                for slot in Slot::BOTH {
                    match ctx.engines.list_snapshots(&target(slot)).await {
                        Ok(list) => {
                            if let Some(s) = list.iter().find(|s| s.id == id && s.ready) {
                                if s.size > want {
                                    return Ok(too_small(s.size));
                                }
                                return Ok(Source::Ready(RestoreStatus {
                                    volume: src_name,
                                    snapshot: id,
                                    node: src_nodes[slot.index()].clone(),
                                    ..Default::default()
                                }));
                            }
                            tried.push(format!("not on {}", src_nodes[slot.index()]));
                        }
                        Err(EngineError::Unimplemented { .. }) => return Ok(unsupported()),
                        Err(e) => tried.push(format!("{}: {e}", src_nodes[slot.index()])),
                    }
                }
                Ok(wait(
                    SNAPSHOT_NOT_FOUND,
                    format!("snapshot {id} of {src_name}: {}", tried.join("; ")),
                ))
            }
            None => {
                if src_status.primary.is_none() {
                    return Ok(wait(
                        SOURCE_NOT_READY,
                        format!("source volume {src_name} has no serving primary yet"),
                    ));
                }
                let src_size = plan::volume_bytes(&src)
                    .unwrap_or(0)
                    .max(src_status.capacity_bytes);
                if src_size > want {
                    return Ok(too_small(src_size));
                }
                let slot = primary_slot(&src_status);
                let id = format!("clone-{}", self.uid().unwrap_or_default());
                match ctx.engines.create_snapshot(&target(slot), &id).await {
                    Ok(_) => Ok(Source::Ready(RestoreStatus {
                        volume: src_name,
                        snapshot: id,
                        node: src_nodes[slot.index()].clone(),
                        clone: true,
                        ..Default::default()
                    })),
                    Err(EngineError::Unimplemented { .. }) => Ok(unsupported()),
                    Err(e) => Ok(wait(
                        SOURCE_NOT_READY,
                        format!("snapshot {id} of {src_name}: {e}"),
                    )),
                }
            }
        }
    }

    /// The source volume's token (its engines want it), from its Secret in the operator's namespace.
    async fn source_token(&self, ctx: &Context, src: &MirroredVolume) -> Result<Option<String>> {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
        let secret = api.get_opt(&names::secret(&plan::key(src))).await?;
        // Only the source's own Secret (its owner labels), never one found under a colliding key.
        Ok(secret
            .filter(|s| plan::owned_by(s.metadata.labels.as_ref(), src).is_ok())
            .and_then(|s| s.data)
            .and_then(|d| d.get(plan::SECRET_TOKEN_KEY).cloned())
            .and_then(|b| String::from_utf8(b.0).ok()))
    }

    /// Marks the restore done once the new primary serves, and deletes a clone's snapshot then.
    pub(super) async fn finish_restore(&self, ctx: &Context, plan: &mut super::decide::Plan) {
        let Some(mut r) = plan.status.restore.clone() else {
            return;
        };
        if !r.done {
            let slot = primary_slot(&plan.status);
            let serving = plan.status.primary.is_some()
                && plan
                    .observed
                    .engine(slot)
                    .is_some_and(|e| e.role == Some(crate::crd::EngineRole::Primary));
            if !serving {
                return;
            }
            r.done = true;
            plan.notes.push(note(
                "Restored",
                format!(
                    "the primary serves the content of {}@{}",
                    r.volume, r.snapshot
                ),
            ));
        }
        if r.clone && !r.snapshot_deleted {
            match self.delete_clone_snapshot(ctx, &r).await {
                Ok(()) => r.snapshot_deleted = true,
                Err(e) => {
                    warn!(volume = %self.name_any(), error = %e, "cannot delete the clone's snapshot yet")
                }
            }
        }
        plan.status.restore = Some(r);
    }

    /// On deletion: a clone's snapshot still on the source goes too (best effort: a source that is
    /// gone or unreachable keeps it, and says so in the log).
    pub(super) async fn drop_clone_snapshot(&self, ctx: &Context) {
        let Some(r) = self.status.as_ref().and_then(|s| s.restore.clone()) else {
            return;
        };
        if r.clone && !r.snapshot_deleted {
            if let Err(e) = self.delete_clone_snapshot(ctx, &r).await {
                warn!(volume = %self.name_any(), error = %e, snapshot = %r.snapshot, "the clone's snapshot stays on the source");
            }
        }
    }

    async fn delete_clone_snapshot(&self, ctx: &Context, r: &RestoreStatus) -> anyhow::Result<()> {
        let (ns, _) = self.key()?;
        let api: Api<MirroredVolume> = Api::namespaced(ctx.client.clone(), &ns);
        // The source went away: its snapshots went with it.
        let Some(src) = api.get_opt(&r.volume).await? else {
            return Ok(());
        };
        let nodes = src.status.clone().unwrap_or_default().nodes;
        let Some(slot) = Slot::BOTH
            .into_iter()
            .find(|s| nodes.get(s.index()) == Some(&r.node))
        else {
            return Ok(());
        };
        let target = EngineTarget {
            address: plan::engine_address(&src, slot, &ctx.config),
            volume: r.volume.clone(),
            token: self.source_token(ctx, &src).await?,
        };
        ctx.engines.delete_snapshot(&target, &r.snapshot).await?;
        Ok(())
    }
}
