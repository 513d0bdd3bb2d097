//! The RemoteLink reconcile: observe (the source volume and its head
//! agent; the target cluster and, for a cluster in this Kubernetes cluster,
//! the target volume's head agent; the pairing secret; reads only) ->
//! desired (pure, `desired.rs`) -> apply (the pairing Secret when new,
//! register at the receiver, put at the sender; a new copy, resync or
//! switchover request started in the background) -> status (pure,
//! `status.rs`).
//!
//! Invariant: a request token is acted on once: its value is recorded in
//! status before the next reconcile.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use cairn_api::{
    agent::v1 as pb,
    crd::{
        Condition, ConditionStatus, RemoteLink, SnapshotSchedule, StorageCluster, Volume,
        remote_link::condition, set_condition, storage_cluster::gateway_secret,
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

use super::{
    Ends, Error, POLL, Receiver, Waiting, agent_link, link_id, request_snapshot_name, status_of,
    switchover::{manager, resume_switchover},
    switchover_refusal,
};
use crate::{
    context::{Context, head_endpoint},
    report::{MANAGER, apply_status, event, k8s_time},
    snapshot_schedule::copies_follow,
    volume::ROLE_HOLD,
};

/// The name of a local link's pairing Secret.
fn secret_name(rl: &RemoteLink) -> String {
    format!("{}-pairing", rl.name_any())
}

/// Observe: the pairing secret of a link to a cluster in this Kubernetes
/// cluster, as the Secret `<link>-pairing` holds it (`None`: missing, or
/// shorter than 16 bytes).
async fn read_local_secret(ctx: &Context, rl: &RemoteLink) -> Result<Option<Vec<u8>>, Error> {
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &rl.namespace().unwrap_or_default());
    let held = secrets
        .get_opt(&secret_name(rl))
        .await?
        .and_then(|s| s.data)
        .and_then(|d| d.get(gateway_secret::PAIRING_SECRET).map(|b| b.0.clone()))
        .filter(|b| b.len() >= 16);
    Ok(held)
}

/// Apply: the Secret `<link>-pairing` holding `secret`, owned by the link.
async fn write_local_secret(ctx: &Context, rl: &RemoteLink, secret: &[u8]) -> Result<(), Error> {
    let name = secret_name(rl);
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &rl.namespace().unwrap_or_default());
    let owner = rl.controller_owner_ref(&()).into_iter().collect();
    let obj = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            owner_references: Some(owner),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            gateway_secret::PAIRING_SECRET.to_string(),
            ByteString(secret.to_vec()),
        )])),
        ..Default::default()
    };
    let mut body = serde_json::to_value(&obj).expect("a secret serializes");
    body["apiVersion"] = json!("v1");
    body["kind"] = json!("Secret");
    secrets.patch(&name, &PatchParams::apply(MANAGER), &Patch::Apply(&body)).await?;
    Ok(())
}

/// Apply: pairs a receiver in this Kubernetes cluster: writes the link's
/// Secret if this reconcile made the secret, then registers the link at
/// the target volume's head agent (a repeat keeps what the link sealed).
async fn pair(ctx: &Context, rl: &RemoteLink, ends: &Ends) -> Result<(), Error> {
    let Some(r) = &ends.receiver else { return Ok(()) };
    if r.new_secret {
        write_local_secret(ctx, rl, &ends.secret).await?;
    }
    let req = pb::RegisterLinkRequest {
        link_id: link_id(rl),
        pairing_secret: ends.secret.clone().into(),
        target_volume_id: r.volume_id.clone(),
    };
    ctx.agents.register_link(&ends.tgt_ep, req).await?;
    Ok(())
}

/// Observe: where the link's copies come from and go to, and its pairing
/// secret (a new one, not written yet, when a local link has none); reads
/// only. `Ok(Err(_))`: the link cannot be set up yet, and why; `Err(_)`: the API
/// server or an agent failed (a retry may help).
async fn observe(ctx: &Context, rl: &RemoteLink) -> Result<Result<Ends, Waiting>, Error> {
    let ns = rl.namespace().unwrap_or_default();
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
                receiver: None,
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
    let held = read_local_secret(ctx, rl).await?;
    let new_secret = held.is_none();
    // 32 bytes from a cryptographic generator seeded by the OS.
    let secret = held.unwrap_or_else(|| rand::random::<[u8; 32]>().to_vec());
    let receiver = Some(Receiver { volume_id: tgt_vol, new_secret });
    Ok(Ok(Ends { source, src_ep, src_vol, target, tgt_ep, secret, receiver }))
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
    // Apply: the pairing at the receiver, the link at the sender, then any
    // new request, in the background.
    pair(&ctx, &rl, &ends).await?;
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
