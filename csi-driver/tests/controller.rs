//! The Controller service against kube's mocked API server (tower-test)
//! and the operator's fake agents: each scenario calls an RPC, serves the
//! HTTP calls it must make, in order (method, path, field manager, body),
//! and checks the answer, its CSI code and the agent calls. Time is paused,
//! so the controller's 500 ms polls and its timeouts run at once.

use std::{collections::HashMap, sync::Arc, time::Duration};

use cairn_api::{
    crd::{
        AgentHealth, AgentStatus, ClusterDefaults, Condition, ConditionStatus, HeadLocation,
        StorageCluster, StorageClusterSpec, StorageClusterStatus, Volume, VolumePhase, VolumeRole,
        VolumeSpec, VolumeStatus,
    },
    csi::v1::{self as csi, controller_server::Controller},
};
use cairn_client::{Call, FakeAgents};
use cairn_csi::controller::{
    ControllerConfig, ControllerService, annotation, content_source::Source,
};
use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Client, Resource, ResourceExt, client::Body};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tonic::Code;
use tower_test::mock::Handle;

type ApiServer = Handle<Request<Body>, Response<Body>>;

const NS: &str = "cairn-system";
const VOL: &str = "/apis/cairn.dev/v1alpha1/namespaces/cairn-system/volumes/pvc-1";
const VOLS: &str = "/apis/cairn.dev/v1alpha1/namespaces/cairn-system/volumes";
const CLUSTER: &str = "/apis/cairn.dev/v1alpha1/storageclusters/site-a";
const CLUSTERS: &str = "/apis/cairn.dev/v1alpha1/storageclusters";
/// The volume's id at the agents (the operator's `<namespace>-<name>`).
const AGENT_VOL: &str = "cairn-system-pvc-1";

fn setup() -> (ControllerService, ApiServer, FakeAgents) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let agents = FakeAgents::default();
    let config = ControllerConfig { namespace: NS.into(), ready_timeout: Duration::from_secs(10) };
    (ControllerService::new(config, client, Arc::new(agents.clone())), handle, agents)
}

/// Serves the next request with `code` and `reply`: checks its method and
/// path; returns its JSON body (Null if none) with the query string under
/// `__query` and the content type under `__type`.
async fn serve_with(
    api: &mut ApiServer,
    method: Method,
    path: &str,
    code: StatusCode,
    reply: Value,
) -> Value {
    let (req, send) = api.next_request().await.expect("the controller made another call");
    assert_eq!(req.method(), method, "{} {}", req.method(), req.uri());
    assert_eq!(
        req.uri().path(),
        path,
        "expected {method} {path}, got {} {}",
        req.method(),
        req.uri()
    );
    let query = req.uri().query().unwrap_or("").to_string();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let mut body: Value =
        if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    if let Value::Object(m) = &mut body {
        m.insert("__query".into(), Value::String(query));
        m.insert("__type".into(), Value::String(content_type));
    }
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    body
}

async fn serve(api: &mut ApiServer, method: Method, path: &str, reply: Value) -> Value {
    serve_with(api, method, path, StatusCode::OK, reply).await
}

/// Answers a GET with 404 Not Found.
async fn not_found(api: &mut ApiServer, path: &str) {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "not found", "reason": "NotFound", "code": 404
    });
    serve_with(api, Method::GET, path, StatusCode::NOT_FOUND, status).await;
}

/// Runs an RPC that must not reach the API server; its result.
async fn alone<T: Send + 'static>(
    api: &mut ApiServer,
    call: JoinHandle<Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::select! {
        r = call => r.unwrap(),
        req = api.next_request() => panic!("unexpected API call: {:?}", req.map(|(r, _)| r.uri().clone())),
    }
}

fn cluster() -> StorageCluster {
    let mut c = StorageCluster::new(
        "site-a",
        StorageClusterSpec {
            node_selector: Some(Default::default()),
            failure_domain_label: None,
            gateway: None,
            defaults: ClusterDefaults { replicas: 2, chunk_size_bytes: 64 << 20 },
        },
    );
    let agent = |n: &str| AgentStatus {
        name: n.into(),
        node: Some(format!("node-{n}")),
        address: format!("{n}.site-a:7070"),
        domain: None,
        capacity_bytes: 1 << 40,
        used_bytes: 1 << 30,
        health: AgentHealth::Healthy,
        load: 0,
        last_seen: None,
        message: None,
    };
    let mut down = agent("a3");
    down.health = AgentHealth::Unreachable;
    c.status = Some(StorageClusterStatus {
        agents: vec![agent("a1"), agent("a2"), down],
        ..Default::default()
    });
    c
}

/// Volume `name` as the controller creates it, generation 1, no status.
fn created(name: &str) -> Volume {
    let mut v = Volume::new(
        name,
        VolumeSpec {
            cluster: "site-a".into(),
            size_bytes: 1 << 30,
            replicas: None,
            role: VolumeRole::Primary,
            attachable: None,
            attached_node: None,
            source: None,
        },
    );
    let m = v.meta_mut();
    m.namespace = Some(NS.into());
    m.generation = Some(1);
    m.labels = Some([("app.kubernetes.io/managed-by".to_string(), "cairn-csi".to_string())].into());
    m.annotations = Some(
        [
            (annotation::ACCESS.to_string(), "mount".to_string()),
            (annotation::FS_TYPE.to_string(), "ext4".to_string()),
        ]
        .into(),
    );
    v
}

/// The volume placed on a1, a2 with its head on `head`'s agent at `epoch`.
fn placed(name: &str, phase: VolumePhase, head: &str, epoch: i64) -> Volume {
    let mut v = created(name);
    let d = cairn_client::head::desired(&v, &cluster()).unwrap();
    v.status = Some(VolumeStatus {
        phase,
        volume_id: Some(format!("{NS}-{name}")),
        size_bytes: Some(1 << 30),
        placement: Some(d.placement),
        head: Some(HeadLocation { agent: head.into(), node: Some(format!("node-{head}")), epoch }),
        observed_generation: Some(1),
        ..Default::default()
    });
    v
}

fn ready() -> Volume {
    placed("pvc-1", VolumePhase::Ready, "a1", 1)
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "cairn.dev/v1alpha1", "kind": kind, "metadata": {}, "items": items})
}

fn mount_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(Default::default())),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

fn create_request(name: &str) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 1 << 30, limit_bytes: 0 }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
        parameters: HashMap::from([
            ("cluster".to_string(), "site-a".to_string()),
            ("csi.storage.k8s.io/pvc/name".to_string(), "data".to_string()),
            ("csi.storage.k8s.io/pvc/namespace".to_string(), "shop".to_string()),
        ]),
        ..Default::default()
    }
}

fn spawn_create(
    svc: &ControllerService,
    req: csi::CreateVolumeRequest,
) -> JoinHandle<Result<csi::CreateVolumeResponse, tonic::Status>> {
    let svc = svc.clone();
    tokio::spawn(async move {
        svc.create_volume(tonic::Request::new(req)).await.map(|r| r.into_inner())
    })
}

fn spawn_publish(
    svc: &ControllerService,
    volume: &str,
    node: &str,
) -> JoinHandle<Result<csi::ControllerPublishVolumeResponse, tonic::Status>> {
    let svc = svc.clone();
    let req = csi::ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        readonly: false,
        ..Default::default()
    };
    tokio::spawn(async move {
        svc.controller_publish_volume(tonic::Request::new(req)).await.map(|r| r.into_inner())
    })
}

fn spawn_snapshot(
    svc: &ControllerService,
    volume: &str,
    name: &str,
) -> JoinHandle<Result<csi::CreateSnapshotResponse, tonic::Status>> {
    let svc = svc.clone();
    let req = csi::CreateSnapshotRequest {
        source_volume_id: volume.into(),
        name: name.into(),
        ..Default::default()
    };
    tokio::spawn(async move {
        svc.create_snapshot(tonic::Request::new(req)).await.map(|r| r.into_inner())
    })
}

// ---- CreateVolume ----

#[tokio::test(start_paused = true)]
async fn create_applies_a_volume_with_the_csi_field_manager_and_waits_until_it_is_ready() {
    let (svc, mut api, _agents) = setup();
    let call = spawn_create(&svc, create_request("pvc-1"));
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    not_found(&mut api, VOL).await;
    let apply = serve(&mut api, Method::PATCH, VOL, json!(created("pvc-1"))).await;
    let query = apply["__query"].as_str().unwrap();
    assert!(query.contains("fieldManager=cairn-csi"), "{query}");
    assert_eq!(apply["__type"], "application/apply-patch+yaml");
    assert_eq!(apply["apiVersion"], "cairn.dev/v1alpha1");
    assert_eq!(apply["kind"], "Volume");
    assert_eq!(
        apply["spec"],
        json!({"cluster": "site-a", "sizeBytes": 1 << 30, "role": "Primary"}),
        "{apply}"
    );
    let meta = &apply["metadata"];
    assert_eq!(meta["namespace"], NS);
    assert_eq!(meta["labels"]["app.kubernetes.io/managed-by"], "cairn-csi");
    assert_eq!(meta["annotations"][annotation::PVC_NAME], "data");
    assert_eq!(meta["annotations"][annotation::PVC_NAMESPACE], "shop");
    assert_eq!(meta["annotations"][annotation::ACCESS], "mount");
    assert_eq!(meta["annotations"][annotation::FS_TYPE], "ext4");
    // The operator has not got to it; then it is Pending; then Ready.
    serve(&mut api, Method::GET, VOL, json!(created("pvc-1"))).await;
    let mut pending = ready();
    pending.status.as_mut().unwrap().phase = VolumePhase::Pending;
    serve(&mut api, Method::GET, VOL, json!(pending)).await;
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    let v = call.await.unwrap().unwrap().volume.unwrap();
    assert_eq!(v.volume_id, "pvc-1");
    assert_eq!(v.capacity_bytes, 1 << 30);
    assert_eq!(v.volume_context["cluster"], "site-a");
    assert_eq!(v.volume_context["fsType"], "ext4");
    assert_eq!(v.accessible_topology[0].segments["topology.cairn.dev/cluster"], "site-a");
}

#[tokio::test(start_paused = true)]
async fn a_repeated_create_answers_the_same_volume_without_writing() {
    let (svc, mut api, _agents) = setup();
    let call = spawn_create(&svc, create_request("pvc-1"));
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    let v = alone(&mut api, call).await.unwrap().volume.unwrap();
    assert_eq!((v.volume_id.as_str(), v.capacity_bytes), ("pvc-1", 1 << 30));
}

#[tokio::test(start_paused = true)]
async fn a_repeat_that_does_not_match_the_volume_is_already_exists() {
    let (svc, mut api, _agents) = setup();
    let mut req = create_request("pvc-1");
    req.capacity_range = Some(csi::CapacityRange { required_bytes: 2 << 30, limit_bytes: 0 });
    let call = spawn_create(&svc, req);
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    let e = alone(&mut api, call).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("1073741824 bytes"), "{}", e.message());
    // A block volume asked for under the name of a mount one.
    let mut req = create_request("pvc-1");
    req.volume_capabilities = vec![block_cap()];
    let call = spawn_create(&svc, req);
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    assert_eq!(alone(&mut api, call).await.unwrap_err().code(), Code::AlreadyExists);
}

#[tokio::test(start_paused = true)]
async fn bad_names_capabilities_parameters_sizes_and_sources_are_refused_before_any_write() {
    let (svc, mut api, _agents) = setup();
    type Edit = Box<dyn Fn(&mut csi::CreateVolumeRequest)>;
    let cases: Vec<(&str, Edit, Code, &str)> = vec![
        ("no name", Box::new(|r| r.name.clear()), Code::InvalidArgument, "name is required"),
        (
            "no capabilities",
            Box::new(|r| r.volume_capabilities.clear()),
            Code::InvalidArgument,
            "volume_capabilities is required",
        ),
        (
            "a multi-node mode",
            Box::new(|r| r.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter)]),
            Code::InvalidArgument,
            "SINGLE_NODE_WRITER",
        ),
        (
            "an unknown parameter",
            Box::new(|r| {
                r.parameters.insert("pool".into(), "fast".into());
            }),
            Code::InvalidArgument,
            "cluster, replicas and fsType",
        ),
        (
            "too many replicas",
            Box::new(|r| {
                r.parameters.insert("replicas".into(), "9".into());
            }),
            Code::InvalidArgument,
            "from 1 to 5",
        ),
        (
            "no cluster",
            Box::new(|r| {
                r.parameters.remove("cluster");
            }),
            Code::InvalidArgument,
            "no storage cluster",
        ),
        (
            "an impossible range",
            Box::new(|r| {
                r.capacity_range =
                    Some(csi::CapacityRange { required_bytes: 5000, limit_bytes: 6000 })
            }),
            Code::OutOfRange,
            "above limit_bytes 6000",
        ),
        (
            "a content source of no type",
            Box::new(|r| r.volume_content_source = Some(csi::VolumeContentSource { r#type: None })),
            Code::InvalidArgument,
            "volume_content_source.type is required",
        ),
        (
            "a snapshot id that is not Cairn's",
            Box::new(|r| r.volume_content_source = Some(snapshot_source("not-ours"))),
            Code::NotFound,
            "snapshot not-ours does not exist",
        ),
    ];
    for (what, edit, code, says) in cases {
        let mut req = create_request("pvc-1");
        edit(&mut req);
        let e = alone(&mut api, spawn_create(&svc, req)).await.unwrap_err();
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(e.message().contains(says), "{what}: {}", e.message());
    }
}

// ---- CreateVolume from a snapshot or a volume ----

const VOL2: &str = "/apis/cairn.dev/v1alpha1/namespaces/cairn-system/volumes/pvc-2";

fn snapshot_source(id: &str) -> csi::VolumeContentSource {
    csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource { snapshot_id: id.into() },
        )),
    }
}

fn volume_source(volume: &str) -> csi::VolumeContentSource {
    csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource { volume_id: volume.into() },
        )),
    }
}

/// pvc-2 restored from `source` (by `spec.source`), head on a2: still
/// restoring (head Remote, no `Restored`), or restored and promoted.
fn restored(source: &Source, done: bool) -> Volume {
    let mut v = placed("pvc-2", VolumePhase::Ready, "a2", 1);
    v.spec.source = Some(source.spec());
    let st = v.status.as_mut().unwrap();
    st.role = Some(if done { VolumeRole::Primary } else { VolumeRole::Remote });
    if done {
        st.conditions.push(Condition::new(
            "Restored",
            ConditionStatus::True,
            "Restored",
            "copied",
            Some(1),
            Time("2026-12-07T12:00:00Z".parse().unwrap()),
        ));
    }
    v
}

fn snap(volume: &str, id: &str) -> Source {
    Source::Snapshot { volume: volume.into(), id: id.into() }
}

/// The agent calls that would fill a volume: the CSI controller makes
/// none (the operator restores).
fn copy_calls(agents: &FakeAgents) -> Vec<Call> {
    agents
        .calls()
        .into_iter()
        .filter(|c| {
            matches!(
                c,
                Call::RegisterLink { .. }
                    | Call::CopySnapshot { .. }
                    | Call::UnregisterLink { .. }
                    | Call::Snapshot { .. }
                    | Call::DeleteSnapshot { .. }
            )
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_restore_creates_a_volume_with_its_source_and_answers_once_the_operator_restored_it() {
    let (svc, mut api, agents) = setup();
    agents.add_snapshot(AGENT_VOL, "snap-1", 7, 1_767_225_600);
    let source = snap("pvc-1", "snap-1");
    let mut req = create_request("pvc-2");
    req.volume_content_source = Some(snapshot_source("pvc-1/snap-1"));
    let call = spawn_create(&svc, req);
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    not_found(&mut api, VOL2).await;
    // The source and its snapshot exist; its size is the new one's.
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let apply = serve(&mut api, Method::PATCH, VOL2, json!(restored(&source, false))).await;
    assert_eq!(apply["__type"], "application/apply-patch+yaml");
    assert!(apply["__query"].as_str().unwrap().contains("fieldManager=cairn-csi"));
    assert_eq!(
        apply["spec"],
        json!({"cluster": "site-a", "sizeBytes": 1 << 30, "role": "Primary",
               "source": {"snapshot": {"volume": "pvc-1", "snapshot": "snap-1"}}}),
        "{apply}"
    );
    assert!(apply["metadata"]["annotations"].get(annotation::CONTENT_SOURCE).is_none());
    // Ready but still restoring (head Remote): not answered yet.
    serve(&mut api, Method::GET, VOL2, json!(restored(&source, false))).await;
    serve(&mut api, Method::GET, VOL2, json!(restored(&source, true))).await;
    let v = alone(&mut api, call).await.unwrap().volume.unwrap();
    assert_eq!((v.volume_id.as_str(), v.capacity_bytes), ("pvc-2", 1 << 30));
    assert_eq!(v.content_source, Some(snapshot_source("pvc-1/snap-1")));
    assert_eq!(copy_calls(&agents), [], "the operator copies, not the CSI controller");
}

#[tokio::test(start_paused = true)]
async fn a_restore_of_a_missing_snapshot_is_not_found_and_one_larger_than_its_source_out_of_range()
{
    let (svc, mut api, agents) = setup();
    agents.add_snapshot(AGENT_VOL, "snap-1", 7, 1_767_225_600);
    let restore = |id: &str, range: Option<csi::CapacityRange>| {
        let mut req = create_request("pvc-2");
        req.volume_content_source = Some(snapshot_source(id));
        req.capacity_range = range;
        spawn_create(&svc, req)
    };
    let call = restore("pvc-1/snap-9", None);
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    not_found(&mut api, VOL2).await;
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let e = alone(&mut api, call).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("pvc-1/snap-9"), "{}", e.message());

    let call = restore("pvc-1/snap-1", None);
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    not_found(&mut api, VOL2).await;
    not_found(&mut api, VOL).await;
    assert_eq!(alone(&mut api, call).await.unwrap_err().code(), Code::NotFound);

    for (range, says) in [
        (
            csi::CapacityRange { required_bytes: 2 << 30, limit_bytes: 0 },
            "growth is not supported yet",
        ),
        (csi::CapacityRange { required_bytes: 0, limit_bytes: 1 << 20 }, "below the source's"),
    ] {
        let call = restore("pvc-1/snap-1", Some(range));
        serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
        not_found(&mut api, VOL2).await;
        serve(&mut api, Method::GET, VOL, json!(ready())).await;
        serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
        let e = alone(&mut api, call).await.unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
        assert!(e.message().contains(says), "{}", e.message());
    }
    assert!(copy_calls(&agents).is_empty(), "nothing registered or copied");
}

#[tokio::test(start_paused = true)]
async fn a_clone_creates_a_volume_whose_source_is_the_volume() {
    let (svc, mut api, agents) = setup();
    let source = Source::Volume { volume: "pvc-1".into() };
    let mut req = create_request("pvc-2");
    req.volume_content_source = Some(volume_source("pvc-1"));
    let call = spawn_create(&svc, req);
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    not_found(&mut api, VOL2).await;
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    let apply = serve(&mut api, Method::PATCH, VOL2, json!(restored(&source, false))).await;
    assert_eq!(apply["spec"]["role"], "Primary");
    assert_eq!(apply["spec"]["source"], json!({"volume": {"name": "pvc-1"}}), "{apply}");
    serve(&mut api, Method::GET, VOL2, json!(restored(&source, true))).await;
    let v = alone(&mut api, call).await.unwrap().volume.unwrap();
    assert_eq!(v.content_source, Some(volume_source("pvc-1")));
    assert_eq!(copy_calls(&agents), []);
}

#[tokio::test(start_paused = true)]
async fn a_repeated_restore_waits_for_the_same_volume_and_refuses_another_source() {
    let (svc, mut api, agents) = setup();
    agents.add_snapshot(AGENT_VOL, "snap-1", 7, 1_767_225_600);
    let source = snap("pvc-1", "snap-1");
    let restore = |id: &str| {
        let mut req = create_request("pvc-2");
        req.volume_content_source = Some(snapshot_source(id));
        spawn_create(&svc, req)
    };
    // The last attempt created the volume and timed out waiting.
    let call = restore("pvc-1/snap-1");
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    serve(&mut api, Method::GET, VOL2, json!(restored(&source, false))).await;
    serve(&mut api, Method::GET, VOL2, json!(restored(&source, false))).await;
    serve(&mut api, Method::GET, VOL2, json!(restored(&source, true))).await;
    let v = alone(&mut api, call).await.unwrap().volume.unwrap();
    assert_eq!(v.content_source, Some(snapshot_source("pvc-1/snap-1")));

    // Another source, or none, under the same name.
    let call = restore("pvc-1/snap-2");
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    serve(&mut api, Method::GET, VOL2, json!(restored(&source, true))).await;
    let e = alone(&mut api, call).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("snapshot:pvc-1/snap-1"), "{}", e.message());
    let call = spawn_create(&svc, create_request("pvc-2"));
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    serve(&mut api, Method::GET, VOL2, json!(restored(&source, true))).await;
    assert_eq!(alone(&mut api, call).await.unwrap_err().code(), Code::AlreadyExists);
    assert_eq!(copy_calls(&agents), []);
}

#[tokio::test(start_paused = true)]
async fn a_volume_restored_by_an_older_controller_is_still_known_by_its_annotation() {
    let (svc, mut api, _agents) = setup();
    let mut v = placed("pvc-2", VolumePhase::Ready, "a2", 1);
    v.annotations_mut().insert(annotation::CONTENT_SOURCE.into(), "snapshot:pvc-1/snap-1".into());
    v.status.as_mut().unwrap().role = Some(VolumeRole::Primary);
    let mut req = create_request("pvc-2");
    req.volume_content_source = Some(snapshot_source("pvc-1/snap-1"));
    let call = spawn_create(&svc, req);
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    serve(&mut api, Method::GET, VOL2, json!(v)).await;
    serve(&mut api, Method::GET, VOL2, json!(v)).await;
    let got = alone(&mut api, call).await.unwrap().volume.unwrap();
    assert_eq!(got.content_source, Some(snapshot_source("pvc-1/snap-1")));
}

#[tokio::test(start_paused = true)]
async fn a_missing_cluster_is_invalid_and_one_outside_the_requisite_topology_exhausted() {
    let (svc, mut api, _agents) = setup();
    let call = spawn_create(&svc, create_request("pvc-1"));
    not_found(&mut api, CLUSTER).await;
    let e = alone(&mut api, call).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("storage cluster site-a does not exist"), "{}", e.message());

    let mut req = create_request("pvc-1");
    let topo = |c: &str| csi::Topology {
        segments: HashMap::from([("topology.cairn.dev/cluster".to_string(), c.to_string())]),
    };
    req.accessibility_requirements =
        Some(csi::TopologyRequirement { requisite: vec![topo("site-b")], preferred: vec![] });
    let call = spawn_create(&svc, req);
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let e = alone(&mut api, call).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

#[tokio::test(start_paused = true)]
async fn the_cluster_can_come_from_the_topology_of_the_pods_node() {
    let (svc, mut api, _agents) = setup();
    let mut req = create_request("pvc-1");
    req.parameters.remove("cluster");
    let topo = csi::Topology {
        segments: HashMap::from([("topology.cairn.dev/cluster".to_string(), "site-a".to_string())]),
    };
    req.accessibility_requirements =
        Some(csi::TopologyRequirement { requisite: vec![topo.clone()], preferred: vec![topo] });
    let call = spawn_create(&svc, req);
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    let v = alone(&mut api, call).await.unwrap().volume.unwrap();
    assert_eq!(v.volume_context["cluster"], "site-a");
}

#[tokio::test(start_paused = true)]
async fn a_volume_that_does_not_become_ready_is_deadline_exceeded_with_what_it_says() {
    let (svc, mut api, _agents) = setup();
    let call = spawn_create(&svc, create_request("pvc-1"));
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let mut stuck = created("pvc-1");
    stuck.status = Some(VolumeStatus {
        phase: VolumePhase::Pending,
        conditions: vec![Condition::new(
            "Ready",
            ConditionStatus::False,
            "TooFewAgents",
            "storage cluster site-a has 1 healthy agents but the volume wants 2 replicas",
            Some(1),
            Time(k8s_openapi::jiff::Timestamp::now()),
        )],
        observed_generation: Some(1),
        ..Default::default()
    });
    serve(&mut api, Method::GET, VOL, json!(stuck)).await;
    let mut call = call;
    let mut gets = 0;
    let e = loop {
        tokio::select! {
            r = &mut call => break r.unwrap().unwrap_err(),
            next = api.next_request() => {
                let (req, send) = next.unwrap();
                assert_eq!((req.method(), req.uri().path()), (&Method::GET, VOL));
                send.send_response(Response::new(Body::from(serde_json::to_vec(&stuck).unwrap())));
                gets += 1;
            }
        }
    };
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        e.message().contains("TooFewAgents") && e.message().contains("1 healthy"),
        "{}",
        e.message()
    );
    assert!((15..=21).contains(&gets), "polled every 500 ms for 10 s: {gets}");
}

#[tokio::test(start_paused = true)]
async fn a_concurrent_call_on_the_same_volume_is_aborted() {
    let (svc, mut api, _agents) = setup();
    let first = spawn_create(&svc, create_request("pvc-1"));
    // The first call is at the API server...
    let (req, send) = api.next_request().await.unwrap();
    assert_eq!(req.uri().path(), CLUSTER);
    // ...when a second one on the same volume comes.
    let second = spawn_publish(&svc, "pvc-1", "node-a1");
    let e = alone(&mut api, second).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(e.message().contains("pvc-1"), "{}", e.message());
    // Another volume is not held up.
    let other = spawn_create(&svc, create_request("pvc-2"));
    let (req2, _send2) = api.next_request().await.unwrap();
    assert_eq!(req2.uri().path(), CLUSTER);
    other.abort();
    send.send_response(Response::new(Body::from(serde_json::to_vec(&cluster()).unwrap())));
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    first.await.unwrap().unwrap();
}

// ---- DeleteVolume ----

async fn delete(svc: &ControllerService, id: &str) -> JoinHandle<Result<(), tonic::Status>> {
    let svc = svc.clone();
    let req = csi::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() };
    tokio::spawn(async move { svc.delete_volume(tonic::Request::new(req)).await.map(drop) })
}

#[tokio::test(start_paused = true)]
async fn deleting_a_missing_volume_succeeds_and_an_unused_one_is_deleted() {
    let (svc, mut api, _agents) = setup();
    let e = alone(&mut api, delete(&svc, "").await).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let call = delete(&svc, "pvc-1").await;
    not_found(&mut api, VOL).await;
    alone(&mut api, call).await.unwrap();

    let call = delete(&svc, "pvc-1").await;
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    serve(&mut api, Method::DELETE, VOL, json!(ready())).await;
    alone(&mut api, call).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn deleting_a_volume_with_csi_snapshots_or_a_node_is_refused() {
    let (svc, mut api, agents) = setup();
    let mut vol = ready();
    vol.annotations_mut().insert(annotation::SNAPSHOTS.into(), "snap-1,snap-gone".into());
    agents.add_snapshot(AGENT_VOL, "daily-20260101-0000", 10, 1_767_225_600);
    agents.add_snapshot(AGENT_VOL, "snap-1", 11, 1_767_225_700);
    let call = delete(&svc, "pvc-1").await;
    serve(&mut api, Method::GET, VOL, json!(vol)).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let e = alone(&mut api, call).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("(snap-1)") && !e.message().contains("daily"),
        "only the live CSI snapshots: {}",
        e.message()
    );

    let mut attached = ready();
    attached.spec.attached_node = Some("node-a1".into());
    let call = delete(&svc, "pvc-1").await;
    serve(&mut api, Method::GET, VOL, json!(attached)).await;
    let e = alone(&mut api, call).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("node-a1"), "{}", e.message());
}

// ---- ControllerPublishVolume / ControllerUnpublishVolume ----

#[tokio::test(start_paused = true)]
async fn publish_sets_the_node_waits_for_the_head_there_and_returns_its_open_request() {
    let (svc, mut api, _agents) = setup();
    let call = spawn_publish(&svc, "pvc-1", "node-a2");
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let mut patched = ready();
    patched.spec.attached_node = Some("node-a2".into());
    patched.meta_mut().generation = Some(2);
    let patch = serve(&mut api, Method::PATCH, VOL, json!(patched)).await;
    assert_eq!(patch["__type"], "application/merge-patch+json");
    assert!(patch["__query"].as_str().unwrap().contains("fieldManager=cairn-csi"), "{patch}");
    assert_eq!(patch["spec"], json!({"attachedNode": "node-a2"}));
    // The operator has not seen generation 2 yet; then the head is there.
    serve(&mut api, Method::GET, VOL, json!(patched)).await;
    let mut moved = placed("pvc-1", VolumePhase::Ready, "a2", 2);
    moved.spec.attached_node = Some("node-a2".into());
    moved.meta_mut().generation = Some(2);
    moved.status.as_mut().unwrap().observed_generation = Some(2);
    serve(&mut api, Method::GET, VOL, json!(moved)).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let ctx = alone(&mut api, call).await.unwrap().publish_context;
    let open = cairn_csi::open_head_from_context(&ctx).unwrap();
    assert_eq!(ctx["cairn.dev/epoch"], "2", "one epoch up: the fence");
    assert_eq!(open, cairn_client::head::desired(&moved, &cluster()).unwrap().open);
    assert_eq!((open.volume_id.as_str(), open.epoch, open.fuse), (AGENT_VOL, 2, false));
    let names: Vec<&str> = open.agents.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["a1", "a2"]);

    // A repeat answers the same without a write.
    let call = spawn_publish(&svc, "pvc-1", "node-a2");
    serve(&mut api, Method::GET, VOL, json!(moved)).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    serve(&mut api, Method::GET, VOL, json!(moved)).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    assert_eq!(alone(&mut api, call).await.unwrap().publish_context, ctx);
}

#[tokio::test(start_paused = true)]
async fn publish_is_refused_on_another_node_an_unknown_node_or_volume_a_remote_or_held_volume() {
    let (svc, mut api, _agents) = setup();
    let mut attached = ready();
    attached.spec.attached_node = Some("node-a1".into());
    let call = spawn_publish(&svc, "pvc-1", "node-a2");
    serve(&mut api, Method::GET, VOL, json!(attached)).await;
    let e = alone(&mut api, call).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("published to node node-a1"), "{}", e.message());

    for node in ["node-x", "node-a3"] {
        let call = spawn_publish(&svc, "pvc-1", node);
        serve(&mut api, Method::GET, VOL, json!(ready())).await;
        serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
        let e = alone(&mut api, call).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{node} (a3 is unreachable): {e:?}");
        assert!(e.message().contains(node), "{}", e.message());
    }

    let call = spawn_publish(&svc, "pvc-1", "node-a1");
    not_found(&mut api, VOL).await;
    assert_eq!(alone(&mut api, call).await.unwrap_err().code(), Code::NotFound);

    let mut remote = ready();
    remote.spec.role = VolumeRole::Remote;
    let call = spawn_publish(&svc, "pvc-1", "node-a1");
    serve(&mut api, Method::GET, VOL, json!(remote)).await;
    assert_eq!(alone(&mut api, call).await.unwrap_err().code(), Code::FailedPrecondition);

    let mut held = ready();
    held.annotations_mut().insert(cairn_api::crd::volume::ROLE_HOLD.into(), "db-to-b/now".into());
    let call = spawn_publish(&svc, "pvc-1", "node-a1");
    serve(&mut api, Method::GET, VOL, json!(held)).await;
    let e = alone(&mut api, call).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("db-to-b/now"), "{}", e.message());

    // A block capability for a volume created for a filesystem.
    let req = csi::ControllerPublishVolumeRequest {
        volume_id: "pvc-1".into(),
        node_id: "node-a1".into(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    };
    let s = svc.clone();
    let call = tokio::spawn(async move {
        s.controller_publish_volume(tonic::Request::new(req)).await.map(drop)
    });
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    assert_eq!(alone(&mut api, call).await.unwrap_err().code(), Code::AlreadyExists);

    // Missing fields.
    let s = svc.clone();
    let call = tokio::spawn(async move {
        let req =
            csi::ControllerPublishVolumeRequest { volume_id: "pvc-1".into(), ..Default::default() };
        s.controller_publish_volume(tonic::Request::new(req)).await.map(drop)
    });
    let e = alone(&mut api, call).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("node_id"), "{}", e.message());
}

fn spawn_unpublish(
    svc: &ControllerService,
    volume: &str,
    node: &str,
) -> JoinHandle<Result<(), tonic::Status>> {
    let svc = svc.clone();
    let req = csi::ControllerUnpublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        ..Default::default()
    };
    tokio::spawn(async move {
        svc.controller_unpublish_volume(tonic::Request::new(req)).await.map(drop)
    })
}

#[tokio::test(start_paused = true)]
async fn unpublish_removes_the_node_and_is_done_already_elsewhere_or_for_a_missing_volume() {
    let (svc, mut api, _agents) = setup();
    let mut attached = ready();
    attached.spec.attached_node = Some("node-a2".into());
    let call = spawn_unpublish(&svc, "pvc-1", "node-a2");
    serve(&mut api, Method::GET, VOL, json!(attached)).await;
    let patch = serve(&mut api, Method::PATCH, VOL, json!(ready())).await;
    assert_eq!(patch["spec"], json!({"attachedNode": null}));
    assert!(patch["__query"].as_str().unwrap().contains("fieldManager=cairn-csi"));
    alone(&mut api, call).await.unwrap();

    let call = spawn_unpublish(&svc, "pvc-1", "node-a1");
    serve(&mut api, Method::GET, VOL, json!(attached)).await;
    alone(&mut api, call).await.unwrap();

    let call = spawn_unpublish(&svc, "pvc-1", "node-a2");
    not_found(&mut api, VOL).await;
    alone(&mut api, call).await.unwrap();
}

// ---- Snapshots ----

#[tokio::test(start_paused = true)]
async fn a_snapshot_is_recorded_then_taken_at_the_head_above_every_generation_and_a_repeat_answers_it()
 {
    let (svc, mut api, agents) = setup();
    agents.add_snapshot(AGENT_VOL, "daily-20260101-0000", 1_767_225_600, 1_767_225_600);
    let name = "snapshot-5f2a61c4-1111-4a8e-9c1d-0123456789ab";
    let call = spawn_snapshot(&svc, "pvc-1", name);
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    serve(
        &mut api,
        Method::GET,
        VOLS,
        list("VolumeList", vec![json!(ready()), json!(created("pvc-2"))]),
    )
    .await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let mut recorded = ready();
    recorded.annotations_mut().insert(annotation::SNAPSHOTS.into(), name.into());
    let patch = serve(&mut api, Method::PATCH, VOL, json!(recorded)).await;
    assert_eq!(patch["metadata"]["annotations"][annotation::SNAPSHOTS], name, "{patch}");
    assert!(patch["__query"].as_str().unwrap().contains("fieldManager=cairn-csi"));
    let snap = alone(&mut api, call).await.unwrap().snapshot.unwrap();
    assert_eq!(snap.snapshot_id, format!("pvc-1/{name}"));
    assert_eq!(snap.source_volume_id, "pvc-1");
    assert!(snap.ready_to_use);
    assert_eq!(snap.size_bytes, 1 << 30);
    assert!(snap.creation_time.unwrap().seconds > 1_767_225_600);
    let taken: Vec<Call> =
        agents.calls().into_iter().filter(|c| matches!(c, Call::Snapshot { .. })).collect();
    assert_eq!(
        taken,
        [Call::Snapshot { volume: AGENT_VOL.into(), id: name.into(), generation: 1_767_225_601 }]
    );

    // The repeat finds it (recorded and at the agent): nothing taken again.
    let call = spawn_snapshot(&svc, "pvc-1", name);
    serve(&mut api, Method::GET, VOL, json!(recorded)).await;
    serve(&mut api, Method::GET, VOLS, list("VolumeList", vec![json!(recorded)])).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let again = alone(&mut api, call).await.unwrap().snapshot.unwrap();
    assert_eq!(again, snap);
    assert_eq!(agents.calls().iter().filter(|c| matches!(c, Call::Snapshot { .. })).count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_name_taken_elsewhere_is_already_exists_a_remote_or_unknown_source_refused() {
    let (svc, mut api, agents) = setup();
    let mut other = placed("pvc-2", VolumePhase::Ready, "a2", 1);
    other.annotations_mut().insert(annotation::SNAPSHOTS.into(), "snap-1".into());
    let call = spawn_snapshot(&svc, "pvc-1", "snap-1");
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    serve(&mut api, Method::GET, VOLS, list("VolumeList", vec![json!(ready()), json!(other)]))
        .await;
    let e = alone(&mut api, call).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("volume pvc-2"), "{}", e.message());

    // A schedule's snapshot of that id on the volume itself is not ours.
    agents.add_snapshot(AGENT_VOL, "nightly", 5, 1_767_225_600);
    let call = spawn_snapshot(&svc, "pvc-1", "nightly");
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    serve(&mut api, Method::GET, VOLS, list("VolumeList", vec![json!(ready())])).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    assert_eq!(alone(&mut api, call).await.unwrap_err().code(), Code::AlreadyExists);

    // A Remote volume gets its snapshots from its primary.
    let mut remote = ready();
    remote.spec.role = VolumeRole::Remote;
    let call = spawn_snapshot(&svc, "pvc-1", "snap-2");
    serve(&mut api, Method::GET, VOL, json!(remote)).await;
    let e = alone(&mut api, call).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    let call = spawn_snapshot(&svc, "pvc-1", "snap-2");
    not_found(&mut api, VOL).await;
    assert_eq!(alone(&mut api, call).await.unwrap_err().code(), Code::NotFound);

    let e = alone(&mut api, spawn_snapshot(&svc, "pvc-1", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = alone(&mut api, spawn_snapshot(&svc, "", "snap-2")).await.unwrap_err();
    assert!(e.message().contains("source_volume_id"), "{}", e.message());
}

fn spawn_delete_snapshot(
    svc: &ControllerService,
    id: &str,
) -> JoinHandle<Result<(), tonic::Status>> {
    let svc = svc.clone();
    let req = csi::DeleteSnapshotRequest { snapshot_id: id.into(), ..Default::default() };
    tokio::spawn(async move { svc.delete_snapshot(tonic::Request::new(req)).await.map(drop) })
}

#[tokio::test(start_paused = true)]
async fn deleting_a_snapshot_removes_it_at_the_head_then_from_the_record() {
    let (svc, mut api, agents) = setup();
    agents.add_snapshot(AGENT_VOL, "snap-1", 3, 1_767_225_600);
    let mut vol = ready();
    vol.annotations_mut().insert(annotation::SNAPSHOTS.into(), "snap-1".into());
    let call = spawn_delete_snapshot(&svc, "pvc-1/snap-1");
    serve(&mut api, Method::GET, VOL, json!(vol)).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let patch = serve(&mut api, Method::PATCH, VOL, json!(ready())).await;
    assert_eq!(patch["metadata"]["annotations"][annotation::SNAPSHOTS], Value::Null, "{patch}");
    alone(&mut api, call).await.unwrap();
    assert!(agents.snapshot_ids(AGENT_VOL).is_empty());
    assert!(
        agents
            .calls()
            .contains(&Call::DeleteSnapshot { volume: AGENT_VOL.into(), id: "snap-1".into() })
    );

    // Gone already, a malformed id, a missing volume: all deleted.
    let call = spawn_delete_snapshot(&svc, "pvc-1/snap-1");
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    alone(&mut api, call).await.unwrap();
    alone(&mut api, spawn_delete_snapshot(&svc, "not an id")).await.unwrap();
    let call = spawn_delete_snapshot(&svc, "pvc-9/snap-1");
    not_found(&mut api, "/apis/cairn.dev/v1alpha1/namespaces/cairn-system/volumes/pvc-9").await;
    alone(&mut api, call).await.unwrap();
    let e = alone(&mut api, spawn_delete_snapshot(&svc, "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // An agent that does not answer: its code, and the record is kept.
    agents.set_down("http://a1.site-a:7070");
    let call = spawn_delete_snapshot(&svc, "pvc-1/snap-1");
    serve(&mut api, Method::GET, VOL, json!(vol)).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    assert_eq!(alone(&mut api, call).await.unwrap_err().code(), Code::Unavailable);
}

fn spawn_list_snapshots(
    svc: &ControllerService,
    req: csi::ListSnapshotsRequest,
) -> JoinHandle<Result<csi::ListSnapshotsResponse, tonic::Status>> {
    let svc = svc.clone();
    tokio::spawn(async move {
        svc.list_snapshots(tonic::Request::new(req)).await.map(|r| r.into_inner())
    })
}

#[tokio::test(start_paused = true)]
async fn snapshots_are_listed_from_the_heads_in_pages_and_by_id() {
    let (svc, mut api, agents) = setup();
    agents.add_snapshot(AGENT_VOL, "s1", 1, 100);
    agents.add_snapshot(AGENT_VOL, "s2", 2, 200);
    agents.add_snapshot("cairn-system-pvc-2", "s3", 1, 300);
    let vols = || {
        list(
            "VolumeList",
            vec![
                json!(placed("pvc-2", VolumePhase::Ready, "a2", 1)),
                json!(ready()),
                json!(created("pvc-3")),
            ],
        )
    };
    let all = |max_entries, starting_token: &str| csi::ListSnapshotsRequest {
        max_entries,
        starting_token: starting_token.into(),
        ..Default::default()
    };
    let call = spawn_list_snapshots(&svc, all(2, ""));
    serve(&mut api, Method::GET, VOLS, vols()).await;
    serve(&mut api, Method::GET, CLUSTERS, list("StorageClusterList", vec![json!(cluster())]))
        .await;
    let page = alone(&mut api, call).await.unwrap();
    let ids: Vec<String> =
        page.entries.iter().map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone()).collect();
    assert_eq!(ids, ["pvc-1/s1", "pvc-1/s2"]);
    assert_eq!(page.next_token, "2");
    let call = spawn_list_snapshots(&svc, all(2, &page.next_token));
    serve(&mut api, Method::GET, VOLS, vols()).await;
    serve(&mut api, Method::GET, CLUSTERS, list("StorageClusterList", vec![json!(cluster())]))
        .await;
    let last = alone(&mut api, call).await.unwrap();
    assert_eq!(last.entries[0].snapshot.as_ref().unwrap().snapshot_id, "pvc-2/s3");
    assert_eq!(last.entries[0].snapshot.as_ref().unwrap().creation_time.unwrap().seconds, 300);
    assert!(last.next_token.is_empty());

    let call = spawn_list_snapshots(&svc, all(2, "7"));
    serve(&mut api, Method::GET, VOLS, vols()).await;
    serve(&mut api, Method::GET, CLUSTERS, list("StorageClusterList", vec![json!(cluster())]))
        .await;
    assert_eq!(alone(&mut api, call).await.unwrap_err().code(), Code::Aborted);

    let by_id = csi::ListSnapshotsRequest { snapshot_id: "pvc-1/s2".into(), ..Default::default() };
    let call = spawn_list_snapshots(&svc, by_id);
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    serve(&mut api, Method::GET, CLUSTERS, list("StorageClusterList", vec![json!(cluster())]))
        .await;
    let one = alone(&mut api, call).await.unwrap();
    assert_eq!(one.entries.len(), 1);
    assert_eq!(one.entries[0].snapshot.as_ref().unwrap().source_volume_id, "pvc-1");

    let unknown =
        csi::ListSnapshotsRequest { snapshot_id: "no such id".into(), ..Default::default() };
    assert!(alone(&mut api, spawn_list_snapshots(&svc, unknown)).await.unwrap().entries.is_empty());
    let by_source =
        csi::ListSnapshotsRequest { source_volume_id: "pvc-9".into(), ..Default::default() };
    let call = spawn_list_snapshots(&svc, by_source);
    not_found(&mut api, "/apis/cairn.dev/v1alpha1/namespaces/cairn-system/volumes/pvc-9").await;
    assert!(alone(&mut api, call).await.unwrap().entries.is_empty());
}

// ---- ListVolumes, ControllerGetVolume, ValidateVolumeCapabilities ----

#[tokio::test(start_paused = true)]
async fn volumes_are_listed_in_pages_with_their_node_and_condition() {
    let (svc, mut api, _agents) = setup();
    let mut attached = ready();
    attached.spec.attached_node = Some("node-a1".into());
    let degraded = placed("pvc-2", VolumePhase::Degraded, "a2", 1);
    let s = svc.clone();
    let call = tokio::spawn(async move {
        let req = csi::ListVolumesRequest { max_entries: 1, starting_token: String::new() };
        s.list_volumes(tonic::Request::new(req)).await.map(|r| r.into_inner())
    });
    serve(&mut api, Method::GET, VOLS, list("VolumeList", vec![json!(degraded), json!(attached)]))
        .await;
    let page = alone(&mut api, call).await.unwrap();
    assert_eq!(page.next_token, "1");
    let e = &page.entries[0];
    assert_eq!(e.volume.as_ref().unwrap().volume_id, "pvc-1", "by name");
    let st = e.status.as_ref().unwrap();
    assert_eq!(st.published_node_ids, ["node-a1"]);
    assert!(!st.volume_condition.as_ref().unwrap().abnormal);

    let s = svc.clone();
    let call = tokio::spawn(async move {
        let req = csi::ListVolumesRequest { max_entries: 1, starting_token: "1".into() };
        s.list_volumes(tonic::Request::new(req)).await.map(|r| r.into_inner())
    });
    let (req, send) = api.next_request().await.unwrap();
    assert!(
        req.uri()
            .query()
            .unwrap()
            .contains("labelSelector=app.kubernetes.io%2Fmanaged-by%3Dcairn-csi"),
        "{}",
        req.uri()
    );
    let body = list("VolumeList", vec![json!(degraded), json!(attached)]);
    send.send_response(Response::new(Body::from(serde_json::to_vec(&body).unwrap())));
    let page = alone(&mut api, call).await.unwrap();
    assert!(page.next_token.is_empty());
    assert!(page.entries[0].status.as_ref().unwrap().volume_condition.as_ref().unwrap().abnormal);

    let s = svc.clone();
    let call = tokio::spawn(async move {
        let req = csi::ControllerGetVolumeRequest { volume_id: "pvc-2".into() };
        s.controller_get_volume(tonic::Request::new(req)).await.map(|r| r.into_inner())
    });
    serve(
        &mut api,
        Method::GET,
        "/apis/cairn.dev/v1alpha1/namespaces/cairn-system/volumes/pvc-2",
        json!(degraded),
    )
    .await;
    let got = alone(&mut api, call).await.unwrap();
    assert!(got.status.unwrap().volume_condition.unwrap().abnormal);
}

#[tokio::test(start_paused = true)]
async fn capabilities_are_confirmed_only_when_served_and_as_created() {
    let (svc, mut api, _agents) = setup();
    let validate = |caps: Vec<csi::VolumeCapability>| {
        let s = svc.clone();
        tokio::spawn(async move {
            let req = csi::ValidateVolumeCapabilitiesRequest {
                volume_id: "pvc-1".into(),
                volume_capabilities: caps,
                ..Default::default()
            };
            s.validate_volume_capabilities(tonic::Request::new(req)).await.map(|r| r.into_inner())
        })
    };
    let call = validate(vec![mount_cap(Mode::SingleNodeWriter)]);
    serve(&mut api, Method::GET, VOL, json!(ready())).await;
    assert!(alone(&mut api, call).await.unwrap().confirmed.is_some());
    for cap in [mount_cap(Mode::MultiNodeMultiWriter), block_cap()] {
        let call = validate(vec![cap]);
        serve(&mut api, Method::GET, VOL, json!(ready())).await;
        let r = alone(&mut api, call).await.unwrap();
        assert!(r.confirmed.is_none() && !r.message.is_empty(), "{r:?}");
    }
    let call = validate(vec![mount_cap(Mode::SingleNodeWriter)]);
    not_found(&mut api, VOL).await;
    assert_eq!(alone(&mut api, call).await.unwrap_err().code(), Code::NotFound);
    let e = alone(&mut api, validate(vec![])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

// ---- GetCapacity, ControllerGetCapabilities, ControllerExpandVolume ----

#[tokio::test(start_paused = true)]
async fn capacity_is_the_clusters_free_space_over_the_replicas() {
    let (svc, mut api, _agents) = setup();
    let capacity = |params: &[(&str, &str)]| {
        let s = svc.clone();
        let parameters = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        tokio::spawn(async move {
            let req = csi::GetCapacityRequest { parameters, ..Default::default() };
            s.get_capacity(tonic::Request::new(req)).await.map(|r| r.into_inner())
        })
    };
    // Two healthy agents with 1 TiB - 1 GiB free each; a3 is unreachable.
    let free = 2 * ((1i64 << 40) - (1 << 30));
    let call = capacity(&[("cluster", "site-a")]);
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let r = alone(&mut api, call).await.unwrap();
    assert_eq!(r.available_capacity, free / 2, "the cluster's default: 2 replicas");
    assert_eq!(r.minimum_volume_size, Some(4096));
    let call = capacity(&[("cluster", "site-a"), ("replicas", "1")]);
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    assert_eq!(alone(&mut api, call).await.unwrap().available_capacity, free);
    let call = capacity(&[("cluster", "site-a")]);
    not_found(&mut api, CLUSTER).await;
    assert_eq!(alone(&mut api, call).await.unwrap().available_capacity, 0);
    let call = capacity(&[]);
    serve(&mut api, Method::GET, CLUSTERS, list("StorageClusterList", vec![json!(cluster())]))
        .await;
    assert_eq!(alone(&mut api, call).await.unwrap().available_capacity, free / 2);
}

#[tokio::test]
async fn capabilities_offer_snapshots_publishing_and_cloning_but_not_growth() {
    use csi::controller_service_capability::{Type, rpc::Type as Rpc};
    let (svc, _api, _agents) = setup();
    let caps = svc
        .controller_get_capabilities(tonic::Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let rpcs: Vec<Rpc> = caps
        .iter()
        .map(|c| match c.r#type {
            Some(Type::Rpc(r)) => Rpc::try_from(r.r#type).unwrap(),
            None => panic!("an empty capability"),
        })
        .collect();
    for want in [
        Rpc::CreateDeleteVolume,
        Rpc::PublishUnpublishVolume,
        Rpc::CreateDeleteSnapshot,
        Rpc::ListSnapshots,
        Rpc::ListVolumes,
        Rpc::ListVolumesPublishedNodes,
        Rpc::GetCapacity,
        Rpc::SingleNodeMultiWriter,
        Rpc::PublishReadonly,
        Rpc::GetVolume,
    ] {
        assert!(rpcs.contains(&want), "{want:?}");
    }
    assert!(rpcs.contains(&Rpc::CloneVolume), "restore and clone are built");
    assert!(!rpcs.contains(&Rpc::ExpandVolume));
    let e =
        svc.controller_expand_volume(tonic::Request::new(Default::default())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    assert!(e.message().contains("not supported"), "{}", e.message());
}
