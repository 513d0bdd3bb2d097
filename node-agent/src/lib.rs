//! cairn-agent: the data plane of one node. This crate holds the replica
//! store (layers, snapshots, checksums, crash-safe metadata), the volume
//! heads served from it, the copies between sites, and their gRPC edges;
//! the `cairn-agent` binary serves them.

pub mod copy;
pub mod disk;
pub mod error;
pub mod frontend;
pub mod grpc;
pub mod head;
pub mod heads;
pub mod lock;
pub mod meta;
pub mod peer;
pub mod replica;
pub mod role;
pub mod store;
pub mod transport;

pub use error::{Error, Result};
pub use replica::Replica;
pub use store::Store;
