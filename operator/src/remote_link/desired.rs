//! RemoteLink planning, pure: the agents' link a RemoteLink asks for
//! (endpoint, secret, bandwidth policy, source selection, compression; a
//! pause is a rate of 0), the snapshot a request seals, and why a
//! switchover may not run.
//!
//! Invariant: a request token always names the same snapshot, so a resumed
//! request seals the one it started.

use cairn_api::{agent::v1 as pb, crd::RemoteLink};

use super::{Ends, link_id};

/// Pure: the agents' link from the RemoteLink's spec.
pub fn agent_link(
    rl: &RemoteLink,
    source_volume: &str,
    target_endpoint: String,
    secret: Vec<u8>,
    forward: bool,
) -> pb::Link {
    let paused = pb::BandwidthPolicy {
        policy: Some(pb::bandwidth_policy::Policy::Fixed(pb::Rate {
            unlimited: false,
            bytes_per_sec: 0,
        })),
    };
    pb::Link {
        link_id: link_id(rl),
        volume_id: source_volume.to_string(),
        target_endpoint,
        pairing_secret: secret.into(),
        policy: if rl.spec.paused {
            Some(paused)
        } else {
            rl.spec.bandwidth.as_ref().map(pb::BandwidthPolicy::from)
        },
        source: pb::SourceSelection::from(rl.spec.source_selection) as i32,
        compression: pb::Compression::from(rl.spec.compression) as i32,
        forward,
    }
}

/// Pure: why a switchover request cannot run, if it cannot: the target is
/// at a peer site (its Volume is its own operator's), or the source is
/// attached to a node (its pods would keep writing a demoted volume).
pub(super) fn switchover_refusal(rl: &RemoteLink, ends: &Ends) -> Option<String> {
    if ends.target.is_none() {
        return Some(format!(
            "the target cluster {} is a peer site: switch over by hand: set spec.role: Remote on Volume {} here, wait until this link reports the final snapshot copied, then set spec.role: Primary on Volume {} at the peer site",
            rl.spec.target_cluster, rl.spec.source_volume, rl.spec.target_volume
        ));
    }
    ends.source.spec.attached_node.as_ref().map(|node| {
        format!(
            "Volume {} is attached to node {node}: stop the pods that use it (the CSI driver then unpublishes it), then set a new spec.switchover.request",
            rl.spec.source_volume
        )
    })
}

/// The snapshot a request takes (a copy request's, or the final one of a
/// switchover whose spec names none): from the request token (any string),
/// so a resumed request seals the same one: `<what>-` and the token in
/// lowercase letters, digits and dashes.
pub fn request_snapshot_name(what: &str, token: &str) -> String {
    let mut s: String = token
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect();
    s.truncate(52);
    let s = s.trim_matches('-');
    if s.is_empty() {
        let h = blake3::hash(token.as_bytes()).to_hex();
        return format!("{what}-{}", &h[..16]);
    }
    format!("{what}-{s}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use kube::Resource;
    use serde_json::json;

    #[test]
    fn a_switchover_token_names_a_valid_stable_snapshot() {
        for token in ["2026-11-25T10:00:00Z", "now", "--", &"x".repeat(63)] {
            let name = request_snapshot_name("switchover", token);
            assert!(cairn_api::SnapshotId::new(&name).is_ok(), "{token} -> {name}");
            assert_eq!(name, request_snapshot_name("switchover", token), "stable");
        }
        assert_eq!(
            request_snapshot_name("switchover", "2026-11-25T10:00:00Z"),
            "switchover-2026-11-25t10-00-00z"
        );
    }

    fn link(paused: bool) -> RemoteLink {
        let mut rl = fixtures::link("db-to-b", "db", "site-b", "db-copy");
        rl.meta_mut().generation = Some(2);
        rl.spec.bandwidth =
            Some(serde_json::from_value(json!({"defaultBytesPerSecond": 1000000})).unwrap());
        rl.spec.paused = paused;
        rl
    }

    #[test]
    fn the_agents_link_carries_the_policy_and_a_pause_is_a_rate_of_zero() {
        let l = agent_link(&link(false), "shop-db", "http://b:7070".into(), vec![7; 32], true);
        assert_eq!(l.link_id, "shop.db-to-b", "<namespace>.<name>: no two links join alike");
        let mut kept = link(false);
        kept.status = Some(Default::default());
        kept.status.as_mut().unwrap().link_id = Some("shop-db-to-b".into());
        let l2 = agent_link(&kept, "shop-db", "http://b:7070".into(), vec![7; 32], true);
        assert_eq!(l2.link_id, "shop-db-to-b", "a link keeps the id in its status");
        assert!(l.policy.is_some());
        let paused = agent_link(&link(true), "shop-db", "http://b:7070".into(), vec![7; 32], false);
        let Some(pb::bandwidth_policy::Policy::Fixed(r)) = paused.policy.and_then(|p| p.policy)
        else {
            panic!("a paused link is a fixed rate")
        };
        assert_eq!((r.unlimited, r.bytes_per_sec), (false, 0));
    }
}
