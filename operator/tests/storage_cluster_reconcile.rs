//! The StorageCluster reconciler and the agents' announcement against kube's
//! mocked API server and the fake agents: an announcement is a Lease applied
//! with the cluster label and the agent's address; the reconciler finds the
//! announced agents by that label and reports each one's health from its
//! Lease and its answer, with Ready / Degraded conditions.

mod common;
mod fixtures;

use std::sync::Arc;

use cairn_operator::storage_cluster::{Announcement, announce_once, reconcile};
use common::{serve, setup};
use fixtures::cluster;
use http::Method;
use jiff::{SignedDuration, Timestamp};
use serde_json::json;

fn lease(agent: &str, address: &str, renewed: Timestamp) -> serde_json::Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": format!("cairn-agent-{agent}"), "namespace": "cairn-system",
                     "labels": {"cairn.dev/storage-cluster": "site-a"},
                     "annotations": {"cairn.dev/address": address, "cairn.dev/node": format!("node-{agent}")}},
        "spec": {"holderIdentity": agent, "leaseDurationSeconds": 30,
                 "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S.000000Z").to_string()}
    })
}

#[tokio::test]
async fn an_announcement_is_a_lease_with_the_cluster_label_and_the_address() {
    let (ctx, mut api, _agents) = setup();
    let a = Announcement {
        cluster: "site-a".into(),
        agent: "a1".into(),
        address: "10.0.0.5:7070".into(),
        node: Some("node-1".into()),
        domain: Some("rack-1".into()),
    };
    let client = ctx.client.clone();
    let run = tokio::spawn(async move { announce_once(&client, "cairn-system", &a).await });
    let body = serve(
        &mut api,
        Method::PATCH,
        "/apis/coordination.k8s.io/v1/namespaces/cairn-system/leases/cairn-agent-a1",
        json!({}),
    )
    .await;
    run.await.unwrap().unwrap();
    assert_eq!(body["metadata"]["labels"]["cairn.dev/storage-cluster"], "site-a");
    assert_eq!(body["metadata"]["annotations"]["cairn.dev/address"], "10.0.0.5:7070");
    assert_eq!(body["metadata"]["annotations"]["cairn.dev/domain"], "rack-1");
    assert_eq!(body["spec"]["holderIdentity"], "a1");
    assert!(body["spec"]["renewTime"].is_string());
    assert!(body["__query"].as_str().unwrap().contains("fieldManager=cairn-operator"));
}

#[tokio::test]
async fn announced_agents_are_reported_with_health_from_their_lease_and_answer() {
    let (ctx, mut api, agents) = setup();
    agents.set_down("http://a2.site-a:7070");
    let now = Timestamp::now();
    let sc = cluster();
    let run = tokio::spawn(reconcile(Arc::new(sc.clone()), ctx));
    let list = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList", "metadata": {}, "items": [
        lease("a1", "a1.site-a:7070", now),
        lease("a2", "a2.site-a:7070", now),
        lease("a3", "a3.site-a:7070", now - SignedDuration::from_mins(5)),
    ]});
    let (req, send) = api.next_request().await.unwrap();
    assert_eq!(req.uri().path(), "/apis/coordination.k8s.io/v1/leases");
    assert!(
        req.uri().query().unwrap().contains("labelSelector=cairn.dev%2Fstorage-cluster%3Dsite-a"),
        "{:?}",
        req.uri()
    );
    send.send_response(
        http::Response::builder()
            .body(kube::client::Body::from(serde_json::to_vec(&list).unwrap()))
            .unwrap(),
    );
    let status = serve(
        &mut api,
        Method::PATCH,
        "/apis/cairn.dev/v1alpha1/storageclusters/site-a/status",
        json!(sc),
    )
    .await;
    run.await.unwrap().unwrap();
    let st = &status["status"];
    assert_eq!(st["agentsReady"], "1/3");
    let health: Vec<(&str, &str)> = st["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap(), a["health"].as_str().unwrap()))
        .collect();
    assert_eq!(health, [("a1", "Healthy"), ("a2", "Degraded"), ("a3", "Unreachable")]);
    assert_eq!(st["agents"][0]["capacityBytes"], 1u64 << 40);
    let cond = |t: &str| {
        st["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).unwrap().clone()
    };
    assert_eq!(cond("Ready")["status"], "True", "one healthy agent serves");
    assert_eq!(cond("Degraded")["status"], "True");
    assert!(cond("Degraded")["message"].as_str().unwrap().contains("a3 (Unreachable)"));
}
