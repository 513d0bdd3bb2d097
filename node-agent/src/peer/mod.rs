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

use std::{collections::BTreeSet, fmt, pin::Pin};

use bytes::Bytes;
use cairn_api::{
    Accumulator, ChunkSet, Geometry, SnapshotId, VolumeId,
    snapshot::{ReplicaInfo, SnapshotInfo},
};
use futures::Stream;

mod grpc;
mod local;

pub use grpc::GrpcPeer;
pub use local::{LocalPeer, on_frontend_thread};

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
    /// returns what it holds. The peer remembers the incarnation returned
    /// and sends it with every later write, read, trim, flush and in-sync
    /// record: a reloaded replica refuses them (`Unavailable`), so a head
    /// never takes a restarted replica for the one it wrote to.
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
    /// Raises the replica's epoch to `epoch` for the head `head` (its
    /// agent's name); another head at the same epoch is refused (`Fenced`).
    async fn fence(&self, volume: &VolumeId, epoch: u64, head: &str) -> PeerResult<u64>;
    /// Records, durably, the head's in-sync set at (`epoch`, `seq`).
    async fn set_in_sync(
        &self,
        volume: &VolumeId,
        epoch: u64,
        head: &str,
        seq: u64,
        members: &BTreeSet<String>,
    ) -> PeerResult<()>;
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
