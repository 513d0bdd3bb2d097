//! The CSI Controller service: `Volume` objects for PVCs and heads opened
//! on the pod's node. Not written yet: every RPC answers UNIMPLEMENTED.
//!
//! Contract with the node service (see `crate::publish_context`): the CSI
//! volume_id is the `Volume` object's name in `--namespace`;
//! ControllerPublishVolume opens the head on the node's agent (fuse=false)
//! and returns `publish_context(&open_head_request)`.

use std::time::Duration;

use cairn_api::csi::v1::{self as csi, controller_server::Controller};
use tonic::{Request, Response, Status, transport::ClientTlsConfig};

/// What the controller is started with.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Where `Volume` objects for PVCs are created.
    pub namespace: String,
    /// How long CreateVolume waits for a new volume to be ready.
    pub ready_timeout: Duration,
    /// Mutual TLS for agents served over https://.
    pub agent_tls: Option<ClientTlsConfig>,
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {}

/// The Controller service.
#[derive(Debug)]
pub struct ControllerService {
    #[allow(dead_code)]
    config: ControllerConfig,
}

impl ControllerService {
    pub async fn new(config: ControllerConfig) -> Result<Self, StartError> {
        Ok(ControllerService { config })
    }

    pub fn into_server(self) -> csi::controller_server::ControllerServer<Self> {
        csi::controller_server::ControllerServer::new(self)
    }
}

fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is not implemented by cairn-csi yet"))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        _req: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        Err(not_yet("CreateVolume"))
    }

    async fn delete_volume(
        &self,
        _req: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        Err(not_yet("DeleteVolume"))
    }

    async fn controller_publish_volume(
        &self,
        _req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Err(not_yet("ControllerPublishVolume"))
    }

    async fn controller_unpublish_volume(
        &self,
        _req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        Err(not_yet("ControllerUnpublishVolume"))
    }

    async fn validate_volume_capabilities(
        &self,
        _req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        Err(not_yet("ValidateVolumeCapabilities"))
    }

    async fn list_volumes(
        &self,
        _req: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        Err(not_yet("ListVolumes"))
    }

    async fn get_capacity(
        &self,
        _req: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        Err(not_yet("GetCapacity"))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse { capabilities: vec![] }))
    }

    async fn create_snapshot(
        &self,
        _req: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        Err(not_yet("CreateSnapshot"))
    }

    async fn delete_snapshot(
        &self,
        _req: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        Err(not_yet("DeleteSnapshot"))
    }

    async fn list_snapshots(
        &self,
        _req: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        Err(not_yet("ListSnapshots"))
    }

    async fn controller_expand_volume(
        &self,
        _req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        Err(not_yet("ControllerExpandVolume"))
    }

    async fn controller_get_volume(
        &self,
        _req: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        Err(not_yet("ControllerGetVolume"))
    }
}
