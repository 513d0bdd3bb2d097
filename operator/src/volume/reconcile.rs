//! The Volume reconcile: observe (its StorageCluster, the head at its
//! agent) -> validate and desired (pure, `desired.rs`) -> apply (open the
//! head, promote or demote) -> status (pure, `status.rs`, written on
//! `/status`). Deletion runs behind the finalizer: it removes the replicas,
//! and is refused while a RemoteLink uses the volume.
//!
//! Invariant: a role held by a switchover (`ROLE_HOLD`) is never changed
//! here; the head is opened before anything else is asked of it.

use std::{sync::Arc, time::Duration};

use cairn_api::{
    agent::v1 as pb,
    crd::{
        AgentHealth, Condition, ConditionStatus, RemoteLink, StorageCluster, Volume, VolumePhase,
        set_condition, volume::condition,
    },
};
use kube::{
    Api, Resource, ResourceExt,
    api::ListParams,
    runtime::{
        controller::Action,
        events::EventType,
        finalizer::{Event as Finalized, finalizer},
    },
};

use super::{
    Error, FINALIZER, Invalid, RESYNC, ROLE_HOLD, desired, restore, status_of, status_snapshots,
};
use crate::{
    context::{Context, agent_endpoint},
    report::{apply_status, apply_status_at, event, now},
};

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
    // Apply: reserve the head's epoch, open the head, then its role.
    if vol.status.as_ref().and_then(|s| s.head.as_ref()) != Some(&d.head) {
        reserve_head(&api, vol, &d).await?;
    }
    let mut head = ctx.agents.open_head(&d.endpoint, d.open.clone()).await?;
    // The snapshots as the head's agent has them (for status, and the
    // generation of a demotion's last snapshot); unknown if it cannot say.
    let snaps = ctx.agents.snapshots(&d.endpoint, &d.open.volume_id).await.ok();
    // A Volume with a source is filled before its head takes its role.
    if vol.restoring() {
        return restore_step(vol, &d, &head, snaps.as_deref(), ctx).await;
    }
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

/// Records a new head (its agent and epoch, with the placement and the
/// volume id) in the Volume's status before any agent hears of it, on the
/// condition that the Volume is still the one this reconcile read
/// (`resourceVersion`): two reconciles (a second operator, or a stale
/// cache) can never open heads at one epoch, and a failure between this
/// and `OpenHead` leaves the reservation, which the next reconcile opens
/// (`OpenHead` is idempotent at one epoch) or moves one epoch up.
async fn reserve_head(api: &Api<Volume>, vol: &Volume, d: &super::Desired) -> Result<(), Error> {
    let Some(rv) = vol.meta().resource_version.as_deref() else {
        return Err(Error::Unversioned);
    };
    let mut st = vol.status.clone().unwrap_or_default();
    st.head = Some(d.head.clone());
    st.placement = Some(d.placement.clone());
    st.volume_id = Some(d.open.volume_id.clone());
    apply_status_at(api, &vol.name_any(), rv, &st).await?;
    tracing::info!(agent = %d.head.agent, epoch = d.head.epoch, "head reserved");
    Ok(())
}

/// The restore of a Volume with `spec.source` (`restore.rs`): the status
/// says Restoring before the copy starts; `Restored=True` is written once
/// it returned, and only then is a clone's snapshot deleted at its source;
/// the next reconcile (in a second) gives the head its spec role.
async fn restore_step(
    vol: &Volume,
    d: &super::Desired,
    head: &pb::HeadStatus,
    snaps: Option<&[pb::SnapshotInfo]>,
    ctx: &Context,
) -> Result<Action, Error> {
    let ns = vol.namespace().unwrap_or_default();
    let api: Api<Volume> = Api::namespaced(ctx.client.clone(), &ns);
    let from = vol.spec.source.as_ref().map_or("", |s| s.volume_name()).to_string();
    let mut st = status_of(vol, d, head, now());
    if let Some(snaps) = snaps {
        st.snapshots = status_snapshots(snaps);
    }
    let restored = |st: &mut cairn_api::crd::VolumeStatus, ok: bool, reason: &str, m: String| {
        let c = Condition::new(condition::RESTORED, ok, reason, m, vol.meta().generation, now());
        set_condition(&mut st.conditions, c)
    };
    let copying = format!("copying the content of Volume {from} into this volume");
    if restored(&mut st, false, "Restoring", copying) {
        apply_status(&api, &vol.name_any(), &st).await?;
    }
    match restore::restore(vol, d, ctx).await? {
        Ok(origin) => {
            let m = format!(
                "snapshot {} of Volume {from} copied and sealed here with its digest",
                origin.snapshot
            );
            restored(&mut st, true, "Restored", m.clone());
            apply_status(&api, &vol.name_any(), &st).await?;
            event(ctx, vol, "Reconcile", EventType::Normal, "Restored", m).await;
            if origin.taken_for_clone {
                restore::drop_clone_snapshot(ctx, &origin).await;
            }
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Err(wait) => {
            let (reason, m) = (wait.reason(), wait.to_string());
            if restored(&mut st, false, reason, m.clone()) {
                event(ctx, vol, "Reconcile", EventType::Warning, reason, m).await;
                apply_status(&api, &vol.name_any(), &st).await?;
            }
            Ok(Action::requeue(RESYNC))
        }
    }
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
    // A restore or clone still copying from this volume needs it.
    let volumes: Api<Volume> = Api::namespaced(ctx.client.clone(), &ns);
    for v in volumes.list(&ListParams::default()).await? {
        let reads = v.spec.source.as_ref().is_some_and(|s| s.volume_name() == name);
        if reads && v.restoring() && v.meta().deletion_timestamp.is_none() {
            let e = Error::RestoreSource { volume: name.clone(), restoring: v.name_any() };
            event(ctx, vol, "Reconcile", EventType::Warning, "DeletionBlocked", e.to_string())
                .await;
            return Err(e);
        }
    }
    let Some(st) = vol.status.as_ref() else { return Ok(Action::await_change()) };
    let id = vol.agent_volume_id();
    let clusters: Api<StorageCluster> = Api::all(ctx.client.clone());
    let cluster = clusters.get_opt(&vol.spec.cluster).await?;
    // An agent the cluster reports Unreachable (its Lease expired) cannot
    // answer: waiting for it would keep the finalizer for ever. Its replica
    // stays on its disk, named by this Volume's uid-tagged id, so no other
    // Volume ever takes it for its own.
    let reachable = |agent: &str| {
        let listed = cluster.as_ref().and_then(|c| c.status.as_ref());
        let a = listed.and_then(|s| s.agents.iter().find(|a| a.name == agent))?;
        (a.health != AgentHealth::Unreachable).then(|| agent_endpoint(cluster.as_ref(), agent))?
    };
    if let Some(h) = &st.head
        && let Some(ep) = reachable(&h.agent)
    {
        match ctx.agents.close_head(&ep, &id).await {
            Err(e) if !e.is_not_found() => return Err(e.into()),
            _ => {}
        }
    }
    let mut gone = Vec::new();
    for p in st.placement.iter().flat_map(|p| &p.agents) {
        match reachable(&p.name) {
            Some(ep) => ctx.agents.delete_replica(&ep, &id).await?,
            None => gone.push(p.name.as_str()),
        }
    }
    let note = if gone.is_empty() {
        format!("replicas of {id} removed")
    } else {
        format!(
            "replicas of {id} removed, except on {}: those agents are unreachable or no longer in storage cluster {}; remove volumes/{id} from their data dirs by hand (the agent's ReplicaStore.DeleteReplica) when they are back",
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
        Error::InUse { .. } | Error::RestoreSource { .. } => {
            Action::requeue(Duration::from_secs(60))
        }
        _ => Action::requeue(Duration::from_secs(5)),
    }
}
