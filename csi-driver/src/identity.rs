//! The CSI Identity service, the same in both roles but for what it
//! reports: the controller offers the Controller service; the node only
//! the topology constraint, and it is ready while its local agent answers.

use std::time::Duration;

use cairn_api::{
    agent::v1::{self as pb, volume_heads_client::VolumeHeadsClient},
    csi::v1::{self as csi, identity_server::Identity},
};
use tonic::{Code, Request, Response, Status, transport::Channel};

use csi::plugin_capability::{self, service::Type};

/// How long Probe waits for the local agent.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A volume id no head has: asking for its status tests that the agent
/// answers, without touching a volume.
const PROBE_VOLUME: &str = "cairn-csi-probe";

/// Which role the process serves.
#[derive(Debug, Clone)]
pub enum Role {
    Controller,
    /// The node role, with its local agent's channel.
    Node {
        agent: Channel,
        endpoint: String,
    },
}

/// The Identity service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    role: Role,
}

impl IdentityService {
    pub fn new(role: Role) -> Self {
        IdentityService { role }
    }

    pub fn into_server(self) -> csi::identity_server::IdentityServer<Self> {
        csi::identity_server::IdentityServer::new(self)
    }
}

fn service(t: Type) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(plugin_capability::Type::Service(plugin_capability::Service {
            r#type: t as i32,
        })),
    }
}

/// Whether the agent answers: any reply, NOT_FOUND for the probe volume
/// included, means it serves.
async fn agent_answers(agent: Channel, endpoint: &str) -> bool {
    let mut heads = VolumeHeadsClient::new(agent);
    let call = heads.get_head_status(pb::HeadStatusRequest { volume_id: PROBE_VOLUME.into() });
    match tokio::time::timeout(PROBE_TIMEOUT, call).await {
        Ok(Ok(_)) => true,
        Ok(Err(s)) if s.code() == Code::NotFound => true,
        Ok(Err(s)) => {
            tracing::warn!(agent = endpoint, code = ?s.code(), error = s.message(), "probe: the local agent does not answer");
            false
        }
        Err(_) => {
            tracing::warn!(
                agent = endpoint,
                "probe: the local agent did not answer within {PROBE_TIMEOUT:?}"
            );
            false
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    #[tracing::instrument(skip_all)]
    async fn get_plugin_info(
        &self,
        _req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: crate::DRIVER_NAME.into(),
            vendor_version: crate::VERSION.into(),
            manifest: Default::default(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_plugin_capabilities(
        &self,
        _req: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        let capabilities = match self.role {
            Role::Controller => {
                vec![
                    service(Type::ControllerService),
                    service(Type::VolumeAccessibilityConstraints),
                ]
            }
            Role::Node { .. } => vec![service(Type::VolumeAccessibilityConstraints)],
        };
        Ok(Response::new(csi::GetPluginCapabilitiesResponse { capabilities }))
    }

    #[tracing::instrument(skip_all)]
    async fn probe(
        &self,
        _req: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let ready = match &self.role {
            Role::Controller => true,
            Role::Node { agent, endpoint } => agent_answers(agent.clone(), endpoint).await,
        };
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}
