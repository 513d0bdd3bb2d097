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
    fn volume_ids_are_dns_labels_unique_by_uid_even_where_names_join_alike() {
        let a = volume_id("shop", "db-main", "uid-1");
        let b = volume_id("shop-db", "main", "uid-2");
        assert!(a.starts_with("shop-db-main-") && b.starts_with("shop-db-main-"), "{a} {b}");
        assert_ne!(a, b, "the names join alike, the ids do not");
        assert_eq!(a, volume_id("shop", "db-main", "uid-1"), "a function of its arguments");
        assert_ne!(a, volume_id("shop", "db-main", "uid-3"), "a re-created Volume");
        let long = volume_id(
            "a-very-long-namespace-name-for-testing",
            "and-an-even-longer-volume-name-x",
            "u",
        );
        assert!(long.starts_with("v-") && long.len() == 26, "{long}");
        assert!(volume_id("ns", "with.dots", "u").starts_with("v-"));
        for id in [a, b, long] {
            assert!(cairn_api::VolumeId::new(&id).is_ok(), "{id}");
        }
    }

    #[test]
    fn a_placed_volume_keeps_the_id_in_its_status() {
        use cairn_api::crd::VolumeRole;
        let v = crate::fixtures::volume("db", "site-a", VolumeRole::Primary);
        assert_eq!(v.agent_volume_id(), volume_id("shop", "db", ""));
        let placed = crate::fixtures::placed(v, "a1");
        assert_eq!(placed.agent_volume_id(), "shop-db", "the id recorded before the uid tag");
    }
}
