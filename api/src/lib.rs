//! cairn-api: everything that crosses a process boundary in Cairn, defined
//! once: identifier newtypes that validate on construction, block geometry,
//! the digest definition, the agent's protobuf API with its conversions, the
//! CSI protobuf API (`csi`), and the custom resources (`crd`).

pub mod block;
pub mod convert;
pub mod crd;
pub mod digest;
pub mod id;
pub mod placement;
pub mod snapshot;

pub use block::{BLOCK_SIZE, BlockRange, ChunkSet, Geometry, GeometryError, RangeError};
pub use digest::{Accumulator, Digest};
pub use id::{IdError, SnapshotId, VolumeId};

/// The agent's protobuf API, package `cairn.agent.v1`.
pub mod agent {
    /// gRPC metadata key naming why a request was refused, where the status
    /// code alone does not tell a caller what to do.
    pub const REASON_METADATA: &str = "cairn-reason";
    /// Reason: the request's head epoch is below the replica's; the head is
    /// fenced for good.
    pub const REASON_STALE_EPOCH: &str = "stale-epoch";
    /// gRPC metadata key of a request to a replica: the replica incarnation
    /// (decimal) the calling head wrote to; a replica with another one
    /// refuses with ABORTED (it restarted and may lack unflushed writes).
    pub const INCARNATION_METADATA: &str = "cairn-incarnation";

    /// Generated messages, client and server of `cairn.agent.v1`.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, missing_debug_implementations)]
        tonic::include_proto!("cairn.agent.v1");
    }
}

/// The Container Storage Interface, package `csi.v1`, written from the CSI
/// specification (see `proto/csi/v1/csi.proto` for what was left out).
pub mod csi {
    /// Generated messages, clients and servers of `csi.v1`.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, missing_debug_implementations)]
        tonic::include_proto!("csi.v1");
    }
}

/// The encoded file descriptor set of every proto in this crate, for gRPC
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cairn_descriptor");
