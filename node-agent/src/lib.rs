//! cairn-agent: the data plane of one node. This crate holds the replica
//! store (layers, snapshots, checksums, crash-safe metadata) and its gRPC
//! service; the `cairn-agent` binary serves it.

pub mod commit;
pub mod copy;
pub mod disk;
pub mod error;
pub mod extent;
pub mod frontend;
pub mod grpc;
pub mod head;
pub mod head_service;
pub mod layer;
pub mod lock;
pub mod meta;
pub mod peer;
pub mod range_lock;
pub mod recovery;
pub mod replica;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod stream;

pub use error::{Error, Result};
pub use replica::Replica;
pub use store::Store;
