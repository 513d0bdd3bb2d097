//! The CSI Node service: stages a volume published to this node by
//! exposing its head through the local agent's FUSE frontend, attaching
//! the file with a loop device and mounting it; publishes it into pods.
//! Being written: the RPCs that touch volumes answer UNIMPLEMENTED.

use std::{collections::HashMap, path::PathBuf};

use cairn_api::csi::v1::{self as csi, node_server::Node};
use tonic::{Request, Response, Status, transport::Channel};

use csi::node_service_capability::{self, rpc::Type};

/// What the node service is started with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's name (the CO's node id).
    pub node_id: String,
    /// The StorageCluster this node's agent belongs to (its topology).
    pub storage_cluster: String,
    /// The local agent's endpoint, and a channel to it.
    pub agent_endpoint: String,
    pub agent: Channel,
    /// Where node-local bookkeeping is kept.
    pub state_dir: PathBuf,
}

/// The Node service.
#[derive(Debug)]
pub struct NodeService {
    config: NodeConfig,
}

impl NodeService {
    pub fn new(config: NodeConfig) -> Self {
        NodeService { config }
    }

    pub fn into_server(self) -> csi::node_server::NodeServer<Self> {
        csi::node_server::NodeServer::new(self)
    }
}

fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is not implemented by cairn-csi yet"))
}

fn rpc(t: Type) -> csi::NodeServiceCapability {
    csi::NodeServiceCapability {
        r#type: Some(node_service_capability::Type::Rpc(node_service_capability::Rpc {
            r#type: t as i32,
        })),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        _req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        Err(not_yet("NodeStageVolume"))
    }

    async fn node_unstage_volume(
        &self,
        _req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        Err(not_yet("NodeUnstageVolume"))
    }

    async fn node_publish_volume(
        &self,
        _req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        Err(not_yet("NodePublishVolume"))
    }

    async fn node_unpublish_volume(
        &self,
        _req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        Err(not_yet("NodeUnpublishVolume"))
    }

    async fn node_get_volume_stats(
        &self,
        _req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        Err(not_yet("NodeGetVolumeStats"))
    }

    async fn node_expand_volume(
        &self,
        _req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(not_yet("NodeExpandVolume"))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            Type::StageUnstageVolume,
            Type::GetVolumeStats,
            Type::ExpandVolume,
            Type::VolumeCondition,
        ]
        .into_iter()
        .map(rpc)
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.config.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(csi::Topology {
                segments: HashMap::from([(
                    crate::TOPOLOGY_CLUSTER_KEY.to_string(),
                    self.config.storage_cluster.clone(),
                )]),
            }),
        }))
    }
}
