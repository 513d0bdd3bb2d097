//! Volume status, pure: what `status` says from what the head reports
//! (phase, replicas and their rebuilds, conditions, the newest snapshots).
//!
//! Invariant: every condition carries the generation it was computed for;
//! `status.sizeBytes` is the placed size, not a grown spec's.

use cairn_api::{
    agent::v1 as pb,
    crd::{
        Condition, ConditionStatus, RebuildPhase, RebuildProgress, ReplicaHealth, ReplicaStatus,
        Volume, VolumePhase, VolumeRole, VolumeSnapshot, VolumeStatus,
        quantity::format_bytes,
        set_condition,
        volume::{MAX_STATUS_SNAPSHOTS, condition},
    },
};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::Resource;

use super::Desired;

/// Pure: `status.snapshots` from the agent's list (oldest first), the
/// newest `MAX_STATUS_SNAPSHOTS` of them.
pub fn status_snapshots(snaps: &[pb::SnapshotInfo]) -> Vec<VolumeSnapshot> {
    let skip = snaps.len().saturating_sub(MAX_STATUS_SNAPSHOTS);
    snaps[skip..]
        .iter()
        // The schema wants a 32-byte digest; an agent always gives one.
        .filter(|s| s.digest.len() == 32)
        .map(|s| VolumeSnapshot {
            id: s.snapshot_id.clone(),
            generation: s.generation as i64,
            digest: s.digest.iter().map(|b| format!("{b:02x}")).collect(),
            created_at: Time(
                Timestamp::from_second(s.sealed_at_unix).unwrap_or(Timestamp::UNIX_EPOCH),
            ),
            divergent: s.divergent,
            schedule: None,
        })
        .collect()
}

/// Pure: the status from what the head reports.
pub fn status_of(vol: &Volume, d: &Desired, head: &pb::HeadStatus, now: Time) -> VolumeStatus {
    let mut st = vol.status.clone().unwrap_or_default();
    let generation = vol.meta().generation;
    let out: Vec<&pb::ReplicaHealth> = head.replicas.iter().filter(|r| !r.in_sync).collect();
    let rebuilding = head.replicas.iter().any(|r| r.rebuild.is_some());
    st.phase = if out.is_empty() { VolumePhase::Ready } else { VolumePhase::Degraded };
    st.volume_id = Some(d.open.volume_id.clone());
    st.size_bytes = Some(d.open.size_bytes as i64);
    st.size = Some(format_bytes(d.open.size_bytes as i64));
    st.role = Some(match pb::VolumeRole::try_from(head.role) {
        Ok(pb::VolumeRole::Remote) => VolumeRole::Remote,
        _ => VolumeRole::Primary,
    });
    st.placement = Some(d.placement.clone());
    st.head = Some(d.head.clone());
    st.replicas = head
        .replicas
        .iter()
        .map(|r| ReplicaStatus {
            agent: r.agent.clone(),
            health: if r.rebuild.is_some() {
                ReplicaHealth::Rebuilding
            } else if r.in_sync {
                ReplicaHealth::InSync
            } else {
                ReplicaHealth::OutOfSync
            },
            chunks: Some(r.chunks as i64),
            reason: (!r.reason.is_empty()).then(|| r.reason.clone()),
            rebuild: r.rebuild.as_ref().map(|p| RebuildProgress {
                phase: match p.phase.as_str() {
                    "head" => RebuildPhase::Head,
                    "verify" => RebuildPhase::Verify,
                    _ => RebuildPhase::Layers,
                },
                layers_done: p.layers_done as i64,
                layers_total: p.layers_total as i64,
                bytes_done: p.bytes_done as i64,
                head_blocks_done: p.head_blocks_done as i64,
                head_blocks_total: p.head_blocks_total as i64,
                started_at: Some(Time(
                    Timestamp::from_second(
                        Timestamp::now().as_second() - (p.elapsed_ms / 1000) as i64,
                    )
                    .unwrap_or(Timestamp::now()),
                )),
            }),
            last_rebuild: (!r.last_rebuild.is_empty()).then(|| r.last_rebuild.clone()),
        })
        .collect();
    let restoring = vol.restoring();
    let ready = out.is_empty() && st.role == Some(vol.spec.role) && !restoring;
    let (reason, message) = if restoring {
        let from = vol.spec.source.as_ref().map_or("", |s| s.volume_name());
        (
            "Restoring",
            format!(
                "the content of Volume {from} is copied in first (condition Restored); until then the head stays Remote and nothing attaches"
            ),
        )
    } else if ready && (d.open.size_bytes as i64) < vol.spec.size_bytes {
        (
            "GrowthNotSupported",
            format!(
                "every chunk in sync on {} agents; spec.sizeBytes is {} but volume growth is not supported yet: the volume keeps {} (create a larger volume and copy the data)",
                head.replicas.len(),
                vol.spec.size_bytes,
                d.open.size_bytes
            ),
        )
    } else if ready {
        ("Ready", format!("every chunk in sync on {} agents", head.replicas.len()))
    } else if !out.is_empty() {
        let names: Vec<&str> = out.iter().map(|r| r.agent.as_str()).collect();
        (
            "ReplicasOutOfSync",
            format!("out of sync: {}; they are rebuilt when back", names.join(", ")),
        )
    } else {
        ("RoleChanging", format!("the head is {:?}, the spec asks {:?}", st.role, vol.spec.role))
    };
    let c = |t: &str, s: bool, r: &str, m: String| {
        Condition::new(
            t,
            if s { ConditionStatus::True } else { ConditionStatus::False },
            r,
            m,
            generation,
            now.clone(),
        )
    };
    set_condition(&mut st.conditions, c(condition::READY, ready, reason, message.clone()));
    let (reason, message) = if restoring && !out.is_empty() {
        let names: Vec<&str> = out.iter().map(|r| r.agent.as_str()).collect();
        let m = format!("out of sync: {}; they are rebuilt when back", names.join(", "));
        ("ReplicasOutOfSync", m)
    } else {
        (reason, message)
    };
    set_condition(&mut st.conditions, c(condition::DEGRADED, !out.is_empty(), reason, message));
    set_condition(
        &mut st.conditions,
        c(
            condition::REBUILDING,
            rebuilding,
            if rebuilding { "Rebuilding" } else { "Idle" },
            String::new(),
        ),
    );
    st.observed_generation = generation;
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fixtures, report::now, volume::desired};
    use cairn_api::crd::{AgentHealth, StorageCluster};

    fn cluster(agents: &[(&str, AgentHealth, i32)]) -> StorageCluster {
        fixtures::storage_cluster("site-a", agents)
    }

    fn vol() -> Volume {
        fixtures::volume("db", "site-a", VolumeRole::Primary)
    }

    use AgentHealth::*;

    #[test]
    fn a_volume_waiting_for_its_source_is_not_ready_whatever_its_role() {
        let c = cluster(&[("a", Healthy, 0), ("b", Healthy, 0)]);
        let replica = |agent: &str| pb::ReplicaHealth {
            agent: agent.into(),
            chunks: 16,
            in_sync: true,
            ..Default::default()
        };
        let head = pb::HeadStatus {
            volume_id: "shop-db-copy".into(),
            epoch: 1,
            replicas: vec![replica("a"), replica("b")],
            role: pb::VolumeRole::Remote as i32,
            ..Default::default()
        };
        for role in [VolumeRole::Primary, VolumeRole::Remote] {
            let mut v = fixtures::restored("db-copy", "db", Some("nightly"));
            v.spec.role = role;
            let d = desired(&v, &c).unwrap();
            assert_eq!(d.open.role, pb::VolumeRole::Remote as i32, "opened Remote until restored");
            let st = status_of(&v, &d, &head, now());
            let ready = st.conditions.iter().find(|c| c.type_ == condition::READY).unwrap();
            assert_eq!(
                (ready.status, ready.reason.as_str()),
                (ConditionStatus::False, "Restoring")
            );
            assert!(ready.message.contains("Volume db"), "{}", ready.message);
            // Once Restored=True is recorded, the spec's role and Ready rule.
            v.status = Some(st);
            set_condition(
                &mut v.status.as_mut().unwrap().conditions,
                Condition::new(
                    condition::RESTORED,
                    ConditionStatus::True,
                    "Restored",
                    "",
                    None,
                    now(),
                ),
            );
            assert!(!v.restoring());
            let d = desired(&v, &c).unwrap();
            assert_eq!(d.open.role, pb::VolumeRole::from(role) as i32);
            let st = status_of(&v, &d, &head, now());
            let ready = st.conditions.iter().find(|c| c.type_ == condition::READY).unwrap();
            assert_eq!(
                ready.status == ConditionStatus::True,
                role == VolumeRole::Remote,
                "{ready:?}"
            );
        }
    }

    #[test]
    fn status_reports_out_of_sync_replicas_and_rebuild_progress() {
        let c = cluster(&[("a", Healthy, 0), ("b", Healthy, 0)]);
        let v = vol();
        let d = desired(&v, &c).unwrap();
        let head = pb::HeadStatus {
            volume_id: "shop-db".into(),
            epoch: 1,
            replicas: vec![
                pb::ReplicaHealth {
                    agent: "a".into(),
                    chunks: 16,
                    in_sync: true,
                    ..Default::default()
                },
                pb::ReplicaHealth {
                    agent: "b".into(),
                    chunks: 16,
                    in_sync: false,
                    reason: "agent b: tcp connect error".into(),
                    rebuild: Some(pb::RebuildProgress {
                        phase: "head".into(),
                        layers_done: 2,
                        layers_total: 2,
                        bytes_done: 1 << 20,
                        head_blocks_done: 10,
                        head_blocks_total: 40,
                        elapsed_ms: 3000,
                    }),
                    last_rebuild: String::new(),
                },
            ],
            fuse_file: String::new(),
            role: pb::VolumeRole::Primary as i32,
        };
        let st = status_of(&v, &d, &head, now());
        assert_eq!(st.phase, VolumePhase::Degraded);
        let b = &st.replicas[1];
        assert_eq!(b.health, ReplicaHealth::Rebuilding);
        let r = b.rebuild.as_ref().unwrap();
        assert_eq!(
            (r.phase, r.head_blocks_done, r.head_blocks_total),
            (RebuildPhase::Head, 10, 40)
        );
        let get = |t: &str| st.conditions.iter().find(|c| c.type_ == t).unwrap().clone();
        assert_eq!(get(condition::READY).status, ConditionStatus::False);
        assert!(get(condition::DEGRADED).message.contains("out of sync: b"));
        assert_eq!(get(condition::REBUILDING).status, ConditionStatus::True);
    }

    #[test]
    fn a_grown_spec_keeps_the_placed_size_and_says_growth_is_not_supported() {
        let c = cluster(&[("a", Healthy, 0), ("b", Healthy, 0)]);
        let mut v = vol();
        let d = desired(&v, &c).unwrap();
        v.status = Some(VolumeStatus {
            placement: Some(d.placement.clone()),
            size_bytes: Some(1 << 30),
            ..Default::default()
        });
        v.spec.size_bytes = 2 << 30;
        let d = desired(&v, &c).unwrap();
        assert_eq!(d.open.size_bytes, 1 << 30, "the replicas keep their geometry");
        let head = pb::HeadStatus { role: pb::VolumeRole::Primary as i32, ..Default::default() };
        let st = status_of(&v, &d, &head, now());
        assert_eq!(st.size_bytes, Some(1 << 30));
        let ready = st.conditions.iter().find(|c| c.type_ == condition::READY).unwrap();
        assert_eq!(ready.reason, "GrowthNotSupported");
        assert!(ready.message.contains("not supported yet"), "{}", ready.message);
    }

    #[test]
    fn status_lists_the_agents_snapshots_with_hex_digests_newest_bounded() {
        let snap = |i: u64| pb::SnapshotInfo {
            snapshot_id: format!("s{i}"),
            generation: i,
            digest: vec![i as u8; 32].into(),
            sealed_at_unix: 1_800_000_000 + i as i64,
            divergent: i == 1,
            ..Default::default()
        };
        let few: Vec<_> = (0..3).map(snap).collect();
        let st = status_snapshots(&few);
        assert_eq!(st.len(), 3);
        assert_eq!(st[2].digest, "02".repeat(32));
        assert!(st[1].divergent && !st[0].divergent);
        assert_eq!(st[2].created_at.0.as_second(), 1_800_000_002);
        let many: Vec<_> = (0..(MAX_STATUS_SNAPSHOTS as u64 + 5)).map(snap).collect();
        let st = status_snapshots(&many);
        assert_eq!(st.len(), MAX_STATUS_SNAPSHOTS);
        assert_eq!(st[0].id, "s5", "the oldest go first");
    }
}
