//! [`GrpcAgents`]: [`AgentApi`] over gRPC, one lazily connected channel
//! per endpoint and kind of call. Each call is request -> RPC -> map: a
//! `tonic::Status` becomes an [`AgentError`] naming the agent.

use std::{collections::BTreeMap, sync::Mutex, time::Duration};

use cairn_api::agent::v1::{
    self as pb, replica_store_client::ReplicaStoreClient, volume_heads_client::VolumeHeadsClient,
};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::{AgentApi, AgentError, AgentResult, CALL_TIMEOUT, COPY_TIMEOUT};

/// The agents over gRPC; per endpoint, two lazily connected channels: one
/// whose calls time out after [`CALL_TIMEOUT`], one for copies (a channel's
/// timeout caps every request's, so copies need their own).
#[derive(Debug, Default)]
pub struct GrpcAgents {
    tls: Option<ClientTlsConfig>,
    channels: Mutex<BTreeMap<(String, bool), Channel>>,
}

impl GrpcAgents {
    /// `tls` is used for `https://` endpoints (the operator's client
    /// certificate and the agents' CA).
    pub fn new(tls: Option<ClientTlsConfig>) -> Self {
        GrpcAgents { tls, channels: Default::default() }
    }

    fn channel(&self, endpoint: &str) -> AgentResult<Channel> {
        self.channel_for(endpoint, false)
    }

    /// The channel to `endpoint`; `long`: without the channel-wide
    /// timeout (each request sets its own).
    fn channel_for(&self, endpoint: &str, long: bool) -> AgentResult<Channel> {
        let bad = |m: String| AgentError {
            endpoint: endpoint.to_string(),
            code: tonic::Code::InvalidArgument,
            message: m,
        };
        let mut channels = self.channels.lock().unwrap();
        let key = (endpoint.to_string(), long);
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let mut e = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| bad(format!("not an endpoint: {e}")))?
            .connect_timeout(Duration::from_secs(5));
        if !long {
            e = e.timeout(CALL_TIMEOUT);
        }
        if endpoint.starts_with("https://") {
            let tls = self.tls.clone().ok_or_else(|| {
                bad("an https:// agent needs a client certificate: start cairn-operator with --agent-tls-cert, --agent-tls-key and --agent-ca (cairn-csi controller: --agent-cert, --agent-key and --agent-ca)".into())
            })?;
            e = e.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        }
        let c = e.connect_lazy();
        channels.insert(key, c.clone());
        Ok(c)
    }

    fn heads(&self, endpoint: &str) -> AgentResult<VolumeHeadsClient<Channel>> {
        Ok(VolumeHeadsClient::new(self.channel(endpoint)?))
    }
}

#[tonic::async_trait]
impl AgentApi for GrpcAgents {
    async fn open_head(
        &self,
        endpoint: &str,
        req: pb::OpenHeadRequest,
    ) -> AgentResult<pb::HeadStatus> {
        let r = self.heads(endpoint)?.open_head(req).await;
        r.map(|r| r.into_inner()).map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn close_head(&self, endpoint: &str, volume: &str) -> AgentResult<()> {
        let req = pb::CloseHeadRequest { volume_id: volume.into() };
        let r = self.heads(endpoint)?.close_head(req).await;
        r.map(drop).map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn promote(&self, endpoint: &str, volume: &str) -> AgentResult<pb::PromoteHeadResponse> {
        let req = pb::PromoteHeadRequest { volume_id: volume.into() };
        let r = self.heads(endpoint)?.promote_head(req).await;
        r.map(|r| r.into_inner()).map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn demote(
        &self,
        endpoint: &str,
        volume: &str,
        snapshot: &str,
        generation: u64,
    ) -> AgentResult<()> {
        let req = pb::DemoteHeadRequest {
            volume_id: volume.into(),
            snapshot_id: snapshot.into(),
            generation,
        };
        let r = self.heads(endpoint)?.demote_head(req).await;
        r.map(drop).map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn delete_replica(&self, endpoint: &str, volume: &str) -> AgentResult<()> {
        let req = pb::DeleteReplicaRequest { volume_id: volume.into() };
        let r = ReplicaStoreClient::new(self.channel(endpoint)?).delete_replica(req).await;
        r.map(drop).map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn snapshot(
        &self,
        endpoint: &str,
        volume: &str,
        id: &str,
        generation: u64,
    ) -> AgentResult<()> {
        let req = pb::HeadSnapshotRequest {
            volume_id: volume.into(),
            snapshot_id: id.into(),
            generation,
        };
        let r = self.heads(endpoint)?.head_snapshot(req).await;
        r.map(drop).map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn snapshots(&self, endpoint: &str, volume: &str) -> AgentResult<Vec<pb::SnapshotInfo>> {
        let req = pb::ListSnapshotsRequest { volume_id: volume.into() };
        let r = ReplicaStoreClient::new(self.channel(endpoint)?).list_snapshots(req).await;
        r.map(|r| r.into_inner().snapshots).map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn delete_snapshot(&self, endpoint: &str, volume: &str, id: &str) -> AgentResult<()> {
        let req =
            pb::DeleteHeadSnapshotRequest { volume_id: volume.into(), snapshot_id: id.into() };
        let r = self.heads(endpoint)?.delete_head_snapshot(req).await;
        r.map(drop).map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn links(&self, endpoint: &str, volume: &str) -> AgentResult<Vec<pb::LinkStatus>> {
        let req = pb::ListLinksRequest { volume_id: volume.into() };
        let r = self.heads(endpoint)?.list_links(req).await;
        r.map(|r| r.into_inner().links).map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn stat(&self, endpoint: &str) -> AgentResult<(u64, u64)> {
        let r = ReplicaStoreClient::new(self.channel(endpoint)?).stat(pb::StatRequest {}).await;
        r.map(|r| {
            let s = r.into_inner();
            (s.capacity_bytes, s.used_bytes)
        })
        .map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn register_link(&self, endpoint: &str, req: pb::RegisterLinkRequest) -> AgentResult<()> {
        let mut c = cairn_api::agent::v1::snapshot_copy_client::SnapshotCopyClient::new(
            self.channel(endpoint)?,
        );
        c.register_link(req).await.map(drop).map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn unregister_link(&self, endpoint: &str, link: &str, secret: &[u8]) -> AgentResult<()> {
        let mut c = pb::snapshot_copy_client::SnapshotCopyClient::new(self.channel(endpoint)?);
        let req = pb::UnregisterLinkRequest {
            link_id: link.into(),
            pairing_secret: secret.to_vec().into(),
        };
        c.unregister_link(req).await.map(drop).map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn put_link(&self, endpoint: &str, link: pb::Link) -> AgentResult<pb::LinkStatus> {
        let r = self.heads(endpoint)?.put_link(link).await;
        r.map(|r| r.into_inner()).map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn sync_link(
        &self,
        endpoint: &str,
        link: &str,
        resync: bool,
    ) -> AgentResult<pb::SyncLinkResponse> {
        let req = pb::SyncLinkRequest { link_id: link.into(), resync };
        let mut c = self.heads(endpoint)?;
        let r = c.sync_link(tonic::Request::new(req)).await;
        r.map(|r| r.into_inner()).map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn copy_snapshot(&self, endpoint: &str, req: pb::CopySnapshotRequest) -> AgentResult<()> {
        let mut c = VolumeHeadsClient::new(self.channel_for(endpoint, true)?);
        let mut req = tonic::Request::new(req);
        req.set_timeout(COPY_TIMEOUT);
        c.copy_snapshot(req).await.map(drop).map_err(|s| AgentError::from_status(endpoint, s))
    }

    async fn switchover(
        &self,
        endpoint: &str,
        link: &str,
        snapshot: &str,
        generation: u64,
    ) -> AgentResult<()> {
        let req = pb::SwitchoverRequest {
            link_id: link.into(),
            snapshot_id: snapshot.into(),
            generation,
        };
        let r = self.heads(endpoint)?.switchover(req).await;
        r.map(drop).map_err(|s| AgentError::from_status(endpoint, s))
    }
}
