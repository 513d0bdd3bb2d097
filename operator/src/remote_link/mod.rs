//! The `RemoteLink` custom resource's reconciler: `reconcile.rs` talks to
//! the API server and the agents, `desired.rs` plans the agents' link,
//! `status.rs` says where the link stands, `switchover.rs` runs a
//! switchover. Here: what they share (the ends of a link, the errors).
//!
//! Invariants: copies follow snapshots (the agent link forwards every
//! snapshot as it completes); a request token is acted on once; the pairing
//! secret lives in a Secret owned by the link (or, for a peer site, the
//! Secret its StorageCluster names) and is never written to status or logs.

use std::{sync::Arc, time::Duration};

use cairn_api::crd::{RemoteLink, Volume};
use kube::{ResourceExt, runtime::controller::Action};

use crate::{agent::AgentError, context::Context};

mod desired;
mod reconcile;
mod status;
mod switchover;

use desired::switchover_refusal;
pub use desired::{agent_link, request_snapshot_name};
pub use reconcile::reconcile;
pub use status::status_of;

/// How often a link's progress and lag are looked at.
pub const POLL: Duration = Duration::from_secs(10);

/// A link that cannot be set up as it stands: it waits and says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Waiting {
    #[error("source volume {0} has no head yet (is it Ready?)")]
    SourceNotPlaced(String),
    #[error("target cluster {0} does not exist: create it, or fix spec.targetCluster")]
    TargetClusterNotFound(String),
    #[error("target volume {0} has no head yet: create it with role Remote on the target cluster")]
    TargetNotPlaced(String),
    #[error("secret {0} has no pairing-secret key of at least 16 bytes")]
    NoPairingSecret(String),
}

impl Waiting {
    fn reason(&self) -> &'static str {
        match self {
            Waiting::SourceNotPlaced(_) => "SourceNotPlaced",
            Waiting::TargetClusterNotFound(_) => "TargetClusterNotFound",
            Waiting::TargetNotPlaced(_) => "TargetNotPlaced",
            Waiting::NoPairingSecret(_) => "NoPairingSecret",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Agent(#[from] AgentError),
    #[error("the API server: {0}")]
    Kube(#[from] kube::Error),
}

/// A link's two ends as observed: the source Volume and its head agent
/// (endpoint, volume id), the target Volume (`None` at a peer site: it is
/// that site's operator's), the receiver's endpoint, the pairing secret,
/// and (for a target in this Kubernetes cluster) what pairing it takes.
#[derive(Debug)]
struct Ends {
    source: Volume,
    src_ep: String,
    src_vol: String,
    target: Option<Volume>,
    tgt_ep: String,
    secret: Vec<u8>,
    receiver: Option<Receiver>,
}

/// A receiver in this Kubernetes cluster: the operator registers the link
/// there, with the secret of the link's own Secret.
#[derive(Debug)]
struct Receiver {
    /// The target volume's id at its head agent.
    volume_id: String,
    /// The secret was made by this reconcile (no Secret held one yet): it
    /// is written before it is used.
    new_secret: bool,
}

/// The agents' link id for a RemoteLink: the one in its status, else
/// `<namespace>.<name>`. A namespace has no dot, so no two links share an
/// id (`shop/db-to-b` and `shop-db/to-b` do not); the longest possible one
/// (63 + 1 + 253) is over the agents' 253 characters, and gets `l-` and 24
/// hex digits of its BLAKE3. Links set up before this kept
/// `<namespace>-<name>` in status, and keep it.
pub fn link_id(rl: &RemoteLink) -> String {
    if let Some(id) = rl.status.as_ref().and_then(|s| s.link_id.clone()) {
        return id;
    }
    let plain = format!("{}.{}", rl.namespace().unwrap_or_default(), rl.name_any());
    if plain.len() <= 253 {
        return plain;
    }
    format!("l-{}", &blake3::hash(plain.as_bytes()).to_hex()[..24])
}

/// `error_policy`: back off and try again.
pub fn error_policy(_rl: Arc<RemoteLink>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %err, "reconcile failed");
    Action::requeue(Duration::from_secs(10))
}
