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

mod desired;
mod reconcile;
mod status;

pub use desired::{Desired, desired, placed_size};
pub use reconcile::{error_policy, reconcile};
pub use status::{status_of, status_snapshots};

// Where the CSI driver imports it from.
pub use crate::context::head_endpoint;

/// Held on every Volume until its replicas are removed.
pub const FINALIZER: &str = "cairn.dev/replicas";
/// Set on a Volume while a switchover changes its role: the Volume
/// reconciler then neither promotes nor demotes it. The value names the
/// RemoteLink and its request (`<link>/<request>`).
pub const ROLE_HOLD: &str = "cairn.dev/role-hold";
/// How often a Ready volume's health is looked at again.
pub const RESYNC: Duration = Duration::from_secs(30);

/// A volume that cannot be placed as it stands: it waits (and says why).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("storage cluster {0} does not exist: create it, or fix spec.cluster")]
    ClusterNotFound(String),
    #[error(
        "storage cluster {cluster} has {have} healthy agents but the volume wants {want} replicas: add agents, or lower spec.replicas"
    )]
    TooFewAgents { cluster: String, want: usize, have: usize },
    #[error(
        "none of the agents holding the volume's replicas ({agents}) is healthy in storage cluster {cluster}: bring one of them back (the data is on them)"
    )]
    NoHealthyReplica { cluster: String, agents: String },
    #[error(
        "spec.attachedNode is {node} but no healthy agent of storage cluster {cluster} runs there: run pods of this volume on a node of the cluster (the StorageClass topology does this), or bring that node's agent back"
    )]
    NoAgentOnNode { cluster: String, node: String },
}

impl Invalid {
    pub fn reason(&self) -> &'static str {
        match self {
            Invalid::ClusterNotFound(_) => "ClusterNotFound",
            Invalid::TooFewAgents { .. } => "TooFewAgents",
            Invalid::NoHealthyReplica { .. } => "NoHealthyReplica",
            Invalid::NoAgentOnNode { .. } => "NoAgentOnNode",
        }
    }
}

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
    #[error("finalizer: {0}")]
    Finalizer(String),
}
