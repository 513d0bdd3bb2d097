//! The RemoteLink reconciler against kube's mocked API server and the fake
//! agents: a link between two storage clusters of this Kubernetes cluster
//! gets a pairing Secret it owns, is registered at the target volume's head
//! agent and put at the source's with its policy, a copy request is started
//! once, and the status says where the link stands; a link whose source is
//! not placed yet waits with a Warning.

mod common;

use std::sync::Arc;

use cairn_api::crd::{HeadLocation, RemoteLink, Volume, VolumeRole, VolumeSpec, VolumeStatus};
use cairn_operator::{agent::Call, remote_link::reconcile};
use common::{cluster, serve, setup};
use http::{Method, Response};
use kube::{Resource, client::Body};
use serde_json::json;

fn volume(name: &str, cluster: &str, role: VolumeRole, head: &str) -> Volume {
    let mut v = Volume::new(
        name,
        VolumeSpec {
            cluster: cluster.into(),
            size_bytes: 1 << 30,
            replicas: None,
            role,
            attachable: None,
            attached_node: None,
        },
    );
    v.meta_mut().namespace = Some("shop".into());
    v.status = Some(VolumeStatus {
        volume_id: Some(format!("shop-{name}")),
        head: Some(HeadLocation { agent: head.into(), node: None, epoch: 1 }),
        ..Default::default()
    });
    v
}

fn link(copy_request: Option<&str>) -> RemoteLink {
    let mut rl: RemoteLink = serde_json::from_value(json!({
        "apiVersion": "cairn.dev/v1alpha1", "kind": "RemoteLink",
        "metadata": {"name": "db-to-b", "namespace": "shop", "uid": "1234", "generation": 1},
        "spec": {"sourceVolume": "db", "targetCluster": "site-b", "targetVolume": "db-copy",
                 "bandwidth": {"defaultBytesPerSecond": 50000000}}
    }))
    .unwrap();
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

/// Serves the reads of a link's two ends: the placed source db at site-a
/// (head a2) and its placed remote twin db-copy at site-b (head b1).
async fn serve_both_ends(api: &mut common::ApiServer) {
    let source = volume("db", "site-a", VolumeRole::Primary, "a2");
    serve(api, Method::GET, &format!("{NS}/volumes/db"), json!(source)).await;
    serve(api, Method::GET, &format!("{CLUSTERS}/site-a"), json!(cluster())).await;
    serve(api, Method::GET, &format!("{CLUSTERS}/site-b"), site_b()).await;
    let target = volume("db-copy", "site-b", VolumeRole::Remote, "b1");
    serve(api, Method::GET, &format!("{NS}/volumes/db-copy"), json!(target)).await;
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
    let ev =
        serve(&mut api, Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events", json!({}))
            .await;
    assert_eq!(ev["reason"], "CopyRequested");
    let status =
        serve(&mut api, Method::PATCH, &format!("{NS}/remotelinks/db-to-b/status"), json!(rl))
            .await;
    run.await.unwrap().unwrap();

    let st = &status["status"];
    assert_eq!(st["linkId"], "shop-db-to-b");
    assert_eq!(st["lastCopyRequest"], "now-1", "the request is recorded as handled");
    assert!(status["__query"].as_str().unwrap().contains("fieldManager=cairn-operator"));
    tokio::time::sleep(std::time::Duration::from_millis(50)).await; // the background sync
    let calls = agents.calls();
    assert!(
        matches!(&calls[0], Call::RegisterLink { endpoint, link, target_volume }
        if endpoint == "http://b1.site-b:7070" && link == "shop-db-to-b" && target_volume == "shop-db-copy"),
        "{calls:?}"
    );
    let Call::PutLink { endpoint, link: put } = &calls[1] else { panic!("{calls:?}") };
    assert_eq!(endpoint, "http://a2.site-a:7070");
    assert_eq!(put.target_endpoint, "http://b1.site-b:7070");
    assert_eq!(put.volume_id, "shop-db");
    assert!(put.forward && put.policy.is_some() && put.pairing_secret.len() >= 16);
    assert!(
        calls.contains(&Call::SyncLink { link: "shop-db-to-b".into(), resync: false }),
        "{calls:?}"
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
