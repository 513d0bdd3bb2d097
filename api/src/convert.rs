//! Protobuf <-> domain conversions. Storage code only sees domain types; the
//! gRPC edge converts here and maps the errors to status codes.

use std::collections::BTreeSet;

use crate::agent::v1 as pb;
use crate::snapshot::{ReplicaInfo, SnapshotInfo};
use crate::{ChunkSet, Digest, IdError, SnapshotId, VolumeId};

/// A field of a request that could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("field {field}: {source}")]
    Id {
        field: &'static str,
        #[source]
        source: IdError,
    },
    #[error("field {field}: {message}")]
    Invalid { field: &'static str, message: String },
}

/// Parses a required id field.
pub fn volume_id(field: &'static str, value: &str) -> Result<VolumeId, FieldError> {
    VolumeId::new(value).map_err(|source| FieldError::Id { field, source })
}

/// Parses a required snapshot id field.
pub fn snapshot_id(field: &'static str, value: &str) -> Result<SnapshotId, FieldError> {
    SnapshotId::new(value).map_err(|source| FieldError::Id { field, source })
}

/// Parses an optional snapshot id: empty means "none" (the head).
pub fn optional_snapshot_id(
    field: &'static str,
    value: &str,
) -> Result<Option<SnapshotId>, FieldError> {
    if value.is_empty() { Ok(None) } else { snapshot_id(field, value).map(Some) }
}

impl TryFrom<Option<pb::ChunkSet>> for ChunkSet {
    type Error = FieldError;
    fn try_from(set: Option<pb::ChunkSet>) -> Result<Self, FieldError> {
        match set {
            None => Err(FieldError::Invalid {
                field: "chunks",
                message: "missing: set all=true or list the chunk indexes this replica holds"
                    .into(),
            }),
            Some(pb::ChunkSet { all: true, chunks }) if !chunks.is_empty() => {
                Err(FieldError::Invalid {
                    field: "chunks",
                    message: "all=true and a chunk list were both given: give one".into(),
                })
            }
            Some(pb::ChunkSet { all: true, .. }) => Ok(ChunkSet::All),
            Some(pb::ChunkSet { chunks, .. }) if chunks.is_empty() => Err(FieldError::Invalid {
                field: "chunks",
                message: "no chunks listed: a replica holds at least one chunk (or all=true)"
                    .into(),
            }),
            Some(pb::ChunkSet { chunks, .. }) => {
                let set: BTreeSet<u64> = chunks.iter().copied().collect();
                if set.len() != chunks.len() {
                    return Err(FieldError::Invalid {
                        field: "chunks",
                        message: "a chunk index is listed twice".into(),
                    });
                }
                Ok(ChunkSet::Some(set))
            }
        }
    }
}

impl From<&ChunkSet> for pb::ChunkSet {
    fn from(set: &ChunkSet) -> Self {
        match set {
            ChunkSet::All => pb::ChunkSet { all: true, chunks: vec![] },
            ChunkSet::Some(s) => pb::ChunkSet { all: false, chunks: s.iter().copied().collect() },
        }
    }
}

impl From<&SnapshotInfo> for pb::SnapshotInfo {
    fn from(s: &SnapshotInfo) -> Self {
        pb::SnapshotInfo {
            snapshot_id: s.id.to_string(),
            generation: s.generation,
            digest: s.digest.0.to_vec().into(),
            size_bytes: s.size,
            changed_blocks: s.changed_blocks,
            sealed_at_unix: s.sealed_at_unix,
            divergent: s.divergent,
        }
    }
}

impl TryFrom<&pb::SnapshotInfo> for SnapshotInfo {
    type Error = FieldError;
    fn try_from(s: &pb::SnapshotInfo) -> Result<Self, FieldError> {
        Ok(SnapshotInfo {
            id: snapshot_id("snapshot_id", &s.snapshot_id)?,
            generation: s.generation,
            digest: Digest::try_from(&s.digest[..]).map_err(|len| FieldError::Invalid {
                field: "digest",
                message: format!("{len} bytes, expected 32"),
            })?,
            size: s.size_bytes,
            changed_blocks: s.changed_blocks,
            sealed_at_unix: s.sealed_at_unix,
            divergent: s.divergent,
        })
    }
}

impl From<&ReplicaInfo> for pb::ReplicaInfo {
    fn from(r: &ReplicaInfo) -> Self {
        pb::ReplicaInfo {
            volume_id: r.volume.to_string(),
            size_bytes: r.geometry.size(),
            chunk_size_bytes: r.geometry.chunk_size(),
            chunks: Some((&r.chunks).into()),
            sealed_layers: r.sealed_layers,
            epoch: r.epoch,
            head_blocks: r.head_blocks,
            used_bytes: r.used_bytes,
            serving: r.serving,
            incarnation: r.incarnation,
            in_sync: r.in_sync.as_ref().map(|s| pb::InSyncRecord {
                epoch: s.epoch,
                seq: s.seq,
                members: s.members.iter().cloned().collect(),
            }),
        }
    }
}

impl TryFrom<&pb::ReplicaInfo> for ReplicaInfo {
    type Error = FieldError;
    fn try_from(r: &pb::ReplicaInfo) -> Result<Self, FieldError> {
        Ok(ReplicaInfo {
            volume: volume_id("volume_id", &r.volume_id)?,
            geometry: crate::Geometry::new(r.size_bytes, r.chunk_size_bytes)
                .map_err(|e| FieldError::Invalid { field: "size_bytes", message: e.to_string() })?,
            chunks: ChunkSet::try_from(r.chunks.clone())?,
            sealed_layers: r.sealed_layers,
            epoch: r.epoch,
            head_blocks: r.head_blocks,
            used_bytes: r.used_bytes,
            serving: r.serving,
            incarnation: r.incarnation,
            in_sync: r.in_sync.as_ref().map(|s| crate::snapshot::InSyncRecord {
                epoch: s.epoch,
                seq: s.seq,
                members: s.members.iter().cloned().collect(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sets_convert_and_refuse_nonsense() {
        let all = ChunkSet::try_from(Some(pb::ChunkSet { all: true, chunks: vec![] })).unwrap();
        assert_eq!(all, ChunkSet::All);
        let some = ChunkSet::try_from(Some(pb::ChunkSet { all: false, chunks: vec![3, 1] }));
        assert_eq!(some.unwrap(), ChunkSet::Some([1, 3].into()));
        for bad in [
            None,
            Some(pb::ChunkSet { all: true, chunks: vec![1] }),
            Some(pb::ChunkSet { all: false, chunks: vec![] }),
            Some(pb::ChunkSet { all: false, chunks: vec![2, 2] }),
        ] {
            assert!(ChunkSet::try_from(bad).is_err());
        }
    }

    #[test]
    fn snapshot_info_round_trips() {
        let s = SnapshotInfo {
            id: SnapshotId::new("s1").unwrap(),
            generation: 4,
            digest: Digest([9; 32]),
            size: 1 << 30,
            changed_blocks: 12,
            sealed_at_unix: 1_700_000_000,
            divergent: true,
        };
        assert_eq!(SnapshotInfo::try_from(&pb::SnapshotInfo::from(&s)).unwrap(), s);
    }
}
