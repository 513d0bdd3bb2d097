//! Domain views of replicas and snapshots as the agent reports them.

use crate::{ChunkSet, Digest, Geometry, SnapshotId, VolumeId};

/// One sealed snapshot of a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    pub generation: u64,
    /// Digest of the replica's content as of the snapshot.
    pub digest: Digest,
    /// Volume size as of the snapshot.
    pub size: u64,
    /// Blocks in the snapshot's layer (changed since the snapshot before).
    pub changed_blocks: u64,
    pub sealed_at_unix: i64,
    /// A resync rolled the volume back past it: kept, but no longer in the
    /// volume's line of snapshots.
    pub divergent: bool,
}

/// One replica held by an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub volume: VolumeId,
    pub geometry: Geometry,
    pub chunks: ChunkSet,
    pub sealed_layers: u32,
    /// The highest volume-head epoch admitted.
    pub epoch: u64,
    pub head_blocks: u64,
    pub used_bytes: u64,
    pub serving: bool,
}
