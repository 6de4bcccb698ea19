//! gRPC adapters: CSI `Identity` and `Node` over the generated `csi.v1` stubs. They check and convert
//! the wire messages into domain requests (missing or invalid fields → INVALID_ARGUMENT, per the CSI
//! error scheme), run the logic in [`NodeService`] inside a span carrying the volume id, and map
//! errors once (`OpError` → `tonic::Status`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_api::contract::{SECRET_TOKEN_KEY, TOPOLOGY_KEY};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::attach::Attacher;
use crate::engine::EngineApi;
use crate::error::{Error, OpError, Result};
use crate::mount::{Mounter, FILESYSTEMS};
use crate::node::{ExpandRequest, NodeService, PublishRequest, StageRequest};
use crate::pb;
use crate::pb::volume_capability::access_mode::Mode;
use crate::pb::volume_capability::AccessType;
use crate::state::Access;

const DEFAULT_FS: &str = "ext4";

fn op_err<'a>(op: &'static str, volume_id: &'a str) -> impl FnOnce(Error) -> Status + 'a {
    move |source| {
        let e = OpError {
            op,
            volume_id: volume_id.to_string(),
            source,
        };
        match e.source.code() {
            tonic::Code::Internal | tonic::Code::Unavailable => tracing::error!("{e}"),
            _ => tracing::warn!("{e}"),
        }
        e.into()
    }
}

fn required<'a>(value: &'a str, field: &'static str) -> Result<&'a str> {
    if value.trim().is_empty() {
        Err(Error::FieldMissing(field))
    } else {
        Ok(value)
    }
}

fn abs_path(value: &str, field: &'static str) -> Result<PathBuf> {
    let p = Path::new(required(value, field)?);
    if !p.is_absolute() {
        return Err(Error::invalid(
            field,
            format!("{value:?} is not an absolute path"),
        ));
    }
    Ok(p.to_path_buf())
}

/// Access type, read-only-ness and sharing (MULTI_NODE_MULTI_WRITER) from a VolumeCapability.
pub fn parse_capability(cap: Option<&pb::VolumeCapability>) -> Result<(Access, bool, bool)> {
    let cap = cap.ok_or(Error::FieldMissing("volume_capability"))?;
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .unwrap_or(Mode::Unknown);
    let (read_only, shared) = match mode {
        Mode::Unknown => return Err(Error::FieldMissing("volume_capability.access_mode")),
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {
            (false, false)
        }
        // A reader on another node than the writer (a backup) is what MULTI_NODE_READER_ONLY
        // is for; a read-only stage never takes over, so it cannot disturb the writer.
        Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => (true, false),
        // Writers on both nodes: raw block only (checked below), the secondary forwarding.
        Mode::MultiNodeMultiWriter => (false, true),
        other => {
            return Err(Error::invalid(
                "volume_capability.access_mode",
                format!(
                    "{}: a Tandem volume is attached on one node at a time",
                    other.as_str_name()
                ),
            ))
        }
    };
    let access = match &cap.access_type {
        None => return Err(Error::FieldMissing("volume_capability.access_type")),
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            let fs_type = if m.fs_type.trim().is_empty() {
                DEFAULT_FS.to_string()
            } else {
                m.fs_type.trim().to_ascii_lowercase()
            };
            if !FILESYSTEMS.contains(&fs_type.as_str()) {
                return Err(Error::invalid(
                    "volume_capability.mount.fs_type",
                    format!("{fs_type}: supported are {}", FILESYSTEMS.join(", ")),
                ));
            }
            if !m.volume_mount_group.is_empty() {
                return Err(Error::invalid(
                    "volume_capability.mount.volume_mount_group",
                    "not supported (VOLUME_MOUNT_GROUP is not advertised)",
                ));
            }
            Access::Mount {
                fs_type,
                mount_flags: m.mount_flags.clone(),
            }
        }
    };
    // Safety: a filesystem mounted writable on two nodes at once is corrupted by the first
    // metadata write of either: only a raw block device is shared between writers.
    if shared && access != Access::Block {
        return Err(Error::invalid(
            "volume_capability.access_mode",
            "MULTI_NODE_MULTI_WRITER: raw block volumes only (a filesystem cannot be mounted \
             writable on two nodes)",
        ));
    }
    // An `ro` mount flag makes the stage read-only too: it must not take over either.
    let ro_flag = matches!(&access, Access::Mount { mount_flags, .. }
        if mount_flags.iter().any(|f| f.split(',').any(|o| o.trim() == "ro")));
    Ok((access, read_only || ro_flag, shared))
}

fn stage_request(r: pb::NodeStageVolumeRequest) -> Result<StageRequest> {
    let volume_id = required(&r.volume_id, "volume_id")?.to_string();
    let staging_path = abs_path(&r.staging_target_path, "staging_target_path")?;
    let (access, read_only, shared) = parse_capability(r.volume_capability.as_ref())?;
    let token = r.secrets.get(SECRET_TOKEN_KEY).cloned();
    let tls = crate::engine::TlsSecrets::from_secrets(&r.secrets);
    let mut context = r.volume_context;
    crate::context::overlay_stage_secrets(&mut context, &r.secrets);
    Ok(StageRequest {
        volume_id,
        staging_path,
        access,
        read_only,
        shared,
        token,
        tls,
        context,
    })
}

fn expand_request(r: &pb::NodeExpandVolumeRequest) -> Result<ExpandRequest> {
    let want = r.capacity_range.as_ref().map_or(0, |c| c.required_bytes);
    let limit = r.capacity_range.as_ref().map_or(0, |c| c.limit_bytes);
    if want < 0 || limit < 0 || (limit > 0 && want > limit) {
        return Err(Error::invalid(
            "capacity_range",
            format!("required_bytes {want} and limit_bytes {limit} do not make a range"),
        ));
    }
    Ok(ExpandRequest {
        volume_id: required(&r.volume_id, "volume_id")?.to_string(),
        volume_path: abs_path(&r.volume_path, "volume_path")?,
        required_bytes: u64::try_from(want).unwrap_or(0),
    })
}

fn publish_request(r: pb::NodePublishVolumeRequest) -> Result<PublishRequest> {
    let volume_id = required(&r.volume_id, "volume_id")?.to_string();
    let target_path = abs_path(&r.target_path, "target_path")?;
    let (access, ro_mode, _) = parse_capability(r.volume_capability.as_ref())?;
    // CSI: "Staging target path not set" is FAILED_PRECONDITION when STAGE_UNSTAGE is advertised.
    if r.staging_target_path.trim().is_empty() {
        return Err(Error::VolumeNotStaged(None));
    }
    let staging_path = abs_path(&r.staging_target_path, "staging_target_path")?;
    Ok(PublishRequest {
        volume_id,
        staging_path,
        target_path,
        access,
        read_only: r.readonly || ro_mode,
    })
}

/// The CSI Node service.
pub struct NodeGrpc<E, A, M> {
    pub svc: Arc<NodeService<E, A, M>>,
}

#[tonic::async_trait]
impl<E: EngineApi, A: Attacher, M: Mounter> pb::node_server::Node for NodeGrpc<E, A, M> {
    async fn node_stage_volume(
        &self,
        request: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = r.volume_id.clone();
        let span = tracing::info_span!("NodeStageVolume", volume_id = %id);
        async {
            tracing::info!(staging = %r.staging_target_path, "request");
            let req = stage_request(r).map_err(op_err("NodeStageVolume", &id))?;
            self.svc
                .stage(req)
                .await
                .map_err(op_err("NodeStageVolume", &id))?;
            Ok(Response::new(pb::NodeStageVolumeResponse {}))
        }
        .instrument(span)
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = r.volume_id.clone();
        let span = tracing::info_span!("NodeUnstageVolume", volume_id = %id);
        async {
            tracing::info!(staging = %r.staging_target_path, "request");
            let check = || -> Result<(String, PathBuf)> {
                Ok((
                    required(&r.volume_id, "volume_id")?.to_string(),
                    abs_path(&r.staging_target_path, "staging_target_path")?,
                ))
            };
            let (volume_id, staging) = check().map_err(op_err("NodeUnstageVolume", &id))?;
            self.svc
                .unstage(volume_id, staging)
                .await
                .map_err(op_err("NodeUnstageVolume", &id))?;
            Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
        }
        .instrument(span)
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = r.volume_id.clone();
        let span = tracing::info_span!("NodePublishVolume", volume_id = %id);
        async {
            tracing::info!(target = %r.target_path, readonly = r.readonly, "request");
            let req = publish_request(r).map_err(op_err("NodePublishVolume", &id))?;
            self.svc
                .publish(req)
                .await
                .map_err(op_err("NodePublishVolume", &id))?;
            Ok(Response::new(pb::NodePublishVolumeResponse {}))
        }
        .instrument(span)
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = r.volume_id.clone();
        let span = tracing::info_span!("NodeUnpublishVolume", volume_id = %id);
        async {
            tracing::info!(target = %r.target_path, "request");
            let check = || -> Result<(String, PathBuf)> {
                Ok((
                    required(&r.volume_id, "volume_id")?.to_string(),
                    abs_path(&r.target_path, "target_path")?,
                ))
            };
            let (volume_id, target) = check().map_err(op_err("NodeUnpublishVolume", &id))?;
            self.svc
                .unpublish(volume_id, target)
                .await
                .map_err(op_err("NodeUnpublishVolume", &id))?;
            Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
        }
        .instrument(span)
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        let id = r.volume_id.clone();
        let span = tracing::debug_span!("NodeGetVolumeStats", volume_id = %id);
        async {
            let check = || -> Result<(String, PathBuf)> {
                Ok((
                    required(&r.volume_id, "volume_id")?.to_string(),
                    abs_path(&r.volume_path, "volume_path")?,
                ))
            };
            let (volume_id, path) = check().map_err(op_err("NodeGetVolumeStats", &id))?;
            let s = self
                .svc
                .stats(volume_id, path)
                .await
                .map_err(op_err("NodeGetVolumeStats", &id))?;
            let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            Ok(Response::new(pb::NodeGetVolumeStatsResponse {
                usage: s
                    .usage
                    .iter()
                    .map(|u| pb::VolumeUsage {
                        available: clamp(u.available),
                        total: clamp(u.total),
                        used: clamp(u.used),
                        unit: if u.unit_bytes {
                            pb::volume_usage::Unit::Bytes as i32
                        } else {
                            pb::volume_usage::Unit::Inodes as i32
                        },
                    })
                    .collect(),
                volume_condition: Some(pb::VolumeCondition {
                    abnormal: s.abnormal.is_some(),
                    message: s.abnormal.unwrap_or_else(|| "attached and serving".into()),
                }),
            }))
        }
        .instrument(span)
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = r.volume_id.clone();
        let span = tracing::info_span!("NodeExpandVolume", volume_id = %id);
        async {
            let req = expand_request(&r).map_err(op_err("NodeExpandVolume", &id))?;
            let size = self
                .svc
                .expand(req)
                .await
                .map_err(op_err("NodeExpandVolume", &id))?;
            Ok(Response::new(pb::NodeExpandVolumeResponse {
                capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
            }))
        }
        .instrument(span)
        .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::rpc::Type;
        let cap = |t: Type| pb::NodeServiceCapability {
            r#type: Some(pb::node_service_capability::Type::Rpc(
                pb::node_service_capability::Rpc { r#type: t as i32 },
            )),
        };
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities: vec![
                cap(Type::StageUnstageVolume),
                cap(Type::GetVolumeStats),
                cap(Type::VolumeCondition),
                cap(Type::ExpandVolume),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.svc.node_id().to_string(),
            max_volumes_per_node: 0,
            accessible_topology: Some(pb::Topology {
                segments: HashMap::from([(
                    TOPOLOGY_KEY.to_string(),
                    self.svc.node_id().to_string(),
                )]),
            }),
        }))
    }
}

/// The CSI Identity service.
pub struct IdentityGrpc {
    /// Probe reports ready only while this directory is writable.
    pub state_dir: PathBuf,
}

/// The plugin's own health: its state directory takes a write.
pub fn state_dir_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(".probe");
    std::fs::write(&probe, b"ok")?;
    std::fs::remove_file(&probe)
}

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityGrpc {
    async fn get_plugin_info(
        &self,
        _request: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::plugin_info()))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        use pb::plugin_capability::service::Type;
        use pb::plugin_capability::volume_expansion::Type as Expansion;
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities: vec![
                pb::PluginCapability {
                    r#type: Some(pb::plugin_capability::Type::Service(
                        pb::plugin_capability::Service {
                            r#type: Type::VolumeAccessibilityConstraints as i32,
                        },
                    )),
                },
                // Mounted filesystems grow while in use (NodeExpandVolume).
                pb::PluginCapability {
                    r#type: Some(pb::plugin_capability::Type::VolumeExpansion(
                        pb::plugin_capability::VolumeExpansion {
                            r#type: Expansion::Online as i32,
                        },
                    )),
                },
            ],
        }))
    }

    async fn probe(
        &self,
        _request: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        let dir = self.state_dir.clone();
        match tokio::task::spawn_blocking(move || state_dir_writable(&dir)).await {
            Ok(Ok(())) => Ok(Response::new(pb::ProbeResponse { ready: Some(true) })),
            Ok(Err(e)) => Err(Status::failed_precondition(format!(
                "state directory {} is not writable: {e}",
                self.state_dir.display()
            ))),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(access: AccessType, mode: Mode) -> pb::VolumeCapability {
        pb::VolumeCapability {
            access_type: Some(access),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }
    fn mount(fs: &str) -> AccessType {
        AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec!["noatime".into()],
            volume_mount_group: String::new(),
        })
    }

    #[test]
    fn capabilities_are_checked() {
        let (a, ro, _) = parse_capability(Some(&cap(mount(""), Mode::SingleNodeWriter))).unwrap();
        assert_eq!(
            a,
            Access::Mount {
                fs_type: "ext4".into(),
                mount_flags: vec!["noatime".into()]
            }
        );
        assert!(!ro);
        let (a, ro, _) = parse_capability(Some(&cap(
            AccessType::Block(BlockVolume {}),
            Mode::SingleNodeReaderOnly,
        )))
        .unwrap();
        assert_eq!(a, Access::Block);
        assert!(ro);
        // Read-only stages (they never take over): both reader modes, and an `ro` mount flag.
        let (_, ro, shared) = parse_capability(Some(&cap(
            AccessType::Block(BlockVolume {}),
            Mode::MultiNodeReaderOnly,
        )))
        .unwrap();
        assert!(ro && !shared);
        // Writers on both nodes: raw block only.
        let (a, ro, shared) = parse_capability(Some(&cap(
            AccessType::Block(BlockVolume {}),
            Mode::MultiNodeMultiWriter,
        )))
        .unwrap();
        assert_eq!(a, Access::Block);
        assert!(!ro && shared);
        let ro_mount = AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: vec!["noatime,ro".into()],
            volume_mount_group: String::new(),
        });
        let (_, ro, _) = parse_capability(Some(&cap(ro_mount, Mode::SingleNodeWriter))).unwrap();
        assert!(ro);
        for bad in [
            cap(mount("btrfs"), Mode::SingleNodeWriter),
            cap(mount("xfs"), Mode::MultiNodeMultiWriter),
            cap(mount("ext4"), Mode::MultiNodeMultiWriter),
            cap(
                AccessType::Block(BlockVolume {}),
                Mode::MultiNodeSingleWriter,
            ),
            cap(mount("xfs"), Mode::Unknown),
            pb::VolumeCapability {
                access_type: None,
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
            },
        ] {
            let e = parse_capability(Some(&bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        }
        assert!(matches!(
            parse_capability(None),
            Err(Error::FieldMissing("volume_capability"))
        ));
    }

    #[test]
    fn stage_requests_need_their_fields() {
        let good = pb::NodeStageVolumeRequest {
            volume_id: "ns/v".into(),
            staging_target_path: "/var/lib/kubelet/staging/x".into(),
            volume_capability: Some(cap(mount("ext4"), Mode::SingleNodeWriter)),
            secrets: HashMap::from([("token".into(), "t".into())]),
            ..Default::default()
        };
        let r = stage_request(good.clone()).unwrap();
        assert_eq!(r.token.as_deref(), Some("t"));
        for (mutate, field) in [
            (
                Box::new(|r: &mut pb::NodeStageVolumeRequest| r.volume_id.clear())
                    as Box<dyn Fn(&mut pb::NodeStageVolumeRequest)>,
                "volume_id",
            ),
            (
                Box::new(|r: &mut pb::NodeStageVolumeRequest| r.staging_target_path.clear()),
                "staging_target_path",
            ),
            (
                Box::new(|r: &mut pb::NodeStageVolumeRequest| r.volume_capability = None),
                "volume_capability",
            ),
        ] {
            let mut r = good.clone();
            mutate(&mut r);
            match stage_request(r) {
                Err(Error::FieldMissing(f)) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let mut rel = good;
        rel.staging_target_path = "relative/path".into();
        assert_eq!(
            stage_request(rel).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn publish_without_staging_path_is_failed_precondition() {
        let r = pb::NodePublishVolumeRequest {
            volume_id: "ns/v".into(),
            target_path: "/t".into(),
            volume_capability: Some(cap(mount("ext4"), Mode::SingleNodeWriter)),
            ..Default::default()
        };
        assert_eq!(
            publish_request(r.clone()).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        let mut ok = r;
        ok.staging_target_path = "/s".into();
        ok.readonly = true;
        assert!(publish_request(ok).unwrap().read_only);
    }
}
