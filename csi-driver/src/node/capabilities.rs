//! The Node service as the controller's socket serves it: only
//! NodeGetCapabilities, answered with what the node plugins offer.
//!
//! Sidecars in the controller pod ask the controller's socket about the
//! node plugins: csi-resizer, when the controller does not offer
//! EXPAND_VOLUME, calls NodeGetCapabilities there to learn whether the
//! nodes grow filesystems, and exits at start if that call fails. The
//! other Node RPCs act on a node's mounts and are served only by
//! `cairn-csi node` on each node's socket; here they are UNIMPLEMENTED
//! with a message saying so.

use cairn_api::csi::v1::{self as csi, node_server::Node};
use tonic::{Request, Response, Status};

/// The controller's Node service: capabilities only.
#[derive(Debug, Clone, Copy, Default)]
pub struct CapabilitiesOnly;

impl CapabilitiesOnly {
    pub fn into_server(self) -> csi::node_server::NodeServer<Self> {
        csi::node_server::NodeServer::new(self)
    }
}

fn node_only(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is served by the node plugin (`cairn-csi node`) on each node's socket; \
         this is the controller's socket, which answers only NodeGetCapabilities"
    ))
}

#[tonic::async_trait]
impl Node for CapabilitiesOnly {
    async fn node_stage_volume(
        &self,
        _req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        Err(node_only("NodeStageVolume"))
    }

    async fn node_unstage_volume(
        &self,
        _req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        Err(node_only("NodeUnstageVolume"))
    }

    async fn node_publish_volume(
        &self,
        _req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        Err(node_only("NodePublishVolume"))
    }

    async fn node_unpublish_volume(
        &self,
        _req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        Err(node_only("NodeUnpublishVolume"))
    }

    async fn node_get_volume_stats(
        &self,
        _req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        Err(node_only("NodeGetVolumeStats"))
    }

    async fn node_expand_volume(
        &self,
        _req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(node_only("NodeExpandVolume"))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(super::capabilities()))
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Err(node_only("NodeGetInfo"))
    }
}
