//! The gRPC edge of the replica store (`cairn.agent.v1.ReplicaStore`):
//! converts requests to domain types (refusing bad ids, ranges and
//! geometries), runs the store's blocking work off the async runtime (small
//! reads and writes that need not wait for a lock run in place), and maps
//! every store error to a status code (`grpc::status`).

use std::sync::Arc;

use cairn_api::{
    ChunkSet, Geometry,
    agent::{
        INCARNATION_METADATA,
        v1::{self as pb, replica_store_server::ReplicaStore},
    },
    convert,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{
    convert::to_batch,
    status::{field, store_status},
};
use crate::{
    error::Error,
    replica::stream::Listed,
    store::{Store, spawn_stream},
    transport::{HEAD_BLOCKS_PAGE, MAX_HEAD_BLOCKS_PAGE, MAX_MESSAGE_BYTES},
};

/// The replica incarnation a request expects (metadata
/// `cairn-incarnation`; absent or unparsable: 0, unchecked).
fn incarnation<T>(req: &Request<T>) -> u64 {
    req.metadata()
        .get(INCARNATION_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Blocks per streamed batch (1 MiB of data).
const STREAM_BATCH: usize = 256;

/// The replica store served over gRPC.
#[derive(Debug, Clone)]
pub struct ReplicaStoreService {
    store: Arc<Store>,
}

impl ReplicaStoreService {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    pub fn into_server(self) -> pb::replica_store_server::ReplicaStoreServer<Self> {
        pb::replica_store_server::ReplicaStoreServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Runs blocking store work on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, Error> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Status::internal(format!("store task failed: {e}")))?
            .map_err(store_status)
    }

    /// Streams blocks one chunk at a time (see [`spawn_stream`]).
    fn stream(
        &self,
        volume: cairn_api::VolumeId,
        chunks: Vec<u64>,
        list: impl Fn(&crate::Replica, &[u64]) -> Result<Vec<Listed>, Error> + Send + 'static,
    ) -> Result<Response<ReceiverStream<Result<pb::BlockBatch, Status>>>, Status> {
        let mut blocks = spawn_stream(self.store.clone(), volume, chunks, STREAM_BATCH, list);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(msg) = blocks.recv().await {
                let msg = msg.map(to_batch).map_err(store_status);
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl ReplicaStore for ReplicaStoreService {
    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn create_replica(
        &self,
        req: Request<pb::CreateReplicaRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let geometry = Geometry::new(r.size_bytes, r.chunk_size_bytes)
            .map_err(|e| Status::invalid_argument(format!("volume {volume}: {e}")))?;
        let chunks = ChunkSet::try_from(r.chunks).map_err(field)?;
        let info = self
            .run(move |s| s.create_replica(&volume, geometry, chunks).map(|r| r.info()))
            .await?;
        Ok(Response::new((&info).into()))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn open_replica(
        &self,
        req: Request<pb::OpenReplicaRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let volume = convert::volume_id("volume_id", &req.get_ref().volume_id).map_err(field)?;
        let info = self.run(move |s| s.open_replica(&volume).map(|r| r.info())).await?;
        Ok(Response::new((&info).into()))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn delete_replica(
        &self,
        req: Request<pb::DeleteReplicaRequest>,
    ) -> Result<Response<pb::DeleteReplicaResponse>, Status> {
        let volume = convert::volume_id("volume_id", &req.get_ref().volume_id).map_err(field)?;
        self.run(move |s| s.delete_replica(&volume)).await?;
        Ok(Response::new(pb::DeleteReplicaResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn list_replicas(
        &self,
        _req: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        let replicas = self.store.replicas().iter().map(|r| (&r.info()).into()).collect();
        Ok(Response::new(pb::ListReplicasResponse { replicas }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, offset = req.get_ref().offset, len = req.get_ref().data.len()))]
    async fn write_blocks(
        &self,
        req: Request<pb::WriteBlocksRequest>,
    ) -> Result<Response<pb::WriteBlocksResponse>, Status> {
        let expected = incarnation(&req);
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        // A small write whose replica is free right now is done here: that
        // is cheaper than two thread switches to the blocking pool and back.
        let replica = self.store.replica(&volume).map_err(store_status)?;
        replica.check_incarnation(expected).map_err(store_status)?;
        if let Some(done) = replica.try_write(r.epoch, r.offset, &r.data) {
            done.map_err(store_status)?;
            return Ok(Response::new(pb::WriteBlocksResponse {}));
        }
        self.run(move |_| replica.write(r.epoch, r.offset, &r.data)).await?;
        Ok(Response::new(pb::WriteBlocksResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, offset = req.get_ref().offset, len = req.get_ref().length))]
    async fn read_blocks(
        &self,
        req: Request<pb::ReadBlocksRequest>,
    ) -> Result<Response<pb::ReadBlocksResponse>, Status> {
        let expected = incarnation(&req);
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::optional_snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        // As for writes: a small read no writer holds up is done here.
        let replica = self.store.replica(&volume).map_err(store_status)?;
        replica.check_incarnation(expected).map_err(store_status)?;
        let data = match replica.try_read(r.offset, r.length, snap.as_ref()) {
            Some(done) => done.map_err(store_status)?,
            None => self.run(move |_| replica.read(r.offset, r.length, snap.as_ref())).await?,
        };
        Ok(Response::new(pb::ReadBlocksResponse { data: data.into() }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn trim(
        &self,
        req: Request<pb::TrimRequest>,
    ) -> Result<Response<pb::TrimResponse>, Status> {
        let expected = incarnation(&req);
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        self.run(move |s| {
            let replica = s.replica(&volume)?;
            replica.check_incarnation(expected)?;
            replica.trim(r.epoch, r.offset, r.length)
        })
        .await?;
        Ok(Response::new(pb::TrimResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn grow(
        &self,
        req: Request<pb::GrowRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let info =
            self.run(move |s| s.replica(&volume)?.grow(r.new_size_bytes, &r.add_chunks)).await?;
        Ok(Response::new((&info).into()))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn flush(
        &self,
        req: Request<pb::FlushRequest>,
    ) -> Result<Response<pb::FlushResponse>, Status> {
        let expected = incarnation(&req);
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        self.run(move |s| {
            let replica = s.replica(&volume)?;
            replica.check_incarnation(expected)?;
            replica.flush(r.epoch)
        })
        .await?;
        Ok(Response::new(pb::FlushResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, epoch = req.get_ref().epoch))]
    async fn fence(
        &self,
        req: Request<pb::FenceRequest>,
    ) -> Result<Response<pb::FenceResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let epoch = self.run(move |s| s.replica(&volume)?.fence_as(r.epoch, &r.head)).await?;
        Ok(Response::new(pb::FenceResponse { epoch }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, epoch = req.get_ref().epoch, seq = req.get_ref().seq))]
    async fn set_in_sync(
        &self,
        req: Request<pb::SetInSyncRequest>,
    ) -> Result<Response<pb::SetInSyncResponse>, Status> {
        let expected = incarnation(&req);
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        self.run(move |s| {
            let replica = s.replica(&volume)?;
            replica.check_incarnation(expected)?;
            replica.set_in_sync(r.epoch, &r.head, r.seq, r.members.into_iter().collect())
        })
        .await?;
        Ok(Response::new(pb::SetInSyncResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, snapshot = %req.get_ref().snapshot_id))]
    async fn seal_snapshot(
        &self,
        req: Request<pb::SealSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let info =
            self.run(move |s| s.replica(&volume)?.seal(r.epoch, &snap, r.generation)).await?;
        Ok(Response::new((&info).into()))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let volume = convert::volume_id("volume_id", &req.get_ref().volume_id).map_err(field)?;
        let snaps = self.run(move |s| s.replica(&volume)?.snapshots()).await?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: snaps.iter().map(Into::into).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, snapshot = %req.get_ref().snapshot_id))]
    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        self.run(move |s| s.replica(&volume)?.delete_snapshot(&snap)).await?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn chunk_digests(
        &self,
        req: Request<pb::ChunkDigestsRequest>,
    ) -> Result<Response<pb::ChunkDigestsResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::optional_snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let accs =
            self.run(move |s| s.replica(&volume)?.chunk_digests(snap.as_ref(), &r.chunks)).await?;
        Ok(Response::new(pb::ChunkDigestsResponse {
            chunks: accs
                .into_iter()
                .map(|(chunk, acc)| pb::ChunkDigest {
                    chunk,
                    accumulator: acc.to_bytes().to_vec().into(),
                })
                .collect(),
        }))
    }

    type StreamLayerStream = ReceiverStream<Result<pb::BlockBatch, Status>>;

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, snapshot = %req.get_ref().snapshot_id))]
    async fn stream_layer(
        &self,
        req: Request<pb::StreamLayerRequest>,
    ) -> Result<Response<Self::StreamLayerStream>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        self.stream(volume, r.chunks, move |rep, c| rep.list_layer(&snap, c))
    }

    type StreamImageStream = ReceiverStream<Result<pb::BlockBatch, Status>>;

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, snapshot = %req.get_ref().snapshot_id))]
    async fn stream_image(
        &self,
        req: Request<pb::StreamImageRequest>,
    ) -> Result<Response<Self::StreamImageStream>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        self.stream(volume, r.chunks, move |rep, c| rep.list_image(&snap, c))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn count_blocks(
        &self,
        req: Request<pb::CountBlocksRequest>,
    ) -> Result<Response<pb::CountBlocksResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let snap = convert::snapshot_id("snapshot_id", &r.snapshot_id).map_err(field)?;
        let counts =
            self.run(move |s| s.replica(&volume)?.count_blocks(&snap, &r.chunks, r.image)).await?;
        Ok(Response::new(pb::CountBlocksResponse {
            chunks: counts
                .into_iter()
                .map(|(chunk, data_blocks, zero_blocks)| pb::ChunkCount {
                    chunk,
                    data_blocks,
                    zero_blocks,
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn revert_head(
        &self,
        req: Request<pb::RevertHeadRequest>,
    ) -> Result<Response<pb::RevertHeadResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        self.run(move |s| s.revert_head(&volume, r.epoch).map(drop)).await?;
        Ok(Response::new(pb::RevertHeadResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn mark_divergent(
        &self,
        req: Request<pb::MarkDivergentRequest>,
    ) -> Result<Response<pb::MarkDivergentResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        if r.snapshot_ids.is_empty() {
            return Err(Status::invalid_argument("snapshot_ids: name at least one snapshot"));
        }
        let ids = r
            .snapshot_ids
            .iter()
            .map(|i| convert::snapshot_id("snapshot_ids", i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(field)?;
        self.run(move |s| s.replica(&volume)?.mark_divergent(r.epoch, &ids)).await?;
        Ok(Response::new(pb::MarkDivergentResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn list_head_blocks(
        &self,
        req: Request<pb::ListHeadBlocksRequest>,
    ) -> Result<Response<pb::ListHeadBlocksResponse>, Status> {
        let r = req.into_inner();
        let volume = convert::volume_id("volume_id", &r.volume_id).map_err(field)?;
        let limit = match r.limit {
            0 => HEAD_BLOCKS_PAGE,
            n if n as usize > MAX_HEAD_BLOCKS_PAGE => {
                return Err(Status::invalid_argument(format!(
                    "limit {n} is over the most indexes one page may carry ({MAX_HEAD_BLOCKS_PAGE}); ask for fewer and follow next_block"
                )));
            }
            n => n as usize,
        };
        let (blocks, next_block) = self
            .run(move |s| s.replica(&volume)?.list_head_blocks(&r.chunks, r.start_block, limit))
            .await?;
        Ok(Response::new(pb::ListHeadBlocksResponse { blocks, next_block }))
    }

    #[tracing::instrument(skip_all)]
    async fn stat(
        &self,
        _req: Request<pb::StatRequest>,
    ) -> Result<Response<pb::StatResponse>, Status> {
        let (stat, replicas) = self
            .run(|s| {
                let stat = s.stat()?;
                let mut out = Vec::new();
                for r in s.replicas() {
                    let layers = r
                        .layer_summary()
                        .into_iter()
                        .map(|(snap, blocks)| pb::LayerInfo {
                            snapshot_id: snap.map(|s| s.to_string()).unwrap_or_default(),
                            blocks,
                        })
                        .collect();
                    out.push(pb::ReplicaStat {
                        volume_id: r.volume().to_string(),
                        layers,
                        used_bytes: r.info().used_bytes,
                    });
                }
                Ok((stat, out))
            })
            .await?;
        Ok(Response::new(pb::StatResponse {
            capacity_bytes: stat.capacity_bytes,
            used_bytes: stat.used_bytes,
            available_bytes: stat.available_bytes,
            replicas,
        }))
    }
}
