//! The agent's gRPC edges: `ReplicaStore` ([`replica_store`]),
//! `VolumeHeads` ([`volume_heads`]) and `SnapshotCopy` ([`snapshot_copy`]); each RPC parses its request
//! ([`convert`]), calls one domain operation and maps the result, errors
//! through [`status`].
//!
//! Invariant: domain modules (replica, store, head, heads, copy) never name
//! this module; the edge imports them, never the reverse.

pub mod convert;
pub mod replica_store;
pub mod snapshot_copy;
pub mod status;
pub mod volume_heads;
