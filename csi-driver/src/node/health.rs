//! A staged volume's condition as the head reports it: abnormal when some
//! chunk has no in-sync replica (its data cannot be read or written), or
//! when the local agent does not serve the head; degraded replicas are
//! named but are not abnormal, since I/O goes on while they are rebuilt.

use cairn_api::{
    Geometry,
    agent::v1 as pb,
    csi::v1 as csi,
    placement::{PlacementAgent, place},
};

/// The condition of a head opened with `open`, whose status is `status`.
pub fn condition(open: &pb::OpenHeadRequest, status: &pb::HeadStatus) -> csi::VolumeCondition {
    let in_sync: std::collections::BTreeSet<&str> =
        status.replicas.iter().filter(|r| r.in_sync).map(|r| r.agent.as_str()).collect();
    let out: Vec<String> = status
        .replicas
        .iter()
        .filter(|r| !r.in_sync)
        .map(|r| format!("{} ({})", r.agent, r.reason))
        .collect();
    let agents: Vec<PlacementAgent> = open
        .agents
        .iter()
        .map(|a| PlacementAgent::new(&a.name, (!a.domain.is_empty()).then_some(a.domain.as_str())))
        .collect();
    let chunks = Geometry::new(open.size_bytes, open.chunk_size_bytes).map(|g| g.chunks());
    let placement = chunks
        .ok()
        .and_then(|c| place(&agents, open.replicas as usize, c, open.layout_version).ok());
    let lost = match &placement {
        Some(p) => p
            .chunks
            .iter()
            .filter(|holders| !holders.iter().any(|&i| in_sync.contains(agents[i].name.as_str())))
            .count(),
        // Without a placement, every replica out of sync means no data.
        None if in_sync.is_empty() => 1,
        None => 0,
    };
    match (lost, out.is_empty()) {
        (0, true) => {
            csi::VolumeCondition { abnormal: false, message: "all replicas in sync".into() }
        }
        (0, false) => csi::VolumeCondition {
            abnormal: false,
            message: format!(
                "degraded, every chunk still has an in-sync replica; out of sync: {}",
                out.join(", ")
            ),
        },
        (n, _) => csi::VolumeCondition {
            abnormal: true,
            message: format!(
                "{n} chunk(s) have no in-sync replica; out of sync: {}",
                out.join(", ")
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(replicas: u32) -> pb::OpenHeadRequest {
        pb::OpenHeadRequest {
            volume_id: "v".into(),
            size_bytes: 8 << 20,
            chunk_size_bytes: 1 << 20,
            replicas,
            layout_version: 1,
            epoch: 1,
            agents: ["a1", "a2", "a3"]
                .map(|n| pb::HeadAgent {
                    name: n.into(),
                    endpoint: String::new(),
                    domain: String::new(),
                    cost: 0,
                })
                .to_vec(),
            fuse: false,
            stale_agents: vec![],
            accept_data_loss: false,
            role: 0,
        }
    }

    fn status(out: &[&str]) -> pb::HeadStatus {
        pb::HeadStatus {
            volume_id: "v".into(),
            epoch: 1,
            replicas: ["a1", "a2", "a3"]
                .map(|n| pb::ReplicaHealth {
                    agent: n.into(),
                    chunks: 1,
                    in_sync: !out.contains(&n),
                    reason: if out.contains(&n) {
                        "connection refused".into()
                    } else {
                        String::new()
                    },
                    rebuild: None,
                    last_rebuild: String::new(),
                })
                .to_vec(),
            fuse_file: String::new(),
            role: 0,
        }
    }

    #[test]
    fn a_volume_is_abnormal_only_when_a_chunk_lost_every_in_sync_replica() {
        assert!(!condition(&open(2), &status(&[])).abnormal);
        let one_down = condition(&open(2), &status(&["a2"]));
        assert!(!one_down.abnormal, "{one_down:?}");
        assert!(one_down.message.contains("a2 (connection refused)"), "{one_down:?}");
        // Two replicas over three agents, two agents down: some chunk had
        // both of its replicas there.
        let two_down = condition(&open(2), &status(&["a1", "a2"]));
        assert!(two_down.abnormal, "{two_down:?}");
        // One replica per chunk: any agent down loses chunks.
        assert!(condition(&open(1), &status(&["a3"])).abnormal);
    }
}
