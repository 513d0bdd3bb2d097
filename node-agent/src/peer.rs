//! Peers: how a volume head reaches the replica of its volume on one agent.
//! `LocalPeer` calls this agent's store directly: on the blocking pool, or
//! right on the calling thread when that thread is a frontend worker that
//! blocks on the runtime anyway ([`on_frontend_thread`]); `GrpcPeer` calls
//! another agent over gRPC with a deadline, so an agent that stops answering
//! is an error within `timeout`, never a hang.
//!
//! Invariant: a refusal for a stale epoch is always reported as
//! [`PeerErrorKind::Fenced`], whichever way the peer is reached, so the head
//! stops for good instead of marking replicas out of sync.

use std::{cell::Cell, fmt, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use cairn_api::{
    Accumulator, BLOCK_SIZE, ChunkSet, Geometry, SnapshotId, VolumeId,
    agent::{
        REASON_METADATA, REASON_STALE_EPOCH,
        v1::{self as pb, replica_store_client::ReplicaStoreClient},
    },
    snapshot::{ReplicaInfo, SnapshotInfo},
};
use futures::{Stream, StreamExt};
use tonic::transport::Channel;

use crate::{error::Error, store::Store};

/// What kind of failure a peer reported; the head acts on the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerErrorKind {
    /// Not reachable, timed out, or failing: mark the replica out of sync.
    Unavailable,
    /// A newer head holds the volume: stop writing, for good.
    Fenced,
    /// The peer refused the request as such (bad range, unknown snapshot).
    Refused,
    /// A checksum mismatch on the peer: read elsewhere, rebuild it later.
    Corrupt,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("agent {agent}: {message}")]
pub struct PeerError {
    pub agent: String,
    pub kind: PeerErrorKind,
    pub message: String,
}

pub type PeerResult<T> = Result<T, PeerError>;

/// A block copied out of a replica, its CRC32C checked on receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopiedBlock {
    pub block: u64,
    /// `None` for a zero (trimmed) block.
    pub data: Option<Bytes>,
}

/// What a block stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// A snapshot's layer: the blocks changed since the snapshot before it,
    /// trimmed ones as zero blocks.
    Layer,
    /// The image as of a snapshot: every written (non-zero) block.
    Image,
}

/// Batches of blocks in ascending order; the first error ends it.
pub type BlockStream = Pin<Box<dyn Stream<Item = PeerResult<Vec<CopiedBlock>>> + Send>>;

/// The replica of one volume on one agent, as a head uses it.
#[tonic::async_trait]
pub trait ReplicaPeer: Send + Sync + fmt::Debug {
    /// The agent's name (as in the placement).
    fn agent(&self) -> &str;
    /// Creates the replica if missing (idempotent for the same geometry);
    /// returns what it holds.
    async fn ensure(
        &self,
        volume: &VolumeId,
        geometry: Geometry,
        chunks: ChunkSet,
    ) -> PeerResult<ReplicaInfo>;
    /// Deletes the replica and all its snapshots; a missing one is fine.
    async fn delete_replica(&self, volume: &VolumeId) -> PeerResult<()>;
    /// Drops every write since the newest snapshot.
    async fn revert_head(&self, volume: &VolumeId, epoch: u64) -> PeerResult<()>;
    async fn fence(&self, volume: &VolumeId, epoch: u64) -> PeerResult<u64>;
    async fn write(
        &self,
        volume: &VolumeId,
        epoch: u64,
        offset: u64,
        data: Bytes,
    ) -> PeerResult<()>;
    /// Reads the head, or snapshot `snapshot`.
    async fn read(
        &self,
        volume: &VolumeId,
        snapshot: Option<&SnapshotId>,
        offset: u64,
        len: u64,
    ) -> PeerResult<Bytes>;
    async fn trim(&self, volume: &VolumeId, epoch: u64, offset: u64, len: u64) -> PeerResult<()>;
    async fn flush(&self, volume: &VolumeId, epoch: u64) -> PeerResult<()>;
    async fn seal(
        &self,
        volume: &VolumeId,
        epoch: u64,
        id: &SnapshotId,
        generation: u64,
    ) -> PeerResult<()>;
    async fn delete_snapshot(&self, volume: &VolumeId, id: &SnapshotId) -> PeerResult<()>;
    /// Marks snapshots divergent (a resync rolled the volume back past them).
    async fn mark_divergent(
        &self,
        volume: &VolumeId,
        epoch: u64,
        ids: &[SnapshotId],
    ) -> PeerResult<()>;
    async fn chunk_digests(
        &self,
        volume: &VolumeId,
        snapshot: Option<&SnapshotId>,
        chunks: &[u64],
    ) -> PeerResult<Vec<(u64, Accumulator)>>;
    /// The replica's snapshots, oldest first.
    async fn snapshots(&self, volume: &VolumeId) -> PeerResult<Vec<SnapshotInfo>>;
    /// Streams snapshot `snapshot`'s layer or image (see [`StreamKind`]) of
    /// `chunks`.
    async fn stream(
        &self,
        volume: &VolumeId,
        snapshot: &SnapshotId,
        chunks: &[u64],
        kind: StreamKind,
    ) -> PeerResult<BlockStream>;
    /// Per chunk: (chunk, data blocks, zero blocks) a stream would carry.
    async fn count_blocks(
        &self,
        volume: &VolumeId,
        snapshot: &SnapshotId,
        chunks: &[u64],
        kind: StreamKind,
    ) -> PeerResult<Vec<(u64, u64, u64)>>;
    /// One page of the head layer's block indexes in `chunks`, from
    /// `start` on; and where the next page starts.
    async fn head_blocks(
        &self,
        volume: &VolumeId,
        chunks: &[u64],
        start: u64,
    ) -> PeerResult<(Vec<u64>, Option<u64>)>;
}

fn local_error(agent: &str, e: Error) -> PeerError {
    let kind = match &e {
        Error::StaleEpoch { .. } => PeerErrorKind::Fenced,
        Error::Checksum { .. } | Error::Corrupt { .. } => PeerErrorKind::Corrupt,
        Error::Io { .. }
        | Error::StoreIo { .. }
        | Error::Meta { .. }
        | Error::NotServing { .. } => PeerErrorKind::Unavailable,
        Error::ReplicaNotFound { .. }
        | Error::ReplicaExists { .. }
        | Error::SnapshotNotFound { .. }
        | Error::SnapshotExists { .. }
        | Error::StaleGeneration { .. }
        | Error::Range { .. }
        | Error::Geometry { .. }
        | Error::ChunkNotHeld { .. } => PeerErrorKind::Refused,
    };
    PeerError { agent: agent.to_string(), kind, message: e.to_string() }
}

thread_local! {
    /// Set while a frontend worker blocks on a head's future (see
    /// [`on_frontend_thread`]).
    static FRONTEND_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (which blocks on the runtime, e.g. `Handle::block_on` of a head
/// I/O) with this thread marked as a frontend worker: the [`LocalPeer`]
/// calls of the futures it polls run here, on this thread, instead of being
/// handed to the blocking pool and back. That saves two thread switches per
/// local replica call (a 4 KiB write through FUSE took six). Only for
/// threads outside the runtime, which may block as long as they like.
pub fn on_frontend_thread<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            FRONTEND_THREAD.set(self.0);
        }
    }
    let _reset = Reset(FRONTEND_THREAD.replace(true));
    f()
}

/// This agent's own store.
#[derive(Debug, Clone)]
pub struct LocalPeer {
    name: String,
    store: Arc<Store>,
}

impl LocalPeer {
    pub fn new(name: impl Into<String>, store: Arc<Store>) -> Self {
        LocalPeer { name: name.into(), store }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, Error> + Send + 'static,
    ) -> PeerResult<T> {
        let res = if FRONTEND_THREAD.get() {
            // Let the other calls of a fan-out (a write to another agent)
            // be sent first, so they run while this one blocks the thread.
            tokio::task::yield_now().await;
            Ok(f(&self.store))
        } else {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || f(&store)).await
        };
        match res {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(local_error(&self.name, e)),
            Err(e) => Err(PeerError {
                agent: self.name.clone(),
                kind: PeerErrorKind::Unavailable,
                message: format!("store task failed: {e}"),
            }),
        }
    }
}

#[tonic::async_trait]
impl ReplicaPeer for LocalPeer {
    fn agent(&self) -> &str {
        &self.name
    }

    async fn ensure(
        &self,
        volume: &VolumeId,
        geometry: Geometry,
        chunks: ChunkSet,
    ) -> PeerResult<ReplicaInfo> {
        let v = volume.clone();
        self.run(move |s| s.create_replica(&v, geometry, chunks).map(|r| r.info())).await
    }

    async fn revert_head(&self, volume: &VolumeId, epoch: u64) -> PeerResult<()> {
        let v = volume.clone();
        self.run(move |s| s.revert_head(&v, epoch).map(drop)).await
    }

    async fn delete_replica(&self, volume: &VolumeId) -> PeerResult<()> {
        let v = volume.clone();
        self.run(move |s| match s.delete_replica(&v) {
            Err(Error::ReplicaNotFound { .. }) => Ok(()),
            other => other,
        })
        .await
    }

    async fn fence(&self, volume: &VolumeId, epoch: u64) -> PeerResult<u64> {
        let v = volume.clone();
        self.run(move |s| s.replica(&v)?.fence(epoch)).await
    }

    async fn write(
        &self,
        volume: &VolumeId,
        epoch: u64,
        offset: u64,
        data: Bytes,
    ) -> PeerResult<()> {
        let v = volume.clone();
        self.run(move |s| s.replica(&v)?.write(epoch, offset, &data)).await
    }

    async fn read(
        &self,
        volume: &VolumeId,
        snapshot: Option<&SnapshotId>,
        offset: u64,
        len: u64,
    ) -> PeerResult<Bytes> {
        let (v, snap) = (volume.clone(), snapshot.cloned());
        self.run(move |s| s.replica(&v)?.read(offset, len, snap.as_ref()).map(Bytes::from)).await
    }

    async fn trim(&self, volume: &VolumeId, epoch: u64, offset: u64, len: u64) -> PeerResult<()> {
        let v = volume.clone();
        self.run(move |s| s.replica(&v)?.trim(epoch, offset, len)).await
    }

    async fn flush(&self, volume: &VolumeId, epoch: u64) -> PeerResult<()> {
        let v = volume.clone();
        self.run(move |s| s.replica(&v)?.flush(epoch)).await
    }

    async fn seal(
        &self,
        volume: &VolumeId,
        epoch: u64,
        id: &SnapshotId,
        generation: u64,
    ) -> PeerResult<()> {
        let (v, id) = (volume.clone(), id.clone());
        self.run(move |s| s.replica(&v)?.seal(epoch, &id, generation).map(drop)).await
    }

    async fn mark_divergent(
        &self,
        volume: &VolumeId,
        epoch: u64,
        ids: &[SnapshotId],
    ) -> PeerResult<()> {
        let (v, ids) = (volume.clone(), ids.to_vec());
        self.run(move |s| s.replica(&v)?.mark_divergent(epoch, &ids)).await
    }

    async fn delete_snapshot(&self, volume: &VolumeId, id: &SnapshotId) -> PeerResult<()> {
        let (v, id) = (volume.clone(), id.clone());
        self.run(move |s| s.replica(&v)?.delete_snapshot(&id)).await
    }

    async fn chunk_digests(
        &self,
        volume: &VolumeId,
        snapshot: Option<&SnapshotId>,
        chunks: &[u64],
    ) -> PeerResult<Vec<(u64, Accumulator)>> {
        let (v, snap, chunks) = (volume.clone(), snapshot.cloned(), chunks.to_vec());
        self.run(move |s| s.replica(&v)?.chunk_digests(snap.as_ref(), &chunks)).await
    }

    async fn snapshots(&self, volume: &VolumeId) -> PeerResult<Vec<SnapshotInfo>> {
        let v = volume.clone();
        self.run(move |s| s.replica(&v)?.snapshots()).await
    }

    async fn stream(
        &self,
        volume: &VolumeId,
        snapshot: &SnapshotId,
        chunks: &[u64],
        kind: StreamKind,
    ) -> PeerResult<BlockStream> {
        let snap = snapshot.clone();
        let rx = crate::stream::spawn_stream(
            self.store.clone(),
            volume.clone(),
            chunks.to_vec(),
            LOCAL_STREAM_BATCH,
            move |r, c| match kind {
                StreamKind::Layer => r.list_layer(&snap, c),
                StreamKind::Image => r.list_image(&snap, c),
            },
        );
        let name = self.name.clone();
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |batch| {
            let blocks = batch.map_err(|e| local_error(&name, e))?;
            Ok(blocks
                .into_iter()
                .map(|b| CopiedBlock { block: b.block, data: b.data.map(Bytes::from) })
                .collect())
        });
        Ok(Box::pin(stream))
    }

    async fn count_blocks(
        &self,
        volume: &VolumeId,
        snapshot: &SnapshotId,
        chunks: &[u64],
        kind: StreamKind,
    ) -> PeerResult<Vec<(u64, u64, u64)>> {
        let (v, snap, chunks) = (volume.clone(), snapshot.clone(), chunks.to_vec());
        let image = kind == StreamKind::Image;
        self.run(move |s| s.replica(&v)?.count_blocks(&snap, &chunks, image)).await
    }

    async fn head_blocks(
        &self,
        volume: &VolumeId,
        chunks: &[u64],
        start: u64,
    ) -> PeerResult<(Vec<u64>, Option<u64>)> {
        let (v, chunks) = (volume.clone(), chunks.to_vec());
        self.run(move |s| {
            s.replica(&v)?.list_head_blocks(&chunks, start, crate::service::HEAD_BLOCKS_PAGE)
        })
        .await
    }
}

/// Blocks per batch of a local stream (1 MiB of data).
const LOCAL_STREAM_BATCH: usize = 256;

/// Another agent, over gRPC.
#[derive(Debug, Clone)]
pub struct GrpcPeer {
    name: String,
    client: ReplicaStoreClient<Channel>,
    timeout: Duration,
}

impl GrpcPeer {
    /// A peer at `endpoint` (`http://host:port`); connects lazily, so an
    /// agent that is down now is an error at the first call, not here.
    pub fn new(name: impl Into<String>, endpoint: &str, timeout: Duration) -> Result<Self, String> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("agent endpoint {endpoint:?} is not a URI: {e}"))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .initial_connection_window_size(crate::service::H2_CONNECTION_WINDOW)
            .initial_stream_window_size(crate::service::H2_STREAM_WINDOW)
            .max_frame_size(crate::service::H2_MAX_FRAME)
            .connect_lazy();
        let client = ReplicaStoreClient::new(channel)
            .max_decoding_message_size(crate::service::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::service::MAX_MESSAGE_BYTES);
        Ok(GrpcPeer { name: name.into(), client, timeout })
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
        ReplicaInfo::try_from(&info).map_err(|e| self.bad_answer(format!("replica info: {e}")))
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

    async fn fence(&self, volume: &VolumeId, epoch: u64) -> PeerResult<u64> {
        let req = pb::FenceRequest { volume_id: volume.to_string(), epoch };
        self.call(self.client.clone().fence(req)).await.map(|r| r.epoch)
    }

    async fn write(
        &self,
        volume: &VolumeId,
        epoch: u64,
        offset: u64,
        data: Bytes,
    ) -> PeerResult<()> {
        let req = pb::WriteBlocksRequest { volume_id: volume.to_string(), offset, data, epoch };
        self.call(self.client.clone().write_blocks(req)).await.map(drop)
    }

    async fn read(
        &self,
        volume: &VolumeId,
        snapshot: Option<&SnapshotId>,
        offset: u64,
        len: u64,
    ) -> PeerResult<Bytes> {
        let req = pb::ReadBlocksRequest {
            volume_id: volume.to_string(),
            offset,
            length: len,
            snapshot_id: snapshot.map(|s| s.to_string()).unwrap_or_default(),
        };
        self.call(self.client.clone().read_blocks(req)).await.map(|r| r.data)
    }

    async fn trim(&self, volume: &VolumeId, epoch: u64, offset: u64, len: u64) -> PeerResult<()> {
        let req = pb::TrimRequest { volume_id: volume.to_string(), offset, length: len, epoch };
        self.call(self.client.clone().trim(req)).await.map(drop)
    }

    async fn flush(&self, volume: &VolumeId, epoch: u64) -> PeerResult<()> {
        let req = pb::FlushRequest { volume_id: volume.to_string(), epoch };
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
