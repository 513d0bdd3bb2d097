//! The gRPC edge of volume heads (`cairn.agent.v1.VolumeHeads`): opens heads
//! on this agent with peers for every agent of the volume (this agent's own
//! store directly, the others over gRPC), serves their I/O, and maps head
//! errors to status codes with an exhaustive match.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use cairn_api::{
    Geometry, VolumeId,
    agent::{
        REASON_METADATA, REASON_STALE_EPOCH,
        v1::{self as pb, volume_heads_server::VolumeHeads},
    },
    block::MAX_IO_BYTES,
    convert::{self, FieldError},
    placement::PlacementAgent,
};
use tonic::{Request, Response, Status};

use crate::{
    head::{HeadError, HeadSpec, VolumeHead},
    peer::{GrpcPeer, LocalPeer, ReplicaPeer},
    store::Store,
};

/// Maps a head error to a status code. Exhaustive: a new variant must
/// choose its code.
pub fn head_status(e: HeadError) -> Status {
    let msg = e.to_string();
    let fenced = matches!(e, HeadError::Fenced { .. });
    let mut status = match e {
        HeadError::Placement { .. } => Status::failed_precondition(msg),
        HeadError::Range { .. } => Status::out_of_range(msg),
        HeadError::NoReplica { .. } => Status::unavailable(msg),
        HeadError::Fenced { .. } | HeadError::Refused { .. } => Status::failed_precondition(msg),
        HeadError::Snapshot { .. } => Status::aborted(msg),
        HeadError::MissingPeer { .. } => Status::invalid_argument(msg),
    };
    if fenced {
        status.metadata_mut().insert(
            REASON_METADATA,
            tonic::metadata::MetadataValue::from_static(REASON_STALE_EPOCH),
        );
    }
    status
}

fn field(e: FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Volume heads open on this agent.
#[derive(Debug)]
pub struct HeadService {
    store: Arc<Store>,
    agent: String,
    peer_timeout: Duration,
    heads: tokio::sync::Mutex<BTreeMap<VolumeId, Arc<VolumeHead>>>,
}

impl HeadService {
    /// `agent` is this agent's name: the agent of that name in an
    /// OpenHead request is reached through `store` directly.
    pub fn new(store: Arc<Store>, agent: impl Into<String>, peer_timeout: Duration) -> Self {
        HeadService { store, agent: agent.into(), peer_timeout, heads: Default::default() }
    }

    pub fn into_server(self) -> pb::volume_heads_server::VolumeHeadsServer<Self> {
        pb::volume_heads_server::VolumeHeadsServer::new(self)
            .max_decoding_message_size(crate::service::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::service::MAX_MESSAGE_BYTES)
    }

    async fn head(&self, volume_id: &str) -> Result<Arc<VolumeHead>, Status> {
        let volume = convert::volume_id("volume_id", volume_id).map_err(field)?;
        self.heads.lock().await.get(&volume).cloned().ok_or_else(|| {
            Status::not_found(format!(
                "no head of volume {volume} is open on agent {}: open it first (OpenHead)",
                self.agent
            ))
        })
    }
}

fn status_of(head: &VolumeHead) -> pb::HeadStatus {
    pb::HeadStatus {
        volume_id: head.volume().to_string(),
        epoch: head.epoch(),
        replicas: head
            .health()
            .into_iter()
            .map(|h| pb::ReplicaHealth {
                agent: h.agent,
                chunks: h.chunks,
                in_sync: h.out_of_sync.is_none(),
                reason: h.out_of_sync.unwrap_or_default(),
            })
            .collect(),
    }
}

fn check_len(len: u64) -> Result<(), Status> {
    if len > MAX_IO_BYTES {
        return Err(Status::invalid_argument(format!(
            "length {len} bytes is over the limit of {MAX_IO_BYTES} bytes per request: split it"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl VolumeHeads for HeadService {
    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, epoch = req.get_ref().epoch))]
    async fn open_head(
        &self,
        req: Request<pb::OpenHeadRequest>,
    ) -> Result<Response<pb::HeadStatus>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let geometry = Geometry::new(r.size_bytes, r.chunk_size_bytes)
            .map_err(|e| Status::invalid_argument(format!("volume {volume}: {e}")))?;
        if r.replicas == 0 {
            return Err(Status::invalid_argument(format!(
                "volume {volume}: replicas must be at least 1"
            )));
        }
        if r.epoch == 0 {
            return Err(Status::invalid_argument(format!(
                "volume {volume}: a head needs an epoch of at least 1 (0 means no head)"
            )));
        }
        let mut heads = self.heads.lock().await;
        if let Some(h) = heads.get(&volume)
            && h.epoch() == r.epoch
            && !h.is_fenced()
        {
            return Ok(Response::new(status_of(h)));
        }
        heads.remove(&volume);
        let mut agents = Vec::with_capacity(r.agents.len());
        let mut peers: BTreeMap<String, Arc<dyn ReplicaPeer>> = BTreeMap::new();
        for a in &r.agents {
            if a.name.is_empty() {
                return Err(Status::invalid_argument("an agent has an empty name"));
            }
            let peer: Arc<dyn ReplicaPeer> = if a.name == self.agent {
                Arc::new(LocalPeer::new(&a.name, self.store.clone()))
            } else {
                Arc::new(
                    GrpcPeer::new(&a.name, &a.endpoint, self.peer_timeout)
                        .map_err(|e| Status::invalid_argument(format!("agent {}: {e}", a.name)))?,
                )
            };
            peers.insert(a.name.clone(), peer);
            let domain = (!a.domain.is_empty()).then_some(a.domain.as_str());
            agents.push(PlacementAgent::new(&a.name, domain));
        }
        let spec = HeadSpec {
            volume: volume.clone(),
            geometry,
            replicas: r.replicas as usize,
            layout_version: r.layout_version,
            agents,
            epoch: r.epoch,
        };
        let head = VolumeHead::open(spec, peers, Some(&self.agent)).await.map_err(head_status)?;
        let status = status_of(&head);
        heads.insert(volume, Arc::new(head));
        Ok(Response::new(status))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn close_head(
        &self,
        req: Request<pb::CloseHeadRequest>,
    ) -> Result<Response<pb::CloseHeadResponse>, Status> {
        let head = self.head(&req.get_ref().volume_id).await?;
        head.flush().await.map_err(head_status)?;
        self.heads.lock().await.remove(head.volume());
        Ok(Response::new(pb::CloseHeadResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, offset = req.get_ref().offset))]
    async fn head_write(
        &self,
        req: Request<pb::HeadWriteRequest>,
    ) -> Result<Response<pb::HeadWriteResponse>, Status> {
        let r = req.into_inner();
        check_len(r.data.len() as u64)?;
        let head = self.head(&r.volume_id).await?;
        head.write(r.offset, r.data).await.map_err(head_status)?;
        Ok(Response::new(pb::HeadWriteResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, offset = req.get_ref().offset))]
    async fn head_read(
        &self,
        req: Request<pb::HeadReadRequest>,
    ) -> Result<Response<pb::HeadReadResponse>, Status> {
        let r = req.into_inner();
        check_len(r.length)?;
        let head = self.head(&r.volume_id).await?;
        let data = head.read(r.offset, r.length).await.map_err(head_status)?;
        Ok(Response::new(pb::HeadReadResponse { data }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn head_trim(
        &self,
        req: Request<pb::HeadTrimRequest>,
    ) -> Result<Response<pb::HeadTrimResponse>, Status> {
        let r = req.into_inner();
        let head = self.head(&r.volume_id).await?;
        head.trim(r.offset, r.length).await.map_err(head_status)?;
        Ok(Response::new(pb::HeadTrimResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn head_flush(
        &self,
        req: Request<pb::HeadFlushRequest>,
    ) -> Result<Response<pb::HeadFlushResponse>, Status> {
        let head = self.head(&req.get_ref().volume_id).await?;
        head.flush().await.map_err(head_status)?;
        Ok(Response::new(pb::HeadFlushResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, snapshot = %req.get_ref().snapshot_id))]
    async fn head_snapshot(
        &self,
        req: Request<pb::HeadSnapshotRequest>,
    ) -> Result<Response<pb::HeadSnapshotResponse>, Status> {
        let r = req.into_inner();
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let head = self.head(&r.volume_id).await?;
        let digest = head.snapshot(&snap, r.generation).await.map_err(head_status)?;
        Ok(Response::new(pb::HeadSnapshotResponse { digest: digest.0.to_vec().into() }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn get_head_status(
        &self,
        req: Request<pb::HeadStatusRequest>,
    ) -> Result<Response<pb::HeadStatus>, Status> {
        let head = self.head(&req.get_ref().volume_id).await?;
        Ok(Response::new(status_of(&head)))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn head_digest(
        &self,
        req: Request<pb::HeadDigestRequest>,
    ) -> Result<Response<pb::HeadDigestResponse>, Status> {
        let r = req.into_inner();
        let snap = convert::optional_snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let head = self.head(&r.volume_id).await?;
        let digest = head.digest(snap.as_ref()).await.map_err(head_status)?;
        Ok(Response::new(pb::HeadDigestResponse { digest: digest.0.to_vec().into() }))
    }
}
