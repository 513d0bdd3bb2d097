//! The SnapshotSchedule reconciler against kube's mocked API server and the
//! fake agents: a due run snapshots the selected primary volume once,
//! missed runs are reported (not replayed), retention prunes at the
//! primary but keeps what a link needs, and a bad schedule waits with a
//! Warning.

mod common;
mod fixtures;

use std::sync::Arc;

use cairn_api::crd::{HeadLocation, SnapshotSchedule, Volume, VolumeRole};
use cairn_operator::{
    agent::Call,
    cron::Cron,
    report::k8s_time,
    snapshot_schedule::{plan_runs, reconcile, snapshot_id},
};
use common::{serve, setup};
use fixtures::cluster;
use http::Method;
use jiff::{SignedDuration, Timestamp};
use kube::Resource;
use serde_json::json;

fn schedule(expr: &str, created: Timestamp) -> SnapshotSchedule {
    let mut s: SnapshotSchedule = serde_json::from_value(json!({
        "apiVersion": "cairn.dev/v1alpha1", "kind": "SnapshotSchedule",
        "metadata": {"name": "every-15", "namespace": "shop"},
        "spec": {
            "volumeSelector": {"matchLabels": {"app": "db"}},
            "schedule": expr,
            "timeZone": "Europe/Berlin",
            "retention": {"primary": {"count": 3}, "remote": {"maxAge": "7d"}},
        }
    }))
    .unwrap();
    let m = s.meta_mut();
    m.generation = Some(2);
    m.creation_timestamp = Some(k8s_time(created));
    s
}

fn volume(name: &str, role: VolumeRole) -> Volume {
    fixtures::placed(fixtures::volume(name, "site-a", role), "a2")
}

const SCHEDULE: &str = "/apis/cairn.dev/v1alpha1/namespaces/shop/snapshotschedules/every-15";
const VOLUMES: &str = "/apis/cairn.dev/v1alpha1/namespaces/shop/volumes";
const CLUSTER: &str = "/apis/cairn.dev/v1alpha1/storageclusters/site-a";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";
const LINKS: &str = "/apis/cairn.dev/v1alpha1/namespaces/shop/remotelinks";

#[tokio::test]
async fn a_due_run_snapshots_the_primary_reports_missed_runs_and_prunes_by_retention() {
    let (ctx, mut api, agents) = setup();
    let now = Timestamp::now();
    let created = now - SignedDuration::from_mins(61);
    // Five older snapshots of this schedule, and one a VolumeSnapshot took
    // (not the schedule's to prune); link a-b has copied up to s2, so
    // s2.. are needed.
    let s_ = |i: i64| snapshot_id("every-15", now - SignedDuration::from_hours(5 - i));
    let ids: Vec<String> = (0..5).map(s_).collect();
    agents.add_snapshot(
        "shop-db",
        "snapshot-csi-0",
        1,
        (now - SignedDuration::from_hours(6)).as_second(),
    );
    for (i, id) in ids.iter().enumerate() {
        agents.add_snapshot(
            "shop-db",
            id,
            i as u64 + 2,
            (now - SignedDuration::from_hours(5 - i as i64)).as_second(),
        );
    }
    agents.add_link("shop-db", "a-b", &ids[1]);
    let s = schedule("*/15 * * * *", created);
    let run = tokio::spawn(reconcile(Arc::new(s.clone()), ctx));

    let list = serve(
        &mut api,
        Method::GET,
        VOLUMES,
        json!({
            "apiVersion": "cairn.dev/v1alpha1", "kind": "VolumeList", "metadata": {},
            "items": [volume("db", VolumeRole::Primary), volume("db-copy", VolumeRole::Remote)]
        }),
    )
    .await;
    let _ = list;
    serve(&mut api, Method::GET, LINKS, json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "RemoteLinkList", "metadata": {}, "items": []})).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let ev = serve(&mut api, Method::POST, EVENTS, json!({})).await;
    assert_eq!(
        (ev["type"].as_str(), ev["reason"].as_str()),
        (Some("Warning"), Some("MissedRuns")),
        "{ev}"
    );
    let status = serve(&mut api, Method::PATCH, &format!("{SCHEDULE}/status"), json!(s)).await;
    run.await.unwrap().unwrap();

    let cron = Cron::parse("*/15 * * * *", "Europe/Berlin").unwrap();
    let want = plan_runs(&cron, created, now);
    let taken = want.take.expect("a run is due");
    let id = snapshot_id("every-15", taken);
    let st = &status["status"];
    assert_eq!(st["lastSnapshot"], id.as_str());
    assert_eq!(st["missedRuns"], want.missed);
    assert_eq!(st["volumes"], 2);
    assert_eq!(st["conditions"][0]["status"], "True", "{st}");
    assert!(status["__query"].as_str().unwrap().contains("fieldManager=cairn-operator"));

    let calls = agents.calls();
    let snaps: Vec<_> = calls.iter().filter(|c| matches!(c, Call::Snapshot { .. })).collect();
    assert_eq!(
        snaps,
        [&Call::Snapshot {
            volume: "shop-db".into(),
            id: id.clone(),
            generation: taken.as_second() as u64
        }],
        "one snapshot, of the primary only"
    );
    // Count 3 keeps the newest three (s4, s5, the new one); s1 goes; s2 and
    // s3 are past the count but link a-b still needs them.
    let deleted: Vec<_> = calls
        .iter()
        .filter_map(|c| match c {
            Call::DeleteSnapshot { id, .. } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, [ids[0].as_str()]);
    let mut left: Vec<&str> = vec!["snapshot-csi-0"];
    left.extend(ids[1..].iter().map(String::as_str));
    left.push(id.as_str());
    assert_eq!(agents.snapshot_ids("shop-db"), left);
}

#[tokio::test]
async fn a_schedule_that_does_not_parse_waits_with_a_warning() {
    let (ctx, mut api, agents) = setup();
    let s = schedule("61 * * * *", Timestamp::now());
    let run = tokio::spawn(reconcile(Arc::new(s.clone()), ctx));
    let ev = serve(&mut api, Method::POST, EVENTS, json!({})).await;
    assert_eq!(ev["reason"], "InvalidSchedule");
    assert!(ev["note"].as_str().unwrap().contains("minute \"61\""), "{ev}");
    let status = serve(&mut api, Method::PATCH, &format!("{SCHEDULE}/status"), json!(s)).await;
    assert_eq!(status["status"]["conditions"][0]["status"], "False");
    let action = run.await.unwrap().unwrap();
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    assert!(agents.calls().is_empty());
}

#[tokio::test]
async fn the_remote_twin_is_pruned_by_the_remote_retention() {
    let (ctx, mut api, agents) = setup();
    let now = Timestamp::now();
    // Created just now: no run is due; only retention runs.
    let s = schedule("0 3 * * *", now);
    for i in 0..3i64 {
        let t = now - SignedDuration::from_hours(24 * (10 - i));
        agents.add_snapshot(
            "shop-db-copy",
            &snapshot_id("every-15", t),
            i as u64 + 1,
            t.as_second(),
        );
    }
    let recent = snapshot_id("every-15", now - SignedDuration::from_mins(1));
    agents.add_snapshot("shop-db-copy", &recent, 9, now.as_second() - 60);
    let run = tokio::spawn(reconcile(Arc::new(s.clone()), ctx));
    serve(
        &mut api,
        Method::GET,
        VOLUMES,
        json!({
            "apiVersion": "cairn.dev/v1alpha1", "kind": "VolumeList", "metadata": {},
            "items": [volume("db", VolumeRole::Primary)]
        }),
    )
    .await;
    let link = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "RemoteLink",
        "metadata": {"name": "db-to-b", "namespace": "shop"},
        "spec": {"sourceVolume": "db", "targetCluster": "site-a", "targetVolume": "db-copy"}});
    serve(&mut api, Method::GET, LINKS, json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "RemoteLinkList", "metadata": {}, "items": [link]})).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let mut copy = volume("db-copy", VolumeRole::Remote);
    copy.status.as_mut().unwrap().head =
        Some(HeadLocation { agent: "a1".into(), node: None, epoch: 1 });
    serve(&mut api, Method::GET, &format!("{VOLUMES}/db-copy"), json!(copy)).await;
    serve(&mut api, Method::PATCH, &format!("{SCHEDULE}/status"), json!(s)).await;
    run.await.unwrap().unwrap();
    // Remote retention is maxAge 7d: the three 8-10 day old twins go.
    assert_eq!(agents.snapshot_ids("shop-db-copy"), [recent]);
    assert!(agents.calls().iter().all(|c| !matches!(c, Call::Snapshot { .. })), "no run was due");
}

/// Volume db with five older runs of the schedule (generations 2..6), and
/// the schedule: returns their ids and the schedule.
fn five_runs(agents: &cairn_operator::agent::FakeAgents, now: Timestamp) -> Vec<String> {
    let ids: Vec<String> =
        (0..5).map(|i| snapshot_id("every-15", now - SignedDuration::from_hours(5 - i))).collect();
    for (i, id) in ids.iter().enumerate() {
        let at = (now - SignedDuration::from_hours(5 - i as i64)).as_second();
        agents.add_snapshot("shop-db", id, i as u64 + 2, at);
    }
    ids
}

/// RemoteLink db-to-b from db to site-b's db-copy, its status saying it
/// copied `cursor` last.
fn link_with_cursor(cursor: &str) -> serde_json::Value {
    let mut l = json!(fixtures::link("db-to-b", "db", "site-b", "db-copy"));
    l["status"] = json!({"lastCopiedSnapshot": {
        "id": cursor, "generation": 3, "digest": "00".repeat(32),
        "createdAt": "2026-12-07T00:00:00Z", "copiedAt": "2026-12-07T00:01:00Z"}});
    l
}

/// One reconcile of the schedule with db selected and `links` listed;
/// returns the status written.
async fn run_once(
    ctx: Arc<cairn_operator::context::Context>,
    api: &mut common::ApiServer,
    s: &SnapshotSchedule,
    links: Vec<serde_json::Value>,
) -> serde_json::Value {
    let run = tokio::spawn(reconcile(Arc::new(s.clone()), ctx));
    let vols = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "VolumeList", "metadata": {},
                      "items": [volume("db", VolumeRole::Primary)]});
    serve(api, Method::GET, VOLUMES, vols).await;
    let list = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "RemoteLinkList", "metadata": {}, "items": links.clone()});
    serve(api, Method::GET, LINKS, list).await;
    serve(api, Method::GET, CLUSTER, json!(cluster())).await;
    if !links.is_empty() {
        // The link's target is at a peer site: no twin to prune here.
        common::not_found(api, &format!("{VOLUMES}/db-copy")).await;
    }
    let mut status = serde_json::Value::Null;
    for _ in 0..3 {
        let (req, send) = api.next_request().await.expect("a call");
        let path = req.uri().path().to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let reply = if path.starts_with(EVENTS) { json!({}) } else { json!(s) };
        let reply = serde_json::to_vec(&reply).unwrap();
        send.send_response(http::Response::new(kube::client::Body::from(reply)));
        if path == format!("{SCHEDULE}/status") {
            status = serde_json::from_slice(&bytes).unwrap();
            break;
        }
        assert!(path.starts_with(EVENTS), "{path}");
    }
    run.await.unwrap().unwrap();
    status
}

fn deleted(agents: &cairn_operator::agent::FakeAgents) -> Vec<String> {
    let calls = agents.calls();
    calls
        .into_iter()
        .filter_map(|c| match c {
            Call::DeleteSnapshot { id, .. } => Some(id),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_links_cursor_in_its_status_keeps_snapshots_the_head_agent_knows_no_link_for() {
    let (ctx, mut api, agents) = setup();
    let now = Timestamp::now();
    let ids = five_runs(&agents, now);
    // The head moved: its agent lists no link; the RemoteLink's status
    // says it copied ids[1] last.
    let s = schedule("*/15 * * * *", now - SignedDuration::from_mins(61));
    let status = run_once(ctx, &mut api, &s, vec![link_with_cursor(&ids[1])]).await;
    assert_eq!(status["status"]["conditions"][0]["status"], "True", "{status}");
    // Count 3 keeps the new run, ids[4], ids[3]; ids[1..3] are needed by
    // the link; only ids[0] goes.
    assert_eq!(deleted(&agents), [ids[0].clone()]);
}

#[tokio::test]
async fn an_agent_that_cannot_list_its_links_gets_nothing_pruned() {
    let (ctx, mut api, agents) = setup();
    let now = Timestamp::now();
    five_runs(&agents, now);
    agents.fail_links("shop-db");
    let s = schedule("*/15 * * * *", now - SignedDuration::from_mins(61));
    let status = run_once(ctx, &mut api, &s, vec![]).await;
    assert_eq!(deleted(&agents), Vec::<String>::new(), "not knowing the links is not having none");
    let c = &status["status"]["conditions"][0];
    assert_eq!(c["status"], "False", "{status}");
    assert!(c["message"].as_str().unwrap().contains("every snapshot kept"), "{c}");
}
