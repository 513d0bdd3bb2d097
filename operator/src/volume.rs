//! The `Volume` reconciler: observe (the StorageCluster, the head at its
//! agent) -> validate -> desired (placement, head agent and epoch, role) ->
//! apply (open the head, promote or demote) -> status. `desired` (in
//! `cairn_client::head`) and `status_of` are pure. Deletion runs behind a
//! finalizer that removes the replicas, and is refused while a RemoteLink
//! uses the volume.
//!
//! Invariants: the placement, once in status, is kept (its agent list and
//! layout version decide where every chunk lives); the head moves only to a
//! healthy agent of the placement and then with a higher epoch, so the old
//! head is fenced.

use std::{sync::Arc, time::Duration};

use cairn_api::{
    agent::v1 as pb,
    crd::{
        Condition, ConditionStatus, RebuildPhase, RebuildProgress, RemoteLink, ReplicaHealth,
        ReplicaStatus, StorageCluster, Volume, VolumePhase, VolumeRole, VolumeSnapshot,
        VolumeStatus,
        quantity::format_bytes,
        set_condition,
        volume::{MAX_STATUS_SNAPSHOTS, condition},
    },
};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::ListParams,
    runtime::{
        controller::Action,
        events::{EventType, Recorder},
        finalizer::{Event as Finalized, finalizer},
    },
};

use crate::{
    agent::{AgentApi, AgentError},
    report::{apply_status, event, now},
};

// The Volume's annotation, its id at the agents and the pure plan of its
// head moved to cairn-api and cairn-client (the CSI controller uses them
// too); re-exported so `crate::volume::…` paths keep working.
pub use cairn_api::crd::volume::{ROLE_HOLD, volume_id};
pub use cairn_client::head::{
    Desired, Invalid, agent_endpoint, desired, endpoint, head_endpoint, placed_size,
};

/// Held on every Volume until its replicas are removed.
pub const FINALIZER: &str = "cairn.dev/replicas";
/// How often a Ready volume's health is looked at again.
pub const RESYNC: Duration = Duration::from_secs(30);

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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    Agent(#[from] AgentError),
    #[error("the API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("volume {volume} is used by RemoteLink {link}: delete the link first, then the volume")]
    InUse { volume: String, link: String },
    #[error("finalizer: {0}")]
    Finalizer(String),
}

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
    let ready = out.is_empty() && st.role == Some(vol.spec.role);
    let (reason, message) = if ready && (d.open.size_bytes as i64) < vol.spec.size_bytes {
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

/// Reconciles one Volume.
#[tracing::instrument(skip_all, fields(volume = %vol.name_any(), namespace = ?vol.namespace()))]
pub async fn reconcile(vol: Arc<Volume>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = vol.namespace().unwrap_or_default();
    let api: Api<Volume> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, vol, |ev| async {
        match ev {
            Finalized::Apply(v) => apply(&v, &ctx).await,
            Finalized::Cleanup(v) => cleanup(&v, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

async fn apply(vol: &Volume, ctx: &Context) -> Result<Action, Error> {
    let ns = vol.namespace().unwrap_or_default();
    let api: Api<Volume> = Api::namespaced(ctx.client.clone(), &ns);
    let clusters: Api<StorageCluster> = Api::all(ctx.client.clone());
    // Observe and validate.
    let planned = match clusters.get_opt(&vol.spec.cluster).await? {
        None => Err(Invalid::ClusterNotFound(vol.spec.cluster.clone())),
        Some(cluster) => desired(vol, &cluster),
    };
    let d = match planned {
        Ok(d) => d,
        Err(inv) => {
            let mut st = vol.status.clone().unwrap_or_default();
            st.phase = VolumePhase::Pending;
            let c = Condition::new(
                condition::READY,
                ConditionStatus::False,
                inv.reason(),
                inv.to_string(),
                vol.meta().generation,
                now(),
            );
            if set_condition(&mut st.conditions, c) {
                event(ctx, vol, "Reconcile", EventType::Warning, inv.reason(), inv.to_string())
                    .await;
            }
            st.observed_generation = vol.meta().generation;
            apply_status(&api, &vol.name_any(), &st).await?;
            // The cluster may appear or gain agents: look again later.
            return Ok(Action::requeue(RESYNC));
        }
    };
    // Apply: the head, then its role.
    let mut head = ctx.agents.open_head(&d.endpoint, d.open.clone()).await?;
    // The snapshots as the head's agent has them (for status, and the
    // generation of a demotion's last snapshot); unknown if it cannot say.
    let snaps = ctx.agents.snapshots(&d.endpoint, &d.open.volume_id).await.ok();
    let at_head = pb::VolumeRole::try_from(head.role).unwrap_or(pb::VolumeRole::Primary);
    let want = pb::VolumeRole::from(vol.spec.role);
    let hold = vol.annotations().get(ROLE_HOLD).cloned();
    if at_head != want && hold.is_none() {
        let id = &d.open.volume_id;
        match want {
            pb::VolumeRole::Primary => {
                ctx.agents.promote(&d.endpoint, id).await?;
                event(
                    ctx,
                    vol,
                    "Reconcile",
                    EventType::Normal,
                    "Promoted",
                    format!("promoted at agent {}: it takes writes now", d.head.agent),
                )
                .await;
            }
            pb::VolumeRole::Remote => {
                let listed = snaps.iter().flatten().map(|s| s.generation as i64).max();
                let recorded = vol
                    .status
                    .as_ref()
                    .and_then(|s| s.snapshots.iter().map(|s| s.generation).max());
                let generation = listed.max(recorded).unwrap_or(0) + 1;
                let snap = format!("demoted-g{}", vol.meta().generation.unwrap_or(0));
                ctx.agents.demote(&d.endpoint, id, &snap, generation as u64).await?;
                event(
                    ctx,
                    vol,
                    "Reconcile",
                    EventType::Normal,
                    "Demoted",
                    format!(
                        "demoted at agent {} after snapshot {snap}: only copies write it now",
                        d.head.agent
                    ),
                )
                .await;
            }
        }
        head.role = want as i32;
    }
    // Status.
    let before = vol.status.as_ref().map(|s| s.phase);
    let mut st = status_of(vol, &d, &head, now());
    if let Some(snaps) = &snaps {
        st.snapshots = status_snapshots(snaps);
    }
    if let Some(hold) = hold.filter(|_| at_head != want) {
        let c = Condition::new(
            condition::READY,
            ConditionStatus::False,
            "RoleHeld",
            format!(
                "the head is {at_head:?}, the spec asks {want:?}: held by the switchover {hold} (RemoteLink/request); the roles change when it completes"
            ),
            vol.meta().generation,
            now(),
        );
        set_condition(&mut st.conditions, c);
    }
    if before != Some(st.phase) && st.phase == VolumePhase::Degraded {
        let m = st
            .conditions
            .iter()
            .find(|c| c.type_ == condition::DEGRADED)
            .map(|c| c.message.clone());
        event(ctx, vol, "Reconcile", EventType::Warning, "Degraded", m.unwrap_or_default()).await;
    }
    apply_status(&api, &vol.name_any(), &st).await?;
    Ok(Action::requeue(RESYNC))
}

async fn cleanup(vol: &Volume, ctx: &Context) -> Result<Action, Error> {
    let ns = vol.namespace().unwrap_or_default();
    let name = vol.name_any();
    let links: Api<RemoteLink> = Api::namespaced(ctx.client.clone(), &ns);
    for l in links.list(&ListParams::default()).await? {
        let s = &l.spec;
        let uses = s.source_volume == name
            || (s.target_volume == name && s.target_cluster == vol.spec.cluster);
        if uses {
            let e = Error::InUse { volume: name.clone(), link: l.name_any() };
            event(ctx, vol, "Reconcile", EventType::Warning, "DeletionBlocked", e.to_string())
                .await;
            return Err(e);
        }
    }
    let Some(st) = vol.status.as_ref() else { return Ok(Action::await_change()) };
    let id = st.volume_id.clone().unwrap_or_else(|| volume_id(&ns, &name));
    let clusters: Api<StorageCluster> = Api::all(ctx.client.clone());
    let cluster = clusters.get_opt(&vol.spec.cluster).await?;
    if let Some(h) = &st.head
        && let Some(ep) = agent_endpoint(cluster.as_ref(), &h.agent)
    {
        match ctx.agents.close_head(&ep, &id).await {
            Err(e) if !e.is_not_found() => return Err(e.into()),
            _ => {}
        }
    }
    let mut gone = Vec::new();
    for p in st.placement.iter().flat_map(|p| &p.agents) {
        match agent_endpoint(cluster.as_ref(), &p.name) {
            Some(ep) => ctx.agents.delete_replica(&ep, &id).await?,
            None => gone.push(p.name.as_str()),
        }
    }
    let note = if gone.is_empty() {
        format!("replicas of {id} removed")
    } else {
        format!(
            "replicas of {id} removed, except on {}: those agents are no longer in storage cluster {}; remove volumes/{id} from their data dirs by hand (or DeleteReplica) if they come back",
            gone.join(", "),
            vol.spec.cluster
        )
    };
    event(ctx, vol, "Reconcile", EventType::Normal, "Deleted", note).await;
    Ok(Action::await_change())
}

/// `error_policy`: an invalid object waits for a change; anything else
/// backs off and tries again.
pub fn error_policy(_vol: Arc<Volume>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %err, "reconcile failed");
    match err {
        Error::Invalid(_) => Action::await_change(),
        Error::InUse { .. } => Action::requeue(Duration::from_secs(60)),
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_api::crd::{
        AgentHealth, AgentStatus, ClusterDefaults, HeadLocation, StorageClusterSpec,
        StorageClusterStatus, VolumeSpec,
    };

    fn cluster(agents: &[(&str, AgentHealth, i32)]) -> StorageCluster {
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
                .map(|(n, h, load)| AgentStatus {
                    name: n.to_string(),
                    node: Some(format!("node-{n}")),
                    address: format!("{n}.example:7070"),
                    domain: None,
                    capacity_bytes: 1 << 40,
                    used_bytes: 0,
                    health: *h,
                    load: *load,
                    last_seen: None,
                    message: None,
                })
                .collect(),
            ..Default::default()
        });
        c
    }

    fn vol() -> Volume {
        let mut v = Volume::new(
            "db",
            VolumeSpec {
                cluster: "site-a".into(),
                size_bytes: 1 << 30,
                replicas: None,
                role: VolumeRole::Primary,
                attachable: None,
                attached_node: None,
            },
        );
        v.meta_mut().namespace = Some("shop".into());
        v
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
        assert_eq!(d.endpoint, "http://b.example:7070");
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
        assert_eq!(moved.endpoint, "http://c.example:7070");
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

    #[test]
    fn volume_ids_are_dns_labels() {
        assert_eq!(volume_id("shop", "db"), "shop-db");
        let long =
            volume_id("a-very-long-namespace-name-for-testing", "and-an-even-longer-volume-name-x");
        assert!(long.starts_with("v-") && long.len() == 26, "{long}");
        assert!(volume_id("ns", "with.dots").starts_with("v-"));
    }
}
