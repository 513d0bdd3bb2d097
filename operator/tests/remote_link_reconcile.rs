//! The RemoteLink reconciler against kube's mocked API server and the fake
//! agents: a link between two storage clusters of this Kubernetes cluster
//! gets a pairing Secret it owns, is registered at the target volume's head
//! agent and put at the source's with its policy, a copy request is started
//! once, and the status says where the link stands; a link whose source is
//! not placed yet waits with a Warning.

mod common;
mod fixtures;

use std::sync::Arc;

use cairn_api::crd::{RemoteLink, Volume, VolumeRole};
use cairn_operator::{agent::Call, remote_link::reconcile};
use common::{serve, setup};
use fixtures::cluster;
use http::{Method, Response};
use kube::{Resource, ResourceExt, client::Body};
use serde_json::json;

fn volume(name: &str, cluster: &str, role: VolumeRole, head: &str) -> Volume {
    fixtures::placed(fixtures::volume(name, cluster, role), head)
}

fn link(copy_request: Option<&str>) -> RemoteLink {
    let mut rl = fixtures::link("db-to-b", "db", "site-b", "db-copy");
    rl.meta_mut().uid = Some("1234".into());
    rl.spec.bandwidth =
        Some(serde_json::from_value(json!({"defaultBytesPerSecond": 50000000})).unwrap());
    rl.spec.copy_request = copy_request.map(String::from);
    rl
}

fn site_b() -> serde_json::Value {
    let mut b = json!(cluster());
    b["metadata"]["name"] = json!("site-b");
    b["status"]["agents"][0]["name"] = json!("b1");
    b["status"]["agents"][0]["address"] = json!("b1.site-b:7070");
    b
}

const NS: &str = "/apis/cairn.dev/v1alpha1/namespaces/shop";
const CLUSTERS: &str = "/apis/cairn.dev/v1alpha1/storageclusters";

/// The placed source db at site-a (head a2), labelled app=shop.
fn source() -> Volume {
    let mut v = volume("db", "site-a", VolumeRole::Primary, "a2");
    v.meta_mut().labels = Some([("app".to_string(), "shop".to_string())].into());
    v
}

/// Serves the reads of a link's two ends: the source db at site-a (head
/// a2) and its placed remote twin db-copy at site-b (head b1).
async fn serve_both_ends(api: &mut common::ApiServer) {
    serve_ends(api, source()).await;
}

async fn serve_ends(api: &mut common::ApiServer, source: Volume) {
    serve(api, Method::GET, &format!("{NS}/volumes/db"), json!(source)).await;
    serve(api, Method::GET, &format!("{CLUSTERS}/site-a"), json!(cluster())).await;
    serve(api, Method::GET, &format!("{CLUSTERS}/site-b"), site_b()).await;
    let target = volume("db-copy", "site-b", VolumeRole::Remote, "b1");
    serve(api, Method::GET, &format!("{NS}/volumes/db-copy"), json!(target)).await;
}

/// Serves what decides, with the source's labels, whether copies follow
/// snapshots: the namespace's SnapshotSchedules.
async fn serve_copy_rules(api: &mut common::ApiServer, schedules: Vec<serde_json::Value>) {
    let list = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "SnapshotScheduleList", "metadata": {}, "items": schedules});
    serve(api, Method::GET, &format!("{NS}/snapshotschedules"), list).await;
}

#[tokio::test]
async fn a_link_is_paired_registered_put_and_a_copy_request_runs_once() {
    let (ctx, mut api, agents) = setup();
    let rl = link(Some("now-1"));
    let run = tokio::spawn(reconcile(Arc::new(rl.clone()), ctx));
    serve_both_ends(&mut api).await;
    // No pairing Secret yet: one is made, owned by the link.
    let (req, send) = api.next_request().await.unwrap();
    assert_eq!(req.uri().path(), "/api/v1/namespaces/shop/secrets/db-to-b-pairing");
    let nf = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
    send.send_response(
        Response::builder().status(404).body(Body::from(serde_json::to_vec(&nf).unwrap())).unwrap(),
    );
    let secret = serve(
        &mut api,
        Method::PATCH,
        "/api/v1/namespaces/shop/secrets/db-to-b-pairing",
        json!({}),
    )
    .await;
    assert_eq!(secret["metadata"]["ownerReferences"][0]["name"], "db-to-b", "{secret}");
    assert!(secret["data"]["pairing-secret"].is_string());
    serve_copy_rules(&mut api, vec![]).await;
    let ev =
        serve(&mut api, Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events", json!({}))
            .await;
    assert_eq!(ev["reason"], "CopyRequested");
    let status =
        serve(&mut api, Method::PATCH, &format!("{NS}/remotelinks/db-to-b/status"), json!(rl))
            .await;
    run.await.unwrap().unwrap();

    let st = &status["status"];
    assert_eq!(st["linkId"], "shop.db-to-b");
    assert_eq!(st["lastCopyRequest"], "now-1", "the request is recorded as handled");
    assert!(status["__query"].as_str().unwrap().contains("fieldManager=cairn-operator"));
    tokio::time::sleep(std::time::Duration::from_millis(50)).await; // the background sync
    let calls = agents.calls();
    assert!(
        matches!(&calls[0], Call::RegisterLink { endpoint, link, target_volume }
        if endpoint == "http://b1.site-b:7070" && link == "shop.db-to-b" && target_volume == "shop-db-copy"),
        "{calls:?}"
    );
    let Call::PutLink { endpoint, link: put } = &calls[1] else { panic!("{calls:?}") };
    assert_eq!(endpoint, "http://a2.site-a:7070");
    assert_eq!(put.target_endpoint, "http://b1.site-b:7070");
    assert_eq!(put.volume_id, "shop-db");
    assert!(put.forward && put.policy.is_some() && put.pairing_secret.len() >= 16);
    let snap = calls.iter().position(|c| matches!(c, Call::Snapshot { volume, id, .. } if volume == "shop-db" && id == "copy-now-1"));
    let sync = calls
        .iter()
        .position(|c| c == &Call::SyncLink { link: "shop.db-to-b".into(), resync: false });
    assert!(
        matches!((snap, sync), (Some(a), Some(b)) if a < b),
        "a snapshot, then the copy: {calls:?}"
    );
}

#[tokio::test]
async fn a_handled_copy_request_is_not_run_again() {
    let (ctx, mut api, agents) = setup();
    let mut rl = link(Some("now-1"));
    rl.status = Some(cairn_api::crd::RemoteLinkStatus {
        last_copy_request: Some("now-1".into()),
        ..Default::default()
    });
    let run = tokio::spawn(reconcile(Arc::new(rl.clone()), ctx));
    serve_both_ends(&mut api).await;
    let existing = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db-to-b-pairing"},
                          "data": {"pairing-secret": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3"}});
    serve(&mut api, Method::GET, "/api/v1/namespaces/shop/secrets/db-to-b-pairing", existing).await;
    serve_copy_rules(&mut api, vec![]).await;
    serve(&mut api, Method::PATCH, &format!("{NS}/remotelinks/db-to-b/status"), json!(rl)).await;
    run.await.unwrap().unwrap();
    let calls = agents.calls();
    assert!(!calls.iter().any(|c| matches!(c, Call::SyncLink { .. })), "{calls:?}");
    let Call::PutLink { link, .. } = &calls[1] else { panic!("{calls:?}") };
    assert_eq!(
        &link.pairing_secret[..],
        b"0123456789abcdef01234567",
        "the existing secret is used"
    );
}

#[tokio::test]
async fn a_link_whose_source_is_not_placed_waits_with_a_warning() {
    let (ctx, mut api, agents) = setup();
    let rl = link(None);
    let run = tokio::spawn(reconcile(Arc::new(rl.clone()), ctx));
    let mut unplaced = volume("db", "site-a", VolumeRole::Primary, "a2");
    unplaced.status = None;
    serve(&mut api, Method::GET, &format!("{NS}/volumes/db"), json!(unplaced)).await;
    serve(&mut api, Method::GET, &format!("{CLUSTERS}/site-a"), json!(cluster())).await;
    let ev =
        serve(&mut api, Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events", json!({}))
            .await;
    assert_eq!(
        (ev["type"].as_str(), ev["reason"].as_str()),
        (Some("Warning"), Some("SourceNotPlaced"))
    );
    let status =
        serve(&mut api, Method::PATCH, &format!("{NS}/remotelinks/db-to-b/status"), json!(rl))
            .await;
    assert!(
        status["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("source volume db has no head yet")
    );
    run.await.unwrap().unwrap();
    assert!(agents.calls().is_empty());
}

/// Answers the next `n` requests in whatever order they come (the
/// switchover's background task and the reconcile run concurrently), each
/// by its method and path; returns them as (method path, body).
async fn serve_unordered(
    api: &mut common::ApiServer,
    mut replies: Vec<(Method, String, serde_json::Value)>,
) -> Vec<(String, serde_json::Value)> {
    let mut seen = Vec::new();
    while !replies.is_empty() {
        let (req, send) = api.next_request().await.expect("another call");
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let i = replies
            .iter()
            .position(|(m, p, _)| *m == method && *p == path)
            .unwrap_or_else(|| panic!("unexpected {method} {path}; still expected {replies:?}"));
        let (_, _, reply) = replies.remove(i);
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        send.send_response(
            Response::builder().body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap(),
        );
        seen.push((format!("{method} {path}"), body));
    }
    seen
}

#[tokio::test]
async fn a_switchover_holds_both_roles_runs_at_the_agents_then_flips_the_specs() {
    let (ctx, mut api, agents) = setup();
    let mut rl = link(None);
    rl.spec.switchover = Some(cairn_api::crd::SwitchoverRequest {
        request: "2026-11-25T10:00:00Z".into(),
        final_snapshot: None,
    });
    let run = tokio::spawn(reconcile(Arc::new(rl.clone()), ctx));
    serve_both_ends(&mut api).await;
    let existing = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db-to-b-pairing"},
                          "data": {"pairing-secret": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3"}});
    serve(&mut api, Method::GET, "/api/v1/namespaces/shop/secrets/db-to-b-pairing", existing).await;
    serve_copy_rules(&mut api, vec![]).await;
    // The target cluster is here and the source is not attached (as
    // observed): both Volumes get the hold, then the event.
    let source = source();
    let hold = "db-to-b/2026-11-25T10:00:00Z";
    for v in ["db", "db-copy"] {
        let p = serve(&mut api, Method::PATCH, &format!("{NS}/volumes/{v}"), json!(source)).await;
        assert_eq!(p["metadata"]["annotations"]["cairn.dev/role-hold"], hold, "{p}");
    }
    let ev =
        serve(&mut api, Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events", json!({}))
            .await;
    assert_eq!(ev["reason"], "SwitchoverStarted");
    // The run starts in the background; the roles are flipped after the
    // agents' switchover.
    let mut held_src = source.clone();
    held_src.annotations_mut().insert("cairn.dev/role-hold".into(), hold.into());
    let mut held_tgt = volume("db-copy", "site-b", VolumeRole::Remote, "b1");
    held_tgt.annotations_mut().insert("cairn.dev/role-hold".into(), hold.into());
    let seen = serve_unordered(
        &mut api,
        vec![
            (Method::PATCH, format!("{NS}/remotelinks/db-to-b/status"), json!(rl)),
            (Method::PATCH, format!("{NS}/volumes/db"), json!(held_src)),
            (Method::PATCH, format!("{NS}/volumes/db-copy"), json!(held_tgt)),
            (Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events".into(), json!({})),
        ],
    )
    .await;
    run.await.unwrap().unwrap();
    let find = |k: &str| seen.iter().find(|(p, _)| p == k).map(|(_, b)| b.clone()).unwrap();
    let status = find(&format!("PATCH {NS}/remotelinks/db-to-b/status"));
    assert_eq!(status["status"]["lastSwitchoverRequest"], "2026-11-25T10:00:00Z");
    let src = find(&format!("PATCH {NS}/volumes/db"));
    assert_eq!(src["spec"]["role"], "Remote");
    assert!(src["metadata"]["annotations"]["cairn.dev/role-hold"].is_null(), "hold lifted: {src}");
    let tgt = find(&format!("PATCH {NS}/volumes/db-copy"));
    assert_eq!(tgt["spec"]["role"], "Primary");
    assert_eq!(
        find("POST /apis/events.k8s.io/v1/namespaces/shop/events")["reason"],
        "SwitchedOver"
    );
    // The roles flip only after the agents switched over, the source first.
    let order: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
    let (s, t) = (
        order.iter().position(|p| p.ends_with("/volumes/db")).unwrap(),
        order.iter().position(|p| p.ends_with("/volumes/db-copy")).unwrap(),
    );
    assert!(s < t, "{order:?}");
    let calls = agents.calls();
    assert!(
        calls.contains(&Call::Switchover {
            link: "shop.db-to-b".into(),
            snapshot: "switchover-2026-11-25t10-00-00z".into()
        }),
        "{calls:?}"
    );
}

#[tokio::test]
async fn a_switchover_of_an_attached_source_is_refused_and_changes_no_role() {
    let (ctx, mut api, agents) = setup();
    let mut rl = link(None);
    rl.spec.switchover =
        Some(cairn_api::crd::SwitchoverRequest { request: "now-1".into(), final_snapshot: None });
    let run = tokio::spawn(reconcile(Arc::new(rl.clone()), ctx));
    let mut source = source();
    source.spec.attached_node = Some("worker-1".into());
    serve_ends(&mut api, source).await;
    let existing = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db-to-b-pairing"},
                          "data": {"pairing-secret": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3"}});
    serve(&mut api, Method::GET, "/api/v1/namespaces/shop/secrets/db-to-b-pairing", existing).await;
    serve_copy_rules(&mut api, vec![]).await;
    let ev =
        serve(&mut api, Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events", json!({}))
            .await;
    assert_eq!(
        (ev["type"].as_str(), ev["reason"].as_str()),
        (Some("Warning"), Some("SwitchoverRefused"))
    );
    assert!(ev["note"].as_str().unwrap().contains("attached to node worker-1"), "{ev}");
    // No hold: the resume step finds none and starts nothing.
    let status =
        serve(&mut api, Method::PATCH, &format!("{NS}/remotelinks/db-to-b/status"), json!(rl))
            .await;
    run.await.unwrap().unwrap();
    assert_eq!(status["status"]["lastSwitchoverRequest"], "now-1", "refused, not retried");
    let calls = agents.calls();
    assert!(!calls.iter().any(|c| matches!(c, Call::Switchover { .. })), "{calls:?}");
}

#[tokio::test]
async fn copies_wait_for_a_request_when_every_schedule_of_the_source_says_copy_false() {
    let (ctx, mut api, agents) = setup();
    let rl = link(None);
    let run = tokio::spawn(reconcile(Arc::new(rl.clone()), ctx));
    serve_both_ends(&mut api).await;
    let existing = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db-to-b-pairing"},
                          "data": {"pairing-secret": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3"}});
    serve(&mut api, Method::GET, "/api/v1/namespaces/shop/secrets/db-to-b-pairing", existing).await;
    let schedule = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "SnapshotSchedule",
        "metadata": {"name": "hourly", "namespace": "shop"},
        "spec": {"volumeSelector": {"matchLabels": {"app": "shop"}}, "schedule": "0 * * * *",
                 "retention": {"primary": {"count": 24}}, "copy": false}});
    serve_copy_rules(&mut api, vec![schedule]).await;
    serve(&mut api, Method::PATCH, &format!("{NS}/remotelinks/db-to-b/status"), json!(rl)).await;
    run.await.unwrap().unwrap();
    let calls = agents.calls();
    let put = calls.iter().find_map(|c| match c {
        Call::PutLink { link, .. } => Some(link.clone()),
        _ => None,
    });
    assert!(!put.expect("the link is put").forward, "snapshots are not copied as they complete");
}
