//! gRPC adapters: CSI `Identity` and `Controller` over the generated `csi.v1` stubs. Each call runs
//! the logic in [`Controller`] inside a span naming the call and its volume, and maps its error to a
//! gRPC code in one place ([`CsiError::code`]), logging it once.

use std::{path::PathBuf, sync::Arc};

use tandem_api::csi as pb;
use tandem_api::csi::{
    controller_server::{Controller as ControllerRpc, ControllerServer},
    controller_service_capability::rpc::Type as Rpc,
    identity_server::{Identity, IdentityServer},
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{service::Controller, CsiError, CsiResult};

/// Logs a failed call once (retryable answers are routine: debug) and converts it.
fn answer<T>(op: &'static str, id: &str, result: CsiResult<T>) -> Result<Response<T>, Status> {
    match result {
        Ok(v) => Ok(Response::new(v)),
        Err(e) => {
            match &e {
                CsiError::Pending(_) => tracing::info!(op, id, "{e}"),
                CsiError::Internal(_) | CsiError::Unavailable(_) => {
                    tracing::error!(op, id, "{e}")
                }
                _ => tracing::warn!(op, id, "{e}"),
            }
            Err(e.into())
        }
    }
}

/// The Identity service of the controller plugin.
pub struct IdentityGrpc;

#[tonic::async_trait]
impl Identity for IdentityGrpc {
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
        use pb::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
        let service = |t: service::Type| pb::PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(service::Type::ControllerService),
                service(service::Type::VolumeAccessibilityConstraints),
                pb::PluginCapability {
                    r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    })),
                },
            ],
        }))
    }

    async fn probe(
        &self,
        _request: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        Ok(Response::new(pb::ProbeResponse { ready: Some(true) }))
    }
}

/// The capabilities ControllerGetCapabilities reports.
pub const CAPABILITIES: &[Rpc] = &[
    Rpc::CreateDeleteVolume,
    Rpc::ExpandVolume,
    Rpc::CreateDeleteSnapshot,
    Rpc::ListSnapshots,
    Rpc::CloneVolume,
    Rpc::SingleNodeMultiWriter,
];

/// The Controller service.
pub struct ControllerGrpc {
    pub controller: Arc<Controller>,
}

#[tonic::async_trait]
impl ControllerRpc for ControllerGrpc {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = req.name.clone();
        let span = tracing::info_span!("CreateVolume", volume = %name);
        let result = self
            .controller
            .create_volume(req)
            .instrument(span)
            .await
            .map(|v| pb::CreateVolumeResponse { volume: Some(v) });
        answer("CreateVolume", &name, result)
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        let span = tracing::info_span!("DeleteVolume", volume = %id);
        let result = self
            .controller
            .delete_volume(&id)
            .instrument(span)
            .await
            .map(|()| pb::DeleteVolumeResponse {});
        answer("DeleteVolume", &id, result)
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        let result = self.controller.validate(req).await;
        answer("ValidateVolumeCapabilities", &id, result)
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use pb::controller_service_capability::{Rpc as RpcCap, Type};
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities: CAPABILITIES
                .iter()
                .map(|t| pb::ControllerServiceCapability {
                    r#type: Some(Type::Rpc(RpcCap { r#type: *t as i32 })),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = format!("{}@{}", req.source_volume_id, req.name);
        let span = tracing::info_span!("CreateSnapshot", snapshot = %id);
        let result = self
            .controller
            .create_snapshot(req)
            .instrument(span)
            .await
            .map(|s| pb::CreateSnapshotResponse { snapshot: Some(s) });
        answer("CreateSnapshot", &id, result)
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let id = request.into_inner().snapshot_id;
        let span = tracing::info_span!("DeleteSnapshot", snapshot = %id);
        let result = self
            .controller
            .delete_snapshot(&id)
            .instrument(span)
            .await
            .map(|()| pb::DeleteSnapshotResponse {});
        answer("DeleteSnapshot", &id, result)
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let id = format!("{}{}", req.source_volume_id, req.snapshot_id);
        let result = self.controller.list_snapshots(req).await;
        answer("ListSnapshots", &id, result)
    }

    async fn controller_expand_volume(
        &self,
        request: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        let span = tracing::info_span!("ControllerExpandVolume", volume = %id);
        let result = self.controller.expand_volume(req).instrument(span).await;
        answer("ControllerExpandVolume", &id, result)
    }
}

/// The socket path of a CSI endpoint: `unix:///csi/csi.sock`, `unix:/csi/csi.sock` or a path.
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    anyhow::ensure!(
        path.starts_with('/'),
        "CSI endpoint {endpoint:?}: expected unix:///absolute/path"
    );
    Ok(PathBuf::from(path))
}

/// Serves Identity and Controller on the unix socket until `shutdown` resolves.
pub async fn serve(
    endpoint: &str,
    controller: Arc<Controller>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let socket = socket_path(endpoint)?;
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // A socket left by a previous container of this pod: nothing listens on it any more.
    match std::fs::remove_file(&socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", socket.display())),
    }
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "serving the CSI controller");
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityGrpc))
        .add_service(ControllerServer::new(ControllerGrpc { controller }))
        // Any client's :authority (Python gRPC sends the socket path): tandem_api::authority.
        .serve_with_incoming_shutdown(tandem_api::authority::incoming(listener), shutdown)
        .await
        .context("CSI controller server")
}
