//! GetCapacity: what a storage cluster can still hold, from what the
//! StorageCluster reconciler reports of its agents. Pure: the free bytes
//! of the Healthy agents, divided by the copies each chunk takes.

use cairn_api::{
    crd::{AgentHealth, StorageCluster},
    csi::v1 as csi,
};
use kube::api::ListParams;

use super::{ControllerService, Result, parameters};
use crate::capability;

/// Bytes of new volumes a cluster can hold with `replicas` copies (the
/// cluster's default when `None`): the sum over its Healthy agents of
/// capacity minus used, divided by the replicas. A cluster that reports no
/// agents (a peer site, or not reconciled yet) holds 0.
pub fn available(cluster: &StorageCluster, replicas: Option<i32>) -> i64 {
    let replicas = replicas.unwrap_or(cluster.spec.defaults.replicas).max(1) as i64;
    let agents = cluster.status.as_ref().map(|s| s.agents.as_slice()).unwrap_or_default();
    let free: i64 = agents
        .iter()
        .filter(|a| a.health == AgentHealth::Healthy)
        .map(|a| (a.capacity_bytes - a.used_bytes).max(0))
        .sum();
    free / replicas
}

impl ControllerService {
    /// GetCapacity: of the cluster named by the parameters or the
    /// topology, or of every cluster when neither names one; 0 for a
    /// cluster that does not exist or capabilities Cairn does not serve.
    pub(super) async fn capacity(
        &self,
        req: csi::GetCapacityRequest,
    ) -> Result<csi::GetCapacityResponse> {
        let params = parameters::parse(&req.parameters)?;
        let served = req.volume_capabilities.iter().all(|c| capability::access(Some(c)).is_ok());
        let named = params.cluster.clone().or_else(|| {
            let t = req.accessible_topology.as_ref()?;
            t.segments.get(crate::TOPOLOGY_CLUSTER_KEY).cloned()
        });
        let clusters = match named {
            _ if !served => vec![],
            Some(name) => self.clusters().get_opt(&name).await?.into_iter().collect(),
            None => self.clusters().list(&ListParams::default()).await?.items,
        };
        let free: i64 = clusters.iter().map(|c| available(c, params.replicas)).sum();
        Ok(csi::GetCapacityResponse {
            available_capacity: free,
            maximum_volume_size: Some(free.min(parameters::MAX_SIZE)),
            minimum_volume_size: Some(parameters::BLOCK),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_api::crd::{AgentStatus, ClusterDefaults, StorageClusterSpec, StorageClusterStatus};

    fn cluster(agents: &[(i64, i64, AgentHealth)]) -> StorageCluster {
        let mut c = StorageCluster::new(
            "site-a",
            StorageClusterSpec {
                node_selector: Some(Default::default()),
                failure_domain_label: None,
                gateway: None,
                defaults: ClusterDefaults { replicas: 2, chunk_size_bytes: 64 << 20 },
            },
        );
        c.status = Some(StorageClusterStatus {
            agents: agents
                .iter()
                .enumerate()
                .map(|(i, &(capacity, used, health))| AgentStatus {
                    name: format!("a{i}"),
                    node: None,
                    address: format!("a{i}:7070"),
                    domain: None,
                    capacity_bytes: capacity,
                    used_bytes: used,
                    health,
                    load: 0,
                    last_seen: None,
                    message: None,
                })
                .collect(),
            ..Default::default()
        });
        c
    }

    #[test]
    fn capacity_is_the_free_space_of_healthy_agents_over_the_replicas() {
        use AgentHealth::*;
        let c = cluster(&[(1000, 200, Healthy), (1000, 0, Healthy), (5000, 0, Unreachable)]);
        assert_eq!(available(&c, None), 900, "(800 + 1000) / 2 by default");
        assert_eq!(available(&c, Some(3)), 600);
        assert_eq!(available(&cluster(&[(10, 20, Healthy)]), Some(1)), 0, "never negative");
        assert_eq!(available(&cluster(&[]), None), 0);
    }
}
