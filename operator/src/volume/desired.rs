//! Volume planning, pure: where a volume's replicas live (its placement)
//! and where its head runs, at which epoch, opened with what.
//!
//! Invariants: the placement, once in status, is kept (its agent list and
//! layout version decide where every chunk lives); the head moves only to a
//! healthy agent of the placement (or the agent of the node it is attached
//! to) and then one epoch up, so the old head is fenced.

use cairn_api::{
    agent::v1 as pb,
    crd::{AgentHealth, HeadLocation, PlacedAgent, Placement, StorageCluster, Volume},
};
use kube::ResourceExt;

use super::Invalid;
use crate::context::{endpoint, volume_id};

/// Where the volume should be and what its head should be asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub placement: Placement,
    pub head: HeadLocation,
    /// The head agent's endpoint.
    pub endpoint: String,
    pub open: pb::OpenHeadRequest,
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
    let ns = vol.namespace().unwrap_or_default();
    let open = pb::OpenHeadRequest {
        volume_id: volume_id(&ns, &vol.name_any()),
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
        role: pb::VolumeRole::from(vol.spec.role) as i32,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use cairn_api::crd::{VolumeRole, VolumeStatus};

    fn cluster(agents: &[(&str, AgentHealth, i32)]) -> StorageCluster {
        fixtures::storage_cluster("site-a", agents)
    }

    fn vol() -> Volume {
        fixtures::volume("db", "site-a", VolumeRole::Primary)
    }

    use AgentHealth::*;

    #[test]
    fn a_new_volume_is_placed_on_the_healthy_agents_with_its_head_on_the_least_loaded() {
        let d = desired(
            &vol(),
            &cluster(&[("b", Healthy, 3), ("a", Healthy, 5), ("c", Unreachable, 0)]),
        )
        .unwrap();
        let names: Vec<&str> = d.placement.agents.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!((d.head.agent.as_str(), d.head.epoch), ("b", 1));
        assert_eq!(d.endpoint, "http://b.site-a:7070");
        assert_eq!(d.open.volume_id, "shop-db");
        assert_eq!(d.open.replicas, 2);
    }

    #[test]
    fn too_few_agents_is_refused_with_what_to_do() {
        let err = desired(&vol(), &cluster(&[("a", Healthy, 0)])).unwrap_err();
        assert_eq!(err.reason(), "TooFewAgents");
        assert!(err.to_string().contains("add agents, or lower spec.replicas"), "{err}");
    }

    #[test]
    fn the_head_stays_while_healthy_and_moves_one_epoch_up_when_its_agent_is_lost() {
        let c = cluster(&[("a", Healthy, 0), ("b", Healthy, 0)]);
        let mut v = vol();
        let first = desired(&v, &c).unwrap();
        v.status = Some(VolumeStatus {
            placement: Some(first.placement.clone()),
            head: Some(HeadLocation { agent: "b".into(), node: None, epoch: 4 }),
            ..Default::default()
        });
        let kept = desired(&v, &c).unwrap();
        assert_eq!((kept.head.agent.as_str(), kept.head.epoch), ("b", 4));
        let moved = desired(&v, &cluster(&[("a", Healthy, 9), ("b", Unreachable, 0)])).unwrap();
        assert_eq!((moved.head.agent.as_str(), moved.head.epoch), ("a", 5));
        assert_eq!(moved.placement, first.placement, "the placement is kept");
    }

    #[test]
    fn publishing_to_a_node_moves_the_head_to_its_agent_one_epoch_up() {
        let c = cluster(&[("a", Healthy, 0), ("b", Healthy, 0), ("c", Healthy, 0)]);
        let mut v = vol();
        let first = desired(&v, &c).unwrap();
        v.status = Some(VolumeStatus {
            placement: Some(first.placement.clone()),
            head: Some(HeadLocation { agent: "a".into(), node: Some("node-a".into()), epoch: 3 }),
            ..Default::default()
        });
        v.spec.attached_node = Some("node-c".into());
        let moved = desired(&v, &c).unwrap();
        assert_eq!((moved.head.agent.as_str(), moved.head.epoch), ("c", 4));
        assert_eq!(moved.head.node.as_deref(), Some("node-c"));
        assert_eq!(moved.endpoint, "http://c.site-a:7070");
        assert_eq!(moved.open.epoch, 4, "the head is opened at the new epoch (the fence)");
        assert_eq!(moved.placement, first.placement, "the data does not move");
        // Once there, it stays at that epoch (a repeat publish is no new fence).
        v.status.as_mut().unwrap().head = Some(moved.head.clone());
        assert_eq!(desired(&v, &c).unwrap().head.epoch, 4);
        // A node without a healthy agent of the cluster waits, saying so.
        v.spec.attached_node = Some("node-z".into());
        let err = desired(&v, &c).unwrap_err();
        assert_eq!(err.reason(), "NoAgentOnNode");
        assert!(err.to_string().contains("node-z"), "{err}");
        let c_down = cluster(&[("a", Healthy, 0), ("b", Healthy, 0), ("c", Unreachable, 0)]);
        v.spec.attached_node = Some("node-c".into());
        assert_eq!(desired(&v, &c_down).unwrap_err().reason(), "NoAgentOnNode");
    }

    #[test]
    fn a_placed_volume_whose_agents_are_all_down_says_which_to_bring_back() {
        let c = cluster(&[("a", Healthy, 0), ("b", Healthy, 0), ("c", Healthy, 0)]);
        let mut v = vol();
        let mut placement = desired(&v, &c).unwrap().placement;
        placement.agents.truncate(2);
        v.status = Some(VolumeStatus { placement: Some(placement), ..Default::default() });
        let down = cluster(&[("a", Unreachable, 0), ("b", Unreachable, 0), ("c", Healthy, 0)]);
        let err = desired(&v, &down).unwrap_err();
        assert_eq!(err.reason(), "NoHealthyReplica");
        assert!(
            err.to_string().contains("(a, b)")
                && err.to_string().contains("bring one of them back"),
            "{err}"
        );
    }
}
