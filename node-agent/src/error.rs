//! The replica store's errors. Each says what failed, where (volume, chunk,
//! offset, path) and what to do; the gRPC edge maps each variant to a status
//! code with an exhaustive match.

use std::{io, path::PathBuf};

use cairn_api::{GeometryError, RangeError, SnapshotId, VolumeId};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("volume {volume} has no replica on this agent: create it first (CreateReplica)")]
    ReplicaNotFound { volume: VolumeId },
    #[error(
        "volume {volume} already has a replica here with {existing}: delete it first, or repeat the request with the same geometry"
    )]
    ReplicaExists { volume: VolumeId, existing: String },
    #[error("snapshot {snapshot} of volume {volume} does not exist on this agent")]
    SnapshotNotFound { volume: VolumeId, snapshot: SnapshotId },
    #[error(
        "snapshot {snapshot} of volume {volume} already exists (generation {generation}): snapshot ids are never reused; pick a new id"
    )]
    SnapshotExists { volume: VolumeId, snapshot: SnapshotId, generation: u64 },
    #[error(
        "snapshot {snapshot} of volume {volume}: generation {generation} is not above {last}, the generation of the newest snapshot; generations only grow"
    )]
    StaleGeneration { volume: VolumeId, snapshot: SnapshotId, generation: u64, last: u64 },
    #[error(
        "volume {volume}: request carries epoch {request} but this replica has admitted epoch {current}: a newer volume head has taken over and this one is fenced; reopen the head with a higher epoch"
    )]
    StaleEpoch { volume: VolumeId, request: u64, current: u64 },
    #[error(
        "volume {volume}: epoch {epoch} belongs to the head on agent {holder}, so the head on agent {request} may not use it: two heads never share an epoch; reopen with a higher epoch"
    )]
    EpochTaken { volume: VolumeId, epoch: u64, holder: String, request: String },
    #[error(
        "volume {volume}: the request expects replica incarnation {expected} but this is incarnation {actual}: the replica was reloaded (agent restart or OpenReplica) and may lack writes that were never flushed; the head must rebuild it"
    )]
    Incarnation { volume: VolumeId, expected: u64, actual: u64 },
    #[error(
        "volume {volume}: in-sync set ({}, {}) is older than the one recorded here ({}, {})",
        request.0, request.1, current.0, current.1
    )]
    StaleInSync { volume: VolumeId, request: (u64, u64), current: (u64, u64) },
    #[error("volume {volume}: {source}")]
    Range {
        volume: VolumeId,
        #[source]
        source: RangeError,
    },
    #[error("volume {volume}: {source}")]
    Geometry {
        volume: VolumeId,
        #[source]
        source: GeometryError,
    },
    #[error(
        "volume {volume}: chunk {chunk} (byte offset {offset}) is not held by this replica, which holds {held}"
    )]
    ChunkNotHeld { volume: VolumeId, chunk: u64, offset: u64, held: String },
    #[error(
        "volume {volume}: checksum mismatch in chunk {chunk}, block at byte offset {offset} ({layer}): stored CRC32C {stored:#010x}, data has {actual:#010x}; the block is corrupt on this replica: read it from another replica or rebuild this one"
    )]
    Checksum { volume: VolumeId, chunk: u64, offset: u64, layer: String, stored: u32, actual: u32 },
    #[error(
        "volume {volume}: I/O error while {op} ({path}): {source}; the replica stops serving until it is reopened (OpenReplica)"
    )]
    Io {
        volume: VolumeId,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("agent data dir: I/O error while {op} ({path}): {source}")]
    StoreIo {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("metadata store error while {op}: {source}")]
    Meta {
        op: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("volume {volume}: metadata is damaged: {detail}")]
    Corrupt { volume: String, detail: String },
    #[error(
        "replica of volume {volume} is not serving after an earlier error ({reason}): reopen it (OpenReplica) once the disk is healthy"
    )]
    NotServing { volume: VolumeId, reason: String },
}

/// Wraps a redb error with what was being done.
pub fn meta<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Meta { op, source: Box::new(e.into()) }
}
