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
    /// Changes on every load (agent restart, reopen) and create of the
    /// replica; 0 from an agent that does not report it.
    pub incarnation: u64,
    /// The in-sync set the replica last recorded; `None` for a replica
    /// written before the record existed.
    pub in_sync: Option<InSyncRecord>,
}

/// A volume head's in-sync set as recorded, durably, on a replica.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct InSyncRecord {
    /// The epoch of the head that recorded it.
    pub epoch: u64,
    /// Grows with every change of the set under one epoch.
    pub seq: u64,
    /// The agents that held every acknowledged write as of the record;
    /// empty for a replica on which no head has recorded a set yet.
    pub members: std::collections::BTreeSet<String>,
}

impl InSyncRecord {
    /// Records order by (epoch, seq).
    pub fn version(&self) -> (u64, u64) {
        (self.epoch, self.seq)
    }
}
