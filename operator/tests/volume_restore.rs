//! The Volume reconciler's restore step (a Volume with `spec.source`)
//! against kube's mocked API server and the fake agents: the head opens
//! Remote, the source snapshot is copied in full through a receiving link,
//! `Restored=True` is written, and only then is the head promoted (and a
//! clone's snapshot deleted at its source).

mod common;
mod fixtures;

use std::{sync::Arc, time::Duration};

use cairn_api::{
    agent::v1 as pb,
    crd::{Volume, VolumeRole, VolumeStatus},
};
use cairn_operator::{
    agent::{Call, FakeAgents},
    volume::{Error, reconcile, restore},
};
use common::{ApiServer, serve, setup};
use fixtures::cluster;
use http::Method;
use kube::{Resource, runtime::controller::Action};
use serde_json::{Value, json};

const TARGET: &str = "/apis/cairn.dev/v1alpha1/namespaces/shop/volumes/db-copy";
const SOURCE: &str = "/apis/cairn.dev/v1alpha1/namespaces/shop/volumes/db";
const VOLUMES: &str = "/apis/cairn.dev/v1alpha1/namespaces/shop/volumes";
const LINKS: &str = "/apis/cairn.dev/v1alpha1/namespaces/shop/remotelinks";
const CLUSTER: &str = "/apis/cairn.dev/v1alpha1/storageclusters/site-a";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";
const A1: &str = "http://a1.site-a:7070";
const A2: &str = "http://a2.site-a:7070";

/// Volume db-copy restored from `db` (snapshot `snapshot`, or a clone),
/// with its finalizer.
fn target(snapshot: Option<&str>) -> Volume {
    let mut v = fixtures::restored("db-copy", "db", snapshot);
    let m = v.meta_mut();
    m.uid = Some("2222-3333".into());
    m.generation = Some(1);
    m.resource_version = Some("5".into());
    m.finalizers = Some(vec!["cairn.dev/replicas".into()]);
    v
}

/// The id db-copy gets at the agents (its uid's tag).
fn target_id() -> String {
    cairn_api::crd::volume::volume_id("shop", "db-copy", "2222-3333")
}

/// The source: Volume db, placed, head on a1 (agent id `shop-db`).
fn source() -> Volume {
    fixtures::placed(fixtures::volume("db", "site-a", VolumeRole::Primary), "a1")
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    let all = status["status"]["conditions"].as_array().expect("conditions");
    all.iter().find(|c| c["type"] == type_).unwrap_or_else(|| panic!("no {type_}: {status}"))
}

fn copy_calls(agents: &FakeAgents) -> Vec<Call> {
    let copies = |c: &Call| {
        matches!(
            c,
            Call::RegisterLink { .. }
                | Call::CopySnapshot { .. }
                | Call::UnregisterLink { .. }
                | Call::Snapshot { .. }
                | Call::DeleteSnapshot { .. }
                | Call::Promote { .. }
        )
    };
    agents.calls().into_iter().filter(copies).collect()
}

/// The first reconcile of a restore up to the copy: the cluster, the
/// Restoring status, the source and its cluster. Returns the status.
async fn serve_until_copy(api: &mut ApiServer, vol: &Volume) -> Value {
    serve(api, Method::GET, CLUSTER, json!(cluster())).await;
    if vol.status.as_ref().is_none_or(|s| s.head.is_none()) {
        let reserved = serve(api, Method::PATCH, &format!("{TARGET}/status"), json!(vol)).await;
        assert_eq!(reserved["metadata"]["resourceVersion"], "5", "{reserved}");
    }
    let restoring = serve(api, Method::PATCH, &format!("{TARGET}/status"), json!(vol)).await;
    serve(api, Method::GET, SOURCE, json!(source())).await;
    serve(api, Method::GET, CLUSTER, json!(cluster())).await;
    restoring
}

/// `vol` with the status a reconcile wrote.
fn with_status(mut vol: Volume, written: &Value) -> Volume {
    vol.status = Some(serde_json::from_value::<VolumeStatus>(written["status"].clone()).unwrap());
    vol
}

#[tokio::test]
async fn a_restore_opens_the_head_remote_copies_the_snapshot_then_promotes_it() {
    let (ctx, mut api, agents) = setup();
    agents.add_snapshot("shop-db", "nightly", 7, 1_800_000_000);
    let vol = target(Some("nightly"));
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx.clone()));
    let restoring = serve_until_copy(&mut api, &vol).await;
    let r = condition(&restoring, "Restored");
    assert_eq!((r["status"].as_str(), r["reason"].as_str()), (Some("False"), Some("Restoring")));
    assert_eq!(condition(&restoring, "Ready")["status"], "False", "nothing attaches yet");
    let done = serve(&mut api, Method::PATCH, &format!("{TARGET}/status"), json!(vol)).await;
    let ev = serve(&mut api, Method::POST, EVENTS, json!({})).await;
    assert_eq!((ev["type"].as_str(), ev["reason"].as_str()), (Some("Normal"), Some("Restored")));
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(Duration::from_secs(1)));
    let r = condition(&done, "Restored");
    assert_eq!(r["status"], "True", "{done}");
    assert!(r["message"].as_str().unwrap().contains("snapshot nightly of Volume db"), "{r}");
    assert_eq!(done["status"]["role"], "Remote", "not promoted before Restored is recorded");

    let opened = &agents.calls()[0];
    assert!(
        matches!(opened, Call::OpenHead { endpoint, role: pb::VolumeRole::Remote, .. } if endpoint == A2),
        "the head opens Remote: {opened:?}"
    );
    let link = restore::link_id(&target_id());
    assert_eq!(
        copy_calls(&agents),
        [
            Call::RegisterLink {
                endpoint: A2.into(),
                link: link.clone(),
                target_volume: target_id()
            },
            Call::CopySnapshot {
                endpoint: A1.into(),
                volume: "shop-db".into(),
                snapshot: "nightly".into(),
                base: String::new(),
                link: link.clone(),
                target_endpoint: A2.into(),
            },
            Call::UnregisterLink { endpoint: A2.into(), link },
        ]
    );
    assert_eq!(agents.snapshot_ids(&target_id()), ["nightly"], "sealed at the new volume");

    // The next reconcile sees Restored=True: the head takes its spec role.
    let vol = with_status(vol, &done);
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx));
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let ev = serve(&mut api, Method::POST, EVENTS, json!({})).await;
    assert_eq!(ev["reason"], "Promoted");
    let st = serve(&mut api, Method::PATCH, &format!("{TARGET}/status"), json!(vol)).await;
    run.await.unwrap().unwrap();
    assert_eq!(st["status"]["role"], "Primary");
    assert_eq!(condition(&st, "Ready")["status"], "True", "{st}");
    assert_eq!(condition(&st, "Restored")["status"], "True");
    let calls = copy_calls(&agents);
    assert_eq!(calls.len(), 4, "copied once, then promoted: {calls:?}");
    assert_eq!(calls[3], Call::Promote { endpoint: A2.into(), volume: target_id() });
}

#[tokio::test]
async fn a_clone_copies_a_snapshot_taken_for_it_and_deletes_it_once_restored_is_recorded() {
    let (ctx, mut api, agents) = setup();
    agents.add_snapshot("shop-db", "daily", 100, 1_800_000_000);
    let vol = target(None);
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx));
    serve_until_copy(&mut api, &vol).await;
    serve(&mut api, Method::PATCH, &format!("{TARGET}/status"), json!(vol)).await;
    serve(&mut api, Method::POST, EVENTS, json!({})).await;
    run.await.unwrap().unwrap();
    let id = restore::clone_snapshot_id(&vol);
    let link = restore::link_id(&target_id());
    assert_eq!(
        copy_calls(&agents),
        [
            Call::Snapshot { volume: "shop-db".into(), id: id.clone(), generation: 101 },
            Call::RegisterLink {
                endpoint: A2.into(),
                link: link.clone(),
                target_volume: target_id()
            },
            Call::CopySnapshot {
                endpoint: A1.into(),
                volume: "shop-db".into(),
                snapshot: id.clone(),
                base: String::new(),
                link: link.clone(),
                target_endpoint: A2.into(),
            },
            Call::UnregisterLink { endpoint: A2.into(), link },
            Call::DeleteSnapshot { volume: "shop-db".into(), id: id.clone() },
        ]
    );
    assert_eq!(agents.snapshot_ids("shop-db"), ["daily"], "the clone's snapshot is gone");
    assert_eq!(agents.snapshot_ids(&target_id()), [id]);
}

#[tokio::test]
async fn a_repeat_before_restored_is_recorded_copies_again_and_takes_no_second_clone_snapshot() {
    let (ctx, mut api, agents) = setup();
    agents.add_snapshot("shop-db", "daily", 100, 1_800_000_000);
    let mut vol = target(None);
    // An earlier attempt took the clone's snapshot and wrote Restoring,
    // then the operator stopped in the copy.
    let id = restore::clone_snapshot_id(&vol);
    agents.add_snapshot("shop-db", &id, 101, 1_800_000_100);
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx.clone()));
    let restoring = serve_until_copy(&mut api, &vol).await;
    vol = with_status(vol, &restoring);
    serve(&mut api, Method::PATCH, &format!("{TARGET}/status"), json!(vol)).await;
    serve(&mut api, Method::POST, EVENTS, json!({})).await;
    run.await.unwrap().unwrap();
    let calls = copy_calls(&agents);
    assert!(!calls.iter().any(|c| matches!(c, Call::Snapshot { .. })), "{calls:?}");
    assert!(
        calls.iter().any(|c| matches!(c, Call::CopySnapshot { snapshot, .. } if *snapshot == id)),
        "{calls:?}"
    );

    // Still Restoring in the status it was given: no new Restoring write.
    let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx));
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    serve(&mut api, Method::GET, SOURCE, json!(source())).await;
    serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
    let done = serve(&mut api, Method::PATCH, &format!("{TARGET}/status"), json!(vol)).await;
    assert_eq!(condition(&done, "Restored")["status"], "True");
    // The recorder folds the repeated Restored event into the first one.
    let (req, send) = api.next_request().await.unwrap();
    assert!(req.uri().path().starts_with(EVENTS), "{}", req.uri());
    send.send_response(http::Response::new(kube::client::Body::from(b"{}".to_vec())));
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_missing_source_snapshot_or_another_size_waits_with_a_warning_and_copies_nothing() {
    let (ctx, mut api, agents) = setup();
    agents.add_snapshot("shop-db", "nightly", 7, 1_800_000_000);
    let cases: [(Volume, &str, &str); 3] = [
        (target(Some("weekly")), "SnapshotNotFound", "has no snapshot weekly"),
        (
            {
                let mut v = target(Some("nightly"));
                v.spec.size_bytes = 2 << 30;
                v
            },
            "SizeMismatch",
            "create it with sizeBytes: 1073741824",
        ),
        (
            {
                let mut v = target(Some("nightly"));
                v.spec.source.as_mut().unwrap().snapshot.as_mut().unwrap().volume = "gone".into();
                v
            },
            "SourceNotFound",
            "source Volume gone does not exist",
        ),
    ];
    for (vol, reason, says) in cases {
        let run = tokio::spawn(reconcile(Arc::new(vol.clone()), ctx.clone()));
        serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
        serve(&mut api, Method::PATCH, &format!("{TARGET}/status"), json!(vol)).await;
        serve(&mut api, Method::PATCH, &format!("{TARGET}/status"), json!(vol)).await;
        let from = vol.spec.source.as_ref().unwrap().volume_name().to_string();
        let path = format!("{VOLUMES}/{from}");
        if from == "gone" {
            common::not_found(&mut api, &path).await;
        } else {
            serve(&mut api, Method::GET, &path, json!(source())).await;
            if reason != "SizeMismatch" {
                serve(&mut api, Method::GET, CLUSTER, json!(cluster())).await;
            }
        }
        let ev = serve(&mut api, Method::POST, EVENTS, json!({})).await;
        assert_eq!((ev["type"].as_str(), ev["reason"].as_str()), (Some("Warning"), Some(reason)));
        assert!(ev["note"].as_str().unwrap().contains(says), "{ev}");
        let st = serve(&mut api, Method::PATCH, &format!("{TARGET}/status"), json!(vol)).await;
        assert_eq!(run.await.unwrap().unwrap(), Action::requeue(Duration::from_secs(30)));
        let r = condition(&st, "Restored");
        assert_eq!((r["status"].as_str(), r["reason"].as_str()), (Some("False"), Some(reason)));
        assert_eq!(condition(&st, "Ready")["status"], "False");
    }
    assert!(copy_calls(&agents).is_empty(), "nothing registered, copied or promoted");
}

#[tokio::test]
async fn a_source_still_being_copied_from_cannot_be_deleted() {
    let (ctx, mut api, agents) = setup();
    let mut src = source();
    let m = src.meta_mut();
    m.finalizers = Some(vec!["cairn.dev/replicas".into()]);
    m.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-12-07T12:00:00Z".parse().unwrap(),
    ));
    let run = tokio::spawn(reconcile(Arc::new(src.clone()), ctx));
    let empty = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "RemoteLinkList", "metadata": {}, "items": []});
    serve(&mut api, Method::GET, LINKS, empty).await;
    let list = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "VolumeList", "metadata": {}, "items": [src, target(Some("nightly"))]});
    serve(&mut api, Method::GET, VOLUMES, list).await;
    let ev = serve(&mut api, Method::POST, EVENTS, json!({})).await;
    assert_eq!(ev["reason"], "DeletionBlocked");
    assert!(ev["note"].as_str().unwrap().contains("source of Volume db-copy"), "{ev}");
    let err = run.await.unwrap().unwrap_err();
    assert!(matches!(&err, Error::RestoreSource { restoring, .. } if restoring == "db-copy"));
    assert!(agents.calls().is_empty(), "no replica touched");
}
