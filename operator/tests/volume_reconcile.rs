//! The Volume reconciler against kube's mocked API server (tower-test) and
//! the fake agents: each scenario serves the HTTP calls the reconciler must
//! make, in order, checks each one, and then checks the agent calls.

mod common;
mod fixtures;

use std::sync::Arc;

use cairn_api::crd::AgentHealth;
use cairn_api::{
    agent::v1 as pb,
    crd::{RemoteLink, Volume, VolumeRole},
};
use cairn_operator::{
    agent::Call,
    volume::{Error, reconcile},
};
use common::{serve, setup};
use fixtures::cluster;
use http::{Method, Response};
use kube::{Resource, ResourceExt, client::Body};
use serde_json::json;

fn volume(role: VolumeRole, finalizer: bool, deleting: bool) -> Volume {
    let mut v = fixtures::volume("db", "site-a", role);
    let m = v.meta_mut();
    m.uid = Some("0000-1111".into());
    m.generation = Some(3);
    m.resource_version = Some("7".into());
    if finalizer {
        m.finalizers = Some(vec!["cairn.dev/replicas".into()]);
    }
    if deleting {
        m.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-11-24T12:00:00Z".parse().unwrap(),
        ));
    }
    v
}

const VOLUME: &str = "/apis/cairn.dev/v1alpha1/namespaces/shop/volumes/db";
const CLUSTER: &str = "/apis/cairn.dev/v1alpha1/storageclusters/site-a";
/// The id the volume gets at the agents when first placed (its uid's tag).
fn id() -> String {
    cairn_api::crd::volume::volume_id("shop", "db", "0000-1111")
}

/// Serves the reservation of a new head (a status write at the Volume's
/// resourceVersion, before any agent call); returns its body.
async fn serve_reservation(api: &mut common::ApiServer, vol: &Volume) -> serde_json::Value {
    let body = serve(api, Method::PATCH, &format!("{VOLUME}/status"), json!(vol)).await;
    assert_eq!(body["metadata"]["resourceVersion"], "7", "a conditional write: {body}");
    body
}

const VOLUMES: &str = "/apis/cairn.dev/v1alpha1/namespaces/shop/volumes";
const LINKS: &str = "/apis/cairn.dev/v1alpha1/namespaces/shop/remotelinks";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";

#[tokio::test]
async fn a_new_volume_gets_the_finalizer_first() {
    let (ctx, mut api, agents) = setup();
    let vol = volume(VolumeRole::Primary, false, false);
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx));
    let patch =
        serve(&mut api, Method::PATCH, VOLUME, json!(volume(VolumeRole::Primary, true, false)))
            .await;
    assert!(patch.to_string().contains("cairn.dev/replicas"), "{patch}");
    run.await.unwrap().unwrap();
    assert!(agents.calls().is_empty(), "nothing at the agents before the finalizer");
}

#[tokio::test]
async fn a_volume_is_opened_at_the_least_loaded_agent_and_reported_ready_by_server_side_apply() {
    let (ctx, mut api, agents) = setup();
    let vol = volume(VolumeRole::Primary, true, false);
    agents.add_snapshot(&id(), "nightly-1", 7, 1_800_000_000);
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx));
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let reserved = serve_reservation(&mut api, &vol).await;
    assert!(agents.calls().is_empty(), "reserved before any agent hears of the head");
    let head = &reserved["status"]["head"];
    assert_eq!(
        (head["agent"].as_str(), head["epoch"].as_i64()),
        (Some("a2"), Some(1)),
        "{reserved}"
    );
    assert_eq!(reserved["status"]["volumeId"], id().as_str());
    let status = serve(&mut api, Method::PATCH, &format!("{VOLUME}/status"), json!(vol)).await;
    run.await.unwrap().unwrap();

    let snap = &status["status"]["snapshots"][0];
    assert_eq!((snap["id"].as_str(), snap["generation"].as_i64()), (Some("nightly-1"), Some(7)));
    assert_eq!(snap["digest"].as_str().unwrap().len(), 64, "{snap}");
    assert!(
        status["__query"].as_str().unwrap().contains("fieldManager=cairn-operator"),
        "{status}"
    );
    let st = &status["status"];
    assert_eq!(st["phase"], "Ready", "{st}");
    assert_eq!(st["head"]["agent"], "a2");
    assert_eq!(st["head"]["epoch"], 1);
    assert_eq!(st["placement"]["agents"][0]["name"], "a1");
    assert_eq!(st["observedGeneration"], 3);
    let ready = st["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!(ready["status"], "True");
    assert_eq!(ready["observedGeneration"], 3);
    assert_eq!(
        agents.calls(),
        [Call::OpenHead {
            endpoint: "http://a2.site-a:7070".into(),
            volume: id(),
            epoch: 1,
            role: pb::VolumeRole::Primary,
            agents: vec!["a1".into(), "a2".into()],
        }]
    );
}

#[tokio::test]
async fn a_role_change_in_the_spec_demotes_at_the_agent_with_an_event() {
    let (ctx, mut api, agents) = setup();
    // Opened as a primary first...
    let vol = volume(VolumeRole::Primary, true, false);
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx.clone()));
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    serve_reservation(&mut api, &vol).await;
    serve(&mut api, Method::PATCH, &format!("{VOLUME}/status"), json!(vol)).await;
    run.await.unwrap().unwrap();
    // ...then the spec asks for Remote.
    let vol = volume(VolumeRole::Remote, true, false);
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx));
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    serve_reservation(&mut api, &vol).await;
    let ev = serve(&mut api, Method::POST, EVENTS, json!({})).await;
    assert_eq!(ev["reason"], "Demoted", "{ev}");
    assert_eq!(ev["type"], "Normal");
    let status = serve(&mut api, Method::PATCH, &format!("{VOLUME}/status"), json!(vol)).await;
    run.await.unwrap().unwrap();
    assert_eq!(status["status"]["role"], "Remote");
    assert!(matches!(agents.calls().last(), Some(Call::Demote { volume, .. }) if *volume == id()));
}

#[tokio::test]
async fn a_volume_held_by_a_switchover_is_neither_promoted_nor_demoted() {
    let (ctx, mut api, agents) = setup();
    let vol = volume(VolumeRole::Primary, true, false);
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx.clone()));
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    serve_reservation(&mut api, &vol).await;
    serve(&mut api, Method::PATCH, &format!("{VOLUME}/status"), json!(vol)).await;
    run.await.unwrap().unwrap();
    // The spec says Remote, but a switchover holds the role: no demotion.
    let mut vol = volume(VolumeRole::Remote, true, false);
    vol.annotations_mut().insert(cairn_operator::volume::ROLE_HOLD.into(), "db-to-b/now-1".into());
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx));
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    serve_reservation(&mut api, &vol).await;
    let status = serve(&mut api, Method::PATCH, &format!("{VOLUME}/status"), json!(vol)).await;
    run.await.unwrap().unwrap();
    let ready = &status["status"]["conditions"][0];
    assert_eq!(
        (ready["type"].as_str(), ready["reason"].as_str()),
        (Some("Ready"), Some("RoleHeld"))
    );
    assert!(ready["message"].as_str().unwrap().contains("db-to-b/now-1"), "{ready}");
    let calls = agents.calls();
    assert!(
        !calls.iter().any(|c| matches!(c, Call::Demote { .. } | Call::Promote { .. })),
        "{calls:?}"
    );
}

#[tokio::test]
async fn deleting_a_volume_a_link_uses_is_refused_naming_the_link() {
    let (ctx, mut api, agents) = setup();
    let vol = volume(VolumeRole::Primary, true, true);
    let run = tokio::spawn(reconcile(Arc::new(vol), ctx));
    let link: RemoteLink = serde_json::from_value(json!({
        "apiVersion": "cairn.dev/v1alpha1", "kind": "RemoteLink",
        "metadata": {"name": "db-to-b", "namespace": "shop"},
        "spec": {"sourceVolume": "db", "targetCluster": "site-b", "targetVolume": "db"}
    }))
    .unwrap();
    let list = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "RemoteLinkList", "metadata": {}, "items": [link]});
    serve(&mut api, Method::GET, LINKS, list).await;
    let ev = serve(&mut api, Method::POST, EVENTS, json!({})).await;
    assert_eq!(ev["type"], "Warning");
    assert!(ev["note"].as_str().unwrap().contains("RemoteLink db-to-b"), "{ev}");
    let err = run.await.unwrap().unwrap_err();
    assert!(matches!(&err, Error::InUse { link, .. } if link == "db-to-b"), "{err}");
    assert!(agents.calls().is_empty(), "no replica touched");
}

#[tokio::test]
async fn deleting_an_unused_volume_removes_its_replicas_then_the_finalizer() {
    let (ctx, mut api, agents) = setup();
    // A volume that was placed on a1, a2 with its head on a2.
    let mut vol = volume(VolumeRole::Primary, true, true);
    let d = cairn_operator::volume::desired(&vol, &cluster()).unwrap();
    vol.status = Some(cairn_api::crd::VolumeStatus {
        volume_id: Some("shop-db".into()),
        placement: Some(d.placement.clone()),
        head: Some(d.head.clone()),
        ..Default::default()
    });
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx));
    let empty = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "RemoteLinkList", "metadata": {}, "items": []});
    serve(&mut api, Method::GET, LINKS, empty).await;
    let none = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "VolumeList", "metadata": {}, "items": [vol]});
    serve(&mut api, Method::GET, VOLUMES, none).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let ev = serve(&mut api, Method::POST, EVENTS, json!({})).await;
    assert_eq!(ev["reason"], "Deleted");
    let patch = serve(&mut api, Method::PATCH, VOLUME, json!(vol)).await;
    assert!(patch.to_string().contains("remove"), "the finalizer is removed last: {patch}");
    run.await.unwrap().unwrap();
    let calls = agents.calls();
    assert_eq!(
        calls[0],
        Call::CloseHead { endpoint: "http://a2.site-a:7070".into(), volume: "shop-db".into() }
    );
    assert_eq!(calls.len(), 3, "close, then a replica deleted on each agent: {calls:?}");
}

#[tokio::test]
async fn deleting_a_volume_whose_agent_is_unreachable_finishes_and_names_the_replica_left() {
    let (ctx, mut api, agents) = setup();
    let mut vol = volume(VolumeRole::Primary, true, true);
    let d = cairn_operator::volume::desired(&vol, &cluster()).unwrap();
    vol.status = Some(cairn_api::crd::VolumeStatus {
        volume_id: Some(id()),
        placement: Some(d.placement.clone()),
        head: Some(d.head.clone()),
        ..Default::default()
    });
    // a2 (the head) stopped renewing its Lease.
    let down = fixtures::storage_cluster(
        "site-a",
        &[("a1", AgentHealth::Healthy, 2), ("a2", AgentHealth::Unreachable, 0)],
    );
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx));
    let empty = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "RemoteLinkList", "metadata": {}, "items": []});
    serve(&mut api, Method::GET, LINKS, empty).await;
    let none = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "VolumeList", "metadata": {}, "items": [vol]});
    serve(&mut api, Method::GET, VOLUMES, none).await;
    serve(&mut api, Method::GET, CLUSTER, json!(down)).await;
    let ev = serve(&mut api, Method::POST, EVENTS, json!({})).await;
    assert_eq!(ev["reason"], "Deleted");
    let note = ev["note"].as_str().unwrap();
    assert!(note.contains("except on a2") && note.contains("unreachable"), "{note}");
    let patch = serve(&mut api, Method::PATCH, VOLUME, json!(vol)).await;
    assert!(patch.to_string().contains("remove"), "the finalizer goes: {patch}");
    run.await.unwrap().unwrap();
    assert_eq!(
        agents.calls(),
        [Call::DeleteReplica { endpoint: "http://a1.site-a:7070".into(), volume: id() }],
        "nothing asked of a2"
    );
}

#[tokio::test]
async fn an_unreachable_head_agent_is_an_error_that_backs_off_and_leaves_only_the_reservation() {
    let (ctx, mut api, agents) = setup();
    agents.set_down("http://a2.site-a:7070");
    let vol = volume(VolumeRole::Primary, true, false);
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx.clone()));
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let reserved = serve_reservation(&mut api, &vol).await;
    assert!(reserved["status"].get("conditions").is_none(), "no Ready said: {reserved}");
    let err = run.await.unwrap().unwrap_err();
    assert!(matches!(&err, Error::Agent(e) if e.code == tonic::Code::Unavailable), "{err}");
    let action = cairn_operator::volume::error_policy(
        Arc::new(volume(VolumeRole::Primary, true, false)),
        &err,
        ctx,
    );
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(5))
    );
}

#[tokio::test]
async fn a_head_already_reserved_is_opened_without_writing_it_again_and_a_moved_one_is_reserved_one_epoch_up()
 {
    let (ctx, mut api, agents) = setup();
    let mut vol = volume(VolumeRole::Primary, true, false);
    let d = cairn_operator::volume::desired(&vol, &cluster()).unwrap();
    vol.status = Some(cairn_api::crd::VolumeStatus {
        volume_id: Some(id()),
        placement: Some(d.placement.clone()),
        head: Some(d.head.clone()),
        ..Default::default()
    });
    // A reservation an earlier reconcile wrote: opened, not reserved again.
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx.clone()));
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let st = serve(&mut api, Method::PATCH, &format!("{VOLUME}/status"), json!(vol)).await;
    assert!(st.get("metadata").is_none(), "the plain status write: {st}");
    run.await.unwrap().unwrap();
    // Its agent went away: the head moves to a1 one epoch up, reserved first.
    let gone = fixtures::storage_cluster(
        "site-a",
        &[("a1", AgentHealth::Healthy, 2), ("a2", AgentHealth::Unreachable, 0)],
    );
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx));
    serve(&mut api, Method::GET, CLUSTER, json!(gone)).await;
    let before = agents.calls().len();
    let reserved = serve_reservation(&mut api, &vol).await;
    assert_eq!(agents.calls().len(), before, "reserved before the new head opens");
    let head = &reserved["status"]["head"];
    assert_eq!((head["agent"].as_str(), head["epoch"].as_i64()), (Some("a1"), Some(2)));
    serve(&mut api, Method::PATCH, &format!("{VOLUME}/status"), json!(vol)).await;
    run.await.unwrap().unwrap();
    assert!(matches!(agents.calls().last(), Some(Call::OpenHead { epoch: 2, .. })));
}

#[tokio::test]
async fn a_missing_cluster_leaves_the_volume_pending_with_a_warning() {
    let (ctx, mut api, _agents) = setup();
    let vol = volume(VolumeRole::Primary, true, false);
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx));
    let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
    let (req, send) = api.next_request().await.unwrap();
    assert_eq!(req.uri().path(), CLUSTER);
    send.send_response(
        Response::builder()
            .status(404)
            .body(Body::from(serde_json::to_vec(&not_found).unwrap()))
            .unwrap(),
    );
    let ev = serve(&mut api, Method::POST, EVENTS, json!({})).await;
    assert_eq!(
        (ev["type"].as_str(), ev["reason"].as_str()),
        (Some("Warning"), Some("ClusterNotFound"))
    );
    let status = serve(&mut api, Method::PATCH, &format!("{VOLUME}/status"), json!(vol)).await;
    assert_eq!(status["status"]["phase"], "Pending");
    assert!(
        status["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("storage cluster site-a does not exist")
    );
    run.await.unwrap().unwrap();
}
