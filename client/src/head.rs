//! Where a Volume's head runs and what it is asked: the pure plan the
//! operator's Volume reconciler applies and the CSI controller reads ahead
//! of it (the publish context carries the same OpenHead request). No I/O:
//! a function of the Volume and its StorageCluster.
//!
//! Invariants: the placement, once in status, is kept (its agent list and
//! layout version decide where every chunk lives); the head moves only to a
//! healthy agent of the placement and then with a higher epoch, so the old
//! head is fenced.

use cairn_api::{
    agent::v1 as pb,
    crd::{
        AgentHealth, HeadLocation, PlacedAgent, Placement, StorageCluster, Volume, VolumeStatus,
    },
};
use kube::ResourceExt;

/// A volume that cannot be placed as it stands: it waits (and says why).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("storage cluster {0} does not exist: create it, or fix spec.cluster")]
    ClusterNotFound(String),
    #[error(
        "storage cluster {cluster} has {have} healthy agents but the volume wants {want} replicas: add agents, or lower spec.replicas (a volume that does not set it takes its StorageCluster's spec.defaults.replicas; charts/cairn/values-one-node.yaml sets 1 for a one-node cluster)"
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

/// Where the volume should be and what its head should be asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub placement: Placement,
    pub head: HeadLocation,
    /// The head agent's endpoint.
    pub endpoint: String,
    pub open: pb::OpenHeadRequest,
}

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

/// Pure: the placement (kept once chosen), the head agent (kept while
/// healthy, else the least loaded healthy agent of the placement, one epoch
/// up) and the OpenHead request.
pub fn desired(vol: &Volume, cluster: &StorageCluster) -> Result<Desired, Invalid> {
    let name = cluster.name_any();
    let agents = cluster.status.as_ref().map(|s| s.agents.clone()).unwrap_or_default();
    let healthy: Vec<_> = agents.iter().filter(|a| a.health != AgentHealth::Unreachable).collect();
    let replicas = vol.spec.replicas.unwrap_or(cluster.spec.defaults.replicas).max(1) as usize;
    let status = vol.status.clone().unwrap_or_default();
    let placement = match status.placement {
        Some(p) => p,
        None => {
            if healthy.len() < replicas {
                return Err(Invalid::TooFewAgents {
                    cluster: name,
                    want: replicas,
                    have: healthy.len(),
                });
            }
            let mut list: Vec<PlacedAgent> = healthy
                .iter()
                .map(|a| PlacedAgent { name: a.name.clone(), domain: a.domain.clone() })
                .collect();
            list.sort_by(|a, b| a.name.cmp(&b.name));
            Placement {
                agents: list,
                replicas: replicas as i32,
                chunk_size_bytes: cluster.spec.defaults.chunk_size_bytes,
                layout_version: 1,
            }
        }
    };
    let in_placement =
        |a: &&&cairn_api::crd::AgentStatus| placement.agents.iter().any(|p| p.name == a.name);
    let usable: Vec<_> = healthy.iter().filter(in_placement).copied().collect();
    let next_epoch = status.head.as_ref().map_or(1, |h| h.epoch + 1);
    let head = if let Some(node) = vol.spec.attached_node.as_deref() {
        // The CSI driver published the volume to a node: the head runs on
        // that node's agent (its FUSE file is attached there).
        let here = agents
            .iter()
            .find(|a| a.node.as_deref() == Some(node) && a.health != AgentHealth::Unreachable)
            .ok_or_else(|| Invalid::NoAgentOnNode { cluster: name.clone(), node: node.into() })?;
        match status.head.as_ref().filter(|h| h.agent == here.name) {
            Some(h) => h.clone(),
            None => HeadLocation {
                agent: here.name.clone(),
                node: here.node.clone(),
                epoch: next_epoch,
            },
        }
    } else {
        match status.head.as_ref().filter(|h| usable.iter().any(|a| a.name == h.agent)) {
            Some(h) => h.clone(),
            None => {
                let pick =
                    usable.iter().min_by_key(|a| (a.load, a.name.clone())).ok_or_else(|| {
                        Invalid::NoHealthyReplica {
                            cluster: name.clone(),
                            agents: placement
                                .agents
                                .iter()
                                .map(|a| a.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                        }
                    })?;
                HeadLocation {
                    agent: pick.name.clone(),
                    node: pick.node.clone(),
                    epoch: next_epoch,
                }
            }
        }
    };
    let address = agents.iter().find(|a| a.name == head.agent).map(|a| a.address.clone());
    let open = pb::OpenHeadRequest {
        volume_id: vol.agent_volume_id(),
        // The size it was placed with: growth is not built (see
        // docs/design.md), and a replica refuses another geometry.
        size_bytes: placed_size(vol) as u64,
        chunk_size_bytes: placement.chunk_size_bytes as u64,
        replicas: placement.replicas as u32,
        layout_version: placement.layout_version as u64,
        epoch: head.epoch as u64,
        agents: placement
            .agents
            .iter()
            .map(|p| pb::HeadAgent {
                name: p.name.clone(),
                endpoint: agents
                    .iter()
                    .find(|a| a.name == p.name)
                    .map(|a| endpoint(&a.address))
                    .unwrap_or_default(),
                domain: p.domain.clone().unwrap_or_default(),
                cost: 0,
            })
            .collect(),
        fuse: false,
        stale_agents: vec![],
        accept_data_loss: false,
        role: pb::VolumeRole::from(vol.head_role()) as i32,
    };
    Ok(Desired { placement, head, endpoint: endpoint(&address.unwrap_or_default()), open })
}

/// The size a volume has at its agents: the size it was first placed with
/// (`status.sizeBytes`), else the spec's.
pub fn placed_size(vol: &Volume) -> i64 {
    vol.status
        .as_ref()
        .filter(|s| s.placement.is_some())
        .and_then(|s| s.size_bytes)
        .unwrap_or(vol.spec.size_bytes)
}
