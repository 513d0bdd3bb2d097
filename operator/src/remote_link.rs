//! The `RemoteLink` reconciler: observe (the source volume and its head
//! agent; the target cluster and, for a cluster in this Kubernetes cluster,
//! the target volume's head agent; the pairing secret) -> desired (the
//! agents' link: endpoint, secret, bandwidth policy, source selection,
//! compression; paused = a rate of 0) -> apply (register at the receiver,
//! put at the sender; a new copy, resync or switchover request is started in
//! the background) -> status (last copied snapshot, copy in progress, lag,
//! conditions).
//!
//! Invariants: copies follow snapshots (the agent link forwards every
//! snapshot as it completes); a request token is acted on once (its value
//! is recorded in status before the next reconcile); the pairing secret
//! lives in a Secret owned by the link (or, for a peer site, the Secret its
//! StorageCluster names) and is never written to status or logs.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use cairn_api::{
    agent::v1 as pb,
    crd::{
        Condition, ConditionStatus, CopiedSnapshot, CopyProgress, RemoteLink, RemoteLinkStatus,
        SnapshotSchedule, StorageCluster, Volume, quantity::format_rate, remote_link::condition,
        set_condition, storage_cluster::gateway_secret,
    },
};
use jiff::Timestamp;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Resource, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams},
    runtime::{controller::Action, events::EventType},
};
use serde_json::json;

use crate::{
    agent::AgentError,
    report::{MANAGER, apply_status, event, k8s_time},
    snapshot_schedule::copies_follow,
    volume::{Context, ROLE_HOLD, head_endpoint, volume_id},
};

/// How often a link's progress and lag are looked at.
pub const POLL: Duration = Duration::from_secs(10);

/// A link that cannot be set up as it stands: it waits and says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Waiting {
    #[error("source volume {0} has no head yet (is it Ready?)")]
    SourceNotPlaced(String),
    #[error("target cluster {0} does not exist: create it, or fix spec.targetCluster")]
    TargetClusterNotFound(String),
    #[error("target volume {0} has no head yet: create it with role Remote on the target cluster")]
    TargetNotPlaced(String),
    #[error("secret {0} has no pairing-secret key of at least 16 bytes")]
    NoPairingSecret(String),
}

impl Waiting {
    fn reason(&self) -> &'static str {
        match self {
            Waiting::SourceNotPlaced(_) => "SourceNotPlaced",
            Waiting::TargetClusterNotFound(_) => "TargetClusterNotFound",
            Waiting::TargetNotPlaced(_) => "TargetNotPlaced",
            Waiting::NoPairingSecret(_) => "NoPairingSecret",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Agent(#[from] AgentError),
    #[error("the API server: {0}")]
    Kube(#[from] kube::Error),
}

/// A link's two ends as observed: the source Volume and its head agent
/// (endpoint, volume id), the target Volume (`None` at a peer site: it is
/// that site's operator's), the receiver's endpoint, the pairing secret.
#[derive(Debug)]
struct Ends {
    source: Volume,
    src_ep: String,
    src_vol: String,
    target: Option<Volume>,
    tgt_ep: String,
    secret: Vec<u8>,
}

/// The agents' link id for a RemoteLink.
pub fn link_id(namespace: &str, name: &str) -> String {
    volume_id(namespace, name)
}

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
        link_id: link_id(&rl.namespace().unwrap_or_default(), &rl.name_any()),
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

/// Pure: the status `st` (as this reconcile has it so far) brought up to
/// date from the sender's view of the link and the source's snapshots (for
/// the lag: the age of the newest snapshot at the target).
pub fn status_of(
    rl: &RemoteLink,
    mut st: RemoteLinkStatus,
    link: &pb::LinkStatus,
    source_snaps: &[pb::SnapshotInfo],
    now: Timestamp,
) -> RemoteLinkStatus {
    let generation = rl.meta().generation;
    st.link_id = link.link.as_ref().map(|l| l.link_id.clone());
    let cursor = &link.last_copied_snapshot_id;
    let sealed = source_snaps.iter().find(|s| &s.snapshot_id == cursor);
    if !cursor.is_empty() {
        let created =
            sealed.map_or(now, |s| Timestamp::from_second(s.sealed_at_unix).unwrap_or(now));
        st.last_copied_snapshot = Some(CopiedSnapshot {
            id: cursor.clone(),
            generation: link.last_copied_generation as i64,
            digest: link.last_copied_digest.iter().map(|b| format!("{b:02x}")).collect(),
            created_at: k8s_time(created),
            copied_at: k8s_time(Timestamp::from_second(link.last_copied_at_unix).unwrap_or(now)),
        });
        st.lag_seconds = Some(now.duration_since(created).as_secs().max(0));
    }
    let running = link.progress.as_ref().filter(|p| !p.done && !p.snapshot_id.is_empty());
    st.copy = running.map(|p| {
        let done = p.bytes_durable.max(p.bytes_sent).min(p.bytes_total.max(p.bytes_sent));
        CopyProgress {
            snapshot: p.snapshot_id.clone(),
            bytes_done: done as i64,
            bytes_total: p.bytes_total as i64,
            percent: (done * 100).checked_div(p.bytes_total).unwrap_or(0) as i32,
            rate_bytes_per_second: p.rate_bytes_per_sec as i64,
            rate: Some(format_rate(p.rate_bytes_per_sec as i64)),
            eta_seconds: Some(p.eta_seconds as i64),
            started_at: None,
        }
    });
    st.current_limit_bytes_per_second = match link.current_rate_bytes_per_sec {
        0 => None,
        u64::MAX => None,
        n => Some(n as i64),
    };
    let newest = source_snaps.iter().rfind(|s| !s.divergent).map(|s| s.snapshot_id.as_str());
    let synced = running.is_none() && !cursor.is_empty() && newest == Some(cursor.as_str());
    let c = |t: &str, on: bool, reason: &str, m: String| {
        Condition::new(
            t,
            if on { ConditionStatus::True } else { ConditionStatus::False },
            reason,
            m,
            generation,
            k8s_time(now),
        )
    };
    set_condition(
        &mut st.conditions,
        c(
            condition::PAUSED,
            rl.spec.paused,
            if rl.spec.paused { "Paused" } else { "Running" },
            String::new(),
        ),
    );
    set_condition(
        &mut st.conditions,
        c(
            condition::SYNCING,
            running.is_some(),
            if running.is_some() { "Copying" } else { "Idle" },
            running.map(|p| format!("copying {}", p.snapshot_id)).unwrap_or_default(),
        ),
    );
    set_condition(
        &mut st.conditions,
        c(
            condition::SYNCED,
            synced,
            if synced { "UpToDate" } else { "Behind" },
            match newest {
                Some(n) if !synced => format!("the newest snapshot {n} is not at the target yet"),
                _ => String::new(),
            },
        ),
    );
    let degraded = !link.last_error.is_empty();
    set_condition(
        &mut st.conditions,
        c(
            condition::DEGRADED,
            degraded,
            if degraded { "CopyFailed" } else { "Healthy" },
            link.last_error.clone(),
        ),
    );
    st.observed_generation = generation;
    st
}

/// The pairing secret of a link to a cluster in this Kubernetes cluster:
/// the Secret `<link>-pairing`, created (owned by the link) when missing.
async fn local_secret(ctx: &Context, rl: &RemoteLink) -> Result<Vec<u8>, Error> {
    let ns = rl.namespace().unwrap_or_default();
    let name = format!("{}-pairing", rl.name_any());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(s) = secrets.get_opt(&name).await?
        && let Some(v) = s.data.as_ref().and_then(|d| d.get(gateway_secret::PAIRING_SECRET))
        && v.0.len() >= 16
    {
        return Ok(v.0.clone());
    }
    // 32 bytes from a cryptographic generator seeded by the OS.
    let secret: Vec<u8> = rand::random::<[u8; 32]>().to_vec();
    let owner = rl.controller_owner_ref(&()).into_iter().collect();
    let obj = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            owner_references: Some(owner),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            gateway_secret::PAIRING_SECRET.to_string(),
            ByteString(secret.clone()),
        )])),
        ..Default::default()
    };
    let mut body = serde_json::to_value(&obj).expect("a secret serializes");
    body["apiVersion"] = json!("v1");
    body["kind"] = json!("Secret");
    secrets.patch(&name, &PatchParams::apply(MANAGER), &Patch::Apply(&body)).await?;
    Ok(secret)
}

/// Observe: where the link's copies come from and go to, and its pairing
/// secret; registers the link at a receiver in this Kubernetes cluster.
/// `Ok(Err(_))`: the link cannot be set up yet, and why; `Err(_)`: the API
/// server or an agent failed (a retry may help).
async fn observe(ctx: &Context, rl: &RemoteLink) -> Result<Result<Ends, Waiting>, Error> {
    let ns = rl.namespace().unwrap_or_default();
    let name = rl.name_any();
    let volumes: Api<Volume> = Api::namespaced(ctx.client.clone(), &ns);
    let clusters: Api<StorageCluster> = Api::all(ctx.client.clone());
    let source = volumes.get_opt(&rl.spec.source_volume).await?;
    let source_cluster = match &source {
        Some(v) => clusters.get_opt(&v.spec.cluster).await?,
        None => None,
    };
    let placed = source.as_ref().and_then(|v| {
        let (ep, id) = head_endpoint(v.status.as_ref(), source_cluster.as_ref())?;
        Some((v.clone(), ep, id))
    });
    let Some((source, src_ep, src_vol)) = placed else {
        return Ok(Err(Waiting::SourceNotPlaced(rl.spec.source_volume.clone())));
    };
    let Some(target_cluster) = clusters.get_opt(&rl.spec.target_cluster).await? else {
        return Ok(Err(Waiting::TargetClusterNotFound(rl.spec.target_cluster.clone())));
    };
    if let Some(gw) = &target_cluster.spec.gateway {
        // A peer site: its gateway receives; the secret is the one its
        // StorageCluster names.
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &gw.secret_ref.namespace);
        let secret = secrets
            .get_opt(&gw.secret_ref.name)
            .await?
            .and_then(|s| s.data)
            .and_then(|d| d.get(gateway_secret::PAIRING_SECRET).map(|b| b.0.clone()))
            .filter(|b| b.len() >= 16);
        return Ok(match secret {
            Some(secret) => Ok(Ends {
                source,
                src_ep,
                src_vol,
                target: None,
                tgt_ep: gw.endpoint.clone(),
                secret,
            }),
            None => Err(Waiting::NoPairingSecret(format!(
                "{}/{}",
                gw.secret_ref.namespace, gw.secret_ref.name
            ))),
        });
    }
    let target = volumes.get_opt(&rl.spec.target_volume).await?;
    let Some((tgt_ep, tgt_vol)) =
        head_endpoint(target.as_ref().and_then(|v| v.status.as_ref()), Some(&target_cluster))
    else {
        return Ok(Err(Waiting::TargetNotPlaced(rl.spec.target_volume.clone())));
    };
    let secret = local_secret(ctx, rl).await?;
    let req = pb::RegisterLinkRequest {
        link_id: link_id(&ns, &name),
        pairing_secret: secret.clone().into(),
        target_volume_id: tgt_vol,
    };
    ctx.agents.register_link(&tgt_ep, req).await?;
    Ok(Ok(Ends { source, src_ep, src_vol, target, tgt_ep, secret }))
}

/// Reconciles one RemoteLink.
#[tracing::instrument(skip_all, fields(link = %rl.name_any(), namespace = ?rl.namespace()))]
pub async fn reconcile(rl: Arc<RemoteLink>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = rl.namespace().unwrap_or_default();
    let name = rl.name_any();
    let api: Api<RemoteLink> = Api::namespaced(ctx.client.clone(), &ns);
    let mut st = rl.status.clone().unwrap_or_default();

    let plan = observe(&ctx, &rl).await?;
    let mut ends = match plan {
        Ok(p) => p,
        Err(w) => {
            let c = Condition::new(
                condition::SYNCED,
                ConditionStatus::False,
                w.reason(),
                w.to_string(),
                rl.meta().generation,
                k8s_time(Timestamp::now()),
            );
            if set_condition(&mut st.conditions, c) {
                event(&ctx, &*rl, "Copy", EventType::Warning, w.reason(), w.to_string()).await;
            }
            st.observed_generation = rl.meta().generation;
            apply_status(&api, &name, &st).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    };
    // Apply: the link at the sender, then any new request, in the background.
    let schedules = Api::<SnapshotSchedule>::namespaced(ctx.client.clone(), &ns)
        .list(&Default::default())
        .await?;
    let forward = copies_follow(&schedules.items, ends.source.labels());
    let (src_ep, src_vol) = (ends.src_ep.clone(), ends.src_vol.clone());
    let link = agent_link(&rl, &src_vol, ends.tgt_ep.clone(), ends.secret.clone(), forward);
    let id = link.link_id.clone();
    ctx.agents.put_link(&src_ep, link).await?;
    let agents = ctx.agents.clone();
    if rl.spec.copy_request.is_some() && rl.spec.copy_request != st.last_copy_request {
        st.last_copy_request = rl.spec.copy_request.clone();
        let (ep, id, vol) = (src_ep.clone(), id.clone(), src_vol.clone());
        let snap = request_snapshot_name("copy", rl.spec.copy_request.as_deref().unwrap_or(""));
        tokio::spawn(async move {
            // A snapshot of the source now (above every earlier
            // generation), then everything the target lacks. A source that
            // is itself a remote copy (a cascade) takes none: it forwards
            // what it has.
            let snaps = agents.snapshots(&ep, &vol).await.unwrap_or_default();
            let newest = snaps.iter().map(|s| s.generation).max().unwrap_or(0);
            let generation = newest.max(Timestamp::now().as_second() as u64) + 1;
            if !snaps.iter().any(|s| s.snapshot_id == snap)
                && let Err(e) = agents.snapshot(&ep, &vol, &snap, generation).await
            {
                tracing::warn!(link = %id, error = %e, "no snapshot for the requested copy; copying what there is");
            }
            if let Err(e) = agents.sync_link(&ep, &id, false).await {
                tracing::warn!(link = %id, error = %e, "requested copy failed");
            }
        });
        event(
            &ctx,
            &*rl,
            "Copy",
            EventType::Normal,
            "CopyRequested",
            "copying every snapshot the target lacks".into(),
        )
        .await;
    }
    let agents = ctx.agents.clone();
    if rl.spec.resync_request.is_some() && rl.spec.resync_request != st.last_resync_request {
        st.last_resync_request = rl.spec.resync_request.clone();
        let (ep, id) = (src_ep.clone(), id.clone());
        tokio::spawn(async move {
            if let Err(e) = agents.sync_link(&ep, &id, true).await {
                tracing::warn!(link = %id, error = %e, "resync failed");
            }
        });
        event(&ctx, &*rl, "Copy", EventType::Normal, "ResyncRequested", "rolling the target back to the newest shared snapshot (its later ones kept, marked divergent) and copying the delta".into()).await;
    }
    if let Some(sw) = rl
        .spec
        .switchover
        .as_ref()
        .filter(|sw| Some(&sw.request) != st.last_switchover_request.as_ref())
    {
        st.last_switchover_request = Some(sw.request.clone());
        match switchover_refusal(&rl, &ends) {
            Some(why) => {
                event(&ctx, &*rl, "Copy", EventType::Warning, "SwitchoverRefused", why).await;
            }
            None => {
                let value = format!("{name}/{}", sw.request);
                let hold = json!({"metadata": {"annotations": {ROLE_HOLD: &value}}});
                let volumes: Api<Volume> = Api::namespaced(ctx.client.clone(), &ns);
                for v in [&rl.spec.source_volume, &rl.spec.target_volume] {
                    volumes.patch(v, &manager(), &Patch::Merge(&hold)).await?;
                }
                // As the patches left them: held.
                for v in std::iter::once(&mut ends.source).chain(ends.target.as_mut()) {
                    v.annotations_mut().insert(ROLE_HOLD.into(), value.clone());
                }
                event(&ctx, &*rl, "Copy", EventType::Normal, "SwitchoverStarted", format!("demoting {} (sealing a final snapshot), copying what {} lacks, promoting it; then the Volumes' roles are set to match", rl.spec.source_volume, rl.spec.target_volume)).await;
            }
        }
    }
    if let Some(token) = st.last_switchover_request.clone() {
        resume_switchover(&ctx, &rl, &token, &ends, &id);
    }
    // Status.
    let links = ctx.agents.links(&src_ep, &src_vol).await?;
    let snaps = ctx.agents.snapshots(&src_ep, &src_vol).await.unwrap_or_default();
    let mine = links
        .into_iter()
        .find(|l| l.link.as_ref().is_some_and(|l| l.link_id == id))
        .unwrap_or_default();
    let st = status_of(&rl, st, &mine, &snaps, Timestamp::now());
    let l = crate::metrics::LinkLabels { namespace: ns.clone(), link: name.clone() };
    let m = &ctx.metrics;
    m.link_bytes.get_or_create(&l).set(st.copy.as_ref().map_or(0, |c| c.bytes_done));
    m.link_rate.get_or_create(&l).set(st.copy.as_ref().map_or(0, |c| c.rate_bytes_per_second));
    if let Some(lag) = st.lag_seconds {
        m.link_lag.get_or_create(&l).set(lag);
    }
    apply_status(&api, &name, &st).await?;
    Ok(Action::requeue(POLL))
}

/// Pure: why a switchover request cannot run, if it cannot: the target is
/// at a peer site (its Volume is its own operator's), or the source is
/// attached to a node (its pods would keep writing a demoted volume).
fn switchover_refusal(rl: &RemoteLink, ends: &Ends) -> Option<String> {
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

/// Merge patches of Volumes, recorded under the operator's name.
fn manager() -> PatchParams {
    PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() }
}

/// Switchovers this operator runs now, by link id.
static RUNNING: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Runs (or, after a restart, resumes) the switchover `token` while the
/// Volumes carry its role hold: the agents' `Switchover` (retried every
/// 10 s until it succeeds: it resumes the final copy), then each Volume's
/// role is set to match its head and its hold lifted, the source first.
fn resume_switchover(ctx: &Context, rl: &RemoteLink, token: &str, ends: &Ends, link_id: &str) {
    let ns = rl.namespace().unwrap_or_default();
    let hold = format!("{}/{token}", rl.name_any());
    let held = |v: &Volume| v.annotations().get(ROLE_HOLD) == Some(&hold);
    let (source, target) = (&ends.source, ends.target.as_ref());
    let source_held = held(source);
    if !source_held && !target.is_some_and(held) {
        return;
    }
    if !RUNNING.lock().unwrap().insert(link_id.to_string()) {
        return;
    }
    let role = |v: Option<&Volume>| v.and_then(|v| v.status.as_ref()).and_then(|s| s.role);
    let done = role(Some(source)) == Some(cairn_api::crd::VolumeRole::Remote)
        && role(target) == Some(cairn_api::crd::VolumeRole::Primary);
    let snap = rl
        .spec
        .switchover
        .as_ref()
        .and_then(|sw| sw.final_snapshot.clone())
        .unwrap_or_else(|| request_snapshot_name("switchover", token));
    let (agents, recorder_ctx, rl) = (ctx.agents.clone(), ctx.clone(), rl.clone());
    let (src_ep, link_id) = (ends.src_ep.clone(), link_id.to_string());
    let generation = Timestamp::now().as_second() as u64;
    tokio::spawn(async move {
        let ctx = recorder_ctx;
        if source_held && !done {
            let mut tries = 0u32;
            while let Err(e) = agents.switchover(&src_ep, &link_id, &snap, generation).await {
                tries += 1;
                tracing::warn!(link = %link_id, error = %e, "switchover not done yet; resuming in 10 s");
                if tries == 1 {
                    event(
                        &ctx,
                        &rl,
                        "Copy",
                        EventType::Warning,
                        "SwitchoverRetrying",
                        format!(
                            "{e}; retrying every 10 s (the final copy resumes where it stopped)"
                        ),
                    )
                    .await;
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
        let volumes: Api<Volume> = Api::namespaced(ctx.client.clone(), &ns);
        let flips = [(&rl.spec.source_volume, "Remote"), (&rl.spec.target_volume, "Primary")];
        for (v, role) in flips {
            let p = json!({"metadata": {"annotations": {ROLE_HOLD: null}}, "spec": {"role": role}});
            if let Err(e) = volumes.patch(v, &manager(), &Patch::Merge(&p)).await {
                tracing::warn!(volume = %v, error = %e, "setting the role after the switchover failed; the next reconcile finishes it");
                RUNNING.lock().unwrap().remove(&link_id);
                return;
            }
        }
        event(&ctx, &rl, "Copy", EventType::Normal, "SwitchedOver", format!("Volume {} is the primary now and {} a remote copy; copy back with a RemoteLink from {} to {}", rl.spec.target_volume, rl.spec.source_volume, rl.spec.target_volume, rl.spec.source_volume)).await;
        RUNNING.lock().unwrap().remove(&link_id);
    });
}

/// `error_policy`: back off and try again.
pub fn error_policy(_rl: Arc<RemoteLink>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %err, "reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    use cairn_api::crd::RemoteLinkSpec;

    fn link(paused: bool) -> RemoteLink {
        let mut rl: RemoteLink = serde_json::from_value(json!({
            "apiVersion": "cairn.dev/v1alpha1", "kind": "RemoteLink",
            "metadata": {"name": "db-to-b", "namespace": "shop", "generation": 2},
            "spec": {"sourceVolume": "db", "targetCluster": "site-b", "targetVolume": "db-copy",
                     "bandwidth": {"defaultBytesPerSecond": 1000000}}
        }))
        .unwrap();
        let _: &RemoteLinkSpec = &rl.spec;
        rl.spec.paused = paused;
        rl
    }

    #[test]
    fn the_agents_link_carries_the_policy_and_a_pause_is_a_rate_of_zero() {
        let l = agent_link(&link(false), "shop-db", "http://b:7070".into(), vec![7; 32], true);
        assert_eq!(l.link_id, "shop-db-to-b");
        assert!(l.policy.is_some());
        let paused = agent_link(&link(true), "shop-db", "http://b:7070".into(), vec![7; 32], false);
        let Some(pb::bandwidth_policy::Policy::Fixed(r)) = paused.policy.and_then(|p| p.policy)
        else {
            panic!("a paused link is a fixed rate")
        };
        assert_eq!((r.unlimited, r.bytes_per_sec), (false, 0));
    }

    #[test]
    fn status_reports_the_recovery_point_as_lag_and_progress_in_percent() {
        let now: Timestamp = "2026-11-24T12:00:00Z".parse().unwrap();
        let snaps = vec![
            pb::SnapshotInfo {
                snapshot_id: "s1".into(),
                sealed_at_unix: now.as_second() - 900,
                ..Default::default()
            },
            pb::SnapshotInfo {
                snapshot_id: "s2".into(),
                sealed_at_unix: now.as_second() - 60,
                ..Default::default()
            },
        ];
        let ls = pb::LinkStatus {
            link: Some(pb::Link { link_id: "shop-db-to-b".into(), ..Default::default() }),
            last_copied_snapshot_id: "s1".into(),
            last_copied_generation: 1,
            last_copied_digest: vec![0xab; 32].into(),
            last_copied_at_unix: now.as_second() - 800,
            progress: Some(pb::CopyProgressResponse {
                snapshot_id: "s2".into(),
                bytes_sent: 25 << 20,
                bytes_total: 100 << 20,
                rate_bytes_per_sec: (10 << 20) as f64,
                ..Default::default()
            }),
            ..Default::default()
        };
        let st = status_of(&link(false), Default::default(), &ls, &snaps, now);
        assert_eq!(st.lag_seconds, Some(900), "the newest snapshot at the target is 15 min old");
        let copy = st.copy.unwrap();
        assert_eq!((copy.snapshot.as_str(), copy.percent), ("s2", 25));
        let get = |t: &str| st.conditions.iter().find(|c| c.type_ == t).unwrap().status;
        assert_eq!(get(condition::SYNCING), ConditionStatus::True);
        assert_eq!(get(condition::SYNCED), ConditionStatus::False);
        // Once s2 is there and nothing runs: Synced.
        let done = pb::LinkStatus { last_copied_snapshot_id: "s2".into(), progress: None, ..ls };
        let st = status_of(&link(false), Default::default(), &done, &snaps, now);
        assert_eq!(st.lag_seconds, Some(60));
        assert_eq!(
            st.conditions.iter().find(|c| c.type_ == condition::SYNCED).unwrap().status,
            ConditionStatus::True
        );
    }
}
