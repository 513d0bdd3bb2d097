//! Switchover, run in the background: the agents' `Switchover` (demote
//! the source after a final snapshot, copy what the target lacks, promote
//! it), then each Volume's role set to match its head and its hold lifted.
//!
//! Invariants: one switchover per link runs in this operator at a time;
//! the roles are flipped only after the agents' switchover returned, the
//! source first, and only while the Volumes carry this request's hold.

use std::time::Duration;

use cairn_api::crd::{RemoteLink, Volume};
use jiff::Timestamp;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::EventType,
};
use serde_json::json;

use super::{Ends, desired::request_snapshot_name};
use crate::{
    context::Context,
    report::{MANAGER, event},
    volume::ROLE_HOLD,
};

/// Merge patches of Volumes, recorded under the operator's name.
pub(super) fn manager() -> PatchParams {
    PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() }
}

/// Switchovers this operator runs now, by link id.
static RUNNING: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Runs (or, after a restart, resumes) the switchover `token` while the
/// Volumes carry its role hold: the agents' `Switchover` (retried every
/// 10 s until it succeeds: it resumes the final copy), then each Volume's
/// role is set to match its head and its hold lifted, the source first.
pub(super) fn resume_switchover(
    ctx: &Context,
    rl: &RemoteLink,
    token: &str,
    ends: &Ends,
    link_id: &str,
) {
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
