//! [`GrpcPeer`]: another agent's replica store as a peer of a head, over
//! gRPC with a deadline on every call.
//!
//! Invariant: an agent that stops answering is an error within the
//! timeout, never a hang; every received block's CRC32C is checked.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use cairn_api::{
    Accumulator, BLOCK_SIZE, ChunkSet, Geometry, SnapshotId, VolumeId,
    agent::{
        INCARNATION_METADATA, REASON_METADATA, REASON_STALE_EPOCH,
        v1::{self as pb, replica_store_client::ReplicaStoreClient},
    },
    snapshot::{ReplicaInfo, SnapshotInfo},
};
use tonic::transport::Channel;

use super::*;

/// Another agent, over gRPC.
#[derive(Debug, Clone)]
pub struct GrpcPeer {
    name: String,
    client: ReplicaStoreClient<Channel>,
    timeout: Duration,
    /// The replica incarnation the last `ensure` returned (0: none yet),
    /// sent with every write, read, trim, flush and in-sync record: a peer
    /// serves one head, so one volume.
    incarnation: Arc<AtomicU64>,
}

impl GrpcPeer {
    /// A peer at `endpoint` (`http://host:port`); connects lazily, so an
    /// agent that is down now is an error at the first call, not here.
    pub fn new(name: impl Into<String>, endpoint: &str, timeout: Duration) -> Result<Self, String> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("agent endpoint {endpoint:?} is not a URI: {e}"))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .initial_connection_window_size(crate::transport::H2_CONNECTION_WINDOW)
            .initial_stream_window_size(crate::transport::H2_STREAM_WINDOW)
            .max_frame_size(crate::transport::H2_MAX_FRAME)
            .connect_lazy();
        let client = ReplicaStoreClient::new(channel)
            .max_decoding_message_size(crate::transport::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::transport::MAX_MESSAGE_BYTES);
        Ok(GrpcPeer { name: name.into(), client, timeout, incarnation: Default::default() })
    }

    /// `msg` with the expected incarnation attached.
    fn checked<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        let inc = self.incarnation.load(Ordering::SeqCst);
        if inc != 0 {
            req.metadata_mut().insert(
                INCARNATION_METADATA,
                inc.to_string().parse().expect("a decimal number is valid metadata"),
            );
        }
        req
    }

    fn error(&self, s: tonic::Status) -> PeerError {
        let stale = s
            .metadata()
            .get(REASON_METADATA)
            .is_some_and(|v| v.as_bytes() == REASON_STALE_EPOCH.as_bytes());
        let kind = match s.code() {
            _ if stale => PeerErrorKind::Fenced,
            tonic::Code::DataLoss => PeerErrorKind::Corrupt,
            tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::AlreadyExists
            | tonic::Code::FailedPrecondition
            | tonic::Code::OutOfRange => PeerErrorKind::Refused,
            _ => PeerErrorKind::Unavailable,
        };
        let message = match s.code() {
            // The channel's own deadline ("Timeout expired") is silence.
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => {
                format!("no answer within {:?} ({})", self.timeout, s.message())
            }
            _ => s.message().to_string(),
        };
        PeerError { agent: self.name.clone(), kind, message }
    }

    fn bad_answer(&self, message: String) -> PeerError {
        PeerError { agent: self.name.clone(), kind: PeerErrorKind::Unavailable, message }
    }

    async fn call<T, F>(&self, f: F) -> PeerResult<T>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(self.error(s)),
            Err(_) => Err(PeerError {
                agent: self.name.clone(),
                kind: PeerErrorKind::Unavailable,
                message: format!("no answer within {:?}", self.timeout),
            }),
        }
    }
}

#[tonic::async_trait]
impl ReplicaPeer for GrpcPeer {
    fn agent(&self) -> &str {
        &self.name
    }

    async fn ensure(
        &self,
        volume: &VolumeId,
        geometry: Geometry,
        chunks: ChunkSet,
    ) -> PeerResult<ReplicaInfo> {
        let req = pb::CreateReplicaRequest {
            volume_id: volume.to_string(),
            size_bytes: geometry.size(),
            chunk_size_bytes: geometry.chunk_size(),
            chunks: Some((&chunks).into()),
        };
        let info = self.call(self.client.clone().create_replica(req)).await?;
        let info = ReplicaInfo::try_from(&info)
            .map_err(|e| self.bad_answer(format!("replica info: {e}")))?;
        self.incarnation.store(info.incarnation, Ordering::SeqCst);
        Ok(info)
    }

    async fn revert_head(&self, volume: &VolumeId, epoch: u64) -> PeerResult<()> {
        let req = pb::RevertHeadRequest { volume_id: volume.to_string(), epoch };
        self.call(self.client.clone().revert_head(req)).await.map(drop)
    }

    async fn delete_replica(&self, volume: &VolumeId) -> PeerResult<()> {
        let req = pb::DeleteReplicaRequest { volume_id: volume.to_string() };
        match tokio::time::timeout(self.timeout, self.client.clone().delete_replica(req)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => Ok(()),
            Ok(Err(s)) => Err(self.error(s)),
            Err(_) => Err(self.bad_answer(format!("no answer within {:?}", self.timeout))),
        }
    }

    async fn fence(&self, volume: &VolumeId, epoch: u64, head: &str) -> PeerResult<u64> {
        let req = pb::FenceRequest { volume_id: volume.to_string(), epoch, head: head.into() };
        self.call(self.client.clone().fence(req)).await.map(|r| r.epoch)
    }

    async fn set_in_sync(
        &self,
        volume: &VolumeId,
        epoch: u64,
        head: &str,
        seq: u64,
        members: &BTreeSet<String>,
    ) -> PeerResult<()> {
        let req = self.checked(pb::SetInSyncRequest {
            volume_id: volume.to_string(),
            epoch,
            head: head.into(),
            seq,
            members: members.iter().cloned().collect(),
        });
        self.call(self.client.clone().set_in_sync(req)).await.map(drop)
    }

    async fn write(
        &self,
        volume: &VolumeId,
        epoch: u64,
        offset: u64,
        data: Bytes,
    ) -> PeerResult<()> {
        let req = self.checked(pb::WriteBlocksRequest {
            volume_id: volume.to_string(),
            offset,
            data,
            epoch,
        });
        self.call(self.client.clone().write_blocks(req)).await.map(drop)
    }

    async fn read(
        &self,
        volume: &VolumeId,
        snapshot: Option<&SnapshotId>,
        offset: u64,
        len: u64,
    ) -> PeerResult<Bytes> {
        let req = self.checked(pb::ReadBlocksRequest {
            volume_id: volume.to_string(),
            offset,
            length: len,
            snapshot_id: snapshot.map(|s| s.to_string()).unwrap_or_default(),
        });
        self.call(self.client.clone().read_blocks(req)).await.map(|r| r.data)
    }

    async fn trim(&self, volume: &VolumeId, epoch: u64, offset: u64, len: u64) -> PeerResult<()> {
        let req = self.checked(pb::TrimRequest {
            volume_id: volume.to_string(),
            offset,
            length: len,
            epoch,
        });
        self.call(self.client.clone().trim(req)).await.map(drop)
    }

    async fn flush(&self, volume: &VolumeId, epoch: u64) -> PeerResult<()> {
        let req = self.checked(pb::FlushRequest { volume_id: volume.to_string(), epoch });
        self.call(self.client.clone().flush(req)).await.map(drop)
    }

    async fn seal(
        &self,
        volume: &VolumeId,
        epoch: u64,
        id: &SnapshotId,
        generation: u64,
    ) -> PeerResult<()> {
        let req = pb::SealSnapshotRequest {
            volume_id: volume.to_string(),
            snapshot_id: id.to_string(),
            generation,
            epoch,
        };
        self.call(self.client.clone().seal_snapshot(req)).await.map(drop)
    }

    async fn mark_divergent(
        &self,
        volume: &VolumeId,
        epoch: u64,
        ids: &[SnapshotId],
    ) -> PeerResult<()> {
        let req = pb::MarkDivergentRequest {
            volume_id: volume.to_string(),
            snapshot_ids: ids.iter().map(|i| i.to_string()).collect(),
            epoch,
        };
        self.call(self.client.clone().mark_divergent(req)).await.map(drop)
    }

    async fn delete_snapshot(&self, volume: &VolumeId, id: &SnapshotId) -> PeerResult<()> {
        let req = pb::DeleteSnapshotRequest {
            volume_id: volume.to_string(),
            snapshot_id: id.to_string(),
        };
        self.call(self.client.clone().delete_snapshot(req)).await.map(drop)
    }

    async fn chunk_digests(
        &self,
        volume: &VolumeId,
        snapshot: Option<&SnapshotId>,
        chunks: &[u64],
    ) -> PeerResult<Vec<(u64, Accumulator)>> {
        let req = pb::ChunkDigestsRequest {
            volume_id: volume.to_string(),
            snapshot_id: snapshot.map(|s| s.to_string()).unwrap_or_default(),
            chunks: chunks.to_vec(),
        };
        let resp = self.call(self.client.clone().chunk_digests(req)).await?;
        resp.chunks
            .into_iter()
            .map(|c| {
                let bytes: [u8; 32] = c.accumulator[..].try_into().map_err(|_| PeerError {
                    agent: self.name.clone(),
                    kind: PeerErrorKind::Unavailable,
                    message: format!("chunk {} accumulator is not 32 bytes", c.chunk),
                })?;
                Ok((c.chunk, Accumulator::from_bytes(&bytes)))
            })
            .collect()
    }

    async fn snapshots(&self, volume: &VolumeId) -> PeerResult<Vec<SnapshotInfo>> {
        let req = pb::ListSnapshotsRequest { volume_id: volume.to_string() };
        let resp = self.call(self.client.clone().list_snapshots(req)).await?;
        resp.snapshots
            .iter()
            .map(|s| SnapshotInfo::try_from(s).map_err(|e| self.bad_answer(format!("{e}"))))
            .collect()
    }

    async fn stream(
        &self,
        volume: &VolumeId,
        snapshot: &SnapshotId,
        chunks: &[u64],
        kind: StreamKind,
    ) -> PeerResult<BlockStream> {
        let (volume_id, snapshot_id) = (volume.to_string(), snapshot.to_string());
        let chunks = chunks.to_vec();
        let stream = match kind {
            StreamKind::Layer => {
                let req = pb::StreamLayerRequest { volume_id, snapshot_id, chunks };
                self.call(self.client.clone().stream_layer(req)).await?
            }
            StreamKind::Image => {
                let req = pb::StreamImageRequest { volume_id, snapshot_id, chunks };
                self.call(self.client.clone().stream_image(req)).await?
            }
        };
        let peer = self.clone();
        let batches = futures::stream::unfold(Some(stream), move |state| {
            let peer = peer.clone();
            async move {
                let mut stream = state?;
                let next = match tokio::time::timeout(peer.timeout, stream.message()).await {
                    Ok(Ok(Some(batch))) => peer.check_batch(batch),
                    Ok(Ok(None)) => return None,
                    Ok(Err(s)) => Err(peer.error(s)),
                    Err(_) => {
                        Err(peer.bad_answer(format!("stream stalled for {:?}", peer.timeout)))
                    }
                };
                let more = next.is_ok().then_some(stream);
                Some((next, more))
            }
        });
        Ok(Box::pin(batches))
    }

    async fn count_blocks(
        &self,
        volume: &VolumeId,
        snapshot: &SnapshotId,
        chunks: &[u64],
        kind: StreamKind,
    ) -> PeerResult<Vec<(u64, u64, u64)>> {
        let req = pb::CountBlocksRequest {
            volume_id: volume.to_string(),
            snapshot_id: snapshot.to_string(),
            chunks: chunks.to_vec(),
            image: kind == StreamKind::Image,
        };
        let resp = self.call(self.client.clone().count_blocks(req)).await?;
        Ok(resp.chunks.into_iter().map(|c| (c.chunk, c.data_blocks, c.zero_blocks)).collect())
    }

    async fn head_blocks(
        &self,
        volume: &VolumeId,
        chunks: &[u64],
        start: u64,
    ) -> PeerResult<(Vec<u64>, Option<u64>)> {
        let req = pb::ListHeadBlocksRequest {
            volume_id: volume.to_string(),
            chunks: chunks.to_vec(),
            start_block: start,
            limit: 0,
        };
        let resp = self.call(self.client.clone().list_head_blocks(req)).await?;
        Ok((resp.blocks, resp.next_block))
    }
}

impl GrpcPeer {
    /// Checks a received batch: every block 4096 bytes (or empty for a zero
    /// block) matching its CRC32C.
    fn check_batch(&self, batch: pb::BlockBatch) -> PeerResult<Vec<CopiedBlock>> {
        batch
            .blocks
            .into_iter()
            .map(|b| {
                if b.data.is_empty() {
                    return Ok(CopiedBlock { block: b.index, data: None });
                }
                if b.data.len() as u64 != BLOCK_SIZE {
                    return Err(self.bad_answer(format!(
                        "block {} arrived with {} bytes, not {BLOCK_SIZE}",
                        b.index,
                        b.data.len()
                    )));
                }
                let actual = crc32c::crc32c(&b.data);
                if actual != b.crc32c {
                    return Err(PeerError {
                        agent: self.name.clone(),
                        kind: PeerErrorKind::Corrupt,
                        message: format!(
                            "block {} arrived with CRC32C {actual:#010x}, sent as {:#010x}",
                            b.index, b.crc32c
                        ),
                    });
                }
                Ok(CopiedBlock { block: b.index, data: Some(b.data) })
            })
            .collect()
    }
}
