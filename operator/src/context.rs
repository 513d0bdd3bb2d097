//! What every reconciler stands on: the shared `Context` (API server,
//! agents, event recorder, metrics) and the names by which objects reach
//! the agents (agent endpoints, a volume's id, a placed volume's head).
//!
//! Invariant: a volume's id at the agents is a function of its namespace
//! and name alone (a valid `VolumeId`), so every reconciler and the CSI
//! driver name the same replicas.

use std::sync::Arc;

use cairn_api::crd::{StorageCluster, VolumeStatus};
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

/// The id of a volume at the agents: `<namespace>-<name>` when that is a
/// valid id (a DNS label), else `v-` and 24 hex digits of its hash.
pub fn volume_id(namespace: &str, name: &str) -> String {
    let plain = format!("{namespace}-{name}");
    if plain.len() <= 63 && cairn_api::VolumeId::new(&plain).is_ok() {
        return plain;
    }
    let h = blake3::hash(format!("{namespace}/{name}").as_bytes()).to_hex();
    format!("v-{}", &h[..24])
}

/// An agent's gRPC endpoint from the address it announces (`http://` is
/// added when it names no scheme).
pub fn endpoint(address: &str) -> String {
    if address.contains("://") { address.to_string() } else { format!("http://{address}") }
}

/// The endpoint of agent `name` as its storage cluster reports it.
pub fn agent_endpoint(cluster: Option<&StorageCluster>, name: &str) -> Option<String> {
    let agents = &cluster?.status.as_ref()?.agents;
    agents.iter().find(|a| a.name == name).map(|a| endpoint(&a.address))
}

/// A placed volume's head: its agent's endpoint and the volume's id at the
/// agents (`None` until placed, or when its agent left the cluster).
pub fn head_endpoint(
    st: Option<&VolumeStatus>,
    cluster: Option<&StorageCluster>,
) -> Option<(String, String)> {
    let st = st?;
    Some((agent_endpoint(cluster, &st.head.as_ref()?.agent)?, st.volume_id.clone()?))
}

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
