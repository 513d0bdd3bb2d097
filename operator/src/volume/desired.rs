//! Tests of the pure Volume plan (`cairn_client::head::desired`: where a
//! volume's replicas live and where its head runs, at which epoch, opened
//! with what), on the operator's fixtures.
//!
//! Invariants checked: the placement, once in status, is kept; the head
//! moves only to a healthy agent of the placement (or the agent of the node
//! it is attached to) and then one epoch up, so the old head is fenced.

use cairn_api::crd::{AgentHealth, HeadLocation, StorageCluster, Volume};
use cairn_client::head::desired;

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
        assert_eq!(d.open.volume_id, cairn_api::crd::volume::volume_id("shop", "db", ""));
        assert!(d.open.volume_id.starts_with("shop-db-"), "{}", d.open.volume_id);
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
