//! The `SnapshotSchedule` reconciler: observe (the schedule, the volumes its
//! selector picks, their snapshots and links at the head agent) -> validate
//! (the cron expression and time zone) -> desired (is a run due; what
//! retention prunes) -> apply (snapshot, delete) -> status (last and next
//! run, missed runs, conditions).
//!
//! Invariants: at most one snapshot per volume per run, named after the
//! schedule and the run's time (a repeat is a no-op); runs missed while the
//! operator was away are counted and reported, never replayed in a burst;
//! pruning never touches the newest snapshot, one a link still needs, or a
//! divergent one (see `retention`); the agent refuses the rest of what a
//! link needs as a second line.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use cairn_api::{
    agent::v1 as pb,
    crd::{
        Condition, ConditionStatus, RemoteLink, RetentionRule, SnapshotSchedule, StorageCluster,
        Volume, VolumeRole, set_condition, snapshot_schedule::condition,
    },
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{
    Api, Resource, ResourceExt,
    api::ListParams,
    runtime::{controller::Action, events::EventType},
};

use crate::{
    context::{Context, head_endpoint},
    cron::{Cron, CronError},
    report::{apply_status, event, from_k8s_time, k8s_time},
    retention::{self, Retention, Snap},
    volume::Error as VolumeError,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Cron(#[from] CronError),
    #[error("the API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Volume(#[from] VolumeError),
}

/// `7d`, `12h`, `30m`, `2w` -> a duration (the schema checks the form).
pub fn max_age(s: &str) -> Option<SignedDuration> {
    let (n, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: i64 = n.parse().ok()?;
    Some(match unit {
        "m" => SignedDuration::from_mins(n),
        "h" => SignedDuration::from_hours(n),
        "d" => SignedDuration::from_hours(24 * n),
        "w" => SignedDuration::from_hours(24 * 7 * n),
        _ => return None,
    })
}

pub fn retention_of(rule: &RetentionRule) -> Retention {
    Retention {
        count: rule.count.map(|c| c.max(1) as u32),
        max_age: rule.max_age.as_deref().and_then(max_age),
    }
}

/// A label selector as the API's `labelSelector` query (matchLabels and
/// matchExpressions with In, NotIn, Exists, DoesNotExist).
pub fn selector_query(sel: &LabelSelector) -> String {
    let mut parts: Vec<String> =
        sel.match_labels.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            _ => format!("!{}", e.key),
        });
    }
    parts.join(",")
}

/// Pure: whether a label selector selects an object with `labels`
/// (matchLabels and matchExpressions; an empty selector selects all).
pub fn selects(sel: &LabelSelector, labels: &std::collections::BTreeMap<String, String>) -> bool {
    let plain = sel.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    plain
        && sel.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// Pure: whether a volume's links copy each snapshot as it completes: yes
/// unless every SnapshotSchedule selecting it says `copy: false` (then
/// copies run only on a RemoteLink's `copyRequest`).
pub fn copies_follow(
    schedules: &[SnapshotSchedule],
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    let mut selecting =
        schedules.iter().filter(|s| selects(&s.spec.volume_selector, labels)).peekable();
    selecting.peek().is_none() || selecting.any(|s| s.spec.copy)
}

/// The stamp of a run in its snapshot id: `yyyymmdd-hhmm` (UTC).
const STAMP_LEN: usize = "yyyymmdd-hhmm".len();

/// The schedule's part of its snapshot ids: its name cut to leave room for
/// `-` and the stamp in the 63 characters of an id.
fn run_prefix(schedule: &str) -> String {
    let name: String = schedule.chars().take(63 - STAMP_LEN - 1).collect();
    name.trim_end_matches('-').to_string()
}

/// The snapshot id of a run: `<schedule>-<yyyymmdd>-<hhmm>` (UTC), the
/// schedule name cut to fit the 63 characters of an id.
pub fn snapshot_id(schedule: &str, run: Timestamp) -> String {
    format!("{}-{}", run_prefix(schedule), run.strftime("%Y%m%d-%H%M"))
}

/// Pure: whether snapshot `id` is one `snapshot_id(schedule, run)` names.
pub fn is_run_of(schedule: &str, id: &str) -> bool {
    let Some(split) = id.len().checked_sub(STAMP_LEN + 1) else { return false };
    let (name, stamp) = id.split_at(split);
    let b = stamp.as_bytes();
    name == run_prefix(schedule)
        && b[0] == b'-'
        && b[9] == b'-'
        && b[1..9].iter().chain(&b[10..]).all(u8::is_ascii_digit)
}

/// What one reconcile does about time: the run to take now (if any), the
/// runs missed before it, the next run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPlan {
    pub take: Option<Timestamp>,
    pub missed: u32,
    pub next: Option<Timestamp>,
}

/// Pure: from the last run (or the schedule's creation) to now.
pub fn plan_runs(cron: &Cron, last: Timestamp, now: Timestamp) -> RunPlan {
    let (n, latest) = cron.due(last, now);
    RunPlan { take: latest, missed: n.saturating_sub(1), next: cron.next_after(now) }
}

/// Reconciles one SnapshotSchedule.
#[tracing::instrument(skip_all, fields(schedule = %s.name_any(), namespace = ?s.namespace()))]
pub async fn reconcile(s: Arc<SnapshotSchedule>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = s.namespace().unwrap_or_default();
    let name = s.name_any();
    let api: Api<SnapshotSchedule> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = s.meta().generation;
    let mut st = s.status.clone().unwrap_or_default();
    st.observed_generation = generation;
    let cond = |status: bool, reason: &str, message: String| {
        Condition::new(
            condition::READY,
            if status { ConditionStatus::True } else { ConditionStatus::False },
            reason,
            message,
            generation,
            crate::report::now(),
        )
    };
    // Validate.
    let cron = match Cron::parse(&s.spec.schedule, &s.spec.time_zone) {
        Ok(c) => c,
        Err(e) => {
            if set_condition(&mut st.conditions, cond(false, "InvalidSchedule", e.to_string())) {
                event(&ctx, &*s, "Snapshot", EventType::Warning, "InvalidSchedule", e.to_string())
                    .await;
            }
            apply_status(&api, &name, &st).await?;
            return Ok(Action::await_change());
        }
    };
    let now = Timestamp::now();
    if s.spec.suspend {
        set_condition(
            &mut st.conditions,
            cond(false, "Suspended", "spec.suspend is set: no snapshots are taken".into()),
        );
        st.next_run = None;
        apply_status(&api, &name, &st).await?;
        return Ok(Action::await_change());
    }
    // Desired: is a run due?
    let last = st
        .last_run
        .as_ref()
        .map(from_k8s_time)
        .or_else(|| s.meta().creation_timestamp.as_ref().map(from_k8s_time))
        .unwrap_or(now);
    let plan = plan_runs(&cron, last, now);
    // Observe the volumes.
    let volumes: Api<Volume> = Api::namespaced(ctx.client.clone(), &ns);
    let selected = volumes
        .list(&ListParams::default().labels(&selector_query(&s.spec.volume_selector)))
        .await?;
    let clusters: Api<StorageCluster> = Api::all(ctx.client.clone());
    let mut cluster_cache: BTreeMap<String, Option<StorageCluster>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut taken = 0;
    let retention = retention_of(&s.spec.retention.primary);
    let remote_retention =
        retention_of(s.spec.retention.remote.as_ref().unwrap_or(&s.spec.retention.primary));
    let links = Api::<RemoteLink>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    for v in &selected {
        let Some(head) = v.status.as_ref().and_then(|s| s.head.as_ref()) else { continue };
        if v.spec.role != VolumeRole::Primary {
            continue; // a remote copy gets its snapshots from its primary
        }
        let cluster = cached(&mut cluster_cache, &clusters, &v.spec.cluster).await?;
        let Some((ep, id)) = head_endpoint(v.status.as_ref(), cluster) else {
            failures.push(format!(
                "{}: its head agent {} is not in its storage cluster",
                v.name_any(),
                head.agent
            ));
            continue;
        };
        let id = id.as_str();
        // Apply: the snapshot of this run.
        if let Some(run) = plan.take {
            let snap = snapshot_id(&name, run);
            match ctx.agents.snapshot(&ep, id, &snap, run.as_second() as u64).await {
                Ok(()) => taken += 1,
                Err(e) if e.code == tonic::Code::AlreadyExists => taken += 1,
                Err(e) => {
                    failures.push(format!("{}: {e}", v.name_any()));
                    continue;
                }
            }
            st.last_snapshot = Some(snap);
        }
        // Apply: retention at the primary, then at each remote twin this
        // cluster reaches (a link's target on a cluster of this Kubernetes
        // cluster).
        let cursors = link_cursors(&links, &v.name_any());
        if let Err(e) = prune_at(&ctx, &name, &ep, id, retention, now, &cursors).await {
            failures.push(format!("{}: {e}", v.name_any()));
        }
        for l in links.iter().filter(|l| l.spec.source_volume == v.name_any()) {
            let target = volumes.get_opt(&l.spec.target_volume).await?;
            let Some(t) = target.filter(|t| t.spec.cluster == l.spec.target_cluster) else {
                continue;
            };
            let cluster = cached(&mut cluster_cache, &clusters, &t.spec.cluster).await?;
            let Some((tep, tid)) = head_endpoint(t.status.as_ref(), cluster) else { continue };
            if let Err(e) = prune_at(&ctx, &name, &tep, &tid, remote_retention, now, &cursors).await
            {
                failures.push(format!("{} (remote twin of {}): {e}", t.name_any(), v.name_any()));
            }
        }
    }
    // Status.
    if let Some(run) = plan.take {
        st.last_run = Some(k8s_time(run));
    }
    if plan.missed > 0 {
        st.missed_runs += plan.missed as i32;
        let m = format!(
            "{} runs were missed (the operator was not running?); they are not replayed: the latest was taken",
            plan.missed
        );
        event(&ctx, &*s, "Snapshot", EventType::Warning, "MissedRuns", m).await;
    }
    st.next_run = plan.next.map(k8s_time);
    st.volumes = Some(selected.items.len() as i32);
    let ready = failures.is_empty();
    let message = if ready {
        format!("{} volumes selected; {taken} snapshotted this run", selected.items.len())
    } else {
        failures.join("; ")
    };
    if set_condition(
        &mut st.conditions,
        cond(ready, if ready { "Scheduled" } else { "Failed" }, message.clone()),
    ) && !ready
    {
        event(&ctx, &*s, "Snapshot", EventType::Warning, "SnapshotFailed", message).await;
    }
    apply_status(&api, &name, &st).await?;
    let wait = plan
        .next
        .map(|n| n.duration_since(Timestamp::now()).as_secs().clamp(1, 300) as u64)
        .unwrap_or(300);
    Ok(Action::requeue(Duration::from_secs(wait)))
}

/// A storage cluster, read once per reconcile.
async fn cached<'a>(
    cache: &'a mut BTreeMap<String, Option<StorageCluster>>,
    api: &Api<StorageCluster>,
    name: &str,
) -> Result<Option<&'a StorageCluster>, kube::Error> {
    if !cache.contains_key(name) {
        cache.insert(name.to_string(), api.get_opt(name).await?);
    }
    Ok(cache[name].as_ref())
}

/// Pure: the cursor of each RemoteLink copying Volume `volume`, as its
/// status records it (`(link, last copied snapshot)`). The status lives in
/// the API server, so it survives the head moving to an agent that never
/// sent the link.
pub fn link_cursors(links: &[RemoteLink], volume: &str) -> Vec<(String, String)> {
    links
        .iter()
        .filter(|l| l.spec.source_volume == volume)
        .filter_map(|l| {
            let snap = l.status.as_ref()?.last_copied_snapshot.as_ref()?;
            Some((l.name_any(), snap.id.clone()))
        })
        .collect()
}

/// Pure: the snapshots of `line` (non-divergent, this schedule's) that a
/// link needs: every one at or after its cursor, by generation (the
/// cursor need not be one of this schedule's). A cursor not in `snaps`
/// keeps nothing more: the link's next copy cannot start from it anyway.
pub fn needed_by_links(
    snaps: &[pb::SnapshotInfo],
    line: &[Snap],
    cursors: &[(String, String)],
) -> BTreeMap<String, String> {
    let generation = |id: &str| snaps.iter().find(|s| s.snapshot_id == id).map(|s| s.generation);
    let mut needed = BTreeMap::new();
    for (link, cursor) in cursors {
        let Some(from) = generation(cursor) else { continue };
        for x in line.iter().filter(|x| !x.divergent) {
            if generation(&x.id).is_some_and(|g| g >= from) {
                needed.entry(x.id.clone()).or_insert_with(|| format!("link {link} needs it"));
            }
        }
    }
    needed
}

/// Applies `retention` to a volume at the agent `ep` holds its head on:
/// keeps the newest, and everything from each link's cursor on (the
/// RemoteLinks' `cursors` from the API server and the links the agent
/// lists); a deletion the agent refuses (a link needs it) is kept. When
/// the agent cannot list its links nothing is pruned: not knowing the
/// links is never taken for having none.
async fn prune_at(
    ctx: &Context,
    schedule: &str,
    ep: &str,
    id: &str,
    retention: Retention,
    now: Timestamp,
    cursors: &[(String, String)],
) -> Result<(), crate::agent::AgentError> {
    let snaps = ctx.agents.snapshots(ep, id).await?;
    let listed = ctx.agents.links(ep, id).await.map_err(|e| crate::agent::AgentError {
        message: format!("{}; every snapshot kept: a link might need it", e.message),
        ..e
    })?;
    // Only this schedule's own snapshots: those taken by hand, through CSI
    // (a VolumeSnapshot) or by another schedule are not its to prune.
    let line: Vec<Snap> = snaps
        .iter()
        .filter(|x| is_run_of(schedule, &x.snapshot_id))
        .map(|x| Snap {
            id: x.snapshot_id.clone(),
            sealed_at: Timestamp::from_second(x.sealed_at_unix).unwrap_or(now),
            divergent: x.divergent,
        })
        .collect();
    let mut all: Vec<(String, String)> = listed
        .into_iter()
        .map(|l| (l.link.map(|l| l.link_id).unwrap_or_default(), l.last_copied_snapshot_id))
        .collect();
    all.extend(cursors.iter().cloned());
    let needed = needed_by_links(&snaps, &line, &all);
    for gone in retention::plan(&line, retention, now, &needed).prune {
        match ctx.agents.delete_snapshot(ep, id, &gone).await {
            Ok(()) => {}
            Err(e) if e.code == tonic::Code::FailedPrecondition => {
                tracing::info!(volume = %id, snapshot = %gone, why = %e.message, "kept: a link needs it");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `error_policy`: back off and try again.
pub fn error_policy(_s: Arc<SnapshotSchedule>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %err, "reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn max_ages_parse() {
        assert_eq!(max_age("7d"), Some(SignedDuration::from_hours(168)));
        assert_eq!(max_age("90m"), Some(SignedDuration::from_mins(90)));
        assert_eq!(max_age("2w"), Some(SignedDuration::from_hours(336)));
        assert_eq!(max_age("7y"), None);
    }

    #[test]
    fn copies_follow_snapshots_unless_every_schedule_of_the_volume_says_not_to() {
        use std::collections::BTreeMap;
        let sched = |app: &str, copy: bool| {
            let mut s: SnapshotSchedule = serde_json::from_value(serde_json::json!({
                "apiVersion": "cairn.dev/v1alpha1", "kind": "SnapshotSchedule",
                "metadata": {"name": format!("s-{app}")},
                "spec": {"volumeSelector": {"matchLabels": {"app": app}}, "schedule": "* * * * *",
                         "retention": {"primary": {"count": 1}}}
            }))
            .unwrap();
            s.spec.copy = copy;
            s
        };
        let labels: BTreeMap<String, String> = [("app".to_string(), "db".to_string())].into();
        assert!(copies_follow(&[], &labels), "no schedule: copies follow");
        assert!(!copies_follow(&[sched("db", false)], &labels));
        assert!(copies_follow(&[sched("db", false), sched("db", true)], &labels));
        assert!(copies_follow(&[sched("web", false)], &labels), "not selected: no say");
        let sel = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "NotIn".into(),
                values: Some(vec!["cache".into()]),
            }]),
        };
        assert!(selects(&sel, &labels), "NotIn holds for a missing label");
        let cache: BTreeMap<String, String> = [("tier".to_string(), "cache".to_string())].into();
        assert!(!selects(&sel, &cache));
        assert!(selects(&LabelSelector::default(), &cache), "empty selects all");
    }

    #[test]
    fn a_schedule_knows_its_own_snapshots_by_name() {
        let run = Timestamp::from_second(1_800_000_000).unwrap();
        assert!(is_run_of("every-15", &snapshot_id("every-15", run)));
        let long = "x".repeat(70);
        assert!(is_run_of(&long, &snapshot_id(&long, run)));
        for other in [
            "snapshot-1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "every-15",
            "every-15-2026",
            "every-150-20260101-0000",
            "nightly-20260101-0300",
        ] {
            assert!(!is_run_of("every-15", other), "{other}");
        }
    }

    #[test]
    fn selectors_become_queries() {
        let sel = LabelSelector {
            match_labels: Some([("app".to_string(), "db".to_string())].into()),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "In".into(),
                values: Some(vec!["gold".into(), "silver".into()]),
            }]),
        };
        assert_eq!(selector_query(&sel), "app=db,tier in (gold,silver)");
    }

    #[test]
    fn snapshot_ids_name_the_schedule_and_run_and_fit_63() {
        let t: Timestamp = "2026-11-24T10:15:00Z".parse().unwrap();
        assert_eq!(snapshot_id("every-15", t), "every-15-20261124-1015");
        let long = snapshot_id(&"x".repeat(80), t);
        assert!(long.len() <= 63 && long.ends_with("-20261124-1015"), "{long}");
        assert!(cairn_api::SnapshotId::new(&long).is_ok());
    }

    #[test]
    fn a_late_reconcile_takes_the_latest_run_and_counts_the_missed() {
        let cron = Cron::parse("*/15 * * * *", "UTC").unwrap();
        let p = plan_runs(
            &cron,
            "2026-11-24T10:00:00Z".parse().unwrap(),
            "2026-11-24T11:05:00Z".parse().unwrap(),
        );
        assert_eq!(p.take, Some("2026-11-24T11:00:00Z".parse().unwrap()));
        assert_eq!(p.missed, 3);
        assert_eq!(p.next, Some("2026-11-24T11:15:00Z".parse().unwrap()));
        let on_time = plan_runs(
            &cron,
            "2026-11-24T11:00:00Z".parse().unwrap(),
            "2026-11-24T11:05:00Z".parse().unwrap(),
        );
        assert_eq!((on_time.take, on_time.missed), (None, 0));
    }
}
