//! The `Volume` custom resource's reconciler: `reconcile.rs` talks to the
//! API server and the agents (observe -> validate -> desired -> apply ->
//! status), `desired.rs` plans placement and head, `status.rs` says what
//! the head reports. Here: what they share (the finalizer, the role hold,
//! the errors).
//!
//! Invariants: the placement, once in status, is kept; the head moves only
//! with a higher epoch, so the old head is fenced; a volume's replicas are
//! removed only behind its finalizer, never while a RemoteLink uses it.

use std::time::Duration;

use crate::agent::AgentError;

#[cfg(test)]
mod desired;
mod reconcile;
pub mod restore;
mod status;

// The pure plan of a volume's head is in cairn-client (the CSI controller
// plans with it too); its tests stay here, on the operator's fixtures.
pub use cairn_client::head::{Desired, Invalid, desired, placed_size};
pub use reconcile::{error_policy, reconcile};
pub use status::{status_of, status_snapshots};

// Where the CSI driver imports it from.
pub use crate::context::head_endpoint;

/// Held on every Volume until its replicas are removed.
pub const FINALIZER: &str = "cairn.dev/replicas";
pub use cairn_api::crd::volume::ROLE_HOLD;
/// How often a Ready volume's health is looked at again.
pub const RESYNC: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    Agent(#[from] AgentError),
    #[error("the API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("volume {volume} is used by RemoteLink {link}: delete the link first, then the volume")]
    InUse { volume: String, link: String },
    #[error(
        "volume {volume} is the source of Volume {restoring}, whose restore has not finished: wait for its Restored condition, or delete {restoring} first"
    )]
    RestoreSource { volume: String, restoring: String },
    #[error(
        "the Volume came without a resourceVersion: a head is reserved only on a known version"
    )]
    Unversioned,
    #[error("finalizer: {0}")]
    Finalizer(String),
}
