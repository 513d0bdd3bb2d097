//! Shared by the reconciler tests: kube's mocked API server, the fake
//! agents (the test objects are in `fixtures`).
#![allow(dead_code)]

use std::sync::Arc;

use cairn_operator::{agent::FakeAgents, context::Context};
use http::{Method, Request, Response};
use kube::{Client, client::Body, runtime::events::Recorder};
use serde_json::Value;
use tower_test::mock::Handle;

pub type ApiServer = Handle<Request<Body>, Response<Body>>;

pub fn setup() -> (Arc<Context>, ApiServer, FakeAgents) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let agents = FakeAgents::default();
    let recorder = Recorder::new(client.clone(), "cairn-operator".into());
    let ctx =
        Context { client, agents: Arc::new(agents.clone()), recorder, metrics: Default::default() };
    (Arc::new(ctx), handle, agents)
}

/// Serves the next request: checks its method and path, answers `reply`;
/// returns the request's JSON body (Null if none).
pub async fn serve(api: &mut ApiServer, method: Method, path: &str, reply: Value) -> Value {
    let (req, send) = api.next_request().await.expect("the reconciler made another call");
    assert_eq!(req.method(), method, "{} {}", req.method(), req.uri());
    assert!(
        req.uri().path() == path,
        "expected {method} {path}, got {} {}",
        req.method(),
        req.uri()
    );
    let query = req.uri().query().unwrap_or("").to_string();
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body: Value =
        if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    let mut body = body;
    if let Value::Object(m) = &mut body {
        m.insert("__query".into(), Value::String(query));
    }
    send.send_response(
        Response::builder().body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap(),
    );
    body
}

/// Answers the next request, a GET of `path`, with 404 Not Found.
pub async fn not_found(api: &mut ApiServer, path: &str) {
    let (req, send) = api.next_request().await.expect("the reconciler made another call");
    assert_eq!((req.method(), req.uri().path()), (&Method::GET, path), "{}", req.uri());
    let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
    send.send_response(
        Response::builder()
            .status(404)
            .body(Body::from(serde_json::to_vec(&status).unwrap()))
            .unwrap(),
    );
}
