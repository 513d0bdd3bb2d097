//! Leader election against kube's mocked API server: the first replica
//! creates the Lease; a replica waits while another holds it fresh; an
//! expired Lease is taken over with the resourceVersion read; a takeover
//! that loses the race (409) does not lead.

mod common;

use cairn_operator::leader::{LEASE, try_lead};
use common::{serve, setup};
use http::{Method, Response};
use jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use serde_json::json;

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/cairn-system/leases";

fn lease(holder: &str, renewed: Timestamp) -> serde_json::Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": LEASE, "namespace": "cairn-system", "resourceVersion": "41"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": 2,
                 "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S.000000Z").to_string()}
    })
}

async fn not_found(api: &mut common::ApiServer) {
    let (req, send) = api.next_request().await.unwrap();
    assert_eq!(req.uri().path(), format!("{PATH}/{LEASE}"));
    let nf = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
    send.send_response(
        Response::builder().status(404).body(Body::from(serde_json::to_vec(&nf).unwrap())).unwrap(),
    );
}

#[tokio::test]
async fn the_first_replica_creates_the_lease_and_leads() {
    let (ctx, mut api, _) = setup();
    let client = ctx.client.clone();
    let run = tokio::spawn(async move { try_lead(&client, "cairn-system", "op-1").await });
    not_found(&mut api).await;
    let created = serve(&mut api, Method::POST, PATH, lease("op-1", Timestamp::now())).await;
    assert_eq!(created["spec"]["holderIdentity"], "op-1");
    assert!(run.await.unwrap().unwrap());
}

#[tokio::test]
async fn a_replica_waits_while_another_holds_the_lease() {
    let (ctx, mut api, _) = setup();
    let client = ctx.client.clone();
    let run = tokio::spawn(async move { try_lead(&client, "cairn-system", "op-1").await });
    serve(&mut api, Method::GET, &format!("{PATH}/{LEASE}"), lease("op-2", Timestamp::now())).await;
    assert!(!run.await.unwrap().unwrap(), "no write, no lead");
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_with_the_version_read() {
    let (ctx, mut api, _) = setup();
    let client = ctx.client.clone();
    let run = tokio::spawn(async move { try_lead(&client, "cairn-system", "op-1").await });
    let old = Timestamp::now() - SignedDuration::from_secs(60);
    serve(&mut api, Method::GET, &format!("{PATH}/{LEASE}"), lease("op-2", old)).await;
    let put =
        serve(&mut api, Method::PUT, &format!("{PATH}/{LEASE}"), lease("op-1", Timestamp::now()))
            .await;
    assert_eq!(put["metadata"]["resourceVersion"], "41", "optimistic concurrency");
    assert_eq!(put["spec"]["holderIdentity"], "op-1");
    assert_eq!(put["spec"]["leaseTransitions"], 3);
    assert!(run.await.unwrap().unwrap());
}

#[tokio::test]
async fn a_takeover_that_loses_the_race_does_not_lead() {
    let (ctx, mut api, _) = setup();
    let client = ctx.client.clone();
    let run = tokio::spawn(async move { try_lead(&client, "cairn-system", "op-1").await });
    let old = Timestamp::now() - SignedDuration::from_secs(60);
    serve(&mut api, Method::GET, &format!("{PATH}/{LEASE}"), lease("op-2", old)).await;
    let (req, send) = api.next_request().await.unwrap();
    assert_eq!(req.method(), Method::PUT);
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"});
    send.send_response(
        Response::builder()
            .status(409)
            .body(Body::from(serde_json::to_vec(&conflict).unwrap()))
            .unwrap(),
    );
    assert!(!run.await.unwrap().unwrap());
}
