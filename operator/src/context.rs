//! What every reconciler stands on: the shared `Context` (API server,
//! agents, event recorder, metrics) and the names by which objects reach
//! the agents (agent endpoints, a volume's id, a placed volume's head).
//!
//! Invariant: a volume's id at the agents is a function of its namespace
//! and name alone (a valid `VolumeId`), so every reconciler and the CSI
//! driver name the same replicas.

use std::sync::Arc;

use kube::{Client, runtime::events::Recorder};

use crate::agent::AgentApi;

/// What a reconciler needs: the API server, the agents, the event recorder.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub agents: Arc<dyn AgentApi>,
    pub recorder: Recorder,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("agents", &self.agents).finish_non_exhaustive()
    }
}

// A Volume's id at the agents is a contract of the resource (cairn-api);
// the endpoints are how cairn-client reaches agents.
pub use cairn_api::crd::volume::volume_id;
pub use cairn_client::head::{agent_endpoint, endpoint, head_endpoint};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_are_dns_labels() {
        assert_eq!(volume_id("shop", "db"), "shop-db");
        let long =
            volume_id("a-very-long-namespace-name-for-testing", "and-an-even-longer-volume-name-x");
        assert!(long.starts_with("v-") && long.len() == 26, "{long}");
        assert!(volume_id("ns", "with.dots").starts_with("v-"));
    }
}
