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

use std::{cell::Cell, fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use cairn_api::{
    Accumulator, ChunkSet, Geometry, SnapshotId, VolumeId,
    agent::{
        REASON_METADATA, REASON_STALE_EPOCH,
        v1::{self as pb, replica_store_client::ReplicaStoreClient},
    },
};
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

/// The replica of one volume on one agent, as a head uses it.
#[tonic::async_trait]
pub trait ReplicaPeer: Send + Sync + fmt::Debug {
    /// The agent's name (as in the placement).
    fn agent(&self) -> &str;
    /// Creates the replica if missing (idempotent for the same geometry).
    async fn ensure(
        &self,
        volume: &VolumeId,
        geometry: Geometry,
        chunks: ChunkSet,
    ) -> PeerResult<()>;
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
    async fn chunk_digests(
        &self,
        volume: &VolumeId,
        snapshot: Option<&SnapshotId>,
        chunks: &[u64],
    ) -> PeerResult<Vec<(u64, Accumulator)>>;
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
        let kind_of = |e: &Error| match e {
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
        match res {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(PeerError {
                agent: self.name.clone(),
                kind: kind_of(&e),
                message: e.to_string(),
            }),
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
    ) -> PeerResult<()> {
        let v = volume.clone();
        self.run(move |s| s.create_replica(&v, geometry, chunks).map(drop)).await
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
}

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
        PeerError { agent: self.name.clone(), kind, message: s.message().to_string() }
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
    ) -> PeerResult<()> {
        let req = pb::CreateReplicaRequest {
            volume_id: volume.to_string(),
            size_bytes: geometry.size(),
            chunk_size_bytes: geometry.chunk_size(),
            chunks: Some((&chunks).into()),
        };
        self.call(self.client.clone().create_replica(req)).await.map(drop)
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
}
